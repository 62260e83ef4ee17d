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

#endif
