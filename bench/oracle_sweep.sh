#!/usr/bin/env bash
# Correctness sweep of moefleet against llama.cpp on random models: for each
# variant (oracle preset + generator flags + seed) it generates the GGUF file
# with the oracle's gen_gguf.mjs, gets llama.cpp's logits with ref_logits.mjs
# (random prompt + greedy continuation), runs `moefleet logits` teacher-forced
# on the same inputs (prompt as one batch, the rest as single-token decodes)
# and compares with compare_logits.mjs at its default tolerances (deepseek4
# with quantised experts: --allow-rows 0.25, as the oracle README says).
# Optionally it also runs with --workers 2 and checks that the logits are
# bit-identical to the in-process run.  One PASS/FAIL line per variant, then a
# total; exit status 0 only if every variant passed.
# A development tool, not part of `make check` (a variant takes seconds).
#
#   bench/oracle_sweep.sh [VARIANTS_FILE]     (default: bench/oracle_variants.txt)
#
# VARIANTS_FILE: one variant per line, '#' starts a comment:
#   NAME PRESET SEED TOKEN_SEED N_PROMPT N_GEN [gen_gguf flags...] [-- compare flags...]
# e.g.
#   q3-f32-s11 qwen3moe-tiny 11 5 48 16 --expert-type F32 --n-expert 8
#   ds4-nohash deepseek4-tiny 3 7 200 32 --n-hash-layers 0 -- --allow-rows 0.2
# Compare flags given after '--' replace the automatic --allow-rows choice.
#
# Environment:
#   MOEFLEET    moefleet binary (default: ./moefleet, else the one next to bench/)
#   ORACLE_DIR  the oracle (default: /tmp/oracle, else ../shared/oracle)
#   SWEEP_DIR   scratch directory (default: a new temporary one, removed at
#               the end unless a variant failed or KEEP=1)
#   WORKERS     0 = skip the --workers 2 bit-identity check (default 1)
#   THREADS     threads for moefleet and llama.cpp (default 2)
#   ONLY        run only variants whose NAME contains this string
#   NOISE       0 = skip the noise-floor check (default 1): for a variant whose
#               comparison fails, llama.cpp is re-run with flash attention off
#               and compared with its own flash-attention-on logits at the same
#               tolerances, and moefleet is compared with that FA-off run too;
#               the line says how many rows fail in both, and "(noise)" when
#               llama.cpp fails at least as many rows against itself as
#               moefleet does, or moefleet passes against the FA-off run (the
#               failure is then inside llama.cpp's own spread)
# Needs node.
set -u

