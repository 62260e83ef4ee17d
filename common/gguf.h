/* gguf: a validating reader for GGUF v3 files over mmap.
 *
 * Layout of a GGUF v3 file (all little-endian):
 *   "GGUF" | u32 version (3) | u64 n_tensors | u64 n_kv
 *   n_kv x ( string key | u32 value type | value )
 *   n_tensors x ( string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset )
 *   padding to general.alignment (default 32)
 *   tensor data; each tensor at data_start + offset, offset a multiple of the alignment
 * A string is u64 length + bytes (no terminator).  An array value is u32 element
 * type + u64 count + elements.
 *
 * gguf_open() checks everything before returning: the header, every key and
 * value (types, lengths, nesting, array counts against the file size), every
 * tensor (dimension count, extents, overflow, known type, row length a multiple
 * of the type's block, data inside the file and aligned).  On failure it logs
 * one line "FILE: problem" and returns ERR_FORMAT or ERR_IO.  After that the
 * accessors cannot read outside the mapping.
 *
 * Split models (llama.cpp's gguf-split): PREFIX-%05d-of-%05d.gguf, numbered
 * from 1, each shard a complete GGUF file of its own (header, tensor infos,
 * aligned data; offsets relative to its own data section).  All model keys
 * are in the first shard; every shard has split.no (u16, from 0), split.count
 * (u16) and split.tensors.count (i32, the total), and a tensor lies in one
 * shard.  gguf_open() of the first shard finds the others by name, opens,
 * maps and checks each one (split.no equal to its position, split.count and
 * split.tensors.count equal to the first's when present, no tensor name
 * twice, the total equal to split.tensors.count) and presents one model: the
 * keys of the first shard and one tensor table whose data point into the
 * mapping of the shard holding them.  Opening another shard fails
 * (ERR_CONFIG) with the first shard's name; a missing shard fails (ERR_IO)
 * naming its path.  gguf_open_memory() accepts a split model of one shard
 * only.  A file without split keys (or split.count 1) is a plain model.
 *
 * Getters are strict about types, like llama.cpp: asking for a u32 key that is
 * stored as i32 is an error.  They return ERR_FORMAT (and log) on a type
 * mismatch and ERR_RANGE (without logging) when the key is absent, so callers
 * can treat optional keys with a default. */
#ifndef MOEFLEET_GGUF_H
#define MOEFLEET_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum gguf_type {
	GGUF_TYPE_U8 = 0,
	GGUF_TYPE_I8 = 1,
	GGUF_TYPE_U16 = 2,
	GGUF_TYPE_I16 = 3,
	GGUF_TYPE_U32 = 4,
	GGUF_TYPE_I32 = 5,
	GGUF_TYPE_F32 = 6,
	GGUF_TYPE_BOOL = 7,
	GGUF_TYPE_STRING = 8,
	GGUF_TYPE_ARRAY = 9,
	GGUF_TYPE_U64 = 10,
	GGUF_TYPE_I64 = 11,
	GGUF_TYPE_F64 = 12,
	GGUF_TYPE_COUNT
};

#define GGUF_MAX_DIMS 4

/* Bytes of one value of a fixed-size metadata type; 0 for strings, arrays
 * and unknown types. */
uint64_t gguf_type_size(enum gguf_type t);

/* A tensor as found in the file.  ne[0] is the row length; unused ne are 1.
 * type is a GGML type id (see kernels/kern.h). */
typedef struct gguf_tensor {
	const char *name;
	uint32_t type;
	uint32_t n_dims;
	uint64_t ne[GGUF_MAX_DIMS];
	uint64_t n_bytes;
	const void *data;
	uint32_t shard; /* the shard holding the data (0 for a plain file) */
} gguf_tensor;

/* A string inside the mapping: not NUL-terminated. */
typedef struct gguf_str {
	const char *ptr;
	uint64_t len;
} gguf_str;

typedef struct gguf gguf;

int gguf_open(const char *path, gguf **out);
/* The same checks on a GGUF image already in memory (size bytes at data,
 * which must stay valid and unchanged until gguf_destroy()); name stands for
 * the path in messages and gguf_path(). */
int gguf_open_memory(const char *name, const void *data, size_t size, gguf **out);
void gguf_destroy(gguf **g);

const char *gguf_path(const gguf *g);	/* the path opened: the first shard */
uint64_t gguf_file_size(const gguf *g); /* bytes, summed over the shards */

/* The files of a split model (1 and the file itself for a plain one):
 * shard i's path, size in bytes and number of tensors; NULL / 0 when i is
 * out of range. */
uint32_t gguf_n_shards(const gguf *g);
const char *gguf_shard_path(const gguf *g, uint32_t i);
uint64_t gguf_shard_size(const gguf *g, uint32_t i);
uint64_t gguf_shard_n_tensors(const gguf *g, uint32_t i);

/* Metadata. */
uint64_t gguf_n_kv(const gguf *g);
const char *gguf_kv_key(const gguf *g, uint64_t i);
enum gguf_type gguf_kv_type(const gguf *g, uint64_t i);
int64_t gguf_find_kv(const gguf *g, const char *key); /* index or -1 */

/* The encoded bytes of metadata entry i exactly as stored in the file: the key
 * (u64 length + bytes), the u32 value type and the value (for arrays: element
 * type, count and elements).  *p points into the mapping.  ERR_RANGE if i is
 * out of range.  Lets a writer copy an entry without decoding it. */
int gguf_kv_raw(const gguf *g, uint64_t i, const void **p, size_t *n);

int gguf_get_u16(const gguf *g, const char *key, uint16_t *out);
int gguf_get_u32(const gguf *g, const char *key, uint32_t *out);
int gguf_get_i32(const gguf *g, const char *key, int32_t *out);
int gguf_get_f32(const gguf *g, const char *key, float *out);
int gguf_get_bool(const gguf *g, const char *key, int *out);
int gguf_get_str(const gguf *g, const char *key, gguf_str *out);
/* Copies a string value into buf (NUL-terminated); ERR_RANGE if absent or too long. */
int gguf_get_cstr(const gguf *g, const char *key, char *buf, size_t cap);

/* Arrays.  For numeric element types *data points at count packed elements
 * (little-endian, possibly unaligned: read with memcpy).  For string arrays use
 * gguf_get_arr_str(). */
int gguf_get_arr(const gguf *g, const char *key, enum gguf_type *elem_type, uint64_t *count,
		 const void **data);
int gguf_get_arr_str(const gguf *g, const char *key, uint64_t i, gguf_str *out);
/* Reads a numeric array of u32/i32 elements into dst (n entries exactly). */
int gguf_get_arr_u32(const gguf *g, const char *key, uint32_t *dst, uint64_t n);

/* Tensors. */
uint64_t gguf_n_tensors(const gguf *g);
const gguf_tensor *gguf_tensor_at(const gguf *g, uint64_t i);
const gguf_tensor *gguf_find_tensor(const gguf *g, const char *name); /* NULL if absent */

/* Looks up a tensor and checks its shape: ne[0..n_dims) must equal the given
 * extents (trailing ones may be omitted in the file).  Logs "FILE: tensor NAME:
 * problem" and returns ERR_FORMAT when missing or misshapen. */
int gguf_expect_tensor(const gguf *g, const char *name, uint32_t n_dims, const uint64_t *ne,
		       const gguf_tensor **out);

#endif
