#define _GNU_SOURCE
#include "serve.h"

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

static double serve_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int serve_grow(char **p, size_t *cap, size_t need)
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

static void serve_lps_free(struct api_logprob *lps, int n)
{
	for (int i = 0; i < n; i++) {
		free(lps[i].text);
		for (int k = 0; k < lps[i].n_top; k++)
			free((char *)lps[i].top[k].text);
	}
}

static void serve_req_free(struct serve_req *r)
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
static void serve_req_unref(struct serve_req *r)
{
	if (--r->refs == 0)
		serve_req_free(r);
}

/* ------------------------------------------------------------ scheduler thread */

static struct serve_req *serve_find(serve *s, uint64_t id)
{
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i] && s->reqs[i]->id == id)
			return s->reqs[i];
	return NULL;
}

static void serve_update_load(serve *s)
{
	metrics_set_load(s->met, sched_n_queued(s->sch), sched_n_active(s->sch), s->cfg.n_slots,
			 sched_n_kv_used(s->sch), (int64_t)s->cfg.n_slots * s->cfg.n_ctx);
}

/* Forgets a request on the scheduler side; under s->mu. */
static void serve_drop(serve *s, struct serve_req *r)
{
	int slot = sched_remove(s->sch, r->id);
	if (slot >= 0)
		model_reset_seq(s->m, slot);
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i] == r)
			s->reqs[i] = NULL;
	r->in_sched = 0;
	serve_req_unref(r);
}

