/* kern_kq_avx512: AVX-512 decode kernels (one or two activation rows) of
 * Q4_K and Q6_K weights with Q8_K activations, compiled with the AVX-512
 * F/BW/VL/DQ/VNNI flags of kern_avx512.c and called only through it.
 *
 * The weights stay in their GGML block layout (no repacking: with one row
 * it would cost more than the product).  A tile is four consecutive outputs
 * (Q6_K with one row: eight) times the rows; each output's block is
 * unpacked once and multiplied with every row while in registers.  The
 * results are kern_kq_ref.c's, bit for bit: the same exact int32 sums per
 * block and the same float steps.
 *
 * Integers.  One 512-bit vector holds the unsigned codes of two 32-value
 * chunks, 2k and 2k + 1 (Q4_K: the 32 bytes of qs broadcast to both halves,
 * low nibbles in the low half, high ones in the high half; Q6_K: 64 bytes of
 * ql, low or high nibbles, or'ed with two bits of qh moved to bits 4-5, codes
 * q + 32 in 0..63), in the natural order of the Q8_K row's 64 activations.
 * Products with the activations, times the int16 group scales of their
 * chunks (shuffles of the block's scales), go into one int32 vector per
 * output and row:
 *   Q4_K: VPDPBUSD gives the sums of four products (at most 4 * 15 * 128:
 *   exact in int16), two vectors are packed to int16 and VPDPWSSD multiplies
 *   them by their scales.  The tile's four vectors per row are summed lane by
 *   lane by an unpack-add tree, and the mins (m_s times the pair sums of
 *   bsums, from a shuffle of the scales and VPDPWSSD into one vector per row,
 *   output o in dword o of every 128-bit lane) are reduced along with them,
 *   giving [isum_0..3 | msum_0..3]; acc = fma(isum, d_w * d_x, acc) and
 *   accm = fma(msum, dmin_w * d_x, accm) run as one 8-lane FMA with
 *   [d_0..3 | dmin_0..3], and the result is acc - accm.
 *   Q6_K: VPMADDUBSW gives the int16 pair sums (at most 2 * 63 * 128, no
 *   saturation) and VPDPWSSD multiplies them by their scales, so int32
 *   lane j of half h holds values 4j .. 4j + 3 of chunk 2k + h, summed over
 *   k; the code offset is taken out by one VPMADDWD of the scales with
 *   -16 bsums in both halves (half of -32 s_g bsums_g each).  The two
 *   halves added give ggml's eight lanes of the output (lane m: values
 *   4m .. 4m + 3 of every chunk), two outputs per vector, each accumulated
 *   per block by acc_m = fma(d_w * d_x, lane_m, acc_m) and summed at the
 *   end as ggml's hsum_float_8.
 *
 * The next tile's blocks are prefetched while this one runs (as the AVX2
 * kernels do; decode from DRAM needs it). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define NC     4 /* outputs per tile */
#define NC_MAX 8 /* Q6_K with one row */
#define NR     2 /* activation rows at most */

#define Q8K_BYTES 292 /* struct kern_block_q8_k */
#define Q8K_QS	  4   /* offset of qs in it */
#define Q8K_BSUMS 260 /* offset of bsums */

#define Q4K_BYTES 144
#define Q6K_BYTES 210

/* Every cache line of bytes at p, each once. */
static ALWAYS_INLINE void prefetch_block(const uint8_t *p, size_t bytes)
{
	const uintptr_t end = (uintptr_t)p + bytes;
	for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a < end; a += 64)
		_mm_prefetch((const char *)a, _MM_HINT_T0);
}

/* 64 activations of a Q8_K block, chunks 2k and 2k + 1 */
static ALWAYS_INLINE __m512i x_chunks(const uint8_t *xb, int k)
{
	return _mm512_loadu_si512((const void *)(xb + Q8K_QS + 64 * k));
}

