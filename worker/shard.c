#include "shard.h"
#include "../common/err.h"
#include "../common/log.h"
#include "../kernels/kern.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct shard_layer {
	uint32_t types[3];		   /* weight types shared by the layer's experts */
	int has_types;
	struct shard_expert_src *experts; /* [n_expert]; weights[0] == NULL if not held */
};

/* Per-call working set, grown on demand and then reused (no allocation in the
 * steady state). */
struct shard_work {
	size_t cap_items;   /* (row, slot) pairs */
	int32_t *item_row;  /* sorted by expert: row index */
	int32_t *item_slot; /* slot index */
	int32_t *item_expert;
	float *xf;	/* [items][n_embd] rows dequantised when they arrive converted */
	float *g, *u;	/* [items][n_ff] */
	float *d;	/* [items][n_embd] */
	void *xa_gate, *xa_up; /* activations converted for the gate / up weights */
	void *ha;	/* activated hidden rows converted for the down weights */
	int32_t *group_start; /* [n_expert + 1] offsets into the sorted items */
	int32_t *group_fill;
};

struct shard {
	struct moe_spec spec;
	struct shard_layer layers[MOE_MAX_LAYERS];
	int n_held;
	struct shard_work w;
};

int shard_new(const struct moe_spec *spec, shard **out)
{
	*out = NULL;
	if (spec->n_layer < 0 || spec->n_layer > MOE_MAX_LAYERS || spec->n_embd <= 0 ||
	    spec->n_ff_exp <= 0 || spec->n_expert < 0 || spec->n_expert_used > spec->n_expert) {
		log_error("invalid expert specification");
		return ERR_FORMAT;
	}
	shard *s = calloc(1, sizeof(*s));
	if (!s)
		return ERR_NOMEM;
	s->spec = *spec;
	int rc = 0;
	for (int l = 0; l < spec->n_layer && !rc; l++) {
		if (!spec->layer_moe[l])
			continue;
		s->layers[l].experts = calloc((size_t)spec->n_expert, sizeof(struct shard_expert_src));
		if (!s->layers[l].experts)
			rc = ERR_NOMEM;
	}
	s->w.group_start = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	s->w.group_fill = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	if (!s->w.group_start || !s->w.group_fill)
		rc = ERR_NOMEM;
	if (rc)
		shard_destroy(&s);
	*out = s;
	return rc;
}

const struct moe_spec *shard_spec(const shard *s) { return &s->spec; }
int shard_n_experts(const shard *s) { return s->n_held; }

int shard_has(const shard *s, int layer, int expert)
{
	return layer >= 0 && layer < s->spec.n_layer && s->layers[layer].experts && expert >= 0 &&
	       expert < s->spec.n_expert && s->layers[layer].experts[expert].weights[0] != NULL;
}

uint32_t shard_act_type(const shard *s, int layer)
{
	if (layer < 0 || layer >= s->spec.n_layer || !s->layers[layer].has_types)
		return KERN_F32;
	return kern_act_type(s->layers[layer].types[SHARD_GATE]);
}

size_t shard_expert_bytes(const struct moe_spec *spec, const uint32_t types[3])
{
	const int64_t E = spec->n_embd, F = spec->n_ff_exp;
	return kern_row_bytes(types[0], E) * (size_t)F + kern_row_bytes(types[1], E) * (size_t)F +
	       kern_row_bytes(types[2], F) * (size_t)E;
}

