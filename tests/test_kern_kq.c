/* test_kern_kq: the K-quant kernels (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS with
 * Q8_K activations).  The scalar dequantisation against the oracle's
 * independent decoder (tests/data/kq-blocks.bin, from tools/kquant_blocks.mjs),
 * the scalar dot against a double-precision sum, the Q8_K quantiser against
 * hand-computed blocks, and (when the CPU has AVX2+FMA+F16C) the AVX2
 * dequantisation, quantiser, dot and matmul against the scalar twins bit for
 * bit. */
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
	kern_init();
	kern_force_ref(0);
	return kern_cpu_avx2();
}

static const uint32_t kq_types[] = {KERN_Q2_K, KERN_Q3_K, KERN_Q4_K,
				    KERN_Q5_K, KERN_Q6_K, KERN_IQ4_XS};
#define N_KQ (sizeof(kq_types) / sizeof(kq_types[0]))
#define QK   KERN_QK_K

/* Byte offsets of a block's f16 fields (d, then dmin if any). */
static int f16_fields(uint32_t t, int off[2])
{
	switch (t) {
	case KERN_Q2_K: off[0] = 80, off[1] = 82; return 2;
	case KERN_Q3_K: off[0] = 108; return 1;
	case KERN_Q4_K:
	case KERN_Q5_K: off[0] = 0, off[1] = 2; return 2;
	case KERN_Q6_K: off[0] = 208; return 1;
	default: off[0] = 0; return 1;
	}
}

static void put_f16(uint8_t *p, float v)
{
	uint16_t h = kern_f32_to_f16(v);
	memcpy(p, &h, 2);
}

/* Weight blocks: random bytes (every scale, min and code pattern), f16
 * fields from moderate random values, or per mode:
 *   0 random, 1 all bytes 0xff, 2 all bytes 0, 3 extreme d (+-65504 and a
 *   subnormal), 4 negative d and dmin, 5 bytes 0xaa / 0x55 alternating. */
static void fill_weights(uint32_t t, uint8_t *w, int64_t nb, int mode)
{
	const size_t bs = kern_type_block_bytes(t);
	int off[2];
	const int nf = f16_fields(t, off);
	for (int64_t ib = 0; ib < nb; ib++) {
		uint8_t *b = w + (size_t)ib * bs;
		for (size_t j = 0; j < bs; j++)
			b[j] = mode == 1   ? 0xff
			       : mode == 2 ? 0
			       : mode == 5 ? (j & 1 ? 0x55 : 0xaa)
					   : (uint8_t)rng_u32();
		for (int f = 0; f < nf; f++) {
			float v = 0.001f + 0.05f * (rng_f() + 1.0f);
			if (mode == 3)
				v = (ib + f) % 3 == 0	? 65504.0f
				    : (ib + f) % 3 == 1 ? -65504.0f
							: 5.9604645e-8f; /* smallest subnormal */
			else if (mode == 4)
				v = -v;
			put_f16(b + off[f], v);
		}
	}
}

/* Q8_K activation rows: quantised from random floats (mode 0), or built by
 * hand with consistent bsums: 1 all q = 127, 2 all q = -127, 3 alternating
 * +-127, 4 zero block (d = 0), 5 random q in [-127, 127] with negative d. */
static void fill_act(struct kern_block_q8_k *x, int64_t nb, int mode)
{
	if (mode == 0) {
		float *f = xmalloc((size_t)nb * QK * sizeof(float));
		for (int64_t i = 0; i < nb * QK; i++)
			f[i] = rng_f() * (float)(1 + (i / 37) % 5);
		kern_convert_row_ref(KERN_Q8_K, f, x, nb * QK);
		free(f);
		return;
	}
	for (int64_t ib = 0; ib < nb; ib++) {
		struct kern_block_q8_k *b = &x[ib];
		b->d = mode == 4 ? 0.0f : mode == 5 ? -0.0123f : 0.0371f * (float)(ib + 1);
		for (int j = 0; j < QK; j++) {
			int q = mode == 1   ? 127
				: mode == 2 ? -127
				: mode == 3 ? (j & 1 ? 127 : -127)
				: mode == 4 ? 0
					    : (int)(rng_u32() % 255) - 127;
			b->qs[j] = (int8_t)q;
		}
		for (int g = 0; g < 16; g++) {
			int s = 0;
			for (int j = 0; j < 16; j++)
				s += b->qs[16 * g + j];
			b->bsums[g] = (int16_t)s;
		}
	}
}

/* ------------------------------------------------------------- tests */

