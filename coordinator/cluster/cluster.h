/* cluster: routed experts computed by worker processes, as an expert backend.
 *
 * cluster_new() waits (up to cfg->join_timeout_ms) for cfg->n_workers workers
 * to say Hello over the transport, refuses the ones that speak another
 * protocol version (and fails when one has a per-node shard file made from
 * another model), places the model's experts on them with placement_build()
 * (by memory and speed, cfg->replicas copies of each, preferring for each
 * expert a worker whose shard file holds it; a KV-only worker, whose Hello
 * offers no memory for experts, gets none, and fewer than cfg->replicas
 * workers with memory for experts is an ERR_CONFIG: the coordinator computes
 * no routed experts itself), sends each its Assign, streams
 * the weights of every assigned expert a worker's file does not hold (all of
 * them to a worker without a file, or to all when cfg->stream is set), and
 * waits for every Ready, logging progress.  Later epochs stream by the same
 * rule.
 *
 * As a backend, one layer's job is split by the holder of each chosen expert:
 * every worker receives, at once, only the rows it needs (activations as
 * cfg->wire_dtype: Q8_0 by default for quantised experts, which is what the
 * kernels convert to anyway, so results are unchanged) and returns one F32
 * vector per (row, slot) it computed; these land in the job's per-slot output,
 * which the forward pass sums in slot order -- so logits are bit-identical to
 * the in-process backend.
 *
 * Failover.  A worker is lost when it sends something malformed, oversized or
 * out of order, answers Error, cannot be sent to, is found disconnected by a
 * probe (a Heartbeat sent every 100 ms to a worker that has not answered its
 * Batch yet: a send to a closed connection fails at once), or does not
 * answer within cfg->timeout_ms.  Its unanswered rows are sent again to
 * other holders of the same experts and the job completes with the same
 * results (an expert computes the same wherever it runs; slots are summed in
 * order by the forward pass).  Everything it sends later comes from an
 * unknown peer: it is ignored and answered with Shutdown(rejoin).  Its
 * replicas are re-created on the live workers as a new placement epoch (the
 * live re-placement machinery below; from the workers' model files or
 * streamed); when an expert has no live holder left (R = 1), the job waits
 * for that epoch (at most cfg->join_timeout_ms), and when no survivor has the
 * memory for it, the jobs that route to it fail with ERR_PEER and a logged
 * reason while the others are served.  A worker that says Hello after
 * start-up takes the place of a lost one (the cluster never grows beyond
 * cfg->n_workers) and gets a share of the experts in the next epoch.
 * Re-planning by the balance policy pauses while a worker is missing.
 *
 * Live re-placement (cfg->rebalance): every rebalance_every forward steps the
 * policy plans a new placement from the decayed router counts; each worker is
 * sent an Assign of the next epoch listing all experts it will hold, adds the
 * ones it lacks (from its own model file, or streamed by the coordinator in
 * chunks sent between two forward steps, a byte budget per step adapted so
 * that the median loading step stays within about 15% of the median quiet
 * one, yet large enough to load the placement within 64 steps) while it
 * keeps serving, and answers Ready.  The old
 * placement stays in force until every worker is ready; the switch happens
 * between two forward steps, after which every worker gets a Release of the
 * experts it no longer needs and frees them.  Epoch numbers only grow; a
 * placement still loading is superseded by a repair when a worker is lost.  No result changes,
 * because an expert's output is the same wherever it is computed.  The initial placement uses the
 * speeds the workers measured before Hello. */
#ifndef MOEFLEET_CLUSTER_H
#define MOEFLEET_CLUSTER_H

#include <stdint.h>
#include <stdio.h>

#include "../../common/gguf.h"
#include "../../common/moe.h"
#include "../../common/pool.h"
#include "../../common/transport.h"
#include "../model/attn.h"
#include "../model/experts.h"
#include "../placement/placement.h"

struct cluster_config {
	const gguf *g;
	const struct moe_spec *spec;
	int n_workers;
	int replicas;			   /* copies of each expert, >= 1 */
	int timeout_ms;			   /* per job */
	int join_timeout_ms;		   /* for all workers to join and load */
	uint32_t wire_dtype;		   /* KERN_Q8_0, KERN_BF16, KERN_F32; 0 = automatic */
	int stream;			   /* stream weights even to workers with a model copy */
	double balance_window;		   /* tokens over which router counts decay; 0 = 4096 */
	const char *rebalance;		   /* balance policy for live re-placement, NULL = static */
	int rebalance_every;		   /* forward steps between re-plans (0 = 16) */
	double rebalance_threshold;	   /* minimum predicted step-time gain (migrate) */
	unsigned long long max_move_bytes; /* per re-plan; 0 = 64 MiB */
};

