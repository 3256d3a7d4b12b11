"""Recomputes the log-likelihoods that lm-evaluation-harness got from `camelid serve` with
another implementation running the same GGUF file, and compares them choice by choice and as
accuracy:

- `llama_cpp` (default): llama.cpp through the llama-cpp-python bindings, the same quantized
  arithmetic (activations rounded to 8 bits) in another code base;
- `transformers`: the GGUF's weights dequantized to f32 in PyTorch (no activation rounding;
  slow on 2 cores, so pass DOCS).

    python scripts/lmeval/crosscheck.py SAMPLES.jsonl GGUF TOKENIZER_DIR [DOCS] [BACKEND]

SAMPLES.jsonl is lm_eval's `--log_samples` output for the task; TOKENIZER_DIR the tokenizer
lm_eval used; DOCS limits the check to the first DOCS documents (0: all). Not in CI.
"""

import json
import math
import sys

from transformers import AutoTokenizer


def llama_cpp_scorer(gguf):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, logits_all=True, n_ctx=512, n_threads=1,
                          verbose=False)

    def score(ids, ctxlen):
        llm.reset()
        llm.eval(ids)
        total = 0.0
        for pos in range(ctxlen, len(ids)):
            row = llm.scores[pos - 1]
            m = float(row.max())
            lse = m + math.log(sum_exp(row, m))
            total += float(row[ids[pos]]) - lse
        return total

    return score


def sum_exp(row, m):
    import numpy as np

    return float(np.exp(row.astype(np.float64) - m).sum())


def transformers_scorer(gguf):
    import torch
    from transformers import AutoModelForCausalLM

    d, f = gguf.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()

    def score(ids, ctxlen):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return sum(logp[pos - 1, ids[pos]].item() for pos in range(ctxlen, len(ids)))

    return score


def main():
    samples_path, gguf, tok_dir = sys.argv[1:4]
    docs = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    backend = sys.argv[5] if len(sys.argv) > 5 else "llama_cpp"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    score = {"llama_cpp": llama_cpp_scorer, "transformers": transformers_scorer}[backend](gguf)
    samples = [json.loads(l) for l in open(samples_path)]
    samples.sort(key=lambda s: int(s["doc_id"]))
    if docs:
        samples = samples[:docs]
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
            ll = score(ctx + whole[len(ctx):], len(ctx))
            server.append(float(resp[0][0]))
            ref.append(ll)
            diff = abs(ll - server[-1])
            worst = max(worst, diff)
            total_abs += diff
            n += 1
        target = int(s["target"])
        pick_s = max(range(len(server)), key=server.__getitem__)
        pick_r = max(range(len(ref)), key=ref.__getitem__)
        right_server += pick_s == target
        right_ref += pick_r == target
        same_pick += pick_s == pick_r
        print(f"doc {s['doc_id']}: worst |diff| so far {worst:.4f}", file=sys.stderr, flush=True)
    print(json.dumps({
        "backend": backend, "docs": len(samples), "choices": n,
        "max_abs_diff_nats": round(worst, 4), "mean_abs_diff_nats": round(total_abs / n, 4),
        "acc_camelid_serve": right_server / len(samples),
        f"acc_{backend}": right_ref / len(samples),
        "same_choice": same_pick / len(samples),
    }))


if __name__ == "__main__":
    main()
