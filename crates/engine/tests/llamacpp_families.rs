//! Families whose transformers code needs remote code (Qwen v1, Baichuan-13B, Baichuan2,
//! ChatGLM3) or ignores a setting (MPT's `qk_ln`), checked against llama.cpp on tiny random models
//! (`tests/fixtures/llamacpp_families`, made by `scripts/fixtures/make_llamacpp_families.py`).
//! Each case is loaded twice, from llama.cpp's GGUF and from the same weights under the
//! original checkpoint's tensor names; both must give llama.cpp's logits and greedy tokens.

mod common;

use camelid_engine::generate::{all_logits, greedy_ids};
use std::path::Path;

/// 1e-4 on the CPU, 1e-3 on a GPU (`CAMELID_TEST_DEVICE`).
fn tolerance() -> f32 {
    common::f32_tolerance(&common::device())
}

#[derive(serde::Deserialize)]
struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn check_model(case: &str, path: &Path, reference: &Reference) {
    let model = common::load_f32(path).unwrap_or_else(|e| panic!("{case}: {e}"));
    let logits = all_logits(&model, &reference.ids).unwrap_or_else(|e| panic!("{case}: {e}"));
    let mut worst = 0f32;
    for (row, want) in logits.iter().zip(&reference.logits) {
        assert_eq!(row.len(), want.len(), "{case}: vocabulary size");
        for (a, b) in row.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("{case} ({}): max |Δlogit| = {worst:e}", path.display());
    assert!(worst <= tolerance(), "{case}: max |Δlogit| {worst:e}");
    let greedy = greedy_ids(&model, &reference.ids, reference.greedy.len())
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(greedy, reference.greedy, "{case}: greedy continuation");
}

fn check(case: &str) {
    let dir = common::fixtures().join("llamacpp_families").join(case);
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
    )
    .expect("reference parses");
    check_model(case, &dir.join("model.gguf"), &reference);
    check_model(case, &dir.join("hf"), &reference);
}

#[test]
fn qwen1() {
    check("qwen1");
}

#[test]
fn baichuan13b_alibi() {
    check("baichuan13b");
}

#[test]
fn baichuan2_normhead() {
    check("baichuan2_normhead");
}

#[test]
fn chatglm3() {
    check("chatglm3");
}

/// ChatGLM3-6B-32k: `rope_ratio` 50 multiplies the rotary base (llama.cpp's converter writes
/// `rope.freq_base` 500000). Same weights as `chatglm3`; its logits differ from them by up to
/// 0.16, so reading the HF config without the ratio fails this test.
#[test]
fn chatglm3_32k_rope_ratio() {
    check("chatglm3_32k");
}

/// MPT with `attn_config.qk_ln` (LayerNorms over the whole q and k projections) and `clip_qkv`,
/// on ALiBi. transformers' MPT ignores `qk_ln`; llama.cpp applies it. Without the QK LayerNorms
/// llama.cpp's logits move by up to 2.3, without the clamp by 2.2 (`ablation_max_abs_logit_diff`
/// in the reference).
#[test]
fn mpt_qk_ln() {
    check("mpt_qk_ln");
}
