/* The GGUF reader: a file written here with every metadata type, arrays, a
 * custom alignment and several tensors reads back exactly; every truncation
 * and a list of corruptions fail with an error instead of a crash. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/gguf.h"
#include "../common/log.h"

/* ---- a tiny GGUF writer ---- */
struct buf {
	uint8_t *p;
	size_t n, cap;
};

static void put(struct buf *b, const void *d, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = (b->n + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
	}
	memcpy(b->p + b->n, d, n);
	b->n += n;
}
static void put_u32(struct buf *b, uint32_t v)
{
	put(b, &v, 4);
}
static void put_u64(struct buf *b, uint64_t v)
{
	put(b, &v, 8);
}
static void put_str(struct buf *b, const char *s)
{
	put_u64(b, strlen(s));
	put(b, s, strlen(s));
}

/* offsets of interesting fields, for corruption tests */
static size_t off_version, off_n_tensors, off_kv_type, off_arr_count, off_t_ndims, off_t_ne0,
    off_t_type, off_t_offset;

static struct buf make_file(void)
{
	struct buf b = {0};
	put(&b, "GGUF", 4);
	off_version = b.n;
	put_u32(&b, 3);
	off_n_tensors = b.n;
	put_u64(&b, 2);
	put_u64(&b, 7);
	put_str(&b, "general.architecture");
	off_kv_type = b.n;
	put_u32(&b, GGUF_TYPE_STRING);
	put_str(&b, "test");
	put_str(&b, "test.u32");
	put_u32(&b, GGUF_TYPE_U32);
	put_u32(&b, 77);
	put_str(&b, "test.f32");
	put_u32(&b, GGUF_TYPE_F32);
	float f = 1.5f;
	put(&b, &f, 4);
	put_str(&b, "test.bool");
	put_u32(&b, GGUF_TYPE_BOOL);
	put(&b, "\1", 1);
	put_str(&b, "test.arr");
	put_u32(&b, GGUF_TYPE_ARRAY);
	put_u32(&b, GGUF_TYPE_I32);
	off_arr_count = b.n;
	put_u64(&b, 3);
	int32_t a[3] = {-1, 2, 3};
	put(&b, a, sizeof(a));
	put_str(&b, "test.strs");
	put_u32(&b, GGUF_TYPE_ARRAY);
	put_u32(&b, GGUF_TYPE_STRING);
	put_u64(&b, 2);
	put_str(&b, "hello");
	put_str(&b, "");
	put_str(&b, "general.alignment");
	put_u32(&b, GGUF_TYPE_U32);
	put_u32(&b, 64);
	/* tensor 0: F32 4 x 2 */
	put_str(&b, "a.weight");
	off_t_ndims = b.n;
	put_u32(&b, 2);
	off_t_ne0 = b.n;
	put_u64(&b, 4);
	put_u64(&b, 2);
	off_t_type = b.n;
	put_u32(&b, 0);
	off_t_offset = b.n;
	put_u64(&b, 0);
	/* tensor 1: Q8_0 32 x 1 */
	put_str(&b, "b.weight");
	put_u32(&b, 1);
	put_u64(&b, 32);
	put_u32(&b, 8);
	put_u64(&b, 64);
	while (b.n % 64)
		put(&b, "", 1);
	float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
	put(&b, data, sizeof(data));
	while (b.n % 64)
		put(&b, "", 1);
	uint8_t q[34] = {0};
	q[2] = 5;
	put(&b, q, sizeof(q));
	return b;
}

static char tmp_path[64];

static int open_bytes(const uint8_t *p, size_t n, gguf **g)
{
	FILE *f = fopen(tmp_path, "wb");
	assert_non_null(f);
	if (n)
		assert_int_equal(fwrite(p, 1, n, f), n);
	fclose(f);
	return gguf_open(tmp_path, g);
}

