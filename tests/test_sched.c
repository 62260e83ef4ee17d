/* The continuous-batching scheduler (coordinator/serve/sched.c) without a model:
 * admission order and the bounded queue, the token budget, whole prefill
 * chunks cut the same way whatever else runs, one decode per running request
 * per step, slot reuse and context refusal, and stop strings. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../coordinator/serve/sched.h"

static sched *make(int slots, int ctx, int batch, int chunk, int queue)
{
	struct sched_config c = {slots, ctx, batch, chunk, queue};
	sched *s = NULL;
	assert_int_equal(sched_new(&c, &s), 0);
	return s;
}

static int total_tokens(const struct sched_item *it, int n)
{
	int t = 0;
	for (int i = 0; i < n; i++)
		t += it[i].n_tokens;
	return t;
}

static const struct sched_item *find(const struct sched_item *it, int n, uint64_t id)
{
	for (int i = 0; i < n; i++)
		if (it[i].id == id)
			return &it[i];
	return NULL;
}

static void test_config(void **state)
{
	(void)state;
	sched *s = NULL;
	struct sched_config bad[] = {
	    {0, 16, 8, 4, 0},  /* no slots */
	    {2, 16, 8, 7, 0},  /* chunk + slots > batch */
	    {2, 0, 8, 4, 0},   /* no context */
	    {2, 16, 8, 0, 0},  /* no chunk */
	    {2, 16, 8, 4, -1}, /* negative queue */
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(sched_new(&bad[i], &s), ERR_CONFIG);
		assert_null(s);
	}
}

static void test_admission_and_queue(void **state)
{
	(void)state;
	sched *s = make(2, 64, 16, 8, 2);
	assert_int_equal(sched_add(s, 1, 5, 4), 0);
	assert_int_equal(sched_add(s, 2, 5, 4), 0);
	assert_int_equal(sched_add(s, 3, 5, 4), 0);
	assert_int_equal(sched_add(s, 4, 5, 4), 0);
	/* 2 slots + 2 queued: the fifth is refused as "busy" */
	assert_int_equal(sched_add(s, 5, 5, 4), ERR_RANGE);
	/* the same id twice, an empty prompt, no room for output, too long */
	assert_int_equal(sched_add(s, 1, 5, 4), ERR_CONFIG);
	assert_int_equal(sched_add(s, 9, 0, 4), ERR_CONFIG);
	assert_int_equal(sched_add(s, 9, 5, 0), ERR_CONFIG);
	assert_int_equal(sched_add(s, 9, 60, 5), ERR_CONFIG);
	struct sched_item it[16];
	int n = sched_step(s, it, 16);
	/* the two oldest got the slots; both prompts fit in one step */
	assert_int_equal(n, 2);
	assert_int_equal(it[0].id, 1);
	assert_int_equal(it[1].id, 2);
	assert_true(it[0].slot != it[1].slot);
	assert_int_equal(sched_get_state(s, 3), SCHED_QUEUED);
	assert_int_equal(sched_n_queued(s), 2);
	assert_int_equal(sched_n_active(s), 2);
	assert_int_equal(sched_n_kv_used(s), 10);
	/* removing 1 frees its slot for 3 (not 4) */
	int slot1 = it[0].slot;
	assert_int_equal(sched_remove(s, 1), slot1);
	assert_int_equal(sched_remove(s, 1), -1);
	n = sched_step(s, it, 16);
	const struct sched_item *d2 = find(it, n, 2), *p3 = find(it, n, 3);
	assert_non_null(d2);
	assert_non_null(p3);
	assert_null(find(it, n, 4));
	assert_int_equal(d2->decode, 1);
	assert_int_equal(d2->pos, 5);
	assert_int_equal(p3->slot, slot1);
	assert_int_equal(p3->pos, 0);
	assert_int_equal(p3->n_tokens, 5);
	/* a queued request can be removed; it held no slot */
	assert_int_equal(sched_remove(s, 4), -1);
	assert_int_equal(sched_get_state(s, 4), SCHED_NONE);
	sched_destroy(&s);
	assert_null(s);
}

