/* tokenizer: byte-level BPE as llama.cpp does it (see tokenizer.h).
 *
 * Layout of this file:
 *   - pre-tokenizers: one table row per tokenizer.ggml.pre value, each a list
 *     of PCRE2 regexes applied in turn;
 *   - Unicode helpers: llama.cpp's lenient UTF-8 decoding, the GPT-2
 *     byte <-> code point map, the category patch for PCRE2;
 *   - string and pair hash tables;
 *   - loading (tokens, types, merges, special ids, llama.cpp's type fix-ups);
 *   - encoding: special-token partition, regex split, BPE;
 *   - pieces and the incremental decoder.
 *
 * BPE works on raw bytes instead of GPT-2-spelled text: every token and every
 * merge side is converted back to bytes at load and interned, so a symbol is
 * an interned string id and a merge is a lookup of an id pair.  That is the
 * same computation as llama.cpp's (the spelling is a bijection) without string
 * hashing at encode time. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "log.h"

/* ------------------------------------------------------------ pre-tokenizers */

#define TOK_MAX_REGEX	     4
#define TOK_MAX_SPECIAL_LENS 64

struct pretok_def {
	const char *name;  /* tokenizer.ggml.pre */
	int ignore_merges; /* a piece that is a whole token is not merged */
	int n_regex;
	const char *regex[TOK_MAX_REGEX];
};

/* llama.cpp's \s: its unicode_set_whitespace (the Unicode White_Space
 * property), spelled out because PCRE2's \s also takes U+180E. */
#define WS                                                                                         \
	"\\t\\n\\x0b\\f\\r \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}"  \
	"\\x{205f}\\x{3000}"
#define RE_S		"[" WS "]"
#define RE_NS		"[^" WS "]"
#define RE_CONTRACTIONS "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

/* The regex lists of llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp),
 * with \s and \S written as RE_S and RE_NS, and gpt-4o's letter runs
 * "((?=[\p{L}])([^a-z]))*" written as the class "[^\P{L}a-z]*" (the same
 * characters one at a time, without a stack frame per character).  llama.cpp runs some of them
 * through hand-written splitters (unicode.cpp: the GPT-2 and Qwen2 ones); those
 * give the same pieces as the regex with its gaps kept as pieces, which is
 * what tok_regex_split() does.  To add a pre-tokenizer, add a row. */
/* clang-format off */
static const struct pretok_def pretok_defs[] = {
	{"default", 0, 4, {
		"[\\p{P}\\$\\+<=>\\^~\\|]+",
		"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|" RE_S "+(?!" RE_NS ")",
		"\\p{N}+",
		"[0-9][0-9][0-9]",
	}},
	{"deepseek-v3", 0, 3, {
		"\\p{N}{1,3}",
		"[\\x{4e00}-\\x{9fa5}\\x{3040}-\\x{309f}\\x{30a0}-\\x{30ff}]+",
		"[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
		"|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
		"| ?[\\p{P}\\p{S}]+[\\r\\n]*"
		"|" RE_S "*[\\r\\n]+|" RE_S "+(?!" RE_NS ")|" RE_S "+",
	}},
	{"qwen2", 0, 1, {
		RE_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
		"| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*"
		"|" RE_S "*[\\r\\n]+|" RE_S "+(?!" RE_NS ")|" RE_S "+",
	}},
	{"gpt-4o", 0, 1, {
		"[^\\r\\n\\p{L}\\p{N}]?[^\\P{L}a-z]*[^\\P{L}A-Z]+" RE_CONTRACTIONS "?"
		"|[^\\r\\n\\p{L}\\p{N}]?[^\\P{L}a-z]+[^\\P{L}A-Z]*" RE_CONTRACTIONS "?"
		"|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n/]*"
		"|" RE_S "*[\\r\\n]+|" RE_S "+(?!" RE_NS ")|" RE_S "+",
	}},
};
/* clang-format on */

/* ------------------------------------------------------------ Unicode */

/* Code points llama.cpp's tables (Unicode 15.1) give a category that PCRE2
 * 10.42 (Unicode 14) does not know: they are unassigned there.  Measured by
 * comparing every code point of llama.cpp's unicode_ranges_flags with PCRE2's
 * \p{N} \p{L} \p{M} \p{P} \p{S}; all other code points agree.  The proxy
 * text handed to PCRE2 replaces them by a stand-in of the same category and
 * encoded length (tok_proxy_cpt). */
enum { CAT_N = 1, CAT_L, CAT_M, CAT_P, CAT_S };

