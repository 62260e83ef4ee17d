/* route: expert selection shared by every architecture's router (see route.h). */
#include "route.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "ops.h"

void route_opts_default(struct route_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->mode = ROUTE_MODE_TOPK;
	o->top_p = 1.0f;
}

/* A decimal int in [lo, hi] spanning [s, end_expected). */
static int route_parse_int(const char *s, const char *stop, long lo, long hi, long *out)
{
	char *end = NULL;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (end == s || end != stop || errno || v < lo || v > hi)
		return ERR_CONFIG;
	*out = v;
	return 0;
}

int route_parse_routing(const char *arg, struct route_opts *o)
{
	if (!arg) {
		log_error("--routing: missing value (topk or topp:T[,min=K1][,max=K2])");
		return ERR_CONFIG;
	}
	if (strcmp(arg, "topk") == 0) {
		o->mode = ROUTE_MODE_TOPK;
		o->top_p = 1.0f;
		o->k_min = 0;
		o->k_max = 0;
		return 0;
	}
	if (strncmp(arg, "topp:", 5) != 0)
		goto bad;
	const char *p = arg + 5;
	char *end = NULL;
	errno = 0;
	float t = strtof(p, &end);
	if (end == p || errno || !(t > 0.0f) || !(t <= 1.0f))
		goto bad;
	int k_min = 0, k_max = 0;
	p = end;
	while (*p == ',') {
		p++;
		const char *stop = strchr(p, ',');
		if (!stop)
			stop = p + strlen(p);
		long v;
		if (strncmp(p, "min=", 4) == 0 && !route_parse_int(p + 4, stop, 1, 65536, &v))
			k_min = (int)v;
		else if (strncmp(p, "max=", 4) == 0 && !route_parse_int(p + 4, stop, 1, 65536, &v))
			k_max = (int)v;
		else
			goto bad;
		p = stop;
	}
	if (*p != '\0')
		goto bad;
	if (k_min && k_max && k_min > k_max) {
		log_error("--routing %s: min=%d exceeds max=%d", arg, k_min, k_max);
		return ERR_CONFIG;
	}
	o->mode = ROUTE_MODE_TOPP;
	o->top_p = t;
	o->k_min = k_min;
	o->k_max = k_max;
	return 0;
bad:
	log_error("--routing %s: expected topk or topp:T[,min=K1][,max=K2] with 0 < T <= 1 "
		  "and 1 <= K1 <= K2",
		  arg);
	return ERR_CONFIG;
}

int route_parse_bias(const char *arg, struct route_opts *o)
{
	const char *colon = arg ? strrchr(arg, ':') : NULL;
	if (!colon || colon == arg) {
		log_error("--router-bias %s: expected E1,E2,...:B", arg ? arg : "(missing)");
		return ERR_CONFIG;
	}
	char *end = NULL;
	errno = 0;
	float b = strtof(colon + 1, &end);
	if (end == colon + 1 || *end != '\0' || errno || !isfinite(b)) {
		log_error("--router-bias %s: the bias after ':' must be a finite number", arg);
		return ERR_CONFIG;
	}
	int n = 0;
	const char *p = arg;
	while (p < colon) {
		const char *stop = memchr(p, ',', (size_t)(colon - p));
		if (!stop)
			stop = colon;
		long v;
		if (route_parse_int(p, stop, 0, 1L << 20, &v)) {
			log_error("--router-bias %s: bad expert id '%.*s'", arg, (int)(stop - p),
				  p);
			return ERR_CONFIG;
		}
		if (n == ROUTE_BIAS_MAX) {
			log_error("--router-bias %s: more than %d expert ids", arg, ROUTE_BIAS_MAX);
			return ERR_CONFIG;
		}
		o->bias_ids[n++] = (int32_t)v;
		p = stop < colon ? stop + 1 : stop;
		if (stop < colon && p == colon) {
			log_error("--router-bias %s: empty expert id before ':'", arg);
			return ERR_CONFIG;
		}
	}
	o->n_bias = n;
	o->bias = b;
	return 0;
}

