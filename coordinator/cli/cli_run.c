/* cli run: the subcommands that run a model -- `moefleet logits` (every
 * position's logits to a file), `bench` (prompt processing and generation
 * speed) and `generate` (text from a prompt, streamed). */
#define _GNU_SOURCE
#include "cli_impl.h"
#include "../serve/sampler.h"
#include "../../common/tokenizer.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"
#include "../model/ops.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <signal.h>

static const char *cli_usage_logits =
    "usage: moefleet logits -m MODEL.gguf --tokens IDS --out FILE.f32 [--n-prompt P]\n"
    "                       [--batch N] [--threads T]\n"
    "  IDS: comma-separated token ids, or @path to a file of ids separated by commas\n"
    "  or white space.  Writes float32 little-endian logits, one row of n_vocab per\n"
    "  input position.  Positions before P (default: all) are one batch, computed in\n"
    "  steps of N tokens (default 512); each later position is a single-token decode\n"
    "  reusing the KV cache.\n";

/* Writes all of buf to a temporary file next to path and renames it into
 * place, so that a failure leaves no partial output. */
static int cli_open_out(const char *path, char **tmp_out, int *fd_out)
{
	size_t n = strlen(path) + 32;
	char *tmp = malloc(n);
	if (!tmp)
		return ERR_NOMEM;
	snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		log_error("%s: cannot write: %s", path, strerror(errno));
		free(tmp);
		return ERR_IO;
	}
	*tmp_out = tmp;
	*fd_out = fd;
	return 0;
}

static int cli_write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return ERR_IO;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int cli_logits(int argc, char **argv)
{
	struct cli_opts o = {.n_prompt = -1};
	int rc = CLI_FAIL;
	if (cli_parse(
		argc, argv,
		"-m --model --tokens --out -o --n-prompt --batch --threads -t" CLI_CLUSTER_OPTS,
		&o) ||
	    (!o.help && (!o.model || !o.tokens || !o.out))) {
		fputs(cli_usage_logits, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_logits, stdout);
		fputs(cli_model_usage(), stdout);
		return CLI_OK;
	}
	int32_t *ids = NULL;
	int n = 0;
	model *m = NULL;
	struct cli_cluster cc = {0};
	float *logits = NULL;
	char *tmp = NULL;
	int fd = -1;
	if (cli_read_ids(o.tokens, &ids, &n))
		goto out;
	if (o.n_prompt < 0)
		o.n_prompt = n;
	if (o.n_prompt > n) {
		log_error("--n-prompt %ld is larger than the number of tokens (%d)", o.n_prompt, n);
		goto out;
	}
	struct model_params mp;
	model_params_default(&mp);
	cli_model_params(&o, &mp);
	mp.n_ctx = n;
	if (model_open(o.model, &mp, &m) || cli_cluster_setup(&o, m, &cc) ||
	    cli_trace_setup(&o, m, &cc))
		goto out;
	const struct model_info *info = model_get_info(m);
	for (int i = 0; i < n; i++) {
		if (ids[i] >= info->n_vocab) {
			log_error("token id %d at position %d is out of range (vocabulary %d)",
				  ids[i], i, info->n_vocab);
			goto out;
		}
	}
	logits = malloc((size_t)(unsigned)n * (size_t)info->n_vocab * sizeof(float));
	int32_t *pos = malloc((size_t)(unsigned)n * sizeof(int32_t));
	int32_t *seq = calloc((size_t)(unsigned)n, sizeof(int32_t));
	if (!logits || !pos || !seq) {
		free(pos);
		free(seq);
		log_error("out of memory for %d rows of logits", n);
		goto out;
	}
	for (int i = 0; i < n; i++)
		pos[i] = i;
	if (cli_open_out(o.out, &tmp, &fd)) {
		free(pos);
		free(seq);
		goto out;
	}
	int frc = 0;
	if (o.n_prompt > 0) {
		model_batch b = {(int)o.n_prompt, ids, pos, seq, NULL};
		frc = model_forward(m, &b, logits);
	}
	for (int i = (int)o.n_prompt; i < n && !frc; i++) {
		model_batch b = {1, ids + i, pos + i, seq + i, NULL};
		frc = model_forward(m, &b, logits + (size_t)i * (size_t)info->n_vocab);
	}
	free(pos);
	free(seq);
	if (frc)
		goto out;
	if (cli_write_all(fd, logits, (size_t)n * (size_t)info->n_vocab * sizeof(float)) ||
	    close(fd) != 0) {
		fd = -1;
		log_error("%s: write failed: %s", o.out, strerror(errno));
		goto out;
	}
	fd = -1;
	if (rename(tmp, o.out) != 0) {
		log_error("%s: cannot write: %s", o.out, strerror(errno));
		goto out;
	}
	free(tmp);
	tmp = NULL;
	rc = CLI_OK;
out:
	if (fd >= 0)
		close(fd);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	free(logits);
	free(ids);
	cli_cluster_stats(&o, &cc);
	cli_route_stats(&o, m);
	model_destroy(&m);
	cli_cluster_finish(&cc);
	return rc;
}

