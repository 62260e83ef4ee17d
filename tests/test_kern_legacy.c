/* test_kern_legacy: the 32-value block types Q4_1, Q5_0, Q5_1, IQ4_NL and the
 * Q8_1 quantiser.
 *   - dequantisation against hand-built blocks and against the oracle's own
 *     decoder (tests/data/legacy-blocks.bin, from tools/legacy_blocks.mjs);
 *   - the scalar dot against a double-precision sum over dequantised values;
 *   - Q8_1 rounding (ties to even), s, and the NaN / infinity rules;
 *   - when the CPU has AVX2+FMA+F16C: AVX2 dequant, convert, dot and matmul
 *     against the scalar reference bit for bit, on random and edge-case
 *     blocks, and kern_matmul against kern_dot for every tiling. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/kern.h"
#include "kern_test.h"

static const uint32_t types[] = {KERN_Q4_1, KERN_Q5_0, KERN_Q5_1, KERN_IQ4_NL};
#define N_TYPES (sizeof(types) / sizeof(types[0]))

static const int iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
			      1,    13,	  25,  38,  53,	 69,  89,  113};

/* ----------------------------------------------------------- helpers */

/* bit-identical, or both NaN (the sign and payload of a NaN from an
 * operation depend on operand order, which is the compiler's choice) */
static int same_float(float a, float b)
{
	return f2u(a) == f2u(b) || (isnan(a) && isnan(b));
}

static int have_avx2(void)
{
	return kern_cpu_avx2();
}

/* n bytes that end where an inaccessible page begins, so that reading past
 * them crashes the test; guarded_free(p, n) releases them. */
static void *guarded_alloc(size_t n)
{
	const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
	const size_t len = (n + pg - 1) / pg * pg + pg;
	uint8_t *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(base != MAP_FAILED);
	assert_int_equal(mprotect(base + len - pg, pg, PROT_NONE), 0);
	return base + len - pg - n;
}

static void guarded_free(void *p, size_t n)
{
	const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
	const size_t len = (n + pg - 1) / pg * pg + pg;
	munmap((uint8_t *)p + n + pg - len, len);
}

static int has_m(uint32_t t)
{
	return t == KERN_Q4_1 || t == KERN_Q5_1;
}

static void put16(uint8_t *p, uint16_t v)
{
	memcpy(p, &v, 2);
}

static uint16_t get16(const uint8_t *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return v;
}

static size_t xblock(uint32_t t)
{
	return kern_type_block_bytes(kern_act_type(t));
}

/* Edge f16 scales: zeros, subnormals, the largest finite, negatives, 1. */
static const uint16_t edge_f16[] = {0x0000, 0x8000, 0x0001, 0x03ff, 0x83ff, 0x7bff,
				    0xfbff, 0x3c00, 0xbc00, 0x0400, 0x2e66};
#define N_EDGE (sizeof(edge_f16) / sizeof(edge_f16[0]))

/* Ordinary f16 scale of about `scale` (random sign for m). */
static uint16_t rnd_scale(float scale, int sign)
{
	float v = scale * (0.001f + 0.05f * (rng_f() + 1.0f));
	return kern_f32_to_f16(sign && (rng_u32() & 1) ? -v : v);
}

/* Edge-case modes for weight blocks. */
enum { W_RANDOM, W_EDGE, W_ALL_HIGH, W_NO_HIGH, W_ZERO, W_MAX_CODE, W_INF };

/* One weight block of type t: random bytes (every code, every high bit),
 * scales by mode. */
static void fill_block(uint32_t t, uint8_t *b, int mode)
{
	const size_t bs = kern_type_block_bytes(t);
	for (size_t j = 0; j < bs; j++)
		b[j] = (uint8_t)rng_u32();
	put16(b, rnd_scale(1.0f, 0));
	if (has_m(t))
		put16(b + 2, rnd_scale(0.5f, 1));
	const size_t qh = t == KERN_Q5_0 ? 2 : 4;
	switch (mode) {
	case W_EDGE:
		put16(b, edge_f16[rng_u32() % N_EDGE]);
		if (has_m(t))
			put16(b + 2, edge_f16[rng_u32() % N_EDGE]);
		break;
	case W_ALL_HIGH:
	case W_NO_HIGH:
		if (t == KERN_Q5_0 || t == KERN_Q5_1)
			memset(b + qh, mode == W_ALL_HIGH ? 0xff : 0x00, 4);
		break;
	case W_ZERO: memset(b, 0, bs); break;
	case W_MAX_CODE:
		memset(b + bs - 16, 0xff, 16);
		if (t == KERN_Q5_0 || t == KERN_Q5_1)
			memset(b + qh, 0xff, 4);
		put16(b, 0x7bff);
		if (has_m(t))
			put16(b + 2, 0x7bff);
		break;
	case W_INF:
		put16(b, 0x7c00);
		if (has_m(t))
			put16(b + 2, rng_u32() & 1 ? 0xfc00 : 0x3c00);
		break;
	default: break;
	}
}

