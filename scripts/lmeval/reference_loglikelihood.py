"""Adds llama.cpp's log-likelihood of the recorded lm_eval request to its fixture
(`tests/fixtures/lmeval/loglikelihood_request.json`, key `llama_cpp_loglikelihood`): the
request's token-id prompt run through llama.cpp (llama-cpp-python bindings) on the same GGUF,
summing log-softmax of each continuation token from position `ctxlen` on, as lm_eval does.
`crates/server/tests/lm_eval_request.rs` compares camelid's reply with this value.

    python scripts/lmeval/reference_loglikelihood.py GGUF
"""

import json
import math
import sys

import numpy as np
from llama_cpp import Llama

PATH = "tests/fixtures/lmeval/loglikelihood_request.json"

fixture = json.load(open(PATH))
tokens = json.loads(fixture["request"])["prompt"][0]
ctxlen = fixture["ctxlen"]
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, verbose=False)
llm.eval(tokens)
logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
total = 0.0
for i in range(ctxlen, len(tokens)):
    row = logits[i - 1]
    top = row.max()
    total += row[tokens[i]] - (top + math.log(np.exp(row - top).sum()))
fixture["llama_cpp_loglikelihood"] = total
with open(PATH, "w") as f:
    json.dump(fixture, f, indent=1, ensure_ascii=False)
    f.write("\n")
print(f"llama.cpp log-likelihood {total:.6f} over {len(tokens) - ctxlen} tokens")
