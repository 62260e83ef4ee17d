/* footprint: what a cluster needs to run a GGUF model (see footprint.h). */
#include "footprint.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"
#include "../placement/placement.h"
#include "arch.h"

/* "<arch>.<key>" as u32; def when absent. */
static uint64_t footprint_u32(const gguf *g, const char *arch, const char *key, uint64_t def)
{
	char k[192];
	uint32_t v;
	snprintf(k, sizeof(k), "%s.%s", arch, key);
	return gguf_get_u32(g, k, &v) == 0 ? (uint64_t)v : def;
}

/* The layer of a routed-expert tensor "blk.L.<...>_exps.<...>", else -1. */
static int footprint_expert_layer(const char *name)
{
	if (strncmp(name, "blk.", 4) != 0 || !strstr(name, "_exps."))
		return -1;
	char *end = NULL;
	errno = 0;
	long l = strtol(name + 4, &end, 10);
	if (errno || end == name + 4 || *end != '.' || l < 0 || l >= MOE_MAX_LAYERS)
		return -1;
	return (int)l;
}

/* deepseek4: compressed caches, indexer keys, window rings, compressor states. */
static int footprint_kv_deepseek4(const gguf *g, struct footprint *f)
{
	const char *a = f->arch;
	const uint64_t D = footprint_u32(g, a, "attention.key_length", 0);
	const uint64_t DI = footprint_u32(g, a, "attention.indexer.key_length", 0);
	const uint64_t W = footprint_u32(g, a, "attention.sliding_window", 0);
	char k[192];
	snprintf(k, sizeof(k), "%s.attention.compress_ratios", a);
	enum gguf_type et;
	uint64_t count = 0;
	const void *data = NULL;
	if (D == 0 || gguf_get_arr(g, k, &et, &count, &data) ||
	    (et != GGUF_TYPE_I32 && et != GGUF_TYPE_U32) || count < (uint64_t)f->n_layer)
		return 0;
	uint64_t per_1k = 0, fixed = 0;
	for (int l = 0; l < f->n_layer; l++) {
		int32_t r;
		memcpy(&r, (const uint8_t *)data + 4 * (size_t)l, 4);
		fixed += W * D * 2; /* window ring, F16 */
		if (r <= 0)
			continue;
		per_1k += 1024 / (uint64_t)r * D * 2;
		if (r == 4) {
			per_1k += 1024 / 4 * DI * 2;
			fixed += (2 * 8 * 2 * D + 2 * 8 * 2 * DI) * sizeof(float);
		} else {
			fixed += 2 * (uint64_t)r * D * sizeof(float);
		}
	}
	f->kv_bytes_per_1k = per_1k;
	f->kv_bytes_fixed = fixed;
	return 1;
}

static int footprint_kv(const gguf *g, struct footprint *f)
{
	const char *a = f->arch;
	const uint64_t L = (uint64_t)f->n_layer;
	const uint64_t E = footprint_u32(g, a, "embedding_length", 0);
	const uint64_t H = footprint_u32(g, a, "attention.head_count", 0);
	if (strcmp(a, "deepseek4") == 0)
		return footprint_kv_deepseek4(g, f);
	if (strcmp(a, "deepseek2") == 0) {
		const uint64_t c = footprint_u32(g, a, "attention.kv_lora_rank", 0);
		const uint64_t rot = footprint_u32(g, a, "rope.dimension_count", 0);
		if (c == 0)
			return 0;
		f->kv_bytes_per_1k = 1024 * L * (c + rot) * 2; /* the value c read from the key */
		return 1;
	}
	if (strcmp(a, "qwen3moe") == 0 || strcmp(a, "gpt-oss") == 0) {
		if (H == 0)
			return 0;
		const uint64_t hkv = footprint_u32(g, a, "attention.head_count_kv", H);
		const uint64_t dk = footprint_u32(g, a, "attention.key_length", E / H);
		const uint64_t dv = footprint_u32(g, a, "attention.value_length", E / H);
		const uint64_t row = hkv * (dk + dv) * 2; /* one layer, one position */
		uint64_t n_ring = 0;
		if (strcmp(a, "gpt-oss") == 0) {
			/* the sliding-window layers keep rings (arch_gptoss.c) */
			uint8_t is_swa[MOE_MAX_LAYERS];
			const struct arch_env env = {.g = g};
			if (arch_swa_layers(&env, a, f->n_layer, is_swa) != 0)
				return 0;
			for (int l = 0; l < f->n_layer; l++)
				n_ring += is_swa[l];
			f->kv_ring_window = footprint_u32(g, a, "attention.sliding_window", 0);
			if (f->kv_ring_window == 0)
				n_ring = 0;
		}
		f->kv_bytes_per_1k = 1024 * (L - n_ring) * row;
		f->kv_ring_bytes_per_pos = n_ring * row;
		return 1;
	}
	return 0;
}

