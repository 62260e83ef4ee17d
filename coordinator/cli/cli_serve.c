/* `moefleet serve` and `moefleet tokenize`. */
#define _GNU_SOURCE
#include "cli_impl.h"
#include "../serve/serve.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../../common/err.h"
#include "../../common/gguf.h"
#include "../../common/log.h"
#include "../../common/tokenizer.h"

static const char *cli_usage_serve =
    "usage: moefleet serve -m MODEL.gguf [--host H] [--port P] [--api-key KEY |\n"
    "                      --api-key-file F] [--max-batch N] [--ctx-size C]\n"
    "                      [--parallel N] [--queue N] [--model-name NAME]\n"
    "                      [--max-body BYTES] [--max-conns N] [--threads T]\n"
    "                      [cluster options]\n"
    "  OpenAI-compatible HTTP server: POST /v1/chat/completions, /v1/completions\n"
    "  (streaming with \"stream\": true), GET /v1/models, /health, /metrics.\n"
    "  --host H           address to listen on (default 127.0.0.1; 0.0.0.0: all)\n"
    "  --port P           TCP port (default 8080; 0: any free port, printed)\n"
    "  --api-key KEY      require 'Authorization: Bearer KEY' (also $MOEFLEET_API_KEY)\n"
    "  --api-key-file F   read the key from the first line of F\n"
    "  --parallel N       sequence slots: requests generating at once (default 4)\n"
    "  --ctx-size C       positions per slot: prompt + output (default 4096)\n"
    "  --max-batch N      tokens per forward step (default 512); prompts are\n"
    "                     prefilled in chunks of N - parallel tokens\n"
    "  --queue N          requests that may wait for a slot before 503 (default 64)\n"
    "  --model-name NAME  the model id clients send (default: the file name without\n"
    "                     .gguf, or a split model's without -00001-of-0000K.gguf)\n"
    "  --max-body BYTES   largest request body (default 4194304)\n"
    "  --max-conns N      simultaneous connections (default 256)\n";

static int cli_read_key_file(const char *path, char **out)
{
	*out = NULL;
	FILE *f = fopen(path, "r");
	if (!f) {
		log_error("%s: cannot open: %s", path, strerror(errno));
		return ERR_IO;
	}
	struct stat st;
	if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
		log_warn("%s: the API key file is readable by other users (chmod 600)", path);
	char line[1024];
	int rc = 0;
	if (!fgets(line, sizeof(line), f)) {
		log_error("%s: empty API key file", path);
		rc = ERR_CONFIG;
	} else {
		size_t n = strcspn(line, "\r\n");
		while (n > 0 && (line[n - 1] == ' ' || line[n - 1] == '\t'))
			n--;
		line[n] = 0;
		if (n == 0) {
			log_error("%s: empty API key", path);
			rc = ERR_CONFIG;
		} else if (!(*out = strdup(line))) {
			rc = ERR_NOMEM;
		}
	}
	fclose(f);
	return rc;
}

static int cli_serve_metrics(void *ctx, FILE *f)
{
	return cluster_metrics_write(f, ctx, 0);
}

/* The model and its cluster, for the server's kv_recover hook. */
struct cli_serve_kv {
	model *m;
	struct cli_model *cm;
};

static int cli_serve_kv_recover(void *ctx, char *why, size_t cap)
{
	struct cli_serve_kv *k = ctx;
	cluster *c = cli_model_cluster(k->cm);
	int w = -1, h = c ? cluster_kv_lost_host(c, &w) : -1;
	if (h >= 0)
		snprintf(why, cap, "KV host %d (worker %d) was lost", h, w);
	int n_hosts = 0;
	return cli_model_kv_rehost(k->cm, k->m, &n_hosts);
}

/* Options of the model itself (and the cluster) that take no value. */
static int cli_is_flag(const char *a)
{
	return !strcmp(a, "--stream-weights") || !strcmp(a, "--stats") || !strcmp(a, "--insecure");
}

/* Cuts a split model's "-NNNNN-of-NNNNN" (gguf-split's shard number) off
 * the end of name, so that its id is the model's, not its first file's. */
static void cli_strip_split_suffix(char *name)
{
	static const char pat[] = "-#####-of-#####";
	size_t n = strlen(name), k = sizeof(pat) - 1;
	if (n <= k)
		return;
	char *p = name + n - k;
	for (size_t i = 0; i < k; i++)
		if (pat[i] == '#' ? !isdigit((unsigned char)p[i]) : p[i] != pat[i])
			return;
	*p = 0;
}

