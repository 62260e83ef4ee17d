/* test_attn: the KV cache and attn_forward against a plain double-precision
 * softmax attention, for both code paths (one-row F16 and tiled), with GQA,
 * sliding windows, sinks, MQA with different key/value widths, several
 * sequences, and thread-count invariance; and ring layers against whole-context
 * ones, bit for bit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/pool.h"
#include "coordinator/model/attn.h"
#include "kernels/kern.h"

static uint64_t rng_state = 88172645463325252ull;

static float rng_normal(void)
{
	/* xorshift64 + Box-Muller */
	double u[2];
	for (int i = 0; i < 2; i++) {
		rng_state ^= rng_state << 13;
		rng_state ^= rng_state >> 7;
		rng_state ^= rng_state << 17;
		u[i] = ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
	}
	return (float)(sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]));
}

struct case_spec {
	int n_head, n_head_kv, dk, dv;
	int window;
	int sinks;
	int n_seq;
	int n_tok;  /* per sequence, all in one batch */
	int mla;    /* v = first dv values of k (deepseek2's absorbed MLA) */
	int shared; /* mla: the cache reads the values from the keys */
	int shards; /* attn_cache_set_shards(shards, page) when > 0 */
	int page;
};

/* Fills the cache for n_seq sequences of n_tok tokens, runs attn_forward on
 * one batch holding all of them (sequence-interleaved), and compares with
 * a double-precision reference on the F16-rounded cache contents. */
static void run_case(const struct case_spec *cs, int n_threads, float *out_copy, double *max_err)
{
	const int kw = cs->n_head_kv * cs->dk, vw = cs->n_head_kv * cs->dv;
	const int n_ctx = cs->n_tok + 3;
	const int n = cs->n_seq * cs->n_tok;
	attn_cache *c = NULL;
	pool *p = NULL;
	assert_int_equal(cs->shared ? attn_cache_new_shared(2, cs->n_seq, n_ctx, kw, vw, &c)
				    : attn_cache_new(2, cs->n_seq, n_ctx, kw, vw, &c),
			 0);
	if (cs->shards)
		assert_int_equal(attn_cache_set_shards(c, cs->shards, cs->page), 0);
	assert_int_equal(pool_new(n_threads, &p), 0);

	float *k = malloc(sizeof(float) * (size_t)n * kw);
	float *v = malloc(sizeof(float) * (size_t)n * vw);
	float *q = malloc(sizeof(float) * (size_t)n * cs->n_head * cs->dk);
	float *out = malloc(sizeof(float) * (size_t)n * cs->n_head * cs->dv);
	int32_t *pos = malloc(sizeof(int32_t) * (size_t)n);
	int32_t *seq = malloc(sizeof(int32_t) * (size_t)n);
	int32_t *tok = calloc((size_t)n, sizeof(int32_t));
	float sinks[64];
	rng_state = 88172645463325252ull;
	for (int h = 0; h < cs->n_head; h++)
		sinks[h] = rng_normal();
	for (int i = 0; i < n; i++) {
		seq[i] = i % cs->n_seq;
		pos[i] = i / cs->n_seq;
		for (int d = 0; d < kw; d++)
			k[(size_t)i * kw + d] = rng_normal() * 2.0f;
		for (int d = 0; d < vw; d++)
			v[(size_t)i * vw + d] = cs->mla ? k[(size_t)i * kw + d] : rng_normal();
		for (int d = 0; d < cs->n_head * cs->dk; d++)
			q[(size_t)i * cs->n_head * cs->dk + d] = rng_normal();
		/* layer 1 is the one under test; layer 0 holds other data */
		attn_cache_store(c, 1, seq[i], pos[i], k + (size_t)i * kw, v + (size_t)i * vw);
		for (int d = 0; d < kw; d++)
			k[(size_t)i * kw + d] = -k[(size_t)i * kw + d];
		attn_cache_store(c, 0, seq[i], pos[i], k + (size_t)i * kw, v + (size_t)i * vw);
		for (int d = 0; d < kw; d++)
			k[(size_t)i * kw + d] = -k[(size_t)i * kw + d];
	}
	struct attn_params ap = {
	    .n_head = cs->n_head,
	    .n_head_kv = cs->n_head_kv,
	    .head_dim_k = cs->dk,
	    .head_dim_v = cs->dv,
	    .scale = 1.0f / sqrtf((float)cs->dk),
	    .window = cs->window,
	    .sinks = cs->sinks ? sinks : NULL,
	};
	assert_int_equal(attn_check_params(c, &ap, "test"), 0);
	model_batch b = {.n_tokens = n, .token = tok, .pos = pos, .seq = seq, .logits = NULL};
	attn_forward(p, c, 1, &ap, &b, q, out);

	double err = 0.0;
	int group = cs->n_head / cs->n_head_kv;
	for (int i = 0; i < n; i++) {
		for (int h = 0; h < cs->n_head; h++) {
			int hk = h / group;
			double acc[1024] = {0};
			double w[4096];
			double mx = -INFINITY, den = 0.0;
			int j0 = cs->window > 0 ? pos[i] - cs->window + 1 : 0;
			if (j0 < 0)
				j0 = 0;
			for (int j = j0; j <= pos[i]; j++) {
				int src = j * cs->n_seq + seq[i];
				double s = 0.0;
				for (int d = 0; d < cs->dk; d++) {
					float kf = kern_f16_to_f32(
					    kern_f32_to_f16(k[(size_t)src * kw + hk * cs->dk + d]));
					s += (double)q[((size_t)i * cs->n_head + h) * cs->dk + d] *
					     kf;
				}
				w[j] = s * ap.scale;
				if (w[j] > mx)
					mx = w[j];
			}
			if (cs->sinks && sinks[h] > mx)
				mx = sinks[h];
			for (int j = j0; j <= pos[i]; j++) {
				int src = j * cs->n_seq + seq[i];
				double e = exp(w[j] - mx);
				den += e;
				for (int d = 0; d < cs->dv; d++)
					acc[d] += e * kern_f16_to_f32(kern_f32_to_f16(
							  v[(size_t)src * vw + hk * cs->dv + d]));
			}
			if (cs->sinks)
				den += exp(sinks[h] - mx);
			for (int d = 0; d < cs->dv; d++) {
				double ref = acc[d] / den;
				double got = out[((size_t)i * cs->n_head + h) * cs->dv + d];
				double e = fabs(got - ref);
				if (e > err)
					err = e;
			}
		}
	}
	*max_err = err;
	if (out_copy)
		memcpy(out_copy, out, sizeof(float) * (size_t)n * cs->n_head * cs->dv);

	free(k);
	free(v);
	free(q);
	free(out);
	free(pos);
	free(seq);
	free(tok);
	pool_destroy(&p);
	attn_cache_destroy(&c);
}

