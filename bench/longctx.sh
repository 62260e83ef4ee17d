#!/usr/bin/env bash
# Long contexts on one node: decode and prompt speed at several context
# lengths with the default attention numerics (llama.cpp's) and with the
# sharded numerics (--kv-shards V --kv-page P), in alternating runs so both
# see the same background load.  Per length L it prints the median tg speed of
# decoding after an L-token prompt (`moefleet bench --depth L`), the median pp
# speed of an L-token prompt, and sharded / default ratios.
#   bench/longctx.sh MODEL.gguf [LENGTHS] [V] [P] [ROUNDS] [TG]
# Defaults: LENGTHS "4096 8192", V 8, P 1024, ROUNDS 2, TG 32.  Environment:
#   MOEFLEET  the moefleet binary (default: ./moefleet, else next to bench/)
#   THREADS   threads (default 2)
#   PP        0: skip the prompt runs (default 1)
#   HOSTS     also decode with this many local workers (--workers HOSTS; they
#             share this machine's cores) holding the experts, the chains here
#             (--kv-hosts 0) and on the workers as KV hosts; with --stats, the
#             hosts' per-layer breakdown (coordinator ms on the own page,
#             merge, send, wait; per host compute ms, bytes, messages, per
#             token) of each length's last run is printed after the table
#   RANDOM_KV 1: the decode runs fill the context with pseudo-random keys and
#             values (bench --random-kv, benchmark only) instead of running
#             the L-token prompt: long contexts without hours of prefill
set -euo pipefail
model=${1:?usage: bench/longctx.sh MODEL.gguf [LENGTHS] [V] [P] [ROUNDS] [TG]}
lengths=${2:-4096 8192}
shards=${3:-8}
page=${4:-1024}
rounds=${5:-2}
tg=${6:-32}
threads=${THREADS:-2}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/locate.sh"
bench_locate bench.mjs
[ -x "$bin" ] || { echo "longctx: no moefleet binary at $bin (set MOEFLEET)" >&2; exit 2; }
[ -f "$model" ] || { echo "longctx: no model file $model" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# run NAME ARGS...: the bench's final speeds appended to $tmp/NAME.{pp,tg}
run() {
	local name=$1
	shift
	"$bin" bench -m "$model" --threads "$threads" --reps 1 "$@" >"$tmp/out" 2>"$tmp/err" ||
		{ echo "longctx: moefleet bench $* failed:" >&2; tail -3 "$tmp/err" >&2; exit 1; }
	sed -n 's/^bench: pp[0-9]* \([0-9.]*\) tok\/s, tg[0-9]* \([0-9.]*\) tok\/s$/\1 \2/p' \
		"$tmp/out" >"$tmp/line"
	read -r p t <"$tmp/line"
	[ "$p" != "0.00" ] && echo "$p" >>"$tmp/$name.pp"
	[ "$t" != "0.00" ] && echo "$t" >>"$tmp/$name.tg"
	return 0
}

median() {
	[ -s "$1" ] || { echo "-"; return; }
	sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2];
		else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

rkv=()
[ "${RANDOM_KV:-0}" != 0 ] && rkv=(--random-kv)
echo "model: $model, threads $threads, --kv-shards $shards --kv-page $page, $rounds rounds," \
	"${rkv[*]:-prompt}, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
printf '%8s %12s %12s %6s %12s %12s %6s %12s %12s %6s\n' length "tg default" "tg sharded" ratio \
	"pp default" "pp sharded" ratio "tg here" "tg hosts" ratio
for L in $lengths; do
	for ((r = 0; r < rounds; r++)); do
		run "d$L" --pp 0 --tg "$tg" --depth "$L" "${rkv[@]}"
		run "s$L" --pp 0 --tg "$tg" --depth "$L" --kv-shards "$shards" --kv-page "$page" \
			"${rkv[@]}"
		if [ -n "${HOSTS:-}" ]; then
			run "c$L" --pp 0 --tg "$tg" --depth "$L" --kv-shards "$shards" \
				--kv-page "$page" --workers "$HOSTS" --kv-hosts 0 "${rkv[@]}"
			run "h$L" --pp 0 --tg "$tg" --depth "$L" --kv-shards "$shards" \
				--kv-page "$page" --workers "$HOSTS" --stats "${rkv[@]}"
			sed -n '/^KV hosts, per layer/,/^placement:/p' "$tmp/err" | grep -v '^placement:' \
				>"$tmp/kv$L"
		fi
		if [ "${PP:-1}" != 0 ]; then
			run "d$L" --pp "$L" --tg 0
			run "s$L" --pp "$L" --tg 0 --kv-shards "$shards" --kv-page "$page"
		fi
	done
	dt=$(median "$tmp/d$L.tg"); st=$(median "$tmp/s$L.tg")
	dp=$(median "$tmp/d$L.pp"); sp=$(median "$tmp/s$L.pp")
	ct=$(median "$tmp/c$L.tg"); ht=$(median "$tmp/h$L.tg")
	printf '%8s %12s %12s %6s %12s %12s %6s %12s %12s %6s\n' "$L" "$dt" "$st" \
		"$(ratio "$st" "$dt")" "$dp" "$sp" "$(ratio "$sp" "$dp")" "$ct" "$ht" "$(ratio "$ht" "$ct")"
	for f in d s c h; do
		[ -s "$tmp/$f$L.tg" ] && echo "  tg runs $f$L: $(sort -g "$tmp/$f$L.tg" | tr '\n' ' ')"
	done
done
for L in $lengths; do
	[ -s "$tmp/kv$L" ] || continue
	echo "length $L, KV hosts (last run):"
	cat "$tmp/kv$L"
done