/* The sum of the tile's four int32 vectors lane by lane within each 128-bit
 * lane L: result dword o of lane L = the sum of v[o]'s four dwords of L. */
static ALWAYS_INLINE __m512i sum4_by_lane(const __m512i v[NC])
{
	const __m512i a =
	    _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
	const __m512i b =
	    _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
	return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

/* ------------------------------------------------------------------ Q4_K */

/* The four blocks' 6-bit scales and mins as bytes, 128-bit lane o for
 * output o: [s0..s7, m0..m7] (s = lane bytes 4 .. 15 of the block, see
 * kern_kq_ref.c); dwords 0 of the lanes are the blocks' f16 d, dmin. */
static ALWAYS_INLINE __m512i k4_scales(__m512i head)
{
	/* dwords: [sc0..3], [sc8..11] (low nibbles: s4..7), [sc4..7],
	 * [sc8..11] (high nibbles: m4..7); their top two bits from the
	 * dwords [sc0..3] (s4..7), [sc4..7] (m4..7) */
	const __m512i ia = _mm512_broadcast_i32x4(
	    _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
	const __m512i ih = _mm512_broadcast_i32x4(_mm_setr_epi8(
	    -128, -128, -128, -128, 4, 5, 6, 7, -128, -128, -128, -128, 8, 9, 10, 11));
	const __m512i a = _mm512_srlv_epi32(_mm512_shuffle_epi8(head, ia),
					    _mm512_broadcast_i32x4(_mm_setr_epi32(0, 0, 0, 4)));
	const __m512i lo = _mm512_and_si512(
	    a,
	    _mm512_broadcast_i32x4(_mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)));
	const __m512i hi = _mm512_srli_epi32(_mm512_shuffle_epi8(head, ih), 2);
	return _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi8(0x30), 0xf8); /* a | b & c */
}

/* Shuffles of a block's broadcast [s | m] bytes: k4_index[h] (h < 2) to the
 * int16 scales of the packed sums of chunk pairs 2h and 2h + 1 (words 0-3
 * of a 128-bit lane from pair 2h: chunk 4h in lanes 0, 1, chunk 4h + 1 in
 * lanes 2, 3; words 4-7 from pair 2h + 1: chunks 4h + 2, 4h + 3);
 * k4_index[2 + o] to int16 (m_2L, m_2L+1) in dword o of 128-bit lane L,
 * zeros elsewhere (output o's mins). */
#define Z     -128
#define S4(a) a, Z, a, Z, a, Z, a, Z
#define SCALES(k)                                                                                  \
	{                                                                                          \
		S4(4 * k), S4(4 * k + 2), S4(4 * k), S4(4 * k + 2), S4(4 * k + 1), S4(4 * k + 3),  \
		    S4(4 * k + 1), S4(4 * k + 3)                                                   \
	}
#define M4(o, l)                                                                                   \
	(o) == 0 ? 8 + 2 * (l) : Z, Z, (o) == 0 ? 9 + 2 * (l) : Z, Z, (o) == 1 ? 8 + 2 * (l) : Z,  \
	    Z, (o) == 1 ? 9 + 2 * (l) : Z, Z, (o) == 2 ? 8 + 2 * (l) : Z, Z,                       \
	    (o) == 2 ? 9 + 2 * (l) : Z, Z, (o) == 3 ? 8 + 2 * (l) : Z, Z,                          \
	    (o) == 3 ? 9 + 2 * (l) : Z, Z
#define MINS(o)                                                                                    \
	{                                                                                          \
		M4(o, 0), M4(o, 1), M4(o, 2), M4(o, 3)                                             \
	}
static const int8_t k4_index[6][64]
    __attribute__((aligned(64))) = {SCALES(0), SCALES(1), MINS(0), MINS(1), MINS(2), MINS(3)};
#undef Z
#undef S4
#undef SCALES
#undef M4
#undef MINS

