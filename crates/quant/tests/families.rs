//! HF → GGUF for every family with a `GgufExport`: the F32 file camelid writes must hold the
//! same model (camelid's logits on the file = on the HF directory = transformers' recorded ones),
//! which checks the metadata, the q/k permutation (LLaMA, Mistral) or its absence (Qwen2), tied
//! heads and sharded checkpoints. Settings llama.cpp's keys cannot express are refused.

use camelid_engine::generate::all_logits;
use camelid_model::Model;
use camelid_quant::{quantize, types, QuantizeOptions};
use candle_core::Device;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn parity(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(case)
}

fn to_f32(case: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("camelid-quant-fam-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{case}.gguf"));
    let opts = QuantizeOptions {
        to: types::parse("F32").unwrap(),
        keep_output: false,
        keep_embeddings: false,
    };
    quantize(
        &parity(case),
        &out,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .map(|_| out)
    .map_err(|e| e.to_string())
}

#[test]
fn f32_gguf_holds_the_same_model() {
    for case in [
        "llama_mha_f32",
        "llama_gqa_sharded_f16",
        "llama_mqa_tied_bf16",
        "llama_rope_linear",
        "mistral_swa",
        "qwen2",
        "smollm2_shape",
    ] {
        let file = to_f32(case).unwrap_or_else(|e| panic!("{case}: {e}"));
        let rec: Value = serde_json::from_str(
            &std::fs::read_to_string(parity(case).join("reference.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let model = Model::load(&file, &Device::Cpu).unwrap();
        let ours = all_logits(&model, &ids).unwrap();
        let mut max = 0f64;
        for (o, t) in ours.iter().zip(rec["logits"].as_array().unwrap()) {
            for (a, b) in o.iter().zip(t.as_array().unwrap()) {
                max = max.max((*a as f64 - b.as_f64().unwrap()).abs());
            }
        }
        eprintln!("{case}: max |Δlogit| GGUF vs transformers {max:.1e}");
        assert!(max < 1e-4, "{case}: {max}");
        std::fs::remove_file(&file).ok();
    }
}

#[test]
fn unsupported_settings_are_refused() {
    for (case, needle) in [
        ("llama_rope_yarn", "rope scaling"),
        ("llama_rope_llama3", "rope scaling"),
        ("gpt2", "not supported"),
    ] {
        let e = to_f32(case).expect_err(case);
        assert!(e.contains(needle), "{case}: {e}");
    }
}
