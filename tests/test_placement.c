/* placement: balance, memory budgets, replicas, errors, determinism and
 * validation of the greedy LPT expert placement. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../coordinator/placement/placement.h"

#define T_LAYERS  4
#define T_EXPERTS 64

/* A model of T_LAYERS layers (layer 0 dense) with T_EXPERTS experts each. */
struct tmodel {
	uint8_t moe[T_LAYERS];
	uint64_t bytes[T_LAYERS];
	double load[T_LAYERS * T_EXPERTS];
	struct placement_model m;
};

static void tmodel_init(struct tmodel *t, uint64_t b1, uint64_t b2, uint64_t b3, int uniform)
{
	memset(t, 0, sizeof(*t));
	uint64_t b[T_LAYERS] = {0, b1, b2, b3};
	uint32_t seed = 12345;
	for (int l = 0; l < T_LAYERS; l++) {
		t->moe[l] = l > 0;
		t->bytes[l] = b[l];
		for (int e = 0; e < T_EXPERTS; e++) {
			seed = seed * 1103515245u + 12345u;
			t->load[l * T_EXPERTS + e] = 1.0 + (double)((seed >> 16) % 100);
		}
	}
	t->m = (struct placement_model){
	    .n_layer = T_LAYERS,
	    .n_expert = T_EXPERTS,
	    .layer_moe = t->moe,
	    .expert_bytes = t->bytes,
	    .load = uniform ? NULL : t->load,
	};
}

static uint64_t tmodel_bytes(const struct tmodel *t)
{
	uint64_t s = 0;
	for (int l = 0; l < T_LAYERS; l++)
		s += t->moe[l] ? t->bytes[l] * T_EXPERTS : 0;
	return s;
}

static double tmodel_load(const struct tmodel *t, int l, int e)
{
	return (t->m.load ? t->load[l * T_EXPERTS + e] : 1.0) * (double)t->bytes[l];
}

static double tmodel_max_item(const struct tmodel *t)
{
	double mx = 0;
	for (int l = 1; l < T_LAYERS; l++)
		for (int e = 0; e < T_EXPERTS; e++)
			mx = tmodel_load(t, l, e) > mx ? tmodel_load(t, l, e) : mx;
	return mx;
}

static void workers_init(struct placement_worker *w, int n, uint64_t mem)
{
	for (int i = 0; i < n; i++)
		w[i] = (struct placement_worker){.mem_bytes = mem, .speed = 1.0};
}

/* Every routed expert held by n_rep distinct in-range workers, the dense layer
 * by none, and worker_bytes / worker_load consistent with the holders. */
static void check_consistent(const placement *p, const struct tmodel *t, int n_worker, int n_rep)
{
	uint64_t bytes[16] = {0};
	double load[16] = {0};
	assert_int_equal(p->n_worker, n_worker);
	assert_int_equal(p->n_replica, n_rep);
	for (int l = 0; l < T_LAYERS; l++) {
		for (int e = 0; e < T_EXPERTS; e++) {
			int n = placement_n_holders(p, l, e);
			assert_int_equal(n, t->moe[l] ? n_rep : 0);
			for (int r = 0; r < n; r++) {
				int w = placement_holder(p, l, e, r);
				assert_true(w >= 0 && w < n_worker);
				assert_true(placement_holds(p, w, l, e));
				for (int q = 0; q < r; q++)
					assert_int_not_equal(placement_holder(p, l, e, q), w);
				bytes[w] += t->bytes[l];
				load[w] += tmodel_load(t, l, e) / n_rep;
			}
		}
	}
	uint64_t total = 0;
	for (int w = 0; w < n_worker; w++) {
		assert_int_equal(p->worker_bytes[w], bytes[w]);
		assert_true(p->worker_load[w] > load[w] * 0.999999 - 1e-9);
		assert_true(p->worker_load[w] < load[w] * 1.000001 + 1e-9);
		total += bytes[w];
	}
	assert_int_equal(total, tmodel_bytes(t) * (uint64_t)n_rep);
}