static ALWAYS_INLINE __m512i k4_shuffle(int i)
{
	return _mm512_load_si512((const void *)k4_index[i]);
}

/* A row's bsums as int16 pairs (bs_2L, bs_2L+1) in every dword of 128-bit
 * lane L, bs_s = bsums[2s] + bsums[2s + 1] (at most 4064). */
static ALWAYS_INLINE __m512i k4_bsum_pairs(const uint8_t *xb)
{
	const __m256i b = _mm256_loadu_si256((const __m256i *)(xb + Q8K_BSUMS));
	const __m256i s = _mm256_madd_epi16(b, _mm256_set1_epi16(1)); /* bs_0..7 */
	const __m256i p = _mm256_packs_epi32(s, s); /* dwords (bs01, bs23, ., ., bs45, bs67, .) */
	const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 4, 4, 4, 4, 5, 5, 5, 5);
	return _mm512_permutexvar_epi32(idx, _mm512_castsi256_si512(p));
}

/* out[r * NC + o] = dot(block row b[o], activation row x + r * xs), nb
 * blocks; pf: bytes from a block to the one to prefetch (0: none). */
static ALWAYS_INLINE void k4_tile(int nr, const uint8_t *const b[NC_MAX], const uint8_t *x,
				  size_t xs, int64_t nb, size_t pf, float *out)
{
	const __m512i m4 = _mm512_set1_epi8(0x0f);
	const __m512i idx_d = _mm512_castsi128_si512(_mm_setr_epi16(0, 8, 16, 24, 1, 9, 17, 25));
	__m256 acc[NR];
	for (int r = 0; r < nr; r++)
		acc[r] = _mm256_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t off = (size_t)ib * Q4K_BYTES;
		const uint8_t *xb = x + (size_t)ib * Q8K_BYTES;
		__m512i bs[NR], mins[NR], isum[NR][NC];
		for (int r = 0; r < nr; r++) {
			bs[r] = k4_bsum_pairs(xb + r * xs);
			mins[r] = _mm512_setzero_si512();
		}
		__m512i head =
		    _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(b[0] + off)));
		head = _mm512_inserti32x4(head, _mm_loadu_si128((const __m128i *)(b[1] + off)), 1);
		head = _mm512_inserti32x4(head, _mm_loadu_si128((const __m128i *)(b[2] + off)), 2);
		head = _mm512_inserti32x4(head, _mm_loadu_si128((const __m128i *)(b[3] + off)), 3);
		const __m512i sm = k4_scales(head);
