/* Faults on the coordinator <-> worker links, driven for real: worker
 * processes are forked from this test and either run the real worker loop or
 * misbehave on purpose.  Checks: a worker speaking another protocol version,
 * one sending garbage and one sending an oversized header are refused while
 * the good workers form the cluster and give the in-process logits bit for
 * bit; with two replicas of every expert, a worker that dies or stops
 * answering at its first batch is replaced within the same step by the
 * survivors (no error) and the logits are unchanged.  A Hello listing the
 * experts of a shard file survives encoding and decoding; ids out of range
 * are refused.  The attention messages (KvPage, AttnBatch, AttnResult) and
 * Hello's kv_bytes survive encoding and decoding, their frame sizes are
 * computed without overflow, and every field out of range is refused; the
 * same for DeepSeek-V4's indexer messages (KvPage of indexer keys, IdxBatch,
 * IdxResult). */
#include <math.h>
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../common/transport.h"
#include "../common/wire.h"
#include "../coordinator/cluster/cluster.h"
#include "../coordinator/model/model.h"
#include "../worker/worker.h"
#include "compare.h"

#define MODEL "qwen3moe-tiny-mxfp4"

enum fake {
	FAKE_GOOD,
	FAKE_BAD_VERSION,
	FAKE_GARBAGE,
	FAKE_OVERSIZED,
	FAKE_DIE_ON_BATCH,
	FAKE_HANG_ON_BATCH
};

static char endpoint[128];

static void child_run(enum fake kind)
{
	transport *t = NULL;
	if (transport_zmq_connect(endpoint, &t))
		_exit(3);
	if (kind == FAKE_GOOD || kind == FAKE_DIE_ON_BATCH || kind == FAKE_HANG_ON_BATCH) {
		char path[4096];
		snprintf(path, sizeof(path), "%s", test_data_path(MODEL ".gguf"));
		/* the real worker loop, told to fail at its first batch */
		struct worker_config cfg = {.model_path = path,
					    .n_threads = 1,
					    .name = kind == FAKE_GOOD ? "good" : "faulty"};
		cfg.fault = kind == FAKE_DIE_ON_BATCH	 ? WORKER_FAULT_DIE
			    : kind == FAKE_HANG_ON_BATCH ? WORKER_FAULT_STOP
							 : WORKER_FAULT_NONE;
		int rc = worker_run(t, &cfg);
		transport_destroy(&t);
		_exit(rc ? 1 : 0);
	}
	struct wire_msg m = {.kind = WIRE_HELLO};
	snprintf(m.u.hello.name, sizeof(m.u.hello.name), "fake");
	m.u.hello.cores = 1;
	m.u.hello.memory_bytes = 1ull << 30;
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	wire_encode(&m, &buf, &cap, &len);
	if (kind == FAKE_BAD_VERSION) {
		/* field 1 (version) is the first varint of the envelope: 08 01 */
		if (len > 2 && buf[0] == 0x08)
			buf[1] = 0x02;
		transport_send(t, 0, buf, len, NULL, 0);
	} else if (kind == FAKE_GARBAGE) {
		uint8_t junk[64];
		for (size_t i = 0; i < sizeof(junk); i++)
			junk[i] = (uint8_t)(i * 37 + 11);
		transport_send(t, 0, junk, sizeof(junk), NULL, 0);
	} else if (kind == FAKE_OVERSIZED) {
		size_t big = WIRE_MAX_HEADER + 1024;
		uint8_t *b = calloc(1, big);
		if (b)
			transport_send(t, 0, b, big, NULL, 0);
		free(b);
	}
	free(buf);
	sleep(30); /* stay connected; the parent kills us */
	_exit(0);
}

static pid_t spawn(enum fake kind)
{
	pid_t pid = fork();
	if (pid == 0)
		child_run(kind);
	return pid;
}

