//! The trainable parameters of a spec: every tensor the shared transformer loads, held as a
//! candle [`Var`] under its canonical name, initialized as the family's reference does, and
//! read from / written to transformers checkpoints.

use anyhow::{anyhow, bail, Context, Result};
use camelid_model::checkpoint::WeightStore;
use camelid_model::families::Family;
use camelid_model::spec::{ArchSpec, Positions, QkvLayout, Residual};
use camelid_model::transformer::{KvStore, TrainMode, Transformer};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// What a parameter is, for initialization and weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedding,
    Matrix,
    /// An output projection that adds into the residual stream (attention out, MLP down).
    ResidualMatrix,
    Bias,
    NormWeight,
    NormBias,
}

/// Canonical names, shapes and kinds of every tensor [`Transformer::load`] reads for `spec`.
pub fn parameter_shapes(spec: &ArchSpec) -> Result<Vec<(String, Vec<usize>, Kind)>> {
    if !spec.causal || !spec.lm_head || spec.type_vocab_size > 0 {
        bail!("only causal decoders with a language-model head can be trained");
    }
    let mut out: Vec<(String, Vec<usize>, Kind)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, kind: Kind| out.push((name, shape, kind));
    let (h, v) = (spec.hidden, spec.vocab_size);
    let e = spec.embed_dim.unwrap_or(h);
    let a = &spec.attention;
    let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let f = spec.mlp.hidden;
    let norm = |add: &mut dyn FnMut(String, Vec<usize>, Kind), name: &str, dim: usize| {
        add(format!("{name}.weight"), vec![dim], Kind::NormWeight);
        if spec.norm.bias {
            add(format!("{name}.bias"), vec![dim], Kind::NormBias);
        }
    };
    let linear = |add: &mut dyn FnMut(String, Vec<usize>, Kind),
                  name: &str,
                  rows: usize,
                  cols: usize,
                  bias: bool,
                  kind: Kind| {
        add(format!("{name}.weight"), vec![rows, cols], kind);
        if bias {
            add(format!("{name}.bias"), vec![rows], Kind::Bias);
        }
    };
    add("token_embd.weight".into(), vec![v, e], Kind::Embedding);
    if e != h {
        linear(&mut add, "proj_in", h, e, false, Kind::Matrix);
        linear(&mut add, "proj_out", e, h, false, Kind::Matrix);
    }
    match spec.positions {
        Positions::Learned { offset } => add(
            "position_embd.weight".into(),
            vec![spec.max_positions + offset, h],
            Kind::Embedding,
        ),
        Positions::Rotary(_) | Positions::Alibi { .. } | Positions::None => {}
        // T5-style bucketed relative positions: one table of per-head biases, kept by block 0.
        Positions::RelativeBuckets { buckets, .. } => add(
            "blk.0.attn_rel_b.weight".into(),
            vec![buckets, a.heads],
            Kind::Embedding,
        ),
        _ => bail!(
            "{} uses Transformer-XL relative attention, which the transformer does not run yet",
            spec.family
        ),
    }
    if spec.embed_norm {
        norm(&mut add, "token_embd_norm", h);
    }
    for i in 0..spec.layers {
        let p = format!("blk.{i}");
        norm(&mut add, &format!("{p}.attn_norm"), h);
        match a.qkv_layout {
            QkvLayout::Split => {
                for (n, rows) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                    linear(
                        &mut add,
                        &format!("{p}.{n}"),
                        rows,
                        h,
                        a.qkv_bias,
                        Kind::Matrix,
                    );
                }
            }
            QkvLayout::Fused => {
                let name = format!("{p}.attn_qkv");
                linear(&mut add, &name, q + 2 * kv, h, a.qkv_bias, Kind::Matrix);
            }
        }
        if a.qk_norm {
            norm(&mut add, &format!("{p}.attn_q_norm"), q);
            norm(&mut add, &format!("{p}.attn_k_norm"), kv);
        }
        let out_name = format!("{p}.attn_output");
        linear(&mut add, &out_name, h, q, a.out_bias, Kind::ResidualMatrix);
        if spec.mlp.fused_gate_up {
            linear(
                &mut add,
                &format!("{p}.ffn_up"),
                2 * f,
                h,
                false,
                Kind::Matrix,
            );
        } else {
            if spec.mlp.activation.is_gated() {
                let name = format!("{p}.ffn_gate");
                linear(&mut add, &name, f, h, spec.mlp.bias, Kind::Matrix);
            }
            let name = format!("{p}.ffn_up");
            linear(&mut add, &name, f, h, spec.mlp.bias, Kind::Matrix);
        }
        let name = format!("{p}.ffn_down");
        linear(&mut add, &name, h, f, spec.mlp.bias, Kind::ResidualMatrix);
        if !matches!(spec.residual, Residual::Parallel { shared_norm: true }) {
            norm(&mut add, &format!("{p}.ffn_norm"), h);
        }
    }
    if spec.final_norm {
        norm(&mut add, "output_norm", h);
    }
    if !spec.tied_head {
        add("output.weight".into(), vec![v, e], Kind::Matrix);
    }
    if spec.head_bias {
        add("output.bias".into(), vec![v], Kind::Bias);
    }
    Ok(out)
}

