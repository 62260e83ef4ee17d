/* kern_legacy_avx2: AVX2 kernels of the 32-value block types Q4_1, Q5_0,
 * Q5_1 and IQ4_NL (layouts and the dot-product contract in
 * kern_legacy_ref.c), and the Q8_1 quantiser.  Compiled with -mavx2 -mfma
 * -mf16c; called only through kern.c's dispatch after kern_init().
 *
 * Every result equals the scalar reference bit for bit (Q4_1, Q5_0, Q5_1:
 * llama.cpp's eight FMA lanes per block, tile_lanes; IQ4_NL: per block an
 * exact int32 sum, then the reference's fused accumulation), so kern_dot,
 * kern_matmul (whatever its tiling) and kern_dot_ref agree.
 *
 * Integer products (per 16 values, on 128-bit halves of a block as
 * kern_avx2.c does):
 *   Q4_1, Q5_1, Q5_0: the unsigned codes (0..15 or 0..31) go straight into
 *     maddubs against the int8 activations; Q5_0's offset 16 is taken off the
 *     int32 sum as 16 x the block's activation sum, precomputed per row and
 *     block (struct lxq).  A maddubs pair is at most 2 * 31 * 128 = 7936 in
 *     magnitude, so int16 sums of up to 8 products (31744) do not overflow.
 *   IQ4_NL: the table values (-127..113) come from one pshufb; the sign goes
 *     onto the weights, maddubs(|x|, sign(w, x)), which stays exact for
 *     x = -128 (|x| = 128 as unsigned; -w never overflows since w > -128).
 *     Pair sums reach 32512, so they are widened before any adding.
 *
 * Tiles: one activation row (decode) runs 8 outputs at once whose int32
 * block sums end in one 8-lane vector (the scales and accumulation then run
 * 8 wide); several rows run 4 outputs x up to 4 rows, the unpacked weight
 * blocks staying in registers across the rows.  kern_dot has its own
 * single-output loop. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define LC  8 /* outputs per tile */
#define LR  4 /* activation rows per tile, at most */
#define RND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* ------------------------------------------------------- block layouts */

static ALWAYS_INLINE size_t w_bytes(uint32_t t)
{
	return t == KERN_Q4_1 ? 20 : t == KERN_Q5_0 ? 22 : t == KERN_Q5_1 ? 24 : 18;
}

static ALWAYS_INLINE size_t qs_off(uint32_t t)
{
	return t == KERN_Q4_1 ? 4 : t == KERN_Q5_0 ? 6 : t == KERN_Q5_1 ? 8 : 2;
}

static ALWAYS_INLINE size_t qh_off(uint32_t t)
{
	return t == KERN_Q5_0 ? 2 : 4;
}

/* 1 for the types with a minimum m (and Q8_1 activations) */
static ALWAYS_INLINE int has_m(uint32_t t)
{
	return t == KERN_Q4_1 || t == KERN_Q5_1;
}

static ALWAYS_INLINE int is_q5(uint32_t t)
{
	return t == KERN_Q5_0 || t == KERN_Q5_1;
}

/* activation block bytes and offset of its int8 values */
static ALWAYS_INLINE size_t x_bytes(uint32_t t)
{
	return has_m(t) ? sizeof(struct kern_block_q8_1) : sizeof(struct kern_block_q8_0);
}

static ALWAYS_INLINE size_t xqs_off(uint32_t t)
{
	return has_m(t) ? 4 : 2;
}

/* --------------------------------------------------- unpack and products */

/* One weight block's codes: a = values 0-15, b = 16-31; unsigned codes
 * for Q4_1 / Q5_0 / Q5_1 (Q5_0 before its offset), int8 table values for
 * IQ4_NL. */
struct lw {
	__m128i a, b;
};

