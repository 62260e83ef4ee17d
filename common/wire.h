/* wire: the coordinator <-> worker messages (proto/moefleet.proto) as plain C
 * structs, and their encoding.
 *
 * This is the only module that includes the generated protobuf-c code.  A
 * message on the wire is one Envelope (version + one body) plus, for Batch,
 * Result and WeightChunk, a separate raw frame with the bulk bytes; the raw
 * frame never goes through protobuf.
 *
 * wire_decode() refuses, with ERR_PROTO and a logged reason naming the peer:
 * envelopes larger than WIRE_MAX_HEADER, undecodable bytes, another protocol
 * version, a missing body, and bodies whose fields are out of range (counts
 * above the caps below, ids/weights arrays whose length is not n_rows x k,
 * unknown dtypes, layers or experts beyond the spec's caps).  Checking a raw
 * frame's size against its header is wire_check_frame()'s job.  Decoded
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

struct wire_stats {
	uint64_t rows, items, bytes_in, bytes_out;
	double compute_seconds, idle_seconds;
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
const char *wire_kind_name(enum wire_kind k);

#endif
