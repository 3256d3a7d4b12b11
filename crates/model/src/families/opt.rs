//! OPT / OPT-IML: learned positions stored with an offset of 2, ReLU, pre- or post-LayerNorm
//! (`do_layer_norm_before`; opt-350m is post), and narrower embeddings with
//! `project_in` / `project_out` when `word_embed_proj_dim` differs from the hidden size.

use super::{
    activation, activation_key, classic_gguf, gguf_activation, llama_style_gguf_metadata, Family,
    GgufExport,
};
use crate::spec::{Activation, ArchSpec, MlpSpec, NormPlacement, NormSpec, Positions};
use candle_core::quantized::gguf_file::Value;

pub static OPT: Family = Family {
    name: "opt",
    title: "OPT / OPT-IML",
    checkpoints: "`facebook/opt-125m`, `facebook/opt-350m`, `facebook/opt-iml-1.3b`",
    model_types: &["opt"],
    gguf_archs: &["camelid.opt"],
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
    // camelid's own architecture (llama.cpp has no OPT graph): the classic keys plus the
    // position offset, the norm placement, the embedding projection width and the activation.
    from_gguf: Some(|g| {
        let mut s = classic_gguf(g, "opt")?;
        s.positions = Positions::Learned {
            offset: g.opt_u64("position_offset").unwrap_or(0) as usize,
        };
        s.norm_placement = match g.opt_str("norm_placement") {
            Some("post") => NormPlacement::Post,
            _ => NormPlacement::Pre,
        };
        s.final_norm = g.has_tensor("output_norm.weight");
        s.embed_dim = g.opt_u64("embedding_proj_length").map(|v| v as usize);
        s.mlp.activation = gguf_activation(g, Activation::Relu)?;
        Ok(s)
    }),
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

/// Written under camelid's own `camelid.opt` architecture; tensors keep their canonical names.
pub static OPT_EXPORT: GgufExport = GgufExport {
    family: "opt",
    arch: "camelid.opt",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: false,
    renamed: &[],
    metadata: |s, arch| {
        let Positions::Learned { offset } = s.positions else {
            return Err(crate::error::ModelError::Input(
                "opt: only learned positions are written".into(),
            ));
        };
        let mut plain = s.clone();
        plain.positions = Positions::Learned { offset: 0 };
        let mut m = llama_style_gguf_metadata(&plain, arch)?;
        let k = |key: &str| format!("{arch}.{key}");
        m.push((k("position_offset"), Value::U32(offset as u32)));
        let placement = match s.norm_placement {
            NormPlacement::Pre => "pre",
            NormPlacement::Post => "post",
        };
        m.push((k("norm_placement"), Value::String(placement.into())));
        if let Some(e) = s.embed_dim {
            m.push((k("embedding_proj_length"), Value::U32(e as u32)));
        }
        m.push(activation_key(s, arch)?);
        Ok(m)
    },
    adapt: None,
};
