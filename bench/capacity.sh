#!/usr/bin/env bash
# A model larger than one node's memory, served by several memory-capped nodes
# on this machine.
#
#   bench/capacity.sh MODEL.gguf [NODES] [CAP]        (as root)
#
# Each "node" is a network namespace with its own memory cgroup capped at CAP
# (default 7G; cgroup v1 memory controller, or v2): the coordinator in one,
# a worker in each of NODES others (default 3), every worker reading its
# experts from its own copy of MODEL (the same file: pages are charged to the
# node that reads them first, so each cluster run starts from a cold page
# cache unless said otherwise).  The links are veth pairs to a bridge in the
# coordinator's namespace, CURVE-encrypted tcp://, shaped with `tc ... tbf` to
# each rate of RATES on both sides.  Runs, in order:
#   cluster at each rate (the first from a cold cache, the others warm),
#   the same model on one node capped at CAP (cold cache: it pages from disk),
#   the same model unconstrained.
# Prints a table (tok/s, load time, each process's peak RSS and its node's
# peak memory use including page cache) and ends with
#   capacity: 1 node capped at C GiB X tok/s; N nodes capped at C GiB Y tok/s; unconstrained Z tok/s
# (Y: the first rate).  Everything it creates (namespaces, cgroups, files) is
# removed on exit, whatever happens.
#
# Then the cluster again with workers that have no copy of the model: the
# coordinator streams their experts (load time and GiB/s at each rate of
# STREAM_RATES).
# Environment: PP (prompt tokens, 32), TG (decoded tokens, 32), REPS (3),
# CAPPED_TG (decoded tokens of the capped single node, 8), RATES
# ("10gbit 1gbit"), STREAM_RATES ("1gbit"; "" for none), THREADS (coordinator and single-node threads, 2),
# WORKER_THREADS (1: all nodes share this machine's cores), TIMEOUT (seconds
# per run, 1800).
#
# Make the real-shape model (Qwen3-30B-A3B shapes, Q4_K_M mix, 18.6 GB) with
# the oracle: node gen_gguf.mjs --preset qwen3moe-30b --seed 1 --mix q4_k_m --out M.gguf
set -u
model=${1:?usage: bench/capacity.sh MODEL.gguf [NODES] [CAP]}
nodes=${2:-3}
cap=${3:-7G}
pp=${PP:-32}
tg=${TG:-32}
reps=${REPS:-3}
capped_tg=${CAPPED_TG:-8}
rates=${RATES:-10gbit 1gbit}
threads=${THREADS:-2}
wthreads=${WORKER_THREADS:-1}
limit_s=${TIMEOUT:-1800}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/moefleet
wbin=$here/moefleet-worker
model=$(cd "$(dirname "$model")" && pwd)/$(basename "$model")

die() { echo "capacity: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (namespaces, cgroups, tc, drop_caches)"
[ -r "$model" ] || die "cannot read $model"
[ -x "$bin" ] && [ -x "$wbin" ] || die "build moefleet first"
case $nodes in '' | *[!0-9]*) die "NODES must be a number" ;; esac
[ "$nodes" -ge 1 ] && [ "$nodes" -le 32 ] || die "NODES must be 1..32"
for c in ip tc; do command -v $c >/dev/null || die "$c (iproute2) is not installed"; done
[ -x /usr/bin/time ] || die "GNU time (/usr/bin/time, Debian package time) is not installed"
cap_bytes=$(numfmt --from=iec "${cap%B}" 2>/dev/null) || die "CAP: a size like 7G"
[ "$cap_bytes" -ge $((256 << 20)) ] || die "CAP below 256M"
# what a worker offers for experts: `ip netns exec` mounts its own /sys, where
# the worker cannot see its cgroup's limit, so it is told
offer=$((cap_bytes - (512 << 20)))
cap_gib=$(awk -v b="$cap_bytes" 'BEGIN { printf "%.1f", b / 1073741824 }')

