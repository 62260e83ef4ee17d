/* attn_host: the sharded numerics' chains on KV hosts (see attn.h).
 *
 * The host's side: attn_host_forward() runs the tiled kernel over the pages a
 * host was sent, chains [v0, v1) merged in their subtree of the fixed tree,
 * and answers a partial [M, S, acc] per (row, head).  The coordinator's side:
 * attn_cache_set_remote() and what admission needs (attn_cache_kv_room), the
 * pages completed shipped to their hosts and released here, and
 * attn_forward()'s path with hosts: each row's own page here while the hosts
 * compute, then the hosts' partials merged in host order, the own page, the
 * sink.  The kernels and the tree are attn.c's (attn_internal.h), so a row
 * gets the same bits as without hosts. */
#define _DEFAULT_SOURCE /* madvise */
#include "attn.h"
#include "attn_internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../../common/err.h"
#include "../../common/log.h"

/* A partial [M, S, acc] of ng heads, dv values each, into r (and back). */
static void attn_run_load(struct attn_run *r, const float *part, int ng, int dv)
{
	for (int g = 0; g < ng; g++) {
		const float *pg = part + (size_t)g * ATTN_PART_FLOATS(dv);
		r->M[g] = pg[0];
		r->S[g] = pg[1];
		memcpy(r->acc + (size_t)g * (size_t)dv, pg + 2, (size_t)dv * sizeof(float));
	}
}

static void attn_run_store(const struct attn_run *r, int ng, int dv, float *part)
{
	for (int g = 0; g < ng; g++) {
		float *pg = part + (size_t)g * ATTN_PART_FLOATS(dv);
		pg[0] = r->M[g];
		pg[1] = r->S[g];
		memcpy(pg + 2, r->acc + (size_t)g * (size_t)dv, (size_t)dv * sizeof(float));
	}
}

/* ------------------------------------------------------ the host's side */

/* One pool thread's scratch of attn_host_forward(). */
struct attn_host_thread {
	struct attn_kvf tile; /* its tile buffer (attn_kvf_tile) */
	struct attn_kvf *pkv; /* [n_pkv] F32 copies of pages, by page number */
	int n_pkv;
};

struct attn_host_scratch {
	struct attn_host_thread *th; /* [n_th] */
	int n_th;
};

void attn_host_scratch_destroy(attn_host_scratch **s)
{
	if (!s || !*s)
		return;
	for (int i = 0; i < (*s)->n_th; i++) {
		struct attn_host_thread *t = &(*s)->th[i];
		free(t->tile.tile);
		for (int j = 0; j < t->n_pkv; j++) {
			free(t->pkv[j].kt);
			free(t->pkv[j].v);
		}
		free(t->pkv);
	}
	free((*s)->th);
	free(*s);
	*s = NULL;
}

/* Makes s hold n_th threads' scratch with n_pkv page slots each (when
 * n_pkv > 0); the buffers grow when used.  0 or ERR_NOMEM (s still valid). */
static int attn_host_scratch_grow(attn_host_scratch *s, int n_th, int n_pkv)
{
	if (n_th > s->n_th) {
		struct attn_host_thread *p = realloc(s->th, (size_t)n_th * sizeof(*p));
		if (!p)
			return ERR_NOMEM;
		memset(p + s->n_th, 0, (size_t)(n_th - s->n_th) * sizeof(*p));
		s->th = p;
		s->n_th = n_th;
	}
	for (int i = 0; i < n_th; i++) {
		struct attn_host_thread *t = &s->th[i];
		if (n_pkv <= t->n_pkv)
			continue;
		struct attn_kvf *p = realloc(t->pkv, (size_t)n_pkv * sizeof(*p));
		if (!p)
			return ERR_NOMEM;
		memset(p + t->n_pkv, 0, (size_t)(n_pkv - t->n_pkv) * sizeof(*p));
		t->pkv = p;
		t->n_pkv = n_pkv;
	}
	return 0;
}

struct attn_host_ctx {
	const struct attn_host_job *job;
	attn_host_scratch *s; /* or NULL: the scalar loops, no copies */
	int max_pages;	      /* page copies per thread (0: none) */
};

