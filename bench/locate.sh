# bench/locate.sh, sourced by the bench scripts: where the moefleet binary and
# the llama.cpp oracle are.
#   bench_locate MARKER
# sets bin (MOEFLEET, else ./moefleet, else the one next to bench/) and oracle
# (ORACLE_DIR, else the first of /tmp/oracle and ../shared/oracle that holds
# the file MARKER; empty if none).  The caller sets here to bench/'s path.
bench_locate() {
	bin=${MOEFLEET:-}
	if [ -z "$bin" ]; then
		if [ -x ./moefleet ]; then bin=./moefleet; else bin=$here/../moefleet; fi
	fi
	oracle=${ORACLE_DIR:-}
	if [ -z "$oracle" ]; then
		for d in /tmp/oracle "$here/../../shared/oracle"; do
			[ -f "$d/$1" ] && { oracle=$d; break; }
		done
	fi
}
