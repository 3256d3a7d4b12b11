#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU (H100/H200), the CUDA 13 libraries, nvcc,
# cmake, PyTorch and transformers, and no Rust. Everything Rust was built elsewhere by
# scripts/gpu/prepare.sh into target/cuda/device/ (carry that path along). Results go to $OUT
# (default ./gpu-out), one file per check, and a summary.md.
#
#   bash scripts/gpu/device-checks.sh [STAGE...]     # default: every stage, in this order
#
# Stages (each reruns on its own; with rough times on an H100):
#   info        nvidia-smi, driver, library versions, torch/transformers            (seconds)
#   ceilings    device-to-device copy bandwidth and bf16 GEMM (scripts/gpu/ceilings.py) (~20 s)
#   parity      the parity test binaries with CAMELID_TEST_DEVICE=cuda: f32 (<= 1e-3),
#               every case in bf16, llama.cpp families, T5; plus `camelid logits --device cuda`
#               on a fixture against its reference                                     (~1 min)
#   reference   a random 1B-shape LLaMA made by this machine's transformers, 64 greedy tokens
#               in f32 compared (scripts/gpu/make_reference.py + external_reference)   (~2 min)
#   llamacpp    llama.cpp built with CUDA (sm_90) from the carried source             (~5 min)
#   models      the 1.1B and 7.2B random LLaMA models: HF f16 -> GGUF F16 -> Q4_0     (~6 min)
#   bench       llama-bench -ngl 99 -fa 1 and `camelid bench --device cuda`, side by side, on
#               the four GGUF files, with % of the copy-bandwidth roofline            (~5 min)
#
# One device call runs at most 10 minutes: run the stages in several calls, e.g.
#   info ceilings parity reference  |  llamacpp models  |  bench
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEV="$ROOT/target/cuda/device"
WORK="${CAMELID_GPU_WORK:-$ROOT/target/gpu-work}"
OUT="${OUT:-$ROOT/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$WORK" "$OUT"
SUMMARY="$OUT/summary.md"
log() { echo "[device-checks] $*" | tee -a "$OUT/log.txt" >&2; }
note() { echo "$*" >>"$SUMMARY"; }

