/* split: per-node shard files of a model's routed experts (see split.h). */
#define _GNU_SOURCE
#include "split.h"
#include "../model/footprint.h"
#include "../../common/err.h"
#include "../../common/gguf.h"
#include "../../common/gguf_write.h"
#include "../../common/log.h"
#include "../../common/shardfile.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int split_path(const char *model, const char *dir, int k, int n, char *buf, size_t cap)
{
	const char *base = strrchr(model, '/');
	base = base ? base + 1 : model;
	size_t len = strlen(base);
	if (len > 5 && !strcmp(base + len - 5, ".gguf"))
		len -= 5;
	/* a gguf-split set's first shard: NAME-00001-of-0000K */
	char suffix[16];
	unsigned a, b;
	int used = 0;
	if (len > 15) {
		memcpy(suffix, base + len - 15, 15);
		suffix[15] = 0;
		if (sscanf(suffix, "-%5u-of-%5u%n", &a, &b, &used) == 2 && used == 15)
			len -= 15;
	}
	int w = snprintf(buf, cap, "%s/%.*s-w%d-of-%d.gguf", dir, (int)len, base, k, n);
	return w < 0 || (size_t)w >= cap ? ERR_RANGE : 0;
}

/* Gives the mapped pages of a tensor that was copied back to the kernel, so
 * the resident size stays that of one tensor whatever the model's. */
