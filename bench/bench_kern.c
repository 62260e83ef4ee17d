/* bench_kern: micro-benchmark of the dot-product kernels (not part of make check).
 *
 * Build (from a configured build dir):
 *   cc -std=c11 -O2 -D_POSIX_C_SOURCE=200809L -I$SRC $SRC/bench/bench_kern.c \
 *      libmoefleet.a libkern_avx512.a libkern_avx2.a libmoefleet.a -lm -lpthread \
 *      -o bench_kern
 * Usage: bench_kern [--ref] [TYPE...]   (TYPE: MXFP4, Q4_0, ...; default all)
 * The best instruction set the CPU has is used; MOEFLEET_ISA=avx2 (or scalar)
 * caps it, e.g. to compare the AVX2 and AVX-512 kernels in one session.
 *
 * For each quantised weight type and row length, reports the weight bandwidth
 * of single-row matmuls (decode) over a matrix larger than the caches and over
 * one that fits in L2, the same decode with the output rows split over two
 * threads (wall time: both threads share the memory bus, as in a decode step),
 * and the throughput of a 64-row matmul (prefill) in cache and of a 32-row one
 * (an expert's batch) streaming the large matrix from memory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/pool.h"
#include "kernels/kern.h"

/* Seconds on clock c.  Single-thread runs use the thread's CPU time (the
 * machine is shared, so wall time would count other processes' time slices);
 * the two-thread run needs wall time. */
