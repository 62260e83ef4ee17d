/* kern_kq_ref: scalar reference of the 256-value K-quants (Q2_K, Q3_K, Q4_K,
 * Q5_K, Q6_K) and IQ4_XS, and of their Q8_K activations.
 *
 * Block layouts (GGML's, little-endian; f16 fields are IEEE halves).  A block
 * holds 256 values; "group g" is values 16g .. 16g+15, "sub-block s" values
 * 32s .. 32s+31; h = value / 128, l = value % 32:
 *   Q2_K   84 bytes: scales[16], qs[64], f16 d, f16 dmin.  Value v of group g:
 *          q = (qs[32h + l] >> 2j) & 3 with j = (v / 32) % 4;
 *          x = d * (scales[g] & 15) * q - dmin * (scales[g] >> 4).
 *   Q3_K  110 bytes: hmask[32], qs[64], scales[12], f16 d.  Low bits as Q2_K,
 *          high bit (hmask[l] >> (v / 32)) & 1; q = low - (high ? 0 : 4);
 *          group scale s_g (6 bits): low 4 bits scales[g] & 15 (g < 8) or
 *          scales[g - 8] >> 4, high 2 bits (scales[8 + g % 4] >> 2 (g / 4)) & 3;
 *          x = d * (s_g - 32) * q.
 *   Q4_K  144 bytes: f16 d, f16 dmin, scales[12], qs[128].  Sub-block s:
 *          q = qs[32 (s / 2) + l] low nibble (s even) or high nibble (s odd);
 *          6-bit scale sc_s and min m_s: for s < 4 scales[s] & 63 and
 *          scales[s + 4] & 63, else (scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4
 *          and (scales[s + 4] >> 4) | (scales[s] >> 6) << 4;
 *          x = d * sc_s * q - dmin * m_s.
 *   Q5_K  176 bytes: f16 d, f16 dmin, scales[12], qh[32], qs[128].  As Q4_K
 *          with q += 16 * ((qh[l] >> s) & 1).
 *   Q6_K  210 bytes: ql[128], qh[64], int8 scales[16], f16 d.  Value v, with
 *          k = (v / 32) % 4: q = ((ql[64h + 32 (k & 1) + l] >> 4 (k / 2)) & 15)
 *          | ((qh[32h + l] >> 2k) & 3) << 4; x = d * scales[g] * (q - 32).
 *   IQ4_XS 136 bytes: f16 d, u16 scales_h, scales_l[4], qs[128].  Sub-block s:
 *          ls = ((scales_l[s / 2] >> 4 (s % 2)) & 15) | ((scales_h >> 2s) & 3) << 4;
 *          values 32s + j (j < 16) from the low nibbles of qs[16s + j], 32s + 16 + j
 *          from the high ones; x = d * (ls - 32) * kvalues_iq4nl[nibble].
 * Dequantisation follows ggml's dequantize_row_* operation by operation
 * (scale products first, e.g. (d * sc) * q - dmin * m); the products are exact
 * in F32 except Q6_K's last one, so any FMA contraction would agree.
 *
 * Dot with a Q8_K row (d_x, q8, bsums), per block, in exact int32:
 *   Q2_K   isum = sum_g (scales[g] & 15) * sum_{v in g} q_v q8_v,
 *          msum = sum_g (scales[g] >> 4) * bsums[g]
 *   Q3_K   isum = sum_g (s_g - 32) * sum_{v in g} q_v q8_v
 *   Q4_K, Q5_K  isum = sum_s sc_s * sum_{v in s} q_v q8_v,
 *          msum = sum_s m_s * (bsums[2s] + bsums[2s + 1])
 *   Q6_K   isum = sum_g scales[g] * sum_{v in g} (q_v - 32) q8_v
 *   IQ4_XS isum = sum_s (ls_s - 32) * sum_{v in s} kvalues_iq4nl[q_v] q8_v
 * (the integers ggml's ggml_vec_dot_*_q8_K form).  The float steps follow
 * the kernel llama.cpp's x86 CPU backend runs for the type:
 *   Q2_K, Q4_K (repacked at load, ggml's q*_K_8x8 GEMV, one output per
 *   vector lane; its GEMM for batched dense rows: kern_kq_dot_gemm_ref): two
 *   accumulators in block order,
 *     acc = fma((float)isum, d_w * d_x, acc);
 *     accm = fma((float)msum, dmin_w * d_x, accm);   result acc - accm.
 *   Q3_K, Q5_K, Q6_K, IQ4_XS (ggml_vec_dot_*_q8_K, AVX2 code): isum split in
 *   eight int32 lanes, lane m = sum over the 32-value chunks c of
 *   s_(2c + m/4) * sum of q_v q8_v for v = 32c + 4m .. 32c + 4m + 3 (Q6_K
 *   with the unsigned codes q + 32, less 32 (s_2m bsums_2m + s_2m+1
 *   bsums_2m+1)); per block acc_m = fma(d_w * d_x, (float)lane_m, acc_m);
 *   Q5_K's mins apart: summs = fma(-(d_x * dmin_w), (float)msum, summs);
 *   result = ((acc_0 + acc_4) + (acc_2 + acc_6)) + ((acc_1 + acc_5) +
 *   (acc_3 + acc_7)) (+ summs for Q5_K).
 * That is the contract the AVX2 kernels reproduce bit for bit.  They
 * take Q6_K's code offset 32 and the mins through bsums, so a Q8_K row's
 * bsums must be the sums of its q (as the quantiser writes them).
 * int32 bounds with |q8| <= 128: Q2_K |isum| <= 16*15*16*3*128 = 1.5e6,
 * |msum| <= 16*15*2048 = 4.9e5; Q3_K 16*32*16*4*128 = 4.2e6; Q4_K 8*63*32*15*128
 * = 3.1e7, msum 8*63*4096 = 2.1e6; Q5_K 8*63*32*31*128 = 6.4e7; Q6_K
 * 16*128*16*32*128 = 1.3e8; IQ4_XS 8*32*32*127*128 = 1.3e8: all far below 2^31.
 *
 * Q8_K (GGML's quantize_row_q8_K_ref, which llama.cpp's x86 CPU backend
 * uses): per 256 values, max = the value of largest magnitude with its sign
 * (the first on a tie), iscale = -127 / max, q = min(127, round-half-even(
 * iscale * x)), d = 1 / iscale as f32, bsums[j] = sum of q[16j .. 16j+15].
 * An all-zero block gives d = 0, q = 0, bsums = 0.  |iscale * x| rounds to at
 * most 127, so q is in [-127, 127].  A Q8_K row dequantises to d * q. */