#pragma GCC unroll 4
		for (int o = 0; o < NC; o++) {
			const uint8_t *bo = b[o] + off;
			if (pf)
				prefetch_block(bo + pf, Q4K_BYTES);
			/* lane o of sm in every lane (an index vector: o is not a
			 * constant for every compiler) */
			const __m512i so = _mm512_permutexvar_epi32(
			    _mm512_add_epi32(
				_mm512_set_epi32(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0),
				_mm512_set1_epi32(4 * o)),
			    sm);
			__m512i u[4];
#pragma GCC unroll 4
			for (int k = 0; k < 4; k++) {
				const __m512i q = _mm512_broadcast_i64x4(
				    _mm256_loadu_si256((const __m256i *)(bo + 16 + 32 * k)));
				/* high half: the high nibbles */
				u[k] = _mm512_and_si512(
				    _mm512_mask_srli_epi16(q, 0xffff0000u, q, 4), m4);
			}
#pragma GCC unroll 2
			for (int k = 0; k < 4; k += 2) {
				const __m512i sc = _mm512_shuffle_epi8(so, k4_shuffle(k / 2));
				for (int r = 0; r < nr; r++) {
					const __m512i z = _mm512_setzero_si512();
					const __m512i v0 =
					    _mm512_dpbusd_epi32(z, u[k], x_chunks(xb + r * xs, k));
					const __m512i v1 = _mm512_dpbusd_epi32(
					    z, u[k + 1], x_chunks(xb + r * xs, k + 1));
					const __m512i p = _mm512_packs_epi32(v0, v1);
					isum[r][o] = k == 0
							 ? _mm512_madd_epi16(p, sc)
							 : _mm512_dpwssd_epi32(isum[r][o], p, sc);
				}
			}
			const __m512i mv = _mm512_shuffle_epi8(so, k4_shuffle(2 + o));
			for (int r = 0; r < nr; r++)
				mins[r] = _mm512_dpwssd_epi32(mins[r], mv, bs[r]);
		}
		/* [d_0..3 | dmin_0..3] */
		const __m256 dw =
		    _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi16(idx_d, head)));
		for (int r = 0; r < nr; r++) {
			const __m512i t = sum4_by_lane(isum[r]); /* lane L: isum partials */
			/* [t0 + t1, t2 + t3, m0 + m1, m2 + m3] (128-bit lanes) */
			const __m512i u = _mm512_add_epi32(
			    _mm512_shuffle_i64x2(t, mins[r], _MM_SHUFFLE(2, 0, 2, 0)),
			    _mm512_shuffle_i64x2(t, mins[r], _MM_SHUFFLE(3, 1, 3, 1)));
			const __m512i v = _mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(3, 1, 2, 0));
			const __m256i im = _mm256_add_epi32(_mm512_castsi512_si256(v),
							    _mm512_extracti64x4_epi64(v, 1));
			float dxf;
			memcpy(&dxf, xb + r * xs, sizeof(dxf));
			acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(im),
						 _mm256_mul_ps(dw, _mm256_set1_ps(dxf)), acc[r]);
		}
	}
	for (int r = 0; r < nr; r++)
		_mm_storeu_ps(out + r * NC, _mm_sub_ps(_mm256_castps256_ps128(acc[r]),
						       _mm256_extractf128_ps(acc[r], 1)));
}

/* ------------------------------------------------------------------ Q6_K */

/* Chunks of a Q6_K block as codes q + 32 (0..63) in bytes: from 64 bytes of
 * ql and qh2, 32 bytes of qh broadcast and shifted left by 2 in the low 256
 * bits; high = 0: the low nibbles and qh bits 0-1 | 2-3 (to bits 4-5 by a
 * further shift left by 2), 1: the high nibbles and bits 4-5 | 6-7 (a shift
 * right by 2). */
static ALWAYS_INLINE __m512i k6_chunks(__m512i ql, __m512i qh2, int high)
{
	const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
	__m512i lo, hi;
	if (!high) {
		lo = _mm512_and_si512(ql, m4);
		hi = _mm512_slli_epi16(qh2, 2);
	} else {
		lo = _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4);
		hi = _mm512_srli_epi16(qh2, 2);
	}
	return _mm512_ternarylogic_epi32(lo, hi, m30, 0xf8); /* a | b & c */
}

/* vpermw indices of a Q6_K block's int16 scales for chunks 2k, 2k + 1:
 * groups 4k .. 4k + 3, eight words each */
#define G8(g) g, g, g, g, g, g, g, g
#define K6(k)                                                                                      \
	{                                                                                          \
		G8(4 * k), G8(4 * k + 1), G8(4 * k + 2), G8(4 * k + 3)                             \
	}
static const int16_t k6_index[4][32] __attribute__((aligned(64))) = {K6(0), K6(1), K6(2), K6(3)};
#undef G8
#undef K6

/* ggml's hsum_float_8 of both 256-bit halves of v: the high 128 bits plus
 * the low ones, then lanes 0 + 2 and 1 + 3, then their sum. */
static ALWAYS_INLINE void hsum8_halves(__m512 v, float out[2])
{
	const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)), v);
	const __m512 b = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, _MM_SHUFFLE(3, 2, 3, 2)));
	const __m512 c = _mm512_add_ps(b, _mm512_movehdup_ps(b));
	out[0] = _mm512_cvtss_f32(c);
	out[1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(c, 2));
}

