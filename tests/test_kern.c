/* test_kern: the kernels against hand-computed values, a double-precision
 * reference, and (when the CPU has AVX2+FMA+F16C) the SIMD versions against
 * their scalar twins, once per SIMD level the CPU has (AVX2, AVX-512);
 * kern_matmul against kern_dot bit for bit. */
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
#include "kernels/kern_impl.h"

/* ----------------------------------------------------------- helpers */

static int have_avx2(void)
{
	kern_force_ref(0);
	return kern_isa_now() != KERN_ISA_SCALAR;
}

static const uint32_t all_types[] = {KERN_F32,	KERN_F16,  KERN_BF16,
				     KERN_Q4_0, KERN_Q8_0, KERN_MXFP4};
#define N_TYPES (sizeof(all_types) / sizeof(all_types[0]))

static int is_quant(uint32_t t)
{
	return kern_type_block(t) == KERN_QK;
}

/* Random weight row of type t with n values: random codes, scales drawn from
 * moderate ranges (f16 for Q4_0/Q8_0, exponent 118..130 for MXFP4). */
static void fill_weights(uint32_t t, void *dst, int64_t n, float scale)
{
	uint8_t *p = dst;
	if (!is_quant(t)) {
		float *tmp = xmalloc((size_t)n * sizeof(float));
		for (int64_t i = 0; i < n; i++)
			tmp[i] = rng_f() * scale;
		if (t == KERN_F32)
			memcpy(dst, tmp, (size_t)n * 4);
		else
			kern_convert_row_ref((enum kern_type)t, tmp, dst, n);
		free(tmp);
		return;
	}
	size_t bs = kern_type_block_bytes(t);
	for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
		uint8_t *b = p + (size_t)ib * bs;
		for (size_t j = 0; j < bs; j++)
			b[j] = (uint8_t)rng_u32();
		if (t == KERN_MXFP4) {
			b[0] = (uint8_t)(118 + rng_u32() % 13);
		} else {
			uint16_t d = kern_f32_to_f16(scale * (0.001f + 0.05f * (rng_f() + 1.0f)));
			memcpy(b, &d, 2);
		}
	}
}

/* Activation row for weight type t from floats. */
static void make_act(uint32_t t, const float *x, void *dst, int64_t n)
{
	kern_convert_row_ref(kern_act_type(t), x, dst, n);
}

/* Weight code j of a quantised block as an integer, and the block's scale in
 * double (MXFP4 codes doubled, scale 2^(e-128), as ggml keeps them). */
