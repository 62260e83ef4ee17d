/* sampler: greedy or top-k / temperature / top-p sampling (see sampler.h). */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>

#include "../../common/err.h"
#include "../../common/log.h"

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

static uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

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
static double rng_uniform(uint64_t s[4])
{
	return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

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

/* Binary heaps of candidates: with worst_top the last-ranked one is at the
 * root (to keep the k best), otherwise the first-ranked (to take them in order). */
static int heap_above(const struct cand *a, const struct cand *b, int worst_top)
{
	return worst_top ? cand_before(b, a) : cand_before(a, b);
}

static void heap_sift(struct cand *h, size_t n, size_t i, int worst_top)
{
	for (;;) {
		size_t l = 2 * i + 1, m = i;
		if (l < n && heap_above(&h[l], &h[m], worst_top))
			m = l;
		if (l + 1 < n && heap_above(&h[l + 1], &h[m], worst_top))
			m = l + 1;
		if (m == i)
			return;
		struct cand t = h[i];
		h[i] = h[m];
		h[m] = t;
		i = m;
	}
}

static void heap_build(struct cand *h, size_t n, int worst_top)
{
	for (size_t i = n / 2; i-- > 0;)
		heap_sift(h, n, i, worst_top);
}

/* Moves the root to h[n - 1] and restores the heap on h[0 .. n-1). */
static void heap_pop_to_end(struct cand *h, size_t n, int worst_top)
{
	struct cand t = h[0];
	h[0] = h[n - 1];
	h[n - 1] = t;
	heap_sift(h, n - 1, 0, worst_top);
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

/* A draw from the first n of w (weights summing to sum); returns an index. */
static size_t sampler_draw(sampler *s, const float *w, size_t n, double sum)
{
	double r = rng_uniform(s->rng) * sum, acc = 0.0;
	size_t last = 0;
	for (size_t i = 0; i < n; i++) {
		if (w[i] <= 0.0f)
			continue;
		acc += w[i];
		last = i;
		if (acc > r)
			return i;
	}
	return last; /* rounding: r landed at the very end */
}

int32_t sampler_sample(sampler *s, const float *logits)
{
	const struct sampler_params *p = &s->p;
	size_t n = (size_t)s->n_vocab;
	struct cand *c = s->c;

	if (p->temp <= 0.0f)
		return sampler_argmax(logits, s->n_vocab);

	if (p->top_k > 0 && (size_t)p->top_k < n) {
		/* the k first-ranked, kept in a heap whose root is the worst kept */
		size_t k = (size_t)p->top_k;
		for (size_t i = 0; i < k; i++)
			c[i] = (struct cand){logit_at(logits, (int)i), (int32_t)i};
		heap_build(c, k, 1);
		for (size_t i = k; i < n; i++) {
			struct cand x = {logit_at(logits, (int)i), (int32_t)i};
			if (cand_before(&x, &c[0])) {
				c[0] = x;
				heap_sift(c, k, 0, 1);
			}
		}
		for (size_t m = k; m > 1; m--) /* sorted, first-ranked first */
			heap_pop_to_end(c, m, 1);
		float max = c[0].logit;
		if (max == -INFINITY)
			return c[0].id;
		double sum = 0.0, cum = 0.0;
		for (size_t i = 0; i < k; i++) {
			s->prob[i] = expf((c[i].logit - max) / p->temp);
			sum += s->prob[i];
		}
		if (p->top_p < 1.0f) {
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
		return c[sampler_draw(s, s->prob, k, sum)].id;
	}

	/* no top-k: the softmax over everything */
	int32_t max_id = sampler_argmax(logits, s->n_vocab);
	float max = logit_at(logits, max_id);
	if (max == -INFINITY)
		return max_id;
	double sum = 0.0;
	for (size_t i = 0; i < n; i++) {
		s->prob[i] = expf((logit_at(logits, (int)i) - max) / p->temp);
		sum += s->prob[i];
	}
	if (p->top_p >= 1.0f)
		return (int32_t)sampler_draw(s, s->prob, n, sum);

	/* top-p: take candidates best first from a heap until the mass is reached,
	 * without sorting the whole vocabulary; they collect at the end of c */
	for (size_t i = 0; i < n; i++)
		c[i] = (struct cand){logit_at(logits, (int)i), (int32_t)i};
	heap_build(c, n, 0);
	double cum = 0.0;
	size_t m = 0;
	while (m < n) {
		heap_pop_to_end(c, n - m, 0);
		const struct cand *x = &c[n - 1 - m];
		s->prob[m] = expf((x->logit - max) / p->temp);
		cum += s->prob[m];
		m++;
		if (cum >= (double)p->top_p * sum)
			break;
	}
	return c[n - 1 - sampler_draw(s, s->prob, m, cum)].id;
}