/* Kernels of ISA level isa from now on (the scalar loops for KERN_ISA_SCALAR,
 * the best the CPU has for KERN_ISA_AVX512). */
static void isa_use(int isa)
{
	kern_force_ref(isa == KERN_ISA_SCALAR);
	kern_limit_isa((enum kern_isa)isa);
}

static void check_case(const struct case_spec *cs, double tol)
{
	size_t n_out = (size_t)cs->n_seq * cs->n_tok * cs->n_head * cs->dv;
	float *o1 = malloc(sizeof(float) * n_out);
	float *o2 = malloc(sizeof(float) * n_out);
	double e1, e2;
	run_case(cs, 1, o1, &e1);
	run_case(cs, 2, o2, &e2);
	if (e1 > tol)
		fail_msg("max error %g > %g", e1, tol);
	/* the thread count must not change a single bit */
	assert_memory_equal(o1, o2, sizeof(float) * n_out);
	/* values read from the keys: the same bits as stored apart */
	if (cs->mla) {
		struct case_spec sh = *cs;
		sh.shared = 1;
		run_case(&sh, 2, o2, &e2);
		assert_memory_equal(o1, o2, sizeof(float) * n_out);
	}
	/* nor the SIMD forms of each level against the scalar loops */
	for (int isa = KERN_ISA_SCALAR; isa < (int)kern_cpu_isa(); isa++) {
		isa_use(isa);
		run_case(cs, 2, o2, &e2);
		isa_use(KERN_ISA_AVX512);
		assert_memory_equal(o1, o2, sizeof(float) * n_out);
	}
	free(o1);
	free(o2);
}

/* Short batch (one-row path, F16 accumulator): errors of F16 size. */
static void test_attn_gqa_short(void **state)
{
	(void)state;
	struct case_spec cs = {
	    .n_head = 8, .n_head_kv = 2, .dk = 32, .dv = 32, .n_seq = 1, .n_tok = 48};
	check_case(&cs, 4e-3);
}

/* Long batch (tiled path, F32 accumulator): much closer. */
static void test_attn_gqa_tiled(void **state)
{
	(void)state;
	struct case_spec cs = {
	    .n_head = 4, .n_head_kv = 2, .dk = 32, .dv = 32, .n_seq = 1, .n_tok = 150};
	check_case(&cs, 1e-5);
}

static void test_attn_window_sinks(void **state)
{
	(void)state;
	struct case_spec a = {.n_head = 4,
			      .n_head_kv = 2,
			      .dk = 32,
			      .dv = 32,
			      .window = 8,
			      .sinks = 1,
			      .n_seq = 1,
			      .n_tok = 40};
	check_case(&a, 4e-3);
	struct case_spec b = {.n_head = 4,
			      .n_head_kv = 2,
			      .dk = 32,
			      .dv = 32,
			      .window = 70,
			      .sinks = 1,
			      .n_seq = 1,
			      .n_tok = 200};
	check_case(&b, 1e-5);
	/* heads per KV head not a multiple of the group, head sizes not a
	 * multiple of the widest vectors */
	struct case_spec c = {.n_head = 12,
			      .n_head_kv = 2,
			      .dk = 72,
			      .dv = 80,
			      .window = 90,
			      .sinks = 1,
			      .n_seq = 2,
			      .n_tok = 100};
	check_case(&c, 1e-5);
}

static void test_attn_mla_multiseq(void **state)
{
	(void)state;
	struct case_spec a = {
	    .n_head = 8, .n_head_kv = 1, .dk = 80, .dv = 64, .mla = 1, .n_seq = 3, .n_tok = 17};
	check_case(&a, 1e-2); /* values of std 2: F16 steps twice as large */
	struct case_spec b = {
	    .n_head = 8, .n_head_kv = 1, .dk = 80, .dv = 64, .mla = 1, .n_seq = 2, .n_tok = 70};
	check_case(&b, 1e-5);
}

/* Sharded numerics: the tiled kernel in chains over pages merged in a tree,
 * close to the exact attention (a wrong merge is far from it), with GQA,
 * MLA values read from the keys, sinks, windows (no pages: the tiled kernel),
 * head sizes the SIMD forms do not take (scalar loops), one chain or many
 * mostly empty ones. */
static void test_attn_shards(void **state)
{
	(void)state;
	struct case_spec gqa = {.n_head = 8,
				.n_head_kv = 2,
				.dk = 32,
				.dv = 32,
				.sinks = 1,
				.n_seq = 2,
				.n_tok = 400,
				.shards = 4,
				.page = 64};
	check_case(&gqa, 1e-5);
	gqa.shards = 1;
	check_case(&gqa, 1e-5);
	gqa.shards = 64; /* more chains than pages */
	gqa.n_seq = 1;
	check_case(&gqa, 1e-5);
	struct case_spec mla = {.n_head = 8,
				.n_head_kv = 1,
				.dk = 80,
				.dv = 64,
				.mla = 1,
				.n_seq = 1,
				.n_tok = 300,
				.shards = 8,
				.page = 64};
	check_case(&mla, 2e-5);
	struct case_spec win = {.n_head = 12,
				.n_head_kv = 2,
				.dk = 72,
				.dv = 80,
				.window = 90,
				.sinks = 1,
				.n_seq = 2,
				.n_tok = 150,
				.shards = 2,
				.page = 64};
	check_case(&win, 1e-5);
	struct case_spec odd = {.n_head = 3,
				.n_head_kv = 1,
				.dk = 36,
				.dv = 20,
				.sinks = 1,
				.n_seq = 1,
				.n_tok = 260,
				.shards = 2,
				.page = 128};
	check_case(&odd, 1e-5);
}

/* Sharded numerics give a row the same bits however it is batched: all
 * prompts in one batch, one token per step, or steps of 37 tokens of one
 * sequence with a decode row of the other; at every ISA level, with and
 * without a window. */
