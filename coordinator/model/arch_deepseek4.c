/* arch_deepseek4: the DeepSeek-V4 forward pass (GGUF architecture "deepseek4"),
 * computed the way llama.cpp does (src/models/deepseek4.cpp,
 * src/llama-kv-cache-dsv4.cpp, build_moe_ffn / build_ffn in llama-graph.cpp,
 * the fused dsv4_hc_* and lightning-indexer CPU kernels).
 *
 * Notation: D = n_embd, H = heads, d = head size (one K = V head shared by all
 * query heads), r = RoPE dims (the LAST r of every head, adjacent pairs),
 * Q = q_lora, G/R = output groups / low-rank width, HI/dI = indexer heads /
 * head size, W = sliding window, n = tokens of the micro-batch.
 *
 * The residual stream of a token is 4 hyper-connection streams X[4][D]
 * (all = the embedding row at first).  Per layer:
 *
 *   mHC pre   m = hc_fn · rmsnorm(flat X)                         [24]
 *             pre = sigmoid(m[0..4)*s0 + b) + eps, post = 2 sigmoid(m[4..8)*s1 + b)
 *             C[a][c] = Sinkhorn(m[8..24)*s2 + b)  (a source, c destination)
 *             y = sum_a pre[a] X[a]                               [D]
 *   attention x = rmsnorm(y) * attn_norm
 *             qr = rmsnorm(q_a · x) * q_a_norm                    [Q]
 *             q  = per-head rmsnorm(q_b · qr), RoPE               [H][d]
 *             kv = rmsnorm(kv · x) * kv_norm, RoPE                [d]  -> window cache
 *             ratio 4 / 128 layers: compressor (below)            -> compressed cache
 *             ratio 4 layers: lightning indexer picks top-k compressed entries
 *             o_h = softmax over [window keys; compressed keys] with sink
 *             inverse RoPE of o's last r dims
 *             out = wo_b · [wo_a[g] · o_g for g < G]              [D]
 *   mHC post  X'[c] = post[c] * out + sum_a C[a][c] X[a]
 *   FFN       the same mHC pre/post around
 *             x = rmsnorm(y) * ffn_norm; p = sqrt(softplus(gate_inp · x))
 *             experts = tid2eid[token] (hash layers) or top-k(p + exp_probs_b)
 *             out = sum_k w_k * clampedSwiGLU_e(x) + shared clampedSwiGLU(x)
 *   head      pre = sigmoid(output_hc_fn · rmsnorm(flat X) * s + b) + eps
 *             logits = output · (rmsnorm(sum_a pre[a] X[a]) * output_norm)
 *
 * Compressor (ratio r_c = 4: c = 2, overlapping; r_c = 128: c = 1): per token
 * a = comp_kv · x, g = comp_gate · x + ape[pos % r_c], kept in a rolling F32
 * state per sequence.  When a token completes block j (pos + 1 = (j+1) r_c),
 * entry j = per channel softmax(g)-weighted sum of a over the block (ratio 4:
 * the 8 candidates are the first half-channels of block j-1 and the second
 * half-channels of block j; block -1 contributes nothing), then rmsnorm *
 * comp_norm and RoPE at position j r_c.  A token at pos sees entries
 * j < (pos + 1) / r_c.  The indexer has its own ratio-4 compressor (width dI,
 * Walsh-Hadamard rotated keys); its score for entry j is
 * sum_h w_h relu(q_h . k_j) with w = proj · x / sqrt(dI HI), and the top-k
 * entries (all when fewer are visible) join the attention.
 *
 * KV hosts (--kv-shards with a cluster, ds4_kv_hosts): the complete pages of
 * indexer keys go to the hosts, which score them for every row with the same
 * indexer_score() (indexer.h); the coordinator scores each row's page in
 * progress and selects as before, so the bits are the single-node run's.
 * Everything else stays here.
 *
 * Caches (per layer and sequence; F16 by default, F32 with kv_f32): the window
 * keeps the last W + n_batch raw rows in a ring; compressed entries and
 * indexer keys are kept for the whole context.  Attention goes through
 * attn_gather_row() with the key cells llama.cpp's views would give (window
 * cell = position, compressed cell = window view size + entry), so its tiled /
 * one-row / split-KV kernels round as llama.cpp's (a reference run with
 * context <= 512 never wraps llama.cpp's window ring, which is what we assume).
 *
 * RoPE per layer: ratio 0 -> rope.freq_base, no scaling; ratio 4/128 ->
 * attention.compress_rope_freq_base with the file's YaRN settings and no
 * magnitude factor (attn_factor = 1 / (1 + 0.1 ln factor) cancels ggml's).
 *
 * Decisions on what llama.cpp also rejects or leaves open: compress ratios
 * must be 0, 4 or 128 (one per layer; extra trailing entries, like the absent
 * MTP layer's, are ignored); a model with no ratio-4 layer is accepted here
 * (llama.cpp crashes on it); hyper_connection.count must be 4 and
 * expert_gating_func 4 (sqrtsoftplus); the indexer head size must be a multiple
 * of 64 and at least r; every tid2eid entry must be a valid expert id. */
#define _DEFAULT_SOURCE /* madvise */
#include "arch.h"
#include "attn.h"
#include "indexer.h"
#include "ops.h"
#include "route.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Row kernels built twice, chosen at load time by CPU: with FMA, fmaf() is
 * one instruction instead of a library call (the same result). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define DS4_HOT __attribute__((target_clones("fma", "default")))
#else
#define DS4_HOT
#endif

#define DS4_ARCH     "deepseek4"
#define DS4_HC	     4			     /* hyper-connection streams */
#define DS4_MIX	     ((2 + DS4_HC) * DS4_HC) /* mHC mixes per token: 24 */
#define DS4_CSA	     4			     /* compressed + indexed layers */
#define DS4_HCA	     128		     /* heavily compressed layers */
#define DS4_NORM_MIN 6.103515625e-5f	     /* weight-sum clamp (smallest F16 normal) */

struct ds4_hparams {
	int n_vocab, n_embd, n_layer, n_ctx_train;
	int n_head, head_dim, n_rot, q_lora;
	int window, o_groups, o_lora;
	int idx_heads, idx_dim, idx_topk, idx_hadamard; /* Hadamard block: 64 * 2^k */
	int n_expert, n_expert_used, n_ff_exp, n_shared, n_hash;
	int weights_norm;
	float weights_scale;
	int sinkhorn_iters;
	float hc_eps, eps;
	int ratio[MOE_MAX_LAYERS];
	float lim_exp[MOE_MAX_LAYERS], lim_shexp[MOE_MAX_LAYERS]; /* INFINITY: no clamp */
};

struct ds4_layer {
	int ratio;						      /* 0, DS4_CSA or DS4_HCA */
	const gguf_tensor *hc_attn_fn, *hc_attn_base, *hc_attn_scale; /* 4D -> 24, [24], [3] F32 */
	const gguf_tensor *attn_norm;				      /* [D] */
	const gguf_tensor *q_a, *q_a_norm;			      /* D -> Q, [Q] */
	const gguf_tensor *q_b;					      /* Q -> H d */
	const gguf_tensor *kv, *kv_norm;			      /* D -> d, [d] */
	const gguf_tensor *sinks;				      /* [H] */
	const gguf_tensor *wo_a; /* H d / G -> G R (group g: rows g R .. g R + R - 1) */
	const gguf_tensor *wo_b; /* G R -> D */
	const gguf_tensor *comp_kv, *comp_gate; /* D -> c d */
	const gguf_tensor *comp_ape;		/* c d x ratio, F32 */
	const gguf_tensor *comp_norm;		/* [d] */
	const gguf_tensor *idx_q_b;		/* Q -> HI dI */
	const gguf_tensor *idx_proj;		/* D -> HI */
	const gguf_tensor *idx_kv, *idx_gate;	/* D -> 2 dI */
	const gguf_tensor *idx_ape;		/* 2 dI x 4, F32 */
	const gguf_tensor *idx_norm;		/* [dI] */
	const gguf_tensor *hc_ffn_fn, *hc_ffn_base, *hc_ffn_scale;
	const gguf_tensor *ffn_norm;			       /* [D] */
	const gguf_tensor *gate_inp;			       /* D -> E router */
	const gguf_tensor *tid2eid;			       /* k x V I32 (hash layers) */
	const gguf_tensor *probs_b;			       /* [E] selection bias */
	const gguf_tensor *gate_shexp, *up_shexp, *down_shexp; /* shared expert */
	/* per-sequence state, [n_seq][...] */
	uint8_t *raw;	     /* window ring: [ring][d] cache rows */
	uint8_t *comp;	     /* compressed entries: [n_ctx / ratio][d] */
	uint8_t *idx;	     /* indexer keys: [n_ctx / 4][dI] */
	float *cs_kv, *cs_g; /* compressor state: [state_rows][c d] */
	float *is_kv, *is_g; /* indexer compressor state: [8][2 dI] */
};

/* Activation buffers, sized at load for n_batch rows (B). */
struct ds4_scratch {
	float *X, *Xn;				/* [B][4][D] streams, next streams */
	float *flat;				/* [B][4D] normalised streams */
	float *mix;				/* [B][24] */
	float *pre, *post, *comb;		/* [B][4], [B][4], [B][4][4] (source-major) */
	float *y, *h;				/* [B][D] sub-layer input, normed input */
	float *qr;				/* [B][Q] */
	float *q;				/* [B][H][d] */
	float *kv;				/* [B][d] */
	float *o;				/* [B][H][d] attention output */
	float *z;				/* [B][G R] */
	float *out;				/* [B][D] sub-layer output */
	float *ca, *cg;				/* [B][2 max(d, dI)] compressor inputs */
	float *iq;				/* [B][HI][dI] indexer queries */
	float *iw;				/* [B][HI] indexer head weights */
	float *iscore;				/* [B][n_ctx / 4] indexer scores */
	int32_t *isel;				/* [B][topk] chosen entries */
	int32_t *nsel;				/* [B] */
	int32_t *cell;				/* [B][max_keys] key cells */
	const void **krow;			/* [B][max_keys] key rows */
	int32_t *nkeys;				/* [B] */
	int *kernel;				/* [B] enum attn_kernel */
	int32_t *seq_tok;			/* [n_seq] tokens of each sequence in the batch */
	int32_t *seq_maxpos;			/* [n_seq] */
	float *router;				/* [B][E] */
	void *sel;				/* route scratch */
	int32_t *ids;				/* [B][slots] */
	float *weights;				/* [B][slots] */
	float *exp_out;				/* [B][slots][D] */
	float *moe;				/* [B][D] routed sum */
	float *gate, *up;			/* [B][F shared] */
	float *ent;				/* [8 * max(2d, 2dI)] one compressed entry's work */
	int32_t *sub_token, *sub_pos, *sub_seq; /* [B] rows kept for the head */
	void *mm;				/* ops_matmul scratch */
	float *ascr;				/* [threads][ascr_n] attention scratch */
	float *ikf;				/* [threads][n_ctx / 4][dI] indexer keys */
	size_t ascr_n;
};

struct ds4 {
	const struct arch_env *env;
	struct ds4_hparams hp;
	struct ds4_layer *layers;
	const gguf_tensor *tok_embd, *output, *output_norm;
	const gguf_tensor *hc_head_fn, *hc_head_base, *hc_head_scale; /* 4D -> 4, [4], [1] */
	struct ops_rope rope_raw;				      /* ratio-0 layers */
	struct ops_rope rope_comp; /* compressed layers, compressors, indexer */
	struct route_rule rule;
	int slots;
	int kv_f32;   /* cache rows are F32 (else F16) */
	size_t es;    /* bytes per cached value */
	int ring;     /* window ring rows per sequence */
	int max_keys; /* keys one query can see */
	int n_batch;
	struct ds4_scratch s;
	/* KV hosts of the indexer keys (ds4_kv_hosts): pages of idx_page
	 * entries, page i on host attn_page_host(i, n_shard, n_hosts) */
	const struct attn_remote_ops *remote;
	void *remote_self;
	int n_hosts, n_shard, idx_page;
	int32_t *idx_shipped; /* [2][n_layer][n_seq]: pages shipped, then released */
};

static inline const float *ds4_f32(const gguf_tensor *t)
{
	return (const float *)t->data;
}

/* ------------------------------------------------------------------ loading */

static int ds4_bad(const struct arch_env *env, const char *what)
{
	log_error("%s: unsupported deepseek4 hyper-parameters: %s", gguf_path(env->g), what);
	return ERR_FORMAT;
}

