/* balance: decayed router counts and expert rebalancing policies (see balance.h). */
#include "balance.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"

#define BALANCE_MAX_DIM	  65536	     /* cap on n_layer, n_expert, n_worker */
#define BALANCE_MAX_CELLS (1u << 28) /* cap on n_layer * n_expert * n_replica */
#define BALANCE_EPS	  1e-12	     /* relative gain treated as no gain */

/* ---- decayed router counts ---------------------------------------------- */

struct balance_counts {
	int n_layer;
	int n_expert;
	double window;
	double *load; /* [n_layer][n_expert] */
};

int balance_counts_new(int n_layer, int n_expert, double window_tokens, struct balance_counts **out)
{
	*out = NULL;
	if (n_layer < 1 || n_layer > BALANCE_MAX_DIM || n_expert < 1 ||
	    n_expert > BALANCE_MAX_DIM || !(window_tokens > 0)) {
		log_error("balance: invalid counter shape %d layers x %d experts, window %g",
			  n_layer, n_expert, window_tokens);
		return ERR_CONFIG;
	}
	struct balance_counts *c = calloc(1, sizeof(*c));
	double *load = calloc((size_t)n_layer * (size_t)n_expert, sizeof(*load));
	if (!c || !load) {
		log_error("balance: out of memory for %d x %d counts", n_layer, n_expert);
		free(c);
		free(load);
		return ERR_NOMEM;
	}
	c->n_layer = n_layer;
	c->n_expert = n_expert;
	c->window = window_tokens;
	c->load = load;
	*out = c;
	return 0;
}

void balance_counts_destroy(struct balance_counts **c)
{
	if (!c || !*c)
		return;
	free((*c)->load);
	free(*c);
	*c = NULL;
}

int balance_counts_add(struct balance_counts *c, int layer, const int32_t *ids, int n_rows, int k)
{
	if (layer < 0 || layer >= c->n_layer || n_rows < 0 || k < 0 ||
	    (n_rows > 0 && k > 0 && !ids) || (k > 0 && n_rows > INT32_MAX / k)) {
		log_error("balance: invalid counts update layer %d, %d rows x %d ids", layer,
			  n_rows, k);
		return ERR_CONFIG;
	}
	size_t n = (size_t)n_rows * (size_t)k;
	for (size_t i = 0; i < n; i++) {
		if (ids[i] < -1 || ids[i] >= c->n_expert) {
			log_error("balance: layer %d routed row %zu to expert %d of %d", layer,
				  i / (size_t)k, (int)ids[i], c->n_expert);
			return ERR_RANGE;
		}
	}
	double *row = &c->load[(size_t)layer * (size_t)c->n_expert];
	double f = exp(-(double)n_rows / c->window);
	for (int e = 0; e < c->n_expert; e++)
		row[e] *= f;
	for (size_t i = 0; i < n; i++)
		if (ids[i] >= 0) /* -1: an empty slot */
			row[ids[i]] += 1.0;
	return 0;
}

const double *balance_counts_load(const struct balance_counts *c)
{
	return c->load;
}

/* ---- shared helpers ------------------------------------------------------ */

static size_t balance_cell(const placement *p, int layer, int expert)
{
	return ((size_t)layer * (size_t)p->n_expert + (size_t)expert) * (size_t)p->n_replica;
}

static double balance_load_of(const struct placement_model *m, const double *load, int layer,
			      int expert)
{
	const double *l = load ? load : m->load;
	return l ? l[(size_t)layer * (size_t)m->n_expert + (size_t)expert] : 1.0;
}

/* work(L, e) = load * bytes (placement.h's convention). */
static double balance_work(const struct placement_model *m, const double *load, int layer,
			   int expert)
{
	return balance_load_of(m, load, layer, expert) * (double)m->expert_bytes[layer];
}

