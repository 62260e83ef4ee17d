#include "ops.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

size_t ops_matmul_scratch(int64_t n_in, int64_t n_rows)
{
	/* F32 rows are the largest activation type */
	return (size_t)n_in * (size_t)n_rows * sizeof(float) + 64;
}

struct mm_job {
	uint32_t type;
	const void *w;
	int64_t n_in, n_out;
	const float *x;
	int64_t x_stride;
	int64_t n_rows;
	float *y;
	int64_t y_stride;
	void *xa;
	size_t xa_stride;
	enum kern_type at;
	int form; /* kern_matmul_form's batch_form */
};

static void mm_convert(void *ctx, int ith, int nth)
{
	struct mm_job *j = ctx;
	int64_t lo, hi;
	pool_split(j->n_rows, ith, nth, 1, &lo, &hi);
	for (int64_t r = lo; r < hi; r++)
		kern_convert_row(j->at, j->x + r * j->x_stride, (char *)j->xa + r * j->xa_stride,
				 j->n_in);
}

static void mm_compute(void *ctx, int ith, int nth)
{
	struct mm_job *j = ctx;
	int64_t lo, hi;
	pool_split(j->n_out, ith, nth, 16, &lo, &hi);
	if (lo < hi)
		kern_matmul_form(j->type, j->w, j->n_in, lo, hi, j->xa, j->xa_stride, j->n_rows,
				 j->y, j->y_stride, j->form);
}

/* The rows of the batch being computed (ops_batch_rows): per row, how many
 * rows its sequence has in the batch and its rank among them. */
static _Thread_local struct {
	int n;
	int32_t *n_seq_rows, *rank;
	int cap;
} ops_rows;

void ops_batch_rows(const int32_t *seq, int n_rows)
{
	ops_batch_rows_keep(seq, NULL, n_rows);
}

void ops_batch_rows_keep(const int32_t *seq, const uint8_t *keep, int n_batch)
{
	int n_rows = 0;
	ops_rows.n = 0;
	if (!seq || n_batch <= 0) { /* the batch is done: nothing outlives it */
		free(ops_rows.n_seq_rows);
		free(ops_rows.rank);
		ops_rows.n_seq_rows = ops_rows.rank = NULL;
		ops_rows.cap = 0;
		return;
	}
	for (int t = 0; t < n_batch; t++)
		n_rows += !keep || keep[t];
	if (n_rows == 0)
		return;
	if (n_rows > ops_rows.cap) {
		int32_t *a = realloc(ops_rows.n_seq_rows, (size_t)n_rows * sizeof(int32_t));
		if (a)
			ops_rows.n_seq_rows = a;
		int32_t *b = a ? realloc(ops_rows.rank, (size_t)n_rows * sizeof(int32_t)) : NULL;
		if (b)
			ops_rows.rank = b;
		if (!a || !b)
			return; /* no table: every product treats its rows as one sequence */
		ops_rows.cap = n_rows;
	}
	int r = 0;
	for (int t = 0; t < n_batch; t++) {
		if (keep && !keep[t])
			continue;
		int before = 0, all = 0;
		for (int q = 0; q < n_batch; q++)
			if ((!keep || keep[q]) && seq[q] == seq[t]) {
				before += q < t;
				all++;
			}
		ops_rows.rank[r] = before;
		ops_rows.n_seq_rows[r] = all;
		r++;
	}
	ops_rows.n = n_rows;
}

int64_t ops_seq_rows(int64_t r, int64_t n_rows)
{
	return ops_rows.n == n_rows ? ops_rows.n_seq_rows[r] : n_rows;
}

/* Whether row r of an n_rows product of a weight of type t takes llama.cpp's
 * batched form, as it would if r's sequence ran alone (kern_matmul_form).
 * Rows are taken as the batch's rows when there are as many, else as one
 * sequence. */
static int ops_row_form(uint32_t t, int64_t r, int64_t n_rows)
{
	int64_t n = n_rows, k = r;
	if (ops_rows.n == n_rows) {
		n = ops_rows.n_seq_rows[r];
		k = ops_rows.rank[r];
	}
	switch (t) {
	case KERN_F32:
	case KERN_F16: return n >= 2;
	case KERN_IQ4_XS: return n >= 8;
	case KERN_Q2_K:
	case KERN_Q4_K: return k < n - n % 4;
	default: return 0;
	}
}

