#include "experts.h"
#include "../common/err.h"
#include "../kernels/kern.h"
#include "../worker/shard.h"

#include <stdlib.h>

struct expert_backend {
	const struct expert_backend_ops *ops;
	void *self;
};

int expert_backend_new(const struct expert_backend_ops *ops, void *self, expert_backend **out)
{
	*out = NULL;
	expert_backend *b = calloc(1, sizeof(*b));
	if (!b) {
		ops->destroy(self);
		return ERR_NOMEM;
	}
	b->ops = ops;
	b->self = self;
	*out = b;
	return 0;
}

int expert_backend_compute(expert_backend *b, const struct expert_job *job)
{
	return b->ops->compute(b->self, job);
}

void expert_backend_destroy(expert_backend **pb)
{
	expert_backend *b = *pb;
	if (!b)
		return;
	b->ops->destroy(b->self);
	free(b);
	*pb = NULL;
}

/* The in-process backend: one shard holding every expert, computed on the
 * coordinator's own thread pool. */
struct experts_local {
	shard *shard;
	pool *pool;
};

static int experts_local_compute(void *self, const struct expert_job *job)
{
	struct experts_local *l = self;
	return shard_compute(l->shard, l->pool, job->layer, job->n_rows, job->k, job->x,
			     KERN_F32, job->ids, job->weights, job->out);
}

static void experts_local_destroy(void *self)
{
	struct experts_local *l = self;
	if (!l)
		return;
	shard_destroy(&l->shard);
	free(l);
}

static const struct expert_backend_ops experts_local_ops = {experts_local_compute,
							     experts_local_destroy};

int experts_new_local(const gguf *g, const struct moe_spec *spec, pool *p, expert_backend **out)
{
	*out = NULL;
	struct experts_local *l = calloc(1, sizeof(*l));
	if (!l)
		return ERR_NOMEM;
	l->pool = p;
	int rc = shard_new(spec, &l->shard);
	if (!rc)
		rc = shard_add_all_from_gguf(l->shard, g);
	if (rc) {
		experts_local_destroy(l);
		return rc;
	}
	return expert_backend_new(&experts_local_ops, l, out);
}
