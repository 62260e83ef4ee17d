/* kern_avx512: AVX-512 VNNI kernels, compiled with -mavx512f -mavx512bw
 * -mavx512vl -mavx512dq -mavx512vnni (and AVX2/FMA/F16C).
 *
 * Only called through kern.c's dispatch after kern_init() found the features.
 *
 * Products of several activation rows (prefill, an expert's batch) for
 * Q4_0, Q8_0 and MXFP4 weights (Q8_0 activations) and Q4_K and Q6_K (Q8_K
 * activations): the weights of 16 consecutive outputs are repacked once per
 * call so that int32 lane c of a vector belongs to output c: for a group of
 * four values, one vector holds the 16 outputs' four codes of that group, and
 * further vectors the 16 outputs' scales.  An activation row's four int8 of
 * the group are broadcast and VPDPBUSD adds the four products into each
 * output's lane, so a block's groups give the 16 outputs' exact int32 sums
 * with no horizontal adds.
 *
 * Q4_0, Q8_0, MXFP4: the codes unsigned (Q4_0: the nibble, MXFP4: doubled
 * E2M1 + 12, Q8_0: the int8 + 128); the code offset times the activations'
 * sum (per block, Q8_0 per group) starts the sum, so the results are the
 * signed dot products exactly.  The float steps are the scalar reference's
 * (kern_ref.c), lane by lane: Q4_0 / MXFP4 acc = fma((float)sum, d_w * d_x,
 * acc) block by block; Q8_0 eight accumulators per output, acc_m = fma(d_w *
 * d_x, (float)lane_m, acc_m), summed as ggml's hsum_float_8.  Q4_K and Q6_K
 * as described at their tiles, again with kern_kq_ref.c's float steps.  So
 * the results equal the _ref twins' bit for bit, whatever the tiling.
 *
 * Outputs run in chunks whose repacked weights (about 128 KiB) stay in L2
 * while every group of activation rows passes over them.  Fewer rows than a
 * type's min_rows and every other type take the AVX2 kernels (kern_avx2.c,
 * kern_kq_avx2.c): without rows to share it the repacking does not pay;
 * except one row (decode) of Q4_0, MXFP4 and Q8_0, which matvec_q4 and
 * matvec_q8_0 multiply with the weights in place, and one or two rows of Q4_K
 * and Q6_K (kern_kq_avx512.c). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define TW	   16 /* outputs per tile: one int32 lane each */
#define R4	   6  /* activation rows per pass, Q4_0 / MXFP4 */
#define R8	   2  /* activation rows per pass, Q8_0 (eight accumulators a row) */
#define CHUNK_PACK ((size_t)128 << 10)
#define ROW_BLOCK  256 /* activation rows per table (and per repacking) */

/* Repacked block of a tile: eight code vectors (groups 0-7), then the scales. */
#define BLK_VECS 9

/* Per activation row and block: its scale and the code offset's correction
 * (Q4_0 / MXFP4: c[0] = -offset * sum of the block; Q8_0: c[m] = -128 * sum
 * of group m). */
struct xc {
	float d;
	int32_t c[8];
};

/* MXFP4 doubled E2M1 codes + 12: 0..24 */
static const int8_t mxfp4_unsigned[16] = {12, 13, 14, 15, 16, 18, 20, 24,
					  12, 11, 10, 9,  8,  6,  4,  0};

static ALWAYS_INLINE size_t block_bytes(uint32_t type)
{
	return type == KERN_Q8_0 ? 34 : type == KERN_Q4_0 ? 18 : 17;
}

/* 16 bytes from each of four blocks as one vector: 128-bit lane L = p[L]. */
static ALWAYS_INLINE __m512i load4x16(const uint8_t *p0, const uint8_t *p1, const uint8_t *p2,
				      const uint8_t *p3)
{
	const __m256i lo = _mm256_loadu2_m128i((const __m128i *)p1, (const __m128i *)p0);
	const __m256i hi = _mm256_loadu2_m128i((const __m128i *)p3, (const __m128i *)p2);
	return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* Streams the next tile's weights in while this one is repacked: the line
 * at off of each row, off taken past this tile by pf, the distance to the
 * next tile's rows (prefetches do not fault past the weights' end). */
static ALWAYS_INLINE void prefetch_rows(const uint8_t *const row[TW], size_t off)
{
#pragma GCC unroll 16
	for (int c = 0; c < TW; c++)
		_mm_prefetch((const char *)row[c] + off, _MM_HINT_T0);
}

/* z[k]: lane L holds four dwords of output 4L + k; g[m] lane 4L + k = dword m
 * of z[k] lane L, i.e. dword m of output 4L + k. */
static ALWAYS_INLINE void transpose4(const __m512i z[4], __m512i *g)
{
	const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]);
	const __m512i t1 = _mm512_unpacklo_epi32(z[2], z[3]);
	const __m512i t2 = _mm512_unpackhi_epi32(z[0], z[1]);
	const __m512i t3 = _mm512_unpackhi_epi32(z[2], z[3]);
	g[0] = _mm512_unpacklo_epi64(t0, t1);
	g[1] = _mm512_unpackhi_epi64(t0, t1);
	g[2] = _mm512_unpacklo_epi64(t2, t3);
	g[3] = _mm512_unpackhi_epi64(t2, t3);
}

/* g[m] lane c: dword m of the 16 bytes at row[c] + off (four vector loads
 * and a transpose: a gather of the same dwords is slower) */
static ALWAYS_INLINE void rows_dwords(const uint8_t *const row[TW], size_t off, __m512i g[4])
{
	__m512i z[4];
#pragma GCC unroll 4
	for (int k = 0; k < 4; k++)
		z[k] =
		    load4x16(row[k] + off, row[4 + k] + off, row[8 + k] + off, row[12 + k] + off);
	transpose4(z, g);
}

/* Q4_0 / MXFP4 / Q8_0: the scales in the low bytes of g's lanes as F32
 * (MXFP4 as kern_e8m0_half: (e - 1) << 23, e = 0, 1 the subnormals); from
 * the blocks at row[c] + off into lane c (tile_scales). */
