/* KV hosts: a forked process runs the real worker loop (worker_run) over an
 * ipc:// ZeroMQ link and this test acts as its coordinator by hand.
 *
 * - Hello says how much memory the worker offers for KV pages;
 * - KvPages of random F16 keys and values (P = 64) for 2 sequences on 2
 *   layers -- one GQA layer with values of their own, one MLA-style layer
 *   (v_width 0: the values are the keys' first values) of which only the
 *   pages of chains [0, 2) of V = 4 are sent -- then AttnBatches for chains
 *   [0, 2) and [2, 4) with rows at positions before, on and after page
 *   boundaries: every AttnResult frame must be bit-identical to
 *   attn_host_forward() run here on the same pages, and rows that see pages
 *   must have a positive sum;
 * - refused with an Error, after which the worker keeps serving: a batch
 *   needing a page that was never sent, a batch on a layer without pages, a
 *   page beyond the KV budget, a page whose sizes differ from its layer's,
 *   frames of the wrong size for KvPage and AttnBatch, a batch whose result
 *   would exceed the frame cap; a batch of no rows (and no frame) gets an
 *   empty AttnResult; its Stats count the batches answered, their rows, and
 *   the pages held; after Shutdown(rejoin) the worker says Hello again and
 *   holds no page;
 * - DeepSeek-V4's indexer: KvPages of indexer keys on a layer that also has
 *   attention pages, IdxBatches for chains [0, 2), [2, 4) and [0, 4): every
 *   IdxResult frame is the scores of indexer_score() run here (and close to
 *   the formula in double); a missing page, a layer without indexer pages, a
 *   frame of the wrong size and a result beyond the frame cap are refused;
 * - KvFree drops a sequence's pages of every layer and kind: Stats count
 *   fewer pages and bytes, its rows are refused, the other sequence serves
 *   the same, its pages sent again are kept;
 * - a --kv-only worker (cfg.kv_only) offers 0 bytes for experts and serves
 *   the same; worker_budgets() splits a node's memory without overlap;
 * - kvstore on its own: replacing a page keeps the bytes counted, missing
 *   pages have k == NULL, the budget is exact, dropping a sequence gives
 *   every byte back. */
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../common/pool.h"
#include "../common/transport.h"
#include "../common/wire.h"
#include "../coordinator/model/attn.h"
#include "../coordinator/model/indexer.h"
#include "../kernels/kern.h"
#include "../worker/kvstore.h"
#include "../worker/worker.h"

#define P      64
#define V      4
#define N_SEQ  2
#define BUDGET (1u << 20)
#define MAX_PG 10

static const int seq_pages[N_SEQ] = {10, 6}; /* complete pages of each sequence */

/* The two layers: GQA with values apart, MLA-style with values in the keys. */
struct layer {
	int n_head, n_head_kv, dk, dv;
	int k_width, v_width; /* v_width 0: values are the keys' first dv values */
	float scale;
	int chains_sent; /* pages of chains [0, chains_sent) are sent */
};
static const struct layer layers[2] = {
    {4, 2, 64, 32, 128, 64, 0.125f, V},
    {4, 1, 96, 64, 96, 0, 0.1f, 2},
};

static char endpoint[128];
static uint32_t rng = 0x12345678u;

static float rnd(void)
{
	rng = rng * 1664525u + 1013904223u;
	return (float)((int)(rng >> 8) % 20001 - 10000) / 10000.0f;
}

/* page bytes: keys then values, as on the wire */
static uint16_t *pages[2][N_SEQ][MAX_PG];

static size_t page_values(const struct layer *L)
{
	return (size_t)P * (size_t)(L->k_width + L->v_width);
}

static void make_pages(void)
{
	for (int l = 0; l < 2; l++)
		for (int s = 0; s < N_SEQ; s++)
			for (int i = 0; i < seq_pages[s]; i++) {
				size_t n = page_values(&layers[l]);
				pages[l][s][i] = malloc(n * sizeof(uint16_t));
				assert_non_null(pages[l][s][i]);
				for (size_t j = 0; j < n; j++)
					pages[l][s][i][j] = kern_f32_to_f16(rnd());
			}
}

static void free_pages(void)
{
	for (int l = 0; l < 2; l++)
		for (int s = 0; s < N_SEQ; s++)
			for (int i = 0; i < seq_pages[s]; i++) {
				free(pages[l][s][i]);
				pages[l][s][i] = NULL;
			}
}

/* ------------------------------------------------------------ the link */

struct link {
	transport *t;
	int peer;
	pid_t pid;
	uint8_t *buf;
	size_t cap;
};

static void link_send(struct link *k, const struct wire_msg *m, const void *data, size_t n)
{
	size_t len;
	assert_int_equal(wire_encode(m, &k->buf, &k->cap, &len), 0);
	assert_int_equal(transport_send(k->t, k->peer, k->buf, len, data, n), 0);
}

