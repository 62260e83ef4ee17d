/* attn_simd: the AVX2+FMA+F16C forms of attention's inner loops (attn.c),
 * each computing lane for lane what attn.c's scalar loop computes, and
 * AVX-512 forms of the tiled kernel's scores and values for several heads at
 * once and of the one-row kernel's F16 dot and accumulation (taken when
 * kern_isa_now() allows); where they cannot be built they
 * are stubs and attn_simd_ok() is 0.  tests/test_attn.c compares every
 * level with the scalar loops bit for bit (kern_force_ref, kern_limit_isa). */
#include "attn_internal.h"
#include "attn.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../../kernels/kern.h"

/* AVX2+FMA+F16C forms of the two inner loops of the tiled kernel; lane i
 * computes exactly what the scalar loop computes for element i. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The AVX-512 forms unless the CPU lacks them or a lower level is asked for */
static int attn_simd_512(void)
{
	return kern_isa_now() >= KERN_ISA_AVX512;
}

/* AVX-512 forms of the one-row kernel's loops: 16 lanes where the AVX2 forms
 * below have 8, the same operations lane by lane. */
__attribute__((target("avx512f"))) static void
attn_simd512_dot16(const float *q16, const uint16_t *k, int np, float *out)
{
	__m512 a[4];
	for (int j = 0; j < 4; j++)
		a[j] = _mm512_setzero_ps();
	for (int i = 0; i < np; i += 64)
#pragma GCC unroll 4
		for (int j = 0; j < 4; j++) {
			const __m512 kv =
			    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i + 16 * j)));
			a[j] = _mm512_add_ps(a[j],
					     _mm512_mul_ps(_mm512_loadu_ps(q16 + i + 16 * j), kv));
		}
	/* lanes 0-7: (a0 + a4) + (a2 + a6) of the AVX2 form's eight, 8-15 likewise */
	_mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3])));
}

__attribute__((target("avx512f"))) static int attn_simd512_scale_f16(float *acc, float ms, int n)
{
	const __m512 m = _mm512_set1_ps(ms);
	int d = 0;
	for (; d + 16 <= n; d += 16)
		_mm512_storeu_ps(acc + d, _mm512_cvtph_ps(_mm512_cvtps_ph(
					      _mm512_mul_ps(_mm512_loadu_ps(acc + d), m),
					      _MM_FROUND_TO_NEAREST_INT)));
	return d;
}

__attribute__((target("avx512f"))) static int attn_simd512_fma_f16(float *acc, const uint16_t *v,
								   float w, int n)
{
	const __m512 wv = _mm512_set1_ps(w);
	int d = 0;
	for (; d + 16 <= n; d += 16) {
		const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + d)));
		_mm512_storeu_ps(acc + d, _mm512_cvtph_ps(_mm512_cvtps_ph(
					      _mm512_fmadd_ps(x, wv, _mm512_loadu_ps(acc + d)),
					      _MM_FROUND_TO_NEAREST_INT)));
	}
	return d;
}
__attribute__((target("avx2,fma,f16c"))) void attn_simd_f16_row(const uint16_t *src, float *dst,
								int n)
{
	int d = 0;
	for (; d + 8 <= n; d += 8)
		_mm256_storeu_ps(dst + d,
				 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + d))));
	for (; d < n; d++)
		dst[d] = _cvtsh_ss(src[d]);
}

/* acc[d] = fma(w, v[d], acc[d]) for d < n, v in F16 */
__attribute__((target("avx2,fma,f16c"))) void attn_simd_axpy_f16(float w, const uint16_t *v,
								 float *acc, int n)
{
	const __m256 wv = _mm256_set1_ps(w);
	int d = 0;
	for (; d + 8 <= n; d += 8) {
		__m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + d)));
		_mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(acc + d)));
	}
	for (; d < n; d++)
		acc[d] = fmaf(w, _cvtsh_ss(v[d]), acc[d]);
}

