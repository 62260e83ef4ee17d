#include "trace.h"
#include "../common/err.h"
#include "../common/log.h"

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
	uint32_t len = (uint32_t)n[0] | (uint32_t)n[1] << 8 | (uint32_t)n[2] << 16 |
		       (uint32_t)n[3] << 24;
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
};

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
	};
	if (!b->wrote_header) {
		rec.n_layer = (uint32_t)b->spec.n_layer;
		rec.n_expert = (uint32_t)b->spec.n_expert;
		rec.n_embd = (uint32_t)b->spec.n_embd;
		rec.expert_bytes = b->bytes;
		if (b->p) {
			rec.n_replica = (uint32_t)b->p->n_replica;
			rec.holders = b->p->holder;
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
	free(b);
}

static const struct expert_backend_ops trace_ops = {trace_submit, trace_collect, trace_destroy};

int trace_backend_new(expert_backend *inner, trace_writer *w, const gguf *g,
		      const struct moe_spec *spec, const placement *p, expert_backend **out)
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
	return expert_backend_new(&trace_ops, b, out);
}
