/* serve_internal: what the files of the server share; private to
 * coordinator/serve/serve*.c (the module's contract is serve.h).
 *  - serve.c: the requests (struct serve_req, freed by the last of its
 *    references), the server (struct serve), the scheduler thread
 *    (serve_loop: one model_batch a step, sampling, stop strings, logprobs)
 *    and serve_new/serve_port/serve_destroy;
 *  - serve_kv.c: the KV-host hooks: refusal of requests that can get no
 *    pages, looking for hosts again, sched's pick hook, recovery after a lost
 *    host;
 *  - serve_http.c: the endpoints (routing, auth, /metrics, the completions
 *    parsed, tokenized and queued, answers waited for whole or streamed). */
#ifndef MOEFLEET_SERVE_INTERNAL_H
#define MOEFLEET_SERVE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "chat.h"
#include "http.h"
#include "kvroom.h"
#include "metrics.h"
#include "sampler.h"
#include "sched.h"
#include "serve.h"

/* ------------------------------------------------------------ requests
 *
 * A request is shared by its connection thread and the scheduler thread and
 * freed by whichever lets go of it last (refs, under serve.mu).  Fields marked
 * [sched] are touched by the scheduler thread only; [mu] under serve.mu. */
struct serve_req {
	uint64_t id;
	char id_str[48];
	enum api_kind kind;
	const char *endpoint;
	int stream, include_usage;
	int32_t *prompt;
	int n_prompt;
	int max_tokens;
	int logprobs, top_logprobs;
	int ignore_eos;
	char *stops[API_MAX_STOP];
	int n_stops;
	int fd;
	double t_arrive;
	/* [sched] */
	sampler *smp;
	tokenizer_stream *ts;
	int32_t last_token;
	int32_t *gen; /* [max_tokens]: the tokens sampled, to compute the sequence again */
	int n_gen;
	char *held; /* text that might begin a stop string */
	size_t held_len, held_cap;
	double t_first, t_last;
	/* [mu] */
	int refs;
	int in_sched; /* still known to the scheduler */
	int refused;  /* status: the pick hook dropped it from the queue */
	char refuse_msg[256];
	int cancelled;
	int done;
	const char *finish;
	int err_status;
	char err_msg[256];
	char *out; /* released text (chat: the answer) not yet sent */
	size_t out_len, out_cap;
	char *rout; /* chat: released reasoning not yet sent */
	size_t rout_len, rout_cap;
	chat_parser *parser;	 /* [sched] chat: splits reasoning from the answer */
	size_t out_total;	 /* released bytes so far */
	struct api_logprob *lps; /* logprobs not yet sent */
	int n_lps, cap_lps;
	double ttft;
	pthread_cond_t cv;
};

struct serve {
	model *m;
	const tokenizer *tok;
	struct serve_config cfg;
	enum chat_format chat;
	char model_name[256];
	int n_vocab;
	long created;
	pthread_mutex_t mu;
	pthread_cond_t work_cv;
	pthread_mutex_t fwd_mu; /* held while the model runs */
	sched *sch;
	struct serve_req **reqs; /* [n_reqs]: requests known to the scheduler */
	int n_reqs;
	uint64_t next_id;
	int stop;
	pthread_t thread;
	int thread_started;
	metrics *met;
	http *h;
	kvroom *room;	 /* [mu] the KV hosts' room */
	int kv_dead;	 /* [mu] no KV host left: requests that need pages are refused */
	char kv_why[64]; /* [mu] which host was lost */
	double kv_retry; /* [mu] when kv_dead: the next time to look for hosts */
	/* scheduler thread buffers */
	struct sched_item *items;
	int32_t *b_tok, *b_pos, *b_seq;
	uint8_t *b_want;
	float *logits;
	float *scratch; /* [n_vocab]: logits of the steps computed again */
	char *piece;
	size_t piece_cap;
	int *top_idx;
};

/* ------------------------------------------------------------ serve.c */

/* Monotonic clock, in seconds. */
double serve_now(void);
/* Grows *p (capacity *cap) to hold need bytes. */
int serve_grow(char **p, size_t *cap, size_t need);
/* Frees the texts of lps[0..n), not the array. */
void serve_lps_free(struct api_logprob *lps, int n);
/* Frees r whatever its references; serve_req_unref() drops one, under s->mu. */
void serve_req_free(struct serve_req *r);
void serve_req_unref(struct serve_req *r);
/* The request id known to the scheduler, or NULL; under s->mu. */
struct serve_req *serve_find(serve *s, uint64_t id);
/* The queue, slot and KV gauges of the metrics; under s->mu. */
void serve_update_load(serve *s);
/* Ends r (finish reason, or an error status and message) and forgets it on
 * the scheduler side, its slot's KV pages freed; under s->mu, not s->fwd_mu. */
void serve_finish(serve *s, struct serve_req *r, const char *finish, int err_status,
		  const char *err_msg);

/* ------------------------------------------------------------ serve_kv.c */

/* Admission: the status (400, 503) and message refusing a request, or 0;
 * looking for KV hosts again once none is left (serve_submit). */
int serve_kv_refusal(serve *s, int n_prompt, int n_max, char *msg, size_t cap);
void serve_kv_retry(serve *s, int n_pos);
/* sched's pick hook (serve_new) and the recovery of a failed step
 * (serve_loop). */
int serve_pick(void *ctx, uint64_t id, int n_pos, const uint8_t *busy);
int serve_kv_recover(serve *s, int n, int frc);

/* ------------------------------------------------------------ serve_http.c */

/* http's handler: one request of a connection thread. */
void serve_handle(void *ctx, const struct http_request *hr, struct http_response *res);

#endif
