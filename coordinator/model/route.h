/* route: expert selection shared by every architecture's router.
 *
 * A router turns one token row's router logits into the chosen expert ids (in
 * selection order) and their routing weights.  The architectures differ only
 * in a few choices, collected in a `route_rule` that each architecture fills
 * once at load:
 *
 *   scores  s = gate(logits)            softmax | sigmoid | sqrt(softplus) | identity
 *   select  on s + bias                 bias: the model's selection bias (deepseek
 *                                       exp_probs_b, V4 gate.bias) plus the user's
 *                                       --router-bias; it never enters the weights
 *           group limit (deepseek2/3)   keep the n_group_used groups whose two best
 *                                       selection scores sum highest
 *           top-k, descending, ties to the lower expert id
 *   weigh   w = s[chosen]               (ROUTE_GATING_SOFTMAX_CHOSEN: softmax over the
 *                                       chosen logits instead, gpt-oss)
 *           w /= max(sum w, norm_min)   when rule.norm (sum in double, like ggml_sum_rows)
 *           w *= scale                  when scale is neither 0 nor 1
 *
 * With default options (route_opts_default) route_select() reproduces exactly,
 * bit for bit, what llama.cpp's build_moe_ffn computes for the architecture.
 *
 * Options that apply to every architecture (struct route_opts, from the command
 * line via model_params):
 *   --routing topp:T[,min=K1][,max=K2]   variable experts per token: the K2 best
 *       experts by selection score are the candidates; take them in selection
 *       order until the normalised scores of those taken sum to >= T, at least K1.
 *       Normalised score of candidate i: p_i = s_i / sum of the candidates' s
 *       (gpt-oss: softmax over the candidates' logits) -- the weight share the
 *       architecture would give it among the K2, whatever the gating (sigmoid
 *       and sqrt-softplus scores do not sum to 1 over all experts, so a share of
 *       all experts would make T meaningless there).  Defaults K1 = 1, K2 = the
 *       model's k, so top-p never does more expert work than the model's own
 *       routing; K2 may exceed k (up to n_expert, and ROUTE_MAX_SLOTS).  The
 *       weights of the taken experts are normalised as the architecture does.
 *       `topp:1.0,min=K,max=K` with K the model's k equals the default routing
 *       bit for bit.
 *   --router-bias E1,E2,...:B   adds B to the selection score of the listed expert
 *       ids in every score-routed MoE layer (reproducible routing skew for tests and
 *       benchmarks); weights still come from the unbiased scores.
 * Hash-routed layers (fixed experts per token id) and shared experts are not
 * affected by either option; such layers call route_weigh() only.
 *
 * Variable k and the expert seam: a router writes route_slots() slots per row
 * (ids/weights/out strides).  A row that uses n < route_slots() experts has
 * ids[n..] = -1 and weights[n..] = 0: an empty slot, which every expert backend
 * skips (its output is written as zeros) and which experts_run_sum() skips.
 * Empty slots are always trailing.
 *
 * Everything here is pure: no allocation, no I/O, no global state; callers own
 * the scratch (route_scratch_bytes()).  Parsing functions log one line naming the
 * option on bad input and return ERR_CONFIG. */
#ifndef MOEFLEET_ROUTE_H
#define MOEFLEET_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include "../../common/moe.h"

enum route_gating {
	ROUTE_GATING_SOFTMAX = 1,	 /* s = softmax(logits) (qwen3moe, deepseek2) */
	ROUTE_GATING_SIGMOID = 2,	 /* s = 1 / (1 + exp(-logit)) (deepseek3, glm4moe) */
	ROUTE_GATING_SQRT_SOFTPLUS = 4,	 /* s = sqrt(softplus(logit)) (deepseek4) */
	ROUTE_GATING_SOFTMAX_CHOSEN = 9, /* s = logits; w = softmax over the chosen (gpt-oss) */
};

/* The architecture's rule, fixed at load. */
struct route_rule {
	int n_expert; /* experts per layer */
	int k;	      /* the model's experts per token (expert_used_count) */
	enum route_gating gating;
	int n_group;	  /* > 1: group-limited selection (n_expert % n_group == 0) */
	int n_group_used; /* groups kept, 1..n_group */
	int norm;	  /* 1: weights divided by their sum */
	float norm_min;	  /* lower clamp of that sum (llama.cpp: 6.103515625e-5f) */
	float scale;	  /* weights multiplied by it unless 0 or 1 */
};

enum route_mode {
	ROUTE_MODE_TOPK = 0, /* the model's own top-k (default) */
	ROUTE_MODE_TOPP = 1, /* variable k by cumulative normalised score */
};

#define ROUTE_BIAS_MAX	512 /* expert ids in one --router-bias */
#define ROUTE_MAX_SLOTS 64  /* top-p max: experts per row a Batch may carry (wire.h) */

/* User options, the same for every layer and architecture. */
struct route_opts {
	enum route_mode mode;
	float top_p; /* ROUTE_MODE_TOPP: threshold T in (0, 1] */
	int k_min;   /* ROUTE_MODE_TOPP: 0 = default 1 */
	int k_max;   /* ROUTE_MODE_TOPP: 0 = default: the model's k */
	int n_bias;  /* number of ids in bias_ids */
	float bias;  /* added to their selection score */
	int32_t bias_ids[ROUTE_BIAS_MAX];
};

/* Per-layer routed work, for reports (mean experts per token = slots / rows). */
struct route_counts {
	int64_t rows[MOE_MAX_LAYERS];  /* token rows routed */
	int64_t slots[MOE_MAX_LAYERS]; /* experts chosen, summed over rows */
};

void route_opts_default(struct route_opts *o);
/* "topk" (the default) or "topp:T[,min=K1][,max=K2]"; updates o. */
int route_parse_routing(const char *arg, struct route_opts *o);
/* "E1,E2,...:B" with ids >= 0 and B finite; updates o. */
int route_parse_bias(const char *arg, struct route_opts *o);
/* Checks o against a model's rule (clamps within [1, n_expert], bias ids below
 * n_expert); what names the model file for the message. */
int route_check(const struct route_rule *r, const struct route_opts *o, const char *what);

/* Slots per row a router must provide under o: the model's k, or the top-p
 * maximum.  o may be NULL (default routing). */
int route_slots(const struct route_rule *r, const struct route_opts *o);
/* Scratch bytes route_select() needs for rule r. */
size_t route_scratch_bytes(const struct route_rule *r);

/* In place: logits[n_expert] -> gating scores s (identity for
 * ROUTE_GATING_SOFTMAX_CHOSEN).  Architectures that compute their scores
 * differently may skip this and pass their own s to route_select(). */
void route_gate(const struct route_rule *r, float *logits);

/* One row.  s[n_expert]: gating scores (unbiased; the weights come from them);
 * bias[n_expert]: the model's selection bias or NULL; o: user options or NULL
 * for the default.  Writes route_slots(r, o) ids and weights (empty trailing
 * slots: id -1, weight 0) and returns the number of experts chosen (>= 1). */
int route_select(const struct route_rule *r, const struct route_opts *o, const float *s,
		 const float *bias, void *scratch, int32_t *ids, float *w);

/* Weights for n given experts (hash-routed layers): w[j] from s[ids[j]] and
 * the rule's normalisation and scale, exactly as route_select() weighs. */
void route_weigh(const struct route_rule *r, const float *s, const int32_t *ids, int n, float *w);

/* counts->rows[layer] += n_rows, counts->slots[layer] += n_slots; no-op when
 * counts is NULL or layer is out of range. */
void route_counts_add(struct route_counts *counts, int layer, int64_t n_rows, int64_t n_slots);

#endif