here=$(cd "$(dirname "$0")" && pwd)
list=${1:-$here/oracle_variants.txt}
. "$here/locate.sh"
bench_locate gen_gguf.mjs
workers=${WORKERS:-1}
noise=${NOISE:-1}
threads=${THREADS:-2}
only=${ONLY:-}
[ -x "$bin" ] || { echo "oracle_sweep: no moefleet binary at $bin (set MOEFLEET)" >&2; exit 2; }
[ -f "${oracle:-}/gen_gguf.mjs" ] || { echo "oracle_sweep: no oracle (set ORACLE_DIR)" >&2; exit 2; }
[ -f "$list" ] || { echo "oracle_sweep: no variant list $list" >&2; exit 2; }
case $bin in /*) ;; *) bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin") ;; esac
if [ -n "${SWEEP_DIR:-}" ]; then
	dir=$SWEEP_DIR
	mkdir -p "$dir" || exit 2
	own_dir=0
else
	dir=$(mktemp -d "${TMPDIR:-/tmp}/oracle-sweep.XXXXXX") || exit 2
	own_dir=1
fi
dir=$(cd "$dir" && pwd)

# number of failed rows in a compare_logits JSON (or a huge number)
failed_rows() {
	node -e '
		try { const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
		      console.log((j.failed_rows || []).length); }
		catch (e) { console.log(1000000000); }' "$1"
}

# summary of a compare_logits JSON: "pass failed/rows max_abs p90 max_kl"
summarize() {
	node -e '
		const fs = require("fs");
		let j;
		try { j = JSON.parse(fs.readFileSync(process.argv[1], "utf8")); }
		catch (e) { console.log("fail ?/? (no compare output)"); process.exit(0); }
		const f = (x) => x === undefined || x === null ? "-" : Number(x).toPrecision(3);
		const fr = j.failed_rows || [];
		const rows = fr.map((r) => typeof r === "object" ? r.row : r);
		const shown = rows.slice(0, 8).join(",") + (rows.length > 8 ? ",..." : "");
		console.log((j.pass ? "pass" : "fail") + " " + fr.length + "/" + j.rows_compared +
			" rows fail, max|d| " + f(j.max_abs_diff) + " (row " + j.max_abs_row + ")" +
			", p90 " + f(j.row_max_abs_percentiles && j.row_max_abs_percentiles.p90) +
			", maxKL " + f(j.max_kl) +
			(j.rows_skipped_inputs_differ ? ", skipped " + j.rows_skipped_inputs_differ : "") +
			(rows.length ? " [rows " + shown + "]" : ""));
	' "$1"
}

n_pass=0
n_fail=0
n_noise=0
failed_names=""
while IFS= read -r -u 3 line || [ -n "$line" ]; do
	line=${line%%#*}
	# shellcheck disable=SC2086
	set -- $line
	[ $# -eq 0 ] && continue
	if [ $# -lt 6 ]; then
		echo "oracle_sweep: bad variant line (need NAME PRESET SEED TOKEN_SEED N_PROMPT N_GEN): $line" >&2
		exit 2
	fi
	name=$1 preset=$2 seed=$3 tseed=$4 np=$5 ng=$6
	shift 6
	if [ -n "$only" ] && [[ $name != *"$only"* ]]; then continue; fi
	gen=()
	cmpf=()
	have_cmp=0
	while [ $# -gt 0 ]; do
		if [ "$1" = "--" ]; then have_cmp=1; shift; cmpf=("$@"); break; fi
		gen+=("$1")
		shift
	done
	if [ $have_cmp -eq 0 ]; then
		case $preset in deepseek4*)
			etype=MXFP4
			for ((i = 0; i < ${#gen[@]}; i++)); do
				[ "${gen[$i]}" = "--expert-type" ] && etype=${gen[$((i + 1))]:-}
			done
			case $etype in F32 | F16 | BF16) ;; *) cmpf=(--allow-rows 0.25) ;; esac
			;;
		esac
	fi
	v=$dir/$name
	status=PASS
	msg=""
	if ! (cd "$oracle" && node gen_gguf.mjs --preset "$preset" --seed "$seed" "${gen[@]}" \
		--out "$v.gguf") >"$v.gen.log" 2>&1; then
		status=FAIL msg="gen_gguf failed: $(tail -n 1 "$v.gen.log")"
	elif ! (cd "$oracle" && node ref_logits.mjs --model "$v.gguf" --random "$np" \
		--token-seed "$tseed" --n-gen "$ng" --threads "$threads" --out "$v.ref") \
		>"$v.ref.log" 2>&1; then
		status=FAIL msg="ref_logits failed: $(tail -n 1 "$v.ref.log")"
	else
		node -e '
			const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
			require("fs").writeFileSync(process.argv[2], j.inputs.join(",") + "\n");
			console.log(j.prompt.length);' "$v.ref.json" "$v.tokens" >"$v.np" 2>"$v.tok.log"
		p=$(cat "$v.np")
		if ! "$bin" logits -m "$v.gguf" --tokens @"$v.tokens" --n-prompt "$p" \
			--threads "$threads" --out "$v.eng.f32" >"$v.eng.log" 2>&1; then
			status=FAIL msg="moefleet logits failed: $(tail -n 1 "$v.eng.log")"
		else
			node "$oracle/compare_logits.mjs" --ref "$v.ref.json" --cand "$v.eng.f32" \
				"${cmpf[@]}" >"$v.cmp.json" 2>"$v.cmp.log"
			rc=$?
			msg=$(summarize "$v.cmp.json")
			[ $rc -eq 0 ] || status=FAIL
			if [ $rc -ne 0 ] && [ "$noise" != 0 ]; then
				if (cd "$oracle" && node ref_logits.mjs --model "$v.gguf" --random "$np" \
					--token-seed "$tseed" --n-gen "$ng" --threads "$threads" \
					--flash-attn off --out "$v.fa0") >"$v.fa0.log" 2>&1; then
					node "$oracle/compare_logits.mjs" --ref "$v.ref.json" --cand "$v.fa0.json" \
						"${cmpf[@]}" >"$v.fa0.cmp.json" 2>/dev/null
					ours=$(failed_rows "$v.cmp.json")
					theirs=$(failed_rows "$v.fa0.cmp.json")
					node "$oracle/compare_logits.mjs" --ref "$v.fa0.json" --cand "$v.eng.f32" \
						"${cmpf[@]}" >"$v.eng-fa0.cmp.json" 2>/dev/null
					vs_off=$?
					msg="$msg; llama.cpp FA off vs on: $(summarize "$v.fa0.cmp.json" | cut -d, -f1)"
					msg="$msg; moefleet vs llama.cpp FA off: $(summarize "$v.eng-fa0.cmp.json" | cut -d, -f1)"
					if [ "$theirs" -ge "$ours" ] || [ $vs_off -eq 0 ]; then
						msg="$msg (noise)"
						n_noise=$((n_noise + 1))
					fi
				else
					msg="$msg; llama.cpp FA off run failed"
				fi
			fi
			if [ "$workers" != 0 ]; then
				if ! "$bin" logits -m "$v.gguf" --tokens @"$v.tokens" --n-prompt "$p" \
					--threads "$threads" --workers 2 --out "$v.w2.f32" >"$v.w2.log" 2>&1; then
					status=FAIL msg="$msg; --workers 2 failed: $(tail -n 1 "$v.w2.log")"
				elif cmp -s "$v.eng.f32" "$v.w2.f32"; then
					msg="$msg; w2 identical"
				else
					status=FAIL msg="$msg; --workers 2 logits DIFFER from in-process"
				fi
			fi
		fi
	fi
	printf '%-4s %-22s %s\n' "$status" "$name" "$msg"
	if [ $status = PASS ]; then
		n_pass=$((n_pass + 1))
	else
		n_fail=$((n_fail + 1))
		failed_names="$failed_names $name"
	fi
done 3<"$list"

total="total: $((n_pass + n_fail)) variants, $n_pass passed, $n_fail failed"
[ $n_fail -gt 0 ] && total="$total (${failed_names# })"
[ $n_noise -gt 0 ] && total="$total, $n_noise of them within the flash-attention on/off spread of llama.cpp"
echo "$total"
if [ $own_dir -eq 1 ] && [ $n_fail -eq 0 ] && [ "${KEEP:-0}" = 0 ]; then
	rm -rf "$dir"
else
	echo "files: $dir"
fi
[ $n_fail -eq 0 ]
