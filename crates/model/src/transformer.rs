//! The one decoder-only transformer. Every family runs through this file; what differs between
//! them is an [`ArchSpec`] value and a tensor-name table, never a copy of this code.
//!
//! Shapes: activations are `[batch, seq, hidden]`; attention works on
//! `[batch, heads, seq, head_dim]`. Keys and values live in a [`KvStore`] owned by the engine.

use crate::checkpoint::{Matrix, WeightStore};
use crate::error::{ModelError, Result};
use crate::rope::Rope;
use crate::spec::{
    Activation, AlibiSlopes, ArchSpec, NormKind, NormPlacement, Positions, QkvLayout, QkvPacking,
    Residual,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::sync::Arc;

/// Applies dropout to one tensor; the trainer owns the random numbers.
pub type DropoutFn = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// Training-time behaviour of the forward pass. The default is inference.
#[derive(Clone, Default)]
pub struct TrainMode {
    /// Norms, softmax and rotary written with elementary ops candle can differentiate: its
    /// fused kernels (`rms_norm`, `layer_norm`, `softmax_last_dim`, `rope`) record no backward
    /// pass, so parameters before them would silently never train.
    pub differentiable: bool,
    /// Dropout on the embeddings, the attention probabilities and both residual branches.
    pub dropout: Option<Arc<DropoutFn>>,
}

/// Where attention keys and values are kept between forward passes (the engine decides how:
/// one contiguous buffer per sequence, or pages).
pub trait KvStore {
    /// Number of positions already stored: the position of the next token.
    fn seq_len(&self) -> usize;
    /// Stores this step's keys and values for `layer` (`[batch, kv_heads, new, head_dim]`)
    /// and returns all of them so far (`[batch, kv_heads, seq_len + new, head_dim]`).
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)>;
}

enum LinearWeight {
    /// Dense f32 or a quantized type candle runs well.
    Candle(QMatMul),
    /// GGUF Q4_0, Q4_1 or Q8_0 on the CPU: camelid's kernels (`crates/kernels`).
    Kernel(camelid_kernels::QMatrix),
}

struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// The GGUF types camelid's own kernels run.
fn kernel_type(dtype: GgmlDType) -> Option<camelid_kernels::QType> {
    match dtype {
        GgmlDType::Q4_0 => Some(camelid_kernels::QType::Q4_0),
        GgmlDType::Q4_1 => Some(camelid_kernels::QType::Q4_1),
        GgmlDType::Q8_0 => Some(camelid_kernels::QType::Q8_0),
        _ => None,
    }
}

/// Runs `f` on `x`'s values as one contiguous f32 slice, without copying when it already is.
fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            Ok(f(&cpu.as_slice::<f32>()?[start..end]))
        }
        _ => {
            drop(storage);
            Ok(f(&x.flatten_all()?.to_vec1::<f32>()?))
        }
    }
}

