/* The tokenizer against llama.cpp, and the sampler.
 *
 * tests/data/tokenizer/NAME.tsv holds llama.cpp's token ids (made by
 * tests/data/tokenizer/lltok.c, see the README there) for the corpus lines, the
 * whole corpus and hard cases, each with parse_special off and on; NAME.pieces
 * holds llama_token_to_piece() of every token, its attributes and whether it
 * ends generation.  Vocabularies: the tiny test models' ("default"
 * pre-tokenizer) and cut-down DeepSeek-V3, Qwen3 and gpt-oss ones
 * (mini-*.gguf: the first 6000 merges of the real vocabulary).  Every line must match exactly.
 * Then: round trips, streaming detokenisation of split characters, invalid UTF-8 and random bytes,
 * malformed vocabularies, and the sampler. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <math.h>

#include "../common/err.h"
#include "../common/gguf.h"
#include "../common/log.h"
#include "../common/tokenizer.h"
#include "../coordinator/serve/sampler.h"

/* ------------------------------------------------------------ helpers */

static const char *data_path(const char *file)
{
	static char buf[4096];
	const char *top = getenv("top_srcdir");
	if (file[0] == '/')
		return file;
	snprintf(buf, sizeof(buf), "%s/tests/data/%s", top && *top ? top : ".", file);
	return buf;
}

/* The escaping of the .tsv files: \\ \n \t \r \xHH, everything else literal. */
static size_t unescape(const char *s, size_t n, char *out)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] != '\\' || i + 1 >= n) {
			out[o++] = s[i];
			continue;
		}
		char c = s[++i];
		if (c == 'n') {
			out[o++] = '\n';
		} else if (c == 't') {
			out[o++] = '\t';
		} else if (c == 'r') {
			out[o++] = '\r';
		} else if (c == '\\') {
			out[o++] = '\\';
		} else if (c == 'x' && i + 2 < n) {
			char h[3] = {s[i + 1], s[i + 2], 0};
			out[o++] = (char)strtol(h, NULL, 16);
			i += 2;
		} else {
			out[o++] = '\\';
			out[o++] = c;
		}
	}
	return o;
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *p = malloc((size_t)n + 1);
	if (p && fread(p, 1, (size_t)n, f) != (size_t)n) {
		free(p);
		p = NULL;
	}
	fclose(f);
	if (p) {
		p[n] = 0;
		*len = (size_t)n;
	}
	return p;
}

/* Strict UTF-8 validity (no overlong forms, surrogates or values > U+10FFFF). */
static int utf8_valid(const uint8_t *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		uint8_t c = s[i];
		size_t need;
		uint8_t lo = 0x80, hi = 0xBF;
		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF) {
			need = 1;
		} else if (c >= 0xE0 && c <= 0xEF) {
			need = 2;
			lo = c == 0xE0 ? 0xA0 : 0x80;
			hi = c == 0xED ? 0x9F : 0xBF;
		} else if (c >= 0xF0 && c <= 0xF4) {
			need = 3;
			lo = c == 0xF0 ? 0x90 : 0x80;
			hi = c == 0xF4 ? 0x8F : 0xBF;
		} else {
			return 0;
		}
		if (i + need >= n)
			return 0;
		if (s[i + 1] < lo || s[i + 1] > hi)
			return 0;
		for (size_t k = 2; k <= need; k++) {
			if ((s[i + k] & 0xC0) != 0x80)
				return 0;
		}
		i += need + 1;
	}
	return 1;
}

static tokenizer *load_tokenizer(const char *gguf_file, gguf **pg)
{
	tokenizer *t = NULL;
	assert_int_equal(gguf_open(data_path(gguf_file), pg), 0);
	assert_int_equal(tokenizer_new(*pg, &t), 0);
	assert_non_null(t);
	return t;
}

/* Decodes ids to text through tokenizer_piece. */
static size_t detok(const tokenizer *t, const int32_t *ids, size_t n, int special, char *out,
		    size_t cap)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		size_t k;
		assert_int_equal(tokenizer_piece(t, ids[i], special, out + o, cap - o, &k), 0);
		o += k;
	}
	return o;
}

/* One parsed line of a .tsv file. */
struct tsv_line {
	int special;
	char *text;
	size_t len;
	int32_t *ids;
	size_t n_ids;
};

struct tsv {
	struct tsv_line *v;
	size_t n;
	char *raw;
};

static void tsv_free(struct tsv *t)
{
	for (size_t i = 0; i < t->n; i++) {
		free(t->v[i].text);
		free(t->v[i].ids);
	}
	free(t->v);
	free(t->raw);
}

