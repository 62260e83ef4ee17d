#!/usr/bin/env bash
# Routing traces and the placement simulator: tracing does not change the
# logits (in-process or with workers), the trace replays under every policy,
# and bad cluster files or truncated traces give one clear error.  TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
data=$top_srcdir/tests/data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0
check() { n=$((n + 1)); if eval "$2"; then echo "ok $n - $1"; else echo "not ok $n - $1"; fail=$((fail + 1)); fi; }

m=ds2-tiny-q4_0
tokens=$(sed -n 2p "$data/$m.case")
np=$(sed -n 1p "$data/$m.case")
run() { "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" "$@" 2>>"$tmp/err"; }
run --out "$tmp/plain.f32"
check "trace in-process: logits unchanged" 'run --out "$tmp/t1.f32" --trace-routing "$tmp/a.trace" && cmp -s "$tmp/plain.f32" "$tmp/t1.f32"'
check "trace with 2 workers, 2 replicas: logits unchanged" 'run --out "$tmp/t2.f32" --workers 2 --replicas 2 --trace-routing "$tmp/b.trace" && cmp -s "$tmp/plain.f32" "$tmp/t2.f32"'
# 17 steps (one prefill + 15 decodes + ...) x 2 MoE layers: at least 30 records
check "trace is non-trivial" '[ "$(stat -c %s "$tmp/b.trace")" -gt 1000 ]'
printf '# name speed mem latency_us bandwidth_MB/s\nw0 200000 100000000 100 1000\nw1 100000 100000000 100 1000\nw2 100000 100000000 500 100\n' >"$tmp/cluster.txt"
check "simulate: four policies, four report lines" \
	'"$bin" placement simulate --trace "$tmp/b.trace" --workers "$tmp/cluster.txt" --replicas 2 >"$tmp/sim.out" 2>>"$tmp/err" && [ "$(grep -c "messages/token" "$tmp/sim.out")" -eq 4 ]'
sed 's/^/# /' "$tmp/sim.out"
check "simulate with periodic rebalancing" \
	'"$bin" placement simulate --trace "$tmp/a.trace" --workers "$tmp/cluster.txt" --policy migrate --rebalance-every 4 --max-move 100000 >/dev/null 2>>"$tmp/err"'
printf 'w0 fast 100 1 1\n' >"$tmp/bad.txt"
check "bad cluster file: exit 1, one error line" \
	'! "$bin" placement simulate --trace "$tmp/a.trace" --workers "$tmp/bad.txt" 2>"$tmp/e1" && [ "$(grep -c "error:" "$tmp/e1")" -eq 1 ]'
head -c 700 "$tmp/a.trace" >"$tmp/cut.trace"
check "truncated trace: exit 1" \
	'! "$bin" placement simulate --trace "$tmp/cut.trace" --workers "$tmp/cluster.txt" >/dev/null 2>"$tmp/e2" && grep -q "error:" "$tmp/e2"'
check "unknown policy: exit 1" \
	'! "$bin" placement simulate --trace "$tmp/a.trace" --workers "$tmp/cluster.txt" --policy magic >/dev/null 2>&1'
check "usage errors: exit 2" '"$bin" placement simulate --trace x >/dev/null 2>&1; [ $? -eq 2 ]'
# b.trace was recorded with 2 workers and 2 replicas: with a 2-worker file the
# replay starts from that placement, so `static` and `trace` predict the same
# steps and `trace` moves nothing
printf 'w0 200000 100000000 100 1000\nw1 100000 100000000 100 1000\n' >"$tmp/two.txt"
sim_ms() { sed -nE 's/.* step ([0-9.]+) ms, median step.*/\1/p' "$1"; }
check "simulate --policy trace: the recorded placement, nothing migrated" \
	'"$bin" placement simulate --trace "$tmp/b.trace" --workers "$tmp/two.txt" --policy static >"$tmp/st.out" 2>>"$tmp/err" &&
	 "$bin" placement simulate --trace "$tmp/b.trace" --workers "$tmp/two.txt" --policy trace >"$tmp/tr.out" 2>>"$tmp/err" &&
	 grep -q "migrated 0.00 MiB" "$tmp/tr.out" && [ "$(sim_ms "$tmp/st.out")" = "$(sim_ms "$tmp/tr.out")" ] &&
	 grep -q "steps of 1 token(s): " "$tmp/tr.out"'
