//! BLOOM / BLOOMZ: ALiBi instead of positions (BLOOM's slopes for any head count), a LayerNorm
//! on the embeddings, fused QKV packed per head, GELU-tanh, tied head.

use super::{activation, classic_gguf, llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{
    Activation, AlibiSlopes, ArchSpec, MlpSpec, NormSpec, Positions, QkvLayout, QkvPacking,
};

pub static BLOOM: Family = Family {
    name: "bloom",
    title: "BLOOM / BLOOMZ",
    checkpoints: "`bigscience/bloom-560m`, `bigscience/bloomz-7b1`",
    model_types: &["bloom"],
    gguf_archs: &["bloom"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("bloom");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize_any(&["hidden_size", "n_embed"])?;
        s.layers = cfg.usize_any(&["n_layer", "num_hidden_layers"])?;
        // ALiBi has no trained length limit; keep the window the config names, or 2048.
        s.max_positions = cfg.opt_usize("seq_length")?.unwrap_or(2048);
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_epsilon", 1e-5)?);
        s.embed_norm = true;
        s.positions = Positions::Alibi {
            max_bias: 8.0,
            slopes: AlibiSlopes::Bloom,
            scaled: false,
        };
        if cfg.bool_or("apply_residual_connection_post_layernorm", false)? {
            return Err(cfg.err("apply_residual_connection_post_layernorm = true is not supported"));
        }
        let heads = cfg.usize_any(&["n_head", "num_attention_heads"])?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_layout = QkvLayout::Fused;
        a.qkv_packing = QkvPacking::PerHead;
        a.qkv_bias = true;
        a.out_bias = true;
        s.mlp = MlpSpec::new(
            4 * s.hidden,
            activation(cfg, "hidden_act", "gelu_new")?,
            true,
        );
        s.tied_head = true;
        Ok(s)
    },
    // llama.cpp's bloom graph: ALiBi with a fixed maximum bias of 8, the embedding LayerNorm,
    // fused [q | k | v] (the converter reorders BLOOM's per-head packing).
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "bloom")?;
        s.positions = Positions::Alibi {
            max_bias: 8.0,
            slopes: AlibiSlopes::Bloom,
            scaled: false,
        };
        s.embed_norm = true;
        s.attention.qkv_layout = QkvLayout::Fused;
        s.mlp.activation = Activation::GeluTanh;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.word_embeddings|word_embeddings"),
        (
            "token_embd_norm",
            "transformer.word_embeddings_layernorm|word_embeddings_layernorm",
        ),
        (
            "blk.{i}.attn_norm",
            "transformer.h.{i}.input_layernorm|h.{i}.input_layernorm",
        ),
        (
            "blk.{i}.attn_qkv",
            "transformer.h.{i}.self_attention.query_key_value|h.{i}.self_attention.query_key_value",
        ),
        (
            "blk.{i}.attn_output",
            "transformer.h.{i}.self_attention.dense|h.{i}.self_attention.dense",
        ),
        (
            "blk.{i}.ffn_norm",
            "transformer.h.{i}.post_attention_layernorm|h.{i}.post_attention_layernorm",
        ),
        (
            "blk.{i}.ffn_up",
            "transformer.h.{i}.mlp.dense_h_to_4h|h.{i}.mlp.dense_h_to_4h",
        ),
        (
            "blk.{i}.ffn_down",
            "transformer.h.{i}.mlp.dense_4h_to_h|h.{i}.mlp.dense_4h_to_h",
        ),
        ("output_norm", "transformer.ln_f|ln_f"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter reorders the per-head QKV rows to `[q | k | v]`.
pub static BLOOM_EXPORT: GgufExport = GgufExport {
    family: "bloom",
    arch: "bloom",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
