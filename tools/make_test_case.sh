#!/usr/bin/env bash
# Makes one llama.cpp-checked test case for tests/data (a development tool;
# needs the oracle):
#   tools/make_test_case.sh NAME PRESET SEED TOKEN_SEED N_PROMPT N_GEN [gen_gguf flags...]
# writes tests/data/NAME.gguf (the oracle's random model), NAME.case (prompt
# length, the input tokens, n_vocab) and NAME.logits.f32 (llama.cpp's logits
# for every input: the prompt as one batch, then single-token decodes).
# Add NAME to tests/data/vectors.list to have tests/test_vectors check it.
# PRESET "-": keep the existing tests/data/NAME.gguf (e.g. a trained model;
# SEED is then ignored).  TEXT=...: the prompt is llama.cpp's tokens of TEXT
# instead of N_PROMPT random ones.
# ORACLE_DIR: the oracle (default /tmp/oracle, else ../shared/oracle).
set -euo pipefail
[ $# -ge 6 ] || { sed -n 2,12p "$0" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../bench/locate.sh"
bench_locate gen_gguf.mjs
[ -f "${oracle:-}/gen_gguf.mjs" ] || { echo "make_test_case: no oracle (set ORACLE_DIR)" >&2; exit 2; }
name=$1 preset=$2 seed=$3 tseed=$4 np=$5 ng=$6
shift 6
data=$here/../tests/data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$preset" != - ]; then
	(cd "$oracle" && node gen_gguf.mjs --preset "$preset" --seed "$seed" "$@" --out "$data/$name.gguf") >/dev/null
fi
if [ -n "${TEXT:-}" ]; then
	prompt=(--text "$TEXT")
else
	prompt=(--random "$np" --token-seed "$tseed")
fi
(cd "$oracle" && node ref_logits.mjs --model "$data/$name.gguf" "${prompt[@]}" \
	--n-gen "$ng" --out "$tmp/ref") >/dev/null
node -e '
	const fs = require("fs");
	const j = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
	const n_vocab = fs.statSync(process.argv[2]).size / 4 / j.inputs.length;
	fs.writeFileSync(process.argv[3], j.prompt.length + "\n" + j.inputs.join(",") + "\n" + n_vocab + "\n");
' "$tmp/ref.json" "$tmp/ref.logits.f32" "$data/$name.case"
cp "$tmp/ref.logits.f32" "$data/$name.logits.f32"
echo "$name: $(stat -c %s "$data/$name.gguf") bytes, $(sed -n 1p "$data/$name.case") prompt tokens"
