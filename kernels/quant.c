/* quant: scalar reference quantisers (see quant.h for the exact rules). */
#include <math.h>
#include <string.h>

#include "common/err.h"
#include "kernels/kern_impl.h"
#include "kernels/quant.h"

static void quant_store_u16(void *p, uint16_t v) { memcpy(p, &v, sizeof(v)); }

/* The E2M1 code (index into kern_mxfp4_values) nearest to x at scale d;
 * the first code wins a tie.  Float arithmetic, in ggml's order. */
static int quant_mxfp4_best(float x, float d)
{
	int best = 0;
	float best_err = fabsf((float)kern_mxfp4_values[0] * d - x);
	for (int i = 1; i < 16; i++) {
		float err = fabsf((float)kern_mxfp4_values[i] * d - x);
		if (err < best_err) {
			best = i;
			best_err = err;
		}
	}
	return best;
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
		return ERR_CONFIG;
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
