#!/usr/bin/env bash
# moefleet against llama.cpp on one GGUF file and this machine: runs the
# oracle's bench.mjs (llama.cpp) and `moefleet bench` in alternating rounds
# (so both see the same background load), one repetition each per round, and
# prints the medians, the best runs, and the ratios moefleet / llama.cpp of
# both (on a shared machine the best run is the one least disturbed).  Each
# round also runs moefleet with local workers over ZeroMQ ipc:// and reads
# the in-process run's roofline line, and the script ends with one line per
# performance target (met / not met), all from the same rounds:
#   tg >= 1.15x and pp >= 1.0x llama.cpp; tg >= 0.8 of the memory-bandwidth
#   roofline; with workers tg >= 0.9x and pp >= 0.95x of in-process.
#   bench/compare-llama.sh MODEL.gguf [PP] [TG] [ROUNDS] [THREADS]
# Defaults: PP 512, TG 128, ROUNDS 3, THREADS 2.  Environment:
#   MOEFLEET    the moefleet binary (default: ./moefleet, else the one next to bench/)
#   ORACLE_DIR  the oracle (default: /tmp/oracle, else ../shared/oracle)
#   MOEFLEET_ARGS  extra arguments for every moefleet bench run
#   WORKERS     local workers of the distributed runs (default 2; 0: skip them)
# Needs node (for bench.mjs and for reading its JSON).
set -euo pipefail
model=${1:?usage: bench/compare-llama.sh MODEL.gguf [PP] [TG] [ROUNDS] [THREADS]}
pp=${2:-512}
tg=${3:-128}
rounds=${4:-3}
threads=${5:-2}
workers=${WORKERS:-2}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/locate.sh"
bench_locate bench.mjs
[ -x "$bin" ] || { echo "compare-llama: no moefleet binary at $bin (set MOEFLEET)" >&2; exit 2; }
[ -f "${oracle:-}/bench.mjs" ] || { echo "compare-llama: no oracle bench.mjs (set ORACLE_DIR)" >&2; exit 2; }
[ -f "$model" ] || { echo "compare-llama: no model file $model" >&2; exit 2; }
model=$(cd "$(dirname "$model")" && pwd)/$(basename "$model")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# one moefleet bench run: its speeds appended to $1.pp and $1.tg
mbench() {
	local into=$1
	shift
	# shellcheck disable=SC2086
	"$bin" bench -m "$model" --threads "$threads" --pp "$pp" --tg "$tg" --reps 1 \
		${MOEFLEET_ARGS:-} "$@" >"$tmp/m.out" 2>"$tmp/m.err" ||
		{ echo "compare-llama: moefleet bench $* failed:" >&2; tail -3 "$tmp/m.err" >&2; exit 1; }
	awk '$1 ~ /^pp[0-9]+$/ && $2 ~ /^[0-9]+$/ { print $4 >> "'"$into"'.pp" }
	     $1 ~ /^tg[0-9]+$/ && $2 ~ /^[0-9]+$/ { print $4 >> "'"$into"'.tg" }' "$tmp/m.out"
}

# one value per line into $tmp/{llama,moefleet,workers}.{pp,tg}, $tmp/roofline
for ((r = 0; r < rounds; r++)); do
	(cd "$oracle" && node bench.mjs --model "$model" --threads "$threads" --pp "$pp" \
		--tg "$tg" --reps 1) >"$tmp/l.json" 2>"$tmp/l.err" ||
		{ echo "compare-llama: bench.mjs failed:" >&2; tail -3 "$tmp/l.err" >&2; exit 1; }
	node -e '
		const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
		for (const [k, f] of [["pp", process.argv[2]], ["tg", process.argv[3]]]) {
			const e = j[k + f + "_tok_s"];
			if (e) require("fs").appendFileSync(process.argv[4] + "." + k,
				e.runs.map(String).join("\n") + "\n");
		}' "$tmp/l.json" "$pp" "$tg" "$tmp/llama"
	mbench "$tmp/moefleet" --roofline
	sed -n 's/.* = \([0-9.]*\) of the bound.*/\1/p' "$tmp/m.out" >>"$tmp/roofline"
	[ "$workers" -gt 0 ] && mbench "$tmp/workers" --workers "$workers"
	echo "round $((r + 1))/$rounds done" >&2
done

median() { # file -> median (or "-")
	[ -s "$1" ] || { echo "-"; return; }
	sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2];
		else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
best() { [ -s "$1" ] && sort -g "$1" | tail -n 1 || echo "-"; }
range() { [ -s "$1" ] && sort -g "$1" | awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%s-%s", a, b }' || echo "-"; }

lpp=$(median "$tmp/llama.pp"); ltg=$(median "$tmp/llama.tg")
mpp=$(median "$tmp/moefleet.pp"); mtg=$(median "$tmp/moefleet.tg")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.3f", a / b }'; }
echo "model: $model, threads $threads, $rounds rounds, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
printf '%-10s %22s %22s\n' engine "pp$pp tok/s (range)" "tg$tg tok/s (range)"
printf '%-10s %8s %13s %8s %13s\n' llama.cpp "$lpp" "($(range "$tmp/llama.pp"))" "$ltg" "($(range "$tmp/llama.tg"))"
printf '%-10s %8s %13s %8s %13s\n' moefleet "$mpp" "($(range "$tmp/moefleet.pp"))" "$mtg" "($(range "$tmp/moefleet.tg"))"
echo "ratio: pp $(ratio "$mpp" "$lpp"), tg $(ratio "$mtg" "$ltg") (moefleet / llama.cpp, medians)"
echo "ratio: pp $(ratio "$(best "$tmp/moefleet.pp")" "$(best "$tmp/llama.pp")"), tg $(ratio "$(best "$tmp/moefleet.tg")" "$(best "$tmp/llama.tg")") (best runs)"
if [ "$workers" -gt 0 ]; then
	wpp=$(median "$tmp/workers.pp"); wtg=$(median "$tmp/workers.tg")
	printf '%-10s %8s %13s %8s %13s\n' "workers $workers" "$wpp" "($(range "$tmp/workers.pp"))" "$wtg" "($(range "$tmp/workers.tg"))"
fi
# target NAME VALUE MIN
target() {
	awk -v n="$1" -v v="$2" -v m="$3" 'BEGIN { if (v == "-") s = "no data";
		else s = (v + 0 >= m + 0) ? "met" : "not met";
		printf "target: %-34s %6s (>= %s) %s\n", n, v, m, s }'
}
[ "$pp" -gt 0 ] && target "pp / llama.cpp" "$(ratio "$mpp" "$lpp")" 1.0
[ "$tg" -gt 0 ] && target "tg / llama.cpp" "$(ratio "$mtg" "$ltg")" 1.15
[ "$tg" -gt 0 ] && target "tg / memory-bandwidth roofline" "$(median "$tmp/roofline")" 0.8
if [ "$workers" -gt 0 ]; then
	[ "$pp" -gt 0 ] && target "pp with $workers workers / in-process" "$(ratio "$wpp" "$mpp")" 0.95
	[ "$tg" -gt 0 ] && target "tg with $workers workers / in-process" "$(ratio "$wtg" "$mtg")" 0.9
fi
exit 0
