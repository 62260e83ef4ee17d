/* arch_qwen3moe: the Qwen3-MoE forward pass (GGUF architecture "qwen3moe"),
 * computed the way llama.cpp does (src/models/qwen3moe.cpp; build_qkv,
 * build_attn and build_moe_ffn in src/llama-graph.cpp).
 *
 * Shapes are [rows][values]; n = tokens in the micro-batch, E = n_embd,
 * H / Hkv = query / KV heads, D = head size, X = experts, K = experts per token.
 *
 *   x   = token_embd[token]                                     [n][E]
 *   per layer L:
 *     h   = rmsnorm(x) * attn_norm                              [n][E]
 *     q   = Wq h (+ bq),  k = Wk h (+ bk),  v = Wv h (+ bv)     [n][H*D], [n][Hkv*D] x 2
 *           (or one fused attn_qkv matrix, split in that order)
 *     q_h = rmsnorm(q_h) * attn_q_norm,  k_h likewise (attn_k_norm), per head of D
 *     q_h, k_h = RoPE NEOX (pairs i, i + D/2) over the whole head at the token's position
 *     cache[L][seq][pos] = k, v (F16)
 *     a   = flash-attention(q, cache), GQA, scale 1 / sqrt(D)   [n][H*D]
 *     x   = Wo a + x                                            [n][E]
 *     h   = rmsnorm(x) * ffn_norm
 *     p   = softmax(Wr h) over all X experts                    [n][X]
 *     ids = the K largest p, best first (ties: lower id first); w = p[ids] / sum(p[ids])
 *     x   = (out_0 + out_1 + ... + out_{K-1}) + x   where out_j = w_j * SwiGLU expert ids_j (h)
 *   logits = Wout (rmsnorm(x) * output_norm)   (Wout = token_embd when output.weight is absent)
 *
 * The last layer computes the rows after attention only for tokens whose
 * logits are wanted (their keys are cached for all tokens), as llama.cpp does
 * with inp_out_ids.  Routed experts run only through env->experts, which
 * returns every (row, slot) output already multiplied by its weight.  There is
 * no shared expert and no weight scale (llama.cpp does not read
 * expert_weights_scale for this architecture).
 *
 * RoPE parameters follow llama_model::load_hparams and llama_context:
 * rope.scaling.type none | linear (default) | yarn; freq_scale = 1 / factor;
 * YaRN: ext_factor 1, attn_factor = (1 + 0.1 ln f) / (1 + 0.1 ln f) (llama.cpp
 * cancels ggml's built-in magnitude factor) * rope.scaling.attn_factor, beta
 * fast / slow 32 / 1 (not read from the file for this architecture). */
#include "arch.h"
#include "attn.h"
#include "ops.h"
#include "route.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QWEN_ARCH	    "qwen3moe"
#define QWEN_MAX_DIM	    (1 << 20) /* sanity bound on widths read from the file */
#define QWEN_MAX_EXPERTS    4096
#define QWEN_YARN_BETA_FAST 32.0f /* llama_hparams defaults, not read for qwen3moe */
#define QWEN_YARN_BETA_SLOW 1.0f
#define QWEN_WSUM_MIN	    6.103515625e-5f /* build_moe_ffn clamps the weight sum (F16 min) */

/* ------------------------------------------------------------------ state */

struct qwen_hparams {
	int n_vocab;
	int n_embd; /* E */
	int n_layer;
	int n_ctx_train;
	int n_head;	   /* H */
	int n_head_kv;	   /* Hkv */
	int head_dim;	   /* D = key_length = value_length = rope dimensions */
	int n_expert;	   /* X */
	int n_expert_used; /* K */
	int n_ff_exp;	   /* expert hidden width */
	float eps;	   /* RMSNorm epsilon */
	struct ops_rope rope;
};

struct qwen_layer {
	const float *attn_norm;	   /* [E] */
	const gguf_tensor *wqkv;   /* E x (H*D + 2*Hkv*D), or NULL for separate q/k/v */
	const float *bqkv;	   /* [H*D + 2*Hkv*D] or NULL */
	const gguf_tensor *wq;	   /* E x H*D */
	const gguf_tensor *wk;	   /* E x Hkv*D */
	const gguf_tensor *wv;	   /* E x Hkv*D */
	const float *bq, *bk, *bv; /* optional biases */
	const float *q_norm;	   /* [D] */
	const float *k_norm;	   /* [D] */
	const gguf_tensor *wo;	   /* H*D x E */
	const float *ffn_norm;	   /* [E] */
	const gguf_tensor *router; /* E x X */
};

