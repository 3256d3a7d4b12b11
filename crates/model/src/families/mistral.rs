//! Mistral: the LLaMA layout with GQA and sliding-window attention.

use super::{
    llama_style_config, llama_style_gguf_metadata, Family, GgufExport, LLAMA_TENSOR_NAMES,
};

pub static MISTRAL: Family = Family {
    name: "mistral",
    title: "Mistral",
    checkpoints: "`mistralai/Mistral-7B-v0.1`",
    model_types: &["mistral"],
    gguf_archs: &[],
    from_config: |cfg| {
        let mut s = llama_style_config(cfg, "mistral")?;
        s.attention.sliding_window = cfg.opt_usize("sliding_window")?;
        Ok(s)
    },
    // llama.cpp converts Mistral checkpoints to its `llama` architecture.
    from_gguf: None,
    hf_tensor_names: LLAMA_TENSOR_NAMES,
    hf_transposed: &[],
};

/// llama.cpp writes Mistral as its `llama` architecture, q/k rows permuted as LLaMA's.
pub static MISTRAL_EXPORT: GgufExport = GgufExport {
    family: "mistral",
    arch: "llama",
    permute_qk: true,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