/* The next message from the worker (within 20 s); *data and *n its frame. */
static void link_recv(struct link *k, struct wire_msg *m, const uint8_t **data, size_t *n)
{
	struct transport_frame f;
	for (;;) {
		assert_int_equal(transport_recv(k->t, 20000, &f), 0);
		if (!f.bad)
			break;
	}
	assert_int_equal(wire_decode(f.hdr, f.hdr_len, "worker", m), 0);
	k->peer = f.peer;
	if (data) {
		*data = f.data;
		*n = f.data_len;
	}
}

/* Expects an Error whose text holds `what`. */
static void expect_error(struct link *k, const char *what)
{
	struct wire_msg m;
	link_recv(k, &m, NULL, NULL);
	assert_int_equal(m.kind, WIRE_ERROR);
	if (!strstr(m.u.text, what))
		fail_msg("error '%s' does not say '%s'", m.u.text, what);
	wire_msg_free(&m);
}

/* A worker offering kv_memory bytes for KV pages (< 0: none) and 1 GiB for
 * experts, or none with kv_only. */
static void link_open(struct link *k, int64_t kv_memory, int kv_only)
{
	memset(k, 0, sizeof(*k));
	k->pid = fork(); /* before this process has a ZeroMQ context */
	assert_true(k->pid >= 0);
	if (k->pid == 0) {
		transport *t = NULL;
		if (transport_zmq_connect(endpoint, &t))
			_exit(3);
		struct worker_config cfg = {.n_threads = 1,
					    .name = "kvhost",
					    .memory_bytes = kv_only ? 0 : 1ull << 30,
					    .kv_memory_bytes = kv_memory,
					    .kv_only = kv_only,
					    .idle_timeout_ms = 60000};
		int rc = worker_run(t, &cfg);
		transport_destroy(&t);
		_exit(rc ? 1 : 0);
	}
	assert_int_equal(transport_zmq_listen(endpoint, &k->t), 0);
	struct wire_msg m;
	link_recv(k, &m, NULL, NULL);
	assert_int_equal(m.kind, WIRE_HELLO);
	assert_int_equal(m.u.hello.kv_bytes, kv_memory > 0 ? (uint64_t)kv_memory : 0);
	assert_int_equal(m.u.hello.memory_bytes, kv_only ? 0 : 1ull << 30);
	wire_msg_free(&m);
}

/* The worker's Stats. */
static struct wire_stats link_stats(struct link *k)
{
	struct wire_msg m = {.kind = WIRE_STATS};
	link_send(k, &m, NULL, 0);
	link_recv(k, &m, NULL, NULL);
	assert_int_equal(m.kind, WIRE_STATS);
	const struct wire_stats st = m.u.stats;
	wire_msg_free(&m);
	return st;
}

