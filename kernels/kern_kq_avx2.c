/* kern_kq_avx2: AVX2 kernels of the K-quants (Q2_K .. Q6_K) and IQ4_XS with
 * Q8_K activations, and the Q8_K quantiser (see kern_kq_ref.c for the block
 * layouts and the exact arithmetic).
 *
 * Every dot computes the reference's integers exactly and then its float
 * sequence per block (Q2_K, Q4_K: acc = fma(isum, d_w * d_x, acc) and
 * accm = fma(msum, dmin_w * d_x, accm), result acc - accm; Q3_K, Q5_K,
 * Q6_K, IQ4_XS: ggml's eight F32 lanes, see kern_kq_ref.c), so kern_dot,
 * kern_matmul and kern_dot_ref agree bit for bit whatever the tiling.
 *
 * A weight block is taken as eight 32-value chunks c (values 32c .. 32c+31,
 * groups 2c and 2c+1).  Each chunk's codes are unpacked to unsigned bytes u
 * (Q2_K 0..3, Q3_K q + 4 in 0..7, Q4_K 0..15, Q5_K 0..31, Q6_K q + 32 in
 * 0..63) that one maddubs multiplies with the signed activations (pair sums
 * at most 2 * 63 * 128, no saturation); IQ4_XS codes are signed table values
 * taken as maddubs(|k|, sign(x, k)) (pair sums at most 2 * 127 * 127; needs
 * x != -128, which Q8_K never holds).  One madd with the chunk's two group
 * scales (int16) widens to int32.  The per-group integer "corr" vector is
 * dotted with the activation bsums in one more madd: the mins (Q2_K, Q4_K,
 * Q5_K: msum) or the code offset times the scale (Q3_K 4 s_g, Q6_K 32 s_g),
 * subtracted from isum; Q3_K instead subtracts maddubs(4, x) from each
 * chunk's pair sums (ggml's lanes).
 *
 * A tile is up to KQ_QC consecutive outputs x up to KQ_QR activation rows:
 * each output's block is unpacked once per tile and multiplied with every
 * row while in registers; the eight-lane int32 partial sums of the tile's
 * outputs are reduced together by horizontal adds, so the float steps run on
 * 4-lane vectors (lane = output).  The first pass over streaming weights
 * prefetches the next tile's blocks (without it decode from DRAM ran at half
 * the speed).  Tried and dropped (no gain measured): adding two or four
 * chunks' maddubs results by horizontal adds before one madd (fewer
 * multiplies, but the adds cost as much), prefetching two tiles ahead. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define KQ_QC 4 /* outputs per tile */
#define KQ_QR 4 /* activation rows per tile */

#define Q8K_BYTES 292 /* struct kern_block_q8_k */
#define Q8K_QS	  4   /* offset of qs in it */
#define Q8K_BSUMS 260 /* offset of bsums */

static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
					 1,    13,   25,  38,  53,  69,	 89,  113};

static ALWAYS_INLINE size_t kq_block_bytes(uint32_t type)
{
	switch (type) {
	case KERN_Q2_K: return 84;
	case KERN_Q3_K: return 110;
	case KERN_Q4_K: return 144;
	case KERN_Q5_K: return 176;
	case KERN_Q6_K: return 210;
	default: return 136; /* IQ4_XS */
	}
}

/* f16 fields of a block */
static ALWAYS_INLINE size_t kq_d_offset(uint32_t type)
{
	switch (type) {
	case KERN_Q2_K: return 80;
	case KERN_Q3_K: return 108;
	case KERN_Q6_K: return 208;
	default: return 0;
	}
}

static ALWAYS_INLINE int kq_has_min(uint32_t type)
{
	return type == KERN_Q2_K || type == KERN_Q4_K || type == KERN_Q5_K;
}

/* Q3_K, Q6_K: a code offset (Q6_K: corr subtracted from isum; Q3_K: see kq_tile) */
static ALWAYS_INLINE int kq_has_offset(uint32_t type)
{
	return type == KERN_Q3_K || type == KERN_Q6_K;
}

/* ------------------------------------------------------- block unpacking */

