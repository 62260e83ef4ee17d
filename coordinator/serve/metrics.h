/* metrics: the serving counters, gauges and histograms of `moefleet serve`,
 * written in the Prometheus text format (version 0.0.4).
 *
 * Every function is thread-safe (one mutex).  Names (all prefixed
 * moefleet_): requests_total{endpoint,status}, prompt_tokens_total,
 * completion_tokens_total, time_to_first_token_seconds and
 * inter_token_latency_seconds (histograms), batch_tokens (histogram of tokens
 * per forward step), forward_steps_total, queue_length, requests_active,
 * kv_positions_used / kv_positions_capacity, kv_slots_used / kv_slots_total,
 * client_disconnects_total; with KV hosts kv_host_pages_used{host} and
 * kv_host_pages_free{host} (pages of every layer; metrics_write_kv_hosts). */
#ifndef MOEFLEET_METRICS_H
#define MOEFLEET_METRICS_H

#include <stdint.h>
#include <stdio.h>

typedef struct metrics metrics;

int metrics_new(metrics **out);
void metrics_destroy(metrics **m);

void metrics_count_request(metrics *m, const char *endpoint, int status);
void metrics_count_tokens(metrics *m, int prompt, int completion);
void metrics_count_disconnect(metrics *m);
void metrics_observe_ttft(metrics *m, double seconds);
void metrics_observe_itl(metrics *m, double seconds);
void metrics_observe_batch(metrics *m, int n_tokens);
void metrics_set_load(metrics *m, int queued, int active, int n_slots, int64_t kv_used,
		      int64_t kv_capacity);

/* ERR_IO if writing to f fails. */
int metrics_write(metrics *m, FILE *f);
/* The KV pages the n hosts hold (used[h]) and could hold (total[h]). */
int metrics_write_kv_hosts(FILE *f, int n, const int64_t *used, const int64_t *total);

#endif