static ALWAYS_INLINE __m512 scales_of(uint32_t type, __m512i g)
{
	if (type != KERN_MXFP4)
		return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
	const __m512i e = _mm512_and_si512(g, _mm512_set1_epi32(0xff));
	const __m512i norm = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
	const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
	return _mm512_castsi512_ps(
	    _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2)), norm, sub));
}

static ALWAYS_INLINE __m512 tile_scales(uint32_t type, const uint8_t *const row[TW], size_t off)
{
	__m512i g[4];
	rows_dwords(row, off, g); /* the scale in the low bytes of dword 0 */
	return scales_of(type, g[0]);
}

/* Repacks nb blocks of the 16 weight rows at row[c] into dst (nb * BLK_VECS
 * vectors). */
static ALWAYS_INLINE void pack_tile(uint32_t type, const uint8_t *const row[TW], int64_t nb,
				    size_t pf, __m512i *dst)
{
	const size_t bs = block_bytes(type);
	const size_t qo = type == KERN_MXFP4 ? 1 : 2; /* codes' offset in the block */
	const __m512i m4 = _mm512_set1_epi8(0x0f), x80 = _mm512_set1_epi8((char)0x80);
	const __m512i tab =
	    _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)mxfp4_unsigned));
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * bs;
		__m512i *v = dst + ib * BLK_VECS;
		__m512i z[4], h[4];
		if (!(ib & 1) || type == KERN_Q8_0) /* a line per 64 bytes or fewer */
			prefetch_rows(row, o + pf);
		for (int k = 0; k < 4; k++)
			z[k] = load4x16(row[k] + o + qo, row[4 + k] + o + qo, row[8 + k] + o + qo,
					row[12 + k] + o + qo);
		if (type == KERN_Q8_0) {
			for (int k = 0; k < 4; k++) {
				h[k] = _mm512_xor_si512(
				    load4x16(row[k] + o + 18, row[4 + k] + o + 18,
					     row[8 + k] + o + 18, row[12 + k] + o + 18),
				    x80);
				z[k] = _mm512_xor_si512(z[k], x80);
			}
		} else {
			for (int k = 0; k < 4; k++) {
				h[k] = _mm512_and_si512(_mm512_srli_epi16(z[k], 4), m4);
				z[k] = _mm512_and_si512(z[k], m4);
				if (type == KERN_MXFP4) {
					h[k] = _mm512_shuffle_epi8(tab, h[k]);
					z[k] = _mm512_shuffle_epi8(tab, z[k]);
				}
			}
		}
		transpose4(z, v);
		transpose4(h, v + 4);
		v[8] = _mm512_castps_si512(tile_scales(type, row, o));
	}
}

/* The activation table of one row of nb Q8_0 blocks. */
static void xc_row(uint32_t type, const uint8_t *x, int64_t nb, struct xc *q)
{
	const __m256i ones = _mm256_set1_epi8(1);
	const int off = type == KERN_Q4_0 ? 8 : 12;
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *xb = x + (size_t)ib * 34;
		q[ib].d = _cvtsh_ss(kern_load_u16(xb));
		/* sums of the eight groups of four */
		const __m256i s = _mm256_dpbusd_epi32(
		    _mm256_setzero_si256(), ones, _mm256_loadu_si256((const __m256i *)(xb + 2)));
		if (type == KERN_Q8_0) {
			_mm256_storeu_si256(
			    (__m256i *)q[ib].c,
			    _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(s, 7)));
		} else {
			__m128i t = _mm_add_epi32(_mm256_castsi256_si128(s),
						  _mm256_extracti128_si256(s, 1));
			t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
			t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
			q[ib].c[0] = -off * _mm_cvtsi128_si32(t);
		}
	}
}

static ALWAYS_INLINE __m512i bcast4(const uint8_t *p)
{
	int32_t v;
	memcpy(&v, p, sizeof(v));
	return _mm512_set1_epi32(v);
}

/* Where a tile writes row r's 16 results: y + r * ys, the lanes in m. */
struct ydst {
	float *y;
	int64_t ys;
	__mmask16 m;
};

static ALWAYS_INLINE void store_out(const struct ydst *d, int r, __m512 v)
{
	_mm512_mask_storeu_ps(d->y + r * d->ys, d->m, v);
}

/* Q4_0 / MXFP4: the 16 outputs of a repacked tile for nr rows (activation
 * row r at x + r * xs, table q + r * nb), stored through out. */
static ALWAYS_INLINE void tile_q4(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				  const struct xc *q, int64_t nb, const struct ydst *out)
{
	__m512 acc[R4];
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
		acc[r] = _mm512_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const __m512i *v = pw + ib * BLK_VECS;
		const __m512 dw = _mm512_castsi512_ps(v[8]);
#pragma GCC unroll 8
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * 34 + 2;
			const struct xc *qb = q + r * nb + ib;
			/* two chains of four: integer sums, any order is exact */
			__m512i s0 = _mm512_set1_epi32(qb->c[0]);
			__m512i s1 = _mm512_setzero_si512();
			s0 = _mm512_dpbusd_epi32(s0, v[0], bcast4(xb));
			s1 = _mm512_dpbusd_epi32(s1, v[1], bcast4(xb + 4));
			s0 = _mm512_dpbusd_epi32(s0, v[2], bcast4(xb + 8));
			s1 = _mm512_dpbusd_epi32(s1, v[3], bcast4(xb + 12));
			s0 = _mm512_dpbusd_epi32(s0, v[4], bcast4(xb + 16));
			s1 = _mm512_dpbusd_epi32(s1, v[5], bcast4(xb + 20));
			s0 = _mm512_dpbusd_epi32(s0, v[6], bcast4(xb + 24));
			s1 = _mm512_dpbusd_epi32(s1, v[7], bcast4(xb + 28));
			const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(qb->d));
			acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), d,
						 acc[r]);
		}
	}
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
		store_out(out, r, acc[r]);
}

/* ------------------------------------------------ one activation row */

