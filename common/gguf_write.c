/* gguf_write: a streaming GGUF v3 writer (see gguf_write.h). */
#define _GNU_SOURCE
#include "gguf_write.h"
#include "err.h"
#include "log.h"
#include "../kernels/kern.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The reader's limits (gguf.c), so that whatever is written can be read back. */
#define GW_MAX_NAME	 4096
#define GW_MAX_ALIGN	 (1u << 16)
#define GW_DEFAULT_ALIGN 32
#define GW_IO_BUFFER	 (1u << 20)

struct gw_kv {
	char *key;
	uint8_t *bytes; /* key + type + value, as in the file */
	size_t n;
};

struct gw_tensor {
	char *name;
	uint32_t type;
	uint32_t n_dims;
	uint64_t ne[GGUF_MAX_DIMS];
	uint64_t n_bytes;
	uint64_t offset; /* from the start of the data section; set by open */
};

enum gw_state { GW_BUILDING, GW_OPEN, GW_COMMITTED, GW_FAILED };

struct gguf_writer {
	struct gw_kv *kv;
	uint64_t n_kv, cap_kv;
	struct gw_tensor *t;
	uint64_t n_t, cap_t;
	enum gw_state state;
	char *path, *tmp;
	FILE *f;
	char *iobuf;
	uint64_t alignment;
	uint64_t cur;	   /* tensor being written */
	uint64_t cur_done; /* its bytes written so far */
};

/* ------------------------------------------------------------ encoding */

struct gw_buf {
	uint8_t *p;
	size_t n, cap;
	int failed;
};

