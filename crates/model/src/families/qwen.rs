//! Qwen (v1, "QWen"): the LLaMA recipe with q/k/v fused into a biased `c_attn`, and the
//! SwiGLU halves named `w1` (up) and `w2` (gate, through SiLU) at half of `intermediate_size`.
//! Past `seq_length`, Qwen's own code stretches the context with a dynamic-NTK rotary base
//! (`use_dynamic_ntk`) and log-n query scaling (`use_logn_attn`); both are read as spec fields.

use super::{llama_style_gguf, llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{ArchSpec, NormSpec, Positions, QkvLayout, RopeScaling, RotarySpec};
use candle_core::quantized::gguf_file::Value;

/// Positions Qwen's log-n table covers (`range(1, 32768)`): the window when it stretches.
const STRETCHED_POSITIONS: usize = 32767;

pub static QWEN: Family = Family {
    name: "qwen",
    title: "Qwen (v1)",
    checkpoints: "`Qwen/Qwen-7B`, `Qwen/Qwen-7B-Chat`",
    model_types: &["qwen"],
    gguf_archs: &["qwen"],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("qwen");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize("num_hidden_layers")?;
        let seq_length = cfg.usize_any(&["seq_length", "max_position_embeddings"])?;
        s.max_positions = seq_length.max(cfg.opt_usize("max_position_embeddings")?.unwrap_or(0));
        let dynamic_ntk = cfg.bool_or("use_dynamic_ntk", false)?;
        let logn = cfg.bool_or("use_logn_attn", false)?;
        if dynamic_ntk || logn {
            s.max_positions = s.max_positions.max(STRETCHED_POSITIONS);
        }
        if logn {
            s.attention.logn_queries = Some(seq_length);
        }
        s.norm = NormSpec::rms(cfg.f64_or("layer_norm_epsilon", 1e-6)?);
        let heads = cfg.usize("num_attention_heads")?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        if let Some(kv) = cfg.opt_usize("kv_channels")? {
            s.attention.head_dim = kv;
        }
        s.attention.qkv_layout = QkvLayout::Fused;
        s.attention.qkv_bias = true;
        s.positions = Positions::Rotary(RotarySpec::new(
            cfg.f64_or("rotary_emb_base", 10000.0)?,
            cfg.f64_or("rotary_pct", 1.0)?,
            false,
        ));
        if let (true, Positions::Rotary(r)) = (dynamic_ntk, &mut s.positions) {
            r.scaling = RopeScaling::QwenNtk { seq_length };
        }
        s.mlp.hidden = cfg.usize("intermediate_size")? / 2;
        s.tied_head = cfg.bool_or("tie_word_embeddings", false)?;
        Ok(s)
    },
    from_gguf: Some(|g| {
        let mut s = llama_style_gguf(g, "qwen")?;
        // llama.cpp keeps Qwen's full `intermediate_size` in the metadata.
        s.mlp.hidden /= 2;
        s.attention.qkv_layout = QkvLayout::Fused;
        s.attention.qkv_bias = true;
        if let Positions::Rotary(r) = &mut s.positions {
            r.interleaved = false;
        }
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "transformer.wte"),
        ("blk.{i}.attn_norm", "transformer.h.{i}.ln_1"),
        ("blk.{i}.attn_qkv", "transformer.h.{i}.attn.c_attn"),
        ("blk.{i}.attn_output", "transformer.h.{i}.attn.c_proj"),
        ("blk.{i}.ffn_norm", "transformer.h.{i}.ln_2"),
        ("blk.{i}.ffn_up", "transformer.h.{i}.mlp.w1"),
        ("blk.{i}.ffn_gate", "transformer.h.{i}.mlp.w2"),
        ("blk.{i}.ffn_down", "transformer.h.{i}.mlp.c_proj"),
        ("output_norm", "transformer.ln_f"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter keeps Qwen's tensors (and rotate-half rotary) as they are and writes
/// the full `intermediate_size` as the feed-forward length.
pub static QWEN_EXPORT: GgufExport = GgufExport {
    family: "qwen",
    arch: "qwen",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: |s, arch| {
        let mut m = llama_style_gguf_metadata(s, arch)?;
        let key = format!("{arch}.feed_forward_length");
        for (k, v) in m.iter_mut() {
            if *k == key {
                *v = Value::U32(2 * s.mlp.hidden as u32);
            }
        }
        Ok(m)
    },
    adapt: Some(|s| {
        let Positions::Rotary(r) = &s.positions else {
            return None;
        };
        let seq_length = match (&r.scaling, s.attention.logn_queries) {
            (RopeScaling::QwenNtk { seq_length }, _) => *seq_length,
            (_, Some(n)) => n,
            _ => return None,
        };
        let mut t = s.clone();
        t.attention.logn_queries = None;
        t.max_positions = seq_length;
        if let Positions::Rotary(r) = &mut t.positions {
            r.scaling = RopeScaling::None;
        }
        Some((
            t,
            format!(
                "use_dynamic_ntk / use_logn_attn act only past seq_length {seq_length}; llama.cpp's qwen architecture has neither, so the GGUF holds the model up to {seq_length} tokens"
            ),
        ))
    }),
};
