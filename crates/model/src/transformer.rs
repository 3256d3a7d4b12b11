//! The one decoder-only transformer. Every family runs through this file; what differs between
//! them is an [`ArchSpec`] value and a tensor-name table, never a copy of this code.
//! The serving engine's batched pass over the same blocks (several sequences per pass, a paged
//! pool) is in `transformer/batch.rs`.
//!
//! Shapes: activations are `[batch, seq, hidden]`; attention works on
//! `[batch, heads, seq, head_dim]`. Keys and values live in a [`KvStore`] owned by the engine.

use crate::checkpoint::{Matrix, WeightStore};
use crate::error::{ModelError, Result};
use crate::rope::Rope;
use crate::spec::{
    Activation, AlibiSlopes, ArchSpec, NormKind, NormPlacement, Positions, QkvLayout, QkvPacking,
    Residual, Stack,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::sync::Arc;

mod batch;
pub use batch::{BatchKvStore, BatchLogits, BatchSeq, Logits};

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
    /// Mixed precision: every matrix product (projections, head, attention scores and
    /// values) runs in this type, forward and backward, as `torch.autocast` does; norms,
    /// softmax, activations and the residual stream stay f32. `None`: all f32.
    pub compute: Option<DType>,
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
    /// Length of the sequence's first forward pass, where the store keeps it (Qwen's dynamic
    /// NTK fixes its rotary base by it); `None` makes each pass use its own end position.
    fn first_pass_len(&self) -> Option<usize> {
        None
    }
    /// Records the length of the first forward pass (called when the store is empty).
    fn set_first_pass_len(&mut self, _len: usize) {}
}

enum LinearWeight {
    /// Dense f32 or a quantized type candle runs well.
    Candle(QMatMul),
    /// GGUF Q4_0, Q4_1 or Q8_0 on the CPU: camelid's kernels (`crates/kernels`).
    Kernel(camelid_kernels::QMatrix),
    /// GGUF F16 on the CPU, read in place: camelid's F16 kernel.
    F16(camelid_kernels::F16Matrix),
    /// GGUF Q4_K, Q5_K, Q6_K, Q5_0 or Q5_1 on the CPU, read in place: camelid's k-quant and
    /// 5-bit kernels.
    KQuant(camelid_kernels::KMatrix),
}

struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Training in mixed precision: the input is cast to this type for the product (the
    /// weight already is), the output back to the input's type.
    compute: Option<DType>,
    /// Training: multiply a flattened `[rows, in]` input by the weight, so the backward pass
    /// forms the weight's gradient in one product instead of one per batch row summed after.
    flat: bool,
}

/// The GGUF types camelid's own kernels run.
fn kernel_type(dtype: GgmlDType) -> Option<camelid_kernels::QType> {
    if !use_kernels() {
        return None;
    }
    match dtype {
        GgmlDType::Q4_0 => Some(camelid_kernels::QType::Q4_0),
        GgmlDType::Q4_1 => Some(camelid_kernels::QType::Q4_1),
        GgmlDType::Q8_0 => Some(camelid_kernels::QType::Q8_0),
        _ => None,
    }
}

/// The GGUF k-quant and 5-bit types camelid's own kernels run (read in place, not repacked).
fn kquant_type(dtype: GgmlDType) -> Option<camelid_kernels::KType> {
    if !use_kernels() {
        return None;
    }
    match dtype {
        GgmlDType::Q4K => Some(camelid_kernels::KType::Q4K),
        GgmlDType::Q5K => Some(camelid_kernels::KType::Q5K),
        GgmlDType::Q6K => Some(camelid_kernels::KType::Q6K),
        GgmlDType::Q5_0 => Some(camelid_kernels::KType::Q5_0),
        GgmlDType::Q5_1 => Some(camelid_kernels::KType::Q5_1),
        _ => None,
    }
}

