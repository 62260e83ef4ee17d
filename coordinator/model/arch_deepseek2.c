/* arch_deepseek2: the DeepSeek-V2/V3 forward pass (GGUF architecture "deepseek2"),
 * computed the way llama.cpp does (src/models/deepseek2.cpp, build_moe_ffn and
 * build_attn in src/llama-graph.cpp).
 *
 * Per layer, for a micro-batch of n tokens (shapes are [rows][values]):
 *
 *   h   = rmsnorm(x) * attn_norm                                  [n][n_embd]
 *   q   = q_b · (rmsnorm(q_a · h) * q_a_norm)   or   q · h        [n][n_head][nope + rope]
 *   kv  = kv_a_mqa · h = [c | k_pe]                               [n][kv_lora + rope]
 *   c   = rmsnorm(c) * kv_a_norm;  k_pe, q_pe: RoPE (adjacent pairs, YaRN)
 *   cache[pos] = [c | k_pe] (F16)            (one shared KV head: MLA as MQA)
 *   qf  = [k_b[h] · q_nope | q_pe]  per head ("absorbed" query)   [n][n_head][kv_lora + rope]
 *   o   = flash-attention(qf, cache), value = c                   [n][n_head][kv_lora]
 *   a   = attn_output · (v_b[h] · o[h] for each head)             [n][n_embd]
 *   x   = x + a
 *   h   = rmsnorm(x) * ffn_norm
 *   x   = x + ffn(h)
 *
 * ffn is a SwiGLU (down · (silu(gate · h) * (up · h))) on the first
 * leading_dense_block_count layers; on the others it is
 *   (routed experts, summed in top-k order) + shared-expert SwiGLU,
 * with the router: probs = sigmoid or softmax (ffn_gate_inp · h); selection
 * score = probs (+ exp_probs_b); optional group limit (keep the
 * expert_group_used_count groups whose two best scores sum highest); top-k by
 * selection score; weights = probs of the chosen experts (/ their sum when
 * expert_weights_norm) * expert_weights_scale.  Routed experts run only through
 * env->experts.
 *
 * The last layer computes attention output and FFN only for rows whose logits
 * are wanted (their keys are still cached), then output_norm and the output
 * matrix (or token_embd when output.weight is absent).
 *
 * RoPE/YaRN as llama.cpp derives it (llama-context.cpp, deepseek2.cpp), with
 * f = rope.scaling.factor, m_all = yarn_log_multiplier / 0.1 (undoing the
 * converter) and A = rope.scaling.attn_factor (default 1):
 *   YaRN:   ext_factor 1, freq_scale 1/f,
 *           attn_factor = A / (1 + 0.1 ln f)   (times 1 + 0.1 ln f without m_all)
 *   linear: ext_factor 0, freq_scale 1/f, attn_factor = A;  none: freq_scale 1
 *   kq_scale = mscale^2 / sqrt(key_length_mla),
 *   mscale = attn_factor * (1 + 0.1 ln(1/freq_scale)) * (1 + 0.1 m_all ln(1/freq_scale)).
 * yarn_beta_fast/slow are not read from the file (llama.cpp uses 32 and 1).
 *
 * Two GGUF layouts of the MLA weights, told apart as llama.cpp does by the
 * attention.key_length_mla / value_length_mla keys (both or neither):
 *   split (keys present): attn_k_b {nope, kv_lora, n_head} and attn_v_b
 *     {kv_lora, head_v, n_head}; key_length = kv_lora + rope, head_count_kv 1.
 *   legacy (no keys; files converted before mid-2025, e.g. the R1 UD-IQ1_S
 *     and UD-Q2_K_XL quants): one attn_kv_b {kv_lora, n_head * (nope + head_v)}
 *     whose rows are, per head h, nope K rows then head_v V rows, each over
 *     the kv_lora compressed values; key_length = nope + rope, value_length =
 *     head_v, head_count_kv = n_head.
 * llama.cpp runs legacy files as plain multi-head attention over decompressed
 * K and V.  Here both layouts run the absorbed form above with the same small
 * cache (kv_lora + rope values per token and layer, not n_head * (nope + rope
 * + head_v)): v_b[h] is the V rows of head h read in place from attn_kv_b (rows
 * are packed, only the head stride differs), and k_b[h] = (K rows of head
 * h)^T is built once at load (dequantise the nope rows, transpose, store).  Its
 * type: the file's when that is F32, F16 or BF16 (the transpose is then exact
 * and the logits are those of the split file with the same values); otherwise
 * Q8_0 (nope a multiple of 32; else F16), as llama-quantize would type a split
 * attn_k_b, adding Q8_0's rounding to the file's.  The numerics differ from
 * llama.cpp's legacy path in where activations are rounded: it converts c to
 * attn_kv_b's activation type (F16, BF16, Q8_0, Q8_K) and caches K and V in
 * F16, this pass converts the query and the attention output instead (as
 * llama.cpp does for split files).  On the test models the difference is the
 * size of llama.cpp's own flash-attention on/off difference (with Q8_0 or
 * BF16 dense weights both exceed compare_logits' defaults on some seeds).
 * Cost of the built k_b on DeepSeek-V3/R1 shapes (61 layers x 128 heads x 512
 * rows x 128 values): Q8_0 518.5 MiB (F16 would be 976 MiB, F32 1.91 GiB), on
 * top of the mapped file, whose K rows are then no longer read. */
#include "arch.h"
#include "attn.h"
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

#define DS2_ARCH "deepseek2"

enum ds2_gating {
	DS2_GATING_SOFTMAX = 1,
	DS2_GATING_SIGMOID = 2,
};

struct ds2_hparams {
	int n_vocab;
	int n_embd;
	int n_layer;
	int n_ctx_train;
	int n_head;
	int n_dense;   /* leading_dense_block_count: layers with a dense FFN */
	int n_ff;      /* dense FFN width */
	int q_lora;    /* 0: plain attn_q */
	int kv_lora;   /* width of the compressed KV c (= value width) */
	int n_rot;     /* RoPE dimensions of each query / key head */
	int head_k;    /* nope + rope per query head (key_length_mla; legacy: key_length) */
	int head_nope; /* head_k - n_rot */
	int head_v;    /* per head after v_b (value_length_mla; legacy: value_length) */
	int legacy;    /* 1: one attn_kv_b per layer instead of attn_k_b + attn_v_b */
	int n_expert;
	int n_expert_used;
	int n_expert_shared;
	int n_ff_exp;
	int n_group;	  /* expert groups (<= 1: no group limit) */
	int n_group_used; /* groups kept */
	int weights_norm;
	float weights_scale; /* 0 or 1: no scaling */
	enum ds2_gating gating;
	float eps;
	float kq_scale;
};

/* A per-head weight: n_head matrices of n_out rows x n_in values of type,
 * rows packed, matrix h starting at data + h * stride. */
struct ds2_heads {
	uint32_t type;
	int64_t n_in;
	int64_t n_out;
	const char *data;
	size_t stride;
};

struct ds2_layer {
	const gguf_tensor *attn_norm;	/* [n_embd] F32 */
	const gguf_tensor *q_a;		/* n_embd -> q_lora */
	const gguf_tensor *q_a_norm;	/* [q_lora] F32 */
	const gguf_tensor *q_b;		/* q_lora -> n_head * head_k */
	const gguf_tensor *q;		/* n_embd -> n_head * head_k (when q_lora = 0) */
	const gguf_tensor *kv_a_mqa;	/* n_embd -> kv_lora + n_rot */
	const gguf_tensor *kv_a_norm;	/* [kv_lora] F32 */
	const gguf_tensor *kv_b;	/* legacy: kv_lora -> n_head * (head_nope + head_v) */
	struct ds2_heads k_b;		/* per head head_nope -> kv_lora */
	struct ds2_heads v_b;		/* per head kv_lora -> head_v */
	const gguf_tensor *wo;		/* n_head * head_v -> n_embd */
	const gguf_tensor *ffn_norm;	/* [n_embd] F32 */
	const gguf_tensor *ffn_gate;	/* dense: n_embd -> n_ff */
	const gguf_tensor *ffn_up;	/* dense: n_embd -> n_ff */
	const gguf_tensor *ffn_down;	/* dense: n_ff -> n_embd */
	const gguf_tensor *gate_inp;	/* MoE: n_embd -> n_expert (router) */
	const gguf_tensor *exp_probs_b; /* MoE: [n_expert] F32 selection bias, or NULL */
	const gguf_tensor *gate_shexp;	/* MoE: n_embd -> n_ff_exp * n_expert_shared */
	const gguf_tensor *up_shexp;	/* MoE: n_embd -> n_ff_exp * n_expert_shared */
	const gguf_tensor *down_shexp;	/* MoE: n_ff_exp * n_expert_shared -> n_embd */
};