static int w_code(uint32_t t, const uint8_t *b, int j)
{
	static const int mx[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
	switch (t) {
	case KERN_Q8_0: return (int8_t)b[2 + j];
	case KERN_Q4_0: return (j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4) - 8;
	default: return mx[j < 16 ? b[1 + j] & 15 : b[1 + j - 16] >> 4];
	}
}

static double w_scale(uint32_t t, const uint8_t *b)
{
	uint16_t d;
	if (t == KERN_MXFP4)
		return ldexp(1.0, b[0] - 128);
	memcpy(&d, b, 2);
	return kern_f16_to_f32(d);
}

/* Dot in double, independent of the kernels' decoding of quantised blocks,
 * plus the sum of |terms| (for tolerances). */
static double dot_double(uint32_t t, const void *w, const void *x, int64_t n, double *sumabs)
{
	double s = 0, sa = 0;
	if (is_quant(t)) {
		const uint8_t *wb = w, *xb = x;
		size_t bs = kern_type_block_bytes(t);
		for (int64_t ib = 0; ib < n / KERN_QK; ib++) {
			const uint8_t *bw = wb + (size_t)ib * bs, *bx = xb + (size_t)ib * 34;
			double d = w_scale(t, bw) * w_scale(KERN_Q8_0, bx);
			long si = 0, sai = 0;
			for (int j = 0; j < KERN_QK; j++) {
				long p = (long)w_code(t, bw, j) * (int8_t)bx[2 + j];
				si += p;
				sai += labs(p);
			}
			s += d * (double)si;
			sa += fabs(d) * (double)sai;
		}
		*sumabs = sa;
		return s;
	}
	float *a = xmalloc((size_t)n * sizeof(float));
	float *b = xmalloc((size_t)n * sizeof(float));
	kern_dequant_row_ref(t, w, a, n);
	kern_dequant_row_ref(t, x, b, n);
	for (int64_t i = 0; i < n; i++) {
		double p = (double)a[i] * (double)b[i];
		s += p;
		sa += fabs(p);
	}
	free(a);
	free(b);
	*sumabs = sa;
	return s;
}

static void check_close(const char *what, uint32_t t, int64_t n, double got, double want,
			double sumabs, double rel)
{
	double tol = rel * sumabs + 1e-37;
	if (!(fabs(got - want) <= tol)) {
		print_error("%s %s n=%lld: got %.9g want %.9g (sumabs %.6g, tol %.3g)\n", what,
			    kern_type_name(t), (long long)n, got, want, sumabs, tol);
		fail();
	}
}

/* ------------------------------------------------------------- tests */

static void test_types(void **state)
{
	(void)state;
	assert_true(kern_type_known(KERN_MXFP4));
	assert_false(kern_type_known(4)); /* Q4_2: GGML dropped it */
	assert_string_equal(kern_type_name(34), "TQ1_0");
	assert_false(kern_type_known(34));
	assert_int_equal(kern_row_bytes(KERN_Q4_K, 512), 288);
	assert_int_equal(kern_act_type(KERN_Q6_K), KERN_Q8_K);
	assert_int_equal(kern_act_type(KERN_Q4_1), KERN_Q8_1);
	assert_int_equal(kern_act_type(KERN_IQ4_NL), KERN_Q8_0);
	assert_false(kern_type_dot(KERN_Q8_K));
	assert_string_equal(kern_type_name(KERN_Q4_0), "Q4_0");
	assert_string_equal(kern_type_name(77), "?");
	assert_int_equal(kern_act_type(KERN_Q4_0), KERN_Q8_0);
	assert_int_equal(kern_act_type(KERN_Q8_0), KERN_Q8_0);
	assert_int_equal(kern_act_type(KERN_MXFP4), KERN_Q8_0);
	assert_int_equal(kern_act_type(KERN_F16), KERN_F16);
	assert_int_equal(kern_act_type(KERN_BF16), KERN_BF16);
	assert_int_equal(kern_act_type(KERN_F32), KERN_F32);
	assert_int_equal(kern_row_bytes(KERN_Q4_0, 64), 36);
	assert_int_equal(kern_row_bytes(KERN_Q8_0, 64), 68);
	assert_int_equal(kern_row_bytes(KERN_MXFP4, 2880), 90 * 17);
	assert_int_equal(kern_row_bytes(KERN_F16, 7), 14);
	assert_int_equal(kern_row_bytes(KERN_BF16, 3), 6);
	assert_int_equal(kern_row_bytes(KERN_F32, 5), 20);
	assert_int_equal(kern_type_block(KERN_MXFP4), 32);
	assert_int_equal(kern_type_block(KERN_F16), 1);
}

/* f16 -> f32 for every half against ldexp; f32 -> f16 hand values and
 * nearest-even against neighbours. */
static void test_f16_scalar(void **state)
{
	(void)state;
	for (uint32_t h = 0; h < 65536; h++) {
		int e = (h >> 10) & 31, m = h & 1023;
		double v;
		float f = kern_f16_to_f32((uint16_t)h);
		if (e == 31) {
			if (m)
				assert_true(isnan(f));
			else
				assert_true(isinf(f) && ((h & 0x8000) ? f < 0 : f > 0));
			continue;
		}
		v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
		if (h & 0x8000)
			v = -v;
		assert_true((double)f == v);
		assert_int_equal(!!signbit(f), !!(h & 0x8000));
		/* every finite half round-trips */
		assert_int_equal(kern_f32_to_f16(f), h);
	}
	assert_int_equal(kern_f32_to_f16(1.0f), 0x3c00);
	assert_int_equal(kern_f32_to_f16(-0.0f), 0x8000);
	assert_int_equal(kern_f32_to_f16(65504.0f), 0x7bff);
	assert_int_equal(kern_f32_to_f16(65519.99f), 0x7bff);
	assert_int_equal(kern_f32_to_f16(65520.0f), 0x7c00);
	assert_int_equal(kern_f32_to_f16(-1e30f), 0xfc00);
	assert_int_equal(kern_f32_to_f16(INFINITY), 0x7c00);
	assert_int_equal(kern_f32_to_f16(ldexpf(1, -24)), 0x0001);
	assert_int_equal(kern_f32_to_f16(ldexpf(1, -25)), 0x0000);	     /* tie -> even */
	assert_int_equal(kern_f32_to_f16(ldexpf(3, -25)), 0x0002);	     /* tie -> even */
	assert_int_equal(kern_f32_to_f16(ldexpf(1, -25) * 1.0001f), 0x0001); /* above tie */
	assert_int_equal(kern_f32_to_f16(1.0f + ldexpf(1, -11)), 0x3c00);    /* tie -> even */
	assert_int_equal(kern_f32_to_f16(1.0f + ldexpf(3, -11)), 0x3c02);    /* tie -> even */
	assert_int_equal(kern_f32_to_f16(ldexpf(1023, -24) + ldexpf(1, -25)), 0x0400);
	uint16_t hn = kern_f32_to_f16(NAN);
	assert_true((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0);
	assert_true(isnan(kern_f16_to_f32(0x7c01))); /* signalling NaN stays NaN */

	/* nearest-even against the neighbours, on a sample of all f32 */
	for (uint64_t u = 0; u < (1ull << 32); u += 65537) {
		float f = u2f((uint32_t)u);
		if (isnan(f))
			continue;
		uint16_t h = kern_f32_to_f16(f);
		double a = fabs((double)f);
		uint16_t m = h & 0x7fff;
		if (m == 0x7c00) {
			assert_true(a >= 65520.0);
			continue;
		}
		double v = fabs((double)kern_f16_to_f32(m));
		double err = fabs(a - v);
		if (m < 0x7bff) {
			double up = kern_f16_to_f32((uint16_t)(m + 1));
			assert_true(err < fabs(up - a) || (err == fabs(up - a) && !(m & 1)));
		} else {
			assert_true(a < 65520.0);
		}
		if (m > 0) {
			double dn = kern_f16_to_f32((uint16_t)(m - 1));
			assert_true(err < fabs(a - dn) || (err == fabs(a - dn) && !(m & 1)));
		}
	}
}

static void test_bf16_scalar(void **state)
{
	(void)state;
	assert_int_equal(kern_f32_to_bf16(1.0f), 0x3f80);
	assert_int_equal(kern_f32_to_bf16(-0.0f), 0x8000);
	assert_int_equal(kern_f32_to_bf16(u2f(0x3f808000)), 0x3f80); /* tie -> even */
	assert_int_equal(kern_f32_to_bf16(u2f(0x3f818000)), 0x3f82); /* tie -> even */
	assert_int_equal(kern_f32_to_bf16(u2f(0x3f808001)), 0x3f81);
	assert_int_equal(kern_f32_to_bf16(INFINITY), 0x7f80);
	assert_int_equal(kern_f32_to_bf16(u2f(0x7f7fffff)), 0x7f80);
	assert_int_equal(kern_f32_to_bf16(u2f(0x00000001)), 0x0000);
	assert_int_equal(kern_f32_to_bf16(u2f(0x00008000)), 0x0000); /* tie -> even */
	assert_int_equal(kern_f32_to_bf16(u2f(0x00018000)), 0x0002);
	assert_int_equal(kern_f32_to_bf16(u2f(0x7f800001)), 0x7fc0); /* sNaN kept NaN */
	assert_int_equal(kern_f32_to_bf16(u2f(0xffc00000)), 0xffc0);
	assert_true(kern_bf16_to_f32(0x3f80) == 1.0f);
	assert_true(kern_bf16_to_f32(0xc040) == -3.0f);
	assert_true(isnan(kern_bf16_to_f32(0x7fc1)));
}

/* Special and random f32 values for the conversion tests. */
static int64_t fill_specials(float *x, int64_t cap)
{
	static const uint32_t sp[] = {
	    0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0xffc12345,
	    0x00000001, 0x80000001, 0x007fffff, 0x00800000, 0x33000000, 0x33000001, 0x337fffff,
	    0x38800000, 0x387fffff, 0x477fefff, 0x477ff000, 0x477fe000, 0x477fffff, 0x7f7fffff,
	    0x3f808000, 0x3f818000, 0x3f801000, 0x3f803000, 0x3f800fff, 0x3f801001, 0xc7800000,
	};
	int64_t n = 0;
	for (size_t i = 0; i < sizeof(sp) / sizeof(sp[0]) && n < cap; i++)
		x[n++] = u2f(sp[i]);
	while (n < cap)
		x[n++] = u2f(rng_u32());
	return n;
}

static void test_convert_float_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	const int64_t cap = 20000;
	float *x = xmalloc((size_t)cap * sizeof(float));
	uint16_t *a = xmalloc((size_t)cap * 2), *b = xmalloc((size_t)cap * 2);
	float *fa = xmalloc((size_t)cap * 4), *fb = xmalloc((size_t)cap * 4);
	rng_seed(11);
	fill_specials(x, cap);
	static const int64_t lens[] = {1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 20000};
	for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
		int64_t n = lens[li];
		const enum kern_type ts[] = {KERN_F16, KERN_BF16};
		for (int k = 0; k < 2; k++) {
			memset(a, 0x55, (size_t)cap * 2);
			memset(b, 0x55, (size_t)cap * 2);
			kern_force_ref(1);
			kern_convert_row(ts[k], x, a, n);
			kern_dequant_row(ts[k], a, fa, n);
			kern_force_ref(0);
			kern_convert_row(ts[k], x, b, n);
			kern_dequant_row(ts[k], a, fb, n);
			assert_memory_equal(a, b, (size_t)cap * 2);
			assert_memory_equal(fa, fb, (size_t)n * 4);
		}
	}
	/* every half decodes identically */
	uint16_t *all = xmalloc(65536 * 2);
	float *fall_a = xmalloc(65536 * 4), *fall_b = xmalloc(65536 * 4);
	for (uint32_t h = 0; h < 65536; h++)
		all[h] = (uint16_t)h;
	kern_force_ref(1);
	kern_dequant_row(KERN_F16, all, fall_a, 65536);
	kern_force_ref(0);
	kern_dequant_row(KERN_F16, all, fall_b, 65536);
	assert_memory_equal(fall_a, fall_b, 65536 * 4);
	free(all);
	free(fall_a);
	free(fall_b);
	free(x);
	free(a);
	free(b);
	free(fa);
	free(fb);
}

