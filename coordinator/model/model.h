/* model: a GGUF MoE model ready to run batches of tokens from many sequences.
 *
 * model_open() maps the file, recognises the architecture, validates every
 * tensor it will use, allocates the KV cache (n_seq sequences x n_ctx
 * positions) and all activation buffers (for batches of up to n_batch tokens;
 * larger batches are split), so model_forward() allocates nothing.
 *
 * A batch is a list of tokens, each with its sequence slot and position.  A
 * token at position p of sequence s attends to the cached entries 0..p of s
 * (earlier calls and earlier tokens of the same batch); positions of one
 * sequence must be consecutive across calls.  model_forward() writes one row of
 * n_vocab logits per token whose `logits` flag is set (all when the flag array
 * is NULL), in batch order. */
#ifndef MOEFLEET_MODEL_H
#define MOEFLEET_MODEL_H

#include <stdint.h>

#include "../../common/gguf.h"
#include "../../common/moe.h"
#include "../../common/pool.h"
#include "experts.h"
#include "route.h"

struct model_params {
	int n_threads;		 /* <= 0: all cores */
	int n_ctx;		 /* positions per sequence */
	int n_seq;		 /* sequence slots */
	int n_batch;		 /* tokens per internal forward step */
	struct route_opts route; /* expert selection options (route.h); default: the model's */
	int kv_f32;    /* 1: KV caches hold F32 (default 0: F16, as llama.cpp); deepseek4 only */
	int kv_shards; /* attention's sharded numerics over this many chains (0: off; attn.h) */
	int kv_page;   /* and pages of this many positions */
};

/* What callers may know about a loaded model. */
struct model_info {
	char arch[64];
	int n_vocab;
	int n_embd;
	int n_layer;
	int n_ctx_train;
	int32_t bos_id; /* -1 if none */
	int32_t eos_id; /* -1 if none */
	struct moe_spec moe;
};

typedef struct model_batch {
	int n_tokens;
	const int32_t *token;  /* [n_tokens] */
	const int32_t *pos;    /* [n_tokens] */
	const int32_t *seq;    /* [n_tokens] sequence slot in [0, n_seq) */
	const uint8_t *logits; /* [n_tokens] or NULL for all */
} model_batch;

typedef struct model model;

void model_params_default(struct model_params *p);
int model_open(const char *path, const struct model_params *params, model **out);
void model_destroy(model **m);

const struct model_info *model_get_info(const model *m);
const gguf *model_get_gguf(const model *m);
pool *model_get_pool(model *m);

/* Replaces the in-process expert backend (the model takes ownership). */
void model_set_experts(model *m, expert_backend *b);
/* The chains of the sharded attention (params kv_shards) go to n_hosts KV
 * hosts behind ops (attn_cache_set_remote); ERR_CONFIG without kv_shards.  An
 * architecture that keeps its KV here (deepseek4) says so and goes on. */
struct attn_remote_ops;
int model_set_kv_hosts(model *m, const struct attn_remote_ops *ops, void *self, int n_hosts);
/* The KV hosts' geometry and budgets (attn_cache_kv_room); n_hosts 0 when the
 * chains are computed here or the architecture keeps its KV here. */
struct attn_kv_room;
void model_kv_room(model *m, struct attn_kv_room *r);
/* Detaches the current backend and returns it (the caller owns it and must
 * attach another with model_set_experts before the next forward). */
expert_backend *model_take_experts(model *m);

/* Calls fn(ctx, ub) before each micro-batch ub is computed (e.g. so a
 * routing trace can record token positions); NULL removes it. */
void model_set_batch_observer(model *m, void (*fn)(void *ctx, const model_batch *ub), void *ctx);
int model_forward(model *m, const model_batch *b, float *logits);
/* Routed rows and chosen experts per layer since model_open. */
const struct route_counts *model_get_route_counts(const model *m);
/* Forgets everything cached for a sequence slot. */
void model_reset_seq(model *m, int seq);
/* Benchmark only: sequence seq as after a prompt of n_pos tokens whose keys
 * and values are pseudo-random (attn_cache_fill_random, from seed): the next
 * forward continues at position n_pos, and attention costs what it would
 * after a real prompt (the results mean nothing).  ERR_CONFIG (logged) for an
 * architecture that keeps other per-position state (deepseek4); ERR_RANGE
 * for a bad seq or n_pos. */
int model_fill_random(model *m, int seq, int n_pos, uint64_t seed);

#endif
