/* attn: causal attention over an F16 KV cache, with llama.cpp's CPU
 * flash-attention numerics (ggml/src/ggml-cpu/ops.cpp,
 * ggml_compute_forward_flash_attn_ext_f16 and its two row kernels).
 *
 * Cache layout: k[layer][seq][slot][k_width] and v[layer][seq][slot][v_width],
 * uint16_t IEEE halves, allocated once, each layer cap[layer] slots per
 * sequence (n_ctx, or a ring: position j in slot j % cap); or, when every value
 * is the start of its key (deepseek2's MLA), no v at all: values are read from
 * the keys.  A query at position p of
 * sequence s reads positions j0..p of s in increasing order (j0 = 0, or p - window + 1 with a
 * sliding window), which is the order llama.cpp visits the cells of a single-sequence cache.
 * Positions of one sequence are written before they are read (model.c keeps them consecutive), so
 * resetting a slot needs no work.
 *
 * What each path rounds (see attn.h for when each is used):
 *   one-row path  q -> F16; s = ggml_vec_dot_f16(q16, k) (attn_dot_f16) * scale;
 *                 online softmax per key: a new maximum rescales the F16
 *                 accumulator (acc = f16(acc * ms)), then
 *                 acc = f16(fma(v, vs, acc)); S = S * ms + vs (two roundings:
 *                 GCC does not fuse it in ggml's kernel).
 *   split decode  the one-row path on each half of llama.cpp's cache view,
 *                 then per half: M' = max(M, m), acc = fma(acc, e^(M-M'),
 *                 part * e^(m-M')), S likewise.
 *   tiled path    per tile of 64 positions: s = fma chain over d of q[d]*k[d]
 *                 (F32 query), s *= scale; M' = max(M, tile max); a new
 *                 maximum rescales the F32 accumulator and S by expf(M - M');
 *                 e = vexpf(s - M'), S += sum e (lane groups added as
 *                 ggml_vec_soft_max_f32 does); acc[d] = fma chain over the tile
 *                 of e*v[d].
 *   all           acc -> F32; a sink logit t joins: if t > M the accumulator
 *                 and S are scaled by expf(M - t), else S += expf(t - M);
 *                 out = acc * (1 / S).
 * The fused multiply-adds are where GCC contracts ggml's C++ (or where ggml
 * uses FMA intrinsics); checked against a local ggml build, see attn.h.
 *
 * The KV hosts' side of the sharded numerics and attn_forward()'s path with
 * hosts are in attn_host.c, attention over gathered keys in attn_gather.c;
 * what the files share is in attn_internal.h. */
#include "attn.h"
#include "attn_internal.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

/* ------------------------------------------------------------ f16 helpers */

float attn_f16_table[65536];
static pthread_once_t attn_f16_once = PTHREAD_ONCE_INIT;

static void attn_f16_table_init(void)
{
	for (uint32_t h = 0; h < 65536; h++)
		attn_f16_table[h] = kern_f16_to_f32((uint16_t)h);
}

void attn_f16_init(void)
{
	pthread_once(&attn_f16_once, attn_f16_table_init);
}

/* ------------------------------------------------------------------ cache */

/* Slots per sequence of layer l: n_ctx, or ring[l] when 0 < ring[l] < n_ctx. */
static int attn_ring_cap(const int *ring, int l, int n_ctx)
{
	return ring && ring[l] > 0 && ring[l] < n_ctx ? ring[l] : n_ctx;
}

static int attn_cache_make(int n_layer, int n_seq, int n_ctx, int k_width, int v_width, int v_in_k,
			   const int *ring, attn_cache **out)
{
	int rc = 0;
	attn_cache *c = NULL;
	*out = NULL;
	for (int l = 0; ring && n_layer > 0 && l < n_layer; l++)
		if (ring[l] < 0) {
			log_error("attn: layer %d: negative ring size %d", l, ring[l]);
			return ERR_CONFIG;
		}
	if (n_layer <= 0 || n_seq <= 0 || n_ctx <= 0 || k_width <= 0 || v_width <= 0 ||
	    (v_in_k && v_width > k_width)) {
		log_error("attn: invalid KV cache shape (layers %d, sequences %d, positions %d, "
			  "widths %d/%d)",
			  n_layer, n_seq, n_ctx, k_width, v_width);
		return ERR_CONFIG;
	}
	/* entries = n_layer * n_seq * n_ctx; every product checked for overflow */
	const size_t max_entries =
	    SIZE_MAX / sizeof(uint16_t) / (size_t)(k_width > v_width ? k_width : v_width);
	size_t entries = (size_t)n_layer;
	if (entries > max_entries / (size_t)n_seq ||
	    entries * (size_t)n_seq > max_entries / (size_t)n_ctx) {
		log_error("attn: KV cache of %d layers x %d sequences x %d positions x %d+%d "
			  "values is too large",
			  n_layer, n_seq, n_ctx, k_width, v_width);
		return ERR_NOMEM;
	}
	/* at most n_layer * n_seq * n_ctx: rings are shorter than the context */
	entries = 0;
	for (int l = 0; l < n_layer; l++)
		entries += (size_t)n_seq * (size_t)attn_ring_cap(ring, l, n_ctx);
	const size_t bytes_k = entries * (size_t)k_width * sizeof(uint16_t);
	const size_t bytes_v = v_in_k ? 0 : entries * (size_t)v_width * sizeof(uint16_t);

	attn_f16_init();

	c = calloc(1, sizeof(*c));
	if (!c) {
		rc = ERR_NOMEM;
		goto out;
	}
	c->n_layer = n_layer;
	c->n_seq = n_seq;
	c->n_ctx = n_ctx;
	c->k_width = k_width;
	c->v_width = v_width;
	c->v_stride = v_in_k ? k_width : v_width;
	c->cap = calloc((size_t)n_layer, sizeof(*c->cap));
	c->off = calloc((size_t)n_layer, sizeof(*c->off));
	c->slides = calloc((size_t)n_layer, 1);
	if (!c->cap || !c->off || !c->slides) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (int l = 0; l < n_layer; l++) {
		c->cap[l] = attn_ring_cap(ring, l, n_ctx);
		c->slides[l] = ring && ring[l] > 0;
		c->off[l] = l ? c->off[l - 1] + (size_t)n_seq * (size_t)c->cap[l - 1] : 0;
	}
	/* calloc: positions never stored read as +0, never garbage */
	c->k = calloc(1, bytes_k);
	c->v = v_in_k ? c->k : calloc(1, bytes_v);
	c->seq_tokens = calloc(2 * (size_t)n_seq, sizeof(int32_t));
	c->seq_last = c->seq_tokens ? c->seq_tokens + n_seq : NULL;
	c->kvf = calloc(ATTN_KVF_SLOTS, sizeof(*c->kvf)); /* buffers grow when used */
	if (!c->k || !c->v || !c->seq_tokens || !c->kvf)
		rc = ERR_NOMEM;
out:
	if (rc) {
		log_error("attn: cannot allocate the KV cache (%zu + %zu bytes)", bytes_k, bytes_v);
		attn_cache_destroy(&c);
	}
	*out = c;
	return rc;
}