static void test_one_worker(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[1];
	placement p;
	tmodel_init(&t, 1000, 2000, 3000, 0);
	workers_init(w, 1, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 1, 1, &p), 0);
	check_consistent(&p, &t, 1, 1);
	assert_int_equal(p.worker_bytes[0], tmodel_bytes(&t)); /* exactly fills the budget */
	assert_int_equal(placement_holder(&p, 0, 0, 0), -1);   /* dense layer */
	assert_int_equal(placement_holder(&p, 1, T_EXPERTS, 0), -1);
	assert_int_equal(placement_validate(&p, &t.m, w, 1), 0);
	placement_free(&p);
	assert_null(p.holder);
	placement_free(&p);
}

/* 2, 3 and 8 equal workers: uniform load gives expert counts within one of
 * each other; random load and mixed sizes keep the predicted-time spread
 * within one item (the LPT invariant). */
static void test_equal_workers(void **state)
{
	(void)state;
	const int counts[] = {2, 3, 8};
	for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
		int n = counts[c];
		struct placement_worker w[8];
		struct tmodel t;
		placement p;

		tmodel_init(&t, 1000, 1000, 1000, 1);
		workers_init(w, n, tmodel_bytes(&t));
		assert_int_equal(placement_build(&t.m, w, n, 1, &p), 0);
		check_consistent(&p, &t, n, 1);
		uint64_t per = 3 * T_EXPERTS / (uint64_t)n;
		for (int i = 0; i < n; i++) {
			uint64_t k = p.worker_bytes[i] / 1000;
			assert_true(k == per || k == per + 1);
		}
		assert_int_equal(placement_validate(&p, &t.m, w, n), 0);
		placement_free(&p);

		for (int uniform = 0; uniform <= 1; uniform++) {
			tmodel_init(&t, 1000, 2500, 4000, uniform);
			workers_init(w, n, tmodel_bytes(&t));
			assert_int_equal(placement_build(&t.m, w, n, 1, &p), 0);
			check_consistent(&p, &t, n, 1);
			double lo = p.worker_load[0], hi = lo, sum = 0;
			for (int i = 0; i < n; i++) {
				lo = p.worker_load[i] < lo ? p.worker_load[i] : lo;
				hi = p.worker_load[i] > hi ? p.worker_load[i] : hi;
				sum += p.worker_load[i];
			}
			assert_true(hi - lo <= tmodel_max_item(&t));
			assert_true(hi <= sum / n * 1.10); /* within 10% of ideal */
			placement_free(&p);
		}
	}
}

/* Tight memory: a worker with half the budget gets about half the bytes. */
static void test_uneven_memory(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[2];
	placement p;
	tmodel_init(&t, 1000, 1000, 1000, 1); /* 192 experts, 192000 bytes */
	w[0] = (struct placement_worker){.mem_bytes = 130000, .speed = 1.0};
	w[1] = (struct placement_worker){.mem_bytes = 65000, .speed = 1.0};
	assert_int_equal(placement_build(&t.m, w, 2, 1, &p), 0);
	check_consistent(&p, &t, 2, 1);
	double ratio = (double)p.worker_bytes[1] / (double)p.worker_bytes[0];
	assert_true(ratio > 0.45 && ratio < 0.55);
	assert_true(p.worker_bytes[0] <= w[0].mem_bytes);
	assert_true(p.worker_bytes[1] <= w[1].mem_bytes);
	assert_int_equal(placement_validate(&p, &t.m, w, 2), 0);
	placement_free(&p);
}

/* Ample memory: a 2x faster worker gets ~2x the load, and predicted finish
 * times agree within one item. */
static void test_uneven_speed(void **state)
{
	(void)state;
	for (int uniform = 0; uniform <= 1; uniform++) {
		struct tmodel t;
		struct placement_worker w[3];
		placement p;
		tmodel_init(&t, 1000, 2000, 3000, uniform);
		workers_init(w, 3, tmodel_bytes(&t));
		w[1].speed = 2.0;
		assert_int_equal(placement_build(&t.m, w, 3, 1, &p), 0);
		check_consistent(&p, &t, 3, 1);
		for (int i = 0; i < 3; i += 2) {
			double ratio = p.worker_load[1] / p.worker_load[i];
			assert_true(ratio > 1.8 && ratio < 2.2);
			double dt = p.worker_load[1] / 2.0 - p.worker_load[i];
			assert_true(dt < tmodel_max_item(&t) && -dt < tmodel_max_item(&t));
		}
		placement_free(&p);
	}
}