static void fill_row(uint32_t t, uint8_t *row, int64_t n, int mode)
{
	const size_t bs = kern_type_block_bytes(t);
	for (int64_t ib = 0; ib < n / KERN_QK; ib++)
		fill_block(t, row + (size_t)ib * bs,
			   mode == W_EDGE && ib % 3 == 1 ? W_RANDOM : mode);
}

/* Activation modes: quantised floats, or raw int8 blocks. */
enum { X_RANDOM, X_EXTREME, X_RAW, X_ZERO };

/* An activation row for weight type t.  X_EXTREME: every value -128 or 127
 * with edge scales; X_RAW: random int8 (including -128) with random f16 d
 * and s. */
static void fill_act(uint32_t t, uint8_t *x, int64_t n, int mode, float scale)
{
	const size_t xs = xblock(t), off = has_m(t) ? 4 : 2;
	if (mode == X_RANDOM || mode == X_ZERO) {
		/* converted into an aligned buffer: x may be at any address */
		const size_t rb = kern_row_bytes(kern_act_type(t), n);
		float *xf = xmalloc((size_t)n * sizeof(float));
		uint8_t *tmp = xmalloc(rb);
		for (int64_t i = 0; i < n; i++)
			xf[i] = mode == X_ZERO ? 0.0f : rng_f() * scale;
		kern_convert_row_ref(kern_act_type(t), xf, tmp, n);
		memcpy(x, tmp, rb);
		free(xf);
		free(tmp);
		return;
	}
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		uint8_t *b = x + (size_t)ib * xs;
		for (int j = 0; j < KERN_QK; j++)
			b[off + j] =
			    mode == X_EXTREME ? (rng_u32() & 1 ? 0x80 : 0x7f) : (uint8_t)rng_u32();
		if (mode == X_EXTREME && ib % 2 == 0) /* whole blocks of -128 */
			memset(b + off, 0x80, KERN_QK);
		put16(b, mode == X_EXTREME ? edge_f16[rng_u32() % N_EDGE] : rnd_scale(scale, 0));
		if (off == 4)
			put16(b + 2, rnd_scale(scale * 32.0f, 1));
	}
}

/* Integer code j of a weight block (after Q5_0's offset; IQ4_NL's table
 * value), decoded here independently of the kernels. */
static int w_code(uint32_t t, const uint8_t *b, int j)
{
	const int hi = j >= 16, k = j & 15;
	uint32_t qh = 0;
	const uint8_t *qs;
	switch (t) {
	case KERN_Q4_1: qs = b + 4; break;
	case KERN_Q5_0:
		memcpy(&qh, b + 2, 4);
		qs = b + 6;
		break;
	case KERN_Q5_1:
		memcpy(&qh, b + 4, 4);
		qs = b + 8;
		break;
	default: qs = b + 2; break;
	}
	int c = hi ? qs[k] >> 4 : qs[k] & 15;
	c |= (int)((qh >> j) & 1) << 4;
	return t == KERN_Q5_0 ? c - 16 : t == KERN_IQ4_NL ? iq4nl[c] : c;
}

/* ------------------------------------------------------------- tests */

static void test_types(void **state)
{
	(void)state;
	static const size_t bytes[] = {20, 22, 24, 18};
	static const uint32_t act[] = {KERN_Q8_1, KERN_Q8_0, KERN_Q8_1, KERN_Q8_0};
	for (size_t i = 0; i < N_TYPES; i++) {
		assert_int_equal(kern_type_block(types[i]), 32);
		assert_int_equal(kern_type_block_bytes(types[i]), bytes[i]);
		assert_int_equal(kern_act_type(types[i]), act[i]);
		assert_true(kern_type_dot(types[i]));
	}
	assert_int_equal(kern_type_block_bytes(KERN_Q8_1), 36);
	assert_false(kern_type_dot(KERN_Q8_1));
}

