//! Perplexity of a model on a token sequence, computed two ways:
//!
//! - [`Method::LlamaCpp`]: llama.cpp's `llama-perplexity`: the tokens are cut into
//!   `len / ctx` whole chunks of `ctx` tokens (the rest is dropped); with a BOS-adding
//!   tokenizer each chunk's first token is replaced by BOS; every chunk is run from an empty
//!   cache and only its second half is scored (positions `ctx/2 .. ctx-1` predicting the next
//!   token), so every scored token has at least `ctx/2` tokens of context.
//! - [`Method::Sliding`]: transformers' "Perplexity of fixed-length models" guide: windows of
//!   `ctx` tokens starting every `stride` tokens; each window scores only the tokens the previous
//!   window did not (its last `end - prev_end` tokens), the first window everything but its
//!   first token. The sum of negative log-likelihoods is exact (the guide's per-window mean
//!   times a count differs from it by at most one token per window).
//!
//! Log-probabilities are computed in f64 from the f32 logits, as llama.cpp does.

use crate::kv_cache::KvCache;
use camelid_model::{Model, ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    LlamaCpp,
    Sliding { stride: usize },
}

#[derive(Debug, Clone)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Standard error of the perplexity (llama.cpp's `+/-`).
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
    /// Tokens scored.
    pub scored: usize,
    /// Windows (chunks) run.
    pub windows: usize,
}

/// The windows a method runs over `n` tokens: `(begin, end, first_scored)`; position `p` in
/// `[first_scored, end - 1)` scores token `p + 1` (absolute positions).
pub fn windows(n: usize, ctx: usize, method: Method) -> Result<Vec<(usize, usize, usize)>> {
    if ctx < 2 {
        return Err(ModelError::Input("--ctx must be at least 2".into()));
    }
    match method {
        Method::LlamaCpp => {
            if n < 2 * ctx {
                return Err(ModelError::Input(format!(
                    "the text has {n} tokens; llama.cpp's method needs at least 2 × ctx = {} (use a smaller --ctx or a longer text)",
                    2 * ctx
                )));
            }
            Ok((0..n / ctx)
                .map(|i| (i * ctx, (i + 1) * ctx, i * ctx + ctx / 2))
                .collect())
        }
        Method::Sliding { stride } => {
            if stride == 0 || stride > ctx {
                return Err(ModelError::Input(format!(
                    "--stride must be between 1 and --ctx ({ctx})"
                )));
            }
            if n < 2 {
                return Err(ModelError::Input(format!(
                    "the text has {n} tokens; at least 2 are needed"
                )));
            }
            let mut out = Vec::new();
            let mut prev_end = 0;
            let mut begin = 0;
            while begin < n {
                let end = (begin + ctx).min(n);
                // Position p predicts token p + 1: score targets in [max(prev_end, begin + 1), end).
                let first_target = prev_end.max(begin + 1);
                out.push((begin, end, first_target - 1));
                prev_end = end;
                if end == n {
                    break;
                }
                begin += stride;
            }
            Ok(out)
        }
    }
}

/// Runs `model` over `ids` window by window. `bos` replaces each chunk's first token in
/// llama.cpp's method (pass the BOS id when the tokenizer adds one). `on_window(done, total)` is
/// called after each window.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    ctx: usize,
    method: Method,
    bos: Option<u32>,
    on_window: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    if ctx > model.spec().max_positions {
        return Err(ModelError::Input(format!(
            "--ctx {ctx} is past the model's context window of {} tokens",
            model.spec().max_positions
        )));
    }
    let wins = windows(ids.len(), ctx, method)?;
    let mut nll = 0f64;
    let mut nll2 = 0f64;
    let mut count = 0usize;
    let mut cache = KvCache::new(model.spec().layers, ctx);
    for (w, &(begin, end, first)) in wins.iter().enumerate() {
        let mut chunk = ids[begin..end].to_vec();
        if let (Method::LlamaCpp, Some(b)) = (method, bos) {
            chunk[0] = b;
        }
        cache.reset();
        let input = model.transformer.input(chunk.as_slice())?;
        let logits = model.transformer.forward(&input, &mut cache, true)?;
        let rows = end - 1 - first;
        let scored = logits
            .squeeze(0)?
            .narrow(0, first - begin, rows)?
            .to_vec2::<f32>()?;
        for (r, row) in scored.iter().enumerate() {
            let target = ids[first + r + 1] as usize;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            let v = -(row[target] as f64 - max - sum.ln());
            nll += v;
            nll2 += v * v;
        }
        count += rows;
        on_window(w + 1, wins.len());
    }
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_stderr: stderr,
        mean_nll: mean,
        scored: count,
        windows: wins.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_chunks() {
        let w = windows(1100, 512, Method::LlamaCpp).unwrap();
        assert_eq!(w, vec![(0, 512, 256), (512, 1024, 768)]);
        assert!(windows(1000, 512, Method::LlamaCpp).is_err());
    }

    #[test]
    fn sliding_scores_every_token_once() {
        for (n, ctx, stride) in [(10, 4, 2), (100, 16, 16), (37, 8, 3), (5, 8, 4)] {
            let w = windows(n, ctx, Method::Sliding { stride }).unwrap();
            let mut targets: Vec<usize> = Vec::new();
            let mut unscorable = Vec::new();
            let mut prev_end = 0;
            for &(b, e, f) in &w {
                assert!(e - b <= ctx && f >= b);
                targets.extend(f + 1..e);
                // A window that starts where the last one ended cannot predict its first token.
                if b > 0 && b >= prev_end {
                    unscorable.push(b);
                }
                prev_end = e;
            }
            let want: Vec<usize> = (1..n).filter(|t| !unscorable.contains(t)).collect();
            assert_eq!(targets, want, "{n} {ctx} {stride}");
        }
    }
}
