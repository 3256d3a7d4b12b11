//! GPT-NeoX / Pythia: fused QKV packed per head, partial rotary (`rotary_pct`), parallel or
//! sequential residual with two LayerNorms.

use super::{
    activation, classic_gguf, gguf_rotary, llama_style_gguf_metadata, rope_scaling, Family,
    GgufExport,
};
use crate::spec::{
    ArchSpec, MlpSpec, NormSpec, Positions, QkvLayout, QkvPacking, Residual, RotarySpec,
};
use candle_core::quantized::gguf_file::Value;

pub static GPT_NEOX: Family = Family {
    name: "gpt_neox",
    title: "GPT-NeoX / Pythia",
    checkpoints: "`EleutherAI/gpt-neox-20b`, `EleutherAI/pythia-160m`",
    model_types: &["gpt_neox"],
    gguf_archs: &["gptneox"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("gpt_neox");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize("num_hidden_layers")?;
        s.max_positions = cfg.usize("max_position_embeddings")?;
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_eps", 1e-5)?);
        s.residual = if cfg.bool_or("use_parallel_residual", true)? {
            Residual::Parallel { shared_norm: false }
        } else {
            Residual::Sequential
        };
        let bias = cfg.bool_or("attention_bias", true)?;
        let heads = cfg.usize("num_attention_heads")?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_layout = QkvLayout::Fused;
        a.qkv_packing = QkvPacking::PerHead;
        a.qkv_bias = bias;
        a.out_bias = bias;
        let theta = match cfg.opt_f64("rotary_emb_base")? {
            Some(t) => t,
            None => cfg.f64_or("rope_theta", 10000.0)?,
        };
        s.positions = Positions::Rotary(RotarySpec {
            theta,
            fraction: cfg.f64_or("rotary_pct", 0.25)?,
            interleaved: false,
            scaling: rope_scaling(cfg, s.max_positions)?,
        });
        s.mlp = MlpSpec::new(
            cfg.usize("intermediate_size")?,
            activation(cfg, "hidden_act", "gelu")?,
            true,
        );
        s.tied_head = cfg.bool_or("tie_word_embeddings", false)?;
        Ok(s)
    },
    // llama.cpp's gptneox graph: fused [q | k | v] (the converter reorders Pythia's per-head
    // packing), rotate-half rotary on `rope.dimension_count` channels, a separate head.
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "gpt_neox")?;
        s.positions = gguf_rotary(g, s.attention.head_dim, false);
        s.attention.qkv_layout = QkvLayout::Fused;
        let parallel = g
            .meta
            .get("gptneox.use_parallel_residual")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        s.residual = if parallel {
            Residual::Parallel { shared_norm: false }
        } else {
            Residual::Sequential
        };
        s.tied_head = false;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "gpt_neox.embed_in"),
        ("blk.{i}.attn_norm", "gpt_neox.layers.{i}.input_layernorm"),
        (
            "blk.{i}.attn_qkv",
            "gpt_neox.layers.{i}.attention.query_key_value",
        ),
        ("blk.{i}.attn_output", "gpt_neox.layers.{i}.attention.dense"),
        (
            "blk.{i}.ffn_norm",
            "gpt_neox.layers.{i}.post_attention_layernorm",
        ),
        ("blk.{i}.ffn_up", "gpt_neox.layers.{i}.mlp.dense_h_to_4h"),
        ("blk.{i}.ffn_down", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
        ("output_norm", "gpt_neox.final_layer_norm"),
        ("output", "embed_out"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter reorders the per-head QKV rows to `[q | k | v]` and writes
/// `use_parallel_residual`.
pub static GPT_NEOX_EXPORT: GgufExport = GgufExport {
    family: "gpt_neox",
    arch: "gptneox",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: |s, arch| {
        let mut m = llama_style_gguf_metadata(s, arch)?;
        m.push((
            format!("{arch}.use_parallel_residual"),
            Value::Bool(matches!(s.residual, Residual::Parallel { .. })),
        ));
        Ok(m)
    },
    adapt: None,
};
