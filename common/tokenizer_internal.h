/* tokenizer_internal: what the parts of the tokenizer share -- the
 * tokenizer's state, its hash tables and byte map, and the functions one part
 * calls in another.  Only common/tokenizer*.c include it; the module's
 * contract is tokenizer.h. */
#ifndef MOEFLEET_TOKENIZER_INTERNAL_H
#define MOEFLEET_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "tokenizer.h"

#define TOK_MAX_REGEX	     4
#define TOK_MAX_SPECIAL_LENS 64

struct pretok_def {
	const char *name;  /* tokenizer.ggml.pre */
	int ignore_merges; /* a piece that is a whole token is not merged */
	int n_regex;
	const char *regex[TOK_MAX_REGEX];
};

/* GPT-2's byte -> code point spelling: printable bytes stand for themselves,
 * the other 68 are mapped to U+0100.. in byte order. */
struct byte_map {
	uint16_t byte_cpt[256];
	int16_t cpt_byte[0x144]; /* -1: not a byte's spelling */
};

/* An interning string table: each distinct byte string gets the next index. */
struct strtab {
	uint8_t *arena;
	size_t arena_len, arena_cap;
	uint32_t *off, *len;
	uint32_t n, cap;
	int32_t *slots; /* index or -1 */
	uint32_t n_slots;
};

/* Merge ranks: (left symbol, right symbol) -> (rank, merged symbol). */
struct pairtab {
	uint64_t *key; /* UINT64_MAX: empty */
	int32_t *rank;
	int32_t *res;
	uint32_t n, n_slots;
};

struct tokenizer {
	const struct pretok_def *pre;
	pcre2_code *re[TOK_MAX_REGEX];

	int32_t n_vocab;
	struct strtab texts; /* token texts as stored; index = token id */
	uint8_t *attr;	     /* enum tokenizer_attr bits */
	uint8_t *eog;
	uint8_t *piece_arena; /* the special=1 piece of each token */
	size_t *piece_off;
	uint32_t *piece_len;
	size_t max_piece;

	struct byte_map bmap;
	struct strtab syms; /* byte strings: every reachable token, merge side and result */
	int32_t *sym_tok;   /* syms index -> token id or -1 */
	int32_t byte_sym[256];
	int32_t text1_tok[256]; /* the token whose stored text is this one byte, or -1 */
	struct pairtab merges;

	int32_t *special; /* CONTROL / USER_DEFINED / UNKNOWN ids, longest text first */
	int32_t n_special;
	/* for finding which special texts occur in a text: their distinct lengths
	 * (-1: more than TOK_MAX_SPECIAL_LENS, no prefilter) and first bytes */
	int32_t n_special_len;
	uint32_t special_len[TOK_MAX_SPECIAL_LENS];
	uint8_t special_first[256];

	int32_t bos, eos, eot, eom;
	int add_bos, add_eos;
};

struct special_order {
	uint32_t len;
	int32_t id;
};

/* tokenizer.c */
int tok_special_order_cmp(const void *a, const void *b);

/* tokenizer_pretok.c */
size_t tok_utf8_encode(uint32_t cpt, uint8_t *out);
uint32_t tok_utf8_next_lenient(const uint8_t *s, size_t n, size_t *adv);
uint32_t tok_proxy_cpt(uint32_t cpt);
void tok_byte_map_init(struct byte_map *m);
int tok_byte_map_unspell(const struct byte_map *m, const uint8_t *s, size_t n, uint8_t *out,
			 size_t *n_out);
int tok_load_pre(tokenizer *t, const gguf *g);

/* tokenizer_bpe.c */
void tok_strtab_free(struct strtab *t);
const uint8_t *tok_strtab_str(const struct strtab *t, uint32_t i);
int32_t tok_strtab_find(const struct strtab *t, const uint8_t *s, size_t n);
int tok_strtab_intern(struct strtab *t, const uint8_t *s, size_t n, int32_t *idx, int *added);
void tok_pairtab_free(struct pairtab *p);
int tok_pairtab_init(struct pairtab *p, uint64_t n_expected);
uint64_t tok_pair_key(int32_t l, int32_t r);
uint32_t tok_pairtab_slot(const struct pairtab *p, uint64_t key);

#endif
