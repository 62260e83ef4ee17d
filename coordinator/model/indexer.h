/* indexer: DeepSeek-V4's lightning-indexer scores, on the coordinator and on
 * KV hosts.
 *
 * A query row (n_head heads of dim F32 values q_h, head weights w_h) scores
 * indexer entry j (key k_j, dim F32 values) as
 *   I(j) = sum_h w_h relu(q_h . k_j)
 * with the dot products of kern_dot(KERN_F32) and the sum taken over the
 * heads in order with fmaf, as llama.cpp's CPU indexer does.  indexer_score()
 * is the only code computing it: the coordinator (arch_deepseek4) calls it
 * for the entries it holds, a KV host (indexer_host_score) for the pages it
 * was sent, so a score is the same bits wherever it is computed and the
 * top-k selection made from them does not depend on where the keys live.
 *
 * Pages on KV hosts: the keys of entries [i E, (i + 1) E) (E entries per
 * page, F16 as cached) are page i; page i belongs to chain i mod V and goes
 * to that chain's host (attn_page_host), as the attention pages of the other
 * architectures.  A row at position p sees the entries j < (p + 1) / 4; its
 * complete pages i < (p + 1) / 4 / E are scored by their hosts, the rest
 * (the page in progress) by the coordinator. */
#ifndef MOEFLEET_INDEXER_H
#define MOEFLEET_INDEXER_H

#include <stddef.h>
#include <stdint.h>

#include "../../common/pool.h"
#include "attn.h"

/* Positions per indexer entry (DeepSeek-V4's CSA compress ratio). */
#define INDEXER_RATIO 4

/* out[j] = I(j) for the n keys rows keys[j * dim ..]: q [n_head][dim], w
 * [n_head]. */
void indexer_score(int n_head, int dim, const float *q, const float *w, const float *keys, int n,
		   float *out);

/* The complete pages of indexer entries a row at pos (>= 0) sees, `page`
 * entries per page. */
static inline int indexer_row_pages(int pos, int page)
{
	return (int)(((int64_t)pos + 1) / INDEXER_RATIO / page);
}

/* How many scores a host of chains [v0, v1) of n_shard answers for a row at
 * pos: page entries for each of the row's complete pages in those chains. */
size_t indexer_row_scores(int pos, int page, int n_shard, int v0, int v1);

/* A host's share of one CSA layer's rows. */
struct indexer_host_job {
	int n_head, dim;
	int page, n_shard; /* entries per page, chains */
	int v0, v1;	   /* the chains to score */
	int n_rows;
	const int32_t *pos;		      /* [n_rows] */
	const struct attn_page *const *pages; /* [n_rows]: the row's sequence's pages (k only) */
	const int32_t *n_pages;		      /* [n_rows]: entries of pages[r] */
	const float *q;			      /* [n_rows][n_head][dim] */
	const float *w;			      /* [n_rows][n_head] */
	float *scores; /* sum of indexer_row_scores(): per row, page by page */
};

/* Computes job->scores: for each row in order, for each of its complete pages
 * i in the chains [v0, v1) in page order, the page's scores.  ERR_RANGE
 * (logged) when such a page is missing (index past n_pages or a NULL k), the
 * chains are out of range or a size is not positive; ERR_NOMEM. */
int indexer_host_score(pool *p, const struct indexer_host_job *job);

#endif
