/* kern_avx2: AVX2/FMA/F16C kernels, compiled with -mavx2 -mfma -mf16c.
 *
 * Only called through kern.c's dispatch after kern_init() found the features.
 *
 * Quantised weights (Q4_0, Q8_0, MXFP4 x Q8_0 activations) are computed
 * exactly as the scalar reference computes them (Q4_0, MXFP4: an exact int32
 * sum per block, then acc = fma(sum, d_w * d_x, acc) block by block, as
 * llama.cpp's repacked GEMV/GEMM for these types, details at tile_q; Q8_0:
 * llama.cpp's eight FMA lanes, tile_q8_0), so kern_dot, kern_matmul and
 * kern_dot_ref agree bit for bit and with llama.cpp.
 *
 * F32 dots follow llama.cpp's AVX-512 forms (kern_f32_dot_vec_avx2 and
 * _gemm_avx2 at the end, dispatched per output by kern.c).  F16 and BF16 dots
 * go through one tile routine that computes nr
 * (1..FL_ROWS) activation rows against one weight row with a fixed
 * per-(row, output) operation sequence in four 8-lane accumulators (details
 * at tile_fl), so kern_matmul's results are bit-identical to kern_dot's
 * whatever the batch composition. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define FL_ROWS 2 /* activation rows per weight pass, float types */

static ALWAYS_INLINE float hsum8(__m256 v)
{
	__m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
	r = _mm_add_ps(r, _mm_movehl_ps(r, r));
	r = _mm_add_ss(r, _mm_movehdup_ps(r));
	return _mm_cvtss_f32(r);
}

/* ------------------------------------------------------ quantised dots */

/* Block unpacking and scales for dequantisation: the int8 values of a
 * block (and their absolute values). */
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

/* Exact block dots.  Every (row, output) pair is computed as the scalar
 * reference does: per block the integer dot product sum_j w_j * x_j is formed
 * exactly in int32, then acc = fma((float)sum, d_w * d_x, acc) with one F32
 * accumulator in block order (Q8_0: tile_q8_0's lanes).  So the results
 * equal kern_dot_ref's bit for bit, whatever the tiling.
 *
 * A tile is up to QC consecutive outputs (weight rows) x up to QR activation
 * rows; each weight block is unpacked once per tile and each activation block
 * loaded once per row.  The integer work runs on 128-bit halves of a block
 * (values 0-15 and 16-31): CPUs that split 256-bit integer operations in two
 * (Zen 1) gain nothing from wider ones (a tile with one 256-bit register per
 * block and a horizontal-add tree measured slower there), and the halves need
 * no cross-lane shuffles.
 *
 * Q4_0 and MXFP4 codes are used unsigned (Q4_0: the raw nibble, MXFP4: doubled
 * E2M1 + 12) so one maddubs multiplies them with the signed activations; the
 * offset (8 or 12) times the block's activation sum, precomputed per row and
 * block in a struct xq table with the activation scale as F32, is subtracted
 * from the int32 sum.  Pair sums are at most 2 * 24 * 128, so sums of up to 8
 * products (24576) fit in int16.  Q8_0 weights use the sign trick
 * (maddubs(|w|, sign(x, w)); pair sums up to 32512, so they are widened
 * before any adding).
 *
 * Decode (one activation row, tile_q1, Q4_0 / MXFP4): QC = 8 outputs.  Each
 * output's block is unpacked and multiplied at once, two outputs' int16 sums
 * are interleaved and added, widened by one madd, and the eight outputs end
 * as one vector of int32 block sums (lane c = output c), so the offset
 * correction, the conversion, the scales and the accumulation run on 8-lane
 * vectors.  The eight MXFP4 scales are built from the E8M0 bytes with one
 * shift (a slow path handles the subnormal e = 0, 1).
 *
 * Several rows (tile_q4), and Q8_0 always: four outputs whose unpacked blocks
 * stay in registers across the rows, reduced together (Q4_0 / MXFP4 with
 * horizontal adds, Q8_0 with unpack-and-add); Q4_0 and MXFP4 run it twice per
 * tile of QC.  (Measured: Q8_0, whose unpacking is cheap, decodes no faster
 * in the 8-wide tile.) */

#define QC 8 /* outputs per quantised tile, at most (Q8_0: 4) */
#define QR 4 /* activation rows per quantised tile, at most */

struct xq {
	float d;      /* activation block scale */
	int32_t corr; /* weight-code offset x sum of the block's activations */
};

/* MXFP4 doubled E2M1 codes + 12: 0..24 */
static const int8_t mxfp4_unsigned[16] = {12, 13, 14, 15, 16, 18, 20, 24,
					  12, 11, 10, 9,  8,  6,  4,  0};

