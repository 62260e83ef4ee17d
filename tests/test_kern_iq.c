/* test_kern_iq: the grid types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
 * IQ3_XXS, IQ3_S) against Q8_K activations.
 *
 *  - the tables: value sets of the grids, sign-table parity;
 *  - kern_dequant_row_ref against the oracle's independent decoder on the
 *    blocks of tests/data/iq-blocks.bin (tools/iq_blocks.mjs), bit for bit;
 *  - the reference dot against a double-precision sum of dequantised weights
 *    times dequantised activations;
 *  - when the CPU has AVX2: dequantisation, kern_dot and kern_matmul (1..7
 *    activation rows, output ranges of any width) against the scalar
 *    references bit for bit, on random blocks and on rows that go through
 *    every grid index, sign pattern, scale code and delta sign, with
 *    negative, zero and subnormal d, and activations of +-127 and zero
 *    blocks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"
#include "kern_test.h"
#include "kernels/kern_iq_grid.h"

static const uint32_t iq_types[] = {KERN_IQ2_XXS, KERN_IQ2_XS, KERN_IQ2_S, KERN_IQ3_XXS,
				    KERN_IQ3_S,	  KERN_IQ1_S,  KERN_IQ1_M};
#define N_IQ (sizeof(iq_types) / sizeof(iq_types[0]))

#define Q8K_BYTES 292 /* f32 d, 256 int8, 16 int16 sums */

/* ----------------------------------------------------------- helpers */

static unsigned get16(const uint8_t *p)
{
	return p[0] | (unsigned)p[1] << 8;
}

static void put16(uint8_t *p, unsigned v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static uint32_t get32(const uint8_t *p)
{
	return get16(p) | (uint32_t)get16(p + 2) << 16;
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, v & 0xffff);
	put16(p + 2, v >> 16);
}

static int have_avx2(void)
{
	kern_init();
	return kern_cpu_avx2();
}

/* ------------------------------------------- block fields, per type */

/* Grid entries per block (8 values each, IQ3: 4) and their index range. */
static int n_entries(uint32_t t)
{
	return t == KERN_IQ3_XXS || t == KERN_IQ3_S ? 64 : 32;
}

static unsigned n_index(uint32_t t)
{
	switch (t) {
	case KERN_IQ2_XXS: return 256;
	case KERN_IQ2_XS: return 512;
	case KERN_IQ2_S: return 1024;
	case KERN_IQ3_XXS: return 256;
	case KERN_IQ3_S: return 512;
	default: return 2048;
	}
}

/* Sign patterns per group of 8: 128 (7 stored bits), 256, or none (IQ1). */
static unsigned n_signs(uint32_t t)
{
	switch (t) {
	case KERN_IQ2_XXS:
	case KERN_IQ2_XS:
	case KERN_IQ3_XXS: return 128;
	case KERN_IQ2_S:
	case KERN_IQ3_S: return 256;
	default: return 0;
	}
}

/* Scale codes per block and their number of bits. */
static int n_scales(uint32_t t)
{
	return t == KERN_IQ2_XS || t == KERN_IQ2_S || t == KERN_IQ1_M ? 16 : 8;
}

static unsigned n_codes(uint32_t t)
{
	return t == KERN_IQ1_S || t == KERN_IQ1_M ? 8 : 16;
}

static void set_bits16(uint8_t *p, int shift, int width, unsigned v)
{
	unsigned m = ((1u << width) - 1) << shift;
	put16(p, (get16(p) & ~m) | ((v << shift) & m));
}

static void set_bits32(uint8_t *p, int shift, int width, uint32_t v)
{
	uint32_t m = ((1u << width) - 1) << shift;
	put32(p, (get32(p) & ~m) | ((v << shift) & m));
}

