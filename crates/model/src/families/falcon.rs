//! Falcon: parallel attention and MLP, MQA (7B: one norm, `[q | k | v]`) or GQA with the
//! `new_decoder_architecture` (40B: `ln_attn` + `ln_mlp`, QKV packed per kv group), rotary
//! or an ALiBi variant whose bias is scaled with the scores.

use super::{activation, classic_gguf, gguf_rotary, llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{
    AlibiSlopes, ArchSpec, MlpSpec, NormSpec, Positions, QkvLayout, QkvPacking, Residual,
    RotarySpec,
};

pub static FALCON: Family = Family {
    name: "falcon",
    title: "Falcon",
    checkpoints: "`tiiuae/falcon-7b`, `tiiuae/falcon-40b`, `tiiuae/falcon-rw-1b`",
    model_types: &["falcon", "RefinedWeb", "RefinedWebModel"],
    gguf_archs: &["falcon"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("falcon");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize_any(&["num_hidden_layers", "n_layer"])?;
        s.max_positions = cfg.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_epsilon", 1e-5)?);
        let new_arch = cfg.bool_or("new_decoder_architecture", false)?;
        let multi_query = cfg.bool_or("multi_query", true)?;
        let parallel = cfg.bool_or("parallel_attn", true)?;
        let bias = cfg.bool_or("bias", false)?;
        let heads = cfg.usize_any(&["num_attention_heads", "n_head"])?;
        let (kv_heads, packing) = if new_arch {
            let kv = cfg.opt_usize("num_kv_heads")?.unwrap_or(heads);
            (kv, QkvPacking::PerKvGroup)
        } else if multi_query {
            (1, QkvPacking::Sequential)
        } else {
            (heads, QkvPacking::PerHead)
        };
        s.set_heads(heads, kv_heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_layout = QkvLayout::Fused;
        a.qkv_packing = packing;
        a.qkv_bias = bias;
        a.out_bias = bias;
        let two_norms = new_arch && cfg.opt_usize("num_ln_in_parallel_attn")?.unwrap_or(2) == 2;
        s.residual = match (parallel || new_arch, two_norms) {
            (true, two) => Residual::Parallel { shared_norm: !two },
            (false, _) => Residual::Sequential,
        };
        s.positions = if cfg.bool_or("alibi", false)? {
            Positions::Alibi {
                max_bias: 8.0,
                slopes: AlibiSlopes::Bloom,
                scaled: true,
            }
        } else {
            Positions::Rotary(RotarySpec::new(
                cfg.f64_or("rope_theta", 10000.0)?,
                1.0,
                false,
            ))
        };
        s.mlp = MlpSpec::new(
            cfg.opt_usize("ffn_hidden_size")?.unwrap_or(4 * s.hidden),
            activation(cfg, "activation", "gelu")?,
            bias,
        );
        s.tied_head = cfg.bool_or("tie_word_embeddings", true)?;
        Ok(s)
    },
    // llama.cpp's falcon graph: one norm (two for Falcon-40B) feeding attention and MLP in parallel, rotate-half
    // rotary, [q | k | v] (the converter reorders the per-kv-group packing), no biases.
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "falcon")?;
        s.positions = gguf_rotary(g, s.attention.head_dim, false);
        // Falcon-40B: `attn_norm_2` feeds attention and `attn_norm` the MLP (read under the
        // canonical names through `FALCON_EXPORT.renamed`).
        s.residual = Residual::Parallel {
            shared_norm: !g.has_tensor("blk.0.attn_norm_2.weight"),
        };
        s.attention.qkv_layout = QkvLayout::Fused;
        s.attention.qkv_bias = false;
        s.attention.out_bias = false;
        s.mlp.bias = false;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.word_embeddings"),
        (
            "blk.{i}.attn_norm",
            "transformer.h.{i}.input_layernorm|transformer.h.{i}.ln_attn",
        ),
        (
            "blk.{i}.ffn_norm",
            "transformer.h.{i}.ln_mlp|transformer.h.{i}.post_attention_layernorm",
        ),
        (
            "blk.{i}.attn_qkv",
            "transformer.h.{i}.self_attention.query_key_value",
        ),
        (
            "blk.{i}.attn_output",
            "transformer.h.{i}.self_attention.dense",
        ),
        ("blk.{i}.ffn_up", "transformer.h.{i}.mlp.dense_h_to_4h"),
        ("blk.{i}.ffn_down", "transformer.h.{i}.mlp.dense_4h_to_h"),
        ("output_norm", "transformer.ln_f"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter reorders the per-kv-group QKV rows to `[q | k | v]` (a no-op for
/// Falcon-7B's multi-query `[q | k | v]`).
pub static FALCON_EXPORT: GgufExport = GgufExport {
    family: "falcon",
    arch: "falcon",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[
        ("blk.{i}.attn_norm", "blk.{i}.attn_norm_2"),
        ("blk.{i}.ffn_norm", "blk.{i}.attn_norm"),
    ],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
