#!/usr/bin/env bash
# Load test of `moefleet serve`: 32 concurrent streaming clients for 2 minutes
# (bench/load.mjs), then throughput, p50/p99 latencies, errors and the
# server's resident memory before and after.
#   bash bench/load.sh [BUILD_DIR]
# Environment: MODEL (default tests/data/qwen3moe-tiny-mxfp4.gguf), WORKERS (2),
# CLIENTS (32), DURATION (120 s), PARALLEL (8), CTX (512), QUEUE (64).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$src}
bin=$build/moefleet
model=${MODEL:-$src/tests/data/qwen3moe-tiny-mxfp4.gguf}
workers=${WORKERS:-2}
clients=${CLIENTS:-32}
secs=${DURATION:-120}
command -v node >/dev/null || { echo "bench/load.sh needs node" >&2; exit 1; }
tmp=$(mktemp -d /tmp/moefleet-load.XXXXXX)
key=load-test-key
"$bin" serve -m "$model" --port 0 --workers "$workers" --parallel "${PARALLEL:-8}" \
	--ctx-size "${CTX:-512}" --queue "${QUEUE:-64}" --api-key "$key" >"$tmp/out" 2>"$tmp/err" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 400); do
	grep -q '^listening on' "$tmp/out" && break
	sleep 0.05
done
url=$(sed -n 's/^listening on //p' "$tmp/out")
[ -n "$url" ] || { cat "$tmp/err" >&2; exit 1; }
rss() { awk '/^VmRSS/ {print $2}' /proc/$pid/status; }
# warm up (first touches of the model's pages), then measure
node "$src/bench/load.mjs" "$url" "$key" x 2 3 >/dev/null 2>&1 || true
name=$(curl -s -H "Authorization: Bearer $key" "$url/v1/models" | sed 's/.*"id":"\([^"]*\)".*/\1/')
rss0=$(rss)
result=$(node "$src/bench/load.mjs" "$url" "$key" "$name" "$clients" "$secs")
sleep 1
rss1=$(rss)
steps=$(curl -s -H "Authorization: Bearer $key" "$url/metrics" | awk '$1=="moefleet_forward_steps_total"{print $2}')
btok=$(curl -s -H "Authorization: Bearer $key" "$url/metrics" | awk '$1=="moefleet_batch_tokens_sum"{print $2}')
echo "model: $(basename "$model"), $workers workers, $clients clients, ${secs} s"
echo "$result"
echo "forward steps: $steps, mean tokens per step: $(awk -v a="$btok" -v b="$steps" 'BEGIN{printf "%.1f", b ? a/b : 0}')"
echo "server RSS: ${rss0} kB before, ${rss1} kB after"