static void test_type_table(void **state)
{
	(void)state;
	static const int bytes[] = {84, 110, 144, 176, 210, 136};
	for (size_t i = 0; i < N_KQ; i++) {
		assert_int_equal(kern_type_block(kq_types[i]), QK);
		assert_int_equal(kern_type_block_bytes(kq_types[i]), bytes[i]);
		assert_int_equal(kern_act_type(kq_types[i]), KERN_Q8_K);
		assert_true(kern_type_dot(kq_types[i]));
	}
	assert_false(kern_type_dot(KERN_Q8_K));
	assert_int_equal(kern_type_block_bytes(KERN_Q8_K), sizeof(struct kern_block_q8_k));
}

/* Hand-computed Q8_K blocks through both the reference and the dispatched
 * quantiser. */
static void check_q8k_hand(int use_ref)
{
	float x[QK];
	struct kern_block_q8_k y;
	void (*conv)(enum kern_type, const float *, void *, int64_t) =
	    use_ref ? kern_convert_row_ref : kern_convert_row;

	/* max = -127 -> iscale = 1: q = round-half-even(x), d = 1 */
	for (int j = 0; j < QK; j++)
		x[j] = 0.0f;
	x[0] = -127.0f;
	x[1] = 2.5f;	/* -> 2 */
	x[2] = 3.5f;	/* -> 4 */
	x[3] = -2.5f;	/* -> -2 */
	x[4] = 0.5f;	/* -> 0 */
	x[5] = 1.5f;	/* -> 2 */
	x[6] = -0.5f;	/* -> 0 */
	x[7] = 126.5f;	/* -> 126 */
	x[16] = 127.0f; /* ties the max in magnitude: the first one wins */
	x[17] = -1.49f; /* -> -1 */
	memset(&y, 0x5a, sizeof(y));
	conv(KERN_Q8_K, x, &y, QK);
	assert_int_equal(f2u(y.d), f2u(1.0f));
	static const int8_t want[8] = {-127, 2, 4, -2, 0, 2, 0, 126};
	for (int j = 0; j < 8; j++)
		assert_int_equal(y.qs[j], want[j]);
	assert_int_equal(y.qs[16], 127);
	assert_int_equal(y.qs[17], -1);
	for (int j = 18; j < QK; j++)
		assert_int_equal(y.qs[j], 0);
	assert_int_equal(y.bsums[0], -127 + 2 + 4 - 2 + 0 + 2 + 0 + 126);
	assert_int_equal(y.bsums[1], 127 - 1);
	for (int g = 2; g < 16; g++)
		assert_int_equal(y.bsums[g], 0);

	/* the positive value comes first: iscale = -1, everything mirrored */
	x[0] = 127.0f;
	x[16] = -127.0f;
	conv(KERN_Q8_K, x, &y, QK);
	assert_int_equal(f2u(y.d), f2u(-1.0f));
	assert_int_equal(y.qs[0], -127);
	assert_int_equal(y.qs[1], -2);
	assert_int_equal(y.qs[2], -4);
	assert_int_equal(y.qs[16], 127);

	/* a scale that is not a power of two: max = 2 -> iscale = -63.5 */
	for (int j = 0; j < QK; j++)
		x[j] = 0.0f;
	x[9] = 2.0f;
	x[10] = 1.0f;	    /* -63.5 -> -64 (even) */
	x[11] = -1.0f;	    /* 63.5 -> 64 */
	x[12] = 3.0f / 127; /* about -1.5 */
	conv(KERN_Q8_K, x, &y, QK);
	assert_int_equal(f2u(y.d), f2u(1.0f / (-127.0f / 2.0f)));
	assert_int_equal(y.qs[9], -127);
	assert_int_equal(y.qs[10], -64);
	assert_int_equal(y.qs[11], 64);
	{
		float v = (-127.0f / 2.0f) * (3.0f / 127);
		int r = (int)nearbyintf(v);
		assert_int_equal(y.qs[12], r);
	}

	/* zero block (second of two): d = 0, q = 0, bsums = 0 */
	float x2[2 * QK];
	struct kern_block_q8_k y2[2];
	for (int j = 0; j < 2 * QK; j++)
		x2[j] = j < QK ? (float)(j % 7) - 3.0f : 0.0f;
	x2[QK + 5] = -0.0f;
	memset(y2, 0x5a, sizeof(y2));
	conv(KERN_Q8_K, x2, y2, 2 * QK);
	assert_int_equal(f2u(y2[1].d), 0);
	for (int j = 0; j < QK; j++)
		assert_int_equal(y2[1].qs[j], 0);
	for (int g = 0; g < 16; g++)
		assert_int_equal(y2[1].bsums[g], 0);
	assert_int_equal(f2u(y2[0].d), f2u(1.0f / (-127.0f / -3.0f)));
}

