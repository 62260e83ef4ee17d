#define _GNU_SOURCE
#include "chat.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/err.h"
#include "../common/log.h"

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

static void chat_puts(struct chat_buf *b, const char *s) { chat_put(b, s, strlen(s)); }

static const char *chat_text(const char *s) { return s ? s : ""; }

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

static int chat_starts(const char *s, const char *p) { return !strncmp(s, p, strlen(p)); }

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
		if (chat_is(m, "user") || (chat_is(m, "system") && i > 0) || chat_is(m, "developer")) {
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
			chat_puts(b, "<|start|>functions.tool to=assistant<|channel|>commentary<|message|>");
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
