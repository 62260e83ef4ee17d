#include "metrics.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"

#define METRICS_MAX_BUCKETS 16
#define METRICS_MAX_SERIES  64

struct metrics_hist {
	int n;
	double le[METRICS_MAX_BUCKETS];
	uint64_t count[METRICS_MAX_BUCKETS]; /* per bucket, not cumulative */
	uint64_t total;
	double sum;
};

struct metrics_series {
	char endpoint[48];
	int status;
	uint64_t count;
};

struct metrics {
	pthread_mutex_t mu;
	struct metrics_series req[METRICS_MAX_SERIES];
	int n_req;
	uint64_t prompt_tokens, completion_tokens, disconnects, steps;
	struct metrics_hist ttft, itl, batch;
	int queued, active, n_slots;
	int64_t kv_used, kv_cap;
};

static void metrics_hist_init(struct metrics_hist *h, const double *le, int n)
{
	h->n = n;
	memcpy(h->le, le, sizeof(double) * (size_t)n);
}

static void metrics_hist_add(struct metrics_hist *h, double v)
{
	for (int i = 0; i < h->n; i++) {
		if (v <= h->le[i]) {
			h->count[i]++;
			break;
		}
	}
	h->total++;
	h->sum += v;
}

int metrics_new(metrics **out)
{
	metrics *m = calloc(1, sizeof(*m));
	if (!m)
		return ERR_NOMEM;
	pthread_mutex_init(&m->mu, NULL);
	static const double ttft[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
				      2.5,  5,	   10,	 30,  60,   120};
	static const double itl[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
				     0.1,   0.25,   0.5,   1,	 2.5,	5};
	static const double batch[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
	metrics_hist_init(&m->ttft, ttft, (int)(sizeof(ttft) / sizeof(ttft[0])));
	metrics_hist_init(&m->itl, itl, (int)(sizeof(itl) / sizeof(itl[0])));
	metrics_hist_init(&m->batch, batch, (int)(sizeof(batch) / sizeof(batch[0])));
	*out = m;
	return 0;
}

void metrics_destroy(metrics **m)
{
	if (!m || !*m)
		return;
	pthread_mutex_destroy(&(*m)->mu);
	free(*m);
	*m = NULL;
}

void metrics_count_request(metrics *m, const char *endpoint, int status)
{
	pthread_mutex_lock(&m->mu);
	int i;
	for (i = 0; i < m->n_req; i++)
		if (m->req[i].status == status && !strcmp(m->req[i].endpoint, endpoint))
			break;
	if (i == m->n_req && m->n_req < METRICS_MAX_SERIES) {
		snprintf(m->req[i].endpoint, sizeof(m->req[i].endpoint), "%s", endpoint);
		m->req[i].status = status;
		m->n_req++;
	}
	if (i < m->n_req)
		m->req[i].count++;
	pthread_mutex_unlock(&m->mu);
}

void metrics_count_tokens(metrics *m, int prompt, int completion)
{
	pthread_mutex_lock(&m->mu);
	m->prompt_tokens += (uint64_t)(prompt > 0 ? prompt : 0);
	m->completion_tokens += (uint64_t)(completion > 0 ? completion : 0);
	pthread_mutex_unlock(&m->mu);
}

void metrics_count_disconnect(metrics *m)
{
	pthread_mutex_lock(&m->mu);
	m->disconnects++;
	pthread_mutex_unlock(&m->mu);
}

void metrics_observe_ttft(metrics *m, double s)
{
	pthread_mutex_lock(&m->mu);
	metrics_hist_add(&m->ttft, s);
	pthread_mutex_unlock(&m->mu);
}

void metrics_observe_itl(metrics *m, double s)
{
	pthread_mutex_lock(&m->mu);
	metrics_hist_add(&m->itl, s);
	pthread_mutex_unlock(&m->mu);
}

void metrics_observe_batch(metrics *m, int n)
{
	pthread_mutex_lock(&m->mu);
	metrics_hist_add(&m->batch, n);
	m->steps++;
	pthread_mutex_unlock(&m->mu);
}

void metrics_set_load(metrics *m, int queued, int active, int n_slots, int64_t kv_used,
		      int64_t kv_cap)
{
	pthread_mutex_lock(&m->mu);
	m->queued = queued;
	m->active = active;
	m->n_slots = n_slots;
	m->kv_used = kv_used;
	m->kv_cap = kv_cap;
	pthread_mutex_unlock(&m->mu);
}

static void metrics_write_hist(FILE *f, const char *name, const char *help,
			       const struct metrics_hist *h)
{
	fprintf(f, "# HELP moefleet_%s %s\n# TYPE moefleet_%s histogram\n", name, help, name);
	uint64_t cum = 0;
	for (int i = 0; i < h->n; i++) {
		cum += h->count[i];
		fprintf(f, "moefleet_%s_bucket{le=\"%g\"} %llu\n", name, h->le[i],
			(unsigned long long)cum);
	}
	fprintf(f, "moefleet_%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)h->total);
	fprintf(f, "moefleet_%s_sum %.9g\nmoefleet_%s_count %llu\n", name, h->sum, name,
		(unsigned long long)h->total);
}

int metrics_write(metrics *m, FILE *f)
{
	pthread_mutex_lock(&m->mu);
	fputs("# HELP moefleet_requests_total HTTP requests by endpoint and status.\n"
	      "# TYPE moefleet_requests_total counter\n",
	      f);
	for (int i = 0; i < m->n_req; i++)
		fprintf(f, "moefleet_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n",
			m->req[i].endpoint, m->req[i].status, (unsigned long long)m->req[i].count);
	fprintf(f,
		"# HELP moefleet_prompt_tokens_total Prompt tokens processed.\n"
		"# TYPE moefleet_prompt_tokens_total counter\nmoefleet_prompt_tokens_total %llu\n"
		"# HELP moefleet_completion_tokens_total Tokens generated.\n"
		"# TYPE moefleet_completion_tokens_total counter\n"
		"moefleet_completion_tokens_total %llu\n"
		"# HELP moefleet_client_disconnects_total Requests cancelled because the client "
		"went away.\n"
		"# TYPE moefleet_client_disconnects_total counter\n"
		"moefleet_client_disconnects_total %llu\n"
		"# HELP moefleet_forward_steps_total Forward steps run.\n"
		"# TYPE moefleet_forward_steps_total counter\nmoefleet_forward_steps_total %llu\n",
		(unsigned long long)m->prompt_tokens, (unsigned long long)m->completion_tokens,
		(unsigned long long)m->disconnects, (unsigned long long)m->steps);
	metrics_write_hist(f, "time_to_first_token_seconds",
			   "Time from request arrival to its first generated token.", &m->ttft);
	metrics_write_hist(f, "inter_token_latency_seconds",
			   "Time between consecutive generated tokens of a request.", &m->itl);
	metrics_write_hist(f, "batch_tokens", "Tokens per forward step.", &m->batch);
	fprintf(
	    f,
	    "# HELP moefleet_queue_length Requests waiting for a sequence slot.\n"
	    "# TYPE moefleet_queue_length gauge\nmoefleet_queue_length %d\n"
	    "# HELP moefleet_requests_active Requests holding a sequence slot.\n"
	    "# TYPE moefleet_requests_active gauge\nmoefleet_requests_active %d\n"
	    "# HELP moefleet_kv_slots_total Sequence slots of the KV cache.\n"
	    "# TYPE moefleet_kv_slots_total gauge\nmoefleet_kv_slots_total %d\n"
	    "# HELP moefleet_kv_positions_used KV cache positions in use.\n"
	    "# TYPE moefleet_kv_positions_used gauge\nmoefleet_kv_positions_used %lld\n"
	    "# HELP moefleet_kv_positions_capacity KV cache positions in all slots.\n"
	    "# TYPE moefleet_kv_positions_capacity gauge\nmoefleet_kv_positions_capacity %lld\n",
	    m->queued, m->active, m->n_slots, (long long)m->kv_used, (long long)m->kv_cap);
	pthread_mutex_unlock(&m->mu);
	return ferror(f) ? ERR_IO : 0;
}

int metrics_write_kv_hosts(FILE *f, int n, const int64_t *used, const int64_t *total)
{
	if (n <= 0)
		return 0;
	fputs("# HELP moefleet_kv_host_pages_used KV pages (of every layer) a KV host keeps for "
	      "the server's running requests.\n# TYPE moefleet_kv_host_pages_used gauge\n",
	      f);
	for (int h = 0; h < n; h++)
		fprintf(f, "moefleet_kv_host_pages_used{host=\"%d\"} %lld\n", h,
			(long long)used[h]);
	fputs("# HELP moefleet_kv_host_pages_free KV pages a KV host has room for beyond those.\n"
	      "# TYPE moefleet_kv_host_pages_free gauge\n",
	      f);
	for (int h = 0; h < n; h++)
		fprintf(f, "moefleet_kv_host_pages_free{host=\"%d\"} %lld\n", h,
			(long long)(total[h] > used[h] ? total[h] - used[h] : 0));
	return ferror(f) ? ERR_IO : 0;
}
