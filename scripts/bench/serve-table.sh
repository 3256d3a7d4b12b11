#!/usr/bin/env bash
# The serving table of BENCHMARKS.md: `camelid serve` and `llama-server` (same GGUF, 2 threads,
# `-np` slots) one after the other under 1, 8, 32 and 64 concurrent streaming clients
# (scripts/bench/serve_load.py: 2 requests per client, 64 tokens each, greedy, EOS ignored).
# Prints one JSON line per concurrency and server, with the load average before and after.
#
#   CAMELID=target/release/camelid LLAMA=/path/to/llama.cpp/build scripts/bench/serve-table.sh
#
# CAMELID: the camelid binary (default target/release/camelid); LLAMA: a llama.cpp build whose
# bin/ holds llama-server (unset: camelid only); CONCURRENCY (default 1,8,32,64).
set -euo pipefail
cd "$(dirname "$0")/../.."
CAMELID=${CAMELID:-target/release/camelid}
CONCURRENCY=${CONCURRENCY:-1,8,32,64}
LOAD="python3 scripts/bench/serve_load.py --requests 2 --max-tokens 64 --concurrency"
GGUF=$("$CAMELID" pull smollm2-135m-instruct)

wait_up() {
  for _ in $(seq 1 120); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2
  return 1
}

echo "# camelid serve ($CAMELID), load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$CAMELID" serve --port 18741 -t 2 >/tmp/camelid-serve-table.log 2>&1 &
CP=$!
trap 'kill $CP 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:18741
$LOAD "$CONCURRENCY" --url http://127.0.0.1:18741 --model smollm2-135m-instruct
kill $CP
wait $CP 2>/dev/null || true
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ -n "${LLAMA:-}" ]; then
  # 32 slots of 128 positions for up to 32 clients (as in the earlier tables), 64 for 64.
  for c in ${CONCURRENCY//,/ }; do
    np=$((c > 32 ? 64 : 32))
    echo "# llama-server -np $np -c $((np * 128)), $c clients, load: $(cut -d' ' -f1-3 /proc/loadavg)"
    LD_LIBRARY_PATH="$LLAMA/bin" "$LLAMA/bin/llama-server" -m "$GGUF" --port 18742 \
      -np "$np" -c $((np * 128)) -t 2 >/tmp/llama-server-table.log 2>&1 &
    LP=$!
    trap 'kill $LP 2>/dev/null || true' EXIT
    wait_up http://127.0.0.1:18742
    $LOAD "$c" --url http://127.0.0.1:18742 --model smollm2
    kill $LP
    wait $LP 2>/dev/null || true
  done
  echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
fi