static ALWAYS_INLINE int q_offset(uint32_t type)
{
	return type == KERN_Q4_0 ? 8 : type == KERN_MXFP4 ? 12 : 0;
}

/* Fills xq for one activation row of nb Q8_0 blocks. */
static void xq_row(uint32_t type, const uint8_t *x, int64_t nb, struct xq *q)
{
	const __m128i ones8 = _mm_set1_epi8(1), ones = _mm_set1_epi16(1);
	const int off = q_offset(type);
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *xb = x + (size_t)ib * 34;
		q[ib].d = _cvtsh_ss(kern_load_u16(xb));
		if (!off) {
			q[ib].corr = 0;
			continue;
		}
		__m128i xl = _mm_loadu_si128((const __m128i *)(xb + 2));
		__m128i xh = _mm_loadu_si128((const __m128i *)(xb + 18));
		__m128i s =
		    _mm_add_epi16(_mm_maddubs_epi16(ones8, xl), _mm_maddubs_epi16(ones8, xh));
		s = _mm_madd_epi16(s, ones);
		s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
		s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
		q[ib].corr = off * _mm_cvtsi128_si32(s);
	}
}

/* One weight block ready for the products: a = values 0-15, b = 16-31;
 * Q4_0 / MXFP4 the unsigned codes, Q8_0 the int8 weights. */
struct qw {
	__m128i a, b;
};

static ALWAYS_INLINE struct qw qw_unpack(uint32_t type, const uint8_t *blk, __m128i tab)
{
	const __m128i m4 = _mm_set1_epi8(0x0f);
	struct qw r;
	switch (type) {
	case KERN_Q8_0:
		r.a = _mm_loadu_si128((const __m128i *)(blk + 2));
		r.b = _mm_loadu_si128((const __m128i *)(blk + 18));
		break;
	case KERN_Q4_0: {
		__m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
		r.a = _mm_and_si128(q, m4);
		r.b = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
		break;
	}
	default: { /* MXFP4 */
		__m128i q = _mm_loadu_si128((const __m128i *)(blk + 1));
		r.a = _mm_shuffle_epi8(tab, _mm_and_si128(q, m4));
		r.b = _mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
		break;
	}
	}
	return r;
}

/* Q4_0 / MXFP4: 8 int16 sums of 4 products of one block (before the offset). */
static ALWAYS_INLINE __m128i qw_prod16(const struct qw *w, __m128i xl, __m128i xh)
{
	return _mm_add_epi16(_mm_maddubs_epi16(w->a, xl), _mm_maddubs_epi16(w->b, xh));
}

/* Q8_0: 4 int32 partial sums of one block. */
static ALWAYS_INLINE __m128i qw_prod32(const struct qw *w, __m128i xl, __m128i xh)
{
	const __m128i ones = _mm_set1_epi16(1);
	__m128i pl = _mm_maddubs_epi16(_mm_abs_epi8(w->a), _mm_sign_epi8(xl, w->a));
	__m128i ph = _mm_maddubs_epi16(_mm_abs_epi8(w->b), _mm_sign_epi8(xh, w->b));
	return _mm_add_epi32(_mm_madd_epi16(pl, ones), _mm_madd_epi16(ph, ones));
}

/* int16 vectors p0, p1 (|lane| <= 12288) -> int32 [s0, s1, s0, s1] whose
 * pairwise sums are sum(p0), sum(p1). */
static ALWAYS_INLINE __m128i pair16(__m128i p0, __m128i p1)
{
	const __m128i ones = _mm_set1_epi16(1);
	return _mm_madd_epi16(_mm_add_epi16(_mm_unpacklo_epi32(p0, p1), _mm_unpackhi_epi32(p0, p1)),
			      ones);
}

/* int32 [a0, a1, a0', a1'] and [b0, b1, b0', b1'] -> [a0 + a0', a1 + a1', ...] */
static ALWAYS_INLINE __m128i quad32(__m128i a, __m128i b)
{
	return _mm_add_epi32(_mm_unpacklo_epi64(a, b), _mm_unpackhi_epi64(a, b));
}

/* [sum(s0), sum(s1), sum(s2), sum(s3)] of four int32 vectors */
static ALWAYS_INLINE __m128i hsum4x4(__m128i s0, __m128i s1, __m128i s2, __m128i s3)
{
	return quad32(_mm_add_epi32(_mm_unpacklo_epi32(s0, s1), _mm_unpackhi_epi32(s0, s1)),
		      _mm_add_epi32(_mm_unpacklo_epi32(s2, s3), _mm_unpackhi_epi32(s2, s3)));
}

