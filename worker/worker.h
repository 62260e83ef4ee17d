/* worker: the expert-worker side of the moefleet protocol.
 *
 * worker_run() drives one connection to a coordinator until it says Shutdown:
 *
 *   start --send Hello--> WAIT_ASSIGN --Assign--> LOADING --all weights--> send Ready
 *                                                   ^                          |
 *                                                   +---------Assign-----------+
 *   SERVING: Batch -> shard_compute -> Result (+ raw frame of F32 outputs)
 *            Assign (next epoch) -> add the missing experts (from the file, or
 *              from WeightChunks arriving between Batches) -> Ready
 *            Release -> free the listed experts -> Ready (released)
 *            Heartbeat -> Heartbeat (same nonce); Stats -> Stats
 *            KvPage -> keep the page (worker/kvstore.h; an Error beyond the
 *              KV budget, cfg->kv_memory_bytes)
 *            KvFree -> drop every page of the sequence (no answer)
 *            AttnBatch -> attn_host_forward over the pages held ->
 *              AttnResult (+ raw frame of F32 partials); an Error when a row
 *              needs a page that is not here
 *            Shutdown -> return 0 (with cfg->reconnect_ms: forget everything,
 *              say Hello again and wait for the next coordinator)
 *            Shutdown(rejoin) -> forget everything (KV pages too) and say
 *              Hello again: the coordinator dropped this worker as lost (e.g.
 *              it answered too late) or restarted; it may take it back as a
 *              new member
 * KvPage, KvFree and AttnBatch need no Assign: a worker serves them in any state
 * after Hello (a KV host may hold no experts: with cfg->kv_only its Hello
 * offers none, and streamed experts are refused).  Stats counts the Batches
 * and AttnBatches answered and the KV pages held.
 *
 * Reconnecting (cfg->reconnect_ms > 0): while no coordinator has answered,
 * Hello is sent again after 0.25, 0.5, 1, 2, 4, 4, ... seconds (ZeroMQ queues
 * them while disconnected; a coordinator ignores repeats of a member); if
 * none answers within reconnect_ms, worker_run() returns ERR_PEER.  While
 * serving, after 5 s without a message the worker sends a Heartbeat (again
 * every 5 s): a coordinator that restarted does not know it and answers
 * Shutdown(rejoin).
 *
 * Before Hello the worker measures its speed on a synthetic expert (Hello's
 * expert_rows_per_sec; CPU-based, scaled by cfg->slowdown).
 * In LOADING the worker takes each expert from its own copy of the GGUF
 * (cfg->model_path, mmapped: only the assigned experts' bytes are read) or,
 * when the Assign says `stream`, it has no copy or its copy lacks the expert,
 * from WeightChunk messages.  The copy may be a per-node shard file
 * (common/shardfile.h) holding only some experts: Hello then lists them (and
 * names the model the file was made from), so the coordinator streams only
 * the others.
 * A message that breaks the protocol (undecodable, oversized, out of order,
 * a Batch naming experts it does not hold, a frame of the wrong size) is
 * answered with an Error message naming the problem and otherwise ignored; the
 * coordinator decides whether to drop the worker.  worker_run() returns 0 after
 * Shutdown, ERR_PEER when the coordinator is silent longer than
 * cfg->idle_timeout_ms (if > 0), other errors for local failures. */
#ifndef MOEFLEET_WORKER_H
#define MOEFLEET_WORKER_H

#include <stdint.h>

#include "../common/transport.h"

/* Deliberate failures at the first Batch, for fault tests. */
enum worker_fault {
	WORKER_FAULT_NONE = 0,
	WORKER_FAULT_DIE,  /* worker_run returns ERR_PEER at once (the caller exits) */
	WORKER_FAULT_STOP, /* the process stops itself with SIGSTOP */
};

struct worker_config {
	const char *model_path;	  /* NULL: weights must be streamed */
	const struct gguf *model; /* an open model the caller owns (overrides model_path) */
	int n_threads;		  /* <= 0: all cores */
	uint64_t memory_bytes;	  /* offered for experts; 0: the default (worker_budgets) of
				     the node's memory (physical, or the cgroup limit if
				     lower) less 512 MiB */
	const char *name;
	int idle_timeout_ms; /* <= 0: wait forever */
	enum worker_fault fault;
	double slowdown;  /* > 1: take this many times as long per batch (tests, benchmarks) */
	int reconnect_ms; /* > 0: outlive the coordinator (see above); 0: exit at Shutdown */
	int64_t kv_memory_bytes; /* offered for KV pages (Hello.kv_bytes); 0: the default
				    (worker_budgets); < 0: none */
	int kv_only;		 /* hold no experts (Hello.memory_bytes 0), only KV pages */
};

/* The bytes a worker offers for experts and for KV pages out of `node` (its
 * memory or cgroup limit, less a reserve for the program), which never
 * overlap: with neither given (cfg 0), all of node for both, *shared 1: the
 * KV pages take what the experts placed on it leave (the worker lowers its
 * KV budget as experts arrive, the coordinator counts the same); with one
 * given, the other gets the rest of node (0 when nothing is left); both
 * given: as given; kv_only: no experts, and kv_memory_bytes or the whole of
 * node.  A cfg->kv_memory_bytes < 0 offers no KV memory (experts:
 * memory_bytes or node). */
void worker_budgets(const struct worker_config *cfg, uint64_t node, uint64_t *experts, uint64_t *kv,
		    int *shared);

int worker_run(transport *t, const struct worker_config *cfg);

#endif
