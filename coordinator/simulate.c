#include "simulate.h"
#include "balance.h"
#include "placement.h"
#include "trace.h"
#include "../common/err.h"
#include "../common/log.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SIM_MAX_WORKERS 4096

struct sim_worker {
	char name[64];
	double speed, latency_s, bandwidth;
	unsigned long long mem;
};

/* The coordinator's own time per step, A + B * tokens (0 unless given). */
struct sim_coord {
	double per_step_s, per_token_s;
};

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
		int got = sscanf(line, " @coordinator %lf %lf %c", &a, &b, &extra);
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
		got = sscanf(line, "%63s %lf %llu %lf %lf %c", name, &speed, &mem, &lat, &bw, &extra);
		if (got <= 0)
			continue;
		if (got != 5 || !(speed > 0) || mem == 0 || !(lat >= 0) || !(bw > 0) ||
		    !isfinite(speed) || !isfinite(lat) || !isfinite(bw)) {
			log_error("%s:%d: expected 'NAME SPEED MEMORY_BYTES LATENCY_US "
				  "BANDWIDTH_MB_S' with positive numbers",
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

int simulate_run(const struct simulate_config *cfg, FILE *out)
{
	int rc = 0;
	struct sim_worker *sw = NULL;
	int nw = 0;
	trace_reader *tr = NULL;
	struct balance_counts *counts = NULL;
	placement plan = {0};
	struct placement_worker *pw = NULL;
	double *finish = NULL, *lt = NULL;
	uint8_t *visits = NULL;
	uint64_t *rows_w = NULL, *items_w = NULL;
	uint8_t moe[MOE_MAX_LAYERS] = {0};
	uint64_t bytes[MOE_MAX_LAYERS] = {0};
	struct wire_trace rec = {0};
	const struct balance_policy *pol = NULL;

	if (strcmp(cfg->policy, "static") && !(pol = balance_policy_find(cfg->policy))) {
		log_error("unknown policy '%s' (static, eplb, hetero, migrate)", cfg->policy);
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
	if (!pw || !finish || !lt || !visits || !rows_w || !items_w) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int i = 0; i < nw; i++)
		pw[i] = (struct placement_worker){sw[i].mem, sw[i].speed};
	struct placement_model pm = {L, X, moe, bytes, NULL};
	rc = placement_build(&pm, pw, nw, cfg->replicas, &plan);
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
		if (rec.step != cur_step) {
			steps++;
			step_time += cur_step_time;
			cur_step_time = 0;
			cur_step = rec.step;
			int due = cfg->rebalance_every > 0
					  ? rec.step - last_plan_step >= (uint64_t)cfg->rebalance_every
					  : !planned_once;
			if (pol && due) {
				pm.load = balance_counts_load(counts);
				struct balance_input in = {.model = &pm, .workers = pw, .n_worker = nw,
							   .current = &plan, .min_replicas = 1,
							   .max_replicas = cfg->replicas,
							   .extra_replicas = 0, .threshold = cfg->threshold,
							   .max_move_bytes = cfg->max_move_bytes
										 ? cfg->max_move_bytes
										 : UINT64_MAX};
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
		for (int i = 0; i < nw; i++) {
			if (!rows_here[i])
				continue;
			double b = (double)rows_here[i] * row_bytes + (double)items_here[i] * E * 4.0;
			double t = sw[i].latency_s + b / sw[i].bandwidth +
				   (double)items_here[i] / sw[i].speed;
			layer_time = fmax(layer_time, t);
			wire += b;
			messages += 2;
			rows_w[i] += rows_here[i];
			items_w[i] += items_here[i];
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
	steps++;
	step_time += cur_step_time;
	double maxl = 0, meanl = 0;
	for (int i = 0; i < nw; i++) {
		double t = (double)items_w[i] / pw[i].speed;
		maxl = fmax(maxl, t);
		meanl += t / nw;
	}
	fprintf(out,
		"%-8s workers %d, replicas %d: max/mean worker load %.3f, wire %.0f B/token, "
		"%.2f messages/token, step %.3f ms, migrated %.2f MiB\n",
		cfg->policy, nw, cfg->replicas, meanl > 0 ? maxl / meanl : 1.0,
		tokens ? wire / (double)tokens : 0.0,
		tokens ? (double)messages / (double)tokens : 0.0,
		steps ? step_time / (double)steps * 1e3 : 0.0, (double)migrated / 1048576.0);
out:
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
	return rc;
}