/* sv[i] = fma(q, row[i], sv[i]) for i < n */
__attribute__((target("avx2,fma"))) void attn_simd_axpy(float q, const float *row, float *sv, int n)
{
	const __m256 qv = _mm256_set1_ps(q);
	int i = 0;
	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(
		    sv + i, _mm256_fmadd_ps(qv, _mm256_loadu_ps(row + i), _mm256_loadu_ps(sv + i)));
	for (; i < n; i++)
		sv[i] = fmaf(q, row[i], sv[i]);
}

/* The scores of a key tile: sv[i] = the FMA chain over d < dk of
 * q[d] * kt[d * ATTN_TILE_KV + i] in d order, for i < nv; what attn_simd_axpy
 * gives over d from sv = 0, with a full tile's 64 sums held in registers. */
__attribute__((target("avx2,fma"))) void attn_simd_tile_scores(const float *q, const float *kt,
							       int dk, int nv, float *sv)
{
	if (nv != ATTN_TILE_KV) {
		for (int i = 0; i < nv; i++)
			sv[i] = 0.0f;
		for (int d = 0; d < dk; d++)
			attn_simd_axpy(q[d], kt + (size_t)d * ATTN_TILE_KV, sv, nv);
		return;
	}
	__m256 a[ATTN_TILE_KV / 8];
	for (int j = 0; j < ATTN_TILE_KV / 8; j++)
		a[j] = _mm256_setzero_ps();
	for (int d = 0; d < dk; d++) {
		const __m256 qv = _mm256_set1_ps(q[d]);
		const float *row = kt + (size_t)d * ATTN_TILE_KV;
		for (int j = 0; j < ATTN_TILE_KV / 8; j++)
			a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row + 8 * j), a[j]);
	}
	for (int j = 0; j < ATTN_TILE_KV / 8; j++)
		_mm256_storeu_ps(sv + 8 * j, a[j]);
}

/* The 4 x 16-lane accumulation of attn_dot_f16 over np values (a multiple of
 * 64): acc[j][l] = acc[j][l] + q16[i + 16 j + l] * k[i + 16 j + l], then
 * acc[0] + acc[2], acc[1] + acc[3], and their sum, into out[16]. */
__attribute__((target("avx2,fma,f16c"))) void attn_simd_dot16(const float *q16, const uint16_t *k,
							      int np, float *out)
{
	if (attn_simd_512()) {
		attn_simd512_dot16(q16, k, np, out);
		return;
	}
	__m256 a[8];
	for (int j = 0; j < 8; j++)
		a[j] = _mm256_setzero_ps();
	for (int i = 0; i < np; i += 64)
		for (int j = 0; j < 8; j++) {
			__m256 kv =
			    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 8 * j)));
			a[j] = _mm256_add_ps(a[j],
					     _mm256_mul_ps(_mm256_loadu_ps(q16 + i + 8 * j), kv));
		}
	for (int h = 0; h < 2; h++) {
		a[h] = _mm256_add_ps(a[h], a[4 + h]);
		a[2 + h] = _mm256_add_ps(a[2 + h], a[6 + h]);
		_mm256_storeu_ps(out + 8 * h, _mm256_add_ps(a[h], a[2 + h]));
	}
}

/* acc[d] = f16(acc[d] * ms) for d < n */
__attribute__((target("avx2,fma,f16c"))) void attn_simd_scale_f16(float *acc, float ms, int n)
{
	const __m256 m = _mm256_set1_ps(ms);
	int d = attn_simd_512() ? attn_simd512_scale_f16(acc, ms, n) : 0;
	for (; d + 8 <= n; d += 8)
		_mm256_storeu_ps(acc + d, _mm256_cvtph_ps(_mm256_cvtps_ph(
					      _mm256_mul_ps(_mm256_loadu_ps(acc + d), m),
					      _MM_FROUND_TO_NEAREST_INT)));
	for (; d < n; d++)
		acc[d] = _cvtsh_ss(_cvtss_sh(acc[d] * ms, 0));
}