/* Hand-built blocks with values worked out by hand. */
static void test_dequant_hand(void **state)
{
	(void)state;
	uint8_t b[24];
	float y[32];

	/* Q4_1: d = 0.5, m = -1; byte j = j | (15 - j) << 4 */
	memset(b, 0, sizeof(b));
	put16(b, 0x3800);
	put16(b + 2, 0xbc00);
	for (int j = 0; j < 16; j++)
		b[4 + j] = (uint8_t)(j | (15 - j) << 4);
	kern_dequant_row_ref(KERN_Q4_1, b, y, 32);
	for (int j = 0; j < 16; j++) {
		assert_true(y[j] == 0.5f * (float)j - 1.0f);
		assert_true(y[16 + j] == 0.5f * (float)(15 - j) - 1.0f);
	}

	/* Q5_0: d = 2; nibbles 0; qh bit 0 and bit 16 and bit 31 set ->
	 * values 0, 16, 31 are 0 (code 16), every other -32 */
	memset(b, 0, sizeof(b));
	put16(b, 0x4000);
	b[2] = 0x01;
	b[4] = 0x01;
	b[5] = 0x80;
	b[6 + 15] = 0xf0; /* value 31: nibble 15 | 16 = 31 -> 15 * 2 = 30 */
	kern_dequant_row_ref(KERN_Q5_0, b, y, 32);
	for (int j = 0; j < 32; j++) {
		float want = j == 0 || j == 16 ? 0.0f : j == 31 ? 30.0f : -32.0f;
		assert_true(y[j] == want);
	}

	/* Q5_1: d = 1, m = 0.25; qh = 0xffff0000: values 16-31 get +16 */
	memset(b, 0, sizeof(b));
	put16(b, 0x3c00);
	put16(b + 2, 0x3400);
	b[6] = b[7] = 0xff;
	for (int j = 0; j < 16; j++)
		b[8 + j] = (uint8_t)(j << 4 | j);
	kern_dequant_row_ref(KERN_Q5_1, b, y, 32);
	for (int j = 0; j < 16; j++) {
		assert_true(y[j] == (float)j + 0.25f);
		assert_true(y[16 + j] == (float)(16 + j) + 0.25f);
	}

	/* IQ4_NL: d = -1; nibble j, 15 - j */
	memset(b, 0, sizeof(b));
	put16(b, 0xbc00);
	for (int j = 0; j < 16; j++)
		b[2 + j] = (uint8_t)(j | (15 - j) << 4);
	kern_dequant_row_ref(KERN_IQ4_NL, b, y, 32);
	for (int j = 0; j < 16; j++) {
		assert_true(y[j] == (float)-iq4nl[j]);
		assert_true(y[16 + j] == (float)-iq4nl[15 - j]);
	}
}

/* kern_dequant_row_ref against the oracle's decoder (legacy-blocks.bin). */
static void test_dequant_oracle(void **state)
{
	(void)state;
	char path[1024];
	const char *top = getenv("top_srcdir");
	snprintf(path, sizeof(path), "%s/tests/data/legacy-blocks.bin", top && *top ? top : ".");
	FILE *f = fopen(path, "rb");
	if (!f) {
		print_error("cannot open %s\n", path);
		fail();
	}
	uint8_t *buf = xmalloc(1 << 16);
	size_t len = fread(buf, 1, 1 << 16, f);
	fclose(f);
	assert_true(len >= 8 && memcmp(buf, "LGB1", 4) == 0);
	uint32_t n_rows, seen = 0;
	memcpy(&n_rows, buf + 4, 4);
	size_t pos = 8;
	for (uint32_t r = 0; r < n_rows; r++) {
		uint32_t t, n;
		assert_true(pos + 8 <= len);
		memcpy(&t, buf + pos, 4);
		memcpy(&n, buf + pos + 4, 4);
		pos += 8;
		assert_true(kern_type_block(t) == 32 && n % 32 == 0 && n <= 4096);
		const size_t rb = kern_row_bytes(t, n);
		assert_true(pos + rb + 4 * (size_t)n <= len);
		float y[4096], want[4096];
		memcpy(want, buf + pos + rb, 4 * (size_t)n);
		kern_dequant_row_ref(t, buf + pos, y, n);
		for (uint32_t i = 0; i < n; i++)
			if (f2u(y[i]) != f2u(want[i])) {
				print_error("%s row %u value %u: %a, oracle %a\n",
					    kern_type_name(t), r, i, y[i], want[i]);
				fail();
			}
		for (size_t i = 0; i < N_TYPES; i++)
			if (types[i] == t)
				seen |= 1u << i;
		pos += rb + 4 * (size_t)n;
	}
	assert_int_equal(pos, len);
	assert_int_equal(seen, (1u << N_TYPES) - 1);
	free(buf);
}

/* AVX2 dequantisation == the reference, all modes, 1..9 blocks. */
static void test_dequant_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	uint8_t w[24 * 16];
	float a[32 * 16], b[32 * 16];
	rng_seed(5);
	for (size_t ti = 0; ti < N_TYPES; ti++)
		for (int mode = W_RANDOM; mode <= W_INF; mode++)
			for (int64_t nb = 1; nb <= 9; nb++) {
				const int64_t n = nb * 32;
				fill_row(types[ti], w, n, mode);
				kern_force_ref(0);
				kern_dequant_row(types[ti], w, a, n);
				kern_dequant_row_ref(types[ti], w, b, n);
				for (int64_t i = 0; i < n; i++)
					if (!same_float(a[i], b[i])) {
						print_error("%s mode %d value %lld: %a != %a\n",
							    kern_type_name(types[ti]), mode,
							    (long long)i, a[i], b[i]);
						fail();
					}
			}
}

/* ---------------------------------------------------------- Q8_1 convert */

