/* tokenizer encoding: the string and pair hash tables symbols and merges live
 * in, and encoding -- special-token partition, regex split, byte-level BPE. */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "log.h"

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

void tok_strtab_free(struct strtab *t)
{
	free(t->arena);
	free(t->off);
	free(t->len);
	free(t->slots);
	memset(t, 0, sizeof(*t));
}

const uint8_t *tok_strtab_str(const struct strtab *t, uint32_t i)
{
	return t->arena + t->off[i];
}

int32_t tok_strtab_find(const struct strtab *t, const uint8_t *s, size_t n)
{
	if (t->n_slots == 0)
		return -1;
	uint32_t mask = t->n_slots - 1;
	for (uint32_t h = (uint32_t)hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
		int32_t i = t->slots[h];
		if (i < 0)
			return -1;
		if (t->len[i] == n && memcmp(tok_strtab_str(t, (uint32_t)i), s, n) == 0)
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
		uint32_t h = (uint32_t)hash_bytes(tok_strtab_str(t, i), t->len[i]) & (n_slots - 1);
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
int tok_strtab_intern(struct strtab *t, const uint8_t *s, size_t n, int32_t *idx, int *added)
{
	int32_t i = tok_strtab_find(t, s, n);
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

void tok_pairtab_free(struct pairtab *p)
{
	free(p->key);
	free(p->rank);
	free(p->res);
	memset(p, 0, sizeof(*p));
}

int tok_pairtab_init(struct pairtab *p, uint64_t n_expected)
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

uint64_t tok_pair_key(int32_t l, int32_t r)
{
	return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r;
}

/* Returns the slot of (l, r): occupied by it or the empty slot where it goes. */
uint32_t tok_pairtab_slot(const struct pairtab *p, uint64_t key)
{
	uint32_t mask = p->n_slots - 1;
	uint32_t h = (uint32_t)hash_u64(key) & mask;
	while (p->key[h] != UINT64_MAX && p->key[h] != key)
		h = (h + 1) & mask;
	return h;
}

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
	uint64_t key = tok_pair_key(e->sym[left].sid, e->sym[right].sid);
	uint32_t slot = tok_pairtab_slot(m, key);
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
		int32_t sid = tok_strtab_find(&t->syms, w, n);
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
				size_t m = tok_utf8_encode(t->bmap.byte_cpt[w[(size_t)i + k]], u);
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
		uint32_t cpt = tok_utf8_next_lenient(s + i, n - i, &adv);
		i += adv;
		size_t k = tok_utf8_encode(cpt, e->norm + len);
		if (cpt < 0x80)
			e->proxy[len] = e->norm[len];
		else
			tok_utf8_encode(tok_proxy_cpt(cpt), e->proxy + len); /* same length */
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
			int32_t id = tok_strtab_find(&t->texts, text + i, pl);
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
		qsort(e->found, e->n_found, sizeof(*e->found), tok_special_order_cmp);
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
		const uint8_t *p = tok_strtab_str(&t->texts, (uint32_t)id);
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
