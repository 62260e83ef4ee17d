#!/usr/bin/env bash
# Three hosts on one machine: a coordinator and two workers, each in its own
# network namespace, joined by veth links to a bridge, every worker link
# shaped with `tc netem delay 1ms rate 1gbit`.  The workers connect over real
# TCP between addresses; the logits must equal the in-process run bit for
# bit.  The links are CURVE-authenticated and encrypted with keys made by
# `moefleet keygen`.  Then a worker's link is cut in the middle of a
# generation (failover).  The namespaces are created and removed here; where
# that is not permitted the test is skipped.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$(cd "$top_builddir" && pwd)/moefleet
wbin=$(cd "$top_builddir" && pwd)/moefleet-worker
data=$(cd "$top_srcdir/tests/data" && pwd)
tag=mf$$
c=${tag}c
tmp=$(mktemp -d)

. "$top_srcdir/tests/netns_star.sh"
cleanup() {
	netns_star_down "$tag"
	rm -rf "$tmp"
}
trap cleanup EXIT

skip() { echo "1..0 # SKIP $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "needs root for ip netns"
command -v ip >/dev/null 2>&1 || skip "ip (iproute2) not installed"
command -v tc >/dev/null 2>&1 || skip "tc (iproute2) not installed"
ip netns add "$c" 2>/dev/null || skip "ip netns not permitted here"

netns_star_up "$tag" 213 || exit 1
for i in 1 2; do
	if ! ip netns exec "${tag}w$i" tc qdisc add dev eth0 root netem delay 1ms rate 1gbit \
		2>/dev/null; then
		shaped=0
	fi
done
[ "${shaped:-1}" -eq 1 ] || echo "# tc netem is not available in this kernel: links are not shaped"

m=qwen3moe-tiny-mxfp4
tokens=$(sed -n 2p "$data/$m.case")
np=$(sed -n 1p "$data/$m.case")
"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --out "$tmp/inproc.f32" 2>/dev/null
port=$((20000 + $$ % 20000))
# CURVE keys: the cluster pair, one pair per worker, all authorised
for k in cluster w1 w2; do "$bin" keygen --out "$tmp/keys" --name $k >/dev/null; done
cat "$tmp/keys/w1.pub" "$tmp/keys/w2.pub" >"$tmp/keys/authorized_keys"
ip netns exec "$c" "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" \
	--listen "tcp://10.213.0.1:$port" --expect-workers 2 --out "$tmp/net.f32" --stats \
	--cluster-key "$tmp/keys/cluster.key" --authorized-keys "$tmp/keys/authorized_keys" \
	2>"$tmp/coord.err" &
coord=$!
# worker 1 reads its own model copy, worker 2 gets its experts streamed
ip netns exec "${tag}w1" timeout 60 "$wbin" --connect "tcp://10.213.0.1:$port" -m "$data/$m.gguf" \
	--name w1 --key "$tmp/keys/w1.key" --server-key "$tmp/keys/cluster.pub" 2>"$tmp/w1.err" &
ip netns exec "${tag}w2" timeout 60 "$wbin" --connect "tcp://10.213.0.1:$port" --name w2 \
	--key "$tmp/keys/w2.key" --server-key "$tmp/keys/cluster.pub" 2>"$tmp/w2.err" &
st=1
for _ in $(seq 1 600); do
	if ! kill -0 "$coord" 2>/dev/null; then
		wait "$coord"
		st=$?
		break
	fi
	sleep 0.1
done
kill -0 "$coord" 2>/dev/null && { kill -9 "$coord"; st=124; }
if [ "$st" -eq 0 ]; then echo "ok 1 - coordinator with two workers over TCP in namespaces"; else
	echo "not ok 1 - coordinator exited with $st"; sed 's/^/# /' "$tmp/coord.err" | tail -5; fi
if [ "$st" -eq 0 ] && cmp -s "$tmp/inproc.f32" "$tmp/net.f32"; then
	echo "ok 2 - logits bit-identical to the in-process run"
	grep -E '^ *[0-9]+ ' "$tmp/coord.err" | sed 's/^/# /'
else
	echo "not ok 2 - logits differ"
fi

# A link cut in the middle of a generation (--replicas 2: each worker holds
# every expert): the coordinator drops the silent worker after
# --worker-timeout, re-sends its rows to the other one, and the greedy ids
# equal the in-process run's.  The cut: `ip link set eth0 down` in the
# worker's namespace, plus `tc netem loss 100%` where netem exists.
gen=(generate -m "$data/$m.gguf" --tokens 1,2,3 -n 1500 --print-ids --threads 1)
"$bin" "${gen[@]}" 2>/dev/null | tail -1 >"$tmp/base.ids"
port=$((port + 1))
ip netns exec "$c" "$bin" "${gen[@]}" --listen "tcp://10.213.0.1:$port" --expect-workers 2 \
	--replicas 2 --worker-timeout 500 --stats --cluster-key "$tmp/keys/cluster.key" \
	--authorized-keys "$tmp/keys/authorized_keys" >"$tmp/cut.out" 2>"$tmp/cut.err" &
coord=$!
for i in 1 2; do
	ip netns exec "${tag}w$i" timeout 60 "$wbin" --connect "tcp://10.213.0.1:$port" \
		-m "$data/$m.gguf" --name "w$i" --key "$tmp/keys/w$i.key" \
		--server-key "$tmp/keys/cluster.pub" 2>"$tmp/cut.w$i.err" &
done
for _ in $(seq 1 600); do
	[ "$(stat -c %s "$tmp/cut.out")" -ge 200 ] && break
	kill -0 "$coord" 2>/dev/null || break
	sleep 0.05
done
ip -n "${tag}w2" link set eth0 down
ip netns exec "${tag}w2" tc qdisc replace dev eth0 root netem loss 100% 2>/dev/null
st=1
for _ in $(seq 1 600); do
	if ! kill -0 "$coord" 2>/dev/null; then
		wait "$coord"
		st=$?
		break
	fi
	sleep 0.1
done
kill -0 "$coord" 2>/dev/null && { kill -9 "$coord"; st=124; }
if [ "$st" -eq 0 ] && tail -1 "$tmp/cut.out" | cmp -s - "$tmp/base.ids" &&
	grep -q 'no answer within the worker time-out' "$tmp/cut.err"; then
	echo "ok 3 - link cut mid-generation: the worker is dropped, ids identical"
	grep -E '^failover:' "$tmp/cut.err" | sed 's/^/# /'
else
	echo "not ok 3 - link cut: exit $st: $(grep -m1 -E 'error' "$tmp/cut.err")"
fi
echo "1..3"