static const struct {
	uint32_t lo, hi;
	uint8_t cat;
} uni_patch[] = {
    {0x0CF3, 0x0CF3, CAT_M},   {0x0ECE, 0x0ECE, CAT_M},	  {0x2FFC, 0x2FFF, CAT_S},
    {0x31EF, 0x31EF, CAT_S},   {0x10EFD, 0x10EFF, CAT_M}, {0x1123F, 0x11240, CAT_L},
    {0x11241, 0x11241, CAT_M}, {0x11B00, 0x11B09, CAT_P}, {0x11F00, 0x11F01, CAT_M},
    {0x11F02, 0x11F02, CAT_L}, {0x11F03, 0x11F03, CAT_M}, {0x11F04, 0x11F10, CAT_L},
    {0x11F12, 0x11F33, CAT_L}, {0x11F34, 0x11F3A, CAT_M}, {0x11F3E, 0x11F42, CAT_M},
    {0x11F43, 0x11F4F, CAT_P}, {0x11F50, 0x11F59, CAT_N}, {0x1342F, 0x1342F, CAT_L},
    {0x13440, 0x13440, CAT_M}, {0x13441, 0x13446, CAT_L}, {0x13447, 0x13455, CAT_M},
    {0x1B132, 0x1B132, CAT_L}, {0x1B155, 0x1B155, CAT_L}, {0x1D2C0, 0x1D2D3, CAT_N},
    {0x1DF25, 0x1DF2A, CAT_L}, {0x1E030, 0x1E06D, CAT_L}, {0x1E08F, 0x1E08F, CAT_M},
    {0x1E4D0, 0x1E4EB, CAT_L}, {0x1E4EC, 0x1E4EF, CAT_M}, {0x1E4F0, 0x1E4F9, CAT_N},
    {0x1F6DC, 0x1F6DC, CAT_S}, {0x1F774, 0x1F776, CAT_S}, {0x1F77B, 0x1F77F, CAT_S},
    {0x1F7D9, 0x1F7D9, CAT_S}, {0x1FA75, 0x1FA77, CAT_S}, {0x1FA87, 0x1FA88, CAT_S},
    {0x1FAAD, 0x1FAAF, CAT_S}, {0x1FABB, 0x1FABD, CAT_S}, {0x1FABF, 0x1FABF, CAT_S},
    {0x1FACE, 0x1FACF, CAT_S}, {0x1FADA, 0x1FADB, CAT_S}, {0x1FAE8, 0x1FAE8, CAT_S},
    {0x1FAF7, 0x1FAF8, CAT_S}, {0x2B739, 0x2B739, CAT_L}, {0x2EBF0, 0x2EE5D, CAT_L},
    {0x31350, 0x323AF, CAT_L},
};

/* Stand-ins known to PCRE2 10.42, per category, for 3- and 4-byte code
 * points.  The letters avoid every range a pre-tokenizer names explicitly
 * (ASCII, deepseek-v3's CJK and kana block). */
static const uint32_t uni_standin[6][2] = {
    [CAT_N] = {0x0966, 0x10107}, /* DEVANAGARI DIGIT ZERO, AEGEAN NUMBER ONE */
    [CAT_L] = {0xA000, 0x10000}, /* YI SYLLABLE IT, LINEAR B SYLLABLE B008 A */
    [CAT_M] = {0x0900, 0x101FD}, /* DEVANAGARI SIGN INVERTED CANDRABINDU, PHAISTOS ... STROKE */
    [CAT_P] = {0x2010, 0x10100}, /* HYPHEN, AEGEAN WORD SEPARATOR LINE */
    [CAT_S] = {0x2190, 0x10137}, /* LEFTWARDS ARROW, AEGEAN WEIGHT BASE UNIT */
};

#define CPT_REPLACEMENT 0xFFFD

static size_t utf8_encode(uint32_t cpt, uint8_t *out)
{
	if (cpt < 0x80) {
		out[0] = (uint8_t)cpt;
		return 1;
	}
	if (cpt < 0x800) {
		out[0] = (uint8_t)(0xC0 | (cpt >> 6));
		out[1] = (uint8_t)(0x80 | (cpt & 0x3F));
		return 2;
	}
	if (cpt < 0x10000) {
		out[0] = (uint8_t)(0xE0 | (cpt >> 12));
		out[1] = (uint8_t)(0x80 | ((cpt >> 6) & 0x3F));
		out[2] = (uint8_t)(0x80 | (cpt & 0x3F));
		return 3;
	}
	out[0] = (uint8_t)(0xF0 | (cpt >> 18));
	out[1] = (uint8_t)(0x80 | ((cpt >> 12) & 0x3F));
	out[2] = (uint8_t)(0x80 | ((cpt >> 6) & 0x3F));
	out[3] = (uint8_t)(0x80 | (cpt & 0x3F));
	return 4;
}

/* One code point as llama.cpp's unicode_cpt_from_utf8 reads it: the lead
 * byte's length, continuation bytes checked, no check for overlong forms or
 * surrogates.  Anything else is one invalid byte, read as U+FFFD (llama.cpp
 * unicode_cpts_from_utf8); so are values above U+10FFFF, which llama.cpp
 * accepts here and then aborts on. */
