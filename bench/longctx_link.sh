#!/usr/bin/env bash
# KV hosts over shaped links: a coordinator and two workers, each in its own
# network namespace (veth links to a bridge, made and removed here), every
# link shaped with `tc qdisc ... tbf` at each RATE.  Per rate it decodes TG
# tokens after an L-token prompt (`moefleet bench --depth L`) with the
# experts on the workers and the attention chains on the coordinator
# (--kv-hosts 0), and with the chains on the two workers as KV hosts (the
# workers read the experts from MODEL, not over the shaped links), and
# prints both speeds: the difference is what the hosts cost (their messages
# and their share of the attention) on that link, with the hosts' per-layer
# breakdown of the host run (--stats: coordinator ms on the own page, merge,
# send, wait; per host compute ms, bytes and messages per token, summed over
# the layers).  Needs root.
#   bench/longctx_link.sh MODEL.gguf [L] [V] [P] [TG] [RATES]
# Defaults: L 8192, V 8, P 1024, TG 32, RATES "10gbit 1gbit".  Environment:
#   RANDOM_KV 1: fill the context with pseudo-random keys and values (bench
#             --random-kv, benchmark only) instead of running the prompt
#   ROUNDS    runs of each configuration per rate, alternating (default 1);
#             every speed is printed
set -u
model=${1:?usage: bench/longctx_link.sh MODEL.gguf [L] [V] [P] [TG] [RATES]}
L=${2:-8192}
V=${3:-8}
P=${4:-1024}
tg=${5:-32}
rates=${6:-10gbit 1gbit}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/locate.sh"
bench_locate bench.mjs
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
wbin=$(dirname "$bin")/moefleet-worker
model=$(cd "$(dirname "$model")" && pwd)/$(basename "$model")
tag=mfl$$
c=${tag}c
tmp=$(mktemp -d)
. "$here/../tests/netns_star.sh"
cleanup() {
	netns_star_down "$tag"
	rm -rf "$tmp"
}
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] || { echo "longctx_link: needs root (ip netns, tc)" >&2; exit 2; }
ip netns add "$c" || exit 2
netns_star_up "$tag" 214 || exit 2
shape() { # RATE on both ends of both links
	for i in 1 2; do
		for dev in "$c vc$i$tag" "${tag}w$i eth0"; do
			set -- $dev
			ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$rate" burst 512kb \
				latency 100ms
		done
	done
}
port=$((20000 + $$ % 20000))
rkv=()
[ "${RANDOM_KV:-0}" != 0 ] && rkv=(--random-kv)
# run HOSTS: the bench's tg speed with --kv-hosts HOSTS (with --stats)
run() {
	port=$((port + 1))
	ip netns exec "$c" "$bin" bench -m "$model" --pp 0 --tg "$tg" --depth "$L" --reps 1 \
		--threads 2 --kv-shards "$V" --kv-page "$P" --kv-hosts "$1" "${rkv[@]}" --stats \
		--listen "tcp://10.214.0.1:$port" --insecure --expect-workers 2 >"$tmp/out" \
		2>"$tmp/err" &
	local cp=$!
	for i in 1 2; do
		ip netns exec "${tag}w$i" "$wbin" --connect "tcp://10.214.0.1:$port" --insecure -m "$model" \
			--threads 1 2>/dev/null &
	done
	wait "$cp" || { echo "longctx_link: bench failed: $(grep -m1 error "$tmp/err")" >&2; exit 1; }
	wait
	sed -n 's/^bench: .* tg[0-9]* \([0-9.]*\) tok\/s$/\1/p' "$tmp/out"
	grep -m1 '^all ' "$tmp/err" >>"$tmp/all.$rate"
}
echo "model: $model, depth $L, --kv-shards $V --kv-page $P, tg$tg, ${rkv[*]:-prompt}," \
	"$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
printf '%8s %16s %16s\n' link "chains here" "2 KV hosts"
for rate in $rates; do
	shape
	for ((r = 0; r < ${ROUNDS:-1}; r++)); do
		printf '%8s %16s %16s\n' "$rate" "$(run 0)" "$(run 2)"
	done
done
for rate in $rates; do
	echo "$rate, KV hosts per token over all layers (ms: own, merge, send, wait |" \
		"per host: compute ms, bytes out, in, messages out/in):"
	cat "$tmp/all.$rate"
done
