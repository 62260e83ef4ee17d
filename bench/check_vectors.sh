#!/usr/bin/env bash
# Runs every model of a vectors directory (NAME.gguf or NAME-00001-of-0000K.gguf
# with NAME.json + NAME.logits.f32 from the oracle's ref_logits.mjs) through
# `moefleet logits` and compares with llama.cpp's logits (compare_logits.mjs,
# default tolerances; deepseek4 with quantised experts --allow-rows 0.25), then
# checks that --workers 2 gives the same bytes.  One line per model and a total.
# A development tool (needs node and the oracle), not part of `make check`.
#   bench/check_vectors.sh [VECTORS_DIR]   (default ../shared/vectors)
# Environment: MOEFLEET, ORACLE_DIR as for oracle_sweep.sh; WORKERS=0 skips
# the --workers 2 check; ONLY=STRING runs the names containing STRING.
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/locate.sh"
bench_locate compare_logits.mjs
vec=${1:-$here/../../shared/vectors}
[ -x "$bin" ] || { echo "check_vectors: no moefleet binary at $bin" >&2; exit 2; }
[ -f "${oracle:-}/compare_logits.mjs" ] || { echo "check_vectors: no oracle (set ORACLE_DIR)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
for js in "$vec"/*.json; do
	name=$(basename "$js" .json)
	[ -n "${ONLY:-}" ] && [[ $name != *"$ONLY"* ]] && continue
	model=$vec/$name.gguf
	[ -f "$model" ] || model=$(ls "$vec/$name"-00001-of-*.gguf 2>/dev/null | head -n 1)
	[ -f "$model" ] || continue
	node -e '
		const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
		require("fs").writeFileSync(process.argv[2], j.inputs.join(",") + "\n");
		console.log(j.prompt.length);' "$js" "$tmp/tokens" >"$tmp/np"
	np=$(cat "$tmp/np")
	cmpf=()
	case $name in ds4*) case $name in *f32* | *f16* | *bf16*) ;; *) cmpf=(--allow-rows 0.25) ;; esac ;; esac
	status=PASS
	if ! "$bin" logits -m "$model" --tokens @"$tmp/tokens" --n-prompt "$np" --out "$tmp/a.f32" \
		>"$tmp/log" 2>&1; then
		status=FAIL msg="logits failed: $(tail -n 1 "$tmp/log")"
	else
		node "$oracle/compare_logits.mjs" --ref "$js" --cand "$tmp/a.f32" "${cmpf[@]}" \
			>"$tmp/cmp.json" 2>/dev/null || status=FAIL
		msg=$(node -e '
			const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
			const p = j.row_max_abs_percentiles || {};
			console.log((j.failed_rows || []).length + "/" + j.rows_compared + " rows fail, max|d| " +
				Number(j.max_abs_diff).toPrecision(3) + ", p50 " + Number(p.p50).toPrecision(3) +
				", maxKL " + Number(j.max_kl).toPrecision(3));' "$tmp/cmp.json" 2>/dev/null ||
			echo "no comparison")
		if [ "${WORKERS:-1}" != 0 ]; then
			if ! "$bin" logits -m "$model" --tokens @"$tmp/tokens" --n-prompt "$np" --workers 2 \
				--out "$tmp/w.f32" >"$tmp/wlog" 2>&1; then
				status=FAIL msg="$msg; --workers 2 failed: $(tail -n 1 "$tmp/wlog")"
			elif cmp -s "$tmp/a.f32" "$tmp/w.f32"; then
				msg="$msg; w2 identical"
			else
				status=FAIL msg="$msg; --workers 2 DIFFERS"
			fi
		fi
	fi
	printf '%-4s %-26s %s\n' "$status" "$name" "$msg"
	if [ $status = PASS ]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
done
echo "vectors: $pass passed, $fail failed"
[ $fail -eq 0 ]
