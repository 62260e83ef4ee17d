/* trace: recording routing decisions, for placement research.
 *
 * A trace file is a stream of TraceRecord messages (proto/moefleet.proto),
 * each preceded by its byte count as a little-endian u32: one record per MoE
 * layer per forward step (step, layer, rows, chosen expert ids and weights).
 * The first record also carries the model's expert table (experts per layer,
 * bytes of one expert per layer, n_embd) and the placement in force.
 *
 * trace_backend_new() wraps any expert backend: every job is recorded, then
 * handed on unchanged, so tracing never changes results.  The reader
 * validates every record (sizes, ids) and reports a truncated file as an
 * error.  Writers and readers belong to one thread. */
#ifndef MOEFLEET_TRACE_H
#define MOEFLEET_TRACE_H

#include "../../common/gguf.h"
#include "../../common/moe.h"
#include "../../common/wire.h"
#include "../model/experts.h"
#include "../model/model.h"
#include "placement.h"

typedef struct trace_writer trace_writer;
typedef struct trace_reader trace_reader;

int trace_writer_open(const char *path, trace_writer **out);
int trace_write(trace_writer *w, const struct wire_trace *rec);
/* Flushes and closes; returns the first write error, if any. */
int trace_writer_close(trace_writer **w);

int trace_reader_open(const char *path, trace_reader **out);
/* 0 and a record (free it with wire_trace_free), 1 at the end, or an error. */
int trace_read(trace_reader *r, struct wire_trace *rec);
void trace_reader_close(trace_reader **r);

/* Bytes of one routed expert of every layer (0 for dense layers). */
void trace_expert_bytes(const gguf *g, const struct moe_spec *spec, uint64_t *bytes);

/* Wraps inner (taking ownership of inner and w); p, if not NULL, is the
 * placement recorded in the first record and must outlive the backend. */
int trace_backend_new(expert_backend *inner, trace_writer *w, const gguf *g,
		      const struct moe_spec *spec, const placement *p, expert_backend **out);

/* A whole trace read back: records, steps, routed rows (all layers), token
 * positions seen, the total routed load per (layer, expert) (not decayed)
 * and the last placement recorded (the backend records it again whenever it
 * changes; `placements` counts them). */
struct trace_summary {
	uint32_t n_layer, n_expert, n_embd, n_replica;
	uint64_t records, steps, rows, placements, n_positions;
	int32_t pos_min, pos_max; /* valid if n_positions > 0 */
	int n_worker;		  /* 1 + the largest holder seen */
	uint8_t layer_moe[MOE_MAX_LAYERS];
	double *load;	  /* [n_layer][n_expert] */
	int32_t *holders; /* [n_layer][n_expert][n_replica] or NULL */
};
int trace_summarize(const char *path, struct trace_summary *out);
void trace_summary_free(struct trace_summary *s);

/* Wraps m's expert backend in a recorder writing to w (taking ownership of
 * w) and records each token's position (model_set_batch_observer). */
int trace_attach(model *m, trace_writer *w, const placement *p);

#endif