stages=("$@")
((${#stages[@]})) || stages=(info ceilings parity reference llamacpp models bench)

unpack() {
  if [[ ! -x "$WORK/bin/camelid" ]]; then
    [[ -f "$DEV/camelid-cuda.tar.xz" ]] || { log "no $DEV/camelid-cuda.tar.xz: run scripts/gpu/prepare.sh and carry target/cuda/device"; exit 1; }
    mkdir -p "$WORK/bin"
    "$PY" -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$DEV/camelid-cuda.tar.xz" "$WORK/bin"
  fi
  CAMELID="$WORK/bin/camelid"
}

stage_info() {
  {
    echo "## machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv
    nvidia-smi
    nvcc --version 2>&1 | tail -n2
    ldconfig -p | grep -E 'libcuda\.so|libcublas|libcurand|libnvrtc|libcudart' || true
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    echo "## camelid"
    ldd "$CAMELID"
    "$CAMELID" --version
  } >"$OUT/info.txt" 2>&1
  note "- machine: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
}

stage_ceilings() {
  "$PY" "$ROOT/scripts/gpu/ceilings.py" >"$OUT/ceilings.json" 2>"$OUT/ceilings.err" &&
    note "- ceilings: copy $(jq_get copy_read_plus_write_GBps) GB/s (read+write), bf16 GEMM $(jq_get gemm_bf16_TFLOPs) TFLOP/s" ||
    note "- ceilings: FAILED (ceilings.err)"
}

jq_get() {
  "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$OUT/ceilings.json" "$1" 2>/dev/null || echo "?"
}

stage_parity() {
  export CAMELID_TEST_DEVICE=cuda CAMELID_FIXTURES="$ROOT/tests/fixtures"
  for t in "$WORK"/bin/tests/*; do
    name=$(basename "$t")
    if timeout 300 "$t" --test-threads=1 --nocapture >"$OUT/test-$name.txt" 2>&1; then
      note "- test $name on cuda: $(grep -E '^test result' "$OUT/test-$name.txt" | tail -n1)"
    else
      note "- test $name on cuda: FAILED (test-$name.txt): $(grep -E '^test result|panicked' "$OUT/test-$name.txt" | head -n3 | tr '\n' ' ')"
    fi
  done
  # The binary itself: logits of a parity fixture on the GPU against transformers' f32.
  local fx="$ROOT/tests/fixtures/parity/llama_gqa_sharded_f16"
  local ids
  ids=$("$PY" -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["ids"])))' "$fx/reference.json")
  if "$CAMELID" logits -m "$fx" --ids "$ids" --device cuda --dtype f32 >"$OUT/cli-logits.json" 2>"$OUT/cli-logits.err"; then
    note "- camelid logits --device cuda --dtype f32: $("$PY" -c 'import json,sys
a=json.load(open(sys.argv[1]))["logits"]; b=json.load(open(sys.argv[2]))["logits"]
print("max |d| = %.2e vs transformers f32" % max(abs(x-y) for r,s in zip(a,b) for x,y in zip(r,s)))' "$OUT/cli-logits.json" "$fx/reference.json")"
  else
    note "- camelid logits --device cuda: FAILED: $(head -n1 "$OUT/cli-logits.err")"
  fi
}

stage_reference() {
  local dir="$WORK/llama1b-random"
  if [[ ! -f "$dir/reference.json" ]]; then
    "$PY" "$ROOT/scripts/gpu/make_reference.py" "$dir" >"$OUT/reference-make.txt" 2>&1 ||
      { note "- 1B reference: transformers FAILED (reference-make.txt)"; return; }
  fi
  if CAMELID_TEST_DEVICE=cuda CAMELID_PARITY_DIR="$dir" timeout 600 "$WORK/bin/tests/parity" \
    --ignored external_reference --nocapture >"$OUT/reference-parity.txt" 2>&1; then
    note "- 1B random LLaMA vs transformers on this GPU, f32: $(grep -E 'greedy tokens ok' "$OUT/reference-parity.txt" | tail -n1)"
  else
    note "- 1B random LLaMA vs transformers, f32: FAILED: $(grep -E 'panicked|exceeds|agree' "$OUT/reference-parity.txt" | head -n2 | tr '\n' ' ')"
  fi
}

stage_llamacpp() {
  if [[ ! -x "$WORK/llama-build/bin/llama-bench" ]]; then
    mkdir -p "$WORK/src"
    "$PY" -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$DEV/llama.cpp.tar.xz" "$WORK/src"
    local t0=$SECONDS
    { cmake -S "$WORK/src/llama.cpp" -B "$WORK/llama-build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF &&
      cmake --build "$WORK/llama-build" -j"$(nproc)" --target llama-bench llama-quantize; } \
      >"$OUT/llamacpp-build.txt" 2>&1 || { note "- llama.cpp CUDA build: FAILED (llamacpp-build.txt)"; return; }
    note "- llama.cpp CUDA build: $((SECONDS - t0)) s"
  fi
}

stage_models() {
  export PYTHONPATH="$WORK/src/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
  for shape in 1.1b 7.2b; do
    local hf="$WORK/llama-$shape-hf" f16="$WORK/llama-$shape-F16.gguf" q4="$WORK/llama-$shape-Q4_0.gguf"
    if [[ ! -f "$f16" ]]; then
      "$PY" "$ROOT/scripts/gpu/make_bench_model.py" "$shape" "$hf" "$DEV/tokenizer.model" >>"$OUT/models.txt" 2>&1 &&
        "$PY" "$WORK/src/llama.cpp/convert_hf_to_gguf.py" "$hf" --outtype f16 --outfile "$f16" >>"$OUT/models.txt" 2>&1 &&
        rm -rf "$hf" || { note "- model $shape: FAILED (models.txt)"; continue; }
    fi
    if [[ ! -f "$q4" ]]; then
      "$WORK/llama-build/bin/llama-quantize" "$f16" "$q4" Q4_0 >>"$OUT/models.txt" 2>&1 ||
        { note "- model $shape Q4_0: FAILED (models.txt)"; continue; }
    fi
  done
}

stage_bench() {
  local bw
  bw=$(jq_get copy_read_plus_write_GBps)
  {
    echo "| model | engine | test | tok/s | weights GB | roofline tok/s | % of roofline | vs llama.cpp |"
    echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
  } >"$OUT/bench.md"
  for f in "$WORK"/llama-1.1b-F16.gguf "$WORK"/llama-1.1b-Q4_0.gguf "$WORK"/llama-7.2b-F16.gguf "$WORK"/llama-7.2b-Q4_0.gguf; do
    [[ -f "$f" ]] || { note "- bench: $f missing (run the models stage)"; continue; }
    local name gb
    name=$(basename "$f" .gguf)
    gb=$("$PY" -c 'import os,sys; print(round(os.path.getsize(sys.argv[1]) / 1e9, 3))' "$f")
    # Same device call, one after the other: llama.cpp, then camelid.
    "$WORK/llama-build/bin/llama-bench" -m "$f" -ngl 99 -fa 1 -p 512 -n 128 -r 3 -o json \
      >"$OUT/llamacpp-$name.json" 2>"$OUT/llamacpp-$name.err"
    "$CAMELID" bench -m "$f" --device cuda -p 512 -n 128 -r 3 --json \
      >"$OUT/camelid-$name.json" 2>"$OUT/camelid-$name.err"
    "$PY" - "$OUT/llamacpp-$name.json" "$OUT/camelid-$name.json" "$name" "$gb" "$bw" >>"$OUT/bench.md" <<'PYEOF'
import json, sys
lc, cm, name, gb, bw = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
# The issue's roofline: copy bandwidth (read + write) / bytes of weights, per token.
roof = float(bw) / gb if bw not in ("?", "") else None
rows = []
try:
    for r in json.load(open(lc)):
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        rows.append(("llama.cpp", test, r["avg_ts"]))
except Exception as e:
    rows.append(("llama.cpp", "error", float("nan")))
try:
    for r in json.load(open(cm)):
        rows.append(("camelid", r["test"], r["tokens_per_s"]))
except Exception as e:
    rows.append(("camelid", "error", float("nan")))
llama = {test: ts for engine, test, ts in rows if engine == "llama.cpp"}
for engine, test, ts in rows:
    pct = f"{100 * ts / roof:.0f}%" if roof and test.startswith("tg") else ""
    rf = f"{roof:.0f}" if roof and test.startswith("tg") else ""
    ratio = f"{ts / llama[test]:.2f}x" if test in llama and llama[test] > 0 else ""
    print(f"| {name} | {engine} | {test} | {ts:.1f} | {gb} | {rf} | {pct} | {ratio} |")
PYEOF
  done
  note "- bench: bench.md"
}

for s in "${stages[@]}"; do
  case "$s" in
    info | ceilings | parity | reference | llamacpp | models | bench) ;;
    *) echo "device-checks.sh: unknown stage '$s' (info ceilings parity reference llamacpp models bench)" >&2; exit 2 ;;
  esac
done
unpack
echo "# GPU checks $(date -u +%FT%TZ): ${stages[*]}" >>"$SUMMARY"
for s in "${stages[@]}"; do
  log "stage $s"
  t0=$SECONDS
  "stage_$s"
  log "stage $s: $((SECONDS - t0)) s"
done
cat "$SUMMARY"
