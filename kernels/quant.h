/* quant: reference quantisers from float rows to GGML's block types.
 *
 * Each function turns n floats (n a multiple of KERN_QK = 32) into n / 32
 * blocks in GGML's byte layout (see kern.h), and produces the same bytes as
 * ggml's scalar reference quantiser of the same name (ggml-quants.c), which is
 * what llama-quantize and the test oracle write:
 *
 *   MXFP4  amax = max |x|; e = floor(log2f(amax)) - 2 + 127 (0 when amax is 0,
 *          clamped to [0, 254]); each value becomes the E2M1 code whose value
 *          times 2^(e-127) is nearest to it (first code wins a tie, so +0
 *          rather than -0), so |x| above 6 * 2^(e-127) is clipped to 6.
 *   Q8_0   d = amax / 127 stored as f16 (round to nearest even); q = roundf(x / d)
 *          (half away from zero), computed as x * (1 / d) in float.
 *   Q4_0   m = the value of largest magnitude (first one on a tie, sign kept);
 *          d = m / -8 stored as f16; q = min(15, trunc(x * (1 / d) + 8.5)).
 *
 * Note that Q8_0 here rounds half away from zero, unlike the activation
 * quantiser kern_convert_row(KERN_Q8_0, ...) that follows ggml's SIMD path.
 * Values must be finite (a NaN or infinity gives unspecified codes, as in ggml);
 * callers that read them from files check first with quant_row_finite().
 *
 * All functions are pure, thread-safe and write exactly kern_row_bytes(type, n)
 * bytes to dst. */
#ifndef MOEFLEET_QUANT_H
#define MOEFLEET_QUANT_H

#include <stdint.h>

#include "kernels/kern.h"

void quant_row_mxfp4_ref(const float *x, void *dst, int64_t n);
void quant_row_q8_0_ref(const float *x, void *dst, int64_t n);
void quant_row_q4_0_ref(const float *x, void *dst, int64_t n);

/* 1 if quant_row() can produce this type: F32, F16, BF16, Q8_0, Q4_0, MXFP4. */
int quant_type_supported(uint32_t type);

/* quant_row's failure code; it has the value of ERR_CONFIG in common/err.h
 * (kernels include nothing outside kernels/ and libc). */
enum { QUANT_ERR_UNSUPPORTED = -6 };

/* Converts n floats to `type` (F16/BF16 round to nearest even, F32 copies).
 * Returns 0, or QUANT_ERR_UNSUPPORTED when the type is not supported or n is
 * not a multiple of its block (nothing is written then; nothing is logged). */
int quant_row(uint32_t type, const float *x, void *dst, int64_t n);

/* Index of the first NaN or infinity among n floats, or -1 if all are finite. */
int64_t quant_row_finite(const float *x, int64_t n);

#endif
