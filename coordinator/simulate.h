/* simulate: replaying a routing trace against a cluster description and
 * placement policies, offline (`moefleet placement simulate`).
 *
 * The cluster is a text file, one worker per line (# starts a comment):
 *   NAME  SPEED  MEMORY_BYTES  LATENCY_US  BANDWIDTH_MB_S
 * SPEED is expert-rows per second (calibrate it from a real run's --stats:
 * items / compute seconds; --stats prints a whole calibrated file).  An
 * optional line `@coordinator A B` adds the coordinator's own time per step,
 * A + B * tokens microseconds (attention, router, output).  Cost model, per MoE layer of a step: every
 * worker that receives rows costs latency + (rows * Q8_0 row bytes + items *
 * n_embd * 4) / bandwidth + items / speed; the layer takes as long as its
 * slowest worker; a step is the sum of its layers.  Rows are routed to the
 * replica with the least predicted finish (balance_choose_replica).
 *
 * Policies: "static" (the initial placement, never changed) or a balance
 * policy ("eplb", "hetero", "migrate") applied every `rebalance_every` steps
 * to the decayed counts seen so far.  For each policy the report gives the
 * max/mean worker load, bytes on the wire and messages per token, the mean
 * predicted step time and the bytes migrated. */
#ifndef MOEFLEET_SIMULATE_H
#define MOEFLEET_SIMULATE_H

#include <stdio.h>

struct simulate_config {
	const char *trace_path;
	const char *workers_path;
	const char *policy;   /* one name */
	int replicas;	      /* >= 1 */
	int rebalance_every;  /* steps; 0 = only once, after the first step */
	double window_tokens; /* decay of the counts */
	double threshold;     /* migrate */
	unsigned long long max_move_bytes; /* migrate; 0 = unbounded */
};

/* Runs one policy and prints its report line to out. */
int simulate_run(const struct simulate_config *cfg, FILE *out);

#endif
