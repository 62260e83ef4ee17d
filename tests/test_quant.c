/* Quantisers, the GGUF writer and `moefleet quantize`:
 *   - MXFP4, Q8_0 and Q4_0 blocks computed by hand (ties, clipping, signs,
 *     zero blocks) come out byte for byte;
 *   - dequant(quant(x)) stays within each format's error bound, and MXFP4
 *     re-quantises its own output to the same bytes;
 *   - a GGUF copied through the writer (with extra keys of every type, a
 *     replaced key, a custom alignment, data in odd-sized pieces) reads back
 *     with the same metadata and tensors, and a plain copy is byte-identical;
 *     misuse and unwritable paths fail and leave no file behind;
 *   - quantize_file on tests/data/qwen3moe-tiny-f32.gguf keeps metadata and
 *     non-expert tensors byte-identical, its MXFP4 experts equal the oracle's
 *     (tests/data/qwen3moe-tiny-mxfp4.gguf, same seed) and decode close to the
 *     originals; the first shard of the same model split in three gives the
 *     same output file; bad inputs fail cleanly;
 *   - split_experts (per-node shard files): every routed expert lands in the
 *     files of exactly its placement's holders with the source's bytes, the
 *     metadata is kept, nothing else is copied, shardfile_read finds the
 *     slots; a split model gives the same files; bad inputs and damaged
 *     shard files are refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/gguf.h"
#include "../common/gguf_write.h"
#include "../common/log.h"
#include "../common/shardfile.h"
#include "../coordinator/convert/quantize.h"
#include "../coordinator/convert/split.h"
#include "../kernels/kern.h"
#include "../kernels/quant.h"

static char tmp_dir[256];

static const char *tmp_path(const char *name)
{
	static char buf[8][512]; /* a few live at once */
	static int k;
	k = (k + 1) % 8;
	snprintf(buf[k], sizeof(buf[k]), "%s/%s", tmp_dir, name);
	return buf[k];
}

static const char *data_path(const char *file)
{
	static char buf[4096];
	const char *top = getenv("top_srcdir");
	snprintf(buf, sizeof(buf), "%s/tests/data/%s", top ? top : ".", file);
	return buf;
}

static int file_exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

static uint8_t *read_all(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	fseek(f, 0, SEEK_END);
	long len = ftell(f);
	fseek(f, 0, SEEK_SET);
	uint8_t *p = malloc((size_t)len + 1);
	assert_non_null(p);
	assert_int_equal(fread(p, 1, (size_t)len, f), (size_t)len);
	fclose(f);
	*n = (size_t)len;
	return p;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float rng_gauss(void)
{
	float s = 0;
	for (int i = 0; i < 12; i++) { /* Irwin-Hall: good enough here */
		rng_state ^= rng_state << 13;
		rng_state ^= rng_state >> 7;
		rng_state ^= rng_state << 17;
		s += (float)(rng_state >> 40) / (float)(1 << 24);
	}
	return s - 6.0f;
}

/* ------------------------------------------------------------ blocks by hand */

static void test_mxfp4_hand_blocks(void **state)
{
	(void)state;
	/* amax 7 -> e = floor(log2 7) - 2 + 127 = 127, scale 1: codes index
	 * {0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6} */
	float x[4 * 32] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.5f, -1, -1.5f, -2, -3, -4, -6, 7,
			   /* ties go to the first code: .25 -> 0, -.25 -> 0 (not -0 or -.5),
			    * 5 -> 4, -5 -> -4, 2.5 -> 2, 3.5 -> 3, 1.25 -> 1; -7 clips to -6 */
			   0.25f, -0.25f, 5, -5, 0.74f, 0.76f, 2.5f, -2.5f, 3.5f, -3.5f, 1.25f,
			   -0.1f, -7, 5.5f, 0.3f, -0.0f};
	static const uint8_t want_a[17] = {0x7f, 0x00, 0x01, 0x62, 0xe3, 0x14, 0x25, 0x46, 0xc7,
					   0x59, 0xda, 0x2b, 0x0c, 0xfd, 0x7e, 0x1f, 0x07};
	/* block 1: the same times 2^-10 -> e = 117, same codes */
	for (int j = 0; j < 32; j++)
		x[32 + j] = ldexpf(x[j], -10);
	/* block 2: all zero -> e = 0, codes 0 */
	/* block 3: amax 1 -> e = 125, scale 1/4: 1 -> 4 (6), -1 -> -4 (14),
	 * .25 -> 1 (2), .125 -> .5 (1) */
	x[96] = 1;
	x[97] = -1;
	x[98] = 0.25f;
	x[99] = 0.125f;
	uint8_t got[4 * 17];
	quant_row_mxfp4_ref(x, got, 4 * 32);
	assert_memory_equal(got, want_a, 17);
	assert_int_equal(got[17], 117);
	assert_memory_equal(got + 18, want_a + 1, 16);
	for (int j = 0; j < 17; j++)
		assert_int_equal(got[34 + j], 0);
	static const uint8_t want_d[17] = {125, 6, 14, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	assert_memory_equal(got + 51, want_d, 17);
	/* and they decode to the nearest representable values */
	float y[32];
	kern_dequant_row_ref(KERN_MXFP4, got, y, 32);
	assert_true(y[15] == 6.0f && y[28] == -6.0f && y[18] == 4.0f && y[22] == 2.0f);
}

/* ggml's quantize_row_mxfp4_ref written out literally (all 16 codes tried),
 * to check the shortcut in quant.c against it. */
static void mxfp4_literal(const float *x, uint8_t *y, int64_t n)
{
	static const int8_t kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
	for (int64_t ib = 0; ib < n / 32; ib++, y += 17) {
		const float *v = x + ib * 32;
		float amax = 0;
		for (int j = 0; j < 32; j++)
			if (amax < fabsf(v[j]))
				amax = fabsf(v[j]);
		int e = amax > 0 ? (int)floorf(log2f(amax)) - 2 + 127 : 0;
		e = e < 0 ? 0 : e;
		float d = ldexpf(1.0f, e - 128);
		y[0] = (uint8_t)e;
		for (int j = 0; j < 32; j++) {
			int best = 0;
			float best_err = fabsf((float)kv[0] * d - v[j]);
			for (int i = 1; i < 16; i++) {
				float err = fabsf((float)kv[i] * d - v[j]);
				if (err < best_err) {
					best = i;
					best_err = err;
				}
			}
			y[1 + j % 16] = (uint8_t)(j < 16 ? best : y[1 + j % 16] | best << 4);
		}
	}
}

static void test_mxfp4_matches_literal_search(void **state)
{
	(void)state;
	/* midpoints between neighbouring codes, a few ulps either side, at scales
	 * from subnormal to huge; plus plain random values */
	static const float mid[9] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.5f, 7.0f};
	const int64_t n = 32 * 4096;
	float *x = malloc((size_t)n * sizeof(float));
	uint8_t *a = malloc((size_t)n), *b = malloc((size_t)n);
	assert_true(x && a && b);
	for (int64_t i = 0; i < n; i++) {
		int64_t blk = i / 32;
		int sc = blk % 3 == 0 ? -127 + (int)(blk % 9) : (int)(blk % 61) - 30;
		float m;
		if (blk % 5 == 4) {
			m = rng_gauss() * ldexpf(1.0f, sc);
		} else {
			m = ldexpf(mid[(i * 7) % 9], sc);
			for (int u = 0; u < (int)(i % 7) - 3; u++)
				m = nextafterf(m, INFINITY);
			for (int u = 0; u > (int)(i % 7) - 3; u--)
				m = nextafterf(m, 0);
			if (i % 32 == 0)
				m = ldexpf(7.9f, sc); /* the block's maximum sets the scale */
		}
		x[i] = (i * 13) % 3 == 0 ? -m : m;
	}
	quant_row_mxfp4_ref(x, a, n);
	mxfp4_literal(x, b, n);
	assert_memory_equal(a, b, kern_row_bytes(KERN_MXFP4, n));
	free(x);
	free(a);
	free(b);
}

