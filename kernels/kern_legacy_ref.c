/* kern_legacy_ref: scalar reference of the 32-value block types Q4_1, Q5_0,
 * Q5_1 and IQ4_NL, and of the Q8_1 activations Q4_1 / Q5_1 multiply.
 *
 * Q8_1 follows llama.cpp's x86 quantiser, as Q8_0 does (kern_ref.c):
 * d = amax / 127 stored as f16, q = round-half-even(x * (127 / amax)),
 * s = f16(d * sum q) with d the f32 value before rounding. */
#include <math.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

static void quantize_row_q8_1_ref(const float *x, struct kern_block_q8_1 *y, int64_t n)
{
	for (int64_t ib = 0; ib < n / KERN_QK; ib++, x += KERN_QK) {
		float amax = 0.0f;
		for (int j = 0; j < KERN_QK; j++) {
			float a = fabsf(x[j]);
			amax = a > amax ? a : amax;
		}
		const float d = amax / 127.0f;
		const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
		int sum = 0;
		for (int j = 0; j < KERN_QK; j++) {
			y[ib].qs[j] = kern_q8_round(x[j] * id);
			sum += y[ib].qs[j];
		}
		y[ib].d = kern_f32_to_f16(d);
		y[ib].s = kern_f32_to_f16(d * (float)sum);
	}
}

void kern_legacy_convert_ref(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (act_type == KERN_Q8_1)
		quantize_row_q8_1_ref(x, dst, n);
}

void kern_legacy_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	(void)type, (void)src, (void)dst, (void)n; /* TODO(legacy) */
}

float kern_legacy_dot_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	(void)type, (void)n, (void)w, (void)x; /* TODO(legacy) */
	return 0.0f;
}
