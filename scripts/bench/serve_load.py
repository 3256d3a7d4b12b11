"""Load generator for OpenAI-compatible servers (camelid serve, llama-server): C concurrent
clients each send R streaming /v1/completions requests (distinct prompts, `max_tokens` N with
`ignore_eos`, greedy) and the script reports aggregate output tokens/s and p50/p99 time to first
token. Standard library only.

    python3 scripts/bench/serve_load.py --url http://127.0.0.1:8080 --model NAME \
        --concurrency 1,8,32,64 --requests 2 --max-tokens 64
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse

WORDS = ("river stone lantern orchard copper meadow harbor violin thunder pepper candle "
         "glacier mosaic falcon saddle quartz").split()


def prompt(i):
    w = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12)]
    return f"Request {i}: write a story about " + " and ".join(w) + "."


def one(url, model, i, max_tokens):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt(i), "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]}")
    ttft = None
    chunks = 0
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("choices") and ev["choices"][0].get("text"):
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
    conn.close()
    return ttft if ttft is not None else time.perf_counter() - t0


def run(url, model, clients, requests, max_tokens):
    ttfts, errors = [], []
    lock = threading.Lock()

    def client(c):
        for r in range(requests):
            try:
                t = one(url, model, c * 1000 + r, max_tokens)
                with lock:
                    ttfts.append(t)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")
    return {"clients": clients, "requests": len(ttfts), "errors": len(errors),
            "tok_per_s": len(ttfts) * max_tokens / wall, "ttft_p50": pick(0.5),
            "ttft_p99": pick(0.99), "wall_s": wall, "first_error": errors[0] if errors else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    one(a.url, a.model, 999999, 4)  # warm-up
    for c in [int(x) for x in a.concurrency.split(",")]:
        print(json.dumps(run(a.url, a.model, c, a.requests, a.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
