/* serve: the requests and the scheduler thread (see serve.h and
 * serve_internal.h).  A request's output: its sampled tokens detokenized, held
 * back while they might begin a stop string, logprobs; the scheduler thread
 * turns each step of sched.h into a model_batch and samples; serve_new() starts
 * it and the HTTP server (serve_http.c), with the KV hosts' pick hook
 * (serve_kv.c). */
#define _GNU_SOURCE
#include "serve.h"
#include "serve_internal.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
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

/* ------------------------------------------------------------ requests */

double serve_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int serve_grow(char **p, size_t *cap, size_t need)
{
	if (need <= *cap)
		return 0;
	size_t c = *cap ? *cap : 256;
	while (c < need)
		c *= 2;
	char *t = realloc(*p, c);
	if (!t)
		return ERR_NOMEM;
	*p = t;
	*cap = c;
	return 0;
}

void serve_lps_free(struct api_logprob *lps, int n)
{
	for (int i = 0; i < n; i++) {
		free(lps[i].text);
		for (int k = 0; k < lps[i].n_top; k++)
			free((char *)lps[i].top[k].text);
	}
}

void serve_req_free(struct serve_req *r)
{
	free(r->prompt);
	free(r->gen);
	for (int i = 0; i < r->n_stops; i++)
		free(r->stops[i]);
	sampler_destroy(&r->smp);
	tokenizer_stream_destroy(&r->ts);
	free(r->held);
	free(r->out);
	free(r->rout);
	chat_parser_destroy(&r->parser);
	serve_lps_free(r->lps, r->n_lps);
	free(r->lps);
	pthread_cond_destroy(&r->cv);
	free(r);
}

/* Under s->mu. */
void serve_req_unref(struct serve_req *r)
{
	if (--r->refs == 0)
		serve_req_free(r);
}

/* ------------------------------------------------------------ scheduler thread */

struct serve_req *serve_find(serve *s, uint64_t id)
{
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i] && s->reqs[i]->id == id)
			return s->reqs[i];
	return NULL;
}

void serve_update_load(serve *s)
{
	metrics_set_load(s->met, sched_n_queued(s->sch), sched_n_active(s->sch), s->cfg.n_slots,
			 sched_n_kv_used(s->sch), (int64_t)s->cfg.n_slots * s->cfg.n_ctx);
}

/* Forgets a request on the scheduler side; its slot's sequence is reset,
 * which frees its pages on the KV hosts, and gives their room back; under
 * s->mu, on the scheduler thread (no step runs). */
static void serve_drop(serve *s, struct serve_req *r)
{
	int slot = sched_remove(s->sch, r->id);
	if (slot >= 0) {
		pthread_mutex_lock(&s->fwd_mu);
		model_reset_seq(s->m, slot);
		pthread_mutex_unlock(&s->fwd_mu);
		kvroom_release(s->room, slot);
	}
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i] == r)
			s->reqs[i] = NULL;
	r->in_sched = 0;
	serve_req_unref(r);
}

void serve_finish(serve *s, struct serve_req *r, const char *finish, int err_status,
		  const char *err_msg)
{
	r->done = 1;
	r->finish = finish;
	if (err_status) {
		r->err_status = err_status;
		snprintf(r->err_msg, sizeof(r->err_msg), "%s", err_msg);
	}
	pthread_cond_broadcast(&r->cv);
	serve_drop(s, r);
}

static int serve_release(struct serve_req *r, const char *text, size_t n, int final)
{
	if (r->parser) {
		struct chat_split sp = {r->out,	 r->out_len,  r->out_cap,
					r->rout, r->rout_len, r->rout_cap};
		int rc = chat_parser_push(r->parser, text, n, final, &sp);
		r->out_total += sp.content_len - r->out_len;
		r->out = sp.content;
		r->out_len = sp.content_len;
		r->out_cap = sp.content_cap;
		r->rout = sp.reasoning;
		r->rout_len = sp.reasoning_len;
		r->rout_cap = sp.reasoning_cap;
		return rc;
	}
	if (n == 0)
		return 0;
	if (serve_grow(&r->out, &r->out_cap, r->out_len + n + 1))
		return ERR_NOMEM;
	memcpy(r->out + r->out_len, text, n);
	r->out_len += n;
	r->out_total += n;
	return 0;
}

/* Adds text to what is held back for stop strings, releases what can be;
 * returns 1 when a stop string was found.  final: nothing more will come. */