static int balance_check_input(const struct balance_input *in)
{
	int result = placement_check_model(in->model);
	if (result)
		return result;
	if (!in->workers || in->n_worker < 1 || in->n_worker > BALANCE_MAX_DIM) {
		log_error("balance: need 1..%d workers, got %d", BALANCE_MAX_DIM, in->n_worker);
		return ERR_CONFIG;
	}
	for (int w = 0; w < in->n_worker; w++) {
		if (!isfinite(in->workers[w].speed) || in->workers[w].speed <= 0) {
			log_error("balance: worker %d has invalid speed %g", w,
				  in->workers[w].speed);
			return ERR_CONFIG;
		}
	}
	if (in->min_replicas < 1 || in->max_replicas < in->min_replicas ||
	    in->max_replicas > in->n_worker) {
		log_error("balance: replica bounds %d..%d must satisfy 1 <= min <= max <= %d "
			  "(workers)",
			  in->min_replicas, in->max_replicas, in->n_worker);
		return ERR_CONFIG;
	}
	if ((size_t)in->model->n_layer * (size_t)in->model->n_expert * (size_t)in->max_replicas >
	    BALANCE_MAX_CELLS) {
		log_error("balance: %d layers x %d experts x %d replicas is too large",
			  in->model->n_layer, in->model->n_expert, in->max_replicas);
		return ERR_CONFIG;
	}
	if (in->slots_per_worker < 0 || in->extra_replicas < 0 ||
	    (in->slots_per_worker == 0 && in->extra_replicas > BALANCE_MAX_DIM * 64)) {
		log_error("balance: invalid replica budget: %d slots per worker, %d extra",
			  in->slots_per_worker, in->extra_replicas);
		return ERR_CONFIG;
	}
	if (in->slots_per_worker > 0) {
		long long slots = (long long)in->slots_per_worker * in->n_worker;
		if (slots < (long long)in->model->n_expert * in->min_replicas ||
		    in->slots_per_worker > in->model->n_expert) {
			log_error("balance: %d slots per worker x %d workers cannot hold %d "
				  "experts x %d replicas (or exceed the expert count)",
				  in->slots_per_worker, in->n_worker, in->model->n_expert,
				  in->min_replicas);
			return ERR_CONFIG;
		}
	}
	if (!isfinite(in->threshold) || in->threshold < 0) {
		log_error("balance: invalid migration threshold %g", in->threshold);
		return ERR_CONFIG;
	}
	if (in->current) {
		result = placement_validate(in->current, in->model, in->workers, in->n_worker);
		if (result)
			return result;
	}
	return 0;
}

/* Replicas per routed layer allowed by the budget. */
static long long balance_layer_budget(const struct balance_input *in)
{
	if (in->slots_per_worker > 0)
		return (long long)in->slots_per_worker * in->n_worker;
	return (long long)in->model->n_expert * in->min_replicas + in->extra_replicas;
}

static int balance_alloc(placement *p, int n_layer, int n_expert, int n_replica, int n_worker)
{
	memset(p, 0, sizeof(*p));
	p->n_layer = n_layer;
	p->n_expert = n_expert;
	p->n_replica = n_replica;
	p->n_worker = n_worker;
	size_t cells = (size_t)n_layer * (size_t)n_expert * (size_t)n_replica;
	p->holder = malloc(cells * sizeof(*p->holder));
	p->worker_bytes = calloc((size_t)n_worker, sizeof(*p->worker_bytes));
	p->worker_load = calloc((size_t)n_worker, sizeof(*p->worker_load));
	if (!p->holder || !p->worker_bytes || !p->worker_load) {
		log_error("balance: out of memory for %zu holder slots", cells);
		placement_free(p);
		return ERR_NOMEM;
	}
	for (size_t i = 0; i < cells; i++)
		p->holder[i] = -1;
	return 0;
}

/* Working state of a plan: the placement plus per-layer work and counts. */
struct balance_state {
	const struct balance_input *in;
	placement p;
	double *layer_work; /* [n_layer][n_worker] */
	int *layer_count;   /* [n_layer][n_worker] replicas of layer L on w */
	int *layer_total;   /* [n_layer] replicas in layer L */
};

static void balance_state_free(struct balance_state *s)
{
	placement_free(&s->p);
	free(s->layer_work);
	free(s->layer_count);
	free(s->layer_total);
	memset(s, 0, sizeof(*s));
}

static int balance_state_init(struct balance_state *s, const struct balance_input *in)
{
	const struct placement_model *m = in->model;
	memset(s, 0, sizeof(*s));
	s->in = in;
	int result = balance_alloc(&s->p, m->n_layer, m->n_expert, in->max_replicas, in->n_worker);
	if (result)
		return result;
	size_t cells = (size_t)m->n_layer * (size_t)in->n_worker;
	s->layer_work = calloc(cells, sizeof(*s->layer_work));
	s->layer_count = calloc(cells, sizeof(*s->layer_count));
	s->layer_total = calloc((size_t)m->n_layer, sizeof(*s->layer_total));
	if (!s->layer_work || !s->layer_count || !s->layer_total) {
		log_error("balance: out of memory for %zu per-layer worker cells", cells);
		balance_state_free(s);
		return ERR_NOMEM;
	}
	return 0;
}

