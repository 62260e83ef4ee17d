/* arch_gptoss: the gpt-oss forward pass, as llama.cpp computes it
 * (src/models/openai-moe.cpp, llama_model_openai_moe).
 *
 * Per layer L, for a batch of rows x (the residual stream, n_embd wide):
 *   h    = rmsnorm(x) * attn_norm
 *   q    = Wq h + bq, k = Wk h + bk, v = Wv h + bv   (query width n_head * head_dim
 *                                                      differs from n_embd)
 *   q, k = RoPE NEOX with YaRN over the whole head (head_dim = key_length)
 *   a    = attention(q, cache k/v) with one sink logit per head, scale
 *          1/sqrt(head_dim), sliding window on the SWA layers (by default the even
 *          ones: key j visible from query i iff i - j < sliding_window)
 *   x    = (Wo a + bo) + x
 *   h    = rmsnorm(x) * post_attention_norm
 *   r    = Wr h + br                         router logits, n_expert per row
 *   top-k experts on the raw logits, weights = softmax over the k chosen logits
 *   x    = (sum over slots, in slot order, of w * (down(act(gate h + bg, up h + bu)) + bd))
 *          + x      with act = MOE_ACT_SWIGLU_OAI (alpha 1.702, limit 7)
 * then logits = Wout (rmsnorm(x) * output_norm) for the rows that want them.
 *
 * Routed experts run only through env->experts; everything else is here.  All
 * buffers are allocated at load for env->n_batch rows. */
#include "arch.h"
#include "attn.h"
#include "ops.h"
#include "route.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GPTOSS_ARCH	   "gpt-oss"
#define GPTOSS_MAX_EXPERTS 4096
#define GPTOSS_MAX_DIM	   (1 << 20) /* sanity bound on any width read from the file */

/* llama.cpp's fixed values for this architecture (build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE;
 * llama_hparams defaults for YaRN, which gpt-oss does not read from the file). */
#define GPTOSS_ACT_ALPHA      1.702f
#define GPTOSS_ACT_LIMIT      7.0f
#define GPTOSS_YARN_BETA_FAST 32.0f
#define GPTOSS_YARN_BETA_SLOW 1.0f

/* ------------------------------------------------------------------ state */

struct gptoss_layer {
	const float *attn_norm;	   /* [n_embd] */
	const gguf_tensor *wq;	   /* n_embd x q_width */
	const gguf_tensor *wk;	   /* n_embd x kv_width */
	const gguf_tensor *wv;	   /* n_embd x kv_width */
	const float *bq;	   /* [q_width] or NULL */
	const float *bk;	   /* [kv_width] or NULL */
	const float *bv;	   /* [kv_width] or NULL */
	const gguf_tensor *wo;	   /* q_width x n_embd */
	const float *bo;	   /* [n_embd] */
	const float *sinks;	   /* [n_head] */
	const float *post_norm;	   /* [n_embd] */
	const gguf_tensor *router; /* n_embd x n_expert */
	const float *router_b;	   /* [n_expert] */
	struct ops_rope rope;	   /* this layer's RoPE (SWA layers have their own base) */
	struct attn_params attn;   /* heads, scale 1/sqrt(head_dim), window, sinks */
};

struct gptoss_hparams {
	int n_vocab;
	int n_embd;
	int n_layer;
	int n_head;
	int n_head_kv;
	int head_dim; /* key_length = value_length = rope dimensions */
	int n_expert;
	int n_expert_used;
	int n_ff_exp;
	int n_swa;
	int n_ctx_train;
	float rms_eps;
	uint8_t is_swa[MOE_MAX_LAYERS];
};

struct gptoss {
	const struct arch_env *env; /* model.c's; env->experts may change between calls */
	struct gptoss_hparams hp;
	int q_width;  /* n_head * head_dim */
	int kv_width; /* n_head_kv * head_dim */

	const gguf_tensor *tok_embd; /* n_embd x n_vocab */
	const float *output_norm;    /* [n_embd] */
	const gguf_tensor *output;   /* n_embd x n_vocab */
	struct gptoss_layer *layers; /* [n_layer] */

	attn_cache *cache;