/* Q8_0 activation quantiser: hand-checked ties and scale, then ref == AVX2
 * byte for byte. */
static void test_convert_q8_0(void **state)
{
	(void)state;
	float x[64];
	uint8_t q[68];
	/* amax 127 -> d = 1, id = 1: ties round to even */
	for (int j = 0; j < 32; j++)
		x[j] = 0.0f;
	x[0] = 127.0f;
	x[1] = 2.5f;
	x[2] = 3.5f;
	x[3] = -2.5f;
	x[4] = -0.5f;
	x[5] = 0.5f;
	x[6] = 1.4999999f;
	x[7] = -127.0f;
	x[8] = -0.0f;
	/* second block: all zeros -> d = 0, q = 0 */
	for (int j = 32; j < 64; j++)
		x[j] = (j & 1) ? -0.0f : 0.0f;
	kern_convert_row_ref(KERN_Q8_0, x, q, 64);
	uint16_t d;
	memcpy(&d, q, 2);
	assert_int_equal(d, 0x3c00);
	const int8_t *qs = (const int8_t *)(q + 2);
	assert_int_equal(qs[0], 127);
	assert_int_equal(qs[1], 2);
	assert_int_equal(qs[2], 4);
	assert_int_equal(qs[3], -2);
	assert_int_equal(qs[4], 0);
	assert_int_equal(qs[5], 0);
	assert_int_equal(qs[6], 1);
	assert_int_equal(qs[7], -127);
	assert_int_equal(qs[8], 0);
	memcpy(&d, q + 34, 2);
	assert_int_equal(d, 0);
	for (int j = 0; j < 32; j++)
		assert_int_equal(q[36 + j], 0);

	if (!have_avx2())
		return;
	enum { NB = 256 };
	float *y = xmalloc(NB * 32 * sizeof(float));
	uint8_t *a = xmalloc(NB * 34), *b = xmalloc(NB * 34);
	rng_seed(5);
	for (int ib = 0; ib < NB; ib++) {
		float *p = y + ib * 32;
		int kind = ib % 8;
		float scale = ldexpf(1.0f, (int)(rng_u32() % 60) - 30);
		for (int j = 0; j < 32; j++) {
			switch (kind) {
			case 0: p[j] = rng_f() * scale; break;
			case 1: p[j] = 0.0f; break;
			case 2:
				p[j] = (float)((int)(rng_u32() % 255) - 127) * 0.5f;
				break;					   /* ties */
			case 3: p[j] = u2f(rng_u32() & 0x807fffff); break; /* subnormal */
			case 4: p[j] = (j == 3) ? INFINITY : rng_f(); break;
			case 5: p[j] = (j & 1) ? -0.0f : 1e-3f * rng_f(); break;
			case 6: p[j] = rng_f() * 3e38f; break;
			default: p[j] = (float)((int)(rng_u32() % 9) - 4) * scale; break;
			}
		}
	}
	kern_force_ref(1);
	kern_convert_row(KERN_Q8_0, y, a, NB * 32);
	kern_force_ref(0);
	kern_convert_row(KERN_Q8_0, y, b, NB * 32);
	for (int ib = 0; ib < NB; ib++)
		if (memcmp(a + ib * 34, b + ib * 34, 34) != 0) {
			print_error("Q8_0 block %d differs (kind %d)\n", ib, ib % 8);
			fail();
		}
	free(y);
	free(a);
	free(b);
}