int attn_cache_new(int n_layer, int n_seq, int n_ctx, int k_width, int v_width, attn_cache **out)
{
	return attn_cache_make(n_layer, n_seq, n_ctx, k_width, v_width, 0, NULL, out);
}

int attn_cache_new_ring(int n_layer, int n_seq, int n_ctx, int k_width, int v_width,
			const int *ring, attn_cache **out)
{
	return attn_cache_make(n_layer, n_seq, n_ctx, k_width, v_width, 0, ring, out);
}

int attn_cache_new_shared(int n_layer, int n_seq, int n_ctx, int k_width, int v_width,
			  attn_cache **out)
{
	return attn_cache_make(n_layer, n_seq, n_ctx, k_width, v_width, 1, NULL, out);
}

void attn_cache_destroy(attn_cache **c)
{
	if (!c || !*c)
		return;
	if ((*c)->v != (*c)->k)
		free((*c)->v);
	free((*c)->k);
	free((*c)->seq_tokens);
	free((*c)->shipped);
	free((*c)->cap);
	free((*c)->off);
	free((*c)->slides);
	if ((*c)->kvf)
		for (int i = 0; i < ATTN_KVF_SLOTS; i++) {
			free((*c)->kvf[i].kt);
			free((*c)->kvf[i].v);
			free((*c)->kvf[i].tile);
		}
	free((*c)->kvf);
	if ((*c)->own)
		free((*c)->own->p);
	free((*c)->own);
	free(*c);
	*c = NULL;
}

void attn_cache_reset_seq(attn_cache *c, int seq)
{
	/* Nothing to clear: a query only reads positions its sequence has
	 * stored since the reset (positions restart at 0 and are consecutive;
	 * a ring's slot j % cap holds position j once j is stored). */
	assert(seq >= 0 && seq < c->n_seq);
	attn_remote_forget(c->shipped, c->n_layer, c->n_seq, seq, c->remote, c->remote_self);
}

void attn_cache_store(attn_cache *c, int layer, int seq, int pos, const float *k, const float *v)
{
	assert(layer >= 0 && layer < c->n_layer && seq >= 0 && seq < c->n_seq && pos >= 0 &&
	       pos < c->n_ctx);
	size_t e = attn_entry(c, layer, seq, pos);
	uint16_t *kd = c->k + e * (size_t)c->k_width;
	for (int i = 0; i < c->k_width; i++)
		kd[i] = kern_f32_to_f16(k[i]);
	if (c->v == c->k) /* the values are the keys' first v_width */
		return;
	uint16_t *vd = c->v + e * (size_t)c->v_stride;
	for (int i = 0; i < c->v_width; i++)
		vd[i] = kern_f32_to_f16(v[i]);
}

int attn_cache_set_shards(attn_cache *c, int n_shard, int page)
{
	if (n_shard < 0 || n_shard > (1 << (ATTN_SHARD_LEVELS - 1)) ||
	    (n_shard & (n_shard - 1)) != 0) {
		log_error("attn: %d KV shards: not a power of two from 1 to %d (or 0: off)",
			  n_shard, 1 << (ATTN_SHARD_LEVELS - 1));
		return ERR_CONFIG;
	}
	if (n_shard > 0 && (page <= 0 || page % ATTN_TILE_KV != 0)) {
		log_error("attn: KV page of %d positions: not a positive multiple of %d", page,
			  ATTN_TILE_KV);
		return ERR_CONFIG;
	}
	c->n_shard = n_shard;
	c->page = n_shard > 0 ? page : 0;
	return 0;
}

