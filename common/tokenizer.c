/* tokenizer: byte-level BPE as llama.cpp does it (see tokenizer.h) -- loading
 * (tokens, types, merges, special ids, llama.cpp's type fix-ups), pieces and
 * the incremental decoder.
 *
 * The other parts: tokenizer_pretok.c (pre-tokenizer regex tables, Unicode
 * helpers), tokenizer_bpe.c (string and pair hash tables; encoding: special-token
 * partition, regex split, BPE); they share tokenizer_internal.h.
 *
 * BPE works on raw bytes instead of GPT-2-spelled text: every token and every
 * merge side is converted back to bytes at load and interned, so a symbol is
 * an interned string id and a merge is a lookup of an id pair.  That is the
 * same computation as llama.cpp's (the spelling is a bijection) without string
 * hashing at encode time. */
#include "tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "log.h"

/* llama.cpp's token-type fix-ups by text (llama_vocab::impl::load). */
#define FW_BAR "\xEF\xBD\x9C" /* U+FF5C FULLWIDTH VERTICAL LINE (DeepSeek) */
#define LOW_8  "\xE2\x96\x81" /* U+2581 LOWER ONE EIGHTH BLOCK */
#define DS_EOS "<" FW_BAR "end" LOW_8 "of" LOW_8 "sentence" FW_BAR ">"

/* clang-format off */
static const char *const eot_texts[] = {
	"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
	"<EOT>", "_<EOT>", "[EOT]", DS_EOS, "<end_of_utterance>", NULL};
static const char *const eom_texts[] = {"<|eom_id|>", NULL};
static const char *const fim_pre_texts[] = {
	"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<" FW_BAR "fim" LOW_8 "begin" FW_BAR ">",
	"<PRE>", LOW_8 "<PRE>", "<|code_prefix|>", "<|prefix|>", NULL};
static const char *const fim_suf_texts[] = {
	"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<" FW_BAR "fim" LOW_8 "hole" FW_BAR ">",
	"<SUF>", LOW_8 "<SUF>", "<|code_suffix|>", "<|suffix|>", NULL};
static const char *const fim_mid_texts[] = {
	"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<" FW_BAR "fim" LOW_8 "end" FW_BAR ">",
	"<MID>", LOW_8 "<MID>", "<|code_middle|>", "<|middle|>", NULL};
static const char *const fim_pad_texts[] = {
	"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", NULL};
static const char *const fim_rep_texts[] = {
	"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", NULL};
static const char *const fim_sep_texts[] = {"<|file_sep|>", NULL};
static const char *const eog_texts[] = {
	"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
	"<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
	"<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", DS_EOS,
	"[e~[", NULL};
/* gpt-oss: always rendered, matched even without parse_special */
static const char *const user_defined_texts[] = {
	"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>", NULL};
/* clang-format on */

static int32_t tok_find_cstr(const tokenizer *t, const char *s)
{
	return tok_strtab_find(&t->texts, (const uint8_t *)s, strlen(s));
}

/* The lowest id whose text is in list, or -1. */
static int32_t tok_find_first(const tokenizer *t, const char *const *list)
{
	int32_t best = -1;
	for (int i = 0; list[i]; i++) {
		int32_t id = tok_find_cstr(t, list[i]);
		if (id >= 0 && (best < 0 || id < best))
			best = id;
	}
	return best;
}

static void tok_force_control(tokenizer *t, int32_t id)
{
	if (id >= 0)
		t->attr[id] |= TOKENIZER_ATTR_CONTROL;
}

static void tok_set_attr(tokenizer *t, const char *text, uint8_t attr)
{
	int32_t id = tok_find_cstr(t, text);
	if (id >= 0)
		t->attr[id] = attr;
}

/* Reads an optional special-token id key; an absent key keeps *id. */
static int tok_read_id(const gguf *g, const char *key, int32_t n_vocab, int32_t *id)
{
	uint32_t v;
	int rc = gguf_get_u32(g, key, &v);
	if (rc == ERR_RANGE)
		return 0;
	if (rc)
		return rc;
	if (v >= (uint32_t)n_vocab) {
		log_error("%s: key %s: token id %u out of range (n_vocab %d)", gguf_path(g), key, v,
			  n_vocab);
		return ERR_FORMAT;
	}
	*id = (int32_t)v;
	return 0;
}

