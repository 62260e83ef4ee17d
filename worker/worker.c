#define _GNU_SOURCE
#include "worker.h"
#include "shard.h"
#include "../common/err.h"
#include "../common/gguf.h"
#include "../common/log.h"
#include "../common/pool.h"
#include "../common/wire.h"
#include "../kernels/kern.h"

#include <signal.h>
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

struct worker {
	transport *t;
	const struct worker_config *cfg;
	pool *pool;
	gguf *g;
	shard *shard;
	struct moe_spec spec;
	uint64_t epoch;
	/* streaming */
	struct worker_buf *bufs;
	size_t n_bufs, n_bufs_done;
	uint32_t n_pairs;
	uint32_t *pair_layer, *pair_expert;
	/* serving */
	uint8_t *hdr;
	size_t hdr_cap;
	float *out;   /* n_rows x k x n_embd */
	float *items; /* packed results */
	size_t out_cap, items_cap;
	struct wire_stats stats;
};

static double worker_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
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
	w->n_bufs = w->n_bufs_done = 0;
}

static int worker_send_ready(struct worker *w)
{
	struct wire_msg m = {.kind = WIRE_READY};
	m.u.ready.placement_epoch = w->epoch;
	m.u.ready.n_experts = (uint32_t)shard_n_experts(w->shard);
	uint64_t bytes = 0;
	for (size_t i = 0; i < w->n_bufs; i++)
		bytes += w->bufs[i].total;
	m.u.ready.bytes = bytes;
	log_info("worker: %u experts ready", m.u.ready.n_experts);
	return worker_send(w, &m, NULL, 0);
}

/* All chunks arrived: hand the buffers to the shard. */
static int worker_finish_stream(struct worker *w)
{
	for (uint32_t i = 0; i < w->n_pairs; i++) {
		struct shard_expert_src src = {0};
		for (size_t b = 0; b < w->n_bufs; b++) {
			struct worker_buf *wb = &w->bufs[b];
			if (wb->layer != w->pair_layer[i] || wb->expert != w->pair_expert[i])
				continue;
			if (wb->tensor < 3) {
				src.weights[wb->tensor] = wb->bytes;
				src.types[wb->tensor] = wb->type;
			} else {
				src.biases[wb->tensor - 3] = (const float *)wb->bytes;
			}
		}
		int rc = shard_add_expert(w->shard, (int)w->pair_layer[i], (int)w->pair_expert[i],
					  &src);
		if (rc)
			return rc;
	}
	return worker_send_ready(w);
}

static int worker_on_assign(struct worker *w, const struct wire_assign *a)
{
	/* a new epoch while serving from the local file: add the experts it
	 * lacks to the live shard (mmap pointers: nothing is read until used) */
	if (w->shard && w->g && !a->stream && w->n_bufs == 0 && a->placement_epoch > w->epoch &&
	    memcmp(&a->spec, &w->spec, sizeof(a->spec)) == 0) {
		for (uint32_t i = 0; i < a->n_pairs; i++) {
			int l = (int)a->pair_layer[i], e = (int)a->pair_expert[i];
			if (shard_has(w->shard, l, e))
				continue;
			int rc = shard_add_from_gguf(w->shard, w->g, l, e);
			if (rc)
				return rc;
		}
		w->epoch = a->placement_epoch;
		return worker_send_ready(w);
	}
	shard_destroy(&w->shard);
	worker_free_bufs(w);
	free(w->pair_layer);
	free(w->pair_expert);
	w->pair_layer = w->pair_expert = NULL;
	w->spec = a->spec;
	w->epoch = a->placement_epoch;
	int rc = shard_new(&w->spec, &w->shard);
	if (rc)
		return rc;
	int stream = a->stream || !w->g;
	log_info("worker: assigned %u experts (%s)", a->n_pairs,
		 stream ? "streamed from the coordinator" : "from the local model file");
	if (!stream) {
		for (uint32_t i = 0; i < a->n_pairs; i++) {
			rc = shard_add_from_gguf(w->shard, w->g, (int)a->pair_layer[i],
						 (int)a->pair_expert[i]);
			if (rc)
				return rc;
		}
		return worker_send_ready(w);
	}
	/* expect 3 (or 6 with biases) tensors per expert */
	size_t per = w->spec.has_bias ? 6 : 3;
	w->n_pairs = a->n_pairs;
	w->pair_layer = malloc((a->n_pairs + 1) * sizeof(uint32_t));
	w->pair_expert = malloc((a->n_pairs + 1) * sizeof(uint32_t));
	w->bufs = calloc((size_t)a->n_pairs * per + 1, sizeof(*w->bufs));
	if (!w->pair_layer || !w->pair_expert || !w->bufs)
		return ERR_NOMEM;
	memcpy(w->pair_layer, a->pair_layer, a->n_pairs * sizeof(uint32_t));
	memcpy(w->pair_expert, a->pair_expert, a->n_pairs * sizeof(uint32_t));
	for (uint32_t i = 0; i < a->n_pairs; i++) {
		for (size_t t = 0; t < per; t++) {
			struct worker_buf *b = &w->bufs[w->n_bufs++];
			b->layer = a->pair_layer[i];
			b->expert = a->pair_expert[i];
			b->tensor = (uint32_t)t;
		}
	}
	if (a->n_pairs == 0)
		return worker_send_ready(w);
	return 0;
}

