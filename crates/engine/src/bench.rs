//! llama-bench-style throughput: `ppN` prefills N tokens in one pass from an empty cache,
//! `tgN` decodes N tokens one at a time. Reported as mean ± stddev over repetitions.

use crate::kv_cache::KvCache;
use camelid_model::{Model, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub test: String,
    pub tokens_per_s: f64,
    pub stddev: f64,
}

fn stats(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Deterministic token ids spread over the vocabulary (the content does not change speed).
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

pub fn prompt_processing(model: &Model, n: usize, reps: usize) -> Result<BenchResult> {
    let spec = model.spec();
    let ids = tokens(n, spec.vocab_size);
    let input = model.transformer.input(ids.as_slice())?;
    let mut samples = Vec::new();
    // One warm-up run, as llama-bench does.
    for rep in 0..=reps {
        let mut cache = KvCache::new(spec.layers, n);
        let t = Instant::now();
        camelid_kernels::on_pool(|| model.transformer.forward(&input, &mut cache, false))?;
        // A GPU runs the pass asynchronously: time its end, not its launch.
        model.transformer.device().synchronize()?;
        if rep > 0 {
            samples.push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    let (mean, sd) = stats(&samples);
    Ok(BenchResult {
        test: format!("pp{n}"),
        tokens_per_s: mean,
        stddev: sd,
    })
}

pub fn text_generation(model: &Model, n: usize, reps: usize) -> Result<BenchResult> {
    let spec = model.spec();
    let ids = tokens(n, spec.vocab_size);
    let device = model.transformer.device();
    let mut samples = Vec::new();
    for rep in 0..=reps {
        let mut cache = KvCache::new(spec.layers, n);
        let t = Instant::now();
        for &id in &ids {
            let input = model.transformer.input(&[id])?;
            camelid_kernels::on_pool(|| model.transformer.forward(&input, &mut cache, false))?;
        }
        device.synchronize()?;
        if rep > 0 {
            samples.push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    let (mean, sd) = stats(&samples);
    Ok(BenchResult {
        test: format!("tg{n}"),
        tokens_per_s: mean,
        stddev: sd,
    })
}
