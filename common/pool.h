/* pool: one fixed set of threads for the whole process.
 *
 * pool_run(p, fn, ctx) calls fn(ctx, ith, nth) once for every ith in
 * [0, nth) -- the calling thread runs ith = 0 -- and returns when all have
 * finished.  Work splitting is the callee's job (pool_split helps).  Calls must
 * not be nested and only one thread may call pool_run at a time.  Workers spin
 * briefly before sleeping, so back-to-back runs (one per matmul) are cheap. */
#ifndef MOEFLEET_POOL_H
#define MOEFLEET_POOL_H

#include <stdint.h>

typedef struct pool pool;
typedef void (*pool_fn)(void *ctx, int ith, int nth);

/* n_threads <= 0 means all online cores. */
int pool_new(int n_threads, pool **out);
void pool_destroy(pool **p);
int pool_size(const pool *p);
void pool_run(pool *p, pool_fn fn, void *ctx);

/* The share [*lo, *hi) of n items for thread ith of nth, in chunks that are
 * multiples of `align` (the last one takes the remainder). */
void pool_split(int64_t n, int ith, int nth, int64_t align, int64_t *lo, int64_t *hi);

#endif