	/* scratch for n_batch rows */
	float *x;		/* [n_batch][n_embd] residual stream */
	float *h;		/* [n_batch][n_embd] normed input of a block */
	float *q;		/* [n_batch][q_width] */
	float *k;		/* [n_batch][kv_width] */
	float *v;		/* [n_batch][kv_width] */
	float *attn;		/* [n_batch][q_width] attention output (heads concatenated) */
	float *o;		/* [n_batch][n_embd] projected attention / summed expert output */
	float *router;		/* [n_batch][n_expert] router logits */
	int32_t *ids;		/* [n_batch][slots] chosen experts, best first */
	float *weights;		/* [n_batch][slots] their routing weights */
	float *eout;		/* [n_batch][slots][n_embd] weighted expert outputs */
	void *mm_scratch;	/* ops_matmul activation conversion */
	struct route_rule rule; /* the router (route.h) */
	int slots;		/* expert slots per row: route_slots(), n_expert_used by default */
	void *route_scratch;	/* route_scratch_bytes() */
};

/* ----------------------------------------------------------- hyper-parameters */

/* The integer hyper-parameters every gpt-oss file must have, with sane bounds. */
struct gptoss_dim_key {
	const char *key;
	uint32_t lo, hi;
	size_t offset; /* of the int in struct gptoss_hparams */
};

static const struct gptoss_dim_key gptoss_dim_keys[] = {
    {"embedding_length", 1, GPTOSS_MAX_DIM, offsetof(struct gptoss_hparams, n_embd)},
    {"block_count", 1, MOE_MAX_LAYERS, offsetof(struct gptoss_hparams, n_layer)},
    {"context_length", 1, 1u << 30, offsetof(struct gptoss_hparams, n_ctx_train)},
    {"attention.head_count", 1, 4096, offsetof(struct gptoss_hparams, n_head)},
    {"attention.head_count_kv", 1, 4096, offsetof(struct gptoss_hparams, n_head_kv)},
    {"expert_count", 1, GPTOSS_MAX_EXPERTS, offsetof(struct gptoss_hparams, n_expert)},
    {"expert_used_count", 1, GPTOSS_MAX_EXPERTS, offsetof(struct gptoss_hparams, n_expert_used)},
    {"expert_feed_forward_length", 1, GPTOSS_MAX_DIM, offsetof(struct gptoss_hparams, n_ff_exp)},
    {"attention.sliding_window", 1, 1u << 30, offsetof(struct gptoss_hparams, n_swa)},
};

static int gptoss_load_dims(const struct arch_env *env, struct gptoss_hparams *hp)
{
	for (size_t i = 0; i < sizeof(gptoss_dim_keys) / sizeof(gptoss_dim_keys[0]); i++) {
		const struct gptoss_dim_key *d = &gptoss_dim_keys[i];
		uint32_t v;
		int rc = arch_u32_req(env, GPTOSS_ARCH, d->key, &v);
		if (rc)
			return rc;
		if (v < d->lo || v > d->hi) {
			log_error("%s: key %s.%s = %u is out of range [%u, %u]", gguf_path(env->g),
				  GPTOSS_ARCH, d->key, v, d->lo, d->hi);
			return ERR_FORMAT;
		}
		int iv = (int)v;
		memcpy((char *)hp + d->offset, &iv, sizeof(iv));
	}
	return 0;
}

static int gptoss_load_hparams(const struct arch_env *env, struct gptoss_hparams *hp)
{
	const char *path = gguf_path(env->g);
	int key_length, value_length;
	int rc;

	rc = gptoss_load_dims(env, hp);
	if (!rc)
		rc = arch_rms_eps(env, GPTOSS_ARCH, &hp->rms_eps);
	if (rc)
		return rc;
	if (hp->n_head % hp->n_head_kv != 0) {
		log_error("%s: attention.head_count %d is not a multiple of head_count_kv %d", path,
			  hp->n_head, hp->n_head_kv);
		return ERR_FORMAT;
	}
	if (hp->n_expert_used > hp->n_expert) {
		log_error("%s: expert_used_count %d exceeds expert_count %d", path,
			  hp->n_expert_used, hp->n_expert);
		return ERR_FORMAT;
	}

	/* head size: key_length, default n_embd / n_head; RoPE covers the whole head */
	key_length = hp->n_embd / hp->n_head;
	uint32_t u = (uint32_t)key_length;
	rc = arch_u32_opt(env, GPTOSS_ARCH, "attention.key_length", &u);
	if (rc)
		return rc;
	key_length = (int)u;
	value_length = key_length;
	u = (uint32_t)value_length;
	rc = arch_u32_opt(env, GPTOSS_ARCH, "attention.value_length", &u);
	if (rc)
		return rc;
	value_length = (int)u;
	uint32_t n_rot = (uint32_t)key_length;
	rc = arch_u32_opt(env, GPTOSS_ARCH, "rope.dimension_count", &n_rot);
	if (rc)
		return rc;
	if (key_length < 2 || key_length > 4096 || key_length % 2 != 0 ||
	    value_length != key_length || n_rot != (uint32_t)key_length) {
		log_error("%s: unsupported head sizes: key_length %d, value_length %d, rope "
			  "dimensions %u (need equal, even, 2..4096)",
			  path, key_length, value_length, n_rot);
		return ERR_FORMAT;
	}
	hp->head_dim = key_length;
	/* per-layer SWA head sizes are not supported: they must agree if present */
	static const char *const swa_keys[] = {
	    "attention.key_length_swa", "attention.value_length_swa", "rope.dimension_count_swa"};
	for (size_t i = 0; i < sizeof(swa_keys) / sizeof(swa_keys[0]); i++) {
		u = (uint32_t)key_length;
		rc = arch_u32_opt(env, GPTOSS_ARCH, swa_keys[i], &u);
		if (rc)
			return rc;
		if (u != (uint32_t)key_length) {
			log_error("%s: key %s.%s = %u differs from key_length %d (unsupported)",
				  path, GPTOSS_ARCH, swa_keys[i], u, key_length);
			return ERR_FORMAT;
		}
	}

	uint32_t n_vocab_key = 0;
	rc = arch_u32_opt(env, GPTOSS_ARCH, "vocab_size", &n_vocab_key);
	if (rc)
		return rc;
	hp->n_vocab = (int)n_vocab_key; /* 0: taken from token_embd */
	return arch_swa_layers(env, GPTOSS_ARCH, hp->n_layer, hp->is_swa);
}