static void gw_put(struct gw_buf *b, const void *d, size_t n)
{
	if (b->failed)
		return;
	if (n > b->cap - b->n) {
		size_t cap = b->cap ? b->cap : 64;
		while (cap - b->n < n) {
			if (cap > SIZE_MAX / 2) {
				b->failed = 1;
				return;
			}
			cap *= 2;
		}
		uint8_t *p = realloc(b->p, cap);
		if (!p) {
			b->failed = 1;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->n, d, n);
	b->n += n;
}

static void gw_put_u32(struct gw_buf *b, uint32_t v)
{
	gw_put(b, &v, 4);
}
static void gw_put_u64(struct gw_buf *b, uint64_t v)
{
	gw_put(b, &v, 8);
}
static void gw_put_str(struct gw_buf *b, const char *s, size_t len)
{
	gw_put_u64(b, len);
	gw_put(b, s, len);
}

/* ------------------------------------------------------------ metadata */

int gguf_writer_new(gguf_writer **out)
{
	*out = calloc(1, sizeof(**out));
	return *out ? 0 : ERR_NOMEM;
}

void gguf_writer_destroy(gguf_writer **pw)
{
	gguf_writer *w = *pw;
	if (!w)
		return;
	if (w->f)
		fclose(w->f);
	if (w->tmp && w->state != GW_COMMITTED)
		unlink(w->tmp);
	for (uint64_t i = 0; i < w->n_kv; i++) {
		free(w->kv[i].key);
		free(w->kv[i].bytes);
	}
	for (uint64_t i = 0; i < w->n_t; i++)
		free(w->t[i].name);
	free(w->kv);
	free(w->t);
	free(w->iobuf);
	free(w->path);
	free(w->tmp);
	free(w);
	*pw = NULL;
}

static int gw_check_building(const gguf_writer *w, const char *what)
{
	if (w->state != GW_BUILDING) {
		log_error("gguf writer: %s after the file was opened", what);
		return ERR_CONFIG;
	}
	return 0;
}

static int gw_check_key(const char *key)
{
	size_t len = strlen(key);
	if (len == 0 || len > GW_MAX_NAME) {
		log_error("gguf writer: key '%.64s' has invalid length %zu", key, len);
		return ERR_CONFIG;
	}
	return 0;
}

/* Adds or replaces the entry for key; takes ownership of bytes. */
static int gw_store_kv(gguf_writer *w, const char *key, uint8_t *bytes, size_t n)
{
	for (uint64_t i = 0; i < w->n_kv; i++) {
		if (strcmp(w->kv[i].key, key) == 0) {
			free(w->kv[i].bytes);
			w->kv[i].bytes = bytes;
			w->kv[i].n = n;
			return 0;
		}
	}
	char *k = strdup(key);
	if (!k)
		goto nomem;
	if (w->n_kv == w->cap_kv) {
		uint64_t cap = w->cap_kv ? w->cap_kv * 2 : 32;
		struct gw_kv *kv = realloc(w->kv, cap * sizeof(*kv));
		if (!kv)
			goto nomem;
		w->kv = kv;
		w->cap_kv = cap;
	}
	w->kv[w->n_kv++] = (struct gw_kv){k, bytes, n};
	return 0;
nomem:
	free(k);
	free(bytes);
	log_error("gguf writer: out of memory for key %s", key);
	return ERR_NOMEM;
}

/* Starts an entry: key and value type. */
static int gw_begin(gguf_writer *w, const char *key, enum gguf_type type, struct gw_buf *b)
{
	int rc = gw_check_building(w, "setting a key");
	if (!rc)
		rc = gw_check_key(key);
	if (rc)
		return rc;
	gw_put_str(b, key, strlen(key));
	gw_put_u32(b, (uint32_t)type);
	return 0;
}

static int gw_end(gguf_writer *w, const char *key, struct gw_buf *b)
{
	if (b->failed) {
		free(b->p);
		log_error("gguf writer: out of memory for key %s", key);
		return ERR_NOMEM;
	}
	return gw_store_kv(w, key, b->p, b->n);
}

static int gw_set_scalar(gguf_writer *w, const char *key, enum gguf_type type, const void *v)
{
	struct gw_buf b = {0};
	int rc = gw_begin(w, key, type, &b);
	if (rc)
		return rc;
	gw_put(&b, v, (size_t)gguf_type_size(type));
	return gw_end(w, key, &b);
}

int gguf_writer_set_u16(gguf_writer *w, const char *key, uint16_t v)
{
	return gw_set_scalar(w, key, GGUF_TYPE_U16, &v);
}

int gguf_writer_set_split(gguf_writer *w, uint16_t no, uint16_t count, int32_t n_tensors)
{
	int rc = gguf_writer_set_u16(w, "split.no", no);
	if (!rc)
		rc = gguf_writer_set_u16(w, "split.count", count);
	if (!rc)
		rc = gguf_writer_set_i32(w, "split.tensors.count", n_tensors);
	return rc;
}

int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v)
{
	return gw_set_scalar(w, key, GGUF_TYPE_U32, &v);
}

int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v)
{
	return gw_set_scalar(w, key, GGUF_TYPE_I32, &v);
}

int gguf_writer_set_f32(gguf_writer *w, const char *key, float v)
{
	return gw_set_scalar(w, key, GGUF_TYPE_F32, &v);
}

int gguf_writer_set_bool(gguf_writer *w, const char *key, int v)
{
	uint8_t b = v != 0;
	return gw_set_scalar(w, key, GGUF_TYPE_BOOL, &b);
}

int gguf_writer_set_str(gguf_writer *w, const char *key, const char *v)
{
	struct gw_buf b = {0};
	int rc = gw_begin(w, key, GGUF_TYPE_STRING, &b);
	if (rc)
		return rc;
	gw_put_str(&b, v, strlen(v));
	return gw_end(w, key, &b);
}