/* -1 when the rows' forms differ, else the common form */
static int ops_rows_form(uint32_t t, int64_t n_rows)
{
	if (!kern_batch_form_type(t) || n_rows <= 0)
		return 0;
	const int f = ops_row_form(t, 0, n_rows);
	for (int64_t r = 1; r < n_rows; r++)
		if (ops_row_form(t, r, n_rows) != f)
			return -1;
	return f;
}

static void mm_run(pool *p, uint32_t type, const void *w, int64_t n_in, int64_t n_out,
		   const float *x, int64_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		   void *scratch, int form);

/* Rows of mixed forms: each form's rows gathered, multiplied, scattered back. */
static void mm_split(pool *p, uint32_t type, const void *w, int64_t n_in, int64_t n_out,
		     const float *x, int64_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		     void *scratch)
{
	float *xs = malloc((size_t)(n_rows * n_in) * sizeof(float));
	float *ys = malloc((size_t)(n_rows * n_out) * sizeof(float));
	int64_t *idx = malloc((size_t)n_rows * sizeof(int64_t));
	if (!xs || !ys || !idx) { /* no memory: one form for all (results stay defined) */
		mm_run(p, type, w, n_in, n_out, x, x_stride, n_rows, y, y_stride, scratch, 0);
		goto out;
	}
	for (int f = 0; f < 2; f++) {
		int64_t m = 0;
		for (int64_t r = 0; r < n_rows; r++)
			if (ops_row_form(type, r, n_rows) == f) {
				memcpy(xs + m * n_in, x + r * x_stride,
				       (size_t)n_in * sizeof(float));
				idx[m++] = r;
			}
		if (m == 0)
			continue;
		mm_run(p, type, w, n_in, n_out, xs, n_in, m, ys, n_out, scratch, f);
		for (int64_t i = 0; i < m; i++)
			memcpy(y + idx[i] * y_stride, ys + i * n_out,
			       (size_t)n_out * sizeof(float));
	}
out:
	free(xs);
	free(ys);
	free(idx);
}

void ops_matmul_raw(pool *p, uint32_t type, const void *w, int64_t n_in, int64_t n_out,
		    const float *x, int64_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		    void *scratch)
{
	const int form = ops_rows_form(type, n_rows);
	if (form < 0) {
		mm_split(p, type, w, n_in, n_out, x, x_stride, n_rows, y, y_stride, scratch);
		return;
	}
	mm_run(p, type, w, n_in, n_out, x, x_stride, n_rows, y, y_stride, scratch, form);
}

static void mm_run(pool *p, uint32_t type, const void *w, int64_t n_in, int64_t n_out,
		   const float *x, int64_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		   void *scratch, int form)
{
	struct mm_job j = {
	    .type = type,
	    .w = w,
	    .n_in = n_in,
	    .n_out = n_out,
	    .x = x,
	    .x_stride = x_stride,
	    .n_rows = n_rows,
	    .y = y,
	    .y_stride = y_stride,
	    .xa = scratch,
	    .at = kern_act_type(type),
	    .form = form,
	};
	j.xa_stride = kern_row_bytes(j.at, n_in);
	if (n_rows * n_in < 4096 || pool_size(p) == 1) {
		mm_convert(&j, 0, 1);
	} else {
		pool_run(p, mm_convert, &j);
	}
	if ((double)n_in * (double)n_out * (double)n_rows < 16384.0) {
		mm_compute(&j, 0, 1);
		return;
	}
	pool_run(p, mm_compute, &j);
}

struct mm_multi {
	struct mm_job j[OPS_MULTI_MAX];
	int n_w;
	int64_t units[OPS_MULTI_MAX + 1]; /* prefix sums of 16-output units */
};

static void mm_compute_multi(void *ctx, int ith, int nth)
{
	struct mm_multi *m = ctx;
	int64_t lo, hi;
	pool_split(m->units[m->n_w], ith, nth, 1, &lo, &hi);
	for (int i = 0; i < m->n_w && lo < hi; i++) {
		const struct mm_job *j = &m->j[i];
		int64_t a = lo > m->units[i] ? lo : m->units[i];
		int64_t b = hi < m->units[i + 1] ? hi : m->units[i + 1];
		if (a >= b)
			continue;
		int64_t o0 = (a - m->units[i]) * 16, o1 = (b - m->units[i]) * 16;
		if (o1 > j->n_out)
			o1 = j->n_out;
		kern_matmul_form(j->type, j->w, j->n_in, o0, o1, j->xa, j->xa_stride, j->n_rows,
				 j->y, j->y_stride, j->form);
	}
}

