#!/usr/bin/env bash
# The distributed engine against the in-process one: for every test model,
# `moefleet logits` with local workers over ZeroMQ ipc://, with weights
# streamed from the coordinator, and under mpirun must write logits that are
# bit-identical to the in-process run.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
data=$top_srcdir/tests/data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; fail=$((fail + 1)); }

# the shipped vectors of every architecture, plus a few variants
models=$(grep -v '^#' "$data/vectors.list" | grep . | grep -v -- '-var-')
models="$models ds2-var-shared2-q4_0 gptoss-var-q4-s9 qwen3moe-var-s4_bf16"
have_mpi=0
command -v mpirun >/dev/null 2>&1 && have_mpi=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none

for m in $models; do
	tokens=$(sed -n 2p "$data/$m.case")
	np=$(sed -n 1p "$data/$m.case")
	run() { "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --threads 2 "$@" 2>"$tmp/err"; }
	if ! run --out "$tmp/inproc.f32"; then
		notok "$m: in-process run failed: $(head -1 "$tmp/err")"
		continue
	fi
	if run --out "$tmp/zmq.f32" --workers 3 && cmp -s "$tmp/inproc.f32" "$tmp/zmq.f32"; then
		ok "$m: --workers 3 (zmq ipc) bit-identical"
	else
		notok "$m: --workers 3 differs or failed: $(head -1 "$tmp/err")"
	fi
	if run --out "$tmp/stream.f32" --workers 2 --stream-weights --wire-dtype f32 &&
		cmp -s "$tmp/inproc.f32" "$tmp/stream.f32"; then
		ok "$m: --workers 2 with streamed weights, f32 wire, bit-identical"
	else
		notok "$m: streamed weights differ or failed: $(head -1 "$tmp/err")"
	fi
	if run --out "$tmp/rep.f32" --workers 3 --replicas 2 && cmp -s "$tmp/inproc.f32" "$tmp/rep.f32"; then
		ok "$m: --workers 3 --replicas 2 (rows spread over replicas) bit-identical"
	else
		notok "$m: replicas differ or failed: $(head -1 "$tmp/err")"
	fi
	if [ $have_mpi -eq 1 ]; then
		# Open MPI's dlopened components keep allocations until exit: no leak
		# reports for the ranks in sanitizer builds
		if ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" timeout 120 mpirun -np 4 "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" \
			--n-prompt "$np" --threads 1 --transport mpi --out "$tmp/mpi.f32" >/dev/null 2>"$tmp/err" &&
			cmp -s "$tmp/inproc.f32" "$tmp/mpi.f32"; then
			ok "$m: mpirun -np 4 bit-identical"
		else
			notok "$m: mpirun -np 4 differs or failed: $(grep -m1 . "$tmp/err")"
		fi
	else
		ok "$m: mpirun # SKIP mpirun not installed"
	fi
done
# live re-placement: experts move between workers while requests run, and
# no logit changes (each expert computes the same wherever it runs)
m=qwen3moe-tiny-mxfp4
tokens=$(sed -n 2p "$data/$m.case")
np=$(sed -n 1p "$data/$m.case")
"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --out "$tmp/inproc.f32" 2>/dev/null
for p in migrate hetero eplb; do
	if "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --workers 3 --replicas 2 \
		--rebalance $p --rebalance-every 2 --stats --out "$tmp/rb.f32" 2>"$tmp/err" &&
		cmp -s "$tmp/inproc.f32" "$tmp/rb.f32" &&
		grep -Eq 'balance: [1-9][0-9]* re-placement' "$tmp/err"; then
		ok "$m: live re-placement ($p) switched placements, logits bit-identical"
	else
		notok "$m: live re-placement ($p): $(grep -m1 -E 'error|re-placement' "$tmp/err")"
	fi
done
# after a switch every worker frees the experts it no longer needs: what it
# reports holding equals the placement in force plus the one being loaded
held_ok() { # stats file
	awk '/^[0-9]+ +local-/ { held[$1] = $(NF - 1) }
	     /^placement: worker/ { want[$3] = $6 }
	     END { n = 0; for (w in want) { n++; if (held[w] != want[w]) exit 1 }; exit n == 3 ? 0 : 1 }' "$1" &&
		grep -Eq 'released [1-9][0-9]* experts' "$1"
}
if "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --workers 3 \
	--rebalance hetero --rebalance-every 3 --stats --out "$tmp/rel.f32" 2>"$tmp/err" &&
	cmp -s "$tmp/inproc.f32" "$tmp/rel.f32" && held_ok "$tmp/err" &&
	grep -Eq '^moefleet_rebalances_total [1-9]' "$tmp/err" &&
	grep -Eq '^moefleet_worker_held_experts\{worker="2",name="[^"]*"\} [0-9]+$' "$tmp/err"; then
	ok "$m: replaced experts are released; held experts match the placement; metrics"
else
	notok "$m: release after re-placement: $(grep -m1 -E 'error|placement: worker' "$tmp/err")"
fi
# workers without a model file: the new experts are streamed between steps
if "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --workers 3 --replicas 2 \
	--stream-weights --rebalance eplb --rebalance-every 2 --stats --out "$tmp/lst.f32" 2>"$tmp/err" &&
	cmp -s "$tmp/inproc.f32" "$tmp/lst.f32" &&
	grep -Eq 'balance: [1-9][0-9]* re-placement' "$tmp/err" &&
	grep -Eq 'released [1-9][0-9]* experts' "$tmp/err"; then
	ok "$m: live re-placement with streamed weights, logits bit-identical"
else
	notok "$m: live streaming: $(grep -m1 -E 'error|re-placement' "$tmp/err")"
fi
# the skew benchmark's setting, functionally (timings are bench/skew.sh's):
# one worker slowed, routing biased; placements switch, logits unchanged
skew=(--router-bias 1,5,9:0.2)
"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" "${skew[@]}" --out "$tmp/skin.f32" 2>/dev/null
if "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --workers 3 --worker-slowdown 1:2 \
	"${skew[@]}" --rebalance hetero --rebalance-every 2 --stats --out "$tmp/sk.f32" \
	--trace-routing "$tmp/sk.trace" 2>"$tmp/err" &&
	cmp -s "$tmp/skin.f32" "$tmp/sk.f32" && grep -Eq 'balance: [1-9][0-9]* re-placement' "$tmp/err"; then
	ok "$m: slowed worker and biased routing: re-placed, logits bit-identical"
else
	notok "$m: skew: $(grep -m1 -E 'error|re-placement' "$tmp/err")"
fi
# --stats prints a cluster file (local workers: shared cores) that replays
# the run's own trace, placements as they switched (how close the prediction
# comes is bench/simulate_check.sh's business)
sed -n '/^# calibration/,/^@coordinator/p' "$tmp/err" >"$tmp/calib.txt"
if grep -q '^@cores [1-9]' "$tmp/calib.txt" && [ "$(grep -c '^local-' "$tmp/calib.txt")" -eq 3 ] &&
	"$bin" placement simulate --trace "$tmp/sk.trace" --workers "$tmp/calib.txt" --policy trace \
		>"$tmp/sim.out" 2>"$tmp/err" && grep -Eq 'migrated [0-9.]+ MiB' "$tmp/sim.out" &&
	! grep -q 'migrated 0.00 MiB' "$tmp/sim.out"; then
	ok "$m: --stats calibration replays the run's trace and its re-placements"
else
	notok "$m: calibration replay: $(head -c 300 "$tmp/calib.txt" "$tmp/err")"
fi
echo "1..$n"
[ "$fail" -eq 0 ]
