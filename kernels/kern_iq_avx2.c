/* kern_iq_avx2: AVX2 kernels of the grid types (IQ1_S, IQ1_M, IQ2_XXS,
 * IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) against Q8_K activations; block layouts, the
 * decoded form and the exact operation sequence in kern_iq_ref.c.
 *
 * A block's packed fields (grid indices, sign indices, scale codes, IQ1
 * deltas) are first unpacked with vector operations (prep_block); each
 * 32-value sub-block then decodes into three registers: g, the 32 unsigned
 * magnitudes |w| (grid rows looked up by index), sg, their signs as
 * _mm256_sign_epi8 operands (0xff negate, 0x01 keep; for IQ1 w itself), and
 * sc, the 16 int16 scales ls (values 0-15 in the low half, 16-31 in the
 * high).  Against an activation sub-block q: maddubs(g, sign(q, sg)) holds
 * exact pair sums w*q (at most 2 * 62 * 127 in magnitude), madd with sc
 * weights them, and the int32 lanes add up to the reference's isum exactly.
 * The float part is then the reference's, one scalar operation at a time, so
 * every result is bit-identical to kern_iq_dot_ref.
 *
 * A tile decodes each sub-block once and applies it to 1..IQ_ROWS activation
 * rows; each row's sums and float steps do not depend on the others, so
 * kern_matmul gives kern_dot's result whatever the number of rows. */
#include <immintrin.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"
#include "kernels/kern_iq_grid.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define IQ_ROWS 4 /* activation rows per decoded weight block */

struct sub {
	__m256i g, sg, sc;
};

static ALWAYS_INLINE uint32_t ld32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

/* f16 -> f32 as kern_f16_to_f32 (F16C quiets a NaN the same way) */
static ALWAYS_INLINE float ldf16(const uint8_t *p)
{
	return _cvtsh_ss(kern_load_u16(p));
}

/* Per-block fields unpacked with vector operations before the sub-blocks are
 * decoded (what a sub-block would otherwise compute with several scalar
 * shifts and masks). */
struct prep {
	uint16_t idx[64];   /* grid index of each entry (not IQ2_XXS, IQ3_XXS) */
	uint32_t sidx[32];  /* 7-bit sign indices: group 4ib+l at [8l+ib] (IQ2_XS: [g]) */
	uint32_t ls[8];	    /* sub-block ib: ls of values 0-15 | ls of 16-31 << 16 */
	uint16_t delta[32]; /* IQ1: group g's delta byte, twice (0xffff or 0x0101) */
};

/* eight u32 sign-and-scale words a (IQ2_XXS, IQ3_XXS) -> sign indices, ls */
static ALWAYS_INLINE void prep_aux(__m256i a, struct prep *p)
{
	const __m256i m7 = _mm256_set1_epi32(127);
	for (int l = 0; l < 4; l++)
		_mm256_storeu_si256((__m256i *)(p->sidx + 8 * l),
				    _mm256_and_si256(_mm256_srli_epi32(a, 7 * l), m7));
	/* 2 * (a >> 28) + 1: bit 27 (a sign bit) is overwritten by the 1 */
	__m256i ls = _mm256_or_si256(_mm256_srli_epi32(a, 27), _mm256_set1_epi32(1));
	ls = _mm256_or_si256(ls, _mm256_slli_epi32(ls, 16));
	_mm256_storeu_si256((__m256i *)p->ls, ls);
}

/* codes c (u32 lanes) for values 0-15 and h for 16-31 -> ls pairs */
static ALWAYS_INLINE void prep_ls(__m256i c, __m256i h, struct prep *p)
{
	const __m256i one = _mm256_set1_epi32(1);
	c = _mm256_add_epi32(_mm256_add_epi32(c, c), one);
	h = _mm256_add_epi32(_mm256_add_epi32(h, h), one);
	_mm256_storeu_si256((__m256i *)p->ls, _mm256_or_si256(c, _mm256_slli_epi32(h, 16)));
}

