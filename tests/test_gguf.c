/* The GGUF reader: a file written here with every metadata type, arrays, a
 * custom alignment and several tensors reads back exactly; every truncation
 * and a list of corruptions fail with an error instead of a crash; a tensor
 * type not read or a row not a whole number of blocks is named in the error.
 * Split models (written with gguf_write into a temporary directory): a set
 * of shards opens as one model equal to the same model in one file, and
 * each broken set (missing shard, wrong split.no / split.count /
 * split.tensors.count, a tensor in two shards, a shard that is not GGUF, a
 * shard other than the first given) fails with its own message, and random
 * bytes in the later shards never crash. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/gguf.h"
#include "../common/gguf_write.h"
#include "../common/log.h"
#include "../kernels/kern.h"

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

/* ---- error messages ---- */

/* gguf_open() with stderr (where log_error writes) captured into msg. */
static int open_capture(const char *path, gguf **g, char *msg, size_t cap)
{
	FILE *f = tmpfile();
	assert_non_null(f);
	fflush(stderr);
	int saved = dup(STDERR_FILENO);
	assert_true(saved >= 0);
	assert_true(dup2(fileno(f), STDERR_FILENO) >= 0);
	int rc = gguf_open(path, g);
	dup2(saved, STDERR_FILENO);
	close(saved);
	rewind(f);
	size_t n = fread(msg, 1, cap - 1, f);
	msg[n] = 0;
	fclose(f);
	return rc;
}

static void assert_contains(const char *msg, const char *want)
{
	if (!strstr(msg, want))
		fail_msg("message \"%s\" does not contain \"%s\"", msg, want);
}

static void test_type_errors_name_the_type(void **state)
{
	(void)state;
	static const struct {
		uint32_t type;
		uint64_t ne0;
		const char *want;
	} cases[] = {
	    {34, 4, "tensor 'a.weight' has type TQ1_0 (34), which moefleet does not read"},
	    {4, 4, "tensor 'a.weight' has type Q4_2 (4), which moefleet does not read"},
	    {1000, 4, "tensor 'a.weight' has type 1000, which is not a GGML type"},
	    {KERN_Q4_K, 32, "row length 32 is not a multiple of the Q4_K block (256)"},
	    {KERN_Q8_0, 4, "row length 4 is not a multiple of the Q8_0 block (32)"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct buf b = make_file();
		memcpy(b.p + off_t_type, &cases[i].type, 4);
		memcpy(b.p + off_t_ne0, &cases[i].ne0, 8);
		FILE *f = fopen(tmp_path, "wb");
		assert_non_null(f);
		assert_int_equal(fwrite(b.p, 1, b.n, f), b.n);
		fclose(f);
		gguf *g = NULL;
		char msg[1024];
		assert_int_equal(open_capture(tmp_path, &g, msg, sizeof(msg)), ERR_FORMAT);
		assert_null(g);
		assert_contains(msg, tmp_path);
		assert_contains(msg, cases[i].want);
		free(b.p);
	}
}

/* ---- split models ---- */

/* The test model: one tensor of most block families, experts among them. */
static const struct {
	const char *name;
	uint32_t type;
	uint32_t n_dims;
	uint64_t ne[3];
} model_t[] = {
    {"token_embd.weight", KERN_Q4_K, 2, {256, 4, 1}},
    {"output_norm.weight", KERN_F32, 1, {8, 1, 1}},
    {"blk.0.attn_q.weight", KERN_Q8_0, 2, {64, 3, 1}},
    {"blk.0.ffn_up_exps.weight", KERN_IQ2_XXS, 3, {256, 2, 2}},
    {"blk.0.ffn_down_exps.weight", KERN_Q6_K, 3, {256, 2, 2}},
    {"blk.1.attn_q.weight", KERN_F16, 2, {16, 3, 1}},
    {"output.weight", KERN_MXFP4, 2, {64, 4, 1}},
};
#define MODEL_N ((int)(sizeof(model_t) / sizeof(model_t[0])))

static uint64_t model_bytes(int i)
{
	return kern_row_bytes(model_t[i].type, (int64_t)model_t[i].ne[0]) * model_t[i].ne[1] *
	       model_t[i].ne[2];
}

/* Tensor i's data: a pattern particular to the tensor. */
static void model_fill(int i, uint8_t *p, uint64_t n)
{
	for (uint64_t j = 0; j < n; j++)
		p[j] = (uint8_t)(i * 37 + j * 11 + (j >> 8));
}

/* Faults to put in a written set; shard numbers from 1, 0 = none. */
struct set_faults {
	int skip;	     /* this shard is not written */
	int garbage;	     /* this shard is not a GGUF file */
	int bad_no;	     /* this shard says split.no = the next shard's (wrapping) */
	int bad_count;	     /* this shard says split.count = count + 1 */
	int bad_total;	     /* this shard says split.tensors.count = total + 1 */
	int all_total_extra; /* every shard says split.tensors.count = total + this */
	int dup;	     /* this shard also holds a tensor named like tensor 0 */
};

static char split_dir[64];

static void shard_path(char *buf, size_t cap, int no, int count)
{
	snprintf(buf, cap, "%s/m-%05d-of-%05d.gguf", split_dir, no + 1, count);
}

/* Writes the model to path: tensors [first, first + n), the model keys when
 * keys, the split keys when count > 0 (shard no of count). */
static void write_part(const char *path, int first, int n, int keys, int count, int no,
		       int32_t total, int count_key, int dup)
{
	gguf_writer *w = NULL;
	assert_int_equal(gguf_writer_new(&w), 0);
	if (keys) {
		assert_int_equal(gguf_writer_set_str(w, "general.architecture", "test"), 0);
		assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 64), 0);
		assert_int_equal(gguf_writer_set_u32(w, "test.block_count", 2), 0);
	}
	if (count > 0) {
		assert_int_equal(gguf_writer_set_split(w, (uint16_t)no, (uint16_t)count_key, total),
				 0);
	}
	for (int i = first; i < first + n; i++)
		assert_int_equal(gguf_writer_add_tensor(w, model_t[i].name, model_t[i].type,
							model_t[i].n_dims, model_t[i].ne),
				 0);
	if (dup)
		assert_int_equal(gguf_writer_add_tensor(w, model_t[0].name, model_t[0].type,
							model_t[0].n_dims, model_t[0].ne),
				 0);
	assert_int_equal(gguf_writer_open(w, path), 0);
	for (int i = first; i < first + n + (dup ? 1 : 0); i++) {
		int k = i < first + n ? i : 0;
		uint64_t nb = model_bytes(k);
		uint8_t *d = malloc(nb);
		assert_non_null(d);
		model_fill(k, d, nb);
		assert_int_equal(gguf_writer_write(w, d, nb), 0);
		free(d);
	}
	assert_int_equal(gguf_writer_commit(w), 0);
	gguf_writer_destroy(&w);
}

