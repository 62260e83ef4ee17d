/* cluster KV hosts: the cluster's workers as the KV hosts of the sharded
 * attention (attn.h, attn_remote_ops).  A complete page goes to the host of its
 * chain as one KvPage (keys then values in the raw frame), each layer's rows
 * to every host that holds a page some row sees as one AttnBatch (the queries
 * in F32), and the AttnResults come back in any order.  DeepSeek-V4's indexer
 * keys travel the same way (KvPage of kind WIRE_KV_IDX, IdxBatch with the
 * queries and head weights, IdxResult with the scores).  A sequence that
 * restarts (a finished request's slot) is one KvFree to every host, which
 * drops its pages of every layer.  Only the coordinator
 * holds the tail of each sequence, so a lost host takes pages that exist
 * nowhere else: the step fails with an error naming the host, never waits
 * past the worker time-out; cluster_kv_hosts() again gives the chains to the
 * hosts left, and the sequences are computed again from their ids. */
#include "cluster_internal.h"
#include "../model/indexer.h"
#include "../../common/err.h"
#include "../../common/log.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A host that has not answered its AttnBatch is probed this often (seconds). */
#define KV_PROBE_S 0.1

/* 0 while host h's worker lives, else a logged ERR_PEER. */
static int kv_live(cluster *c, int h)
{
	if (h < 0 || h >= c->kv_hosts || c->w[c->kv_w[h]].lost) {
		log_error("KV host %d (worker %d) is lost: the pages of its attention chains are "
			  "gone, and the sequences that use them must be computed again",
			  h, h >= 0 && h < c->kv_hosts ? c->kv_w[h] : -1);
		c->kv_lost = 1;
		return ERR_PEER;
	}
	return 0;
}

/* The host index of worker w, or -1. */
static int kv_host_of(const cluster *c, int w)
{
	for (int h = 0; h < c->kv_hosts; h++)
		if (c->kv_w[h] == w)
			return h;
	return -1;
}

/* The statistics of (layer, host h), or NULL when none are kept. */
static struct cluster_kv_link *kv_link(cluster *c, int layer, int h)
{
	if (!c->kv_link || layer < 0 || layer >= c->spec.n_layer || h < 0)
		return NULL;
	return &c->kv_link[(size_t)layer * ATTN_MAX_HOSTS + (size_t)h];
}

static int kv_send(cluster *c, int h, const struct wire_msg *m, const void *data, size_t n)
{
	int rc = kv_live(c, h);
	if (rc)
		return rc;
	if (cluster_send(c, c->kv_w[h], m, data, n)) {
		cluster_drop(c, c->kv_w[h], "cannot send");
		return kv_live(c, h);
	}
	return 0;
}

/* c->kv_buf of at least `bytes` bytes. */
static int kv_buf_reserve(cluster *c, size_t bytes)
{
	if (bytes > c->kv_buf_cap) {
		uint8_t *p = realloc(c->kv_buf, bytes);
		if (!p)
			return ERR_NOMEM;
		c->kv_buf = p;
		c->kv_buf_cap = bytes;
	}
	return 0;
}

/* One KvPage: frame keys [n_pos][k_width] then values [n_pos][v_width] (none
 * when v_width is 0). */
static int kv_send_page(cluster *c, int host, const struct wire_kv_page *pg, const uint16_t *k,
			const uint16_t *v)
{
	const size_t nk = (size_t)pg->n_pos * pg->k_width, nv = (size_t)pg->n_pos * pg->v_width;
	const size_t bytes = (nk + nv) * sizeof(uint16_t);
	if (kv_buf_reserve(c, bytes))
		return ERR_NOMEM;
	memcpy(c->kv_buf, k, nk * sizeof(uint16_t));
	if (nv)
		memcpy(c->kv_buf + nk * sizeof(uint16_t), v, nv * sizeof(uint16_t));
	struct wire_msg m = {.kind = WIRE_KV_PAGE};
	m.u.kv_page = *pg;
	int rc = kv_send(c, host, &m, c->kv_buf, bytes);
	struct cluster_kv_link *s = kv_link(c, (int)pg->layer, host);
	if (!rc) {
		c->w[c->kv_w[host]].st.kv_pages++;
		c->w[c->kv_w[host]].st.kv_bytes += bytes;
	}
	if (!rc && s) {
		s->pages++;
		s->page_bytes += bytes;
	}
	return rc;
}

