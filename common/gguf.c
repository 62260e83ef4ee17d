#define _GNU_SOURCE
#include "gguf.h"
#include "err.h"
#include "log.h"
#include "../kernels/kern.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Limits on what a file may claim, so that a corrupt count fails cleanly
 * instead of driving a huge allocation. */
#define GGUF_MAX_KV	 (1u << 20)
#define GGUF_MAX_TENSORS (1u << 20)
#define GGUF_MAX_NAME	 4096
#define GGUF_MAX_ALIGN	 (1u << 16)
/* The fewest bytes an entry can take: a key (length + 1 byte), a value type
 * and a u8 value; a tensor name (length + 1 byte), n_dims, one extent, a type
 * and an offset. */
#define GGUF_MIN_KV_BYTES     14u
#define GGUF_MIN_TENSOR_BYTES 33u

struct gguf_kv {
	gguf_str key;
	char *key_c; /* NUL-terminated copy */
	enum gguf_type type;
	enum gguf_type elem_type; /* arrays */
	uint64_t count;		  /* arrays */
	const uint8_t
	    *value; /* start of the value (after type, and after elem type + count for arrays) */
	const uint8_t **strs; /* string arrays: start of each element's u64 length */
};

struct gguf {
	char *path;
	int mapped; /* map is ours (gguf_open), else the caller's (gguf_open_memory) */
	const uint8_t *map;
	uint64_t size;
	uint64_t n_kv;
	struct gguf_kv *kv;
	uint64_t n_tensors; /* all shards' tensors for a split model */
	gguf_tensor *tensors;
	uint64_t n_names; /* tensors of this file, whose names tensor_names owns */
	char **tensor_names;
	uint64_t alignment;
	uint64_t data_start;
	/* this file's split.* keys: -1 or 0 when absent */
	int64_t split_no;
	uint32_t split_count;
	int64_t split_total;
	/* the whole model: shard 0 is this file, the others are opened and
	 * checked as files of their own (their tensors are in tensors above) */
	uint32_t n_shards;
	struct gguf **shards; /* n_shards entries, [0] unused; NULL for a plain file */
	uint64_t total_size;
};

/* --------------------------------------------------------------- cursor */

struct cur {
	const gguf *g;
	uint64_t off;
};

static int cur_need(struct cur *c, uint64_t n, const char *what)
{
	if (n > c->g->size || c->off > c->g->size - n) {
		log_error("%s: truncated file: %s at offset %llu needs %llu bytes, file has %llu",
			  c->g->path, what, (unsigned long long)c->off, (unsigned long long)n,
			  (unsigned long long)c->g->size);
		return ERR_FORMAT;
	}
	return 0;
}

static int cur_u32(struct cur *c, uint32_t *v, const char *what)
{
	int rc = cur_need(c, 4, what);
	if (rc)
		return rc;
	memcpy(v, c->g->map + c->off, 4);
	c->off += 4;
	return 0;
}

static int cur_u64(struct cur *c, uint64_t *v, const char *what)
{
	int rc = cur_need(c, 8, what);
	if (rc)
		return rc;
	memcpy(v, c->g->map + c->off, 8);
	c->off += 8;
	return 0;
}

static int cur_str(struct cur *c, gguf_str *s, const char *what)
{
	uint64_t len;
	int rc = cur_u64(c, &len, what);
	if (rc)
		return rc;
	rc = cur_need(c, len, what);
	if (rc)
		return rc;
	s->ptr = (const char *)c->g->map + c->off;
	s->len = len;
	c->off += len;
	return 0;
}

uint64_t gguf_type_size(enum gguf_type t)
{
	switch (t) {
	case GGUF_TYPE_U8:
	case GGUF_TYPE_I8:
	case GGUF_TYPE_BOOL: return 1;
	case GGUF_TYPE_U16:
	case GGUF_TYPE_I16: return 2;
	case GGUF_TYPE_U32:
	case GGUF_TYPE_I32:
	case GGUF_TYPE_F32: return 4;
	case GGUF_TYPE_U64:
	case GGUF_TYPE_I64:
	case GGUF_TYPE_F64: return 8;
	default: return 0;
	}
}

static const char *gguf_type_name(enum gguf_type t)
{
	static const char *names[] = {"u8",   "i8",	"u16",	 "i16", "u32", "i32", "f32",
				      "bool", "string", "array", "u64", "i64", "f64"};
	return (unsigned)t < GGUF_TYPE_COUNT ? names[t] : "?";
}

