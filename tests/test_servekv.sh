#!/usr/bin/env bash
# `moefleet serve` with its KV pages on workers (--kv-shards 4 --kv-page 64,
# --listen, local workers), driven with curl.  A KV host killed in the middle
# of two requests: the server computes the running sequences again on the host
# left and answers what the in-process server answers, and serves later long
# requests.  The only KV host killed (--kv-local-memory 0): that request ends
# with 503 naming the host, the server stays up, short requests are served and
# long ones refused with the same 503, until a new worker joins; without the
# cap the chains come back to the coordinator and the answer is the in-process
# one.  Admission per
# request on one host of 1 MiB (room for 21 pages of 64 positions of every
# layer): two requests of 9 pages run together, and their pages are freed
# when they end (/metrics: 0 pages in use), so a request of the whole context
# (15 pages) is then served (on the host: it freed them too); 11 + 11 pages do not fit together, so the second
# waits for the first to end and both are answered.  Prints TAP.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$(cd "$top_builddir" && pwd)/moefleet
wbin=$(cd "$top_builddir" && pwd)/moefleet-worker
m=$(cd "$top_srcdir/tests/data" && pwd)/qwen3moe-tiny-mxfp4.gguf
for t in curl jq; do
	command -v $t >/dev/null || { echo "1..0 # SKIP $t not installed"; exit 77; }
done
tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
n=0
fail=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; fail=$((fail + 1)); }

# ids N SEED: N token ids in [3, 400)
ids() { awk -v n="$1" -v s="$2" 'BEGIN { for (i = 0; i < n; i++) {
	s = (s * 1103515245 + 12345) % 2147483648; printf "%s%d", (i ? "," : ""), 3 + s % 397 } }'; }
kv=(--kv-shards 4 --kv-page 64 --parallel 2 --ctx-size 1024 --threads 1)

# serve NAME [ARGS...]: a server (with --listen ipc://NAME.sock when ARGS
# name workers); sets port and srv
serve() {
	local name=$1
	shift
	"$bin" serve -m "$m" --port 0 "${kv[@]}" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
	srv=$!
	pids+=("$srv")
}
# worker NAME EP KV_MEMORY: sets wpid
worker() {
	"$wbin" --connect "$2" --threads 1 --name "$1" --kv-memory "$3" 2>"$tmp/$1.werr" &
	wpid=$!
	pids+=("$wpid")
	wk+=("$wpid")
}
# stop: the server and its workers
stop() {
	kill -9 "$srv" "${wk[@]}" 2>/dev/null
	wait "$srv" "${wk[@]}" 2>/dev/null
	wk=()
}
wk=()
wait_port() {
	port=
	for _ in $(seq 600); do
		port=$(sed -n 's/^listening on http:.*:\([0-9]*\)$/\1/p' "$tmp/$1.out")
		[ -n "$port" ] && break
		kill -0 "$srv" 2>/dev/null || break
		sleep 0.05
	done
}
# req PROMPT_IDS MAX_TOKENS: the body, then the status on the last line
req() {
	curl -s -m 60 -w '\n%{http_code}' -H 'Content-Type: application/json' \
		"http://127.0.0.1:$port/v1/completions" \
		-d "{\"prompt\":[$1],\"max_tokens\":$2,\"temperature\":0,\"ignore_eos\":true}"
}
# sreq PROMPT_IDS MAX_TOKENS: the same, streamed (server-sent events)
sreq() {
	curl -s -N -m 60 -H 'Content-Type: application/json' "http://127.0.0.1:$port/v1/completions" \
		-d "{\"prompt\":[$1],\"max_tokens\":$2,\"temperature\":0,\"ignore_eos\":true,\"stream\":true}"
}
text() { head -n -1 "$1" | jq -j '.choices[0].text'; }
status() { tail -n 1 "$1"; }
# stext FILE: the text of a stream, "ERROR" after an error event
stext() { sed -n 's/^data: //p' "$1" | grep -v '^\[DONE\]' |
	jq -j 'if .error then "ERROR: " + .error.message else (.choices[0].text // "") end'; }
# until_events FILE N: waits until a stream has N events (its request runs)
until_events() {
	for _ in $(seq 600); do
		[ "$(grep -c '^data: ' "$1" 2>/dev/null)" -ge "$2" ] && return 0
		sleep 0.02
	done
	return 1
}

long=$(ids 200 7)
long2=$(ids 150 8)
short=$(ids 3 9)

