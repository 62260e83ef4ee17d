/* chat: turns a list of chat messages into the prompt text a model was
 * trained on, in plain C (no template engine).
 *
 * Three formats, each written to produce exactly what the model's Jinja chat
 * template renders for text-only conversations (no tools offered, tool-call
 * messages not supported), without the BOS text: callers prepend the BOS id
 * when the vocabulary asks for it.
 *  - DEEPSEEK (deepseek2, deepseek4; DeepSeek-V3's template): all system
 *    messages joined by a blank line, then "<｜User｜>" + user text,
 *    "<｜Assistant｜>" + assistant text + "<｜end▁of▁sentence｜>", tool results
 *    between "<｜tool▁outputs▁begin｜>" markers; generation prompt
 *    "<｜Assistant｜>".
 *  - QWEN3 (qwen3moe; ChatML): "<|im_start|>ROLE\n" ... "<|im_end|>\n"; an
 *    assistant turn after the last user query carries its reasoning in a
 *    "<think>\n...\n</think>\n\n" block (taken from `reasoning` or split off
 *    the content at "</think>"), earlier ones lose it; tool results are
 *    wrapped in <tool_response>; enable_thinking = 0 appends an empty think
 *    block to the generation prompt.
 *  - HARMONY (gpt-oss): a system header (knowledge cutoff, optional date,
 *    reasoning effort, valid channels), system/developer messages as a
 *    developer "# Instructions" message, "<|start|>ROLE<|message|>...<|end|>"
 *    turns (past assistant turns on the final channel), generation prompt
 *    "<|start|>assistant".
 * The OpenAI "developer" role, which those templates do not know, is taken
 * as "system" (DEEPSEEK and QWEN3) or as the developer message (HARMONY).
 * chat_pick_format() prefers what the GGUF's tokenizer.chat_template text
 * shows (its marker tokens) and falls back on the architecture. */
#ifndef MOEFLEET_CHAT_H
#define MOEFLEET_CHAT_H

#include <stddef.h>

enum chat_format {
	CHAT_FORMAT_DEEPSEEK,
	CHAT_FORMAT_QWEN3,
	CHAT_FORMAT_HARMONY,
};

struct chat_message {
	const char *role;      /* system, developer, user, assistant or tool */
	const char *content;   /* NULL counts as "" */
	const char *reasoning; /* assistant reasoning_content, or NULL */
};

struct chat_options {
	int add_generation_prompt;
	int enable_thinking;	      /* QWEN3: -1 unset (thinking), 0 off, 1 on */
	const char *date;	      /* HARMONY: "YYYY-MM-DD" or NULL to leave out */
	const char *reasoning_effort; /* HARMONY: low, medium (default), high */
};

/* arch: general.architecture; tmpl: tokenizer.chat_template or NULL.
 * ERR_CONFIG (logged) when neither names a known format. */
int chat_pick_format(const char *arch, const char *tmpl, enum chat_format *out);
const char *chat_format_name(enum chat_format f);

/* Renders n messages into a new NUL-terminated string (*out, freed by the
 * caller; *len_out its length).  ERR_CONFIG (not logged; the reason in err,
 * if err_cap > 0) for an unknown role or an empty conversation; ERR_NOMEM. */
int chat_render(enum chat_format f, const struct chat_message *msgs, int n,
		const struct chat_options *opts, char **out, size_t *len_out, char *err,
		size_t err_cap);

/* Splitting generated text into reasoning and answer, as it streams.
 *  - QWEN3: output that begins with "<think>" is reasoning up to "</think>";
 *    the answer after it loses its leading '\n's.  Output that does not begin
 *    with "<think>" is all answer (thinking off).
 *  - HARMONY: "<|channel|>NAME<|message|>TEXT" is reasoning when NAME is
 *    "analysis", answer otherwise ("final", "commentary"); "<|start|>assistant"
 *    ends a message.  Text outside any message is answer.
 *  - DEEPSEEK: everything is answer.
 * Text that might be the beginning of a marker is held until the next push
 * (or the final one).  Markers themselves are dropped. */
typedef struct chat_parser chat_parser;

struct chat_split {
	char *content; /* malloc'ed, appended to by chat_parser_push */
	size_t content_len, content_cap;
	char *reasoning;
	size_t reasoning_len, reasoning_cap;
};

int chat_parser_new(enum chat_format f, chat_parser **out);
void chat_parser_destroy(chat_parser **p);
/* Appends the answer and reasoning text now known to out; final: nothing
 * more will come (what is held is released).  ERR_NOMEM. */
int chat_parser_push(chat_parser *p, const char *text, size_t n, int final, struct chat_split *out);
void chat_split_free(struct chat_split *s);

#endif
