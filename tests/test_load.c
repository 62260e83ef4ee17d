/* Loading: what the user is told while experts are read, and which bytes a
 * worker reads.
 *
 * - progress lines: one per tenth when stderr is not a terminal, redrawn at
 *   most every 0.2 s on one, none for small loads;
 * - a worker with its own copy of the model reads its assigned experts' bytes
 *   and nothing else: two forked workers run the real worker loop on a model
 *   whose tensor pages are all made unreadable; every page a worker reads is
 *   recorded (and made readable) by a SIGSEGV handler.  After a prefill and a
 *   decode step through the cluster, the pages each worker read must lie in
 *   routed-expert slices only, the two workers' experts must not overlap, and
 *   together they must have read every expert (the start-up read-in). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/gguf.h"
#include "../common/log.h"
#include "../common/progress.h"
#include "../common/transport.h"
#include "../coordinator/cluster/cluster.h"
#include "../coordinator/model/model.h"
#include "../worker/worker.h"
#include "compare.h"

#define MODEL	  "qwen3moe-tiny-f32" /* expert slices of 32 KiB: 7+ whole pages each */
#define MAX_PAGES (1 << 16)

/* ------------------------------------------------------------ progress */

static void test_progress_not_a_terminal(void **state)
{
	(void)state;
	const uint64_t total = 10ull << 30;
	struct progress p;
	char line[256];
	progress_start(&p, "reading", total, 0, 0.0);
	int shown = 0;
	for (int i = 1; i <= 1000; i++) {
		if (progress_step(&p, total / 1000 * (uint64_t)i + (i == 1000 ? total % 1000 : 0),
				  i * 0.01, line, sizeof(line))) {
			shown++;
			char want[16];
			snprintf(want, sizeof(want), "%3d%%", shown * 10);
			assert_non_null(strstr(line, want));
		}
	}
	assert_int_equal(shown, 10);
	/* 10 GiB in 10 s */
	assert_non_null(strstr(line, "10.00 of 10.00 GiB, 1.00 GiB/s, 10.0 s"));
	assert_int_equal(progress_step(&p, total, 11.0, line, sizeof(line)), 0);

	/* half way after 5 s at 1 GiB/s: 5 s left */
	progress_start(&p, "reading", total, 0, 0.0);
	assert_int_equal(progress_step(&p, total / 2, 5.0, line, sizeof(line)), 1);
	assert_non_null(strstr(line, " 50% (5.00 of 10.00 GiB, 1.00 GiB/s, 5 s left)"));
	/* small loads are quiet */
	progress_start(&p, "reading", 1 << 20, 0, 0.0);
	assert_int_equal(progress_step(&p, 1 << 20, 1.0, line, sizeof(line)), 0);
}

static void test_progress_terminal(void **state)
{
	(void)state;
	const uint64_t total = 1ull << 30;
	struct progress p;
	char line[256];
	progress_start(&p, "reading", total, 1, 0.0);
	int shown = 0;
	double last = -1.0;
	for (int i = 1; i <= 100; i++) { /* 100 updates over 5 s */
		double now = i * 0.05;
		if (progress_step(&p, total / 100 * (uint64_t)i, now, line, sizeof(line))) {
			/* the first at once, then at most one per 0.2 s */
			assert_true(last < 0 || now - last > 0.199);
			last = now;
			shown++;
		}
	}
	assert_in_range(shown, 20, 26);
	assert_int_equal(progress_step(&p, total, 5.01, line, sizeof(line)), 1);
	assert_non_null(strstr(line, "100%"));
}

/* ------------------------------------------------------------ worker pages */

static const gguf *child_model;
static uintptr_t page_size;
static uintptr_t read_pages[MAX_PAGES];
static volatile sig_atomic_t n_read, n_overflow;

