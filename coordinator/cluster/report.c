/* cluster reporting: per-worker statistics, step times, the expert balance,
 * the simulator's calibration printed by --stats, and the Prometheus
 * metrics of the cluster. */
#include "cluster_internal.h"
#include "../placement/balance.h"
#include "../placement/simulate.h"
#include "../../common/err.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stdio.h>

int cluster_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

void cluster_step_times(const cluster *c, double *median_ms, double *worst_moving_ms,
			uint64_t *n_steps)
{
	*median_ms = *worst_moving_ms = 0;
	*n_steps = c->n_steps;
	if (!c->n_steps)
		return;
	double *t = malloc(c->n_steps * sizeof(double));
	if (t) {
		memcpy(t, c->step_ms, c->n_steps * sizeof(double));
		qsort(t, c->n_steps, sizeof(double), cluster_cmp_double);
		*median_ms = t[c->n_steps / 2];
		free(t);
	}
	for (size_t i = 0; i < c->n_steps; i++)
		if (c->step_moving[i] && c->step_ms[i] > *worst_moving_ms)
			*worst_moving_ms = c->step_ms[i];
}

/* How balanced the current placement is under the routed load counted so
 * far, and what the heterogeneity-aware policy would reach. */
static void cluster_print_balance(const cluster *c)
{
	if (!c->counts || !c->pw)
		return;
	struct placement_model pm = {c->spec.n_layer, c->spec.n_expert, c->spec.layer_moe,
				     c->expert_bytes, balance_counts_load(c->counts)};
	struct balance_stats now;
	if (balance_predict(&c->plan, &pm, c->pw, NULL, &now))
		return;
	fprintf(
	    stderr,
	    "balance: window %.0f tokens; placement now: imbalance %.3f (max/mean worker time)\n",
	    c->cfg.balance_window > 0 ? c->cfg.balance_window : 4096.0, now.imbalance);
	const struct balance_policy *pol = balance_policy_find("hetero");
	struct balance_input in = {.model = &pm,
				   .workers = c->pw,
				   .n_worker = c->n,
				   .current = &c->plan,
				   .min_replicas = c->plan.n_replica,
				   .max_replicas = c->plan.n_replica};
	placement alt;
	struct balance_stats then;
	if (pol && pol->plan(&in, &alt) == 0) {
		if (balance_predict(&alt, &pm, c->pw, NULL, &then) == 0)
			fprintf(
			    stderr,
			    "balance: policy hetero would reach imbalance %.3f, step time x%.3f, "
			    "moving %.1f MiB\n",
			    then.imbalance,
			    now.step_time > 0 ? then.step_time / now.step_time : 1.0,
			    (double)balance_moved_bytes(&c->plan, &alt, &pm) / 1048576.0);
		placement_free(&alt);
	}
}

static int cluster_cmp_pair(const void *a, const void *b)
{
	const double *x = a, *y = b;
	return (x[0] > y[0]) - (x[0] < y[0]);
}

/* A robust straight-line fit y = a + b x: the samples (x >= 0) are grouped
 * by the binary magnitude of x, each group is represented by its median x and
 * median y (one slow step in a hundred must not move the line), and the line
 * is fitted through the group medians by least squares weighted by group
 * size.  xy holds n (x, y) pairs and is reordered.  Returns the number of
 * groups (a line needs 2; with 1, *a is its median y and *b 0). */
