#!/usr/bin/env bash
# The cost of distribution on one machine: `moefleet bench` on one model
# in-process, with --workers 2 (ZeroMQ ipc://), and under mpirun -np 3, and
# the ratios of each to in-process.  Also prints wire bytes per token.
#   bench/cluster.sh MODEL.gguf [PP] [TG] [REPS]
# Make the reference model with the oracle:
#   node gen_gguf.mjs --preset deepseek2-bench --seed 1 --expert-type MXFP4 --out ds2-bench-mxfp4.gguf
set -euo pipefail
model=${1:?usage: bench/cluster.sh MODEL.gguf [PP] [TG] [REPS]}
pp=${2:-512}
tg=${3:-128}
reps=${4:-3}
bin=$(dirname "$0")/../moefleet
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run() { # name, command...
	local name=$1
	shift
	"$@" --pp "$pp" --tg "$tg" --reps "$reps" --stats >"$tmp/$name.out" 2>"$tmp/$name.err" ||
		{ echo "$name failed:"; tail -3 "$tmp/$name.err"; return 1; }
	grep '^bench:' "$tmp/$name.out" | sed "s/^bench:/$name:/"
}

run inproc "$bin" bench -m "$model" --threads 2
run workers2 "$bin" bench -m "$model" --threads 2 --workers 2
if command -v mpirun >/dev/null; then
	run mpi3 mpirun -np 3 "$bin" bench -m "$model" --threads 1 --transport mpi || true
fi
echo
get() { grep '^bench:' "$tmp/$1.out" 2>/dev/null | sed -E "s/.* pp[0-9]+ ([0-9.]+) tok\/s, tg[0-9]+ ([0-9.]+) tok\/s/\\$2/"; }
ipp=$(get inproc 1); itg=$(get inproc 2)
for name in workers2 mpi3; do
	[ -s "$tmp/$name.out" ] || continue
	awk -v n="$name" -v p="$(get $name 1)" -v t="$(get $name 2)" -v ip="$ipp" -v it="$itg" \
		'BEGIN { printf "%-9s pp ratio %.3f, tg ratio %.3f (to inproc)\n", n, p / ip, t / it }'
done
for f in "$tmp"/workers2.err "$tmp"/mpi3.err; do
	[ -f "$f" ] || continue
	echo "per-worker statistics ($(basename "$f" .err)):"
	grep -E '^(wkr|[0-9]+ )' "$f" || true
done
tokens=$(( (pp + tg) * reps ))
awk -v t=$tokens '/^[0-9]+ / { s += $5 + $6 } END { if (t) printf "wire bytes per token (both directions, all workers): %.0f\n", s / t }' "$tmp"/workers2.err
