/* test_ops: ops_rope_apply against llama.cpp's ROPE output, bit for bit, and
 * ops_matmul_raw's per-sequence forms (ops_batch_rows).
 * tests/data/rope-llama.f32 holds keys before and after llama.cpp's
 * ggml_rope_ext (its x86 CPU backend) for positions 0, 1, 2, 5, 14, 31, 47
 * of two of the shared test models' first layers: per position
 *   16 values in, 16 out: deepseek2-tiny's k_pe (adjacent pairs, YaRN factor
 *     40, freq_base 10000, original context 4096, attn_factor as deepseek2's
 *     loader derives it with yarn_log_multiplier set);
 *   64 values in, 64 out: gpt-oss-tiny's two 32-value key heads (NEOX pairs,
 *     YaRN factor 32, freq_base 150000, original context 4096).
 * Both use YaRN's ramp, so every rotation path of ops_rope_apply is checked. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/model/ops.h"
#include "kernels/kern.h"

#define N_POS 7
static const int rope_pos[N_POS] = {0, 1, 2, 5, 14, 31, 47};
#define DS2_DIM	   16
#define GPTOSS_DIM 32
#define GPTOSS_KV  2
#define N_DATA	   (N_POS * 2 * (DS2_DIM + GPTOSS_KV * GPTOSS_DIM))

static float rope_data[N_DATA];

static int load_data(void **state)
{
	(void)state;
	const char *top = getenv("top_srcdir");
	char path[4096];
	snprintf(path, sizeof(path), "%s/tests/data/rope-llama.f32", top ? top : ".");
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	const size_t got = fread(rope_data, sizeof(float), N_DATA, f);
	fclose(f);
	return got == N_DATA ? 0 : -1;
}

/* Rotates each head of in (n_head x dim) at pos and compares with want. */
static void check_rope(const char *what, const struct ops_rope *r, int pos, const float *in,
		       const float *want, int n_head, int dim)
{
	float x[GPTOSS_KV * GPTOSS_DIM];
	memcpy(x, in, (size_t)(n_head * dim) * sizeof(float));
	for (int h = 0; h < n_head; h++)
		ops_rope_apply(r, x + h * dim, pos);
	for (int i = 0; i < n_head * dim; i++) {
		if (memcmp(&x[i], &want[i], sizeof(float)) != 0) {
			print_error("%s pos %d value %d: %.9g, llama.cpp %.9g\n", what, pos, i,
				    (double)x[i], (double)want[i]);
			fail();
		}
	}
}

static void test_rope_deepseek2(void **state)
{
	(void)state;
	/* deepseek2's loader: yarn with the log multiplier set, attention factor
	 * 1 / (1 + 0.1 ln f) */
	const float freq_scale = 1.0f / 40.0f, f = 1.0f / freq_scale;
	const struct ops_rope r = {
	    .n_dims = DS2_DIM,
	    .neox = 0,
	    .freq_base = 10000.0f,
	    .freq_scale = freq_scale,
	    .ext_factor = 1.0f,
	    .attn_factor = 1.0f * (1.0f / (1.0f + 0.1f * logf(f))),
	    .beta_fast = 32.0f,
	    .beta_slow = 1.0f,
	    .n_ctx_orig = 4096,
	};
	for (int p = 0; p < N_POS; p++) {
		const float *d = rope_data + p * 2 * DS2_DIM;
		check_rope("deepseek2", &r, rope_pos[p], d, d + DS2_DIM, 1, DS2_DIM);
	}
}

static void test_rope_gptoss(void **state)
{
	(void)state;
	/* gpt-oss's loader: attention factor mscale(f) / (1 + 0.1 ln f) */
	const float freq_scale = 1.0f / 32.0f, f = 1.0f / freq_scale;
	float attn_factor = 0.1f * logf(f) + 1.0f;
	attn_factor *= 1.0f / (1.0f + 0.1f * logf(f));
	const struct ops_rope r = {
	    .n_dims = GPTOSS_DIM,
	    .neox = 1,
	    .freq_base = 150000.0f,
	    .freq_scale = freq_scale,
	    .ext_factor = 1.0f,
	    .attn_factor = attn_factor,
	    .beta_fast = 32.0f,
	    .beta_slow = 1.0f,
	    .n_ctx_orig = 4096,
	};
	const int w = GPTOSS_KV * GPTOSS_DIM;
	for (int p = 0; p < N_POS; p++) {
		const float *d = rope_data + N_POS * 2 * DS2_DIM + p * 2 * w;
		check_rope("gpt-oss", &r, rope_pos[p], d, d + w, GPTOSS_KV, GPTOSS_DIM);
	}
}

/* Three sequences interleaved in one batch: every row of an F32 product
 * equals the row of its sequence run alone (vec_dot form for a one-row
 * sequence, the GEMM form for one of several rows), and the GEMM rows differ
 * from a one-row product somewhere (the forms are really chosen per sequence). */
static void test_batch_rows_f32(void **state)
{
	(void)state;
	enum { NI = 64, NO = 24, NR = 5 };
	static float w[NO * NI], x[NR * NI], y[NR * NO], ya[NR * NO];
	pool *p = NULL;
	assert_int_equal(pool_new(2, &p), 0);
	void *scratch = malloc(ops_matmul_scratch(NI, NR));
	assert_non_null(scratch);
	uint32_t s = 7;
	for (int i = 0; i < NO * NI; i++) {
		s = s * 1664525u + 1013904223u;
		w[i] = (float)((int)(s >> 9) % 2001 - 1000) / 97.0f;
	}
	for (int i = 0; i < NR * NI; i++) {
		s = s * 1664525u + 1013904223u;
		x[i] = (float)((int)(s >> 9) % 2001 - 1000) / 31.0f;
	}
	/* rows 0, 2, 4: sequence 0 (3 rows, GEMM form); rows 1 and 3: sequences
	 * 1 and 2, one row each (vec_dot form): the product mixes both forms */
	const int32_t seq[NR] = {0, 1, 0, 2, 0};
	ops_batch_rows(seq, NR);
	ops_matmul_raw(p, KERN_F32, w, NI, NO, x, NI, NR, y, NO, scratch);
	ops_batch_rows(NULL, 0);
	int differs = 0;
	for (int r = 0; r < NR; r++) {
		/* alone: the rows of r's sequence, in order */
		float xs[NR * NI], ys[NR * NO];
		int m = 0, at = 0;
		for (int q = 0; q < NR; q++)
			if (seq[q] == seq[r]) {
				if (q == r)
					at = m;
				memcpy(xs + m * NI, x + q * NI, sizeof(float) * NI);
				m++;
			}
		ops_matmul_raw(p, KERN_F32, w, NI, NO, xs, NI, m, ys, NO, scratch);
		assert_memory_equal(y + r * NO, ys + at * NO, sizeof(float) * NO);
		ops_matmul_raw(p, KERN_F32, w, NI, NO, x + r * NI, NI, 1, ya + r * NO, NO, scratch);
		differs |= memcmp(ya + r * NO, y + r * NO, sizeof(float) * NO) != 0;
	}
	assert_true(differs);
	free(scratch);
	pool_destroy(&p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_rope_deepseek2),
	    cmocka_unit_test(test_rope_gptoss),
	    cmocka_unit_test(test_batch_rows_f32),
	};
	return cmocka_run_group_tests(tests, load_data, NULL);
}