static ALWAYS_INLINE uint32_t e8m0_half_bits(uint8_t e)
{
	return e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
}

/* The weight scales of the blocks at p, p + ws, p + 2 ws, p + 3 ws (= p + ws3)
 * and the same from p4, as F32 (MXFP4: E8M0 as kern_e8m0_half(): 2^(e-128),
 * i.e. the bits (e - 1) << 23, except the subnormals of e = 0, 1, taken on a
 * slow path). */
static ALWAYS_INLINE __m256 qw_scales8(uint32_t type, const uint8_t *p, const uint8_t *p4,
				       size_t ws, size_t ws3)
{
	if (type == KERN_MXFP4) {
		const uint64_t e = (uint64_t)p[0] | (uint64_t)p[ws] << 8 |
				   (uint64_t)p[2 * ws] << 16 | (uint64_t)p[ws3] << 24 |
				   (uint64_t)p4[0] << 32 | (uint64_t)p4[ws] << 40 |
				   (uint64_t)p4[2 * ws] << 48 | (uint64_t)p4[ws3] << 56;
		/* a byte of e & ~1 is zero iff that e < 2 */
		const uint64_t ones = 0x0101010101010101u, v = e & ~ones;
		if (__builtin_expect(((v - ones) & ~v & (ones << 7)) != 0, 0)) {
			const __m256i e32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)e));
			const __m256i norm =
			    _mm256_slli_epi32(_mm256_sub_epi32(e32, _mm256_set1_epi32(1)), 23);
			const __m256i sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e32);
			const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e32);
			return _mm256_castsi256_ps(_mm256_blendv_epi8(norm, sub, small));
		}
		/* every byte >= 2: e - 1 byte-wise without borrows */
		const __m256i e32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)(e - ones)));
		return _mm256_castsi256_ps(_mm256_slli_epi32(e32, 23));
	}
	const uint64_t lo = (uint64_t)kern_load_u16(p) | (uint64_t)kern_load_u16(p + ws) << 16 |
			    (uint64_t)kern_load_u16(p + 2 * ws) << 32 |
			    (uint64_t)kern_load_u16(p + ws3) << 48;
	const uint64_t hi = (uint64_t)kern_load_u16(p4) | (uint64_t)kern_load_u16(p4 + ws) << 16 |
			    (uint64_t)kern_load_u16(p4 + 2 * ws) << 32 |
			    (uint64_t)kern_load_u16(p4 + ws3) << 48;
	return _mm256_cvtph_ps(
	    _mm_unpacklo_epi64(_mm_cvtsi64_si128((long long)lo), _mm_cvtsi64_si128((long long)hi)));
}

/* Decode (one activation row), Q4_0 / MXFP4: out[c] = dot(weight row
 * w + c * ws, x) for c < QC.  Each output's block is unpacked and multiplied
 * at once, so only the partial sums stay live; the rows are addressed from
 * two pointers and the stride (few registers). */
static ALWAYS_INLINE void tile_q1(uint32_t type, const uint8_t *w, size_t ws, const uint8_t *x,
				  const struct xq *xq, int64_t nb, size_t pf, float *out)
{
	const size_t bs = q8w_block_bytes(type), ws3 = 3 * ws;
	const int off = q_offset(type);
	const __m128i tab = _mm_loadu_si128((const __m128i *)mxfp4_unsigned);
	const uint8_t *p = w, *p4 = w + 4 * ws; /* rows 0 and 4, at block ib */
	__m256 acc = _mm256_setzero_ps();

#pragma GCC unroll 2
	for (int64_t ib = 0; ib < nb; ib++, p += bs, p4 += bs) {
		/* the next tile's weights, while this one computes: one
		 * prefetch per row and 64-byte line */
		if (pf && !(ib & 1)) {
			_mm_prefetch((const char *)p + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p + ws + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p + 2 * ws + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p + ws3 + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p4 + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p4 + ws + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p4 + 2 * ws + pf, _MM_HINT_T0);
			_mm_prefetch((const char *)p4 + ws3 + pf, _MM_HINT_T0);
		}
		const uint8_t *xb = x + (size_t)ib * 34;
		const __m128i xl = _mm_loadu_si128((const __m128i *)(xb + 2));
		const __m128i xh = _mm_loadu_si128((const __m128i *)(xb + 18));
		/* reduced as soon as formed: few registers live */
		struct qw w0 = qw_unpack(type, p, tab), w1 = qw_unpack(type, p + ws, tab);
		const __m128i u0 = pair16(qw_prod16(&w0, xl, xh), qw_prod16(&w1, xl, xh));
		w0 = qw_unpack(type, p + 2 * ws, tab);
		w1 = qw_unpack(type, p + ws3, tab);
		const __m128i u1 = pair16(qw_prod16(&w0, xl, xh), qw_prod16(&w1, xl, xh));
		w0 = qw_unpack(type, p4, tab);
		w1 = qw_unpack(type, p4 + ws, tab);
		const __m128i u2 = pair16(qw_prod16(&w0, xl, xh), qw_prod16(&w1, xl, xh));
		w0 = qw_unpack(type, p4 + 2 * ws, tab);
		w1 = qw_unpack(type, p4 + ws3, tab);
		const __m128i u3 = pair16(qw_prod16(&w0, xl, xh), qw_prod16(&w1, xl, xh));
		__m256i s = _mm256_set_m128i(quad32(u2, u3), quad32(u0, u1));
		if (off)
			s = _mm256_sub_epi32(s, _mm256_set1_epi32(xq[ib].corr));
		const __m256 d =
		    _mm256_mul_ps(qw_scales8(type, p, p4, ws, ws3), _mm256_set1_ps(xq[ib].d));
		acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc);
	}
	_mm256_storeu_ps(out, acc);
}

