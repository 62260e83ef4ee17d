/* cluster membership and failover: a worker's Hello and shard file, a worker
 * lost, a stranger told to rejoin, a worker that (re)joins after start-up, and
 * the repair plan that re-creates lost replicas as a new epoch. */
#include "cluster_internal.h"
#include "../placement/balance.h"
#include "../../common/err.h"
#include "../../common/log.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

/* Takes a worker's Hello: a shard file must come from this model and name
 * experts it has; *held receives its table (NULL for a full model file or
 * none).  The hello's held arrays stay with the caller's message.  Returns 0,
 * or ERR_CONFIG with the reason in why. */
int cluster_take_hello(const cluster *c, const struct wire_hello *h, uint8_t **held, char *why,
		       size_t cap)
{
	*held = NULL;
	if (!h->has_model || !h->shard_file)
		return 0;
	if (strcmp(h->model_sha, c->model_id)) {
		snprintf(why, cap,
			 "its shard file was made from another model (%s; this model is %s)",
			 h->model_sha, c->model_id);
		return ERR_CONFIG;
	}
	size_t cells = (size_t)c->spec.n_layer * (size_t)c->spec.n_expert;
	uint8_t *t = calloc(cells ? cells : 1, 1);
	if (!t) {
		snprintf(why, cap, "out of memory");
		return ERR_NOMEM;
	}
	for (uint32_t i = 0; i < h->n_held; i++) {
		uint32_t l = h->held_layer[i], e = h->held_expert[i];
		if (l >= (uint32_t)c->spec.n_layer || !c->spec.layer_moe[l] ||
		    e >= (uint32_t)c->spec.n_expert) {
			snprintf(why, cap,
				 "its shard file lists expert %u of layer %u, which this model "
				 "does not route",
				 e, l);
			free(t);
			return ERR_CONFIG;
		}
		t[(size_t)l * (size_t)c->spec.n_expert + e] = 1;
	}
	*held = t;
	return 0;
}

/* Worker i is lost (dropped with a logged reason): it gets no more Batches,
 * the batches it had not answered are dispatched again to other holders, its
 * replicas are re-created on the survivors, and anything it still sends
 * arrives from an unknown peer and is answered with Shutdown(rejoin). */
void cluster_drop(cluster *c, int i, const char *why)
{
	struct cluster_peer *w = &c->w[i];
	if (w->lost)
		return;
	log_error("worker %d (%s): lost: %s", i, w->st.name, why);
	w->lost = 1;
	w->st.lost = 1;
	w->serving = 0;
	w->next_ok = 0;
	w->releasing = 0;
	w->sq_n = w->sq_at = 0;
	transport_drop_peer(c->t, w->peer);
	for (int b = 0; b < c->n_batches; b++)
		if (c->batches[b].worker == i && c->batches[b].state == CLUSTER_BATCH_PENDING)
			c->batches[b].state = CLUSTER_BATCH_FAILED;
	c->n_lost++;
	if (c->started)
		c->repair_due = 1;
}

static void cluster_rejoin(cluster *c, int peer, const struct wire_hello *h);

/* A message from a peer that is not a member: a Hello once start-up is over
 * (re)joins; anything else (a late reply of a worker dropped as lost, a
 * worker of a coordinator that restarted) is told to say Hello again. */
void cluster_on_stranger(cluster *c, int peer, const struct wire_msg *m)
{
	if (m->kind == WIRE_HELLO && c->started) {
		cluster_rejoin(c, peer, &m->u.hello);
		return;
	}
	if (m->kind == WIRE_HELLO)
		return; /* during start-up cluster_join takes it */
	log_warn("%s: %s from a worker that is not a member ignored; it is told to rejoin",
		 transport_peer_name(c->t, peer), wire_kind_name(m->kind));
	cluster_send_shutdown(c, peer, "not a member of this cluster: say Hello again", 1);
	transport_drop_peer(c->t, peer);
}

/* Re-creates the replicas of lost workers on the live ones (or, with
 * `rebuild`, places everything anew over the live workers, so that a
 * rejoined one gets its share), as the next epoch.  Repair keeps every
 * surviving holder and adds, per expert below R live copies, the live
 * workers not holding it with memory room and the least predicted time;
 * experts that fit nowhere stay short (counted in c->unheld when they have
 * no live holder at all). */
