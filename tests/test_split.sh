#!/usr/bin/env bash
# Per-node shard files (`moefleet split-experts`): a coordinator listening on
# ipc:// with moefleet-worker processes started on the files must write the
# in-process logits bit for bit.  Files made for the cluster stream nothing;
# files made for more workers, a second replica and live re-placement stream
# what a worker's file lacks; a full-model worker mixes with a shard worker.
# Bad input (another model's shard file, a truncated file, a shard file given
# to the coordinator, wrong --workers) fails with a clear error.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
wbin=$top_builddir/moefleet-worker
data=$top_srcdir/tests/data
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT
n=0
fail=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; fail=$((fail + 1)); }

m=qwen3moe-tiny-mxfp4
tokens=$(sed -n 2p "$data/$m.case")
np=$(sed -n 1p "$data/$m.case")
"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --threads 2 \
	--out "$tmp/inproc.f32" 2>/dev/null

# cluster NAME NWORKERS [coordinator options] -- FILE...: a coordinator for
# NWORKERS workers on NAME.sock and one worker per FILE (- = no file); waits
# for all; the coordinator's exit status, its log in NAME.err
cluster() {
	local name=$1 nw=$2
	shift 2
	local opts=()
	while [ "$1" != -- ]; do
		opts+=("$1")
		shift
	done
	shift
	local ep=ipc://$tmp/$name.sock i=0 wp=()
	timeout 120 "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" \
		--threads 1 --listen "$ep" --expect-workers "$nw" --stats --out "$tmp/$name.f32" \
		"${opts[@]}" 2>"$tmp/$name.err" &
	local coord=$!
	pids+=("$coord")
	for f in "$@"; do
		local mo=()
		[ "$f" != - ] && mo=(-m "$f")
		timeout 120 "$wbin" --connect "$ep" --threads 1 --name "w$i" "${mo[@]}" \
			2>"$tmp/$name.w$i.err" &
		wp+=($!)
		pids+=($!)
		i=$((i + 1))
	done
	wait "$coord"
	local rc=$?
	# workers end at the coordinator's Shutdown; one it refused before
	# start-up (another one's refusal ended the coordinator) does not
	for p in "${wp[@]}"; do
		for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	return $rc
}
streamed() { sed -n 's/^weights streamed: \([0-9]*\) bytes$/\1/p' "$tmp/$1.err"; }
same() { cmp -s "$tmp/inproc.f32" "$tmp/$1.f32"; }

out=$tmp/files
if "$bin" split-experts -m "$data/$m.gguf" --workers 2 --out "$out/2" 2>"$tmp/split.err" &&
	"$bin" split-experts -m "$data/$m.gguf" --workers 3 --out "$out/3" 2>>"$tmp/split.err" &&
	[ -f "$out/2/$m-w1-of-2.gguf" ] && [ -f "$out/2/$m-w2-of-2.gguf" ] &&
	[ -f "$out/3/$m-w3-of-3.gguf" ] && [ ! -e "$out/2/$m-w1-of-2.gguf.tmp" ]; then
	ok "split-experts wrote NAME-wK-of-N.gguf for 2 and 3 workers"
else
	notok "split-experts failed: $(head -1 "$tmp/split.err")"
fi
full=$(stat -c %s "$data/$m.gguf")
one=$(stat -c %s "$out/2/$m-w1-of-2.gguf" 2>/dev/null || echo 0)
if [ "$one" -gt 0 ] && [ "$one" -lt "$full" ]; then
	ok "a shard file is smaller than the model ($one of $full bytes)"
else
	notok "shard file size $one vs model $full"
fi

f2=("$out/2/$m-w1-of-2.gguf" "$out/2/$m-w2-of-2.gguf")
if cluster made 2 -- "${f2[@]}" && same made && [ "$(streamed made)" = 0 ] &&
	grep -q "shard file 1 of 2" "$tmp"/made.w*.err &&
	grep -q "24 from the local model file, 0 streamed" "$tmp/made.w0.err"; then
	ok "files made for 2 workers: bit-identical, nothing streamed"
else
	notok "files for 2 workers: $(grep -m1 -E 'error|streamed:' "$tmp/made.err")"
fi

if cluster fewer 2 -- "$out/3/$m-w1-of-3.gguf" "$out/3/$m-w3-of-3.gguf" && same fewer &&
	[ "$(streamed fewer)" -gt 0 ] &&
	[ "$(sed -nE 's/.*streamed ([0-9]+) experts.*/\1/p' "$tmp/fewer.err" | awk '{ s += $1 } END { print s }')" = 16 ]; then
	ok "3 files on 2 workers: the missing third (16 experts) streamed ($(streamed fewer) bytes), bit-identical"
else
	notok "3 files on 2 workers: $(grep -m1 -E 'error|streamed' "$tmp/fewer.err")"
fi

if cluster rep 2 --replicas 2 -- "${f2[@]}" && same rep && [ "$(streamed rep)" -gt 0 ]; then
	ok "2 files, --replicas 2: second copies streamed, bit-identical"