static void attn_host_worker(void *ctx, int ith, int nth)
{
	const struct attn_host_ctx *hc = ctx;
	const struct attn_host_job *job = hc->job;
	const struct attn_params *ap = job->ap;
	const int dk = ap->head_dim_k, dv = ap->head_dim_v;
	struct attn_host_thread *th = hc->s ? &hc->s->th[ith] : NULL;
	float *tile = th ? attn_kvf_tile(&th->tile, dk, dv) : NULL;
	struct attn_kvf *pkv = tile && hc->max_pages > 0 ? th->pkv : NULL;
	for (int i = 0; pkv && i < hc->max_pages; i++) { /* other pages than last time */
		pkv[i].kbase = NULL;
		pkv[i].n = 0;
	}
	int64_t lo, hi;
	pool_split(attn_units(ap, job->n_rows), ith, nth, 1, &lo, &hi);
	for (int64_t u = lo; u < hi; u++) {
		int r, h0, ng;
		attn_unit(ap, job->n_rows, u, &r, &h0, &ng);
		const int hkv = h0 / (ap->n_head / ap->n_head_kv);
		const struct attn_src src = {.ks = (size_t)job->k_width,
					     .vs = (size_t)job->v_stride,
					     .dk = dk,
					     .dv = dv,
					     .cap = job->page};
		const float *q =
		    job->q + ((size_t)r * (size_t)ap->n_head + (size_t)h0) * (size_t)dk;
		struct attn_tree tr = {.n = 0};
		attn_chains(&src, job->pages[r], (size_t)hkv * (size_t)dk, (size_t)hkv * (size_t)dv,
			    NULL, pkv, tile, job->page, job->n_shard, job->v0, job->v1,
			    job->pos[r] / job->page, q, ng, ap->scale, &tr);
		attn_run_store(&tr.st[0], ng, dv,
			       job->part + ((size_t)r * (size_t)ap->n_head + (size_t)h0) *
					       ATTN_PART_FLOATS(dv));
	}
}

int attn_host_forward(pool *p, const struct attn_host_job *job)
{
	const int V = job->n_shard, P = job->page, w = job->v1 - job->v0;
	const struct attn_params *ap = job->ap;
	if (V <= 0 || V > (1 << (ATTN_SHARD_LEVELS - 1)) || (V & (V - 1)) || P <= 0 ||
	    P % ATTN_TILE_KV || w <= 0 || (w & (w - 1)) || job->v0 % w || job->v1 > V) {
		log_error("attn: chains %d..%d of %d over pages of %d positions: not an aligned "
			  "subtree",
			  job->v0, job->v1 - 1, V, P);
		return ERR_RANGE;
	}
	if (ap->head_dim_k > ATTN_MAX_HEAD_DIM || ap->head_dim_v > ATTN_MAX_HEAD_DIM ||
	    ap->n_head_kv <= 0 || ap->n_head % ap->n_head_kv ||
	    (int64_t)ap->n_head_kv * ap->head_dim_k > job->k_width ||
	    (int64_t)ap->n_head_kv * ap->head_dim_v > job->v_stride) {
		log_error("attn: %d heads over %d KV heads of %d/%d values do not fit pages of "
			  "%d/%d values",
			  ap->n_head, ap->n_head_kv, ap->head_dim_k, ap->head_dim_v, job->k_width,
			  job->v_stride);
		return ERR_RANGE;
	}
	for (int r = 0; r < job->n_rows; r++) {
		if (job->pos[r] < 0) {
			log_error("attn: row %d at position %d", r, job->pos[r]);
			return ERR_RANGE;
		}
		const int n_page = job->pos[r] / P;
		for (int i = 0; i < n_page; i++)
			if (i % V >= job->v0 && i % V < job->v1 &&
			    (i >= job->n_pages[r] || !job->pages[r][i].k || !job->pages[r][i].v)) {
				log_error("attn: row %d at position %d needs page %d, which is "
					  "not here",
					  r, job->pos[r], i);
				return ERR_RANGE;
			}
	}
	attn_f16_init();
	struct attn_host_ctx hc = {.job = job};
	/* prompt rows: each thread converts a page once for all its rows */
	for (int r = 0; r < job->n_rows && job->n_rows >= ATTN_TILE_Q; r++)
		if (job->n_pages[r] > hc.max_pages)
			hc.max_pages = job->n_pages[r];
	attn_host_scratch *tmp = NULL, **s = job->scratch ? job->scratch : &tmp;
	if (!*s)
		*s = calloc(1, sizeof(**s));
	/* without memory for it, the scalar loops give the same bits */
	if (*s && attn_host_scratch_grow(*s, pool_size(p), hc.max_pages) == 0)
		hc.s = *s;
	pool_run(p, attn_host_worker, &hc);
	attn_host_scratch_destroy(&tmp);
	return 0;
}

/* ----------------------------------------------- the coordinator's side */