static ALWAYS_INLINE void k6_tile(int nr, int nct, const uint8_t *const b[NC_MAX], const uint8_t *x,
				  size_t xs, int64_t nb, size_t pf, float *out)
{
	__m512 acc[NR][NC_MAX / 2];
	for (int r = 0; r < nr; r++)
		for (int p = 0; p < nct / 2; p++)
			acc[r][p] = _mm512_setzero_ps();
	for (int64_t ib = 0; ib < nb; ib++) {
		const size_t off = (size_t)ib * Q6K_BYTES;
		const uint8_t *xb = x + (size_t)ib * Q8K_BYTES;
		__m512i nbs[NR], lanes[NR][NC_MAX];
		/* -16 bsums in both halves (|bsums| <= 16 * 127: fits int16); each
		 * half gives half the code offset's -32 s_g bsums_g */
		for (int r = 0; r < nr; r++) {
			const __m256i bs16 = _mm256_mullo_epi16(
			    _mm256_loadu_si256((const __m256i *)(xb + r * xs + Q8K_BSUMS)),
			    _mm256_set1_epi16(-16));
			nbs[r] = _mm512_broadcast_i64x4(bs16);
		}
#pragma GCC unroll 8
		for (int o = 0; o < nct; o++) {
			const uint8_t *bo = b[o] + off;
			if (pf)
				prefetch_block(bo + pf, Q6K_BYTES);
			/* the block in memory order: ql, qh, the scales */
			const __m512i ql[2] = {_mm512_loadu_si512((const void *)bo),
					       _mm512_loadu_si512((const void *)(bo + 64))};
			__m512i u[4];
#pragma GCC unroll 2
			for (int h = 0; h < 2; h++) {
				const __m512i qh = _mm512_broadcast_i64x4(
				    _mm256_loadu_si256((const __m256i *)(bo + 128 + 32 * h)));
				const __m512i qh2 = _mm512_mask_slli_epi16(qh, 0xffffu, qh, 2);
				u[2 * h] = k6_chunks(ql[h], qh2, 0);
				u[2 * h + 1] = k6_chunks(ql[h], qh2, 1);
			}
			/* int16 scales [s_0..15 | s_0..15] */
			const __m512i sc = _mm512_cvtepi8_epi16(_mm256_broadcastsi128_si256(
			    _mm_loadu_si128((const __m128i *)(bo + 192))));
#pragma GCC unroll 4
			for (int k = 0; k < 4; k++) {
				const __m512i s = _mm512_permutexvar_epi16(
				    _mm512_load_si512((const void *)k6_index[k]), sc);
				for (int r = 0; r < nr; r++) {
					const __m512i p =
					    _mm512_maddubs_epi16(u[k], x_chunks(xb + r * xs, k));
					lanes[r][o] = k == 0
							  ? _mm512_madd_epi16(p, s)
							  : _mm512_dpwssd_epi32(lanes[r][o], p, s);
				}
			}
			for (int r = 0; r < nr; r++)
				lanes[r][o] = _mm512_dpwssd_epi32(lanes[r][o], sc, nbs[r]);
		}
		uint64_t dh[NC_MAX / 4] = {0};
#pragma GCC unroll 8
		for (int o = 0; o < nct; o++)
			dh[o / 4] |= (uint64_t)kern_load_u16(b[o] + off + 208) << (16 * (o % 4));
		const __m512 dw = _mm512_castps256_ps512(
		    _mm256_cvtph_ps(_mm_set_epi64x((long long)dh[1], (long long)dh[0])));
		for (int r = 0; r < nr; r++) {
			float dxf;
			memcpy(&dxf, xb + r * xs, sizeof(dxf));
			const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(dxf));
#pragma GCC unroll 4
			for (int p = 0; p < nct / 2; p++) {
				const __m512i a = lanes[r][2 * p], c = lanes[r][2 * p + 1];
				const __m512i l = _mm512_add_epi32(
				    _mm512_shuffle_i64x2(a, c, _MM_SHUFFLE(1, 0, 1, 0)),
				    _mm512_shuffle_i64x2(a, c, _MM_SHUFFLE(3, 2, 3, 2)));
				const __m512i di = _mm512_inserti64x4(
				    _mm512_set1_epi32(2 * p), _mm256_set1_epi32(2 * p + 1), 1);
				acc[r][p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(di, d),
							    _mm512_cvtepi32_ps(l), acc[r][p]);
			}
		}
	}
	for (int r = 0; r < nr; r++)
		for (int p = 0; p < nct / 2; p++)
			hsum8_halves(acc[r][p], out + r * nct + 2 * p);
}