int gguf_writer_set_arr(gguf_writer *w, const char *key, enum gguf_type elem_type, const void *data,
			uint64_t count)
{
	size_t sz = (size_t)gguf_type_size(elem_type);
	if (!sz) {
		log_error("gguf writer: key %s: invalid array element type %d", key,
			  (int)elem_type);
		return ERR_CONFIG;
	}
	if (count > SIZE_MAX / sz) {
		log_error("gguf writer: key %s: array of %llu elements is too large", key,
			  (unsigned long long)count);
		return ERR_RANGE;
	}
	if (elem_type == GGUF_TYPE_BOOL) {
		for (uint64_t i = 0; i < count; i++) {
			if (((const uint8_t *)data)[i] > 1) {
				log_error("gguf writer: key %s: element %llu is not a bool", key,
					  (unsigned long long)i);
				return ERR_CONFIG;
			}
		}
	}
	struct gw_buf b = {0};
	int rc = gw_begin(w, key, GGUF_TYPE_ARRAY, &b);
	if (rc)
		return rc;
	gw_put_u32(&b, (uint32_t)elem_type);
	gw_put_u64(&b, count);
	gw_put(&b, data, (size_t)count * sz);
	return gw_end(w, key, &b);
}

int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t count)
{
	struct gw_buf b = {0};
	int rc = gw_begin(w, key, GGUF_TYPE_ARRAY, &b);
	if (rc)
		return rc;
	gw_put_u32(&b, GGUF_TYPE_STRING);
	gw_put_u64(&b, count);
	for (uint64_t i = 0; i < count; i++)
		gw_put_str(&b, v[i], strlen(v[i]));
	return gw_end(w, key, &b);
}

int gguf_writer_copy_kv(gguf_writer *w, const gguf *src, uint64_t i)
{
	int rc = gw_check_building(w, "copying a key");
	if (rc)
		return rc;
	const void *p;
	size_t n;
	const char *key = gguf_kv_key(src, i);
	if (!key || gguf_kv_raw(src, i, &p, &n)) {
		log_error("%s: no metadata entry %llu", gguf_path(src), (unsigned long long)i);
		return ERR_RANGE;
	}
	uint8_t *bytes = malloc(n);
	if (!bytes) {
		log_error("gguf writer: out of memory for key %s", key);
		return ERR_NOMEM;
	}
	memcpy(bytes, p, n);
	return gw_store_kv(w, key, bytes, n);
}

int gguf_writer_copy_all_kv(gguf_writer *w, const gguf *src)
{
	for (uint64_t i = 0; i < gguf_n_kv(src); i++) {
		if (strncmp(gguf_kv_key(src, i), "split.", 6) == 0)
			continue;
		int rc = gguf_writer_copy_kv(w, src, i);
		if (rc)
			return rc;
	}
	return 0;
}

uint64_t gguf_writer_n_kv(const gguf_writer *w)
{
	return w->n_kv;
}

/* ------------------------------------------------------------- tensors */

int gguf_writer_add_tensor(gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
			   const uint64_t *ne)
{
	int rc = gw_check_building(w, "adding a tensor");
	if (rc)
		return rc;
	size_t len = strlen(name);
	if (len == 0 || len > GW_MAX_NAME) {
		log_error("gguf writer: tensor name '%.64s' has invalid length %zu", name, len);
		return ERR_CONFIG;
	}
	if (!kern_type_known(type)) {
		log_error("gguf writer: tensor %s: unsupported type %u", name, type);
		return ERR_CONFIG;
	}
	if (n_dims < 1 || n_dims > GGUF_MAX_DIMS) {
		log_error("gguf writer: tensor %s: %u dimensions (1 to %d allowed)", name, n_dims,
			  GGUF_MAX_DIMS);
		return ERR_CONFIG;
	}
	struct gw_tensor t = {.type = type, .n_dims = n_dims};
	uint64_t n_el = 1;
	for (int d = 0; d < GGUF_MAX_DIMS; d++)
		t.ne[d] = 1;
	for (uint32_t d = 0; d < n_dims; d++) {
		if (ne[d] == 0 || ne[d] > (1ull << 40) || n_el > (1ull << 42) / ne[d]) {
			log_error("gguf writer: tensor %s: dimension %u has invalid extent %llu",
				  name, d, (unsigned long long)ne[d]);
			return ERR_CONFIG;
		}
		t.ne[d] = ne[d];
		n_el *= ne[d];
	}
	if (t.ne[0] % (uint64_t)kern_type_block(type) != 0) {
		log_error("gguf writer: tensor %s: row length %llu is not a multiple of the %s "
			  "block (%d)",
			  name, (unsigned long long)t.ne[0], kern_type_name(type),
			  kern_type_block(type));
		return ERR_CONFIG;
	}
	t.n_bytes = kern_row_bytes(type, (int64_t)t.ne[0]) * (n_el / t.ne[0]);
	for (uint64_t i = 0; i < w->n_t; i++) {
		if (strcmp(w->t[i].name, name) == 0) {
			log_error("gguf writer: duplicate tensor %s", name);
			return ERR_CONFIG;
		}
	}
	if (w->n_t == w->cap_t) {
		uint64_t cap = w->cap_t ? w->cap_t * 2 : 64;
		struct gw_tensor *nt = realloc(w->t, cap * sizeof(*nt));
		if (!nt)
			goto nomem;
		w->t = nt;
		w->cap_t = cap;
	}
	t.name = strdup(name);
	if (!t.name)
		goto nomem;
	w->t[w->n_t++] = t;
	return 0;
nomem:
	log_error("gguf writer: out of memory for tensor %s", name);
	return ERR_NOMEM;
}