static int worker_on_chunk(struct worker *w, const struct wire_weight_chunk *c,
			   const uint8_t *data, size_t n)
{
	struct worker_buf *b = NULL;
	for (size_t i = 0; i < w->n_bufs && !b; i++)
		if (w->bufs[i].layer == c->layer && w->bufs[i].expert == c->expert &&
		    w->bufs[i].tensor == c->tensor)
			b = &w->bufs[i];
	if (!b) {
		worker_error(w, "weight chunk for an expert that was not assigned");
		return 0;
	}
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
	    n > c->total - c->offset) {
		worker_error(w, "weight chunk with inconsistent size, type or offset");
		return 0;
	}
	if (!b->bytes) {
		if (w->cfg->memory_bytes && want > w->cfg->memory_bytes) {
			worker_error(w, "expert larger than this worker's memory budget");
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
	if (b->received == b->total && ++w->n_bufs_done == w->n_bufs)
		return worker_finish_stream(w);
	return 0;
}

static int worker_on_batch(struct worker *w, const struct wire_batch *b, const uint8_t *data,
			   size_t n)
{
	if (!w->shard || w->n_bufs_done != w->n_bufs) {
		worker_error(w, "batch before the experts were loaded");
		return 0;
	}
	const size_t E = (size_t)w->spec.n_embd;
	if (b->layer >= (uint32_t)w->spec.n_layer || n != wire_batch_frame_bytes(b, (uint32_t)E) ||
	    b->k > (uint32_t)w->spec.n_expert) {
		worker_error(w, "batch with a bad layer, k or activation frame size");
		return 0;
	}
	double t0 = worker_now();
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
	if (slots * E > w->out_cap) {
		free(w->out);
		w->out = malloc(slots * E * sizeof(float));
		w->out_cap = w->out ? slots * E : 0;
		if (!w->out)
			return ERR_NOMEM;
	}
	if (n_items * E > w->items_cap || !w->items) {
		free(w->items);
		w->items = malloc((n_items ? n_items : 1) * E * sizeof(float));
		w->items_cap = w->items ? n_items * E : 0;
		if (!w->items)
			return ERR_NOMEM;
	}
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
	double dt = worker_now() - t0;
	if (w->cfg->slowdown > 1.0) {
		/* emulate slower hardware: stretch this batch to slowdown x its time */
		double extra = dt * (w->cfg->slowdown - 1.0);
		struct timespec ts = {(time_t)extra, (long)((extra - (double)(time_t)extra) * 1e9)};
		nanosleep(&ts, NULL);
		dt = worker_now() - t0;
	}
	w->stats.rows += b->n_rows;
	w->stats.items += n_items;
	w->stats.compute_seconds += dt;
	struct wire_msg m = {.kind = WIRE_RESULT};
	m.u.result = (struct wire_result){b->step, b->layer, (uint32_t)n_items, dt};
	return worker_send(w, &m, w->items, n_items * E * sizeof(float));
}

static int worker_open_model(struct worker *w)
{
	if (!w->cfg->model_path)
		return 0;
	return gguf_open(w->cfg->model_path, &w->g);
}

int worker_run(transport *t, const struct worker_config *cfg)
{
	struct worker w = {.t = t, .cfg = cfg};
	int rc = 0;
	kern_init();
	rc = pool_new(cfg->n_threads, &w.pool);
	if (rc)
		goto out;
	rc = worker_open_model(&w);
	if (rc)
		goto out;
	struct wire_msg hello = {.kind = WIRE_HELLO};
	hello.u.hello.cores = (uint32_t)pool_size(w.pool);
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGE_SIZE);
	hello.u.hello.memory_bytes = cfg->memory_bytes
					     ? cfg->memory_bytes
					     : (pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0);
	hello.u.hello.has_model = w.g != NULL;
	if (w.g)
		snprintf(hello.u.hello.model_sha, sizeof(hello.u.hello.model_sha), "size:%llu",
			 (unsigned long long)gguf_file_size(w.g));
	if (cfg->name)
		snprintf(hello.u.hello.name, sizeof(hello.u.hello.name), "%s", cfg->name);
	else
		gethostname(hello.u.hello.name, sizeof(hello.u.hello.name) - 1);
	rc = worker_send(&w, &hello, NULL, 0);
	if (rc) {
		log_error("cannot reach the coordinator");
		goto out;
	}
	double idle_since = worker_now();
	for (;;) {
		struct transport_frame f;
		rc = transport_recv(t, 1000, &f);
		if (rc == ERR_PEER) {
			if (cfg->idle_timeout_ms > 0 &&
			    (worker_now() - idle_since) * 1000.0 > cfg->idle_timeout_ms) {
				log_error("coordinator silent for %d ms, giving up",
					  cfg->idle_timeout_ms);
				goto out;
			}
			continue;
		}
		if (rc)
			goto out;
		idle_since = worker_now();
		if (f.bad)
			continue;
		w.stats.bytes_in += f.hdr_len + f.data_len;
		struct wire_msg m;
		if (wire_decode(f.hdr, f.hdr_len, "coordinator", &m)) {
			worker_error(&w, "undecodable message");
			continue;
		}
		int has_frame = m.kind == WIRE_BATCH || m.kind == WIRE_WEIGHT_CHUNK;
		if (!has_frame && f.data) {
			worker_error(&w, "unexpected raw frame");
			wire_msg_free(&m);
			continue;
		}
		switch (m.kind) {
		case WIRE_ASSIGN:
			rc = worker_on_assign(&w, &m.u.assign);
			break;
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
		case WIRE_HEARTBEAT:
			rc = worker_send(&w, &m, NULL, 0);
			break;
		case WIRE_STATS: {
			struct wire_msg s = {.kind = WIRE_STATS};
			s.u.stats = w.stats;
			rc = worker_send(&w, &s, NULL, 0);
			break;
		}
		case WIRE_SHUTDOWN:
			log_info("worker: shutdown (%s)", m.u.text);
			wire_msg_free(&m);
			rc = 0;
			goto out;
		default:
			worker_error(&w, "unexpected message kind");
			break;
		}
		wire_msg_free(&m);
		if (rc)
			goto out;
	}
out:
	shard_destroy(&w.shard);
	worker_free_bufs(&w);
	free(w.pair_layer);
	free(w.pair_expert);
	free(w.hdr);
	free(w.out);
	free(w.items);
	gguf_destroy(&w.g);
	pool_destroy(&w.pool);
	return rc;
}