static int serve_push_text(struct serve_req *r, const char *text, size_t n, int final)
{
	if (serve_grow(&r->held, &r->held_cap, r->held_len + n + 1))
		return -1;
	memcpy(r->held + r->held_len, text, n);
	r->held_len += n;
	size_t rel = 0;
	int hit =
	    sched_scan_stops(r->held, r->held_len, (const char *const *)r->stops, r->n_stops, &rel);
	if (final && !hit)
		rel = r->held_len;
	if (serve_release(r, r->held, rel, final || hit))
		return -1;
	memmove(r->held, r->held + rel, r->held_len - rel);
	r->held_len -= rel;
	return hit;
}

/* Log-probabilities of row (raw model distribution). */
static int serve_logprob(serve *s, struct serve_req *r, const float *row, int32_t tok)
{
	int V = s->n_vocab;
	float mx = -INFINITY;
	for (int i = 0; i < V; i++)
		if (row[i] > mx)
			mx = row[i];
	double sum = 0;
	for (int i = 0; i < V; i++)
		sum += exp((double)row[i] - mx);
	double lse = mx + log(sum);
	if (r->n_lps == r->cap_lps) {
		int cap = r->cap_lps ? 2 * r->cap_lps : 16;
		struct api_logprob *t = realloc(r->lps, (size_t)cap * sizeof(*t));
		if (!t)
			return ERR_NOMEM;
		r->lps = t;
		r->cap_lps = cap;
	}
	struct api_logprob *lp = &r->lps[r->n_lps];
	memset(lp, 0, sizeof(*lp));
	size_t n = 0;
	if (tokenizer_piece(s->tok, tok, 0, s->piece, s->piece_cap, &n))
		n = 0;
	lp->text = malloc(n + 1);
	if (!lp->text)
		return ERR_NOMEM;
	memcpy(lp->text, s->piece, n);
	lp->len = n;
	lp->logprob = (float)((double)row[tok] - lse);
	int k = r->top_logprobs < V ? r->top_logprobs : V;
	for (int j = 0; j < k; j++) { /* selection of the k best, ties to the lower id */
		int best = -1;
		for (int i = 0; i < V; i++) {
			int used = 0;
			for (int q = 0; q < j && !used; q++)
				used = s->top_idx[q] == i;
			if (!used && (best < 0 || row[i] > row[best]))
				best = i;
		}
		s->top_idx[j] = best;
		if (tokenizer_piece(s->tok, best, 0, s->piece, s->piece_cap, &n))
			n = 0;
		char *t = malloc(n + 1);
		if (!t)
			return ERR_NOMEM;
		memcpy(t, s->piece, n);
		lp->top[j] = (struct api_top){t, n, (float)((double)row[best] - lse)};
		lp->n_top = j + 1;
	}
	r->n_lps++;
	return 0;
}

/* One sampled token of r; under s->mu. */
static void serve_take_token(serve *s, struct serve_req *r, const float *row)
{
	double now = serve_now();
	int32_t tok = sampler_sample(r->smp, row);
	if (r->n_gen == 0) {
		r->t_first = now;
		r->ttft = now - r->t_arrive;
		metrics_observe_ttft(s->met, r->ttft);
	} else {
		metrics_observe_itl(s->met, now - r->t_last);
	}
	r->t_last = now;
	if (tokenizer_is_eog(s->tok, tok) && !r->ignore_eos) {
		size_t n = 0;
		int hit = tokenizer_stream_flush(r->ts, s->piece, s->piece_cap, &n)
			      ? -1
			      : serve_push_text(r, s->piece, n, 1);
		serve_finish(s, r, "stop", hit < 0 ? 500 : 0, "out of memory");
		return;
	}
	r->gen[r->n_gen++] = tok;
	r->last_token = tok;
	if (r->logprobs && serve_logprob(s, r, row, tok)) {
		serve_finish(s, r, NULL, 500, "out of memory");
		return;
	}
	size_t n = 0;
	int last = r->n_gen >= r->max_tokens;
	int hit = tokenizer_stream_push(r->ts, tok, s->piece, s->piece_cap, &n)
		      ? -1
		      : serve_push_text(r, s->piece, n, 0);
	if (hit == 0 && last)
		hit = tokenizer_stream_flush(r->ts, s->piece, s->piece_cap, &n)
			  ? -1
			  : serve_push_text(r, s->piece, n, 1);
	if (hit < 0)
		serve_finish(s, r, NULL, 500, "cannot detokenize the output (see the log)");
	else if (hit > 0)
		serve_finish(s, r, "stop", 0, NULL);
	else if (last)
		serve_finish(s, r, "length", 0, NULL);
	else
		pthread_cond_broadcast(&r->cv);
}

