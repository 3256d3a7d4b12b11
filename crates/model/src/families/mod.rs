//! The family registry. A family is data: how to read its `config.json` (and GGUF metadata)
//! into an [`ArchSpec`], and how its checkpoint names its tensors. The README's
//! supported-models table is generated from [`FAMILIES`].

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::spec::{Activation, ArchSpec, RopeScaling};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;

mod baichuan;
mod bert;
mod bloom;
mod camelid;
mod chatglm;
mod falcon;
mod gpt2;
mod gpt_neo;
mod gpt_neox;
mod gptj;
mod llama;
mod mistral;
mod mpt;
mod opt;
mod qwen;
mod qwen2;
mod t5;

pub type GgufMeta = HashMap<String, Value>;

pub struct Family {
    /// Registry name, also written into [`ArchSpec::family`].
    pub name: &'static str,
    /// How people know it, for the README table.
    pub title: &'static str,
    /// Checkpoints of this family people have.
    pub checkpoints: &'static str,
    /// `model_type` values in `config.json`.
    pub model_types: &'static [&'static str],
    /// `general.architecture` values in GGUF files.
    pub gguf_archs: &'static [&'static str],
    pub from_config: fn(&HfConfig) -> Result<ArchSpec>,
    pub from_gguf: Option<fn(&GgufReader) -> Result<ArchSpec>>,
    /// Canonical (GGUF-style) tensor name → the name in HF checkpoints, without the
    /// `.weight` / `.bias` suffix; `{i}` is the layer index.
    pub hf_tensor_names: &'static [(&'static str, &'static str)],
    /// Canonical names of matrices stored `[in, out]` in HF checkpoints (GPT-2's Conv1D);
    /// the loader transposes them.
    pub hf_transposed: &'static [&'static str],
}

pub static FAMILIES: &[&Family] = &[
    &llama::LLAMA,
    &mistral::MISTRAL,
    &qwen2::QWEN2,
    &baichuan::BAICHUAN,
    &gpt2::GPT2,
    &gpt_neo::GPT_NEO,
    &gptj::GPTJ,
    &gpt_neox::GPT_NEOX,
    &opt::OPT,
    &bloom::BLOOM,
    &falcon::FALCON,
    &mpt::MPT,
    &qwen::QWEN,
    &chatglm::CHATGLM,
    &bert::BERT,
    &t5::T5,
    &camelid::CAMELID,
];

pub fn by_model_type(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_types.contains(&model_type))
}

pub fn by_gguf_arch(arch: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf_archs.contains(&arch))
}

