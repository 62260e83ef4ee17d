#define _GNU_SOURCE
#include "worker.h"
#include "../common/shard.h"
#include "../common/err.h"
#include "../common/gguf.h"
#include "../common/log.h"
#include "../common/pool.h"
#include "../common/progress.h"
#include "../common/shardfile.h"
#include "../common/wire.h"
#include "../kernels/kern.h"
#include "../coordinator/model/attn.h"
#include "../coordinator/model/indexer.h"
#include "kvstore.h"

#include <math.h>
#include <signal.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* A streamed expert tensor being received. */
struct worker_buf {
	uint32_t layer, expert, tensor, type;
	uint64_t total, received;
	uint8_t *bytes;
};

/* The buffers of a streamed expert the shard points into. */
struct worker_owned {
	uint8_t *t[6];
	uint32_t types[3];
	uint64_t bytes;
};

/* With cfg->reconnect_ms: seconds of silence after which the worker checks
 * that its coordinator still knows it (a Heartbeat). */
#define WORKER_PROBE_S 5.0

/* Memory kept back from the node's (physical or cgroup) memory when the
 * worker offers it for experts: the program, its buffers, the system. */
#define WORKER_RESERVE (512ull << 20)

/* Upper bound on n_layer x n_expert of the table of held experts. */
#define WORKER_MAX_TABLE (1u << 22)

struct worker {
	transport *t;
	const struct worker_config *cfg;
	pool *pool;
	const gguf *g; /* the model file: cfg->model, or g_own */
	gguf *g_own;
	struct shardfile sf; /* g is a per-node shard file when sf.slot != NULL */
	shard *shard;
	struct moe_spec spec;
	uint64_t epoch;		     /* of the last Assign */
	int initial;		     /* the first assignment is still loading */
	struct worker_owned **owned; /* [n_layer * n_expert]: streamed experts held */
	uint32_t n_held;
	uint64_t held_bytes;
	/* streaming: tensors still arriving, 3 (6 with biases) per expert */
	struct worker_buf *bufs;
	size_t n_bufs, n_bufs_done, hint;
	/* serving */
	uint8_t *hdr;
	size_t hdr_cap;
	float *out;   /* n_rows x k x n_embd; an AttnBatch's queries */
	float *items; /* packed results; an AttnResult's partials */
	size_t out_cap, items_cap;
	struct wire_stats stats;
	kvstore *kv;		 /* the KV pages held; NULL: none offered */
	uint64_t kv_shared;	 /* > 0: experts and KV pages share these bytes */
	attn_host_scratch *attn; /* attn_host_forward's buffers */
};

static double worker_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU seconds of this process (all threads). */
static double worker_cpu_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Stretches a computation that took dt seconds to slowdown x dt (emulated
 * slower hardware); returns the new duration. */
static double worker_throttle(const struct worker *w, double t0, double dt)
{
	if (!(w->cfg->slowdown > 1.0))
		return dt;
	double extra = dt * (w->cfg->slowdown - 1.0);
	struct timespec ts = {(time_t)extra, (long)((extra - (double)(time_t)extra) * 1e9)};
	nanosleep(&ts, NULL);
	return worker_now() - t0;
}

/* The compute time to report for work started at wall time t0 and CPU time
 * c0: what this hardware needed (other processes on the same cores stretch
 * the wall time, not the CPU time), stretched by cfg->slowdown. */
static double worker_compute_seconds(const struct worker *w, double t0, double c0)
{
	double wall = worker_now() - t0;
	double dt = fmin(wall, (worker_cpu_now() - c0) / pool_size(w->pool));
	worker_throttle(w, t0, wall);
	if (w->cfg->slowdown > 1.0)
		dt *= w->cfg->slowdown;
	return dt;
}

/* Makes *buf hold at least n floats (its contents are lost). */
static int worker_reserve(float **buf, size_t *cap, size_t n)
{
	if (*buf && n <= *cap)
		return 0;
	free(*buf);
	*buf = malloc((n ? n : 1) * sizeof(float));
	*cap = *buf ? n : 0;
	return *buf ? 0 : ERR_NOMEM;
}

static int worker_send(struct worker *w, const struct wire_msg *m, const void *data, size_t n)
{
	size_t len;
	int rc = wire_encode(m, &w->hdr, &w->hdr_cap, &len);
	if (rc)
		return rc;
	w->stats.bytes_out += len + n;
	return transport_send(w->t, 0, w->hdr, len, data, n);
}

static void worker_error(struct worker *w, const char *what)
{
	struct wire_msg m = {.kind = WIRE_ERROR};
	snprintf(m.u.text, sizeof(m.u.text), "%s", what);
	log_error("coordinator: %s", what);
	worker_send(w, &m, NULL, 0);
}

static void worker_free_bufs(struct worker *w)
{
	for (size_t i = 0; i < w->n_bufs; i++)
		free(w->bufs[i].bytes);
	free(w->bufs);
	w->bufs = NULL;
	w->n_bufs = w->n_bufs_done = w->hint = 0;
}

static void worker_free_owned(struct worker_owned **o)
{
	if (!*o)
		return;
	for (int t = 0; t < 6; t++)
		free((*o)->t[t]);
	free(*o);
	*o = NULL;
}

/* Forgets every expert (a new spec, or shutting down). */
static void worker_clear(struct worker *w)
{
	shard_destroy(&w->shard);
	worker_free_bufs(w);
	if (w->owned) {
		size_t n = (size_t)w->spec.n_layer * (size_t)w->spec.n_expert;
		for (size_t i = 0; i < n; i++)
			worker_free_owned(&w->owned[i]);
		free(w->owned);
		w->owned = NULL;
	}
	w->n_held = 0;
	w->held_bytes = 0;
}

/* Where (l, e) is in the model file: its slot in the layer's expert tensors
 * and how many experts they hold; 0 if the file does not hold it. */
static int worker_file_slot(const struct worker *w, int l, int e, int *slot, int *n_slots)
{
	if (!w->g)
		return 0;
	if (!w->sf.slot) {
		*slot = e;
		*n_slots = w->spec.n_expert;
		return 1;
	}
	*slot = shardfile_slot(&w->sf, l, e);
	if (*slot < 0)
		return 0;
	*n_slots = (int)w->sf.layer_held[l];
	return 1;
}

/* The bytes of tensor t (0..2 weights, 3..5 biases) of (l, e) in the model
 * file, or NULL. */
static const uint8_t *worker_file_tensor(const struct worker *w, int l, int e, int t, uint64_t *n)
{
	char name[96];
	int slot, n_slots;
	if (!worker_file_slot(w, l, e, &slot, &n_slots) || n_slots < 1)
		return NULL;
	shardfile_tensor_name(l, t, name, sizeof(name));
	const gguf_tensor *x = gguf_find_tensor(w->g, name);
	if (!x)
		return NULL;
	*n = x->n_bytes / (uint64_t)n_slots;
	return (const uint8_t *)x->data + *n * (uint64_t)slot;
}

