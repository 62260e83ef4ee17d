#!/usr/bin/env bash
# Authenticated, encrypted tcp:// links (CURVE) between `moefleet --listen`
# and `moefleet-worker --connect` on 127.0.0.1: keys made by `moefleet
# keygen` get safe modes; key files other users could read or change are
# refused; tcp:// without keys needs an explicit --insecure on both sides; a
# worker whose key is not authorised, one with the wrong server key and an
# --insecure one are each refused with a clear error (and the coordinator
# logs the refused key), while an authorised worker computes logits that are
# bit-identical to the in-process run.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
wbin=$top_builddir/moefleet-worker
data=$top_srcdir/tests/data
tmp=$(mktemp -d)
coord=
cleanup() {
	[ -n "$coord" ] && kill -9 "$coord" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
n=0
fail=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; fail=$((fail + 1)); }
check() { # check DESCRIPTION COMMAND...
	local d=$1
	shift
	if "$@"; then ok "$d"; else notok "$d"; fi
}

m=qwen3moe-tiny-mxfp4
tokens=$(sed -n 2p "$data/$m.case")
np=$(sed -n 1p "$data/$m.case")
"$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" --out "$tmp/inproc.f32" 2>/dev/null
k=$tmp/keys
port=$((20000 + ($$ + RANDOM) % 20000))
ep=tcp://127.0.0.1:$port

# --- keygen
for name in cluster w1 w2; do "$bin" keygen --out "$k" --name $name >/dev/null 2>&1; done
check "keygen: secret key mode 600, public key 644, directory 700" \
	test "$(stat -c %a "$k/cluster.key") $(stat -c %a "$k/cluster.pub") $(stat -c %a "$k")" = "600 644 700"
cp "$k/w1.key" "$tmp/w1.before"
"$bin" keygen --out "$k" --name w1 >/dev/null 2>"$tmp/err"
st=$?
check "keygen: refuses to overwrite an existing key" \
	eval '[ $st -ne 0 ] && cmp -s "$k/w1.key" "$tmp/w1.before" && grep -q "already exists" "$tmp/err"'
check "keygen --public prints the key of the .pub file" \
	test "$("$bin" keygen --public "$k/w1.key" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$k/w1.pub")"
cat "$k/w1.pub" >"$k/authorized_keys"

coord_run() { # coord_run LOG EXTRA-OPTIONS...: the coordinator in the background
	local log=$1
	shift
	timeout 120 "$bin" logits -m "$data/$m.gguf" --tokens "$tokens" --n-prompt "$np" \
		--listen "$ep" --out "$tmp/net.f32" "$@" 2>"$log" &
	coord=$!
}
coord_wait() { # the coordinator's exit status
	local st
	wait "$coord"
	st=$?
	coord=
	return $st
}
# a command that must fail fast (no hang): status non-zero and a message
fails_with() { # fails_with PATTERN COMMAND...
	local pat=$1
	shift
	timeout 30 "$@" >/dev/null 2>"$tmp/err"
	local st=$?
	[ $st -ne 0 ] && [ $st -ne 124 ] && grep -q -- "$pat" "$tmp/err"
}

# --- plain tcp:// needs --insecure on both sides
check "coordinator: tcp:// without keys is refused, naming --insecure" \
	fails_with "--insecure" "$bin" logits -m "$data/$m.gguf" --tokens 1 --out /dev/null --listen "$ep"
check "worker: tcp:// without keys is refused, naming --insecure" \
	fails_with "--insecure" "$wbin" --connect "$ep"

# --- unsafe key files
cp -p "$k/cluster.key" "$tmp/open.key"
chmod 644 "$tmp/open.key"
check "coordinator: a secret key readable by others is refused" \
	fails_with "permissions 644" "$bin" logits -m "$data/$m.gguf" --tokens 1 --out /dev/null --listen "$ep" \
	--cluster-key "$tmp/open.key" --authorized-keys "$k/authorized_keys"
cp -p "$k/authorized_keys" "$tmp/open_auth"
chmod 666 "$tmp/open_auth"
check "coordinator: authorised keys writable by others are refused" \
	fails_with "permissions 666" "$bin" logits -m "$data/$m.gguf" --tokens 1 --out /dev/null --listen "$ep" \
	--cluster-key "$k/cluster.key" --authorized-keys "$tmp/open_auth"
cp -p "$k/w1.key" "$tmp/w1open.key"
chmod 640 "$tmp/w1open.key"
check "worker: a secret key readable by its group is refused" \
	fails_with "permissions 640" "$wbin" --connect "$ep" --key "$tmp/w1open.key" \
	--server-key "$k/cluster.pub"
printf 'not-a-key\n' >"$tmp/bad.pub"
check "worker: a malformed server key is refused" \
	fails_with "Z85" "$wbin" --connect "$ep" --key "$k/w1.key" --server-key "$tmp/bad.pub"

# --- one CURVE coordinator: three refused workers, then an authorised one
coord_run "$tmp/coord.err" --cluster-key "$k/cluster.key" --authorized-keys "$k/authorized_keys"
sleep 0.3
w2key=$(cut -d' ' -f1 "$k/w2.pub")
check "worker with an unauthorised key: clear error, no hang" \
	fails_with "refused this worker's key" "$wbin" --connect "$ep" --key "$k/w2.key" \
	--server-key "$k/cluster.pub" --name intruder
check "coordinator logs the refused key and address" \
	grep -qF "refused a worker from 127.0.0.1: its key $w2key" "$tmp/coord.err"
check "worker with the wrong server key: handshake time-out error" \
	fails_with "no CURVE handshake" "$wbin" --connect "$ep" --key "$k/w1.key" \
	--server-key "$k/w2.pub" --handshake-timeout 1500
check "--insecure worker against a CURVE coordinator: clear error" \
	fails_with "uses CURVE keys" "$wbin" --connect "$ep" --insecure
timeout 60 "$wbin" --connect "$ep" --key "$k/w1.key" --server-key "$k/cluster.pub" --name w1 \
	-m "$data/$m.gguf" >/dev/null 2>"$tmp/w1.err"
wst=$?
coord_wait
cst=$?
check "authorised worker over CURVE: both exit 0" test "$wst $cst" = "0 0"
check "authorised worker over CURVE: logits bit-identical to in-process" \
	cmp -s "$tmp/inproc.f32" "$tmp/net.f32"

# --- plain tcp:// with --insecure on both sides (streamed weights)
rm -f "$tmp/net.f32"
coord_run "$tmp/coord2.err" --insecure
timeout 60 "$wbin" --connect "$ep" --insecure --name plain >/dev/null 2>"$tmp/w.err"
wst=$?
coord_wait
cst=$?
check "--insecure on both sides: runs, logits bit-identical" \
	eval '[ "$wst $cst" = "0 0" ] && cmp -s "$tmp/inproc.f32" "$tmp/net.f32"'
check "--insecure warns that the link is not authenticated" \
	grep -q "neither authenticated nor encrypted" "$tmp/coord2.err"
if [ "$fail" -ne 0 ]; then
	for f in coord.err coord2.err w1.err err; do
		[ -f "$tmp/$f" ] && sed "s/^/# $f: /" "$tmp/$f" | tail -5
	done
fi
echo "1..$n"
[ "$fail" -eq 0 ]
