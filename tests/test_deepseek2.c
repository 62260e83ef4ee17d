/* The deepseek2 forward pass (coordinator/model/arch_deepseek2.c) on small random
 * models written here with gguf_writer, no llama.cpp needed:
 *  - every feature combination loads and gives finite logits (q_lora or plain
 *    attn_q, group routing on/off, sigmoid/softmax gating, selection bias
 *    on/off, weight normalisation and scale, YaRN/linear/no RoPE scaling,
 *    dense lead layers, tied output, nextn layers);
 *  - bit-exact invariants: a prefill equals the same tokens decoded one at a
 *    time, asking for a subset of the logits gives the same rows, a batch
 *    split into micro-batches gives the same logits;
 *  - the legacy MLA layout (one attn_kv_b instead of attn_k_b + attn_v_b)
 *    gives bit for bit the logits of the split layout with the same values;
 *  - bad hyper-parameters and missing or misshapen tensors fail model_open
 *    with ERR_FORMAT (no crash).
 * The comparison with llama.cpp itself is tests/test_vectors.c. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/gguf_write.h"
#include "../common/log.h"
#include "../coordinator/model/model.h"
#include "../kernels/kern.h"

static char tmp_path[64];

/* ------------------------------------------------------------ model writer */

struct ds2_cfg {
	int n_vocab, n_embd, n_layer, n_head, n_dense;
	int q_lora, kv_lora, nope, rope, v_head;
	int n_ff, n_ff_exp, n_expert, n_used, n_shared;
	int n_group, n_group_used; /* 0: keys not written */
	int gating;		   /* written as expert_gating_func */
	int bias, norm, tied, nextn;
	float scale;
	const char *rope_type; /* NULL: no rope.scaling keys */
	float rope_factor, yarn_log_mul;
	uint32_t weight_type; /* KERN_F32, KERN_F16 or KERN_BF16 for the matrices */
	/* one metadata override (key NULL: none), written last */
	const char *ov_key;
	enum gguf_type ov_type;
	uint32_t ov_u32;
	const char *ov_str;
	const char *drop_tensor; /* a tensor left out, or NULL */
	/* MLA layout: the same values as attn_k_b / attn_v_b stored as */
	enum ds2_layout {
		LAYOUT_SPLIT, /* attn_k_b + attn_v_b (weight_type) */
		LAYOUT_KV_B,  /* attn_kv_b of kv_b_type, legacy metadata */
		LAYOUT_BUILT, /* the split tensors the engine builds from LAYOUT_KV_B */
	} layout;
	uint32_t kv_b_type; /* LAYOUT_KV_B / LAYOUT_BUILT: F32, F16, BF16 or Q8_0 */
	uint64_t kv_b_rows; /* LAYOUT_KV_B: attn_kv_b rows if not the right count */
};

static const struct ds2_cfg base_cfg = {
    .n_vocab = 96,
    .n_embd = 64,
    .n_layer = 3,
    .n_head = 4,
    .n_dense = 1,
    .q_lora = 32,
    .kv_lora = 32,
    .nope = 16,
    .rope = 8,
    .v_head = 16,
    .n_ff = 96,
    .n_ff_exp = 32,
    .n_expert = 8,
    .n_used = 3,
    .n_shared = 1,
    .n_group = 4,
    .n_group_used = 2,
    .gating = 2,
    .bias = 1,
    .norm = 1,
    .tied = 0,
    .nextn = 0,
    .scale = 2.5f,
    .rope_type = "yarn",
    .rope_factor = 40.0f,
    .yarn_log_mul = 0.1f,
    .weight_type = KERN_F16,
};

struct ds2_tensor {
	char name[64];
	uint32_t type;
	uint32_t n_dims;
	uint64_t ne[3];
	float mean, std;
};

#define MAX_T 256
static struct ds2_tensor tensors[MAX_T];
static int n_tensors;

static void add_t(const char *name, uint32_t type, uint64_t a, uint64_t b, uint64_t c, float mean,
		  float std)
{
	struct ds2_tensor *t = &tensors[n_tensors++];
	snprintf(t->name, sizeof(t->name), "%s", name);
	t->type = type;
	t->ne[0] = a;
	t->ne[1] = b ? b : 1;
	t->ne[2] = c ? c : 1;
	t->n_dims = c ? 3 : b ? 2 : 1;
	t->mean = mean;
	t->std = std;
}

static uint64_t rng_state;
static float rng_normal(void)
{
	/* sum of uniforms: mean 0, variance 1 */
	float s = 0.0f;
	for (int i = 0; i < 12; i++) {
		rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
		s += (float)(rng_state >> 40) / (float)(1ull << 24);
	}
	return s - 6.0f;
}

