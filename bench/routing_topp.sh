#!/usr/bin/env bash
# routing_topp: what variable-expert routing (--routing topp:T) saves and costs.
# For each threshold T, runs `moefleet logits` on the same token sequence with
# the model's own routing and with topp:T, and prints one table row: routed
# experts per token (mean over MoE layers and tokens), the share of expert rows
# saved, and the KL divergence of the next-token distribution from the
# default's (mean and max over positions, nats) with top-1 agreement.
#
# usage: bench/routing_topp.sh MODEL.gguf [N_TOKENS (64)] [THRESHOLDS ("0.5 0.7 0.9")]
# env:   MOEFLEET (default: ./moefleet), THREADS (default 2), ROUTING_EXTRA
#        (extra topp options, e.g. ",max=8"), SEED (token sequence, default 1)
set -euo pipefail
model=${1:?usage: routing_topp.sh MODEL.gguf [N_TOKENS] [THRESHOLDS]}
n=${2:-64}
ts=${3:-"0.5 0.7 0.9"}
bin=${MOEFLEET:-./moefleet}
threads=${THREADS:-2}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# vocabulary: rows of token_embd.weight ("N_EMBD x N_VOCAB"); experts per token
"$bin" info -m "$model" >"$tmp/info"
vocab=$(awk '$1 == "token_embd.weight" { print $5; exit }' "$tmp/info")
k=$(awk '$1 ~ /\.expert_used_count$/ { print $2; exit }' "$tmp/info")
[ -n "$vocab" ] && [ -n "$k" ] || { echo "cannot read n_vocab / k of $model" >&2; exit 1; }
# a fixed pseudo-random token sequence; the second half is decoded token by token
toks=$(awk -v n="$n" -v v="$vocab" -v s="${SEED:-1}" 'BEGIN { x = s; for (i = 0; i < n; i++) {
	x = (x * 1103515245 + 12345) % 2147483648; printf "%s%d", (i ? "," : ""), x % v } }')
np=$((n / 2))

"$bin" logits -m "$model" --tokens "$toks" --n-prompt "$np" --threads "$threads" \
	--out "$tmp/default.f32" 2>/dev/null
echo "model: $(basename "$model"), $n tokens ($np prefill + $((n - np)) decode), k = $k"
printf '| routing | experts/token | expert rows saved | KL mean (nats) | KL max | top-1 agree |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
printf '| top-%s (default) | %s | 0%% | 0 | 0 | 1.000 |\n' "$k" "$k"
for t in $ts; do
	spec="topp:$t${ROUTING_EXTRA:-}"
	"$bin" logits -m "$model" --tokens "$toks" --n-prompt "$np" --threads "$threads" \
		--routing "$spec" --out "$tmp/topp.f32" 2>"$tmp/err"
	mean=$(sed -n 's/^routing: all layers: \([0-9.]*\) experts per token.*/\1/p' "$tmp/err")
	kl=$(node "$here/logits_kl.mjs" "$tmp/default.f32" "$tmp/topp.f32" "$vocab")
	awk -v spec="$spec" -v m="$mean" -v k="$k" -v kl="$kl" 'BEGIN {
		split(kl, f, " "); printf "| %s | %.3f | %.1f%% | %s | %s | %s |\n",
		spec, m, 100 * (1 - m / k), f[4], f[6], f[8] }'
done
