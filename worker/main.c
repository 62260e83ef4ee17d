/* moefleet-worker: holds a shard of a model's routed experts and computes them
 * for a coordinator. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../common/transport.h"
#include "../coordinator/model/footprint.h"
#include "worker.h"

static const char *usage =
    "usage: moefleet-worker --connect ENDPOINT [-m MODEL.gguf] [--threads T]\n"
    "                       [--memory BYTES] [--kv-memory BYTES] [--kv-only]\n"
    "                       [--name NAME]\n"
    "                       [--slowdown F]\n"
    "                       [--key FILE --server-key FILE | --insecure]\n"
    "                       [--handshake-timeout MS] [--reconnect SECONDS]\n"
    "  ENDPOINT: tcp://HOST:PORT or ipc://PATH of a coordinator started with\n"
    "  --listen.  With -m the worker reads its experts from its own copy of the\n"
    "  model; without, the coordinator streams their bytes.  The copy may be a\n"
    "  per-node shard file ('moefleet split-experts'): the worker then tells the\n"
    "  coordinator which experts it holds and receives only the others.\n"
    "  --memory: bytes offered for experts (suffixes K, M, G, T: powers of 1024).\n"
    "  --kv-memory: bytes offered for the KV pages of sharded attention, when\n"
    "  the coordinator uses this worker as a KV host (same syntax; 0: none).\n"
    "  The two budgets never overlap.  Of the node's memory N (or its cgroup's\n"
    "  limit, less 512 MiB): with neither, experts may take all of N and KV\n"
    "  pages take what the experts placed here leave; with one of them, the\n"
    "  other gets the rest of N (KV pages: none if nothing is left; experts:\n"
    "  the worker refuses to start); with both, each gets what it says.\n"
    "  --kv-only: hold no experts, only KV pages (no -m needed): the whole of N,\n"
    "  or --kv-memory.  The coordinator places no experts on such a worker and\n"
    "  prefers it as a KV host.\n"
    "  --slowdown F makes every batch take F times as long (to test balancing on\n"
    "  uneven hardware).\n"
    "  tcp:// links are CURVE-authenticated and encrypted: --key is this worker's\n"
    "  secret key, --server-key the coordinator's public key (see 'moefleet keygen');\n"
    "  --insecure allows plain tcp:// on a trusted network (the coordinator must\n"
    "  use it too).  A refused key or failed handshake ends the worker with an\n"
    "  error; --handshake-timeout bounds the handshake once connected (10000).\n"
    "  --reconnect S: outlive the coordinator: when it shuts down (or restarts),\n"
    "  say Hello again with a growing interval for up to S seconds, then exit 1.\n"
    "  Without it the worker exits 0 when the coordinator shuts down.\n";

int main(int argc, char **argv)
{
	const char *endpoint = NULL;
	struct worker_config cfg = {0};
	struct transport_zmq_security sec = {0};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			fputs(usage, stdout);
			return 0;
		}
		if (!strcmp(a, "--insecure")) {
			sec.insecure = 1;
			continue;
		}
		if (!strcmp(a, "--kv-only")) {
			cfg.kv_only = 1;
			continue;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moefleet-worker: unknown or incomplete argument '%s'\n%s",
				a, usage);
			return 2;
		}
		const char *v = argv[++i];
		char *end;
		errno = 0;
		if (!strcmp(a, "--connect")) {
			endpoint = v;
		} else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
			cfg.model_path = v;
		} else if (!strcmp(a, "--name")) {
			cfg.name = v;
		} else if (!strcmp(a, "--key")) {
			sec.key_file = v;
		} else if (!strcmp(a, "--server-key")) {
			sec.server_key_file = v;
		} else if (!strcmp(a, "--handshake-timeout")) {
			long ms = strtol(v, &end, 10);
			if (errno || *end || ms < 1 || ms > 3600000) {
				fprintf(stderr, "moefleet-worker: bad --handshake-timeout '%s'\n%s",
					v, usage);
				return 2;
			}
			sec.handshake_timeout_ms = (int)ms;
		} else if (!strcmp(a, "--reconnect")) {
			long sec = strtol(v, &end, 10);
			if (errno || *end || sec < 1 || sec > 86400) {
				fprintf(stderr, "moefleet-worker: bad --reconnect '%s'\n%s", v,
					usage);
				return 2;
			}
			cfg.reconnect_ms = (int)(sec * 1000);
		} else if (!strcmp(a, "--threads") || !strcmp(a, "-t")) {
			long t = strtol(v, &end, 10);
			if (errno || *end || t < 1 || t > 256) {
				fprintf(stderr, "moefleet-worker: bad --threads '%s'\n%s", v,
					usage);
				return 2;
			}
			cfg.n_threads = (int)t;
		} else if (!strcmp(a, "--slowdown")) {
			double f = strtod(v, &end);
			if (errno || *end || !(f >= 1.0 && f <= 1000.0)) {
				fprintf(stderr, "moefleet-worker: bad --slowdown '%s'\n%s", v,
					usage);
				return 2;
			}
			cfg.slowdown = f;
		} else if (!strcmp(a, "--memory") || !strcmp(a, "--kv-memory")) {
			int kv = !strcmp(a, "--kv-memory"), n = 0;
			uint64_t m = 0;
			if (!(kv && !strcmp(v, "0")) &&
			    (footprint_parse_memory(v, &m, 1, &n) || n != 1 || m > INT64_MAX)) {
				fprintf(stderr, "moefleet-worker: bad %s '%s'\n%s", a, v, usage);
				return 2;
			}
			if (kv)
				cfg.kv_memory_bytes = m ? (int64_t)m : -1;
			else
				cfg.memory_bytes = m;
		} else {
			fprintf(stderr, "moefleet-worker: unknown argument '%s'\n%s", a, usage);
			return 2;
		}
	}
	if (!endpoint) {
		fputs(usage, stderr);
		return 2;
	}
	if (cfg.kv_only && (cfg.model_path || cfg.memory_bytes || cfg.kv_memory_bytes < 0)) {
		fprintf(stderr, "moefleet-worker: --kv-only holds no experts: it takes no -m or "
				"--memory, and needs --kv-memory above 0\n");
		return 2;
	}
	transport *t = NULL;
	if (transport_zmq_connect_secure(endpoint, &sec, &t))
		return 1;
	int rc = worker_run(t, &cfg);
	transport_destroy(&t);
	return rc ? 1 : 0;
}
