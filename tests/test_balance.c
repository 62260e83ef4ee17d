/* balance: decayed counts, EPLB / hetero / migrate policies, prediction,
 * moved bytes, memory budgets, determinism and per-row replica choice. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../coordinator/placement/balance.h"

#define T_LAYERS  3 /* layer 0 dense */
#define T_EXPERTS 16
#define T_BYTES	  1000

struct tmodel {
	uint8_t moe[T_LAYERS];
	uint64_t bytes[T_LAYERS];
	double load[T_LAYERS * T_EXPERTS];
	struct placement_model m;
};

/* hot: expert 0 of every routed layer gets `hot` x the load of the others;
 * random != 0 gives pseudo-random loads in [1, 100] instead. */
static void tmodel_init(struct tmodel *t, double hot, int random)
{
	memset(t, 0, sizeof(*t));
	uint32_t seed = 777;
	for (int l = 0; l < T_LAYERS; l++) {
		t->moe[l] = l > 0;
		t->bytes[l] = l > 0 ? T_BYTES : 0;
		for (int e = 0; e < T_EXPERTS; e++) {
			seed = seed * 1103515245u + 12345u;
			double v = random ? 1.0 + (double)((seed >> 16) % 100) : 1.0;
			t->load[l * T_EXPERTS + e] = e == 0 && !random ? hot : v;
		}
	}
	t->m = (struct placement_model){
	    .n_layer = T_LAYERS,
	    .n_expert = T_EXPERTS,
	    .layer_moe = t->moe,
	    .expert_bytes = t->bytes,
	    .load = t->load,
	};
}

static void workers_init(struct placement_worker *w, int n, uint64_t mem)
{
	for (int i = 0; i < n; i++)
		w[i] = (struct placement_worker){.mem_bytes = mem, .speed = 1.0};
}

static struct balance_input input_init(const struct tmodel *t, const struct placement_worker *w,
				       int n_worker, int max_rep, int extra)
{
	return (struct balance_input){
	    .model = &t->m,
	    .workers = w,
	    .n_worker = n_worker,
	    .min_replicas = 1,
	    .max_replicas = max_rep,
	    .extra_replicas = extra,
	    .max_move_bytes = UINT64_MAX,
	};
}

static int plan(const char *name, const struct balance_input *in, placement *out)
{
	const struct balance_policy *pol = balance_policy_find(name);
	assert_non_null(pol);
	assert_string_equal(pol->name, name);
	return pol->plan(in, out);
}

static int same_holders(const placement *a, const placement *b)
{
	if (a->n_layer != b->n_layer || a->n_expert != b->n_expert)
		return 0;
	for (int l = 0; l < a->n_layer; l++)
		for (int e = 0; e < a->n_expert; e++) {
			int n = placement_n_holders(a, l, e);
			if (n != placement_n_holders(b, l, e))
				return 0;
			for (int r = 0; r < n; r++)
				if (placement_holder(a, l, e, r) != placement_holder(b, l, e, r))
					return 0;
		}
	return 1;
}

