//! MPT: ALiBi (MPT's slopes), no biases anywhere (LayerNorms included), fused `Wqkv`,
//! optional `clip_qkv` and QK LayerNorm, tied head.

use super::{activation, llama_style_gguf_metadata, Family, GgufExport};
use crate::error::ModelError;
use crate::spec::{Activation, AlibiSlopes, ArchSpec, MlpSpec, NormSpec, Positions, QkvLayout};

pub static MPT: Family = Family {
    name: "mpt",
    title: "MPT",
    checkpoints: "`mosaicml/mpt-7b`, `mosaicml/mpt-7b-instruct`",
    model_types: &["mpt"],
    gguf_archs: &["mpt"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("mpt");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("d_model")?;
        s.layers = cfg.usize("n_layers")?;
        s.max_positions = cfg.usize("max_seq_len")?;
        let mut norm = NormSpec::layer(cfg.f64_or("layer_norm_epsilon", 1e-5)?);
        norm.bias = !cfg.bool_or("no_bias", true)?;
        s.norm = norm;
        let attn = cfg.get("attn_config").cloned().unwrap_or_default();
        let num = |k: &str| attn.get(k).and_then(|v| v.as_f64());
        if attn.get("alibi").and_then(|v| v.as_bool()) == Some(false) {
            return Err(cfg.err("MPT without ALiBi (learned positions) is not supported"));
        }
        s.positions = Positions::Alibi {
            max_bias: num("alibi_bias_max").unwrap_or(8.0),
            slopes: AlibiSlopes::Mpt,
            scaled: false,
        };
        let heads = cfg.usize("n_heads")?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_layout = QkvLayout::Fused;
        a.softmax_scale = num("softmax_scale");
        a.clip_qkv = num("clip_qkv");
        a.qk_norm = attn.get("qk_ln").and_then(|v| v.as_bool()).unwrap_or(false);
        s.mlp = MlpSpec::new(
            cfg.opt_usize("expansion_ratio")?.unwrap_or(4) * s.hidden,
            activation(cfg, "hidden_act", "gelu")?,
            false,
        );
        s.tied_head = true;
        Ok(s)
    },
    // llama.cpp's keys (convert_hf_to_gguf.py, conversion/mpt.py); the QK LayerNorms show only
    // as `attn_q_norm` / `attn_k_norm` tensors.
    from_gguf: Some(|g| {
        let mut s = ArchSpec::llama_like("mpt");
        s.hidden = g.u64("embedding_length")? as usize;
        s.layers = g.u64("block_count")? as usize;
        s.max_positions = g.opt_u64("context_length").unwrap_or(2048) as usize;
        s.vocab_size = g
            .vocab_size()
            .ok_or_else(|| ModelError::format(g.path, "GGUF metadata gives no vocabulary size"))?;
        s.norm = NormSpec::layer(g.opt_f64("attention.layer_norm_epsilon").unwrap_or(1e-5));
        s.norm.bias = g.has_tensor("output_norm.bias");
        let max_bias = g.opt_f64("attention.max_alibi_bias").unwrap_or(0.0);
        if max_bias <= 0.0 || g.has_tensor("position_embd.weight") {
            return Err(ModelError::format(
                g.path,
                "MPT without ALiBi (learned positions) is not supported",
            ));
        }
        s.positions = Positions::Alibi {
            max_bias,
            slopes: AlibiSlopes::Mpt,
            scaled: false,
        };
        let heads = g.u64("attention.head_count")? as usize;
        let kv_heads = g.opt_u64("attention.head_count_kv").unwrap_or(heads as u64) as usize;
        s.set_heads(heads, kv_heads)
            .map_err(|m| ModelError::format(g.path, m))?;
        let a = &mut s.attention;
        a.qkv_layout = QkvLayout::Fused;
        a.qkv_bias = g.has_tensor("blk.0.attn_qkv.bias");
        a.out_bias = g.has_tensor("blk.0.attn_output.bias");
        a.clip_qkv = g.opt_f64("attention.clamp_kqv").filter(|c| *c > 0.0);
        a.qk_norm = g.has_tensor("blk.0.attn_q_norm.weight");
        // MPT's exact GELU (llama.cpp runs the tanh form; they differ by ~1e-3 on inputs of
        // order 1).
        s.mlp = MlpSpec::new(
            g.u64("feed_forward_length")? as usize,
            Activation::Gelu,
            g.has_tensor("blk.0.ffn_up.bias"),
        );
        s.tied_head = !g.has_tensor("output.weight");
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.wte"),
        ("blk.{i}.attn_norm", "transformer.blocks.{i}.norm_1"),
        ("blk.{i}.attn_qkv", "transformer.blocks.{i}.attn.Wqkv"),
        ("blk.{i}.attn_q_norm", "transformer.blocks.{i}.attn.q_ln"),
        ("blk.{i}.attn_k_norm", "transformer.blocks.{i}.attn.k_ln"),
        (
            "blk.{i}.attn_output",
            "transformer.blocks.{i}.attn.out_proj",
        ),
        ("blk.{i}.ffn_norm", "transformer.blocks.{i}.norm_2"),
        ("blk.{i}.ffn_up", "transformer.blocks.{i}.ffn.up_proj"),
        ("blk.{i}.ffn_down", "transformer.blocks.{i}.ffn.down_proj"),
        ("output_norm", "transformer.norm_f"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter keeps MPT's tensors as they are.
pub static MPT_EXPORT: GgufExport = GgufExport {
    family: "mpt",
    arch: "mpt",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
