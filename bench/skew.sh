#!/usr/bin/env bash
# Live rebalancing under skew on uneven hardware: 3 local workers, one of them
# slowed FACTORx (--worker-slowdown), and router-biased routing that sends the
# hot traffic to experts the slowed worker holds (--router-bias).  Reports
#   - max/mean worker compute per step with the static placement, and in the
#     first and last placement epochs with live rebalancing (--rebalance);
#   - during continuous generation (weights from the model file and streamed
#     from the coordinator), the steps while a re-placement was loading
#     against the median quiet step under the same placement;
#   - whether the rebalanced run's logits equal the in-process ones bit for bit.
#   bench/skew.sh MODEL.gguf
# Environment: POLICY (migrate), SLOW (local worker index, 2), FACTOR (2), HOT
# (biased experts, 6), BIAS (added to their selection score, 0.08), PP (64),
# TG (16), REPS (6), EVERY (re-plan interval in steps, 17), GEN (tokens, 96),
# RUNS (generation runs per mode, 3).
# The bias is one list of expert ids for every layer, so a model with few MoE
# layers lets it hit the slowed worker's experts everywhere.  The reference
# model (2 MoE layers x 64 experts, n_embd 1024, MXFP4, 135 MB), with the oracle:
#   node gen_gguf.mjs --preset qwen3moe-tiny --seed 1 --n-layer 2 --n-embd 1024 --n-head 16 \
#     --n-head-kv 4 --head-dim 64 --n-ff 1024 --n-ff-exp 512 --n-expert 64 --n-expert-used 6 \
#     --n-vocab 4096 --expert-type MXFP4 --out qwen-skew.gguf
set -euo pipefail
model=${1:?usage: bench/skew.sh MODEL.gguf}
policy=${POLICY:-migrate}
slow=${SLOW:-2}
factor=${FACTOR:-2}
hot=${HOT:-6}
bias=${BIAS:-0.08}
pp=${PP:-64}
tg=${TG:-16}
reps=${REPS:-6}
every=${EVERY:-17}
gen=${GEN:-96}
runs=${RUNS:-3}
bin=$(dirname "$0")/../moefleet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--threads 2 --workers 3 --worker-slowdown "$slow:$factor")

# 1. which experts does the slowed worker hold?  (the initial placement is a
# function of the measured speeds, rounded, so it repeats from run to run)
"$bin" bench -m "$model" --pp 8 --tg 0 --reps 1 "${common[@]}" --stats \
	--trace-routing "$tmp/probe.trace" >/dev/null 2>"$tmp/probe.err"
