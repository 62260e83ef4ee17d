/* kern_avx512: AVX-512 VNNI kernels, compiled with -mavx512f -mavx512bw
 * -mavx512vl -mavx512dq -mavx512vnni (and AVX2/FMA/F16C).
 *
 * Only called through kern.c's dispatch after kern_init() found the features.
 *
 * Q4_0, Q8_0 and MXFP4 weights times Q8_0 activations, several activation
 * rows (prefill, an expert's batch): the weights of 16 consecutive outputs
 * are repacked once per call so that int32 lane c of a vector belongs to
 * output c: for block ib and group m (values 4m .. 4m + 3), one vector holds
 * the 16 outputs' four codes of that group, unsigned (Q4_0: the nibble,
 * MXFP4: doubled E2M1 + 12, Q8_0: the int8 + 128), and one more the 16 weight
 * scales as F32.  An activation row's four int8 of group m are broadcast and
 * VPDPBUSD adds the four products into each output's lane, so a block's eight
 * groups give the 16 outputs' exact int32 block sums with no horizontal
 * adds.  The code offset times the activations' sum (per block, Q8_0 per
 * group) starts the sum, so the results are the signed dot products exactly.
 *
 * The float steps are the scalar reference's (kern_ref.c), lane by lane:
 * Q4_0 / MXFP4 acc = fma((float)sum, d_w * d_x, acc) block by block; Q8_0
 * eight accumulators per output, acc_m = fma(d_w * d_x, (float)lane_m, acc_m),
 * summed as ggml's hsum_float_8.  So the results equal kern_dot_ref's bit for
 * bit, whatever the tiling.
 *
 * Outputs run in chunks whose repacked weights (about 128 KiB) stay in L2
 * while every group of activation rows passes over them.  One row (decode)
 * and every other type take the AVX2 kernels (kern_avx2.c): without rows to
 * share it the repacking would not pay. */
#include <immintrin.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define TW	   16 /* outputs per tile: one int32 lane each */
#define R4	   6  /* activation rows per pass, Q4_0 / MXFP4 */
#define R8	   2  /* activation rows per pass, Q8_0 (eight accumulators a row) */
#define MIN_ROWS   2  /* fewer rows take the AVX2 kernels */
#define CHUNK_PACK ((size_t)128 << 10)

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

/* Repacks nb blocks of the 16 weight rows at row[c] into dst (nb * BLK_VECS
 * vectors). */
static ALWAYS_INLINE void pack_tile(uint32_t type, const uint8_t *const row[TW], int64_t nb,
				    __m512i *dst)
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
		float d[TW];
		for (int c = 0; c < TW; c++)
			d[c] = type == KERN_MXFP4 ? kern_e8m0_half(row[c][o])
						  : _cvtsh_ss(kern_load_u16(row[c] + o));
		v[8] = _mm512_castps_si512(_mm512_loadu_ps(d));
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

/* Q4_0 / MXFP4: out[r * TW + c] for r < nr rows (activation row r at
 * x + r * xs, table q + r * nb) against a repacked tile. */
static ALWAYS_INLINE void tile_q4(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				  const struct xc *q, int64_t nb, float *out)
{
	__m512 acc[R4];
	for (int r = 0; r < nr; r++)
		acc[r] = _mm512_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const __m512i *v = pw + ib * BLK_VECS;
		const __m512 dw = _mm512_castsi512_ps(v[8]);
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
	for (int r = 0; r < nr; r++)
		_mm512_storeu_ps(out + r * TW, acc[r]);
}

/* Q8_0: as tile_q4 with kern_ref.c's eight accumulators per output. */
static ALWAYS_INLINE void tile_q8(int nr, const __m512i *pw, const uint8_t *x, size_t xs,
				  const struct xc *q, int64_t nb, float *out)
{
	__m512 acc[R8][8];
	for (int r = 0; r < nr; r++)
		for (int m = 0; m < 8; m++)
			acc[r][m] = _mm512_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const __m512i *v = pw + ib * BLK_VECS;
		const __m512 dw = _mm512_castsi512_ps(v[8]);
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * 34 + 2;
			const struct xc *qb = q + r * nb + ib;
			const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(qb->d));
			for (int m = 0; m < 8; m++) {
				const __m512i s = _mm512_dpbusd_epi32(_mm512_set1_epi32(qb->c[m]),
								      v[m], bcast4(xb + 4 * m));
				acc[r][m] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[r][m]);
			}
		}
	}
	for (int r = 0; r < nr; r++) {
		const __m512 a0 = _mm512_add_ps(acc[r][4], acc[r][0]);
		const __m512 a1 = _mm512_add_ps(acc[r][5], acc[r][1]);
		const __m512 a2 = _mm512_add_ps(acc[r][6], acc[r][2]);
		const __m512 a3 = _mm512_add_ps(acc[r][7], acc[r][3]);
		_mm512_storeu_ps(out + r * TW,
				 _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
	}
}