/* One block's scales: svec = int16 group scales, lanes 0-7 the even groups
 * (0, 2, .., 14), lanes 8-15 the odd ones, so one in-lane shuffle gives chunk
 * c's [s_2c x 8 | s_2c+1 x 8]; corr = int16 per group in natural order (see
 * the file header; zero for IQ4_XS). */
struct kq_scales {
	__m256i svec, corr;
};

/* 16 bytes -> [even bytes | odd bytes] */
static ALWAYS_INLINE __m128i even_odd(__m128i v)
{
	return _mm_shuffle_epi8(
	    v, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
}

/* Q4_K / Q5_K: 8 six-bit scales and 8 mins as bytes (ggml's layout). */
static ALWAYS_INLINE void k4_scales(const uint8_t *q, uint64_t *sc, uint64_t *mn)
{
	uint32_t u0, u1, u2;
	memcpy(&u0, q, 4);
	memcpy(&u1, q + 4, 4);
	memcpy(&u2, q + 8, 4);
	const uint32_t s_lo = u0 & 0x3f3f3f3fu, m_lo = u1 & 0x3f3f3f3fu;
	const uint32_t s_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 6) & 0x03030303u) << 4;
	const uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 6) & 0x03030303u) << 4;
	*sc = s_lo | (uint64_t)s_hi << 32;
	*mn = m_lo | (uint64_t)m_hi << 32;
}

/* Q3_K: 16 six-bit scales (before the -32) as bytes in group order. */
static ALWAYS_INLINE __m128i q3_scales(const uint8_t *q)
{
	uint32_t a0, a1, t;
	memcpy(&a0, q, 4);
	memcpy(&a1, q + 4, 4);
	memcpy(&t, q + 8, 4);
	const uint32_t m2 = 0x0f0f0f0fu, m1 = 0x03030303u;
	const uint32_t s0 = (a0 & m2) | ((t >> 0) & m1) << 4;
	const uint32_t s1 = (a1 & m2) | ((t >> 2) & m1) << 4;
	const uint32_t s2 = ((a0 >> 4) & m2) | ((t >> 4) & m1) << 4;
	const uint32_t s3 = ((a1 >> 4) & m2) | ((t >> 6) & m1) << 4;
	return _mm_setr_epi32((int)s0, (int)s1, (int)s2, (int)s3);
}

static ALWAYS_INLINE struct kq_scales kq_scales_of(uint32_t type, const uint8_t *b)
{
	struct kq_scales s;
	switch (type) {
	case KERN_Q2_K: {
		const __m128i sc = _mm_loadu_si128((const __m128i *)b);
		const __m128i m4 = _mm_set1_epi8(0x0f);
		s.svec = _mm256_cvtepu8_epi16(even_odd(_mm_and_si128(sc, m4)));
		s.corr = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), m4));
		break;
	}
	case KERN_Q3_K: {
		const __m128i sc = q3_scales(b + 96);
		const __m256i m32 = _mm256_set1_epi16(32);
		s.svec = _mm256_sub_epi16(_mm256_cvtepu8_epi16(even_odd(sc)), m32);
		s.corr = _mm256_slli_epi16(_mm256_sub_epi16(_mm256_cvtepu8_epi16(sc), m32), 2);
		break;
	}
	case KERN_Q4_K:
	case KERN_Q5_K: {
		uint64_t sc, mn;
		k4_scales(b + 4, &sc, &mn);
		const __m128i s8 = _mm_cvtsi64_si128((long long)sc);
		const __m128i m8 = _mm_cvtsi64_si128((long long)mn);
		s.svec = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(s8));
		s.corr = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
		break;
	}
	case KERN_Q6_K: {
		const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
		s.svec = _mm256_cvtepi8_epi16(even_odd(sc));
		s.corr = _mm256_slli_epi16(_mm256_cvtepi8_epi16(sc), 5);
		break;
	}
	default: { /* IQ4_XS */
		/* nibble k of scales_l to byte k, 2-bit field k of scales_h to
		 * bits 4-5 of byte k */
		uint32_t sl;
		memcpy(&sl, b + 4, 4);
		uint64_t lo = sl;
		lo = (lo | lo << 16) & 0x0000ffff0000ffffull;
		lo = (lo | lo << 8) & 0x00ff00ff00ff00ffull;
		lo = (lo | lo << 4) & 0x0f0f0f0f0f0f0f0full;
		uint64_t hi = kern_load_u16(b + 2);
		hi = (hi | hi << 24) & 0x000000ff000000ffull;
		hi = (hi | hi << 12) & 0x000f000f000f000full;
		hi = (hi | hi << 6) & 0x0303030303030303ull;
		const uint64_t ls = lo | hi << 4;
		const __m128i l16 = _mm_sub_epi16(
		    _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)ls)), _mm_set1_epi16(32));
		s.svec = _mm256_broadcastsi128_si256(l16);
		s.corr = _mm256_setzero_si256();
		break;
	}
	}
	return s;
}

