/* kern_expf: ggml's vector expf (ggml_v_expf, ggml-cpu/vec.h) computed for one
 * lane, in its AVX-512 and its AVX2+FMA forms.  Both are within ~1.5 ulp of
 * exp(x) and differ from each other (and from libm) in the last bits, so code
 * that must round like a given ggml build calls the form that build runs.
 * Inline, so that a caller built with FMA turns fmaf() into one instruction
 * (same result either way: an FMA is exact by definition). */
#ifndef MOEFLEET_KERN_EXPF_H
#define MOEFLEET_KERN_EXPF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kern_bits.h"

/* The AVX-512 form (16 lanes). */
static inline __attribute__((always_inline)) float kern_expf_avx512_lane(float x)
{
	const float r = 0x1.8p23f;
	const float z = fmaf(x, 0x1.715476p+0f, r);
	const float n = z - r;
	const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
	if (fabsf(n) > 192.0f)
		return n <= 0.0f ? 0.0f : INFINITY;
	const float u = b * b;
	const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
				  fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
			     u, fmaf(0x1.ffffecp-1f, b, 1.0f));
	/* _mm512_scalef_ps(j, n): exact, or rounded once if subnormal; a product
	 * by a power of two (normal for n >= -126) rounds the same way */
	if (n >= -126.0f && n <= 127.0f)
		return j * kern_bits_f32((uint32_t)((int)n + 127) << 23);
	return ldexpf(j, (int)n);
}

/* The AVX2+FMA form (8 lanes). */
static inline __attribute__((always_inline)) float kern_expf_avx2_lane(float x)
{
	const float r = 0x1.8p23f;
	const float z = fmaf(x, 0x1.715476p+0f, r);
	const float n = z - r;
	const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
	const uint32_t e = kern_f32_bits(z) << 23;
	const float k = kern_bits_f32(e + 0x3f800000u); /* + the bits of 1.0f */
	const float u = b * b;
	const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
				  fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
			     u, 0x1.ffffecp-1f * b);
	if (!(fabsf(n) > 126.0f))
		return fmaf(j, k, k);
	const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
	const float s1 = kern_bits_f32(g + 0x7f000000u);
	const float s2 = kern_bits_f32(e - g);
	if (fabsf(n) > 192.0f)
		return s1 * s1;
	return fmaf(s2, j, s2) * s1;
}

#endif