static void test_convert_q8_1(void **state)
{
	(void)state;
	float x[64];
	uint8_t q[72];

	/* amax 127: id = 1, so the values are rounded as they are: ties to even */
	for (int j = 0; j < 32; j++)
		x[j] = 0.0f;
	x[0] = 127.0f;
	x[1] = 2.5f;
	x[2] = 3.5f;
	x[3] = -2.5f;
	x[4] = -0.5f;
	x[5] = 0.5f;
	x[6] = 1.5f;
	x[7] = -126.5f;
	kern_convert_row_ref(KERN_Q8_1, x, q, 32);
	static const int8_t want[8] = {127, 2, 4, -2, 0, 0, 2, -126};
	for (int j = 0; j < 8; j++)
		assert_int_equal((int8_t)q[4 + j], want[j]);
	/* d = 1; s = d * (127 + 2 + 4 - 2 + 0 + 0 + 2 - 126) = 7 */
	assert_int_equal(get16(q), 0x3c00);
	assert_int_equal(get16(q + 2), kern_f32_to_f16(7.0f));

	/* s uses the F32 d before rounding: amax = 1 -> d = 1/127 */
	for (int j = 0; j < 32; j++)
		x[j] = j < 3 ? 1.0f : 0.0f;
	kern_convert_row_ref(KERN_Q8_1, x, q, 32);
	assert_int_equal(get16(q), kern_f32_to_f16(1.0f / 127.0f));
	assert_int_equal(get16(q + 2), kern_f32_to_f16(1.0f / 127.0f * 381.0f));
	assert_int_equal((int8_t)q[4], 127);

	/* all zero (and negative zero): d = s = 0, q = 0 */
	for (int j = 0; j < 32; j++)
		x[j] = j & 1 ? -0.0f : 0.0f;
	kern_convert_row_ref(KERN_Q8_1, x, q, 32);
	for (int j = 0; j < 36; j++)
		assert_int_equal(q[j], 0);

	/* infinity: id = 0 -> inf * 0 = NaN -> INT32_MIN, saturated to -128
	 * in q, but summed unsaturated into s (which is NaN here: d = inf);
	 * finite values give 0 */
	for (int j = 0; j < 32; j++)
		x[j] = 1.0f;
	x[5] = INFINITY;
	kern_convert_row_ref(KERN_Q8_1, x, q, 32);
	assert_int_equal(get16(q), 0x7c00);
	assert_int_equal((int8_t)q[4 + 5], -128);
	assert_int_equal((int8_t)q[4 + 6], 0);

	/* a tiny amax: 127 / amax overflows to infinity; x * inf: +-inf ->
	 * INT32_MIN, 0 * inf = NaN -> INT32_MIN.  s = d * (32 * INT32_MIN,
	 * wrapped to 0) = 0. */
	for (int j = 0; j < 32; j++)
		x[j] = j % 3 ? 1e-45f : 0.0f;
	kern_convert_row_ref(KERN_Q8_1, x, q, 32);
	for (int j = 0; j < 32; j++)
		assert_int_equal((int8_t)q[4 + j], -128);
	assert_int_equal(get16(q + 2), 0);
	/* two infinities: the unsaturated sum 2 * INT32_MIN wraps to 0, so
	 * s = f16(inf * 0) is NaN (saturated values would give -inf) */
	for (int j = 0; j < 32; j++)
		x[j] = 0.25f;
	x[3] = INFINITY;
	x[20] = -INFINITY;
	kern_convert_row_ref(KERN_Q8_1, x, q, 32);
	assert_true((get16(q + 2) & 0x7c00) == 0x7c00 && (get16(q + 2) & 0x3ff) != 0);

	/* AVX2 == reference, byte for byte: random rows of several
	 * magnitudes, ties, zeros, subnormals, infinities and NaNs */
	if (!have_avx2())
		return;
	rng_seed(9);
	uint8_t *qa = xmalloc(36 * 64), *qb = xmalloc(36 * 64);
	float *xs = xmalloc(32 * 64 * sizeof(float));
	for (int rep = 0; rep < 200; rep++) {
		const int64_t n = 32 * (1 + rep % 64);
		const float scale = ldexpf(1.0f, (int)(rng_u32() % 200) - 120);
		for (int64_t i = 0; i < n; i++) {
			float v = rng_f() * scale;
			switch (rng_u32() % 40) {
			case 0: v = 0.0f; break;
			case 1: v = -0.0f; break;
			case 2: v = rep % 2 ? NAN : v; break;
			case 3: v = rep % 3 ? v : -INFINITY; break;
			case 4: v = 1e-40f; break;
			case 5: v = roundf(v) + 0.5f; break;
			default: break;
			}
			xs[i] = v;
		}
		kern_force_ref(0);
		kern_convert_row(KERN_Q8_1, xs, qa, n);
		kern_convert_row_ref(KERN_Q8_1, xs, qb, n);
		if (memcmp(qa, qb, (size_t)n / 32 * 36) != 0) {
			print_error("q8_1 convert rep %d differs\n", rep);
			fail();
		}
	}
	free(qa);
	free(qb);
	free(xs);
}

