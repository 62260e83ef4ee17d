#include "compare.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int compare_argmax(const float *r, int n)
{
	int b = 0;
	for (int i = 1; i < n; i++)
		if (r[i] > r[b])
			b = i;
	return b;
}

static double compare_margin(const float *r, int n)
{
	float a = -INFINITY, b = -INFINITY;
	for (int i = 0; i < n; i++) {
		if (r[i] > a) {
			b = a;
			a = r[i];
		} else if (r[i] > b) {
			b = r[i];
		}
	}
	return (double)a - (double)b;
}

static void compare_log_softmax(const float *r, int n, double *out)
{
	double m = -INFINITY, s = 0;
	for (int i = 0; i < n; i++)
		m = fmax(m, r[i]);
	for (int i = 0; i < n; i++)
		s += exp(r[i] - m);
	double lse = m + log(s);
	for (int i = 0; i < n; i++)
		out[i] = r[i] - lse;
}

void compare_logits(const float *ref, const float *cand, int rows, int n_vocab, double allow_rows,
		    struct compare_result *out)
{
	double *la = malloc(sizeof(double) * (size_t)n_vocab);
	double *lb = malloc(sizeof(double) * (size_t)n_vocab);
	memset(out, 0, sizeof(*out));
	out->rows = rows;
	for (int r = 0; r < rows && la && lb; r++) {
		const float *a = ref + (size_t)r * n_vocab, *b = cand + (size_t)r * n_vocab;
		double row_max = 0;
		for (int i = 0; i < n_vocab; i++) {
			double d = fabs((double)a[i] - (double)b[i]);
			if (!(d <= row_max))
				row_max = isnan(d) ? INFINITY : d;
		}
		compare_log_softmax(a, n_vocab, la);
		compare_log_softmax(b, n_vocab, lb);
		double kl = 0;
		for (int i = 0; i < n_vocab; i++)
			kl += exp(la[i]) * (la[i] - lb[i]);
		if (isnan(kl))
			kl = INFINITY;
		int bad = !(row_max <= 0.1) || !(kl <= 1e-3);
		if (compare_argmax(a, n_vocab) != compare_argmax(b, n_vocab) &&
		    compare_margin(a, n_vocab) > 0.05)
			bad = 1;
		out->failed += bad;
		out->max_abs = fmax(out->max_abs, row_max);
		out->max_kl = fmax(out->max_kl, kl);
	}
	out->allowed = (int)floor(allow_rows * rows);
	out->pass = la && lb && rows > 0 && out->failed <= out->allowed;
	free(la);
	free(lb);
}

const char *test_data_path(const char *file)
{
	static char buf[4096];
	const char *top = getenv("top_srcdir");
	snprintf(buf, sizeof(buf), "%s/tests/data/%s", top ? top : ".", file);
	return buf;
}

int test_case_load(const char *name, struct test_case *tc)
{
	memset(tc, 0, sizeof(*tc));
	snprintf(tc->name, sizeof(tc->name), "%s", name);
	char file[256];
	snprintf(file, sizeof(file), "%s.case", name);
	FILE *f = fopen(test_data_path(file), "r");
	if (!f)
		return -1;
	int ok = fscanf(f, "%d", &tc->n_prompt) == 1;
	int cap = 4096;
	tc->tokens = malloc(sizeof(int32_t) * (size_t)cap);
	int c;
	while (ok && tc->tokens && tc->n_tokens < cap && fscanf(f, "%d", &c) == 1) {
		tc->tokens[tc->n_tokens++] = c;
		if (fgetc(f) != ',')
			break;
	}
	ok = ok && fscanf(f, "%d", &tc->n_vocab) == 1 && tc->n_vocab > 0;
	fclose(f);
	if (!ok || tc->n_tokens == 0) {
		test_case_free(tc);
		return -1;
	}
	snprintf(file, sizeof(file), "%s.logits.f32", name);
	f = fopen(test_data_path(file), "rb");
	if (!f) {
		test_case_free(tc);
		return -1;
	}
	size_t n = (size_t)tc->n_tokens * (size_t)tc->n_vocab;
	tc->ref = malloc(n * sizeof(float));
	ok = tc->ref && fread(tc->ref, sizeof(float), n, f) == n;
	fclose(f);
	if (!ok) {
		test_case_free(tc);
		return -1;
	}
	return 0;
}

void test_case_free(struct test_case *tc)
{
	free(tc->tokens);
	free(tc->ref);
	tc->tokens = NULL;
	tc->ref = NULL;
}
