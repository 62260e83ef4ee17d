#!/usr/bin/env bash
# `moefleet serve` end to end with curl (TAP): a tiny model on a free loopback
# port with 2 local workers; greedy output against `moefleet generate`, the
# same output alone and beside concurrent requests (the engine's guarantee:
# a sequence's logits do not depend on the other sequences of a batch, and the
# scheduler cuts every prompt into the same chunks), streaming, stop strings,
# the API key, bad input, overload, client disconnects freeing their slot,
# 1000 connections opened and dropped, metrics; `moefleet tokenize` against
# llama.cpp's ids; the trained demo model answering in English.  tests/serve_client.mjs (the openai package) runs at the
# end when node and tests/node_modules are there.
set -u
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
bin=$top_builddir/moefleet
model=$top_srcdir/tests/data/qwen3moe-tiny-f32.gguf
for t in curl jq; do
	command -v $t >/dev/null || { echo "1..0 # SKIP $t not installed"; exit 77; }
done
[ -x "$bin" ] || { echo "1..0 # SKIP $bin not built"; exit 77; }

tmp=$(mktemp -d /tmp/moefleet-serve.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT

n=0
fails=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); fails=$((fails + 1)); echo "not ok $n - $1"; [ $# -gt 1 ] && echo "# $2"; }
check() { if eval "$2"; then ok "$1"; else not_ok "$1" "${3:-}"; fi; }

key=sekrit-key
# [serve_model=FILE] start_server NAME ARGS...: sets port_NAME; the log is $tmp/NAME.err
start_server() {
	local name=$1
	shift
	"$bin" serve -m "${serve_model:-$model}" --port 0 --threads 1 "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
	pids+=($!)
	eval "pid_$name=$!"
	local p=$!
	for _ in $(seq 1 1200); do # up to a minute on a loaded machine or a sanitizer build
		grep -q '^listening on' "$tmp/$name.out" 2>/dev/null && break
		kill -0 $p 2>/dev/null || break
		sleep 0.05
	done
	eval "port_$name=$(sed -n 's/^listening on http:.*:\([0-9]*\)$/\1/p' "$tmp/$name.out")"
}

start_server main --workers 2 --parallel 4 --ctx-size 2048 --max-batch 64 --queue 2 \
	--api-key "$key" --max-body 65536
url=http://127.0.0.1:$port_main
echo "1..43"
if [ -z "$port_main" ]; then
	not_ok "server starts" "$(cat "$tmp/main.err")"
	exit 1
fi
auth=(-H "Authorization: Bearer $key")
# post PATH JSON: prints the body, the HTTP status on the last line
post() { curl -s -w '\n%{http_code}\n' "${auth[@]}" -H 'Content-Type: application/json' "$url$1" -d "$2"; }
status_of() { tail -n 1; }
body_of() { sed '$d'; }

check "GET /health without a key" '[ "$(curl -s $url/health | jq -r .status)" = ok ]'
r=$(curl -s -w '\n%{http_code}' "$url/v1/models")
check "401 without the key, OpenAI error shape" \
	'[ "$(echo "$r" | status_of)" = 401 ] && [ "$(echo "$r" | body_of | jq -r .error.code)" = invalid_api_key ]'
r=$(curl -s -w '\n%{http_code}' -H "Authorization: Bearer wrong" "$url/v1/models")
check "401 with a wrong key" '[ "$(echo "$r" | status_of)" = 401 ]'
r=$(curl -s "${auth[@]}" "$url/v1/models")
check "GET /v1/models lists the model" '[ "$(echo "$r" | jq -r ".data[0].id")" = qwen3moe-tiny-f32 ]'

# ---------------------------------------------------------------- greedy output
prompt="The quick brown fox"
"$bin" generate -m "$model" -p "$prompt" -n 12 --threads 1 >"$tmp/gen.txt" 2>/dev/null
# generate prints the prompt, the text and a newline
tail -c +$((${#prompt} + 1)) "$tmp/gen.txt" | head -c -1 >"$tmp/gen_text.txt"
req='{"model":"qwen3moe-tiny-f32","prompt":"'"$prompt"'","max_tokens":12,"temperature":0}'
post /v1/completions "$req" | body_of | jq -j '.choices[0].text' >"$tmp/alone.txt"
check "greedy completion (2 workers) equals moefleet generate" 'cmp -s "$tmp/alone.txt" "$tmp/gen_text.txt"' \
	"$(od -c "$tmp/alone.txt" | head -3) vs $(od -c "$tmp/gen_text.txt" | head -3)"
r=$(post /v1/completions "$req" | body_of)
check "finish_reason length and usage" \
	'[ "$(echo "$r" | jq -r ".choices[0].finish_reason,.usage.completion_tokens,.usage.prompt_tokens > 0" | tr "\n" " ")" = "length 12 true " ]' "$r"

# a prompt longer than the prefill chunk (60 tokens), alone and beside others
long=$(printf 'word%d ' $(seq 1 20))
lreq='{"prompt":"'"$long"'","max_tokens":20,"temperature":0}'
post /v1/completions "$lreq" | body_of | jq -j '.choices[0].text' >"$tmp/long_alone.txt"
lp=$(post /v1/completions "$lreq" | body_of | jq -r .usage.prompt_tokens)
check "the long prompt needs two prefill chunks ($lp tokens)" '[ "$lp" -gt 60 ]'
jobs_=() # 5 requests: 4 slots + a queue of 2 take them all
for i in 1 2; do
	post /v1/completions "$lreq" | body_of | jq -j '.choices[0].text' >"$tmp/long_$i.txt" &
	jobs_+=($!)
	post /v1/completions '{"prompt":"other text '$i'","max_tokens":30,"temperature":0.9,"seed":'$i'}' >/dev/null &
	jobs_+=($!)
done
post /v1/completions "$req" | body_of | jq -j '.choices[0].text' >"$tmp/short_busy.txt" &
jobs_+=($!)
wait "${jobs_[@]}"
same=1
for i in 1 2; do cmp -s "$tmp/long_$i.txt" "$tmp/long_alone.txt" || same=0; done
check "greedy output is the same alone and beside concurrent requests" '[ $same = 1 ] && [ -s "$tmp/long_alone.txt" ]'
check "the short prompt too, while others prefill and decode" 'cmp -s "$tmp/short_busy.txt" "$tmp/alone.txt"'

# ---------------------------------------------------------------- streaming
sreq='{"prompt":"'"$prompt"'","max_tokens":12,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}'
curl -sN "${auth[@]}" "$url/v1/completions" -d "$sreq" >"$tmp/stream.txt"
grep '^data: {' "$tmp/stream.txt" | sed 's/^data: //' | jq -j '.choices[0].text // empty' >"$tmp/stream_text.txt"
check "streamed text equals the whole response" 'cmp -s "$tmp/stream_text.txt" "$tmp/alone.txt"'
check "stream ends with usage and [DONE]" \
	'[ "$(grep "^data: " "$tmp/stream.txt" | tail -n 1)" = "data: [DONE]" ] && grep "^data: {" "$tmp/stream.txt" | tail -n 1 | sed "s/^data: //" | jq -e ".usage.completion_tokens == 12" >/dev/null'

# sampled text of a random model is full of partial UTF-8 byte tokens: every
# streamed event must still be valid UTF-8 (whole characters only)
curl -sN "${auth[@]}" "$url/v1/completions" \
	-d '{"prompt":"x","max_tokens":300,"temperature":1.5,"seed":3,"stream":true}' >"$tmp/bytes.txt"
check "streamed events hold only whole UTF-8 characters" \
	'[ "$(grep -c "^data: {" "$tmp/bytes.txt")" -ge 2 ] && iconv -f UTF-8 -t UTF-8 "$tmp/bytes.txt" >/dev/null 2>&1'

# chat = completion of the rendered ChatML prompt (this vocabulary has no
# special tokens, so both tokenize alike)
creq='{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":0}'
chat=$(post /v1/chat/completions "$creq" | body_of | jq -j '.choices[0].message.content')
ml=$(jq -n '{prompt:"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",max_tokens:8,temperature:0}')
comp=$(post /v1/completions "$ml" | body_of | jq -j '.choices[0].text')
check "chat uses the model's chat format" '[ "$chat" = "$comp" ]'
curl -sN "${auth[@]}" "$url/v1/chat/completions" -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":0,"stream":true}' >"$tmp/cstream.txt"
st=$(grep '^data: {' "$tmp/cstream.txt" | sed 's/^data: //' | jq -j '.choices[0].delta.content // empty')
check "streamed chat equals the whole chat response" '[ "$st" = "$chat" ] && head -n 1 "$tmp/cstream.txt" | grep -q "\"role\":\"assistant\""'

# stop string: a piece from the middle of the greedy text
full=$(cat "$tmp/alone.txt")
stop=${full:4:2}
before=${full%%"$stop"*}
r=$(post /v1/completions "$(jq -n --arg p "$prompt" --arg s "$stop" '{prompt:$p,max_tokens:12,temperature:0,stop:[$s]}')" | body_of)
check "stop string ends the output before it" \
	'[ "$(echo "$r" | jq -j ".choices[0].text")" = "$before" ] && [ "$(echo "$r" | jq -r ".choices[0].finish_reason")" = stop ]' "$r"
r=$(post /v1/completions '{"prompt":"'"$prompt"'","max_tokens":3,"temperature":0,"logprobs":2}' | body_of)
check "logprobs with 2 alternatives" \
	'echo "$r" | jq -e "(.choices[0].logprobs.token_logprobs | length) == 3 and (.choices[0].logprobs.token_logprobs[0] <= 0)" >/dev/null' "$r"
a=$(post /v1/completions '{"prompt":"abc","max_tokens":10,"temperature":1.0,"seed":42}' | body_of | jq -j '.choices[0].text')
b=$(post /v1/completions '{"prompt":"abc","max_tokens":10,"temperature":1.0,"seed":42}' | body_of | jq -j '.choices[0].text')
check "the same seed gives the same sample" '[ -n "$a" ] && [ "$a" = "$b" ]'

# ---------------------------------------------------------------- bad input
bad() { # DESC STATUS BODY [PATH]
	local r
	r=$(post "${4:-/v1/completions}" "$3")
	local s
	s=$(echo "$r" | status_of)
	if [ "$s" = "$2" ] && echo "$r" | body_of | jq -e '.error.message | length > 0' >/dev/null; then
		ok "$1"
	else
		not_ok "$1" "status $s: $(echo "$r" | body_of | head -c 300)"
	fi
}
bad "malformed JSON: 400" 400 '{"prompt": "x",'
bad "invalid UTF-8: 400" 400 "$(printf '{"prompt":"\xff\xfe"}')"
bad "wrong type: 400" 400 '{"prompt":"x","max_tokens":"ten"}'
bad "negative max_tokens: 400" 400 '{"prompt":"x","max_tokens":-5}'
bad "absurd max_tokens: 400" 400 '{"prompt":"x","max_tokens":100000000000}'
bad "n=2: 400" 400 '{"prompt":"x","n":2}'
bad "chat without messages: 400" 400 '{"prompt":"x"}' /v1/chat/completions
bad "unknown model: 404" 404 '{"model":"gpt-5","prompt":"x"}'
bad "prompt over the context: 400" 400 "{\"prompt\":\"$(printf 'a%.0s ' $(seq 1 2100))\"}"
r=$(post /v1/completions '{"prompt":"x","max_tokens":2048}' | body_of)
check "prompt + max_tokens over the context: clear message" \
	'echo "$r" | jq -r .error.message | grep -q "maximum context length is 2048"' "$r"
head -c 70000 /dev/zero | tr '\0' a | sed 's/^/{"prompt":"/; s/$/"}/' >"$tmp/big.json"
s=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" "$url/v1/completions" --data-binary @"$tmp/big.json")
check "body over --max-body: 400" '[ "$s" = 400 ]' "status $s"
r=$(post /v1/completions '{"prompt":"x","max_tokens":2,"frobnicate":{"a":[1]},"user":"u"}')
check "unknown fields are ignored" '[ "$(echo "$r" | status_of)" = 200 ]'

# ---------------------------------------------------------------- overload
jobs_=()
for i in $(seq 1 10); do
	post /v1/completions '{"prompt":"load '$i'","max_tokens":200,"temperature":0}' | status_of >"$tmp/ov_$i" &
	jobs_+=($!)
done
wait "${jobs_[@]}"
n200=$(cat "$tmp"/ov_* | grep -c '^200$')
n503=$(cat "$tmp"/ov_* | grep -c '^503$')
check "4 slots + queue 2, 10 at once: 503 for the rest ($n200 x 200, $n503 x 503)" \
	'[ "$n503" -ge 1 ] && [ $((n200 + n503)) = 10 ] && [ "$n200" -ge 6 ]'

# ---------------------------------------------------------------- disconnects
metric() { curl -s "${auth[@]}" "$url/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
d0=$(metric moefleet_client_disconnects_total)
curl -sN -m 1 "${auth[@]}" "$url/v1/completions" -d '{"prompt":"go on","max_tokens":2000,"stream":true,"ignore_eos":true}' >/dev/null
curl -s -m 1 "${auth[@]}" "$url/v1/completions" -d '{"prompt":"go on","max_tokens":2000,"ignore_eos":true}' >/dev/null
# a loaded machine may take a while to notice; a request that is not
# cancelled runs 2000 tokens, far longer than this wait
for _ in $(seq 1 100); do
	[ "$(metric moefleet_requests_active)" = 0 ] && break
	sleep 0.05
done
d1=$(metric moefleet_client_disconnects_total)
check "clients that go away are cancelled (disconnects $d0 -> $d1)" '[ "$d1" -ge $((d0 + 2)) ]'
check "their slots and KV positions are free again" \
	'[ "$(metric moefleet_requests_active)" = 0 ] && [ "$(metric moefleet_kv_positions_used)" = 0 ]'

# ---------------------------------------------------------------- 1000 connections
exec 4>&2 2>/dev/null
for i in $(seq 1 1000); do
	if exec 3<>/dev/tcp/127.0.0.1/"$port_main"; then
		case $((i % 4)) in
		1) printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro' >&3 ;;
		2) printf 'GET /health HTTP/1.1\r\nHost: x\r\n' >&3 ;;
		3) printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 33\r\n\r\n{"prompt":"drop","max_tokens":50}' "$key" >&3 ;;
		esac
		exec 3>&-
	fi
done
exec 2>&4 4>&-
for _ in $(seq 1 100); do # dropped requests are cancelled within 50 ms each
	[ "$(metric moefleet_requests_active)" = 0 ] && [ "$(metric moefleet_queue_length)" = 0 ] && break
	sleep 0.05
done
check "the server survives 1000 dropped connections" 'kill -0 $pid_main'
r=$(post /v1/completions "$req" | body_of | jq -j '.choices[0].text')
check "and still serves the same greedy output" '[ "$r" = "$full" ]'

# ---------------------------------------------------------------- connection limit
# a second server allowing 3 connections: 3 idle ones hold them, a 4th client
# is turned away (libmicrohttpd closes it at once), and once they go it is served
start_server conns --max-conns 3
if [ -n "$port_conns" ]; then
	exec 5<>/dev/tcp/127.0.0.1/"$port_conns" 6<>/dev/tcp/127.0.0.1/"$port_conns" \
		7<>/dev/tcp/127.0.0.1/"$port_conns"
	sleep 0.2
	c4=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port_conns/health")
	exec 5>&- 6>&- 7>&-
	c5=000
	for _ in $(seq 1 40); do
		c5=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port_conns/health")
		[ "$c5" = 200 ] && break
		sleep 0.05
	done
	check "--max-conns 3: a 4th connection is refused, served once the others close" \
		'[ "$c4" = 000 ] && [ "$c5" = 200 ]' "4th: $c4, later: $c5"
	kill "$pid_conns"
	wait "$pid_conns" 2>/dev/null
else
	not_ok "--max-conns 3: a 4th connection is refused, served once the others close" \
		"$(head -3 "$tmp/conns.err")"
fi

# ---------------------------------------------------------------- metrics and logs
m=$(curl -s "${auth[@]}" "$url/metrics")
have=1
for name in moefleet_requests_total moefleet_prompt_tokens_total moefleet_completion_tokens_total \
	moefleet_time_to_first_token_seconds_bucket moefleet_inter_token_latency_seconds_count \
	moefleet_queue_length moefleet_batch_tokens_bucket moefleet_kv_positions_capacity \
	moefleet_balancedness; do
	echo "$m" | grep -q "^$name" || { have=0; echo "# missing $name"; }
done
check "metrics: requests, tokens, TTFT/ITL, queue, batch, KV, cluster balance" '[ $have = 1 ]'
check "one log line per request, with id, tokens and timings" \
	'grep -q "request cmpl-[0-9a-f]* /v1/completions status=200 prompt=[0-9]* completion=12 ttft=[0-9.]*s total=" "$tmp/main.err" && grep -q "status=499" "$tmp/main.err" && grep -q "status=400 error=" "$tmp/main.err"'

# ---------------------------------------------------------------- tokenize
line=$(sed -n 1p "$top_srcdir/tests/data/tokenizer/default.tsv")
text=$(echo "$line" | cut -f2)
want=$(echo "$line" | cut -f3 | tr ' ' ,)
got=$("$bin" tokenize -m "$model" -p "$text" --no-parse-special)
check "moefleet tokenize prints llama.cpp's ids" '[ "$got" = "$want" ]' "$got vs $want"

# ---------------------------------------------------------------- openai client
if command -v node >/dev/null && [ -d "$top_srcdir/tests/node_modules/openai" ]; then
	if node "$top_srcdir/tests/serve_client.mjs" "$url/v1" "$key" qwen3moe-tiny-f32 >"$tmp/client.txt" 2>&1; then
		ok "openai client: chat and completions, streaming and not"
	else
		not_ok "openai client: chat and completions, streaming and not" "$(tail -n 5 "$tmp/client.txt")"
	fi
else
	ok "openai client # SKIP node or tests/node_modules/openai absent"
fi

# ---------------------------------------------------------------- a trained model
# tests/data/demo-kjv.gguf (tools/train-demo) was trained on the King James
# Bible: its greedy continuation is English, which random weights never give
serve_model=$top_srcdir/tests/data/demo-kjv.gguf start_server demo --workers 2
r=$(curl -s "http://127.0.0.1:$port_demo/v1/completions" \
	-d '{"prompt":"And God said unto Moses,","max_tokens":32,"temperature":0}' | jq -j '.choices[0].text')
echo "# demo-kjv: And God said unto Moses,$r"
letters=$(printf '%s' "$r" | tr -cd 'A-Za-z ' | wc -c)
words=$(printf '%s' "$r" | tr -s ' \n' '\n\n' | grep -c -x -E '(the|and|of|unto|that|LORD|shall|I|him|them|thee)[,.;:]?')
check "a trained model answers in English (letters and spaces, common words)" \
	'[ ${#r} -ge 60 ] && [ $((letters * 100)) -ge $((${#r} * 90)) ] && [ "$words" -ge 4 ]' \
	"${#r} characters, $letters letters or spaces, $words common words: $r"
kill "$pid_demo"
wait "$pid_demo" 2>/dev/null
check "the demo server stops" '! kill -0 $pid_demo 2>/dev/null'

kill "$pid_main"
wait "$pid_main" 2>/dev/null
check "SIGTERM stops the server" '! kill -0 $pid_main 2>/dev/null'
check "no sanitizer report in the server log" '! grep -q "Sanitizer" "$tmp/main.err"' "$(grep -A5 Sanitizer "$tmp/main.err" | head -20)"
[ $fails = 0 ]