/* Decode (one activation row), Q4_0 / MXFP4, the weights read in place:
 * tiles of 16 outputs; per block, four vectors hold the code bytes of four
 * outputs each (128-bit lane L of vector k: output 4L + k), split into
 * nibbles (MXFP4: mapped to the unsigned codes), and VPDPBUSD with the
 * block's activations broadcast to every lane leaves four int32 partial sums
 * per output; two unpack-and-add rounds gather each output's total into
 * lane 4L + k of one vector.  The float step is tile_q4's, so the results
 * are again the scalar twin's.  Each tile's rows prefetch the next tile's.
 * Needs at least 16 outputs (a short last tile ends at o1, overlapping). */
static ALWAYS_INLINE void matvec_q4(uint32_t type, const uint8_t *w, size_t w_row, int64_t nb,
				    int64_t o0, int64_t o1, const uint8_t *x, const struct xc *q,
				    float *y)
{
	const size_t bs = block_bytes(type);
	const size_t qo = type == KERN_MXFP4 ? 1 : 2; /* codes' offset in the block */
	const __m512i m4 = _mm512_set1_epi8(0x0f);
	const __m512i tab =
	    _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)mxfp4_unsigned));
	for (int64_t o = o0; o < o1; o += TW) {
		const int64_t ot = o1 - o < TW ? o1 - TW : o;
		const size_t pf = o + TW < o1 ? TW * w_row : 0;
		const uint8_t *row[TW];
		for (int c = 0; c < TW; c++)
			row[c] = w + (size_t)(ot + c) * w_row;
		__m512 acc = _mm512_setzero_ps();
		for (int64_t ib = 0; ib < nb; ib++) {
			const size_t off = (size_t)ib * bs;
			const uint8_t *xb = x + (size_t)ib * 34;
			if (pf && !(ib & 1))
#pragma GCC unroll 16
				for (int c = 0; c < TW; c++)
					_mm_prefetch((const char *)row[c] + off + pf, _MM_HINT_T0);
			const __m512i xl =
			    _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 2)));
			const __m512i xh =
			    _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 18)));
			__m512i s[4];
#pragma GCC unroll 4
			for (int k = 0; k < 4; k++) {
				const __m512i z =
				    load4x16(row[k] + off + qo, row[4 + k] + off + qo,
					     row[8 + k] + off + qo, row[12 + k] + off + qo);
				__m512i lo = _mm512_and_si512(z, m4);
				__m512i hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
				if (type == KERN_MXFP4) {
					lo = _mm512_shuffle_epi8(tab, lo);
					hi = _mm512_shuffle_epi8(tab, hi);
				}
				s[k] = _mm512_dpbusd_epi32(
				    _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
			}
			const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]),
							     _mm512_unpackhi_epi32(s[0], s[1]));
			const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]),
							     _mm512_unpackhi_epi32(s[2], s[3]));
			const __m512i sum =
			    _mm512_add_epi32(_mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23),
							      _mm512_unpackhi_epi64(t01, t23)),
					     _mm512_set1_epi32(q[ib].c[0]));
			const __m512 d =
			    _mm512_mul_ps(tile_scales(type, row, off), _mm512_set1_ps(q[ib].d));
			acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, acc);
		}
		/* an overlapping last tile keeps the outputs already written */
		_mm512_mask_storeu_ps(y + ot, (__mmask16)(0xffffu << (o - ot)), acc);
	}
}

static void matvec_q4_0(const uint8_t *w, size_t w_row, int64_t nb, int64_t o0, int64_t o1,
			const uint8_t *x, const struct xc *q, float *y)
{
	matvec_q4(KERN_Q4_0, w, w_row, nb, o0, o1, x, q, y);
}

static void matvec_mxfp4(const uint8_t *w, size_t w_row, int64_t nb, int64_t o0, int64_t o1,
			 const uint8_t *x, const struct xc *q, float *y)
{
	matvec_q4(KERN_MXFP4, w, w_row, nb, o0, o1, x, q, y);
}

/* Decode, Q8_0, the weights read in place: two outputs per vector (one
 * block each per 256-bit half), eight outputs per tile.  The weights biased
 * to unsigned (w ^ 0x80) and VPDPBUSD with the block's activations, starting
 * from the table's -128 x group sums, give each output's eight lanes exactly
 * (ggml's lane m: values 4m .. 4m + 3); acc_m = fma(d_w * d_x, lane_m, acc_m)
 * and ggml's hsum_float_8 at the end, as tile_q8.  Needs at least 8 outputs
 * (a short last tile ends at o1, overlapping). */
static void matvec_q8_0(const uint8_t *w, size_t w_row, int64_t nb, int64_t o0, int64_t o1,
			const uint8_t *x, const struct xc *q, float *y)
{
	enum { QW = 8 };
	const __m512i x80 = _mm512_set1_epi8((char)0x80);
	for (int64_t o = o0; o < o1; o += QW) {
		const int64_t ot = o1 - o < QW ? o1 - QW : o;
		const size_t pf = o + QW < o1 ? QW * w_row : 0;
		const uint8_t *row = w + (size_t)ot * w_row;
		__m512 acc[QW / 2];
#pragma GCC unroll 4
		for (int p = 0; p < QW / 2; p++)
			acc[p] = _mm512_setzero_ps();
		for (int64_t ib = 0; ib < nb; ib++) {
			const size_t off = (size_t)ib * 34;
			const __m512i xv = _mm512_broadcast_i64x4(
			    _mm256_loadu_si256((const __m256i *)(x + off + 2)));
			const __m512i c =
			    _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q[ib].c));
			const __m512 dx = _mm512_set1_ps(q[ib].d);
#pragma GCC unroll 4
			for (int p = 0; p < QW / 2; p++) {
				const uint8_t *r0 = row + (size_t)(2 * p) * w_row + off,
					      *r1 = r0 + w_row;
				if (pf) {
					_mm_prefetch((const char *)r0 + pf, _MM_HINT_T0);
					_mm_prefetch((const char *)r1 + pf, _MM_HINT_T0);
				}
				const __m512i wv = _mm512_xor_si512(
				    _mm512_inserti64x4(
					_mm512_castsi256_si512(
					    _mm256_loadu_si256((const __m256i *)(r0 + 2))),
					_mm256_loadu_si256((const __m256i *)(r1 + 2)), 1),
				    x80);
				const __m512i l = _mm512_dpbusd_epi32(c, wv, xv);
				const __m512 dw = _mm512_cvtph_ps(
				    _mm256_set_m128i(_mm_set1_epi16((short)kern_load_u16(r1)),
						     _mm_set1_epi16((short)kern_load_u16(r0))));
				acc[p] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx),
							 _mm512_cvtepi32_ps(l), acc[p]);
			}
		}
		float out[QW];
