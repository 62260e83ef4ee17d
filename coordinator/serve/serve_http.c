/* serve_http: the server's HTTP side (see serve.h): serve_handle() routes
 * each request of a connection thread (auth, /health, /v1/models, /metrics,
 * the completions); a completion is parsed, tokenized and queued with the
 * scheduler (serve_submit), then waited for whole or streamed as server-sent
 * events. */
#define _GNU_SOURCE
#include "serve.h"
#include "serve_internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "api.h"
#include "chat.h"
#include "http.h"
#include "kvroom.h"
#include "metrics.h"
#include "sampler.h"
#include "sched.h"

/* ------------------------------------------------------------ HTTP side */

static void serve_json(struct http_response *res, int status, char *body, size_t len)
{
	res->status = body ? status : 500;
	res->content_type = "application/json";
	res->body = body;
	res->body_len = body ? len : 0;
}

static void serve_error(serve *s, struct http_response *res, const char *endpoint,
			const struct api_error *e)
{
	size_t len = 0;
	char *body = api_error_body(e, &len);
	serve_json(res, e->status, body, len);
	metrics_count_request(s->met, endpoint, e->status);
	log_info("request - %s status=%d error=\"%s\"", endpoint, e->status, e->message);
}

static int serve_auth_ok(const serve *s, const char *hdr)
{
	if (!s->cfg.api_key)
		return 1;
	if (!hdr || strncmp(hdr, "Bearer ", 7))
		return 0;
	const char *k = hdr + 7, *want = s->cfg.api_key;
	size_t lk = strlen(k), lw = strlen(want);
	unsigned diff = (unsigned)(lk ^ lw);
	for (size_t i = 0; i < lw; i++)
		diff |= (unsigned char)want[i] ^ (unsigned char)(i < lk ? k[i] : 0);
	return diff == 0;
}

/* Tokenizes the request's prompt into r->prompt. */
static int serve_tokenize(serve *s, const struct api_request *q, struct serve_req *r,
			  struct api_error *e)
{
	char *text = NULL;
	size_t len = 0;
	int rc = 0;
	if (q->kind == API_COMPLETION && q->prompt_ids) {
		r->prompt = malloc((size_t)q->n_prompt_ids * sizeof(int32_t));
		if (!r->prompt)
			return ERR_NOMEM;
		for (int i = 0; i < q->n_prompt_ids; i++) {
			if (q->prompt_ids[i] >= s->n_vocab) {
				api_error_set(e, 400, "invalid_request_error", "prompt", NULL,
					      "token id %d is out of range (vocabulary of %d)",
					      q->prompt_ids[i], s->n_vocab);
				return ERR_CONFIG;
			}
			r->prompt[i] = q->prompt_ids[i];
		}
		r->n_prompt = q->n_prompt_ids;
		return 0;
	}
	if (q->kind == API_CHAT) {
		struct chat_message *cm = calloc((size_t)q->n_messages, sizeof(*cm));
		if (!cm)
			return ERR_NOMEM;
		for (int i = 0; i < q->n_messages; i++)
			cm[i] = (struct chat_message){q->messages[i].role, q->messages[i].content,
						      q->messages[i].reasoning};
		struct chat_options o = {.add_generation_prompt = 1,
					 .enable_thinking = q->enable_thinking,
					 .reasoning_effort = q->reasoning_effort};
		char date[16];
		time_t now = time(NULL);
		struct tm tmv;
		if (gmtime_r(&now, &tmv) && strftime(date, sizeof(date), "%Y-%m-%d", &tmv))
			o.date = date;
		char msg[256] = "";
		rc = chat_render(s->chat, cm, q->n_messages, &o, &text, &len, msg, sizeof(msg));
		free(cm);
		if (rc == ERR_CONFIG) {
			api_error_set(e, 400, "invalid_request_error", "messages", NULL, "%s", msg);
			return rc;
		}
		if (rc)
			return rc;
	} else {
		text = q->prompt;
		len = q->prompt_len;
	}
	size_t cap = len + 2, need = 0, off = 0;
	r->prompt = malloc(cap * sizeof(int32_t));
	if (!r->prompt) {
		rc = ERR_NOMEM;
		goto out;
	}
	if (tokenizer_add_bos(s->tok) && tokenizer_bos(s->tok) >= 0)
		r->prompt[off++] = tokenizer_bos(s->tok);
	rc = tokenizer_encode(s->tok, text, len, 1, r->prompt + off, cap - off, &need);
	if (rc) {
		api_error_set(e, 400, "invalid_request_error", NULL, NULL,
			      "the prompt cannot be tokenized");
		rc = ERR_CONFIG;
		goto out;
	}
	r->n_prompt = (int)(off + need);
	if (r->n_prompt == 0) {
		api_error_set(e, 400, "invalid_request_error", "prompt", NULL,
			      "the prompt is empty");
		rc = ERR_CONFIG;
	}
out:
	if (text != q->prompt)
		free(text);
	return rc;
}

