//! LLaMA / LLaMA-2 / LLaMA-3 and their fine-tunes (Alpaca, Vicuna, BELLE, SmolLM2, TinyLlama):
//! pre-RMSNorm, rotary, SwiGLU, optional GQA. The reference shape every other family departs from.

use super::{
    llama_style_config, llama_style_gguf, llama_style_gguf_metadata, Family, GgufExport,
    LLAMA_TENSOR_NAMES,
};

pub static LLAMA: Family = Family {
    name: "llama",
    title: "LLaMA / LLaMA-2 / LLaMA-3 (Alpaca, Vicuna, BELLE, SmolLM2, TinyLlama)",
    checkpoints:
        "`meta-llama/Llama-2-7b-hf`, `lmsys/vicuna-7b-v1.5`, `HuggingFaceTB/SmolLM2-135M-Instruct`",
    model_types: &["llama"],
    gguf_archs: &["llama"],
    from_config: |cfg| llama_style_config(cfg, "llama"),
    from_gguf: Some(|g| llama_style_gguf(g, "llama")),
    hf_tensor_names: LLAMA_TENSOR_NAMES,
    hf_transposed: &[],
};

/// llama.cpp's converter permutes q/k rows for its pair-wise rotary.
pub static LLAMA_EXPORT: GgufExport = GgufExport {
    family: "llama",
    arch: "llama",
    permute_qk: true,
    split_qkv: false,
    llama_cpp: true,
    renamed: &[],
    metadata: llama_style_gguf_metadata,
    adapt: None,
};