void ops_matmul_multi(pool *p, int n_w, const gguf_tensor *const *w, const float *x,
		      int64_t x_stride, int64_t n_rows, float *const *y, const int64_t *y_stride,
		      void *scratch)
{
	int same = n_w >= 1 && n_w <= OPS_MULTI_MAX;
	for (int i = 1; i < n_w && same; i++)
		same = w[i]->type == w[0]->type && w[i]->ne[0] == w[0]->ne[0];
	const int form = same ? ops_rows_form(w[0]->type, n_rows) : 0;
	same = same && form >= 0;
	if (!same) {
		for (int i = 0; i < n_w; i++)
			ops_matmul(p, w[i], x, x_stride, n_rows, y[i], y_stride[i], scratch);
		return;
	}
	struct mm_multi m = {.n_w = n_w};
	for (int i = 0; i < n_w; i++) {
		m.j[i] = (struct mm_job){
		    .type = w[i]->type,
		    .w = w[i]->data,
		    .n_in = (int64_t)w[i]->ne[0],
		    .n_out = (int64_t)w[i]->ne[1],
		    .x = x,
		    .x_stride = x_stride,
		    .n_rows = n_rows,
		    .y = y[i],
		    .y_stride = y_stride[i],
		    .xa = scratch,
		    .at = kern_act_type(w[i]->type),
		    .form = form,
		};
		m.j[i].xa_stride = kern_row_bytes(m.j[i].at, m.j[i].n_in);
		m.units[i + 1] = m.units[i] + (m.j[i].n_out + 15) / 16;
	}
	if (n_rows * m.j[0].n_in < 4096 || pool_size(p) == 1)
		mm_convert(&m.j[0], 0, 1);
	else
		pool_run(p, mm_convert, &m.j[0]);
	pool_run(p, mm_compute_multi, &m);
}

void ops_matmul(pool *p, const gguf_tensor *w, const float *x, int64_t x_stride, int64_t n_rows,
		float *y, int64_t y_stride, void *scratch)
{
	ops_matmul_raw(p, w->type, w->data, (int64_t)w->ne[0], (int64_t)w->ne[1], x, x_stride,
		       n_rows, y, y_stride, scratch);
}

void ops_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps)
{
	double sum = 0.0;
	for (int64_t i = 0; i < n; i++)
		sum += (double)(x[i] * x[i]);
	const float mean = (float)(sum / (double)n);
	const float scale = 1.0f / sqrtf(mean + eps);
	if (w) {
		for (int64_t i = 0; i < n; i++)
			y[i] = (x[i] * scale) * w[i];
	} else {
		for (int64_t i = 0; i < n; i++)
			y[i] = x[i] * scale;
	}
}

void ops_softmax(float *x, int64_t n)
{
	float max = -INFINITY;
	for (int64_t i = 0; i < n; i++)
		if (x[i] > max)
			max = x[i];
	double sum = 0.0;
	for (int64_t i = 0; i < n; i++) {
		float e = expf(x[i] - max);
		sum += (double)e;
		x[i] = e;
	}
	const float inv = (float)(1.0 / sum);
	for (int64_t i = 0; i < n; i++)
		x[i] *= inv;
}

void ops_add(float *y, const float *a, const float *b, int64_t n)
{
	for (int64_t i = 0; i < n; i++)
		y[i] = a[i] + b[i];
}

float ops_f16_round(float x)
{
	return kern_f16_to_f32(kern_f32_to_f16(x));
}

/* YaRN, as ggml: the dimension where rotation count at n_ctx_orig equals n_rot */
static float rope_yarn_corr_dim(int n_dims, int n_ctx_orig, float n_rot, float base)
{
	return (float)n_dims * logf((float)n_ctx_orig / (n_rot * 2.0f * 3.14159265358979323846f)) /
	       (2.0f * logf(base));
}

static float rope_yarn_ramp(float low, float high, int i0)
{
	const float y = ((float)(i0 / 2) - low) / fmaxf(0.001f, high - low);
	return 1.0f - fminf(1.0f, fmaxf(0.0f, y));
}

