/* serve_kv: the server's hooks for KV hosts (see serve.h): why a request can
 * get no pages, looking for hosts again once none is left, sched's pick hook
 * (the slot with room for a request's pages), and the recovery after a step
 * failed because a KV host was lost (the running sequences computed again). */
#include "serve.h"
#include "serve_internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "kvroom.h"
#include "sched.h"

/* ------------------------------------------------------------ KV hosts */

/* Why a request of n_pos positions can get no pages, into msg (status 400 or
 * 503), or 0 when it may wait or run; under s->mu. */
int serve_kv_refusal(serve *s, int n_prompt, int n_max, char *msg, size_t cap)
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
	int64_t total = 0;
	for (int h = 0; h < kvroom_n_hosts(s->room); h++) {
		int64_t u, t;
		kvroom_pages(s->room, h, &u, &t);
		total += t;
	}
	snprintf(msg, cap,
		 "the prompt (%d tokens) plus max_tokens (%d) needs %lld KV pages of each layer; "
		 "the KV hosts hold at most %lld in all, even with no other request running: "
		 "shorten the prompt or max_tokens",
		 n_prompt, n_max, (long long)need, (long long)total);
	return 400;
}

/* With no KV host left, a request of n_pos positions that needs pages looks
 * for hosts again (a worker that joined since), at most once a second; under
 * s->mu, on a connection thread. */
void serve_kv_retry(serve *s, int n_pos)
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
int serve_pick(void *ctx, uint64_t id, int n_pos, const uint8_t *busy)
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
int serve_kv_recover(serve *s, int n, int frc)
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