static void describe(const struct ds2_cfg *c)
{
	const uint32_t W = c->weight_type, F = KERN_F32;
	const int E = c->n_embd, H = c->n_head, hk = c->nope + c->rope;
	char n[64];
	n_tensors = 0;
	add_t("token_embd.weight", W, E, c->n_vocab, 0, 0.0f, 1.0f);
	add_t("output_norm.weight", F, E, 0, 0, 1.0f, 0.1f);
	if (!c->tied)
		add_t("output.weight", W, E, c->n_vocab, 0, 0.0f, 2.0f / sqrtf((float)E));
	for (int i = 0; i < c->n_layer + c->nextn; i++) {
#define T(suffix, type, a, b, cc, mean, std)                                                       \
	do {                                                                                       \
		snprintf(n, sizeof(n), "blk.%d.%s", i, suffix);                                    \
		add_t(n, type, a, b, cc, mean, std);                                               \
	} while (0)
		T("attn_norm.weight", F, E, 0, 0, 1.0f, 0.1f);
		if (c->q_lora) {
			T("attn_q_a_norm.weight", F, c->q_lora, 0, 0, 1.0f, 0.1f);
			T("attn_q_a.weight", W, E, c->q_lora, 0, 0.0f, 1.0f / sqrtf((float)E));
			T("attn_q_b.weight", W, c->q_lora, H * hk, 0, 0.0f,
			  1.0f / sqrtf((float)c->q_lora));
		} else {
			T("attn_q.weight", W, E, H * hk, 0, 0.0f, 1.0f / sqrtf((float)E));
		}
		T("attn_kv_a_norm.weight", F, c->kv_lora, 0, 0, 1.0f, 0.1f);
		T("attn_kv_a_mqa.weight", W, E, c->kv_lora + c->rope, 0, 0.0f,
		  1.0f / sqrtf((float)E));
		T("attn_k_b.weight", W, c->nope, c->kv_lora, H, 0.0f, 1.0f / sqrtf((float)c->nope));
		T("attn_v_b.weight", W, c->kv_lora, c->v_head, H, 0.0f,
		  1.0f / sqrtf((float)c->kv_lora));
		T("attn_output.weight", W, H * c->v_head, E, 0, 0.0f,
		  1.0f / sqrtf((float)(H * c->v_head)));
		T("ffn_norm.weight", F, E, 0, 0, 1.0f, 0.1f);
		if (i < c->n_dense) {
			T("ffn_gate.weight", W, E, c->n_ff, 0, 0.0f, 1.0f / sqrtf((float)E));
			T("ffn_up.weight", W, E, c->n_ff, 0, 0.0f, 1.0f / sqrtf((float)E));
			T("ffn_down.weight", W, c->n_ff, E, 0, 0.0f, 1.0f / sqrtf((float)c->n_ff));
		} else {
			const int sh = c->n_ff_exp * c->n_shared;
			T("ffn_gate_inp.weight", F, E, c->n_expert, 0, 0.0f,
			  1.0f / sqrtf((float)E));
			if (c->bias)
				T("exp_probs_b.bias", F, c->n_expert, 0, 0, 0.0f, 0.1f);
			T("ffn_gate_exps.weight", W, E, c->n_ff_exp, c->n_expert, 0.0f,
			  1.0f / sqrtf((float)E));
			T("ffn_up_exps.weight", W, E, c->n_ff_exp, c->n_expert, 0.0f,
			  1.0f / sqrtf((float)E));
			T("ffn_down_exps.weight", W, c->n_ff_exp, E, c->n_expert, 0.0f,
			  1.0f / sqrtf((float)c->n_ff_exp));
			T("ffn_gate_shexp.weight", W, E, sh, 0, 0.0f, 1.0f / sqrtf((float)E));
			T("ffn_up_shexp.weight", W, E, sh, 0, 0.0f, 1.0f / sqrtf((float)E));
			T("ffn_down_shexp.weight", W, sh, E, 0, 0.0f, 1.0f / sqrtf((float)sh));
		}
#undef T
	}
}

static int set_u32(gguf_writer *w, const char *key, uint32_t v)
{
	char k[128];
	snprintf(k, sizeof(k), "deepseek2.%s", key);
	return gguf_writer_set_u32(w, k, v);
}

static int set_f32(gguf_writer *w, const char *key, float v)
{
	char k[128];
	snprintf(k, sizeof(k), "deepseek2.%s", key);
	return gguf_writer_set_f32(w, k, v);
}

