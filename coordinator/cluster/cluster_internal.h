/* cluster_internal: what the parts of the cluster backend share -- the
 * cluster's state, its workers and the batches of the job in flight, and the
 * functions one part calls in another.  Only coordinator/cluster/ includes it;
 * the module's contract is cluster.h. */
#ifndef MOEFLEET_CLUSTER_INTERNAL_H
#define MOEFLEET_CLUSTER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "cluster.h"
#include "../placement/placement.h"
#include "../../common/moe.h"
#include "../../common/shardfile.h"
#include "../../common/wire.h"

enum {
	CLUSTER_CHUNK = 4 << 20,	/* bytes of streamed weights per message at start-up */
	CLUSTER_LIVE_MIN = 64 << 10,	/* bytes streamed per forward step while */
	CLUSTER_LIVE_START = 384 << 10, /* serving (all workers together), adapted */
	CLUSTER_LIVE_MAX = 24 << 20,	/* to the measured cost (cluster_adapt_budget) */
	CLUSTER_LIVE_SAMPLES = 4,	/* loading steps between two budget changes */
	CLUSTER_LIVE_STEPS = 64,	/* a re-placement loads within about this many steps */
	CLUSTER_FIT_MAX = 1 << 16,	/* batches per worker kept for the calibration */
};

/* Streaming may make the median loading step this much slower than the
 * median quiet step; a single loading step slower than CLUSTER_LIVE_GUARD x
 * the quiet median halves the budget at once. */
#define CLUSTER_LIVE_SLACK 0.15
#define CLUSTER_LIVE_GUARD 2.0

struct cluster_peer {
	int peer;		 /* transport peer index */
	struct wire_hello hello; /* without its held list, which is in `held` */
	uint8_t *held;		 /* [n_layer][n_expert] the experts its shard file holds; NULL: a
				    full model file, or none */
	int ready;
	int lost;
	int serving;	   /* holds the experts of the placement in force: may get Batches */
	int fresh;	   /* rejoined: holds nothing yet, whatever the placement says */
	int next_ok;	   /* answered Ready for the placement being loaded */
	double last_probe; /* when it was last probed during a step */
	struct cluster_worker_stats st;
	/* live streaming of the next epoch's new experts: queue and cursor */
	uint32_t *sq_layer, *sq_expert;
	uint32_t sq_n, sq_at;
	int sq_tensor;
	uint64_t sq_off;
	/* compute seconds at the start of the epoch in force */
	double epoch_compute0;
	int releasing;			/* a Release is not answered yet */
	int stats_asked;		/* a Stats is not answered yet */
	uint64_t load_done, load_total; /* its last Progress at start-up */
	/* each answered batch's wall time (sent to answered) minus the compute
	 * time the worker reported, for the simulator's calibration (the first
	 * CLUSTER_FIT_MAX batches) */
	float *fit_lat;
	size_t n_fit;
};

/* One Batch of the job in flight: the rows one worker computes, or (worker
 * -1) items whose experts have no serving holder yet.  A batch whose worker
 * is lost before it answered becomes FAILED and its items are dispatched
 * again to other holders (cluster_collect). */
enum cluster_batch_state { CLUSTER_BATCH_PENDING, CLUSTER_BATCH_DONE, CLUSTER_BATCH_FAILED };

struct cluster_batch {
	int worker;
	uint64_t step; /* the Batch's step number, unique per Batch */
	enum cluster_batch_state state;
	int n_rows;
	int32_t *rows; /* job rows */
	int32_t *ids;  /* n_rows x k, -1 = not in this batch */
	float *wts;
	uint8_t *act; /* activation frame */
	size_t rows_cap, k_cap, act_cap;
	int items;
	double sent;
};

/* The attention of one layer on KV hosts, summed over its steps: the
 * coordinator's seconds on the rows' own pages, merging, sending the
 * AttnBatches and waiting for the AttnResults. */
struct cluster_kv_layer {
	uint64_t steps, rows;
	double own, merge, send, wait;
};

/* One layer's traffic with one KV host: AttnBatches and the messages and
 * bytes both ways while its attention ran (probes and their answers
 * included), the compute seconds the host reported, and the KvPages shipped. */
struct cluster_kv_link {
	uint64_t batches, msgs_out, msgs_in, bytes_out, bytes_in, pages, page_bytes;
	double compute;
};

