/* Long contexts with the sharded attention numerics (--kv-shards, attn.h):
 * on the small test models of each architecture with attention over pages
 * (qwen3moe GQA, gpt-oss with sinks and sliding windows, deepseek2's MLA), a
 * prompt of 1,500 positions and a few decode steps:
 *
 * - the logits stay within the oracle's tolerance (compare_logits) of the
 *   default numerics, which reproduce llama.cpp's;
 * - a prompt cut into steps of 96 tokens gives every prompt row the bits of
 *   the prompt in steps of 512 (with the default numerics the kernel, and so
 *   the bits, depend on how many rows of the sequence a step holds);
 * - the number of chains changes the bits (the test can see the sharding). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../common/log.h"
#include "../coordinator/model/model.h"
#include "compare.h"

enum { N_TOK = 1500, N_PROMPT = 1490 };

/* Logits of every position: the prompt in steps of n_batch, then one decode
 * step per token, with V chains of pages of P positions (V = 0: default). */
static float *run(const char *name, int n_batch, int shards, int page, int *n_vocab)
{
	char file[160];
	snprintf(file, sizeof(file), "%s.gguf", name);
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = 2;
	mp.n_ctx = N_TOK;
	mp.n_batch = n_batch;
	mp.kv_shards = shards;
	mp.kv_page = page;
	model *m = NULL;
	assert_int_equal(model_open(test_data_path(file), &mp, &m), 0);
	const int nv = model_get_info(m)->n_vocab;
	*n_vocab = nv;
	static int32_t tok[N_TOK], pos[N_TOK], seq[N_TOK];
	uint64_t x = 0x9e3779b97f4a7c15ull;
	for (int i = 0; i < N_TOK; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		tok[i] = 3 + (int32_t)(x % (uint64_t)(nv - 3));
		pos[i] = i;
		seq[i] = 0;
	}
	float *logits = malloc((size_t)N_TOK * (size_t)nv * sizeof(float));
	assert_non_null(logits);
	model_batch pb = {N_PROMPT, tok, pos, seq, NULL};
	assert_int_equal(model_forward(m, &pb, logits), 0);
	for (int i = N_PROMPT; i < N_TOK; i++) {
		model_batch db = {1, tok + i, pos + i, seq, NULL};
		assert_int_equal(model_forward(m, &db, logits + (size_t)i * (size_t)nv), 0);
	}
	model_destroy(&m);
	return logits;
}

static void check_model(const char *name)
{
	int nv = 0;
	float *def = run(name, 512, 0, 0, &nv);
	float *sh = run(name, 512, 4, 128, &nv);
	float *cut = run(name, 96, 4, 128, &nv);
	float *two = run(name, 512, 2, 128, &nv);
	struct compare_result r;
	compare_logits(def, sh, N_TOK, nv, 0.1, &r);
	print_message("# %s: sharded vs default: %d/%d rows fail, max |d| %.4f, max KL %.2e\n",
		      name, r.failed, r.rows, r.max_abs, r.max_kl);
	assert_true(r.pass);
	assert_memory_equal(sh, cut, (size_t)N_PROMPT * (size_t)nv * sizeof(float));
	assert_memory_not_equal(sh, two, (size_t)N_PROMPT * (size_t)nv * sizeof(float));
	free(def);
	free(sh);
	free(cut);
	free(two);
}

static void test_longctx_qwen3moe(void **state)
{
	(void)state;
	check_model("qwen3moe-tiny-mxfp4");
}

static void test_longctx_gptoss(void **state)
{
	(void)state;
	check_model("gptoss-tiny-mxfp4");
}

static void test_longctx_deepseek2(void **state)
{
	(void)state;
	check_model("ds2-tiny-q4_0");
}

int main(void)
{
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_longctx_qwen3moe),
	    cmocka_unit_test(test_longctx_gptoss),
	    cmocka_unit_test(test_longctx_deepseek2),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
