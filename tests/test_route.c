/* test_route: expert selection (coordinator/model/route.c).
 *
 * The default selection is checked against a separate, deliberately naive
 * statement of each architecture's rule (llama.cpp build_moe_ffn: sort all
 * experts by selection score, keep the group limit, take the first k, weigh)
 * on random router logits; top-p against hand-made score vectors whose
 * cumulative sums are known; the options parsers against good and bad input. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "coordinator/model/route.h"
#include "common/err.h"

#define X_MAX 64

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float rnd(void)
{
	rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
	return (float)((rng_state >> 40) & 0xffffff) / 16777216.0f * 8.0f - 4.0f;
}

/* ------------------------------------------------------ naive reference */

struct ref_item {
	float sel;
	int id;
};

static int ref_cmp(const void *a, const void *b)
{
	const struct ref_item *x = a, *y = b;
	if (x->sel != y->sel)
		return x->sel > y->sel ? -1 : 1;
	return x->id - y->id;
}

/* Gating written out independently of route_gate. */
static void ref_gate(enum route_gating g, const float *logit, int X, float *s)
{
	if (g == ROUTE_GATING_SOFTMAX) {
		float mx = logit[0];
		for (int e = 1; e < X; e++)
			mx = logit[e] > mx ? logit[e] : mx;
		double sum = 0.0;
		for (int e = 0; e < X; e++) {
			s[e] = expf(logit[e] - mx);
			sum += s[e];
		}
		for (int e = 0; e < X; e++)
			s[e] = (float)(s[e] / sum);
	} else if (g == ROUTE_GATING_SIGMOID) {
		for (int e = 0; e < X; e++)
			s[e] = 1.0f / (1.0f + expf(-logit[e]));
	} else if (g == ROUTE_GATING_SQRT_SOFTPLUS) {
		for (int e = 0; e < X; e++)
			s[e] = sqrtf(logit[e] > 20.0f ? logit[e] : log1pf(expf(logit[e])));
	} else {
		memcpy(s, logit, (size_t)X * sizeof(float));
	}
}

/* ids/weights of the rule, by sorting. */
static void ref_select(const struct route_rule *r, const float *s, const float *bias, int32_t *ids,
		       float *w)
{
	const int X = r->n_expert;
	struct ref_item it[X_MAX];
	for (int e = 0; e < X; e++) {
		it[e].sel = bias ? s[e] + bias[e] : s[e];
		it[e].id = e;
	}
	if (r->n_group > 1) {
		const int per = X / r->n_group;
		struct ref_item gsc[X_MAX], tmp[X_MAX];
		for (int g = 0; g < r->n_group; g++) {
			memcpy(tmp, it + g * per, (size_t)per * sizeof(tmp[0]));
			qsort(tmp, (size_t)per, sizeof(tmp[0]), ref_cmp);
			gsc[g].sel = tmp[0].sel + tmp[1].sel;
			gsc[g].id = g;
		}
		qsort(gsc, (size_t)r->n_group, sizeof(gsc[0]), ref_cmp);
		for (int j = r->n_group_used; j < r->n_group; j++)
			for (int i = 0; i < per; i++)
				it[gsc[j].id * per + i].sel = -INFINITY;
	}
	qsort(it, (size_t)X, sizeof(it[0]), ref_cmp);
	for (int j = 0; j < r->k; j++) {
		ids[j] = it[j].id;
		w[j] = s[it[j].id];
	}
	if (r->gating == ROUTE_GATING_SOFTMAX_CHOSEN) {
		float mx = w[0];
		double sum = 0.0;
		for (int j = 0; j < r->k; j++) {
			w[j] = expf(w[j] - mx);
			sum += w[j];
		}
		for (int j = 0; j < r->k; j++)
			w[j] = (float)(w[j] / sum);
		return;
	}
	if (r->norm) {
		double sum = 0.0;
		for (int j = 0; j < r->k; j++)
			sum += w[j];
		for (int j = 0; j < r->k; j++)
			w[j] = w[j] / (float)sum;
	}
	if (r->scale != 0.0f && r->scale != 1.0f)
		for (int j = 0; j < r->k; j++)
			w[j] *= r->scale;
}

/* Runs route_gate + route_select with default options on random logits and
 * compares with the reference: ids exactly, weights within float rounding. */