int attn_check_params(const attn_cache *c, const struct attn_params *ap, const char *what)
{
	if (ap->n_head <= 0 || ap->n_head_kv <= 0 || ap->n_head % ap->n_head_kv != 0) {
		log_error("%s: attention: %d query heads are not a multiple of %d KV heads", what,
			  ap->n_head, ap->n_head_kv);
		return ERR_FORMAT;
	}
	if (ap->head_dim_k <= 0 || ap->head_dim_k > ATTN_MAX_HEAD_DIM || ap->head_dim_v <= 0 ||
	    ap->head_dim_v > ATTN_MAX_HEAD_DIM) {
		log_error("%s: attention: head sizes %d/%d outside 1..%d", what, ap->head_dim_k,
			  ap->head_dim_v, ATTN_MAX_HEAD_DIM);
		return ERR_FORMAT;
	}
	if ((int64_t)ap->n_head_kv * ap->head_dim_k != c->k_width ||
	    (int64_t)ap->n_head_kv * ap->head_dim_v != c->v_width) {
		log_error("%s: attention: %d KV heads of %d/%d values do not match the KV cache "
			  "widths %d/%d",
			  what, ap->n_head_kv, ap->head_dim_k, ap->head_dim_v, c->k_width,
			  c->v_width);
		return ERR_FORMAT;
	}
	if (c->v == c->k && ap->n_head_kv != 1) {
		log_error("%s: attention: values read from the keys need one KV head, not %d", what,
			  ap->n_head_kv);
		return ERR_FORMAT;
	}
	if (ap->window < 0) {
		log_error("%s: attention: negative sliding window %d", what, ap->window);
		return ERR_FORMAT;
	}
	if (!isfinite(ap->scale)) {
		log_error("%s: attention: scale is not finite", what);
		return ERR_FORMAT;
	}
	return 0;
}

int attn_check_layer(const attn_cache *c, int layer, const struct attn_params *ap, const char *what)
{
	int rc = attn_check_params(c, ap, what);
	if (rc)
		return rc;
	if (layer < 0 || layer >= c->n_layer) {
		log_error("%s: attention: layer %d outside the KV cache's %d", what, layer,
			  c->n_layer);
		return ERR_FORMAT;
	}
	const int cap = c->cap[layer];
	if (cap < c->n_ctx && (ap->window <= 0 || cap < ap->window)) {
		log_error("%s: attention: layer %d keeps a ring of %d positions, which needs a "
			  "sliding window of 1 to %d positions (window %d)",
			  what, layer, cap, cap, ap->window);
		return ERR_FORMAT;
	}
	return 0;
}

/* -------------------------------------------------------------- forward */

/* Thread ith's copies (slots of the cache; threads beyond them go without),
 * emptied; NULL if there are none. */
struct attn_kvf *attn_kvf_get(const attn_cache *c, int ith)
{
	if (!c->kvf || ith >= ATTN_KVF_SLOTS)
		return NULL;
	struct attn_kvf *f = &c->kvf[ith];
	f->kbase = NULL;
	f->n = 0;
	return f;
}

/* Floats of the scratch attn_tile_load() converts a tile into. */
static size_t attn_tile_floats(int dk, int dv)
{
	return (size_t)ATTN_TILE_KV * (2 * (size_t)dk + (size_t)dv);
}

/* The tiled kernel's scratch for converting a tile with the SIMD forms in
 * slot f (attn_tiles), or NULL: no slot, no SIMD forms, sizes that are not
 * multiples of 8, or no memory (the scalar loops then give the same bits). */
float *attn_kvf_tile(struct attn_kvf *f, int dk, int dv)
{
	if (!f || !attn_simd_ok() || dk % 8 || dv % 8)
		return NULL;
	const size_t need = attn_tile_floats(dk, dv);
	if (need > f->cap_tile) {
		float *p = realloc(f->tile, need * sizeof(float));
		if (!p)
			return NULL;
		f->tile = p;
		f->cap_tile = need;
	}
	return f->tile;
}

/* Makes the keys and values of positions [j0, z) of src (slot j % cap)
 * available as F32, from the start of j0's tile on; 0 on success. */
static int attn_kvf_fill(struct attn_kvf *f, const struct attn_src *src, int j0, int z)
{
	const uint16_t *kbase = src->k, *vbase = src->v;
	const int dk = src->dk, dv = src->dv, cap = src->cap;
	const int lo = j0 - j0 % ATTN_TILE_KV;
	if (f->kbase != kbase || lo < f->lo) {
		f->kbase = kbase;
		f->lo = lo;
		f->n = lo;
	}
	if (z <= f->n)
		return 0;
	const int zt = (z + ATTN_TILE_KV - 1) / ATTN_TILE_KV * ATTN_TILE_KV;
	const size_t need_kt = (size_t)(zt - f->lo) * (size_t)dk,
		     need_v = (size_t)(zt - f->lo) * (size_t)dv;
	if (need_kt > f->cap_kt) {
		float *p = realloc(f->kt, need_kt * sizeof(float));
		if (!p)
			return -1;
		f->kt = p;
		f->cap_kt = need_kt;
	}
	if (need_v > f->cap_v) {
		float *p = realloc(f->v, need_v * sizeof(float));
		if (!p)
			return -1;
		f->v = p;
		f->cap_v = need_v;
	}
	for (int j = f->n; j < z; j++) {
		const uint16_t *kj = kbase + (size_t)(j % cap) * src->ks;
		const uint16_t *vj = vbase + (size_t)(j % cap) * src->vs;
		float *tile =
		    f->kt + (size_t)((j - f->lo) / ATTN_TILE_KV) * ATTN_TILE_KV * (size_t)dk;
		const int i = j % ATTN_TILE_KV;
		for (int d = 0; d < dk; d++)
			tile[(size_t)d * ATTN_TILE_KV + (size_t)i] = attn_f16_to_f32(kj[d]);
		for (int d = 0; d < dv; d++)
			f->v[(size_t)(j - f->lo) * (size_t)dv + (size_t)d] = attn_f16_to_f32(vj[d]);
	}
	/* the last tile's lanes past z: zeros (the SIMD scores read whole tiles) */
	float *tile = f->kt + (size_t)((z - f->lo) / ATTN_TILE_KV) * ATTN_TILE_KV * (size_t)dk;
	for (int d = 0; d < dk && z % ATTN_TILE_KV; d++)
		memset(tile + (size_t)d * ATTN_TILE_KV + z % ATTN_TILE_KV, 0,
		       (size_t)(ATTN_TILE_KV - z % ATTN_TILE_KV) * sizeof(float));
	f->n = z;
	return 0;
}

