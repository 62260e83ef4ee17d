#include "shard.h"
#include "err.h"
#include "log.h"
#include "../kernels/kern.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct shard_layer {
	uint32_t types[3]; /* weight types shared by the layer's experts */
	int has_types;
	struct shard_expert_src *experts; /* [n_expert]; weights[0] == NULL if not held */
};

/* Per-call working set, grown on demand and then reused (no allocation in the
 * steady state). */
struct shard_work {
	size_t cap_items;      /* (row, slot) pairs, and rows */
	int32_t *item_row;     /* sorted by expert: row index */
	int32_t *item_slot;    /* slot index */
	int32_t *item_next;    /* the next item of the same row, or -1 */
	int32_t *row_first;    /* [rows] a row's first item, or -1 */
	float *xf;	       /* [rows][n_embd] rows dequantised when they arrive converted */
	float *g, *u;	       /* [items][n_ff] */
	float *d;	       /* [items][n_embd] */
	void *xa_gate, *xa_up; /* activations converted for the gate / up weights */
	void *ha;	       /* activated hidden rows converted for the down weights */
	int32_t *group_start;  /* [n_expert + 1] offsets into the sorted items */
	int32_t *group_fill;
	int32_t *group_expert; /* [n_expert] the experts with items, in id order */
	int n_groups;
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
		s->layers[l].experts =
		    calloc((size_t)spec->n_expert, sizeof(struct shard_expert_src));
		if (!s->layers[l].experts)
			rc = ERR_NOMEM;
	}
	s->w.group_start = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	s->w.group_fill = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	s->w.group_expert = calloc((size_t)spec->n_expert + 1, sizeof(int32_t));
	if (!s->w.group_start || !s->w.group_fill || !s->w.group_expert)
		rc = ERR_NOMEM;
	if (rc)
		shard_destroy(&s);
	*out = s;
	return rc;
}

const struct moe_spec *shard_spec(const shard *s)
{
	return &s->spec;
}
int shard_n_experts(const shard *s)
{
	return s->n_held;
}

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
		if (!src->weights[t] || !kern_type_dot(src->types[t]) ||
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
	return shard_add_from_gguf_slot(s, g, layer, expert, expert, s->spec.n_expert);
}

