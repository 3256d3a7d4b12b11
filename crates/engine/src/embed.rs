//! Sentence embeddings: one forward pass over the text, then the model's pooling (mean or
//! CLS) and optional L2 normalization, as sentence-transformers computes them.

use crate::kv_cache::KvCache;
use camelid_model::model::PoolingKind;
use camelid_model::{Model, ModelError, Result};
use candle_core::{Tensor, D};

/// The embedding of already tokenized `ids` (special tokens included).
pub fn embed_ids(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(ModelError::Input("nothing to embed: no tokens".into()));
    }
    let spec = model.spec();
    let mut cache = KvCache::new(spec.layers, ids.len());
    let input = Tensor::new(ids, model.transformer.device())?.unsqueeze(0)?;
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

/// Tokenizes `text` as the model's tokenizer does for single sentences (with [CLS]/[SEP] or
/// BOS) and embeds it.
pub fn embed_text(model: &Model, text: &str) -> Result<Vec<f32>> {
    let ids = model.tokenizer()?.encode(text, true)?;
    embed_ids(model, &ids)
}