/* Recomputes worker_bytes / worker_load / per-layer tables from the holders. */
static void balance_state_refresh(struct balance_state *s)
{
	const struct placement_model *m = s->in->model;
	placement *p = &s->p;
	int nw = p->n_worker;
	memset(p->worker_bytes, 0, (size_t)nw * sizeof(*p->worker_bytes));
	memset(p->worker_load, 0, (size_t)nw * sizeof(*p->worker_load));
	memset(s->layer_work, 0, (size_t)p->n_layer * (size_t)nw * sizeof(*s->layer_work));
	memset(s->layer_count, 0, (size_t)p->n_layer * (size_t)nw * sizeof(*s->layer_count));
	memset(s->layer_total, 0, (size_t)p->n_layer * sizeof(*s->layer_total));
	for (int l = 0; l < p->n_layer; l++) {
		for (int e = 0; m->layer_moe[l] && e < p->n_expert; e++) {
			int n = placement_n_holders(p, l, e);
			if (n == 0)
				continue;
			double share = balance_work(m, NULL, l, e) / (double)n;
			for (int r = 0; r < n; r++) {
				int w = placement_holder(p, l, e, r);
				p->worker_bytes[w] += m->expert_bytes[l];
				p->worker_load[w] += share;
				s->layer_work[(size_t)l * (size_t)nw + (size_t)w] += share;
				s->layer_count[(size_t)l * (size_t)nw + (size_t)w]++;
			}
			s->layer_total[l] += n;
		}
	}
}

/* ---- prediction ---------------------------------------------------------- */

int balance_predict(const placement *p, const struct placement_model *m,
		    const struct placement_worker *workers, const double *load,
		    struct balance_stats *out)
{
	double *total = NULL, *layer = NULL;
	memset(out, 0, sizeof(*out));
	int result = placement_validate(p, m, workers, p->n_worker);
	if (result)
		return result;
	int nw = p->n_worker;
	total = calloc((size_t)nw, sizeof(*total));
	layer = calloc((size_t)nw, sizeof(*layer));
	if (!total || !layer) {
		log_error("balance: out of memory predicting %d workers", nw);
		result = ERR_NOMEM;
		goto out;
	}
	for (int l = 0; l < p->n_layer; l++) {
		if (!m->layer_moe[l])
			continue;
		memset(layer, 0, (size_t)nw * sizeof(*layer));
		for (int e = 0; e < p->n_expert; e++) {
			int n = placement_n_holders(p, l, e);
			double share = balance_work(m, load, l, e) / (double)n;
			for (int r = 0; r < n; r++)
				layer[placement_holder(p, l, e, r)] += share;
		}
		double mx = 0;
		for (int w = 0; w < nw; w++) {
			total[w] += layer[w];
			double t = layer[w] / workers[w].speed;
			mx = t > mx ? t : mx;
		}
		out->step_time += mx;
	}
	double sum = 0;
	for (int w = 0; w < nw; w++) {
		double t = total[w] / workers[w].speed;
		out->max_time = t > out->max_time ? t : out->max_time;
		sum += t;
	}
	out->mean_time = sum / (double)nw;
	out->imbalance = out->mean_time > 0 ? out->max_time / out->mean_time : 1.0;
out:
	free(total);
	free(layer);
	return result;
}

uint64_t balance_moved_bytes(const placement *old_p, const placement *new_p,
			     const struct placement_model *m)
{
	if (old_p && (old_p->n_layer != new_p->n_layer || old_p->n_expert != new_p->n_expert))
		return UINT64_MAX;
	uint64_t moved = 0;
	for (int l = 0; l < new_p->n_layer && l < m->n_layer; l++) {
		for (int e = 0; e < new_p->n_expert; e++) {
			int n = placement_n_holders(new_p, l, e);
			for (int r = 0; r < n; r++) {
				int w = placement_holder(new_p, l, e, r);
				if (!old_p || !placement_holds(old_p, w, l, e))
					moved += m->expert_bytes[l];
			}
		}
	}
	return moved;
}

/* ---- eplb / hetero ------------------------------------------------------- */

struct balance_item {
	int expert;
	double weight; /* work / replicas of this expert */
};

