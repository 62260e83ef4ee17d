/* quantize: routed experts to another type, everything else copied (see quantize.h). */
#include "quantize.h"
#include "../../common/err.h"
#include "../../common/gguf.h"
#include "../../common/gguf_write.h"
#include "../../common/log.h"
#include "../../common/pool.h"
#include "../../kernels/kern.h"
#include "../../kernels/quant.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

_Static_assert((int)QUANT_ERR_UNSUPPORTED == (int)ERR_CONFIG, "quant_row fails with ERR_CONFIG");

/* Output bytes converted per pool run: large enough to keep threads busy,
 * small enough to bound memory. */
#define QZ_CHUNK_BYTES (8u << 20)
#define QZ_MAX_THREADS 256

int quantize_parse_type(const char *name, uint32_t *out)
{
	static const struct {
		const char *name;
		uint32_t type;
	} names[] = {{"mxfp4", KERN_MXFP4}, {"q8_0", KERN_Q8_0}, {"q4_0", KERN_Q4_0}};
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcasecmp(name, names[i].name) == 0) {
			*out = names[i].type;
			return 0;
		}
	}
	return ERR_CONFIG;
}

int quantize_is_expert(const char *name)
{
	return strstr(name, "_exps.weight") != NULL;
}

/* One pool run: rows [row0, row0 + n_rows) of a tensor into dst. */
struct qz_job {
	const uint8_t *src;
	uint32_t src_type, dst_type;
	int64_t ne0;
	size_t src_row, dst_row;
	int64_t row0, n_rows;
	uint8_t *dst;
	float *scratch;	  /* nth rows of ne0 floats */
	int64_t *bad_row; /* per thread: first row holding a non-finite value, or -1 */
	int64_t *bad_col;
};

static void qz_run(void *ctx, int ith, int nth)
{
	struct qz_job *j = ctx;
	int64_t lo, hi;
	pool_split(j->n_rows, ith, nth, 1, &lo, &hi);
	float *x = j->scratch + (size_t)ith * (size_t)j->ne0;
	j->bad_row[ith] = -1;
	for (int64_t r = lo; r < hi; r++) {
		int64_t row = j->row0 + r;
		kern_dequant_row_ref(j->src_type, j->src + (size_t)row * j->src_row, x, j->ne0);
		int64_t bad = quant_row_finite(x, j->ne0);
		if (bad >= 0) {
			j->bad_row[ith] = row;
			j->bad_col[ith] = bad;
			return;
		}
		quant_row(j->dst_type, x, j->dst + (size_t)r * j->dst_row, j->ne0);
	}
}

/* Converts tensor t to dst_type and appends it to w. */
static int qz_convert_tensor(const char *in, const gguf_tensor *t, uint32_t dst_type, pool *p,
			     gguf_writer *w)
{
	int rc = 0;
	int nth = pool_size(p);
	int64_t ne0 = (int64_t)t->ne[0];
	int64_t n_rows = (int64_t)(t->n_bytes / kern_row_bytes(t->type, ne0));
	struct qz_job j = {
	    .src = t->data,
	    .src_type = t->type,
	    .dst_type = dst_type,
	    .ne0 = ne0,
	    .src_row = kern_row_bytes(t->type, ne0),
	    .dst_row = kern_row_bytes(dst_type, ne0),
	};
	int64_t chunk = (int64_t)(QZ_CHUNK_BYTES / j.dst_row);
	if (chunk < 1)
		chunk = 1;
	if (chunk > n_rows)
		chunk = n_rows;
	j.dst = malloc((size_t)chunk * j.dst_row);
	j.scratch = malloc((size_t)nth * (size_t)ne0 * sizeof(float));
	j.bad_row = malloc((size_t)nth * sizeof(int64_t));
	j.bad_col = malloc((size_t)nth * sizeof(int64_t));
	if (!j.dst || !j.scratch || !j.bad_row || !j.bad_col) {
		log_error("%s: tensor %s: out of memory", in, t->name);
		rc = ERR_NOMEM;
		goto out;
	}
	for (j.row0 = 0; j.row0 < n_rows; j.row0 += j.n_rows) {
		j.n_rows = n_rows - j.row0 < chunk ? n_rows - j.row0 : chunk;
		pool_run(p, qz_run, &j);
		for (int i = 0; i < nth; i++) {
			if (j.bad_row[i] >= 0) {
				log_error("%s: tensor %s: row %lld, column %lld is not a finite "
					  "number",
					  in, t->name, (long long)j.bad_row[i],
					  (long long)j.bad_col[i]);
				rc = ERR_FORMAT;
				goto out;
			}
		}
		rc = gguf_writer_write(w, j.dst, (size_t)j.n_rows * j.dst_row);
		if (rc)
			goto out;
	}
out:
	free(j.dst);
	free(j.scratch);
	free(j.bad_row);
	free(j.bad_col);
	return rc;
}