/* Skips over one value of type t, checking it lies inside the file. */
static int cur_skip_value(struct cur *c, enum gguf_type t, const char *key)
{
	if (t == GGUF_TYPE_STRING) {
		gguf_str s;
		return cur_str(c, &s, key);
	}
	uint64_t sz = gguf_type_size(t);
	if (!sz) {
		log_error("%s: key %s: invalid value type %u", c->g->path, key, (unsigned)t);
		return ERR_FORMAT;
	}
	int rc = cur_need(c, sz, key);
	if (rc)
		return rc;
	if (t == GGUF_TYPE_BOOL && c->g->map[c->off] > 1) {
		log_error("%s: key %s: bool value %u is neither 0 nor 1", c->g->path, key,
			  c->g->map[c->off]);
		return ERR_FORMAT;
	}
	c->off += sz;
	return 0;
}

static int gguf_read_kv(gguf *g, struct cur *c, struct gguf_kv *kv)
{
	int rc = cur_str(c, &kv->key, "key");
	if (rc)
		return rc;
	if (kv->key.len == 0 || kv->key.len > GGUF_MAX_NAME) {
		log_error("%s: key at offset %llu has invalid length %llu", g->path,
			  (unsigned long long)c->off, (unsigned long long)kv->key.len);
		return ERR_FORMAT;
	}
	kv->key_c = strndup(kv->key.ptr, kv->key.len);
	if (!kv->key_c)
		return ERR_NOMEM;
	if (strlen(kv->key_c) != kv->key.len) {
		log_error("%s: key at offset %llu contains a NUL byte", g->path,
			  (unsigned long long)c->off);
		return ERR_FORMAT;
	}
	uint32_t t;
	rc = cur_u32(c, &t, kv->key_c);
	if (rc)
		return rc;
	if (t >= GGUF_TYPE_COUNT) {
		log_error("%s: key %s: invalid value type %u", g->path, kv->key_c, t);
		return ERR_FORMAT;
	}
	kv->type = (enum gguf_type)t;
	if (kv->type != GGUF_TYPE_ARRAY) {
		kv->value = g->map + c->off;
		return cur_skip_value(c, kv->type, kv->key_c);
	}
	uint32_t et;
	rc = cur_u32(c, &et, kv->key_c);
	if (rc)
		return rc;
	if (et >= GGUF_TYPE_COUNT || et == GGUF_TYPE_ARRAY) {
		log_error("%s: key %s: invalid array element type %u", g->path, kv->key_c, et);
		return ERR_FORMAT;
	}
	kv->elem_type = (enum gguf_type)et;
	rc = cur_u64(c, &kv->count, kv->key_c);
	if (rc)
		return rc;
	kv->value = g->map + c->off;
	if (kv->elem_type != GGUF_TYPE_STRING) {
		uint64_t sz = gguf_type_size(kv->elem_type);
		if (kv->count > (g->size - c->off) / sz) {
			log_error(
			    "%s: key %s: array of %llu %s elements runs past the end of the file",
			    g->path, kv->key_c, (unsigned long long)kv->count,
			    gguf_type_name(kv->elem_type));
			return ERR_FORMAT;
		}
		if (kv->elem_type == GGUF_TYPE_BOOL) {
			for (uint64_t i = 0; i < kv->count; i++) {
				if (kv->value[i] > 1) {
					log_error("%s: key %s: element %llu is not a bool", g->path,
						  kv->key_c, (unsigned long long)i);
					return ERR_FORMAT;
				}
			}
		}
		c->off += kv->count * sz;
		return 0;
	}
	/* each string needs at least its 8-byte length */
	if (kv->count > (g->size - c->off) / 8) {
		log_error("%s: key %s: array of %llu strings runs past the end of the file",
			  g->path, kv->key_c, (unsigned long long)kv->count);
		return ERR_FORMAT;
	}
	kv->strs = malloc((kv->count ? kv->count : 1) * sizeof(*kv->strs));
	if (!kv->strs)
		return ERR_NOMEM;
	for (uint64_t i = 0; i < kv->count; i++) {
		kv->strs[i] = g->map + c->off;
		gguf_str s;
		rc = cur_str(c, &s, kv->key_c);
		if (rc)
			return rc;
	}
	return 0;
}