static void *serve_loop(void *arg)
{
	serve *s = arg;
	pthread_mutex_lock(&s->mu);
	for (;;) {
		for (int i = 0; i < s->n_reqs; i++) {
			struct serve_req *r = s->reqs[i];
			if (r && r->cancelled) {
				metrics_count_disconnect(s->met);
				serve_finish(s, r, NULL, 499, "client closed the connection");
			}
		}
		serve_update_load(s);
		if (s->stop)
			break;
		int n = sched_step(s->sch, s->items, s->cfg.max_batch);
		for (int i = 0; i < s->n_reqs; i++) {
			struct serve_req *r = s->reqs[i];
			if (r && r->refused) {
				char msg[sizeof(r->refuse_msg)];
				memcpy(msg, r->refuse_msg, sizeof(msg));
				serve_finish(s, r, NULL, r->refused, msg);
			}
		}
		if (n == 0) {
			pthread_cond_wait(&s->work_cv, &s->mu);
			continue;
		}
		int nt = 0;
		for (int i = 0; i < n; i++) {
			const struct sched_item *it = &s->items[i];
			struct serve_req *r = serve_find(s, it->id);
			for (int k = 0; k < it->n_tokens; k++) {
				s->b_tok[nt] = it->decode ? r->last_token : r->prompt[it->pos + k];
				s->b_pos[nt] = it->pos + k;
				s->b_seq[nt] = it->slot;
				s->b_want[nt] = it->sample && k == it->n_tokens - 1;
				nt++;
			}
		}
		pthread_mutex_unlock(&s->mu);
		model_batch b = {nt, s->b_tok, s->b_pos, s->b_seq, s->b_want};
		pthread_mutex_lock(&s->fwd_mu);
		int frc = model_forward(s->m, &b, s->logits);
		pthread_mutex_unlock(&s->fwd_mu);
		metrics_observe_batch(s->met, nt);
		pthread_mutex_lock(&s->mu);
		if (frc)
			frc = serve_kv_recover(s, n, frc);
		int row = 0;
		for (int i = 0; i < n; i++) {
			const struct sched_item *it = &s->items[i];
			struct serve_req *r = serve_find(s, it->id);
			const float *lrow = s->logits + (size_t)row * (size_t)s->n_vocab;
			row += it->sample;
			if (!r)
				continue;
			if (frc == ERR_PEER) {
				/* a lost worker's experts fit on no survivor */
				serve_finish(s, r, NULL, 503,
					     "a routed expert this batch needs is unavailable: its "
					     "worker was lost and no surviving worker can hold it "
					     "(see the server log)");
				continue;
			}
			if (frc) {
				serve_finish(s, r, NULL, 500,
					     "the forward pass failed (see the "
					     "server log)");
				continue;
			}
			if (!it->sample)
				continue;
			if (!r->cancelled)
				serve_take_token(s, r, lrow);
		}
	}
	/* shutting down: end every request */
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i])
			serve_finish(s, s->reqs[i], NULL, 503, "the server is shutting down");
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

/* ------------------------------------------------------------ life cycle */