static void test_attn_shards_any_batch(void **state)
{
	(void)state;
	enum { NT = 333, NS = 2, N = NT * NS, NH = 4, NKV = 1, DK = 48, DV = 32 };
	attn_cache *c = NULL;
	pool *p = NULL;
	assert_int_equal(attn_cache_new(1, NS, NT, NKV * DK, NKV * DV, &c), 0);
	assert_int_equal(attn_cache_set_shards(c, 4, 64), 0);
	assert_int_equal(pool_new(2, &p), 0);
	static float q[N][NH * DK], k[DK], v[DV], all[N][NH * DV], step[N][NH * DV];
	float sinks[NH];
	static int32_t pos[N], seq[N], tok[N];
	for (int h = 0; h < NH; h++)
		sinks[h] = rng_normal();
	for (int i = 0; i < N; i++) {
		seq[i] = i / NT;
		pos[i] = i % NT;
		for (int d = 0; d < DK; d++)
			k[d] = rng_normal();
		for (int d = 0; d < DV; d++)
			v[d] = rng_normal();
		attn_cache_store(c, 0, seq[i], pos[i], k, v);
		for (int d = 0; d < NH * DK; d++)
			q[i][d] = rng_normal();
	}
	struct attn_params ap = {.n_head = NH,
				 .n_head_kv = NKV,
				 .head_dim_k = DK,
				 .head_dim_v = DV,
				 .scale = 0.15f,
				 .sinks = sinks};
	model_batch b = {.n_tokens = N, .token = tok, .pos = pos, .seq = seq};
	for (int run = 0; run < 2 * ((int)kern_cpu_isa() + 1); run++) {
		const int isa = run / 2;
		ap.window = run % 2 ? 50 : 0; /* a window: tiles cut at its start */
		isa_use(KERN_ISA_AVX512);
		attn_forward(p, c, 0, &ap, &b, &q[0][0], &all[0][0]);
		isa_use(isa);
		memset(step, 0, sizeof(step));
		for (int i = 0; i < N; i++) {
			model_batch one = {
			    .n_tokens = 1, .token = tok, .pos = &pos[i], .seq = &seq[i]};
			attn_forward(p, c, 0, &ap, &one, q[i], step[i]);
		}
		assert_memory_equal(all, step, sizeof(all));
		/* sequence 0 in steps of 37, each with one row of sequence 1 */
		memset(step, 0, sizeof(step));
		int32_t mp[38], ms[38];
		float mq[38][NH * DK], mo[38][NH * DV];
		for (int i0 = 0; i0 < NT; i0 += 37) {
			const int n = i0 + 37 < NT ? 37 : NT - i0;
			const int o = NT + i0 / 37 * 11 % NT; /* a row of sequence 1 */
			for (int j = 0; j < n; j++) {
				mp[j] = pos[i0 + j];
				ms[j] = seq[i0 + j];
				memcpy(mq[j], q[i0 + j], sizeof(mq[j]));
			}
			mp[n] = pos[o];
			ms[n] = seq[o];
			memcpy(mq[n], q[o], sizeof(mq[n]));
			model_batch mix = {.n_tokens = n + 1, .token = tok, .pos = mp, .seq = ms};
			attn_forward(p, c, 0, &ap, &mix, &mq[0][0], &mo[0][0]);
			for (int j = 0; j < n; j++)
				memcpy(step[i0 + j], mo[j], sizeof(mo[j]));
			assert_memory_equal(mo[n], all[o], sizeof(mo[n]));
		}
		assert_memory_equal(all, step, sizeof(float) * NT * NH * DV);
	}
	isa_use(KERN_ISA_AVX512);
	/* bad settings are refused */
	assert_int_equal(attn_cache_set_shards(c, 3, 64), ERR_CONFIG);
	assert_int_equal(attn_cache_set_shards(c, 128, 64), ERR_CONFIG);
	assert_int_equal(attn_cache_set_shards(c, -1, 64), ERR_CONFIG);
	assert_int_equal(attn_cache_set_shards(c, 4, 100), ERR_CONFIG);
	assert_int_equal(attn_cache_set_shards(c, 4, 0), ERR_CONFIG);
	assert_int_equal(attn_cache_set_shards(c, 0, 0), 0);
	pool_destroy(&p);
	attn_cache_destroy(&c);
}

/* KV hosts in the process: pages copied when shipped, each host's chains
 * computed by attn_host_forward() over its copies (host 0 with a scratch
 * kept from call to call, the others with one per call); each offers
 * fake_budget_bytes. */
static uint64_t fake_budget_bytes = UINT64_MAX;
struct fake_hosts {
	pool *p;
	int n_layer, n_seq, n_page;
	struct attn_page *pages; /* [layer][seq][page], copies (NULL: not shipped) */
	int k_width, v_stride;
	float *parts[8];
	int asked[8];
	int n_ship, n_submit, n_free;
	attn_host_scratch *scratch;
};

static int fake_ship(void *self, int host, int layer, int seq, int page, int n_pos, int k_width,
		     int v_width, const uint16_t *k, const uint16_t *v)
{
	struct fake_hosts *f = self;
	(void)host;
	struct attn_page *pg = &f->pages[((size_t)layer * f->n_seq + seq) * f->n_page + page];
	const size_t nk = (size_t)n_pos * k_width, nv = (size_t)n_pos * v_width;
	uint16_t *buf = malloc((nk + nv) * sizeof(uint16_t));
	assert_non_null(buf);
	memcpy(buf, k, nk * sizeof(uint16_t));
	if (v_width)
		memcpy(buf + nk, v, nv * sizeof(uint16_t));
	free((void *)pg->k);
	pg->k = buf;
	pg->v = v_width ? buf + nk : buf;
	f->k_width = k_width;
	f->v_stride = v_width ? v_width : k_width;
	f->n_ship++;
	return 0;
}

static int fake_submit(void *self, int host, int layer, const struct attn_params *ap, int page,
		       int n_shard, int v0, int v1, const model_batch *b, const float *q)
{
	struct fake_hosts *f = self;
	const struct attn_page *rows[512];
	int32_t n_pages[512];
	assert_true(b->n_tokens <= 512);
	for (int t = 0; t < b->n_tokens; t++) {
		rows[t] = &f->pages[((size_t)layer * f->n_seq + b->seq[t]) * f->n_page];
		n_pages[t] = f->n_page;
	}
	free(f->parts[host]);
	f->parts[host] =
	    malloc(sizeof(float) * b->n_tokens * ap->n_head * ATTN_PART_FLOATS(ap->head_dim_v));
	struct attn_host_job job = {.ap = ap,
				    .k_width = f->k_width,
				    .v_stride = f->v_stride,
				    .page = page,
				    .n_shard = n_shard,
				    .v0 = v0,
				    .v1 = v1,
				    .n_rows = b->n_tokens,
				    .pos = b->pos,
				    .pages = rows,
				    .n_pages = n_pages,
				    .q = q,
				    .part = f->parts[host],
				    .scratch = host == 0 ? &f->scratch : NULL};
	f->asked[host] = 1;
	f->n_submit++;
	return attn_host_forward(f->p, &job);
}