/* Activation buffers, sized at load for n_batch rows. */
struct ds2_scratch {
	float *x;	/* [n_batch][n_embd] residual stream */
	float *h;	/* [n_batch][n_embd] normed input of attention / FFN */
	float *qa;	/* [n_batch][q_lora] */
	float *q;	/* [n_batch][n_head][head_k] */
	float *kv;	/* [n_batch][kv_lora + n_rot] */
	float *qf;	/* [n_batch][n_head][kv_lora + n_rot] absorbed query */
	float *o;	/* [n_batch][n_head][kv_lora] attention output */
	float *ov;	/* [n_batch][n_head][head_v] */
	float *y;	/* [n_batch][n_embd] block output (attention or FFN) */
	float *gate;	/* [n_batch][max(n_ff, n_ff_shexp)] */
	float *up;	/* [n_batch][max(n_ff, n_ff_shexp)] */
	float *router;	/* [n_batch][n_expert] router logits, then probs */
	void *sel;	/* route_scratch_bytes(): selection scratch of one row */
	int32_t *ids;	/* [n_batch][slots] */
	float *weights; /* [n_batch][slots] */
	float *exp_out; /* [n_batch][slots][n_embd] weighted expert outputs */
	int32_t *sub_token, *sub_pos, *sub_seq; /* [n_batch] rows kept in the last layer */
	void *mm;				/* ops_matmul scratch */
	void *heads_xa; /* [n_batch][n_head] rows converted for the per-head products */
};

struct ds2 {
	const struct arch_env *env; /* owned by model.c; env->experts may change */
	struct ds2_hparams hp;
	struct ds2_layer *layers;	/* [n_layer] */
	const gguf_tensor *tok_embd;	/* n_embd x n_vocab */
	const gguf_tensor *output_norm; /* [n_embd] F32 */
	const gguf_tensor *output;	/* n_embd -> n_vocab */
	void *k_b_built;		/* legacy layout: every layer's k_b, built at load */
	struct ops_rope rope;
	struct attn_params attn; /* MQA: one KV head [c | k_pe], value c */
	attn_cache *cache;
	struct ds2_scratch s;
	int n_batch;
	struct route_rule rule; /* the router (route.h) */
	int slots;		/* expert slots per row: route_slots() */
};

/* ------------------------------------------------------------------ loading */

static int ds2_u32(const struct arch_env *env, const char *key, int required, uint32_t def,
		   uint32_t max, int *out)
{
	uint32_t v = def;
	int rc =
	    required ? arch_u32_req(env, DS2_ARCH, key, &v) : arch_u32_opt(env, DS2_ARCH, key, &v);
	if (rc)
		return rc;
	if (v > max) {
		log_error("%s: key %s.%s = %u is out of range (max %u)", gguf_path(env->g),
			  DS2_ARCH, key, v, max);
		return ERR_FORMAT;
	}
	*out = (int)v;
	return 0;
}

static int ds2_bad(const struct arch_env *env, const char *what)
{
	log_error("%s: unsupported deepseek2 hyper-parameters: %s", gguf_path(env->g), what);
	return ERR_FORMAT;
}

/* Hyper-parameters, read and defaulted as llama.cpp's loader does. */
static int ds2_load_hparams(const struct arch_env *env, struct ds2_hparams *hp,
			    struct ops_rope *rope)
{
	const uint32_t big = 1u << 20;
	int rc, v;
	int n_head_kv, key_len, val_len, n_ctx_orig;

	if ((rc = ds2_u32(env, "embedding_length", 1, 0, big, &hp->n_embd)) ||
	    (rc = ds2_u32(env, "block_count", 1, 0, MOE_MAX_LAYERS, &hp->n_layer)) ||
	    (rc = ds2_u32(env, "context_length", 1, 0, INT32_MAX, &hp->n_ctx_train)) ||
	    (rc = ds2_u32(env, "attention.head_count", 1, 0, 65536, &hp->n_head)) ||
	    (rc = ds2_u32(env, "leading_dense_block_count", 0, 0, MOE_MAX_LAYERS, &hp->n_dense)) ||
	    (rc = ds2_u32(env, "feed_forward_length", 0, 0, big, &hp->n_ff)) ||
	    (rc = ds2_u32(env, "attention.q_lora_rank", 0, 0, big, &hp->q_lora)) ||
	    (rc = ds2_u32(env, "attention.kv_lora_rank", 1, 0, big, &hp->kv_lora)) ||
	    (rc = ds2_u32(env, "attention.key_length_mla", 0, 0, big, &hp->head_k)) ||
	    (rc = ds2_u32(env, "attention.value_length_mla", 0, 0, big, &hp->head_v)) ||
	    (rc = ds2_u32(env, "expert_count", 0, 0, 65536, &hp->n_expert)) ||
	    (rc = ds2_u32(env, "expert_used_count", 0, 0, 65536, &hp->n_expert_used)) ||
	    (rc = ds2_u32(env, "expert_shared_count", 1, 0, 65536, &hp->n_expert_shared)) ||
	    (rc = ds2_u32(env, "expert_feed_forward_length", 1, 0, big, &hp->n_ff_exp)) ||
	    (rc = ds2_u32(env, "expert_group_count", 0, 0, 65536, &hp->n_group)) ||
	    (rc = ds2_u32(env, "expert_group_used_count", 0, 0, 65536, &hp->n_group_used)))
		return rc;
	if (hp->n_embd < 1 || hp->n_layer < 1 || hp->n_head < 1)
		return ds2_bad(env, "embedding_length, block_count and head_count must be >= 1");

	/* trailing multi-token-prediction layers (nextn) are not run */
	int n_nextn = 0;
	if ((rc = ds2_u32(env, "nextn_predict_layers", 0, 0, MOE_MAX_LAYERS, &n_nextn)))
		return rc;
	if (n_nextn >= hp->n_layer)
		return ds2_bad(env, "nextn_predict_layers must be smaller than block_count");
	hp->n_layer -= n_nextn;

	/* vocabulary: token_embd rows (= vocab_size when present) */
	const gguf_tensor *te = gguf_find_tensor(env->g, "token_embd.weight");
	if (!te || te->n_dims != 2 || te->ne[1] < 1 || te->ne[1] > INT32_MAX) {
		log_error("%s: tensor token_embd.weight: missing or not a 2-D matrix",
			  gguf_path(env->g));
		return ERR_FORMAT;
	}
	hp->n_vocab = (int)te->ne[1];
	v = hp->n_vocab;
	if ((rc = ds2_u32(env, "vocab_size", 0, (uint32_t)v, INT32_MAX, &v)))
		return rc;
	if (v != hp->n_vocab) {
		log_error("%s: %s.vocab_size = %d but token_embd.weight has %d rows",
			  gguf_path(env->g), DS2_ARCH, v, hp->n_vocab);
		return ERR_FORMAT;
	}
	/* llama.cpp's "lite" models (DeepSeek-V2-Lite and kin) have no q_lora_rank */
	if (hp->n_layer == 26 || hp->n_layer == 27 || (hp->n_layer == 48 && hp->n_vocab == 128256))
		hp->q_lora = 0;