int cli_serve(int argc, char **argv)
{
	const char *host = "127.0.0.1", *key = getenv("MOEFLEET_API_KEY"), *key_file = NULL;
	const char *name = NULL, *path = NULL;
	long port = 8080, max_batch = 512, ctx = 4096, parallel = 4, queue = 64, max_conns = 256;
	long max_body = 4L << 20;
	char **rest = calloc((size_t)argc + 1, sizeof(char *));
	int n_rest = 0;
	if (!rest)
		return CLI_FAIL;
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			fputs(cli_usage_serve, stdout);
			fputs(cli_model_usage(), stdout);
			free(rest);
			return CLI_OK;
		}
		int mine = !strcmp(a, "--host") || !strcmp(a, "--port") ||
			   !strcmp(a, "--api-key") || !strcmp(a, "--api-key-file") ||
			   !strcmp(a, "--max-batch") || !strcmp(a, "--ctx-size") ||
			   !strcmp(a, "--parallel") || !strcmp(a, "--queue") ||
			   !strcmp(a, "--model-name") || !strcmp(a, "--max-body") ||
			   !strcmp(a, "--max-conns");
		if (!mine) {
			rest[n_rest++] = argv[i];
			if (a[0] == '-' && !cli_is_flag(a) && i + 1 < argc) {
				if (!strcmp(a, "-m") || !strcmp(a, "--model"))
					path = argv[i + 1];
				rest[n_rest++] = argv[++i];
			}
			continue;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moefleet: %s needs a value\n", a);
			goto usage;
		}
		const char *v = argv[++i];
		int bad = 0;
		if (!strcmp(a, "--host"))
			host = v;
		else if (!strcmp(a, "--api-key"))
			key = v;
		else if (!strcmp(a, "--api-key-file"))
			key_file = v;
		else if (!strcmp(a, "--model-name"))
			name = v;
		else if (!strcmp(a, "--port"))
			bad = cli_parse_long(a, v, 0, 65535, &port);
		else if (!strcmp(a, "--max-batch"))
			bad = cli_parse_long(a, v, 2, 65536, &max_batch);
		else if (!strcmp(a, "--ctx-size"))
			bad = cli_parse_long(a, v, 2, 1L << 24, &ctx);
		else if (!strcmp(a, "--parallel"))
			bad = cli_parse_long(a, v, 1, 4096, &parallel);
		else if (!strcmp(a, "--queue"))
			bad = cli_parse_long(a, v, 0, 1L << 20, &queue);
		else if (!strcmp(a, "--max-body"))
			bad = cli_parse_long(a, v, 1024, 1L << 30, &max_body);
		else if (!strcmp(a, "--max-conns"))
			bad = cli_parse_long(a, v, 1, 65536, &max_conns);
		if (bad)
			goto usage;
	}
	if (!path) {
		fprintf(stderr, "moefleet: serve needs -m MODEL.gguf\n");
		goto usage;
	}
	if (parallel >= max_batch) {
		fprintf(stderr, "moefleet: --max-batch (%ld) must exceed --parallel (%ld)\n",
			max_batch, parallel);
		goto usage;
	}

	int rc = CLI_FAIL;
	char *key_buf = NULL, *name_buf = NULL;
	model *m = NULL;
	struct cli_model *cm = NULL;
	tokenizer *tok = NULL;
	serve *sv = NULL;
	if (key_file && cli_read_key_file(key_file, &key_buf))
		goto out;
	if (key_buf)
		key = key_buf;
	if (key && !*key)
		key = NULL;
	if (!name) {
		const char *base = strrchr(path, '/');
		name_buf = strdup(base ? base + 1 : path);
		if (!name_buf)
			goto out;
		size_t n = strlen(name_buf);
		if (n > 5 && !strcmp(name_buf + n - 5, ".gguf"))
			name_buf[n - 5] = 0;
		cli_strip_split_suffix(name_buf);
		name = name_buf;
	}
	gguf *g = NULL;
	if (gguf_open(path, &g))
		goto out;
	int trc = tokenizer_new(g, &tok);
	gguf_destroy(&g);
	if (trc)
		goto out;
	struct model_params mp;
	model_params_default(&mp);
	mp.n_ctx = (int)ctx;
	mp.n_seq = (int)parallel;
	mp.n_batch = (int)max_batch;
	if (cli_model_open(n_rest, rest, &mp, &m, &cm))
		goto out;
	cluster *c = cli_model_cluster(cm);
	struct cli_serve_kv kv = {m, cm};
	struct serve_config cfg = {
	    .host = host,
	    .port = (int)port,
	    .api_key = key,
	    .model_name = name,
	    .n_slots = (int)parallel,
	    .n_ctx = (int)ctx,
	    .max_batch = (int)max_batch,
	    .chunk = (int)(max_batch - parallel),
	    .queue_cap = (int)queue,
	    .max_body = (size_t)max_body,
	    .max_conns = (int)max_conns,
	    .metrics_hook = c ? cli_serve_metrics : NULL,
	    .metrics_ctx = c,
	    .kv_recover = c ? cli_serve_kv_recover : NULL,
	    .kv_ctx = &kv,
	};
	/* SIGINT / SIGTERM end the server; every thread started from here on
	 * inherits the blocked mask and this thread waits for them. */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (serve_new(m, tok, &cfg, &sv))
		goto out;
	printf("listening on http://%s:%d\n", host, serve_port(sv));
	fflush(stdout);
	int sig = 0;
	sigwait(&set, &sig);
	log_info("signal %d: shutting down", sig);
	rc = CLI_OK;