static int ds4_u32(const struct arch_env *env, const char *key, int required, uint32_t def,
		   uint32_t min, uint32_t max, int *out)
{
	uint32_t v = def;
	int rc =
	    required ? arch_u32_req(env, DS4_ARCH, key, &v) : arch_u32_opt(env, DS4_ARCH, key, &v);
	if (rc)
		return rc;
	if (v < min || v > max) {
		log_error("%s: key %s.%s = %u is out of range (%u..%u)", gguf_path(env->g),
			  DS4_ARCH, key, v, min, max);
		return ERR_FORMAT;
	}
	*out = (int)v;
	return 0;
}

/* A per-layer F32 array with at least n entries (extra ones ignored). */
static int ds4_f32_array(const struct arch_env *env, const char *key, int n, float *out,
			 int *present)
{
	char k[128];
	enum gguf_type et;
	uint64_t count;
	const void *data;
	snprintf(k, sizeof(k), "%s.%s", DS4_ARCH, key);
	*present = 0;
	if (gguf_find_kv(env->g, k) < 0)
		return 0;
	int rc = gguf_get_arr(env->g, k, &et, &count, &data);
	if (rc || et != GGUF_TYPE_F32 || count < (uint64_t)n) {
		log_error("%s: key %s must be an array of at least %d f32 values",
			  gguf_path(env->g), k, n);
		return ERR_FORMAT;
	}
	memcpy(out, data, (size_t)n * sizeof(float));
	for (int i = 0; i < n; i++)
		if (!isfinite(out[i])) {
			log_error("%s: key %s[%d] is not finite", gguf_path(env->g), k, i);
			return ERR_FORMAT;
		}
	*present = 1;
	return 0;
}

static int ds4_load_ratios(const struct arch_env *env, struct ds4_hparams *hp)
{
	const char *k = DS4_ARCH ".attention.compress_ratios";
	enum gguf_type et;
	uint64_t count;
	const void *data;
	if (gguf_find_kv(env->g, k) < 0) {
		log_error("%s: missing key %s", gguf_path(env->g), k);
		return ERR_FORMAT;
	}
	int rc = gguf_get_arr(env->g, k, &et, &count, &data);
	if (rc || (et != GGUF_TYPE_I32 && et != GGUF_TYPE_U32)) {
		log_error("%s: key %s must be an array of i32", gguf_path(env->g), k);
		return ERR_FORMAT;
	}
	if (count < (uint64_t)hp->n_layer) {
		log_error("%s: key %s has %llu entries, fewer than the %d layers",
			  gguf_path(env->g), k, (unsigned long long)count, hp->n_layer);
		return ERR_FORMAT;
	}
	for (int il = 0; il < hp->n_layer; il++) {
		int32_t v;
		memcpy(&v, (const char *)data + 4 * (size_t)il, 4);
		if (v != 0 && v != DS4_CSA && v != DS4_HCA) {
			log_error("%s: key %s[%d] = %d: compression ratios must be 0, 4 or 128",
				  gguf_path(env->g), k, il, (int)v);
			return ERR_FORMAT;
		}
		hp->ratio[il] = v;
	}
	return 0;
}

static int ds4_load_hparams(struct ds4 *m)
{
	const struct arch_env *env = m->env;
	struct ds4_hparams *hp = &m->hp;
	const uint32_t big = 1u << 20;
	int rc, hc, gating, key_v, n_head_kv;

	if ((rc = ds4_u32(env, "embedding_length", 1, 0, 1, big, &hp->n_embd)) ||
	    (rc = ds4_u32(env, "block_count", 1, 0, 1, MOE_MAX_LAYERS, &hp->n_layer)) ||
	    (rc = ds4_u32(env, "context_length", 1, 0, 1, INT32_MAX, &hp->n_ctx_train)) ||
	    (rc = ds4_u32(env, "attention.head_count", 1, 0, 1, 65536, &hp->n_head)) ||
	    (rc = ds4_u32(env, "attention.head_count_kv", 0, 1, 1, 65536, &n_head_kv)) ||
	    (rc =
		 ds4_u32(env, "attention.key_length", 1, 0, 1, ATTN_MAX_HEAD_DIM, &hp->head_dim)) ||
	    (rc = ds4_u32(env, "attention.value_length", 0, (uint32_t)hp->head_dim, 1,
			  ATTN_MAX_HEAD_DIM, &key_v)) ||
	    (rc = ds4_u32(env, "rope.dimension_count", 1, 0, 2, ATTN_MAX_HEAD_DIM, &hp->n_rot)) ||
	    (rc = ds4_u32(env, "attention.q_lora_rank", 1, 0, 1, big, &hp->q_lora)) ||
	    (rc = ds4_u32(env, "attention.sliding_window", 1, 0, 1, 1u << 16, &hp->window)) ||
	    (rc = ds4_u32(env, "attention.output_group_count", 1, 0, 1, 65536, &hp->o_groups)) ||
	    (rc = ds4_u32(env, "attention.output_lora_rank", 1, 0, 1, big, &hp->o_lora)) ||
	    (rc = ds4_u32(env, "attention.indexer.head_count", 1, 0, 1, 65536, &hp->idx_heads)) ||
	    (rc = ds4_u32(env, "attention.indexer.key_length", 1, 0, 64, ATTN_MAX_HEAD_DIM,
			  &hp->idx_dim)) ||
	    (rc = ds4_u32(env, "attention.indexer.top_k", 1, 0, 1, 1u << 16, &hp->idx_topk)) ||
	    (rc = ds4_u32(env, "expert_count", 1, 0, 1, 65536, &hp->n_expert)) ||
	    (rc = ds4_u32(env, "expert_used_count", 1, 0, 1, 65536, &hp->n_expert_used)) ||
	    (rc = ds4_u32(env, "expert_feed_forward_length", 1, 0, 1, big, &hp->n_ff_exp)) ||
	    (rc = ds4_u32(env, "expert_shared_count", 1, 0, 1, 64, &hp->n_shared)) ||
	    (rc = ds4_u32(env, "hyper_connection.count", 1, 0, 0, 64, &hc)) ||
	    (rc = ds4_u32(env, "hyper_connection.sinkhorn_iterations", 1, 0, 1, 1000,
			  &hp->sinkhorn_iters)) ||
	    (rc = ds4_u32(env, "hash_layer_count", 0, 0, 0, MOE_MAX_LAYERS, &hp->n_hash)) ||
	    (rc = ds4_u32(env, "expert_gating_func", 1, 0, 0, 64, &gating)))
		return rc;
	if (n_head_kv != 1)
		return ds4_bad(env, "attention.head_count_kv must be 1 (one shared K = V head)");
	if (key_v != hp->head_dim)
		return ds4_bad(env, "attention.value_length must equal key_length (K = V)");
	if (hp->n_rot % 2 != 0 || hp->n_rot > hp->head_dim)
		return ds4_bad(env, "rope.dimension_count must be even and <= key_length");
	if (hp->n_head % hp->o_groups != 0)
		return ds4_bad(env, "head_count must be a multiple of output_group_count");
	if (hp->idx_dim % 64 != 0 || hp->idx_dim < hp->n_rot)
		return ds4_bad(env, "indexer key_length must be a multiple of 64 and >= "
				    "rope.dimension_count");
	if (hp->n_expert_used > hp->n_expert)
		return ds4_bad(env, "expert_used_count exceeds expert_count");
	if ((int64_t)hp->n_ff_exp * hp->n_shared > (int64_t)big)
		return ds4_bad(env, "shared expert too wide");
	if (hc != DS4_HC)
		return ds4_bad(env, "hyper_connection.count must be 4");
	if (gating != ROUTE_GATING_SQRT_SOFTPLUS)
		return ds4_bad(env, "expert_gating_func must be 4 (sqrtsoftplus)");
	if (hp->n_hash > hp->n_layer)
		return ds4_bad(env, "hash_layer_count exceeds block_count");
	hp->idx_hadamard = 64;
	while (hp->idx_dim % (hp->idx_hadamard * 2) == 0)
		hp->idx_hadamard *= 2;

	/* a trailing multi-token-prediction layer is not run (nor required) */
	int n_nextn = 0;
	if ((rc = ds4_u32(env, "nextn_predict_layers", 0, 0, 0, MOE_MAX_LAYERS, &n_nextn)))
		return rc;
	if (n_nextn > 0) {
		char probe[96];
		snprintf(probe, sizeof(probe), "blk.%d.nextn.eh_proj.weight",
			 hp->n_layer - n_nextn);
		if (n_nextn < hp->n_layer && gguf_find_tensor(env->g, probe))
			hp->n_layer -= n_nextn;
	}

	if ((rc = ds4_load_ratios(env, hp)))
		return rc;

	hp->weights_norm = 0;
	hp->weights_scale = 0.0f;
	hp->eps = 0.0f;
	hp->hc_eps = 0.0f;
	if ((rc = arch_bool_opt(env, DS4_ARCH, "expert_weights_norm", &hp->weights_norm)) ||
	    (rc = arch_f32_opt(env, DS4_ARCH, "expert_weights_scale", &hp->weights_scale)) ||
	    (rc = arch_rms_eps(env, DS4_ARCH, &hp->eps)) ||
	    (rc = arch_f32_req(env, DS4_ARCH, "hyper_connection.epsilon", &hp->hc_eps)))
		return rc;
	if (!isfinite(hp->weights_scale) || !isfinite(hp->hc_eps) || hp->hc_eps < 0.0f)
		return ds4_bad(env, "expert_weights_scale / hyper_connection.epsilon out of range");

	/* clamped SwiGLU limits; <= 1e-6 means no clamp (llama.cpp) */
	int has_exp, has_sh;
	if ((rc = ds4_f32_array(env, "swiglu_clamp_exp", hp->n_layer, hp->lim_exp, &has_exp)) ||
	    (rc = ds4_f32_array(env, "swiglu_clamp_shexp", hp->n_layer, hp->lim_shexp, &has_sh)))
		return rc;
	for (int il = 0; il < hp->n_layer; il++) {
		if (!has_exp)
			hp->lim_exp[il] = 0.0f;
		if (!has_sh)
			hp->lim_shexp[il] = hp->lim_exp[il];
		if (!(hp->lim_exp[il] > 1e-6f))
			hp->lim_exp[il] = INFINITY;
		if (!(hp->lim_shexp[il] > 1e-6f))
			hp->lim_shexp[il] = INFINITY;
	}

	/* RoPE: plain on window layers, compress base + YaRN on the others */
	float freq_base = 10000.0f, comp_base = 0.0f, factor = 0.0f;
	int n_ctx_orig = hp->n_ctx_train;
	char type[32] = "none";
	if ((rc = arch_f32_opt(env, DS4_ARCH, "rope.freq_base", &freq_base)) ||
	    (rc = arch_f32_req(env, DS4_ARCH, "attention.compress_rope_freq_base", &comp_base)) ||
	    (rc = arch_str_opt(env, DS4_ARCH, "rope.scaling.type", type, sizeof(type))) ||
	    (rc = arch_f32_opt(env, DS4_ARCH, "rope.scaling.factor", &factor)) ||
	    (rc = ds4_u32(env, "rope.scaling.original_context_length", 0, (uint32_t)n_ctx_orig, 1,
			  INT32_MAX, &n_ctx_orig)))
		return rc;
	if (!(freq_base > 0.0f) || !isfinite(freq_base) || !(comp_base > 0.0f) ||
	    !isfinite(comp_base) || !(factor >= 0.0f) || !isfinite(factor) ||
	    (factor > 0.0f && factor < 1e-6f))
		return ds4_bad(env,
			       "rope.freq_base / compress_rope_freq_base / rope.scaling.factor "
			       "out of range");
	float freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
	float ext = 0.0f;
	if (strcmp(type, "none") == 0)
		freq_scale = 1.0f;
	else if (strcmp(type, "yarn") == 0)
		ext = 1.0f;
	else if (strcmp(type, "linear") != 0)
		return ds4_bad(env, "rope.scaling.type must be none, linear or yarn");
	m->rope_raw = (struct ops_rope){
	    .n_dims = hp->n_rot,
	    .neox = 0,
	    .freq_base = freq_base,
	    .freq_scale = 1.0f,
	    .ext_factor = 0.0f,
	    .attn_factor = 1.0f,
	    .beta_fast = 0.0f,
	    .beta_slow = 0.0f,
	    .n_ctx_orig = 0,
	};
	m->rope_comp = (struct ops_rope){
	    .n_dims = hp->n_rot,
	    .neox = 0,
	    .freq_base = comp_base,
	    .freq_scale = freq_scale,
	    .ext_factor = ext,
	    .attn_factor = ext != 0.0f ? 1.0f / (1.0f + 0.1f * logf(1.0f / freq_scale)) : 1.0f,
	    .beta_fast = 32.0f,
	    .beta_slow = 1.0f,
	    .n_ctx_orig = n_ctx_orig,
	};
	return 0;
}