#pragma GCC unroll 4
		for (int p = 0; p < QW / 2; p++) {
			/* hsum_float_8 of each half: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 +
			 * a7)) */
			for (int h = 0; h < 2; h++) {
				const __m256 v = h ? _mm512_extractf32x8_ps(acc[p], 1)
						   : _mm512_castps512_ps256(acc[p]);
				__m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1),
						      _mm256_castps256_ps128(v));
				r = _mm_add_ps(r, _mm_movehl_ps(r, r));
				r = _mm_add_ss(r, _mm_movehdup_ps(r));
				out[2 * p + h] = _mm_cvtss_f32(r);
			}
		}
		/* an overlapping last tile keeps the outputs already written */
		for (int64_t i = o - ot; i < QW; i++)
			y[ot + i] = out[i];
	}
}

/* Eight accumulators per output (ggml's eight lanes): zeroed for nr rows, and
 * summed as ggml's hsum_float_8: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). */
static ALWAYS_INLINE void zero_lanes(int nr, __m512 (*acc)[8])
{
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
		for (int m = 0; m < 8; m++)
			acc[r][m] = _mm512_setzero_ps();
}

static ALWAYS_INLINE __m512 hsum8_lanes(const __m512 *a)
{
	const __m512 a0 = _mm512_add_ps(a[4], a[0]), a1 = _mm512_add_ps(a[5], a[1]);
	const __m512 a2 = _mm512_add_ps(a[6], a[2]), a3 = _mm512_add_ps(a[7], a[3]);
	return _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
}

/* Q8_0: as tile_q4 with kern_ref.c's eight accumulators per output. */
static ALWAYS_INLINE void tile_q8(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				  const struct xc *q, int64_t nb, const struct ydst *out)
{
	__m512 acc[R8][8];
	zero_lanes(nr, acc);
	for (int64_t ib = 0; ib < nb; ib++) {
		const __m512i *v = pw + ib * BLK_VECS;
		const __m512 dw = _mm512_castsi512_ps(v[8]);
#pragma GCC unroll 8
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * 34 + 2;
			const struct xc *qb = q + r * nb + ib;
			const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(qb->d));
#pragma GCC unroll 8
			for (int m = 0; m < 8; m++) {
				const __m512i s = _mm512_dpbusd_epi32(_mm512_set1_epi32(qb->c[m]),
								      v[m], bcast4(xb + 4 * m));
				acc[r][m] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[r][m]);
			}
		}
	}
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
		store_out(out, r, hsum8_lanes(acc[r]));
}

typedef void (*tile_fn)(const __m512i *pw, const uint8_t *x, size_t xs, const void *q, int64_t nb,
			const struct ydst *out);

#define TILE_DEF(kind, nr)                                                                         \
	static void kind##_##nr(const __m512i *pw, const uint8_t *x, size_t xs, const void *q,     \
				int64_t nb, const struct ydst *out)                                \
	{                                                                                          \
		kind(nr, pw, x, xs, q, nb, out);                                                   \
	}
TILE_DEF(tile_q4, 1)
TILE_DEF(tile_q4, 2)
TILE_DEF(tile_q4, 3)
TILE_DEF(tile_q4, 4)
TILE_DEF(tile_q4, 5)
TILE_DEF(tile_q4, 6)
TILE_DEF(tile_q8, 1)
TILE_DEF(tile_q8, 2)
static const tile_fn tiles_q4[R4] = {tile_q4_1, tile_q4_2, tile_q4_3,
				     tile_q4_4, tile_q4_5, tile_q4_6};
static const tile_fn tiles_q8[R8] = {tile_q8_1, tile_q8_2};

static void pack_q4_0(const uint8_t *const row[TW], int64_t nb, size_t pf, __m512i *dst)
{
	pack_tile(KERN_Q4_0, row, nb, pf, dst);
}

static void pack_q8_0(const uint8_t *const row[TW], int64_t nb, size_t pf, __m512i *dst)
{
	pack_tile(KERN_Q8_0, row, nb, pf, dst);
}

static void pack_mxfp4(const uint8_t *const row[TW], int64_t nb, size_t pf, __m512i *dst)
{
	pack_tile(KERN_MXFP4, row, nb, pf, dst);
}

static void xc_q4_0(const uint8_t *x, int64_t nb, void *q)
{
	xc_row(KERN_Q4_0, x, nb, q);
}

static void xc_q8_0(const uint8_t *x, int64_t nb, void *q)
{
	xc_row(KERN_Q8_0, x, nb, q);
}

static void xc_mxfp4(const uint8_t *x, int64_t nb, void *q)
{
	xc_row(KERN_MXFP4, x, nb, q);
}

/* ---------------------------------------------------------------- Q4_K */

/* Q4_K x Q8_K, kern_kq_ref.c's block form (and its repacked-GEMM form, per
 * 64 values, for the rows below gemm_rows): per block
 *   isum = sum_s sc_s * sum_{v in s} q_v q8_v,  msum = sum_s m_s * B_s
 * (B_s = bsums[2s] + bsums[2s + 1]); acc = fma((float)isum, d_w * d_x, acc),
 * accm = fma((float)msum, dmin_w * d_x, accm); result acc - accm.  A
 * repacked block: sub-block s's eight code vectors at 8s (nibbles, used
 * unsigned, no offset), its scales sc_s as int32 at 64 + s, the mins as int16
 * pairs (m_2t, m_2t+1) at 72 + t, d and dmin at 76, 77.  The activation table
 * holds d_x and the B_s as int16 pairs, so one VPDPWSSD per pair of
 * sub-blocks forms msum. */