	/* attention temperature tuning (Mistral-Large style) is not implemented */
	float temp_scale = 0.0f;
	if ((rc = arch_f32_opt(env, DS2_ARCH, "attention.temperature_scale", &temp_scale)))
		return rc;
	if (temp_scale != 0.0f)
		return ds2_bad(env, "attention.temperature_scale is not supported");

	/* MLA stored as MQA: one KV head of [c | k_pe].  Without the *_mla keys
	 * the file describes the multi-head form of the legacy layout. */
	if (hp->kv_lora < 1)
		return ds2_bad(env, "attention.kv_lora_rank must be >= 1");
	if ((hp->head_k == 0) != (hp->head_v == 0))
		return ds2_bad(env, "attention.key_length_mla and value_length_mla must both be "
				    "present (split attn_k_b/attn_v_b) or both absent (attn_kv_b)");
	hp->legacy = hp->head_k == 0;
	n_head_kv = hp->n_head;
	key_len = hp->n_embd / hp->n_head;
	val_len = key_len;
	if ((rc = ds2_u32(env, "attention.head_count_kv", 0, (uint32_t)n_head_kv, 65536,
			  &n_head_kv)) ||
	    (rc = ds2_u32(env, "attention.key_length", 0, (uint32_t)key_len, big, &key_len)) ||
	    (rc = ds2_u32(env, "attention.value_length", 0, (uint32_t)val_len, big, &val_len)))
		return rc;
	if (hp->legacy) {
		if (n_head_kv != hp->n_head)
			return ds2_bad(env, "attention.head_count_kv must equal head_count in the "
					    "legacy layout (no key_length_mla)");
		hp->head_k = key_len;
		hp->head_v = val_len;
		if (hp->head_v < 1)
			return ds2_bad(env, "attention.value_length must be >= 1");
	} else if (n_head_kv != 1) {
		return ds2_bad(env, "attention.head_count_kv must be 1 (MLA in MQA form)");
	}
	hp->n_rot = key_len;
	if ((rc = ds2_u32(env, "rope.dimension_count", 0, (uint32_t)key_len, big, &hp->n_rot)))
		return rc;
	if (hp->n_rot < 2 || hp->n_rot % 2 != 0)
		return ds2_bad(env, "rope.dimension_count must be even and >= 2");
	hp->head_nope = hp->head_k - hp->n_rot;
	if (hp->head_nope < 1)
		return ds2_bad(env, hp->legacy ? "attention.key_length must exceed "
						 "rope.dimension_count (legacy layout)"
					       : "key_length_mla must exceed rope.dimension_count");
	if (!hp->legacy && key_len != hp->kv_lora + hp->n_rot)
		return ds2_bad(env, "attention.key_length must equal kv_lora_rank + "
				    "rope.dimension_count");

	/* dense and MoE layers */
	if (hp->n_dense > hp->n_layer)
		return ds2_bad(env, "leading_dense_block_count exceeds block_count");
	if (hp->n_dense > 0 && hp->n_ff < 1)
		return ds2_bad(env, "feed_forward_length must be >= 1 with dense layers");
	if (hp->n_dense < hp->n_layer) {
		if (hp->n_expert < 1 || hp->n_expert_used < 1 || hp->n_expert_used > hp->n_expert)
			return ds2_bad(env, "need 1 <= expert_used_count <= expert_count");
		if (hp->n_ff_exp < 1)
			return ds2_bad(env, "expert_feed_forward_length must be >= 1");
		if (hp->n_expert_shared < 1)
			return ds2_bad(env, "expert_shared_count must be >= 1");
		if ((int64_t)hp->n_ff_exp * hp->n_expert_shared > (int64_t)big)
			return ds2_bad(env, "shared expert too wide");
	}
	if (hp->n_group > 1) {
		if (hp->n_group >= hp->n_expert || hp->n_expert % hp->n_group != 0)
			return ds2_bad(env, "expert_count must be a multiple of expert_group_count "
					    "and larger");
		if (hp->n_expert / hp->n_group < 2)
			return ds2_bad(env, "expert groups need at least 2 experts each");
		if (hp->n_group_used < 1 || hp->n_group_used >= hp->n_group)
			return ds2_bad(env, "need 0 < expert_group_used_count < "
					    "expert_group_count");
	}

	/* router */
	hp->weights_norm = 0;
	hp->weights_scale = 0.0f;
	if ((rc = arch_bool_opt(env, DS2_ARCH, "expert_weights_norm", &hp->weights_norm)) ||
	    (rc = arch_f32_opt(env, DS2_ARCH, "expert_weights_scale", &hp->weights_scale)))
		return rc;
	if (!isfinite(hp->weights_scale))
		return ds2_bad(env, "expert_weights_scale is not finite");
	v = 0;
	if ((rc = ds2_u32(env, "expert_gating_func", 0, 0, 16, &v)))
		return rc;
	if (v == 0) {
		/* absent: llama.cpp's defaults (old DeepSeek-V2 files; GLM 4.7 Lite) */
		const int glm = (hp->n_layer == 47 || hp->n_layer == 48) && hp->n_vocab == 154880;
		v = glm ? DS2_GATING_SIGMOID : DS2_GATING_SOFTMAX;
	}
	if (v != DS2_GATING_SOFTMAX && v != DS2_GATING_SIGMOID)
		return ds2_bad(env, "expert_gating_func must be 1 (softmax) or 2 (sigmoid)");
	hp->gating = (enum ds2_gating)v;

	hp->eps = 0.0f;
	if ((rc = arch_f32_req(env, DS2_ARCH, "attention.layer_norm_rms_epsilon", &hp->eps)))
		return rc;
	if (!(hp->eps >= 0.0f) || !isfinite(hp->eps))
		return ds2_bad(env, "attention.layer_norm_rms_epsilon must be finite and >= 0");

	/* RoPE and YaRN (llama-model.cpp, llama-context.cpp) */
	float freq_base = 10000.0f, factor = 0.0f, rope_attn_factor = 1.0f, log_mul = 0.0f;
	int has_log_mul;
	char type[32] = "linear";
	n_ctx_orig = hp->n_ctx_train;
	if ((rc = arch_f32_opt(env, DS2_ARCH, "rope.freq_base", &freq_base)) ||
	    (rc = arch_str_opt(env, DS2_ARCH, "rope.scaling.type", type, sizeof(type))) ||
	    (rc = arch_f32_opt(env, DS2_ARCH, "rope.scaling.factor", &factor)) ||
	    (rc = arch_f32_opt(env, DS2_ARCH, "rope.scaling.attn_factor", &rope_attn_factor)) ||
	    (rc = ds2_u32(env, "rope.scaling.original_context_length", 0, (uint32_t)n_ctx_orig,
			  INT32_MAX, &n_ctx_orig)))
		return rc;
	has_log_mul = gguf_find_kv(env->g, DS2_ARCH ".rope.scaling.yarn_log_multiplier") >= 0;
	if ((rc = arch_f32_opt(env, DS2_ARCH, "rope.scaling.yarn_log_multiplier", &log_mul)))
		return rc;
	if (has_log_mul)
		log_mul /= 0.1f; /* [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX] */
	if (!(freq_base > 0.0f) || !isfinite(freq_base) || !(factor >= 0.0f) || !isfinite(factor) ||
	    !isfinite(rope_attn_factor) || !isfinite(log_mul))
		return ds2_bad(env, "rope.freq_base / rope.scaling values out of range");
	if (factor > 0.0f && factor < 1e-6f)
		return ds2_bad(env, "rope.scaling.factor too small");
	if (n_ctx_orig < 1)
		return ds2_bad(env, "rope.scaling.original_context_length must be >= 1");
	int yarn;
	float freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
	if (strcmp(type, "none") == 0) {
		freq_scale = 1.0f;
		yarn = 0;
	} else if (strcmp(type, "linear") == 0) {
		yarn = 0;
	} else if (strcmp(type, "yarn") == 0) {
		yarn = 1;
	} else {
		return ds2_bad(env, "rope.scaling.type must be none, linear or yarn");
	}
	float attn_factor = 1.0f;
	if (yarn) {
		const float f = 1.0f / freq_scale;
		/* llama-context.cpp: mscale(f, m) / mscale(f, m_all) with m = m_all for
		 * deepseek2 (= 1) when the log multiplier is set, else mscale(f, 1);
		 * mscale(f, m) = 1 + 0.1 m ln f (1 when f <= 1) */
		if (log_mul == 0.0f && f > 1.0f)
			attn_factor = 0.1f * 1.0f * logf(f) + 1.0f;
		/* cancel the factor ggml's rope applies with ext_factor != 0 */
		attn_factor *= 1.0f / (1.0f + 0.1f * logf(f));
	}
	attn_factor *= rope_attn_factor;
	*rope = (struct ops_rope){
	    .n_dims = hp->n_rot,
	    .neox = 0,
	    .freq_base = freq_base,
	    .freq_scale = freq_scale,
	    .ext_factor = yarn ? 1.0f : 0.0f,
	    .attn_factor = attn_factor,
	    .beta_fast = 32.0f,
	    .beta_slow = 1.0f,
	    .n_ctx_orig = n_ctx_orig,
	};
	/* attention scale: pre-scaled by YaRN's mscale (deepseek2.cpp) */
	const float attn_factor_org = attn_factor * (1.0f + 0.1f * logf(1.0f / freq_scale));
	const float mscale = attn_factor_org * (1.0f + 0.1f * log_mul * logf(1.0f / freq_scale));
	hp->kq_scale = 1.0f * mscale * mscale / sqrtf((float)hp->head_k);
	if (!isfinite(hp->kq_scale))
		return ds2_bad(env, "attention scale is not finite");
	return 0;
}

