/* cluster dispatch and collect: one layer's expert job split over the serving
 * holders of its experts as Batches, the answers gathered (items of a lost
 * worker sent again to other holders), and the cluster as an expert_backend. */
#include "cluster_internal.h"
#include "../placement/balance.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

static uint32_t cluster_wire_type(const cluster *c, int layer)
{
	uint32_t act = kern_act_type(c->layer_types[layer][0]);
	uint32_t want = c->cfg.wire_dtype;
	/* gate and up multiplying different activation types take F32 rows, so
	 * each conversion starts from the values the in-process path converts */
	if (kern_act_type(c->layer_types[layer][1]) != act)
		return KERN_F32;
	if (!want)
		want = act == KERN_Q8_0 || act == KERN_Q8_1 || act == KERN_Q8_K || act == KERN_BF16
			   ? act
			   : KERN_F32;
	/* rows are only sent pre-converted when that is the experts' own type */
	return want == act || want == KERN_F32 ? want : KERN_F32;
}

/* The serving holder that should compute one (row, expert): the least
 * predicted finish time in this job, preferring workers the row already
 * visits (balance_choose_replica); lost workers and workers still loading
 * their first experts never finish.  -1 if no serving worker holds it. */
static int cluster_holder(cluster *c, int layer, int expert)
{
	for (int i = 0; i < c->n; i++)
		if (c->w[i].lost || !c->w[i].serving)
			c->finish[i] = INFINITY;
	int h = balance_choose_replica(&c->plan, layer, expert, c->finish, c->visits);
	if (h < 0 || c->w[h].lost || !c->w[h].serving)
		return -1;
	c->visits[h] = 1;
	c->finish[h] += 1.0 / c->speed[h];
	return h;
}

/* Room for `more` further batches (pointers into c->batches stay valid until
 * the next call). */
int cluster_grow(cluster *c, size_t more)
{
	if (!c->disp) {
		c->disp = malloc((size_t)c->n * sizeof(int));
		if (!c->disp)
			return ERR_NOMEM;
	}
	size_t need = (size_t)c->n_batches + more;
	if (need <= (size_t)c->cap_batches)
		return 0;
	size_t cap = need > 2 * (size_t)c->cap_batches ? need : 2 * (size_t)c->cap_batches;
	struct cluster_batch *b = realloc(c->batches, cap * sizeof(*b));
	if (!b)
		return ERR_NOMEM;
	memset(b + c->cap_batches, 0, (cap - (size_t)c->cap_batches) * sizeof(*b));
	c->batches = b;
	c->cap_batches = (int)cap;
	return 0;
}

/* A new batch of the job for worker (-1: items waiting for a holder) with
 * room for rows x k items and act bytes of activations; its index, or -1. */
static int cluster_batch_add(cluster *c, int worker, size_t rows, size_t k, size_t act)
{
	if (cluster_grow(c, 1))
		return -1;
	struct cluster_batch *b = &c->batches[c->n_batches];
	if (rows > b->rows_cap || k > b->k_cap) {
		size_t kk = k > b->k_cap ? k : b->k_cap,
		       rr = rows > b->rows_cap ? rows : b->rows_cap;
		free(b->rows);
		free(b->ids);
		free(b->wts);
		b->rows = malloc(rr * sizeof(int32_t));
		b->ids = malloc(rr * kk * sizeof(int32_t));
		b->wts = malloc(rr * kk * sizeof(float));
		b->rows_cap = b->rows && b->ids && b->wts ? rr : 0;
		b->k_cap = b->rows_cap ? kk : 0;
		if (!b->rows_cap)
			return -1;
	}
	if (act > b->act_cap) {
		free(b->act);
		b->act = malloc(act);
		b->act_cap = b->act ? act : 0;
		if (!b->act)
			return -1;
	}
	b->worker = worker;
	b->state = worker < 0 ? CLUSTER_BATCH_FAILED : CLUSTER_BATCH_PENDING;
	b->n_rows = 0;
	b->items = 0;
	b->step = 0;
	return c->n_batches++;
}

/* Splits items of the job over the serving holders of their experts and
 * sends one Batch per worker.  from < 0: every item of the job; otherwise the
 * items of batch `from` (whose worker was lost).  Items whose expert has no
 * serving holder go to one waiting batch (worker -1).  A worker that cannot
 * be sent to is lost (its new batch fails and is dispatched again by the
 * caller).  Returns 0, or ERR_NOMEM. */