/* acc[d] = f16(fma(v[d], w, acc[d])) for d < n, v in F16 */
__attribute__((target("avx2,fma,f16c"))) void attn_simd_fma_f16(float *acc, const uint16_t *v,
								float w, int n)
{
	const __m256 wv = _mm256_set1_ps(w);
	int d = attn_simd_512() ? attn_simd512_fma_f16(acc, v, w, n) : 0;
	for (; d + 8 <= n; d += 8) {
		__m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + d)));
		_mm256_storeu_ps(acc + d, _mm256_cvtph_ps(_mm256_cvtps_ph(
					      _mm256_fmadd_ps(x, wv, _mm256_loadu_ps(acc + d)),
					      _MM_FROUND_TO_NEAREST_INT)));
	}
	for (; d < n; d++)
		acc[d] = _cvtsh_ss(_cvtss_sh(fmaf(_cvtsh_ss(v[d]), w, acc[d]), 0));
}

/* kt[d][u] = vt[u][d] for u < nv8 (a multiple of 8), d < dim (a multiple
 * of 8): 8 x 8 blocks transposed in registers. */
__attribute__((target("avx2,fma"))) void attn_simd_transpose(const float *vt, int nv8, int dim,
							     float *kt, int ld)
{
	for (int u = 0; u < nv8; u += 8)
		for (int d = 0; d < dim; d += 8) {
			__m256 r[8], t[8];
			for (int i = 0; i < 8; i++)
				r[i] = _mm256_loadu_ps(vt + (size_t)(u + i) * (size_t)dim + d);
			for (int i = 0; i < 8; i += 2) {
				t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
				t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
			}
			for (int i = 0; i < 8; i += 4) {
				r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
				r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
				r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
				r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
			}
			/* r[0..3]: rows 0-3 of columns (0,1,4,5 | 2,3,6,7) ... */
			const int src[8] = {0, 1, 2, 3, 0, 1, 2, 3};
			for (int i = 0; i < 8; i++) {
				const __m256 lo = r[src[i]], hi = r[4 + src[i]];
				t[i] = i < 4 ? _mm256_permute2f128_ps(lo, hi, 0x20)
					     : _mm256_permute2f128_ps(lo, hi, 0x31);
			}
			for (int i = 0; i < 8; i++)
				_mm256_storeu_ps(kt + (size_t)(d + i) * (size_t)ld + u, t[i]);
		}
}

/* AVX-512 forms of attn_simd_scores and attn_simd_values: up to four heads
 * at a time against up to 64 lanes (four zmm registers), so a loaded key or
 * value serves every head of the block; each lane's FMA chain is the AVX2
 * one, so the results are the same bits.  Lanes past the count are masked. */
#define ATTN_HB 4 /* heads per register block */

__attribute__((target("avx512f"), always_inline)) static inline void
attn_s512_block(const float *kt, int ld, int dim, const float *q, size_t qs, float *sv, int svs,
		const int nh, const int nc, __mmask16 last)
{
	__m512 a[ATTN_HB][4], k[4];
#pragma GCC unroll 4
	for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
		for (int c = 0; c < nc; c++)
			a[h][c] = _mm512_setzero_ps();
	for (int d = 0; d < dim; d++) {
		const float *row = kt + (size_t)d * (size_t)ld;
#pragma GCC unroll 4
		for (int c = 0; c < nc; c++)
			k[c] = c == nc - 1 ? _mm512_maskz_loadu_ps(last, row + 16 * c)
					   : _mm512_loadu_ps(row + 16 * c);
#pragma GCC unroll 4
		for (int h = 0; h < nh; h++) {
			const __m512 qb = _mm512_set1_ps(q[(size_t)h * qs + (size_t)d]);
#pragma GCC unroll 4
			for (int c = 0; c < nc; c++)
				a[h][c] = _mm512_fmadd_ps(qb, k[c], a[h][c]);
		}
	}
#pragma GCC unroll 4
	for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
		for (int c = 0; c < nc; c++)
			_mm512_mask_storeu_ps(sv + (size_t)h * (size_t)svs + 16 * c,
					      c == nc - 1 ? last : (__mmask16)0xffff, a[h][c]);
}