static void reap(pid_t *pids, int n)
{
	for (int i = 0; i < n; i++) {
		kill(pids[i], SIGKILL);
		kill(pids[i], SIGCONT);
		waitpid(pids[i], NULL, 0);
	}
}

struct run {
	struct test_case tc;
	float *logits;
};

/* Runs the test case on a model whose experts come from `n_workers` workers
 * (0: in-process).  Returns model_forward's first error, or 0. */
static int run_model(int n_workers, int replicas, struct run *r, double *seconds)
{
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = 1;
	mp.n_ctx = r->tc.n_tokens;
	model *m = NULL;
	assert_int_equal(model_open(test_data_path(MODEL ".gguf"), &mp, &m), 0);
	if (n_workers > 0) {
		transport *t = NULL;
		assert_int_equal(transport_zmq_listen(endpoint, &t), 0);
		struct cluster_config cfg = {.g = model_get_gguf(m),
					     .spec = &model_get_info(m)->moe,
					     .n_workers = n_workers,
					     .replicas = replicas,
					     .timeout_ms = 1000,
					     .join_timeout_ms = 20000};
		cluster *c = NULL;
		assert_int_equal(cluster_new(t, &cfg, model_get_pool(m), &c), 0);
		expert_backend *b = NULL;
		assert_int_equal(cluster_backend(c, &b), 0);
		model_set_experts(m, b);
	}
	const int n = r->tc.n_tokens, V = r->tc.n_vocab;
	int first_rc = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	/* one decode step per token so that a failure hits one step only; a
	 * failed step is retried once (a new request on the same model) */
	for (int i = 0; i < n; i++) {
		int32_t pos = i, seq = 0;
		model_batch b = {1, &r->tc.tokens[i], &pos, &seq, NULL};
		int rc = model_forward(m, &b, r->logits + (size_t)i * V);
		if (rc) {
			if (!first_rc)
				first_rc = rc;
			clock_gettime(CLOCK_MONOTONIC, &t1);
			*seconds = (double)(t1.tv_sec - t0.tv_sec) +
				   1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
			/* replay the sequence from the start, as a server would */
			model_reset_seq(m, 0);
			rc = 0;
			for (int j = 0; j <= i && !rc; j++) {
				int32_t p2 = j;
				model_batch b2 = {1, &r->tc.tokens[j], &p2, &seq, NULL};
				rc = model_forward(m, &b2, r->logits + (size_t)j * V);
			}
			if (rc) {
				print_message("replay failed at %d: %d\n", i, rc);
				model_destroy(&m);
				return first_rc;
			}
		}
	}
	model_destroy(&m);
	return first_rc;
}

static void load_run(struct run *r)
{
	assert_int_equal(test_case_load(MODEL, &r->tc), 0);
	r->logits = calloc((size_t)r->tc.n_tokens * r->tc.n_vocab, sizeof(float));
	assert_non_null(r->logits);
}

static void free_run(struct run *r)
{
	free(r->logits);
	test_case_free(&r->tc);
}

static void test_bad_peers_refused(void **state)
{
	(void)state;
	struct run ref, got;
	load_run(&ref);
	load_run(&got);
	double s;
	assert_int_equal(run_model(0, 1, &ref, &s), 0);
	pid_t pids[5];
	pids[0] = spawn(FAKE_BAD_VERSION);
	pids[1] = spawn(FAKE_GARBAGE);
	pids[2] = spawn(FAKE_OVERSIZED);
	sleep(1); /* let the bad ones arrive first */
	pids[3] = spawn(FAKE_GOOD);
	pids[4] = spawn(FAKE_GOOD);
	assert_int_equal(run_model(2, 1, &got, &s), 0);
	reap(pids, 5);
	assert_memory_equal(ref.logits, got.logits,
			    sizeof(float) * (size_t)ref.tc.n_tokens * ref.tc.n_vocab);
	free_run(&ref);
	free_run(&got);
}