static void tsv_load(const char *file, struct tsv *out)
{
	size_t len;
	memset(out, 0, sizeof(*out));
	out->raw = read_file(data_path(file), &len);
	if (!out->raw)
		fail_msg("cannot read %s", data_path(file));
	size_t cap = 0;
	for (char *line = out->raw; *line;) {
		char *nl = strchr(line, '\n');
		if (!nl)
			nl = line + strlen(line);
		char *t1 = memchr(line, '\t', (size_t)(nl - line));
		char *t2 = t1 ? memchr(t1 + 1, '\t', (size_t)(nl - t1 - 1)) : NULL;
		assert_non_null(t2);
		if (out->n == cap) {
			cap = cap ? cap * 2 : 256;
			out->v = realloc(out->v, cap * sizeof(*out->v));
		}
		struct tsv_line *l = &out->v[out->n++];
		l->special = line[0] == '1';
		l->text = malloc((size_t)(t2 - t1));
		l->len = unescape(t1 + 1, (size_t)(t2 - t1 - 1), l->text);
		l->n_ids = 0;
		l->ids = malloc(((size_t)(nl - t2) / 2 + 1) * sizeof(int32_t));
		for (char *p = t2 + 1; p < nl;) {
			char *e;
			long v = strtol(p, &e, 10);
			if (e == p)
				break;
			l->ids[l->n_ids++] = (int32_t)v;
			p = e;
		}
		line = *nl ? nl + 1 : nl;
	}
}

/* ------------------------------------------------------------ vocabularies */

struct vocab_case {
	const char *gguf;
	const char *tsv;
	const char *pieces;
	const char *pre;
};

static const struct vocab_case builtin_vocabs[] = {
    {"qwen3moe-tiny-mxfp4.gguf", "tokenizer/default.tsv", "tokenizer/default.pieces", "default"},
    {"tokenizer/mini-deepseek-v3.gguf", "tokenizer/mini-deepseek-v3.tsv",
     "tokenizer/mini-deepseek-v3.pieces", "deepseek-v3"},
    {"tokenizer/mini-qwen2.gguf", "tokenizer/mini-qwen2.tsv", "tokenizer/mini-qwen2.pieces",
     "qwen2"},
    {"tokenizer/mini-gpt-4o.gguf", "tokenizer/mini-gpt-4o.tsv", "tokenizer/mini-gpt-4o.pieces",
     "gpt-4o"},
};

/* The built-in cases plus any given as MOEFLEET_TOKENIZER_VOCABS =
 * "GGUF:TSV:PIECES:PRE[,...]" (absolute paths), for vocabularies too big to
 * keep in the tree (README in tests/data/tokenizer). */
#define MAX_VOCABS 16
static struct vocab_case vocab_cases[MAX_VOCABS];
static size_t n_vocab_cases;
static char *vocab_env;

static void vocab_cases_init(void)
{
	for (size_t i = 0; i < sizeof(builtin_vocabs) / sizeof(builtin_vocabs[0]); i++)
		vocab_cases[n_vocab_cases++] = builtin_vocabs[i];
	const char *env = getenv("MOEFLEET_TOKENIZER_VOCABS");
	if (!env || !*env)
		return;
	vocab_env = strdup(env);
	for (char *save = NULL, *item = strtok_r(vocab_env, ",", &save);
	     item && n_vocab_cases < MAX_VOCABS; item = strtok_r(NULL, ",", &save)) {
		char *f[4], *save2 = NULL;
		int k = 0;
		for (char *x = strtok_r(item, ":", &save2); x && k < 4;
		     x = strtok_r(NULL, ":", &save2))
			f[k++] = x;
		if (k == 4)
			vocab_cases[n_vocab_cases++] = (struct vocab_case){f[0], f[1], f[2], f[3]};
		else
			fprintf(stderr, "MOEFLEET_TOKENIZER_VOCABS: ignoring \"%s\"\n", item);
	}
}

