/* balance: live expert rebalancing policy -- pure functions, no I/O or threads.
 *
 * Three parts:
 *
 * 1. struct balance_counts: a decayed per (layer, expert) router load.  Feed
 *    it the top-k expert ids of every MoE layer of every step
 *    (balance_counts_add); before adding, the layer's loads are multiplied by
 *    exp(-n_rows / window_tokens), i.e. every token ages the history by
 *    exp(-1 / window), so a steady stream of r hits per token settles at about
 *    r * window and a burst fades by 1/e every window tokens.  Deterministic:
 *    the same calls give bit-identical loads.
 *
 * 2. Policies (struct balance_policy, looked up by name) turning a
 *    struct balance_input into a new placement (placement.h).  Work and time
 *    follow placement.h: work(L, e) = load(L, e) * bytes(L), a replica of an
 *    expert with n holders carries work / n, a worker's time in a layer is
 *    its work there / speed.  Layers run one after another (every MoE layer is
 *    a barrier), so the predicted step time is the sum over routed layers of
 *    the slowest worker's time in that layer; policies balance each layer and
 *    the per-worker totals follow.
 *      "eplb"    DeepSeek's EPLB per layer: start every expert at
 *                min_replicas, hand out the layer's extra replica budget one
 *                at a time to the expert with the largest load per replica
 *                (capped at max_replicas), then pack the replicas (weight =
 *                load / replicas) largest first onto the worker with the least
 *                load in that layer that has room (memory budget, slot cap,
 *                not already holding that expert).  Ties: least total time,
 *                then lowest worker index.
 *      "hetero"  the same replication, but packing minimises the worker's
 *                finish time in the layer, (layer work + weight) / speed, so a
 *                2x faster worker takes about 2x the load.
 *      "migrate" starts from in->current and greedily applies the single
 *                action (move a replica off a layer's slowest worker, or add a
 *                replica of one of its experts elsewhere) that most reduces
 *                that layer's max time (ties: the spread, sum of squared
 *                times), while the bytes moved stay within max_move_bytes;
 *                the "hetero" plan replaces the result if it is better and
 *                fits the byte budget.  If the step time does not improve by
 *                more than threshold * current step time, the current holders
 *                are returned unchanged (0 bytes moved).  With current == NULL
 *                it is "hetero".  The bytes moved are
 *                balance_moved_bytes(current, out, model).  It never drops a
 *                replica and cannot swap experts between full workers.
 *    Replica budget per routed layer: with slots_per_worker > 0 the layer has
 *    n_worker * slots_per_worker replica slots and no worker holds more than
 *    slots_per_worker replicas of one layer; otherwise the layer has
 *    n_expert * min_replicas + extra_replicas replicas and only memory
 *    limits a worker.  Budget left once every expert has max_replicas stays
 *    unused.  Memory budgets are hard limits: a replica that fits nowhere is
 *    ERR_CONFIG (the greedy packer may miss a packing on near-full memory).
 *    The output's n_replica is max_replicas, holders packed, primary first.
 *    Every plan passes placement_validate().  Deterministic.
 *
 * 3. balance_choose_replica(): per-row choice among an expert's holders.
 *
 * Errors: ERR_CONFIG for invalid input (reason logged), ERR_RANGE for an
 * expert id out of range, ERR_NOMEM on allocation failure. */
#ifndef MOEFLEET_BALANCE_H
#define MOEFLEET_BALANCE_H

#include <stdint.h>

#include "placement.h"

/* ---- decayed router counts ---------------------------------------------- */

struct balance_counts;

/* A zeroed counter for n_layer x n_expert; window_tokens > 0 (INFINITY = no
 * decay).  *out is NULL on failure. */
int balance_counts_new(int n_layer, int n_expert, double window_tokens,
		       struct balance_counts **out);

/* Frees *c and sets it to NULL; NULL is fine. */
void balance_counts_destroy(struct balance_counts **c);

/* One MoE layer of one step: ids[n_rows * k] are the top-k expert ids of each
 * row.  Decays the layer by exp(-n_rows / window), then adds 1 per id.
 * ERR_CONFIG for a bad layer / n_rows / k, ERR_RANGE for an id out of
 * [0, n_expert) other than -1, an empty slot that is not counted (the counts
 * are then unchanged). */
int balance_counts_add(struct balance_counts *c, int layer, const int32_t *ids, int n_rows, int k);

/* The decayed loads, [n_layer][n_expert], valid until the next add/destroy. */
const double *balance_counts_load(const struct balance_counts *c);

/* ---- prediction ---------------------------------------------------------- */

struct balance_stats {
	double max_time;  /* max over workers of total work / speed */
	double mean_time; /* mean over workers of total work / speed */
	double imbalance; /* max_time / mean_time (1 = perfect; 1 if mean is 0) */
	double step_time; /* sum over routed layers of the slowest worker's time there */
};

/* Predicts the worker times of placement p under load (NULL = m->load; both
 * NULL = uniform 1), rows of an expert spread evenly over its holders.
 * ERR_CONFIG if p does not match m / workers (placement_validate). */
int balance_predict(const placement *p, const struct placement_model *m,
		    const struct placement_worker *workers, const double *load,
		    struct balance_stats *out);

/* Bytes of expert replicas held in new_p but not in old_p (old_p NULL = all
 * of new_p).  Shapes must agree in n_layer / n_expert (else UINT64_MAX). */
uint64_t balance_moved_bytes(const placement *old_p, const placement *new_p,
			     const struct placement_model *m);

/* ---- policies ------------------------------------------------------------ */

struct balance_input {
	const struct placement_model *model;	/* load = decayed counts (NULL = uniform) */
	const struct placement_worker *workers; /* [n_worker] */
	int n_worker;
	const placement *current; /* may be NULL; validated when given */
	int min_replicas;	  /* >= 1 replicas of every expert */
	int max_replicas;	  /* <= n_worker; holder slots of the output */
	int slots_per_worker;	  /* > 0: replica slots per worker per layer (see above) */
	int extra_replicas;	  /* slots_per_worker == 0: extra replicas per layer */
	double threshold;	  /* migrate: minimum relative step-time gain, >= 0 */
	uint64_t max_move_bytes;  /* migrate: byte budget of one rebalance */
};

struct balance_policy {
	const char *name;
	/* On success *out owns a new placement (placement_free); zeroed on failure. */
	int (*plan)(const struct balance_input *in, placement *out);
};

/* The policy called name ("eplb", "hetero", "migrate"), or NULL. */
const struct balance_policy *balance_policy_find(const char *name);

/* ---- per-row replica choice ---------------------------------------------- */

/* Relative tolerance for preferring a worker the row already visits. */
#define BALANCE_VISIT_TOLERANCE 0.05

/* The holder of (layer, expert) that should compute one row: the holder with
 * the least worker_finish[w] (predicted finish time of w's queue; NULL = all
 * equal), except that a holder the row already visits (row_visits[w] != 0;
 * NULL = none) wins when its finish time is within
 * BALANCE_VISIT_TOLERANCE * best + 1e-12 of the best (saving a transfer).
 * Ties: earlier replica.  -1 if the expert has no holder. */
int balance_choose_replica(const placement *p, int layer, int expert, const double *worker_finish,
			   const uint8_t *row_visits);

#endif
