/* The engine against llama.cpp: every case listed in tests/data/vectors.list
 * (a GGUF, the token sequence and llama.cpp's logits) must pass the oracle's
 * comparison rule, prefilling the prompt in one batch and decoding the rest one
 * token at a time.  Also: two sequences batched together give exactly the
 * logits each gives alone, and 1 thread equals 2 threads bit for bit.  A
 * model written as gguf-split shards (one model per architecture, three
 * shards) gives the single file's logits bit for bit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/gguf.h"
#include "../common/gguf_write.h"
#include "../common/log.h"
#include "../coordinator/model/model.h"
#include "compare.h"

#define MAX_CASES 128

static char case_names[MAX_CASES][128];

/* Runs tc's tokens as prefill + decodes on sequence slot `seq` of m; writes
 * n_tokens rows of logits. */
static int run_case(model *m, const struct test_case *tc, int seq, float *logits)
{
	int n = tc->n_tokens;
	int32_t *pos = malloc(sizeof(int32_t) * (size_t)n);
	int32_t *sq = malloc(sizeof(int32_t) * (size_t)n);
	for (int i = 0; i < n; i++) {
		pos[i] = i;
		sq[i] = seq;
	}
	model_batch b = {tc->n_prompt, tc->tokens, pos, sq, NULL};
	int rc = model_forward(m, &b, logits);
	for (int i = tc->n_prompt; i < n && !rc; i++) {
		model_batch d = {1, tc->tokens + i, pos + i, sq + i, NULL};
		rc = model_forward(m, &d, logits + (size_t)i * tc->n_vocab);
	}
	free(pos);
	free(sq);
	return rc;
}

static model *open_model(const char *name, int threads, int n_seq, int n_ctx)
{
	char file[256];
	snprintf(file, sizeof(file), "%s.gguf", name);
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = threads;
	mp.n_seq = n_seq;
	mp.n_ctx = n_ctx;
	model *m = NULL;
	model_open(test_data_path(file), &mp, &m);
	return m;
}

static void test_against_llama(void **state)
{
	const char *name = *state;
	struct test_case tc;
	assert_int_equal(test_case_load(name, &tc), 0);
	model *m = open_model(name, 2, 1, tc.n_tokens);
	assert_non_null(m);
	assert_int_equal(model_get_info(m)->n_vocab, tc.n_vocab);
	float *out = malloc(sizeof(float) * (size_t)tc.n_tokens * tc.n_vocab);
	assert_int_equal(run_case(m, &tc, 0, out), 0);
	struct compare_result r;
	/* deepseek4 with quantised experts: llama.cpp against itself needs 25 % */
	double allow =
	    strstr(name, "ds4") && !strstr(name, "f32") && !strstr(name, "f16") ? 0.25 : 0.10;
	compare_logits(tc.ref, out, tc.n_tokens, tc.n_vocab, allow, &r);
	print_message("%s: %d/%d rows fail (allowed %d), max |diff| %.4g, max KL %.3g\n", name,
		      r.failed, r.rows, r.allowed, r.max_abs, r.max_kl);
	assert_true(r.pass);
	free(out);
	model_destroy(&m);
	test_case_free(&tc);
}

/* Two sequences in one batch: tokens of sequence 1 interleaved with those of
 * sequence 0 (prompt rows batched together, then decodes of both in one
 * batch) must equal the single-sequence run bit for bit. */