/* Matrices must be of a type the kernels multiply; norms, biases, sinks, hc
 * tensors and ape tables F32; tid2eid I32. */
static int ds4_check_type(const struct arch_env *env, const gguf_tensor *t, uint32_t need)
{
	int ok;
	if (!t)
		return 0;
	if (need == KERN_F16) /* any matmul weight type */
		ok = kern_type_dot(t->type);
	else
		ok = t->type == need;
	if (!ok) {
		log_error("%s: tensor %s: type %s (%u) is not supported here", gguf_path(env->g),
			  t->name, kern_type_name(t->type), t->type);
		return ERR_FORMAT;
	}
	return 0;
}

#define DS4_T(out, ne0, ne1, ne2, need, ...)                                                       \
	do {                                                                                       \
		if ((rc = arch_tensor(env, &(out), (ne0), (ne1), (ne2), __VA_ARGS__)) ||           \
		    (rc = ds4_check_type(env, (out), (need))))                                     \
			return rc;                                                                 \
	} while (0)

static int ds4_load_layer(struct ds4 *m, int il)
{
	const struct arch_env *env = m->env;
	const struct ds4_hparams *hp = &m->hp;
	struct ds4_layer *L = &m->layers[il];
	const int64_t D = hp->n_embd, H = hp->n_head, d = hp->head_dim, Q = hp->q_lora;
	const int64_t G = hp->o_groups, R = hp->o_lora, E = hp->n_expert;
	const int64_t dI = hp->idx_dim, HI = hp->idx_heads;
	const int64_t Fs = (int64_t)hp->n_ff_exp * hp->n_shared;
	const uint32_t M = KERN_F16, F = KERN_F32;
	int rc;

	L->ratio = hp->ratio[il];
	DS4_T(L->hc_attn_fn, DS4_HC * D, DS4_MIX, 0, F, "blk.%d.hc_attn_fn.weight", il);
	DS4_T(L->hc_attn_base, DS4_MIX, 0, 0, F, "blk.%d.hc_attn_base.weight", il);
	DS4_T(L->hc_attn_scale, 3, 0, 0, F, "blk.%d.hc_attn_scale.weight", il);
	DS4_T(L->attn_norm, D, 0, 0, F, "blk.%d.attn_norm.weight", il);
	DS4_T(L->q_a, D, Q, 0, M, "blk.%d.attn_q_a.weight", il);
	DS4_T(L->q_a_norm, Q, 0, 0, F, "blk.%d.attn_q_a_norm.weight", il);
	DS4_T(L->q_b, Q, H * d, 0, M, "blk.%d.attn_q_b.weight", il);
	DS4_T(L->kv, D, d, 0, M, "blk.%d.attn_kv.weight", il);
	DS4_T(L->kv_norm, d, 0, 0, F, "blk.%d.attn_kv_a_norm.weight", il);
	DS4_T(L->sinks, H, 0, 0, F, "blk.%d.attn_sinks.weight", il);
	DS4_T(L->wo_a, H * d / G, G * R, 0, M, "blk.%d.attn_output_a.weight", il);
	DS4_T(L->wo_b, G * R, D, 0, M, "blk.%d.attn_output_b.weight", il);
	if (L->ratio) {
		const int64_t c = L->ratio == DS4_CSA ? 2 : 1;
		DS4_T(L->comp_kv, D, c * d, 0, M, "blk.%d.attn_compressor_kv.weight", il);
		DS4_T(L->comp_gate, D, c * d, 0, M, "blk.%d.attn_compressor_gate.weight", il);
		DS4_T(L->comp_ape, c * d, L->ratio, 0, F, "blk.%d.attn_compressor_ape.weight", il);
		DS4_T(L->comp_norm, d, 0, 0, F, "blk.%d.attn_compressor_norm.weight", il);
	}
	if (L->ratio == DS4_CSA) {
		DS4_T(L->idx_q_b, Q, HI * dI, 0, M, "blk.%d.indexer.attn_q_b.weight", il);
		DS4_T(L->idx_proj, D, HI, 0, M, "blk.%d.indexer.proj.weight", il);
		DS4_T(L->idx_kv, D, 2 * dI, 0, M, "blk.%d.indexer_compressor_kv.weight", il);
		DS4_T(L->idx_gate, D, 2 * dI, 0, M, "blk.%d.indexer_compressor_gate.weight", il);
		DS4_T(L->idx_ape, 2 * dI, DS4_CSA, 0, F, "blk.%d.indexer_compressor_ape.weight",
		      il);
		DS4_T(L->idx_norm, dI, 0, 0, F, "blk.%d.indexer_compressor_norm.weight", il);
	}
	DS4_T(L->hc_ffn_fn, DS4_HC * D, DS4_MIX, 0, F, "blk.%d.hc_ffn_fn.weight", il);
	DS4_T(L->hc_ffn_base, DS4_MIX, 0, 0, F, "blk.%d.hc_ffn_base.weight", il);
	DS4_T(L->hc_ffn_scale, 3, 0, 0, F, "blk.%d.hc_ffn_scale.weight", il);
	DS4_T(L->ffn_norm, D, 0, 0, F, "blk.%d.ffn_norm.weight", il);
	DS4_T(L->gate_inp, D, E, 0, M, "blk.%d.ffn_gate_inp.weight", il);
	if (il < hp->n_hash) {
		rc = arch_tensor_ids(env, &L->tid2eid, hp->n_expert_used, hp->n_vocab,
				     "blk.%d.ffn_gate_tid2eid.weight", il);
		if (rc)
			return rc;
		const int32_t *ids = L->tid2eid->data;
		const size_t n = (size_t)hp->n_expert_used * (size_t)hp->n_vocab;
		for (size_t i = 0; i < n; i++) {
			int32_t e;
			memcpy(&e, ids + i, sizeof(e));
			if (e < 0 || e >= hp->n_expert) {
				log_error("%s: tensor blk.%d.ffn_gate_tid2eid.weight: token %zu "
					  "slot %zu names expert %d (expert_count %d)",
					  gguf_path(env->g), il, i / (size_t)hp->n_expert_used,
					  i % (size_t)hp->n_expert_used, (int)e, hp->n_expert);
				return ERR_FORMAT;
			}
		}
	} else {
		DS4_T(L->probs_b, E, 0, 0, F, "blk.%d.exp_probs_b.bias", il);
	}
	DS4_T(L->gate_shexp, D, Fs, 0, M, "blk.%d.ffn_gate_shexp.weight", il);
	DS4_T(L->up_shexp, D, Fs, 0, M, "blk.%d.ffn_up_shexp.weight", il);
	DS4_T(L->down_shexp, Fs, D, 0, M, "blk.%d.ffn_down_shexp.weight", il);
	/* routed experts: shapes checked here, types by the expert shard */
	const gguf_tensor *t;
	if ((rc = arch_tensor(env, &t, D, hp->n_ff_exp, E, "blk.%d.ffn_gate_exps.weight", il)) ||
	    (rc = arch_tensor(env, &t, D, hp->n_ff_exp, E, "blk.%d.ffn_up_exps.weight", il)) ||
	    (rc = arch_tensor(env, &t, hp->n_ff_exp, D, E, "blk.%d.ffn_down_exps.weight", il)))
		return rc;
	return 0;
}

static void *ds4_alloc(size_t n, size_t size, int *failed)
{
	void *p = calloc(n ? n : 1, size);
	if (!p)
		*failed = 1;
	return p;
}

static void ds4_free_layers(struct ds4 *m)
{
	if (!m->layers)
		return;
	for (int il = 0; il < m->hp.n_layer; il++) {
		struct ds4_layer *L = &m->layers[il];
		free(L->raw);
		free(L->comp);
		free(L->idx);
		free(L->cs_kv);
		free(L->cs_g);
		free(L->is_kv);
		free(L->is_g);
	}
	free(m->layers);
	m->layers = NULL;
}

static void ds4_destroy(void **state)
{
	struct ds4 *m = *state;
	if (!m)
		return;
	ds4_free_layers(m);
	struct ds4_scratch *s = &m->s;
	void *bufs[] = {
	    s->X,      s->Xn,	s->flat,	 s->mix,     s->pre,	 s->post,    s->comb,
	    s->y,      s->h,	s->qr,		 s->q,	     s->kv,	 s->o,	     s->z,
	    s->out,    s->ca,	s->cg,		 s->iq,	     s->iw,	 s->iscore,  s->isel,
	    s->nsel,   s->cell, (void *)s->krow, s->nkeys,   s->kernel,	 s->seq_tok, s->seq_maxpos,
	    s->router, s->sel,	s->ids,		 s->weights, s->exp_out, s->moe,     s->gate,
	    s->up,     s->ent,	s->sub_token,	 s->sub_pos, s->sub_seq, s->mm,	     s->ascr,
	    s->ikf};
	for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
		free(bufs[i]);
	free(m->idx_shipped);
	free(m);
	*state = NULL;
}

/* Caches and compressor states of every layer, for n_seq sequences. */
static int ds4_alloc_caches(struct ds4 *m)
{
	const struct ds4_hparams *hp = &m->hp;
	const size_t S = (size_t)m->env->n_seq, C = (size_t)m->env->n_ctx;
	const size_t d = (size_t)hp->head_dim, dI = (size_t)hp->idx_dim;
	int failed = 0;
	for (int il = 0; il < hp->n_layer && !failed; il++) {
		struct ds4_layer *L = &m->layers[il];
		L->raw = ds4_alloc(S * (size_t)m->ring * d, m->es, &failed);
		if (!L->ratio)
			continue;
		const size_t c = L->ratio == DS4_CSA ? 2 : 1;
		const size_t rows = L->ratio == DS4_CSA ? 2 * DS4_CSA : DS4_HCA;
		L->comp = ds4_alloc(S * (C / (size_t)L->ratio) * d, m->es, &failed);
		L->cs_kv = ds4_alloc(S * rows * c * d, sizeof(float), &failed);
		L->cs_g = ds4_alloc(S * rows * c * d, sizeof(float), &failed);
		if (L->ratio != DS4_CSA)
			continue;
		L->idx = ds4_alloc(S * (C / DS4_CSA) * dI, m->es, &failed);
		L->is_kv = ds4_alloc(S * 2 * DS4_CSA * 2 * dI, sizeof(float), &failed);
		L->is_g = ds4_alloc(S * 2 * DS4_CSA * 2 * dI, sizeof(float), &failed);
	}
	if (failed) {
		log_error(
		    "%s: cannot allocate the deepseek4 caches (%zu sequences x %zu positions)",
		    gguf_path(m->env->g), S, C);
		return ERR_NOMEM;
	}
	return 0;
}