#include <math.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

/* IQ4_XS code values (ggml's kvalues_iq4nl) */
static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
					 1,    13,   25,  38,  53,  69,	 89,  113};

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

/* ------------------------------------------------------- block decoding */

/* The integer content of one block: weight codes w[v] (signed, as they
 * multiply the activations), per-group scales sc[g] and mins mn[g] (groups
 * of 16; a sub-block's scale repeated for both its groups), the f16 d and
 * dmin (dmin 0 for types without mins). */
struct kq_block {
	int8_t w[KERN_QK_K];
	int16_t sc[16];
	int16_t mn[16];
	float d, dmin;
	int has_min;
};

static void k4_scale_min(int s, const uint8_t *q, int *sc, int *m)
{
	if (s < 4) {
		*sc = q[s] & 63;
		*m = q[s + 4] & 63;
	} else {
		*sc = (q[s + 4] & 15) | ((q[s - 4] >> 6) << 4);
		*m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
	}
}

static float f16_at(const uint8_t *p)
{
	return kern_f16_to_f32(kern_load_u16(p));
}

static void kq_decode(uint32_t type, const uint8_t *b, struct kq_block *k)
{
	k->dmin = 0.0f;
	k->has_min = 0;
	memset(k->mn, 0, sizeof(k->mn));
	switch (type) {
	case KERN_Q2_K:
		for (int v = 0; v < KERN_QK_K; v++)
			k->w[v] =
			    (int8_t)((b[16 + 32 * (v / 128) + v % 32] >> (2 * ((v / 32) % 4))) & 3);
		for (int g = 0; g < 16; g++) {
			k->sc[g] = b[g] & 15;
			k->mn[g] = b[g] >> 4;
		}
		k->d = f16_at(b + 80);
		k->dmin = f16_at(b + 82);
		k->has_min = 1;
		break;
	case KERN_Q3_K:
		for (int v = 0; v < KERN_QK_K; v++) {
			int low = (b[32 + 32 * (v / 128) + v % 32] >> (2 * ((v / 32) % 4))) & 3;
			int high = (b[v % 32] >> (v / 32)) & 1;
			k->w[v] = (int8_t)(low - (high ? 0 : 4));
		}
		for (int g = 0; g < 16; g++) {
			const uint8_t *s = b + 96;
			int lo = g < 8 ? s[g] & 15 : s[g - 8] >> 4;
			int hi = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
			k->sc[g] = (int16_t)((lo | hi << 4) - 32);
		}
		k->d = f16_at(b + 108);
		break;
	case KERN_Q4_K:
	case KERN_Q5_K: {
		const int five = type == KERN_Q5_K;
		const uint8_t *qs = b + (five ? 48 : 16);
		for (int v = 0; v < KERN_QK_K; v++) {
			int s = v / 32, l = v % 32;
			int q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 15;
			if (five)
				q += 16 * ((b[16 + l] >> s) & 1);
			k->w[v] = (int8_t)q;
		}
		for (int s = 0; s < 8; s++) {
			int sc, m;
			k4_scale_min(s, b + 4, &sc, &m);
			k->sc[2 * s] = k->sc[2 * s + 1] = (int16_t)sc;
			k->mn[2 * s] = k->mn[2 * s + 1] = (int16_t)m;
		}
		k->d = f16_at(b);
		k->dmin = f16_at(b + 2);
		k->has_min = 1;
		break;
	}
	case KERN_Q6_K:
		for (int v = 0; v < KERN_QK_K; v++) {
			int h = v / 128, kk = (v / 32) % 4, l = v % 32;
			int lo = (b[64 * h + 32 * (kk & 1) + l] >> (4 * (kk / 2))) & 15;
			int hi = (b[128 + 32 * h + l] >> (2 * kk)) & 3;
			k->w[v] = (int8_t)((lo | hi << 4) - 32);
		}
		for (int g = 0; g < 16; g++)
			k->sc[g] = (int8_t)b[192 + g];
		k->d = f16_at(b + 208);
		break;
	default: { /* IQ4_XS */
		const unsigned sh = kern_load_u16(b + 2);
		for (int s = 0; s < 8; s++) {
			int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 15) | ((sh >> (2 * s)) & 3)
									      << 4;
			k->sc[2 * s] = k->sc[2 * s + 1] = (int16_t)(ls - 32);
			for (int j = 0; j < 16; j++) {
				uint8_t q = b[8 + 16 * s + j];
				k->w[32 * s + j] = kvalues_iq4nl[q & 15];
				k->w[32 * s + 16 + j] = kvalues_iq4nl[q >> 4];
			}
		}
		k->d = f16_at(b);
		break;
	}
	}
}