static int kv_ship(void *self, int host, int layer, int seq, int page, int n_pos, int k_width,
		   int v_width, const uint16_t *k, const uint16_t *v)
{
	const struct wire_kv_page pg = {(uint32_t)layer, (uint32_t)seq,	    (uint32_t)page,
					(uint32_t)n_pos, (uint32_t)k_width, (uint32_t)v_width,
					WIRE_KV_ATTN};
	return kv_send_page(self, host, &pg, k, v);
}

static int kv_idx_ship(void *self, int host, int layer, int seq, int page, int n_ent, int dim,
		       const uint16_t *k)
{
	const struct wire_kv_page pg = {(uint32_t)layer, (uint32_t)seq, (uint32_t)page,
					(uint32_t)n_ent, (uint32_t)dim, 0,
					WIRE_KV_IDX};
	return kv_send_page(self, host, &pg, k, NULL);
}

/* One KvFree to every host: each drops seq's pages.  On the channel of its
 * pages, so it reaches a host after them and before any page shipped later. */
static int kv_free_seq(void *self, int seq)
{
	cluster *c = self;
	struct wire_msg m = {.kind = WIRE_KV_FREE};
	m.u.kv_free.seq = (uint32_t)seq;
	int rc = 0;
	for (int h = 0; h < c->kv_hosts; h++) {
		const int r = kv_send(c, h, &m, NULL, 0);
		rc = rc ? rc : r;
	}
	return rc;
}

/* A batch of n_rows rows of layer (an IdxBatch when idx) went to host at
 * step: its sending began at t0, with the host's bytes sent at `sent`. */
static void kv_asked(cluster *c, int host, int layer, uint64_t step, int n_rows, int idx, double t0,
		     uint64_t sent)
{
	struct cluster_peer *w = &c->w[c->kv_w[host]];
	c->kv_asked[host] = step;
	c->kv_rows = n_rows;
	c->kv_idx = idx;
	c->kv_sent[host] = cluster_now();
	w->last_probe = c->kv_sent[host]; /* the batch was one */
	w->st.kv_batches++;
	struct cluster_kv_link *s = kv_link(c, layer, host);
	if (s) {
		s->batches++;
		s->msgs_out++;
		s->bytes_out += w->st.bytes_sent - sent;
		c->kv_layer[layer].send += c->kv_sent[host] - t0;
	}
}

static int kv_submit(void *self, int host, int layer, const struct attn_params *ap, int page,
		     int n_shard, int v0, int v1, const model_batch *b, const float *q)
{
	cluster *c = self;
	struct wire_msg m = {.kind = WIRE_ATTN_BATCH};
	m.u.attn_batch = (struct wire_attn_batch){
	    .step = ++c->step,
	    .layer = (uint32_t)layer,
	    .n_rows = (uint32_t)b->n_tokens,
	    .n_head = (uint32_t)ap->n_head,
	    .n_head_kv = (uint32_t)ap->n_head_kv,
	    .head_dim_k = (uint32_t)ap->head_dim_k,
	    .head_dim_v = (uint32_t)ap->head_dim_v,
	    .scale = ap->scale,
	    .page = (uint32_t)page,
	    .n_shard = (uint32_t)n_shard,
	    .v0 = (uint32_t)v0,
	    .v1 = (uint32_t)v1,
	    .seq = (int32_t *)b->seq,
	    .pos = (int32_t *)b->pos,
	};
	const size_t bytes = wire_attn_batch_frame_bytes(&m.u.attn_batch);
	const double t0 = cluster_now();
	const uint64_t sent = c->w[c->kv_w[host]].st.bytes_sent;
	int rc = kv_send(c, host, &m, q, bytes);
	if (rc)
		return rc;
	kv_asked(c, host, layer, m.u.attn_batch.step, b->n_tokens, 0, t0, sent);
	c->kv_heads = ap->n_head;
	c->kv_dv = ap->head_dim_v;
	return 0;
}

