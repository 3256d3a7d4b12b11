//! camelid-native checkpoints: what `camelid train` writes for designs no transformers
//! architecture can hold (PaLM's parallel MQA SwiGLU block without biases, LaMDA's gated GELU
//! with T5 relative positions, GLM's post-norm GeGLU, ...). `config.json` carries the
//! [`ArchSpec`] itself under `camelid_spec`; the safetensors use camelid's canonical tensor
//! names. transformers cannot load these: it has no class for the design.

use super::Family;
use crate::spec::ArchSpec;

pub static CAMELID: Family = Family {
    name: "camelid",
    title: "camelid-native (trained by `camelid train`)",
    checkpoints:
        "`camelid train --preset palm-540b ...` and other designs without a transformers class",
    model_types: &["camelid"],
    gguf_archs: &[],
    from_config: |cfg| {
        let spec = cfg
            .get("camelid_spec")
            .ok_or_else(|| cfg.err("missing \"camelid_spec\""))?;
        let spec: ArchSpec = serde_json::from_value(spec.clone())
            .map_err(|e| cfg.err(format!("invalid \"camelid_spec\": {e}")))?;
        spec.validate().map_err(|m| cfg.err(m))?;
        Ok(spec)
    },
    from_gguf: None,
    hf_tensor_names: &[
        ("token_embd", "token_embd"),
        ("position_embd", "position_embd"),
        ("token_embd_norm", "token_embd_norm"),
        ("proj_in", "proj_in"),
        ("proj_out", "proj_out"),
        ("blk.{i}.attn_norm", "blk.{i}.attn_norm"),
        ("blk.{i}.attn_q", "blk.{i}.attn_q"),
        ("blk.{i}.attn_k", "blk.{i}.attn_k"),
        ("blk.{i}.attn_v", "blk.{i}.attn_v"),
        ("blk.{i}.attn_qkv", "blk.{i}.attn_qkv"),
        ("blk.{i}.attn_q_norm", "blk.{i}.attn_q_norm"),
        ("blk.{i}.attn_k_norm", "blk.{i}.attn_k_norm"),
        ("blk.{i}.attn_output", "blk.{i}.attn_output"),
        ("blk.{i}.attn_rel_b", "blk.{i}.attn_rel_b"),
        ("blk.{i}.ffn_norm", "blk.{i}.ffn_norm"),
        ("blk.{i}.ffn_gate", "blk.{i}.ffn_gate"),
        ("blk.{i}.ffn_up", "blk.{i}.ffn_up"),
        ("blk.{i}.ffn_down", "blk.{i}.ffn_down"),
        ("output_norm", "output_norm"),
        ("output", "output"),
    ],
    hf_transposed: &[],
};