/* ------------------------------------------------------------- dots */

/* The dot in double from dequantised values (kern_dequant_row_ref, itself
 * checked against the oracle) and activations q * d; Q8_1's s replaces
 * m * d * sum(q) as ggml's formula does, so its rounding is added back.
 * sumabs: the sum of |terms|, for the tolerance. */
static double dot_double(uint32_t t, const uint8_t *w, const uint8_t *x, int64_t n, double *sumabs)
{
	const size_t bs = kern_type_block_bytes(t), xs = xblock(t), off = has_m(t) ? 4 : 2;
	float wf[32];
	double s = 0, sa = 0;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const uint8_t *bw = w + (size_t)ib * bs, *bx = x + (size_t)ib * xs;
		const double dx = kern_f16_to_f32(get16(bx));
		long sq = 0;
		kern_dequant_row_ref(t, bw, wf, 32);
		for (int j = 0; j < KERN_QK; j++) {
			const double p = (double)wf[j] * (dx * (int8_t)bx[off + j]);
			s += p;
			sa += fabs(p);
			sq += (int8_t)bx[off + j];
		}
		if (has_m(t)) {
			const double m = kern_f16_to_f32(get16(bw + 2));
			const double sx = kern_f16_to_f32(get16(bx + 2));
			s += m * (sx - dx * (double)sq);
			sa += fabs(m * sx);
		}
	}
	*sumabs = sa;
	return s;
}

/* The same from the integer codes, as the contract states it (exact). */
static double dot_codes(uint32_t t, const uint8_t *w, const uint8_t *x, int64_t n)
{
	const size_t bs = kern_type_block_bytes(t), xs = xblock(t), off = has_m(t) ? 4 : 2;
	double s = 0;
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		const uint8_t *bw = w + (size_t)ib * bs, *bx = x + (size_t)ib * xs;
		long si = 0;
		for (int j = 0; j < KERN_QK; j++)
			si += (long)w_code(t, bw, j) * (int8_t)bx[off + j];
		s += (double)kern_f16_to_f32(get16(bw)) * kern_f16_to_f32(get16(bx)) * (double)si;
		if (has_m(t))
			s +=
			    (double)kern_f16_to_f32(get16(bw + 2)) * kern_f16_to_f32(get16(bx + 2));
	}
	return s;
}

static void test_dot_ref_double(void **state)
{
	(void)state;
	static const int64_t ns[] = {32, 64, 96, 288, 1024, 4096};
	uint8_t *w = xmalloc(4096 / 32 * 24), *x = xmalloc(4096 / 32 * 36);
	rng_seed(21);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		const uint32_t t = types[ti];
		for (size_t k = 0; k < sizeof(ns) / sizeof(ns[0]); k++)
			for (int rep = 0; rep < 6; rep++) {
				const int64_t n = ns[k];
				fill_row(t, w, n, rep < 3 ? W_RANDOM : W_ALL_HIGH);
				fill_act(t, x, n, rep == 5 ? X_RAW : X_RANDOM,
					 rep == 1 ? 100.0f : 1.0f);
				double sa, want = dot_double(t, w, x, n, &sa);
				const double exact = dot_codes(t, w, x, n);
				const float got = kern_dot_ref(t, n, w, x);
				const double tol = 2e-6 * sqrt((double)n) * sa + 1e-30;
				if (!(fabs(got - want) <= tol) || !(fabs(exact - want) <= tol)) {
					print_error("%s n=%lld: ref %.9g, double %.9g, codes %.9g "
						    "(tol %.3g)\n",
						    kern_type_name(t), (long long)n, got, want,
						    exact, tol);
					fail();
				}
			}
	}
	/* zero rows: exactly 0 */
	memset(w, 0, 4096 / 32 * 24);
	memset(x, 0, 4096 / 32 * 36);
	for (size_t ti = 0; ti < N_TYPES; ti++)
		assert_true(kern_dot_ref(types[ti], 4096, w, x) == 0.0f);
	free(w);
	free(x);
}

/* The AVX2 dot == the reference bit for bit. */
static void cmp_dot(uint32_t t, int64_t n, const uint8_t *w, const uint8_t *x, const char *what)
{
	kern_force_ref(0);
	const float s = kern_dot(t, n, w, x);
	const float r = kern_dot_ref(t, n, w, x);
	if (!same_float(s, r)) {
		print_error("dot %s %s n=%lld: avx2 %a, ref %a\n", kern_type_name(t), what,
			    (long long)n, s, r);
		fail();
	}
}