static int kv_idx_submit(void *self, int host, int layer, int n_head, int dim, int page,
			 int n_shard, int v0, int v1, const model_batch *b, const float *q,
			 const float *w)
{
	cluster *c = self;
	struct wire_msg m = {.kind = WIRE_IDX_BATCH};
	m.u.idx_batch = (struct wire_idx_batch){
	    .step = ++c->step,
	    .layer = (uint32_t)layer,
	    .n_rows = (uint32_t)b->n_tokens,
	    .n_head = (uint32_t)n_head,
	    .dim = (uint32_t)dim,
	    .page = (uint32_t)page,
	    .n_shard = (uint32_t)n_shard,
	    .v0 = (uint32_t)v0,
	    .v1 = (uint32_t)v1,
	    .seq = (int32_t *)b->seq,
	    .pos = (int32_t *)b->pos,
	};
	/* the frame: queries, then weights */
	const size_t nq = (size_t)b->n_tokens * (size_t)n_head * (size_t)dim;
	const size_t nw = (size_t)b->n_tokens * (size_t)n_head;
	const size_t bytes = wire_idx_batch_frame_bytes(&m.u.idx_batch);
	if (kv_buf_reserve(c, bytes))
		return ERR_NOMEM;
	memcpy(c->kv_buf, q, nq * sizeof(float));
	memcpy(c->kv_buf + nq * sizeof(float), w, nw * sizeof(float));
	const double t0 = cluster_now();
	const uint64_t sent = c->w[c->kv_w[host]].st.bytes_sent;
	int rc = kv_send(c, host, &m, c->kv_buf, bytes);
	if (rc)
		return rc;
	size_t n_scores = 0;
	for (int t = 0; t < b->n_tokens; t++)
		n_scores += indexer_row_scores(b->pos[t], page, n_shard, v0, v1);
	kv_asked(c, host, layer, m.u.idx_batch.step, b->n_tokens, 1, t0, sent);
	c->kv_scores[host] = n_scores;
	return 0;
}

/* A message from worker `who` received while waiting for layer's
 * AttnResults: 1 when it was the answer of a host (copied into its buffer), 0
 * otherwise, or an error. */
static int kv_take(cluster *c, int layer, int who, const struct wire_msg *m, const uint8_t *data,
		   size_t n)
{
	const int h = kv_host_of(c, who);
	struct cluster_kv_link *s = kv_link(c, layer, h);
	if (s)
		s->msgs_in++;
	if (m->kind == WIRE_ATTN_RESULT || m->kind == WIRE_IDX_RESULT) {
		const int idx = m->kind == WIRE_IDX_RESULT;
		const struct wire_attn_result *r = &m->u.attn_result;
		const struct wire_idx_result *ir = &m->u.idx_result;
		const uint64_t step = idx ? ir->step : r->step;
		if (h < 0 || !c->kv_asked[h] || step != c->kv_asked[h] || idx != c->kv_idx) {
			log_warn("worker %d: stale %s result for step %llu ignored", who,
				 idx ? "indexer" : "attention", (unsigned long long)step);
			return 0;
		}
		if (idx ? ir->n_rows != (uint32_t)c->kv_rows || ir->n_scores != c->kv_scores[h] ||
			      n != wire_idx_result_frame_bytes(ir)
			: r->n_rows != (uint32_t)c->kv_rows || r->n_head != (uint32_t)c->kv_heads ||
			      r->head_dim_v != (uint32_t)c->kv_dv ||
			      n != wire_attn_result_frame_bytes(r)) {
			cluster_drop(c, who,
				     idx ? "indexer result does not match its batch"
					 : "attention result does not match its batch");
			return kv_live(c, h);
		}
		if (n > c->kv_part_cap[h]) {
			float *p = realloc(c->kv_part[h], n);
			if (!p)
				return ERR_NOMEM;
			c->kv_part[h] = p;
			c->kv_part_cap[h] = n;
		}
		memcpy(c->kv_part[h], data, n);
		c->kv_asked[h] = 0;
		c->w[who].st.attn_rows += idx ? ir->n_rows : r->n_rows;
		c->w[who].st.attn_seconds += idx ? ir->compute_seconds : r->compute_seconds;
		if (s)
			s->compute += idx ? ir->compute_seconds : r->compute_seconds;
		c->w[who].st.wait_seconds += cluster_now() - c->kv_sent[h];
		return 1;
	}
	if (m->kind == WIRE_ERROR) {
		log_error("worker %d: %s", who, m->u.text);
		cluster_drop(c, who, m->u.text);
		return h >= 0 ? kv_live(c, h) : 0;
	}
	if (m->kind == WIRE_READY)
		cluster_on_ready(c, who, &m->u.ready);
	return 0; /* heartbeats, statistics, stale expert results */
}