static void test_q8k_hand(void **state)
{
	(void)state;
	check_q8k_hand(1);
	if (have_avx2())
		check_q8k_hand(0);
	else
		print_message("no AVX2: SIMD quantiser not checked\n");
}

/* Q8_K rows dequantise to d * q (a worker may receive them over the wire and
 * need floats), through both paths; Q8_K is never a matmul weight. */
static void test_q8k_dequant(void **state)
{
	(void)state;
	struct kern_block_q8_k x[2];
	float y[2 * QK];
	rng_seed(13);
	fill_act(x, 2, 5);
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1 && !have_avx2())
			break;
		memset(y, 0, sizeof(y));
		if (pass == 0)
			kern_dequant_row_ref(KERN_Q8_K, x, y, 2 * QK);
		else
			kern_dequant_row(KERN_Q8_K, x, y, 2 * QK);
		for (int i = 0; i < 2 * QK; i++)
			assert_int_equal(f2u(y[i]), f2u(x[i / QK].d * (float)x[i / QK].qs[i % QK]));
	}
}

/* AVX2 quantiser = reference, byte for byte, on random rows with ties,
 * huge and tiny values, infinities and NaNs. */
static void test_q8k_simd(void **state)
{
	(void)state;
	if (!have_avx2()) {
		print_message("no AVX2: skipped\n");
		return;
	}
	const int64_t nb = 4;
	float *x = xmalloc(nb * QK * sizeof(float));
	struct kern_block_q8_k *a = xmalloc(nb * sizeof(*a)), *b = xmalloc(nb * sizeof(*b));
	rng_seed(7);
	for (int it = 0; it < 300; it++) {
		const int mode = it % 6;
		for (int64_t i = 0; i < nb * QK; i++) {
			float v = rng_f();
			switch (mode) {
			case 1: v = (float)((int)(v * 20)) * 0.5f; break; /* many ties */
			case 2: v *= 1e30f; break;
			case 3: v *= 1e-38f; break; /* subnormals */
			case 4:
				v = rng_u32() % 50 == 0 ? (rng_u32() & 1 ? INFINITY : NAN) : v;
				break;
			case 5: v = (i / QK) % 2 ? 0.0f : v; break; /* zero blocks */
			default: break;
			}
			x[i] = v;
		}
		memset(a, 0x11, nb * sizeof(*a));
		memset(b, 0x22, nb * sizeof(*b));
		kern_convert_row_ref(KERN_Q8_K, x, a, nb * QK);
		kern_convert_row(KERN_Q8_K, x, b, nb * QK);
		assert_memory_equal(a, b, nb * sizeof(*a));
	}
	free(x);
	free(a);
	free(b);
}

/* The reference dequantisation reproduces the oracle's decoder exactly. */
static void test_dequant_oracle(void **state)
{
	(void)state;
	const char *top = getenv("top_srcdir");
	char path[4096];
	snprintf(path, sizeof(path), "%s/tests/data/kq-blocks.bin", top ? top : ".");
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	char magic[4];
	uint32_t count;
	assert_int_equal(fread(magic, 1, 4, f), 4);
	assert_memory_equal(magic, "KQB1", 4);
	assert_int_equal(fread(&count, 4, 1, f), 1);
	assert_int_equal(count, N_KQ);
	for (uint32_t rec = 0; rec < count; rec++) {
		uint32_t hdr[2];
		assert_int_equal(fread(hdr, 4, 2, f), 2);
		assert_true(hdr[1] >= 1 && hdr[1] <= 16);
		const size_t bytes = kern_row_bytes(hdr[0], (int64_t)hdr[1] * QK);
		assert_true(bytes > 0);
		const int64_t n = (int64_t)hdr[1] * QK;
		uint8_t *blk = xmalloc(bytes);
		float *want = xmalloc((size_t)n * sizeof(float));
		float *got = xmalloc((size_t)n * sizeof(float));
		assert_int_equal(fread(blk, 1, bytes, f), bytes);
		assert_int_equal(fread(want, sizeof(float), (size_t)n, f), (size_t)n);
		for (int pass = 0; pass < 2; pass++) {
			if (pass == 1 && !have_avx2())
				break;
			memset(got, 0, (size_t)n * sizeof(float));
			if (pass == 0)
				kern_dequant_row_ref(hdr[0], blk, got, n);
			else
				kern_dequant_row(hdr[0], blk, got, n);
			for (int64_t i = 0; i < n; i++)
				if (f2u(got[i]) != f2u(want[i])) {
					print_error("%s %s value %lld: got %.9g want %.9g\n",
						    pass ? "dispatched" : "ref",
						    kern_type_name(hdr[0]), (long long)i,
						    (double)got[i], (double)want[i]);
					fail();
				}
		}
		free(blk);
		free(want);
		free(got);
	}
	fclose(f);
}

