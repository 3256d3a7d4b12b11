//! Qwen (v1) past `seq_length`: dynamic-NTK rotary (`use_dynamic_ntk`) and log-n query scaling
//! (`use_logn_attn`), checked against Qwen-7B's own published modeling code on a tiny random
//! model with `seq_length` 8 (`tests/fixtures/qwen_remote`, made by
//! `scripts/fixtures/make_qwen_remote.py`). Both the full-sequence logits and the cached
//! greedy decoding must match: Qwen fixes the NTK base at the prefill and keeps it while
//! decoding, and scales only the new queries.

use camelid_engine::generate::{all_logits, greedy_ids};
use camelid_engine::KvCache;
use camelid_model::Model;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

const TOLERANCE: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    greedy_logits: Vec<Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: BTreeMap<String, Case>,
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen_remote")
}

fn reference() -> Reference {
    serde_json::from_str(
        &std::fs::read_to_string(fixture().join("reference.json")).expect("reference.json"),
    )
    .expect("reference parses")
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len(), "vocabulary size");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// Prefill of `ids`, then one token per step through the KV cache, feeding the reference's
/// greedy tokens; returns the logits that chose each of them.
fn cached_step_logits(model: &Model, ids: &[u32], greedy: &[u32]) -> Vec<Vec<f32>> {
    let device = model.transformer.device();
    let mut cache = KvCache::new(model.spec().layers, ids.len() + greedy.len());
    let input = Tensor::new(ids, device).unwrap().unsqueeze(0).unwrap();
    let mut last = model
        .transformer
        .forward(&input, &mut cache, false)
        .unwrap();
    let mut rows = Vec::new();
    for &tok in greedy {
        rows.push(last.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let input = Tensor::new(&[tok], device).unwrap().unsqueeze(0).unwrap();
        last = model
            .transformer
            .forward(&input, &mut cache, false)
            .unwrap();
    }
    rows
}

#[test]
fn qwen_remote_dynamic_ntk_and_logn() {
    let reference = reference();
    let model = Model::load(&fixture().join("hf"), &Device::Cpu).expect("model loads");
    assert_eq!(reference.cases.len(), 3);
    for (name, case) in &reference.cases {
        let logits = all_logits(&model, &case.ids).expect("logits");
        let full = max_diff(&logits, &case.logits);
        let steps = max_diff(
            &cached_step_logits(&model, &case.ids, &case.greedy),
            &case.greedy_logits,
        );
        eprintln!("{name}: max |Δlogit| full {full:e}, cached decoding {steps:e}");
        assert!(
            full <= TOLERANCE,
            "{name}: full-sequence max |Δlogit| {full:e}"
        );
        assert!(
            steps <= TOLERANCE,
            "{name}: decoding max |Δlogit| {steps:e}"
        );
        let greedy = greedy_ids(&model, &case.ids, case.greedy.len()).expect("greedy");
        assert_eq!(greedy, case.greedy, "{name}: greedy continuation");
    }
}

/// The same weights with one or both flags off (written to a scratch directory).
fn load_with_flags(dynamic_ntk: bool, logn: bool) -> Model {
    let src = fixture().join("hf");
    let dir = std::env::temp_dir().join(format!(
        "camelid-qwen-remote-{}-{dynamic_ntk}-{logn}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["use_dynamic_ntk"] = dynamic_ntk.into();
    config["use_logn_attn"] = logn.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let model = Model::load(&dir, &Device::Cpu).expect("model loads");
    std::fs::remove_dir_all(&dir).unwrap();
    model
}

/// Each flag moves the logits of a prompt past `seq_length`; without either, the model runs
/// up to `max_position_embeddings` (64 here) unscaled.
#[test]
fn qwen_remote_flags_off_move_logits() {
    let reference = reference();
    let long = &reference.cases["long_prompt"];
    let short = &reference.cases["short_prompt"];
    for (ntk, logn) in [(false, true), (true, false), (false, false)] {
        let model = load_with_flags(ntk, logn);
        let d = max_diff(&all_logits(&model, &long.ids).unwrap(), &long.logits);
        eprintln!("use_dynamic_ntk {ntk}, use_logn_attn {logn}: long prompt max |Δlogit| {d}");
        assert!(
            d > 0.05,
            "flags ({ntk}, {logn}) should change the logits, moved {d}"
        );
    }
    // Decoding past seq_length after a short prefill: only log-n acts (the NTK alpha stays 1).
    let model = load_with_flags(true, false);
    let d = max_diff(
        &cached_step_logits(&model, &short.ids, &short.greedy),
        &short.greedy_logits,
    );
    eprintln!("use_logn_attn false: short-prompt decoding max |Δlogit| {d}");
    assert!(
        d > 0.05,
        "log-n should change decoding past seq_length, moved {d}"
    );
    let model = load_with_flags(false, true);
    let d = max_diff(
        &cached_step_logits(&model, &short.ids, &short.greedy),
        &short.greedy_logits,
    );
    assert!(
        d <= TOLERANCE,
        "the NTK alpha of a short prefill is 1, moved {d}"
    );
}

#[test]
fn qwen_window_without_flags() {
    let model = load_with_flags(false, false);
    assert_eq!(model.spec().max_positions, 64);
    let ids: Vec<u32> = (0..65).map(|i| i % 96).collect();
    let err = all_logits(&model, &ids).unwrap_err().to_string();
    assert!(err.contains("context window"), "{err}");
}

/// The batched serving path does not record the first-pass length Qwen's dynamic NTK keys on,
/// so it stops at `seq_length` instead of drifting from the reference; `generate` goes on.
#[test]
fn qwen_batched_positions_stop_at_seq_length() {
    let model = Model::load(&fixture().join("hf"), &Device::Cpu).expect("model loads");
    assert_eq!(model.spec().batched_positions(), 8);
    assert!(model.spec().max_positions > 8);
    let plain = load_with_flags(false, true);
    assert_eq!(
        plain.spec().batched_positions(),
        plain.spec().max_positions,
        "log-n alone is per position and batches exactly"
    );
}