static void test_counts_decay(void **state)
{
	(void)state;
	struct balance_counts *c = NULL, *d = NULL;
	assert_int_equal(balance_counts_new(2, 8, 100.0, &c), 0);
	int32_t burst[20];
	for (int i = 0; i < 20; i++)
		burst[i] = 3;
	assert_int_equal(balance_counts_add(c, 1, burst, 10, 2), 0);
	const double *load = balance_counts_load(c);
	assert_true(fabs(load[8 + 3] - 20.0) < 1e-12);
	assert_true(load[3] == 0.0); /* other layer untouched */

	/* 100 more tokens (one window) on expert 0: the burst fades by 1/e */
	int32_t steady[50];
	for (int i = 0; i < 50; i++)
		steady[i] = 0;
	assert_int_equal(balance_counts_add(c, 1, steady, 50, 1), 0);
	assert_int_equal(balance_counts_add(c, 1, steady, 50, 1), 0);
	assert_true(fabs(load[8 + 3] - 20.0 * exp(-1.0)) < 1e-9);
	/* the steady stream: 50 * exp(-0.5) + 50 */
	assert_true(fabs(load[8 + 0] - (50.0 * exp(-0.5) + 50.0)) < 1e-9);

	/* a long steady stream of 1 hit per token settles near the window */
	for (int i = 0; i < 400; i++)
		assert_int_equal(balance_counts_add(c, 0, steady, 10, 1), 0);
	assert_true(load[0] > 95.0 && load[0] < 106.0);

	/* bad ids: ERR_RANGE and nothing changes */
	double before = load[8 + 3];
	int32_t bad[2] = {1, 8};
	assert_int_equal(balance_counts_add(c, 1, bad, 1, 2), ERR_RANGE);
	assert_true(load[8 + 3] == before && load[8 + 1] == 0.0);
	assert_int_equal(balance_counts_add(c, 2, bad, 1, 1), ERR_CONFIG);

	/* deterministic: the same calls give identical loads */
	assert_int_equal(balance_counts_new(2, 8, 100.0, &d), 0);
	assert_int_equal(balance_counts_add(d, 1, burst, 10, 2), 0);
	assert_int_equal(balance_counts_add(d, 1, steady, 50, 1), 0);
	assert_int_equal(balance_counts_add(d, 1, steady, 50, 1), 0);
	for (int i = 0; i < 400; i++)
		assert_int_equal(balance_counts_add(d, 0, steady, 10, 1), 0);
	assert_memory_equal(balance_counts_load(c), balance_counts_load(d), 16 * sizeof(double));

	balance_counts_destroy(&c);
	balance_counts_destroy(&d);
	assert_null(c);
	balance_counts_destroy(&c);
	assert_int_equal(balance_counts_new(0, 8, 100.0, &c), ERR_CONFIG);
	assert_int_equal(balance_counts_new(2, 8, 0.0, &c), ERR_CONFIG);
	assert_null(c);
}

/* One expert 10x hot: EPLB replicates it and beats no replication. */
static void test_eplb_skew(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[4];
	placement none, rep;
	struct balance_stats s_none, s_rep;
	tmodel_init(&t, 10.0, 0);
	workers_init(w, 4, 100 * T_BYTES);

	struct balance_input in = input_init(&t, w, 4, 1, 0);
	assert_int_equal(plan("eplb", &in, &none), 0);
	assert_int_equal(placement_validate(&none, &t.m, w, 4), 0);
	in = input_init(&t, w, 4, 4, 3);
	assert_int_equal(plan("eplb", &in, &rep), 0);
	assert_int_equal(placement_validate(&rep, &t.m, w, 4), 0);
	assert_int_equal(rep.n_replica, 4);
	for (int l = 1; l < T_LAYERS; l++) {
		assert_int_equal(placement_n_holders(&rep, l, 0), 4); /* 10/4 > 1 */
		for (int e = 1; e < T_EXPERTS; e++)
			assert_int_equal(placement_n_holders(&rep, l, e), 1);
	}
	assert_int_equal(placement_n_holders(&rep, 0, 0), 0);

	assert_int_equal(balance_predict(&none, &t.m, w, NULL, &s_none), 0);
	assert_int_equal(balance_predict(&rep, &t.m, w, NULL, &s_rep), 0);
	/* without replication a worker carries the hot expert alone: >= 10 per layer */
	assert_true(s_none.step_time >= 2 * 10.0 * T_BYTES - 1e-6);
	/* total 25 per layer over 4 workers: ideal 6.25; with 2.5-sized pieces <= 7 */
	assert_true(s_rep.step_time <= 2 * 7.0 * T_BYTES + 1e-6);
	assert_true(s_rep.step_time < s_none.step_time);
	assert_true(s_rep.max_time < s_none.max_time);
	assert_true(s_rep.imbalance < s_none.imbalance);
	assert_true(s_rep.imbalance >= 1.0);
	assert_true(fabs(s_rep.mean_time - 2 * 25.0 * T_BYTES / 4) < 1e-6);

	/* moved bytes: every replica new vs NULL; the 6 extra replicas vs none */
	assert_int_equal(balance_moved_bytes(NULL, &rep, &t.m), 2 * (T_EXPERTS + 3) * T_BYTES);
	assert_int_equal(balance_moved_bytes(&rep, &rep, &t.m), 0);
	assert_true(balance_moved_bytes(&none, &rep, &t.m) >= 2 * 3 * T_BYTES);
	placement_free(&none);
	placement_free(&rep);
}