pub fn known_model_types() -> String {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tensor names of LLaMA-layout checkpoints, shared by the families that kept them.
pub const LLAMA_TENSOR_NAMES: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("blk.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("blk.{i}.attn_q", "model.layers.{i}.self_attn.q_proj"),
    ("blk.{i}.attn_k", "model.layers.{i}.self_attn.k_proj"),
    ("blk.{i}.attn_v", "model.layers.{i}.self_attn.v_proj"),
    ("blk.{i}.attn_output", "model.layers.{i}.self_attn.o_proj"),
    (
        "blk.{i}.ffn_norm",
        "model.layers.{i}.post_attention_layernorm",
    ),
    ("blk.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj"),
    ("blk.{i}.ffn_up", "model.layers.{i}.mlp.up_proj"),
    ("blk.{i}.ffn_down", "model.layers.{i}.mlp.down_proj"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Reads an activation name as transformers spells it.
pub fn activation(cfg: &HfConfig, key: &str, default: &str) -> Result<Activation> {
    let name = cfg.opt_str(key)?.unwrap_or(default);
    Ok(match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "bloom_gelu" => Activation::GeluTanh,
        "gelu" | "gelu_exact" => Activation::Gelu,
        "relu" => Activation::Relu,
        "silu" | "swish" => Activation::Silu,
        other => {
            return Err(cfg.err(format!(
                "{key} \"{other}\" is not supported (gelu, gelu_new, relu, silu are)"
            )))
        }
    })
}

/// The shared reading of a LLaMA-style `config.json` (LLaMA, Mistral, Qwen2 and their kin).
pub fn llama_style_config(cfg: &HfConfig, family: &str) -> Result<ArchSpec> {
    let mut s = ArchSpec::llama_like(family);
    s.vocab_size = cfg.usize("vocab_size")?;
    s.hidden = cfg.usize("hidden_size")?;
    s.layers = cfg.usize("num_hidden_layers")?;
    s.mlp.hidden = cfg.usize("intermediate_size")?;
    s.max_positions = cfg.opt_usize("max_position_embeddings")?.unwrap_or(2048);
    s.norm.eps = cfg.f64_or("rms_norm_eps", 1e-6)?;
    let a = &mut s.attention;
    a.heads = cfg.usize("num_attention_heads")?;
    a.kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(a.heads);
    if a.heads == 0 || !s.hidden.is_multiple_of(a.heads) && cfg.get("head_dim").is_none() {
        return Err(cfg.err(format!(
            "hidden_size {} is not divisible by num_attention_heads {}",
            s.hidden, a.heads
        )));
    }
    a.head_dim = cfg.opt_usize("head_dim")?.unwrap_or(s.hidden / a.heads);
    a.qkv_bias = cfg.bool_or("attention_bias", false)?;
    a.out_bias = a.qkv_bias;
    s.mlp.bias = cfg.bool_or("mlp_bias", false)?;
    s.tied_head = cfg.bool_or("tie_word_embeddings", false)?;
    let act = cfg.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" && act != "swish" {
        return Err(cfg.err(format!(
            "hidden_act \"{act}\" is not supported for a gated LLaMA-style MLP (expected silu)"
        )));
    }
    if let crate::spec::Positions::Rotary(r) = &mut s.positions {
        r.theta = match cfg.opt_f64("rope_theta")? {
            Some(t) => t,
            None => cfg
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0),
        };
        r.fraction = cfg.f64_or("partial_rotary_factor", 1.0)?;
        r.scaling = rope_scaling(cfg, s.max_positions)?;
        // Dynamic NTK exists to run past the trained length: the window grows by its factor.
        if let RopeScaling::DynamicNtk { factor, .. } = r.scaling {
            s.max_positions = (s.max_positions as f64 * factor.max(1.0)) as usize;
        }
    }
    Ok(s)
}

/// Reads `rope_scaling` (or transformers 5's `rope_parameters`) into a [`RopeScaling`].
pub fn rope_scaling(cfg: &HfConfig, max_positions: usize) -> Result<RopeScaling> {
    let Some(rs) = cfg
        .get("rope_scaling")
        .or_else(|| cfg.get("rope_parameters"))
    else {
        return Ok(RopeScaling::None);
    };
    if !rs.is_object() {
        return Err(cfg.err(format!("\"rope_scaling\" must be an object, got {rs}")));
    }
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| rs.get(k).and_then(|v| v.as_f64());
    let factor = || {
        num("factor").ok_or_else(|| cfg.err(format!("rope scaling \"{kind}\" needs \"factor\"")))
    };
    let original = num("original_max_position_embeddings")
        .map(|v| v as usize)
        .unwrap_or(max_positions);
    Ok(match kind {
        "default" | "none" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::DynamicNtk {
            factor: factor()?,
            max_positions: original,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_positions: original,
        },
        "yarn" => {
            let mut attention_factor = num("attention_factor");
            if attention_factor.is_none() {
                if let (Some(m), Some(mad)) = (num("mscale"), num("mscale_all_dim")) {
                    let f = factor()?;
                    let get = |scale: f64, m: f64| {
                        if scale <= 1.0 {
                            1.0
                        } else {
                            0.1 * m * scale.ln() + 1.0
                        }
                    };
                    attention_factor = Some(get(f, m) / get(f, mad));
                }
            }
            RopeScaling::Yarn {
                factor: factor()?,
                original_max_positions: original,
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: rs.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
            }
        }
        other => {
            return Err(cfg.err(format!(
                "rope scaling type \"{other}\" is not supported (linear, dynamic, llama3, yarn are)"
            )))
        }
    })
}