static int gguf_read_tensor(gguf *g, struct cur *c, uint64_t idx, gguf_tensor *t)
{
	gguf_str name;
	int rc = cur_str(c, &name, "tensor name");
	if (rc)
		return rc;
	if (name.len == 0 || name.len > GGUF_MAX_NAME) {
		log_error("%s: tensor %llu has a name of invalid length %llu", g->path,
			  (unsigned long long)idx, (unsigned long long)name.len);
		return ERR_FORMAT;
	}
	g->tensor_names[idx] = strndup(name.ptr, name.len);
	if (!g->tensor_names[idx])
		return ERR_NOMEM;
	t->name = g->tensor_names[idx];
	rc = cur_u32(c, &t->n_dims, t->name);
	if (rc)
		return rc;
	if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS) {
		log_error("%s: tensor %s: %u dimensions (1 to %d allowed)", g->path, t->name,
			  t->n_dims, GGUF_MAX_DIMS);
		return ERR_FORMAT;
	}
	uint64_t n_el = 1;
	for (int d = 0; d < GGUF_MAX_DIMS; d++)
		t->ne[d] = 1;
	for (uint32_t d = 0; d < t->n_dims; d++) {
		rc = cur_u64(c, &t->ne[d], t->name);
		if (rc)
			return rc;
		if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || n_el > (1ull << 42) / t->ne[d]) {
			log_error("%s: tensor %s: dimension %u has invalid extent %llu", g->path,
				  t->name, d, (unsigned long long)t->ne[d]);
			return ERR_FORMAT;
		}
		n_el *= t->ne[d];
	}
	rc = cur_u32(c, &t->type, t->name);
	if (rc)
		return rc;
	if (!kern_type_known(t->type)) {
		const char *tn = kern_type_name(t->type);
		if (strcmp(tn, "?") != 0)
			log_error("%s: tensor '%s' has type %s (%u), which moefleet does not read",
				  g->path, t->name, tn, t->type);
		else
			log_error("%s: tensor '%s' has type %u, which is not a GGML type", g->path,
				  t->name, t->type);
		return ERR_FORMAT;
	}
	if (t->ne[0] % (uint64_t)kern_type_block(t->type) != 0) {
		log_error("%s: tensor '%s': row length %llu is not a multiple of the %s block (%d)",
			  g->path, t->name, (unsigned long long)t->ne[0], kern_type_name(t->type),
			  kern_type_block(t->type));
		return ERR_FORMAT;
	}
	t->n_bytes = kern_row_bytes(t->type, (int64_t)t->ne[0]) * (n_el / t->ne[0]);
	uint64_t off;
	rc = cur_u64(c, &off, t->name);
	if (rc)
		return rc;
	t->data = (const void *)(uintptr_t)off; /* resolved after the header */
	return 0;
}

static int gguf_parse(gguf *g);
static int gguf_read_split(gguf *g);

static int gguf_fail(const char *path, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	log_error("%s: %s", path, msg);
	return ERR_FORMAT;
}

static int gguf_cmp_name(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Fails when two of the n names (the first at *first, the others every
 * stride bytes after it) are equal; sorts a copy, so it takes n log n. */
static int gguf_check_unique(const gguf *g, const char *what, uint64_t n, const char *const *first,
			     size_t stride)
{
	if (n < 2)
		return 0;
	const char **v = malloc(n * sizeof(*v));
	if (!v)
		return ERR_NOMEM;
	for (uint64_t i = 0; i < n; i++)
		v[i] = *(const char *const *)((const char *)first + i * stride);
	qsort(v, n, sizeof(*v), gguf_cmp_name);
	int rc = 0;
	for (uint64_t i = 1; i < n && !rc; i++) {
		if (strcmp(v[i - 1], v[i]) == 0)
			rc = gguf_fail(g->path, "duplicate %s %s", what, v[i]);
	}
	free(v);
	return rc;
}

/* Maps the file at path and checks it as one GGUF file: a plain model or a
 * single shard (its split.* keys are read but no other shard is opened).
 * The descriptor is closed once mapped: a model of many shards holds no
 * descriptor per shard. */
static int gguf_open_file(const char *path, gguf **out)
{
	int rc = 0;
	int fd = -1;
	*out = NULL;
	gguf *g = calloc(1, sizeof(*g));
	if (!g)
		return ERR_NOMEM;
	g->path = strdup(path);
	if (!g->path) {
		rc = ERR_NOMEM;
		goto out;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		log_error("%s: cannot open: %s", path, strerror(errno));
		rc = ERR_IO;
		goto out;
	}
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		log_error("%s: not a regular file", path);
		rc = ERR_IO;
		goto out;
	}
	g->size = (uint64_t)st.st_size;
	if (g->size < 24) {
		rc = gguf_fail(path, "truncated file: %llu bytes is smaller than a GGUF header",
			       (unsigned long long)g->size);
		goto out;
	}
	void *m = mmap(NULL, g->size, PROT_READ, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		log_error("%s: cannot mmap: %s", path, strerror(errno));
		rc = ERR_IO;
		goto out;
	}
	g->map = m;
	g->mapped = 1;
	rc = gguf_parse(g);
out:
	if (fd >= 0)
		close(fd);
	if (rc)
		gguf_destroy(&g);
	*out = g;
	return rc;
}

