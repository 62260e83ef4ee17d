/* kvroom: room on the KV hosts for the pages of the server's slots, for
 * admission per request.
 *
 * A KV host keeps the pages of a slot's request until the request ends: the
 * slot's sequence is then reset, which frees its pages on every host
 * (KvFree), and kvroom_release() forgets them here.  So a host holds the
 * pages of the running slots only.  A request of n positions (prompt +
 * max_tokens) may take a free slot s when every host, with the running slots'
 * pages plus what the request can need there (complete pages (n - 1) / P,
 * page i on chain i mod V), still holds no more than it offers; otherwise it
 * waits for running requests to end.  It is refused only when it would not
 * fit even with every slot empty (kvroom_ever).  After a change of hosts (a
 * lost one) a host may still hold pages of the chains it had before: every
 * host is then counted as holding every page of each running slot, whatever
 * its chains, until that slot is released.  Pure bookkeeping; not
 * thread-safe. */
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
/* 1 when it fits a slot once every slot is empty (now or later), else 0. */
int kvroom_ever(const kvroom *k, int n_pos);
/* The request takes slot (call after kvroom_fits). */
void kvroom_take(kvroom *k, int slot, int n_pos);
/* The request in slot ended and its pages were freed on the hosts: the slot
 * holds none. */
void kvroom_release(kvroom *k, int slot);
/* The first free slot (busy[s] 0) where it fits, or -1. */
int kvroom_pick(const kvroom *k, const uint8_t *busy, int n_pos);
/* New hosts (a host was lost): g's, holding what is said above. */
int kvroom_rehost(kvroom *k, const struct attn_kv_room *g);

int kvroom_n_hosts(const kvroom *k);
int kvroom_page(const kvroom *k); /* positions per page */
/* Complete pages (of every layer) a request of n_pos positions ships. */
int64_t kvroom_need(const kvroom *k, int n_pos);
/* Host h's pages: held (per layer, over the running slots) and the most it
 * can hold. */
void kvroom_pages(const kvroom *k, int h, int64_t *held, int64_t *total);

#endif
