//! ChatGLM2 / ChatGLM3 (GLM): multi-query groups, bias on q/k/v only, rotary on the first half
//! of each head in adjacent pairs, gate and up fused in `dense_h_to_4h`, RMSNorm.

use super::{llama_style_gguf, llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{ArchSpec, NormSpec, Positions, QkvLayout, RotarySpec};

pub static CHATGLM: Family = Family {
    name: "chatglm",
    title: "ChatGLM2 / ChatGLM3",
    checkpoints: "`THUDM/chatglm2-6b`, `THUDM/chatglm3-6b`",
    model_types: &["chatglm"],
    gguf_archs: &["chatglm"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("chatglm");
        s.vocab_size = cfg.usize_any(&["padded_vocab_size", "vocab_size"])?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize("num_layers")?;
        s.max_positions = cfg.usize("seq_length")?;
        let eps = cfg.f64_or("layernorm_epsilon", 1e-5)?;
        if !cfg.bool_or("rmsnorm", true)? {
            return Err(cfg.err("ChatGLM with LayerNorm (rmsnorm = false) is not supported"));
        }
        if cfg.bool_or("apply_residual_connection_post_layernorm", false)? {
            return Err(cfg.err("apply_residual_connection_post_layernorm = true is not supported"));
        }
        s.norm = NormSpec::rms(eps);
        s.final_norm = cfg.bool_or("post_layer_norm", true)?;
        let heads = cfg.usize("num_attention_heads")?;
        let kv = if cfg.bool_or("multi_query_attention", false)? {
            cfg.usize("multi_query_group_num")?
        } else {
            heads
        };
        s.set_heads(heads, kv).map_err(|m| cfg.err(m))?;
        if let Some(d) = cfg.opt_usize("kv_channels")? {
            s.attention.head_dim = d;
        }
        s.attention.qkv_layout = QkvLayout::Fused;
        s.attention.qkv_bias = cfg.bool_or("add_qkv_bias", true)?;
        s.attention.out_bias = cfg.bool_or("add_bias_linear", false)?;
        s.mlp.bias = s.attention.out_bias;
        s.mlp.hidden = cfg.usize("ffn_hidden_size")?;
        s.mlp.fused_gate_up = true;
        // GLM-4 style configs scale the base; ChatGLM2/3 have no `rope_ratio`.
        let theta = 10000.0 * cfg.f64_or("rope_ratio", 1.0)?;
        s.positions = Positions::Rotary(RotarySpec::new(theta, 0.5, true));
        s.tied_head = false;
        Ok(s)
    },
    from_gguf: Some(|g| {
        let mut s = llama_style_gguf(g, "chatglm")?;
        s.attention.qkv_layout = QkvLayout::Fused;
        s.attention.qkv_bias = true;
        s.mlp.fused_gate_up = true;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.embedding.word_embeddings"),
        (
            "blk.{i}.attn_norm",
            "transformer.encoder.layers.{i}.input_layernorm",
        ),
        (
            "blk.{i}.attn_qkv",
            "transformer.encoder.layers.{i}.self_attention.query_key_value",
        ),
        (
            "blk.{i}.attn_output",
            "transformer.encoder.layers.{i}.self_attention.dense",
        ),
        (
            "blk.{i}.ffn_norm",
            "transformer.encoder.layers.{i}.post_attention_layernorm",
        ),
        (
            "blk.{i}.ffn_up",
            "transformer.encoder.layers.{i}.mlp.dense_h_to_4h",
        ),
        (
            "blk.{i}.ffn_down",
            "transformer.encoder.layers.{i}.mlp.dense_4h_to_h",
        ),
        ("output_norm", "transformer.encoder.final_layernorm"),
        ("output", "transformer.output_layer"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter keeps ChatGLM's fused QKV and fused gate/up tensors as they are.
pub static CHATGLM_EXPORT: GgufExport = GgufExport {
    family: "chatglm",
    arch: "chatglm",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
