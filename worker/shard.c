#include "shard.h"
#include "../common/err.h"
#include "../common/log.h"
#include "../kernels/kern.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct shard_layer {
	const gguf_tensor *gate, *up, *down;	     /* weights */
	const gguf_tensor *gate_b, *up_b, *down_b; /* biases or NULL */
};

/* Per-call working set, grown on demand and then reused (no allocation in the
 * steady state). */
struct shard_work {
	size_t cap_items;   /* (row, slot) pairs */
	int32_t *item_row;  /* sorted by expert: row index */
	int32_t *item_slot; /* slot index */
	int32_t *group_start; /* [n_expert + 1] offsets into the sorted items */
	int32_t *group_fill;
	float *g, *u;	/* [items][n_ff] */
	float *d;	/* [items][n_embd] */
	void *xa_gate, *xa_up; /* activations converted for the gate / up weights */
	void *ha;	/* activated hidden rows converted for the down weights */
};

struct shard {
	const gguf *g;
	struct moe_spec spec;
	struct shard_layer layers[MOE_MAX_LAYERS];
	struct shard_work w;
};

static int shard_expect(const gguf *g, const char *name, uint64_t a, uint64_t b, uint64_t c,
			int optional, const gguf_tensor **out)
{
	*out = NULL;
	if (optional && !gguf_find_tensor(g, name))
		return 0;
	uint64_t ne[3] = {a, b, c};
	return gguf_expect_tensor(g, name, c ? 3 : 2, ne, out);
}

int shard_new(const gguf *g, const struct moe_spec *spec, shard **out)
{
	int rc = 0;
	*out = NULL;
	if (spec->n_layer < 0 || spec->n_layer > MOE_MAX_LAYERS || spec->n_embd <= 0 ||
	    spec->n_ff_exp < 0 || spec->n_expert < 0 || spec->n_expert_used > spec->n_expert) {
		log_error("%s: invalid expert specification", gguf_path(g));
		return ERR_FORMAT;
	}
	shard *s = calloc(1, sizeof(*s));
	if (!s)
		return ERR_NOMEM;
	s->g = g;
	s->spec = *spec;
	const uint64_t E = (uint64_t)spec->n_embd, F = (uint64_t)spec->n_ff_exp,
		       X = (uint64_t)spec->n_expert;
	for (int l = 0; l < spec->n_layer; l++) {
		if (!spec->layer_moe[l])
			continue;
		struct shard_layer *L = &s->layers[l];
		char name[128];
#define SHARD_T(field, suffix, a, b, c, opt)                                              \
	do {                                                                              \
		snprintf(name, sizeof(name), "blk.%d.%s", l, suffix);                     \
		rc = shard_expect(g, name, a, b, c, opt, &L->field);                      \
		if (rc)                                                                   \
			goto out;                                                         \
	} while (0)
		SHARD_T(gate, "ffn_gate_exps.weight", E, F, X, 0);
		SHARD_T(up, "ffn_up_exps.weight", E, F, X, 0);
		SHARD_T(down, "ffn_down_exps.weight", F, E, X, 0);
		if (spec->has_bias) {
			SHARD_T(gate_b, "ffn_gate_exps.bias", F, X, 0, 0);
			SHARD_T(up_b, "ffn_up_exps.bias", F, X, 0, 0);
			SHARD_T(down_b, "ffn_down_exps.bias", E, X, 0, 0);
			if (L->gate_b->type != KERN_F32 || L->up_b->type != KERN_F32 ||
			    L->down_b->type != KERN_F32) {
				log_error("%s: blk.%d: expert biases must be F32", gguf_path(g), l);
				rc = ERR_FORMAT;
				goto out;
			}
		}
#undef SHARD_T
	}
	s->w.group_start = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	s->w.group_fill = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	if (!s->w.group_start || !s->w.group_fill)
		rc = ERR_NOMEM;
out:
	if (rc)
		shard_destroy(&s);
	*out = s;
	return rc;
}