/* ------------------------------------------------------------- dequant */

void kern_kq_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	const size_t bs = kern_type_block_bytes(type);
	const uint8_t *s = src;
	struct kq_block k;
	if (type == KERN_Q8_K) { /* activations: x = d * q (ggml's dequantize_row_q8_K) */
		const struct kern_block_q8_k *b = src;
		for (int64_t ib = 0; ib < n / KERN_QK_K; ib++, dst += KERN_QK_K)
			for (int j = 0; j < KERN_QK_K; j++)
				dst[j] = b[ib].d * (float)b[ib].qs[j];
		return;
	}
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++, dst += KERN_QK_K) {
		kq_decode(type, s + (size_t)ib * bs, &k);
		for (int g = 0; g < 16; g++) {
			const float dl = k.d * (float)k.sc[g];
			const float ml = k.dmin * (float)k.mn[g];
			for (int j = 16 * g; j < 16 * g + 16; j++) {
				if (k.has_min)
					dst[j] = dl * (float)k.w[j] - ml;
				else
					dst[j] = dl * (float)k.w[j];
			}
		}
	}
}

/* ----------------------------------------------------------------- dot */

/* Q3_K, Q5_K, Q6_K and IQ4_XS: ggml's ggml_vec_dot_*_q8_K (x86 AVX2 code,
 * which llama.cpp's AVX2 and AVX-512 CPU builds both run for these types) keeps
 * eight int32 lanes per block, lane m summing values 32c + 4m .. 32c + 4m + 3
 * of every 32-value chunk c times their group scale, and accumulates each lane
 * in F32 with a fused multiply-add. */
static int kq_lane_type(uint32_t type)
{
	return type == KERN_Q3_K || type == KERN_Q5_K || type == KERN_Q6_K || type == KERN_IQ4_XS;
}

/* _mm256 horizontal sum as ggml's hsum_float_8: halves, then pairs. */
static float kq_hsum8(const float *a)
{
	float r[4];
	for (int i = 0; i < 4; i++)
		r[i] = a[4 + i] + a[i];
	const float r0 = r[0] + r[2], r1 = r[1] + r[3];
	return r0 + r1;
}

