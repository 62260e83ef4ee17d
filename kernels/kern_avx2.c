/* kern_avx2: AVX2/FMA/F16C kernels, compiled with -mavx2 -mfma -mf16c.
 *
 * Only called through kern.c's dispatch after kern_init() found the features.
 * Every dot product goes through one "tile" routine that computes nr (1..4)
 * activation rows against one weight row with a fixed per-(row, output)
 * operation sequence, so kern_matmul's results are bit-identical to kern_dot's
 * whatever the batch composition.
 *
 * Q8_0-activation dots follow ggml: per block the int8 products are summed in
 * int32 lanes (maddubs/madd with the sign trick), converted to float and
 * accumulated with an FMA by d_w * d_x (details at tile_q8).  Float dots
 * accumulate in four 8-lane f32 accumulators (details at tile_fl). */
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define TILE_ROWS 4 /* activation rows per weight pass */

static ALWAYS_INLINE float hsum8(__m256 v)
{
	__m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
	r = _mm_add_ps(r, _mm_movehl_ps(r, r));
	r = _mm_add_ss(r, _mm_movehdup_ps(r));
	return _mm_cvtss_f32(r);
}

/* ------------------------------------------------------ quantised dots */

/* Tuned by measurement on the project's test machine (a Zen 1-class EPYC,
 * where this was about 25 % faster than ggml's one-block-per-FMA loop): the
 * int work is done in 128-bit halves, and two blocks share one convert and
 * one FMA.
 * After the sign trick and maddubs, the two halves of a block are added in
 * int16 (Q4_0, MXFP4: |w| <= 12 cannot overflow) or after widening (Q8_0),
 * giving four int32 partial sums per block; lanes 0-3 of the FMA hold block
 * ib's, lanes 4-7 block ib+1's, scaled by [d0 x4 | d1 x4] with
 * d = d_w * d_x.  One accumulator per (row, output). */

struct q8w {
	__m128i wl, wh; /* weights 0-15 and 16-31 as int8 */
	__m128i al, ah; /* their absolute values (unsigned; -128 gives 128) */
};

static ALWAYS_INLINE struct q8w q8w_unpack(uint32_t type, const uint8_t *blk)
{
	const __m128i m4 = _mm_set1_epi8(0x0f);
	struct q8w r;
	switch (type) {
	case KERN_Q8_0:
		r.wl = _mm_loadu_si128((const __m128i *)(blk + 2));
		r.wh = _mm_loadu_si128((const __m128i *)(blk + 18));
		break;
	case KERN_Q4_0: {
		__m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
		r.wl = _mm_sub_epi8(_mm_and_si128(q, m4), _mm_set1_epi8(8));
		r.wh = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_set1_epi8(8));
		break;
	}
	default: { /* MXFP4 */
		const __m128i tab = _mm_loadu_si128((const __m128i *)kern_mxfp4_values);
		__m128i q = _mm_loadu_si128((const __m128i *)(blk + 1));
		r.wl = _mm_shuffle_epi8(tab, _mm_and_si128(q, m4));
		r.wh = _mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
		break;
	}
	}
	r.al = _mm_abs_epi8(r.wl);
	r.ah = _mm_abs_epi8(r.wh);
	return r;
}

static ALWAYS_INLINE size_t q8w_block_bytes(uint32_t type)
{
	return type == KERN_Q8_0 ? 34 : type == KERN_Q4_0 ? 18 : 17;
}

/* f16 values at p0 and p1 (p1 NULL: 0) as [v0 x4 | v1 x4]. */
static ALWAYS_INLINE __m256 f16_pair8(const uint8_t *p0, const uint8_t *p1)
{
	const __m128i spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
	__m128i h = _mm_cvtsi32_si128(kern_load_u16(p0));
	if (p1)
		h = _mm_insert_epi16(h, kern_load_u16(p1), 1);
	return _mm256_cvtph_ps(_mm_shuffle_epi8(h, spread));
}

