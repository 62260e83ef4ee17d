/* kern_test: helpers shared by the kernel tests (tests/test_kern*.c): a
 * seeded xorshift generator, float bit views and a checked malloc.  Header
 * only; every function is static inline, so a test takes what it uses. */
#ifndef MOEFLEET_KERN_TEST_H
#define MOEFLEET_KERN_TEST_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

#endif