/// Typed access to GGUF metadata with errors naming the file and key.
pub struct GgufReader<'a> {
    pub meta: &'a GgufMeta,
    pub path: &'a Path,
    pub arch: String,
    /// The file's tensors, for architectures whose optional parts only show as tensors.
    pub store: Option<&'a crate::checkpoint::WeightStore>,
}

impl<'a> GgufReader<'a> {
    pub fn new(meta: &'a GgufMeta, path: &'a Path) -> Result<Self> {
        let arch = meta
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| ModelError::format(path, "GGUF metadata has no general.architecture"))?;
        Ok(Self {
            meta,
            path,
            arch,
            store: None,
        })
    }

    /// Whether the file holds the tensor (llama.cpp's name, e.g. `blk.0.attn_q_norm.weight`).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.store.is_some_and(|s| s.contains(name))
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub fn opt_u64(&self, k: &str) -> Option<u64> {
        self.meta.get(&self.key(k)).and_then(|v| {
            v.to_u64()
                .ok()
                .or_else(|| v.to_u32().ok().map(u64::from))
                .or_else(|| v.to_i32().ok().map(|x| x as u64))
        })
    }

    pub fn u64(&self, k: &str) -> Result<u64> {
        self.opt_u64(k).ok_or_else(|| {
            ModelError::format(self.path, format!("GGUF metadata lacks {}", self.key(k)))
        })
    }

    pub fn opt_f64(&self, k: &str) -> Option<f64> {
        self.meta
            .get(&self.key(k))
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    }

    pub fn opt_str(&self, k: &str) -> Option<&str> {
        self.meta
            .get(&self.key(k))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    pub fn vocab_size(&self) -> Option<usize> {
        self.opt_u64("vocab_size").map(|v| v as usize).or_else(|| {
            self.meta
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(Vec::len)
        })
    }
}

/// The shared reading of llama.cpp's metadata keys for LLaMA-style architectures. llama.cpp
/// stores LLaMA's q/k rows permuted for pair-wise (interleaved) rotary, which the spec records.
pub fn llama_style_gguf(g: &GgufReader, family: &str) -> Result<ArchSpec> {
    let mut s = ArchSpec::llama_like(family);
    s.hidden = g.u64("embedding_length")? as usize;
    s.layers = g.u64("block_count")? as usize;
    s.mlp.hidden = g.u64("feed_forward_length")? as usize;
    s.max_positions = g.opt_u64("context_length").unwrap_or(2048) as usize;
    s.norm.eps = g
        .opt_f64("attention.layer_norm_rms_epsilon")
        .unwrap_or(1e-5);
    s.vocab_size = g
        .vocab_size()
        .ok_or_else(|| ModelError::format(g.path, "GGUF metadata gives no vocabulary size"))?;
    let a = &mut s.attention;
    a.heads = g.u64("attention.head_count")? as usize;
    a.kv_heads = g
        .opt_u64("attention.head_count_kv")
        .unwrap_or(a.heads as u64) as usize;
    if a.heads == 0 {
        return Err(ModelError::format(g.path, "attention.head_count is 0"));
    }
    a.head_dim = g
        .opt_u64("attention.key_length")
        .map(|v| v as usize)
        .unwrap_or(s.hidden / a.heads);
    a.sliding_window = g.opt_u64("attention.sliding_window").map(|v| v as usize);
    if let crate::spec::Positions::Rotary(r) = &mut s.positions {
        r.theta = g.opt_f64("rope.freq_base").unwrap_or(10000.0);
        r.interleaved = true;
        if let Some(d) = g.opt_u64("rope.dimension_count") {
            r.fraction = d as f64 / a.head_dim as f64;
        }
        let factor = g.opt_f64("rope.scaling.factor");
        r.scaling = match (g.opt_str("rope.scaling.type"), factor) {
            (Some("linear"), Some(f)) => RopeScaling::Linear { factor: f },
            (Some("yarn"), Some(f)) => RopeScaling::Yarn {
                factor: f,
                original_max_positions: g
                    .opt_u64("rope.scaling.original_context_length")
                    .unwrap_or(s.max_positions as u64)
                    as usize,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None,
                truncate: true,
            },
            (None | Some("none"), _) => RopeScaling::None,
            (Some(other), _) => {
                return Err(ModelError::format(
                    g.path,
                    format!("GGUF rope scaling \"{other}\" is not supported"),
                ))
            }
        };
    }
    Ok(s)
}

