/* footprint: what a cluster needs to run a GGUF model -- pure arithmetic.
 *
 * footprint_measure() reads a GGUF's tensor table and hyper-parameters (no
 * tensor data) and splits the file's bytes into
 *   - routed experts (tensors named blk.L.ffn_*_exps.*), per layer: what the
 *     workers hold, and
 *   - everything else: what the coordinator maps and reads (embedding,
 *     attention, router, shared experts, output head),
 * and computes the KV cache of one sequence as moefleet allocates it (F16):
 *   qwen3moe, gpt-oss   n_layer * n_head_kv * (key_length + value_length) * 2 B
 *                       per token, except gpt-oss's sliding-window layers
 *                       (attention.sliding_window_pattern, see arch.h): each
 *                       keeps a ring of sliding_window + n_batch positions
 *                       (at most the context), the same bytes per position;
 *   deepseek2 (MLA)     n_layer * (kv_lora_rank + n_rot  +  kv_lora_rank) * 2 B
 *                       per token (key [c | k_pe] and value c);
 *   deepseek4           per layer with compression ratio r > 0 a compressed
 *                       cache of key_length per r tokens, plus for r = 4 the
 *                       indexer keys (indexer.key_length per 4 tokens), 2 B
 *                       each; fixed per sequence: every layer's window ring
 *                       (sliding_window x key_length x 2 B) and the F32
 *                       compressor states (r = 4: 2 x 8 x 2*key_length and
 *                       2 x 8 x 2*indexer.key_length floats; r = 128:
 *                       2 x 128 x key_length floats).
 * The coordinator also builds, in memory, deepseek2's attn_k_b from a legacy
 * attn_kv_b (files without attention.key_length_mla): per layer n_head x
 * kv_lora_rank rows of nope (= key_length - rope.dimension_count) values, F32,
 * F16 or BF16 when attn_kv_b is, otherwise Q8_0 (F16 if nope is not a multiple
 * of 32), as coordinator/model/arch_deepseek2.c does.
 * footprint_place() runs the placement function (placement.h) on the routed
 * experts for a list of worker memory budgets and returns each worker's bytes.
 * footprint_parse_memory() reads "64G,64G,32G" (suffixes K, M, G, T: powers
 * of 1024; none: bytes). */
#ifndef MOEFLEET_FOOTPRINT_H
#define MOEFLEET_FOOTPRINT_H

#include <stdint.h>

#include "../../common/gguf.h"
#include "../../common/moe.h"

#define FOOTPRINT_MAX_WORKERS 1024

struct footprint {
	char arch[64];
	int n_layer;
	int n_expert; /* routed experts per layer (0: none) */
	int n_expert_used;
	uint64_t file_bytes;
	uint64_t coordinator_bytes;	  /* every tensor but the routed experts */
	uint64_t coordinator_built_bytes; /* built at load on top of the file (see above) */
	uint64_t expert_bytes;		  /* all routed experts */
	uint64_t layer_expert_bytes[MOE_MAX_LAYERS]; /* all routed experts of layer L */
	uint64_t kv_bytes_per_1k;		     /* one sequence, per 1024 tokens of context */
	uint64_t kv_bytes_fixed;		     /* one sequence, independent of context */
	uint64_t kv_ring_bytes_per_pos; /* one sequence, per position of all window rings */
	uint64_t kv_ring_window;	/* the rings hold window + n_batch positions, <= n_ctx */
	int kv_known;			/* 0: architecture's cache layout unknown */
};

int footprint_measure(const gguf *g, struct footprint *out);

/* The KV cache of one sequence of n_ctx positions run in micro-batches of
 * n_batch tokens (which sizes the window rings), in bytes. */
uint64_t footprint_kv_bytes(const struct footprint *f, int n_ctx, int n_batch);

/* Places the routed experts on n_worker workers with the given memory budgets
 * (uniform router load, one replica); worker_bytes[n_worker] receives the
 * bytes each one holds.  ERR_CONFIG (logged) when they do not fit. */
int footprint_place(const struct footprint *f, const uint64_t *mem, int n_worker,
		    uint64_t *worker_bytes);

/* "64G,64G" -> mem[0..*n); at most max entries, each > 0. */
int footprint_parse_memory(const char *list, uint64_t *mem, int max, int *n);

/* Bytes of a node's memory kept for buffers, the system and the program
 * itself when planning. */
#define FOOTPRINT_ROOM (512ull << 20)

/* A cluster to plan for: every node (coordinator and workers) has
 * node_memory bytes (0: no plan), the coordinator holds one sequence of
 * n_ctx tokens (<= 0: 4096) run in micro-batches of n_batch tokens (<= 0:
 * model_params_default's). */
struct footprint_plan {
	uint64_t node_memory;
	int n_ctx;
	int n_batch;
	int kv_shards; /* > 0: also plan the attention's pages on KV hosts */
	int kv_page;   /* positions per page (<= 0: model_params_default's) */
};

/* The plan of a sequence whose complete KV pages live on KV hosts
 * (--kv-shards V --kv-page P), as the coordinator lays them out: per layer
 * with a whole-context cache (not deepseek4's, nor a sliding-window ring)
 * n_pages = (n_ctx - 1) / P complete pages, page i on chain i mod V, the
 * chains split evenly over n_hosts hosts, the largest power of two not above
 * min(workers, V) (cluster_kv_hosts).  The coordinator keeps each layer's
 * page in progress and the positions of a batch not yet shipped (P + n_batch
 * positions, at most the context), the rings and the fixed state.  Hosts
 * offer for pages what their experts leave (moefleet-worker's default).
 * n_worker: the worker nodes, each of node_memory - FOOTPRINT_ROOM (< 1: the
 * fewest that hold the experts and the pages); worker_bytes[] then holds the
 * experts each one gets.  ERR_CONFIG when the architecture keeps no pages on
 * hosts (deepseek4, unknown layouts), ERR_RANGE when no number of nodes up to
 * FOOTPRINT_MAX_WORKERS holds them. */
struct footprint_kv_hosts {
	int n_pages;	       /* complete pages per layer */
	uint64_t page_bytes;   /* one page of every whole-context layer */
	uint64_t coord_kv;     /* the coordinator's KV */
	int n_worker, n_hosts; /* worker nodes; the first n_hosts are hosts */
	uint64_t host_kv[64];  /* pages of host h, bytes (at most 64 chains) */
	uint64_t worker_bytes[FOOTPRINT_MAX_WORKERS];
};
int footprint_plan_kv_hosts(const struct footprint *f, const struct footprint_plan *plan,
			    int n_worker, struct footprint_kv_hosts *out);

/* Prints the cluster summary of `moefleet info` to stdout: coordinator and
 * expert bytes, experts per layer, KV per 1K tokens (and for the plan's n_ctx,
 * when it is > 0) and, when n_worker > 0,
 * the placement's bytes per worker (mem NULL: no memory limit).  With a plan
 * (node_memory > 0), per node instead: the coordinator's weights + KV, each
 * worker's experts (placed on node_memory - FOOTPRINT_ROOM each, or less
 * where mem says so), whether each fits, and how many worker nodes of that
 * size the experts need at least; with plan->kv_shards, then the plan of
 * footprint_plan_kv_hosts(). */
int footprint_report(const gguf *g, const uint64_t *mem, int n_worker,
		     const struct footprint_plan *plan);

#endif