static void lost_worker(enum fake kind)
{
	struct run ref, got;
	load_run(&ref);
	load_run(&got);
	double s = 0;
	assert_int_equal(run_model(0, 1, &ref, &s), 0);
	pid_t pids[3];
	pids[0] = spawn(FAKE_GOOD);
	pids[1] = spawn(FAKE_GOOD);
	pids[2] = spawn(kind);
	int rc = run_model(3, 2, &got, &s);
	reap(pids, 3);
	/* the step that met the fault was finished by the surviving replicas:
	 * no error, no replay, and the logits are unchanged */
	assert_int_equal(rc, 0);
	print_message("step with the fault finished after %.2f s\n", s);
	assert_true(s < 5.0);
	assert_memory_equal(ref.logits, got.logits,
			    sizeof(float) * (size_t)ref.tc.n_tokens * ref.tc.n_vocab);
	free_run(&ref);
	free_run(&got);
}

static void test_worker_dies(void **state)
{
	(void)state;
	lost_worker(FAKE_DIE_ON_BATCH);
}

static void test_worker_hangs(void **state)
{
	(void)state;
	lost_worker(FAKE_HANG_ON_BATCH);
}

/* Hello with a shard file's experts: the pairs come back grouped by layer;
 * a layer beyond MOE_MAX_LAYERS cannot be encoded, an expert id beyond
 * WIRE_MAX_EXPERTS is refused by the decoder. */
static void test_hello_held(void **state)
{
	(void)state;
	uint32_t pl[5] = {2, 0, 2, 0, 7}, pe[5] = {5, 1, 3, 0, 9};
	struct wire_msg m = {.kind = WIRE_HELLO}, d;
	m.u.hello.has_model = 1;
	m.u.hello.shard_file = 1;
	m.u.hello.n_held = 5;
	m.u.hello.held_layer = pl;
	m.u.hello.held_expert = pe;
	snprintf(m.u.hello.model_sha, sizeof(m.u.hello.model_sha), "moefleet1:0123");
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	assert_int_equal(wire_encode(&m, &buf, &cap, &len), 0);
	assert_int_equal(wire_decode(buf, len, "test", &d), 0);
	assert_int_equal(d.kind, WIRE_HELLO);
	assert_true(d.u.hello.shard_file && d.u.hello.has_model);
	assert_string_equal(d.u.hello.model_sha, "moefleet1:0123");
	const uint32_t wl[5] = {0, 0, 2, 2, 7}, we[5] = {1, 0, 5, 3, 9};
	assert_int_equal(d.u.hello.n_held, 5);
	assert_memory_equal(d.u.hello.held_layer, wl, sizeof(wl));
	assert_memory_equal(d.u.hello.held_expert, we, sizeof(we));
	wire_msg_free(&d);
	/* a full model file: nothing listed */
	m.u.hello.shard_file = 0;
	assert_int_equal(wire_encode(&m, &buf, &cap, &len), 0);
	assert_int_equal(wire_decode(buf, len, "test", &d), 0);
	assert_int_equal(d.u.hello.shard_file, 0);
	assert_int_equal(d.u.hello.n_held, 0);
	wire_msg_free(&d);
	m.u.hello.shard_file = 1;
	pe[1] = WIRE_MAX_EXPERTS;
	assert_int_equal(wire_encode(&m, &buf, &cap, &len), 0);
	assert_int_equal(wire_decode(buf, len, "test", &d), ERR_PROTO);
	pe[1] = 1;
	pl[4] = MOE_MAX_LAYERS;
	assert_int_equal(wire_encode(&m, &buf, &cap, &len), ERR_RANGE);
	free(buf);
}

/* Encodes m and decodes it into d; returns wire_decode's code. */
static int round_trip(const struct wire_msg *m, struct wire_msg *d)
{
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	assert_int_equal(wire_encode(m, &buf, &cap, &len), 0);
	int rc = wire_decode(buf, len, "test", d);
	free(buf);
	return rc;
}

/* m survives encoding and decoding into *d: the same kind and the same
 * first `body` bytes of its body (one without arrays). */
