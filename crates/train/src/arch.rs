//! What is trained: an [`ArchSpec`] from a preset plus overrides, written as the
//! `config.json` of the transformers family that can hold it, or else as a camelid-native
//! checkpoint config.
//!
//! The spec the trainer uses is the one read back from that config by the family's own
//! reader, so the parameters it trains are exactly what loading the checkpoint expects.

use anyhow::{anyhow, bail, Result};
use camelid_model::config::HfConfig;
use camelid_model::families::{self, Family};
use camelid_model::presets;
use camelid_model::spec::{
    Activation, AlibiSlopes, ArchSpec, MlpSpec, NormKind, NormPlacement, NormSpec, Positions,
    QkvLayout, Residual, RotarySpec,
};
use serde_json::{json, Value};
use std::path::Path;

/// Family base shapes accepted by `--preset` besides the survey presets.
pub const BASE_PRESETS: &[&str] = &["llama", "gpt2", "gpt-neox", "bloom"];

/// Shape changes on top of a preset (`--layers`, `--hidden`, ...).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub ffn: Option<usize>,
    pub vocab: Option<usize>,
    pub context: Option<usize>,
}

fn base_spec(name: &str) -> Option<ArchSpec> {
    Some(match name {
        "llama" => ArchSpec::llama_like("llama"),
        "gpt2" => (presets::find("gpt2-124m")?.build)(),
        "gpt-neox" => {
            let mut s = ArchSpec::llama_like("gpt-neox");
            s.vocab_size = 50304;
            s.hidden = 768;
            s.layers = 12;
            s.norm = NormSpec::layer(1e-5);
            s.attention.heads = 12;
            s.attention.kv_heads = 12;
            s.attention.head_dim = 64;
            s.attention.qkv_bias = true;
            s.attention.out_bias = true;
            s.attention.qkv_layout = QkvLayout::Fused;
            s.positions = Positions::Rotary(RotarySpec::new(10000.0, 0.25, false));
            s.mlp = MlpSpec::new(3072, Activation::Gelu, true);
            s.residual = Residual::Parallel { shared_norm: false };
            s
        }
        "bloom" => {
            let mut s = (presets::find("bloom-176b")?.build)();
            s.hidden = 1024;
            s.layers = 24;
            s.attention.heads = 16;
            s.attention.kv_heads = 16;
            s.attention.head_dim = 64;
            s.mlp.hidden = 4096;
            s
        }
        _ => return None,
    })
}

