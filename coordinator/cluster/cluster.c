#define _GNU_SOURCE /* madvise */
#include "cluster.h"
#include "../placement/balance.h"
#include "../placement/placement.h"
#include "../placement/simulate.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../common/progress.h"
#include "../../common/shardfile.h"
#include "../../common/wire.h"
#include "../../kernels/kern.h"
#include "../../common/shard.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

enum {
	CLUSTER_CHUNK = 4 << 20,	/* bytes of streamed weights per message at start-up */
	CLUSTER_LIVE_MIN = 64 << 10,	/* bytes streamed per forward step while */
	CLUSTER_LIVE_START = 384 << 10, /* serving (all workers together), adapted */
	CLUSTER_LIVE_MAX = 24 << 20,	/* to the measured cost (cluster_adapt_budget) */
	CLUSTER_LIVE_SAMPLES = 4,	/* loading steps between two budget changes */
	CLUSTER_LIVE_STEPS = 64,	/* a re-placement loads within about this many steps */
	CLUSTER_FIT_MAX = 1 << 16,	/* batches per worker kept for the calibration */
};

/* Streaming may make the median loading step this much slower than the
 * median quiet step; a single loading step slower than CLUSTER_LIVE_GUARD x
 * the quiet median halves the budget at once. */
#define CLUSTER_LIVE_SLACK 0.15
#define CLUSTER_LIVE_GUARD 2.0

struct cluster_peer {
	int peer;		 /* transport peer index */
	struct wire_hello hello; /* without its held list, which is in `held` */
	uint8_t *held;		 /* [n_layer][n_expert] the experts its shard file holds; NULL: a
				    full model file, or none */
	int ready;
	int lost;
	int serving;	   /* holds the experts of the placement in force: may get Batches */
	int fresh;	   /* rejoined: holds nothing yet, whatever the placement says */
	int next_ok;	   /* answered Ready for the placement being loaded */
	double last_probe; /* when it was last probed during a step */
	struct cluster_worker_stats st;
	/* live streaming of the next epoch's new experts: queue and cursor */
	uint32_t *sq_layer, *sq_expert;
	uint32_t sq_n, sq_at;
	int sq_tensor;
	uint64_t sq_off;
	/* compute seconds at the start of the epoch in force */
	double epoch_compute0;
	int releasing;			/* a Release is not answered yet */
	uint64_t load_done, load_total; /* its last Progress at start-up */
	/* each answered batch's wall time (sent to answered) minus the compute
	 * time the worker reported, for the simulator's calibration (the first
	 * CLUSTER_FIT_MAX batches) */
	float *fit_lat;
	size_t n_fit;
};

/* One Batch of the job in flight: the rows one worker computes, or (worker
 * -1) items whose experts have no serving holder yet.  A batch whose worker
 * is lost before it answered becomes FAILED and its items are dispatched
 * again to other holders (cluster_collect). */
enum cluster_batch_state { CLUSTER_BATCH_PENDING, CLUSTER_BATCH_DONE, CLUSTER_BATCH_FAILED };

struct cluster_batch {
	int worker;
	uint64_t step; /* the Batch's step number, unique per Batch */
	enum cluster_batch_state state;
	int n_rows;
	int32_t *rows; /* job rows */
	int32_t *ids;  /* n_rows x k, -1 = not in this batch */
	float *wts;
	uint8_t *act; /* activation frame */
	size_t rows_cap, k_cap, act_cap;
	int items;
	double sent;
};

struct cluster {
	transport *t;
	struct cluster_config cfg;
	struct moe_spec spec;
	pool *pool;
	struct cluster_peer *w;
	int n;
	int started; /* start-up done: a Hello now is a (re)joining worker */
	placement plan;
	uint64_t step;
	/* the job in flight */
	struct cluster_batch *batches;
	int n_batches, cap_batches;
	int *disp;		       /* [n] batch of each worker in the dispatch being built */
	struct balance_counts *counts; /* decayed routed rows per (layer, expert) */
	/* live re-placement */
	const struct balance_policy *policy;
	uint64_t fwd_step, last_plan_step;
	int last_layer;
	placement next; /* planned, waiting for Ready from every live worker */
	int next_active;
	uint64_t next_epoch; /* epoch number of next */
	uint64_t epoch_seq;  /* last epoch number handed out */
	uint64_t epoch;	     /* of the placement in force */
	uint64_t rebalances;
	uint64_t moved_bytes;
	/* failover */
	int repair_due;	  /* a worker was lost: re-create its replicas */
	int rebuild_due;  /* a worker (re)joined: give it a share */
	double repair_t0; /* when the repair plan in flight was sent (0: none) */
	uint64_t n_lost, n_rejoined, n_failover_steps, resent_items, n_repairs;
	double worst_stall; /* seconds, of a step that re-sent items */
	uint32_t unheld;    /* experts without a live holder after the last repair plan */
	uint64_t expert_bytes[MOE_MAX_LAYERS];
	struct placement_worker *pw; /* [n] as given to placement_build */
	double *finish;	 /* [n] predicted finish of each worker in the job being split */
	double *speed;	 /* [n] relative speed from Hello */
	uint8_t *visits; /* [n] workers the current row already visits */
	double t0;	 /* when it was submitted */
	uint8_t *hdr;
	size_t hdr_cap;
	uint32_t layer_types[MOE_MAX_LAYERS][3];
	/* step timing: wall time of every forward step, and whether a
	 * re-placement was being loaded during it */
	double step_t0;
	double recent_ms[15]; /* the last steps without a re-placement loading */
	int32_t recent_tokens[15];
	int n_recent;
	size_t live_budget;		      /* streamed bytes per forward step, all workers */
	uint64_t step_streamed;		      /* bytes streamed during the current step */
	double load_ms[CLUSTER_LIVE_SAMPLES]; /* loading steps since the budget changed */
	int n_load;
	size_t live_floor;  /* budget that loads the re-placement in CLUSTER_LIVE_STEPS */
	int last_moe;	    /* the last MoE layer: streamed chunks follow its results */
	double step_expert; /* seconds of the current step spent submitting to collecting */
	int step_rows;	    /* tokens of the current step */
	double *step_expert_ms;
	int32_t *step_tokens;
	double *step_ms;
	uint8_t *step_moving;
	uint64_t *step_epoch; /* the placement in force during the step */
	size_t n_steps, steps_cap;
	uint64_t epoch_step0; /* fwd_step at the start of the epoch in force */
	struct cluster_epoch_stats *epochs;
	size_t n_epochs;
	char model_id[SHARDFILE_ID_LEN]; /* shardfile_model_id() of cfg->g */
	uint8_t *held_none;		 /* [n_layer][n_expert] zeros */
};