/* Builds and queues a request; on failure fills *e (status) and returns < 0. */
static int serve_submit(serve *s, const struct api_request *q, const struct http_request *hr,
			const char *endpoint, struct serve_req **out, struct api_error *e)
{
	*out = NULL;
	if (q->model && strcmp(q->model, s->model_name)) {
		api_error_set(e, 404, "invalid_request_error", "model", "model_not_found",
			      "The model '%s' does not exist; this server serves '%s'", q->model,
			      s->model_name);
		return ERR_CONFIG;
	}
	struct serve_req *r = calloc(1, sizeof(*r));
	if (!r)
		goto nomem;
	pthread_cond_init(&r->cv, NULL);
	r->kind = q->kind;
	r->endpoint = endpoint;
	r->stream = q->stream;
	r->include_usage = q->include_usage;
	r->logprobs = q->logprobs;
	r->ignore_eos = q->ignore_eos;
	r->top_logprobs = q->top_logprobs;
	r->fd = hr->fd;
	r->t_arrive = serve_now();
	r->refs = 1;
	int rc = serve_tokenize(s, q, r, e);
	if (rc == ERR_NOMEM)
		goto nomem;
	if (rc)
		goto fail;
	if (r->n_prompt >= s->cfg.n_ctx) {
		api_error_set(e, 400, "invalid_request_error", "messages",
			      "context_length_exceeded",
			      "This model's maximum context length is %d tokens, but the prompt "
			      "has %d tokens; shorten the prompt",
			      s->cfg.n_ctx, r->n_prompt);
		goto fail;
	}
	if (q->max_tokens > 0 && r->n_prompt + q->max_tokens > s->cfg.n_ctx) {
		api_error_set(e, 400, "invalid_request_error", "max_tokens",
			      "context_length_exceeded",
			      "This model's maximum context length is %d tokens; the prompt (%d "
			      "tokens) plus max_tokens (%ld) exceeds it",
			      s->cfg.n_ctx, r->n_prompt, q->max_tokens);
		goto fail;
	}
	r->max_tokens = q->max_tokens > 0 ? (int)q->max_tokens : s->cfg.n_ctx - r->n_prompt;
	r->gen = malloc((size_t)r->max_tokens * sizeof(int32_t));
	if (!r->gen)
		goto nomem;
	for (int i = 0; i < q->n_stop; i++) {
		if (!q->stop[i][0])
			continue;
		r->stops[r->n_stops] = strdup(q->stop[i]);
		if (!r->stops[r->n_stops++])
			goto nomem;
	}
	struct sampler_params sp = {.temp = (float)q->temperature,
				    .top_k = (int)q->top_k,
				    .top_p = (float)q->top_p,
				    .seed = q->has_seed ? q->seed : 0};
	pthread_mutex_lock(&s->mu);
	r->id = ++s->next_id;
	if (!q->has_seed)
		sp.seed = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull + r->id;
	pthread_mutex_unlock(&s->mu);
	snprintf(r->id_str, sizeof(r->id_str), "%s-%llx%06llu",
		 q->kind == API_CHAT ? "chatcmpl" : "cmpl", (unsigned long long)s->created,
		 (unsigned long long)r->id);
	if (sampler_new(&sp, s->n_vocab, &r->smp) || tokenizer_stream_new(s->tok, 0, &r->ts) ||
	    (r->kind == API_CHAT && chat_parser_new(s->chat, &r->parser)))
		goto nomem;
	pthread_mutex_lock(&s->mu);
	serve_kv_retry(s, r->n_prompt + r->max_tokens);
	char why[256];
	int kv_st = serve_kv_refusal(s, r->n_prompt, r->max_tokens, why, sizeof(why));
	if (kv_st) {
		pthread_mutex_unlock(&s->mu);
		api_error_set(e, kv_st, kv_st == 400 ? "invalid_request_error" : "server_error",
			      kv_st == 400 ? "max_tokens" : NULL,
			      kv_st == 400 ? "context_length_exceeded" : NULL, "%s", why);
		goto fail;
	}
	rc = s->stop ? ERR_RANGE : sched_add(s->sch, r->id, r->n_prompt, r->max_tokens);
	if (rc == 0) {
		for (int i = 0; i < s->n_reqs; i++) {
			if (!s->reqs[i]) {
				s->reqs[i] = r;
				break;
			}
		}
		r->refs = 2;
		r->in_sched = 1;
		serve_update_load(s);
		pthread_cond_signal(&s->work_cv);
	}
	pthread_mutex_unlock(&s->mu);
	if (rc == ERR_RANGE) {
		api_error_set(e, 503, "server_error", NULL, "overloaded",
			      "The server is overloaded (%d requests running, %d queued); retry "
			      "later",
			      s->cfg.n_slots, s->cfg.queue_cap);
		goto fail;
	}
	if (rc) {
		api_error_set(e, 400, "invalid_request_error", NULL, NULL,
			      "the request does not fit the context");
		goto fail;
	}
	*out = r;
	return 0;
nomem:
	api_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
fail:
	if (r)
		serve_req_free(r);
	return ERR_CONFIG;
}