static int ds4_alloc_scratch(struct ds4 *m)
{
	const struct ds4_hparams *hp = &m->hp;
	struct ds4_scratch *s = &m->s;
	const size_t B = (size_t)m->n_batch, D = (size_t)hp->n_embd, H = (size_t)hp->n_head;
	const size_t d = (size_t)hp->head_dim, dI = (size_t)hp->idx_dim;
	const size_t HI = (size_t)hp->idx_heads, E = (size_t)hp->n_expert;
	const size_t k = (size_t)(m->slots > 0 ? m->slots : 1);
	const size_t Fs = (size_t)hp->n_ff_exp * (size_t)hp->n_shared;
	const size_t cw = 2 * (d > dI ? d : dI);
	const size_t n_lid = (size_t)m->env->n_ctx / DS4_CSA + 1;
	const size_t n_seq = (size_t)m->env->n_seq;
	int failed = 0;

	s->X = ds4_alloc(B * DS4_HC * D, sizeof(float), &failed);
	s->Xn = ds4_alloc(B * DS4_HC * D, sizeof(float), &failed);
	s->flat = ds4_alloc(B * DS4_HC * D, sizeof(float), &failed);
	s->mix = ds4_alloc(B * DS4_MIX, sizeof(float), &failed);
	s->pre = ds4_alloc(B * DS4_HC, sizeof(float), &failed);
	s->post = ds4_alloc(B * DS4_HC, sizeof(float), &failed);
	s->comb = ds4_alloc(B * DS4_HC * DS4_HC, sizeof(float), &failed);
	s->y = ds4_alloc(B * D, sizeof(float), &failed);
	s->h = ds4_alloc(B * D, sizeof(float), &failed);
	s->qr = ds4_alloc(B * (size_t)hp->q_lora, sizeof(float), &failed);
	s->q = ds4_alloc(B * H * d, sizeof(float), &failed);
	s->kv = ds4_alloc(B * d, sizeof(float), &failed);
	s->o = ds4_alloc(B * H * d, sizeof(float), &failed);
	s->z = ds4_alloc(B * (size_t)hp->o_groups * (size_t)hp->o_lora, sizeof(float), &failed);
	s->out = ds4_alloc(B * D, sizeof(float), &failed);
	s->ca = ds4_alloc(B * cw, sizeof(float), &failed);
	s->cg = ds4_alloc(B * cw, sizeof(float), &failed);
	s->iq = ds4_alloc(B * HI * dI, sizeof(float), &failed);
	s->iw = ds4_alloc(B * HI, sizeof(float), &failed);
	s->iscore = ds4_alloc(B * n_lid, sizeof(float), &failed);
	s->isel = ds4_alloc(B * (size_t)hp->idx_topk, sizeof(int32_t), &failed);
	s->nsel = ds4_alloc(B, sizeof(int32_t), &failed);
	s->cell = ds4_alloc(B * (size_t)m->max_keys, sizeof(int32_t), &failed);
	s->krow = ds4_alloc(B * (size_t)m->max_keys, sizeof(void *), &failed);
	s->nkeys = ds4_alloc(B, sizeof(int32_t), &failed);
	s->kernel = ds4_alloc(B, sizeof(int), &failed);
	s->seq_tok = ds4_alloc(n_seq, sizeof(int32_t), &failed);
	s->seq_maxpos = ds4_alloc(n_seq, sizeof(int32_t), &failed);
	s->router = ds4_alloc(B * E, sizeof(float), &failed);
	s->sel = ds4_alloc(route_scratch_bytes(&m->rule), 1, &failed);
	s->ids = ds4_alloc(B * k, sizeof(int32_t), &failed);
	s->weights = ds4_alloc(B * k, sizeof(float), &failed);
	s->exp_out = ds4_alloc(B * k * D, sizeof(float), &failed);
	s->moe = ds4_alloc(B * D, sizeof(float), &failed);
	s->gate = ds4_alloc(B * Fs, sizeof(float), &failed);
	s->up = ds4_alloc(B * Fs, sizeof(float), &failed);
	s->ent = ds4_alloc(2 * DS4_HCA * cw, sizeof(float), &failed);
	s->sub_token = ds4_alloc(B, sizeof(int32_t), &failed);
	s->sub_pos = ds4_alloc(B, sizeof(int32_t), &failed);
	s->sub_seq = ds4_alloc(B, sizeof(int32_t), &failed);
	const int nth = m->env->pool ? pool_size(m->env->pool) : 1;
	s->ascr_n = attn_gather_scratch_floats((int)H, (int)d);
	s->ascr = ds4_alloc((size_t)(nth > 0 ? nth : 1) * s->ascr_n, sizeof(float), &failed);
	int has_csa = 0;
	for (int il = 0; il < hp->n_layer; il++)
		has_csa |= m->layers[il].ratio == DS4_CSA;
	if (has_csa)
		s->ikf = ds4_alloc((size_t)(nth > 0 ? nth : 1) * (n_lid - 1) * dI, sizeof(float),
				   &failed);
	/* widest matmul input: 4D (hc), H d (wo_a input rows are narrower), Fs, Q, G R */
	size_t n_in = DS4_HC * D;
	const size_t cand[] = {H * d, Fs, (size_t)hp->q_lora,
			       (size_t)hp->o_groups * (size_t)hp->o_lora};
	for (size_t i = 0; i < sizeof(cand) / sizeof(cand[0]); i++)
		if (cand[i] > n_in)
			n_in = cand[i];
	s->mm = ds4_alloc(ops_matmul_scratch((int64_t)n_in, (int64_t)B), 1, &failed);
	if (failed) {
		log_error("%s: cannot allocate deepseek4 activation buffers for %zu tokens",
			  gguf_path(m->env->g), B);
		return ERR_NOMEM;
	}
	return 0;
}

static int ds4_load(const struct arch_env *env, struct model_info *info, void **state)
{
	int rc = 0;
	struct ds4 *m = NULL;
	*state = NULL;

	if (env->n_batch < 1 || env->n_ctx < 1 || env->n_seq < 1) {
		log_error("%s: invalid batch/context/sequence sizes", gguf_path(env->g));
		return ERR_CONFIG;
	}
	m = calloc(1, sizeof(*m));
	if (!m)
		return ERR_NOMEM;
	m->env = env;
	m->n_batch = env->n_batch;
	m->kv_f32 = env->kv_f32 != 0;
	m->es = m->kv_f32 ? sizeof(float) : sizeof(uint16_t);
	struct ds4_hparams *hp = &m->hp;
	if ((rc = ds4_load_hparams(m)))
		goto out;

	hp->n_vocab = 0;
	if ((rc = arch_vocab(env, &hp->n_vocab)))
		goto out;
	int v = hp->n_vocab;
	if ((rc = ds4_u32(env, "vocab_size", 0, (uint32_t)v, 1, INT32_MAX, &v)))
		goto out;
	if (v != hp->n_vocab) {
		log_error("%s: %s.vocab_size = %d but token_embd.weight has %d rows",
			  gguf_path(env->g), DS4_ARCH, v, hp->n_vocab);
		rc = ERR_FORMAT;
		goto out;
	}
	const int64_t D = hp->n_embd;
	if ((rc = arch_tensor(env, &m->tok_embd, D, hp->n_vocab, 0, "token_embd.weight")) ||
	    (rc = ds4_check_type(env, m->tok_embd, KERN_F16)) ||
	    (rc = arch_tensor(env, &m->output, D, hp->n_vocab, 0, "output.weight")) ||
	    (rc = ds4_check_type(env, m->output, KERN_F16)) ||
	    (rc = arch_tensor(env, &m->output_norm, D, 0, 0, "output_norm.weight")) ||
	    (rc = ds4_check_type(env, m->output_norm, KERN_F32)) ||
	    (rc = arch_tensor(env, &m->hc_head_fn, DS4_HC * D, DS4_HC, 0, "output_hc_fn.weight")) ||
	    (rc = ds4_check_type(env, m->hc_head_fn, KERN_F32)) ||
	    (rc = arch_tensor(env, &m->hc_head_base, DS4_HC, 0, 0, "output_hc_base.weight")) ||
	    (rc = ds4_check_type(env, m->hc_head_base, KERN_F32)) ||
	    (rc = arch_tensor(env, &m->hc_head_scale, 1, 0, 0, "output_hc_scale.weight")) ||
	    (rc = ds4_check_type(env, m->hc_head_scale, KERN_F32)))
		goto out;

	m->layers = calloc((size_t)hp->n_layer, sizeof(*m->layers));
	if (!m->layers) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int il = 0; il < hp->n_layer; il++)
		if ((rc = ds4_load_layer(m, il)))
			goto out;

	m->rule = (struct route_rule){
	    .n_expert = hp->n_expert,
	    .k = hp->n_expert_used,
	    .gating = ROUTE_GATING_SQRT_SOFTPLUS,
	    .n_group = 0,
	    .n_group_used = 0,
	    .norm = hp->weights_norm,
	    .norm_min = DS4_NORM_MIN,
	    .scale = hp->weights_scale,
	};
	if ((rc = route_check(&m->rule, env->route, gguf_path(env->g))))
		goto out;
	m->slots = route_slots(&m->rule, env->route);
	if (m->slots < hp->n_expert_used)
		m->slots = hp->n_expert_used; /* hash layers always use k */

	/* the window ring holds the last W rows plus a whole micro-batch */
	m->ring = hp->window + m->n_batch;
	if (m->ring > env->n_ctx)
		m->ring = env->n_ctx;
	int comp_max = hp->idx_topk;
	if (env->n_ctx / DS4_HCA > comp_max)
		comp_max = env->n_ctx / DS4_HCA;
	m->max_keys = hp->window + comp_max;
	if ((rc = ds4_alloc_caches(m)) || (rc = ds4_alloc_scratch(m)))
		goto out;

	info->n_vocab = hp->n_vocab;
	info->n_embd = hp->n_embd;
	info->n_layer = hp->n_layer;
	info->n_ctx_train = hp->n_ctx_train;
	memset(&info->moe, 0, sizeof(info->moe));
	info->moe.n_layer = hp->n_layer;
	info->moe.n_embd = hp->n_embd;
	info->moe.n_ff_exp = hp->n_ff_exp;
	info->moe.n_expert = hp->n_expert;
	info->moe.n_expert_used = hp->n_expert_used;
	info->moe.act = MOE_ACT_SWIGLU_CLAMP;
	info->moe.has_bias = 0;
	for (int il = 0; il < hp->n_layer; il++) {
		info->moe.layer_moe[il] = 1;
		info->moe.act_limit[il] = hp->lim_exp[il];
	}
out:
	if (rc)
		ds4_destroy((void **)&m);
	*state = m;
	return rc;
}

static void ds4_reset_seq(void *state, int seq)
{
	/* Nothing else to clear: a sequence restarts at position 0, and every
	 * row a query reads (window rows, entries j < (pos + 1) / ratio,
	 * compressor rows of blocks >= 0) is written again before it is read. */
	struct ds4 *m = state;
	attn_remote_forget(m->idx_shipped, m->hp.n_layer, m->env->n_seq, seq, m->remote,
			   m->remote_self);
}

/* The indexer keys' pages go to n_hosts KV hosts (attn_remote_ops' idx_ship
 * and idx_submit): pages of kv_page / 4 entries, striped over kv_shards
 * chains as attention pages are (0: none).  No page counts as shipped any
 * more: after a change of hosts every sequence is reset and computed again
 * (the local copies of shipped pages are gone).  An F32 cache stays here
 * (logged): pages travel as F16. */
static int ds4_kv_hosts(void *state, const struct attn_remote_ops *ops, void *self, int n_hosts)
{
	struct ds4 *m = state;
	const struct ds4_hparams *hp = &m->hp;
	const int V = m->env->kv_shards, P = m->env->kv_page, S = m->env->n_seq;
	if (n_hosts == 0) {
		m->remote = NULL;
		m->n_hosts = 0;
		return 0;
	}
	int csa = 0;
	for (int il = 0; il < hp->n_layer; il++)
		csa += m->layers[il].ratio == DS4_CSA;
	if (!csa || m->kv_f32) {
		log_warn("%s: deepseek4 keeps its KV on the coordinator: %s", gguf_path(m->env->g),
			 m->kv_f32 ? "the KV hosts hold F16 indexer keys, the cache is F32"
				   : "no layer has an indexer");
		return 0;
	}
	if (!ops || !ops->idx_ship || !ops->idx_submit || V <= 0 || n_hosts < 0 || n_hosts > V ||
	    (n_hosts & (n_hosts - 1)) || V % n_hosts || P <= 0 || P % ATTN_TILE_KV) {
		log_error("deepseek4: %d KV hosts for %d chains of pages of %d positions: need "
			  "--kv-shards, a power of two of hosts dividing the chains and pages of a "
			  "multiple of %d positions",
			  n_hosts, V, P, ATTN_TILE_KV);
		return ERR_CONFIG;
	}
	const int E = P / INDEXER_RATIO, max_page = m->env->n_ctx / INDEXER_RATIO / E;
	const uint64_t page_bytes =
	    (uint64_t)E * (uint64_t)hp->idx_dim * sizeof(uint16_t) + sizeof(struct attn_page);
	for (int h = 0; h < n_hosts; h++) {
		uint64_t pages = 0;
		for (int i = 0; i < max_page; i++)
			pages += attn_page_host(i, V, n_hosts) == h;
		const uint64_t need = (pages * page_bytes + 32) * (uint64_t)csa * (uint64_t)S;
		const uint64_t have = ops->budget(self, h);
		if (need > have) {
			log_error("KV host %d would hold up to %llu bytes of indexer pages (%d "
				  "slot(s) of %d positions), but offers %llu (moefleet-worker "
				  "--kv-memory): fewer or shorter slots, or more hosts",
				  h, (unsigned long long)need, S, m->env->n_ctx,
				  (unsigned long long)have);
			return ERR_CONFIG;
		}
	}
	const size_t n = 2 * (size_t)hp->n_layer * (size_t)S;
	if (!m->idx_shipped && !(m->idx_shipped = calloc(n, sizeof(int32_t))))
		return ERR_NOMEM;
	/* the hosts left drop what they still hold of the sequences, which are
	 * computed again */
	for (int s = 0; s < S; s++)
		attn_remote_forget(m->idx_shipped, hp->n_layer, S, s, ops, self);
	m->remote = ops;
	m->remote_self = self;
	m->n_hosts = n_hosts;
	m->n_shard = V;
	m->idx_page = E;
	return 0;
}

