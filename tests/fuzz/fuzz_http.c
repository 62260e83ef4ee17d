/* fuzz_http: what `moefleet serve` does with a request body before it
 * reaches the model, without sockets: api_parse_request() of a
 * /v1/chat/completions or /v1/completions body, chat_render() of the parsed
 * messages, api_error_body() of a refusal; and the response side on arbitrary
 * bytes: api_result_body(), api_result_chunk() and api_usage_chunk() with the
 * input as generated text, reasoning and log-probability tokens, and the
 * chat_parser splitting it (in chunks) into answer and reasoning.
 *
 * Input: byte 0 = options (bit 0: completion instead of chat; bits 1-2: chat
 * format, 3 = none; bits 3-5: chunk size for the chat parser, 1 << k bytes;
 * bit 6: finish_reason set; bit 7: logprobs), then the body.
 * Checks: an accepted request satisfies every documented bound (strings valid
 * UTF-8 without NUL, counts and numbers in range, exactly one prompt form); a
 * refused one has status 400 and a message; every body produced is valid
 * JSON in valid UTF-8 (SSE events: "data: JSON\n\n"), even for text that is
 * not UTF-8; the chat parser neither loses nor invents bytes where its
 * contract says the text passes through (DEEPSEEK: everything is answer;
 * QWEN3 without a leading "<think>": everything is answer), and never outputs
 * more than it was given. */
#include "fuzz.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../coordinator/serve/api.h"
#include "../../coordinator/serve/chat.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ checks */

/* A NUL-terminated string without NUL inside its first n bytes, valid UTF-8. */
static void fuzz_check_str(const char *s)
{
	if (!s || !fuzz_utf8_valid(s, strlen(s)))
		abort();
}

/* A strict RFC 8259 recogniser (strings must be valid UTF-8). */
struct jp {
	const char *s;
	size_t n, i;
	int depth;
};

FUZZ_CHECKER static void jp_ws(struct jp *p)
{
	while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' ||
			       p->s[p->i] == '\r'))
		p->i++;
}

FUZZ_CHECKER static int jp_lit(struct jp *p, const char *w)
{
	size_t k = strlen(w);
	if (p->n - p->i < k || memcmp(p->s + p->i, w, k))
		return 0;
	p->i += k;
	return 1;
}

FUZZ_CHECKER static int jp_digits(struct jp *p)
{
	size_t st = p->i;
	while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
		p->i++;
	return p->i > st;
}

FUZZ_CHECKER static int jp_number(struct jp *p)
{
	if (p->i < p->n && p->s[p->i] == '-')
		p->i++;
	if (p->i < p->n && p->s[p->i] == '0')
		p->i++;
	else if (!jp_digits(p))
		return 0;
	if (p->i < p->n && p->s[p->i] == '.') {
		p->i++;
		if (!jp_digits(p))
			return 0;
	}
	if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
		p->i++;
		if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-'))
			p->i++;
		if (!jp_digits(p))
			return 0;
	}
	return 1;
}

FUZZ_CHECKER static int jp_hex4(struct jp *p)
{
	for (int k = 0; k < 4; k++, p->i++) {
		char c = p->i < p->n ? p->s[p->i] : 0;
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
			return 0;
	}
	return 1;
}

FUZZ_CHECKER static int jp_string(struct jp *p)
{
	if (p->i >= p->n || p->s[p->i] != '"')
		return 0;
	p->i++;
	while (p->i < p->n) {
		unsigned char c = (unsigned char)p->s[p->i];
		if (c == '"') {
			p->i++;
			return 1;
		}
		if (c < 0x20)
			return 0;
		if (c == '\\') {
			p->i++;
			if (p->i >= p->n)
				return 0;
			char e = p->s[p->i++];
			if (e == 'u') {
				if (!jp_hex4(p))
					return 0;
			} else if (!strchr("\"\\/bfnrt", e) || !e) {
				return 0;
			}
			continue;
		}
		size_t k = fuzz_utf8_len((const uint8_t *)p->s + p->i, p->n - p->i);
		if (!k)
			return 0;
		p->i += k;
	}
	return 0;
}

static int jp_value(struct jp *p);

FUZZ_CHECKER static int jp_container(struct jp *p, char open, char close)
{
	if (++p->depth > 64)
		return 0;
	p->i++; /* open */
	(void)open;
	jp_ws(p);
	if (p->i < p->n && p->s[p->i] == close) {
		p->i++;
		p->depth--;
		return 1;
	}
	for (;;) {
		if (close == '}') {
			if (!jp_string(p))
				return 0;
			jp_ws(p);
			if (p->i >= p->n || p->s[p->i] != ':')
				return 0;
			p->i++;
		}
		if (!jp_value(p))
			return 0;
		jp_ws(p);
		if (p->i >= p->n)
			return 0;
		if (p->s[p->i] == close) {
			p->i++;
			p->depth--;
			return 1;
		}
		if (p->s[p->i] != ',')
			return 0;
		p->i++;
		jp_ws(p);
	}
}

