#include "ops.h"
#include "../kernels/kern.h"

#include <math.h>
#include <string.h>

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
		kern_matmul(j->type, j->w, j->n_in, lo, hi, j->xa, j->xa_stride, j->n_rows, j->y,
			    j->y_stride);
}

void ops_matmul_raw(pool *p, uint32_t type, const void *w, int64_t n_in, int64_t n_out,
		    const float *x, int64_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		    void *scratch)
{
	struct mm_job j = {
		.type = type, .w = w, .n_in = n_in, .n_out = n_out, .x = x,
		.x_stride = x_stride, .n_rows = n_rows, .y = y, .y_stride = y_stride,
		.xa = scratch, .at = kern_act_type(type),
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

float ops_f16_round(float x) { return kern_f16_to_f32(kern_f32_to_f16(x)); }

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
		float start = floorf(rope_yarn_corr_dim(n, r->n_ctx_orig, r->beta_fast, r->freq_base));
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
			theta = theta_interp * (1.0f - ramp_mix) + theta_extrap * ramp_mix;
			mscale *= 1.0f + 0.1f * logf(1.0f / r->freq_scale);
		}
		const float c = cosf(theta) * mscale;
		const float s = sinf(theta) * mscale;
		const int a = r->neox ? i0 / 2 : i0;
		const int b = r->neox ? i0 / 2 + n / 2 : i0 + 1;
		const float x0 = x[a], x1 = x[b];
		x[a] = x0 * c - x1 * s;
		x[b] = x0 * s + x1 * c;
		theta_extrap *= theta_scale;
	}
}
