/* simulate: replaying a routing trace against a cluster description and
 * placement policies, offline (`moefleet placement simulate`).
 *
 * The cluster is a text file, one worker per line (# starts a comment):
 *   NAME  SPEED  MEMORY_BYTES  LATENCY_US  BANDWIDTH_MB_S  [THREADS [CPU_SHARE]]
 * SPEED is expert-rows per second with THREADS cores to itself (calibrate it
 * from a real run's --stats: items / CPU-based compute seconds; --stats
 * prints a whole calibrated file).  An optional line `@coordinator A B` adds
 * the coordinator's own time per step, A + B * tokens microseconds
 * (attention, router, output).  Cost model, per MoE layer of a step: every
 * worker that receives rows waits latency + (rows * Q8_0 row bytes + items *
 * n_embd * 4) / bandwidth, then computes items / speed; the layer takes as
 * long as its slowest worker; a step is the sum of its layers plus the
 * coordinator's time.  Rows are routed to the replica with the least
 * predicted finish (balance_choose_replica).
 *
 * Shared cores: a line `@cores N [STRETCH [BURST_MS]]` says the workers
 * share N cores (local workers): while the computing workers want more than
 * N (THREADS x CPU_SHARE each; CPU_SHARE < 1 for a worker that also waits
 * on something else), each progresses at N / their total demand (processor
 * sharing).  STRETCH (default 1) models other processes on those cores: a
 * layer's time beyond BURST_MS (default 6) takes STRETCH times as long (the
 * scheduler runs a process that slept at full speed for a while, then gives
 * it its fair share; short steps are not stretched, long ones are).
 *
 * The initial placement is the one the trace recorded (what the measured run
 * had) when it uses exactly the cluster file's workers and the replica count
 * is not overridden; otherwise (or with build_initial) placement_build()
 * places the experts by the file's memory and speeds.
 *
 * Policies: "static" (the initial placement, never changed), "trace" (the
 * placements the trace recorded, switched where the measured run switched)
 * or a balance policy ("eplb", "hetero", "migrate") applied every
 * `rebalance_every` steps to the decayed counts seen so far.  For each policy
 * the report gives the max/mean worker load, bytes on the wire and messages
 * per token, the mean and median predicted step time and the bytes
 * migrated. */
#ifndef MOEFLEET_SIMULATE_H
#define MOEFLEET_SIMULATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct simulate_config {
	const char *trace_path;
	const char *workers_path;
	const char *policy;   /* one name */
	int replicas;	      /* 0: the trace's (or 1) */
	int build_initial;    /* 1: place anew instead of starting from the trace's placement */
	int rebalance_every;  /* steps; 0 = only once, after the first step */
	double window_tokens; /* decay of the counts */
	double threshold;     /* migrate */
	unsigned long long max_move_bytes; /* migrate; 0 = unbounded */
};

/* Steps of one size (tokens): how many, and their median wall time. */
struct simulate_step_size {
	int32_t tokens;
	size_t count;
	double median_ms;
};

/* Groups n steps (tokens[i], ms[i]) by size and writes the (up to) four most
 * frequent sizes, most frequent first, to out[0 .. *n_out): what a run
 * measured and what `placement simulate` predicts per size. */
int simulate_step_sizes(const int32_t *tokens, const double *ms, size_t n,
			struct simulate_step_size out[4], int *n_out);

/* Runs one policy and prints its report line to out. */
int simulate_run(const struct simulate_config *cfg, FILE *out);

/* The workers of a cluster file (the format above) as placement input, in
 * file order: *out (free() it) gets each one's memory budget and speed. */
struct placement_worker;
int simulate_read_cluster(const char *path, struct placement_worker **out, int *n);

#endif