/* Adds (l, e) from the model file to shard s. */
static int worker_shard_add_file(const struct worker *w, shard *s, int l, int e)
{
	int slot, n_slots;
	if (!worker_file_slot(w, l, e, &slot, &n_slots)) {
		log_error("%s: holds no expert %d of layer %d", gguf_path(w->g), e, l);
		return ERR_RANGE;
	}
	return shard_add_from_gguf_slot(s, w->g, l, e, slot, n_slots);
}

static uint64_t worker_file_expert_bytes(const struct worker *w, int l, int e)
{
	uint64_t sum = 0, n;
	for (int t = 0; t < (w->spec.has_bias ? 6 : 3); t++)
		if (worker_file_tensor(w, l, e, t, &n))
			sum += n;
	return sum;
}

static int worker_send_ready(struct worker *w, int released)
{
	struct wire_msg m = {.kind = WIRE_READY};
	m.u.ready.placement_epoch = w->epoch;
	m.u.ready.n_experts = w->n_held;
	m.u.ready.bytes = w->held_bytes;
	m.u.ready.released = released;
	if (w->kv && w->kv_shared) /* the pages take what the experts leave */
		kvstore_set_budget(w->kv,
				   w->kv_shared > w->held_bytes ? w->kv_shared - w->held_bytes : 0);
	log_info("worker: epoch %llu: %u experts held (%.1f MiB)%s", (unsigned long long)w->epoch,
		 w->n_held, (double)w->held_bytes / 1048576.0, released ? " after a release" : "");
	return worker_send(w, &m, NULL, 0);
}

static int worker_add_from_file(struct worker *w, int l, int e)
{
	int rc = worker_shard_add_file(w, w->shard, l, e);
	if (rc)
		return rc;
	w->n_held++;
	w->held_bytes += worker_file_expert_bytes(w, l, e);
	return 0;
}

/* All tensors of the expert whose buffers start at bufs[b0] arrived: the shard
 * takes them (the buffers move to the owned table). */
static int worker_add_streamed(struct worker *w, size_t b0)
{
	size_t per = w->spec.has_bias ? 6 : 3;
	struct worker_buf *b = &w->bufs[b0];
	size_t idx = (size_t)b->layer * (size_t)w->spec.n_expert + b->expert;
	struct worker_owned *o = calloc(1, sizeof(*o));
	if (!o)
		return ERR_NOMEM;
	struct shard_expert_src src = {0};
	for (size_t t = 0; t < per; t++) {
		struct worker_buf *x = &w->bufs[b0 + t];
		if (x->tensor < 3) {
			src.weights[x->tensor] = x->bytes;
			src.types[x->tensor] = x->type;
		} else {
			src.biases[x->tensor - 3] = (const float *)x->bytes;
		}
	}
	int rc = shard_add_expert(w->shard, (int)b->layer, (int)b->expert, &src);
	if (rc) {
		free(o);
		return rc;
	}
	memcpy(o->types, src.types, sizeof(o->types));
	for (size_t t = 0; t < per; t++) {
		o->t[w->bufs[b0 + t].tensor] = w->bufs[b0 + t].bytes;
		o->bytes += w->bufs[b0 + t].total;
		w->bufs[b0 + t].bytes = NULL;
	}
	worker_free_owned(&w->owned[idx]);
	w->owned[idx] = o;
	w->n_held++;
	w->held_bytes += o->bytes;
	return 0;
}

/* madvise() on the pages holding [p, p + n). */
static void worker_advise(const uint8_t *p, uint64_t n, int advice)
{
	const uintptr_t psz = (uintptr_t)sysconf(_SC_PAGE_SIZE);
	uintptr_t lo = (uintptr_t)p & ~(psz - 1), hi = ((uintptr_t)p + n + psz - 1) & ~(psz - 1);
	if (p && n)
		madvise((void *)lo, hi - lo, advice);
}

/* Brings [p, p + n) of the mapped file into memory: the pages holding these
 * bytes and no others (their neighbours' bytes only share the end pages; the
 * kernel's read-around is off for expert tensors, see worker_open_model). */
static void worker_read_pages(const uint8_t *p, uint64_t n)
{
	if (n == 0)
		return;
	worker_advise(p, n, MADV_WILLNEED);
#ifdef MADV_POPULATE_READ
	const uintptr_t psz = (uintptr_t)sysconf(_SC_PAGE_SIZE);
	uintptr_t lo = (uintptr_t)p & ~(psz - 1), hi = ((uintptr_t)p + n + psz - 1) & ~(psz - 1);
	if (madvise((void *)lo, hi - lo, MADV_POPULATE_READ) == 0)
		return;
#endif
	const uintptr_t step = (uintptr_t)sysconf(_SC_PAGE_SIZE);
	uint8_t acc = 0;
	for (uintptr_t q = (uintptr_t)p; q < (uintptr_t)p + n; q = (q & ~(step - 1)) + step)
		acc ^= *(const volatile uint8_t *)q;
	(void)acc;
}

/* Later epochs' experts from the file: their pages are asked for now, read
 * in the background, and mapped when a Batch first uses them. */
static void worker_prefetch_expert(const struct worker *w, int l, int e)
{
	uint64_t n;
	for (int t = 0; t < (w->spec.has_bias ? 6 : 3); t++)
		worker_advise(worker_file_tensor(w, l, e, t, &n), n, MADV_WILLNEED);
}

/* The first assignment's experts, taken from the file as mmap pointers, are
 * read in now, so that the first Batch does not wait for the disk: only
 * their bytes, in file order within each tensor.  Progress goes to the log
 * and, as Progress messages (at each 1 %), to the coordinator, which sums
 * them over the cluster. */