static const char *cli_usage_bench =
    "usage: moefleet bench -m MODEL.gguf [--pp 512] [--tg 128] [--depth 0] [--reps 5]\n"
    "                      [--random-kv] [--threads T]\n"
    "  pp: one batch of N tokens into an empty context; tg: N single-token decodes,\n"
    "  each producing logits, after an untimed prompt of --depth tokens (in steps\n"
    "  of 512).  Prints medians; the last line is\n"
    "  'bench: ppN X tok/s, tgM Y tok/s'.\n"
    "  --random-kv  benchmark only: instead of running the --depth prompt, fill the\n"
    "              KV cache to that depth with deterministic pseudo-random keys and\n"
    "              values (with KV hosts, their pages are shipped to the hosts as the\n"
    "              prompt's would be): decoding then costs what it costs after a real\n"
    "              prompt of that length, without running that prompt; the tokens\n"
    "              it produces mean nothing.\n"
    "  --roofline  also print the weight bytes one decoded token reads (attention\n"
    "              and dense, shared experts, the routed experts chosen, head), the\n"
    "              measured read bandwidth of the threads, and the fraction of that\n"
    "              bound the tg speed reaches.\n";

static int cli_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double cli_median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cli_cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int cli_bench(int argc, char **argv)
{
	struct cli_opts o = {.pp = 512, .tg = 128, .reps = 5};
	if (cli_parse(argc, argv,
		      "-m --model --pp --tg --depth --reps --threads -t --roofline "
		      "--random-kv" CLI_CLUSTER_OPTS,
		      &o) ||
	    (!o.help && !o.model)) {
		fputs(cli_usage_bench, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_bench, stdout);
		fputs(cli_model_usage(), stdout);
		return CLI_OK;
	}
	if (o.random_kv && (o.depth <= 0 || o.tg <= 0)) {
		fputs("moefleet: bench --random-kv needs --depth D > 0 and --tg N > 0\n", stderr);
		return CLI_USAGE;
	}
	int rc = CLI_FAIL;
	model *m = NULL;
	struct cli_cluster cc = {0};
	struct model_params mp;
	model_params_default(&mp);
	cli_model_params(&o, &mp);
	mp.n_ctx = (int)(o.pp > o.depth + o.tg + 1 ? o.pp : o.depth + o.tg + 1);
	mp.n_batch = o.pp > 0 ? (int)o.pp : 512;
	int n = mp.n_ctx;
	int32_t *ids = malloc((size_t)n * sizeof(int32_t));
	int32_t *pos = malloc((size_t)n * sizeof(int32_t));
	int32_t *seq = calloc((size_t)n, sizeof(int32_t));
	uint8_t *want = calloc((size_t)n, 1);
	double *pp_t = calloc((size_t)o.reps, sizeof(double));
	double *tg_t = calloc((size_t)o.reps, sizeof(double));
	float *logits = NULL;
	if (!ids || !pos || !seq || !want || !pp_t || !tg_t)
		goto out;
	if (model_open(o.model, &mp, &m) || cli_cluster_setup(&o, m, &cc) ||
	    cli_trace_setup(&o, m, &cc))
		goto out;
	const struct model_info *info = model_get_info(m);
	logits = malloc((size_t)info->n_vocab * sizeof(float));
	if (!logits)
		goto out;
	uint64_t st = 12345;
	for (int i = 0; i < n; i++) {
		st = st * 6364136223846793005ULL + 1442695040888963407ULL;
		ids[i] = (int32_t)((st >> 33) % (uint64_t)info->n_vocab);
		pos[i] = i;
	}
	printf("model: %s (%s), threads %d, kernels %s\n", o.model, info->arch,
	       pool_size(model_get_pool(m)), kern_isa_name());
	/* warm-up, untimed (as llama.cpp's benchmarks): pages the weights in */
	{
		const int nw = n < 64 ? n : 64;
		want[nw - 1] = 1;
		model_batch b = {nw, ids, pos, seq, want};
		if (model_forward(m, &b, logits))
			goto out;
		want[nw - 1] = 0;
	}
	printf("%-8s %6s %12s %12s\n", "test", "rep", "seconds", "tok/s");
	for (int r = 0; r < o.reps; r++) {
		if (o.pp > 0) {
			model_reset_seq(m, 0);
			want[o.pp - 1] = 1;
			model_batch b = {(int)o.pp, ids, pos, seq, want};
			double t0 = cli_now();
			if (model_forward(m, &b, logits))
				goto out;
			pp_t[r] = cli_now() - t0;
			printf("pp%-6ld %6d %12.4f %12.2f\n", o.pp, r, pp_t[r],
			       (double)o.pp / pp_t[r]);
		}
		if (o.tg > 0) {
			model_reset_seq(m, 0);
			model_batch d = {(int)o.depth, ids, pos, seq, want};
			if (o.random_kv ? model_fill_random(m, 0, (int)o.depth, 12345)
					: o.depth > 0 && model_forward(m, &d, logits))
				goto out;
			double t0 = cli_now();
			for (int i = (int)o.depth; i < o.depth + o.tg; i++) {
				model_batch b = {1, ids + i, pos + i, seq, NULL};
				if (model_forward(m, &b, logits))
					goto out;
			}
			tg_t[r] = cli_now() - t0;
			printf("tg%-6ld %6d %12.4f %12.2f\n", o.tg, r, tg_t[r],
			       (double)o.tg / tg_t[r]);
		}
		fflush(stdout);
	}
	double pp = o.pp > 0 ? (double)o.pp / cli_median(pp_t, (int)o.reps) : 0.0;
	double tg = o.tg > 0 ? (double)o.tg / cli_median(tg_t, (int)o.reps) : 0.0;
	if (o.roofline) {
		struct ops_decode_bytes db;
		ops_decode_bytes(model_get_gguf(m), info->moe.n_expert_used, &db);
		double bw = ops_read_bandwidth(model_get_pool(m), (size_t)512 << 20);
		double bound = bw > 0 ? bw / (double)db.total : 0.0;
		printf("roofline: %.1f MB of weights per decoded token (dense/attention %.1f, "
		       "shared experts %.1f, routed %.1f, head %.1f)\n",
		       (double)db.total / 1e6, (double)db.dense / 1e6, (double)db.shared / 1e6,
		       (double)db.routed / 1e6, (double)db.head / 1e6);
		printf("roofline: read bandwidth %.2f GB/s (%d threads) -> bound %.1f tok/s; "
		       "tg %.2f tok/s = %.2f of the bound (%.2f GB/s of weights)\n",
		       bw / 1e9, pool_size(model_get_pool(m)), bound, tg,
		       bound > 0 ? tg / bound : 0.0, tg * (double)db.total / 1e9);
	}
	printf("bench: pp%ld %.2f tok/s, tg%ld %.2f tok/s\n", o.pp, pp, o.tg, tg);
	rc = CLI_OK;
out:
	free(ids);
	free(pos);
	free(seq);
	free(want);
	free(pp_t);
	free(tg_t);
	free(logits);
	cli_cluster_stats(&o, &cc);
	cli_route_stats(&o, m);
	model_destroy(&m);
	cli_cluster_finish(&cc);
	return rc;
}

