/* experts: the seam between the forward pass and whoever computes routed experts.
 *
 * A forward pass hands one layer's routed work to expert_backend_compute():
 * token rows, the chosen expert ids and routing weights per row, and receives
 * each (row, slot) output already multiplied by its weight.  The caller sums
 * the k slot outputs of a row in slot order, so the result does not depend on
 * where or in which order experts were computed.  A row may use fewer than k
 * experts (variable routing, see route.h): its trailing slots have id -1 and
 * weight 0; backends skip them, expert_backend_collect() writes their outputs
 * as zeros and the sums below leave them out.  Backends: in-process
 * (experts_new_local, a shard over the model's own mapping); remote workers
 * come behind the same interface. */
#ifndef MOEFLEET_EXPERTS_H
#define MOEFLEET_EXPERTS_H

#include <stdint.h>

#include "../../common/gguf.h"
#include "../../common/moe.h"
#include "../../common/pool.h"

struct expert_job {
	int layer;
	int n_rows;
	int n_embd;
	int k;
	const float *x;	      /* [n_rows][n_embd] */
	const int32_t *ids;   /* [n_rows][k] */
	const float *weights; /* [n_rows][k] */
	float *out;	      /* [n_rows][k][n_embd] weighted outputs */
};

typedef struct expert_backend expert_backend;

/* What a backend implementation provides (see experts_new_local, cluster.h):
 * submit starts a job (a remote backend sends it and returns), collect
 * finishes it and fills job->out. */
struct expert_backend_ops {
	int (*submit)(void *self, const struct expert_job *job);
	int (*collect)(void *self, const struct expert_job *job);
	void (*destroy)(void *self);
};

/* Wraps an implementation; on failure self is destroyed with ops->destroy. */
int expert_backend_new(const struct expert_backend_ops *ops, void *self, expert_backend **out);

int experts_new_local(const gguf *g, const struct moe_spec *spec, pool *p, expert_backend **out);
/* submit + collect.  Between the two the caller may do other work (the
 * shared expert, while workers compute); job and its buffers, including x,
 * must stay unchanged until collect returns.  One job at a time. */
int expert_backend_compute(expert_backend *b, const struct expert_job *job);
int expert_backend_submit(expert_backend *b, const struct expert_job *job);
int expert_backend_collect(expert_backend *b, const struct expert_job *job);
void expert_backend_destroy(expert_backend **b);

/* Runs job on b and writes, for every row t, the slot outputs summed in slot
 * order: sum[t] = ((out[t][0] + out[t][1]) + ...) + out[t][k-1].  Logs a
 * failure naming the layer. */
int experts_run_sum(expert_backend *b, const struct expert_job *job, float *sum);
/* The same for a job already submitted. */
int experts_collect_sum(expert_backend *b, const struct expert_job *job, float *sum);

#endif
