/* cli info: `moefleet info` -- a GGUF model's metadata, tensors and type mix,
 * shards, and what a cluster needs to run it. */
#define _GNU_SOURCE
#include "cli_impl.h"
#include "../model/footprint.h"
#include "../../kernels/kern.h"

#include <stdio.h>
#include <string.h>

static const char *cli_usage_info =
    "usage: moefleet info -m MODEL.gguf [--workers N | --worker-memory 64G,64G,...]\n"
    "                     [--node-memory 32G [--ctx-size N] [--kv-shards V [--kv-page P]]]\n"
    "  Prints the architecture, hyper-parameters, every tensor's\n"
    "  type and size, and the bytes of routed experts versus the rest;\n"
    "  the tensor count and bytes per type, experts and the rest apart; the\n"
    "  files of a split model (give its first shard, NAME-00001-of-0000K.gguf);\n"
    "  then what a cluster needs: coordinator bytes, expert bytes per layer,\n"
    "  KV cache per 1K tokens, and with --workers / --worker-memory the\n"
    "  bytes each worker would hold.  --node-memory plans a cluster of nodes\n"
    "  with that much memory each: per node what it holds (the coordinator:\n"
    "  weights and the KV of one sequence of --ctx-size tokens, default 4096;\n"
    "  each worker: its experts), whether it fits, and how many worker nodes\n"
    "  the experts need.  --kv-shards then also plans the context's complete KV\n"
    "  pages on the workers as KV hosts (pages of --kv-page positions, default\n"
    "  1024): the coordinator keeps the pages in progress, each host the pages\n"
    "  of its chains beside its experts, and how many worker nodes that needs.\n";

static void cli_print_kv(const gguf *g, uint64_t i)
{
	const char *key = gguf_kv_key(g, i);
	enum gguf_type t = gguf_kv_type(g, i);
	printf("  %-48s ", key);
	switch (t) {
	case GGUF_TYPE_U16: {
		uint16_t v;
		gguf_get_u16(g, key, &v);
		printf("%u\n", (unsigned)v);
		break;
	}
	case GGUF_TYPE_U32: {
		uint32_t v;
		gguf_get_u32(g, key, &v);
		printf("%u\n", v);
		break;
	}
	case GGUF_TYPE_I32: {
		int32_t v;
		gguf_get_i32(g, key, &v);
		printf("%d\n", v);
		break;
	}
	case GGUF_TYPE_F32: {
		float v;
		gguf_get_f32(g, key, &v);
		printf("%g\n", v);
		break;
	}
	case GGUF_TYPE_BOOL: {
		int v;
		gguf_get_bool(g, key, &v);
		printf("%s\n", v ? "true" : "false");
		break;
	}
	case GGUF_TYPE_STRING: {
		gguf_str s;
		gguf_get_str(g, key, &s);
		int n = s.len > 60 ? 60 : (int)s.len;
		printf("\"%.*s\"%s\n", n, s.ptr, s.len > 60 ? "..." : "");
		break;
	}
	case GGUF_TYPE_ARRAY: {
		enum gguf_type et;
		uint64_t count;
		const void *d;
		gguf_get_arr(g, key, &et, &count, &d);
		printf("[array of %llu]\n", (unsigned long long)count);
		break;
	}
	default: printf("(type %d)\n", (int)t); break;
	}
}

/* Tensors and bytes per tensor type, routed experts (names with "_exps.")
 * and the rest apart. */
static void cli_print_type_mix(const gguf *g)
{
	enum { N_TYPES = 64 };
	uint64_t count[2][N_TYPES] = {{0}}, bytes[2][N_TYPES] = {{0}};
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		int ex = strstr(t->name, "_exps.") != NULL;
		uint32_t ty = t->type < N_TYPES ? t->type : N_TYPES - 1; /* known types are below */
		count[ex][ty]++;
		bytes[ex][ty] += t->n_bytes;
	}
	printf("tensor types:              routed experts              everything else\n");
	printf("  %-8s %8s %16s    %8s %16s\n", "type", "tensors", "bytes", "tensors", "bytes");
	for (uint32_t ty = 0; ty < N_TYPES; ty++) {
		if (!count[0][ty] && !count[1][ty])
			continue;
		printf("  %-8s %8llu %16llu    %8llu %16llu\n", kern_type_name(ty),
		       (unsigned long long)count[1][ty], (unsigned long long)bytes[1][ty],
		       (unsigned long long)count[0][ty], (unsigned long long)bytes[0][ty]);
	}
}

