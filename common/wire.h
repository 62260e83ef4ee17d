/* wire: the coordinator <-> worker messages (proto/moefleet.proto) as plain C
 * structs, and their encoding.
 *
 * This is the only module that includes the generated protobuf-c code.  A
 * message on the wire is one Envelope (version + one body) plus, for Batch,
 * Result, WeightChunk, KvPage, AttnBatch, AttnResult, IdxBatch and IdxResult,
 * a separate raw frame
 * with the bulk bytes; the raw frame never goes through protobuf.
 *
 * wire_decode() refuses, with ERR_PROTO and a logged reason naming the peer:
 * envelopes larger than WIRE_MAX_HEADER, undecodable bytes, another protocol
 * version, a missing body, and bodies whose fields are out of range (counts
 * above the caps below, ids/weights arrays whose length is not n_rows x k,
 * unknown dtypes, layers or experts beyond the spec's caps, attention shapes
 * beyond the WIRE_ATTN_ caps).  Checking a raw frame's size against its
 * header (the wire_*_frame_bytes() below) is the receiver's job.  Decoded
 * messages own their arrays: free them with wire_msg_free(). */
#ifndef MOEFLEET_WIRE_H
#define MOEFLEET_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"

#define WIRE_VERSION	 1
#define WIRE_MAX_HEADER	 (16u << 20) /* bytes of one envelope */
#define WIRE_MAX_ROWS	 65536	     /* rows of one Batch */
#define WIRE_MAX_K	 64	     /* experts per row */
#define WIRE_MAX_EXPERTS 65536	     /* experts per layer */
#define WIRE_MAX_NAME	 256

/* Attention messages (KvPage, AttnBatch, AttnResult) */
#define WIRE_ATTN_MAX_HEAD_DIM 1024	  /* head_dim_k, head_dim_v (ATTN_MAX_HEAD_DIM) */
#define WIRE_ATTN_MAX_HEADS    1024	  /* n_head */
#define WIRE_ATTN_MAX_WIDTH    (1u << 16) /* k_width, v_width of a page */
#define WIRE_ATTN_MAX_PAGE     (1u << 20) /* positions of a page */
#define WIRE_ATTN_PAGE_ALIGN   64	  /* a page is a multiple of this (ATTN_TILE_KV) */
#define WIRE_ATTN_MAX_SHARDS   64	  /* chains (a power of two) */

enum wire_kind {
	WIRE_NONE = 0,
	WIRE_HELLO,
	WIRE_ASSIGN,
	WIRE_WEIGHT_CHUNK,
	WIRE_READY,
	WIRE_BATCH,
	WIRE_RESULT,
	WIRE_HEARTBEAT,
	WIRE_STATS,
	WIRE_SHUTDOWN,
	WIRE_ERROR,
	WIRE_RELEASE,
	WIRE_PROGRESS,
	WIRE_KV_PAGE,
	WIRE_ATTN_BATCH,
	WIRE_ATTN_RESULT,
	WIRE_IDX_BATCH,
	WIRE_IDX_RESULT,
	WIRE_KV_FREE,
};

struct wire_hello {
	uint32_t cores;
	uint64_t memory_bytes;
	double expert_rows_per_sec;
	int has_model;
	char model_sha[80];
	char name[WIRE_MAX_NAME];
	/* has_model with shard_file: the file is a per-node shard file holding
	 * only these (layer, expert) pairs (layers < MOE_MAX_LAYERS, experts <
	 * WIRE_MAX_EXPERTS; the coordinator checks them against its model);
	 * model_sha names the model it was made from.  The arrays are owned by
	 * the message (wire_msg_free) */
	int shard_file;
	uint32_t n_held;
	uint32_t *held_layer;
	uint32_t *held_expert;
	uint64_t kv_bytes; /* memory offered for KV pages; 0: it holds none */
	int kv_shared;	   /* kv_bytes is memory_bytes: pages take what experts leave */
};

struct wire_assign {
	uint32_t worker_id;
	struct moe_spec spec;
	uint64_t placement_epoch;
	int stream;
	/* the assigned experts as (layer, expert) pairs */
	uint32_t n_pairs;
	uint32_t *pair_layer;
	uint32_t *pair_expert;
};

struct wire_weight_chunk {
	uint32_t layer, expert, tensor, type;
	uint64_t offset, total;
};

struct wire_ready {
	uint64_t placement_epoch;
	uint32_t n_experts; /* held now */
	uint64_t bytes;	    /* held now */
	int released;	    /* answers a Release (else an Assign) */
};

/* Experts a worker no longer needs once placement_epoch is in force, as
 * (layer, expert) pairs (layers < MOE_MAX_LAYERS, experts <
 * WIRE_MAX_EXPERTS; the worker checks them against its spec). */