/* The visible key positions [j0, j1) of a query at position pos. */
static inline void attn_visible(const struct attn_params *ap, int pos, int *j0, int *j1)
{
	*j0 = 0;
	if (ap->window > 0 && pos - ap->window + 1 > 0)
		*j0 = pos - ap->window + 1;
	*j1 = pos + 1;
}

/* ggml's one-row kernel (ggml_compute_forward_flash_attn_ext_f16_one_chunk)
 * over the keys [j0, j1) of one (token, head): F16 query, F16 accumulator.
 * Leaves the running max, sum and the accumulator (as F32) in *M, *S, acc. */
ATTN_HOT static void attn_chunk_f16(const struct attn_job *jb, int t, int h, int j0, int j1,
				    float *M, float *S, float *acc)
{
	const attn_cache *c = jb->c;
	const struct attn_params *ap = jb->ap;
	const int dk = ap->head_dim_k;
	const int dv = ap->head_dim_v;
	const int hkv = h / (ap->n_head / ap->n_head_kv);
	float q16[ATTN_MAX_HEAD_DIM];
	const int simd = attn_simd_ok();

	const float *qh = jb->q + ((size_t)t * (size_t)ap->n_head + (size_t)h) * (size_t)dk;
	for (int d = 0; d < dk; d++)
		q16[d] = attn_f16_round(qh[d]);
	memset(acc, 0, (size_t)dv * sizeof(float)); /* F16 values held in floats */

	const size_t e0 = attn_entry(c, jb->layer, jb->b->seq[t], 0);
	const uint16_t *kbase = c->k + e0 * (size_t)c->k_width + (size_t)hkv * (size_t)dk;
	const uint16_t *vbase = c->v + e0 * (size_t)c->v_stride + (size_t)hkv * (size_t)dv;

	*S = 0.0f;
	*M = -INFINITY;
	const int cap = c->cap[jb->layer];
	for (int j = j0, slot = j0 % cap; j < j1; j++, slot = slot + 1 == cap ? 0 : slot + 1) {
		const uint16_t *kj = kbase + (size_t)slot * (size_t)c->k_width;
		const uint16_t *vj = vbase + (size_t)slot * (size_t)c->v_stride;
		const float s = attn_dot_f16(q16, kj, dk, simd) * ap->scale;

		float ms = 1.0f;
		float vs = 1.0f;
		if (s > *M) {
			const float m_old = *M;
			*M = s;
			ms = expf(m_old - *M);
			if (simd)
				attn_simd_scale_f16(acc, ms, dv);
			else
				for (int d = 0; d < dv; d++)
					acc[d] = attn_f16_round(acc[d] * ms);
		} else {
			vs = expf(s - *M);
		}
		if (simd)
			attn_simd_fma_f16(acc, vj, vs, dv);
		else
			for (int d = 0; d < dv; d++)
				acc[d] = attn_f16_round(fmaf(attn_f16_to_f32(vj[d]), vs, acc[d]));
		*S = *S * ms + vs;
	}
}

/* One (token, head) row through the one-row kernel. */
static void attn_row_f16(const struct attn_job *jb, int t, int h)
{
	const struct attn_params *ap = jb->ap;
	float acc[ATTN_MAX_HEAD_DIM];
	float M, S;
	int j0, j1;
	attn_visible(ap, jb->b->pos[t], &j0, &j1);
	attn_chunk_f16(jb, t, h, j0, j1, &M, &S, acc);
	if (ap->sinks)
		attn_add_sink(ap->sinks[h], &M, &S, acc, ap->head_dim_v);
	attn_normalize(S, acc, ap->head_dim_v,
		       jb->out +
			   ((size_t)t * (size_t)ap->n_head + (size_t)h) * (size_t)ap->head_dim_v);
}

/* The KV length llama.cpp's cache presents to a decode step at position pos
 * (llama_kv_cache::get_n_kv: the used cells padded to 256, at least 256). */
static int attn_llama_n_kv(int pos)
{
	return (pos + 1 + ATTN_SPLIT_PAD - 1) / ATTN_SPLIT_PAD * ATTN_SPLIT_PAD;
}