/* AVX2 dequantisation = reference, bit for bit. */
static void test_dequant_simd(void **state)
{
	(void)state;
	if (!have_avx2()) {
		print_message("no AVX2: skipped\n");
		return;
	}
	const int64_t nb = 5;
	rng_seed(11);
	for (size_t ti = 0; ti < N_KQ; ti++) {
		const uint32_t t = kq_types[ti];
		uint8_t *w = xmalloc(kern_row_bytes(t, nb * QK));
		float *a = xmalloc(nb * QK * sizeof(float)), *b = xmalloc(nb * QK * sizeof(float));
		for (int mode = 0; mode < 6; mode++)
			for (int rep = 0; rep < (mode == 0 ? 20 : 1); rep++) {
				fill_weights(t, w, nb, mode);
				kern_dequant_row_ref(t, w, a, nb * QK);
				kern_dequant_row(t, w, b, nb * QK);
				for (int64_t i = 0; i < nb * QK; i++)
					if (f2u(a[i]) != f2u(b[i])) {
						print_error("%s mode %d value %lld: %.9g vs %.9g\n",
							    kern_type_name(t), mode, (long long)i,
							    (double)a[i], (double)b[i]);
						fail();
					}
			}
		free(w);
		free(a);
		free(b);
	}
}

/* The reference dot against a double-precision sum over the dequantised
 * weights and activations. */
static void test_dot_ref_double(void **state)
{
	(void)state;
	const int64_t nbs[] = {1, 2, 3, 8};
	rng_seed(3);
	for (size_t ti = 0; ti < N_KQ; ti++) {
		const uint32_t t = kq_types[ti];
		for (size_t ni = 0; ni < sizeof(nbs) / sizeof(nbs[0]); ni++) {
			const int64_t nb = nbs[ni], n = nb * QK;
			uint8_t *w = xmalloc(kern_row_bytes(t, n));
			struct kern_block_q8_k *x = xmalloc((size_t)nb * sizeof(*x));
			float *wf = xmalloc((size_t)n * sizeof(float));
			for (int rep = 0; rep < 10; rep++) {
				fill_weights(t, w, nb, rep == 9 ? 4 : 0);
				fill_act(x, nb, rep % 6);
				kern_dequant_row_ref(t, w, wf, n);
				double s = 0, sa = 0;
				for (int64_t i = 0; i < n; i++) {
					double p = (double)wf[i] * (double)x[i / QK].d *
						   (double)x[i / QK].qs[i % QK];
					s += p;
					sa += fabs(p);
				}
				const double got = kern_dot_ref(t, n, w, x);
				const double tol = 1e-5 * sa + 1e-30;
				if (!(fabs(got - s) <= tol)) {
					print_error(
					    "%s n=%lld rep %d: got %.9g want %.9g (sumabs %.6g)\n",
					    kern_type_name(t), (long long)n, rep, got, s, sa);
					fail();
				}
			}
			free(w);
			free(x);
			free(wf);
		}
	}
}

/* Q3_K, Q5_K, Q6_K, IQ4_XS: kern_dot_ref (and kern_dot) give llama.cpp's
 * results bit for bit.  The expected values are what ggml_vec_dot_*_q8_K of
 * llama.cpp's prebuilt x86 CPU backend (the AVX2 code its AVX2 and AVX-512
 * builds share) returned for these blocks: rng_seed(11), then per type and
 * case c, fill_weights(t, w, 1 + c % 3, c == 3 ? 4 : 0) and fill_act(x, 1 + c % 3, 0). */
#define KQ_GGML_CASES 6
static const uint32_t kq_ggml_types[] = {KERN_Q3_K, KERN_Q5_K, KERN_Q6_K, KERN_IQ4_XS};
static const uint32_t kq_ggml_want[][KQ_GGML_CASES] = {
    {0x416317ea, 0x4254d043, 0x41bfd4a8, 0xc1c347d3, 0xc3a4e73d, 0xc2d210f7},
    {0x43efc526, 0x450de7da, 0xc4697c3e, 0xc4144d96, 0xc4279e2b, 0x45020ac7},
    {0x44051dc8, 0x44c81294, 0x44c9c5b0, 0xc532b69a, 0x4418d517, 0x451e8ab0},
    {0xc3a67fd8, 0x436df45e, 0xc52e0877, 0xc58f8f1f, 0x442b4633, 0x4538c654},
};