/* A 2x faster worker gets about 2x the load under hetero; eplb ignores speed. */
static void test_hetero_speed(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[2];
	placement p, q;
	tmodel_init(&t, 1.0, 1);
	workers_init(w, 2, 100 * T_BYTES);
	w[0].speed = 2.0;
	struct balance_input in = input_init(&t, w, 2, 2, 2);
	assert_int_equal(plan("hetero", &in, &p), 0);
	assert_int_equal(placement_validate(&p, &t.m, w, 2), 0);
	double ratio = p.worker_load[0] / p.worker_load[1];
	assert_true(ratio > 1.7 && ratio < 2.3);
	struct balance_stats st;
	assert_int_equal(balance_predict(&p, &t.m, w, NULL, &st), 0);
	assert_true(st.imbalance < 1.1);

	assert_int_equal(plan("eplb", &in, &q), 0);
	assert_int_equal(placement_validate(&q, &t.m, w, 2), 0);
	ratio = q.worker_load[0] / q.worker_load[1];
	assert_true(ratio > 0.85 && ratio < 1.15);
	placement_free(&p);
	placement_free(&q);
}

/* Migrate keeps the placement for small gains, moves for large ones, and
 * never exceeds its byte budget. */
static void test_migrate(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[4];
	placement cur, out;
	struct balance_stats s_cur, s_out;
	tmodel_init(&t, 1.0, 0);
	workers_init(w, 4, 100 * T_BYTES);
	struct balance_input in = input_init(&t, w, 4, 4, 4);
	in.extra_replicas = 0;
	assert_int_equal(plan("hetero", &in, &cur), 0); /* balanced for uniform load */

	/* small drift: 1.2x on one expert, under a 10% threshold -> unchanged */
	t.load[1 * T_EXPERTS + 0] = 1.2;
	in.current = &cur;
	in.extra_replicas = 4;
	in.threshold = 0.10;
	assert_int_equal(plan("migrate", &in, &out), 0);
	assert_true(same_holders(&cur, &out));
	assert_int_equal(balance_moved_bytes(&cur, &out, &t.m), 0);
	assert_int_equal(placement_validate(&out, &t.m, w, 4), 0);
	placement_free(&out);

	/* large skew: expert 0 10x hot in both layers -> moves, big gain */
	for (int l = 1; l < T_LAYERS; l++)
		t.load[l * T_EXPERTS + 0] = 10.0;
	in.threshold = 0.05;
	assert_int_equal(balance_predict(&cur, &t.m, w, NULL, &s_cur), 0);
	assert_int_equal(plan("migrate", &in, &out), 0);
	assert_int_equal(placement_validate(&out, &t.m, w, 4), 0);
	assert_int_equal(balance_predict(&out, &t.m, w, NULL, &s_out), 0);
	assert_true(balance_moved_bytes(&cur, &out, &t.m) > 0);
	assert_true(s_out.step_time < s_cur.step_time * 0.95);
	placement_free(&out);

	/* byte budgets: never exceeded; 0 keeps everything; any improvement
	 * beats the threshold */
	const uint64_t budgets[] = {0, 500, 1000, 1500, 2000, 3000, 5000, 20000};
	double prev = s_cur.step_time;
	for (size_t i = 0; i < sizeof(budgets) / sizeof(budgets[0]); i++) {
		in.max_move_bytes = budgets[i];
		assert_int_equal(plan("migrate", &in, &out), 0);
		assert_int_equal(placement_validate(&out, &t.m, w, 4), 0);
		uint64_t moved = balance_moved_bytes(&cur, &out, &t.m);
		assert_true(moved <= budgets[i]);
		assert_int_equal(balance_predict(&out, &t.m, w, NULL, &s_out), 0);
		if (moved == 0)
			assert_true(same_holders(&cur, &out));
		else
			assert_true(s_out.step_time < s_cur.step_time * 0.95);
		if (budgets[i] >= 2000) /* one replica per layer is affordable */
			assert_true(moved > 0);
		assert_true(s_out.step_time <= prev * (1 + 1e-9)); /* more budget never hurts */
		prev = s_out.step_time;
		placement_free(&out);
	}
	assert_int_equal(placement_validate(&cur, &t.m, w, 4), 0);

	/* no current placement: same as hetero */
	placement h;
	in.current = NULL;
	assert_int_equal(plan("migrate", &in, &out), 0);
	assert_int_equal(plan("hetero", &in, &h), 0);
	assert_true(same_holders(&h, &out));
	placement_free(&h);
	placement_free(&out);
	placement_free(&cur);
}

