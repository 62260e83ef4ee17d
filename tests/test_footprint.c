/* test_footprint: the cluster arithmetic of `moefleet info` (coordinator/
 * footprint.c), and the promise behind it: a coordinator whose experts are
 * computed elsewhere never reads a page of routed-expert bytes.
 *
 * The residency test makes every page lying wholly inside a routed-expert
 * tensor unreadable (mprotect PROT_NONE) and runs prefill and decode steps
 * whose expert backend is a stub (what a remote cluster looks like from the
 * coordinator): any read of expert bytes would fault, and the test checks that
 * a deliberate read does. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/gguf.h"
#include "common/gguf_write.h"
#include "coordinator/model/experts.h"
#include "coordinator/model/footprint.h"
#include "coordinator/model/model.h"

static char *data_path(const char *name)
{
	const char *top = getenv("top_srcdir");
	static char buf[4][1024];
	static int i;
	char *b = buf[i++ % 4];
	snprintf(b, sizeof(buf[0]), "%s/tests/data/%s", top ? top : ".", name);
	return b;
}

static void test_measure(void **state)
{
	(void)state;
	gguf *g = NULL;
	assert_int_equal(gguf_open(data_path("ds2-tiny-q4_0.gguf"), &g), 0);
	struct footprint f;
	assert_int_equal(footprint_measure(g, &f), 0);
	uint64_t all = 0, exps = 0;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		all += t->n_bytes;
		if (strstr(t->name, "ffn_gate_exps") || strstr(t->name, "ffn_up_exps") ||
		    strstr(t->name, "ffn_down_exps"))
			exps += t->n_bytes;
	}
	assert_true(f.expert_bytes == exps && f.coordinator_bytes + f.expert_bytes == all);
	assert_int_equal(f.n_expert, 16);
	assert_true(f.layer_expert_bytes[0] == 0); /* the dense layer */
	assert_true(f.layer_expert_bytes[1] + f.layer_expert_bytes[2] == exps);
	assert_true(f.kv_known && f.kv_bytes_per_1k > 0);

	/* placement: every expert byte on some worker, within the budgets */
	uint64_t mem[3], wb[3];
	int n;
	assert_int_equal(footprint_parse_memory("300K,300K,100K", mem, 3, &n), 0);
	assert_int_equal(n, 3);
	assert_true(mem[2] == 100 * 1024);
	assert_int_equal(footprint_place(&f, mem, 3, wb), 0);
	assert_true(wb[0] + wb[1] + wb[2] == exps);
	for (int i = 0; i < 3; i++)
		assert_true(wb[i] <= mem[i]);
	assert_int_equal(footprint_parse_memory("100K,100K", mem, 3, &n), 0);
	assert_int_equal(footprint_place(&f, mem, 2, wb), ERR_CONFIG); /* does not fit */
	gguf_destroy(&g);

	const char *bad[] = {"", "0", "64X", "64G,", ",64G", "-1G", "1G,2G,3G,4G"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(footprint_parse_memory(bad[i], mem, 3, &n), ERR_CONFIG);
	assert_int_equal(footprint_parse_memory("64G,1.5T", mem, 3, &n), 0);
	assert_true(mem[0] == 64ull << 30 && mem[1] == 3ull << 39);
}

/* deepseek2: the split layout builds nothing; the legacy attn_kv_b layout
 * (F16, 3 layers, 8 heads, kv_lora 64, nope 32) builds n_head x kv_lora rows
 * of nope F16 values per layer; the KV cache is the same for both. */
static void test_deepseek2_layouts(void **state)
{
	(void)state;
	gguf *g = NULL;
	struct footprint split, legacy;
	assert_int_equal(gguf_open(data_path("ds2-tiny-f32.gguf"), &g), 0);
	assert_int_equal(footprint_measure(g, &split), 0);
	gguf_destroy(&g);
	assert_int_equal(gguf_open(data_path("ds2-tiny-kvb.gguf"), &g), 0);
	assert_int_equal(footprint_measure(g, &legacy), 0);
	gguf_destroy(&g);
	assert_true(split.coordinator_built_bytes == 0);
	assert_true(legacy.coordinator_built_bytes == 3ull * 8 * 64 * 32 * 2);
	assert_true(legacy.kv_known && legacy.kv_bytes_per_1k == split.kv_bytes_per_1k);
	assert_true(legacy.expert_bytes == split.expert_bytes);
}