/* Every host drops the sequence's pages. */
static int fake_free_seq(void *self, int seq)
{
	struct fake_hosts *f = self;
	for (int l = 0; l < f->n_layer; l++)
		for (int i = 0; i < f->n_page; i++) {
			struct attn_page *pg =
			    &f->pages[((size_t)l * f->n_seq + seq) * f->n_page + i];
			free((void *)pg->k);
			pg->k = pg->v = NULL;
		}
	f->n_free++;
	return 0;
}

static uint64_t fake_budget(void *self, int host)
{
	(void)self, (void)host;
	return fake_budget_bytes;
}

static int fake_collect(void *self, int layer, const float **parts)
{
	struct fake_hosts *f = self;
	(void)layer;
	for (int h = 0; h < 8; h++) {
		parts[h] = f->asked[h] ? f->parts[h] : NULL;
		f->asked[h] = 0;
	}
	return 0;
}

/* Sharded attention with its chains on 1, 2 or 4 KV hosts gives the bits of
 * the same numerics in the process, prompts in steps of 29 and decode steps
 * alike, GQA with sinks and MLA with the values in the keys; the shipped pages
 * are released here (zeros if read), so the coordinator provably reads only
 * each row's own page. */
static void test_attn_shards_hosts(void **state)
{
	(void)state;
	enum { NT = 300, NS = 2, NH = 4, P = 64, V = 4 };
	static const struct attn_remote_ops ops = {.ship = fake_ship,
						   .submit = fake_submit,
						   .collect = fake_collect,
						   .budget = fake_budget};
	for (int mla = 0; mla < 2; mla++) {
		const int nkv = mla ? 1 : 2, dk = mla ? 40 : 24, dv = mla ? 32 : 24;
		const int kw = nkv * dk, vw = nkv * dv;
		float sinks[NH];
		for (int h = 0; h < NH; h++)
			sinks[h] = rng_normal();
		struct attn_params ap = {.n_head = NH,
					 .n_head_kv = nkv,
					 .head_dim_k = dk,
					 .head_dim_v = dv,
					 .scale = 0.2f,
					 .sinks = mla ? NULL : sinks};
		static float k[NS][NT][64], v[NS][NT][64], q[NS][NT][NH * 40];
		static float ref[NS][NT][NH * 32], got[NS][NT][NH * 32];
		for (int sq = 0; sq < NS; sq++)
			for (int i = 0; i < NT; i++) {
				for (int d = 0; d < kw; d++)
					k[sq][i][d] = rng_normal();
				for (int d = 0; d < vw; d++)
					v[sq][i][d] = mla ? k[sq][i][d] : rng_normal();
				for (int d = 0; d < NH * dk; d++)
					q[sq][i][d] = rng_normal();
			}
		for (int R = 0; R <= 4; R = R ? 2 * R : 1) {
			attn_cache *c = NULL;
			pool *p = NULL;
			assert_int_equal(mla ? attn_cache_new_shared(1, NS, NT, kw, vw, &c)
					     : attn_cache_new(1, NS, NT, kw, vw, &c),
					 0);
			assert_int_equal(attn_cache_set_shards(c, V, P), 0);
			assert_int_equal(pool_new(2, &p), 0);
			struct fake_hosts f = {.p = p, .n_layer = 1, .n_seq = NS, .n_page = NT / P};
			f.pages = calloc((size_t)NS * f.n_page, sizeof(*f.pages));
			if (R) {
				/* a host must have room for its pages of one whole
				 * context: pages 0-3, each with a table entry */
				const uint64_t page_bytes =
				    64 * (uint64_t)(kw + (mla ? 0 : vw)) * 2 +
				    sizeof(struct attn_page);
				fake_budget_bytes = (uint64_t)(4 / R) * page_bytes + 32 - 1;
				assert_int_equal(attn_cache_set_remote(c, &ops, &f, R), ERR_CONFIG);
				fake_budget_bytes++;
				assert_int_equal(attn_cache_set_remote(c, &ops, &f, R), 0);
				/* what admission is told */
				struct attn_kv_room room;
				attn_cache_kv_room(c, &room);
				assert_int_equal(room.n_hosts, R);
				assert_int_equal(room.n_shard, V);
				assert_int_equal(room.page, P);
				assert_int_equal(room.n_layer, 1);
				assert_int_equal(room.page_bytes + room.entry_bytes, page_bytes);
				assert_int_equal(room.budget[R - 1], fake_budget_bytes);
				assert_int_equal(room.local_bytes,
						 (uint64_t)NS * NT * (kw + (mla ? 0 : vw)) * 2);
			}
			/* sequence 0: a prompt in steps of 29 up to 203, then one
			 * token per step; sequence 1 one token in each step */
			memset(got, 0, sizeof(got));
			int n_step = 0;
			for (int i0 = 0; i0 < NT; n_step++) {
				const int n0 = i0 < 200 ? 29 : 1;
				int32_t pos[30], seq[30], tok[30] = {0};
				static float qb[30 * NH * 40], ob[30 * NH * 32];
				int n = 0;
				for (int j = 0; j < n0; j++, n++) {
					pos[n] = i0 + j;
					seq[n] = 0;
				}
				pos[n] = n_step;
				seq[n++] = 1;
				for (int j = 0; j < n; j++) {
					attn_cache_store(c, 0, seq[j], pos[j], k[seq[j]][pos[j]],
							 v[seq[j]][pos[j]]);
					memcpy(qb + (size_t)j * NH * dk, q[seq[j]][pos[j]],
					       sizeof(float) * NH * dk);
				}
				model_batch b = {
				    .n_tokens = n, .token = tok, .pos = pos, .seq = seq};
				assert_int_equal(attn_forward(p, c, 0, &ap, &b, qb, ob), 0);
				for (int j = 0; j < n; j++)
					memcpy(R ? got[seq[j]][pos[j]] : ref[seq[j]][pos[j]],
					       ob + (size_t)j * NH * dv, sizeof(float) * NH * dv);
				i0 += n0;
			}
			if (R) {
				for (int sq = 0; sq < NS; sq++)
					for (int i = 0; i < (sq ? n_step : NT); i++)
						assert_memory_equal(ref[sq][i], got[sq][i],
								    sizeof(float) * NH * dv);
				assert_true(f.n_ship > 0 && f.n_submit > 0);
			}
			for (int i = 0; i < NS * f.n_page; i++)
				free((void *)f.pages[i].k);
			free(f.pages);
			for (int h = 0; h < 8; h++)
				free(f.parts[h]);
			attn_host_scratch_destroy(&f.scratch);
			pool_destroy(&p);
			attn_cache_destroy(&c);
		}
	}
}