static ALWAYS_INLINE struct lw lw_unpack(uint32_t type, const uint8_t *blk, __m128i tab)
{
	const __m128i m4 = _mm_set1_epi8(0x0f);
	const __m128i q = _mm_loadu_si128((const __m128i *)(blk + qs_off(type)));
	struct lw r;
	r.a = _mm_and_si128(q, m4);
	r.b = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
	if (type == KERN_IQ4_NL) {
		r.a = _mm_shuffle_epi8(tab, r.a);
		r.b = _mm_shuffle_epi8(tab, r.b);
	} else if (is_q5(type)) {
		/* byte j of a takes bit j of qh (bytes 0-1), of b bit 16 + j
		 * (bytes 2-3): spread the byte, test its bit, keep 0x10 */
		const __m128i sel_a = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
		const __m128i sel_b = _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
		const __m128i bit = _mm_set1_epi64x((long long)0x8040201008040201ull);
		const __m128i b4 = _mm_set1_epi8(0x10);
		uint32_t qh;
		memcpy(&qh, blk + qh_off(type), sizeof(qh));
		const __m128i h = _mm_cvtsi32_si128((int)qh);
		__m128i ha = _mm_and_si128(_mm_shuffle_epi8(h, sel_a), bit);
		__m128i hb = _mm_and_si128(_mm_shuffle_epi8(h, sel_b), bit);
		ha = _mm_and_si128(_mm_cmpeq_epi8(ha, bit), b4);
		hb = _mm_and_si128(_mm_cmpeq_epi8(hb, bit), b4);
		r.a = _mm_or_si128(r.a, ha);
		r.b = _mm_or_si128(r.b, hb);
	}
	return r;
}

/* Q4_1 / Q5_0 / Q5_1: 8 int16 sums of 4 products each (|lane| <= 15872). */
static ALWAYS_INLINE __m128i lw_prod16(const struct lw *w, __m128i xl, __m128i xh)
{
	return _mm_add_epi16(_mm_maddubs_epi16(w->a, xl), _mm_maddubs_epi16(w->b, xh));
}

/* IQ4_NL: 4 int32 partial sums; axl, axh = |xl|, |xh|. */
static ALWAYS_INLINE __m128i lw_prod32(const struct lw *w, __m128i xl, __m128i xh, __m128i axl,
				       __m128i axh)
{
	const __m128i ones = _mm_set1_epi16(1);
	const __m128i pl = _mm_maddubs_epi16(axl, _mm_sign_epi8(w->a, xl));
	const __m128i ph = _mm_maddubs_epi16(axh, _mm_sign_epi8(w->b, xh));
	return _mm_add_epi32(_mm_madd_epi16(pl, ones), _mm_madd_epi16(ph, ones));
}

/* int16 vectors p0, p1 (|lane| <= 15872) -> int32 [s0, s1, s0, s1] whose
 * pairwise sums are sum(p0), sum(p1). */
static ALWAYS_INLINE __m128i pair16(__m128i p0, __m128i p1)
{
	return _mm_madd_epi16(_mm_add_epi16(_mm_unpacklo_epi32(p0, p1), _mm_unpackhi_epi32(p0, p1)),
			      _mm_set1_epi16(1));
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

static ALWAYS_INLINE int32_t hsum_i32(__m128i s)
{
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
	return _mm_cvtsi128_si32(s);
}

/* The int32 sum sum_j c_j * x_j of one weight block with one activation
 * block (c as in kern_legacy_ref.c: Q5_0 after its offset). */
static ALWAYS_INLINE int32_t block_sumi(uint32_t type, const uint8_t *wb, const uint8_t *xb,
					__m128i tab)
{
	const __m128i xl = _mm_loadu_si128((const __m128i *)(xb + xqs_off(type)));
	const __m128i xh = _mm_loadu_si128((const __m128i *)(xb + xqs_off(type) + 16));
	const struct lw w = lw_unpack(type, wb, tab);
	if (type == KERN_IQ4_NL)
		return hsum_i32(lw_prod32(&w, xl, xh, _mm_abs_epi8(xl), _mm_abs_epi8(xh)));
	__m128i s = _mm_madd_epi16(lw_prod16(&w, xl, xh), _mm_set1_epi16(1));
	if (type == KERN_Q5_0) {
		const __m128i ones8 = _mm_set1_epi8(1);
		__m128i sx =
		    _mm_add_epi16(_mm_maddubs_epi16(ones8, xl), _mm_maddubs_epi16(ones8, xh));
		s = _mm_sub_epi32(s, _mm_slli_epi32(_mm_madd_epi16(sx, _mm_set1_epi16(1)), 4));
	}
	return hsum_i32(s);
}

/* ------------------------------------------------------------ the dot */

/* ggml's hsum_float_8: high half + low half, then lanes 0+2, 1+3, then 0+1 */
static ALWAYS_INLINE float hsum8(__m256 v)
{
	__m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
	r = _mm_add_ps(r, _mm_movehl_ps(r, r));
	r = _mm_add_ss(r, _mm_movehdup_ps(r));
	return _mm_cvtss_f32(r);
}

/* Q4_1, Q5_0, Q5_1, one output: llama.cpp's lanes (see tile_lanes). */
static ALWAYS_INLINE float dot_lanes_1(uint32_t type, int64_t nb, const uint8_t *w,
				       const uint8_t *x)
{
	const size_t bs = w_bytes(type), xbs = x_bytes(type);
	const __m256i ones = _mm256_set1_epi16(1);
	__m256 acc = _mm256_setzero_ps();
	float summs = 0.0f;
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *wb = w + (size_t)ib * bs, *xb = x + (size_t)ib * xbs;
		const struct lw q = lw_unpack(type, wb, _mm_setzero_si128());
		__m256i u = _mm256_set_m128i(q.b, q.a);
		__m256i xv = _mm256_loadu_si256((const __m256i *)(xb + xqs_off(type)));
		if (type == KERN_Q5_0) {
			u = _mm256_sub_epi8(u, _mm256_set1_epi8(16));
			xv = _mm256_sign_epi8(xv, u);
			u = _mm256_sign_epi8(u, u);
		}
		const __m256i l = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones);
		const float d = _cvtsh_ss(kern_load_u16(wb)) * _cvtsh_ss(kern_load_u16(xb));
		acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(l), acc);
		if (has_m(type))
			summs = fmaf(_cvtsh_ss(kern_load_u16(wb + 2)),
				     _cvtsh_ss(kern_load_u16(xb + 2)), summs);
	}
	const float hs = hsum8(acc);
	return has_m(type) ? hs + summs : hs;
}