static void test_dot_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	uint8_t *w = xmalloc(4096 / 32 * 24), *x = xmalloc(4096 / 32 * 36);
	rng_seed(33);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		const uint32_t t = types[ti];
		for (int64_t nb = 1; nb <= 9; nb++)
			for (int wm = W_RANDOM; wm <= W_INF; wm++)
				for (int xm = X_RANDOM; xm <= X_ZERO; xm++) {
					fill_row(t, w, nb * 32, wm);
					fill_act(t, x, nb * 32, xm, 1.0f);
					cmp_dot(t, nb * 32, w, x, "edge");
				}
		for (int rep = 0; rep < 20; rep++) {
			const int64_t n = 32 * (1 + (int64_t)(rng_u32() % 128));
			fill_row(t, w, n, rep % 2 ? W_RANDOM : W_EDGE);
			fill_act(t, x, n, rep % 3 == 2 ? X_RAW : X_RANDOM,
				 rep % 4 == 3 ? 1000.0f : 1.0f);
			cmp_dot(t, n, w, x, "random");
		}
		/* codes at their largest against -128 / 127: the integer sums
		 * at their extremes */
		fill_row(t, w, 4096, W_MAX_CODE);
		fill_act(t, x, 4096, X_EXTREME, 1.0f);
		cmp_dot(t, 4096, w, x, "extreme");
	}
	free(w);
	free(x);
}

/* ------------------------------------------------------------- matmul */

/* kern_matmul (dispatched: AVX2 if the CPU has it) == kern_dot_ref for every
 * (row, output) in [o0, o1), bit for bit; nothing written outside.  W's rows
 * at and above o1 and x's rows from n_rows on are not there: reading them
 * crashes (a tile may read rows below o0 only). */
static void run_matmul(uint32_t t, int64_t n_in, int64_t n_out, int64_t n_rows, int64_t o0,
		       int64_t o1, int wm, int xm)
{
	const size_t wr = kern_row_bytes(t, n_in);
	const size_t xr = kern_row_bytes(kern_act_type(t), n_in) + 5; /* odd stride */
	const size_t xbytes = xr * (size_t)(n_rows - 1) + xr - 5;
	const int64_t ys = n_out + 3;
	uint8_t *w = guarded_alloc(wr * (size_t)o1);
	uint8_t *x = guarded_alloc(xbytes);
	float *y = xmalloc((size_t)(ys * n_rows) * sizeof(float));
	for (int64_t o = 0; o < o1; o++)
		fill_row(t, w + (size_t)o * wr, n_in, o % 3 == 1 ? W_RANDOM : wm);
	for (int64_t r = 0; r < n_rows; r++)
		fill_act(t, x + (size_t)r * xr, n_in, r % 2 ? X_RANDOM : xm, 1.0f);
	const float sentinel = -12345.5f;
	for (int64_t i = 0; i < ys * n_rows; i++)
		y[i] = sentinel;
	kern_force_ref(0);
	kern_matmul(t, w, n_in, o0, o1, x, xr, n_rows, y, ys);
	for (int64_t r = 0; r < n_rows; r++)
		for (int64_t o = 0; o < ys; o++) {
			const float got = y[r * ys + o];
			if (o < o0 || o >= o1) {
				assert_true(got == sentinel);
				continue;
			}
			const float want =
			    kern_dot_ref(t, n_in, w + (size_t)o * wr, x + (size_t)r * xr);
			if (!same_float(got, want)) {
				print_error("matmul %s n_in=%lld rows=%lld [%lld,%lld) r=%lld "
					    "o=%lld: %a != ref %a\n",
					    kern_type_name(t), (long long)n_in, (long long)n_rows,
					    (long long)o0, (long long)o1, (long long)r,
					    (long long)o, got, want);
				fail();
			}
		}
	guarded_free(w, wr * (size_t)o1);
	guarded_free(x, xbytes);
	free(y);
}

static void test_matmul(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	static const int64_t ranges[][3] = {
	    /* n_out, o0, o1 */
	    {19, 0, 19}, {19, 2, 17}, {8, 0, 8},   {16, 0, 16}, {17, 9, 17}, {25, 1, 24},
	    {7, 0, 7},	 {3, 1, 3},   {33, 8, 33}, {11, 5, 6},	{9, 0, 9},
	};
	rng_seed(77);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		const uint32_t t = types[ti];
		for (int64_t nb = 1; nb <= 9; nb++)
			for (size_t k = 0; k < sizeof(ranges) / sizeof(ranges[0]); k++)
				for (int64_t nr = 1; nr <= 7; nr++) {
					if (nb > 2 && nb != 9 && nr > 2 && nr != 5 && nr != 7)
						continue; /* keep the suite quick */
					run_matmul(t, nb * 32, ranges[k][0], nr, ranges[k][1],
						   ranges[k][2], W_RANDOM, X_RANDOM);
				}
		/* edge-case blocks inside ordinary tiles */
		for (int wm = W_EDGE; wm <= W_INF; wm++)
			for (int64_t nr = 1; nr <= 7; nr += 3) {
				run_matmul(t, 96, 19, nr, 0, 19, wm, X_EXTREME);
				run_matmul(t, 64, 13, nr, 3, 12, wm, X_RAW);
			}
		/* several output chunks (about 64 KiB of weights each), with
		 * more rows than a tile */
		run_matmul(t, 4096, 60, 6, 1, 59, W_RANDOM, X_RANDOM);
		run_matmul(t, 2880, 40, 1, 0, 37, W_EDGE, X_RANDOM);
	}
}