static void check_rule(const struct route_rule *r, int with_bias)
{
	unsigned char scratch[8192];
	assert_true(route_scratch_bytes(r) <= sizeof(scratch));
	assert_int_equal(route_slots(r, NULL), r->k);
	for (int trial = 0; trial < 200; trial++) {
		float logit[X_MAX], s[X_MAX], s_ref[X_MAX], bias[X_MAX];
		for (int e = 0; e < r->n_expert; e++) {
			logit[e] = rnd();
			bias[e] = with_bias ? rnd() * 0.05f : 0.0f;
		}
		if (trial % 7 == 0) /* ties: ids must go to the lower expert first */
			logit[3] = logit[5] = logit[1];
		memcpy(s, logit, sizeof(s));
		route_gate(r, s);
		ref_gate(r->gating, logit, r->n_expert, s_ref);
		for (int e = 0; e < r->n_expert; e++)
			assert_float_equal(s[e], s_ref[e], 1e-6f);
		int32_t ids[X_MAX], ids_ref[X_MAX];
		float w[X_MAX], w_ref[X_MAX];
		struct route_opts def;
		route_opts_default(&def);
		int n = route_select(r, trial % 2 ? &def : NULL, s, with_bias ? bias : NULL,
				     scratch, ids, w);
		assert_int_equal(n, r->k);
		ref_select(r, s, with_bias ? bias : NULL, ids_ref, w_ref);
		for (int j = 0; j < r->k; j++) {
			assert_int_equal(ids[j], ids_ref[j]);
			assert_float_equal(w[j], w_ref[j], 2e-6f * (fabsf(w_ref[j]) + 1.0f));
		}
	}
}

static void test_default_rules(void **state)
{
	(void)state;
	/* qwen3moe: softmax, top-k, renormalised */
	struct route_rule qwen = {.n_expert = 16,
				  .k = 4,
				  .gating = ROUTE_GATING_SOFTMAX,
				  .norm = 1,
				  .norm_min = 6.103515625e-5f};
	check_rule(&qwen, 0);
	/* deepseek2 (V2): softmax, no norm, scale */
	struct route_rule ds2 = {
	    .n_expert = 16, .k = 6, .gating = ROUTE_GATING_SOFTMAX, .scale = 16.0f};
	check_rule(&ds2, 0);
	/* deepseek3 / glm: sigmoid, selection bias, groups, norm, scale */
	struct route_rule ds3 = {.n_expert = 32,
				 .k = 4,
				 .gating = ROUTE_GATING_SIGMOID,
				 .n_group = 8,
				 .n_group_used = 3,
				 .norm = 1,
				 .norm_min = 6.103515625e-5f,
				 .scale = 2.5f};
	check_rule(&ds3, 1);
	/* deepseek4: sqrt(softplus), bias, norm, scale */
	struct route_rule ds4 = {.n_expert = 24,
				 .k = 6,
				 .gating = ROUTE_GATING_SQRT_SOFTPLUS,
				 .norm = 1,
				 .norm_min = 6.103515625e-5f,
				 .scale = 1.5f};
	check_rule(&ds4, 1);
	/* gpt-oss: top-k on logits, softmax over the chosen */
	struct route_rule oss = {.n_expert = 32, .k = 4, .gating = ROUTE_GATING_SOFTMAX_CHOSEN};
	check_rule(&oss, 0);
}

/* Scores s (softmax-style rule): 0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02 for
 * experts 6, 5, 4, 3, 2, 1, 0. */
static const float topp_s[7] = {0.02f, 0.03f, 0.05f, 0.10f, 0.15f, 0.25f, 0.40f};

static int run_topp(const struct route_rule *r, const char *spec, int32_t *ids, float *w)
{
	struct route_opts o;
	route_opts_default(&o);
	assert_int_equal(route_parse_routing(spec, &o), 0);
	assert_int_equal(route_check(r, &o, "test"), 0);
	unsigned char scratch[1024];
	return route_select(r, &o, topp_s, NULL, scratch, ids, w);
}