static int tok_read_bool(const gguf *g, const char *key, int *out)
{
	int rc = gguf_get_bool(g, key, out);
	return rc == ERR_RANGE ? 0 : rc;
}

static int tok_load_tokens(tokenizer *t, const gguf *g)
{
	const char *path = gguf_path(g);
	enum gguf_type et;
	uint64_t n;
	const void *data;
	int rc = gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n, &data);
	if (rc == ERR_RANGE) {
		log_error("%s: key tokenizer.ggml.tokens missing", path);
		return ERR_FORMAT;
	}
	if (rc)
		return rc;
	if (et != GGUF_TYPE_STRING || n == 0 || n > INT32_MAX / 2) {
		log_error("%s: key tokenizer.ggml.tokens: expected 1..%d strings", path,
			  INT32_MAX / 2);
		return ERR_FORMAT;
	}
	t->n_vocab = (int32_t)n;
	t->attr = calloc(n, 1);
	t->eog = calloc(n, 1);
	if (!t->attr || !t->eog)
		return ERR_NOMEM;
	for (uint64_t i = 0; i < n; i++) {
		gguf_str s;
		char empty[32];
		rc = gguf_get_arr_str(g, "tokenizer.ggml.tokens", i, &s);
		if (rc)
			return rc;
		if (s.len == 0) {
			/* as llama.cpp: an empty token gets a placeholder text */
			log_warn("%s: key tokenizer.ggml.tokens: token %llu is empty", path,
				 (unsigned long long)i);
			snprintf(empty, sizeof(empty), "[EMPTY_%llu]", (unsigned long long)i);
			s.ptr = empty;
			s.len = strlen(empty);
		}
		int32_t idx;
		int added;
		rc = tok_strtab_intern(&t->texts, (const uint8_t *)s.ptr, s.len, &idx, &added);
		if (rc)
			return rc;
		if (!added) {
			log_error("%s: key tokenizer.ggml.tokens: token %llu repeats the text of "
				  "token %d",
				  path, (unsigned long long)i, idx);
			return ERR_FORMAT;
		}
	}

	rc = gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n, &data);
	if (rc == ERR_RANGE) {
		memset(t->attr, TOKENIZER_ATTR_NORMAL, (size_t)t->n_vocab);
		return 0;
	}
	if (rc)
		return rc;
	if (et != GGUF_TYPE_I32 || n != (uint64_t)t->n_vocab) {
		log_error("%s: key tokenizer.ggml.token_type: expected %d i32 values, not %llu",
			  path, t->n_vocab, (unsigned long long)n);
		return ERR_FORMAT;
	}
	static const uint8_t type_attr[7] = {
	    TOKENIZER_ATTR_UNDEFINED, TOKENIZER_ATTR_NORMAL,	   TOKENIZER_ATTR_UNKNOWN,
	    TOKENIZER_ATTR_CONTROL,   TOKENIZER_ATTR_USER_DEFINED, TOKENIZER_ATTR_UNUSED,
	    TOKENIZER_ATTR_BYTE,
	};
	for (int32_t i = 0; i < t->n_vocab; i++) {
		int32_t v;
		memcpy(&v, (const uint8_t *)data + 4 * (size_t)i, 4);
		if (v < 0 || v > 6) {
			log_error("%s: key tokenizer.ggml.token_type: token %d has unknown type %d",
				  path, i, v);
			return ERR_FORMAT;
		}
		t->attr[i] = type_attr[v];
	}
	return 0;
}

/* Interns the 256 single bytes and every token's byte string (when its text
 * spells bytes). */
static int tok_build_syms(tokenizer *t)
{
	int rc = 0;
	uint8_t *buf = NULL;
	size_t cap = 0;

	for (int b = 0; b < 256; b++) {
		uint8_t c = (uint8_t)b;
		rc = tok_strtab_intern(&t->syms, &c, 1, &t->byte_sym[b], NULL);
		if (rc)
			goto out;
		t->text1_tok[b] = tok_strtab_find(&t->texts, &c, 1);
	}
	for (int32_t id = 0; id < t->n_vocab; id++) {
		uint32_t n = t->texts.len[id];
		size_t m;
		int32_t sid;
		if (n > cap) {
			cap = n;
			free(buf);
			buf = malloc(cap);
			if (!buf) {
				rc = ERR_NOMEM;
				goto out;
			}
		}
		if (tok_byte_map_unspell(&t->bmap, tok_strtab_str(&t->texts, (uint32_t)id), n, buf,
					 &m))
			continue;
		rc = tok_strtab_intern(&t->syms, buf, m, &sid, NULL);
		if (rc)
			goto out;
	}
out:
	free(buf);
	return rc;
}