static int cluster_fit_line(double *xy, size_t n, double *a, double *b)
{
	*a = *b = 0;
	if (!n)
		return 0;
	qsort(xy, n, 2 * sizeof(double), cluster_cmp_pair);
	double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
	int groups = 0;
	for (size_t i = 0; i < n;) {
		int mag = (int)floor(log2(xy[2 * i] + 1));
		size_t j = i;
		while (j < n && (int)floor(log2(xy[2 * j] + 1)) == mag)
			j++;
		size_t m = j - i;
		double *y = malloc(m * sizeof(double));
		if (!y)
			return 0;
		for (size_t k = 0; k < m; k++)
			y[k] = xy[2 * (i + k) + 1];
		qsort(y, m, sizeof(double), cluster_cmp_double);
		double gx = xy[2 * (i + m / 2)], gy = y[m / 2], w = (double)m;
		free(y);
		sw += w;
		sx += w * gx;
		sy += w * gy;
		sxx += w * gx * gx;
		sxy += w * gx * gy;
		groups++;
		i = j;
	}
	double den = sw * sxx - sx * sx;
	if (groups >= 2 && den > 0) {
		*b = (sw * sxy - sx * sy) / den;
		*a = (sy - *b * sx) / sw;
	} else {
		*a = sy / sw;
	}
	return groups;
}

/* A cluster file for `placement simulate` calibrated on this run, from
 * medians so that the steps it predicts are typical ones.  Each worker's
 * speed is items / compute seconds (CPU-based: what it needs with its threads
 * to itself), its latency the median over its batches of wall time (sent to
 * answered) minus compute time, transfer folded in (bandwidth set very high),
 * and its threads the ones it computes with.  The coordinator's own time per
 * step (step wall time minus the time in expert jobs) is fitted as A + B *
 * tokens (cluster_fit_line).  When the workers are local (ipc://), they and
 * the coordinator share this host's cores: `@cores N` tells the simulator so.
 * Workers are listed in cluster order, as the trace's placement numbers
 * them. */
static void cluster_print_calibration(const cluster *c)
{
	if (c->n_steps < 2)
		return;
	double *xy = malloc(2 * c->n_steps * sizeof(double)), wall = 0, a = 0, b = 0;
	if (!xy)
		return;
	for (size_t i = 0; i < c->n_steps; i++) {
		xy[2 * i] = c->step_tokens[i];
		xy[2 * i + 1] = (c->step_ms[i] - c->step_expert_ms[i]) * 1e3;
		wall += c->step_ms[i];
	}
	cluster_fit_line(xy, c->n_steps, &a, &b);
	free(xy);
	fprintf(stderr, "# calibration: %zu steps, mean step %.3f ms; a cluster file:\n",
		c->n_steps, wall / (double)c->n_steps);
	const char *ep = transport_zmq_endpoint(c->t);
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	if (ep && !strncmp(ep, "ipc://", 6) && cores > 0)
		fprintf(stderr, "@cores %ld\n", cores);
	fprintf(stderr, "# name speed(rows/s) memory latency_us bandwidth_MB_s threads\n");
	for (int i = 0; i < c->n; i++) {
		if (!cluster_holds_experts(c, i))
			continue; /* KV-only: computes no experts */
		const struct cluster_worker_stats *s = &c->w[i].st;
		const struct cluster_peer *w = &c->w[i];
		double lat = 0, speed = s->speed > 0 ? s->speed : 1.0;
		if (s->batches && s->compute_seconds > 0)
			speed = (double)s->items / s->compute_seconds;
		double *l = w->n_fit ? malloc(w->n_fit * sizeof(double)) : NULL;
		if (l) {
			for (size_t k = 0; k < w->n_fit; k++)
				l[k] = w->fit_lat[k];
			qsort(l, w->n_fit, sizeof(double), cluster_cmp_double);
			lat = l[w->n_fit / 2] * 1e6;
			free(l);
		}
		fprintf(stderr, "%s %.0f %llu %.1f 100000 %u\n", s->name[0] ? s->name : "worker",
			speed,
			(unsigned long long)(w->hello.memory_bytes ? w->hello.memory_bytes : 1),
			lat > 0 ? lat : 0.0, w->hello.cores ? w->hello.cores : 1);
	}
	fprintf(stderr, "@coordinator %.1f %.3f\n", fmax(a, 0), fmax(b, 0));
}

/* Live, serving replicas in the placement in force (want == NULL), or the
 * replicas the cluster should have, R per routed expert (want != NULL). */