/* Shard s of count holds tensors [s * N / count, (s + 1) * N / count). */
static int shard_first(int s, int count)
{
	return s * MODEL_N / count;
}

static void clear_split_dir(void)
{
	DIR *d = opendir(split_dir);
	assert_non_null(d);
	struct dirent *e;
	char p[320];
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(p, sizeof(p), "%s/%s", split_dir, e->d_name);
		unlink(p);
	}
	closedir(d);
}

static void write_set(int count, const struct set_faults *f)
{
	clear_split_dir();
	for (int s = 0; s < count; s++) {
		char p[256];
		shard_path(p, sizeof(p), s, count);
		if (f->skip == s + 1)
			continue;
		if (f->garbage == s + 1) {
			FILE *fp = fopen(p, "wb");
			assert_non_null(fp);
			fputs("this is not a GGUF file, only text of some length", fp);
			fclose(fp);
			continue;
		}
		int first = shard_first(s, count), n = shard_first(s + 1, count) - first;
		int32_t total = MODEL_N + f->all_total_extra + (f->bad_total == s + 1);
		write_part(p, first, n, s == 0, count, f->bad_no == s + 1 ? (s + 1) % count : s,
			   total, count + (f->bad_count == s + 1), f->dup == s + 1);
	}
}

static uint64_t file_size(const char *path)
{
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	return (uint64_t)st.st_size;
}

/* Every tensor of a equals b's of the same name: type, shape, bytes. */
static void assert_same_tensors(const gguf *a, const gguf *b)
{
	assert_int_equal(gguf_n_tensors(a), gguf_n_tensors(b));
	for (uint64_t i = 0; i < gguf_n_tensors(a); i++) {
		const gguf_tensor *x = gguf_tensor_at(a, i);
		const gguf_tensor *y = gguf_find_tensor(b, x->name);
		assert_non_null(y);
		assert_int_equal(x->type, y->type);
		assert_int_equal(x->n_dims, y->n_dims);
		assert_memory_equal(x->ne, y->ne, sizeof(x->ne));
		assert_int_equal(x->n_bytes, y->n_bytes);
		assert_memory_equal(x->data, y->data, x->n_bytes);
	}
}