static void set_index(uint32_t t, uint8_t *b, int e, unsigned idx)
{
	switch (t) {
	case KERN_IQ2_XXS: b[2 + 8 * (e / 4) + e % 4] = (uint8_t)idx; break;
	case KERN_IQ2_XS: set_bits16(b + 2 + 2 * e, 0, 9, idx); break;
	case KERN_IQ2_S:
		b[2 + e] = (uint8_t)idx;
		b[66 + e / 4] = (uint8_t)((b[66 + e / 4] & ~(3 << (2 * (e % 4)))) |
					  ((idx >> 8) & 3) << (2 * (e % 4)));
		break;
	case KERN_IQ3_XXS: b[2 + e] = (uint8_t)idx; break;
	case KERN_IQ3_S:
		b[2 + e] = (uint8_t)idx;
		b[66 + e / 8] =
		    (uint8_t)((b[66 + e / 8] & ~(1 << (e % 8))) | ((idx >> 8) & 1) << (e % 8));
		break;
	case KERN_IQ1_S:
		b[2 + e] = (uint8_t)idx;
		set_bits16(b + 34 + 2 * (e / 4), 3 * (e % 4), 3, idx >> 8);
		break;
	default: { /* IQ1_M */
		uint8_t *h = &b[32 + 2 * (e / 4) + (e % 4) / 2];
		int sh = 4 * (e % 2);
		b[e] = (uint8_t)idx;
		*h = (uint8_t)((*h & ~(7 << sh)) | ((idx >> 8) & 7) << sh);
		break;
	}
	}
}

static void set_signs(uint32_t t, uint8_t *b, int g, unsigned v)
{
	switch (t) {
	case KERN_IQ2_XXS: set_bits32(b + 2 + 8 * (g / 4) + 4, 7 * (g % 4), 7, v); break;
	case KERN_IQ2_XS: set_bits16(b + 2 + 2 * g, 9, 7, v); break;
	case KERN_IQ2_S: b[34 + g] = (uint8_t)v; break;
	case KERN_IQ3_XXS: set_bits32(b + 66 + 4 * (g / 4), 7 * (g % 4), 7, v); break;
	case KERN_IQ3_S: b[74 + g] = (uint8_t)v; break;
	default: break;
	}
}

static void set_scale(uint32_t t, uint8_t *b, int k, unsigned v)
{
	switch (t) {
	case KERN_IQ2_XXS: set_bits32(b + 2 + 8 * k + 4, 28, 4, v); break;
	case KERN_IQ2_XS:
		b[66 + k / 2] =
		    (uint8_t)((b[66 + k / 2] & (k % 2 ? 0x0f : 0xf0)) | (v & 15) << (4 * (k % 2)));
		break;
	case KERN_IQ2_S:
		b[74 + k / 2] =
		    (uint8_t)((b[74 + k / 2] & (k % 2 ? 0x0f : 0xf0)) | (v & 15) << (4 * (k % 2)));
		break;
	case KERN_IQ3_XXS: set_bits32(b + 66 + 4 * k, 28, 4, v); break;
	case KERN_IQ3_S:
		b[106 + k / 2] =
		    (uint8_t)((b[106 + k / 2] & (k % 2 ? 0x0f : 0xf0)) | (v & 15) << (4 * (k % 2)));
		break;
	case KERN_IQ1_S: set_bits16(b + 34 + 2 * k, 12, 3, v); break;
	default: set_bits16(b + 48 + 2 * (k / 4), 3 * (k % 4), 3, v); break;
	}
}

/* IQ1 delta sign (neg = 1: -1/8): IQ1_S per 32 values (j < 8), IQ1_M per
 * group (j < 32). */
static void set_delta(uint32_t t, uint8_t *b, int j, int neg)
{
	if (t == KERN_IQ1_S) {
		set_bits16(b + 34 + 2 * j, 15, 1, (unsigned)neg);
	} else if (t == KERN_IQ1_M) {
		uint8_t *h = &b[32 + 2 * (j / 4) + (j % 4) / 2];
		int bit = 3 + 4 * (j % 2);
		*h = (uint8_t)((*h & ~(1 << bit)) | neg << bit);
	}
}

static void set_d(uint32_t t, uint8_t *b, uint16_t d)
{
	if (t == KERN_IQ1_M)
		for (int k = 0; k < 4; k++)
			set_bits16(b + 48 + 2 * k, 12, 4, (d >> (4 * k)) & 15);
	else
		put16(b, d);
}