static int worker_read_experts(struct worker *w, const uint32_t *pl, const uint32_t *pe, uint32_t n)
{
	uint64_t total = 0, done = 0, n_b;
	int n_t = w->spec.has_bias ? 6 : 3;
	for (uint32_t i = 0; i < n; i++)
		total += worker_file_expert_bytes(w, (int)pl[i], (int)pe[i]);
	struct progress pr;
	progress_start(&pr, "worker: reading experts", total, -1, progress_now());
	struct wire_msg m = {.kind = WIRE_PROGRESS};
	m.u.progress = (struct wire_progress){w->epoch, 0, total};
	int rc = worker_send(w, &m, NULL, 0), sent_pct = 0;
	/* tensor-major: consecutive experts of a tensor are adjacent in the file */
	for (int t = 0; t < n_t && !rc; t++) {
		for (uint32_t i = 0; i < n && !rc; i++) {
			const uint8_t *p = worker_file_tensor(w, (int)pl[i], (int)pe[i], t, &n_b);
			if (!p)
				continue;
			if (i + 1 < n) { /* the next one is read while this one is mapped */
				uint64_t n2 = 0;
				worker_advise(
				    worker_file_tensor(w, (int)pl[i + 1], (int)pe[i + 1], t, &n2),
				    n2, MADV_WILLNEED);
			}
			worker_read_pages(p, n_b);
			done += n_b;
			progress_report(&pr, done, progress_now());
			int pct = total ? (int)(100 * done / total) : 100;
			if (pct > sent_pct && done < total) {
				sent_pct = pct;
				m.u.progress.done = done;
				rc = worker_send(w, &m, NULL, 0);
			}
		}
	}
	if (!rc) {
		m.u.progress.done = total;
		progress_report(&pr, total, progress_now());
		rc = worker_send(w, &m, NULL, 0);
	}
	return rc;
}

static int worker_new_shard(struct worker *w, const struct moe_spec *spec)
{
	worker_clear(w);
	w->spec = *spec;
	size_t n = (size_t)spec->n_layer * (size_t)spec->n_expert;
	if (n > WORKER_MAX_TABLE) {
		log_error("coordinator: %d layers x %d experts exceed this worker's table",
			  spec->n_layer, spec->n_expert);
		return ERR_RANGE;
	}
	w->owned = calloc(n ? n : 1, sizeof(*w->owned));
	if (!w->owned)
		return ERR_NOMEM;
	return shard_new(&w->spec, &w->shard);
}

/* Assign: the full list of experts to hold from placement_epoch on.  The
 * first one (or one with another spec) starts from an empty shard and the
 * worker serves nothing until it has loaded everything; a later one adds the
 * experts it lacks while Batches of the epoch in force keep being served
 * (streamed chunks arrive between them).  Experts it no longer needs stay
 * until a Release. */
static int worker_on_assign(struct worker *w, const struct wire_assign *a)
{
	int live = w->shard && a->placement_epoch > w->epoch &&
		   memcmp(&a->spec, &w->spec, sizeof(a->spec)) == 0;
	int rc;
	if (!live) {
		rc = worker_new_shard(w, &a->spec);
		if (rc)
			return rc;
		w->initial = 1;
	}
	worker_free_bufs(w); /* an unfinished earlier epoch is superseded */
	w->epoch = a->placement_epoch;
	if (w->sf.slot &&
	    (w->sf.n_layer != w->spec.n_layer || w->sf.n_expert != w->spec.n_expert)) {
		worker_error(w, "the shard file was made for a model of another size");
		return 0;
	}
	size_t per = w->spec.has_bias ? 6 : 3;
	w->bufs = calloc((size_t)a->n_pairs * per + 1, sizeof(*w->bufs));
	if (!w->bufs)
		return ERR_NOMEM;
	uint32_t added = 0, n_file = 0;
	rc = 0;
	uint32_t *file_l = malloc(((size_t)a->n_pairs + 1) * 2 * sizeof(uint32_t));
	if (!file_l)
		return ERR_NOMEM;
	uint32_t *file_e = file_l + a->n_pairs + 1;
	for (uint32_t i = 0; i < a->n_pairs; i++) {
		int l = (int)a->pair_layer[i], e = (int)a->pair_expert[i], slot, n_slots;
		if (shard_has(w->shard, l, e))
			continue;
		added++;
		if (!a->stream && worker_file_slot(w, l, e, &slot, &n_slots)) {
			/* mmap pointers: nothing is read until used */
			rc = worker_add_from_file(w, l, e);
			if (rc)
				goto out;
			file_l[n_file] = (uint32_t)l;
			file_e[n_file++] = (uint32_t)e;
			continue;
		}
		for (size_t t = 0; t < per; t++) {
			struct worker_buf *b = &w->bufs[w->n_bufs++];
			b->layer = (uint32_t)l;
			b->expert = (uint32_t)e;
			b->tensor = (uint32_t)t;
		}
	}
	log_info("worker: epoch %llu assigns %u experts, %u new (%u from the local model file, "
		 "%u streamed from the coordinator)",
		 (unsigned long long)a->placement_epoch, a->n_pairs, added, n_file, added - n_file);
	/* a later epoch's experts are faulted in by use: reading them here
	 * would hold up the Batches of the epoch in force */
	if (w->initial && n_file)
		rc = worker_read_experts(w, file_l, file_e, n_file);
	for (uint32_t i = 0; !w->initial && i < n_file; i++)
		worker_prefetch_expert(w, (int)file_l[i], (int)file_e[i]);
	if (!rc && w->n_bufs == 0) {
		w->initial = 0;
		rc = worker_send_ready(w, 0);
	}
out:
	free(file_l);
	return rc;
}

static int worker_on_chunk(struct worker *w, const struct wire_weight_chunk *c, const uint8_t *data,
			   size_t n)
{
	struct worker_buf *b = NULL;
	size_t bi = 0;
	for (size_t j = 0; j < w->n_bufs && !b; j++) {
		size_t i = (w->hint + j) % w->n_bufs;
		if (w->bufs[i].layer == c->layer && w->bufs[i].expert == c->expert &&
		    w->bufs[i].tensor == c->tensor) {
			b = &w->bufs[i];
			bi = i;
		}
	}
	if (!b && w->shard && c->layer < (uint32_t)w->spec.n_layer &&
	    c->expert < (uint32_t)w->spec.n_expert &&
	    shard_has(w->shard, (int)c->layer, (int)c->expert))
		return 0; /* completed under a superseded epoch: already held */
	if (!b) {
		worker_error(w, "weight chunk for an expert that was not assigned");
		return 0;
	}
	w->hint = bi;
	const struct moe_spec *sp = &w->spec;
	const int64_t E = sp->n_embd, F = sp->n_ff_exp;
	uint64_t want;
	if (c->tensor < 3) {
		int64_t n_in = c->tensor == 2 ? F : E, n_out = c->tensor == 2 ? E : F;
		if (n_in % kern_type_block(c->type)) {
			worker_error(w, "weight chunk type does not fit the row length");
			return 0;
		}
		want = kern_row_bytes(c->type, n_in) * (uint64_t)n_out;
	} else {
		want = (uint64_t)(c->tensor == 5 ? E : F) * sizeof(float);
	}
	if (c->total != want || (b->bytes && b->type != c->type) || c->offset != b->received ||
	    n > c->total - c->offset || (b->total && b->received == b->total)) {
		worker_error(w, "weight chunk with inconsistent size, type or offset");
		return 0;
	}
	if (!b->bytes) {
		if ((w->cfg->memory_bytes || w->cfg->kv_only) &&
		    w->held_bytes + want > w->cfg->memory_bytes) {
			worker_error(w, "expert beyond this worker's memory budget");
			return 0;
		}
		b->bytes = malloc(want ? want : 1);
		if (!b->bytes)
			return ERR_NOMEM;
		b->type = c->type;
		b->total = want;
	}
	memcpy(b->bytes + c->offset, data, n);
	b->received += n;
	if (b->received < b->total)
		return 0;
	w->n_bufs_done++;
	/* the expert's tensors are consecutive: add it once all have arrived */
	size_t per = w->spec.has_bias ? 6 : 3, b0 = bi - bi % per;
	for (size_t t = 0; t < per; t++)
		if (!w->bufs[b0 + t].total || w->bufs[b0 + t].received < w->bufs[b0 + t].total)
			return 0;
	int rc = worker_add_streamed(w, b0);
	if (rc)
		return rc;
	if (w->n_bufs_done == w->n_bufs) {
		worker_free_bufs(w);
		w->initial = 0;
		return worker_send_ready(w, 0);
	}
	return 0;
}