uint64_t footprint_kv_bytes(const struct footprint *f, int n_ctx, int n_batch)
{
	if (!f->kv_known)
		return 0;
	if (n_batch <= 0) {
		struct model_params mp;
		model_params_default(&mp);
		n_batch = mp.n_batch;
	}
	uint64_t ring = f->kv_ring_window + (uint64_t)n_batch;
	if (ring > (uint64_t)n_ctx)
		ring = (uint64_t)n_ctx;
	return (uint64_t)((double)f->kv_bytes_per_1k * n_ctx / 1024.0) + f->kv_bytes_fixed +
	       f->kv_ring_bytes_per_pos * ring;
}

/* deepseek2 legacy layout: bytes of the attn_k_b the coordinator builds from
 * each layer's attn_kv_b (0 for split files). */
static uint64_t footprint_built_deepseek2(const gguf *g, const struct footprint *f)
{
	const char *a = f->arch;
	char k[192];
	snprintf(k, sizeof(k), "%s.attention.key_length_mla", a);
	if (strcmp(a, "deepseek2") != 0 || gguf_find_kv(g, k) >= 0)
		return 0;
	const uint64_t H = footprint_u32(g, a, "attention.head_count", 0);
	const uint64_t kvr = footprint_u32(g, a, "attention.kv_lora_rank", 0);
	const uint64_t E = footprint_u32(g, a, "embedding_length", 0);
	const uint64_t key_len = footprint_u32(g, a, "attention.key_length", H ? E / H : 0);
	const uint64_t rot = footprint_u32(g, a, "rope.dimension_count", key_len);
	const uint64_t nextn = footprint_u32(g, a, "nextn_predict_layers", 0);
	if (H == 0 || kvr == 0 || key_len <= rot || nextn >= (uint64_t)f->n_layer)
		return 0;
	const uint64_t nope = key_len - rot;
	uint64_t bytes = 0;
	for (uint64_t l = 0; l < (uint64_t)f->n_layer - nextn; l++) {
		char name[64];
		snprintf(name, sizeof(name), "blk.%llu.attn_kv_b.weight", (unsigned long long)l);
		const gguf_tensor *t = gguf_find_tensor(g, name);
		if (!t)
			continue;
		uint32_t type = t->type;
		if (type != KERN_F32 && type != KERN_F16 && type != KERN_BF16)
			type = nope % KERN_QK == 0 ? KERN_Q8_0 : KERN_F16;
		bytes += H * kvr * kern_row_bytes(type, (int64_t)nope);
	}
	return bytes;
}

int footprint_measure(const gguf *g, struct footprint *out)
{
	memset(out, 0, sizeof(*out));
	if (gguf_get_cstr(g, "general.architecture", out->arch, sizeof(out->arch))) {
		log_error("%s: missing key general.architecture", gguf_path(g));
		return ERR_FORMAT;
	}
	out->file_bytes = gguf_file_size(g);
	uint64_t n_layer = footprint_u32(g, out->arch, "block_count", 0);
	if (n_layer < 1 || n_layer > MOE_MAX_LAYERS) {
		log_error("%s: %s.block_count must be in [1, %d]", gguf_path(g), out->arch,
			  MOE_MAX_LAYERS);
		return ERR_FORMAT;
	}
	out->n_layer = (int)n_layer;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		int l = footprint_expert_layer(t->name);
		if (l < 0 || l >= out->n_layer) {
			out->coordinator_bytes += t->n_bytes;
			continue;
		}
		out->expert_bytes += t->n_bytes;
		out->layer_expert_bytes[l] += t->n_bytes;
		if (t->n_dims == 3 && out->n_expert == 0 && t->ne[2] <= 65536)
			out->n_expert = (int)t->ne[2];
		if (t->n_dims == 2 && out->n_expert == 0 && t->ne[1] <= 65536) /* biases */
			out->n_expert = (int)t->ne[1];
	}
	out->n_expert_used = (int)footprint_u32(g, out->arch, "expert_used_count", 0);
	out->kv_known = footprint_kv(g, out);
	out->coordinator_built_bytes = footprint_built_deepseek2(g, out);
	return 0;
}