int shard_add_expert(shard *s, int layer, int expert, const struct shard_expert_src *src)
{
	const struct moe_spec *sp = &s->spec;
	if (layer < 0 || layer >= sp->n_layer || !sp->layer_moe[layer] || expert < 0 ||
	    expert >= sp->n_expert) {
		log_error("expert %d of layer %d does not exist in this model", expert, layer);
		return ERR_RANGE;
	}
	struct shard_layer *L = &s->layers[layer];
	for (int t = 0; t < 3; t++) {
		int64_t n_in = t == SHARD_DOWN ? sp->n_ff_exp : sp->n_embd;
		if (!src->weights[t] || !kern_type_known(src->types[t]) ||
		    n_in % kern_type_block(src->types[t]) != 0) {
			log_error("layer %d expert %d: unusable weights (type %u)", layer, expert,
				  src->types[t]);
			return ERR_FORMAT;
		}
		if (L->has_types && L->types[t] != src->types[t]) {
			log_error("layer %d expert %d: weight type %s differs from the layer's %s",
				  layer, expert, kern_type_name(src->types[t]),
				  kern_type_name(L->types[t]));
			return ERR_FORMAT;
		}
		if (sp->has_bias && !src->biases[t]) {
			log_error("layer %d expert %d: missing bias", layer, expert);
			return ERR_FORMAT;
		}
	}
	if (!L->has_types) {
		memcpy(L->types, src->types, sizeof(L->types));
		L->has_types = 1;
	}
	if (!L->experts[expert].weights[0])
		s->n_held++;
	L->experts[expert] = *src;
	return 0;
}

static int shard_expect(const gguf *g, const char *name, uint64_t a, uint64_t b, uint64_t c,
			const gguf_tensor **out)
{
	uint64_t ne[3] = {a, b, c};
	return gguf_expect_tensor(g, name, c ? 3 : 2, ne, out);
}

int shard_add_from_gguf(shard *s, const gguf *g, int layer, int expert)
{
	const struct moe_spec *sp = &s->spec;
	if (layer < 0 || layer >= sp->n_layer || !sp->layer_moe[layer] || expert < 0 ||
	    expert >= sp->n_expert) {
		log_error("%s: expert %d of layer %d does not exist", gguf_path(g), expert, layer);
		return ERR_RANGE;
	}
	static const char *names[3] = {"gate", "up", "down"};
	const uint64_t E = (uint64_t)sp->n_embd, F = (uint64_t)sp->n_ff_exp,
		       X = (uint64_t)sp->n_expert;
	struct shard_expert_src src = {0};
	for (int t = 0; t < 3; t++) {
		char name[128];
		const gguf_tensor *w, *b;
		uint64_t n_in = t == SHARD_DOWN ? F : E, n_out = t == SHARD_DOWN ? E : F;
		snprintf(name, sizeof(name), "blk.%d.ffn_%s_exps.weight", layer, names[t]);
		int rc = shard_expect(g, name, n_in, n_out, X, &w);
		if (rc)
			return rc;
		size_t per = kern_row_bytes(w->type, (int64_t)n_in) * n_out;
		src.weights[t] = (const char *)w->data + per * (size_t)expert;
		src.types[t] = w->type;
		if (sp->has_bias) {
			snprintf(name, sizeof(name), "blk.%d.ffn_%s_exps.bias", layer, names[t]);
			rc = shard_expect(g, name, n_out, X, 0, &b);
			if (rc)
				return rc;
			if (b->type != KERN_F32) {
				log_error("%s: tensor %s must be F32", gguf_path(g), name);
				return ERR_FORMAT;
			}
			src.biases[t] = (const float *)b->data + n_out * (size_t)expert;
		}
	}
	return shard_add_expert(s, layer, expert, &src);
}

int shard_add_all_from_gguf(shard *s, const gguf *g)
{
	for (int l = 0; l < s->spec.n_layer; l++) {
		if (!s->spec.layer_moe[l])
			continue;
		for (int e = 0; e < s->spec.n_expert; e++) {
			int rc = shard_add_from_gguf(s, g, l, e);
			if (rc)
				return rc;
		}
	}
	return 0;
}

static void shard_work_free(struct shard_work *w)
{
	free(w->item_row);
	free(w->item_slot);
	free(w->item_expert);
	free(w->xf);
	free(w->g);
	free(w->u);
	free(w->d);
	free(w->xa_gate);
	free(w->xa_up);
	free(w->ha);
	memset(w, 0, offsetof(struct shard_work, group_start));
}