#define K4_VECS 78
#define RK	4 /* activation rows per pass */

struct xk {
	float d;
	int32_t bp[4]; /* B_2t | B_2t+1 << 16 */
};

static void pack_q4_k(const uint8_t *const row[TW], int64_t nb, size_t pf, __m512i *dst)
{
	const __m512i m4 = _mm512_set1_epi8(0x0f);
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * 144;
		__m512i *v = dst + ib * K4_VECS;
		prefetch_rows(row, o + pf);
		prefetch_rows(row, o + pf + 64);
		prefetch_rows(row, o + pf + 128);
		for (int p = 0; p < 4; p++)
			for (int h = 0; h < 2; h++) {
				const size_t q = o + 16 + 32 * p + 16 * h;
				__m512i z[4], hi[4];
				for (int k = 0; k < 4; k++) {
					z[k] = load4x16(row[k] + q, row[4 + k] + q, row[8 + k] + q,
							row[12 + k] + q);
					hi[k] = _mm512_and_si512(_mm512_srli_epi16(z[k], 4), m4);
					z[k] = _mm512_and_si512(z[k], m4);
				}
				transpose4(z, v + 8 * (2 * p) + 4 * h);
				transpose4(hi, v + 8 * (2 * p + 1) + 4 * h);
			}
		/* per output (lane): scale bytes 0-3, 4-7, 8-11, and d | dmin << 16 */
		__m512i hd[4];
		rows_dwords(row, o, hd);
		const __m512i dd = hd[0], a = hd[1], b = hd[2], c = hd[3];
		const __m512i m63 = _mm512_set1_epi32(63), m15 = _mm512_set1_epi32(15);
		const __m512i m3 = _mm512_set1_epi32(3);
		__m512i mn[8];
		for (int s4 = 0; s4 < 4; s4++) {
			const __m128i n = _mm_cvtsi32_si128(8 * s4);
			const __m512i as = _mm512_srl_epi32(a, n);
			const __m512i bs = _mm512_srl_epi32(b, n);
			const __m512i cs = _mm512_srl_epi32(c, n);
			v[64 + s4] = _mm512_and_si512(as, m63);
			mn[s4] = _mm512_and_si512(bs, m63);
			v[68 + s4] = _mm512_or_si512(
			    _mm512_and_si512(cs, m15),
			    _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(as, 6), m3), 4));
			mn[4 + s4] = _mm512_or_si512(
			    _mm512_and_si512(_mm512_srli_epi32(cs, 4), m15),
			    _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(bs, 6), m3), 4));
		}
		for (int t = 0; t < 4; t++)
			v[72 + t] =
			    _mm512_or_si512(mn[2 * t], _mm512_slli_epi32(mn[2 * t + 1], 16));
		v[76] = _mm512_castps_si512(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd)));
		v[77] = _mm512_castps_si512(
		    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dd, 16))));
	}
}

static void xk_row(const uint8_t *x, int64_t nb, void *tab)
{
	struct xk *q = tab;
	for (int64_t ib = 0; ib < nb; ib++) {
		const struct kern_block_q8_k *b = (const struct kern_block_q8_k *)x + ib;
		memcpy(&q[ib].d, &b->d, sizeof(float));
		for (int t = 0; t < 4; t++) {
			int16_t bs[4];
			memcpy(bs, b->bsums + 4 * t, sizeof(bs));
			const int b0 = bs[0] + bs[1], b1 = bs[2] + bs[3];
			q[ib].bp[t] = (int32_t)((uint32_t)(uint16_t)b0 | (uint32_t)b1 << 16);
		}
	}
}