impl Linear {
    fn load(store: &WeightStore, name: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let wname = format!("{name}.weight");
        let bias = if bias {
            Some(store.dense(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        // Kernel types are read in place from the mapped file (no copy at load).
        if store.device().is_cpu() {
            if let Some(raw) = store.quantized_raw(&wname, &[out, inp])? {
                if let Some(ty) = kernel_type(raw.dtype) {
                    let m =
                        camelid_kernels::QMatrix::from_shared(ty, out, inp, raw.file, raw.range)
                            .map_err(|e| ModelError::Input(format!("{wname}: {e}")))?;
                    return Ok(Self {
                        weight: LinearWeight::Kernel(m),
                        bias,
                    });
                }
            }
        }
        let matrix = store.matrix(&wname, &[out, inp])?;
        Self::from_matrix(&matrix, bias)
    }

    fn from_matrix(m: &Matrix, bias: Option<Tensor>) -> Result<Self> {
        let ty = match m {
            Matrix::Quantized(q) if q.device().is_cpu() => kernel_type(q.dtype()),
            _ => None,
        };
        let weight = match (m, ty) {
            (Matrix::Quantized(q), Some(ty)) => {
                let (rows, cols) = q.shape().dims2()?;
                LinearWeight::Kernel(
                    camelid_kernels::QMatrix::from_bytes(ty, rows, cols, &q.data()?)
                        .map_err(|e| ModelError::Input(e.to_string()))?,
                )
            }
            _ => LinearWeight::Candle(m.to_qmatmul()?),
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Candle(w) => {
                let y = w.forward(x)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            LinearWeight::Kernel(_) => Ok(Self::forward_group(&[self], x)?.remove(0)),
        }
    }

    /// Several projections of the same input (q/k/v, gate/up). Kernel-backed ones share one
    /// quantized copy of `x` and one parallel region.
    fn forward_group(linears: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mats: Option<Vec<&camelid_kernels::QMatrix>> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Kernel(m) => Some(m),
                LinearWeight::Candle(_) => None,
            })
            .collect();
        let Some(mats) = mats else {
            return linears.iter().map(|l| l.forward(x)).collect();
        };
        let mut dims = x.dims().to_vec();
        dims.pop();
        let tokens = dims.iter().product::<usize>();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; tokens * m.rows]).collect();
        with_f32_slice(x, |input| {
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            camelid_kernels::matmul_group(&mats, input, tokens, &mut views)
        })?
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        outs.into_iter()
            .zip(mats.iter().zip(linears))
            .map(|(out, (m, l))| {
                let mut d = dims.clone();
                d.push(m.rows);
                let y = Tensor::from_vec(out, d, x.device())?;
                match &l.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            })
            .collect()
    }
}

struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Tensor,
    eps: f32,
    differentiable: bool,
}

impl Norm {
    fn load(store: &WeightStore, name: &str, spec: &ArchSpec) -> Result<Self> {
        Self::load_dim(store, name, spec, spec.hidden)
    }

    fn load_dim(store: &WeightStore, name: &str, spec: &ArchSpec, h: usize) -> Result<Self> {
        let weight = store.dense(&format!("{name}.weight"), &[h])?;
        let bias = if spec.norm.bias {
            store.dense(&format!("{name}.bias"), &[h])?
        } else {
            Tensor::zeros(h, DType::F32, store.device())?
        };
        Ok(Self {
            kind: spec.norm.kind,
            weight,
            bias,
            eps: spec.norm.eps as f32,
            differentiable: false,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        if self.differentiable {
            let eps = self.eps as f64;
            let x = match self.kind {
                NormKind::RmsNorm => x,
                NormKind::LayerNorm => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            };
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let y = x
                .broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&self.weight)?;
            return match self.kind {
                NormKind::RmsNorm => Ok(y),
                NormKind::LayerNorm => y.broadcast_add(&self.bias),
            };
        }
        match self.kind {
            NormKind::RmsNorm => candle_nn::ops::rms_norm(&x, &self.weight, self.eps),
            NormKind::LayerNorm => {
                candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)
            }
        }
    }
}

enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

struct Attention {
    qkv: Qkv,
    out: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// This layer attends within the sliding window.
    windowed: bool,
    clip: Option<f64>,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
}

struct Mlp {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    activation: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = match &self.gate {
            Some(g) => {
                let mut both = Linear::forward_group(&[g, &self.up], x)?;
                let up = both.pop();
                (both.pop(), up)
            }
            None => (None, Some(self.up.forward(x)?)),
        };
        let up = up.ok_or_else(|| candle_core::Error::Msg("missing up projection".into()))?;
        let h = match (gate, self.activation) {
            (Some(gate), Activation::GeGlu) => (gate.gelu()? * up)?,
            (Some(gate), _) => (candle_nn::ops::silu(&gate)? * up)?,
            (None, Activation::Gelu) => up.gelu_erf()?,
            (None, Activation::GeluTanh) => up.gelu()?,
            (None, Activation::Relu) => up.relu()?,
            (None, _) => candle_nn::ops::silu(&up)?,
        };
        self.down.forward(&h)
    }
}

