/* shard: a set of routed experts held in memory, and their computation.
 *
 * A shard points at expert weights inside an mmapped GGUF (kept as stored:
 * MXFP4, Q4_0, Q8_0, F16, BF16 or F32) and computes, for a batch of token rows
 * of one layer, each (row, slot) expert output already multiplied by its
 * routing weight:
 *   out[(r * k + s) * n_embd + i] = w[r*k+s] * expert_{ids[r*k+s]}(x[r])[i]
 * Rows are grouped per expert so each expert's weights are read once per call.
 * The same code runs in-process (coordinator/experts.c) and in worker
 * processes, so an expert's output is bit-identical wherever it is computed.
 * Slots whose id is negative are skipped and their output is left untouched
 * (another shard computes them). */
#ifndef MOEFLEET_SHARD_H
#define MOEFLEET_SHARD_H

#include "../common/gguf.h"
#include "../common/moe.h"
#include "../common/pool.h"

typedef struct shard shard;

/* Validates every expert tensor of spec's MoE layers against the spec. */
int shard_new(const gguf *g, const struct moe_spec *spec, shard **out);
void shard_destroy(shard **s);

/* x: n_rows x n_embd floats; ids, w: n_rows x k; out: n_rows x k x n_embd.
 * Returns ERR_RANGE for an out-of-range layer or expert id. */
int shard_compute(shard *s, pool *p, int layer, int n_rows, int k, const float *x,
		  const int32_t *ids, const float *w, float *out);

#endif