int route_check(const struct route_rule *r, const struct route_opts *o, const char *what)
{
	if (!o)
		return 0;
	if (o->mode == ROUTE_MODE_TOPP) {
		if (o->k_min > r->n_expert || o->k_max > r->n_expert) {
			log_error(
			    "%s: --routing topp: min=%d / max=%d exceed the %d experts per layer",
			    what, o->k_min, o->k_max, r->n_expert);
			return ERR_CONFIG;
		}
		int k_max = o->k_max ? o->k_max : r->k;
		if (o->k_max > ROUTE_MAX_SLOTS) {
			log_error("%s: --routing topp: max=%d exceeds %d experts per token", what,
				  o->k_max, ROUTE_MAX_SLOTS);
			return ERR_CONFIG;
		}
		if (o->k_min > k_max) {
			log_error("%s: --routing topp: min=%d exceeds max=%d (default max: the "
				  "model's %d experts per token)",
				  what, o->k_min, k_max, r->k);
			return ERR_CONFIG;
		}
		if (r->n_group > 1 && k_max > (r->n_expert / r->n_group) * r->n_group_used) {
			log_error(
			    "%s: --routing topp: max=%d exceeds the %d experts of the %d groups "
			    "a token may use",
			    what, k_max, (r->n_expert / r->n_group) * r->n_group_used,
			    r->n_group_used);
			return ERR_CONFIG;
		}
	}
	for (int i = 0; i < o->n_bias; i++)
		if (o->bias_ids[i] < 0 || o->bias_ids[i] >= r->n_expert) {
			log_error("%s: --router-bias: expert id %d is not below the %d experts per "
				  "layer",
				  what, (int)o->bias_ids[i], r->n_expert);
			return ERR_CONFIG;
		}
	return 0;
}

int route_slots(const struct route_rule *r, const struct route_opts *o)
{
	if (!o || o->mode != ROUTE_MODE_TOPP || o->k_max <= 0)
		return r->k;
	return o->k_max;
}

/* Scratch layout: sel[n_expert] floats, p[n_expert] floats (top-p), gscore[n_group]
 * floats, taken[max(n_expert, n_group)] bytes. */
size_t route_scratch_bytes(const struct route_rule *r)
{
	size_t X = (size_t)(r->n_expert > 0 ? r->n_expert : 1);
	size_t G = (size_t)(r->n_group > 1 ? r->n_group : 1);
	return (2 * X + G) * sizeof(float) + (X > G ? X : G);
}

void route_gate(const struct route_rule *r, float *logits)
{
	const int X = r->n_expert;
	switch (r->gating) {
	case ROUTE_GATING_SOFTMAX: ops_softmax(logits, X); break;
	case ROUTE_GATING_SIGMOID:
		for (int e = 0; e < X; e++)
			logits[e] = 1.0f / (1.0f + expf(-logits[e]));
		break;
	case ROUTE_GATING_SQRT_SOFTPLUS:
		/* ggml_softplus, then ggml_sqrt */
		for (int e = 0; e < X; e++) {
			float v = logits[e];
			float sp = v > 20.0f ? v : logf(1.0f + expf(v));
			logits[e] = sqrtf(sp);
		}
		break;
	case ROUTE_GATING_SOFTMAX_CHOSEN: break;
	}
}

/* Group limit: a group's score is the sum of its two best selection scores;
 * the experts of groups not among the n_group_used best get -inf. */
static void route_limit_groups(const struct route_rule *r, float *sel, float *gs, uint8_t *taken)
{
	const int G = r->n_group, per = r->n_expert / G;
	for (int g = 0; g < G; g++) {
		const float *v = sel + g * per;
		int b0 = 0;
		for (int i = 1; i < per; i++)
			if (v[i] > v[b0])
				b0 = i;
		int b1 = b0 == 0 ? 1 : 0;
		for (int i = 0; i < per; i++)
			if (i != b0 && v[i] > v[b1])
				b1 = i;
		gs[g] = per > 1 ? v[b0] + v[b1] : v[b0];
	}
	memset(taken, 0, (size_t)G);
	for (int j = 0; j < r->n_group_used; j++) {
		int best = -1;
		for (int g = 0; g < G; g++)
			if (!taken[g] && (best < 0 || gs[g] > gs[best]))
				best = g;
		taken[best] = 1;
	}
	for (int g = 0; g < G; g++)
		if (!taken[g])
			for (int i = 0; i < per; i++)
				sel[g * per + i] = -INFINITY;
}