/* A prompt is cut into the same chunks alone or beside other requests. */
static void test_chunks_fixed(void **state)
{
	(void)state;
	int alone[8], n_alone = 0;
	{
		sched *s = make(3, 256, 16, 13, 0);
		assert_int_equal(sched_add(s, 7, 30, 2), 0);
		struct sched_item it[16];
		for (int step = 0; step < 8; step++) {
			int n = sched_step(s, it, 16);
			const struct sched_item *x = find(it, n, 7);
			if (x && !x->decode)
				alone[n_alone++] = x->n_tokens;
		}
		sched_destroy(&s);
	}
	assert_int_equal(n_alone, 3);
	assert_int_equal(alone[0], 13);
	assert_int_equal(alone[1], 13);
	assert_int_equal(alone[2], 4);
	/* now beside two others that decode and prefill at the same time */
	sched *s = make(3, 256, 16, 13, 0);
	assert_int_equal(sched_add(s, 1, 3, 50), 0);
	assert_int_equal(sched_add(s, 2, 11, 50), 0);
	assert_int_equal(sched_add(s, 7, 30, 2), 0);
	struct sched_item it[16];
	int got[8], n_got = 0, pos = 0;
	for (int step = 0; step < 12; step++) {
		int n = sched_step(s, it, 16);
		assert_true(total_tokens(it, n) <= 16);
		const struct sched_item *x = find(it, n, 7);
		if (x && !x->decode) {
			assert_int_equal(x->pos, pos);
			pos += x->n_tokens;
			got[n_got++] = x->n_tokens;
			assert_int_equal(x->sample, pos == 30);
		}
	}
	assert_int_equal(n_got, n_alone);
	assert_memory_equal(got, alone, sizeof(int) * (size_t)n_alone);
	sched_destroy(&s);
}

/* Every running request decodes one token in every step. */
static void test_decode_fairness(void **state)
{
	(void)state;
	sched *s = make(6, 64, 8, 2, 0);
	for (uint64_t id = 1; id <= 6; id++)
		assert_int_equal(sched_add(s, id, 1, 40), 0);
	struct sched_item it[8];
	/* prefills: 6 single tokens fit in one step of 8 */
	int n = sched_step(s, it, 8);
	assert_int_equal(n, 6);
	int served[7] = {0};
	for (int step = 0; step < 6; step++) {
		n = sched_step(s, it, 8);
		assert_int_equal(total_tokens(it, n), 6);
		for (int i = 0; i < n; i++)
			served[it[i].id]++;
	}
	for (int id = 1; id <= 6; id++)
		assert_int_equal(served[id], 6);
	sched_destroy(&s);
}

/* Positions advance by one per decode, and never reach n_ctx. */
static void test_positions(void **state)
{
	(void)state;
	sched *s = make(1, 10, 8, 4, 0);
	assert_int_equal(sched_add(s, 1, 6, 4), 0);
	struct sched_item it[8];
	int n = sched_step(s, it, 8);
	assert_int_equal(n, 1);
	assert_int_equal(it[0].n_tokens, 4);
	assert_int_equal(it[0].sample, 0);
	n = sched_step(s, it, 8);
	assert_int_equal(it[0].n_tokens, 2);
	assert_int_equal(it[0].pos, 4);
	assert_int_equal(it[0].sample, 1);
	/* three more tokens are fed (the fourth generated one never is) */
	for (int k = 0; k < 3; k++) {
		n = sched_step(s, it, 8);
		assert_int_equal(n, 1);
		assert_int_equal(it[0].decode, 1);
		assert_int_equal(it[0].pos, 6 + k);
		assert_true(it[0].pos < 10);
	}
	assert_int_equal(sched_remove(s, 1), 0);
	assert_int_equal(sched_step(s, it, 8), 0);
	sched_destroy(&s);
}

static void test_stops(void **state)
{
	(void)state;
	const char *stops[] = {"END", "", "\n\n"};
	size_t rel;
	assert_int_equal(sched_scan_stops("hello", 5, stops, 3, &rel), 0);
	assert_int_equal(rel, 5);
	/* a tail that may begin a stop string is held */
	assert_int_equal(sched_scan_stops("hello E", 7, stops, 3, &rel), 0);
	assert_int_equal(rel, 6);
	assert_int_equal(sched_scan_stops("hello EN", 8, stops, 3, &rel), 0);
	assert_int_equal(rel, 6);
	assert_int_equal(sched_scan_stops("line\n", 5, stops, 3, &rel), 0);
	assert_int_equal(rel, 4);
	/* found: released up to it, the stop string excluded */
	assert_int_equal(sched_scan_stops("hello END and more", 18, stops, 3, &rel), 1);
	assert_int_equal(rel, 6);
	/* the earliest of several */
	assert_int_equal(sched_scan_stops("a\n\nbEND", 7, stops, 3, &rel), 1);
	assert_int_equal(rel, 1);
	assert_int_equal(sched_scan_stops("", 0, stops, 3, &rel), 0);
	assert_int_equal(rel, 0);
	assert_int_equal(sched_scan_stops("EN", 2, NULL, 0, &rel), 0);
	assert_int_equal(rel, 2);
}

int main(void)
{
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_config),	 cmocka_unit_test(test_admission_and_queue),
	    cmocka_unit_test(test_chunks_fixed), cmocka_unit_test(test_decode_fairness),
	    cmocka_unit_test(test_positions),	 cmocka_unit_test(test_stops),
	};
	return cmocka_run_group_tests_name("sched", tests, NULL, NULL);
}