static void test_batched_sequences(void **state)
{
	const char *name = *state;
	struct test_case tc;
	assert_int_equal(test_case_load(name, &tc), 0);
	const int n = tc.n_tokens, V = tc.n_vocab, P = tc.n_prompt;
	model *m = open_model(name, 2, 3, n);
	assert_non_null(m);
	float *alone = malloc(sizeof(float) * (size_t)n * V);
	float *both = malloc(sizeof(float) * (size_t)2 * n * V);
	assert_int_equal(run_case(m, &tc, 2, alone), 0);
	int32_t *tok = malloc(sizeof(int32_t) * 2 * (size_t)n);
	int32_t *pos = malloc(sizeof(int32_t) * 2 * (size_t)n);
	int32_t *seq = malloc(sizeof(int32_t) * 2 * (size_t)n);
	for (int i = 0; i < n; i++) {
		for (int s = 0; s < 2; s++) {
			tok[2 * i + s] = tc.tokens[i];
			pos[2 * i + s] = i;
			seq[2 * i + s] = s;
		}
	}
	model_batch b = {2 * P, tok, pos, seq, NULL};
	assert_int_equal(model_forward(m, &b, both), 0);
	for (int i = P; i < n; i++) {
		model_batch d = {2, tok + 2 * i, pos + 2 * i, seq + 2 * i, NULL};
		assert_int_equal(model_forward(m, &d, both + (size_t)2 * i * V), 0);
	}
	int first_bad = -1;
	for (int i = 0; i < n && first_bad < 0; i++)
		for (int s = 0; s < 2; s++)
			if (memcmp(alone + (size_t)i * V, both + (size_t)(2 * i + s) * V,
				   sizeof(float) * (size_t)V) != 0)
				first_bad = i;
	if (first_bad >= 0)
		print_message("%s: position %d differs between batched and alone\n", name,
			      first_bad);
	assert_int_equal(first_bad, -1);
	free(alone);
	free(both);
	free(tok);
	free(pos);
	free(seq);
	model_destroy(&m);
	test_case_free(&tc);
}

static void test_threads_agree(void **state)
{
	const char *name = *state;
	struct test_case tc;
	assert_int_equal(test_case_load(name, &tc), 0);
	const size_t sz = sizeof(float) * (size_t)tc.n_tokens * tc.n_vocab;
	float *a = malloc(sz), *b = malloc(sz);
	model *m1 = open_model(name, 1, 1, tc.n_tokens);
	model *m2 = open_model(name, 2, 1, tc.n_tokens);
	assert_non_null(m1);
	assert_non_null(m2);
	assert_int_equal(run_case(m1, &tc, 0, a), 0);
	assert_int_equal(run_case(m2, &tc, 0, b), 0);
	assert_memory_equal(a, b, sz);
	free(a);
	free(b);
	model_destroy(&m1);
	model_destroy(&m2);
	test_case_free(&tc);
}

/* Writes the model of file src as count shards PREFIX-%05d-of-%05d.gguf, as
 * gguf-split does: tensors in file order, spread evenly, the model keys in
 * the first shard and the split keys in every one. */
static void write_split(const char *src, const char *prefix, int count)
{
	gguf *g = NULL;
	assert_int_equal(gguf_open(src, &g), 0);
	const uint64_t n = gguf_n_tensors(g);
	for (int s = 0; s < count; s++) {
		uint64_t first = n * (uint64_t)s / (uint64_t)count;
		uint64_t end = n * (uint64_t)(s + 1) / (uint64_t)count;
		char path[320];
		snprintf(path, sizeof(path), "%s-%05d-of-%05d.gguf", prefix, s + 1, count);
		gguf_writer *w = NULL;
		assert_int_equal(gguf_writer_new(&w), 0);
		if (s == 0)
			assert_int_equal(gguf_writer_copy_all_kv(w, g), 0);
		assert_int_equal(gguf_writer_set_split(w, (uint16_t)s, (uint16_t)count, (int32_t)n),
				 0);
		for (uint64_t i = first; i < end; i++) {
			const gguf_tensor *t = gguf_tensor_at(g, i);
			assert_int_equal(
			    gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), 0);
		}
		assert_int_equal(gguf_writer_open(w, path), 0);
		for (uint64_t i = first; i < end; i++) {
			const gguf_tensor *t = gguf_tensor_at(g, i);
			assert_int_equal(gguf_writer_write(w, t->data, (size_t)t->n_bytes), 0);
		}
		assert_int_equal(gguf_writer_commit(w), 0);
		gguf_writer_destroy(&w);
	}
	gguf_destroy(&g);
}

