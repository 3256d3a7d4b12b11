//! Qwen2 / Qwen2.5: the LLaMA layout with biases on q, k and v, usually tied embeddings.

use super::{
    llama_style_config, llama_style_gguf, llama_style_gguf_metadata, Family, GgufExport,
    LLAMA_TENSOR_NAMES,
};

pub static QWEN2: Family = Family {
    name: "qwen2",
    title: "Qwen2 / Qwen2.5",
    checkpoints: "`Qwen/Qwen2.5-0.5B-Instruct`, `Qwen/Qwen2-7B`",
    model_types: &["qwen2"],
    gguf_archs: &["qwen2"],
    from_config: |cfg| {
        let mut s = llama_style_config(cfg, "qwen2")?;
        s.attention.qkv_bias = true;
        s.attention.out_bias = false;
        if cfg.bool_or("use_sliding_window", false)? {
            s.attention.sliding_window = cfg.opt_usize("sliding_window")?;
        }
        Ok(s)
    },
    from_gguf: Some(|g| {
        let mut s = llama_style_gguf(g, "qwen2")?;
        s.attention.qkv_bias = true;
        // llama.cpp keeps Qwen2's q/k rows in HF order (NEOX-style rotary).
        if let crate::spec::Positions::Rotary(r) = &mut s.positions {
            r.interleaved = false;
        }
        Ok(s)
    }),
    hf_tensor_names: LLAMA_TENSOR_NAMES,
    hf_transposed: &[],
};

/// llama.cpp keeps Qwen2's q/k rows in HF order (NEOX-style rotary).
pub static QWEN2_EXPORT: GgufExport = GgufExport {
    family: "qwen2",
    arch: "qwen2",
    permute_qk: false,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