/* attn_cache_fill_random: a decode step after a pseudo-random context gives
 * finite results, the same bits with the chains on 2 KV hosts as in the
 * process (so the hosts got every page, with the same values: the cache
 * filled the same from the same seed and released the shipped pages), and
 * only the layer without a sliding window ships its pages.  Filled twice, the
 * slot's reset makes the hosts drop its pages once (free_seq) and the pages
 * go again; a change of hosts drops them too.  Bad slots and depths are
 * refused. */
static void test_attn_fill_random(void **state)
{
	(void)state;
	enum { NT = 300, D = 200, NH = 4, NKV = 2, DH = 32, P = 64, V = 4 };
	static const struct attn_remote_ops ops = {.ship = fake_ship,
						   .submit = fake_submit,
						   .collect = fake_collect,
						   .budget = fake_budget,
						   .free_seq = fake_free_seq};
	const int ring[2] = {0, 128};
	struct attn_params ap = {
	    .n_head = NH, .n_head_kv = NKV, .head_dim_k = DH, .head_dim_v = DH, .scale = 0.2f};
	static float kv[NKV * DH], q[NH * DH], out[2][NH * DH];
	for (int d = 0; d < NKV * DH; d++)
		kv[d] = rng_normal();
	for (int d = 0; d < NH * DH; d++)
		q[d] = rng_normal();
	fake_budget_bytes = UINT64_MAX;
	for (int R = 0; R <= 2; R += 2) {
		attn_cache *c = NULL;
		pool *p = NULL;
		assert_int_equal(attn_cache_new_ring(2, 1, NT, NKV * DH, NKV * DH, ring, &c), 0);
		assert_int_equal(attn_cache_set_shards(c, V, P), 0);
		assert_int_equal(pool_new(2, &p), 0);
		struct fake_hosts f = {.p = p, .n_layer = 2, .n_seq = 1, .n_page = NT / P};
		f.pages = calloc(2 * (size_t)f.n_page, sizeof(*f.pages));
		if (R)
			assert_int_equal(attn_cache_set_remote(c, &ops, &f, R), 0);
		assert_int_equal(attn_cache_fill_random(c, 1, D, 7), ERR_RANGE);
		assert_int_equal(attn_cache_fill_random(c, 0, NT + 1, 7), ERR_RANGE);
		assert_int_equal(attn_cache_fill_random(c, 0, D, 7), 0);
		assert_int_equal(f.n_free, 0); /* nothing shipped before */
		assert_int_equal(attn_cache_fill_random(c, 0, D, 7), 0);
		assert_int_equal(f.n_free, R ? 1 : 0);
		/* layer 0's complete pages, twice */
		assert_int_equal(f.n_ship, R ? 2 * D / P : 0);
		int32_t pos = D, seq = 0, tok = 0;
		attn_cache_store(c, 0, 0, D, kv, kv);
		model_batch b = {.n_tokens = 1, .token = &tok, .pos = &pos, .seq = &seq};
		assert_int_equal(attn_forward(p, c, 0, &ap, &b, q, out[R / 2]), 0);
		if (R) {
			assert_true(f.n_submit > 0);
			assert_int_equal(attn_cache_set_remote(c, &ops, &f, R), 0);
			assert_int_equal(f.n_free, 2);
			attn_cache_reset_seq(c, 0); /* nothing shipped since */
			assert_int_equal(f.n_free, 2);
		}
		for (int d = 0; d < NH * DH; d++)
			assert_true(isfinite(out[R / 2][d]));
		for (int i = 0; i < 2 * f.n_page; i++)
			free((void *)f.pages[i].k);
		free(f.pages);
		for (int h = 0; h < 8; h++)
			free(f.parts[h]);
		pool_destroy(&p);
		attn_cache_destroy(&c);
	}
	assert_memory_equal(out[0], out[1], sizeof(out[0]));
}

/* Decode steps (one token per call) equal the same rows of a short batch:
 * both take the one-row path. */
static void test_attn_decode_vs_batch(void **state)
{
	(void)state;
	const int n_tok = 20, nh = 4, nkv = 2, dk = 32, dv = 32;
	attn_cache *c = NULL;
	pool *p = NULL;
	assert_int_equal(attn_cache_new(1, 1, n_tok, nkv * dk, nkv * dv, &c), 0);
	assert_int_equal(pool_new(2, &p), 0);
	float q[20 * 4 * 32], kv[64], out_b[20 * 4 * 32], out_d[4 * 32];
	int32_t pos[20], seq[20] = {0}, tok[20] = {0};
	for (int i = 0; i < n_tok; i++) {
		pos[i] = i;
		for (int d = 0; d < 64; d++)
			kv[d] = rng_normal();
		attn_cache_store(c, 0, 0, i, kv, kv);
	}
	for (int i = 0; i < n_tok * nh * dk; i++)
		q[i] = rng_normal();
	struct attn_params ap = {
	    .n_head = nh, .n_head_kv = nkv, .head_dim_k = dk, .head_dim_v = dv, .scale = 0.17f};
	model_batch b = {.n_tokens = n_tok, .token = tok, .pos = pos, .seq = seq};
	attn_forward(p, c, 0, &ap, &b, q, out_b);
	for (int i = 0; i < n_tok; i++) {
		model_batch one = {.n_tokens = 1, .token = tok, .pos = &pos[i], .seq = seq};
		attn_forward(p, c, 0, &ap, &one, q + (size_t)i * nh * dk, out_d);
		assert_memory_equal(out_d, out_b + (size_t)i * nh * dv, sizeof(out_d));
	}
	pool_destroy(&p);
	attn_cache_destroy(&c);
}

/* A sequence's rows do not depend on the other sequences in its batch: a long
 * prompt (tiled kernel) and a short one (one-row kernel) batched together give
 * the same bits as each alone. */