/* Weight scales of blocks b0 and b1 as [d0 x4 | d1 x4] (b1 NULL: 0). */
static ALWAYS_INLINE __m256 q8w_scales8(uint32_t type, const uint8_t *b0, const uint8_t *b1)
{
	if (type == KERN_MXFP4) {
		__m128 d0 = _mm_set1_ps(kern_e8m0_half(b0[0]));
		__m128 d1 = _mm_set1_ps(b1 ? kern_e8m0_half(b1[0]) : 0.0f);
		return _mm256_insertf128_ps(_mm256_castps128_ps256(d0), d1, 1);
	}
	return f16_pair8(b0, b1);
}

/* Four int32 partial sums of one block's products w * x. */
static ALWAYS_INLINE __m128i q8_block_i32(uint32_t type, const struct q8w *w, const uint8_t *xb)
{
	const __m128i ones = _mm_set1_epi16(1);
	__m128i xl = _mm_loadu_si128((const __m128i *)(xb + 2));
	__m128i xh = _mm_loadu_si128((const __m128i *)(xb + 18));
	__m128i pl = _mm_maddubs_epi16(w->al, _mm_sign_epi8(xl, w->wl));
	__m128i ph = _mm_maddubs_epi16(w->ah, _mm_sign_epi8(xh, w->wh));
	if (type == KERN_Q8_0) /* pair sums up to 32512: widen before adding */
		return _mm_add_epi32(_mm_madd_epi16(pl, ones), _mm_madd_epi16(ph, ones));
	return _mm_madd_epi16(_mm_add_epi16(pl, ph), ones);
}

/* acc += ([dw0 x4 | dw1 x4] * [dx0 x4 | dx1 x4]) * float([i0 | i1]);
 * x1 NULL: block absent. */
static ALWAYS_INLINE __m256 q8_pair_fma(__m256 dw, const uint8_t *x0, const uint8_t *x1, __m128i i0,
					__m128i i1, __m256 acc)
{
	__m256 d = _mm256_mul_ps(dw, f16_pair8(x0, x1));
	__m256i p = _mm256_inserti128_si256(_mm256_castsi128_si256(i0), i1, 1);
	return _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
}

static ALWAYS_INLINE void tile_q8(uint32_t type, int nr, const uint8_t *w, const uint8_t *x,
				  size_t xs, int64_t n, float *out)
{
	const size_t bs = q8w_block_bytes(type);
	const int64_t nb = n / KERN_QK;
	__m256 acc[TILE_ROWS];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		acc[r] = _mm256_setzero_ps();
	int64_t ib = 0;
	for (; ib + 1 < nb; ib += 2) {
		const uint8_t *w0 = w + (size_t)ib * bs, *w1 = w0 + bs;
		struct q8w q0 = q8w_unpack(type, w0), q1 = q8w_unpack(type, w1);
		__m256 dw = q8w_scales8(type, w0, w1);
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * 34;
			__m128i i0 = q8_block_i32(type, &q0, xb);
			__m128i i1 = q8_block_i32(type, &q1, xb + 34);
			acc[r] = q8_pair_fma(dw, xb, xb + 34, i0, i1, acc[r]);
		}
	}
	if (ib < nb) { /* odd block out: the second half is zeros */
		const uint8_t *w0 = w + (size_t)ib * bs;
		struct q8w q0 = q8w_unpack(type, w0);
		__m256 dw = q8w_scales8(type, w0, NULL);
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * 34;
			__m128i i0 = q8_block_i32(type, &q0, xb);
			acc[r] = q8_pair_fma(dw, xb, NULL, i0, _mm_setzero_si128(), acc[r]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		out[r] = hsum8(acc[r]);
}

/* ---------------------------------------------------------- float dots */

/* Float dots take 32 values per step into four accumulators (FMA latency);
 * a partial last step runs on zero-padded copies.  BF16 values are widened
 * by interleaving with zeros, which permutes them within the step the same
 * way for weights and activations. */
#define FL_STEP 32

static ALWAYS_INLINE void fl_load32(uint32_t type, const uint8_t *p, __m256 v[4])
{
	switch (type) {
	case KERN_F32:
#pragma GCC unroll 4
		for (int k = 0; k < 4; k++)
			v[k] = _mm256_loadu_ps((const float *)p + 8 * k);
		break;
	case KERN_F16:
#pragma GCC unroll 4
		for (int k = 0; k < 4; k++)
			v[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * k)));
		break;
	default: {
		/* BF16 */
		const __m256i z = _mm256_setzero_si256();
#pragma GCC unroll 2
		for (int k = 0; k < 2; k++) {
			__m256i q = _mm256_loadu_si256((const __m256i *)(p + 32 * k));
			v[2 * k] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, q));
			v[2 * k + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, q));
		}
		break;
	}
	}
}

