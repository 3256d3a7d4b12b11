//! Rotary position tables: inverse frequencies per scaling scheme, and cos/sin for a span of
//! positions. The formulas follow transformers' `modeling_rope_utils` so logits match it.

use crate::spec::{RopeScaling, RotarySpec};
use candle_core::{Device, Result, Tensor};

pub struct Rope {
    spec: RotarySpec,
    /// Rotating dimensions (even, at most the head dim).
    dims: usize,
    inv_freq: Vec<f32>,
    /// Multiplier on cos/sin (YaRN's attention temperature; 1 otherwise).
    attention_factor: f32,
}

fn base_inv_freq(theta: f64, dims: usize) -> Vec<f64> {
    (0..dims / 2)
        .map(|i| {
            // transformers computes `base ** (arange(0, dim, 2).float() / dim)` in float32.
            let exponent = ((2 * i) as f32 / dims as f32) as f64;
            1.0 / (theta as f32).powf(exponent as f32) as f64
        })
        .collect()
}

impl Rope {
    pub fn new(spec: &RotarySpec, dims: usize) -> Self {
        let mut attention_factor = 1.0f64;
        let inv: Vec<f64> = match &spec.scaling {
            RopeScaling::None | RopeScaling::DynamicNtk { .. } | RopeScaling::QwenNtk { .. } => {
                base_inv_freq(spec.theta, dims)
            }
            RopeScaling::Linear { factor } => base_inv_freq(spec.theta, dims)
                .into_iter()
                .map(|f| f / factor)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let old = *original_max_positions as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base_inv_freq(spec.theta, dims)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                attention_factor: af,
                truncate,
            } => {
                attention_factor = af.unwrap_or(if *factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                });
                let d = dims as f64;
                let correction_dim = |rotations: f64| {
                    d * (*original_max_positions as f64 / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * spec.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                base_inv_freq(spec.theta, dims)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extrapolation)| {
                        let interpolation = extrapolation / factor;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32 as f64;
                        let extrapolation_share = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_share)
                            + extrapolation * extrapolation_share
                    })
                    .collect()
            }
        };
        Self {
            spec: spec.clone(),
            dims,
            inv_freq: inv.into_iter().map(|f| f as f32).collect(),
            attention_factor: attention_factor as f32,
        }
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    pub fn interleaved(&self) -> bool {
        self.spec.interleaved
    }

    /// cos and sin, each `[len, dims/2]`, for positions `start..start+len`.
    pub fn cos_sin(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        self.cos_sin_at(start, len, start + len, device)
    }

    /// [`Rope::cos_sin`] for a sequence whose first forward pass had `first_pass` tokens
    /// (Qwen's dynamic NTK fixes its base by that pass; 0 keeps the trained base).
    pub fn cos_sin_at(
        &self,
        start: usize,
        len: usize,
        first_pass: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.dims / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        self.extend_cos_sin(start, len, first_pass, &mut cos, &mut sin);
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// [`Rope::cos_sin_at`]'s values appended to `cos` and `sin` (`len · dims/2` each).
    pub fn extend_cos_sin(
        &self,
        start: usize,
        len: usize,
        first_pass: usize,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let dynamic;
        let inv_freq: &[f32] = match self.spec.scaling {
            RopeScaling::QwenNtk { seq_length } if first_pass > seq_length => {
                // Qwen computes `math.log(len / seq_length, 2)`, i.e. ln(x) / ln(2).
                let context = (first_pass as f64 / seq_length as f64).ln() / 2f64.ln() + 1.0;
                let alpha = (2f64.powf(context.ceil()) - 1.0).max(1.0);
                let d = self.dims as f64;
                dynamic = base_inv_freq(self.spec.theta * alpha.powf(d / (d - 2.0)), self.dims)
                    .into_iter()
                    .map(|f| f as f32)
                    .collect::<Vec<_>>();
                &dynamic
            }
            // transformers recomputes the base from the longest position seen in this call.
            RopeScaling::DynamicNtk {
                factor,
                max_positions,
            } if start + len > max_positions => {
                let seq = (start + len) as f64;
                let d = self.dims as f64;
                let base = self.spec.theta
                    * ((factor * seq / max_positions as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                dynamic = base_inv_freq(base, self.dims)
                    .into_iter()
                    .map(|f| f as f32)
                    .collect::<Vec<_>>();
                &dynamic
            }
            _ => &self.inv_freq,
        };
        cos.reserve(len * inv_freq.len());
        sin.reserve(len * inv_freq.len());
        for p in start..start + len {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
        }
    }

    /// Rotates the first `dims` channels of `x` (`[batch, heads, seq, head_dim]`).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(3)?;
        let rotate = |t: &Tensor| {
            if self.spec.interleaved {
                candle_nn::rotary_emb::rope_i(&t.contiguous()?, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(&t.contiguous()?, cos, sin)
            }
        };
        if self.dims == head_dim {
            return rotate(x);
        }
        let rotated = rotate(&x.narrow(3, 0, self.dims)?)?;
        let pass = x.narrow(3, self.dims, head_dim - self.dims)?;
        Tensor::cat(&[&rotated, &pass], 3)?.contiguous()
    }

    /// [`Rope::apply`] written with elementary tensor ops, which candle can differentiate (its
    /// fused rotary kernels record no backward pass). Same values up to rounding.
    pub fn apply_differentiable(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, t, head_dim) = x.dims4()?;
        let (d, half) = (self.dims, self.dims / 2);
        let cos = cos.reshape((1, 1, t, half))?;
        let sin = sin.reshape((1, 1, t, half))?;
        let rot = x.narrow(3, 0, d)?;
        let (x1, x2) = if self.spec.interleaved {
            let pairs = rot.reshape((b, h, t, half, 2))?;
            (
                pairs.narrow(4, 0, 1)?.squeeze(4)?,
                pairs.narrow(4, 1, 1)?.squeeze(4)?,
            )
        } else {
            (rot.narrow(3, 0, half)?, rot.narrow(3, half, half)?)
        };
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        let rotated = if self.spec.interleaved {
            Tensor::stack(&[r1, r2], 4)?.reshape((b, h, t, d))?
        } else {
            Tensor::cat(&[r1, r2], 3)?
        };
        if d == head_dim {
            return Ok(rotated);
        }
        Tensor::cat(&[&rotated, &x.narrow(3, d, head_dim - d)?], 3)?.contiguous()
    }
}