int footprint_place(const struct footprint *f, const uint64_t *mem, int n_worker,
		    uint64_t *worker_bytes)
{
	int rc = 0;
	uint8_t layer_moe[MOE_MAX_LAYERS] = {0};
	uint64_t bytes[MOE_MAX_LAYERS] = {0};
	struct placement_worker *pw = NULL;
	placement p = {0};
	if (f->n_expert < 1 || f->expert_bytes == 0 || n_worker < 1 ||
	    n_worker > FOOTPRINT_MAX_WORKERS) {
		log_error("placement: the model has no routed experts or the worker count %d is "
			  "out of range",
			  n_worker);
		return ERR_CONFIG;
	}
	for (int l = 0; l < f->n_layer; l++) {
		layer_moe[l] = f->layer_expert_bytes[l] > 0;
		bytes[l] = f->layer_expert_bytes[l] / (uint64_t)f->n_expert;
	}
	pw = calloc((size_t)n_worker, sizeof(*pw));
	if (!pw)
		return ERR_NOMEM;
	for (int i = 0; i < n_worker; i++) {
		pw[i].mem_bytes = mem[i];
		pw[i].speed = 1.0;
	}
	struct placement_model pm = {f->n_layer, f->n_expert, layer_moe, bytes, NULL};
	rc = placement_build(&pm, pw, n_worker, 1, &p);
	if (rc)
		goto out;
	for (int i = 0; i < n_worker; i++)
		worker_bytes[i] = p.worker_bytes[i];
out:
	placement_free(&p);
	free(pw);
	return rc;
}

int footprint_parse_memory(const char *list, uint64_t *mem, int max, int *n)
{
	*n = 0;
	const char *p = list;
	while (p && *p) {
		char *end = NULL;
		errno = 0;
		double v = strtod(p, &end);
		if (end == p || errno || !(v > 0) || v > 1e18)
			goto bad;
		double mul = 1;
		switch (*end) {
		case 'K':
		case 'k':
			mul = 1024.0;
			end++;
			break;
		case 'M':
		case 'm':
			mul = 1048576.0;
			end++;
			break;
		case 'G':
		case 'g':
			mul = 1073741824.0;
			end++;
			break;
		case 'T':
		case 't':
			mul = 1099511627776.0;
			end++;
			break;
		default: break;
		}
		if (*end == 'B' || *end == 'b')
			end++;
		if (*end != ',' && *end != '\0')
			goto bad;
		if (*n == max) {
			log_error("memory sizes '%s': more than %d", list, max);
			return ERR_CONFIG;
		}
		if (v * mul > 1.8e19 || v * mul < 1)
			goto bad;
		mem[(*n)++] = (uint64_t)(v * mul);
		p = *end == ',' ? end + 1 : end;
		if (*end == ',' && *p == '\0')
			goto bad;
	}
	if (*n == 0)
		goto bad;
	return 0;
bad:
	log_error("memory sizes '%s': expected sizes like 64G,64G,32G", list ? list : "");
	return ERR_CONFIG;
}

/* "12.34 GiB" / "5.6 MiB" / "789 B" into buf. */
static const char *footprint_human(uint64_t b, char *buf, size_t cap)
{
	if (b >= 1073741824ull)
		snprintf(buf, cap, "%.2f GiB", (double)b / 1073741824.0);
	else if (b >= 1048576ull)
		snprintf(buf, cap, "%.2f MiB", (double)b / 1048576.0);
	else if (b >= 1024ull)
		snprintf(buf, cap, "%.2f KiB", (double)b / 1024.0);
	else
		snprintf(buf, cap, "%llu B", (unsigned long long)b);
	return buf;
}

/* Whether a node of `memory` bytes holds `bytes` plus the working room. */
static const char *footprint_fits(uint64_t bytes, uint64_t memory)
{
	return bytes + FOOTPRINT_ROOM <= memory ? "fits" : "DOES NOT FIT";
}