static void test_dot_ggml(void **state)
{
	(void)state;
	const int simd = have_avx2();
	rng_seed(11);
	for (size_t ti = 0; ti < sizeof(kq_ggml_types) / sizeof(kq_ggml_types[0]); ti++) {
		const uint32_t t = kq_ggml_types[ti];
		for (int c = 0; c < KQ_GGML_CASES; c++) {
			const int64_t nb = 1 + c % 3, n = nb * QK;
			uint8_t *w = xmalloc(kern_row_bytes(t, n));
			struct kern_block_q8_k *x = xmalloc((size_t)nb * sizeof(*x));
			fill_weights(t, w, nb, c == 3 ? 4 : 0);
			fill_act(x, nb, 0);
			const float ref = kern_dot_ref(t, n, w, x);
			const float got = simd ? kern_dot(t, n, w, x) : ref;
			if (f2u(ref) != kq_ggml_want[ti][c] || f2u(got) != kq_ggml_want[ti][c]) {
				print_error("%s case %d: ref %08x simd %08x, llama.cpp %08x\n",
					    kern_type_name(t), c, f2u(ref), f2u(got),
					    kq_ggml_want[ti][c]);
				fail();
			}
			free(w);
			free(x);
		}
	}
}

/* kern_matmul_dense with Q4_K: llama.cpp's repacked GEMM on the rows below
 * n_rows - n_rows % 4 and its GEMV on the others, bit for bit, scalar and
 * AVX2.  The expected values are what ggml_gemm_q4_K_8x8_q8_K (rows 0-3, with
 * ggml_quantize_mat_q8_K_4x8's activations) and ggml_gemv_q4_K_8x8_q8_K
 * (row 4) of llama.cpp's prebuilt x86 CPU backend returned for these weights
 * repacked as llama.cpp repacks them: rng_seed(41), fill_weights(Q4_K, w,
 * 16, 0) (8 rows of 2 blocks), then 5 activation rows of 512 values
 * rng_f() * 3.  kern_matmul (every row as the GEMV) is checked on row 4. */
#define DENSE_ROWS 5
static const uint32_t dense_q4k_want[DENSE_ROWS][8] = {
    {0x4438ae94, 0x437239c0, 0xc3782311, 0xc240dd85, 0xc4690075, 0x434cdb07, 0x435caa66,
     0x433d4fd6},
    {0x438b3602, 0x440a7c63, 0xc21e90ac, 0x44096638, 0x43f5cb86, 0xc490348e, 0xc2ad49ea,
     0xc2fbfee1},
    {0xc38f78a3, 0x43906617, 0x4279fd4c, 0x441f81fb, 0x44dc4dbb, 0x4298e191, 0xc2127ea4,
     0xc2f76a67},
    {0xc48b9f4c, 0xc398e0d0, 0xc3102e34, 0xc438dd7c, 0xc523c777, 0xc46d724d, 0xc31dc8a6,
     0x42fd57c6},
    {0xc3c348a2, 0xc40dc079, 0x43be657d, 0x4476cd9b, 0xc3fe970a, 0x4436d011, 0xc3758052,
     0xc205212a},
};

static void test_matmul_dense_ggml(void **state)
{
	(void)state;
	const int64_t n = 512, nb = n / QK;
	const size_t xrow = (size_t)nb * sizeof(struct kern_block_q8_k);
	uint8_t *w = xmalloc(kern_row_bytes(KERN_Q4_K, n) * 8);
	float *xf = xmalloc((size_t)(DENSE_ROWS * n) * sizeof(float));
	uint8_t *x = xmalloc(xrow * DENSE_ROWS);
	float y[DENSE_ROWS * 8], y1[DENSE_ROWS * 8];
	rng_seed(41);
	fill_weights(KERN_Q4_K, w, 8 * nb, 0);
	for (int64_t i = 0; i < DENSE_ROWS * n; i++)
		xf[i] = rng_f() * 3.0f;
	for (int r = 0; r < DENSE_ROWS; r++)
		kern_convert_row_ref(KERN_Q8_K, xf + r * n, x + r * xrow, n);
	for (int simd = 0; simd < 2; simd++) {
		if (simd && !have_avx2())
			break;
		kern_force_ref(!simd);
		kern_matmul_dense(KERN_Q4_K, w, n, 0, 8, x, xrow, DENSE_ROWS, y, 8);
		kern_matmul(KERN_Q4_K, w, n, 0, 8, x, xrow, DENSE_ROWS, y1, 8);
		for (int r = 0; r < DENSE_ROWS; r++)
			for (int o = 0; o < 8; o++) {
				const uint32_t want = dense_q4k_want[r][o];
				if (f2u(y[r * 8 + o]) != want ||
				    (r == DENSE_ROWS - 1 && f2u(y1[r * 8 + o]) != want)) {
					print_error("%s row %d out %d: %08x (kern_matmul %08x), "
						    "llama.cpp %08x\n",
						    simd ? "avx2" : "ref", r, o, f2u(y[r * 8 + o]),
						    f2u(y1[r * 8 + o]), want);
					fail();
				}
			}
	}
	kern_force_ref(0);
	free(w);
	free(xf);
	free(x);
}