static void on_segv(int sig, siginfo_t *si, void *ctx)
{
	(void)sig;
	(void)ctx;
	uintptr_t pg = (uintptr_t)si->si_addr & ~(page_size - 1);
	if (mprotect((void *)pg, page_size, PROT_READ) != 0)
		_exit(9); /* not one of ours: a real crash */
	if (n_read < MAX_PAGES)
		read_pages[n_read++] = pg;
	else
		n_overflow = 1;
}

/* The whole pages of [p, p + n). */
static int inner_pages(const void *p, uint64_t n, uintptr_t *lo, uintptr_t *hi)
{
	*lo = ((uintptr_t)p + page_size - 1) & ~(page_size - 1);
	*hi = ((uintptr_t)p + (uintptr_t)n) & ~(page_size - 1);
	return *hi > *lo;
}

/* Writes to `path` one line "L E" per expert whose slice holds a page the
 * worker read (pages on a slice boundary count for neither), and "other N"
 * for the pages read outside routed-expert tensors. */
static void child_write_report(const char *path)
{
	FILE *f = fopen(path, "w");
	if (!f)
		_exit(4);
	long other = 0;
	for (sig_atomic_t i = 0; i < n_read; i++) {
		uintptr_t a = read_pages[i], b = a + page_size;
		int found = 0;
		for (uint64_t k = 0; k < gguf_n_tensors(child_model) && !found; k++) {
			const gguf_tensor *t = gguf_tensor_at(child_model, k);
			uintptr_t d = (uintptr_t)t->data, e = d + (uintptr_t)t->n_bytes;
			if (b <= d || a >= e)
				continue;
			found = 1;
			int layer;
			if (!strstr(t->name, "_exps.") || sscanf(t->name, "blk.%d.", &layer) != 1) {
				other++;
				continue;
			}
			uint64_t slice = t->n_bytes / (uint64_t)t->ne[2];
			uint64_t e0 = (a - d) / slice, e1 = (b - 1 - d) / slice;
			if (a >= d && b <= e && e0 == e1)
				fprintf(f, "%d %llu\n", layer, (unsigned long long)e0);
		}
	}
	fprintf(f, "other %ld\noverflow %d\n", other, (int)n_overflow);
	fclose(f);
}

static void child_run(const char *endpoint, const char *report, const char *name)
{
	gguf *g = NULL;
	transport *t = NULL;
	if (gguf_open(test_data_path(MODEL ".gguf"), &g) || transport_zmq_connect(endpoint, &t))
		_exit(3);
	child_model = g;
	page_size = (uintptr_t)sysconf(_SC_PAGE_SIZE);
	for (uint64_t k = 0; k < gguf_n_tensors(g); k++) {
		const gguf_tensor *x = gguf_tensor_at(g, k);
		uintptr_t lo, hi;
		if (inner_pages(x->data, x->n_bytes, &lo, &hi) &&
		    mprotect((void *)lo, hi - lo, PROT_NONE) != 0)
			_exit(5);
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_segv;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, NULL);
	struct worker_config cfg = {.model = g, .n_threads = 2, .name = name};
	int rc = worker_run(t, &cfg);
	transport_destroy(&t);
	child_write_report(report);
	_exit(rc ? 1 : 0);
}

struct pair_set {
	int n;
	int l[4096], e[4096];
	long other;
	int overflow;
};

static void read_report(const char *path, struct pair_set *s)
{
	FILE *f = fopen(path, "r");
	assert_non_null(f);
	memset(s, 0, sizeof(*s));
	char line[128];
	while (fgets(line, sizeof(line), f)) {
		int l, e;
		if (sscanf(line, "other %ld", &s->other) == 1 ||
		    sscanf(line, "overflow %d", &s->overflow) == 1)
			continue;
		if (sscanf(line, "%d %d", &l, &e) != 2)
			continue;
		int dup = 0;
		for (int i = 0; i < s->n && !dup; i++)
			dup = s->l[i] == l && s->e[i] == e;
		if (!dup && s->n < 4096) {
			s->l[s->n] = l;
			s->e[s->n++] = e;
		}
	}
	fclose(f);
}