/* 8 scale bytes of two nibbles each (IQ2_XS, IQ2_S) -> ls pairs */
static ALWAYS_INLINE void prep_nibble_scales(const uint8_t *sc, struct prep *p)
{
	const __m256i m4 = _mm256_set1_epi32(15);
	__m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc));
	prep_ls(_mm256_and_si256(v, m4), _mm256_srli_epi32(v, 4), p);
}

/* 16 u16 lanes holding index bits 8.. in their low bits, shifted up by the
 * per-lane multipliers mul, masked, or-ed with 16 low index bytes at qs */
static ALWAYS_INLINE void prep_idx16(__m256i hi, __m256i mul, int mask, const uint8_t *qs,
				     uint16_t *idx)
{
	hi = _mm256_and_si256(_mm256_mullo_epi16(hi, mul), _mm256_set1_epi16((short)mask));
	__m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
	_mm256_storeu_si256((__m256i *)idx, _mm256_or_si256(lo, hi));
}

/* bytes v[0..7] of a 64-bit value, each repeated n times into 16 u16 lanes
 * (n = 2: lanes 2i, 2i+1 = v[i]; n = 4: lanes 4i..4i+3 = v[i], i < 4) */
static ALWAYS_INLINE __m256i spread_bytes16(__m128i v, int n)
{
	__m128i w = _mm_cvtepu8_epi16(v);
	if (n == 4)
		w = _mm_unpacklo_epi16(w, w);
	return _mm256_setr_m128i(_mm_unpacklo_epi16(w, w), _mm_unpackhi_epi16(w, w));
}