/* A single-token step over at least ATTN_SPLIT_MIN_KV cache cells: ggml splits
 * the cells into ATTN_SPLIT_CHUNKS equal chunks (one per thread), runs the
 * one-row kernel on each (the sink joins the first chunk) and merges the
 * partial results in chunk order (ggml_flash_attn_ext_reduce_partials). */
ATTN_HOT static void attn_row_split(const struct attn_job *jb, int t, int h)
{
	const struct attn_params *ap = jb->ap;
	const int dv = ap->head_dim_v;
	const int n_kv = attn_llama_n_kv(jb->b->pos[t]);
	const int chunk = (n_kv + ATTN_SPLIT_CHUNKS - 1) / ATTN_SPLIT_CHUNKS;
	float acc[ATTN_MAX_HEAD_DIM], part[ATTN_MAX_HEAD_DIM];
	float M = -INFINITY, S = 0.0f;
	int j0, j1;
	attn_visible(ap, jb->b->pos[t], &j0, &j1);
	memset(acc, 0, (size_t)dv * sizeof(float));
	for (int ic = 0; ic < n_kv; ic += chunk) {
		const int a = ic > j0 ? ic : j0;
		const int z = ic + chunk < j1 ? ic + chunk : j1;
		float m_c, s_c;
		attn_chunk_f16(jb, t, h, a, z > a ? z : a, &m_c, &s_c, part);
		if (ap->sinks && ic == 0)
			attn_add_sink(ap->sinks[h], &m_c, &s_c, part, dv);
		attn_fold_chunk(m_c, s_c, part, &M, &S, acc, dv);
	}
	attn_normalize(S, acc, dv,
		       jb->out + ((size_t)t * (size_t)ap->n_head + (size_t)h) * (size_t)dv);
}

void attn_run_init(struct attn_run *r, int ng, int dv)
{
	for (int g = 0; g < ng; g++) {
		r->M[g] = -INFINITY;
		r->S[g] = 0.0f;
	}
	memset(r->acc, 0, (size_t)ng * (size_t)dv * sizeof(float));
}

/* Merges the state b into a, a on the left: per head M' = max(Ma, Mb),
 * acc = fma(acc_a, e^(Ma-M'), acc_b * e^(Mb-M')), S likewise (attn_row_split's
 * formula); an empty side (S = 0) leaves the other as it is. */
void attn_run_merge(struct attn_run *a, const struct attn_run *b, int ng, int dv)
{
	for (int g = 0; g < ng; g++) {
		float *aa = a->acc + (size_t)g * (size_t)dv;
		const float *ba = b->acc + (size_t)g * (size_t)dv;
		if (b->S[g] == 0.0f)
			continue;
		if (a->S[g] == 0.0f) {
			a->M[g] = b->M[g];
			a->S[g] = b->S[g];
			memcpy(aa, ba, (size_t)dv * sizeof(float));
			continue;
		}
		const float m = fmaxf(a->M[g], b->M[g]);
		const float sa = expf(a->M[g] - m), sb = expf(b->M[g] - m);
		for (int d = 0; d < dv; d++)
			aa[d] = fmaf(aa[d], sa, ba[d] * sb);
		a->S[g] = fmaf(a->S[g], sa, b->S[g] * sb);
		a->M[g] = m;
	}
}

/* The sinks (the tiled kernel's way: M is not moved), then out[g] =
 * acc[g] / S[g] for the ng heads (out [ng][dv]). */
void attn_run_finish(struct attn_run *r, int ng, int dv, const float *sinks, float *out)
{
	for (int g = 0; g < ng; g++) {
		float *ag = r->acc + (size_t)g * (size_t)dv;
		if (sinks) {
			float m = r->M[g];
			attn_add_sink(sinks[g], &m, &r->S[g], ag, dv);
		}
		attn_normalize(r->S[g], ag, dv, out + (size_t)g * (size_t)dv);
	}
}

/* Positions [a, z) of the tile starting at ic (ic <= a < z <= ic + T) as F32,
 * with the SIMD forms (dk and dv multiples of 8): the keys transposed at
 * tile ([dk][T]; lanes outside [a, z) are zeros up to the multiple of 8 past
 * z), the values as rows at tile + 2 T dk (row j - ic). */
static void attn_tile_load(const struct attn_src *src, int ic, int a, int z, float *tile)
{
	enum { T = ATTN_TILE_KV };
	const size_t dk = (size_t)src->dk, dv = (size_t)src->dv;
	float *rows = tile + T * dk, *vr = rows + T * dk;
	const int nv8 = (z - ic + 7) & ~7;
	for (int i = 0; i < nv8; i++) {
		const int j = ic + i;
		if (j < a || j >= z) {
			memset(rows + (size_t)i * dk, 0, dk * sizeof(float));
			continue;
		}
		const size_t slot = (size_t)(j % src->cap);
		attn_simd_f16_row(src->k + slot * src->ks, rows + (size_t)i * dk, src->dk);
		attn_simd_f16_row(src->v + slot * src->vs, vr + (size_t)i * dv, src->dv);
	}
	attn_simd_transpose(rows, nv8, src->dk, tile, T);
}

/* ggml's tiled kernel over the positions [a0, z1) of src for the heads
 * q[ng][dk] (ng <= ATTN_GROUP, one KV head), continuing the states r: F32
 * query and accumulator, one softmax update per tile of ATTN_TILE_KV
 * positions, tiles at multiples of ATTN_TILE_KV.  Each head's arithmetic is
 * exactly what it would be alone; the heads go together so that a key or
 * value converted and loaded once serves all of them.  The keys and values
 * come from kvf (F32 copies of src up to z1 at least), else are converted
 * per tile into tile (attn_tile_floats() floats) with the SIMD forms, else
 * by the scalar loops: the same bits every way. */
