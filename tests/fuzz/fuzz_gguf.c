/* fuzz_gguf: the GGUF reader on arbitrary bytes.  The input is opened in
 * place with gguf_open_memory() (the checks of gguf_open() on the buffer
 * libFuzzer allocated with the input's exact size, so ASan catches a read
 * one byte past the end, which a page-rounded mapping would hide); when it
 * is accepted, every accessor is exercised on the keys and tensors (lookups,
 * which are linear, on the first FUZZ_MAX_LOOKUPS of each), and each
 * tensor's bytes must lie inside the file.  An accepted input is one file: a
 * plain model or a split model of one shard (a shard of several is refused
 * from memory and, in the replay, from disk).  A per-node shard file's
 * table of held experts is read and checked too. */
#define _GNU_SOURCE
#include "fuzz.h"
#include "../../common/gguf.h"
#include "../../common/log.h"
#include "../../common/shardfile.h"
#include "../../kernels/kern.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_MAX_LOOKUPS 256
#define FUZZ_MAX_DECODES 16
#define FUZZ_MAX_ROW	 4096 /* values of a decoded row, at most */

/* Row 0 of t through kern_dequant_row, kern_convert_row and kern_dot, with
 * both implementations. */
static void fuzz_decode_row(const gguf_tensor *t)
{
	static float x[FUZZ_MAX_ROW];
	static uint8_t xa[FUZZ_MAX_ROW * 4 + 64];
	const int64_t n = (int64_t)t->ne[0];
	if (!kern_type_dot(t->type) || n <= 0 || n > FUZZ_MAX_ROW ||
	    kern_row_bytes(t->type, n) > t->n_bytes)
		return;
	const uint32_t at = kern_act_type(t->type);
	for (int ref = 0; ref < 2; ref++) {
		kern_force_ref(ref);
		kern_dequant_row(t->type, t->data, x, n);
		kern_convert_row(at, x, xa, n);
		volatile float d = kern_dot(t->type, n, t->data, xa);
		(void)d;
	}
	kern_force_ref(0);
}

#ifdef FUZZ_NAME
#include <sys/mman.h>
#include <unistd.h>

/* Replay only (a file per input would slow the fuzzer down): gguf_open() of
 * the same bytes as a file gives the same verdict and the same contents. */
static void fuzz_check_file(const uint8_t *data, size_t size, int rc_mem, const gguf *gm)
{
	int fd = memfd_create("fuzz-gguf", 0);
	if (fd < 0)
		abort();
	if (size && write(fd, data, size) != (ssize_t)size)
		abort();
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	gguf *g = NULL;
	int rc = gguf_open(path, &g);
	if (rc != rc_mem)
		abort();
	if (rc == 0) {
		if (gguf_n_kv(g) != gguf_n_kv(gm) || gguf_n_tensors(g) != gguf_n_tensors(gm) ||
		    gguf_file_size(g) != size)
			abort();
		for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
			const gguf_tensor *a = gguf_tensor_at(g, i), *b = gguf_tensor_at(gm, i);
			if (strcmp(a->name, b->name) || a->type != b->type ||
			    a->n_bytes != b->n_bytes || memcmp(a->data, b->data, a->n_bytes))
				abort();
		}
	}
	gguf_destroy(&g);
	close(fd);
}
#endif

/* p[0, n) lies inside the input data[0, size). */
static int fuzz_inside(const uint8_t *data, size_t size, const void *p, uint64_t n)
{
	const uint8_t *q = p;
	return q >= data && (uint64_t)(q - data) <= size && n <= size - (uint64_t)(q - data);
}