/* The weight scales of four blocks as F32. */
static ALWAYS_INLINE __m128 qw_scales4(uint32_t type, const uint8_t *b0, const uint8_t *b1,
				       const uint8_t *b2, const uint8_t *b3)
{
	if (type == KERN_MXFP4) {
		uint64_t lo = e8m0_half_bits(b0[0]) | (uint64_t)e8m0_half_bits(b1[0]) << 32;
		uint64_t hi = e8m0_half_bits(b2[0]) | (uint64_t)e8m0_half_bits(b3[0]) << 32;
		return _mm_castsi128_ps(_mm_unpacklo_epi64(_mm_cvtsi64_si128((long long)lo),
							   _mm_cvtsi64_si128((long long)hi)));
	}
	uint64_t h = kern_load_u16(b0) | (uint64_t)kern_load_u16(b1) << 16 |
		     (uint64_t)kern_load_u16(b2) << 32 | (uint64_t)kern_load_u16(b3) << 48;
	return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
}

/* out[r * QC + c] = dot(weight row w + c * ws, activation row r) for r < nr
 * and c < 4.  Four outputs' unpacked blocks stay in registers across the
 * rows. */
static ALWAYS_INLINE void tile_q4(uint32_t type, int nr, const uint8_t *w, size_t ws,
				  const uint8_t *x, size_t xs, const struct xq *xq, int64_t nb,
				  size_t pf, float *out)
{
	const uint8_t *const wr[4] = {w, w + ws, w + 2 * ws, w + 3 * ws};
	const size_t bs = q8w_block_bytes(type);
	const int off = q_offset(type);
	const __m128i tab = _mm_loadu_si128((const __m128i *)mxfp4_unsigned);
	const __m128i ones = _mm_set1_epi16(1);
	__m128 acc[QR];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		acc[r] = _mm_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * bs;
		struct qw wq[4];
		if (pf) /* the next tile's weights, while this one computes */
#pragma GCC unroll 4
			for (int c = 0; c < 4; c++)
				_mm_prefetch((const char *)wr[c] + o + pf, _MM_HINT_T0);
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++)
			wq[c] = qw_unpack(type, wr[c] + o, tab);
		__m128 dw = qw_scales4(type, wr[0] + o, wr[1] + o, wr[2] + o, wr[3] + o);
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * 34;
			const struct xq *q = xq + r * nb + ib;
			__m128i xl = _mm_loadu_si128((const __m128i *)(xb + 2));
			__m128i xh = _mm_loadu_si128((const __m128i *)(xb + 18));
			__m128i s;
			if (type == KERN_Q8_0) {
				s = hsum4x4(qw_prod32(&wq[0], xl, xh), qw_prod32(&wq[1], xl, xh),
					    qw_prod32(&wq[2], xl, xh), qw_prod32(&wq[3], xl, xh));
			} else {
				/* (measured a little faster with several rows than
				 * pair16) int16 lanes up to 2 * 2 * 24 * 128: one
				 * pairwise add still fits before widening */
				__m128i p[4];
#pragma GCC unroll 4
				for (int c = 0; c < 4; c++)
					p[c] = qw_prod16(&wq[c], xl, xh);
				__m128i m01 = _mm_madd_epi16(_mm_hadd_epi16(p[0], p[1]), ones);
				__m128i m23 = _mm_madd_epi16(_mm_hadd_epi16(p[2], p[3]), ones);
				s = _mm_hadd_epi32(m01, m23);
			}
			if (off)
				s = _mm_sub_epi32(s, _mm_set1_epi32(q->corr));
			__m128 d = _mm_mul_ps(dw, _mm_set1_ps(q->d));
			acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(s), d, acc[r]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		_mm_storeu_ps(out + r * QC, acc[r]);
}