/* sym_tok: which token each interned byte string is (after the merges added theirs). */
static int tok_map_syms(tokenizer *t)
{
	uint8_t *buf = malloc(t->texts.arena_len + 1);
	t->sym_tok = malloc((size_t)t->syms.n * sizeof(*t->sym_tok));
	if (!buf || !t->sym_tok) {
		free(buf);
		return ERR_NOMEM;
	}
	for (uint32_t i = 0; i < t->syms.n; i++)
		t->sym_tok[i] = -1;
	for (int32_t id = 0; id < t->n_vocab; id++) {
		size_t m;
		if (tok_byte_map_unspell(&t->bmap, tok_strtab_str(&t->texts, (uint32_t)id),
					 t->texts.len[id], buf, &m))
			continue;
		t->sym_tok[tok_strtab_find(&t->syms, buf, m)] = id;
	}
	free(buf);
	return 0;
}

static int tok_load_merges(tokenizer *t, const gguf *g)
{
	const char *path = gguf_path(g);
	enum gguf_type et;
	uint64_t n;
	const void *data;
	uint8_t *buf = NULL;
	size_t cap = 0;
	uint64_t n_dead = 0;
	int rc = gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n, &data);
	if (rc == ERR_RANGE) {
		log_error("%s: key tokenizer.ggml.merges missing", path);
		return ERR_FORMAT;
	}
	if (rc)
		return rc;
	if (et != GGUF_TYPE_STRING || n > INT32_MAX) {
		log_error("%s: key tokenizer.ggml.merges: expected an array of strings", path);
		return ERR_FORMAT;
	}
	rc = tok_pairtab_init(&t->merges, n);
	if (rc)
		return rc;
	for (uint64_t i = 0; i < n; i++) {
		gguf_str s;
		rc = gguf_get_arr_str(g, "tokenizer.ggml.merges", i, &s);
		if (rc)
			goto out;
		/* "LEFT RIGHT", split at the first space after the first byte (llama.cpp) */
		const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
		if (!sp || (uint64_t)(sp - s.ptr) + 1 == s.len) {
			log_error("%s: key tokenizer.ggml.merges: merge %llu \"%.*s\" is not "
				  "\"LEFT RIGHT\"",
				  path, (unsigned long long)i, (int)(s.len > 64 ? 64 : s.len),
				  s.ptr);
			rc = ERR_FORMAT;
			goto out;
		}
		size_t nl = (size_t)(sp - s.ptr), nr = s.len - nl - 1, ml, mr;
		if (s.len > cap) {
			cap = s.len * 2;
			free(buf);
			buf = malloc(cap);
			if (!buf) {
				rc = ERR_NOMEM;
				goto out;
			}
		}
		if (tok_byte_map_unspell(&t->bmap, (const uint8_t *)s.ptr, nl, buf, &ml) ||
		    tok_byte_map_unspell(&t->bmap, (const uint8_t *)sp + 1, nr, buf + ml, &mr)) {
			n_dead++; /* cannot apply to spelled bytes, as in llama.cpp */
			continue;
		}
		int32_t l, r, res;
		rc = tok_strtab_intern(&t->syms, buf, ml, &l, NULL);
		if (!rc)
			rc = tok_strtab_intern(&t->syms, buf + ml, mr, &r, NULL);
		if (!rc)
			rc = tok_strtab_intern(&t->syms, buf, ml + mr, &res, NULL);
		if (rc)
			goto out;
		uint64_t key = tok_pair_key(l, r);
		uint32_t slot = tok_pairtab_slot(&t->merges, key);
		if (t->merges.key[slot] == key)
			continue; /* a repeated pair keeps its first (lowest) rank */
		t->merges.key[slot] = key;
		t->merges.rank[slot] = (int32_t)i;
		t->merges.res[slot] = res;
		t->merges.n++;
	}
	if (n_dead)
		log_warn("%s: key tokenizer.ggml.merges: %llu merges are not byte spellings and "
			 "never apply",
			 path, (unsigned long long)n_dead);
