#include "sched.h"

#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"

struct sched_req {
	uint64_t id;
	enum sched_state state;
	int slot;
	int n_prompt;
	int n_max;
	int n_fed;    /* positions fed so far (prompt, then sampled tokens) */
	uint64_t seq; /* arrival order */
};

struct sched {
	struct sched_config cfg;
	struct sched_req *reqs; /* [n_slots + queue_cap], state NONE = free entry */
	int n_reqs;
	uint8_t *slot_busy; /* [n_slots] */
	uint64_t next_seq;
};

int sched_new(const struct sched_config *cfg, sched **out)
{
	*out = NULL;
	if (cfg->n_slots < 1 || cfg->n_slots > 4096 || cfg->n_ctx < 1 || cfg->chunk < 1 ||
	    cfg->queue_cap < 0 || cfg->queue_cap > 1 << 20 || cfg->max_batch < 2 ||
	    (int64_t)cfg->chunk + cfg->n_slots > cfg->max_batch) {
		log_error("scheduler: invalid configuration: %d slots, context %d, batch %d, "
			  "chunk %d, queue %d (need chunk + slots <= batch)",
			  cfg->n_slots, cfg->n_ctx, cfg->max_batch, cfg->chunk, cfg->queue_cap);
		return ERR_CONFIG;
	}
	sched *s = calloc(1, sizeof(*s));
	if (!s)
		return ERR_NOMEM;
	s->cfg = *cfg;
	s->n_reqs = cfg->n_slots + cfg->queue_cap;
	s->reqs = calloc((size_t)s->n_reqs, sizeof(*s->reqs));
	s->slot_busy = calloc((size_t)cfg->n_slots, 1);
	if (!s->reqs || !s->slot_busy) {
		sched_destroy(&s);
		return ERR_NOMEM;
	}
	*out = s;
	return 0;
}

void sched_destroy(sched **s)
{
	if (!s || !*s)
		return;
	free((*s)->reqs);
	free((*s)->slot_busy);
	free(*s);
	*s = NULL;
}

static struct sched_req *sched_find(const sched *s, uint64_t id)
{
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i].state != SCHED_NONE && s->reqs[i].id == id)
			return &s->reqs[i];
	return NULL;
}

int sched_add(sched *s, uint64_t id, int n_prompt, int n_max)
{
	if (n_prompt < 1 || n_max < 1 || (int64_t)n_prompt + n_max > s->cfg.n_ctx ||
	    sched_find(s, id))
		return ERR_CONFIG;
	for (int i = 0; i < s->n_reqs; i++) {
		struct sched_req *r = &s->reqs[i];
		if (r->state != SCHED_NONE)
			continue;
		*r = (struct sched_req){.id = id,
					.state = SCHED_QUEUED,
					.slot = -1,
					.n_prompt = n_prompt,
					.n_max = n_max,
					.seq = s->next_seq++};
		return 0;
	}
	return ERR_RANGE;
}

int sched_remove(sched *s, uint64_t id)
{
	struct sched_req *r = sched_find(s, id);
	if (!r)
		return -1;
	int slot = r->slot;
	if (slot >= 0)
		s->slot_busy[slot] = 0;
	memset(r, 0, sizeof(*r));
	return slot;
}

/* The request in `state` with the smallest arrival number above `after`. */
static struct sched_req *sched_next_in_order(sched *s, enum sched_state state, uint64_t after,
					     int first)
{
	struct sched_req *best = NULL;
	for (int i = 0; i < s->n_reqs; i++) {
		struct sched_req *r = &s->reqs[i];
		if (r->state != state || (!first && r->seq <= after))
			continue;
		if (!best || r->seq < best->seq)
			best = r;
	}
	return best;
}

/* Grants free slots to queued requests, oldest first. */
static void sched_admit(sched *s)
{
	for (;;) {
		int slot = -1;
		for (int i = 0; i < s->cfg.n_slots && slot < 0; i++)
			if (!s->slot_busy[i])
				slot = i;
		if (slot < 0)
			return;
		struct sched_req *r = sched_next_in_order(s, SCHED_QUEUED, 0, 1);
		if (!r)
			return;
		if (s->cfg.pick) {
			slot = s->cfg.pick(s->cfg.pick_ctx, r->id, r->n_prompt + r->n_max,
					   s->slot_busy);
			if (slot == -1)
				return;
			if (slot < 0 || slot >= s->cfg.n_slots || s->slot_busy[slot]) {
				memset(r, 0, sizeof(*r));
				continue;
			}
		}
		r->slot = slot;
		r->state = SCHED_PREFILL;
		s->slot_busy[slot] = 1;
	}
}

