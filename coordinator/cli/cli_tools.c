/* cli_tools: the subcommands that work on files without running a model:
 * `quantize` (routed experts to MXFP4/Q8_0/Q4_0), `split-experts` (per-node
 * shard files), `placement simulate`
 * (replaying a routing trace against placement policies) and `placement
 * show` (a trace's summary and heatmap). */
#define _GNU_SOURCE
#include "cli_impl.h"
#include "../model/footprint.h"
#include "../placement/heatmap.h"
#include "../placement/placement.h"
#include "../convert/quantize.h"
#include "../placement/simulate.h"
#include "../convert/split.h"
#include "../placement/trace.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ quantize */

static const char *cli_usage_quantize =
    "usage: moefleet quantize -m IN.gguf -o OUT.gguf --experts TYPE\n"
    "  Writes a copy of IN whose routed-expert tensors (names containing\n"
    "  \"_exps.weight\") are converted to TYPE: mxfp4, q8_0 or q4_0 (the bytes\n"
    "  ggml's reference quantiser gives).  Every other tensor and all metadata are\n"
    "  copied unchanged.  OUT is written as OUT.tmp and renamed when complete.\n"
    "  IN may be the first shard of a split model (NAME-00001-of-0000K.gguf);\n"
    "  OUT is one file.\n";

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
		fprintf(stderr,
			"moefleet: --experts: unknown type '%s' (use mxfp4, q8_0 or q4_0)\n",
			experts);
		return CLI_USAGE;
	}
	return quantize_file(in, out, type) ? CLI_FAIL : CLI_OK;
}

/* ------------------------------------------------------------ split-experts */

static const char *cli_usage_split =
    "usage: moefleet split-experts -m MODEL.gguf --workers CLUSTER.txt|N --out DIR\n"
    "                              [--worker-memory 64G,64G,...] [--replicas R]\n"
    "  Writes one per-node shard file per worker, DIR/NAME-wK-of-N.gguf (K = 1..N),\n"
    "  holding all of MODEL's metadata and only the routed-expert weights of the\n"
    "  experts placed on worker K: the placement a coordinator makes for N workers\n"
    "  (with the memory budgets and speeds of CLUSTER.txt, a 'placement simulate'\n"
    "  cluster file, or of --worker-memory; R copies of each expert).  Start each\n"
    "  worker with 'moefleet-worker -m NAME-wK-of-N.gguf': it tells the coordinator\n"
    "  which experts its file holds, the coordinator places them there, and streams\n"
    "  only experts a worker's file lacks.  MODEL may be the first shard of a split\n"
    "  model.  Each file is written as FILE.tmp and renamed when complete.\n";

int cli_split_experts(int argc, char **argv)
{
	const char *model = NULL, *workers = NULL, *dir = NULL, *memory = NULL;
	long replicas = 1;
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			fputs(cli_usage_split, stdout);
			return CLI_OK;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moefleet: unknown or incomplete argument '%s'\n", a);
			fputs(cli_usage_split, stderr);
			return CLI_USAGE;
		}
		const char *v = argv[++i];
		if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
			model = v;
		} else if (!strcmp(a, "--workers")) {
			workers = v;
		} else if (!strcmp(a, "--out") || !strcmp(a, "-o")) {
			dir = v;
		} else if (!strcmp(a, "--worker-memory")) {
			memory = v;
		} else if (!strcmp(a, "--replicas")) {
			if (cli_parse_long(a, v, 1, 64, &replicas))
				return CLI_USAGE;
		} else {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			fputs(cli_usage_split, stderr);
			return CLI_USAGE;
		}
	}
	if (!model || !workers || !dir) {
		fputs(cli_usage_split, stderr);
		return CLI_USAGE;
	}
	struct placement_worker *pw = NULL;
	int n = 0, rc = CLI_FAIL;
	if (strspn(workers, "0123456789") == strlen(workers)) {
		long l;
		if (cli_parse_long("--workers", workers, 1, FOOTPRINT_MAX_WORKERS, &l))
			return CLI_USAGE;
		n = (int)l;
		pw = calloc((size_t)n, sizeof(*pw));
		if (!pw)
			return CLI_FAIL;
		for (int i = 0; i < n; i++)
			pw[i] = (struct placement_worker){.mem_bytes = UINT64_MAX, .speed = 1.0};
	} else if (simulate_read_cluster(workers, &pw, &n)) {
		return CLI_FAIL;
	}
	if (memory) {
		uint64_t mem[FOOTPRINT_MAX_WORKERS];
		int n_mem = 0;
		if (footprint_parse_memory(memory, mem, FOOTPRINT_MAX_WORKERS, &n_mem) ||
		    n_mem != n) {
			fprintf(stderr,
				"moefleet: --worker-memory: expected %d sizes such as 64G, "
				"separated by commas\n",
				n);
			free(pw);
			return CLI_USAGE;
		}
		for (int i = 0; i < n; i++)
			pw[i].mem_bytes = mem[i];
	}
	if (replicas > n) {
		fprintf(stderr, "moefleet: --replicas %ld: at most the %d workers\n", replicas, n);
		rc = CLI_USAGE;
	} else if (split_experts(model, pw, n, (int)replicas, dir) == 0) {
		rc = CLI_OK;
	}
	free(pw);
	return rc;
}

/* ------------------------------------------------------------ placement */