out:
	free(buf);
	return rc;
}

static int tok_load_special(tokenizer *t, const gguf *g)
{
	const char *path = gguf_path(g);
	int32_t none = -1, fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1,
		fim_sep = -1;
	int rc;

	/* llama.cpp's defaults for "gpt2" vocabularies: BOS = EOS = 11 */
	t->bos = t->n_vocab > 11 ? 11 : -1;
	t->eos = t->bos;
	t->eot = t->eom = -1;
	const struct {
		const char *key;
		int32_t *id;
	} keys[] = {
	    {"tokenizer.ggml.bos_token_id", &t->bos},
	    {"tokenizer.ggml.eos_token_id", &t->eos},
	    {"tokenizer.ggml.eot_token_id", &t->eot},
	    {"tokenizer.ggml.eom_token_id", &t->eom},
	    {"tokenizer.ggml.unknown_token_id", &none},
	    {"tokenizer.ggml.seperator_token_id", &none},
	    {"tokenizer.ggml.padding_token_id", &none},
	    {"tokenizer.ggml.mask_token_id", &none},
	    {"tokenizer.ggml.fim_pre_token_id", &fim_pre},
	    {"tokenizer.ggml.fim_suf_token_id", &fim_suf},
	    {"tokenizer.ggml.fim_mid_token_id", &fim_mid},
	    {"tokenizer.ggml.fim_pad_token_id", &fim_pad},
	    {"tokenizer.ggml.fim_rep_token_id", &fim_rep},
	    {"tokenizer.ggml.fim_sep_token_id", &fim_sep},
	    {"tokenizer.ggml.prefix_token_id", &fim_pre},
	    {"tokenizer.ggml.suffix_token_id", &fim_suf},
	    {"tokenizer.ggml.middle_token_id", &fim_mid},
	};
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		rc = tok_read_id(g, keys[i].key, t->n_vocab, keys[i].id);
		if (rc)
			return rc;
	}
	t->add_bos = 0;
	t->add_eos = 0;
	rc = tok_read_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos);
	if (!rc)
		rc = tok_read_bool(g, "tokenizer.ggml.add_eos_token", &t->add_eos);
	if (rc)
		return rc;
	if (t->add_bos && t->bos < 0) {
		log_error("%s: key tokenizer.ggml.add_bos_token is set but there is no BOS token",
			  path);
		return ERR_FORMAT;
	}
	if (t->add_eos && t->eos < 0) {
		log_error("%s: key tokenizer.ggml.add_eos_token is set but there is no EOS token",
			  path);
		return ERR_FORMAT;
	}

	/* the type fix-ups of llama_vocab::impl::load, in its order; where it takes
	 * the first of several matching tokens in hash order we take the lowest id */
	struct {
		int32_t *id;
		const char *const *texts;
	} detect[] = {
	    {&t->eot, eot_texts},      {&t->eom, eom_texts},	  {&fim_pre, fim_pre_texts},
	    {&fim_suf, fim_suf_texts}, {&fim_mid, fim_mid_texts}, {&fim_pad, fim_pad_texts},
	    {&fim_rep, fim_rep_texts}, {&fim_sep, fim_sep_texts},
	};
	for (size_t i = 0; i < sizeof(detect) / sizeof(detect[0]); i++) {
		if (*detect[i].id >= 0)
			continue;
		*detect[i].id = tok_find_first(t, detect[i].texts);
		tok_force_control(t, *detect[i].id);
	}
	int32_t fim_eog[3] = {fim_pad, fim_rep, fim_sep};
	for (int i = 0; i < 3; i++) {
		if (fim_eog[i] >= 0)
			t->eog[fim_eog[i]] = 1;
	}
	for (int i = 0; eog_texts[i]; i++) {
		int32_t id = tok_find_cstr(t, eog_texts[i]);
		if (id >= 0) {
			t->eog[id] = 1;
			tok_force_control(t, id);
		}
	}
	for (int i = 0; user_defined_texts[i]; i++)
		tok_set_attr(t, user_defined_texts[i], TOKENIZER_ATTR_USER_DEFINED);
	int32_t extra[3] = {t->eos, t->eot, t->eom};
	for (int i = 0; i < 3; i++) {
		if (extra[i] >= 0)
			t->eog[extra[i]] = 1;
	}
	/* o200k_harmony / solar-open: "<|end|>" does not end generation */
	int32_t ret = tok_find_cstr(t, "<|return|>"), call = tok_find_cstr(t, "<|call|>"),
		calls = tok_find_cstr(t, "<|calls|>"), flush = tok_find_cstr(t, "<|flush|>"),
		end = tok_find_cstr(t, "<|end|>");
	int has_call = (call >= 0 && t->eog[call]) || (calls >= 0 && t->eog[calls]);
	int has_return = ret >= 0 && t->eog[ret];
	int has_flush = flush >= 0 && t->eog[flush];
	if (end >= 0 && t->eog[end] && has_call && (has_return || has_flush)) {
		t->eog[end] = 0;
		t->attr[end] = TOKENIZER_ATTR_USER_DEFINED;
	}
	/* gemma4 / paddleocr: "</s>" does not end generation next to "<|tool_response>" */
	int32_t tool = tok_find_cstr(t, "<|tool_response>"), s_end = tok_find_cstr(t, "</s>");
	if (tool >= 0 && t->eog[tool] && s_end >= 0 && t->eog[s_end]) {
		t->eog[s_end] = 0;
		t->attr[s_end] = TOKENIZER_ATTR_NORMAL;
	}
	return 0;
}

