#include "cluster.h"
#include "balance.h"
#include "placement.h"
#include "../common/err.h"
#include "../common/log.h"
#include "../common/wire.h"
#include "../kernels/kern.h"
#include "../worker/shard.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum {
	CLUSTER_CHUNK = 4 << 20,      /* bytes of streamed weights per message at start-up */
	CLUSTER_LIVE_MIN = 32 << 10,  /* bytes per worker per layer while serving: */
	CLUSTER_LIVE_START = 256 << 10, /* adapted so that steps stay close to */
	CLUSTER_LIVE_MAX = 4 << 20,   /* the ones without streaming */
};

struct cluster_peer {
	int peer; /* transport peer index */
	struct wire_hello hello;
	int ready;
	int lost;
	struct cluster_worker_stats st;
	/* per job */
	int32_t *rows;	/* job rows this worker gets */
	int n_rows;
	int32_t *ids;	/* n_rows x k */
	float *wts;
	uint8_t *act;	/* activation frame */
	size_t rows_cap, act_cap;
	int expect_items;
	int answered;
	/* live streaming of the next epoch's new experts: queue and cursor */
	uint32_t *sq_layer, *sq_expert;
	uint32_t sq_n, sq_at;
	int sq_tensor;
	uint64_t sq_off;
	/* compute seconds at the start of the epoch in force */
	double epoch_compute0;
	int releasing; /* a Release is not answered yet */
};

struct cluster {
	transport *t;
	struct cluster_config cfg;
	struct moe_spec spec;
	pool *pool;
	struct cluster_peer *w;
	int n;
	placement plan;
	uint64_t step;
	int pending; /* workers the submitted job waits for */
	struct balance_counts *counts; /* decayed routed rows per (layer, expert) */
	/* live re-placement */
	const struct balance_policy *policy;
	uint64_t fwd_step, last_plan_step;
	int last_layer;
	placement next;	    /* planned, waiting for Ready from every worker */
	int next_active;
	int next_ready;	    /* workers ready for it */
	uint64_t epoch;	    /* of the placement in force */
	uint64_t rebalances;
	uint64_t moved_bytes;
	uint64_t expert_bytes[MOE_MAX_LAYERS];
	struct placement_worker *pw;	/* [n] as given to placement_build */
	double *finish;	 /* [n] predicted finish of each worker in the job being split */
	double *speed;	 /* [n] relative speed from Hello */
	uint8_t *visits; /* [n] workers the current row already visits */
	double t0;   /* when it was submitted */
	uint8_t *hdr;
	size_t hdr_cap;
	uint32_t layer_types[MOE_MAX_LAYERS][3];
	/* step timing: wall time of every forward step, and whether a
	 * re-placement was being loaded during it */
	double step_t0;
	double recent_ms[15]; /* the last steps without a re-placement loading */
	int n_recent;
	size_t live_budget;  /* streamed bytes per worker per layer */
	double step_expert; /* seconds of the current step spent submitting to collecting */
	int step_rows;	    /* tokens of the current step */
	double *step_expert_ms;
	int32_t *step_tokens;
	double *step_ms;
	uint8_t *step_moving;
	size_t n_steps, steps_cap;
	uint64_t epoch_step0;	/* fwd_step at the start of the epoch in force */
	struct cluster_epoch_stats *epochs;
	size_t n_epochs;
};

static void cluster_epoch_now(const cluster *c, struct cluster_epoch_stats *out);
static int cluster_cmp_double(const void *a, const void *b);
static void cluster_on_ready(cluster *c, int who, const struct wire_ready *r);

static double cluster_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cluster_send(cluster *c, int i, const struct wire_msg *m, const void *data, size_t n)
{
	size_t len;
	int rc = wire_encode(m, &c->hdr, &c->hdr_cap, &len);
	if (rc)
		return rc;
	c->w[i].st.bytes_sent += len + n;
	return transport_send(c->t, c->w[i].peer, c->hdr, len, data, n);
}

static int cluster_find(const cluster *c, int peer)
{
	for (int i = 0; i < c->n; i++)
		if (c->w[i].peer == peer && !c->w[i].lost)
			return i;
	return -1;
}

static void cluster_drop(cluster *c, int i, const char *why)
{
	if (c->w[i].lost)
		return;
	log_error("worker %d (%s): dropped: %s", i, c->w[i].st.name, why);
	c->w[i].lost = 1;
	c->w[i].st.lost = 1;
	transport_drop_peer(c->t, c->w[i].peer);
}

/* Receives one decoded message from any peer; *who = worker index or -1 for
 * an unknown peer.  ERR_PEER on time-out. */
static int cluster_recv(cluster *c, int timeout_ms, struct wire_msg *m, int *peer, int *who,
			const uint8_t **data, size_t *n)
{
	struct transport_frame f;
	int rc = transport_recv(c->t, timeout_ms, &f);
	if (rc)
		return rc;
	*peer = f.peer;
	*who = cluster_find(c, f.peer);
	if (f.bad) {
		if (*who >= 0)
			cluster_drop(c, *who, "message breaks the size limits");
		return ERR_PROTO;
	}
	rc = wire_decode(f.hdr, f.hdr_len, transport_peer_name(c->t, f.peer), m);
	if (rc) {
		if (*who >= 0)
			cluster_drop(c, *who, "malformed message");
		else
			transport_drop_peer(c->t, f.peer);
		return ERR_PROTO;
	}
	if (*who >= 0)
		c->w[*who].st.bytes_received += f.hdr_len + f.data_len;
	*data = f.data;
	*n = f.data_len;
	return 0;
}

/* ------------------------------------------------------------ start-up */