static void test_attn_batch_independent(void **state)
{
	(void)state;
	enum { NA = 70, NB = 5, NH = 4, NKV = 2, D = 32, N = NA + NB };
	attn_cache *c = NULL;
	pool *p = NULL;
	assert_int_equal(attn_cache_new(1, 2, NA, NKV * D, NKV * D, &c), 0);
	assert_int_equal(pool_new(2, &p), 0);
	static float q[N][NH * D], kv[NKV * D], both[N][NH * D], alone[N][NH * D];
	int32_t pos[N], seq[N], tok[N] = {0};
	for (int i = 0; i < N; i++) {
		seq[i] = i < NA ? 0 : 1;
		pos[i] = i < NA ? i : i - NA;
		for (int d = 0; d < NKV * D; d++)
			kv[d] = rng_normal();
		attn_cache_store(c, 0, seq[i], pos[i], kv, kv);
		for (int d = 0; d < NH * D; d++)
			q[i][d] = rng_normal();
	}
	struct attn_params ap = {
	    .n_head = NH, .n_head_kv = NKV, .head_dim_k = D, .head_dim_v = D, .scale = 0.2f};
	model_batch b = {.n_tokens = N, .token = tok, .pos = pos, .seq = seq};
	attn_forward(p, c, 0, &ap, &b, &q[0][0], &both[0][0]);
	model_batch a = {.n_tokens = NA, .token = tok, .pos = pos, .seq = seq};
	attn_forward(p, c, 0, &ap, &a, &q[0][0], &alone[0][0]);
	model_batch o = {.n_tokens = NB, .token = tok, .pos = pos + NA, .seq = seq + NA};
	attn_forward(p, c, 0, &ap, &o, &q[NA][0], &alone[NA][0]);
	assert_memory_equal(both, alone, sizeof(both));
	pool_destroy(&p);
	attn_cache_destroy(&c);
}

/* Single-token steps late in a long cache take the split-KV path (two halves
 * merged in F32); with and without sinks they stay close to the exact result. */
static void test_attn_split_decode(void **state)
{
	(void)state;
	enum { NP = 700, NH = 4, NKV = 2, D = 64 };
	attn_cache *c = NULL;
	pool *p = NULL;
	assert_int_equal(attn_cache_new(1, 1, NP, NKV * D, NKV * D, &c), 0);
	assert_int_equal(pool_new(2, &p), 0);
	static float k[NP][NKV * D], v[NP][NKV * D];
	for (int j = 0; j < NP; j++) {
		for (int d = 0; d < NKV * D; d++) {
			k[j][d] = kern_f16_to_f32(kern_f32_to_f16(rng_normal()));
			v[j][d] = kern_f16_to_f32(kern_f32_to_f16(rng_normal()));
		}
		attn_cache_store(c, 0, 0, j, k[j], v[j]);
	}
	float sinks[NH] = {0.5f, 3.0f, -1.0f, 8.0f};
	const int positions[] = {0, 255, 256, 300, 511, 699};
	for (int use_sinks = 0; use_sinks < 2; use_sinks++) {
		struct attn_params ap = {.n_head = NH,
					 .n_head_kv = NKV,
					 .head_dim_k = D,
					 .head_dim_v = D,
					 .scale = 0.125f,
					 .sinks = use_sinks ? sinks : NULL};
		for (size_t i = 0; i < sizeof(positions) / sizeof(positions[0]); i++) {
			int32_t pos = positions[i], seq = 0, tok = 0;
			float q[NH * D], out[NH * D];
			for (int d = 0; d < NH * D; d++)
				q[d] = rng_normal();
			model_batch b = {.n_tokens = 1, .token = &tok, .pos = &pos, .seq = &seq};
			attn_forward(p, c, 0, &ap, &b, q, out);
			float out_ref[NH * D];
			kern_force_ref(1);
			attn_forward(p, c, 0, &ap, &b, q, out_ref);
			kern_force_ref(0);
			assert_memory_equal(out, out_ref, sizeof(out));
			for (int h = 0; h < NH; h++) {
				int hk = h / (NH / NKV);
				double w[NP], mx = use_sinks ? sinks[h] : -INFINITY, den = 0.0;
				for (int j = 0; j <= pos; j++) {
					double s = 0.0;
					for (int d = 0; d < D; d++)
						s += (double)q[h * D + d] * k[j][hk * D + d];
					w[j] = s * ap.scale;
					mx = w[j] > mx ? w[j] : mx;
				}
				for (int j = 0; j <= pos; j++)
					den += exp(w[j] - mx);
				if (use_sinks)
					den += exp(sinks[h] - mx);
				for (int d = 0; d < D; d++) {
					double ref = 0.0;
					for (int j = 0; j <= pos; j++)
						ref += exp(w[j] - mx) * v[j][hk * D + d];
					ref /= den;
					if (fabs(ref - out[h * D + d]) > 4e-3)
						fail_msg("pos %d head %d dim %d: %g vs %g", pos, h,
							 d, out[h * D + d], ref);
				}
			}
		}
	}
	pool_destroy(&p);
	attn_cache_destroy(&c);
}

/* attention over gathered keys (DeepSeek-V4): every kernel, F16 and F32 rows,
 * dims with and without a SIMD tail, with and without sinks: with F16 rows
 * the AVX2 forms give the scalar loops' bits, one head alone gives what all
 * heads together give, and the result is close to a double-precision softmax
 * attention. */