/* RoPE as llama.cpp sets it up (llama_model::load_hparams, llama_context's cparams
 * and llama_model::get_rope_freq_base/scale):
 *   scaling type: "none" | "linear" (default) | "yarn"
 *   freq_scale  = 1 / rope.scaling.factor (1 if absent or 0); 1 with type none,
 *                 except on SWA layers, which keep the file's value
 *   ext_factor  = 1 with yarn, else 0
 *   attn_factor = with yarn: mscale(factor) / (1 + 0.1 ln factor) (ggml multiplies
 *                 the latter back in), times rope.scaling.attn_factor
 *   beta_fast/slow = 32 / 1 (not read from the file for gpt-oss)
 *   n_ctx_orig  = rope.scaling.original_context_length, if absent or 0 context_length
 *   SWA layers use rope.freq_base_swa when present. */
static int gptoss_load_rope(const struct arch_env *env, const struct gptoss_hparams *hp,
			    struct gptoss_layer *layers)
{
	const char *path = gguf_path(env->g);
	char type[32] = "linear";
	float freq_base = 10000.0f, factor = 0.0f, rope_attn_factor = 1.0f;
	uint32_t n_ctx_orig = (uint32_t)hp->n_ctx_train;
	int rc;

	rc = arch_str_opt(env, GPTOSS_ARCH, "rope.scaling.type", type, sizeof(type));
	if (!rc)
		rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.freq_base", &freq_base);
	if (!rc)
		rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.scaling.factor", &factor);
	if (!rc)
		rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.scaling.attn_factor", &rope_attn_factor);
	if (!rc)
		rc = arch_u32_opt(env, GPTOSS_ARCH, "rope.scaling.original_context_length",
				  &n_ctx_orig);
	if (rc)
		return rc;
	if (n_ctx_orig == 0) /* as llama.cpp: 0 means the training context */
		n_ctx_orig = (uint32_t)hp->n_ctx_train;
	if (factor == 0.0f) { /* older files: rope.scale_linear */
		rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.scale_linear", &factor);
		if (rc)
			return rc;
	}
	float freq_base_swa = freq_base;
	rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.freq_base_swa", &freq_base_swa);
	if (rc)
		return rc;