static ALWAYS_INLINE void prep_block(uint32_t type, const uint8_t *b, struct prep *p)
{
	switch (type) {
	case KERN_IQ2_XXS: {
		/* the odd u32 of each 8-byte sub-block */
		const __m256i odd = _mm256_setr_epi32(1, 3, 5, 7, 0, 2, 4, 6);
		__m256i v0 =
		    _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(b + 2)), odd);
		__m256i v1 =
		    _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(b + 34)), odd);
		prep_aux(_mm256_permute2x128_si256(v0, v1, 0x20), p);
		break;
	}
	case KERN_IQ3_XXS: prep_aux(_mm256_loadu_si256((const __m256i *)(b + 66)), p); break;
	case KERN_IQ2_XS: {
		const __m256i m9 = _mm256_set1_epi16(511);
		for (int h = 0; h < 2; h++) {
			__m256i q = _mm256_loadu_si256((const __m256i *)(b + 2 + 32 * h));
			_mm256_storeu_si256((__m256i *)(p->idx + 16 * h), _mm256_and_si256(q, m9));
			__m256i si = _mm256_srli_epi16(q, 9);
			_mm256_storeu_si256((__m256i *)(p->sidx + 16 * h),
					    _mm256_cvtepu16_epi32(_mm256_castsi256_si128(si)));
			_mm256_storeu_si256((__m256i *)(p->sidx + 16 * h + 8),
					    _mm256_cvtepu16_epi32(_mm256_extracti128_si256(si, 1)));
		}
		prep_nibble_scales(b + 66, p);
		break;
	}
	case KERN_IQ2_S: {
		/* group 4ib+l: bits 2l, 2l+1 of qh[ib] to bits 8, 9 */
		const __m256i mul = _mm256_setr_epi16(256, 64, 16, 4, 256, 64, 16, 4, 256, 64, 16,
						      4, 256, 64, 16, 4);
		__m128i qh = _mm_loadl_epi64((const __m128i *)(b + 66));
		prep_idx16(spread_bytes16(qh, 4), mul, 0x300, b + 2, p->idx);
		prep_idx16(spread_bytes16(_mm_srli_si128(qh, 4), 4), mul, 0x300, b + 18,
			   p->idx + 16);
		prep_nibble_scales(b + 74, p);
		break;
	}
	case KERN_IQ3_S: {
		/* entry 8ib+i: bit i of qh[ib] to bit 8 */
		const __m256i mul =
		    _mm256_setr_epi16(256, 128, 64, 32, 16, 8, 4, 2, 256, 128, 64, 32, 16, 8, 4, 2);
		const __m256i dup =
		    _mm256_setr_epi8(0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 1, -1,
				     1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
		for (int h = 0; h < 4; h++) {
			__m256i qh = _mm256_set1_epi16((short)kern_load_u16(b + 66 + 2 * h));
			prep_idx16(_mm256_shuffle_epi8(qh, dup), mul, 0x100, b + 2 + 16 * h,
				   p->idx + 16 * h);
		}
		const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
		__m256i c =
		    _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)ld32(b + 106)), sh),
				     _mm256_set1_epi32(15));
		prep_ls(c, c, p);
		break;
	}
	case KERN_IQ1_S: {
		/* group 4ib+l: bits 3l..3l+2 of qh[ib] to bits 8-10 (l = 3: a
		 * right shift, done by the high half of a multiply) */
		const __m256i mul =
		    _mm256_setr_epi16(256, 32, 4, 0, 256, 32, 4, 0, 256, 32, 4, 0, 256, 32, 4, 0);
		const __m256i mulh = _mm256_setr_epi16(0, 0, 0, -32768, 0, 0, 0, -32768, 0, 0, 0,
						       -32768, 0, 0, 0, -32768);
		const __m256i rep =
		    _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4,
				     5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7);
		__m128i qh = _mm_loadu_si128((const __m128i *)(b + 34));
		for (int h = 0; h < 2; h++) {
			__m128i q4 = h ? _mm_unpackhi_epi64(qh, qh) : qh;
			/* lanes 0-7: words 0, 1; lanes 8-15: words 2, 3 */
			__m256i w = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(q4), rep);
			__m256i hi = _mm256_or_si256(_mm256_mullo_epi16(w, mul),
						     _mm256_mulhi_epu16(w, mulh));
			hi = _mm256_and_si256(hi, _mm256_set1_epi16(0x700));
			__m256i lo = _mm256_cvtepu8_epi16(
			    _mm_loadu_si128((const __m128i *)(b + 2 + 16 * h)));
			_mm256_storeu_si256((__m256i *)(p->idx + 16 * h), _mm256_or_si256(lo, hi));
		}
		__m256i w = _mm256_cvtepu16_epi32(qh);
		__m256i c = _mm256_and_si256(_mm256_srli_epi32(w, 12), _mm256_set1_epi32(7));
		prep_ls(c, c, p);
		/* delta of sub-block ib in all four groups: bit 15 of qh[ib] */
		__m256i neg = _mm256_srai_epi32(_mm256_slli_epi32(w, 16), 31);
		_mm256_storeu_si256((__m256i *)p->delta, _mm256_or_si256(neg, _mm256_set1_epi8(1)));
		break;
	}
	default: { /* IQ1_M: group g: nibble g%2 of qh[g/2] */
		const __m256i mul = _mm256_setr_epi16(256, 16, 256, 16, 256, 16, 256, 16, 256, 16,
						      256, 16, 256, 16, 256, 16);
		const __m256i dbit = _mm256_setr_epi16(8, 128, 8, 128, 8, 128, 8, 128, 8, 128, 8,
						       128, 8, 128, 8, 128);
		__m128i qh = _mm_loadu_si128((const __m128i *)(b + 32));
		for (int h = 0; h < 2; h++) {
			__m256i w = spread_bytes16(h ? _mm_unpackhi_epi64(qh, qh) : qh, 2);
			prep_idx16(w, mul, 0x700, b + 16 * h, p->idx + 16 * h);
			__m256i neg = _mm256_cmpeq_epi16(_mm256_and_si256(w, dbit), dbit);
			_mm256_storeu_si256((__m256i *)(p->delta + 16 * h),
					    _mm256_or_si256(neg, _mm256_set1_epi8(1)));
		}
		/* slot k: bits 3(k%4).. of word k/4; sub-block ib = slots 2ib, 2ib+1 */
		__m256i sc = _mm256_permutevar8x32_epi32(
		    _mm256_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(b + 48))),
		    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
		const __m256i sh = _mm256_setr_epi32(0, 6, 0, 6, 0, 6, 0, 6);
		const __m256i m3 = _mm256_set1_epi32(7);
		__m256i c = _mm256_and_si256(_mm256_srlv_epi32(sc, sh), m3);
		__m256i h = _mm256_and_si256(
		    _mm256_srlv_epi32(sc, _mm256_add_epi32(sh, _mm256_set1_epi32(3))), m3);
		prep_ls(c, h, p);
		break;
	}
	}
}

