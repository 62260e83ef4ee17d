/* cluster re-placement epochs: planning the next placement, sending its
 * Assigns, streaming the experts a worker lacks between forward steps within
 * an adapted byte budget, timing the steps, and switching epochs once every
 * live worker is Ready. */
#include "cluster_internal.h"
#include "../placement/balance.h"
#include "../../common/err.h"
#include "../../common/log.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void cluster_on_ready(cluster *c, int who, const struct wire_ready *r)
{
	c->w[who].st.held_experts = r->n_experts;
	c->w[who].st.held_bytes = r->bytes;
	if (r->released)
		c->w[who].releasing = 0;
	if (!r->released && c->next_active && r->placement_epoch == c->next_epoch)
		c->w[who].next_ok = 1;
}

/* Every live worker has loaded the placement being prepared. */
int cluster_next_ready(const cluster *c)
{
	if (!c->next_active)
		return 0;
	for (int i = 0; i < c->n; i++)
		if (!c->w[i].lost && !c->w[i].next_ok)
			return 0;
	return 1;
}

/* Sends the next `budget` bytes of the experts queued for live streaming to
 * worker i. */
static void cluster_pump_one(cluster *c, int i, size_t budget)
{
	struct cluster_peer *w = &c->w[i];
	const int n_t = c->spec.has_bias ? 6 : 3;
	while (w->sq_at < w->sq_n && budget > 0 && !w->lost) {
		int l = (int)w->sq_layer[w->sq_at], e = (int)w->sq_expert[w->sq_at];
		uint32_t type;
		uint64_t total;
		const uint8_t *src = cluster_tensor_bytes(c, l, e, w->sq_tensor, &type, &total);
		if (!src) {
			cluster_drop(c, i, "cannot read an expert to stream");
			return;
		}
		uint64_t len = total - w->sq_off;
		if (len > budget)
			len = budget;
		struct wire_msg ch = {.kind = WIRE_WEIGHT_CHUNK};
		ch.u.chunk = (struct wire_weight_chunk){
		    (uint32_t)l, (uint32_t)e, (uint32_t)w->sq_tensor, type, w->sq_off, total};
		if (cluster_send(c, i, &ch, src + w->sq_off, (size_t)len)) {
			cluster_drop(c, i, "cannot send weights");
			return;
		}
		w->st.streamed_bytes += len;
		c->step_streamed += len;
		budget -= (size_t)len;
		w->sq_off += len;
		if (w->sq_off >= total) {
			w->sq_off = 0;
			if (++w->sq_tensor == n_t) {
				w->sq_tensor = 0;
				w->sq_at++;
			}
		}
	}
}

/* Sends the live-streaming budget of one step (c->live_budget bytes in all),
 * shared evenly by the workers that still lack experts, so streaming
 * interleaves with forward steps. */
void cluster_pump(cluster *c)
{
	int n = 0;
	for (int i = 0; i < c->n; i++)
		n += !c->w[i].lost && c->w[i].sq_at < c->w[i].sq_n;
	if (!n)
		return;
	size_t b = c->live_budget ? c->live_budget : CLUSTER_LIVE_START;
	size_t budget = (b > c->live_floor ? b : c->live_floor) / (size_t)n;
	for (int i = 0; i < c->n; i++)
		if (!c->w[i].lost && c->w[i].sq_at < c->w[i].sq_n)
			cluster_pump_one(c, i, budget > 4096 ? budget : 4096);
}

/* The experts worker i holds in a but not in b, as (layer, expert) pairs in
 * pl/pe (room for n_layer x n_expert); returns their count. */
static uint32_t cluster_diff(const cluster *c, const placement *a, const placement *b, int i,
			     uint32_t *pl, uint32_t *pe)
{
	uint32_t n = 0;
	for (int l = 0; l < c->spec.n_layer; l++)
		for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
			if (placement_holds(a, i, l, e) && !placement_holds(b, i, l, e)) {
				pl[n] = (uint32_t)l;
				pe[n] = (uint32_t)e;
				n++;
			}
	return n;
}