/// `CAMELID_KERNELS=candle` leaves every quantized and F16 matmul to candle, whose AVX2 path
/// sums in ggml's order: for comparisons with llama.cpp that must agree to the last bit
/// (camelid's kernels round activations as ggml does but sum in another order).
fn use_kernels() -> bool {
    static USE_KERNELS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE_KERNELS.get_or_init(|| std::env::var("CAMELID_KERNELS").map_or(true, |v| v != "candle"))
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
                if raw.dtype == GgmlDType::F16 && use_kernels() {
                    // SAFETY: `raw.file` is the GGUF file's read-only mapping.
                    let m = unsafe {
                        camelid_kernels::F16Matrix::from_mapped(out, inp, raw.file, raw.range)
                    }
                    .map_err(|e| ModelError::Input(format!("{wname}: {e}")))?;
                    return Ok(Self {
                        weight: LinearWeight::F16(m),
                        bias,
                        compute: None,
                        flat: false,
                    });
                }
                if let Some(ty) = kernel_type(raw.dtype) {
                    // SAFETY: `raw.file` is the GGUF file's read-only mapping.
                    let m = unsafe {
                        camelid_kernels::QMatrix::from_mapped(ty, out, inp, raw.file, raw.range)
                    }
                    .map_err(|e| ModelError::Input(format!("{wname}: {e}")))?;
                    return Ok(Self {
                        weight: LinearWeight::Kernel(m),
                        bias,
                        compute: None,
                        flat: false,
                    });
                }
                if let Some(ty) = kquant_type(raw.dtype) {
                    let m =
                        camelid_kernels::KMatrix::from_shared(ty, out, inp, raw.file, raw.range)
                            .map_err(|e| ModelError::Input(format!("{wname}: {e}")))?;
                    return Ok(Self {
                        weight: LinearWeight::KQuant(m),
                        bias,
                        compute: None,
                        flat: false,
                    });
                }
            }
        }
        let matrix = store.matrix(&wname, &[out, inp])?;
        Self::from_matrix(&matrix, bias)
    }

    fn from_matrix(m: &Matrix, bias: Option<Tensor>) -> Result<Self> {
        let (ty, kty) = match m {
            Matrix::Quantized(q) if q.device().is_cpu() => {
                (kernel_type(q.dtype()), kquant_type(q.dtype()))
            }
            _ => (None, None),
        };
        let weight = match (m, ty, kty) {
            (Matrix::Quantized(q), Some(ty), _) => {
                let (rows, cols) = q.shape().dims2()?;
                LinearWeight::Kernel(
                    camelid_kernels::QMatrix::from_bytes(ty, rows, cols, &q.data()?)
                        .map_err(|e| ModelError::Input(e.to_string()))?,
                )
            }
            (Matrix::Quantized(q), None, Some(ty)) => {
                let (rows, cols) = q.shape().dims2()?;
                LinearWeight::KQuant(
                    camelid_kernels::KMatrix::from_bytes(ty, rows, cols, &q.data()?)
                        .map_err(|e| ModelError::Input(e.to_string()))?,
                )
            }
            _ => LinearWeight::Candle(m.to_qmatmul()?),
        };
        Ok(Self {
            weight,
            bias,
            compute: None,
            flat: false,
        })
    }

    /// Switches a dense f32 projection to products in `dtype` (mixed-precision training);
    /// the cast of the weight is part of the recorded graph, so its gradient reaches the f32
    /// weight.
    fn set_compute(&mut self, dtype: Option<DType>) -> candle_core::Result<()> {
        if let (Some(dt), LinearWeight::Candle(QMatMul::Tensor(w))) = (dtype, &self.weight) {
            self.weight = LinearWeight::Candle(QMatMul::Tensor(w.to_dtype(dt)?));
            self.compute = Some(dt);
        }
        Ok(())
    }

    /// `x · wᵀ` over `x` flattened to `[rows, in]`, in the compute type when one is set.
    fn flat_product(&self, w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let inp = dims.pop().unwrap_or(1);
        let rows = dims.iter().product::<usize>();
        let x2 = x.reshape((rows, inp))?;
        let y = match self.compute {
            Some(dt) => x2.to_dtype(dt)?.matmul(&w.t()?)?.to_dtype(x.dtype())?,
            None => x2.matmul(&w.t()?)?,
        };
        dims.push(w.dim(0)?);
        y.reshape(dims)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Candle(QMatMul::Tensor(w)) if self.flat => {
                let y = self.flat_product(w, x)?;
                match &self.bias {
                    Some(b) => y.clone() + rows_of(b, &y)?,
                    None => Ok(y),
                }
            }
            LinearWeight::Candle(w) => {
                let y = match self.compute {
                    Some(dt) => w.forward(&x.to_dtype(dt)?)?.to_dtype(x.dtype())?,
                    None => w.forward(x)?,
                };
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            LinearWeight::Kernel(_) | LinearWeight::KQuant(_) => {
                Ok(Self::forward_group(&[self], x)?.remove(0))
            }
            LinearWeight::F16(m) => {
                let mut dims = x.dims().to_vec();
                dims.pop();
                let tokens = dims.iter().product::<usize>();
                let mut out = vec![0f32; tokens * m.rows];
                with_f32_slice(x, |input| m.matmul(input, tokens, &mut out))?
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                dims.push(m.rows);
                let y = Tensor::from_vec(out, dims, x.device())?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// Several projections of the same input (q/k/v, gate/up). Kernel-backed ones share one
    /// quantized copy of `x` and one parallel region.
    fn forward_group(linears: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let Some(group) = KernelGroup::of(linears) else {
            return linears.iter().map(|l| l.forward(x)).collect();
        };
        let mut dims = x.dims().to_vec();
        dims.pop();
        let tokens = dims.iter().product::<usize>();
        let outs = with_f32_slice(x, |input| group.products(input, tokens))??;
        outs.into_iter()
            .zip(group.rows.iter().zip(linears))
            .map(|(out, (&r, l))| {
                let mut d = dims.clone();
                d.push(r);
                let y = Tensor::from_vec(out, d, x.device())?;
                match &l.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            })
            .collect()
    }

    /// [`Linear::forward_group`] on plain rows: `x` is `[tokens, in]` row-major, each result
    /// `[tokens, out]` row-major with its bias added (the same numbers), in `outs` (one buffer
    /// per projection, resized): a pass reuses its buffers from layer to layer, and camelid's
    /// kernels write every element, so they are not cleared first.
    fn products_into(
        linears: &[&Linear],
        x: &[f32],
        tokens: usize,
        device: &Device,
        outs: &mut Vec<Vec<f32>>,
    ) -> candle_core::Result<()> {
        let Some(group) = KernelGroup::of(linears) else {
            let inp = x.len() / tokens.max(1);
            let x = Tensor::from_slice(x, (tokens, inp), device)?;
            *outs = linears
                .iter()
                .map(|l| l.forward(&x)?.flatten_all()?.to_vec1::<f32>())
                .collect::<candle_core::Result<_>>()?;
            return Ok(());
        };
        group.products_into(x, tokens, outs)?;
        for (out, l) in outs.iter_mut().zip(linears) {
            if let Some(b) = &l.bias {
                let b = b.to_vec1::<f32>()?;
                for row in out.chunks_mut(b.len()) {
                    for (y, &b) in row.iter_mut().zip(&b) {
                        *y += b;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Projections that camelid's kernels run as one group (all of one kind).
struct KernelGroup<'a> {
    mats: Option<Vec<&'a camelid_kernels::QMatrix>>,
    kmats: Option<Vec<&'a camelid_kernels::KMatrix>>,
    /// Output rows of each.
    rows: Vec<usize>,
}

impl<'a> KernelGroup<'a> {
    fn of(linears: &[&'a Linear]) -> Option<Self> {
        let mats: Option<Vec<&camelid_kernels::QMatrix>> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Kernel(m) => Some(m),
                _ => None,
            })
            .collect();
        let kmats: Option<Vec<&camelid_kernels::KMatrix>> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::KQuant(m) => Some(m),
                _ => None,
            })
            .collect();
        let rows: Vec<usize> = match (&mats, &kmats) {
            (Some(m), _) => m.iter().map(|m| m.rows).collect(),
            (_, Some(k)) => k.iter().map(|k| k.rows).collect(),
            _ => return None,
        };
        Some(Self { mats, kmats, rows })
    }

    /// The products of `tokens` rows of `input`, without biases.
    fn products(&self, input: &[f32], tokens: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut outs = Vec::new();
        self.products_into(input, tokens, &mut outs)?;
        Ok(outs)
    }

    /// [`Self::products`] into `outs`, resized (the kernels write every element).
    fn products_into(
        &self,
        input: &[f32],
        tokens: usize,
        outs: &mut Vec<Vec<f32>>,
    ) -> candle_core::Result<()> {
        outs.resize_with(self.rows.len(), Vec::new);
        for (o, r) in outs.iter_mut().zip(&self.rows) {
            o.resize(tokens * r, 0.0);
        }
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        match (&self.mats, &self.kmats) {
            (Some(m), _) => camelid_kernels::matmul_group_many(m, input, tokens, &mut views),
            (_, Some(k)) => camelid_kernels::kmatmul_group(k, input, tokens, &mut views),
            _ => Ok(()),
        }
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
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
            Tensor::zeros(h, weight.dtype(), store.device())?
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
            let xhat = x.broadcast_div(&(var + eps)?.sqrt()?)?;
            let y = (&xhat * rows_of(&self.weight, &xhat)?)?;
            return match self.kind {
                NormKind::RmsNorm => Ok(y),
                NormKind::LayerNorm => y.clone() + rows_of(&self.bias, &y)?,
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

impl Attention {
    /// This layer's shape for [`crate::paged_attention`], with the sliding window and the
    /// ALiBi slopes that apply to it.
    fn geometry<'a>(
        &self,
        window: Option<usize>,
        alibi: Option<&'a [f32]>,
    ) -> crate::paged_attention::Geometry<'a> {
        crate::paged_attention::Geometry {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
            window,
            alibi,
        }
    }
}

struct Mlp {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    activation: Activation,
}

/// GELU with the tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, written as
/// `x·sigmoid(2·√(2/π)·(x + 0.044715·x³))` (the same function) from ops whose backward passes
/// reuse the forward's result: candle's fused `gelu` backward recomputes a tanh and two powers
/// (a quarter of a small model's training step).
fn gelu_tanh_differentiable(x: &Tensor) -> candle_core::Result<Tensor> {
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4;
    let inner = (x * ((x.sqr()? * (0.044715 * TWO_SQRT_2_OVER_PI))? + TWO_SQRT_2_OVER_PI)?)?;
    x * candle_nn::ops::sigmoid(&inner)?
}

/// `v` (`[n]`) repeated over every row of `like` (`[..., n]`), as a rank-1 product: in the
/// backward pass `v`'s gradient is then one matrix product over the rows, where a broadcast's is
/// a strided sum over the leading dimensions (candle's slow reduction path).
fn rows_of(v: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
    let n = v.elem_count();
    let rows = like.elem_count() / n.max(1);
    Tensor::ones((rows, 1), v.dtype(), v.device())?
        .matmul(&v.reshape((1, n))?)?
        .reshape(like.shape())
}

impl Mlp {
    fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
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
            (Some(gate), Activation::GeGlu) if differentiable => {
                (gelu_tanh_differentiable(&gate)? * up)?
            }
            (Some(gate), Activation::GeGlu) => (gate.gelu()? * up)?,
            (Some(gate), _) => (candle_nn::ops::silu(&gate)? * up)?,
            (None, Activation::Gelu) => up.gelu_erf()?,
            (None, Activation::GeluTanh) if differentiable => gelu_tanh_differentiable(&up)?,
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
    /// A decoder's attention to the encoder output, between self-attention and MLP.
    cross: Option<CrossAttention>,
}

struct CrossAttention {
    norm: Norm,
    attn: Attention,
}

/// The encoder output projected to keys and values once per sequence, one pair
/// (`[batch, kv_heads, source_len, head_dim]`) per decoder block.
#[derive(Clone)]
pub struct CrossKv {
    layers: Vec<(Tensor, Tensor)>,
}

impl CrossKv {
    /// The same encoder output for `n` sequences (beams) of one batch-1 encoding.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        let idx = Tensor::zeros(n, DType::U32, self.layers[0].0.device())?;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Number of encoder positions.
    pub fn source_len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }
}

/// T5's relative-position bucket for `rel = key_position - query_position`, computed in f32 as
/// transformers computes it (the log-spaced buckets' edges depend on that rounding).
pub fn relative_bucket(
    rel: i64,
    bidirectional: bool,
    buckets: usize,
    max_distance: usize,
) -> usize {
    let mut nb = buckets as i64;
    let mut out = 0;
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            out += nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        return (out + n) as usize;
    }
    let log_ratio = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact
        + ((n as f32 / max_exact as f32).ln() / log_ratio * (nb - max_exact) as f32) as i64;
    (out + large.min(nb - 1)) as usize
}

#[derive(Clone)]
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
    /// T5's relative-position bias table `[buckets, heads]`: the first block's, shared by all.
    rel_bias: Option<Tensor>,
    device: Device,
    /// The activations' type: the float weights' (f32, f16 or bf16). Logits are f32 whatever it is.
    dtype: DType,
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
    pub fn load(spec: ArchSpec, store: &WeightStore) -> Result<Self> {
        Self::load_sharing(spec, store, None)
    }

    /// Loads a stack that reuses `shared`'s token embedding instead of reading its own copy
    /// (the decoder of an encoder-decoder, whose stacks share one embedding matrix).
    pub fn load_sharing(
        mut spec: ArchSpec,
        store: &WeightStore,
        shared: Option<&Transformer>,
    ) -> Result<Self> {
        spec.validate()
            .map_err(|m| ModelError::config(store.path(), m))?;
        if spec.positions == Positions::RelativeXl {
            return Err(ModelError::config(
                store.path(),
                "Transformer-XL relative attention is described by the spec but not yet run by the transformer",
            ));
        }
        let prefix = spec.stack.prefix();
        let device = store.device().clone();
        let h = spec.hidden;
        let v = spec.vocab_size;
        let a = &spec.attention;
        let (q_dim, kv_dim) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);

        let e = spec.embed_dim.unwrap_or(h);
        let embed = match shared {
            Some(t) if t.spec.vocab_size == v && t.spec.embed_dim.unwrap_or(t.spec.hidden) == e => {
                t.embed.clone()
            }
            _ => match store.matrix("token_embd.weight", &[v, e])? {
                Matrix::Dense(t) => Embedding::Dense(t),
                Matrix::Quantized(q) => Embedding::Quantized(q),
            },
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

        // Grown one loaded block at a time: a damaged layer count then ends at the first missing
        // tensor instead of reserving room for billions of blocks.
        let mut blocks = Vec::new();
        for i in 0..spec.layers {
            let p = format!("{prefix}blk.{i}");
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
            let cross = if spec.stack == Stack::Decoder {
                let l = |n: &str, out: usize, inp: usize, bias: bool| {
                    Linear::load(store, &format!("{p}.cross_attn_{n}"), out, inp, bias)
                };
                Some(CrossAttention {
                    norm: Norm::load(store, &format!("{p}.cross_attn_norm"), &spec)?,
                    attn: Attention {
                        qkv: Qkv::Split {
                            q: l("q", q_dim, h, a.qkv_bias)?,
                            k: l("k", kv_dim, h, a.qkv_bias)?,
                            v: l("v", kv_dim, h, a.qkv_bias)?,
                        },
                        out: l("o", h, q_dim, a.out_bias)?,
                        heads: a.heads,
                        kv_heads: a.kv_heads,
                        head_dim: a.head_dim,
                        scale: a.scale(),
                        windowed: false,
                        clip: None,
                        q_norm: None,
                        k_norm: None,
                    },
                })
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: Norm::load(store, &format!("{p}.attn_norm"), &spec)?,
                mlp_norm,
                attn,
                mlp,
                cross,
            });
        }

        let final_norm = if spec.final_norm {
            Some(Norm::load(store, &format!("{prefix}output_norm"), &spec)?)
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
        } else if !spec.normalize_head_rows {
            // As the layers' projections: F16 and kernel types read from the mapped file.
            Some(Linear::load(store, "output", v, e, spec.head_bias)?)
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
        let rel_bias = match spec.positions {
            Positions::RelativeBuckets { buckets, .. } => {
                let name = format!("{prefix}blk.0.attn_rel_b.weight");
                Some(store.dense(&name, &[buckets, a.heads])?)
            }
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
            rel_bias,
            device,
            dtype: store.dtype(),
            train: TrainMode::default(),
        })
    }

    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Switches between inference (the default) and a training forward pass.
    pub fn set_training(&mut self, mode: TrainMode) -> candle_core::Result<()> {
        let differentiable = mode.differentiable;
        let norms = self.blocks.iter_mut().flat_map(|b| {
            [Some(&mut b.attn_norm), b.mlp_norm.as_mut()]
                .into_iter()
                .chain([b.attn.q_norm.as_mut(), b.attn.k_norm.as_mut()])
                .chain([b.cross.as_mut().map(|c| &mut c.norm)])
        });
        let norms = norms.chain([self.embed_norm.as_mut(), self.final_norm.as_mut()]);
        for n in norms.flatten() {
            n.differentiable = differentiable;
        }
        let compute = mode.compute;
        for l in self.linears_mut() {
            l.set_compute(compute)?;
            l.flat = differentiable;
        }
        self.train = mode;
        Ok(())
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        fn attn_linears(a: &mut Attention) -> Vec<&mut Linear> {
            let mut v: Vec<&mut Linear> = match &mut a.qkv {
                Qkv::Split { q, k, v } => vec![q, k, v],
                Qkv::Fused(l) => vec![l],
            };
            v.push(&mut a.out);
            v
        }
        let mut out: Vec<&mut Linear> = Vec::new();
        for b in &mut self.blocks {
            out.extend(attn_linears(&mut b.attn));
            if let Some(c) = &mut b.cross {
                out.extend(attn_linears(&mut c.attn));
            }
            out.extend(b.mlp.gate.as_mut());
            out.push(&mut b.mlp.up);
            out.push(&mut b.mlp.down);
        }
        out.extend(self.proj_in.as_mut());
        out.extend(self.proj_out.as_mut());
        out.extend(self.head.as_mut());
        out
    }

    /// `a · b` in the training compute type (mixed precision), the result in `a`'s type.
    fn product(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        match self.train.compute {
            Some(dt) if dt != a.dtype() => a
                .to_dtype(dt)?
                .matmul(&b.to_dtype(dt)?)?
                .to_dtype(a.dtype()),
            _ => a.matmul(b),
        }
    }

    /// Rotary tables (computed in f32) in the activations' type.
    fn in_dtype(&self, (cos, sin): (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
        Ok((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
    }

    fn dropout(&self, x: Tensor) -> candle_core::Result<Tensor> {
        match &self.train.dropout {
            Some(f) => f(&x),
            None => Ok(x),
        }
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dropout(mlp.forward(x, self.train.differentiable)?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activations' type (the float weights'); logits and hidden states are returned in f32.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Token ids as a `[1, seq]` input on the model's device, checked against the vocabulary
    /// here, on the host, before anything reaches the device.
    pub fn input(&self, ids: &[u32]) -> Result<Tensor> {
        self.check_ids(ids)?;
        Ok(Tensor::new(ids, &self.device)?.unsqueeze(0)?)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.spec.vocab_size as u32;
        match ids.iter().find(|&&i| i >= vocab) {
            Some(bad) => Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
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
        self.forward_with(ids, cache, None, all_logits)
    }

    /// [`Transformer::forward`] for a decoder that attends to an encoder output (`cross`,
    /// from [`Transformer::cross_kv`]); `None` for every other model.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        cache: &mut dyn KvStore,
        cross: Option<&CrossKv>,
        all_logits: bool,
    ) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            ModelError::Input(format!(
                "{} is an encoder without a language-model head: use it for embeddings",
                self.spec.family
            ))
        })?;
        let mut x = self.hidden_states_with(ids, None, cache, cross)?;
        let t = x.dim(1)?;
        if !all_logits && t > 1 {
            x = x.narrow(1, t - 1, 1)?;
        }
        if let Some(s) = self.spec.head_scale {
            x = (x * s)?;
        }
        Ok(head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Projects an encoder output (`[batch, source_len, hidden]`) to every decoder block's
    /// cross-attention keys and values, once per sequence.
    pub fn cross_kv(&self, encoder_out: &Tensor) -> Result<CrossKv> {
        let (b, s, _) = encoder_out.dims3()?;
        let mut layers = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let Some(c) = &block.cross else {
                return Err(ModelError::Input(format!(
                    "{} has no cross-attention: it is not the decoder of an encoder-decoder model",
                    self.spec.family
                )));
            };
            let Qkv::Split { k, v, .. } = &c.attn.qkv else {
                unreachable!("cross-attention is loaded with split projections")
            };
            let shape = (b, s, c.attn.kv_heads, c.attn.head_dim);
            let k = k.forward(encoder_out)?.reshape(shape)?.transpose(1, 2)?;
            let v = v.forward(encoder_out)?.reshape(shape)?.transpose(1, 2)?;
            layers.push((k.contiguous()?, v.contiguous()?));
        }
        Ok(CrossKv { layers })
    }

    /// The last hidden states `[batch, seq, hidden]` (after the final norm and `proj_out`):
    /// what a vocabulary head reads, and what embedders pool.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        cache: &mut dyn KvStore,
    ) -> Result<Tensor> {
        Ok(self
            .hidden_states_with(ids, token_types, cache, None)?
            .to_dtype(DType::F32)?)
    }

    fn hidden_states_with(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        cache: &mut dyn KvStore,
        cross: Option<&CrossKv>,
    ) -> Result<Tensor> {
        if self.spec.stack == Stack::Decoder && cross.is_none() {
            return Err(ModelError::Input(format!(
                "{} is an encoder-decoder model: its decoder needs the encoder output (generate, or give logits --decoder-ids)",
                self.spec.family
            )));
        }
        if self.spec.stack != Stack::Decoder && cross.is_some() {
            return Err(ModelError::Input(format!(
                "{} has no cross-attention: an encoder output does not apply",
                self.spec.family
            )));
        }
        let (_, t) = ids.dims2()?;
        let start = cache.seq_len();
        if start + t > self.spec.max_positions {
            return Err(ModelError::Input(format!(
                "{} tokens exceed the model's context window of {} positions",
                start + t,
                self.spec.max_positions
            )));
        }
        // Ids on the host are checked here; ids on a GPU were checked on the host when they were
        // made ([`Transformer::input`]): reading them back would cost a round trip per token.
        if ids.device().is_cpu() {
            self.check_ids(&ids.flatten_all()?.to_vec1::<u32>()?)?;
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
        if start == 0 {
            cache.set_first_pass_len(t);
        }
        let first_pass = match cache.first_pass_len() {
            _ if self.train.differentiable => 0,
            Some(n) => n,
            None => start + t,
        };
        let rotary = match &self.rope {
            Some(r) => Some(self.in_dtype(r.cos_sin_at(start, t, first_pass, &self.device)?)?),
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
        let rel_bias = self.relative_bias(start, t)?;

        for (i, block) in self.blocks.iter().enumerate() {
            let ctx = AttnContext {
                start,
                rel_bias: rel_bias.as_ref(),
                cross: cross.and_then(|c| c.layers.get(i)),
                layer: i,
                rotary: rotary.as_ref(),
                mask: if block.attn.windowed {
                    windowed.as_ref()
                } else {
                    causal.as_ref()
                },
                alibi: alibi.as_ref(),
            };
            x = self.block_forward(block, &x, ctx.cross, &mut |n| {
                self.attention(&block.attn, n, &ctx, cache)
            })?;
        }

        if let Some(n) = &self.final_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.proj_out {
            x = p.forward(&x)?;
        }
        Ok(x)
    }

    /// One block; `attention` runs the block's self-attention on its (normed) input, `cross`
    /// holds the encoder keys and values of a decoder block's cross-attention.
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        cross: Option<&(Tensor, Tensor)>,
        attention: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mlp_norm = |x: &Tensor| -> candle_core::Result<Tensor> {
            match &block.mlp_norm {
                Some(n) => n.forward(x),
                None => block.attn_norm.forward(x),
            }
        };
        Ok(match (self.spec.norm_placement, self.spec.residual) {
            (NormPlacement::Pre, Residual::Sequential) => {
                let mut h = (x + attention(&block.attn_norm.forward(x)?)?)?;
                if let (Some(c), Some((k, v))) = (&block.cross, cross) {
                    h = (&h + self.cross_attention(&c.attn, &c.norm.forward(&h)?, k, v)?)?;
                }
                let m = self.mlp(&block.mlp, &mlp_norm(&h)?)?;
                (h + m)?
            }
            (NormPlacement::Pre, Residual::Parallel { shared_norm }) => {
                let n = block.attn_norm.forward(x)?;
                let a = attention(&n)?;
                let m = if shared_norm {
                    self.mlp(&block.mlp, &n)?
                } else {
                    self.mlp(&block.mlp, &mlp_norm(x)?)?
                };
                ((x + a)? + m)?
            }
            (NormPlacement::Post, Residual::Sequential) => {
                let h = block.attn_norm.forward(&(x + attention(x)?)?)?;
                mlp_norm(&(&h + self.mlp(&block.mlp, &h)?)?)?
            }
            (NormPlacement::Post, Residual::Parallel { .. }) => {
                let a = attention(x)?;
                let m = self.mlp(&block.mlp, x)?;
                block.attn_norm.forward(&((x + a)? + m)?)?
            }
        })
    }

    /// T5's bias `[heads, new, total]` from the relative-position buckets: bidirectional in an
    /// encoder, looking back only in a decoder.
    fn relative_bias(&self, start: usize, t: usize) -> Result<Option<Tensor>> {
        let (
            Some(table),
            Positions::RelativeBuckets {
                buckets,
                max_distance,
            },
        ) = (&self.rel_bias, &self.spec.positions)
        else {
            return Ok(None);
        };
        let total = start + t;
        let mut idx = Vec::with_capacity(t * total);
        for i in 0..t {
            let q = (start + i) as i64;
            for j in 0..total as i64 {
                let bucket = relative_bucket(j - q, !self.spec.causal, *buckets, *max_distance);
                idx.push(bucket as u32);
            }
        }
        let idx = Tensor::from_vec(idx, t * total, &self.device)?;
        let heads = table.dim(1)?;
        Ok(Some(
            table
                .index_select(&idx, 0)?
                .reshape((t, total, heads))?
                .permute((2, 0, 1))?
                .contiguous()?
                .to_dtype(DType::F32)?,
        ))
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
        let (q, k, v) = self.qkv(attn, x)?;
        let out = self.attend(attn, &q, &k, &v, ctx, cache)?;
        self.project_out(attn, &out)
    }

    /// The output projection of the heads' outputs (and training-time dropout).
    fn project_out(&self, attn: &Attention, heads_out: &Tensor) -> Result<Tensor> {
        Ok(self.dropout(attn.out.forward(heads_out)?)?)
    }

    /// Query, key and value projections `[batch, seq, heads * head_dim]` (row-wise work only).
    fn qkv(&self, attn: &Attention, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
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
        Ok((q, k, v))
    }

    /// Rotary, cache append and attention of one sequence's projections; returns the heads'
    /// outputs `[batch, seq, heads * head_dim]` before the output projection.
    fn attend(
        &self,
        attn: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &AttnContext,
        cache: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (nh, nkv, hd) = (attn.heads, attn.kv_heads, attn.head_dim);
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
        let q = self.logn_scale(&q, ctx.start)?;
        let (k, v) = cache.append(ctx.layer, &k, &v)?;
        if b == 1 && ctx.rel_bias.is_none() && self.row_attention() {
            // The batched pass's arithmetic (crate::paged_attention), so that a sequence gets
            // the same numbers alone and served among others.
            let window = match self.spec.attention.sliding_window {
                Some(w) if attn.windowed => Some(w),
                _ => None,
            };
            let slopes = match &self.alibi_slopes {
                Some(s) => Some(s.to_vec1::<f32>()?),
                None => None,
            };
            let geometry = attn.geometry(window, slopes.as_deref());
            let mut out = vec![0f32; t * nh * hd];
            with_f32_slice(&q, |qs| {
                with_f32_slice(&k, |ks| {
                    with_f32_slice(&v, |vs| {
                        crate::paged_attention::attend_contiguous(
                            &geometry, ctx.start, t, qs, ks, vs, &mut out,
                        )
                    })
                })
            })???
            .map_err(ModelError::Input)?;
            return Ok(Tensor::from_vec(out, (1, t, nh * hd), &self.device)?);
        }
        self.scores_values(attn, &q, &k, &v, ctx)
    }

    /// Attention runs row by row in [`crate::paged_attention`] (batched passes over the paged
    /// pool, and single sequences alike): causal inference on the CPU, without Qwen's log-n
    /// query scaling or T5's relative bias, in f32; `CAMELID_KERNELS=candle` keeps candle's
    /// scores path (the llama.cpp comparisons).
    fn row_attention(&self) -> bool {
        use_kernels()
            && self.spec.causal
            && self.spec.attention.logn_queries.is_none()
            && !self.train.differentiable
            && self.device.is_cpu()
            && self.dtype == DType::F32
    }

    /// Qwen's log-n scaling of queries `[batch, heads, seq, head_dim]` starting at `start`.
    fn logn_scale(&self, q: &Tensor, start: usize) -> Result<Tensor> {
        let t = q.dim(2)?;
        match self.spec.attention.logn_queries {
            Some(n) if !self.train.differentiable && start + t > n => {
                let ln_n = (n as f64).ln();
                let scale: Vec<f32> = (start + 1..=start + t)
                    .map(|p| {
                        if p > n {
                            ((p as f64).ln() / ln_n) as f32
                        } else {
                            1.0
                        }
                    })
                    .collect();
                let scale =
                    Tensor::from_vec(scale, (1, 1, t, 1), q.device())?.to_dtype(q.dtype())?;
                Ok(q.broadcast_mul(&scale)?)
            }
            _ => Ok(q.clone()),
        }
    }

    /// Queries `x` against precomputed encoder keys and values (no mask, no position bias).
    fn cross_attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let Qkv::Split { q, .. } = &attn.qkv else {
            unreachable!("cross-attention is loaded with split projections")
        };
        let q = q
            .forward(x)?
            .reshape((b, t, attn.heads, attn.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let ctx = AttnContext {
            start: 0,
            layer: 0,
            rotary: None,
            mask: None,
            alibi: None,
            rel_bias: None,
            cross: None,
        };
        let out = self.scores_values(attn, &q, k, v, &ctx)?;
        self.project_out(attn, &out)
    }

    /// Scores, mask and biases, softmax and values for queries `[batch, heads, new, head_dim]`
    /// over keys and values `[batch, kv_heads, total, head_dim]`; returns the heads' outputs
    /// `[batch, new, heads * head_dim]`.
    fn scores_values(
        &self,
        attn: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &AttnContext,
    ) -> Result<Tensor> {
        if let Some(out) = self.cpu_attention(attn, q, k, v, ctx)? {
            return Ok(out);
        }
        let (b, _, t, _) = q.dims4()?;
        let (nh, nkv, hd) = (attn.heads, attn.kv_heads, attn.head_dim);
        let s = k.dim(2)?;

        // Group query heads by the kv head they share instead of copying keys per head.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        // Scores, masks, biases and softmax in f32 whatever the activations' type (as
        // transformers does in f16/bf16): a bf16 ALiBi bias of 50 would be off by 0.25.
        let scores = (self.product(&q, &k.t()?)? * attn.scale)?.to_dtype(DType::F32)?;
        let mut scores = scores.reshape((b, nkv, rep, t, s))?;
        if let Some(mask) = ctx.mask {
            scores = scores.broadcast_add(mask)?;
        }
        if let Some(alibi) = ctx.alibi {
            scores = scores.broadcast_add(&alibi.reshape((nkv, rep, 1, s))?)?;
        }
        if let Some(bias) = ctx.rel_bias {
            scores = scores.broadcast_add(&bias.reshape((nkv, rep, t, s))?)?;
        }
        let probs = if self.train.differentiable {
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            self.dropout(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?
        };
        let probs = probs.to_dtype(v.dtype())?;
        Ok(self
            .product(&probs.reshape((b, nkv, rep * t, s))?, &v.contiguous()?)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?)
    }

    /// [`Self::scores_values`] by camelid's CPU attention kernel, which reads the cache in
    /// place and never materializes the score matrix: for one f32 sequence at inference, with
    /// a causal mask or none (`None` where it does not apply: ALiBi, T5 biases, a sliding
    /// window, training, another device).
    fn cpu_attention(
        &self,
        attn: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &AttnContext,
    ) -> Result<Option<Tensor>> {
        let (b, nh, t, hd) = q.dims4()?;
        if !self.device.is_cpu()
            || self.train.differentiable
            || !use_kernels()
            || b != 1
            || attn.windowed
            || ctx.alibi.is_some()
            || ctx.rel_bias.is_some()
            || [q, k, v].iter().any(|x| x.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let (_, nkv, s, _) = k.dims4()?;
        let shape = camelid_kernels::AttentionShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            new: t,
            total: s,
            scale: attn.scale as f32,
            causal: ctx.mask.is_some(),
        };
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
            return Ok(None);
        };
        // Rows of a head must be contiguous; heads may be strided (a cache longer than `s`).
        let rows = |l: &candle_core::Layout| {
            let st = l.stride();
            (l.dims() == [1, nkv, s, hd] && st[3] == 1 && (st[2] == hd || s == 1))
                .then_some((l.start_offset(), st[1]))
        };
        let (Some((ko, kst)), Some((vo, vst))) = (rows(kl), rows(vl)) else {
            return Ok(None);
        };
        let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
        let mut out = vec![0f32; t * nh * hd];
        with_f32_slice(q, |q| {
            camelid_kernels::attention(
                q,
                camelid_kernels::HeadRows {
                    data: &kd[ko..],
                    head_stride: kst,
                },
                camelid_kernels::HeadRows {
                    data: &vd[vo..],
                    head_stride: vst,
                },
                shape,
                &mut out,
            )
        })?
        .map_err(|e| ModelError::Input(e.to_string()))?;
        Ok(Some(Tensor::from_vec(out, (1, t, nh * hd), &self.device)?))
    }
}

struct AttnContext<'a> {
    /// Position of the first new token.
    start: usize,
    layer: usize,
    rotary: Option<&'a (Tensor, Tensor)>,
    mask: Option<&'a Tensor>,
    alibi: Option<&'a Tensor>,
    /// Relative-position bias `[heads, new, total]` (T5).
    rel_bias: Option<&'a Tensor>,
    /// This block's encoder keys and values (encoder-decoder decoders).
    cross: Option<&'a (Tensor, Tensor)>,
}

/// Softmax over the last dimension in f64 for reporting log-probabilities.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

impl Transformer {
    /// How many projections (and the head) candle runs as quantized products on the CPU: the
    /// GGUF types camelid's kernels do not cover. Those run on candle's own thread pool, so the
    /// caller must not pin that pool to one thread when this is not zero.
    pub fn candle_quantized_products(&self) -> usize {
        fn attn(a: &Attention) -> Vec<&Linear> {
            let mut v: Vec<&Linear> = match &a.qkv {
                Qkv::Split { q, k, v } => vec![q, k, v],
                Qkv::Fused(l) => vec![l],
            };
            v.push(&a.out);
            v
        }
        let mut all: Vec<&Linear> = Vec::new();
        for b in &self.blocks {
            all.extend(attn(&b.attn));
            all.extend(b.cross.as_ref().map(|c| attn(&c.attn)).unwrap_or_default());
            all.extend(b.mlp.gate.as_ref());
            all.extend([&b.mlp.up, &b.mlp.down]);
        }
        all.extend(self.proj_in.iter().chain(&self.proj_out).chain(&self.head));
        all.iter()
            .filter(|l| {
                matches!(&l.weight, LinearWeight::Candle(QMatMul::QTensor(q)) if q.device().is_cpu())
            })
            .count()
    }
}
