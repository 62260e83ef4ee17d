/* kern_iq_ref: scalar reference of the grid types IQ1_S, IQ1_M, IQ2_XXS,
 * IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S (Q8_K activations, kern_kq_ref.c).
 *
 * Block layouts (GGML's, 256 values, little-endian; "group" = 8 values,
 * "sub-block" ib = values 32ib .. 32ib+31; a sign bit j set negates value j
 * of its group; grids and the 7-bit sign table in kern_iq_grid.h):
 *   IQ2_XXS  66 B: f16 d; per ib 8 bytes at 2+8ib: 4 grid indices (groups
 *            4ib..4ib+3, kern_iq2xxs_grid), then u32 a: bits 7l..7l+6 = sign
 *            index of group l, bits 28-31 = scale code s of the sub-block
 *   IQ2_XS   74 B: f16 d; u16 q[32] at 2 (group g: bits 0-8 index into
 *            kern_iq2xs_grid, bits 9-15 sign index); u8 scales[8] at 66 (low
 *            nibble: s of values 32ib..+15, high nibble: of 32ib+16..+31)
 *   IQ2_S    82 B: f16 d; qs[32] at 2 (index bits 0-7 of group g); signs[32]
 *            at 34 (8 sign bits per group); qh[8] at 66 (bits 2l, 2l+1 of
 *            qh[ib] = index bits 8-9 of group 4ib+l, kern_iq2s_grid);
 *            scales[8] at 74 as IQ2_XS
 *   IQ3_XXS  98 B: f16 d; qs[64] at 2 (index into kern_iq3xxs_grid of each 4
 *            values); u32 a[8] at 66: signs of the sub-block's groups and s
 *            as IQ2_XXS
 *   IQ3_S   110 B: f16 d; qs[64] at 2 (index bits 0-7 of each 4 values);
 *            qh[8] at 66 (bit i of qh[ib] = index bit 8 of entry 8ib+i,
 *            kern_iq3s_grid); signs[32] at 74 (8 bits per group); scales[4]
 *            at 106 (s of sub-block ib: nibble ib%2 of scales[ib/2])
 *   IQ1_S    50 B: f16 d; qs[32] at 2 (index bits 0-7 of group g); u16
 *            qh[8] at 34 (bits 3l..3l+2 = index bits 8-10 of group 4ib+l,
 *            kern_iq1s_grid; bits 12-14 = s; bit 15 set: delta -1/8 else +1/8)
 *   IQ1_M    56 B: qs[32] at 0 as IQ1_S; qh[16] at 32 (nibble l%2 of byte
 *            2ib+l/2 for group 4ib+l: bits 0-2 = index bits 8-10, bit 3 =
 *            negative delta); u16 sc[4] at 48 (bits 6(ib%2)..+2 of sc[ib/2]
 *            = s of values 32ib..+15, the next 3 bits = s of 32ib+16..+31);
 *            the block's f16 d is the top nibbles of sc[0..3], sc[k]'s in
 *            bits 4k..4k+3 of d
 * The weight of scale code s is ls = 2s+1 for every type.
 *
 * Decoded form (shared with kern_iq_avx2.c): a block is its d (f32) and 256
 * int8 w with 16 scale codes s[k] (one per 16 values) such that value v =
 * d * ls * c * w[v] with c = 1/8 (IQ2_*, IQ1_*: for IQ1, w = 8 * grid +
 * delta sign), 1/4 (IQ3_XXS) or 1 (IQ3_S).
 *
 * Dequantisation repeats GGML's dequantize_row_iq* float operations and is
 * bit-identical to them: db = d * (0.5f + s) * 0.25f (IQ2_*), d * (0.5f + s)
 * * 0.5f (IQ3_XXS), d * ls (IQ3_S, IQ1_*); y = db * w (the sign applied
 * to the grid value first, which rounds the same), IQ1: y = dl * (w * 0.125f)
 * (w * 0.125f is exactly grid + delta).
 *
 * Dot products against Q8_K (q in -127..127, as kern_convert_row makes them;
 * -128 is outside the contract), per block ib, one F32 accumulator:
 *   isum = sum over k < 16 of ls[k] * (sum over the 16 values of w * q),
 *          exactly in int32 (it cannot overflow);
 *   acc += (d_w * d_x) * (float)isum;     (blocks in order, acc from 0.0f)
 * then the result is c * acc.  No contraction (the build is ISO C11).  The
 * integer sums are GGML's (ggml_vec_dot_iq*_q8_K); for IQ1_S/IQ1_M, isum is
 * 8 * sumi + sumi_delta in GGML's names (the delta sum from the q themselves,
 * which for Q8_K blocks equals GGML's use of bsums), and GGML's per-block
 * float sequence differs only by where the exact factor 1/8 is applied. */
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"
#include "kernels/kern_iq_grid.h"

