//! Beam search, scored as transformers' `generate(num_beams=...)` scores it: the beams run as one
//! batch; each step keeps the `max(2, 1 + #eos) · beams` best continuations over all beams; a
//! continuation that ends in EOS (or reaches the length limit) among the best `beams` becomes a
//! finished hypothesis scored `sum log p / generated_len^length_penalty`; the best `beams`
//! unfinished ones continue. The search stops by transformers' early-stopping rules.
//!
//! Works for decoder-only models (the prompt is prefilled once and the cache fanned out to the
//! beams) and for encoder-decoders (the encoder output is shared by every beam).

use crate::seq2seq;
use camelid_model::transformer::{log_softmax, KvStore};
use camelid_model::{Model, ModelError, Result};
use candle_core::{Device, Tensor};

/// transformers' `early_stopping`: `True`, `False` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop as soon as `beams` hypotheses are finished.
    Yes,
    /// Stop when the best running beam, at its current length, cannot beat the worst finished.
    No,
    /// As `No`, but with a positive length penalty judge the running beam at the length limit.
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "yes" => Ok(Self::Yes),
            "false" | "no" => Ok(Self::No),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "early stopping \"{other}\" is not one of true, false, never"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BeamOptions {
    pub beams: usize,
    /// Exponent of the generated length dividing a finished hypothesis' log-probability.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// How many hypotheses to return, best first (`num_return_sequences`).
    pub n_best: usize,
    /// New tokens at most (`max_new_tokens`).
    pub max_tokens: usize,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self {
            beams: 4,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::No,
            n_best: 1,
            max_tokens: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens, EOS included when the hypothesis ended in it.
    pub tokens: Vec<u32>,
    /// Length-penalized log-probability (transformers' `sequences_scores`).
    pub score: f32,
}

/// A KV cache whose sequences (the batch dimension) can be reordered as beams are selected.
struct BeamCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Length of the prompt pass (Qwen's dynamic NTK keeps its rotary base from it).
    first_pass: Option<usize>,
}

impl BeamCache {
    fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            first_pass: None,
        }
    }

    /// Row `i` of the new cache is row `parents[i]` of the old one.
    fn reorder(&mut self, parents: &[u32], device: &Device) -> candle_core::Result<()> {
        let idx = Tensor::new(parents, device)?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

impl KvStore for BeamCache {
    fn seq_len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!("KV cache has no layer {layer}");
        };
        let kv = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
            None => (k.clone(), v.clone()),
        };
        *slot = Some(kv.clone());
        Ok(kv)
    }

    fn first_pass_len(&self) -> Option<usize> {
        self.first_pass
    }

    fn set_first_pass_len(&mut self, len: usize) {
        self.first_pass = Some(len);
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1).min(values.len() - 1), |&a, &b| {
        values[b].total_cmp(&values[a]).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx
}

const NEG: f32 = -1.0e9;

