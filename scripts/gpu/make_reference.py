#!/usr/bin/env python3
"""A 1B-shape LLaMA (TinyLlama 1.1B: 22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632,
vocabulary 32000) with random weights, made with this machine's transformers, saved as an HF
directory with `reference.json` in the parity fixtures' format: 16 prompt ids, their f32
logits, and 64 greedy tokens from `generate` in f32 (TF32 off). camelid's ignored parity test
`external_reference` checks it (`CAMELID_PARITY_DIR=DIR`).

    python3 scripts/gpu/make_reference.py DIR
"""

import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    out = sys.argv[1]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(dev):
        model = LlamaForCausalLM(config).float().eval()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (1, 16), generator=g).to(dev)
    with torch.no_grad():
        logits = model(ids).logits[0].float().cpu()
        greedy = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=64,
            min_new_tokens=64,
            pad_token_id=0,
        )[0, ids.shape[1]:].tolist()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    top2 = logits.topk(2, dim=-1).values
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(
            {
                "ids": ids[0].tolist(),
                "logits": logits.tolist(),
                "greedy": greedy,
                "dtype_note": f"f32 on {dev}, TF32 off, torch {torch.__version__}",
                "smallest_top2_gap": float((top2[:, 0] - top2[:, 1]).min()),
            },
            f,
        )
    print(f"{out}: 16 ids, 64 greedy tokens, smallest top-2 logit gap over the prompt "
          f"{float((top2[:, 0] - top2[:, 1]).min()):.3e}")


if __name__ == "__main__":
    main()