static uint32_t utf8_next_lenient(const uint8_t *s, size_t n, size_t *adv)
{
	uint8_t c = s[0];
	size_t len;
	uint32_t cpt;

	*adv = 1;
	if (c < 0x80)
		return c;
	if (!(c & 0x40))
		return CPT_REPLACEMENT;
	if (!(c & 0x20)) {
		len = 2;
		cpt = c & 0x1F;
	} else if (!(c & 0x10)) {
		len = 3;
		cpt = c & 0x0F;
	} else if (!(c & 0x08)) {
		len = 4;
		cpt = c & 0x07;
	} else {
		return CPT_REPLACEMENT;
	}
	if (len > n)
		return CPT_REPLACEMENT;
	for (size_t k = 1; k < len; k++) {
		if ((s[k] & 0xC0) != 0x80)
			return CPT_REPLACEMENT;
		cpt = (cpt << 6) | (s[k] & 0x3F);
	}
	if (cpt > 0x10FFFF)
		return CPT_REPLACEMENT;
	*adv = len;
	return cpt;
}

static int uni_patch_cat(uint32_t cpt)
{
	size_t lo = 0, hi = sizeof(uni_patch) / sizeof(uni_patch[0]);
	if (cpt < uni_patch[0].lo)
		return 0;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (cpt < uni_patch[mid].lo)
			hi = mid;
		else if (cpt > uni_patch[mid].hi)
			lo = mid + 1;
		else
			return uni_patch[mid].cat;
	}
	return 0;
}

/* The code point PCRE2 sees in place of cpt (same UTF-8 length). */
static uint32_t tok_proxy_cpt(uint32_t cpt)
{
	if (cpt >= 0xD800 && cpt <= 0xDFFF)
		return 0xE000; /* a surrogate: "other" for every class, like llama.cpp's Cs */
	int cat = uni_patch_cat(cpt);
	if (cat)
		return uni_standin[cat][cpt >= 0x10000];
	return cpt;
}

/* GPT-2's byte -> code point spelling: printable bytes stand for themselves,
 * the other 68 are mapped to U+0100.. in byte order. */
struct byte_map {
	uint16_t byte_cpt[256];
	int16_t cpt_byte[0x144]; /* -1: not a byte's spelling */
};

static void byte_map_init(struct byte_map *m)
{
	int n = 0;
	for (int c = 0; c < 0x144; c++)
		m->cpt_byte[c] = -1;
	for (int b = 0; b < 256; b++) {
		int self = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
		int cpt = self ? b : 256 + n++;
		m->byte_cpt[b] = (uint16_t)cpt;
		m->cpt_byte[cpt] = (int16_t)b;
	}
}

/* Converts GPT-2-spelled text back to bytes.  Only canonical 1- and 2-byte
 * UTF-8 can spell a byte; returns 0 and the length in *n_out, or -1 if the
 * text is not a byte spelling (such a token or merge can never be reached by
 * BPE over spelled bytes). */
static int byte_map_unspell(const struct byte_map *m, const uint8_t *s, size_t n, uint8_t *out,
			    size_t *n_out)
{
	size_t o = 0;
	for (size_t i = 0; i < n;) {
		uint32_t cpt;
		if (s[i] < 0x80) {
			cpt = s[i];
			i += 1;
		} else if (s[i] >= 0xC2 && s[i] <= 0xDF && i + 1 < n && (s[i + 1] & 0xC0) == 0x80) {
			cpt = ((uint32_t)(s[i] & 0x1F) << 6) | (s[i + 1] & 0x3F);
			i += 2;
		} else {
			return -1;
		}
		if (cpt >= 0x144 || m->cpt_byte[cpt] < 0)
			return -1;
		out[o++] = (uint8_t)m->cpt_byte[cpt];
	}
	*n_out = o;
	return 0;
}

/* ------------------------------------------------------------ hash tables */

static uint64_t hash_bytes(const uint8_t *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= s[i];
		h *= 0x100000001b3ull;
	}
	return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

/* An interning string table: each distinct byte string gets the next index. */
struct strtab {
	uint8_t *arena;
	size_t arena_len, arena_cap;
	uint32_t *off, *len;
	uint32_t n, cap;
	int32_t *slots; /* index or -1 */
	uint32_t n_slots;
};

static void strtab_free(struct strtab *t)
{
	free(t->arena);
	free(t->off);
	free(t->len);
	free(t->slots);
	memset(t, 0, sizeof(*t));
}

static const uint8_t *strtab_str(const struct strtab *t, uint32_t i)
{
	return t->arena + t->off[i];
}

static int32_t strtab_find(const struct strtab *t, const uint8_t *s, size_t n)
{
	if (t->n_slots == 0)
		return -1;
	uint32_t mask = t->n_slots - 1;
	for (uint32_t h = (uint32_t)hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
		int32_t i = t->slots[h];
		if (i < 0)
			return -1;
		if (t->len[i] == n && memcmp(strtab_str(t, (uint32_t)i), s, n) == 0)
			return i;
	}
}