static const char *cli_usage_placement =
    "usage: moefleet placement simulate --trace FILE --workers CLUSTER.txt\n"
    "                 [--policy static,trace,eplb,hetero,migrate] [--replicas R]\n"
    "                 [--rebalance-every STEPS] [--window TOKENS] [--threshold F]\n"
    "                 [--max-move BYTES] [--initial trace|build]\n"
    "  Replays a routing trace (made with --trace-routing) against a cluster\n"
    "  description, one worker per line:\n"
    "    NAME SPEED(expert-rows/s) MEMORY_BYTES LATENCY_US BANDWIDTH_MB_S\n"
    "  (optionally '@coordinator US_PER_STEP US_PER_TOKEN'; --stats prints a\n"
    "  calibrated file) and prints, per policy, worker load balance, wire bytes\n"
    "  and messages per token, predicted mean and median step time and bytes\n"
    "  migrated.  It starts from the placement the trace recorded when that fits\n"
    "  the workers (--initial build: place anew); policy 'trace' follows the\n"
    "  placements the trace recorded.\n"
    "\n"
    "       moefleet placement show --trace FILE [--out HEAT.png|HEAT.svg] [--holders]\n"
    "  Summarises a trace (steps, rows, token positions, busiest experts) and\n"
    "  draws a layer x expert heatmap of the routed load next to the placement\n"
    "  (the worker holding each replica; the last placement in the trace).\n"
    "  --holders lists that placement, one line per (layer, expert).\n";

/* `placement show`: a summary of a trace and, with --out, its heatmap. */
static int cli_placement_show(int argc, char **argv)
{
	const char *trace = NULL, *out = NULL;
	int holders = 0;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			fputs(cli_usage_placement, stdout);
			return CLI_OK;
		}
		if (!strcmp(a, "--holders")) {
			holders = 1;
			continue;
		}
		if (i + 1 >= argc || (strcmp(a, "--trace") && strcmp(a, "--out"))) {
			fprintf(stderr, "moefleet: unknown or incomplete argument '%s'\n", a);
			fputs(cli_usage_placement, stderr);
			return CLI_USAGE;
		}
		if (!strcmp(a, "--trace"))
			trace = argv[++i];
		else
			out = argv[++i];
	}
	if (!trace) {
		fputs(cli_usage_placement, stderr);
		return CLI_USAGE;
	}
	struct trace_summary ts;
	if (trace_summarize(trace, &ts))
		return CLI_FAIL;
	printf("trace: %llu records, %llu steps, %u layers x %u experts, %llu routed rows\n",
	       (unsigned long long)ts.records, (unsigned long long)ts.steps, ts.n_layer,
	       ts.n_expert, (unsigned long long)ts.rows);
	if (ts.n_positions)
		printf("positions: %llu rows with positions, %d..%d\n",
		       (unsigned long long)ts.n_positions, ts.pos_min, ts.pos_max);
	else
		printf("positions: none recorded\n");
	printf("placements: %llu recorded, %d workers, %u replicas\n",
	       (unsigned long long)ts.placements, ts.n_worker, ts.n_replica);
	for (uint32_t l = 0; l < ts.n_layer; l++) {
		if (!ts.layer_moe[l])
			continue;
		double sum = 0, max = 0;
		uint32_t arg = 0;
		for (uint32_t e = 0; e < ts.n_expert; e++) {
			double v = ts.load[(size_t)l * ts.n_expert + e];
			sum += v;
			if (v > max) {
				max = v;
				arg = e;
			}
		}
		printf("layer %u: %.0f routed items, busiest expert %u (%.0f, %.2fx the mean)\n", l,
		       sum, arg, max, sum > 0 ? max * ts.n_expert / sum : 0.0);
	}
	for (uint32_t l = 0; holders && ts.holders && l < ts.n_layer; l++)
		for (uint32_t e = 0; e < ts.n_expert && ts.layer_moe[l]; e++) {
			printf("holders: layer %u expert %u:", l, e);
			for (uint32_t r = 0; r < ts.n_replica; r++) {
				int32_t w =
				    ts.holders[((size_t)l * ts.n_expert + e) * ts.n_replica + r];
				if (w >= 0)
					printf(" %d", w);
			}
			printf("\n");
		}
	int rc = 0;
	if (out) {
		struct heatmap_data hd = {(int)ts.n_layer,
					  (int)ts.n_expert,
					  ts.layer_moe,
					  ts.load,
					  ts.holders ? (int)ts.n_replica : 0,
					  ts.n_worker,
					  ts.holders};
		int w, h;
		heatmap_size(&hd, &w, &h);
		rc = heatmap_write(out, &hd);
		if (!rc)
			printf("heatmap: %s, %dx%d\n", out, w, h);
	}
	trace_summary_free(&ts);
	return rc ? CLI_FAIL : CLI_OK;
}

int cli_placement(int argc, char **argv)
{
	struct simulate_config cfg = {.policy = "static", .replicas = 0, .threshold = 0.05};
	const char *policies = "static,eplb,hetero,migrate";
	if (argc >= 1 && !strcmp(argv[0], "show"))
		return cli_placement_show(argc, argv);
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
		} else if (!strcmp(a, "--initial")) {
			if (strcmp(v, "trace") && strcmp(v, "build")) {
				fprintf(
				    stderr,
				    "moefleet: --initial: expected 'trace' or 'build', not '%s'\n",
				    v);
				return CLI_USAGE;
			}
			cfg.build_initial = !strcmp(v, "build");
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
