#define _GNU_SOURCE
#include "chat.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"

/* ------------------------------------------------------------ a growing string */

struct chat_buf {
	char *p;
	size_t len, cap;
	int oom;
};

static void chat_put(struct chat_buf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *t = realloc(b->p, cap);
		if (!t) {
			b->oom = 1;
			return;
		}
		b->p = t;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void chat_puts(struct chat_buf *b, const char *s)
{
	chat_put(b, s, strlen(s));
}

static const char *chat_text(const char *s)
{
	return s ? s : "";
}

/* ------------------------------------------------------------ choosing */

int chat_pick_format(const char *arch, const char *tmpl, enum chat_format *out)
{
	if (tmpl && *tmpl) {
		if (strstr(tmpl, "<｜User｜>")) {
			*out = CHAT_FORMAT_DEEPSEEK;
			return 0;
		}
		if (strstr(tmpl, "<|im_start|>")) {
			*out = CHAT_FORMAT_QWEN3;
			return 0;
		}
		if (strstr(tmpl, "<|start|>") && strstr(tmpl, "<|channel|>")) {
			*out = CHAT_FORMAT_HARMONY;
			return 0;
		}
	}
	if (arch && (!strcmp(arch, "deepseek2") || !strcmp(arch, "deepseek4"))) {
		*out = CHAT_FORMAT_DEEPSEEK;
		return 0;
	}
	if (arch && !strcmp(arch, "qwen3moe")) {
		*out = CHAT_FORMAT_QWEN3;
		return 0;
	}
	if (arch && !strcmp(arch, "gpt-oss")) {
		*out = CHAT_FORMAT_HARMONY;
		return 0;
	}
	log_error("no chat format for architecture '%s' and its chat template", arch ? arch : "?");
	return ERR_CONFIG;
}

const char *chat_format_name(enum chat_format f)
{
	switch (f) {
	case CHAT_FORMAT_DEEPSEEK: return "deepseek";
	case CHAT_FORMAT_QWEN3: return "qwen3";
	case CHAT_FORMAT_HARMONY: return "harmony";
	}
	return "?";
}

static int chat_role_ok(const char *r)
{
	return r && (!strcmp(r, "system") || !strcmp(r, "developer") || !strcmp(r, "user") ||
		     !strcmp(r, "assistant") || !strcmp(r, "tool"));
}

static int chat_is(const struct chat_message *m, const char *role)
{
	return !strcmp(m->role, role);
}

/* ------------------------------------------------------------ DeepSeek */

static void chat_render_deepseek(const struct chat_message *msgs, int n,
				 const struct chat_options *o, struct chat_buf *b)
{
	int first_sp = 1;
	for (int i = 0; i < n; i++) {
		if (!chat_is(&msgs[i], "system") && !chat_is(&msgs[i], "developer"))
			continue;
		if (!first_sp)
			chat_puts(b, "\n\n");
		chat_puts(b, chat_text(msgs[i].content));
		first_sp = 0;
	}
	int is_tool = 0, output_first = 1;
	for (int i = 0; i < n; i++) {
		const struct chat_message *m = &msgs[i];
		const char *c = chat_text(m->content);
		if (chat_is(m, "user")) {
			is_tool = 0;
			chat_puts(b, "<｜User｜>");
			chat_puts(b, c);
		} else if (chat_is(m, "assistant")) {
			if (is_tool) {
				chat_puts(b, "<｜tool▁outputs▁end｜>");
				is_tool = 0;
			} else {
				chat_puts(b, "<｜Assistant｜>");
			}
			chat_puts(b, c);
			chat_puts(b, "<｜end▁of▁sentence｜>");
		} else if (chat_is(m, "tool")) {
			is_tool = 1;
			if (output_first) {
				chat_puts(b, "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>");
				output_first = 0;
			} else {
				chat_puts(b, "\n<｜tool▁output▁begin｜>");
			}
			chat_puts(b, c);
			chat_puts(b, "<｜tool▁output▁end｜>");
		}
	}
	if (is_tool)
		chat_puts(b, "<｜tool▁outputs▁end｜>");
	if (o->add_generation_prompt && !is_tool)
		chat_puts(b, "<｜Assistant｜>");
}

/* ------------------------------------------------------------ Qwen3 */

static int chat_starts(const char *s, const char *p)
{
	return !strncmp(s, p, strlen(p));
}

static int chat_ends(const char *s, const char *p)
{
	size_t ls = strlen(s), lp = strlen(p);
	return ls >= lp && !memcmp(s + ls - lp, p, lp);
}

/* Appends s[a..b) with the '\n's at the left (lstrip) and/or right (rstrip)
 * removed. */
static void chat_put_stripped(struct chat_buf *b, const char *s, size_t a, size_t e, int left,
			      int right)
{
	while (left && a < e && s[a] == '\n')
		a++;
	while (right && e > a && s[e - 1] == '\n')
		e--;
	chat_put(b, s + a, e - a);
}

/* The last occurrence of p in s, or NULL. */
static const char *chat_last(const char *s, const char *p)
{
	const char *r = NULL;
	for (const char *q = strstr(s, p); q; q = strstr(q + 1, p))
		r = q;
	return r;
}

static void chat_render_qwen3(const struct chat_message *msgs, int n, const struct chat_options *o,
			      struct chat_buf *b)
{
	if (n > 0 && chat_is(&msgs[0], "system")) {
		chat_puts(b, "<|im_start|>system\n");
		chat_puts(b, chat_text(msgs[0].content));
		chat_puts(b, "<|im_end|>\n");
	}
	int last_query = n - 1;
	for (int i = n - 1; i >= 0; i--) {
		const char *c = chat_text(msgs[i].content);
		if (chat_is(&msgs[i], "user") &&
		    !(chat_starts(c, "<tool_response>") && chat_ends(c, "</tool_response>"))) {
			last_query = i;
			break;
		}
	}
	for (int i = 0; i < n; i++) {
		const struct chat_message *m = &msgs[i];
		const char *c = chat_text(m->content);
		if (chat_is(m, "user") || (chat_is(m, "system") && i > 0) ||
		    chat_is(m, "developer")) {
			chat_puts(b, "<|im_start|>");
			chat_puts(b, chat_is(m, "developer") ? "system" : m->role);
			chat_puts(b, "\n");
			chat_puts(b, c);
			chat_puts(b, "<|im_end|>\n");
		} else if (chat_is(m, "assistant")) {
			/* content = text after the last </think> with leading '\n's
			 * removed; reasoning = text before the first </think>, after
			 * the last <think> in it, stripped of '\n's */
			const char *content = c;
			size_t c_off = 0, c_end = strlen(c);
			int c_lstrip = 0;
			const char *reason = m->reasoning;
			size_t r_a = 0, r_e = reason ? strlen(reason) : 0;
			char *reason_buf = NULL;
			if (!reason && strstr(c, "</think>")) {
				const char *close_first = strstr(c, "</think>");
				const char *close_last = chat_last(c, "</think>");
				c_off = (size_t)(close_last - c) + strlen("</think>");
				c_lstrip = 1;
				reason_buf = strndup(c, (size_t)(close_first - c));
				if (!reason_buf) {
					b->oom = 1;
					return;
				}
				const char *open = chat_last(reason_buf, "<think>");
				reason = reason_buf;
				r_a = open ? (size_t)(open - reason_buf) + strlen("<think>") : 0;
				r_e = strlen(reason_buf);
				/* .rstrip('\n') then .lstrip('\n') */
				while (r_e > r_a && reason_buf[r_e - 1] == '\n')
					r_e--;
				while (r_a < r_e && reason_buf[r_a] == '\n')
					r_a++;
			}
			int has_reason = reason && r_e > r_a;
			chat_puts(b, "<|im_start|>assistant");
			if (i > last_query && (i == n - 1 || has_reason)) {
				chat_puts(b, "\n<think>\n");
				if (reason)
					chat_put_stripped(b, reason, r_a, r_e, 1, 1);
				chat_puts(b, "\n</think>\n\n");
				chat_put_stripped(b, content, c_off, c_end, 1, 0);
			} else {
				chat_puts(b, "\n");
				chat_put_stripped(b, content, c_off, c_end, c_lstrip, 0);
			}
			free(reason_buf);
			chat_puts(b, "<|im_end|>\n");
		} else if (chat_is(m, "tool")) {
			if (i == 0 || !chat_is(&msgs[i - 1], "tool"))
				chat_puts(b, "<|im_start|>user");
			chat_puts(b, "\n<tool_response>\n");
			chat_puts(b, c);
			chat_puts(b, "\n</tool_response>");
			if (i == n - 1 || !chat_is(&msgs[i + 1], "tool"))
				chat_puts(b, "<|im_end|>\n");
		}
	}
	if (o->add_generation_prompt) {
		chat_puts(b, "<|im_start|>assistant\n");
		if (o->enable_thinking == 0)
			chat_puts(b, "<think>\n\n</think>\n\n");
	}
}

/* ------------------------------------------------------------ harmony */

static void chat_render_harmony(const struct chat_message *msgs, int n,
				const struct chat_options *o, struct chat_buf *b)
{
	chat_puts(b, "<|start|>system<|message|>You are ChatGPT, a large language model trained by "
		     "OpenAI.\nKnowledge cutoff: 2024-06\n");
	if (o->date && *o->date) {
		chat_puts(b, "Current date: ");
		chat_puts(b, o->date);
		chat_puts(b, "\n");
	}
	chat_puts(b, "\nReasoning: ");
	chat_puts(b, o->reasoning_effort && *o->reasoning_effort ? o->reasoning_effort : "medium");
	chat_puts(b, "\n\n# Valid channels: analysis, commentary, final. Channel must be included "
		     "for every message.<|end|>");
	int dev = 0;
	for (int i = 0; i < n; i++) {
		if (!chat_is(&msgs[i], "system") && !chat_is(&msgs[i], "developer"))
			continue;
		if (!dev)
			chat_puts(b, "<|start|>developer<|message|># Instructions\n\n");
		else
			chat_puts(b, "\n\n");
		chat_puts(b, chat_text(msgs[i].content));
		dev = 1;
	}
	if (dev)
		chat_puts(b, "\n\n<|end|>");
	for (int i = 0; i < n; i++) {
		const struct chat_message *m = &msgs[i];
		const char *c = chat_text(m->content);
		if (chat_is(m, "user")) {
			chat_puts(b, "<|start|>user<|message|>");
			chat_puts(b, c);
			chat_puts(b, "<|end|>");
		} else if (chat_is(m, "assistant")) {
			chat_puts(b, "<|start|>assistant<|channel|>final<|message|>");
			chat_puts(b, c);
			chat_puts(b, "<|end|>");
		} else if (chat_is(m, "tool")) {
			chat_puts(
			    b,
			    "<|start|>functions.tool to=assistant<|channel|>commentary<|message|>");
			chat_puts(b, c);
			chat_puts(b, "<|end|>");
		}
	}
	if (o->add_generation_prompt)
		chat_puts(b, "<|start|>assistant");
}

/* ------------------------------------------------------------ entry */

int chat_render(enum chat_format f, const struct chat_message *msgs, int n,
		const struct chat_options *opts, char **out, size_t *len_out, char *err,
		size_t err_cap)
{
	*out = NULL;
	*len_out = 0;
	if (n < 1) {
		if (err_cap)
			snprintf(err, err_cap, "'messages' must hold at least one message");
		return ERR_CONFIG;
	}
	for (int i = 0; i < n; i++) {
		if (!chat_role_ok(msgs[i].role)) {
			if (err_cap)
				snprintf(err, err_cap,
					 "messages[%d].role must be system, developer, user, "
					 "assistant or tool",
					 i);
			return ERR_CONFIG;
		}
	}
	struct chat_buf b = {0};
	chat_put(&b, "", 0);
	switch (f) {
	case CHAT_FORMAT_DEEPSEEK: chat_render_deepseek(msgs, n, opts, &b); break;
	case CHAT_FORMAT_QWEN3: chat_render_qwen3(msgs, n, opts, &b); break;
	case CHAT_FORMAT_HARMONY: chat_render_harmony(msgs, n, opts, &b); break;
	}
	if (b.oom) {
		free(b.p);
		return ERR_NOMEM;
	}
	*out = b.p;
	*len_out = b.len;
	return 0;
}

/* ------------------------------------------------------------ output parser */

enum chat_pstate {
	CHAT_P_START,	 /* QWEN3: before knowing whether a think block opens */
	CHAT_P_THINK,	 /* QWEN3: inside <think> */
	CHAT_P_AFTER,	 /* QWEN3: after <think> or </think>: strip '\n's, then `next` */
	CHAT_P_ANSWER,	 /* plain answer text */
	CHAT_P_H_NAME,	 /* HARMONY: reading a channel name up to <|message|> */
	CHAT_P_H_HEADER, /* HARMONY: after <|start|>, up to <|channel|> */
};

struct chat_parser {
	enum chat_format f;
	enum chat_pstate st;
	enum chat_pstate next; /* after CHAT_P_AFTER */
	int h_reasoning;       /* HARMONY: the current message is reasoning */
	struct chat_buf held;  /* text not yet classified */
	struct chat_buf name;  /* HARMONY: channel name being read */
};

int chat_parser_new(enum chat_format f, chat_parser **out)
{
	chat_parser *p = calloc(1, sizeof(*p));
	*out = p;
	if (!p)
		return ERR_NOMEM;
	p->f = f;
	p->st = f == CHAT_FORMAT_QWEN3 ? CHAT_P_START : CHAT_P_ANSWER;
	return 0;
}

void chat_parser_destroy(chat_parser **p)
{
	if (!p || !*p)
		return;
	free((*p)->held.p);
	free((*p)->name.p);
	free(*p);
	*p = NULL;
}

void chat_split_free(struct chat_split *s)
{
	free(s->content);
	free(s->reasoning);
	memset(s, 0, sizeof(*s));
}

static int chat_split_add(char **p, size_t *len, size_t *cap, const char *t, size_t n)
{
	struct chat_buf b = {*p, *len, *cap, 0};
	chat_put(&b, t, n);
	if (b.oom)
		return ERR_NOMEM;
	*p = b.p;
	*len = b.len;
	*cap = b.cap;
	return 0;
}

static int chat_emit(chat_parser *p, struct chat_split *o, const char *t, size_t n, int reasoning)
{
	(void)p;
	if (n == 0)
		return 0;
	return reasoning ? chat_split_add(&o->reasoning, &o->reasoning_len, &o->reasoning_cap, t, n)
			 : chat_split_add(&o->content, &o->content_len, &o->content_cap, t, n);
}

/* Where the first of the markers starts in t[0..n) (*which its index), or n;
 * *partial: how many bytes at the end might begin a marker (when none is
 * found). */
static size_t chat_find_marker(const char *t, size_t n, const char *const *marks, int n_marks,
			       int *which, size_t *partial)
{
	*partial = 0;
	*which = -1;
	for (size_t i = 0; i < n; i++) {
		for (int k = 0; k < n_marks; k++) {
			size_t ml = strlen(marks[k]);
			if (i + ml <= n && !memcmp(t + i, marks[k], ml)) {
				*which = k;
				return i;
			}
		}
	}
	for (int k = 0; k < n_marks; k++) {
		size_t ml = strlen(marks[k]);
		for (size_t l = ml - 1; l > *partial; l--)
			if (l <= n && !memcmp(t + n - l, marks[k], l)) {
				*partial = l;
				break;
			}
	}
	return n;
}

int chat_parser_push(chat_parser *p, const char *text, size_t n, int final, struct chat_split *o)
{
	chat_put(&p->held, text, n);
	if (p->held.oom)
		return ERR_NOMEM;
	for (;;) {
		const char *t = p->held.p ? p->held.p : "";
		size_t len = p->held.len, used = 0;
		int again = 0, rc = 0;
		if (p->st == CHAT_P_START) {
			const char *open = "<think>";
			size_t k = len < 7 ? len : 7;
			if (memcmp(t, open, k)) {
				p->st = CHAT_P_ANSWER;
				again = 1;
			} else if (len >= 7) {
				p->st = CHAT_P_AFTER;
				p->next = CHAT_P_THINK;
				used = 7;
				again = 1;
			} else if (final) {
				p->st = CHAT_P_ANSWER;
				again = 1;
			}
		} else if (p->st == CHAT_P_AFTER) {
			while (used < len && t[used] == '\n')
				used++;
			if (used < len) {
				p->st = p->next;
				again = 1;
			}
		} else {
			static const char *const qwen_think[] = {"</think>"};
			static const char *const harmony[] = {"<|channel|>", "<|message|>",
							      "<|start|>"};
			const char *const *marks = NULL;
			int n_marks = 0;
			if (p->st == CHAT_P_THINK) {
				marks = qwen_think;
				n_marks = 1;
			} else if (p->f == CHAT_FORMAT_HARMONY) {
				marks = harmony;
				n_marks = 3;
			}
			int which;
			size_t partial;
			size_t at = n_marks
					? chat_find_marker(t, len, marks, n_marks, &which, &partial)
					: len;
			if (!n_marks) {
				which = -1;
				partial = 0;
			}
			size_t text_end = which >= 0 ? at : final ? len : len - partial;
			int reasoning =
			    p->st == CHAT_P_THINK || (p->st == CHAT_P_ANSWER && p->h_reasoning);
			if (p->st == CHAT_P_H_NAME || p->st == CHAT_P_H_HEADER) {
				if (p->st == CHAT_P_H_NAME)
					chat_put(&p->name, t, text_end);
			} else {
				rc = chat_emit(p, o, t, text_end, reasoning);
			}
			used = text_end;
			if (which >= 0) {
				used += strlen(marks[which]);
				again = 1;
				if (p->st == CHAT_P_THINK) {
					p->st = CHAT_P_AFTER;
					p->next = CHAT_P_ANSWER;
				} else if (which == 0) { /* <|channel|> */
					p->st = CHAT_P_H_NAME;
					p->name.len = 0;
				} else if (which == 1) { /* <|message|> */
					if (p->st == CHAT_P_H_NAME) {
						chat_put(&p->name, "", 0);
						p->h_reasoning =
						    p->name.p && !strcmp(p->name.p, "analysis");
					}
					p->st = CHAT_P_ANSWER;
				} else { /* <|start|> */
					p->st = CHAT_P_H_HEADER;
					p->h_reasoning = 0;
				}
			}
		}
		if (rc || p->name.oom)
			return ERR_NOMEM;
		memmove(p->held.p, p->held.p + used, len - used);
		p->held.len -= used;
		if (p->held.p)
			p->held.p[p->held.len] = 0;
		if (!again || (p->held.len == 0 && !final))
			break;
		if (p->held.len == 0 && final)
			break;
	}
	return 0;
}