/* The tensor's values: mean + std * N(0, 1), in order. */
static float *draw(const struct ds2_tensor *t)
{
	const uint64_t n = t->ne[0] * t->ne[1] * t->ne[2];
	float *v = malloc(sizeof(float) * n);
	for (uint64_t j = 0; v && j < n; j++)
		v[j] = t->mean + t->std * rng_normal();
	return v;
}

/* Writes n_rows rows of n values as type (F32, F16, BF16 or Q8_0). */
static int write_rows(gguf_writer *w, uint32_t type, const float *v, int64_t n, int64_t n_rows)
{
	const size_t rb = kern_row_bytes(type, n);
	char *buf = malloc(rb);
	int rc = buf ? 0 : ERR_NOMEM;
	for (int64_t r = 0; r < n_rows && !rc; r++) {
		const float *x = v + r * n;
		if (type == KERN_F16)
			for (int64_t i = 0; i < n; i++) {
				uint16_t h = kern_f32_to_f16(x[i]);
				memcpy(buf + 2 * i, &h, 2);
			}
		else if (type == KERN_BF16)
			for (int64_t i = 0; i < n; i++) {
				uint16_t h = kern_f32_to_bf16(x[i]);
				memcpy(buf + 2 * i, &h, 2);
			}
		else if (type == KERN_Q8_0)
			kern_convert_row(KERN_Q8_0, x, buf, n);
		else
			memcpy(buf, x, rb);
		rc = gguf_writer_write(w, buf, rb);
	}
	free(buf);
	return rc;
}

static int is_mla_b(const char *name, const char *suffix)
{
	const size_t n = strlen(name), k = strlen(suffix);
	return n > k && strcmp(name + n - k, suffix) == 0;
}

/* "blk.N.attn_kv_b.weight" for k_b_name "blk.N.attn_k_b.weight". */
static void kv_b_name(const char *k_b_name, char out[64])
{
	snprintf(out, 64, "%.*sattn_kv_b.weight",
		 (int)(strlen(k_b_name) - strlen("attn_k_b.weight")), k_b_name);
}

/* 0 if tensor i (or, in LAYOUT_KV_B, the attn_kv_b it belongs to) is dropped. */
static int kept(const struct ds2_cfg *c, int i)
{
	char name[64];
	const char *n = tensors[i].name;
	if (!c->drop_tensor)
		return 1;
	if (c->layout == LAYOUT_KV_B &&
	    (is_mla_b(n, "attn_k_b.weight") || is_mla_b(n, "attn_v_b.weight"))) {
		kv_b_name(is_mla_b(n, "attn_k_b.weight") ? n : tensors[i - 1].name, name);
		n = name;
	}
	return strcmp(c->drop_tensor, n) != 0;
}

/* The type of attn_k_b the engine builds from an attn_kv_b of c->kv_b_type. */
static uint32_t built_k_b_type(const struct ds2_cfg *c)
{
	if (c->kv_b_type != KERN_Q8_0)
		return c->kv_b_type;
	return c->nope % 32 == 0 ? KERN_Q8_0 : KERN_F16;
}

/* One layer's attn_k_b values kb[h][kv_lora][nope] and attn_v_b values
 * vb[h][v_head][kv_lora] as attn_kv_b (LAYOUT_KV_B: per head nope K rows,
 * k[i][c] = kb[h][c][i], then v_head V rows) or as the split tensors built
 * from that attn_kv_b (LAYOUT_BUILT: K rows transposed from the stored
 * values, V rows byte for byte). */