static void test_split_same_logits(void **state)
{
	const char *name = *state;
	struct test_case tc;
	if (test_case_load(name, &tc) != 0) {
		print_message("# %s: not in tests/data, skipped\n", name);
		return;
	}
	char dir[] = "/tmp/moefleet-test-split-XXXXXX", prefix[128], first[192], file[192];
	assert_non_null(mkdtemp(dir));
	snprintf(prefix, sizeof(prefix), "%s/%s", dir, name);
	snprintf(file, sizeof(file), "%s.gguf", name);
	write_split(test_data_path(file), prefix, 3);
	snprintf(first, sizeof(first), "%s-00001-of-00003.gguf", prefix);
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = 2;
	mp.n_ctx = tc.n_tokens;
	model *ms = NULL;
	assert_int_equal(model_open(first, &mp, &ms), 0);
	model *m = open_model(name, 2, 1, tc.n_tokens);
	assert_non_null(m);
	assert_int_equal(gguf_n_shards(model_get_gguf(ms)), 3);
	const size_t sz = sizeof(float) * (size_t)tc.n_tokens * tc.n_vocab;
	float *a = malloc(sz), *b = malloc(sz);
	assert_int_equal(run_case(m, &tc, 0, a), 0);
	assert_int_equal(run_case(ms, &tc, 0, b), 0);
	assert_memory_equal(a, b, sz);
	free(a);
	free(b);
	model_destroy(&ms);
	model_destroy(&m);
	for (int s = 0; s < 3; s++) {
		snprintf(file, sizeof(file), "%s-%05d-of-00003.gguf", prefix, s + 1);
		unlink(file);
	}
	rmdir(dir);
	test_case_free(&tc);
}

int main(void)
{
	FILE *f = fopen(test_data_path("vectors.list"), "r");
	if (!f) {
		fprintf(stderr, "cannot open %s\n", test_data_path("vectors.list"));
		return 1;
	}
	static struct CMUnitTest tests[3 * MAX_CASES + 4];
	static char test_names[3 * MAX_CASES + 4][160];
	int n = 0, nt = 0;
	char line[256];
	while (n < MAX_CASES && fgets(line, sizeof(line), f)) {
		line[strcspn(line, " \t\r\n#")] = 0;
		if (!line[0])
			continue;
		snprintf(case_names[n], sizeof(case_names[n]), "%s", line);
		static const char *kinds[] = {"llama", "batched_sequences", "threads"};
		CMUnitTestFunction fns[] = {test_against_llama, test_batched_sequences,
					    test_threads_agree};
		for (int k = 0; k < 3; k++) {
			snprintf(test_names[nt], sizeof(test_names[nt]), "%s_%s", kinds[k],
				 case_names[n]);
			tests[nt] =
			    (struct CMUnitTest){test_names[nt], fns[k], NULL, NULL, case_names[n]};
			nt++;
		}
		n++;
	}
	fclose(f);
	/* one model per architecture as split files */
	static const char *split_cases[] = {"qwen3moe-tiny-mxfp4", "gptoss-tiny-mxfp4",
					    "ds2-tiny-q4_0", "ds4-tiny-mxfp4"};
	for (size_t i = 0; i < sizeof(split_cases) / sizeof(split_cases[0]); i++) {
		snprintf(test_names[nt], sizeof(test_names[nt]), "split_%s", split_cases[i]);
		tests[nt] = (struct CMUnitTest){test_names[nt], test_split_same_logits, NULL, NULL,
						(void *)split_cases[i]};
		nt++;
	}
	log_set_quiet(1);
	return _cmocka_run_group_tests("vectors", tests, (size_t)nt, NULL, NULL);
}