/// The keys every classic (LayerNorm) architecture of llama.cpp shares, read into a spec the
/// family then completes: sizes, heads, the LayerNorm epsilon, and what only shows as tensors
/// (biases, a separate head, a head bias).
pub fn classic_gguf(g: &GgufReader, family: &str) -> Result<ArchSpec> {
    let mut s = ArchSpec::llama_like(family);
    s.hidden = g.u64("embedding_length")? as usize;
    s.layers = g.u64("block_count")? as usize;
    s.max_positions = g.opt_u64("context_length").unwrap_or(2048) as usize;
    s.vocab_size = g
        .vocab_size()
        .ok_or_else(|| ModelError::format(g.path, "GGUF metadata gives no vocabulary size"))?;
    s.norm =
        crate::spec::NormSpec::layer(g.opt_f64("attention.layer_norm_epsilon").unwrap_or(1e-5));
    s.norm.bias = g.has_tensor("blk.0.attn_norm.bias");
    let heads = g.u64("attention.head_count")? as usize;
    let kv_heads = g.opt_u64("attention.head_count_kv").unwrap_or(heads as u64) as usize;
    s.set_heads(heads, kv_heads)
        .map_err(|m| ModelError::format(g.path, m))?;
    if let Some(d) = g.opt_u64("attention.key_length") {
        s.attention.head_dim = d as usize;
    }
    let a = &mut s.attention;
    a.qkv_bias = g.has_tensor("blk.0.attn_qkv.bias") || g.has_tensor("blk.0.attn_q.bias");
    a.out_bias = g.has_tensor("blk.0.attn_output.bias");
    s.mlp = crate::spec::MlpSpec::new(
        g.u64("feed_forward_length")? as usize,
        Activation::Gelu,
        g.has_tensor("blk.0.ffn_up.bias"),
    );
    s.tied_head = !g.has_tensor("output.weight");
    s.head_bias = g.has_tensor("output.bias");
    Ok(s)
}

/// camelid's own `{arch}.feed_forward_activation` values (architectures llama.cpp has no graph
/// for, where the activation cannot be implied by the architecture).
pub const ACTIVATION_NAMES: &[(&str, Activation)] = &[
    ("gelu", Activation::Gelu),
    ("gelu_tanh", Activation::GeluTanh),
    ("relu", Activation::Relu),
    ("silu", Activation::Silu),
];

/// Reads `{arch}.feed_forward_activation` (default `default`).
pub fn gguf_activation(g: &GgufReader, default: Activation) -> Result<Activation> {
    match g.opt_str("feed_forward_activation") {
        None => Ok(default),
        Some(name) => ACTIVATION_NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                ModelError::format(
                    g.path,
                    format!("{}.feed_forward_activation \"{name}\" is not known", g.arch),
                )
            }),
    }
}