int tok_special_order_cmp(const void *a, const void *b)
{
	const struct special_order *x = a, *y = b;
	if (x->len != y->len)
		return x->len > y->len ? -1 : 1;
	return x->id < y->id ? -1 : x->id > y->id;
}

static int tok_build_special(tokenizer *t)
{
	int32_t n = 0;
	for (int32_t id = 0; id < t->n_vocab; id++) {
		if (t->attr[id] &
		    (TOKENIZER_ATTR_CONTROL | TOKENIZER_ATTR_USER_DEFINED | TOKENIZER_ATTR_UNKNOWN))
			n++;
	}
	struct special_order *o = malloc((size_t)(n ? n : 1) * sizeof(*o));
	t->special = malloc((size_t)(n ? n : 1) * sizeof(*t->special));
	if (!o || !t->special) {
		free(o);
		return ERR_NOMEM;
	}
	n = 0;
	for (int32_t id = 0; id < t->n_vocab; id++) {
		if (t->attr[id] &
		    (TOKENIZER_ATTR_CONTROL | TOKENIZER_ATTR_USER_DEFINED | TOKENIZER_ATTR_UNKNOWN))
			o[n++] = (struct special_order){t->texts.len[id], id};
	}
	/* llama.cpp sorts by length only (std::sort, unstable); ties go by id here */
	qsort(o, (size_t)n, sizeof(*o), tok_special_order_cmp);
	for (int32_t i = 0; i < n; i++)
		t->special[i] = o[i].id;
	t->n_special = n;
	/* o is sorted by length, so equal lengths are adjacent */
	for (int32_t i = 0; i < n; i++) {
		if (o[i].len == 0)
			continue;
		t->special_first[tok_strtab_str(&t->texts, (uint32_t)o[i].id)[0]] = 1;
		if (t->n_special_len < 0 ||
		    (t->n_special_len > 0 && t->special_len[t->n_special_len - 1] == o[i].len))
			continue;
		if (t->n_special_len == TOK_MAX_SPECIAL_LENS)
			t->n_special_len = -1;
		else
			t->special_len[t->n_special_len++] = o[i].len;
	}
	free(o);
	return 0;
}

struct dynbuf {
	uint8_t *p;
	size_t len, cap;
};

static int dynbuf_put(struct dynbuf *d, const void *s, size_t n)
{
	if (d->len + n > d->cap) {
		size_t cap = d->cap ? d->cap : 4096;
		while (cap < d->len + n)
			cap *= 2;
		uint8_t *p = realloc(d->p, cap);
		if (!p)
			return ERR_NOMEM;
		d->p = p;
		d->cap = cap;
	}
	if (n)
		memcpy(d->p + d->len, s, n);
	d->len += n;
	return 0;
}