static void split_drop_pages(const gguf_tensor *x)
{
	long psz = sysconf(_SC_PAGE_SIZE);
	if (psz <= 0)
		return;
	uintptr_t lo = (uintptr_t)x->data & ~((uintptr_t)psz - 1);
	uintptr_t hi = ((uintptr_t)x->data + x->n_bytes) & ~((uintptr_t)psz - 1);
	if (hi > lo)
		madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* Creates dir and its missing parents. */
static int split_mkdir(const char *dir)
{
	char path[4096];
	size_t n = strlen(dir);
	if (n == 0 || n >= sizeof(path)) {
		log_error("%s: bad output directory", dir);
		return ERR_IO;
	}
	memcpy(path, dir, n + 1);
	for (size_t i = 1; i <= n; i++) {
		if (path[i] != '/' && path[i] != 0)
			continue;
		char c = path[i];
		path[i] = 0;
		if (mkdir(path, 0777) && errno != EEXIST) {
			log_error("%s: cannot create the directory: %s", path, strerror(errno));
			return ERR_IO;
		}
		path[i] = c;
	}
	return 0;
}

/* The model's routed experts as placement input: the layers with expert
 * tensors and the bytes of one of their experts (weights and biases). */
static int split_table(const gguf *g, int *n_layer, int *n_expert, uint8_t *layer_moe,
		       uint64_t *bytes)
{
	struct footprint f;
	int rc = footprint_measure(g, &f);
	if (rc)
		return rc;
	*n_layer = f.n_layer;
	*n_expert = f.n_expert;
	int n_moe = 0;
	for (int l = 0; l < f.n_layer; l++) {
		for (int t = 0; t < 6; t++) {
			char name[96];
			shardfile_tensor_name(l, t, name, sizeof(name));
			const gguf_tensor *x = gguf_find_tensor(g, name);
			if (!x)
				continue;
			uint32_t d = t < 3 ? 3 : 2;
			if (x->n_dims != d || x->ne[d - 1] != (uint64_t)f.n_expert) {
				log_error("%s: tensor %s does not hold %d experts", gguf_path(g),
					  name, f.n_expert);
				return ERR_FORMAT;
			}
			layer_moe[l] = 1;
			bytes[l] += x->n_bytes / (uint64_t)f.n_expert;
		}
		n_moe += layer_moe[l];
	}
	if (f.n_expert < 1 || n_moe == 0) {
		log_error("%s: no routed-expert tensors (blk.L.ffn_{gate,up,down}_exps.weight)",
			  gguf_path(g));
		return ERR_FORMAT;
	}
	return 0;
}

/* Writes worker k's file: ids[0..n_ids) are its experts (layer * X + e). */
static int split_write(const gguf *g, const char *path, int k, int n, int n_layer, int X,
		       const uint32_t *ids, uint32_t n_ids, const char *model_id)
{
	gguf_writer *w = NULL;
	uint32_t per_layer[MOE_MAX_LAYERS] = {0};
	for (uint32_t i = 0; i < n_ids; i++)
		per_layer[ids[i] / (uint32_t)X]++;
	int rc = gguf_writer_new(&w);
	if (!rc)
		rc = gguf_writer_copy_all_kv(w, g);
	if (!rc)
		rc = gguf_writer_set_arr(w, SHARDFILE_KEY_HELD, GGUF_TYPE_U32, ids, n_ids);
	if (!rc)
		rc = gguf_writer_set_u32(w, SHARDFILE_KEY_N_LAYER, (uint32_t)n_layer);
	if (!rc)
		rc = gguf_writer_set_u32(w, SHARDFILE_KEY_N_EXPERT, (uint32_t)X);
	if (!rc)
		rc = gguf_writer_set_u32(w, SHARDFILE_KEY_INDEX, (uint32_t)k);
	if (!rc)
		rc = gguf_writer_set_u32(w, SHARDFILE_KEY_COUNT, (uint32_t)n);
	if (!rc)
		rc = gguf_writer_set_str(w, SHARDFILE_KEY_MODEL, model_id);
	/* tensors: per layer holding experts, its expert tensors cut to them */
	for (int l = 0; l < n_layer && !rc; l++) {
		for (int t = 0; t < 6 && per_layer[l] && !rc; t++) {
			char name[96];
			shardfile_tensor_name(l, t, name, sizeof(name));
			const gguf_tensor *x = gguf_find_tensor(g, name);
			if (!x)
				continue;
			uint64_t ne[3] = {x->ne[0], x->ne[1], x->ne[2]};
			ne[x->n_dims - 1] = per_layer[l];
			rc = gguf_writer_add_tensor(w, name, x->type, x->n_dims, ne);
		}
	}
	if (!rc)
		rc = gguf_writer_open(w, path);
	uint64_t written = 0;
	uint32_t at = 0; /* first id of the layer being written */
	for (int l = 0; l < n_layer && !rc; l++) {
		for (int t = 0; t < 6 && per_layer[l] && !rc; t++) {
			char name[96];
			shardfile_tensor_name(l, t, name, sizeof(name));
			const gguf_tensor *x = gguf_find_tensor(g, name);
			if (!x)
				continue;
			uint64_t per = x->n_bytes / (uint64_t)X;
			for (uint32_t i = at; i < at + per_layer[l] && !rc; i++) {
				uint64_t e = ids[i] % (uint32_t)X;
				rc = gguf_writer_write(w, (const uint8_t *)x->data + per * e,
						       (size_t)per);
				written += per;
			}
			split_drop_pages(x);
		}
		at += per_layer[l];
	}
	if (!rc)
		rc = gguf_writer_commit(w);
	if (!rc)
		log_info("%s: %u experts, %.1f MiB of expert weights", path, n_ids,
			 (double)written / 1048576.0);
	gguf_writer_destroy(&w);
	return rc;
}

int split_experts(const char *model, const struct placement_worker *workers, int n_worker,
		  int replicas, const char *dir)
{
	gguf *g = NULL;
	placement p = {0};
	uint32_t *ids = NULL;
	uint8_t layer_moe[MOE_MAX_LAYERS] = {0};
	uint64_t bytes[MOE_MAX_LAYERS] = {0};
	int n_layer = 0, X = 0;
	char path[4096], model_id[SHARDFILE_ID_LEN];
	int rc = gguf_open(model, &g);
	if (rc)
		goto out;
	if (gguf_find_kv(g, SHARDFILE_KEY_HELD) >= 0) {
		log_error("%s: is already a per-node shard file; split the full model", model);
		rc = ERR_FORMAT;
		goto out;
	}
	rc = split_table(g, &n_layer, &X, layer_moe, bytes);
	if (rc)
		goto out;
	int n_moe = 0;
	for (int l = 0; l < n_layer; l++)
		n_moe += layer_moe[l];
	if (n_worker < 1 || n_worker > FOOTPRINT_MAX_WORKERS || n_worker > n_moe * X) {
		log_error("%s: %d workers: expected 1 to %d (the model has %d routed experts)",
			  model, n_worker,
			  n_moe * X < FOOTPRINT_MAX_WORKERS ? n_moe * X : FOOTPRINT_MAX_WORKERS,
			  n_moe * X);
		rc = ERR_CONFIG;
		goto out;
	}
	struct placement_model pm = {n_layer, X, layer_moe, bytes, NULL};
	rc = placement_build(&pm, workers, n_worker, replicas, &p);
	if (rc)
		goto out;
	rc = split_mkdir(dir);
	if (rc)
		goto out;
	ids = malloc((size_t)n_layer * (size_t)X * sizeof(*ids));
	if (!ids) {
		rc = ERR_NOMEM;
		goto out;
	}
	shardfile_model_id(g, model_id);
	for (int k = 0; k < n_worker && !rc; k++) {
		uint32_t n_ids = 0;
		for (int l = 0; l < n_layer; l++)
			for (int e = 0; e < X && layer_moe[l]; e++)
				if (placement_holds(&p, k, l, e))
					ids[n_ids++] = (uint32_t)(l * X + e);
		rc = split_path(model, dir, k + 1, n_worker, path, sizeof(path));
		if (rc) {
			log_error("%s: output path too long", dir);
			break;
		}
		rc = split_write(g, path, k + 1, n_worker, n_layer, X, ids, n_ids, model_id);
	}
out:
	free(ids);
	placement_free(&p);
	gguf_destroy(&g);
	return rc;
}
