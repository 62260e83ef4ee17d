#!/usr/bin/env bash
# Bad input on the command line: each case must exit with the documented status
# (1 = failure with one clear line on stderr, 2 = usage), never crash, and leave
# no output file behind.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
data=$top_srcdir/tests/data
model=$data/qwen3moe-tiny-mxfp4.gguf
ds2=$data/ds2-tiny-q4_0.gguf
ds4=$data/ds4-tiny-mxfp4.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0

# check NAME EXPECTED_STATUS -- command...   (output file, if any: $tmp/out.f32)
check() {
	local name=$1 want=$2
	shift 3
	rm -f "$tmp"/out.f32*
	"$@" >"$tmp/stdout" 2>"$tmp/stderr"
	local got=$?
	n=$((n + 1))
	local lines
	lines=$(grep -c . "$tmp/stderr")
	local why=""
	[ "$got" -eq "$want" ] || why="exit status $got, expected $want"
	if [ "$want" -eq 1 ] && [ -z "$why" ]; then
		[ "$lines" -eq 1 ] || why="expected one line on stderr, got $lines"
		grep -q '^moefleet: error: ' "$tmp/stderr" || why="stderr lacks 'moefleet: error:'"
	fi
	if [ "$want" -eq 2 ] && [ -z "$why" ]; then
		grep -q 'usage:' "$tmp/stderr" || why="no usage printed"
	fi
	if [ "$want" -ne 0 ] && ls "$tmp"/out.f32* >/dev/null 2>&1; then
		why="output file left behind"
	fi
	if [ -z "$why" ]; then
		echo "ok $n - $name"
	else
		echo "not ok $n - $name: $why"
		sed 's/^/# /' "$tmp/stderr" | head -5
		fail=$((fail + 1))
	fi
}

# corrupt copies of a model
head -c 100000 "$model" >"$tmp/truncated.gguf"
head -c 10 "$model" >"$tmp/tiny.gguf"
{ printf 'GGUX'; tail -c +5 "$model"; } >"$tmp/magic.gguf"
perl -0777 -pe 's/qwen3moe/qwen9moe/g' "$model" >"$tmp/arch.gguf"
# output_norm.weight: 1 dimension of 128, type F32 -> type 12 (Q4_K, unsupported)
perl -0777 -pe 's/(output_norm\.weight\x01\x00\x00\x00\x80\x00{7})\x00\x00\x00\x00/$1\x0c\x00\x00\x00/' "$model" >"$tmp/type.gguf"
# output_norm.weight extent 128 -> 64: fits the file but not the architecture
perl -0777 -pe 's/(output_norm\.weight\x01\x00\x00\x00)\x80/$1\x40/' "$model" >"$tmp/shape.gguf"
cmp -s "$model" "$tmp/type.gguf" && echo "# warning: type corruption did not apply"
# an integer (I32) table where a matrix is expected
perl -0777 -pe 's/(blk\.1\.attn_q\.weight\x02\x00\x00\x00.{16})[\x00-\x27]\x00\x00\x00/$1\x1a\x00\x00\x00/s' "$model" >"$tmp/i32.gguf"
cmp -s "$model" "$tmp/i32.gguf" && echo "# warning: I32 corruption did not apply"
cmp -s "$model" "$tmp/shape.gguf" && echo "# warning: shape corruption did not apply"
# a deepseek2 model without one of its tensors' names (renamed)
perl -0777 -pe 's/blk\.1\.ffn_gate_inp\.weight/blk.1.ffn_gate_inX.weight/' "$ds2" >"$tmp/missing.gguf"
# deepseek4: a missing indexer tensor; compress_ratios [0,4,128,4,0] -> ratio 5 in
# layer 1, key renamed, or 6 layers for its 5 entries; indexer head size 64 -> 80;
# key_length 128 -> 96 (value_length stays 128); 3 hyper-connection streams; the
# last tid2eid entries are the file's last run of 48 small i32 values: one -> 64
perl -0777 -pe 's/blk\.1\.indexer\.proj\.weight/blk.1.indexer.proX.weight/' "$ds4" >"$tmp/ds4-missing.gguf"
perl -0777 -pe 's/(compress_ratios\x09\x00\x00\x00\x05\x00\x00\x00\x05\x00{7}\x00{4})\x04/$1\x05/' "$ds4" >"$tmp/ds4-ratio.gguf"
perl -0777 -pe 's/attention\.compress_ratios/attention.compress_ratioX/' "$ds4" >"$tmp/ds4-noratio.gguf"
perl -0777 -pe 's/(deepseek4\.block_count\x04\x00\x00\x00)\x04/$1\x06/' "$ds4" >"$tmp/ds4-nlayer.gguf"
perl -0777 -pe 's/(indexer\.key_length\x04\x00\x00\x00)\x40/$1\x50/' "$ds4" >"$tmp/ds4-idx.gguf"
perl -0777 -pe 's/(attention\.key_length\x04\x00\x00\x00)\x80/$1\x60/' "$ds4" >"$tmp/ds4-head.gguf"
perl -0777 -pe 's/(hyper_connection\.count\x04\x00\x00\x00)\x04/$1\x03/' "$ds4" >"$tmp/ds4-hc.gguf"
perl -0777 -pe 's/\A(.*)((?:[\x00-\x0f]\x00\x00\x00){48})/$1."\x40\x00\x00\x00".substr($2,4)/se' "$ds4" >"$tmp/ds4-tid.gguf"
# output_norm.weight: type F32 -> 34 (TQ1_0, a GGML type moefleet does not read)
perl -0777 -pe 's/(output_norm\.weight\x01\x00\x00\x00\x80\x00{7})\x00\x00\x00\x00/$1\x22\x00\x00\x00/' "$model" >"$tmp/tq1.gguf"
cmp -s "$model" "$tmp/tq1.gguf" && echo "# warning: TQ1_0 corruption did not apply"
# split models: shard 2 of 3 given instead of the first; a first shard
# (the same file with split.no 0) whose second shard is missing
shard=$top_srcdir/tests/fuzz/corpus/gguf/split-00002-of-00003.gguf
cp "$shard" "$tmp/m-00002-of-00003.gguf"
mkdir "$tmp/gap"
perl -0777 -pe 's/(split\.no\x02\x00\x00\x00)\x01\x00/$1\x00\x00/' "$shard" >"$tmp/gap/m-00001-of-00003.gguf"
cmp -s "$shard" "$tmp/gap/m-00001-of-00003.gguf" && echo "# warning: split.no corruption did not apply"
for f in missing ratio noratio nlayer idx head hc tid; do
	cmp -s "$ds4" "$tmp/ds4-$f.gguf" && echo "# warning: deepseek4 $f corruption did not apply"
