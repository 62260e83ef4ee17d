/* kern_legacy_ref: scalar reference of the 32-value block types Q4_1, Q5_0,
 * Q5_1 and IQ4_NL, and of the Q8_1 activations Q4_1 / Q5_1 multiply.
 *
 * Block layouts (GGML's, little-endian; f16 = IEEE half):
 *   Q4_1   (3)  20 bytes: f16 d, f16 m, qs[16]; byte j holds value j (low
 *               nibble) and value j+16 (high nibble); x = q * d + m
 *   Q5_0   (6)  22 bytes: f16 d, u32 qh, qs[16]; q = nibble | bit i of qh
 *               << 4 (value i, nibbles as Q4_1); x = (q - 16) * d
 *   Q5_1   (7)  24 bytes: f16 d, f16 m, u32 qh, qs[16]; q as Q5_0;
 *               x = q * d + m
 *   IQ4_NL (20) 18 bytes: f16 d, qs[16] in Q4_1's nibble order;
 *               x = kern_legacy_iq4nl_values[nibble] * d
 *   Q8_1   (9)  36 bytes: f16 d, f16 s, int8 qs[32]; x = q * d (activations)
 * q * d is exact in F32 (at most 16 significant bits), so each value is
 * rounded once, as in ggml's dequantize_row_*.
 *
 * Activation types: Q4_1 and Q5_1 take Q8_1, Q5_0 and IQ4_NL take Q8_0.
 * Q8_1 follows llama.cpp's x86 quantiser exactly: amax = the maximum of |x|
 * taken in the lane order of its AVX2 reduction (which decides what NaN
 * gives), d = amax / 127 stored as f16, q = round-half-even(x * (127 / amax))
 * saturated to int8, s = f16(d * sum) with d the F32 value before rounding
 * and sum the int32 sum of the unsaturated rounded values (wrapping; they
 * differ from q only for NaN and infinite inputs).
 *
 * The dot product (the contract kern_legacy_avx2.c reproduces bit for bit),
 * with c the integer weight code (Q4_1: 0..15, Q5_1: 0..31, Q5_0: q - 16,
 * IQ4_NL: the table value) and x the int8 activations:
 *   Q4_1, Q5_0, Q5_1: llama.cpp's (see dot_lanes): per block eight exact
 *     int32 lanes of four products each, accumulated by FMA per lane, the
 *     lanes summed as ggml's hsum_float_8, plus the fused m_w * s_x sum.
 *   IQ4_NL: per block of 32 an exact int32 sum sumi = sum_j c_j * x_j, then
 *     one F32 accumulator in block order: acc = fma((float)sumi, d_w * d_x,
 *     acc), as llama.cpp's repacked GEMV/GEMM (2-D weights and experts). */
#include <math.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

const int8_t kern_legacy_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
					     1,	   13,	 25,  38,  53,	69,  89,  113};

/* ------------------------------------------------------------- convert */

/* What _mm256_cvtps_epi32 gives for v (round-half-even): INT32_MIN for NaN
 * and for values outside the int32 range. */
static int32_t cvt_i32(float v)
{
	if (!(v > -2147483648.0f && v < 2147483648.0f))
		return INT32_MIN;
	if (fabsf(v) >= 8388608.0f) /* already an integer */
		return (int32_t)v;
	/* |v| < 2^23: adding 2^23 rounds to an integer, ties to even */
	float r = v >= 0 ? (v + 8388608.0f) - 8388608.0f : (v - 8388608.0f) + 8388608.0f;
	return (int32_t)r;
}

/* MAXPS: the first operand if greater, else the second (so NaN in the
 * first operand loses, NaN in the second wins). */
static float max_ps1(float a, float b)
{
	return a > b ? a : b;
}

/* max |x| over 32 values in the AVX2 reduction's order: lanes l of the
 * four groups of 8, then lanes 4-7 against 0-3, 2-3 against 0-1, 1 against
 * 0. */
static float amax_32(const float *x)
{
	float m[8];
	for (int l = 0; l < 8; l++) {
		m[l] = fabsf(x[l]);
		for (int g = 1; g < 4; g++)
			m[l] = max_ps1(m[l], fabsf(x[8 * g + l]));
	}
	for (int l = 0; l < 4; l++)
		m[l] = max_ps1(m[l + 4], m[l]);
	for (int l = 0; l < 2; l++)
		m[l] = max_ps1(m[l], m[l + 2]);
	return max_ps1(m[0], m[1]);
}