/// Beam search from `prompt` (the encoder input for encoder-decoders); returns the
/// `n_best` best hypotheses, best first.
pub fn beam_search(model: &Model, prompt: &[u32], opts: &BeamOptions) -> Result<Vec<Hypothesis>> {
    let nb = opts.beams;
    if nb == 0 || opts.n_best == 0 || opts.n_best > nb {
        return Err(ModelError::Input(format!(
            "beam search needs at least one beam and 1 ≤ n-best ≤ beams (got {nb} beams, n-best {})",
            opts.n_best
        )));
    }
    if opts.max_tokens == 0 {
        return Err(ModelError::Input("beam search needs max tokens ≥ 1".into()));
    }
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    let spec = model.spec();
    let start = seq2seq::decoder_prompt(model, prompt);
    if start.len() + opts.max_tokens > spec.max_positions {
        return Err(ModelError::Input(format!(
            "{} prompt tokens plus {} new ones exceed the model's context window of {} positions",
            start.len(),
            opts.max_tokens,
            spec.max_positions
        )));
    }
    let device = model.transformer.device().clone();
    let cross_one = seq2seq::encode(model, prompt)?;
    let cross_all = match &cross_one {
        Some(c) => Some(c.repeat(nb)?),
        None => None,
    };
    let eos = &model.eos_ids;
    let keep = (1 + eos.len()).max(2) * nb;
    let prompt_len = start.len();
    let max_length = prompt_len + opts.max_tokens;
    let lp = opts.length_penalty as f64;

    let mut cache = BeamCache::new(spec.layers);
    let input = model.transformer.input(start.as_slice())?;
    let logits = model
        .transformer
        .forward_with(&input, &mut cache, cross_one.as_ref(), false)?;
    let first = log_probs(&logits.squeeze(0)?.squeeze(0)?.to_vec1::<f32>()?);
    // Every beam starts as the prompt; only the first counts (the others score -1e9).
    let mut rows: Vec<Vec<f32>> = vec![first; nb];
    let mut running: Vec<Vec<u32>> = vec![Vec::new(); nb];
    let mut running_scores: Vec<f32> = (0..nb).map(|b| if b == 0 { 0.0 } else { NEG }).collect();
    let mut finished: Vec<(Vec<u32>, f32, bool)> = vec![(Vec::new(), NEG, false); nb];
    let mut improvable = true;
    let mut cur_len = prompt_len;
    let mut cache_rows = 1usize;

    loop {
        let vocab = rows[0].len();
        let mut acc = Vec::with_capacity(nb * vocab);
        for (row, &s) in rows.iter().zip(&running_scores) {
            acc.extend(row.iter().map(|&l| l + s));
        }
        let cand = top_k(&acc, keep);
        let cand_beam: Vec<usize> = cand.iter().map(|&i| i / vocab).collect();
        let cand_tok: Vec<u32> = cand.iter().map(|&i| (i % vocab) as u32).collect();
        let cand_score: Vec<f32> = cand.iter().map(|&i| acc[i]).collect();
        let hits: Vec<bool> = cand_tok
            .iter()
            .map(|t| eos.contains(t) || cur_len + 1 >= max_length)
            .collect();
        let seq = |c: usize| {
            let mut s = running[cand_beam[c]].clone();
            s.push(cand_tok[c]);
            s
        };

        // The best unfinished continuations run on.
        let run_scores: Vec<f32> = cand_score
            .iter()
            .zip(&hits)
            .map(|(&s, &h)| if h { s + NEG } else { s })
            .collect();
        let next = top_k(&run_scores, nb);

        // Finished continuations among the best `nb` join the hypotheses if they rank.
        let all_done = finished.iter().all(|f| f.2);
        let denom = ((cur_len + 1 - prompt_len) as f64).powf(lp) as f32;
        let mut merged: Vec<(Vec<u32>, f32, bool)> = std::mem::take(&mut finished);
        for c in 0..keep.min(cand.len()) {
            let mut s = cand_score[c] / denom;
            if all_done && opts.early_stopping == EarlyStopping::Yes {
                s += NEG;
            }
            if !improvable {
                s += NEG;
            }
            let just_finished = hits[c] && c < nb;
            if !just_finished {
                s += NEG;
            }
            merged.push((seq(c), s, just_finished));
        }
        let merged_scores: Vec<f32> = merged.iter().map(|m| m.1).collect();
        finished = top_k(&merged_scores, nb)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        let parents: Vec<usize> = next.iter().map(|&c| cand_beam[c]).collect();
        running = next.iter().map(|&c| seq(c)).collect();
        running_scores = next.iter().map(|&c| run_scores[c]).collect();
        let next_tokens: Vec<u32> = next.iter().map(|&c| cand_tok[c]).collect();

        cur_len += 1;
        let best_len = if opts.early_stopping == EarlyStopping::Never && lp > 0.0 {
            max_length - prompt_len
        } else {
            cur_len - prompt_len
        };
        let best_running = running_scores[0] / (best_len as f64).powf(lp) as f32;
        let worst = finished.iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
        improvable &= finished
            .iter()
            .any(|f| best_running > if f.2 { worst } else { NEG });
        let all_done = finished.iter().all(|f| f.2);
        let open = !(all_done && opts.early_stopping == EarlyStopping::Yes);
        if !(improvable && open && !hits.iter().all(|&h| h)) {
            break;
        }

        // The beams' caches follow their parents; the prompt's single row fans out at first.
        let rows_of: Vec<u32> = parents
            .iter()
            .map(|&p| p.min(cache_rows - 1) as u32)
            .collect();
        cache.reorder(&rows_of, &device)?;
        cache_rows = nb;
        let input = Tensor::new(next_tokens.as_slice(), &device)?.unsqueeze(1)?;
        let logits =
            model
                .transformer
                .forward_with(&input, &mut cache, cross_all.as_ref(), false)?;
        let all: Vec<Vec<f32>> = logits.squeeze(1)?.to_vec2()?;
        rows = all.iter().map(|r| log_probs(r)).collect();
    }
    Ok(finished
        .into_iter()
        .take(opts.n_best)
        .map(|(tokens, score, _)| Hypothesis { tokens, score })
        .collect())
}

/// Log-softmax in f32 (as transformers computes the beam scores).
fn log_probs(logits: &[f32]) -> Vec<f32> {
    log_softmax(logits).into_iter().map(|x| x as f32).collect()
}