int attn_cache_set_remote(attn_cache *c, const struct attn_remote_ops *ops, void *self, int n_hosts)
{
	if (n_hosts == 0) {
		c->remote = NULL;
		c->n_hosts = 0;
		return 0;
	}
	if (!ops || c->n_shard == 0 || n_hosts < 0 || n_hosts > c->n_shard ||
	    (n_hosts & (n_hosts - 1)) != 0) {
		log_error("attn: %d KV hosts for %d chains: need sharded numerics and a power of "
			  "two of hosts dividing the chains",
			  n_hosts, c->n_shard);
		return ERR_CONFIG;
	}
	if (!c->shipped) {
		c->shipped = calloc(2 * (size_t)c->n_layer * (size_t)c->n_seq, sizeof(int32_t));
		if (!c->shipped)
			return ERR_NOMEM;
	}
	if (!c->own) {
		c->own = calloc(1, sizeof(*c->own));
		if (!c->own)
			return ERR_NOMEM;
	}
	/* the most a host holds for one sequence: the complete pages of its
	 * chains, every full layer, each page with its entry in the host's page
	 * table, and an entry per layer */
	const int max_page = (c->n_ctx - 1) / c->page, per = c->n_shard / n_hosts;
	uint64_t layers = 0;
	for (int l = 0; l < c->n_layer; l++)
		layers += c->cap[l] == c->n_ctx;
	const uint64_t page_bytes = (uint64_t)c->page *
					(uint64_t)(c->k_width + (c->v == c->k ? 0 : c->v_width)) *
					sizeof(uint16_t) +
				    sizeof(struct attn_page);
	for (int h = 0; h < n_hosts; h++) {
		uint64_t pages = 0;
		for (int i = 0; i < max_page; i++)
			pages += i % c->n_shard / per == h;
		const uint64_t need = (pages * page_bytes + 32) * layers;
		const uint64_t have = ops->budget(self, h);
		if (need > have) {
			log_error("KV host %d would hold up to %llu bytes of pages (a sequence of "
				  "%d positions), but offers %llu (moefleet-worker --kv-memory): "
				  "a shorter context, or more hosts",
				  h, (unsigned long long)need, c->n_ctx, (unsigned long long)have);
			return ERR_CONFIG;
		}
	}
	/* the hosts left drop what they still hold of the sequences, which are
	 * computed again */
	for (int s = 0; s < c->n_seq; s++)
		attn_remote_forget(c->shipped, c->n_layer, c->n_seq, s, ops, self);
	c->remote = ops;
	c->remote_self = self;
	c->n_hosts = n_hosts;
	return 0;
}

void attn_cache_kv_room(const attn_cache *c, struct attn_kv_room *r)
{
	memset(r, 0, sizeof(*r));
	for (int l = 0; l < c->n_layer; l++)
		r->n_layer += c->cap[l] == c->n_ctx;
	r->n_hosts = c->remote ? c->n_hosts : 0;
	r->n_shard = c->n_shard;
	r->page = c->page;
	r->page_bytes = (uint64_t)c->page *
			(uint64_t)(c->k_width + (c->v == c->k ? 0 : c->v_width)) * sizeof(uint16_t);
	r->entry_bytes = sizeof(struct attn_page);
	r->seq_bytes = 32;
	for (int h = 0; h < r->n_hosts; h++)
		r->budget[h] = c->remote->budget(c->remote_self, h);
	r->local_bytes = (uint64_t)r->n_layer * (uint64_t)c->n_seq * (uint64_t)c->n_ctx *
			 (uint64_t)(c->k_width + (c->v == c->k ? 0 : c->v_stride)) *
			 sizeof(uint16_t);
}

void attn_remote_forget(int32_t *shipped, int n_layer, int n_seq, int seq,
			const struct attn_remote_ops *ops, void *self)
{
	int held = 0;
	for (int l = 0; shipped && l < n_layer; l++) {
		const size_t ls = (size_t)l * (size_t)n_seq + (size_t)seq;
		held |= shipped[ls] > 0;
		shipped[ls] = shipped[(size_t)n_layer * (size_t)n_seq + ls] = 0;
	}
	if (held && ops && ops->free_seq)
		(void)ops->free_seq(self, seq);
}

/* The log2 of a power of two. */
static int attn_log2(int x)
{
	int l = 0;
	while ((1 << l) < x)
		l++;
	return l;
}

static double attn_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Ships the pages of the batch's sequences completed since the last call to
 * the hosts of their chains. */