/* Chunk c's scale pair [s_2c x 8 | s_2c+1 x 8]. */
static ALWAYS_INLINE __m256i chunk_scales(__m256i svec, int c)
{
	const __m256i idx = _mm256_set1_epi16((short)(2 * c | (2 * c + 1) << 8));
	return _mm256_shuffle_epi8(svec, idx);
}

/* Bits b of every byte of v moved to bit t (other bits of the result are
 * garbage; the caller masks). */
static ALWAYS_INLINE __m256i bit_to(__m256i v, int b, int t)
{
	if (b < t)
		return _mm256_slli_epi16(v, t - b);
	if (b > t)
		return _mm256_srli_epi16(v, b - t);
	return v;
}

/* Chunk c of a block: its 32 codes as bytes (see the file header; IQ4_XS:
 * the signed table values). */
static ALWAYS_INLINE __m256i kq_chunk(uint32_t type, const uint8_t *b, int c)
{
	const __m256i m4 = _mm256_set1_epi8(0x0f);
	switch (type) {
	case KERN_Q2_K: {
		const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * (c / 4)));
		return _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c % 4)), _mm256_set1_epi8(3));
	}
	case KERN_Q3_K: {
		const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * (c / 4)));
		const __m256i h = _mm256_loadu_si256((const __m256i *)b);
		const __m256i lo =
		    _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c % 4)), _mm256_set1_epi8(3));
		return _mm256_or_si256(lo, _mm256_and_si256(bit_to(h, c, 2), _mm256_set1_epi8(4)));
	}
	case KERN_Q4_K: {
		const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * (c / 2)));
		return _mm256_and_si256(c % 2 ? _mm256_srli_epi16(q, 4) : q, m4);
	}
	case KERN_Q5_K: {
		const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * (c / 2)));
		const __m256i h = _mm256_loadu_si256((const __m256i *)(b + 16));
		const __m256i lo = _mm256_and_si256(c % 2 ? _mm256_srli_epi16(q, 4) : q, m4);
		return _mm256_or_si256(lo, _mm256_and_si256(bit_to(h, c, 4), _mm256_set1_epi8(16)));
	}
	case KERN_Q6_K: {
		const int h = c / 4, k = c % 4;
		const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (k & 1)));
		const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
		const __m256i lo = _mm256_and_si256(k / 2 ? _mm256_srli_epi16(q, 4) : q, m4);
		return _mm256_or_si256(
		    lo, _mm256_and_si256(bit_to(qh, 2 * k, 4), _mm256_set1_epi8(0x30)));
	}
	default: { /* IQ4_XS */
		const __m128i q = _mm_loadu_si128((const __m128i *)(b + 8 + 16 * c));
		const __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
		const __m256i tab =
		    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kvalues_iq4nl));
		return _mm256_shuffle_epi8(tab, n);
	}
	}
}

/* ----------------------------------------------------------------- dots */

/* Q3_K, Q5_K, Q6_K, IQ4_XS: the float steps of ggml's ggml_vec_dot_*_q8_K
 * (see kern_kq_ref.c): per block, lane m of the eight int32 lanes (values
 * 32c + 4m .. 32c + 4m + 3 of each chunk c, times their scale; Q6_K less
 * 32 (s_2m bsums_2m + s_2m+1 bsums_2m+1)) is accumulated in F32 by an FMA,
 * and the lanes are summed as hsum_f32x8 at the end. */
static ALWAYS_INLINE int kq_lane_type(uint32_t type)
{
	return type == KERN_Q3_K || type == KERN_Q5_K || type == KERN_Q6_K || type == KERN_IQ4_XS;
}

