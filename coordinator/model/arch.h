/* arch: the contract between model.c and one architecture's forward pass.
 *
 * Each coordinator/arch_*.c file exports one `const struct arch_vtable` and
 * nothing else.  load() reads hyper-parameters and tensors from env->g,
 * validating every shape, fills *info (including the moe_spec its routed
 * experts need), allocates its KV cache and scratch for env->n_batch tokens
 * and env->n_seq x env->n_ctx positions, and returns its private state.
 * forward() runs a micro-batch of at most n_batch tokens (model.c has checked
 * token ids, sequence slots and positions) and writes the requested logits.
 * Routed experts are computed only through env->experts, which model.c sets
 * after load() and may replace between calls. */
#ifndef MOEFLEET_ARCH_H
#define MOEFLEET_ARCH_H

#include <stddef.h>

#include "attn.h"
#include "model.h"

struct arch_env {
	const gguf *g;
	pool *pool;
	expert_backend *experts;
	int n_ctx;
	int n_seq;
	int n_batch;
	const struct route_opts *route;	   /* selection options for route_select() */
	struct route_counts *route_counts; /* the forward pass adds each layer's rows/slots */
	int kv_f32;			   /* KV caches in F32 instead of F16 (where supported) */
	int kv_shards, kv_page;		   /* attn_cache_set_shards() of the KV caches */
};

struct arch_vtable {
	const char *name; /* general.architecture */
	int (*load)(const struct arch_env *env, struct model_info *info, void **state);
	void (*destroy)(void **state);
	int (*forward)(void *state, const model_batch *b, float *logits);
	void (*reset_seq)(void *state, int seq);
	/* the attention KV cache whose chains KV hosts may compute; NULL or
	 * absent: none */
	attn_cache *(*kv_cache)(void *state);
	/* instead of kv_cache: the architecture gives its own work to KV hosts
	 * (model_set_kv_hosts' contract); NULL or absent: see kv_cache */
	int (*kv_hosts)(void *state, const struct attn_remote_ops *ops, void *self, int n_hosts);
};

/* Hyper-parameter helpers: read "<arch>.<key>" with the exact GGUF type.
 * The _req forms log "FILE: missing key K" and return ERR_FORMAT when absent;
 * the _opt forms leave *out unchanged when absent. */
int arch_u32_req(const struct arch_env *env, const char *arch, const char *key, uint32_t *out);
int arch_u32_opt(const struct arch_env *env, const char *arch, const char *key, uint32_t *out);
int arch_f32_req(const struct arch_env *env, const char *arch, const char *key, float *out);
int arch_f32_opt(const struct arch_env *env, const char *arch, const char *key, float *out);
int arch_bool_opt(const struct arch_env *env, const char *arch, const char *key, int *out);
int arch_str_opt(const struct arch_env *env, const char *arch, const char *key, char *buf,
		 size_t cap);

/* is_swa[n_layer]: which layers use the sliding window, from
 * "<arch>.attention.sliding_window_pattern" as a u32 period p (layer il slides
 * iff il % p < p - 1; p = 0: all), or as an array with one bool/u32/i32 per
 * layer; absent: period 2 (the even layers).  Only env->g is used. */
int arch_swa_layers(const struct arch_env *env, const char *arch, int n_layer, uint8_t *is_swa);

/* "<arch>.attention.layer_norm_rms_epsilon": required, finite and > 0. */
int arch_rms_eps(const struct arch_env *env, const char *arch, float *out);
/* The vocabulary size as token_embd.weight's row count (n_embd x n_vocab);
 * *n_vocab != 0 on entry is a value from metadata that must agree. */
int arch_vocab(const struct arch_env *env, int *n_vocab);

/* Tensor lookup by printf-style name with a shape check (see gguf_expect_tensor).
 * ne0..ne2: expected extents; pass 0 for dimensions the tensor does not have.
 * arch_tensor_opt returns 0 with *out = NULL when the tensor is absent. */
int arch_tensor(const struct arch_env *env, const gguf_tensor **out, int64_t ne0, int64_t ne1,
		int64_t ne2, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
int arch_tensor_opt(const struct arch_env *env, const gguf_tensor **out, int64_t ne0, int64_t ne1,
		    int64_t ne2, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* The same for an I32 table (e.g. token id -> expert ids); arch_tensor and
 * arch_tensor_opt refuse I32 tensors. */
int arch_tensor_ids(const struct arch_env *env, const gguf_tensor **out, int64_t ne0, int64_t ne1,
		    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

extern const struct arch_vtable arch_deepseek2;
extern const struct arch_vtable arch_qwen3moe;
extern const struct arch_vtable arch_gptoss;
extern const struct arch_vtable arch_deepseek4;

#endif