static int cluster_join(cluster *c)
{
	double deadline = cluster_now() + c->cfg.join_timeout_ms / 1000.0;
	while (c->n < c->cfg.n_workers) {
		int left = (int)((deadline - cluster_now()) * 1000.0);
		if (left <= 0) {
			log_error("only %d of %d workers joined within %d ms", c->n,
				  c->cfg.n_workers, c->cfg.join_timeout_ms);
			return ERR_PEER;
		}
		struct wire_msg m;
		const uint8_t *d;
		size_t n;
		int peer, who;
		int rc = cluster_recv(c, left, &m, &peer, &who, &d, &n);
		if (rc == ERR_PEER || rc == ERR_PROTO)
			continue;
		if (rc)
			return rc;
		if (m.kind != WIRE_HELLO || who >= 0) {
			log_error("%s: expected Hello, got %s; ignored",
				  transport_peer_name(c->t, peer), wire_kind_name(m.kind));
			transport_drop_peer(c->t, peer);
			wire_msg_free(&m);
			continue;
		}
		struct cluster_peer *w = &c->w[c->n];
		memset(w, 0, sizeof(*w));
		w->peer = peer;
		w->hello = m.u.hello;
		snprintf(w->st.name, sizeof(w->st.name), "%s", m.u.hello.name);
		log_info("worker %d joined: %s, %u cores, %.1f GiB, %s", c->n, w->st.name,
			 w->hello.cores, (double)w->hello.memory_bytes / (1 << 30),
			 w->hello.has_model ? "has the model" : "needs the weights streamed");
		c->n++;
		wire_msg_free(&m);
	}
	return 0;
}

static int cluster_layer_types(cluster *c)
{
	static const char *names[3] = {"gate", "up", "down"};
	for (int l = 0; l < c->spec.n_layer; l++) {
		if (!c->spec.layer_moe[l])
			continue;
		for (int t = 0; t < 3; t++) {
			char name[96];
			snprintf(name, sizeof(name), "blk.%d.ffn_%s_exps.weight", l, names[t]);
			const gguf_tensor *x = gguf_find_tensor(c->cfg.g, name);
			if (!x) {
				log_error("%s: missing tensor %s", gguf_path(c->cfg.g), name);
				return ERR_FORMAT;
			}
			c->layer_types[l][t] = x->type;
		}
	}
	return 0;
}

static int cluster_place(cluster *c)
{
	uint64_t *bytes = c->expert_bytes;
	for (int l = 0; l < c->spec.n_layer; l++) {
		if (!c->spec.layer_moe[l])
			continue;
		bytes[l] = shard_expert_bytes(&c->spec, c->layer_types[l]);
		if (c->spec.has_bias)
			bytes[l] += (uint64_t)(2 * c->spec.n_ff_exp + c->spec.n_embd) * sizeof(float);
	}
	struct placement_model pm = {c->spec.n_layer, c->spec.n_expert, c->spec.layer_moe, bytes,
				     NULL};
	struct placement_worker *pw = calloc((size_t)c->n, sizeof(*pw));
	if (!pw)
		return ERR_NOMEM;
	c->pw = pw;
	/* speeds measured at Hello (else core counts), relative to the fastest
	 * and rounded to eighths: a few percent of measurement noise must not
	 * reshuffle the placement from one start to the next */
	int calibrated = 1;
	for (int i = 0; i < c->n; i++)
		if (!(c->w[i].hello.expert_rows_per_sec > 0) ||
		    !isfinite(c->w[i].hello.expert_rows_per_sec))
			calibrated = 0;
	double top = 0;
	for (int i = 0; i < c->n; i++) {
		pw[i].mem_bytes = c->w[i].hello.memory_bytes;
		pw[i].speed = calibrated ? c->w[i].hello.expert_rows_per_sec
					 : (c->w[i].hello.cores ? c->w[i].hello.cores : 1);
		top = fmax(top, pw[i].speed);
	}
	for (int i = 0; i < c->n; i++)
		pw[i].speed = top * fmax(1.0, round(8.0 * pw[i].speed / top)) / 8.0;
	int rc = placement_build(&pm, pw, c->n, c->cfg.replicas, &c->plan);
	c->finish = calloc((size_t)c->n, sizeof(double));
	c->speed = calloc((size_t)c->n, sizeof(double));
	c->visits = calloc((size_t)c->n, 1);
	if (!rc && (!c->finish || !c->speed || !c->visits))
		rc = ERR_NOMEM;
	for (int i = 0; !rc && i < c->n; i++) {
		c->speed[i] = pw[i].speed;
		c->w[i].st.speed = pw[i].speed;
	}
	if (!rc)
		rc = balance_counts_new(c->spec.n_layer, c->spec.n_expert,
					c->cfg.balance_window > 0 ? c->cfg.balance_window : 4096.0,
					&c->counts);
	return rc;
}

static const uint8_t *cluster_tensor_bytes(cluster *c, int l, int e, int t, uint32_t *type,
					   uint64_t *n)
{
	static const char *names[3] = {"gate", "up", "down"};
	char name[96];
	snprintf(name, sizeof(name), "blk.%d.ffn_%s_exps.%s", l, names[t % 3],
		 t < 3 ? "weight" : "bias");
	const gguf_tensor *x = gguf_find_tensor(c->cfg.g, name);
	if (!x)
		return NULL;
	uint64_t per = x->n_bytes / (uint64_t)c->spec.n_expert;
	*type = x->type;
	*n = per;
	return (const uint8_t *)x->data + per * (uint64_t)e;
}

static int cluster_assign(cluster *c)
{
	int rc = 0;
	uint32_t cap = (uint32_t)(c->spec.n_layer * c->spec.n_expert) + 1;
	uint32_t *pl = malloc(cap * sizeof(uint32_t)), *pe = malloc(cap * sizeof(uint32_t));
	if (!pl || !pe) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int i = 0; i < c->n && !rc; i++) {
		struct wire_msg m = {.kind = WIRE_ASSIGN};
		struct wire_assign *a = &m.u.assign;
		a->worker_id = (uint32_t)i;
		a->spec = c->spec;
		a->placement_epoch = 1;
		a->stream = c->cfg.stream || !c->w[i].hello.has_model;
		a->pair_layer = pl;
		a->pair_expert = pe;
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				if (placement_holds(&c->plan, i, l, e)) {
					pl[a->n_pairs] = (uint32_t)l;
					pe[a->n_pairs] = (uint32_t)e;
					a->n_pairs++;
				}
		log_info("worker %d: %u experts, %.1f MiB", i, a->n_pairs,
			 (double)c->plan.worker_bytes[i] / 1048576.0);
		rc = cluster_send(c, i, &m, NULL, 0);
		if (rc || !a->stream)
			continue;
		/* stream the bytes of every assigned expert */
		uint64_t sent = 0;
		int n_t = c->spec.has_bias ? 6 : 3;
		for (uint32_t p = 0; p < a->n_pairs && !rc; p++) {
			for (int t = 0; t < n_t && !rc; t++) {
				uint32_t type;
				uint64_t total;
				const uint8_t *src =
					cluster_tensor_bytes(c, (int)pl[p], (int)pe[p], t, &type, &total);
				if (!src) {
					rc = ERR_FORMAT;
					break;
				}
				for (uint64_t off = 0; off < total && !rc; off += CLUSTER_CHUNK) {
					uint64_t len = total - off < CLUSTER_CHUNK ? total - off : CLUSTER_CHUNK;
					struct wire_msg ch = {.kind = WIRE_WEIGHT_CHUNK};
					ch.u.chunk = (struct wire_weight_chunk){pl[p], pe[p], (uint32_t)t,
										type, off, total};
					rc = cluster_send(c, i, &ch, src + off, len);
					sent += len;
				}
			}
		}
		c->w[i].st.streamed_bytes += sent;
		log_info("worker %d: streamed %.1f MiB of weights", i, (double)sent / 1048576.0);
	}
