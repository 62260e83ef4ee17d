/* kern_impl: private helpers shared by kern.c, kern_ref.c and kern_avx2.c.
 *
 * Block structs in GGML's byte layout, the MXFP4 code table, the exact E8M0
 * scale, and the prototypes of the AVX2 implementations.  The *_avx2 functions
 * live in a file compiled with -mavx2 -mfma -mf16c and may only be called
 * after kern_init() found those features. */
#ifndef MOEFLEET_KERN_IMPL_H
#define MOEFLEET_KERN_IMPL_H

#include <stdint.h>
#include <string.h>

#include "kernels/kern.h"

struct kern_block_q4_0 {
	uint16_t d; /* f16 */
	uint8_t qs[KERN_QK / 2];
};

struct kern_block_q8_0 {
	uint16_t d; /* f16 */
	int8_t qs[KERN_QK];
};

struct kern_block_mxfp4 {
	uint8_t e; /* E8M0 */
	uint8_t qs[KERN_QK / 2];
};

_Static_assert(sizeof(struct kern_block_q4_0) == 18, "q4_0 block size");
_Static_assert(sizeof(struct kern_block_q8_0) == 34, "q8_0 block size");
_Static_assert(sizeof(struct kern_block_mxfp4) == 17, "mxfp4 block size");

/* E2M1 codes doubled, as ggml keeps them; scaled by kern_e8m0_half(). */
extern const int8_t kern_mxfp4_values[16];

/* 2^(e-128) exactly (ggml's E8M0_TO_FP32_HALF); e = 0, 1 are subnormals. */
static inline float kern_e8m0_half(uint8_t e)
{
	uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
	float f;
	memcpy(&f, &bits, sizeof(f));
	return f;
}

/* Unaligned little-endian f16 read from a block. */
static inline uint16_t kern_load_u16(const void *p)
{
	uint16_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

/* Q8_0 value from x * id, rounded to nearest even, saturated as
 * _mm256_cvtps_epi32 + packs do (NaN and out-of-range give -128 / clamp). */
int8_t kern_q8_round(float v);

/* Families of block types (kern_type_family): the base types live in
 * kern_ref.c / kern_avx2.c; each further family in its own pair of files,
 * behind the same five entry points, for its own types only.  The family's
 * activation-only type (Q8_1, Q8_K) is converted by its convert functions. */
enum kern_family { KERN_FAM_BASE, KERN_FAM_LEGACY, KERN_FAM_KQ, KERN_FAM_IQ };
int kern_type_family(uint32_t type); /* -1 if unknown */

/* Q4_1, Q5_0, Q5_1, IQ4_NL; Q8_1 activations (kern_legacy_ref.c, kern_legacy_avx2.c) */
/* F32 dots: ggml_vec_dot_f32 (one row) and llamafile's F32 GEMM (several),
 * both in their AVX-512 forms (kern_ref.c) */
float kern_f32_dot_vec_ref(int64_t n, const void *w, const void *x);
float kern_f32_dot_gemm_ref(int64_t n, const void *w, const void *x);
float kern_f32_dot_vec_avx2(int64_t n, const void *w, const void *x);
/* F16: ggml_vec_dot_f16 and llamafile's F16 GEMM, AVX-512 forms */
float kern_f16_dot_vec_ref(int64_t n, const void *w, const void *x);
float kern_f16_dot_gemm_ref(int64_t n, const void *w, const void *x);
float kern_f16_dot_vec_avx2(int64_t n, const void *w, const void *x);
float kern_f16_dot_gemm_avx2(int64_t n, const void *w, const void *x);
float kern_f32_dot_gemm_avx2(int64_t n, const void *w, const void *x);
void kern_swiglu_avx2(float *g, const float *u, int64_t j0, int64_t j1, int64_t n);
/* as llama.cpp multiplies a weight it does not repack; batched: n_rows >= 2 */
float kern_legacy_dot_unpacked_ref(uint32_t type, int64_t n, const void *w, const void *x,
				   int batched);
void kern_legacy_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n);
float kern_legacy_dot_ref(uint32_t type, int64_t n, const void *w, const void *x);
void kern_legacy_convert_ref(enum kern_type act_type, const float *x, void *dst, int64_t n);
void kern_legacy_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n);
float kern_legacy_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x);
void kern_legacy_convert_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n);
void kern_legacy_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			     const void *x, size_t x_stride, int64_t n_rows, float *y,
			     int64_t y_stride);