/* kern_matmul_dense with IQ4_XS: from 8 rows on, every row as llama.cpp's IQ
 * panel GEMM (per block acc = fma(isum, d_w * d_x, acc)), computed here in
 * double and rounded step by step, scalar and AVX2 alike; fewer rows as
 * kern_matmul. */
static void test_matmul_dense_iq4xs(void **state)
{
	(void)state;
	const int64_t n = 768, nb = n / QK, n_out = 8;
	const size_t wrow = kern_row_bytes(KERN_IQ4_XS, n),
		     xrow = (size_t)nb * sizeof(struct kern_block_q8_k);
	uint8_t *w = xmalloc(wrow * (size_t)n_out);
	struct kern_block_q8_k *x = xmalloc(xrow * 9);
	float y[9 * 8], y1[9 * 8];
	rng_seed(43);
	fill_weights(KERN_IQ4_XS, w, n_out * nb, 0);
	fill_act(x, 9 * nb, 0);
	for (int simd = 0; simd < 2; simd++) {
		if (simd && !have_avx2())
			break;
		kern_force_ref(!simd);
		for (int rows = 7; rows <= 9; rows++) {
			kern_matmul_dense(KERN_IQ4_XS, w, n, 0, n_out, x, xrow, rows, y, n_out);
			kern_matmul(KERN_IQ4_XS, w, n, 0, n_out, x, xrow, rows, y1, n_out);
			for (int r = 0; r < rows; r++)
				for (int o = 0; o < n_out; o++) {
					float want = y1[r * n_out + o];
					if (rows >= 8) {
						float acc = 0.0f;
						for (int64_t ib = 0; ib < nb; ib++) {
							const uint8_t *b = w + o * wrow + ib * 136;
							float wf[QK];
							kern_dequant_row_ref(KERN_IQ4_XS, b, wf,
									     QK);
							const float d =
							    kern_f16_to_f32(kern_load_u16(b));
							const struct kern_block_q8_k *xb =
							    &x[r * nb + ib];
							double isum = 0;
							for (int j = 0; j < QK; j++)
								isum += (double)lrintf(wf[j] / d) *
									xb->qs[j];
							acc = fmaf((float)isum, d * xb->d, acc);
						}
						want = acc;
					}
					if (f2u(y[r * n_out + o]) != f2u(want)) {
						print_error("%s rows %d: [%d][%d] %.9g want %.9g\n",
							    simd ? "avx2" : "ref", rows, r, o,
							    (double)y[r * n_out + o], (double)want);
						fail();
					}
				}
		}
	}
	kern_force_ref(0);
	free(w);
	free(x);
}

/* kern_matmul_dense of Q4_K (the rows below n_rows - n_rows % 4 in the
 * repacked GEMM's form, the others in kern_dot's) and Q6_K at the SIMD level
 * = the scalar twins, bit for bit, over several 16-output tiles and an
 * output range that cuts the first and the last. */