void cluster_plan_repair(cluster *c, int rebuild)
{
	const int L = c->spec.n_layer, X = c->spec.n_expert, R = c->plan.n_replica;
	const double *load = balance_counts_load(c->counts);
	int live = 0; /* that can hold experts */
	for (int i = 0; i < c->n; i++)
		live += !c->w[i].lost && cluster_holds_experts(c, i);
	c->repair_due = 0;
	c->rebuild_due = 0;
	c->unheld = 0;
	if (!live)
		return;
	struct placement_worker *pw = malloc((size_t)c->n * sizeof(*pw));
	placement next = {0};
	if (!pw)
		return;
	for (int i = 0; i < c->n; i++) {
		pw[i] = c->pw[i];
		if (c->w[i].lost)
			pw[i].mem_bytes = 0;
	}
	int rc = 1;
	if (rebuild) {
		struct placement_model pm = {L, X, c->spec.layer_moe, c->expert_bytes, NULL};
		rc = placement_build(&pm, pw, c->n, R < live ? R : live, &next);
		if (!rc && next.n_replica < R) {
			placement_free(&next);
			rc = 1; /* keep the holder slots; repair instead */
		}
	}
	if (rc) {
		rc = placement_copy(&c->plan, &next);
		if (rc) {
			free(pw);
			return;
		}
		memset(next.worker_bytes, 0, (size_t)c->n * sizeof(uint64_t));
		memset(next.worker_load, 0, (size_t)c->n * sizeof(double));
		/* keep the live holders, packed */
		for (int l = 0; l < L; l++)
			for (int e = 0; e < X && c->spec.layer_moe[l]; e++) {
				int32_t *h = next.holder + ((size_t)l * X + e) * R;
				int n = 0;
				for (int r = 0; r < R; r++)
					if (h[r] >= 0 && !c->w[h[r]].lost && !c->w[h[r]].fresh)
						h[n++] = h[r];
				for (int r = n; r < R; r++)
					h[r] = -1;
				double work = (load ? load[(size_t)l * X + e] : 1.0) *
					      (double)c->expert_bytes[l];
				for (int r = 0; r < n; r++) {
					next.worker_bytes[h[r]] += c->expert_bytes[l];
					next.worker_load[h[r]] += work / R;
				}
			}
		for (int l = 0; l < L; l++)
			for (int e = 0; e < X && c->spec.layer_moe[l]; e++) {
				int32_t *h = next.holder + ((size_t)l * X + e) * R;
				double work = (load ? load[(size_t)l * X + e] : 1.0) *
					      (double)c->expert_bytes[l];
				uint64_t bytes = c->expert_bytes[l];
				int n = 0;
				while (n < R && h[n] >= 0)
					n++;
				for (; n < R && n < live; n++) {
					/* the least busy worker with room, one whose
					 * shard file holds the expert if any (as
					 * placement_build) */
					int best = -1, best_has = 0;
					double best_t = INFINITY;
					for (int i = 0; i < c->n; i++) {
						int dup = 0;
						for (int r = 0; r < n; r++)
							dup |= h[r] == i;
						if (dup || c->w[i].lost ||
						    next.worker_bytes[i] > pw[i].mem_bytes ||
						    bytes > pw[i].mem_bytes - next.worker_bytes[i])
							continue;
						int has =
						    !pw[i].held || pw[i].held[(size_t)l * X + e];
						if (best >= 0 && has != best_has) {
							if (best_has)
								continue;
							best = -1;
						}
						double t =
						    (next.worker_load[i] + work / R) / pw[i].speed;
						if (best < 0 || t < best_t) {
							best_t = t;
							best = i;
							best_has = has;
						}
					}
					if (best < 0)
						break;
					h[n] = best;
					next.worker_bytes[best] += bytes;
					next.worker_load[best] += work / R;
				}
				if (n == 0 && c->unheld++ == 0)
					log_error("layer %d expert %d: no surviving worker has "
						  "memory for it",
						  l, e);
			}
	}
	free(pw);
	if (c->unheld)
		log_error("%u expert(s) have no live holder and fit on no surviving worker: steps "
			  "that route to them fail",
			  c->unheld);
	uint64_t moved = 0;
	for (int i = 0; i < c->n; i++)
		for (int l = 0; l < L; l++)
			for (int e = 0; e < X && c->spec.layer_moe[l]; e++)
				if (!c->w[i].lost && placement_holds(&next, i, l, e) &&
				    (c->w[i].fresh || !placement_holds(&c->plan, i, l, e)))
					moved += c->expert_bytes[l];
	if (cluster_send_next(c, &next))
		return;
	c->moved_bytes += moved;
	c->n_repairs++;
	c->repair_t0 = cluster_now();
	log_info("%s: epoch %llu planned, %.1f MiB to load on %d live worker(s)",
		 rebuild ? "re-placement for a joined worker" : "replica repair",
		 (unsigned long long)c->next_epoch, (double)moved / 1048576.0, live);
}

/* A worker said Hello after start-up: it takes the place of a lost one (the
 * cluster never grows beyond its start-up size) and gets a share of the
 * experts in the next epoch; until that epoch is in force it gets no
 * Batches. */
static void cluster_rejoin(cluster *c, int peer, const struct wire_hello *h)
{
	int i = 0;
	while (i < c->n && !c->w[i].lost)
		i++;
	if (i == c->n) {
		log_warn("%s (%s): joined, but no worker is missing; refused",
			 transport_peer_name(c->t, peer), h->name);
		cluster_send_shutdown(c, peer, "the cluster is complete", 0);
		transport_drop_peer(c->t, peer);
		return;
	}
	struct cluster_peer *w = &c->w[i];
	uint8_t *held;
	char why[WIRE_MAX_NAME];
	if (cluster_take_hello(c, h, &held, why, sizeof(why))) {
		log_error("%s (%s): refused: %s", transport_peer_name(c->t, peer), h->name, why);
		cluster_send_shutdown(c, peer, why, 0);
		transport_drop_peer(c->t, peer);
		return;
	}
	free(w->held);
	w->held = held;
	w->peer = peer;
	w->hello = *h;
	w->hello.held_layer = w->hello.held_expert = NULL;
	w->lost = 0;
	cluster_held_sets(c);
	w->st.lost = 0;
	w->ready = 1;
	w->serving = 0;
	w->fresh = 1;
	w->next_ok = 0;
	w->releasing = 0;
	w->st.held_experts = 0;
	w->st.held_bytes = 0;
	snprintf(w->st.name, sizeof(w->st.name), "%s", h->name);
	c->pw[i].mem_bytes = h->memory_bytes;
	c->n_rejoined++;
	/* at once, superseding a placement being loaded (the newcomer was not
	 * sent its Assign, so that one could never become ready) */
	c->rebuild_due = 1;
	c->repair_due = 1;
	log_info("worker %d (%s) joined in place of a lost worker: %u cores, %.1f GiB, %s", i,
		 w->st.name, h->cores, (double)h->memory_bytes / (1 << 30),
		 !h->memory_bytes ? "KV-only"
		 : h->has_model	  ? "has the model"
				  : "needs the weights streamed");
}