/* kern_matmul's results do not depend on the batch: rows computed alone
 * and among others, and output ranges split anywhere, agree bit for bit. */
/* Q4_1, Q5_0, Q5_1: kern_dot_ref (and kern_dot) give llama.cpp's results bit
 * for bit.  The expected values are what ggml_vec_dot_q4_1_q8_1,
 * _q5_0_q8_0 and _q5_1_q8_1 of llama.cpp's prebuilt x86 CPU backend
 * returned for these rows: rng_seed(31), then per type and case c
 * (n = 32 (1 + 3c)) fill_row(t, w, n, W_RANDOM) and fill_act(t, x, n,
 * c == 5 ? X_RAW : X_RANDOM, 1) (X_RAW has int8 -128, which ggml's sign trick
 * multiplies as -128 against negative Q5_0 codes). */
#define LEG_GGML_CASES 6
static const uint32_t leg_ggml_types[] = {KERN_Q4_1, KERN_Q5_0, KERN_Q5_1};
static const uint32_t leg_ggml_want[][LEG_GGML_CASES] = {
    {0xbf4bf937, 0xbfa20730, 0xbed71905, 0x40804965, 0x40b8ae89, 0x41a2c1cf},
    {0x4054e771, 0x40e4a78a, 0x40d24afe, 0xc0a04fbd, 0x4063284c, 0xc2b59457},
    {0xc0921865, 0x40e447c7, 0x415f7de1, 0x4154ec08, 0x41019eac, 0xc314e519},
};

static void test_dot_ggml(void **state)
{
	(void)state;
	const int simd = have_avx2();
	rng_seed(31);
	for (size_t ti = 0; ti < sizeof(leg_ggml_types) / sizeof(leg_ggml_types[0]); ti++) {
		const uint32_t t = leg_ggml_types[ti];
		for (int c = 0; c < LEG_GGML_CASES; c++) {
			const int64_t n = 32 * (1 + 3 * c);
			uint8_t *w = xmalloc(kern_row_bytes(t, n));
			uint8_t *x = xmalloc(kern_row_bytes(kern_act_type(t), n));
			fill_row(t, w, n, W_RANDOM);
			fill_act(t, x, n, c == 5 ? X_RAW : X_RANDOM, 1.0f);
			const float ref = kern_dot_ref(t, n, w, x);
			const float got = simd ? kern_dot(t, n, w, x) : ref;
			if (f2u(ref) != leg_ggml_want[ti][c] || f2u(got) != leg_ggml_want[ti][c]) {
				print_error("%s case %d: ref %08x simd %08x, llama.cpp %08x\n",
					    kern_type_name(t), c, f2u(ref), f2u(got),
					    leg_ggml_want[ti][c]);
				fail();
			}
			free(w);
			free(x);
		}
	}
}

/* IQ4_NL: llama.cpp repacks 2-D IQ4_NL weights (8 rows interleaved);
 * kern_dot_ref and kern_dot give its GEMV's results bit for bit.  The expected
 * values are what ggml_gemv_iq4_nl_8x8_q8_0 of its prebuilt x86 CPU backend
 * returned for these 8 rows repacked: rng_seed(33), fill_row(IQ4_NL, w, 8 * 128,
 * W_RANDOM) and fill_act(IQ4_NL, x, 128, X_RANDOM, 1). */
static const uint32_t iq4nl_ggml_want[8] = {0xc23759ec, 0x403410e9, 0xc195e895, 0xc135532a,
					    0xc1d79650, 0x41096916, 0xc14f5d58, 0x424ceb60};

static void test_iq4_nl_ggml(void **state)
{
	(void)state;
	const int simd = have_avx2();
	const int64_t n = 128;
	const size_t row = kern_row_bytes(KERN_IQ4_NL, n);
	uint8_t *w = xmalloc(row * 8), *x = xmalloc(kern_row_bytes(KERN_Q8_0, n));
	rng_seed(33);
	fill_row(KERN_IQ4_NL, w, 8 * n, W_RANDOM);
	fill_act(KERN_IQ4_NL, x, n, X_RANDOM, 1.0f);
	for (int o = 0; o < 8; o++) {
		const float ref = kern_dot_ref(KERN_IQ4_NL, n, w + o * row, x);
		const float got = simd ? kern_dot(KERN_IQ4_NL, n, w + o * row, x) : ref;
		if (f2u(ref) != iq4nl_ggml_want[o] || f2u(got) != iq4nl_ggml_want[o]) {
			print_error("IQ4_NL row %d: ref %08x simd %08x, llama.cpp %08x\n", o,
				    f2u(ref), f2u(got), iq4nl_ggml_want[o]);
			fail();
		}
	}
	free(w);
	free(x);
}