/* Descending weight, then ascending expert. */
static int balance_item_cmp(const void *a, const void *b)
{
	const struct balance_item *x = a, *y = b;
	if (x->weight != y->weight)
		return x->weight > y->weight ? -1 : 1;
	return (x->expert > y->expert) - (x->expert < y->expert);
}

/* Replica counts of layer l: min_replicas each, then the budget handed out
 * one at a time to the largest work per replica. */
static void balance_replicate(const struct balance_input *in, int l, int *reps)
{
	const struct placement_model *m = in->model;
	long long extra = balance_layer_budget(in) - (long long)m->n_expert * in->min_replicas;
	for (int e = 0; e < m->n_expert; e++)
		reps[e] = in->min_replicas;
	for (; extra > 0; extra--) {
		int best = -1;
		double best_w = 0;
		for (int e = 0; e < m->n_expert; e++) {
			if (reps[e] >= in->max_replicas)
				continue;
			double w = balance_load_of(m, NULL, l, e) / (double)reps[e];
			if (best < 0 || w > best_w) {
				best = e;
				best_w = w;
			}
		}
		if (best < 0)
			break;
		reps[best]++;
	}
}

/* 1 if worker w can take one more replica of (l, e). */
static int balance_room(const struct balance_state *s, int w, int l, int e)
{
	const struct balance_input *in = s->in;
	uint64_t b = in->model->expert_bytes[l];
	uint64_t have = s->p.worker_bytes[w], mem = in->workers[w].mem_bytes;
	if (have > mem || b > mem - have)
		return 0;
	if (in->slots_per_worker > 0 &&
	    s->layer_count[(size_t)l * (size_t)in->n_worker + (size_t)w] >= in->slots_per_worker)
		return 0;
	return !placement_holds(&s->p, w, l, e);
}

/* No worker with room lacks (l, e): find a worker w with room (that holds e)
 * and a worker x without e, move one of x's other experts f (not on w) from x
 * to w, and return x, which now has room for e; -1 if there is no such swap.
 * Within a layer all experts have the same size, so memory stays in budget. */
static int balance_repair(struct balance_state *s, int l, int e, const int *reps)
{
	const struct balance_input *in = s->in;
	const struct placement_model *m = in->model;
	int nw = in->n_worker;
	uint64_t b = m->expert_bytes[l];
	for (int w = 0; w < nw; w++) {
		uint64_t have = s->p.worker_bytes[w], mem = in->workers[w].mem_bytes;
		if (have > mem || b > mem - have ||
		    (in->slots_per_worker > 0 &&
		     s->layer_count[(size_t)l * (size_t)nw + (size_t)w] >= in->slots_per_worker))
			continue;
		for (int x = 0; x < nw; x++) {
			if (x == w || placement_holds(&s->p, x, l, e))
				continue;
			for (int f = 0; f < m->n_expert; f++) {
				if (f == e || !placement_holds(&s->p, x, l, f) ||
				    placement_holds(&s->p, w, l, f))
					continue;
				int32_t *h = &s->p.holder[balance_cell(&s->p, l, f)];
				for (int r = 0; r < s->p.n_replica; r++)
					if (h[r] == x)
						h[r] = w;
				double share = balance_work(m, NULL, l, f) / (double)reps[f];
				s->layer_work[(size_t)l * (size_t)nw + (size_t)x] -= share;
				s->layer_work[(size_t)l * (size_t)nw + (size_t)w] += share;
				s->layer_count[(size_t)l * (size_t)nw + (size_t)x]--;
				s->layer_count[(size_t)l * (size_t)nw + (size_t)w]++;
				s->p.worker_load[x] -= share;
				s->p.worker_load[w] += share;
				s->p.worker_bytes[x] -= b;
				s->p.worker_bytes[w] += b;
				return x;
			}
		}
	}
	return -1;
}