/// How the family's reference initializes weights.
#[derive(Debug, Clone, Copy)]
pub struct InitScheme {
    pub std: f64,
    /// Residual output projections get `std / sqrt(2 · layers)` (GPT-2).
    pub scaled_residual: bool,
}

impl InitScheme {
    /// GPT-2 and the GPT-3-style presets scale residual projections; LLaMA, GPT-NeoX and
    /// BLOOM's transformers references use N(0, 0.02) everywhere.
    pub fn for_spec(spec: &ArchSpec) -> Self {
        Self {
            std: 0.02,
            scaled_residual: matches!(spec.positions, Positions::Learned { offset: 0 })
                && spec.tied_head,
        }
    }
}

/// A sequence that needs no cache: training sees each batch whole.
struct NoCache;

impl KvStore for NoCache {
    fn seq_len(&self) -> usize {
        0
    }
    fn append(
        &mut self,
        _layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((k.clone(), v.clone()))
    }
}

/// Every parameter of a model as a [`Var`], in [`parameter_shapes`] order.
pub struct Params {
    pub spec: ArchSpec,
    pub names: Vec<String>,
    pub kinds: Vec<Kind>,
    pub vars: Vec<Var>,
    pub device: Device,
}

/// Standard normal samples (Box–Muller) from a seeded generator: the same numbers on every
/// machine for a seed.
fn normals(rng: &mut rand::rngs::StdRng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos() * std) as f32);
        out.push((r * t.sin() * std) as f32);
    }
    out.truncate(n);
    out
}

impl Params {
    /// Fresh weights from `seed`.
    pub fn init(spec: &ArchSpec, seed: u64, device: &Device) -> Result<Self> {
        let scheme = InitScheme::for_spec(spec);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let residual_std = scheme.std / (2.0 * spec.layers as f64).sqrt();
        let mut tensors = Vec::new();
        for (name, shape, kind) in parameter_shapes(spec)? {
            let n: usize = shape.iter().product();
            let data = match kind {
                Kind::Embedding | Kind::Matrix => normals(&mut rng, n, scheme.std),
                Kind::ResidualMatrix if scheme.scaled_residual => {
                    normals(&mut rng, n, residual_std)
                }
                Kind::ResidualMatrix => normals(&mut rng, n, scheme.std),
                Kind::Bias | Kind::NormBias => vec![0.0; n],
                Kind::NormWeight => vec![1.0; n],
            };
            tensors.push((name, Tensor::from_vec(data, shape, device)?, kind));
        }
        Self::from_tensors(spec, tensors, device)
    }

    fn from_tensors(
        spec: &ArchSpec,
        tensors: Vec<(String, Tensor, Kind)>,
        device: &Device,
    ) -> Result<Self> {
        let mut p = Self {
            spec: spec.clone(),
            names: Vec::new(),
            kinds: Vec::new(),
            vars: Vec::new(),
            device: device.clone(),
        };
        for (name, t, kind) in tensors {
            p.names.push(name);
            p.kinds.push(kind);
            p.vars.push(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(p)
    }

    /// Weights of an HF checkpoint directory, as the family's loader reads them.
    pub fn load(dir: &Path, family: &Family, spec: &ArchSpec, device: &Device) -> Result<Self> {
        let store = WeightStore::open_safetensors(
            dir,
            family.hf_tensor_names,
            family.hf_transposed,
            device,
        )?;
        let mut tensors = Vec::new();
        for (name, shape, kind) in parameter_shapes(spec)? {
            let t = store
                .dense(&name, &shape)
                .with_context(|| format!("loading {}", dir.display()))?;
            // A copy: the checkpoint's memory map must not alias what training updates.
            tensors.push((name, t.copy()?, kind));
        }
        Self::from_tensors(spec, tensors, device)
    }

    /// The shared transformer over these variables, in training mode. Built anew for each
    /// step: the loader's reorderings (packed QKV) are then part of the recorded graph.
    pub fn transformer(&self, mode: TrainMode) -> Result<Transformer> {
        let map: HashMap<String, Tensor> = self
            .names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().clone()))
            .collect();
        let store = WeightStore::from_tensors(map, &self.device);
        let mut t = Transformer::load(self.spec.clone(), &store)?;
        t.set_training(mode)?;
        Ok(t)
    }