/* kern_matmul_unpacked with IQ4_NL and one row: ggml_vec_dot_iq4_nl_q8_0's
 * result bit for bit (the expected values are what llama.cpp's prebuilt x86
 * CPU backend returned: rng_seed(35), per case c n = 32 (1 + c) (odd and even
 * block counts), fill_row(IQ4_NL, w, n, W_RANDOM), fill_act(IQ4_NL, x, n,
 * X_RANDOM, 1)); with two rows each row as the lanes of llamafile's GEMM,
 * which for one block equals the one-row result. */
#define UNP_CASES 5
static const uint32_t unp_ggml_want[UNP_CASES] = {0xc151308e, 0xc11ee5fa, 0xc1d318a8, 0xc21e3d22,
						  0x40b572ca};

static void test_matmul_unpacked(void **state)
{
	(void)state;
	rng_seed(35);
	for (int c = 0; c < UNP_CASES; c++) {
		const int64_t n = 32 * (1 + c);
		const size_t xs = kern_row_bytes(KERN_Q8_0, n);
		uint8_t *w = xmalloc(kern_row_bytes(KERN_IQ4_NL, n)), *x = xmalloc(2 * xs);
		float y[2];
		fill_row(KERN_IQ4_NL, w, n, W_RANDOM);
		fill_act(KERN_IQ4_NL, x, n, X_RANDOM, 1.0f);
		memcpy(x + xs, x, xs);
		kern_matmul_unpacked(KERN_IQ4_NL, w, n, 0, 1, x, xs, 1, y, 1, NULL);
		if (f2u(y[0]) != unp_ggml_want[c]) {
			print_error("IQ4_NL unpacked n=%lld: %08x, llama.cpp %08x\n", (long long)n,
				    f2u(y[0]), unp_ggml_want[c]);
			fail();
		}
		kern_matmul_unpacked(KERN_IQ4_NL, w, n, 0, 1, x, xs, 2, y, 1, NULL);
		assert_true(f2u(y[0]) == f2u(y[1]));
		float y1[2];
		const uint8_t alone[2] = {0, 1}; /* row 0 a one-row sequence */
		kern_matmul_unpacked(KERN_IQ4_NL, w, n, 0, 1, x, xs, 2, y1, 1, alone);
		assert_true(f2u(y1[0]) == unp_ggml_want[c] && f2u(y1[1]) == f2u(y[1]));
		if (n == 32)
			assert_true(f2u(y[0]) == unp_ggml_want[c]);
		free(w);
		free(x);
	}
}

static void test_matmul_batch(void **state)
{
	(void)state;
	const int64_t n_in = 320, n_out = 29, n_rows = 7;
	rng_seed(101);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		const uint32_t t = types[ti];
		const size_t wr = kern_row_bytes(t, n_in),
			     xr = kern_row_bytes(kern_act_type(t), n_in);
		uint8_t *w = xmalloc(wr * n_out), *x = xmalloc(xr * n_rows);
		float all[7 * 29], one[29];
		fill_row(t, w, n_in * n_out, W_RANDOM);
		fill_act(t, x, n_in * n_rows, X_RANDOM, 1.0f);
		kern_force_ref(0);
		kern_matmul(t, w, n_in, 0, n_out, x, xr, n_rows, all, n_out);
		for (int64_t r = 0; r < n_rows; r++)
			for (int64_t split = 1; split < n_out; split += 5) {
				kern_matmul(t, w, n_in, 0, split, x + r * xr, xr, 1, one, n_out);
				kern_matmul(t, w, n_in, split, n_out, x + r * xr, xr, 1, one,
					    n_out);
				for (int64_t o = 0; o < n_out; o++)
					assert_true(f2u(one[o]) == f2u(all[r * n_out + o]));
			}
		free(w);
		free(x);
	}
}

int main(void)
{
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_types),	   cmocka_unit_test(test_dequant_hand),
	    cmocka_unit_test(test_dequant_oracle), cmocka_unit_test(test_dequant_simd),
	    cmocka_unit_test(test_convert_q8_1),   cmocka_unit_test(test_dot_ref_double),
	    cmocka_unit_test(test_dot_simd),	   cmocka_unit_test(test_matmul),
	    cmocka_unit_test(test_matmul_batch),   cmocka_unit_test(test_dot_ggml),
	    cmocka_unit_test(test_iq4_nl_ggml),	   cmocka_unit_test(test_matmul_unpacked),
	};
	return kern_test_run_levels("kern_legacy", tests, sizeof(tests) / sizeof(tests[0]));
}