out:
	free(pl);
	free(pe);
	return rc;
}

static int cluster_wait_ready(cluster *c)
{
	double deadline = cluster_now() + c->cfg.join_timeout_ms / 1000.0;
	int ready = 0;
	while (ready < c->n) {
		int left = (int)((deadline - cluster_now()) * 1000.0);
		if (left <= 0) {
			log_error("only %d of %d workers loaded their experts within %d ms", ready,
				  c->n, c->cfg.join_timeout_ms);
			return ERR_PEER;
		}
		struct wire_msg m;
		const uint8_t *d;
		size_t n;
		int peer, who;
		int rc = cluster_recv(c, left, &m, &peer, &who, &d, &n);
		if (rc == ERR_PEER || rc == ERR_PROTO)
			continue;
		if (rc)
			return rc;
		if (who < 0) {
			log_warn("%s: joined after start-up; ignored",
				 transport_peer_name(c->t, peer));
		} else if (m.kind == WIRE_READY && !c->w[who].ready) {
			c->w[who].ready = 1;
			c->w[who].st.held_experts = m.u.ready.n_experts;
			c->w[who].st.held_bytes = m.u.ready.bytes;
			ready++;
			log_info("worker %d ready: %u experts loaded", who, m.u.ready.n_experts);
		} else if (m.kind == WIRE_ERROR) {
			log_error("worker %d: %s", who, m.u.text);
			wire_msg_free(&m);
			return ERR_PEER;
		}
		wire_msg_free(&m);
	}
	return 0;
}

int cluster_new(transport *t, const struct cluster_config *cfg, pool *p, cluster **out)
{
	*out = NULL;
	int rc = 0;
	cluster *c = calloc(1, sizeof(*c));
	if (!c) {
		transport_destroy(&t);
		return ERR_NOMEM;
	}
	c->t = t;
	c->cfg = *cfg;
	c->spec = *cfg->spec;
	c->pool = p;
	if (cfg->n_workers < 1 || cfg->n_workers > 4096 || cfg->replicas < 1 ||
	    cfg->replicas > cfg->n_workers) {
		log_error("invalid cluster: %d workers, %d replicas", cfg->n_workers, cfg->replicas);
		rc = ERR_CONFIG;
		goto out;
	}
	c->w = calloc((size_t)cfg->n_workers, sizeof(*c->w));
	if (!c->w) {
		rc = ERR_NOMEM;
		goto out;
	}
	c->epoch = 1;
	c->last_layer = 1 << 30;
	if (cfg->rebalance && !(c->policy = balance_policy_find(cfg->rebalance))) {
		log_error("unknown rebalance policy '%s' (eplb, hetero, migrate)", cfg->rebalance);
		rc = ERR_CONFIG;
		goto out;
	}
	rc = cluster_layer_types(c);
	if (!rc)
		rc = cluster_join(c);
	if (!rc)
		rc = cluster_place(c);
	if (!rc)
		rc = cluster_assign(c);
	if (!rc)
		rc = cluster_wait_ready(c);
out:
	if (rc)
		cluster_destroy(&c);
	*out = c;
	return rc;
}

void cluster_destroy(cluster **pc)
{
	cluster *c = *pc;
	if (!c)
		return;
	for (int i = 0; i < c->n; i++) {
		if (!c->w[i].lost) {
			struct wire_msg m = {.kind = WIRE_SHUTDOWN};
			snprintf(m.u.text, sizeof(m.u.text), "coordinator done");
			cluster_send(c, i, &m, NULL, 0);
		}
		free(c->w[i].rows);
		free(c->w[i].ids);
		free(c->w[i].wts);
		free(c->w[i].act);
		free(c->w[i].sq_layer);
		free(c->w[i].sq_expert);
	}
	free(c->step_ms);
	free(c->step_moving);
	free(c->step_expert_ms);
	free(c->step_tokens);
	free(c->epochs);
	placement_free(&c->plan);
	placement_free(&c->next);
	free(c->finish);
	free(c->pw);
	balance_counts_destroy(&c->counts);
	free(c->speed);
	free(c->visits);
	transport_destroy(&c->t);
	free(c->w);
	free(c->hdr);
	free(c);
	*pc = NULL;
}

int cluster_n_workers(const cluster *c) { return c->n; }
const placement *cluster_placement(const cluster *c) { return &c->plan; }

void cluster_get_stats(const cluster *c, int i, struct cluster_worker_stats *out)
{
	*out = c->w[i].st;
	out->rebalances = c->rebalances;
}

int cluster_n_epochs(const cluster *c) { return (int)c->n_epochs + 1; }

void cluster_get_epoch(const cluster *c, int i, struct cluster_epoch_stats *out)
{
	if (i >= 0 && (size_t)i < c->n_epochs)
		*out = c->epochs[i];
	else
		cluster_epoch_now(c, out);
}

static int cluster_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

void cluster_step_times(const cluster *c, double *median_ms, double *worst_moving_ms,
			uint64_t *n_steps)
{
	*median_ms = *worst_moving_ms = 0;
	*n_steps = c->n_steps;
	if (!c->n_steps)
		return;
	double *t = malloc(c->n_steps * sizeof(double));
	if (t) {
		memcpy(t, c->step_ms, c->n_steps * sizeof(double));
		qsort(t, c->n_steps, sizeof(double), cluster_cmp_double);
		*median_ms = t[c->n_steps / 2];
		free(t);
	}
	for (size_t i = 0; i < c->n_steps; i++)
		if (c->step_moving[i] && c->step_ms[i] > *worst_moving_ms)
			*worst_moving_ms = c->step_ms[i];
}