/* As tile_q4; gemm: kern_kq_dot_gemm_ref's 64-value steps. */
static ALWAYS_INLINE void tile_k4(int nr, int gemm, const __m512i *pw, const uint8_t *x, size_t xs,
				  const struct xk *q, int64_t nb, const struct ydst *out)
{
	__m512 acc[RK], accm[RK];
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
		acc[r] = accm[r] = _mm512_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const __m512i *v = pw + ib * K4_VECS;
		const uint8_t *xb = x + (size_t)ib * sizeof(struct kern_block_q8_k) + 4;
		__m512i isum[RK], msum[RK];
#pragma GCC unroll 8
		for (int p = 0; p < 4; p++) {
			if (gemm || p == 0)
#pragma GCC unroll 8
				for (int r = 0; r < nr; r++)
					isum[r] = msum[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
			for (int s = 2 * p; s < 2 * p + 2; s++) {
				__m512i s0[RK], s1[RK];
#pragma GCC unroll 8
				for (int r = 0; r < nr; r++)
					s0[r] = s1[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
				for (int g = 0; g < 8; g += 2) {
					const __m512i w0 = v[8 * s + g], w1 = v[8 * s + g + 1];
#pragma GCC unroll 8
					for (int r = 0; r < nr; r++) {
						const uint8_t *xr = xb + r * xs + 32 * s + 4 * g;
						s0[r] = _mm512_dpbusd_epi32(s0[r], w0, bcast4(xr));
						s1[r] =
						    _mm512_dpbusd_epi32(s1[r], w1, bcast4(xr + 4));
					}
				}
#pragma GCC unroll 8
				for (int r = 0; r < nr; r++) {
					const __m512i t = _mm512_mullo_epi32(
					    v[64 + s], _mm512_add_epi32(s0[r], s1[r]));
					isum[r] = _mm512_add_epi32(isum[r], t);
				}
			}
#pragma GCC unroll 8
			for (int r = 0; r < nr; r++) {
				const __m512i b = _mm512_set1_epi32(q[r * nb + ib].bp[p]);
				msum[r] = _mm512_dpwssd_epi32(msum[r], v[72 + p], b);
			}
			if (!gemm && p < 3)
				continue;
#pragma GCC unroll 8
			for (int r = 0; r < nr; r++) {
				const __m512 dx = _mm512_set1_ps(q[r * nb + ib].d);
				acc[r] = _mm512_fmadd_ps(
				    _mm512_cvtepi32_ps(isum[r]),
				    _mm512_mul_ps(_mm512_castsi512_ps(v[76]), dx), acc[r]);
				accm[r] = _mm512_fmadd_ps(
				    _mm512_cvtepi32_ps(msum[r]),
				    _mm512_mul_ps(_mm512_castsi512_ps(v[77]), dx), accm[r]);
			}
		}
	}
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
		store_out(out, r, _mm512_sub_ps(acc[r], accm[r]));
}

static ALWAYS_INLINE void tile_k4_dot(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				      const void *q, int64_t nb, const struct ydst *out)
{
	tile_k4(nr, 0, pw, x, xs, q, nb, out);
}

static ALWAYS_INLINE void tile_k4_gemm(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				       const void *q, int64_t nb, const struct ydst *out)
{
	tile_k4(nr, 1, pw, x, xs, q, nb, out);
}

TILE_DEF(tile_k4_dot, 1)
TILE_DEF(tile_k4_dot, 2)
TILE_DEF(tile_k4_dot, 3)
TILE_DEF(tile_k4_dot, 4)
TILE_DEF(tile_k4_gemm, 1)
TILE_DEF(tile_k4_gemm, 2)
TILE_DEF(tile_k4_gemm, 3)
TILE_DEF(tile_k4_gemm, 4)
static const tile_fn tiles_k4_dot[RK] = {tile_k4_dot_1, tile_k4_dot_2, tile_k4_dot_3,
					 tile_k4_dot_4};
static const tile_fn tiles_k4_gemm[RK] = {tile_k4_gemm_1, tile_k4_gemm_2, tile_k4_gemm_3,
					  tile_k4_gemm_4};

/* ---------------------------------------------------------------- Q6_K */

/* Q6_K x Q8_K, kern_kq_ref.c's lane form: per block eight int32 lanes, lane m
 * = sum over the 32-value chunks c of scales[2c + m/4] * sum of q_v q8_v for
 * v = 32c + 4m .. 32c + 4m + 3 (q the unsigned code), less 32 (scales[2m]
 * bsums[2m] + scales[2m + 1] bsums[2m + 1]); acc_m = fma(d_w * d_x,
 * (float)lane_m, acc_m); result ggml's hsum_float_8 of the eight.  Here the
 * repacking multiplies each code by its scale into int16 (|scale * q| <=
 * 8064), so VPDPWSSD takes pairs of values straight into the lanes: the four
 * values of group gi = 8c + m (values 4 gi .. 4 gi + 3) are two vectors,
 * values (0, 2) at 2 gi and (1, 3) at 2 gi + 1; the 16 scales d_w at 128;
 * lane m's correction pair (-32 scales[2m], -32 scales[2m + 1]) at 129 + m.
 * The activation table holds the Q8_K values widened to int16 in the same
 * pairs and the bsums pairs. */
#define K6_VECS 137
#define R6	2 /* activation rows per pass (eight accumulators a row) */

struct x6 {
	float d;
	int32_t xe[64]; /* group gi: values 4 gi, 4 gi + 2 as int16 */
	int32_t xo[64]; /* values 4 gi + 1, 4 gi + 3 */
	int32_t bs[8];	/* bsums[2m], bsums[2m + 1] as int16 */
};

/* The 256 (unsigned) codes of a Q6_K block in value order. */
static ALWAYS_INLINE void q6_codes(const uint8_t *b, int8_t *q)
{
	const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3);
	for (int h = 0; h < 2; h++) {
		const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
		const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
		const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
		const __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
				       _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
				       _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
		const __m256i hi[4] = {_mm256_and_si256(hb, m3),
				       _mm256_and_si256(_mm256_srli_epi16(hb, 2), m3),
				       _mm256_and_si256(_mm256_srli_epi16(hb, 4), m3),
				       _mm256_and_si256(_mm256_srli_epi16(hb, 6), m3)};
		for (int k = 0; k < 4; k++) {
			const __m256i v = _mm256_or_si256(lo[k], _mm256_slli_epi16(hi[k], 4));
			_mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * k), v);
		}
	}
}

static void pack_q6_k(const uint8_t *const row[TW], int64_t nb, size_t pf, __m512i *dst)
{
	int8_t q[TW][KERN_QK_K];
	const __m512i lo16 = _mm512_set1_epi32(0xffff);
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * 210;
		__m512i *v = dst + ib * K6_VECS;
		prefetch_rows(row, o + pf);
		prefetch_rows(row, o + pf + 64);
		prefetch_rows(row, o + pf + 128);
		prefetch_rows(row, o + pf + 192);
		for (int c = 0; c < TW; c++)
			q6_codes(row[c] + o, q[c]);
		__m512i sc[16]; /* lane c: output c's scale j */
		__m512i sg[4], dg[4];
		rows_dwords(row, o + 192, sg);
		for (int t = 0; t < 4; t++)
			for (int k = 0; k < 4; k++)
				sc[4 * t + k] = _mm512_srai_epi32(
				    _mm512_sll_epi32(sg[t], _mm_cvtsi32_si128(24 - 8 * k)), 24);
		for (int j = 0; j < 16; j++) { /* values 16j .. 16j + 15: groups 4j .. 4j + 3 */
			__m512i z[4], g[4];
			for (int k = 0; k < 4; k++)
				z[k] = load4x16((const uint8_t *)q[k] + 16 * j,
						(const uint8_t *)q[4 + k] + 16 * j,
						(const uint8_t *)q[8 + k] + 16 * j,
						(const uint8_t *)q[12 + k] + 16 * j);
			transpose4(z, g);
			/* the scale in both int16 halves */
			const __m512i s = _mm512_or_si512(_mm512_and_si512(sc[j], lo16),
							  _mm512_slli_epi32(sc[j], 16));
			for (int k = 0; k < 4; k++) {
				const int gi = 4 * j + k;
				const __m512i e = _mm512_srai_epi16(_mm512_slli_epi16(g[k], 8), 8);
				const __m512i od = _mm512_srai_epi16(g[k], 8);
				v[2 * gi] = _mm512_mullo_epi16(e, s);
				v[2 * gi + 1] = _mm512_mullo_epi16(od, s);
			}
		}
		/* d: the upper half of the four bytes before the block's end */
		rows_dwords(row, o + 194, dg);
		v[128] = _mm512_castps_si512(
		    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dg[3], 16))));
		for (int m = 0; m < 8; m++) {
			const __m512i n0 = _mm512_sub_epi32(_mm512_setzero_si512(),
							    _mm512_slli_epi32(sc[2 * m], 5));
			const __m512i n1 = _mm512_sub_epi32(_mm512_setzero_si512(),
							    _mm512_slli_epi32(sc[2 * m + 1], 5));
			v[129 + m] =
			    _mm512_or_si512(_mm512_and_si512(n0, lo16), _mm512_slli_epi32(n1, 16));
		}
	}
}