uint64_t gguf_writer_n_tensors(const gguf_writer *w)
{
	return w->n_t;
}

/* --------------------------------------------------------------- output */

static int gw_fail_io(gguf_writer *w)
{
	log_error("%s: write failed: %s", w->path, strerror(errno ? errno : EIO));
	w->state = GW_FAILED;
	return ERR_IO;
}

static int gw_write_raw(gguf_writer *w, const void *p, size_t n)
{
	errno = 0;
	if (n && fwrite(p, 1, n, w->f) != n)
		return gw_fail_io(w);
	return 0;
}

static int gw_write_pad(gguf_writer *w, uint64_t len)
{
	static const uint8_t zeros[64];
	uint64_t pad = (w->alignment - len % w->alignment) % w->alignment;
	while (pad) {
		size_t k = pad < sizeof(zeros) ? (size_t)pad : sizeof(zeros);
		int rc = gw_write_raw(w, zeros, k);
		if (rc)
			return rc;
		pad -= k;
	}
	return 0;
}

/* The alignment the file will declare: general.alignment if set, else 32. */
static int gw_find_alignment(gguf_writer *w)
{
	w->alignment = GW_DEFAULT_ALIGN;
	for (uint64_t i = 0; i < w->n_kv; i++) {
		if (strcmp(w->kv[i].key, "general.alignment") != 0)
			continue;
		size_t at = 8 + strlen(w->kv[i].key);
		uint32_t type, a;
		if (w->kv[i].n != at + 8) {
			log_error("gguf writer: key general.alignment is not a u32");
			return ERR_CONFIG;
		}
		memcpy(&type, w->kv[i].bytes + at, 4);
		memcpy(&a, w->kv[i].bytes + at + 4, 4);
		if (type != GGUF_TYPE_U32 || a == 0 || (a & (a - 1)) != 0 || a > GW_MAX_ALIGN) {
			log_error("gguf writer: key general.alignment must be a u32 power of two "
				  "up to %u",
				  GW_MAX_ALIGN);
			return ERR_CONFIG;
		}
		w->alignment = a;
	}
	return 0;
}