/* Q8_0: out[r * QC + c] for r < nr, c < 4 with llama.cpp's float steps
 * (llamafile's tinyBLAS_Q0_AVX for several rows and ggml_vec_dot_q8_0_q8_0
 * for one compute the same): per block, eight int32 lanes, lane m the sum of
 * the products of values 4m .. 4m + 3; acc_m = fma(d_w * d_x, lane_m, acc_m)
 * (the product of two f16 values is exact); out = hsum8(acc). */
static ALWAYS_INLINE void tile_q8_0(int nr, const uint8_t *w, size_t ws, const uint8_t *x,
				    size_t xs, const struct xq *xq, int64_t nb, size_t pf,
				    float *out)
{
	const __m256i ones = _mm256_set1_epi16(1);
	__m256 acc[QR][4];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++)
			acc[r][c] = _mm256_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * 34;
		__m256i wv[4], aw[4];
		float dw[4];
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++) {
			const uint8_t *b = w + c * ws + o;
			if (pf)
				_mm_prefetch((const char *)b + pf, _MM_HINT_T0);
			wv[c] = _mm256_loadu_si256((const __m256i *)(b + 2));
			aw[c] = _mm256_sign_epi8(wv[c], wv[c]);
			dw[c] = _cvtsh_ss(kern_load_u16(b));
		}
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const __m256i xv =
			    _mm256_loadu_si256((const __m256i *)(x + r * xs + o + 2));
			const float dx = xq[r * nb + ib].d;
#pragma GCC unroll 4
			for (int c = 0; c < 4; c++) {
				const __m256i l = _mm256_madd_epi16(
				    _mm256_maddubs_epi16(aw[c], _mm256_sign_epi8(xv, wv[c])), ones);
				acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[c] * dx),
							    _mm256_cvtepi32_ps(l), acc[r][c]);
			}
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++)
			out[r * QC + c] = hsum8(acc[r][c]);
}

/* Outputs per tile of a quantised type. */
static ALWAYS_INLINE int qtile_width(uint32_t type)
{
	return type == KERN_Q8_0 ? 4 : QC;
}

/* out[r * QC + c] = dot(weight row w + c * ws, activation row r) for r < nr
 * and c < qtile_width(type). */
static ALWAYS_INLINE void tile_q(uint32_t type, int nr, const uint8_t *w, size_t ws,
				 const uint8_t *x, size_t xs, const struct xq *xq, int64_t nb,
				 size_t pf, float *out)
{
	if (type == KERN_Q8_0) {
		tile_q8_0(nr, w, ws, x, xs, xq, nb, pf, out);
		return;
	}
	if (nr == 1) {
		tile_q1(type, w, ws, x, xq, nb, pf, out);
		return;
	}
	tile_q4(type, nr, w, ws, x, xs, xq, nb, pf, out);
	tile_q4(type, nr, w + 4 * ws, ws, x, xs, xq, nb, pf, out + 4);
}

/* Weight rows w + c * ws (ws 0: one row for every output); pf: bytes from a
 * weight block to the block to prefetch (0: none). */
typedef void (*qtile_fn)(const uint8_t *w, size_t ws, const uint8_t *x, size_t xs,
			 const struct xq *xq, int64_t nb, size_t pf, float *out);

#define QTILE_DEF(tname, type, nr)                                                                 \
	static void tname##_##nr(const uint8_t *w, size_t ws, const uint8_t *x, size_t xs,         \
				 const struct xq *xq, int64_t nb, size_t pf, float *out)           \
	{                                                                                          \
		tile_q(type, nr, w, ws, x, xs, xq, nb, pf, out);                                   \
	}
