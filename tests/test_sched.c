/* The continuous-batching scheduler (coordinator/serve/sched.c) without a model:
 * admission order and the bounded queue, the token budget, whole prefill
 * chunks cut the same way whatever else runs, one decode per running request
 * per step, slot reuse and context refusal, stop strings, and admission by
 * the KV hosts' room (kvroom.c) through the pick hook: an ended request's
 * pages give their room back, and only a request that would not fit with
 * every slot empty is refused. */
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
#include "../coordinator/serve/kvroom.h"
#include "../coordinator/serve/sched.h"

static sched *make(int slots, int ctx, int batch, int chunk, int queue)
{
	struct sched_config c = {slots, ctx, batch, chunk, queue, NULL, NULL};
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
	    {0, 16, 8, 4, 0, NULL, NULL},  /* no slots */
	    {2, 16, 8, 7, 0, NULL, NULL},  /* chunk + slots > batch */
	    {2, 0, 8, 4, 0, NULL, NULL},   /* no context */
	    {2, 16, 8, 0, 0, NULL, NULL},  /* no chunk */
	    {2, 16, 8, 4, -1, NULL, NULL}, /* negative queue */
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

/* Hosts of 4 chains of 64 positions, 1 layer, pages of 100 bytes and no
 * tables, each host offering `budget` bytes. */
static struct attn_kv_room room(int n_hosts, uint64_t budget)
{
	struct attn_kv_room g = {.n_hosts = n_hosts, .n_shard = 4, .page = 64, .n_layer = 1};
	g.page_bytes = 100;
	for (int h = 0; h < n_hosts; h++)
		g.budget[h] = budget;
	return g;
}

static void test_kvroom(void **state)
{
	(void)state;
	kvroom *k = NULL;
	struct attn_kv_room g = room(2, 300);
	assert_int_equal(kvroom_new(&g, 2, &k), 0);
	assert_int_equal(kvroom_need(k, 64), 0);
	assert_int_equal(kvroom_need(k, 65), 1);
	assert_int_equal(kvroom_need(k, 321), 5);
	/* 5 pages: chains 0..3 hold 2, 1, 1, 1; host 0 (chains 0, 1) 3 of its 3 */
	assert_true(kvroom_fits(k, 0, 321));
	assert_false(kvroom_fits(k, 0, 385)); /* 6: chain 1 gets a second, host 0 4 */
	assert_false(kvroom_ever(k, 385));
	kvroom_take(k, 0, 321);
	int64_t held, total;
	kvroom_pages(k, 0, &held, &total);
	assert_int_equal(held, 3);
	assert_int_equal(total, 3);
	kvroom_pages(k, 1, &held, &total);
	assert_int_equal(held, 2);
	/* slot 1 would add 1 page on host 0: full; slot 0 reuses its own */
	assert_false(kvroom_fits(k, 1, 129));
	assert_true(kvroom_fits(k, 0, 129));
	const uint8_t busy0[2] = {1, 0}, free2[2] = {0, 0};
	assert_int_equal(kvroom_pick(k, busy0, 129), -1);
	assert_int_equal(kvroom_pick(k, free2, 129), 0);
	assert_true(kvroom_ever(k, 129));
	/* one host left: it may hold every page of slot 0's request (5), of 6 */
	g = room(1, 600);
	assert_int_equal(kvroom_rehost(k, &g), 0);
	kvroom_pages(k, 0, &held, &total);
	assert_int_equal(held, 5);
	assert_int_equal(total, 6);
	assert_true(kvroom_fits(k, 1, 65));
	assert_false(kvroom_fits(k, 1, 129));
	/* the request ends: its pages are freed, the host has room for 6 */
	kvroom_release(k, 0);
	kvroom_pages(k, 0, &held, &total);
	assert_int_equal(held, 0);
	assert_true(kvroom_fits(k, 1, 385));
	/* two requests of 3 pages fill it; one of 6 waits for both to end, and
	 * is not refused: it fits once the slots are empty */
	kvroom_take(k, 0, 193);
	kvroom_take(k, 1, 193);
	kvroom_pages(k, 0, &held, &total);
	assert_int_equal(held, 6);
	assert_true(kvroom_ever(k, 385));
	assert_false(kvroom_ever(k, 449)); /* 7 pages never fit */
	assert_false(kvroom_fits(k, 0, 385));
	kvroom_release(k, 0);
	kvroom_pages(k, 0, &held, &total);
	assert_int_equal(held, 3);
	const uint8_t busy1[2] = {0, 1}; /* slot 1 runs */
	assert_int_equal(kvroom_pick(k, busy1, 193), 0);
	assert_int_equal(kvroom_pick(k, busy1, 385), -1);
	kvroom_release(k, 1);
	kvroom_pages(k, 0, &held, &total);
	assert_int_equal(held, 0);
	assert_true(kvroom_fits(k, 0, 385));
	assert_int_equal(kvroom_pick(k, free2, 385), 0);
	/* no hosts: everything fits */
	g = room(0, 0);
	assert_int_equal(kvroom_rehost(k, &g), 0);
	assert_true(kvroom_ever(k, 1 << 20));
	kvroom_destroy(&k);
	assert_null(k);
	g = room(3, 100); /* 3 hosts for 4 chains */
	assert_int_equal(kvroom_new(&g, 2, &k), ERR_CONFIG);
	assert_null(k);
}

static uint64_t refused;

/* The pick hook the server uses, over a kvroom. */
static int pick(void *ctx, uint64_t id, int n_pos, const uint8_t *busy)
{
	kvroom *k = ctx;
	if (!kvroom_ever(k, n_pos)) {
		refused = id;
		return -2;
	}
	const int slot = kvroom_pick(k, busy, n_pos);
	if (slot >= 0)
		kvroom_take(k, slot, n_pos);
	return slot;
}

static void test_pick_hook(void **state)
{
	(void)state;
	kvroom *k = NULL;
	struct attn_kv_room g = room(1, 1000); /* 10 pages */
	assert_int_equal(kvroom_new(&g, 2, &k), 0);
	struct sched_config c = {2, 1000, 64, 8, 4, pick, k};
	sched *s = NULL;
	assert_int_equal(sched_new(&c, &s), 0);
	struct sched_item it[64];
	assert_int_equal(sched_add(s, 1, 1, 320), 0); /* 321 positions: 5 pages */
	assert_int_equal(sched_add(s, 2, 1, 384), 0); /* 6 pages: not beside 1 */
	assert_int_equal(sched_add(s, 3, 1, 64), 0);  /* 1 page, behind 2 */
	sched_step(s, it, 64);
	assert_int_equal(sched_get_state(s, 1), SCHED_DECODE);
	assert_int_equal(sched_get_state(s, 2), SCHED_QUEUED);
	assert_int_equal(sched_get_state(s, 3), SCHED_QUEUED); /* first come, first served */
	int fed = 0;
	assert_int_equal(sched_get_slot(s, 1, &fed), 0);
	assert_int_equal(fed, 1);
	assert_int_equal(sched_get_slot(s, 2, &fed), -1);
	/* 1 ends (its pages freed): 2 takes a slot, 3 the other beside it */
	assert_int_equal(sched_remove(s, 1), 0);
	kvroom_release(k, 0);
	sched_step(s, it, 64);
	assert_int_equal(sched_get_state(s, 2), SCHED_DECODE);
	assert_int_equal(sched_get_slot(s, 2, &fed), 0);
	assert_int_equal(sched_get_state(s, 3), SCHED_DECODE);
	assert_int_equal(sched_get_slot(s, 3, &fed), 1);
	/* 11 pages never fit: dropped from the queue once a slot is free, the
	 * hook says so */
	assert_int_equal(sched_add(s, 4, 1, 704), 0);
	sched_step(s, it, 64);
	assert_int_equal(sched_get_state(s, 4), SCHED_QUEUED);
	assert_int_equal(sched_remove(s, 3), 1);
	kvroom_release(k, 1);
	sched_step(s, it, 64);
	assert_int_equal(refused, 4);
	assert_int_equal(sched_get_state(s, 4), SCHED_NONE);
	assert_int_equal(sched_n_queued(s), 0);
	sched_destroy(&s);
	kvroom_destroy(&k);
}

int main(void)
{
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_config),	 cmocka_unit_test(test_admission_and_queue),
	    cmocka_unit_test(test_chunks_fixed), cmocka_unit_test(test_decode_fairness),
	    cmocka_unit_test(test_positions),	 cmocka_unit_test(test_stops),
	    cmocka_unit_test(test_kvroom),	 cmocka_unit_test(test_pick_hook),
	};
	return cmocka_run_group_tests_name("sched", tests, NULL, NULL);
}