/* Every tensor is used straight from the mapping: norms and the selection
 * bias must be F32, matrices of a type the kernels know. */
static int ds2_check_type(const struct arch_env *env, const gguf_tensor *t, int f32_only)
{
	if (!t)
		return 0;
	if (f32_only ? t->type != KERN_F32 : !kern_type_dot(t->type)) {
		log_error("%s: tensor %s: type %s (%u) is not supported here%s", gguf_path(env->g),
			  t->name, kern_type_name(t->type), t->type, f32_only ? " (need F32)" : "");
		return ERR_FORMAT;
	}
	return 0;
}

/* The per-head view of a 3-D tensor ne0 x ne1 x n_head. */
static struct ds2_heads ds2_heads_of(const gguf_tensor *t)
{
	const int64_t n_in = (int64_t)t->ne[0], n_out = (int64_t)t->ne[1];
	return (struct ds2_heads){
	    .type = t->type,
	    .n_in = n_in,
	    .n_out = n_out,
	    .data = t->data,
	    .stride = (size_t)n_out * kern_row_bytes(t->type, n_in),
	};
}

/* Split layout: attn_k_b and attn_v_b as they are. */
static int ds2_load_k_b_v_b(const struct arch_env *env, const struct ds2_hparams *hp, int il,
			    struct ds2_layer *L)
{
	const int64_t H = hp->n_head, kvr = hp->kv_lora;
	const gguf_tensor *k_b, *v_b;
	int rc;
	if ((rc = arch_tensor(env, &k_b, hp->head_nope, kvr, H, "blk.%d.attn_k_b.weight", il)) ||
	    (rc = arch_tensor(env, &v_b, kvr, hp->head_v, H, "blk.%d.attn_v_b.weight", il)) ||
	    (rc = ds2_check_type(env, k_b, 0)) || (rc = ds2_check_type(env, v_b, 0)))
		return rc;
	L->k_b = ds2_heads_of(k_b);
	L->v_b = ds2_heads_of(v_b);
	return 0;
}

/* Legacy layout: attn_kv_b; v_b is its V rows in place, k_b is built later
 * (ds2_build_k_b). */
static int ds2_load_kv_b(const struct arch_env *env, const struct ds2_hparams *hp, int il,
			 struct ds2_layer *L)
{
	const int64_t H = hp->n_head, kvr = hp->kv_lora, nope = hp->head_nope, hv = hp->head_v;
	char name[64];
	snprintf(name, sizeof(name), "blk.%d.attn_kv_b.weight", il);
	if (!gguf_find_tensor(env->g, name)) {
		char k_b[64];
		snprintf(k_b, sizeof(k_b), "blk.%d.attn_k_b.weight", il);
		if (gguf_find_tensor(env->g, k_b))
			log_error("%s: tensor %s is present but %s.attention.key_length_mla and "
				  "value_length_mla are not (a split MLA file needs them)",
				  gguf_path(env->g), k_b, DS2_ARCH);
	}
	int rc = arch_tensor(env, &L->kv_b, kvr, H * (nope + hv), 0, "%s", name);
	if (rc) {
		if (gguf_find_tensor(env->g, name))
			log_error(
			    "%s: tensor %s: the legacy MLA layout needs kv_lora_rank (%lld) x "
			    "head_count (%lld) * (key_length - rope.dimension_count (%lld) + "
			    "value_length (%lld))",
			    gguf_path(env->g), name, (long long)kvr, (long long)H, (long long)nope,
			    (long long)hv);
		return rc;
	}
	const size_t rb = kern_row_bytes(L->kv_b->type, kvr);
	L->v_b = (struct ds2_heads){
	    .type = L->kv_b->type,
	    .n_in = kvr,
	    .n_out = hv,
	    .data = (const char *)L->kv_b->data + (size_t)nope * rb,
	    .stride = (size_t)(nope + hv) * rb,
	};
	return 0;
}

static int ds2_load_layer(const struct arch_env *env, const struct ds2_hparams *hp, int il,
			  struct ds2_layer *L)
{
	const int64_t E = hp->n_embd, H = hp->n_head, kvr = hp->kv_lora, rot = hp->n_rot;
	const int64_t ff_sh = (int64_t)hp->n_ff_exp * hp->n_expert_shared;
	const gguf_tensor *exps[3];
	int rc;