static void x6_row(const uint8_t *x, int64_t nb, void *tab)
{
	struct x6 *q = tab;
	for (int64_t ib = 0; ib < nb; ib++) {
		const struct kern_block_q8_k *b = (const struct kern_block_q8_k *)x + ib;
		memcpy(&q[ib].d, &b->d, sizeof(float));
		for (int k = 0; k < 4; k++) {
			const __m512i v = _mm512_loadu_si512(b->qs + 64 * k);
			_mm512_storeu_si512(q[ib].xe + 16 * k,
					    _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8));
			_mm512_storeu_si512(q[ib].xo + 16 * k, _mm512_srai_epi16(v, 8));
		}
		memcpy(q[ib].bs, b->bsums, sizeof(q[ib].bs));
	}
}

static ALWAYS_INLINE void tile_k6(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				  const void *tab, int64_t nb, const struct ydst *out)
{
	const struct x6 *q = tab;
	__m512 acc[R6][8];
	zero_lanes(nr, acc);
	for (int64_t ib = 0; ib < nb; ib++) {
		const __m512i *v = pw + ib * K6_VECS;
		__m512 d[R6];
#pragma GCC unroll 8
		for (int r = 0; r < nr; r++)
			d[r] = _mm512_mul_ps(_mm512_castsi512_ps(v[128]),
					     _mm512_set1_ps(q[r * nb + ib].d));
#pragma GCC unroll 8
		for (int m = 0; m < 8; m++) {
			__m512i l0[R6], l1[R6];
#pragma GCC unroll 8
			for (int r = 0; r < nr; r++) {
				l0[r] =
				    _mm512_dpwssd_epi32(_mm512_setzero_si512(), v[129 + m],
							_mm512_set1_epi32(q[r * nb + ib].bs[m]));
				l1[r] = _mm512_setzero_si512();
			}
#pragma GCC unroll 8
			for (int c = 0; c < 8; c++) {
				const int gi = 8 * c + m;
				const __m512i we = v[2 * gi], wo = v[2 * gi + 1];
#pragma GCC unroll 8
				for (int r = 0; r < nr; r++) {
					const struct x6 *t = q + r * nb + ib;
					l0[r] = _mm512_dpwssd_epi32(l0[r], we,
								    _mm512_set1_epi32(t->xe[gi]));
					l1[r] = _mm512_dpwssd_epi32(l1[r], wo,
								    _mm512_set1_epi32(t->xo[gi]));
				}
			}
#pragma GCC unroll 8
			for (int r = 0; r < nr; r++)
				acc[r][m] = _mm512_fmadd_ps(
				    d[r], _mm512_cvtepi32_ps(_mm512_add_epi32(l0[r], l1[r])),
				    acc[r][m]);
		}
	}
	(void)x;
	(void)xs;
#pragma GCC unroll 8
	for (int r = 0; r < nr; r++)
		store_out(out, r, hsum8_lanes(acc[r]));
}

TILE_DEF(tile_k6, 1)
TILE_DEF(tile_k6, 2)
static const tile_fn tiles_k6[R6] = {tile_k6_1, tile_k6_2};

/* -------------------------------------------------------------- driver */

/* How one weight type runs through the driver. */
struct vnni_kind {
	int qk;	      /* values per block */
	int vecs;     /* repacked vectors per block and tile */
	size_t tab;   /* activation table bytes per block */
	int rmax;     /* rows per pass */
	int min_rows; /* fewer rows take the AVX2 kernels (the repacking would
			 cost more than it saves; measured on Zen 5) */
	void (*pack)(const uint8_t *const row[TW], int64_t nb, size_t pf, __m512i *dst);
	void (*xrow)(const uint8_t *x, int64_t nb, void *tab);
	const tile_fn *tiles, *tiles_gemm;
};

/* clang-format off */
static const struct vnni_kind kinds[] = {
	/* qk, vecs, table bytes, rows per pass, min rows, repack, table, tiles, GEMM-form tiles */
	{KERN_QK, BLK_VECS, sizeof(struct xc), R4, 2, pack_q4_0, xc_q4_0, tiles_q4, tiles_q4},
	{KERN_QK, BLK_VECS, sizeof(struct xc), R4, 2, pack_mxfp4, xc_mxfp4, tiles_q4, tiles_q4},
	{KERN_QK, BLK_VECS, sizeof(struct xc), R8, 3, pack_q8_0, xc_q8_0, tiles_q8, tiles_q8},
	{KERN_QK_K, K4_VECS, sizeof(struct xk), RK, 3, pack_q4_k, xk_row, tiles_k4_dot, tiles_k4_gemm},
	{KERN_QK_K, K6_VECS, sizeof(struct x6), R6, 10, pack_q6_k, x6_row, tiles_k6, tiles_k6},
};
/* clang-format on */

static const struct vnni_kind *vnni_kind_for(uint32_t type)
{
	switch (type) {
	case KERN_Q4_0: return &kinds[0];
	case KERN_MXFP4: return &kinds[1];
	case KERN_Q8_0: return &kinds[2];
	case KERN_Q4_K: return &kinds[3];
	case KERN_Q6_K: return &kinds[4];
	default: return NULL;
	}
}