static void test_q8_0_hand_block(void **state)
{
	(void)state;
	/* amax 127 -> d = 1 (f16 0x3c00); q = roundf(x): halves away from zero */
	float x[32] = {127, 2.5f, -2.5f, 0.49f, -0.5f, 1.5f, 126.6f, -127, 3};
	uint8_t got[34];
	quant_row_q8_0_ref(x, got, 32);
	static const int8_t want_q[9] = {127, 3, -3, 0, -1, 2, 127, -127, 3};
	assert_int_equal(got[0] | got[1] << 8, 0x3c00);
	assert_memory_equal(got + 2, want_q, 9);
	for (int j = 9; j < 32; j++)
		assert_int_equal(got[2 + j], 0);
	/* zero block: d = 0, q = 0 */
	memset(x, 0, sizeof(x));
	quant_row_q8_0_ref(x, got, 32);
	for (int j = 0; j < 34; j++)
		assert_int_equal(got[j], 0);
}

static void test_q4_0_hand_blocks(void **state)
{
	(void)state;
	/* block 0: the first value of largest magnitude is -8 -> d = 1;
	 * q = min(15, trunc(x + 8.5)) */
	float x[64] = {-8, 8, 0.5f, -0.5f, 7.4f, -7.6f, 3.49f};
	x[16] = 1;
	x[17] = -1;
	/* block 1: 4 comes first -> d = 4 / -8 = -0.5 (f16 0xb800), id = -2 */
	x[32] = 4;
	x[33] = -4;
	x[34] = 1;
	uint8_t got[36];
	quant_row_q4_0_ref(x, got, 64);
	static const uint8_t want0[18] = {0x00, 0x3c, 0x90, 0x7f, 0x89, 0x88, 0x8f, 0x80, 0x8b,
					  0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88};
	static const uint8_t want1[18] = {0x00, 0xb8, 0x80, 0x8f, 0x86, 0x88, 0x88, 0x88, 0x88,
					  0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88};
	assert_memory_equal(got, want0, 18);
	assert_memory_equal(got + 18, want1, 18);
}

static void test_quant_row_checks(void **state)
{
	(void)state;
	float x[64] = {1, 2, 3};
	uint8_t buf[256];
	assert_int_equal(quant_row(KERN_MXFP4, x, buf, 48), ERR_CONFIG);
	assert_int_equal(quant_row(KERN_Q8_0, x, buf, 31), ERR_CONFIG);
	assert_int_equal(quant_row(77, x, buf, 32), ERR_CONFIG);
	assert_int_equal(quant_row(KERN_F32, x, buf, 3), 0);
	assert_memory_equal(buf, x, 12);
	assert_int_equal(quant_row(KERN_F16, x, buf, 3), 0);
	assert_int_equal(buf[0] | buf[1] << 8, 0x3c00);
	assert_int_equal(quant_row(KERN_BF16, x, buf, 3), 0);
	assert_int_equal(buf[2] | buf[3] << 8, 0x4000);
	assert_int_equal(quant_row_finite(x, 64), -1);
	x[40] = NAN;
	assert_int_equal(quant_row_finite(x, 64), 40);
	x[40] = 0;
	x[7] = -INFINITY;
	assert_int_equal(quant_row_finite(x, 64), 7);
	uint32_t t = 0;
	assert_int_equal(quantize_parse_type("MXFP4", &t), 0);
	assert_int_equal(t, KERN_MXFP4);
	assert_int_equal(quantize_parse_type("q8_0", &t), 0);
	assert_int_equal(t, KERN_Q8_0);
	assert_int_equal(quantize_parse_type("Q4_0", &t), 0);
	assert_int_equal(t, KERN_Q4_0);
	assert_int_equal(quantize_parse_type("fp4", &t), ERR_CONFIG);
	assert_int_equal(quantize_parse_type("", &t), ERR_CONFIG);
	assert_true(quantize_is_expert("blk.3.ffn_down_exps.weight"));
	assert_false(quantize_is_expert("blk.3.ffn_down_exps.bias"));
	assert_false(quantize_is_expert("blk.3.ffn_down_shexp.weight"));
}

/* --------------------------------------------------------- error bounds */

/* Checks dequant(q) against x block by block; returns sum of squared errors. */
static double check_block_errors(uint32_t type, const float *x, const void *q, int64_t n)
{
	float *y = malloc((size_t)n * sizeof(float));
	assert_non_null(y);
	kern_dequant_row_ref(type, q, y, n);
	const uint8_t *b = q;
	size_t bb = kern_type_block_bytes(type);
	double se = 0;
	for (int64_t ib = 0; ib < n / 32; ib++) {
		const float *xb = x + ib * 32, *yb = y + ib * 32;
		float amax = 0;
		for (int j = 0; j < 32; j++)
			amax = fmaxf(amax, fabsf(xb[j]));
		float bound;
		if (type == KERN_MXFP4) {
			/* scale s = 2^(e-127) with amax / s in [4, 8): gaps are at most
			 * 2s up to 6s, and values up to 8s clip to 6s */
			float s = ldexpf(1.0f, b[ib * bb] - 127);
			assert_true(amax == 0 || (amax >= 4 * s && amax < 8 * s));
			bound = 2 * s;
		} else {
			float d = type == KERN_Q8_0 ? amax / 127 : amax / 8;
			/* half a step (Q4_0: a whole one, +8 clips to +7) plus the
			 * f16 rounding of d (relative 2^-11) times the largest code */
			if (type == KERN_Q8_0)
				bound = d * (0.5f + 127.0f / 2048) * 1.001f;
			else
				bound = d * (1 + 8.0f / 2048) * 1.001f;
		}
		for (int j = 0; j < 32; j++) {
			float e = fabsf(xb[j] - yb[j]);
			if (!(e <= bound + 1e-30f))
				fail_msg("%s block %lld value %d: |%g - %g| > %g",
					 kern_type_name(type), (long long)ib, j, xb[j], yb[j],
					 bound);
			se += (double)e * e;
		}
	}
	free(y);
	return se;
}