/* d values of the systematic rows: ordinary, negative, zero, -0, subnormal,
 * the largest f16 */
static const uint16_t d_cases[] = {0x3800, 0xb400, 0x1e66, 0x9a66, 0x0000,
				   0x8000, 0x0001, 0x83ff, 0x7bff, 0x2c00};
#define N_D_CASES (sizeof(d_cases) / sizeof(d_cases[0]))

/* Random block: random bytes, d of random sign and magnitude 2^-12 .. 2. */
static void fill_random(uint32_t t, uint8_t *b)
{
	size_t bs = kern_type_block_bytes(t);
	for (size_t j = 0; j < bs; j++)
		b[j] = (uint8_t)rng_u32();
	float d = ldexpf(1.0f + 0.5f * rng_f(), (int)(rng_u32() % 13) - 12);
	set_d(t, b, kern_f32_to_f16(rng_u32() & 1 ? -d : d));
}

/* Block ib of a systematic row: entry c of the row (counting across blocks)
 * takes index c mod n_index, group c sign pattern 5c mod n_signs, scale slot
 * c code c mod n_codes, delta slot c sign (c / 3) odd; a row of 64 blocks
 * passes through every value of every field. */
static void fill_system(uint32_t t, uint8_t *b, int ib)
{
	fill_random(t, b);
	for (int e = 0; e < n_entries(t); e++)
		set_index(t, b, e, (unsigned)(ib * n_entries(t) + e) % n_index(t));
	if (n_signs(t))
		for (int g = 0; g < 32; g++)
			set_signs(t, b, g, (unsigned)(5 * (ib * 32 + g)) % n_signs(t));
	for (int k = 0; k < n_scales(t); k++)
		set_scale(t, b, k, (unsigned)(ib * n_scales(t) + k) % n_codes(t));
	int nd = t == KERN_IQ1_S ? 8 : t == KERN_IQ1_M ? 32 : 0;
	for (int j = 0; j < nd; j++)
		set_delta(t, b, j, ((ib * nd + j) / 3) % 2);
	set_d(t, b, d_cases[ib % N_D_CASES]);
}

/* A row of nb weight blocks: random or systematic (starting at block b0). */
static void fill_row(uint32_t t, uint8_t *w, int nb, int system, int b0)
{
	size_t bs = kern_type_block_bytes(t);
	for (int ib = 0; ib < nb; ib++) {
		if (system)
			fill_system(t, w + (size_t)ib * bs, b0 + ib);
		else
			fill_random(t, w + (size_t)ib * bs);
	}
}

/* Q8_K activation block: kind 0 random q in -127..127, 1 q = +-127, 2 all
 * zero (d = 0), 3 quantised from random floats by the Q8_K quantiser. */
static void fill_q8k(uint8_t *x, int kind)
{
	int8_t q[256];
	float d = ldexpf(1.0f + 0.5f * rng_f(), (int)(rng_u32() % 16) - 12);
	if (rng_u32() & 1)
		d = -d;
	if (kind == 3) {
		float v[256];
		float scale = ldexpf(1.0f, (int)(rng_u32() % 10) - 5);
		for (int j = 0; j < 256; j++)
			v[j] = rng_f() * scale;
		kern_convert_row_ref(KERN_Q8_K, v, x, 256);
		return;
	}
	for (int j = 0; j < 256; j++) {
		if (kind == 0)
			q[j] = (int8_t)((int)(rng_u32() % 255) - 127);
		else if (kind == 1)
			q[j] = rng_u32() & 1 ? 127 : -127;
		else
			q[j] = 0;
	}
	if (kind == 2)
		d = 0.0f;
	memcpy(x, &d, 4);
	memcpy(x + 4, q, 256);
	for (int k = 0; k < 16; k++) {
		int s = 0;
		for (int j = 0; j < 16; j++)
			s += q[16 * k + j];
		put16(x + 260 + 2 * k, (unsigned)(uint16_t)(int16_t)s);
	}
}