static int strtab_rehash(struct strtab *t, uint32_t n_slots)
{
	int32_t *slots = malloc((size_t)n_slots * sizeof(*slots));
	if (!slots)
		return ERR_NOMEM;
	for (uint32_t i = 0; i < n_slots; i++)
		slots[i] = -1;
	for (uint32_t i = 0; i < t->n; i++) {
		uint32_t h = (uint32_t)hash_bytes(strtab_str(t, i), t->len[i]) & (n_slots - 1);
		while (slots[h] >= 0)
			h = (h + 1) & (n_slots - 1);
		slots[h] = (int32_t)i;
	}
	free(t->slots);
	t->slots = slots;
	t->n_slots = n_slots;
	return 0;
}

/* *idx = the string's index; *added = 1 if it was new. */
static int strtab_intern(struct strtab *t, const uint8_t *s, size_t n, int32_t *idx, int *added)
{
	int32_t i = strtab_find(t, s, n);
	if (added)
		*added = i < 0;
	if (i >= 0) {
		*idx = i;
		return 0;
	}
	if (n > UINT32_MAX || t->arena_len + n > UINT32_MAX || t->n >= INT32_MAX / 2)
		return ERR_RANGE;
	if ((uint64_t)(t->n + 1) * 2 > t->n_slots) {
		int rc = strtab_rehash(t, t->n_slots ? t->n_slots * 2 : 1024);
		if (rc)
			return rc;
	}
	if (t->n == t->cap) {
		uint32_t cap = t->cap ? t->cap * 2 : 1024;
		uint32_t *off = realloc(t->off, (size_t)cap * sizeof(*off));
		if (!off)
			return ERR_NOMEM;
		t->off = off;
		uint32_t *len = realloc(t->len, (size_t)cap * sizeof(*len));
		if (!len)
			return ERR_NOMEM;
		t->len = len;
		t->cap = cap;
	}
	if (t->arena_len + n > t->arena_cap) {
		size_t cap = t->arena_cap ? t->arena_cap : 4096;
		while (cap < t->arena_len + n)
			cap *= 2;
		uint8_t *a = realloc(t->arena, cap);
		if (!a)
			return ERR_NOMEM;
		t->arena = a;
		t->arena_cap = cap;
	}
	if (n)
		memcpy(t->arena + t->arena_len, s, n);
	t->off[t->n] = (uint32_t)t->arena_len;
	t->len[t->n] = (uint32_t)n;
	t->arena_len += n;
	i = (int32_t)t->n++;
	uint32_t mask = t->n_slots - 1;
	uint32_t h = (uint32_t)hash_bytes(s, n) & mask;
	while (t->slots[h] >= 0)
		h = (h + 1) & mask;
	t->slots[h] = i;
	*idx = i;
	return 0;
}

/* Merge ranks: (left symbol, right symbol) -> (rank, merged symbol). */
struct pairtab {
	uint64_t *key; /* UINT64_MAX: empty */
	int32_t *rank;
	int32_t *res;
	uint32_t n, n_slots;
};

static void pairtab_free(struct pairtab *p)
{
	free(p->key);
	free(p->rank);
	free(p->res);
	memset(p, 0, sizeof(*p));
}

static int pairtab_init(struct pairtab *p, uint64_t n_expected)
{
	uint32_t n_slots = 1024;
	while (n_slots < n_expected * 2 && n_slots < (1u << 31))
		n_slots *= 2;
	p->key = malloc((size_t)n_slots * sizeof(*p->key));
	p->rank = malloc((size_t)n_slots * sizeof(*p->rank));
	p->res = malloc((size_t)n_slots * sizeof(*p->res));
	if (!p->key || !p->rank || !p->res)
		return ERR_NOMEM;
	for (uint32_t i = 0; i < n_slots; i++)
		p->key[i] = UINT64_MAX;
	p->n_slots = n_slots;
	return 0;
}

static uint64_t pair_key(int32_t l, int32_t r)
{
	return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r;
}

/* Returns the slot of (l, r): occupied by it or the empty slot where it goes. */
static uint32_t pairtab_slot(const struct pairtab *p, uint64_t key)
{
	uint32_t mask = p->n_slots - 1;
	uint32_t h = (uint32_t)hash_u64(key) & mask;
	while (p->key[h] != UINT64_MAX && p->key[h] != key)
		h = (h + 1) & mask;
	return h;
}

/* ------------------------------------------------------------ the tokenizer */

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
	return strtab_find(&t->texts, (const uint8_t *)s, strlen(s));
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