	if ((rc = arch_tensor(env, &L->attn_norm, E, 0, 0, "blk.%d.attn_norm.weight", il)) ||
	    (rc = arch_tensor(env, &L->kv_a_mqa, E, kvr + rot, 0, "blk.%d.attn_kv_a_mqa.weight",
			      il)) ||
	    (rc = arch_tensor(env, &L->kv_a_norm, kvr, 0, 0, "blk.%d.attn_kv_a_norm.weight", il)) ||
	    (rc =
		 arch_tensor(env, &L->wo, H * hp->head_v, E, 0, "blk.%d.attn_output.weight", il)) ||
	    (rc = arch_tensor(env, &L->ffn_norm, E, 0, 0, "blk.%d.ffn_norm.weight", il)))
		return rc;
	if ((rc = hp->legacy ? ds2_load_kv_b(env, hp, il, L) : ds2_load_k_b_v_b(env, hp, il, L)))
		return rc;
	if (hp->q_lora > 0) {
		if ((rc = arch_tensor(env, &L->q_a, E, hp->q_lora, 0, "blk.%d.attn_q_a.weight",
				      il)) ||
		    (rc = arch_tensor(env, &L->q_a_norm, hp->q_lora, 0, 0,
				      "blk.%d.attn_q_a_norm.weight", il)) ||
		    (rc = arch_tensor(env, &L->q_b, hp->q_lora, H * hp->head_k, 0,
				      "blk.%d.attn_q_b.weight", il)))
			return rc;
	} else {
		if ((rc =
			 arch_tensor(env, &L->q, E, H * hp->head_k, 0, "blk.%d.attn_q.weight", il)))
			return rc;
	}
	if (il < hp->n_dense) {
		if ((rc = arch_tensor(env, &L->ffn_gate, E, hp->n_ff, 0, "blk.%d.ffn_gate.weight",
				      il)) ||
		    (rc = arch_tensor(env, &L->ffn_up, E, hp->n_ff, 0, "blk.%d.ffn_up.weight",
				      il)) ||
		    (rc = arch_tensor(env, &L->ffn_down, hp->n_ff, E, 0, "blk.%d.ffn_down.weight",
				      il)))
			return rc;
	} else {
		if ((rc = arch_tensor(env, &L->gate_inp, E, hp->n_expert, 0,
				      "blk.%d.ffn_gate_inp.weight", il)) ||
		    (rc = arch_tensor_opt(env, &L->exp_probs_b, hp->n_expert, 0, 0,
					  "blk.%d.exp_probs_b.bias", il)) ||
		    (rc = arch_tensor(env, &L->gate_shexp, E, ff_sh, 0,
				      "blk.%d.ffn_gate_shexp.weight", il)) ||
		    (rc = arch_tensor(env, &L->up_shexp, E, ff_sh, 0, "blk.%d.ffn_up_shexp.weight",
				      il)) ||
		    (rc = arch_tensor(env, &L->down_shexp, ff_sh, E, 0,
				      "blk.%d.ffn_down_shexp.weight", il)))
			return rc;
		/* routed experts: computed elsewhere, but a bad file should fail here */
		if ((rc = arch_tensor(env, &exps[0], E, hp->n_ff_exp, hp->n_expert,
				      "blk.%d.ffn_gate_exps.weight", il)) ||
		    (rc = arch_tensor(env, &exps[1], E, hp->n_ff_exp, hp->n_expert,
				      "blk.%d.ffn_up_exps.weight", il)) ||
		    (rc = arch_tensor(env, &exps[2], hp->n_ff_exp, E, hp->n_expert,
				      "blk.%d.ffn_down_exps.weight", il)))
			return rc;
		for (int i = 0; i < 3; i++)
			if ((rc = ds2_check_type(env, exps[i], 0)))
				return rc;
	}
	const gguf_tensor *f32s[] = {L->attn_norm, L->q_a_norm, L->kv_a_norm, L->ffn_norm,
				     L->exp_probs_b};
	const gguf_tensor *mats[] = {L->q_a,	   L->q_b,	L->q,	       L->kv_a_mqa,
				     L->kv_b,	   L->wo,	L->ffn_gate,   L->ffn_up,
				     L->ffn_down,  L->gate_inp, L->gate_shexp, L->up_shexp,
				     L->down_shexp};
	for (size_t i = 0; i < sizeof(f32s) / sizeof(f32s[0]); i++)
		if ((rc = ds2_check_type(env, f32s[i], 1)))
			return rc;
	for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++)
		if ((rc = ds2_check_type(env, mats[i], 0)))
			return rc;
	return 0;
}

/* ------------------------------------------- legacy layout: k_b from attn_kv_b */

/* The type k_b is stored in when built from an attn_kv_b of type kv_b_type. */
static uint32_t ds2_k_b_type(uint32_t kv_b_type, int64_t nope)
{
	if (kv_b_type == KERN_F32 || kv_b_type == KERN_F16 || kv_b_type == KERN_BF16)
		return kv_b_type;
	return nope % KERN_QK == 0 ? KERN_Q8_0 : KERN_F16;
}

/* Builds k_b of one layer: for each head h and compressed index c, row c of
 * k_b[h] = column c of the nope K rows of head h in attn_kv_b. */
struct ds2_k_b_job {
	const gguf_tensor *kv_b;
	int64_t n_head, nope, hv, kvr;
	struct ds2_heads dst;
	float *tmp; /* [nth][nope * kvr + nope] */
};

static void ds2_k_b_run(void *ctx, int ith, int nth)
{
	const struct ds2_k_b_job *j = ctx;
	const int64_t nope = j->nope, kvr = j->kvr;
	const size_t src_row = kern_row_bytes(j->kv_b->type, kvr);
	const size_t dst_row = kern_row_bytes(j->dst.type, nope);
	float *rows = j->tmp + (size_t)ith * (size_t)(nope * kvr + nope), *col = rows + nope * kvr;
	int64_t h0, h1;
	pool_split(j->n_head, ith, nth, 1, &h0, &h1);
	for (int64_t h = h0; h < h1; h++) {
		const char *src =
		    (const char *)j->kv_b->data + (size_t)(h * (nope + j->hv)) * src_row;
		char *dst = (char *)j->dst.data + (size_t)h * j->dst.stride;
		for (int64_t i = 0; i < nope; i++)
			kern_dequant_row(j->kv_b->type, src + (size_t)i * src_row, rows + i * kvr,
					 kvr);
		for (int64_t c = 0; c < kvr; c++) {
			for (int64_t i = 0; i < nope; i++)
				col[i] = rows[i * kvr + c];
			kern_convert_row((enum kern_type)j->dst.type, col,
					 dst + (size_t)c * dst_row, nope);
		}
	}
}

/* Legacy layout: builds every layer's k_b into one buffer (m->k_b_built). */
static int ds2_build_k_b(struct ds2 *m)
{
	const struct ds2_hparams *hp = &m->hp;
	const int64_t H = hp->n_head, nope = hp->head_nope, kvr = hp->kv_lora;
	const uint32_t type = ds2_k_b_type(m->layers[0].kv_b->type, nope);
	size_t total = 0, per_layer[MOE_MAX_LAYERS];
	int rc = 0;

	for (int il = 0; il < hp->n_layer; il++) {
		const size_t row =
		    kern_row_bytes(ds2_k_b_type(m->layers[il].kv_b->type, nope), nope);
		if ((size_t)(H * kvr) > (SIZE_MAX - total) / row) {
			log_error("%s: attn_k_b built from attn_kv_b is too large",
				  gguf_path(m->env->g));
			return ERR_NOMEM;
		}
		per_layer[il] = (size_t)(H * kvr) * row;
		total += per_layer[il];
	}
	const int nth = pool_size(m->env->pool);
	float *tmp = malloc((size_t)nth * (size_t)(nope * kvr + nope) * sizeof(float));
	m->k_b_built = malloc(total);
	if (!tmp || !m->k_b_built) {
		log_error("%s: out of memory for attn_k_b built from attn_kv_b (%zu bytes)",
			  gguf_path(m->env->g), total);
		rc = ERR_NOMEM;
		goto out;
	}
	char *p = m->k_b_built;
	for (int il = 0; il < hp->n_layer; il++) {
		struct ds2_layer *L = &m->layers[il];
		const uint32_t t = ds2_k_b_type(L->kv_b->type, nope);
		L->k_b = (struct ds2_heads){
		    .type = t,
		    .n_in = nope,
		    .n_out = kvr,
		    .data = p,
		    .stride = (size_t)kvr * kern_row_bytes(t, nope),
		};
		struct ds2_k_b_job job = {
		    .kv_b = L->kv_b,
		    .n_head = H,
		    .nope = nope,
		    .hv = hp->head_v,
		    .kvr = kvr,
		    .dst = L->k_b,
		    .tmp = tmp,
		};
		pool_run(m->env->pool, ds2_k_b_run, &job);
		p += per_layer[il];
	}
	log_info("%s: legacy MLA layout (attn_kv_b): built attn_k_b as %s, %.1f MiB",
		 gguf_path(m->env->g), kern_type_name(type), (double)total / 1048576.0);
out:
	free(tmp);
	return rc;
}

/* calloc of n elements of size sz with an overflow check; sets *failed on failure. */
static void *ds2_alloc(size_t n, size_t sz, int *failed)
{
	if (n == 0)
		n = 1;
	if (n > SIZE_MAX / sz) {
		*failed = 1;
		return NULL;
	}
	void *p = calloc(n, sz);
	if (!p)
		*failed = 1;
	return p;
}