static void print_ids(const char *what, const int32_t *ids, size_t n)
{
	fprintf(stderr, "  %s:", what);
	for (size_t i = 0; i < n && i < 40; i++)
		fprintf(stderr, " %d", ids[i]);
	fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

static void check_vocab_ids(const struct vocab_case *vc)
{
	gguf *g = NULL;
	tokenizer *t = load_tokenizer(vc->gguf, &g);
	struct tsv tsv;
	size_t cap = 1 << 16, n_fail = 0;
	int32_t *ids = malloc(cap * sizeof(*ids));

	assert_string_equal(tokenizer_pre_name(t), vc->pre);
	tsv_load(vc->tsv, &tsv);
	assert_true(tsv.n > 0);
	for (size_t i = 0; i < tsv.n; i++) {
		const struct tsv_line *l = &tsv.v[i];
		size_t n;
		int rc = tokenizer_encode(t, l->text, l->len, l->special, ids, cap, &n);
		assert_int_equal(rc, 0);
		if (n != l->n_ids || memcmp(ids, l->ids, n * sizeof(*ids)) != 0) {
			if (n_fail++ < 10) {
				fprintf(stderr, "%s line %zu (special %d) \"%.*s\":\n", vc->tsv,
					i + 1, l->special, (int)(l->len > 60 ? 60 : l->len),
					l->text);
				print_ids("llama.cpp", l->ids, l->n_ids);
				print_ids("ours", ids, n);
			}
		}
		/* a too small buffer: ERR_RANGE and the needed size */
		if (l->n_ids > 0 && i % 7 == 0) {
			size_t n2;
			assert_int_equal(tokenizer_encode(t, l->text, l->len, l->special, ids,
							  l->n_ids - 1, &n2),
					 ERR_RANGE);
			assert_int_equal(n2, l->n_ids);
		}
	}
	if (n_fail)
		fail_msg("%s: %zu of %zu lines differ from llama.cpp", vc->tsv, n_fail, tsv.n);
	tsv_free(&tsv);
	free(ids);
	tokenizer_destroy(&t);
	assert_null(t);
	gguf_destroy(&g);
}

static void check_vocab_pieces(const struct vocab_case *vc)
{
	gguf *g = NULL;
	tokenizer *t = load_tokenizer(vc->gguf, &g);
	size_t len, n_fail = 0, n_lines = 0;
	char *raw = read_file(data_path(vc->pieces), &len);
	char *want = malloc(1 << 16), *got = malloc(1 << 16);
	int n_vocab, bos, eos, add_bos;

	assert_non_null(raw);
	assert_int_equal(
	    sscanf(raw, "# n_vocab %d bos %d eos %d add_bos %d", &n_vocab, &bos, &eos, &add_bos),
	    4);
	assert_int_equal(tokenizer_n_vocab(t), n_vocab);
	assert_int_equal(tokenizer_bos(t), bos);
	assert_int_equal(tokenizer_eos(t), eos);
	assert_int_equal(tokenizer_add_bos(t), add_bos);
	for (char *line = strchr(raw, '\n') + 1; *line;) {
		char *nl = strchr(line, '\n');
		int id, attr, eog;
		assert_non_null(nl);
		assert_int_equal(sscanf(line, "%d\t%d\t%d\t", &id, &attr, &eog), 3);
		char *f = line;
		for (int k = 0; k < 3; k++)
			f = strchr(f, '\t') + 1;
		char *f2 = strchr(f, '\t');
		assert_true(f2 && f2 < nl);
		/* llama.cpp may add bits we do not model (LSTRIP/RSTRIP...): compare the low six */
		if ((tokenizer_attr(t, id) & 0x3f) != (attr & 0x3f) ||
		    tokenizer_is_eog(t, id) != eog) {
			if (n_fail++ < 10)
				fprintf(stderr, "token %d: attr %d eog %d, llama.cpp %d %d\n", id,
					tokenizer_attr(t, id), tokenizer_is_eog(t, id), attr, eog);
		}
		for (int sp = 0; sp < 2; sp++) {
			const char *a = sp ? f2 + 1 : f, *b = sp ? nl : f2;
			size_t wn = unescape(a, (size_t)(b - a), want), gn;
			assert_int_equal(tokenizer_piece(t, id, sp, got, 1 << 16, &gn), 0);
			if (gn != wn || memcmp(got, want, gn) != 0) {
				if (n_fail++ < 10)
					fprintf(
					    stderr,
					    "token %d special %d: piece \"%.*s\" want \"%.*s\"\n",
					    id, sp, (int)gn, got, (int)wn, want);
			}
		}
		n_lines++;
		line = nl + 1;
	}
	assert_int_equal(n_lines, (size_t)n_vocab);
	if (n_fail)
		fail_msg("%s: %zu differences from llama.cpp", vc->pieces, n_fail);
	free(raw);
	free(want);
	free(got);
	tokenizer_destroy(&t);
	gguf_destroy(&g);
}

static void test_vocab_ids(void **state)
{
	(void)state;
	for (size_t i = 0; i < n_vocab_cases; i++)
		check_vocab_ids(&vocab_cases[i]);
}

static void test_vocab_pieces(void **state)
{
	(void)state;
	for (size_t i = 0; i < n_vocab_cases; i++)
		check_vocab_pieces(&vocab_cases[i]);
}

/* Decoding the ids of every valid UTF-8 line gives the line back, with
 * special tokens rendered when they were parsed. */
static void test_roundtrip(void **state)
{
	(void)state;
	for (size_t c = 0; c < n_vocab_cases; c++) {
		gguf *g = NULL;
		tokenizer *t = load_tokenizer(vocab_cases[c].gguf, &g);
		struct tsv tsv;
		size_t cap = 1 << 20, n_rt = 0;
		char *out = malloc(cap);
		tsv_load(vocab_cases[c].tsv, &tsv);
		for (size_t i = 0; i < tsv.n; i++) {
			const struct tsv_line *l = &tsv.v[i];
			if (!utf8_valid((const uint8_t *)l->text, l->len))
				continue;
			size_t n = detok(t, l->ids, l->n_ids, l->special, out, cap);
			assert_int_equal(n, l->len);
			assert_memory_equal(out, l->text, n);
			n_rt++;
		}
		assert_true(n_rt > tsv.n / 2);
		tsv_free(&tsv);
		free(out);
		tokenizer_destroy(&t);
		gguf_destroy(&g);
	}
}

/* Streaming: every push emits only complete characters, and the stream
 * equals the pieces decoded at once (valid text: the text itself). */
static void test_stream(void **state)
{
	(void)state;
	gguf *g = NULL;
	tokenizer *t = load_tokenizer(vocab_cases[0].gguf, &g);
	tokenizer_stream *s = NULL;
	struct tsv tsv;
	size_t cap, big = 1 << 20;
	char *out = malloc(big), *buf;

	assert_int_equal(tokenizer_stream_new(t, 1, &s), 0);
	cap = tokenizer_stream_bound(s);
	assert_true(cap >= 3 * tokenizer_max_piece(t));
	buf = malloc(cap);
	tsv_load(vocab_cases[0].tsv, &tsv);
	for (size_t i = 0; i < tsv.n; i++) {
		const struct tsv_line *l = &tsv.v[i];
		size_t o = 0, n;
		for (size_t k = 0; k < l->n_ids; k++) {
			assert_int_equal(tokenizer_stream_push(s, l->ids[k], buf, cap, &n), 0);
			assert_true(utf8_valid((const uint8_t *)buf, n));
			memcpy(out + o, buf, n);
			o += n;
		}
		assert_int_equal(tokenizer_stream_flush(s, buf, cap, &n), 0);
		assert_true(utf8_valid((const uint8_t *)buf, n));
		memcpy(out + o, buf, n);
		o += n;
		if (l->special && utf8_valid((const uint8_t *)l->text, l->len)) {
			assert_int_equal(o, l->len);
			assert_memory_equal(out, l->text, o);
		}
	}
	tsv_free(&tsv);

	/* "é" (C3 A9) and "日" (E6 97 A5) are byte tokens in this vocabulary */
	int32_t ids[8];
	size_t n;
	assert_int_equal(tokenizer_encode(t, "\xC3\xA9\xE6\x97\xA5", 5, 0, ids, 8, &n), 0);
	assert_int_equal(n, 5);
	const size_t want_n[5] = {0, 2, 0, 0, 3};
	for (int k = 0; k < 5; k++) {
		assert_int_equal(tokenizer_stream_push(s, ids[k], buf, cap, &n), 0);
		assert_int_equal(n, want_n[k]);
	}
	assert_memory_equal(buf, "\xE6\x97\xA5", 3);
	/* a dangling lead byte: held, then U+FFFD at flush */
	assert_int_equal(tokenizer_stream_push(s, 0xE6, buf, cap, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(tokenizer_stream_flush(s, buf, cap, &n), 0);
	assert_int_equal(n, 3);
	assert_memory_equal(buf, "\xEF\xBF\xBD", 3);
	/* a lead byte followed by ASCII: U+FFFD then the ASCII */
	assert_int_equal(tokenizer_stream_push(s, 0xE6, buf, cap, &n), 0);
	assert_int_equal(tokenizer_stream_push(s, 'a', buf, cap, &n), 0);
	assert_int_equal(n, 4);
	assert_memory_equal(buf,
			    "\xEF\xBF\xBD"
			    "a",
			    4);
	/* a lone continuation byte, and 0xFF */
	assert_int_equal(tokenizer_stream_push(s, 0x80, buf, cap, &n), 0);
	assert_memory_equal(buf, "\xEF\xBF\xBD", 3);
	assert_int_equal(tokenizer_stream_push(s, 0xFF, buf, cap, &n), 0);
	assert_memory_equal(buf, "\xEF\xBF\xBD", 3);
	/* too small a buffer consumes nothing */
	assert_int_equal(tokenizer_stream_push(s, 0xC3, buf, cap, &n), 0);
	assert_int_equal(tokenizer_stream_push(s, 'b', buf, 2, &n), ERR_RANGE);
	assert_int_equal(n, 4);
	assert_int_equal(tokenizer_stream_push(s, 0xA9, buf, 2, &n), 0);
	assert_int_equal(n, 2);
	assert_memory_equal(buf, "\xC3\xA9", 2);
	assert_int_equal(tokenizer_stream_push(s, -1, buf, cap, &n), ERR_RANGE);
	assert_int_equal(tokenizer_stream_push(s, tokenizer_n_vocab(t), buf, cap, &n), ERR_RANGE);
	/* control tokens: text only in a special stream */
	int32_t eos = tokenizer_eos(t);
	assert_int_equal(tokenizer_stream_push(s, eos, buf, cap, &n), 0);
	assert_int_equal(n, strlen("<|endoftext|>"));
	tokenizer_stream_destroy(&s);
	assert_null(s);
	assert_int_equal(tokenizer_stream_new(t, 0, &s), 0);
	assert_int_equal(tokenizer_stream_push(s, eos, buf, cap, &n), 0);
	assert_int_equal(n, 0);
	tokenizer_stream_destroy(&s);

	free(buf);
	free(out);
	tokenizer_destroy(&t);
	gguf_destroy(&g);
}

/* Invalid UTF-8 where llama.cpp aborts (code points above U+10FFFF): every
 * byte becomes U+FFFD.  Random bytes never crash and the size protocol holds. */
static void test_bad_input(void **state)
{
	(void)state;
	gguf *g = NULL;
	tokenizer *t = load_tokenizer(vocab_cases[0].gguf, &g);
	int32_t ids[4096], ids2[4096];
	size_t n, n2;
	char out[8192];

	/* U+FFFD is the byte tokens of EF BF BD here */
	int32_t f[3];
	assert_int_equal(tokenizer_encode(t, "\xEF\xBF\xBD", 3, 0, f, 3, &n), 0);
	assert_int_equal(n, 3);
	const char *bad[] = {"\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xF7\xBF\xBF\xBF"};
	for (int k = 0; k < 3; k++) {
		assert_int_equal(tokenizer_encode(t, bad[k], 4, 0, ids, 4096, &n), 0);
		assert_int_equal(n, 12);
		for (int j = 0; j < 12; j++)
			assert_int_equal(ids[j], f[j % 3]);
	}
	assert_int_equal(tokenizer_encode(t, "", 0, 1, ids, 0, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(tokenizer_encode(t, NULL, 0, 1, NULL, 0, &n), 0);
	assert_int_equal(n, 0);

	uint64_t x = 12345;
	for (int it = 0; it < 3000; it++) {
		char text[512];
		size_t len = (size_t)(it % 97) * 5 % 500;
		for (size_t i = 0; i < len; i++) {
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			uint8_t b = (uint8_t)(x >> 56);
			/* bias towards UTF-8 structure bytes, spaces and '<|' */
			int r = (int)(x >> 40) & 7;
			if (r == 0)
				b = (uint8_t)(0x80 | (b & 0x3F));
			else if (r == 1)
				b = (uint8_t)(0xC0 | (b & 0x3F));
			else if (r == 2)
				b = " <|\n"[b & 3];
			text[i] = (char)b;
		}
		int sp = it & 1;
		int rc = tokenizer_encode(t, text, len, sp, ids, 0, &n);
		assert_int_equal(rc, n > 0 ? ERR_RANGE : 0);
		assert_true(n <= 4096);
		assert_int_equal(tokenizer_encode(t, text, len, sp, ids2, n, &n2), 0);
		assert_int_equal(n2, n);
		for (size_t i = 0; i < n; i++)
			assert_true(ids2[i] >= 0 && ids2[i] < tokenizer_n_vocab(t));
		/* deterministic */
		assert_int_equal(tokenizer_encode(t, text, len, sp, ids, 4096, &n2), 0);
		assert_int_equal(n2, n);
		assert_memory_equal(ids, ids2, n * sizeof(*ids));
		size_t m = detok(t, ids, n, sp, out, sizeof(out));
		if (utf8_valid((const uint8_t *)text, len)) {
			assert_int_equal(m, len);
			assert_memory_equal(out, text, len);
		}
	}
	int32_t one;
	assert_int_equal(tokenizer_piece(t, -1, 0, out, 10, &n), ERR_RANGE);
	assert_int_equal(tokenizer_piece(t, tokenizer_n_vocab(t), 0, out, 10, &n), ERR_RANGE);
	assert_int_equal(tokenizer_encode(t, "hello", 5, 0, &one, 1, &n), ERR_RANGE);
	assert_int_equal(tokenizer_piece(t, tokenizer_eos(t), 1, out, 3, &n), ERR_RANGE);
	assert_int_equal(n, strlen("<|endoftext|>"));
	assert_int_equal(tokenizer_find(t, "<|endoftext|>", 13), tokenizer_eos(t));
	assert_int_equal(tokenizer_find(t, "<|nothing|>", 11), -1);
	tokenizer_destroy(&t);
	gguf_destroy(&g);
}

/* ------------------------------------------------------------ malformed vocabularies */

struct buf {
	uint8_t *p;
	size_t n, cap;
};

static void put(struct buf *b, const void *d, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = (b->n + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
	}
	memcpy(b->p + b->n, d, n);
	b->n += n;
}
static void put_u32(struct buf *b, uint32_t v)
{
	put(b, &v, 4);
}
static void put_u64(struct buf *b, uint64_t v)
{
	put(b, &v, 8);
}
static void put_str(struct buf *b, const char *s)
{
	put_u64(b, strlen(s));
	put(b, s, strlen(s));
}

/* A vocabulary: 256 byte tokens, "ab", "abc", "<c>" (CONTROL), "<u>"
 * (USER_DEFINED), "<c>x" (CONTROL); merges "a b", "ab c", "b c". */
struct vocab_spec {
	const char *model;
	const char *pre; /* NULL: key absent */
	int n_extra_types;
	int bad_type;
	const char *bad_merge;
	uint32_t bos;
	int dup_token;
	int bad_byte_token;
	uint32_t vocab_size; /* 0: key absent */
	int u32_bos;
};

static const char *extra_tokens[] = {"ab", "abc", "<c>", "<u>", "<c>x"};
static const int32_t extra_types[] = {1, 1, 3, 4, 3};
#define N_EXTRA	 5
#define N_TOKENS (256 + N_EXTRA)

static void gpt2_spell(int b, char *out)
{
	int n = 0, cpt = -1;
	for (int c = 0; c < 256; c++) {
		int self = (c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE;
		int v = self ? c : 256 + n++;
		if (c == b)
			cpt = v;
	}
	if (cpt < 0x80) {
		out[0] = (char)cpt;
		out[1] = 0;
	} else {
		out[0] = (char)(0xC0 | (cpt >> 6));
		out[1] = (char)(0x80 | (cpt & 0x3F));
		out[2] = 0;
	}
}

static const char *write_vocab(const struct vocab_spec *v)
{
	static char path[256];
	struct buf b = {0};
	const char *merges[] = {"a b", "ab c", "b c", v->bad_merge};
	int n_merges = v->bad_merge ? 4 : 3;
	int n_kv = 6 + (v->pre != NULL) + (v->vocab_size != 0);

	put(&b, "GGUF", 4);
	put_u32(&b, 3);
	put_u64(&b, 0);
	put_u64(&b, (uint64_t)n_kv);
	put_str(&b, "general.architecture");
	put_u32(&b, GGUF_TYPE_STRING);
	put_str(&b, "test");
	put_str(&b, "tokenizer.ggml.model");
	put_u32(&b, GGUF_TYPE_STRING);
	put_str(&b, v->model);
	if (v->pre) {
		put_str(&b, "tokenizer.ggml.pre");
		put_u32(&b, GGUF_TYPE_STRING);
		put_str(&b, v->pre);
	}
	if (v->vocab_size) {
		put_str(&b, "test.vocab_size");
		put_u32(&b, GGUF_TYPE_U32);
		put_u32(&b, v->vocab_size);
	}
	put_str(&b, "tokenizer.ggml.tokens");
	put_u32(&b, GGUF_TYPE_ARRAY);
	put_u32(&b, GGUF_TYPE_STRING);
	put_u64(&b, N_TOKENS);
	for (int i = 0; i < 256; i++) {
		char s[16];
		gpt2_spell(i, s);
		if (v->dup_token && i == 1)
			gpt2_spell(0, s);
		if (v->bad_byte_token && i == 65)
			strcpy(s, "<0x4G>");
		put_str(&b, s);
	}
	for (int i = 0; i < N_EXTRA; i++)
		put_str(&b, extra_tokens[i]);
	put_str(&b, "tokenizer.ggml.token_type");
	put_u32(&b, GGUF_TYPE_ARRAY);
	put_u32(&b, GGUF_TYPE_I32);
	put_u64(&b, (uint64_t)(N_TOKENS + v->n_extra_types));
	for (int i = 0; i < 256; i++) {
		int32_t ty = v->bad_byte_token && i == 65 ? 6 : 1;
		put(&b, &ty, 4);
	}
	for (int i = 0; i < N_EXTRA; i++) {
		int32_t ty = v->bad_type && i == 0 ? v->bad_type : extra_types[i];
		put(&b, &ty, 4);
	}
	for (int i = 0; i < v->n_extra_types; i++) {
		int32_t ty = 1;
		put(&b, &ty, 4);
	}
	put_str(&b, "tokenizer.ggml.merges");
	put_u32(&b, GGUF_TYPE_ARRAY);
	put_u32(&b, GGUF_TYPE_STRING);
	put_u64(&b, (uint64_t)n_merges);
	for (int i = 0; i < n_merges; i++)
		put_str(&b, merges[i]);
	put_str(&b, "tokenizer.ggml.bos_token_id");
	if (v->u32_bos) {
		put_u32(&b, GGUF_TYPE_U32);
		put_u32(&b, v->bos);
	} else {
		put_u32(&b, GGUF_TYPE_I32);
		put_u32(&b, v->bos);
	}

	snprintf(path, sizeof(path), "%s/moefleet-tok-%d.gguf",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(b.p, 1, b.n, f), b.n);
	fclose(f);
	free(b.p);
	return path;
}

static int open_vocab(const struct vocab_spec *v, tokenizer **t, gguf **g)
{
	const char *path = write_vocab(v);
	int rc = gguf_open(path, g);
	unlink(path);
	assert_int_equal(rc, 0);
	rc = tokenizer_new(*g, t);
	if (rc)
		assert_null(*t);
	return rc;
}

static const struct vocab_spec good_vocab = {
    .model = "gpt2", .pre = "default", .bos = 258, .u32_bos = 1, .vocab_size = N_TOKENS};

static void test_bad_vocab(void **state)
{
	(void)state;
	struct vocab_spec v;
	tokenizer *t = NULL;
	gguf *g = NULL;

	assert_int_equal(open_vocab(&good_vocab, &t, &g), 0);
	tokenizer_destroy(&t);
	gguf_destroy(&g);

#define BAD(field, value)                                                                          \
	do {                                                                                       \
		v = good_vocab;                                                                    \
		v.field = value;                                                                   \
		assert_int_equal(open_vocab(&v, &t, &g), ERR_FORMAT);                              \
		gguf_destroy(&g);                                                                  \
	} while (0)
	BAD(model, "llama");
	BAD(pre, "no-such-pre");
	BAD(n_extra_types, 1);
	BAD(bad_type, 9);
	BAD(bad_merge, "abc");
	BAD(bad_merge, "a ");
	BAD(bad_merge, "a");
	BAD(bos, N_TOKENS);
	BAD(u32_bos, 0); /* i32 where llama.cpp wants u32 */
	BAD(dup_token, 1);
	BAD(bad_byte_token, 1);
	BAD(vocab_size, N_TOKENS + 1);
#undef BAD
	/* a missing pre-tokenizer means "default", as in llama.cpp */
	v = good_vocab;
	v.pre = NULL;
	assert_int_equal(open_vocab(&v, &t, &g), 0);
	assert_string_equal(tokenizer_pre_name(t), "default");
	tokenizer_destroy(&t);
	gguf_destroy(&g);
}

/* BPE order and special tokens on the small vocabulary above. */
static void test_small_vocab(void **state)
{
	(void)state;
	tokenizer *t = NULL;
	gguf *g = NULL;
	int32_t ids[64];
	size_t n;
	const int32_t AB = 256, ABC = 257, C = 258, U = 259, CX = 260;

	assert_int_equal(open_vocab(&good_vocab, &t, &g), 0);
	/* "a b" (rank 0) before "b c" (rank 2), then "ab c" (rank 1) */
	assert_int_equal(tokenizer_encode(t, "abc", 3, 0, ids, 64, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(ids[0], ABC);
	/* "bc" is a merge result that is not a token: its bytes one by one */
	assert_int_equal(tokenizer_encode(t, "bcab", 4, 0, ids, 64, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(ids[0], 'b');
	assert_int_equal(ids[1], 'c');
	assert_int_equal(ids[2], AB);
	/* USER_DEFINED always matches; CONTROL only with parse_special, longest first */
	assert_int_equal(tokenizer_encode(t, "<u><c>x<c>", 10, 0, ids, 64, &n), 0);
	assert_int_equal(ids[0], U);
	assert_int_equal(n, 1 + 7);
	assert_int_equal(tokenizer_encode(t, "<u><c>x<c>", 10, 1, ids, 64, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(ids[0], U);
	assert_int_equal(ids[1], CX);
	assert_int_equal(ids[2], C);
	assert_int_equal(tokenizer_bos(t), C);
	assert_int_equal(tokenizer_eos(t), 11); /* llama.cpp's default for gpt2 vocabularies */
	assert_true(tokenizer_is_eog(t, 11));
	assert_int_equal(tokenizer_attr(t, C), TOKENIZER_ATTR_CONTROL);
	assert_int_equal(tokenizer_attr(t, U), TOKENIZER_ATTR_USER_DEFINED);
	tokenizer_destroy(&t);
	gguf_destroy(&g);
}

/* ------------------------------------------------------------ sampler */

static void test_sampler_greedy(void **state)
{
	(void)state;
	struct sampler_params p = {.temp = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 1};
	sampler *s = NULL;
	float l[6] = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f, 2.9f};

	assert_int_equal(sampler_new(&p, 6, &s), 0);
	assert_int_equal(sampler_sample(s, l), 1); /* tie: lowest id */
	sampler_destroy(&s);
	assert_null(s);
	float nan_first[3] = {__builtin_nanf(""), -1.0f, -0.5f};
	assert_int_equal(sampler_new(&p, 3, &s), 0);
	assert_int_equal(sampler_sample(s, nan_first), 2);
	sampler_destroy(&s);

	/* top_k 1 and a tiny top_p are greedy too */
	p.temp = 1.5f;
	p.top_k = 1;
	assert_int_equal(sampler_new(&p, 6, &s), 0);
	for (int i = 0; i < 100; i++)
		assert_int_equal(sampler_sample(s, l), 1);
	sampler_destroy(&s);
	p.top_k = 0;
	p.top_p = 1e-6f;
	assert_int_equal(sampler_new(&p, 6, &s), 0);
	for (int i = 0; i < 100; i++)
		assert_int_equal(sampler_sample(s, l), 1);
	sampler_destroy(&s);

	float inf[3] = {-__builtin_inff(), -__builtin_inff(), __builtin_nanf("")};
	p.top_p = 0.9f;
	assert_int_equal(sampler_new(&p, 3, &s), 0);
	assert_int_equal(sampler_sample(s, inf), 0);
	sampler_destroy(&s);
}

static void test_sampler_dist(void **state)
{
	(void)state;
	enum { N = 40000 };
	struct sampler_params p = {.temp = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 42};
	sampler *s = NULL, *s2 = NULL;
	/* p = 1/7, 2/7, 4/7 */
	float l[3] = {0.0f, 0.69314718f, 1.38629436f};
	int count[3] = {0};

	assert_int_equal(sampler_new(&p, 3, &s), 0);
	assert_int_equal(sampler_new(&p, 3, &s2), 0);
	for (int i = 0; i < N; i++) {
		int32_t a = sampler_sample(s, l);
		assert_int_equal(sampler_sample(s2, l), a); /* same seed, same draws */
		count[a]++;
	}
	assert_true(abs(count[0] - N / 7) < N / 100);
	assert_true(abs(count[1] - 2 * N / 7) < N / 100);
	assert_true(abs(count[2] - 4 * N / 7) < N / 100);
	sampler_destroy(&s2);

	/* another seed gives another sequence */
	p.seed = 43;
	assert_int_equal(sampler_new(&p, 3, &s2), 0);
	int same = 0;
	for (int i = 0; i < 200; i++)
		same += sampler_sample(s, l) == sampler_sample(s2, l);
	assert_true(same < 190);
	sampler_destroy(&s);
	sampler_destroy(&s2);

	/* temperature 0.5 squares the ratios: 1/21, 4/21, 16/21 */
	p.temp = 0.5f;
	memset(count, 0, sizeof(count));
	assert_int_equal(sampler_new(&p, 3, &s), 0);
	for (int i = 0; i < N; i++)
		count[sampler_sample(s, l)]++;
	assert_true(abs(count[0] - N / 21) < N / 100);
	assert_true(abs(count[2] - 16 * N / 21) < N / 100);
	sampler_destroy(&s);

	/* top-k 2 of 5; top-p 0.5 keeps the top two of {4/7, 2/7, 1/7} (4/7 < 0.6) */
	float l5[5] = {0.0f, 0.69314718f, 1.38629436f, -1.0f, -3.0f};
	p.temp = 1.0f;
	p.top_k = 2;
	assert_int_equal(sampler_new(&p, 5, &s), 0);
	memset(count, 0, sizeof(count));
	for (int i = 0; i < N; i++) {
		int32_t a = sampler_sample(s, l5);
		assert_true(a == 1 || a == 2);
		count[a - 1]++;
	}
	assert_true(abs(count[0] - N / 3) < N / 100);
	sampler_destroy(&s);
	p.top_k = 0;
	p.top_p = 0.6f;
	assert_int_equal(sampler_new(&p, 5, &s), 0);
	memset(count, 0, sizeof(count));
	for (int i = 0; i < N; i++) {
		int32_t a = sampler_sample(s, l5);
		assert_true(a == 1 || a == 2);
		count[a - 1]++;
	}
	assert_true(abs(count[0] - N / 3) < N / 100);
	sampler_destroy(&s);
}

struct ref_cand {
	float l;
	int id;
};

static int ref_cand_cmp(const void *a, const void *b)
{
	const struct ref_cand *x = a, *y = b;
	if (x->l != y->l)
		return x->l > y->l ? -1 : 1;
	return x->id - y->id;
}

/* top-p over a large vocabulary (the heap path) against a sorted reference */
static void test_sampler_nucleus(void **state)
{
	(void)state;
	enum { V = 1000, N = 8000 };
	static float l[V];
	static struct ref_cand r[V];
	static int count[V];
	uint64_t x = 99;
	for (int i = 0; i < V; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		l[i] = (float)((x >> 40) % 1000) / 100.0f; /* 0 .. 9.99, with ties */
		r[i] = (struct ref_cand){l[i], i};
	}
	qsort(r, V, sizeof(r[0]), ref_cand_cmp);
	const float temp = 0.7f, top_p = 0.9f;
	double p[V], sum = 0.0, cum = 0.0;
	for (int i = 0; i < V; i++)
		sum += p[i] = exp((r[i].l - r[0].l) / temp);
	int m = 0;
	while (m < V) {
		cum += p[m++];
		if (cum >= top_p * sum)
			break;
	}
	for (int k = 0; k < 2; k++) {
		struct sampler_params sp = {
		    .temp = temp, .top_k = k ? V - 1 : 0, .top_p = top_p, .seed = 5};
		sampler *s = NULL;
		memset(count, 0, sizeof(count));
		assert_int_equal(sampler_new(&sp, V, &s), 0);
		for (int i = 0; i < N; i++)
			count[sampler_sample(s, l)]++;
		int inside = 0;
		for (int i = 0; i < m; i++) {
			inside += count[r[i].id];
			double want = p[i] / cum * N;
			assert_true(fabs(count[r[i].id] - want) < 5 * sqrt(want) + 5);
		}
		assert_int_equal(inside, N);
		sampler_destroy(&s);
	}
}

static void test_sampler_params(void **state)
{
	(void)state;
	struct sampler_params p;
	sampler *s = (sampler *)&p;

	sampler_params_default(&p);
	assert_int_equal(sampler_new(&p, 0, &s), ERR_CONFIG);
	assert_null(s);
	p.top_p = 0.0f;
	assert_int_equal(sampler_new(&p, 10, &s), ERR_CONFIG);
	p.top_p = 1.5f;
	assert_int_equal(sampler_new(&p, 10, &s), ERR_CONFIG);
	sampler_params_default(&p);
	p.top_k = -1;
	assert_int_equal(sampler_new(&p, 10, &s), ERR_CONFIG);
	sampler_params_default(&p);
	p.temp = __builtin_nanf("");
	assert_int_equal(sampler_new(&p, 10, &s), ERR_CONFIG);
	sampler_params_default(&p);
	assert_int_equal(sampler_new(&p, 10, &s), 0);
	sampler_destroy(&s);
	sampler_destroy(&s); /* NULL is fine */
}

int main(void)
{
	/* clang-format off */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_vocab_ids),
		cmocka_unit_test(test_vocab_pieces),
		cmocka_unit_test(test_roundtrip),
		cmocka_unit_test(test_stream),
		cmocka_unit_test(test_bad_input),
		cmocka_unit_test(test_bad_vocab),
		cmocka_unit_test(test_small_vocab),
		cmocka_unit_test(test_sampler_greedy),
		cmocka_unit_test(test_sampler_dist),
		cmocka_unit_test(test_sampler_nucleus),
		cmocka_unit_test(test_sampler_params),
	};
	/* clang-format on */
	log_set_quiet(1);
	vocab_cases_init();
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	free(vocab_env);
	return rc;
}