static double seconds(clockid_t c)
{
	struct timespec ts;
	clock_gettime(c, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t rng = 12345;

static uint32_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return rng;
}

static void fill(uint32_t t, uint8_t *w, size_t bytes)
{
	size_t bs = kern_type_block_bytes(t);
	if (kern_type_block(t) == 1) { /* sane floats: no overflow or subnormals */
		float f[256];
		size_t row = kern_row_bytes(t, 256);
		for (size_t b = 0; b + row <= bytes; b += row) {
			for (int i = 0; i < 256; i++)
				f[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f;
			kern_convert_row(kern_act_type(t), f, w + b, 256);
		}
		return;
	}
	for (size_t i = 0; i < bytes; i++)
		w[i] = (uint8_t)next();
	/* K-quants: f16 d (and dmin) at these offsets of the block */
	int f16_at[2] = {0, -1};
	switch (t) {
	case KERN_Q2_K: f16_at[0] = 80, f16_at[1] = 82; break;
	case KERN_Q3_K: f16_at[0] = 108; break;
	case KERN_Q4_K:
	case KERN_Q5_K: f16_at[1] = 2; break;
	case KERN_Q6_K: f16_at[0] = 208; break;
	default: break;
	}
	for (size_t b = 0; b + bs <= bytes; b += bs) {
		if (kern_type_block(t) == 256) {
			uint16_t d = kern_f32_to_f16(0.01f);
			for (int f = 0; f < 2; f++)
				if (f16_at[f] >= 0)
					memcpy(w + b + f16_at[f], &d, 2);
		} else if (t == KERN_MXFP4) {
			w[b] = (uint8_t)(120 + next() % 8);
		} else {
			uint16_t d = kern_f32_to_f16(0.01f);
			memcpy(w + b, &d, 2);
		}
	}
}

/* Seconds per call of a matmul with n_rows rows, best of a few runs. */
static double time_matmul(uint32_t t, const uint8_t *w, int64_t n_in, int64_t n_out,
			  const uint8_t *x, size_t xs, int64_t n_rows, float *y, int reps)
{
	double best = 1e30;
	for (int k = 0; k < 5; k++) {
		double t0 = seconds(CLOCK_THREAD_CPUTIME_ID);
		for (int r = 0; r < reps; r++)
			kern_matmul(t, w, n_in, 0, n_out, x, xs, n_rows, y, n_out);
		double dt = (seconds(CLOCK_THREAD_CPUTIME_ID) - t0) / reps;
		if (dt < best)
			best = dt;
	}
	return best;
}

struct mm2 {
	uint32_t t;
	const uint8_t *w;
	int64_t n_in, n_out;
	const uint8_t *x;
	float *y;
};

static void mm2_run(void *ctx, int ith, int nth)
{
	const struct mm2 *j = ctx;
	int64_t lo, hi;
	pool_split(j->n_out, ith, nth, 16, &lo, &hi);
	kern_matmul(j->t, j->w, j->n_in, lo, hi, j->x, 0, 1, j->y, j->n_out);
}

/* Seconds per single-row matmul split over the pool's threads, best of 5. */
static double time_matmul_pool(pool *p, const struct mm2 *j)
{
	double best = 1e30;
	for (int k = 0; k < 5; k++) {
		double t0 = seconds(CLOCK_MONOTONIC);
		pool_run(p, mm2_run, (void *)j);
		double dt = seconds(CLOCK_MONOTONIC) - t0;
		if (dt < best)
			best = dt;
	}
	return best;
}

int main(int argc, char **argv)
{
	kern_init();
	int argi = 1;
	if (argc > 1 && strcmp(argv[1], "--ref") == 0) {
		kern_force_ref(1);
		argi++;
	}
	printf("isa: %s\n", kern_isa_name());
	printf("%-6s %5s %14s %14s %14s %18s %18s\n", "type", "n_in", "decode GB/s", "in-L2 GB/s",
	       "decode 2T GB/s", "prefill64 Gop/s", "batch32 Gop/s");
	const uint32_t types[] = {KERN_MXFP4, KERN_Q4_0, KERN_Q8_0,   KERN_Q4_1,
				  KERN_Q5_0,  KERN_Q5_1, KERN_IQ4_NL, KERN_F16,
				  KERN_BF16,  KERN_F32,	 KERN_Q4_K,   KERN_Q6_K,
				  KERN_Q5_K,  KERN_Q3_K, KERN_Q2_K,   KERN_IQ4_XS};
	const int64_t ns[] = {1024, 2048, 2880, 4096};
	const size_t big = (size_t)128 << 20; /* bytes of weights for the decode run */
	uint8_t *w = malloc(big + 4096);
	uint8_t *x = malloc((size_t)64 * 4096 * 4);
	float *xf = malloc(4096 * sizeof(float));
	float *y = malloc((size_t)64 * (big / 512) * sizeof(float));
	pool *p = NULL;
	if (!w || !x || !xf || !y || pool_new(2, &p))
		return 1;
	for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
		uint32_t t = types[ti];
		int want = argi >= argc;
		for (int a = argi; a < argc; a++)
			want |= strcmp(argv[a], kern_type_name(t)) == 0;
		if (!want)
			continue;
		fill(t, w, big);
		for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
			int64_t n = ns[ni];
			if (n % kern_type_block(t))
				continue;
			size_t wr = kern_row_bytes(t, n), xs = kern_row_bytes(kern_act_type(t), n);
			for (int r = 0; r < 64; r++) {
				for (int64_t i = 0; i < n; i++)
					xf[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f;
				kern_convert_row(kern_act_type(t), xf, x + (size_t)r * xs, n);
			}
			int64_t n_out_big = (int64_t)(big / wr);
			double s1 = time_matmul(t, w, n, n_out_big, x, xs, 1, y, 2);
			int64_t n_out_l2 = (int64_t)((128 << 10) / wr);
			double s2 = time_matmul(t, w, n, n_out_l2, x, xs, 1, y, 200);
			struct mm2 j2 = {t, w, n, n_out_big, x, y};
			double s4 = time_matmul_pool(p, &j2);
			int64_t n_out_pf = 256;
			double s3 = time_matmul(t, w, n, n_out_pf, x, xs, 64, y, 3);
			/* an expert's batch: 32 rows against weights streamed from DRAM */
			double s5 = time_matmul(t, w, n, n_out_big, x, xs, 32, y, 1);
			printf("%-6s %5lld %14.2f %14.2f %14.2f %18.2f %18.2f\n", kern_type_name(t),
			       (long long)n, (double)(wr * n_out_big) / s1 * 1e-9,
			       (double)(wr * n_out_l2) / s2 * 1e-9,
			       (double)(wr * n_out_big) / s4 * 1e-9,
			       2.0 * (double)n * (double)n_out_pf * 64 / s3 * 1e-9,
			       2.0 * (double)n * (double)n_out_big * 32 / s5 * 1e-9);
			fflush(stdout);
		}
	}
	pool_destroy(&p);
	free(w);
	free(x);
	free(xf);
	free(y);
	return 0;
}