static int cluster_live_replicas(const cluster *c, const placement *want)
{
	int n = 0;
	for (int l = 0; l < c->spec.n_layer; l++)
		for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++) {
			if (want) {
				n += c->cfg.replicas;
				continue;
			}
			for (int r = 0; r < c->plan.n_replica; r++) {
				int h = placement_holder(&c->plan, l, e, r);
				n += h >= 0 && !c->w[h].lost && c->w[h].serving;
			}
		}
	return n;
}

/* Asks the live workers that served as KV hosts for their Stats, then waits
 * (up to timeout_ms) for those and the answers to outstanding Releases, so
 * the memory each worker reports is current.  Between jobs only. */
static void cluster_drain(cluster *c, int timeout_ms)
{
	double deadline = cluster_now() + timeout_ms / 1000.0;
	for (int i = 0; i < c->n; i++) {
		struct wire_msg ask = {.kind = WIRE_STATS};
		c->w[i].stats_asked = !c->w[i].lost &&
				      (c->w[i].st.kv_pages || c->w[i].st.kv_batches) &&
				      cluster_send(c, i, &ask, NULL, 0) == 0;
	}
	for (;;) {
		int waiting = 0;
		for (int i = 0; i < c->n; i++)
			waiting += !c->w[i].lost && (c->w[i].releasing || c->w[i].stats_asked);
		int left = (int)((deadline - cluster_now()) * 1000.0);
		if (!waiting || left <= 0)
			return;
		struct wire_msg m;
		const uint8_t *d;
		size_t n;
		int peer, who;
		int rc = cluster_recv(c, left, &m, &peer, &who, &d, &n);
		if (rc == ERR_PROTO)
			continue;
		if (rc)
			return;
		if (who < 0)
			cluster_on_stranger(c, peer, &m);
		else if (m.kind == WIRE_READY)
			cluster_on_ready(c, who, &m.u.ready);
		else if (m.kind == WIRE_STATS && c->w[who].stats_asked) {
			struct cluster_worker_stats *s = &c->w[who].st;
			c->w[who].stats_asked = 0;
			s->kv_reported = 1;
			s->kv_pages_held = m.u.stats.kv_pages;
			s->kv_bytes_held = m.u.stats.kv_bytes;
		} else if (m.kind == WIRE_ERROR)
			cluster_drop(c, who, m.u.text);
		wire_msg_free(&m);
	}
}

/* One timed step, for grouping: placement epoch, size, whether a
 * re-placement was loading, wall time. */
struct cluster_step_rec {
	uint64_t epoch;
	int32_t tokens;
	int moving;
	double ms;
};

static int cluster_cmp_step_group(const void *a, const void *b)
{
	const struct cluster_step_rec *x = a, *y = b;
	if (x->epoch != y->epoch)
		return (x->epoch > y->epoch) - (x->epoch < y->epoch);
	if (x->tokens != y->tokens)
		return (x->tokens > y->tokens) - (x->tokens < y->tokens);
	if (x->moving != y->moving)
		return x->moving - y->moving;
	return (x->ms > y->ms) - (x->ms < y->ms);
}

/* The timed steps as records (NULL if out of memory or none). */
static struct cluster_step_rec *cluster_step_recs(const cluster *c)
{
	struct cluster_step_rec *r = c->n_steps ? malloc(c->n_steps * sizeof(*r)) : NULL;
	for (size_t i = 0; r && i < c->n_steps; i++)
		r[i] = (struct cluster_step_rec){c->step_epoch[i], c->step_tokens[i],
						 c->step_moving[i], c->step_ms[i]};
	return r;
}

/* Per step size (tokens), the four most frequent: how many steps and their
 * median wall time (what `placement simulate` predicts per size). */
static void cluster_print_step_sizes(const cluster *c)
{
	struct simulate_step_size sz[4];
	int n = 0;
	if (simulate_step_sizes(c->step_tokens, c->step_ms, c->n_steps, sz, &n))
		return;
	for (int k = 0; k < n; k++)
		fprintf(stderr, "steps of %d token(s): %zu, median %.3f ms\n", (int)sz[k].tokens,
			sz[k].count, sz[k].median_ms);
}

