/* sched: which tokens of which requests go into the next forward step.
 *
 * Pure bookkeeping for continuous batching (no threads, no model): requests
 * wait in a bounded FIFO queue until a sequence slot (a KV cache row of n_ctx
 * positions) is free, then are prefilled in chunks and decoded one token per
 * step until the caller removes them.
 *
 *   sched_add ──> QUEUED ──(free slot, FIFO)──> PREFILL ──(last chunk)──> DECODE
 *                   │                              │                        │
 *                   └────────── sched_remove (finished, cancelled) ─────────┘
 *
 * One step (sched_step) holds at most max_batch tokens:
 *  1. one decode token for every request in DECODE (they always fit: there
 *     are fewer slots than max_batch);
 *  2. then, in admission order, one prefill chunk per request in PREFILL while
 *     the whole chunk fits.  A request's prompt is always cut the same way,
 *     into chunks of exactly `chunk` tokens and a remainder, whatever else the
 *     step holds: a chunk that does not fit waits for the next step instead of
 *     being shortened.  With the engine's guarantee that a sequence's logits
 *     do not depend on the other sequences of a batch (only on how many of its
 *     own tokens it holds), a request's output is therefore the same alone or
 *     beside others.  chunk + n_slots <= max_batch, so the oldest prefill always
 *     fits and cannot starve.
 * A request never uses a position >= n_ctx: sched_add refuses one whose
 * n_prompt + n_max exceeds n_ctx.  An optional pick hook chooses the slot a
 * queued request takes (the KV hosts' room, kvroom.h): the oldest queued
 * request that must wait holds the queue behind it (first come, first served),
 * and one the hook refuses leaves the queue.
 *
 * sched_step advances the state as if the step ran (a request whose last
 * prompt chunk was planned is in DECODE afterwards); if the forward pass fails
 * the caller removes the requests involved. */
#ifndef MOEFLEET_SCHED_H
#define MOEFLEET_SCHED_H

#include <stddef.h>
#include <stdint.h>

struct sched_config {
	int n_slots;   /* sequence slots, in [1, 4096] */
	int n_ctx;     /* positions per slot, >= 1 */
	int max_batch; /* tokens per step */
	int chunk;     /* prefill chunk, >= 1, chunk + n_slots <= max_batch */
	int queue_cap; /* requests that may wait for a slot, >= 0 */
	/* Optional (NULL: the first free slot): the free slot (busy[s] 0) the
	 * queued request id of n_pos = n_prompt + n_max positions takes, -1 to
	 * wait, or another negative value: it is dropped from the queue (the hook
	 * tells its owner why). */
	int (*pick)(void *ctx, uint64_t id, int n_pos, const uint8_t *busy);
	void *pick_ctx;
};

/* One entry of a planned step: n_tokens consecutive tokens of one request
 * at positions pos .. pos + n_tokens - 1 of its slot. */
struct sched_item {
	uint64_t id;
	int slot;
	int pos;
	int n_tokens; /* prefill: prompt tokens [pos, pos + n_tokens); decode: 1 */
	int decode;   /* 1: the token is the request's last sampled one */
	int sample;   /* 1: a token is to be sampled from the item's last logits */
};

enum sched_state { SCHED_NONE = 0, SCHED_QUEUED, SCHED_PREFILL, SCHED_DECODE };

typedef struct sched sched;

/* ERR_CONFIG (logged) on an invalid configuration. */
int sched_new(const struct sched_config *cfg, sched **out);
void sched_destroy(sched **s);

/* Queues a request of n_prompt tokens that may generate up to n_max tokens.
 * Returns 0; ERR_CONFIG if it can never run (n_prompt < 1, n_max < 1,
 * n_prompt + n_max > n_ctx, or the id is in use); ERR_RANGE if every slot is
 * busy and the queue is full (try again later).  Nothing is logged. */
int sched_add(sched *s, uint64_t id, int n_prompt, int n_max);
/* Forgets a request wherever it is.  Returns the slot it held (the caller
 * clears that slot's KV cache before it is reused), or -1 if it held none or
 * is unknown. */
int sched_remove(sched *s, uint64_t id);
/* Plans the next step into items[0..cap) (cap must be >= n_slots; max_batch
 * is always enough); returns how many items, 0 when there is nothing to do. */
int sched_step(sched *s, struct sched_item *items, int cap);

enum sched_state sched_get_state(const sched *s, uint64_t id);
/* The slot a request holds (-1: none) and the positions fed so far in it. */
int sched_get_slot(const sched *s, uint64_t id, int *n_fed);
int sched_n_queued(const sched *s);
int sched_n_active(const sched *s); /* requests holding a slot */
/* Positions in use over all slots (prompt and generated tokens fed so far). */
int64_t sched_n_kv_used(const sched *s);

/* Stop strings on streamed text.  text[0..len) is output not yet released to
 * the client (released text never holds the beginning of a stop string).
 * Sets *release to how many leading bytes may be released now and returns 1
 * if a stop string begins at *release (the output ends there, the stop string
 * excluded), else 0: then the bytes after *release are held because they
 * might begin a stop string.  Empty stop strings are ignored. */
int sched_scan_stops(const char *text, size_t len, const char *const *stops, int n_stops,
		     size_t *release);

#endif
