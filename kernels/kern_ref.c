/* kern_ref: scalar reference implementations (the *_ref twins in kern.h).
 * Plain C, no SIMD; tests compare the AVX2 kernels against these. */
#include <math.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_expf.h"
#include "kernels/kern_impl.h"

const int8_t kern_mxfp4_values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* ------------------------------------------------------------- dequant */

void kern_dequant_row_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	switch (kern_type_family(type)) {
	case KERN_FAM_LEGACY: kern_legacy_dequant_ref(type, src, dst, n); return;
	case KERN_FAM_KQ: kern_kq_dequant_ref(type, src, dst, n); return;
	case KERN_FAM_IQ: kern_iq_dequant_ref(type, src, dst, n); return;
	default: break;
	}
	switch (type) {
	case KERN_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
	case KERN_F16: {
		const uint8_t *s = src;
		for (int64_t i = 0; i < n; i++)
			dst[i] = kern_f16_to_f32(kern_load_u16(s + 2 * i));
		break;
	}
	case KERN_BF16: {
		const uint8_t *s = src;
		for (int64_t i = 0; i < n; i++)
			dst[i] = kern_bf16_to_f32(kern_load_u16(s + 2 * i));
		break;
	}
	case KERN_Q4_0: {
		const struct kern_block_q4_0 *b = src;
		for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
			float d = kern_f16_to_f32(kern_load_u16(&b[ib].d));
			float *y = dst + ib * KERN_QK;
			for (int j = 0; j < KERN_QK / 2; j++) {
				y[j] = (float)((b[ib].qs[j] & 0x0f) - 8) * d;
				y[j + 16] = (float)((b[ib].qs[j] >> 4) - 8) * d;
			}
		}
		break;
	}
	case KERN_Q8_0: {
		const struct kern_block_q8_0 *b = src;
		for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
			float d = kern_f16_to_f32(kern_load_u16(&b[ib].d));
			float *y = dst + ib * KERN_QK;
			for (int j = 0; j < KERN_QK; j++)
				y[j] = (float)b[ib].qs[j] * d;
		}
		break;
	}
	case KERN_MXFP4: {
		const struct kern_block_mxfp4 *b = src;
		for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
			float d = kern_e8m0_half(b[ib].e);
			float *y = dst + ib * KERN_QK;
			for (int j = 0; j < KERN_QK / 2; j++) {
				y[j] = (float)kern_mxfp4_values[b[ib].qs[j] & 0x0f] * d;
				y[j + 16] = (float)kern_mxfp4_values[b[ib].qs[j] >> 4] * d;
			}
		}
		break;
	}
	default: break;
	}
}

/* ------------------------------------------------------------- convert */

static void quantize_row_q8_0_ref(const float *x, struct kern_block_q8_0 *y, int64_t n)
{
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const float *v = x + ib * KERN_QK;
		float amax = 0.0f;
		for (int j = 0; j < KERN_QK; j++) {
			float a = fabsf(v[j]);
			amax = a > amax ? a : amax;
		}
		float d = amax / 127.0f;
		float id = amax != 0.0f ? 127.0f / amax : 0.0f;
		y[ib].d = kern_f32_to_f16(d);
		for (int j = 0; j < KERN_QK; j++)
			y[ib].qs[j] = kern_q8_round(v[j] * id);
	}
}

void kern_convert_row_ref(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	switch (act_type) {
	case KERN_F32: memcpy(dst, x, (size_t)n * sizeof(float)); break;
	case KERN_F16: {
		uint16_t *d = dst;
		for (int64_t i = 0; i < n; i++)
			d[i] = kern_f32_to_f16(x[i]);
		break;
	}
	case KERN_BF16: {
		uint16_t *d = dst;
		for (int64_t i = 0; i < n; i++)
			d[i] = kern_f32_to_bf16(x[i]);
		break;
	}
	case KERN_Q8_0: quantize_row_q8_0_ref(x, dst, n); break;
	case KERN_Q8_1: kern_legacy_convert_ref(act_type, x, dst, n); break;
	case KERN_Q8_K: kern_kq_convert_ref(act_type, x, dst, n); break;
	default: break;
	}
}

/* ----------------------------------------------------------------- dot */