/* What loading a re-placement cost the steps it overlapped: each such step
 * against the median quiet step of the same size (tokens) under the same
 * placement (a re-placement is loaded while the old, slower placement is in
 * force, so the run's overall median is no yardstick; groups with fewer than
 * 3 quiet steps are skipped): the median and worst ratio, and how many
 * loading and quiet steps took more than twice their group's quiet median
 * (noise hits both). */
static void cluster_print_step_spread(const cluster *c)
{
	struct cluster_step_rec *s = cluster_step_recs(c);
	double *ratio = malloc((c->n_steps + 1) * sizeof(double));
	size_t nr = 0, above = 0, quiet = 0, quiet_above = 0;
	if (s && ratio) {
		qsort(s, c->n_steps, sizeof(*s), cluster_cmp_step_group);
		for (size_t i = 0; i < c->n_steps;) {
			size_t q = i, j = i;
			while (q < c->n_steps && s[q].epoch == s[i].epoch &&
			       s[q].tokens == s[i].tokens && !s[q].moving)
				q++;
			j = q;
			while (j < c->n_steps && s[j].epoch == s[i].epoch &&
			       s[j].tokens == s[i].tokens)
				j++;
			if (q - i >= 3) {
				double base = s[i + (q - i) / 2].ms;
				for (size_t k = i; k < q; k++) {
					quiet++;
					quiet_above += s[k].ms > 2 * base;
				}
				for (size_t k = q; k < j; k++) {
					ratio[nr++] = s[k].ms / base;
					above += s[k].ms > 2 * base;
				}
			}
			i = j;
		}
	}
	if (nr) {
		qsort(ratio, nr, sizeof(double), cluster_cmp_double);
		fprintf(
		    stderr,
		    "steps while loading / quiet median of the same placement and size: %zu steps, "
		    "median %.2f, worst %.2f, %zu above 2x (quiet steps above 2x: %zu of %zu)\n",
		    nr, ratio[nr / 2], ratio[nr - 1], above, quiet_above, quiet);
	}
	free(s);
	free(ratio);
}

/* The KV hosts' attention per layer, per token (row): the coordinator's
 * milliseconds on the own pages, merging, sending and waiting; per host its
 * reported compute, bytes and messages each way; then the sums over the
 * layers, and the KV pages shipped. */