/* Plans the next placement and sends it; the switch waits for Ready. */
static void cluster_plan_next(cluster *c)
{
	int measured = 1;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].lost)
			return; /* re-planning needs every worker alive */
		if (cluster_holds_experts(c, i) &&
		    (c->w[i].st.items < 256 || !(c->w[i].st.compute_seconds > 0)))
			measured = 0;
	}
	/* speeds measured on this model replace the calibration of Hello, once
	 * every worker that holds experts has some (the two are in different
	 * units; a KV-only worker keeps its calibration, and holds nothing) */
	for (int i = 0; measured && i < c->n; i++) {
		if (!cluster_holds_experts(c, i))
			continue;
		c->pw[i].speed = (double)c->w[i].st.items / c->w[i].st.compute_seconds;
		c->speed[i] = c->pw[i].speed;
		c->w[i].st.speed = c->pw[i].speed;
	}
	struct placement_model pm = {c->spec.n_layer, c->spec.n_expert, c->spec.layer_moe,
				     c->expert_bytes, balance_counts_load(c->counts)};
	struct balance_input in = {
	    .model = &pm,
	    .workers = c->pw,
	    .n_worker = c->n,
	    .current = &c->plan,
	    .min_replicas = 1,
	    .max_replicas = c->plan.n_replica,
	    .threshold = c->cfg.rebalance_threshold,
	    .max_move_bytes = c->cfg.max_move_bytes ? c->cfg.max_move_bytes : 64ull << 20,
	};
	placement next;
	double t_plan = cluster_now();
	if (c->policy->plan(&in, &next))
		return;
	t_plan = cluster_now() - t_plan;
	uint64_t moved = balance_moved_bytes(&c->plan, &next, &pm);
	if (moved == 0) {
		placement_free(&next);
		return;
	}
	if (cluster_send_next(c, &next))
		return;
	c->moved_bytes += moved;
	log_info("re-placement planned (policy %s) in %.1f ms: %.1f MiB to load", c->policy->name,
		 t_plan * 1e3, (double)moved / 1048576.0);
}

/* Sends every live worker the Assign of a new epoch for *next (all the
 * experts it will hold) and queues the weights of the experts it lacks for
 * streaming; c->next takes *next over (superseding a placement still being
 * loaded: a worker keeps what it completed of that one until the Release).
 * Returns 0, or an error with *next freed. */
int cluster_send_next(cluster *c, placement *next)
{
	uint32_t cap = (uint32_t)(c->spec.n_layer * c->spec.n_expert) + 1;
	uint32_t *pl = malloc(cap * sizeof(uint32_t)), *pe = malloc(cap * sizeof(uint32_t));
	int rc = pl && pe ? 0 : ERR_NOMEM;
	uint64_t epoch = c->epoch_seq + 1, queued = 0;
	for (int i = 0; i < c->n && !rc; i++) {
		struct cluster_peer *w = &c->w[i];
		w->next_ok = 0;
		w->sq_n = w->sq_at = 0;
		w->sq_tensor = 0;
		w->sq_off = 0;
		if (w->lost)
			continue;
		struct wire_msg m = {.kind = WIRE_ASSIGN};
		struct wire_assign *a = &m.u.assign;
		a->worker_id = (uint32_t)i;
		a->spec = c->spec;
		a->placement_epoch = epoch;
		a->stream = c->cfg.stream || !w->hello.has_model;
		/* queue the experts it lacks and does not have in its own file;
		 * they follow as chunks between steps (a rejoined worker lacks
		 * everything) */
		free(w->sq_layer);
		free(w->sq_expert);
		w->sq_layer = malloc(cap * sizeof(uint32_t));
		w->sq_expert = malloc(cap * sizeof(uint32_t));
		if (!w->sq_layer || !w->sq_expert) {
			rc = ERR_NOMEM;
			break;
		}
		placement none = {0};
		uint32_t n_new = cluster_diff(c, next, w->fresh ? &none : &c->plan, i, w->sq_layer,
					      w->sq_expert);
		for (uint32_t q = 0; q < n_new; q++) {
			if (!cluster_streams(c, i, (int)w->sq_layer[q], (int)w->sq_expert[q]))
				continue;
			w->sq_layer[w->sq_n] = w->sq_layer[q];
			w->sq_expert[w->sq_n++] = w->sq_expert[q];
			queued += c->expert_bytes[w->sq_layer[q]];
		}
		a->pair_layer = pl;
		a->pair_expert = pe;
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				if (placement_holds(next, i, l, e)) {
					pl[a->n_pairs] = (uint32_t)l;
					pe[a->n_pairs] = (uint32_t)e;
					a->n_pairs++;
				}
		if (cluster_send(c, i, &m, NULL, 0))
			cluster_drop(c, i, "cannot send");
	}
	free(pl);
	free(pe);
	if (rc) {
		placement_free(next);
		return rc;
	}
	placement_free(&c->next);
	c->next = *next;
	memset(next, 0, sizeof(*next));
	c->next_active = 1;
	c->epoch_seq = epoch;
	c->next_epoch = epoch;
	c->n_load = 0;
	c->live_floor = (size_t)(queued / CLUSTER_LIVE_STEPS);
	if (c->live_floor < CLUSTER_LIVE_MIN)
		c->live_floor = CLUSTER_LIVE_MIN;
	return 0;
}