/* ------------------------------------------------------------------ helpers */

/* The cos/sin pairs of RoPE (ggml_rope_ext, adjacent pairs) at pos for the
 * r->n_dims / 2 pairs, magnitude factor included. */
static void ds4_rope_cs(const struct ops_rope *r, int64_t pos, float *cs, float *sn)
{
	const int n = r->n_dims;
	const float theta_scale = powf(r->freq_base, -2.0f / (float)n);
	float corr0 = 0.0f, corr1 = 0.0f;
	if (r->ext_factor != 0.0f) {
		const float k = 2.0f * logf(r->freq_base);
		const float lo =
		    (float)n *
		    logf((float)r->n_ctx_orig / (r->beta_fast * 2.0f * 3.14159265358979323846f)) /
		    k;
		const float hi =
		    (float)n *
		    logf((float)r->n_ctx_orig / (r->beta_slow * 2.0f * 3.14159265358979323846f)) /
		    k;
		corr0 = fmaxf(0.0f, floorf(lo));
		corr1 = fminf((float)(n - 1), ceilf(hi));
	}
	float theta_extrap = (float)pos;
	for (int i0 = 0; i0 < n; i0 += 2) {
		float theta = r->freq_scale * theta_extrap;
		float mscale = r->attn_factor;
		if (r->ext_factor != 0.0f) {
			const float y = ((float)(i0 / 2) - corr0) / fmaxf(0.001f, corr1 - corr0);
			const float ramp = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * r->ext_factor;
			theta = theta * (1.0f - ramp) + theta_extrap * ramp;
			mscale *= 1.0f + 0.1f * logf(1.0f / r->freq_scale);
		}
		cs[i0 / 2] = cosf(theta) * mscale;
		sn[i0 / 2] = sinf(theta) * mscale;
		theta_extrap *= theta_scale;
	}
}

/* Rotates x[0..n) by the pairs of ds4_rope_cs(); inverse = 1 rotates back
 * by the same angles (ggml_rope_ext_back: sine negated). */
static void ds4_rope_apply(const float *cs, const float *sn, float *x, int n, int inverse)
{
	for (int i0 = 0; i0 < n; i0 += 2) {
		const float c = cs[i0 / 2];
		const float s = sn[i0 / 2] * (inverse ? -1.0f : 1.0f);
		const float x0 = x[i0], x1 = x[i0 + 1];
		x[i0] = x0 * c - x1 * s;
		x[i0 + 1] = x0 * s + x1 * c;
	}
}

/* RoPE of x[0..r) at pos (see ds4_rope_cs). */
static void ds4_rope(const struct ops_rope *r, float *x, int64_t pos, int inverse)
{
	float cs[ATTN_MAX_HEAD_DIM / 2], sn[ATTN_MAX_HEAD_DIM / 2];
	ds4_rope_cs(r, pos, cs, sn);
	ds4_rope_apply(cs, sn, x, r->n_dims, inverse);
}

/* Walsh-Hadamard transform of each block of nb values of x[n] (ggml's fwht:
 * scaled by 1/sqrt(nb) first, then butterflies of growing span). */
static void ds4_hadamard(float *x, int n, int nb)
{
	const float scale = 1.0f / sqrtf((float)nb);
	for (int b = 0; b < n; b += nb) {
		float *v = x + b;
		for (int j = 0; j < nb; j++)
			v[j] *= scale;
		for (int len = 1; len < nb; len <<= 1)
			for (int i = 0; i < nb; i += 2 * len)
				for (int j = 0; j < len; j++) {
					const float u = v[i + j], w = v[i + len + j];
					v[i + j] = u + w;
					v[i + len + j] = u - w;
				}
	}
}

/* Stores n floats as a cache row (F16 bits or F32). */
static void ds4_put(const struct ds4 *m, void *dst, const float *x, int n)
{
	if (m->kv_f32) {
		memcpy(dst, x, (size_t)n * sizeof(float));
		return;
	}
	uint16_t *h = dst;
	for (int i = 0; i < n; i++)
		h[i] = kern_f32_to_f16(x[i]);
}

static void ds4_get(const struct ds4 *m, const void *src, float *x, int n)
{
	if (m->kv_f32) {
		memcpy(x, src, (size_t)n * sizeof(float));
		return;
	}
	const uint16_t *h = src;
	for (int i = 0; i < n; i++)
		x[i] = kern_f16_to_f32(h[i]);
}

static inline uint8_t *ds4_raw_row(const struct ds4 *m, const struct ds4_layer *L, int seq, int pos)
{
	const size_t row = (size_t)seq * (size_t)m->ring + (size_t)(pos % m->ring);
	return L->raw + row * (size_t)m->hp.head_dim * m->es;
}

static inline uint8_t *ds4_comp_row(const struct ds4 *m, const struct ds4_layer *L, int seq, int j)
{
	const size_t row = (size_t)seq * (size_t)(m->env->n_ctx / L->ratio) + (size_t)j;
	return L->comp + row * (size_t)m->hp.head_dim * m->es;
}

static inline uint8_t *ds4_idx_row(const struct ds4 *m, const struct ds4_layer *L, int seq, int j)
{
	const size_t row = (size_t)seq * (size_t)(m->env->n_ctx / DS4_CSA) + (size_t)j;
	return L->idx + row * (size_t)m->hp.idx_dim * m->es;
}

/* ------------------------------------------------------ hyper-connections */

/* Row-parallel work: fn(m, b, t, arg) for every token t of b, spread over
 * the pool (a single row runs on the calling thread). */
typedef void (*ds4_row_fn)(struct ds4 *m, const model_batch *b, int t, const void *arg);

struct ds4_rows_job {
	struct ds4 *m;
	const model_batch *b;
	ds4_row_fn fn;
	const void *arg;
};

static void ds4_rows_run(void *ctx, int ith, int nth)
{
	const struct ds4_rows_job *jb = ctx;
	int64_t lo, hi;
	pool_split(jb->b->n_tokens, ith, nth, 1, &lo, &hi);
	for (int64_t t = lo; t < hi; t++)
		jb->fn(jb->m, jb->b, (int)t, jb->arg);
}

static void ds4_for_rows(struct ds4 *m, const model_batch *b, ds4_row_fn fn, const void *arg)
{
	if (b->n_tokens == 1) {
		fn(m, b, 0, arg);
		return;
	}
	struct ds4_rows_job jb = {.m = m, .b = b, .fn = fn, .arg = arg};
	pool_run(m->env->pool, ds4_rows_run, &jb);
}

/* flat[t] = rmsnorm(X[t]) over the 4 D stream values */
static void ds4_row_flat(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)b, (void)arg;
	const int64_t W = DS4_HC * (int64_t)m->hp.n_embd;
	ops_rmsnorm(m->s.flat + (size_t)t * W, m->s.X + (size_t)t * W, NULL, W, m->hp.eps);
}

struct ds4_hc_arg {
	const float *base, *sc; /* hc base [24], scale [3] */
	const float *norm;	/* the sub-layer's input norm */
};

/* Token t's mixes -> pre, post, Sinkhorn comb; y = sum_a pre[a] X[a];
 * h = rmsnorm(y) * norm. */
DS4_HOT static void ds4_row_hc_pre(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)b;
	const struct ds4_hc_arg *ha = arg;
	struct ds4_scratch *s = &m->s;
	const int64_t D = m->hp.n_embd, W = DS4_HC * D;
	const float *base = ha->base, *sc = ha->sc;
	const float eps = m->hp.hc_eps;
	const float *mx = s->mix + (size_t)t * DS4_MIX;
	float *pre = s->pre + (size_t)t * DS4_HC, *post = s->post + (size_t)t * DS4_HC;
	float *C = s->comb + (size_t)t * DS4_HC * DS4_HC; /* C[a * 4 + c] */
	for (int i = 0; i < DS4_HC; i++) {
		const float a = mx[i] * sc[0] + base[i];
		pre[i] = 1.0f / (1.0f + expf(-a)) + eps;
		const float b = mx[DS4_HC + i] * sc[1] + base[DS4_HC + i];
		post[i] = 1.0f / (1.0f + expf(-b)) * 2.0f;
	}
	/* per source a: softmax over destinations, + eps */
	for (int a = 0; a < DS4_HC; a++) {
		float *row = C + a * DS4_HC, mxv = -INFINITY, sum = 0.0f;
		for (int c = 0; c < DS4_HC; c++) {
			const int idx = 2 * DS4_HC + a * DS4_HC + c;
			row[c] = fmaf(mx[idx], sc[2], base[idx]);
			mxv = fmaxf(mxv, row[c]);
		}
		for (int c = 0; c < DS4_HC; c++) {
			row[c] = expf(row[c] - mxv);
			sum += row[c];
		}
		const float inv = 1.0f / sum;
		for (int c = 0; c < DS4_HC; c++)
			row[c] = fmaf(row[c], inv, eps);
	}
	/* Sinkhorn: columns, then (rows, columns) iters - 1 times */
	for (int it = 0; it < m->hp.sinkhorn_iters; it++) {
		if (it > 0)
			for (int a = 0; a < DS4_HC; a++) {
				float sum = eps;
				for (int c = 0; c < DS4_HC; c++)
					sum += C[a * DS4_HC + c];
				const float inv = 1.0f / sum;
				for (int c = 0; c < DS4_HC; c++)
					C[a * DS4_HC + c] *= inv;
			}
		for (int c = 0; c < DS4_HC; c++) {
			float sum = eps;
			for (int a = 0; a < DS4_HC; a++)
				sum += C[a * DS4_HC + c];
			const float inv = 1.0f / sum;
			for (int a = 0; a < DS4_HC; a++)
				C[a * DS4_HC + c] *= inv;
		}
	}
	/* y = sum_a pre[a] X[a] */
	const float *X = s->X + (size_t)t * W;
	float *y = s->y + (size_t)t * D;
	for (int64_t i = 0; i < D; i++) {
		float acc = 0.0f;
		for (int a = 0; a < DS4_HC; a++)
			acc = fmaf(X[a * D + i], pre[a], acc);
		y[i] = acc;
	}
	ops_rmsnorm(s->h + (size_t)t * D, y, ha->norm, D, m->hp.eps);
}

/* mHC pre for the batch: mix = fn · rmsnorm(flat X); pre, post, Sinkhorn
 * comb; y = sum_a pre[a] X[a] (ggml's fused dsv4_hc_comb / dsv4_hc_pre
 * kernels); then the sub-layer's input h = rmsnorm(y) * norm. */
static void ds4_hc_pre(struct ds4 *m, const model_batch *b, const gguf_tensor *fn,
		       const gguf_tensor *base_t, const gguf_tensor *scale_t,
		       const gguf_tensor *norm)
{
	struct ds4_scratch *s = &m->s;
	const int64_t W = DS4_HC * (int64_t)m->hp.n_embd;
	ds4_for_rows(m, b, ds4_row_flat, NULL);
	/* (n, 4D) @ (4D, 24) -> (n, 24) */
	ops_matmul(m->env->pool, fn, s->flat, W, b->n_tokens, s->mix, DS4_MIX, s->mm);
	const struct ds4_hc_arg ha = {ds4_f32(base_t), ds4_f32(scale_t), ds4_f32(norm)};
	ds4_for_rows(m, b, ds4_row_hc_pre, &ha);
}

/* X'[c] = post[c] * out + sum_a C[a][c] X[a] for token t (into Xn) */
DS4_HOT static void ds4_row_hc_post(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)b, (void)arg;
	struct ds4_scratch *s = &m->s;
	const int64_t D = m->hp.n_embd, W = DS4_HC * D;
	const float *X = s->X + (size_t)t * W, *o = s->out + (size_t)t * D;
	const float *post = s->post + (size_t)t * DS4_HC;
	const float *C = s->comb + (size_t)t * DS4_HC * DS4_HC;
	float *Xn = s->Xn + (size_t)t * W;
	for (int c = 0; c < DS4_HC; c++) {
		const float c0 = C[0 * DS4_HC + c], c1 = C[1 * DS4_HC + c];
		const float c2 = C[2 * DS4_HC + c], c3 = C[3 * DS4_HC + c];
		for (int64_t i = 0; i < D; i++) {
			float acc = o[i] * post[c];
			acc = fmaf(X[0 * D + i], c0, acc);
			acc = fmaf(X[1 * D + i], c1, acc);
			acc = fmaf(X[2 * D + i], c2, acc);
			acc = fmaf(X[3 * D + i], c3, acc);
			Xn[c * D + i] = acc;
		}
	}
}