static void cluster_print_kv(const cluster *c)
{
	int n_host = 0;
	uint64_t rows = 0;
	for (int l = 0; c->kv_layer && l < c->spec.n_layer; l++) {
		rows += c->kv_layer[l].rows;
		for (int h = 0; h < ATTN_MAX_HOSTS; h++)
			if (c->kv_link[(size_t)l * ATTN_MAX_HOSTS + (size_t)h].batches ||
			    c->kv_link[(size_t)l * ATTN_MAX_HOSTS + (size_t)h].pages)
				n_host = h + 1 > n_host ? h + 1 : n_host;
	}
	if (!rows)
		return;
	fprintf(stderr,
		"KV hosts, per layer and token (row): coordinator ms on the own page, merge, "
		"send, wait; per host: compute ms, bytes out/in, messages out/in\n");
	fprintf(stderr, "%-5s %8s %8s %8s %8s %8s", "layer", "rows", "own", "merge", "send",
		"wait");
	for (int h = 0; h < n_host; h++)
		fprintf(stderr, " | h%-2d %7s %8s %8s %5s", h, "compute", "out", "in", "msgs");
	fputc('\n', stderr);
	struct cluster_kv_layer sum = {0};
	struct cluster_kv_link hsum[ATTN_MAX_HOSTS];
	memset(hsum, 0, sizeof(hsum));
	for (int l = 0; l <= c->spec.n_layer; l++) {
		const int all = l == c->spec.n_layer;
		const struct cluster_kv_layer *s = all ? &sum : &c->kv_layer[l];
		if (!s->rows)
			continue;
		/* the sums: per token over all layers */
		const double per = all ? (double)rows / c->spec.n_layer : (double)s->rows;
		if (all)
			fprintf(stderr, "%-5s %8s", "all", "");
		else
			fprintf(stderr, "%-5d %8llu", l, (unsigned long long)s->rows);
		fprintf(stderr, " %8.3f %8.3f %8.3f %8.3f", s->own * 1e3 / per,
			s->merge * 1e3 / per, s->send * 1e3 / per, s->wait * 1e3 / per);
		for (int h = 0; h < n_host; h++) {
			const struct cluster_kv_link *k =
			    all ? &hsum[h] : &c->kv_link[(size_t)l * ATTN_MAX_HOSTS + (size_t)h];
			fprintf(stderr, " | %11.3f %8.0f %8.0f %2.1f/%-2.1f",
				k->compute * 1e3 / per, (double)k->bytes_out / per,
				(double)k->bytes_in / per, (double)k->msgs_out / per,
				(double)k->msgs_in / per);
			if (!all) {
				hsum[h].compute += k->compute;
				hsum[h].bytes_out += k->bytes_out;
				hsum[h].bytes_in += k->bytes_in;
				hsum[h].msgs_out += k->msgs_out;
				hsum[h].msgs_in += k->msgs_in;
				hsum[h].pages += k->pages;
				hsum[h].page_bytes += k->page_bytes;
			}
		}
		fputc('\n', stderr);
		if (!all) {
			sum.rows += s->rows;
			sum.own += s->own;
			sum.merge += s->merge;
			sum.send += s->send;
			sum.wait += s->wait;
		}
	}
	for (int h = 0; h < n_host; h++)
		fprintf(stderr, "KV host %d: %llu pages shipped, %.1f MiB\n", h,
			(unsigned long long)hsum[h].pages, (double)hsum[h].page_bytes / 1048576.0);
}