int sched_step(sched *s, struct sched_item *items, int cap)
{
	sched_admit(s);
	int n = 0, budget = s->cfg.max_batch;
	/* 1. every decode (n_slots < max_batch: they always fit), oldest first */
	for (struct sched_req *r = sched_next_in_order(s, SCHED_DECODE, 0, 1); r && n < cap;
	     r = sched_next_in_order(s, SCHED_DECODE, r->seq, 0)) {
		items[n++] = (struct sched_item){.id = r->id,
						 .slot = r->slot,
						 .pos = r->n_fed,
						 .n_tokens = 1,
						 .decode = 1,
						 .sample = 1};
		r->n_fed++;
		budget--;
	}
	/* 2. prefill chunks, oldest first, only whole chunks */
	uint64_t after = 0;
	int first = 1;
	for (;;) {
		struct sched_req *r = sched_next_in_order(s, SCHED_PREFILL, after, first);
		if (!r || n >= cap || budget <= 0)
			break;
		first = 0;
		after = r->seq;
		int left = r->n_prompt - r->n_fed;
		int c = left < s->cfg.chunk ? left : s->cfg.chunk;
		if (c > budget)
			continue;
		int last = c == left;
		items[n++] = (struct sched_item){.id = r->id,
						 .slot = r->slot,
						 .pos = r->n_fed,
						 .n_tokens = c,
						 .decode = 0,
						 .sample = last};
		r->n_fed += c;
		budget -= c;
		if (last) /* decodes from the next step on */
			r->state = SCHED_DECODE;
	}
	return n;
}

enum sched_state sched_get_state(const sched *s, uint64_t id)
{
	const struct sched_req *r = sched_find(s, id);
	return r ? r->state : SCHED_NONE;
}

int sched_get_slot(const sched *s, uint64_t id, int *n_fed)
{
	const struct sched_req *r = sched_find(s, id);
	*n_fed = r ? r->n_fed : 0;
	return r ? r->slot : -1;
}

int sched_n_queued(const sched *s)
{
	int n = 0;
	for (int i = 0; i < s->n_reqs; i++)
		n += s->reqs[i].state == SCHED_QUEUED;
	return n;
}

int sched_n_active(const sched *s)
{
	int n = 0;
	for (int i = 0; i < s->n_reqs; i++)
		n += s->reqs[i].state == SCHED_PREFILL || s->reqs[i].state == SCHED_DECODE;
	return n;
}

int64_t sched_n_kv_used(const sched *s)
{
	int64_t n = 0;
	for (int i = 0; i < s->n_reqs; i++)
		if (s->reqs[i].slot >= 0 && s->reqs[i].state != SCHED_NONE)
			n += s->reqs[i].n_fed;
	return n;
}

int sched_scan_stops(const char *text, size_t len, const char *const *stops, int n_stops,
		     size_t *release)
{
	/* the earliest complete occurrence of any stop string */
	size_t best = len;
	int found = 0;
	for (int i = 0; i < n_stops; i++) {
		size_t sl = stops[i] ? strlen(stops[i]) : 0;
		if (sl == 0 || sl > len)
			continue;
		for (size_t p = 0; p + sl <= len && p < best; p++) {
			if (memcmp(text + p, stops[i], sl) == 0) {
				best = p;
				found = 1;
				break;
			}
		}
	}
	if (found) {
		*release = best;
		return 1;
	}
	/* hold the longest tail that begins some stop string */
	size_t hold = 0;
	for (int i = 0; i < n_stops; i++) {
		size_t sl = stops[i] ? strlen(stops[i]) : 0;
		for (size_t k = sl > 0 ? sl - 1 : 0; k > hold; k--) {
			if (k <= len && memcmp(text + len - k, stops[i], k) == 0) {
				hold = k;
				break;
			}
		}
	}
	*release = len - hold;
	return 0;
}
