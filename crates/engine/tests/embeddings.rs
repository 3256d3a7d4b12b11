//! Encoders and sentence embeddings against transformers and sentence-transformers
//! (`tests/fixtures/bert`, made by `scripts/fixtures/make_bert_fixtures.py`):
//! a tiny random BERT's last hidden states within 1e-4, and all-MiniLM-L6-v2's embeddings of
//! 20 sentences with the same token ids and cosine similarity ≥ 0.9999.

use camelid_engine::embed::embed_text;
use camelid_engine::KvCache;
use camelid_model::catalog;
use camelid_model::Model;
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert")
}

#[derive(serde::Deserialize)]
struct TinyReference {
    ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    last_hidden_state: Vec<Vec<f32>>,
}

#[test]
fn tiny_bert_hidden_states_match_transformers() {
    let dir = fixtures().join("bert_tiny");
    let r: TinyReference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let model = Model::load(&dir, &Device::Cpu).expect("load tiny BERT");
    let ids = Tensor::new(r.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let types = Tensor::new(r.token_type_ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = KvCache::new(model.spec().layers, r.ids.len());
    let hidden: Vec<Vec<f32>> = model
        .transformer
        .hidden_states(&ids, Some(&types), &mut cache)
        .expect("forward")
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut worst = 0f32;
    for (row, want) in hidden.iter().zip(&r.last_hidden_state) {
        for (a, b) in row.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("tiny BERT: max |Δ hidden| = {worst:e}");
    assert!(worst <= 1e-4, "max |Δ hidden| {worst:e}");
}

#[derive(serde::Deserialize)]
struct Sentence {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct MiniLmReference {
    sentences: Vec<Sentence>,
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let r: MiniLmReference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm_reference.json")).unwrap(),
    )
    .unwrap();
    let entry = catalog::find("all-minilm-l6-v2").expect("catalog entry");
    let path = catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull MiniLM");
    let model = Model::load(&path, &Device::Cpu).expect("load MiniLM");
    let mut worst = 1f64;
    for s in &r.sentences {
        let e = embed_text(&model, &s.text).expect("embed");
        let ids = model.tokenizer().unwrap().encode(&s.text, true).unwrap();
        if e.truncated_from.is_none() {
            assert_eq!(ids, s.ids, "token ids of {:?}", s.text);
        } else {
            // Cut as sentence-transformers cuts: the head of the text and the final [SEP].
            assert_eq!(ids[..s.ids.len() - 1], s.ids[..s.ids.len() - 1]);
        }
        let dot: f64 = e
            .vector
            .iter()
            .zip(&s.embedding)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(&e.vector) * norm(&s.embedding));
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "{:?}: cosine {cos}", s.text);
    }
    eprintln!(
        "MiniLM: lowest cosine over {} sentences = {worst:.7}",
        r.sentences.len()
    );
}