/* R = 2 on 3 workers: every expert twice on distinct workers, bytes balanced
 * within one expert; R = 3 on 3 workers: every worker holds everything. */
static void test_replicas(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[3];
	placement p;
	tmodel_init(&t, 1000, 1000, 1000, 1);
	workers_init(w, 3, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 3, 2, &p), 0);
	check_consistent(&p, &t, 3, 2);
	for (int i = 0; i < 3; i++) {
		uint64_t k = p.worker_bytes[i] / 1000;
		assert_true(k == 128);
	}
	assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);
	placement_free(&p);

	tmodel_init(&t, 1000, 2000, 3000, 0);
	workers_init(w, 3, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 3, 3, &p), 0);
	check_consistent(&p, &t, 3, 3);
	for (int i = 0; i < 3; i++)
		assert_int_equal(p.worker_bytes[i], tmodel_bytes(&t));
	placement_free(&p);
}

/* Per-node shard files: held[w] = the experts placement `files` gave w. */
static void held_from(const placement *files, int w, uint8_t *held)
{
	for (int l = 0; l < T_LAYERS; l++)
		for (int e = 0; e < T_EXPERTS; e++)
			held[l * T_EXPERTS + e] = (uint8_t)placement_holds(files, w, l, e);
}

/* Files made for the cluster give exactly their assignment, whatever the
 * speeds the coordinator measures, for one and two replicas; held sets that
 * hold everything change nothing. */
static void test_held_reproduces(void **state)
{
	(void)state;
	static uint8_t held[3][T_LAYERS * T_EXPERTS];
	struct tmodel t;
	struct placement_worker w[3];
	placement files, p;
	tmodel_init(&t, 1000, 2000, 3000, 1);
	for (int rep = 1; rep <= 2; rep++) {
		workers_init(w, 3, UINT64_MAX);
		assert_int_equal(placement_build(&t.m, w, 3, rep, &files), 0);
		const double speed[3] = {1.0, 3.0, 0.5};
		for (int i = 0; i < 3; i++) {
			held_from(&files, i, held[i]);
			w[i] = (struct placement_worker){tmodel_bytes(&t), speed[i], held[i]};
		}
		tmodel_init(&t, 1000, 2000, 3000, 0); /* and a skewed load */
		assert_int_equal(placement_build(&t.m, w, 3, rep, &p), 0);
		check_consistent(&p, &t, 3, rep);
		for (int i = 0; i < 3; i++)
			for (int l = 0; l < T_LAYERS; l++)
				for (int e = 0; e < T_EXPERTS; e++)
					assert_int_equal(placement_holds(&p, i, l, e),
							 placement_holds(&files, i, l, e));
		placement_free(&p);
		placement_free(&files);
		tmodel_init(&t, 1000, 2000, 3000, 1);
	}
	/* every worker holding everything == no held sets */
	placement q;
	memset(held[0], 1, sizeof(held[0]));
	tmodel_init(&t, 1000, 2000, 3000, 0);
	workers_init(w, 3, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 3, 2, &q), 0);
	for (int i = 0; i < 3; i++)
		w[i].held = held[0];
	assert_int_equal(placement_build(&t.m, w, 3, 2, &p), 0);
	assert_memory_equal(p.holder, q.holder, sizeof(int32_t) * T_LAYERS * T_EXPERTS * 2);
	placement_free(&p);
	placement_free(&q);
}

/* Files made for three workers used by two: each keeps its file's experts,
 * the third file's are shared out by load; a budget smaller than a file
 * keeps only what fits, the rest goes elsewhere. */