static int write_kv_b(gguf_writer *w, const struct ds2_cfg *c, const float *kb, const float *vb,
		      int keep)
{
	const int64_t H = c->n_head, np = c->nope, hv = c->v_head, kvr = c->kv_lora;
	const int64_t rows = H * (np + hv);
	const uint32_t T = c->kv_b_type;
	const size_t rb = kern_row_bytes(T, kvr);
	float *kv = malloc(sizeof(float) * (size_t)(rows * kvr));
	char *q = malloc(rb * (size_t)rows);
	float *kt = malloc(sizeof(float) * (size_t)(H * kvr * np));
	int rc = kv && q && kt ? 0 : ERR_NOMEM;
	for (int64_t h = 0; h < H && !rc; h++) {
		for (int64_t i = 0; i < np; i++)
			for (int64_t x = 0; x < kvr; x++)
				kv[(h * (np + hv) + i) * kvr + x] = kb[(h * kvr + x) * np + i];
		for (int64_t j = 0; j < hv; j++)
			memcpy(kv + (h * (np + hv) + np + j) * kvr, vb + (h * hv + j) * kvr,
			       sizeof(float) * (size_t)kvr);
	}
	if (!rc && c->layout == LAYOUT_KV_B) {
		const int64_t n_rows = c->kv_b_rows ? (int64_t)c->kv_b_rows : rows;
		for (int64_t r = 0; r < n_rows && !rc && keep; r++)
			rc = write_rows(w, T, kv + (r % rows) * kvr, kvr, 1);
	} else if (!rc) {
		/* the stored attn_kv_b, then k_b from its dequantised K rows */
		float *row = malloc(sizeof(float) * (size_t)kvr);
		rc = row ? 0 : ERR_NOMEM;
		for (int64_t r = 0; r < rows && !rc; r++) {
			if (T == KERN_Q8_0) {
				kern_convert_row(KERN_Q8_0, kv + r * kvr, q + (size_t)r * rb, kvr);
				kern_dequant_row(KERN_Q8_0, q + (size_t)r * rb, row, kvr);
				memcpy(kv + r * kvr, row, sizeof(float) * (size_t)kvr);
			}
		}
		free(row);
		for (int64_t h = 0; h < H && !rc; h++)
			for (int64_t x = 0; x < kvr; x++)
				for (int64_t i = 0; i < np; i++)
					kt[(h * kvr + x) * np + i] =
					    kv[(h * (np + hv) + i) * kvr + x];
		if (!rc && keep)
			rc = write_rows(w, built_k_b_type(c), kt, np, H * kvr);
		for (int64_t h = 0; h < H && !rc && keep; h++)
			for (int64_t j = 0; j < hv && !rc; j++) {
				const int64_t r = h * (np + hv) + np + j;
				rc = T == KERN_Q8_0 ? gguf_writer_write(w, q + (size_t)r * rb, rb)
						    : write_rows(w, T, kv + r * kvr, kvr, 1);
			}
	}
	free(kv);
	free(q);
	free(kt);
	return rc;
}