/* Hand-built blocks with known values, through both implementations. */
static void check_dequant(uint32_t t, const void *blk, int64_t n, const float *want)
{
	float got[64];
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1 && !have_avx2())
			break;
		kern_force_ref(pass == 0);
		memset(got, 0x7f, sizeof(got));
		kern_dequant_row(t, blk, got, n);
		for (int64_t j = 0; j < n; j++)
			if (!(got[j] == want[j] || (isnan(got[j]) && isnan(want[j])))) {
				print_error("%s %s value %lld: got %a want %a\n", kern_type_name(t),
					    pass ? kern_isa_name() : "ref", (long long)j, got[j],
					    want[j]);
				fail();
			}
	}
	kern_force_ref(0);
}

static void test_dequant_table(void **state)
{
	(void)state;
	uint8_t b[80];
	float want[64];
	static const float e2m1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};

	/* Q4_0, d = 1: byte j = j | (15 - j) << 4 */
	b[0] = 0x00, b[1] = 0x3c;
	for (int j = 0; j < 16; j++) {
		b[2 + j] = (uint8_t)(j | (15 - j) << 4);
		want[j] = (float)(j - 8);
		want[j + 16] = (float)(7 - j);
	}
	check_dequant(KERN_Q4_0, b, 32, want);
	/* Q4_0, d = -0.25 (0xb400) */
	b[0] = 0x00, b[1] = 0xb4;
	for (int j = 0; j < 32; j++)
		want[j] *= -0.25f;
	check_dequant(KERN_Q4_0, b, 32, want);

	/* Q8_0, d = 0.5; second block d = smallest subnormal half 2^-24 */
	b[0] = 0x00, b[1] = 0x38;
	b[34] = 0x01, b[35] = 0x00;
	for (int j = 0; j < 32; j++) {
		b[2 + j] = (uint8_t)(int8_t)(j * 8 - 128);
		want[j] = (float)(j * 8 - 128) * 0.5f;
		b[36 + j] = (uint8_t)(int8_t)(127 - j);
		want[32 + j] = ldexpf((float)(127 - j), -24);
	}
	check_dequant(KERN_Q8_0, b, 64, want);

	/* MXFP4: every code in both nibbles, at e = 127 (scale 1) and e = 130 */
	static const uint8_t es[] = {127, 130, 0, 1, 254, 255};
	for (size_t k = 0; k < sizeof(es); k++) {
		b[0] = es[k];
		for (int j = 0; j < 16; j++) {
			int lo = j, hi = 15 - j;
			b[1 + j] = (uint8_t)(lo | hi << 4);
			double vlo = (lo & 8 ? -1 : 1) * e2m1[lo & 7] * ldexp(1.0, es[k] - 127);
			double vhi = (hi & 8 ? -1 : 1) * e2m1[hi & 7] * ldexp(1.0, es[k] - 127);
			want[j] = (float)vlo;
			want[j + 16] = (float)vhi;
		}
		check_dequant(KERN_MXFP4, b, 32, want);
	}
	/* spot checks of the above */
	assert_true(ldexpf(0.5f, 0 - 127) == ldexpf(1.0f, -128));

	/* F16 and BF16 */
	const uint16_t h[9] = {0x3c00, 0xc000, 0x0001, 0x8000, 0x7bff,
			       0x3555, 0x0400, 0x7c00, 0xfc00};
	const float hw[9] = {1.0f,	  -2.0f,	  ldexpf(1, -24), -0.0f,    65504.0f,
			     0x1.554p-2f, ldexpf(1, -14), INFINITY,	  -INFINITY};
	check_dequant(KERN_F16, h, 9, hw);
	const uint16_t bf[9] = {0x3f80, 0xc000, 0x0001, 0x8000, 0x7f7f,
				0x3eab, 0x0080, 0x7f80, 0xff80};
	const float bw[9] = {1.0f,
			     -2.0f,
			     u2f(0x00010000),
			     -0.0f,
			     u2f(0x7f7f0000),
			     u2f(0x3eab0000),
			     u2f(0x00800000),
			     INFINITY,
			     -INFINITY};
	check_dequant(KERN_BF16, bf, 9, bw);
}

/* AVX2 dequantisation == scalar, bit for bit, on random blocks (every MXFP4
 * exponent, subnormal and special f16 scales). */
static void test_dequant_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	enum { N = 256 * 32 };
	uint8_t *w = xmalloc(N * 4);
	float *a = xmalloc(N * sizeof(float)), *b = xmalloc(N * sizeof(float));
	rng_seed(44);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		uint32_t t = all_types[ti];
		size_t bytes = kern_row_bytes(t, N);
		for (size_t i = 0; i < bytes; i++)
			w[i] = (uint8_t)rng_u32();
		if (t == KERN_MXFP4)
			for (int ib = 0; ib < N / 32; ib++)
				w[ib * 17] = (uint8_t)ib; /* e = 0..255 */
		static const int64_t ns[] = {N, 32, 7, 1};
		for (size_t k = 0; k < 4; k++) {
			int64_t n = ns[k];
			if (is_quant(t) && n % 32)
				continue;
			memset(a, 0, N * sizeof(float));
			memset(b, 0, N * sizeof(float));
			kern_force_ref(1);
			kern_dequant_row(t, w, a, n);
			kern_force_ref(0);
			kern_dequant_row(t, w, b, n);
			if (memcmp(a, b, (size_t)n * sizeof(float)) != 0) {
				print_error("dequant %s n=%lld differs\n", kern_type_name(t),
					    (long long)n);
				fail();
			}
		}
	}
	free(w);
	free(a);
	free(b);
}