/* mHC post for the batch: X[c] = post[c] * out + sum_a C[a][c] X[a]. */
static void ds4_hc_post(struct ds4 *m, const model_batch *b)
{
	struct ds4_scratch *s = &m->s;
	ds4_for_rows(m, b, ds4_row_hc_post, NULL);
	float *tmp = s->X;
	s->X = s->Xn;
	s->Xn = tmp;
}

/* ------------------------------------------------------------ compressors */

/* One compressed entry of width w from a rolling state (rows [n_rows][c w]):
 * ratio 4 (overlapping): candidates = first half-channels of block j-1 (none
 * for j = 0) and second half-channels of block j; ratio 128: block j.  Then
 * rmsnorm * norm and RoPE of the last r dims at position j * ratio. */
static void ds4_compress_entry(struct ds4 *m, int ratio, int w, const float *kv, const float *g,
			       int n_rows, int j, const float *norm, float *e)
{
	float *sc = m->s.ent;		    /* [2 ratio] scores of one channel */
	float *va = m->s.ent + 2 * DS4_HCA; /* [2 ratio] values */
	const int over = ratio == DS4_CSA;
	const int cw = over ? 2 * w : w;
	for (int ch = 0; ch < w; ch++) {
		int nc = 0;
		if (over) {
			for (int u = 0; u < ratio; u++, nc++) {
				const int p = (j - 1) * ratio + u;
				if (j == 0) {
					sc[nc] = -INFINITY;
					va[nc] = 0.0f;
					continue;
				}
				const size_t r = (size_t)(p % n_rows) * (size_t)cw;
				sc[nc] = g[r + (size_t)ch];
				va[nc] = kv[r + (size_t)ch];
			}
			for (int u = 0; u < ratio; u++, nc++) {
				const size_t r = (size_t)((j * ratio + u) % n_rows) * (size_t)cw;
				sc[nc] = g[r + (size_t)w + (size_t)ch];
				va[nc] = kv[r + (size_t)w + (size_t)ch];
			}
		} else {
			for (int u = 0; u < ratio; u++, nc++) {
				const size_t r = (size_t)((j * ratio + u) % n_rows) * (size_t)cw;
				sc[nc] = g[r + (size_t)ch];
				va[nc] = kv[r + (size_t)ch];
			}
		}
		attn_soft_max_row(sc, nc);
		double acc = 0.0;
		for (int u = 0; u < nc; u++)
			acc += (double)(va[u] * sc[u]);
		e[ch] = (float)acc;
	}
	ops_rmsnorm(e, e, norm, w, m->hp.eps);
	ds4_rope(&m->rope_comp, e + w - m->hp.n_rot, (int64_t)j * ratio, 0);
}

/* Runs one compressor over the batch: a = kv_w · x, g = gate_w · x + ape,
 * rows into the per-sequence state; completed blocks become entries that
 * emit() stores.  Tokens of a sequence come in position order. */
static void ds4_compressor(struct ds4 *m, int il, const model_batch *b, int is_idx)
{
	const struct ds4_hparams *hp = &m->hp;
	struct ds4_layer *L = &m->layers[il];
	struct ds4_scratch *s = &m->s;
	const int n = b->n_tokens;
	const int ratio = is_idx ? DS4_CSA : L->ratio;
	const int w = is_idx ? hp->idx_dim : hp->head_dim;
	const int cw = ratio == DS4_CSA ? 2 * w : w;
	const int n_rows = ratio == DS4_CSA ? 2 * DS4_CSA : DS4_HCA;
	const gguf_tensor *wkv = is_idx ? L->idx_kv : L->comp_kv;
	const gguf_tensor *wg = is_idx ? L->idx_gate : L->comp_gate;
	const float *ape = ds4_f32(is_idx ? L->idx_ape : L->comp_ape);
	const float *norm = ds4_f32(is_idx ? L->idx_norm : L->comp_norm);
	float *st_kv = is_idx ? L->is_kv : L->cs_kv, *st_g = is_idx ? L->is_g : L->cs_g;
	float *e = s->ent + 4 * DS4_HCA;

	/* (n, D) @ (D, cw) -> (n, cw), twice (the attention's compressor: done
	 * by the caller, with the layer's other projections of x) */
	if (is_idx) {
		const gguf_tensor *kg[2] = {wkv, wg};
		float *const kg_y[2] = {s->ca, s->cg};
		const int64_t kg_s[2] = {cw, cw};
		ops_matmul_multi(m->env->pool, 2, kg, s->h, hp->n_embd, n, kg_y, kg_s, s->mm);
	}
	for (int t = 0; t < n; t++) {
		const int seq = b->seq[t], pos = b->pos[t];
		const size_t base = (size_t)seq * (size_t)n_rows * (size_t)cw;
		float *rk = st_kv + base + (size_t)(pos % n_rows) * (size_t)cw;
		float *rg = st_g + base + (size_t)(pos % n_rows) * (size_t)cw;
		const float *ap = ape + (size_t)(pos % ratio) * (size_t)cw;
		for (int i = 0; i < cw; i++) {
			rk[i] = s->ca[(size_t)t * cw + (size_t)i];
			rg[i] = s->cg[(size_t)t * cw + (size_t)i] + ap[i];
		}
		if ((pos + 1) % ratio != 0)
			continue;
		const int j = pos / ratio;
		ds4_compress_entry(m, ratio, w, st_kv + base, st_g + base, n_rows, j, norm, e);
		if (is_idx) {
			ds4_hadamard(e, w, hp->idx_hadamard);
			ds4_put(m, ds4_idx_row(m, L, seq, j), e, w);
		} else {
			ds4_put(m, ds4_comp_row(m, L, seq, j), e, w);
		}
	}
}

/* ---------------------------------------------------------------- indexer */

/* libstdc++'s std::partial_sort selection (heap select) of the k best of
 * v[0..n) into idx[0..k), comparing by value descending, as ggml_top_k; the
 * tie-breaking among equal scores follows from the heap moves. */
static inline int ds4_better(const float *v, int32_t a, int32_t b)
{
	return v[a] > v[b];
}

static void ds4_adjust_heap(int32_t *h, int hole, int len, int32_t value, const float *v)
{
	const int top = hole;
	int child = hole;
	while (child < (len - 1) / 2) {
		child = 2 * (child + 1);
		if (ds4_better(v, h[child], h[child - 1]))
			child--;
		h[hole] = h[child];
		hole = child;
	}
	if ((len & 1) == 0 && child == (len - 2) / 2) {
		child = 2 * (child + 1);
		h[hole] = h[child - 1];
		hole = child - 1;
	}
	int parent = (hole - 1) / 2;
	while (hole > top && ds4_better(v, h[parent], value)) {
		h[hole] = h[parent];
		hole = parent;
		parent = (hole - 1) / 2;
	}
	h[hole] = value;
}

static void ds4_top_k(const float *v, int n, int k, int32_t *idx)
{
	for (int i = 0; i < k; i++)
		idx[i] = i;
	if (k >= 2)
		for (int parent = (k - 2) / 2;; parent--) {
			ds4_adjust_heap(idx, parent, k, idx[parent], v);
			if (parent == 0)
				break;
		}
	for (int i = k; i < n; i++)
		if (ds4_better(v, i, idx[0]))
			ds4_adjust_heap(idx, 0, k, i, v); /* pop: top leaves, i enters */
}

static int ds4_cmp_i32(const void *a, const void *b)
{
	const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
	return (x > y) - (x < y);
}

struct ds4_idx_job {
	struct ds4 *m;
	const struct ds4_layer *L;
	const model_batch *b;
};

/* Per token: scores of the visible indexer keys, top-k, sorted entry ids. */
static void ds4_indexer_run(void *ctx, int ith, int nth)
{
	struct ds4_idx_job *jb = ctx;
	struct ds4 *m = jb->m;
	const struct ds4_hparams *hp = &m->hp;
	struct ds4_scratch *s = &m->s;
	const int HI = hp->idx_heads, dI = hp->idx_dim;
	const size_t n_lid_max = (size_t)m->env->n_ctx / DS4_CSA + 1;
	/* the thread's F32 copy of one sequence's indexer keys [j][dI], converted
	 * once for all its tokens of that sequence */
	float *kf = s->ikf + (size_t)ith * (n_lid_max - 1) * (size_t)dI;
	int kf_seq = -1, kf_n = 0;
	int64_t lo, hi;
	pool_split(jb->b->n_tokens, ith, nth, 1, &lo, &hi);
	for (int64_t t = lo; t < hi; t++) {
		const int seq = jb->b->seq[t], pos = jb->b->pos[t];
		const int nvis = (pos + 1) / DS4_CSA;
		int32_t *sel = s->isel + (size_t)t * (size_t)hp->idx_topk;
		if (nvis <= hp->idx_topk) {
			for (int j = 0; j < nvis; j++)
				sel[j] = j;
			s->nsel[t] = nvis;
			continue;
		}
		/* llama.cpp's view: the longest sequence row of the batch, padded */
		int n_lid = (s->seq_maxpos[seq] + 1) / DS4_CSA;
		n_lid = (n_lid + 255) / 256 * 256;
		if ((size_t)n_lid > n_lid_max - 1)
			n_lid = (int)(n_lid_max - 1);
		if (n_lid < nvis)
			n_lid = nvis;
		float *sc = s->iscore + (size_t)t * n_lid_max;
		const float *q = s->iq + (size_t)t * HI * dI, *w = s->iw + (size_t)t * HI;
		/* entries before j0 are in pages on KV hosts: their scores are
		 * in sc already */
		const int j0 = m->remote ? indexer_row_pages(pos, m->idx_page) * m->idx_page : 0;
		if (seq != kf_seq) {
			kf_seq = seq;
			kf_n = 0;
		}
		if (kf_n < j0)
			kf_n = j0;
		for (; kf_n < nvis; kf_n++)
			ds4_get(m, ds4_idx_row(m, jb->L, seq, kf_n), kf + (size_t)kf_n * dI, dI);
		indexer_score(HI, dI, q, w, kf + (size_t)j0 * dI, nvis - j0, sc + j0);
		for (int j = nvis; j < n_lid; j++)
			sc[j] = -INFINITY;
		const int k = hp->idx_topk < n_lid ? hp->idx_topk : n_lid;
		ds4_top_k(sc, n_lid, k, sel);
		int ns = 0;
		for (int i = 0; i < k; i++)
			if (sel[i] < nvis)
				sel[ns++] = sel[i];
		qsort(sel, (size_t)ns, sizeof(int32_t), ds4_cmp_i32);
		s->nsel[t] = ns;
	}
}

/* Token t's indexer queries: RoPE at pos (one cos/sin table), Hadamard */
static void ds4_row_iq(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)arg;
	const int HI = m->hp.idx_heads, dI = m->hp.idx_dim;
	float cs[ATTN_MAX_HEAD_DIM / 2], sn[ATTN_MAX_HEAD_DIM / 2];
	ds4_rope_cs(&m->rope_comp, b->pos[t], cs, sn);
	for (int h = 0; h < HI; h++) {
		float *q = m->s.iq + ((size_t)t * (size_t)HI + (size_t)h) * (size_t)dI;
		ds4_rope_apply(cs, sn, q + dI - m->hp.n_rot, m->hp.n_rot, 0);
		ds4_hadamard(q, dI, m->hp.idx_hadamard);
	}
}

/* Ships the indexer pages of the batch's sequences completed since the last
 * call to their hosts. */
static int ds4_idx_ship(struct ds4 *m, int il, const model_batch *b)
{
	const int E = m->idx_page, S = m->env->n_seq;
	const struct ds4_layer *L = &m->layers[il];
	for (int t = 0; t < b->n_tokens; t++) {
		const int seq = b->seq[t];
		int32_t *done = &m->idx_shipped[(size_t)il * (size_t)S + (size_t)seq];
		const int complete = indexer_row_pages(m->s.seq_maxpos[seq], E);
		for (; *done < complete; (*done)++) {
			const int rc = m->remote->idx_ship(
			    m->remote_self, attn_page_host(*done, m->n_shard, m->n_hosts), il, seq,
			    *done, E, m->hp.idx_dim,
			    (const uint16_t *)ds4_idx_row(m, L, seq, *done * E));
			if (rc)
				return rc;
		}
	}
	return 0;
}

/* Gives the memory of the indexer pages shipped since the last call back to
 * the system (the whole memory pages inside them): the coordinator reads
 * only each row's page in progress. */