static void cluster_epoch_now(const cluster *c, struct cluster_epoch_stats *out);
static int cluster_cmp_double(const void *a, const void *b);
static void cluster_on_ready(cluster *c, int who, const struct wire_ready *r);
static int cluster_grow(cluster *c, size_t more);
static int cluster_send_next(cluster *c, placement *next);
static uint32_t cluster_diff(const cluster *c, const placement *a, const placement *b, int i,
			     uint32_t *pl, uint32_t *pe);

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

/* 1 if worker i gets (l, e) as WeightChunks rather than from its own file. */
static int cluster_streams(const cluster *c, int i, int l, int e)
{
	const struct cluster_peer *w = &c->w[i];
	return c->cfg.stream || !w->hello.has_model ||
	       (w->held && !w->held[(size_t)l * (size_t)c->spec.n_expert + (size_t)e]);
}

/* The held sets placement_build gets (c->pw[i].held): a shard file's
 * experts; NULL (no preference) for a full model file; for a worker without
 * a file, none when shard files serve the cluster and no full copy does (so
 * the shard workers keep their files' experts), else NULL as well. */
static void cluster_held_sets(cluster *c)
{
	int any_shard = 0, any_full = 0;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].lost)
			continue;
		any_shard |= c->w[i].held != NULL;
		any_full |= c->w[i].hello.has_model && !c->w[i].held;
	}
	for (int i = 0; i < c->n; i++) {
		c->pw[i].held = c->w[i].held;
		if (!c->w[i].held && !c->w[i].hello.has_model && any_shard && !any_full)
			c->pw[i].held = c->held_none;
	}
}

/* Takes a worker's Hello: a shard file must come from this model and name
 * experts it has; *held receives its table (NULL for a full model file or
 * none).  The hello's held arrays stay with the caller's message.  Returns 0,
 * or ERR_CONFIG with the reason in why. */
static int cluster_take_hello(const cluster *c, const struct wire_hello *h, uint8_t **held,
			      char *why, size_t cap)
{
	*held = NULL;
	if (!h->has_model || !h->shard_file)
		return 0;
	if (strcmp(h->model_sha, c->model_id)) {
		snprintf(why, cap,
			 "its shard file was made from another model (%s; this model is %s)",
			 h->model_sha, c->model_id);
		return ERR_CONFIG;
	}
	size_t cells = (size_t)c->spec.n_layer * (size_t)c->spec.n_expert;
	uint8_t *t = calloc(cells ? cells : 1, 1);
	if (!t) {
		snprintf(why, cap, "out of memory");
		return ERR_NOMEM;
	}
	for (uint32_t i = 0; i < h->n_held; i++) {
		uint32_t l = h->held_layer[i], e = h->held_expert[i];
		if (l >= (uint32_t)c->spec.n_layer || !c->spec.layer_moe[l] ||
		    e >= (uint32_t)c->spec.n_expert) {
			snprintf(why, cap,
				 "its shard file lists expert %u of layer %u, which this model "
				 "does not route",
				 e, l);
			free(t);
			return ERR_CONFIG;
		}
		t[(size_t)l * (size_t)c->spec.n_expert + e] = 1;
	}
	*held = t;
	return 0;
}

/* Worker i is lost (dropped with a logged reason): it gets no more Batches,
 * the batches it had not answered are dispatched again to other holders, its
 * replicas are re-created on the survivors, and anything it still sends
 * arrives from an unknown peer and is answered with Shutdown(rejoin). */
static void cluster_drop(cluster *c, int i, const char *why)
{
	struct cluster_peer *w = &c->w[i];
	if (w->lost)
		return;
	log_error("worker %d (%s): lost: %s", i, w->st.name, why);
	w->lost = 1;
	w->st.lost = 1;
	w->serving = 0;
	w->next_ok = 0;
	w->releasing = 0;
	w->sq_n = w->sq_at = 0;
	transport_drop_peer(c->t, w->peer);
	for (int b = 0; b < c->n_batches; b++)
		if (c->batches[b].worker == i && c->batches[b].state == CLUSTER_BATCH_PENDING)
			c->batches[b].state = CLUSTER_BATCH_FAILED;
	c->n_lost++;
	if (c->started)
		c->repair_due = 1;
}

static int cluster_send_shutdown(cluster *c, int peer, const char *why, int rejoin)
{
	struct wire_msg m = {.kind = WIRE_SHUTDOWN, .shutdown_rejoin = rejoin};
	snprintf(m.u.text, sizeof(m.u.text), "%s", why);
	size_t len;
	int rc = wire_encode(&m, &c->hdr, &c->hdr_cap, &len);
	return rc ? rc : transport_send(c->t, peer, c->hdr, len, NULL, 0);
}

static void cluster_rejoin(cluster *c, int peer, const struct wire_hello *h);

/* A message from a peer that is not a member: a Hello once start-up is over
 * (re)joins; anything else (a late reply of a worker dropped as lost, a
 * worker of a coordinator that restarted) is told to say Hello again. */