struct cluster_worker_stats {
	uint64_t rebalances; /* placements switched to (same for every worker) */
	char name[256];
	uint64_t batches, rows, items, bytes_sent, bytes_received;
	double compute_seconds, wait_seconds; /* compute: of expert batches */
	int lost;
	double speed;	       /* expert rows/s used for planning (Hello calibration or measured) */
	uint32_t held_experts; /* as last reported by the worker (Ready) */
	uint64_t held_bytes;
	uint64_t streamed_bytes; /* expert bytes streamed to it */
	uint64_t kv_pages;	 /* KV pages shipped to it (a KV host) */
	uint64_t kv_bytes;	 /* and their bytes */
	uint64_t kv_batches;	 /* attention batches it answered or was sent */
	uint64_t attn_rows;	 /* rows of the attention batches it answered */
	double attn_seconds;	 /* and the compute time it reported for them */
	/* as the worker last reported (its Stats, asked by cluster_print_stats):
	 * the KV pages it holds and their bytes; kv_reported 0: never asked */
	int kv_reported;
	uint64_t kv_pages_held, kv_bytes_held;
};

/* One placement epoch that was in force: its forward steps and how evenly
 * the workers' compute time was spread (max / mean over live workers of the
 * compute seconds they reported during the epoch). */
struct cluster_epoch_stats {
	uint64_t epoch;
	uint64_t steps;
	double compute_max, compute_mean; /* seconds per step */
	double imbalance;		  /* compute_max / compute_mean (1 if idle) */
};

typedef struct cluster cluster;

/* The cluster takes ownership of the transport. */
int cluster_new(transport *t, const struct cluster_config *cfg, pool *p, cluster **out);
/* An expert backend over the cluster (the backend owns the cluster). */
int cluster_backend(cluster *c, expert_backend **out);
int cluster_n_workers(const cluster *c);
/* The placement in force (valid while the cluster lives). */
const placement *cluster_placement(const cluster *c);
void cluster_get_stats(const cluster *c, int worker, struct cluster_worker_stats *out);
/* Epochs that ended, plus the one in force (the last); n <= cluster_n_epochs. */
int cluster_n_epochs(const cluster *c);
void cluster_get_epoch(const cluster *c, int i, struct cluster_epoch_stats *out);
/* Forward-step wall times: the median over all steps, the worst step while a
 * re-placement was loading (0 if none) and the number of steps. */
void cluster_step_times(const cluster *c, double *median_ms, double *worst_moving_ms,
			uint64_t *n_steps);
/* Prints per-worker statistics to stderr (first waiting briefly for the
 * workers' answers to outstanding Releases, and for the Stats of the KV
 * hosts; between jobs only): epochs, step
 * times (per size; loading steps against the quiet steps of the same
 * placement), a calibrated cluster file for `placement simulate` (with
 * `@cores N` when the workers are local) and the metrics. */
void cluster_print_stats(cluster *c);
/* Writes the cluster's metrics to f in the Prometheus text format (0.0.4):
 * per worker (label worker="i", name="...") rows, items, compute and wait
 * seconds, bytes sent / received / streamed, experts and bytes held, speed,
 * decayed load and up; balancedness (mean / max of load / speed, 1 = even),
 * the measured max/mean compute of the epoch in force, placement epoch,
 * re-placements switched, bytes migrated, steps and the median step time;
 * with per_expert, the decayed load of every (layer, expert).  Reads state
 * the forward pass changes: call it from the thread that drives the model, or
 * under the lock that serialises forward passes.  ERR_IO if f failed. */
int cluster_metrics_write(FILE *f, const cluster *c, int per_expert);
/* The cluster's workers as KV hosts of the sharded attention over n_shard
 * chains (attn_cache_set_remote): the first live workers that offer KV memory
 * in their Hello, KV-only ones (Hello.memory_bytes 0) first, as many as the
 * largest power of two that divides n_shard and is at most `want` (<= 0: no
 * limit).  *ops with self = c.  ERR_CONFIG when no live worker offers KV
 * memory.  Called again after a host was lost, it gives the chains to the
 * hosts left. */
int cluster_kv_hosts(cluster *c, int n_shard, int want, const struct attn_remote_ops **ops,
		     int *n_hosts);
/* 1 when a KV host was lost since the last cluster_kv_hosts(): its pages are
 * gone, and the sequences must be computed again on the hosts left. */
int cluster_kv_lost(const cluster *c);
/* The first KV host whose worker is lost (its index, *worker its worker), or
 * -1 when every host lives. */
int cluster_kv_lost_host(const cluster *c, int *worker);
/* Sends Shutdown to every live worker and frees everything. */
void cluster_destroy(cluster **c);

#endif