/* DeepSeek-V4-Flash's attention hyper-parameters (metadata only): the KV
 * cache at 1M tokens must match the spec's own arithmetic, about 6.7 GiB in
 * 16-bit entries (Flash: 21 CSA layers with 512-wide entries per 4 tokens plus
 * 128-wide indexer keys, 20 HCA layers per 128 tokens, 2 window-only layers). */
static void test_deepseek4_kv(void **state)
{
	(void)state;
	char path[] = "/tmp/test_footprint_XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	close(fd);
	gguf_writer *w = NULL;
	assert_int_equal(gguf_writer_new(&w), 0);
	int32_t ratios[44] = {0, 0};
	for (int l = 2; l < 42; l++)
		ratios[l] = l % 2 == 0 ? 4 : 128;
	ratios[42] = 4;
	ratios[43] = 0;
	assert_int_equal(gguf_writer_set_str(w, "general.architecture", "deepseek4"), 0);
	assert_int_equal(gguf_writer_set_u32(w, "deepseek4.block_count", 43), 0);
	assert_int_equal(gguf_writer_set_u32(w, "deepseek4.attention.key_length", 512), 0);
	assert_int_equal(gguf_writer_set_u32(w, "deepseek4.attention.indexer.key_length", 128), 0);
	assert_int_equal(gguf_writer_set_u32(w, "deepseek4.attention.sliding_window", 128), 0);
	assert_int_equal(gguf_writer_set_arr(w, "deepseek4.attention.compress_ratios",
					     GGUF_TYPE_I32, ratios, 44),
			 0);
	assert_int_equal(gguf_writer_open(w, path), 0);
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
	gguf *g = NULL;
	assert_int_equal(gguf_open(path, &g), 0);
	struct footprint f;
	assert_int_equal(footprint_measure(g, &f), 0);
	assert_true(f.kv_known);
	double gib_1m = (double)f.kv_bytes_per_1k * 1024.0 / 1073741824.0;
	assert_true(gib_1m > 6.6 && gib_1m < 6.8);
	/* fixed: 43 window rings of 128 x 512 x 2 B plus compressor states */
	assert_true(f.kv_bytes_fixed >= 43ull * 128 * 512 * 2);
	assert_true(f.kv_bytes_fixed < 32ull << 20);
	gguf_destroy(&g);
	unlink(path);
}

/* gpt-oss-120b's attention hyper-parameters (metadata only): 36 layers, 8 KV
 * heads of 64 + 64 values, a window of 128 on the even layers (no pattern
 * key).  The 18 window layers keep rings of 128 + n_batch positions, so at
 * 128K tokens the KV is about half of 36 full layers; a context shorter than
 * a ring costs what it did (every layer whole); a pattern array picks the
 * ring layers. */
static void test_gptoss_kv(void **state)
{
	(void)state;
	for (int with_pattern = 0; with_pattern < 2; with_pattern++) {
		char path[] = "/tmp/test_footprint_XXXXXX";
		int fd = mkstemp(path);
		assert_true(fd >= 0);
		close(fd);
		gguf_writer *w = NULL;
		assert_int_equal(gguf_writer_new(&w), 0);
		assert_int_equal(gguf_writer_set_str(w, "general.architecture", "gpt-oss"), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.block_count", 36), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.embedding_length", 2880), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.attention.head_count", 64), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.attention.head_count_kv", 8), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.attention.key_length", 64), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.attention.value_length", 64), 0);
		assert_int_equal(gguf_writer_set_u32(w, "gpt-oss.attention.sliding_window", 128),
				 0);
		uint8_t pattern[36] = {0};
		pattern[0] = pattern[5] = pattern[35] = 1;
		if (with_pattern)
			assert_int_equal(
			    gguf_writer_set_arr(w, "gpt-oss.attention.sliding_window_pattern",
						GGUF_TYPE_BOOL, pattern, 36),
			    0);
		assert_int_equal(gguf_writer_open(w, path), 0);
		assert_int_equal(gguf_writer_commit(w), 0);
		gguf_writer_destroy(&w);
		gguf *g = NULL;
		assert_int_equal(gguf_open(path, &g), 0);
		struct footprint f;
		assert_int_equal(footprint_measure(g, &f), 0);
		gguf_destroy(&g);
		unlink(path);
		const uint64_t row = 8 * (64 + 64) * 2; /* bytes per layer and position */
		const uint64_t n_ring = with_pattern ? 3 : 18;
		assert_true(f.kv_known);
		assert_true(f.kv_bytes_per_1k == 1024 * (36 - n_ring) * row);
		assert_true(f.kv_ring_bytes_per_pos == n_ring * row && f.kv_ring_window == 128);
		assert_true(footprint_kv_bytes(&f, 131072, 512) ==
			    (36 - n_ring) * row * 131072 + n_ring * row * (128 + 512));
		assert_true(footprint_kv_bytes(&f, 131072, 0) ==
			    footprint_kv_bytes(&f, 131072, 512)); /* the default batch */
		assert_true(footprint_kv_bytes(&f, 600, 512) == 36 * row * 600);
		assert_true(footprint_kv_bytes(&f, 600, 64) ==
			    (36 - n_ring) * row * 600 + n_ring * row * (128 + 64));
	}
}