/// A preset (survey design or family base) with overrides applied.
pub fn preset_spec(name: &str, o: &Overrides) -> Result<ArchSpec> {
    let mut s = match base_spec(name) {
        Some(s) => s,
        None => match presets::find(name) {
            Some(p) => (p.build)(),
            None => bail!(
                "unknown preset \"{name}\"; known: {}, {}",
                BASE_PRESETS.join(", "),
                presets::PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let ffn_ratio = s.mlp.hidden as f64 / s.hidden as f64;
    if let Some(l) = o.layers {
        s.layers = l;
    }
    if let Some(h) = o.hidden {
        s.hidden = h;
        s.mlp.hidden = (ffn_ratio * h as f64).round() as usize;
    }
    if o.hidden.is_some() || o.heads.is_some() || o.kv_heads.is_some() {
        let heads = o.heads.unwrap_or(s.attention.heads);
        let kv = match o.kv_heads {
            Some(k) => k,
            None if s.attention.kv_heads == s.attention.heads => heads,
            None => s.attention.kv_heads.min(heads),
        };
        s.set_heads(heads, kv).map_err(|m| anyhow!(m))?;
    }
    if let Some(f) = o.ffn {
        s.mlp.hidden = f;
    }
    if let Some(v) = o.vocab {
        s.vocab_size = v;
    }
    if let Some(c) = o.context {
        s.max_positions = c;
    }
    s.validate().map_err(|m| anyhow!("preset {name}: {m}"))?;
    Ok(s)
}

fn act_name(a: Activation) -> Option<&'static str> {
    Some(match a {
        Activation::GeluTanh => "gelu_new",
        Activation::Gelu => "gelu",
        Activation::Relu => "relu",
        Activation::Silu | Activation::SwiGlu => "silu",
        Activation::GeGlu => return None,
    })
}

/// The checkpoint `spec` is written as: the transformers `config.json` of the family that can
/// hold it, or else a camelid-native one (see [`native_config`]); and the spec that family
/// reads back from it: the one to train, whose parameters are laid out as the checkpoint
/// stores them (e.g. GPT-2's fused QKV). `dropout` is written as the config's dropout
/// probabilities.
pub fn export_config(spec: &ArchSpec, dropout: f64) -> Result<(&'static Family, Value, ArchSpec)> {
    match transformers_config(spec, dropout) {
        Ok(found) => Ok(found),
        Err(why) => native_config(spec, dropout, &format!("{why:#}")),
    }
}

/// A camelid-native checkpoint config: `model_type: "camelid"` with the spec itself under
/// `camelid_spec` (tensors keep camelid's canonical names). `camelid run` and `camelid logits`
/// load it; transformers cannot, as it has no architecture for the design (`why` says which
/// part, and is kept in the config as `transformers_note`).
pub fn native_config(
    spec: &ArchSpec,
    dropout: f64,
    why: &str,
) -> Result<(&'static Family, Value, ArchSpec)> {
    let family = families::by_model_type("camelid")
        .ok_or_else(|| anyhow!("the camelid-native family is not registered"))?;
    let cfg = json!({
        "model_type": "camelid",
        "camelid_spec": spec,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.attention.heads,
        "max_position_embeddings": spec.max_positions,
        "dropout": dropout,
        "torch_dtype": "float32",
        "transformers_note": format!(
            "camelid-native checkpoint: transformers has no architecture for this design ({why})"
        ),
    });
    let back = (family.from_config)(&HfConfig::from_value(Path::new("config.json"), cfg.clone()))?;
    Ok((family, cfg, back))
}

/// The transformers `config.json` of the family that can hold `spec`, or why none can.
pub fn transformers_config(
    spec: &ArchSpec,
    dropout: f64,
) -> Result<(&'static Family, Value, ArchSpec)> {
    let a = &spec.attention;
    let unsupported = |why: &str| {
        anyhow!(
            "the {} architecture cannot be written as a transformers checkpoint ({why}); \
             transformers layouts are LLaMA, GPT-2, OPT, GPT-NeoX and BLOOM shapes",
            spec.family
        )
    };
    let act = act_name(spec.mlp.activation).ok_or_else(|| unsupported("gated GELU MLP"))?;
    if spec.norm_placement != NormPlacement::Pre || !spec.final_norm || spec.head_bias {
        return Err(unsupported("post-norm, no final norm or a head bias"));
    }
    let (model_type, cfg) = match (&spec.positions, spec.norm.kind) {
        (Positions::Rotary(r), NormKind::RmsNorm) => {
            if !spec.mlp.activation.is_gated() || spec.residual != Residual::Sequential {
                return Err(unsupported(
                    "RMSNorm decoders must be sequential SwiGLU (LLaMA)",
                ));
            }
            (
                "llama",
                json!({
                    "architectures": ["LlamaForCausalLM"],
                    "hidden_size": spec.hidden,
                    "intermediate_size": spec.mlp.hidden,
                    "num_hidden_layers": spec.layers,
                    "num_attention_heads": a.heads,
                    "num_key_value_heads": a.kv_heads,
                    "head_dim": a.head_dim,
                    "max_position_embeddings": spec.max_positions,
                    "rms_norm_eps": spec.norm.eps,
                    "rope_theta": r.theta,
                    "hidden_act": "silu",
                    "attention_bias": a.qkv_bias,
                    "mlp_bias": spec.mlp.bias,
                    "tie_word_embeddings": spec.tied_head,
                    "attention_dropout": dropout,
                }),
            )
        }
        (Positions::Rotary(r), NormKind::LayerNorm) => (
            "gpt_neox",
            json!({
                "architectures": ["GPTNeoXForCausalLM"],
                "hidden_size": spec.hidden,
                "intermediate_size": spec.mlp.hidden,
                "num_hidden_layers": spec.layers,
                "num_attention_heads": a.heads,
                "max_position_embeddings": spec.max_positions,
                "layer_norm_eps": spec.norm.eps,
                "rotary_pct": r.fraction,
                "rotary_emb_base": r.theta,
                "use_parallel_residual": matches!(spec.residual, Residual::Parallel { .. }),
                "hidden_act": act,
                "attention_bias": a.qkv_bias,
                "tie_word_embeddings": spec.tied_head,
                "attention_dropout": dropout,
                "hidden_dropout": dropout,
            }),
        ),
        (
            Positions::Alibi {
                slopes: AlibiSlopes::Bloom,
                scaled: false,
                ..
            },
            NormKind::LayerNorm,
        ) => (
            "bloom",
            json!({
                "architectures": ["BloomForCausalLM"],
                "hidden_size": spec.hidden,
                "n_layer": spec.layers,
                "n_head": a.heads,
                "seq_length": spec.max_positions,
                "layer_norm_epsilon": spec.norm.eps,
                "apply_residual_connection_post_layernorm": false,
                "attention_dropout": dropout,
                "hidden_dropout": dropout,
            }),
        ),
        (Positions::Learned { offset: 0 }, NormKind::LayerNorm) => (
            "gpt2",
            json!({
                "architectures": ["GPT2LMHeadModel"],
                "n_embd": spec.hidden,
                "n_layer": spec.layers,
                "n_head": a.heads,
                "n_positions": spec.max_positions,
                "n_ctx": spec.max_positions,
                "n_inner": spec.mlp.hidden,
                "layer_norm_epsilon": spec.norm.eps,
                "activation_function": act,
                "resid_pdrop": dropout,
                "embd_pdrop": dropout,
                "attn_pdrop": dropout,
            }),
        ),
        (Positions::Learned { offset: 2 }, NormKind::LayerNorm) => (
            "opt",
            json!({
                "architectures": ["OPTForCausalLM"],
                "hidden_size": spec.hidden,
                "num_hidden_layers": spec.layers,
                "num_attention_heads": a.heads,
                "ffn_dim": spec.mlp.hidden,
                "max_position_embeddings": spec.max_positions,
                "word_embed_proj_dim": spec.embed_dim.unwrap_or(spec.hidden),
                "do_layer_norm_before": true,
                "activation_function": act,
                "enable_bias": a.qkv_bias,
                "tie_word_embeddings": spec.tied_head,
                "dropout": dropout,
                "attention_dropout": dropout,
            }),
        ),
        _ => return Err(unsupported("its position scheme")),
    };
    let mut cfg = cfg;
    cfg["model_type"] = json!(model_type);
    cfg["vocab_size"] = json!(spec.vocab_size);
    cfg["initializer_range"] = json!(0.02);
    cfg["torch_dtype"] = json!("float32");
    let family = families::by_model_type(model_type)
        .ok_or_else(|| anyhow!("family {model_type} is not registered"))?;
    let back = (family.from_config)(&HfConfig::from_value(Path::new("config.json"), cfg.clone()))?;
    if let Some(field) = first_difference(spec, &back) {
        return Err(unsupported(&format!(
            "its {field} differs from what a {model_type} config can express"
        )));
    }
    Ok((family, cfg, back))
}

/// The first architectural field in which two specs differ (the family name and the QKV
/// storage layout do not count: the checkpoint's own layout is used).
fn first_difference(a: &ArchSpec, b: &ArchSpec) -> Option<&'static str> {
    let (x, y) = (&a.attention, &b.attention);
    let checks: [(&str, bool); 16] = [
        ("vocabulary size", a.vocab_size == b.vocab_size),
        ("hidden size", a.hidden == b.hidden),
        ("layer count", a.layers == b.layers),
        ("context length", a.max_positions == b.max_positions),
        ("norm", a.norm == b.norm),
        ("positions", a.positions == b.positions),
        ("head count", x.heads == y.heads),
        ("kv head count", x.kv_heads == y.kv_heads),
        ("head size", x.head_dim == y.head_dim),
        (
            "attention biases",
            x.qkv_bias == y.qkv_bias && x.out_bias == y.out_bias,
        ),
        (
            "attention options",
            x.sliding_window == y.sliding_window
                && x.qk_norm == y.qk_norm
                && x.clip_qkv == y.clip_qkv
                && x.softmax_scale == y.softmax_scale,
        ),
        ("MLP", a.mlp == b.mlp),
        ("residual", a.residual == b.residual),
        ("head tying", a.tied_head == b.tied_head),
        ("embedding norm", a.embed_norm == b.embed_norm),
        ("embedding size", a.embed_dim == b.embed_dim),
    ];
    checks.iter().find(|(_, same)| !same).map(|(f, _)| *f)
}

/// The spec a checkpoint directory will be loaded with, from its `config.json`.
pub fn read_config(dir: &Path) -> Result<(&'static Family, ArchSpec, Value)> {
    let path = dir.join("config.json");
    let cfg = HfConfig::read(&path)?;
    let model_type = cfg
        .model_type()
        .ok_or_else(|| anyhow!("{}: missing \"model_type\"", path.display()))?
        .to_string();
    let family = families::by_model_type(&model_type)
        .ok_or_else(|| anyhow!("{}: unknown model_type \"{model_type}\"", path.display()))?;
    let spec = (family.from_config)(&cfg)?;
    Ok((family, spec, cfg.json))
}

/// The dropout probability a checkpoint config declares (0 when none).
pub fn config_dropout(cfg: &Value) -> f64 {
    [
        "resid_pdrop",
        "hidden_dropout",
        "attention_dropout",
        "dropout",
    ]
    .iter()
    .find_map(|k| cfg.get(*k).and_then(Value::as_f64))
    .unwrap_or(0.0)
}
