/* placement: which worker holds which routed expert -- a pure function.
 *
 * Input: the model's expert table (struct placement_model: per layer whether
 * it has routed experts and the bytes of one expert, plus optional router
 * load weights per (layer, expert)) and the workers (struct placement_worker:
 * memory budget and measured speed), and a replica count R.  Output: a
 * `placement` value giving, for every (layer, expert) of a routed layer, its
 * holders -- R distinct worker indices, primary first -- and per worker the
 * bytes it must hold and its predicted load.  Nothing here does I/O or keeps
 * state: the same input always gives the same placement, so the coordinator
 * can compute it, send it to workers and replace it between forward steps.
 *
 * Algorithm (greedy LPT, "longest processing time first"):
 *   work(L, e)   = load(L, e) * bytes(L)        (expected rows x weight bytes)
 *   items        = every (L, e) of a routed layer, sorted by work descending,
 *                  then bytes descending, then (L, e) ascending (with held
 *                  sets, see below, the experts in some file first)
 *   for each item, for each replica r = 0..R-1:
 *     candidates = workers not yet holding the item with room for bytes(L);
 *                  if some of them have the item in their own file (held),
 *                  only those
 *     pick the one with the least predicted finish time
 *                  (worker_load + work / R) / speed,
 *     ties -> least memory fraction (worker_bytes + bytes) / mem,
 *     ties -> lowest worker index
 *     worker_load += work / R;  worker_bytes += bytes(L)
 * Memory budgets are hard limits; time is balanced within them (with ample
 * memory a worker's share of the load follows its speed; a worker with a
 * tight budget simply fills up).  The predicted load assumes rows of a
 * replicated expert are spread evenly over its holders.  Being greedy, it may
 * fail on near-full memory with mixed expert sizes even though a packing
 * exists; that is reported like any other misfit.
 *
 * Held sets (placement_worker.held) describe per-node shard files: the
 * experts some file holds are placed first (then the others, each group in
 * the order above), and an expert goes to a worker whose file holds it
 * whenever one has room, only otherwise to the least busy worker, which must
 * then receive its bytes.
 * When the files partition the experts and every worker has room for its
 * file (the files `moefleet split-experts` makes for this many workers and
 * replicas), the placement is exactly the files' assignment, whatever the
 * speeds.  With every held NULL the result is the plain LPT placement.
 *
 * Errors (ERR_CONFIG, reason logged): no workers, R < 1 or R > n_worker,
 * invalid sizes (no routed layer, n_expert < 1, zero bytes, speed <= 0,
 * negative or non-finite load), experts x R exceeding the total memory, or an
 * expert that fits on no remaining worker.  ERR_NOMEM if allocation fails.
 *
 * The struct's fields are public for reading and for a wire decoder to fill;
 * such an externally received placement must pass placement_validate() before
 * use.  Holder lists are packed: entries after the last holder are -1. */
#ifndef MOEFLEET_PLACEMENT_H
#define MOEFLEET_PLACEMENT_H

#include <stdint.h>

struct placement_model {
	int n_layer;
	int n_expert;		      /* experts per routed layer */
	const uint8_t *layer_moe;     /* [n_layer] 1 if layer L has routed experts */
	const uint64_t *expert_bytes; /* [n_layer] bytes of one expert of layer L */
	const double *load;	      /* [n_layer][n_expert] router counts; NULL = uniform 1 */
};

struct placement_worker {
	uint64_t mem_bytes;  /* memory budget for expert weights */
	double speed;	     /* expert-rows per second (relative is fine), > 0 */
	const uint8_t *held; /* [n_layer][n_expert] 1 = its own file holds the expert;
				NULL = no preference (e.g. it has the whole model) */
};

typedef struct placement {
	int n_layer;
	int n_expert;
	int n_replica; /* R: holder slots per expert */
	int n_worker;
	int32_t *holder;	/* [n_layer][n_expert][n_replica]; -1 = none; primary first */
	uint64_t *worker_bytes; /* [n_worker] expert bytes each worker holds */
	double *worker_load; /* [n_worker] predicted load (sum of work / R); time = load / speed */
} placement;

/* Computes a placement of m's routed experts over workers[0..n_worker) with
 * n_replica copies each.  On success *out owns its arrays (placement_free);
 * on failure *out is zeroed. */
int placement_build(const struct placement_model *m, const struct placement_worker *workers,
		    int n_worker, int n_replica, placement *out);

/* Frees p's arrays and zeroes it; a zeroed placement may be freed again. */
void placement_free(placement *p);
/* Checks a model table (sizes, routed layers, expert bytes, finite loads);
 * ERR_CONFIG with a logged reason. */
int placement_check_model(const struct placement_model *m);

/* Deep copy of src into *out (zeroed on failure). */
int placement_copy(const placement *src, placement *out);

/* The worker index of holder `replica` (0 = primary) of (layer, expert), or
 * -1 if there is none or an argument is out of range. */
int placement_holder(const placement *p, int layer, int expert, int replica);

/* How many holders (layer, expert) has (0 for a layer without routed experts
 * or out-of-range arguments). */
int placement_n_holders(const placement *p, int layer, int expert);

/* 1 if `worker` holds (layer, expert), else 0. */
int placement_holds(const placement *p, int worker, int layer, int expert);

/* The worker that should compute a row of (layer, expert).  With
 * worker_busy == NULL: the primary.  Otherwise worker_busy[w] is the caller's
 * predicted finish time of worker w's queue and the least busy holder wins
 * (ties: earlier replica).  -1 if the expert has no holder. */
int placement_choose(const placement *p, int layer, int expert, const double *worker_busy);

/* Checks a placement (e.g. received from a peer) against the model and
 * workers: matching shapes, every routed expert held at least once, holders
 * in range, packed, distinct per expert, none on layers without routed
 * experts, worker_bytes (if non-NULL) consistent, and every worker's bytes
 * within its memory budget.  Returns 0 or ERR_CONFIG with the reason logged. */
int placement_validate(const placement *p, const struct placement_model *m,
		       const struct placement_worker *workers, int n_worker);

#endif