FUZZ_CHECKER static int jp_value(struct jp *p)
{
	jp_ws(p);
	if (p->i >= p->n)
		return 0;
	int ok;
	switch (p->s[p->i]) {
	case '{': ok = jp_container(p, '{', '}'); break;
	case '[': ok = jp_container(p, '[', ']'); break;
	case '"': ok = jp_string(p); break;
	case 't': ok = jp_lit(p, "true"); break;
	case 'f': ok = jp_lit(p, "false"); break;
	case 'n': ok = jp_lit(p, "null"); break;
	default: ok = jp_number(p); break;
	}
	jp_ws(p);
	return ok;
}

/* body[0, len) is one JSON object and body[len] is NUL. */
static void fuzz_check_json(const char *body, size_t len)
{
	if (!body || body[len] != 0 || strlen(body) != len)
		abort();
	struct jp p = {body, len, 0, 0};
	if (len == 0 || body[0] != '{' || !jp_value(&p) || p.i != len)
		abort();
}

/* "data: JSON\n\n" */
static void fuzz_check_sse(const char *ev, size_t len)
{
	if (!ev || len < 9 || memcmp(ev, "data: ", 6) || memcmp(ev + len - 2, "\n\n", 2) ||
	    ev[len] != 0)
		abort();
	char *copy = malloc(len - 7);
	if (!copy)
		abort();
	memcpy(copy, ev + 6, len - 8);
	copy[len - 8] = 0;
	fuzz_check_json(copy, len - 8);
	free(copy);
}

/* ------------------------------------------------------------ request side */

static void fuzz_check_request(const struct api_request *r, enum api_kind kind)
{
	if (r->kind != kind)
		abort();
	if (r->model)
		fuzz_check_str(r->model);
	if (kind == API_CHAT) {
		if (r->n_messages < 1 || r->n_messages > 4096 || !r->messages || r->prompt ||
		    r->prompt_ids)
			abort();
		for (int i = 0; i < r->n_messages; i++) {
			fuzz_check_str(r->messages[i].role);
			fuzz_check_str(r->messages[i].content);
			if (r->messages[i].reasoning)
				fuzz_check_str(r->messages[i].reasoning);
		}
	} else {
		if (r->n_messages || r->messages || !r->prompt == !r->prompt_ids)
			abort();
		if (r->prompt) {
			fuzz_check_str(r->prompt);
			if (strlen(r->prompt) != r->prompt_len)
				abort();
		} else {
			if (r->n_prompt_ids < 1 || r->n_prompt_ids > (1 << 24))
				abort();
			for (int i = 0; i < r->n_prompt_ids; i++)
				if (r->prompt_ids[i] < 0)
					abort();
		}
	}
	if (r->max_tokens != -1 && (r->max_tokens < 1 || r->max_tokens > (1L << 24)))
		abort();
	if (!(r->temperature >= 0.0 && r->temperature <= 2.0) ||
	    !(r->top_p > 0.0 && r->top_p <= 1.0) || r->top_k < 0 || r->top_k > (1L << 30))
		abort();
	if (r->n_stop < 0 || r->n_stop > API_MAX_STOP)
		abort();
	for (int i = 0; i < r->n_stop; i++)
		fuzz_check_str(r->stop[i]);
	if ((r->stream & ~1) || (r->include_usage & ~1) || (r->logprobs & ~1) || (r->has_seed & ~1))
		abort();
	if (r->top_logprobs < 0 || r->top_logprobs > API_MAX_TOP_LOGPROBS ||
	    (r->top_logprobs > 0 && !r->logprobs))
		abort();
	if (r->enable_thinking < -1 || r->enable_thinking > 1)
		abort();
	if (r->reasoning_effort && strcmp(r->reasoning_effort, "low") &&
	    strcmp(r->reasoning_effort, "medium") && strcmp(r->reasoning_effort, "high"))
		abort();
}

static void fuzz_render(const struct api_request *r, enum chat_format f)
{
	struct chat_message *cm = calloc((size_t)r->n_messages, sizeof(*cm));
	if (!cm)
		abort();
	for (int i = 0; i < r->n_messages; i++)
		cm[i] = (struct chat_message){r->messages[i].role, r->messages[i].content,
					      r->messages[i].reasoning};
	struct chat_options o = {.add_generation_prompt = 1,
				 .enable_thinking = r->enable_thinking,
				 .date = "2026-01-01",
				 .reasoning_effort = r->reasoning_effort};
	char *text = NULL, msg[256] = "";
	size_t len = 0;
	int rc = chat_render(f, cm, r->n_messages, &o, &text, &len, msg, sizeof(msg));
	if (rc == 0) {
		/* the contents hold no NUL, so neither does the prompt */
		if (!text || strlen(text) != len || !fuzz_utf8_valid(text, len))
			abort();
	} else if (rc != ERR_CONFIG || !msg[0] || text) {
		abort();
	}
	free(text);
	free(cm);
}

/* ------------------------------------------------------------ response side */