/// `{arch}.feed_forward_activation` for a spec's (plain, ungated) activation.
pub fn activation_key(s: &ArchSpec, arch: &str) -> Result<(String, Value)> {
    ACTIVATION_NAMES
        .iter()
        .find(|(_, a)| *a == s.mlp.activation)
        .map(|(n, _)| {
            (
                format!("{arch}.feed_forward_activation"),
                Value::String((*n).to_string()),
            )
        })
        .ok_or_else(|| {
            ModelError::Input(format!(
                "{}: activation {:?} has no GGUF name",
                s.family, s.mlp.activation
            ))
        })
}

/// Rotary settings from llama.cpp's `rope.*` keys (rotating `rope.dimension_count` of each
/// head's channels; rotate-half unless `interleaved`).
pub fn gguf_rotary(g: &GgufReader, head_dim: usize, interleaved: bool) -> crate::spec::Positions {
    let dims = g.opt_u64("rope.dimension_count").unwrap_or(head_dim as u64);
    crate::spec::Positions::Rotary(crate::spec::RotarySpec::new(
        g.opt_f64("rope.freq_base").unwrap_or(10000.0),
        dims as f64 / head_dim as f64,
        interleaved,
    ))
}

/// How a family's HF checkpoints are written as GGUF: the inverse of its `from_gguf`, used by
/// the quantizer. The tensors keep their canonical names; what changes between the HF and the
/// GGUF layout (row permutations, fused-QKV orders, splits) is said here as data.
pub struct GgufExport {
    /// [`Family::name`] this applies to.
    pub family: &'static str,
    /// llama.cpp's `general.architecture` for it.
    pub arch: &'static str,
    /// llama.cpp's converter reorders q/k rows (weights and biases) from HF's rotate-half
    /// layout to pair-wise rotary (`LlamaModel.permute`); camelid's `from_gguf` then reads the
    /// file as interleaved.
    pub permute_qk: bool,
    /// llama.cpp's converter splits the fused `[q | k | v]` projection into `attn_q`, `attn_k`
    /// and `attn_v` (Baichuan's `W_pack`). Fused projections packed per head or per kv group
    /// are always reordered to `[q | k | v]`, the only fused layout GGUF architectures have.
    pub split_qkv: bool,
    /// Whether llama.cpp (0.3.36) runs this architecture. The others are written under an
    /// architecture name only camelid reads back (listed in the README).
    pub llama_cpp: bool,
    /// Canonical tensor-name pattern → the GGUF name llama.cpp gives it, for tensors the
    /// architecture names apart from camelid's canonical names (Falcon-40B's two norms:
    /// `ln_attn` is llama.cpp's `attn_norm_2`, `ln_mlp` its `attn_norm`). Applied to a
    /// checkpoint holding every left-hand tensor of layer 0 when written, and to a file
    /// holding every right-hand one when read back; other checkpoints keep their names.
    pub renamed: &'static [(&'static str, &'static str)],
    /// The architecture's metadata keys from the spec.
    pub metadata: fn(&ArchSpec, &str) -> Result<GgufKeys>,
    /// Settings that act only past the trained context and that the architecture has no keys
    /// for: the spec the file holds instead, and what the user is told.
    pub adapt: Option<AdaptSpec>,
}

/// The spec a file can hold instead of `spec`, and the note saying what changed.
pub type AdaptSpec = fn(&ArchSpec) -> Option<(ArchSpec, String)>;

/// GGUF metadata in the order it is written.
pub type GgufKeys = Vec<(String, Value)>;

pub static GGUF_EXPORTS: &[&GgufExport] = &[
    &llama::LLAMA_EXPORT,
    &mistral::MISTRAL_EXPORT,
    &qwen2::QWEN2_EXPORT,
    &baichuan::BAICHUAN_EXPORT,
    &gpt2::GPT2_EXPORT,
    &gptj::GPTJ_EXPORT,
    &gpt_neox::GPT_NEOX_EXPORT,
    &bloom::BLOOM_EXPORT,
    &falcon::FALCON_EXPORT,
    &mpt::MPT_EXPORT,
    &qwen::QWEN_EXPORT,
    &chatglm::CHATGLM_EXPORT,
    &opt::OPT_EXPORT,
    &gpt_neo::GPT_NEO_EXPORT,
];