    /// Mean next-token cross-entropy of `inputs` against `targets` (both `[batch, seq]` u32).
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor, mode: TrainMode) -> Result<Tensor> {
        let logits = self.logits(inputs, mode)?;
        let (b, t, v) = logits.dims3()?;
        let loss =
            candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)?;
        Ok(loss)
    }

    /// Logits `[batch, seq, vocab]` for every position.
    pub fn logits(&self, inputs: &Tensor, mode: TrainMode) -> Result<Tensor> {
        let model = self.transformer(mode)?;
        Ok(model.forward(inputs, &mut NoCache, true)?)
    }

    pub fn count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// The tensors under their names in the family's checkpoint layout (Conv1D matrices
    /// transposed back to `[in, out]`).
    pub fn hf_tensors(&self, family: &Family) -> Result<HashMap<String, Tensor>> {
        let values = self
            .vars
            .iter()
            .map(|v| v.as_tensor().detach().to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        self.hf_named(family, &values)
    }

    /// `tensors` (one per parameter, in order, canonical layout, e.g. gradients) under the
    /// family's checkpoint names and layout.
    pub fn hf_named(&self, family: &Family, tensors: &[Tensor]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, t) in self.names.iter().zip(tensors) {
            let (base, suffix) = name
                .rsplit_once('.')
                .ok_or_else(|| anyhow!("bad parameter name {name}"))?;
            let (pattern, layer) = match base.split('.').collect::<Vec<_>>()[..] {
                ["blk", i, ref rest @ ..] => (format!("blk.{{i}}.{}", rest.join(".")), Some(i)),
                _ => (base.to_string(), None),
            };
            let hf = family
                .hf_tensor_names
                .iter()
                .find(|(c, _)| *c == pattern)
                .map(|(_, h)| h.split('|').next().unwrap_or(h))
                .ok_or_else(|| anyhow!("{} checkpoints have no name for {name}", family.name))?;
            let hf = match layer {
                Some(i) => hf.replace("{i}", i),
                None => hf.to_string(),
            };
            let t = if suffix == "weight"
                && t.rank() == 2
                && family.hf_transposed.contains(&pattern.as_str())
            {
                t.t()?.contiguous()?
            } else {
                t.copy()?
            };
            out.insert(format!("{hf}.{suffix}"), t);
        }
        Ok(out)
    }
}

/// A rough upper estimate of the memory one micro-batch row of `seq_len` tokens needs in
/// training (f32 activations kept for the backward pass, and their gradients).
pub fn bytes_per_row(spec: &ArchSpec, seq_len: usize) -> u64 {
    let a = &spec.attention;
    let per_token_layer = 18 * spec.hidden + 3 * spec.mlp.hidden + 3 * a.heads * seq_len;
    let per_token = per_token_layer * spec.layers + 4 * spec.vocab_size + 4 * spec.hidden;
    (per_token * seq_len) as u64 * 4 * 2
}

/// Bytes of parameters, gradients and the two AdamW moments (f32).
pub fn state_bytes(spec: &ArchSpec) -> u64 {
    spec.parameter_count() * 4 * 4
}

/// Checks that `batch` rows fit in `available` bytes; the error names the estimate and the
/// largest batch that would fit.
pub fn check_memory(spec: &ArchSpec, batch: usize, seq_len: usize, available: u64) -> Result<()> {
    let row = bytes_per_row(spec, seq_len);
    let fixed = state_bytes(spec);
    let need = fixed + row * batch as u64;
    if need > available {
        let fits = available.saturating_sub(fixed) / row.max(1);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        bail!(
            "--batch {batch} at --seq-len {seq_len} needs about {:.1} GiB ({:.1} GiB of weights and optimizer state), but {:.1} GiB are available; about {fits} rows would fit (use --grad-accum to keep the tokens per update)",
            gib(need),
            gib(fixed),
            gib(available)
        );
    }
    Ok(())
}
