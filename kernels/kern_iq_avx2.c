/* kern_iq_avx2: AVX2 kernels of the grid types (IQ1_S, IQ1_M, IQ2_XXS,
 * IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) against Q8_K activations; block layouts, the
 * decoded form and the exact operation sequence in kern_iq_ref.c.
 *
 * A 32-value sub-block decodes into three registers: g, the 32 unsigned
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

/* scales: ls0 for values 0-15, ls1 for 16-31 */
static ALWAYS_INLINE __m256i scales2(int s0, int s1)
{
	return _mm256_setr_m128i(_mm_set1_epi16((short)(2 * s0 + 1)),
				 _mm_set1_epi16((short)(2 * s1 + 1)));
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

/* 4 seven-bit sign indices (bits 0-27 of a) -> 32 sign operands */
static ALWAYS_INLINE __m256i signs_from_index(uint32_t a)
{
	return _mm256_setr_epi64x(
	    (long long)kern_iq_sign8[a & 127], (long long)kern_iq_sign8[(a >> 7) & 127],
	    (long long)kern_iq_sign8[(a >> 14) & 127], (long long)kern_iq_sign8[(a >> 21) & 127]);
}

static ALWAYS_INLINE __m256i grid64x4(const uint64_t *grid, unsigned i0, unsigned i1, unsigned i2,
				      unsigned i3)
{
	return _mm256_setr_epi64x((long long)grid[i0], (long long)grid[i1], (long long)grid[i2],
				  (long long)grid[i3]);
}

/* IQ1: int8 grid rows r -> w = 8 * r + delta (delta bytes +-1) */
static ALWAYS_INLINE struct sub iq1_sub(__m256i r, __m256i delta, __m256i sc)
{
	struct sub s;
	__m256i w = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), r), delta);
	s.g = _mm256_abs_epi8(w);
	s.sg = w;
	s.sc = sc;
	return s;
}

