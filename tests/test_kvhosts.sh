#!/usr/bin/env bash
# KV hosts: the sharded attention (--kv-shards) with the chains' pages on the
# workers must give the bits of the same numerics in the process.  For a
# model of each architecture with KV pages (qwen3moe, gpt-oss, deepseek2) and
# a prompt of 1,400 tokens plus 100 decode steps: `moefleet logits
# --kv-shards 4 --kv-page 128` in-process, with 2 local workers over ZeroMQ
# ipc:// (2 hosts), 3 workers limited to 1 host, the chains kept here
# (--kv-hosts 0), under mpirun (3 ranks), and with 1 worker holding the
# experts and 2 --kv-only workers as the hosts (--kv-workers 2).  A cluster of --kv-only
# workers alone is refused with an error (the coordinator computes no routed
# experts itself).  DeepSeek-V4's indexer pages scored on the hosts give the
# logits of the plain in-process run (workers over zmq and under mpirun).
# Then a KV host killed in the
# middle of a generation: the coordinator stops with an error naming the
# lost host, never hangs; and the coordinator, its memory capped (cgroup v1)
# below the KV of the context, generates the tokens of an uncapped run when
# its pages live on KV hosts; a worker capped at 256 MiB with no budget
# options shares its node between experts and pages, and the coordinator
# counts for pages what the experts leave.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$(cd "$top_builddir" && pwd)/moefleet
wbin=$(cd "$top_builddir" && pwd)/moefleet-worker
data=$(cd "$top_srcdir/tests/data" && pwd)
tmp=$(mktemp -d)
pids=()
cg=
cgw=
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
	wait 2>/dev/null
	[ -n "$cg" ] && rmdir "$cg" 2>/dev/null
	[ -n "$cgw" ] && rmdir "$cgw" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
n=0
fail=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; fail=$((fail + 1)); }
have_mpi=0
command -v mpirun >/dev/null 2>&1 && have_mpi=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none

# ids N SEED [BELOW]: N token ids from 3 to BELOW - 1 (default 400)
ids() { awk -v n="$1" -v s="$2" -v m="$((${3:-400} - 3))" 'BEGIN { for (i = 0; i < n; i++) {
	s = (s * 1103515245 + 12345) % 2147483648; printf "%s%d", (i ? "," : ""), 3 + s % m } }'; }
ids 1500 7 >"$tmp/ids"
sh=(--kv-shards 4 --kv-page 128)

for m in qwen3moe-tiny-mxfp4 gptoss-tiny-mxfp4 ds2-tiny-q4_0; do
	run() { timeout 120 "$bin" logits -m "$data/$m.gguf" --tokens @"$tmp/ids" --n-prompt 1400 \
		--threads 2 "${sh[@]}" "$@" 2>"$tmp/err"; }
	if ! run --out "$tmp/inproc.f32"; then
		notok "$m: in-process --kv-shards run failed: $(head -1 "$tmp/err")"
		continue
	fi
	if run --out "$tmp/w2.f32" --workers 2 && grep -q 'KV hosts: 2 worker' "$tmp/err" &&
		cmp -s "$tmp/inproc.f32" "$tmp/w2.f32"; then
		ok "$m: --workers 2, pages on 2 KV hosts (zmq ipc), bit-identical"
	else
		notok "$m: --workers 2 with KV hosts differs or failed: $(grep -m1 -E 'error|KV' "$tmp/err")"
	fi
	if run --out "$tmp/w3.f32" --workers 3 --kv-hosts 1 && grep -q 'KV hosts: 1 worker' "$tmp/err" &&
		cmp -s "$tmp/inproc.f32" "$tmp/w3.f32"; then
		ok "$m: --workers 3 --kv-hosts 1 bit-identical"
	else
		notok "$m: --workers 3 --kv-hosts 1 differs or failed: $(grep -m1 -E 'error|KV' "$tmp/err")"
	fi
	if run --out "$tmp/h0.f32" --workers 2 --kv-hosts 0 && ! grep -q 'KV hosts' "$tmp/err" &&
		cmp -s "$tmp/inproc.f32" "$tmp/h0.f32"; then
		ok "$m: --workers 2 --kv-hosts 0 (chains here) bit-identical"
	else
		notok "$m: --kv-hosts 0 differs or failed: $(head -1 "$tmp/err")"
	fi
	# 1 expert worker + 2 --kv-only workers (--kv-workers 2): the KV-only
	# ones are the hosts and hold no experts
	run --out "$tmp/ko.f32" --workers 1 --kv-workers 2
	rc=$?
	if [ "$rc" -eq 0 ] &&
		[ "$(grep -c 'KV host [01]: worker [0-9] (local-kv-[01]), KV-only' "$tmp/err")" -eq 2 ] &&
		[ "$(grep -c 'worker [0-9]: 0 experts' "$tmp/err")" -eq 2 ] &&
		grep -q 'worker [0-9]: [1-9][0-9]* experts' "$tmp/err" &&
		cmp -s "$tmp/inproc.f32" "$tmp/ko.f32"; then
		ok "$m: --workers 1 --kv-workers 2: the 2 --kv-only hosts hold no experts, bit-identical"
	else
		notok "$m: --kv-only hosts: exit $rc, $(grep -m1 -E 'error|KV host' "$tmp/err")"
	fi
	if [ $have_mpi -eq 1 ]; then
		if ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" timeout 120 mpirun -np 3 \
			"$bin" logits -m "$data/$m.gguf" --tokens @"$tmp/ids" --n-prompt 1400 --threads 1 \
			"${sh[@]}" --transport mpi --out "$tmp/mpi.f32" >/dev/null 2>"$tmp/err" &&
			cmp -s "$tmp/inproc.f32" "$tmp/mpi.f32"; then
			ok "$m: mpirun -np 3, pages on 2 KV hosts, bit-identical"
		else
			notok "$m: mpirun -np 3 differs or failed: $(grep -m1 -E 'error|KV' "$tmp/err")"
		fi
	else
		ok "$m: mpirun # SKIP mpirun not installed"
	fi