/* ls pair of sub-block ib -> 16 int16 scales */
static ALWAYS_INLINE __m256i sub_scales(const struct prep *p, int ib)
{
	const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3,
					      2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
	return _mm256_shuffle_epi8(_mm256_set1_epi32((int)p->ls[ib]), pick);
}

/* 4 sign indices -> 32 sign operands */
static ALWAYS_INLINE __m256i signs4(uint32_t s0, uint32_t s1, uint32_t s2, uint32_t s3)
{
	return _mm256_setr_epi64x((long long)kern_iq_sign8[s0], (long long)kern_iq_sign8[s1],
				  (long long)kern_iq_sign8[s2], (long long)kern_iq_sign8[s3]);
}

/* 4 bytes of 8 sign bits each -> 32 sign operands */
static ALWAYS_INLINE __m256i signs_from_bytes(uint32_t bits)
{
	const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2,
						2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
	const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
	__m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
	v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
	return _mm256_or_si256(v, _mm256_set1_epi8(1));
}

static ALWAYS_INLINE __m256i grid64x4(const uint64_t *grid, const uint16_t *i)
{
	return _mm256_setr_epi64x((long long)grid[i[0]], (long long)grid[i[1]],
				  (long long)grid[i[2]], (long long)grid[i[3]]);
}

static ALWAYS_INLINE __m256i grid32x8(const uint32_t *grid, const uint16_t *i)
{
	return _mm256_setr_epi32((int)grid[i[0]], (int)grid[i[1]], (int)grid[i[2]], (int)grid[i[3]],
				 (int)grid[i[4]], (int)grid[i[5]], (int)grid[i[6]],
				 (int)grid[i[7]]);
}

/* IQ1: int8 grid rows r -> w = 8 * r + delta; delta: the four groups'
 * delta bytes (u16 pairs at d) spread over their 8 values */
static ALWAYS_INLINE struct sub iq1_sub(__m256i r, const uint16_t *d, __m256i sc)
{
	const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 4,
						4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
	uint64_t dv;
	memcpy(&dv, d, sizeof(dv));
	__m256i delta = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)dv), spread);
	struct sub s;
	__m256i w = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), r), delta);
	s.g = _mm256_abs_epi8(w);
	s.sg = w;
	s.sc = sc;
	return s;
}