/* ggml's hsum_float_8: high half + low half, then lanes 0+2, 1+3, then 0+1 */
static ALWAYS_INLINE float hsum_f32x8(__m256 v)
{
	__m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
	r = _mm_add_ps(r, _mm_movehl_ps(r, r));
	r = _mm_add_ss(r, _mm_movehdup_ps(r));
	return _mm_cvtss_f32(r);
}

static ALWAYS_INLINE int32_t hsum_i32(__m256i v)
{
	__m128i r = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
	r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
	r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
	return _mm_cvtsi128_si32(r);
}

/* [sum(a), sum(b), sum(c), sum(d)] of four int32 x 8 vectors */
static ALWAYS_INLINE __m128i reduce4(__m256i a, __m256i b, __m256i c, __m256i d)
{
	const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
	return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* nc f16 values at p, p + ws, ... as F32 lanes (the rest 0) */
static ALWAYS_INLINE __m128 f16x4(const uint8_t *p, size_t ws, int nc)
{
	uint64_t h = 0;
	for (int o = 0; o < nc; o++)
		h |= (uint64_t)kern_load_u16(p + o * ws) << (16 * o);
	return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
}

/* Lanes of step k (of `step` chunks, i.e. 2 * step groups, lane m holding
 * groups 2m and 2m + 1) all ones, the others zero. */
static ALWAYS_INLINE __m256i kq_step_mask(int step, int k)
{
	const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
	const __m256i lo = _mm256_set1_epi32(k * step - 1), hi = _mm256_set1_epi32((k + 1) * step);
	return _mm256_and_si256(_mm256_cmpgt_epi32(lane, lo), _mm256_cmpgt_epi32(hi, lane));
}

/* out[r * KQ_QC + o] = dot(weight row w + o * ws, activation row x + r * xs)
 * for o < nc, r < nr (nb blocks); pf: bytes from a weight block to the one to
 * prefetch (0: none). */
static ALWAYS_INLINE void kq_tile(uint32_t type, int gemm, int nc, int nr, const uint8_t *w,
				  size_t ws, const uint8_t *x, size_t xs, int64_t nb, size_t pf,
				  float *out)
{
	/* gemm: Q2_K, Q4_K: the float steps per step of `step` chunks (gstep);
	 * IQ4_XS: per block, one accumulator (ggml's IQ panel) */
	const int step = type == KERN_Q4_K ? 2 : 4;
	const int gstep = gemm && (type == KERN_Q2_K || type == KERN_Q4_K);
	__m256i ps[KQ_QR][KQ_QC][4];
	const size_t bs = kq_block_bytes(type), doff = kq_d_offset(type);
	const int has_min = kq_has_min(type), has_off = kq_has_offset(type);
	const int sgn = type == KERN_IQ4_XS;
	const int lanes = kq_lane_type(type) && !gemm;
	__m128 acc[KQ_QR], accm[KQ_QR];
	__m256 acc8[KQ_QR][KQ_QC];
	float summs[KQ_QR][KQ_QC];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++) {
		acc[r] = accm[r] = _mm_setzero_ps();
		for (int o = 0; o < KQ_QC; o++) {
			acc8[r][o] = _mm256_setzero_ps();
			summs[r][o] = 0.0f;
		}
	}
	for (int64_t ib = 0; ib < nb; ib++) {
		__m256i pi[KQ_QR][KQ_QC], pm[KQ_QR][KQ_QC];
		const uint8_t *xb = x + (size_t)ib * Q8K_BYTES;
#pragma GCC unroll 4
		for (int o = 0; o < nc; o++) {
			const uint8_t *b = w + o * ws + (size_t)ib * bs;
			if (pf) /* one per 64 bytes of the block */
#pragma GCC unroll 4
				for (size_t l = 0; l < bs; l += 64)
					_mm_prefetch((const char *)b + pf + l, _MM_HINT_T0);
			const struct kq_scales s = kq_scales_of(type, b);
			__m256i p[KQ_QR];
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++)
				p[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
			for (int c = 0; c < 8; c++) {
				const __m256i u = kq_chunk(type, b, c);
				const __m256i a = sgn ? _mm256_abs_epi8(u) : u;
				const __m256i sc = chunk_scales(s.svec, c);
#pragma GCC unroll 4
				for (int r = 0; r < nr; r++) {
					if (gstep && c % step == 0 && c > 0) {
						ps[r][o][c / step - 1] = p[r];
						p[r] = _mm256_setzero_si256();
					}
					__m256i q = _mm256_loadu_si256(
					    (const __m256i *)(xb + r * xs + Q8K_QS + 32 * c));
					if (sgn)
						q = _mm256_sign_epi8(q, u);
					__m256i p16 = _mm256_maddubs_epi16(a, q);
					if (type == KERN_Q3_K)
						p16 = _mm256_sub_epi16(
						    p16,
						    _mm256_maddubs_epi16(_mm256_set1_epi8(4), q));
					p[r] = _mm256_add_epi32(p[r], _mm256_madd_epi16(p16, sc));
				}
			}
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++) {
				if (has_min || (has_off && type != KERN_Q3_K)) {
					const __m256i bsum = _mm256_loadu_si256(
					    (const __m256i *)(xb + r * xs + Q8K_BSUMS));
					const __m256i cv = _mm256_madd_epi16(s.corr, bsum);
					if (has_off)
						p[r] = _mm256_sub_epi32(p[r], cv);
					else
						pm[r][o] = cv;
				}
				pi[r][o] = p[r];
				if (gstep)
					ps[r][o][8 / step - 1] = p[r];
			}
		}
#pragma GCC unroll 4
		for (int o = nc; o < KQ_QC; o++)
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++) {
				pi[r][o] = pm[r][o] = _mm256_setzero_si256();
				for (int k = 0; k < 4; k++)
					ps[r][o][k] = _mm256_setzero_si256();
			}
		const uint8_t *b0 = w + (size_t)ib * bs;
		if (lanes) {
			/* ggml's lanes: acc8 = fma(d_w * d_x, lane, acc8); Q5_K's
			 * mins: summs = fma(-(d_x * dmin_w), msum, summs) */
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++) {
				float dxf;
				memcpy(&dxf, xb + r * xs, sizeof(dxf));
#pragma GCC unroll 4
				for (int o = 0; o < nc; o++) {
					const uint8_t *bo = b0 + o * ws;
					const float d = _cvtsh_ss(kern_load_u16(bo + doff)) * dxf;
					acc8[r][o] = _mm256_fmadd_ps(_mm256_set1_ps(d),
								     _mm256_cvtepi32_ps(pi[r][o]),
								     acc8[r][o]);
					if (has_min) {
						const float dm = -(
						    dxf * _cvtsh_ss(kern_load_u16(bo + doff + 2)));
						summs[r][o] = fmaf(dm, (float)hsum_i32(pm[r][o]),
								   summs[r][o]);
					}
				}
			}
			continue;
		}
		const __m128 dw = f16x4(b0 + doff, ws, nc);
		const __m128 dm = has_min ? f16x4(b0 + doff + 2, ws, nc) : _mm_setzero_ps();
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			float dxf;
			memcpy(&dxf, xb + r * xs, sizeof(dxf));
			const __m128 dx = _mm_set1_ps(dxf);
			if (gstep) {
				/* per step: the step's chunk sums, and the mins of its
				 * groups (lanes m of pm hold groups 2m, 2m + 1) */
				const __m128 d = _mm_mul_ps(dw, dx), dmx = _mm_mul_ps(dm, dx);
#pragma GCC unroll 4
				for (int k = 0; k < 8 / step; k++) {
					const __m128i is = reduce4(ps[r][0][k], ps[r][1][k],
								   ps[r][2][k], ps[r][3][k]);
					acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(is), d, acc[r]);
					const __m256i lm = kq_step_mask(step, k);
					const __m128i ms = reduce4(_mm256_and_si256(pm[r][0], lm),
								   _mm256_and_si256(pm[r][1], lm),
								   _mm256_and_si256(pm[r][2], lm),
								   _mm256_and_si256(pm[r][3], lm));
					accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(ms), dmx, accm[r]);
				}
				continue;
			}
			const __m128i is = reduce4(pi[r][0], pi[r][1], pi[r][2], pi[r][3]);
			acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(is), _mm_mul_ps(dw, dx), acc[r]);
			if (has_min) {
				const __m128i ms = reduce4(pm[r][0], pm[r][1], pm[r][2], pm[r][3]);
				accm[r] =
				    _mm_fmadd_ps(_mm_cvtepi32_ps(ms), _mm_mul_ps(dm, dx), accm[r]);
			}
		}
	}
	if (lanes) {
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
			for (int o = 0; o < nc; o++) {
				const float h = hsum_f32x8(acc8[r][o]);
				out[r * KQ_QC + o] = type == KERN_Q5_K ? h + summs[r][o] : h;
			}
		return;
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++)
		_mm_storeu_ps(out + r * KQ_QC, _mm_sub_ps(acc[r], accm[r]));
}