/* ---------------------------------------------------------------- driver */

typedef void (*tile_fn)(const uint8_t *const b[NC_MAX], const uint8_t *x, size_t xs, int64_t nb,
			size_t pf, float *out);

#define TILE_DEF(name, fn, ...)                                                                    \
	static void name(const uint8_t *const b[NC_MAX], const uint8_t *x, size_t xs, int64_t nb,  \
			 size_t pf, float *out)                                                    \
	{                                                                                          \
		fn(__VA_ARGS__, b, x, xs, nb, pf, out);                                            \
	}
TILE_DEF(k4_tile_1, k4_tile, 1)
TILE_DEF(k4_tile_2, k4_tile, 2)
TILE_DEF(k6_tile_1, k6_tile, 1, 8)
TILE_DEF(k6_tile_2, k6_tile, 2, 4)

/* A type's tile functions by rows - 1, and their widths (outputs per tile):
 * Q6_K's one-row tile of eight outputs keeps more of the weights in flight
 * from DRAM (measured: as fast as the AVX2 kernel, 10 % slower with four);
 * with two rows its accumulators would not fit in the registers. */
struct tiles {
	tile_fn f[NR];
	int width[NR];
};

int kern_kq_decode_avx512(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			  const void *x, size_t x_stride, int64_t n_rows, float *y,
			  int64_t y_stride, int64_t gemm_rows)
{
	static const struct tiles k4 = {{k4_tile_1, k4_tile_2}, {NC, NC}},
				  k6 = {{k6_tile_1, k6_tile_2}, {NC_MAX, NC}};
	const uint8_t *wb = w, *xb = x;
	if (n_rows < 1 || n_rows > NR || gemm_rows > 0 || n_in < KERN_QK_K || o1 <= o0)
		return 0;
	if (type != KERN_Q4_K && type != KERN_Q6_K)
		return 0;
	const struct tiles *t = type == KERN_Q4_K ? &k4 : &k6;
	const tile_fn f = t->f[n_rows == 2];
	const int tw = t->width[n_rows == 2];
	const size_t w_row = kern_row_bytes(type, n_in);
	const int64_t nb = n_in / KERN_QK_K;
	for (int64_t o = o0; o < o1; o += tw) {
		/* a short last tile repeats its last output; those lanes are dropped */
		const int nc = o1 - o < tw ? (int)(o1 - o) : tw;
		const uint8_t *b[NC_MAX];
		for (int c = 0; c < NC_MAX; c++)
			b[c] = wb + (size_t)(o + (c < nc ? c : nc - 1)) * w_row;
		/* the next tile's blocks, while one follows */
		const size_t pf = o + 2 * tw <= o1 ? (size_t)tw * w_row : 0;
		float out[NR * NC_MAX];
		f(b, xb, x_stride, nb, pf, out);
		for (int64_t r = 0; r < n_rows; r++)
			for (int c = 0; c < nc; c++)
				y[r * y_stride + o + c] = out[r * tw + c];
	}
	return 1;
}