/* Per node: what it holds and whether that fits --node-memory. */
static int footprint_report_nodes(const struct footprint *f, const uint64_t *mem, int n_worker,
				  const struct footprint_plan *plan)
{
	char h1[32], h2[32], h3[32], h4[32];
	uint64_t node = plan->node_memory, kv = 0, *wb = NULL, *budget = NULL;
	int n_ctx = plan->n_ctx > 0 ? plan->n_ctx : 4096, rc = 0;
	kv = footprint_kv_bytes(f, n_ctx, plan->n_batch);
	uint64_t coord = f->coordinator_bytes + f->coordinator_built_bytes + kv;
	printf("  plan: nodes of %s each (%s of it kept for buffers and the system), one "
	       "sequence of %d tokens:\n",
	       footprint_human(node, h1, 32), footprint_human(FOOTPRINT_ROOM, h2, 32), n_ctx);
	printf("    coordinator: %s of weights + %s of KV + room = %s of %s: %s\n",
	       footprint_human(f->coordinator_bytes + f->coordinator_built_bytes, h1, 32),
	       footprint_human(kv, h2, 32), footprint_human(coord + FOOTPRINT_ROOM, h3, 32),
	       footprint_human(node, h4, 32), footprint_fits(coord, node));
	uint64_t per = node > FOOTPRINT_ROOM ? node - FOOTPRINT_ROOM : 0;
	if (per == 0) {
		printf("    workers: %s leaves no room for experts\n",
		       footprint_human(node, h1, 32));
		return 0;
	}
	uint64_t need_n = (f->expert_bytes + per - 1) / per;
	if (n_worker <= 0) {
		printf("    workers: %s of experts need at least %llu node(s) of this size "
		       "(--workers N to place them)\n",
		       footprint_human(f->expert_bytes, h1, 32), (unsigned long long)need_n);
		return 0;
	}
	wb = calloc((size_t)n_worker, sizeof(*wb));
	budget = calloc((size_t)n_worker, sizeof(*budget));
	if (!wb || !budget) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int i = 0; i < n_worker; i++)
		budget[i] = mem ? (mem[i] < per ? mem[i] : per) : per;
	if (footprint_place(f, budget, n_worker, wb) != 0) {
		printf("    workers: %s of experts DO NOT FIT on %d node(s); at least %llu are "
		       "needed\n",
		       footprint_human(f->expert_bytes, h1, 32), n_worker,
		       (unsigned long long)need_n);
		goto out;
	}
	for (int i = 0; i < n_worker; i++) {
		uint64_t has = mem && mem[i] < node ? mem[i] : node;
		printf("    worker %d: %s of experts + room = %s of %s: %s\n", i,
		       footprint_human(wb[i], h1, 32),
		       footprint_human(wb[i] + FOOTPRINT_ROOM, h2, 32),
		       footprint_human(has, h3, 32), footprint_fits(wb[i], has));
	}
	printf("    the model needs at least %llu worker node(s) of this size\n",
	       (unsigned long long)need_n);
out:
	free(wb);
	free(budget);
	return rc;
}