static void test_matmul_dense_tiles(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	static const uint32_t types[] = {KERN_Q4_K, KERN_Q6_K};
	const int64_t nb = 3, n = nb * QK, n_out = 37, o0 = 3, o1 = 35, max_rows = 299;
	const size_t xrow = (size_t)nb * sizeof(struct kern_block_q8_k);
	struct kern_block_q8_k *x = xmalloc(xrow * (size_t)max_rows);
	float *y = xmalloc((size_t)(max_rows * n_out) * sizeof(float));
	float *want = xmalloc((size_t)(max_rows * n_out) * sizeof(float));
	rng_seed(47);
	for (int64_t r = 0; r < max_rows; r++)
		fill_act(x + r * nb, nb, r % 4 == 3 ? 5 : 0);
	for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
		const uint32_t t = types[ti];
		const size_t wrow = kern_row_bytes(t, n);
		uint8_t *w = xmalloc(wrow * (size_t)n_out);
		for (int64_t o = 0; o < n_out; o++)
			fill_weights(t, w + (size_t)o * wrow, nb, o % 5 == 4 ? 4 : 0);
		/* a few row counts around the tiles' row groups, and one past a
		 * block of activation rows (the GEMM rows crossing it) */
		static const int64_t row_counts[] = {2, 5, 8, 11, 14, 299};
		for (size_t ri = 0; ri < sizeof(row_counts) / sizeof(row_counts[0]); ri++) {
			const int64_t rows = row_counts[ri];
			for (int64_t i = 0; i < rows * n_out; i++)
				y[i] = want[i] = -1.0f;
			kern_force_ref(1);
			kern_matmul_dense(t, w, n, o0, o1, x, xrow, rows, want, n_out);
			kern_force_ref(0);
			kern_matmul_dense(t, w, n, o0, o1, x, xrow, rows, y, n_out);
			for (int64_t i = 0; i < rows * n_out; i++)
				if (f2u(y[i]) != f2u(want[i])) {
					print_error(
					    "%s %s rows %lld: [%lld][%lld] %.9g want %.9g\n",
					    kern_type_name(t), kern_isa_name(), (long long)rows,
					    (long long)(i / n_out), (long long)(i % n_out),
					    (double)y[i], (double)want[i]);
					fail();
				}
		}
		free(w);
	}
	free(x);
	free(y);
	free(want);
}

/* kern_dot (AVX2) = kern_dot_ref, bit for bit, over weight and activation
 * edge cases. */
static void test_dot_simd(void **state)
{
	(void)state;
	if (!have_avx2()) {
		print_message("no AVX2: skipped\n");
		return;
	}
	const int64_t nbs[] = {1, 2, 3, 5};
	rng_seed(5);
	for (size_t ti = 0; ti < N_KQ; ti++) {
		const uint32_t t = kq_types[ti];
		for (size_t ni = 0; ni < sizeof(nbs) / sizeof(nbs[0]); ni++) {
			const int64_t nb = nbs[ni], n = nb * QK;
			uint8_t *w = xmalloc(kern_row_bytes(t, n));
			struct kern_block_q8_k *x = xmalloc((size_t)nb * sizeof(*x));
			for (int wm = 0; wm < 6; wm++)
				for (int xm = 0; xm < 6; xm++)
					for (int rep = 0; rep < (wm == 0 && xm == 0 ? 30 : 2);
					     rep++) {
						fill_weights(t, w, nb, wm);
						fill_act(x, nb, xm);
						const float a = kern_dot_ref(t, n, w, x);
						const float b = kern_dot(t, n, w, x);
						if (f2u(a) != f2u(b)) {
							print_error("%s n=%lld w%d x%d: ref %.9g "
								    "simd %.9g\n",
								    kern_type_name(t), (long long)n,
								    wm, xm, (double)a, (double)b);
							fail();
						}
					}
			free(w);
			free(x);
		}
	}
}

/* kern_matmul = kern_dot_ref per element, bit for bit, for 1..7 rows and
 * output ranges of every width and start; nothing outside [o0, o1) written.
 * Weight row o in fill_weights mode (o + wm) % 6, activation row r in
 * fill_act mode (r + xm) % 6; wm, xm < 0: mostly random, a few rows of
 * negative scales. */