static void cluster_on_stranger(cluster *c, int peer, const struct wire_msg *m)
{
	if (m->kind == WIRE_HELLO && c->started) {
		cluster_rejoin(c, peer, &m->u.hello);
		return;
	}
	if (m->kind == WIRE_HELLO)
		return; /* during start-up cluster_join takes it */
	log_warn("%s: %s from a worker that is not a member ignored; it is told to rejoin",
		 transport_peer_name(c->t, peer), wire_kind_name(m->kind));
	cluster_send_shutdown(c, peer, "not a member of this cluster: say Hello again", 1);
	transport_drop_peer(c->t, peer);
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
		if (who >= 0 || m.kind != WIRE_HELLO) {
			/* a member's repeated Hello (sent again while it waited for
			 * a coordinator) is harmless; strangers are told to rejoin */
			if (who < 0)
				cluster_on_stranger(c, peer, &m);
			wire_msg_free(&m);
			continue;
		}
		struct cluster_peer *w = &c->w[c->n];
		memset(w, 0, sizeof(*w));
		char why[WIRE_MAX_NAME];
		rc = cluster_take_hello(c, &m.u.hello, &w->held, why, sizeof(why));
		if (rc) {
			/* a wrong file is a configuration error: say so at once */
			log_error("%s (%s): refused: %s", transport_peer_name(c->t, peer),
				  m.u.hello.name, why);
			cluster_send_shutdown(c, peer, why, 0);
			wire_msg_free(&m);
			return rc;
		}
		w->peer = peer;
		w->hello = m.u.hello;
		w->hello.held_layer = w->hello.held_expert = NULL;
		snprintf(w->st.name, sizeof(w->st.name), "%s", m.u.hello.name);
		log_info("worker %d joined: %s, %u cores, %.1f GiB, %s", c->n, w->st.name,
			 w->hello.cores, (double)w->hello.memory_bytes / (1 << 30),
			 w->held	      ? "has a shard file"
			 : w->hello.has_model ? "has the model"
					      : "needs the weights streamed");
		if (w->held)
			log_info("worker %d: its shard file holds %u experts", c->n,
				 m.u.hello.n_held);
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
		c->last_moe = l;
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
			bytes[l] +=
			    (uint64_t)(2 * c->spec.n_ff_exp + c->spec.n_embd) * sizeof(float);
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
	c->held_none = calloc((size_t)c->spec.n_layer * (size_t)c->spec.n_expert + 1, 1);
	if (!c->held_none)
		return ERR_NOMEM;
	cluster_held_sets(c);
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

/* madvise() on the pages holding [p, p + n); DONTNEED only on the pages
 * wholly inside (the others hold a neighbour's bytes too). */
static void cluster_advise(const void *p, uint64_t n, int advice)
{
	const uintptr_t psz = (uintptr_t)sysconf(_SC_PAGE_SIZE), a = (uintptr_t)p;
	uintptr_t lo = a & ~(psz - 1), hi = (a + n + psz - 1) & ~(psz - 1);
	if (advice == MADV_DONTNEED) {
		lo = (a + psz - 1) & ~(psz - 1);
		hi = (a + n) & ~(psz - 1);
	}
	if (p && n && hi > lo)
		madvise((void *)lo, hi - lo, advice);
}

/* The coordinator's pages of the model: the kernel reads around a fault (a
 * whole read_ahead_kb, often megabytes), which would bring in expert bytes
 * the workers hold; so faults read only their page, and the tensors the
 * coordinator uses are asked for at once, exactly, in the background. */
static void cluster_advise_pages(const gguf *g)
{
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *x = gguf_tensor_at(g, i);
		cluster_advise(x->data, x->n_bytes, MADV_RANDOM);
		if (!strstr(x->name, "_exps."))
			cluster_advise(x->data, x->n_bytes, MADV_WILLNEED);
	}
}

/* Sends one tensor slice of (l, e) to worker i, in CLUSTER_CHUNK pieces. */
static int cluster_send_slice(cluster *c, int i, int l, int e, int t, const uint8_t *src,
			      uint32_t type, uint64_t total)
{
	int rc = 0;
	for (uint64_t off = 0; off < total && !rc; off += CLUSTER_CHUNK) {
		uint64_t len = total - off < CLUSTER_CHUNK ? total - off : CLUSTER_CHUNK;
		struct wire_msg ch = {.kind = WIRE_WEIGHT_CHUNK};
		ch.u.chunk = (struct wire_weight_chunk){(uint32_t)l, (uint32_t)e, (uint32_t)t,
							type,	     off,	  total};
		rc = cluster_send(c, i, &ch, src + off, len);
	}
	return rc;
}

/* Start-up streaming: the experts workers do not take from their own file,
 * sent in file order -- tensor by tensor, expert by expert, each slice to
 * the workers that hold it -- so the coordinator reads the file
 * sequentially (the next tensor asked for while this one is sent) and every
 * link is busy at once (a layer's experts are spread over the workers; the
 * transport queues a bounded number of chunks per worker, so a slow link
 * holds back only its own).  The coordinator never needs expert bytes
 * itself: a tensor's pages are unmapped once sent, first in line for
 * reclaim. */
static int cluster_stream_initial(cluster *c, uint64_t total_bytes)
{
	const int n_t = c->spec.has_bias ? 6 : 3;
	int rc = 0;
	uint64_t done = 0;
	struct progress pr;
	progress_start(&pr, "cluster: streaming experts", total_bytes, -1, progress_now());
	for (int l = 0; l < c->spec.n_layer && !rc && total_bytes; l++) {
		if (!c->spec.layer_moe[l])
			continue;
		for (int t = 0; t < n_t && !rc; t++) {
			uint32_t type;
			uint64_t per;
			const uint8_t *src = cluster_tensor_bytes(c, l, 0, t, &type, &per);
			if (!src)
				return ERR_FORMAT;
			uint64_t whole = per * (uint64_t)c->spec.n_expert;
			cluster_advise(src, whole, MADV_WILLNEED);
			/* the next tensor is read while this one is sent */
			int l2 = t + 1 < n_t ? l : l + 1, t2 = t + 1 < n_t ? t + 1 : 0;
			uint32_t type2;
			uint64_t per2;
			const uint8_t *next =
			    l2 < c->spec.n_layer && c->spec.layer_moe[l2]
				? cluster_tensor_bytes(c, l2, 0, t2, &type2, &per2)
				: NULL;
			if (next)
				cluster_advise(next, per2 * (uint64_t)c->spec.n_expert,
					       MADV_WILLNEED);
			for (int e = 0; e < c->spec.n_expert && !rc; e++)
				for (int i = 0; i < c->n && !rc; i++) {
					if (!placement_holds(&c->plan, i, l, e) ||
					    !cluster_streams(c, i, l, e))
						continue;
					rc = cluster_send_slice(c, i, l, e, t,
								src + per * (uint64_t)e, type, per);
					c->w[i].st.streamed_bytes += per;
					done += per;
					progress_report(&pr, done, progress_now());
				}
			cluster_advise(src, whole, MADV_DONTNEED);
		}
	}
	return rc;
}

/* Epoch 1: every worker gets its Assign, then the experts it does not take
 * from its own file are streamed (cluster_stream_initial). */