/* kern_dot_ref against a double dot of the dequantised rows. */
static void test_dot_ref_double(void **state)
{
	(void)state;
	static const int64_t ns[] = {32, 96, 1024, 4096};
	float *xf = xmalloc(4096 * sizeof(float));
	void *w = xmalloc(4096 * 4), *x = xmalloc(4096 * 4);
	rng_seed(21);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		uint32_t t = all_types[ti];
		for (size_t k = 0; k < sizeof(ns) / sizeof(ns[0]); k++) {
			int64_t n = ns[k];
			for (int rep = 0; rep < 3; rep++) {
				fill_weights(t, w, n, 1.0f);
				for (int64_t i = 0; i < n; i++)
					xf[i] = rng_f() * 4.0f;
				make_act(t, xf, x, n);
				double sa, want = dot_double(t, w, x, n, &sa);
				float got = kern_dot_ref(t, n, w, x);
				check_close("ref-vs-double", t, n, got, want, sa,
					    2e-6 * sqrt((double)n));
			}
		}
	}
	/* all-zero rows give exactly zero */
	memset(w, 0, 4096 * 4);
	memset(x, 0, 4096 * 4);
	for (size_t ti = 0; ti < N_TYPES; ti++)
		assert_true(kern_dot_ref(all_types[ti], 4096, w, x) == 0.0f);
	free(xf);
	free(w);
	free(x);
}

/* One AVX2-vs-ref comparison. */
static void cmp_dot(uint32_t t, int64_t n, const void *w, const void *x)
{
	kern_force_ref(1);
	float r = kern_dot(t, n, w, x);
	kern_force_ref(0);
	float s = kern_dot(t, n, w, x);
	double sa;
	(void)dot_double(t, w, x, n, &sa);
	if (isnan(r) || isinf(r)) {
		assert_true(isnan(s) == isnan(r) && isinf(s) == isinf(r));
		return;
	}
	/* quantised weights: the same arithmetic in the same order */
	if (is_quant(t) && memcmp(&s, &r, sizeof(s)) != 0) {
		print_error("avx2-vs-ref %s n=%lld: %.9g != %.9g (must be bit-identical)\n",
			    kern_type_name(t), (long long)n, s, r);
		fail();
	}
	check_close("avx2-vs-ref", t, n, s, r, sa, 4e-6 * sqrt((double)n));
}

static void test_dot_simd(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	static const int64_t nq[] = {32, 64, 96, 160, 1024, 2880, 4096};
	static const int64_t nf[] = {1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33, 100, 1000, 4095, 4096};
	float *xf = xmalloc(4096 * sizeof(float));
	uint8_t *w = xmalloc(4096 * 4), *x = xmalloc(4096 * 4);
	rng_seed(33);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		uint32_t t = all_types[ti];
		const int64_t *ns = is_quant(t) ? nq : nf;
		size_t nn = is_quant(t) ? sizeof(nq) / sizeof(nq[0]) : sizeof(nf) / sizeof(nf[0]);
		for (size_t k = 0; k < nn; k++) {
			int64_t n = ns[k];
			for (int rep = 0; rep < 4; rep++) {
				fill_weights(t, w, n, rep == 3 ? 1e-3f : 1.0f);
				for (int64_t i = 0; i < n; i++)
					xf[i] = rng_f() * (rep == 2 ? 1000.0f : 1.0f);
				make_act(t, xf, x, n);
				cmp_dot(t, n, w, x);
			}
			/* zeros: exactly 0 both ways */
			memset(w, 0, kern_row_bytes(t, n));
			memset(x, 0, kern_row_bytes(kern_act_type(t), n));
			kern_force_ref(0);
			assert_true(kern_dot(t, n, w, x) == 0.0f);
			/* negative zeros in the activations */
			fill_weights(t, w, n, 1.0f);
			for (int64_t i = 0; i < n; i++)
				xf[i] = -0.0f;
			make_act(t, xf, x, n);
			assert_true(kern_dot(t, n, w, x) == 0.0f);
			cmp_dot(t, n, w, x);
		}
	}

	/* MXFP4 extreme exponents; tiny (subnormal f16) activation scales keep
	 * e = 254/255 finite. */
	static const uint8_t es[] = {0, 1, 2, 254, 255};
	for (size_t k = 0; k < sizeof(es); k++) {
		int64_t n = 256;
		fill_weights(KERN_MXFP4, w, n, 1.0f);
		for (int64_t ib = 0; ib < n / 32; ib++)
			w[ib * 17] = es[k];
		for (int64_t i = 0; i < n; i++)
			xf[i] = rng_f() * (es[k] > 100 ? ldexpf(1, -12) : 1.0f);
		make_act(KERN_MXFP4, xf, x, n);
		cmp_dot(KERN_MXFP4, n, w, x);
		kern_force_ref(1);
		float r = kern_dot(KERN_MXFP4, n, w, x);
		assert_true(isfinite(r));
	}
	/* Q4_0 / Q8_0 with subnormal f16 weight scales, Q8_0 with -128 codes */
	for (int k = 0; k < 2; k++) {
		uint32_t t = k ? KERN_Q8_0 : KERN_Q4_0;
		int64_t n = 512;
		size_t bs = kern_type_block_bytes(t);
		fill_weights(t, w, n, 1.0f);
		for (int64_t ib = 0; ib < n / 32; ib++) {
			uint16_t d = (uint16_t)(1 + rng_u32() % 0x3ff);
			memcpy(w + ib * bs, &d, 2);
			if (t == KERN_Q8_0)
				w[ib * bs + 2 + ib % 32] = 0x80;
		}
		for (int64_t i = 0; i < n; i++)
			xf[i] = rng_f();
		make_act(t, xf, x, n);
		cmp_dot(t, n, w, x);
	}
	kern_force_ref(0);
	free(xf);
	free(w);
	free(x);
}

/* Edge-case weight scales for matmul_special_case: MXFP4 exponents at the
 * subnormal end (0, 1, 2) or the top (253..255, with tiny activations),
 * f16 subnormal scales for Q4_0 / Q8_0 (and -128 codes for Q8_0), mixed
 * with ordinary blocks so that a tile holds both. */
enum { SCALES_RANDOM, SCALES_LOW, SCALES_HIGH };

