//! Parity with Hugging Face transformers on tiny random-weight checkpoints
//! (`tests/fixtures/parity`, made by `scripts/fixtures/make_parity.py`): every logit within
//! 1e-4 in f32, and the same 8 greedy tokens.

use camelid_engine::generate::{all_logits, greedy_ids};
use camelid_model::Model;
use candle_core::Device;
use std::path::PathBuf;

const TOLERANCE: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn fixture_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(case)
}

fn check(case: &str) {
    let dir = fixture_dir(case);
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
    )
    .expect("reference.json parses");
    let model = Model::load(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{case}: {e}"));
    let logits = all_logits(&model, &reference.ids).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(logits.len(), reference.logits.len(), "{case}: positions");
    let mut worst = 0f32;
    for (row, want) in logits.iter().zip(&reference.logits) {
        assert_eq!(row.len(), want.len(), "{case}: vocabulary size");
        for (a, b) in row.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst <= TOLERANCE,
        "{case}: max |Δlogit| = {worst:e} exceeds {TOLERANCE:e}"
    );
    let greedy = greedy_ids(&model, &reference.ids, reference.greedy.len())
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(greedy, reference.greedy, "{case}: greedy continuation");
    eprintln!("{case}: max |Δlogit| = {worst:e}, greedy ok");
}

macro_rules! parity {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            check(stringify!($name));
        }
    )*};
}

parity!(
    llama_mha_f32,
    llama_gqa_sharded_f16,
    llama_mqa_tied_bf16,
    llama_rope_linear,
    llama_rope_dynamic,
    llama_rope_llama3,
    llama_rope_yarn,
    mistral_swa,
    qwen2,
    baichuan7b,
    smollm2_shape,
    gpt2,
    gpt2_odd_heads,
    gpt_neo,
    gptj,
    gpt_neox_parallel,
    gpt_neox_sequential,
    opt_pre,
    opt_350m_style,
    bloom,
    falcon_7b_style,
    falcon_40b_style,
    falcon_alibi,
    mpt,
    mpt_clip_qkv,
);