if [ -d /sys/fs/cgroup/memory ] && [ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
	cgv=1
	cgroot=/sys/fs/cgroup/memory
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
	cgv=2
	cgroot=/sys/fs/cgroup
	grep -qw memory /sys/fs/cgroup/cgroup.subtree_control ||
		echo +memory >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null ||
		die "cannot enable the cgroup v2 memory controller"
else
	die "no cgroup memory controller (v1 /sys/fs/cgroup/memory or v2)"
fi

tag=mfcap$$
tmp=$(mktemp -d)
groups=()
spaces=()

cleanup() {
	for ns in "${spaces[@]}"; do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
	done
	for g in "${groups[@]}"; do
		[ -d "$g" ] || continue
		xargs -r kill -9 <"$g/cgroup.procs" 2>/dev/null
		for _ in $(seq 1 50); do rmdir "$g" 2>/dev/null && break; sleep 0.1; done
	done
	for ns in "${spaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A memory cgroup capped at CAP, its path in $group.
make_group() {
	local g=$cgroot/$tag-$1
	group=$g
	mkdir "$g" || die "cannot create cgroup $g"
	groups+=("$g")
	if [ $cgv = 1 ]; then
		echo "$cap_bytes" >"$g/memory.limit_in_bytes"
		echo "$cap_bytes" >"$g/memory.memsw.limit_in_bytes" 2>/dev/null
	else
		echo "$cap_bytes" >"$g/memory.max"
		echo 0 >"$g/memory.swap.max" 2>/dev/null
	fi
}

# Peak memory of a cgroup (processes + page cache charged to it).
group_peak() {
	local g=$1
	if [ $cgv = 1 ]; then cat "$g/memory.max_usage_in_bytes"; else cat "$g/memory.peak" 2>/dev/null || echo 0; fi
}

# Runs a command in cgroup $1 (or "-") and namespace $2 (or "-") in the
# background; its pid goes to $3.pid, its peak RSS (KiB, GNU time) to $3.hwm.
in_node() {
	local g=$1 ns=$2 out=$3
	shift 3
	local pre=()
	[ "$ns" != - ] && pre=(ip netns exec "$ns")
	(
		[ "$g" != - ] && echo $BASHPID >"$g/cgroup.procs"
		exec "${pre[@]}" /usr/bin/time -f %M -o "$out.hwm" timeout "$limit_s" "$@"
	) &
	echo $! >"$out.pid"
}

drop_caches() { sync; echo 1 >/proc/sys/vm/drop_caches; }

gib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1073741824 }'; }

# --- network: a bridge in the coordinator's namespace, one veth per worker
c=${tag}c
ip netns add "$c" 2>/dev/null || die "ip netns not permitted here"
spaces+=("$c")
ip -n "$c" link set lo up
ip -n "$c" link add br0 type bridge
ip -n "$c" addr add 10.214.0.1/24 dev br0
ip -n "$c" link set br0 up
for i in $(seq 1 "$nodes"); do
	w=${tag}w$i
	ip netns add "$w" || die "cannot create namespace $w"
	spaces+=("$w")
	ip link add "vc$i$tag" netns "$c" type veth peer name eth0 netns "$w"
	ip -n "$c" link set "vc$i$tag" master br0 up
	ip -n "$w" link set lo up
	ip -n "$w" addr add "10.214.0.$((10 + i))/24" dev eth0
	ip -n "$w" link set eth0 up
done

# Shapes every worker link, both directions, to rate $1 (bits/s, tc syntax).
shape() {
	local rate=$1 bps burst
	bps=$(numfmt --from=si "$(echo "${rate%bit}" | tr a-z A-Z)") || die "RATES: like 10gbit 1gbit"
	burst=$((bps / 8 / 500)) # 2 ms of traffic
	[ "$burst" -ge 16384 ] || burst=16384
	for i in $(seq 1 "$nodes"); do
		ip netns exec "$c" tc qdisc replace dev "vc$i$tag" root tbf rate "$rate" burst "$burst" latency 20ms ||
			die "tc tbf failed"
		ip netns exec "${tag}w$i" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 20ms ||
			die "tc tbf failed"
	done
}

for k in cluster $(seq -f 'w%g' 1 "$nodes"); do
	"$bin" keygen --out "$tmp/keys" --name "$k" >/dev/null || die "keygen failed"
done
cat "$tmp/keys"/w*.pub >"$tmp/keys/authorized_keys"

bench_args=(bench -m "$model" --pp "$pp" --tg "$tg" --reps "$reps")
port=$((21000 + $$ % 20000))
rows=()

# The tg speed a bench run printed in $3.out (exit status $2), or 0 and its
# error.
bench_tg() {
	local line
	line=$(grep '^bench:' "$3.out")
	if [ "$2" -ne 0 ] || [ -z "$line" ]; then
		echo "capacity: $1 failed (exit $2):" >&2
		tail -5 "$3.err" >&2
		echo 0
	else
		echo "$line" | sed -E 's/.*tg[0-9]+ ([0-9.]+) tok\/s.*/\1/'
	fi
}

# One cluster run: coordinator and NODES workers, each node capped.
run_cluster() {
	local name=$1 rate=$2 cold=$3 stream=${4:-}
	local wmodel=(-m "$model")
	[ -n "$stream" ] && wmodel=()
	port=$((port + 1))
	shape "$rate"
	[ "$cold" = cold ] && drop_caches
	make_group "$name-c"
	local gc=$group gw=()
	for i in $(seq 1 "$nodes"); do
		make_group "$name-w$i"
		gw+=("$group")
	done
	in_node "$gc" "$c" "$tmp/$name.c" "$bin" "${bench_args[@]}" --threads "$threads" \
		--listen "tcp://10.214.0.1:$port" --expect-workers "$nodes" --stats \
		--cluster-key "$tmp/keys/cluster.key" --authorized-keys "$tmp/keys/authorized_keys" \
		>"$tmp/$name.c.out" 2>"$tmp/$name.c.err"
	for i in $(seq 1 "$nodes"); do
		in_node "${gw[$((i - 1))]}" "${tag}w$i" "$tmp/$name.w$i" "$wbin" \
			--connect "tcp://10.214.0.1:$port" "${wmodel[@]}" --threads "$wthreads" --name "w$i" \
			--memory "$offer" \
			--key "$tmp/keys/w$i.key" --server-key "$tmp/keys/cluster.pub" \
			2>"$tmp/$name.w$i.err"
	done
	wait "$(cat "$tmp/$name.c.pid")"
	local st=$?
	for i in $(seq 1 "$nodes"); do wait "$(cat "$tmp/$name.w$i.pid")" 2>/dev/null; done
	sleep 0.3
	local tgs load
	tgs=$(bench_tg "$name" $st "$tmp/$name.c")
	load=$(sed -nE 's/.*cluster: [0-9]+ workers ready ([0-9.]+) s after start.*/\1/p' "$tmp/$name.c.err")
	local coord_bytes
	coord_bytes=$(sed -nE 's/.*coordinator: ([0-9.]+) GiB of weights stay here.*/\1/p' "$tmp/$name.c.err")
	local how="$cold cache"
	if [ -n "$stream" ]; then
		local sent
		sent=$(sed -nE 's/.*worker [0-9]+: streamed [0-9]+ experts, ([0-9.]+) MiB of weights.*/\1/p' "$tmp/$name.c.err" |
			awk '{ s += $1 } END { printf "%.2f", s / 1024 }')
		how="streamed $sent GiB, $(awk -v g="$sent" -v t="${load:-0}" 'BEGIN { if (t > 0) printf "%.2f", g / t; else printf "?" }') GiB/s"
	fi
	printf '%-24s %8s tok/s  load %6s s (%s)\n' "$name ($rate)" "$tgs" "${load:-?}" "$how"
	printf '    %-12s peak RSS %6s GiB  node peak %6s GiB  (non-expert weights %s GiB)\n' coordinator \
		"$(gib $(($(cat "$tmp/$name.c.hwm" 2>/dev/null || echo 0) * 1024)))" "$(gib "$(group_peak "$gc")")" \
		"${coord_bytes:-?}"
	for i in $(seq 1 "$nodes"); do
		local mib k
		k=$(sed -nE "s/.*worker ([0-9]+) joined: w$i, .*/\1/p" "$tmp/$name.c.err" | head -1)
		mib=$(sed -nE "s/.*worker ${k:-x}: [0-9]+ experts, ([0-9.]+) MiB.*/\1/p" "$tmp/$name.c.err" | head -1)
		printf '    %-12s peak RSS %6s GiB  node peak %6s GiB  (experts placed %s GiB)\n' "worker $i" \
			"$(gib $(($(cat "$tmp/$name.w$i.hwm" 2>/dev/null || echo 0) * 1024)))" \
			"$(gib "$(group_peak "${gw[$((i - 1))]}")")" \
			"$(awk -v m="${mib:-0}" 'BEGIN { printf "%.2f", m / 1024 }')"
	done
	eval "tg_$name=$tgs"
}

# One in-process run, capped or not.
run_single() {
	local name=$1 capped=$2 n_tg=$3 n_reps=$4
	drop_caches
	local g=-
	if [ "$capped" = capped ]; then
		make_group "$name"
		g=$group
	fi
	in_node "$g" - "$tmp/$name" "$bin" bench -m "$model" --pp "$pp" --tg "$n_tg" \
		--reps "$n_reps" --threads "$threads" >"$tmp/$name.out" 2>"$tmp/$name.err"
	local t0=$SECONDS
	wait "$(cat "$tmp/$name.pid")"
	local st=$? tgs
	sleep 0.3
	tgs=$(bench_tg "$name" $st "$tmp/$name")
	local peak=-
	[ "$g" != - ] && peak=$(gib "$(group_peak "$g")")
	printf '%-24s %8s tok/s  wall %5s s (cold cache)\n' "$name" "$tgs" "$((SECONDS - t0))"
	printf '    %-12s peak RSS %6s GiB  node peak %6s GiB\n' process \
		"$(gib $(($(cat "$tmp/$name.hwm" 2>/dev/null || echo 0) * 1024)))" "$peak"
	eval "tg_$name=$tgs"
}

echo "capacity: $(basename "$model") ($(gib "$(stat -c %s "$model")") GiB), $nodes worker nodes, cap $cap_gib GiB per node"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; pp $pp, tg $tg, $reps reps"
first=
cold=cold
for rate in $rates; do
	name=cluster_${rate}
	run_cluster "$name" "$rate" "$cold"
	[ -z "$first" ] && first=$name
	cold=warm
done
# workers without a copy of the model: the coordinator streams every
# expert's bytes over the shaped links (cold cache: it reads them from disk)
for rate in ${STREAM_RATES-1gbit}; do
	run_cluster "stream_${rate}" "$rate" cold stream
done
run_single capped_1node capped "$capped_tg" 1
run_single unconstrained free "$tg" "$reps"

eval "y=\$tg_$first"
echo "capacity: 1 node capped at $cap_gib GiB $tg_capped_1node tok/s; $nodes nodes capped at $cap_gib GiB $y tok/s; unconstrained $tg_unconstrained tok/s"