/* Sub-block ib of a block of the given type (p from prep_block). */
static ALWAYS_INLINE struct sub decode_sub(uint32_t type, const uint8_t *b, const struct prep *p,
					   int ib)
{
	struct sub s;
	s.sc = sub_scales(p, ib);
	switch (type) {
	case KERN_IQ2_XXS: {
		const uint8_t *q = b + 2 + 8 * ib;
		s.g = _mm256_setr_epi64x(
		    (long long)kern_iq2xxs_grid[q[0]], (long long)kern_iq2xxs_grid[q[1]],
		    (long long)kern_iq2xxs_grid[q[2]], (long long)kern_iq2xxs_grid[q[3]]);
		s.sg = signs4(p->sidx[ib], p->sidx[8 + ib], p->sidx[16 + ib], p->sidx[24 + ib]);
		break;
	}
	case KERN_IQ2_XS:
		s.g = grid64x4(kern_iq2xs_grid, p->idx + 4 * ib);
		s.sg = signs4(p->sidx[4 * ib], p->sidx[4 * ib + 1], p->sidx[4 * ib + 2],
			      p->sidx[4 * ib + 3]);
		break;
	case KERN_IQ2_S:
		s.g = grid64x4(kern_iq2s_grid, p->idx + 4 * ib);
		s.sg = signs_from_bytes(ld32(b + 34 + 4 * ib));
		break;
	case KERN_IQ3_XXS: {
		const uint8_t *q = b + 2 + 8 * ib;
		s.g = _mm256_setr_epi32((int)kern_iq3xxs_grid[q[0]], (int)kern_iq3xxs_grid[q[1]],
					(int)kern_iq3xxs_grid[q[2]], (int)kern_iq3xxs_grid[q[3]],
					(int)kern_iq3xxs_grid[q[4]], (int)kern_iq3xxs_grid[q[5]],
					(int)kern_iq3xxs_grid[q[6]], (int)kern_iq3xxs_grid[q[7]]);
		s.sg = signs4(p->sidx[ib], p->sidx[8 + ib], p->sidx[16 + ib], p->sidx[24 + ib]);
		break;
	}
	case KERN_IQ3_S:
		s.g = grid32x8(kern_iq3s_grid, p->idx + 8 * ib);
		s.sg = signs_from_bytes(ld32(b + 74 + 4 * ib));
		break;
	case KERN_IQ1_S: {
		/* sub-block ib's delta word, as four group pairs */
		uint16_t d4[4];
		d4[0] = d4[1] = d4[2] = d4[3] = p->delta[2 * ib];
		s = iq1_sub(grid64x4(kern_iq1s_grid, p->idx + 4 * ib), d4, s.sc);
		break;
	}
	default: /* IQ1_M */
		s = iq1_sub(grid64x4(kern_iq1s_grid, p->idx + 4 * ib), p->delta + 4 * ib, s.sc);
		break;
	}
	return s;
}

static ALWAYS_INLINE float block_d(uint32_t type, const uint8_t *b)
{
	if (type != KERN_IQ1_M)
		return ldf16(b);
	uint16_t sc0 = kern_load_u16(b + 48), sc1 = kern_load_u16(b + 50);
	uint16_t sc2 = kern_load_u16(b + 52), sc3 = kern_load_u16(b + 54);
	return _cvtsh_ss((uint16_t)((sc0 >> 12) | ((sc1 >> 8) & 0x00f0) | ((sc2 >> 4) & 0x0f00) |
				    (sc3 & 0xf000)));
}

static ALWAYS_INLINE size_t block_bytes(uint32_t type)
{
	switch (type) {
	case KERN_IQ2_XXS: return 66;
	case KERN_IQ2_XS: return 74;
	case KERN_IQ2_S: return 82;
	case KERN_IQ3_XXS: return 98;
	case KERN_IQ3_S: return 110;
	case KERN_IQ1_S: return 50;
	default: return 56;
	}
}

static ALWAYS_INLINE float type_factor(uint32_t type)
{
	return type == KERN_IQ3_XXS ? 0.25f : type == KERN_IQ3_S ? 1.0f : 0.125f;
}

static ALWAYS_INLINE int32_t hsum_i32(__m256i v)
{
	__m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
	r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
	r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 1));
	return _mm_cvtsi128_si32(r);
}

#define IQ_CHUNK 16 /* blocks whose integer sums are taken before their float steps */