static double qz_mib(uint64_t n)
{
	return (double)n / 1048576.0;
}

int quantize_file(const char *in, const char *out, uint32_t expert_type)
{
	int rc = 0;
	gguf *g = NULL;
	gguf_writer *w = NULL;
	pool *p = NULL;
	uint32_t *types = NULL;
	if (expert_type != KERN_MXFP4 && expert_type != KERN_Q8_0 && expert_type != KERN_Q4_0) {
		log_error("quantize: experts cannot be converted to %s (type %u); use MXFP4, "
			  "Q8_0 or Q4_0",
			  kern_type_name(expert_type), expert_type);
		return ERR_CONFIG;
	}
	rc = gguf_open(in, &g);
	if (rc)
		goto out;
	uint64_t n_t = gguf_n_tensors(g);
	types = malloc((n_t ? n_t : 1) * sizeof(*types));
	if (!types) {
		rc = ERR_NOMEM;
		goto out;
	}
	/* decide every tensor's output type, and check, before writing anything */
	uint64_t n_experts = 0, n_convert = 0, bytes_before = 0, bytes_after = 0;
	for (uint64_t i = 0; i < n_t; i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		types[i] = t->type;
		if (!quantize_is_expert(t->name))
			continue;
		n_experts++;
		if (t->type == expert_type)
			continue;
		if (t->ne[0] % KERN_QK != 0) {
			log_error("%s: tensor %s: row length %llu is not a multiple of %d, so it "
				  "cannot be stored as %s",
				  in, t->name, (unsigned long long)t->ne[0], KERN_QK,
				  kern_type_name(expert_type));
			rc = ERR_FORMAT;
			goto out;
		}
		types[i] = expert_type;
		n_convert++;
	}
	if (n_experts == 0)
		log_warn("%s: no routed-expert tensors (names containing \"_exps.weight\"); "
			 "writing an unchanged copy",
			 in);
	else if (n_convert == 0)
		log_info("%s: all %llu expert tensors are already %s; writing an unchanged copy",
			 in, (unsigned long long)n_experts, kern_type_name(expert_type));

	rc = gguf_writer_new(&w);
	if (rc)
		goto out;
	rc = gguf_writer_copy_all_kv(w, g);
	for (uint64_t i = 0; i < n_t && !rc; i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		rc = gguf_writer_add_tensor(w, t->name, types[i], t->n_dims, t->ne);
	}
	if (rc)
		goto out;
	if (n_convert) {
		kern_init();
		rc = pool_new(0, &p);
		if (rc) {
			log_error("quantize: cannot start worker threads");
			goto out;
		}
	}
	rc = gguf_writer_open(w, out);
	if (rc)
		goto out;
	log_info("%s -> %s: %llu tensors, %llu routed-expert tensors to convert to %s", in, out,
		 (unsigned long long)n_t, (unsigned long long)n_convert,
		 kern_type_name(expert_type));
	uint64_t done = 0;
	for (uint64_t i = 0; i < n_t; i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		if (types[i] == t->type) {
			rc = gguf_writer_write(w, t->data, (size_t)t->n_bytes);
			if (rc)
				goto out;
			continue;
		}
		rc = qz_convert_tensor(in, t, types[i], p, w);
		if (rc)
			goto out;
		uint64_t after = kern_row_bytes(types[i], (int64_t)t->ne[0]) *
				 (t->n_bytes / kern_row_bytes(t->type, (int64_t)t->ne[0]));
		bytes_before += t->n_bytes;
		bytes_after += after;
		done++;
		log_info("[%llu/%llu] %s: %s -> %s (%.2f -> %.2f MiB)", (unsigned long long)done,
			 (unsigned long long)n_convert, t->name, kern_type_name(t->type),
			 kern_type_name(types[i]), qz_mib(t->n_bytes), qz_mib(after));
	}
	rc = gguf_writer_commit(w);
	if (rc)
		goto out;
	log_info("%s: written; routed experts %.2f MiB -> %.2f MiB", out, qz_mib(bytes_before),
		 qz_mib(bytes_after));
out:
	gguf_writer_destroy(&w); /* removes OUT.tmp unless committed */
	pool_destroy(&p);
	gguf_destroy(&g);
	free(types);
	return rc;
}