static int attn_remote_ship(const attn_cache *c, int layer, const model_batch *b)
{
	const int P = c->page;
	for (int t = 0; t < b->n_tokens; t++) {
		const int seq = b->seq[t];
		int32_t *done = &c->shipped[(size_t)layer * (size_t)c->n_seq + (size_t)seq];
		const int complete = (c->seq_last[seq] + 1) / P;
		for (; *done < complete; (*done)++) {
			const size_t e = attn_entry(c, layer, seq, *done * P);
			const int rc = c->remote->ship(
			    c->remote_self, attn_page_host(*done, c->n_shard, c->n_hosts), layer,
			    seq, *done, P, c->k_width, c->v == c->k ? 0 : c->v_width,
			    c->k + e * (size_t)c->k_width,
			    c->v == c->k ? NULL : c->v + e * (size_t)c->v_stride);
			if (rc)
				return rc;
		}
	}
	return 0;
}

/* Gives the memory of the pages of the batch's sequences shipped since the
 * last call back to the system (the whole memory pages inside them; reading
 * them again would give zeros). */
static void attn_remote_release(const attn_cache *c, int layer, const model_batch *b)
{
	const long pg = sysconf(_SC_PAGESIZE);
	const size_t n_ls = (size_t)c->n_layer * (size_t)c->n_seq;
	for (int t = 0; t < b->n_tokens && pg > 0; t++) {
		const size_t ls = (size_t)layer * (size_t)c->n_seq + (size_t)b->seq[t];
		int32_t *released = &c->shipped[n_ls + ls];
		const int from = *released * c->page, to = c->shipped[ls] * c->page;
		*released = c->shipped[ls];
		for (int kv = 0; kv < 2 && to > from; kv++) {
			if (kv && c->v == c->k)
				break;
			const size_t w = kv ? (size_t)c->v_stride : (size_t)c->k_width;
			const uint16_t *base =
			    (kv ? c->v : c->k) + attn_entry(c, layer, b->seq[t], from) * w;
			const uintptr_t a = (uintptr_t)base,
					z = a + (size_t)(to - from) * w * sizeof(uint16_t);
			const uintptr_t a1 = (a + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
			const uintptr_t z1 = z & ~((uintptr_t)pg - 1);
			if (z1 > a1)
				madvise((void *)a1, z1 - a1, MADV_DONTNEED);
		}
	}
}

/* n pseudo-random F16 values of magnitude in [2^-7, 2) into dst. */
static void attn_fill_f16(uint16_t *dst, int n, uint64_t *state)
{
	uint64_t r = 0;
	for (int i = 0; i < n; i++, r >>= 16) {
		if (i % 4 == 0) { /* splitmix64 */
			uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
			z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
			z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
			r = z ^ (z >> 31);
		}
		dst[i] = (uint16_t)((r & 0x83ffu) | ((8u + ((r >> 10) & 7u)) << 10));
	}
}

int attn_cache_fill_random(attn_cache *c, int seq, int n_pos, uint64_t seed)
{
	if (seq < 0 || seq >= c->n_seq || n_pos < 0 || n_pos > c->n_ctx) {
		log_error(
		    "attn: cannot fill %d positions of sequence %d (%d slots of %d positions)",
		    n_pos, seq, c->n_seq, c->n_ctx);
		return ERR_RANGE;
	}
	attn_cache_reset_seq(c, seq);
	const int32_t last = n_pos - 1, sq = seq;
	const model_batch b = {.n_tokens = 1, .pos = &last, .seq = &sq};
	c->seq_last[seq] = last;
	for (int l = 0; l < c->n_layer; l++) {
		for (int p = n_pos > c->cap[l] ? n_pos - c->cap[l] : 0; p < n_pos; p++) {
			const size_t e = attn_entry(c, l, seq, p);
			attn_fill_f16(c->k + e * (size_t)c->k_width, c->k_width, &seed);
			if (c->v != c->k)
				attn_fill_f16(c->v + e * (size_t)c->v_stride, c->v_width, &seed);
		}
		/* layer by layer, so the pages shipped leave before the next is filled */
		if (!c->remote || c->slides[l] || n_pos == 0)
			continue;
		const int rc = attn_remote_ship(c, l, &b);
		if (rc)
			return rc;
		attn_remote_release(c, l, &b);
	}
	return 0;
}

struct attn_remote_job {
	const struct attn_job *jb;
	float *own;	     /* [n_tokens][n_head][ATTN_PART_FLOATS(dv)]: each row's own page */
	const float **parts; /* [n_hosts] */
};

/* Each row's own page, as a partial. */
static void attn_remote_own(void *ctx, int ith, int nth)
{
	const struct attn_remote_job *rj = ctx;
	const struct attn_job *jb = rj->jb;
	const struct attn_params *ap = jb->ap;
	const int P = jb->c->page;
	int64_t lo, hi;
	pool_split(attn_units(ap, jb->b->n_tokens), ith, nth, 1, &lo, &hi);
	struct attn_kvf *kvf = attn_kvf_get(jb->c, ith);
	float *tile = attn_kvf_tile(kvf, ap->head_dim_k, ap->head_dim_v);
	for (int64_t u = lo; u < hi; u++) {
		int t, h0, ng;
		attn_unit(ap, jb->b->n_tokens, u, &t, &h0, &ng);
		struct attn_src src;
		struct attn_run r;
		const float *q = attn_rows_src(jb, t, h0, &src);
		const int pos = jb->b->pos[t];
		attn_run_init(&r, ng, src.dv);
		attn_tiles(&src, NULL, tile, pos / P * P, pos + 1, q, ng, ap->scale, &r);
		attn_run_store(&r, ng, src.dv,
			       rj->own + ((size_t)t * (size_t)ap->n_head + (size_t)h0) *
					     ATTN_PART_FLOATS(src.dv));
	}
}

/* The hosts' partials merged in host order (the tree), then the own page,
 * then the sink and 1/S. */
static void attn_remote_merge(void *ctx, int ith, int nth)
{
	const struct attn_remote_job *rj = ctx;
	const struct attn_job *jb = rj->jb;
	const struct attn_params *ap = jb->ap;
	const int dv = ap->head_dim_v, R = jb->c->n_hosts;
	const int level = attn_log2(jb->c->n_shard / R);
	int64_t lo, hi;
	pool_split((int64_t)jb->b->n_tokens * ap->n_head, ith, nth, 1, &lo, &hi);
	for (int64_t u = lo; u < hi; u++) {
		const size_t at = (size_t)u * ATTN_PART_FLOATS(dv);
		const int h = (int)(u % ap->n_head), t = (int)(u / ap->n_head);
		struct attn_tree tr = {.n = 0};
		for (int k = 0; k < R; k++) {
			struct attn_run *r = attn_tree_next(&tr, 1, dv);
			if (rj->parts[k])
				attn_run_load(r, rj->parts[k] + at, 1, dv);
			attn_tree_push(&tr, level, 1, dv);
		}
		struct attn_run *own = attn_tree_next(&tr, 1, dv);
		attn_run_load(own, rj->own + at, 1, dv);
		attn_run_merge(&tr.st[0], own, 1, dv);
		attn_run_finish(&tr.st[0], 1, dv, ap->sinks ? ap->sinks + h : NULL,
				attn_rows_out(jb, t, h));
	}
}

/* attn_forward() with the chains on KV hosts. */
int attn_forward_remote(pool *p, const struct attn_job *jb)
{
	const attn_cache *c = jb->c;
	const model_batch *b = jb->b;
	const struct attn_params *ap = jb->ap;
	const int R = c->n_hosts, per = c->n_shard / R;
	int rc = attn_remote_ship(c, jb->layer, b);
	if (rc)
		return rc;
	const float *parts[ATTN_MAX_HOSTS];
	int asked = 0;
	for (int h = 0; h < R; h++) {
		parts[h] = NULL;
		/* a host is asked when some row sees one of its pages */
		int need = 0;
		for (int t = 0; t < b->n_tokens && !need; t++)
			need = b->pos[t] / c->page > h * per;
		if (need && (rc = c->remote->submit(c->remote_self, h, jb->layer, ap, c->page,
						    c->n_shard, h * per, (h + 1) * per, b, jb->q)))
			return rc;
		asked += need;
	}
	const size_t need =
	    (size_t)b->n_tokens * (size_t)ap->n_head * ATTN_PART_FLOATS(ap->head_dim_v);
	if (need > c->own->cap) {
		free(c->own->p);
		c->own->p = malloc(need * sizeof(float));
		c->own->cap = c->own->p ? need : 0;
		if (!c->own->p)
			return ERR_NOMEM;
	}
	struct attn_remote_job rj = {.jb = jb, .own = c->own->p, .parts = parts};
	const double t0 = attn_now();
	pool_run(p, attn_remote_own, &rj);
	const double t1 = attn_now();
	rc = c->remote->collect(c->remote_self, jb->layer, parts);
	if (!rc) {
		const double t2 = attn_now();
		pool_run(p, attn_remote_merge, &rj);
		if (asked && c->remote->account)
			c->remote->account(c->remote_self, jb->layer, b->n_tokens, t1 - t0,
					   attn_now() - t2);
		attn_remote_release(c, jb->layer, b);
	}
	return rc;
}
