//! OPT / OPT-IML: learned positions stored with an offset of 2, ReLU, pre- or post-LayerNorm
//! (`do_layer_norm_before`; opt-350m is post), and narrower embeddings with
//! `project_in` / `project_out` when `word_embed_proj_dim` differs from the hidden size.

use super::{activation, Family};
use crate::spec::{ArchSpec, MlpSpec, NormPlacement, NormSpec, Positions};

pub static OPT: Family = Family {
    name: "opt",
    title: "OPT / OPT-IML",
    checkpoints: "`facebook/opt-125m`, `facebook/opt-350m`, `facebook/opt-iml-1.3b`",
    model_types: &["opt"],
    gguf_archs: &[],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("opt");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize("num_hidden_layers")?;
        s.max_positions = cfg.usize("max_position_embeddings")?;
        s.norm = NormSpec::layer(1e-5);
        s.positions = Positions::Learned { offset: 2 };
        let pre = cfg.bool_or("do_layer_norm_before", true)?;
        s.norm_placement = if pre {
            NormPlacement::Pre
        } else {
            NormPlacement::Post
        };
        s.final_norm = pre && !cfg.bool_or("_remove_final_layer_norm", false)?;
        let proj = cfg.opt_usize("word_embed_proj_dim")?.unwrap_or(s.hidden);
        s.embed_dim = (proj != s.hidden).then_some(proj);
        let bias = cfg.bool_or("enable_bias", true)?;
        let heads = cfg.usize("num_attention_heads")?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_bias = bias;
        a.out_bias = bias;
        s.mlp = MlpSpec::new(
            cfg.usize("ffn_dim")?,
            activation(cfg, "activation_function", "relu")?,
            bias,
        );
        s.tied_head = cfg.bool_or("tie_word_embeddings", true)?;
        Ok(s)
    },
    from_gguf: None,
    hf_tensor_names: &[
        ("token_embd", "model.decoder.embed_tokens"),
        ("position_embd", "model.decoder.embed_positions"),
        ("proj_in", "model.decoder.project_in"),
        ("proj_out", "model.decoder.project_out"),
        (
            "blk.{i}.attn_norm",
            "model.decoder.layers.{i}.self_attn_layer_norm",
        ),
        (
            "blk.{i}.attn_q",
            "model.decoder.layers.{i}.self_attn.q_proj",
        ),
        (
            "blk.{i}.attn_k",
            "model.decoder.layers.{i}.self_attn.k_proj",
        ),
        (
            "blk.{i}.attn_v",
            "model.decoder.layers.{i}.self_attn.v_proj",
        ),
        (
            "blk.{i}.attn_output",
            "model.decoder.layers.{i}.self_attn.out_proj",
        ),
        (
            "blk.{i}.ffn_norm",
            "model.decoder.layers.{i}.final_layer_norm",
        ),
        ("blk.{i}.ffn_up", "model.decoder.layers.{i}.fc1"),
        ("blk.{i}.ffn_down", "model.decoder.layers.{i}.fc2"),
        ("output_norm", "model.decoder.final_layer_norm"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};