/* Gives the pages of a file-backed expert back to the kernel (they are read
 * again from the page cache if the expert ever comes back). */
static void worker_drop_file_pages(const struct worker *w, int l, int e)
{
	long psz = sysconf(_SC_PAGE_SIZE);
	if (psz <= 0)
		return;
	for (int t = 0; t < (w->spec.has_bias ? 6 : 3); t++) {
		uint64_t n;
		const uint8_t *p = worker_file_tensor(w, l, e, t, &n);
		if (!p)
			continue;
		uintptr_t lo = ((uintptr_t)p + (uintptr_t)psz - 1) & ~((uintptr_t)psz - 1);
		uintptr_t hi = ((uintptr_t)p + n) & ~((uintptr_t)psz - 1);
		if (hi > lo)
			madvise((void *)lo, hi - lo, MADV_DONTNEED);
	}
}

/* Release: drops the listed experts.  The shard has no removal, so a new one
 * is built from the experts kept (pointers only: nothing is copied). */
static int worker_on_release(struct worker *w, const struct wire_release *r)
{
	if (!w->shard || w->initial) {
		worker_error(w, "release before the experts were loaded");
		return 0;
	}
	const struct moe_spec *sp = &w->spec;
	for (uint32_t i = 0; i < r->n_pairs; i++)
		if (r->pair_layer[i] >= (uint32_t)sp->n_layer ||
		    r->pair_expert[i] >= (uint32_t)sp->n_expert) {
			worker_error(w, "release names an expert outside the model");
			return 0;
		}
	uint8_t *drop = calloc((size_t)sp->n_layer * (size_t)sp->n_expert + 1, 1);
	if (!drop)
		return ERR_NOMEM;
	/* experts still arriving for a later epoch are kept */
	for (uint32_t i = 0; i < r->n_pairs; i++)
		drop[(size_t)r->pair_layer[i] * (size_t)sp->n_expert + r->pair_expert[i]] = 1;
	shard *next = NULL;
	int rc = shard_new(sp, &next);
	uint32_t kept = 0, dropped = 0;
	uint64_t bytes = 0;
	for (int l = 0; l < sp->n_layer && !rc; l++) {
		for (int e = 0; e < sp->n_expert && !rc; e++) {
			size_t idx = (size_t)l * (size_t)sp->n_expert + (size_t)e;
			if (!shard_has(w->shard, l, e))
				continue;
			if (drop[idx]) {
				dropped++;
				continue;
			}
			struct worker_owned *o = w->owned[idx];
			if (o) {
				struct shard_expert_src src = {0};
				for (int t = 0; t < 3; t++) {
					src.weights[t] = o->t[t];
					src.biases[t] = (const float *)o->t[3 + t];
				}
				memcpy(src.types, o->types, sizeof(src.types));
				rc = shard_add_expert(next, l, e, &src);
				bytes += o->bytes;
			} else {
				rc = worker_shard_add_file(w, next, l, e);
				bytes += worker_file_expert_bytes(w, l, e);
			}
			kept++;
		}
	}
	if (rc) {
		shard_destroy(&next);
		free(drop);
		return rc;
	}
	shard_destroy(&w->shard);
	w->shard = next;
	for (int l = 0; l < sp->n_layer; l++)
		for (int e = 0; e < sp->n_expert; e++) {
			size_t idx = (size_t)l * (size_t)sp->n_expert + (size_t)e;
			if (!drop[idx])
				continue;
			if (w->owned[idx])
				worker_free_owned(&w->owned[idx]);
			else if (w->g)
				worker_drop_file_pages(w, l, e);
		}
	free(drop);
	w->n_held = kept;
	w->held_bytes = bytes;
	log_info("worker: epoch %llu in force: released %u experts",
		 (unsigned long long)r->placement_epoch, dropped);
	return worker_send_ready(w, 1);
}

static int worker_on_batch(struct worker *w, const struct wire_batch *b, const uint8_t *data,
			   size_t n)
{
	if (!w->shard || w->initial) {
		worker_error(w, "batch before the experts were loaded");
		return 0;
	}
	const size_t E = (size_t)w->spec.n_embd;
	if (b->layer >= (uint32_t)w->spec.n_layer || n != wire_batch_frame_bytes(b, (uint32_t)E) ||
	    b->k > (uint32_t)w->spec.n_expert) {
		worker_error(w, "batch with a bad layer, k or activation frame size");
		return 0;
	}
	double t0 = worker_now(), c0 = worker_cpu_now();
	size_t slots = (size_t)b->n_rows * b->k, n_items = 0;
	for (size_t i = 0; i < slots; i++) {
		if (b->ids[i] < 0)
			continue;
		if (!shard_has(w->shard, (int)b->layer, b->ids[i])) {
			worker_error(w, "batch names an expert this worker does not hold");
			return 0;
		}
		n_items++;
	}
	if (worker_reserve(&w->out, &w->out_cap, slots * E) ||
	    worker_reserve(&w->items, &w->items_cap, n_items * E))
		return ERR_NOMEM;
	uint32_t x_type = b->dtype;
	if (x_type != KERN_F32 && x_type != shard_act_type(w->shard, (int)b->layer)) {
		worker_error(w, "batch activation type does not match the experts");
		return 0;
	}
	int rc = shard_compute(w->shard, w->pool, (int)b->layer, (int)b->n_rows, (int)b->k, data,
			       x_type, b->ids, b->weights, w->out);
	if (rc) {
		worker_error(w, "expert computation failed");
		return 0;
	}
	size_t at = 0;
	for (size_t i = 0; i < slots; i++)
		if (b->ids[i] >= 0)
			memcpy(w->items + (at++) * E, w->out + i * E, E * sizeof(float));
	double dt = worker_compute_seconds(w, t0, c0);
	w->stats.rows += b->n_rows;
	w->stats.items += n_items;
	w->stats.compute_seconds += dt;
	struct wire_msg m = {.kind = WIRE_RESULT};
	m.u.result = (struct wire_result){b->step, b->layer, (uint32_t)n_items, dt};
	return worker_send(w, &m, w->items, n_items * E * sizeof(float));
}