#define QTILE_SET(tname, type)                                                                     \
	QTILE_DEF(tname, type, 1)                                                                  \
	QTILE_DEF(tname, type, 2)                                                                  \
	QTILE_DEF(tname, type, 3)                                                                  \
	QTILE_DEF(tname, type, 4)                                                                  \
	static const qtile_fn tname[QR] = {tname##_1, tname##_2, tname##_3, tname##_4};

QTILE_SET(qtiles_q4_0, KERN_Q4_0)
QTILE_SET(qtiles_q8_0, KERN_Q8_0)
QTILE_SET(qtiles_mxfp4, KERN_MXFP4)

static const qtile_fn *qtiles_for(uint32_t type)
{
	switch (type) {
	case KERN_Q4_0: return qtiles_q4_0;
	case KERN_Q8_0: return qtiles_q8_0;
	case KERN_MXFP4: return qtiles_mxfp4;
	default: return NULL;
	}
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
	__m256 acc[FL_ROWS][4];
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
/* float types (four accumulators per row): up to FL_ROWS rows per weight pass */
#define TILE_SET2(name, kind)                                                                      \
	TILE_DEF(name, kind, 1)                                                                    \
	TILE_DEF(name, kind, 2)                                                                    \
	static const tile_fn name[FL_ROWS] = {name##_1, name##_2};

#define K_F32(...)	 tile_fl(KERN_F32, 0, __VA_ARGS__)
#define K_F16(...)	 tile_fl(KERN_F16, 0, __VA_ARGS__)
#define K_BF16(...)	 tile_fl(KERN_BF16, 0, __VA_ARGS__)
#define K_F16_XEXP(...)	 tile_fl(KERN_F16, 1, __VA_ARGS__)
#define K_BF16_XEXP(...) tile_fl(KERN_BF16, 1, __VA_ARGS__)

TILE_SET2(tiles_f32, K_F32)
TILE_SET2(tiles_f16, K_F16)
TILE_SET2(tiles_bf16, K_BF16)
TILE_SET2(tiles_f16_xexp, K_F16_XEXP)
TILE_SET2(tiles_bf16_xexp, K_BF16_XEXP)

/* The tiles of a float weight type. */
static const tile_fn *tiles_for(uint32_t type)
{
	switch (type) {
	case KERN_F32: return tiles_f32;
	case KERN_F16: return tiles_f16;
	case KERN_BF16: return tiles_bf16;
	default: return NULL;
	}
}

/* Largest activation expansion kern_matmul allocates (bytes). */
#define XEXP_MAX ((size_t)64 << 20)

float kern_dot_avx2(uint32_t weight_type, int64_t n, const void *w, const void *x)
{
	float out[QC] = {0};
	if (n <= 0)
		return 0.0f;
	const qtile_fn *qt = qtiles_for(weight_type);
	if (qt) {
		const int64_t nb = n / KERN_QK;
		struct xq *xq = nb > 0 ? (struct xq *)kern_scratch((size_t)nb * sizeof(*xq)) : NULL;
		if (!xq) /* same result */
			return nb > 0 ? kern_dot_ref(weight_type, n, w, x) : 0.0f;
		xq_row(weight_type, x, nb, xq);
		qt[0](w, 0, x, 0, xq, nb, 0, out);
		return out[0];
	}
	const tile_fn *t = tiles_for(weight_type);
	if (t)
		t[0](w, x, 0, n, out);
	return out[0];
}

/* Quantised weights: outputs in chunks of about 64 KiB of weights (they stay
 * in L2 while every group of QR activation rows passes over them). */
static void matmul_q(const qtile_fn *qt, uint32_t type, const uint8_t *w, int64_t n_in, int64_t o0,
		     int64_t o1, const uint8_t *x, size_t xs, int64_t n_rows, float *y, int64_t ys)
{
	const size_t w_row = kern_row_bytes(type, n_in);
	const int64_t nb = n_in / KERN_QK;
	struct xq *xq =
	    nb > 0 ? (struct xq *)kern_scratch((size_t)(nb * n_rows) * sizeof(*xq)) : NULL;
	if (!xq) { /* no memory for the table, or nothing to sum: same results */
		for (int64_t o = o0; o < o1; o++)
			for (int64_t r = 0; r < n_rows; r++)
				y[r * ys + o] =
				    nb > 0 ? kern_dot_ref(type, n_in, w + (size_t)o * w_row,
							  x + (size_t)r * xs)
					   : 0.0f;
		return;
	}
	for (int64_t r = 0; r < n_rows; r++)
		xq_row(type, x + (size_t)r * xs, nb, xq + r * nb);
	const int qc = qtile_width(type);
	int64_t chunk = (int64_t)(65536 / w_row) / qc * qc;
	if (chunk < qc)
		chunk = qc;
	if (n_rows <= QR)
		chunk = o1 - o0;
	for (int64_t oc = o0; oc < o1; oc += chunk) {
		const int64_t oe = oc + chunk < o1 ? oc + chunk : o1;
		for (int64_t r = 0; r < n_rows; r += QR) {
			const int nr = n_rows - r < QR ? (int)(n_rows - r) : QR;
			const uint8_t *xr = x + (size_t)r * xs;
			const struct xq *qr = xq + r * nb;
			for (int64_t o = oc; o < oe; o += qc) {
				float out[QR * QC];
				const int nc = oe - o < qc ? (int)(oe - o) : qc;
				if (nc < qc && oe < qc) {
					/* fewer than qc rows up to oe: one at a time */
					for (int c = 0; c < nc; c++) {
						qt[nr - 1](w + (size_t)(o + c) * w_row, 0, xr, xs,
							   qr, nb, 0, out);
						for (int i = 0; i < nr; i++)
							y[(r + i) * ys + o + c] = out[i * QC];
					}
					continue;
				}
				/* a short last tile ends at oe: W's rows 0 .. o1 - 1
				 * exist, and the extra outputs are dropped */
				const int64_t ot = nc < qc ? oe - qc : o;
				const int skip = (int)(o - ot);
				/* streaming from memory (first row group): prefetch */
				size_t pf = r == 0 && o + 2 * qc <= oe ? (size_t)qc * w_row : 0;
				qt[nr - 1](w + (size_t)ot * w_row, w_row, xr, xs, qr, nb, pf, out);
				for (int i = 0; i < nr; i++)
					for (int c = 0; c < nc; c++)
						y[(r + i) * ys + o + c] = out[i * QC + skip + c];
			}
		}
	}
}

void kern_matmul_avx2(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	if (n_rows <= 0 || o1 <= o0)
		return;
	const qtile_fn *qt = qtiles_for(weight_type);
	if (qt) {
		matmul_q(qt, weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride);
		return;
	}
	const tile_fn *t = tiles_for(weight_type);
	const int max_rows = FL_ROWS;
	if (!t)
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
			xexp = kern_scratch(bytes);
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
			float out[FL_ROWS] = {0};
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
#define KERN_RND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
		__m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), KERN_RND));
		__m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), KERN_RND));
		__m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), KERN_RND));
		__m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), KERN_RND));
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