done

echo "1..47"
check "valid run" 0 -- "$bin" logits -m "$model" --tokens 1,2,3 --out "$tmp/ok.f32"
check "truncated gguf" 1 -- "$bin" logits -m "$tmp/truncated.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "10-byte gguf" 1 -- "$bin" logits -m "$tmp/tiny.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "bad magic" 1 -- "$bin" logits -m "$tmp/magic.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "unknown architecture" 1 -- "$bin" logits -m "$tmp/arch.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "unsupported tensor type" 1 -- "$bin" logits -m "$tmp/type.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "I32 tensor as a matrix" 1 -- "$bin" logits -m "$tmp/i32.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "tensor shape does not fit" 1 -- "$bin" logits -m "$tmp/shape.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "missing tensor" 1 -- "$bin" logits -m "$tmp/missing.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "missing model file" 1 -- "$bin" logits -m "$tmp/none.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "token id out of range" 1 -- "$bin" logits -m "$model" --tokens 1,2,512 --out "$tmp/out.f32"
check "n-prompt larger than tokens" 1 -- "$bin" logits -m "$model" --tokens 1,2 --n-prompt 3 --out "$tmp/out.f32"
check "unwritable output" 1 -- "$bin" logits -m "$model" --tokens 1,2 --out "$tmp/no/such/dir/out.f32"
check "malformed token list" 1 -- "$bin" logits -m "$model" --tokens 1,x,3 --out "$tmp/out.f32"
check "negative token id" 1 -- "$bin" logits -m "$model" --tokens 1,-4 --out "$tmp/out.f32"
check "missing token file" 1 -- "$bin" logits -m "$model" --tokens @"$tmp/none.txt" --out "$tmp/out.f32"
check "unknown option" 2 -- "$bin" logits -m "$model" --tokens 1 --bogus 3 --out "$tmp/out.f32"
check "missing option value" 2 -- "$bin" logits -m "$model" --tokens
check "bad thread count" 2 -- "$bin" logits -m "$model" --tokens 1 --threads 0 --out "$tmp/out.f32"
check "unknown command" 2 -- "$bin" frobnicate
check "no command" 2 -- "$bin"
check "info on truncated" 1 -- "$bin" info -m "$tmp/truncated.gguf"
check "tensor type not read (TQ1_0)" 1 -- "$bin" logits -m "$tmp/tq1.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "split model: not the first shard" 1 -- "$bin" info -m "$tmp/m-00002-of-00003.gguf"
check "split model: missing shard" 1 -- "$bin" logits -m "$tmp/gap/m-00001-of-00003.gguf" --tokens 1 --out "$tmp/out.f32"
check "bench bad reps" 2 -- "$bin" bench -m "$model" --reps 0
check "logits help" 0 -- "$bin" logits --help
check "deepseek4 with an F32 KV cache" 0 -- "$bin" logits -m "$ds4" --tokens 1,2,3 --kv-type f32 --out "$tmp/ok4.f32"
check "bad kv type" 2 -- "$bin" logits -m "$ds4" --tokens 1 --kv-type q8_0 --out "$tmp/out.f32"
check "deepseek4 missing tensor" 1 -- "$bin" logits -m "$tmp/ds4-missing.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 compress ratio 5" 1 -- "$bin" logits -m "$tmp/ds4-ratio.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 no compress ratios" 1 -- "$bin" logits -m "$tmp/ds4-noratio.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 fewer ratios than layers" 1 -- "$bin" logits -m "$tmp/ds4-nlayer.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 indexer head size" 1 -- "$bin" logits -m "$tmp/ds4-idx.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 key and value sizes differ" 1 -- "$bin" logits -m "$tmp/ds4-head.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 three streams" 1 -- "$bin" logits -m "$tmp/ds4-hc.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "deepseek4 tid2eid expert out of range" 1 -- "$bin" logits -m "$tmp/ds4-tid.gguf" --tokens 1,2 --out "$tmp/out.f32"
check "info: bad --node-memory" 2 -- "$bin" info -m "$model" --node-memory 7X
check "info: bad --ctx-size" 2 -- "$bin" info -m "$model" --node-memory 1G --ctx-size 0
# planning: every node fits in 1G; in 513M the coordinator's KV does not, and
# 2 workers cannot hold the 612K of experts in 512M + 100K: 7 would
plan_ok() {
	n=$((n + 1))
	if "$@"; then echo "ok $n - $name"; else echo "not ok $n - $name"; fail=$((fail + 1)); fi
}
"$bin" info -m "$model" --workers 2 --node-memory 1G >"$tmp/plan1" 2>&1
name="info plans 2 workers in 1G nodes"
plan_ok test "$(grep -c ': fits$' "$tmp/plan1")" -eq 3
"$bin" info -m "$model" --workers 2 --node-memory 513M --ctx-size 8192 >"$tmp/plan2" 2>&1
name="info: a coordinator whose KV does not fit"
plan_ok grep -q '^    coordinator: .*6.00 MiB of KV.*DOES NOT FIT$' "$tmp/plan2"
"$bin" info -m "$model" --workers 2 --node-memory 524388K >"$tmp/plan3" 2>&1
name="info: experts that do not fit 2 workers"
plan_ok grep -q 'DO NOT FIT on 2 node(s); at least 7 are needed' "$tmp/plan3"
# with its 15 complete pages of 384K on KV hosts, the coordinator of 8192
# tokens fits 516M, and 2 worker nodes hold the pages (8 and 7) and experts
"$bin" info -m "$model" --node-memory 516M --ctx-size 8192 --kv-shards 4 --kv-page 512 \
	>"$tmp/plan4" 2>&1