out:
	serve_destroy(&sv);
	cli_model_close(&m, &cm);
	tokenizer_destroy(&tok);
	free(key_buf);
	free(name_buf);
	free(rest);
	return rc;
usage:
	fputs(cli_usage_serve, stderr);
	free(rest);
	return CLI_USAGE;
}

/* ------------------------------------------------------------ tokenize */

static const char *cli_usage_tokenize =
    "usage: moefleet tokenize -m MODEL.gguf (-p TEXT | --file F) [--no-bos]\n"
    "                         [--no-parse-special] [--pieces | --lines]\n"
    "  Prints the token ids of TEXT, comma-separated on one line (the BOS id first\n"
    "  when the vocabulary adds one, unless --no-bos); --pieces prints one\n"
    "  'ID<TAB>PIECE' line per token instead.  Special-token text becomes the\n"
    "  special token unless --no-parse-special.  --lines: each line of the text\n"
    "  (split at '\\n' only) separately, one output line of ids per input line.\n";

static int cli_read_all(const char *path, char **out, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		log_error("%s: cannot open: %s", path, strerror(errno));
		return ERR_IO;
	}
	size_t cap = 65536, n = 0;
	char *p = malloc(cap);
	while (p) {
		size_t r = fread(p + n, 1, cap - n, f);
		n += r;
		if (r == 0)
			break;
		if (n == cap) {
			if (cap >= (256u << 20)) {
				log_error("%s: file too large", path);
				free(p);
				p = NULL;
				break;
			}
			char *t = realloc(p, cap *= 2);
			if (!t)
				free(p);
			p = t;
		}
	}
	fclose(f);
	if (!p)
		return ERR_NOMEM;
	*out = p;
	*len = n;
	return 0;
}

int cli_tokenize(int argc, char **argv)
{
	const char *path = NULL, *text = NULL, *file = NULL;
	int no_bos = 0, special = 1, pieces = 0, lines = 0;
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			fputs(cli_usage_tokenize, stdout);
			return CLI_OK;
		} else if (!strcmp(a, "--no-bos")) {
			no_bos = 1;
		} else if (!strcmp(a, "--no-parse-special")) {
			special = 0;
		} else if (!strcmp(a, "--pieces")) {
			pieces = 1;
		} else if (!strcmp(a, "--lines")) {
			lines = 1;
		} else if (i + 1 < argc && (!strcmp(a, "-m") || !strcmp(a, "--model"))) {
			path = argv[++i];
		} else if (i + 1 < argc && (!strcmp(a, "-p") || !strcmp(a, "--prompt"))) {
			text = argv[++i];
		} else if (i + 1 < argc && !strcmp(a, "--file")) {
			file = argv[++i];
		} else {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			fputs(cli_usage_tokenize, stderr);
			return CLI_USAGE;
		}
	}
	if (!path || !text == !file || (pieces && lines)) {
		fputs(cli_usage_tokenize, stderr);
		return CLI_USAGE;
	}
	int rc = CLI_FAIL;
	gguf *g = NULL;
	tokenizer *tok = NULL;
	char *buf = NULL, *piece = NULL;
	int32_t *ids = NULL;
	size_t len = 0;
	if (file) {
		if (cli_read_all(file, &buf, &len))
			goto out;
		text = buf;
	} else {
		len = strlen(text);
	}
	if (gguf_open(path, &g) || tokenizer_new(g, &tok))
		goto out;
	size_t cap = len + 2, n = 0, off = 0;
	ids = malloc(cap * sizeof(int32_t));
	piece = malloc(tokenizer_max_piece(tok) + 1);
	if (!ids || !piece)
		goto out;
	size_t start = 0;
	while (start < len || (start == 0 && len == 0)) {
		size_t end = len;
		if (lines) {
			const char *nl = memchr(text + start, '\n', len - start);
			end = nl ? (size_t)(nl - text) : len;
		}
		off = 0;
		if (!no_bos && tokenizer_add_bos(tok) && tokenizer_bos(tok) >= 0)
			ids[off++] = tokenizer_bos(tok);
		if (tokenizer_encode(tok, text + start, end - start, special, ids + off, cap - off,
				     &n)) {
			log_error("cannot tokenize the text");
			goto out;
		}
		n += off;
		for (size_t i = 0; i < n; i++) {
			if (pieces) {
				size_t pl = 0;
				tokenizer_piece(tok, ids[i], 1, piece, tokenizer_max_piece(tok) + 1,
						&pl);
				printf("%d\t%.*s\n", ids[i], (int)pl, piece);
			} else {
				printf("%s%d", i ? "," : "", ids[i]);
			}
		}
		if (!pieces)
			putchar('\n');
		start = end + 1;
		if (!lines)
			break;
	}
	rc = CLI_OK;
out:
	free(ids);
	free(piece);
	free(buf);
	tokenizer_destroy(&tok);
	gguf_destroy(&g);
	return rc;
}