void cluster_print_stats(cluster *c)
{
	cluster_drain(c, 2000);
	cluster_print_balance(c);
	if (c->policy)
		fprintf(stderr,
			"balance: %llu re-placement(s) switched, %.1f MiB loaded by workers\n",
			(unsigned long long)c->rebalances, (double)c->moved_bytes / 1048576.0);
	for (int e = 0; e < cluster_n_epochs(c); e++) {
		struct cluster_epoch_stats ep;
		cluster_get_epoch(c, e, &ep);
		if (ep.steps)
			fprintf(
			    stderr,
			    "balance: epoch %llu: %llu steps, worker compute per step max %.3f ms, "
			    "mean %.3f ms, max/mean %.3f\n",
			    (unsigned long long)ep.epoch, (unsigned long long)ep.steps,
			    ep.compute_max * 1e3, ep.compute_mean * 1e3, ep.imbalance);
	}
	if (c->n_lost || c->n_rejoined)
		fprintf(
		    stderr,
		    "failover: %llu worker(s) lost, %llu joined back; %llu step(s) re-sent %llu "
		    "item(s), worst stall %.1f ms; %llu repair(s); %d of %d expert replicas "
		    "live%s\n",
		    (unsigned long long)c->n_lost, (unsigned long long)c->n_rejoined,
		    (unsigned long long)c->n_failover_steps, (unsigned long long)c->resent_items,
		    c->worst_stall * 1e3, (unsigned long long)c->n_repairs,
		    cluster_live_replicas(c, NULL), cluster_live_replicas(c, &c->plan),
		    c->next_active ? " (a re-placement is loading)" : "");
	double med, worst;
	uint64_t n_steps;
	cluster_step_times(c, &med, &worst, &n_steps);
	if (n_steps)
		fprintf(stderr,
			"steps: %llu, median %.3f ms, worst while a re-placement loaded %.3f ms\n",
			(unsigned long long)n_steps, med, worst);
	cluster_print_step_sizes(c);
	cluster_print_step_spread(c);
	fprintf(stderr, "%-4s %-20s %10s %10s %12s %12s %10s %10s %10s %8s %10s\n", "wkr", "name",
		"rows", "items", "sent", "received", "compute s", "wait s", "rows/s", "held",
		"held MiB");
	for (int i = 0; i < c->n; i++) {
		const struct cluster_worker_stats *s = &c->w[i].st;
		fprintf(
		    stderr,
		    "%-4d %-20.20s %10llu %10llu %12llu %12llu %10.3f %10.3f %10.0f %8u %10.3f%s\n",
		    i, s->name, (unsigned long long)s->rows, (unsigned long long)s->items,
		    (unsigned long long)s->bytes_sent, (unsigned long long)s->bytes_received,
		    s->compute_seconds, s->wait_seconds, s->speed, s->held_experts,
		    (double)s->held_bytes / 1048576.0, s->lost ? " LOST" : "");
	}
	for (int i = 0; i < c->n; i++) {
		const struct cluster_worker_stats *s = &c->w[i].st;
		if (!s->kv_batches && !s->kv_pages)
			continue;
		fprintf(stderr,
			"KV host: worker %d%s: %llu attention batches, %llu rows, %.3f s compute; "
			"%llu pages (%.2f MiB) shipped",
			i, cluster_holds_experts(c, i) ? "" : " (KV-only)",
			(unsigned long long)s->kv_batches, (unsigned long long)s->attn_rows,
			s->attn_seconds, (unsigned long long)s->kv_pages,
			(double)s->kv_bytes / 1048576.0);
		if (s->kv_reported)
			fprintf(stderr, ", %llu pages (%.2f MiB) held\n",
				(unsigned long long)s->kv_pages_held,
				(double)s->kv_bytes_held / 1048576.0);
		else
			fprintf(stderr, ", pages held unknown (no Stats answer)\n");
	}
	uint64_t streamed = 0;
	for (int i = 0; i < c->n; i++)
		streamed += c->w[i].st.streamed_bytes;
	fprintf(stderr, "weights streamed: %llu bytes\n", (unsigned long long)streamed);
	cluster_print_kv(c);
	/* what each worker should hold: the placement in force plus the one
	 * being loaded (released experts are gone) */
	for (int i = 0; i < c->n; i++) {
		uint32_t placed = 0, more = 0;
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++) {
				int now = placement_holds(&c->plan, i, l, e);
				placed += (uint32_t)now;
				more += (uint32_t)(c->next_active && !now &&
						   placement_holds(&c->next, i, l, e));
			}
		fprintf(
		    stderr,
		    "placement: worker %d should hold %u experts (%u in epoch %llu, %u loading)\n",
		    i, placed + more, placed, (unsigned long long)c->epoch, more);
	}
	cluster_print_calibration(c);
	fprintf(stderr, "metrics (Prometheus text format):\n");
	cluster_metrics_write(stderr, c, 0);
}

static void cluster_metric_head(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Prometheus label values: backslash, quote and newline escaped. */
static void cluster_metric_label(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '\\' || *s == '"')
			fputc('\\', f);
		if (*s == '\n')
			fputs("\\n", f);
		else
			fputc(*s, f);
	}
}

static void cluster_metric_worker(FILE *f, const cluster *c, const char *name, int i, double v)
{
	fprintf(f, "%s{worker=\"%d\",name=\"", name, i);
	cluster_metric_label(f, c->w[i].st.name);
	fprintf(f, "\"} %.9g\n", v);
}

