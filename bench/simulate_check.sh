#!/usr/bin/env bash
# Does `moefleet placement simulate` reproduce measured step times?  ROUNDS
# rounds, each of a static run and a rebalanced run (--rebalance POLICY) of
# `moefleet bench` with 3 local workers, one slowed FACTORx and router-biased
# routing onto experts it holds (the setting of bench/skew.sh), each with
# --stats (a calibrated cluster file) and --trace-routing.  A prediction
# never uses the run it predicts: its cluster file takes, per parameter, the
# median over the calibrations of the static runs (all but the predicted one
# for a static run), so one noisy run does not decide it:
#   - static run i:      its trace replayed with the placement it had (policy
#                        `trace`);
#   - rebalanced run i:  its trace replayed with the placements it switched to
#                        (policy `trace`);
#   - policy prediction: the static trace of round i replayed under POLICY
#                        (the simulator re-plans by itself), against the
#                        rebalanced run i.
# Printed per run: measured and predicted mean step, median 1-token
# (generation) step and median PP-token (prompt) step, in ms, and the ratios
# predicted / measured; at the end the median of each ratio over the rounds.
#   bench/simulate_check.sh MODEL.gguf      (model recipe in bench/skew.sh)
# Environment: ROUNDS (5), POLICY (migrate), EVERY (8: the first switch lands
# in the first repetition, so most prompt steps run rebalanced), SLOW (2), FACTOR (2),
# BIAS (0.08), EXPERTS (biased experts; default: found like bench/skew.sh),
# PP (64), TG (16), REPS (8: the median prompt step then ignores the first,
# cold one and the ones before the first switch).
# The calibration's `@cores N` line (local workers share the host's cores)
# makes the simulator model that sharing; how much other processes stretch
# long layers is fitted per static run (`@cores N STRETCH`: the value whose
# replay of that run's own trace meets its measured median prompt step) and
# pooled like the other parameters.  (The emulated
# slowdown sleeps (FACTOR - 1) x the wall time its computation took, so its
# whole time stretches with contention, as if it computed throughout: its CPU
# share, the cluster file's 7th column, is left at 1.)
set -euo pipefail
model=${1:?usage: bench/simulate_check.sh MODEL.gguf}
rounds=${ROUNDS:-5}
policy=${POLICY:-migrate}
every=${EVERY:-8}
slow=${SLOW:-2}
factor=${FACTOR:-2}
bias=${BIAS:-0.08}
pp=${PP:-64}
tg=${TG:-16}
reps=${REPS:-8}
bin=$(dirname "$0")/../moefleet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--threads 2 --workers 3 --worker-slowdown "$slow:$factor")

experts=${EXPERTS:-}
if [ -z "$experts" ]; then
	"$bin" bench -m "$model" --pp 8 --tg 0 --reps 1 "${common[@]}" --stats \
		--trace-routing "$tmp/probe.trace" >/dev/null 2>"$tmp/probe.err"
	idx=$(awk -v n="local-$slow" '$2 == n && $1 ~ /^[0-9]+$/ { print $1 }' "$tmp/probe.err")
	"$bin" placement show --trace "$tmp/probe.trace" --holders >"$tmp/holders"
	experts=$(awk -v w="$idx" '/^holders:/ { sub(":", "", $5); if ($6 == w && n < 6 && !($5 in u)) { u[$5] = 1; out = out (n++ ? "," : "") $5 } } END { print out }' "$tmp/holders")
fi
echo "slowed worker local-$slow ${factor}x; biased experts $experts (+$bias); $rounds rounds"

run() { # NAME extra-args...
	local name=$1
	shift
	"$bin" bench -m "$model" --pp "$pp" --tg "$tg" --reps "$reps" "${common[@]}" \
		--router-bias "$experts:$bias" --stats --trace-routing "$tmp/$name.trace" "$@" \
		>/dev/null 2>"$tmp/$name.err"
}
for r in $(seq "$rounds"); do
	run "static$r"
	run "rebal$r" --rebalance "$policy" --rebalance-every "$every"
