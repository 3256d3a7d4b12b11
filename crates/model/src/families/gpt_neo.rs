//! GPT-Neo: GPT-2's layout with split q/k/v, alternating global and local (windowed)
//! attention layers, and no 1/sqrt(d) scaling of attention scores.

use super::{
    activation, activation_key, classic_gguf, gguf_activation, llama_style_gguf_metadata, Family,
    GgufExport,
};
use crate::error::ModelError;
use crate::spec::{Activation, ArchSpec, MlpSpec, NormSpec, Positions};
use candle_core::quantized::gguf_file::Value;

pub static GPT_NEO: Family = Family {
    name: "gpt_neo",
    title: "GPT-Neo",
    checkpoints: "`EleutherAI/gpt-neo-125m`, `EleutherAI/gpt-neo-2.7B`",
    model_types: &["gpt_neo"],
    gguf_archs: &["camelid.gpt-neo"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("gpt_neo");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize_any(&["num_layers", "num_hidden_layers"])?;
        s.max_positions = cfg.usize("max_position_embeddings")?;
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_epsilon", 1e-5)?);
        s.positions = Positions::Learned { offset: 0 };
        // `attention_layers` spells out each layer's kind: "global" or "local".
        let kinds: Vec<bool> = cfg
            .get("attention_layers")
            .and_then(|v| v.as_array())
            .ok_or_else(|| cfg.err("missing \"attention_layers\""))?
            .iter()
            .map(|k| k.as_str() == Some("local"))
            .collect();
        if kinds.len() != s.layers {
            return Err(cfg.err(format!(
                "attention_layers lists {} layers, num_layers is {}",
                kinds.len(),
                s.layers
            )));
        }
        let heads = cfg.usize_any(&["num_heads", "num_attention_heads"])?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.out_bias = true;
        a.softmax_scale = Some(1.0);
        a.sliding_window = Some(cfg.usize("window_size")?);
        a.window_layers = Some(kinds);
        s.mlp = MlpSpec::new(
            cfg.opt_usize("intermediate_size")?.unwrap_or(4 * s.hidden),
            activation(cfg, "activation_function", "gelu_new")?,
            true,
        );
        s.tied_head = true;
        Ok(s)
    },
    // camelid's own architecture (llama.cpp has no GPT-Neo graph): the classic keys plus the
    // attention scale, the window and which layers use it, and the activation.
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "gpt_neo")?;
        s.positions = Positions::Learned { offset: 0 };
        let window_layers = match g.meta.get(&format!("{}.attention.window_layers", g.arch)) {
            None => None,
            Some(v) => Some(
                v.to_vec()
                    .map_err(|e| ModelError::format(g.path, e.to_string()))?
                    .iter()
                    .map(|b| b.to_bool())
                    .collect::<std::result::Result<Vec<bool>, _>>()
                    .map_err(|e| ModelError::format(g.path, e.to_string()))?,
            ),
        };
        let a = &mut s.attention;
        a.softmax_scale = g.opt_f64("attention.scale");
        a.sliding_window = g.opt_u64("attention.sliding_window").map(|v| v as usize);
        a.window_layers = window_layers;
        s.mlp.activation = gguf_activation(g, Activation::GeluTanh)?;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.wte"),
        ("position_embd", "transformer.wpe"),
        ("blk.{i}.attn_norm", "transformer.h.{i}.ln_1"),
        ("blk.{i}.attn_q", "transformer.h.{i}.attn.attention.q_proj"),
        ("blk.{i}.attn_k", "transformer.h.{i}.attn.attention.k_proj"),
        ("blk.{i}.attn_v", "transformer.h.{i}.attn.attention.v_proj"),
        (
            "blk.{i}.attn_output",
            "transformer.h.{i}.attn.attention.out_proj",
        ),
        ("blk.{i}.ffn_norm", "transformer.h.{i}.ln_2"),
        ("blk.{i}.ffn_up", "transformer.h.{i}.mlp.c_fc"),
        ("blk.{i}.ffn_down", "transformer.h.{i}.mlp.c_proj"),
        ("output_norm", "transformer.ln_f"),
    ],
    hf_transposed: &[],
};

/// Written under camelid's own `camelid.gpt-neo` architecture; tensors keep their canonical
/// names.
pub static GPT_NEO_EXPORT: GgufExport = GgufExport {
    family: "gpt_neo",
    arch: "camelid.gpt-neo",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: false,
    renamed: &[],
    metadata: |s, arch| {
        let mut plain = s.clone();
        plain.attention.softmax_scale = None;
        plain.attention.window_layers = None;
        plain.attention.sliding_window = None;
        let mut m = llama_style_gguf_metadata(&plain, arch)?;
        let k = |key: &str| format!("{arch}.{key}");
        let a = &s.attention;
        if let Some(scale) = a.softmax_scale {
            m.push((k("attention.scale"), Value::F32(scale as f32)));
        }
        if let Some(w) = a.sliding_window {
            m.push((k("attention.sliding_window"), Value::U32(w as u32)));
        }
        if let Some(layers) = &a.window_layers {
            m.push((
                k("attention.window_layers"),
                Value::Array(layers.iter().map(|&b| Value::Bool(b)).collect()),
            ));
        }
        m.push(activation_key(s, arch)?);
        Ok(m)
    },
    adapt: None,
};