static float kq_dot_lanes(uint32_t type, int64_t n, const uint8_t *wb,
			  const struct kern_block_q8_k *xb)
{
	const size_t bs = kern_type_block_bytes(type);
	struct kq_block k;
	float acc[8] = {0}, summs = 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		kq_decode(type, wb + (size_t)ib * bs, &k);
		const int off = type == KERN_Q6_K ? 32 : 0; /* Q6_K: unsigned codes */
		int32_t lane[8] = {0};
		for (int c = 0; c < 8; c++)
			for (int m = 0; m < 8; m++) {
				const int v0 = 32 * c + 4 * m;
				int32_t s = 0;
				for (int j = v0; j < v0 + 4; j++)
					s += (k.w[j] + off) * xb[ib].qs[j];
				lane[m] += k.sc[2 * c + m / 4] * s;
			}
		if (off)
			for (int m = 0; m < 8; m++)
				lane[m] -= off * (k.sc[2 * m] * xb[ib].bsums[2 * m] +
						  k.sc[2 * m + 1] * xb[ib].bsums[2 * m + 1]);
		const float dx = xb[ib].d;
		const float d = k.d * dx;
		for (int m = 0; m < 8; m++)
			acc[m] = fmaf(d, (float)lane[m], acc[m]);
		if (k.has_min) {
			int32_t msum = 0;
			for (int g = 0; g < 16; g++)
				msum += k.mn[g] * xb[ib].bsums[g];
			summs = fmaf(-(dx * k.dmin), (float)msum, summs);
		}
	}
	const float h = kq_hsum8(acc);
	return type == KERN_Q5_K ? h + summs : h;
}

float kern_kq_dot_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	const size_t bs = kern_type_block_bytes(type);
	const uint8_t *wb = w;
	const struct kern_block_q8_k *xb = x;
	struct kq_block k;
	float acc = 0.0f, accm = 0.0f;
	if (type == KERN_Q8_K) /* not a weight type */
		return 0.0f;
	if (kq_lane_type(type))
		return kq_dot_lanes(type, n, wb, xb);
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		kq_decode(type, wb + (size_t)ib * bs, &k);
		int32_t isum = 0, msum = 0;
		for (int g = 0; g < 16; g++) {
			int32_t s = 0;
			for (int j = 16 * g; j < 16 * g + 16; j++)
				s += k.w[j] * xb[ib].qs[j];
			isum += k.sc[g] * s;
			msum += k.mn[g] * xb[ib].bsums[g];
		}
		const float dx = xb[ib].d;
		acc = fmaf((float)isum, k.d * dx, acc);
		accm = fmaf((float)msum, k.dmin * dx, accm);
	}
	return acc - accm;
}

/* IQ4_XS in ggml's IQ panel GEMM (dense products of at least 8 rows, experts
 * with at least 8 rows): per block acc = fma((float)isum, d_w * d_x, acc). */
static float kq_dot_panel(int64_t n, const uint8_t *wb, const struct kern_block_q8_k *xb)
{
	const size_t bs = kern_type_block_bytes(KERN_IQ4_XS);
	struct kq_block k;
	float acc = 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		kq_decode(KERN_IQ4_XS, wb + (size_t)ib * bs, &k);
		int32_t isum = 0;
		for (int g = 0; g < 16; g++) {
			int32_t s = 0;
			for (int j = 16 * g; j < 16 * g + 16; j++)
				s += k.w[j] * xb[ib].qs[j];
			isum += k.sc[g] * s;
		}
		acc = fmaf((float)isum, k.d * xb[ib].d, acc);
	}
	return acc;
}

/* Q2_K, Q4_K rows of a batched dense product: ggml's repacked GEMM (rows in
 * groups of four) accumulates per step of 64 values (Q4_K: sub-blocks 2s,
 * 2s + 1) or 128 values (Q2_K: groups 8h .. 8h + 7) instead of per block:
 *   acc = fma((float)isum_step, d_w * d_x, acc);
 *   accm = fma((float)msum_step, dmin_w * d_x, accm);   result acc - accm.
 * Other types: kern_kq_dot_ref. */
float kern_kq_dot_gemm_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	if (type == KERN_IQ4_XS)
		return kq_dot_panel(n, w, x);
	if (type != KERN_Q2_K && type != KERN_Q4_K)
		return kern_kq_dot_ref(type, n, w, x);
	const size_t bs = kern_type_block_bytes(type);
	const uint8_t *wb = w;
	const struct kern_block_q8_k *xb = x;
	const int gps = type == KERN_Q4_K ? 4 : 8; /* groups of 16 per step */
	struct kq_block k;
	float acc = 0.0f, accm = 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		kq_decode(type, wb + (size_t)ib * bs, &k);
		const float dx = xb[ib].d;
		for (int g0 = 0; g0 < 16; g0 += gps) {
			int32_t isum = 0, msum = 0;
			for (int g = g0; g < g0 + gps; g++) {
				int32_t s = 0;
				for (int j = 16 * g; j < 16 * g + 16; j++)
					s += k.w[j] * xb[ib].qs[j];
				isum += k.sc[g] * s;
				msum += k.mn[g] * xb[ib].bsums[g];
			}
			acc = fmaf((float)isum, k.d * dx, acc);
			accm = fmaf((float)msum, k.dmin * dx, accm);
		}
	}
	return acc - accm;
}