static void test_attn_gather_simd_scalar(void **state)
{
	(void)state;
	enum { NK = 600, NH = 3, DMAX = 136 };
	static uint16_t k16[NK][DMAX];
	static float k32[NK][DMAX];
	static const void *rows16[NK], *rows32[NK];
	static int32_t cell[NK];
	float q[NH * DMAX], sinks[NH] = {0.3f, 6.0f, -2.0f};
	float simd[NH * DMAX], ref[NH * DMAX], one[DMAX];
	float *scratch = malloc(sizeof(float) * attn_gather_scratch_floats(NH, DMAX));
	assert_non_null(scratch);
	for (int i = 0; i < NK; i++) {
		cell[i] = 3 * i + (i % 3); /* strictly increasing, with gaps */
		for (int d = 0; d < DMAX; d++) {
			k16[i][d] = kern_f32_to_f16(rng_normal());
			k32[i][d] = rng_normal();
		}
		rows16[i] = k16[i];
		rows32[i] = k32[i];
	}
	for (int d = 0; d < NH * DMAX; d++)
		q[d] = rng_normal();
	const int dims[] = {64, 72, 136};
	const int counts[] = {1, 40, NK};
	/* each SIMD level the CPU has against the scalar loops */
	for (int isa = kern_cpu_isa() ? KERN_ISA_AVX2 : KERN_ISA_SCALAR; isa <= (int)kern_cpu_isa();
	     isa++)
		for (int f32 = 0; f32 < 2; f32++)
			for (int kern = ATTN_KERNEL_ONE_ROW; kern <= ATTN_KERNEL_TILED; kern++)
				for (size_t di = 0; di < 3; di++)
					for (size_t ci = 0; ci < 3; ci++)
						for (int sk = 0; sk < 2; sk++) {
							const int dim = dims[di], n = counts[ci];
							struct attn_keys ks = {
							    .n = n,
							    .cell = cell,
							    .row = f32 ? rows32 : rows16,
							    .f32 = f32,
							    .n_cells = cell[n - 1] + 1,
							    .kernel = (enum attn_kernel)kern};
							const float *sk_p = sk ? sinks : NULL;
							attn_gather_heads(&ks, NH, dim, q, 0.1f,
									  sk_p, scratch, simd);
							isa_use(KERN_ISA_SCALAR);
							attn_gather_heads(&ks, NH, dim, q, 0.1f,
									  sk_p, scratch, ref);
							isa_use(isa);
							/* F32 rows use kern_dot, whose AVX2 form
							 * sums in another order than its scalar
							 * twin (test_kern bounds that) */
							for (int d = 0; d < NH * dim && f32; d++)
								if (fabsf(simd[d] - ref[d]) > 1e-5f)
									fail_msg("f32 kernel %d "
										 "dim %d n %d: "
										 "%g vs %g",
										 kern, dim, n,
										 simd[d], ref[d]);
							if (!f32)
								assert_memory_equal(simd, ref,
										    sizeof(float) *
											NH * dim);
							for (int h = 0; h < NH; h++) {
								attn_gather_row(
								    &ks, dim, q + h * dim, 0.1f,
								    sk ? &sinks[h] : NULL, one);
								assert_memory_equal(
								    one, simd + h * dim,
								    sizeof(float) * dim);
							}
							/* head 0 against a double-precision softmax
							 */
							double w[NK],
							    mx = sk ? sinks[0] : -INFINITY,
							    den = 0.0;
							for (int j = 0; j < n; j++) {
								double s = 0.0;
								for (int d = 0; d < dim; d++)
									s += (double)q[d] *
									     (f32 ? k32[j][d]
										  : kern_f16_to_f32(
											k16[j][d]));
								w[j] = 0.1 * s;
								mx = w[j] > mx ? w[j] : mx;
							}
							for (int j = 0; j < n; j++)
								den += exp(w[j] - mx);
							if (sk)
								den += exp(sinks[0] - mx);
							for (int d = 0; d < dim; d++) {
								double r = 0.0;
								for (int j = 0; j < n; j++)
									r += exp(w[j] - mx) *
									     (f32 ? k32[j][d]
										  : kern_f16_to_f32(
											k16[j][d]));
								r /= den;
								if (fabs(r - simd[d]) > 4e-3)
									fail_msg("f32 %d kernel %d "
										 "dim %d n "
										 "%d: %g vs %g",
										 f32, kern, dim, n,
										 simd[d], r);
							}
						}
	isa_use(KERN_ISA_AVX512);
	/* the compressors' softmax */
	float x[77], xr[77];
	for (int i = 0; i < 77; i++)
		x[i] = xr[i] = 3.0f * rng_normal();
	x[5] = xr[5] = -INFINITY;
	attn_soft_max_row(x, 77);
	kern_force_ref(1);
	attn_soft_max_row(xr, 77);
	kern_force_ref(0);
	assert_memory_equal(x, xr, sizeof(x));
	free(scratch);
}

/* A stream of attn_forward calls on layer 1 of a two-layer cache: each call
 * adds chunk[s] tokens to every sequence s (interleaved), stores them, then
 * attends.  Layer 1 is a ring of cap positions (0: the whole context). */
struct ring_spec {
	int window, sinks, n_seq, n_calls, cap;
	int chunk[3]; /* tokens per call of each sequence */
};

enum { RING_NH = 4, RING_NKV = 2, RING_D = 64, RING_CTX = 600 };

/* Runs the stream with layer 1 a ring (ring) or whole; out receives every
 * call's outputs one after the other; returns how many floats. */
static size_t ring_run(const struct ring_spec *rs, int ring, int n_threads, float *out)
{
	enum { KW = RING_NKV * RING_D, QW = RING_NH * RING_D };
	attn_cache *c = NULL;
	pool *p = NULL;
	const int caps[2] = {0, ring ? rs->cap : 0};
	assert_int_equal(attn_cache_new_ring(2, rs->n_seq, RING_CTX, KW, KW, caps, &c), 0);
	assert_int_equal(pool_new(n_threads, &p), 0);
	float sinks[RING_NH] = {0.5f, 3.0f, -1.0f, 8.0f};
	struct attn_params ap = {.n_head = RING_NH,
				 .n_head_kv = RING_NKV,
				 .head_dim_k = RING_D,
				 .head_dim_v = RING_D,
				 .scale = 0.125f,
				 .window = rs->window,
				 .sinks = rs->sinks ? sinks : NULL};
	assert_int_equal(attn_check_layer(c, 1, &ap, "test"), 0);
	static float q[256 * QW], k[KW], v[KW];
	int32_t pos[256], seq[256], tok[256] = {0}, next[3] = {0};
	size_t n_out = 0;
	rng_state = 88172645463325252ull;
	for (int call = 0; call < rs->n_calls; call++) {
		int n = 0;
		for (int i = 0; i < 3 * 256 && n < 256; i++) {
			const int s = i % rs->n_seq;
			if (i / rs->n_seq >= rs->chunk[s])
				continue;
			seq[n] = s;
			pos[n] = next[s]++;
			assert_true(pos[n] < RING_CTX);
			for (int d = 0; d < KW; d++) {
				k[d] = rng_normal();
				v[d] = rng_normal();
			}
			for (int d = 0; d < QW; d++)
				q[(size_t)n * QW + d] = rng_normal();
			attn_cache_store(c, 1, s, pos[n], k, v);
			for (int d = 0; d < KW; d++)
				k[d] = -k[d];
			attn_cache_store(c, 0, s, pos[n], k, v);
			n++;
		}
		model_batch b = {.n_tokens = n, .token = tok, .pos = pos, .seq = seq};
		attn_forward(p, c, 1, &ap, &b, q, out + n_out);
		n_out += (size_t)n * QW;
	}
	pool_destroy(&p);
	attn_cache_destroy(&c);
	return n_out;
}

/* A ring gives the bits of the whole-context cache at every ISA level, with
 * one and two threads. */
static void check_ring(const struct ring_spec *rs)
{
	size_t n_max = 0;
	for (int s = 0; s < rs->n_seq; s++)
		n_max += (size_t)rs->chunk[s];
	n_max *= (size_t)rs->n_calls * RING_NH * RING_D;
	float *full = malloc(sizeof(float) * n_max), *ring = malloc(sizeof(float) * n_max);
	for (int isa = KERN_ISA_SCALAR; isa <= (int)kern_cpu_isa(); isa++) {
		isa_use(isa);
		for (int nt = 1; nt <= 2; nt++) {
			const size_t n = ring_run(rs, 0, nt, full);
			assert_int_equal(ring_run(rs, 1, nt, ring), n);
			assert_memory_equal(full, ring, n * sizeof(float));
		}
	}
	isa_use(KERN_ISA_AVX512);
	free(full);
	free(ring);
}