ATTN_HOT void attn_tiles(const struct attn_src *src, const struct attn_kvf *kvf, float *tile,
			 int a0, int z1, const float *q, int ng, float scale, struct attn_run *r)
{
	enum { T = ATTN_TILE_KV };
	const int dk = src->dk, dv = src->dv;
	float vrow[ATTN_MAX_HEAD_DIM];
	float kq[ATTN_GROUP][T], sv[ATTN_GROUP][T];
	float kts[ATTN_MAX_HEAD_DIM * T]; /* key tile, [d][i], for the scalar loops */
	int live[ATTN_GROUP];

	for (int ic = a0 - a0 % T; ic < z1; ic += T) {
		/* visible part [a, z) of this tile; the rest scores -inf */
		const int a = ic > a0 ? ic : a0;
		const int z = ic + T < z1 ? ic + T : z1;
		/* F32 keys [d][i] of the tile and value rows of [a, z), or NULL */
		const float *kt = NULL, *vr = NULL;
		int nv8 = T;
		if (kvf) {
			kt = kvf->kt + (size_t)((ic - kvf->lo) / T) * T * (size_t)dk;
			vr = kvf->v + (size_t)(a - kvf->lo) * (size_t)dv;
		} else if (tile) {
			attn_tile_load(src, ic, a, z, tile);
			kt = tile;
			vr = tile + 2 * (size_t)T * (size_t)dk + (size_t)(a - ic) * (size_t)dv;
			nv8 = (z - ic + 7) & ~7;
		}
		/* scores sv[g][j - ic]: one FMA chain over d per key, as ggml;
		 * the keys of the tile are transposed so the chains run side by
		 * side (lanes outside [a, z) are not used) */
		if (kt) {
			attn_simd_scores(kt, T, dk, nv8, q, (size_t)dk, ng, sv[0], T);
		} else {
			for (int j = a; j < z; j++) {
				const uint16_t *kj = src->k + (size_t)(j % src->cap) * src->ks;
				for (int d = 0; d < dk; d++)
					kts[(size_t)d * T + (size_t)(j - ic)] =
					    attn_f16_to_f32(kj[d]);
			}
			for (int g = 0; g < ng; g++) {
				const float *qh = q + (size_t)g * (size_t)dk;
				for (int i = a - ic; i < z - ic; i++)
					sv[g][i] = 0.0f;
				for (int d = 0; d < dk; d++)
					for (int i = a - ic; i < z - ic; i++)
						sv[g][i] =
						    fmaf(qh[d], kts[(size_t)d * T + (size_t)i],
							 sv[g][i]);
			}
		}
		int n_live = 0;
		for (int g = 0; g < ng; g++) {
			float tile_max = -INFINITY;
			for (int i = 0; i < T; i++) {
				const int j = ic + i;
				if (j < a || j >= z) {
					kq[g][i] = -INFINITY;
					continue;
				}
				kq[g][i] = sv[g][i] * scale;
				if (kq[g][i] > tile_max)
					tile_max = kq[g][i];
			}
			if (tile_max == -INFINITY)
				continue; /* the head skips this tile */
			live[n_live++] = g;
			attn_tile_softmax(kq[g], tile_max, &r->M[g], &r->S[g],
					  r->acc + (size_t)g * (size_t)dv, dv);
		}

		/* acc[g][d] += sum_j kq[g][j] * v[j][d], one FMA chain per d in
		 * tile order; masked positions add exact zeros and are skipped */
		if (vr && n_live == ng) {
			attn_simd_values(vr, z - a, dv, kq[0] + (a - ic), T, ng, r->acc);
			continue;
		}
		for (int l = 0; l < n_live; l++) {
			const int g = live[l];
			float *ag = r->acc + (size_t)g * (size_t)dv;
			if (vr) {
				attn_simd_values(vr, z - a, dv, kq[g] + (a - ic), T, 1, ag);
				continue;
			}
			for (int j = a; j < z; j++) {
				const uint16_t *vj = src->v + (size_t)(j % src->cap) * src->vs;
				const float w = kq[g][j - ic];
				for (int d = 0; d < dv; d++)
					vrow[d] = attn_f16_to_f32(vj[d]);
				for (int d = 0; d < dv; d++)
					ag[d] = fmaf(w, vrow[d], ag[d]);
			}
		}
	}
}

/* Token t's query heads h0.. and the source of their KV head. */
const float *attn_rows_src(const struct attn_job *jb, int t, int h0, struct attn_src *src)
{
	const attn_cache *c = jb->c;
	const struct attn_params *ap = jb->ap;
	const int hkv = h0 / (ap->n_head / ap->n_head_kv);
	const size_t e0 = attn_entry(c, jb->layer, jb->b->seq[t], 0);
	*src = (struct attn_src){
	    .k = c->k + e0 * (size_t)c->k_width + (size_t)hkv * (size_t)ap->head_dim_k,
	    .v = c->v + e0 * (size_t)c->v_stride + (size_t)hkv * (size_t)ap->head_dim_v,
	    .ks = (size_t)c->k_width,
	    .vs = (size_t)c->v_stride,
	    .dk = ap->head_dim_k,
	    .dv = ap->head_dim_v,
	    .cap = c->cap[jb->layer],
	};
	return jb->q + ((size_t)t * (size_t)ap->n_head + (size_t)h0) * (size_t)ap->head_dim_k;
}

