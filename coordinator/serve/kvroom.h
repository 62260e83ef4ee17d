/* kvroom: room on the KV hosts for the pages of the server's slots, for
 * admission per request.
 *
 * A KV host keeps every page it was sent until a page of the same (layer,
 * slot, number) replaces it: no message frees a page.  So what a slot takes
 * on a host is the most it ever held there, per chain, whatever runs in it
 * now.  A request of n positions (prompt + max_tokens) may take slot s when
 * every host, with the slot raised to what the request can need there
 * (complete pages (n - 1) / P, page i on chain i mod V), still holds no more
 * than it offers; otherwise it waits for a slot whose pages it can reuse, or,
 * when no slot would ever do (the other slots never shrink), it is refused.
 * After a change of hosts (a lost one) a host may still hold pages of the
 * chains it had before: every host is then counted as holding every page each
 * slot ever had, whatever its chains.  Pure bookkeeping; not thread-safe. */
#ifndef MOEFLEET_KVROOM_H
#define MOEFLEET_KVROOM_H

#include <stdint.h>

#include "../model/attn.h"

typedef struct kvroom kvroom;

/* For n_slots slots on the hosts of g (g->n_hosts 0: no hosts, every request
 * fits).  ERR_CONFIG (logged) on a bad geometry. */
int kvroom_new(const struct attn_kv_room *g, int n_slots, kvroom **out);
void kvroom_destroy(kvroom **k);

/* 1 when a request of n_pos positions fits slot now, else 0. */
int kvroom_fits(const kvroom *k, int slot, int n_pos);
/* 1 when it fits some slot now or later (when that slot is free), else 0. */
int kvroom_ever(const kvroom *k, int n_pos);
/* The request takes slot (call after kvroom_fits). */
void kvroom_take(kvroom *k, int slot, int n_pos);
/* Of the free slots (busy[s] 0) where it fits, the one whose pages it reuses
 * most, or -1. */
int kvroom_pick(const kvroom *k, const uint8_t *busy, int n_pos);
/* New hosts (a host was lost): g's, holding what is said above. */
int kvroom_rehost(kvroom *k, const struct attn_kv_room *g);

int kvroom_n_hosts(const kvroom *k);
int kvroom_page(const kvroom *k); /* positions per page */
/* Complete pages (of every layer) a request of n_pos positions ships. */
int64_t kvroom_need(const kvroom *k, int n_pos);
/* Host h's pages: held (per layer, over the slots) and the most it can hold. */
void kvroom_pages(const kvroom *k, int h, int64_t *held, int64_t *total);

#endif