static int cluster_dispatch(cluster *c, const struct expert_job *job, int from)
{
	const int k = job->k, E = job->n_embd;
	const uint32_t wt = cluster_wire_type(c, job->layer);
	const size_t row_bytes = kern_row_bytes(wt, E);
	if (cluster_grow(c, (size_t)c->n + 1))
		return ERR_NOMEM;
	const int n_src = from < 0 ? job->n_rows : c->batches[from].n_rows;
	int orphans = -1;
	for (int i = 0; i < c->n; i++) {
		c->disp[i] = -1;
		c->finish[i] = 0.0;
	}
	for (int j = 0; j < n_src; j++) {
		int r = from < 0 ? j : c->batches[from].rows[j];
		memset(c->visits, 0, (size_t)c->n);
		for (int s = 0; s < k; s++) {
			int32_t e = from < 0 ? job->ids[(size_t)r * k + s]
					     : c->batches[from].ids[(size_t)j * k + s];
			if (e < 0)
				continue; /* empty slot, or not in the failed batch */
			int h = cluster_holder(c, job->layer, e);
			int bi = h >= 0 ? c->disp[h] : orphans;
			if (bi < 0) {
				bi =
				    cluster_batch_add(c, h, (size_t)job->n_rows, (size_t)k,
						      h >= 0 ? (size_t)job->n_rows * row_bytes : 0);
				if (bi < 0)
					return ERR_NOMEM;
				if (h >= 0)
					c->disp[h] = bi;
				else
					orphans = bi;
			}
			struct cluster_batch *b = &c->batches[bi];
			if (b->n_rows == 0 || b->rows[b->n_rows - 1] != r) {
				int at = b->n_rows++;
				b->rows[at] = r;
				for (int q = 0; q < k; q++) {
					b->ids[(size_t)at * k + q] = -1;
					b->wts[(size_t)at * k + q] = 0.0f;
				}
				if (h >= 0)
					kern_convert_row(wt, job->x + (size_t)r * E,
							 b->act + (size_t)at * row_bytes, E);
			}
			size_t at = (size_t)(b->n_rows - 1) * k + (size_t)s;
			b->ids[at] = e;
			b->wts[at] = job->weights[(size_t)r * k + s];
			b->items++;
		}
	}
	double now = cluster_now();
	for (int i = 0; i < c->n; i++) {
		if (c->disp[i] < 0)
			continue;
		struct cluster_batch *b = &c->batches[c->disp[i]];
		struct cluster_peer *w = &c->w[i];
		b->step = ++c->step;
		b->sent = now;
		struct wire_msg m = {.kind = WIRE_BATCH};
		m.u.batch = (struct wire_batch){
		    b->step, (uint32_t)job->layer, (uint32_t)b->n_rows, (uint32_t)k, wt, b->ids,
		    b->wts};
		if (cluster_send(c, i, &m, b->act, (size_t)b->n_rows * row_bytes)) {
			cluster_drop(c, i, "cannot send");
			continue;
		}
		w->last_probe = now;
		w->st.batches++;
		w->st.rows += (uint64_t)b->n_rows;
		w->st.items += (uint64_t)b->items;
	}
	return 0;
}

static int cluster_submit(void *self, const struct expert_job *job)
{
	cluster *c = self;
	const int k = job->k, E = job->n_embd;
	if (job->layer >= 0 && job->layer < c->spec.n_layer) {
		cluster_between_steps(c, job->layer);
		if (c->step_expert == 0)
			c->step_rows = job->n_rows;
	}
	c->n_batches = 0;
	if (job->layer < 0 || job->layer >= c->spec.n_layer || k > WIRE_MAX_K ||
	    job->n_rows > WIRE_MAX_ROWS || E != c->spec.n_embd)
		return ERR_RANGE;
	for (size_t i = 0; i < (size_t)job->n_rows * k; i++)
		if (job->ids[i] < -1 || job->ids[i] >= c->spec.n_expert)
			return ERR_RANGE;
	if (balance_counts_add(c->counts, job->layer, job->ids, job->n_rows, k))
		return ERR_RANGE;
	c->t0 = cluster_now();
	return cluster_dispatch(c, job, -1);
}

/* 1 if every item of batch b has a serving holder now. */
static int cluster_placeable(cluster *c, const struct cluster_batch *b, int layer, int k)
{
	for (size_t i = 0; i < (size_t)b->n_rows * k; i++) {
		int32_t e = b->ids[i];
		if (e < 0)
			continue;
		int ok = 0;
		for (int r = 0; r < c->plan.n_replica && !ok; r++) {
			int h = placement_holder(&c->plan, layer, e, r);
			ok = h >= 0 && !c->w[h].lost && c->w[h].serving;
		}
		if (!ok)
			return 0;
	}
	return 1;
}