static void fill_act_row(uint8_t *x, int nb)
{
	for (int ib = 0; ib < nb; ib++) {
		uint32_t r = rng_u32() % 8;
		fill_q8k(x + (size_t)ib * Q8K_BYTES, r < 4 ? 0 : r == 4 ? 1 : r == 5 ? 2 : 3);
	}
}

static void assert_same_f32(const char *what, uint32_t t, int i, float got, float want)
{
	if (f2u(got) != f2u(want)) {
		print_error("%s %s [%d]: got %.9g (%08x) want %.9g (%08x)\n", what,
			    kern_type_name(t), i, got, f2u(got), want, f2u(want));
		fail();
	}
}

/* ------------------------------------------------------------- tests */

static int popcount8(unsigned v)
{
	int n = 0;
	for (; v; v >>= 1)
		n += (int)(v & 1);
	return n;
}

static void test_tables(void **state)
{
	(void)state;
	for (int i = 0; i < 128; i++) {
		assert_int_equal(kern_iq_ksigns[i] & 127, i);
		assert_int_equal(popcount8(kern_iq_ksigns[i]) % 2, 0);
		for (int j = 0; j < 8; j++) {
			unsigned byte = (unsigned)(kern_iq_sign8[i] >> (8 * j)) & 0xff;
			assert_int_equal(byte, (kern_iq_ksigns[i] >> j) & 1 ? 0xff : 0x01);
		}
	}
	const uint64_t *g8[] = {kern_iq2xxs_grid, kern_iq2xs_grid, kern_iq2s_grid};
	const int n8[] = {256, 512, 1024};
	for (int t = 0; t < 3; t++)
		for (int i = 0; i < n8[t]; i++)
			for (int j = 0; j < 8; j++) {
				unsigned v = (unsigned)(g8[t][i] >> (8 * j)) & 0xff;
				assert_true(v == 8 || v == 25 || v == 43);
			}
	for (int i = 0; i < 256; i++)
		for (int j = 0; j < 4; j++) {
			unsigned v = (kern_iq3xxs_grid[i] >> (8 * j)) & 0xff;
			assert_true(v >= 4 && v <= 62 && (v == 62 || v % 8 == 4));
		}
	for (int i = 0; i < 512; i++)
		for (int j = 0; j < 4; j++) {
			unsigned v = (kern_iq3s_grid[i] >> (8 * j)) & 0xff;
			assert_true(v >= 1 && v <= 15 && v % 2 == 1);
		}
	for (int i = 0; i < 2048; i++)
		for (int j = 0; j < 8; j++) {
			int v = (int8_t)((kern_iq1s_grid[i] >> (8 * j)) & 0xff);
			assert_true(v >= -1 && v <= 1);
		}
	/* first and last entries, as GGML has them */
	assert_true(kern_iq2xxs_grid[0] == 0x0808080808080808ull);
	assert_true(kern_iq2s_grid[1023] == 0x2b2b2b2b2b2b2b2bull);
	assert_true(kern_iq1s_grid[0] == 0xffffffffffffffffull);
	assert_true(kern_iq1s_grid[2047] == 0x0101010101010101ull);
	assert_true(kern_iq3s_grid[511] == 0x0f0f0101u);
}

/* The oracle's decoded values (tools/iq_blocks.mjs) reproduced exactly. */
static void test_dequant_oracle(void **state)
{
	(void)state;
	char path[4096];
	const char *top = getenv("top_srcdir");
	snprintf(path, sizeof(path), "%s/tests/data/iq-blocks.bin", top ? top : ".");
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	char magic[8];
	assert_int_equal(fread(magic, 1, 8, f), 8);
	assert_memory_equal(magic, "IQBLK001", 8);
	int seen = 0;
	uint8_t head[12];
	while (fread(head, 1, 12, f) == 12) {
		uint32_t t = get32(head), nb = get32(head + 4), bs = get32(head + 8);
		assert_true(nb > 0 && nb < 64);
		assert_int_equal(bs, kern_type_block_bytes(t));
		uint8_t *blk = xmalloc((size_t)nb * bs);
		float *want = xmalloc((size_t)nb * 256 * sizeof(float));
		float *got = xmalloc((size_t)nb * 256 * sizeof(float));
		assert_int_equal(fread(blk, bs, nb, f), nb);
		assert_int_equal(fread(want, sizeof(float) * 256, nb, f), nb);
		kern_dequant_row_ref(t, blk, got, (int64_t)nb * 256);
		for (uint32_t i = 0; i < nb * 256; i++)
			assert_same_f32("oracle dequant", t, (int)i, got[i], want[i]);
		kern_force_ref(0);
		kern_dequant_row(t, blk, got, (int64_t)nb * 256);
		for (uint32_t i = 0; i < nb * 256; i++)
			assert_same_f32("oracle dequant (dispatched)", t, (int)i, got[i], want[i]);
		seen |= 1 << (t & 31);
		free(blk);
		free(want);
		free(got);
	}
	fclose(f);
	for (size_t i = 0; i < N_IQ; i++)
		assert_true(seen & (1 << (iq_types[i] & 31)));
}

