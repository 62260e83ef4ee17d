#include "indexer.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stdlib.h>

void indexer_score(int n_head, int dim, const float *q, const float *w, const float *keys, int n,
		   float *out)
{
	for (int j = 0; j < n; j++) {
		const float *krow = keys + (size_t)j * (size_t)dim;
		float score = 0.0f;
		for (int h = 0; h < n_head; h++) {
			const float qk = kern_dot(KERN_F32, dim, krow, q + (size_t)h * (size_t)dim);
			score = fmaf(fmaxf(qk, 0.0f), w[h], score);
		}
		out[j] = score;
	}
}

size_t indexer_row_scores(int pos, int page, int n_shard, int v0, int v1)
{
	/* pages i < np with i mod n_shard in [v0, v1): v1 - v0 per whole round
	 * of n_shard, and those of the last round */
	const int np = indexer_row_pages(pos, page), rest = np % n_shard - v0;
	const size_t n =
	    (size_t)(np / n_shard) * (size_t)(v1 - v0) + (size_t)(rest < 0	   ? 0
								  : rest < v1 - v0 ? rest
										   : v1 - v0);
	return n * (size_t)page;
}

/* One page of one row: where its scores go. */
struct indexer_unit {
	int32_t row, page;
	size_t at;
};

struct indexer_host_run {
	const struct indexer_host_job *job;
	const struct indexer_unit *units;
	size_t n_units;
	float *keys; /* [threads][page][dim] */
};

static void indexer_host_run(void *ctx, int ith, int nth)
{
	const struct indexer_host_run *hr = ctx;
	const struct indexer_host_job *jb = hr->job;
	const size_t per_page = (size_t)jb->page * (size_t)jb->dim;
	float *keys = hr->keys + (size_t)ith * per_page;
	int64_t lo, hi;
	pool_split((int64_t)hr->n_units, ith, nth, 1, &lo, &hi);
	for (int64_t u = lo; u < hi; u++) {
		const struct indexer_unit *un = &hr->units[u];
		const uint16_t *k = jb->pages[un->row][un->page].k;
		for (size_t i = 0; i < per_page; i++)
			keys[i] = kern_f16_to_f32(k[i]);
		const size_t r = (size_t)un->row;
		indexer_score(jb->n_head, jb->dim, jb->q + r * (size_t)jb->n_head * (size_t)jb->dim,
			      jb->w + r * (size_t)jb->n_head, keys, jb->page, jb->scores + un->at);
	}
}

int indexer_host_score(pool *p, const struct indexer_host_job *job)
{
	if (job->n_head <= 0 || job->dim <= 0 || job->page <= 0 || job->n_shard <= 0 ||
	    job->v0 < 0 || job->v0 >= job->v1 || job->v1 > job->n_shard || job->n_rows < 0) {
		log_error("indexer: chains [%d, %d) of %d, %d heads of %d, pages of %d entries: "
			  "out of range",
			  job->v0, job->v1, job->n_shard, job->n_head, job->dim, job->page);
		return ERR_RANGE;
	}
	size_t n_units = 0;
	for (int r = 0; r < job->n_rows; r++)
		n_units +=
		    indexer_row_scores(job->pos[r], job->page, job->n_shard, job->v0, job->v1) /
		    (size_t)job->page;
	const int nth = pool_size(p);
	struct indexer_host_run hr = {
	    .job = job,
	    .units = NULL,
	    .n_units = n_units,
	    .keys = malloc((size_t)nth * (size_t)job->page * (size_t)job->dim * sizeof(float))};
	struct indexer_unit *units = malloc((n_units ? n_units : 1) * sizeof(*units));
	int rc = 0;
	if (!units || !hr.keys) {
		rc = ERR_NOMEM;
		goto out;
	}
	size_t u = 0;
	for (int r = 0; r < job->n_rows; r++)
		for (int i = 0; i < indexer_row_pages(job->pos[r], job->page); i++) {
			if (i % job->n_shard < job->v0 || i % job->n_shard >= job->v1)
				continue;
			if (i >= job->n_pages[r] || !job->pages[r][i].k) {
				log_error("indexer: row %d (position %d) needs indexer page %d, "
					  "which is not here",
					  r, job->pos[r], i);
				rc = ERR_RANGE;
				goto out;
			}
			units[u] = (struct indexer_unit){r, i, u * (size_t)job->page};
			u++;
		}
	hr.units = units;
	pool_run(p, indexer_host_run, &hr);
out:
	free(units);
	free(hr.keys);
	return rc;
}