typedef void (*kq_tile_fn)(const uint8_t *w, size_t ws, const uint8_t *x, size_t xs, int64_t nb,
			   size_t pf, float *out);

#define KQ_TILE_DEF(name, type, nc, nr)                                                            \
	static void name##_##nc##_##nr(const uint8_t *w, size_t ws, const uint8_t *x, size_t xs,   \
				       int64_t nb, size_t pf, float *out)                          \
	{                                                                                          \
		kq_tile(type, KQ_GEMM_##name, nc, nr, w, ws, x, xs, nb, pf, out);                  \
	}
#define KQ_TILE_SET(name, type)                                                                    \
	KQ_TILE_DEF(name, type, 1, 1)                                                              \
	KQ_TILE_DEF(name, type, 1, 2)                                                              \
	KQ_TILE_DEF(name, type, 1, 3)                                                              \
	KQ_TILE_DEF(name, type, 1, 4)                                                              \
	KQ_TILE_DEF(name, type, 4, 1)                                                              \
	KQ_TILE_DEF(name, type, 4, 2)                                                              \
	KQ_TILE_DEF(name, type, 4, 3)                                                              \
	KQ_TILE_DEF(name, type, 4, 4)                                                              \
	static const kq_tile_fn name[2][KQ_QR] = {                                                 \
	    {name##_1_1, name##_1_2, name##_1_3, name##_1_4},                                      \
	    {name##_4_1, name##_4_2, name##_4_3, name##_4_4}};

#define KQ_GEMM_kq_tiles_q2_k	0
#define KQ_GEMM_kq_tiles_q3_k	0
#define KQ_GEMM_kq_tiles_q4_k	0
#define KQ_GEMM_kq_tiles_q5_k	0
#define KQ_GEMM_kq_tiles_q6_k	0
#define KQ_GEMM_kq_tiles_iq4_xs 0
#define KQ_GEMM_kq_gemm_q2_k	1
#define KQ_GEMM_kq_gemm_q4_k	1
#define KQ_GEMM_kq_gemm_iq4_xs	1
KQ_TILE_SET(kq_gemm_q2_k, KERN_Q2_K)
KQ_TILE_SET(kq_gemm_q4_k, KERN_Q4_K)
KQ_TILE_SET(kq_gemm_iq4_xs, KERN_IQ4_XS)
KQ_TILE_SET(kq_tiles_q2_k, KERN_Q2_K)
KQ_TILE_SET(kq_tiles_q3_k, KERN_Q3_K)
KQ_TILE_SET(kq_tiles_q4_k, KERN_Q4_K)
KQ_TILE_SET(kq_tiles_q5_k, KERN_Q5_K)
KQ_TILE_SET(kq_tiles_q6_k, KERN_Q6_K)
KQ_TILE_SET(kq_tiles_iq4_xs, KERN_IQ4_XS)

/* [0]: one output per tile, [1]: KQ_QC outputs; index nr - 1 */
static const kq_tile_fn (*kq_tiles_for(uint32_t type))[KQ_QR]
{
	switch (type) {
	case KERN_Q2_K: return kq_tiles_q2_k;
	case KERN_Q3_K: return kq_tiles_q3_k;
	case KERN_Q4_K: return kq_tiles_q4_k;
	case KERN_Q5_K: return kq_tiles_q5_k;
	case KERN_Q6_K: return kq_tiles_q6_k;
	case KERN_IQ4_XS: return kq_tiles_iq4_xs;
	default: return NULL;
	}
}

float kern_kq_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x)
{
	const kq_tile_fn(*t)[KQ_QR] = kq_tiles_for(type);
	float out[KQ_QC];
	if (!t || n < KERN_QK_K)
		return 0.0f;
	t[0][0](w, 0, x, 0, n / KERN_QK_K, 0, out);
	return out[0];
}

void kern_kq_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			 const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
			 int64_t gemm_rows)
{
	const kq_tile_fn(*t)[KQ_QR] = kq_tiles_for(type);
	const kq_tile_fn(*tg)[KQ_QR] = type == KERN_Q4_K     ? kq_gemm_q4_k
				       : type == KERN_Q2_K   ? kq_gemm_q2_k
				       : type == KERN_IQ4_XS ? kq_gemm_iq4_xs
							     : t;
	const uint8_t *wb = w, *xb = x;
	const int64_t nb = n_in / KERN_QK_K;
	const size_t w_row = kern_row_bytes(type, n_in);
	if (!t || n_rows <= 0 || o1 <= o0)
		return;
	if (nb <= 0) {
		for (int64_t r = 0; r < n_rows; r++)
			for (int64_t o = o0; o < o1; o++)
				y[r * y_stride + o] = 0.0f;
		return;
	}
	/* outputs in chunks of about 64 KiB of weights (they stay in L2 while
	 * every group of KQ_QR rows passes over them) */
	int64_t chunk = (int64_t)(65536 / w_row) / KQ_QC * KQ_QC;
	if (chunk < KQ_QC)
		chunk = KQ_QC;
	if (n_rows <= KQ_QR)
		chunk = o1 - o0;
	for (int64_t oc = o0; oc < o1; oc += chunk) {
		const int64_t oe = oc + chunk < o1 ? oc + chunk : o1;
		for (int64_t r = 0; r < n_rows; r += KQ_QR) {
			const int nr = n_rows - r < KQ_QR ? (int)(n_rows - r) : KQ_QR;
			const uint8_t *xr = xb + (size_t)r * x_stride;
			for (int64_t o = oc; o < oe;) {
				float out[KQ_QR * KQ_QC];
				const int nc = oe - o >= KQ_QC ? KQ_QC : 1;
				/* first pass over the weights: prefetch the next tile */
				const size_t pf = r == 0 && nc == KQ_QC && o + 2 * KQ_QC <= oe
						      ? KQ_QC * w_row
						      : 0;
				(r < gemm_rows ? tg : t)[nc == KQ_QC][nr - 1](
				    wb + (size_t)o * w_row, w_row, xr, x_stride, nb, pf, out);
				for (int i = 0; i < nr; i++)
					for (int c = 0; c < nc; c++)
						y[(r + i) * y_stride + o + c] = out[i * KQ_QC + c];
				o += nc;
			}
		}
	}
}

/* ------------------------------------------------------------- dequant */

void kern_kq_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n)
{
	const size_t bs = kern_type_block_bytes(type);
	const uint8_t *s = src;
	if (!kq_tiles_for(type)) { /* Q8_K activations */
		kern_kq_dequant_ref(type, src, dst, n);
		return;
	}
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++, dst += KERN_QK_K) {
		const uint8_t *b = s + (size_t)ib * bs;
		const struct kq_scales sc = kq_scales_of(type, b);
		int16_t sv[16], cv[16];
		_mm256_storeu_si256((__m256i *)sv, sc.svec);
		_mm256_storeu_si256((__m256i *)cv, sc.corr);
		const size_t doff = kq_d_offset(type);
		const float d = _cvtsh_ss(kern_load_u16(b + doff));
		const float dmin = kq_has_min(type) ? _cvtsh_ss(kern_load_u16(b + doff + 2)) : 0.0f;
		const int off = type == KERN_Q3_K ? 4 : type == KERN_Q6_K ? 32 : 0;
		for (int c = 0; c < 8; c++) {
			const __m256i q =
			    _mm256_sub_epi8(kq_chunk(type, b, c), _mm256_set1_epi8(off));
			const __m128i qq[2] = {_mm256_castsi256_si128(q),
					       _mm256_extracti128_si256(q, 1)};
			for (int h = 0; h < 2; h++) {
				const int g = 2 * c + h;
				const __m256 dl = _mm256_set1_ps(d * (float)sv[c + 8 * h]);
				const __m256 ml = _mm256_set1_ps(dmin * (float)cv[g]);
				float *y = dst + 16 * g;
				const __m128i half[2] = {qq[h], _mm_srli_si128(qq[h], 8)};
				for (int k = 0; k < 2; k++) {
					const __m256 v =
					    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(half[k]));
					__m256 r = _mm256_mul_ps(dl, v);
					if (kq_has_min(type))
						r = _mm256_sub_ps(r, ml);
					_mm256_storeu_ps(y + 8 * k, r);
				}
			}
		}
	}
}