	int yarn = strcmp(type, "yarn") == 0;
	int none = strcmp(type, "none") == 0;
	if (!yarn && !none && strcmp(type, "linear") != 0) {
		log_error("%s: key %s.rope.scaling.type = '%s' is not supported "
			  "(none, linear, yarn)",
			  path, GPTOSS_ARCH, type);
		return ERR_FORMAT;
	}
	if (!(freq_base > 0.0f) || !isfinite(freq_base) || !(freq_base_swa > 0.0f) ||
	    !isfinite(freq_base_swa) || !(factor >= 0.0f) || !isfinite(factor) ||
	    !(rope_attn_factor > 0.0f) || !isfinite(rope_attn_factor) || n_ctx_orig > (1u << 30)) {
		log_error("%s: invalid RoPE parameters: freq_base %g, freq_base_swa %g, scaling "
			  "factor %g, attn_factor %g, original context %u",
			  path, (double)freq_base, (double)freq_base_swa, (double)factor,
			  (double)rope_attn_factor, n_ctx_orig);
		return ERR_FORMAT;
	}
	const float freq_scale_train = factor == 0.0f ? 1.0f : 1.0f / factor;
	const float freq_scale = none ? 1.0f : freq_scale_train;
	const float ext_factor = yarn ? 1.0f : 0.0f;
	float attn_factor = 1.0f;
	if (ext_factor != 0.0f) {
		const float f = 1.0f / freq_scale;
		attn_factor = f <= 1.0f ? 1.0f : 0.1f * logf(f) + 1.0f;
		attn_factor *= 1.0f / (1.0f + 0.1f * logf(f));
	}
	attn_factor *= rope_attn_factor;

	float beta_fast = GPTOSS_YARN_BETA_FAST, beta_slow = GPTOSS_YARN_BETA_SLOW;
	rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.scaling.yarn_beta_fast", &beta_fast);
	if (!rc)
		rc = arch_f32_opt(env, GPTOSS_ARCH, "rope.scaling.yarn_beta_slow", &beta_slow);
	if (rc)
		return rc;
	if (beta_fast != GPTOSS_YARN_BETA_FAST || beta_slow != GPTOSS_YARN_BETA_SLOW)
		log_warn("%s: YaRN beta_fast/slow %g/%g in the file are ignored (llama.cpp uses "
			 "%g/%g for gpt-oss)",
			 path, (double)beta_fast, (double)beta_slow, (double)GPTOSS_YARN_BETA_FAST,
			 (double)GPTOSS_YARN_BETA_SLOW);

	for (int il = 0; il < hp->n_layer; il++) {
		struct ops_rope *r = &layers[il].rope;
		r->n_dims = hp->head_dim;
		r->neox = 1;
		r->freq_base = hp->is_swa[il] ? freq_base_swa : freq_base;
		r->freq_scale = hp->is_swa[il] ? freq_scale_train : freq_scale;
		r->ext_factor = ext_factor;
		r->attn_factor = attn_factor;
		r->beta_fast = GPTOSS_YARN_BETA_FAST;
		r->beta_slow = GPTOSS_YARN_BETA_SLOW;
		r->n_ctx_orig = (int)n_ctx_orig;
	}
	return 0;
}

/* ------------------------------------------------------------------ tensors */

/* An F32 vector or matrix (norm weights, biases, sinks) with the given extents,
 * named printf-style; optional ones may be absent (*out = NULL). */
