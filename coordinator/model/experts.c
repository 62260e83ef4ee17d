#include "experts.h"
#include "../../common/err.h"
#include "../../kernels/kern.h"
#include "../../common/shard.h"

#include <stdlib.h>
#include <string.h>

#include "../../common/log.h"

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

int expert_backend_submit(expert_backend *b, const struct expert_job *job)
{
	return b->ops->submit(b->self, job);
}

int expert_backend_collect(expert_backend *b, const struct expert_job *job)
{
	int rc = b->ops->collect(b->self, job);
	if (rc)
		return rc;
	/* empty slots (id -1, variable experts per row) read as zeros */
	const size_t E = (size_t)job->n_embd, n = (size_t)job->n_rows * (size_t)job->k;
	for (size_t i = 0; i < n; i++)
		if (job->ids[i] < 0)
			memset(job->out + i * E, 0, E * sizeof(float));
	return 0;
}

int expert_backend_compute(expert_backend *b, const struct expert_job *job)
{
	int rc = expert_backend_submit(b, job);
	return rc ? rc : expert_backend_collect(b, job);
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

int experts_run_sum(expert_backend *b, const struct expert_job *job, float *sum)
{
	int rc = expert_backend_submit(b, job);
	if (rc) {
		log_error("layer %d: routed experts failed (%s)", job->layer, err_str(rc));
		return rc;
	}
	return experts_collect_sum(b, job, sum);
}

int experts_collect_sum(expert_backend *b, const struct expert_job *job, float *sum)
{
	int rc = expert_backend_collect(b, job);
	if (rc) {
		log_error("layer %d: routed experts failed (%s)", job->layer, err_str(rc));
		return rc;
	}
	const size_t E = (size_t)job->n_embd, K = (size_t)job->k;
	for (size_t t = 0; t < (size_t)job->n_rows; t++) {
		float *y = sum + t * E;
		const float *e = job->out + t * K * E;
		const int32_t *ids = job->ids + t * K;
		memcpy(y, e, E * sizeof(float)); /* slot 0: zeros if empty */
		for (size_t j = 1; j < K; j++) {
			if (ids[j] < 0)
				continue; /* empty slot */
			for (size_t i = 0; i < E; i++)
				y[i] += e[j * E + i];
		}
	}
	return 0;
}

/* The in-process backend: one shard holding every expert, computed on the
 * coordinator's own thread pool. */
struct experts_local {
	shard *shard;
	pool *pool;
};

static int experts_local_submit(void *self, const struct expert_job *job)
{
	(void)self;
	(void)job;
	return 0; /* computed in collect, on the same threads */
}

static int experts_local_compute(void *self, const struct expert_job *job)
{
	struct experts_local *l = self;
	return shard_compute(l->shard, l->pool, job->layer, job->n_rows, job->k, job->x, KERN_F32,
			     job->ids, job->weights, job->out);
}

static void experts_local_destroy(void *self)
{
	struct experts_local *l = self;
	if (!l)
		return;
	shard_destroy(&l->shard);
	free(l);
}

static const struct expert_backend_ops experts_local_ops = {
    experts_local_submit, experts_local_compute, experts_local_destroy};

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