static void check_matmul(uint32_t t, int64_t nb, int64_t n_out, int64_t n_rows, int wm, int xm)
{
	const int64_t n = nb * QK;
	const size_t wr = kern_row_bytes(t, n);
	const size_t xs = kern_row_bytes(KERN_Q8_K, n) + 292; /* a gap between rows */
	uint8_t *w = xmalloc(wr * (size_t)n_out);
	uint8_t *x = xmalloc(xs * (size_t)n_rows);
	float *y = xmalloc((size_t)(n_rows * n_out) * sizeof(float));
	float *want = xmalloc((size_t)(n_rows * n_out) * sizeof(float));
	for (int64_t o = 0; o < n_out; o++)
		fill_weights(t, w + (size_t)o * wr, nb,
			     wm < 0 ? (o % 7 == 6 ? 4 : 0) : (int)((o + wm) % 6));
	for (int64_t r = 0; r < n_rows; r++)
		fill_act((struct kern_block_q8_k *)(x + (size_t)r * xs), nb,
			 xm < 0 ? (r % 3 == 2 ? 5 : 0) : (int)((r + xm) % 6));
	for (int64_t r = 0; r < n_rows; r++)
		for (int64_t o = 0; o < n_out; o++)
			want[r * n_out + o] =
			    kern_dot_ref(t, n, w + (size_t)o * wr, x + (size_t)r * xs);
	const int64_t ranges[][2] = {{0, n_out},	 {1, n_out}, {3, n_out - 2},
				     {n_out - 1, n_out}, {5, 6},     {2, 9}};
	for (size_t k = 0; k < sizeof(ranges) / sizeof(ranges[0]); k++) {
		const int64_t o0 = ranges[k][0], o1 = ranges[k][1];
		if (o0 < 0 || o1 > n_out || o0 >= o1)
			continue;
		for (int64_t i = 0; i < n_rows * n_out; i++)
			y[i] = -12345.0f;
		kern_matmul(t, w, n, o0, o1, x, xs, n_rows, y, n_out);
		for (int64_t r = 0; r < n_rows; r++)
			for (int64_t o = 0; o < n_out; o++) {
				const float g = y[r * n_out + o];
				const float e = o >= o0 && o < o1 ? want[r * n_out + o] : -12345.0f;
				if (f2u(g) != f2u(e)) {
					print_error(
					    "%s nb=%lld rows=%lld [%lld,%lld) r=%lld o=%lld: "
					    "%.9g want %.9g\n",
					    kern_type_name(t), (long long)nb, (long long)n_rows,
					    (long long)o0, (long long)o1, (long long)r,
					    (long long)o, (double)g, (double)e);
					fail();
				}
			}
	}
	free(w);
	free(x);
	free(y);
	free(want);
}

static void test_matmul(void **state)
{
	(void)state;
	rng_seed(9);
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 0 && !have_avx2()) {
			print_message("no AVX2: SIMD matmul not checked\n");
			continue;
		}
		kern_force_ref(pass == 1);
		for (size_t ti = 0; ti < N_KQ; ti++)
			for (int64_t rows = 1; rows <= 7; rows++)
				check_matmul(kq_types[ti], 1 + rows % 3, 13, rows, -1, -1);
		/* many rows: the output range is cut into chunks that stay in L2 */
		check_matmul(KERN_Q4_K, 8, 70, 9, -1, -1);
		check_matmul(KERN_Q6_K, 8, 50, 6, -1, -1);
	}
	kern_force_ref(0);
}

/* Decode, one and two rows (at the AVX-512 level Q4_K and Q6_K take their
 * own kernels, tiles of four or eight outputs): kern_matmul = kern_dot_ref,
 * bit for bit, for one block (256 values) and odd block counts, output counts
 * below, at and past a tile (and past two, where the next tile is
 * prefetched), ranges starting past 0 (check_matmul), and every weight and
 * activation edge case. */
static void test_matmul_decode(void **state)
{
	(void)state;
	if (!have_avx2())
		skip();
	static const int64_t nbs[] = {1, 2, 3, 5, 9};
	static const int64_t n_outs[] = {1, 3, 4, 5, 8, 11, 19};
	rng_seed(61);
	for (size_t ti = 0; ti < N_KQ; ti++)
		for (size_t ni = 0; ni < sizeof(nbs) / sizeof(nbs[0]); ni++)
			for (size_t oi = 0; oi < sizeof(n_outs) / sizeof(n_outs[0]); oi++)
				for (int64_t rows = 1; rows <= 2; rows++)
					for (int m = 0; m < 6; m++)
						check_matmul(kq_types[ti], nbs[ni], n_outs[oi],
							     rows, m, (m + 3 * (int)oi) % 6);
}

int main(void)
{
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_type_table),
	    cmocka_unit_test(test_q8k_hand),
	    cmocka_unit_test(test_q8k_simd),
	    cmocka_unit_test(test_q8k_dequant),
	    cmocka_unit_test(test_dequant_oracle),
	    cmocka_unit_test(test_dequant_simd),
	    cmocka_unit_test(test_dot_ref_double),
	    cmocka_unit_test(test_dot_simd),
	    cmocka_unit_test(test_matmul),
	    cmocka_unit_test(test_matmul_decode),
	    cmocka_unit_test(test_dot_ggml),
	    cmocka_unit_test(test_matmul_dense_ggml),
	    cmocka_unit_test(test_matmul_dense_iq4xs),
	    cmocka_unit_test(test_matmul_dense_tiles),
	};
	return kern_test_run_levels("kern_kq", tests, sizeof(tests) / sizeof(tests[0]));
}
