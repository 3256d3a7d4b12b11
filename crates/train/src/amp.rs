//! Mixed precision: the matrix products of the forward and backward pass in bf16 or f16 over
//! f32 master weights (the optimizer's), and for f16 a dynamic loss scale that skips updates
//! whose gradients overflowed, with the rules of `torch.amp.GradScaler`.

use anyhow::{bail, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// The type of the training matmuls; weights, optimizer state and checkpoints stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            "f16" => Precision::F16,
            _ => bail!("unknown --dtype \"{s}\" (f32, bf16, f16)"),
        })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

impl Precision {
    /// The compute type of the products, `None` for plain f32.
    pub fn compute(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }

    /// f16's range is narrow (largest finite 65504, smallest normal 6.1e-5): its gradients
    /// need a loss scale. bf16 has f32's range and needs none.
    pub fn needs_loss_scale(self) -> bool {
        self == Precision::F16
    }
}

/// Dynamic loss scaling: the loss is multiplied by `scale` before the backward pass so small
/// gradients survive f16; an update whose gradients hold an inf or NaN is skipped and the
/// scale halved; after `growth_interval` clean updates in a row it doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Clean updates since the scale last changed.
    pub growth_tracker: u64,
    /// Updates skipped so far.
    pub skipped: u64,
}

impl Default for LossScaler {
    /// torch.amp.GradScaler's defaults.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    /// Whether any gradient is inf or NaN.
    pub fn found_inf(grads: &[Vec<f32>]) -> bool {
        grads.iter().flatten().any(|x| !x.is_finite())
    }

    /// Divides the gradients by the scale, as GradScaler does: by multiplying with the f32
    /// reciprocal.
    pub fn unscale(&self, grads: &mut [Vec<f32>]) {
        let inv = (1.0 / self.scale) as f32;
        for x in grads.iter_mut().flatten() {
            *x *= inv;
        }
    }

    /// The scale after an update that did (`found_inf`) or did not overflow.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped += 1;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}
