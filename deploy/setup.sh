#!/usr/bin/env bash
# Set up moefleet on a fresh Debian 12 machine and either run it or test it.
#   bash deploy/setup.sh run    install packages, build, generate text with the shipped demo model
#   bash deploy/setup.sh test   install packages, build, run the test suite (make check)
# Needs root (or sudo) for the package installation; everything else runs in this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-run}

packages=(build-essential autoconf automake libtool pkg-config autoconf-archive
	libopenmpi-dev openmpi-bin libzmq3-dev libprotobuf-c-dev protobuf-c-compiler
	libopenblas-dev libcmocka-dev libpcre2-dev iproute2
	libmicrohttpd-dev libjansson-dev libcairo2-dev clang valgrind curl jq procps time)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm for the HTTP client tests; a node from elsewhere brings its own npm
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
	sudo_cmd=()
	[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
	export DEBIAN_FRONTEND=noninteractive
	"${sudo_cmd[@]}" apt-get update -qq
	"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x configure ] || autoreconf -fi
[ -f Makefile ] || ./configure -q
make -j"$(nproc)" -s

case "$action" in
run)
	./moefleet info -m tests/data/demo-kjv.gguf | tail -n 2
	# a small qwen3moe trained on the King James Bible (tools/train-demo);
	# two local worker processes compute its routed experts (the logits equal
	# llama.cpp's and the in-process run's)
	./moefleet generate -m tests/data/demo-kjv.gguf -p "And God said unto Moses," -n 64 \
		--temp 0.7 --seed 7 --workers 2
	;;
test)
	# the OpenAI client used by tests/test_serve.sh (skipped without it)
	if command -v npm >/dev/null; then
		(cd tests && npm install --no-audit --no-fund --loglevel=error) ||
			echo "npm install failed: the OpenAI client test will be skipped" >&2
	fi
	make -j"$(nproc)" check || { cat test-suite.log; exit 1; }
	;;
*)
	echo "usage: bash deploy/setup.sh run|test" >&2
	exit 2
	;;
esac
