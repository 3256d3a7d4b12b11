//! Sentence embeddings: one forward pass over the text, then the model's pooling (mean or
//! CLS) and optional L2 normalization, as sentence-transformers computes them.

use crate::kv_cache::KvCache;
use camelid_model::model::PoolingKind;
use camelid_model::{Model, ModelError, Result};
use candle_core::D;

/// The embedding of already tokenized `ids` (special tokens included).
pub fn embed_ids(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(ModelError::Input("nothing to embed: no tokens".into()));
    }
    let spec = model.spec();
    let mut cache = KvCache::new(spec.layers, ids.len());
    let input = model.transformer.input(ids)?;
    let hidden = model.transformer.hidden_states(&input, None, &mut cache)?;
    let pooled = match model.pooling.kind {
        PoolingKind::Mean => hidden.mean(1)?,
        PoolingKind::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
    };
    let pooled = if model.pooling.normalize {
        // sentence-transformers divides by max(‖v‖, 1e-12).
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        pooled.broadcast_div(&norm)?
    } else {
        pooled
    };
    Ok(pooled.squeeze(0)?.to_vec1()?)
}

pub struct Embedding {
    pub vector: Vec<f32>,
    /// Token count before the cut to the model's `max_seq_length`, when one happened.
    pub truncated_from: Option<usize>,
}

/// Tokenizes `text` as the model's tokenizer does for single sentences (with [CLS]/[SEP] or
/// BOS) and embeds it. Texts over the model's declared `max_seq_length` are cut to it as
/// sentence-transformers does (the final special token kept), and the cut is reported.
pub fn embed_text(model: &Model, text: &str) -> Result<Embedding> {
    let mut ids = model.tokenizer()?.encode(text, true)?;
    let mut truncated_from = None;
    if let Some(max) = model.pooling.max_tokens {
        if ids.len() > max && max >= 2 {
            truncated_from = Some(ids.len());
            let last = ids[ids.len() - 1];
            ids.truncate(max - 1);
            ids.push(last);
        }
    }
    Ok(Embedding {
        vector: embed_ids(model, &ids)?,
        truncated_from,
    })
}
