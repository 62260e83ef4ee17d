/* kern_bits: a float's bits and back (IEEE-754 binary32), for code that
 * reproduces another implementation's rounding bit for bit. */
#ifndef MOEFLEET_KERN_BITS_H
#define MOEFLEET_KERN_BITS_H

#include <stdint.h>
#include <string.h>

static inline __attribute__((always_inline)) uint32_t kern_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline __attribute__((always_inline)) float kern_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

#endif
