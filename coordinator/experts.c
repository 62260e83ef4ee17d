#include "experts.h"
#include "../common/err.h"
#include "../worker/shard.h"

#include <stdlib.h>

/* The in-process backend: one shard holding every expert, computed on the
 * coordinator's own thread pool. */
struct expert_backend {
	int (*compute)(expert_backend *b, const struct expert_job *job);
	void (*destroy)(expert_backend *b);
	shard *shard;
	pool *pool;
};

static int experts_local_compute(expert_backend *b, const struct expert_job *job)
{
	return shard_compute(b->shard, b->pool, job->layer, job->n_rows, job->k, job->x,
			     job->ids, job->weights, job->out);
}

static void experts_local_destroy(expert_backend *b) { shard_destroy(&b->shard); }

int experts_new_local(const gguf *g, const struct moe_spec *spec, pool *p, expert_backend **out)
{
	*out = NULL;
	expert_backend *b = calloc(1, sizeof(*b));
	if (!b)
		return ERR_NOMEM;
	int rc = shard_new(g, spec, &b->shard);
	if (rc) {
		free(b);
		return rc;
	}
	b->compute = experts_local_compute;
	b->destroy = experts_local_destroy;
	b->pool = p;
	*out = b;
	return 0;
}

int expert_backend_compute(expert_backend *b, const struct expert_job *job)
{
	return b->compute(b, job);
}

void expert_backend_destroy(expert_backend **pb)
{
	expert_backend *b = *pb;
	if (!b)
		return;
	b->destroy(b);
	free(b);
	*pb = NULL;
}