int serve_new(model *m, const tokenizer *tok, const struct serve_config *cfg, serve **out)
{
	*out = NULL;
	int rc = 0;
	serve *s = calloc(1, sizeof(*s));
	if (!s)
		return ERR_NOMEM;
	s->m = m;
	s->tok = tok;
	s->cfg = *cfg;
	s->created = (long)time(NULL);
	const struct model_info *info = model_get_info(m);
	s->n_vocab = info->n_vocab;
	snprintf(s->model_name, sizeof(s->model_name), "%s",
		 cfg->model_name ? cfg->model_name : "moefleet");
	pthread_mutex_init(&s->mu, NULL);
	pthread_mutex_init(&s->fwd_mu, NULL);
	pthread_cond_init(&s->work_cv, NULL);
	if (tokenizer_n_vocab(tok) != info->n_vocab) {
		log_error("the tokenizer has %d tokens but the model %d", tokenizer_n_vocab(tok),
			  info->n_vocab);
		rc = ERR_FORMAT;
		goto out;
	}
	char *tmpl = NULL;
	const gguf *g = model_get_gguf(m);
	gguf_str ts;
	if (gguf_find_kv(g, "tokenizer.chat_template") >= 0 &&
	    gguf_get_str(g, "tokenizer.chat_template", &ts) == 0)
		tmpl = strndup(ts.ptr, (size_t)ts.len);
	rc = chat_pick_format(info->arch, tmpl, &s->chat);
	free(tmpl);
	if (rc)
		goto out;
	struct sched_config sc = {.n_slots = cfg->n_slots,
				  .n_ctx = cfg->n_ctx,
				  .max_batch = cfg->max_batch,
				  .chunk = cfg->chunk,
				  .queue_cap = cfg->queue_cap,
				  .pick = serve_pick,
				  .pick_ctx = s};
	struct attn_kv_room room;
	model_kv_room(m, &room);
	if ((rc = sched_new(&sc, &s->sch)) || (rc = metrics_new(&s->met)) ||
	    (rc = kvroom_new(&room, cfg->n_slots, &s->room)))
		goto out;
	s->n_reqs = cfg->n_slots + cfg->queue_cap;
	s->reqs = calloc((size_t)s->n_reqs, sizeof(*s->reqs));
	s->items = calloc((size_t)cfg->max_batch, sizeof(*s->items));
	s->b_tok = calloc((size_t)cfg->max_batch, sizeof(int32_t));
	s->b_pos = calloc((size_t)cfg->max_batch, sizeof(int32_t));
	s->b_seq = calloc((size_t)cfg->max_batch, sizeof(int32_t));
	s->b_want = calloc((size_t)cfg->max_batch, 1);
	/* at most one sampled row per request holding a slot */
	s->logits = malloc((size_t)cfg->n_slots * (size_t)s->n_vocab * sizeof(float));
	s->scratch = malloc((size_t)s->n_vocab * sizeof(float));
	/* a stream's output bound (whole characters, U+FFFD for bad bytes) covers
	 * tokenizer_piece as well */
	tokenizer_stream *probe = NULL;
	if ((rc = tokenizer_stream_new(tok, 0, &probe)))
		goto out;
	s->piece_cap = tokenizer_stream_bound(probe) + tokenizer_max_piece(tok) + 16;
	tokenizer_stream_destroy(&probe);
	s->piece = malloc(s->piece_cap);
	s->top_idx = calloc(API_MAX_TOP_LOGPROBS, sizeof(int));
	if (!s->reqs || !s->items || !s->b_tok || !s->b_pos || !s->b_seq || !s->b_want ||
	    !s->logits || !s->scratch || !s->piece || !s->top_idx) {
		rc = ERR_NOMEM;
		goto out;
	}
	if (pthread_create(&s->thread, NULL, serve_loop, s)) {
		log_error("cannot start the scheduler thread");
		rc = ERR_NOMEM;
		goto out;
	}
	s->thread_started = 1;
	struct http_config hc = {.host = cfg->host,
				 .port = cfg->port,
				 .max_body = cfg->max_body,
				 .max_conns = cfg->max_conns,
				 .idle_timeout_s = 60,
				 .handler = serve_handle,
				 .ctx = s};
	if ((rc = http_new(&hc, &s->h)))
		goto out;
	log_info("serving '%s' (%s chat format) on http://%s:%d: %d slots x %d positions, "
		 "batch %d, prefill chunk %d, queue %d",
		 s->model_name, chat_format_name(s->chat), cfg->host ? cfg->host : "127.0.0.1",
		 http_port(s->h), cfg->n_slots, cfg->n_ctx, cfg->max_batch, cfg->chunk,
		 cfg->queue_cap);
out:
	if (rc)
		serve_destroy(&s);
	*out = s;
	return rc;
}

int serve_port(const serve *s)
{
	return s->h ? http_port(s->h) : 0;
}

void serve_destroy(serve **sp)
{
	if (!sp || !*sp)
		return;
	serve *s = *sp;
	if (s->thread_started) {
		pthread_mutex_lock(&s->mu);
		s->stop = 1;
		pthread_cond_signal(&s->work_cv);
		pthread_mutex_unlock(&s->mu);
		pthread_join(s->thread, NULL);
	}
	http_destroy(&s->h); /* waits for the connection threads */
	sched_destroy(&s->sch);
	kvroom_destroy(&s->room);
	metrics_destroy(&s->met);
	free(s->reqs);
	free(s->items);
	free(s->b_tok);
	free(s->b_pos);
	free(s->b_seq);
	free(s->b_want);
	free(s->logits);
	free(s->scratch);
	free(s->piece);
	free(s->top_idx);
	pthread_mutex_destroy(&s->mu);
	pthread_mutex_destroy(&s->fwd_mu);
	pthread_cond_destroy(&s->work_cv);
	free(s);
	*sp = NULL;
}
