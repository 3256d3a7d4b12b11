//! The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against two references on the
//! same file (`tests/fixtures/smollm2`):
//!
//! - exact math: a float64 NumPy forward of the dequantized GGUF. camelid with the weights
//!   expanded to f32 must give the same top-1 and top-5 log-probs within 1e-3 on all 28
//!   prompts, and the same 32-token greedy continuation (which llama.cpp also produces);
//! - llama.cpp itself on the quantized file, with llama.cpp's tokenization. Both engines round
//!   activations to 8 bits inside the quantized matmuls, and this model's outlier activations
//!   make that rounding chaotic: llama.cpp moves its own top-5 log-probs by up to 0.28 when only
//!   its attention summation order changes (flash attention on/off, recorded in the fixture).
//!   So the quantized comparison holds camelid to llama.cpp's own spread: top-1 equal wherever
//!   llama.cpp's top-1 lead exceeds 0.3 nats, top-5 log-probs within 0.45.

use camelid_engine::generate::{all_logits, greedy_ids};
use camelid_model::catalog;
use camelid_model::model::LoadOptions;
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

fn reference(file: &str) -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture parses")
}

fn llama_cpp() -> Reference {
    reference("llamacpp_reference.json")
}

fn exact() -> Reference {
    reference("numpy_f64_reference.json")
}

fn load(dequantize: bool) -> Model {
    let entry = catalog::find(catalog::DEFAULT_MODEL).expect("default model in catalog");
    let path = catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull SmolLM2");
    Model::load_with(
        &path,
        &Device::Cpu,
        &LoadOptions {
            dequantize,
            ..Default::default()
        },
    )
    .expect("load SmolLM2")
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load(false))
}

fn dequantized_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load(true))
}

/// Largest |Δ log-prob| over each prompt's reference top-5, and the prompts whose top-1
/// differs although the reference's lead over its runner-up is at least `min_lead`.
fn compare(model: &Model, reference: &Reference, min_lead: f64) -> (f64, Vec<String>) {
    let mut worst = 0f64;
    let mut top1 = Vec::new();
    for p in &reference.prompts {
        let logits = all_logits(model, &p.ids).expect("forward");
        let last = logits.last().expect("one row per position");
        let lp = log_softmax(last);
        for t in &p.top5 {
            worst = worst.max((lp[t.id as usize] - t.logprob).abs());
        }
        let ours = camelid_engine::sampling::argmax(last);
        let lead = p.top5[0].logprob - p.top5[1].logprob;
        if ours != p.top5[0].id && lead >= min_lead {
            top1.push(format!(
                "{}: top-1 {ours} vs {} (lead {lead:.3})",
                p.name, p.top5[0].id
            ));
        }
    }
    (worst, top1)
}

#[test]
fn tokenization_matches_llama_cpp() {
    let tok = model().tokenizer().expect("GGUF vocabulary");
    let mut bad = Vec::new();
    for p in llama_cpp().prompts {
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
fn dequantized_weights_match_exact_math() {
    let (worst, top1) = compare(dequantized_model(), &exact(), 0.0);
    eprintln!("dequantized vs float64: max |Δ log-prob| over top-5 = {worst:.2e}");
    assert!(top1.is_empty(), "{}", top1.join("\n"));
    assert!(worst <= 1e-3, "max |Δ log-prob| {worst:.2e} exceeds 1e-3");
}

#[test]
fn dequantized_greedy_continuation_matches_exact_math_and_llama_cpp() {
    let (e, l) = (exact().greedy, llama_cpp().greedy);
    assert_eq!(e.ids, l.ids);
    assert_eq!(
        e.continuation, l.continuation,
        "the two references agree on this prompt"
    );
    let got = greedy_ids(dequantized_model(), &e.ids, e.continuation.len()).expect("generate");
    assert_eq!(got, e.continuation);
}

#[test]
fn quantized_matches_llama_cpp_within_its_own_spread() {
    let (worst, top1) = compare(model(), &llama_cpp(), 0.3);
    eprintln!("quantized vs llama.cpp: max |Δ log-prob| over top-5 = {worst:.3}");
    assert!(top1.is_empty(), "{}", top1.join("\n"));
    assert!(worst <= 0.45, "max |Δ log-prob| {worst:.3} exceeds 0.45");
}