static int tok_load_pre(tokenizer *t, const gguf *g)
{
	const char *path = gguf_path(g);
	gguf_str s;
	int rc = gguf_get_str(g, "tokenizer.ggml.pre", &s);
	if (rc == ERR_RANGE) {
		log_warn("%s: key tokenizer.ggml.pre missing, using the \"default\" pre-tokenizer",
			 path);
		t->pre = &pretok_defs[0];
	} else if (rc) {
		return rc;
	} else {
		for (size_t i = 0; i < sizeof(pretok_defs) / sizeof(pretok_defs[0]); i++) {
			if (strlen(pretok_defs[i].name) == s.len &&
			    memcmp(pretok_defs[i].name, s.ptr, s.len) == 0)
				t->pre = &pretok_defs[i];
		}
		if (!t->pre) {
			log_error("%s: key tokenizer.ggml.pre: unsupported pre-tokenizer \"%.*s\"",
				  path, (int)(s.len > 64 ? 64 : s.len), s.ptr);
			return ERR_FORMAT;
		}
	}
	for (int i = 0; i < t->pre->n_regex; i++) {
		int code;
		PCRE2_SIZE at;
		t->re[i] = pcre2_compile((PCRE2_SPTR)t->pre->regex[i], PCRE2_ZERO_TERMINATED,
					 PCRE2_UTF | PCRE2_UCP, &code, &at, NULL);
		if (!t->re[i]) {
			PCRE2_UCHAR msg[256];
			pcre2_get_error_message(code, msg, sizeof(msg));
			log_error("tokenizer: pre-tokenizer %s regex %d: %s at offset %zu",
				  t->pre->name, i, (const char *)msg, (size_t)at);
			return ERR_CONFIG;
		}
		/* JIT is only a speed-up: without it pcre2_match interprets */
		(void)pcre2_jit_compile(t->re[i], PCRE2_JIT_COMPLETE);
	}
	return 0;
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
		rc = strtab_intern(&t->texts, (const uint8_t *)s.ptr, s.len, &idx, &added);
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
		rc = strtab_intern(&t->syms, &c, 1, &t->byte_sym[b], NULL);
		if (rc)
			goto out;
		t->text1_tok[b] = strtab_find(&t->texts, &c, 1);
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
		if (byte_map_unspell(&t->bmap, strtab_str(&t->texts, (uint32_t)id), n, buf, &m))
			continue;
		rc = strtab_intern(&t->syms, buf, m, &sid, NULL);
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
		if (byte_map_unspell(&t->bmap, strtab_str(&t->texts, (uint32_t)id),
				     t->texts.len[id], buf, &m))
			continue;
		t->sym_tok[strtab_find(&t->syms, buf, m)] = id;
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
	rc = pairtab_init(&t->merges, n);
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
		if (byte_map_unspell(&t->bmap, (const uint8_t *)s.ptr, nl, buf, &ml) ||
		    byte_map_unspell(&t->bmap, (const uint8_t *)sp + 1, nr, buf + ml, &mr)) {
			n_dead++; /* cannot apply to spelled bytes, as in llama.cpp */
			continue;
		}
		int32_t l, r, res;
		rc = strtab_intern(&t->syms, buf, ml, &l, NULL);
		if (!rc)
			rc = strtab_intern(&t->syms, buf + ml, mr, &r, NULL);
		if (!rc)
			rc = strtab_intern(&t->syms, buf, ml + mr, &res, NULL);
		if (rc)
			goto out;
		uint64_t key = pair_key(l, r);
		uint32_t slot = pairtab_slot(&t->merges, key);
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

struct special_order {
	uint32_t len;
	int32_t id;
};

static int special_order_cmp(const void *a, const void *b)
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
	qsort(o, (size_t)n, sizeof(*o), special_order_cmp);
	for (int32_t i = 0; i < n; i++)
		t->special[i] = o[i].id;
	t->n_special = n;
	/* o is sorted by length, so equal lengths are adjacent */
	for (int32_t i = 0; i < n; i++) {
		if (o[i].len == 0)
			continue;
		t->special_first[strtab_str(&t->texts, (uint32_t)o[i].id)[0]] = 1;
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
		uint32_t cpt = utf8_next_lenient(s + i, n - i, &adv);
		i += adv;
		if (cpt < 0x144 && t->bmap.cpt_byte[cpt] >= 0) {
			uint8_t b = (uint8_t)t->bmap.cpt_byte[cpt];
			rc = dynbuf_put(d, &b, 1);
			continue;
		}
		uint8_t u[4];
		char hex[32] = "[UNK_BYTE_0x";
		size_t k = utf8_encode(cpt, u), h = strlen(hex);
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
		const uint8_t *s = strtab_str(&t->texts, (uint32_t)id);
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
	byte_map_init(&t->bmap);
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
	strtab_free(&t->texts);
	strtab_free(&t->syms);
	pairtab_free(&t->merges);
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

/* ------------------------------------------------------------ encoding */

struct span {
	size_t start, len;
	int32_t token; /* -1: text */
};

struct spans {
	struct span *v;
	size_t n, cap;
};

static int spans_push(struct spans *s, size_t start, size_t len, int32_t token)
{
	if (s->n == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 64;
		struct span *v = realloc(s->v, cap * sizeof(*v));
		if (!v)
			return ERR_NOMEM;
		s->v = v;
		s->cap = cap;
	}
	s->v[s->n++] = (struct span){start, len, token};
	return 0;
}

struct bpe_sym {
	int32_t sid;
	int32_t prev, next;
	uint32_t len; /* 0: merged away */
};

struct bpe_cand {
	int32_t rank, left, right, sid_l, sid_r, sid_res;
};

/* Scratch for one tokenizer_encode call. */
struct enc {
	const tokenizer *t;
	int32_t *ids;
	size_t cap, n;
	uint8_t *norm, *proxy;
	struct spans frags, cur, next;
	struct bpe_sym *sym;
	size_t sym_cap;
	struct bpe_cand *heap;
	size_t heap_n, heap_cap;
	pcre2_match_data *md;
	struct special_order *found; /* tok_special_found() */
	size_t n_found, found_cap;
	int32_t *cand;
};

static void enc_emit(struct enc *e, int32_t id)
{
	if (e->n < e->cap)
		e->ids[e->n] = id;
	e->n++;
}

static int cand_less(const struct bpe_cand *a, const struct bpe_cand *b)
{
	return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static int heap_push(struct enc *e, struct bpe_cand c)
{
	if (e->heap_n == e->heap_cap) {
		size_t cap = e->heap_cap ? e->heap_cap * 2 : 256;
		struct bpe_cand *h = realloc(e->heap, cap * sizeof(*h));
		if (!h)
			return ERR_NOMEM;
		e->heap = h;
		e->heap_cap = cap;
	}
	size_t i = e->heap_n++;
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (!cand_less(&c, &e->heap[p]))
			break;
		e->heap[i] = e->heap[p];
		i = p;
	}
	e->heap[i] = c;
	return 0;
}

static struct bpe_cand heap_pop(struct enc *e)
{
	struct bpe_cand top = e->heap[0], last = e->heap[--e->heap_n];
	size_t i = 0, n = e->heap_n;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= n)
			break;
		if (c + 1 < n && cand_less(&e->heap[c + 1], &e->heap[c]))
			c++;
		if (!cand_less(&e->heap[c], &last))
			break;
		e->heap[i] = e->heap[c];
		i = c;
	}
	if (n)
		e->heap[i] = last;
	return top;
}