struct cluster {
	transport *t;
	struct cluster_config cfg;
	struct moe_spec spec;
	pool *pool;
	struct cluster_peer *w;
	int n;
	int started; /* start-up done: a Hello now is a (re)joining worker */
	placement plan;
	uint64_t step;
	/* the job in flight */
	struct cluster_batch *batches;
	int n_batches, cap_batches;
	int *disp;		       /* [n] batch of each worker in the dispatch being built */
	struct balance_counts *counts; /* decayed routed rows per (layer, expert) */
	/* live re-placement */
	const struct balance_policy *policy;
	uint64_t fwd_step, last_plan_step;
	int last_layer;
	placement next; /* planned, waiting for Ready from every live worker */
	int next_active;
	uint64_t next_epoch; /* epoch number of next */
	uint64_t epoch_seq;  /* last epoch number handed out */
	uint64_t epoch;	     /* of the placement in force */
	uint64_t rebalances;
	uint64_t moved_bytes;
	/* failover */
	int repair_due;	  /* a worker was lost: re-create its replicas */
	int rebuild_due;  /* a worker (re)joined: give it a share */
	double repair_t0; /* when the repair plan in flight was sent (0: none) */
	uint64_t n_lost, n_rejoined, n_failover_steps, resent_items, n_repairs;
	double worst_stall; /* seconds, of a step that re-sent items */
	uint32_t unheld;    /* experts without a live holder after the last repair plan */
	uint64_t expert_bytes[MOE_MAX_LAYERS];
	struct placement_worker *pw; /* [n] as given to placement_build */
	double *finish;	 /* [n] predicted finish of each worker in the job being split */
	double *speed;	 /* [n] relative speed from Hello */
	uint8_t *visits; /* [n] workers the current row already visits */
	double t0;	 /* when it was submitted */
	uint8_t *hdr;
	size_t hdr_cap;
	uint32_t layer_types[MOE_MAX_LAYERS][3];
	/* step timing: wall time of every forward step, and whether a
	 * re-placement was being loaded during it */
	double step_t0;
	double recent_ms[15]; /* the last steps without a re-placement loading */
	int32_t recent_tokens[15];
	int n_recent;
	size_t live_budget;		      /* streamed bytes per forward step, all workers */
	uint64_t step_streamed;		      /* bytes streamed during the current step */
	double load_ms[CLUSTER_LIVE_SAMPLES]; /* loading steps since the budget changed */
	int n_load;
	size_t live_floor;  /* budget that loads the re-placement in CLUSTER_LIVE_STEPS */
	int last_moe;	    /* the last MoE layer: streamed chunks follow its results */
	double step_expert; /* seconds of the current step spent submitting to collecting */
	int step_rows;	    /* tokens of the current step */
	double *step_expert_ms;
	int32_t *step_tokens;
	double *step_ms;
	uint8_t *step_moving;
	uint64_t *step_epoch; /* the placement in force during the step */
	size_t n_steps, steps_cap;
	uint64_t epoch_step0; /* fwd_step at the start of the epoch in force */
	struct cluster_epoch_stats *epochs;
	size_t n_epochs;
	/* KV hosts (kvhost.c): host h is worker kv_w[h], h < kv_hosts */
	int kv_hosts;
	int kv_w[ATTN_MAX_HOSTS];
	int kv_lost;			   /* a host was lost since cluster_kv_hosts() */
	uint64_t kv_asked[ATTN_MAX_HOSTS]; /* step of the AttnBatch in flight to each, 0: none */
	double kv_sent[ATTN_MAX_HOSTS];
	float *kv_part[ATTN_MAX_HOSTS]; /* each host's last AttnResult / IdxResult frame */
	size_t kv_part_cap[ATTN_MAX_HOSTS];
	int kv_rows, kv_heads, kv_dv;	  /* of the layer in flight */
	int kv_idx;			  /* the layer in flight is an indexer's (IdxBatch) */
	size_t kv_scores[ATTN_MAX_HOSTS]; /* then the scores each host owes */
	uint8_t *kv_buf;		  /* a KvPage's or IdxBatch's frame */
	size_t kv_buf_cap;
	/* --stats of the KV hosts per layer (NULL until cluster_kv_hosts()):
	 * kv_layer[l], and kv_link[l * ATTN_MAX_HOSTS + h] of host h */
	struct cluster_kv_layer *kv_layer;
	struct cluster_kv_link *kv_link;
	char model_id[SHARDFILE_ID_LEN]; /* shardfile_model_id() of cfg->g */
	uint8_t *held_none;		 /* [n_layer][n_expert] zeros */
};

/* cluster.c */
double cluster_now(void);
/* 1 when worker i offers memory for experts; 0 for a KV-only worker
 * (moefleet-worker --kv-only), which holds none and gets no Batches. */
int cluster_holds_experts(const cluster *c, int i);
int cluster_send(cluster *c, int i, const struct wire_msg *m, const void *data, size_t n);
int cluster_streams(const cluster *c, int i, int l, int e);
void cluster_held_sets(cluster *c);
int cluster_send_shutdown(cluster *c, int peer, const char *why, int rejoin);
int cluster_recv(cluster *c, int timeout_ms, struct wire_msg *m, int *peer, int *who,
		 const uint8_t **data, size_t *n);
const uint8_t *cluster_tensor_bytes(cluster *c, int l, int e, int t, uint32_t *type, uint64_t *n);

/* membership.c */
int cluster_take_hello(const cluster *c, const struct wire_hello *h, uint8_t **held, char *why,
		       size_t cap);
void cluster_drop(cluster *c, int i, const char *why);
void cluster_on_stranger(cluster *c, int peer, const struct wire_msg *m);
void cluster_plan_repair(cluster *c, int rebuild);

/* epoch.c */
void cluster_on_ready(cluster *c, int who, const struct wire_ready *r);
int cluster_next_ready(const cluster *c);
void cluster_pump(cluster *c);
int cluster_send_next(cluster *c, placement *next);
void cluster_epoch_now(const cluster *c, struct cluster_epoch_stats *out);
void cluster_switch(cluster *c);
void cluster_between_steps(cluster *c, int layer);

/* dispatch.c */
int cluster_grow(cluster *c, size_t more);

/* report.c */
int cluster_cmp_double(const void *a, const void *b);

#endif
