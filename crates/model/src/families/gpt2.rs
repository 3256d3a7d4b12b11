//! GPT-2 (and DistilGPT-2): pre-LayerNorm, learned positions, GELU-tanh, fused `c_attn`,
//! tied head. Its Conv1D layers store weights `[in, out]`; the loader transposes them.

use super::{activation, classic_gguf, llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{Activation, ArchSpec, MlpSpec, NormSpec, Positions, QkvLayout};

pub static GPT2: Family = Family {
    name: "gpt2",
    title: "GPT-2",
    checkpoints: "`gpt2`, `gpt2-xl`, `distilgpt2`",
    model_types: &["gpt2"],
    gguf_archs: &["gpt2"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("gpt2");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize_any(&["n_embd", "hidden_size"])?;
        s.layers = cfg.usize_any(&["n_layer", "num_hidden_layers"])?;
        s.max_positions = cfg.usize_any(&["n_positions", "max_position_embeddings"])?;
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_epsilon", 1e-5)?);
        s.positions = Positions::Learned { offset: 0 };
        let heads = cfg.usize_any(&["n_head", "num_attention_heads"])?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_layout = QkvLayout::Fused;
        a.qkv_bias = true;
        a.out_bias = true;
        s.mlp = MlpSpec::new(
            cfg.opt_usize("n_inner")?.unwrap_or(4 * s.hidden),
            activation(cfg, "activation_function", "gelu_new")?,
            true,
        );
        s.tied_head = true;
        Ok(s)
    },
    // llama.cpp's gpt2 graph: learned positions, fused [q | k | v], GELU-tanh, biases.
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "gpt2")?;
        s.positions = Positions::Learned { offset: 0 };
        s.attention.qkv_layout = QkvLayout::Fused;
        s.mlp.activation = Activation::GeluTanh;
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.wte|wte"),
        ("position_embd", "transformer.wpe|wpe"),
        ("blk.{i}.attn_norm", "transformer.h.{i}.ln_1|h.{i}.ln_1"),
        (
            "blk.{i}.attn_qkv",
            "transformer.h.{i}.attn.c_attn|h.{i}.attn.c_attn",
        ),
        (
            "blk.{i}.attn_output",
            "transformer.h.{i}.attn.c_proj|h.{i}.attn.c_proj",
        ),
        ("blk.{i}.ffn_norm", "transformer.h.{i}.ln_2|h.{i}.ln_2"),
        (
            "blk.{i}.ffn_up",
            "transformer.h.{i}.mlp.c_fc|h.{i}.mlp.c_fc",
        ),
        (
            "blk.{i}.ffn_down",
            "transformer.h.{i}.mlp.c_proj|h.{i}.mlp.c_proj",
        ),
        ("output_norm", "transformer.ln_f|ln_f"),
    ],
    hf_transposed: &[
        "blk.{i}.attn_qkv",
        "blk.{i}.attn_output",
        "blk.{i}.ffn_up",
        "blk.{i}.ffn_down",
    ],
};

/// llama.cpp's converter transposes the Conv1D weights (the loader already has) and keeps
/// every other tensor as it is.
pub static GPT2_EXPORT: GgufExport = GgufExport {
    family: "gpt2",
    arch: "gpt2",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