done

# run RUN's calibration, workers sorted by name: "name speed memory latency
# bandwidth threads" lines and "@coordinator A B", "@cores N" lines
calib_of() { # RUN
	sed -n '/^# calibration/,/^@coordinator/p' "$tmp/$1.err" | grep -v '^#' | sort
}
# the worker names in the order run RUN numbered them (its trace's placement
# uses those numbers)
order_of() { # RUN
	awk '/^wkr/ { t = 1; next } t && $1 ~ /^[0-9]+$/ { print $2; next } t { exit }' "$tmp/$1.err"
}
measured() { # RUN -> mean, median of 1-token steps, median of PP-token steps
	local mean g p
	mean=$(sed -nE 's/^# calibration: [0-9]+ steps, mean step ([0-9.]+) ms.*/\1/p' "$tmp/$1.err")
	g=$(sed -nE 's/^steps of 1 token\(s\): [0-9]+, median ([0-9.]+) ms/\1/p' "$tmp/$1.err")
	p=$(sed -nE "s/^steps of $pp token\\(s\\): [0-9]+, median ([0-9.]+) ms/\\1/p" "$tmp/$1.err")
	echo "${mean:-0} ${g:-0} ${p:-0}"
}
predict() { # CLUSTER-FILE TRACE POLICY -> the same, predicted
	"$bin" placement simulate --trace "$2" --workers "$1" --policy "$3" --rebalance-every "$every" >"$tmp/sim.out"
	local mean g p
	mean=$(sed -nE 's/.* step ([0-9.]+) ms, median step.*/\1/p' "$tmp/sim.out")
	g=$(sed -nE 's/.*steps of 1 token\(s\): [0-9]+, median ([0-9.]+) ms/\1/p' "$tmp/sim.out")
	p=$(sed -nE "s/.*steps of $pp token\\(s\\): [0-9]+, median ([0-9.]+) ms/\\1/p" "$tmp/sim.out")
	echo "${mean:-0} ${g:-0} ${p:-0}"
}
# a cluster file from the calibrations given on stdin (one per run, each
# line prefixed by nothing: lines of several runs mixed), taking the median of
# every numeric field per worker / per @-line, workers in the order ORDER
pool() { # ORDER
	awk -v order="$1" '
		{ key = $1; n[key]++; nf[key] = NF; for (i = 2; i <= NF; i++) v[key, i, n[key]] = $i }
		function med(key, i,   c, j, k, t, a) { c = n[key]; for (j = 1; j <= c; j++) a[j] = v[key, i, j]
			for (j = 1; j <= c; j++) for (k = j + 1; k <= c; k++) if (a[k] + 0 < a[j] + 0) { t = a[j]; a[j] = a[k]; a[k] = t }
			return c % 2 ? a[(c + 1) / 2] : sprintf("%.15g", (a[c / 2] + a[c / 2 + 1]) / 2) }
		function line(key,   s, i) { s = key; for (i = 2; i <= nf[key]; i++) s = s " " med(key, i); return s }
		END { for (key in n) if (key ~ /^@/) print line(key)
			m = split(order, o, "\n"); for (i = 1; i <= m; i++) if (o[i] in n) print line(o[i]) }'
}
# how much other processes stretched long layers in static run RUN: the
# STRETCH of `@cores N STRETCH` whose replay of RUN's own trace comes closest
# to RUN's measured median prompt step (long, CPU-bound steps are what the
# stretch decides; short steps are not stretched); prints RUN's calibration
# with that @cores line
fit_stretch() { # RUN
	calib_of "$1" | pool "$(order_of "$1")" >"$tmp/fit.txt"
	local n want best=1 err=1e30 x p
	n=$(sed -nE 's/^@cores ([0-9.]+).*/\1/p' "$tmp/fit.txt")
	want=$(measured "$1" | awk '{ print $3 }')
	if [ -n "$n" ]; then
		for x in 1 1.25 1.5 1.75 2 2.25 2.5 2.75 3 3.25 3.5 3.75 4 4.5 5 5.5 6 7 8; do
			{ echo "@cores $n $x"; grep -v '^@cores' "$tmp/fit.txt"; } >"$tmp/fitc.txt"
			p=$(predict "$tmp/fitc.txt" "$tmp/$1.trace" trace | awk '{ print $3 }')
			if awk -v p="$p" -v w="$want" -v e="$err" 'BEGIN { d = p - w; d = d < 0 ? -d : d; exit !(d < e) }'; then
				err=$(awk -v p="$p" -v w="$want" 'BEGIN { d = p - w; print d < 0 ? -d : d }')
				best=$x
			fi
		done
	fi
	calib_of "$1" | { [ -n "$n" ] && echo "@cores $n $best"; grep -v '^@cores'; }
}
for r in $(seq "$rounds"); do
	fit_stretch "static$r" >"$tmp/cal$r.txt"