float *attn_rows_out(const struct attn_job *jb, int t, int h0)
{
	const struct attn_params *ap = jb->ap;
	return jb->out + ((size_t)t * (size_t)ap->n_head + (size_t)h0) * (size_t)ap->head_dim_v;
}

/* Heads h0 .. h0 + ng - 1 (one KV head) of token t through ggml's tiled
 * kernel over all their visible keys (tiles start at 0); kvf: the thread's F32
 * copies, filled here (NULL, or failing: tile, as attn_tiles). */
ATTN_HOT static void attn_rows_tiled(const struct attn_job *jb, struct attn_kvf *kvf, float *tile,
				     int t, int h0, int ng)
{
	const struct attn_params *ap = jb->ap;
	struct attn_src src;
	struct attn_run r;
	const float *q = attn_rows_src(jb, t, h0, &src);
	int j0, j1;
	attn_visible(ap, jb->b->pos[t], &j0, &j1);
	attn_run_init(&r, ng, src.dv);
	/* the keys and values as F32, shared with the thread's other rows */
	if (kvf && (!attn_simd_ok() || attn_kvf_fill(kvf, &src, j0, j1) != 0))
		kvf = NULL;
	attn_tiles(&src, kvf, tile, j0, j1, q, ng, ap->scale, &r);
	attn_run_finish(&r, ng, src.dv, ap->sinks ? ap->sinks + h0 : NULL,
			attn_rows_out(jb, t, h0));
}

/* The entry to fill before attn_tree_push(), emptied. */
struct attn_run *attn_tree_next(struct attn_tree *tr, int ng, int dv)
{
	attn_run_init(&tr->st[tr->n], ng, dv);
	return &tr->st[tr->n];
}

void attn_tree_push(struct attn_tree *tr, int level, int ng, int dv)
{
	tr->level[tr->n++] = level;
	while (tr->n >= 2 && tr->level[tr->n - 1] == tr->level[tr->n - 2]) {
		attn_run_merge(&tr->st[tr->n - 2], &tr->st[tr->n - 1], ng, dv);
		tr->level[tr->n - 2]++;
		tr->n--;
	}
}

/* Pushes the chains v0 .. v1 - 1 of a row that sees n_page complete pages of
 * P positions, page i in chain i mod V, each the tiled kernel over its pages
 * in order.  The pages are src's positions [iP, (i+1)P), with kvf (or NULL)
 * its F32 copies; or, with pages, pages[i] (k + koff, v + voff; src gives
 * strides and sizes), with pkv (or NULL) F32 copies of each page. */
void attn_chains(const struct attn_src *src, const struct attn_page *pages, size_t koff,
		 size_t voff, const struct attn_kvf *kvf, struct attn_kvf *pkv, float *tile, int P,
		 int V, int v0, int v1, int n_page, const float *q, int ng, float scale,
		 struct attn_tree *tr)
{
	for (int v = v0; v < v1; v++) {
		struct attn_run *r = attn_tree_next(tr, ng, src->dv);
		for (int i = v; i < n_page; i += V) {
			if (!pages) {
				attn_tiles(src, kvf, tile, i * P, (i + 1) * P, q, ng, scale, r);
				continue;
			}
			struct attn_src ps = *src;
			ps.k = pages[i].k + koff;
			ps.v = pages[i].v + voff;
			ps.cap = P;
			const int copied = pkv && attn_kvf_fill(&pkv[i], &ps, 0, P) == 0;
			attn_tiles(&ps, copied ? &pkv[i] : NULL, tile, 0, P, q, ng, scale, r);
		}
		attn_tree_push(tr, 0, ng, src->dv);
	}
}

/* Heads h0 .. h0 + ng - 1 of token t (position p, page t_p = p / P) with the
 * sharded numerics: the V chains of the complete pages i < t_p merged in the
 * tree, then the token's own page [t_p P, p] merged on the right, then the
 * sink joins and the accumulator is divided by the sum.  kvf, tile: as
 * attn_tiles. */
ATTN_HOT static void attn_rows_sharded(const struct attn_job *jb, struct attn_kvf *kvf, float *tile,
				       int t, int h0, int ng)
{
	const attn_cache *c = jb->c;
	const struct attn_params *ap = jb->ap;
	const int P = c->page;
	const int pos = jb->b->pos[t];
	struct attn_tree tr = {.n = 0};
	struct attn_src src;
	const float *q = attn_rows_src(jb, t, h0, &src);
	if (kvf && (!attn_simd_ok() || attn_kvf_fill(kvf, &src, 0, pos + 1) != 0))
		kvf = NULL;
	attn_chains(&src, NULL, 0, 0, kvf, NULL, tile, P, c->n_shard, 0, c->n_shard, pos / P, q, ng,
		    ap->scale, &tr);
	assert(tr.n == 1); /* V is a power of two */
	struct attn_run *own = attn_tree_next(&tr, ng, src.dv);
	attn_tiles(&src, kvf, tile, pos / P * P, pos + 1, q, ng, ap->scale, own);
	attn_run_merge(&tr.st[0], own, ng, src.dv);
	attn_run_finish(&tr.st[0], ng, src.dv, ap->sinks ? ap->sinks + h0 : NULL,
			attn_rows_out(jb, t, h0));
}

