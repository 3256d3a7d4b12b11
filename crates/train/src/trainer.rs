//! One training update: micro-batches through the differentiable forward, gradients summed
//! over accumulation steps, clipped by global norm, then an AdamW update.

use crate::amp::{LossScaler, Precision};
use crate::checkpoint::TrainerState;
use crate::data::{batch, Order, TokenData};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, Schedule};
use crate::params::{Kind, Params};
use anyhow::{bail, Result};
use camelid_model::transformer::TrainMode;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub seq_len: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// Decay every parameter, not only 2-D weights.
    pub decay_all: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm limit; 0 turns clipping off.
    pub clip: f64,
    pub dropout: f64,
    pub shuffle: bool,
    pub seed: u64,
    /// The type of the forward and backward matmuls; weights and optimizer stay f32.
    pub precision: Precision,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            seq_len: 64,
            batch: 12,
            grad_accum: 1,
            steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 100,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            decay_all: false,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            clip: 1.0,
            dropout: 0.0,
            shuffle: true,
            seed: 1337,
            precision: Precision::F32,
        }
    }
}

/// The loss stopped being a finite number; no update was applied for `step`.
#[derive(Debug)]
pub struct NonFiniteLoss {
    pub step: u64,
    pub loss: f64,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "loss became {} at step {}; training stopped",
            self.loss,
            self.step + 1
        )
    }
}

impl std::error::Error for NonFiniteLoss {}

#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Updates completed, this one included.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    /// f16: the gradients overflowed, no update was applied and the loss scale was lowered.
    pub skipped: bool,
    /// f16: the loss scale after this step.
    pub loss_scale: Option<f64>,
}

pub struct Trainer {
    pub params: Params,
    pub opt: AdamW,
    pub state: TrainerState,
    pub opts: TrainOptions,
    decay: Vec<bool>,
}

/// Dropout with masks drawn from a generator seeded by (seed, micro-batch): a resumed run
/// draws the same masks.
fn dropout_fn(p: f64, seed: u64, compute: Option<candle_core::DType>) -> TrainMode {
    let rng = Mutex::new(rand::rngs::StdRng::seed_from_u64(seed));
    let keep = 1.0 - p;
    let f = move |x: &Tensor| -> candle_core::Result<Tensor> {
        let n = x.elem_count();
        let mut rng = rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout rng poisoned".into()))?;
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
    };
    TrainMode {
        differentiable: true,
        dropout: Some(Arc::new(f)),
        compute,
    }
}

impl Trainer {
    pub fn new(params: Params, opts: TrainOptions) -> Self {
        let sizes: Vec<usize> = params.vars.iter().map(|v| v.elem_count()).collect();
        let opt = AdamW::new(&sizes, opts.beta1, opts.beta2, opts.eps, opts.weight_decay);
        let state = TrainerState {
            step: 0,
            seed: opts.seed,
            tokens_seen: 0,
            seq_len: opts.seq_len,
            batch: opts.batch,
            grad_accum: opts.grad_accum,
            last_loss: None,
            dtype: opts.precision,
            scaler: opts.precision.needs_loss_scale().then(LossScaler::default),
        };
        Self::with_state(params, opts, opt, state)
    }

    /// Continues from a saved optimizer and loop state.
    pub fn with_state(
        params: Params,
        opts: TrainOptions,
        mut opt: AdamW,
        state: TrainerState,
    ) -> Self {
        opt.beta1 = opts.beta1;
        opt.beta2 = opts.beta2;
        opt.eps = opts.eps;
        opt.weight_decay = opts.weight_decay;
        let mut state = state;
        state.dtype = opts.precision;
        if !opts.precision.needs_loss_scale() {
            state.scaler = None;
        } else if state.scaler.is_none() {
            state.scaler = Some(LossScaler::default());
        }
        let decay = params
            .vars
            .iter()
            .zip(&params.kinds)
            .map(|(v, k)| opts.decay_all || (v.rank() == 2 && !matches!(k, Kind::Bias)))
            .collect();
        Self {
            params,
            opt,
            state,
            opts,
            decay,
        }
    }

    fn order(&self) -> Order {
        if self.opts.shuffle {
            Order::Shuffled {
                seed: self.opts.seed,
            }
        } else {
            Order::Sequential
        }
    }