static int hexval(uint8_t c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* A NORMAL token's bytes (llama_decode_text): the GPT-2 spelling undone; a
 * code point that spells no byte gives "[UNK_BYTE_0x<its UTF-8 in hex><text>]". */
static int tok_unspell_piece(const tokenizer *t, const uint8_t *s, size_t n, struct dynbuf *d,
			     int *unk)
{
	int rc = 0;
	for (size_t i = 0; !rc && i < n;) {
		size_t adv;
		uint32_t cpt = tok_utf8_next_lenient(s + i, n - i, &adv);
		i += adv;
		if (cpt < 0x144 && t->bmap.cpt_byte[cpt] >= 0) {
			uint8_t b = (uint8_t)t->bmap.cpt_byte[cpt];
			rc = dynbuf_put(d, &b, 1);
			continue;
		}
		uint8_t u[4];
		char hex[32] = "[UNK_BYTE_0x";
		size_t k = tok_utf8_encode(cpt, u), h = strlen(hex);
		for (size_t j = 0; j < k; j++)
			h += (size_t)snprintf(hex + h, sizeof(hex) - h, "%02x", u[j]);
		rc = dynbuf_put(d, hex, h);
		if (!rc)
			rc = dynbuf_put(d, s, n);
		if (!rc)
			rc = dynbuf_put(d, "]", 1);
		*unk = 1;
	}
	return rc;
}

/* The special=1 piece of every token (llama.cpp token_to_piece). */
static int tok_build_pieces(tokenizer *t, const char *path)
{
	struct dynbuf d = {0};
	int32_t n_unk = 0;
	int rc = 0;

	t->piece_off = malloc((size_t)t->n_vocab * sizeof(*t->piece_off));
	t->piece_len = malloc((size_t)t->n_vocab * sizeof(*t->piece_len));
	if (!t->piece_off || !t->piece_len)
		return ERR_NOMEM;
	for (int32_t id = 0; !rc && id < t->n_vocab; id++) {
		const uint8_t *s = tok_strtab_str(&t->texts, (uint32_t)id);
		size_t n = t->texts.len[id];
		uint8_t attr = t->attr[id];
		t->piece_off[id] = d.len;
		if (attr & (TOKENIZER_ATTR_UNKNOWN | TOKENIZER_ATTR_CONTROL |
			    TOKENIZER_ATTR_USER_DEFINED)) {
			rc = dynbuf_put(&d, s, n);
		} else if (attr & TOKENIZER_ATTR_NORMAL) {
			int unk = 0;
			rc = tok_unspell_piece(t, s, n, &d, &unk);
			n_unk += unk;
		} else if (attr & TOKENIZER_ATTR_BYTE) {
			if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>' || hexval(s[3]) < 0 ||
			    hexval(s[4]) < 0) {
				log_error(
				    "%s: key tokenizer.ggml.tokens: BYTE token %d is not <0xHH>",
				    path, id);
				rc = ERR_FORMAT;
				break;
			}
			uint8_t b = (uint8_t)(hexval(s[3]) * 16 + hexval(s[4]));
			rc = dynbuf_put(&d, &b, 1);
		}
		if (d.len - t->piece_off[id] > UINT32_MAX)
			rc = ERR_RANGE;
		t->piece_len[id] = (uint32_t)(d.len - t->piece_off[id]);
		if (t->piece_len[id] > t->max_piece)
			t->max_piece = t->piece_len[id];
	}
	if (rc) {
		free(d.p);
		return rc;
	}
	if (n_unk)
		log_warn("%s: key tokenizer.ggml.tokens: %d tokens are not GPT-2 byte spellings",
			 path, n_unk);
	t->piece_arena = d.p;
	return 0;
}

static int tok_check_vocab_size(const tokenizer *t, const gguf *g)
{
	char arch[64], key[96];
	uint32_t v;
	if (gguf_get_cstr(g, "general.architecture", arch, sizeof(arch)))
		return 0;
	snprintf(key, sizeof(key), "%s.vocab_size", arch);
	int rc = gguf_get_u32(g, key, &v);
	if (rc == ERR_RANGE)
		return 0;
	if (rc)
		return rc;
	if (v != (uint32_t)t->n_vocab) {
		log_error("%s: key %s is %u but tokenizer.ggml.tokens has %d tokens", gguf_path(g),
			  key, v, t->n_vocab);
		return ERR_FORMAT;
	}
	return 0;
}

