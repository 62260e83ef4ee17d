/* The deepseek2 forward pass (coordinator/arch_deepseek2.c) on small random
 * models written here with gguf_writer, no llama.cpp needed:
 *  - every feature combination loads and gives finite logits (q_lora or plain
 *    attn_q, group routing on/off, sigmoid/softmax gating, selection bias
 *    on/off, weight normalisation and scale, YaRN/linear/no RoPE scaling,
 *    dense lead layers, tied output, nextn layers);
 *  - bit-exact invariants: a prefill equals the same tokens decoded one at a
 *    time, asking for a subset of the logits gives the same rows, a batch
 *    split into micro-batches gives the same logits;
 *  - bad hyper-parameters and missing tensors fail model_open with ERR_FORMAT
 *    (no crash).
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
#include "../coordinator/model.h"
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
	uint32_t weight_type; /* KERN_F32 or KERN_F16 for the matrices */
	/* one metadata override (key NULL: none), written last */
	const char *ov_key;
	enum gguf_type ov_type;
	uint32_t ov_u32;
	const char *ov_str;
	const char *drop_tensor; /* a tensor left out, or NULL */
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
	rc |= set_u32(w, "attention.head_count_kv", 1);
	rc |= set_f32(w, "attention.layer_norm_rms_epsilon", 1e-6f);
	rc |= set_f32(w, "rope.freq_base", 10000.0f);
	rc |= set_u32(w, "expert_count", (uint32_t)c->n_expert);
	rc |= set_u32(w, "expert_used_count", (uint32_t)c->n_used);
	rc |= set_u32(w, "expert_feed_forward_length", (uint32_t)c->n_ff_exp);
	rc |= set_u32(w, "leading_dense_block_count", (uint32_t)c->n_dense);
	rc |= set_u32(w, "attention.q_lora_rank", (uint32_t)c->q_lora);
	rc |= set_u32(w, "attention.kv_lora_rank", (uint32_t)c->kv_lora);
	rc |= set_u32(w, "attention.key_length", (uint32_t)(c->kv_lora + c->rope));
	rc |= set_u32(w, "attention.value_length", (uint32_t)c->kv_lora);
	rc |= set_u32(w, "attention.key_length_mla", (uint32_t)(c->nope + c->rope));
	rc |= set_u32(w, "attention.value_length_mla", (uint32_t)c->v_head);
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
	for (int i = 0; i < n_tensors && !rc; i++)
		if (!c->drop_tensor || strcmp(c->drop_tensor, tensors[i].name) != 0)
			rc = gguf_writer_add_tensor(w, tensors[i].name, tensors[i].type,
						    tensors[i].n_dims, tensors[i].ne);
	if (!rc)
		rc = gguf_writer_open(w, tmp_path);
	rng_state = 12345;
	for (int i = 0; i < n_tensors && !rc; i++) {
		const struct ds2_tensor *t = &tensors[i];
		const uint64_t n = t->ne[0] * t->ne[1] * t->ne[2];
		int keep = !c->drop_tensor || strcmp(c->drop_tensor, t->name) != 0;
		for (uint64_t j = 0; j < n && !rc; j++) {
			float v = t->mean + t->std * rng_normal();
			if (!keep)
				continue;
			if (t->type == KERN_F16) {
				uint16_t h = kern_f32_to_f16(v);
				rc = gguf_writer_write(w, &h, 2);
			} else {
				rc = gguf_writer_write(w, &v, 4);
			}
		}
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

struct bad_case {
	const char *what;
	const char *key;
	enum gguf_type type;
	uint32_t u;
	const char *s;
	const char *drop;
};

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
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct ds2_cfg c = base_cfg;
		c.ov_key = cases[i].key;
		c.ov_type = cases[i].type;
		c.ov_u32 = cases[i].u;
		c.ov_str = cases[i].s;
		c.drop_tensor = cases[i].drop;
		assert_int_equal(write_model(&c), 0);
		struct model_params mp;
		model_params_default(&mp);
		mp.n_ctx = 64;
		model *m = NULL;
		int rc = model_open(tmp_path, &mp, &m);
		if (rc != ERR_FORMAT)
			print_message("case '%s': model_open returned %d\n", cases[i].what, rc);
		assert_int_equal(rc, ERR_FORMAT);
		assert_null(m);
	}
}

int main(void)
{
	snprintf(tmp_path, sizeof(tmp_path), "/tmp/moefleet-test-ds2-%d.gguf", (int)getpid());
	log_set_quiet(1);
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_variants),
	    cmocka_unit_test(test_invariants),
	    cmocka_unit_test(test_rejects),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	unlink(tmp_path);
	return rc;
}
