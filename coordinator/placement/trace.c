#include "trace.h"
#include "../../common/err.h"
#include "../../common/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct trace_writer {
	FILE *f;
	char *path;
	uint8_t *buf;
	size_t cap;
	int failed;
};

struct trace_reader {
	FILE *f;
	char *path;
	uint8_t *buf;
	size_t cap;
};

int trace_writer_open(const char *path, trace_writer **out)
{
	*out = NULL;
	trace_writer *w = calloc(1, sizeof(*w));
	if (!w)
		return ERR_NOMEM;
	w->f = fopen(path, "wb");
	w->path = strdup(path);
	if (!w->f || !w->path) {
		log_error("%s: cannot write: %s", path, strerror(errno));
		if (w->f)
			fclose(w->f);
		free(w->path);
		free(w);
		return ERR_IO;
	}
	*out = w;
	return 0;
}

int trace_write(trace_writer *w, const struct wire_trace *rec)
{
	size_t len;
	int rc = wire_encode_trace(rec, &w->buf, &w->cap, &len);
	if (rc)
		return rc;
	uint8_t n[4] = {(uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16),
			(uint8_t)(len >> 24)};
	if (fwrite(n, 1, 4, w->f) != 4 || fwrite(w->buf, 1, len, w->f) != len) {
		if (!w->failed)
			log_error("%s: write failed: %s", w->path, strerror(errno));
		w->failed = 1;
		return ERR_IO;
	}
	return 0;
}

int trace_writer_close(trace_writer **pw)
{
	trace_writer *w = *pw;
	if (!w)
		return 0;
	int rc = w->failed ? ERR_IO : 0;
	if (fclose(w->f) != 0 && !rc) {
		log_error("%s: write failed: %s", w->path, strerror(errno));
		rc = ERR_IO;
	}
	free(w->buf);
	free(w->path);
	free(w);
	*pw = NULL;
	return rc;
}

int trace_reader_open(const char *path, trace_reader **out)
{
	*out = NULL;
	trace_reader *r = calloc(1, sizeof(*r));
	if (!r)
		return ERR_NOMEM;
	r->f = fopen(path, "rb");
	r->path = strdup(path);
	if (!r->f || !r->path) {
		log_error("%s: cannot open: %s", path, strerror(errno));
		trace_reader_close(&r);
		return ERR_IO;
	}
	*out = r;
	return 0;
}

int trace_read(trace_reader *r, struct wire_trace *rec)
{
	uint8_t n[4];
	size_t got = fread(n, 1, 4, r->f);
	if (got == 0 && feof(r->f))
		return 1;
	if (got != 4) {
		log_error("%s: truncated trace record", r->path);
		return ERR_FORMAT;
	}
	uint32_t len =
	    (uint32_t)n[0] | (uint32_t)n[1] << 8 | (uint32_t)n[2] << 16 | (uint32_t)n[3] << 24;
	if (len > WIRE_MAX_HEADER) {
		log_error("%s: trace record of %u bytes exceeds the cap", r->path, len);
		return ERR_FORMAT;
	}
	if (len > r->cap) {
		uint8_t *b = realloc(r->buf, len);
		if (!b)
			return ERR_NOMEM;
		r->buf = b;
		r->cap = len;
	}
	if (fread(r->buf, 1, len, r->f) != len) {
		log_error("%s: truncated trace record", r->path);
		return ERR_FORMAT;
	}
	int rc = wire_decode_trace(r->buf, len, rec);
	if (rc)
		log_error("%s: invalid trace record", r->path);
	return rc;
}

void trace_reader_close(trace_reader **pr)
{
	trace_reader *r = *pr;
	if (!r)
		return;
	if (r->f)
		fclose(r->f);
	free(r->buf);
	free(r->path);
	free(r);
	*pr = NULL;
}

void trace_expert_bytes(const gguf *g, const struct moe_spec *spec, uint64_t *bytes)
{
	static const char *names[3] = {"gate", "up", "down"};
	for (int l = 0; l < spec->n_layer; l++) {
		bytes[l] = 0;
		if (!spec->layer_moe[l] || spec->n_expert < 1)
			continue;
		for (int t = 0; t < 3; t++) {
			char name[96];
			snprintf(name, sizeof(name), "blk.%d.ffn_%s_exps.weight", l, names[t]);
			const gguf_tensor *x = gguf_find_tensor(g, name);
			if (x)
				bytes[l] += x->n_bytes / (uint64_t)spec->n_expert;
		}
	}
}