/* ------------------------------------------------ coordinator residency */

static int stub_submit(void *self, const struct expert_job *job)
{
	(void)self;
	(void)job;
	return 0;
}

static int stub_collect(void *self, const struct expert_job *job)
{
	(void)self;
	memset(job->out, 0,
	       (size_t)job->n_rows * (size_t)job->k * (size_t)job->n_embd * sizeof(float));
	return 0;
}

static void stub_destroy(void *self)
{
	(void)self;
}

static const struct expert_backend_ops stub_ops = {stub_submit, stub_collect, stub_destroy};

static sigjmp_buf fault_jmp;
static volatile sig_atomic_t faulted;

static void on_segv(int sig)
{
	(void)sig;
	faulted = 1;
	siglongjmp(fault_jmp, 1);
}

/* The page-aligned part of [p, p + n): pages no other tensor shares. */
static int inner_pages(const void *p, uint64_t n, uintptr_t *lo, uintptr_t *hi)
{
	const uintptr_t psz = (uintptr_t)sysconf(_SC_PAGE_SIZE);
	*lo = ((uintptr_t)p + psz - 1) & ~(psz - 1);
	*hi = ((uintptr_t)p + (uintptr_t)n) & ~(psz - 1);
	return *hi > *lo;
}

/* Every page wholly inside a routed-expert tensor is made unreadable, then a
 * forward pass runs with a stub expert backend (what remote workers look like
 * from the coordinator): a read of expert bytes would fault. */
static void check_untouched(const char *name)
{
	if (access(data_path(name), R_OK) != 0) {
		print_message("# %s: not in tests/data, skipped\n", name);
		return;
	}
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = 1;
	mp.n_ctx = 16;
	model *m = NULL;
	assert_int_equal(model_open(data_path(name), &mp, &m), 0);
	const gguf *g = model_get_gguf(m);
	expert_backend *stub = NULL;
	assert_int_equal(expert_backend_new(&stub_ops, NULL, &stub), 0);
	model_set_experts(m, stub);

	size_t n_prot = 0;
	const void *probe = NULL;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		uintptr_t lo, hi;
		if (!strstr(t->name, "_exps.") || !inner_pages(t->data, t->n_bytes, &lo, &hi))
			continue;
		assert_int_equal(mprotect((void *)lo, hi - lo, PROT_NONE), 0);
		n_prot += (hi - lo);
		probe = (const void *)lo;
	}
	assert_true(n_prot > 0);

	struct sigaction sa, old;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_segv;
	sigemptyset(&sa.sa_mask);
	assert_int_equal(sigaction(SIGSEGV, &sa, &old), 0);
	faulted = 0;
	int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8}, pos[8], seq[8] = {0};
	for (int i = 0; i < 8; i++)
		pos[i] = i;
	float *logits = malloc(8 * (size_t)model_get_info(m)->n_vocab * sizeof(float));
	assert_non_null(logits);
	int rc = -1;
	if (sigsetjmp(fault_jmp, 1) == 0) {
		model_batch b = {8, tok, pos, seq, NULL};
		rc = model_forward(m, &b, logits);
		model_batch d = {1, tok, pos + 7, seq, NULL}; /* and one decode step */
		pos[7] = 8;
		if (!rc)
			rc = model_forward(m, &d, logits);
	}
	int faulted_forward = faulted;
	/* the protection is real: reading a protected page faults */
	faulted = 0;
	volatile uint8_t sink = 0;
	if (sigsetjmp(fault_jmp, 1) == 0)
		sink = *(const volatile uint8_t *)probe;
	(void)sink;
	int faulted_probe = faulted;
	sigaction(SIGSEGV, &old, NULL);
	free(logits);
	print_message("# %s: %zu bytes of expert pages protected, forward %s\n", name, n_prot,
		      faulted_forward ? "READ THEM" : "did not read them");
	assert_false(faulted_forward);
	assert_int_equal(rc, 0);
	assert_true(faulted_probe);
	/* model_destroy unmaps the file; the protection goes with it */
	model_destroy(&m);
}

