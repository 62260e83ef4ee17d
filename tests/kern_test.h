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

/* Runs a cmocka group once per SIMD level this CPU has (AVX2, then AVX-512;
 * once on a scalar-only CPU), the level capped by kern_limit_isa(), so the
 * tests' SIMD passes check each level against the scalar twins.  0 if every
 * run passed. */
static inline int kern_test_run_levels(const char *name, const struct CMUnitTest *tests, size_t n)
{
	int rc = 0;
	kern_init();
	const int top = (int)kern_cpu_isa();
	for (int isa = top > KERN_ISA_AVX2 ? KERN_ISA_AVX2 : top; isa <= top; isa++) {
		kern_limit_isa((enum kern_isa)isa);
		printf("[ kernels: %s ]\n", kern_isa_name());
		rc |= _cmocka_run_group_tests(name, tests, n, NULL, NULL);
	}
	kern_limit_isa(KERN_ISA_AVX512);
	return rc;
}

#endif