static void test_held_partial(void **state)
{
	(void)state;
	static uint8_t held[3][T_LAYERS * T_EXPERTS];
	struct tmodel t;
	struct placement_worker w[3];
	placement files, p;
	tmodel_init(&t, 1000, 1000, 1000, 1);
	workers_init(w, 3, UINT64_MAX);
	assert_int_equal(placement_build(&t.m, w, 3, 1, &files), 0);
	for (int i = 0; i < 3; i++)
		held_from(&files, i, held[i]);
	w[0].held = held[0];
	w[1].held = held[1];
	assert_int_equal(placement_build(&t.m, w, 2, 1, &p), 0);
	check_consistent(&p, &t, 2, 1);
	int third[2] = {0, 0};
	for (int l = 1; l < T_LAYERS; l++)
		for (int e = 0; e < T_EXPERTS; e++) {
			int h = placement_holder(&p, l, e, 0);
			int f = placement_holder(&files, l, e, 0);
			if (f < 2)
				assert_int_equal(h, f);
			else
				third[h]++;
		}
	assert_true(third[0] > 0 && third[1] > 0);
	assert_true(third[0] - third[1] <= 1 && third[1] - third[0] <= 1);
	placement_free(&p);

	/* worker 0 has room for half its file */
	w[0].mem_bytes = files.worker_bytes[0] / 2;
	assert_int_equal(placement_build(&t.m, w, 2, 1, &p), 0);
	check_consistent(&p, &t, 2, 1);
	assert_int_equal(p.worker_bytes[0], files.worker_bytes[0] / 2);
	for (int l = 1; l < T_LAYERS; l++)
		for (int e = 0; e < T_EXPERTS; e++)
			if (placement_holds(&p, 0, l, e))
				assert_true(held[0][l * T_EXPERTS + e]);
	assert_int_equal(placement_validate(&p, &t.m, w, 2), 0);
	placement_free(&p);
	placement_free(&files);
}

static void test_errors(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[3];
	placement p;
	tmodel_init(&t, 1000, 1000, 1000, 0);

	/* not enough total memory, for one copy and for two */
	workers_init(w, 3, tmodel_bytes(&t) / 3 - 1);
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), ERR_CONFIG);
	assert_null(p.holder);
	workers_init(w, 3, tmodel_bytes(&t) / 2);
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), 0);
	placement_free(&p);
	assert_int_equal(placement_build(&t.m, w, 3, 2, &p), ERR_CONFIG);
	/* the total fits but the pieces do not: 3 experts of 1000 on 2 x 1500 */
	workers_init(w, 2, 1500);
	t.moe[2] = t.moe[3] = 0;
	t.m.n_expert = 2;
	assert_int_equal(placement_build(&t.m, w, 2, 1, &p), 0);
	assert_int_not_equal(placement_holder(&p, 1, 0, 0), placement_holder(&p, 1, 1, 0));
	placement_free(&p);
	t.m.n_expert = 3;
	assert_int_equal(placement_build(&t.m, w, 2, 1, &p), ERR_CONFIG);
	assert_null(p.holder);

	tmodel_init(&t, 1000, 1000, 1000, 0);
	workers_init(w, 3, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 3, 4, &p), ERR_CONFIG); /* R > workers */
	assert_int_equal(placement_build(&t.m, w, 3, 0, &p), ERR_CONFIG);
	assert_int_equal(placement_build(&t.m, w, 0, 1, &p), ERR_CONFIG);
	assert_int_equal(placement_build(&t.m, NULL, 3, 1, &p), ERR_CONFIG);
	w[2].speed = 0;
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), ERR_CONFIG);
	w[2].speed = 1;
	t.m.n_expert = 0;
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), ERR_CONFIG);
	t.m.n_expert = T_EXPERTS;
	t.bytes[2] = 0;
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), ERR_CONFIG);
	t.bytes[2] = 1000;
	t.load[5] = -1;
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), 0); /* layer 0 is dense: ignored */
	placement_free(&p);
	t.load[T_EXPERTS + 5] = -1;
	t.load[5] = 1;
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), ERR_CONFIG);
	t.load[T_EXPERTS + 5] = 1;
	memset(t.moe, 0, sizeof(t.moe));
	assert_int_equal(placement_build(&t.m, w, 3, 1, &p), ERR_CONFIG);
	assert_null(p.holder);
}

