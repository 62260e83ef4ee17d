# netns_star: sourced by scripts that build three hosts on one machine.
# netns_star_up TAG NET makes namespace TAGc (the coordinator, 10.NET.0.1 on
# a bridge) and TAGw1, TAGw2 (10.NET.0.11 and .12 on eth0), each worker joined
# to the bridge by a veth link whose coordinator end is vcI<TAG>; it stops at
# the first failing command (status 1).  netns_star_down TAG kills what runs
# in them and removes them.  Needs root.
netns_star_up() {
	local tag=$1 net=$2 c=${1}c w i
	ip -n "$c" link set lo up &&
		ip -n "$c" link add br0 type bridge &&
		ip -n "$c" addr add "10.$net.0.1/24" dev br0 &&
		ip -n "$c" link set br0 up || return 1
	for i in 1 2; do
		w=${tag}w$i
		ip netns add "$w" &&
			ip link add "vc$i$tag" netns "$c" type veth peer name eth0 netns "$w" &&
			ip -n "$c" link set "vc$i$tag" master br0 up &&
			ip -n "$w" link set lo up &&
			ip -n "$w" addr add "10.$net.0.1$i/24" dev eth0 &&
			ip -n "$w" link set eth0 up || return 1
	done
}

netns_star_down() {
	local ns
	for ns in "${1}c" "${1}w1" "${1}w2"; do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
		ip netns del "$ns" 2>/dev/null
	done
}
