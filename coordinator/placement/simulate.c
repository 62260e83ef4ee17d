#include "simulate.h"
#include "balance.h"
#include "placement.h"
#include "trace.h"
#include "../../common/err.h"
#include "../../common/log.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SIM_MAX_WORKERS 4096

struct sim_worker {
	char name[64];
	double speed, latency_s, bandwidth;
	unsigned long long mem;
	double threads, cpu; /* cores it computes with; share of its compute time on them */
};

/* The coordinator's own time per step, A + B * tokens (0 unless given), and
 * the cores the workers share (0: each has its own), with the stretch that
 * other processes on them cause to a layer's time beyond a burst. */
struct sim_coord {
	double per_step_s, per_token_s;
	double cores, stretch, burst_s;
};

/* One layer's time when the workers share `cores` cores (processor sharing):
 * worker j waits lat[j] (no CPU), then needs work[j] seconds of computing
 * with dem[j] cores to itself; while the computing workers want more cores
 * than there are, each progresses at cores / (their total demand).  Returns
 * the time the last one finishes.  work is consumed. */
static double sim_shared_layer(int n, const double *lat, double *work, const double *dem,
			       double cores)
{
	double t = 0, end = 0;
	for (int guard = 0; guard < 4 * n + 4; guard++) {
		double d = 0, next = INFINITY;
		int left = 0;
		for (int j = 0; j < n; j++) {
			if (work[j] <= 0)
				continue;
			left++;
			if (lat[j] <= t)
				d += dem[j];
			else
				next = fmin(next, lat[j]);
		}
		if (!left)
			break;
		double rate = d > cores ? cores / d : 1.0;
		for (int j = 0; j < n; j++)
			if (work[j] > 0 && lat[j] <= t)
				next = fmin(next, t + work[j] / rate);
		for (int j = 0; j < n; j++) {
			if (work[j] <= 0 || lat[j] > t)
				continue;
			work[j] -= (next - t) * rate;
			if (work[j] <= 1e-12 * (1 + next)) {
				work[j] = 0;
				end = fmax(end, next);
			}
		}
		t = next;
	}
	return end;
}

/* The placement recorded in a trace record, as a placement over nw workers;
 * 1 if the record's holders do not fit nw workers (no placement made). */
static int sim_placement_from(const struct wire_trace *rec, int nw, const uint64_t *bytes,
			      placement *out)
{
	memset(out, 0, sizeof(*out));
	if (!rec->holders || rec->n_replica < 1 || rec->n_layer > MOE_MAX_LAYERS)
		return 1;
	size_t n = (size_t)rec->n_layer * rec->n_expert * rec->n_replica;
	int top = -1;
	for (size_t i = 0; i < n; i++) {
		if (rec->holders[i] >= nw || rec->holders[i] < -1)
			return 1;
		top = rec->holders[i] > top ? rec->holders[i] : top;
	}
	if (top + 1 != nw)
		return 1;
	out->n_layer = (int)rec->n_layer;
	out->n_expert = (int)rec->n_expert;
	out->n_replica = (int)rec->n_replica;
	out->n_worker = nw;
	out->holder = malloc(n * sizeof(int32_t));
	out->worker_bytes = calloc((size_t)nw, sizeof(uint64_t));
	out->worker_load = calloc((size_t)nw, sizeof(double));
	if (!out->holder || !out->worker_bytes || !out->worker_load) {
		placement_free(out);
		return ERR_NOMEM;
	}
	memcpy(out->holder, rec->holders, n * sizeof(int32_t));
	for (size_t i = 0; i < n; i++)
		if (rec->holders[i] >= 0)
			out->worker_bytes[rec->holders[i]] +=
			    bytes[i / ((size_t)rec->n_expert * rec->n_replica)];
	return 0;
}

static int sim_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* A predicted step: its size (tokens) and time. */
struct sim_step {
	int32_t tokens;
	double ms;
};

static int sim_cmp_step(const void *a, const void *b)
{
	const struct sim_step *x = a, *y = b;
	if (x->tokens != y->tokens)
		return (x->tokens > y->tokens) - (x->tokens < y->tokens);
	return (x->ms > y->ms) - (x->ms < y->ms);
}

