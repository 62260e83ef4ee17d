#include "kvroom.h"

#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"

struct kvroom {
	struct attn_kv_room g;
	int n_slots;
	int32_t *held; /* [n_hosts][n_slots][n_shard]: pages of a chain a host holds */
	int32_t *top;  /* [n_slots]: the complete pages of the slot's request */
};

static int32_t *kvroom_at(const kvroom *k, int h, int s)
{
	return k->held + ((size_t)h * (size_t)k->n_slots + (size_t)s) * (size_t)k->g.n_shard;
}

/* Pages of chain c among the first np pages. */
static int32_t kvroom_chain_pages(const kvroom *k, int64_t np, int c)
{
	const int V = k->g.n_shard;
	return np > c ? (int32_t)((np - c + V - 1) / V) : 0;
}

static int kvroom_set(kvroom *k, const struct attn_kv_room *g)
{
	if (g->n_hosts < 0 || g->n_hosts > ATTN_MAX_HOSTS ||
	    (g->n_hosts > 0 && (g->n_shard < g->n_hosts || g->n_shard % g->n_hosts || g->page < 1 ||
				g->n_layer < 0))) {
		log_error("kvroom: %d KV hosts for %d chains of %d positions", g->n_hosts,
			  g->n_shard, g->page);
		return ERR_CONFIG;
	}
	int32_t *held = NULL;
	if (g->n_hosts > 0) {
		held = calloc((size_t)g->n_hosts * (size_t)k->n_slots * (size_t)g->n_shard,
			      sizeof(int32_t));
		if (!held)
			return ERR_NOMEM;
	}
	free(k->held);
	k->held = held;
	k->g = *g;
	return 0;
}

int kvroom_new(const struct attn_kv_room *g, int n_slots, kvroom **out)
{
	*out = NULL;
	kvroom *k = calloc(1, sizeof(*k));
	if (!k)
		return ERR_NOMEM;
	k->n_slots = n_slots;
	k->top = calloc((size_t)n_slots, sizeof(int32_t));
	int rc = k->top ? kvroom_set(k, g) : ERR_NOMEM;
	if (rc)
		kvroom_destroy(&k);
	*out = k;
	return rc;
}

void kvroom_destroy(kvroom **k)
{
	if (!k || !*k)
		return;
	free((*k)->held);
	free((*k)->top);
	free(*k);
	*k = NULL;
}

int64_t kvroom_need(const kvroom *k, int n_pos)
{
	return n_pos > 0 && k->g.page > 0 ? (int64_t)(n_pos - 1) / k->g.page : 0;
}

/* Bytes host h holds for a slot holding held[] (NULL: nothing) of the chains
 * and top complete pages, raised to np pages. */
static uint64_t kvroom_slot_bytes(const kvroom *k, int h, const int32_t *held, int64_t top,
				  int64_t np)
{
	const int per = k->g.n_shard / k->g.n_hosts;
	uint64_t pages = 0;
	for (int c = 0; c < k->g.n_shard; c++) {
		int32_t n = held ? held[c] : 0;
		if (c / per == h && kvroom_chain_pages(k, np, c) > n)
			n = kvroom_chain_pages(k, np, c);
		pages += (uint64_t)n;
	}
	if (np > top)
		top = np;
	return (uint64_t)k->g.n_layer *
	       (pages * k->g.page_bytes + (uint64_t)top * k->g.entry_bytes +
		(top ? k->g.seq_bytes : 0));
}

int kvroom_fits(const kvroom *k, int slot, int n_pos)
{
	const int64_t np = kvroom_need(k, n_pos);
	for (int h = 0; h < k->g.n_hosts; h++) {
		uint64_t bytes = 0;
		for (int s = 0; s < k->n_slots; s++)
			bytes += kvroom_slot_bytes(k, h, kvroom_at(k, h, s), k->top[s],
						   s == slot ? np : 0);
		if (bytes > k->g.budget[h])
			return 0;
	}
	return 1;
}

int kvroom_ever(const kvroom *k, int n_pos)
{
	const int64_t np = kvroom_need(k, n_pos);
	for (int h = 0; h < k->g.n_hosts; h++)
		if (kvroom_slot_bytes(k, h, NULL, 0, np) > k->g.budget[h])
			return 0;
	return k->n_slots > 0;
}

int kvroom_pick(const kvroom *k, const uint8_t *busy, int n_pos)
{
	for (int s = 0; s < k->n_slots; s++)
		if (!busy[s] && kvroom_fits(k, s, n_pos))
			return s;
	return -1;
}

void kvroom_take(kvroom *k, int slot, int n_pos)
{
	const int64_t np = kvroom_need(k, n_pos);
	if (k->g.n_hosts == 0)
		return;
	const int per = k->g.n_shard / k->g.n_hosts;
	for (int h = 0; h < k->g.n_hosts; h++) {
		int32_t *held = kvroom_at(k, h, slot);
		for (int c = h * per; c < (h + 1) * per; c++)
			if (kvroom_chain_pages(k, np, c) > held[c])
				held[c] = kvroom_chain_pages(k, np, c);
	}
	if (np > k->top[slot])
		k->top[slot] = (int32_t)np;
}

void kvroom_release(kvroom *k, int slot)
{
	if (slot < 0 || slot >= k->n_slots)
		return;
	for (int h = 0; h < k->g.n_hosts; h++)
		memset(kvroom_at(k, h, slot), 0, (size_t)k->g.n_shard * sizeof(int32_t));
	k->top[slot] = 0;
}

int kvroom_rehost(kvroom *k, const struct attn_kv_room *g)
{
	int rc = kvroom_set(k, g);
	for (int h = 0; !rc && h < k->g.n_hosts; h++)
		for (int s = 0; s < k->n_slots; s++)
			for (int c = 0; c < k->g.n_shard; c++)
				kvroom_at(k, h, s)[c] = kvroom_chain_pages(k, k->top[s], c);
	return rc;
}

int kvroom_n_hosts(const kvroom *k)
{
	return k->g.n_hosts;
}

int kvroom_page(const kvroom *k)
{
	return k->g.page;
}

void kvroom_pages(const kvroom *k, int h, int64_t *held, int64_t *total)
{
	*held = 0;
	*total = 0;
	if (h < 0 || h >= k->g.n_hosts)
		return;
	for (int s = 0; s < k->n_slots; s++)
		for (int c = 0; c < k->g.n_shard; c++)
			*held += kvroom_at(k, h, s)[c];
	const uint64_t per_page = (uint64_t)k->g.n_layer * (k->g.page_bytes + k->g.entry_bytes);
	*total = per_page ? (int64_t)(k->g.budget[h] / per_page) : 0;
}