static void test_topp(void **state)
{
	(void)state;
	struct route_rule r = {.n_expert = 7,
			       .k = 4,
			       .gating = ROUTE_GATING_SOFTMAX,
			       .norm = 1,
			       .norm_min = 6.103515625e-5f};
	int32_t ids[8];
	float w[8];
	/* the 4 candidates hold 0.90: shares 0.44, 0.28, 0.17, 0.11; 0.44 + 0.28 >= 0.6:
	 * two experts, weights renormalised over them */
	assert_int_equal(run_topp(&r, "topp:0.6", ids, w), 2);
	assert_int_equal(ids[0], 6);
	assert_int_equal(ids[1], 5);
	assert_float_equal(w[0], 0.40f / 0.65f, 1e-6f);
	assert_float_equal(w[1], 0.25f / 0.65f, 1e-6f);
	assert_int_equal(ids[2], -1); /* empty slots up to route_slots() = k */
	assert_int_equal(ids[3], -1);
	assert_true(w[2] == 0.0f && w[3] == 0.0f);
	/* 0.44 >= 0.3: one expert, weight 1 */
	assert_int_equal(run_topp(&r, "topp:0.3", ids, w), 1);
	assert_float_equal(w[0], 1.0f, 1e-6f);
	/* min clamps up */
	assert_int_equal(run_topp(&r, "topp:0.3,min=3", ids, w), 3);
	assert_int_equal(ids[2], 4);
	/* the default max is the model's k: 0.95 of the 4 candidates needs all 4 */
	assert_int_equal(run_topp(&r, "topp:0.95", ids, w), 4);
	/* max 6: candidates sum 0.98; 0.93 is reached after 5 (0.95 / 0.98) */
	assert_int_equal(
	    route_slots(&r,
			&(struct route_opts){.mode = ROUTE_MODE_TOPP, .top_p = 0.93f, .k_max = 6}),
	    6);
	assert_int_equal(run_topp(&r, "topp:0.93,max=6", ids, w), 5);
	assert_int_equal(ids[4], 2);
	assert_int_equal(ids[5], -1);
	/* min = max = k, T = 1: exactly the default selection */
	int32_t ids_d[8];
	float w_d[8];
	unsigned char scratch[1024];
	assert_int_equal(route_select(&r, NULL, topp_s, NULL, scratch, ids_d, w_d), 4);
	assert_int_equal(run_topp(&r, "topp:1.0,min=4,max=4", ids, w), 4);
	assert_memory_equal(ids, ids_d, 4 * sizeof(int32_t));
	assert_memory_equal(w, w_d, 4 * sizeof(float));

	/* sigmoid-style scores are normalised by the candidates' sum:
	 * 2 + 1 + 1 of total 4 -> 0.5, 0.75, 1.0 */
	struct route_rule sg = {.n_expert = 3,
				.k = 3,
				.gating = ROUTE_GATING_SIGMOID,
				.norm = 1,
				.norm_min = 6.103515625e-5f,
				.scale = 2.0f};
	const float s3[3] = {1.0f, 2.0f, 1.0f};
	struct route_opts o;
	route_opts_default(&o);
	assert_int_equal(route_parse_routing("topp:0.7", &o), 0);
	assert_int_equal(route_select(&sg, &o, s3, NULL, scratch, ids, w), 2);
	assert_int_equal(ids[0], 1);
	assert_int_equal(ids[1], 0); /* tie with expert 2: lower id first */
	assert_float_equal(w[0], 2.0f * 2.0f / 3.0f, 1e-6f);
	assert_float_equal(w[1], 2.0f * 1.0f / 3.0f, 1e-6f);
}

static void test_bias(void **state)
{
	(void)state;
	struct route_rule r = {.n_expert = 7,
			       .k = 2,
			       .gating = ROUTE_GATING_SOFTMAX,
			       .norm = 1,
			       .norm_min = 6.103515625e-5f};
	struct route_opts o;
	route_opts_default(&o);
	assert_int_equal(route_parse_bias("0,2:1.0", &o), 0);
	assert_int_equal(o.n_bias, 2);
	assert_int_equal(route_check(&r, &o, "test"), 0);
	int32_t ids[4];
	float w[4];
	unsigned char scratch[1024];
	/* 0.02 + 1 and 0.05 + 1 now beat 0.40: experts 2 then 0 */
	assert_int_equal(route_select(&r, &o, topp_s, NULL, scratch, ids, w), 2);
	assert_int_equal(ids[0], 2);
	assert_int_equal(ids[1], 0);
	/* weights from the unbiased scores */
	assert_float_equal(w[0], 0.05f / 0.07f, 1e-6f);
	assert_float_equal(w[1], 0.02f / 0.07f, 1e-6f);
	/* a small bias adds to the model's own: 0.25 + 0.2 > 0.40 */
	assert_int_equal(route_parse_bias("5:0.2", &o), 0);
	assert_int_equal(route_select(&r, &o, topp_s, NULL, scratch, ids, w), 2);
	assert_int_equal(ids[0], 5);
	assert_int_equal(ids[1], 6);
	/* a negative bias removes an expert */
	const float model_bias[7] = {0, 0, 0, 0, 0, 0, -1.0f};
	route_opts_default(&o);
	assert_int_equal(route_select(&r, &o, topp_s, model_bias, scratch, ids, w), 2);
	assert_int_equal(ids[0], 5);
	assert_int_equal(ids[1], 4);
	/* ids must exist in the model */
	assert_int_equal(route_parse_bias("3,7:1", &o), 0);
	assert_int_equal(route_check(&r, &o, "test"), ERR_CONFIG);
}