static void tweak_scales(uint32_t t, uint8_t *row, int64_t n_in, int mode)
{
	static const uint8_t lo[] = {0, 1, 2}, hi[] = {253, 254, 255};
	size_t bs = kern_type_block_bytes(t);
	for (int64_t ib = 0; ib < n_in / KERN_QK; ib++) {
		uint8_t *b = row + (size_t)ib * bs;
		if (rng_u32() % 3 == 0)
			continue; /* keep an ordinary block */
		if (t == KERN_MXFP4) {
			b[0] = mode == SCALES_LOW ? lo[rng_u32() % 3] : hi[rng_u32() % 3];
		} else {
			uint16_t d = (uint16_t)(1 + rng_u32() % 0x3ff);
			memcpy(b, &d, 2);
			if (t == KERN_Q8_0)
				b[2 + rng_u32() % 32] = 0x80;
		}
	}
}

/* kern_matmul == kern_dot bit for bit, both dispatches, odd shapes (and ==
 * the scalar kern_dot for quantised weights); scales: SCALES_*. */
static void run_matmul_scales(uint32_t t, int64_t n_in, int64_t n_out, int64_t n_rows, int64_t o0,
			      int64_t o1, int scales)
{
	enum kern_type at = kern_act_type(t);
	size_t wr = kern_row_bytes(t, n_in);
	size_t xr = kern_row_bytes(at, n_in) + 6; /* padded stride */
	int64_t ys = n_out + 3;
	uint8_t *w = xmalloc(wr * (size_t)n_out);
	uint8_t *x = xmalloc(xr * (size_t)n_rows);
	float *xf = xmalloc((size_t)n_in * sizeof(float));
	float *y = xmalloc((size_t)(ys * n_rows) * sizeof(float));
	for (int64_t o = 0; o < n_out; o++) {
		fill_weights(t, w + (size_t)o * wr, n_in, 1.0f);
		if (scales != SCALES_RANDOM && is_quant(t) && o % 3 != 1)
			tweak_scales(t, w + (size_t)o * wr, n_in, scales);
	}
	for (int64_t r = 0; r < n_rows; r++) {
		for (int64_t i = 0; i < n_in; i++)
			xf[i] = rng_f() * (scales == SCALES_HIGH ? ldexpf(1, -12) : 1.0f);
		make_act(t, xf, x + (size_t)r * xr, n_in);
	}
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1 && !have_avx2())
			break;
		kern_force_ref(pass == 0);
		const float sentinel = -12345.5f;
		for (int64_t i = 0; i < ys * n_rows; i++)
			y[i] = sentinel;
		kern_matmul(t, w, n_in, o0, o1, x, xr, n_rows, y, ys);
		for (int64_t r = 0; r < n_rows; r++)
			for (int64_t o = 0; o < ys; o++) {
				float got = y[r * ys + o];
				if (o < o0 || o >= o1) {
					assert_true(got == sentinel);
					continue;
				}
				/* quantised weights: every dispatch gives the scalar
				 * reference's bits */
				kern_force_ref(pass == 0 || is_quant(t));
				float want =
				    kern_dot(t, n_in, w + (size_t)o * wr, x + (size_t)r * xr);
				kern_force_ref(pass == 0);
				if (f2u(got) != f2u(want)) {
					print_error(
					    "matmul %s %s n_in=%lld rows=%lld [%lld,%lld) r=%lld "
					    "o=%lld: %a != dot %a\n",
					    kern_type_name(t), pass ? kern_isa_name() : "ref",
					    (long long)n_in, (long long)n_rows, (long long)o0,
					    (long long)o1, (long long)r, (long long)o, got, want);
					fail();
				}
			}
	}
	kern_force_ref(0);
	free(w);
	free(x);
	free(xf);
	free(y);
}

static void run_matmul_case(uint32_t t, int64_t n_in, int64_t n_out, int64_t n_rows, int64_t o0,
			    int64_t o1)
{
	run_matmul_scales(t, n_in, n_out, n_rows, o0, o1, SCALES_RANDOM);
}

/* Q8_0: kern_dot_ref (and kern_dot) give llama.cpp's results bit for bit.
 * The expected values are what ggml_vec_dot_q8_0_q8_0 of llama.cpp's prebuilt
 * x86 CPU backend returned for these rows (its llamafile GEMM computes the
 * same): rng_seed(21), then per case c (n = 32 (1 + 3c)) fill_weights(Q8_0,
 * w, n, 1) and the activations make_act of rng_f() * 2 per value. */
#define Q8_GGML_CASES 6
static const uint32_t q8_ggml_want[Q8_GGML_CASES] = {0x41cbe114, 0xc24a0031, 0x4269679b,
						     0xc2661da9, 0xc31b11a6, 0xc20a6cdc};

static void test_q8_0_ggml(void **state)
{
	(void)state;
	const int simd = have_avx2();
	rng_seed(21);
	for (int c = 0; c < Q8_GGML_CASES; c++) {
		const int64_t n = 32 * (1 + 3 * c);
		uint8_t *w = xmalloc(kern_row_bytes(KERN_Q8_0, n));
		uint8_t *xa = xmalloc(kern_row_bytes(KERN_Q8_0, n));
		float *x = xmalloc((size_t)n * sizeof(float));
		fill_weights(KERN_Q8_0, w, n, 1.0f);
		for (int64_t i = 0; i < n; i++)
			x[i] = rng_f() * 2.0f;
		make_act(KERN_Q8_0, x, xa, n);
		const float ref = kern_dot_ref(KERN_Q8_0, n, w, xa);
		const float got = simd ? kern_dot(KERN_Q8_0, n, w, xa) : ref;
		if (f2u(ref) != q8_ggml_want[c] || f2u(got) != q8_ggml_want[c]) {
			print_error("Q8_0 case %d: ref %08x simd %08x, llama.cpp %08x\n", c,
				    f2u(ref), f2u(got), q8_ggml_want[c]);
			fail();
		}
		free(w);
		free(xa);
		free(x);
	}
}

/* Q4_0: kern_dot_ref (and kern_dot) give llama.cpp's results bit for bit.
 * llama.cpp repacks Q4_0 weights (8 rows interleaved); the expected values are
 * what ggml_gemv_q4_0_8x8_q8_0 of its prebuilt x86 CPU backend returned for
 * these 8 rows repacked: rng_seed(23), fill_weights(Q4_0, w, 8 * 128, 1), and
 * the activations make_act of 128 values rng_f() * 2. */