static void round_trip_same(const struct wire_msg *m, size_t body, struct wire_msg *d)
{
	assert_int_equal(round_trip(m, d), 0);
	assert_int_equal(d->kind, m->kind);
	assert_memory_equal(&d->u, &m->u, body);
}

static void test_attn_wire_round_trip(void **state)
{
	(void)state;
	struct wire_msg m = {.kind = WIRE_HELLO}, d;
	m.u.hello.kv_bytes = 3ull << 40;
	m.u.hello.memory_bytes = 5;
	m.u.hello.kv_shared = 1;
	assert_int_equal(round_trip(&m, &d), 0);
	assert_int_equal(d.u.hello.kv_bytes, 3ull << 40);
	assert_int_equal(d.u.hello.memory_bytes, 5);
	assert_int_equal(d.u.hello.kv_shared, 1);
	wire_msg_free(&d);

	m = (struct wire_msg){.kind = WIRE_KV_PAGE,
			      .u.kv_page = {7, 3, 12, 128, 576, 0, WIRE_KV_ATTN}};
	round_trip_same(&m, sizeof(m.u.kv_page), &d);
	assert_int_equal(wire_kv_page_frame_bytes(&d.u.kv_page), 128 * 576 * 2);
	d.u.kv_page.v_width = 512;
	assert_int_equal(wire_kv_page_frame_bytes(&d.u.kv_page), 128 * (576 + 512) * 2);
	wire_msg_free(&d);

	/* KvFree: seq 0 (a field proto3 does not send) and the largest */
	const uint32_t free_seqs[] = {0, 5, INT32_MAX};
	for (size_t i = 0; i < sizeof(free_seqs) / sizeof(free_seqs[0]); i++) {
		m = (struct wire_msg){.kind = WIRE_KV_FREE, .u.kv_free = {free_seqs[i]}};
		round_trip_same(&m, sizeof(m.u.kv_free), &d);
		assert_int_equal(d.u.kv_free.seq, free_seqs[i]);
		wire_msg_free(&d);
	}
	assert_string_equal(wire_kind_name(WIRE_KV_FREE), "kv_free");

	int32_t seq[3] = {0, 4, 4}, pos[3] = {0, 700, 1 << 30};
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ATTN_BATCH;
	m.u.attn_batch = (struct wire_attn_batch){.step = 1ull << 40,
						  .layer = 60,
						  .n_rows = 3,
						  .n_head = 64,
						  .n_head_kv = 8,
						  .head_dim_k = 128,
						  .head_dim_v = 64,
						  .scale = 0.088f,
						  .page = 256,
						  .n_shard = 8,
						  .v0 = 4,
						  .v1 = 8,
						  .seq = seq,
						  .pos = pos};
	assert_int_equal(round_trip(&m, &d), 0);
	assert_int_equal(d.kind, WIRE_ATTN_BATCH);
	const struct wire_attn_batch *a = &m.u.attn_batch, *b = &d.u.attn_batch;
	assert_true(b->step == a->step && b->layer == a->layer && b->n_rows == a->n_rows &&
		    b->n_head == a->n_head && b->n_head_kv == a->n_head_kv &&
		    b->head_dim_k == a->head_dim_k && b->head_dim_v == a->head_dim_v &&
		    b->scale == a->scale && b->page == a->page && b->n_shard == a->n_shard &&
		    b->v0 == a->v0 && b->v1 == a->v1);
	assert_memory_equal(b->seq, seq, sizeof(seq));
	assert_memory_equal(b->pos, pos, sizeof(pos));
	assert_int_equal(wire_attn_batch_frame_bytes(b), 3 * 64 * 128 * 4);
	wire_msg_free(&d);
	/* no rows: empty arrays */
	m.u.attn_batch.n_rows = 0;
	assert_int_equal(round_trip(&m, &d), 0);
	assert_int_equal(d.u.attn_batch.n_rows, 0);
	assert_int_equal(wire_attn_batch_frame_bytes(&d.u.attn_batch), 0);
	wire_msg_free(&d);

	m = (struct wire_msg){.kind = WIRE_ATTN_RESULT, .u.attn_result = {9, 3, 5, 16, 512, 0.25}};
	round_trip_same(&m, sizeof(m.u.attn_result), &d);
	assert_int_equal(wire_attn_result_frame_bytes(&d.u.attn_result), 5 * 16 * (2 + 512) * 4);
	wire_msg_free(&d);
	assert_string_equal(wire_kind_name(WIRE_ATTN_RESULT), "attn_result");

	/* frame sizes of fields beyond every cap do not wrap around */
	const struct wire_kv_page hp = {0, 0, 0, UINT32_MAX, UINT32_MAX, UINT32_MAX, WIRE_KV_ATTN};
	const struct wire_attn_batch hb = {
	    .n_rows = UINT32_MAX, .n_head = UINT32_MAX, .head_dim_k = UINT32_MAX};
	const struct wire_attn_result hr = {
	    .n_rows = UINT32_MAX, .n_head = UINT32_MAX, .head_dim_v = UINT32_MAX};
	assert_true(wire_kv_page_frame_bytes(&hp) == SIZE_MAX);
	assert_true(wire_attn_batch_frame_bytes(&hb) == SIZE_MAX);
	assert_true(wire_attn_result_frame_bytes(&hr) == SIZE_MAX);
}