static void fuzz_touch_kv(const gguf *g, const uint8_t *in, size_t in_size, uint64_t i)
{
	const char *key = gguf_kv_key(g, i);
	if (!key)
		abort();
	int64_t j = gguf_find_kv(g, key);
	if (j < 0 || (uint64_t)j != i) /* keys are unique */
		abort();
	const void *raw;
	size_t n;
	if (gguf_kv_raw(g, i, &raw, &n) || !fuzz_inside(in, in_size, raw, n))
		abort();
	uint16_t u16;
	uint32_t u32;
	int32_t i32;
	float f;
	int b;
	gguf_str s;
	char buf[64];
	switch (gguf_kv_type(g, i)) {
	/* the getter of the stored type succeeds, another one fails */
	case GGUF_TYPE_U16:
		if (gguf_get_u16(g, key, &u16) || !gguf_get_u32(g, key, &u32))
			abort();
		break;
	case GGUF_TYPE_U32:
		if (gguf_get_u32(g, key, &u32) || !gguf_get_i32(g, key, &i32) ||
		    !gguf_get_u16(g, key, &u16))
			abort();
		break;
	case GGUF_TYPE_I32:
		if (gguf_get_i32(g, key, &i32) || !gguf_get_u32(g, key, &u32))
			abort();
		break;
	case GGUF_TYPE_F32:
		if (gguf_get_f32(g, key, &f) || !gguf_get_bool(g, key, &b))
			abort();
		break;
	case GGUF_TYPE_BOOL:
		if (gguf_get_bool(g, key, &b) || (b != 0 && b != 1) || !gguf_get_f32(g, key, &f))
			abort();
		break;
	case GGUF_TYPE_STRING:
		if (gguf_get_str(g, key, &s) || !fuzz_inside(in, in_size, s.ptr, s.len))
			abort();
		gguf_get_cstr(g, key, buf, sizeof(buf));
		break;
	case GGUF_TYPE_ARRAY: {
		enum gguf_type et;
		uint64_t count;
		const void *data;
		if (gguf_get_arr(g, key, &et, &count, &data))
			abort();
		if (et != GGUF_TYPE_STRING &&
		    (!fuzz_inside(in, in_size, data, 0) ||
		     count >
			 (in_size - (uint64_t)((const uint8_t *)data - in)) / gguf_type_size(et)))
			abort();
		if (et == GGUF_TYPE_STRING) {
			for (uint64_t k = 0; k < count && k < 64; k++)
				if (gguf_get_arr_str(g, key, k, &s) ||
				    !fuzz_inside(in, in_size, s.ptr, s.len))
					abort();
		} else if (count && count <= 64) {
			uint32_t dst[64];
			gguf_get_arr_u32(g, key, dst, count);
		}
		break;
	}
	default: break;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int init;
	if (!init) {
		log_set_quiet(1);
		kern_init();
		init = 1;
	}
	gguf *g = NULL;
	int rc = gguf_open_memory("fuzz.gguf", data, size, &g);
#ifdef FUZZ_NAME
	fuzz_check_file(data, size, rc, g);
#endif
	if (rc)
		return 0;
	uint64_t size_file = gguf_file_size(g);
	if (size_file != size)
		abort();
	if (gguf_n_shards(g) != 1 || gguf_shard_size(g, 0) != size ||
	    gguf_shard_n_tensors(g, 0) != gguf_n_tensors(g) || gguf_shard_path(g, 1))
		abort();
	for (uint64_t i = 0; i < gguf_n_kv(g) && i < FUZZ_MAX_LOOKUPS; i++)
		fuzz_touch_kv(g, data, size, i);
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		if (!t || !t->name || t->shard != 0)
			abort();
		if (t->n_bytes > size_file)
			abort();
		/* the data lies inside the input: its first and last byte are readable */
		const uint8_t *p = t->data;
		if (!fuzz_inside(data, size, p, t->n_bytes))
			abort();
		if (t->n_bytes) {
			(void)*(volatile const uint8_t *)p;
			(void)*(volatile const uint8_t *)(p + t->n_bytes - 1);
		}
		if (i < FUZZ_MAX_DECODES)
			fuzz_decode_row(t);
		if (i >= FUZZ_MAX_LOOKUPS)
			continue;
		if (gguf_find_tensor(g, t->name) != t) /* names are unique */
			abort();
		uint64_t ne[GGUF_MAX_DIMS];
		memcpy(ne, t->ne, sizeof(ne));
		const gguf_tensor *o;
		if (gguf_expect_tensor(g, t->name, t->n_dims, ne, &o) || o != t)
			abort();
	}
	if (gguf_tensor_at(g, gguf_n_tensors(g)) || gguf_kv_key(g, gguf_n_kv(g)))
		abort();
	/* a per-node shard file's table: every held slot inside its layer's count */
	struct shardfile sf;
	if (shardfile_read(g, &sf) == 0) {
		for (int l = 0; l < sf.n_layer && (size_t)sf.n_layer * sf.n_expert <= 65536; l++)
			for (int e = 0; e < sf.n_expert; e++) {
				int slot = shardfile_slot(&sf, l, e);
				if (slot >= 0 && (uint32_t)slot >= sf.layer_held[l])
					abort();
			}
		shardfile_free(&sf);
	}
	gguf_destroy(&g);
	return 0;
}