# the in-process answer
serve ref
wait_port ref
req "$long" 800 >"$tmp/ref.res"
req "$long2" 700 >"$tmp/ref2.res"
stop
text "$tmp/ref.res" >"$tmp/ref.txt"
text "$tmp/ref2.res" >"$tmp/ref2.txt"
if [ "$(status "$tmp/ref.res")" != 200 ] || [ ! -s "$tmp/ref.txt" ] || [ ! -s "$tmp/ref2.txt" ]; then
	notok "in-process serve with --kv-shards: $(head -c 300 "$tmp/ref.res")"
fi

# 1. one of 2 KV hosts killed mid-request
ep=ipc://$tmp/a.sock
serve a --listen "$ep" --expect-workers 2 --worker-timeout 3000
worker a0 "$ep" 1G
worker a1 "$ep" 1G
a1=$wpid
wait_port a
sreq "$long" 800 >"$tmp/a.sse" &
cr=$!
sreq "$long2" 700 >"$tmp/a2.sse" &
cr2=$!
if until_events "$tmp/a.sse" 100; then
	kill -9 "$a1"
	wait "$a1" 2>/dev/null
	wait "$cr" "$cr2"
	stext "$tmp/a.sse" >"$tmp/a.txt"
	stext "$tmp/a2.sse" >"$tmp/a2s.txt"
	if grep -q '^data: \[DONE\]' "$tmp/a.sse" && cmp -s "$tmp/ref.txt" "$tmp/a.txt" &&
		cmp -s "$tmp/ref2.txt" "$tmp/a2s.txt" &&
		grep -q 'KV host [01] (worker [01]) was lost: [0-9]* position(s) of the running requests computed again on 1 KV host' "$tmp/a.err"; then
		ok "serve: a KV host killed during 2 requests, recomputed on the host left: the in-process answers"
	else
		notok "serve after a lost KV host: $(tail -c 200 "$tmp/a.txt") $(grep -m1 -E 'error|lost' "$tmp/a.err")"
	fi
	req "$long" 800 >"$tmp/a2.res"
	text "$tmp/a2.res" >"$tmp/a2.txt"
	if [ "$(status "$tmp/a2.res")" = 200 ] && cmp -s "$tmp/ref.txt" "$tmp/a2.txt"; then
		ok "serve: a long request after the loss, on the host left: the in-process answer"
	else
		notok "serve: a request after the loss: $(head -c 300 "$tmp/a2.res")"
	fi
else
	notok "serve with 2 KV hosts did not run the request: $(grep -m1 error "$tmp/a.err")"
	n=$((n + 1))
fi
stop