int tokenizer_new(const gguf *g, tokenizer **out)
{
	const char *path = gguf_path(g);
	tokenizer *t = calloc(1, sizeof(*t));
	gguf_str model;
	int rc;

	*out = NULL;
	if (!t)
		return ERR_NOMEM;
	tok_byte_map_init(&t->bmap);
	rc = gguf_get_str(g, "tokenizer.ggml.model", &model);
	if (rc == ERR_RANGE) {
		log_error("%s: key tokenizer.ggml.model missing", path);
		rc = ERR_FORMAT;
	}
	if (rc)
		goto out;
	if (model.len != 4 || memcmp(model.ptr, "gpt2", 4) != 0) {
		log_error(
		    "%s: key tokenizer.ggml.model: unsupported tokenizer \"%.*s\" (only gpt2)",
		    path, (int)(model.len > 64 ? 64 : model.len), model.ptr);
		rc = ERR_FORMAT;
		goto out;
	}
	rc = tok_load_pre(t, g);
	if (!rc)
		rc = tok_load_tokens(t, g);
	if (!rc)
		rc = tok_check_vocab_size(t, g);
	if (!rc)
		rc = tok_build_syms(t);
	if (!rc)
		rc = tok_load_merges(t, g);
	if (!rc)
		rc = tok_map_syms(t);
	if (!rc)
		rc = tok_load_special(t, g);
	if (!rc)
		rc = tok_build_special(t);
	if (!rc)
		rc = tok_build_pieces(t, path);
out:
	if (rc) {
		if (rc == ERR_NOMEM)
			log_error("%s: out of memory loading the tokenizer", path);
		else if (rc == ERR_RANGE)
			log_error("%s: the tokenizer is too large (over 4 GB of text)", path);
		tokenizer_destroy(&t);
		return rc;
	}
	*out = t;
	return 0;
}

void tokenizer_destroy(tokenizer **pt)
{
	tokenizer *t = *pt;
	if (!t)
		return;
	for (int i = 0; i < TOK_MAX_REGEX; i++)
		pcre2_code_free(t->re[i]);
	tok_strtab_free(&t->texts);
	tok_strtab_free(&t->syms);
	tok_pairtab_free(&t->merges);
	free(t->attr);
	free(t->eog);
	free(t->piece_arena);
	free(t->piece_off);
	free(t->piece_len);
	free(t->sym_tok);
	free(t->special);
	free(t);
	*pt = NULL;
}

static const uint8_t *tok_piece_ref(const tokenizer *t, int32_t id, int special, size_t *len)
{
	if (!special && (t->attr[id] & (TOKENIZER_ATTR_UNKNOWN | TOKENIZER_ATTR_CONTROL))) {
		*len = 0;
		return t->piece_arena;
	}
	*len = t->piece_len[id];
	return t->piece_arena + t->piece_off[id];
}

int tokenizer_piece(const tokenizer *t, int32_t id, int special, char *buf, size_t cap,
		    size_t *n_out)
{
	size_t n;
	*n_out = 0;
	if (id < 0 || id >= t->n_vocab)
		return ERR_RANGE;
	const uint8_t *p = tok_piece_ref(t, id, special, &n);
	*n_out = n;
	if (n > cap)
		return ERR_RANGE;
	if (n)
		memcpy(buf, p, n);
	return 0;
}

size_t tokenizer_max_piece(const tokenizer *t)
{
	return t->max_piece;
}
int32_t tokenizer_n_vocab(const tokenizer *t)
{
	return t->n_vocab;
}
int32_t tokenizer_bos(const tokenizer *t)
{
	return t->bos;
}
int32_t tokenizer_eos(const tokenizer *t)
{
	return t->eos;
}
int tokenizer_add_bos(const tokenizer *t)
{
	return t->add_bos;
}
int tokenizer_add_eos(const tokenizer *t)
{
	return t->add_eos;
}
const char *tokenizer_pre_name(const tokenizer *t)
{
	return t->pre->name;
}

int tokenizer_is_eog(const tokenizer *t, int32_t id)
{
	return id >= 0 && id < t->n_vocab && t->eog[id];
}

int tokenizer_attr(const tokenizer *t, int32_t id)
{
	return id >= 0 && id < t->n_vocab ? t->attr[id] : 0;
}

int32_t tokenizer_find(const tokenizer *t, const char *text, size_t len)
{
	return tok_strtab_find(&t->texts, (const uint8_t *)text, len);
}

