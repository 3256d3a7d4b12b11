//! HF → GGUF for every family with a `GgufExport`: the F32 file camelid writes must hold the
//! same model (camelid's logits on the file = on the HF directory = transformers' recorded ones),
//! which checks the metadata, the q/k permutation (LLaMA, Mistral, Baichuan) or its absence
//! (Qwen2, Qwen, GPT-NeoX), fused-QKV reorders (GPT-NeoX, BLOOM) and splits (Baichuan),
//! transposed Conv1D weights (GPT-2), tied heads and sharded checkpoints, and camelid's own
//! architectures for OPT (position offset, post-norm, embedding projections) and GPT-Neo
//! (per-layer windows, unscaled attention). For the families whose
//! fixtures come with the file llama.cpp's own converter layout gives (`llamacpp_families`), the
//! tensors must equal that file's. Settings the architecture's keys cannot express are refused.

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

fn families(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llamacpp_families")
        .join(case)
}

fn to_f32(case: &str) -> Result<PathBuf, String> {
    to_f32_from(&parity(case), case)
}

fn to_f32_from(src: &std::path::Path, case: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("camelid-quant-fam-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{case}.gguf"));
    let opts = QuantizeOptions {
        to: types::parse("F32").unwrap(),
        keep_output: false,
        keep_embeddings: false,
        mix: None,
    };
    quantize(src, &out, &opts, &AtomicBool::new(false), &mut |_| {})
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
        "gpt2",
        "gpt2_odd_heads",
        "gpt_neox_parallel",
        "gpt_neox_sequential",
        "bloom",
        "falcon_7b_style",
        "falcon_40b_style",
        "gptj",
        "mpt",
        "mpt_clip_qkv",
        "baichuan7b",
        "gpt_neo",
        "opt_pre",
        "opt_350m_style",
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
        let hf = Model::load(&parity(case), &Device::Cpu).unwrap();
        let same = max_diff(&ours, &all_logits(&hf, &ids).unwrap());
        eprintln!(
            "{case}: max |Δlogit| GGUF vs HF (camelid) {same:.1e}, GGUF vs transformers {max:.1e}"
        );
        assert!(same < 1e-5, "{case}: GGUF vs HF {same}");
        assert!(max < 1e-4, "{case}: {max}");
        std::fs::remove_file(&file).ok();
    }
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut max = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            max = max.max((*p as f64 - *q as f64).abs());
        }
    }
    max
}

/// Qwen (v1), Baichuan (13B ALiBi, Baichuan2 NormHead), ChatGLM3 and MPT with QK LayerNorm: the
/// fixture's `model.gguf` has the tensors llama.cpp's converter writes (its generator checks
/// that against `convert_hf_to_gguf.py`), and `reference.json` llama.cpp's logits on it. camelid's
/// F32 file from `hf/` must hold the same tensors (names, shapes, values up to Baichuan2's head
/// normalization in f32 rather than f64), and camelid's logits on it must match llama.cpp's.
#[test]
fn f32_gguf_has_llama_cpp_converter_tensors() {
    use camelid_model::checkpoint::WeightStore;
    for case in [
        "qwen1",
        "baichuan13b",
        "baichuan2_normhead",
        "chatglm3",
        "chatglm3_32k",
        "mpt_qk_ln",
    ] {
        let file =
            to_f32_from(&families(case).join("hf"), case).unwrap_or_else(|e| panic!("{case}: {e}"));
        let (ours, _) = WeightStore::open_gguf(&file, &Device::Cpu).unwrap();
        let (theirs, _) =
            WeightStore::open_gguf(&families(case).join("model.gguf"), &Device::Cpu).unwrap();
        let mut a = ours.canonical_names().0;
        let mut b = theirs.canonical_names().0;
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: tensor names");
        let mut max = 0f32;
        for name in &a {
            let shape = theirs.stored_shape(name).unwrap();
            assert_eq!(ours.stored_shape(name).unwrap(), shape, "{case}: {name}");
            let d = (ours.dense(name, &shape).unwrap() - theirs.dense(name, &shape).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "{case}: {name} differs by {d}");
            max = max.max(d);
        }
        let rec: Value = serde_json::from_str(
            &std::fs::read_to_string(families(case).join("reference.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let logits: Vec<Vec<f32>> = rec["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let model = Model::load(&file, &Device::Cpu).unwrap();
        let d = max_diff(&all_logits(&model, &ids).unwrap(), &logits);
        eprintln!("{case}: tensors equal llama.cpp's converter layout (max |Δ| {max:.1e}); camelid on the file vs llama.cpp's logits {d:.1e}");
        assert!(d < 2e-3, "{case}: logits {d}");
        std::fs::remove_file(&file).ok();
    }
}

#[test]
fn unsupported_settings_are_refused() {
    for (case, needle) in [
        ("llama_rope_yarn", "rope scaling"),
        ("llama_rope_llama3", "rope scaling"),
        ("falcon_alibi", "cannot be expressed"),
    ] {
        let e = to_f32(case).expect_err(case);
        assert!(e.contains(needle), "{case}: {e}");
    }
}