struct qwen {
	const struct arch_env *env; /* model.c's; env->experts may change between calls */
	struct qwen_hparams hp;
	int q_width;  /* H * D */
	int kv_width; /* Hkv * D */

	const gguf_tensor *tok_embd; /* E x n_vocab */
	const float *output_norm;    /* [E] */
	const gguf_tensor *output;   /* E x n_vocab (token_embd when tied) */
	struct qwen_layer *layers;   /* [n_layer] */

	attn_cache *cache;
	struct attn_params attn;

	/* activations for n_batch rows */
	float *x;		/* [n_batch][E] residual stream */
	float *h;		/* [n_batch][E] normed block input */
	float *qkv;		/* [n_batch][H*D + 2*Hkv*D] fused projection (fused files only) */
	float *q;		/* [n_batch][H*D] */
	float *k;		/* [n_batch][Hkv*D] */
	float *v;		/* [n_batch][Hkv*D] */
	float *a;		/* [n_batch][H*D] attention output, heads concatenated */
	float *o;		/* [n_batch][E] projected attention, then summed experts */
	float *probs;		/* [n_batch][X] router logits, then probabilities */
	int32_t *ids;		/* [n_batch][slots] chosen experts, best first */
	float *weights;		/* [n_batch][slots] their routing weights */
	float *eout;		/* [n_batch][slots][E] weighted expert outputs */
	void *mm_scratch;	/* ops_matmul activation conversion */
	struct route_rule rule; /* the router (route.h) */
	int slots;		/* expert slots per row: route_slots(), K by default */
	void *route_scratch;	/* route_scratch_bytes() */
};

/* ----------------------------------------------------------- hyper-parameters */

static int qwen_u32_range(const struct arch_env *env, const char *key, int required, uint32_t lo,
			  uint32_t hi, int *out)
{
	uint32_t v = (uint32_t)*out;
	int rc = required ? arch_u32_req(env, QWEN_ARCH, key, &v)
			  : arch_u32_opt(env, QWEN_ARCH, key, &v);
	if (rc)
		return rc;
	if (v < lo || v > hi) {
		log_error("%s: key %s.%s = %u is out of range [%u, %u]", gguf_path(env->g),
			  QWEN_ARCH, key, v, lo, hi);
		return ERR_FORMAT;
	}
	*out = (int)v;
	return 0;
}