static int gptoss_f32(const struct arch_env *env, const float **out, int64_t ne0, int64_t ne1,
		      int optional, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static int gptoss_f32(const struct arch_env *env, const float **out, int64_t ne0, int64_t ne1,
		      int optional, const char *fmt, ...)
{
	char name[128];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	*out = NULL;
	if (n < 0 || (size_t)n >= sizeof(name))
		return ERR_CONFIG;
	const gguf_tensor *t;
	int rc = optional ? arch_tensor_opt(env, &t, ne0, ne1, 0, "%s", name)
			  : arch_tensor(env, &t, ne0, ne1, 0, "%s", name);
	if (rc || !t)
		return rc;
	if (t->type != KERN_F32) {
		log_error("%s: tensor %s: type %s, expected F32", gguf_path(env->g), name,
			  kern_type_name(t->type));
		return ERR_FORMAT;
	}
	*out = t->data;
	return 0;
}

static int gptoss_load_layer(const struct arch_env *env, const struct gptoss_hparams *hp, int il,
			     int q_width, int kv_width, struct gptoss_layer *l)
{
	const int64_t E = hp->n_embd, X = hp->n_expert, F = hp->n_ff_exp;
	int rc;

	rc = gptoss_f32(env, &l->attn_norm, E, 0, 0, "blk.%d.attn_norm.weight", il);
	if (!rc)
		rc = arch_tensor(env, &l->wq, E, q_width, 0, "blk.%d.attn_q.weight", il);
	if (!rc)
		rc = arch_tensor(env, &l->wk, E, kv_width, 0, "blk.%d.attn_k.weight", il);
	if (!rc)
		rc = arch_tensor(env, &l->wv, E, kv_width, 0, "blk.%d.attn_v.weight", il);
	if (!rc)
		rc = gptoss_f32(env, &l->bq, q_width, 0, 1, "blk.%d.attn_q.bias", il);
	if (!rc)
		rc = gptoss_f32(env, &l->bk, kv_width, 0, 1, "blk.%d.attn_k.bias", il);
	if (!rc)
		rc = gptoss_f32(env, &l->bv, kv_width, 0, 1, "blk.%d.attn_v.bias", il);
	if (!rc)
		rc = arch_tensor(env, &l->wo, q_width, E, 0, "blk.%d.attn_output.weight", il);
	if (!rc)
		rc = gptoss_f32(env, &l->bo, E, 0, 0, "blk.%d.attn_output.bias", il);
	if (!rc)
		rc = gptoss_f32(env, &l->sinks, hp->n_head, 0, 0, "blk.%d.attn_sinks.weight", il);
	if (!rc)
		rc = gptoss_f32(env, &l->post_norm, E, 0, 0, "blk.%d.post_attention_norm.weight",
				il);
	if (!rc)
		rc = arch_tensor(env, &l->router, E, X, 0, "blk.%d.ffn_gate_inp.weight", il);
	if (!rc)
		rc = gptoss_f32(env, &l->router_b, X, 0, 0, "blk.%d.ffn_gate_inp.bias", il);
	if (rc)
		return rc;

	/* routed experts: computed elsewhere, but checked here so that a bad file fails
	 * at load whichever backend runs them */
	const gguf_tensor *t;
	const float *b;
	rc = arch_tensor(env, &t, E, F, X, "blk.%d.ffn_gate_exps.weight", il);
	if (!rc)
		rc = arch_tensor(env, &t, E, F, X, "blk.%d.ffn_up_exps.weight", il);
	if (!rc)
		rc = arch_tensor(env, &t, F, E, X, "blk.%d.ffn_down_exps.weight", il);
	if (!rc)
		rc = gptoss_f32(env, &b, F, X, 0, "blk.%d.ffn_gate_exps.bias", il);
	if (!rc)
		rc = gptoss_f32(env, &b, F, X, 0, "blk.%d.ffn_up_exps.bias", il);
	if (!rc)
		rc = gptoss_f32(env, &b, E, X, 0, "blk.%d.ffn_down_exps.bias", il);
	return rc;
}

static int gptoss_load_tensors(const struct arch_env *env, struct gptoss *s)
{
	struct gptoss_hparams *hp = &s->hp;
	int rc;

	rc = arch_vocab(env, &hp->n_vocab);
	if (rc)
		return rc;
	rc = arch_tensor(env, &s->tok_embd, hp->n_embd, hp->n_vocab, 0, "token_embd.weight");
	if (!rc)
		rc = gptoss_f32(env, &s->output_norm, hp->n_embd, 0, 0, "output_norm.weight");
	if (!rc)
		rc = arch_tensor(env, &s->output, hp->n_embd, hp->n_vocab, 0, "output.weight");
	if (rc)
		return rc;
	for (int il = 0; il < hp->n_layer; il++) {
		rc = gptoss_load_layer(env, hp, il, s->q_width, s->kv_width, &s->layers[il]);
		if (rc)
			return rc;
	}
	return 0;
}

/* ------------------------------------------------------------ load / destroy */

static void *gptoss_alloc(size_t n_rows, size_t row_elems, size_t elem_size)
{
	return calloc(n_rows * row_elems, elem_size);
}

static void gptoss_destroy(void **state)
{
	struct gptoss *s = *state;
	if (!s)
		return;
	attn_cache_destroy(&s->cache);
	free(s->layers);
	free(s->x);
	free(s->h);
	free(s->q);
	free(s->k);
	free(s->v);
	free(s->attn);
	free(s->o);
	free(s->router);
	free(s->ids);
	free(s->weights);
	free(s->eout);
	free(s->mm_scratch);
	free(s->route_scratch);
	free(s);
	*state = NULL;
}

static int gptoss_load(const struct arch_env *env, struct model_info *info, void **state)
{
	int rc = 0;
	struct gptoss *s = NULL;
	*state = NULL;
	if (env->n_batch < 1 || env->n_ctx < 1 || env->n_seq < 1) {
		log_error("%s: invalid batch %d, context %d or sequence count %d",
			  gguf_path(env->g), env->n_batch, env->n_ctx, env->n_seq);
		return ERR_CONFIG;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return ERR_NOMEM;
	s->env = env;
	struct gptoss_hparams *hp = &s->hp;
	rc = gptoss_load_hparams(env, hp);
	if (rc)
		goto out;
	s->q_width = hp->n_head * hp->head_dim;
	s->kv_width = hp->n_head_kv * hp->head_dim;
	s->layers = calloc((size_t)hp->n_layer, sizeof(*s->layers));
	if (!s->layers) {
		rc = ERR_NOMEM;
		goto out;
	}
	rc = gptoss_load_rope(env, hp, s->layers);
	if (!rc)
		rc = gptoss_load_tensors(env, s);
	if (rc)
		goto out;

	/* a sliding-window layer keeps a ring of window + n_batch positions (or
	 * the whole context when that is smaller): a forward step's tokens span at
	 * most n_batch positions per sequence, so the ring holds what they see */
	int ring[MOE_MAX_LAYERS];
	for (int il = 0; il < hp->n_layer; il++)
		ring[il] = hp->is_swa[il] ? hp->n_swa + env->n_batch : 0;
	rc = attn_cache_new_ring(hp->n_layer, env->n_seq, env->n_ctx, s->kv_width, s->kv_width,
				 ring, &s->cache);
	if (!rc)
		rc = attn_cache_set_shards(s->cache, env->kv_shards, env->kv_page);
	if (rc)
		goto out;
	for (int il = 0; il < hp->n_layer; il++) {
		struct gptoss_layer *l = &s->layers[il];
		l->attn = (struct attn_params){
		    .n_head = hp->n_head,
		    .n_head_kv = hp->n_head_kv,
		    .head_dim_k = hp->head_dim,
		    .head_dim_v = hp->head_dim,
		    .scale = 1.0f / sqrtf((float)hp->head_dim),
		    .window = hp->is_swa[il] ? hp->n_swa : 0, /* j visible iff pos - j < n_swa */
		    .sinks = l->sinks,
		};
		rc = attn_check_layer(s->cache, il, &l->attn, gguf_path(env->g));
		if (rc)
			goto out;
	}

	const size_t nb = (size_t)env->n_batch, E = (size_t)hp->n_embd;
	/* router: top-k on the raw logits, weights = softmax over the chosen ones */
	s->rule = (struct route_rule){
	    .n_expert = hp->n_expert,
	    .k = hp->n_expert_used,
	    .gating = ROUTE_GATING_SOFTMAX_CHOSEN,
	};
	rc = route_check(&s->rule, env->route, gguf_path(env->g));
	if (rc)
		goto out;
	s->slots = route_slots(&s->rule, env->route);
	const size_t K = (size_t)s->slots;
	const int64_t widest = s->q_width > hp->n_embd ? s->q_width : hp->n_embd;
	s->x = gptoss_alloc(nb, E, sizeof(float));
	s->h = gptoss_alloc(nb, E, sizeof(float));
	s->q = gptoss_alloc(nb, (size_t)s->q_width, sizeof(float));
	s->k = gptoss_alloc(nb, (size_t)s->kv_width, sizeof(float));
	s->v = gptoss_alloc(nb, (size_t)s->kv_width, sizeof(float));
	s->attn = gptoss_alloc(nb, (size_t)s->q_width, sizeof(float));
	s->o = gptoss_alloc(nb, E, sizeof(float));
	s->router = gptoss_alloc(nb, (size_t)hp->n_expert, sizeof(float));
	s->ids = gptoss_alloc(nb, K, sizeof(int32_t));
	s->weights = gptoss_alloc(nb, K, sizeof(float));
	s->eout = gptoss_alloc(nb * K, E, sizeof(float));
	s->mm_scratch = malloc(ops_matmul_scratch(widest, (int64_t)nb));
	s->route_scratch = malloc(route_scratch_bytes(&s->rule));
	if (!s->x || !s->h || !s->q || !s->k || !s->v || !s->attn || !s->o || !s->router ||
	    !s->ids || !s->weights || !s->eout || !s->mm_scratch || !s->route_scratch) {
		log_error("%s: out of memory for activations (batch %d)", gguf_path(env->g),
			  env->n_batch);
		rc = ERR_NOMEM;
		goto out;
	}

	info->n_vocab = hp->n_vocab;
	info->n_embd = hp->n_embd;
	info->n_layer = hp->n_layer;
	info->n_ctx_train = hp->n_ctx_train;
	struct moe_spec *m = &info->moe;
	memset(m, 0, sizeof(*m));
	m->n_layer = hp->n_layer;
	m->n_embd = hp->n_embd;
	m->n_ff_exp = hp->n_ff_exp;
	m->n_expert = hp->n_expert;
	m->n_expert_used = hp->n_expert_used;
	m->act = MOE_ACT_SWIGLU_OAI;
	m->act_alpha = GPTOSS_ACT_ALPHA;
	m->has_bias = 1;
	for (int il = 0; il < hp->n_layer; il++) {
		m->act_limit[il] = GPTOSS_ACT_LIMIT;
		m->layer_moe[il] = 1;
	}
out:
	if (rc)
		gptoss_destroy((void **)&s);
	*state = s;
	return rc;
}

static void gptoss_reset_seq(void *state, int seq)
{
	struct gptoss *s = state;
	attn_cache_reset_seq(s->cache, seq);
}

/* ------------------------------------------------------------------ forward */

/* y[r] += bias for n_rows rows of n values. */
static void gptoss_add_bias(float *y, const float *bias, int n_rows, int n)
{
	if (!bias)
		return;
	for (int r = 0; r < n_rows; r++)
		ops_add(y + (size_t)r * n, y + (size_t)r * n, bias, n);
}

/* RoPE of q and k, and the cache store, for one thread's share of the batch rows
 * (each row has its own (sequence, position), so the stores do not overlap). */
struct gptoss_rope_job {
	struct gptoss *s;
	int il;
	const model_batch *b;
};

static void gptoss_rope_rows(void *ctx, int ith, int nth)
{
	const struct gptoss_rope_job *j = ctx;
	struct gptoss *s = j->s;
	const struct gptoss_layer *l = &s->layers[j->il];
	const int D = s->hp.head_dim;
	int64_t lo, hi;
	pool_split(j->b->n_tokens, ith, nth, 1, &lo, &hi);
	for (int64_t t = lo; t < hi; t++) {
		float *q = s->q + (size_t)t * s->q_width;
		float *k = s->k + (size_t)t * s->kv_width;
		const int32_t pos = j->b->pos[t];
		for (int h = 0; h < s->hp.n_head; h++)
			ops_rope_apply(&l->rope, q + (size_t)h * D, pos);
		for (int h = 0; h < s->hp.n_head_kv; h++)
			ops_rope_apply(&l->rope, k + (size_t)h * D, pos);
		attn_cache_store(s->cache, j->il, j->b->seq[t], pos, k,
				 s->v + (size_t)t * s->kv_width);
	}
}

/* Attention block of layer il for n rows: s->x -> s->o (= Wo attn + bo), and the
 * rows' keys and values stored in the cache. */
static int gptoss_attention(struct gptoss *s, int il, const model_batch *b)
{
	const struct gptoss_hparams *hp = &s->hp;
	const struct gptoss_layer *l = &s->layers[il];
	pool *p = s->env->pool;
	const int n = b->n_tokens, E = hp->n_embd, D = hp->head_dim;

	/* h = rmsnorm(x) * attn_norm                               (n, E) */
	for (int t = 0; t < n; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, l->attn_norm, E,
			    hp->rms_eps);

	/* q, k, v = W h + b        (n, E) -> (n, q_width), (n, kv_width) x 2
	 * (one pool pass) */
	const gguf_tensor *w[3] = {l->wq, l->wk, l->wv};
	float *y[3] = {s->q, s->k, s->v};
	const int64_t ys[3] = {s->q_width, s->kv_width, s->kv_width};
	ops_matmul_multi(p, 3, w, s->h, E, n, y, ys, s->mm_scratch);
	gptoss_add_bias(s->q, l->bq, n, s->q_width);
	gptoss_add_bias(s->k, l->bk, n, s->kv_width);
	gptoss_add_bias(s->v, l->bv, n, s->kv_width);

	/* RoPE on every head of q and k at the token's position, then cache k, v */
	struct gptoss_rope_job rj = {.s = s, .il = il, .b = b};
	if (n * (hp->n_head + hp->n_head_kv) * D < 8192)
		gptoss_rope_rows(&rj, 0, 1);
	else
		pool_run(p, gptoss_rope_rows, &rj);

	/* attn = softmax(q k^T / sqrt(D) + sink, window) v             (n, q_width) */
	int rc = attn_forward(p, s->cache, il, &l->attn, b, s->q, s->attn);
	if (rc)
		return rc;

	/* o = Wo attn + bo                                 (n, q_width) -> (n, E) */
	ops_matmul(p, l->wo, s->attn, s->q_width, n, s->o, E, s->mm_scratch);
	gptoss_add_bias(s->o, l->bo, n, E);
	return 0;
}

/* MoE block of layer il for the first n rows of s->x (already x + attention). */
static int gptoss_moe(struct gptoss *s, int il, int n)
{
	const struct gptoss_hparams *hp = &s->hp;
	const struct gptoss_layer *l = &s->layers[il];
	pool *p = s->env->pool;
	const int E = hp->n_embd, X = hp->n_expert, K = s->slots;

	/* h = rmsnorm(x) * post_attention_norm                      (n, E) */
	for (int t = 0; t < n; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, l->post_norm, E,
			    hp->rms_eps);

	/* router logits = Wr h + br                        (n, E) -> (n, X) */
	ops_matmul(p, l->router, s->h, E, n, s->router, X, s->mm_scratch);
	gptoss_add_bias(s->router, l->router_b, n, X);
	int64_t used = 0;
	for (int t = 0; t < n; t++)
		used += route_select(&s->rule, s->env->route, s->router + (size_t)t * X, NULL,
				     s->route_scratch, s->ids + (size_t)t * K,
				     s->weights + (size_t)t * K);
	route_counts_add(s->env->route_counts, il, n, used);

	/* weighted expert outputs                          (n, E) -> (n, K, E) */
	const struct expert_job job = {
	    .layer = il,
	    .n_rows = n,
	    .n_embd = E,
	    .k = K,
	    .x = s->h,
	    .ids = s->ids,
	    .weights = s->weights,
	    .out = s->eout,
	};
	int rc = experts_run_sum(s->env->experts, &job, s->o);
	if (rc)
		return rc;
	/* x = sum of the slots + x                                      (n, E) */
	for (int t = 0; t < n; t++)
		ops_add(s->x + (size_t)t * E, s->o + (size_t)t * E, s->x + (size_t)t * E, E);
	return 0;
}

static int gptoss_forward(void *state, const model_batch *b, float *logits)
{
	struct gptoss *s = state;
	const struct gptoss_hparams *hp = &s->hp;
	const int n = b->n_tokens, E = hp->n_embd;
	int rc;

	if (n < 0 || n > s->env->n_batch) {
		log_error("%s: batch of %d tokens exceeds the batch size %d", gguf_path(s->env->g),
			  n, s->env->n_batch);
		return ERR_RANGE;
	}
	if (n == 0)
		return 0;

	/* x = token_embd[token]                                      (n, E) */
	const size_t row_bytes = kern_row_bytes(s->tok_embd->type, E);
	for (int t = 0; t < n; t++)
		kern_dequant_row(s->tok_embd->type,
				 (const char *)s->tok_embd->data + (size_t)b->token[t] * row_bytes,
				 s->x + (size_t)t * E, E);

	/* rows that want logits, in batch order */
	int n_out = 0;
	for (int t = 0; t < n; t++)
		n_out += !b->logits || b->logits[t];

	for (int il = 0; il < hp->n_layer; il++) {
		if ((rc = gptoss_attention(s, il, b)))
			return rc;
		int n_rows = n;
		if (il == hp->n_layer - 1) {
			/* the last layer's FFN only feeds the logits: keep the rows that
			 * want them (compacted in place, order kept) */
			n_rows = 0;
			for (int t = 0; t < n; t++) {
				if (b->logits && !b->logits[t])
					continue;
				if (n_rows != t) {
					memcpy(s->x + (size_t)n_rows * E, s->x + (size_t)t * E,
					       (size_t)E * sizeof(float));
					memcpy(s->o + (size_t)n_rows * E, s->o + (size_t)t * E,
					       (size_t)E * sizeof(float));
				}
				n_rows++;
			}
			/* the products now take these rows */
			ops_batch_rows_keep(b->seq, b->logits, n);
		}
		/* x = attention output + x */
		for (int t = 0; t < n_rows; t++) {
			float *x = s->x + (size_t)t * E;
			ops_add(x, s->o + (size_t)t * E, x, E);
		}
		if (n_rows == 0)
			break;
		rc = gptoss_moe(s, il, n_rows);
		if (rc)
			return rc;
	}
	if (n_out == 0)
		return 0;

	/* logits = Wout (rmsnorm(x) * output_norm)         (n_out, E) -> (n_out, n_vocab) */
	for (int t = 0; t < n_out; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, s->output_norm, E,
			    hp->rms_eps);
	ops_matmul(s->env->pool, s->output, s->h, E, n_out, logits, hp->n_vocab, s->mm_scratch);
	return 0;
}

static attn_cache *gptoss_kv_cache(void *state)
{
	return ((struct gptoss *)state)->cache;
}

const struct arch_vtable arch_gptoss = {
    .name = GPTOSS_ARCH,
    .load = gptoss_load,
    .destroy = gptoss_destroy,
    .forward = gptoss_forward,
    .reset_seq = gptoss_reset_seq,
    .kv_cache = gptoss_kv_cache,
};
