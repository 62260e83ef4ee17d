/* gguf_write: writes a GGUF v3 file (the layout described in gguf.h) in one
 * streaming pass, atomically.
 *
 * Use, in this order:
 *   gguf_writer_new(&w)
 *   metadata: gguf_writer_copy_kv() / gguf_writer_copy_all_kv() (an entry of an
 *     open file, byte for byte; copy_all leaves out the source's split.* keys,
 *     which describe its files, not the model) and gguf_writer_set_*() (typed
 *     values).  One shard of a split model is a file like any other with
 *     gguf_writer_set_split(); the first shard carries the model's keys.  Entries
 *     keep the order they were first added in; setting a key that is already
 *     there replaces its value in place.
 *   gguf_writer_add_tensor() for every tensor, in file order (the shapes and
 *     types fix each tensor's size and offset).
 *   gguf_writer_open(w, path): creates PATH.tmp and writes the header.
 *   gguf_writer_write(w, data, n), as often as needed: the tensors' data in the
 *     order they were added, cut into pieces of any size; the padding between
 *     tensors is written by the writer.
 *   gguf_writer_commit(w): checks that every byte was written, flushes, fsyncs
 *     and renames PATH.tmp to PATH.
 *   gguf_writer_destroy(&w): removes PATH.tmp unless commit succeeded.
 * So a failure at any step leaves no PATH.tmp and does not touch an existing PATH.
 *
 * Tensor data are aligned to general.alignment when that key is set (a u32
 * power of two), else to 32, as gguf_open() and llama.cpp expect.  Every
 * fallible function returns 0 or a negative enum err code and logs one line
 * naming the file, key or tensor (ERR_CONFIG for a misuse such as a duplicate
 * tensor, writing too much or a call out of order; ERR_IO for a failed write). */
#ifndef MOEFLEET_GGUF_WRITE_H
#define MOEFLEET_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

typedef struct gguf_writer gguf_writer;

int gguf_writer_new(gguf_writer **out);
void gguf_writer_destroy(gguf_writer **w);

/* Metadata. */
int gguf_writer_copy_kv(gguf_writer *w, const gguf *src, uint64_t i);
int gguf_writer_copy_all_kv(gguf_writer *w, const gguf *src);
int gguf_writer_set_u16(gguf_writer *w, const char *key, uint16_t v);
int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v);
int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v);
int gguf_writer_set_f32(gguf_writer *w, const char *key, float v);
int gguf_writer_set_bool(gguf_writer *w, const char *key, int v);
int gguf_writer_set_str(gguf_writer *w, const char *key, const char *v);
/* A numeric array (elem_type not STRING or ARRAY): count packed little-endian elements. */
int gguf_writer_set_arr(gguf_writer *w, const char *key, enum gguf_type elem_type, const void *data,
			uint64_t count);
int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t count);
/* The keys of shard no (from 0) of count of a split model holding n_tensors
 * tensors in all, typed as gguf-split writes them (u16, u16, i32). */
int gguf_writer_set_split(gguf_writer *w, uint16_t no, uint16_t count, int32_t n_tensors);
uint64_t gguf_writer_n_kv(const gguf_writer *w);

/* Tensors: ne[0..n_dims) with ne[0] the row length; type a kern.h type id. */
int gguf_writer_add_tensor(gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
			   const uint64_t *ne);
uint64_t gguf_writer_n_tensors(const gguf_writer *w);

/* Output. */
int gguf_writer_open(gguf_writer *w, const char *path);
int gguf_writer_write(gguf_writer *w, const void *data, size_t n);
int gguf_writer_commit(gguf_writer *w);

#endif