/* ------------------------------------------------------------ split files */

/* When path ends in the name of shard no (0-based) of count, "-%05u-of-%05u.gguf"
 * with no + 1, the length of the prefix before it; else 0. */
static size_t gguf_split_prefix_len(const char *path, uint32_t no, uint32_t count)
{
	char suffix[48];
	int n = snprintf(suffix, sizeof(suffix), "-%05u-of-%05u.gguf", no + 1, count);
	size_t len = strlen(path);
	if (n <= 0 || len <= (size_t)n || strcmp(path + len - (size_t)n, suffix) != 0)
		return 0;
	return len - (size_t)n;
}

/* The path of shard no (0-based) of count: the first prefix_len bytes of
 * path, then the numbered suffix.  NULL when out of memory. */
static char *gguf_split_path(const char *path, size_t prefix_len, uint32_t no, uint32_t count)
{
	size_t n = prefix_len + 48;
	char *p = malloc(n);
	if (p)
		snprintf(p, n, "%.*s-%05u-of-%05u.gguf", (int)prefix_len, path, no + 1, count);
	return p;
}

/* Opens shard no of the split model whose first shard is first, and checks
 * that its split.* keys agree with first's. */
static int gguf_open_shard(const gguf *first, const char *path, uint32_t no, gguf **out)
{
	const uint32_t count = first->split_count;
	struct stat st;
	*out = NULL;
	if (stat(path, &st) != 0 && errno == ENOENT) {
		log_error("%s: shard %u of %u is missing: %s", first->path, no + 1, count, path);
		return ERR_IO;
	}
	gguf *s = NULL;
	int rc = gguf_open_file(path, &s);
	if (rc)
		return rc;
	if (s->split_no < 0)
		rc = gguf_fail(path, "no split.no key, so it is not shard %u of %u of %s", no + 1,
			       count, first->path);
	else if (s->split_no != no)
		rc = gguf_fail(path,
			       "split.no is %lld, but this name is shard %u of %u (split.no %u)",
			       (long long)s->split_no, no + 1, count, no);
	else if (s->split_count && s->split_count != count)
		rc = gguf_fail(path, "split.count is %u, but the first shard %s says %u",
			       s->split_count, first->path, count);
	else if (s->split_total >= 0 && s->split_total != first->split_total)
		rc = gguf_fail(
		    path, "split.tensors.count is %lld, but the first shard %s says %lld",
		    (long long)s->split_total, first->path, (long long)first->split_total);
	if (rc)
		gguf_destroy(&s);
	*out = s;
	return rc;
}

static int gguf_cmp_tensor_name(const void *a, const void *b)
{
	return strcmp((*(const gguf_tensor *const *)a)->name,
		      (*(const gguf_tensor *const *)b)->name);
}

/* Fails when two tensors of the merged table have one name, naming the
 * shards that hold them. */
static int gguf_check_unique_across(const gguf *g)
{
	const gguf_tensor **v = malloc((g->n_tensors ? g->n_tensors : 1) * sizeof(*v));
	if (!v)
		return ERR_NOMEM;
	for (uint64_t i = 0; i < g->n_tensors; i++)
		v[i] = &g->tensors[i];
	qsort(v, g->n_tensors, sizeof(*v), gguf_cmp_tensor_name);
	int rc = 0;
	for (uint64_t i = 1; i < g->n_tensors && !rc; i++) {
		if (strcmp(v[i - 1]->name, v[i]->name) == 0)
			rc = gguf_fail(g->path, "duplicate tensor %s: in %s and in %s", v[i]->name,
				       gguf_shard_path(g, v[i - 1]->shard),
				       gguf_shard_path(g, v[i]->shard));
	}
	free(v);
	return rc;
}

/* g has just been parsed as one file.  A plain model (no split.count, or
 * 1) is complete; the first shard of several finds the others by name
 * (only when opened from a file), opens and checks each, and takes all
 * their tensors into its table.  Any other shard is refused with the name
 * of the first. */