static void test_split_opens_as_one(void **state)
{
	(void)state;
	char single[256];
	snprintf(single, sizeof(single), "%s/single.gguf", split_dir);
	for (int count = 1; count <= 4; count++) {
		const struct set_faults none = {0};
		write_set(count, &none);
		write_part(single, 0, MODEL_N, 1, 0, 0, 0, 0, 0);
		gguf *one = NULL, *g = NULL;
		assert_int_equal(gguf_open(single, &one), 0);
		char first[256];
		shard_path(first, sizeof(first), 0, count);
		assert_int_equal(gguf_open(first, &g), 0);
		assert_string_equal(gguf_path(g), first);
		assert_int_equal(gguf_n_shards(g), count);
		assert_int_equal(gguf_n_shards(one), 1);
		assert_same_tensors(one, g);
		/* each tensor's data lie in the file of the shard it names */
		uint64_t sum = 0;
		for (int s = 0; s < count; s++) {
			char p[256];
			shard_path(p, sizeof(p), s, count);
			assert_string_equal(gguf_shard_path(g, (uint32_t)s), p);
			assert_int_equal(gguf_shard_size(g, (uint32_t)s), file_size(p));
			assert_int_equal(gguf_shard_n_tensors(g, (uint32_t)s),
					 shard_first(s + 1, count) - shard_first(s, count));
			sum += file_size(p);
		}
		assert_null(gguf_shard_path(g, (uint32_t)count));
		assert_int_equal(gguf_file_size(g), sum);
		for (int i = 0; i < MODEL_N; i++) {
			const gguf_tensor *t = gguf_find_tensor(g, model_t[i].name);
			int s = 0;
			while (s + 1 < count && shard_first(s + 1, count) <= i)
				s++;
			assert_int_equal(t->shard, s);
		}
		/* the model keys come from the first shard */
		char arch[16];
		assert_int_equal(gguf_get_cstr(g, "general.architecture", arch, sizeof(arch)), 0);
		assert_string_equal(arch, "test");
		uint16_t v;
		assert_int_equal(gguf_get_u16(g, "split.count", &v), 0);
		assert_int_equal(v, count);
		/* a writer's copy of the keys leaves the split keys out: the merged
		 * model written as one file is the single file byte for byte */
		char merged[256];
		snprintf(merged, sizeof(merged), "%s/merged.gguf", split_dir);
		gguf_writer *w = NULL;
		assert_int_equal(gguf_writer_new(&w), 0);
		assert_int_equal(gguf_writer_copy_all_kv(w, g), 0);
		for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
			const gguf_tensor *t = gguf_tensor_at(g, i);
			assert_int_equal(
			    gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), 0);
		}
		assert_int_equal(gguf_writer_open(w, merged), 0);
		for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
			const gguf_tensor *t = gguf_tensor_at(g, i);
			assert_int_equal(gguf_writer_write(w, t->data, t->n_bytes), 0);
		}
		assert_int_equal(gguf_writer_commit(w), 0);
		gguf_writer_destroy(&w);
		FILE *fa = fopen(single, "rb"), *fb = fopen(merged, "rb");
		uint64_t na = file_size(single);
		assert_int_equal(file_size(merged), na);
		uint8_t *ba = malloc(na), *bb = malloc(na);
		assert_int_equal(fread(ba, 1, na, fa), na);
		assert_int_equal(fread(bb, 1, na, fb), na);
		assert_memory_equal(ba, bb, na);
		free(ba);
		free(bb);
		fclose(fa);
		fclose(fb);
		gguf_destroy(&g);
		gguf_destroy(&one);
	}
}