static int ds2_alloc_scratch(struct ds2 *m)
{
	const struct ds2_hparams *hp = &m->hp;
	struct ds2_scratch *s = &m->s;
	const size_t n = (size_t)m->n_batch, H = (size_t)hp->n_head;
	const size_t kw = (size_t)hp->kv_lora + (size_t)hp->n_rot;
	const size_t ff_sh = (size_t)hp->n_ff_exp * (size_t)hp->n_expert_shared;
	size_t ff = (size_t)hp->n_ff > ff_sh ? (size_t)hp->n_ff : ff_sh;
	const size_t k = (size_t)(m->slots > 0 ? m->slots : 1);
	const size_t nx = (size_t)(hp->n_expert > 0 ? hp->n_expert : 1);
	int failed = 0;

	s->x = ds2_alloc(n * hp->n_embd, sizeof(float), &failed);
	s->h = ds2_alloc(n * hp->n_embd, sizeof(float), &failed);
	s->qa = ds2_alloc(n * hp->q_lora, sizeof(float), &failed);
	s->q = ds2_alloc(n * H * hp->head_k, sizeof(float), &failed);
	s->kv = ds2_alloc(n * kw, sizeof(float), &failed);
	s->qf = ds2_alloc(n * H * kw, sizeof(float), &failed);
	s->o = ds2_alloc(n * H * hp->kv_lora, sizeof(float), &failed);
	s->ov = ds2_alloc(n * H * hp->head_v, sizeof(float), &failed);
	s->y = ds2_alloc(n * hp->n_embd, sizeof(float), &failed);
	s->gate = ds2_alloc(n * ff, sizeof(float), &failed);
	s->up = ds2_alloc(n * ff, sizeof(float), &failed);
	s->router = ds2_alloc(n * nx, sizeof(float), &failed);
	s->sel = ds2_alloc(route_scratch_bytes(&m->rule), 1, &failed);
	s->ids = ds2_alloc(n * k, sizeof(int32_t), &failed);
	s->weights = ds2_alloc(n * k, sizeof(float), &failed);
	s->exp_out = ds2_alloc(n * k * hp->n_embd, sizeof(float), &failed);
	s->sub_token = ds2_alloc(n, sizeof(int32_t), &failed);
	s->sub_pos = ds2_alloc(n, sizeof(int32_t), &failed);
	s->sub_seq = ds2_alloc(n, sizeof(int32_t), &failed);

	/* the widest matmul input decides the conversion scratch */
	int64_t n_in_max = hp->n_embd;
	const int64_t ins[] = {hp->q_lora, hp->head_nope, hp->kv_lora, (int64_t)H * hp->head_v,
			       hp->n_ff,   (int64_t)ff_sh};
	for (size_t i = 0; i < sizeof(ins) / sizeof(ins[0]); i++)
		if (ins[i] > n_in_max)
			n_in_max = ins[i];
	s->mm = ds2_alloc(ops_matmul_scratch(n_in_max, (int64_t)n), 1, &failed);
	const int64_t head_in = hp->head_nope > hp->kv_lora ? hp->head_nope : hp->kv_lora;
	s->heads_xa = ds2_alloc(ops_matmul_scratch(head_in, (int64_t)(n * H)), 1, &failed);
	if (failed) {
		log_error("%s: out of memory for deepseek2 activations (batch %d)",
			  gguf_path(m->env->g), m->n_batch);
		return ERR_NOMEM;
	}
	return 0;
}

static void ds2_destroy(void **state)
{
	struct ds2 *m = *state;
	if (!m)
		return;
	struct ds2_scratch *s = &m->s;
	void *bufs[] = {s->x,	    s->h,   s->qa,	s->q,	    s->kv,	  s->qf,
			s->o,	    s->ov,  s->y,	s->gate,    s->up,	  s->router,
			s->sel,	    s->ids, s->weights, s->exp_out, s->sub_token, s->sub_pos,
			s->sub_seq, s->mm,  s->heads_xa};
	for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
		free(bufs[i]);
	attn_cache_destroy(&m->cache);
	free(m->k_b_built);
	free(m->layers);
	free(m);
	*state = NULL;
}

static int ds2_load(const struct arch_env *env, struct model_info *info, void **state)
{
	int rc = 0;
	struct ds2 *m = NULL;
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
	struct ds2_hparams *hp = &m->hp;
	if ((rc = ds2_load_hparams(env, hp, &m->rope)))
		goto out;

	/* embeddings and head */
	if ((rc =
		 arch_tensor(env, &m->tok_embd, hp->n_embd, hp->n_vocab, 0, "token_embd.weight")) ||
	    (rc = arch_tensor(env, &m->output_norm, hp->n_embd, 0, 0, "output_norm.weight")) ||
	    (rc = arch_tensor_opt(env, &m->output, hp->n_embd, hp->n_vocab, 0, "output.weight")))
		goto out;
	if (!m->output)
		m->output = m->tok_embd; /* tied embeddings */
	if ((rc = ds2_check_type(env, m->tok_embd, 0)) ||
	    (rc = ds2_check_type(env, m->output_norm, 1)) ||
	    (rc = ds2_check_type(env, m->output, 0)))
		goto out;

	m->layers = calloc((size_t)hp->n_layer, sizeof(*m->layers));
	if (!m->layers) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int il = 0; il < hp->n_layer; il++)
		if ((rc = ds2_load_layer(env, hp, il, &m->layers[il])))
			goto out;
	if (hp->legacy && (rc = ds2_build_k_b(m)))
		goto out;

	/* KV cache: key [c | k_pe], value c read from the key (stored once) */
	if ((rc = attn_cache_new_shared(hp->n_layer, env->n_seq, env->n_ctx,
					hp->kv_lora + hp->n_rot, hp->kv_lora, &m->cache)) ||
	    (rc = attn_cache_set_shards(m->cache, env->kv_shards, env->kv_page)))
		goto out;
	m->attn = (struct attn_params){
	    .n_head = hp->n_head,
	    .n_head_kv = 1,
	    .head_dim_k = hp->kv_lora + hp->n_rot,
	    .head_dim_v = hp->kv_lora,
	    .scale = hp->kq_scale,
	    .window = 0,
	    .sinks = NULL,
	};
	if ((rc = attn_check_params(m->cache, &m->attn, gguf_path(env->g))))
		goto out;
	m->rule = (struct route_rule){
	    .n_expert = hp->n_expert,
	    .k = hp->n_expert_used,
	    .gating =
		hp->gating == DS2_GATING_SIGMOID ? ROUTE_GATING_SIGMOID : ROUTE_GATING_SOFTMAX,
	    .n_group = hp->n_group,
	    .n_group_used = hp->n_group_used,
	    .norm = hp->weights_norm,
	    .norm_min = 6.103515625e-5f,
	    .scale = hp->weights_scale,
	};
	if ((rc = route_check(&m->rule, env->route, gguf_path(env->g))))
		goto out;
	m->slots = route_slots(&m->rule, env->route);
	if ((rc = ds2_alloc_scratch(m)))
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
	info->moe.act = MOE_ACT_SWIGLU;
	info->moe.has_bias = 0;
	for (int il = hp->n_dense; il < hp->n_layer; il++)
		info->moe.layer_moe[il] = 1;
out:
	if (rc)
		ds2_destroy((void **)&m);
	*state = m;
	return rc;
}

static void ds2_reset_seq(void *state, int seq)
{
	struct ds2 *m = state;
	attn_cache_reset_seq(m->cache, seq);
}

/* ------------------------------------------------------------------ forward */

static const float *ds2_f32(const gguf_tensor *t)
{
	return (const float *)t->data;
}

/* Per-head products with a per-head weight w: for every row t and head h,
 * y[t][h][0..n_out) = w[h] · x[t][h][0..n_in), where x rows hold
 * n_head blocks of x_head floats and y rows n_head blocks of y_head floats.
 * One pool run; each thread converts and multiplies the heads it owns, with the
 * kernels llama.cpp uses for a 3-D weight it does not repack
 * (kern_matmul_unpacked). */