static int worker_on_kv_page(struct worker *w, const struct wire_kv_page *h, const uint8_t *data,
			     size_t n)
{
	char why[WIRE_MAX_NAME];
	if (!w->kv) {
		worker_error(w, "KV page, but this worker offers no memory for KV pages");
		return 0;
	}
	if (n != wire_kv_page_frame_bytes(h)) { /* never 0: a frame is there */
		worker_error(w, "KV page with a frame of the wrong size");
		return 0;
	}
	int rc = kvstore_put(w->kv, h, data);
	if (rc == ERR_NOMEM) {
		snprintf(why, sizeof(why),
			 "KV page %u of sequence %u on layer %u beyond this worker's KV memory "
			 "budget of %llu bytes",
			 h->page, h->seq, h->layer, (unsigned long long)kvstore_budget(w->kv));
		worker_error(w, why);
	} else if (rc) {
		snprintf(why, sizeof(why),
			 "KV page %u of sequence %u on layer %u: its sizes differ from the layer's "
			 "other pages",
			 h->page, h->seq, h->layer);
		worker_error(w, why);
	}
	return 0;
}

/* The pages of kind on layer that each of the n_rows rows' sequences has here
 * (*pages[i], *n_pages[i]; free both): ERR_NOMEM, or 0. */
static int worker_kv_pages(struct worker *w, enum wire_kv_kind kind, uint32_t layer,
			   uint32_t n_rows, const int32_t *seq, const struct attn_page ***pages,
			   int32_t **n_pages)
{
	*pages = malloc((n_rows ? n_rows : 1) * sizeof(**pages));
	*n_pages = malloc((n_rows ? n_rows : 1) * sizeof(**n_pages));
	if (!*pages || !*n_pages)
		return ERR_NOMEM;
	for (uint32_t i = 0; i < n_rows; i++)
		kvstore_pages(w->kv, kind, layer, seq[i], &(*pages)[i], &(*n_pages)[i]);
	return 0;
}

/* The chains [v0, v1) of every row over the pages held: one AttnResult. */
static int worker_on_attn_batch(struct worker *w, const struct wire_attn_batch *b,
				const uint8_t *data, size_t n)
{
	char why[WIRE_MAX_NAME];
	uint32_t page, k_width, v_width;
	if (!w->kv || kvstore_layer(w->kv, WIRE_KV_ATTN, b->layer, &page, &k_width, &v_width)) {
		snprintf(why, sizeof(why),
			 "attention batch for layer %u, of which no KV page is here", b->layer);
		worker_error(w, why);
		return 0;
	}
	if (n != wire_attn_batch_frame_bytes(b) || b->page != page) {
		worker_error(w, "attention batch with a query frame of the wrong size or pages of "
				"another size than its layer's");
		return 0;
	}
	struct wire_msg m = {.kind = WIRE_ATTN_RESULT};
	struct wire_attn_result *r = &m.u.attn_result;
	*r = (struct wire_attn_result){b->step, b->layer, b->n_rows, b->n_head, b->head_dim_v, 0};
	const size_t out_bytes = wire_attn_result_frame_bytes(r);
	const struct attn_page **pages = NULL;
	int32_t *n_pages = NULL;
	int rc = 0;
	/* the sizes come from the coordinator: too much is its error, not ours */
	if (out_bytes > TRANSPORT_FRAME_CAP_DEFAULT ||
	    worker_kv_pages(w, WIRE_KV_ATTN, b->layer, b->n_rows, b->seq, &pages, &n_pages) ||
	    worker_reserve(&w->out, &w->out_cap, n / sizeof(float)) ||
	    worker_reserve(&w->items, &w->items_cap, out_bytes / sizeof(float))) {
		snprintf(why, sizeof(why),
			 "attention batch on layer %u: a result of %zu bytes is beyond this "
			 "worker's frame cap or memory",
			 b->layer, out_bytes);
		worker_error(w, why);
		goto out;
	}
	double t0 = worker_now(), c0 = worker_cpu_now();
	if (n)				 /* no frame: no rows */
		memcpy(w->out, data, n); /* the frame may not be aligned for floats */
	const struct attn_params ap = {.n_head = (int)b->n_head,
				       .n_head_kv = (int)b->n_head_kv,
				       .head_dim_k = (int)b->head_dim_k,
				       .head_dim_v = (int)b->head_dim_v,
				       .scale = b->scale};
	const struct attn_host_job job = {.ap = &ap,
					  .k_width = (int)k_width,
					  .v_stride = (int)(v_width ? v_width : k_width),
					  .page = (int)page,
					  .n_shard = (int)b->n_shard,
					  .v0 = (int)b->v0,
					  .v1 = (int)b->v1,
					  .n_rows = (int)b->n_rows,
					  .pos = b->pos,
					  .pages = pages,
					  .n_pages = n_pages,
					  .q = w->out,
					  .part = w->items,
					  .scratch = &w->attn};
	rc = attn_host_forward(w->pool, &job);
	if (rc) {
		snprintf(why, sizeof(why),
			 "attention batch on layer %u: a row needs a KV page this worker lacks, or "
			 "the chains or heads do not fit its pages",
			 b->layer);
		worker_error(w, why);
		rc = 0;
		goto out;
	}
	r->compute_seconds = worker_compute_seconds(w, t0, c0);
	w->stats.attn_batches++;
	w->stats.attn_rows += b->n_rows;
	w->stats.attn_seconds += r->compute_seconds;
	rc = worker_send(w, &m, w->items, out_bytes);
out:
	free(pages);
	free(n_pages);
	return rc;
}

/* The scores of every row's indexer pages in the chains [v0, v1): one
 * IdxResult. */