static int balance_pack(const struct balance_input *in, int by_time, placement *out)
{
	const struct placement_model *m = in->model;
	struct balance_state s;
	struct balance_item *items = NULL;
	int *reps = NULL;
	memset(out, 0, sizeof(*out));
	int result = balance_check_input(in);
	if (result)
		return result;
	result = balance_state_init(&s, in);
	if (result)
		return result;
	int nw = in->n_worker;
	reps = malloc((size_t)m->n_expert * sizeof(*reps));
	items = malloc((size_t)m->n_expert * (size_t)in->max_replicas * sizeof(*items));
	if (!reps || !items) {
		log_error("balance: out of memory for %d experts", m->n_expert);
		result = ERR_NOMEM;
		goto out;
	}
	for (int l = 0; l < m->n_layer; l++) {
		if (!m->layer_moe[l])
			continue;
		balance_replicate(in, l, reps);
		size_t n_items = 0;
		for (int e = 0; e < m->n_expert; e++) {
			double w = balance_work(m, NULL, l, e) / (double)reps[e];
			for (int r = 0; r < reps[e]; r++)
				items[n_items++] = (struct balance_item){.expert = e, .weight = w};
		}
		qsort(items, n_items, sizeof(*items), balance_item_cmp);
		double *lw = &s.layer_work[(size_t)l * (size_t)nw];
		for (size_t i = 0; i < n_items; i++) {
			int e = items[i].expert, best = -1;
			double best_key = 0, best_tot = 0;
			for (int w = 0; w < nw; w++) {
				if (!balance_room(&s, w, l, e))
					continue;
				double sp = in->workers[w].speed;
				double key = by_time ? (lw[w] + items[i].weight) / sp : lw[w];
				double tot = (s.p.worker_load[w] + items[i].weight) / sp;
				if (best < 0 || key < best_key ||
				    (key == best_key && tot < best_tot)) {
					best = w;
					best_key = key;
					best_tot = tot;
				}
			}
			if (best < 0)
				best = balance_repair(&s, l, e, reps);
			if (best < 0) {
				log_error(
				    "balance: layer %d expert %d (%llu bytes) replica fits on "
				    "no worker (memory or slots too tight)",
				    l, e, (unsigned long long)m->expert_bytes[l]);
				result = ERR_CONFIG;
				goto out;
			}
			int32_t *h = &s.p.holder[balance_cell(&s.p, l, e)];
			int n = 0;
			while (h[n] >= 0)
				n++;
			h[n] = best;
			lw[best] += items[i].weight;
			s.p.worker_bytes[best] += m->expert_bytes[l];
			s.p.worker_load[best] += items[i].weight;
			s.layer_count[(size_t)l * (size_t)nw + (size_t)best]++;
		}
	}
	balance_state_refresh(&s);
	*out = s.p;
	memset(&s.p, 0, sizeof(s.p));
out:
	free(reps);
	free(items);
	balance_state_free(&s);
	return result;
}

static int balance_plan_eplb(const struct balance_input *in, placement *out)
{
	return balance_pack(in, 0, out);
}

static int balance_plan_hetero(const struct balance_input *in, placement *out)
{
	return balance_pack(in, 1, out);
}

/* ---- migrate ------------------------------------------------------------- */

/* Max and sum of squares of layer times, with one to all holders changed:
 * holders h[0..n) get per-replica work from old_share to new_share, `from`
 * (if >= 0) loses old_share, `to` (if >= 0) gains new_share. */
static void balance_eval(const struct balance_state *s, int l, const int32_t *h, int n,
			 double old_share, double new_share, int from, int to, double *max_out,
			 double *sq_out)
{
	const struct balance_input *in = s->in;
	const double *lw = &s->layer_work[(size_t)l * (size_t)in->n_worker];
	double mx = 0, sq = 0;
	for (int w = 0; w < in->n_worker; w++) {
		double work = lw[w];
		if (w == from)
			work -= old_share;
		else if (from < 0)
			for (int r = 0; r < n; r++)
				if (h[r] == w)
					work += new_share - old_share;
		if (w == to)
			work += new_share;
		double t = work / in->workers[w].speed;
		mx = t > mx ? t : mx;
		sq += t * t;
	}
	*max_out = mx;
	*sq_out = sq;
}

struct balance_action {
	int layer, expert, from, to; /* from < 0: add a replica on `to` */
	double dmax, dsq;
	uint64_t cost;
};

/* 1 if a is a better action than b (b->layer < 0: none yet). */
static int balance_action_better(const struct balance_action *a, const struct balance_action *b,
				 double scale)
{
	if (b->layer < 0)
		return 1;
	double eps = BALANCE_EPS * scale;
	if (a->dmax > b->dmax + eps || a->dmax < b->dmax - eps)
		return a->dmax > b->dmax;
	if (a->dsq != b->dsq)
		return a->dsq > b->dsq;
	return a->cost < b->cost;
}