/* Writes n / 32 Q8_1 blocks at dst (no alignment needed). */
static void quantize_row_q8_1_ref(const float *x, uint8_t *dst, int64_t n)
{
	for (int64_t ib = 0; ib < n / KERN_QK; ib++, x += KERN_QK) {
		uint8_t *y = dst + (size_t)ib * sizeof(struct kern_block_q8_1);
		const float amax = amax_32(x);
		const float d = amax / 127.0f;
		const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
		uint32_t sum = 0; /* wraps as the int32 vector adds do */
		for (int j = 0; j < KERN_QK; j++) {
			const int32_t v = cvt_i32(x[j] * id);
			y[4 + j] = (uint8_t)(int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
			sum += (uint32_t)v;
		}
		const uint16_t h[2] = {kern_f32_to_f16(d),
				       kern_f32_to_f16(d * (float)(int32_t)sum)};
		memcpy(y, h, sizeof(h));
	}
}

void kern_legacy_convert_ref(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (act_type == KERN_Q8_1)
		quantize_row_q8_1_ref(x, dst, n);
}

/* ------------------------------------------------------------- dequant */

/* The 32 integer codes of one block (before any offset) and its scales;
 * m = 0 for the types without a minimum. */
static void block_codes(uint32_t type, const uint8_t *b, int c[KERN_QK], float *d, float *m)
{
	const uint8_t *qs;
	uint32_t qh = 0;
	*d = kern_f16_to_f32(kern_load_u16(b));
	*m = 0.0f;
	switch (type) {
	case KERN_Q4_1:
		*m = kern_f16_to_f32(kern_load_u16(b + 2));
		qs = b + 4;
		break;
	case KERN_Q5_0:
		memcpy(&qh, b + 2, 4);
		qs = b + 6;
		break;
	case KERN_Q5_1:
		*m = kern_f16_to_f32(kern_load_u16(b + 2));
		memcpy(&qh, b + 4, 4);
		qs = b + 8;
		break;
	default: /* IQ4_NL */ qs = b + 2; break;
	}
	for (int j = 0; j < KERN_QK / 2; j++) {
		c[j] = (qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
		c[j + 16] = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
	}
	for (int j = 0; j < KERN_QK; j++) {
		if (type == KERN_Q5_0)
			c[j] -= 16;
		else if (type == KERN_IQ4_NL)
			c[j] = kern_legacy_iq4nl_values[c[j]];
	}
}

void kern_legacy_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	const uint8_t *s = src;
	const size_t bs = kern_type_block_bytes(type);
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		int c[KERN_QK];
		float d, m;
		block_codes(type, s + (size_t)ib * bs, c, &d, &m);
		for (int j = 0; j < KERN_QK; j++)
			dst[ib * KERN_QK + j] = type == KERN_Q4_1 || type == KERN_Q5_1
						    ? (float)c[j] * d + m
						    : (float)c[j] * d;
	}
}

/* ----------------------------------------------------------------- dot */

/* Q4_1, Q5_0, Q5_1: llama.cpp's float steps (ggml_vec_dot_q4_1_q8_1,
 * _q5_1_q8_1, _q5_0_q8_0, and for Q5_0 llamafile's tinyBLAS_Q0_AVX on
 * several rows, which computes the same): eight lanes, lane m summing
 * c_j * x_j for j = 4m .. 4m + 3; acc_m = fma(d_w * d_x, lane_m, acc_m);
 * Q4_1 / Q5_1 also summs = fma(m_w, s_x, summs); result ggml's hsum_float_8
 * of acc, plus summs. */
/* c * x as ggml's sign trick computes it for Q5_0 (maddubs(|c|, sign(x, c))):
 * exact except for x = -128 with c < 0, where sign() leaves -128. */
static int32_t sign_product(int c, int x)
{
	const int sx = c < 0 ? (x == -128 ? -128 : -x) : c == 0 ? 0 : x;
	return (c < 0 ? -c : c) * sx;
}

static float dot_lanes(uint32_t type, int64_t n, const uint8_t *wb, const uint8_t *xb)
{
	const size_t bs = kern_type_block_bytes(type);
	const int q8_1 = type == KERN_Q4_1 || type == KERN_Q5_1;
	const size_t xs = q8_1 ? sizeof(struct kern_block_q8_1) : sizeof(struct kern_block_q8_0);
	float acc[8] = {0}, summs = 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const uint8_t *xblk = xb + (size_t)ib * xs;
		const int8_t *xq = (const int8_t *)(xblk + (q8_1 ? 4 : 2));
		int c[KERN_QK];
		float dw, mw;
		block_codes(type, wb + (size_t)ib * bs, c, &dw, &mw);
		const float d = dw * kern_f16_to_f32(kern_load_u16(xblk));
		for (int m = 0; m < 8; m++) {
			int32_t lane = 0;
			for (int j = 4 * m; j < 4 * m + 4; j++)
				lane +=
				    type == KERN_Q5_0 ? sign_product(c[j], xq[j]) : c[j] * xq[j];
			acc[m] = fmaf(d, (float)lane, acc[m]);
		}
		if (q8_1)
			summs = fmaf(mw, kern_f16_to_f32(kern_load_u16(xblk + 2)), summs);
	}
	float r[4];
	for (int i = 0; i < 4; i++)
		r[i] = acc[4 + i] + acc[i];
	const float r0 = r[0] + r[2], r1 = r[1] + r[3];
	const float h = r0 + r1;
	return q8_1 ? h + summs : h;
}

