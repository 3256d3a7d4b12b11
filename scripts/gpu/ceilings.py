#!/usr/bin/env python3
"""The two ceilings of a GPU, measured with PyTorch: device-to-device copy bandwidth (what a
batch-1 decode that reads every weight once per token can reach) and dense bf16 GEMM
throughput (what prefill can reach). Prints JSON.

    python3 scripts/gpu/ceilings.py > ceilings.json
"""

import json
import sys

import torch


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    # Copy: 4 GiB read and 4 GiB written per copy; GB/s counts both (read + write).
    n = 4 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    s = timed(lambda: b.copy_(a), 20)
    out["copy_bytes"] = n
    out["copy_read_plus_write_GBps"] = round(2 * n / s / 1e9, 1)
    del a, b
    # bf16 GEMM, the largest of a few square sizes.
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    best = 0.0
    for m in (8192, 16384):
        x = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
        y = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
        s = timed(lambda: x @ y, 20)
        tflops = 2 * m**3 / s / 1e12
        out[f"gemm_bf16_{m}_TFLOPs"] = round(tflops, 1)
        best = max(best, tflops)
        del x, y
    out["gemm_bf16_TFLOPs"] = round(best, 1)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