/* xexp: x was expanded by fl_expand_row (F16/BF16 only): f32 in the order
 * fl_load32 produces, padded with zeros to whole steps.  The products and
 * sums are the same either way (the conversions are exact). */
static ALWAYS_INLINE void tile_fl(uint32_t type, int xexp, int nr, const uint8_t *w,
				  const uint8_t *x, size_t xs, int64_t n, float *out)
{
	const size_t es = type == KERN_F32 ? 4 : 2;
	const uint32_t xt = xexp ? KERN_F32 : type;
	const size_t xes = xexp ? 4 : es;
	__m256 acc[TILE_ROWS][4];
	__m256 wv[4], xv[4];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
		for (int k = 0; k < 4; k++)
			acc[r][k] = _mm256_setzero_ps();
	int64_t i = 0;
	for (; i + FL_STEP <= n; i += FL_STEP) {
		fl_load32(type, w + i * es, wv);
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			fl_load32(xt, x + r * xs + i * xes, xv);
#pragma GCC unroll 4
			for (int k = 0; k < 4; k++)
				acc[r][k] = _mm256_fmadd_ps(wv[k], xv[k], acc[r][k]);
		}
	}
	if (i < n) {
		uint8_t buf[FL_STEP * 4] __attribute__((aligned(32)));
		size_t m = (size_t)(n - i) * es;
		memset(buf, 0, sizeof(buf));
		memcpy(buf, w + i * es, m);
		fl_load32(type, buf, wv);
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			if (xexp) {
				fl_load32(KERN_F32, x + r * xs + i * xes, xv);
			} else {
				memcpy(buf, x + r * xs + i * es, m);
				fl_load32(type, buf, xv);
			}
#pragma GCC unroll 4
			for (int k = 0; k < 4; k++)
				acc[r][k] = _mm256_fmadd_ps(wv[k], xv[k], acc[r][k]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		out[r] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
					     _mm256_add_ps(acc[r][2], acc[r][3])));
}

/* Floats per expanded row of n values. */
static int64_t fl_expanded_len(int64_t n)
{
	return (n + FL_STEP - 1) / FL_STEP * FL_STEP;
}

/* Expands an F16/BF16 activation row for tile_fl's xexp mode. */
static void fl_expand_row(uint32_t type, const uint8_t *x, int64_t n, float *dst)
{
	__m256 v[4];
	int64_t i = 0;
	for (; i + FL_STEP <= n; i += FL_STEP) {
		fl_load32(type, x + i * 2, v);
		for (int k = 0; k < 4; k++)
			_mm256_storeu_ps(dst + i + 8 * k, v[k]);
	}
	if (i < n) {
		uint8_t buf[FL_STEP * 4] = {0}; /* sized for any type */
		memcpy(buf, x + i * 2, (size_t)(n - i) * 2);
		fl_load32(type, buf, v);
		for (int k = 0; k < 4; k++)
			_mm256_storeu_ps(dst + i + 8 * k, v[k]);
	}
}

/* --------------------------------------------------- tile instantiation */