/* Q2_K..Q6_K, IQ4_XS; Q8_K activations (kern_kq_ref.c, kern_kq_avx2.c) */
void kern_kq_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n);
float kern_kq_dot_ref(uint32_t type, int64_t n, const void *w, const void *x);
float kern_kq_dot_gemm_ref(uint32_t type, int64_t n, const void *w, const void *x);
void kern_kq_convert_ref(enum kern_type act_type, const float *x, void *dst, int64_t n);
void kern_kq_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n);
float kern_kq_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x);
void kern_kq_convert_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n);
/* rows below gemm_rows (a multiple of 4) as kern_kq_dot_gemm_ref, the others
 * as kern_kq_dot_ref */
void kern_kq_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			 const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
			 int64_t gemm_rows);

/* IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S; Q8_K activations
 * (kern_iq_ref.c, kern_iq_avx2.c, grids in kern_iq_grid.c) */
void kern_iq_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n);
float kern_iq_dot_ref(uint32_t type, int64_t n, const void *w, const void *x);
void kern_iq_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n);
float kern_iq_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x);
void kern_iq_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			 const void *x, size_t x_stride, int64_t n_rows, float *y,
			 int64_t y_stride);

/* Q8_K activation block (kern_kq_ref.c quantises, every Q8_K family reads). */
struct kern_block_q8_k {
	float d;
	int8_t qs[KERN_QK_K];
	int16_t bsums[KERN_QK_K / 16];
};
_Static_assert(sizeof(struct kern_block_q8_k) == 292, "q8_k block size");

/* Q8_1 activation block (kern_legacy_ref.c). */
struct kern_block_q8_1 {
	uint16_t d; /* f16 */
	uint16_t s; /* f16 of d * sum(qs) */
	int8_t qs[KERN_QK];
};
_Static_assert(sizeof(struct kern_block_q8_1) == 36, "q8_1 block size");

/* IQ4_NL code values, ggml's kvalues_iq4nl (kern_legacy_ref.c). */
extern const int8_t kern_legacy_iq4nl_values[16];

/* The calling thread's scratch buffer of at least bytes (16-byte aligned,
 * contents undefined), valid until its next call on this thread; NULL if
 * out of memory (kern.c).  For the SIMD matmuls' per-call tables. */
void *kern_scratch(size_t bytes);

/* AVX2 implementations (kern_avx2.c). */
void kern_dequant_row_avx2(uint32_t type, const void *src, float *dst, int64_t n);
void kern_convert_row_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n);
float kern_dot_avx2(uint32_t weight_type, int64_t n, const void *w, const void *x);
void kern_matmul_avx2(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride);

/* AVX-512 implementations (kern_avx512.c, compiled with AVX-512 F/BW/VL/DQ/VNNI;
 * called only when kern_init() found them): Q4_0, Q8_0, MXFP4 and Q4_K
 * products of several rows with VNNI, everything else through the AVX2 forms
 * (same contracts as the _avx2 functions). */
void kern_matmul_avx512(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride);
void kern_kq_matmul_avx512(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			   const void *x, size_t x_stride, int64_t n_rows, float *y,
			   int64_t y_stride, int64_t gemm_rows);
/* Q4_K and Q6_K decode (kern_kq_avx512.c): one or two rows, none below
 * gemm_rows, as kern_kq_matmul_avx2 would compute them; 1 if it took the
 * product, 0 if the type or the rows are not its own (nothing written). */
int kern_kq_decode_avx512(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			  const void *x, size_t x_stride, int64_t n_rows, float *y,
			  int64_t y_stride, int64_t gemm_rows);

#endif
