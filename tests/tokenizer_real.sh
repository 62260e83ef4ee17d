#!/usr/bin/env bash
# The tokenizer on the three real vocabularies (DeepSeek-V3, Qwen3, gpt-oss)
# against llama.cpp, on the oracle's tokenizer_corpus.txt: every line and the
# whole file, with parse_special off and on, must give llama.cpp's ids.
#
# The models carrying these vocabularies are 70-90 MB each, too big for
# tests/data, so this check is not part of `make check`: it runs where node and
# the llama.cpp oracle are installed (ORACLE, default /tmp/oracle), generating
# the tiny real-vocabulary models there (cached in $ORACLE/models/tok) and
# llama.cpp's ids with ref_tokenize.mjs.  About a minute on 2 cores.
#   bash tests/tokenizer_real.sh [BUILD_DIR]
# Exit status: 0 all equal, 1 a difference (printed), 77 no node or oracle.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$src}/moefleet
oracle=${ORACLE:-/tmp/oracle}
command -v node >/dev/null && [ -f "$oracle/ref_tokenize.mjs" ] || {
	echo "SKIP: needs node and the oracle in $oracle"
	exit 77
}
[ -x "$bin" ] || { echo "no $bin (give the build directory)"; exit 1; }
tmp=$(mktemp -d /tmp/moefleet-tokreal.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$oracle/models/tok"
corpus=$oracle/tokenizer_corpus.txt
fails=0
for spec in "deepseek2-tiny deepseek_v3 ds2-deepseek_v3" "qwen3moe-tiny qwen3 qwen3moe-qwen3" \
	"gpt-oss-tiny gptoss gptoss-gptoss"; do
	set -- $spec
	gguf=$oracle/models/tok/$3.gguf
	if [ ! -f "$gguf" ]; then
		(cd "$oracle" && node gen_gguf.mjs --preset "$1" --seed 1 --tokenizer "$2" --out "$gguf" >/dev/null)
	fi
	(cd "$oracle" && node ref_tokenize.mjs --model "$gguf" --corpus "$corpus" --out "$tmp/$3.json" \
		--no-lenml --no-hash >/dev/null)
	"$bin" tokenize -m "$gguf" --file "$corpus" --lines --no-bos --no-parse-special >"$tmp/$3.plain"
	"$bin" tokenize -m "$gguf" --file "$corpus" --lines --no-bos >"$tmp/$3.special"
	"$bin" tokenize -m "$gguf" --file "$corpus" --no-bos --no-parse-special >"$tmp/$3.wplain"
	"$bin" tokenize -m "$gguf" --file "$corpus" --no-bos >"$tmp/$3.wspecial"
	if node - "$tmp/$3" <<'JS'; then echo "ok $3 ($2)"; else echo "FAIL $3 ($2)"; fails=$((fails + 1)); fi
const fs = require('fs');
const base = process.argv[2];
const ref = JSON.parse(fs.readFileSync(base + '.json', 'utf8')).items;
const read = (f) => fs.readFileSync(f, 'utf8').split('\n').slice(0, -1)
	.map((l) => (l === '' ? [] : l.split(',').map(Number)));
const plain = read(base + '.plain'), special = read(base + '.special');
const wplain = read(base + '.wplain')[0], wspecial = read(base + '.wspecial')[0];
let bad = 0, lines = 0;
for (const it of ref) {
	const [p, s] = it.kind === 'whole' ? [wplain, wspecial] : [plain[it.index], special[it.index]];
	lines++;
	for (const [got, want, mode] of [[p, it.llama, 'plain'], [s, it.llama_special, 'special']]) {
		if (JSON.stringify(got) !== JSON.stringify(want)) {
			bad++;
			console.log(`  ${it.kind} ${it.index} (${mode}): ${JSON.stringify(it.text).slice(0, 60)}\n    got  ${JSON.stringify(got).slice(0, 120)}\n    want ${JSON.stringify(want).slice(0, 120)}`);
		}
	}
}
console.log(`  ${lines} strings x 2 modes, ${bad} differ`);
process.exit(bad ? 1 : 0);
JS
done
[ $fails = 0 ]