/* Writes c as tmp_path; returns 0 on success. */
static int write_model(const struct ds2_cfg *c)
{
	gguf_writer *w = NULL;
	int rc = gguf_writer_new(&w);
	if (rc)
		return rc;
	rc |= gguf_writer_set_str(w, "general.architecture", "deepseek2");
	rc |= set_u32(w, "vocab_size", (uint32_t)c->n_vocab);
	rc |= set_u32(w, "context_length", 4096);
	rc |= set_u32(w, "embedding_length", (uint32_t)c->n_embd);
	rc |= set_u32(w, "block_count", (uint32_t)(c->n_layer + c->nextn));
	if (c->nextn)
		rc |= set_u32(w, "nextn_predict_layers", (uint32_t)c->nextn);
	rc |= set_u32(w, "feed_forward_length", (uint32_t)c->n_ff);
	rc |= set_u32(w, "attention.head_count", (uint32_t)c->n_head);
	const int legacy = c->layout == LAYOUT_KV_B;
	rc |= set_u32(w, "attention.head_count_kv", legacy ? (uint32_t)c->n_head : 1);
	rc |= set_f32(w, "attention.layer_norm_rms_epsilon", 1e-6f);
	rc |= set_f32(w, "rope.freq_base", 10000.0f);
	rc |= set_u32(w, "expert_count", (uint32_t)c->n_expert);
	rc |= set_u32(w, "expert_used_count", (uint32_t)c->n_used);
	rc |= set_u32(w, "expert_feed_forward_length", (uint32_t)c->n_ff_exp);
	rc |= set_u32(w, "leading_dense_block_count", (uint32_t)c->n_dense);
	rc |= set_u32(w, "attention.q_lora_rank", (uint32_t)c->q_lora);
	rc |= set_u32(w, "attention.kv_lora_rank", (uint32_t)c->kv_lora);
	if (legacy) {
		rc |= set_u32(w, "attention.key_length", (uint32_t)(c->nope + c->rope));
		rc |= set_u32(w, "attention.value_length", (uint32_t)c->v_head);
	} else {
		rc |= set_u32(w, "attention.key_length", (uint32_t)(c->kv_lora + c->rope));
		rc |= set_u32(w, "attention.value_length", (uint32_t)c->kv_lora);
		rc |= set_u32(w, "attention.key_length_mla", (uint32_t)(c->nope + c->rope));
		rc |= set_u32(w, "attention.value_length_mla", (uint32_t)c->v_head);
	}
	rc |= set_u32(w, "rope.dimension_count", (uint32_t)c->rope);
	rc |= set_u32(w, "expert_shared_count", (uint32_t)c->n_shared);
	rc |= set_f32(w, "expert_weights_scale", c->scale);
	rc |= gguf_writer_set_bool(w, "deepseek2.expert_weights_norm", c->norm);
	rc |= set_u32(w, "expert_gating_func", (uint32_t)c->gating);
	if (c->n_group) {
		rc |= set_u32(w, "expert_group_count", (uint32_t)c->n_group);
		rc |= set_u32(w, "expert_group_used_count", (uint32_t)c->n_group_used);
	}
	if (c->rope_type) {
		rc |= gguf_writer_set_str(w, "deepseek2.rope.scaling.type", c->rope_type);
		rc |= set_f32(w, "rope.scaling.factor", c->rope_factor);
		rc |= set_u32(w, "rope.scaling.original_context_length", 512);
		rc |= set_f32(w, "rope.scaling.yarn_log_multiplier", c->yarn_log_mul);
	}
	if (c->ov_key) {
		if (c->ov_type == GGUF_TYPE_STRING)
			rc |= gguf_writer_set_str(w, c->ov_key, c->ov_str);
		else if (c->ov_type == GGUF_TYPE_I32)
			rc |= gguf_writer_set_i32(w, c->ov_key, (int32_t)c->ov_u32);
		else if (c->ov_type == GGUF_TYPE_F32)
			rc |= gguf_writer_set_f32(w, c->ov_key, (float)c->ov_u32);
		else
			rc |= gguf_writer_set_u32(w, c->ov_key, c->ov_u32);
	}
	describe(c);
	for (int i = 0; i < n_tensors && !rc; i++) {
		const struct ds2_tensor *t = &tensors[i];
		if (!kept(c, i))
			continue;
		uint32_t type = t->type;
		if (c->layout != LAYOUT_SPLIT && is_mla_b(t->name, "attn_k_b.weight")) {
			if (c->layout == LAYOUT_KV_B) {
				char name[64];
				kv_b_name(t->name, name);
				const uint64_t rows =
				    c->kv_b_rows ? c->kv_b_rows
						 : (uint64_t)c->n_head * (c->nope + c->v_head);
				const uint64_t ne[2] = {(uint64_t)c->kv_lora, rows};
				rc = gguf_writer_add_tensor(w, name, c->kv_b_type, 2, ne);
				i++; /* attn_v_b is part of it */
				continue;
			}
			type = built_k_b_type(c);
		} else if (c->layout == LAYOUT_BUILT && is_mla_b(t->name, "attn_v_b.weight")) {
			type = c->kv_b_type;
		}
		rc = gguf_writer_add_tensor(w, t->name, type, t->n_dims, t->ne);
	}
	if (!rc)
		rc = gguf_writer_open(w, tmp_path);
	rng_state = 12345;
	for (int i = 0; i < n_tensors && !rc; i++) {
		const struct ds2_tensor *t = &tensors[i];
		const int keep = kept(c, i);
		float *v = draw(t);
		if (!v) {
			rc = ERR_NOMEM;
		} else if (c->layout != LAYOUT_SPLIT && is_mla_b(t->name, "attn_k_b.weight")) {
			float *vb = draw(&tensors[i + 1]);
			rc = vb ? write_kv_b(w, c, v, vb, keep) : ERR_NOMEM;
			free(vb);
			i++;
		} else if (keep) {
			rc = write_rows(w, t->type, v, (int64_t)t->ne[0],
					(int64_t)(t->ne[1] * t->ne[2]));
		}
		free(v);
	}
	if (!rc)
		rc = gguf_writer_commit(w);
	gguf_writer_destroy(&w);
	return rc;
}

static model *open_tmp(int n_batch, int n_seq)
{
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = 2;
	mp.n_ctx = 64;
	mp.n_seq = n_seq;
	mp.n_batch = n_batch;
	model *m = NULL;
	if (model_open(tmp_path, &mp, &m))
		return NULL;
	return m;
}

/* ------------------------------------------------------------------- tests */

#define N_TOK 24
static const int32_t toks[N_TOK] = {5,	17, 33, 2,  90, 41, 41, 7, 63, 12, 0,  95,
				    28, 54, 3,	77, 19, 86, 44, 8, 61, 30, 11, 70};

/* Prefill of all tokens (one batch), all logits. */
static int prefill(model *m, int seq, int n, const uint8_t *want, float *out)
{
	int32_t pos[N_TOK], sq[N_TOK];
	for (int i = 0; i < n; i++) {
		pos[i] = i;
		sq[i] = seq;
	}
	model_batch b = {n, toks, pos, sq, want};
	return model_forward(m, &b, out);
}