/* footprint_plan_kv_hosts(), printed. */
static int footprint_report_kv_hosts(const struct footprint *f, int n_worker,
				     const struct footprint_plan *plan)
{
	char h1[32], h2[32], h3[32], h4[32];
	struct footprint_kv_hosts *k = malloc(sizeof(*k));
	if (!k)
		return ERR_NOMEM;
	const uint64_t node = plan->node_memory;
	int rc = footprint_plan_kv_hosts(f, plan, n_worker, k);
	printf("  plan with the KV pages on hosts (--kv-shards %d):\n", plan->kv_shards);
	if (rc == ERR_CONFIG) {
		printf("    %s\n",
		       !strcmp(f->arch, "deepseek4")
			   ? "deepseek4 keeps its attention on the coordinator (KV hosts "
			     "score only the indexer's keys)"
			   : "no pages for KV hosts in this layout");
		rc = 0;
		goto out;
	}
	const uint64_t weights = f->coordinator_bytes + f->coordinator_built_bytes;
	printf("    coordinator: %s of weights + %s of KV (the pages in progress) + room = %s of "
	       "%s: %s\n",
	       footprint_human(weights, h1, 32), footprint_human(k->coord_kv, h2, 32),
	       footprint_human(weights + k->coord_kv + FOOTPRINT_ROOM, h3, 32),
	       footprint_human(node, h4, 32), footprint_fits(weights + k->coord_kv, node));
	printf("    %d complete page(s) of %s per sequence on %d host(s)\n", k->n_pages,
	       footprint_human(k->page_bytes, h1, 32), k->n_hosts);
	if (rc && k->host_kv[0] + FOOTPRINT_ROOM > node) {
		printf(
		    "    workers: a host's pages (%s) DO NOT FIT a node of this size: more chains "
		    "(--kv-shards) or bigger nodes\n",
		    footprint_human(k->host_kv[0], h1, 32));
		rc = 0;
		goto out;
	}
	if (rc) {
		printf("    workers: the experts and the pages DO NOT FIT on %d node(s) of this "
		       "size\n",
		       k->n_worker);
		rc = 0;
		goto out;
	}
	for (int w = 0; w < k->n_worker; w++) {
		const uint64_t kv = w < k->n_hosts ? k->host_kv[w] : 0;
		printf("    worker %d: %s of experts + %s of KV pages + room = %s of %s: %s\n", w,
		       footprint_human(k->worker_bytes[w], h1, 32), footprint_human(kv, h2, 32),
		       footprint_human(k->worker_bytes[w] + kv + FOOTPRINT_ROOM, h3, 32),
		       footprint_human(node, h4, 32),
		       footprint_fits(k->worker_bytes[w] + kv, node));
	}
	if (n_worker <= 0)
		printf("    with the pages on hosts, the model needs at least %d worker node(s) of "
		       "this size\n",
		       k->n_worker);
out:
	free(k);
	return rc;
}

int footprint_plan_kv_hosts(const struct footprint *f, const struct footprint_plan *plan,
			    int n_worker, struct footprint_kv_hosts *out)
{
	struct model_params mp;
	model_params_default(&mp);
	const int V = plan->kv_shards, P = plan->kv_page > 0 ? plan->kv_page : mp.kv_page;
	const int n_ctx = plan->n_ctx > 0 ? plan->n_ctx : 4096;
	const int n_batch = plan->n_batch > 0 ? plan->n_batch : mp.n_batch;
	memset(out, 0, sizeof(*out));
	if (!f->kv_known || !strcmp(f->arch, "deepseek4") || V < 1 || V > 64 || (V & (V - 1)) ||
	    P < 1 || n_worker > FOOTPRINT_MAX_WORKERS)
		return ERR_CONFIG;
	out->n_pages = (n_ctx - 1) / P;
	out->page_bytes = f->kv_bytes_per_1k * (uint64_t)P / 1024;
	const uint64_t local = (uint64_t)(P + n_batch < n_ctx ? P + n_batch : n_ctx);
	const uint64_t ring = f->kv_ring_window + (uint64_t)n_batch;
	out->coord_kv =
	    f->kv_bytes_per_1k * local / 1024 + f->kv_bytes_fixed +
	    f->kv_ring_bytes_per_pos * (ring < (uint64_t)n_ctx ? ring : (uint64_t)n_ctx);
	const uint64_t per =
	    plan->node_memory > FOOTPRINT_ROOM ? plan->node_memory - FOOTPRINT_ROOM : 0;
	const uint64_t all = f->expert_bytes + (uint64_t)out->n_pages * out->page_bytes;
	if (per == 0)
		return ERR_RANGE;
	const uint64_t least = (all + per - 1) / per;
	int n = n_worker > 0			? n_worker
		: least > FOOTPRINT_MAX_WORKERS ? FOOTPRINT_MAX_WORKERS + 1
						: (int)least;
	for (n = n < 1 ? 1 : n; n <= FOOTPRINT_MAX_WORKERS; n++) {
		int H = 1;
		while (2 * H <= n && 2 * H <= V)
			H *= 2;
		uint64_t have = 0, budget[FOOTPRINT_MAX_WORKERS];
		int room = 1;
		for (int w = 0; w < n; w++) {
			uint64_t kv = 0;
			if (w < H) { /* pages i with i mod V in [w * c, (w + 1) * c) */
				const int c = V / H, rem = out->n_pages % V - w * c;
				const uint64_t pages = (uint64_t)(out->n_pages / V) * (uint64_t)c +
						       (uint64_t)(rem < 0   ? 0
								  : rem < c ? rem
									    : c);
				kv = pages * out->page_bytes;
				out->host_kv[w] = kv;
			}
			room &= kv <= per;
			budget[w] = kv <= per ? per - kv : 0;
			have += budget[w];
		}
		out->n_worker = n;
		out->n_hosts = H;
		if (room && have >= f->expert_bytes &&
		    (f->expert_bytes == 0 || footprint_place(f, budget, n, out->worker_bytes) == 0))
			return 0;
		if (n_worker > 0 || (H == V && !room))
			break; /* the nodes given, or hosts that more nodes would not relieve */
	}
	return ERR_RANGE;
}