static ALWAYS_INLINE float dot_1(uint32_t type, int64_t nb, const uint8_t *w, const uint8_t *x)
{
	if (type != KERN_IQ4_NL)
		return dot_lanes_1(type, nb, w, x);
	const __m128i tab = _mm_loadu_si128((const __m128i *)kern_legacy_iq4nl_values);
	const size_t bs = w_bytes(type), xbs = x_bytes(type);
	float acc = 0.0f;
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *wb = w + (size_t)ib * bs, *xb = x + (size_t)ib * xbs;
		const int32_t sumi = block_sumi(type, wb, xb, tab);
		const float dw = _cvtsh_ss(kern_load_u16(wb)), dx = _cvtsh_ss(kern_load_u16(xb));
		acc = fmaf((float)sumi, dw * dx, acc);
		if (has_m(type))
			acc += _cvtsh_ss(kern_load_u16(wb + 2)) * _cvtsh_ss(kern_load_u16(xb + 2));
	}
	return acc;
}

static float dot_q4_1(int64_t nb, const uint8_t *w, const uint8_t *x)
{
	return dot_1(KERN_Q4_1, nb, w, x);
}

static float dot_q5_0(int64_t nb, const uint8_t *w, const uint8_t *x)
{
	return dot_1(KERN_Q5_0, nb, w, x);
}

static float dot_q5_1(int64_t nb, const uint8_t *w, const uint8_t *x)
{
	return dot_1(KERN_Q5_1, nb, w, x);
}

static float dot_iq4_nl(int64_t nb, const uint8_t *w, const uint8_t *x)
{
	return dot_1(KERN_IQ4_NL, nb, w, x);
}

typedef float (*ldot_fn)(int64_t nb, const uint8_t *w, const uint8_t *x);

static ldot_fn dot_for(uint32_t type)
{
	switch (type) {
	case KERN_Q4_1: return dot_q4_1;
	case KERN_Q5_0: return dot_q5_0;
	case KERN_Q5_1: return dot_q5_1;
	case KERN_IQ4_NL: return dot_iq4_nl;
	default: return NULL;
	}
}

float kern_legacy_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x)
{
	const ldot_fn f = dot_for(type);
	return f ? f(n / KERN_QK, w, x) : 0.0f;
}

/* --------------------------------------------------------------- tiles */

/* Per activation row and block: its scale d, Q8_1's s as F32, and Q5_0's
 * offset correction 16 x sum(x). */
struct lxq {
	float d, s;
	int32_t corr;
};

