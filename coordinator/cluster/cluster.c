/* cluster: start-up and lifetime -- workers join, the first placement, the
 * initial streaming of weights, the messages to and from workers, and the
 * accessors of cluster.h.  The other parts of the cluster backend are in
 * membership.c, epoch.c, dispatch.c and report.c (see cluster_internal.h). */
#define _GNU_SOURCE /* madvise */
#include "cluster_internal.h"
#include "../placement/balance.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../common/progress.h"
#include "../../common/shard.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdio.h>

double cluster_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int cluster_send(cluster *c, int i, const struct wire_msg *m, const void *data, size_t n)
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
int cluster_streams(const cluster *c, int i, int l, int e)
{
	const struct cluster_peer *w = &c->w[i];
	return c->cfg.stream || !w->hello.has_model ||
	       (w->held && !w->held[(size_t)l * (size_t)c->spec.n_expert + (size_t)e]);
}

/* The held sets placement_build gets (c->pw[i].held): a shard file's
 * experts; NULL (no preference) for a full model file; for a worker without
 * a file, none when shard files serve the cluster and no full copy does (so
 * the shard workers keep their files' experts), else NULL as well. */
void cluster_held_sets(cluster *c)
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

int cluster_send_shutdown(cluster *c, int peer, const char *why, int rejoin)
{
	struct wire_msg m = {.kind = WIRE_SHUTDOWN, .shutdown_rejoin = rejoin};
	snprintf(m.u.text, sizeof(m.u.text), "%s", why);
	size_t len;
	int rc = wire_encode(&m, &c->hdr, &c->hdr_cap, &len);
	return rc ? rc : transport_send(c->t, peer, c->hdr, len, NULL, 0);
}

/* Receives one decoded message from any peer; *who = worker index or -1 for
 * an unknown peer.  ERR_PEER on time-out. */
int cluster_recv(cluster *c, int timeout_ms, struct wire_msg *m, int *peer, int *who,
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
			 !w->hello.memory_bytes ? "KV-only"
			 : w->held		? "has a shard file"
			 : w->hello.has_model	? "has the model"
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

int cluster_holds_experts(const cluster *c, int i)
{
	return c->w[i].hello.memory_bytes > 0;
}

static int cluster_place(cluster *c)
{
	int holders = 0;
	for (int i = 0; i < c->n; i++)
		holders += cluster_holds_experts(c, i);
	if (holders < c->cfg.replicas) {
		log_error("%d of the %d workers offer memory for experts (%d are KV-only: "
			  "moefleet-worker --kv-only), too few for %d cop%s of each expert; this "
			  "coordinator computes no routed experts itself: start workers without "
			  "--kv-only",
			  holders, c->n, c->n - holders, c->cfg.replicas,
			  c->cfg.replicas > 1 ? "ies" : "y");
		return ERR_CONFIG;
	}
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

const uint8_t *cluster_tensor_bytes(cluster *c, int l, int e, int t, uint32_t *type, uint64_t *n)
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
		else if (cluster_holds_experts(c, i))
			log_info("worker %d: streamed nothing (it has its experts in its file)", i);
		else
			log_info("worker %d: KV-only, holds no experts", i);
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
	for (int h = 0; h < ATTN_MAX_HOSTS; h++)
		free(c->kv_part[h]);
	free(c->kv_buf);
	free(c->kv_layer);
	free(c->kv_link);
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