static void test_roundtrip(void **state)
{
	(void)state;
	struct buf b = make_file();
	gguf *g = NULL;
	assert_int_equal(open_bytes(b.p, b.n, &g), 0);
	char s[32];
	assert_int_equal(gguf_get_cstr(g, "general.architecture", s, sizeof(s)), 0);
	assert_string_equal(s, "test");
	uint32_t u;
	assert_int_equal(gguf_get_u32(g, "test.u32", &u), 0);
	assert_int_equal(u, 77);
	float f;
	assert_int_equal(gguf_get_f32(g, "test.f32", &f), 0);
	assert_true(f == 1.5f);
	int bo;
	assert_int_equal(gguf_get_bool(g, "test.bool", &bo), 0);
	assert_int_equal(bo, 1);
	/* strict types: a u32 is not an f32, absent keys are ERR_RANGE */
	assert_int_equal(gguf_get_f32(g, "test.u32", &f), ERR_FORMAT);
	assert_int_equal(gguf_get_u32(g, "nope", &u), ERR_RANGE);
	uint32_t arr[3];
	assert_int_equal(gguf_get_arr_u32(g, "test.arr", arr, 3), 0);
	assert_int_equal((int32_t)arr[0], -1);
	assert_int_equal(arr[2], 3);
	assert_int_equal(gguf_get_arr_u32(g, "test.arr", arr, 2), ERR_FORMAT);
	gguf_str gs;
	assert_int_equal(gguf_get_arr_str(g, "test.strs", 0, &gs), 0);
	assert_int_equal(gs.len, 5);
	assert_memory_equal(gs.ptr, "hello", 5);
	assert_int_equal(gguf_get_arr_str(g, "test.strs", 1, &gs), 0);
	assert_int_equal(gs.len, 0);
	assert_int_equal(gguf_get_arr_str(g, "test.strs", 2, &gs), ERR_RANGE);
	assert_int_equal(gguf_n_tensors(g), 2);
	const gguf_tensor *t = gguf_find_tensor(g, "a.weight");
	assert_non_null(t);
	assert_int_equal(t->ne[0], 4);
	assert_int_equal(t->ne[1], 2);
	assert_int_equal(t->n_bytes, 32);
	assert_int_equal(((uintptr_t)t->data - (uintptr_t)b.p) % 1, 0);
	assert_true(((const float *)t->data)[7] == 8.0f);
	const gguf_tensor *q = gguf_find_tensor(g, "b.weight");
	assert_int_equal(q->n_bytes, 34);
	assert_int_equal(((const uint8_t *)q->data)[2], 5);
	uint64_t ne[2] = {4, 2};
	assert_int_equal(gguf_expect_tensor(g, "a.weight", 2, ne, &t), 0);
	ne[1] = 3;
	assert_int_equal(gguf_expect_tensor(g, "a.weight", 2, ne, &t), ERR_FORMAT);
	assert_int_equal(gguf_expect_tensor(g, "c.weight", 2, ne, &t), ERR_FORMAT);
	gguf_destroy(&g);
	assert_null(g);
	free(b.p);
}

static void test_every_truncation_fails(void **state)
{
	(void)state;
	struct buf b = make_file();
	for (size_t n = 0; n < b.n; n++) {
		gguf *g = NULL;
		int rc = open_bytes(b.p, n, &g);
		assert_int_not_equal(rc, 0);
		assert_null(g);
	}
	free(b.p);
}

struct corruption {
	size_t *off;
	uint64_t value;
	int width;
};

static void test_corruptions_fail(void **state)
{
	(void)state;
	const struct corruption cases[] = {
	    {&off_version, 2, 4},	     /* old version */
	    {&off_n_tensors, 1ull << 40, 8}, /* absurd tensor count */
	    {&off_kv_type, 99, 4},	     /* unknown value type */
	    {&off_arr_count, 1ull << 60, 8}, /* array longer than the file */
	    {&off_t_ndims, 0, 4},	     /* no dimensions */
	    {&off_t_ndims, 9, 4},	     /* too many dimensions */
	    {&off_t_ne0, 0, 8},		     /* empty extent */
	    {&off_t_ne0, 1ull << 62, 8},     /* overflowing extent */
	    {&off_t_type, 12, 4},	     /* unsupported type (Q4_K) */
	    {&off_t_type, 1000, 4},	     /* unknown type */
	    {&off_t_offset, 1ull << 50, 8},  /* data past the end */
	    {&off_t_offset, 3, 8},	     /* misaligned */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct buf b = make_file();
		memcpy(b.p + *cases[i].off, &cases[i].value, (size_t)cases[i].width);
		gguf *g = NULL;
		assert_int_equal(open_bytes(b.p, b.n, &g), ERR_FORMAT);
		assert_null(g);
		free(b.p);
	}
	/* bad magic */
	struct buf b = make_file();
	b.p[0] = 'X';
	gguf *g = NULL;
	assert_int_equal(open_bytes(b.p, b.n, &g), ERR_FORMAT);
	free(b.p);
	/* Q8_0 row of 4 values is not a whole block */
	b = make_file();
	uint32_t q8 = 8;
	memcpy(b.p + off_t_type, &q8, 4);
	assert_int_equal(open_bytes(b.p, b.n, &g), ERR_FORMAT);
	free(b.p);
	/* missing file */
	assert_int_equal(gguf_open("/nonexistent/x.gguf", &g), ERR_IO);
}

static void test_random_bytes_do_not_crash(void **state)
{
	(void)state;
	struct buf b = make_file();
	uint64_t s = 1;
	for (int it = 0; it < 3000; it++) {
		uint8_t *c = malloc(b.n);
		memcpy(c, b.p, b.n);
		for (int k = 0; k < 3; k++) {
			s = s * 6364136223846793005ULL + 1442695040888963407ULL;
			size_t at = (size_t)(s >> 33) % b.n;
			c[at] ^= (uint8_t)(s >> 20);
		}
		gguf *g = NULL;
		if (open_bytes(c, b.n, &g) == 0) {
			for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
				const gguf_tensor *t = gguf_tensor_at(g, i);
				volatile uint8_t sink = 0;
				for (uint64_t j = 0; j < t->n_bytes; j++)
					sink ^= ((const uint8_t *)t->data)[j];
				(void)sink;
			}
			gguf_destroy(&g);
		}
		free(c);
	}
	free(b.p);
}

int main(void)
{
	snprintf(tmp_path, sizeof(tmp_path), "/tmp/moefleet-test-gguf-%d.gguf", (int)getpid());
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_roundtrip),
	    cmocka_unit_test(test_every_truncation_fails),
	    cmocka_unit_test(test_corruptions_fail),
	    cmocka_unit_test(test_random_bytes_do_not_crash),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	unlink(tmp_path);
	return rc;
}