static void lxq_row(uint32_t type, const uint8_t *x, int64_t nb, struct lxq *q)
{
	const __m128i ones8 = _mm_set1_epi8(1), ones = _mm_set1_epi16(1);
	const size_t xbs = x_bytes(type);
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *xb = x + (size_t)ib * xbs;
		q[ib].d = _cvtsh_ss(kern_load_u16(xb));
		q[ib].s = has_m(type) ? _cvtsh_ss(kern_load_u16(xb + 2)) : 0.0f;
		q[ib].corr = 0;
		if (type == KERN_Q5_0) {
			__m128i xl = _mm_loadu_si128((const __m128i *)(xb + 2));
			__m128i xh = _mm_loadu_si128((const __m128i *)(xb + 18));
			__m128i s = _mm_add_epi16(_mm_maddubs_epi16(ones8, xl),
						  _mm_maddubs_epi16(ones8, xh));
			q[ib].corr = 16 * hsum_i32(_mm_madd_epi16(s, ones));
		}
	}
}

/* The f16 at p, p + ws, p + 2 ws, p + 3 ws (= p + ws3) and the same from p4
 * as 8 F32. */
static ALWAYS_INLINE __m256 f16x8(const uint8_t *p, const uint8_t *p4, size_t ws, size_t ws3)
{
	const uint64_t lo = (uint64_t)kern_load_u16(p) | (uint64_t)kern_load_u16(p + ws) << 16 |
			    (uint64_t)kern_load_u16(p + 2 * ws) << 32 |
			    (uint64_t)kern_load_u16(p + ws3) << 48;
	const uint64_t hi = (uint64_t)kern_load_u16(p4) | (uint64_t)kern_load_u16(p4 + ws) << 16 |
			    (uint64_t)kern_load_u16(p4 + 2 * ws) << 32 |
			    (uint64_t)kern_load_u16(p4 + ws3) << 48;
	return _mm256_cvtph_ps(
	    _mm_unpacklo_epi64(_mm_cvtsi64_si128((long long)lo), _mm_cvtsi64_si128((long long)hi)));
}

/* The f16 at p, p + ws, p + 2 ws, p + 3 ws as 4 F32. */
static ALWAYS_INLINE __m128 f16x4(const uint8_t *p, size_t ws)
{
	const uint64_t h = (uint64_t)kern_load_u16(p) | (uint64_t)kern_load_u16(p + ws) << 16 |
			   (uint64_t)kern_load_u16(p + 2 * ws) << 32 |
			   (uint64_t)kern_load_u16(p + 3 * ws) << 48;
	return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
}

/* Decode: out[c] = dot(weight row w + c * ws, x) for c < LC.  Each output's
 * block is unpacked and multiplied at once (few registers live); pf: bytes
 * from a weight block to the one to prefetch (0: none). */
