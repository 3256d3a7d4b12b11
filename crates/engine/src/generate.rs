//! The generation loop for one sequence: prefill the prompt in one batched pass, then decode
//! token by token with the KV cache, streaming whole-character text deltas and stopping at
//! EOS, a stop string or the token budget.

use crate::kv_cache::KvCache;
use crate::sampling::{Sampler, SamplingParams};
use camelid_model::tokenizer::DecodeStream;
use camelid_model::{Model, ModelError, Result};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they never reach the output.
    pub stop: Vec<String>,
    /// End at the model's EOS ids (off for benchmarks and fixed-length parity checks).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
    /// The streaming callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Runs one sequence through the model. `on_text` receives each text delta and returns
/// `false` to stop early. Without a tokenizer, text stays empty and only ids are produced.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    opts.sampling.validate().map_err(ModelError::Input)?;
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    let spec = model.spec();
    let context = spec.max_positions;
    if prompt.len() > context {
        return Err(ModelError::Input(format!(
            "the prompt has {} tokens but the model's context window is {} tokens",
            prompt.len(),
            context
        )));
    }
    // Leave room for every new token; the last sampled token needs no forward pass.
    let budget = opts.max_tokens.min(context + 1 - prompt.len());
    // An encoder-decoder reads the prompt with its encoder and decodes from its start id.
    let cross = crate::seq2seq::encode(model, prompt)?;
    let decoder_prompt = crate::seq2seq::decoder_prompt(model, prompt);
    let mut cache = KvCache::new(spec.layers, decoder_prompt.len() + budget);
    let mut sampler = Sampler::new(opts.sampling.clone());
    let tokenizer = model.tokenizer.as_ref();
    let mut stream = DecodeStream::new();
    let mut stops = StopMatcher::new(&opts.stop);

    let mut tokens: Vec<u32> = decoder_prompt.clone();
    let mut generated: Vec<u32> = Vec::new();
    let t0 = Instant::now();
    let mut input = model.transformer.input(decoder_prompt.as_slice())?;
    let mut prefill_time = Duration::ZERO;
    let mut finish = FinishReason::Length;
    let mut out_text = String::new();

    while generated.len() < budget {
        let logits = camelid_kernels::on_pool(|| {
            model
                .transformer
                .forward_with(&input, &mut cache, cross.as_ref(), false)
        })?;
        if generated.is_empty() {
            prefill_time = t0.elapsed();
        }
        let mut row: Vec<f32> = logits.squeeze(0)?.squeeze(0)?.to_vec1()?;
        let next = sampler.sample(&mut row, &tokens, generated.len());
        tokens.push(next);
        if opts.stop_at_eos && model.eos_ids.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        generated.push(next);
        if let Some(tok) = tokenizer {
            if let Some(delta) = stream.push(tok, next)? {
                let (emit, hit) = stops.push(&delta);
                if !emit.is_empty() {
                    out_text.push_str(&emit);
                    if !on_text(&emit) {
                        finish = FinishReason::Cancelled;
                        break;
                    }
                }
                if hit {
                    finish = FinishReason::Stop;
                    break;
                }
            }
        }
        if generated.len() >= budget {
            break;
        }
        input = model.transformer.input(&[next])?;
    }
    if finish != FinishReason::Stop && finish != FinishReason::Cancelled {
        if let Some(tok) = tokenizer {
            let mut rest = stream.flush(tok)?.unwrap_or_default();
            let (emit, hit) = stops.push(&rest);
            rest = emit;
            if hit {
                finish = FinishReason::Stop;
            } else {
                rest.push_str(&stops.flush());
            }
            if !rest.is_empty() {
                out_text.push_str(&rest);
                on_text(&rest);
            }
        }
    }
    Ok(Generation {
        tokens: generated,
        text: out_text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: t0.elapsed().saturating_sub(prefill_time),
    })
}

/// Logits for every position of `ids` in one pass: `[ids.len(), vocab]`.
pub fn all_logits(model: &Model, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    if ids.is_empty() {
        return Err(ModelError::Input("no token ids given".into()));
    }
    let spec = model.spec();
    let mut cache = KvCache::new(spec.layers, ids.len());
    let input = model.transformer.input(ids)?;
    let logits = model.transformer.forward(&input, &mut cache, true)?;
    Ok(logits.squeeze(0)?.to_vec2()?)
}

/// Greedy continuation of `ids` by exactly `n` tokens, ignoring EOS (parity checks).
pub fn greedy_ids(model: &Model, ids: &[u32], n: usize) -> Result<Vec<u32>> {
    let opts = GenerateOptions {
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_at_eos: false,
    };
    Ok(generate(model, ids, &opts, &mut |_| true)?.tokens)
}

/// Holds back text that could be the start of a stop string, and cuts at the first stop.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds a delta; returns text safe to emit, and whether a stop string was reached.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_never_leak() {
        let mut m = StopMatcher::new(&["\nUser:".to_string()]);
        let mut out = String::new();
        let mut hit = false;
        for d in ["Hello", " there\n", "Us", "er: more"] {
            let (e, h) = m.push(d);
            out.push_str(&e);
            if h {
                hit = true;
                break;
            }
        }
        assert!(hit);
        assert_eq!(out, "Hello there");
    }

    #[test]
    fn partial_match_is_released_when_it_fails() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        let (a, _) = m.push("abc ST");
        assert_eq!(a, "abc ");
        let (b, hit) = m.push("ART");
        assert!(!hit);
        assert_eq!(b, "START");
    }
}