static int gguf_open_shards(gguf *g)
{
	const char *path = g->path;
	const uint32_t count = g->split_count;
	g->n_shards = 1;
	g->total_size = g->size;
	if (count <= 1) {
		if (g->split_total >= 0 && (uint64_t)g->split_total != g->n_tensors)
			return gguf_fail(path,
					 "split.tensors.count is %lld, but the file holds %llu "
					 "tensors",
					 (long long)g->split_total,
					 (unsigned long long)g->n_tensors);
		return 0;
	}
	if (g->split_no < 0)
		return gguf_fail(path, "split.count is %u but there is no split.no key", count);
	if (g->split_no != 0) {
		size_t pl = gguf_split_prefix_len(path, (uint32_t)g->split_no, count);
		char *first = pl ? gguf_split_path(path, pl, 0, count) : NULL;
		log_error("%s: this is shard %lld of %u of a split model; open the first shard%s%s",
			  path, (long long)g->split_no + 1, count, first ? ", " : " (split.no 0)",
			  first ? first : "");
		free(first);
		return ERR_CONFIG;
	}
	if (g->split_total < 0)
		return gguf_fail(path, "split.count is %u but there is no split.tensors.count key",
				 count);
	if (!g->mapped)
		return gguf_fail(path,
				 "first shard of %u: the others can only be found next to a "
				 "file, not from memory",
				 count);
	size_t pl = gguf_split_prefix_len(path, 0, count);
	if (!pl)
		return gguf_fail(path,
				 "first shard of %u, but the name does not end in "
				 "-00001-of-%05u.gguf, so the other shards cannot be found",
				 count, count);
	g->shards = calloc(count, sizeof(*g->shards));
	if (!g->shards)
		return ERR_NOMEM;
	g->n_shards = count;
	uint64_t n_total = g->n_tensors;
	for (uint32_t i = 1; i < count; i++) {
		char *sp = gguf_split_path(path, pl, i, count);
		if (!sp)
			return ERR_NOMEM;
		int rc = gguf_open_shard(g, sp, i, &g->shards[i]);
		free(sp);
		if (rc)
			return rc;
		n_total += g->shards[i]->n_tensors;
		g->total_size += g->shards[i]->size;
	}
	gguf_tensor *all = malloc((n_total ? n_total : 1) * sizeof(*all));
	if (!all)
		return ERR_NOMEM;
	memcpy(all, g->tensors, g->n_tensors * sizeof(*all));
	uint64_t n = g->n_tensors;
	for (uint32_t i = 1; i < count; i++) {
		const gguf *s = g->shards[i];
		for (uint64_t j = 0; j < s->n_tensors; j++) {
			all[n] = s->tensors[j];
			all[n++].shard = i;
		}
	}
	free(g->tensors);
	g->tensors = all;
	g->n_tensors = n_total;
	int rc = gguf_check_unique_across(g);
	if (rc)
		return rc;
	if (n_total != (uint64_t)g->split_total)
		return gguf_fail(path,
				 "split.tensors.count is %lld, but the %u shards hold %llu tensors",
				 (long long)g->split_total, count, (unsigned long long)n_total);
	return 0;
}

int gguf_open(const char *path, gguf **out)
{
	int rc = gguf_open_file(path, out);
	if (rc)
		return rc;
	rc = gguf_open_shards(*out);
	if (rc)
		gguf_destroy(out);
	return rc;
}

int gguf_open_memory(const char *name, const void *data, size_t size, gguf **out)
{
	int rc = 0;
	*out = NULL;
	gguf *g = calloc(1, sizeof(*g));
	if (!g)
		return ERR_NOMEM;
	g->path = strdup(name);
	if (!g->path) {
		rc = ERR_NOMEM;
		goto out;
	}
	g->size = size;
	if (g->size < 24) {
		rc = gguf_fail(name, "truncated file: %llu bytes is smaller than a GGUF header",
			       (unsigned long long)g->size);
		goto out;
	}
	g->map = data;
	rc = gguf_parse(g);
	if (!rc)
		rc = gguf_open_shards(g);
out:
	if (rc)
		gguf_destroy(&g);
	*out = g;
	return rc;
}

/* Reads this file's split.* keys, with the types gguf-split writes (u16
 * split.no and split.count, i32 split.tensors.count), and checks that they
 * agree with each other and with the file. */
static int gguf_read_split(gguf *g)
{
	uint16_t v;
	int32_t total;
	int rc;
	g->split_no = -1;
	g->split_total = -1;
	if ((rc = gguf_get_u16(g, "split.count", &v)) != ERR_RANGE) {
		if (rc)
			return rc;
		if (v == 0)
			return gguf_fail(g->path, "split.count is 0");
		g->split_count = v;
	}
	if ((rc = gguf_get_u16(g, "split.no", &v)) != ERR_RANGE) {
		if (rc)
			return rc;
		g->split_no = v;
	}
	if ((rc = gguf_get_i32(g, "split.tensors.count", &total)) != ERR_RANGE) {
		if (rc)
			return rc;
		if ((uint64_t)(int64_t)total < g->n_tensors || total < 0)
			return gguf_fail(g->path,
					 "split.tensors.count is %d, fewer than the %llu tensors "
					 "of this file",
					 (int)total, (unsigned long long)g->n_tensors);
		g->split_total = total;
	}
	if (g->split_count && g->split_no >= (int64_t)g->split_count)
		return gguf_fail(g->path,
				 "split.no is %lld, but split.count is %u (shards are "
				 "numbered from 0)",
				 (long long)g->split_no, g->split_count);
	return 0;
}

