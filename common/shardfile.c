/* shardfile: per-node shard files (see shardfile.h). */
#include "shardfile.h"
#include "err.h"
#include "log.h"
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SHARDFILE_MAX_EXPERTS 65536
#define SHARDFILE_ID_BYTES    4096 /* of each router tensor hashed */

void shardfile_tensor_name(int layer, int t, char *buf, size_t cap)
{
	static const char *names[3] = {"gate", "up", "down"};
	snprintf(buf, cap, "blk.%d.ffn_%s_exps.%s", layer, names[t % 3], t < 3 ? "weight" : "bias");
}

static int shardfile_bad(const gguf *g, const char *what)
{
	log_error("%s: not a valid shard file: %s", gguf_path(g), what);
	return ERR_FORMAT;
}

void shardfile_free(struct shardfile *s)
{
	free(s->slot);
	free(s->layer_held);
	memset(s, 0, sizeof(*s));
}

int shardfile_slot(const struct shardfile *s, int layer, int expert)
{
	if (!s->slot || layer < 0 || layer >= s->n_layer || expert < 0 || expert >= s->n_expert)
		return -1;
	return s->slot[(size_t)layer * (size_t)s->n_expert + (size_t)expert];
}

/* Every expert tensor's last extent is its layer's held count. */
static int shardfile_check_tensors(const gguf *g, const struct shardfile *s)
{
	for (int l = 0; l < s->n_layer; l++) {
		for (int t = 0; t < 6; t++) {
			char name[96];
			shardfile_tensor_name(l, t, name, sizeof(name));
			const gguf_tensor *x = gguf_find_tensor(g, name);
			if (!x) {
				if (t < 3 && s->layer_held[l]) {
					log_error("%s: not a valid shard file: it holds %u experts "
						  "of layer %d but has no tensor %s",
						  gguf_path(g), s->layer_held[l], l, name);
					return ERR_FORMAT;
				}
				continue;
			}
			uint32_t dims = t < 3 ? 3 : 2;
			if (x->n_dims > dims || x->ne[dims - 1] != s->layer_held[l]) {
				log_error(
				    "%s: not a valid shard file: tensor %s holds %llu experts, "
				    "its metadata says %u",
				    gguf_path(g), name, (unsigned long long)x->ne[dims - 1],
				    s->layer_held[l]);
				return ERR_FORMAT;
			}
		}
	}
	return 0;
}

int shardfile_read(const gguf *g, struct shardfile *out)
{
	memset(out, 0, sizeof(*out));
	if (gguf_find_kv(g, SHARDFILE_KEY_HELD) < 0)
		return ERR_RANGE;
	uint32_t n_layer, n_expert;
	int rc;
	if (gguf_get_u32(g, SHARDFILE_KEY_N_LAYER, &n_layer) ||
	    gguf_get_u32(g, SHARDFILE_KEY_N_EXPERT, &n_expert) ||
	    gguf_get_u32(g, SHARDFILE_KEY_INDEX, &out->index) ||
	    gguf_get_u32(g, SHARDFILE_KEY_COUNT, &out->count) ||
	    gguf_get_cstr(g, SHARDFILE_KEY_MODEL, out->model, sizeof(out->model)))
		return shardfile_bad(g, "a moefleet.shard.* key is missing or mistyped");
	if (n_layer < 1 || n_layer > MOE_MAX_LAYERS || n_expert < 1 ||
	    n_expert > SHARDFILE_MAX_EXPERTS)
		return shardfile_bad(g, "layer or expert count out of range");
	if (out->count < 1 || out->index < 1 || out->index > out->count)
		return shardfile_bad(g, "shard index out of range");
	enum gguf_type et;
	uint64_t n;
	const void *data;
	rc = gguf_get_arr(g, SHARDFILE_KEY_HELD, &et, &n, &data);
	if (rc || et != GGUF_TYPE_U32)
		return shardfile_bad(g, SHARDFILE_KEY_HELD " is not a u32 array");
	size_t cells = (size_t)n_layer * (size_t)n_expert;
	if (n > cells)
		return shardfile_bad(g, "more experts held than the model has");
	out->n_layer = (int)n_layer;
	out->n_expert = (int)n_expert;
	out->n_held = (uint32_t)n;
	out->slot = malloc(cells * sizeof(*out->slot));
	out->layer_held = calloc(n_layer, sizeof(*out->layer_held));
	if (!out->slot || !out->layer_held) {
		shardfile_free(out);
		return ERR_NOMEM;
	}
	for (size_t i = 0; i < cells; i++)
		out->slot[i] = -1;
	uint32_t prev = 0;
	for (uint64_t i = 0; i < n; i++) {
		uint32_t id;
		memcpy(&id, (const uint8_t *)data + i * 4, 4);
		if (id >= cells || (i > 0 && id <= prev)) {
			shardfile_free(out);
			return shardfile_bad(g, SHARDFILE_KEY_HELD
					     " is not strictly ascending within the model");
		}
		prev = id;
		out->slot[id] = (int32_t)out->layer_held[id / n_expert]++;
	}
	rc = shardfile_check_tensors(g, out);
	if (rc)
		shardfile_free(out);
	return rc;
}

static uint64_t shardfile_fnv(uint64_t h, const void *p, size_t n)
{
	const uint8_t *b = p;
	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 0x100000001b3ull;
	return h;
}

void shardfile_model_id(const gguf *g, char *id)
{
	/* per tensor, summed: the order of the tensor table does not matter */
	uint64_t sum = 0;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		uint64_t h = shardfile_fnv(0xcbf29ce484222325ull, t->name, strlen(t->name) + 1);
		h = shardfile_fnv(h, &t->type, sizeof(t->type));
		h = shardfile_fnv(h, t->ne, sizeof(t->ne));
		if (strstr(t->name, "ffn_gate_inp"))
			h = shardfile_fnv(h, t->data,
					  t->n_bytes < SHARDFILE_ID_BYTES ? (size_t)t->n_bytes
									  : SHARDFILE_ID_BYTES);
		sum += h;
	}
	snprintf(id, SHARDFILE_ID_LEN, "moefleet1:%016llx", (unsigned long long)sum);
}