/* How balanced the current placement is under the routed load counted so
 * far, and what the heterogeneity-aware policy would reach. */
static void cluster_print_balance(const cluster *c)
{
	if (!c->counts || !c->pw)
		return;
	struct placement_model pm = {c->spec.n_layer, c->spec.n_expert, c->spec.layer_moe,
				     c->expert_bytes, balance_counts_load(c->counts)};
	struct balance_stats now;
	if (balance_predict(&c->plan, &pm, c->pw, NULL, &now))
		return;
	fprintf(stderr, "balance: window %.0f tokens; placement now: imbalance %.3f (max/mean worker time)\n",
		c->cfg.balance_window > 0 ? c->cfg.balance_window : 4096.0, now.imbalance);
	const struct balance_policy *pol = balance_policy_find("hetero");
	struct balance_input in = {.model = &pm, .workers = c->pw, .n_worker = c->n,
				   .current = &c->plan, .min_replicas = c->plan.n_replica,
				   .max_replicas = c->plan.n_replica};
	placement alt;
	struct balance_stats then;
	if (pol && pol->plan(&in, &alt) == 0) {
		if (balance_predict(&alt, &pm, c->pw, NULL, &then) == 0)
			fprintf(stderr,
				"balance: policy hetero would reach imbalance %.3f, step time x%.3f, "
				"moving %.1f MiB\n",
				then.imbalance, now.step_time > 0 ? then.step_time / now.step_time : 1.0,
				(double)balance_moved_bytes(&c->plan, &alt, &pm) / 1048576.0);
		placement_free(&alt);
	}
}

/* A cluster file for `placement simulate` calibrated on this run: each
 * worker's speed is items / compute seconds, its per-layer latency the mean
 * of (wait - compute) per batch (transfer folded in: bandwidth is set very
 * high), and the coordinator's own time per step (step wall time minus the
 * time spent in expert jobs) is fitted as A + B * tokens by least squares. */
static void cluster_print_calibration(const cluster *c)
{
	if (c->n_steps < 2)
		return;
	double sx = 0, sy = 0, sxx = 0, sxy = 0, n = 0, wall = 0;
	for (size_t i = 0; i < c->n_steps; i++) {
		double x = c->step_tokens[i], y = (c->step_ms[i] - c->step_expert_ms[i]) * 1e3;
		sx += x;
		sy += y;
		sxx += x * x;
		sxy += x * y;
		n++;
		wall += c->step_ms[i];
	}
	double den = n * sxx - sx * sx;
	double b = den > 0 ? (n * sxy - sx * sy) / den : 0, a = (sy - b * sx) / n;
	if (b < 0 || a < 0) { /* keep the fit physical */
		b = b < 0 ? 0 : b;
		a = b == 0 ? sy / n : fmax(0, (sy - b * sx) / n);
		if (a == 0 && sx > 0)
			b = sy / sx;
	}
	fprintf(stderr, "# calibration: %zu steps, mean step %.3f ms; a cluster file:\n", c->n_steps,
		wall / n);
	fprintf(stderr, "# name speed(rows/s) memory latency_us bandwidth_MB_s\n");
	for (int i = 0; i < c->n; i++) {
		const struct cluster_worker_stats *s = &c->w[i].st;
		if (!s->batches || !(s->compute_seconds > 0))
			continue;
		double lat = (s->wait_seconds - s->compute_seconds) / (double)s->batches * 1e6;
		fprintf(stderr, "%s %.0f %llu %.1f 100000\n", s->name,
			(double)s->items / s->compute_seconds,
			(unsigned long long)c->w[i].hello.memory_bytes, lat > 0 ? lat : 0.0);
	}
	fprintf(stderr, "@coordinator %.1f %.3f\n", a, b);
}

/* Waits (up to timeout_ms) for the answers to outstanding Releases, so the
 * memory each worker reports is current.  Between jobs only. */
static void cluster_drain(cluster *c, int timeout_ms)
{
	double deadline = cluster_now() + timeout_ms / 1000.0;
	for (;;) {
		int waiting = 0;
		for (int i = 0; i < c->n; i++)
			waiting += !c->w[i].lost && c->w[i].releasing;
		int left = (int)((deadline - cluster_now()) * 1000.0);
		if (!waiting || left <= 0)
			return;
		struct wire_msg m;
		const uint8_t *d;
		size_t n;
		int peer, who;
		int rc = cluster_recv(c, left, &m, &peer, &who, &d, &n);
		if (rc == ERR_PROTO)
			continue;
		if (rc)
			return;
		if (who >= 0 && m.kind == WIRE_READY)
			cluster_on_ready(c, who, &m.u.ready);
		else if (who >= 0 && m.kind == WIRE_ERROR)
			cluster_drop(c, who, m.u.text);
		wire_msg_free(&m);
	}
}