struct wire_release {
	uint64_t placement_epoch;
	uint32_t n_pairs;
	uint32_t *pair_layer;
	uint32_t *pair_expert;
};

/* Loading progress (done <= total, checked on decode). */
struct wire_progress {
	uint64_t placement_epoch;
	uint64_t done, total;
};

struct wire_batch {
	uint64_t step;
	uint32_t layer;
	uint32_t n_rows;
	uint32_t k;
	uint32_t dtype; /* KERN_F32, KERN_BF16 or KERN_Q8_0 */
	int32_t *ids;	/* n_rows x k, -1 = not this worker's */
	float *weights; /* n_rows x k */
};

struct wire_result {
	uint64_t step;
	uint32_t layer;
	uint32_t n_items;
	double compute_seconds;
};

/* What a KvPage holds. */
enum wire_kv_kind {
	WIRE_KV_ATTN = 0, /* attention keys and values */
	WIRE_KV_IDX = 1,  /* DeepSeek-V4 lightning-indexer keys (IdxBatch) */
};

/* Coordinator -> KV host: one complete page of n_pos positions of (layer, seq),
 * positions [page * n_pos, (page + 1) * n_pos).  Raw frame: keys
 * [n_pos][k_width] F16, then, when v_width > 0, values [n_pos][v_width] F16;
 * v_width 0: the values are the keys' first values (deepseek2's MLA) and are
 * not sent.  kind WIRE_KV_IDX: n_pos indexer entries (one per 4 positions) of
 * k_width values, v_width 0.  Decoded: kind known, layer < MOE_MAX_LAYERS, seq
 * <= INT32_MAX, n_pos a positive multiple of WIRE_ATTN_PAGE_ALIGN (of
 * WIRE_IDX_PAGE_ALIGN for indexer pages) up to WIRE_ATTN_MAX_PAGE, the page's
 * positions (entries) below 2^31, k_width in [1, WIRE_ATTN_MAX_WIDTH], v_width
 * up to WIRE_ATTN_MAX_WIDTH (0 for indexer pages). */
struct wire_kv_page {
	uint32_t layer, seq, page, n_pos, k_width, v_width;
	uint32_t kind; /* enum wire_kv_kind */
};

/* Coordinator -> KV host, no answer: drop every page of sequence seq (all
 * layers, both kinds).  Decoded: seq <= INT32_MAX. */
struct wire_kv_free {
	uint32_t seq;
};

/* An indexer page holds the entries of a page of positions: a multiple of
 * WIRE_ATTN_PAGE_ALIGN / 4. */
#define WIRE_IDX_PAGE_ALIGN (WIRE_ATTN_PAGE_ALIGN / 4)

/* Coordinator -> KV host: one layer's query rows.  The host answers one
 * AttnResult holding, per row and head, the merge of its chains [v0, v1)
 * (attn_host_forward).  Raw frame: q F32 [n_rows][n_head][head_dim_k].  seq
 * and pos: n_rows each, owned by the message.  Decoded: layer <
 * MOE_MAX_LAYERS, n_rows <= WIRE_MAX_ROWS, n_head in [1, WIRE_ATTN_MAX_HEADS]
 * a multiple of n_head_kv, head sizes in [1, WIRE_ATTN_MAX_HEAD_DIM], a
 * finite scale, page as KvPage's n_pos, n_shard a power of two up to
 * WIRE_ATTN_MAX_SHARDS, v0 < v1 <= n_shard, seq and pos >= 0. */
struct wire_attn_batch {
	uint64_t step;
	uint32_t layer, n_rows;
	uint32_t n_head, n_head_kv, head_dim_k, head_dim_v;
	float scale;
	uint32_t page, n_shard, v0, v1;
	int32_t *seq, *pos;
};

/* KV host -> coordinator.  Raw frame: F32 [n_rows][n_head][2 + head_dim_v]
 * (M, S, acc).  Decoded: layer, n_rows, n_head, head_dim_v within the caps
 * of AttnBatch, compute_seconds finite and >= 0. */
struct wire_attn_result {
	uint64_t step;
	uint32_t layer, n_rows, n_head, head_dim_v;
	double compute_seconds;
};

/* Coordinator -> KV host: one DeepSeek-V4 CSA layer's indexer queries
 * (indexer.h, indexer_host_score).  The host answers one IdxResult holding,
 * per row in row order, the scores of the entries of its indexer pages
 * (`page` entries each) i < (pos + 1) / 4 / page whose chain i mod n_shard
 * lies in [v0, v1), page by page in page order.  Raw frame: F32 queries
 * [n_rows][n_head][dim], then F32 head weights [n_rows][n_head].  seq and
 * pos: n_rows each, owned by the message.  Decoded: layer < MOE_MAX_LAYERS,
 * n_rows <= WIRE_MAX_ROWS, n_head in [1, WIRE_ATTN_MAX_HEADS], dim in [1,
 * WIRE_ATTN_MAX_HEAD_DIM], page a positive multiple of WIRE_IDX_PAGE_ALIGN up
 * to WIRE_ATTN_MAX_PAGE, n_shard a power of two up to WIRE_ATTN_MAX_SHARDS,
 * v0 < v1 <= n_shard, seq and pos >= 0. */