__attribute__((target("avx512f"), always_inline)) static inline void
attn_v512_block(const float *vt, int nv, int dim, int d0, const float *w, int ws, float *acc,
		const int nh, const int nc, __mmask16 last)
{
	__m512 a[ATTN_HB][4], v[4];
#pragma GCC unroll 4
	for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
		for (int c = 0; c < nc; c++)
			a[h][c] =
			    _mm512_maskz_loadu_ps(c == nc - 1 ? last : (__mmask16)0xffff,
						  acc + (size_t)h * (size_t)dim + d0 + 16 * c);
	for (int u = 0; u < nv; u++) {
		const float *vr = vt + (size_t)u * (size_t)dim + d0;
#pragma GCC unroll 4
		for (int c = 0; c < nc; c++)
			v[c] = c == nc - 1 ? _mm512_maskz_loadu_ps(last, vr + 16 * c)
					   : _mm512_loadu_ps(vr + 16 * c);
#pragma GCC unroll 4
		for (int h = 0; h < nh; h++) {
			const __m512 wb = _mm512_set1_ps(w[(size_t)h * (size_t)ws + (size_t)u]);
#pragma GCC unroll 4
			for (int c = 0; c < nc; c++)
				a[h][c] = _mm512_fmadd_ps(wb, v[c], a[h][c]);
		}
	}
#pragma GCC unroll 4
	for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
		for (int c = 0; c < nc; c++)
			_mm512_mask_storeu_ps(acc + (size_t)h * (size_t)dim + d0 + 16 * c,
					      c == nc - 1 ? last : (__mmask16)0xffff, a[h][c]);
}

/* The block for nh (1..ATTN_HB) heads and nc (1..4) vectors, with constant
 * counts so that the accumulators stay in registers. */
#define ATTN_512_CASES(CALL)                                                                       \
	switch ((nh - 1) * 4 + nc - 1) {                                                           \
	case 0: CALL(1, 1); break;                                                                 \
	case 1: CALL(1, 2); break;                                                                 \
	case 2: CALL(1, 3); break;                                                                 \
	case 3: CALL(1, 4); break;                                                                 \
	case 4: CALL(2, 1); break;                                                                 \
	case 5: CALL(2, 2); break;                                                                 \
	case 6: CALL(2, 3); break;                                                                 \
	case 7: CALL(2, 4); break;                                                                 \
	case 8: CALL(3, 1); break;                                                                 \
	case 9: CALL(3, 2); break;                                                                 \
	case 10: CALL(3, 3); break;                                                                \
	case 11: CALL(3, 4); break;                                                                \
	case 12: CALL(4, 1); break;                                                                \
	case 13: CALL(4, 2); break;                                                                \
	case 14: CALL(4, 3); break;                                                                \
	default: CALL(4, 4); break;                                                                \
	}

static inline __mmask16 attn_512_mask(int n)
{
	return (__mmask16)((1u << n) - 1u);
}

__attribute__((target("avx512f"))) static void attn_simd512_scores(const float *kt, int ld, int dim,
								   int nv, const float *q,
								   size_t qs, int nh_all, float *sv,
								   int svs)
{
	const int nc = (nv + 15) / 16;
	const __mmask16 last = attn_512_mask(nv - 16 * (nc - 1));
	for (int h0 = 0; h0 < nh_all; h0 += ATTN_HB) {
		const int nh = nh_all - h0 < ATTN_HB ? nh_all - h0 : ATTN_HB;
		const float *qh = q + (size_t)h0 * qs;
		float *s = sv + (size_t)h0 * (size_t)svs;
#define ATTN_S512(NH, NC) attn_s512_block(kt, ld, dim, qh, qs, s, svs, NH, NC, last)
		ATTN_512_CASES(ATTN_S512)
#undef ATTN_S512
	}
}