static ALWAYS_INLINE void tile_1(uint32_t type, const uint8_t *w, size_t ws, const uint8_t *x,
				 const struct lxq *xq, int64_t nb, size_t pf, float *out)
{
	const size_t bs = w_bytes(type), xbs = x_bytes(type), ws3 = 3 * ws;
	const __m128i tab = _mm_loadu_si128((const __m128i *)kern_legacy_iq4nl_values);
	const uint8_t *p = w, *p4 = w + 4 * ws; /* rows 0 and 4, at block ib */
	__m256 acc = _mm256_setzero_ps();

#pragma GCC unroll 2
	for (int64_t ib = 0; ib < nb; ib++, p += bs, p4 += bs) {
		/* one prefetch per row and 64-byte line (2 blocks <= 48 bytes) */
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
		const uint8_t *xb = x + (size_t)ib * xbs + xqs_off(type);
		const __m128i xl = _mm_loadu_si128((const __m128i *)xb);
		const __m128i xh = _mm_loadu_si128((const __m128i *)(xb + 16));
		__m256i s;
		if (type == KERN_IQ4_NL) {
			const __m128i axl = _mm_abs_epi8(xl), axh = _mm_abs_epi8(xh);
			struct lw w0 = lw_unpack(type, p, tab), w1 = lw_unpack(type, p + ws, tab);
			struct lw w2 = lw_unpack(type, p + 2 * ws, tab);
			struct lw w3 = lw_unpack(type, p + ws3, tab);
			const __m128i s0 = hsum4x4(
			    lw_prod32(&w0, xl, xh, axl, axh), lw_prod32(&w1, xl, xh, axl, axh),
			    lw_prod32(&w2, xl, xh, axl, axh), lw_prod32(&w3, xl, xh, axl, axh));
			w0 = lw_unpack(type, p4, tab);
			w1 = lw_unpack(type, p4 + ws, tab);
			w2 = lw_unpack(type, p4 + 2 * ws, tab);
			w3 = lw_unpack(type, p4 + ws3, tab);
			const __m128i s1 = hsum4x4(
			    lw_prod32(&w0, xl, xh, axl, axh), lw_prod32(&w1, xl, xh, axl, axh),
			    lw_prod32(&w2, xl, xh, axl, axh), lw_prod32(&w3, xl, xh, axl, axh));
			s = _mm256_set_m128i(s1, s0);
		} else {
			struct lw w0 = lw_unpack(type, p, tab), w1 = lw_unpack(type, p + ws, tab);
			const __m128i u0 = pair16(lw_prod16(&w0, xl, xh), lw_prod16(&w1, xl, xh));
			w0 = lw_unpack(type, p + 2 * ws, tab);
			w1 = lw_unpack(type, p + ws3, tab);
			const __m128i u1 = pair16(lw_prod16(&w0, xl, xh), lw_prod16(&w1, xl, xh));
			w0 = lw_unpack(type, p4, tab);
			w1 = lw_unpack(type, p4 + ws, tab);
			const __m128i u2 = pair16(lw_prod16(&w0, xl, xh), lw_prod16(&w1, xl, xh));
			w0 = lw_unpack(type, p4 + 2 * ws, tab);
			w1 = lw_unpack(type, p4 + ws3, tab);
			const __m128i u3 = pair16(lw_prod16(&w0, xl, xh), lw_prod16(&w1, xl, xh));
			s = _mm256_set_m128i(quad32(u2, u3), quad32(u0, u1));
			if (type == KERN_Q5_0)
				s = _mm256_sub_epi32(s, _mm256_set1_epi32(xq[ib].corr));
		}
		const __m256 d = _mm256_mul_ps(f16x8(p, p4, ws, ws3), _mm256_set1_ps(xq[ib].d));
		acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc);
		if (has_m(type))
			acc = _mm256_add_ps(acc, _mm256_mul_ps(f16x8(p + 2, p4 + 2, ws, ws3),
							       _mm256_set1_ps(xq[ib].s)));
	}
	_mm256_storeu_ps(out, acc);
}

/* out[r * LC + c] = dot(weight row w + c * ws, activation row r) for r < nr
 * and c < 4: four outputs' unpacked blocks stay in registers across the
 * rows. */
static ALWAYS_INLINE void tile_4(uint32_t type, int nr, const uint8_t *w, size_t ws,
				 const uint8_t *x, size_t xs, const struct lxq *xq, int64_t nb,
				 size_t pf, float *out)
{
	const uint8_t *const wr[4] = {w, w + ws, w + 2 * ws, w + 3 * ws};
	const size_t bs = w_bytes(type), xbs = x_bytes(type);
	const __m128i tab = _mm_loadu_si128((const __m128i *)kern_legacy_iq4nl_values);
	const __m128i ones = _mm_set1_epi16(1);
	__m128 acc[LR];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		acc[r] = _mm_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * bs;
		struct lw wq[4];
		if (pf)
#pragma GCC unroll 4
			for (int c = 0; c < 4; c++)
				_mm_prefetch((const char *)wr[c] + o + pf, _MM_HINT_T0);
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++)
			wq[c] = lw_unpack(type, wr[c] + o, tab);
		const __m128 dw = f16x4(wr[0] + o, ws);
		const __m128 mw = has_m(type) ? f16x4(wr[0] + o + 2, ws) : _mm_setzero_ps();
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * xbs + xqs_off(type);
			const struct lxq *q = xq + r * nb + ib;
			const __m128i xl = _mm_loadu_si128((const __m128i *)xb);
			const __m128i xh = _mm_loadu_si128((const __m128i *)(xb + 16));
			__m128i s;
			if (type == KERN_IQ4_NL) {
				const __m128i axl = _mm_abs_epi8(xl), axh = _mm_abs_epi8(xh);
				s = hsum4x4(lw_prod32(&wq[0], xl, xh, axl, axh),
					    lw_prod32(&wq[1], xl, xh, axl, axh),
					    lw_prod32(&wq[2], xl, xh, axl, axh),
					    lw_prod32(&wq[3], xl, xh, axl, axh));
			} else {
				/* adjacent int16 lanes of one output: at most 31744 */
				__m128i p[4];
#pragma GCC unroll 4
				for (int c = 0; c < 4; c++)
					p[c] = lw_prod16(&wq[c], xl, xh);
				const __m128i m01 =
				    _mm_madd_epi16(_mm_hadd_epi16(p[0], p[1]), ones);
				const __m128i m23 =
				    _mm_madd_epi16(_mm_hadd_epi16(p[2], p[3]), ones);
				s = _mm_hadd_epi32(m01, m23);
				if (type == KERN_Q5_0)
					s = _mm_sub_epi32(s, _mm_set1_epi32(q->corr));
			}
			const __m128 d = _mm_mul_ps(dw, _mm_set1_ps(q->d));
			acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(s), d, acc[r]);
			if (has_m(type))
				acc[r] = _mm_add_ps(acc[r], _mm_mul_ps(mw, _mm_set1_ps(q->s)));
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		_mm_storeu_ps(out + r * LC, acc[r]);
}