/* Window layers in rings of window + batch positions: decode steps past many
 * wraps (one-row kernel), prefills of >= 64 rows whose window straddles the
 * wrap (tiled kernel, with and without the F32 copies), several sequences in
 * one batch, windows that are not multiples of the tile, sinks. */
static void test_attn_ring(void **state)
{
	(void)state;
	/* decode: ring of window + 1, wrapping ~13 times */
	check_ring(
	    &(struct ring_spec){.window = 5, .n_seq = 1, .n_calls = 80, .cap = 6, .chunk = {1}});
	check_ring(&(struct ring_spec){
	    .window = 7, .sinks = 1, .n_seq = 2, .n_calls = 60, .cap = 10, .chunk = {1, 3}});
	/* prefill in chunks of 70 (tiled), window 100 (not a multiple of 64) */
	check_ring(&(struct ring_spec){
	    .window = 100, .sinks = 1, .n_seq = 1, .n_calls = 8, .cap = 170, .chunk = {70}});
	/* window 128 as gpt-oss's, chunks of 64; a tight and a loose ring */
	check_ring(&(struct ring_spec){
	    .window = 128, .n_seq = 1, .n_calls = 9, .cap = 192, .chunk = {64}});
	check_ring(&(struct ring_spec){
	    .window = 128, .sinks = 1, .n_seq = 1, .n_calls = 9, .cap = 200, .chunk = {64}});
	/* three sequences in one batch: tiled, one-row and decode rows */
	check_ring(&(struct ring_spec){.window = 37,
				       .sinks = 1,
				       .n_seq = 3,
				       .n_calls = 7,
				       .cap = 37 + 80,
				       .chunk = {80, 9, 1}});
	/* a window smaller than a tile with tiled rows */
	check_ring(&(struct ring_spec){
	    .window = 4, .n_seq = 2, .n_calls = 6, .cap = 4 + 66, .chunk = {66, 2}});
}

/* Ring sizes the cache or the layer's window cannot use are refused. */
static void test_attn_ring_params(void **state)
{
	(void)state;
	attn_cache *c = NULL;
	const int neg[2] = {0, -1};
	assert_int_equal(attn_cache_new_ring(2, 1, 64, 64, 64, neg, &c), ERR_CONFIG);
	assert_null(c);
	const int ring[2] = {0, 16};
	assert_int_equal(attn_cache_new_ring(2, 1, 64, 64, 64, ring, &c), 0);
	struct attn_params ap = {
	    .n_head = 4, .n_head_kv = 2, .head_dim_k = 32, .head_dim_v = 32, .scale = 1.0f};
	assert_int_equal(attn_check_layer(c, 0, &ap, "test"), 0);
	assert_int_equal(attn_check_layer(c, 1, &ap, "test"), ERR_FORMAT); /* no window */
	ap.window = 17;
	assert_int_equal(attn_check_layer(c, 1, &ap, "test"), ERR_FORMAT); /* ring too small */
	ap.window = 16;
	assert_int_equal(attn_check_layer(c, 1, &ap, "test"), 0);
	assert_int_equal(attn_check_layer(c, 2, &ap, "test"), ERR_FORMAT);
	ap.head_dim_k = 16; /* and the common checks still apply */
	assert_int_equal(attn_check_layer(c, 1, &ap, "test"), ERR_FORMAT);
	attn_cache_destroy(&c);
	/* a ring as long as the context is the whole context: no window needed */
	const int whole[2] = {64, 100};
	assert_int_equal(attn_cache_new_ring(2, 1, 64, 64, 64, whole, &c), 0);
	ap.head_dim_k = 32;
	ap.window = 0;
	assert_int_equal(attn_check_layer(c, 1, &ap, "test"), 0);
	attn_cache_destroy(&c);
}

static void test_attn_check_params(void **state)
{
	(void)state;
	attn_cache *c = NULL;
	assert_int_equal(attn_cache_new(1, 1, 4, 64, 64, &c), 0);
	struct attn_params ok = {
	    .n_head = 4, .n_head_kv = 2, .head_dim_k = 32, .head_dim_v = 32, .scale = 1.0f};
	assert_int_equal(attn_check_params(c, &ok, "test"), 0);
	struct attn_params bad = ok;
	bad.n_head = 3;
	assert_int_equal(attn_check_params(c, &bad, "test"), ERR_FORMAT);
	bad = ok;
	bad.head_dim_k = 16;
	assert_int_equal(attn_check_params(c, &bad, "test"), ERR_FORMAT);
	bad = ok;
	bad.window = -1;
	assert_int_equal(attn_check_params(c, &bad, "test"), ERR_FORMAT);
	attn_cache_destroy(&c);
	assert_null(c);
	assert_int_equal(attn_cache_new(0, 1, 4, 64, 64, &c), ERR_CONFIG);
	/* values read from the keys: no longer than a key, one KV head */
	assert_int_equal(attn_cache_new_shared(1, 1, 4, 64, 80, &c), ERR_CONFIG);
	assert_int_equal(attn_cache_new_shared(1, 1, 4, 64, 48, &c), 0);
	assert_int_equal(attn_check_params(c, &ok, "test"), ERR_FORMAT);
	struct attn_params one = {
	    .n_head = 4, .n_head_kv = 1, .head_dim_k = 64, .head_dim_v = 48, .scale = 1.0f};
	assert_int_equal(attn_check_params(c, &one, "test"), 0);
	attn_cache_destroy(&c);
	assert_int_equal(attn_cache_new(1 << 30, 1 << 30, 1 << 30, 1 << 30, 64, &c), ERR_NOMEM);
	assert_null(c);
}

int main(void)
{
	kern_init();
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_attn_gqa_short),
	    cmocka_unit_test(test_attn_gqa_tiled),
	    cmocka_unit_test(test_attn_window_sinks),
	    cmocka_unit_test(test_attn_mla_multiseq),
	    cmocka_unit_test(test_attn_decode_vs_batch),
	    cmocka_unit_test(test_attn_split_decode),
	    cmocka_unit_test(test_attn_batch_independent),
	    cmocka_unit_test(test_attn_check_params),
	    cmocka_unit_test(test_attn_shards),
	    cmocka_unit_test(test_attn_shards_any_batch),
	    cmocka_unit_test(test_attn_shards_hosts),
	    cmocka_unit_test(test_attn_fill_random),
	    cmocka_unit_test(test_attn_ring),
	    cmocka_unit_test(test_attn_ring_params),
	    cmocka_unit_test(test_attn_gather_simd_scalar),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