/* Shutdown; the worker must exit 0. */
static void link_close(struct link *k)
{
	struct wire_msg m = {.kind = WIRE_SHUTDOWN};
	snprintf(m.u.text, sizeof(m.u.text), "test done");
	link_send(k, &m, NULL, 0);
	int status = 0;
	assert_int_equal(waitpid(k->pid, &status, 0), k->pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	transport_destroy(&k->t);
	free(k->buf);
}

static void send_page(struct link *k, int l, int s, int i, size_t cut)
{
	const struct layer *L = &layers[l];
	struct wire_msg m = {.kind = WIRE_KV_PAGE};
	m.u.kv_page =
	    (struct wire_kv_page){(uint32_t)l,		(uint32_t)s,	      (uint32_t)i, P,
				  (uint32_t)L->k_width, (uint32_t)L->v_width, WIRE_KV_ATTN};
	link_send(k, &m, pages[l][s][i], page_values(L) * sizeof(uint16_t) - cut);
}

/* ------------------------------------------------------------ batches */

#define N_ROWS 7
static const int32_t row_seq[N_ROWS] = {0, 0, 0, 1, 0, 1, 1};
static const int32_t row_pos[N_ROWS] = {5, 64, 300, 200, 639, 383, 127};

struct batch {
	int layer, v0, v1;
	float q[N_ROWS * 4 * 96];
	struct wire_attn_batch w;
};

static void make_batch(struct batch *b, int layer, int v0, int v1)
{
	const struct layer *L = &layers[layer];
	b->layer = layer;
	b->v0 = v0;
	b->v1 = v1;
	for (size_t i = 0; i < (size_t)N_ROWS * L->n_head * L->dk; i++)
		b->q[i] = rnd();
	b->w = (struct wire_attn_batch){.step = 100 + (uint64_t)layer * 10 + (uint64_t)v0,
					.layer = (uint32_t)layer,
					.n_rows = N_ROWS,
					.n_head = (uint32_t)L->n_head,
					.n_head_kv = (uint32_t)L->n_head_kv,
					.head_dim_k = (uint32_t)L->dk,
					.head_dim_v = (uint32_t)L->dv,
					.scale = L->scale,
					.page = P,
					.n_shard = V,
					.v0 = (uint32_t)v0,
					.v1 = (uint32_t)v1,
					.seq = (int32_t *)row_seq,
					.pos = (int32_t *)row_pos};
}

/* attn_host_forward here, over the pages as sent (only chains [0,
 * chains_sent) of the layer): part must hold N_ROWS x n_head partials. */
static int local_forward(pool *pl, const struct batch *b, float *part)
{
	const struct layer *L = &layers[b->layer];
	struct attn_page pg[N_SEQ][MAX_PG];
	const struct attn_page *row_pages[N_ROWS];
	int32_t n_pages[N_ROWS];
	memset(pg, 0, sizeof(pg));
	for (int s = 0; s < N_SEQ; s++)
		for (int i = 0; i < seq_pages[s]; i++) {
			if (i % V >= L->chains_sent)
				continue;
			pg[s][i].k = pages[b->layer][s][i];
			pg[s][i].v = L->v_width ? pages[b->layer][s][i] + (size_t)P * L->k_width
						: pages[b->layer][s][i];
		}
	for (int r = 0; r < N_ROWS; r++) {
		row_pages[r] = pg[row_seq[r]];
		n_pages[r] = seq_pages[row_seq[r]];
	}
	const struct attn_params ap = {.n_head = L->n_head,
				       .n_head_kv = L->n_head_kv,
				       .head_dim_k = L->dk,
				       .head_dim_v = L->dv,
				       .scale = L->scale};
	const struct attn_host_job job = {.ap = &ap,
					  .k_width = L->k_width,
					  .v_stride = L->v_width ? L->v_width : L->k_width,
					  .page = P,
					  .n_shard = V,
					  .v0 = b->v0,
					  .v1 = b->v1,
					  .n_rows = N_ROWS,
					  .pos = row_pos,
					  .pages = row_pages,
					  .n_pages = n_pages,
					  .q = b->q,
					  .part = part};
	return attn_host_forward(pl, &job);
}

/* Sends b and checks the AttnResult against local_forward(). */
static void check_batch(struct link *k, pool *pl, const struct batch *b)
{
	const struct layer *L = &layers[b->layer];
	struct wire_msg m = {.kind = WIRE_ATTN_BATCH};
	m.u.attn_batch = b->w;
	link_send(k, &m, b->q, wire_attn_batch_frame_bytes(&b->w));
	const size_t n_part = (size_t)N_ROWS * L->n_head * ATTN_PART_FLOATS(L->dv);
	float *want = malloc(n_part * sizeof(float));
	assert_non_null(want);
	assert_int_equal(local_forward(pl, b, want), 0);
	const uint8_t *data;
	size_t n;
	struct wire_msg r;
	link_recv(k, &r, &data, &n);
	if (r.kind == WIRE_ERROR)
		fail_msg("worker: %s", r.u.text);
	assert_int_equal(r.kind, WIRE_ATTN_RESULT);
	assert_int_equal(r.u.attn_result.step, b->w.step);
	assert_int_equal(r.u.attn_result.layer, b->layer);
	assert_int_equal(r.u.attn_result.n_rows, N_ROWS);
	assert_int_equal(r.u.attn_result.n_head, L->n_head);
	assert_int_equal(r.u.attn_result.head_dim_v, L->dv);
	assert_true(r.u.attn_result.compute_seconds >= 0);
	assert_int_equal(n, n_part * sizeof(float));
	assert_int_equal(wire_attn_result_frame_bytes(&r.u.attn_result), n);
	assert_memory_equal(data, want, n);
	/* a row sees a page of these chains: a positive sum for every head */
	for (int row = 0; row < N_ROWS; row++) {
		int sees = 0;
		for (int i = 0; i < row_pos[row] / P; i++)
			sees |= i % V >= b->v0 && i % V < b->v1;
		for (int h = 0; h < L->n_head; h++) {
			float S = want[((size_t)row * L->n_head + h) * ATTN_PART_FLOATS(L->dv) + 1];
			if (sees)
				assert_true(S > 0);
			else
				assert_true(S == 0);
		}
	}
	wire_msg_free(&r);
	free(want);
}

/* Sends b expecting an Error holding `what`. */
static void refused_batch(struct link *k, const struct wire_attn_batch *w, const float *q, size_t n,
			  const char *what)
{
	struct wire_msg m = {.kind = WIRE_ATTN_BATCH};
	m.u.attn_batch = *w;
	link_send(k, &m, q, n);
	expect_error(k, what);
}

/* Sends the pages of chains [0, chains_sent) of both layers; returns how
 * many and adds their bytes to *bytes. */
static uint64_t send_pages(struct link *k, uint64_t *bytes)
{
	uint64_t n = 0;
	for (int l = 0; l < 2; l++)
		for (int s = 0; s < N_SEQ; s++)
			for (int i = 0; i < seq_pages[s]; i++)
				if (i % V < layers[l].chains_sent) {
					send_page(k, l, s, i, 0);
					n++;
					*bytes += page_values(&layers[l]) * sizeof(uint16_t);
				}
	return n;
}

/* The pages made, a worker (kv_only: without experts) offering BUDGET bytes
 * for them, a pool here (after the fork: the worker has its own), and the
 * pages of send_pages() sent: returns how many, their bytes into *bytes. */
static uint64_t open_with_pages(struct link *k, int kv_only, pool **pl, uint64_t *bytes)
{
	make_pages();
	link_open(k, BUDGET, kv_only);
	*pl = NULL;
	assert_int_equal(pool_new(2, pl), 0);
	*bytes = 0;
	return send_pages(k, bytes);
}

static void test_kvhost_serves(void **state)
{
	(void)state;
	struct link k;
	pool *pl;
	uint64_t page_bytes;
	const uint64_t n_pages = open_with_pages(&k, 0, &pl, &page_bytes);
	/* a page sent again replaces the first (same bytes here) */
	send_page(&k, 0, 1, 3, 0);
	struct batch *b = malloc(sizeof(*b));
	assert_non_null(b);
	for (int l = 0; l < 2; l++) {
		make_batch(b, l, 0, 2);
		check_batch(&k, pl, b);
	}
	make_batch(b, 0, 2, 4);
	check_batch(&k, pl, b);
	/* a page of chain 2 of layer 1 was never sent */
	make_batch(b, 1, 2, 4);
	refused_batch(&k, &b->w, b->q, wire_attn_batch_frame_bytes(&b->w),
		      "needs a KV page this worker lacks");
	/* the worker keeps serving */
	make_batch(b, 1, 0, 2);
	check_batch(&k, pl, b);
	/* the whole tree on one host */
	make_batch(b, 0, 0, 4);
	check_batch(&k, pl, b);
	/* no rows and no frame: an empty result */
	struct wire_msg m = {.kind = WIRE_ATTN_BATCH};
	m.u.attn_batch = b->w;
	m.u.attn_batch.n_rows = 0;
	link_send(&k, &m, NULL, 0);
	struct wire_msg r;
	const uint8_t *data;
	size_t n;
	link_recv(&k, &r, &data, &n);
	assert_int_equal(r.kind, WIRE_ATTN_RESULT);
	assert_int_equal(r.u.attn_result.n_rows, 0);
	assert_int_equal(n, 0);
	wire_msg_free(&r);
	/* a query frame one float short */
	refused_batch(&k, &b->w, b->q, wire_attn_batch_frame_bytes(&b->w) - sizeof(float),
		      "wrong size");
	/* pages of another size than the layer's */
	struct wire_attn_batch w = b->w;
	w.page = 2 * P;
	refused_batch(&k, &w, b->q, wire_attn_batch_frame_bytes(&w), "wrong size");
	/* a result beyond the frame cap from a small query frame: 256 rows of
	 * 1024 heads of 1 key value and 1024 values (1 MiB in, 1.0 GiB out) */
	int32_t *many = calloc(256, sizeof(int32_t));
	float *q1 = calloc((size_t)256 * 1024, sizeof(float));
	assert_non_null(many);
	assert_non_null(q1);
	w = (struct wire_attn_batch){.layer = 0,
				     .n_rows = 256,
				     .n_head = 1024,
				     .n_head_kv = 1,
				     .head_dim_k = 1,
				     .head_dim_v = 1024,
				     .scale = 1,
				     .page = P,
				     .n_shard = V,
				     .v1 = V,
				     .seq = many,
				     .pos = many};
	refused_batch(&k, &w, q1, wire_attn_batch_frame_bytes(&w),
		      "beyond this worker's frame cap");
	free(many);
	free(q1);
	/* a layer without pages */
	w = b->w;
	w.layer = 5;
	refused_batch(&k, &w, b->q, wire_attn_batch_frame_bytes(&w), "no KV page");
	/* a KV frame one byte short */
	send_page(&k, 0, 0, 1, 1);
	expect_error(&k, "wrong size");
	/* widths other than the layer's */
	m = (struct wire_msg){.kind = WIRE_KV_PAGE};
	m.u.kv_page = (struct wire_kv_page){0, 0, 11, P, 64, 64, WIRE_KV_ATTN};
	link_send(&k, &m, pages[0][0][0], (size_t)P * 128 * sizeof(uint16_t)); /* 64 + 64 */
	expect_error(&k, "differ from the layer's");
	/* beyond the budget: a page of 1024 positions of 512 keys is 1 MiB */
	uint16_t *big = calloc((size_t)1024 * 512, sizeof(uint16_t));
	assert_non_null(big);
	m.u.kv_page = (struct wire_kv_page){3, 0, 0, 1024, 512, 0, WIRE_KV_ATTN};
	link_send(&k, &m, big, (size_t)1024 * 512 * sizeof(uint16_t));
	expect_error(&k, "budget of 1048576 bytes");
	free(big);
	/* still serving, with the same pages */
	make_batch(b, 0, 2, 4);
	check_batch(&k, pl, b);
	/* 7 batches answered (6 of N_ROWS rows, 1 of none), the refused ones
	 * not counted; the pages sent, the one sent twice and the refused ones
	 * not counted again; their bytes and the page tables */
	struct wire_stats st = link_stats(&k);
	assert_int_equal(st.attn_batches, 7);
	assert_int_equal(st.attn_rows, 6 * N_ROWS);
	assert_true(st.attn_seconds >= 0);
	assert_int_equal(st.kv_pages, n_pages);
	assert_true(st.kv_bytes > page_bytes && st.kv_bytes < page_bytes + 4096);
	assert_int_equal(st.rows, 0);
	/* Shutdown(rejoin): the worker forgets its pages and says Hello again */
	m = (struct wire_msg){.kind = WIRE_SHUTDOWN, .shutdown_rejoin = 1};
	link_send(&k, &m, NULL, 0);
	link_recv(&k, &r, NULL, NULL);
	assert_int_equal(r.kind, WIRE_HELLO);
	assert_int_equal(r.u.hello.kv_bytes, BUDGET);
	wire_msg_free(&r);
	refused_batch(&k, &b->w, b->q, wire_attn_batch_frame_bytes(&b->w), "no KV page");
	link_close(&k);
	free(b);
	free_pages();
	pool_destroy(&pl);
}

/* ------------------------------------------------------------ indexer */

#define IE 16 /* entries per indexer page */
#define ID 64 /* indexer key size */
#define IH 3  /* indexer heads */

static uint16_t *ipages[N_SEQ][MAX_PG]; /* [IE][ID] F16 */

/* The scores of b's rows over the indexer pages of chains [v0, v1), as the
 * host lays them out: with indexer_score(), and each within a relative 1e-5
 * of the formula in double. */
static size_t indexer_expect(const struct wire_idx_batch *b, const float *q, const float *w,
			     float *out)
{
	size_t at = 0;
	float keys[IE * ID];
	for (uint32_t r = 0; r < b->n_rows; r++)
		for (int i = 0; i < indexer_row_pages(b->pos[r], IE); i++) {
			if (i % V < (int)b->v0 || i % V >= (int)b->v1)
				continue;
			for (int j = 0; j < IE * ID; j++)
				keys[j] = kern_f16_to_f32(ipages[b->seq[r]][i][j]);
			indexer_score(IH, ID, q + (size_t)r * IH * ID, w + (size_t)r * IH, keys, IE,
				      out + at);
			for (int e = 0; e < IE; e++) {
				double sum = 0;
				for (int h = 0; h < IH; h++) {
					double d = 0;
					for (int c = 0; c < ID; c++)
						d += (double)q[((size_t)r * IH + h) * ID + c] *
						     keys[e * ID + c];
					sum += (d > 0 ? d : 0) * w[r * IH + h];
				}
				assert_true(fabs(out[at + e] - sum) <= 1e-5 * (1 + fabs(sum)));
			}
			at += IE;
		}
	return at;
}

/* KvPages of indexer keys next to the attention pages of the same layer,
 * IdxBatches for chains [0, 2), [2, 4) and [0, 4): every IdxResult frame is
 * the scores computed here; refused: a row needing a page never sent, a
 * layer without indexer pages, a frame of the wrong size, a result beyond
 * the frame cap. */
static void test_kvhost_indexer(void **state)
{
	(void)state;
	make_pages();
	struct link k;
	link_open(&k, BUDGET, 0);
	for (int s = 0; s < N_SEQ; s++)
		for (int i = 0; i < seq_pages[s]; i++) {
			ipages[s][i] = malloc((size_t)IE * ID * sizeof(uint16_t));
			assert_non_null(ipages[s][i]);
			for (int j = 0; j < IE * ID; j++)
				ipages[s][i][j] = kern_f32_to_f16(rnd());
			/* layer 1 holds both kinds */
			if (i % V < layers[1].chains_sent)
				send_page(&k, 1, s, i, 0);
			struct wire_msg m = {.kind = WIRE_KV_PAGE};
			m.u.kv_page = (struct wire_kv_page){1,	(uint32_t)s, (uint32_t)i, IE,
							    ID, 0,	     WIRE_KV_IDX};
			link_send(&k, &m, ipages[s][i], (size_t)IE * ID * sizeof(uint16_t));
		}
	/* rows before, on and after page boundaries (a page: 64 positions) */
	int32_t seq[N_ROWS] = {0, 0, 0, 1, 0, 1, 1};
	int32_t pos[N_ROWS] = {5, 63, 300, 200, 639, 383, 127};
	float q[N_ROWS * IH * ID], w[N_ROWS * IH];
	for (int i = 0; i < N_ROWS * IH * ID; i++)
		q[i] = rnd();
	for (int i = 0; i < N_ROWS * IH; i++)
		w[i] = rnd();
	float frame[N_ROWS * IH * (ID + 1)];
	memcpy(frame, q, sizeof(q));
	memcpy(frame + N_ROWS * IH * ID, w, sizeof(w));
	const int chains[3][2] = {{0, 2}, {2, 4}, {0, 4}};
	struct wire_idx_batch b = {.layer = 1,
				   .n_rows = N_ROWS,
				   .n_head = IH,
				   .dim = ID,
				   .page = IE,
				   .n_shard = V,
				   .seq = seq,
				   .pos = pos};
	float *want = malloc((size_t)N_ROWS * MAX_PG * IE * sizeof(float));
	assert_non_null(want);
	for (int c = 0; c < 3; c++) {
		b.step = 300 + (uint64_t)c;
		b.v0 = (uint32_t)chains[c][0];
		b.v1 = (uint32_t)chains[c][1];
		struct wire_msg m = {.kind = WIRE_IDX_BATCH}, r;
		m.u.idx_batch = b;
		link_send(&k, &m, frame, wire_idx_batch_frame_bytes(&b));
		const size_t n_want = indexer_expect(&b, q, w, want);
		size_t n_rows_sum = 0;
		for (int i = 0; i < N_ROWS; i++)
			n_rows_sum += indexer_row_scores(pos[i], IE, V, (int)b.v0, (int)b.v1);
		assert_int_equal(n_rows_sum, n_want);
		assert_true(n_want > 0);
		const uint8_t *data;
		size_t n;
		link_recv(&k, &r, &data, &n);
		if (r.kind == WIRE_ERROR)
			fail_msg("worker: %s", r.u.text);
		assert_int_equal(r.kind, WIRE_IDX_RESULT);
		assert_int_equal(r.u.idx_result.step, b.step);
		assert_int_equal(r.u.idx_result.n_rows, N_ROWS);
		assert_int_equal(r.u.idx_result.n_scores, n_want);
		assert_int_equal(n, n_want * sizeof(float));
		assert_memory_equal(data, want, n);
		wire_msg_free(&r);
	}
	/* the attention pages of the layer are still served */
	struct batch *ab = malloc(sizeof(*ab));
	assert_non_null(ab);
	pool *pl = NULL;
	assert_int_equal(pool_new(1, &pl), 0);
	make_batch(ab, 1, 0, 2);
	check_batch(&k, pl, ab);
	pool_destroy(&pl);
	free(ab);
	/* refused, and the worker keeps serving */
	struct wire_msg m = {.kind = WIRE_IDX_BATCH};
	m.u.idx_batch = b;
	link_send(&k, &m, frame, wire_idx_batch_frame_bytes(&b) - sizeof(float));
	expect_error(&k, "wrong size");
	m.u.idx_batch.layer = 0;
	link_send(&k, &m, frame, wire_idx_batch_frame_bytes(&b));
	expect_error(&k, "no indexer page");
	m.u.idx_batch = b;
	pos[3] = 639; /* sequence 1 has 6 pages */
	link_send(&k, &m, frame, wire_idx_batch_frame_bytes(&b));
	expect_error(&k, "lacks");
	pos[3] = INT32_MAX; /* 2 GiB of scores */
	link_send(&k, &m, frame, wire_idx_batch_frame_bytes(&b));
	expect_error(&k, "beyond this worker's frame cap");
	link_close(&k);
	free(want);
	for (int s = 0; s < N_SEQ; s++)
		for (int i = 0; i < seq_pages[s]; i++)
			free(ipages[s][i]);
	free_pages();
}

/* KvFree of sequence seq. */
static void send_free(struct link *k, uint32_t seq)
{
	struct wire_msg m = {.kind = WIRE_KV_FREE, .u.kv_free = {seq}};
	link_send(k, &m, NULL, 0);
}

/* KvFree drops every page of a sequence (both layers, attention and indexer
 * keys) and gives its bytes back: its rows are refused afterwards, the other
 * sequence's pages are untouched, pages sent after it are kept, a sequence
 * without pages is nothing to do (no Error). */
static void test_kvhost_free(void **state)
{
	(void)state;
	struct link k;
	pool *pl;
	uint64_t all_bytes;
	const uint64_t n_pages = open_with_pages(&k, 0, &pl, &all_bytes);
	/* an indexer page of sequence 0 beside its attention pages */
	uint16_t *ik = calloc((size_t)IE * ID, sizeof(uint16_t));
	assert_non_null(ik);
	struct wire_msg m = {.kind = WIRE_KV_PAGE};
	m.u.kv_page = (struct wire_kv_page){0, 0, 0, IE, ID, 0, WIRE_KV_IDX};
	link_send(&k, &m, ik, (size_t)IE * ID * sizeof(uint16_t));
	const struct wire_stats full = link_stats(&k);
	assert_int_equal(full.kv_pages, n_pages + 1);
	uint64_t pages0 = 1, bytes0 = (size_t)IE * ID * sizeof(uint16_t);
	for (int l = 0; l < 2; l++)
		for (int i = 0; i < seq_pages[0]; i++)
			if (i % V < layers[l].chains_sent) {
				pages0++;
				bytes0 += page_values(&layers[l]) * sizeof(uint16_t);
			}
	send_free(&k, 0);
	struct wire_stats st = link_stats(&k);
	assert_int_equal(st.kv_pages, full.kv_pages - pages0);
	/* the pages and their tables */
	assert_true(st.kv_bytes < full.kv_bytes - bytes0 && st.kv_bytes > all_bytes - bytes0);
	struct batch *b = malloc(sizeof(*b));
	assert_non_null(b);
	make_batch(b, 0, 0, 2);
	refused_batch(&k, &b->w, b->q, wire_attn_batch_frame_bytes(&b->w),
		      "needs a KV page this worker lacks");
	/* a sequence without pages: nothing (the next answer is the Stats) */
	send_free(&k, 9);
	const struct wire_stats again = link_stats(&k);
	assert_int_equal(again.kv_pages, st.kv_pages);
	assert_int_equal(again.kv_bytes, st.kv_bytes);
	/* sequence 0's pages sent again: every batch as before */
	for (int l = 0; l < 2; l++)
		for (int i = 0; i < seq_pages[0]; i++)
			if (i % V < layers[l].chains_sent)
				send_page(&k, l, 0, i, 0);
	for (int l = 0; l < 2; l++) {
		make_batch(b, l, 0, 2);
		check_batch(&k, pl, b);
	}
	make_batch(b, 0, 2, 4);
	check_batch(&k, pl, b);
	assert_int_equal(link_stats(&k).kv_pages, n_pages);
	link_close(&k);
	free(b);
	free(ik);
	free_pages();
	pool_destroy(&pl);
}

/* --kv-memory 0: Hello offers none and KvPages are refused. */
static void test_kvhost_none(void **state)
{
	(void)state;
	make_pages();
	struct link k;
	link_open(&k, -1, 0);
	send_page(&k, 0, 0, 0, 0);
	expect_error(&k, "offers no memory for KV pages");
	link_close(&k);
	free_pages();
}

/* A --kv-only worker: no memory for experts in its Hello, and it serves
 * attention batches like any KV host. */
static void test_kvhost_kv_only(void **state)
{
	(void)state;
	struct link k;
	pool *pl;
	uint64_t page_bytes;
	const uint64_t n_pages = open_with_pages(&k, 1, &pl, &page_bytes);
	struct batch *b = malloc(sizeof(*b));
	assert_non_null(b);
	make_batch(b, 1, 0, 2);
	check_batch(&k, pl, b);
	struct wire_stats st = link_stats(&k);
	assert_int_equal(st.attn_batches, 1);
	assert_int_equal(st.attn_rows, N_ROWS);
	assert_int_equal(st.kv_pages, n_pages);
	link_close(&k);
	free(b);
	free_pages();
	pool_destroy(&pl);
}

/* worker_budgets: the expert and KV budgets never overlap. */
static void test_worker_budgets(void **state)
{
	(void)state;
	const uint64_t node = 64ull << 30, G = 1ull << 30;
	struct {
		uint64_t memory;
		int64_t kv;
		int kv_only;
		uint64_t experts_want, kv_want;
	} cases[] = {
	    {0, 0, 0, 64 * G, 64 * G},		 /* neither: shared */
	    {40 * G, 0, 0, 40 * G, 24 * G},	 /* --memory: KV gets the rest */
	    {80 * G, 0, 0, 80 * G, 0},		 /* ... none when nothing is left */
	    {0, 10 * G, 0, 54 * G, 10 * G},	 /* --kv-memory: experts get the rest */
	    {0, 70 * G, 0, 0, 70 * G},		 /* ... none: worker_run refuses it */
	    {30 * G, 20 * G, 0, 30 * G, 20 * G}, /* both: as given */
	    {0, -1, 0, 64 * G, 0},		 /* --kv-memory 0 */
	    {30 * G, -1, 0, 30 * G, 0},
	    {0, 0, 1, 0, 64 * G}, /* --kv-only */
	    {0, 8 * G, 1, 0, 8 * G},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct worker_config cfg = {.memory_bytes = cases[i].memory,
					    .kv_memory_bytes = cases[i].kv,
					    .kv_only = cases[i].kv_only};
		uint64_t experts = 1, kv = 1;
		int shared = -1;
		worker_budgets(&cfg, node, &experts, &kv, &shared);
		assert_int_equal(experts, cases[i].experts_want);
		assert_int_equal(kv, cases[i].kv_want);
		assert_int_equal(shared, i == 0);
	}
}

/* ------------------------------------------------------------ kvstore */

static void test_kvstore(void **state)
{
	(void)state;
	const struct wire_kv_page h = {2, 7, 3, P, 32, 0, WIRE_KV_ATTN};
	const size_t bytes = (size_t)P * 32 * sizeof(uint16_t);
	/* exactly the page, its table of 4 entries and one sequence */
	const uint64_t need = bytes + 4 * sizeof(struct attn_page);
	uint16_t *a = malloc(bytes), *b = malloc(bytes);
	assert_non_null(a);
	assert_non_null(b);
	for (size_t i = 0; i < bytes / 2; i++) {
		a[i] = (uint16_t)i;
		b[i] = (uint16_t)(3 * i + 1);
	}
	kvstore *s = NULL;
	/* too small by one byte for the page and its tables */
	uint64_t seq_entry = 0;
	for (uint64_t budget = need; budget < need + 64 && !seq_entry; budget++) {
		assert_int_equal(kvstore_new(budget, &s), 0);
		if (kvstore_put(s, &h, a) == 0)
			seq_entry = budget - need;
		else
			assert_int_equal(kvstore_bytes(s), 0);
		kvstore_destroy(&s);
	}
	assert_true(seq_entry > 0);
	assert_int_equal(kvstore_new(need + seq_entry, &s), 0);
	assert_int_equal(kvstore_put(s, &h, a), 0);
	assert_int_equal(kvstore_bytes(s), need + seq_entry);
	/* replacing keeps the count and the pointer table */
	assert_int_equal(kvstore_put(s, &h, b), 0);
	assert_int_equal(kvstore_bytes(s), need + seq_entry);
	const struct attn_page *pg;
	int32_t n;
	kvstore_pages(s, WIRE_KV_ATTN, 2, 7, &pg, &n);
	assert_int_equal(n, 4);
	for (int i = 0; i < 3; i++)
		assert_null(pg[i].k);
	assert_memory_equal(pg[3].k, b, bytes);
	assert_ptr_equal(pg[3].v, pg[3].k); /* v_width 0: values in the keys */
	kvstore_pages(s, WIRE_KV_ATTN, 2, 8, &pg, &n);
	assert_int_equal(n, 0);
	assert_null(pg);
	kvstore_pages(s, WIRE_KV_ATTN, 1, 7, &pg, &n);
	assert_int_equal(n, 0);
	uint32_t np, kw, vw;
	assert_int_equal(kvstore_layer(s, WIRE_KV_ATTN, 2, &np, &kw, &vw), 0);
	assert_true(np == P && kw == 32 && vw == 0);
	assert_int_equal(kvstore_layer(s, WIRE_KV_ATTN, 1, &np, &kw, &vw), ERR_RANGE);
	/* no room for another page; other widths on the layer; bad ranges */
	struct wire_kv_page h2 = h;
	h2.page = 0;
	assert_int_equal(kvstore_put(s, &h2, a), ERR_NOMEM);
	assert_int_equal(kvstore_bytes(s), need + seq_entry);
	h2.v_width = 32;
	assert_int_equal(kvstore_put(s, &h2, a), ERR_RANGE);
	h2 = h;
	h2.layer = MOE_MAX_LAYERS;
	assert_int_equal(kvstore_put(s, &h2, a), ERR_RANGE);
	h2 = h;
	h2.page = (uint32_t)((1u << 31) / P);
	assert_int_equal(kvstore_put(s, &h2, a), ERR_RANGE);
	/* dropping a sequence: another one's is nothing, its own gives every
	 * byte back and makes room; the layer keeps its sizes */
	kvstore_free_seq(s, 8);
	assert_int_equal(kvstore_bytes(s), need + seq_entry);
	kvstore_free_seq(s, 7);
	assert_int_equal(kvstore_bytes(s), 0);
	assert_int_equal(kvstore_n_pages(s), 0);
	kvstore_pages(s, WIRE_KV_ATTN, 2, 7, &pg, &n);
	assert_int_equal(n, 0);
	assert_null(pg);
	assert_int_equal(kvstore_layer(s, WIRE_KV_ATTN, 2, &np, &kw, &vw), 0);
	h2 = h;
	h2.page = 0;
	assert_int_equal(kvstore_put(s, &h2, a), 0);
	assert_int_equal(kvstore_bytes(s), bytes + sizeof(struct attn_page) + seq_entry);
	assert_int_equal(kvstore_n_pages(s), 1);
	kvstore_destroy(&s);
	assert_null(s);
	kvstore_destroy(&s);
	free(a);
	free(b);
}

int main(void)
{
	snprintf(endpoint, sizeof(endpoint), "ipc:///tmp/moefleet-kvhost-%d.sock", (int)getpid());
	log_set_quiet(1);
	signal(SIGPIPE, SIG_IGN);
	kern_init();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_kvstore),	   cmocka_unit_test(test_kvhost_serves),
	    cmocka_unit_test(test_kvhost_none),	   cmocka_unit_test(test_kvhost_indexer),
	    cmocka_unit_test(test_kvhost_kv_only), cmocka_unit_test(test_worker_budgets),
	    cmocka_unit_test(test_kvhost_free),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