done

# DeepSeek-V4 (ds4-tiny-mxfp4: 2 CSA layers, top-k 8): the indexer keys go to
# the KV hosts in pages of 16 entries (--kv-page 64), which score them; the
# selection, and so the logits, are those of the plain in-process run.
m=ds4-tiny-mxfp4
ds4=(logits -m "$data/$m.gguf" --tokens @"$tmp/ids" --n-prompt 1400)
ds4sh=(--kv-shards 4 --kv-page 64)
if ! timeout 120 "$bin" "${ds4[@]}" --threads 2 --out "$tmp/ds4.f32" 2>"$tmp/err"; then
	notok "$m: in-process run failed: $(head -1 "$tmp/err")"
else
	if timeout 120 "$bin" "${ds4[@]}" --threads 2 "${ds4sh[@]}" --workers 2 --stats \
		--out "$tmp/ds4w2.f32" 2>"$tmp/err" &&
		grep -q 'KV hosts: 2 worker' "$tmp/err" && cmp -s "$tmp/ds4.f32" "$tmp/ds4w2.f32" &&
		grep -q 'moefleet_worker_attn_batches_total{worker="1".*} [1-9]' "$tmp/err"; then
		ok "$m: --workers 2, indexer pages scored on 2 KV hosts (zmq ipc), bit-identical"
	else
		notok "$m: --workers 2 with KV hosts differs or failed: $(grep -m1 -E 'error|KV' "$tmp/err")"
	fi
	# the prompt in steps of 100 tokens: pages ship between the steps
	if timeout 120 "$bin" "${ds4[@]}" --threads 2 --batch 100 --out "$tmp/ds4b.f32" 2>"$tmp/err" &&
		timeout 120 "$bin" "${ds4[@]}" --threads 2 --batch 100 "${ds4sh[@]}" --workers 2 \
			--out "$tmp/ds4bw2.f32" 2>"$tmp/err" && grep -q 'KV hosts: 2 worker' "$tmp/err" &&
		cmp -s "$tmp/ds4b.f32" "$tmp/ds4bw2.f32"; then
		ok "$m: prompt in steps of 100, --workers 2, bit-identical"
	else
		notok "$m: steps of 100 with KV hosts differ or failed: $(grep -m1 -E 'error|KV' "$tmp/err")"
	fi
	if [ $have_mpi -eq 1 ]; then
		if ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" timeout 120 mpirun -np 3 \
			"$bin" "${ds4[@]}" --threads 1 "${ds4sh[@]}" --transport mpi --out "$tmp/ds4mpi.f32" \
			>/dev/null 2>"$tmp/err" && cmp -s "$tmp/ds4.f32" "$tmp/ds4mpi.f32"; then
			ok "$m: mpirun -np 3, indexer pages on 2 KV hosts, bit-identical"
		else
			notok "$m: mpirun -np 3 differs or failed: $(grep -m1 -E 'error|KV' "$tmp/err")"
		fi
	else
		ok "$m: mpirun # SKIP mpirun not installed"
	fi