struct ds2_heads_job {
	const struct ds2_heads *w;
	const float *x;
	int64_t x_head;
	float *y;
	int64_t y_head;
	int n_rows;
	int n_head;
	enum kern_type act;
	size_t act_row;		/* bytes of one converted ne0-row */
	char *xa;		/* [n_rows][n_head] converted rows */
	const uint8_t *batched; /* per row: its sequence has several rows, or NULL */
};

static void ds2_heads_run(void *ctx, int ith, int nth)
{
	const struct ds2_heads_job *j = ctx;
	const int64_t n_in = j->w->n_in, n_out = j->w->n_out;
	const int64_t H = j->n_head;
	int64_t h0, h1;
	pool_split(H, ith, nth, 1, &h0, &h1);
	for (int64_t h = h0; h < h1; h++) {
		for (int64_t t = 0; t < j->n_rows; t++)
			kern_convert_row(j->act, j->x + (t * H + h) * j->x_head,
					 j->xa + (size_t)(t * H + h) * j->act_row, n_in);
		kern_matmul_unpacked(j->w->type,
				     (const char *)j->w->data + (size_t)h * j->w->stride, n_in, 0,
				     n_out, j->xa + (size_t)h * j->act_row, (size_t)H * j->act_row,
				     j->n_rows, j->y + h * j->y_head, H * j->y_head, j->batched);
	}
}

static void ds2_heads_matmul(struct ds2 *m, const struct ds2_heads *w, const float *x,
			     int64_t x_head, int n, float *y, int64_t y_head)
{
	struct ds2_heads_job j = {
	    .w = w,
	    .x = x,
	    .x_head = x_head,
	    .y = y,
	    .y_head = y_head,
	    .n_rows = n,
	    .n_head = m->hp.n_head,
	    .act = kern_act_type(w->type),
	    .xa = m->s.heads_xa,
	};
	j.act_row = kern_row_bytes(j.act, w->n_in);
	/* IQ4_NL's, F16's and F32's arithmetic depends on how many rows a sequence
	 * has: per row, as that sequence alone (without memory, as one sequence) */
	const int per_row = w->type == KERN_IQ4_NL || w->type == KERN_F16 || w->type == KERN_F32;
	uint8_t *batched = per_row ? malloc((size_t)(n > 0 ? n : 1)) : NULL;
	if (batched)
		for (int t = 0; t < n; t++)
			batched[t] = ops_seq_rows(t, n) >= 2;
	j.batched = batched;
	pool_run(m->env->pool, ds2_heads_run, &j);
	free(batched);
}

/* out = down · (silu(gate · h) * (up · h)) for n rows of h (n_embd wide). */
static void ds2_swiglu_ffn(struct ds2 *m, const gguf_tensor *gate, const gguf_tensor *up,
			   const gguf_tensor *down, const float *h, int n, float *out)
{
	pool *p = m->env->pool;
	const int64_t E = m->hp.n_embd, F = (int64_t)gate->ne[1];
	float *g = m->s.gate, *u = m->s.up;
	/* (n, E) @ (E, F) -> (n, F), twice, in one pass */
	const gguf_tensor *gu[2] = {gate, up};
	float *const gu_y[2] = {g, u};
	const int64_t gu_s[2] = {F, F};
	ops_matmul_multi(p, 2, gu, h, E, n, gu_y, gu_s, m->s.mm);
	for (int t = 0; t < n; t++) /* as llama.cpp's ggml_vec_swiglu_f32, row by row */
		kern_swiglu(g + (size_t)t * F, u + (size_t)t * F, 0, F, F);
	/* (n, F) @ (F, E) -> (n, E) */
	ops_matmul(p, down, g, F, n, out, E, m->s.mm);
}

/* Router of one row: fills ids[slots] (selection order) and weights[slots]
 * from the router logits r[n_expert] (overwritten with probs): sigmoid or
 * softmax, selection bias, group limit, top-k, optional norm, scale (route.h).
 * Returns the number of experts chosen. */
static int ds2_route_row(struct ds2 *m, const struct ds2_layer *L, float *r, int32_t *ids, float *w)
{
	route_gate(&m->rule, r);
	const float *bias = L->exp_probs_b ? ds2_f32(L->exp_probs_b) : NULL;
	return route_select(&m->rule, m->env->route, r, bias, m->s.sel, ids, w);
}

/* MoE FFN of layer il for n rows of h: out = sum of routed slots + shared expert. */
static int ds2_moe_ffn(struct ds2 *m, int il, const float *h, int n, float *out)
{
	const struct ds2_hparams *hp = &m->hp;
	const struct ds2_layer *L = &m->layers[il];
	const int64_t E = hp->n_embd;
	const int k = m->slots;
	struct ds2_scratch *s = &m->s;

	/* router logits: (n, E) @ (E, n_expert) -> (n, n_expert) */
	ops_matmul(m->env->pool, L->gate_inp, h, E, n, s->router, hp->n_expert, s->mm);
	int64_t used = 0;
	for (int t = 0; t < n; t++)
		used += ds2_route_row(m, L, s->router + (size_t)t * hp->n_expert,
				      s->ids + (size_t)t * k, s->weights + (size_t)t * k);
	route_counts_add(m->env->route_counts, il, n, used);

	/* routed experts: (n, k, E), each slot already weighted */
	struct expert_job job = {
	    .layer = il,
	    .n_rows = n,
	    .n_embd = (int)E,
	    .k = k,
	    .x = h,
	    .ids = s->ids,
	    .weights = s->weights,
	    .out = s->exp_out,
	};
	int rc = expert_backend_submit(m->env->experts, &job);

	/* shared expert(s) into out, while remote workers compute the routed ones */
	ds2_swiglu_ffn(m, L->gate_shexp, L->up_shexp, L->down_shexp, h, n, out);

	if (!rc)
		rc = expert_backend_collect(m->env->experts, &job);
	if (rc) {
		log_error("%s: layer %d: routed experts failed (%s)", gguf_path(m->env->g), il,
			  err_str(rc));
		return rc;
	}

	/* ffn_out = ((slot 0 + slot 1) + ...) + shared, over the row's used slots */
	for (int t = 0; t < n; t++) {
		const float *eo = s->exp_out + (size_t)t * k * E;
		const int32_t *ids = s->ids + (size_t)t * k;
		float *o = out + (size_t)t * E;
		int kt = k;
		while (kt > 1 && ids[kt - 1] < 0)
			kt--;
		for (int64_t i = 0; i < E; i++) {
			float acc = eo[i];
			for (int j = 1; j < kt; j++)
				acc += eo[(size_t)j * E + i];
			o[i] = acc + o[i];
		}
	}
	return 0;
}

/* Attention of layer il: ds2_attn_kv stores the keys of all n batch rows,
 * ds2_attn_out computes the attention output (into s->y) for the rows of sb
 * (a prefix of the batch after ds2_keep_rows; h already compacted for those
 * rows).  with_q: every row goes on to ds2_attn_out, so the first query
 * projection (q_a, or q) shares the key projection's pool pass and input
 * conversion; ds2_attn_out is then told q_done. */
static void ds2_attn_kv(struct ds2 *m, int il, const model_batch *b, int with_q)
{
	const struct ds2_hparams *hp = &m->hp;
	const struct ds2_layer *L = &m->layers[il];
	struct ds2_scratch *s = &m->s;
	const int64_t kw = hp->kv_lora + hp->n_rot;

	/* [c | k_pe]: (n, E) @ (E, kv_lora + rot) -> (n, kw)
	 * with_q, also q_a: (n, E) -> (n, q_lora), or q: (n, E) -> (n, H * hk) */
	const gguf_tensor *w[2] = {L->kv_a_mqa, L->q_a ? L->q_a : L->q};
	float *y[2] = {s->kv, L->q_a ? s->qa : s->q};
	const int64_t ys[2] = {kw, L->q_a ? hp->q_lora : hp->n_head * hp->head_k};
	ops_matmul_multi(m->env->pool, with_q ? 2 : 1, w, s->h, hp->n_embd, b->n_tokens, y, ys,
			 s->mm);
	for (int t = 0; t < b->n_tokens; t++) {
		float *kv = s->kv + (size_t)t * kw;
		ops_rmsnorm(kv, kv, ds2_f32(L->kv_a_norm), hp->kv_lora, hp->eps);
		ops_rope_apply(&m->rope, kv + hp->kv_lora, b->pos[t]);
		attn_cache_store(m->cache, il, b->seq[t], b->pos[t], kv, kv);
	}
}