void shard_destroy(shard **ps)
{
	shard *s = *ps;
	if (!s)
		return;
	shard_work_free(&s->w);
	for (int l = 0; l < s->spec.n_layer; l++)
		free(s->layers[l].experts);
	free(s->w.group_start);
	free(s->w.group_fill);
	free(s);
	*ps = NULL;
}

static int shard_reserve(shard *s, size_t items)
{
	struct shard_work *w = &s->w;
	if (items <= w->cap_items)
		return 0;
	shard_work_free(w);
	const size_t E = (size_t)s->spec.n_embd, F = (size_t)s->spec.n_ff_exp;
	size_t maxin = E > F ? E : F;
	w->item_row = malloc(items * sizeof(int32_t));
	w->item_slot = malloc(items * sizeof(int32_t));
	w->item_expert = malloc(items * sizeof(int32_t));
	w->xf = malloc(items * E * sizeof(float));
	w->g = malloc(items * F * sizeof(float));
	w->u = malloc(items * F * sizeof(float));
	w->d = malloc(items * E * sizeof(float));
	w->xa_gate = malloc(items * maxin * sizeof(float) + 64);
	w->xa_up = malloc(items * maxin * sizeof(float) + 64);
	w->ha = malloc(items * maxin * sizeof(float) + 64);
	if (!w->item_row || !w->item_slot || !w->item_expert || !w->xf || !w->g || !w->u || !w->d || !w->xa_gate ||
	    !w->xa_up || !w->ha) {
		shard_work_free(w);
		return ERR_NOMEM;
	}
	w->cap_items = items;
	return 0;
}

struct shard_call {
	shard *s;
	const struct shard_layer *L;
	int layer;
	int n_items;
	int k;
	const void *x;
	uint32_t x_type;
	size_t x_stride;
	const float *wts;
	float *out;
	size_t xg_stride, xu_stride, h_stride;
	enum kern_type at_gate, at_up, at_down;
};

/* Each item's input row, converted for the gate and up weights.  A row that
 * arrives already in a weight's activation type is copied as it is. */
static void shard_gather(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int64_t E = c->s->spec.n_embd;
	int64_t lo, hi;
	pool_split(c->n_items, ith, nth, 1, &lo, &hi);
	for (int64_t i = lo; i < hi; i++) {
		const char *xr = (const char *)c->x + (size_t)w->item_row[i] * c->x_stride;
		const float *xf = (const float *)xr;
		if (c->x_type != KERN_F32 && (c->x_type != c->at_gate || c->x_type != c->at_up)) {
			kern_dequant_row(c->x_type, xr, w->xf + i * E, E);
			xf = w->xf + i * E;
		}
		if (c->x_type == c->at_gate && c->x_type != KERN_F32)
			memcpy((char *)w->xa_gate + i * c->xg_stride, xr, c->xg_stride);
		else
			kern_convert_row(c->at_gate, xf, (char *)w->xa_gate + i * c->xg_stride, E);
		if (c->at_up == c->at_gate)
			continue;
		if (c->x_type == c->at_up && c->x_type != KERN_F32)
			memcpy((char *)w->xa_up + i * c->xu_stride, xr, c->xu_stride);
		else
			kern_convert_row(c->at_up, xf, (char *)w->xa_up + i * c->xu_stride, E);
	}
}