static int balance_plan_migrate(const struct balance_input *in, placement *out)
{
	const struct placement_model *m = in->model;
	struct balance_state s;
	placement target = {0};
	memset(out, 0, sizeof(*out));
	if (!in->current)
		return balance_plan_hetero(in, out);
	int result = balance_check_input(in);
	if (result)
		return result;
	result = balance_state_init(&s, in);
	if (result)
		return result;
	const placement *cur = in->current;
	int nw = in->n_worker;
	for (int l = 0; l < m->n_layer; l++) {
		for (int e = 0; e < m->n_expert; e++) {
			int n = placement_n_holders(cur, l, e);
			if (n > in->max_replicas) {
				log_error("balance: layer %d expert %d has %d holders, over the "
					  "maximum of %d replicas",
					  l, e, n, in->max_replicas);
				result = ERR_CONFIG;
				goto out;
			}
			for (int r = 0; r < n; r++)
				s.p.holder[balance_cell(&s.p, l, e) + (size_t)r] =
				    placement_holder(cur, l, e, r);
		}
	}
	balance_state_refresh(&s);
	long long budget = balance_layer_budget(in);

	uint64_t spent = 0;
	long long max_iter =
	    4LL * (long long)m->n_layer * (long long)m->n_expert * (long long)in->max_replicas + 16;
	for (long long iter = 0; iter < max_iter; iter++) {
		struct balance_action best = {.layer = -1};
		double best_scale = 0;
		for (int l = 0; l < m->n_layer; l++) {
			if (!m->layer_moe[l])
				continue;
			const double *lw = &s.layer_work[(size_t)l * (size_t)nw];
			double mx = 0, sq = 0;
			for (int w = 0; w < nw; w++) {
				double t = lw[w] / in->workers[w].speed;
				mx = t > mx ? t : mx;
				sq += t * t;
			}
			if (mx <= 0)
				continue;
			uint64_t b = m->expert_bytes[l];
			for (int e = 0; e < m->n_expert; e++) {
				int32_t *h = &s.p.holder[balance_cell(&s.p, l, e)];
				int n = placement_n_holders(&s.p, l, e);
				double work = balance_work(m, NULL, l, e);
				if (work <= 0)
					continue;
				/* only experts on a slowest worker can lower the max */
				int on_max = -1;
				for (int r = 0; r < n; r++)
					if (lw[h[r]] / in->workers[h[r]].speed >=
					    mx * (1 - BALANCE_EPS))
						on_max = h[r];
				if (on_max < 0)
					continue;
				for (int to = 0; to < nw; to++) {
					if (!balance_room(&s, to, l, e))
						continue;
					uint64_t cost = placement_holds(cur, to, l, e) ? 0 : b;
					/* move on_max -> to: frees on_max's bytes (refund if
					 * that replica was itself new) */
					uint64_t refund =
					    placement_holds(cur, on_max, l, e) ? 0 : b;
					for (int kind = 0; kind < 2; kind++) {
						struct balance_action a = {
						    .layer = l, .expert = e, .to = to};
						double nmx, nsq;
						if (kind == 0) {
							if (spent - refund + cost >
							    in->max_move_bytes)
								continue;
							a.from = on_max;
							a.cost = cost;
							balance_eval(&s, l, h, n, work / n,
								     work / n, on_max, to, &nmx,
								     &nsq);
						} else {
							if (n >= in->max_replicas ||
							    s.layer_total[l] >= budget ||
							    spent + cost > in->max_move_bytes)
								continue;
							a.from = -1;
							a.cost = cost;
							balance_eval(&s, l, h, n, work / n,
								     work / (n + 1), -1, to, &nmx,
								     &nsq);
						}
						a.dmax = mx - nmx;
						a.dsq = sq - nsq;
						if (a.dmax < -BALANCE_EPS * mx ||
						    (a.dmax <= BALANCE_EPS * mx &&
						     a.dsq <= BALANCE_EPS * sq))
							continue;
						if (balance_action_better(&a, &best, best_scale)) {
							best = a;
							best_scale = mx;
						}
					}
				}
			}
		}
		if (best.layer < 0)
			break;
		int l = best.layer, e = best.expert;
		int32_t *h = &s.p.holder[balance_cell(&s.p, l, e)];
		int n = placement_n_holders(&s.p, l, e);
		if (best.from >= 0) {
			if (!placement_holds(cur, best.from, l, e))
				spent -= m->expert_bytes[l];
			for (int r = 0; r < n; r++)
				if (h[r] == best.from)
					h[r] = best.to;
		} else {
			h[n] = best.to;
		}
		spent += best.cost;
		balance_state_refresh(&s);
	}

	/* the unconstrained hetero plan, if it is better and affordable */
	/* (skipped when its replicas clearly exceed the total memory; a packing
	 * failure (ERR_CONFIG) just means there is no such candidate) */
	uint64_t need = 0, have = 0;
	for (int l = 0; l < m->n_layer; l++) {
		long long n = 0;
		for (int e = 0; m->layer_moe[l] && e < m->n_expert; e++) {
			int k = placement_n_holders(&s.p, l, e);
			n += k > in->min_replicas ? k : in->min_replicas;
		}
		n = budget > n ? budget : n;
		uint64_t add = m->layer_moe[l] ? (uint64_t)n * m->expert_bytes[l] : 0;
		need = add > UINT64_MAX - need ? UINT64_MAX : need + add;
	}
	for (int w = 0; w < nw; w++)
		have = in->workers[w].mem_bytes > UINT64_MAX - have
			   ? UINT64_MAX
			   : have + in->workers[w].mem_bytes;
	if (need <= have) {
		result = balance_plan_hetero(in, &target);
		if (result == ERR_CONFIG)
			result = 0;
		if (result)
			goto out;
	}
	struct balance_stats st_cur, st_mig, st_tgt = {0};
	if ((result = balance_predict(cur, m, in->workers, NULL, &st_cur)) ||
	    (result = balance_predict(&s.p, m, in->workers, NULL, &st_mig)) ||
	    (target.holder && (result = balance_predict(&target, m, in->workers, NULL, &st_tgt))))
		goto out;
	if (target.holder && st_tgt.step_time < st_mig.step_time &&
	    balance_moved_bytes(cur, &target, m) <= in->max_move_bytes) {
		placement_free(&s.p);
		s.p = target;
		memset(&target, 0, sizeof(target));
		st_mig = st_tgt;
	}
	if (!(st_mig.step_time < st_cur.step_time * (1 - in->threshold))) {
		/* not worth it: keep the current holders */
		for (int l = 0; l < m->n_layer; l++) {
			for (int e = 0; e < m->n_expert; e++) {
				int32_t *h = &s.p.holder[balance_cell(&s.p, l, e)];
				int n = placement_n_holders(cur, l, e);
				for (int r = 0; r < s.p.n_replica; r++)
					h[r] = r < n ? placement_holder(cur, l, e, r) : -1;
			}
		}
		balance_state_refresh(&s);
	}
	*out = s.p;
	memset(&s.p, 0, sizeof(s.p));
out:
	placement_free(&target);
	balance_state_free(&s);
	return result;
}