/* Checks the whole file at g->map (g->size bytes, at least a header) and
 * fills in g. */
static int gguf_parse(gguf *g)
{
	const char *path = g->path;
	int rc = 0;
	struct cur c = {g, 0};
	if (memcmp(g->map, "GGUF", 4) != 0) {
		rc = gguf_fail(path, "not a GGUF file (bad magic)");
		goto out;
	}
	c.off = 4;
	uint32_t version;
	cur_u32(&c, &version, "version");
	if (version != 3) {
		rc = gguf_fail(path, "unsupported GGUF version %u (only 3 is supported)", version);
		goto out;
	}
	cur_u64(&c, &g->n_tensors, "tensor count");
	cur_u64(&c, &g->n_kv, "key count");
	/* every entry takes some bytes of the file, so the counts are bounded by
	 * its size before anything is allocated for them */
	if (g->n_kv > GGUF_MAX_KV || g->n_tensors > GGUF_MAX_TENSORS ||
	    g->n_kv * GGUF_MIN_KV_BYTES + g->n_tensors * GGUF_MIN_TENSOR_BYTES > g->size - c.off) {
		rc = gguf_fail(path, "implausible counts: %llu keys, %llu tensors in %llu bytes",
			       (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors,
			       (unsigned long long)g->size);
		goto out;
	}
	g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof(*g->kv));
	g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof(*g->tensors));
	g->tensor_names = calloc(g->n_tensors ? g->n_tensors : 1, sizeof(char *));
	if (!g->kv || !g->tensors || !g->tensor_names) {
		rc = ERR_NOMEM;
		goto out;
	}
	g->n_names = g->n_tensors;
	for (uint64_t i = 0; i < g->n_kv; i++) {
		rc = gguf_read_kv(g, &c, &g->kv[i]);
		if (rc)
			goto out;
	}
	rc = gguf_check_unique(g, "key", g->n_kv, (const char *const *)&g->kv[0].key_c,
			       sizeof(*g->kv));
	if (rc)
		goto out;
	g->alignment = 32;
	int64_t ai = gguf_find_kv(g, "general.alignment");
	if (ai >= 0) {
		uint32_t a;
		rc = gguf_get_u32(g, "general.alignment", &a);
		if (rc)
			goto out;
		if (a == 0 || (a & (a - 1)) != 0 || a > GGUF_MAX_ALIGN) {
			rc = gguf_fail(path, "key general.alignment: %u is not a power of two", a);
			goto out;
		}
		g->alignment = a;
	}
	for (uint64_t i = 0; i < g->n_tensors; i++) {
		rc = gguf_read_tensor(g, &c, i, &g->tensors[i]);
		if (rc)
			goto out;
	}
	g->data_start = (c.off + g->alignment - 1) / g->alignment * g->alignment;
	for (uint64_t i = 0; i < g->n_tensors; i++) {
		gguf_tensor *t = &g->tensors[i];
		uint64_t off = (uint64_t)(uintptr_t)t->data;
		if (off % g->alignment != 0) {
			rc = gguf_fail(path, "tensor %s: data offset %llu is not aligned to %llu",
				       t->name, (unsigned long long)off,
				       (unsigned long long)g->alignment);
			goto out;
		}
		if (g->data_start > g->size || off > g->size - g->data_start ||
		    t->n_bytes > g->size - g->data_start - off) {
			rc = gguf_fail(path,
				       "truncated file: tensor %s (%llu bytes at data offset %llu) "
				       "runs past the end of the file (%llu bytes)",
				       t->name, (unsigned long long)t->n_bytes,
				       (unsigned long long)off, (unsigned long long)g->size);
			goto out;
		}
		t->data = g->map + g->data_start + off;
	}
	/* duplicate tensor names make lookups ambiguous */
	rc = gguf_check_unique(g, "tensor", g->n_tensors, &g->tensors[0].name, sizeof(*g->tensors));
	if (rc)
		goto out;
	rc = gguf_read_split(g);
out:
	return rc;
}