int simulate_step_sizes(const int32_t *tokens, const double *ms, size_t n,
			struct simulate_step_size out[4], int *n_out)
{
	*n_out = 0;
	if (!n)
		return 0;
	struct sim_step *by = malloc(n * sizeof(*by));
	if (!by)
		return ERR_NOMEM;
	for (size_t i = 0; i < n; i++)
		by[i] = (struct sim_step){tokens[i], ms[i]};
	qsort(by, n, sizeof(*by), sim_cmp_step);
	size_t start[4] = {0}, count[4] = {0};
	for (size_t i = 0; i < n;) {
		size_t j = i;
		while (j < n && by[j].tokens == by[i].tokens)
			j++;
		/* keep the four largest groups, largest first */
		for (int k = 0; k < 4; k++)
			if (j - i > count[k]) {
				memmove(&count[k + 1], &count[k], (size_t)(3 - k) * sizeof(size_t));
				memmove(&start[k + 1], &start[k], (size_t)(3 - k) * sizeof(size_t));
				count[k] = j - i;
				start[k] = i;
				break;
			}
		i = j;
	}
	for (int k = 0; k < 4 && count[k]; k++)
		out[(*n_out)++] = (struct simulate_step_size){by[start[k]].tokens, count[k],
							      by[start[k] + count[k] / 2].ms};
	free(by);
	return 0;
}

static int sim_read_workers(const char *path, struct sim_worker **out, int *n_out,
			    struct sim_coord *coord)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		log_error("%s: cannot open: %s", path, strerror(errno));
		return ERR_IO;
	}
	struct sim_worker *w = calloc(SIM_MAX_WORKERS, sizeof(*w));
	int n = 0, line_no = 0, rc = 0;
	char line[512];
	while (w && fgets(line, sizeof(line), f)) {
		line_no++;
		line[strcspn(line, "#\r\n")] = 0;
		char name[64];
		double speed, lat, bw;
		unsigned long long mem;
		char extra;
		double a, b;
		double cores, stretch = 1, burst = 6;
		int got = sscanf(line, " @cores %lf %lf %lf %c", &cores, &stretch, &burst, &extra);
		if (got >= 1) {
			if (got > 3 || !(cores >= 0.01) || !(cores <= 1 << 20) || !(stretch >= 1) ||
			    !(stretch <= 1000) || !(burst >= 0) || !(burst <= 1e6)) {
				log_error("%s:%d: expected '@cores N [STRETCH [BURST_MS]]' with N "
					  "> 0 and "
					  "STRETCH >= 1",
					  path, line_no);
				rc = ERR_FORMAT;
				break;
			}
			coord->cores = cores;
			coord->stretch = stretch;
			coord->burst_s = burst * 1e-3;
			continue;
		}
		got = sscanf(line, " @coordinator %lf %lf %c", &a, &b, &extra);
		if (got >= 1) {
			if (got != 2 || !(a >= 0) || !(b >= 0) || !isfinite(a) || !isfinite(b)) {
				log_error("%s:%d: expected '@coordinator US_PER_STEP US_PER_TOKEN'",
					  path, line_no);
				rc = ERR_FORMAT;
				break;
			}
			coord->per_step_s = a * 1e-6;
			coord->per_token_s = b * 1e-6;
			continue;
		}
		double threads = 1, cpu = 1;
		got = sscanf(line, "%63s %lf %llu %lf %lf %lf %lf %c", name, &speed, &mem, &lat,
			     &bw, &threads, &cpu, &extra);
		if (got <= 0)
			continue;
		if (got < 5 || got > 7 || !(speed > 0) || mem == 0 || !(lat >= 0) || !(bw > 0) ||
		    !isfinite(speed) || !isfinite(lat) || !isfinite(bw) || !(threads >= 1) ||
		    !(threads <= 1 << 20) || !(cpu > 0) || !(cpu <= 1)) {
			log_error("%s:%d: expected 'NAME SPEED MEMORY_BYTES LATENCY_US "
				  "BANDWIDTH_MB_S [THREADS [CPU_SHARE]]' with positive numbers "
				  "(CPU_SHARE <= 1)",
				  path, line_no);
			rc = ERR_FORMAT;
			break;
		}
		if (n == SIM_MAX_WORKERS) {
			log_error("%s: more than %d workers", path, SIM_MAX_WORKERS);
			rc = ERR_FORMAT;
			break;
		}
		snprintf(w[n].name, sizeof(w[n].name), "%s", name);
		w[n].speed = speed;
		w[n].mem = mem;
		w[n].latency_s = lat * 1e-6;
		w[n].bandwidth = bw * 1e6;
		w[n].threads = threads;
		w[n].cpu = cpu;
		n++;
	}
	fclose(f);
	if (!w)
		return ERR_NOMEM;
	if (!rc && n == 0) {
		log_error("%s: no workers", path);
		rc = ERR_FORMAT;
	}
	if (rc) {
		free(w);
		return rc;
	}
	*out = w;
	*n_out = n;
	return 0;
}