static int worker_on_idx_batch(struct worker *w, const struct wire_idx_batch *b,
			       const uint8_t *data, size_t n)
{
	char why[WIRE_MAX_NAME];
	uint32_t page, dim, v_width;
	if (!w->kv || kvstore_layer(w->kv, WIRE_KV_IDX, b->layer, &page, &dim, &v_width)) {
		snprintf(why, sizeof(why),
			 "indexer batch for layer %u, of which no indexer page is here", b->layer);
		worker_error(w, why);
		return 0;
	}
	if (n != wire_idx_batch_frame_bytes(b) || b->page != page || b->dim != dim) {
		worker_error(w, "indexer batch with a frame of the wrong size or pages of another "
				"size than its layer's");
		return 0;
	}
	struct wire_msg m = {.kind = WIRE_IDX_RESULT};
	struct wire_idx_result *r = &m.u.idx_result;
	*r = (struct wire_idx_result){b->step, b->layer, b->n_rows, 0, 0};
	size_t n_scores = 0;
	for (uint32_t i = 0; i < b->n_rows; i++)
		n_scores += indexer_row_scores(b->pos[i], (int)page, (int)b->n_shard, (int)b->v0,
					       (int)b->v1);
	const size_t out_bytes = n_scores * sizeof(float);
	const struct attn_page **pages = NULL;
	int32_t *n_pages = NULL;
	int rc = 0;
	/* the sizes come from the coordinator: too much is its error, not ours */
	if (n_scores > UINT32_MAX || out_bytes > TRANSPORT_FRAME_CAP_DEFAULT ||
	    worker_kv_pages(w, WIRE_KV_IDX, b->layer, b->n_rows, b->seq, &pages, &n_pages) ||
	    worker_reserve(&w->out, &w->out_cap, n / sizeof(float)) ||
	    worker_reserve(&w->items, &w->items_cap, n_scores)) {
		snprintf(why, sizeof(why),
			 "indexer batch on layer %u: a result of %zu bytes is beyond this "
			 "worker's frame cap or memory",
			 b->layer, out_bytes);
		worker_error(w, why);
		goto out;
	}
	r->n_scores = (uint32_t)n_scores;
	double t0 = worker_now(), c0 = worker_cpu_now();
	if (n)				 /* no frame: no rows */
		memcpy(w->out, data, n); /* the frame may not be aligned for floats */
	const struct indexer_host_job job = {.n_head = (int)b->n_head,
					     .dim = (int)dim,
					     .page = (int)page,
					     .n_shard = (int)b->n_shard,
					     .v0 = (int)b->v0,
					     .v1 = (int)b->v1,
					     .n_rows = (int)b->n_rows,
					     .pos = b->pos,
					     .pages = pages,
					     .n_pages = n_pages,
					     .q = w->out,
					     .w = w->out + (size_t)b->n_rows * b->n_head * dim,
					     .scores = w->items};
	rc = indexer_host_score(w->pool, &job);
	if (rc) {
		snprintf(why, sizeof(why),
			 "indexer batch on layer %u: a row needs an indexer page this worker lacks",
			 b->layer);
		worker_error(w, why);
		rc = 0;
		goto out;
	}
	r->compute_seconds = worker_compute_seconds(w, t0, c0);
	w->stats.attn_batches++;
	w->stats.attn_rows += b->n_rows;
	w->stats.attn_seconds += r->compute_seconds;
	rc = worker_send(w, &m, w->items, out_bytes);
out:
	free(pages);
	free(n_pages);
	return rc;
}

/* Expert rows per second on a fixed synthetic expert (Q8_0, 1024 x 512,
 * SwiGLU), 64 rows x 2 slots over 4 experts, best of a few runs: the same
 * yardstick on every worker, so the coordinator can compare them before any
 * real work was measured.  0 if it cannot run. */
static double worker_calibrate(struct worker *w)
{
	enum { CAL_E = 1024, CAL_F = 512, CAL_X = 4, CAL_ROWS = 64, CAL_K = 2, CAL_REPS = 4 };
	struct moe_spec spec = {.n_layer = 1,
				.n_embd = CAL_E,
				.n_ff_exp = CAL_F,
				.n_expert = CAL_X,
				.n_expert_used = CAL_K,
				.act = MOE_ACT_SWIGLU};
	spec.layer_moe[0] = 1;
	size_t mat = kern_row_bytes(KERN_Q8_0, CAL_E) * CAL_F; /* gate/up; down is the same size */
	uint8_t *wts = malloc(mat);
	float *x = malloc((size_t)CAL_ROWS * CAL_E * sizeof(float));
	float *out = malloc((size_t)CAL_ROWS * CAL_K * CAL_E * sizeof(float));
	int32_t ids[CAL_ROWS * CAL_K];
	float wt[CAL_ROWS * CAL_K];
	shard *s = NULL;
	double best = 0;
	if (!wts || !x || !out || shard_new(&spec, &s))
		goto out;
	/* Q8_0 blocks: an F16 scale of 1/64 then 32 small integers */
	uint32_t seed = 12345;
	for (size_t i = 0; i < mat; i += 34) {
		wts[i] = 0x00;
		wts[i + 1] = 0x24;
		for (int j = 2; j < 34; j++) {
			seed = seed * 1664525u + 1013904223u;
			wts[i + j] = (uint8_t)((seed >> 24) % 15) - 7;
		}
	}
	for (size_t i = 0; i < (size_t)CAL_ROWS * CAL_E; i++) {
		seed = seed * 1664525u + 1013904223u;
		x[i] = (float)((int)(seed >> 20) % 200 - 100) / 100.0f;
	}
	for (int r = 0; r < CAL_ROWS * CAL_K; r++) {
		ids[r] = r % CAL_X;
		wt[r] = 0.5f;
	}
	for (int e = 0; e < CAL_X; e++) {
		struct shard_expert_src src = {
		    {wts, wts, wts}, {KERN_Q8_0, KERN_Q8_0, KERN_Q8_0}, {0}};
		if (shard_add_expert(s, 0, e, &src))
			goto out;
	}
	for (int rep = 0; rep < CAL_REPS; rep++) {
		/* other processes on the same cores stretch the wall time but not
		 * the CPU time: the shorter of wall and CPU / threads is the speed
		 * this hardware has; a --slowdown scales it */
		struct timespec c0, c1;
		clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
		double t0 = worker_now();
		if (shard_compute(s, w->pool, 0, CAL_ROWS, CAL_K, x, KERN_F32, ids, wt, out))
			goto out;
		double wall = worker_now() - t0;
		clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
		double cpu =
		    (double)(c1.tv_sec - c0.tv_sec) + 1e-9 * (double)(c1.tv_nsec - c0.tv_nsec);
		double dt = fmin(wall, cpu / pool_size(w->pool));
		if (w->cfg->slowdown > 1.0)
			dt *= w->cfg->slowdown;
		double rate = dt > 0 ? CAL_ROWS * CAL_K / dt : 0;
		if (rate > best)
			best = rate;
	}
out:
	shard_destroy(&s);
	free(wts);
	free(x);
	free(out);
	return best;
}

/* The memory limit of this process's cgroup (v1 memory controller or v2),
 * or 0 when there is none. */
