"""Recomputes the log-likelihoods that lm-evaluation-harness got from `camelid serve`, with
transformers running the same GGUF file (its weights dequantized to f32), and compares them
choice by choice and as accuracy.

    python scripts/lmeval/crosscheck.py SAMPLES.jsonl GGUF TOKENIZER_DIR [DOCS]

SAMPLES.jsonl is lm_eval's `--log_samples` output for the task; TOKENIZER_DIR the tokenizer
lm_eval used; DOCS limits the check to the first DOCS documents. Needs torch, transformers and gguf (not in CI).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    samples_path, gguf, tok_dir = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    d, f = gguf.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    print("model loaded", file=sys.stderr, flush=True)
    samples = [json.loads(l) for l in open(samples_path)]
    samples.sort(key=lambda s: int(s["doc_id"]))
    if len(sys.argv) > 4:
        samples = samples[: int(sys.argv[4])]
    worst, total_abs, n = 0.0, 0.0, 0
    right_server, right_ref, same_pick = 0, 0, 0
    for s in samples:
        server, ref = [], []
        args = s["arguments"]
        if isinstance(args, dict):  # {"gen_args_0": {...}, ...} in lm_eval 0.4.x
            args = [args[f"gen_args_{i}"] for i in range(len(args))]
        for arg, resp in zip(args, s["resps"]):
            context, continuation = arg["arg_0"], arg["arg_1"]
            # lm-eval's split (`_encode_pair`): trailing whitespace moves from the context to
            # the continuation; the context's tokens, then the rest of the joint encoding.
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            whole = tok(context + continuation, add_special_tokens=False).input_ids
            ctx = tok(context, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            ll = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            server.append(float(resp[0][0]))
            ref.append(ll)
            diff = abs(ll - server[-1])
            worst = max(worst, diff)
            total_abs += diff
            n += 1
        target = int(s["target"])
        print(f"{len(server)} choices of doc {s['doc_id']}", file=sys.stderr, flush=True)
        pick_s = max(range(len(server)), key=server.__getitem__)
        pick_r = max(range(len(ref)), key=ref.__getitem__)
        right_server += pick_s == target
        right_ref += pick_r == target
        same_pick += pick_s == pick_r
    print(json.dumps({
        "docs": len(samples), "choices": n,
        "max_abs_diff_nats": round(worst, 4), "mean_abs_diff_nats": round(total_abs / n, 4),
        "acc_camelid_serve": right_server / len(samples),
        "acc_transformers": right_ref / len(samples),
        "same_choice": same_pick / len(samples),
    }))


if __name__ == "__main__":
    main()
