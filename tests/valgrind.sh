#!/usr/bin/env bash
# valgrind memcheck on an end-to-end cluster run: the coordinator and its two
# local workers (ZeroMQ ipc://) compute a tiny model's logits; every process
# must finish without memory errors and without definite or indirect leaks,
# and the logits must equal the in-process run.  Slow (about a minute), so CI
# runs it (.ci/run), not `make check`.  Prints TAP.
#   top_srcdir=SRC top_builddir=BUILD tests/valgrind.sh
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
data=$top_srcdir/tests/data
command -v valgrind >/dev/null 2>&1 || { echo "1..0 # SKIP valgrind not installed"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
m=qwen3moe-tiny-mxfp4
tokens=$(sed -n 2p "$data/$m.case")
np=$(sed -n 1p "$data/$m.case")
export OPENBLAS_NUM_THREADS=1
"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --out "$tmp/inproc.f32" 2>/dev/null
# --trace-children: the workers the coordinator starts run under memcheck too,
# each with its own log (%p: the pid)
valgrind --tool=memcheck --trace-children=yes --leak-check=full \
	--errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
	--error-exitcode=99 --log-file="$tmp/vg.%p.log" \
	"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --threads 2 \
	--workers 2 --out "$tmp/cluster.f32" 2>"$tmp/err"
st=$?
logs=$(ls "$tmp"/vg.*.log 2>/dev/null | wc -l)
bad=$(grep -L "ERROR SUMMARY: 0 errors" "$tmp"/vg.*.log 2>/dev/null)
echo "1..3"
if [ "$st" -eq 0 ]; then echo "ok 1 - coordinator under valgrind exits 0"; else
	echo "not ok 1 - coordinator exited with $st"; sed 's/^/# /' "$tmp/err" | tail -5; fi
if [ "$logs" -ge 3 ] && [ -z "$bad" ]; then
	echo "ok 2 - $logs processes (coordinator + workers): no memory errors, no leaks"
else
	echo "not ok 2 - memcheck found problems in $logs process log(s)"
	for f in $bad; do grep -E "ERROR SUMMARY|definitely|indirectly|Invalid|uninitialised" "$f" | head -8 | sed 's/^/# /'; done
fi
if cmp -s "$tmp/inproc.f32" "$tmp/cluster.f32"; then echo "ok 3 - logits equal the in-process run"; else
	echo "not ok 3 - logits differ"; fi