static int qwen_load_hparams(const struct arch_env *env, struct qwen_hparams *hp)
{
	const char *path = gguf_path(env->g);
	int rc;

	rc = qwen_u32_range(env, "embedding_length", 1, 1, QWEN_MAX_DIM, &hp->n_embd);
	if (!rc)
		rc = qwen_u32_range(env, "block_count", 1, 1, MOE_MAX_LAYERS, &hp->n_layer);
	if (!rc)
		rc = qwen_u32_range(env, "context_length", 1, 1, 1u << 30, &hp->n_ctx_train);
	if (!rc)
		rc = qwen_u32_range(env, "attention.head_count", 1, 1, 65536, &hp->n_head);
	if (rc)
		return rc;
	hp->n_head_kv = hp->n_head; /* optional, defaults to head_count */
	rc = qwen_u32_range(env, "attention.head_count_kv", 0, 1, 65536, &hp->n_head_kv);
	if (!rc)
		rc = qwen_u32_range(env, "expert_count", 1, 1, QWEN_MAX_EXPERTS, &hp->n_expert);
	if (!rc)
		rc = qwen_u32_range(env, "expert_used_count", 1, 1, QWEN_MAX_EXPERTS,
				    &hp->n_expert_used);
	if (!rc)
		rc = arch_rms_eps(env, QWEN_ARCH, &hp->eps);
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

	/* group-limited routing would apply to any architecture in llama.cpp */
	int n_groups = 0;
	rc = qwen_u32_range(env, "expert_group_count", 0, 0, QWEN_MAX_EXPERTS, &n_groups);
	if (rc)
		return rc;
	if (n_groups > 1) {
		log_error("%s: key %s.expert_group_count = %d: group-limited routing is not "
			  "supported for qwen3moe",
			  path, QWEN_ARCH, n_groups);
		return ERR_FORMAT;
	}

	/* expert width: expert_feed_forward_length, else feed_forward_length / K */
	int n_ff = 0;
	hp->n_ff_exp = 0;
	rc = qwen_u32_range(env, "expert_feed_forward_length", 0, 0, QWEN_MAX_DIM, &hp->n_ff_exp);
	if (!rc)
		rc = qwen_u32_range(env, "feed_forward_length", 0, 0, QWEN_MAX_DIM, &n_ff);
	if (rc)
		return rc;
	if (hp->n_ff_exp == 0)
		hp->n_ff_exp = n_ff / hp->n_expert_used;
	if (hp->n_ff_exp <= 0) {
		log_error("%s: missing key %s.expert_feed_forward_length", path, QWEN_ARCH);
		return ERR_FORMAT;
	}

	/* head size: key_length (default E / H) = value_length = rope dimensions */
	int key_length = hp->n_embd / hp->n_head, value_length, n_rot;
	rc = qwen_u32_range(env, "attention.key_length", 0, 0, QWEN_MAX_DIM, &key_length);
	value_length = hp->n_embd / hp->n_head;
	if (!rc)
		rc = qwen_u32_range(env, "attention.value_length", 0, 0, QWEN_MAX_DIM,
				    &value_length);
	n_rot = key_length;
	if (!rc)
		rc = qwen_u32_range(env, "rope.dimension_count", 0, 0, QWEN_MAX_DIM, &n_rot);
	if (rc)
		return rc;
	if (key_length < 2 || key_length % 2 != 0 || key_length > ATTN_MAX_HEAD_DIM ||
	    value_length != key_length || n_rot != key_length) {
		log_error("%s: unsupported head sizes: key_length %d, value_length %d, rope "
			  "dimensions %d (need equal and even, at most %d)",
			  path, key_length, value_length, n_rot, ATTN_MAX_HEAD_DIM);
		return ERR_FORMAT;
	}
	hp->head_dim = key_length;
	if ((int64_t)hp->n_head * hp->head_dim > QWEN_MAX_DIM) {
		log_error("%s: %d heads of %d values are too wide", path, hp->n_head, hp->head_dim);
		return ERR_FORMAT;
	}

	hp->n_vocab = 0; /* 0: taken from token_embd */
	return qwen_u32_range(env, "vocab_size", 0, 0, INT32_MAX, &hp->n_vocab);
}

/* RoPE as llama.cpp sets it up for this architecture (see the file comment). */
static int qwen_load_rope(const struct arch_env *env, struct qwen_hparams *hp)
{
	const char *path = gguf_path(env->g);
	char type[32] = "linear";
	float freq_base = 10000.0f, factor = 0.0f, rope_attn_factor = 1.0f;
	uint32_t n_ctx_orig = (uint32_t)hp->n_ctx_train;
	int rc;

	rc = arch_str_opt(env, QWEN_ARCH, "rope.scaling.type", type, sizeof(type));
	if (!rc)
		rc = arch_f32_opt(env, QWEN_ARCH, "rope.freq_base", &freq_base);
	if (!rc)
		rc = arch_f32_opt(env, QWEN_ARCH, "rope.scaling.factor", &factor);
	if (!rc && factor == 0.0f) /* older files */
		rc = arch_f32_opt(env, QWEN_ARCH, "rope.scale_linear", &factor);
	if (!rc)
		rc = arch_f32_opt(env, QWEN_ARCH, "rope.scaling.attn_factor", &rope_attn_factor);
	if (!rc)
		rc = arch_u32_opt(env, QWEN_ARCH, "rope.scaling.original_context_length",
				  &n_ctx_orig);
	if (rc)
		return rc;
	if (n_ctx_orig == 0)
		n_ctx_orig = (uint32_t)hp->n_ctx_train;

	const int yarn = strcmp(type, "yarn") == 0;
	const int none = strcmp(type, "none") == 0;
	if (!yarn && !none && strcmp(type, "linear") != 0) {
		log_error("%s: key %s.rope.scaling.type = '%s' is not supported (none, linear, "
			  "yarn)",
			  path, QWEN_ARCH, type);
		return ERR_FORMAT;
	}
	if (!(freq_base > 0.0f) || !isfinite(freq_base) || !(factor >= 0.0f) || !isfinite(factor) ||
	    !(rope_attn_factor > 0.0f) || !isfinite(rope_attn_factor) || n_ctx_orig > (1u << 30)) {
		log_error("%s: invalid RoPE parameters: freq_base %g, scaling factor %g, "
			  "attn_factor %g, original context %u",
			  path, (double)freq_base, (double)factor, (double)rope_attn_factor,
			  n_ctx_orig);
		return ERR_FORMAT;
	}

	const float freq_scale = none || factor == 0.0f ? 1.0f : 1.0f / factor;
	float attn_factor = 1.0f;
	if (yarn) {
		const float f = 1.0f / freq_scale;
		attn_factor = f <= 1.0f ? 1.0f : 0.1f * logf(f) + 1.0f;
		attn_factor *= 1.0f / (1.0f + 0.1f * logf(f));
	}
	attn_factor *= rope_attn_factor;

	hp->rope = (struct ops_rope){
	    .n_dims = hp->head_dim,
	    .neox = 1,
	    .freq_base = freq_base,
	    .freq_scale = freq_scale,
	    .ext_factor = yarn ? 1.0f : 0.0f,
	    .attn_factor = attn_factor,
	    .beta_fast = QWEN_YARN_BETA_FAST,
	    .beta_slow = QWEN_YARN_BETA_SLOW,
	    .n_ctx_orig = (int)n_ctx_orig,
	};
	return 0;
}

