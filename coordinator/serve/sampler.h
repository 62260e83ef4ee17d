/* sampler: picks the next token from a row of logits.
 *
 * temp <= 0: greedy, the argmax with ties to the lowest id (what llama.cpp's
 * greedy sampler and the oracle's "greedy" do).  Otherwise, in this order:
 *   1. top-k: keep the top_k largest logits (top_k <= 0 or >= n_vocab: all;
 *      ties broken by the lower id);
 *   2. softmax of logit / temp over what is kept;
 *   3. top-p: keep the smallest prefix, largest first, whose probability
 *      reaches top_p (top_p >= 1: all; at least one token), renormalised;
 *   4. a draw from a xoshiro256** generator seeded from `seed` by splitmix64.
 * The same parameters, seed and sequence of logit rows give the same tokens.
 * NaN logits count as -infinity; if every logit is -infinity (or NaN) the
 * result is token 0.  (llama.cpp's default chain applies top-p before the
 * temperature; this one follows the order above.)
 *
 * sampler_new() validates the parameters (ERR_CONFIG, logged) and allocates
 * everything; sampler_sample() allocates nothing.  One sampler per sequence;
 * not thread-safe. */
#ifndef MOEFLEET_SAMPLER_H
#define MOEFLEET_SAMPLER_H

#include <stdint.h>

struct sampler_params {
	float temp;  /* <= 0: greedy */
	int top_k;   /* <= 0: off */
	float top_p; /* in (0, 1]; 1: off */
	uint64_t seed;
};

typedef struct sampler sampler;

/* Defaults: temp 0.8, top_k 40, top_p 0.95, seed 0 (llama.cpp's defaults). */
void sampler_params_default(struct sampler_params *p);

int sampler_new(const struct sampler_params *p, int n_vocab, sampler **out);
void sampler_destroy(sampler **s);

/* logits: n_vocab floats.  Returns the chosen token id. */
int32_t sampler_sample(sampler *s, const float *logits);

#endif