struct Block {
    attn_norm: Norm,
    /// Absent when a parallel block shares one norm.
    mlp_norm: Option<Norm>,
    attn: Attention,
    mlp: Mlp,
}

enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(w) => {
                let (b, t) = ids.dims2()?;
                let h = w.dim(1)?;
                w.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))
            }
            Embedding::Quantized(q) => q.embedding(ids),
        }
    }
}

pub struct Transformer {
    spec: ArchSpec,
    embed: Embedding,
    position_embed: Option<Tensor>,
    embed_norm: Option<Norm>,
    proj_in: Option<Linear>,
    proj_out: Option<Linear>,
    blocks: Vec<Block>,
    final_norm: Option<Norm>,
    /// Absent for encoders used as embedders.
    head: Option<Linear>,
    token_type_embed: Option<Tensor>,
    rope: Option<Rope>,
    /// Per-head ALiBi slopes, `[heads]`.
    alibi_slopes: Option<Tensor>,
    device: Device,
    train: TrainMode,
}

/// ALiBi slopes per head, including head counts that are not a power of two.
pub fn alibi_slopes(heads: usize, max_bias: f64, kind: AlibiSlopes) -> Vec<f32> {
    let slopes_for = |n: usize| -> Vec<f64> {
        let base = 2f64.powf(-(max_bias / n as f64));
        (1..=n).map(|i| base.powi(i as i32)).collect()
    };
    let slopes = match kind {
        AlibiSlopes::Bloom => {
            let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
            let mut slopes = slopes_for(closest);
            if closest != heads {
                let extra = slopes_for(2 * closest);
                slopes.extend(extra.into_iter().step_by(2).take(heads - closest));
            }
            slopes
        }
        AlibiSlopes::Mpt => {
            let next = heads.next_power_of_two();
            let all = slopes_for(next);
            if next == heads {
                all
            } else {
                let odd = all.iter().skip(1).step_by(2);
                let even = all.iter().step_by(2);
                odd.chain(even).copied().take(heads).collect()
            }
        }
    };
    slopes.into_iter().map(|s| s as f32).collect()
}

/// Row order that turns a fused QKV projection packed per head or per kv group into
/// `[q | k | v]`: `order[new_row] = old_row`.
fn qkv_row_order(packing: QkvPacking, heads: usize, kv_heads: usize, head_dim: usize) -> Vec<u32> {
    let rep = heads / kv_heads;
    let mut q = Vec::new();
    let mut k = Vec::new();
    let mut v = Vec::new();
    let rows = |start: usize| (start..start + head_dim).map(|r| r as u32);
    match packing {
        QkvPacking::Sequential => return (0..((heads + 2 * kv_heads) * head_dim) as u32).collect(),
        QkvPacking::PerHead => {
            for h in 0..heads {
                let base = h * 3 * head_dim;
                q.extend(rows(base));
                k.extend(rows(base + head_dim));
                v.extend(rows(base + 2 * head_dim));
            }
        }
        QkvPacking::PerKvGroup => {
            for g in 0..kv_heads {
                let base = g * (rep + 2) * head_dim;
                for i in 0..rep {
                    q.extend(rows(base + i * head_dim));
                }
                k.extend(rows(base + rep * head_dim));
                v.extend(rows(base + (rep + 1) * head_dim));
            }
        }
    }
    q.extend(k);
    q.extend(v);
    q
}

impl Transformer {
    pub fn load(mut spec: ArchSpec, store: &WeightStore) -> Result<Self> {
        spec.validate()
            .map_err(|m| ModelError::config(store.path(), m))?;
        if matches!(
            spec.positions,
            Positions::RelativeBuckets { .. } | Positions::RelativeXl
        ) {
            return Err(ModelError::config(
                store.path(),
                "relative-position attention (T5 buckets, Transformer-XL) is described by the spec but not yet run by the transformer",
            ));
        }
        let device = store.device().clone();
        let h = spec.hidden;
        let v = spec.vocab_size;
        let a = &spec.attention;
        let (q_dim, kv_dim) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);