/* ------------------------------------------------------------------ tensors */

/* An F32 vector (norm weights, biases) of n values; NULL when optional and absent. */
static int qwen_f32(const struct arch_env *env, const float **out, int64_t n, int optional,
		    const char *name)
{
	const gguf_tensor *t;
	int rc = optional ? arch_tensor_opt(env, &t, n, 0, 0, "%s", name)
			  : arch_tensor(env, &t, n, 0, 0, "%s", name);
	*out = NULL;
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

static int qwen_load_layer(const struct arch_env *env, const struct qwen *s, int il,
			   struct qwen_layer *l)
{
	const struct qwen_hparams *hp = &s->hp;
	const int64_t E = hp->n_embd, D = hp->head_dim, X = hp->n_expert, F = hp->n_ff_exp;
	const int64_t QW = s->q_width, KW = s->kv_width;
	char n[128];
	int rc;

#define QWEN_NAME(suffix) (snprintf(n, sizeof(n), "blk.%d." suffix, il), n)
	rc = qwen_f32(env, &l->attn_norm, E, 0, QWEN_NAME("attn_norm.weight"));
	if (!rc)
		rc =
		    arch_tensor_opt(env, &l->wqkv, E, QW + 2 * KW, 0, "blk.%d.attn_qkv.weight", il);
	if (rc)
		return rc;
	if (l->wqkv) {
		rc = qwen_f32(env, &l->bqkv, QW + 2 * KW, 1, QWEN_NAME("attn_qkv.bias"));
	} else {
		rc = arch_tensor(env, &l->wq, E, QW, 0, "blk.%d.attn_q.weight", il);
		if (!rc)
			rc = arch_tensor(env, &l->wk, E, KW, 0, "blk.%d.attn_k.weight", il);
		if (!rc)
			rc = arch_tensor(env, &l->wv, E, KW, 0, "blk.%d.attn_v.weight", il);
	}
	/* separate biases: used with separate matrices, or with a fused matrix
	 * that has no fused bias (then all three are needed) */
	if (!rc && !l->bqkv)
		rc = qwen_f32(env, &l->bq, QW, 1, QWEN_NAME("attn_q.bias"));
	if (!rc && !l->bqkv)
		rc = qwen_f32(env, &l->bk, KW, 1, QWEN_NAME("attn_k.bias"));
	if (!rc && !l->bqkv)
		rc = qwen_f32(env, &l->bv, KW, 1, QWEN_NAME("attn_v.bias"));
	if (!rc)
		rc = qwen_f32(env, &l->q_norm, D, 0, QWEN_NAME("attn_q_norm.weight"));
	if (!rc)
		rc = qwen_f32(env, &l->k_norm, D, 0, QWEN_NAME("attn_k_norm.weight"));
	if (!rc)
		rc = arch_tensor(env, &l->wo, QW, E, 0, "blk.%d.attn_output.weight", il);
	if (!rc)
		rc = qwen_f32(env, &l->ffn_norm, E, 0, QWEN_NAME("ffn_norm.weight"));
	if (!rc)
		rc = arch_tensor(env, &l->router, E, X, 0, "blk.%d.ffn_gate_inp.weight", il);
	if (rc)
		return rc;
	if (l->wqkv && !l->bqkv && (l->bq || l->bk || l->bv) && !(l->bq && l->bk && l->bv)) {
		/* llama.cpp adds separate biases to a fused product only if all exist */
		l->bq = l->bk = l->bv = NULL;
	}

	/* routed experts run elsewhere, but a bad file should fail at load */
	const gguf_tensor *t;
	rc = arch_tensor(env, &t, E, F, X, "blk.%d.ffn_gate_exps.weight", il);
	if (!rc)
		rc = arch_tensor(env, &t, E, F, X, "blk.%d.ffn_up_exps.weight", il);
	if (!rc)
		rc = arch_tensor(env, &t, F, E, X, "blk.%d.ffn_down_exps.weight", il);
#undef QWEN_NAME
	return rc;
}

static int qwen_load_tensors(const struct arch_env *env, struct qwen *s)
{
	struct qwen_hparams *hp = &s->hp;
	int rc;

	/* the vocabulary size is token_embd's row count */
	rc = arch_vocab(env, &hp->n_vocab);
	if (rc)
		return rc;
	rc = arch_tensor(env, &s->tok_embd, hp->n_embd, hp->n_vocab, 0, "token_embd.weight");
	if (!rc)
		rc = qwen_f32(env, &s->output_norm, hp->n_embd, 0, "output_norm.weight");
	if (!rc)
		rc = arch_tensor_opt(env, &s->output, hp->n_embd, hp->n_vocab, 0, "output.weight");
	if (rc)
		return rc;
	if (!s->output)
		s->output = s->tok_embd; /* tied embeddings */
	for (int il = 0; il < hp->n_layer; il++) {
		rc = qwen_load_layer(env, s, il, &s->layers[il]);
		if (rc)
			return rc;
	}
	return 0;
}

/* ------------------------------------------------------------ load / destroy */

static void qwen_destroy(void **state)
{
	struct qwen *s = *state;
	if (!s)
		return;
	attn_cache_destroy(&s->cache);
	free(s->layers);
	free(s->x);
	free(s->h);
	free(s->qkv);
	free(s->q);
	free(s->k);
	free(s->v);
	free(s->a);
	free(s->o);
	free(s->probs);
	free(s->ids);
	free(s->weights);
	free(s->eout);
	free(s->mm_scratch);
	free(s->route_scratch);
	free(s);
	*state = NULL;
}

static int qwen_alloc_scratch(const struct arch_env *env, struct qwen *s)
{
	const struct qwen_hparams *hp = &s->hp;
	const size_t nb = (size_t)env->n_batch, E = (size_t)hp->n_embd;
	const size_t K = (size_t)s->slots, QW = (size_t)s->q_width, KW = (size_t)s->kv_width;
	int fused = 0;
	for (int il = 0; il < hp->n_layer; il++)
		fused |= s->layers[il].wqkv != NULL;

	/* the widest matmul input: E (q/k/v/router) or H*D (attn_output) */
	const int64_t widest = (int64_t)(QW > E ? QW : E);
	s->x = calloc(nb * E, sizeof(float));
	s->h = calloc(nb * E, sizeof(float));
	s->qkv = fused ? calloc(nb * (QW + 2 * KW), sizeof(float)) : NULL;
	s->q = calloc(nb * QW, sizeof(float));
	s->k = calloc(nb * KW, sizeof(float));
	s->v = calloc(nb * KW, sizeof(float));
	s->a = calloc(nb * QW, sizeof(float));
	s->o = calloc(nb * E, sizeof(float));
	s->probs = calloc(nb * (size_t)hp->n_expert, sizeof(float));
	s->ids = calloc(nb * K, sizeof(int32_t));
	s->weights = calloc(nb * K, sizeof(float));
	s->eout = calloc(nb * K * E, sizeof(float));
	s->mm_scratch = malloc(ops_matmul_scratch(widest, (int64_t)nb));
	s->route_scratch = malloc(route_scratch_bytes(&s->rule));
	if (!s->x || !s->h || (fused && !s->qkv) || !s->q || !s->k || !s->v || !s->a || !s->o ||
	    !s->probs || !s->ids || !s->weights || !s->eout || !s->mm_scratch ||
	    !s->route_scratch) {
		log_error("%s: out of memory for activations (batch %d)", gguf_path(env->g),
			  env->n_batch);
		return ERR_NOMEM;
	}
	return 0;
}

static void qwen_fill_info(const struct qwen *s, struct model_info *info)
{
	const struct qwen_hparams *hp = &s->hp;
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
	m->act = MOE_ACT_SWIGLU;
	m->has_bias = 0;
	for (int il = 0; il < hp->n_layer; il++)
		m->layer_moe[il] = 1;
}

static int qwen_load(const struct arch_env *env, struct model_info *info, void **state)
{
	int rc = 0;
	struct qwen *s = NULL;
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
	rc = qwen_load_hparams(env, &s->hp);
	if (!rc)
		rc = qwen_load_rope(env, &s->hp);
	if (rc)
		goto out;
	s->q_width = s->hp.n_head * s->hp.head_dim;
	s->kv_width = s->hp.n_head_kv * s->hp.head_dim;
	s->layers = calloc((size_t)s->hp.n_layer, sizeof(*s->layers));
	if (!s->layers) {
		rc = ERR_NOMEM;
		goto out;
	}
	rc = qwen_load_tensors(env, s);
	if (!rc)
		rc = attn_cache_new(s->hp.n_layer, env->n_seq, env->n_ctx, s->kv_width, s->kv_width,
				    &s->cache);
	if (!rc)
		rc = attn_cache_set_shards(s->cache, env->kv_shards, env->kv_page);
	if (rc)
		goto out;
	s->attn = (struct attn_params){
	    .n_head = s->hp.n_head,
	    .n_head_kv = s->hp.n_head_kv,
	    .head_dim_k = s->hp.head_dim,
	    .head_dim_v = s->hp.head_dim,
	    .scale = 1.0f / sqrtf((float)s->hp.head_dim),
	    .window = 0,
	    .sinks = NULL,
	};
	rc = attn_check_params(s->cache, &s->attn, gguf_path(env->g));
	/* router: softmax, top-K, weights renormalised (clamped sum), no scale */
	s->rule = (struct route_rule){
	    .n_expert = s->hp.n_expert,
	    .k = s->hp.n_expert_used,
	    .gating = ROUTE_GATING_SOFTMAX,
	    .norm = 1,
	    .norm_min = QWEN_WSUM_MIN,
	};
	if (!rc)
		rc = route_check(&s->rule, env->route, gguf_path(env->g));
	s->slots = route_slots(&s->rule, env->route);
	if (!rc)
		rc = qwen_alloc_scratch(env, s);
	if (rc)
		goto out;
	qwen_fill_info(s, info);
out:
	if (rc)
		qwen_destroy((void **)&s);
	*state = s;
	return rc;
}

static void qwen_reset_seq(void *state, int seq)
{
	struct qwen *s = state;
	attn_cache_reset_seq(s->cache, seq);
}

/* ------------------------------------------------------------------ forward */

/* y[r] += bias for n_rows rows of n values, y_stride apart. */
static void qwen_add_bias(float *y, int64_t y_stride, const float *bias, int n_rows, int n)
{
	if (!bias)
		return;
	for (int r = 0; r < n_rows; r++)
		ops_add(y + (size_t)r * (size_t)y_stride, y + (size_t)r * (size_t)y_stride, bias,
			n);
}

/* Per-token work between the projections and attention, split over the pool:
 * per-head RMSNorm of q and k, RoPE, and storing k, v in the cache. */
struct qwen_qk_job {
	struct qwen *s;
	const struct qwen_layer *l;
	int il;
	const model_batch *b;
};

static void qwen_qk_worker(void *ctx, int ith, int nth)
{
	const struct qwen_qk_job *j = ctx;
	struct qwen *s = j->s;
	const struct qwen_hparams *hp = &s->hp;
	const int D = hp->head_dim;
	int64_t lo, hi;
	pool_split(j->b->n_tokens, ith, nth, 1, &lo, &hi);
	for (int64_t t = lo; t < hi; t++) {
		const int64_t pos = j->b->pos[t];
		float *q = s->q + (size_t)t * (size_t)s->q_width;
		float *k = s->k + (size_t)t * (size_t)s->kv_width;
		for (int h = 0; h < hp->n_head; h++) {
			float *qh = q + (size_t)h * (size_t)D;
			ops_rmsnorm(qh, qh, j->l->q_norm, D, hp->eps);
			ops_rope_apply(&hp->rope, qh, pos);
		}
		for (int h = 0; h < hp->n_head_kv; h++) {
			float *kh = k + (size_t)h * (size_t)D;
			ops_rmsnorm(kh, kh, j->l->k_norm, D, hp->eps);
			ops_rope_apply(&hp->rope, kh, pos);
		}
		attn_cache_store(s->cache, j->il, j->b->seq[t], j->b->pos[t], k,
				 s->v + (size_t)t * (size_t)s->kv_width);
	}
}

/* q, k, v projections of the n rows of s->h, with biases. */
static void qwen_project_qkv(struct qwen *s, const struct qwen_layer *l, int n)
{
	pool *p = s->env->pool;
	const int E = s->hp.n_embd, QW = s->q_width, KW = s->kv_width;

	if (l->wqkv) {
		/* [q | k | v] = Wqkv h (+ b)                  (n, E) -> (n, QW + 2 KW) */
		const int W = QW + 2 * KW;
		ops_matmul(p, l->wqkv, s->h, E, n, s->qkv, W, s->mm_scratch);
		qwen_add_bias(s->qkv, W, l->bqkv, n, W);
		for (int t = 0; t < n; t++) {
			const float *r = s->qkv + (size_t)t * (size_t)W;
			memcpy(s->q + (size_t)t * QW, r, (size_t)QW * sizeof(float));
			memcpy(s->k + (size_t)t * KW, r + QW, (size_t)KW * sizeof(float));
			memcpy(s->v + (size_t)t * KW, r + QW + KW, (size_t)KW * sizeof(float));
		}
	} else {
		/* q = Wq h, k = Wk h, v = Wv h     (n, E) -> (n, QW), (n, KW), (n, KW)
		 * (one pool pass) */
		const gguf_tensor *w[3] = {l->wq, l->wk, l->wv};
		float *y[3] = {s->q, s->k, s->v};
		const int64_t ys[3] = {QW, KW, KW};
		ops_matmul_multi(p, 3, w, s->h, E, n, y, ys, s->mm_scratch);
	}
	qwen_add_bias(s->q, QW, l->bq, n, QW);
	qwen_add_bias(s->k, KW, l->bk, n, KW);
	qwen_add_bias(s->v, KW, l->bv, n, KW);
}

/* Attention block of layer il for all rows of the batch: s->x -> s->o = Wo a;
 * every token's k, v are cached. */
static int qwen_attention(struct qwen *s, int il, const model_batch *b)
{
	const struct qwen_layer *l = &s->layers[il];
	pool *p = s->env->pool;
	const int n = b->n_tokens, E = s->hp.n_embd;

	/* h = rmsnorm(x) * attn_norm                                  (n, E) */
	for (int t = 0; t < n; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, l->attn_norm, E, s->hp.eps);

	/* q, k, v                               (n, E) -> (n, H*D), (n, Hkv*D) x 2 */
	qwen_project_qkv(s, l, n);

	/* per-head q/k RMSNorm, RoPE NEOX; cache[il][seq][pos] = k, v */
	struct qwen_qk_job job = {.s = s, .l = l, .il = il, .b = b};
	if (n == 1)
		qwen_qk_worker(&job, 0, 1);
	else
		pool_run(p, qwen_qk_worker, &job);

	/* a = softmax(q k^T / sqrt(D)) v over each token's visible positions (n, H*D) */
	int rc = attn_forward(p, s->cache, il, &s->attn, b, s->q, s->a);
	if (rc)
		return rc;

	/* o = Wo a                                           (n, H*D) -> (n, E) */
	ops_matmul(p, l->wo, s->a, s->q_width, n, s->o, E, s->mm_scratch);
	return 0;
}

/* MoE block of layer il for the first n rows of s->x (the residual after
 * attention): s->x += sum over slots of the weighted expert outputs. */
static int qwen_moe(struct qwen *s, int il, int n)
{
	const struct qwen_hparams *hp = &s->hp;
	const struct qwen_layer *l = &s->layers[il];
	pool *p = s->env->pool;
	const int E = hp->n_embd, X = hp->n_expert, K = s->slots;

	/* h = rmsnorm(x) * ffn_norm                                   (n, E) */
	for (int t = 0; t < n; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, l->ffn_norm, E, hp->eps);

	/* router: softmax(Wr h), top-K, renormalised weights  (n, E) -> (n, X) -> (n, K) */
	ops_matmul(p, l->router, s->h, E, n, s->probs, X, s->mm_scratch);
	int64_t used = 0;
	for (int t = 0; t < n; t++) {
		float *pr = s->probs + (size_t)t * X;
		route_gate(&s->rule, pr);
		used += route_select(&s->rule, s->env->route, pr, NULL, s->route_scratch,
				     s->ids + (size_t)t * K, s->weights + (size_t)t * K);
	}
	route_counts_add(s->env->route_counts, il, n, used);

	/* weighted SwiGLU expert outputs                        (n, E) -> (n, K, E) */
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

/* Keeps the rows of s->x and s->o whose logits are wanted, in batch order, at
 * the front; returns their count. */
static int qwen_keep_output_rows(struct qwen *s, const model_batch *b)
{
	const int E = s->hp.n_embd;
	int kept = 0;
	for (int t = 0; t < b->n_tokens; t++) {
		if (b->logits && !b->logits[t])
			continue;
		if (kept != t) {
			memcpy(s->x + (size_t)kept * E, s->x + (size_t)t * E,
			       (size_t)E * sizeof(float));
			memcpy(s->o + (size_t)kept * E, s->o + (size_t)t * E,
			       (size_t)E * sizeof(float));
		}
		kept++;
	}
	/* the products now take these rows */
	ops_batch_rows_keep(b->seq, b->logits, b->n_tokens);
	return kept;
}

static int qwen_forward(void *state, const model_batch *b, float *logits)
{
	struct qwen *s = state;
	const struct qwen_hparams *hp = &s->hp;
	const int n = b->n_tokens, E = hp->n_embd;
	int rc;

	if (n < 0 || n > s->env->n_batch) {
		log_error("qwen3moe: batch of %d tokens exceeds the batch size %d", n,
			  s->env->n_batch);
		return ERR_RANGE;
	}
	if (n == 0)
		return 0;

	/* x = token_embd[token]                                          (n, E) */
	const size_t row_bytes = kern_row_bytes(s->tok_embd->type, E);
	for (int t = 0; t < n; t++)
		kern_dequant_row(s->tok_embd->type,
				 (const char *)s->tok_embd->data + (size_t)b->token[t] * row_bytes,
				 s->x + (size_t)t * E, E);

	int n_rows = n; /* rows carried through the blocks */
	for (int il = 0; il < hp->n_layer; il++) {
		if ((rc = qwen_attention(s, il, b)))
			return rc;
		if (il == hp->n_layer - 1)
			n_rows = qwen_keep_output_rows(s, b);
		/* x = Wo a + x                                               (n_rows, E) */
		for (int t = 0; t < n_rows; t++) {
			float *x = s->x + (size_t)t * E;
			ops_add(x, s->o + (size_t)t * E, x, E);
		}
		if (n_rows == 0)
			return 0; /* no logits wanted: the cache is filled, nothing else to do */
		rc = qwen_moe(s, il, n_rows);
		if (rc)
			return rc;
	}

	/* logits = Wout (rmsnorm(x) * output_norm)    (n_rows, E) -> (n_rows, n_vocab) */
	for (int t = 0; t < n_rows; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, s->output_norm, E, hp->eps);
	ops_matmul(s->env->pool, s->output, s->h, E, n_rows, logits, hp->n_vocab, s->mm_scratch);
	return 0;
}

static attn_cache *qwen_kv_cache(void *state)
{
	return ((struct qwen *)state)->cache;
}

const struct arch_vtable arch_qwen3moe = {
    .name = QWEN_ARCH,
    .load = qwen_load,
    .destroy = qwen_destroy,
    .forward = qwen_forward,
    .reset_seq = qwen_reset_seq,
    .kv_cache = qwen_kv_cache,
};