/* ------------------------------------------------------------ backend */

struct trace_backend {
	expert_backend *inner;
	trace_writer *w;
	struct moe_spec spec;
	uint64_t bytes[MOE_MAX_LAYERS];
	const placement *p;
	uint64_t step;
	int last_layer;
	int wrote_header;
	/* the micro-batch being computed (model_set_batch_observer) */
	const int32_t *pos;
	int n_pos;
	/* the placement last recorded, to record it again when it changes */
	int32_t *holders;
	size_t n_holders;
};

static void trace_observe(void *ctx, const model_batch *ub)
{
	struct trace_backend *b = ctx;
	b->pos = ub->pos;
	b->n_pos = ub->n_tokens;
}

static int trace_submit(void *self, const struct expert_job *job)
{
	struct trace_backend *b = self;
	if (job->layer <= b->last_layer)
		b->step++;
	b->last_layer = job->layer;
	struct wire_trace rec = {
	    .step = b->step,
	    .layer = (uint32_t)job->layer,
	    .n_rows = (uint32_t)job->n_rows,
	    .k = (uint32_t)job->k,
	    .ids = (int32_t *)job->ids,
	    .weights = (float *)job->weights,
	    /* rows are the micro-batch's tokens, in order */
	    .positions = b->pos && b->n_pos == job->n_rows ? (int32_t *)b->pos : NULL,
	};
	size_t n_h = b->p ? (size_t)b->p->n_layer * b->p->n_expert * b->p->n_replica : 0;
	int moved = b->p && (n_h != b->n_holders ||
			     memcmp(b->holders, b->p->holder, n_h * sizeof(int32_t)) != 0);
	if (!b->wrote_header || moved) {
		/* the table, and the placement whenever it changed */
		rec.n_layer = (uint32_t)b->spec.n_layer;
		rec.n_expert = (uint32_t)b->spec.n_expert;
		rec.n_embd = (uint32_t)b->spec.n_embd;
		rec.expert_bytes = b->bytes;
		if (b->p) {
			rec.n_replica = (uint32_t)b->p->n_replica;
			rec.holders = b->p->holder;
			int32_t *h = realloc(b->holders, (n_h ? n_h : 1) * sizeof(int32_t));
			if (h) {
				memcpy(h, b->p->holder, n_h * sizeof(int32_t));
				b->holders = h;
				b->n_holders = n_h;
			}
		}
		b->wrote_header = 1;
	}
	trace_write(b->w, &rec); /* a failed trace is reported once, not fatal */
	return expert_backend_submit(b->inner, job);
}

static int trace_collect(void *self, const struct expert_job *job)
{
	struct trace_backend *b = self;
	return expert_backend_collect(b->inner, job);
}

static void trace_destroy(void *self)
{
	struct trace_backend *b = self;
	expert_backend_destroy(&b->inner);
	trace_writer_close(&b->w);
	free(b->holders);
	free(b);
}

static const struct expert_backend_ops trace_ops = {trace_submit, trace_collect, trace_destroy};

static int trace_backend_create(expert_backend *inner, trace_writer *w, const gguf *g,
				const struct moe_spec *spec, const placement *p,
				struct trace_backend **tb, expert_backend **out)
{
	*out = NULL;
	struct trace_backend *b = calloc(1, sizeof(*b));
	if (!b) {
		expert_backend_destroy(&inner);
		trace_writer_close(&w);
		return ERR_NOMEM;
	}
	b->inner = inner;
	b->w = w;
	b->spec = *spec;
	b->p = p;
	b->last_layer = 1 << 30;
	b->step = (uint64_t)-1;
	trace_expert_bytes(g, spec, b->bytes);
	*tb = b;
	return expert_backend_new(&trace_ops, b, out);
}

int trace_backend_new(expert_backend *inner, trace_writer *w, const gguf *g,
		      const struct moe_spec *spec, const placement *p, expert_backend **out)
{
	struct trace_backend *tb;
	return trace_backend_create(inner, w, g, spec, p, &tb, out);
}

