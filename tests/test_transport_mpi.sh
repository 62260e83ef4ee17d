#!/usr/bin/env bash
# The MPI transport between real ranks: runs tests/test_transport_mpi under
# `mpirun -np 3` (rank 0 coordinator, ranks 1-2 workers) and prints its TAP
# lines, one more for mpirun's exit status, then the plan.  Skips (exit 77,
# "1..0 # SKIP") when mpirun or the program is missing or MPI was not built.
set -u
# Open MPI's dlopened components keep allocations until exit; in sanitizer
# builds LeakSanitizer would report them as leaks of the ranks.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
top_builddir=${top_builddir:-.}
prog=$top_builddir/tests/test_transport_mpi

if ! command -v mpirun >/dev/null 2>&1; then
	echo "1..0 # SKIP mpirun not found"
	exit 77
fi
if [ ! -x "$prog" ]; then
	echo "1..0 # SKIP $prog not built"
	exit 77
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1
# as root mpirun wants both flags; 3 ranks on 2 cores need oversubscription
limit=""
command -v timeout >/dev/null 2>&1 && limit="timeout 60"
$limit mpirun --allow-run-as-root --oversubscribe -np 3 "$prog" >"$tmp/out" 2>"$tmp/err"
status=$?

if grep -q '^1\.\.0 # SKIP' "$tmp/out"; then
	grep -m1 '^1\.\.0 # SKIP' "$tmp/out"
	exit 77
fi
cat "$tmp/err" >&2
grep -E '^(not )?ok' "$tmp/out"
n=$(grep -cE '^(not )?ok' "$tmp/out")
fail=$(grep -c '^not ok' "$tmp/out")
if [ "$status" -eq 0 ]; then
	echo "ok - mpirun exited with status 0"
else
	echo "not ok - mpirun exited with status $status"
	fail=$((fail + 1))
fi
echo "1..$((n + 1))"
[ "$fail" -eq 0 ]