static int kv_collect(void *self, int layer, const float **parts)
{
	cluster *c = self;
	int waiting = 0, asked[ATTN_MAX_HOSTS];
	uint64_t got[ATTN_MAX_HOSTS], sent[ATTN_MAX_HOSTS];
	const double t0 = cluster_now();
	for (int h = 0; h < c->kv_hosts; h++) {
		asked[h] = c->kv_asked[h] != 0;
		waiting += asked[h];
		got[h] = c->w[c->kv_w[h]].st.bytes_received;
		sent[h] = c->w[c->kv_w[h]].st.bytes_sent;
	}
	int rc = 0;
	while (waiting > 0 && !rc) {
		/* probes (at most one per host every KV_PROBE_S: each answer
		 * ends the wait below) and time-outs, as an expert step has them */
		double now = cluster_now(), wake = now + KV_PROBE_S;
		for (int h = 0; h < c->kv_hosts && !rc; h++) {
			if (!c->kv_asked[h])
				continue;
			if (now >= c->kv_sent[h] + c->cfg.timeout_ms / 1000.0) {
				cluster_drop(c, c->kv_w[h], "no answer within the worker time-out");
				rc = kv_live(c, h);
				break;
			}
			struct cluster_peer *w = &c->w[c->kv_w[h]];
			if (now - w->last_probe >= KV_PROBE_S) {
				struct wire_msg hb = {.kind = WIRE_HEARTBEAT};
				hb.u.heartbeat_nonce = c->step;
				w->last_probe = now;
				if (cluster_send(c, c->kv_w[h], &hb, NULL, 0)) {
					cluster_drop(c, c->kv_w[h], "connection lost");
					rc = kv_live(c, h);
				} else if (kv_link(c, layer, h)) {
					kv_link(c, layer, h)->msgs_out++;
				}
			}
			wake = fmin(wake, w->last_probe + KV_PROBE_S);
		}
		if (rc)
			break;
		struct wire_msg m;
		const uint8_t *data;
		size_t n;
		int peer, who;
		int left = (int)ceil((wake - cluster_now()) * 1000.0);
		int r = cluster_recv(c, left > 0 ? left : 0, &m, &peer, &who, &data, &n);
		if (r == ERR_PROTO || r == ERR_PEER)
			continue;
		if (r) {
			rc = r;
			break;
		}
		if (who < 0) {
			cluster_on_stranger(c, peer, &m);
		} else {
			r = kv_take(c, layer, who, &m, data, n);
			if (r < 0)
				rc = r;
			else
				waiting -= r;
		}
		wire_msg_free(&m);
	}
	for (int h = 0; h < c->kv_hosts; h++) {
		c->kv_asked[h] = 0;
		parts[h] = asked[h] ? c->kv_part[h] : NULL; /* buffers move as they grow */
		struct cluster_kv_link *s = kv_link(c, layer, h);
		if (s) {
			s->bytes_in += c->w[c->kv_w[h]].st.bytes_received - got[h];
			s->bytes_out += c->w[c->kv_w[h]].st.bytes_sent - sent[h];
		}
	}
	if (kv_link(c, layer, 0))
		c->kv_layer[layer].wait += cluster_now() - t0;
	return rc;
}

