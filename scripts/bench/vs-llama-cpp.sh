#!/usr/bin/env bash
# Side-by-side throughput: llama.cpp's llama-bench and `camelid bench` on the same GGUF, same
# thread count, in one session. Builds llama.cpp (CPU) from the pinned llama-cpp-python sdist
# into $CACHE on first use (~15 minutes on 2 cores).
#
#   scripts/bench/vs-llama-cpp.sh [MODEL.gguf] [THREADS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${CAMELID_BENCH_CACHE:-$HOME/.cache/camelid/bench}
SDIST=llama_cpp_python-0.3.36
GGUF=${1:-}
THREADS=${2:-$(nproc)}
REPS=${3:-3}

if [ -z "$GGUF" ]; then
  GGUF=$(cargo run --release -q -- pull smollm2-135m-instruct)
fi
if [ ! -x "$CACHE/llama-build/bin/llama-bench" ]; then
  mkdir -p "$CACHE"
  if [ ! -d "$CACHE/$SDIST" ]; then
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$CACHE" llama-cpp-python==0.3.36
    tar xzf "$CACHE/$SDIST.tar.gz" -C "$CACHE"
  fi
  cmake -S "$CACHE/$SDIST/vendor/llama.cpp" -B "$CACHE/llama-build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >/dev/null
  cmake --build "$CACHE/llama-build" -j"$(nproc)" --target llama-bench llama-perplexity >/dev/null
fi
cargo build --release -q

echo "## $(basename "$GGUF"), $THREADS threads, $REPS reps, $(date -u +%F)"
echo "### llama.cpp"
LD_LIBRARY_PATH="$CACHE/llama-build/bin" "$CACHE/llama-build/bin/llama-bench" \
  -m "$GGUF" -p 512 -n 128 -r "$REPS" -t "$THREADS" 2>/dev/null
echo "### camelid"
./target/release/camelid bench -m "$GGUF" -p 512 -n 128 -r "$REPS" -t "$THREADS"
