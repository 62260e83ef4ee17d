#include "kvstore.h"
#include "../common/err.h"
#include "../common/log.h"

#include <stdlib.h>
#include <string.h>

/* One sequence's pages of a layer: pages[i] is page i (k NULL: missing). */
struct kvstore_seq {
	int32_t seq;
	int32_t n_pages;
	struct attn_page *pages;
};

struct kvstore_layer {
	uint32_t n_pos, k_width, v_width; /* n_pos 0: no page yet */
	struct kvstore_seq *seqs;	  /* by increasing seq */
	size_t n_seqs;
};

struct kvstore {
	uint64_t budget, bytes;
	uint64_t n_pages;				/* pages held */
	struct kvstore_layer layers[2][MOE_MAX_LAYERS]; /* by enum wire_kv_kind, layer */
};

int kvstore_new(uint64_t budget_bytes, kvstore **out)
{
	*out = calloc(1, sizeof(**out));
	if (!*out)
		return ERR_NOMEM;
	(*out)->budget = budget_bytes;
	return 0;
}

void kvstore_destroy(kvstore **s)
{
	if (!*s)
		return;
	for (int l = 0; l < 2 * MOE_MAX_LAYERS; l++) {
		struct kvstore_layer *L = &(*s)->layers[l / MOE_MAX_LAYERS][l % MOE_MAX_LAYERS];
		for (size_t i = 0; i < L->n_seqs; i++) {
			for (int32_t p = 0; p < L->seqs[i].n_pages; p++)
				free((void *)L->seqs[i].pages[p].k);
			free(L->seqs[i].pages);
		}
		free(L->seqs);
	}
	free(*s);
	*s = NULL;
}

/* Bytes of one page of layer L (keys, then values when v_width > 0). */
static uint64_t kvstore_page_bytes(const struct kvstore_layer *L)
{
	return (uint64_t)L->n_pos * ((uint64_t)L->k_width + L->v_width) * sizeof(uint16_t);
}

/* The index of seq in L->seqs, or where it would go (*found 0). */
static size_t kvstore_find(const struct kvstore_layer *L, int32_t seq, int *found)
{
	size_t lo = 0, hi = L->n_seqs;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (L->seqs[mid].seq < seq)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = lo < L->n_seqs && L->seqs[lo].seq == seq;
	return lo;
}

int kvstore_put(kvstore *s, const struct wire_kv_page *h, const void *frame)
{
	if (h->layer >= MOE_MAX_LAYERS || h->kind > WIRE_KV_IDX || !h->n_pos || !h->k_width ||
	    h->seq > INT32_MAX || ((uint64_t)h->page + 1) * h->n_pos > (uint64_t)INT32_MAX + 1 ||
	    wire_kv_page_frame_bytes(h) == SIZE_MAX) {
		log_error("kvstore: page %u of sequence %u on layer %u out of range", h->page,
			  h->seq, h->layer);
		return ERR_RANGE;
	}
	struct kvstore_layer *L = &s->layers[h->kind][h->layer];
	if (L->n_pos &&
	    (L->n_pos != h->n_pos || L->k_width != h->k_width || L->v_width != h->v_width)) {
		log_error("kvstore: layer %u: a page of %u positions of %u/%u values, the layer's "
			  "have %u of %u/%u",
			  h->layer, h->n_pos, h->k_width, h->v_width, L->n_pos, L->k_width,
			  L->v_width);
		return ERR_RANGE;
	}
	const size_t bytes = wire_kv_page_frame_bytes(h);
	int found;
	size_t at = kvstore_find(L, (int32_t)h->seq, &found);
	const int32_t n_pages = found ? L->seqs[at].n_pages : 0;
	const struct attn_page *old =
	    (int64_t)h->page < n_pages ? &L->seqs[at].pages[h->page] : NULL;
	/* what the page adds: its bytes less those it replaces, the growth of the
	 * sequence's page table and of the layer's list of sequences */
	uint64_t add = bytes, sub = old && old->k ? bytes : 0;
	if ((int64_t)h->page >= n_pages)
		add += ((uint64_t)h->page + 1 - (uint64_t)n_pages) * sizeof(struct attn_page);
	if (!found)
		add += sizeof(struct kvstore_seq);
	if (s->bytes - sub + add > s->budget) {
		log_error("kvstore: page %u of sequence %u on layer %u (%zu bytes) is beyond the "
			  "KV budget of %llu bytes (%llu held)",
			  h->page, h->seq, h->layer, bytes, (unsigned long long)s->budget,
			  (unsigned long long)s->bytes);
		return ERR_NOMEM;
	}
	uint16_t *buf = malloc(bytes);
	if (!buf)
		return ERR_NOMEM;
	memcpy(buf, frame, bytes);
	if (!found) {
		struct kvstore_seq *ns = realloc(L->seqs, (L->n_seqs + 1) * sizeof(*ns));
		if (!ns) {
			free(buf);
			return ERR_NOMEM;
		}
		L->seqs = ns;
		memmove(&ns[at + 1], &ns[at], (L->n_seqs - at) * sizeof(*ns));
		ns[at] = (struct kvstore_seq){.seq = (int32_t)h->seq};
		L->n_seqs++;
		s->bytes += sizeof(*ns);
	}
	struct kvstore_seq *q = &L->seqs[at];
	if ((int64_t)h->page >= q->n_pages) {
		const size_t n = (size_t)h->page + 1;
		struct attn_page *np = realloc(q->pages, n * sizeof(*np));
		if (!np) {
			free(buf);
			return ERR_NOMEM;
		}
		memset(&np[q->n_pages], 0, (n - (size_t)q->n_pages) * sizeof(*np));
		s->bytes += (n - (size_t)q->n_pages) * sizeof(*np);
		q->pages = np;
		q->n_pages = (int32_t)n;
	}
	struct attn_page *pg = &q->pages[h->page];
	if (pg->k) {
		free((void *)pg->k);
		s->bytes -= bytes;
	} else {
		s->n_pages++;
	}
	pg->k = buf;
	pg->v = h->v_width ? buf + (size_t)h->n_pos * h->k_width : buf;
	s->bytes += bytes;
	L->n_pos = h->n_pos;
	L->k_width = h->k_width;
	L->v_width = h->v_width;
	return 0;
}