int shard_add_from_gguf_slot(shard *s, const gguf *g, int layer, int expert, int slot, int n_slots)
{
	const struct moe_spec *sp = &s->spec;
	if (layer < 0 || layer >= sp->n_layer || !sp->layer_moe[layer] || expert < 0 ||
	    expert >= sp->n_expert || slot < 0 || slot >= n_slots) {
		log_error("%s: expert %d of layer %d does not exist", gguf_path(g), expert, layer);
		return ERR_RANGE;
	}
	static const char *names[3] = {"gate", "up", "down"};
	const uint64_t E = (uint64_t)sp->n_embd, F = (uint64_t)sp->n_ff_exp, X = (uint64_t)n_slots;
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
		src.weights[t] = (const char *)w->data + per * (size_t)slot;
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
			src.biases[t] = (const float *)b->data + n_out * (size_t)slot;
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
	free(w->item_next);
	free(w->row_first);
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
	free(s->w.group_expert);
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
	w->item_next = malloc(items * sizeof(int32_t));
	w->row_first = malloc(items * sizeof(int32_t));
	w->xf = malloc(items * E * sizeof(float));
	w->g = malloc(items * F * sizeof(float));
	w->u = malloc(items * F * sizeof(float));
	w->d = malloc(items * E * sizeof(float));
	w->xa_gate = malloc(items * maxin * sizeof(float) + 64);
	w->xa_up = malloc(items * maxin * sizeof(float) + 64);
	w->ha = malloc(items * maxin * sizeof(float) + 64);
	if (!w->item_row || !w->item_slot || !w->item_next || !w->row_first || !w->xf || !w->g ||
	    !w->u || !w->d || !w->xa_gate || !w->xa_up || !w->ha) {
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
	int n_rows;
	int n_items;
	int k;
	const void *x;
	uint32_t x_type;
	size_t x_stride;
	const float *wts;
	float *out;
	size_t xg_stride, xu_stride, h_stride;
	enum kern_type at_gate, at_up, at_down;
	int64_t ff_chunk;  /* gate/up outputs per work unit (a multiple of 32) */
	int64_t emb_chunk; /* down outputs per work unit */
};

/* Phase 1: each input row converted once for the gate and up weights (a row
 * that arrives already in that activation type is used as it is), then copied
 * to its items' places.  Work is split by rows. */
static void shard_gather(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int64_t E = c->s->spec.n_embd;
	const int up_own = c->at_up != c->at_gate;
	int64_t lo, hi;
	pool_split(c->n_rows, ith, nth, 1, &lo, &hi);
	for (int64_t r = lo; r < hi; r++) {
		const char *xr = (const char *)c->x + (size_t)r * c->x_stride;
		const float *xf = (const float *)xr;
		if (c->x_type != KERN_F32 && (c->x_type != c->at_gate || c->x_type != c->at_up)) {
			kern_dequant_row(c->x_type, xr, w->xf + r * E, E);
			xf = w->xf + r * E;
		}
		/* row r's converted copies go to its first item's slot */
		int32_t first = w->row_first[r];
		if (first < 0)
			continue;
		char *g0 = (char *)w->xa_gate + (size_t)first * c->xg_stride;
		if (c->x_type == c->at_gate && c->x_type != KERN_F32)
			memcpy(g0, xr, c->xg_stride);
		else
			kern_convert_row(c->at_gate, xf, g0, E);
		char *u0 = (char *)w->xa_up + (size_t)first * c->xu_stride;
		if (up_own) {
			if (c->x_type == c->at_up && c->x_type != KERN_F32)
				memcpy(u0, xr, c->xu_stride);
			else
				kern_convert_row(c->at_up, xf, u0, E);
		}
		for (int32_t i = w->item_next[first]; i >= 0; i = w->item_next[i]) {
			memcpy((char *)w->xa_gate + (size_t)i * c->xg_stride, g0, c->xg_stride);
			if (up_own)
				memcpy((char *)w->xa_up + (size_t)i * c->xu_stride, u0,
				       c->xu_stride);
		}
	}
}

/* Bias, activation and conversion for the down weights of items
 * [i0, i0 + n) of expert e, hidden columns [j0, j1) (j0, j1 multiples of the
 * down weights' activation block, or j1 = F). */
static void shard_act_cols(const struct shard_call *c, int e, int64_t i0, int64_t n, int64_t j0,
			   int64_t j1)
{
	struct shard_work *w = &c->s->w;
	const struct moe_spec *sp = &c->s->spec;
	const int64_t F = sp->n_ff_exp;
	const float lim = sp->act_limit[c->layer], alpha = sp->act_alpha;
	const struct shard_expert_src *src = &c->L->experts[e];
	const size_t col_bytes = kern_row_bytes(c->at_down, j0);
	for (int64_t i = i0; i < i0 + n; i++) {
		float *g = w->g + i * F, *u = w->u + i * F;
		if (src->biases[SHARD_GATE]) {
			for (int64_t j = j0; j < j1; j++) {
				g[j] += src->biases[SHARD_GATE][j];
				u[j] += src->biases[SHARD_UP][j];
			}
		}
		switch (sp->act) {
		case MOE_ACT_SWIGLU: kern_swiglu(g, u, j0, j1, F); break;
		case MOE_ACT_SWIGLU_OAI:
			for (int64_t j = j0; j < j1; j++) {
				float x = fminf(g[j], lim);
				float y = fminf(fmaxf(u[j], -lim), lim);
				g[j] = x / (1.0f + expf(alpha * (-x))) * (y + 1.0f);
			}
			break;
		case MOE_ACT_SWIGLU_CLAMP:
			for (int64_t j = j0; j < j1; j++) {
				float x = fminf(g[j], lim);
				float y = fminf(fmaxf(u[j], -lim), lim);
				g[j] = x / (1.0f + expf(-x)) * y;
			}
			break;
		}
		kern_convert_row(c->at_down, g + j0, (char *)w->ha + i * c->h_stride + col_bytes,
				 j1 - j0);
	}
}

/* Phase 2: gate and up projections, then the activation of those columns.
 * Work units are (expert, ff_chunk hidden columns); the activation and the
 * block conversion are per column block, so no unit waits for another. */
static void shard_gate_up(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int64_t F = c->s->spec.n_ff_exp, E = c->s->spec.n_embd;
	const int64_t chunks = (F + c->ff_chunk - 1) / c->ff_chunk;
	int64_t lo, hi;
	pool_split(w->n_groups * chunks, ith, nth, 1, &lo, &hi);
	const int up_own = c->at_up != c->at_gate;
	for (int64_t unit = lo; unit < hi; unit++) {
		const int e = w->group_expert[unit / chunks];
		const int64_t ch = unit % chunks;
		const int64_t i0 = w->group_start[e];
		const int n = w->group_start[e + 1] - w->group_start[e];
		const struct shard_expert_src *src = &c->L->experts[e];
		const int64_t o0 = ch * c->ff_chunk,
			      o1 = o0 + c->ff_chunk < F ? o0 + c->ff_chunk : F;
		kern_matmul_expert(src->types[SHARD_GATE], src->weights[SHARD_GATE], E, o0, o1,
				   (const char *)w->xa_gate + (size_t)i0 * c->xg_stride,
				   c->xg_stride, n, w->g + (size_t)i0 * F, F);
		const void *xu = up_own ? w->xa_up : w->xa_gate;
		size_t xus = up_own ? c->xu_stride : c->xg_stride;
		kern_matmul_expert(src->types[SHARD_UP], src->weights[SHARD_UP], E, o0, o1,
				   (const char *)xu + (size_t)i0 * xus, xus, n,
				   w->u + (size_t)i0 * F, F);
		shard_act_cols(c, e, i0, n, o0, o1);
	}
}

/* Phase 3: down projection, then bias, routing weight and the scatter to
 * (row, slot) of those columns.  Work units are (expert, emb_chunk outputs). */
static void shard_down(void *ctx, int ith, int nth)
{
	struct shard_call *c = ctx;
	struct shard_work *w = &c->s->w;
	const int64_t F = c->s->spec.n_ff_exp, E = c->s->spec.n_embd;
	const int64_t chunks = (E + c->emb_chunk - 1) / c->emb_chunk;
	int64_t lo, hi;
	pool_split(w->n_groups * chunks, ith, nth, 1, &lo, &hi);
	for (int64_t unit = lo; unit < hi; unit++) {
		const int e = w->group_expert[unit / chunks];
		const int64_t ch = unit % chunks;
		const int64_t i0 = w->group_start[e];
		const int n = w->group_start[e + 1] - w->group_start[e];
		const struct shard_expert_src *src = &c->L->experts[e];
		const int64_t o0 = ch * c->emb_chunk,
			      o1 = o0 + c->emb_chunk < E ? o0 + c->emb_chunk : E;
		kern_matmul_expert(src->types[SHARD_DOWN], src->weights[SHARD_DOWN], F, o0, o1,
				   (const char *)w->ha + (size_t)i0 * c->h_stride, c->h_stride, n,
				   w->d + (size_t)i0 * E, E);
		const float *b = src->biases[SHARD_DOWN];
		for (int64_t i = i0; i < i0 + n; i++) {
			const size_t rs =
			    (size_t)w->item_row[i] * (size_t)c->k + (size_t)w->item_slot[i];
			const float wt = c->wts[rs];
			float *d = w->d + i * E, *o = c->out + rs * (size_t)E;
			if (b)
				for (int64_t j = o0; j < o1; j++)
					d[j] += b[j];
			for (int64_t j = o0; j < o1; j++)
				o[j] = d[j] * wt;
		}
	}
}

/* Runs a phase on the pool, or on the calling thread when it is too small to
 * be worth waking the other threads for. */
static void shard_phase(pool *p, pool_fn fn, struct shard_call *c, int small)
{
	if (small)
		fn(c, 0, 1);
	else
		pool_run(p, fn, c);
}

int shard_compute(shard *s, pool *p, int layer, int n_rows, int k, const void *x, uint32_t x_type,
		  const int32_t *ids, const float *wts, float *out)
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
	    .s = s,
	    .L = L,
	    .layer = layer,
	    .n_rows = n_rows,
	    .n_items = (int)n_items,
	    .k = k,
	    .x = x,
	    .x_type = x_type,
	    .wts = wts,
	    .out = out,
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
	int rc = shard_reserve(s, n_items > (size_t)n_rows ? n_items : (size_t)n_rows);
	if (rc)
		return rc;
	w->n_groups = 0;
	for (int e = 0; e < sp->n_expert; e++) {
		if (w->group_start[e + 1] > 0)
			w->group_expert[w->n_groups++] = e;
		w->group_start[e + 1] += w->group_start[e];
	}
	memcpy(w->group_fill, w->group_start, (size_t)sp->n_expert * sizeof(int32_t));
	/* items of one expert keep row order, so results do not depend on
	 * batching; each row's items are chained for the gather */
	for (int r = 0; r < n_rows; r++) {
		int32_t prev = -1;
		w->row_first[r] = -1;
		for (int j = 0; j < k; j++) {
			int32_t e = ids[(size_t)r * k + j];
			if (e < 0)
				continue;
			int32_t at = w->group_fill[e]++;
			w->item_row[at] = r;
			w->item_slot[at] = j;
			w->item_next[at] = -1;
			if (prev < 0)
				w->row_first[r] = at;
			else
				w->item_next[prev] = at;
			prev = at;
		}
	}
	/* Work units: 64 hidden columns or one activation block of the down
	 * weights if larger (Q8_K: 256), whole activation blocks, so a
	 * unit converts its own columns for the down weights) and 64 output
	 * columns; a handful of rows runs the light phases on this thread. */
	const int64_t blk = kern_type_block(c.at_down);
	c.ff_chunk = blk >= 64 ? blk : 64;
	if (c.ff_chunk > sp->n_ff_exp)
		c.ff_chunk = sp->n_ff_exp;
	c.emb_chunk = 64;
	const int small = n_items <= 16;
	shard_phase(p, shard_gather, &c, small);
	pool_run(p, shard_gate_up, &c);
	pool_run(p, shard_down, &c);
	return 0;
}