/* Q4_1, Q5_0, Q5_1: out[r * LC + c] for r < nr, c < 4 with llama.cpp's
 * float steps (kern_legacy_ref.c, dot_lanes): per block the eight int32 lanes
 * of four products (Q5_0 with its offset: maddubs(|c|, sign(x, c)) as ggml),
 * acc = fma(d_w * d_x, lane, acc) per lane, Q4_1 / Q5_1 summs = fma(m_w,
 * s_x, summs); out = hsum8(acc) (+ summs). */
static ALWAYS_INLINE void tile_lanes(uint32_t type, int nr, const uint8_t *w, size_t ws,
				     const uint8_t *x, size_t xs, const struct lxq *xq, int64_t nb,
				     size_t pf, float *out)
{
	const size_t bs = w_bytes(type), xbs = x_bytes(type);
	const __m128i tab = _mm_setzero_si128();
	const __m256i ones = _mm256_set1_epi16(1);
	const int hm = has_m(type);
	__m256 acc[LR][4];
	float summs[LR][4];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++) {
			acc[r][c] = _mm256_setzero_ps();
			summs[r][c] = 0.0f;
		}
	for (int64_t ib = 0; ib < nb; ib++) {
		__m256i u[4], au[4];
		float dw[4], mw[4];
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++) {
			const uint8_t *b = w + c * ws + (size_t)ib * bs;
			if (pf)
				_mm_prefetch((const char *)b + pf, _MM_HINT_T0);
			const struct lw q = lw_unpack(type, b, tab);
			u[c] = _mm256_set_m128i(q.b, q.a);
			if (type == KERN_Q5_0)
				u[c] = _mm256_sub_epi8(u[c], _mm256_set1_epi8(16));
			au[c] = type == KERN_Q5_0 ? _mm256_sign_epi8(u[c], u[c]) : u[c];
			dw[c] = _cvtsh_ss(kern_load_u16(b));
			mw[c] = hm ? _cvtsh_ss(kern_load_u16(b + 2)) : 0.0f;
		}
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const uint8_t *xb = x + r * xs + (size_t)ib * xbs;
			const __m256i xv =
			    _mm256_loadu_si256((const __m256i *)(xb + xqs_off(type)));
			const struct lxq *q = xq + r * nb + ib;
#pragma GCC unroll 4
			for (int c = 0; c < 4; c++) {
				const __m256i sx =
				    type == KERN_Q5_0 ? _mm256_sign_epi8(xv, u[c]) : xv;
				const __m256i l =
				    _mm256_madd_epi16(_mm256_maddubs_epi16(au[c], sx), ones);
				acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[c] * q->d),
							    _mm256_cvtepi32_ps(l), acc[r][c]);
				if (hm)
					summs[r][c] = fmaf(mw[c], q->s, summs[r][c]);
			}
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++) {
			const float h = hsum8(acc[r][c]);
			out[r * LC + c] = hm ? h + summs[r][c] : h;
		}
}

/* out[r * LC + c] = dot(weight row w + c * ws, activation row r) for r < nr,
 * c < LC. */