static void fuzz_responses(enum api_kind kind, const char *t, size_t n, uint8_t opt)
{
	struct api_logprob lp[4];
	memset(lp, 0, sizeof(lp));
	int n_lp = 0;
	if (opt & 0x80) {
		/* four tokens (of up to 16 bytes) cut from the text, each with its
		 * neighbours as alternatives */
		size_t tl = n / 4 < 16 ? n / 4 : 16;
		for (int i = 0; i < 4; i++) {
			lp[i].text = (char *)t + n * (size_t)i / 4;
			lp[i].len = tl;
			lp[i].logprob = -(float)i;
			lp[i].n_top = i + 1;
			for (int k = 0; k <= i; k++) {
				size_t at = n * (size_t)k / 4, m = tl + (size_t)k;
				lp[i].top[k] =
				    (struct api_top){t + at, m < n - at ? m : n - at, -(float)k};
			}
		}
		n_lp = 4;
	}
	struct api_result res = {.kind = kind,
				 .id = "cmpl-1",
				 .created = 1,
				 .model = "m",
				 .text = t,
				 .text_len = n / 2,
				 .reasoning = t + n / 2,
				 .reasoning_len = n - n / 2,
				 .finish_reason = (opt & 0x40) ? "stop" : NULL,
				 .prompt_tokens = 3,
				 .completion_tokens = 4,
				 .logprobs = n_lp ? lp : NULL,
				 .n_logprobs = n_lp,
				 .text_offset = 7};
	size_t len = 0;
	char *body = api_result_body(&res, &len);
	fuzz_check_json(body, len);
	free(body);
	for (int first = 0; first < 2; first++) {
		char *ev = api_result_chunk(&res, first, &len);
		fuzz_check_sse(ev, len);
		free(ev);
	}
	char *ev = api_usage_chunk(&res, &len);
	fuzz_check_sse(ev, len);
	free(ev);
}

static void fuzz_chat_parser(enum chat_format f, const char *t, size_t n, size_t chunk)
{
	chat_parser *p = NULL;
	struct chat_split out;
	memset(&out, 0, sizeof(out));
	if (chat_parser_new(f, &p))
		abort();
	for (size_t off = 0; off < n || off == 0; off += chunk) {
		size_t k = n - off < chunk ? n - off : chunk;
		int final = off + k >= n;
		if (chat_parser_push(p, t + off, k, final, &out))
			abort();
		if (final)
			break;
	}
	if (out.content_len + out.reasoning_len > n)
		abort(); /* invents bytes */
	int passthrough = f == CHAT_FORMAT_DEEPSEEK ||
			  (f == CHAT_FORMAT_QWEN3 &&
			   (n < 7 ? memcmp(t, "<think>", n) != 0 : memcmp(t, "<think>", 7) != 0));
	if (passthrough &&
	    (out.reasoning_len || out.content_len != n || (n && memcmp(out.content, t, n))))
		abort(); /* loses or alters bytes */
	chat_split_free(&out);
	chat_parser_destroy(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int init;
	if (!init) {
		log_set_quiet(1);
		init = 1;
	}
	if (size < 1 || size > (1 << 20))
		return 0;
	uint8_t opt = data[0];
	enum api_kind kind = (opt & 1) ? API_COMPLETION : API_CHAT;
	int fmt = (opt >> 1) & 3;
	const char *body = (const char *)data + 1;
	size_t len = size - 1;

	struct api_request r;
	struct api_error e;
	memset(&e, 0, sizeof(e));
	int rc = api_parse_request(kind, body, len, &r, &e);
	if (rc == 0) {
		fuzz_check_request(&r, kind);
		if (r.model) {
			/* what serve does with a model it does not serve: the name,
			 * possibly cut at the message's size, in a 404 body */
			struct api_error me;
			api_error_set(&me, 404, "invalid_request_error", "model", "model_not_found",
				      "The model '%s' does not exist; this server serves '%s'",
				      r.model, "m");
			size_t n = 0;
			char *eb = api_error_body(&me, &n);
			fuzz_check_json(eb, n);
			free(eb);
		}
		if (kind == API_CHAT && fmt < 3)
			fuzz_render(&r, (enum chat_format)fmt);
		api_request_free(&r);
	} else {
		if (rc != ERR_CONFIG || e.status != 400 || !e.message[0] ||
		    strnlen(e.message, sizeof(e.message)) == sizeof(e.message))
			abort();
		size_t n = 0;
		char *eb = api_error_body(&e, &n);
		fuzz_check_json(eb, n);
		free(eb);
	}

	fuzz_responses(kind, body, len, opt);
	if (fmt < 3) {
		/* a byte at a time is a push per byte: the first 512 bytes show
		 * everything the marker matching does, at a fraction of the cost */
		size_t chunk = (size_t)1 << ((opt >> 3) & 7);
		fuzz_chat_parser((enum chat_format)fmt, body, chunk < 16 && len > 512 ? 512 : len,
				 chunk);
	}
	return 0;
}