else
	notok "--replicas 2: $(grep -m1 -E 'error|streamed' "$tmp/rep.err")"
fi

if cluster mixed 2 -- "$data/$m.gguf" "$out/2/$m-w2-of-2.gguf" && same mixed &&
	[ "$(streamed mixed)" = 0 ]; then
	ok "a full-model worker with a shard worker: bit-identical, nothing streamed"
else
	notok "full + shard worker: $(grep -m1 -E 'error|streamed' "$tmp/mixed.err")"
fi

if cluster nofile 2 -- "$out/2/$m-w1-of-2.gguf" - && same nofile &&
	grep -q "(24 from the local model file" "$tmp/nofile.w0.err"; then
	ok "a shard worker with a worker without a file: it keeps its file's experts, bit-identical"
else
	notok "shard + no-file worker: $(grep -m1 -E 'error|streamed' "$tmp/nofile.err")"
fi

f3=("$out/3/$m-w1-of-3.gguf" "$out/3/$m-w2-of-3.gguf" "$out/3/$m-w3-of-3.gguf")
if cluster rb 3 --replicas 2 --rebalance eplb --rebalance-every 2 -- "${f3[@]}" && same rb &&
	grep -Eq 'balance: [1-9][0-9]* re-placement' "$tmp/rb.err"; then
	ok "live re-placement with shard files: placements switched, bit-identical"
else
	notok "re-placement with shard files: $(grep -m1 -E 'error|re-placement' "$tmp/rb.err")"
fi

# bad input
"$bin" split-experts -m "$data/qwen3moe-tiny-f32.gguf" --workers 2 --out "$out/f32" 2>/dev/null
if ! cluster other 2 -- "$out/f32/qwen3moe-tiny-f32-w1-of-2.gguf" "$out/2/$m-w2-of-2.gguf" &&
	grep -q "made from another model" "$tmp/other.err"; then
	ok "another model's shard file is refused: $(grep -m1 'another model' "$tmp/other.err" | cut -c1-80)"
else
	notok "another model's shard file not refused"
fi
head -c 100000 "$out/2/$m-w1-of-2.gguf" >"$tmp/trunc.gguf"
if ! timeout 20 "$wbin" --connect "ipc://$tmp/none.sock" -m "$tmp/trunc.gguf" 2>"$tmp/trunc.err" &&
	grep -q "trunc.gguf" "$tmp/trunc.err"; then
	ok "a truncated shard file: the worker fails naming it"
else
	notok "truncated shard file: $(head -1 "$tmp/trunc.err")"
fi
if ! "$bin" logits -m "$out/2/$m-w1-of-2.gguf" --tokens 1 --out "$tmp/x.f32" 2>"$tmp/coord.err" &&
	grep -q "per-node shard file" "$tmp/coord.err"; then
	ok "a shard file given to the coordinator is refused"
else
	notok "shard file as the coordinator's model: $(head -1 "$tmp/coord.err")"
fi
# check NAME STATUS PATTERN -- command: exit status and a message on stderr
check() {
	local what=$1 want=$2 pat=$3
	shift 4
	"$@" >/dev/null 2>"$tmp/check.err"
	local rc=$?
	if [ $rc -eq "$want" ] && grep -q -- "$pat" "$tmp/check.err"; then
		ok "$what"
	else
		notok "$what: exit $rc, $(head -1 "$tmp/check.err")"
	fi
}
check "--workers 0" 2 "workers" -- "$bin" split-experts -m "$data/$m.gguf" --workers 0 --out "$out/x"
check "more workers than experts" 1 "49 workers" -- \
	"$bin" split-experts -m "$data/$m.gguf" --workers 49 --out "$out/x"
check "a missing cluster file" 1 "cannot open" -- \
	"$bin" split-experts -m "$data/$m.gguf" --workers "$tmp/none.txt" --out "$out/x"
check "a shard file split again" 1 "already a per-node shard file" -- \
	"$bin" split-experts -m "$out/2/$m-w1-of-2.gguf" --workers 2 --out "$out/x"
check "--worker-memory too small" 1 "placement" -- \
	"$bin" split-experts -m "$data/$m.gguf" --workers 2 --worker-memory 1K,1K --out "$out/x"
check "--worker-memory of the wrong count" 2 "worker-memory" -- \
	"$bin" split-experts -m "$data/$m.gguf" --workers 2 --worker-memory 1G --out "$out/x"
printf 'a 100 1000000000 10 1000\nb 100 1000000000 10 1000\n' >"$tmp/cluster.txt"
if "$bin" split-experts -m "$data/$m.gguf" --workers "$tmp/cluster.txt" --out "$out/c" 2>/dev/null &&
	[ -f "$out/c/$m-w2-of-2.gguf" ] && cmp -s "$out/c/$m-w1-of-2.gguf" "$out/2/$m-w1-of-2.gguf"; then
	ok "a cluster file of two equal workers gives the files of --workers 2"
else
	notok "split-experts with a cluster file"
fi

echo "1..$n"
[ $fail -eq 0 ]