static void test_split_errors(void **state)
{
	(void)state;
	char p1[256], p2[256], p3[256], want[512];
	shard_path(p1, sizeof(p1), 0, 3);
	shard_path(p2, sizeof(p2), 1, 3);
	shard_path(p3, sizeof(p3), 2, 3);
	static const struct {
		struct set_faults f;
		int open_shard; /* which shard to give (from 0) */
		int rc;
		int path; /* 1, 2, 3: the message names this shard's path */
		const char *want;
	} cases[] = {
	    {{.skip = 2}, 0, ERR_IO, 2, "shard 2 of 3 is missing: "},
	    {{.skip = 3}, 0, ERR_IO, 3, "shard 3 of 3 is missing: "},
	    {{.garbage = 3}, 0, ERR_FORMAT, 3, "not a GGUF file"},
	    {{.bad_no = 3}, 0, ERR_FORMAT, 3, "split.no is 0, but this name is shard 3 of 3"},
	    {{.bad_no = 2}, 0, ERR_FORMAT, 2, "split.no is 2, but this name is shard 2 of 3"},
	    {{.bad_count = 2}, 0, ERR_FORMAT, 2, "split.count is 4, but the first shard"},
	    {{.bad_total = 3}, 0, ERR_FORMAT, 3, "split.tensors.count is 8, but the first shard"},
	    {{.all_total_extra = 1},
	     0,
	     ERR_FORMAT,
	     1,
	     "split.tensors.count is 8, but the 3 shards "
	     "hold 7 tensors"},
	    {{.all_total_extra = -1},
	     0,
	     ERR_FORMAT,
	     1,
	     "split.tensors.count is 6, but the 3 "
	     "shards hold 7 tensors"},
	    {{.dup = 3}, 0, ERR_FORMAT, 3, "duplicate tensor token_embd.weight"},
	    {{.dup = 2}, 0, ERR_FORMAT, 2, "duplicate tensor token_embd.weight"},
	    {{0}, 1, ERR_CONFIG, 2, "this is shard 2 of 3 of a split model; open the first shard"},
	    {{0}, 2, ERR_CONFIG, 3, "this is shard 3 of 3 of a split model; open the first shard"},
	    /* the first shard's count decides which names are looked for */
	    {{.bad_count = 1},
	     0,
	     ERR_FORMAT,
	     1,
	     "first shard of 4, but the name does not end in "
	     "-00001-of-00004.gguf"},
	};
	const char *paths[3] = {p1, p2, p3};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		write_set(3, &cases[i].f);
		gguf *g = NULL;
		char msg[2048];
		int rc = open_capture(paths[cases[i].open_shard], &g, msg, sizeof(msg));
		if (rc != cases[i].rc)
			fail_msg("case %zu: rc %d, expected %d (%s)", i, rc, cases[i].rc, msg);
		assert_null(g);
		assert_contains(msg, paths[cases[i].path - 1]);
		assert_contains(msg, cases[i].want);
		/* one line */
		assert_non_null(strchr(msg, '\n'));
		assert_int_equal(strchr(msg, '\n')[1], 0);
	}
	/* another shard given: the message names the first */
	const struct set_faults none = {0};
	write_set(3, &none);
	gguf *g = NULL;
	char msg[2048];
	assert_int_equal(open_capture(p3, &g, msg, sizeof(msg)), ERR_CONFIG);
	snprintf(want, sizeof(want), "open the first shard, %s", p1);
	assert_contains(msg, want);
	/* the first shard under a name that does not say so */
	char other[256];
	snprintf(other, sizeof(other), "%s/renamed.gguf", split_dir);
	assert_int_equal(rename(p1, other), 0);
	assert_int_equal(open_capture(other, &g, msg, sizeof(msg)), ERR_FORMAT);
	assert_contains(msg, "does not end in -00001-of-00003.gguf");
	/* one shard of several cannot be opened from memory, one of one can */
	FILE *f = fopen(other, "rb");
	uint64_t n = file_size(other);
	uint8_t *b = malloc(n);
	assert_int_equal(fread(b, 1, n, f), n);
	fclose(f);
	assert_int_equal(gguf_open_memory("shard", b, n, &g), ERR_FORMAT);
	free(b);
	write_set(1, &none);
	shard_path(p1, sizeof(p1), 0, 1);
	f = fopen(p1, "rb");
	n = file_size(p1);
	b = malloc(n);
	assert_int_equal(fread(b, 1, n, f), n);
	fclose(f);
	assert_int_equal(gguf_open_memory("shard", b, n, &g), 0);
	assert_int_equal(gguf_n_tensors(g), MODEL_N);
	gguf_destroy(&g);
	free(b);
}

/* The split keys of one file: types, split.no below split.count, a total
 * not below the file's own tensors. */
