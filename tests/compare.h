/* compare: the logits comparison rule of the oracle's compare_logits.mjs, in C,
 * and loaders for the test cases in tests/data (NAME.case + NAME.logits.f32).
 *
 * A row fails if max |ref - cand| > atol (0.1), or KL(softmax ref || softmax
 * cand) > 1e-3, or the argmaxes differ where the reference's top-1 minus top-2
 * margin exceeds 0.05; a comparison passes when at most 10 % of rows fail. */
#ifndef MOEFLEET_TEST_COMPARE_H
#define MOEFLEET_TEST_COMPARE_H

#include <stdint.h>

struct compare_result {
	int rows;
	int failed;
	int allowed;
	double max_abs;
	double max_kl;
	int pass;
};

void compare_logits(const float *ref, const float *cand, int rows, int n_vocab, double allow_rows,
		    struct compare_result *out);

struct test_case {
	char name[128];
	int n_prompt;
	int n_tokens;
	int n_vocab;
	int32_t *tokens;
	float *ref; /* n_tokens x n_vocab */
};

/* Loads $top_srcdir/tests/data/NAME.{case,logits.f32}; returns 0 or -1. */
int test_case_load(const char *name, struct test_case *tc);
void test_case_free(struct test_case *tc);
/* Path of a file in tests/data (static buffer). */
const char *test_data_path(const char *file);

#endif
