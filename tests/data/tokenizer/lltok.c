/* lltok: llama.cpp's tokenisation of escaped strings -- the generator of the
 * .tsv and .pieces files here.  Not part of the build: it links the prebuilt
 * libllama of the oracle (node-llama-cpp 3.22.1, llama.cpp v0.5.0):
 *
 *   B=/tmp/oracle/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
 *   git clone -q /tmp/oracle/node_modules/node-llama-cpp/llama/gitRelease.bundle llsrc
 *   gcc -O1 -o lltok lltok.c -Illsrc/include -Illsrc/ggml/include -L$B \
 *       -l:libllama.v0.5.0.so -l:libggml.v0.5.0.so -l:libggml-base.so -Wl,-rpath,$B
 *   ./lltok MODEL.gguf cases.txt OUT.tsv [OUT.pieces]
 *
 * cases.txt: one string per line, escaped as \\ \n \t \r \xHH.  OUT.tsv: per
 * string two lines "PARSE_SPECIAL<tab>ESCAPED<tab>IDS" (llama_tokenize with
 * add_special = false and parse_special = 0, then 1).  OUT.pieces: a header
 * "# n_vocab N bos B eos E add_bos A", then per token
 * "ID<tab>ATTR<tab>IS_EOG<tab>PIECE<tab>PIECE_SPECIAL" (llama_token_to_piece). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"

static void quiet(enum ggml_log_level l, const char *t, void *u)
{
	(void)l;
	(void)t;
	(void)u;
}

static size_t unescape(const char *s, size_t n, char *out)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] != '\\' || i + 1 >= n) {
			out[o++] = s[i];
			continue;
		}
		char c = s[++i];
		if (c == 'n')
			out[o++] = '\n';
		else if (c == 't')
			out[o++] = '\t';
		else if (c == 'r')
			out[o++] = '\r';
		else if (c == '\\')
			out[o++] = '\\';
		else if (c == 'x' && i + 2 < n) {
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

static int utf8_len_valid(const unsigned char *p, size_t n)
{
	unsigned c = p[0];
	int len;
	unsigned cp;
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF) {
		len = 2;
		cp = c & 0x1f;
	} else if (c >= 0xE0 && c <= 0xEF) {
		len = 3;
		cp = c & 0x0f;
	} else if (c >= 0xF0 && c <= 0xF4) {
		len = 4;
		cp = c & 0x07;
	} else
		return 0;
	if ((size_t)len > n)
		return 0;
	for (int k = 1; k < len; k++) {
		if ((p[k] & 0xC0) != 0x80)
			return 0;
		cp = (cp << 6) | (p[k] & 0x3f);
	}
	if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)))
		return 0;
	if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))
		return 0;
	return len;
}

static void escape(FILE *f, const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	for (size_t i = 0; i < n;) {
		unsigned c = p[i];
		if (c == '\\') {
			fputs("\\\\", f);
			i++;
			continue;
		}
		if (c == '\n') {
			fputs("\\n", f);
			i++;
			continue;
		}
		if (c == '\t') {
			fputs("\\t", f);
			i++;
			continue;
		}
		if (c == '\r') {
			fputs("\\r", f);
			i++;
			continue;
		}
		if (c < 0x20 || c == 0x7f) {
			fprintf(f, "\\x%02x", c);
			i++;
			continue;
		}
		int l = utf8_len_valid(p + i, n - i);
		if (l == 0) {
			fprintf(f, "\\x%02x", c);
			i++;
			continue;
		}
		fwrite(p + i, 1, l, f);
		i += l;
	}
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: lltok MODEL CASES OUT.tsv [PIECES.tsv]\n");
		return 2;
	}
	llama_log_set(quiet, NULL);
	llama_backend_init();
	struct llama_model_params mp = llama_model_default_params();
	mp.vocab_only = 1;
	struct llama_model *m = llama_model_load_from_file(argv[1], mp);
	if (!m) {
		fprintf(stderr, "load failed\n");
		return 1;
	}
	const struct llama_vocab *v = llama_model_get_vocab(m);
	FILE *in = fopen(argv[2], "r"), *out = fopen(argv[3], "w");
	if (!in || !out) {
		perror("open");
		return 1;
	}
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	static char buf[1 << 20];
	static llama_token ids[1 << 18];
	while ((n = getline(&line, &cap, in)) > 0) {
		if (line[n - 1] == '\n')
			n--;

		size_t len = unescape(line, n, buf);
		for (int sp = 0; sp < 2; sp++) {
			int k = llama_tokenize(v, buf, (int)len, ids, 1 << 18, 0, sp);
			if (k < 0) {
				fprintf(stderr, "too many tokens\n");
				return 1;
			}
			fprintf(out, "%d\t", sp);
			escape(out, buf, len);
			fputc('\t', out);
			for (int i = 0; i < k; i++)
				fprintf(out, i ? " %d" : "%d", ids[i]);
			fputc('\n', out);
		}
	}
	fclose(out);
	if (argc > 4) {
		FILE *pf = fopen(argv[4], "w");
		int nv = llama_vocab_n_tokens(v);
		fprintf(pf, "# n_vocab %d bos %d eos %d add_bos %d\n", nv, llama_vocab_bos(v),
			llama_vocab_eos(v), llama_vocab_get_add_bos(v));
		for (int id = 0; id < nv; id++) {
			char pb[4096];
			fprintf(pf, "%d\t%d\t%d\t", id, (int)llama_vocab_get_attr(v, id),
				(int)llama_vocab_is_eog(v, id));
			for (int sp = 0; sp < 2; sp++) {
				int k = llama_token_to_piece(v, id, pb, sizeof pb, 0, sp);
				if (k < 0)
					k = 0;
				escape(pf, pb, k);
				fputc(sp ? '\n' : '\t', pf);
			}
		}
		fclose(pf);
	}
	llama_model_free(m);
	return 0;
}