    /// Loss and per-parameter gradients of micro-batch `index`.
    pub fn loss_and_grads(&self, data: &TokenData, index: u64) -> Result<(f64, Vec<Vec<f32>>)> {
        let o = &self.opts;
        let (x, y) = batch(
            data,
            index,
            o.batch,
            o.seq_len,
            self.order(),
            &self.params.device,
        )?;
        let compute = o.precision.compute();
        let mode = if o.dropout > 0.0 {
            dropout_fn(
                o.dropout,
                o.seed ^ 0xD1B5_4A32_D192_ED03 ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                compute,
            )
        } else {
            TrainMode {
                differentiable: true,
                dropout: None,
                compute,
            }
        };
        let loss = self.params.loss(&x, &y, mode)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(NonFiniteLoss {
                step: self.state.step,
                loss: value,
            }
            .into());
        }
        let mut scaled = (loss / o.grad_accum as f64)?;
        if let Some(s) = &self.state.scaler {
            scaled = (scaled * s.scale)?;
        }
        let store = scaled.backward()?;
        let mut grads = Vec::with_capacity(self.params.vars.len());
        for (v, name) in self.params.vars.iter().zip(&self.params.names) {
            match store.get(v.as_tensor()) {
                Some(g) => grads.push(g.flatten_all()?.to_vec1::<f32>()?),
                None => bail!("parameter {name} received no gradient"),
            }
        }
        Ok((value, grads))
    }

    /// One optimizer update over `grad_accum` micro-batches.
    pub fn step(&mut self, data: &TokenData) -> Result<StepReport> {
        let o = self.opts.clone();
        let lr = learning_rate(
            o.schedule,
            self.state.step,
            o.steps,
            o.warmup,
            o.lr,
            o.min_lr,
        );
        let mut total: Option<Vec<Vec<f32>>> = None;
        let mut loss = 0.0;
        for micro in 0..o.grad_accum as u64 {
            let (l, g) =
                self.loss_and_grads(data, self.state.step * o.grad_accum as u64 + micro)?;
            loss += l / o.grad_accum as f64;
            match &mut total {
                None => total = Some(g),
                Some(t) => {
                    for (a, b) in t.iter_mut().zip(g) {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += y;
                        }
                    }
                }
            }
        }
        let mut grads = total.unwrap_or_default();
        self.state.tokens_seen += (o.grad_accum * o.batch * o.seq_len) as u64;
        self.state.last_loss = Some(loss);
        if let Some(scaler) = &mut self.state.scaler {
            let found_inf = LossScaler::found_inf(&grads);
            if found_inf {
                // As GradScaler: no update, the step (and the schedule) moves on.
                scaler.update(true);
                self.state.step += 1;
                return Ok(StepReport {
                    step: self.state.step,
                    loss,
                    lr,
                    grad_norm: f64::INFINITY,
                    tokens: self.state.tokens_seen,
                    skipped: true,
                    loss_scale: Some(scaler.scale),
                });
            }
            scaler.unscale(&mut grads);
        }
        let grad_norm = clip_grad_norm(&mut grads, o.clip);
        let mut values = self
            .params
            .vars
            .iter()
            .map(|v| v.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.opt.update(&mut values, &grads, &self.decay, lr);
        for (v, data) in self.params.vars.iter().zip(values) {
            v.set(&Tensor::from_vec(data, v.shape(), v.device())?)?;
        }
        self.state.step += 1;
        if let Some(scaler) = &mut self.state.scaler {
            scaler.update(false);
        }
        Ok(StepReport {
            step: self.state.step,
            loss,
            lr,
            grad_norm,
            tokens: self.state.tokens_seen,
            skipped: false,
            loss_scale: self.state.scaler.as_ref().map(|s| s.scale),
        })
    }

    /// Mean loss over `batches` consecutive batches of `data` (no dropout).
    pub fn evaluate(&self, data: &TokenData, batches: usize) -> Result<f64> {
        let o = &self.opts;
        let mut sum = 0.0;
        for i in 0..batches as u64 {
            let (x, y) = batch(
                data,
                i,
                o.batch,
                o.seq_len,
                Order::Sequential,
                &self.params.device,
            )?;
            let loss = self.params.loss(&x, &y, TrainMode::default())?;
            sum += loss.to_scalar::<f32>()? as f64;
        }
        Ok(sum / batches.max(1) as f64)
    }
}
