/* kern_legacy_avx2: AVX2 kernels of the 32-value block types Q4_1, Q5_0,
 * Q5_1 and IQ4_NL (layouts and the dot-product contract in
 * kern_legacy_ref.c), and the Q8_1 quantiser.  Compiled with -mavx2 -mfma
 * -mf16c; called only through kern.c's dispatch after kern_init().
 *
 * Every result equals the scalar reference bit for bit: per block an exact
 * int32 sum, then the reference's F32 operations in the same order (no FMA),
 * so kern_dot, kern_matmul (whatever its tiling) and kern_dot_ref agree.
 *
 * Integer products, a whole block in one 256-bit register (unlike
 * kern_avx2.c's 128-bit halves: on this Zen 3 the wide form measured about
 * 1.4x faster for Q5_0 / Q5_1 / IQ4_NL, whose unpacking costs most):
 *   Q4_1, Q5_1, Q5_0: the unsigned codes (0..15 or 0..31) go straight into
 *     maddubs against the int8 activations; Q5_0's offset 16 is taken off the
 *     int32 sum as 16 x the block's activation sum, precomputed per row and
 *     block (struct lxq).  A maddubs pair is at most 2 * 31 * 128 = 7936 in
 *     magnitude, so int16 sums of up to 8 products (31744) do not overflow.
 *     Q5's fifth bits: qh broadcast, one byte per value picked by pshufb,
 *     every other bit set, compared with all ones.
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

/* One weight block's 32 codes in one register, in value order: unsigned
 * codes for Q4_1 / Q5_0 / Q5_1 (Q5_0 before its offset), int8 table values
 * for IQ4_NL (tab: the table in both 128-bit lanes). */
static ALWAYS_INLINE __m256i lw_unpack(uint32_t type, const uint8_t *blk, __m256i tab)
{
	const __m128i q = _mm_loadu_si128((const __m128i *)(blk + qs_off(type)));
	__m256i v =
	    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f));
	if (type == KERN_IQ4_NL)
		return _mm256_shuffle_epi8(tab, v);
	if (is_q5(type)) {
		/* byte j takes bit j of qh: spread qh's byte j / 8 over
		 * byte j, set every other bit, compare with all ones */
		const __m256i sel =
		    _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
				     2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
		const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
		uint32_t qh;
		memcpy(&qh, blk + qh_off(type), sizeof(qh));
		__m256i h = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), sel);
		h = _mm256_cmpeq_epi8(_mm256_or_si256(h, others), _mm256_set1_epi8(-1));
		v = _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
	}
	return v;
}

/* The products of one weight block with one activation block x (ax = |x|,
 * used by IQ4_NL only): Q4_1 / Q5_0 / Q5_1 as 16 int16 pair sums (|lane| <=
 * 7936), IQ4_NL as 8 int32 sums of 4. */
static ALWAYS_INLINE __m256i lw_prod(uint32_t type, __m256i w, __m256i x, __m256i ax)
{
	if (type == KERN_IQ4_NL)
		return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)),
					 _mm256_set1_epi16(1));
	return _mm256_maddubs_epi16(w, x);
}

/* The products p0..p3 of four weight blocks (lw_prod) -> int32
 * [sum p0, sum p1, sum p2, sum p3] of the low 128-bit lanes, then the same of
 * the high lanes.  int16 lanes after two pairwise adds: at most 31744. */
static ALWAYS_INLINE __m256i reduce4(uint32_t type, __m256i p0, __m256i p1, __m256i p2, __m256i p3)
{
	if (type == KERN_IQ4_NL)
		return _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
	return _mm256_madd_epi16(
	    _mm256_hadd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_hadd_epi16(p2, p3)),
	    _mm256_set1_epi16(1));
}

static ALWAYS_INLINE int32_t hsum_i32(__m128i s)
{
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
	return _mm_cvtsi128_si32(s);
}