static uint64_t worker_cgroup_limit(void)
{
	FILE *f = fopen("/proc/self/cgroup", "r");
	if (!f)
		return 0;
	char line[512], path[700];
	uint64_t limit = 0;
	while (!limit && fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = 0;
		const char *rel = NULL, *file = NULL;
		if (!strncmp(line, "0::", 3)) {
			rel = line + 3;
			file = "/sys/fs/cgroup%s/memory.max";
		} else if (strstr(line, ":memory:")) {
			rel = strstr(line, ":memory:") + 8;
			file = "/sys/fs/cgroup/memory%s/memory.limit_in_bytes";
		}
		if (!rel)
			continue;
		snprintf(path, sizeof(path), file, rel);
		FILE *g = fopen(path, "r");
		unsigned long long v;
		if (g && fscanf(g, "%llu", &v) == 1 && v < (1ull << 60))
			limit = v; /* "max" or a huge number: no limit */
		if (g)
			fclose(g);
	}
	fclose(f);
	return limit;
}

/* Opens the -m file; a per-node shard file also fills w->sf and the Hello
 * fields that list what it holds. */
static int worker_open_model(struct worker *w, struct wire_hello *h)
{
	w->g = w->cfg->model;
	if (!w->g && !w->cfg->model_path)
		return 0;
	if (!w->g) {
		int rc = gguf_open(w->cfg->model_path, &w->g_own);
		if (rc)
			return rc;
		w->g = w->g_own;
	}
	h->has_model = 1;
	/* expert bytes are read only where assigned: no read-around (it may be
	 * megabytes) into the neighbours another worker holds */
	for (uint64_t i = 0; i < gguf_n_tensors(w->g); i++) {
		const gguf_tensor *x = gguf_tensor_at(w->g, i);
		if (strstr(x->name, "_exps."))
			worker_advise(x->data, x->n_bytes, MADV_RANDOM);
	}
	int rc = shardfile_read(w->g, &w->sf);
	if (rc == ERR_RANGE) {
		snprintf(h->model_sha, sizeof(h->model_sha), "size:%llu",
			 (unsigned long long)gguf_file_size(w->g));
		log_info("worker: %s holds every expert", gguf_path(w->g));
		return 0;
	}
	if (rc)
		return rc;
	const struct shardfile *sf = &w->sf;
	h->shard_file = 1;
	snprintf(h->model_sha, sizeof(h->model_sha), "%s", sf->model);
	h->held_layer = malloc((sf->n_held ? sf->n_held : 1) * sizeof(uint32_t));
	h->held_expert = malloc((sf->n_held ? sf->n_held : 1) * sizeof(uint32_t));
	if (!h->held_layer || !h->held_expert)
		return ERR_NOMEM;
	for (int l = 0; l < sf->n_layer; l++)
		for (int e = 0; e < sf->n_expert; e++)
			if (shardfile_slot(sf, l, e) >= 0) {
				h->held_layer[h->n_held] = (uint32_t)l;
				h->held_expert[h->n_held++] = (uint32_t)e;
			}
	log_info("worker: %s is shard file %u of %u (model %s): %u of %d x %d experts",
		 gguf_path(w->g), sf->index, sf->count, sf->model, sf->n_held, sf->n_layer,
		 sf->n_expert);
	for (int l = 0; l < sf->n_layer; l++)
		if (sf->layer_held[l])
			log_info("worker:   layer %d: %u experts", l, sf->layer_held[l]);
	return 0;
}

void worker_budgets(const struct worker_config *cfg, uint64_t node, uint64_t *experts, uint64_t *kv,
		    int *shared)
{
	*shared = 0;
	const uint64_t m = cfg->memory_bytes,
		       k = cfg->kv_memory_bytes > 0 ? (uint64_t)cfg->kv_memory_bytes : 0;
	if (cfg->kv_only) {
		*experts = 0;
		*kv = k ? k : node;
	} else if (cfg->kv_memory_bytes < 0) {
		*experts = m ? m : node;
		*kv = 0;
	} else if (m && k) {
		*experts = m;
		*kv = k;
	} else if (m) {
		*experts = m;
		*kv = node > m ? node - m : 0;
	} else if (k) {
		*experts = node > k ? node - k : 0;
		*kv = k;
	} else {
		*experts = node;
		*kv = node;
		*shared = 1;
	}
}