static float dot_q4_0_q8_0(int64_t n, const struct kern_block_q4_0 *w,
			   const struct kern_block_q8_0 *x)
{
	float acc = 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		int sumi = 0;
		for (int j = 0; j < KERN_QK / 2; j++) {
			sumi += ((w[ib].qs[j] & 0x0f) - 8) * x[ib].qs[j];
			sumi += ((w[ib].qs[j] >> 4) - 8) * x[ib].qs[j + 16];
		}
		float d = kern_f16_to_f32(kern_load_u16(&w[ib].d)) *
			  kern_f16_to_f32(kern_load_u16(&x[ib].d));
		acc = fmaf((float)sumi, d, acc);
	}
	return acc;
}

/* llama.cpp's float steps for Q8_0 (ggml_vec_dot_q8_0_q8_0 and llamafile's
 * tinyBLAS_Q0_AVX alike): eight lanes, lane m summing the products of values
 * 4m .. 4m + 3 of each block, acc_m = fma(d_w * d_x, lane_m, acc_m) (the
 * product of two f16 values is exact), then ggml's hsum_float_8. */
static float dot_q8_0_q8_0(int64_t n, const struct kern_block_q8_0 *w,
			   const struct kern_block_q8_0 *x)
{
	float acc[8] = {0};
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		float d = kern_f16_to_f32(kern_load_u16(&w[ib].d)) *
			  kern_f16_to_f32(kern_load_u16(&x[ib].d));
		for (int m = 0; m < 8; m++) {
			int sumi = 0;
			for (int j = 4 * m; j < 4 * m + 4; j++)
				sumi += w[ib].qs[j] * x[ib].qs[j];
			acc[m] = fmaf(d, (float)sumi, acc[m]);
		}
	}
	float r[4];
	for (int i = 0; i < 4; i++)
		r[i] = acc[4 + i] + acc[i];
	const float r0 = r[0] + r[2], r1 = r[1] + r[3];
	return r0 + r1;
}

static float dot_mxfp4_q8_0(int64_t n, const struct kern_block_mxfp4 *w,
			    const struct kern_block_q8_0 *x)
{
	float acc = 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		int sumi = 0;
		for (int j = 0; j < KERN_QK / 2; j++) {
			sumi += kern_mxfp4_values[w[ib].qs[j] & 0x0f] * x[ib].qs[j];
			sumi += kern_mxfp4_values[w[ib].qs[j] >> 4] * x[ib].qs[j + 16];
		}
		float d = kern_e8m0_half(w[ib].e) * kern_f16_to_f32(kern_load_u16(&x[ib].d));
		acc = fmaf((float)sumi, d, acc);
	}
	return acc;
}

/* ---------------------------------------------------------------- F32 */

static float ld_f32(const uint8_t *p) /* rows need not be 4-byte aligned */
{
	float f;
	memcpy(&f, p, sizeof(f));
	return f;
}

/* _mm512_reduce_add_ps as GCC implements it */
static float reduce16(const float *a)
{
	float t[8], u[4];
	for (int i = 0; i < 8; i++)
		t[i] = a[8 + i] + a[i];
	for (int i = 0; i < 4; i++)
		u[i] = t[4 + i] + t[i];
	const float v0 = u[0] + u[2], v1 = u[1] + u[3];
	return v0 + v1;
}

float kern_f32_dot_vec_ref(int64_t n, const void *w, const void *x)
{
	const uint8_t *a = w, *b = x;
	const int64_t np = n & ~(int64_t)63;
	float s[4][16] = {{0}};
	for (int64_t i = 0; i < np; i += 64)
		for (int j = 0; j < 4; j++)
			for (int l = 0; l < 16; l++) {
				const int64_t k = i + 16 * j + l;
				s[j][l] = fmaf(ld_f32(a + 4 * k), ld_f32(b + 4 * k), s[j][l]);
			}
	for (int l = 0; l < 16; l++) {
		s[0][l] = s[0][l] + s[2][l];
		s[1][l] = s[1][l] + s[3][l];
	}
	for (int l = 0; l < 16; l++)
		s[0][l] = s[0][l] + s[1][l];
	float sum = reduce16(s[0]);
	/* leftovers as GCC vectorised ggml's loop: products rounded and added in
	 * order for whole 16s and then one 8, fused for the last < 8 */
	const int64_t rem = n - np, unfused = rem >= 16 ? rem / 8 * 8 : rem / 8 * 8;
	for (int64_t k = np; k < n; k++) {
		const float u = ld_f32(a + 4 * k), v = ld_f32(b + 4 * k);
		sum = k < np + unfused ? sum + u * v : fmaf(u, v, sum);
	}
	return sum;
}