int trace_attach(model *m, trace_writer *w, const placement *p)
{
	expert_backend *inner = model_take_experts(m), *b = NULL;
	struct trace_backend *tb = NULL;
	int rc =
	    trace_backend_create(inner, w, model_get_gguf(m), &model_get_info(m)->moe, p, &tb, &b);
	model_set_experts(m, b);
	if (!rc)
		model_set_batch_observer(m, trace_observe, tb);
	return rc;
}

/* ------------------------------------------------------------ summary */

void trace_summary_free(struct trace_summary *s)
{
	free(s->load);
	free(s->holders);
	memset(s, 0, sizeof(*s));
}

int trace_summarize(const char *path, struct trace_summary *out)
{
	memset(out, 0, sizeof(*out));
	trace_reader *r = NULL;
	struct wire_trace rec = {0};
	int rc = trace_reader_open(path, &r);
	uint64_t last_step = 0;
	out->pos_min = INT32_MAX;
	out->pos_max = -1;
	while (!rc) {
		rc = trace_read(r, &rec);
		if (rc == 1) {
			rc = 0;
			break;
		}
		if (rc)
			break;
		if (out->records == 0 && rec.n_layer == 0) {
			log_error("%s: the first record has no model table", path);
			rc = ERR_FORMAT;
			break;
		}
		if (rec.n_layer) {
			if (out->records == 0) {
				if (rec.n_layer > MOE_MAX_LAYERS || rec.n_expert < 1 ||
				    (uint64_t)rec.n_layer * rec.n_expert > (1u << 24)) {
					log_error("%s: model table out of range", path);
					rc = ERR_FORMAT;
					break;
				}
				out->n_layer = rec.n_layer;
				out->n_expert = rec.n_expert;
				out->n_embd = rec.n_embd;
				for (uint32_t l = 0; l < rec.n_layer; l++)
					out->layer_moe[l] =
					    rec.expert_bytes && rec.expert_bytes[l] > 0;
				out->load =
				    calloc((size_t)rec.n_layer * rec.n_expert, sizeof(double));
				if (!out->load) {
					rc = ERR_NOMEM;
					break;
				}
			} else if (rec.n_layer != out->n_layer || rec.n_expert != out->n_expert) {
				log_error("%s: step %llu: model table changed", path,
					  (unsigned long long)rec.step);
				rc = ERR_FORMAT;
				break;
			}
			if (rec.holders && rec.n_replica) {
				size_t n = (size_t)rec.n_layer * rec.n_expert * rec.n_replica;
				int32_t *h = realloc(out->holders, n * sizeof(int32_t));
				if (!h) {
					rc = ERR_NOMEM;
					break;
				}
				memcpy(h, rec.holders, n * sizeof(int32_t));
				out->holders = h;
				out->n_replica = rec.n_replica;
				out->placements++;
				for (size_t i = 0; i < n; i++)
					if (h[i] >= out->n_worker)
						out->n_worker = h[i] + 1;
			}
		}
		if (rec.layer >= out->n_layer) {
			log_error("%s: record for layer %u of %u", path, rec.layer, out->n_layer);
			rc = ERR_FORMAT;
			break;
		}
		if (out->records == 0 || rec.step != last_step)
			out->steps++;
		last_step = rec.step;
		out->records++;
		for (size_t i = 0; i < (size_t)rec.n_rows * rec.k; i++) {
			int32_t e = rec.ids[i];
			if (e >= (int32_t)out->n_expert) {
				log_error("%s: expert %d of %u", path, e, out->n_expert);
				rc = ERR_FORMAT;
				break;
			}
			if (e >= 0)
				out->load[(size_t)rec.layer * out->n_expert + (size_t)e] += 1.0;
		}
		for (uint32_t i = 0; rec.positions && i < rec.n_rows; i++) {
			out->n_positions++;
			if (rec.positions[i] < out->pos_min)
				out->pos_min = rec.positions[i];
			if (rec.positions[i] > out->pos_max)
				out->pos_max = rec.positions[i];
		}
		out->rows += rec.n_rows;
		wire_trace_free(&rec);
	}
	wire_trace_free(&rec);
	trace_reader_close(&r);
	if (!rc && out->records == 0) {
		log_error("%s: empty trace", path);
		rc = ERR_FORMAT;
	}
	if (rc)
		trace_summary_free(out);
	return rc;
}
