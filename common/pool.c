#define _GNU_SOURCE
#include "pool.h"
#include "err.h"
#include "log.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

struct pool {
	int n;
	pthread_t *threads;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	pthread_cond_t done_cv; /* the caller sleeps here when the last worker is late */
	pool_fn fn;
	void *ctx;
	atomic_uint gen;      /* bumped for each run; workers wait for a change */
	atomic_int remaining; /* workers still running the current job */
	/* who sleeps (set under mu, before waiting): the other side takes the
	 * mutex and signals only then, so runs that find everyone spinning make
	 * no system call (sequentially consistent: each side stores its own
	 * flag, then loads the other's) */
	atomic_int n_asleep;	  /* workers waiting on cv */
	atomic_int caller_asleep; /* the caller waiting on done_cv */
	atomic_int quit;
};

struct pool_arg {
	pool *p;
	int ith;
};

enum { POOL_SPIN = 2000 };

static void *pool_main(void *arg)
{
	struct pool_arg a = *(struct pool_arg *)arg;
	free(arg);
	pool *p = a.p;
	unsigned seen = 0;
	for (;;) {
		unsigned g;
		int spins = 0;
		while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen) {
			if (atomic_load(&p->quit))
				return NULL;
			if (++spins < POOL_SPIN) {
#if defined(__x86_64__) || defined(__i386__)
				__builtin_ia32_pause();
#endif
				continue;
			}
			pthread_mutex_lock(&p->mu);
			atomic_fetch_add(&p->n_asleep, 1);
			while (atomic_load(&p->gen) == seen && !atomic_load(&p->quit))
				pthread_cond_wait(&p->cv, &p->mu);
			atomic_fetch_sub(&p->n_asleep, 1);
			pthread_mutex_unlock(&p->mu);
		}
		seen = g;
		if (atomic_load(&p->quit))
			return NULL;
		p->fn(p->ctx, a.ith, p->n);
		if (atomic_fetch_sub(&p->remaining, 1) == 1 && atomic_load(&p->caller_asleep)) {
			/* the last one: wake the caller, which went to sleep */
			pthread_mutex_lock(&p->mu);
			pthread_cond_signal(&p->done_cv);
			pthread_mutex_unlock(&p->mu);
		}
	}
}

int pool_new(int n_threads, pool **out)
{
	*out = NULL;
	if (n_threads <= 0) {
		long c = sysconf(_SC_NPROCESSORS_ONLN);
		n_threads = c > 0 ? (int)c : 1;
	}
	if (n_threads > 256) {
		log_error("thread count %d is too large (at most 256)", n_threads);
		return ERR_CONFIG;
	}
	pool *p = calloc(1, sizeof(*p));
	if (!p)
		return ERR_NOMEM;
	p->n = n_threads;
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->cv, NULL);
	pthread_cond_init(&p->done_cv, NULL);
	p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
	if (!p->threads) {
		pool_destroy(&p);
		return ERR_NOMEM;
	}
	for (int i = 1; i < n_threads; i++) {
		struct pool_arg *a = malloc(sizeof(*a));
		if (a) {
			a->p = p;
			a->ith = i;
		}
		if (!a || pthread_create(&p->threads[i], NULL, pool_main, a) != 0) {
			free(a);
			p->n = i; /* destroy joins only the started ones */
			pool_destroy(&p);
			log_error("cannot start thread %d", i);
			return ERR_NOMEM;
		}
	}
	*out = p;
	return 0;
}

void pool_destroy(pool **pp)
{
	pool *p = *pp;
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->quit, 1);
	pthread_cond_broadcast(&p->cv);
	pthread_mutex_unlock(&p->mu);
	for (int i = 1; i < p->n; i++)
		if (p->threads && p->threads[i])
			pthread_join(p->threads[i], NULL);
	pthread_mutex_destroy(&p->mu);
	pthread_cond_destroy(&p->cv);
	pthread_cond_destroy(&p->done_cv);
	free(p->threads);
	free(p);
	*pp = NULL;
}

int pool_size(const pool *p)
{
	return p ? p->n : 1;
}

void pool_run(pool *p, pool_fn fn, void *ctx)
{
	if (!p || p->n == 1) {
		fn(ctx, 0, 1);
		return;
	}
	p->fn = fn;
	p->ctx = ctx;
	atomic_store_explicit(&p->remaining, p->n - 1, memory_order_relaxed);
	atomic_fetch_add(&p->gen, 1);
	if (atomic_load(&p->n_asleep) > 0) {
		pthread_mutex_lock(&p->mu);
		pthread_cond_broadcast(&p->cv);
		pthread_mutex_unlock(&p->mu);
	}
	fn(ctx, 0, p->n);
	/* spin briefly, then sleep until the last worker is done: on a loaded
	 * machine (other processes, workers of a cluster on the same cores) the
	 * thread we wait for needs this core more than we do */
	for (int spins = 0; spins < POOL_SPIN; spins++) {
		if (atomic_load_explicit(&p->remaining, memory_order_acquire) == 0)
			return;
#if defined(__x86_64__) || defined(__i386__)
		__builtin_ia32_pause();
#endif
	}
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->caller_asleep, 1);
	while (atomic_load(&p->remaining) > 0)
		pthread_cond_wait(&p->done_cv, &p->mu);
	atomic_store(&p->caller_asleep, 0);
	pthread_mutex_unlock(&p->mu);
}

void pool_split(int64_t n, int ith, int nth, int64_t align, int64_t *lo, int64_t *hi)
{
	if (align < 1)
		align = 1;
	int64_t chunks = (n + align - 1) / align;
	int64_t per = chunks / nth, extra = chunks % nth;
	int64_t c0 = ith * per + (ith < extra ? ith : extra);
	int64_t c1 = c0 + per + (ith < extra ? 1 : 0);
	*lo = c0 * align < n ? c0 * align : n;
	*hi = c1 * align < n ? c1 * align : n;
}