float kern_legacy_dot_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	const uint8_t *wb = w, *xb = x;
	const size_t bs = kern_type_block_bytes(type);
	const int q8_1 = type == KERN_Q4_1 || type == KERN_Q5_1;
	const size_t xs = q8_1 ? sizeof(struct kern_block_q8_1) : sizeof(struct kern_block_q8_0);
	float acc = 0.0f;
	if (type != KERN_IQ4_NL)
		return dot_lanes(type, n, wb, xb);
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const uint8_t *xblk = xb + (size_t)ib * xs;
		const int8_t *xq = (const int8_t *)(xblk + (q8_1 ? 4 : 2));
		int c[KERN_QK];
		float dw, mw;
		block_codes(type, wb + (size_t)ib * bs, c, &dw, &mw);
		int32_t sumi = 0;
		for (int j = 0; j < KERN_QK; j++)
			sumi += c[j] * xq[j];
		const float dx = kern_f16_to_f32(kern_load_u16(xblk));
		acc = fmaf((float)sumi, dw * dx, acc);
		if (q8_1)
			acc += mw * kern_f16_to_f32(kern_load_u16(xblk + 2));
	}
	return acc;
}

/* IQ4_NL weights llama.cpp does not repack (the slices of a 3-D weight in a
 * MUL_MAT): several rows go through llamafile's tinyBLAS_Q0_AVX (eight lanes
 * of four products per block, acc_m = fma(d_w * d_x, lane_m, acc_m), ggml's
 * hsum_float_8), one row through ggml_vec_dot_iq4_nl_q8_0 (even and odd blocks
 * in two such lane sets, added lane by lane before the hsum; an odd last block
 * then fused in as fma((float)sumi, d, sum)).  Other types: kern_legacy_dot_ref. */
float kern_legacy_dot_unpacked_ref(uint32_t type, int64_t n, const void *w, const void *x,
				   int batched)
{
	if (type != KERN_IQ4_NL)
		return kern_legacy_dot_ref(type, n, w, x);
	const uint8_t *wb = w, *xb = x;
	const size_t bs = kern_type_block_bytes(type), xs = sizeof(struct kern_block_q8_0);
	const int64_t nb = n / KERN_QK;
	float acc[2][8] = {{0}};
	const int64_t n_lanes = batched ? nb : nb - nb % 2; /* blocks taken in lanes */
	int64_t ib = 0;
	for (; ib < n_lanes; ib++) {
		const uint8_t *xblk = xb + (size_t)ib * xs;
		const int8_t *xq = (const int8_t *)(xblk + 2);
		int c[KERN_QK];
		float dw, mw;
		block_codes(type, wb + (size_t)ib * bs, c, &dw, &mw);
		const float d = dw * kern_f16_to_f32(kern_load_u16(xblk));
		float *a = acc[batched ? 0 : ib % 2];
		for (int m = 0; m < 8; m++) {
			int32_t lane = 0;
			for (int j = 4 * m; j < 4 * m + 4; j++)
				lane += sign_product(c[j], xq[j]);
			a[m] = fmaf(d, (float)lane, a[m]);
		}
	}
	float t[8], r[4];
	for (int m = 0; m < 8; m++)
		t[m] = acc[0][m] + acc[1][m];
	for (int i = 0; i < 4; i++)
		r[i] = t[4 + i] + t[i];
	const float r0 = r[0] + r[2], r1 = r[1] + r[3];
	float sum = r0 + r1;
	for (; ib < nb; ib++) {
		const uint8_t *xblk = xb + (size_t)ib * xs;
		const int8_t *xq = (const int8_t *)(xblk + 2);
		int c[KERN_QK];
		float dw, mw;
		block_codes(type, wb + (size_t)ib * bs, c, &dw, &mw);
		int32_t sumi = 0;
		for (int j = 0; j < KERN_QK; j++)
			sumi += c[j] * xq[j];
		sum = fmaf((float)sumi, kern_f16_to_f32(kern_load_u16(xblk)) * dw, sum);
	}
	return sum;
}