fi

# Only --kv-only workers: nobody holds the experts, and the coordinator
# computes none itself: a clear error at start, no hang.
ep=ipc://$tmp/kvonly2.sock
timeout 60 "$bin" logits -m "$data/qwen3moe-tiny-mxfp4.gguf" --tokens 1,2,3 "${sh[@]}" \
	--listen "$ep" --expect-workers 2 --out "$tmp/none.f32" 2>"$tmp/none.err" &
coord=$!
pids+=("$coord")
kvo=()
for i in 1 2; do
	"$wbin" --connect "$ep" --threads 1 --kv-only 2>/dev/null &
	kvo+=($!)
done
pids+=("${kvo[@]}")
wait "$coord"
rc=$?
kill -9 "${kvo[@]}" 2>/dev/null
wait "${kvo[@]}" 2>/dev/null
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] &&
	grep -q '0 of the 2 workers offer memory for experts (2 are KV-only' "$tmp/none.err"; then
	ok "only --kv-only workers: refused at start, naming them (exit $rc)"
else
	notok "only --kv-only workers: exit $rc, $(grep -m1 error "$tmp/none.err")"
fi
# --kv-only takes no -m or --memory, and no --kv-memory 0
bad=0
for a in "-m $data/qwen3moe-tiny-mxfp4.gguf" "--memory 1G" "--kv-memory 0"; do
	# shellcheck disable=SC2086
	timeout 10 "$wbin" --connect "ipc://$tmp/none.sock" --kv-only $a 2>"$tmp/bad.err"
	[ $? -eq 2 ] && grep -q -- '--kv-only holds no experts' "$tmp/bad.err" || bad=1
done
if [ $bad -eq 0 ]; then
	ok "moefleet-worker --kv-only with -m, --memory or --kv-memory 0: a usage error"
else
	notok "moefleet-worker --kv-only with an expert option was not refused"
fi

# A KV host killed during a generation: the chains go to the host left and
# the sequence is computed again from its ids, so the generated ids are the
# in-process run's.  With no host left: a named error, no hang.
m=$data/qwen3moe-tiny-mxfp4.gguf
gen=(generate -m "$m" --tokens 1,2,3 -n 3000 --print-ids --threads 1 --kv-shards 4 --kv-page 64)
"$bin" "${gen[@]}" >"$tmp/gen.out" 2>/dev/null
tail -1 "$tmp/gen.out" >"$tmp/gen.ids"
# kill NAME KV_MEMORY_OF_W0: w0 and w1, w1 killed once the generation runs;
# sets rc
kill_run() {
	local name=$1
	ep=ipc://$tmp/$name.sock
	timeout 120 "$bin" "${gen[@]}" --listen "$ep" --expect-workers 2 --worker-timeout 3000 \
		>"$tmp/$name.out" 2>"$tmp/$name.err" &
	coord=$!
	pids+=("$coord")
	"$wbin" --connect "$ep" --threads 1 --name w0 --kv-memory "$2" 2>/dev/null &
	w0=$!
	"$wbin" --connect "$ep" --threads 1 --name w1 2>/dev/null &
	w1=$!
	pids+=("$w0" "$w1")
	for _ in $(seq 600); do
		grep -q 'KV hosts' "$tmp/$name.err" 2>/dev/null && [ -s "$tmp/$name.out" ] && break
		sleep 0.05
	done
	kill -9 "$w1" 2>/dev/null
	wait "$coord"
	rc=$?
	kill -9 "$w0" 2>/dev/null
	wait "$w0" "$w1" 2>/dev/null
}
kill_run recover 1G
if [ "$rc" -eq 0 ] && grep -q 'computed again on 1 host' "$tmp/recover.err" &&
	cmp -s "$tmp/gen.ids" <(tail -1 "$tmp/recover.out"); then
	ok "a KV host killed mid-generation: computed again on the host left, the in-process ids"
else
	notok "killed KV host: exit $rc, $(grep -m1 -E 'error|again' "$tmp/recover.err")"
fi
# the same for DeepSeek-V4's indexer pages
gen=(generate -m "$data/ds4-tiny-mxfp4.gguf" --tokens 1,2,3 -n 3000 --ignore-eos --print-ids
	--threads 1 --kv-shards 4 --kv-page 64)