/* ------------------------------------------------------------- swiglu */

/* kern_swiglu_ref's vector part, 8 values at a time with the same operations
 * (FMA as fmaf; the power of two built in the exponent bits when
 * -126 <= n <= 127, else those lanes redone by the scalar reference). */
void kern_swiglu_avx2(float *g, const float *u, int64_t j0, int64_t j1, int64_t n)
{
	const int64_t nv = n - n % 16;
	int64_t j = j0;
	const __m256 r = _mm256_set1_ps(0x1.8p23f), one = _mm256_set1_ps(1.0f);
	for (; j + 8 <= j1 && j + 8 <= nv; j += 8) {
		const __m256 xin = _mm256_loadu_ps(g + j);
		const __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), xin);
		const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
		const __m256 nn = _mm256_sub_ps(z, r);
		const __m256 b =
		    _mm256_fnmadd_ps(nn, _mm256_set1_ps(0x1.7f7d1cp-20f),
				     _mm256_fnmadd_ps(nn, _mm256_set1_ps(0x1.62e4p-1f), x));
		const __m256 uu = _mm256_mul_ps(b, b);
		const __m256 jj = _mm256_fmadd_ps(
		    _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b,
						    _mm256_set1_ps(0x1.573e2ep-5f)),
				    uu,
				    _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b,
						    _mm256_set1_ps(0x1.fffdb6p-2f))),
		    uu, _mm256_fmadd_ps(_mm256_set1_ps(0x1.ffffecp-1f), b, one));
		const __m256 inrange =
		    _mm256_and_ps(_mm256_cmp_ps(nn, _mm256_set1_ps(-126.0f), _CMP_GE_OQ),
				  _mm256_cmp_ps(nn, _mm256_set1_ps(127.0f), _CMP_LE_OQ));
		if (_mm256_movemask_ps(inrange) != 0xff) {
			kern_swiglu_ref(g, u, j, j + 8, n);
			continue;
		}
		const __m256i e = _mm256_slli_epi32(
		    _mm256_add_epi32(_mm256_cvtps_epi32(nn), _mm256_set1_epi32(127)), 23);
		const __m256 ex = _mm256_mul_ps(jj, _mm256_castsi256_ps(e));
		const __m256 y = _mm256_mul_ps(_mm256_div_ps(xin, _mm256_add_ps(one, ex)),
					       _mm256_loadu_ps(u + j));
		_mm256_storeu_ps(g + j, y);
	}
	if (j < j1)
		kern_swiglu_ref(g, u, j, j1, n);
}

/* ---------------------------------------------------------------- F32 */

/* kern_f32_dot_vec_ref: ggml_vec_dot_f32's AVX-512 form, each 16-lane
 * accumulator held as two 8-lane halves (the same lane operations). */
