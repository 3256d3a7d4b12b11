#!/usr/bin/env bash
# Prepares, on a machine without a GPU, everything scripts/gpu/device-checks.sh needs on a GPU
# machine that has no Rust: target/cuda/device/ (an ignored path; carry it along) with
#   camelid-cuda.tar.xz   the stripped CUDA binary and the device-generic test binaries
#                         (parity, llamacpp_families, t5_parity), from scripts/build-cuda.sh --tests
#   llama.cpp.tar.xz      llama.cpp's source from the pinned llama-cpp-python 0.3.36 sdist
#                         (vendor/llama.cpp without models/ and docs/), to build with CUDA there
#   tokenizer.model       LLaMA's SentencePiece tokenizer (../shared/data/llama2-tokenizer),
#                         for the GGUF conversion of the random-weight benchmark models
#
#   scripts/gpu/prepare.sh        # then: bash scripts/gpu/device-checks.sh [STAGE...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/target/cuda/device"
CACHE="${CAMELID_CUDA_CACHE:-$HOME/.cache/camelid/cuda}"
SDIST=llama_cpp_python-0.3.36
SHARED="${CAMELID_SHARED:-$ROOT/../shared}"
[[ -d "$SHARED" || -n "${CAMELID_SHARED:-}" ]] || SHARED="$ROOT/../../shared"
log() { echo "[prepare] $*" >&2; }

"$ROOT/scripts/build-cuda.sh" --tests
mkdir -p "$DEST"
cp "$ROOT/target/cuda/bundle.tar.xz" "$DEST/camelid-cuda.tar.xz"

if [[ ! -f "$DEST/llama.cpp.tar.xz" ]]; then
  src="$CACHE/$SDIST"
  if [[ ! -d "$src/vendor/llama.cpp" ]]; then
    log "downloading the llama-cpp-python 0.3.36 sdist"
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$CACHE" llama-cpp-python==0.3.36
    tar xzf "$CACHE/$SDIST.tar.gz" -C "$CACHE"
  fi
  log "packing llama.cpp's source"
  tar -C "$src/vendor" --exclude=llama.cpp/models --exclude=llama.cpp/docs -cf - llama.cpp |
    xz -6 -T0 >"$DEST/llama.cpp.tar.xz"
fi

tok="$SHARED/data/llama2-tokenizer/tokenizer.model"
[[ -f "$tok" ]] || { echo "prepare.sh: $tok not found (set CAMELID_SHARED)" >&2; exit 1; }
cp "$tok" "$DEST/tokenizer.model"

total=$(du -cb "$DEST"/* | tail -n1 | cut -f1)
ls -l "$DEST" >&2
echo "$DEST: $total bytes ($((total / 1024 / 1024)) MiB; a GPU machine accepts 64 MiB carried)"
if ((total >= 64 * 1024 * 1024)); then
  echo "prepare.sh: over 64 MiB" >&2
  exit 1
fi
