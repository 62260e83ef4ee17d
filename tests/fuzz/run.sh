#!/usr/bin/env bash
# Runs one libFuzzer target for a while on its corpus.
#   tests/fuzz/run.sh TARGET SECONDS [libFuzzer options...]
# TARGET is gguf, wire, tokenizer or http; the programs come from a build configured
# with `./configure --enable-fuzz CC=clang` (FUZZ_BUILD, default: the current
# directory).  New inputs that reach new code go to a scratch copy of
# tests/fuzz/corpus/TARGET (set FUZZ_KEEP=1 to add them to the source corpus
# instead, or FUZZ_CORPUS=DIR to keep them in DIR across runs; minimise with
#   fuzz_TARGET -merge=1 tests/fuzz/corpus/TARGET.new DIR tests/fuzz/corpus/TARGET
# before committing); crashes are written
# to tests/fuzz/regress/TARGET/ so that `make check` replays them from then on.
# Prints libFuzzer's final statistics (executions, coverage) and exits non-zero
# on a crash.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
target=${1:?usage: run.sh TARGET SECONDS [libFuzzer options]}
seconds=${2:?usage: run.sh TARGET SECONDS [libFuzzer options]}
shift 2
build=${FUZZ_BUILD:-.}
prog=$build/tests/fuzz/fuzz_$target
[ -x "$prog" ] || {
	echo "run.sh: $prog not found: configure a build with --enable-fuzz CC=clang and run make" >&2
	exit 2
}
seeds=$top/tests/fuzz/corpus/$target
regress=$top/tests/fuzz/regress/$target
mkdir -p "$regress"
if [ "${FUZZ_KEEP:-0}" = 1 ]; then
	corpus=$seeds
	extra=()
elif [ -n "${FUZZ_CORPUS:-}" ]; then
	corpus=$FUZZ_CORPUS
	mkdir -p "$corpus"
	extra=("$seeds")
else
	corpus=$(mktemp -d)
	trap 'rm -rf "$corpus"' EXIT
	extra=("$seeds")
fi
export top_srcdir=$top
dict=()
[ -f "$here/$target.dict" ] && dict=(-dict="$here/$target.dict")
# leaks are findings too; stderr of the target (its own error lines) is muted
ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1:malloc_context_size=0} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
	"$prog" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
	-close_fd_mask=2 -print_final_stats=1 -artifact_prefix="$regress/" "${dict[@]}" "$@" \
	"$corpus" "${extra[@]}"