struct wire_idx_batch {
	uint64_t step;
	uint32_t layer, n_rows, n_head, dim;
	uint32_t page, n_shard, v0, v1;
	int32_t *seq, *pos;
};

/* KV host -> coordinator.  Raw frame: F32 [n_scores] as IdxBatch says.
 * Decoded: layer and n_rows within the caps of IdxBatch, compute_seconds
 * finite and >= 0 (n_scores is checked against the batch by the receiver). */
struct wire_idx_result {
	uint64_t step;
	uint32_t layer, n_rows, n_scores;
	double compute_seconds;
};

struct wire_stats {
	uint64_t rows, items, bytes_in, bytes_out;
	double compute_seconds, idle_seconds; /* compute: of expert Batches */
	/* as a KV host: AttnBatches answered, their rows and compute time; the
	 * KV pages held and their bytes (page tables included) */
	uint64_t attn_batches, attn_rows;
	double attn_seconds;
	uint64_t kv_pages, kv_bytes;
};

struct wire_msg {
	enum wire_kind kind;
	union {
		struct wire_hello hello;
		struct wire_assign assign;
		struct wire_weight_chunk chunk;
		struct wire_ready ready;
		struct wire_release release;
		struct wire_batch batch;
		struct wire_result result;
		uint64_t heartbeat_nonce;
		struct wire_stats stats;
		struct wire_progress progress;
		struct wire_kv_page kv_page;
		struct wire_kv_free kv_free;
		struct wire_attn_batch attn_batch;
		struct wire_attn_result attn_result;
		struct wire_idx_batch idx_batch;
		struct wire_idx_result idx_result;
		char text[WIRE_MAX_NAME]; /* shutdown reason, error message */
	} u;
	/* Shutdown: the coordinator does not know this worker (dropped as lost,
	 * or restarted): clear everything and say Hello again */
	int shutdown_rejoin;
};

/* Encodes m into *buf (grown with realloc as needed; *cap is its size) and
 * sets *len.  Returns 0 or ERR_NOMEM / ERR_RANGE (a field beyond the caps). */
int wire_encode(const struct wire_msg *m, uint8_t **buf, size_t *cap, size_t *len);
/* Decodes and validates one envelope; `peer` names the sender in errors. */
int wire_decode(const uint8_t *buf, size_t len, const char *peer, struct wire_msg *out);
void wire_msg_free(struct wire_msg *m);

/* A routing-trace record (proto TraceRecord).  Arrays are borrowed when
 * encoding; decoded records own them (wire_trace_free). */
struct wire_trace {
	uint64_t step;
	uint32_t layer, n_rows, k;
	int32_t *ids;	    /* n_rows x k */
	float *weights;	    /* n_rows x k */
	int32_t *positions; /* n_rows or NULL */
	/* model table and placement: first record only (n_layer 0 otherwise) */
	uint32_t n_layer, n_expert, n_replica, n_embd;
	uint64_t *expert_bytes; /* n_layer */
	int32_t *holders;	/* n_layer x n_expert x n_replica */
	uint64_t placement_epoch;
};
int wire_encode_trace(const struct wire_trace *t, uint8_t **buf, size_t *cap, size_t *len);
/* Validates counts (rows, k, ids >= -1, table sizes) like wire_decode. */
int wire_decode_trace(const uint8_t *buf, size_t len, struct wire_trace *out);
void wire_trace_free(struct wire_trace *t);

/* Bytes the raw frame following a Batch / Result must have for n_embd. */
size_t wire_batch_frame_bytes(const struct wire_batch *b, uint32_t n_embd);
size_t wire_result_frame_bytes(const struct wire_result *r, uint32_t n_embd);
/* Bytes the raw frame following a KvPage / AttnBatch / AttnResult / IdxBatch /
 * IdxResult must have;
 * SIZE_MAX when the fields' product does not fit a size_t. */
size_t wire_kv_page_frame_bytes(const struct wire_kv_page *p);
size_t wire_attn_batch_frame_bytes(const struct wire_attn_batch *b);
size_t wire_attn_result_frame_bytes(const struct wire_attn_result *r);
size_t wire_idx_batch_frame_bytes(const struct wire_idx_batch *b);
size_t wire_idx_result_frame_bytes(const struct wire_idx_result *r);
const char *wire_kind_name(enum wire_kind k);

#endif