check "simulate --policy trace needs the trace's workers" \
	'! "$bin" placement simulate --trace "$tmp/b.trace" --workers "$tmp/cluster.txt" --policy trace >/dev/null 2>"$tmp/e3" && grep -q "error:" "$tmp/e3"'
# processor sharing can only slow steps down, and a stretch slows them more
{ echo "@cores 1"; cat "$tmp/two.txt"; } >"$tmp/shared.txt"
{ echo "@cores 1 3 0"; cat "$tmp/two.txt"; } >"$tmp/stretched.txt"
check "simulate @cores: shared cores >= own cores, stretched >= shared" \
	'"$bin" placement simulate --trace "$tmp/b.trace" --workers "$tmp/shared.txt" --policy static >"$tmp/sh.out" 2>>"$tmp/err" &&
	 "$bin" placement simulate --trace "$tmp/b.trace" --workers "$tmp/stretched.txt" --policy static >"$tmp/sx.out" 2>>"$tmp/err" &&
	 awk -v a="$(sim_ms "$tmp/st.out")" -v b="$(sim_ms "$tmp/sh.out")" -v c="$(sim_ms "$tmp/sx.out")" "BEGIN { exit !(a > 0 && b >= a && c > b) }"'
printf '@cores 0\nw0 200000 100000000 100 1000\n' >"$tmp/badcores.txt"
check "simulate: bad @cores line is an error" \
	'! "$bin" placement simulate --trace "$tmp/a.trace" --workers "$tmp/badcores.txt" >/dev/null 2>"$tmp/e4" && [ "$(grep -c "error:" "$tmp/e4")" -eq 1 ]'
# token positions: a prompt of N tokens is recorded at positions 0..N-1
ntok=$(echo "$tokens" | tr ',' '\n' | grep -c .)
check "trace records token positions 0..$((ntok - 1))" \
	'"$bin" placement show --trace "$tmp/a.trace" >"$tmp/show.out" 2>>"$tmp/err" && grep -q "positions: .*, 0\.\.$((ntok - 1))\$" "$tmp/show.out"'
# heatmaps: valid PNG / SVG of the documented size
# (width 60 + 2 * experts * 12 + 50, height 30 + layers * 12 + 40 for small models)
layers=$(sed -nE 's/^trace: .* ([0-9]+) layers x ([0-9]+) experts.*/\1/p' "$tmp/show.out")
experts=$(sed -nE 's/^trace: .* ([0-9]+) layers x ([0-9]+) experts.*/\2/p' "$tmp/show.out")
want_w=$((60 + 2 * experts * 12 + 50))
want_h=$((30 + layers * 12 + 40))
png_size() { od -An -tu1 -j16 -N8 "$1" | awk '{ printf "%d %d", $1 * 16777216 + $2 * 65536 + $3 * 256 + $4, $5 * 16777216 + $6 * 65536 + $7 * 256 + $8 }'; }
check "heatmap PNG: signature and ${want_w}x${want_h}" \
	'"$bin" placement show --trace "$tmp/b.trace" --out "$tmp/heat.png" >/dev/null 2>>"$tmp/err" &&
	 [ "$(od -An -tx1 -N8 "$tmp/heat.png" | tr -d " ")" = 89504e470d0a1a0a ] &&
	 [ "$(png_size "$tmp/heat.png")" = "$want_w $want_h" ]'
check "heatmap SVG: an <svg> of ${want_w}x${want_h}" \
	'"$bin" placement show --trace "$tmp/b.trace" --out "$tmp/heat.svg" >/dev/null 2>>"$tmp/err" &&
	 grep -q "<svg[^>]* width=\"${want_w}pt\" height=\"${want_h}pt\"" "$tmp/heat.svg"'
check "heatmap: unknown extension is an error" \
	'! "$bin" placement show --trace "$tmp/b.trace" --out "$tmp/heat.gif" >/dev/null 2>&1'
echo "1..$n"
[ "$fail" -eq 0 ]
