/* serve: an OpenAI-compatible HTTP server with continuous batching.
 *
 * One scheduler thread owns the model.  HTTP connection threads parse and
 * tokenize requests (api.h, chat.h, tokenizer.h) and queue them with the
 * scheduler (sched.h, under the server's lock); every forward step takes one
 * decode token of each running request and prefill chunks of new ones into one
 * model_batch, then samples each request's next token with its own sampler and
 * checks its stop conditions (end-of-generation token, stop strings,
 * max_tokens).  Text reaches the client only as whole UTF-8 characters, and
 * never any part of a stop string.  A client that goes away cancels its
 * request: its slot is freed and its KV cache cleared before the next step.
 *
 * Endpoints: POST /v1/chat/completions, POST /v1/completions (both also
 * streamed as server-sent events), GET /v1/models, GET /health, GET /metrics
 * (metrics.h, followed by what the metrics hook writes, e.g. the cluster's).
 * With an API key every endpoint but /health needs "Authorization: Bearer
 * KEY".  Errors use OpenAI's JSON shape: 400 bad request (invalid JSON or
 * UTF-8, wrong types or ranges, body too large, context overflow), 401 key,
 * 404 unknown model or path, 405 method, 503 overloaded (every slot busy and
 * the queue full, or a lost KV host, below).  One log line per request.
 *
 * KV hosts (the model's sharded attention with its pages on workers):
 * admission is per request (kvroom.h): a request whose prompt + max_tokens
 * does not fit beside the pages of the running requests waits in the queue
 * until enough of them end (an ended request's pages are freed on the hosts),
 * and is refused with 400 only if it would not fit with every slot empty.
 * When a step fails because a KV host was lost, kv_recover gives the chains
 * to the hosts left (or back here) and every running request's sequence is
 * computed again from its ids in the steps it had (prompt chunks, then one
 * token per step), so its output is the uninterrupted one; with no host left
 * the requests that need pages end with 503 naming the host, later ones are
 * refused the same way until a worker offering KV memory joins (looked for at
 * most once a second), and shorter ones are served. */
#ifndef MOEFLEET_SERVE_H
#define MOEFLEET_SERVE_H

#include <stddef.h>
#include <stdio.h>

#include "../../common/tokenizer.h"
#include "../model/model.h"

struct serve_config {
	const char *host;	/* NULL: 127.0.0.1 */
	int port;		/* 0: any free port */
	const char *api_key;	/* NULL: no authentication */
	const char *model_name; /* the id of /v1/models and the accepted "model" */
	int n_slots;		/* = the model's n_seq */
	int n_ctx;		/* = the model's n_ctx */
	int max_batch;		/* tokens per step, <= the model's n_batch */
	int chunk;		/* prefill chunk; chunk + n_slots <= max_batch */
	int queue_cap;		/* requests waiting for a slot before 503 */
	size_t max_body;
	int max_conns;
	/* Called for GET /metrics after the server's own metrics, on a connection
	 * thread while no forward step runs; returns 0 or a negative code. */
	int (*metrics_hook)(void *ctx, FILE *f);
	void *metrics_ctx;
	/* Optional, called on the scheduler thread after a failed step, while no
	 * other forward runs: 0 when a KV host was lost and the chains went to
	 * the hosts left (or back here), ERR_PEER when no KV host was lost, or
	 * another negative code when none is left; why gets "KV host H (worker
	 * W) was lost" in both of the last cases. */
	int (*kv_recover)(void *ctx, char *why, size_t cap);
	void *kv_ctx;
};

typedef struct serve serve;

/* Starts the scheduler thread and the HTTP server.  The model and the
 * tokenizer must outlive the server; nothing else may use the model meanwhile. */
int serve_new(model *m, const tokenizer *tok, const struct serve_config *cfg, serve **out);
/* The port the server listens on. */
int serve_port(const serve *s);
/* Stops accepting connections, ends every request, joins the threads. */
void serve_destroy(serve **s);

#endif
