/* kvstore: the KV pages a worker holds as a KV host, for attn_host_forward()
 * and (DeepSeek-V4's indexer keys) indexer_host_score().
 *
 * A page is the keys (and values) of n_pos consecutive positions of one
 * (layer, sequence), numbered from 0 (positions [page * n_pos, (page + 1) *
 * n_pos)), as the coordinator sends them in KvPage messages.  The store keeps
 * a copy of each page it is given; a page given again replaces the first.
 * All pages of one layer have the same n_pos, k_width and v_width (the first
 * page of a layer fixes them; a page that differs is refused with ERR_RANGE).
 * v_width 0 means the values are the keys' first values (deepseek2's MLA):
 * only keys are stored and a page's v is its k.
 *
 * Memory: the bytes of the pages and of the per-sequence page tables count
 * against budget_bytes; a page that would go beyond it is refused with
 * ERR_NOMEM (the store is unchanged).  kvstore_free_seq() drops a sequence's
 * pages (a finished request's: KvFree); nothing is dropped otherwise.
 *
 * kvstore_pages() gives a (kind, layer, sequence)'s pages indexed by page number,
 * k == NULL where a page is missing, valid until the next kvstore_put() or
 * kvstore_free_seq(). */
#ifndef MOEFLEET_KVSTORE_H
#define MOEFLEET_KVSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "../common/wire.h"
#include "../coordinator/model/attn.h"

typedef struct kvstore kvstore;

int kvstore_new(uint64_t budget_bytes, kvstore **out);
void kvstore_destroy(kvstore **s);

/* Stores a copy of page h: frame holds wire_kv_page_frame_bytes(h) bytes
 * (keys, then values when h->v_width > 0; any alignment).  ERR_RANGE for a
 * layer beyond MOE_MAX_LAYERS or whose pages have other sizes, a page whose
 * positions do not fit an int32; ERR_NOMEM beyond the budget. */
int kvstore_put(kvstore *s, const struct wire_kv_page *h, const void *frame);

/* Drops every page of seq (every layer, both kinds), its page tables and
 * their bytes; a layer keeps its page sizes.  A sequence without pages here:
 * nothing to do. */
void kvstore_free_seq(kvstore *s, int32_t seq);

/* The sizes of layer's pages of a kind (enum wire_kv_kind); ERR_RANGE when
 * the store has none of them. */
int kvstore_layer(const kvstore *s, uint32_t kind, uint32_t layer, uint32_t *n_pos,
		  uint32_t *k_width, uint32_t *v_width);

/* The pages of a kind of (layer, seq) by page number and how many entries (0
 * and NULL when none was stored). */
void kvstore_pages(const kvstore *s, uint32_t kind, uint32_t layer, int32_t seq,
		   const struct attn_page **pages, int32_t *n_pages);

/* Bytes held (pages and tables), pages held, and the budget. */
uint64_t kvstore_bytes(const kvstore *s);
uint64_t kvstore_n_pages(const kvstore *s);
uint64_t kvstore_budget(const kvstore *s);
/* A new budget (the memory the experts leave changes with them): pages held
 * beyond it stay, later ones are refused until the bytes fall below it. */
void kvstore_set_budget(kvstore *s, uint64_t budget_bytes);

#endif