typedef void (*tile_fn)(const __m512i *pw, const uint8_t *x, size_t xs, const struct xc *q,
			int64_t nb, float *out);

#define TILE_DEF(kind, nr)                                                                         \
	static void kind##_##nr(const __m512i *pw, const uint8_t *x, size_t xs,                    \
				const struct xc *q, int64_t nb, float *out)                        \
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

static void pack_q4_0(const uint8_t *const row[TW], int64_t nb, __m512i *dst)
{
	pack_tile(KERN_Q4_0, row, nb, dst);
}

static void pack_q8_0(const uint8_t *const row[TW], int64_t nb, __m512i *dst)
{
	pack_tile(KERN_Q8_0, row, nb, dst);
}

static void pack_mxfp4(const uint8_t *const row[TW], int64_t nb, __m512i *dst)
{
	pack_tile(KERN_MXFP4, row, nb, dst);
}

static void matmul_vnni(uint32_t type, const uint8_t *w, int64_t n_in, int64_t o0, int64_t o1,
			const uint8_t *x, size_t xs, int64_t n_rows, float *y, int64_t ys)
{
	const size_t w_row = kern_row_bytes(type, n_in);
	const int64_t nb = n_in / KERN_QK;
	const size_t tile_bytes = (size_t)nb * BLK_VECS * sizeof(__m512i);
	int64_t tiles = (int64_t)(CHUNK_PACK / tile_bytes);
	const int64_t need = (o1 - o0 + TW - 1) / TW;
	if (tiles < 1)
		tiles = 1;
	if (tiles > need)
		tiles = need;
	const size_t xc_bytes = (size_t)(nb * n_rows) * sizeof(struct xc);
	uint8_t *buf = kern_scratch((size_t)tiles * tile_bytes + xc_bytes + 64);
	if (!buf) { /* same results */
		kern_matmul_avx2(type, w, n_in, o0, o1, x, xs, n_rows, y, ys);
		return;
	}
	__m512i *packed = (__m512i *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
	struct xc *xq = (struct xc *)(packed + (size_t)tiles * nb * BLK_VECS);
	for (int64_t r = 0; r < n_rows; r++)
		xc_row(type, x + (size_t)r * xs, nb, xq + r * nb);

	void (*pack)(const uint8_t *const *, int64_t, __m512i *) = type == KERN_Q4_0   ? pack_q4_0
								   : type == KERN_Q8_0 ? pack_q8_0
										       : pack_mxfp4;
	const tile_fn *tf = type == KERN_Q8_0 ? tiles_q8 : tiles_q4;
	const int rmax = type == KERN_Q8_0 ? R8 : R4;

	for (int64_t oc = o0; oc < o1; oc += tiles * TW) {
		const int64_t oe = oc + tiles * TW < o1 ? oc + tiles * TW : o1;
		const int64_t nt = (oe - oc + TW - 1) / TW;
		for (int64_t t = 0; t < nt; t++) {
			/* a short last tile repeats its last row; those lanes
			 * are dropped */
			const uint8_t *row[TW];
			for (int64_t c = 0; c < TW; c++) {
				const int64_t o = oc + t * TW + c < oe ? oc + t * TW + c : oe - 1;
				row[c] = w + (size_t)o * w_row;
			}
			pack(row, nb, packed + (size_t)t * nb * BLK_VECS);
		}
		for (int64_t r = 0; r < n_rows; r += rmax) {
			const int nr = n_rows - r < rmax ? (int)(n_rows - r) : rmax;
			for (int64_t t = 0; t < nt; t++) {
				float out[R4 * TW];
				const int64_t o = oc + t * TW;
				const int nc = oe - o < TW ? (int)(oe - o) : TW;
				tf[nr - 1](packed + (size_t)t * nb * BLK_VECS, x + (size_t)r * xs,
					   xs, xq + r * nb, nb, out);
				for (int i = 0; i < nr; i++)
					memcpy(y + (r + i) * ys + o, out + i * TW,
					       (size_t)nc * sizeof(float));
			}
		}
	}
}

void kern_matmul_avx512(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	const int vnni =
	    weight_type == KERN_Q4_0 || weight_type == KERN_Q8_0 || weight_type == KERN_MXFP4;
	if (vnni && n_rows >= MIN_ROWS && o1 > o0 && n_in >= KERN_QK) {
		matmul_vnni(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride);
		return;
	}
	kern_matmul_avx2(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride);
}