/* Rows [r0, r1) of the outputs [oc, oe) against their repacked tiles. */
static void rows_vnni(const struct vnni_kind *k, const tile_fn *tf, const __m512i *packed,
		      int64_t nb, int64_t oc, int64_t oe, const uint8_t *x, size_t xs,
		      const uint8_t *tab, int64_t r0, int64_t r1, float *y, int64_t ys)
{
	const int64_t nt = (oe - oc + TW - 1) / TW;
	for (int64_t r = r0; r < r1; r += k->rmax) {
		const int nr = r1 - r < k->rmax ? (int)(r1 - r) : k->rmax;
		for (int64_t t = 0; t < nt; t++) {
			const int64_t o = oc + t * TW;
			const int nc = oe - o < TW ? (int)(oe - o) : TW;
			const struct ydst out = {y + r * ys + o, ys, (__mmask16)((1u << nc) - 1)};
			tf[nr - 1](packed + (size_t)t * nb * k->vecs, x + (size_t)r * xs, xs,
				   tab + (size_t)(r * nb) * k->tab, nb, &out);
		}
	}
}

/* 0, or -1 if the scratch buffer could not grow or the rows are too long
 * (nothing written).  Rows below gemm_rows take the kind's tiles_gemm.
 * Activation rows in blocks of ROW_BLOCK, each block's table built once and
 * the weights repacked once per block, so the scratch buffer stays bounded
 * however many rows come. */
static int matmul_vnni(uint32_t type, const struct vnni_kind *k, const uint8_t *w, int64_t n_in,
		       int64_t o0, int64_t o1, const uint8_t *x, size_t xs, int64_t n_rows,
		       float *y, int64_t ys, int64_t gemm_rows)
{
	const size_t w_row = kern_row_bytes(type, n_in);
	const int64_t nb = n_in / k->qk;
	const size_t tile_bytes = (size_t)nb * (size_t)k->vecs * sizeof(__m512i);
	int64_t tiles = (int64_t)(CHUNK_PACK / tile_bytes);
	const int64_t need = (o1 - o0 + TW - 1) / TW;
	if (tiles < 1)
		tiles = 1;
	if (tiles > need)
		tiles = need;
	const int64_t rb_max = n_rows < ROW_BLOCK ? n_rows : ROW_BLOCK;
	const size_t tab_bytes = (size_t)(nb * rb_max) * k->tab;
	uint8_t *buf = kern_scratch((size_t)tiles * tile_bytes + tab_bytes + 64);
	if (!buf)
		return -1;
	__m512i *packed = (__m512i *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
	uint8_t *tab = (uint8_t *)(packed + (size_t)tiles * nb * k->vecs);

	for (int64_t r0 = 0; r0 < n_rows; r0 += rb_max) {
		const int64_t nr = n_rows - r0 < rb_max ? n_rows - r0 : rb_max;
		const uint8_t *xr = x + (size_t)r0 * xs;
		float *yr = y + r0 * ys;
		/* this block's rows below gemm_rows, relative to r0 */
		const int64_t g = gemm_rows <= r0 ? 0 : gemm_rows - r0 < nr ? gemm_rows - r0 : nr;
		for (int64_t r = 0; r < nr; r++)
			k->xrow(xr + (size_t)r * xs, nb, tab + (size_t)(r * nb) * k->tab);
		for (int64_t oc = o0; oc < o1; oc += tiles * TW) {
			const int64_t oe = oc + tiles * TW < o1 ? oc + tiles * TW : o1;
			const int64_t nt = (oe - oc + TW - 1) / TW;
			for (int64_t t = 0; t < nt; t++) {
				/* a short last tile repeats its last row; those
				 * lanes are dropped */
				const uint8_t *row[TW];
				for (int64_t c = 0; c < TW; c++) {
					const int64_t o =
					    oc + t * TW + c < oe ? oc + t * TW + c : oe - 1;
					row[c] = w + (size_t)o * w_row;
				}
				k->pack(row, nb, TW * w_row, packed + (size_t)t * nb * k->vecs);
			}
			rows_vnni(k, k->tiles_gemm, packed, nb, oc, oe, xr, xs, tab, 0, g, yr, ys);
			rows_vnni(k, k->tiles, packed, nb, oc, oe, xr, xs, tab, g, nr, yr, ys);
		}
	}
	return 0;
}

void kern_matmul_avx512(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	const struct vnni_kind *k = vnni_kind_for(weight_type);
	if (k && n_rows >= k->min_rows && o1 > o0 && n_in >= k->qk &&
	    matmul_vnni(weight_type, k, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, 0) == 0)
		return;
	const int64_t mv_min = weight_type == KERN_Q8_0 ? 8 : TW; /* outputs of a tile */
	if (n_rows == 1 &&
	    (weight_type == KERN_Q4_0 || weight_type == KERN_MXFP4 || weight_type == KERN_Q8_0) &&
	    o1 - o0 >= mv_min && n_in >= KERN_QK) {
		const size_t w_row = kern_row_bytes(weight_type, n_in);
		const int64_t nb = n_in / KERN_QK;
		struct xc *q = kern_scratch((size_t)nb * sizeof(*q));
		if (q) {
			xc_row(weight_type, x, nb, q);
			(weight_type == KERN_Q4_0    ? matvec_q4_0
			 : weight_type == KERN_MXFP4 ? matvec_mxfp4
						     : matvec_q8_0)(w, w_row, nb, o0, o1, x, q, y);
			return;
		}
	}
	kern_matmul_avx2(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride);
}

void kern_kq_matmul_avx512(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			   const void *x, size_t x_stride, int64_t n_rows, float *y,
			   int64_t y_stride, int64_t gemm_rows)
{
	const struct vnni_kind *k = vnni_kind_for(type);
	if (k && n_rows >= k->min_rows && o1 > o0 && n_in >= k->qk &&
	    matmul_vnni(type, k, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, gemm_rows) == 0)
		return;
	if (kern_kq_decode_avx512(type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride,
				  gemm_rows))
		return;
	kern_kq_matmul_avx2(type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, gemm_rows);
}