done
echo "per static run: $(for r in $(seq "$rounds"); do grep -h '^@' "$tmp/cal$r.txt" | tr '\n' ' '; echo -n '| '; done)"
pooled() { # EXCLUDED-ROUND (0: none) TARGET-RUN
	for r in $(seq "$rounds"); do
		[ "$r" = "$1" ] || cat "$tmp/cal$r.txt"
	done | pool "$(order_of "$2")"
}
row() { # LABEL "MEASURED" "PREDICTED" KIND
	set -- "$1" $2 $3 "$4"
	awk -v l="$1" -v m1="$2" -v m2="$3" -v m3="$4" -v p1="$5" -v p2="$6" -v p3="$7" -v k="$8" \
		-v out="$tmp/ratios" 'BEGIN {
		r1 = m1 > 0 ? p1 / m1 : 0; r2 = m2 > 0 ? p2 / m2 : 0; r3 = m3 > 0 ? p3 / m3 : 0
		printf "%-18s %8.2f / %7.2f %8.2f / %7.2f %8.2f / %7.2f   %.2f %.2f %.2f\n", l, m1, p1, m2, p2, m3, p3, r1, r2, r3
		printf "%s %.4f %.4f %.4f\n", k, r1, r2, r3 >> out }'
}
: >"$tmp/ratios"
printf '%-18s %18s %18s %18s   %s\n' run "mean step ms" "1-token steps" "$pp-token steps" "predicted / measured"
printf '%-18s %18s %18s %18s\n' "" "meas. / pred." "median meas./pred." "median meas./pred."
for r in $(seq "$rounds"); do
	pooled "$r" "static$r" >"$tmp/c_s$r.txt"
	pooled 0 "rebal$r" >"$tmp/c_r$r.txt"
	pooled 0 "static$r" >"$tmp/c_p$r.txt"
	row "static $r" "$(measured "static$r")" "$(predict "$tmp/c_s$r.txt" "$tmp/static$r.trace" trace)" static
	row "rebalanced $r" "$(measured "rebal$r")" "$(predict "$tmp/c_r$r.txt" "$tmp/rebal$r.trace" trace)" rebalanced
	row "$policy replay $r" "$(measured "rebal$r")" "$(predict "$tmp/c_p$r.txt" "$tmp/static$r.trace" "$policy")" "$policy-replay"
done
echo "pooled cluster file (all static runs):"
pooled 0 static1 | sed 's/^/  /'
awk -v pp="$pp" '{ k = $1; n[k]++; m[k, n[k]] = $2; d[k, n[k]] = $3; q[k, n[k]] = $4; if (!(k in seen)) { seen[k] = 1; order[no++] = k } }
	function med(a, k, c,   i, j, t, v) { for (i = 1; i <= c; i++) v[i] = a[k, i]
		for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
		return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2 }
	END { for (i = 0; i < no; i++) { k = order[i]
		printf "%s: predicted / measured, median over %d runs: mean step %.2f, 1-token steps %.2f, %d-token steps %.2f\n", k, n[k], med(m, k, n[k]), med(d, k, n[k]), pp, med(q, k, n[k]) } }' "$tmp/ratios"