static const uint32_t q40_ggml_want[8] = {0x4083f2e7, 0x3e01d547, 0xbf74553b, 0xc03fa086,
					  0xc0a54674, 0xc0d1207d, 0x3b6cca5e, 0xbf7f3135};

static void test_q4_0_ggml(void **state)
{
	(void)state;
	const int simd = have_avx2();
	const int64_t n = 128;
	const size_t row = kern_row_bytes(KERN_Q4_0, n);
	uint8_t *w = xmalloc(row * 8), *xa = xmalloc(kern_row_bytes(KERN_Q8_0, n));
	float x[128];
	rng_seed(23);
	fill_weights(KERN_Q4_0, w, 8 * n, 1.0f);
	for (int64_t i = 0; i < n; i++)
		x[i] = rng_f() * 2.0f;
	make_act(KERN_Q4_0, x, xa, n);
	for (int o = 0; o < 8; o++) {
		const float ref = kern_dot_ref(KERN_Q4_0, n, w + o * row, xa);
		const float got = simd ? kern_dot(KERN_Q4_0, n, w + o * row, xa) : ref;
		if (f2u(ref) != q40_ggml_want[o] || f2u(got) != q40_ggml_want[o]) {
			print_error("Q4_0 row %d: ref %08x simd %08x, llama.cpp %08x\n", o,
				    f2u(ref), f2u(got), q40_ggml_want[o]);
			fail();
		}
	}
	free(w);
	free(xa);
}

/* kern_swiglu: AVX2 = scalar bit for bit (lanes needing the scalar power of
 * two, row tails, partial ranges), and both close to silu(g) * u in double;
 * the values at and past n - n % 16 are exactly x / (1 + expf(-x)) * u. */
static void test_swiglu(void **state)
{
	(void)state;
	enum { N = 83 };
	float g[N], u[N], a[N], b[N];
	rng_seed(51);
	for (int i = 0; i < N; i++) {
		g[i] = rng_f() * (i % 7 == 0 ? 150.0f : 12.0f);
		u[i] = rng_f() * 3.0f;
	}
	g[3] = 0.0f, g[4] = -0.0f, g[5] = 95.0f, g[6] = -95.0f, g[9] = 200.0f, g[10] = -200.0f;
	const int64_t ranges[][2] = {{0, N}, {3, 61}, {17, 20}, {64, 83}};
	for (size_t k = 0; k < sizeof(ranges) / sizeof(ranges[0]); k++) {
		const int64_t j0 = ranges[k][0], j1 = ranges[k][1];
		memcpy(a, g, sizeof(g));
		memcpy(b, g, sizeof(g));
		kern_swiglu_ref(a, u, j0, j1, N);
		if (have_avx2())
			kern_swiglu(b, u, j0, j1, N);
		else
			memcpy(b, a, sizeof(a));
		for (int64_t j = 0; j < N; j++) {
			if (j < j0 || j >= j1) {
				assert_true(f2u(a[j]) == f2u(g[j]) && f2u(b[j]) == f2u(g[j]));
				continue;
			}
			if (f2u(a[j]) != f2u(b[j])) {
				print_error("swiglu [%lld]: avx2 %.9g ref %.9g\n", (long long)j,
					    (double)b[j], (double)a[j]);
				fail();
			}
			const double x = g[j], want = x / (1.0 + exp(-x)) * u[j];
			if (!(fabs(a[j] - want) <= 1e-6 * fabs(want) + 1e-30)) {
				print_error("swiglu [%lld]: %.9g, silu * u %.9g\n", (long long)j,
					    (double)a[j], want);
				fail();
			}
			if (j >= N - N % 16) {
				const float t = g[j] / (1.0f + expf(-g[j])) * u[j];
				assert_true(f2u(a[j]) == f2u(t));
			}
		}
	}
}

/* F32: ggml_vec_dot_f32's and llamafile's GEMM's AVX-512 forms (kern_ref.c):
 * AVX2 = scalar bit for bit, both close to the double sum; kern_dot and a
 * one-row kern_matmul_dense take the vec_dot form, several rows the GEMM's. */
static void test_f32_forms(void **state)
{
	(void)state;
	const int64_t ns[] = {16, 64, 69, 72, 80, 101, 128, 192, 200, 256};
	rng_seed(61);
	for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
		const int64_t n = ns[i];
		float *w = xmalloc((size_t)n * 2 * sizeof(float)), *x = w + n;
		for (int64_t k = 0; k < 2 * n; k++)
			w[k] = rng_f() * (k % 9 == 0 ? 40.0f : 1.0f);
		double want = 0, sa = 0;
		for (int64_t k = 0; k < n; k++) {
			want += (double)w[k] * x[k];
			sa += fabs((double)w[k] * x[k]);
		}
		const float v = kern_f32_dot_vec_ref(n, w, x), g = kern_f32_dot_gemm_ref(n, w, x);
		assert_true(fabs(v - want) <= 1e-6 * sa && fabs(g - want) <= 1e-6 * sa);
		assert_true(f2u(kern_dot_ref(KERN_F32, n, w, x)) == f2u(v));
		if (have_avx2()) {
			assert_true(f2u(kern_f32_dot_vec_avx2(n, w, x)) == f2u(v));
			assert_true(f2u(kern_f32_dot_gemm_avx2(n, w, x)) == f2u(g));
			assert_true(f2u(kern_dot(KERN_F32, n, w, x)) == f2u(v));
		}
		float y[2];
		/* two rows, both x */
		float *x2 = xmalloc((size_t)n * 2 * sizeof(float));
		memcpy(x2, x, (size_t)n * sizeof(float));
		memcpy(x2 + n, x, (size_t)n * sizeof(float));
		kern_matmul_dense(KERN_F32, w, n, 0, 1, x2, (size_t)n * 4, 1, y, 1);
		assert_true(f2u(y[0]) == f2u(v));
		kern_matmul_dense(KERN_F32, w, n, 0, 1, x2, (size_t)n * 4, 2, y, 1);
		assert_true(f2u(y[0]) == f2u(n % 16 ? v : g) && f2u(y[1]) == f2u(y[0]));
		kern_matmul(KERN_F32, w, n, 0, 1, x2, (size_t)n * 4, 2, y, 1);
		assert_true(f2u(y[0]) == f2u(v) && f2u(y[1]) == f2u(v));
		free(x2);
		free(w);
	}
}

