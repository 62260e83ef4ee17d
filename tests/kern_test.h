/* kern_test: helpers shared by the kernel tests (tests/test_kern*.c): a
 * seeded xorshift generator, float bit views, a checked malloc and a runner
 * that repeats a group at every SIMD level of the CPU.  Header only; every
 * function is static inline, so a test takes what it uses. */
#ifndef MOEFLEET_KERN_TEST_H
#define MOEFLEET_KERN_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static inline void rng_seed(uint64_t s)
{
	rng_state = s * 0x9e3779b97f4a7c15ull + 1;
}

static inline uint32_t rng_u32(void)
{
	uint64_t x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return (uint32_t)((x * 0x2545f4914f6cdd1dull) >> 32);
}

/* uniform in [-1, 1) */
static inline float rng_f(void)
{
	return (float)((double)rng_u32() / 2147483648.0 - 1.0);
}

static inline uint32_t f2u(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float u2f(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

/* needs cmocka.h included first */
static inline void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	assert_non_null(p);
	return p;
}

/* Runs a cmocka group (tests without setup or teardown of their own, at
 * most KERN_TEST_MAX) once per SIMD level this CPU has (AVX2, then AVX-512;
 * once on a scalar-only CPU) as one plan: each test again per level, named
 * "test/level", the level capped by kern_limit_isa() around it, so the
 * tests' SIMD passes check each level against the scalar twins.  cmocka's
 * result. */
#define KERN_TEST_MAX 64

static inline int kern_test_level_setup(void **state)
{
	kern_limit_isa(*(const enum kern_isa *)*state);
	return 0;
}

static inline int kern_test_level_teardown(void **state)
{
	(void)state;
	kern_force_ref(0);
	kern_limit_isa(KERN_ISA_AVX512);
	return 0;
}

static inline int kern_test_run_levels(const char *name, const struct CMUnitTest *tests, size_t n)
{
	static const enum kern_isa levels[] = {KERN_ISA_SCALAR, KERN_ISA_AVX2, KERN_ISA_AVX512};
	static const char *const level_names[] = {"scalar", "avx2", "avx512"};
	static struct CMUnitTest all[3 * KERN_TEST_MAX];
	static char names[3 * KERN_TEST_MAX][96];
	if (n > KERN_TEST_MAX) {
		fprintf(stderr, "%s: %zu tests, at most %d\n", name, n, KERN_TEST_MAX);
		return 1;
	}
	kern_init();
	const int top = (int)kern_cpu_isa();
	size_t k = 0;
	for (int isa = top > KERN_ISA_AVX2 ? KERN_ISA_AVX2 : top; isa <= top; isa++)
		for (size_t i = 0; i < n; i++, k++) {
			all[k] = tests[i];
			snprintf(names[k], sizeof(names[k]), "%s/%s", tests[i].name,
				 level_names[isa]);
			all[k].name = names[k];
			all[k].setup_func = kern_test_level_setup;
			all[k].teardown_func = kern_test_level_teardown;
			all[k].initial_state = (void *)&levels[isa];
		}
	return _cmocka_run_group_tests(name, all, k, NULL, NULL);
}

#endif