/* Dequantisation of a few hand-made blocks, against values worked out
 * from the layout. */
static void test_dequant_hand(void **state)
{
	(void)state;
	uint8_t b[110];
	float y[256];
	/* IQ3_S: d = 0.5, even entries index 4 (grid 15,1,1,1), odd entries
	 * 511 (1,1,15,15: index bit 8 set), code 2 (ls = 5), sign byte 0x01 on
	 * every group: value 2.5 * grid, negated at the start of each group */
	static const float g3[8] = {15, 1, 1, 1, 1, 1, 15, 15};
	memset(b, 0, sizeof(b));
	set_d(KERN_IQ3_S, b, 0x3800);
	for (int e = 0; e < 64; e++)
		set_index(KERN_IQ3_S, b, e, e % 2 ? 511 : 4);
	for (int g = 0; g < 32; g++)
		set_signs(KERN_IQ3_S, b, g, 0x01);
	for (int k = 0; k < 8; k++)
		set_scale(KERN_IQ3_S, b, k, 2);
	kern_dequant_row_ref(KERN_IQ3_S, b, y, 256);
	for (int i = 0; i < 256; i++)
		assert_true(y[i] == (i % 8 == 0 ? -2.5f : 2.5f) * g3[i % 8]);
	/* IQ1_M: d = -2 in the scale words, index 0 (all -1), slot codes k % 8,
	 * delta negative on odd groups: value = d * (2s+1) * (-1 -+ 1/8) */
	memset(b, 0, sizeof(b));
	set_d(KERN_IQ1_M, b, 0xc000);
	for (int k = 0; k < 16; k++)
		set_scale(KERN_IQ1_M, b, k, (unsigned)k % 8);
	for (int g = 0; g < 32; g++)
		set_delta(KERN_IQ1_M, b, g, g % 2);
	kern_dequant_row_ref(KERN_IQ1_M, b, y, 256);
	for (int i = 0; i < 256; i++) {
		int g = i / 8, k = i / 16;
		float want = -2.0f * (float)(2 * (k % 8) + 1) * (g % 2 ? -1.125f : -0.875f);
		assert_true(y[i] == want);
	}
	/* IQ2_XXS: d = 1, code 15 (db = 15.5 / 4), grid 0 (all 8), sign index 1
	 * (bits 0 and 7): -31, 31 x6, -31 */
	memset(b, 0, sizeof(b));
	set_d(KERN_IQ2_XXS, b, 0x3c00);
	for (int g = 0; g < 32; g++)
		set_signs(KERN_IQ2_XXS, b, g, 1);
	for (int k = 0; k < 8; k++)
		set_scale(KERN_IQ2_XXS, b, k, 15);
	kern_dequant_row_ref(KERN_IQ2_XXS, b, y, 256);
	for (int i = 0; i < 256; i++)
		assert_true(y[i] == (i % 8 == 0 || i % 8 == 7 ? -31.0f : 31.0f));
}