        let e = spec.embed_dim.unwrap_or(h);
        let embed = match store.matrix("token_embd.weight", &[v, e])? {
            Matrix::Dense(t) => Embedding::Dense(t),
            Matrix::Quantized(q) => Embedding::Quantized(q),
        };
        let (proj_in, proj_out) = if e != h {
            (
                Some(Linear::load(store, "proj_in", h, e, false)?),
                Some(Linear::load(store, "proj_out", e, h, false)?),
            )
        } else {
            (None, None)
        };
        let position_embed = match spec.positions {
            Positions::Learned { offset } => {
                Some(store.dense("position_embd.weight", &[spec.max_positions + offset, h])?)
            }
            _ => None,
        };
        let embed_norm = if spec.embed_norm {
            Some(Norm::load(store, "token_embd_norm", &spec)?)
        } else {
            None
        };

        let mut blocks = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let p = format!("blk.{i}");
            let qkv = match a.qkv_layout {
                QkvLayout::Split => Qkv::Split {
                    q: Linear::load(store, &format!("{p}.attn_q"), q_dim, h, a.qkv_bias)?,
                    k: Linear::load(store, &format!("{p}.attn_k"), kv_dim, h, a.qkv_bias)?,
                    v: Linear::load(store, &format!("{p}.attn_v"), kv_dim, h, a.qkv_bias)?,
                },
                QkvLayout::Fused => {
                    let name = format!("{p}.attn_qkv");
                    let rows = q_dim + 2 * kv_dim;
                    if a.qkv_packing == QkvPacking::Sequential {
                        Qkv::Fused(Linear::load(store, &name, rows, h, a.qkv_bias)?)
                    } else {
                        let order = Tensor::new(
                            qkv_row_order(a.qkv_packing, a.heads, a.kv_heads, a.head_dim),
                            &device,
                        )?;
                        let w = store.dense(&format!("{name}.weight"), &[rows, h])?;
                        let b = if a.qkv_bias {
                            Some(
                                store
                                    .dense(&format!("{name}.bias"), &[rows])?
                                    .index_select(&order, 0)?,
                            )
                        } else {
                            None
                        };
                        Qkv::Fused(Linear::from_matrix(
                            &Matrix::Dense(w.index_select(&order, 0)?),
                            b,
                        )?)
                    }
                }
            };
            let qk_norm = |name: &str, dim: usize| -> Result<Option<Norm>> {
                if a.qk_norm {
                    Ok(Some(Norm::load_dim(
                        store,
                        &format!("{p}.{name}"),
                        &spec,
                        dim,
                    )?))
                } else {
                    Ok(None)
                }
            };
            let attn = Attention {
                qkv,
                out: Linear::load(store, &format!("{p}.attn_output"), h, q_dim, a.out_bias)?,
                heads: a.heads,
                kv_heads: a.kv_heads,
                head_dim: a.head_dim,
                scale: a.scale(),
                windowed: a.sliding_window.is_some()
                    && a.window_layers
                        .as_ref()
                        .is_none_or(|w| w.get(i).copied().unwrap_or(false)),
                clip: a.clip_qkv,
                q_norm: qk_norm("attn_q_norm", q_dim)?,
                k_norm: qk_norm("attn_k_norm", kv_dim)?,
            };
            let f = spec.mlp.hidden;
            let (gate, up) = if spec.mlp.fused_gate_up {
                if spec.mlp.bias {
                    return Err(ModelError::config(
                        store.path(),
                        "a fused gate/up projection with biases is not supported",
                    ));
                }
                let both = store.matrix(&format!("{p}.ffn_up.weight"), &[2 * f, h])?;
                (
                    Some(Linear::from_matrix(&both.rows(0, f)?, None)?),
                    Linear::from_matrix(&both.rows(f, f)?, None)?,
                )
            } else {
                let gate = if spec.mlp.activation.is_gated() {
                    let name = format!("{p}.ffn_gate");
                    Some(Linear::load(store, &name, f, h, spec.mlp.bias)?)
                } else {
                    None
                };
                let name = format!("{p}.ffn_up");
                (gate, Linear::load(store, &name, f, h, spec.mlp.bias)?)
            };
            let mlp = Mlp {
                gate,
                up,
                down: Linear::load(store, &format!("{p}.ffn_down"), h, f, spec.mlp.bias)?,
                activation: spec.mlp.activation,
            };
            let mlp_norm = match spec.residual {
                Residual::Parallel { shared_norm: true } => None,
                _ => Some(Norm::load(store, &format!("{p}.ffn_norm"), &spec)?),
            };
            blocks.push(Block {
                attn_norm: Norm::load(store, &format!("{p}.attn_norm"), &spec)?,
                mlp_norm,
                attn,
                mlp,
            });
        }

        let final_norm = if spec.final_norm {
            Some(Norm::load(store, "output_norm", &spec)?)
        } else {
            None
        };
        let head_bias = if spec.head_bias {
            Some(store.dense("output.bias", &[v])?)
        } else {
            None
        };
        // GGUF files of tied models omit `output`; the embedding then serves as head.
        if spec.lm_head && !store.contains("output.weight") {
            spec.tied_head = true;
        }
        let head = if !spec.lm_head {
            None
        } else if spec.tied_head {
            let m = match &embed {
                Embedding::Dense(t) => Matrix::Dense(t.clone()),
                Embedding::Quantized(q) => Matrix::Quantized(q.clone()),
            };
            Some(Linear::from_matrix(&m, head_bias)?)
        } else {
            let mut m = store.matrix("output.weight", &[v, e])?;
            if spec.normalize_head_rows {
                let w = m.rows(0, v)?;
                if let Matrix::Dense(w) = w {
                    let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                    m = Matrix::Dense(w.broadcast_div(&norms)?);
                }
            }
            Some(Linear::from_matrix(&m, head_bias)?)
        };
        let token_type_embed = if spec.type_vocab_size > 0 {
            Some(store.dense("token_types.weight", &[spec.type_vocab_size, h])?)
        } else {
            None
        };

        let rope = match &spec.positions {
            Positions::Rotary(r) => Some(Rope::new(r, spec.rotary_dims(r))),
            _ => None,
        };
        let alibi_slopes = match spec.positions {
            Positions::Alibi {
                max_bias,
                slopes,
                scaled,
            } => Some(Tensor::new(
                alibi_slopes(a.heads, max_bias, slopes)
                    .into_iter()
                    .map(|x| if scaled { x * a.scale() as f32 } else { x })
                    .collect::<Vec<_>>()
                    .as_slice(),
                &device,
            )?),
            _ => None,
        };
        Ok(Self {
            spec,
            embed,
            position_embed,
            embed_norm,
            proj_in,
            proj_out,
            blocks,
            final_norm,
            head,
            token_type_embed,
            rope,
            alibi_slopes,
            device,
            train: TrainMode::default(),
        })
    }

    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Switches between inference (the default) and a training forward pass.
    pub fn set_training(&mut self, mode: TrainMode) {
        let differentiable = mode.differentiable;
        let norms = self.blocks.iter_mut().flat_map(|b| {
            [Some(&mut b.attn_norm), b.mlp_norm.as_mut()]
                .into_iter()
                .chain([b.attn.q_norm.as_mut(), b.attn.k_norm.as_mut()])
        });
        let norms = norms.chain([self.embed_norm.as_mut(), self.final_norm.as_mut()]);
        for n in norms.flatten() {
            n.differentiable = differentiable;
        }
        self.train = mode;
    }

    fn dropout(&self, x: Tensor) -> candle_core::Result<Tensor> {
        match &self.train.dropout {
            Some(f) => f(&x),
            None => Ok(x),
        }
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dropout(mlp.forward(x)?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `ids` (`[batch, seq]`, u32) after the positions already in `cache`.
    /// Returns logits `[batch, seq, vocab]` when `all_logits`, else `[batch, 1, vocab]` for the
    /// last position only (prefill needs no more, and the head is the largest matmul).
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut dyn KvStore,
        all_logits: bool,
    ) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            ModelError::Input(format!(
                "{} is an encoder without a language-model head: use it for embeddings",
                self.spec.family
            ))
        })?;
        let mut x = self.hidden_states(ids, None, cache)?;
        let t = x.dim(1)?;
        if !all_logits && t > 1 {
            x = x.narrow(1, t - 1, 1)?;
        }
        Ok(head.forward(&x)?)
    }

    /// The last hidden states `[batch, seq, hidden]` (after the final norm and `proj_out`):
    /// what a vocabulary head reads, and what embedders pool.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        cache: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let start = cache.seq_len();
        if start + t > self.spec.max_positions {
            return Err(ModelError::Input(format!(
                "{} tokens exceed the model's context window of {} positions",
                start + t,
                self.spec.max_positions
            )));
        }
        let vocab = self.spec.vocab_size as u32;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i >= vocab)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }

        let mut x = self.embed.forward(ids)?;
        if let Some(p) = &self.proj_in {
            x = p.forward(&x)?;
        }
        if let (Some(pe), Positions::Learned { offset }) =
            (&self.position_embed, &self.spec.positions)
        {
            x = x.broadcast_add(&pe.narrow(0, start + offset, t)?)?;
        }
        if let Some(types) = &self.token_type_embed {
            let tt = match token_types {
                Some(tt) => tt.clone(),
                None => ids.zeros_like()?,
            };
            let (b, _) = tt.dims2()?;
            let rows = types.index_select(&tt.flatten_all()?, 0)?;
            x = (x + rows.reshape((b, t, types.dim(1)?))?)?;
        }
        x = self.dropout(x)?;
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        let rotary = match &self.rope {
            Some(r) => Some(r.cos_sin(start, t, &self.device)?),
            None => None,
        };
        let causal = self.attention_mask(start, t, None)?;
        let windowed = match self.spec.attention.sliding_window {
            Some(w) => self.attention_mask(start, t, Some(w))?,
            None => None,
        };
        let alibi = match &self.alibi_slopes {
            Some(s) => {
                let keys =
                    Tensor::arange(0u32, (start + t) as u32, &self.device)?.to_dtype(DType::F32)?;
                Some(s.unsqueeze(1)?.broadcast_mul(&keys.unsqueeze(0)?)?)
            }
            None => None,
        };

        for (i, block) in self.blocks.iter().enumerate() {
            let ctx = AttnContext {
                layer: i,
                rotary: rotary.as_ref(),
                mask: if block.attn.windowed {
                    windowed.as_ref()
                } else {
                    causal.as_ref()
                },
                alibi: alibi.as_ref(),
            };
            x = self.block_forward(block, &x, &ctx, cache)?;
        }

        if let Some(n) = &self.final_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.proj_out {
            x = p.forward(&x)?;
        }
        Ok(x)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        ctx: &AttnContext,
        cache: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let mlp_norm = |x: &Tensor| -> candle_core::Result<Tensor> {
            match &block.mlp_norm {
                Some(n) => n.forward(x),
                None => block.attn_norm.forward(x),
            }
        };
        Ok(match (self.spec.norm_placement, self.spec.residual) {
            (NormPlacement::Pre, Residual::Sequential) => {
                let h =
                    (x + self.attention(&block.attn, &block.attn_norm.forward(x)?, ctx, cache)?)?;
                let m = self.mlp(&block.mlp, &mlp_norm(&h)?)?;
                (h + m)?
            }
            (NormPlacement::Pre, Residual::Parallel { shared_norm }) => {
                let n = block.attn_norm.forward(x)?;
                let a = self.attention(&block.attn, &n, ctx, cache)?;
                let m = if shared_norm {
                    self.mlp(&block.mlp, &n)?
                } else {
                    self.mlp(&block.mlp, &mlp_norm(x)?)?
                };
                ((x + a)? + m)?
            }
            (NormPlacement::Post, Residual::Sequential) => {
                let h = block
                    .attn_norm
                    .forward(&(x + self.attention(&block.attn, x, ctx, cache)?)?)?;
                mlp_norm(&(&h + self.mlp(&block.mlp, &h)?)?)?
            }
            (NormPlacement::Post, Residual::Parallel { .. }) => {
                let a = self.attention(&block.attn, x, ctx, cache)?;
                let m = block.mlp.forward(x)?;
                block.attn_norm.forward(&((x + a)? + m)?)?
            }
        })
    }

    /// Additive mask `[new, total]`: causal, and limited to the sliding window when there is one.
    /// `None` when every new token may see every key (single-token decode without a window).
    fn attention_mask(
        &self,
        start: usize,
        t: usize,
        window: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let total = start + t;
        if !self.spec.causal && window.is_none() {
            return Ok(None);
        }
        if t == 1 && window.is_none_or(|w| w >= total) {
            return Ok(None);
        }
        let mut m = vec![0f32; t * total];
        for i in 0..t {
            let q = start + i;
            for j in 0..total {
                let visible =
                    (j <= q || !self.spec.causal) && window.is_none_or(|w| q.abs_diff(j) < w);
                if !visible {
                    m[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (t, total), &self.device)?))
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        ctx: &AttnContext,
        cache: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (attn.heads, attn.kv_heads, attn.head_dim);
        let (q, k, v) = match &attn.qkv {
            Qkv::Split { q, k, v } => {
                let mut qkv = Linear::forward_group(&[q, k, v], x)?;
                let (v, k) = (qkv.pop(), qkv.pop());
                match (qkv.pop(), k, v) {
                    (Some(q), Some(k), Some(v)) => (q, k, v),
                    _ => return Err(ModelError::Input("q/k/v projection missing".into())),
                }
            }
            Qkv::Fused(l) => {
                let qkv = l.forward(x)?;
                (
                    qkv.narrow(2, 0, nh * hd)?,
                    qkv.narrow(2, nh * hd, nkv * hd)?,
                    qkv.narrow(2, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let (q, k, v) = match attn.clip {
            Some(c) => (q.clamp(-c, c)?, k.clamp(-c, c)?, v.clamp(-c, c)?),
            None => (q, k, v),
        };
        let q = match &attn.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &attn.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = match (&self.rope, ctx.rotary) {
            (Some(rope), Some((cos, sin))) if self.train.differentiable => (
                rope.apply_differentiable(&q, cos, sin)?,
                rope.apply_differentiable(&k, cos, sin)?,
            ),
            (Some(rope), Some((cos, sin))) => {
                (rope.apply(&q, cos, sin)?, rope.apply(&k, cos, sin)?)
            }
            _ => (q, k),
        };
        let (k, v) = cache.append(ctx.layer, &k, &v)?;
        let s = k.dim(2)?;

        // Group query heads by the kv head they share instead of copying keys per head.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * attn.scale)?;
        let mut scores = scores.reshape((b, nkv, rep, t, s))?;
        if let Some(mask) = ctx.mask {
            scores = scores.broadcast_add(mask)?;
        }
        if let Some(alibi) = ctx.alibi {
            scores = scores.broadcast_add(&alibi.reshape((nkv, rep, 1, s))?)?;
        }
        let probs = if self.train.differentiable {
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            self.dropout(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?
        };
        let out = probs
            .reshape((b, nkv, rep * t, s))?
            .matmul(&v.contiguous()?)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok(self.dropout(attn.out.forward(&out)?)?)
    }
}

struct AttnContext<'a> {
    layer: usize,
    rotary: Option<&'a (Tensor, Tensor)>,
    mask: Option<&'a Tensor>,
    alibi: Option<&'a Tensor>,
}

/// Softmax over the last dimension in f64 for reporting log-probabilities.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}
