//! AdamW with decoupled weight decay, clipping by global norm and learning-rate schedules,
//! with the arithmetic of `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_`.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            _ => bail!("unknown schedule \"{s}\" (constant, linear, cosine)"),
        })
    }
}

/// Learning rate of update `step` (0-based) of `steps`: linear warmup over `warmup` updates
/// (`lr · (step+1)/warmup`), then constant, or a linear or cosine decay to `min_lr` at the
/// last update.
pub fn learning_rate(
    schedule: Schedule,
    step: u64,
    steps: u64,
    warmup: u64,
    lr: f64,
    min_lr: f64,
) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = steps.saturating_sub(warmup).saturating_sub(1).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => lr,
        Schedule::Linear => lr - (lr - min_lr) * progress,
        Schedule::Cosine => {
            min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr)
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
/// As torch: `coef = min(max_norm / (norm + 1e-6), 1)`, applied to every gradient.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .map(|g| {
            let n = g
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt();
            n * n
        })
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    norm
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far.
    pub step: u64,
    /// First and second moments per parameter.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(sizes: &[usize], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of `params[i]` by `grads[i]`; `decay[i]` says whether weight decay applies.
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], decay: &[bool], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let b2 = self.beta2 as f32;
        let (w1, w2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
        let (bc2_sqrt, eps) = (bc2_sqrt as f32, self.eps as f32);
        let shrink = (1.0 - lr * self.weight_decay) as f32;
        for i in 0..params.len() {
            let (p, g, m, v) = (&mut params[i], &grads[i], &mut self.m[i], &mut self.v[i]);
            let decays = decay[i] && self.weight_decay != 0.0;
            for j in 0..p.len() {
                if decays {
                    p[j] *= shrink;
                }
                m[j] += w1 * (g[j] - m[j]);
                v[j] = v[j] * b2 + w2 * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + eps;
                p[j] -= step_size * (m[j] / denom);
            }
        }
    }
}
