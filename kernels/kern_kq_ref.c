/* kern_kq_ref: scalar reference of the 256-value K-quants (Q2_K, Q3_K, Q4_K,
 * Q5_K, Q6_K) and IQ4_XS, and of their Q8_K activations.
 *
 * Q8_K (GGML's quantize_row_q8_K_ref, which llama.cpp's x86 CPU backend
 * uses): per 256 values, max = the value of largest magnitude with its sign
 * (the first on a tie), iscale = -127 / max, q = min(127, round-half-even(
 * iscale * x)), d = 1 / iscale as f32, bsums[j] = sum of q[16j .. 16j+15].
 * An all-zero block gives d = 0, q = 0, bsums = 0. */
#include <math.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

/* GGML's nearest_int: round half to even through the 1.5 * 2^23 magic add
 * (valid for |v| <= 2^22; larger inputs give the same wrapped bits as ggml). */
static inline int nearest_int(float v)
{
	float f = v + 12582912.0f;
	int32_t i;
	memcpy(&i, &f, sizeof(i));
	return (i & 0x007fffff) - 0x00400000;
}

static void quantize_row_q8_k_ref(const float *x, struct kern_block_q8_k *y, int64_t n)
{
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++, x += KERN_QK_K) {
		float max = 0.0f, amax = 0.0f;
		for (int j = 0; j < KERN_QK_K; j++) {
			float a = fabsf(x[j]);
			if (a > amax) {
				amax = a;
				max = x[j];
			}
		}
		if (amax == 0.0f) {
			memset(&y[ib], 0, sizeof(y[ib]));
			continue;
		}
		const float iscale = -127.0f / max;
		for (int j = 0; j < KERN_QK_K; j++) {
			int v = nearest_int(iscale * x[j]);
			y[ib].qs[j] = (int8_t)(v < 127 ? v : 127);
		}
		for (int j = 0; j < KERN_QK_K / 16; j++) {
			int sum = 0;
			for (int i = 0; i < 16; i++)
				sum += y[ib].qs[16 * j + i];
			y[ib].bsums[j] = (int16_t)sum;
		}
		y[ib].d = 1.0f / iscale;
	}
}

void kern_kq_convert_ref(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (act_type == KERN_Q8_K)
		quantize_row_q8_k_ref(x, dst, n);
}

void kern_kq_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	(void)type, (void)src, (void)dst, (void)n; /* TODO(kq) */
}

float kern_kq_dot_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	(void)type, (void)n, (void)w, (void)x; /* TODO(kq) */
	return 0.0f;
}