"$bin" "${gen[@]::${#gen[@]}-4}" >"$tmp/gen.out" 2>/dev/null
tail -1 "$tmp/gen.out" >"$tmp/gen.ids"
kill_run recover4 1G
if [ "$rc" -eq 0 ] && grep -q 'computed again on 1 host' "$tmp/recover4.err" &&
	cmp -s "$tmp/gen.ids" <(tail -1 "$tmp/recover4.out"); then
	ok "deepseek4: a KV host killed mid-generation: computed again, the in-process ids"
else
	notok "deepseek4 killed KV host: exit $rc, $(grep -m1 -E 'error|again' "$tmp/recover4.err")"
fi
kill_run lost 0
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q 'KV host 0 (worker [0-9]) is lost' "$tmp/lost.err" &&
	grep -q 'no live worker offers memory for KV pages' "$tmp/lost.err"; then
	ok "the only KV host killed: the coordinator stops, naming it (exit $rc)"
else
	notok "the only KV host killed: exit $rc, $(grep -m1 error "$tmp/lost.err")"
fi

# Hosts that cannot hold every slot's whole context are refused at start.
ep=ipc://$tmp/small.sock
timeout 60 "$bin" logits -m "$data/qwen3moe-tiny-mxfp4.gguf" --tokens @"$tmp/ids" --n-prompt 1400 \
	"${sh[@]}" --listen "$ep" --expect-workers 2 --out "$tmp/small.f32" 2>"$tmp/small.err" &
coord=$!
pids+=("$coord")
for i in 0 1; do
	"$wbin" --connect "$ep" --threads 1 --kv-memory 100K 2>/dev/null &
	pids+=($!)
done
wait "$coord"
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] &&
	grep -q 'would hold up to .* but offers 102400 (moefleet-worker --kv-memory)' "$tmp/small.err"; then
	ok "hosts offering 100K for a context that needs more: refused at start (exit $rc)"
else
	notok "small KV hosts: exit $rc, $(grep -m1 error "$tmp/small.err")"
fi

# The coordinator's memory capped below the KV of the context (cgroup v1):
# the pages on 2 KV hosts, the generated ids of an uncapped run.
mem=/sys/fs/cgroup/memory
# memcg NAME WHAT: makes the cgroup $mem/NAME-$$, or counts WHAT as skipped
# (1) where there is none to make, or the memory of a sanitizer build
memcg() {
	if ldd "$bin" 2>/dev/null | grep -q libasan; then
		ok "$2 # SKIP sanitizer build (shadow memory)"
	elif [ "$(id -u)" -ne 0 ] || [ ! -w "$mem" ] || ! mkdir "$mem/$1-$$" 2>/dev/null; then
		ok "$2 # SKIP no writable cgroup v1 memory controller"
	else
		return 0
	fi
	return 1
}
if memcg moefleet-kv "memory-capped coordinator"; then
	cg=$mem/moefleet-kv-$$
	# demo-kjv: 2 MiB of KV per 1K tokens, 16 MiB for this prompt; the
	# coordinator peaks near 53 MB with the KV, 31 MB without (measured)
	ids 8000 11 3003 >"$tmp/long"
	gen=(generate -m "$data/demo-kjv.gguf" --tokens @"$tmp/long" -n 8 --print-ids --threads 2
		--kv-shards 8 --kv-page 512)
	"$bin" "${gen[@]}" >"$tmp/free.out" 2>"$tmp/free.err"
	tail -1 "$tmp/free.out" >"$tmp/free.ids"
	echo $((30 << 20)) >"$cg/memory.limit_in_bytes"
	echo 0 >"$cg/memory.swappiness" 2>/dev/null
	capped() { # runs the coordinator in the cgroup
		sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" "$@"
	}
	capped timeout 120 "$bin" "${gen[@]}" >"$tmp/cap0.out" 2>"$tmp/cap0.err"
	rc0=$?
	ep=ipc://$tmp/cap.sock
	capped timeout 120 "$bin" "${gen[@]}" --listen "$ep" --expect-workers 2 >"$tmp/cap.out" \
		2>"$tmp/cap.err" &
	coord=$!
	pids+=("$coord")
	for i in 0 1; do
		"$wbin" --connect "$ep" --threads 1 --name "c$i" 2>/dev/null &
		pids+=($!)
	done
	wait "$coord"
	rc=$?
	tail -1 "$tmp/cap.out" >"$tmp/cap.ids"
	if [ "$rc0" -ne 0 ] && [ "$rc" -eq 0 ] && cmp -s "$tmp/free.ids" "$tmp/cap.ids"; then
		ok "capped at 30 MiB: fails alone (exit $rc0), with 2 KV hosts the uncapped run's ids"
	else
		notok "capped coordinator: alone exit $rc0, with hosts exit $rc, $(grep -m1 error "$tmp/cap.err")"
	fi