/* Decodes a hand-built AttnBatch envelope of 2 rows (seq {0, 1}) with n_pos
 * positions (1..3: {1, 2, 3}). */
static int attn_batch_envelope(int n_pos, struct wire_msg *d)
{
	const uint8_t body[] = {
	    0x10, 2,		  /* layer */
	    0x18, 2,		  /* n_rows */
	    0x20, 8,		  /* n_head */
	    0x28, 2,		  /* n_head_kv */
	    0x30, 64,		  /* head_dim_k */
	    0x38, 64,		  /* head_dim_v */
	    0x45, 0,  0, 0, 0x3e, /* scale 0.125f */
	    0x48, 64,		  /* page */
	    0x50, 4,		  /* n_shard */
	    0x60, 2,		  /* v1 */
	    0x6a, 2,  0, 2,	  /* seq: packed sint32 {0, 1} */
	};
	uint8_t env[64];
	size_t n = 0;
	env[n++] = 0x08; /* version */
	env[n++] = WIRE_VERSION;
	env[n++] = 0x7a; /* field 15 (attn_batch), length-delimited */
	env[n++] = (uint8_t)(sizeof(body) + 2 + (size_t)n_pos);
	memcpy(env + n, body, sizeof(body));
	n += sizeof(body);
	env[n++] = 0x72; /* pos: packed sint32 {1, 2, 3}, zigzag */
	env[n++] = (uint8_t)n_pos;
	for (int i = 1; i <= n_pos; i++)
		env[n++] = (uint8_t)(2 * i);
	int rc = wire_decode(env, n, "test", d);
	if (!rc) {
		assert_int_equal(d->u.attn_batch.n_rows, 2);
		assert_int_equal(d->u.attn_batch.seq[1], 1);
		assert_int_equal(d->u.attn_batch.pos[1], 2);
		wire_msg_free(d);
	}
	return rc;
}