/* One weight row (nb blocks) against nr activation rows xs bytes apart:
 * out[r] = the reference's dot of the row with activation row r.  The
 * integer sums of a chunk of blocks come first, their float steps (in block
 * order) after, so the latency of one block's float tail does not hold up
 * the next block's decoding. */
static ALWAYS_INLINE void tile(uint32_t type, int nr, const uint8_t *w, int64_t nb,
			       const uint8_t *x, size_t xs, float *out)
{
	const size_t bs = block_bytes(type);
	float acc[IQ_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
	for (int64_t ib0 = 0; ib0 < nb; ib0 += IQ_CHUNK) {
		const int nc = nb - ib0 < IQ_CHUNK ? (int)(nb - ib0) : IQ_CHUNK;
		int32_t isum[IQ_ROWS][IQ_CHUNK];
		float dw[IQ_CHUNK];
		for (int c = 0; c < nc; c++) {
			const int64_t ib = ib0 + c;
			const uint8_t *b = w + (size_t)ib * bs;
			const int8_t *q[IQ_ROWS];
			__m256i sum[IQ_ROWS];
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++) {
				q[r] =
				    ((const struct kern_block_q8_k *)(x + (size_t)r * xs) + ib)->qs;
				sum[r] = _mm256_setzero_si256();
			}
			struct prep pp;
			prep_block(type, b, &pp);
#pragma GCC unroll 8
			for (int k = 0; k < 8; k++) {
				struct sub s = decode_sub(type, b, &pp, k);
#pragma GCC unroll 4
				for (int r = 0; r < nr; r++) {
					__m256i v =
					    _mm256_loadu_si256((const __m256i *)(q[r] + 32 * k));
					__m256i p =
					    _mm256_maddubs_epi16(s.g, _mm256_sign_epi8(v, s.sg));
					sum[r] =
					    _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, s.sc));
				}
			}
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++)
				isum[r][c] = hsum_i32(sum[r]);
			dw[c] = block_d(type, b);
		}
		for (int r = 0; r < nr; r++) {
			const struct kern_block_q8_k *xb =
			    (const struct kern_block_q8_k *)(x + (size_t)r * xs) + ib0;
			for (int c = 0; c < nc; c++)
				acc[r] += (dw[c] * xb[c].d) * (float)isum[r][c];
		}
	}
	for (int r = 0; r < nr; r++)
		out[r] = type_factor(type) * acc[r];
}

typedef void (*tile_fn)(const uint8_t *w, int64_t nb, const uint8_t *x, size_t xs, float *out);

#define TILE_DEF(name, type, nr)                                                                   \
	static void name##_##nr(const uint8_t *w, int64_t nb, const uint8_t *x, size_t xs,         \
				float *out)                                                        \
	{                                                                                          \
		tile(type, nr, w, nb, x, xs, out);                                                 \
	}
#define TILE_SET(name, type)                                                                       \
	TILE_DEF(name, type, 1)                                                                    \
	TILE_DEF(name, type, 2)                                                                    \
	TILE_DEF(name, type, 3)                                                                    \
	TILE_DEF(name, type, 4)                                                                    \
	static const tile_fn name[IQ_ROWS] = {name##_1, name##_2, name##_3, name##_4};

TILE_SET(tiles_iq2_xxs, KERN_IQ2_XXS)
TILE_SET(tiles_iq2_xs, KERN_IQ2_XS)
TILE_SET(tiles_iq2_s, KERN_IQ2_S)
TILE_SET(tiles_iq3_xxs, KERN_IQ3_XXS)
TILE_SET(tiles_iq3_s, KERN_IQ3_S)
TILE_SET(tiles_iq1_s, KERN_IQ1_S)
TILE_SET(tiles_iq1_m, KERN_IQ1_M)

static const tile_fn *tiles_for(uint32_t type)
{
	switch (type) {
	case KERN_IQ2_XXS: return tiles_iq2_xxs;
	case KERN_IQ2_XS: return tiles_iq2_xs;
	case KERN_IQ2_S: return tiles_iq2_s;
	case KERN_IQ3_XXS: return tiles_iq3_xxs;
	case KERN_IQ3_S: return tiles_iq3_s;
	case KERN_IQ1_S: return tiles_iq1_s;
	case KERN_IQ1_M: return tiles_iq1_m;
	default: return NULL;
	}
}

float kern_iq_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x)
{
	const tile_fn *t = tiles_for(type);
	float out = 0.0f;
	if (t)
		t[0](w, n / KERN_QK_K, x, 0, &out);
	return out;
}

