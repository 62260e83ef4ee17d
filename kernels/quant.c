/* quant: scalar reference quantisers (see quant.h for the exact rules). */
#include <math.h>
#include <string.h>

#include "kernels/kern_impl.h"
#include "kernels/quant.h"

static void quant_store_u16(void *p, uint16_t v)
{
	memcpy(p, &v, sizeof(v));
}

/* The E2M1 code (index into kern_mxfp4_values) nearest to x at scale d, the
 * first code winning a tie: the code ggml's loop
 *     best = argmin over i = 0..15 (first) of fabsf(kern_mxfp4_values[i] * d - x)
 * picks, found without trying all 16.  Why it is the same code:
 *   - a negative candidate -v has error |fl(-v - x)| = |fl(v - |x|)| for x < 0
 *     (IEEE rounding is symmetric) and a positive one is worse than 0 there,
 *     so the search is over the magnitudes m_k = {0,1,2,3,4,6,8,12} * d
 *     (exact products) for a = |x|, then the sign is attached (never to 0);
 *   - fl(a - m) and fl(m - a) are monotonic in m, so the errors fall up to
 *     the last m_j < a and rise from m_{j+1} >= a on: the minimum is at j or
 *     j + 1, and a tie between those two goes to j (the earlier code);
 *   - the m_k are at least d apart while rounding moves an error by less than
 *     ulp(16 d), so no other two errors can tie for the minimum. */
static int quant_mxfp4_best(float x, float d)
{
	float a = fabsf(x);
	int j = 0; /* how many of m_1..m_7 are below a: m_j < a <= m_{j+1} */
	for (int k = 1; k < 8; k++)
		j += (float)kern_mxfp4_values[k] * d < a;
	int best;
	if (a == 0.0f) {
		best = 0;
	} else if (j == 7) {
		best = 7; /* above the largest magnitude: clipped */
	} else {
		float below = a - (float)kern_mxfp4_values[j] * d;
		float above = (float)kern_mxfp4_values[j + 1] * d - a;
		best = above < below ? j + 1 : j;
	}
	return x < 0.0f && best != 0 ? best + 8 : best;
}

void quant_row_mxfp4_ref(const float *x, void *dst, int64_t n)
{
	struct kern_block_mxfp4 *y = dst;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const float *v = x + ib * KERN_QK;
		float amax = 0.0f;
		for (int j = 0; j < KERN_QK; j++)
			if (amax < fabsf(v[j]))
				amax = fabsf(v[j]);
		int e = 0;
		if (amax > 0.0f) {
			/* ggml casts without a clamp; below 2^-125 that would be undefined */
			e = (int)floorf(log2f(amax)) - 2 + 127;
			e = e < 0 ? 0 : e > 254 ? 254 : e;
		}
		float d = kern_e8m0_half((uint8_t)e); /* half the scale: the table is doubled */
		y[ib].e = (uint8_t)e;
		for (int j = 0; j < KERN_QK / 2; j++) {
			int lo = quant_mxfp4_best(v[j], d);
			int hi = quant_mxfp4_best(v[j + KERN_QK / 2], d);
			y[ib].qs[j] = (uint8_t)(lo | hi << 4);
		}
	}
}

void quant_row_q8_0_ref(const float *x, void *dst, int64_t n)
{
	struct kern_block_q8_0 *y = dst;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const float *v = x + ib * KERN_QK;
		float amax = 0.0f;
		for (int j = 0; j < KERN_QK; j++)
			amax = fmaxf(amax, fabsf(v[j]));
		const float d = amax / 127.0f;
		const float id = d != 0.0f ? 1.0f / d : 0.0f;
		quant_store_u16(&y[ib].d, kern_f32_to_f16(d));
		for (int j = 0; j < KERN_QK; j++)
			y[ib].qs[j] = (int8_t)roundf(v[j] * id);
	}
}

void quant_row_q4_0_ref(const float *x, void *dst, int64_t n)
{
	struct kern_block_q4_0 *y = dst;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const float *v = x + ib * KERN_QK;
		float amax = 0.0f, max = 0.0f;
		for (int j = 0; j < KERN_QK; j++) {
			if (amax < fabsf(v[j])) {
				amax = fabsf(v[j]);
				max = v[j];
			}
		}
		const float d = max / -8.0f;
		const float id = d != 0.0f ? 1.0f / d : 0.0f;
		quant_store_u16(&y[ib].d, kern_f32_to_f16(d));
		for (int j = 0; j < KERN_QK / 2; j++) {
			int q0 = (int8_t)(v[j] * id + 8.5f);
			int q1 = (int8_t)(v[j + KERN_QK / 2] * id + 8.5f);
			q0 = q0 < 15 ? q0 : 15;
			q1 = q1 < 15 ? q1 : 15;
			y[ib].qs[j] = (uint8_t)(q0 | q1 << 4);
		}
	}
}

int quant_type_supported(uint32_t type)
{
	switch (type) {
	case KERN_F32:
	case KERN_F16:
	case KERN_BF16:
	case KERN_Q8_0:
	case KERN_Q4_0:
	case KERN_MXFP4: return 1;
	default: return 0;
	}
}

int quant_row(uint32_t type, const float *x, void *dst, int64_t n)
{
	if (!quant_type_supported(type) || n < 0 || n % kern_type_block(type) != 0)
		return QUANT_ERR_UNSUPPORTED;
	uint8_t *p = dst;
	switch (type) {
	case KERN_F32: memcpy(dst, x, (size_t)n * sizeof(float)); break;
	case KERN_F16:
		for (int64_t i = 0; i < n; i++)
			quant_store_u16(p + 2 * i, kern_f32_to_f16(x[i]));
		break;
	case KERN_BF16:
		for (int64_t i = 0; i < n; i++)
			quant_store_u16(p + 2 * i, kern_f32_to_bf16(x[i]));
		break;
	case KERN_Q8_0: quant_row_q8_0_ref(x, dst, n); break;
	case KERN_Q4_0: quant_row_q4_0_ref(x, dst, n); break;
	case KERN_MXFP4: quant_row_mxfp4_ref(x, dst, n); break;
	}
	return 0;
}

int64_t quant_row_finite(const float *x, int64_t n)
{
	for (int64_t i = 0; i < n; i++)
		if (!isfinite(x[i]))
			return i;
	return -1;
}
