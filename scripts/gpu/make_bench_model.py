#!/usr/bin/env python3
"""A random-weight LLaMA-architecture model for the GPU benchmarks, saved as an HF directory
in f16 with LLaMA's tokenizer.model beside it, for llama.cpp's convert_hf_to_gguf.py:

    1.1b: TinyLlama shape: 22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632
    7.2b: Llama-3-8B dimensions with a 32000 vocabulary: 32 layers, hidden 4096, 32 heads,
          8 KV heads, FFN 14336

    python3 scripts/gpu/make_bench_model.py {1.1b|7.2b} DIR TOKENIZER_MODEL
"""

import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "1.1b": dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632),
    "7.2b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336),
}


def main():
    shape, out, tokenizer = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, **SHAPES[shape])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(dev):
        model = LlamaForCausalLM(config).half()
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer, os.path.join(out, "tokenizer.model"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