typedef void (*tile_fn)(const uint8_t *w, const uint8_t *x, size_t xs, int64_t n, float *out);

#define TILE_DEF(name, kind, nr)                                                                   \
	static void name##_##nr(const uint8_t *w, const uint8_t *x, size_t xs, int64_t n,          \
				float *out)                                                        \
	{                                                                                          \
		kind(nr, w, x, xs, n, out);                                                        \
	}
/* quantised types: up to 4 rows per weight pass; float types (four
 * accumulators per row): up to 2 */
#define TILE_SET4(name, kind)                                                                      \
	TILE_DEF(name, kind, 1)                                                                    \
	TILE_DEF(name, kind, 2)                                                                    \
	TILE_DEF(name, kind, 3)                                                                    \
	TILE_DEF(name, kind, 4)                                                                    \
	static const tile_fn name[TILE_ROWS] = {name##_1, name##_2, name##_3, name##_4};
#define TILE_SET2(name, kind)                                                                      \
	TILE_DEF(name, kind, 1)                                                                    \
	TILE_DEF(name, kind, 2)                                                                    \
	static const tile_fn name[TILE_ROWS] = {name##_1, name##_2, NULL, NULL};

#define K_Q4_0(...)	 tile_q8(KERN_Q4_0, __VA_ARGS__)
#define K_Q8_0(...)	 tile_q8(KERN_Q8_0, __VA_ARGS__)
#define K_MXFP4(...)	 tile_q8(KERN_MXFP4, __VA_ARGS__)
#define K_F32(...)	 tile_fl(KERN_F32, 0, __VA_ARGS__)
#define K_F16(...)	 tile_fl(KERN_F16, 0, __VA_ARGS__)
#define K_BF16(...)	 tile_fl(KERN_BF16, 0, __VA_ARGS__)
#define K_F16_XEXP(...)	 tile_fl(KERN_F16, 1, __VA_ARGS__)
#define K_BF16_XEXP(...) tile_fl(KERN_BF16, 1, __VA_ARGS__)

TILE_SET4(tiles_q4_0, K_Q4_0)
TILE_SET4(tiles_q8_0, K_Q8_0)
TILE_SET4(tiles_mxfp4, K_MXFP4)
TILE_SET2(tiles_f32, K_F32)
TILE_SET2(tiles_f16, K_F16)
TILE_SET2(tiles_bf16, K_BF16)
TILE_SET2(tiles_f16_xexp, K_F16_XEXP)
TILE_SET2(tiles_bf16_xexp, K_BF16_XEXP)

/* The tiles of a weight type and how many rows they take at most. */
static const tile_fn *tiles_for(uint32_t type, int *max_rows)
{
	*max_rows = TILE_ROWS;
	switch (type) {
	case KERN_Q4_0: return tiles_q4_0;
	case KERN_Q8_0: return tiles_q8_0;
	case KERN_MXFP4: return tiles_mxfp4;
	}
	*max_rows = 2;
	switch (type) {
	case KERN_F32: return tiles_f32;
	case KERN_F16: return tiles_f16;
	case KERN_BF16: return tiles_bf16;
	default: return NULL;
	}
}

float kern_dot_avx2(uint32_t weight_type, int64_t n, const void *w, const void *x)
{
	int max_rows;
	const tile_fn *t = tiles_for(weight_type, &max_rows);
	float out = 0.0f;
	if (t && n > 0)
		t[0](w, x, 0, n, &out);
	return out;
}

/* Largest activation expansion kern_matmul allocates (bytes). */
#define XEXP_MAX ((size_t)64 << 20)

/* Per-thread buffer for expanded activations: grown on demand and kept, so a
 * steady stream of matmuls allocates nothing; freed when its thread exits. */
struct xexp_buf {
	float *p;
	size_t cap;
};
static pthread_key_t xexp_key;
static pthread_once_t xexp_once = PTHREAD_ONCE_INIT;
static int xexp_key_ok;

static void xexp_free(void *v)
{
	struct xexp_buf *b = v;
	free(b->p);
	free(b);
}

static void xexp_key_init(void) { xexp_key_ok = pthread_key_create(&xexp_key, xexp_free) == 0; }

static float *xexp_reserve(size_t bytes)
{
	pthread_once(&xexp_once, xexp_key_init);
	if (!xexp_key_ok)
		return NULL;
	struct xexp_buf *b = pthread_getspecific(xexp_key);
	if (!b) {
		b = calloc(1, sizeof(*b));
		if (!b || pthread_setspecific(xexp_key, b) != 0) {
			free(b);
			return NULL;
		}
	}
	if (bytes > b->cap) {
		float *p = realloc(b->p, bytes);
		if (!p)
			return NULL;
		b->p = p;
		b->cap = bytes;
	}
	return b->p;
}

void kern_matmul_avx2(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	int max_rows;
	const tile_fn *t = tiles_for(weight_type, &max_rows);
	if (!t || n_rows <= 0 || o1 <= o0)
		return;
	const size_t w_row = kern_row_bytes(weight_type, n_in);
	const uint8_t *wb = w, *xb = x;
	float *xexp = NULL;

	/* F16/BF16: convert the activations to f32 once rather than per output
	 * (F16C's convert is slow on some CPUs); same results. */
	if ((weight_type == KERN_F16 || weight_type == KERN_BF16) && o1 - o0 >= 2 && n_in > 0) {
		int64_t len = fl_expanded_len(n_in);
		size_t bytes = (size_t)len * sizeof(float) * (size_t)n_rows;
		if (bytes <= XEXP_MAX)
			xexp = xexp_reserve(bytes);
		if (xexp) {
			for (int64_t r = 0; r < n_rows; r++)
				fl_expand_row(weight_type, xb + (size_t)r * x_stride, n_in,
					      xexp + r * len);
			t = weight_type == KERN_F16 ? tiles_f16_xexp : tiles_bf16_xexp;
			xb = (const uint8_t *)xexp;
			x_stride = (size_t)len * sizeof(float);
		}
	}
	/* Outputs in chunks of about 64 KiB of weights (stay in L2) while each
	 * activation tile is reused from L1 across the chunk. */
	int64_t chunk = w_row ? (int64_t)(65536 / w_row) : 1;
	if (chunk < 1)
		chunk = 1;
	if (n_rows <= max_rows)
		chunk = o1 - o0;
	for (int64_t oc = o0; oc < o1; oc += chunk) {
		int64_t oe = oc + chunk < o1 ? oc + chunk : o1;
		for (int64_t r = 0; r < n_rows; r += max_rows) {
			int nr = n_rows - r < max_rows ? (int)(n_rows - r) : max_rows;
			const uint8_t *xr = xb + (size_t)r * x_stride;
			float out[TILE_ROWS] = {0};
			for (int64_t o = oc; o < oe; o++) {
				if (n_in > 0)
					t[nr - 1](wb + (size_t)o * w_row, xr, x_stride, n_in, out);
				for (int i = 0; i < nr; i++)
					y[(r + i) * y_stride + o] = out[i];
			}
		}
	}
}

/* ------------------------------------------------------------- convert */

static void quantize_row_q8_0_avx2(const float *x, struct kern_block_q8_0 *y, int64_t n)
{
	const __m256 sign = _mm256_set1_ps(-0.0f);
	const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const float *p = x + ib * KERN_QK;
		__m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
		__m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
		__m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
		m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v2));
		m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v3));
		__m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
		m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
		m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
		const float amax = _mm_cvtss_f32(m4);
		const float d = amax / 127.0f;
		const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
		y[ib].d = _cvtss_sh(d, 0);
		const __m256 mul = _mm256_set1_ps(id);
		const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
		__m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), rnd));
		__m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), rnd));
		__m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), rnd));
		__m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), rnd));
		i0 = _mm256_packs_epi32(i0, i1);
		i2 = _mm256_packs_epi32(i2, i3);
		i0 = _mm256_packs_epi16(i0, i2);
		i0 = _mm256_permutevar8x32_epi32(i0, perm);
		_mm256_storeu_si256((__m256i *)y[ib].qs, i0);
	}
}