static void test_roundtrip_error_bounds(void **state)
{
	(void)state;
	const int64_t n = 32 * 512;
	float *x = malloc((size_t)n * sizeof(float));
	uint8_t *q = malloc((size_t)n * 2), *q2 = malloc((size_t)n * 2);
	float *y = malloc((size_t)n * sizeof(float));
	assert_true(x && q && q2 && y);
	double ss = 0;
	for (int64_t i = 0; i < n; i++) {
		/* blocks of different scales (d stays a normal f16), some outliers */
		float scale = ldexpf(1.0f, (int)((i / 32) % 16) - 5);
		x[i] = rng_gauss() * scale * ((i % 97) == 0 ? 8.0f : 1.0f);
		ss += (double)x[i] * x[i];
	}
	static const uint32_t types[3] = {KERN_MXFP4, KERN_Q8_0, KERN_Q4_0};
	static const double max_rel_rms[3] = {0.18, 0.011, 0.17};
	for (int t = 0; t < 3; t++) {
		assert_int_equal(quant_row(types[t], x, q, n), 0);
		double se = check_block_errors(types[t], x, q, n);
		double rel = sqrt(se / ss);
		printf("# %s: relative rms error %.4f\n", kern_type_name(types[t]), rel);
		if (!(rel < max_rel_rms[t]))
			fail_msg("%s: relative rms error %g", kern_type_name(types[t]), rel);
	}
	/* MXFP4 has no f16 scale: any range works */
	for (int64_t i = 0; i < n; i++)
		x[i] = rng_gauss() * ldexpf(1.0f, (int)((i / 32) % 200) - 100);
	assert_int_equal(quant_row(KERN_MXFP4, x, q, n), 0);
	check_block_errors(KERN_MXFP4, x, q, n);
	/* MXFP4 values re-quantise to the same bytes */
	kern_dequant_row_ref(KERN_MXFP4, q, y, n);
	quant_row(KERN_MXFP4, y, q2, n);
	assert_memory_equal(q, q2, kern_row_bytes(KERN_MXFP4, n));
	free(x);
	free(q);
	free(q2);
	free(y);
}

/* ------------------------------------------------------------ GGUF writer */

/* Writes every tensor of src, in pieces of `piece` bytes. */
static void write_tensors(gguf_writer *w, const gguf *src, size_t piece)
{
	for (uint64_t i = 0; i < gguf_n_tensors(src); i++) {
		const gguf_tensor *t = gguf_tensor_at(src, i);
		const uint8_t *p = t->data;
		for (uint64_t off = 0; off < t->n_bytes; off += piece) {
			size_t k = t->n_bytes - off < piece ? (size_t)(t->n_bytes - off) : piece;
			assert_int_equal(gguf_writer_write(w, p + off, k), 0);
		}
	}
}

static void assert_same_tensors(const gguf *a, const gguf *b)
{
	assert_int_equal(gguf_n_tensors(a), gguf_n_tensors(b));
	for (uint64_t i = 0; i < gguf_n_tensors(a); i++) {
		const gguf_tensor *x = gguf_tensor_at(a, i), *y = gguf_tensor_at(b, i);
		assert_string_equal(x->name, y->name);
		assert_int_equal(x->type, y->type);
		assert_int_equal(x->n_dims, y->n_dims);
		assert_memory_equal(x->ne, y->ne, sizeof(x->ne));
		assert_int_equal(x->n_bytes, y->n_bytes);
		assert_memory_equal(x->data, y->data, x->n_bytes);
	}
}

static void assert_kv_raw_equal(const gguf *a, uint64_t i, const gguf *b, uint64_t j)
{
	const void *p, *q;
	size_t n, m;
	assert_int_equal(gguf_kv_raw(a, i, &p, &n), 0);
	assert_int_equal(gguf_kv_raw(b, j, &q, &m), 0);
	assert_int_equal(n, m);
	assert_memory_equal(p, q, n);
}

static void test_writer_plain_copy_is_identical(void **state)
{
	(void)state;
	gguf *src = NULL, *dst = NULL;
	gguf_writer *w = NULL;
	const char *out = tmp_path("copy.gguf");
	assert_int_equal(gguf_open(data_path("qwen3moe-tiny-f32.gguf"), &src), 0);
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_copy_all_kv(w, src), 0);
	for (uint64_t i = 0; i < gguf_n_tensors(src); i++) {
		const gguf_tensor *t = gguf_tensor_at(src, i);
		assert_int_equal(gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), 0);
	}
	assert_int_equal(gguf_writer_open(w, out), 0);
	assert_true(file_exists(tmp_path("copy.gguf.tmp")));
	assert_false(file_exists(out));
	write_tensors(w, src, 1u << 20);
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
	assert_null(w);
	assert_false(file_exists(tmp_path("copy.gguf.tmp")));
	assert_int_equal(gguf_open(out, &dst), 0);
	assert_int_equal(gguf_n_kv(dst), gguf_n_kv(src));
	for (uint64_t i = 0; i < gguf_n_kv(src); i++)
		assert_kv_raw_equal(src, i, dst, i);
	assert_same_tensors(src, dst);
	gguf_destroy(&dst);
	/* same layout as the oracle's writer: the files are byte-identical */
	size_t na, nb;
	uint8_t *a = read_all(gguf_path(src), &na), *b = read_all(out, &nb);
	assert_int_equal(na, nb);
	assert_memory_equal(a, b, na);
	free(a);
	free(b);
	gguf_destroy(&src);
	unlink(out);
}