/* The live-streaming budget (bytes per step) from the cost the
 * streaming is measured to have.  On one machine the workers' receiving
 * competes with the coordinator for the cores; on a real network it uses the
 * link and the workers' idle time; either way the step time says what it
 * costs.  `ms` is a step that streamed: compared with the median of the
 * recent quiet steps of the same size (tokens), CLUSTER_LIVE_SAMPLES such
 * steps give a median excess; the budget is scaled by the allowed excess
 * (CLUSTER_LIVE_SLACK of the quiet median) over the measured one -- the cost
 * of streaming grows with the bytes -- within 1/4 .. 2x per change; a single
 * step above CLUSTER_LIVE_GUARD x the quiet median halves it at once.  It
 * never falls below what loads the whole re-placement in CLUSTER_LIVE_STEPS
 * steps (c->live_floor): on a noisy machine a re-placement must still end. */
static void cluster_adapt_budget(cluster *c, double ms)
{
	double r[15];
	int n = 0;
	for (int i = 0; i < (c->n_recent < 15 ? c->n_recent : 15); i++)
		if (c->recent_tokens[i] == c->step_rows)
			r[n++] = c->recent_ms[i];
	if (n < 3)
		return; /* no quiet steps of this size to compare with */
	qsort(r, (size_t)n, sizeof(double), cluster_cmp_double);
	double base = r[n / 2];
	size_t b = c->live_budget ? c->live_budget : CLUSTER_LIVE_START;
	if (ms > CLUSTER_LIVE_GUARD * base) {
		b /= 2;
		c->n_load = 0;
	} else {
		c->load_ms[c->n_load++] = ms / base;
		if (c->n_load < CLUSTER_LIVE_SAMPLES)
			return;
		qsort(c->load_ms, CLUSTER_LIVE_SAMPLES, sizeof(double), cluster_cmp_double);
		double excess = 0.5 * (c->load_ms[CLUSTER_LIVE_SAMPLES / 2 - 1] +
				       c->load_ms[CLUSTER_LIVE_SAMPLES / 2]) -
				1.0;
		double f = excess <= CLUSTER_LIVE_SLACK / 2 ? 2.0 : CLUSTER_LIVE_SLACK / excess;
		b = (size_t)((double)b * fmin(2.0, fmax(0.25, f)));
		c->n_load = 0;
	}
	size_t lo = c->live_floor > CLUSTER_LIVE_MIN ? c->live_floor : CLUSTER_LIVE_MIN;
	c->live_budget = b < lo ? lo : b > CLUSTER_LIVE_MAX ? CLUSTER_LIVE_MAX : b;
}

/* Wall time of the forward step that just ended (first MoE layer to first
 * MoE layer). */
static void cluster_time_step(cluster *c)
{
	double now = cluster_now();
	if (c->step_t0 > 0) {
		if (c->n_steps == c->steps_cap) {
			size_t cap = c->steps_cap ? 2 * c->steps_cap : 256;
			double *t = realloc(c->step_ms, cap * sizeof(double));
			if (t)
				c->step_ms = t;
			uint8_t *mv = realloc(c->step_moving, cap);
			if (mv)
				c->step_moving = mv;
			uint64_t *ep = realloc(c->step_epoch, cap * sizeof(uint64_t));
			if (ep)
				c->step_epoch = ep;
			double *ex = realloc(c->step_expert_ms, cap * sizeof(double));
			if (ex)
				c->step_expert_ms = ex;
			int32_t *tk = realloc(c->step_tokens, cap * sizeof(int32_t));
			if (tk)
				c->step_tokens = tk;
			if (t && mv && ep && ex && tk)
				c->steps_cap = cap;
		}
		double ms = (now - c->step_t0) * 1e3;
		if (!c->next_active) {
			c->recent_ms[c->n_recent % 15] = ms;
			c->recent_tokens[c->n_recent % 15] = c->step_rows;
			c->n_recent++;
		} else if (c->step_streamed > 0) {
			cluster_adapt_budget(c, ms);
		}
		if (c->n_steps < c->steps_cap) {
			c->step_expert_ms[c->n_steps] = c->step_expert * 1e3;
			c->step_tokens[c->n_steps] = c->step_rows;
			c->step_ms[c->n_steps] = (now - c->step_t0) * 1e3;
			c->step_moving[c->n_steps] = (uint8_t)c->next_active;
			c->step_epoch[c->n_steps] = c->epoch;
			c->n_steps++;
		}
	}
	c->step_t0 = now;
	c->step_expert = 0;
	c->step_streamed = 0;
}