float kern_f32_dot_vec_avx2(int64_t n, const void *w, const void *x)
{
	const float *a = w, *b = x;
	const int64_t np = n & ~(int64_t)63;
	__m256 s[8];
	for (int j = 0; j < 8; j++)
		s[j] = _mm256_setzero_ps();
	for (int64_t i = 0; i < np; i += 64)
		for (int j = 0; j < 8; j++)
			s[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j),
					       _mm256_loadu_ps(b + i + 8 * j), s[j]);
	/* groups g = s[2g] (lanes 0-7), s[2g + 1] (lanes 8-15): g0 + g2, g1 + g3,
	 * then g0 + g1 */
	for (int h = 0; h < 2; h++) {
		s[h] = _mm256_add_ps(s[h], s[4 + h]);
		s[2 + h] = _mm256_add_ps(s[2 + h], s[6 + h]);
		s[h] = _mm256_add_ps(s[h], s[2 + h]);
	}
	float sum = hsum8(_mm256_add_ps(s[1], s[0]));
	const int64_t unfused = (n - np) / 8 * 8;
	for (int64_t k = np; k < n; k++) {
		float u, v;
		memcpy(&u, a + k, 4);
		memcpy(&v, b + k, 4);
		sum = k < np + unfused ? sum + u * v : __builtin_fmaf(u, v, sum);
	}
	return sum;
}

/* kern_f32_dot_gemm_ref: llamafile's tinyBLAS F32 GEMM (AVX-512): 16 lanes. */
float kern_f32_dot_gemm_avx2(int64_t n, const void *w, const void *x)
{
	const float *a = w, *b = x;
	__m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
	int64_t k = 0;
	for (; k + 16 <= n; k += 16) {
		lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), lo);
		hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), hi);
	}
	if (k < n) {
		float l[16];
		_mm256_storeu_ps(l, lo);
		_mm256_storeu_ps(l + 8, hi);
		for (; k < n; k++) {
			float u, v;
			memcpy(&u, a + k, 4);
			memcpy(&v, b + k, 4);
			l[k % 16] = __builtin_fmaf(u, v, l[k % 16]);
		}
		lo = _mm256_loadu_ps(l);
		hi = _mm256_loadu_ps(l + 8);
	}
	return hsum8(_mm256_add_ps(hi, lo));
}

/* kern_f16_dot_vec_ref with 8-lane halves of its 16-lane accumulators. */
float kern_f16_dot_vec_avx2(int64_t n, const void *w, const void *x)
{
	const uint16_t *a = w, *b = x;
	const int64_t np = n & ~(int64_t)63;
	__m256 s[8];
	for (int j = 0; j < 8; j++)
		s[j] = _mm256_setzero_ps();
	for (int64_t i = 0; i < np; i += 64)
		for (int j = 0; j < 8; j++)
			s[j] = _mm256_fmadd_ps(
			    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i + 8 * j))),
			    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8 * j))),
			    s[j]);
	for (int h = 0; h < 2; h++) {
		s[h] = _mm256_add_ps(s[h], s[4 + h]);
		s[2 + h] = _mm256_add_ps(s[2 + h], s[6 + h]);
		s[h] = _mm256_add_ps(s[h], s[2 + h]);
	}
	double sum = (double)hsum8(_mm256_add_ps(s[1], s[0]));
	for (int64_t k = np; k < n; k++) {
		uint16_t u, v;
		memcpy(&u, a + k, 2);
		memcpy(&v, b + k, 2);
		sum += (double)(_cvtsh_ss(u) * _cvtsh_ss(v));
	}
	return (float)sum;
}

/* kern_f16_dot_gemm_ref: 16 lanes as two 8-lane halves. */
float kern_f16_dot_gemm_avx2(int64_t n, const void *w, const void *x)
{
	const uint16_t *a = w, *b = x;
	__m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
	int64_t k = 0;
	for (; k + 16 <= n; k += 16) {
		lo =
		    _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + k))),
				    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + k))), lo);
		hi = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + k + 8))),
				     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + k + 8))),
				     hi);
	}
	if (k < n) {
		float l[16];
		_mm256_storeu_ps(l, lo);
		_mm256_storeu_ps(l + 8, hi);
		for (; k < n; k++) {
			uint16_t u, v;
			memcpy(&u, a + k, 2);
			memcpy(&v, b + k, 2);
			l[k % 16] = __builtin_fmaf(_cvtsh_ss(u), _cvtsh_ss(v), l[k % 16]);
		}
		lo = _mm256_loadu_ps(l);
		hi = _mm256_loadu_ps(l + 8);
	}
	return hsum8(_mm256_add_ps(hi, lo));
}
