#!/usr/bin/env python3
"""PyTorch reference for `camelid train` throughput: the same GPT-2-shaped model (4 layers,
4 heads, 128 wide, context 64, GPT-2 initialization), batch 12 x 64 from the same camelid
shard, AdamW with clipping, float32 on the CPU, eager mode. Prints tokens/s over the steps
after a few warm-up steps.

    /work/cache/venv/bin/python scripts/bench/train_torch.py DATA/train.bin [steps] [threads]
"""

import sys
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

path = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
torch.set_num_threads(threads)
torch.manual_seed(1337)

raw = np.fromfile(path, dtype=np.uint8)
assert raw[:8].tobytes() == b"CMLDTOK1", "not a camelid shard"
width = int(raw[12:16].view("<u4")[0])
vocab = int(raw[16:20].view("<u4")[0])
tokens = raw[32:].view("<u2" if width == 2 else "<u4").astype(np.int64)

cfg = GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
cfg._attn_implementation = "eager"
model = GPT2LMHeadModel(cfg).train()
decay = [p for p in model.parameters() if p.dim() == 2]
rest = [p for p in model.parameters() if p.dim() != 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                         {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
rng = np.random.default_rng(0)
batch, seq, warm = 12, 64, 5
t0 = None
for step in range(steps + warm):
    if step == warm:
        t0 = time.perf_counter()
    starts = rng.integers(0, len(tokens) - seq - 1, batch)
    x = torch.tensor(np.stack([tokens[s:s + seq] for s in starts]))
    y = torch.tensor(np.stack([tokens[s + 1:s + seq + 1] for s in starts]))
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), y.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
dt = time.perf_counter() - t0
print(f"torch {torch.__version__}, {threads} thread(s): {steps} steps in {dt:.1f}s, "
      f"{steps * batch * seq / dt:.0f} tokens/s, {dt / steps * 1000:.0f} ms/step, last loss {loss.item():.3f}")