/* The units attention splits a layer's rows into: (group of at most
 * ATTN_GROUP query heads of one KV head, row), group-major as ggml's rows
 * are head-major, so a thread takes whole groups when it can: causal rows of
 * every length are spread evenly, and its rows share keys. */
int64_t attn_units(const struct attn_params *ap, int n_rows)
{
	const int hpk = ap->n_head / ap->n_head_kv;
	return (int64_t)n_rows * ap->n_head_kv * ((hpk + ATTN_GROUP - 1) / ATTN_GROUP);
}

/* Unit u: row *t, heads *h0 .. *h0 + *ng - 1. */
void attn_unit(const struct attn_params *ap, int n_rows, int64_t u, int *t, int *h0, int *ng)
{
	const int hpk = ap->n_head / ap->n_head_kv; /* heads per KV head */
	const int gpk = (hpk + ATTN_GROUP - 1) / ATTN_GROUP;
	const int gi = (int)(u / n_rows), end = (gi / gpk + 1) * hpk;
	*t = (int)(u % n_rows);
	*h0 = gi / gpk * hpk + gi % gpk * ATTN_GROUP;
	*ng = (*h0 + ATTN_GROUP < end ? *h0 + ATTN_GROUP : end) - *h0;
}

static void attn_worker(void *ctx, int ith, int nth)
{
	const struct attn_job *jb = ctx;
	const struct attn_params *ap = jb->ap;
	const int n_tok = jb->b->n_tokens;
	int64_t lo, hi;
	pool_split(attn_units(ap, n_tok), ith, nth, 1, &lo, &hi);
	struct attn_kvf *kvf = jb->tiled_ok || jb->sharded ? attn_kvf_get(jb->c, ith) : NULL;
	float *tile = jb->sharded ? attn_kvf_tile(kvf, ap->head_dim_k, ap->head_dim_v) : NULL;
	for (int64_t u = lo; u < hi; u++) {
		int t, h0, ng;
		attn_unit(ap, n_tok, u, &t, &h0, &ng);
		const int32_t n_seq_tok = jb->c->seq_tokens[jb->b->seq[t]];
		if (jb->sharded) {
			/* the same kernel for every row; F32 copies of the keys
			 * when the sequence's rows are enough to pay for them */
			struct attn_kvf *kv = n_seq_tok >= ATTN_TILE_Q && tile ? kvf : NULL;
			if (ap->window > 0)
				attn_rows_tiled(jb, kv, tile, t, h0, ng);
			else
				attn_rows_sharded(jb, kv, tile, t, h0, ng);
			continue;
		}
		/* the kernel llama.cpp would use for this sequence alone */
		if (jb->tiled_ok && n_seq_tok >= ATTN_TILE_Q) {
			attn_rows_tiled(jb, kvf, NULL, t, h0, ng);
			continue;
		}
		for (int h = h0; h < h0 + ng; h++)
			if (jb->split_ok && n_seq_tok == 1 &&
			    attn_llama_n_kv(jb->b->pos[t]) >= ATTN_SPLIT_MIN_KV)
				attn_row_split(jb, t, h);
			else
				attn_row_f16(jb, t, h);
	}
}

int attn_forward(pool *p, const attn_cache *c, int layer, const struct attn_params *ap,
		 const model_batch *b, const float *q, float *out)
{
	assert(layer >= 0 && layer < c->n_layer);
	assert(ap->head_dim_k <= ATTN_MAX_HEAD_DIM && ap->head_dim_v <= ATTN_MAX_HEAD_DIM);
	if (b->n_tokens <= 0)
		return 0;
	/* ggml picks its kernel by the number of query rows; rows are chosen
	 * here per sequence, so that a sequence's results do not depend on the
	 * other sequences sharing its batch (single-sequence runs match llama.cpp) */
	for (int t = 0; t < b->n_tokens; t++) {
		c->seq_tokens[b->seq[t]] = 0;
		c->seq_last[b->seq[t]] = b->pos[t];
	}
	for (int t = 0; t < b->n_tokens; t++) {
		c->seq_tokens[b->seq[t]]++;
		if (b->pos[t] > c->seq_last[b->seq[t]])
			c->seq_last[b->seq[t]] = b->pos[t];
	}
#ifndef NDEBUG
	/* a ring holds every key the batch's queries see (the caller's promise) */
	for (int t = 0; t < b->n_tokens && c->cap[layer] < c->n_ctx; t++) {
		int j0, j1;
		attn_visible(ap, b->pos[t], &j0, &j1);
		assert(c->seq_last[b->seq[t]] - j0 < c->cap[layer]);
	}
#endif
	struct attn_job jb = {
	    .c = c,
	    .layer = layer,
	    .ap = ap,
	    .b = b,
	    .q = q,
	    .out = out,
	    /* ggml: tiled with >= 64 query rows when the value size is a
	     * multiple of the F32 vector width */
	    .tiled_ok = ap->head_dim_v % ATTN_GGML_LANES == 0,
	    /* ggml: a single query over >= 512 cells splits the cells; a
	     * sliding-window layer has its own small cache in llama.cpp */
	    .split_ok = ap->window == 0,
	    .sharded = c->n_shard > 0,
	};
	if (c->remote && ap->window == 0)
		return attn_forward_remote(p, &jb);
	pool_run(p, attn_worker, &jb);
	return 0;
}
