//! Baichuan-7B: the LLaMA layout with q, k and v fused into one `W_pack` projection.
//! (Baichuan-13B and Baichuan2's ALiBi and NormHead variants come with the families issue.)

use super::Family;
use crate::spec::QkvLayout;

pub static BAICHUAN: Family = Family {
    name: "baichuan",
    title: "Baichuan-7B",
    checkpoints: "`baichuan-inc/Baichuan-7B`",
    model_types: &["baichuan"],
    gguf_archs: &["baichuan"],
    from_config: |cfg| {
        let mut s = super::llama_style_config(cfg, "baichuan")?;
        s.attention.qkv_layout = QkvLayout::Fused;
        Ok(s)
    },
    // llama.cpp splits W_pack into q/k/v when converting, so its files read like LLaMA's.
    from_gguf: Some(|g| super::llama_style_gguf(g, "baichuan")),
    hf_tensor_names: &[
        ("token_embd", "model.embed_tokens"),
        ("blk.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
        ("blk.{i}.attn_qkv", "model.layers.{i}.self_attn.W_pack"),
        ("blk.{i}.attn_output", "model.layers.{i}.self_attn.o_proj"),
        (
            "blk.{i}.ffn_norm",
            "model.layers.{i}.post_attention_layernorm",
        ),
        ("blk.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj"),
        ("blk.{i}.ffn_up", "model.layers.{i}.mlp.up_proj"),
        ("blk.{i}.ffn_down", "model.layers.{i}.mlp.down_proj"),
        ("output_norm", "model.norm"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};