static void test_writer_every_type_and_alignment(void **state)
{
	(void)state;
	gguf *src = NULL, *dst = NULL;
	gguf_writer *w = NULL;
	const char *out = tmp_path("types.gguf");
	assert_int_equal(gguf_open(data_path("qwen3moe-tiny-f32.gguf"), &src), 0);
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_copy_all_kv(w, src), 0);
	uint64_t n_src = gguf_n_kv(src);
	/* replace in place, and add one of each kind */
	assert_int_equal(gguf_writer_set_str(w, "general.name", "renamed"), 0);
	assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 64), 0);
	assert_int_equal(gguf_writer_set_i32(w, "test.i32", -5), 0);
	assert_int_equal(gguf_writer_set_f32(w, "test.f32", 0.25f), 0);
	assert_int_equal(gguf_writer_set_bool(w, "test.bool", 1), 0);
	const int32_t arr[3] = {7, -8, 9};
	assert_int_equal(gguf_writer_set_arr(w, "test.arr", GGUF_TYPE_I32, arr, 3), 0);
	const char *strs[3] = {"a", "", "long string"};
	assert_int_equal(gguf_writer_set_arr_str(w, "test.strs", strs, 3), 0);
	assert_int_equal(gguf_writer_set_arr_str(w, "test.empty", NULL, 0), 0);
	assert_int_equal(gguf_writer_set_u32(w, "test.u32", 1), 0);
	assert_int_equal(gguf_writer_set_u32(w, "test.u32", 42), 0); /* replaced */
	assert_int_equal(gguf_writer_n_kv(w), n_src + 8);
	assert_int_equal(gguf_writer_set_u32(w, "", 1), ERR_CONFIG);
	const uint8_t bad_bool = 2;
	assert_int_equal(gguf_writer_set_arr(w, "test.bad", GGUF_TYPE_BOOL, &bad_bool, 1),
			 ERR_CONFIG);
	assert_int_equal(gguf_writer_set_arr(w, "test.bad", GGUF_TYPE_STRING, arr, 1), ERR_CONFIG);
	for (uint64_t i = 0; i < gguf_n_tensors(src); i++) {
		const gguf_tensor *t = gguf_tensor_at(src, i);
		assert_int_equal(gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), 0);
	}
	assert_int_equal(gguf_writer_n_tensors(w), gguf_n_tensors(src));
	assert_int_equal(gguf_writer_open(w, out), 0);
	assert_int_equal(gguf_writer_set_u32(w, "test.late", 1), ERR_CONFIG);
	write_tensors(w, src, 1000); /* pieces that straddle tensors' ends */
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);

	assert_int_equal(gguf_open(out, &dst), 0);
	assert_int_equal(gguf_n_kv(dst), n_src + 8);
	for (uint64_t i = 0; i < n_src; i++) {
		const char *k = gguf_kv_key(src, i);
		assert_string_equal(gguf_kv_key(dst, i), k);
		if (strcmp(k, "general.name") != 0)
			assert_kv_raw_equal(src, i, dst, i);
	}
	char name[32];
	assert_int_equal(gguf_get_cstr(dst, "general.name", name, sizeof(name)), 0);
	assert_string_equal(name, "renamed");
	uint32_t u;
	int32_t i32;
	float f;
	int b;
	assert_int_equal(gguf_get_u32(dst, "general.alignment", &u), 0);
	assert_int_equal(u, 64);
	assert_int_equal(gguf_get_i32(dst, "test.i32", &i32), 0);
	assert_int_equal(i32, -5);
	assert_int_equal(gguf_get_f32(dst, "test.f32", &f), 0);
	assert_true(f == 0.25f);
	assert_int_equal(gguf_get_bool(dst, "test.bool", &b), 0);
	assert_int_equal(b, 1);
	assert_int_equal(gguf_get_u32(dst, "test.u32", &u), 0);
	assert_int_equal(u, 42);
	uint32_t got[3];
	assert_int_equal(gguf_get_arr_u32(dst, "test.arr", got, 3), 0);
	assert_memory_equal(got, arr, sizeof(arr));
	for (int k = 0; k < 3; k++) {
		gguf_str s;
		assert_int_equal(gguf_get_arr_str(dst, "test.strs", (uint64_t)k, &s), 0);
		assert_int_equal(s.len, strlen(strs[k]));
		assert_memory_equal(s.ptr, strs[k], s.len);
	}
	enum gguf_type et;
	uint64_t count;
	const void *data;
	assert_int_equal(gguf_get_arr(dst, "test.empty", &et, &count, &data), 0);
	assert_int_equal(et, GGUF_TYPE_STRING);
	assert_int_equal(count, 0);
	assert_same_tensors(src, dst);
	for (uint64_t i = 0; i < gguf_n_tensors(dst); i++) {
		const uint8_t *p = gguf_tensor_at(dst, i)->data;
		const uint8_t *p0 = gguf_tensor_at(dst, 0)->data;
		assert_int_equal((uint64_t)(p - p0) % 64, 0);
	}
	/* every kind of entry (empty string array included) copies raw */
	gguf *again = NULL;
	const char *out2 = tmp_path("types2.gguf");
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_copy_all_kv(w, dst), 0);
	assert_int_equal(gguf_writer_open(w, out2), 0);
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
	assert_int_equal(gguf_open(out2, &again), 0);
	assert_int_equal(gguf_n_kv(again), gguf_n_kv(dst));
	for (uint64_t i = 0; i < gguf_n_kv(dst); i++)
		assert_kv_raw_equal(dst, i, again, i);
	gguf_destroy(&again);
	unlink(out2);
	gguf_destroy(&dst);
	gguf_destroy(&src);
	unlink(out);
}

static void test_writer_misuse_leaves_nothing(void **state)
{
	(void)state;
	gguf_writer *w = NULL;
	const char *out = tmp_path("misuse.gguf");
	const char *tmp = tmp_path("misuse.gguf.tmp");
	const uint64_t ne[2] = {32, 2};
	const uint64_t ne_bad[2] = {33, 2};
	const uint64_t ne_zero[2] = {32, 0};
	float data[64] = {0};

	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_add_tensor(w, "a", KERN_F32, 2, ne), 0);
	assert_int_equal(gguf_writer_add_tensor(w, "a", KERN_F32, 2, ne), ERR_CONFIG);
	assert_int_equal(gguf_writer_add_tensor(w, "b", KERN_Q8_0, 2, ne_bad), ERR_CONFIG);
	assert_int_equal(gguf_writer_add_tensor(w, "b", KERN_F32, 2, ne_zero), ERR_CONFIG);
	assert_int_equal(gguf_writer_add_tensor(w, "b", 99, 2, ne), ERR_CONFIG);
	assert_int_equal(gguf_writer_add_tensor(w, "b", KERN_F32, 5, ne), ERR_CONFIG);
	assert_int_equal(gguf_writer_add_tensor(w, "", KERN_F32, 2, ne), ERR_CONFIG);
	assert_int_equal(gguf_writer_write(w, data, 4), ERR_CONFIG); /* not open */
	assert_int_equal(gguf_writer_open(w, out), 0);
	assert_int_equal(gguf_writer_add_tensor(w, "c", KERN_F32, 2, ne), ERR_CONFIG);
	assert_int_equal(gguf_writer_write(w, data, 100), 0);
	/* short by 156 bytes: commit refuses, and destroy removes the temporary */
	assert_int_equal(gguf_writer_commit(w), ERR_CONFIG);
	gguf_writer_destroy(&w);
	assert_false(file_exists(tmp));
	assert_false(file_exists(out));

	/* too much data */
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_add_tensor(w, "a", KERN_F32, 2, ne), 0);
	assert_int_equal(gguf_writer_open(w, out), 0);
	assert_int_equal(gguf_writer_write(w, data, sizeof(data)), 0);
	assert_int_equal(gguf_writer_write(w, data, 4), ERR_CONFIG);
	gguf_writer_destroy(&w);
	assert_false(file_exists(tmp));
	assert_false(file_exists(out));

	/* a bad general.alignment */
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 48), 0);
	assert_int_equal(gguf_writer_open(w, out), ERR_CONFIG);
	gguf_writer_destroy(&w);
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_set_i32(w, "general.alignment", 64), 0);
	assert_int_equal(gguf_writer_open(w, out), ERR_CONFIG);
	gguf_writer_destroy(&w);
	assert_false(file_exists(tmp));

	/* an unwritable place */
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_open(w, "/nonexistent-dir/x.gguf"), ERR_IO);
	gguf_writer_destroy(&w);

	/* an empty file (no keys, no tensors) is valid */
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_open(w, out), 0);
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
	gguf *g = NULL;
	assert_int_equal(gguf_open(out, &g), 0);
	assert_int_equal(gguf_n_kv(g), 0);
	assert_int_equal(gguf_n_tensors(g), 0);
	gguf_destroy(&g);
	unlink(out);
}

