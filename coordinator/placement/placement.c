/* placement: greedy LPT placement of routed experts on workers (see placement.h). */
#include "placement.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"

#define PLACEMENT_MAX_DIM   65536      /* cap on n_layer, n_expert, n_worker */
#define PLACEMENT_MAX_CELLS (1u << 28) /* cap on n_layer * n_expert * n_replica */

struct placement_item {
	int layer;
	int expert;
	int in_file; /* some worker's held set has it */
	uint64_t bytes;
	double work;
};

static size_t placement_cell(const placement *p, int layer, int expert)
{
	return ((size_t)layer * (size_t)p->n_expert + (size_t)expert) * (size_t)p->n_replica;
}

static uint64_t placement_add_sat(uint64_t a, uint64_t b)
{
	return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

int placement_check_model(const struct placement_model *m)
{
	if (!m || !m->layer_moe || !m->expert_bytes) {
		log_error("placement: model table missing (layer_moe / expert_bytes)");
		return ERR_CONFIG;
	}
	if (m->n_layer < 1 || m->n_layer > PLACEMENT_MAX_DIM || m->n_expert < 1 ||
	    m->n_expert > PLACEMENT_MAX_DIM) {
		log_error("placement: invalid model size n_layer=%d n_expert=%d", m->n_layer,
			  m->n_expert);
		return ERR_CONFIG;
	}
	int n_moe = 0;
	for (int l = 0; l < m->n_layer; l++) {
		if (!m->layer_moe[l])
			continue;
		n_moe++;
		if (m->expert_bytes[l] == 0) {
			log_error("placement: layer %d has routed experts of 0 bytes", l);
			return ERR_CONFIG;
		}
		for (int e = 0; m->load && e < m->n_expert; e++) {
			double w = m->load[(size_t)l * (size_t)m->n_expert + (size_t)e];
			if (!isfinite(w) || w < 0) {
				log_error("placement: layer %d expert %d has invalid load %g", l, e,
					  w);
				return ERR_CONFIG;
			}
		}
	}
	if (n_moe == 0) {
		log_error("placement: model has no layer with routed experts");
		return ERR_CONFIG;
	}
	return 0;
}

static int placement_check_workers(const struct placement_worker *workers, int n_worker,
				   int n_replica)
{
	if (n_worker < 1 || n_worker > PLACEMENT_MAX_DIM) {
		log_error("placement: need 1..%d workers, got %d", PLACEMENT_MAX_DIM, n_worker);
		return ERR_CONFIG;
	}
	if (!workers) {
		log_error("placement: worker table missing");
		return ERR_CONFIG;
	}
	if (n_replica < 1 || n_replica > n_worker) {
		log_error("placement: replicas %d must be in 1..%d (the number of workers)",
			  n_replica, n_worker);
		return ERR_CONFIG;
	}
	for (int w = 0; w < n_worker; w++) {
		if (!isfinite(workers[w].speed) || workers[w].speed <= 0) {
			log_error("placement: worker %d has invalid speed %g", w, workers[w].speed);
			return ERR_CONFIG;
		}
	}
	return 0;
}

/* Experts in a worker's file first, then descending work, then descending
 * bytes, then ascending (layer, expert). */
static int placement_item_cmp(const void *a, const void *b)
{
	const struct placement_item *x = a, *y = b;
	if (x->in_file != y->in_file)
		return x->in_file ? -1 : 1;
	if (x->work != y->work)
		return x->work > y->work ? -1 : 1;
	if (x->bytes != y->bytes)
		return x->bytes > y->bytes ? -1 : 1;
	if (x->layer != y->layer)
		return x->layer < y->layer ? -1 : 1;
	return (x->expert > y->expert) - (x->expert < y->expert);
}

static int placement_alloc(placement *p, int n_layer, int n_expert, int n_replica, int n_worker)
{
	memset(p, 0, sizeof(*p));
	p->n_layer = n_layer;
	p->n_expert = n_expert;
	p->n_replica = n_replica;
	p->n_worker = n_worker;
	size_t cells = (size_t)n_layer * (size_t)n_expert * (size_t)n_replica;
	if (cells > PLACEMENT_MAX_CELLS) {
		log_error("placement: %d layers x %d experts x %d replicas is too large", n_layer,
			  n_expert, n_replica);
		memset(p, 0, sizeof(*p));
		return ERR_CONFIG;
	}
	p->holder = malloc(cells * sizeof(*p->holder));
	p->worker_bytes = calloc((size_t)n_worker, sizeof(*p->worker_bytes));
	p->worker_load = calloc((size_t)n_worker, sizeof(*p->worker_load));
	if (!p->holder || !p->worker_bytes || !p->worker_load) {
		log_error("placement: out of memory for %zu holder slots", cells);
		placement_free(p);
		return ERR_NOMEM;
	}
	for (size_t i = 0; i < cells; i++)
		p->holder[i] = -1;
	return 0;
}

/* 1 if worker w can load `it` from its own file. */
static int placement_has(const placement *p, const struct placement_worker *w,
			 const struct placement_item *it)
{
	return !w->held || w->held[(size_t)it->layer * (size_t)p->n_expert + (size_t)it->expert];
}

/* The best worker for one replica of `it` (among those holding it in their
 * file, when one of them has room), or -1 if none has room. */
static int placement_pick(const placement *p, const struct placement_worker *workers,
			  const int32_t *taken, int n_taken, const struct placement_item *it)
{
	int best = -1, best_has = 0;
	double best_time = 0, best_fill = 0;
	double share = it->work / (double)p->n_replica;
	for (int w = 0; w < p->n_worker; w++) {
		int dup = 0;
		for (int r = 0; r < n_taken; r++)
			dup |= taken[r] == w;
		if (dup || p->worker_bytes[w] > workers[w].mem_bytes ||
		    it->bytes > workers[w].mem_bytes - p->worker_bytes[w])
			continue;
		int has = placement_has(p, &workers[w], it);
		if (best >= 0 && has != best_has) {
			if (best_has)
				continue;
			best = -1; /* the first candidate holding it in its file */
		}
		double time = (p->worker_load[w] + share) / workers[w].speed;
		double fill =
		    (double)(p->worker_bytes[w] + it->bytes) / (double)workers[w].mem_bytes;
		if (best < 0 || time < best_time || (time == best_time && fill < best_fill)) {
			best = w;
			best_has = has;
			best_time = time;
			best_fill = fill;
		}
	}
	return best;
}

int placement_build(const struct placement_model *m, const struct placement_worker *workers,
		    int n_worker, int n_replica, placement *out)
{
	struct placement_item *items = NULL;
	int result;
	memset(out, 0, sizeof(*out));
	result = placement_check_model(m);
	if (result)
		goto out;
	result = placement_check_workers(workers, n_worker, n_replica);
	if (result)
		goto out;

	/* total demand vs. total memory, with overflow checks */
	uint64_t need = 0, have = 0;
	uint64_t copies = (uint64_t)m->n_expert * (uint64_t)n_replica;
	for (int l = 0; l < m->n_layer; l++) {
		if (!m->layer_moe[l])
			continue;
		uint64_t b = m->expert_bytes[l];
		need = b > (UINT64_MAX - need) / copies ? UINT64_MAX : need + b * copies;
	}
	for (int w = 0; w < n_worker; w++)
		have = placement_add_sat(have, workers[w].mem_bytes);
	if (need > have) {
		log_error("placement: experts need %llu bytes (x%d replicas) but the %d workers "
			  "have %llu",
			  (unsigned long long)need, n_replica, n_worker, (unsigned long long)have);
		result = ERR_CONFIG;
		goto out;
	}

	result = placement_alloc(out, m->n_layer, m->n_expert, n_replica, n_worker);
	if (result)
		goto out;
	size_t n_items = 0;
	items = malloc((size_t)m->n_layer * (size_t)m->n_expert * sizeof(*items));
	if (!items) {
		log_error("placement: out of memory for the expert list");
		result = ERR_NOMEM;
		goto out;
	}
	for (int l = 0; l < m->n_layer; l++) {
		for (int e = 0; m->layer_moe[l] && e < m->n_expert; e++) {
			double load =
			    m->load ? m->load[(size_t)l * (size_t)m->n_expert + (size_t)e] : 1.0;
			int in_file = 0;
			for (int w = 0; w < n_worker; w++)
				in_file |=
				    workers[w].held &&
				    workers[w].held[(size_t)l * (size_t)m->n_expert + (size_t)e];
			items[n_items++] = (struct placement_item){
			    .layer = l,
			    .expert = e,
			    .in_file = in_file,
			    .bytes = m->expert_bytes[l],
			    .work = load * (double)m->expert_bytes[l],
			};
		}
	}
	qsort(items, n_items, sizeof(*items), placement_item_cmp);

	for (size_t i = 0; i < n_items; i++) {
		const struct placement_item *it = &items[i];
		int32_t *h = &out->holder[placement_cell(out, it->layer, it->expert)];
		for (int r = 0; r < n_replica; r++) {
			int w = placement_pick(out, workers, h, r, it);
			if (w < 0) {
				log_error("placement: layer %d expert %d (%llu bytes) replica %d "
					  "fits on no remaining worker (memory too tight or "
					  "fragmented)",
					  it->layer, it->expert, (unsigned long long)it->bytes, r);
				result = ERR_CONFIG;
				goto out;
			}
			h[r] = w;
			out->worker_bytes[w] += it->bytes;
			out->worker_load[w] += it->work / (double)n_replica;
		}
	}
out:
	free(items);
	if (result)
		placement_free(out);
	return result;
}

void placement_free(placement *p)
{
	if (!p)
		return;
	free(p->holder);
	free(p->worker_bytes);
	free(p->worker_load);
	memset(p, 0, sizeof(*p));
}

int placement_copy(const placement *src, placement *out)
{
	if (!src->holder || !src->worker_bytes || !src->worker_load) {
		memset(out, 0, sizeof(*out));
		return 0;
	}
	int result =
	    placement_alloc(out, src->n_layer, src->n_expert, src->n_replica, src->n_worker);
	if (result)
		return result;
	size_t cells = (size_t)src->n_layer * (size_t)src->n_expert * (size_t)src->n_replica;
	memcpy(out->holder, src->holder, cells * sizeof(*out->holder));
	memcpy(out->worker_bytes, src->worker_bytes,
	       (size_t)src->n_worker * sizeof(*out->worker_bytes));
	memcpy(out->worker_load, src->worker_load,
	       (size_t)src->n_worker * sizeof(*out->worker_load));
	return 0;
}

int placement_holder(const placement *p, int layer, int expert, int replica)
{
	if (!p->holder || layer < 0 || layer >= p->n_layer || expert < 0 || expert >= p->n_expert ||
	    replica < 0 || replica >= p->n_replica)
		return -1;
	int32_t w = p->holder[placement_cell(p, layer, expert) + (size_t)replica];
	return w >= 0 && w < p->n_worker ? (int)w : -1;
}

int placement_n_holders(const placement *p, int layer, int expert)
{
	int n = 0;
	while (n < p->n_replica && placement_holder(p, layer, expert, n) >= 0)
		n++;
	return n;
}

int placement_holds(const placement *p, int worker, int layer, int expert)
{
	int n = placement_n_holders(p, layer, expert);
	for (int r = 0; r < n; r++)
		if (placement_holder(p, layer, expert, r) == worker)
			return 1;
	return 0;
}

int placement_choose(const placement *p, int layer, int expert, const double *worker_busy)
{
	int n = placement_n_holders(p, layer, expert);
	int best = n > 0 ? placement_holder(p, layer, expert, 0) : -1;
	for (int r = 1; worker_busy && r < n; r++) {
		int w = placement_holder(p, layer, expert, r);
		if (worker_busy[w] < worker_busy[best])
			best = w;
	}
	return best;
}

int placement_validate(const placement *p, const struct placement_model *m,
		       const struct placement_worker *workers, int n_worker)
{
	uint64_t *bytes = NULL;
	int result = placement_check_model(m);
	if (result)
		goto out;
	result = ERR_CONFIG;
	if (p->n_layer != m->n_layer || p->n_expert != m->n_expert || p->n_worker != n_worker ||
	    !p->holder) {
		log_error("placement: shape %d layers x %d experts on %d workers does not match "
			  "the model (%d x %d) and %d workers",
			  p->n_layer, p->n_expert, p->n_worker, m->n_layer, m->n_expert, n_worker);
		goto out;
	}
	result = placement_check_workers(workers, n_worker, p->n_replica);
	if (result)
		goto out;
	result = ERR_CONFIG;
	if ((size_t)p->n_layer * (size_t)p->n_expert * (size_t)p->n_replica > PLACEMENT_MAX_CELLS) {
		log_error("placement: %d replicas is too many", p->n_replica);
		goto out;
	}
	bytes = calloc((size_t)n_worker, sizeof(*bytes));
	if (!bytes) {
		log_error("placement: out of memory validating %d workers", n_worker);
		result = ERR_NOMEM;
		goto out;
	}
	for (int l = 0; l < p->n_layer; l++) {
		for (int e = 0; e < p->n_expert; e++) {
			const int32_t *h = &p->holder[placement_cell(p, l, e)];
			int n = 0;
			for (int r = 0; r < p->n_replica; r++) {
				if (h[r] == -1)
					continue;
				if (h[r] < 0 || h[r] >= n_worker || r != n) {
					log_error("placement: layer %d expert %d holder slot %d "
						  "is %d (out of range or not packed)",
						  l, e, r, (int)h[r]);
					goto out;
				}
				for (int q = 0; q < r; q++) {
					if (h[q] == h[r]) {
						log_error("placement: layer %d expert %d lists "
							  "worker %d twice",
							  l, e, (int)h[r]);
						goto out;
					}
				}
				if (!m->layer_moe[l]) {
					log_error("placement: layer %d has no routed experts but "
						  "expert %d has holders",
						  l, e);
					goto out;
				}
				bytes[h[r]] = placement_add_sat(bytes[h[r]], m->expert_bytes[l]);
				n++;
			}
			if (m->layer_moe[l] && n == 0) {
				log_error("placement: layer %d expert %d is held by no worker", l,
					  e);
				goto out;
			}
		}
	}
	for (int w = 0; w < n_worker; w++) {
		if (p->worker_bytes && p->worker_bytes[w] != bytes[w]) {
			log_error("placement: worker %d claims %llu bytes but its experts take "
				  "%llu",
				  w, (unsigned long long)p->worker_bytes[w],
				  (unsigned long long)bytes[w]);
			goto out;
		}
		if (bytes[w] > workers[w].mem_bytes) {
			log_error("placement: worker %d holds %llu bytes of experts, over its "
				  "budget of %llu",
				  w, (unsigned long long)bytes[w],
				  (unsigned long long)workers[w].mem_bytes);
			goto out;
		}
	}
	result = 0;
out:
	free(bytes);
	return result;
}