static int cluster_assign(cluster *c)
{
	int rc = 0;
	uint32_t cap = (uint32_t)(c->spec.n_layer * c->spec.n_expert) + 1;
	uint32_t *pl = malloc(cap * sizeof(uint32_t)), *pe = malloc(cap * sizeof(uint32_t));
	uint32_t *n_streamed = calloc((size_t)c->n, sizeof(uint32_t));
	uint64_t to_stream = 0;
	if (!pl || !pe || !n_streamed) {
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
					if (cluster_streams(c, i, l, e)) {
						to_stream += c->expert_bytes[l];
						n_streamed[i]++;
					}
				}
		log_info("worker %d: %u experts, %.1f MiB", i, a->n_pairs,
			 (double)c->plan.worker_bytes[i] / 1048576.0);
		rc = cluster_send(c, i, &m, NULL, 0);
	}
	if (!rc)
		rc = cluster_stream_initial(c, to_stream);
	for (int i = 0; i < c->n && !rc; i++) {
		if (n_streamed[i])
			log_info("worker %d: streamed %u experts, %.1f MiB of weights", i,
				 n_streamed[i], (double)c->w[i].st.streamed_bytes / 1048576.0);
		else
			log_info("worker %d: streamed nothing (it has its experts in its file)", i);
	}
out:
	free(pl);
	free(pe);
	free(n_streamed);
	return rc;
}

/* The cluster's loading progress from the workers' Progress messages: the
 * bytes read so far over the bytes all workers that read their own file
 * will read (a worker not heard from yet counts with its placed bytes). */
static void cluster_report_load(cluster *c, struct progress *pr)
{
	uint64_t done = 0, total = 0;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].load_total) {
			done += c->w[i].load_done;
			total += c->w[i].load_total;
		} else if (!c->cfg.stream && c->w[i].hello.has_model && !c->w[i].ready) {
			total += c->plan.worker_bytes[i];
		}
	}
	pr->total = total;
	progress_report(pr, done, progress_now());
}

static int cluster_wait_ready(cluster *c)
{
	double deadline = cluster_now() + c->cfg.join_timeout_ms / 1000.0;
	int ready = 0;
	struct progress pr;
	progress_start(&pr, "cluster: reading experts", 0, -1, progress_now());
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
		if (who < 0 && m.kind == WIRE_HELLO) {
			log_warn("%s: joined after start-up; refused (the cluster is complete)",
				 transport_peer_name(c->t, peer));
			cluster_send_shutdown(c, peer, "the cluster is complete", 0);
			transport_drop_peer(c->t, peer);
		} else if (who < 0) {
			cluster_on_stranger(c, peer, &m);
		} else if (m.kind == WIRE_PROGRESS) {
			/* a worker still reading is alive: the wait restarts */
			c->w[who].load_done = m.u.progress.done;
			c->w[who].load_total = m.u.progress.total;
			deadline = cluster_now() + c->cfg.join_timeout_ms / 1000.0;
			cluster_report_load(c, &pr);
		} else if (m.kind == WIRE_READY && !c->w[who].ready) {
			c->w[who].ready = 1;
			c->w[who].serving = 1;
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
	double t0 = cluster_now();
	c->t = t;
	c->cfg = *cfg;
	c->spec = *cfg->spec;
	c->pool = p;
	if (cfg->n_workers < 1 || cfg->n_workers > 4096 || cfg->replicas < 1 ||
	    cfg->replicas > cfg->n_workers) {
		log_error("invalid cluster: %d workers, %d replicas", cfg->n_workers,
			  cfg->replicas);
		rc = ERR_CONFIG;
		goto out;
	}
	c->w = calloc((size_t)cfg->n_workers, sizeof(*c->w));
	if (!c->w) {
		rc = ERR_NOMEM;
		goto out;
	}
	c->epoch = c->epoch_seq = 1;
	c->last_layer = 1 << 30;
	if (cfg->rebalance && !(c->policy = balance_policy_find(cfg->rebalance))) {
		log_error("unknown rebalance policy '%s' (eplb, hetero, migrate)", cfg->rebalance);
		rc = ERR_CONFIG;
		goto out;
	}
	rc = cluster_layer_types(c);
	shardfile_model_id(c->cfg.g, c->model_id);
	cluster_advise_pages(c->cfg.g);
	if (!rc)
		rc = cluster_join(c);
	if (!rc)
		rc = cluster_place(c);
	if (!rc)
		rc = cluster_assign(c);
	if (!rc)
		rc = cluster_wait_ready(c);
	if (!rc)
		log_info("cluster: %d workers ready %.1f s after start", c->n, cluster_now() - t0);
	if (!rc)
		rc = cluster_grow(c, (size_t)c->n);
	c->started = 1;
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
		free(c->w[i].sq_layer);
		free(c->w[i].held);
		free(c->w[i].sq_expert);
		free(c->w[i].fit_lat);
	}
	for (int b = 0; b < c->cap_batches; b++) {
		free(c->batches[b].rows);
		free(c->batches[b].ids);
		free(c->batches[b].wts);
		free(c->batches[b].act);
	}
	free(c->batches);
	free(c->disp);
	free(c->step_ms);
	free(c->step_moving);
	free(c->step_epoch);
	free(c->step_expert_ms);
	free(c->step_tokens);
	free(c->epochs);
	placement_free(&c->plan);
	placement_free(&c->next);
	free(c->finish);
	free(c->pw);
	free(c->held_none);
	balance_counts_destroy(&c->counts);
	free(c->speed);
	free(c->visits);
	transport_destroy(&c->t);
	free(c->w);
	free(c->hdr);
	free(c);
	*pc = NULL;
}

int cluster_n_workers(const cluster *c)
{
	return c->n;
}
const placement *cluster_placement(const cluster *c)
{
	return &c->plan;
}

void cluster_get_stats(const cluster *c, int i, struct cluster_worker_stats *out)
{
	*out = c->w[i].st;
	out->rebalances = c->rebalances;
}

int cluster_n_epochs(const cluster *c)
{
	return (int)c->n_epochs + 1;
}

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
	fprintf(
	    stderr,
	    "balance: window %.0f tokens; placement now: imbalance %.3f (max/mean worker time)\n",
	    c->cfg.balance_window > 0 ? c->cfg.balance_window : 4096.0, now.imbalance);
	const struct balance_policy *pol = balance_policy_find("hetero");
	struct balance_input in = {.model = &pm,
				   .workers = c->pw,
				   .n_worker = c->n,
				   .current = &c->plan,
				   .min_replicas = c->plan.n_replica,
				   .max_replicas = c->plan.n_replica};
	placement alt;
	struct balance_stats then;
	if (pol && pol->plan(&in, &alt) == 0) {
		if (balance_predict(&alt, &pm, c->pw, NULL, &then) == 0)
			fprintf(
			    stderr,
			    "balance: policy hetero would reach imbalance %.3f, step time x%.3f, "
			    "moving %.1f MiB\n",
			    then.imbalance,
			    now.step_time > 0 ? then.step_time / now.step_time : 1.0,
			    (double)balance_moved_bytes(&c->plan, &alt, &pm) / 1048576.0);
		placement_free(&alt);
	}
}