__attribute__((target("avx512f"))) static void attn_simd512_values(const float *vt, int nv, int dim,
								   const float *w, int ws,
								   int nh_all, float *acc)
{
	for (int h0 = 0; h0 < nh_all; h0 += ATTN_HB) {
		const int nh = nh_all - h0 < ATTN_HB ? nh_all - h0 : ATTN_HB;
		const float *wh = w + (size_t)h0 * (size_t)ws;
		float *ah = acc + (size_t)h0 * (size_t)dim;
		for (int d0 = 0; d0 < dim; d0 += 64) {
			const int left = dim - d0 < 64 ? dim - d0 : 64;
			const int nc = (left + 15) / 16;
			const __mmask16 last = attn_512_mask(left - 16 * (nc - 1));
#define ATTN_V512(NH, NC) attn_v512_block(vt, nv, dim, d0, wh, ws, ah, NH, NC, last)
			ATTN_512_CASES(ATTN_V512)
#undef ATTN_V512
		}
	}
}

/* sv[v][l] = fma chain over d < dim of q[d] * kt[d][8 v + l] for v < NV,
 * continuing from sv's values. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
attn_simd_scores_n(const float *kt, int ld, int d0, int d1, const float *q, float *sv,
		   const int nvec)
{
	__m256 a[8];
	for (int v = 0; v < nvec; v++)
		a[v] = _mm256_loadu_ps(sv + 8 * v);
	for (int d = d0; d < d1; d++) {
		const __m256 qb = _mm256_set1_ps(q[d]);
		const float *row = kt + (size_t)d * (size_t)ld;
		for (int v = 0; v < nvec; v++)
			a[v] = _mm256_fmadd_ps(qb, _mm256_loadu_ps(row + 8 * v), a[v]);
	}
	for (int v = 0; v < nvec; v++)
		_mm256_storeu_ps(sv + 8 * v, a[v]);
}

/* Scores of nh heads (q[h] at q + h * qs) against the transposed key tile
 * kt[dim][ld] (nv8 keys, a multiple of 8 up to 64): sv[h][u] = fma chain over
 * d of q[h][d] * k[u][d], d in order (each lane as attn_simd_axpy). */
__attribute__((target("avx2,fma"))) void attn_simd_scores(const float *kt, int ld, int dim, int nv8,
							  const float *q, size_t qs, int nh,
							  float *sv, int svs)
{
	if (attn_simd_512()) {
		attn_simd512_scores(kt, ld, dim, nv8, q, qs, nh, sv, svs);
		return;
	}
	for (int h = 0; h < nh; h++)
		memset(sv + (size_t)h * (size_t)svs, 0, (size_t)nv8 * sizeof(float));
	/* blocks of 64 dimensions: the block of the tile stays in L1 over the heads */
	for (int d0 = 0; d0 < dim; d0 += 64) {
		const int d1 = d0 + 64 < dim ? d0 + 64 : dim;
		for (int h = 0; h < nh; h++) {
			const float *qh = q + (size_t)h * qs;
			float *s = sv + (size_t)h * (size_t)svs;
			switch (nv8 / 8) {
			case 1: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 1); break;
			case 2: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 2); break;
			case 3: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 3); break;
			case 4: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 4); break;
			case 5: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 5); break;
			case 6: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 6); break;
			case 7: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 7); break;
			default: attn_simd_scores_n(kt, ld, d0, d1, qh, s, 8); break;
			}
		}
	}
}

/* acc[h][d] = fma chain over u < nv (in order) of w[h][u] * vt[u][d], for
 * nh heads (acc[h] at acc + h * dim, w[h] at w + h * ws); dim % 8 == 0. */