void kvstore_free_seq(kvstore *s, int32_t seq)
{
	for (int l = 0; l < 2 * MOE_MAX_LAYERS; l++) {
		struct kvstore_layer *L = &s->layers[l / MOE_MAX_LAYERS][l % MOE_MAX_LAYERS];
		int found;
		const size_t at = kvstore_find(L, seq, &found);
		if (!found)
			continue;
		struct kvstore_seq *q = &L->seqs[at];
		for (int32_t p = 0; p < q->n_pages; p++) {
			if (!q->pages[p].k)
				continue;
			free((void *)q->pages[p].k);
			s->n_pages--;
			s->bytes -= kvstore_page_bytes(L);
		}
		free(q->pages);
		s->bytes -= (uint64_t)q->n_pages * sizeof(struct attn_page) + sizeof(*q);
		memmove(q, q + 1, (L->n_seqs - at - 1) * sizeof(*q));
		L->n_seqs--;
	}
}

int kvstore_layer(const kvstore *s, uint32_t kind, uint32_t layer, uint32_t *n_pos,
		  uint32_t *k_width, uint32_t *v_width)
{
	if (kind > WIRE_KV_IDX || layer >= MOE_MAX_LAYERS || !s->layers[kind][layer].n_pos)
		return ERR_RANGE;
	const struct kvstore_layer *L = &s->layers[kind][layer];
	*n_pos = L->n_pos;
	*k_width = L->k_width;
	*v_width = L->v_width;
	return 0;
}

void kvstore_pages(const kvstore *s, uint32_t kind, uint32_t layer, int32_t seq,
		   const struct attn_page **pages, int32_t *n_pages)
{
	*pages = NULL;
	*n_pages = 0;
	if (kind > WIRE_KV_IDX || layer >= MOE_MAX_LAYERS)
		return;
	int found;
	const struct kvstore_layer *L = &s->layers[kind][layer];
	size_t at = kvstore_find(L, seq, &found);
	if (found) {
		*pages = L->seqs[at].pages;
		*n_pages = L->seqs[at].n_pages;
	}
}

uint64_t kvstore_bytes(const kvstore *s)
{
	return s->bytes;
}

uint64_t kvstore_n_pages(const kvstore *s)
{
	return s->n_pages;
}

uint64_t kvstore_budget(const kvstore *s)
{
	return s->budget;
}

void kvstore_set_budget(kvstore *s, uint64_t budget_bytes)
{
	s->budget = budget_bytes;
}
