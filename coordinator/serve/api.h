/* api: the OpenAI-compatible JSON of `moefleet serve` (the only user of
 * jansson).
 *
 * api_parse_request() reads a /v1/chat/completions or /v1/completions body
 * into a plain struct, checking every field it knows (type, range) and
 * ignoring the others; a problem becomes an api_error (HTTP status, message,
 * the offending parameter) that api_error_body() turns into OpenAI's shape
 * {"error": {"message", "type", "param", "code"}}.  Invalid JSON, invalid
 * UTF-8 and NUL characters in strings are refused by the parser.
 *
 * The other functions build response bodies: the whole completion, one
 * server-sent-events chunk ("data: {...}\n\n"), the model list.  Text given to
 * them may hold any bytes; what is not valid UTF-8 is written as U+FFFD. */
#ifndef MOEFLEET_API_H
#define MOEFLEET_API_H

#include <stddef.h>
#include <stdint.h>

enum api_kind { API_CHAT, API_COMPLETION };

#define API_MAX_STOP	     16
#define API_MAX_TOP_LOGPROBS 20

struct api_message {
	char *role;
	char *content;
	char *reasoning; /* reasoning_content, or NULL */
};

struct api_request {
	enum api_kind kind;
	char *model; /* NULL if absent */
	struct api_message *messages;
	int n_messages;
	char *prompt; /* completions, text form */
	size_t prompt_len;
	int32_t *prompt_ids; /* completions, token-id form */
	int n_prompt_ids;
	long max_tokens; /* -1: not given */
	double temperature, top_p;
	long top_k;
	int has_seed;
	uint64_t seed;
	char *stop[API_MAX_STOP];
	int n_stop;
	int stream, include_usage;
	int ignore_eos;	     /* 1: end-of-generation tokens do not stop (benchmarks, tests) */
	int logprobs;	     /* 1: report the chosen tokens' log-probabilities */
	int top_logprobs;    /* and this many alternatives */
	int enable_thinking; /* -1 unset */
	char *reasoning_effort;
};

struct api_error {
	int status;
	const char *type;  /* invalid_request_error, authentication_error, ... */
	const char *param; /* static string or NULL */
	const char *code;  /* static string or NULL */
	char message[512];
};

/* 0, or ERR_CONFIG with *err filled in (status 400). */
int api_parse_request(enum api_kind kind, const char *body, size_t len, struct api_request *out,
		      struct api_error *err);
void api_request_free(struct api_request *r);

void api_error_set(struct api_error *e, int status, const char *type, const char *param,
		   const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Returns a malloc'ed body (NULL on allocation failure). */
char *api_error_body(const struct api_error *e, size_t *len);

struct api_top {
	const char *text; /* the token's bytes */
	size_t len;
	float logprob;
};

/* One generated token's log-probability and its best alternatives. */
struct api_logprob {
	char *text;
	size_t len;
	float logprob;
	int n_top;
	struct api_top top[API_MAX_TOP_LOGPROBS];
};

struct api_result {
	enum api_kind kind;
	const char *id;
	long created;
	const char *model;
	const char *text; /* any bytes */
	size_t text_len;
	const char *reasoning; /* chat: reasoning_content, when reasoning_len > 0 */
	size_t reasoning_len;
	const char *finish_reason; /* "stop", "length" or NULL (streaming, not yet) */
	int prompt_tokens, completion_tokens;
	const struct api_logprob *logprobs; /* NULL: no logprobs field */
	int n_logprobs;
	size_t text_offset; /* completions: where this text starts in the whole output */
};

/* The whole (non-streamed) response. */
char *api_result_body(const struct api_result *r, size_t *len);
/* One SSE event with a chunk: text so far unsent (may be empty), finish
 * reason when it ends.  first: a chat stream's first chunk (role). */
char *api_result_chunk(const struct api_result *r, int first, size_t *len);
/* The SSE event carrying only usage (stream_options.include_usage). */
char *api_usage_chunk(const struct api_result *r, size_t *len);
char *api_models_body(const char *model, long created, size_t *len);

#endif