static int set_has(const struct pair_set *s, int l, int e)
{
	for (int i = 0; i < s->n; i++)
		if (s->l[i] == l && s->e[i] == e)
			return 1;
	return 0;
}

static void test_worker_reads_only_its_experts(void **state)
{
	(void)state;
	char endpoint[128], report[2][128];
	snprintf(endpoint, sizeof(endpoint), "ipc:///tmp/moefleet-load-%d.sock", (int)getpid());
	pid_t pids[2];
	for (int i = 0; i < 2; i++) {
		snprintf(report[i], sizeof(report[i]), "/tmp/moefleet-load-%d-w%d.txt",
			 (int)getpid(), i);
		pids[i] = fork();
		assert_true(pids[i] >= 0);
		if (pids[i] == 0)
			child_run(endpoint, report[i], i ? "w1" : "w0");
	}
	struct model_params mp;
	model_params_default(&mp);
	mp.n_threads = 1;
	mp.n_ctx = 16;
	model *m = NULL;
	assert_int_equal(model_open(test_data_path(MODEL ".gguf"), &mp, &m), 0);
	transport *t = NULL;
	assert_int_equal(transport_zmq_listen(endpoint, &t), 0);
	struct cluster_config cfg = {.g = model_get_gguf(m),
				     .spec = &model_get_info(m)->moe,
				     .n_workers = 2,
				     .replicas = 1,
				     .timeout_ms = 5000,
				     .join_timeout_ms = 20000};
	cluster *c = NULL;
	assert_int_equal(cluster_new(t, &cfg, model_get_pool(m), &c), 0);
	expert_backend *b = NULL;
	assert_int_equal(cluster_backend(c, &b), 0);
	model_set_experts(m, b);
	const struct moe_spec *spec = &model_get_info(m)->moe;
	int n_pairs = 0;
	for (int l = 0; l < spec->n_layer; l++)
		n_pairs += spec->layer_moe[l] ? spec->n_expert : 0;

	int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8}, pos[8], seq[8] = {0};
	for (int i = 0; i < 8; i++)
		pos[i] = i;
	float *logits = malloc(8 * (size_t)model_get_info(m)->n_vocab * sizeof(float));
	assert_non_null(logits);
	model_batch pb = {7, tok, pos, seq, NULL};
	assert_int_equal(model_forward(m, &pb, logits), 0);
	model_batch db = {1, tok + 7, pos + 7, seq, NULL};
	assert_int_equal(model_forward(m, &db, logits), 0);
	free(logits);
	model_destroy(&m); /* shuts the workers down */
	struct pair_set got[2];
	for (int i = 0; i < 2; i++) {
		int st = -1;
		assert_int_equal(waitpid(pids[i], &st, 0), pids[i]);
		assert_true(WIFEXITED(st));
		assert_int_equal(WEXITSTATUS(st), 0);
		read_report(report[i], &got[i]);
		unlink(report[i]);
		print_message("# worker %d read %d experts' pages, %ld other pages\n", i, got[i].n,
			      got[i].other);
		assert_int_equal(got[i].overflow, 0);
		assert_int_equal(got[i].other, 0); /* no embedding, attention, router... */
		assert_true(got[i].n > 0);
	}
	/* one replica: an expert read by both workers was read by one that does
	 * not hold it */
	for (int i = 0; i < got[0].n; i++)
		assert_false(set_has(&got[1], got[0].l[i], got[0].e[i]));
	/* every expert was read in by its holder at start-up */
	assert_int_equal(got[0].n + got[1].n, n_pairs);
}

int main(void)
{
	log_set_quiet(1);
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_progress_not_a_terminal),
	    cmocka_unit_test(test_progress_terminal),
	    cmocka_unit_test(test_worker_reads_only_its_experts),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