static void serve_log_done(serve *s, struct serve_req *r, int status)
{
	double now = serve_now();
	log_info("request %s %s status=%d prompt=%d completion=%d ttft=%.3fs total=%.3fs "
		 "finish=%s%s%s",
		 r->id_str, r->endpoint, status, r->n_prompt, r->n_gen, r->n_gen ? r->ttft : 0.0,
		 now - r->t_arrive, r->finish ? r->finish : "none", r->err_status ? " error=" : "",
		 r->err_status ? r->err_msg : "");
	metrics_count_request(s->met, r->endpoint, status);
	metrics_count_tokens(s->met, r->n_prompt, r->n_gen);
}

/* Marks r cancelled (client gone); under s->mu. */
static void serve_cancel(serve *s, struct serve_req *r)
{
	if (!r->done && !r->cancelled) {
		r->cancelled = 1;
		pthread_cond_signal(&s->work_cv);
	}
}

static void serve_timed_wait(struct serve_req *r, pthread_mutex_t *mu, int ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += (long)ms * 1000000L;
	ts.tv_sec += ts.tv_nsec / 1000000000L;
	ts.tv_nsec %= 1000000000L;
	pthread_cond_timedwait(&r->cv, mu, &ts);
}

static void serve_result(serve *s, const struct serve_req *r, struct api_result *res)
{
	*res = (struct api_result){.kind = r->kind,
				   .id = r->id_str,
				   .created = time(NULL),
				   .model = s->model_name,
				   .text = r->out,
				   .text_len = r->out_len,
				   .reasoning = r->rout,
				   .reasoning_len = r->rout_len,
				   .finish_reason = r->finish,
				   .prompt_tokens = r->n_prompt,
				   .completion_tokens = r->n_gen,
				   .logprobs = r->logprobs ? r->lps : NULL,
				   .n_logprobs = r->n_lps,
				   .text_offset = r->out_total - r->out_len};
}

static void serve_wait_whole(serve *s, struct serve_req *r, struct http_response *res)
{
	pthread_mutex_lock(&s->mu);
	while (!r->done) {
		serve_timed_wait(r, &s->mu, 50);
		if (!r->done && http_conn_closed(r->fd))
			serve_cancel(s, r);
	}
	struct api_error e;
	if (r->err_status) {
		api_error_set(&e, r->err_status, "server_error", NULL, NULL, "%s", r->err_msg);
		size_t len = 0;
		char *body = api_error_body(&e, &len);
		serve_json(res, r->err_status, body, len);
	} else {
		struct api_result ar;
		serve_result(s, r, &ar);
		size_t len = 0;
		char *body = api_result_body(&ar, &len);
		serve_json(res, 200, body, len);
	}
	serve_log_done(s, r, res->status);
	serve_req_unref(r);
	pthread_mutex_unlock(&s->mu);
}

/* ------------------------------------------------------------ streaming */

struct serve_stream {
	serve *s;
	struct serve_req *r;
	char *buf; /* bytes built but not yet handed to http */
	size_t len, off, cap;
	int first, ended, logged;
};

/* Appends a built event (taken over) of n bytes. */
static int serve_stream_add(struct serve_stream *st, char *chunk, size_t n)
{
	if (!chunk)
		return ERR_NOMEM;
	int rc = serve_grow(&st->buf, &st->cap, st->len + n + 1);
	if (!rc) {
		memcpy(st->buf + st->len, chunk, n);
		st->len += n;
	}
	free(chunk);
	return rc;
}

