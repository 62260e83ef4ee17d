/* kern_iq_grid: lookup tables of the grid types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
 * IQ2_S, IQ3_XXS and IQ3_S (kern_iq_ref.c, kern_iq_avx2.c).
 *
 * The grids are GGML's (ggml-common.h), generated into kern_iq_grid.c by
 * tools/iq_grid_gen.mjs.  Entry i of a grid is a word whose byte j (from the
 * least significant end, i.e. memory order on little-endian) is value j of
 * the entry: unsigned magnitudes for the IQ2/IQ3 grids, int8 -1/0/1 for
 * kern_iq1s_grid. */
#ifndef MOEFLEET_KERN_IQ_GRID_H
#define MOEFLEET_KERN_IQ_GRID_H

#include <stdint.h>

extern const uint64_t kern_iq2xxs_grid[256];
extern const uint64_t kern_iq2xs_grid[512];
extern const uint64_t kern_iq2s_grid[1024];
extern const uint32_t kern_iq3xxs_grid[256];
extern const uint32_t kern_iq3s_grid[512];
extern const uint64_t kern_iq1s_grid[2048];

/* 7-bit sign index -> 8 sign bits (bit j set: value j negated; bit 7 makes
 * the number of negated values even), GGML's ksigns_iq2xs. */
extern const uint8_t kern_iq_ksigns[128];
/* The same signs one byte per value: 0xff = negate, 0x01 = keep. */
extern const uint64_t kern_iq_sign8[128];

#endif