static void convert_f16_avx2(const float *x, uint16_t *d, int64_t n)
{
	int64_t i = 0;
	for (; i + 8 <= n; i += 8)
		_mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i),
								     _MM_FROUND_TO_NEAREST_INT));
	for (; i < n; i++)
		d[i] = _cvtss_sh(x[i], 0);
}

static ALWAYS_INLINE __m256i bf16_round8(__m256 v)
{
	__m256i u = _mm256_castps_si256(v);
	__m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
	__m256i r = _mm256_srli_epi32(
	    _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
	__m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(64));
	__m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
	return _mm256_blendv_epi8(r, q, nan);
}

static void convert_bf16_avx2(const float *x, uint16_t *d, int64_t n)
{
	int64_t i = 0;
	for (; i + 16 <= n; i += 16) {
		__m256i a = bf16_round8(_mm256_loadu_ps(x + i));
		__m256i b = bf16_round8(_mm256_loadu_ps(x + i + 8));
		__m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
		_mm256_storeu_si256((__m256i *)(d + i), p);
	}
	for (; i < n; i++)
		d[i] = kern_f32_to_bf16(x[i]);
}

void kern_convert_row_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	switch (act_type) {
	case KERN_Q8_0: quantize_row_q8_0_avx2(x, dst, n); break;
	case KERN_F16: convert_f16_avx2(x, dst, n); break;
	case KERN_BF16: convert_bf16_avx2(x, dst, n); break;
	default: kern_convert_row_ref(act_type, x, dst, n); break;
	}
}