idx=$(awk -v n="local-$slow" '$2 == n && $1 ~ /^[0-9]+$/ { print $1 }' "$tmp/probe.err")
"$bin" placement show --trace "$tmp/probe.trace" --holders >"$tmp/holders"
# round robin over the layers: in each, an expert the slowed worker holds
experts=$(awk -v w="$idx" -v hot="$hot" '/^holders:/ { l = $3; sub(":", "", $5); if ($6 == w) { k = n[l]++; e[l, k] = $5 }; if (!(l in seen)) { seen[l] = 1; order[nl++] = l } }
	END { got = 0; for (k = 0; got < hot && k < 4096; k++) for (i = 0; i < nl && got < hot; i++) { l = order[i]; if (k < n[l] && !(e[l, k] in used)) { used[e[l, k]] = 1; out = out (got ? "," : "") e[l, k]; got++ } }; print out }' "$tmp/holders")
echo "slowed worker: local-$slow (cluster index $idx), ${factor}x; biased experts $experts (+$bias)"
skew=(--router-bias "$experts:$bias")

epochs() { grep -E '^balance: epoch' "$1" | sed 's/^balance: /  /'; }
# 2. static placement under skew
"$bin" bench -m "$model" --pp "$pp" --tg "$tg" --reps "$reps" "${common[@]}" "${skew[@]}" --stats \
	>"$tmp/static.out" 2>"$tmp/static.err"
echo "static placement:"
epochs "$tmp/static.err"
# 3. live rebalancing
"$bin" bench -m "$model" --pp "$pp" --tg "$tg" --reps "$reps" "${common[@]}" "${skew[@]}" --stats \
	--rebalance "$policy" --rebalance-every "$every" >"$tmp/rb.out" 2>"$tmp/rb.err"
echo "--rebalance $policy --rebalance-every $every:"
epochs "$tmp/rb.err"
grep -E '^balance: .*re-placement' "$tmp/rb.err" | sed 's/^/  /'
before=$(grep -E '^balance: epoch' "$tmp/static.err" | tail -1 | sed -E 's/.*max\/mean ([0-9.]+).*/\1/')
after=$(grep -E '^balance: epoch' "$tmp/rb.err" | tail -1 | sed -E 's/.*max\/mean ([0-9.]+).*/\1/')
echo "max/mean worker compute per step: static $before, after rebalancing $after"
grep '^bench:' "$tmp/static.out" | sed 's/^bench:/  static:     /'
grep '^bench:' "$tmp/rb.out" | sed 's/^bench:/  rebalanced: /'

# 4. continuous generation while placements switch, RUNS times per mode: each
# step that overlapped the loading of a re-placement against the median quiet
# step under the same placement (loading happens while the old, slower
# placement is in force, so the run's median is not the yardstick), and how
# many loading / quiet steps took more than twice that (noise hits both)
for mode in file stream; do
	extra=()
	[ $mode = stream ] && extra=(--stream-weights)
	for run in $(seq "$runs"); do
		"$bin" generate -m "$model" -p "The quick brown fox jumps over the lazy dog" -n "$gen" \
			"${common[@]}" "${skew[@]}" "${extra[@]}" --rebalance "$policy" --rebalance-every "$every" \
			--stats >/dev/null 2>"$tmp/gen.err"
		st=$(grep -E '^steps:' "$tmp/gen.err")
		sw=$(grep -E '^balance: .*re-placement' "$tmp/gen.err" | sed -E 's/balance: //')
		echo "generate -n $gen ($mode, run $run): $st; $sw"
		sp=$(grep -E '^steps while loading' "$tmp/gen.err" | sed 's/^steps while loading \/ //')
		echo "  loading / quiet $sp"
		echo "$sp" | sed -nE "s/.*median ([0-9.]+), worst ([0-9.]+),.*/$mode \1 \2/p" >>"$tmp/ratios"
	done
done
[ -s "$tmp/ratios" ] && awk '{ n[$1]++; med[$1] = med[$1] " " $2; w[$1] = w[$1] " " $3; if ($3 > m[$1]) m[$1] = $3 }
	END { for (k in n) printf "%s: loading step / quiet median: median%s; worst%s (max %.2f)\n", k, med[k], w[k], m[k] }' "$tmp/ratios"

# 5. logits: rebalanced cluster against in-process, same routing
tokens=$(seq 1 40 | awk '{ printf "%s%d", (NR > 1 ? "," : ""), ($1 * 977) % 3000 + 10 }')
"$bin" logits -m "$model" --tokens "$tokens" --n-prompt 24 "${common[@]}" "${skew[@]}" \
	--rebalance "$policy" --rebalance-every 2 --stats --out "$tmp/rb.f32" 2>"$tmp/lg.err" || true
"$bin" logits -m "$model" --tokens "$tokens" --threads 2 --n-prompt 24 "${skew[@]}" --out "$tmp/in.f32" 2>/dev/null
if cmp -s "$tmp/in.f32" "$tmp/rb.f32"; then
	echo "logits: bit-identical to in-process ($(grep -E '^balance: .*re-placement' "$tmp/lg.err" | sed 's/balance: //'))"
else
	echo "logits: DIFFER from in-process"
	exit 1
fi