/* The files of a split model: path, tensors and bytes of each shard. */
static void cli_print_shards(const gguf *g)
{
	uint32_t n = gguf_n_shards(g);
	if (n < 2)
		return;
	printf("split into %u files:\n", n);
	for (uint32_t i = 0; i < n; i++)
		printf("  %s: %llu tensors, %llu bytes\n", gguf_shard_path(g, i),
		       (unsigned long long)gguf_shard_n_tensors(g, i),
		       (unsigned long long)gguf_shard_size(g, i));
}

int cli_info(int argc, char **argv)
{
	struct cli_opts o = {0};
	if (cli_parse(argc, argv,
		      "-m --model --workers --worker-memory --node-memory --ctx-size --kv-shards "
		      "--kv-page",
		      &o) ||
	    (!o.help && !o.model)) {
		fputs(cli_usage_info, stderr);
		return CLI_USAGE;
	}
	uint64_t wmem[FOOTPRINT_MAX_WORKERS];
	int n_wmem = 0;
	struct footprint_plan plan = {
	    .n_ctx = (int)o.ctx_size, .kv_shards = (int)o.kv_shards, .kv_page = (int)o.kv_page};
	if (o.kv_shards & (o.kv_shards - 1)) {
		fprintf(stderr, "moefleet: --kv-shards: %ld is not a power of two\n", o.kv_shards);
		fputs(cli_usage_info, stderr);
		return CLI_USAGE;
	}
	int n_node = 0;
	if ((o.worker_memory &&
	     footprint_parse_memory(o.worker_memory, wmem, FOOTPRINT_MAX_WORKERS, &n_wmem)) ||
	    (o.node_memory &&
	     footprint_parse_memory(o.node_memory, &plan.node_memory, 1, &n_node))) {
		fputs(cli_usage_info, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_info, stdout);
		return CLI_OK;
	}
	kern_init();
	gguf *g = NULL;
	if (gguf_open(o.model, &g))
		return CLI_FAIL;
	char arch[64] = "?";
	gguf_get_cstr(g, "general.architecture", arch, sizeof(arch));
	printf("file: %s (%llu bytes)\narchitecture: %s\nhyper-parameters:\n", o.model,
	       (unsigned long long)gguf_file_size(g), arch);
	size_t al = strlen(arch);
	for (uint64_t i = 0; i < gguf_n_kv(g); i++) {
		const char *k = gguf_kv_key(g, i);
		if (!strncmp(k, arch, al) && k[al] == '.')
			cli_print_kv(g, i);
	}
	printf("other metadata:\n");
	for (uint64_t i = 0; i < gguf_n_kv(g); i++) {
		const char *k = gguf_kv_key(g, i);
		if (!(!strncmp(k, arch, al) && k[al] == '.'))
			cli_print_kv(g, i);
	}
	printf("tensors (%llu):\n", (unsigned long long)gguf_n_tensors(g));
	uint64_t experts = 0, rest = 0;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		char shape[96];
		int n = 0;
		for (uint32_t d = 0; d < t->n_dims; d++)
			n += snprintf(shape + n, sizeof(shape) - (size_t)n, "%s%llu",
				      d ? " x " : "", (unsigned long long)t->ne[d]);
		printf("  %-40s %-6s %-24s %12llu bytes\n", t->name, kern_type_name(t->type), shape,
		       (unsigned long long)t->n_bytes);
		if (strstr(t->name, "_exps."))
			experts += t->n_bytes;
		else
			rest += t->n_bytes;
	}
	printf("routed experts: %llu bytes (%.1f MiB)\n", (unsigned long long)experts,
	       (double)experts / 1048576.0);
	printf("everything else: %llu bytes (%.1f MiB)\n", (unsigned long long)rest,
	       (double)rest / 1048576.0);
	cli_print_type_mix(g);
	cli_print_shards(g);
	int frc =
	    footprint_report(g, n_wmem ? wmem : NULL, n_wmem ? n_wmem : (int)o.workers, &plan);
	gguf_destroy(&g);
	return frc ? CLI_FAIL : CLI_OK;
}