int simulate_read_cluster(const char *path, struct placement_worker **out, int *n)
{
	struct sim_worker *sw = NULL;
	struct sim_coord coord = {0};
	*out = NULL;
	int rc = sim_read_workers(path, &sw, n, &coord);
	if (rc)
		return rc;
	*out = calloc((size_t)*n, sizeof(**out));
	for (int i = 0; *out && i < *n; i++)
		(*out)[i] = (struct placement_worker){.mem_bytes = sw[i].mem, .speed = sw[i].speed};
	free(sw);
	return *out ? 0 : ERR_NOMEM;
}

int simulate_run(const struct simulate_config *cfg, FILE *out)
{
	int rc = 0;
	struct sim_worker *sw = NULL;
	int nw = 0;
	trace_reader *tr = NULL;
	struct balance_counts *counts = NULL;
	placement plan = {0};
	struct placement_worker *pw = NULL;
	double *finish = NULL, *lt = NULL, *s_lat = NULL, *s_work = NULL, *s_dem = NULL;
	uint8_t *visits = NULL;
	uint64_t *rows_w = NULL, *items_w = NULL;
	uint8_t moe[MOE_MAX_LAYERS] = {0};
	uint64_t bytes[MOE_MAX_LAYERS] = {0};
	struct wire_trace rec = {0};
	const struct balance_policy *pol = NULL;
	double *step_ms = NULL;
	int32_t *step_tok = NULL;
	int32_t cur_tokens = 0;
	size_t steps_cap = 0;
	const int follow = !strcmp(cfg->policy, "trace");

	if (strcmp(cfg->policy, "static") && !follow && !(pol = balance_policy_find(cfg->policy))) {
		log_error("unknown policy '%s' (static, trace, eplb, hetero, migrate)",
			  cfg->policy);
		return ERR_CONFIG;
	}
	struct sim_coord coord = {0};
	rc = sim_read_workers(cfg->workers_path, &sw, &nw, &coord);
	if (!rc)
		rc = trace_reader_open(cfg->trace_path, &tr);
	if (!rc)
		rc = trace_read(tr, &rec);
	if (rc == 1 || (!rc && rec.n_layer == 0)) {
		log_error("%s: the trace has no model table in its first record", cfg->trace_path);
		rc = ERR_FORMAT;
	}
	if (rc)
		goto out;
	const int L = (int)rec.n_layer, X = (int)rec.n_expert, E = (int)rec.n_embd;
	if (X < 1 || E < 1) {
		log_error("%s: invalid model table", cfg->trace_path);
		rc = ERR_FORMAT;
		goto out;
	}
	for (int l = 0; l < L; l++) {
		bytes[l] = rec.expert_bytes[l];
		moe[l] = bytes[l] > 0;
	}
	pw = calloc((size_t)nw, sizeof(*pw));
	finish = calloc((size_t)nw, sizeof(double));
	lt = calloc((size_t)nw, sizeof(double));
	visits = calloc((size_t)nw, 1);
	rows_w = calloc((size_t)nw, sizeof(uint64_t));
	items_w = calloc((size_t)nw, sizeof(uint64_t));
	s_lat = calloc((size_t)nw, sizeof(double));
	s_work = calloc((size_t)nw, sizeof(double));
	s_dem = calloc((size_t)nw, sizeof(double));
	if (!pw || !finish || !lt || !visits || !rows_w || !items_w || !s_lat || !s_work ||
	    !s_dem) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int i = 0; i < nw; i++)
		pw[i] = (struct placement_worker){.mem_bytes = sw[i].mem, .speed = sw[i].speed};
	struct placement_model pm = {L, X, moe, bytes, NULL};
	/* start from the placement the trace recorded (what the measured run
	 * had), unless told otherwise or it does not fit the cluster file */
	int replicas = cfg->replicas > 0 ? cfg->replicas : (rec.n_replica ? (int)rec.n_replica : 1);
	rc = 1;
	if (!cfg->build_initial && (cfg->replicas <= 0 || cfg->replicas == (int)rec.n_replica))
		rc = sim_placement_from(&rec, nw, bytes, &plan);
	if (rc == 1) {
		if (follow) {
			log_error(
			    "%s: policy 'trace' needs the trace's placement over the %d workers "
			    "of %s",
			    cfg->trace_path, nw, cfg->workers_path);
			rc = ERR_CONFIG;
			goto out;
		}
		rc = placement_build(&pm, pw, nw, replicas, &plan);
	}
	if (!rc)
		rc = balance_counts_new(L, X, cfg->window_tokens > 0 ? cfg->window_tokens : 4096,
					&counts);
	if (rc)
		goto out;
	const double row_bytes = (double)E / 32.0 * 34.0;
	uint64_t steps = 0, tokens = 0, messages = 0, migrated = 0;
	double wire = 0, step_time = 0, cur_step_time = 0;
	uint64_t cur_step = rec.step, last_plan_step = rec.step;
	int first_layer = -1, planned_once = 0;
	for (;;) {
		if (follow && rec.holders && rec.n_replica) {
			placement next;
			int r = sim_placement_from(&rec, nw, bytes, &next);
			if (r == 0) {
				migrated += balance_moved_bytes(&plan, &next, &pm);
				placement_free(&plan);
				plan = next;
			} else if (r < 0) {
				rc = r;
				goto out;
			}
		}
		if (rec.step != cur_step) {
			if (steps == steps_cap) {
				size_t cap = steps_cap ? 2 * steps_cap : 1024;
				double *t = realloc(step_ms, cap * sizeof(double));
				if (t)
					step_ms = t;
				int32_t *k = realloc(step_tok, cap * sizeof(int32_t));
				if (k)
					step_tok = k;
				if (!t || !k) {
					rc = ERR_NOMEM;
					goto out;
				}
				steps_cap = cap;
			}
			step_tok[steps] = cur_tokens;
			step_ms[steps] = cur_step_time * 1e3;
			steps++;
			step_time += cur_step_time;
			cur_step_time = 0;
			cur_step = rec.step;
			int due = cfg->rebalance_every > 0
				      ? rec.step - last_plan_step >= (uint64_t)cfg->rebalance_every
				      : !planned_once;
			if (pol && due) {
				pm.load = balance_counts_load(counts);
				struct balance_input in = {
				    .model = &pm,
				    .workers = pw,
				    .n_worker = nw,
				    .current = &plan,
				    .min_replicas = 1,
				    .max_replicas = replicas,
				    .extra_replicas = 0,
				    .threshold = cfg->threshold,
				    .max_move_bytes =
					cfg->max_move_bytes ? cfg->max_move_bytes : UINT64_MAX};
				placement next;
				if (pol->plan(&in, &next) == 0) {
					migrated += balance_moved_bytes(&plan, &next, &pm);
					placement_free(&plan);
					plan = next;
				}
				pm.load = NULL;
				last_plan_step = rec.step;
				planned_once = 1;
			}
		}
		int l = (int)rec.layer;
		if (l < 0 || l >= L || !moe[l]) {
			log_error("%s: record for layer %d, which has no routed experts",
				  cfg->trace_path, l);
			rc = ERR_FORMAT;
			goto out;
		}
		if (first_layer < 0)
			first_layer = l;
		if (l == first_layer) {
			cur_tokens = (int32_t)rec.n_rows;
			tokens += rec.n_rows;
			cur_step_time += coord.per_step_s + coord.per_token_s * rec.n_rows;
		}
		balance_counts_add(counts, l, rec.ids, (int)rec.n_rows, (int)rec.k);
		memset(lt, 0, (size_t)nw * sizeof(double));
		for (int i = 0; i < nw; i++)
			finish[i] = 0;
		uint64_t rows_here[SIM_MAX_WORKERS] = {0}, items_here[SIM_MAX_WORKERS] = {0};
		for (uint32_t r = 0; r < rec.n_rows; r++) {
			memset(visits, 0, (size_t)nw);
			for (uint32_t s = 0; s < rec.k; s++) {
				int32_t e = rec.ids[(size_t)r * rec.k + s];
				if (e < 0 || e >= X)
					continue;
				int h = balance_choose_replica(&plan, l, e, finish, visits);
				if (h < 0)
					continue;
				if (!visits[h])
					rows_here[h]++;
				visits[h] = 1;
				items_here[h]++;
				finish[h] += 1.0 / pw[h].speed;
			}
		}
		double layer_time = 0;
		int n_act = 0;
		for (int i = 0; i < nw; i++) {
			if (!rows_here[i])
				continue;
			double b =
			    (double)rows_here[i] * row_bytes + (double)items_here[i] * E * 4.0;
			double t = sw[i].latency_s + b / sw[i].bandwidth +
				   (double)items_here[i] / sw[i].speed;
			layer_time = fmax(layer_time, t);
			if (coord.cores) {
				s_lat[n_act] = sw[i].latency_s + b / sw[i].bandwidth;
				s_work[n_act] = (double)items_here[i] / sw[i].speed;
				s_dem[n_act] = sw[i].threads * sw[i].cpu;
				n_act++;
			}
			wire += b;
			messages += 2;
			rows_w[i] += rows_here[i];
			items_w[i] += items_here[i];
		}
		if (coord.cores) {
			layer_time = sim_shared_layer(n_act, s_lat, s_work, s_dem, coord.cores);
			if (layer_time > coord.burst_s)
				layer_time =
				    coord.burst_s + (layer_time - coord.burst_s) * coord.stretch;
		}
		cur_step_time += layer_time;
		wire_trace_free(&rec);
		rc = trace_read(tr, &rec);
		if (rc == 1) {
			rc = 0;
			break;
		}
		if (rc)
			goto out;
	}
	if (steps == steps_cap) {
		double *t = realloc(step_ms, (steps_cap + 1) * sizeof(double));
		if (t)
			step_ms = t;
		int32_t *k = realloc(step_tok, (steps_cap + 1) * sizeof(int32_t));
		if (k)
			step_tok = k;
		if (!t || !k) {
			rc = ERR_NOMEM;
			goto out;
		}
	}
	step_tok[steps] = cur_tokens;
	step_ms[steps] = cur_step_time * 1e3;
	steps++;
	step_time += cur_step_time;
	/* per step size (tokens), the four most frequent: count and median */
	struct simulate_step_size sizes[4];
	int n_sizes = 0;
	rc = simulate_step_sizes(step_tok, step_ms, steps, sizes, &n_sizes);
	if (rc)
		goto out;
	qsort(step_ms, steps, sizeof(double), sim_cmp_double);
	double maxl = 0, meanl = 0;
	for (int i = 0; i < nw; i++) {
		double t = (double)items_w[i] / pw[i].speed;
		maxl = fmax(maxl, t);
		meanl += t / nw;
	}
	fprintf(out,
		"%-8s workers %d, replicas %d: max/mean worker load %.3f, wire %.0f B/token, "
		"%.2f messages/token, step %.3f ms, median step %.3f ms, migrated %.2f MiB\n",
		cfg->policy, nw, replicas, meanl > 0 ? maxl / meanl : 1.0,
		tokens ? wire / (double)tokens : 0.0,
		tokens ? (double)messages / (double)tokens : 0.0, step_time / (double)steps * 1e3,
		step_ms[steps / 2], (double)migrated / 1048576.0);
	for (int i = 0; i < n_sizes; i++)
		fprintf(out, "%-8s steps of %d token(s): %zu, median %.3f ms\n", cfg->policy,
			(int)sizes[i].tokens, sizes[i].count, sizes[i].median_ms);
out:
	free(step_ms);
	free(step_tok);
	wire_trace_free(&rec);
	placement_free(&plan);
	balance_counts_destroy(&counts);
	trace_reader_close(&tr);
	free(sw);
	free(pw);
	free(finish);
	free(lt);
	free(visits);
	free(rows_w);
	free(items_w);
	free(s_lat);
	free(s_work);
	free(s_dem);
	return rc;
}