void ops_rope_apply(const struct ops_rope *r, float *x, int64_t pos)
{
	const int n = r->n_dims;
	const float theta_scale = powf(r->freq_base, -2.0f / (float)n);
	float corr0 = 0.0f, corr1 = 0.0f;
	if (r->ext_factor != 0.0f) {
		float start =
		    floorf(rope_yarn_corr_dim(n, r->n_ctx_orig, r->beta_fast, r->freq_base));
		float end = ceilf(rope_yarn_corr_dim(n, r->n_ctx_orig, r->beta_slow, r->freq_base));
		corr0 = fmaxf(0.0f, start);
		corr1 = fminf((float)(n - 1), end);
	}
	float theta_extrap = (float)pos;
	for (int i0 = 0; i0 < n; i0 += 2) {
		const float theta_interp = r->freq_scale * theta_extrap;
		float theta = theta_interp;
		float mscale = r->attn_factor;
		if (r->ext_factor != 0.0f) {
			const float ramp_mix = rope_yarn_ramp(corr0, corr1, i0) * r->ext_factor;
			theta = fmaf(theta_interp, 1.0f - ramp_mix, theta_extrap * ramp_mix);
			mscale *= fmaf(0.1f, logf(1.0f / r->freq_scale), 1.0f);
		}
		const float c = cosf(theta) * mscale;
		const float s = sinf(theta) * mscale;
		const int a = r->neox ? i0 / 2 : i0;
		const int b = r->neox ? i0 / 2 + n / 2 : i0 + 1;
		const float x0 = x[a], x1 = x[b];
		x[a] = fmaf(x0, c, -(x1 * s));
		x[b] = fmaf(x0, s, x1 * c);
		theta_extrap *= theta_scale;
	}
}

void ops_decode_bytes(const gguf *g, int n_used, struct ops_decode_bytes *out)
{
	memset(out, 0, sizeof(*out));
	const int tied = gguf_find_tensor(g, "output.weight") == NULL;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		if (!t)
			continue;
		uint64_t b = t->n_bytes;
		if (strstr(t->name, "_exps.")) {
			uint64_t n_exp = t->n_dims >= 3 ? t->ne[2] : t->n_dims == 2 ? t->ne[1] : 1;
			uint64_t used = n_used > 0 ? (uint64_t)n_used : 0;
			if (n_exp > 0)
				out->routed += b / n_exp * (used < n_exp ? used : n_exp);
		} else if (strstr(t->name, "shexp")) {
			out->shared += b;
		} else if (!strcmp(t->name, "token_embd.weight")) {
			out->head += tied || t->n_dims < 2 || t->ne[1] == 0 ? b : b / t->ne[1];
		} else if (!strcmp(t->name, "output.weight")) {
			out->head += b;
		} else {
			out->dense += b;
		}
	}
	out->total = out->dense + out->shared + out->routed + out->head;
}

struct bw_job {
	const uint64_t *buf;
	size_t n; /* uint64 values */
	uint64_t sink[256];
};

/* Touches one value per 64-byte line: the cost is the line transfers. */
static void bw_read(void *ctx, int ith, int nth)
{
	struct bw_job *j = ctx;
	int64_t lo, hi;
	pool_split((int64_t)j->n, ith, nth, 8, &lo, &hi);
	uint64_t s0 = 0, s1 = 0;
	for (int64_t i = lo; i + 8 < hi; i += 16) {
		s0 += j->buf[i];
		s1 += j->buf[i + 8];
	}
	j->sink[ith & 255] = s0 + s1;
}

static double bw_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double ops_read_bandwidth(pool *p, size_t bytes)
{
	struct bw_job *j = calloc(1, sizeof(*j));
	uint64_t *buf = malloc(bytes);
	double best = 0.0;
	if (!j || !buf)
		goto out;
	memset(buf, 1, bytes);
	j->buf = buf;
	j->n = bytes / sizeof(uint64_t);
	for (int rep = 0; rep < 3; rep++) {
		double t0 = bw_now();
		pool_run(p, bw_read, j);
		double dt = bw_now() - t0;
		if (dt > 0 && (double)bytes / dt > best)
			best = (double)bytes / dt;
	}
out:
	free(buf);
	free(j);
	return best;
}