/* ---- lookup and replica choice ------------------------------------------- */

static const struct balance_policy balance_policies[] = {
    {"eplb", balance_plan_eplb},
    {"hetero", balance_plan_hetero},
    {"migrate", balance_plan_migrate},
};

const struct balance_policy *balance_policy_find(const char *name)
{
	for (size_t i = 0; name && i < sizeof(balance_policies) / sizeof(balance_policies[0]); i++)
		if (strcmp(balance_policies[i].name, name) == 0)
			return &balance_policies[i];
	return NULL;
}

int balance_choose_replica(const placement *p, int layer, int expert, const double *worker_finish,
			   const uint8_t *row_visits)
{
	int n = placement_n_holders(p, layer, expert);
	if (n == 0)
		return -1;
	int best = placement_holder(p, layer, expert, 0);
	for (int r = 1; worker_finish && r < n; r++) {
		int w = placement_holder(p, layer, expert, r);
		if (worker_finish[w] < worker_finish[best])
			best = w;
	}
	if (!row_visits || row_visits[best])
		return best;
	double best_t = worker_finish ? worker_finish[best] : 0;
	double limit = best_t + BALANCE_VISIT_TOLERANCE * fabs(best_t) + 1e-12;
	int pick = -1;
	for (int r = 0; r < n; r++) {
		int w = placement_holder(p, layer, expert, r);
		double t = worker_finish ? worker_finish[w] : 0;
		if (row_visits[w] && t <= limit &&
		    (pick < 0 || t < (worker_finish ? worker_finish[pick] : 0)))
			pick = w;
	}
	return pick >= 0 ? pick : best;
}