/* --------------------------------------------------------- quantize_file */

static void check_quantized(const char *in_path, const char *out_path, uint32_t type)
{
	gguf *in = NULL, *out = NULL;
	assert_int_equal(gguf_open(in_path, &in), 0);
	assert_int_equal(gguf_open(out_path, &out), 0);
	assert_int_equal(gguf_n_kv(in), gguf_n_kv(out));
	for (uint64_t i = 0; i < gguf_n_kv(in); i++)
		assert_kv_raw_equal(in, i, out, i);
	assert_int_equal(gguf_n_tensors(in), gguf_n_tensors(out));
	int n_experts = 0;
	for (uint64_t i = 0; i < gguf_n_tensors(in); i++) {
		const gguf_tensor *a = gguf_tensor_at(in, i), *b = gguf_tensor_at(out, i);
		assert_string_equal(a->name, b->name);
		assert_int_equal(a->n_dims, b->n_dims);
		assert_memory_equal(a->ne, b->ne, sizeof(a->ne));
		if (!strstr(a->name, "_exps.weight")) {
			assert_int_equal(a->type, b->type);
			assert_int_equal(a->n_bytes, b->n_bytes);
			assert_memory_equal(a->data, b->data, a->n_bytes);
			continue;
		}
		n_experts++;
		assert_int_equal(a->type, KERN_F32);
		assert_int_equal(b->type, type);
		int64_t n = (int64_t)(a->n_bytes / 4);
		double ss = 0;
		for (int64_t j = 0; j < n; j++)
			ss += (double)((const float *)a->data)[j] * ((const float *)a->data)[j];
		double se = check_block_errors(type, a->data, b->data, n);
		double max_rel = type == KERN_Q8_0 ? 0.01 : 0.2;
		if (!(sqrt(se / ss) < max_rel))
			fail_msg("%s: relative rms error %g", a->name, sqrt(se / ss));
	}
	assert_int_equal(n_experts, 9);
	gguf_destroy(&in);
	gguf_destroy(&out);
}

static void test_quantize_qwen3moe(void **state)
{
	(void)state;
	char in[4096], out[512];
	snprintf(in, sizeof(in), "%s", data_path("qwen3moe-tiny-f32.gguf"));
	snprintf(out, sizeof(out), "%s", tmp_path("q.gguf"));
	static const uint32_t types[3] = {KERN_MXFP4, KERN_Q8_0, KERN_Q4_0};
	for (int t = 0; t < 3; t++) {
		assert_int_equal(quantize_file(in, out, types[t]), 0);
		assert_false(file_exists(tmp_path("q.gguf.tmp")));
		check_quantized(in, out, types[t]);
		if (types[t] != KERN_MXFP4)
			continue;
		/* the oracle quantised the same draws with ggml's rule: same bytes */
		gguf *ours = NULL, *ref = NULL;
		assert_int_equal(gguf_open(out, &ours), 0);
		assert_int_equal(gguf_open(data_path("qwen3moe-tiny-mxfp4.gguf"), &ref), 0);
		assert_same_tensors(ours, ref);
		gguf_destroy(&ours);
		gguf_destroy(&ref);
		/* experts already MXFP4: an identical copy */
		const char *again = tmp_path("q2.gguf");
		assert_int_equal(quantize_file(out, again, KERN_MXFP4), 0);
		size_t na, nb;
		uint8_t *a = read_all(out, &na), *b = read_all(again, &nb);
		assert_int_equal(na, nb);
		assert_memory_equal(a, b, na);
		free(a);
		free(b);
		unlink(again);
	}
	unlink(out);
}

/* Experts of every block-type family as the source: each converted row is
 * the MXFP4 quantisation of the source row as kern_dequant_row_ref decodes
 * it, whatever the source type (K-quants, grid types, 32-value types). */
static void test_quantize_any_source_type(void **state)
{
	(void)state;
	static const char *const models[] = {"q3-kq-q2k.gguf", "q3-kq-q4km.gguf", "q3-lg-q51.gguf",
					     "go-lg-q50.gguf", "q3-iq-iq1m.gguf", "q3-iq-iq3.gguf",
					     "go-iq-iq2s.gguf"};
	const char *out = tmp_path("any.gguf");
	int seen[64] = {0};
	for (size_t m = 0; m < sizeof(models) / sizeof(models[0]); m++) {
		char in[4096];
		snprintf(in, sizeof(in), "%s", data_path(models[m]));
		assert_int_equal(quantize_file(in, out, KERN_MXFP4), 0);
		gguf *a = NULL, *b = NULL;
		assert_int_equal(gguf_open(in, &a), 0);
		assert_int_equal(gguf_open(out, &b), 0);
		assert_int_equal(gguf_n_tensors(a), gguf_n_tensors(b));
		for (uint64_t i = 0; i < gguf_n_tensors(a); i++) {
			const gguf_tensor *ta = gguf_tensor_at(a, i), *tb = gguf_tensor_at(b, i);
			if (!quantize_is_expert(ta->name))
				continue;
			assert_int_equal(tb->type, KERN_MXFP4);
			seen[ta->type & 63] = 1;
			const int64_t ne0 = (int64_t)ta->ne[0];
			const size_t ra = kern_row_bytes(ta->type, ne0),
				     rb = kern_row_bytes(KERN_MXFP4, ne0);
			float *x = malloc((size_t)ne0 * sizeof(float));
			uint8_t *q = malloc(rb);
			assert_non_null(x);
			assert_non_null(q);
			for (uint64_t r = 0; r < ta->n_bytes / ra; r++) {
				kern_dequant_row_ref(ta->type, (const uint8_t *)ta->data + r * ra,
						     x, ne0);
				assert_int_equal(quant_row(KERN_MXFP4, x, q, ne0), 0);
				assert_memory_equal(q, (const uint8_t *)tb->data + r * rb, rb);
			}
			free(x);
			free(q);
		}
		gguf_destroy(&a);
		gguf_destroy(&b);
	}
	/* the sources covered: K-quants, grid types and 32-value types */
	static const uint32_t want[] = {KERN_Q2_K,  KERN_Q4_K,	  KERN_Q5_1, KERN_Q5_0,
					KERN_IQ1_M, KERN_IQ3_XXS, KERN_IQ2_S};
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
		if (!seen[want[i]])
			fail_msg("no %s expert tensor among the test models",
				 kern_type_name(want[i]));
	unlink(out);
}