static void shard_work_free(struct shard_work *w)
{
	free(w->item_row);
	free(w->item_slot);
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
	w->g = malloc(items * F * sizeof(float));
	w->u = malloc(items * F * sizeof(float));
	w->d = malloc(items * E * sizeof(float));
	w->xa_gate = malloc(items * maxin * sizeof(float) + 64);
	w->xa_up = malloc(items * maxin * sizeof(float) + 64);
	w->ha = malloc(items * maxin * sizeof(float) + 64);
	if (!w->item_row || !w->item_slot || !w->g || !w->u || !w->d || !w->xa_gate ||
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
	int n_items;
	int k;
	const float *x;
	const float *wts;
	float *out;
	int layer;
	size_t xg_stride, xu_stride, h_stride;
	enum kern_type at_gate, at_up, at_down;
	int up_separate; /* up needs its own activation conversion */
};

static const void *shard_expert_w(const gguf_tensor *t, int e)
{
	size_t per = kern_row_bytes(t->type, (int64_t)t->ne[0]) * t->ne[1];
	return (const char *)t->data + per * (size_t)e;
}

/* gather each item's input row, converted for the gate and up weights */
static void shard_gather(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int64_t E = c->s->spec.n_embd;
	int64_t lo, hi;
	pool_split(c->n_items, ith, nth, 1, &lo, &hi);
	for (int64_t i = lo; i < hi; i++) {
		const float *xr = c->x + (size_t)w->item_row[i] * E;
		kern_convert_row(c->at_gate, xr, (char *)w->xa_gate + i * c->xg_stride, E);
		if (c->up_separate)
			kern_convert_row(c->at_up, xr, (char *)w->xa_up + i * c->xu_stride, E);
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
	for (int e = 0; e < n_exp && unit < hi; e++) {
		int n = w->group_start[e + 1] - w->group_start[e];
		if (n == 0)
			continue;
		for (int m = 0; m < 2; m++) {
			for (int64_t ch = 0; ch < chunks; ch++, unit++) {
				if (unit < lo || unit >= hi)
					continue;
				const gguf_tensor *t = m == 0 ? c->L->gate : c->L->up;
				const void *xa = m == 0 || !c->up_separate ? w->xa_gate : w->xa_up;
				size_t xs = m == 0 || !c->up_separate ? c->xg_stride : c->xu_stride;
				float *y = (m == 0 ? w->g : w->u) + (size_t)w->group_start[e] * F;
				int64_t o0 = ch * 16, o1 = o0 + 16 < F ? o0 + 16 : F;
				kern_matmul(t->type, shard_expert_w(t, e), E, o0, o1,
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
	int64_t lo, hi;
	pool_split(c->n_items, ith, nth, 1, &lo, &hi);
	for (int64_t i = lo; i < hi; i++) {
		float *g = w->g + i * F, *u = w->u + i * F;
		if (c->L->gate_b) {
			int e = 0; /* find this item's expert */
			while (w->group_start[e + 1] <= i)
				e++;
			const float *bg = (const float *)c->L->gate_b->data + (size_t)e * F;
			const float *bu = (const float *)c->L->up_b->data + (size_t)e * F;
			for (int64_t j = 0; j < F; j++) {
				g[j] += bg[j];
				u[j] += bu[j];
			}
		}
		switch (sp->act) {
		case MOE_ACT_SWIGLU:
			for (int64_t j = 0; j < F; j++)
				g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
			break;
		case MOE_ACT_SWIGLU_OAI: {
			const float lim = sp->act_limit[c->layer], alpha = sp->act_alpha;
			for (int64_t j = 0; j < F; j++) {
				float x = fminf(g[j], lim);
				float y = fminf(fmaxf(u[j], -lim), lim);
				g[j] = x / (1.0f + expf(alpha * (-x))) * (y + 1.0f);
			}
			break;
		}
		case MOE_ACT_SWIGLU_CLAMP: {
			const float lim = sp->act_limit[c->layer];
			for (int64_t j = 0; j < F; j++) {
				float x = fminf(g[j], lim);
				float y = fminf(fmaxf(u[j], -lim), lim);
				g[j] = x / (1.0f + expf(-x)) * y;
			}
			break;
		}
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
		for (int64_t ch = 0; ch < chunks; ch++, unit++) {
			if (unit < lo || unit >= hi)
				continue;
			int64_t o0 = ch * 16, o1 = o0 + 16 < E ? o0 + 16 : E;
			kern_matmul(c->L->down->type, shard_expert_w(c->L->down, e), F, o0, o1,
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
		if (c->L->down_b) {
			int e = 0;
			while (w->group_start[e + 1] <= i)
				e++;
			const float *b = (const float *)c->L->down_b->data + (size_t)e * E;
			for (int64_t j = 0; j < E; j++)
				d[j] += b[j];
		}
		for (int64_t j = 0; j < E; j++)
			o[j] = d[j] * wt;
	}
}

int shard_compute(shard *s, pool *p, int layer, int n_rows, int k, const float *x,
		  const int32_t *ids, const float *wts, float *out)
{
	const struct moe_spec *sp = &s->spec;
	if (layer < 0 || layer >= sp->n_layer || !sp->layer_moe[layer]) {
		log_error("expert request for layer %d, which has no routed experts", layer);
		return ERR_RANGE;
	}
	if (n_rows < 0 || k < 1 || k > sp->n_expert)
		return ERR_RANGE;
	struct shard_work *w = &s->w;
	size_t n_items = 0;
	memset(w->group_start, 0, ((size_t)sp->n_expert + 1) * sizeof(int32_t));
	for (size_t i = 0; i < (size_t)n_rows * (size_t)k; i++) {
		if (ids[i] < 0)
			continue;
		if (ids[i] >= sp->n_expert) {
			log_error("expert id %d out of range (%d experts)", ids[i], sp->n_expert);
			return ERR_RANGE;
		}
		w->group_start[ids[i] + 1]++;
		n_items++;
	}
	int rc = shard_reserve(s, n_items ? n_items : 1);
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
		}
	}
	const struct shard_layer *L = &s->layers[layer];
	struct shard_call c = {
		.s = s, .L = L, .layer = layer, .n_items = (int)n_items, .k = k, .x = x, .wts = wts, .out = out,
		.at_gate = kern_act_type(L->gate->type),
		.at_up = kern_act_type(L->up->type),
		.at_down = kern_act_type(L->down->type),
	};
	c.up_separate = c.at_up != c.at_gate;
	c.xg_stride = kern_row_bytes(c.at_gate, sp->n_embd);
	c.xu_stride = kern_row_bytes(c.at_up, sp->n_embd);
	c.h_stride = kern_row_bytes(c.at_down, sp->n_ff_exp);
	if (n_items == 0)
		return 0;
	pool_run(p, shard_gather, &c);
	pool_run(p, shard_gate_up, &c);
	pool_run(p, shard_act, &c);
	pool_run(p, shard_down, &c);
	pool_run(p, shard_scatter, &c);
	return 0;
}