static float ld_f16(const uint8_t *p)
{
	return kern_f16_to_f32(kern_load_u16(p));
}

/* ggml_vec_dot_f16, AVX-512 form: 4 x 16 lanes per 64 values (products of
 * two halves are exact), its reduction to a float, then the last n % 64
 * products added in double. */
float kern_f16_dot_vec_ref(int64_t n, const void *w, const void *x)
{
	const uint8_t *a = w, *b = x;
	const int64_t np = n & ~(int64_t)63;
	float s[4][16] = {{0}};
	for (int64_t i = 0; i < np; i += 64)
		for (int j = 0; j < 4; j++)
			for (int l = 0; l < 16; l++) {
				const int64_t k = i + 16 * j + l;
				s[j][l] = fmaf(ld_f16(a + 2 * k), ld_f16(b + 2 * k), s[j][l]);
			}
	for (int l = 0; l < 16; l++) {
		s[0][l] = s[0][l] + s[2][l];
		s[1][l] = s[1][l] + s[3][l];
	}
	for (int l = 0; l < 16; l++)
		s[0][l] = s[0][l] + s[1][l];
	double sum = (double)reduce16(s[0]);
	for (int64_t k = np; k < n; k++)
		sum += (double)(ld_f16(a + 2 * k) * ld_f16(b + 2 * k));
	return (float)sum;
}

/* llamafile's F16 GEMM (AVX-512): 16 FMA lanes, k in order, reduced as
 * _mm512_reduce_add_ps. */
float kern_f16_dot_gemm_ref(int64_t n, const void *w, const void *x)
{
	const uint8_t *a = w, *b = x;
	float s[16] = {0};
	for (int64_t k = 0; k < n; k++)
		s[k % 16] = fmaf(ld_f16(a + 2 * k), ld_f16(b + 2 * k), s[k % 16]);
	return reduce16(s);
}

float kern_f32_dot_gemm_ref(int64_t n, const void *w, const void *x)
{
	const uint8_t *a = w, *b = x;
	float s[16] = {0};
	for (int64_t k = 0; k < n; k++)
		s[k % 16] = fmaf(ld_f32(a + 4 * k), ld_f32(b + 4 * k), s[k % 16]);
	return reduce16(s);
}

float kern_dot_ref(uint32_t weight_type, int64_t n, const void *w, const void *x)
{
	switch (kern_type_family(weight_type)) {
	case KERN_FAM_LEGACY: return kern_legacy_dot_ref(weight_type, n, w, x);
	case KERN_FAM_KQ: return kern_kq_dot_ref(weight_type, n, w, x);
	case KERN_FAM_IQ: return kern_iq_dot_ref(weight_type, n, w, x);
	default: break;
	}
	switch (weight_type) {
	case KERN_F32: return kern_f32_dot_vec_ref(n, w, x);
	case KERN_F16: return kern_f16_dot_vec_ref(n, w, x);
	case KERN_BF16: {
		const uint8_t *a = w, *b = x;
		float acc = 0.0f;
		for (int64_t i = 0; i < n; i++)
			acc += kern_bf16_to_f32(kern_load_u16(a + 2 * i)) *
			       kern_bf16_to_f32(kern_load_u16(b + 2 * i));
		return acc;
	}
	case KERN_Q4_0: return dot_q4_0_q8_0(n, w, x);
	case KERN_Q8_0: return dot_q8_0_q8_0(n, w, x);
	case KERN_MXFP4: return dot_mxfp4_q8_0(n, w, x);
	default: return 0.0f;
	}
}

/* ------------------------------------------------------------- swiglu */

void kern_swiglu_ref(float *g, const float *u, int64_t j0, int64_t j1, int64_t n)
{
	const int64_t nv = n - n % 16;
	for (int64_t j = j0; j < j1; j++) {
		const float x = g[j];
		g[j] = j < nv ? x / (1.0f + kern_expf_avx512_lane(0.0f - x)) * u[j]
			      : x / (1.0f + expf(-x)) * u[j];
	}
}