fi
# A worker with neither --memory nor --kv-memory shares its node between
# experts and KV pages: capped at 256 MiB (cgroup v1), it offers half of
# that, 134217728 bytes, to both; the coordinator counts for its pages the
# offer less the expert bytes of its Ready, as the refusal of a context too
# long for it shows (-n 2000000: a 1.5 GB sequence).
if memcg moefleet-kvw "shared expert and KV budget"; then
	cgw=$mem/moefleet-kvw-$$
	echo $((256 << 20)) >"$cgw/memory.limit_in_bytes"
	ep=ipc://$tmp/shared.sock
	timeout 60 "$bin" generate -m "$data/qwen3moe-tiny-mxfp4.gguf" --tokens 1,2,3 -n 2000000 \
		"${sh[@]}" --listen "$ep" --expect-workers 1 >/dev/null 2>"$tmp/shared.err" &
	coord=$!
	pids+=("$coord")
	timeout 60 sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cgw" \
		"$wbin" --connect "$ep" --threads 1 2>"$tmp/sharedw.err" &
	pids+=($!)
	wait "$coord"
	rc=$?
	offer=$(sed -n 's/.*KV host 0 would hold up to [0-9]* bytes .* but offers \([0-9]*\) .*/\1/p' \
		"$tmp/shared.err")
	held=$(sed -n 's/.*worker: epoch 1: [0-9]* experts held (\([0-9.]*\) MiB).*/\1/p' \
		"$tmp/sharedw.err")
	if [ "$rc" -ne 0 ] && [ -n "$offer" ] && [ -n "$held" ] &&
		grep -q 'the same memory: the pages take what the experts leave' "$tmp/sharedw.err" &&
		awk -v o="$offer" -v h="$held" 'BEGIN { d = (134217728 - o) / 1048576
			exit !(h > 0 && d > h - 0.05 && d < h + 0.05) }'; then
		ok "shared budget: the coordinator counts 134217728 less the $held MiB of experts ($offer)"
	else
		notok "shared budget: exit $rc, offer '${offer}', held '${held}', $(grep -m1 error "$tmp/shared.err")"
	fi
fi
# bench --random-kv (benchmark only): the context filled without a prompt,
# its complete pages shipped to the 2 hosts as a prompt's would be (10 pages
# of 128 per layer for 1,400 positions), the decode steps' per-layer
# statistics (one row each), a finite speed; refused without --depth.
b=(bench -m "$data/qwen3moe-tiny-mxfp4.gguf" --pp 0 --tg 4 --reps 1 --threads 1 "${sh[@]}")
timeout 60 "$bin" "${b[@]}" --depth 1400 --random-kv --workers 2 --stats >"$tmp/rkv.out" \
	2>"$tmp/rkv.err"
rc=$?
layers=$(awk '/^KV hosts, per layer/ { on = 1; next } on && $1 ~ /^[0-9]+$/ && $2 == 4 { n++ }
	on && $1 == "all" { on = 0 } END { print n + 0 }' "$tmp/rkv.err")
pages=$(awk '/^KV host [01]: [0-9]+ pages shipped/ { n += $4 } END { print n + 0 }' "$tmp/rkv.err")
tgs=$(sed -n 's/^bench: pp0 0.00 tok\/s, tg4 \([0-9.]*\) tok\/s$/\1/p' "$tmp/rkv.out")
if [ "$rc" -eq 0 ] && [ "$layers" -gt 0 ] && [ "${pages:-0}" -eq $((10 * layers)) ] &&
	awk -v t="$tgs" 'BEGIN { exit !(t + 0 > 0) }'; then
	ok "bench --random-kv: $pages pages on the hosts ($layers layers), tg $tgs tok/s"
else
	notok "bench --random-kv: exit $rc, $layers layers, ${pages:-no} pages, tg '$tgs'"
fi
timeout 60 "$bin" "${b[@]}" --random-kv >/dev/null 2>"$tmp/rkv0.err"
rc=$?
if [ "$rc" -ne 0 ] && grep -q 'random-kv needs --depth' "$tmp/rkv0.err"; then
	ok "bench --random-kv without --depth: refused (exit $rc)"
else
	notok "bench --random-kv without --depth: exit $rc"
fi

echo "1..$n"
[ "$fail" -eq 0 ]