struct tokenizer_stream {
	const tokenizer *t;
	int special;
	uint8_t pend[4];
	size_t n_pend;
};

int tokenizer_stream_new(const tokenizer *t, int special, tokenizer_stream **out)
{
	tokenizer_stream *s = calloc(1, sizeof(*s));
	*out = NULL;
	if (!s)
		return ERR_NOMEM;
	s->t = t;
	s->special = special;
	*out = s;
	return 0;
}

void tokenizer_stream_destroy(tokenizer_stream **s)
{
	free(*s);
	*s = NULL;
}

size_t tokenizer_stream_bound(const tokenizer_stream *s)
{
	return 3 * (s->t->max_piece + 4);
}

/* Decodes pend ++ b (WHATWG UTF-8 decoder with U+FFFD replacement): writes the
 * complete characters (up to cap bytes, counting all in *n_out) and stores an
 * incomplete tail in tail[] (or, when final, replaces it). */
static void stream_decode(const uint8_t *a, size_t na, const uint8_t *b, size_t nb, int final,
			  uint8_t *out, size_t cap, size_t *n_out, uint8_t *tail, size_t *n_tail)
{
	static const uint8_t repl[3] = {0xEF, 0xBF, 0xBD};
	size_t n = na + nb, o = 0, i = 0;
#define AT(k) ((k) < na ? a[(k)] : b[(k)-na])
#define PUT(byte)                                                                                  \
	do {                                                                                       \
		if (o < cap)                                                                       \
			out[o] = (byte);                                                           \
		o++;                                                                               \
	} while (0)

	*n_tail = 0;
	while (i < n) {
		uint8_t c = AT(i);
		size_t need;
		uint8_t lo = 0x80, hi = 0xBF;
		if (c < 0x80) {
			PUT(c);
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF) {
			need = 1;
		} else if (c >= 0xE0 && c <= 0xEF) {
			need = 2;
			if (c == 0xE0)
				lo = 0xA0;
			if (c == 0xED)
				hi = 0x9F;
		} else if (c >= 0xF0 && c <= 0xF4) {
			need = 3;
			if (c == 0xF0)
				lo = 0x90;
			if (c == 0xF4)
				hi = 0x8F;
		} else {
			for (int k = 0; k < 3; k++)
				PUT(repl[k]);
			i++;
			continue;
		}
		size_t j = 1;
		for (; j <= need && i + j < n; j++) {
			uint8_t x = AT(i + j);
			if (x < lo || x > hi)
				break;
			lo = 0x80;
			hi = 0xBF;
		}
		if (j > need) {
			for (size_t k = 0; k <= need; k++)
				PUT(AT(i + k));
			i += need + 1;
		} else if (i + j >= n && !final) {
			for (size_t k = i; k < n; k++)
				tail[(*n_tail)++] = AT(k);
			i = n;
		} else {
			/* a maximal invalid subsequence: one U+FFFD, then resume at the bad byte */
			for (int k = 0; k < 3; k++)
				PUT(repl[k]);
			i += j;
		}
	}
#undef AT
#undef PUT
	*n_out = o;
}

static int stream_run(tokenizer_stream *s, const uint8_t *p, size_t np, int final, char *buf,
		      size_t cap, size_t *n_out)
{
	uint8_t tail[4];
	size_t n_tail, n;
	stream_decode(s->pend, s->n_pend, p, np, final, (uint8_t *)buf, cap, &n, tail, &n_tail);
	*n_out = n;
	if (n > cap)
		return ERR_RANGE; /* nothing consumed: the caller retries with *n_out bytes */
	memcpy(s->pend, tail, n_tail);
	s->n_pend = n_tail;
	return 0;
}

int tokenizer_stream_push(tokenizer_stream *s, int32_t id, char *buf, size_t cap, size_t *n_out)
{
	size_t np;
	*n_out = 0;
	if (id < 0 || id >= s->t->n_vocab)
		return ERR_RANGE;
	const uint8_t *p = tok_piece_ref(s->t, id, s->special, &np);
	return stream_run(s, p, np, 0, buf, cap, n_out);
}

int tokenizer_stream_flush(tokenizer_stream *s, char *buf, size_t cap, size_t *n_out)
{
	return stream_run(s, NULL, 0, 1, buf, cap, n_out);
}