/* 1 if the placement being loaded gives every item of b a live holder. */
static int cluster_next_covers(cluster *c, const struct cluster_batch *b, int layer, int k)
{
	if (!c->next_active)
		return 0;
	for (size_t i = 0; i < (size_t)b->n_rows * k; i++) {
		int32_t e = b->ids[i];
		if (e < 0)
			continue;
		int ok = 0;
		for (int r = 0; r < c->next.n_replica && !ok; r++) {
			int h = placement_holder(&c->next, layer, e, r);
			ok = h >= 0 && !c->w[h].lost;
		}
		if (!ok)
			return 0;
	}
	return 1;
}

/* Takes one message received during a step: a Result of a pending batch
 * lands in job->out; stale Results (of batches already re-sent elsewhere, or
 * of an earlier step) are ignored. */
static void cluster_take(cluster *c, const struct expert_job *job, int who,
			 const struct wire_msg *m, const uint8_t *data, size_t n)
{
	const int k = job->k, E = job->n_embd;
	struct cluster_peer *w = &c->w[who];
	if (m->kind == WIRE_RESULT) {
		struct cluster_batch *b = NULL;
		for (int i = 0; i < c->n_batches && !b; i++)
			if (c->batches[i].worker == who && c->batches[i].step == m->u.result.step &&
			    c->batches[i].state == CLUSTER_BATCH_PENDING)
				b = &c->batches[i];
		if (!b) {
			log_warn("worker %d: stale result for step %llu ignored", who,
				 (unsigned long long)m->u.result.step);
			return;
		}
		if (m->u.result.layer != (uint32_t)job->layer ||
		    m->u.result.n_items != (uint32_t)b->items ||
		    n != wire_result_frame_bytes(&m->u.result, (uint32_t)E)) {
			cluster_drop(c, who, "result does not match its batch");
			return;
		}
		const float *items = (const float *)data;
		size_t at = 0;
		for (int j = 0; j < b->n_rows; j++)
			for (int s = 0; s < k; s++)
				if (b->ids[(size_t)j * k + s] >= 0)
					memcpy(job->out + ((size_t)b->rows[j] * k + s) * E,
					       items + (at++) * E, (size_t)E * sizeof(float));
		double wait = cluster_now() - b->sent;
		w->st.compute_seconds += m->u.result.compute_seconds;
		w->st.wait_seconds += wait;
		if (!w->fit_lat)
			w->fit_lat = malloc(CLUSTER_FIT_MAX * sizeof(float));
		if (w->fit_lat && w->n_fit < CLUSTER_FIT_MAX)
			w->fit_lat[w->n_fit++] = (float)(wait - m->u.result.compute_seconds);
		b->state = CLUSTER_BATCH_DONE;
	} else if (m->kind == WIRE_ERROR) {
		cluster_drop(c, who, m->u.text);
	} else if (m->kind == WIRE_READY) {
		cluster_on_ready(c, who, &m->u.ready);
	} else if (m->kind != WIRE_HEARTBEAT && m->kind != WIRE_STATS && m->kind != WIRE_HELLO &&
		   m->kind != WIRE_PROGRESS) {
		/* a repeated Hello of a member is harmless */
		cluster_drop(c, who, "unexpected message during a step");
	}
}

enum {
	CLUSTER_PROBE_MS = 100, /* a worker silent this long in a step is probed */
};

/* Receives the results of the submitted job (in any order) into job->out.
 * Batches of workers that are lost meanwhile (a send fails, a probe finds
 * the connection gone, no answer within the time-out, an Error) are sent
 * again to other holders of the same experts; items whose experts have no
 * holder left wait for the replica repair, when it can place them. */
