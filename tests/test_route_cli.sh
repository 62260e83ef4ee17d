#!/usr/bin/env bash
# --routing / --router-bias on the command line: top-p with min = max = the
# model's k equals the default routing bit for bit (every architecture); a
# lower threshold chooses fewer experts per token, in-process and with
# workers alike; a router bias changes the logits; bad values are rejected.
# Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
data=$top_srcdir/tests/data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0
toks=1,2,3,4,5,6,7,8,9,10

ok() {
	n=$((n + 1))
	if [ "$1" -eq 0 ]; then echo "ok $n - $2"; else
		echo "not ok $n - $2"
		sed 's/^/# /' "$tmp/err" | head -5
		fail=$((fail + 1))
	fi
}

# the model's experts per token, from 'moefleet info'
k_of() {
	"$bin" info -m "$1" 2>/dev/null | grep -m1 'expert_used_count' | grep -o '[0-9]*$'
}

echo "1..12"
for m in qwen3moe-tiny-mxfp4 ds2-tiny-q4_0 gptoss-tiny-mxfp4 ds4-tiny-mxfp4; do
	f=$data/$m.gguf
	if [ ! -e "$f" ]; then
		n=$((n + 1))
		echo "ok $n - $m # SKIP not in tests/data"
		continue
	fi
	k=$(k_of "$f")
	"$bin" logits -m "$f" --tokens $toks --n-prompt 5 --out "$tmp/def.f32" 2>"$tmp/err" &&
		"$bin" logits -m "$f" --tokens $toks --n-prompt 5 --routing "topp:1.0,min=$k,max=$k" \
			--out "$tmp/topp.f32" 2>>"$tmp/err" &&
		[ -n "$k" ] && cmp -s "$tmp/def.f32" "$tmp/topp.f32"
	ok $? "$m: topp:1.0,min=$k,max=$k equals the default routing"
done

# fewer experts: reported mean below the model's k, logits differ
f=$data/qwen3moe-tiny-mxfp4.gguf
"$bin" logits -m "$f" --tokens $toks --out "$tmp/def.f32" 2>"$tmp/err"
"$bin" logits -m "$f" --tokens $toks --routing topp:0.5 --out "$tmp/p5.f32" 2>"$tmp/err"
mean=$(sed -n 's/^routing: all layers: \([0-9.]*\) experts per token.*/\1/p' "$tmp/err")
awk -v m="$mean" 'BEGIN { exit !(m != "" && m + 0 >= 1 && m + 0 < 4) }'
ok $? "topp:0.5 uses fewer experts per token ($mean of 4)"
! cmp -s "$tmp/def.f32" "$tmp/p5.f32"
ok $? "topp:0.5 changes the logits"
# rows with fewer experts through local workers: the same numbers
"$bin" logits -m "$f" --tokens $toks --routing topp:0.5 --workers 2 --out "$tmp/p5w.f32" \
	2>"$tmp/err" && cmp -s "$tmp/p5.f32" "$tmp/p5w.f32"
ok $? "topp:0.5 with 2 workers equals in-process"
# min = max = 1: one expert per token in every layer
"$bin" logits -m "$f" --tokens $toks --routing topp:0.01,min=1,max=1 --out "$tmp/k1.f32" \
	2>"$tmp/err" && grep -q '^routing: all layers: 1.000 experts per token' "$tmp/err"
ok $? "topp min=max=1 routes one expert per token"

# a router bias changes the routing, reproducibly
"$bin" logits -m "$f" --tokens $toks --router-bias 0,1:1.0 --out "$tmp/b1.f32" 2>"$tmp/err" &&
	"$bin" logits -m "$f" --tokens $toks --router-bias 0,1:1.0 --out "$tmp/b2.f32" 2>>"$tmp/err" &&
	cmp -s "$tmp/b1.f32" "$tmp/b2.f32" && ! cmp -s "$tmp/def.f32" "$tmp/b1.f32"
ok $? "--router-bias changes the logits reproducibly"

# bad values: usage errors before loading, model errors after
"$bin" logits -m "$f" --tokens 1 --routing topp:2 --out "$tmp/x.f32" 2>"$tmp/err"
[ $? -eq 2 ] && [ ! -e "$tmp/x.f32" ]
ok $? "--routing topp:2 is a usage error"
"$bin" logits -m "$f" --tokens 1 --routing topp:0.5,max=99 --out "$tmp/x.f32" 2>"$tmp/err"
[ $? -eq 1 ] && grep -q 'max=99' "$tmp/err" && [ ! -e "$tmp/x.f32" ]
ok $? "--routing max above the model's experts fails with a clear error"
"$bin" logits -m "$f" --tokens 1 --router-bias 999:1 --out "$tmp/x.f32" 2>"$tmp/err"
[ $? -eq 1 ] && grep -q 'expert id 999' "$tmp/err" && [ ! -e "$tmp/x.f32" ]
ok $? "--router-bias with an unknown expert fails with a clear error"
[ "$fail" -eq 0 ]
