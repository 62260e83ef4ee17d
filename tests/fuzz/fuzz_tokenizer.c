/* fuzz_tokenizer: tokenizer_encode() on arbitrary bytes with two small
 * vocabularies from tests/data (the deepseek-v3 and qwen2 pre-tokenizers),
 * loaded once.  The first byte picks the vocabulary (bit 1), parse_special
 * (bit 0) and the capacity of a first, probing call (bits 2-7: 0 to 63 ids).
 * Checks: the probe writes no id past its capacity and fails with ERR_RANGE
 * exactly when the text has more tokens; a second call with exactly that
 * many ids succeeds with the same count and the probe's ids as its prefix;
 * every id is in range and has a piece; streaming the pieces back never
 * overflows the bound the stream promises, and gives valid UTF-8 text back
 * unchanged. */
#include "fuzz.h"
#include "../../common/err.h"
#include "../../common/gguf.h"
#include "../../common/log.h"
#include "../../common/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static tokenizer *fuzz_tok[2];

static tokenizer *fuzz_load(const char *name)
{
	gguf *g = NULL;
	tokenizer *t = NULL;
	if (gguf_open(fuzz_data_path(name), &g) || tokenizer_new(g, &t))
		abort(); /* set top_srcdir to the source tree */
	gguf_destroy(&g);
	return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!fuzz_tok[0]) {
		log_set_quiet(1);
		fuzz_tok[0] = fuzz_load("tokenizer/mini-deepseek-v3.gguf");
		fuzz_tok[1] = fuzz_load("qwen3moe-tiny-f32.gguf");
	}
	if (size < 1 || size > 4096)
		return 0;
	const tokenizer *t = fuzz_tok[(data[0] >> 1) & 1];
	int special = data[0] & 1;
	size_t cap = data[0] >> 2;
	const char *text = (const char *)data + 1;
	size_t len = size - 1;
	size_t n = 0;
	int32_t probe[64 + 1];
	for (size_t i = 0; i <= 64; i++)
		probe[i] = -7;
	int rc = tokenizer_encode(t, len ? text : NULL, len, special, probe, cap, &n);
	if (rc && rc != ERR_RANGE)
		return 0;
	if ((rc == ERR_RANGE) != (n > cap))
		abort();
	for (size_t i = cap; i <= 64; i++)
		if (probe[i] != -7) /* written past the capacity */
			abort();
	int32_t *ids = malloc((n ? n : 1) * sizeof(int32_t));
	if (!ids)
		abort();
	if (rc == 0) {
		memcpy(ids, probe, n * sizeof(int32_t));
	} else {
		size_t n2 = 0;
		if (tokenizer_encode(t, len ? text : NULL, len, special, ids, n, &n2) || n2 != n ||
		    memcmp(ids, probe, cap * sizeof(int32_t)) != 0)
			abort();
	}
	if (len && !n)
		abort(); /* non-empty text has tokens */
	tokenizer_stream *s = NULL;
	if (tokenizer_stream_new(t, special, &s))
		abort();
	size_t bound = tokenizer_stream_bound(s);
	char *out = malloc(bound + 1);
	/* valid UTF-8 comes back byte for byte (both vocabularies have every
	 * byte; special tokens render as their text when parsed as such) */
	int valid = fuzz_utf8_valid(text, len);
	char *back = malloc(len + 1);
	size_t n_back = 0;
	if (!out || !back)
		abort();
	for (size_t i = 0; i <= n; i++) {
		size_t k = 0;
		if (i < n) {
			if (ids[i] < 0 || ids[i] >= tokenizer_n_vocab(t))
				abort();
			if (tokenizer_stream_push(s, ids[i], out, bound, &k))
				abort();
		} else if (tokenizer_stream_flush(s, out, bound, &k)) {
			abort();
		}
		if (k > bound)
			abort();
		if (valid) {
			if (k > len - n_back)
				abort();
			memcpy(back + n_back, out, k);
			n_back += k;
		}
	}
	if (valid && (n_back != len || memcmp(back, text, len)))
		abort();
	free(back);
	free(out);
	tokenizer_stream_destroy(&s);
	free(ids);
	return 0;
}
