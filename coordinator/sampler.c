/* sampler: greedy or top-k / temperature / top-p sampling (see sampler.h). */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>

#include "../common/err.h"
#include "../common/log.h"

struct cand {
	float logit;
	int32_t id;
};

struct sampler {
	struct sampler_params p;
	int n_vocab;
	struct cand *c; /* [n_vocab] */
	float *prob;	/* [n_vocab] */
	uint64_t rng[4];
};

void sampler_params_default(struct sampler_params *p)
{
	p->temp = 0.8f;
	p->top_k = 40;
	p->top_p = 0.95f;
	p->seed = 0;
}

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256** */
static uint64_t rng_next(uint64_t s[4])
{
	uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return r;
}

/* uniform in [0, 1) with 53 random bits */
static double rng_uniform(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }

int sampler_new(const struct sampler_params *p, int n_vocab, sampler **out)
{
	sampler *s = NULL;
	int rc = 0;

	*out = NULL;
	if (n_vocab <= 0) {
		log_error("sampler: n_vocab %d must be positive", n_vocab);
		rc = ERR_CONFIG;
		goto out;
	}
	if (isnan(p->temp) || isinf(p->temp)) {
		log_error("sampler: temperature must be a finite number");
		rc = ERR_CONFIG;
		goto out;
	}
	if (p->top_k < 0) {
		log_error("sampler: top_k %d must be >= 0 (0: off)", p->top_k);
		rc = ERR_CONFIG;
		goto out;
	}
	if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
		log_error("sampler: top_p %g must be in (0, 1]", (double)p->top_p);
		rc = ERR_CONFIG;
		goto out;
	}
	s = calloc(1, sizeof(*s));
	if (!s) {
		rc = ERR_NOMEM;
		goto out;
	}
	s->p = *p;
	s->n_vocab = n_vocab;
	s->c = malloc((size_t)n_vocab * sizeof(*s->c));
	s->prob = malloc((size_t)n_vocab * sizeof(*s->prob));
	if (!s->c || !s->prob) {
		rc = ERR_NOMEM;
		goto out;
	}
	uint64_t x = p->seed;
	for (int i = 0; i < 4; i++)
		s->rng[i] = splitmix64(&x);
out:
	if (rc) {
		if (rc == ERR_NOMEM)
			log_error("sampler: out of memory for %d candidates", n_vocab);
		sampler_destroy(&s);
		return rc;
	}
	*out = s;
	return 0;
}

void sampler_destroy(sampler **ps)
{
	sampler *s = *ps;
	if (!s)
		return;
	free(s->c);
	free(s->prob);
	free(s);
	*ps = NULL;
}

static float logit_at(const float *logits, int i)
{
	float v = logits[i];
	return isnan(v) ? -INFINITY : v;
}

/* a ranks before b: larger logit, then lower id */
static int cand_before(const struct cand *a, const struct cand *b)
{
	return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

/* Heap with the *last-ranked* candidate at the root. */
static void heap_sift(struct cand *h, size_t n, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, m = i;
		if (l < n && cand_before(&h[m], &h[l]))
			m = l;
		if (l + 1 < n && cand_before(&h[m], &h[l + 1]))
			m = l + 1;
		if (m == i)
			return;
		struct cand t = h[i];
		h[i] = h[m];
		h[m] = t;
		i = m;
	}
}

static void heap_build(struct cand *h, size_t n)
{
	for (size_t i = n / 2; i-- > 0;)
		heap_sift(h, n, i);
}

/* Sorts a heap into rank order, first-ranked first. */
static void heap_sort(struct cand *h, size_t n)
{
	for (size_t end = n; end > 1; end--) {
		struct cand t = h[0];
		h[0] = h[end - 1];
		h[end - 1] = t;
		heap_sift(h, end - 1, 0);
	}
}

static int32_t sampler_argmax(const float *logits, int n)
{
	int32_t best = 0;
	float bv = logit_at(logits, 0);
	for (int i = 1; i < n; i++) {
		float v = logit_at(logits, i);
		if (v > bv) {
			bv = v;
			best = i;
		}
	}
	return best;
}

int32_t sampler_sample(sampler *s, const float *logits)
{
	const struct sampler_params *p = &s->p;
	size_t n = (size_t)s->n_vocab, k = n;
	int sorted = 0;

	if (p->temp <= 0.0f)
		return sampler_argmax(logits, s->n_vocab);

	if (p->top_k > 0 && (size_t)p->top_k < n) {
		/* keep the k first-ranked in a heap whose root is the worst kept */
		k = (size_t)p->top_k;
		for (size_t i = 0; i < k; i++)
			s->c[i] = (struct cand){logit_at(logits, (int)i), (int32_t)i};
		heap_build(s->c, k);
		for (size_t i = k; i < n; i++) {
			struct cand c = {logit_at(logits, (int)i), (int32_t)i};
			if (cand_before(&c, &s->c[0])) {
				s->c[0] = c;
				heap_sift(s->c, k, 0);
			}
		}
		heap_sort(s->c, k);
		sorted = 1;
	} else {
		for (size_t i = 0; i < n; i++)
			s->c[i] = (struct cand){logit_at(logits, (int)i), (int32_t)i};
		if (p->top_p < 1.0f) {
			heap_build(s->c, n);
			heap_sort(s->c, n);
			sorted = 1;
		}
	}

	float max = s->c[0].logit;
	int32_t max_id = s->c[0].id;
	if (!sorted) {
		for (size_t i = 1; i < k; i++) {
			if (s->c[i].logit > max) {
				max = s->c[i].logit;
				max_id = s->c[i].id;
			}
		}
	}
	if (max == -INFINITY)
		return sorted ? s->c[0].id : max_id;

	double sum = 0.0;
	for (size_t i = 0; i < k; i++) {
		float e = expf((s->c[i].logit - max) / p->temp);
		s->prob[i] = e;
		sum += e;
	}
	if (sorted && p->top_p < 1.0f) {
		double cum = 0.0;
		size_t m = k;
		for (size_t i = 0; i < k; i++) {
			cum += s->prob[i];
			if (cum >= (double)p->top_p * sum) {
				m = i + 1;
				break;
			}
		}
		k = m;
		sum = cum;
	}

	double r = rng_uniform(s->rng) * sum, acc = 0.0;
	size_t last = 0;
	for (size_t i = 0; i < k; i++) {
		if (s->prob[i] <= 0.0f)
			continue;
		acc += s->prob[i];
		last = i;
		if (acc > r)
			return s->c[i].id;
	}
	return s->c[last].id; /* rounding: r landed at the very end */
}