struct iq_block {
	float d;
	int8_t w[KERN_QK_K];
	uint8_t s[KERN_QK_K / 16];
};

static uint32_t load_u32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

static float load_f16(const uint8_t *p)
{
	return kern_f16_to_f32(kern_load_u16(p));
}

/* 8 values of a grid entry with sign bits: w[j] = +-byte j */
static void put_signed8(int8_t *w, uint64_t grid, unsigned signs)
{
	for (int j = 0; j < 8; j++) {
		int v = (int)((grid >> (8 * j)) & 0xff);
		w[j] = (int8_t)((signs >> j) & 1 ? -v : v);
	}
}

static void put_signed4(int8_t *w, uint32_t grid, unsigned signs)
{
	for (int j = 0; j < 4; j++) {
		int v = (int)((grid >> (8 * j)) & 0xff);
		w[j] = (int8_t)((signs >> j) & 1 ? -v : v);
	}
}

/* IQ1: w = 8 * grid + delta (delta = +-1) */
static void put_iq1(int8_t *w, uint64_t grid, int delta)
{
	for (int j = 0; j < 8; j++)
		w[j] = (int8_t)(8 * (int8_t)((grid >> (8 * j)) & 0xff) + delta);
}

static void decode_iq2_xxs(const uint8_t *b, struct iq_block *o)
{
	o->d = load_f16(b);
	for (int ib = 0; ib < 8; ib++) {
		const uint8_t *p = b + 2 + 8 * ib;
		uint32_t a = load_u32(p + 4);
		for (int l = 0; l < 4; l++)
			put_signed8(o->w + 32 * ib + 8 * l, kern_iq2xxs_grid[p[l]],
				    kern_iq_ksigns[(a >> (7 * l)) & 127]);
		o->s[2 * ib] = o->s[2 * ib + 1] = (uint8_t)(a >> 28);
	}
}

static void decode_iq2_xs(const uint8_t *b, struct iq_block *o)
{
	o->d = load_f16(b);
	for (int g = 0; g < 32; g++) {
		uint16_t q = kern_load_u16(b + 2 + 2 * g);
		put_signed8(o->w + 8 * g, kern_iq2xs_grid[q & 511], kern_iq_ksigns[q >> 9]);
	}
	for (int ib = 0; ib < 8; ib++) {
		o->s[2 * ib] = b[66 + ib] & 15;
		o->s[2 * ib + 1] = b[66 + ib] >> 4;
	}
}

static void decode_iq2_s(const uint8_t *b, struct iq_block *o)
{
	o->d = load_f16(b);
	for (int g = 0; g < 32; g++) {
		int ib = g / 4, l = g % 4;
		unsigned idx = b[2 + g] | ((unsigned)(b[66 + ib] >> (2 * l)) & 3) << 8;
		put_signed8(o->w + 8 * g, kern_iq2s_grid[idx], b[34 + g]);
	}
	for (int ib = 0; ib < 8; ib++) {
		o->s[2 * ib] = b[74 + ib] & 15;
		o->s[2 * ib + 1] = b[74 + ib] >> 4;
	}
}

static void decode_iq3_xxs(const uint8_t *b, struct iq_block *o)
{
	o->d = load_f16(b);
	for (int ib = 0; ib < 8; ib++) {
		uint32_t a = load_u32(b + 66 + 4 * ib);
		for (int l = 0; l < 4; l++) {
			unsigned signs = kern_iq_ksigns[(a >> (7 * l)) & 127];
			int8_t *w = o->w + 32 * ib + 8 * l;
			put_signed4(w, kern_iq3xxs_grid[b[2 + 8 * ib + 2 * l]], signs);
			put_signed4(w + 4, kern_iq3xxs_grid[b[2 + 8 * ib + 2 * l + 1]], signs >> 4);
		}
		o->s[2 * ib] = o->s[2 * ib + 1] = (uint8_t)(a >> 28);
	}
}

static void decode_iq3_s(const uint8_t *b, struct iq_block *o)
{
	o->d = load_f16(b);
	for (int ib = 0; ib < 8; ib++) {
		unsigned qh = b[66 + ib];
		for (int i = 0; i < 8; i++) {
			unsigned idx = b[2 + 8 * ib + i] | ((qh >> i) & 1) << 8;
			unsigned signs = b[74 + 4 * ib + i / 2] >> (4 * (i % 2));
			put_signed4(o->w + 32 * ib + 4 * i, kern_iq3s_grid[idx], signs);
		}
		uint8_t sc = b[106 + ib / 2];
		o->s[2 * ib] = o->s[2 * ib + 1] = ib % 2 ? sc >> 4 : sc & 15;
	}
}