static void serve_finish(serve *s, struct serve_req *r, const char *finish, int err_status,
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

/* ------------------------------------------------------------ KV hosts */

/* Why a request of n_pos positions can get no pages, into msg (status 400 or
 * 503), or 0 when it may wait or run; under s->mu. */
static int serve_kv_refusal(serve *s, int n_prompt, int n_max, char *msg, size_t cap)
{
	const int n_pos = n_prompt + n_max;
	const int64_t need = kvroom_need(s->room, n_pos);
	if (need > 0 && s->kv_dead) {
		snprintf(msg, cap,
			 "%s and no live worker offers memory for KV pages: requests of more "
			 "than %d positions (prompt + max_tokens) cannot be served; retry later",
			 s->kv_why, kvroom_page(s->room));
		return 503;
	}
	if (kvroom_n_hosts(s->room) == 0 || kvroom_ever(s->room, n_pos))
		return 0;
	int64_t held = 0, total = 0;
	for (int h = 0; h < kvroom_n_hosts(s->room); h++) {
		int64_t u, t;
		kvroom_pages(s->room, h, &u, &t);
		held += u;
		total += t;
	}
	snprintf(msg, cap,
		 "the prompt (%d tokens) plus max_tokens (%d) needs %lld KV pages of each layer; "
		 "the KV hosts hold at most %lld in all, %lld of them kept by the server's "
		 "slots: shorten the prompt or max_tokens",
		 n_prompt, n_max, (long long)need, (long long)total, (long long)held);
	return 400;
}

/* With no KV host left, a request of n_pos positions that needs pages looks
 * for hosts again (a worker that joined since), at most once a second; under
 * s->mu, on a connection thread. */
static void serve_kv_retry(serve *s, int n_pos)
{
	const double now = serve_now();
	if (!s->kv_dead || kvroom_need(s->room, n_pos) == 0 || now < s->kv_retry)
		return;
	s->kv_retry = now + 1.0;
	char why[64];
	struct attn_kv_room g;
	pthread_mutex_lock(&s->fwd_mu);
	int rc = s->cfg.kv_recover(s->cfg.kv_ctx, why, sizeof(why));
	if (!rc)
		model_kv_room(s->m, &g);
	pthread_mutex_unlock(&s->fwd_mu);
	if (rc || kvroom_rehost(s->room, &g))
		return;
	s->kv_dead = 0;
	log_info("KV hosts again: %d; requests that need pages are served", g.n_hosts);
}

/* sched's pick hook: the slot with room for the request's pages; under
 * s->mu. */
static int serve_pick(void *ctx, uint64_t id, int n_pos, const uint8_t *busy)
{
	serve *s = ctx;
	struct serve_req *r = serve_find(s, id);
	if (r) {
		int st = serve_kv_refusal(s, r->n_prompt, n_pos - r->n_prompt, r->refuse_msg,
					  sizeof(r->refuse_msg));
		if (st) {
			r->refused = st;
			return -2;
		}
	}
	if (kvroom_n_hosts(s->room) == 0) {
		for (int i = 0; i < s->cfg.n_slots; i++)
			if (!busy[i])
				return i;
		return -1;
	}
	const int slot = kvroom_pick(s->room, busy, n_pos);
	if (slot >= 0)
		kvroom_take(s->room, slot, n_pos);
	return slot;
}

/* The sequence of r in slot, n_fed positions, computed again from its ids in
 * the steps it had: prompt chunks, then one token per step.  out: the last
 * position's logits.  Without s->mu, under s->fwd_mu. */
static int serve_recompute(serve *s, const struct serve_req *r, int slot, int n_fed, float *out)
{
	model_reset_seq(s->m, slot);
	int rc = 0;
	for (int p = 0; p < n_fed && !rc;) {
		const int c = p < r->n_prompt ? (r->n_prompt - p < s->cfg.chunk ? r->n_prompt - p
										: s->cfg.chunk)
					      : 1;
		for (int k = 0; k < c; k++) {
			const int q = p + k;
			s->b_tok[k] = q < r->n_prompt ? r->prompt[q] : r->gen[q - r->n_prompt];
			s->b_pos[k] = q;
			s->b_seq[k] = slot;
			s->b_want[k] = k == c - 1;
		}
		model_batch b = {c, s->b_tok, s->b_pos, s->b_seq, s->b_want};
		p += c;
		rc = model_forward(s->m, &b, p == n_fed ? out : s->scratch);
	}
	return rc;
}

/* After the step of items[0..n) failed: when a KV host was lost, the chains
 * go to the hosts left and every running sequence is computed again (the
 * sampled rows of the step into s->logits); with none left, the requests that
 * need pages end with 503 and the others are computed again here.  Returns 0
 * when the step's logits are ready, else the failure.  Under s->mu (released
 * while computing). */
static int serve_kv_recover(serve *s, int n, int frc)
{
	for (int tries = 0; frc && s->cfg.kv_recover && !s->kv_dead && tries < ATTN_MAX_HOSTS;
	     tries++) {
		char why[64] = "a KV host was lost";
		pthread_mutex_lock(&s->fwd_mu);
		int rc = s->cfg.kv_recover(s->cfg.kv_ctx, why, sizeof(why));
		pthread_mutex_unlock(&s->fwd_mu);
		if (rc == ERR_PEER)
			return frc;
		if (rc) {
			s->kv_dead = 1;
			snprintf(s->kv_why, sizeof(s->kv_why), "%s", why);
			for (int i = 0; i < s->n_reqs; i++) {
				struct serve_req *r = s->reqs[i];
				char msg[256];
				int st = r ? serve_kv_refusal(s, r->n_prompt, r->max_tokens, msg,
							      sizeof(msg))
					   : 0;
				if (st)
					serve_finish(s, r, NULL, st, msg);
			}
		} else {
			struct attn_kv_room g;
			model_kv_room(s->m, &g);
			if ((rc = kvroom_rehost(s->room, &g)))
				return rc;
			for (int i = 0; i < s->n_reqs; i++) {
				struct serve_req *r = s->reqs[i];
				int n_fed = 0,
				    slot = r ? sched_get_slot(s->sch, r->id, &n_fed) : -1;
				if (slot < 0 ||
				    kvroom_fits(s->room, slot, r->n_prompt + r->max_tokens))
					continue;
				char msg[256];
				snprintf(msg, sizeof(msg),
					 "%s and the KV hosts left have no room for this request's "
					 "pages; retry later",
					 why);
				serve_finish(s, r, NULL, 503, msg);
			}
		}
		frc = 0;
		/* the sampled row of each item of the step */
		int n_redo = 0;
		for (int i = 0; i < s->n_reqs; i++) {
			struct serve_req *r = s->reqs[i];
			int n_fed = 0, slot = r ? sched_get_slot(s->sch, r->id, &n_fed) : -1;
			if (slot < 0 || n_fed == 0)
				continue;
			float *out = s->scratch;
			for (int j = 0, row = 0; j < n; j++) {
				if (s->items[j].id == r->id && s->items[j].sample)
					out = s->logits + (size_t)row * (size_t)s->n_vocab;
				row += s->items[j].sample;
			}
			pthread_mutex_unlock(&s->mu);
			pthread_mutex_lock(&s->fwd_mu);
			frc = serve_recompute(s, r, slot, n_fed, out);
			pthread_mutex_unlock(&s->fwd_mu);
			pthread_mutex_lock(&s->mu);
			n_redo += n_fed;
			if (frc)
				break;
		}
		if (rc)
			log_warn("%s and none is left: the requests that need pages end, %d "
				 "position(s) of the others computed again",
				 why, n_redo);
		else
			log_warn("%s: %d position(s) of the running requests computed again on %d "
				 "KV host(s)%s",
				 why, n_redo, kvroom_n_hosts(s->room),
				 kvroom_n_hosts(s->room) ? "" : " (the chains on the coordinator)");
	}
	return frc;
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

static void serve_handle(void *ctx, const struct http_request *hr, struct http_response *res)
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
