/* fuzz: what the fuzz targets share.  Each target defines the libFuzzer
 * entry point LLVMFuzzerTestOneInput(); built with clang -fsanitize=fuzzer
 * it is a fuzzer (tests/fuzz/run.sh), linked with replay.c (any compiler) it
 * replays the seed corpus and the regression inputs under `make check`.
 * A target must not leak, must not log more than a line per input, and
 * aborts (a finding) when a property it checks does not hold. */
#ifndef MOEFLEET_FUZZ_H
#define MOEFLEET_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* $top_srcdir/tests/data/NAME (top_srcdir from the environment, else "."). */
const char *fuzz_data_path(const char *name);

/* Marks a checker (not code under test): clang leaves it uninstrumented, so
 * its coverage does not count and its comparisons are not traced. */
#if defined(__clang__)
#define FUZZ_CHECKER __attribute__((no_sanitize("coverage")))
#else
#define FUZZ_CHECKER
#endif

/* Length of the valid UTF-8 sequence at s (n > 0 bytes left), 0 if the bytes
 * there are not one (overlong forms, surrogates, > U+10FFFF, truncated). */
size_t fuzz_utf8_len(const uint8_t *s, size_t n);
/* s[0, n) is valid UTF-8. */
int fuzz_utf8_valid(const char *s, size_t n);

#endif