/* Queues the merge of symbols left and right if the pair has a rank. */
static int bpe_try_pair(struct enc *e, int32_t left, int32_t right)
{
	if (left < 0 || right < 0)
		return 0;
	const struct pairtab *m = &e->t->merges;
	uint64_t key = pair_key(e->sym[left].sid, e->sym[right].sid);
	uint32_t slot = pairtab_slot(m, key);
	if (m->key[slot] != key)
		return 0;
	struct bpe_cand c = {m->rank[slot],	left,	     right, e->sym[left].sid,
			     e->sym[right].sid, m->res[slot]};
	return heap_push(e, c);
}

/* BPE over one pre-tokenized word (llm_tokenizer_bpe_session::tokenize). */
static int bpe_word(struct enc *e, const uint8_t *w, size_t n)
{
	const tokenizer *t = e->t;
	int rc;

	if (t->pre->ignore_merges) {
		int32_t sid = strtab_find(&t->syms, w, n);
		if (sid >= 0 && t->sym_tok[sid] >= 0) {
			enc_emit(e, t->sym_tok[sid]);
			return 0;
		}
	}
	if (n > e->sym_cap) {
		size_t cap = n > 64 ? n : 64;
		struct bpe_sym *s = realloc(e->sym, cap * sizeof(*s));
		if (!s)
			return ERR_NOMEM;
		e->sym = s;
		e->sym_cap = cap;
	}
	if (n > INT32_MAX)
		return ERR_RANGE;
	for (size_t i = 0; i < n; i++) {
		e->sym[i] = (struct bpe_sym){t->byte_sym[w[i]], (int32_t)i - 1,
					     i + 1 < n ? (int32_t)i + 1 : -1, 1};
	}
	e->heap_n = 0;
	for (size_t i = 1; i < n; i++) {
		rc = bpe_try_pair(e, (int32_t)i - 1, (int32_t)i);
		if (rc)
			return rc;
	}
	while (e->heap_n) {
		struct bpe_cand c = heap_pop(e);
		struct bpe_sym *l = &e->sym[c.left], *r = &e->sym[c.right];
		if (!l->len || !r->len || l->next != c.right || l->sid != c.sid_l ||
		    r->sid != c.sid_r)
			continue; /* outdated */
		l->sid = c.sid_res;
		l->len += r->len;
		r->len = 0;
		l->next = r->next;
		if (r->next >= 0)
			e->sym[r->next].prev = c.left;
		rc = bpe_try_pair(e, l->prev, c.left);
		if (!rc)
			rc = bpe_try_pair(e, c.left, l->next);
		if (rc)
			return rc;
	}
	/* a symbol's index is the offset of its first byte */
	for (int32_t i = 0; i >= 0 && (size_t)i < n; i = e->sym[i].next) {
		const struct bpe_sym *s = &e->sym[i];
		int32_t id = t->sym_tok[s->sid];
		if (id >= 0) {
			enc_emit(e, id);
		} else {
			/* as llama.cpp: each byte of the symbol's spelling looked up alone */
			for (uint32_t k = 0; k < s->len; k++) {
				uint8_t u[4];
				size_t m = utf8_encode(t->bmap.byte_cpt[w[(size_t)i + k]], u);
				for (size_t j = 0; j < m; j++) {
					if (t->text1_tok[u[j]] >= 0)
						enc_emit(e, t->text1_tok[u[j]]);
				}
			}
		}
	}
	return 0;
}