static void check_finite(const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		assert_true(isfinite(x[i]));
}

static void run_variant(const struct ds2_cfg *c, const char *what)
{
	assert_int_equal(write_model(c), 0);
	model *m = open_tmp(512, 1);
	if (!m)
		print_message("variant %s: model_open failed\n", what);
	assert_non_null(m);
	const int V = model_get_info(m)->n_vocab;
	assert_int_equal(V, c->n_vocab);
	assert_int_equal(model_get_info(m)->n_layer, c->n_layer);
	float *out = malloc(sizeof(float) * N_TOK * (size_t)V);
	assert_int_equal(prefill(m, 0, N_TOK, NULL, out), 0);
	check_finite(out, (size_t)N_TOK * V);
	free(out);
	model_destroy(&m);
}

static void test_variants(void **state)
{
	(void)state;
	struct ds2_cfg c;
	c = base_cfg;
	run_variant(&c, "base");
	c = base_cfg;
	c.q_lora = 0;
	run_variant(&c, "plain attn_q");
	c = base_cfg;
	c.n_group = 0;
	c.gating = 1;
	c.bias = 0;
	c.norm = 0;
	c.scale = 1.0f;
	run_variant(&c, "DeepSeek-V2 routing");
	c = base_cfg;
	c.rope_type = NULL;
	run_variant(&c, "no rope scaling keys");
	c = base_cfg;
	c.rope_type = "none";
	run_variant(&c, "rope scaling none");
	c = base_cfg;
	c.rope_type = "linear";
	c.rope_factor = 4.0f;
	run_variant(&c, "linear rope");
	c = base_cfg;
	c.yarn_log_mul = 0.0f;
	run_variant(&c, "yarn without log multiplier");
	c = base_cfg;
	c.n_dense = 0;
	c.tied = 1;
	c.weight_type = KERN_F32;
	run_variant(&c, "no dense layer, tied output, F32");
	c = base_cfg;
	c.n_used = 1;
	c.n_shared = 2;
	c.n_dense = 3;
	run_variant(&c, "all dense");
	c = base_cfg;
	c.nextn = 1;
	run_variant(&c, "nextn layer ignored");
	c = base_cfg;
	c.n_expert = 16;
	c.n_group = 8;
	c.n_group_used = 3;
	c.n_used = 6;
	run_variant(&c, "8 groups");
}

/* Prefill == micro-batches of 5 == a subset of rows, bit for bit (fewer than
 * 64 tokens: the same attention kernel everywhere; at least 2 rows per product:
 * the same F16/F32 GEMM form), and == decode one token at a time within a
 * tolerance of 1% of the largest logit: as llama.cpp, a one-row product of
 * F16/F32 weights takes ggml_vec_dot's summation order instead of the GEMM's
 * (kern_matmul_form), which can also move a router's choice. */
static void test_invariants(void **state)
{
	(void)state;
	assert_int_equal(write_model(&base_cfg), 0);
	model *m = open_tmp(512, 2);
	assert_non_null(m);
	const int V = model_get_info(m)->n_vocab;
	const size_t row = sizeof(float) * (size_t)V;
	float *ref = malloc(row * N_TOK), *got = malloc(row * N_TOK);
	assert_int_equal(prefill(m, 0, N_TOK, NULL, ref), 0);

	/* decodes on slot 1 */
	for (int i = 0; i < N_TOK; i++) {
		int32_t pos = i, seq = 1;
		model_batch d = {1, toks + i, &pos, &seq, NULL};
		assert_int_equal(model_forward(m, &d, got + (size_t)i * V), 0);
	}
	float maxd = 0.0f, maxr = 0.0f;
	for (size_t i = 0; i < (size_t)N_TOK * (size_t)V; i++) {
		maxd = fmaxf(maxd, fabsf(got[i] - ref[i]));
		maxr = fmaxf(maxr, fabsf(ref[i]));
	}
	if (!(maxd <= 0.01f * maxr)) {
		print_error("decode vs prefill: max |diff| %g (max |logit| %g)\n", (double)maxd,
			    (double)maxr);
		fail();
	}

	/* only rows 3 and the last */
	model_reset_seq(m, 1);
	uint8_t want[N_TOK] = {0};
	want[3] = want[N_TOK - 1] = 1;
	assert_int_equal(prefill(m, 1, N_TOK, want, got), 0);
	assert_memory_equal(got, ref + 3 * (size_t)V, row);
	assert_memory_equal(got + V, ref + (size_t)(N_TOK - 1) * V, row);
	model_destroy(&m);

	/* micro-batches of 5 */
	m = open_tmp(5, 1);
	assert_non_null(m);
	assert_int_equal(prefill(m, 0, N_TOK, NULL, got), 0);
	assert_memory_equal(ref, got, row * N_TOK);
	model_destroy(&m);
	free(ref);
	free(got);
}

