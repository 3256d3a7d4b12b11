//! Baichuan-7B / 13B and Baichuan2: the LLaMA layout with q, k and v fused into `W_pack`.
//! The 13B models replace rotary with ALiBi (their configs have no `max_position_embeddings`;
//! llama.cpp decides by the 40-layer count), and Baichuan2 normalizes the head's rows
//! (NormHead), which camelid does at load.

use super::{llama_style_gguf_metadata, Family, GgufExport};
use crate::spec::{AlibiSlopes, Positions, QkvLayout};

const ALIBI: Positions = Positions::Alibi {
    max_bias: 8.0,
    slopes: AlibiSlopes::Bloom,
    scaled: false,
};

pub static BAICHUAN: Family = Family {
    name: "baichuan",
    title: "Baichuan-7B / 13B, Baichuan2",
    checkpoints: "`baichuan-inc/Baichuan-7B`, `baichuan-inc/Baichuan-13B-Chat`, `baichuan-inc/Baichuan2-7B-Chat`",
    model_types: &["baichuan"],
    gguf_archs: &["baichuan"],
    from_config: |cfg| {
        let mut s = super::llama_style_config(cfg, "baichuan")?;
        s.attention.qkv_layout = QkvLayout::Fused;
        if cfg.get("max_position_embeddings").is_none() {
            s.positions = ALIBI;
            s.max_positions = cfg.opt_usize("model_max_length")?.unwrap_or(4096);
        }
        // Baichuan2 checkpoints store the head unnormalized; its config marks it with
        // `z_loss_weight` (and a 125696-token vocabulary).
        s.normalize_head_rows = cfg.get("z_loss_weight").is_some() || s.vocab_size == 125696;
        Ok(s)
    },
    // llama.cpp splits W_pack into q/k/v (and normalizes Baichuan2's head) when converting.
    from_gguf: Some(|g| {
        let mut s = super::llama_style_gguf(g, "baichuan")?;
        if s.layers == 40 {
            s.positions = ALIBI;
        }
        Ok(s)
    }),
    hf_tensor_names: &[
        ("token_embd", "model.embed_tokens"),
        ("blk.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
        ("blk.{i}.attn_qkv", "model.layers.{i}.self_attn.W_pack"),
        ("blk.{i}.attn_output", "model.layers.{i}.self_attn.o_proj"),
        ("blk.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
        ("blk.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj"),
        ("blk.{i}.ffn_up", "model.layers.{i}.mlp.up_proj"),
        ("blk.{i}.ffn_down", "model.layers.{i}.mlp.down_proj"),
        ("output_norm", "model.norm"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};

/// llama.cpp's converter splits `W_pack` into q, k and v and permutes q/k rows for pair-wise
/// rotary (also for the ALiBi 13B, where the same permutation of q and k leaves scores as they
/// are); Baichuan2's head is written normalized.
pub static BAICHUAN_EXPORT: GgufExport = GgufExport {
    family: "baichuan",
    arch: "baichuan",
    permute_qk: true,
    split_qkv: true,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    // llama.cpp's baichuan graph picks rotary by a 32-layer count and ALiBi by 40; at other
    // depths it applies no positions at all (camelid reads the file as the checkpoint is).
    adapt: Some(|s| {
        (!matches!(s.layers, 32 | 40)).then(|| {
            (
                s.clone(),
                format!(
                    "llama.cpp's baichuan graph applies positions only to 32-layer (rotary) and 40-layer (ALiBi) models; with {} layers llama.cpp runs this file without positions, camelid as the checkpoint",
                    s.layers
                ),
            )
        })
    }),
};
