//! Encoder-decoder models (T5): the encoder runs once over the input, its output is projected
//! to every decoder block's cross-attention keys and values, and the decoder then generates
//! with its own growing KV cache while those stay fixed.

use crate::kv_cache::KvCache;
use camelid_model::transformer::CrossKv;
use camelid_model::{Model, ModelError, Result};

/// Encodes `ids` for the decoder; `None` for decoder-only models.
pub fn encode(model: &Model, ids: &[u32]) -> Result<Option<CrossKv>> {
    let Some(encoder) = &model.encoder else {
        return Ok(None);
    };
    if ids.is_empty() {
        return Err(ModelError::Input("the encoder input is empty".into()));
    }
    let mut cache = KvCache::new(encoder.spec().layers, ids.len());
    let input = encoder.input(ids)?;
    let out = encoder.hidden_states(&input, None, &mut cache)?;
    Ok(Some(model.transformer.cross_kv(&out)?))
}

/// What the decoder starts from: the prompt itself for decoder-only models, the decoder start
/// id for encoder-decoders (the prompt went to the encoder).
pub fn decoder_prompt(model: &Model, prompt: &[u32]) -> Vec<u32> {
    match (&model.encoder, model.decoder_start_id) {
        (Some(_), Some(start)) => vec![start],
        _ => prompt.to_vec(),
    }
}

/// Decoder logits for every position of `decoder_ids` (`[len, vocab]`), the encoder having
/// read `encoder_ids`: what `model(input_ids=..., decoder_input_ids=...)` returns.
pub fn decoder_logits(
    model: &Model,
    encoder_ids: &[u32],
    decoder_ids: &[u32],
) -> Result<Vec<Vec<f32>>> {
    if decoder_ids.is_empty() {
        return Err(ModelError::Input("no decoder ids given".into()));
    }
    let cross = encode(model, encoder_ids)?.ok_or_else(|| {
        ModelError::Input(format!(
            "{} is not an encoder-decoder model: decoder ids do not apply",
            model.spec().family
        ))
    })?;
    let mut cache = KvCache::new(model.spec().layers, decoder_ids.len());
    let input = model.transformer.input(decoder_ids)?;
    let logits = model
        .transformer
        .forward_with(&input, &mut cache, Some(&cross), true)?;
    Ok(logits.squeeze(0)?.to_vec2()?)
}