static void test_deterministic(void **state)
{
	(void)state;
	const char *names[] = {"eplb", "hetero", "migrate"};
	struct tmodel t;
	struct placement_worker w[3];
	placement cur;
	tmodel_init(&t, 1.0, 1);
	workers_init(w, 3, 100 * T_BYTES);
	w[2].speed = 1.5;
	struct balance_input in = input_init(&t, w, 3, 3, 5);
	assert_int_equal(placement_build(&t.m, w, 3, 1, &cur), 0);
	in.current = &cur;
	in.max_move_bytes = 8 * T_BYTES;
	for (int i = 0; i < 3; i++) {
		placement a, b;
		assert_int_equal(plan(names[i], &in, &a), 0);
		assert_int_equal(plan(names[i], &in, &b), 0);
		size_t cells = (size_t)a.n_layer * a.n_expert * a.n_replica;
		assert_int_equal(a.n_replica, b.n_replica);
		assert_memory_equal(a.holder, b.holder, cells * sizeof(*a.holder));
		assert_memory_equal(a.worker_load, b.worker_load, 3 * sizeof(double));
		assert_int_equal(placement_validate(&a, &t.m, w, 3), 0);
		placement_free(&a);
		placement_free(&b);
	}
	placement_free(&cur);
}

/* Tight and uneven memory: every plan fits (placement_validate); too little
 * memory is ERR_CONFIG; the slot cap holds. */
static void test_memory_and_slots(void **state)
{
	(void)state;
	const char *names[] = {"eplb", "hetero", "migrate"};
	struct tmodel t;
	struct placement_worker w[3];
	tmodel_init(&t, 1.0, 1);
	/* 32 experts + 2 x 4 extra = 40 replicas of 1000 bytes in 41000 bytes */
	w[0] = (struct placement_worker){.mem_bytes = 20 * T_BYTES, .speed = 1.0};
	w[1] = (struct placement_worker){.mem_bytes = 13 * T_BYTES, .speed = 3.0};
	w[2] = (struct placement_worker){.mem_bytes = 8 * T_BYTES, .speed = 1.0};
	placement cur;
	assert_int_equal(placement_build(&t.m, w, 3, 1, &cur), 0);
	struct balance_input in = input_init(&t, w, 3, 3, 4);
	in.current = &cur;
	for (int i = 0; i < 3; i++) {
		placement p;
		assert_int_equal(plan(names[i], &in, &p), 0);
		assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);
		for (int k = 0; k < 3; k++)
			assert_true(p.worker_bytes[k] <= w[k].mem_bytes);
		placement_free(&p);
	}
	/* 36 + 8 = 44 > 41: no fit for eplb / hetero */
	in.extra_replicas = 12;
	placement p;
	assert_int_equal(plan("eplb", &in, &p), ERR_CONFIG);
	assert_null(p.holder);
	assert_int_equal(plan("hetero", &in, &p), ERR_CONFIG);
	/* migrate only adds replicas that fit */
	assert_int_equal(plan("migrate", &in, &p), 0);
	assert_int_equal(placement_validate(&p, &t.m, w, 3), 0);
	placement_free(&p);
	placement_free(&cur);

	/* slots: 4 workers x 5 slots = 20 replicas per layer, at most 5 each */
	struct placement_worker v[4];
	workers_init(v, 4, 100 * T_BYTES);
	in = input_init(&t, v, 4, 4, 0);
	in.slots_per_worker = 5;
	assert_int_equal(plan("eplb", &in, &p), 0);
	assert_int_equal(placement_validate(&p, &t.m, v, 4), 0);
	for (int l = 1; l < T_LAYERS; l++) {
		int per[4] = {0}, total = 0;
		for (int e = 0; e < T_EXPERTS; e++) {
			int n = placement_n_holders(&p, l, e);
			total += n;
			for (int r = 0; r < n; r++)
				per[placement_holder(&p, l, e, r)]++;
		}
		assert_int_equal(total, 20);
		for (int k = 0; k < 4; k++)
			assert_int_equal(per[k], 5);
	}
	placement_free(&p);
}