/* All N_TOK logits of c prefilled in one batch into a new buffer. */
static float *logits_of(const struct ds2_cfg *c)
{
	if (write_model(c))
		return NULL;
	model *m = open_tmp(512, 1);
	if (!m)
		return NULL;
	float *out = malloc(sizeof(float) * N_TOK * (size_t)c->n_vocab);
	if (out && prefill(m, 0, N_TOK, NULL, out)) {
		free(out);
		out = NULL;
	}
	model_destroy(&m);
	return out;
}

/* Legacy layout (attn_kv_b) against the split layout holding the same
 * values: bit for bit the same logits, for attn_kv_b in F32, F16 and BF16
 * (kept as they are) and in Q8_0 (k_b built as Q8_0, or F16 when nope is not a
 * multiple of 32, the V rows used in place). */
static void test_legacy_layout(void **state)
{
	(void)state;
	static const struct {
		uint32_t type;
		int nope, q_lora;
	} cases[] = {
	    {KERN_F32, 16, 32},	 {KERN_F16, 16, 32},  {KERN_F16, 24, 0},
	    {KERN_BF16, 16, 32}, {KERN_Q8_0, 32, 32}, {KERN_Q8_0, 16, 0},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct ds2_cfg c = base_cfg;
		c.weight_type = cases[i].type == KERN_Q8_0 ? KERN_F16 : cases[i].type;
		c.nope = cases[i].nope;
		c.q_lora = cases[i].q_lora;
		c.kv_b_type = cases[i].type;
		c.layout = cases[i].type == KERN_Q8_0 ? LAYOUT_BUILT : LAYOUT_SPLIT;
		float *split = logits_of(&c);
		c.layout = LAYOUT_KV_B;
		float *legacy = logits_of(&c);
		assert_non_null(split);
		assert_non_null(legacy);
		check_finite(legacy, (size_t)N_TOK * c.n_vocab);
		if (memcmp(split, legacy, sizeof(float) * N_TOK * (size_t)c.n_vocab) != 0)
			print_message("attn_kv_b %s, nope %d: logits differ from the split "
				      "layout\n",
				      kern_type_name(cases[i].type), cases[i].nope);
		assert_memory_equal(split, legacy, sizeof(float) * N_TOK * (size_t)c.n_vocab);
		free(split);
		free(legacy);
	}
}

struct bad_case {
	const char *what;
	const char *key;
	enum gguf_type type;
	uint32_t u;
	const char *s;
	const char *drop;
};

/* model_open of base_cfg changed as bc says (in the given layout, with
 * kv_b_rows rows of attn_kv_b when not 0) must fail with ERR_FORMAT. */
static void expect_reject(const struct bad_case *bc, enum ds2_layout layout, uint64_t kv_b_rows)
{
	struct ds2_cfg c = base_cfg;
	c.layout = layout;
	c.kv_b_type = KERN_F16;
	c.kv_b_rows = kv_b_rows;
	c.ov_key = bc->key;
	c.ov_type = bc->type;
	c.ov_u32 = bc->u;
	c.ov_str = bc->s;
	c.drop_tensor = bc->drop;
	assert_int_equal(write_model(&c), 0);
	struct model_params mp;
	model_params_default(&mp);
	mp.n_ctx = 64;
	model *m = NULL;
	int rc = model_open(tmp_path, &mp, &m);
	if (rc != ERR_FORMAT)
		print_message("case '%s': model_open returned %d\n", bc->what, rc);
	assert_int_equal(rc, ERR_FORMAT);
	assert_null(m);
}

