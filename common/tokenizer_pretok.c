/* tokenizer pre-tokenizers and Unicode: one table row per tokenizer.ggml.pre
 * value, each a list of PCRE2 regexes applied in turn; llama.cpp's lenient
 * UTF-8 decoding, the GPT-2 byte <-> code point map, and the category patch
 * for PCRE2. */
#include "tokenizer_internal.h"

#include <string.h>

#include "err.h"
#include "log.h"

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

size_t tok_utf8_encode(uint32_t cpt, uint8_t *out)
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
uint32_t tok_utf8_next_lenient(const uint8_t *s, size_t n, size_t *adv)
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
uint32_t tok_proxy_cpt(uint32_t cpt)
{
	if (cpt >= 0xD800 && cpt <= 0xDFFF)
		return 0xE000; /* a surrogate: "other" for every class, like llama.cpp's Cs */
	int cat = uni_patch_cat(cpt);
	if (cat)
		return uni_standin[cat][cpt >= 0x10000];
	return cpt;
}

void tok_byte_map_init(struct byte_map *m)
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
int tok_byte_map_unspell(const struct byte_map *m, const uint8_t *s, size_t n, uint8_t *out,
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

int tok_load_pre(tokenizer *t, const gguf *g)
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