name="info: the pages on KV hosts"
plan_ok test "$(grep -c '^    coordinator: .*DOES NOT FIT$' "$tmp/plan4")" -eq 1 -a \
	"$(grep -c '^    coordinator: .*768.00 KiB of KV (the pages in progress).*: fits$' "$tmp/plan4")" -eq 1 -a \
	"$(grep -c '^    worker [01]: .* of experts + \(3.00\|2.62\) MiB of KV pages .*: fits$' "$tmp/plan4")" -eq 2 -a \
	"$(grep -c 'the model needs at least 2 worker node(s)' "$tmp/plan4")" -eq 1
check "info: --kv-shards not a power of two" 2 -- "$bin" info -m "$model" --node-memory 1G --kv-shards 3
check "--kv-workers without --workers" 2 -- "$bin" logits -m "$model" --tokens 1 --kv-shards 4 --kv-workers 2 --out "$tmp/out.f32"
check "--kv-workers without --kv-shards" 2 -- "$bin" logits -m "$model" --tokens 1 --workers 1 --kv-workers 2 --out "$tmp/out.f32"
# the valid run wrote 3 rows of 512 floats
size=$(stat -c %s "$tmp/ok.f32" 2>/dev/null || echo 0)
n=$((n + 1))
if [ "$size" -eq $((3 * 512 * 4)) ]; then echo "ok $n - logits file size"; else
	echo "not ok $n - logits file size $size"; fail=$((fail + 1)); fi
[ "$fail" -eq 0 ]