static int cluster_cmp_pair(const void *a, const void *b)
{
	const double *x = a, *y = b;
	return (x[0] > y[0]) - (x[0] < y[0]);
}

/* A robust straight-line fit y = a + b x: the samples (x >= 0) are grouped
 * by the binary magnitude of x, each group is represented by its median x and
 * median y (one slow step in a hundred must not move the line), and the line
 * is fitted through the group medians by least squares weighted by group
 * size.  xy holds n (x, y) pairs and is reordered.  Returns the number of
 * groups (a line needs 2; with 1, *a is its median y and *b 0). */
static int cluster_fit_line(double *xy, size_t n, double *a, double *b)
{
	*a = *b = 0;
	if (!n)
		return 0;
	qsort(xy, n, 2 * sizeof(double), cluster_cmp_pair);
	double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
	int groups = 0;
	for (size_t i = 0; i < n;) {
		int mag = (int)floor(log2(xy[2 * i] + 1));
		size_t j = i;
		while (j < n && (int)floor(log2(xy[2 * j] + 1)) == mag)
			j++;
		size_t m = j - i;
		double *y = malloc(m * sizeof(double));
		if (!y)
			return 0;
		for (size_t k = 0; k < m; k++)
			y[k] = xy[2 * (i + k) + 1];
		qsort(y, m, sizeof(double), cluster_cmp_double);
		double gx = xy[2 * (i + m / 2)], gy = y[m / 2], w = (double)m;
		free(y);
		sw += w;
		sx += w * gx;
		sy += w * gy;
		sxx += w * gx * gx;
		sxy += w * gx * gy;
		groups++;
		i = j;
	}
	double den = sw * sxx - sx * sx;
	if (groups >= 2 && den > 0) {
		*b = (sw * sxy - sx * sy) / den;
		*a = (sy - *b * sx) / sw;
	} else {
		*a = sy / sw;
	}
	return groups;
}

/* A cluster file for `placement simulate` calibrated on this run, from
 * medians so that the steps it predicts are typical ones.  Each worker's
 * speed is items / compute seconds (CPU-based: what it needs with its threads
 * to itself), its latency the median over its batches of wall time (sent to
 * answered) minus compute time, transfer folded in (bandwidth set very high),
 * and its threads the ones it computes with.  The coordinator's own time per
 * step (step wall time minus the time in expert jobs) is fitted as A + B *
 * tokens (cluster_fit_line).  When the workers are local (ipc://), they and
 * the coordinator share this host's cores: `@cores N` tells the simulator so.
 * Workers are listed in cluster order, as the trace's placement numbers
 * them. */
static void cluster_print_calibration(const cluster *c)
{
	if (c->n_steps < 2)
		return;
	double *xy = malloc(2 * c->n_steps * sizeof(double)), wall = 0, a = 0, b = 0;
	if (!xy)
		return;
	for (size_t i = 0; i < c->n_steps; i++) {
		xy[2 * i] = c->step_tokens[i];
		xy[2 * i + 1] = (c->step_ms[i] - c->step_expert_ms[i]) * 1e3;
		wall += c->step_ms[i];
	}
	cluster_fit_line(xy, c->n_steps, &a, &b);
	free(xy);
	fprintf(stderr, "# calibration: %zu steps, mean step %.3f ms; a cluster file:\n",
		c->n_steps, wall / (double)c->n_steps);
	const char *ep = transport_zmq_endpoint(c->t);
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	if (ep && !strncmp(ep, "ipc://", 6) && cores > 0)
		fprintf(stderr, "@cores %ld\n", cores);
	fprintf(stderr, "# name speed(rows/s) memory latency_us bandwidth_MB_s threads\n");
	for (int i = 0; i < c->n; i++) {
		const struct cluster_worker_stats *s = &c->w[i].st;
		const struct cluster_peer *w = &c->w[i];
		double lat = 0, speed = s->speed > 0 ? s->speed : 1.0;
		if (s->batches && s->compute_seconds > 0)
			speed = (double)s->items / s->compute_seconds;
		double *l = w->n_fit ? malloc(w->n_fit * sizeof(double)) : NULL;
		if (l) {
			for (size_t k = 0; k < w->n_fit; k++)
				l[k] = w->fit_lat[k];
			qsort(l, w->n_fit, sizeof(double), cluster_cmp_double);
			lat = l[w->n_fit / 2] * 1e6;
			free(l);
		}
		fprintf(stderr, "%s %.0f %llu %.1f 100000 %u\n", s->name[0] ? s->name : "worker",
			speed,
			(unsigned long long)(w->hello.memory_bytes ? w->hello.memory_bytes : 1),
			lat > 0 ? lat : 0.0, w->hello.cores ? w->hello.cores : 1);
	}
	fprintf(stderr, "@coordinator %.1f %.3f\n", fmax(a, 0), fmax(b, 0));
}

/* Live, serving replicas in the placement in force (want == NULL), or the
 * replicas the cluster should have, R per routed expert (want != NULL). */
static int cluster_live_replicas(const cluster *c, const placement *want)
{
	int n = 0;
	for (int l = 0; l < c->spec.n_layer; l++)
		for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++) {
			if (want) {
				n += c->cfg.replicas;
				continue;
			}
			for (int r = 0; r < c->plan.n_replica; r++) {
				int h = placement_holder(&c->plan, l, e, r);
				n += h >= 0 && !c->w[h].lost && c->w[h].serving;
			}
		}
	return n;
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
		if (who < 0)
			cluster_on_stranger(c, peer, &m);
		else if (m.kind == WIRE_READY)
			cluster_on_ready(c, who, &m.u.ready);
		else if (m.kind == WIRE_ERROR)
			cluster_drop(c, who, m.u.text);
		wire_msg_free(&m);
	}
}

/* One timed step, for grouping: placement epoch, size, whether a
 * re-placement was loading, wall time. */
struct cluster_step_rec {
	uint64_t epoch;
	int32_t tokens;
	int moving;
	double ms;
};