static ALWAYS_INLINE void tile(uint32_t type, int nr, const uint8_t *w, size_t ws, const uint8_t *x,
			       size_t xs, const struct lxq *xq, int64_t nb, size_t pf, float *out)
{
	if (type != KERN_IQ4_NL) {
		tile_lanes(type, nr, w, ws, x, xs, xq, nb, pf, out);
		tile_lanes(type, nr, w + 4 * ws, ws, x, xs, xq, nb, pf, out + 4);
		return;
	}
	if (nr == 1) {
		tile_1(type, w, ws, x, xq, nb, pf, out);
		return;
	}
	tile_4(type, nr, w, ws, x, xs, xq, nb, pf, out);
	tile_4(type, nr, w + 4 * ws, ws, x, xs, xq, nb, pf, out + 4);
}

typedef void (*ltile_fn)(const uint8_t *w, size_t ws, const uint8_t *x, size_t xs,
			 const struct lxq *xq, int64_t nb, size_t pf, float *out);

#define LTILE_DEF(tname, type, nr)                                                                 \
	static void tname##_##nr(const uint8_t *w, size_t ws, const uint8_t *x, size_t xs,         \
				 const struct lxq *xq, int64_t nb, size_t pf, float *out)          \
	{                                                                                          \
		tile(type, nr, w, ws, x, xs, xq, nb, pf, out);                                     \
	}
#define LTILE_SET(tname, type)                                                                     \
	LTILE_DEF(tname, type, 1)                                                                  \
	LTILE_DEF(tname, type, 2)                                                                  \
	LTILE_DEF(tname, type, 3)                                                                  \
	LTILE_DEF(tname, type, 4)                                                                  \
	static const ltile_fn tname[LR] = {tname##_1, tname##_2, tname##_3, tname##_4};

LTILE_SET(tiles_q4_1, KERN_Q4_1)
LTILE_SET(tiles_q5_0, KERN_Q5_0)
LTILE_SET(tiles_q5_1, KERN_Q5_1)
LTILE_SET(tiles_iq4_nl, KERN_IQ4_NL)

static const ltile_fn *tiles_for(uint32_t type)
{
	switch (type) {
	case KERN_Q4_1: return tiles_q4_1;
	case KERN_Q5_0: return tiles_q5_0;
	case KERN_Q5_1: return tiles_q5_1;
	case KERN_IQ4_NL: return tiles_iq4_nl;
	default: return NULL;
	}
}

/* Outputs in chunks of about 64 KiB of weights (they stay in L2 while every
 * group of LR activation rows passes over them); a short last tile is moved
 * back to end at the chunk's end (W's rows below o0 exist), and matrices of
 * fewer than LC rows go one output at a time. */
void kern_legacy_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			     const void *x, size_t x_stride, int64_t n_rows, float *y,
			     int64_t y_stride)
{
	const ltile_fn *lt = tiles_for(type);
	const ldot_fn dot = dot_for(type);
	const uint8_t *wb = w, *xb = x;
	const int64_t nb = n_in / KERN_QK;
	const size_t w_row = kern_row_bytes(type, n_in);
	struct lxq *xq = NULL;

	if (n_rows <= 0 || o1 <= o0 || !lt)
		return;
	if (nb > 0)
		xq = malloc((size_t)(nb * n_rows) * sizeof(*xq));
	if (!xq) { /* no memory for the table, or nothing to sum: same results */
		for (int64_t o = o0; o < o1; o++)
			for (int64_t r = 0; r < n_rows; r++)
				y[r * y_stride + o] =
				    dot(nb, wb + (size_t)o * w_row, xb + (size_t)r * x_stride);
		return;
	}
	for (int64_t r = 0; r < n_rows; r++)
		lxq_row(type, xb + (size_t)r * x_stride, nb, xq + r * nb);
	int64_t chunk = (int64_t)(65536 / w_row) / LC * LC;
	if (chunk < LC)
		chunk = LC;
	if (n_rows <= LR)
		chunk = o1 - o0;
	for (int64_t oc = o0; oc < o1; oc += chunk) {
		const int64_t oe = oc + chunk < o1 ? oc + chunk : o1;
		for (int64_t r = 0; r < n_rows; r += LR) {
			const int nr = n_rows - r < LR ? (int)(n_rows - r) : LR;
			const uint8_t *xr = xb + (size_t)r * x_stride;
			const struct lxq *qr = xq + r * nb;
			for (int64_t o = oc; o < oe; o += LC) {
				float out[LR * LC];
				const int nc = oe - o < LC ? (int)(oe - o) : LC;
				if (nc < LC && oe < LC) {
					for (int c = 0; c < nc; c++)
						for (int i = 0; i < nr; i++)
							y[(r + i) * y_stride + o + c] =
							    dot(nb, wb + (size_t)(o + c) * w_row,
								xr + (size_t)i * x_stride);
					continue;
				}
				const int64_t ot = nc < LC ? oe - LC : o;
				const int skip = (int)(o - ot);
				/* streaming from memory (first row group): prefetch */
				const size_t pf =
				    r == 0 && o + 2 * LC <= oe ? (size_t)LC * w_row : 0;
				lt[nr - 1](wb + (size_t)ot * w_row, w_row, xr, x_stride, qr, nb, pf,
					   out);
				for (int i = 0; i < nr; i++)
					for (int c = 0; c < nc; c++)
						y[(r + i) * y_stride + o + c] =
						    out[i * LC + skip + c];
			}
		}
	}
	free(xq);
}