static const char *cli_usage_generate =
    "usage: moefleet generate -m MODEL.gguf (--tokens IDS | -p TEXT) -n N [--temp T]\n"
    "                         [--top-k K] [--top-p P] [--seed S] [--print-ids] [--ignore-eos] "
    "[--threads T]\n"
    "  Greedy at temperature 0 (the default).  Streams text as it is generated;\n"
    "  --print-ids also prints the generated ids as one comma-separated line;\n"
    "  --ignore-eos goes on past end-of-generation tokens until N tokens.\n";

/* SIGTERM / SIGINT while generating: stop after the current token, so that
 * the cluster shuts down cleanly (every worker is sent Shutdown). */
static volatile sig_atomic_t cli_stop;

static void cli_on_stop(int sig)
{
	cli_stop = sig;
}

static int cli_emit(tokenizer_stream *ts, int32_t id, char *buf, size_t cap)
{
	size_t n = 0;
	if (tokenizer_stream_push(ts, id, buf, cap, &n))
		return ERR_RANGE;
	fwrite(buf, 1, n, stdout);
	fflush(stdout);
	return 0;
}

/* The prompt ids[0..n) of sequence 0 in one step, from position 0; logits: the
 * last position's. */
static int cli_prompt(model *m, const int32_t *ids, int n, float *logits)
{
	int rc = ERR_NOMEM;
	int32_t *pos = malloc((size_t)n * sizeof(int32_t));
	int32_t *seq = calloc((size_t)n, sizeof(int32_t));
	uint8_t *want = calloc((size_t)n, 1);
	if (pos && seq && want) {
		for (int i = 0; i < n; i++)
			pos[i] = i;
		want[n - 1] = 1;
		model_batch b = {n, ids, pos, seq, want};
		rc = model_forward(m, &b, logits);
	}
	free(pos);
	free(seq);
	free(want);
	return rc;
}