/* Writes src as a gguf-split set of three shards m-0000i-of-00003.gguf. */
static void write_split_set(const gguf *src, char shard[3][512])
{
	const uint64_t n = gguf_n_tensors(src);
	for (int s = 0; s < 3; s++) {
		char name[64];
		snprintf(name, sizeof(name), "m-%05d-of-00003.gguf", s + 1);
		snprintf(shard[s], sizeof(shard[s]), "%s", tmp_path(name));
		gguf_writer *w = NULL;
		assert_int_equal(gguf_writer_new(&w), 0);
		if (s == 0)
			assert_int_equal(gguf_writer_copy_all_kv(w, src), 0);
		assert_int_equal(gguf_writer_set_split(w, (uint16_t)s, 3, (int32_t)n), 0);
		for (uint64_t i = n * (uint64_t)s / 3; i < n * (uint64_t)(s + 1) / 3; i++) {
			const gguf_tensor *t = gguf_tensor_at(src, i);
			assert_int_equal(
			    gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), 0);
		}
		assert_int_equal(gguf_writer_open(w, shard[s]), 0);
		for (uint64_t i = n * (uint64_t)s / 3; i < n * (uint64_t)(s + 1) / 3; i++) {
			const gguf_tensor *t = gguf_tensor_at(src, i);
			assert_int_equal(gguf_writer_write(w, t->data, (size_t)t->n_bytes), 0);
		}
		assert_int_equal(gguf_writer_commit(w), 0);
		gguf_writer_destroy(&w);
	}
}

/* The first shard of a split model gives the output its single file gives:
 * the same bytes (the split keys are left out, the tensors follow in shard
 * order). */
static void test_quantize_split_input(void **state)
{
	(void)state;
	gguf *src = NULL;
	assert_int_equal(gguf_open(data_path("qwen3moe-tiny-f32.gguf"), &src), 0);
	char shard[3][512];
	write_split_set(src, shard);
	char from_split[512], from_one[512];
	snprintf(from_split, sizeof(from_split), "%s", tmp_path("from-split.gguf"));
	snprintf(from_one, sizeof(from_one), "%s", tmp_path("from-one.gguf"));
	assert_int_equal(quantize_file(shard[0], from_split, KERN_Q8_0), 0);
	assert_int_equal(quantize_file(gguf_path(src), from_one, KERN_Q8_0), 0);
	size_t na, nb;
	uint8_t *a = read_all(from_split, &na), *b = read_all(from_one, &nb);
	assert_int_equal(na, nb);
	assert_memory_equal(a, b, na);
	free(a);
	free(b);
	/* a later shard is refused before anything is written */
	assert_int_equal(quantize_file(shard[1], from_split, KERN_Q8_0), ERR_CONFIG);
	gguf_destroy(&src);
	unlink(from_split);
	unlink(from_one);
	for (int s = 0; s < 3; s++)
		unlink(shard[s]);
}

/* ------------------------------------------------------------ split-experts */

#define SPLIT_MODEL "qwen3moe-tiny-mxfp4.gguf"

static void split_dir(const char *name, char *dir, size_t cap)
{
	snprintf(dir, cap, "%s", tmp_path(name));
}

static void unlink_split(const char *model, const char *dir, int n)
{
	char path[1024];
	for (int k = 1; k <= n; k++)
		if (split_path(model, dir, k, n, path, sizeof(path)) == 0)
			unlink(path);
	rmdir(dir);
}

/* n workers with ample memory and equal speed */
static struct placement_worker *split_workers(int n)
{
	static struct placement_worker w[8];
	for (int i = 0; i < n; i++)
		w[i] = (struct placement_worker){.mem_bytes = UINT64_MAX, .speed = 1.0};
	return w;
}

/* The files split_experts wrote for n workers and `rep` replicas: each
 * routed expert in exactly rep files, with the source's bytes in its slot;
 * the source's metadata plus the six moefleet.shard keys; no other tensor;
 * expert counts within one of each other. */
static void check_split_files(const char *model, const char *dir, int n, int rep)
{
	gguf *src = NULL;
	assert_int_equal(gguf_open(model, &src), 0);
	char id[SHARDFILE_ID_LEN];
	shardfile_model_id(src, id);
	int copies[64][64] = {{0}};
	uint32_t lo = UINT32_MAX, hi = 0;
	int n_layer = 0, X = 0;
	for (int k = 1; k <= n; k++) {
		char path[1024];
		assert_int_equal(split_path(model, dir, k, n, path, sizeof(path)), 0);
		gguf *g = NULL;
		struct shardfile sf;
		assert_int_equal(gguf_open(path, &g), 0);
		assert_int_equal(shardfile_read(g, &sf), 0);
		assert_int_equal(sf.index, (uint32_t)k);
		assert_int_equal(sf.count, (uint32_t)n);
		assert_string_equal(sf.model, id);
		assert_true(sf.n_layer <= 64 && sf.n_expert <= 64);
		n_layer = sf.n_layer;
		X = sf.n_expert;
		lo = sf.n_held < lo ? sf.n_held : lo;
		hi = sf.n_held > hi ? sf.n_held : hi;
		assert_int_equal(gguf_n_kv(g), gguf_n_kv(src) + 6);
		for (uint64_t i = 0; i < gguf_n_kv(src); i++)
			assert_true(gguf_find_kv(g, gguf_kv_key(src, i)) >= 0);
		for (uint64_t i = 0; i < gguf_n_tensors(g); i++)
			assert_non_null(strstr(gguf_tensor_at(g, i)->name, "_exps."));
		for (int l = 0; l < sf.n_layer; l++)
			for (int e = 0; e < sf.n_expert; e++) {
				int slot = shardfile_slot(&sf, l, e);
				if (slot < 0)
					continue;
				copies[l][e]++;
				for (int t = 0; t < 6; t++) {
					char name[96];
					shardfile_tensor_name(l, t, name, sizeof(name));
					const gguf_tensor *a = gguf_find_tensor(src, name);
					const gguf_tensor *b = gguf_find_tensor(g, name);
					assert_true((a == NULL) == (b == NULL));
					if (!a)
						continue;
					uint64_t per = a->n_bytes / (uint64_t)sf.n_expert;
					assert_int_equal(b->n_bytes, per * sf.layer_held[l]);
					assert_memory_equal((const uint8_t *)a->data + per * e,
							    (const uint8_t *)b->data + per * slot,
							    per);
				}
			}
		shardfile_free(&sf);
		gguf_destroy(&g);
	}
	assert_true(n_layer > 0 && X > 0);
	assert_true(hi - lo <= 1);
	for (int l = 0; l < n_layer; l++)
		for (int e = 0; e < X; e++)
			assert_int_equal(copies[l][e], rep);
	gguf_destroy(&src);
}