int footprint_report(const gguf *g, const uint64_t *mem, int n_worker,
		     const struct footprint_plan *plan)
{
	struct footprint f;
	uint64_t *wb = NULL, *ample = NULL;
	char h1[32], h2[32];
	int rc = footprint_measure(g, &f);
	if (rc)
		return rc;
	printf("cluster footprint:\n");
	printf("  coordinator (all but routed experts): %14llu bytes (%s)\n",
	       (unsigned long long)f.coordinator_bytes,
	       footprint_human(f.coordinator_bytes, h1, 32));
	if (f.coordinator_built_bytes)
		printf("  coordinator, built at load (attn_k_b from the legacy attn_kv_b): %llu "
		       "bytes (%s)\n",
		       (unsigned long long)f.coordinator_built_bytes,
		       footprint_human(f.coordinator_built_bytes, h1, 32));
	printf("  routed experts (workers):             %14llu bytes (%s), %d per layer, %d per "
	       "token\n",
	       (unsigned long long)f.expert_bytes, footprint_human(f.expert_bytes, h1, 32),
	       f.n_expert, f.n_expert_used);
	for (int l = 0; l < f.n_layer; l++)
		if (f.layer_expert_bytes[l])
			printf("    layer %3d: %14llu bytes (%s per expert)\n", l,
			       (unsigned long long)f.layer_expert_bytes[l],
			       footprint_human(
				   f.n_expert ? f.layer_expert_bytes[l] / (uint64_t)f.n_expert : 0,
				   h1, 32));
	if (f.kv_known) {
		printf("  KV cache per sequence: %llu bytes (%s) per 1K tokens of context, plus %s "
		       "fixed\n",
		       (unsigned long long)f.kv_bytes_per_1k,
		       footprint_human(f.kv_bytes_per_1k, h1, 32),
		       footprint_human(f.kv_bytes_fixed, h2, 32));
		if (f.kv_ring_bytes_per_pos)
			printf("    plus %s per position of the sliding-window layers' rings "
			       "(window %llu + batch positions, at most the context)\n",
			       footprint_human(f.kv_ring_bytes_per_pos, h1, 32),
			       (unsigned long long)f.kv_ring_window);
		if (plan && plan->n_ctx > 0)
			printf("  KV cache of one sequence of %d tokens: %s\n", plan->n_ctx,
			       footprint_human(footprint_kv_bytes(&f, plan->n_ctx, plan->n_batch),
					       h1, 32));
	} else
		printf("  KV cache: layout of architecture '%s' unknown\n", f.arch);
	if (plan && plan->node_memory) {
		rc = footprint_report_nodes(&f, mem, n_worker, plan);
		if (!rc && plan->kv_shards > 0)
			rc = footprint_report_kv_hosts(&f, n_worker, plan);
		return rc;
	}
	if (n_worker <= 0)
		return 0;
	wb = calloc((size_t)n_worker, sizeof(*wb));
	ample = calloc((size_t)n_worker, sizeof(*ample));
	if (!wb || !ample) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int i = 0; i < n_worker; i++)
		ample[i] = mem ? mem[i] : f.expert_bytes;
	rc = footprint_place(&f, ample, n_worker, wb);
	if (rc)
		goto out;
	printf("  placement on %d worker(s)%s:\n", n_worker, mem ? "" : " (no memory limit given)");
	for (int i = 0; i < n_worker; i++) {
		printf("    worker %d: %14llu bytes (%s) of experts", i, (unsigned long long)wb[i],
		       footprint_human(wb[i], h1, 32));
		if (mem)
			printf(", %s left of %s", footprint_human(mem[i] - wb[i], h1, 32),
			       footprint_human(mem[i], h2, 32));
		printf("\n");
	}
out:
	free(wb);
	free(ample);
	return rc;
}