/* Each case breaks one field of a valid message; the decoder must refuse it. */
static void test_attn_wire_refused(void **state)
{
	(void)state;
	struct wire_msg m, d;
	const struct wire_kv_page good_page = {7, 3, 12, 128, 576, 0, WIRE_KV_ATTN};
	struct wire_kv_page bad_pages[] = {
	    {MOE_MAX_LAYERS, 3, 12, 128, 576, 0, WIRE_KV_ATTN},		 /* layer */
	    {7, (uint32_t)INT32_MAX + 1, 12, 128, 576, 0, WIRE_KV_ATTN}, /* seq */
	    {7, 3, 12, 0, 576, 0, WIRE_KV_ATTN},			 /* n_pos 0 */
	    {7, 3, 12, 96, 576, 0, WIRE_KV_ATTN},			 /* not a multiple of 64 */
	    {7, 3, 0, (1u << 20) + 64, 576, 0, WIRE_KV_ATTN},		 /* n_pos beyond the cap */
	    {7, 3, (1u << 31) / 128, 128, 576, 0, WIRE_KV_ATTN}, /* positions beyond int32 */
	    {7, 3, 12, 128, 0, 0, WIRE_KV_ATTN},		 /* no keys */
	    {7, 3, 12, 128, (1u << 16) + 1, 0, WIRE_KV_ATTN},	 /* k_width */
	    {7, 3, 12, 128, 576, (1u << 16) + 1, WIRE_KV_ATTN},	 /* v_width */
	};
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_KV_PAGE;
	m.u.kv_page = good_page;
	assert_int_equal(round_trip(&m, &d), 0);
	wire_msg_free(&d);
	/* the last page whose positions fit an int32 */
	m.u.kv_page.page = (1u << 31) / 128 - 1;
	assert_int_equal(round_trip(&m, &d), 0);
	wire_msg_free(&d);
	for (size_t i = 0; i < sizeof(bad_pages) / sizeof(bad_pages[0]); i++) {
		m.u.kv_page = bad_pages[i];
		if (round_trip(&m, &d) != ERR_PROTO)
			fail_msg("bad kv page %zu accepted", i);
	}
	m = (struct wire_msg){.kind = WIRE_KV_FREE, .u.kv_free = {(uint32_t)INT32_MAX + 1}};
	assert_int_equal(round_trip(&m, &d), ERR_PROTO); /* seq */

	int32_t seq[2] = {0, 1}, pos[2] = {64, 65};
	const struct wire_attn_batch good = {.step = 1,
					     .layer = 2,
					     .n_rows = 2,
					     .n_head = 8,
					     .n_head_kv = 2,
					     .head_dim_k = 64,
					     .head_dim_v = 64,
					     .scale = 0.125f,
					     .page = 64,
					     .n_shard = 4,
					     .v0 = 0,
					     .v1 = 2,
					     .seq = seq,
					     .pos = pos};
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ATTN_BATCH;
	m.u.attn_batch = good;
	assert_int_equal(round_trip(&m, &d), 0);
	wire_msg_free(&d);
	for (int i = 0;; i++) {
		struct wire_attn_batch *b = &m.u.attn_batch;
		*b = good;
		seq[1] = 1;
		pos[1] = 65;
		switch (i) {
		case 0: b->layer = MOE_MAX_LAYERS; break;
		case 1: b->n_head = 0; break;
		case 2: b->n_head = 1026, b->n_head_kv = 2; break;
		case 3: b->n_head_kv = 3; break;
		case 4: b->n_head_kv = 0; break;
		case 5: b->n_head_kv = 16; break;
		case 6: b->head_dim_k = 0; break;
		case 7: b->head_dim_k = 1025; break;
		case 8: b->head_dim_v = 0; break;
		case 9: b->head_dim_v = 1025; break;
		case 10: b->scale = NAN; break;
		case 11: b->scale = INFINITY; break;
		case 12: b->page = 0; break;
		case 13: b->page = 100; break;
		case 14: b->page = (1u << 20) + 64; break;
		case 15: b->n_shard = 0; break;
		case 16: b->n_shard = 6, b->v1 = 1; break;
		case 17: b->n_shard = 128, b->v1 = 1; break;
		case 18: b->v0 = 2; break;
		case 19: b->v0 = 3, b->v1 = 1; break;
		case 20: b->v1 = 5; break;
		case 21: seq[1] = -1; break;
		case 22: pos[1] = -1; break;
		default: b = NULL; break;
		}
		if (!b)
			break;
		if (round_trip(&m, &d) != ERR_PROTO)
			fail_msg("bad attention batch %d accepted", i);
	}
	/* seq and pos arrays of another length than n_rows: hand-built
	 * envelopes (the encoder writes n_rows entries) */
	struct wire_msg e;
	for (int n_pos = 1; n_pos <= 3; n_pos++)
		assert_int_equal(attn_batch_envelope(n_pos, &e), n_pos == 2 ? 0 : ERR_PROTO);
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ATTN_RESULT;
	const struct wire_attn_result good_r = {9, 3, 5, 16, 512, 0.25};
	const struct wire_attn_result bad_r[] = {
	    {9, MOE_MAX_LAYERS, 5, 16, 512, 0.25},
	    {9, 3, WIRE_MAX_ROWS + 1, 16, 512, 0.25},
	    {9, 3, 5, 0, 512, 0.25},
	    {9, 3, 5, 1025, 512, 0.25},
	    {9, 3, 5, 16, 0, 0.25},
	    {9, 3, 5, 16, 1025, 0.25},
	    {9, 3, 5, 16, 512, -1},
	    {9, 3, 5, 16, 512, NAN},
	};
	m.u.attn_result = good_r;
	assert_int_equal(round_trip(&m, &d), 0);
	wire_msg_free(&d);
	for (size_t i = 0; i < sizeof(bad_r) / sizeof(bad_r[0]); i++) {
		m.u.attn_result = bad_r[i];
		if (round_trip(&m, &d) != ERR_PROTO)
			fail_msg("bad attention result %zu accepted", i);
	}
	/* too many rows cannot be encoded */
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ATTN_BATCH;
	m.u.attn_batch = good;
	m.u.attn_batch.n_rows = WIRE_MAX_ROWS + 1;
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	assert_int_equal(wire_encode(&m, &buf, &cap, &len), ERR_RANGE);
	free(buf);
}