/* Same input, same output -- also with all loads equal and all loads zero. */
static void test_deterministic(void **state)
{
	(void)state;
	for (int mode = 0; mode < 3; mode++) {
		struct tmodel t;
		struct placement_worker w[8];
		placement a, b;
		tmodel_init(&t, 1000, 2000, 3000, mode == 1);
		if (mode == 2)
			memset(t.load, 0, sizeof(t.load));
		workers_init(w, 8, tmodel_bytes(&t));
		w[3].speed = 1.5;
		assert_int_equal(placement_build(&t.m, w, 8, 2, &a), 0);
		assert_int_equal(placement_build(&t.m, w, 8, 2, &b), 0);
		assert_memory_equal(a.holder, b.holder, sizeof(int32_t) * T_LAYERS * T_EXPERTS * 2);
		assert_memory_equal(a.worker_bytes, b.worker_bytes, sizeof(uint64_t) * 8);
		assert_memory_equal(a.worker_load, b.worker_load, sizeof(double) * 8);
		if (mode == 2) { /* zero load: memory is still spread evenly */
			for (int i = 0; i < 8; i++)
				assert_true(a.worker_bytes[i] <= 2 * tmodel_bytes(&t) / 8 + 3000 &&
					    a.worker_bytes[i] + 3000 >= 2 * tmodel_bytes(&t) / 8);
		}
		placement_free(&a);
		placement_free(&b);
	}
}

static void test_copy_choose(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[3];
	placement a, b;
	tmodel_init(&t, 1000, 2000, 3000, 0);
	workers_init(w, 3, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 3, 2, &a), 0);
	assert_int_equal(placement_copy(&a, &b), 0);
	assert_ptr_not_equal(a.holder, b.holder);
	assert_memory_equal(a.holder, b.holder, sizeof(int32_t) * T_LAYERS * T_EXPERTS * 2);
	placement_free(&a);
	assert_int_equal(placement_validate(&b, &t.m, w, 3), 0);

	int h0 = placement_holder(&b, 2, 7, 0), h1 = placement_holder(&b, 2, 7, 1);
	assert_int_equal(placement_choose(&b, 2, 7, NULL), h0);
	double busy[3] = {1, 1, 1};
	assert_int_equal(placement_choose(&b, 2, 7, busy), h0); /* tie: primary */
	busy[h0] = 5;
	assert_int_equal(placement_choose(&b, 2, 7, busy), h1);
	assert_int_equal(placement_choose(&b, 0, 7, busy), -1); /* dense layer */
	assert_int_equal(placement_choose(&b, 9, 7, NULL), -1);
	placement_free(&b);
}

static void test_validate(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[3];
	placement p;
	tmodel_init(&t, 1000, 1000, 1000, 1);
	workers_init(w, 3, tmodel_bytes(&t));
	assert_int_equal(placement_build(&t.m, w, 3, 2, &p), 0);
	assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);
	size_t cell = ((size_t)2 * T_EXPERTS + 9) * 2; /* layer 2, expert 9 */
	int32_t h0 = p.holder[cell], h1 = p.holder[cell + 1];

	p.holder[cell] = 3; /* out of range */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.holder[cell] = h1; /* duplicate */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.holder[cell] = -1; /* not packed */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.holder[cell + 1] = -1; /* held by nobody */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.holder[cell] = h0; /* one holder only: fine once worker_bytes agree */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.worker_bytes[h1] -= 1000;
	assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);
	p.holder[cell + 1] = h1;
	p.worker_bytes[h1] += 1000;
	assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);

	p.holder[5 * 2] = 0; /* a holder on the dense layer 0 */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.holder[5 * 2] = -1;

	w[0].mem_bytes = p.worker_bytes[0] - 1; /* over budget */
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	w[0].mem_bytes = p.worker_bytes[0];
	assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);

	assert_int_equal(placement_validate(&p, &t.m, w, 2), ERR_CONFIG); /* shape */
	t.m.n_expert = T_EXPERTS - 1;
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	t.m.n_expert = T_EXPERTS;
	p.n_replica = 4;
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG);
	p.n_replica = 2;
	placement_free(&p);
	assert_int_equal(placement_validate(&p, &t.m, w, 3), ERR_CONFIG); /* empty */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_one_worker),	  cmocka_unit_test(test_equal_workers),
	    cmocka_unit_test(test_uneven_memory), cmocka_unit_test(test_uneven_speed),
	    cmocka_unit_test(test_replicas),	  cmocka_unit_test(test_errors),
	    cmocka_unit_test(test_deterministic), cmocka_unit_test(test_copy_choose),
	    cmocka_unit_test(test_validate),	  cmocka_unit_test(test_held_reproduces),
	    cmocka_unit_test(test_held_partial),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