void route_weigh(const struct route_rule *r, const float *s, const int32_t *ids, int n, float *w)
{
	for (int j = 0; j < n; j++)
		w[j] = s[ids[j]];
	if (r->gating == ROUTE_GATING_SOFTMAX_CHOSEN) {
		ops_softmax(w, n);
		return;
	}
	if (r->norm) {
		/* ggml_sum_rows (double accumulation), clamp, ggml_div */
		double sum = 0.0;
		for (int j = 0; j < n; j++)
			sum += (double)w[j];
		float fs = (float)sum;
		if (!(fs >= r->norm_min))
			fs = r->norm_min;
		for (int j = 0; j < n; j++)
			w[j] = w[j] / fs;
	}
	if (r->scale != 0.0f && r->scale != 1.0f)
		for (int j = 0; j < n; j++)
			w[j] *= r->scale;
}

/* How many of the n candidates (selection order) top-p takes: the shortest
 * prefix whose share of the candidates' routing weight reaches T, clamped to
 * [k_min, n].  Shares: s / sum(s) over the candidates, or for
 * ROUTE_GATING_SOFTMAX_CHOSEN the softmax over their logits (p: n floats). */
static int route_topp_count(const struct route_rule *r, const struct route_opts *o, const float *s,
			    const int32_t *ids, int n, int k_min, float *p)
{
	for (int j = 0; j < n; j++)
		p[j] = s[ids[j]];
	if (r->gating == ROUTE_GATING_SOFTMAX_CHOSEN) {
		ops_softmax(p, n);
	} else {
		double sum = 0.0;
		for (int j = 0; j < n; j++)
			sum += (double)p[j];
		for (int j = 0; j < n; j++)
			p[j] = sum > 0.0 ? (float)((double)p[j] / sum) : 1.0f / (float)n;
	}
	double cum = 0.0;
	for (int j = 0; j < n; j++) {
		cum += (double)p[j];
		if (j + 1 >= k_min && cum >= (double)o->top_p)
			return j + 1;
	}
	return n;
}

int route_select(const struct route_rule *r, const struct route_opts *o, const float *s,
		 const float *bias, void *scratch, int32_t *ids, float *w)
{
	const int X = r->n_expert;
	const size_t G = (size_t)(r->n_group > 1 ? r->n_group : 1);
	float *sel = scratch;
	float *p = sel + X;
	float *gs = p + X;
	uint8_t *taken = (uint8_t *)(gs + G);
	const int slots = route_slots(r, o);
	const int topp = o && o->mode == ROUTE_MODE_TOPP;

	/* selection scores */
	for (int e = 0; e < X; e++)
		sel[e] = bias ? s[e] + bias[e] : s[e];
	if (o)
		for (int i = 0; i < o->n_bias; i++)
			if (o->bias_ids[i] >= 0 && o->bias_ids[i] < X)
				sel[o->bias_ids[i]] += o->bias;
	if (r->n_group > 1)
		route_limit_groups(r, sel, gs, taken);

	/* top-k (top-p: its k_max candidates) by selection score, descending; ties
	 * to the lower id (the order of ggml's argsort for short rows) */
	memset(taken, 0, (size_t)X);
	int n = 0;
	while (n < slots) {
		int best = -1;
		for (int e = 0; e < X; e++)
			if (!taken[e] && (best < 0 || sel[e] > sel[best]))
				best = e;
		if (best < 0)
			break;
		taken[best] = 1;
		ids[n++] = best;
	}
	if (topp && n > 0)
		n = route_topp_count(r, o, s, ids, n, o->k_min > 0 ? o->k_min : 1, p);
	route_weigh(r, s, ids, n, w);
	for (int j = n; j < slots; j++) {
		ids[j] = -1;
		w[j] = 0.0f;
	}
	return n;
}

void route_counts_add(struct route_counts *counts, int layer, int64_t n_rows, int64_t n_slots)
{
	if (!counts || layer < 0 || layer >= MOE_MAX_LAYERS)
		return;
	counts->rows[layer] += n_rows;
	counts->slots[layer] += n_slots;
}
