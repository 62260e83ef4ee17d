/* fuzz_gguf: the GGUF reader on arbitrary bytes.  The input is written to a
 * memory file and opened with gguf_open() (which mmaps it, as for a real
 * model); when it is accepted, every accessor is exercised on every key and
 * tensor, and each tensor's bytes must lie inside the file. */
#define _GNU_SOURCE
#include "fuzz.h"
#include "../../common/gguf.h"
#include "../../common/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int fuzz_fd = -1;

static void fuzz_touch_kv(const gguf *g, uint64_t i)
{
	const char *key = gguf_kv_key(g, i);
	if (!key)
		abort();
	int64_t j = gguf_find_kv(g, key);
	if (j < 0 || (uint64_t)j > i) /* the first entry with this key */
		abort();
	const void *raw;
	size_t n;
	if (gguf_kv_raw(g, i, &raw, &n))
		abort();
	uint32_t u32;
	int32_t i32;
	float f;
	int b;
	gguf_str s;
	char buf[64];
	switch (gguf_kv_type(g, i)) {
	case GGUF_TYPE_U32: gguf_get_u32(g, key, &u32); break;
	case GGUF_TYPE_I32: gguf_get_i32(g, key, &i32); break;
	case GGUF_TYPE_F32: gguf_get_f32(g, key, &f); break;
	case GGUF_TYPE_BOOL: gguf_get_bool(g, key, &b); break;
	case GGUF_TYPE_STRING:
		gguf_get_str(g, key, &s);
		gguf_get_cstr(g, key, buf, sizeof(buf));
		break;
	case GGUF_TYPE_ARRAY: {
		enum gguf_type et;
		uint64_t count;
		const void *data;
		if (gguf_get_arr(g, key, &et, &count, &data))
			break;
		if (et == GGUF_TYPE_STRING) {
			for (uint64_t k = 0; k < count && k < 64; k++)
				if (gguf_get_arr_str(g, key, k, &s) == 0 && s.len)
					(void)*(volatile const char *)(s.ptr + s.len - 1);
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
		fuzz_fd = memfd_create("fuzz-gguf", 0);
		if (fuzz_fd < 0)
			abort();
		init = 1;
	}
	if (ftruncate(fuzz_fd, 0) || (size && pwrite(fuzz_fd, data, size, 0) != (ssize_t)size))
		abort();
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fuzz_fd);
	gguf *g = NULL;
	if (gguf_open(path, &g))
		return 0;
	uint64_t size_file = gguf_file_size(g);
	for (uint64_t i = 0; i < gguf_n_kv(g); i++)
		fuzz_touch_kv(g, i);
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		if (!t || !t->name || gguf_find_tensor(g, t->name) == NULL)
			abort();
		if (t->n_bytes > size_file)
			abort();
		/* first and last byte of the data are readable */
		if (t->n_bytes) {
			const uint8_t *p = t->data;
			(void)*(volatile const uint8_t *)p;
			(void)*(volatile const uint8_t *)(p + t->n_bytes - 1);
		}
		uint64_t ne[GGUF_MAX_DIMS];
		memcpy(ne, t->ne, sizeof(ne));
		const gguf_tensor *o;
		gguf_expect_tensor(g, t->name, t->n_dims, ne, &o);
	}
	gguf_destroy(&g);
	return 0;
}
