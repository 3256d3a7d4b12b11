//! GPT-J: one LayerNorm feeding attention and MLP in parallel, interleaved rotary on the first
//! `rotary_dim` channels of each head, a biased output head.

use super::{activation, classic_gguf, gguf_rotary, llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{Activation, ArchSpec, MlpSpec, NormSpec, Positions, Residual, RotarySpec};

pub static GPTJ: Family = Family {
    name: "gptj",
    title: "GPT-J",
    checkpoints: "`EleutherAI/gpt-j-6b`",
    model_types: &["gptj"],
    gguf_archs: &["gptj"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("gptj");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize_any(&["n_embd", "hidden_size"])?;
        s.layers = cfg.usize_any(&["n_layer", "num_hidden_layers"])?;
        s.max_positions = cfg.usize_any(&["n_positions", "max_position_embeddings"])?;
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_epsilon", 1e-5)?);
        s.residual = Residual::Parallel { shared_norm: true };
        let heads = cfg.usize_any(&["n_head", "num_attention_heads"])?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        let rotary_dim = cfg.opt_usize("rotary_dim")?.unwrap_or(a.head_dim);
        s.positions = Positions::Rotary(RotarySpec::new(
            10000.0,
            rotary_dim as f64 / a.head_dim as f64,
            true,
        ));
        s.mlp = MlpSpec::new(
            cfg.opt_usize("n_inner")?.unwrap_or(4 * s.hidden),
            activation(cfg, "activation_function", "gelu_new")?,
            true,
        );
        s.head_bias = true;
        Ok(s)
    },
    // gguf-py's gptj tensor names; llama.cpp 0.3.36 lists the architecture but cannot run it.
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "gptj")?;
        s.positions = gguf_rotary(g, s.attention.head_dim, true);
        s.residual = Residual::Parallel { shared_norm: true };
        s.mlp.activation = Activation::GeluTanh;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.wte"),
        ("blk.{i}.attn_norm", "transformer.h.{i}.ln_1"),
        ("blk.{i}.attn_q", "transformer.h.{i}.attn.q_proj"),
        ("blk.{i}.attn_k", "transformer.h.{i}.attn.k_proj"),
        ("blk.{i}.attn_v", "transformer.h.{i}.attn.v_proj"),
        ("blk.{i}.attn_output", "transformer.h.{i}.attn.out_proj"),
        ("blk.{i}.ffn_up", "transformer.h.{i}.mlp.fc_in"),
        ("blk.{i}.ffn_down", "transformer.h.{i}.mlp.fc_out"),
        ("output_norm", "transformer.ln_f"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};

/// GPT-J's rotary already rotates adjacent pairs (ggml's normal rope): nothing is permuted.
pub static GPTJ_EXPORT: GgufExport = GgufExport {
    family: "gptj",
    arch: "gptj",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: false,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