/* Outputs in chunks of about 64 KiB of weights: a chunk stays in L2 while
 * each group of IQ_ROWS activation rows passes over it. */
void kern_iq_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			 const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	const tile_fn *t = tiles_for(type);
	if (!t || n_rows <= 0 || o1 <= o0)
		return;
	const size_t w_row = kern_row_bytes(type, n_in);
	const int64_t nb = n_in / KERN_QK_K;
	const uint8_t *wb = w, *xb = x;
	int64_t chunk = n_rows <= IQ_ROWS ? o1 - o0 : w_row ? (int64_t)(65536 / w_row) : 1;
	if (chunk < 1)
		chunk = 1;
	for (int64_t oc = o0; oc < o1; oc += chunk) {
		const int64_t oe = oc + chunk < o1 ? oc + chunk : o1;
		for (int64_t r = 0; r < n_rows; r += IQ_ROWS) {
			const int nr = n_rows - r < IQ_ROWS ? (int)(n_rows - r) : IQ_ROWS;
			const uint8_t *xr = xb + (size_t)r * x_stride;
			for (int64_t o = oc; o < oe; o++) {
				float out[IQ_ROWS];
				t[nr - 1](wb + (size_t)o * w_row, nb, xr, x_stride, out);
				for (int i = 0; i < nr; i++)
					y[(r + i) * y_stride + o] = out[i];
			}
		}
	}
}

/* Dequantisation: the reference's float operations, eight values at a time. */
void kern_iq_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n)
{
	const uint8_t *s = src;
	if (!tiles_for(type))
		return;
	const size_t bs = block_bytes(type);
	const int iq1 = type == KERN_IQ1_S || type == KERN_IQ1_M;
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		const uint8_t *b = s + (size_t)ib * bs;
		const float d = block_d(type, b);
		float *y = dst + ib * KERN_QK_K;
		struct prep pp;
		prep_block(type, b, &pp);
		for (int k = 0; k < 8; k++) {
			struct sub sb = decode_sub(type, b, &pp, k);
			__m256i wv = _mm256_sign_epi8(sb.g, sb.sg);
			for (int h = 0; h < 2; h++) {
				/* the 16 values of one scale */
				const int ls = (int)(pp.ls[k] >> (16 * h)) & 0xffff;
				const int sk = ls >> 1;
				float db;
				switch (type) {
				case KERN_IQ2_XXS:
				case KERN_IQ2_XS:
				case KERN_IQ2_S: db = d * (0.5f + sk) * 0.25f; break;
				case KERN_IQ3_XXS: db = d * (0.5f + sk) * 0.5f; break;
				default: db = d * ls; break;
				}
				const __m256 dv = _mm256_set1_ps(db);
				__m128i w16 = h ? _mm256_extracti128_si256(wv, 1)
						: _mm256_castsi256_si128(wv);
				for (int e = 0; e < 2; e++) {
					__m256 f = _mm256_cvtepi32_ps(
					    _mm256_cvtepi8_epi32(e ? _mm_srli_si128(w16, 8) : w16));
					if (iq1)
						f = _mm256_mul_ps(f, _mm256_set1_ps(0.125f));
					_mm256_storeu_ps(y + 32 * k + 16 * h + 8 * e,
							 _mm256_mul_ps(dv, f));
				}
			}
		}
	}
}