int cluster_metrics_write(FILE *f, const cluster *c, int per_expert)
{
	static const struct {
		const char *name, *type, *help;
	} wm[] = {
	    {"moefleet_worker_rows_total", "counter", "Token rows sent to the worker."},
	    {"moefleet_worker_items_total", "counter", "(row, expert) items the worker computed."},
	    {"moefleet_worker_compute_seconds_total", "counter",
	     "Compute time the worker reported for expert batches."},
	    {"moefleet_worker_wait_seconds_total", "counter",
	     "Time the coordinator waited for the worker."},
	    {"moefleet_worker_sent_bytes_total", "counter", "Bytes sent to the worker."},
	    {"moefleet_worker_received_bytes_total", "counter", "Bytes received from the worker."},
	    {"moefleet_worker_streamed_bytes_total", "counter",
	     "Expert weight bytes streamed to the worker."},
	    {"moefleet_worker_held_experts", "gauge", "Experts the worker reports holding."},
	    {"moefleet_worker_held_bytes", "gauge", "Expert bytes the worker reports holding."},
	    {"moefleet_worker_speed_rows_per_second", "gauge",
	     "Expert rows per second used for planning."},
	    {"moefleet_worker_load", "gauge",
	     "Decayed routed rows of the experts the worker holds (shared among replicas)."},
	    {"moefleet_worker_up", "gauge", "1 while the worker serves, 0 once lost."},
	    {"moefleet_worker_kv_pages_total", "counter",
	     "KV pages shipped to the worker as a KV host (--kv-shards)."},
	    {"moefleet_worker_kv_bytes_total", "counter", "Bytes of those KV pages."},
	    {"moefleet_worker_attn_batches_total", "counter",
	     "Attention batches sent to the worker as a KV host."},
	    {"moefleet_worker_attn_rows_total", "counter",
	     "Token rows of the attention batches the worker answered."},
	    {"moefleet_worker_attn_compute_seconds_total", "counter",
	     "Compute time the worker reported for attention batches."},
	};
	const int n_wm = (int)(sizeof(wm) / sizeof(wm[0]));
	const double *load = c->counts ? balance_counts_load(c->counts) : NULL;
	double *wl = calloc((size_t)c->n + 1, sizeof(double));
	if (!wl)
		return ERR_NOMEM;
	for (int l = 0; load && l < c->spec.n_layer; l++)
		for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++) {
			int nh = placement_n_holders(&c->plan, l, e);
			for (int r = 0; r < nh; r++) {
				int h = placement_holder(&c->plan, l, e, r);
				if (h >= 0 && h < c->n)
					wl[h] += load[(size_t)l * c->spec.n_expert + e] / nh;
			}
		}
	for (int m = 0; m < n_wm; m++) {
		cluster_metric_head(f, wm[m].name, wm[m].type, wm[m].help);
		for (int i = 0; i < c->n; i++) {
			const struct cluster_worker_stats *s = &c->w[i].st;
			double v[] = {(double)s->rows,
				      (double)s->items,
				      s->compute_seconds,
				      s->wait_seconds,
				      (double)s->bytes_sent,
				      (double)s->bytes_received,
				      (double)s->streamed_bytes,
				      (double)s->held_experts,
				      (double)s->held_bytes,
				      s->speed,
				      wl[i],
				      s->lost ? 0.0 : 1.0,
				      (double)s->kv_pages,
				      (double)s->kv_bytes,
				      (double)s->kv_batches,
				      (double)s->attn_rows,
				      s->attn_seconds};
			cluster_metric_worker(f, c, wm[m].name, i, v[m]);
		}
	}
	/* balancedness: mean / max over live workers of load / speed (1 = even) */
	double max = 0, mean = 0;
	int live = 0;
	for (int i = 0; i < c->n; i++) {
		if (c->w[i].lost || !(c->speed[i] > 0) || !cluster_holds_experts(c, i))
			continue;
		double t = wl[i] / c->speed[i];
		max = fmax(max, t);
		mean += t;
		live++;
	}
	mean = live ? mean / live : 0;
	free(wl);
	cluster_metric_head(f, "moefleet_balance_worker_time_mean", "gauge",
			    "Mean over live workers of decayed load / speed.");
	fprintf(f, "moefleet_balance_worker_time_mean %.9g\n", mean);
	cluster_metric_head(f, "moefleet_balance_worker_time_max", "gauge",
			    "Max over live workers of decayed load / speed.");
	fprintf(f, "moefleet_balance_worker_time_max %.9g\n", max);
	cluster_metric_head(f, "moefleet_balancedness", "gauge",
			    "Mean / max of the workers' predicted time (1 = perfectly even).");
	fprintf(f, "moefleet_balancedness %.9g\n", max > 0 ? mean / max : 1.0);
	struct cluster_epoch_stats ep;
	cluster_epoch_now(c, &ep);
	cluster_metric_head(
	    f, "moefleet_balance_measured_imbalance", "gauge",
	    "Max / mean of the workers' compute time in the placement epoch in force.");
	fprintf(f, "moefleet_balance_measured_imbalance %.9g\n", ep.imbalance);
	cluster_metric_head(
	    f, "moefleet_workers_lost_total", "counter",
	    "Workers dropped as lost (dead, silent past the time-out, or misbehaving).");
	fprintf(f, "moefleet_workers_lost_total %llu\n", (unsigned long long)c->n_lost);
	cluster_metric_head(f, "moefleet_workers_rejoined_total", "counter",
			    "Workers that joined in place of a lost one.");
	fprintf(f, "moefleet_workers_rejoined_total %llu\n", (unsigned long long)c->n_rejoined);
	cluster_metric_head(f, "moefleet_failover_steps_total", "counter",
			    "Expert jobs whose items were re-sent to surviving workers.");
	fprintf(f, "moefleet_failover_steps_total %llu\n", (unsigned long long)c->n_failover_steps);
	cluster_metric_head(f, "moefleet_failover_stall_seconds_max", "gauge",
			    "Longest expert job that re-sent items (detection + re-send).");
	fprintf(f, "moefleet_failover_stall_seconds_max %.9g\n", c->worst_stall);
	cluster_metric_head(f, "moefleet_expert_replicas_live", "gauge",
			    "Serving replicas of routed experts in the placement in force.");
	fprintf(f, "moefleet_expert_replicas_live %d\n", cluster_live_replicas(c, NULL));
	cluster_metric_head(f, "moefleet_expert_replicas_wanted", "gauge",
			    "Routed experts x the replica count asked for.");
	fprintf(f, "moefleet_expert_replicas_wanted %d\n", cluster_live_replicas(c, &c->plan));
	cluster_metric_head(f, "moefleet_placement_epoch", "gauge", "Placement epoch in force.");
	fprintf(f, "moefleet_placement_epoch %llu\n", (unsigned long long)c->epoch);
	cluster_metric_head(f, "moefleet_rebalances_total", "counter", "Placements switched to.");
	fprintf(f, "moefleet_rebalances_total %llu\n", (unsigned long long)c->rebalances);
	cluster_metric_head(f, "moefleet_migrated_bytes_total", "counter",
			    "Expert bytes workers were told to load by re-placements.");
	fprintf(f, "moefleet_migrated_bytes_total %llu\n", (unsigned long long)c->moved_bytes);
	double med, worst;
	uint64_t n_steps;
	cluster_step_times(c, &med, &worst, &n_steps);
	cluster_metric_head(f, "moefleet_steps_total", "counter",
			    "Forward steps through the cluster.");
	fprintf(f, "moefleet_steps_total %llu\n", (unsigned long long)n_steps);
	cluster_metric_head(f, "moefleet_step_seconds_median", "gauge",
			    "Median forward step wall time.");
	fprintf(f, "moefleet_step_seconds_median %.9g\n", med * 1e-3);
	if (per_expert && load) {
		cluster_metric_head(f, "moefleet_expert_load", "gauge",
				    "Decayed routed rows per (layer, expert).");
		for (int l = 0; l < c->spec.n_layer; l++)
			for (int e = 0; e < c->spec.n_expert && c->spec.layer_moe[l]; e++)
				fprintf(f,
					"moefleet_expert_load{layer=\"%d\",expert=\"%d\"} %.9g\n",
					l, e, load[(size_t)l * c->spec.n_expert + e]);
	}
	return ferror(f) ? ERR_IO : 0;
}