static void ds4_idx_release(struct ds4 *m, int il, const model_batch *b)
{
	const long pg = sysconf(_SC_PAGESIZE);
	const size_t S = (size_t)m->env->n_seq, n_ls = (size_t)m->hp.n_layer * S;
	const struct ds4_layer *L = &m->layers[il];
	for (int t = 0; t < b->n_tokens && pg > 0; t++) {
		const size_t ls = (size_t)il * S + (size_t)b->seq[t];
		const int from = m->idx_shipped[n_ls + ls] * m->idx_page;
		const int to = m->idx_shipped[ls] * m->idx_page;
		m->idx_shipped[n_ls + ls] = m->idx_shipped[ls];
		if (to <= from)
			continue;
		const uintptr_t a = (uintptr_t)ds4_idx_row(m, L, b->seq[t], from);
		const uintptr_t z = (uintptr_t)ds4_idx_row(m, L, b->seq[t], to);
		const uintptr_t a1 = (a + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
		const uintptr_t z1 = z & ~((uintptr_t)pg - 1);
		if (z1 > a1)
			madvise((void *)a1, z1 - a1, MADV_DONTNEED);
	}
}

/* The scores of the rows' complete indexer pages, from the KV hosts, into
 * s->iscore (row t's entry j at t * (n_ctx / 4 + 1) + j). */
static int ds4_idx_remote(struct ds4 *m, int il, const model_batch *b)
{
	const struct ds4_hparams *hp = &m->hp;
	struct ds4_scratch *s = &m->s;
	const int E = m->idx_page, R = m->n_hosts, per = m->n_shard / R;
	const size_t n_lid_max = (size_t)m->env->n_ctx / DS4_CSA + 1;
	int rc = ds4_idx_ship(m, il, b);
	if (rc)
		return rc;
	const float *parts[ATTN_MAX_HOSTS];
	int asked = 0;
	for (int h = 0; h < R; h++) {
		parts[h] = NULL;
		/* a host is asked when a row that selects sees one of its pages */
		int need = 0;
		for (int t = 0; t < b->n_tokens && !need; t++)
			need = (b->pos[t] + 1) / DS4_CSA > hp->idx_topk &&
			       indexer_row_pages(b->pos[t], E) > h * per;
		if (need && (rc = m->remote->idx_submit(m->remote_self, h, il, hp->idx_heads,
							hp->idx_dim, E, m->n_shard, h * per,
							(h + 1) * per, b, s->iq, s->iw)))
			return rc;
		asked += need;
	}
	if (!asked)
		return 0;
	if ((rc = m->remote->collect(m->remote_self, il, parts)))
		return rc;
	/* each host's scores: row by row, its pages in page order */
	size_t at[ATTN_MAX_HOSTS] = {0};
	for (int t = 0; t < b->n_tokens; t++) {
		float *sc = s->iscore + (size_t)t * n_lid_max;
		for (int i = 0; i < indexer_row_pages(b->pos[t], E); i++) {
			const int h = attn_page_host(i, m->n_shard, R);
			if (!parts[h])
				continue; /* no row that selects sees it */
			memcpy(sc + (size_t)i * (size_t)E, parts[h] + at[h],
			       (size_t)E * sizeof(float));
			at[h] += (size_t)E;
		}
	}
	return 0;
}

/* Indexer queries and weights for the batch, then the selection per token. */
static int ds4_indexer(struct ds4 *m, int il, const model_batch *b)
{
	const struct ds4_hparams *hp = &m->hp;
	const struct ds4_layer *L = &m->layers[il];
	struct ds4_scratch *s = &m->s;
	pool *p = m->env->pool;
	const int n = b->n_tokens, HI = hp->idx_heads, dI = hp->idx_dim;

	/* (n, Q) @ (Q, HI dI) -> (n, HI, dI): RoPE at pos, Hadamard */
	ops_matmul(p, L->idx_q_b, s->qr, hp->q_lora, n, s->iq, (int64_t)HI * dI, s->mm);
	ds4_for_rows(m, b, ds4_row_iq, NULL);
	/* (n, D) @ (D, HI) -> (n, HI), scaled */
	ops_matmul(p, L->idx_proj, s->h, hp->n_embd, n, s->iw, HI, s->mm);
	const float wscale = 1.0f / sqrtf((float)(dI * HI));
	for (int64_t i = 0; i < (int64_t)n * HI; i++)
		s->iw[i] *= wscale;
	if (m->remote) {
		int rc = ds4_idx_remote(m, il, b);
		if (rc)
			return rc;
	}
	struct ds4_idx_job jb = {.m = m, .L = L, .b = b};
	pool_run(p, ds4_indexer_run, &jb);
	if (m->remote)
		ds4_idx_release(m, il, b);
	return 0;
}

/* -------------------------------------------------------------- attention */

struct ds4_attn_job {
	struct ds4 *m;
	const struct ds4_layer *L;
	int n;
};

static void ds4_attn_run(void *ctx, int ith, int nth)
{
	struct ds4_attn_job *jb = ctx;
	struct ds4 *m = jb->m;
	struct ds4_scratch *s = &m->s;
	const int H = m->hp.n_head, d = m->hp.head_dim;
	const float scale = 1.0f / sqrtf((float)d);
	const float *sinks = ds4_f32(jb->L->sinks);
	int64_t lo, hi;
	/* units of (token, group of heads): all heads of a token share its key
	 * tiles; tokens are split into groups only to feed every thread */
	int G = (nth + jb->n - 1) / jb->n;
	if (G > H)
		G = H;
	const int hg = (H + G - 1) / G;
	G = (H + hg - 1) / hg;
	float *scr = s->ascr + (size_t)ith * s->ascr_n;
	pool_split((int64_t)jb->n * G, ith, nth, 1, &lo, &hi);
	for (int64_t r = lo; r < hi; r++) {
		const int t = (int)(r / G), h = (int)(r % G) * hg;
		const int nh = h + hg <= H ? hg : H - h;
		const struct attn_keys ks = {
		    .n = s->nkeys[t],
		    .cell = s->cell + (size_t)t * (size_t)m->max_keys,
		    .row = s->krow + (size_t)t * (size_t)m->max_keys,
		    .f32 = m->kv_f32,
		    .n_cells = s->kernel[t] >> 2,
		    .kernel = (enum attn_kernel)(s->kernel[t] & 3),
		};
		const size_t off = ((size_t)t * (size_t)H + (size_t)h) * (size_t)d;
		attn_gather_heads(&ks, nh, d, s->q + off, scale, sinks + h, scr, s->o + off);
	}
}

/* llama.cpp pads the cells of a KV view to 256 (at least 256). */
static inline int ds4_pad256(int n)
{
	n = (n + 255) / 256 * 256;
	return n < 256 ? 256 : n;
}

/* The keys each token attends to, in llama.cpp's view order, and its kernel. */
static void ds4_gather_keys(struct ds4 *m, const struct ds4_layer *L, const model_batch *b)
{
	struct ds4_scratch *s = &m->s;
	const int W = m->hp.window;
	for (int t = 0; t < b->n_tokens; t++) {
		const int seq = b->seq[t], pos = b->pos[t];
		int32_t *cell = s->cell + (size_t)t * (size_t)m->max_keys;
		const void **row = s->krow + (size_t)t * (size_t)m->max_keys;
		int nk = 0;
		const int n_raw = ds4_pad256(s->seq_maxpos[seq] + 1);
		for (int j = pos - W + 1 > 0 ? pos - W + 1 : 0; j <= pos; j++) {
			cell[nk] = j;
			row[nk++] = ds4_raw_row(m, L, seq, j);
		}
		int n_cells = n_raw;
		if (L->ratio) {
			const int nvis = (pos + 1) / L->ratio;
			n_cells += ds4_pad256((s->seq_maxpos[seq] + 1) / L->ratio);
			if (L->ratio == DS4_CSA) {
				const int32_t *sel = s->isel + (size_t)t * (size_t)m->hp.idx_topk;
				for (int i = 0; i < s->nsel[t]; i++) {
					cell[nk] = n_raw + sel[i];
					row[nk++] = ds4_comp_row(m, L, seq, sel[i]);
				}
			} else {
				for (int j = 0; j < nvis; j++) {
					cell[nk] = n_raw + j;
					row[nk++] = ds4_comp_row(m, L, seq, j);
				}
			}
		}
		s->nkeys[t] = nk;
		const int kern = attn_pick_kernel(s->seq_tok[seq], n_cells, m->hp.head_dim);
		s->kernel[t] = (n_cells << 2) | kern;
	}
}

/* kv[t] = rmsnorm(kv[t]) * kv_norm, RoPE, stored as the window cache row */
static void ds4_row_kv(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	const struct ds4_layer *L = arg;
	const int d = m->hp.head_dim, nope = d - m->hp.n_rot;
	float *kv = m->s.kv + (size_t)t * (size_t)d;
	ops_rmsnorm(kv, kv, ds4_f32(L->kv_norm), d, m->hp.eps);
	ds4_rope(L->ratio ? &m->rope_comp : &m->rope_raw, kv + nope, b->pos[t], 0);
	ds4_put(m, ds4_raw_row(m, L, b->seq[t], b->pos[t]), kv, d);
}

/* qr[t] = rmsnorm(qr[t]) * q_a_norm */
static void ds4_row_qr(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)b;
	const struct ds4_layer *L = arg;
	const int Q = m->hp.q_lora;
	float *qr = m->s.qr + (size_t)t * (size_t)Q;
	ops_rmsnorm(qr, qr, ds4_f32(L->q_a_norm), Q, m->hp.eps);
}

/* Every head of q[t] (inverse = 0) or o[t] (inverse = 1): for q a rmsnorm
 * without weight, then RoPE of the last r dims by the token's angles. */
static void ds4_heads_rope(struct ds4 *m, const model_batch *b, int t, const struct ds4_layer *L,
			   float *x, int inverse)
{
	const int H = m->hp.n_head, d = m->hp.head_dim, nope = d - m->hp.n_rot;
	float cs[ATTN_MAX_HEAD_DIM / 2], sn[ATTN_MAX_HEAD_DIM / 2];
	ds4_rope_cs(L->ratio ? &m->rope_comp : &m->rope_raw, b->pos[t], cs, sn);
	for (int h = 0; h < H; h++) {
		float *xh = x + ((size_t)t * (size_t)H + (size_t)h) * (size_t)d;
		if (!inverse)
			ops_rmsnorm(xh, xh, NULL, d, m->hp.eps);
		ds4_rope_apply(cs, sn, xh + nope, m->hp.n_rot, inverse);
	}
}

static void ds4_row_q(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	ds4_heads_rope(m, b, t, arg, m->s.q, 0);
}

static void ds4_row_o(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	ds4_heads_rope(m, b, t, arg, m->s.o, 1);
}

/* The cache side of layer il's attention for every token of the batch (from
 * s->h, normed): window rows, compressed entries and indexer keys; also the
 * raw q_a projection into s->qr. */
static void ds4_attn_cache(struct ds4 *m, int il, const model_batch *b)
{
	const struct ds4_hparams *hp = &m->hp;
	const struct ds4_layer *L = &m->layers[il];
	struct ds4_scratch *s = &m->s;
	const int n = b->n_tokens;
	const int64_t D = hp->n_embd, d = hp->head_dim;

	/* one pass over x for qr = q_a · x (n, D) -> (n, Q), kv = kv · x
	 * (n, D) -> (n, d) and the compressor's kv and gate (n, D) -> (n, cw) */
	const int64_t cw = L->ratio == DS4_CSA ? 2 * d : d;
	const gguf_tensor *w[4] = {L->q_a, L->kv, L->comp_kv, L->comp_gate};
	float *const y[4] = {s->qr, s->kv, s->ca, s->cg};
	const int64_t ys[4] = {hp->q_lora, d, cw, cw};
	ops_matmul_multi(m->env->pool, L->ratio ? 4 : 2, w, s->h, D, n, y, ys, s->mm);
	/* kv = rmsnorm(kv) * kv_norm, RoPE -> window cache */
	ds4_for_rows(m, b, ds4_row_kv, L);
	/* compressed entries completed by this batch */
	if (L->ratio)
		ds4_compressor(m, il, b, 0);
	if (L->ratio == DS4_CSA)
		ds4_compressor(m, il, b, 1);
}

/* The query side of layer il's attention for the batch's tokens (whose cache
 * rows are stored): s->h (normed) -> s->out.  0, or the error of a KV host. */