pub fn gguf_export(family: &str) -> Option<&'static GgufExport> {
    GGUF_EXPORTS.iter().copied().find(|e| e.family == family)
}

/// The inverse of [`llama_style_gguf`]: llama.cpp's metadata keys for a LLaMA-style spec.
/// Settings llama.cpp's keys cannot say are errors, not silent changes.
pub fn llama_style_gguf_metadata(s: &ArchSpec, arch: &str) -> Result<GgufKeys> {
    let unsupported = |what: &str| {
        Err(ModelError::Input(format!(
            "{}: {what} cannot be written as llama.cpp GGUF metadata yet",
            s.family
        )))
    };
    let a = &s.attention;
    let k = |key: &str| format!("{arch}.{key}");
    let u = |v: usize| Value::U32(v as u32);
    let eps_key = match s.norm.kind {
        crate::spec::NormKind::RmsNorm => "attention.layer_norm_rms_epsilon",
        crate::spec::NormKind::LayerNorm => "attention.layer_norm_epsilon",
    };
    let mut m = vec![
        (k("context_length"), u(s.max_positions)),
        (k("embedding_length"), u(s.hidden)),
        (k("block_count"), u(s.layers)),
        (k("feed_forward_length"), u(s.mlp.hidden)),
        (k("attention.head_count"), u(a.heads)),
        (k("attention.head_count_kv"), u(a.kv_heads)),
        (k(eps_key), Value::F32(s.norm.eps as f32)),
        (k("vocab_size"), u(s.vocab_size)),
    ];
    if a.heads == 0 || a.head_dim != s.hidden / a.heads {
        m.push((k("attention.key_length"), u(a.head_dim)));
        m.push((k("attention.value_length"), u(a.head_dim)));
    }
    if let Some(w) = a.sliding_window {
        m.push((k("attention.sliding_window"), u(w)));
    }
    if a.logn_queries.is_some() {
        return unsupported("log-n query scaling");
    }
    if a.softmax_scale.is_some() || a.window_layers.is_some() {
        return unsupported("a custom attention scale or per-layer windows");
    }
    if let Some(c) = a.clip_qkv {
        m.push((k("attention.clamp_kqv"), Value::F32(c as f32)));
    }
    let r = match &s.positions {
        crate::spec::Positions::Rotary(r) => r,
        crate::spec::Positions::Alibi { max_bias, .. } => {
            m.push((k("attention.max_alibi_bias"), Value::F32(*max_bias as f32)));
            return Ok(m);
        }
        crate::spec::Positions::Learned { offset: 0 } => return Ok(m),
        _ => return unsupported("this position scheme"),
    };
    m.push((k("rope.freq_base"), Value::F32(r.theta as f32)));
    m.push((
        k("rope.dimension_count"),
        u((a.head_dim as f64 * r.fraction).round() as usize),
    ));
    match r.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            m.push((k("rope.scaling.type"), Value::String("linear".into())));
            m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        _ => return unsupported("this rope scaling (only none and linear are written)"),
    }
    Ok(m)
}

/// The README's supported-models table, generated from [`FAMILIES`] so it cannot drift.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| Family | Checkpoints | `config.json` model_type | GGUF architecture |\n| --- | --- | --- | --- |\n",
    );
    for f in FAMILIES {
        let list = |v: &[&str]| {
            if v.is_empty() {
                "—".to_string()
            } else {
                v.iter()
                    .map(|x| format!("`{x}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let gguf: Vec<&str> = if f.from_gguf.is_some() {
            f.gguf_archs.to_vec()
        } else {
            Vec::new()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            f.title,
            f.checkpoints,
            list(f.model_types),
            list(&gguf)
        ));
    }
    out
}