static int cluster_cmp_step_group(const void *a, const void *b)
{
	const struct cluster_step_rec *x = a, *y = b;
	if (x->epoch != y->epoch)
		return (x->epoch > y->epoch) - (x->epoch < y->epoch);
	if (x->tokens != y->tokens)
		return (x->tokens > y->tokens) - (x->tokens < y->tokens);
	if (x->moving != y->moving)
		return x->moving - y->moving;
	return (x->ms > y->ms) - (x->ms < y->ms);
}

/* The timed steps as records (NULL if out of memory or none). */
static struct cluster_step_rec *cluster_step_recs(const cluster *c)
{
	struct cluster_step_rec *r = c->n_steps ? malloc(c->n_steps * sizeof(*r)) : NULL;
	for (size_t i = 0; r && i < c->n_steps; i++)
		r[i] = (struct cluster_step_rec){c->step_epoch[i], c->step_tokens[i],
						 c->step_moving[i], c->step_ms[i]};
	return r;
}

/* Per step size (tokens), the four most frequent: how many steps and their
 * median wall time (what `placement simulate` predicts per size). */
static void cluster_print_step_sizes(const cluster *c)
{
	struct simulate_step_size sz[4];
	int n = 0;
	if (simulate_step_sizes(c->step_tokens, c->step_ms, c->n_steps, sz, &n))
		return;
	for (int k = 0; k < n; k++)
		fprintf(stderr, "steps of %d token(s): %zu, median %.3f ms\n", (int)sz[k].tokens,
			sz[k].count, sz[k].median_ms);
}

/* What loading a re-placement cost the steps it overlapped: each such step
 * against the median quiet step of the same size (tokens) under the same
 * placement (a re-placement is loaded while the old, slower placement is in
 * force, so the run's overall median is no yardstick; groups with fewer than
 * 3 quiet steps are skipped): the median and worst ratio, and how many
 * loading and quiet steps took more than twice their group's quiet median
 * (noise hits both). */
static void cluster_print_step_spread(const cluster *c)
{
	struct cluster_step_rec *s = cluster_step_recs(c);
	double *ratio = malloc((c->n_steps + 1) * sizeof(double));
	size_t nr = 0, above = 0, quiet = 0, quiet_above = 0;
	if (s && ratio) {
		qsort(s, c->n_steps, sizeof(*s), cluster_cmp_step_group);
		for (size_t i = 0; i < c->n_steps;) {
			size_t q = i, j = i;
			while (q < c->n_steps && s[q].epoch == s[i].epoch &&
			       s[q].tokens == s[i].tokens && !s[q].moving)
				q++;
			j = q;
			while (j < c->n_steps && s[j].epoch == s[i].epoch &&
			       s[j].tokens == s[i].tokens)
				j++;
			if (q - i >= 3) {
				double base = s[i + (q - i) / 2].ms;
				for (size_t k = i; k < q; k++) {
					quiet++;
					quiet_above += s[k].ms > 2 * base;
				}
				for (size_t k = q; k < j; k++) {
					ratio[nr++] = s[k].ms / base;
					above += s[k].ms > 2 * base;
				}
			}
			i = j;
		}
	}
	if (nr) {
		qsort(ratio, nr, sizeof(double), cluster_cmp_double);
		fprintf(
		    stderr,
		    "steps while loading / quiet median of the same placement and size: %zu steps, "
		    "median %.2f, worst %.2f, %zu above 2x (quiet steps above 2x: %zu of %zu)\n",
		    nr, ratio[nr / 2], ratio[nr - 1], above, quiet_above, quiet);
	}
	free(s);
	free(ratio);
}