static void decode_iq1_s(const uint8_t *b, struct iq_block *o)
{
	o->d = load_f16(b);
	for (int ib = 0; ib < 8; ib++) {
		uint16_t qh = kern_load_u16(b + 34 + 2 * ib);
		int delta = qh & 0x8000 ? -1 : 1;
		for (int l = 0; l < 4; l++) {
			unsigned idx = b[2 + 4 * ib + l] | ((unsigned)(qh >> (3 * l)) & 7) << 8;
			put_iq1(o->w + 32 * ib + 8 * l, kern_iq1s_grid[idx], delta);
		}
		o->s[2 * ib] = o->s[2 * ib + 1] = (qh >> 12) & 7;
	}
}

/* IQ1_M's f16 d from the top nibbles of its four scale words */
static uint16_t iq1_m_d_bits(const uint8_t *b)
{
	uint16_t sc[4];
	for (int k = 0; k < 4; k++)
		sc[k] = kern_load_u16(b + 48 + 2 * k);
	return (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) |
			  (sc[3] & 0xf000));
}

static void decode_iq1_m(const uint8_t *b, struct iq_block *o)
{
	o->d = kern_f16_to_f32(iq1_m_d_bits(b));
	for (int ib = 0; ib < 8; ib++) {
		for (int l = 0; l < 4; l++) {
			unsigned qh = b[32 + 2 * ib + l / 2] >> (4 * (l % 2));
			unsigned idx = b[4 * ib + l] | (qh & 7) << 8;
			put_iq1(o->w + 32 * ib + 8 * l, kern_iq1s_grid[idx], qh & 8 ? -1 : 1);
		}
		unsigned sc = kern_load_u16(b + 48 + 2 * (ib / 2)) >> (6 * (ib % 2));
		o->s[2 * ib] = sc & 7;
		o->s[2 * ib + 1] = (sc >> 3) & 7;
	}
}

static void decode(uint32_t type, const uint8_t *b, struct iq_block *o)
{
	switch (type) {
	case KERN_IQ2_XXS: decode_iq2_xxs(b, o); break;
	case KERN_IQ2_XS: decode_iq2_xs(b, o); break;
	case KERN_IQ2_S: decode_iq2_s(b, o); break;
	case KERN_IQ3_XXS: decode_iq3_xxs(b, o); break;
	case KERN_IQ3_S: decode_iq3_s(b, o); break;
	case KERN_IQ1_S: decode_iq1_s(b, o); break;
	default: decode_iq1_m(b, o); break;
	}
}

void kern_iq_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	const size_t bs = kern_type_block_bytes(type);
	const uint8_t *s = src;
	struct iq_block blk;
	if (kern_type_family(type) != KERN_FAM_IQ)
		return;
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		decode(type, s + (size_t)ib * bs, &blk);
		float *y = dst + ib * KERN_QK_K;
		for (int k = 0; k < KERN_QK_K / 16; k++) {
			const int sk = blk.s[k];
			const int8_t *w = blk.w + 16 * k;
			float db;
			switch (type) {
			case KERN_IQ2_XXS:
			case KERN_IQ2_XS:
			case KERN_IQ2_S: db = blk.d * (0.5f + sk) * 0.25f; break;
			case KERN_IQ3_XXS: db = blk.d * (0.5f + sk) * 0.5f; break;
			default: db = blk.d * (2 * sk + 1); break;
			}
			if (type == KERN_IQ1_S || type == KERN_IQ1_M)
				for (int j = 0; j < 16; j++)
					y[16 * k + j] = db * ((float)w[j] * 0.125f);
			else
				for (int j = 0; j < 16; j++)
					y[16 * k + j] = db * (float)w[j];
		}
	}
}

/* c of the header: the exact power of two applied to the sum at the end */
static float type_factor(uint32_t type)
{
	switch (type) {
	case KERN_IQ3_XXS: return 0.25f;
	case KERN_IQ3_S: return 1.0f;
	default: return 0.125f;
	}
}

float kern_iq_dot_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	const size_t bs = kern_type_block_bytes(type);
	const uint8_t *wb = w;
	const struct kern_block_q8_k *xb = x;
	struct iq_block blk;
	float acc = 0.0f;
	if (kern_type_family(type) != KERN_FAM_IQ)
		return 0.0f;
	for (int64_t ib = 0; ib < n / KERN_QK_K; ib++) {
		decode(type, wb + (size_t)ib * bs, &blk);
		int32_t isum = 0;
		for (int k = 0; k < KERN_QK_K / 16; k++) {
			int32_t sum = 0;
			for (int j = 0; j < 16; j++)
				sum += blk.w[16 * k + j] * xb[ib].qs[16 * k + j];
			isum += (2 * blk.s[k] + 1) * sum;
		}
		acc += (blk.d * xb[ib].d) * (float)isum;
	}
	return type_factor(type) * acc;
}