/* gate and up projections: work units are (expert, matrix, 16 output rows) */
static void shard_gate_up(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int n_exp = c->s->spec.n_expert;
	const int64_t F = c->s->spec.n_ff_exp, E = c->s->spec.n_embd;
	const int64_t chunks = (F + 15) / 16;
	int64_t n_units = 0;
	for (int e = 0; e < n_exp; e++)
		if (w->group_start[e + 1] > w->group_start[e])
			n_units += 2 * chunks;
	int64_t lo, hi;
	pool_split(n_units, ith, nth, 1, &lo, &hi);
	int64_t unit = 0;
	const int up_own = c->at_up != c->at_gate;
	for (int e = 0; e < n_exp && unit < hi; e++) {
		int n = w->group_start[e + 1] - w->group_start[e];
		if (n == 0)
			continue;
		const struct shard_expert_src *src = &c->L->experts[e];
		for (int m = 0; m < 2; m++) {
			for (int64_t ch = 0; ch < chunks; ch++, unit++) {
				if (unit < lo || unit >= hi)
					continue;
				const void *xa = m == 1 && up_own ? w->xa_up : w->xa_gate;
				size_t xs = m == 1 && up_own ? c->xu_stride : c->xg_stride;
				float *y = (m == 0 ? w->g : w->u) + (size_t)w->group_start[e] * F;
				int64_t o0 = ch * 16, o1 = o0 + 16 < F ? o0 + 16 : F;
				kern_matmul(src->types[m], src->weights[m], E, o0, o1,
					    (const char *)xa + (size_t)w->group_start[e] * xs, xs, n,
					    y, F);
			}
		}
	}
}

/* biases, activation, conversion for the down weights */
static void shard_act(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const struct moe_spec *sp = &c->s->spec;
	const int64_t F = sp->n_ff_exp;
	const float lim = sp->act_limit[c->layer], alpha = sp->act_alpha;
	int64_t lo, hi;
	pool_split(c->n_items, ith, nth, 1, &lo, &hi);
	for (int64_t i = lo; i < hi; i++) {
		float *g = w->g + i * F, *u = w->u + i * F;
		const struct shard_expert_src *src = &c->L->experts[w->item_expert[i]];
		if (src->biases[SHARD_GATE]) {
			for (int64_t j = 0; j < F; j++) {
				g[j] += src->biases[SHARD_GATE][j];
				u[j] += src->biases[SHARD_UP][j];
			}
		}
		switch (sp->act) {
		case MOE_ACT_SWIGLU:
			for (int64_t j = 0; j < F; j++)
				g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
			break;
		case MOE_ACT_SWIGLU_OAI:
			for (int64_t j = 0; j < F; j++) {
				float x = fminf(g[j], lim);
				float y = fminf(fmaxf(u[j], -lim), lim);
				g[j] = x / (1.0f + expf(alpha * (-x))) * (y + 1.0f);
			}
			break;
		case MOE_ACT_SWIGLU_CLAMP:
			for (int64_t j = 0; j < F; j++) {
				float x = fminf(g[j], lim);
				float y = fminf(fmaxf(u[j], -lim), lim);
				g[j] = x / (1.0f + expf(-x)) * y;
			}
			break;
		}
		kern_convert_row(c->at_down, g, (char *)w->ha + i * c->h_stride, F);
	}
}

/* down projection: work units are (expert, 16 output rows) */
static void shard_down(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int n_exp = c->s->spec.n_expert;
	const int64_t F = c->s->spec.n_ff_exp, E = c->s->spec.n_embd;
	const int64_t chunks = (E + 15) / 16;
	int64_t n_units = 0;
	for (int e = 0; e < n_exp; e++)
		if (w->group_start[e + 1] > w->group_start[e])
			n_units += chunks;
	int64_t lo, hi;
	pool_split(n_units, ith, nth, 1, &lo, &hi);
	int64_t unit = 0;
	for (int e = 0; e < n_exp && unit < hi; e++) {
		int n = w->group_start[e + 1] - w->group_start[e];
		if (n == 0)
			continue;
		const struct shard_expert_src *src = &c->L->experts[e];
		for (int64_t ch = 0; ch < chunks; ch++, unit++) {
			if (unit < lo || unit >= hi)
				continue;
			int64_t o0 = ch * 16, o1 = o0 + 16 < E ? o0 + 16 : E;
			kern_matmul(src->types[SHARD_DOWN], src->weights[SHARD_DOWN], F, o0, o1,
				    (const char *)w->ha + (size_t)w->group_start[e] * c->h_stride,
				    c->h_stride, n, w->d + (size_t)w->group_start[e] * E, E);
		}
	}
}