__attribute__((target("avx2,fma"))) void
attn_simd_values(const float *vt, int nv, int dim, const float *w, int ws, int nh, float *acc)
{
	if (attn_simd_512()) {
		attn_simd512_values(vt, nv, dim, w, ws, nh, acc);
		return;
	}
	int d0 = 0;
	for (; d0 + 32 <= dim; d0 += 32)
		for (int h = 0; h < nh; h++) {
			float *ah = acc + (size_t)h * (size_t)dim + d0;
			const float *wh = w + (size_t)h * (size_t)ws;
			__m256 a0 = _mm256_loadu_ps(ah), a1 = _mm256_loadu_ps(ah + 8);
			__m256 a2 = _mm256_loadu_ps(ah + 16), a3 = _mm256_loadu_ps(ah + 24);
			for (int u = 0; u < nv; u++) {
				const __m256 wb = _mm256_set1_ps(wh[u]);
				const float *vr = vt + (size_t)u * (size_t)dim + d0;
				a0 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vr), a0);
				a1 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vr + 8), a1);
				a2 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vr + 16), a2);
				a3 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vr + 24), a3);
			}
			_mm256_storeu_ps(ah, a0);
			_mm256_storeu_ps(ah + 8, a1);
			_mm256_storeu_ps(ah + 16, a2);
			_mm256_storeu_ps(ah + 24, a3);
		}
	for (; d0 < dim; d0 += 8)
		for (int h = 0; h < nh; h++) {
			float *ah = acc + (size_t)h * (size_t)dim + d0;
			const float *wh = w + (size_t)h * (size_t)ws;
			__m256 a0 = _mm256_loadu_ps(ah);
			for (int u = 0; u < nv; u++)
				a0 = _mm256_fmadd_ps(
				    _mm256_set1_ps(wh[u]),
				    _mm256_loadu_ps(vt + (size_t)u * (size_t)dim + d0), a0);
			_mm256_storeu_ps(ah, a0);
		}
}

/* AVX2 forms unless the CPU lacks them or kern_force_ref(1) asks for the
 * scalar loops (tests compare the two bit for bit) */
int attn_simd_ok(void)
{
	return kern_use_avx2();
}
#else
int attn_simd_ok(void)
{
	return 0;
}
void attn_simd_f16_row(const uint16_t *src, float *dst, int n)
{
	(void)src, (void)dst, (void)n;
}
void attn_simd_axpy_f16(float w, const uint16_t *v, float *acc, int n)
{
	(void)w, (void)v, (void)acc, (void)n;
}
void attn_simd_axpy(float q, const float *row, float *sv, int n)
{
	(void)q, (void)row, (void)sv, (void)n;
}
void attn_simd_dot16(const float *q16, const uint16_t *k, int np, float *out)
{
	(void)q16, (void)k, (void)np, (void)out;
}
void attn_simd_tile_scores(const float *q, const float *kt, int dk, int nv, float *sv)
{
	(void)q, (void)kt, (void)dk, (void)nv, (void)sv;
}
void attn_simd_scale_f16(float *acc, float ms, int n)
{
	(void)acc, (void)ms, (void)n;
}
void attn_simd_fma_f16(float *acc, const uint16_t *v, float w, int n)
{
	(void)acc, (void)v, (void)w, (void)n;
}
void attn_simd_transpose(const float *vt, int nv8, int dim, float *kt, int ld)
{
	(void)vt, (void)nv8, (void)dim, (void)kt, (void)ld;
}
void attn_simd_scores(const float *kt, int ld, int dim, int nv8, const float *q, size_t qs, int nh,
		      float *sv, int svs)
{
	(void)kt, (void)ld, (void)dim, (void)nv8, (void)q, (void)qs, (void)nh, (void)sv, (void)svs;
}
void attn_simd_values(const float *vt, int nv, int dim, const float *w, int ws, int nh, float *acc)
{
	(void)vt, (void)nv, (void)dim, (void)w, (void)ws, (void)nh, (void)acc;
}
#endif