int worker_run(transport *t, const struct worker_config *cfg)
{
	struct worker w = {.t = t, .cfg = cfg};
	struct wire_msg hello = {.kind = WIRE_HELLO};
	int rc = 0;
	kern_init();
	rc = pool_new(cfg->n_threads, &w.pool);
	if (rc)
		goto out;
	rc = worker_open_model(&w, &hello.u.hello);
	if (rc)
		goto out;
	hello.u.hello.cores = (uint32_t)pool_size(w.pool);
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGE_SIZE);
	uint64_t phys = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
	uint64_t cg = worker_cgroup_limit(), have = cg && (!phys || cg < phys) ? cg : phys;
	/* what the node has, less room for this program, its buffers and the
	 * system, split between experts and KV pages */
	const uint64_t node = have > 2 * WORKER_RESERVE ? have - WORKER_RESERVE : have / 2;
	worker_budgets(cfg, node, &hello.u.hello.memory_bytes, &hello.u.hello.kv_bytes,
		       &hello.u.hello.kv_shared);
	if (hello.u.hello.kv_shared)
		w.kv_shared = node;
	else if (hello.u.hello.memory_bytes + hello.u.hello.kv_bytes > node)
		log_warn("worker: offers %.2f GiB for experts and %.2f GiB for KV pages, more "
			 "than the %.2f GiB this node has",
			 (double)hello.u.hello.memory_bytes / (1 << 30),
			 (double)hello.u.hello.kv_bytes / (1 << 30), (double)node / (1 << 30));
	if (!cfg->kv_only && !hello.u.hello.memory_bytes) {
		log_error("worker: no memory left for experts (--kv-memory takes all of the "
			  "node's %.2f GiB): give --memory, or run it --kv-only",
			  (double)node / (1 << 30));
		rc = ERR_CONFIG;
		goto out;
	}
	if (hello.u.hello.kv_bytes) {
		rc = kvstore_new(hello.u.hello.kv_bytes, &w.kv);
		if (rc)
			goto out;
	}
	log_info("worker: offers %.2f GiB for experts, %.2f GiB for KV pages%s",
		 (double)hello.u.hello.memory_bytes / (1 << 30),
		 (double)hello.u.hello.kv_bytes / (1 << 30),
		 hello.u.hello.kv_shared
		     ? " (the same memory: the pages take what the experts leave)"
		     : "");
	hello.u.hello.expert_rows_per_sec = worker_calibrate(&w);
	if (cfg->name)
		snprintf(hello.u.hello.name, sizeof(hello.u.hello.name), "%s", cfg->name);
	else
		gethostname(hello.u.hello.name, sizeof(hello.u.hello.name) - 1);
	rc = worker_send(&w, &hello, NULL, 0);
	if (rc) {
		log_error("cannot reach the coordinator");
		goto out;
	}
	/* waiting for a coordinator: Hello is sent again with a growing interval
	 * (messages queue while disconnected; a coordinator takes the first and
	 * ignores repeats) until one answers or cfg->reconnect_ms passes */
	int waiting = cfg->reconnect_ms > 0;
	double now = worker_now(), idle_since = now, wait_since = now, backoff = 0.25;
	double next_hello = now + backoff, last_probe = now;
	for (;;) {
		struct transport_frame f;
		now = worker_now();
		int wait_ms = 1000;
		if (waiting)
			wait_ms = (int)fmax(1.0, fmin(1000.0, (next_hello - now) * 1000.0));
		rc = transport_recv(t, wait_ms, &f);
		now = worker_now();
		if (rc == ERR_PEER) {
			if (waiting && (now - wait_since) * 1000.0 > cfg->reconnect_ms) {
				log_error("no coordinator answered within %d ms, giving up",
					  cfg->reconnect_ms);
				goto out;
			}
			if (waiting && now >= next_hello) {
				backoff = fmin(2 * backoff, 4.0);
				next_hello = now + backoff;
				rc = worker_send(&w, &hello, NULL, 0);
				if (rc)
					goto out;
				continue;
			}
			if (!waiting && cfg->reconnect_ms > 0 &&
			    now - idle_since > WORKER_PROBE_S &&
			    now - last_probe > WORKER_PROBE_S) {
				/* a coordinator that restarted does not know this worker and
				 * answers with Shutdown(rejoin); a live one ignores this */
				struct wire_msg hb = {.kind = WIRE_HEARTBEAT};
				last_probe = now;
				rc = worker_send(&w, &hb, NULL, 0);
				if (rc)
					goto out;
				continue;
			}
			if (cfg->idle_timeout_ms > 0 &&
			    (now - idle_since) * 1000.0 > cfg->idle_timeout_ms) {
				log_error("coordinator silent for %d ms, giving up",
					  cfg->idle_timeout_ms);
				goto out;
			}
			continue;
		}
		if (rc)
			goto out;
		idle_since = now;
		if (f.bad)
			continue;
		w.stats.bytes_in += f.hdr_len + f.data_len;
		struct wire_msg m;
		if (wire_decode(f.hdr, f.hdr_len, "coordinator", &m)) {
			worker_error(&w, "undecodable message");
			continue;
		}
		if (m.kind != WIRE_SHUTDOWN)
			waiting = 0;
		int has_frame = m.kind == WIRE_BATCH || m.kind == WIRE_WEIGHT_CHUNK ||
				m.kind == WIRE_KV_PAGE || m.kind == WIRE_ATTN_BATCH ||
				m.kind == WIRE_IDX_BATCH;
		if (!has_frame && f.data) {
			worker_error(&w, "unexpected raw frame");
			wire_msg_free(&m);
			continue;
		}
		switch (m.kind) {
		case WIRE_ASSIGN: rc = worker_on_assign(&w, &m.u.assign); break;
		case WIRE_RELEASE: rc = worker_on_release(&w, &m.u.release); break;
		case WIRE_WEIGHT_CHUNK:
			rc = worker_on_chunk(&w, &m.u.chunk, f.data, f.data_len);
			break;
		case WIRE_BATCH:
			if (cfg->fault == WORKER_FAULT_DIE) {
				wire_msg_free(&m);
				rc = ERR_PEER;
				goto out;
			}
			if (cfg->fault == WORKER_FAULT_STOP)
				raise(SIGSTOP);
			rc = worker_on_batch(&w, &m.u.batch, f.data, f.data_len);
			break;
		case WIRE_KV_PAGE:
			rc = worker_on_kv_page(&w, &m.u.kv_page, f.data, f.data_len);
			break;
		case WIRE_KV_FREE: /* a worker that holds no page has none to drop */
			if (w.kv)
				kvstore_free_seq(w.kv, (int32_t)m.u.kv_free.seq);
			break;
		case WIRE_ATTN_BATCH:
			rc = worker_on_attn_batch(&w, &m.u.attn_batch, f.data, f.data_len);
			break;
		case WIRE_IDX_BATCH:
			rc = worker_on_idx_batch(&w, &m.u.idx_batch, f.data, f.data_len);
			break;
		case WIRE_HEARTBEAT: rc = worker_send(&w, &m, NULL, 0); break;
		case WIRE_STATS: {
			struct wire_msg s = {.kind = WIRE_STATS};
			s.u.stats = w.stats;
			s.u.stats.kv_pages = w.kv ? kvstore_n_pages(w.kv) : 0;
			s.u.stats.kv_bytes = w.kv ? kvstore_bytes(w.kv) : 0;
			rc = worker_send(&w, &s, NULL, 0);
			break;
		}
		case WIRE_SHUTDOWN:
			if (!m.shutdown_rejoin && cfg->reconnect_ms <= 0) {
				log_info("worker: shutdown (%s)", m.u.text);
				wire_msg_free(&m);
				rc = 0;
				goto out;
			}
			/* forget everything and say Hello to whichever coordinator
			 * answers: this one (rejoin) or the next one */
			log_info("worker: %s (%s); saying Hello again",
				 m.shutdown_rejoin ? "the coordinator asks to rejoin"
						   : "the coordinator shut down",
				 m.u.text);
			worker_clear(&w);
			if (w.kv) {
				kvstore_destroy(&w.kv);
				rc = kvstore_new(hello.u.hello.kv_bytes, &w.kv);
				if (rc) {
					wire_msg_free(&m);
					goto out;
				}
			}
			w.epoch = 0;
			w.initial = 0;
			if (!waiting) { /* a refusal while waiting does not extend the wait */
				wait_since = now;
				backoff = 0.25;
				next_hello = now + backoff;
			}
			waiting = cfg->reconnect_ms > 0;
			if (m.shutdown_rejoin)
				rc = worker_send(&w, &hello, NULL, 0);
			break;
		default: worker_error(&w, "unexpected message kind"); break;
		}
		wire_msg_free(&m);
		if (rc)
			goto out;
	}
out:
	worker_clear(&w);
	kvstore_destroy(&w.kv);
	attn_host_scratch_destroy(&w.attn);
	free(w.hdr);
	free(w.out);
	free(w.items);
	wire_msg_free(&hello);
	shardfile_free(&w.sf);
	gguf_destroy(&w.g_own);
	pool_destroy(&w.pool);
	return rc;
}