static void test_weigh(void **state)
{
	(void)state;
	/* hash-routed layers: given ids, the rule's weights */
	struct route_rule r = {.n_expert = 7,
			       .k = 3,
			       .gating = ROUTE_GATING_SQRT_SOFTPLUS,
			       .norm = 1,
			       .norm_min = 6.103515625e-5f,
			       .scale = 1.5f};
	const int32_t ids[3] = {0, 3, 6};
	float w[3];
	route_weigh(&r, topp_s, ids, 3, w);
	const float sum = 0.02f + 0.10f + 0.40f;
	assert_float_equal(w[0], 1.5f * 0.02f / sum, 1e-6f);
	assert_float_equal(w[1], 1.5f * 0.10f / sum, 1e-6f);
	assert_float_equal(w[2], 1.5f * 0.40f / sum, 1e-6f);
	/* the sum is clamped from below */
	const float tiny[7] = {1e-7f, 1e-7f, 0, 0, 0, 0, 0};
	r.scale = 0.0f;
	route_weigh(&r, tiny, ids, 1, w);
	assert_float_equal(w[0], 1e-7f / 6.103515625e-5f, 1e-9f);
}

static void test_parse(void **state)
{
	(void)state;
	struct route_opts o;
	route_opts_default(&o);
	assert_int_equal(o.mode, ROUTE_MODE_TOPK);
	assert_int_equal(route_parse_routing("topp:0.5,min=2,max=8", &o), 0);
	assert_int_equal(o.mode, ROUTE_MODE_TOPP);
	assert_float_equal(o.top_p, 0.5f, 0.0f);
	assert_int_equal(o.k_min, 2);
	assert_int_equal(o.k_max, 8);
	assert_int_equal(route_parse_routing("topp:0.9,max=3", &o), 0);
	assert_int_equal(o.k_min, 0);
	assert_int_equal(o.k_max, 3);
	assert_int_equal(route_parse_routing("topk", &o), 0);
	assert_int_equal(o.mode, ROUTE_MODE_TOPK);
	const char *bad[] = {"",
			     "topp",
			     "topp:",
			     "topp:0",
			     "topp:1.5",
			     "topp:-0.2",
			     "topp:nan",
			     "topp:0.5,",
			     "topp:0.5,min=0",
			     "topp:0.5,x=2",
			     "topp:0.5,min=4,max=2",
			     "topp:0.5 ",
			     "top:0.5",
			     "topp:0.5,max=2x"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		route_opts_default(&o);
		assert_int_equal(route_parse_routing(bad[i], &o), ERR_CONFIG);
		assert_int_equal(o.mode, ROUTE_MODE_TOPK); /* unchanged */
	}
	route_opts_default(&o);
	assert_int_equal(route_parse_bias("1,2,30:-0.5", &o), 0);
	assert_int_equal(o.n_bias, 3);
	assert_int_equal(o.bias_ids[2], 30);
	assert_float_equal(o.bias, -0.5f, 0.0f);
	const char *bad_bias[] = {":1",	   "1,2",  "1,:1",   "a:1", "1:x",
				  "1:inf", ",1:1", "1,,2:1", "-1:1"};
	for (size_t i = 0; i < sizeof(bad_bias) / sizeof(bad_bias[0]); i++)
		assert_int_equal(route_parse_bias(bad_bias[i], &o), ERR_CONFIG);

	/* against a model: clamps within the experts, group reach, wire cap */
	struct route_rule r = {.n_expert = 16,
			       .k = 4,
			       .gating = ROUTE_GATING_SIGMOID,
			       .n_group = 4,
			       .n_group_used = 2};
	route_opts_default(&o);
	assert_int_equal(route_parse_routing("topp:0.5,max=8", &o), 0);
	assert_int_equal(route_check(&r, &o, "test"), 0);
	assert_int_equal(route_parse_routing("topp:0.5,max=9", &o), 0);
	assert_int_equal(route_check(&r, &o, "test"), ERR_CONFIG); /* 2 groups of 4 */
	assert_int_equal(route_parse_routing("topp:0.5,min=5", &o), 0);
	assert_int_equal(route_check(&r, &o, "test"), ERR_CONFIG); /* above default max 4 */
	struct route_rule big = {.n_expert = 256, .k = 8, .gating = ROUTE_GATING_SOFTMAX};
	assert_int_equal(route_parse_routing("topp:0.5,max=65", &o), 0);
	assert_int_equal(route_check(&big, &o, "test"), ERR_CONFIG);
}

static void test_counts(void **state)
{
	(void)state;
	struct route_counts *c = calloc(1, sizeof(*c));
	assert_non_null(c);
	route_counts_add(c, 2, 8, 20);
	route_counts_add(c, 2, 2, 3);
	route_counts_add(c, -1, 1, 1);
	route_counts_add(c, MOE_MAX_LAYERS, 1, 1);
	route_counts_add(NULL, 0, 1, 1);
	assert_int_equal(c->rows[2], 10);
	assert_int_equal(c->slots[2], 23);
	assert_int_equal(c->rows[0], 0);
	free(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_default_rules), cmocka_unit_test(test_topp),
	    cmocka_unit_test(test_bias),	  cmocka_unit_test(test_weigh),
	    cmocka_unit_test(test_parse),	  cmocka_unit_test(test_counts),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
