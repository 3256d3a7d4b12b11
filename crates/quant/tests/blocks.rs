//! Block quantization against llama.cpp: for every type, camelid's bytes for the fixture tensor
//! are ggml's own (`ggml_quantize_chunk` from libggml-base, recorded by
//! `scripts/fixtures/make_quant_fixtures.py blocks`), camelid's dequantization of ggml's bytes is
//! gguf-py's (`gguf.quants.dequantize`), and the round-trip error stays within ggml's.

use camelid_quant::quantize::encode;
use camelid_quant::types;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant/blocks")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn input() -> (Vec<f32>, usize, usize) {
    let m = manifest();
    let rows = m["rows"].as_u64().unwrap() as usize;
    let cols = m["cols"].as_u64().unwrap() as usize;
    let x = f32s(&std::fs::read(dir().join("input.f32")).unwrap());
    assert_eq!(x.len(), rows * cols);
    (x, rows, cols)
}

fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

const TYPES: &[&str] = &[
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16",
];

#[test]
fn quantized_bytes_are_ggmls() {
    let (x, rows, cols) = input();
    let t = Tensor::from_vec(x, (rows, cols), &Device::Cpu).unwrap();
    let mut bad = Vec::new();
    for name in TYPES {
        let dtype = types::parse(name).unwrap();
        let ours = encode(&t, dtype).unwrap();
        let reference = std::fs::read(dir().join(format!("{name}.ref"))).unwrap();
        assert_eq!(ours.len(), reference.len(), "{name}: byte count");
        let block = dtype.type_size();
        let differing = ours
            .chunks(block)
            .zip(reference.chunks(block))
            .filter(|(a, b)| a != b)
            .count();
        if differing > 0 {
            bad.push(format!(
                "{name}: {differing} of {} blocks differ",
                ours.len() / block
            ));
        }
    }
    assert!(bad.is_empty(), "not ggml's bytes: {bad:?}");
}

#[test]
fn dequantization_is_gguf_pys() {
    let (_, rows, cols) = input();
    for name in TYPES {
        let dtype = types::parse(name).unwrap();
        let reference = std::fs::read(dir().join(format!("{name}.ref"))).unwrap();
        let q = qtensor_from_ggml(dtype, &reference, vec![rows, cols], &Device::Cpu).unwrap();
        let ours: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs = f32s(&std::fs::read(dir().join(format!("{name}.deq.f32"))).unwrap());
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
            .fold(0f32, f32::max);
        // gguf-py computes in numpy float32 with the same formulas; products are exact or
        // within one rounding.
        assert!(
            max <= 1.2e-7,
            "{name}: dequantized values differ by up to {max:e} (relative)"
        );
    }
}

#[test]
fn round_trip_error_within_ggmls() {
    let (x, rows, cols) = input();
    let m = manifest();
    let t = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
    // Loose ceilings a correct quantizer of each width meets on these rows (relative RMS per
    // row; Q6_K and Q4_0's worst rows are the 1e-4 row whose f16 scales underflow in ggml too).
    let ceiling = |n: &str| match n {
        "Q8_0" => 0.02,
        "Q5_0" | "Q5_1" | "Q5_K" => 0.1,
        "F16" => 1e-3,
        "BF16" => 5e-3,
        _ => 0.2,
    };
    for name in TYPES {
        let dtype = types::parse(name).unwrap();
        let bytes = encode(&t, dtype).unwrap();
        let q = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = (0..rows)
            .map(|r| rel_rms(&deq[r * cols..(r + 1) * cols], &x[r * cols..(r + 1) * cols]))
            .fold(0f64, f64::max);
        let ggml = m["types"][name]["max_row_relative_rms_error"]
            .as_f64()
            .unwrap();
        assert!(
            worst <= ggml * (1.0 + 1e-9) + 1e-12,
            "{name}: worst row error {worst:e} above ggml's {ggml:e}"
        );
        assert!(worst <= ceiling(name), "{name}: worst row error {worst:e}");
    }
}