static ALWAYS_INLINE int32_t hsum8_i32(__m256i s)
{
	return hsum_i32(_mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
}

/* 32 activations (Q8_0 or Q8_1 block xb) */
static ALWAYS_INLINE __m256i x_load(uint32_t type, const uint8_t *xb)
{
	return _mm256_loadu_si256((const __m256i *)(xb + xqs_off(type)));
}

/* sum of the 32 int8 values of x */
static ALWAYS_INLINE int32_t x_sum(__m256i x)
{
	const __m256i s = _mm256_maddubs_epi16(_mm256_set1_epi8(1), x);
	return hsum8_i32(_mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

/* The int32 sum sum_j c_j * x_j of one weight block with one activation
 * block (c as in kern_legacy_ref.c: Q5_0 after its offset). */
static ALWAYS_INLINE int32_t block_sumi(uint32_t type, const uint8_t *wb, const uint8_t *xb,
					__m256i tab)
{
	const __m256i x = x_load(type, xb);
	const __m256i ax = type == KERN_IQ4_NL ? _mm256_abs_epi8(x) : x;
	__m256i p = lw_prod(type, lw_unpack(type, wb, tab), x, ax);
	if (type != KERN_IQ4_NL)
		p = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
	const int32_t s = hsum8_i32(p);
	return type == KERN_Q5_0 ? s - 16 * x_sum(x) : s;
}

static ALWAYS_INLINE __m256i iq4nl_tab(void)
{
	return _mm256_broadcastsi128_si256(
	    _mm_loadu_si128((const __m128i *)kern_legacy_iq4nl_values));
}

/* ------------------------------------------------------------ the dot */

static ALWAYS_INLINE float dot_1(uint32_t type, int64_t nb, const uint8_t *w, const uint8_t *x)
{
	const __m256i tab = iq4nl_tab();
	const size_t bs = w_bytes(type), xbs = x_bytes(type);
	float acc = 0.0f;
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *wb = w + (size_t)ib * bs, *xb = x + (size_t)ib * xbs;
		const int32_t sumi = block_sumi(type, wb, xb, tab);
		const float dw = _cvtsh_ss(kern_load_u16(wb)), dx = _cvtsh_ss(kern_load_u16(xb));
		acc += (dw * dx) * (float)sumi;
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
	const size_t xbs = x_bytes(type);
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *xb = x + (size_t)ib * xbs;
		q[ib].d = _cvtsh_ss(kern_load_u16(xb));
		q[ib].s = has_m(type) ? _cvtsh_ss(kern_load_u16(xb + 2)) : 0.0f;
		q[ib].corr = type == KERN_Q5_0 ? 16 * x_sum(x_load(type, xb)) : 0;
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

static ALWAYS_INLINE int load_i32(const uint8_t *p)
{
	int v;
	memcpy(&v, p, sizeof(v));
	return v;
}

/* Q4_1 / Q5_1: the (d, m) pairs of the blocks at p, p + ws, p + 2 ws,
 * p + 3 ws and the same from p4, as 8 F32 d and 8 F32 m. */
static ALWAYS_INLINE void f16x8_dm(const uint8_t *p, const uint8_t *p4, size_t ws, size_t ws3,
				   __m256 *d, __m256 *m)
{
	/* per lane [d d d d m m m m] as f16, then d's and m's together */
	const __m256i split =
	    _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9,
			     12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
	__m256i v = _mm256_setr_epi32(load_i32(p), load_i32(p + ws), load_i32(p + 2 * ws),
				      load_i32(p + ws3), load_i32(p4), load_i32(p4 + ws),
				      load_i32(p4 + 2 * ws), load_i32(p4 + ws3));
	v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xd8);
	*d = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
	*m = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
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
	const __m256i tab = iq4nl_tab();
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
		const __m256i xv = x_load(type, x + (size_t)ib * xbs);
		const __m256i ax = type == KERN_IQ4_NL ? _mm256_abs_epi8(xv) : xv;
		const __m256i a = reduce4(type, lw_prod(type, lw_unpack(type, p, tab), xv, ax),
					  lw_prod(type, lw_unpack(type, p + ws, tab), xv, ax),
					  lw_prod(type, lw_unpack(type, p + 2 * ws, tab), xv, ax),
					  lw_prod(type, lw_unpack(type, p + ws3, tab), xv, ax));
		const __m256i b = reduce4(type, lw_prod(type, lw_unpack(type, p4, tab), xv, ax),
					  lw_prod(type, lw_unpack(type, p4 + ws, tab), xv, ax),
					  lw_prod(type, lw_unpack(type, p4 + 2 * ws, tab), xv, ax),
					  lw_prod(type, lw_unpack(type, p4 + ws3, tab), xv, ax));
		__m256i s = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
					     _mm256_permute2x128_si256(a, b, 0x31));
		if (type == KERN_Q5_0)
			s = _mm256_sub_epi32(s, _mm256_set1_epi32(xq[ib].corr));
		__m256 dw, mw = _mm256_setzero_ps();
		if (has_m(type))
			f16x8_dm(p, p4, ws, ws3, &dw, &mw);
		else
			dw = f16x8(p, p4, ws, ws3);
		const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(xq[ib].d));
		acc = _mm256_add_ps(acc, _mm256_mul_ps(d, _mm256_cvtepi32_ps(s)));
		if (has_m(type))
			acc = _mm256_add_ps(acc, _mm256_mul_ps(mw, _mm256_set1_ps(xq[ib].s)));
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
	const __m256i tab = iq4nl_tab();
	__m128 acc[LR];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		acc[r] = _mm_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t o = (size_t)ib * bs;
		__m256i wq[4];
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
			const struct lxq *q = xq + r * nb + ib;
			const __m256i xv = x_load(type, x + r * xs + (size_t)ib * xbs);
			const __m256i ax = type == KERN_IQ4_NL ? _mm256_abs_epi8(xv) : xv;
			const __m256i a = reduce4(
			    type, lw_prod(type, wq[0], xv, ax), lw_prod(type, wq[1], xv, ax),
			    lw_prod(type, wq[2], xv, ax), lw_prod(type, wq[3], xv, ax));
			__m128i s = _mm_add_epi32(_mm256_castsi256_si128(a),
						  _mm256_extracti128_si256(a, 1));
			if (type == KERN_Q5_0)
				s = _mm_sub_epi32(s, _mm_set1_epi32(q->corr));
			const __m128 d = _mm_mul_ps(dw, _mm_set1_ps(q->d));
			acc[r] = _mm_add_ps(acc[r], _mm_mul_ps(d, _mm_cvtepi32_ps(s)));
			if (has_m(type))
				acc[r] = _mm_add_ps(acc[r], _mm_mul_ps(mw, _mm_set1_ps(q->s)));
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		_mm_storeu_ps(out + r * LC, acc[r]);
}

/* out[r * LC + c] = dot(weight row w + c * ws, activation row r) for r < nr,
 * c < LC. */
static ALWAYS_INLINE void tile(uint32_t type, int nr, const uint8_t *w, size_t ws, const uint8_t *x,
			       size_t xs, const struct lxq *xq, int64_t nb, size_t pf, float *out)
{
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

static ALWAYS_INLINE __m256 code8(__m128i q8, __m256 d, __m256 m, int add_m)
{
	const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d);
	return add_m ? _mm256_add_ps(v, m) : v;
}

static ALWAYS_INLINE void dequant(uint32_t type, const uint8_t *src, float *dst, int64_t nb)
{
	const __m256i tab = iq4nl_tab();
	const size_t bs = w_bytes(type);
	const int am = has_m(type);
	for (int64_t ib = 0; ib < nb; ib++) {
		const uint8_t *b = src + (size_t)ib * bs;
		__m256i q = lw_unpack(type, b, tab);
		if (type == KERN_Q5_0)
			q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
		const __m256 d = _mm256_set1_ps(_cvtsh_ss(kern_load_u16(b)));
		const __m256 m = am ? _mm256_set1_ps(_cvtsh_ss(kern_load_u16(b + 2))) : d;
		const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
		float *y = dst + ib * KERN_QK;
		_mm256_storeu_ps(y, code8(lo, d, m, am));
		_mm256_storeu_ps(y + 8, code8(_mm_srli_si128(lo, 8), d, m, am));
		_mm256_storeu_ps(y + 16, code8(hi, d, m, am));
		_mm256_storeu_ps(y + 24, code8(_mm_srli_si128(hi, 8), d, m, am));
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
static void quantize_row_q8_1_avx2(const float *x, uint8_t *dst, int64_t n)
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
		uint8_t *y = dst + (size_t)ib * sizeof(struct kern_block_q8_1);
		const uint16_t h[2] = {_cvtss_sh(d, 0), _cvtss_sh(d * (float)sum, 0)};
		memcpy(y, h, sizeof(h));
		i0 = _mm256_packs_epi32(i0, i1);
		i2 = _mm256_packs_epi32(i2, i3);
		i0 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), perm);
		_mm256_storeu_si256((__m256i *)(y + 4), i0);
	}
}

void kern_legacy_convert_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (act_type == KERN_Q8_1)
		quantize_row_q8_1_avx2(x, dst, n);
	else
		kern_legacy_convert_ref(act_type, x, dst, n);
}