void cluster_print_stats(cluster *c)
{
	cluster_drain(c, 2000);
	cluster_print_balance(c);
	if (c->policy)
		fprintf(stderr, "balance: %llu re-placement(s) switched, %.1f MiB loaded by workers\n",
			(unsigned long long)c->rebalances, (double)c->moved_bytes / 1048576.0);
	for (int e = 0; e < cluster_n_epochs(c); e++) {
		struct cluster_epoch_stats ep;
		cluster_get_epoch(c, e, &ep);
		if (ep.steps)
			fprintf(stderr,
				"balance: epoch %llu: %llu steps, worker compute per step max %.3f ms, "
				"mean %.3f ms, max/mean %.3f\n",
				(unsigned long long)ep.epoch, (unsigned long long)ep.steps,
				ep.compute_max * 1e3, ep.compute_mean * 1e3, ep.imbalance);
	}
	double med, worst;
	uint64_t n_steps;
	cluster_step_times(c, &med, &worst, &n_steps);
	if (n_steps)
		fprintf(stderr,
			"steps: %llu, median %.3f ms, worst while a re-placement loaded %.3f ms\n",
			(unsigned long long)n_steps, med, worst);
	fprintf(stderr, "%-4s %-20s %10s %10s %12s %12s %10s %10s %10s %8s %10s\n", "wkr", "name",
		"rows", "items", "sent", "received", "compute s", "wait s", "rows/s", "held", "held MiB");
	for (int i = 0; i < c->n; i++) {
		const struct cluster_worker_stats *s = &c->w[i].st;
		fprintf(stderr,
			"%-4d %-20.20s %10llu %10llu %12llu %12llu %10.3f %10.3f %10.0f %8u %10.3f%s\n",
			i, s->name, (unsigned long long)s->rows, (unsigned long long)s->items,
			(unsigned long long)s->bytes_sent, (unsigned long long)s->bytes_received,
			s->compute_seconds, s->wait_seconds, s->speed, s->held_experts,
			(double)s->held_bytes / 1048576.0, s->lost ? " LOST" : "");
	}
	/* what each worker should hold: the placement in force plus the one
	 * being loaded (released experts are gone) */
	for (int i = 0; i < c->n; i++) {
		uint32_t placed = 0, more = 0;
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++) {
				int now = placement_holds(&c->plan, i, l, e);
				placed += (uint32_t)now;
				more += (uint32_t)(c->next_active && !now &&
						   placement_holds(&c->next, i, l, e));
			}
		fprintf(stderr, "placement: worker %d should hold %u experts (%u in epoch %llu, %u loading)\n",
			i, placed + more, placed, (unsigned long long)c->epoch, more);
	}
	cluster_print_calibration(c);
	fprintf(stderr, "metrics (Prometheus text format):\n");
	cluster_metrics_write(stderr, c, 0);
}

/* ------------------------------------------------------------ metrics */

static void cluster_metric_head(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Prometheus label values: backslash, quote and newline escaped. */
static void cluster_metric_label(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '\\' || *s == '"')
			fputc('\\', f);
		if (*s == '\n')
			fputs("\\n", f);
		else
			fputc(*s, f);
	}
}

static void cluster_metric_worker(FILE *f, const cluster *c, const char *name, int i, double v)
{
	fprintf(f, "%s{worker=\"%d\",name=\"", name, i);
	cluster_metric_label(f, c->w[i].st.name);
	fprintf(f, "\"} %.9g\n", v);
}

int cluster_metrics_write(FILE *f, const cluster *c, int per_expert)
{
	static const struct {
		const char *name, *type, *help;
	} wm[] = {
		{"moefleet_worker_rows_total", "counter", "Token rows sent to the worker."},
		{"moefleet_worker_items_total", "counter", "(row, expert) items the worker computed."},
		{"moefleet_worker_compute_seconds_total", "counter", "Compute time the worker reported."},
		{"moefleet_worker_wait_seconds_total", "counter", "Time the coordinator waited for the worker."},
		{"moefleet_worker_sent_bytes_total", "counter", "Bytes sent to the worker."},
		{"moefleet_worker_received_bytes_total", "counter", "Bytes received from the worker."},
		{"moefleet_worker_streamed_bytes_total", "counter", "Expert weight bytes streamed to the worker."},
		{"moefleet_worker_held_experts", "gauge", "Experts the worker reports holding."},
		{"moefleet_worker_held_bytes", "gauge", "Expert bytes the worker reports holding."},
		{"moefleet_worker_speed_rows_per_second", "gauge", "Expert rows per second used for planning."},
		{"moefleet_worker_load", "gauge", "Decayed routed rows of the experts the worker holds (shared among replicas)."},
		{"moefleet_worker_up", "gauge", "1 while the worker serves, 0 once lost."},
	};
	const int n_wm = (int)(sizeof(wm) / sizeof(wm[0]));
	const double *load = c->counts ? balance_counts_load(c->counts) : NULL;
	double *wl = calloc((size_t)c->n + 1, sizeof(double));
	if (!wl)
		return ERR_NOMEM;
	for (int l = 0; load && l < c->spec.n_layer; l++)
		for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++) {
			int nh = placement_n_holders(&c->plan, l, e);
			for (int r = 0; r < nh; r++) {
				int h = placement_holder(&c->plan, l, e, r);
				if (h >= 0 && h < c->n)
					wl[h] += load[(size_t)l * c->spec.n_expert + e] / nh;
			}
		}
	for (int m = 0; m < n_wm; m++) {
		cluster_metric_head(f, wm[m].name, wm[m].type, wm[m].help);
		for (int i = 0; i < c->n; i++) {
			const struct cluster_worker_stats *s = &c->w[i].st;
			double v[] = {(double)s->rows,		 (double)s->items,
				      s->compute_seconds,	 s->wait_seconds,
				      (double)s->bytes_sent,	 (double)s->bytes_received,
				      (double)s->streamed_bytes, (double)s->held_experts,
				      (double)s->held_bytes,	 s->speed,
				      wl[i],			 s->lost ? 0.0 : 1.0};
			cluster_metric_worker(f, c, wm[m].name, i, v[m]);
		}
	}
	/* balancedness: mean / max over live workers of load / speed (1 = even) */
	double max = 0, mean = 0;
	int live = 0;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].lost || !(c->speed[i] > 0))
			continue;
		double t = wl[i] / c->speed[i];
		max = fmax(max, t);
		mean += t;
		live++;
	}
	mean = live ? mean / live : 0;
	free(wl);
	cluster_metric_head(f, "moefleet_balance_worker_time_mean", "gauge",
			    "Mean over live workers of decayed load / speed.");
	fprintf(f, "moefleet_balance_worker_time_mean %.9g\n", mean);
	cluster_metric_head(f, "moefleet_balance_worker_time_max", "gauge",
			    "Max over live workers of decayed load / speed.");
	fprintf(f, "moefleet_balance_worker_time_max %.9g\n", max);
	cluster_metric_head(f, "moefleet_balancedness", "gauge",
			    "Mean / max of the workers' predicted time (1 = perfectly even).");
	fprintf(f, "moefleet_balancedness %.9g\n", max > 0 ? mean / max : 1.0);
	struct cluster_epoch_stats ep;
	cluster_epoch_now(c, &ep);
	cluster_metric_head(f, "moefleet_balance_measured_imbalance", "gauge",
			    "Max / mean of the workers' compute time in the placement epoch in force.");
	fprintf(f, "moefleet_balance_measured_imbalance %.9g\n", ep.imbalance);
	cluster_metric_head(f, "moefleet_placement_epoch", "gauge", "Placement epoch in force.");
	fprintf(f, "moefleet_placement_epoch %llu\n", (unsigned long long)c->epoch);
	cluster_metric_head(f, "moefleet_rebalances_total", "counter", "Placements switched to.");
	fprintf(f, "moefleet_rebalances_total %llu\n", (unsigned long long)c->rebalances);
	cluster_metric_head(f, "moefleet_migrated_bytes_total", "counter",
			    "Expert bytes workers were told to load by re-placements.");
	fprintf(f, "moefleet_migrated_bytes_total %llu\n", (unsigned long long)c->moved_bytes);
	double med, worst;
	uint64_t n_steps;
	cluster_step_times(c, &med, &worst, &n_steps);
	cluster_metric_head(f, "moefleet_steps_total", "counter", "Forward steps through the cluster.");
	fprintf(f, "moefleet_steps_total %llu\n", (unsigned long long)n_steps);
	cluster_metric_head(f, "moefleet_step_seconds_median", "gauge", "Median forward step wall time.");
	fprintf(f, "moefleet_step_seconds_median %.9g\n", med * 1e-3);
	if (per_expert && load) {
		cluster_metric_head(f, "moefleet_expert_load", "gauge",
				    "Decayed routed rows per (layer, expert).");
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				fprintf(f, "moefleet_expert_load{layer=\"%d\",expert=\"%d\"} %.9g\n", l, e,
					load[(size_t)l * c->spec.n_expert + e]);
	}
	return ferror(f) ? ERR_IO : 0;
}