static void test_errors(void **state)
{
	(void)state;
	struct tmodel t;
	struct placement_worker w[2];
	placement p;
	tmodel_init(&t, 1.0, 0);
	workers_init(w, 2, 100 * T_BYTES);
	assert_null(balance_policy_find("nope"));
	assert_null(balance_policy_find(NULL));
	struct balance_input in = input_init(&t, w, 2, 2, 0);
	in.min_replicas = 0;
	assert_int_equal(plan("eplb", &in, &p), ERR_CONFIG);
	in = input_init(&t, w, 2, 3, 0); /* max > workers */
	assert_int_equal(plan("hetero", &in, &p), ERR_CONFIG);
	in = input_init(&t, w, 2, 2, 0);
	in.slots_per_worker = 7; /* 14 slots < 16 experts */
	assert_int_equal(plan("eplb", &in, &p), ERR_CONFIG);
	in = input_init(&t, w, 2, 2, 0);
	in.threshold = -1;
	assert_int_equal(plan("migrate", &in, &p), ERR_CONFIG);
	t.load[T_EXPERTS + 2] = NAN;
	in = input_init(&t, w, 2, 2, 0);
	assert_int_equal(plan("eplb", &in, &p), ERR_CONFIG);
	assert_null(p.holder);
}

static void test_choose_replica(void **state)
{
	(void)state;
	/* 1 layer, 2 experts, 3 replica slots: expert 0 on {0, 1, 2}, expert 1 none */
	int32_t holder[6] = {0, 1, 2, -1, -1, -1};
	placement p = {
	    .n_layer = 1, .n_expert = 2, .n_replica = 3, .n_worker = 3, .holder = holder};
	double f1[3] = {3.0, 1.0, 2.0};
	assert_int_equal(balance_choose_replica(&p, 0, 0, f1, NULL), 1);
	uint8_t v2[3] = {0, 0, 1};
	assert_int_equal(balance_choose_replica(&p, 0, 0, f1, v2), 1); /* 2.0 too slow */
	double f2[3] = {3.0, 1.0, 1.02};
	assert_int_equal(balance_choose_replica(&p, 0, 0, f2, v2), 2); /* within 5% */
	assert_int_equal(balance_choose_replica(&p, 0, 0, f2, NULL), 1);
	double f3[3] = {1.0, 1.0, 1.0};
	assert_int_equal(balance_choose_replica(&p, 0, 0, f3, NULL), 0); /* tie: primary */
	assert_int_equal(balance_choose_replica(&p, 0, 0, f3, v2), 2);	 /* tie: visited */
	uint8_t v01[3] = {1, 1, 0};
	double f4[3] = {1.04, 1.01, 1.0};
	assert_int_equal(balance_choose_replica(&p, 0, 0, f4, v01), 1); /* best visited */
	double f0[3] = {0.0, 0.0, 0.0};
	assert_int_equal(balance_choose_replica(&p, 0, 0, f0, v2), 2);
	assert_int_equal(balance_choose_replica(&p, 0, 0, NULL, NULL), 0);
	assert_int_equal(balance_choose_replica(&p, 0, 0, NULL, v2), 2);
	assert_int_equal(balance_choose_replica(&p, 0, 1, f1, v2), -1);
	assert_int_equal(balance_choose_replica(&p, 1, 0, f1, v2), -1);
}

int main(void)
{
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_counts_decay),  cmocka_unit_test(test_eplb_skew),
	    cmocka_unit_test(test_hetero_speed),  cmocka_unit_test(test_migrate),
	    cmocka_unit_test(test_deterministic), cmocka_unit_test(test_memory_and_slots),
	    cmocka_unit_test(test_errors),	  cmocka_unit_test(test_choose_replica),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