# 2. the only KV host killed: with --kv-local-memory 0 a named 503; without,
# the chains come back here
for local in 0 any; do
	ep=ipc://$tmp/b$local.sock
	args=(--listen "$ep" --expect-workers 2 --worker-timeout 3000)
	[ "$local" = 0 ] && args+=(--kv-local-memory 0)
	serve "b$local" "${args[@]}"
	worker "b${local}0" "$ep" 0
	worker "b${local}1" "$ep" 1G
	b1=$wpid
	wait_port "b$local"
	sreq "$long" 800 >"$tmp/b.sse" &
	cr=$!
	until_events "$tmp/b.sse" 100 && kill -9 "$b1"
	wait "$b1" 2>/dev/null
	wait "$cr"
	stext "$tmp/b.sse" >"$tmp/b.txt"
	if [ "$local" = 0 ]; then
		h=$(curl -s -m 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")
		req "$short" 8 >"$tmp/b.short"
		req "$long" 700 >"$tmp/b.long"
		if grep -q 'ERROR: KV host 0 (worker [01]) was lost' "$tmp/b.txt" &&
			[ "$h" = 200 ] && [ "$(status "$tmp/b.short")" = 200 ] &&
			[ "$(status "$tmp/b.long")" = 503 ] && grep -q 'KV host 0 (worker [01]) was lost' "$tmp/b.long"; then
			ok "serve: the only KV host lost: 503 naming it, still up, short requests served, long ones 503"
		else
			notok "serve, only KV host lost: $(tail -c 300 "$tmp/b.txt") | health $h | $(status "$tmp/b.short") | $(head -c 200 "$tmp/b.long")"
		fi
		# a new worker joins in the lost one's place (short requests run the
		# steps that take its Hello): long requests are served again
		worker b02 "$ep" 1G
		for _ in $(seq 100); do
			grep -q 'joined in place of a lost worker' "$tmp/b$local.err" && break
			req "$short" 8 >/dev/null
			sleep 0.05
		done
		sleep 1.1 # hosts are looked for at most once a second
		req "$long" 800 >"$tmp/b.back"
		text "$tmp/b.back" >"$tmp/b.back.txt"
		if [ "$(status "$tmp/b.back")" = 200 ] && cmp -s "$tmp/ref.txt" "$tmp/b.back.txt" &&
			grep -q 'KV hosts again: 1' "$tmp/b$local.err"; then
			ok "serve: a worker joined after the loss of every KV host: long requests served, the in-process answer"
		else
			notok "serve, a KV host back: $(head -c 200 "$tmp/b.back") $(grep -m1 -E 'joined|again' "$tmp/b$local.err")"
		fi
	else
		if grep -q '^data: \[DONE\]' "$tmp/b.sse" && cmp -s "$tmp/ref.txt" "$tmp/b.txt" &&
			grep -q 'no KV host is left: the chains are computed here' "$tmp/b$local.err"; then
			ok "serve: the only KV host lost, the chains back on the coordinator: the in-process answer"
		else
			notok "serve, local chains after the loss: $(tail -c 200 "$tmp/b.txt") $(grep -m1 -E 'error|lost' "$tmp/b$local.err")"
		fi
	fi
	stop
done

# 3. admission: one KV host of 1 MiB
ep=ipc://$tmp/c.sock
serve c --listen "$ep" --expect-workers 2
worker c0 "$ep" 0
worker c1 "$ep" 1M
wait_port c
# kvm NAME: the /metrics gauge moefleet_kv_host_NAME of host 0
kvm() { curl -s -m 5 "http://127.0.0.1:$port/metrics" | sed -n "s/^moefleet_kv_host_$1{host=\"0\"} //p"; }
free=$(kvm pages_free)
req "$(ids 100 1)" 540 >"$tmp/c1.res" & # 639 positions: 9 pages
p1=$!
req "$(ids 100 2)" 540 >"$tmp/c2.res" &
p2=$!
wait "$p1" "$p2"
# both ran at once (18 pages), and their pages were freed when they ended
used=$(kvm pages_used)
r=$(req "$(ids 100 3)" 923) # the whole context: 15 pages
if [ "$free" = 21 ] && [ "$(status "$tmp/c1.res")" = 200 ] && [ "$(status "$tmp/c2.res")" = 200 ] &&
	[ "$used" = 0 ] && [ "$(echo "$r" | tail -n 1)" = 200 ] &&
	! grep -qE 'was lost|budget' "$tmp/c.err"; then
	ok "serve: the pages of ended requests are freed: a whole-context request after two of 9 pages is served"
else
	notok "serve admission after ended requests: free pages $free, $(status "$tmp/c1.res") $(status "$tmp/c2.res"), used after them $used, $(echo "$r" | head -c 300)"
fi
sreq "$(ids 100 4)" 650 >"$tmp/c4.sse" & # 749 positions: 11 pages
p4=$!
until_events "$tmp/c4.sse" 2
busy=$(kvm pages_used)
sreq "$(ids 100 5)" 650 >"$tmp/c5.sse" &
p5=$!
# the second is accepted (its first event) while the first runs, and has
# little of its text (that of the time the first's end takes to reach its
# file; run together it would have most) when the first ends
until_events "$tmp/c5.sse" 1
grep -q '^data: \[DONE\]' "$tmp/c4.sse" && early=first-done || early=
at=0
while [ -z "$early" ] && ! grep -q '^data: \[DONE\]' "$tmp/c4.sse"; do
	at=$(stext "$tmp/c5.sse" | wc -c)
	kill -0 "$p4" 2>/dev/null || break
	sleep 0.01
done
wait "$p4" "$p5"
all=$(stext "$tmp/c5.sse" | wc -c)
[ -z "$early" ] && [ $((2 * at)) -ge "$all" ] && early="overlap: $at of $all bytes"
used=$(kvm pages_used)
if [ -z "$early" ] && grep -q '^data: \[DONE\]' "$tmp/c4.sse" && grep -q '^data: \[DONE\]' "$tmp/c5.sse" &&
	! grep -q '"error"' "$tmp/c4.sse" "$tmp/c5.sse" && [ "$all" -gt 100 ] &&
	[ "$busy" = 11 ] && [ "$used" = 0 ]; then
	ok "serve: two requests whose pages do not fit together: the second waits, both answered; pages in use 11, then 0"
else
	notok "serve, two requests that do not fit together: ${early:-} pages in use $busy, then $used; $(tail -c 100 "$tmp/c4.sse") $(tail -c 100 "$tmp/c5.sse")"
fi
stop
echo "1..$n"
[ "$fail" -eq 0 ]