/* ------------------------------------------------------------ dispatch */

static uint32_t cluster_wire_type(const cluster *c, int layer)
{
	uint32_t act = kern_act_type(c->layer_types[layer][0]);
	uint32_t want = c->cfg.wire_dtype;
	if (!want)
		want = act == KERN_Q8_0 || act == KERN_BF16 ? act : KERN_F32;
	/* rows are only sent pre-converted when that is the experts' own type */
	return want == act || want == KERN_F32 ? want : KERN_F32;
}

/* The live holder that should compute one (row, expert): the least predicted
 * finish time in this job, preferring workers the row already visits
 * (balance_choose_replica); lost workers never finish. */
static int cluster_holder(cluster *c, int layer, int expert)
{
	for (int i = 0; i < c->n; i++)
		if (c->w[i].lost)
			c->finish[i] = INFINITY;
	int h = balance_choose_replica(&c->plan, layer, expert, c->finish, c->visits);
	if (h < 0 || c->w[h].lost)
		return -1;
	c->visits[h] = 1;
	c->finish[h] += 1.0 / c->speed[h];
	return h;
}

static int cluster_reserve(struct cluster_peer *w, size_t rows, size_t k, size_t act)
{
	if (rows > w->rows_cap) {
		free(w->rows);
		free(w->ids);
		free(w->wts);
		w->rows = malloc(rows * sizeof(int32_t));
		w->ids = malloc(rows * k * sizeof(int32_t));
		w->wts = malloc(rows * k * sizeof(float));
		w->rows_cap = w->rows && w->ids && w->wts ? rows : 0;
		if (!w->rows_cap)
			return ERR_NOMEM;
	}
	if (act > w->act_cap) {
		free(w->act);
		w->act = malloc(act);
		w->act_cap = w->act ? act : 0;
		if (!w->act)
			return ERR_NOMEM;
	}
	return 0;
}

static void cluster_on_ready(cluster *c, int who, const struct wire_ready *r)
{
	c->w[who].st.held_experts = r->n_experts;
	c->w[who].st.held_bytes = r->bytes;
	if (r->released)
		c->w[who].releasing = 0;
	if (!r->released && c->next_active && r->placement_epoch == c->epoch + 1)
		c->next_ready++;
}

/* Sends the next piece of the experts queued for live streaming to worker i:
 * at most one chunk per call, so streaming interleaves with forward steps. */