void cluster_print_stats(cluster *c)
{
	cluster_drain(c, 2000);
	cluster_print_balance(c);
	if (c->policy)
		fprintf(stderr,
			"balance: %llu re-placement(s) switched, %.1f MiB loaded by workers\n",
			(unsigned long long)c->rebalances, (double)c->moved_bytes / 1048576.0);
	for (int e = 0; e < cluster_n_epochs(c); e++) {
		struct cluster_epoch_stats ep;
		cluster_get_epoch(c, e, &ep);
		if (ep.steps)
			fprintf(
			    stderr,
			    "balance: epoch %llu: %llu steps, worker compute per step max %.3f ms, "
			    "mean %.3f ms, max/mean %.3f\n",
			    (unsigned long long)ep.epoch, (unsigned long long)ep.steps,
			    ep.compute_max * 1e3, ep.compute_mean * 1e3, ep.imbalance);
	}
	if (c->n_lost || c->n_rejoined)
		fprintf(
		    stderr,
		    "failover: %llu worker(s) lost, %llu joined back; %llu step(s) re-sent %llu "
		    "item(s), worst stall %.1f ms; %llu repair(s); %d of %d expert replicas "
		    "live%s\n",
		    (unsigned long long)c->n_lost, (unsigned long long)c->n_rejoined,
		    (unsigned long long)c->n_failover_steps, (unsigned long long)c->resent_items,
		    c->worst_stall * 1e3, (unsigned long long)c->n_repairs,
		    cluster_live_replicas(c, NULL), cluster_live_replicas(c, &c->plan),
		    c->next_active ? " (a re-placement is loading)" : "");
	double med, worst;
	uint64_t n_steps;
	cluster_step_times(c, &med, &worst, &n_steps);
	if (n_steps)
		fprintf(stderr,
			"steps: %llu, median %.3f ms, worst while a re-placement loaded %.3f ms\n",
			(unsigned long long)n_steps, med, worst);
	cluster_print_step_sizes(c);
	cluster_print_step_spread(c);
	fprintf(stderr, "%-4s %-20s %10s %10s %12s %12s %10s %10s %10s %8s %10s\n", "wkr", "name",
		"rows", "items", "sent", "received", "compute s", "wait s", "rows/s", "held",
		"held MiB");
	for (int i = 0; i < c->n; i++) {
		const struct cluster_worker_stats *s = &c->w[i].st;
		fprintf(
		    stderr,
		    "%-4d %-20.20s %10llu %10llu %12llu %12llu %10.3f %10.3f %10.0f %8u %10.3f%s\n",
		    i, s->name, (unsigned long long)s->rows, (unsigned long long)s->items,
		    (unsigned long long)s->bytes_sent, (unsigned long long)s->bytes_received,
		    s->compute_seconds, s->wait_seconds, s->speed, s->held_experts,
		    (double)s->held_bytes / 1048576.0, s->lost ? " LOST" : "");
	}
	uint64_t streamed = 0;
	for (int i = 0; i < c->n; i++)
		streamed += c->w[i].st.streamed_bytes;
	fprintf(stderr, "weights streamed: %llu bytes\n", (unsigned long long)streamed);
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
		fprintf(
		    stderr,
		    "placement: worker %d should hold %u experts (%u in epoch %llu, %u loading)\n",
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
	    {"moefleet_worker_compute_seconds_total", "counter",
	     "Compute time the worker reported."},
	    {"moefleet_worker_wait_seconds_total", "counter",
	     "Time the coordinator waited for the worker."},
	    {"moefleet_worker_sent_bytes_total", "counter", "Bytes sent to the worker."},
	    {"moefleet_worker_received_bytes_total", "counter", "Bytes received from the worker."},
	    {"moefleet_worker_streamed_bytes_total", "counter",
	     "Expert weight bytes streamed to the worker."},
	    {"moefleet_worker_held_experts", "gauge", "Experts the worker reports holding."},
	    {"moefleet_worker_held_bytes", "gauge", "Expert bytes the worker reports holding."},
	    {"moefleet_worker_speed_rows_per_second", "gauge",
	     "Expert rows per second used for planning."},
	    {"moefleet_worker_load", "gauge",
	     "Decayed routed rows of the experts the worker holds (shared among replicas)."},
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
			double v[] = {(double)s->rows,
				      (double)s->items,
				      s->compute_seconds,
				      s->wait_seconds,
				      (double)s->bytes_sent,
				      (double)s->bytes_received,
				      (double)s->streamed_bytes,
				      (double)s->held_experts,
				      (double)s->held_bytes,
				      s->speed,
				      wl[i],
				      s->lost ? 0.0 : 1.0};
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
	cluster_metric_head(
	    f, "moefleet_balance_measured_imbalance", "gauge",
	    "Max / mean of the workers' compute time in the placement epoch in force.");
	fprintf(f, "moefleet_balance_measured_imbalance %.9g\n", ep.imbalance);
	cluster_metric_head(
	    f, "moefleet_workers_lost_total", "counter",
	    "Workers dropped as lost (dead, silent past the time-out, or misbehaving).");
	fprintf(f, "moefleet_workers_lost_total %llu\n", (unsigned long long)c->n_lost);
	cluster_metric_head(f, "moefleet_workers_rejoined_total", "counter",
			    "Workers that joined in place of a lost one.");
	fprintf(f, "moefleet_workers_rejoined_total %llu\n", (unsigned long long)c->n_rejoined);
	cluster_metric_head(f, "moefleet_failover_steps_total", "counter",
			    "Expert jobs whose items were re-sent to surviving workers.");
	fprintf(f, "moefleet_failover_steps_total %llu\n", (unsigned long long)c->n_failover_steps);
	cluster_metric_head(f, "moefleet_failover_stall_seconds_max", "gauge",
			    "Longest expert job that re-sent items (detection + re-send).");
	fprintf(f, "moefleet_failover_stall_seconds_max %.9g\n", c->worst_stall);
	cluster_metric_head(f, "moefleet_expert_replicas_live", "gauge",
			    "Serving replicas of routed experts in the placement in force.");
	fprintf(f, "moefleet_expert_replicas_live %d\n", cluster_live_replicas(c, NULL));
	cluster_metric_head(f, "moefleet_expert_replicas_wanted", "gauge",
			    "Routed experts x the replica count asked for.");
	fprintf(f, "moefleet_expert_replicas_wanted %d\n", cluster_live_replicas(c, &c->plan));
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
	cluster_metric_head(f, "moefleet_steps_total", "counter",
			    "Forward steps through the cluster.");
	fprintf(f, "moefleet_steps_total %llu\n", (unsigned long long)n_steps);
	cluster_metric_head(f, "moefleet_step_seconds_median", "gauge",
			    "Median forward step wall time.");
	fprintf(f, "moefleet_step_seconds_median %.9g\n", med * 1e-3);
	if (per_expert && load) {
		cluster_metric_head(f, "moefleet_expert_load", "gauge",
				    "Decayed routed rows per (layer, expert).");
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				fprintf(f,
					"moefleet_expert_load{layer=\"%d\",expert=\"%d\"} %.9g\n",
					l, e, load[(size_t)l * c->spec.n_expert + e]);
	}
	return ferror(f) ? ERR_IO : 0;
}

/* ------------------------------------------------------------ dispatch */

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
static int cluster_grow(cluster *c, size_t more)
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

static void cluster_on_ready(cluster *c, int who, const struct wire_ready *r)
{
	c->w[who].st.held_experts = r->n_experts;
	c->w[who].st.held_bytes = r->bytes;
	if (r->released)
		c->w[who].releasing = 0;
	if (!r->released && c->next_active && r->placement_epoch == c->next_epoch)
		c->w[who].next_ok = 1;
}

/* Every live worker has loaded the placement being prepared. */
static int cluster_next_ready(const cluster *c)
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
static void cluster_pump(cluster *c)
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
static int cluster_send_next(cluster *c, placement *next)
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

/* Re-creates the replicas of lost workers on the live ones (or, with
 * `rebuild`, places everything anew over the live workers, so that a
 * rejoined one gets its share), as the next epoch.  Repair keeps every
 * surviving holder and adds, per expert below R live copies, the live
 * workers not holding it with memory room and the least predicted time;
 * experts that fit nowhere stay short (counted in c->unheld when they have
 * no live holder at all). */
static void cluster_plan_repair(cluster *c, int rebuild)
{
	const int L = c->spec.n_layer, X = c->spec.n_expert, R = c->plan.n_replica;
	const double *load = balance_counts_load(c->counts);
	int live = 0;
	for (int i = 0; i < c->n; i++)
		live += !c->w[i].lost;
	c->repair_due = 0;
	c->rebuild_due = 0;
	c->unheld = 0;
	if (!live)
		return;
	struct placement_worker *pw = malloc((size_t)c->n * sizeof(*pw));
	placement next = {0};
	if (!pw)
		return;
	for (int i = 0; i < c->n; i++) {
		pw[i] = c->pw[i];
		if (c->w[i].lost)
			pw[i].mem_bytes = 0;
	}
	int rc = 1;
	if (rebuild) {
		struct placement_model pm = {L, X, c->spec.layer_moe, c->expert_bytes, NULL};
		rc = placement_build(&pm, pw, c->n, R < live ? R : live, &next);
		if (!rc && next.n_replica < R) {
			placement_free(&next);
			rc = 1; /* keep the holder slots; repair instead */
		}
	}
	if (rc) {
		rc = placement_copy(&c->plan, &next);
		if (rc) {
			free(pw);
			return;
		}
		memset(next.worker_bytes, 0, (size_t)c->n * sizeof(uint64_t));
		memset(next.worker_load, 0, (size_t)c->n * sizeof(double));
		/* keep the live holders, packed */
		for (int l = 0; l < L; l++)
			for (int e = 0; e < X && c->spec.layer_moe[l]; e++) {
				int32_t *h = next.holder + ((size_t)l * X + e) * R;
				int n = 0;
				for (int r = 0; r < R; r++)
					if (h[r] >= 0 && !c->w[h[r]].lost && !c->w[h[r]].fresh)
						h[n++] = h[r];
				for (int r = n; r < R; r++)
					h[r] = -1;
				double work = (load ? load[(size_t)l * X + e] : 1.0) *
					      (double)c->expert_bytes[l];
				for (int r = 0; r < n; r++) {
					next.worker_bytes[h[r]] += c->expert_bytes[l];
					next.worker_load[h[r]] += work / R;
				}
			}
		for (int l = 0; l < L; l++)
			for (int e = 0; e < X && c->spec.layer_moe[l]; e++) {
				int32_t *h = next.holder + ((size_t)l * X + e) * R;
				double work = (load ? load[(size_t)l * X + e] : 1.0) *
					      (double)c->expert_bytes[l];
				uint64_t bytes = c->expert_bytes[l];
				int n = 0;
				while (n < R && h[n] >= 0)
					n++;
				for (; n < R && n < live; n++) {
					/* the least busy worker with room, one whose
					 * shard file holds the expert if any (as
					 * placement_build) */
					int best = -1, best_has = 0;
					double best_t = INFINITY;
					for (int i = 0; i < c->n; i++) {
						int dup = 0;
						for (int r = 0; r < n; r++)
							dup |= h[r] == i;
						if (dup || c->w[i].lost ||
						    next.worker_bytes[i] > pw[i].mem_bytes ||
						    bytes > pw[i].mem_bytes - next.worker_bytes[i])
							continue;
						int has =
						    !pw[i].held || pw[i].held[(size_t)l * X + e];
						if (best >= 0 && has != best_has) {
							if (best_has)
								continue;
							best = -1;
						}
						double t =
						    (next.worker_load[i] + work / R) / pw[i].speed;
						if (best < 0 || t < best_t) {
							best_t = t;
							best = i;
							best_has = has;
						}
					}
					if (best < 0)
						break;
					h[n] = best;
					next.worker_bytes[best] += bytes;
					next.worker_load[best] += work / R;
				}
				if (n == 0 && c->unheld++ == 0)
					log_error("layer %d expert %d: no surviving worker has "
						  "memory for it",
						  l, e);
			}
	}
	free(pw);
	if (c->unheld)
		log_error("%u expert(s) have no live holder and fit on no surviving worker: steps "
			  "that route to them fail",
			  c->unheld);
	uint64_t moved = 0;
	for (int i = 0; i < c->n; i++)
		for (int l = 0; l < L; l++)
			for (int e = 0; e < X && c->spec.layer_moe[l]; e++)
				if (!c->w[i].lost && placement_holds(&next, i, l, e) &&
				    (c->w[i].fresh || !placement_holds(&c->plan, i, l, e)))
					moved += c->expert_bytes[l];
	if (cluster_send_next(c, &next))
		return;
	c->moved_bytes += moved;
	c->n_repairs++;
	c->repair_t0 = cluster_now();
	log_info("%s: epoch %llu planned, %.1f MiB to load on %d live worker(s)",
		 rebuild ? "re-placement for a joined worker" : "replica repair",
		 (unsigned long long)c->next_epoch, (double)moved / 1048576.0, live);
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

/* Every live worker loaded the next placement: put it in force, tell each
 * worker which experts it does not need (all it may hold outside the new
 * placement: those of the old one and of superseded ones), and close the
 * statistics of the epoch.  Also between the batches of one step (a lost
 * expert reloaded): batches already sent keep their own ids, and a worker
 * computes a Batch before a Release that follows it. */
static void cluster_switch(cluster *c)
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
static void cluster_between_steps(cluster *c, int layer)
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

/* A worker said Hello after start-up: it takes the place of a lost one (the
 * cluster never grows beyond its start-up size) and gets a share of the
 * experts in the next epoch; until that epoch is in force it gets no
 * Batches. */
static void cluster_rejoin(cluster *c, int peer, const struct wire_hello *h)
{
	int i = 0;
	while (i < c->n && !c->w[i].lost)
		i++;
	if (i == c->n) {
		log_warn("%s (%s): joined, but no worker is missing; refused",
			 transport_peer_name(c->t, peer), h->name);
		cluster_send_shutdown(c, peer, "the cluster is complete", 0);
		transport_drop_peer(c->t, peer);
		return;
	}
	struct cluster_peer *w = &c->w[i];
	uint8_t *held;
	char why[WIRE_MAX_NAME];
	if (cluster_take_hello(c, h, &held, why, sizeof(why))) {
		log_error("%s (%s): refused: %s", transport_peer_name(c->t, peer), h->name, why);
		cluster_send_shutdown(c, peer, why, 0);
		transport_drop_peer(c->t, peer);
		return;
	}
	free(w->held);
	w->held = held;
	w->peer = peer;
	w->hello = *h;
	w->hello.held_layer = w->hello.held_expert = NULL;
	w->lost = 0;
	cluster_held_sets(c);
	w->st.lost = 0;
	w->ready = 1;
	w->serving = 0;
	w->fresh = 1;
	w->next_ok = 0;
	w->releasing = 0;
	w->st.held_experts = 0;
	w->st.held_bytes = 0;
	snprintf(w->st.name, sizeof(w->st.name), "%s", h->name);
	c->pw[i].mem_bytes = h->memory_bytes;
	c->n_rejoined++;
	/* at once, superseding a placement being loaded (the newcomer was not
	 * sent its Assign, so that one could never become ready) */
	c->rebuild_due = 1;
	c->repair_due = 1;
	log_info("worker %d (%s) joined in place of a lost worker: %u cores, %.1f GiB, %s", i,
		 w->st.name, h->cores, (double)h->memory_bytes / (1 << 30),
		 h->has_model ? "has the model" : "needs the weights streamed");
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
