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

/* AVX2 implementations (kern_avx2.c). */
void kern_dequant_row_avx2(uint32_t type, const void *src, float *dst, int64_t n);
void kern_convert_row_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n);
float kern_dot_avx2(uint32_t weight_type, int64_t n, const void *w, const void *x);
void kern_matmul_avx2(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride);

#endif