/* ------------------------------------------------------------- dequant */

static ALWAYS_INLINE void store_16(__m128i q, __m256 d, __m256 m, int add_m, float *y)
{
	__m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
	__m256 hi =
	    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), d);
	if (add_m) {
		lo = _mm256_add_ps(lo, m);
		hi = _mm256_add_ps(hi, m);
	}
	_mm256_storeu_ps(y, lo);
	_mm256_storeu_ps(y + 8, hi);
}

static ALWAYS_INLINE void dequant(uint32_t type, const uint8_t *src, float *dst, int64_t nb)
{
	const __m128i tab = _mm_loadu_si128((const __m128i *)kern_legacy_iq4nl_values);
	const size_t bs = w_bytes(type);
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *b = src + (size_t)ib * bs;
		struct lw q = lw_unpack(type, b, tab);
		if (type == KERN_Q5_0) {
			q.a = _mm_sub_epi8(q.a, _mm_set1_epi8(16));
			q.b = _mm_sub_epi8(q.b, _mm_set1_epi8(16));
		}
		const __m256 d = _mm256_set1_ps(_cvtsh_ss(kern_load_u16(b)));
		const __m256 m = has_m(type) ? _mm256_set1_ps(_cvtsh_ss(kern_load_u16(b + 2)))
					     : _mm256_setzero_ps();
		store_16(q.a, d, m, has_m(type), dst + ib * KERN_QK);
		store_16(q.b, d, m, has_m(type), dst + ib * KERN_QK + 16);
	}
}

void kern_legacy_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n)
{
	switch (type) {
	case KERN_Q4_1: dequant(KERN_Q4_1, src, dst, n / KERN_QK); break;
	case KERN_Q5_0: dequant(KERN_Q5_0, src, dst, n / KERN_QK); break;
	case KERN_Q5_1: dequant(KERN_Q5_1, src, dst, n / KERN_QK); break;
	case KERN_IQ4_NL: dequant(KERN_IQ4_NL, src, dst, n / KERN_QK); break;
	default: kern_legacy_dequant_ref(type, src, dst, n); break;
	}
}

/* ------------------------------------------------------------- convert */

/* llama.cpp's x86 quantiser, operation for operation (see kern_legacy_ref.c). */
static void quantize_row_q8_1_avx2(const float *x, struct kern_block_q8_1 *y, int64_t n)
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
		const __m256 mul = _mm256_set1_ps(id);
		__m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), RND));
		__m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), RND));
		__m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), RND));
		__m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), RND));
		const __m256i s8 =
		    _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
		const int32_t sum = hsum_i32(
		    _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1)));
		y[ib].d = _cvtss_sh(d, 0);
		y[ib].s = _cvtss_sh(d * (float)sum, 0);
		i0 = _mm256_packs_epi32(i0, i1);
		i2 = _mm256_packs_epi32(i2, i3);
		i0 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), perm);
		_mm256_storeu_si256((__m256i *)y[ib].qs, i0);
	}
}

void kern_legacy_convert_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (act_type == KERN_Q8_1)
		quantize_row_q8_1_avx2(x, dst, n);
	else
		kern_legacy_convert_ref(act_type, x, dst, n);
}