int gguf_writer_open(gguf_writer *w, const char *path)
{
	int rc = gw_check_building(w, "opening");
	if (rc)
		return rc;
	rc = gw_find_alignment(w);
	if (rc)
		return rc;
	uint64_t off = 0;
	for (uint64_t i = 0; i < w->n_t; i++) {
		w->t[i].offset = off;
		uint64_t sz = (w->t[i].n_bytes + w->alignment - 1) / w->alignment * w->alignment;
		if (off > UINT64_MAX - sz) {
			log_error("%s: tensor data too large", path);
			return ERR_RANGE;
		}
		off += sz;
	}
	size_t len = strlen(path);
	w->path = strdup(path);
	w->tmp = malloc(len + 5);
	w->iobuf = malloc(GW_IO_BUFFER);
	if (!w->path || !w->tmp || !w->iobuf) {
		log_error("%s: out of memory", path);
		w->state = GW_FAILED;
		return ERR_NOMEM;
	}
	memcpy(w->tmp, path, len);
	memcpy(w->tmp + len, ".tmp", 5);
	w->f = fopen(w->tmp, "wbe");
	if (!w->f) {
		log_error("%s: cannot write %s: %s", path, w->tmp, strerror(errno));
		free(w->tmp); /* nothing was created: nothing to remove */
		w->tmp = NULL;
		w->state = GW_FAILED;
		return ERR_IO;
	}
	setvbuf(w->f, w->iobuf, _IOFBF, GW_IO_BUFFER);
	w->state = GW_OPEN;

	struct gw_buf b = {0};
	gw_put(&b, "GGUF", 4);
	gw_put_u32(&b, 3);
	gw_put_u64(&b, w->n_t);
	gw_put_u64(&b, w->n_kv);
	for (uint64_t i = 0; i < w->n_kv; i++)
		gw_put(&b, w->kv[i].bytes, w->kv[i].n);
	for (uint64_t i = 0; i < w->n_t; i++) {
		const struct gw_tensor *t = &w->t[i];
		gw_put_str(&b, t->name, strlen(t->name));
		gw_put_u32(&b, t->n_dims);
		for (uint32_t d = 0; d < t->n_dims; d++)
			gw_put_u64(&b, t->ne[d]);
		gw_put_u32(&b, t->type);
		gw_put_u64(&b, t->offset);
	}
	if (b.failed) {
		free(b.p);
		log_error("%s: out of memory for the header", path);
		w->state = GW_FAILED;
		return ERR_NOMEM;
	}
	rc = gw_write_raw(w, b.p, b.n);
	if (!rc)
		rc = gw_write_pad(w, b.n);
	free(b.p);
	w->cur = 0;
	w->cur_done = 0;
	return rc;
}

int gguf_writer_write(gguf_writer *w, const void *data, size_t n)
{
	if (w->state != GW_OPEN) {
		log_error("gguf writer: data written to a file that is not open");
		return ERR_CONFIG;
	}
	const uint8_t *p = data;
	while (n) {
		if (w->cur >= w->n_t) {
			log_error("%s: %zu bytes of tensor data beyond the declared tensors",
				  w->path, n);
			w->state = GW_FAILED;
			return ERR_CONFIG;
		}
		const struct gw_tensor *t = &w->t[w->cur];
		uint64_t left = t->n_bytes - w->cur_done;
		size_t k = n < left ? n : (size_t)left;
		int rc = gw_write_raw(w, p, k);
		if (rc)
			return rc;
		p += k;
		n -= k;
		w->cur_done += k;
		if (w->cur_done == t->n_bytes) {
			rc = gw_write_pad(w, t->n_bytes);
			if (rc)
				return rc;
			w->cur++;
			w->cur_done = 0;
		}
	}
	return 0;
}

int gguf_writer_commit(gguf_writer *w)
{
	if (w->state != GW_OPEN) {
		log_error("gguf writer: commit of a file that is not open");
		return ERR_CONFIG;
	}
	if (w->cur != w->n_t) {
		log_error("%s: tensor %s: only %llu of %llu bytes were written", w->path,
			  w->t[w->cur].name, (unsigned long long)w->cur_done,
			  (unsigned long long)w->t[w->cur].n_bytes);
		w->state = GW_FAILED;
		return ERR_CONFIG;
	}
	errno = 0;
	if (fflush(w->f) != 0 || fsync(fileno(w->f)) != 0)
		return gw_fail_io(w);
	FILE *f = w->f;
	w->f = NULL;
	if (fclose(f) != 0)
		return gw_fail_io(w);
	if (rename(w->tmp, w->path) != 0) {
		log_error("%s: cannot rename %s into place: %s", w->path, w->tmp, strerror(errno));
		w->state = GW_FAILED;
		return ERR_IO;
	}
	w->state = GW_COMMITTED;
	return 0;
}