/* The compute balance of the epoch in force so far. */
void cluster_epoch_now(const cluster *c, struct cluster_epoch_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->epoch = c->epoch;
	out->steps = c->fwd_step - c->epoch_step0;
	int live = 0;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].lost || !cluster_holds_experts(c, i))
			continue;
		double t = c->w[i].st.compute_seconds - c->w[i].epoch_compute0;
		out->compute_max = fmax(out->compute_max, t);
		out->compute_mean += t;
		live++;
	}
	if (live)
		out->compute_mean /= live;
	if (out->steps) {
		out->compute_max /= (double)out->steps;
		out->compute_mean /= (double)out->steps;
	}
	out->imbalance = out->compute_mean > 0 ? out->compute_max / out->compute_mean : 1.0;
}

/* Every live worker loaded the next placement: put it in force, tell each
 * worker which experts it does not need (all it may hold outside the new
 * placement: those of the old one and of superseded ones), and close the
 * statistics of the epoch.  Also between the batches of one step (a lost
 * expert reloaded): batches already sent keep their own ids, and a worker
 * computes a Batch before a Release that follows it. */
void cluster_switch(cluster *c)
{
	struct cluster_epoch_stats *ep = realloc(c->epochs, (c->n_epochs + 1) * sizeof(*c->epochs));
	if (ep) {
		c->epochs = ep;
		cluster_epoch_now(c, &c->epochs[c->n_epochs++]);
	}
	uint32_t cap = (uint32_t)(c->spec.n_layer * c->spec.n_expert) + 1;
	uint32_t *pl = malloc(cap * sizeof(uint32_t)), *pe = malloc(cap * sizeof(uint32_t));
	placement all = {0};
	if (pl && pe && placement_copy(&c->next, &all) == 0) {
		/* "all" holds everything: the complement of a worker's new set */
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				for (int r = 0; r < all.n_replica; r++)
					all.holder[((size_t)l * all.n_expert + e) * all.n_replica +
						   r] = -1;
	}
	for (int i = 0; i < c->n; i++) {
		struct cluster_peer *w = &c->w[i];
		w->epoch_compute0 = w->st.compute_seconds;
		if (w->lost)
			continue;
		w->serving = 1;
		w->fresh = 0;
		w->next_ok = 0;
		if (!pl || !pe || !all.holder)
			continue;
		struct wire_msg m = {.kind = WIRE_RELEASE};
		m.u.release = (struct wire_release){c->next_epoch, 0, pl, pe};
		uint32_t n = 0;
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				if (!placement_holds(&c->next, i, l, e)) {
					pl[n] = (uint32_t)l;
					pe[n] = (uint32_t)e;
					n++;
				}
		m.u.release.n_pairs = n;
		if (!n)
			continue;
		if (cluster_send(c, i, &m, NULL, 0))
			cluster_drop(c, i, "cannot send");
		else
			w->releasing = 1;
	}
	placement_free(&all);
	free(pl);
	free(pe);
	placement_free(&c->plan);
	c->plan = c->next;
	memset(&c->next, 0, sizeof(c->next));
	c->next_active = 0;
	c->epoch = c->next_epoch;
	c->rebalances++;
	c->epoch_step0 = c->fwd_step;
	if (c->repair_t0 > 0) {
		log_info("placement epoch %llu in force: replicas re-created in %.0f ms",
			 (unsigned long long)c->epoch, (cluster_now() - c->repair_t0) * 1e3);
		c->repair_t0 = 0;
	} else {
		log_info("placement epoch %llu in force", (unsigned long long)c->epoch);
	}
}

/* At the first MoE layer of each forward step: switch to a placement every
 * live worker has loaded, re-create the replicas of a lost worker, give a
 * joined worker its share, or plan the next re-placement when it is due. */
void cluster_between_steps(cluster *c, int layer)
{
	int new_step = layer <= c->last_layer;
	c->last_layer = layer;
	if (!new_step)
		return;
	cluster_time_step(c);
	c->fwd_step++;
	if (c->repair_due || (c->rebuild_due && !c->next_active)) {
		cluster_plan_repair(c, c->rebuild_due);
		return;
	}
	if (c->next_active) {
		if (cluster_next_ready(c))
			cluster_switch(c);
		return;
	}
	if (!c->policy)
		return;
	int every = c->cfg.rebalance_every > 0 ? c->cfg.rebalance_every : 16;
	if (c->fwd_step - c->last_plan_step >= (uint64_t)every) {
		c->last_plan_step = c->fwd_step;
		cluster_plan_next(c);
	}
}
