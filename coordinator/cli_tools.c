/* cli_tools: the subcommands that work on files without running a model:
 * `quantize` (routed experts to MXFP4/Q8_0/Q4_0) and `placement simulate`
 * (replaying a routing trace against placement policies). */
#define _GNU_SOURCE
#include "cli_impl.h"
#include "quantize.h"
#include "simulate.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------ quantize */

static const char *cli_usage_quantize =
	"usage: moefleet quantize -m IN.gguf -o OUT.gguf --experts TYPE\n"
	"  Writes a copy of IN whose routed-expert tensors (names containing\n"
	"  \"_exps.weight\") are converted to TYPE: mxfp4, q8_0 or q4_0 (the bytes\n"
	"  ggml's reference quantiser gives).  Every other tensor and all metadata are\n"
	"  copied unchanged.  OUT is written as OUT.tmp and renamed when complete.\n";

int cli_quantize(int argc, char **argv)
{
	const char *in = NULL, *out = NULL, *experts = NULL;
	int help = 0;
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		const char **dst = NULL;
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			help = 1;
			continue;
		}
		if (!strcmp(a, "-m") || !strcmp(a, "--model"))
			dst = &in;
		else if (!strcmp(a, "-o") || !strcmp(a, "--out"))
			dst = &out;
		else if (!strcmp(a, "--experts"))
			dst = &experts;
		if (!dst) {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			fputs(cli_usage_quantize, stderr);
			return CLI_USAGE;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moefleet: %s needs a value\n", a);
			fputs(cli_usage_quantize, stderr);
			return CLI_USAGE;
		}
		*dst = argv[++i];
	}
	if (help) {
		fputs(cli_usage_quantize, stdout);
		return CLI_OK;
	}
	if (!in || !out || !experts) {
		fputs(cli_usage_quantize, stderr);
		return CLI_USAGE;
	}
	uint32_t type;
	if (quantize_parse_type(experts, &type)) {
		fprintf(stderr, "moefleet: --experts: unknown type '%s' (use mxfp4, q8_0 or q4_0)\n",
			experts);
		return CLI_USAGE;
	}
	return quantize_file(in, out, type) ? CLI_FAIL : CLI_OK;
}

/* ------------------------------------------------------------ placement */

static const char *cli_usage_placement =
	"usage: moefleet placement simulate --trace FILE --workers CLUSTER.txt\n"
	"                 [--policy static,eplb,hetero,migrate] [--replicas R]\n"
	"                 [--rebalance-every STEPS] [--window TOKENS] [--threshold F]\n"
	"                 [--max-move BYTES]\n"
	"  Replays a routing trace (made with --trace-routing) against a cluster\n"
	"  description, one worker per line:\n"
	"    NAME SPEED(expert-rows/s) MEMORY_BYTES LATENCY_US BANDWIDTH_MB_S\n"
	"  and prints, per policy, worker load balance, wire bytes and messages per\n"
	"  token, predicted step time and bytes migrated.\n";

int cli_placement(int argc, char **argv)
{
	struct simulate_config cfg = {.policy = "static", .replicas = 1, .threshold = 0.05};
	const char *policies = "static,eplb,hetero,migrate";
	if (argc < 1 || strcmp(argv[0], "simulate")) {
		if (argc >= 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"))) {
			fputs(cli_usage_placement, stdout);
			return CLI_OK;
		}
		fputs(cli_usage_placement, stderr);
		return CLI_USAGE;
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			fputs(cli_usage_placement, stdout);
			return CLI_OK;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moefleet: unknown or incomplete argument '%s'\n", a);
			fputs(cli_usage_placement, stderr);
			return CLI_USAGE;
		}
		const char *v = argv[++i];
		long l;
		double d;
		if (!strcmp(a, "--trace")) {
			cfg.trace_path = v;
		} else if (!strcmp(a, "--workers")) {
			cfg.workers_path = v;
		} else if (!strcmp(a, "--policy")) {
			policies = v;
		} else if (!strcmp(a, "--replicas")) {
			if (cli_parse_long(a, v, 1, 64, &l))
				return CLI_USAGE;
			cfg.replicas = (int)l;
		} else if (!strcmp(a, "--rebalance-every")) {
			if (cli_parse_long(a, v, 0, 1L << 30, &l))
				return CLI_USAGE;
			cfg.rebalance_every = (int)l;
		} else if (!strcmp(a, "--window")) {
			if (cli_parse_long(a, v, 1, 1L << 30, &l))
				return CLI_USAGE;
			cfg.window_tokens = (double)l;
		} else if (!strcmp(a, "--threshold")) {
			if (cli_parse_double(a, v, 0.0, 10.0, &d))
				return CLI_USAGE;
			cfg.threshold = d;
		} else if (!strcmp(a, "--max-move")) {
			if (cli_parse_long(a, v, 0, 0x7fffffffL, &l))
				return CLI_USAGE;
			cfg.max_move_bytes = (unsigned long long)l;
		} else {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			fputs(cli_usage_placement, stderr);
			return CLI_USAGE;
		}
	}
	if (!cfg.trace_path || !cfg.workers_path) {
		fputs(cli_usage_placement, stderr);
		return CLI_USAGE;
	}
	char list[256];
	snprintf(list, sizeof(list), "%s", policies);
	for (char *save = NULL, *name = strtok_r(list, ",", &save); name;
	     name = strtok_r(NULL, ",", &save)) {
		cfg.policy = name;
		if (simulate_run(&cfg, stdout))
			return CLI_FAIL;
	}
	return CLI_OK;
}