static void test_split_keys_checked(void **state)
{
	(void)state;
	char p[256];
	snprintf(p, sizeof(p), "%s/keys.gguf", split_dir);
	static const struct {
		int kind;
		const char *want;
	} cases[] = {
	    {0, "key split.count has type u32, expected u16"},
	    {1, "split.no is 2, but split.count is 2"},
	    {2, "split.count is 0"},
	    {3, "split.tensors.count is 3, fewer than the 7 tensors"},
	    {4, "split.tensors.count is 9, but the file holds 7 tensors"},
	    {5, "split.count is 2 but there is no split.no key"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		clear_split_dir();
		gguf_writer *w = NULL;
		assert_int_equal(gguf_writer_new(&w), 0);
		switch (cases[i].kind) {
		case 0: assert_int_equal(gguf_writer_set_u32(w, "split.count", 2), 0); break;
		case 1: assert_int_equal(gguf_writer_set_split(w, 2, 2, MODEL_N), 0); break;
		case 2: assert_int_equal(gguf_writer_set_split(w, 0, 0, MODEL_N), 0); break;
		case 3: assert_int_equal(gguf_writer_set_split(w, 0, 2, 3), 0); break;
		case 4: assert_int_equal(gguf_writer_set_split(w, 0, 1, MODEL_N + 2), 0); break;
		case 5: assert_int_equal(gguf_writer_set_u16(w, "split.count", 2), 0); break;
		}
		for (int t = 0; t < MODEL_N; t++)
			assert_int_equal(gguf_writer_add_tensor(w, model_t[t].name, model_t[t].type,
								model_t[t].n_dims, model_t[t].ne),
					 0);
		assert_int_equal(gguf_writer_open(w, p), 0);
		for (int t = 0; t < MODEL_N; t++) {
			uint64_t nb = model_bytes(t);
			uint8_t *d = calloc(1, nb);
			assert_int_equal(gguf_writer_write(w, d, nb), 0);
			free(d);
		}
		assert_int_equal(gguf_writer_commit(w), 0);
		gguf_writer_destroy(&w);
		gguf *g = NULL;
		char msg[1024];
		assert_int_equal(open_capture(p, &g, msg, sizeof(msg)), ERR_FORMAT);
		assert_contains(msg, p);
		assert_contains(msg, cases[i].want);
	}
}

/* Random bytes flipped in the shards after the first: the set opens or
 * fails, never crashes, and an opened set's tensors are all readable. */
static void test_split_random_bytes_do_not_crash(void **state)
{
	(void)state;
	const struct set_faults none = {0};
	write_set(3, &none);
	char p[3][256];
	uint8_t *orig[3];
	uint64_t n[3];
	for (int s = 0; s < 3; s++) {
		shard_path(p[s], sizeof(p[s]), s, 3);
		n[s] = file_size(p[s]);
		orig[s] = malloc(n[s]);
		FILE *f = fopen(p[s], "rb");
		assert_int_equal(fread(orig[s], 1, n[s], f), n[s]);
		fclose(f);
	}
	uint64_t r = 7;
	int opened = 0;
	for (int it = 0; it < 400; it++) {
		int s = 1 + it % 2;
		uint8_t *c = malloc(n[s]);
		memcpy(c, orig[s], n[s]);
		for (int k = 0; k < 2; k++) {
			r = r * 6364136223846793005ULL + 1442695040888963407ULL;
			c[(r >> 33) % n[s]] ^= (uint8_t)(r >> 20);
		}
		FILE *f = fopen(p[s], "wb");
		assert_int_equal(fwrite(c, 1, n[s], f), n[s]);
		fclose(f);
		free(c);
		gguf *g = NULL;
		if (gguf_open(p[0], &g) == 0) {
			opened++;
			for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
				const gguf_tensor *t = gguf_tensor_at(g, i);
				assert_true(t->shard < 3);
				volatile uint8_t sink = 0;
				for (uint64_t j = 0; j < t->n_bytes; j++)
					sink ^= ((const uint8_t *)t->data)[j];
				(void)sink;
			}
			gguf_destroy(&g);
		}
		f = fopen(p[s], "wb");
		assert_int_equal(fwrite(orig[s], 1, n[s], f), n[s]);
		fclose(f);
	}
	print_message("# %d of 400 corrupted sets still opened (flips in tensor data)\n", opened);
	for (int s = 0; s < 3; s++)
		free(orig[s]);
}

int main(void)
{
	snprintf(tmp_path, sizeof(tmp_path), "/tmp/moefleet-test-gguf-%d.gguf", (int)getpid());
	/* in memory when possible: the writer fsyncs every file it commits */
	snprintf(split_dir, sizeof(split_dir), "%s/moefleet-test-gguf-XXXXXX",
		 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
	if (!mkdtemp(split_dir)) {
		perror("mkdtemp");
		return 1;
	}
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_roundtrip),
	    cmocka_unit_test(test_every_truncation_fails),
	    cmocka_unit_test(test_corruptions_fail),
	    cmocka_unit_test(test_random_bytes_do_not_crash),
	    cmocka_unit_test(test_type_errors_name_the_type),
	    cmocka_unit_test(test_split_opens_as_one),
	    cmocka_unit_test(test_split_errors),
	    cmocka_unit_test(test_split_keys_checked),
	    cmocka_unit_test(test_split_random_bytes_do_not_crash),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	unlink(tmp_path);
	clear_split_dir();
	rmdir(split_dir);
	return rc;
}