/* bias, routing weight, scatter to (row, slot) */
static void shard_scatter(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int64_t E = c->s->spec.n_embd;
	int64_t lo, hi;
	pool_split(c->n_items, ith, nth, 1, &lo, &hi);
	for (int64_t i = lo; i < hi; i++) {
		const size_t rs = (size_t)w->item_row[i] * (size_t)c->k + (size_t)w->item_slot[i];
		const float wt = c->wts[rs];
		float *d = w->d + i * E, *o = c->out + rs * (size_t)E;
		const float *b = c->L->experts[w->item_expert[i]].biases[SHARD_DOWN];
		if (b)
			for (int64_t j = 0; j < E; j++)
				d[j] += b[j];
		for (int64_t j = 0; j < E; j++)
			o[j] = d[j] * wt;
	}
}

int shard_compute(shard *s, pool *p, int layer, int n_rows, int k, const void *x,
		  uint32_t x_type, const int32_t *ids, const float *wts, float *out)
{
	const struct moe_spec *sp = &s->spec;
	if (layer < 0 || layer >= sp->n_layer || !sp->layer_moe[layer]) {
		log_error("expert request for layer %d, which has no routed experts", layer);
		return ERR_RANGE;
	}
	if (n_rows < 0 || k < 1 || k > sp->n_expert)
		return ERR_RANGE;
	const struct shard_layer *L = &s->layers[layer];
	struct shard_work *w = &s->w;
	size_t n_items = 0;
	memset(w->group_start, 0, ((size_t)sp->n_expert + 1) * sizeof(int32_t));
	for (size_t i = 0; i < (size_t)n_rows * (size_t)k; i++) {
		if (ids[i] < 0)
			continue;
		if (!shard_has(s, layer, ids[i])) {
			log_error("expert %d of layer %d is not held here", ids[i], layer);
			return ERR_RANGE;
		}
		w->group_start[ids[i] + 1]++;
		n_items++;
	}
	if (n_items == 0)
		return 0;
	struct shard_call c = {
		.s = s, .L = L, .layer = layer, .n_items = (int)n_items, .k = k, .x = x,
		.x_type = x_type, .wts = wts, .out = out,
		.at_gate = kern_act_type(L->types[SHARD_GATE]),
		.at_up = kern_act_type(L->types[SHARD_UP]),
		.at_down = kern_act_type(L->types[SHARD_DOWN]),
	};
	if (x_type != KERN_F32 && x_type != c.at_gate) {
		log_error("layer %d: rows arrived as %s, expected F32 or %s", layer,
			  kern_type_name(x_type), kern_type_name(c.at_gate));
		return ERR_RANGE;
	}
	c.x_stride = kern_row_bytes(x_type, sp->n_embd);
	c.xg_stride = kern_row_bytes(c.at_gate, sp->n_embd);
	c.xu_stride = kern_row_bytes(c.at_up, sp->n_embd);
	c.h_stride = kern_row_bytes(c.at_down, sp->n_ff_exp);
	int rc = shard_reserve(s, n_items);
	if (rc)
		return rc;
	for (int e = 0; e < sp->n_expert; e++)
		w->group_start[e + 1] += w->group_start[e];
	memcpy(w->group_fill, w->group_start, (size_t)sp->n_expert * sizeof(int32_t));
	/* items of one expert keep row order, so results do not depend on batching */
	for (int r = 0; r < n_rows; r++) {
		for (int j = 0; j < k; j++) {
			int32_t e = ids[(size_t)r * k + j];
			if (e < 0)
				continue;
			int32_t at = w->group_fill[e]++;
			w->item_row[at] = r;
			w->item_slot[at] = j;
			w->item_expert[at] = e;
		}
	}
	pool_run(p, shard_gather, &c);
	pool_run(p, shard_gate_up, &c);
	pool_run(p, shard_act, &c);
	pool_run(p, shard_down, &c);
	pool_run(p, shard_scatter, &c);
	return 0;
}