static void test_split_experts_files(void **state)
{
	(void)state;
	char dir[512];
	const char *model = data_path(SPLIT_MODEL);
	char m[4096];
	snprintf(m, sizeof(m), "%s", model);
	split_dir("split2", dir, sizeof(dir));
	assert_int_equal(split_experts(m, split_workers(2), 2, 1, dir), 0);
	check_split_files(m, dir, 2, 1);
	unlink_split(m, dir, 2);
	split_dir("split3r2", dir, sizeof(dir));
	assert_int_equal(split_experts(m, split_workers(3), 3, 2, dir), 0);
	check_split_files(m, dir, 3, 2);
	unlink_split(m, dir, 3);
	/* a worker with less memory holds fewer experts */
	struct placement_worker *w = split_workers(2);
	split_dir("split-mem", dir, sizeof(dir));
	gguf *g = NULL;
	assert_int_equal(gguf_open(m, &g), 0);
	const gguf_tensor *t = gguf_find_tensor(g, "blk.0.ffn_down_exps.weight");
	assert_non_null(t);
	w[0].mem_bytes = 3 * (t->n_bytes / t->ne[2]) * 10; /* room for 10 experts */
	gguf_destroy(&g);
	assert_int_equal(split_experts(m, w, 2, 1, dir), 0);
	char path[1024];
	struct shardfile sf;
	assert_int_equal(split_path(m, dir, 1, 2, path, sizeof(path)), 0);
	assert_int_equal(gguf_open(path, &g), 0);
	assert_int_equal(shardfile_read(g, &sf), 0);
	assert_true(sf.n_held <= 10);
	shardfile_free(&sf);
	gguf_destroy(&g);
	unlink_split(m, dir, 2);
}

/* The first shard of a split model gives the files its single file gives;
 * a later shard is refused. */
static void test_split_experts_split_input(void **state)
{
	(void)state;
	gguf *src = NULL;
	assert_int_equal(gguf_open(data_path(SPLIT_MODEL), &src), 0);
	char shard[3][512], d1[512], d2[512];
	write_split_set(src, shard);
	split_dir("from-set", d1, sizeof(d1));
	split_dir("from-one", d2, sizeof(d2));
	assert_int_equal(split_experts(shard[0], split_workers(2), 2, 1, d1), 0);
	assert_int_equal(split_experts(gguf_path(src), split_workers(2), 2, 1, d2), 0);
	for (int k = 1; k <= 2; k++) {
		char p1[1024], p2[1024];
		assert_int_equal(split_path(shard[0], d1, k, 2, p1, sizeof(p1)), 0);
		assert_int_equal(split_path(gguf_path(src), d2, k, 2, p2, sizeof(p2)), 0);
		assert_non_null(strstr(p1, "/m-w"));
		size_t na, nb;
		uint8_t *a = read_all(p1, &na), *b = read_all(p2, &nb);
		assert_int_equal(na, nb);
		assert_memory_equal(a, b, na);
		free(a);
		free(b);
	}
	assert_int_not_equal(split_experts(shard[1], split_workers(2), 2, 1, d1), 0);
	unlink_split(shard[0], d1, 2);
	unlink_split(gguf_path(src), d2, 2);
	gguf_destroy(&src);
	for (int s = 0; s < 3; s++)
		unlink(shard[s]);
}

/* A copy of shard file `good` with its held list, index and count replaced. */
static void write_bad_shard(const gguf *good, const char *path, const uint32_t *ids, uint64_t n,
			    uint32_t index, uint32_t count)
{
	gguf_writer *w = NULL;
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_copy_all_kv(w, good), 0);
	assert_int_equal(gguf_writer_set_arr(w, SHARDFILE_KEY_HELD, GGUF_TYPE_U32, ids, n), 0);
	assert_int_equal(gguf_writer_set_u32(w, SHARDFILE_KEY_INDEX, index), 0);
	assert_int_equal(gguf_writer_set_u32(w, SHARDFILE_KEY_COUNT, count), 0);
	for (uint64_t i = 0; i < gguf_n_tensors(good); i++) {
		const gguf_tensor *t = gguf_tensor_at(good, i);
		assert_int_equal(gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), 0);
	}
	assert_int_equal(gguf_writer_open(w, path), 0);
	for (uint64_t i = 0; i < gguf_n_tensors(good); i++) {
		const gguf_tensor *t = gguf_tensor_at(good, i);
		assert_int_equal(gguf_writer_write(w, t->data, (size_t)t->n_bytes), 0);
	}
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
}

static void test_split_experts_bad(void **state)
{
	(void)state;
	char m[4096], dir[512], path[1024], bad[512];
	snprintf(m, sizeof(m), "%s", data_path(SPLIT_MODEL));
	split_dir("split-bad", dir, sizeof(dir));
	/* too many workers for 3 x 16 experts, a budget nothing fits in, an
	 * unwritable directory */
	assert_int_equal(split_experts(m, split_workers(2), 49, 1, dir), ERR_CONFIG);
	struct placement_worker *w = split_workers(2);
	w[0].mem_bytes = w[1].mem_bytes = 1000;
	assert_int_equal(split_experts(m, w, 2, 1, dir), ERR_CONFIG);
	assert_int_equal(split_experts(m, split_workers(2), 2, 1, "/proc/no/such/dir"), ERR_IO);
	/* a plain model is no shard file; a shard file is not split again */
	gguf *g = NULL, *good = NULL;
	struct shardfile sf;
	assert_int_equal(gguf_open(m, &g), 0);
	assert_int_equal(shardfile_read(g, &sf), ERR_RANGE);
	gguf_destroy(&g);
	assert_int_equal(split_experts(m, split_workers(2), 2, 1, dir), 0);
	assert_int_equal(split_path(m, dir, 1, 2, path, sizeof(path)), 0);
	assert_int_equal(split_experts(path, split_workers(2), 2, 1, dir), ERR_FORMAT);
	/* damaged metadata */
	assert_int_equal(gguf_open(path, &good), 0);
	assert_int_equal(shardfile_read(good, &sf), 0);
	uint32_t ids[64 * 64];
	uint64_t n = 0;
	for (int l = 0; l < sf.n_layer; l++)
		for (int e = 0; e < sf.n_expert; e++)
			if (shardfile_slot(&sf, l, e) >= 0)
				ids[n++] = (uint32_t)(l * sf.n_expert + e);
	snprintf(bad, sizeof(bad), "%s", tmp_path("bad-shard.gguf"));
	uint32_t tmp = ids[0]; /* not ascending */
	ids[0] = ids[1];
	ids[1] = tmp;
	write_bad_shard(good, bad, ids, n, 1, 2);
	assert_int_equal(gguf_open(bad, &g), 0);
	assert_int_equal(shardfile_read(g, &sf), ERR_FORMAT);
	gguf_destroy(&g);
	ids[1] = ids[0];
	ids[0] = tmp;
	write_bad_shard(good, bad, ids + 1, n - 1, 1, 2); /* one expert fewer than stored */
	assert_int_equal(gguf_open(bad, &g), 0);
	assert_int_equal(shardfile_read(g, &sf), ERR_FORMAT);
	gguf_destroy(&g);
	write_bad_shard(good, bad, ids, n, 3, 2); /* index beyond the count */
	assert_int_equal(gguf_open(bad, &g), 0);
	assert_int_equal(shardfile_read(g, &sf), ERR_FORMAT);
	gguf_destroy(&g);
	ids[n - 1] = 3u * 16u; /* beyond the model */
	write_bad_shard(good, bad, ids, n, 1, 2);
	assert_int_equal(gguf_open(bad, &g), 0);
	assert_int_equal(shardfile_read(g, &sf), ERR_FORMAT);
	gguf_destroy(&g);
	gguf_destroy(&good);
	unlink(bad);
	unlink_split(m, dir, 2);
}

