/* shard: a set of routed experts held in memory, and their computation.
 *
 * A shard holds some (layer, expert) pairs of a model: pointers to each
 * expert's gate, up and down weights (kept as stored: MXFP4, Q4_0, Q8_0, F16,
 * BF16 or F32) and optional biases, either inside an mmapped GGUF
 * (shard_add_from_gguf: only those bytes are ever read) or in buffers received
 * from the coordinator (shard_add_expert; the caller keeps them alive).  All
 * experts of a layer share their three weight types.
 *
 * shard_compute() takes a batch of token rows of one layer and computes each
 * (row, slot) expert output already multiplied by its routing weight:
 *   out[(r * k + s) * n_embd + i] = w[r*k+s] * expert_{ids[r*k+s]}(x[r])[i]
 * Items are grouped per expert (in row order) so each expert's weights are
 * read once per call; every output equals what a batch of one row gives.
 * Rows may arrive as F32, or already converted to the activation type the
 * expert weights use (Q8_0 for quantised experts, as sent on the wire): the
 * result is bit-identical either way, because conversion is deterministic.
 * Slots whose id is negative are skipped and their output left untouched;
 * an id this shard does not hold is an error (ERR_RANGE). */
#ifndef MOEFLEET_SHARD_H
#define MOEFLEET_SHARD_H

#include "gguf.h"
#include "moe.h"
#include "pool.h"

enum { SHARD_GATE = 0, SHARD_UP = 1, SHARD_DOWN = 2 };

/* One expert's tensors: weights[t] of type types[t] (rows of the expert's
 * slice of the 3-D tensor, packed), biases[t] F32 or NULL. */
struct shard_expert_src {
	const void *weights[3];
	uint32_t types[3];
	const float *biases[3];
};

typedef struct shard shard;

int shard_new(const struct moe_spec *spec, shard **out);
void shard_destroy(shard **s);
const struct moe_spec *shard_spec(const shard *s);

/* Validates the expert's tensors in g against the spec and adds it. */
int shard_add_from_gguf(shard *s, const gguf *g, int layer, int expert);
/* The same from a file whose expert tensors of `layer` hold n_slots experts
 * (a per-node shard file, common/shardfile.h), the expert being the slot-th. */
int shard_add_from_gguf_slot(shard *s, const gguf *g, int layer, int expert, int slot, int n_slots);
/* Adds every expert of every MoE layer of g. */
int shard_add_all_from_gguf(shard *s, const gguf *g);
int shard_add_expert(shard *s, int layer, int expert, const struct shard_expert_src *src);
int shard_has(const shard *s, int layer, int expert);
int shard_n_experts(const shard *s);
/* Bytes of an expert's three weight matrices of the given types. */
size_t shard_expert_bytes(const struct moe_spec *spec, const uint32_t types[3]);
/* The activation type rows should be sent in for a layer (the gate weights'). */
uint32_t shard_act_type(const shard *s, int layer);

/* x: n_rows rows of n_embd values of x_type (KERN_F32, or the layer's
 * activation type); ids, w: n_rows x k; out: n_rows x k x n_embd floats. */
int shard_compute(shard *s, pool *p, int layer, int n_rows, int k, const void *x, uint32_t x_type,
		  const int32_t *ids, const float *w, float *out);

#endif
