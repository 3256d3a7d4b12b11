//! The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against llama.cpp on the same
//! file (`tests/fixtures/smollm2`, made by `scripts/fixtures/make_llamacpp_smollm2.py`):
//! same tokenization, same top-1 next token and top-5 log-probs within 0.05 on every prompt,
//! and the same 32-token greedy continuation.

use camelid_engine::generate::{all_logits, greedy_ids};
use camelid_model::catalog;
use camelid_model::transformer::log_softmax;
use camelid_model::Model;
use candle_core::Device;
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(serde::Deserialize)]
struct Top {
    id: u32,
    logprob: f64,
}

#[derive(serde::Deserialize)]
struct Prompt {
    name: String,
    text: String,
    ids: Vec<u32>,
    top5: Vec<Top>,
}

#[derive(serde::Deserialize)]
struct Greedy {
    ids: Vec<u32>,
    continuation: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
    greedy: Greedy,
}

fn reference() -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2/llamacpp_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture parses")
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let entry = catalog::find(catalog::DEFAULT_MODEL).expect("default model in catalog");
        let path = catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull SmolLM2");
        Model::load(&path, &Device::Cpu).expect("load SmolLM2")
    })
}

#[test]
fn tokenization_matches_llama_cpp() {
    let tok = model().tokenizer().expect("GGUF vocabulary");
    let mut bad = Vec::new();
    for p in reference().prompts {
        let ids = tok.encode(&p.text, true).expect("encode");
        if ids != p.ids {
            bad.push(format!(
                "{}: camelid {:?}\n  llama.cpp {:?}",
                p.name, ids, p.ids
            ));
        }
    }
    assert!(bad.is_empty(), "tokenization differs:\n{}", bad.join("\n"));
}

#[test]
fn next_token_top5_matches_llama_cpp() {
    let model = model();
    let mut worst = 0f64;
    let mut failures = Vec::new();
    for p in reference().prompts {
        let logits = all_logits(model, &p.ids).expect("forward");
        let last = logits.last().expect("one row per position");
        let lp = log_softmax(last);
        let top1 = camelid_engine::sampling::argmax(last);
        if top1 != p.top5[0].id {
            failures.push(format!(
                "{}: top-1 {} vs llama.cpp {}",
                p.name, top1, p.top5[0].id
            ));
        }
        for t in &p.top5 {
            let d = (lp[t.id as usize] - t.logprob).abs();
            worst = worst.max(d);
            if d > 0.05 {
                failures.push(format!(
                    "{}: token {} log-prob {:.4} vs llama.cpp {:.4}",
                    p.name, t.id, lp[t.id as usize], t.logprob
                ));
            }
        }
    }
    eprintln!("max |Δ log-prob| over top-5: {worst:.4}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn greedy_continuation_matches_llama_cpp() {
    let r = reference();
    let got = greedy_ids(model(), &r.greedy.ids, r.greedy.continuation.len()).expect("generate");
    assert_eq!(got, r.greedy.continuation);
}