static int ds4_attention(struct ds4 *m, int il, const model_batch *b)
{
	const struct ds4_hparams *hp = &m->hp;
	const struct ds4_layer *L = &m->layers[il];
	struct ds4_scratch *s = &m->s;
	pool *p = m->env->pool;
	const int n = b->n_tokens;
	const int64_t D = hp->n_embd, H = hp->n_head, d = hp->head_dim, Q = hp->q_lora;
	const int64_t G = hp->o_groups, R = hp->o_lora, gd = H * d / G;

	/* qr = rmsnorm(q_a · x) * q_a_norm (the product from ds4_attn_cache) */
	ds4_for_rows(m, b, ds4_row_qr, L);
	/* q = q_b · qr: (n, Q) -> (n, H, d), per-head rmsnorm without weight, RoPE */
	ops_matmul(p, L->q_b, s->qr, Q, n, s->q, H * d, s->mm);
	ds4_for_rows(m, b, ds4_row_q, L);
	/* the indexer's choice of compressed entries */
	int rc = L->ratio == DS4_CSA ? ds4_indexer(m, il, b) : 0;
	if (rc)
		return rc;
	/* o = attention over [window; compressed]: (n, H, d) */
	ds4_gather_keys(m, L, b);
	struct ds4_attn_job jb = {.m = m, .L = L, .n = n};
	pool_run(p, ds4_attn_run, &jb);
	/* rotate the RoPE dims back by the query's angle */
	ds4_for_rows(m, b, ds4_row_o, L);
	/* grouped low-rank output: z_g = wo_a[g] · o_g  (n, H d / G) -> (n, R) */
	const size_t grow = kern_row_bytes(L->wo_a->type, gd);
	for (int64_t g = 0; g < G; g++)
		ops_matmul_raw(p, L->wo_a->type,
			       (const char *)L->wo_a->data + (size_t)(g * R) * grow, gd, R,
			       s->o + g * gd, H * d, n, s->z + g * R, G * R, s->mm);
	/* (n, G R) @ (G R, D) -> (n, D) */
	ops_matmul(p, L->wo_b, s->z, G * R, n, s->out, D, s->mm);
	return 0;
}

/* ------------------------------------------------------------------ MoE */

/* out = down · (silu(min(gate · x, L)) * clamp(up · x, -L, L)) (L = INFINITY:
 * plain SwiGLU) for the shared expert. */
struct ds4_act_arg {
	int64_t F;
	float lim;
};

/* gate[t] = silu(min(gate, L)) * clamp(up, -L, L) */
static void ds4_row_act(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)b;
	const struct ds4_act_arg *aa = arg;
	const float lim = aa->lim;
	float *gate = m->s.gate + (size_t)t * (size_t)aa->F;
	const float *up = m->s.up + (size_t)t * (size_t)aa->F;
	for (int64_t i = 0; i < aa->F; i++) {
		const float g = fminf(gate[i], lim);
		const float u = fminf(fmaxf(up[i], -lim), lim);
		gate[i] = g / (1.0f + expf(-g)) * u;
	}
}

static void ds4_shared_ffn(struct ds4 *m, const model_batch *b, const struct ds4_layer *L,
			   float lim)
{
	const int n = b->n_tokens;
	struct ds4_scratch *s = &m->s;
	pool *p = m->env->pool;
	const int64_t D = m->hp.n_embd, F = (int64_t)L->gate_shexp->ne[1];
	const gguf_tensor *gu[2] = {L->gate_shexp, L->up_shexp};
	float *const gu_y[2] = {s->gate, s->up};
	const int64_t gu_s[2] = {F, F};
	ops_matmul_multi(p, 2, gu, s->h, D, n, gu_y, gu_s, s->mm);
	const struct ds4_act_arg aa = {F, lim};
	ds4_for_rows(m, b, ds4_row_act, &aa);
	ops_matmul(p, L->down_shexp, s->gate, F, n, s->out, D, s->mm);
}

static int ds4_moe(struct ds4 *m, int il, const model_batch *b)
{
	const struct ds4_hparams *hp = &m->hp;
	const struct ds4_layer *L = &m->layers[il];
	struct ds4_scratch *s = &m->s;
	const int n = b->n_tokens, E = hp->n_expert, k = hp->n_expert_used, K = m->slots;
	const int64_t D = hp->n_embd;

	/* router: (n, D) @ (D, E) -> (n, E), p = sqrt(softplus(.)) */
	ops_matmul(m->env->pool, L->gate_inp, s->h, D, n, s->router, E, s->mm);
	int64_t used = 0;
	for (int t = 0; t < n; t++) {
		float *sc = s->router + (size_t)t * E;
		int32_t *ids = s->ids + (size_t)t * K;
		float *w = s->weights + (size_t)t * K;
		route_gate(&m->rule, sc);
		if (L->tid2eid) {
			/* hash layer: the token's fixed experts, weights as routed */
			memcpy(ids, (const int32_t *)L->tid2eid->data + (size_t)b->token[t] * k,
			       (size_t)k * sizeof(int32_t));
			route_weigh(&m->rule, sc, ids, k, w);
			for (int j = k; j < K; j++) {
				ids[j] = -1;
				w[j] = 0.0f;
			}
			used += k;
		} else {
			used += route_select(&m->rule, m->env->route, sc, ds4_f32(L->probs_b),
					     s->sel, ids, w);
		}
	}
	route_counts_add(m->env->route_counts, il, n, used);

	struct expert_job job = {
	    .layer = il,
	    .n_rows = n,
	    .n_embd = (int)D,
	    .k = K,
	    .x = s->h,
	    .ids = s->ids,
	    .weights = s->weights,
	    .out = s->exp_out,
	};
	int rc = expert_backend_submit(m->env->experts, &job);
	/* the shared expert, while workers compute the routed ones */
	ds4_shared_ffn(m, b, L, hp->lim_shexp[il]);
	if (!rc)
		rc = experts_collect_sum(m->env->experts, &job, s->moe);
	if (rc) {
		log_error("%s: layer %d: routed experts failed (%s)", gguf_path(m->env->g), il,
			  err_str(rc));
		return rc;
	}
	/* ffn_out = routed sum + shared */
	for (int64_t i = 0; i < (int64_t)n * D; i++)
		s->out[i] = s->moe[i] + s->out[i];
	return 0;
}

/* ---------------------------------------------------------------- forward */

/* The head's input for token t: pre = sigmoid(mix * s + b) + eps,
 * h = rmsnorm(sum_a pre[a] X[a]) * output_norm. */
static void ds4_row_head(struct ds4 *m, const model_batch *b, int t, const void *arg)
{
	(void)b, (void)arg;
	struct ds4_scratch *s = &m->s;
	const int64_t D = m->hp.n_embd, W4 = DS4_HC * D;
	const float sc = ds4_f32(m->hc_head_scale)[0];
	const float *base = ds4_f32(m->hc_head_base);
	const float *X = s->X + (size_t)t * W4;
	float pre[DS4_HC];
	for (int a = 0; a < DS4_HC; a++) {
		const float v = s->mix[(size_t)t * DS4_HC + a] * sc + base[a];
		pre[a] = 1.0f / (1.0f + expf(-v)) + m->hp.hc_eps;
	}
	/* unfused in llama.cpp: a product per stream, then additions */
	float *y = s->y + (size_t)t * D;
	for (int64_t i = 0; i < D; i++) {
		float acc = X[i] * pre[0];
		for (int a = 1; a < DS4_HC; a++) {
			const float prod = X[a * D + i] * pre[a];
			acc = acc + prod;
		}
		y[i] = acc;
	}
	ops_rmsnorm(s->h + (size_t)t * D, y, ds4_f32(m->output_norm), D, m->hp.eps);
}

/* Compacts the rows of b whose logits are wanted (in batch order) in the
 * streams, the normed input, q_a's product and the attention block's mHC
 * mixes, and describes them in *out (logits for all); returns their number. */
static int ds4_keep_rows(struct ds4 *m, const model_batch *b, model_batch *out)
{
	struct ds4_scratch *s = &m->s;
	const size_t D = (size_t)m->hp.n_embd, W4 = DS4_HC * D;
	const size_t HH = DS4_HC * DS4_HC, Q = (size_t)m->hp.q_lora;
	int nk = 0;
	for (int t = 0; t < b->n_tokens; t++) {
		if (!b->logits[t])
			continue;
		if (nk != t) {
			const size_t k = (size_t)nk, u = (size_t)t;
			memcpy(s->X + k * W4, s->X + u * W4, W4 * sizeof(float));
			memcpy(s->h + k * D, s->h + u * D, D * sizeof(float));
			memcpy(s->qr + k * Q, s->qr + u * Q, Q * sizeof(float));
			memcpy(s->post + k * DS4_HC, s->post + u * DS4_HC, DS4_HC * sizeof(float));
			memcpy(s->comb + k * HH, s->comb + u * HH, HH * sizeof(float));
		}
		s->sub_token[nk] = b->token[t];
		s->sub_pos[nk] = b->pos[t];
		s->sub_seq[nk] = b->seq[t];
		nk++;
	}
	*out = (model_batch){nk, s->sub_token, s->sub_pos, s->sub_seq, NULL};
	return nk;
}

static int ds4_forward(void *state, const model_batch *b, float *logits)
{
	struct ds4 *m = state;
	const struct ds4_hparams *hp = &m->hp;
	struct ds4_scratch *s = &m->s;
	pool *p = m->env->pool;
	const int64_t D = hp->n_embd, W4 = DS4_HC * D;
	int rc;

	if (b->n_tokens < 0 || b->n_tokens > m->n_batch) {
		log_error("deepseek4: batch of %d tokens exceeds the allocated %d", b->n_tokens,
			  m->n_batch);
		return ERR_RANGE;
	}
	if (b->n_tokens == 0)
		return 0;
	int n = b->n_tokens;
	model_batch kept;

	/* per sequence: tokens in the batch and the last position (kernel choice
	 * and llama.cpp's view sizes are per sequence) */
	for (int t = 0; t < n; t++) {
		s->seq_tok[b->seq[t]] = 0;
		s->seq_maxpos[b->seq[t]] = 0;
	}
	for (int t = 0; t < n; t++) {
		s->seq_tok[b->seq[t]]++;
		if (b->pos[t] > s->seq_maxpos[b->seq[t]])
			s->seq_maxpos[b->seq[t]] = b->pos[t];
	}

	/* embeddings, copied into the 4 streams: (n) -> (n, 4, D) */
	const size_t erow = kern_row_bytes(m->tok_embd->type, D);
	for (int t = 0; t < n; t++) {
		float *X = s->X + (size_t)t * W4;
		kern_dequant_row(m->tok_embd->type,
				 (const char *)m->tok_embd->data + (size_t)b->token[t] * erow, X,
				 D);
		for (int a = 1; a < DS4_HC; a++)
			memcpy(X + a * D, X, (size_t)D * sizeof(float));
	}

	for (int il = 0; il < hp->n_layer; il++) {
		const struct ds4_layer *L = &m->layers[il];
		/* attention block */
		ds4_hc_pre(m, b, L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, L->attn_norm);
		ds4_attn_cache(m, il, b);
		/* past the last layer's caches only the rows whose logits are
		 * wanted matter: the rest of the model runs on those alone */
		if (il == hp->n_layer - 1 && b->logits) {
			n = ds4_keep_rows(m, b, &kept);
			/* the products now take these rows */
			ops_batch_rows_keep(b->seq, b->logits, b->n_tokens);
			b = &kept;
			if (n == 0)
				return 0;
		}
		if ((rc = ds4_attention(m, il, b)))
			return rc;
		ds4_hc_post(m, b);
		/* FFN block */
		ds4_hc_pre(m, b, L->hc_ffn_fn, L->hc_ffn_base, L->hc_ffn_scale, L->ffn_norm);
		if ((rc = ds4_moe(m, il, b)))
			return rc;
		ds4_hc_post(m, b);
	}

	/* head, for the rows whose logits are wanted (all that are left) */
	ds4_for_rows(m, b, ds4_row_flat, NULL);
	/* (n, 4D) @ (4D, 4) -> (n, 4) */
	ops_matmul(p, m->hc_head_fn, s->flat, W4, n, s->mix, DS4_HC, s->mm);
	ds4_for_rows(m, b, ds4_row_head, NULL);
	/* (nk, D) @ (D, n_vocab) -> logits */
	ops_matmul(p, m->output, s->h, D, n, logits, hp->n_vocab, s->mm);
	return 0;
}

const struct arch_vtable arch_deepseek4 = {
    .name = DS4_ARCH,
    .load = ds4_load,
    .destroy = ds4_destroy,
    .forward = ds4_forward,
    .reset_seq = ds4_reset_seq,
    .kv_hosts = ds4_kv_hosts,
};
