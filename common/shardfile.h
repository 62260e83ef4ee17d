/* shardfile: per-node shard files -- a GGUF holding only some routed experts.
 *
 * `moefleet split-experts` writes, per worker, a GGUF with all the model's
 * metadata and only the routed-expert tensors of the experts placed on that
 * worker: for every routed layer L with h > 0 held experts,
 *   blk.L.ffn_{gate,up,down}_exps.weight   ne = [n_in, n_out, h]
 *   blk.L.ffn_{gate,up,down}_exps.bias     ne = [n_out, h]   (when the model has them)
 * holding the held experts' slices of the model's tensors, in ascending
 * expert order (the same bytes, the same types).  No other tensor is copied.
 * Metadata added (keys of the `moefleet.shard.` family):
 *   moefleet.shard.held      u32 array: layer * n_expert + expert of every
 *                            held expert, strictly ascending
 *   moefleet.shard.n_layer   u32  the model's layers
 *   moefleet.shard.n_expert  u32  the model's experts per routed layer
 *   moefleet.shard.index     u32  this file's worker, 1..count
 *   moefleet.shard.count     u32  the workers the files were made for
 *   moefleet.shard.model     string  shardfile_model_id() of the source model
 * So the slot of (L, e) in L's tensors is the number of held experts of L
 * below e.
 *
 * shardfile_read() recognises such a file (ERR_RANGE, not logged, for a
 * model without moefleet.shard.held) and checks everything it says against
 * itself: the sizes, the ids (ascending, in range), the indices, and every
 * expert tensor's last extent against the layer's held count; a bad file
 * gives ERR_FORMAT with one logged line naming it.
 *
 * shardfile_model_id() names a model independently of how its files are cut
 * (one file or a gguf-split set): a hash of every tensor's name, type and
 * shape and of the first bytes of every router tensor (ffn_gate_inp), which
 * the coordinator reads anyway (no routed-expert page is touched). */
#ifndef MOEFLEET_SHARDFILE_H
#define MOEFLEET_SHARDFILE_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

#define SHARDFILE_KEY_HELD     "moefleet.shard.held"
#define SHARDFILE_KEY_N_LAYER  "moefleet.shard.n_layer"
#define SHARDFILE_KEY_N_EXPERT "moefleet.shard.n_expert"
#define SHARDFILE_KEY_INDEX    "moefleet.shard.index"
#define SHARDFILE_KEY_COUNT    "moefleet.shard.count"
#define SHARDFILE_KEY_MODEL    "moefleet.shard.model"

#define SHARDFILE_ID_LEN 32 /* shardfile_model_id() text, with its NUL */

struct shardfile {
	int n_layer, n_expert;
	uint32_t index, count;
	char model[SHARDFILE_ID_LEN];
	uint32_t n_held;      /* in all */
	int32_t *slot;	      /* [n_layer * n_expert]: position in the layer's tensors, -1 */
	uint32_t *layer_held; /* [n_layer]: experts held per layer */
};

int shardfile_read(const gguf *g, struct shardfile *out);
void shardfile_free(struct shardfile *s);

/* The slot of (layer, expert) in the file, or -1 if it does not hold it. */
int shardfile_slot(const struct shardfile *s, int layer, int expert);

/* The name of routed-expert tensor t of a layer: t = 0, 1, 2 the gate, up and
 * down weights, 3, 4, 5 their biases. */
void shardfile_tensor_name(int layer, int t, char *buf, size_t cap);

/* "moefleet1:" and 16 hex digits into id (SHARDFILE_ID_LEN bytes). */
void shardfile_model_id(const gguf *g, char *id);

#endif