void gguf_destroy(gguf **pg)
{
	gguf *g = *pg;
	if (!g)
		return;
	if (g->mapped)
		munmap((void *)g->map, g->size);
	if (g->shards) {
		for (uint32_t i = 1; i < g->n_shards; i++)
			gguf_destroy(&g->shards[i]);
		free(g->shards);
	}
	if (g->kv) {
		for (uint64_t i = 0; i < g->n_kv; i++) {
			free(g->kv[i].key_c);
			free(g->kv[i].strs);
		}
	}
	if (g->tensor_names)
		for (uint64_t i = 0; i < g->n_names; i++)
			free(g->tensor_names[i]);
	free(g->tensor_names);
	free(g->tensors);
	free(g->kv);
	free(g->path);
	free(g);
	*pg = NULL;
}

const char *gguf_path(const gguf *g)
{
	return g->path;
}
uint64_t gguf_file_size(const gguf *g)
{
	return g->total_size;
}

uint32_t gguf_n_shards(const gguf *g)
{
	return g->n_shards;
}

/* Shard i as a file of its own (shard 0 is g itself). */
static const gguf *gguf_shard(const gguf *g, uint32_t i)
{
	if (i >= g->n_shards)
		return NULL;
	return i == 0 ? g : g->shards[i];
}

const char *gguf_shard_path(const gguf *g, uint32_t i)
{
	const gguf *s = gguf_shard(g, i);
	return s ? s->path : NULL;
}

uint64_t gguf_shard_size(const gguf *g, uint32_t i)
{
	const gguf *s = gguf_shard(g, i);
	return s ? s->size : 0;
}

uint64_t gguf_shard_n_tensors(const gguf *g, uint32_t i)
{
	const gguf *s = gguf_shard(g, i);
	return s ? s->n_names : 0;
}
uint64_t gguf_n_kv(const gguf *g)
{
	return g->n_kv;
}
const char *gguf_kv_key(const gguf *g, uint64_t i)
{
	return i < g->n_kv ? g->kv[i].key_c : NULL;
}
enum gguf_type gguf_kv_type(const gguf *g, uint64_t i)
{
	return i < g->n_kv ? g->kv[i].type : GGUF_TYPE_COUNT;
}

int64_t gguf_find_kv(const gguf *g, const char *key)
{
	for (uint64_t i = 0; i < g->n_kv; i++)
		if (strcmp(g->kv[i].key_c, key) == 0)
			return (int64_t)i;
	return -1;
}

static int gguf_get_typed(const gguf *g, const char *key, enum gguf_type t,
			  const struct gguf_kv **out)
{
	int64_t i = gguf_find_kv(g, key);
	if (i < 0)
		return ERR_RANGE;
	if (g->kv[i].type != t) {
		log_error("%s: key %s has type %s, expected %s", g->path, key,
			  gguf_type_name(g->kv[i].type), gguf_type_name(t));
		return ERR_FORMAT;
	}
	*out = &g->kv[i];
	return 0;
}

#define GGUF_GETTER(fn, ctype, gtype)                                                              \
	int fn(const gguf *g, const char *key, ctype *out)                                         \
	{                                                                                          \
		const struct gguf_kv *kv;                                                          \
		int rc = gguf_get_typed(g, key, gtype, &kv);                                       \
		if (rc)                                                                            \
			return rc;                                                                 \
		memcpy(out, kv->value, sizeof(ctype));                                             \
		return 0;                                                                          \
	}
GGUF_GETTER(gguf_get_u16, uint16_t, GGUF_TYPE_U16)
GGUF_GETTER(gguf_get_u32, uint32_t, GGUF_TYPE_U32)
GGUF_GETTER(gguf_get_i32, int32_t, GGUF_TYPE_I32)
GGUF_GETTER(gguf_get_f32, float, GGUF_TYPE_F32)

int gguf_get_bool(const gguf *g, const char *key, int *out)
{
	const struct gguf_kv *kv;
	int rc = gguf_get_typed(g, key, GGUF_TYPE_BOOL, &kv);
	if (rc)
		return rc;
	*out = kv->value[0] != 0;
	return 0;
}

static void gguf_str_at(const uint8_t *p, gguf_str *out)
{
	memcpy(&out->len, p, 8);
	out->ptr = (const char *)p + 8;
}

int gguf_get_str(const gguf *g, const char *key, gguf_str *out)
{
	const struct gguf_kv *kv;
	int rc = gguf_get_typed(g, key, GGUF_TYPE_STRING, &kv);
	if (rc)
		return rc;
	gguf_str_at(kv->value, out);
	return 0;
}

int gguf_get_cstr(const gguf *g, const char *key, char *buf, size_t cap)
{
	gguf_str s;
	int rc = gguf_get_str(g, key, &s);
	if (rc)
		return rc;
	if (s.len >= cap) {
		log_error("%s: key %s: string of %llu bytes is too long (at most %zu)", g->path,
			  key, (unsigned long long)s.len, cap - 1);
		return ERR_FORMAT;
	}
	memcpy(buf, s.ptr, s.len);
	buf[s.len] = 0;
	return 0;
}