/* Turns what the request released into SSE events; under s->mu. */
static int serve_stream_fill(struct serve_stream *st)
{
	struct serve_req *r = st->r;
	struct api_result ar;
	serve_result(st->s, r, &ar);
	size_t n = 0;
	if (r->out_len > 0 || r->rout_len > 0 || r->n_lps > 0 || (st->first && !r->done)) {
		ar.finish_reason = NULL;
		char *ev = api_result_chunk(&ar, st->first, &n);
		if (serve_stream_add(st, ev, n))
			return ERR_NOMEM;
		st->first = 0;
		r->out_len = 0;
		r->rout_len = 0;
		serve_lps_free(r->lps, r->n_lps);
		r->n_lps = 0;
	}
	if (r->done && !st->ended) {
		if (r->err_status) {
			struct api_error e;
			api_error_set(&e, r->err_status, "server_error", NULL, NULL, "%s",
				      r->err_msg);
			char *body = api_error_body(&e, &n);
			if (body) {
				char *ev = NULL;
				if (asprintf(&ev, "data: %s\n\n", body) < 0)
					ev = NULL;
				free(body);
				if (serve_stream_add(st, ev, ev ? strlen(ev) : 0))
					return ERR_NOMEM;
			}
		} else {
			serve_result(st->s, r, &ar);
			ar.text_len = 0;
			ar.reasoning_len = 0;
			ar.logprobs = NULL;
			char *ev = api_result_chunk(&ar, st->first, &n);
			if (serve_stream_add(st, ev, n))
				return ERR_NOMEM;
			if (r->include_usage) {
				ev = api_usage_chunk(&ar, &n);
				if (serve_stream_add(st, ev, n))
					return ERR_NOMEM;
			}
		}
		if (serve_stream_add(st, strdup("data: [DONE]\n\n"), 14))
			return ERR_NOMEM;
		st->ended = 1;
	}
	return 0;
}

static ssize_t serve_stream_read(void *ctx, char *buf, size_t cap)
{
	struct serve_stream *st = ctx;
	serve *s = st->s;
	pthread_mutex_lock(&s->mu);
	ssize_t ret = -1;
	for (;;) {
		if (st->off < st->len) {
			size_t n = st->len - st->off;
			if (n > cap)
				n = cap;
			memcpy(buf, st->buf + st->off, n);
			st->off += n;
			if (st->off == st->len)
				st->off = st->len = 0;
			ret = (ssize_t)n;
			break;
		}
		if (st->ended) {
			ret = 0;
			break;
		}
		if (serve_stream_fill(st))
			break;
		if (st->len > 0)
			continue;
		serve_timed_wait(st->r, &s->mu, 50);
		if (!st->r->done && http_conn_closed(st->r->fd)) {
			serve_cancel(s, st->r);
			break;
		}
	}
	pthread_mutex_unlock(&s->mu);
	return ret;
}

static void serve_stream_free(void *ctx)
{
	struct serve_stream *st = ctx;
	serve *s = st->s;
	pthread_mutex_lock(&s->mu);
	serve_cancel(s, st->r);
	if (st->r->cancelled && !st->r->err_status) {
		st->r->err_status = 499;
		snprintf(st->r->err_msg, sizeof(st->r->err_msg), "client closed the connection");
	}
	serve_log_done(s, st->r, st->ended && !st->r->cancelled ? 200 : 499);
	serve_req_unref(st->r);
	pthread_mutex_unlock(&s->mu);
	free(st->buf);
	free(st);
}

/* ------------------------------------------------------------ routing */