static void kv_account(void *self, int layer, int n_rows, double own_s, double merge_s)
{
	cluster *c = self;
	if (!kv_link(c, layer, 0))
		return;
	struct cluster_kv_layer *s = &c->kv_layer[layer];
	s->steps++;
	s->rows += (uint64_t)n_rows;
	s->own += own_s;
	s->merge += merge_s;
}

/* What the worker offered in its Hello; memory it shares with its experts
 * less the expert bytes it reports holding. */
static uint64_t kv_budget(void *self, int host)
{
	const cluster *c = self;
	const struct cluster_peer *w = &c->w[c->kv_w[host]];
	if (!w->hello.kv_shared)
		return w->hello.kv_bytes;
	const uint64_t left =
	    w->hello.memory_bytes > w->st.held_bytes ? w->hello.memory_bytes - w->st.held_bytes : 0;
	return left < w->hello.kv_bytes ? left : w->hello.kv_bytes;
}

static const struct attn_remote_ops kv_ops = {.ship = kv_ship,
					      .submit = kv_submit,
					      .collect = kv_collect,
					      .budget = kv_budget,
					      .idx_ship = kv_idx_ship,
					      .idx_submit = kv_idx_submit,
					      .account = kv_account,
					      .free_seq = kv_free_seq};

int cluster_kv_hosts(cluster *c, int n_shard, int want, const struct attn_remote_ops **ops,
		     int *n_hosts)
{
	int live = 0, w[ATTN_MAX_HOSTS];
	/* KV-only workers first: they have nothing else to do */
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < c->n && live < ATTN_MAX_HOSTS; i++)
			if (!c->w[i].lost && c->w[i].hello.kv_bytes > 0 &&
			    cluster_holds_experts(c, i) == pass)
				w[live++] = i;
	int r = 1;
	while (2 * r <= live && 2 * r <= n_shard && (want <= 0 || 2 * r <= want))
		r *= 2;
	if (live == 0 || r > n_shard) {
		log_error(
		    "no live worker offers memory for KV pages (moefleet-worker --kv-memory)");
		return ERR_CONFIG;
	}
	if (!c->kv_layer && c->spec.n_layer > 0) { /* kept across changes of hosts */
		c->kv_layer = calloc((size_t)c->spec.n_layer, sizeof(*c->kv_layer));
		c->kv_link = calloc((size_t)c->spec.n_layer * ATTN_MAX_HOSTS, sizeof(*c->kv_link));
		if (!c->kv_layer || !c->kv_link) {
			free(c->kv_layer);
			free(c->kv_link);
			c->kv_layer = NULL;
			c->kv_link = NULL;
			return ERR_NOMEM;
		}
	}
	memcpy(c->kv_w, w, (size_t)r * sizeof(int));
	c->kv_hosts = r;
	c->kv_lost = 0;
	*ops = &kv_ops;
	*n_hosts = r;
	log_info("KV hosts: %d worker(s) from worker %d hold the pages of %d attention chain(s) "
		 "each",
		 r, w[0], n_shard / r);
	for (int h = 0; h < r; h++)
		log_info("KV host %d: worker %d (%s)%s", h, w[h], c->w[w[h]].st.name,
			 cluster_holds_experts(c, w[h]) ? "" : ", KV-only");
	return 0;
}

int cluster_kv_lost(const cluster *c)
{
	return c->kv_lost;
}

int cluster_kv_lost_host(const cluster *c, int *worker)
{
	for (int h = 0; h < c->kv_hosts; h++) {
		if (c->w[c->kv_w[h]].lost) {
			*worker = c->kv_w[h];
			return h;
		}
	}
	*worker = -1;
	return -1;
}
