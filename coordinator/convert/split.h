/* split: per-node shard files of a model's routed experts
 * (`moefleet split-experts`).
 *
 * split_experts() opens MODEL (a plain GGUF, or the first shard of a
 * gguf-split set), places its routed experts on n_worker workers exactly as
 * a coordinator would for workers with those memory budgets and speeds
 * (placement_build, uniform router load, `replicas` copies), and writes one
 * per-node shard file (common/shardfile.h) per worker:
 *   DIR/BASE-wK-of-N.gguf    K = 1..N
 * where BASE is MODEL's file name without ".gguf" and without a gguf-split
 * "-0000i-of-0000n" suffix.  Each holds all of MODEL's metadata (its split.*
 * keys left out) plus the moefleet.shard.* keys, and only the expert tensors'
 * slices of the experts placed on worker K, copied from the mapping tensor by
 * tensor (memory stays bounded whatever the model's size).  Every file is
 * written as PATH.tmp and renamed when complete; DIR is created if missing.
 * A worker started with `-m` on file K advertises its experts in Hello, and
 * a coordinator with N such workers places each expert on the worker whose
 * file holds it, so nothing is streamed.
 *
 * Errors (logged, naming the file): ERR_FORMAT for a model without routed
 * experts or already a shard file, ERR_CONFIG for a worker count out of
 * range (1..FOOTPRINT_MAX_WORKERS, at most the number of routed experts)
 * or a placement that does not fit the budgets, ERR_IO for an unwritable
 * DIR. */
#ifndef MOEFLEET_SPLIT_H
#define MOEFLEET_SPLIT_H

#include <stddef.h>

#include "../placement/placement.h"

int split_experts(const char *model, const struct placement_worker *workers, int n_worker,
		  int replicas, const char *dir);

/* DIR/BASE-wK-of-N.gguf for MODEL into buf (K from 1); ERR_RANGE if too long. */
int split_path(const char *model, const char *dir, int k, int n, char *buf, size_t cap);

#endif