int gguf_get_arr(const gguf *g, const char *key, enum gguf_type *elem_type, uint64_t *count,
		 const void **data)
{
	const struct gguf_kv *kv;
	int rc = gguf_get_typed(g, key, GGUF_TYPE_ARRAY, &kv);
	if (rc)
		return rc;
	*elem_type = kv->elem_type;
	*count = kv->count;
	*data = kv->value;
	return 0;
}

int gguf_get_arr_str(const gguf *g, const char *key, uint64_t i, gguf_str *out)
{
	const struct gguf_kv *kv;
	int rc = gguf_get_typed(g, key, GGUF_TYPE_ARRAY, &kv);
	if (rc)
		return rc;
	if (kv->elem_type != GGUF_TYPE_STRING) {
		log_error("%s: key %s is an array of %s, expected strings", g->path, key,
			  gguf_type_name(kv->elem_type));
		return ERR_FORMAT;
	}
	if (i >= kv->count)
		return ERR_RANGE;
	gguf_str_at(kv->strs[i], out);
	return 0;
}

int gguf_get_arr_u32(const gguf *g, const char *key, uint32_t *dst, uint64_t n)
{
	enum gguf_type et;
	uint64_t count;
	const void *data;
	int rc = gguf_get_arr(g, key, &et, &count, &data);
	if (rc)
		return rc;
	if (et != GGUF_TYPE_U32 && et != GGUF_TYPE_I32) {
		log_error("%s: key %s is an array of %s, expected u32 or i32", g->path, key,
			  gguf_type_name(et));
		return ERR_FORMAT;
	}
	if (count != n) {
		log_error("%s: key %s has %llu elements, expected %llu", g->path, key,
			  (unsigned long long)count, (unsigned long long)n);
		return ERR_FORMAT;
	}
	memcpy(dst, data, n * 4);
	return 0;
}

uint64_t gguf_n_tensors(const gguf *g)
{
	return g->n_tensors;
}

const gguf_tensor *gguf_tensor_at(const gguf *g, uint64_t i)
{
	return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf *g, const char *name)
{
	for (uint64_t i = 0; i < g->n_tensors; i++)
		if (strcmp(g->tensors[i].name, name) == 0)
			return &g->tensors[i];
	return NULL;
}

int gguf_expect_tensor(const gguf *g, const char *name, uint32_t n_dims, const uint64_t *ne,
		       const gguf_tensor **out)
{
	const gguf_tensor *t = gguf_find_tensor(g, name);
	*out = NULL;
	if (!t) {
		log_error("%s: missing tensor %s", g->path, name);
		return ERR_FORMAT;
	}
	int ok = t->n_dims <= n_dims;
	for (uint32_t d = 0; d < GGUF_MAX_DIMS && ok; d++)
		ok = t->ne[d] == (d < n_dims ? ne[d] : 1);
	if (!ok) {
		char want[96], got[96];
		int wl = 0, gl = 0;
		for (uint32_t d = 0; d < n_dims; d++)
			wl += snprintf(want + wl, sizeof(want) - (size_t)wl, "%s%llu",
				       d ? " x " : "", (unsigned long long)ne[d]);
		for (uint32_t d = 0; d < t->n_dims; d++)
			gl += snprintf(got + gl, sizeof(got) - (size_t)gl, "%s%llu", d ? " x " : "",
				       (unsigned long long)t->ne[d]);
		log_error("%s: tensor %s has shape %s, expected %s", g->path, name, got, want);
		return ERR_FORMAT;
	}
	*out = t;
	return 0;
}

int gguf_kv_raw(const gguf *g, uint64_t i, const void **p, size_t *n)
{
	if (i >= g->n_kv)
		return ERR_RANGE;
	const struct gguf_kv *kv = &g->kv[i];
	const uint8_t *start = (const uint8_t *)kv->key.ptr - 8;
	const uint8_t *end;
	uint64_t len;
	if (kv->type == GGUF_TYPE_STRING) {
		memcpy(&len, kv->value, 8);
		end = kv->value + 8 + len;
	} else if (kv->type != GGUF_TYPE_ARRAY) {
		end = kv->value + gguf_type_size(kv->type);
	} else if (kv->elem_type != GGUF_TYPE_STRING) {
		end = kv->value + kv->count * gguf_type_size(kv->elem_type);
	} else if (kv->count == 0) {
		end = kv->value;
	} else {
		memcpy(&len, kv->strs[kv->count - 1], 8);
		end = kv->strs[kv->count - 1] + 8 + len;
	}
	*p = start;
	*n = (size_t)(end - start);
	return 0;
}
