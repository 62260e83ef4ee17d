#define _GNU_SOURCE
#include "api.h"

#include <jansson.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"

void api_error_set(struct api_error *e, int status, const char *type, const char *param,
		   const char *code, const char *fmt, ...)
{
	e->status = status;
	e->type = type;
	e->param = param;
	e->code = code;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(e->message, sizeof(e->message), fmt, ap);
	va_end(ap);
}

static char *api_dump(json_t *j, size_t *len)
{
	char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	*len = s ? strlen(s) : 0;
	return s;
}

static json_t *api_text(const char *s, size_t n);

/* The message may hold a client's bytes or be cut inside a character: it
 * goes out through api_text so the body is always valid JSON. */
char *api_error_body(const struct api_error *e, size_t *len)
{
	json_t *j = json_pack("{s:{s:o,s:s,s:o,s:o}}", "error", "message",
			      api_text(e->message, strlen(e->message)), "type",
			      e->type ? e->type : "invalid_request_error", "param",
			      e->param ? json_string(e->param) : json_null(), "code",
			      e->code ? json_string(e->code) : json_null());
	return api_dump(j, len);
}

/* ------------------------------------------------------------ parsing */

static int api_bad(struct api_error *err, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int api_bad(struct api_error *err, const char *param, const char *fmt, ...)
{
	err->status = 400;
	err->type = "invalid_request_error";
	err->param = param;
	err->code = NULL;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return ERR_CONFIG;
}

static char *api_strdup_json(json_t *s, size_t *len)
{
	size_t n = json_string_length(s);
	char *p = malloc(n + 1);
	if (p) {
		memcpy(p, json_string_value(s), n);
		p[n] = 0;
	}
	if (len)
		*len = n;
	return p;
}

/* Text content: a string, or an array of {"type": "text", "text": ...}
 * parts (joined), or null (empty). */
static int api_get_content(json_t *c, int i, char **out, struct api_error *err)
{
	*out = NULL;
	if (!c || json_is_null(c)) {
		*out = strdup("");
		return *out ? 0 : ERR_NOMEM;
	}
	if (json_is_string(c)) {
		*out = api_strdup_json(c, NULL);
		return *out ? 0 : ERR_NOMEM;
	}
	if (!json_is_array(c))
		return api_bad(err, "messages",
			       "messages[%d].content must be a string or an array "
			       "of text parts",
			       i);
	size_t total = 0, k;
	json_t *part;
	json_array_foreach(c, k, part)
	{
		json_t *type = json_object_get(part, "type");
		json_t *text = json_object_get(part, "text");
		if (!json_is_object(part) || !json_is_string(type) ||
		    strcmp(json_string_value(type), "text") || !json_is_string(text))
			return api_bad(err, "messages",
				       "messages[%d].content[%zu] must be {\"type\": \"text\", "
				       "\"text\": ...} (only text is supported)",
				       i, k);
		total += json_string_length(text);
	}
	char *p = malloc(total + 1);
	if (!p)
		return ERR_NOMEM;
	size_t off = 0;
	json_array_foreach(c, k, part)
	{
		json_t *text = json_object_get(part, "text");
		memcpy(p + off, json_string_value(text), json_string_length(text));
		off += json_string_length(text);
	}
	p[off] = 0;
	*out = p;
	return 0;
}

static int api_get_number(json_t *o, const char *key, double lo, double hi, double *v,
			  struct api_error *err)
{
	json_t *j = json_object_get(o, key);
	if (!j || json_is_null(j))
		return 0;
	if (!json_is_number(j))
		return api_bad(err, key, "'%s' must be a number", key);
	double d = json_number_value(j);
	if (!(d >= lo && d <= hi))
		return api_bad(err, key, "'%s' must be between %g and %g", key, lo, hi);
	*v = d;
	return 0;
}

static int api_get_int(json_t *o, const char *key, long lo, long hi, long *v, struct api_error *err)
{
	json_t *j = json_object_get(o, key);
	if (!j || json_is_null(j))
		return 0;
	if (!json_is_integer(j))
		return api_bad(err, key, "'%s' must be an integer", key);
	json_int_t x = json_integer_value(j);
	if (x < lo || x > hi)
		return api_bad(err, key, "'%s' must be an integer in [%ld, %ld]", key, lo, hi);
	*v = (long)x;
	return 0;
}

static int api_get_bool(json_t *o, const char *key, int *v, struct api_error *err)
{
	json_t *j = json_object_get(o, key);
	if (!j || json_is_null(j))
		return 0;
	if (!json_is_boolean(j))
		return api_bad(err, key, "'%s' must be true or false", key);
	*v = json_is_true(j);
	return 0;
}

static int api_parse_messages(json_t *msgs, struct api_request *r, struct api_error *err)
{
	if (!json_is_array(msgs) || json_array_size(msgs) == 0)
		return api_bad(err, "messages", "'messages' must be a non-empty array");
	if (json_array_size(msgs) > 4096)
		return api_bad(err, "messages", "too many messages (at most 4096)");
	r->messages = calloc(json_array_size(msgs), sizeof(*r->messages));
	if (!r->messages)
		return ERR_NOMEM;
	size_t i;
	json_t *m;
	json_array_foreach(msgs, i, m)
	{
		if (!json_is_object(m))
			return api_bad(err, "messages", "messages[%zu] must be an object", i);
		json_t *role = json_object_get(m, "role");
		if (!json_is_string(role))
			return api_bad(err, "messages", "messages[%zu].role must be a string", i);
		struct api_message *am = &r->messages[r->n_messages++];
		am->role = api_strdup_json(role, NULL);
		if (!am->role)
			return ERR_NOMEM;
		int rc = api_get_content(json_object_get(m, "content"), (int)i, &am->content, err);
		if (rc)
			return rc;
		json_t *rs = json_object_get(m, "reasoning_content");
		if (json_is_string(rs)) {
			am->reasoning = api_strdup_json(rs, NULL);
			if (!am->reasoning)
				return ERR_NOMEM;
		}
	}
	return 0;
}

static int api_parse_prompt(json_t *p, struct api_request *r, struct api_error *err)
{
	if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
		p = json_array_get(p, 0);
	if (json_is_string(p)) {
		r->prompt = api_strdup_json(p, &r->prompt_len);
		return r->prompt ? 0 : ERR_NOMEM;
	}
	if (json_is_array(p) && json_array_size(p) > 0 && json_array_size(p) <= (1u << 24)) {
		size_t n = json_array_size(p), i;
		json_t *t;
		r->prompt_ids = malloc(n * sizeof(int32_t));
		if (!r->prompt_ids)
			return ERR_NOMEM;
		json_array_foreach(p, i, t)
		{
			if (!json_is_integer(t) || json_integer_value(t) < 0 ||
			    json_integer_value(t) > INT32_MAX)
				return api_bad(err, "prompt",
					       "'prompt' must be a string, one string in an array, "
					       "or an array of token ids");
			r->prompt_ids[i] = (int32_t)json_integer_value(t);
		}
		r->n_prompt_ids = (int)n;
		return 0;
	}
	return api_bad(err, "prompt",
		       "'prompt' must be a string, one string in an array, or a non-empty array "
		       "of token ids");
}

static int api_parse_stop(json_t *s, struct api_request *r, struct api_error *err)
{
	if (!s || json_is_null(s))
		return 0;
	if (json_is_string(s)) {
		r->stop[r->n_stop++] = api_strdup_json(s, NULL);
		return r->stop[0] ? 0 : ERR_NOMEM;
	}
	if (!json_is_array(s) || json_array_size(s) > API_MAX_STOP)
		return api_bad(err, "stop",
			       "'stop' must be a string or an array of at most %d "
			       "strings",
			       API_MAX_STOP);
	size_t i;
	json_t *t;
	json_array_foreach(s, i, t)
	{
		if (!json_is_string(t))
			return api_bad(err, "stop",
				       "'stop' must be a string or an array of strings");
		if (json_string_length(t) > 1024)
			return api_bad(err, "stop", "stop strings are limited to 1024 bytes");
		char *c = api_strdup_json(t, NULL);
		if (!c)
			return ERR_NOMEM;
		r->stop[r->n_stop++] = c;
	}
	return 0;
}

int api_parse_request(enum api_kind kind, const char *body, size_t len, struct api_request *r,
		      struct api_error *err)
{
	memset(r, 0, sizeof(*r));
	r->kind = kind;
	r->max_tokens = -1;
	r->temperature = 1.0;
	r->top_p = 1.0;
	r->enable_thinking = -1;
	json_error_t je;
	json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
	int rc = 0;
	if (!o) {
		rc = api_bad(err, NULL, "invalid JSON body: %s (line %d, column %d)", je.text,
			     je.line, je.column);
		goto out;
	}
	if (!json_is_object(o)) {
		rc = api_bad(err, NULL, "the request body must be a JSON object");
		goto out;
	}
	json_t *model = json_object_get(o, "model");
	if (model && !json_is_null(model)) {
		if (!json_is_string(model)) {
			rc = api_bad(err, "model", "'model' must be a string");
			goto out;
		}
		r->model = api_strdup_json(model, NULL);
		if (!r->model) {
			rc = ERR_NOMEM;
			goto out;
		}
	}
	if (kind == API_CHAT) {
		rc = api_parse_messages(json_object_get(o, "messages"), r, err);
	} else {
		json_t *p = json_object_get(o, "prompt");
		rc = p ? api_parse_prompt(p, r, err)
		       : api_bad(err, "prompt", "'prompt' is required");
	}
	if (rc)
		goto out;
	long n = 1;
	if ((rc = api_get_int(o, "n", 1, 1, &n, err)))
		goto out;
	const long max_tok = 1L << 24;
	if ((rc = api_get_int(o, "max_tokens", 1, max_tok, &r->max_tokens, err)) ||
	    (rc = api_get_int(o, "max_completion_tokens", 1, max_tok, &r->max_tokens, err)) ||
	    (rc = api_get_number(o, "temperature", 0.0, 2.0, &r->temperature, err)) ||
	    (rc = api_get_number(o, "top_p", 0.0, 1.0, &r->top_p, err)) ||
	    (rc = api_get_int(o, "top_k", 0, 1L << 30, &r->top_k, err)) ||
	    (rc = api_get_bool(o, "stream", &r->stream, err)) ||
	    (rc = api_get_bool(o, "ignore_eos", &r->ignore_eos, err)) ||
	    (rc = api_parse_stop(json_object_get(o, "stop"), r, err)))
		goto out;
	if (r->top_p <= 0.0) {
		rc = api_bad(err, "top_p", "'top_p' must be greater than 0");
		goto out;
	}
	json_t *seed = json_object_get(o, "seed");
	if (seed && !json_is_null(seed)) {
		if (!json_is_integer(seed)) {
			rc = api_bad(err, "seed", "'seed' must be an integer");
			goto out;
		}
		r->has_seed = 1;
		r->seed = (uint64_t)json_integer_value(seed);
	}
	json_t *so = json_object_get(o, "stream_options");
	if (so && !json_is_null(so)) {
		if (!json_is_object(so)) {
			rc = api_bad(err, "stream_options", "'stream_options' must be an object");
			goto out;
		}
		if ((rc = api_get_bool(so, "include_usage", &r->include_usage, err)))
			goto out;
	}
	if (kind == API_CHAT) {
		long top = 0;
		if ((rc = api_get_bool(o, "logprobs", &r->logprobs, err)) ||
		    (rc = api_get_int(o, "top_logprobs", 0, API_MAX_TOP_LOGPROBS, &top, err)))
			goto out;
		r->top_logprobs = (int)top;
		if (top > 0 && !r->logprobs) {
			rc = api_bad(err, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
			goto out;
		}
		json_t *kw = json_object_get(o, "chat_template_kwargs");
		if (json_is_object(kw) &&
		    (rc = api_get_bool(kw, "enable_thinking", &r->enable_thinking, err)))
			goto out;
		json_t *eff = json_object_get(o, "reasoning_effort");
		if (eff && !json_is_null(eff)) {
			const char *e = json_is_string(eff) ? json_string_value(eff) : "";
			if (strcmp(e, "low") && strcmp(e, "medium") && strcmp(e, "high")) {
				rc = api_bad(err, "reasoning_effort",
					     "'reasoning_effort' must be low, medium or high");
				goto out;
			}
			r->reasoning_effort = strdup(e);
		}
	} else {
		long lp = -1;
		json_t *l = json_object_get(o, "logprobs");
		if (json_is_boolean(l)) { /* tolerated: true means 0 alternatives */
			lp = json_is_true(l) ? 0 : -1;
		} else if ((rc = api_get_int(o, "logprobs", 0, API_MAX_TOP_LOGPROBS, &lp, err))) {
			goto out;
		}
		r->logprobs = lp >= 0 && l && !json_is_null(l);
		r->top_logprobs = lp > 0 ? (int)lp : 0;
	}
out:
	json_decref(o);
	if (rc == ERR_NOMEM)
		api_bad(err, NULL, "out of memory");
	if (rc)
		api_request_free(r);
	return rc;
}

void api_request_free(struct api_request *r)
{
	free(r->model);
	for (int i = 0; i < r->n_messages; i++) {
		free(r->messages[i].role);
		free(r->messages[i].content);
		free(r->messages[i].reasoning);
	}
	free(r->messages);
	free(r->prompt);
	free(r->prompt_ids);
	for (int i = 0; i < r->n_stop; i++)
		free(r->stop[i]);
	free(r->reasoning_effort);
	memset(r, 0, sizeof(*r));
}

/* ------------------------------------------------------------ responses */

/* Length of the valid UTF-8 sequence at s[0..n), 0 if there is none. */
static size_t api_utf8_len(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];
	size_t len;
	unsigned char lo = 0x80, hi = 0xBF;
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		len = 2;
	else if (c >= 0xE0 && c <= 0xEF)
		len = 3;
	else if (c >= 0xF0 && c <= 0xF4)
		len = 4;
	else
		return 0;
	if (c == 0xE0)
		lo = 0xA0;
	else if (c == 0xED)
		hi = 0x9F;
	else if (c == 0xF0)
		lo = 0x90;
	else if (c == 0xF4)
		hi = 0x8F;
	if (len > n || s[1] < lo || s[1] > hi)
		return 0;
	for (size_t i = 2; i < len; i++)
		if ((s[i] & 0xC0) != 0x80)
			return 0;
	return len;
}

/* A JSON string of any bytes: invalid UTF-8 becomes U+FFFD. */
static json_t *api_text(const char *s, size_t n)
{
	json_t *j = json_stringn(s, n);
	if (j)
		return j;
	char *o = malloc(3 * n + 1);
	if (!o)
		return NULL;
	size_t k = 0;
	for (size_t i = 0; i < n;) {
		size_t len = api_utf8_len((const unsigned char *)s + i, n - i);
		if (len) {
			memcpy(o + k, s + i, len);
			k += len;
			i += len;
		} else {
			memcpy(o + k, "\xEF\xBF\xBD", 3);
			k += 3;
			i++;
		}
	}
	j = json_stringn(o, k);
	free(o);
	return j;
}

static json_t *api_bytes(const char *s, size_t n)
{
	json_t *a = json_array();
	for (size_t i = 0; a && i < n; i++)
		json_array_append_new(a, json_integer((unsigned char)s[i]));
	return a;
}

static json_t *api_logprobs_json(const struct api_result *r)
{
	if (!r->logprobs)
		return json_null();
	if (r->kind == API_CHAT) {
		json_t *content = json_array();
		for (int i = 0; i < r->n_logprobs; i++) {
			const struct api_logprob *lp = &r->logprobs[i];
			json_t *top = json_array();
			for (int k = 0; k < lp->n_top; k++)
				json_array_append_new(
				    top, json_pack("{s:o,s:f,s:o}", "token",
						   api_text(lp->top[k].text, lp->top[k].len),
						   "logprob", (double)lp->top[k].logprob, "bytes",
						   api_bytes(lp->top[k].text, lp->top[k].len)));
			json_array_append_new(
			    content,
			    json_pack("{s:o,s:f,s:o,s:o}", "token", api_text(lp->text, lp->len),
				      "logprob", (double)lp->logprob, "bytes",
				      api_bytes(lp->text, lp->len), "top_logprobs", top));
		}
		return json_pack("{s:o}", "content", content);
	}
	json_t *tokens = json_array(), *tlp = json_array(), *top = json_array(),
	       *off = json_array();
	size_t o = r->text_offset;
	for (int i = 0; i < r->n_logprobs; i++) {
		const struct api_logprob *lp = &r->logprobs[i];
		json_array_append_new(tokens, api_text(lp->text, lp->len));
		json_array_append_new(tlp, json_real(lp->logprob));
		json_t *t = json_object();
		for (int k = 0; k < lp->n_top; k++) {
			json_t *key = api_text(lp->top[k].text, lp->top[k].len);
			if (key)
				json_object_set_new(t, json_string_value(key),
						    json_real(lp->top[k].logprob));
			json_decref(key);
		}
		json_array_append_new(top, t);
		json_array_append_new(off, json_integer((json_int_t)o));
		o += lp->len;
	}
	return json_pack("{s:o,s:o,s:o,s:o}", "tokens", tokens, "token_logprobs", tlp,
			 "top_logprobs", top, "text_offset", off);
}

static json_t *api_usage(const struct api_result *r)
{
	return json_pack("{s:i,s:i,s:i}", "prompt_tokens", r->prompt_tokens, "completion_tokens",
			 r->completion_tokens, "total_tokens",
			 r->prompt_tokens + r->completion_tokens);
}

static json_t *api_finish(const struct api_result *r)
{
	return r->finish_reason ? json_string(r->finish_reason) : json_null();
}

char *api_result_body(const struct api_result *r, size_t *len)
{
	json_t *choice;
	if (r->kind == API_CHAT) {
		json_t *msg = json_pack("{s:s,s:o}", "role", "assistant", "content",
					api_text(r->text, r->text_len));
		if (msg && r->reasoning_len > 0)
			json_object_set_new(msg, "reasoning_content",
					    api_text(r->reasoning, r->reasoning_len));
		choice = json_pack("{s:i,s:o,s:o,s:o}", "index", 0, "message", msg, "logprobs",
				   api_logprobs_json(r), "finish_reason", api_finish(r));
	} else
		choice = json_pack("{s:i,s:o,s:o,s:o}", "index", 0, "text",
				   api_text(r->text, r->text_len), "logprobs", api_logprobs_json(r),
				   "finish_reason", api_finish(r));
	json_t *j = json_pack("{s:s,s:s,s:I,s:s,s:[o],s:o}", "id", r->id, "object",
			      r->kind == API_CHAT ? "chat.completion" : "text_completion",
			      "created", (json_int_t)r->created, "model", r->model, "choices",
			      choice, "usage", api_usage(r));
	return api_dump(j, len);
}

static char *api_sse(json_t *j, size_t *len)
{
	size_t n = 0;
	char *s = api_dump(j, &n);
	if (!s)
		return NULL;
	char *o = malloc(n + 9);
	if (o) {
		memcpy(o, "data: ", 6);
		memcpy(o + 6, s, n);
		memcpy(o + 6 + n, "\n\n", 3);
		*len = n + 8;
	}
	free(s);
	return o;
}

char *api_result_chunk(const struct api_result *r, int first, size_t *len)
{
	json_t *choice;
	if (r->kind == API_CHAT) {
		json_t *delta = json_object();
		if (first)
			json_object_set_new(delta, "role", json_string("assistant"));
		if (r->text_len > 0 || (first && !r->finish_reason))
			json_object_set_new(delta, "content", api_text(r->text, r->text_len));
		if (r->reasoning_len > 0)
			json_object_set_new(delta, "reasoning_content",
					    api_text(r->reasoning, r->reasoning_len));
		choice = json_pack("{s:i,s:o,s:o,s:o}", "index", 0, "delta", delta, "logprobs",
				   api_logprobs_json(r), "finish_reason", api_finish(r));
	} else {
		choice = json_pack("{s:i,s:o,s:o,s:o}", "index", 0, "text",
				   api_text(r->text, r->text_len), "logprobs", api_logprobs_json(r),
				   "finish_reason", api_finish(r));
	}
	json_t *j =
	    json_pack("{s:s,s:s,s:I,s:s,s:[o]}", "id", r->id, "object",
		      r->kind == API_CHAT ? "chat.completion.chunk" : "text_completion", "created",
		      (json_int_t)r->created, "model", r->model, "choices", choice);
	return api_sse(j, len);
}

char *api_usage_chunk(const struct api_result *r, size_t *len)
{
	json_t *j =
	    json_pack("{s:s,s:s,s:I,s:s,s:[],s:o}", "id", r->id, "object",
		      r->kind == API_CHAT ? "chat.completion.chunk" : "text_completion", "created",
		      (json_int_t)r->created, "model", r->model, "choices", "usage", api_usage(r));
	return api_sse(j, len);
}

char *api_models_body(const char *model, long created, size_t *len)
{
	json_t *j =
	    json_pack("{s:s,s:[{s:s,s:s,s:I,s:s}]}", "object", "list", "data", "id", model,
		      "object", "model", "created", (json_int_t)created, "owned_by", "moefleet");
	return api_dump(j, len);
}