/* Splits every span of e->cur into matches of re and the gaps between them. */
static int tok_regex_split(struct enc *e, const pcre2_code *re)
{
	int rc;
	e->next.n = 0;
	for (size_t k = 0; k < e->cur.n; k++) {
		const uint8_t *subj = e->proxy + e->cur.v[k].start;
		size_t n = e->cur.v[k].len, base = e->cur.v[k].start, prev = 0, off = 0;
		while (off < n) {
			int m = pcre2_match(re, subj, n, off, PCRE2_NO_UTF_CHECK, e->md, NULL);
			if (m == PCRE2_ERROR_JIT_STACKLIMIT) /* the interpreter keeps its frames on
								the heap */
				m = pcre2_match(re, subj, n, off, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
						e->md, NULL);
			if (m == PCRE2_ERROR_NOMATCH)
				break;
			if (m < 0) {
				PCRE2_UCHAR msg[256];
				pcre2_get_error_message(m, msg, sizeof(msg));
				log_error("tokenizer: pre-tokenizer regex failed: %s",
					  (const char *)msg);
				return ERR_RANGE;
			}
			PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
			size_t ms = ov[0], me = ov[1];
			if (me == ms) {
				/* an empty match (none of the tables can make one): skip a
				 * character */
				off = ms + 1;
				while (off < n && (subj[off] & 0xC0) == 0x80)
					off++;
				continue;
			}
			if (ms > prev) {
				rc = spans_push(&e->next, base + prev, ms - prev, -1);
				if (rc)
					return rc;
			}
			rc = spans_push(&e->next, base + ms, me - ms, -1);
			if (rc)
				return rc;
			prev = off = me;
		}
		if (prev < n) {
			rc = spans_push(&e->next, base + prev, n - prev, -1);
			if (rc)
				return rc;
		}
	}
	struct spans tmp = e->cur;
	e->cur = e->next;
	e->next = tmp;
	return 0;
}

/* Pre-tokenizes and encodes one text fragment. */
static int tok_encode_text(struct enc *e, const uint8_t *s, size_t n)
{
	const tokenizer *t = e->t;
	size_t len = 0;
	int rc;

	/* decode as llama.cpp, re-encode: norm = its bytes, proxy = what PCRE2 sees */
	for (size_t i = 0; i < n;) {
		size_t adv;
		uint32_t cpt = utf8_next_lenient(s + i, n - i, &adv);
		i += adv;
		size_t k = utf8_encode(cpt, e->norm + len);
		if (cpt < 0x80)
			e->proxy[len] = e->norm[len];
		else
			utf8_encode(tok_proxy_cpt(cpt), e->proxy + len); /* same length */
		len += k;
	}
	e->cur.n = 0;
	rc = spans_push(&e->cur, 0, len, -1);
	for (int i = 0; !rc && i < t->pre->n_regex; i++)
		rc = tok_regex_split(e, t->re[i]);
	for (size_t k = 0; !rc && k < e->cur.n; k++)
		rc = bpe_word(e, e->norm + e->cur.v[k].start, e->cur.v[k].len);
	return rc;
}

/* The special tokens that tok_partition() may match whose text occurs
 * anywhere in text, in the order of t->special, as e->cand[0, *n_out).  A
 * fragment is part of the text, so no other special token can split one;
 * finding them is one lookup per distinct length at each byte that starts a
 * special text, instead of a scan of the text per special token. */
static int tok_special_found(struct enc *e, const uint8_t *text, size_t len, int parse_special,
			     int32_t *n_out)
{
	const tokenizer *t = e->t;
	const uint8_t want =
	    TOKENIZER_ATTR_CONTROL | TOKENIZER_ATTR_USER_DEFINED | TOKENIZER_ATTR_UNKNOWN;
	e->n_found = 0;
	for (size_t i = 0; i < len; i++) {
		if (!t->special_first[text[i]])
			continue;
		for (int32_t l = 0; l < t->n_special_len; l++) {
			size_t pl = t->special_len[l];
			if (pl > len - i)
				continue;
			int32_t id = strtab_find(&t->texts, text + i, pl);
			if (id < 0 || !(t->attr[id] & want) ||
			    (!parse_special &&
			     (t->attr[id] & (TOKENIZER_ATTR_CONTROL | TOKENIZER_ATTR_UNKNOWN))))
				continue;
			if (e->n_found == e->found_cap) {
				size_t cap = e->found_cap ? e->found_cap * 2 : 16;
				struct special_order *f = realloc(e->found, cap * sizeof(*f));
				if (!f)
					return ERR_NOMEM;
				e->found = f;
				e->found_cap = cap;
			}
			e->found[e->n_found++] = (struct special_order){(uint32_t)pl, id};
		}
	}
	if (e->n_found > 1)
		qsort(e->found, e->n_found, sizeof(*e->found), special_order_cmp);
	e->cand = malloc((e->n_found ? e->n_found : 1) * sizeof(*e->cand));
	if (!e->cand)
		return ERR_NOMEM;
	int32_t n = 0;
	for (size_t i = 0; i < e->n_found; i++) {
		if (n == 0 || e->cand[n - 1] != e->found[i].id)
			e->cand[n++] = e->found[i].id;
	}
	*n_out = n;
	return 0;
}