static void cluster_pump_one(cluster *c, int i)
{
	struct cluster_peer *w = &c->w[i];
	const int n_t = c->spec.has_bias ? 6 : 3;
	size_t budget = c->live_budget ? c->live_budget : CLUSTER_LIVE_START;
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
		ch.u.chunk = (struct wire_weight_chunk){(uint32_t)l, (uint32_t)e,
							(uint32_t)w->sq_tensor, type, w->sq_off, total};
		if (cluster_send(c, i, &ch, src + w->sq_off, (size_t)len)) {
			cluster_drop(c, i, "cannot send weights");
			return;
		}
		w->st.streamed_bytes += len;
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

static void cluster_pump(cluster *c)
{
	for (int i = 0; i < c->n; i++)
		if (c->w[i].sq_at < c->w[i].sq_n)
			cluster_pump_one(c, i);
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
		if (c->w[i].st.items < 256 || !(c->w[i].st.compute_seconds > 0))
			measured = 0;
	}
	/* speeds measured on this model replace the calibration of Hello, once
	 * every worker has some (the two are in different units) */
	for (int i = 0; measured && i < c->n; i++) {
		c->pw[i].speed = (double)c->w[i].st.items / c->w[i].st.compute_seconds;
		c->speed[i] = c->pw[i].speed;
		c->w[i].st.speed = c->pw[i].speed;
	}
	struct placement_model pm = {c->spec.n_layer, c->spec.n_expert, c->spec.layer_moe,
				     c->expert_bytes, balance_counts_load(c->counts)};
	struct balance_input in = {
		.model = &pm, .workers = c->pw, .n_worker = c->n, .current = &c->plan,
		.min_replicas = 1, .max_replicas = c->plan.n_replica,
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
	uint32_t cap = (uint32_t)(c->spec.n_layer * c->spec.n_expert) + 1;
	uint32_t *pl = malloc(cap * sizeof(uint32_t)), *pe = malloc(cap * sizeof(uint32_t));
	int rc = pl && pe ? 0 : ERR_NOMEM;
	for (int i = 0; i < c->n && !rc; i++) {
		struct wire_msg m = {.kind = WIRE_ASSIGN};
		struct wire_assign *a = &m.u.assign;
		struct cluster_peer *w = &c->w[i];
		a->worker_id = (uint32_t)i;
		a->spec = c->spec;
		a->placement_epoch = c->epoch + 1;
		a->stream = c->cfg.stream || !w->hello.has_model;
		/* queue the experts it lacks; they follow as chunks between steps */
		w->sq_n = w->sq_at = 0;
		w->sq_tensor = 0;
		w->sq_off = 0;
		if (a->stream) {
			free(w->sq_layer);
			free(w->sq_expert);
			w->sq_layer = malloc(cap * sizeof(uint32_t));
			w->sq_expert = malloc(cap * sizeof(uint32_t));
			if (!w->sq_layer || !w->sq_expert) {
				rc = ERR_NOMEM;
				break;
			}
			w->sq_n = cluster_diff(c, &next, &c->plan, i, w->sq_layer, w->sq_expert);
		}
		a->pair_layer = pl;
		a->pair_expert = pe;
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				if (placement_holds(&next, i, l, e)) {
					pl[a->n_pairs] = (uint32_t)l;
					pe[a->n_pairs] = (uint32_t)e;
					a->n_pairs++;
				}
		rc = cluster_send(c, i, &m, NULL, 0);
	}
	free(pl);
	free(pe);
	if (rc) {
		placement_free(&next);
		return;
	}
	c->next = next;
	c->next_active = 1;
	c->next_ready = 0;
	c->moved_bytes += moved;
	log_info("re-placement planned (policy %s) in %.1f ms: %.1f MiB to load", c->policy->name,
		 t_plan * 1e3, (double)moved / 1048576.0);
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
			double *ex = realloc(c->step_expert_ms, cap * sizeof(double));
			if (ex)
				c->step_expert_ms = ex;
			int32_t *tk = realloc(c->step_tokens, cap * sizeof(int32_t));
			if (tk)
				c->step_tokens = tk;
			if (t && mv && ex && tk)
				c->steps_cap = cap;
		}
		/* streaming that slows steps down by more than 30% backs off;
		 * streaming that does not speeds up */
		double ms = (now - c->step_t0) * 1e3, base = 0;
		size_t b = c->live_budget ? c->live_budget : CLUSTER_LIVE_START;
		int nr = c->n_recent < 15 ? c->n_recent : 15;
		if (nr) { /* the median of the recent quiet steps */
			double r[15];
			memcpy(r, c->recent_ms, (size_t)nr * sizeof(double));
			qsort(r, (size_t)nr, sizeof(double), cluster_cmp_double);
			base = r[nr / 2];
		}
		if (!c->next_active)
			c->recent_ms[c->n_recent++ % 15] = ms;
		else if (base > 0 && ms > 1.3 * base)
			b = b / 2 > CLUSTER_LIVE_MIN ? b / 2 : CLUSTER_LIVE_MIN;
		else if (base > 0 && ms < 1.1 * base)
			b = b + b / 2 < CLUSTER_LIVE_MAX ? b + b / 2 : CLUSTER_LIVE_MAX;
		c->live_budget = b;
		if (c->n_steps < c->steps_cap) {
			c->step_expert_ms[c->n_steps] = c->step_expert * 1e3;
			c->step_tokens[c->n_steps] = c->step_rows;
			c->step_ms[c->n_steps] = (now - c->step_t0) * 1e3;
			c->step_moving[c->n_steps] = (uint8_t)c->next_active;
			c->n_steps++;
		}
	}
	c->step_t0 = now;
	c->step_expert = 0;
}

/* The compute balance of the epoch in force so far. */
static void cluster_epoch_now(const cluster *c, struct cluster_epoch_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->epoch = c->epoch;
	out->steps = c->fwd_step - c->epoch_step0;
	int live = 0;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].lost)
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

/* Every worker loaded the next placement: put it in force, tell each worker
 * which experts it no longer needs, and close the statistics of the epoch. */
static void cluster_switch(cluster *c)
{
	struct cluster_epoch_stats *ep =
		realloc(c->epochs, (c->n_epochs + 1) * sizeof(*c->epochs));
	if (ep) {
		c->epochs = ep;
		cluster_epoch_now(c, &c->epochs[c->n_epochs++]);
	}
	uint32_t cap = (uint32_t)(c->spec.n_layer * c->spec.n_expert) + 1;
	uint32_t *pl = malloc(cap * sizeof(uint32_t)), *pe = malloc(cap * sizeof(uint32_t));
	for (int i = 0; i < c->n; i++) {
		c->w[i].epoch_compute0 = c->w[i].st.compute_seconds;
		if (!pl || !pe || c->w[i].lost)
			continue;
		struct wire_msg m = {.kind = WIRE_RELEASE};
		m.u.release = (struct wire_release){c->epoch + 1, 0, pl, pe};
		m.u.release.n_pairs = cluster_diff(c, &c->plan, &c->next, i, pl, pe);
		if (!m.u.release.n_pairs)
			continue;
		if (cluster_send(c, i, &m, NULL, 0))
			cluster_drop(c, i, "cannot send");
		else
			c->w[i].releasing = 1;
	}
	free(pl);
	free(pe);
	placement_free(&c->plan);
	c->plan = c->next;
	memset(&c->next, 0, sizeof(c->next));
	c->next_active = 0;
	c->epoch++;
	c->rebalances++;
	c->epoch_step0 = c->fwd_step;
	log_info("placement epoch %llu in force", (unsigned long long)c->epoch);
}

/* At the first MoE layer of each forward step: switch to a placement every
 * worker has loaded, or plan the next one when it is due. */