/* Sub-block ib of a block of the given type. */
static ALWAYS_INLINE struct sub decode_sub(uint32_t type, const uint8_t *b, int ib)
{
	struct sub s;
	switch (type) {
	case KERN_IQ2_XXS: {
		const uint8_t *p = b + 2 + 8 * ib;
		uint32_t a = ld32(p + 4);
		s.g = grid64x4(kern_iq2xxs_grid, p[0], p[1], p[2], p[3]);
		s.sg = signs_from_index(a);
		s.sc = _mm256_set1_epi16((short)(2 * (a >> 28) + 1));
		break;
	}
	case KERN_IQ2_XS: {
		const uint8_t *p = b + 2 + 8 * ib;
		uint16_t q0 = kern_load_u16(p), q1 = kern_load_u16(p + 2);
		uint16_t q2 = kern_load_u16(p + 4), q3 = kern_load_u16(p + 6);
		s.g = grid64x4(kern_iq2xs_grid, q0 & 511, q1 & 511, q2 & 511, q3 & 511);
		s.sg = _mm256_setr_epi64x(
		    (long long)kern_iq_sign8[q0 >> 9], (long long)kern_iq_sign8[q1 >> 9],
		    (long long)kern_iq_sign8[q2 >> 9], (long long)kern_iq_sign8[q3 >> 9]);
		s.sc = scales2(b[66 + ib] & 15, b[66 + ib] >> 4);
		break;
	}
	case KERN_IQ2_S: {
		const uint8_t *p = b + 2 + 4 * ib;
		unsigned qh = b[66 + ib];
		s.g = grid64x4(kern_iq2s_grid, p[0] | (qh << 8 & 0x300), p[1] | (qh << 6 & 0x300),
			       p[2] | (qh << 4 & 0x300), p[3] | (qh << 2 & 0x300));
		s.sg = signs_from_bytes(ld32(b + 34 + 4 * ib));
		s.sc = scales2(b[74 + ib] & 15, b[74 + ib] >> 4);
		break;
	}
	case KERN_IQ3_XXS: {
		const uint8_t *p = b + 2 + 8 * ib;
		uint32_t a = ld32(b + 66 + 4 * ib);
		s.g = _mm256_setr_epi32((int)kern_iq3xxs_grid[p[0]], (int)kern_iq3xxs_grid[p[1]],
					(int)kern_iq3xxs_grid[p[2]], (int)kern_iq3xxs_grid[p[3]],
					(int)kern_iq3xxs_grid[p[4]], (int)kern_iq3xxs_grid[p[5]],
					(int)kern_iq3xxs_grid[p[6]], (int)kern_iq3xxs_grid[p[7]]);
		s.sg = signs_from_index(a);
		s.sc = _mm256_set1_epi16((short)(2 * (a >> 28) + 1));
		break;
	}
	case KERN_IQ3_S: {
		const uint8_t *p = b + 2 + 8 * ib;
		unsigned qh = b[66 + ib];
		s.g = _mm256_setr_epi32((int)kern_iq3s_grid[p[0] | (qh << 8 & 256)],
					(int)kern_iq3s_grid[p[1] | (qh << 7 & 256)],
					(int)kern_iq3s_grid[p[2] | (qh << 6 & 256)],
					(int)kern_iq3s_grid[p[3] | (qh << 5 & 256)],
					(int)kern_iq3s_grid[p[4] | (qh << 4 & 256)],
					(int)kern_iq3s_grid[p[5] | (qh << 3 & 256)],
					(int)kern_iq3s_grid[p[6] | (qh << 2 & 256)],
					(int)kern_iq3s_grid[p[7] | (qh << 1 & 256)]);
		s.sg = signs_from_bytes(ld32(b + 74 + 4 * ib));
		uint8_t sc = b[106 + ib / 2];
		s.sc = _mm256_set1_epi16((short)(2 * (ib % 2 ? sc >> 4 : sc & 15) + 1));
		break;
	}
	case KERN_IQ1_S: {
		const uint8_t *p = b + 2 + 4 * ib;
		unsigned qh = kern_load_u16(b + 34 + 2 * ib);
		__m256i r =
		    grid64x4(kern_iq1s_grid, p[0] | (qh << 8 & 0x700), p[1] | (qh << 5 & 0x700),
			     p[2] | (qh << 2 & 0x700), p[3] | (qh >> 1 & 0x700));
		__m256i delta = _mm256_set1_epi8(qh & 0x8000 ? -1 : 1);
		s = iq1_sub(r, delta, _mm256_set1_epi16((short)(2 * ((qh >> 12) & 7) + 1)));
		break;
	}
	default: { /* IQ1_M */
		const uint8_t *p = b + 4 * ib;
		unsigned h0 = b[32 + 2 * ib], h1 = b[33 + 2 * ib];
		__m256i r =
		    grid64x4(kern_iq1s_grid, p[0] | (h0 << 8 & 0x700), p[1] | (h0 << 4 & 0x700),
			     p[2] | (h1 << 8 & 0x700), p[3] | (h1 << 4 & 0x700));
		/* delta bytes: bit 3 of each group's nibble set -> -1, else +1 */
		const __m256i nib = _mm256_setr_epi64x(0x08, 0x80, 0x08, 0x80);
		__m256i hv = _mm256_setr_epi64x(h0, h0, h1, h1);
		__m256i neg = _mm256_cmpeq_epi64(_mm256_and_si256(hv, nib), nib);
		__m256i delta = _mm256_or_si256(neg, _mm256_set1_epi8(1));
		unsigned sc = kern_load_u16(b + 48 + 2 * (ib / 2)) >> (6 * (ib % 2));
		s = iq1_sub(r, delta, scales2(sc & 7, (sc >> 3) & 7));
		break;
	}
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
			for (int r = 0; r < nr; r++) {
				q[r] =
				    ((const struct kern_block_q8_k *)(x + (size_t)r * xs) + ib)->qs;
				sum[r] = _mm256_setzero_si256();
			}
#pragma GCC unroll 8
			for (int k = 0; k < 8; k++) {
				struct sub s = decode_sub(type, b, k);
				for (int r = 0; r < nr; r++) {
					__m256i v =
					    _mm256_loadu_si256((const __m256i *)(q[r] + 32 * k));
					__m256i p =
					    _mm256_maddubs_epi16(s.g, _mm256_sign_epi8(v, s.sg));
					sum[r] =
					    _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, s.sc));
				}
			}
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
		for (int k = 0; k < 8; k++) {
			struct sub sb = decode_sub(type, b, k);
			__m256i wv = _mm256_sign_epi8(sb.g, sb.sg);
			for (int h = 0; h < 2; h++) {
				/* the 16 values of one scale */
				int ls = _mm256_extract_epi16(sb.sc, 0);
				if (h)
					ls = _mm256_extract_epi16(sb.sc, 8);
				const int sk = (ls - 1) / 2;
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
