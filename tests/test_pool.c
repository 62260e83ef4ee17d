/* The thread pool: every share runs exactly once per run, splits cover the
 * range without overlap, many back-to-back runs complete, and so do runs
 * whose workers or caller had time to fall asleep. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <cmocka.h>

#include "../common/pool.h"

struct count_ctx {
	atomic_int calls;
	atomic_long sum;
	int64_t n;
};

static void count_fn(void *ctx, int ith, int nth)
{
	struct count_ctx *c = ctx;
	int64_t lo, hi;
	pool_split(c->n, ith, nth, 4, &lo, &hi);
	long s = 0;
	for (int64_t i = lo; i < hi; i++)
		s += (long)i;
	atomic_fetch_add(&c->sum, s);
	atomic_fetch_add(&c->calls, 1);
}

static void test_runs(void **state)
{
	(void)state;
	for (int threads = 1; threads <= 4; threads++) {
		pool *p = NULL;
		assert_int_equal(pool_new(threads, &p), 0);
		assert_int_equal(pool_size(p), threads);
		for (int rep = 0; rep < 2000; rep++) {
			struct count_ctx c = {.n = 1000 + rep % 7};
			pool_run(p, count_fn, &c);
			assert_int_equal(atomic_load(&c.calls), threads);
			assert_int_equal(atomic_load(&c.sum), (long)(c.n * (c.n - 1) / 2));
		}
		pool_destroy(&p);
		assert_null(p);
	}
}

static void nap(long us)
{
	struct timespec ts = {0, us * 1000};
	nanosleep(&ts, NULL);
}

/* Shares of a run take turns being late, longer than the pool spins. */
static void late_fn(void *ctx, int ith, int nth)
{
	struct count_ctx *c = ctx;
	if (c->n % nth == ith)
		nap(300);
	count_fn(ctx, ith, nth);
}

/* Workers asleep between runs (the caller pauses), and a caller asleep
 * while a late worker finishes: every run still completes, once per share. */
static void test_sleepers(void **state)
{
	(void)state;
	for (int threads = 2; threads <= 3; threads++) {
		pool *p = NULL;
		assert_int_equal(pool_new(threads, &p), 0);
		for (int rep = 0; rep < 60; rep++) {
			struct count_ctx c = {.n = 1000 + rep};
			if (rep % 3 == 0)
				nap(300);
			pool_run(p, rep % 2 ? late_fn : count_fn, &c);
			assert_int_equal(atomic_load(&c.calls), threads);
			assert_int_equal(atomic_load(&c.sum), (long)(c.n * (c.n - 1) / 2));
		}
		pool_destroy(&p);
	}
}

static void test_split(void **state)
{
	(void)state;
	for (int64_t n = 0; n < 100; n++) {
		for (int nth = 1; nth <= 5; nth++) {
			int64_t next = 0;
			for (int ith = 0; ith < nth; ith++) {
				int64_t lo, hi;
				pool_split(n, ith, nth, 3, &lo, &hi);
				assert_int_equal(lo, next);
				assert_true(hi >= lo);
				assert_true(hi == n || hi % 3 == 0);
				next = hi;
			}
			assert_int_equal(next, n);
		}
	}
}

static void test_bad_size(void **state)
{
	(void)state;
	pool *p = NULL;
	assert_int_not_equal(pool_new(100000, &p), 0);
	assert_null(p);
	pool_destroy(&p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_runs),
	    cmocka_unit_test(test_sleepers),
	    cmocka_unit_test(test_split),
	    cmocka_unit_test(test_bad_size),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