/* A small model file: one expert tensor `expert` (F32, ne0 x 2 x 2) unless
 * NULL, one norm, with values from fill. */
static void make_model(const char *path, const char *expert, uint64_t ne0, float fill_bad)
{
	gguf_writer *w = NULL;
	assert_int_equal(gguf_writer_new(&w), 0);
	assert_int_equal(gguf_writer_set_str(w, "general.architecture", "test"), 0);
	uint64_t ne_n[1] = {ne0};
	uint64_t ne_e[3] = {ne0, 2, 2};
	assert_int_equal(gguf_writer_add_tensor(w, "output_norm.weight", KERN_F32, 1, ne_n), 0);
	if (expert)
		assert_int_equal(gguf_writer_add_tensor(w, expert, KERN_F32, 3, ne_e), 0);
	assert_int_equal(gguf_writer_open(w, path), 0);
	float *v = malloc((size_t)ne0 * 4 * sizeof(float));
	assert_non_null(v);
	for (uint64_t i = 0; i < ne0 * 4; i++)
		v[i] = rng_gauss();
	assert_int_equal(gguf_writer_write(w, v, (size_t)ne0 * sizeof(float)), 0);
	if (expert) {
		v[3 * ne0 + 5] = fill_bad;
		assert_int_equal(gguf_writer_write(w, v, (size_t)ne0 * 4 * sizeof(float)), 0);
	}
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
	free(v);
}

static void test_quantize_bad_inputs(void **state)
{
	(void)state;
	const char *in = tmp_path("in.gguf");
	const char *out = tmp_path("out.gguf");
	const char *tmp = tmp_path("out.gguf.tmp");

	/* unsupported target type, missing input */
	assert_int_equal(quantize_file(data_path("qwen3moe-tiny-f32.gguf"), out, KERN_F16),
			 ERR_CONFIG);
	assert_int_equal(quantize_file(tmp_path("missing.gguf"), out, KERN_MXFP4), ERR_IO);
	assert_false(file_exists(out));

	/* no expert tensors: warning, unchanged copy */
	make_model(in, NULL, 64, 0);
	assert_int_equal(quantize_file(in, out, KERN_MXFP4), 0);
	size_t na, nb;
	uint8_t *a = read_all(in, &na), *b = read_all(out, &nb);
	assert_int_equal(na, nb);
	assert_memory_equal(a, b, na);
	free(a);
	free(b);
	unlink(out);

	/* a row length that is not a multiple of 32: nothing written */
	make_model(in, "blk.0.ffn_up_exps.weight", 48, 0);
	assert_int_equal(quantize_file(in, out, KERN_MXFP4), ERR_FORMAT);
	assert_false(file_exists(out));
	assert_false(file_exists(tmp));

	/* a NaN / infinity in an expert: fails, an existing OUT is left alone */
	FILE *f = fopen(out, "w");
	assert_non_null(f);
	fputs("keep me", f);
	fclose(f);
	make_model(in, "blk.0.ffn_gate_exps.weight", 64, NAN);
	assert_int_equal(quantize_file(in, out, KERN_Q4_0), ERR_FORMAT);
	make_model(in, "blk.0.ffn_gate_exps.weight", 64, INFINITY);
	assert_int_equal(quantize_file(in, out, KERN_MXFP4), ERR_FORMAT);
	assert_false(file_exists(tmp));
	a = read_all(out, &na);
	assert_int_equal(na, 7);
	assert_memory_equal(a, "keep me", 7);
	free(a);

	/* a good one converts, and replaces OUT */
	make_model(in, "blk.0.ffn_gate_exps.weight", 64, 0.5f);
	assert_int_equal(quantize_file(in, out, KERN_MXFP4), 0);
	gguf *g = NULL;
	assert_int_equal(gguf_open(out, &g), 0);
	assert_int_equal(gguf_find_tensor(g, "blk.0.ffn_gate_exps.weight")->type, KERN_MXFP4);
	assert_int_equal(gguf_find_tensor(g, "output_norm.weight")->type, KERN_F32);
	gguf_destroy(&g);

	/* unwritable output */
	assert_int_equal(quantize_file(in, "/nonexistent-dir/out.gguf", KERN_MXFP4), ERR_IO);
	/* input that is not a GGUF */
	f = fopen(in, "w");
	assert_non_null(f);
	fputs("this is not a gguf file at all, just some text", f);
	fclose(f);
	assert_int_equal(quantize_file(in, out, KERN_MXFP4), ERR_FORMAT);
	unlink(in);
	unlink(out);
}

int main(void)
{
	snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/moefleet-test-quant-%d", (int)getpid());
	if (mkdir(tmp_dir, 0700) != 0) {
		perror(tmp_dir);
		return 1;
	}
	log_set_quiet(1);
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_mxfp4_hand_blocks),
	    cmocka_unit_test(test_mxfp4_matches_literal_search),
	    cmocka_unit_test(test_q8_0_hand_block),
	    cmocka_unit_test(test_q4_0_hand_blocks),
	    cmocka_unit_test(test_quant_row_checks),
	    cmocka_unit_test(test_roundtrip_error_bounds),
	    cmocka_unit_test(test_writer_plain_copy_is_identical),
	    cmocka_unit_test(test_writer_every_type_and_alignment),
	    cmocka_unit_test(test_writer_misuse_leaves_nothing),
	    cmocka_unit_test(test_quantize_qwen3moe),
	    cmocka_unit_test(test_quantize_any_source_type),
	    cmocka_unit_test(test_quantize_split_input),
	    cmocka_unit_test(test_quantize_bad_inputs),
	    cmocka_unit_test(test_split_experts_files),
	    cmocka_unit_test(test_split_experts_split_input),
	    cmocka_unit_test(test_split_experts_bad),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	rmdir(tmp_dir); /* fails harmlessly if a failed test left files */
	return rc;
}