static void cluster_between_steps(cluster *c, int layer)
{
	int new_step = layer <= c->last_layer;
	c->last_layer = layer;
	if (!new_step)
		return;
	cluster_time_step(c);
	c->fwd_step++;
	if (!c->policy)
		return;
	if (c->next_active) {
		if (c->next_ready < c->n)
			return;
		cluster_switch(c);
		return;
	}
	int every = c->cfg.rebalance_every > 0 ? c->cfg.rebalance_every : 16;
	if (c->fwd_step - c->last_plan_step >= (uint64_t)every) {
		c->last_plan_step = c->fwd_step;
		cluster_plan_next(c);
	}
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
	if (job->layer < 0 || job->layer >= c->spec.n_layer || k > WIRE_MAX_K ||
	    job->n_rows > WIRE_MAX_ROWS || E != c->spec.n_embd)
		return ERR_RANGE;
	const uint32_t wt = cluster_wire_type(c, job->layer);
	const size_t row_bytes = kern_row_bytes(wt, E);
	c->step++;
	/* split the rows by the holder of each chosen expert */
	for (int i = 0; i < c->n; i++) {
		struct cluster_peer *w = &c->w[i];
		w->n_rows = 0;
		w->expect_items = 0;
		w->answered = 1;
		if (!w->lost && cluster_reserve(w, (size_t)job->n_rows, (size_t)k,
						(size_t)job->n_rows * row_bytes))
			return ERR_NOMEM;
	}
	for (int i = 0; i < c->n; i++)
		c->finish[i] = 0.0;
	if (balance_counts_add(c->counts, job->layer, job->ids, job->n_rows, k))
		return ERR_RANGE;
	for (int r = 0; r < job->n_rows; r++) {
		memset(c->visits, 0, (size_t)c->n);
		for (int s = 0; s < k; s++) {
			int32_t e = job->ids[(size_t)r * k + s];
			if (e == -1)
				continue; /* empty slot (fewer experts for this row) */
			if (e < 0 || e >= c->spec.n_expert)
				return ERR_RANGE;
			int h = cluster_holder(c, job->layer, e);
			if (h < 0) {
				log_error("expert %d of layer %d is held by no live worker", e,
					  job->layer);
				return ERR_PEER;
			}
			struct cluster_peer *w = &c->w[h];
			if (w->n_rows == 0 || w->rows[w->n_rows - 1] != r) {
				int at = w->n_rows++;
				w->rows[at] = r;
				for (int j = 0; j < k; j++) {
					w->ids[(size_t)at * k + j] = -1;
					w->wts[(size_t)at * k + j] = 0.0f;
				}
				kern_convert_row(wt, job->x + (size_t)r * E, w->act + (size_t)at * row_bytes,
						 E);
			}
			size_t at = (size_t)(w->n_rows - 1) * k + (size_t)s;
			w->ids[at] = e;
			w->wts[at] = job->weights[(size_t)r * k + s];
			w->expect_items++;
		}
	}
	int pending = 0;
	for (int i = 0; i < c->n; i++) {
		struct cluster_peer *w = &c->w[i];
		if (w->lost || w->n_rows == 0)
			continue;
		struct wire_msg m = {.kind = WIRE_BATCH};
		m.u.batch = (struct wire_batch){c->step, (uint32_t)job->layer, (uint32_t)w->n_rows,
						(uint32_t)k, wt, w->ids, w->wts};
		int rc = cluster_send(c, i, &m, w->act, (size_t)w->n_rows * row_bytes);
		if (rc) {
			cluster_drop(c, i, "cannot send");
			return ERR_PEER;
		}
		w->answered = 0;
		w->st.batches++;
		w->st.rows += (uint64_t)w->n_rows;
		w->st.items += (uint64_t)w->expect_items;
		pending++;
	}
	c->pending = pending;
	c->t0 = cluster_now();
	return 0;
}

/* Receives the results of the submitted job (in any order) into job->out. */
static int cluster_collect(void *self, const struct expert_job *job)
{
	cluster *c = self;
	const int k = job->k, E = job->n_embd;
	int pending = c->pending;
	c->pending = 0;
	double t0 = c->t0, deadline = t0 + c->cfg.timeout_ms / 1000.0;
	int rc = 0;
	while (pending > 0) {
		int left = (int)((deadline - cluster_now()) * 1000.0);
		if (left <= 0) {
			for (int i = 0; i < c->n; i++)
				if (!c->w[i].answered)
					cluster_drop(c, i, "no answer within the worker time-out");
			log_error("layer %d: %d worker(s) did not answer within %d ms", job->layer,
				  pending, c->cfg.timeout_ms);
			return ERR_PEER;
		}
		struct wire_msg m;
		const uint8_t *data;
		size_t n;
		int peer, who;
		int r = cluster_recv(c, left, &m, &peer, &who, &data, &n);
		if (r == ERR_PROTO) {
			/* the sender was dropped; if it was pending, the job cannot finish */
			for (int i = 0; i < c->n; i++)
				if (c->w[i].lost && !c->w[i].answered) {
					c->w[i].answered = 1;
					pending--;
					rc = ERR_PEER;
				}
			continue;
		}
		if (r == ERR_PEER)
			continue;
		if (r)
			return r;
		if (who < 0) {
			log_warn("%s: message from an unknown worker ignored",
				 transport_peer_name(c->t, peer));
			transport_drop_peer(c->t, peer);
			wire_msg_free(&m);
			continue;
		}
		struct cluster_peer *w = &c->w[who];
		if (m.kind == WIRE_RESULT && m.u.result.step == c->step && !w->answered) {
			if (m.u.result.layer != (uint32_t)job->layer ||
			    m.u.result.n_items != (uint32_t)w->expect_items ||
			    n != wire_result_frame_bytes(&m.u.result, (uint32_t)E)) {
				cluster_drop(c, who, "result does not match its batch");
				rc = ERR_PEER;
			} else {
				const float *items = (const float *)data;
				size_t at = 0;
				for (int j = 0; j < w->n_rows; j++)
					for (int s = 0; s < k; s++)
						if (w->ids[(size_t)j * k + s] >= 0)
							memcpy(job->out + ((size_t)w->rows[j] * k + s) * E,
							       items + (at++) * E, (size_t)E * sizeof(float));
				w->st.compute_seconds += m.u.result.compute_seconds;
				w->st.wait_seconds += cluster_now() - t0;
			}
			w->answered = 1;
			pending--;
		} else if (m.kind == WIRE_RESULT) {
			log_warn("worker %d: stale result for step %llu ignored", who,
				 (unsigned long long)m.u.result.step);
		} else if (m.kind == WIRE_ERROR) {
			cluster_drop(c, who, m.u.text);
			if (!w->answered) {
				w->answered = 1;
				pending--;
				rc = ERR_PEER;
			}
		} else if (m.kind == WIRE_READY) {
			cluster_on_ready(c, who, &m.u.ready);
		} else if (m.kind != WIRE_HEARTBEAT && m.kind != WIRE_STATS) {
			cluster_drop(c, who, "unexpected message during a step");
			if (!w->answered) {
				w->answered = 1;
				pending--;
				rc = ERR_PEER;
			}
		}
		wire_msg_free(&m);
	}
	c->step_expert += cluster_now() - t0;
	if (rc)
		log_error("layer %d: a worker failed during the step", job->layer);
	else
		cluster_pump(c); /* while the coordinator computes the next layer */
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