/* ------------------------------------------------------------- convert */

/* Q8_K exactly as the reference: the same max search (first value of
 * largest magnitude; NaNs never win: maxps returns its second operand, the
 * running maximum, when the first is NaN), the same magic-add rounding on
 * iscale * x, min(127) and the low byte as the int8. */
static void quantize_row_q8_k_avx2(const float *x, struct kern_block_q8_k *y, int64_t n)
{
	const __m256 sign = _mm256_set1_ps(-0.0f);
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++, x += KERN_QK_K) {
		__m256 m = _mm256_setzero_ps();
		for (int j = 0; j < KERN_QK_K; j += 8)
			m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), m);
		__m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
		m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
		m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
		const float amax = _mm_cvtss_f32(m4);
		if (amax == 0.0f) {
			memset(&y[ib], 0, sizeof(y[ib]));
			continue;
		}
		const __m256 va = _mm256_set1_ps(amax);
		int first = 0;
		for (int j = 0; j < KERN_QK_K; j += 8) {
			const int mask = _mm256_movemask_ps(_mm256_cmp_ps(
			    _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), va, _CMP_EQ_OQ));
			if (mask) {
				first = j + __builtin_ctz((unsigned)mask);
				break;
			}
		}
		const float iscale = -127.0f / x[first];
		const __m256 vs = _mm256_set1_ps(iscale);
		const __m256 magic = _mm256_set1_ps(12582912.0f);
		const __m256i mant = _mm256_set1_epi32(0x007fffff),
			      bias = _mm256_set1_epi32(0x00400000);
		const __m256i top = _mm256_set1_epi32(127);
		const __m256i low_bytes =
		    _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0,
				     4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
		int32_t sums[KERN_QK_K / 16];
		for (int j = 0; j < KERN_QK_K; j += 16) {
			__m256i q[2];
			for (int k = 0; k < 2; k++) {
				const __m256 v = _mm256_add_ps(
				    _mm256_mul_ps(vs, _mm256_loadu_ps(x + j + 8 * k)), magic);
				__m256i i = _mm256_sub_epi32(
				    _mm256_and_si256(_mm256_castps_si256(v), mant), bias);
				q[k] = _mm256_min_epi32(i, top);
			}
			/* the low byte of each int32: [q0-3 | q4-7] per vector */
			const __m256i b0 = _mm256_shuffle_epi8(q[0], low_bytes);
			const __m256i b1 = _mm256_shuffle_epi8(q[1], low_bytes);
			const __m128i lo = _mm_unpacklo_epi32(_mm256_castsi256_si128(b0),
							      _mm256_extracti128_si256(b0, 1));
			const __m128i hi = _mm_unpacklo_epi32(_mm256_castsi256_si128(b1),
							      _mm256_extracti128_si256(b1, 1));
			const __m128i bytes = _mm_unpacklo_epi64(lo, hi);
			_mm_storeu_si128((__m128i *)(y[ib].qs + j), bytes);
			__m128i s = _mm_sad_epu8(_mm_xor_si128(bytes, _mm_set1_epi8((char)0x80)),
						 _mm_setzero_si128());
			sums[j / 16] = _mm_cvtsi128_si32(s) + _mm_extract_epi32(s, 2) - 16 * 128;
		}
		for (int j = 0; j < KERN_QK_K / 16; j++)
			y[ib].bsums[j] = (int16_t)sums[j];
		y[ib].d = 1.0f / iscale;
	}
}

void kern_kq_convert_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (act_type == KERN_Q8_K)
		quantize_row_q8_k_avx2(x, dst, n);
}