/* A KV host was lost in the middle of the sequence: the pages it held are
 * gone.  The chains go to the hosts left and the sequence is computed again
 * from its ids in the steps it had (the prompt in one, then one generated
 * token per step), which gives the same bits; logits: the last step's.  0, or
 * an error (also when the failure was not a lost KV host). */
static int cli_kv_recover(const struct cli_opts *o, model *m, const struct cli_cluster *cc,
			  const int32_t *ids, int n, const int32_t *gen, int n_gen, float *logits)
{
	int n_hosts = 0;
	int rc = cli_kv_rehost(o, m, cc->c, 0, &n_hosts);
	if (rc)
		return rc;
	log_warn("a KV host was lost: the %d tokens of the sequence are computed again on %d "
		 "host(s)",
		 n + n_gen, n_hosts);
	model_reset_seq(m, 0);
	rc = cli_prompt(m, ids, n, logits);
	for (int j = 0; j < n_gen && !rc; j++) {
		int32_t p = n + j, s0 = 0;
		model_batch d = {1, &gen[j], &p, &s0, NULL};
		rc = model_forward(m, &d, logits);
	}
	return rc;
}

int cli_generate(int argc, char **argv)
{
	struct cli_opts o = {.n_predict = -1, .top_p = 1.0};
	if (cli_parse(
		argc, argv,
		"-m --model --tokens -p --prompt -n --n-predict --temp --top-k --top-p --seed "
		"--print-ids --ignore-eos --threads -t" CLI_CLUSTER_OPTS,
		&o) ||
	    (!o.help && (!o.model || (!o.tokens == !o.prompt) || o.n_predict < 0))) {
		fputs(cli_usage_generate, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_generate, stdout);
		fputs(cli_model_usage(), stdout);
		return CLI_OK;
	}
	int rc = CLI_FAIL;
	model *m = NULL;
	struct cli_cluster cc = {0};
	tokenizer *tok = NULL;
	tokenizer_stream *ts = NULL;
	sampler *smp = NULL;
	int32_t *ids = NULL, *out_ids = NULL;
	float *logits = NULL;
	char *piece = NULL;
	int n = 0;
	struct model_params mp;
	model_params_default(&mp);
	cli_model_params(&o, &mp);
	/* the model's file is opened first so that a bad file is reported as such */
	if (o.tokens && cli_read_ids(o.tokens, &ids, &n))
		goto out;
	mp.n_ctx = 1; /* set below, once the prompt length is known */
	gguf *g = NULL;
	if (gguf_open(o.model, &g))
		goto out;
	int trc = tokenizer_new(g, &tok);
	gguf_destroy(&g);
	if (trc)
		goto out;
	if (o.prompt) {
		size_t len = strlen(o.prompt), need = 0;
		size_t cap = len + 2;
		ids = malloc(cap * sizeof(int32_t));
		if (!ids)
			goto out;
		size_t off = 0;
		if (tokenizer_add_bos(tok) && tokenizer_bos(tok) >= 0)
			ids[off++] = tokenizer_bos(tok);
		if (tokenizer_encode(tok, o.prompt, len, 1, ids + off, cap - off, &need)) {
			log_error("cannot tokenize the prompt");
			goto out;
		}
		n = (int)(off + need);
		if (n == 0) {
			log_error("the prompt is empty");
			goto out;
		}
	}
	mp.n_ctx = n + (int)o.n_predict;
	if (model_open(o.model, &mp, &m) || cli_cluster_setup(&o, m, &cc) ||
	    cli_trace_setup(&o, m, &cc))
		goto out;
	const struct model_info *info = model_get_info(m);
	for (int i = 0; i < n; i++) {
		if (ids[i] >= info->n_vocab) {
			log_error("token id %d at position %d is out of range (vocabulary %d)",
				  ids[i], i, info->n_vocab);
			goto out;
		}
	}
	struct sampler_params sp = {(float)o.temp, (int)o.top_k, (float)o.top_p, o.seed};
	if (sampler_new(&sp, info->n_vocab, &smp) || tokenizer_stream_new(tok, 0, &ts))
		goto out;
	size_t pcap = tokenizer_stream_bound(ts);
	piece = malloc(pcap);
	logits = malloc((size_t)info->n_vocab * sizeof(float));
	out_ids = malloc(((size_t)o.n_predict + 1) * sizeof(int32_t));
	if (!piece || !logits || !out_ids)
		goto out;
	if (cli_prompt(m, ids, n, logits) && cli_kv_recover(&o, m, &cc, ids, n, out_ids, 0, logits))
		goto out;
	if (o.prompt)
		fputs(o.prompt, stdout);
	int n_out = 0;
	double t0 = cli_now();
	signal(SIGTERM, cli_on_stop);
	signal(SIGINT, cli_on_stop);
	for (int i = 0; i < o.n_predict; i++) {
		if (cli_stop) {
			log_error("stopped by signal %d after %d tokens; shutting down",
				  (int)cli_stop, n_out);
			goto out;
		}
		int32_t next = sampler_sample(smp, logits);
		out_ids[n_out++] = next;
		if (cli_emit(ts, next, piece, pcap))
			goto out;
		if ((tokenizer_is_eog(tok, next) && !o.ignore_eos) || i + 1 == o.n_predict)
			break;
		int32_t p = n + i, s0 = 0;
		model_batch d = {1, &next, &p, &s0, NULL};
		if (model_forward(m, &d, logits) &&
		    cli_kv_recover(&o, m, &cc, ids, n, out_ids, n_out, logits))
			goto out;
	}
	size_t fl = 0;
	if (tokenizer_stream_flush(ts, piece, pcap, &fl) == 0)
		fwrite(piece, 1, fl, stdout);
	fputc('\n', stdout);
	if (o.print_ids) {
		for (int i = 0; i < n_out; i++)
			printf("%s%d", i ? "," : "", out_ids[i]);
		fputc('\n', stdout);
	}
	fflush(stdout); /* the text before the log line that follows it */
	double dt = cli_now() - t0;
	log_info("generated %d tokens in %.2f s (%.1f tok/s)", n_out, dt,
		 dt > 0 ? (double)n_out / dt : 0.0);
	rc = CLI_OK;
out:
	free(ids);
	free(out_ids);
	free(logits);
	free(piece);
	sampler_destroy(&smp);
	tokenizer_stream_destroy(&ts);
	tokenizer_destroy(&tok);
	cli_cluster_stats(&o, &cc);
	cli_route_stats(&o, m);
	model_destroy(&m);
	cli_cluster_finish(&cc);
	return rc;
}