static int cluster_collect(void *self, const struct expert_job *job)
{
	cluster *c = self;
	double t0 = c->t0;
	int rc = 0, failed_over = 0;
	uint64_t resent = 0;
	for (;;) {
		if (c->repair_due)
			cluster_plan_repair(c, c->rebuild_due);
		int pending = 0, waiting = 0;
		for (int b = 0; b < c->n_batches && !rc; b++) {
			struct cluster_batch *x = &c->batches[b];
			if (x->state == CLUSTER_BATCH_PENDING)
				pending++;
			if (x->state != CLUSTER_BATCH_FAILED)
				continue;
			if (!cluster_placeable(c, x, job->layer, job->k)) {
				if (cluster_next_ready(c)) {
					cluster_switch(c);
					b--; /* look again under the new placement */
					continue;
				}
				if (cluster_next_covers(c, x, job->layer, job->k)) {
					waiting++;
					continue;
				}
				for (size_t i = 0; i < (size_t)x->n_rows * job->k; i++)
					if (x->ids[i] >= 0) {
						log_error("layer %d: expert %d has no live holder "
							  "and cannot "
							  "be reloaded on the surviving workers",
							  job->layer, x->ids[i]);
						break;
					}
				rc = ERR_PEER;
				break;
			}
			failed_over = 1;
			resent += (uint64_t)x->items;
			x->state = CLUSTER_BATCH_DONE;
			int r = cluster_dispatch(c, job, b);
			if (r)
				rc = r;
			b = -1; /* new batches (and maybe new failures): scan again */
			pending = waiting = 0;
		}
		if (rc || (pending == 0 && waiting == 0))
			break;
		/* time-outs and probes */
		double now = cluster_now(), wake = now + 1.0;
		for (int b = 0; b < c->n_batches; b++) {
			struct cluster_batch *x = &c->batches[b];
			if (x->state != CLUSTER_BATCH_PENDING)
				continue;
			struct cluster_peer *w = &c->w[x->worker];
			double due = x->sent + c->cfg.timeout_ms / 1000.0;
			if (now >= due) {
				char why[96];
				snprintf(why, sizeof(why),
					 "no answer within the worker time-out (%d ms)",
					 c->cfg.timeout_ms);
				cluster_drop(c, x->worker, why);
				wake = now;
				break;
			}
			wake = fmin(wake, due);
			if (now - w->last_probe >= CLUSTER_PROBE_MS / 1000.0) {
				/* a send to a closed connection fails at once */
				struct wire_msg hb = {.kind = WIRE_HEARTBEAT};
				hb.u.heartbeat_nonce = c->step;
				w->last_probe = now;
				if (cluster_send(c, x->worker, &hb, NULL, 0)) {
					cluster_drop(c, x->worker, "connection lost");
					wake = now;
					break;
				}
			}
			wake = fmin(wake, w->last_probe + CLUSTER_PROBE_MS / 1000.0);
		}
		if (waiting) {
			double limit = c->repair_t0 + c->cfg.join_timeout_ms / 1000.0;
			if (now >= limit) {
				log_error(
				    "layer %d: the lost experts were not reloaded within %d ms",
				    job->layer, c->cfg.join_timeout_ms);
				rc = ERR_PEER;
				break;
			}
			/* the step waits anyway: stream the replacements at full speed */
			size_t budget = c->live_budget;
			c->live_budget = CLUSTER_LIVE_MAX;
			cluster_pump(c);
			c->live_budget = budget;
			int queued = 0;
			for (int i = 0; i < c->n; i++)
				queued |= !c->w[i].lost && c->w[i].sq_at < c->w[i].sq_n;
			wake = fmin(wake, queued ? now : now + CLUSTER_PROBE_MS / 1000.0);
		}
		int left = (int)ceil((wake - cluster_now()) * 1000.0);
		struct wire_msg m;
		const uint8_t *data;
		size_t n;
		int peer, who;
		int r = cluster_recv(c, left > 0 ? left : 0, &m, &peer, &who, &data, &n);
		if (r == ERR_PROTO || r == ERR_PEER)
			continue; /* a dropped sender, or nothing yet */
		if (r) {
			rc = r;
			break;
		}
		if (who < 0)
			cluster_on_stranger(c, peer, &m);
		else
			cluster_take(c, job, who, &m, data, n);
		wire_msg_free(&m);
	}
	double dt = cluster_now() - t0;
	c->step_expert += dt;
	if (failed_over) {
		c->n_failover_steps++;
		c->resent_items += resent;
		c->worst_stall = fmax(c->worst_stall, dt);
		log_warn(
		    "layer %d: %llu item(s) re-sent to surviving workers; the step took %.0f ms",
		    job->layer, (unsigned long long)resent, dt * 1e3);
	}
	if (rc)
		log_error("layer %d: the step failed: experts unavailable", job->layer);
	else if (job->layer == c->last_moe)
		cluster_pump(c); /* between two steps: while the coordinator computes the
				  * output, samples, and the next step's first layers */
	return rc;
}

static void cluster_backend_destroy(void *self)
{
	cluster *c = self;
	cluster_destroy(&c);
}

static const struct expert_backend_ops cluster_ops = {cluster_submit, cluster_collect,
						      cluster_backend_destroy};

int cluster_backend(cluster *c, expert_backend **out)
{
	return expert_backend_new(&cluster_ops, c, out);
}