static void test_rejects(void **state)
{
	(void)state;
	static const struct bad_case cases[] = {
	    {"two KV heads", "deepseek2.attention.head_count_kv", GGUF_TYPE_U32, 2, NULL, NULL},
	    {"key length", "deepseek2.attention.key_length", GGUF_TYPE_U32, 41, NULL, NULL},
	    {"odd rope dims", "deepseek2.rope.dimension_count", GGUF_TYPE_U32, 7, NULL, NULL},
	    {"rope dims too large", "deepseek2.rope.dimension_count", GGUF_TYPE_U32, 24, NULL,
	     NULL},
	    {"gating 3", "deepseek2.expert_gating_func", GGUF_TYPE_U32, 3, NULL, NULL},
	    {"rope type", "deepseek2.rope.scaling.type", GGUF_TYPE_STRING, 0, "longrope", NULL},
	    {"groups used 0", "deepseek2.expert_group_used_count", GGUF_TYPE_U32, 0, NULL, NULL},
	    {"groups used all", "deepseek2.expert_group_used_count", GGUF_TYPE_U32, 4, NULL, NULL},
	    {"groups not dividing", "deepseek2.expert_group_count", GGUF_TYPE_U32, 3, NULL, NULL},
	    {"one expert per group", "deepseek2.expert_group_count", GGUF_TYPE_U32, 8, NULL, NULL},
	    {"top-k > experts", "deepseek2.expert_used_count", GGUF_TYPE_U32, 9, NULL, NULL},
	    {"no shared expert", "deepseek2.expert_shared_count", GGUF_TYPE_U32, 0, NULL, NULL},
	    {"dense > layers", "deepseek2.leading_dense_block_count", GGUF_TYPE_U32, 4, NULL, NULL},
	    {"vocab size", "deepseek2.vocab_size", GGUF_TYPE_U32, 95, NULL, NULL},
	    {"i32 head count", "deepseek2.attention.head_count", GGUF_TYPE_I32, 4, NULL, NULL},
	    {"too many layers", "deepseek2.block_count", GGUF_TYPE_U32, 100000, NULL, NULL},
	    {"nextn = all layers", "deepseek2.nextn_predict_layers", GGUF_TYPE_U32, 3, NULL, NULL},
	    {"temperature tuning", "deepseek2.attention.temperature_scale", GGUF_TYPE_F32, 2, NULL,
	     NULL},
	    {"q_lora without tensors", "deepseek2.attention.q_lora_rank", GGUF_TYPE_U32, 0, NULL,
	     NULL},
	    {"missing k_b", NULL, 0, 0, NULL, "blk.2.attn_k_b.weight"},
	    {"missing shared expert", NULL, 0, 0, NULL, "blk.1.ffn_up_shexp.weight"},
	    {"missing routed experts", NULL, 0, 0, NULL, "blk.2.ffn_down_exps.weight"},
	    {"missing router", NULL, 0, 0, NULL, "blk.1.ffn_gate_inp.weight"},
	    {"missing output norm", NULL, 0, 0, NULL, "output_norm.weight"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		expect_reject(&cases[i], LAYOUT_SPLIT, 0);

	/* legacy layout: attn_kv_b of 4 heads x (16 + 16) rows of 32 */
	static const struct {
		struct bad_case bc;
		uint64_t kv_b_rows;
	} legacy[] = {
	    {{"kv_b: missing", NULL, 0, 0, NULL, "blk.1.attn_kv_b.weight"}, 0},
	    {{"kv_b: rows", NULL, 0, 0, NULL, NULL}, 4 * 32 - 1},
	    {{"kv_b: rows of a split head", NULL, 0, 0, NULL, NULL}, 4 * 40},
	    {{"kv_b: one KV head", "deepseek2.attention.head_count_kv", GGUF_TYPE_U32, 1, NULL,
	      NULL},
	     0},
	    {{"kv_b: value length", "deepseek2.attention.value_length", GGUF_TYPE_U32, 0, NULL,
	      NULL},
	     0},
	    {{"kv_b: key length = rope", "deepseek2.attention.key_length", GGUF_TYPE_U32, 8, NULL,
	      NULL},
	     0},
	    {{"kv_b: key length", "deepseek2.attention.key_length", GGUF_TYPE_U32, 32, NULL, NULL},
	     0},
	    {{"kv_b: only key_length_mla", "deepseek2.attention.key_length_mla", GGUF_TYPE_U32, 24,
	      NULL, NULL},
	     0},
	};
	for (size_t i = 0; i < sizeof(legacy) / sizeof(legacy[0]); i++)
		expect_reject(&legacy[i].bc, LAYOUT_KV_B, legacy[i].kv_b_rows);
}

int main(void)
{
	snprintf(tmp_path, sizeof(tmp_path), "/tmp/moefleet-test-ds2-%d.gguf", (int)getpid());
	log_set_quiet(1);
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_variants),
	    cmocka_unit_test(test_invariants),
	    cmocka_unit_test(test_legacy_layout),
	    cmocka_unit_test(test_rejects),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	unlink(tmp_path);
	return rc;
}