/* ------------------------------------------------------------- dequant */

static ALWAYS_INLINE void store_i8x16(__m128i q, __m256 d, float *y)
{
	_mm256_storeu_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
	_mm256_storeu_ps(
	    y + 8,
	    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), d));
}

static ALWAYS_INLINE void dequant_q8w(uint32_t type, const uint8_t *src, float *dst, int64_t n)
{
	const size_t bs = q8w_block_bytes(type);
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const uint8_t *b = src + (size_t)ib * bs;
		struct q8w q = q8w_unpack(type, b);
		__m256 d = _mm256_permute2f128_ps(q8w_scales8(type, b, NULL),
						  q8w_scales8(type, b, NULL), 0x00);
		store_i8x16(q.wl, d, dst + ib * KERN_QK);
		store_i8x16(q.wh, d, dst + ib * KERN_QK + 16);
	}
}

void kern_dequant_row_avx2(uint32_t type, const void *src, float *dst, int64_t n)
{
	const uint8_t *s = src;
	int64_t i = 0;
	switch (type) {
	case KERN_Q4_0: dequant_q8w(KERN_Q4_0, s, dst, n); break;
	case KERN_Q8_0: dequant_q8w(KERN_Q8_0, s, dst, n); break;
	case KERN_MXFP4: dequant_q8w(KERN_MXFP4, s, dst, n); break;
	case KERN_F16:
		for (; i + 8 <= n; i += 8)
			_mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
						      (const __m128i *)(s + 2 * i))));
		for (; i < n; i++)
			dst[i] = _cvtsh_ss(kern_load_u16(s + 2 * i));
		break;
	case KERN_BF16:
		for (; i + 8 <= n; i += 8)
			_mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
						      _mm256_cvtepu16_epi32(_mm_loadu_si128(
							  (const __m128i *)(s + 2 * i))),
						      16)));
		for (; i < n; i++)
			dst[i] = kern_bf16_to_f32(kern_load_u16(s + 2 * i));
		break;
	default: kern_dequant_row_ref(type, src, dst, n); break;
	}
}