/* Splits the text on special-token texts (llama.cpp tokenizer_st_partition). */
static int tok_partition(struct enc *e, const uint8_t *text, size_t len, int parse_special)
{
	const tokenizer *t = e->t;
	const int32_t *list = t->special;
	int32_t n_list = t->n_special;
	int rc = 0;

	e->frags.n = 0;
	if (len == 0)
		return 0;
	rc = spans_push(&e->frags, 0, len, -1);
	if (!rc && t->n_special_len >= 0) {
		rc = tok_special_found(e, text, len, parse_special, &n_list);
		list = e->cand;
	}
	for (int32_t k = 0; !rc && k < n_list; k++) {
		int32_t id = list[k];
		if (!parse_special &&
		    (t->attr[id] & (TOKENIZER_ATTR_CONTROL | TOKENIZER_ATTR_UNKNOWN)))
			continue;
		const uint8_t *p = strtab_str(&t->texts, (uint32_t)id);
		size_t pl = t->texts.len[id];
		e->next.n = 0;
		for (size_t f = 0; !rc && f < e->frags.n; f++) {
			struct span sp = e->frags.v[f];
			if (sp.token >= 0 || sp.len < pl) {
				rc = spans_push(&e->next, sp.start, sp.len, sp.token);
				continue;
			}
			size_t at = sp.start, end = sp.start + sp.len;
			while (!rc) {
				const uint8_t *hit = NULL;
				for (size_t i = at; i + pl <= end; i++) {
					const uint8_t *c = memchr(text + i, p[0], end - pl + 1 - i);
					if (!c)
						break;
					i = (size_t)(c - text);
					if (memcmp(c, p, pl) == 0) {
						hit = c;
						break;
					}
				}
				if (!hit)
					break;
				size_t h = (size_t)(hit - text);
				if (h > at)
					rc = spans_push(&e->next, at, h - at, -1);
				if (!rc)
					rc = spans_push(&e->next, h, pl, id);
				at = h + pl;
			}
			if (!rc && at < end)
				rc = spans_push(&e->next, at, end - at, -1);
		}
		struct spans tmp = e->frags;
		e->frags = e->next;
		e->next = tmp;
	}
	return rc;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int parse_special,
		     int32_t *ids, size_t cap, size_t *n_out)
{
	struct enc e = {.t = t, .ids = ids, .cap = cap};
	const uint8_t *s = (const uint8_t *)text;
	size_t max_frag = 0;
	int rc;

	*n_out = 0;
	rc = tok_partition(&e, s, len, parse_special);
	if (rc)
		goto out;
	for (size_t f = 0; f < e.frags.n; f++) {
		if (e.frags.v[f].token < 0 && e.frags.v[f].len > max_frag)
			max_frag = e.frags.v[f].len;
	}
	if (max_frag > SIZE_MAX / 8) {
		rc = ERR_RANGE;
		goto out;
	}
	/* an invalid byte becomes U+FFFD: at most 3 bytes per input byte */
	e.norm = malloc(3 * max_frag + 1);
	e.proxy = malloc(3 * max_frag + 1);
	e.md = pcre2_match_data_create(1, NULL);
	if (!e.norm || !e.proxy || !e.md) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (size_t f = 0; !rc && f < e.frags.n; f++) {
		const struct span *sp = &e.frags.v[f];
		if (sp->token >= 0)
			enc_emit(&e, sp->token);
		else
			rc = tok_encode_text(&e, s + sp->start, sp->len);
	}
	if (rc)
		goto out;
	*n_out = e.n;
	if (e.n > cap)
		rc = ERR_RANGE;
out:
	if (rc == ERR_NOMEM)
		log_error("tokenizer: out of memory encoding %zu bytes", len);
	pcre2_match_data_free(e.md);
	free(e.norm);
	free(e.proxy);
	free(e.frags.v);
	free(e.cur.v);
	free(e.next.v);
	free(e.sym);
	free(e.heap);
	free(e.found);
	free(e.cand);
	return rc;
}

/* ------------------------------------------------------------ pieces */

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
	return strtab_find(&t->texts, (const uint8_t *)text, len);
}

/* ------------------------------------------------------------ streaming */

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