/* The KV-host plan: pages counted one by one here (page i on chain i mod V,
 * chains split evenly over the hosts), against the function's arithmetic. */
static void test_kv_hosts_plan(void **state)
{
	(void)state;
	gguf *g = NULL;
	assert_int_equal(gguf_open(data_path("qwen3moe-tiny-mxfp4.gguf"), &g), 0);
	struct footprint f;
	assert_int_equal(footprint_measure(g, &f), 0);
	gguf_destroy(&g);
	struct footprint_kv_hosts *k = malloc(sizeof(*k));
	assert_non_null(k);
	const int V = 4, P = 64, n_ctx = 1000;
	struct footprint_plan plan = {.node_memory = 1ull << 40,
				      .n_ctx = n_ctx,
				      .n_batch = 100,
				      .kv_shards = V,
				      .kv_page = P};
	/* 2 nodes: 2 hosts of 2 chains each */
	assert_int_equal(footprint_plan_kv_hosts(&f, &plan, 2, k), 0);
	const uint64_t pb = f.kv_bytes_per_1k * (uint64_t)P / 1024;
	assert_int_equal(k->n_pages, (n_ctx - 1) / P);
	assert_true(k->page_bytes == pb && pb > 0);
	assert_int_equal(k->n_hosts, 2);
	for (int h = 0; h < 2; h++) {
		uint64_t pages = 0;
		for (int i = 0; i < (n_ctx - 1) / P; i++)
			pages += i % V / 2 == h;
		assert_true(k->host_kv[h] == pages * pb);
	}
	assert_true(k->host_kv[0] == 8 * pb && k->host_kv[1] == 7 * pb);
	assert_true(k->coord_kv == f.kv_bytes_per_1k * (uint64_t)(P + 100) / 1024);
	assert_true(k->worker_bytes[0] + k->worker_bytes[1] == f.expert_bytes);

	/* the fewest nodes: each holds a quarter of the experts (plus one expert)
	 * and 4 pages; 3 nodes make 2 hosts of 8 and 7 pages, which do not fit */
	const uint64_t one = f.layer_expert_bytes[1] / (uint64_t)f.n_expert;
	const uint64_t per = f.expert_bytes / 4 + 4 * pb + one;
	assert_true(8 * pb > per);
	plan.node_memory = FOOTPRINT_ROOM + per;
	assert_int_equal(footprint_plan_kv_hosts(&f, &plan, 0, k), 0);
	assert_int_equal(k->n_worker, 4);
	assert_int_equal(k->n_hosts, 4);
	uint64_t placed = 0;
	for (int w = 0; w < 4; w++) {
		assert_true(k->host_kv[w] == (w < 3 ? 4 : 3) * pb);
		assert_true(k->worker_bytes[w] + k->host_kv[w] <= per);
		placed += k->worker_bytes[w];
	}
	assert_true(placed == f.expert_bytes);
	assert_int_equal(footprint_plan_kv_hosts(&f, &plan, 3, k), ERR_RANGE);

	/* a host's 4 pages in nodes of 2: no number of nodes helps */
	plan.node_memory = FOOTPRINT_ROOM + 2 * pb;
	assert_int_equal(footprint_plan_kv_hosts(&f, &plan, 0, k), ERR_RANGE);
	/* deepseek4 keeps no attention pages on hosts; V must be a power of two */
	plan.node_memory = 1ull << 40;
	plan.kv_shards = 3;
	assert_int_equal(footprint_plan_kv_hosts(&f, &plan, 0, k), ERR_CONFIG);
	assert_int_equal(gguf_open(data_path("ds4-tiny-mxfp4.gguf"), &g), 0);
	assert_int_equal(footprint_measure(g, &f), 0);
	gguf_destroy(&g);
	plan.kv_shards = 4;
	assert_int_equal(footprint_plan_kv_hosts(&f, &plan, 0, k), ERR_CONFIG);
	free(k);
}

static void test_coordinator_untouched(void **state)
{
	(void)state;
	check_untouched("ds2-tiny-q4_0.gguf");
	check_untouched("qwen3moe-tiny-mxfp4.gguf");
	check_untouched("gptoss-tiny-mxfp4.gguf");
	check_untouched("ds4-tiny-mxfp4.gguf");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_measure),	  cmocka_unit_test(test_deepseek2_layouts),
	    cmocka_unit_test(test_deepseek4_kv),  cmocka_unit_test(test_gptoss_kv),
	    cmocka_unit_test(test_kv_hosts_plan), cmocka_unit_test(test_coordinator_untouched),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