static int ds2_attn_out(struct ds2 *m, int il, const model_batch *sb, int q_done)
{
	const struct ds2_hparams *hp = &m->hp;
	const struct ds2_layer *L = &m->layers[il];
	struct ds2_scratch *s = &m->s;
	pool *p = m->env->pool;
	const int n = sb->n_tokens;
	const int64_t E = hp->n_embd, H = hp->n_head, hk = hp->head_k;
	const int64_t kvr = hp->kv_lora, kw = kvr + hp->n_rot, hv = hp->head_v;

	/* q: (n, E) -> (n, H, hk) */
	if (L->q_a) {
		if (!q_done)
			ops_matmul(p, L->q_a, s->h, E, n, s->qa, hp->q_lora, s->mm);
		for (int t = 0; t < n; t++) {
			float *qa = s->qa + (size_t)t * hp->q_lora;
			ops_rmsnorm(qa, qa, ds2_f32(L->q_a_norm), hp->q_lora, hp->eps);
		}
		ops_matmul(p, L->q_b, s->qa, hp->q_lora, n, s->q, H * hk, s->mm);
	} else if (!q_done) {
		ops_matmul(p, L->q, s->h, E, n, s->q, H * hk, s->mm);
	}

	/* absorbed query per head: [k_b[h] · q_nope | rope(q_pe)] -> (n, H, kw) */
	for (int t = 0; t < n; t++) {
		for (int64_t hh = 0; hh < H; hh++) {
			float *qh = s->q + ((size_t)t * H + hh) * hk;
			ops_rope_apply(&m->rope, qh + hp->head_nope, sb->pos[t]);
			memcpy(s->qf + ((size_t)t * H + hh) * kw + kvr, qh + hp->head_nope,
			       (size_t)hp->n_rot * sizeof(float));
		}
	}
	/* per head: (n, nope) @ (nope, kvr) -> (n, kvr) */
	ds2_heads_matmul(m, &L->k_b, s->q, hk, n, s->qf, kw);

	/* MQA over the cache: (n, H, kw) -> (n, H, kvr) */
	int rc = attn_forward(p, m->cache, il, &m->attn, sb, s->qf, s->o);
	if (rc)
		return rc;

	/* per head v_b[h]: (n, kvr) @ (kvr, hv) -> (n, hv) */
	ds2_heads_matmul(m, &L->v_b, s->o, kvr, n, s->ov, hv);
	/* (n, H * hv) @ (H * hv, E) -> (n, E) */
	ops_matmul(p, L->wo, s->ov, H * hv, n, s->y, E, s->mm);
	return 0;
}

/* Keeps only the rows whose logits are wanted (in batch order) in x and h and
 * describes them in *sb.  Returns the number kept. */
static int ds2_keep_rows(struct ds2 *m, const model_batch *b, model_batch *sb)
{
	struct ds2_scratch *s = &m->s;
	const int64_t E = m->hp.n_embd;
	int j = 0;
	for (int t = 0; t < b->n_tokens; t++) {
		if (b->logits && !b->logits[t])
			continue;
		if (j != t) {
			memcpy(s->x + (size_t)j * E, s->x + (size_t)t * E,
			       (size_t)E * sizeof(float));
			memcpy(s->h + (size_t)j * E, s->h + (size_t)t * E,
			       (size_t)E * sizeof(float));
		}
		s->sub_token[j] = b->token[t];
		s->sub_pos[j] = b->pos[t];
		s->sub_seq[j] = b->seq[t];
		j++;
	}
	*sb = (model_batch){
	    .n_tokens = j,
	    .token = s->sub_token,
	    .pos = s->sub_pos,
	    .seq = s->sub_seq,
	    .logits = NULL,
	};
	ops_batch_rows(s->sub_seq, j); /* the products now take these rows */
	return j;
}

static int ds2_forward(void *state, const model_batch *b, float *logits)
{
	struct ds2 *m = state;
	const struct ds2_hparams *hp = &m->hp;
	struct ds2_scratch *s = &m->s;
	pool *p = m->env->pool;
	const int64_t E = hp->n_embd;
	int rc;

	if (b->n_tokens < 0 || b->n_tokens > m->n_batch) {
		log_error("deepseek2: batch of %d tokens exceeds the allocated %d", b->n_tokens,
			  m->n_batch);
		return ERR_RANGE;
	}
	if (b->n_tokens == 0)
		return 0;

	/* token embeddings: (n) -> (n, E) */
	const size_t erow = kern_row_bytes(m->tok_embd->type, E);
	for (int t = 0; t < b->n_tokens; t++)
		kern_dequant_row(m->tok_embd->type,
				 (const char *)m->tok_embd->data + (size_t)b->token[t] * erow,
				 s->x + (size_t)t * E, E);

	model_batch sb = *b; /* rows still computed (all but in the last layer) */
	int n = b->n_tokens;
	int all_rows = 1; /* every row wants logits: the last layer keeps them all */
	for (int t = 0; t < n && b->logits; t++)
		all_rows &= b->logits[t] != 0;
	for (int il = 0; il < hp->n_layer; il++) {
		const struct ds2_layer *L = &m->layers[il];

		/* attention: h = norm(x); keys of every row go to the cache */
		for (int t = 0; t < n; t++)
			ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E,
				    ds2_f32(L->attn_norm), E, hp->eps);
		const int last = il == hp->n_layer - 1, q_early = !last || all_rows;
		ds2_attn_kv(m, il, &sb, q_early);
		if (last) {
			n = ds2_keep_rows(m, b, &sb);
			if (n == 0)
				return 0;
		}
		if ((rc = ds2_attn_out(m, il, &sb, q_early)))
			return rc;
		/* ffn_inp = attn_out + x */
		for (int64_t i = 0; i < (int64_t)n * E; i++)
			s->x[i] = s->y[i] + s->x[i];

		/* FFN: h = norm(x); x = ffn(h) + x */
		for (int t = 0; t < n; t++)
			ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E,
				    ds2_f32(L->ffn_norm), E, hp->eps);
		if (il < hp->n_dense) {
			ds2_swiglu_ffn(m, L->ffn_gate, L->ffn_up, L->ffn_down, s->h, n, s->y);
		} else {
			if ((rc = ds2_moe_ffn(m, il, s->h, n, s->y)))
				return rc;
		}
		for (int64_t i = 0; i < (int64_t)n * E; i++)
			s->x[i] = s->y[i] + s->x[i];
	}

	/* head: norm, then (n, E) @ (E, n_vocab) -> logits rows */
	for (int t = 0; t < n; t++)
		ops_rmsnorm(s->h + (size_t)t * E, s->x + (size_t)t * E, ds2_f32(m->output_norm), E,
			    hp->eps);
	ops_matmul(p, m->output, s->h, E, n, logits, hp->n_vocab, s->mm);
	return 0;
}

static attn_cache *ds2_kv_cache(void *state)
{
	return ((struct ds2 *)state)->cache;
}

const struct arch_vtable arch_deepseek2 = {
    .name = DS2_ARCH,
    .load = ds2_load,
    .destroy = ds2_destroy,
    .forward = ds2_forward,
    .reset_seq = ds2_reset_seq,
    .kv_cache = ds2_kv_cache,
};