/* F16: ggml_vec_dot_f16's and llamafile's F16 GEMM's AVX-512 forms, as
 * test_f32_forms (F16 weights and activations). */
static void test_f16_forms(void **state)
{
	(void)state;
	const int64_t ns[] = {16, 64, 69, 80, 128, 200, 256};
	rng_seed(62);
	for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
		const int64_t n = ns[i];
		uint16_t *w = xmalloc((size_t)n * 2 * 3 * sizeof(uint16_t)), *x = w + n,
			 *x2 = w + 2 * n;
		double want = 0, sa = 0;
		for (int64_t k = 0; k < n; k++) {
			w[k] = kern_f32_to_f16(rng_f() * (k % 9 == 0 ? 40.0f : 1.0f));
			x[k] = kern_f32_to_f16(rng_f());
			const double p = (double)kern_f16_to_f32(w[k]) * kern_f16_to_f32(x[k]);
			want += p;
			sa += fabs(p);
		}
		memcpy(x2, x, (size_t)n * sizeof(uint16_t));
		const float v = kern_f16_dot_vec_ref(n, w, x), g = kern_f16_dot_gemm_ref(n, w, x);
		assert_true(fabs(v - want) <= 1e-6 * sa && fabs(g - want) <= 1e-6 * sa);
		assert_true(f2u(kern_dot_ref(KERN_F16, n, w, x)) == f2u(v));
		if (have_avx2()) {
			assert_true(f2u(kern_f16_dot_vec_avx2(n, w, x)) == f2u(v));
			assert_true(f2u(kern_f16_dot_gemm_avx2(n, w, x)) == f2u(g));
			assert_true(f2u(kern_dot(KERN_F16, n, w, x)) == f2u(v));
		}
		float y[2];
		kern_matmul_form(KERN_F16, w, n, 0, 1, x, (size_t)n * 2, 2, y, 1, 1);
		assert_true(f2u(y[0]) == f2u(n % 16 ? v : g) && f2u(y[1]) == f2u(y[0]));
		kern_matmul_form(KERN_F16, w, n, 0, 1, x, (size_t)n * 2, 2, y, 1, 0);
		assert_true(f2u(y[0]) == f2u(v) && f2u(y[1]) == f2u(v));
		free(w);
	}
}

static void test_matmul(void **state)
{
	(void)state;
	rng_seed(77);
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		uint32_t t = all_types[ti];
		int64_t n_in = is_quant(t) ? 96 : 37;
		for (int64_t nr = 1; nr <= 9; nr++) {
			run_matmul_case(t, n_in, 11, nr, 0, 11);
			run_matmul_case(t, n_in, 11, nr, 3, 10);
			run_matmul_case(t, n_in, 11, nr, 5, 6);
		}
		/* several output chunks (about 64 KiB of weights each) */
		run_matmul_case(t, is_quant(t) ? 4096 : 1000, 40, 6, 1, 39);
		/* more rows than one block of activation rows */
		if (is_quant(t))
			run_matmul_case(t, 64, 19, 300, 1, 18);
	}
}

/* Quantised tiles (up to 8 outputs x 4 rows): row lengths of 1, 2 and 90
 * blocks, output counts and ranges around the tile width, and edge-case
 * scales inside otherwise ordinary tiles. */
static void test_matmul_quant_tiles(void **state)
{
	(void)state;
	static const uint32_t qt[] = {KERN_Q4_0, KERN_Q8_0, KERN_MXFP4};
	static const int64_t n_ins[] = {32, 64, 2880};
	static const int64_t ranges[][3] = {
	    /* n_out, o0, o1 */
	    {19, 0, 19}, {19, 2, 17}, {8, 0, 8}, {16, 0, 16}, {17, 9, 17},
	    {25, 1, 24}, {7, 0, 7},   {3, 1, 3}, {33, 8, 33},
	};
	rng_seed(91);
	for (size_t ti = 0; ti < sizeof(qt) / sizeof(qt[0]); ti++)
		for (size_t ni = 0; ni < sizeof(n_ins) / sizeof(n_ins[0]); ni++)
			for (size_t k = 0; k < sizeof(ranges) / sizeof(ranges[0]); k++)
				for (int64_t nr = 1; nr <= 5; nr++) {
					if (n_ins[ni] > 64 && nr != 1 && nr != 5)
						continue; /* keep the suite quick */
					run_matmul_case(qt[ti], n_ins[ni], ranges[k][0], nr,
							ranges[k][1], ranges[k][2]);
				}
	for (size_t ti = 0; ti < sizeof(qt) / sizeof(qt[0]); ti++)
		for (int scales = SCALES_LOW; scales <= SCALES_HIGH; scales++)
			for (int64_t nr = 1; nr <= 5; nr += 4) {
				run_matmul_scales(qt[ti], 256, 19, nr, 0, 19, scales);
				run_matmul_scales(qt[ti], 64, 13, nr, 3, 12, scales);
			}
}

int main(void)
{
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_types),
	    cmocka_unit_test(test_f16_scalar),
	    cmocka_unit_test(test_bf16_scalar),
	    cmocka_unit_test(test_convert_float_simd),
	    cmocka_unit_test(test_convert_q8_0),
	    cmocka_unit_test(test_dequant_table),
	    cmocka_unit_test(test_dequant_simd),
	    cmocka_unit_test(test_dot_ref_double),
	    cmocka_unit_test(test_dot_simd),
	    cmocka_unit_test(test_matmul),
	    cmocka_unit_test(test_matmul_quant_tiles),
	    cmocka_unit_test(test_q8_0_ggml),
	    cmocka_unit_test(test_q4_0_ggml),
	    cmocka_unit_test(test_swiglu),
	    cmocka_unit_test(test_f32_forms),
	    cmocka_unit_test(test_f16_forms),
	};
	return kern_test_run_levels("kern", tests, sizeof(tests) / sizeof(tests[0]));
}