static void serve_completion(serve *s, enum api_kind kind, const char *endpoint,
			     const struct http_request *hr, struct http_response *res)
{
	struct api_error e = {0};
	struct api_request q;
	if (hr->body_too_large) {
		api_error_set(&e, 400, "invalid_request_error", NULL, NULL,
			      "the request body exceeds %zu bytes", s->cfg.max_body);
		serve_error(s, res, endpoint, &e);
		return;
	}
	if (api_parse_request(kind, hr->body, hr->body_len, &q, &e)) {
		serve_error(s, res, endpoint, &e);
		return;
	}
	struct serve_req *r = NULL;
	int rc = serve_submit(s, &q, hr, endpoint, &r, &e);
	api_request_free(&q);
	if (rc) {
		serve_error(s, res, endpoint, &e);
		return;
	}
	if (!r->stream) {
		serve_wait_whole(s, r, res);
		return;
	}
	struct serve_stream *st = calloc(1, sizeof(*st));
	if (!st) {
		pthread_mutex_lock(&s->mu);
		serve_cancel(s, r);
		serve_req_unref(r);
		pthread_mutex_unlock(&s->mu);
		api_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
		serve_error(s, res, endpoint, &e);
		return;
	}
	st->s = s;
	st->r = r;
	st->first = 1;
	res->status = 200;
	res->content_type = "text/event-stream";
	res->read = serve_stream_read;
	res->free_fn = serve_stream_free;
	res->ctx = st;
}

static void serve_metrics(serve *s, struct http_response *res)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f) {
		res->status = 500;
		return;
	}
	metrics_write(s->met, f);
	int64_t used[ATTN_MAX_HOSTS], total[ATTN_MAX_HOSTS];
	pthread_mutex_lock(&s->mu);
	const int n_hosts = s->kv_dead ? 0 : kvroom_n_hosts(s->room);
	for (int h = 0; h < n_hosts; h++)
		kvroom_pages(s->room, h, &used[h], &total[h]);
	pthread_mutex_unlock(&s->mu);
	metrics_write_kv_hosts(f, n_hosts, used, total);
	if (s->cfg.metrics_hook) {
		pthread_mutex_lock(&s->fwd_mu);
		s->cfg.metrics_hook(s->cfg.metrics_ctx, f);
		pthread_mutex_unlock(&s->fwd_mu);
	} else {
		fputs("# (no cluster: experts run in this process)\n", f);
	}
	fclose(f);
	res->status = 200;
	res->content_type = "text/plain; version=0.0.4";
	res->body = buf;
	res->body_len = len;
}

void serve_handle(void *ctx, const struct http_request *hr, struct http_response *res)
{
	serve *s = ctx;
	struct api_error e = {0};
	const char *url = hr->url;
	int get = !strcmp(hr->method, "GET"), post = !strcmp(hr->method, "POST");
	if (!strcmp(url, "/health")) {
		if (!get) {
			api_error_set(&e, 405, "invalid_request_error", NULL, NULL,
				      "use GET for %s", url);
			serve_error(s, res, "/health", &e);
			return;
		}
		char *b = strdup("{\"status\":\"ok\"}");
		serve_json(res, 200, b, b ? strlen(b) : 0);
		metrics_count_request(s->met, "/health", 200);
		return;
	}
	const char *endpoint = !strcmp(url, "/v1/chat/completions") ? "/v1/chat/completions"
			       : !strcmp(url, "/v1/completions")    ? "/v1/completions"
			       : !strcmp(url, "/v1/models")	    ? "/v1/models"
			       : !strcmp(url, "/metrics")	    ? "/metrics"
								    : "other";
	if (!serve_auth_ok(s, hr->authorization)) {
		api_error_set(&e, 401, "invalid_request_error", NULL, "invalid_api_key",
			      hr->authorization ? "Incorrect API key provided"
						: "Missing API key: send 'Authorization: Bearer "
						  "KEY'");
		serve_error(s, res, endpoint, &e);
		return;
	}
	if (!strcmp(endpoint, "other")) {
		api_error_set(&e, 404, "invalid_request_error", NULL, "not_found",
			      "unknown path; endpoints: /v1/chat/completions, /v1/completions, "
			      "/v1/models, /health, /metrics");
		serve_error(s, res, endpoint, &e);
		return;
	}
	int chat = !strcmp(endpoint, "/v1/chat/completions");
	int want_post = chat || !strcmp(endpoint, "/v1/completions");
	if ((want_post && !post) || (!want_post && !get)) {
		api_error_set(&e, 405, "invalid_request_error", NULL, NULL, "use %s for %s",
			      want_post ? "POST" : "GET", endpoint);
		serve_error(s, res, endpoint, &e);
		return;
	}
	if (!strcmp(endpoint, "/v1/models")) {
		size_t len = 0;
		char *b = api_models_body(s->model_name, s->created, &len);
		serve_json(res, 200, b, len);
		metrics_count_request(s->met, endpoint, 200);
	} else if (!strcmp(endpoint, "/metrics")) {
		serve_metrics(s, res);
	} else {
		serve_completion(s, chat ? API_CHAT : API_COMPLETION, endpoint, hr, res);
	}
}