/* Reference dot against double sums of dequantised values. */
static void test_dot_ref_double(void **state)
{
	(void)state;
	rng_seed(11);
	for (size_t ti = 0; ti < N_IQ; ti++) {
		uint32_t t = iq_types[ti];
		for (int rep = 0; rep < 40; rep++) {
			const int nb = 1 + rep % 4;
			const int n = 256 * nb;
			uint8_t *w = xmalloc(kern_row_bytes(t, n));
			uint8_t *x = xmalloc((size_t)nb * Q8K_BYTES);
			float *wf = xmalloc((size_t)n * sizeof(float));
			fill_row(t, w, nb, rep % 2, rep * 4);
			fill_act_row(x, nb);
			kern_dequant_row_ref(t, w, wf, n);
			double s = 0, sa = 0;
			for (int ib = 0; ib < nb; ib++) {
				const uint8_t *xb = x + (size_t)ib * Q8K_BYTES;
				float dx;
				memcpy(&dx, xb, 4);
				for (int j = 0; j < 256; j++) {
					double p =
					    (double)wf[256 * ib + j] * (int8_t)xb[4 + j] * dx;
					s += p;
					sa += fabs(p);
				}
			}
			double got = kern_dot_ref(t, n, w, x);
			if (!(fabs(got - s) <= 2e-6 * sa + 1e-30)) {
				print_error("%s nb=%d rep=%d: got %.9g want %.9g (sumabs %.3g)\n",
					    kern_type_name(t), nb, rep, got, s, sa);
				fail();
			}
			free(w);
			free(x);
			free(wf);
		}
	}
}

/* A block of zero d contributes exactly nothing; so does a zero
 * activation block. */
static void test_dot_zero(void **state)
{
	(void)state;
	rng_seed(5);
	for (size_t ti = 0; ti < N_IQ; ti++) {
		uint32_t t = iq_types[ti];
		size_t bs = kern_type_block_bytes(t);
		uint8_t w[2 * 110], x[2 * Q8K_BYTES];
		fill_row(t, w, 2, 0, 0);
		set_d(t, w + bs, 0x0000);
		fill_q8k(x, 0);
		fill_q8k(x + Q8K_BYTES, 0);
		float one = kern_dot_ref(t, 256, w, x);
		assert_true(f2u(kern_dot_ref(t, 512, w, x)) == f2u(one));
		fill_q8k(x, 2);
		assert_true(kern_dot_ref(t, 256, w, x) == 0.0f);
	}
}

static void test_dequant_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	rng_seed(3);
	const int nb = 64;
	float *a = xmalloc(256 * (size_t)nb * sizeof(float));
	float *b = xmalloc(256 * (size_t)nb * sizeof(float));
	uint8_t *w = xmalloc(110 * (size_t)nb);
	kern_force_ref(0);
	for (size_t ti = 0; ti < N_IQ; ti++) {
		uint32_t t = iq_types[ti];
		for (int system = 0; system < 2; system++) {
			fill_row(t, w, nb, system, 0);
			kern_dequant_row_ref(t, w, a, 256 * nb);
			kern_dequant_row(t, w, b, 256 * nb);
			for (int i = 0; i < 256 * nb; i++)
				assert_same_f32("dequant avx2", t, i, b[i], a[i]);
		}
	}
	free(a);
	free(b);
	free(w);
}