/* DeepSeek-V4's indexer messages: an indexer KvPage, IdxBatch and IdxResult
 * survive encoding and decoding, their frame sizes do not wrap, and every
 * field out of range is refused. */
static void test_idx_wire(void **state)
{
	(void)state;
	struct wire_msg m = {.kind = WIRE_KV_PAGE}, d;
	m.u.kv_page = (struct wire_kv_page){7, 3, 12, 16, 128, 0, WIRE_KV_IDX};
	round_trip_same(&m, sizeof(m.u.kv_page), &d);
	assert_int_equal(wire_kv_page_frame_bytes(&d.u.kv_page), 16 * 128 * 2);
	wire_msg_free(&d);
	const struct wire_kv_page bad_pages[] = {
	    {7, 3, 12, 16, 128, 0, 2},			      /* kind */
	    {7, 3, 12, 24, 128, 0, WIRE_KV_IDX},	      /* not a multiple of 16 */
	    {7, 3, 12, 16, 128, 64, WIRE_KV_IDX},	      /* values */
	    {7, 3, (1u << 31) / 16, 16, 128, 0, WIRE_KV_IDX}, /* entries beyond int32 */
	    {7, 3, 12, 16, 128, 0, WIRE_KV_ATTN},	      /* an attention page of 16 */
	};
	for (size_t i = 0; i < sizeof(bad_pages) / sizeof(bad_pages[0]); i++) {
		m.u.kv_page = bad_pages[i];
		if (round_trip(&m, &d) != ERR_PROTO)
			fail_msg("bad indexer page %zu accepted", i);
	}

	int32_t seq[2] = {0, 5}, pos[2] = {3000, 1 << 30};
	const struct wire_idx_batch good = {.step = 1ull << 40,
					    .layer = 60,
					    .n_rows = 2,
					    .n_head = 64,
					    .dim = 128,
					    .page = 64,
					    .n_shard = 8,
					    .v0 = 4,
					    .v1 = 8,
					    .seq = seq,
					    .pos = pos};
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_IDX_BATCH;
	m.u.idx_batch = good;
	assert_int_equal(round_trip(&m, &d), 0);
	assert_int_equal(d.kind, WIRE_IDX_BATCH);
	const struct wire_idx_batch *b = &d.u.idx_batch;
	assert_true(b->step == good.step && b->layer == good.layer && b->n_rows == 2 &&
		    b->n_head == 64 && b->dim == 128 && b->page == 64 && b->n_shard == 8 &&
		    b->v0 == 4 && b->v1 == 8);
	assert_memory_equal(b->seq, seq, sizeof(seq));
	assert_memory_equal(b->pos, pos, sizeof(pos));
	assert_int_equal(wire_idx_batch_frame_bytes(b), 2 * 64 * (128 + 1) * 4);
	wire_msg_free(&d);
	for (int i = 0;; i++) {
		struct wire_idx_batch *x = &m.u.idx_batch;
		*x = good;
		seq[1] = 5;
		pos[1] = 1 << 30;
		switch (i) {
		case 0: x->layer = MOE_MAX_LAYERS; break;
		case 1: x->n_head = 0; break;
		case 2: x->n_head = 1025; break;
		case 3: x->dim = 0; break;
		case 4: x->dim = 1025; break;
		case 5: x->page = 0; break;
		case 6: x->page = 40; break;
		case 7: x->page = (1u << 20) + 16; break;
		case 8: x->n_shard = 0; break;
		case 9: x->n_shard = 6; break;
		case 10: x->n_shard = 128; break;
		case 11: x->v0 = 8; break;
		case 12: x->v1 = 9; break;
		case 13: seq[1] = -1; break;
		case 14: pos[1] = -1; break;
		default: x = NULL; break;
		}
		if (!x)
			break;
		if (round_trip(&m, &d) != ERR_PROTO)
			fail_msg("bad indexer batch %d accepted", i);
	}
	m.u.idx_batch = good;
	m.u.idx_batch.n_rows = WIRE_MAX_ROWS + 1;
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	assert_int_equal(wire_encode(&m, &buf, &cap, &len), ERR_RANGE);
	free(buf);

	m = (struct wire_msg){.kind = WIRE_IDX_RESULT, .u.idx_result = {9, 3, 5, 640, 0.25}};
	round_trip_same(&m, sizeof(m.u.idx_result), &d);
	assert_int_equal(wire_idx_result_frame_bytes(&d.u.idx_result), 640 * 4);
	wire_msg_free(&d);
	assert_string_equal(wire_kind_name(WIRE_IDX_RESULT), "idx_result");
	const struct wire_idx_result bad_r[] = {
	    {9, MOE_MAX_LAYERS, 5, 640, 0.25},
	    {9, 3, WIRE_MAX_ROWS + 1, 640, 0.25},
	    {9, 3, 5, 640, -1},
	    {9, 3, 5, 640, NAN},
	};
	for (size_t i = 0; i < sizeof(bad_r) / sizeof(bad_r[0]); i++) {
		m.u.idx_result = bad_r[i];
		if (round_trip(&m, &d) != ERR_PROTO)
			fail_msg("bad indexer result %zu accepted", i);
	}
	const struct wire_idx_batch hb = {
	    .n_rows = UINT32_MAX, .n_head = UINT32_MAX, .dim = UINT32_MAX};
	assert_true(wire_idx_batch_frame_bytes(&hb) == SIZE_MAX);
}

int main(void)
{
	snprintf(endpoint, sizeof(endpoint), "ipc:///tmp/moefleet-faults-%d.sock", (int)getpid());
	log_set_quiet(1);
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_hello_held),	      cmocka_unit_test(test_attn_wire_round_trip),
	    cmocka_unit_test(test_attn_wire_refused), cmocka_unit_test(test_bad_peers_refused),
	    cmocka_unit_test(test_worker_dies),	      cmocka_unit_test(test_worker_hangs),
	    cmocka_unit_test(test_idx_wire),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