static void test_dot_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	rng_seed(7);
	kern_force_ref(0);
	const int nb_max = 64;
	uint8_t *w = xmalloc(110 * (size_t)nb_max);
	uint8_t *x = xmalloc(Q8K_BYTES * (size_t)nb_max);
	for (size_t ti = 0; ti < N_IQ; ti++) {
		uint32_t t = iq_types[ti];
		/* every field value: 64 systematic blocks, one dot per block and
		 * one over all */
		fill_row(t, w, nb_max, 1, 0);
		fill_act_row(x, nb_max);
		size_t bs = kern_type_block_bytes(t);
		for (int ib = 0; ib < nb_max; ib++)
			assert_same_f32(
			    "dot avx2 (block)", t, ib,
			    kern_dot(t, 256, w + ib * bs, x + (size_t)ib * Q8K_BYTES),
			    kern_dot_ref(t, 256, w + ib * bs, x + (size_t)ib * Q8K_BYTES));
		assert_same_f32("dot avx2 (row)", t, 0, kern_dot(t, 256 * nb_max, w, x),
				kern_dot_ref(t, 256 * nb_max, w, x));
		/* random rows of 1..3 blocks, in buffers of their exact size (a
		 * memory checker sees any read past a row's end) */
		for (int rep = 0; rep < 300; rep++) {
			const int nb = 1 + rep % 3;
			uint8_t *we = xmalloc(kern_row_bytes(t, 256 * nb));
			uint8_t *xe = xmalloc((size_t)nb * Q8K_BYTES);
			fill_row(t, we, nb, rep % 4 == 0, rep);
			fill_act_row(xe, nb);
			assert_same_f32("dot avx2", t, rep, kern_dot(t, 256 * nb, we, xe),
					kern_dot_ref(t, 256 * nb, we, xe));
			float *ya = xmalloc(256 * (size_t)nb * sizeof(float));
			float *yb = xmalloc(256 * (size_t)nb * sizeof(float));
			kern_dequant_row(t, we, ya, 256 * nb);
			kern_dequant_row_ref(t, we, yb, 256 * nb);
			for (int i = 0; i < 256 * nb; i++)
				assert_same_f32("dequant avx2", t, i, ya[i], yb[i]);
			free(we);
			free(xe);
			free(ya);
			free(yb);
		}
	}
	free(w);
	free(x);
}

/* kern_matmul against kern_dot_ref for 1..7 rows and output ranges of any
 * width; entries outside the range stay untouched. */
static void test_matmul(void **state)
{
	(void)state;
	rng_seed(9);
	const int n_out = 11, nb = 2, n_in = 256 * nb, max_rows = 7;
	const int ranges[][2] = {{0, 11}, {0, 1}, {3, 4}, {1, 10}, {2, 7}, {5, 11}};
	int avx2 = have_avx2();
	for (size_t ti = 0; ti < N_IQ; ti++) {
		uint32_t t = iq_types[ti];
		size_t w_row = kern_row_bytes(t, n_in);
		uint8_t *w = xmalloc(w_row * (size_t)n_out);
		uint8_t *x = xmalloc((size_t)nb * Q8K_BYTES * max_rows + 64);
		const size_t xs = (size_t)nb * Q8K_BYTES + 8; /* rows not packed */
		float y[7 * 13];
		for (int o = 0; o < n_out; o++)
			fill_row(t, w + (size_t)o * w_row, nb, o % 3 == 0, o * nb);
		for (int r = 0; r < max_rows; r++)
			fill_act_row(x + (size_t)r * xs, nb);
		for (int force = 0; force < 2; force++) {
			if (!force && !avx2)
				continue;
			kern_force_ref(force);
			for (int n_rows = 1; n_rows <= max_rows; n_rows++) {
				for (size_t ri = 0; ri < sizeof(ranges) / sizeof(ranges[0]); ri++) {
					const int o0 = ranges[ri][0], o1 = ranges[ri][1];
					for (int i = 0; i < 7 * 13; i++)
						y[i] = -1234.5f;
					kern_matmul(t, w, n_in, o0, o1, x, xs, n_rows, y, 13);
					for (int r = 0; r < max_rows; r++)
						for (int o = 0; o < 13; o++) {
							float want = -1234.5f;
							if (r < n_rows && o >= o0 && o < o1)
								want = kern_dot_ref(
								    t, n_in, w + (size_t)o * w_row,
								    x + (size_t)r * xs);
							assert_same_f32("matmul", t, r * 13 + o,
									y[r * 13 + o], want);
						}
				}
			}
		}
		kern_force_ref(0);
		free(w);
		free(x);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_tables),	 cmocka_unit_test(test_dequant_oracle),
	    cmocka_unit_test(test_dequant_hand), cmocka_unit_test(test_dot_ref_double),
	    cmocka_unit_test(test_dot_zero),	 cmocka_unit_test(test_dequant_simd),
	    cmocka_unit_test(test_dot_simd),	 cmocka_unit_test(test_matmul),
	};
	return kern_test_run_levels("kern_iq", tests, sizeof(tests) / sizeof(tests[0]));
}
