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
 * uses FMA intrinsics); checked against a local ggml build, see attn.h. */
#define _DEFAULT_SOURCE /* madvise */
#include "attn.h"
#include "attn_internal.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

/* The row kernels are built twice and chosen at load time by CPU: with FMA,
 * fmaf() is one instruction instead of a library call (same result: an FMA
 * is exact by definition). */
/* not under TSan: it instruments the clone resolver, which runs before it is set up */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define ATTN_HOT __attribute__((target_clones("fma", "default")))
#else
#define ATTN_HOT
#endif

/* Per-thread F32 copies of one (layer, sequence, KV head)'s keys, transposed
 * per tile ([tile][d][i], as attn_row_tiled builds them) and values
 * ([j][d]), converted once and reused by every row of the thread's share of
 * an attn_forward call (the values are exactly the F16 ones). */
#define ATTN_KVF_SLOTS 64
struct attn_kvf {
	float *kt, *v;	       /* from position lo on: kt's tile of ic at (ic - lo) / T */
	size_t cap_kt, cap_v;  /* floats */
	const uint16_t *kbase; /* what is cached: the first key's address */
	int lo;		       /* first position converted (a multiple of ATTN_TILE_KV) */
	int n;		       /* positions [lo, n) converted */
	float *tile;	       /* attn_tile_load's scratch */
	size_t cap_tile;       /* floats */
};

/* Sharded numerics: at most this many chains, whose merge tree a binary
 * counter of this many levels (and one) builds. */
#define ATTN_SHARD_LEVELS 7

struct attn_cache {
	int n_layer;
	int n_seq;
	int n_ctx;
	int k_width;
	int v_width;
	int v_stride; /* uint16_t from one value to the next: v_width, or k_width */
	int *cap;     /* [n_layer] slots per sequence: n_ctx, or fewer for a ring */
	size_t *off;  /* [n_layer] first entry of each layer */
	uint16_t *k;  /* [n_layer][n_seq][cap[layer]][k_width] */
	uint16_t *v;  /* [n_layer][n_seq][cap[layer]][v_stride], or k (values in the keys) */
	int n_shard;  /* sharded numerics: V chains (0: off) */
	int page;     /* and P positions per page */
	const struct attn_remote_ops *remote; /* KV hosts, or NULL */
	void *remote_self;
	int n_hosts;
	int32_t *shipped;     /* [2][n_layer][n_seq]: pages shipped, then released */
	int32_t *seq_tokens;  /* [n_seq] scratch of attn_forward: tokens per sequence */
	int32_t *seq_last;    /* [n_seq] its scratch too: last position per sequence */
	struct attn_kvf *kvf; /* [ATTN_KVF_SLOTS] per pool thread, or NULL */
	uint8_t *slides;      /* [n_layer] made as a ring (a sliding-window layer) */

	/* with KV hosts: attn_forward's own-page partials */
	struct attn_floats *own;
};

/* A buffer of floats grown on demand. */
struct attn_floats {
	float *p;
	size_t cap;
};

/* ------------------------------------------------------------ f16 helpers */

static float attn_f16_table[65536]; /* f16 bits -> f32 value */
static pthread_once_t attn_f16_once = PTHREAD_ONCE_INIT;

static void attn_f16_table_init(void)
{
	for (uint32_t h = 0; h < 65536; h++)
		attn_f16_table[h] = kern_f16_to_f32((uint16_t)h);
}

static inline float attn_f16_to_f32(uint16_t h)
{
	return attn_f16_table[h];
}

static inline uint32_t attn_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float attn_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

/* x rounded to the nearest F16 value (ties to even), as a float: the value an
 * F16 store followed by a load gives (F16C's VCVTPS2PH with rounding mode 0). */
static inline float attn_f16_round(float x)
{
	uint32_t u = attn_f32_bits(x);
	uint32_t a = u & 0x7fffffffu;
	if (a >= 0x38800000u && a < 0x477ff000u) {
		/* normal half: drop 13 mantissa bits, ties to even */
		a += 0x0fffu + ((a >> 13) & 1u);
		a &= ~0x1fffu;
		return attn_bits_f32((u & 0x80000000u) | a);
	}
	/* subnormal, zero, overflow, inf, NaN: rare, exact slow path */
	return kern_f16_to_f32(kern_f32_to_f16(x));
}

/* Which of ggml's x86 SIMD builds the reductions below reproduce: 16 lanes
 * (AVX-512, the machine that made the shared reference vectors) or 8 (AVX2).
 * Only the order of a few float additions and ggml's vector expf depend on it. */
#ifndef ATTN_GGML_LANES
#define ATTN_GGML_LANES 16
#endif
#if ATTN_GGML_LANES != 16 && ATTN_GGML_LANES != 8
#error "ATTN_GGML_LANES must be 16 or 8"
#endif

#if ATTN_GGML_LANES == 16
/* ggml_v_expf (ggml-cpu/vec.h, AVX-512 version) for one lane.  Inlined into
 * the (FMA-built) kernels, so fmaf() is an instruction there. */
static inline __attribute__((always_inline)) float attn_vexpf(float x)
{
	const float r = 0x1.8p23f;
	const float z = fmaf(x, 0x1.715476p+0f, r);
	const float n = z - r;
	const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
	if (fabsf(n) > 192.0f)
		return n <= 0.0f ? 0.0f : INFINITY;
	const float u = b * b;
	const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
				  fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
			     u, fmaf(0x1.ffffecp-1f, b, 1.0f));
	/* _mm512_scalef_ps: exact, or rounded once if subnormal; a product by
	 * a power of two (normal for n >= -126) rounds the same way */
	if (n >= -126.0f && n <= 127.0f)
		return j * attn_bits_f32((uint32_t)((int)n + 127) << 23);
	return ldexpf(j, (int)n);
}

/* _mm512_reduce_add_ps as GCC implements it: what both ggml_vec_soft_max_f32
 * and GGML_F32Cx16_REDUCE end with. */
static float attn_hsum_softmax(const float *a)
{
	float t[8], u[4];
	for (int i = 0; i < 8; i++)
		t[i] = a[i + 8] + a[i];
	for (int i = 0; i < 4; i++)
		u[i] = t[i + 4] + t[i];
	return (u[0] + u[2]) + (u[1] + u[3]);
}

static float attn_hsum_dot(const float *a)
{
	return attn_hsum_softmax(a);
}
#else
/* ggml_v_expf (ggml-cpu/vec.h, AVX2+FMA version) for one lane: exp(x) with at
 * most ~1.5 ulp error. */
static inline __attribute__((always_inline)) float attn_vexpf(float x)
{
	const float r = 0x1.8p23f;
	const float z = fmaf(x, 0x1.715476p+0f, r);
	const float n = z - r;
	const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
	const uint32_t e = attn_f32_bits(z) << 23;
	const float k = attn_bits_f32(e + attn_f32_bits(1.0f));
	const float u = b * b;
	const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
				  fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
			     u, 0x1.ffffecp-1f * b);
	if (!(fabsf(n) > 126.0f))
		return fmaf(j, k, k);
	const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
	const float s1 = attn_bits_f32(g + 0x7f000000u);
	const float s2 = attn_bits_f32(e - g);
	if (fabsf(n) > 192.0f)
		return s1 * s1;
	return fmaf(s2, j, s2) * s1;
}

/* ggml_vec_soft_max_f32's AVX2 sum of 8 lanes (halves, movehl, movehdup). */
static float attn_hsum_softmax(const float *a)
{
	float p[4];
	for (int i = 0; i < 4; i++)
		p[i] = a[i + 4] + a[i];
	return (p[0] + p[2]) + (p[1] + p[3]);
}

/* The horizontal part of GGML_F32x8_REDUCE (halves, then two hadds). */
static float attn_hsum_dot(const float *a)
{
	float t[4];
	for (int i = 0; i < 4; i++)
		t[i] = a[i] + a[i + 4];
	return (t[0] + t[1]) + (t[2] + t[3]);
}
#endif

/* ggml_vec_dot_f16 for x86 SIMD builds: blocks of 4 x LANES values go to 4
 * vector accumulators (products of two F16 values are exact in F32), which are
 * reduced (0+2, 1+3, then 0+1, then across lanes); the tail is added in double. */
static float attn_dot_f16(const float *q16, const uint16_t *k, int n, int simd)
{
	enum { L = ATTN_GGML_LANES, STEP = 4 * ATTN_GGML_LANES };
	const int np = n & ~(STEP - 1);
	double sum = 0.0;
#if ATTN_GGML_LANES == 16
	if (np > 0 && simd) {
		float red[16];
		attn_simd_dot16(q16, k, np, red);
		sum = (double)attn_hsum_dot(red);
	} else
#endif
	    if (np > 0) {
		float acc[4][L];
		memset(acc, 0, sizeof(acc));
		for (int i = 0; i < np; i += STEP)
			for (int j = 0; j < 4; j++)
				for (int l = 0; l < L; l++)
					acc[j][l] +=
					    q16[i + j * L + l] * attn_f16_to_f32(k[i + j * L + l]);
		for (int l = 0; l < L; l++) {
			acc[0][l] += acc[2][l];
			acc[1][l] += acc[3][l];
		}
		for (int l = 0; l < L; l++)
			acc[0][l] += acc[1][l];
		sum = (double)attn_hsum_dot(acc[0]);
	}
	for (int i = np; i < n; i++)
		sum += (double)(q16[i] * attn_f16_to_f32(k[i]));
	return (float)sum;
}

/* ggml's split-KV decode (see attn_row_split) as llama.cpp drives it with the
 * reference settings: cells padded to 256, 2 threads. */
#define ATTN_SPLIT_PAD	  256
#define ATTN_SPLIT_MIN_KV 512
#define ATTN_SPLIT_CHUNKS 2

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

	pthread_once(&attn_f16_once, attn_f16_table_init);

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
	for (int l = 0; c->shipped && l < c->n_layer; l++) {
		c->shipped[(size_t)l * (size_t)c->n_seq + (size_t)seq] = 0;
		c->shipped[((size_t)c->n_layer + (size_t)l) * (size_t)c->n_seq + (size_t)seq] = 0;
	}
}

/* The entry of (layer, seq) holding position pos (slot pos % cap). */
static inline size_t attn_entry(const attn_cache *c, int layer, int seq, int pos)
{
	const int cap = c->cap[layer];
	return c->off[layer] + (size_t)seq * (size_t)cap + (size_t)(pos % cap);
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

struct attn_job {
	const attn_cache *c;
	int layer;
	const struct attn_params *ap;
	const model_batch *b;
	const float *q;
	float *out;
	int tiled_ok; /* head_dim_v suits ggml's tiled kernel */
	int split_ok; /* no sliding window: split-KV decode possible */
	int sharded;  /* the sharded numerics (attn_cache_set_shards) */
};

/* Thread ith's copies (slots of the cache; threads beyond them go without),
 * emptied; NULL if there are none. */
static struct attn_kvf *attn_kvf_get(const attn_cache *c, int ith)
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
static float *attn_kvf_tile(struct attn_kvf *f, int dk, int dv)
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

/* Where the tiled kernel reads one KV head: position j's key at
 * k + (j % cap) * ks and its value at v + (j % cap) * vs (F16 bit patterns),
 * dk and dv values. */
struct attn_src {
	const uint16_t *k, *v;
	size_t ks, vs;
	int dk, dv;
	int cap;
};

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

/* Adds a sink logit t to the softmax state (M, S, acc), as ggml's kernels do
 * after the keys: the one-row kernel also moves M to t when t is larger. */
static void attn_add_sink(float t, float *M, float *S, float *acc, int dv)
{
	float ms = 1.0f;
	float vs = 1.0f;
	if (t > *M) {
		ms = expf(*M - t);
		*M = t;
		for (int d = 0; d < dv; d++)
			acc[d] *= ms;
	} else {
		vs = expf(t - *M);
	}
	*S = fmaf(*S, ms, vs);
}

/* out = acc * (1 / S) (zero when no key was visible). */
static void attn_normalize(float S, const float *acc, int dv, float *out)
{
	const float s_inv = S == 0.0f ? 0.0f : 1.0f / S;
	for (int d = 0; d < dv; d++)
		out[d] = acc[d] * s_inv;
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
		if (s_c == 0.0f)
			continue;
		const float m_new = fmaxf(M, m_c);
		const float scale_old = expf(M - m_new);
		const float scale_new = expf(m_c - m_new);
		for (int d = 0; d < dv; d++)
			acc[d] = fmaf(acc[d], scale_old, part[d] * scale_new);
		S = fmaf(S, scale_old, s_c * scale_new);
		M = m_new;
	}
	attn_normalize(S, acc, dv,
		       jb->out + ((size_t)t * (size_t)ap->n_head + (size_t)h) * (size_t)dv);
}

/* Heads of one token computed together by the tiled kernel (at most). */
#define ATTN_GROUP 4

/* One head's softmax step over a tile: kq holds the tile's ATTN_TILE_KV
 * scaled scores (-inf where masked), tile_max their maximum (not -inf).  A
 * new maximum rescales acc[dv] and S; kq becomes the weights vexpf(kq - M)
 * and S gains their sum (lane groups added as ggml_vec_soft_max_f32 does). */
static inline __attribute__((always_inline)) void
attn_tile_softmax(float *kq, float tile_max, float *M, float *S, float *acc, int dv)
{
	const float m_new = fmaxf(*M, tile_max);
	if (m_new > *M) {
		const float ms = expf(*M - m_new);
		for (int d = 0; d < dv; d++)
			acc[d] *= ms;
		*S *= ms;
	}
	*M = m_new;
	double sum = 0.0;
	for (int g = 0; g < ATTN_TILE_KV; g += ATTN_GGML_LANES) {
		for (int i = 0; i < ATTN_GGML_LANES; i++)
			kq[g + i] = attn_vexpf(kq[g + i] - m_new);
		sum += (double)attn_hsum_softmax(kq + g);
	}
	*S = (float)((double)*S + sum);
}

/* The running softmax state of up to ATTN_GROUP heads in the tiled kernel:
 * maximum, sum and F32 accumulator [ng][dv]. */
struct attn_run {
	float M[ATTN_GROUP], S[ATTN_GROUP];
	float acc[ATTN_GROUP * ATTN_MAX_HEAD_DIM];
};

static void attn_run_init(struct attn_run *r, int ng, int dv)
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
static void attn_run_merge(struct attn_run *a, const struct attn_run *b, int ng, int dv)
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
static void attn_run_finish(struct attn_run *r, int ng, int dv, const float *sinks, float *out)
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
ATTN_HOT static void attn_tiles(const struct attn_src *src, const struct attn_kvf *kvf, float *tile,
				int a0, int z1, const float *q, int ng, float scale,
				struct attn_run *r)
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
static const float *attn_rows_src(const struct attn_job *jb, int t, int h0, struct attn_src *src)
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

static float *attn_rows_out(const struct attn_job *jb, int t, int h0)
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

/* The merge tree of the sharded numerics, built by a binary counter as its
 * leaves come in chain order: a leaf (or an aligned subtree) of level l is
 * pushed, and while the two top entries have the same level they merge, the
 * lower chains on the left.  With V a power of two it ends as one root. */
struct attn_tree {
	struct attn_run st[ATTN_SHARD_LEVELS + 1];
	int level[ATTN_SHARD_LEVELS + 1];
	int n;
};

/* The entry to fill before attn_tree_push(), emptied. */
static struct attn_run *attn_tree_next(struct attn_tree *tr, int ng, int dv)
{
	attn_run_init(&tr->st[tr->n], ng, dv);
	return &tr->st[tr->n];
}

static void attn_tree_push(struct attn_tree *tr, int level, int ng, int dv)
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
static void attn_chains(const struct attn_src *src, const struct attn_page *pages, size_t koff,
			size_t voff, const struct attn_kvf *kvf, struct attn_kvf *pkv, float *tile,
			int P, int V, int v0, int v1, int n_page, const float *q, int ng,
			float scale, struct attn_tree *tr)
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
static int64_t attn_units(const struct attn_params *ap, int n_rows)
{
	const int hpk = ap->n_head / ap->n_head_kv;
	return (int64_t)n_rows * ap->n_head_kv * ((hpk + ATTN_GROUP - 1) / ATTN_GROUP);
}

/* Unit u: row *t, heads *h0 .. *h0 + *ng - 1. */
static void attn_unit(const struct attn_params *ap, int n_rows, int64_t u, int *t, int *h0, int *ng)
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

/* ------------------------------------------------------------- KV hosts */

int attn_cache_set_remote(attn_cache *c, const struct attn_remote_ops *ops, void *self, int n_hosts)
{
	if (n_hosts == 0) {
		c->remote = NULL;
		c->n_hosts = 0;
		return 0;
	}
	if (!ops || c->n_shard == 0 || n_hosts < 0 || n_hosts > c->n_shard ||
	    (n_hosts & (n_hosts - 1)) != 0) {
		log_error("attn: %d KV hosts for %d chains: need sharded numerics and a power of "
			  "two of hosts dividing the chains",
			  n_hosts, c->n_shard);
		return ERR_CONFIG;
	}
	if (!c->shipped) {
		c->shipped = calloc(2 * (size_t)c->n_layer * (size_t)c->n_seq, sizeof(int32_t));
		if (!c->shipped)
			return ERR_NOMEM;
	}
	if (!c->own) {
		c->own = calloc(1, sizeof(*c->own));
		if (!c->own)
			return ERR_NOMEM;
	}
	/* the most a host holds for one sequence: the complete pages of its
	 * chains, every full layer, each page with its entry in the host's page
	 * table, and an entry per layer */
	const int max_page = (c->n_ctx - 1) / c->page, per = c->n_shard / n_hosts;
	uint64_t layers = 0;
	for (int l = 0; l < c->n_layer; l++)
		layers += c->cap[l] == c->n_ctx;
	const uint64_t page_bytes = (uint64_t)c->page *
					(uint64_t)(c->k_width + (c->v == c->k ? 0 : c->v_width)) *
					sizeof(uint16_t) +
				    sizeof(struct attn_page);
	for (int h = 0; h < n_hosts; h++) {
		uint64_t pages = 0;
		for (int i = 0; i < max_page; i++)
			pages += i % c->n_shard / per == h;
		const uint64_t need = (pages * page_bytes + 32) * layers;
		const uint64_t have = ops->budget(self, h);
		if (need > have) {
			log_error("KV host %d would hold up to %llu bytes of pages (a sequence of "
				  "%d positions), but offers %llu (moefleet-worker --kv-memory): "
				  "a shorter context, or more hosts",
				  h, (unsigned long long)need, c->n_ctx, (unsigned long long)have);
			return ERR_CONFIG;
		}
	}
	memset(c->shipped, 0, 2 * (size_t)c->n_layer * (size_t)c->n_seq * sizeof(int32_t));
	c->remote = ops;
	c->remote_self = self;
	c->n_hosts = n_hosts;
	return 0;
}

void attn_cache_kv_room(const attn_cache *c, struct attn_kv_room *r)
{
	memset(r, 0, sizeof(*r));
	for (int l = 0; l < c->n_layer; l++)
		r->n_layer += c->cap[l] == c->n_ctx;
	r->n_hosts = c->remote ? c->n_hosts : 0;
	r->n_shard = c->n_shard;
	r->page = c->page;
	r->page_bytes = (uint64_t)c->page *
			(uint64_t)(c->k_width + (c->v == c->k ? 0 : c->v_width)) * sizeof(uint16_t);
	r->entry_bytes = sizeof(struct attn_page);
	r->seq_bytes = 32;
	for (int h = 0; h < r->n_hosts; h++)
		r->budget[h] = c->remote->budget(c->remote_self, h);
	r->local_bytes = (uint64_t)r->n_layer * (uint64_t)c->n_seq * (uint64_t)c->n_ctx *
			 (uint64_t)(c->k_width + (c->v == c->k ? 0 : c->v_stride)) *
			 sizeof(uint16_t);
}

/* The log2 of a power of two. */
static int attn_log2(int x)
{
	int l = 0;
	while ((1 << l) < x)
		l++;
	return l;
}

/* A partial [M, S, acc] of ng heads, dv values each, into r (and back). */
static void attn_run_load(struct attn_run *r, const float *part, int ng, int dv)
{
	for (int g = 0; g < ng; g++) {
		const float *pg = part + (size_t)g * ATTN_PART_FLOATS(dv);
		r->M[g] = pg[0];
		r->S[g] = pg[1];
		memcpy(r->acc + (size_t)g * (size_t)dv, pg + 2, (size_t)dv * sizeof(float));
	}
}

static void attn_run_store(const struct attn_run *r, int ng, int dv, float *part)
{
	for (int g = 0; g < ng; g++) {
		float *pg = part + (size_t)g * ATTN_PART_FLOATS(dv);
		pg[0] = r->M[g];
		pg[1] = r->S[g];
		memcpy(pg + 2, r->acc + (size_t)g * (size_t)dv, (size_t)dv * sizeof(float));
	}
}

/* One pool thread's scratch of attn_host_forward(). */
struct attn_host_thread {
	struct attn_kvf tile; /* its tile buffer (attn_kvf_tile) */
	struct attn_kvf *pkv; /* [n_pkv] F32 copies of pages, by page number */
	int n_pkv;
};

struct attn_host_scratch {
	struct attn_host_thread *th; /* [n_th] */
	int n_th;
};

void attn_host_scratch_destroy(attn_host_scratch **s)
{
	if (!s || !*s)
		return;
	for (int i = 0; i < (*s)->n_th; i++) {
		struct attn_host_thread *t = &(*s)->th[i];
		free(t->tile.tile);
		for (int j = 0; j < t->n_pkv; j++) {
			free(t->pkv[j].kt);
			free(t->pkv[j].v);
		}
		free(t->pkv);
	}
	free((*s)->th);
	free(*s);
	*s = NULL;
}

/* Makes s hold n_th threads' scratch with n_pkv page slots each (when
 * n_pkv > 0); the buffers grow when used.  0 or ERR_NOMEM (s still valid). */
static int attn_host_scratch_grow(attn_host_scratch *s, int n_th, int n_pkv)
{
	if (n_th > s->n_th) {
		struct attn_host_thread *p = realloc(s->th, (size_t)n_th * sizeof(*p));
		if (!p)
			return ERR_NOMEM;
		memset(p + s->n_th, 0, (size_t)(n_th - s->n_th) * sizeof(*p));
		s->th = p;
		s->n_th = n_th;
	}
	for (int i = 0; i < n_th; i++) {
		struct attn_host_thread *t = &s->th[i];
		if (n_pkv <= t->n_pkv)
			continue;
		struct attn_kvf *p = realloc(t->pkv, (size_t)n_pkv * sizeof(*p));
		if (!p)
			return ERR_NOMEM;
		memset(p + t->n_pkv, 0, (size_t)(n_pkv - t->n_pkv) * sizeof(*p));
		t->pkv = p;
		t->n_pkv = n_pkv;
	}
	return 0;
}

struct attn_host_ctx {
	const struct attn_host_job *job;
	attn_host_scratch *s; /* or NULL: the scalar loops, no copies */
	int max_pages;	      /* page copies per thread (0: none) */
};

static void attn_host_worker(void *ctx, int ith, int nth)
{
	const struct attn_host_ctx *hc = ctx;
	const struct attn_host_job *job = hc->job;
	const struct attn_params *ap = job->ap;
	const int dk = ap->head_dim_k, dv = ap->head_dim_v;
	struct attn_host_thread *th = hc->s ? &hc->s->th[ith] : NULL;
	float *tile = th ? attn_kvf_tile(&th->tile, dk, dv) : NULL;
	struct attn_kvf *pkv = tile && hc->max_pages > 0 ? th->pkv : NULL;
	for (int i = 0; pkv && i < hc->max_pages; i++) { /* other pages than last time */
		pkv[i].kbase = NULL;
		pkv[i].n = 0;
	}
	int64_t lo, hi;
	pool_split(attn_units(ap, job->n_rows), ith, nth, 1, &lo, &hi);
	for (int64_t u = lo; u < hi; u++) {
		int r, h0, ng;
		attn_unit(ap, job->n_rows, u, &r, &h0, &ng);
		const int hkv = h0 / (ap->n_head / ap->n_head_kv);
		const struct attn_src src = {.ks = (size_t)job->k_width,
					     .vs = (size_t)job->v_stride,
					     .dk = dk,
					     .dv = dv,
					     .cap = job->page};
		const float *q =
		    job->q + ((size_t)r * (size_t)ap->n_head + (size_t)h0) * (size_t)dk;
		struct attn_tree tr = {.n = 0};
		attn_chains(&src, job->pages[r], (size_t)hkv * (size_t)dk, (size_t)hkv * (size_t)dv,
			    NULL, pkv, tile, job->page, job->n_shard, job->v0, job->v1,
			    job->pos[r] / job->page, q, ng, ap->scale, &tr);
		attn_run_store(&tr.st[0], ng, dv,
			       job->part + ((size_t)r * (size_t)ap->n_head + (size_t)h0) *
					       ATTN_PART_FLOATS(dv));
	}
}

int attn_host_forward(pool *p, const struct attn_host_job *job)
{
	const int V = job->n_shard, P = job->page, w = job->v1 - job->v0;
	const struct attn_params *ap = job->ap;
	if (V <= 0 || V > (1 << (ATTN_SHARD_LEVELS - 1)) || (V & (V - 1)) || P <= 0 ||
	    P % ATTN_TILE_KV || w <= 0 || (w & (w - 1)) || job->v0 % w || job->v1 > V) {
		log_error("attn: chains %d..%d of %d over pages of %d positions: not an aligned "
			  "subtree",
			  job->v0, job->v1 - 1, V, P);
		return ERR_RANGE;
	}
	if (ap->head_dim_k > ATTN_MAX_HEAD_DIM || ap->head_dim_v > ATTN_MAX_HEAD_DIM ||
	    ap->n_head_kv <= 0 || ap->n_head % ap->n_head_kv ||
	    (int64_t)ap->n_head_kv * ap->head_dim_k > job->k_width ||
	    (int64_t)ap->n_head_kv * ap->head_dim_v > job->v_stride) {
		log_error("attn: %d heads over %d KV heads of %d/%d values do not fit pages of "
			  "%d/%d values",
			  ap->n_head, ap->n_head_kv, ap->head_dim_k, ap->head_dim_v, job->k_width,
			  job->v_stride);
		return ERR_RANGE;
	}
	for (int r = 0; r < job->n_rows; r++) {
		if (job->pos[r] < 0) {
			log_error("attn: row %d at position %d", r, job->pos[r]);
			return ERR_RANGE;
		}
		const int n_page = job->pos[r] / P;
		for (int i = 0; i < n_page; i++)
			if (i % V >= job->v0 && i % V < job->v1 &&
			    (i >= job->n_pages[r] || !job->pages[r][i].k || !job->pages[r][i].v)) {
				log_error("attn: row %d at position %d needs page %d, which is "
					  "not here",
					  r, job->pos[r], i);
				return ERR_RANGE;
			}
	}
	pthread_once(&attn_f16_once, attn_f16_table_init);
	struct attn_host_ctx hc = {.job = job};
	/* prompt rows: each thread converts a page once for all its rows */
	for (int r = 0; r < job->n_rows && job->n_rows >= ATTN_TILE_Q; r++)
		if (job->n_pages[r] > hc.max_pages)
			hc.max_pages = job->n_pages[r];
	attn_host_scratch *tmp = NULL, **s = job->scratch ? job->scratch : &tmp;
	if (!*s)
		*s = calloc(1, sizeof(**s));
	/* without memory for it, the scalar loops give the same bits */
	if (*s && attn_host_scratch_grow(*s, pool_size(p), hc.max_pages) == 0)
		hc.s = *s;
	pool_run(p, attn_host_worker, &hc);
	attn_host_scratch_destroy(&tmp);
	return 0;
}

static double attn_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Ships the pages of the batch's sequences completed since the last call to
 * the hosts of their chains. */
static int attn_remote_ship(const attn_cache *c, int layer, const model_batch *b)
{
	const int P = c->page;
	for (int t = 0; t < b->n_tokens; t++) {
		const int seq = b->seq[t];
		int32_t *done = &c->shipped[(size_t)layer * (size_t)c->n_seq + (size_t)seq];
		const int complete = (c->seq_last[seq] + 1) / P;
		for (; *done < complete; (*done)++) {
			const size_t e = attn_entry(c, layer, seq, *done * P);
			const int rc = c->remote->ship(
			    c->remote_self, attn_page_host(*done, c->n_shard, c->n_hosts), layer,
			    seq, *done, P, c->k_width, c->v == c->k ? 0 : c->v_width,
			    c->k + e * (size_t)c->k_width,
			    c->v == c->k ? NULL : c->v + e * (size_t)c->v_stride);
			if (rc)
				return rc;
		}
	}
	return 0;
}

/* Gives the memory of the pages of the batch's sequences shipped since the
 * last call back to the system (the whole memory pages inside them; reading
 * them again would give zeros). */
static void attn_remote_release(const attn_cache *c, int layer, const model_batch *b)
{
	const long pg = sysconf(_SC_PAGESIZE);
	const size_t n_ls = (size_t)c->n_layer * (size_t)c->n_seq;
	for (int t = 0; t < b->n_tokens && pg > 0; t++) {
		const size_t ls = (size_t)layer * (size_t)c->n_seq + (size_t)b->seq[t];
		int32_t *released = &c->shipped[n_ls + ls];
		const int from = *released * c->page, to = c->shipped[ls] * c->page;
		*released = c->shipped[ls];
		for (int kv = 0; kv < 2 && to > from; kv++) {
			if (kv && c->v == c->k)
				break;
			const size_t w = kv ? (size_t)c->v_stride : (size_t)c->k_width;
			const uint16_t *base =
			    (kv ? c->v : c->k) + attn_entry(c, layer, b->seq[t], from) * w;
			const uintptr_t a = (uintptr_t)base,
					z = a + (size_t)(to - from) * w * sizeof(uint16_t);
			const uintptr_t a1 = (a + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
			const uintptr_t z1 = z & ~((uintptr_t)pg - 1);
			if (z1 > a1)
				madvise((void *)a1, z1 - a1, MADV_DONTNEED);
		}
	}
}

/* n pseudo-random F16 values of magnitude in [2^-7, 2) into dst. */
static void attn_fill_f16(uint16_t *dst, int n, uint64_t *state)
{
	uint64_t r = 0;
	for (int i = 0; i < n; i++, r >>= 16) {
		if (i % 4 == 0) { /* splitmix64 */
			uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
			z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
			z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
			r = z ^ (z >> 31);
		}
		dst[i] = (uint16_t)((r & 0x83ffu) | ((8u + ((r >> 10) & 7u)) << 10));
	}
}

int attn_cache_fill_random(attn_cache *c, int seq, int n_pos, uint64_t seed)
{
	if (seq < 0 || seq >= c->n_seq || n_pos < 0 || n_pos > c->n_ctx) {
		log_error(
		    "attn: cannot fill %d positions of sequence %d (%d slots of %d positions)",
		    n_pos, seq, c->n_seq, c->n_ctx);
		return ERR_RANGE;
	}
	attn_cache_reset_seq(c, seq);
	const int32_t last = n_pos - 1, sq = seq;
	const model_batch b = {.n_tokens = 1, .pos = &last, .seq = &sq};
	c->seq_last[seq] = last;
	for (int l = 0; l < c->n_layer; l++) {
		for (int p = n_pos > c->cap[l] ? n_pos - c->cap[l] : 0; p < n_pos; p++) {
			const size_t e = attn_entry(c, l, seq, p);
			attn_fill_f16(c->k + e * (size_t)c->k_width, c->k_width, &seed);
			if (c->v != c->k)
				attn_fill_f16(c->v + e * (size_t)c->v_stride, c->v_width, &seed);
		}
		/* layer by layer, so the pages shipped leave before the next is filled */
		if (!c->remote || c->slides[l] || n_pos == 0)
			continue;
		const int rc = attn_remote_ship(c, l, &b);
		if (rc)
			return rc;
		attn_remote_release(c, l, &b);
	}
	return 0;
}

struct attn_remote_job {
	const struct attn_job *jb;
	float *own;	     /* [n_tokens][n_head][ATTN_PART_FLOATS(dv)]: each row's own page */
	const float **parts; /* [n_hosts] */
};

/* Each row's own page, as a partial. */
static void attn_remote_own(void *ctx, int ith, int nth)
{
	const struct attn_remote_job *rj = ctx;
	const struct attn_job *jb = rj->jb;
	const struct attn_params *ap = jb->ap;
	const int P = jb->c->page;
	int64_t lo, hi;
	pool_split(attn_units(ap, jb->b->n_tokens), ith, nth, 1, &lo, &hi);
	struct attn_kvf *kvf = attn_kvf_get(jb->c, ith);
	float *tile = attn_kvf_tile(kvf, ap->head_dim_k, ap->head_dim_v);
	for (int64_t u = lo; u < hi; u++) {
		int t, h0, ng;
		attn_unit(ap, jb->b->n_tokens, u, &t, &h0, &ng);
		struct attn_src src;
		struct attn_run r;
		const float *q = attn_rows_src(jb, t, h0, &src);
		const int pos = jb->b->pos[t];
		attn_run_init(&r, ng, src.dv);
		attn_tiles(&src, NULL, tile, pos / P * P, pos + 1, q, ng, ap->scale, &r);
		attn_run_store(&r, ng, src.dv,
			       rj->own + ((size_t)t * (size_t)ap->n_head + (size_t)h0) *
					     ATTN_PART_FLOATS(src.dv));
	}
}

/* The hosts' partials merged in host order (the tree), then the own page,
 * then the sink and 1/S. */
static void attn_remote_merge(void *ctx, int ith, int nth)
{
	const struct attn_remote_job *rj = ctx;
	const struct attn_job *jb = rj->jb;
	const struct attn_params *ap = jb->ap;
	const int dv = ap->head_dim_v, R = jb->c->n_hosts;
	const int level = attn_log2(jb->c->n_shard / R);
	int64_t lo, hi;
	pool_split((int64_t)jb->b->n_tokens * ap->n_head, ith, nth, 1, &lo, &hi);
	for (int64_t u = lo; u < hi; u++) {
		const size_t at = (size_t)u * ATTN_PART_FLOATS(dv);
		const int h = (int)(u % ap->n_head), t = (int)(u / ap->n_head);
		struct attn_tree tr = {.n = 0};
		for (int k = 0; k < R; k++) {
			struct attn_run *r = attn_tree_next(&tr, 1, dv);
			if (rj->parts[k])
				attn_run_load(r, rj->parts[k] + at, 1, dv);
			attn_tree_push(&tr, level, 1, dv);
		}
		struct attn_run *own = attn_tree_next(&tr, 1, dv);
		attn_run_load(own, rj->own + at, 1, dv);
		attn_run_merge(&tr.st[0], own, 1, dv);
		attn_run_finish(&tr.st[0], 1, dv, ap->sinks ? ap->sinks + h : NULL,
				attn_rows_out(jb, t, h));
	}
}

/* attn_forward() with the chains on KV hosts. */
static int attn_forward_remote(pool *p, const struct attn_job *jb)
{
	const attn_cache *c = jb->c;
	const model_batch *b = jb->b;
	const struct attn_params *ap = jb->ap;
	const int R = c->n_hosts, per = c->n_shard / R;
	int rc = attn_remote_ship(c, jb->layer, b);
	if (rc)
		return rc;
	const float *parts[ATTN_MAX_HOSTS];
	int asked = 0;
	for (int h = 0; h < R; h++) {
		parts[h] = NULL;
		/* a host is asked when some row sees one of its pages */
		int need = 0;
		for (int t = 0; t < b->n_tokens && !need; t++)
			need = b->pos[t] / c->page > h * per;
		if (need && (rc = c->remote->submit(c->remote_self, h, jb->layer, ap, c->page,
						    c->n_shard, h * per, (h + 1) * per, b, jb->q)))
			return rc;
		asked += need;
	}
	const size_t need =
	    (size_t)b->n_tokens * (size_t)ap->n_head * ATTN_PART_FLOATS(ap->head_dim_v);
	if (need > c->own->cap) {
		free(c->own->p);
		c->own->p = malloc(need * sizeof(float));
		c->own->cap = c->own->p ? need : 0;
		if (!c->own->p)
			return ERR_NOMEM;
	}
	struct attn_remote_job rj = {.jb = jb, .own = c->own->p, .parts = parts};
	const double t0 = attn_now();
	pool_run(p, attn_remote_own, &rj);
	const double t1 = attn_now();
	rc = c->remote->collect(c->remote_self, jb->layer, parts);
	if (!rc) {
		const double t2 = attn_now();
		pool_run(p, attn_remote_merge, &rj);
		if (asked && c->remote->account)
			c->remote->account(c->remote_self, jb->layer, b->n_tokens, t1 - t0,
					   attn_now() - t2);
		attn_remote_release(c, jb->layer, b);
	}
	return rc;
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

/* ------------------------------------------------- gathered keys (K = V) */

enum attn_kernel attn_pick_kernel(int n_seq_tokens, int n_cells, int dim)
{
	if (n_seq_tokens >= ATTN_TILE_Q && dim % ATTN_GGML_LANES == 0)
		return ATTN_KERNEL_TILED;
	if (n_seq_tokens == 1 && n_cells >= ATTN_SPLIT_MIN_KV)
		return ATTN_KERNEL_SPLIT;
	return ATTN_KERNEL_ONE_ROW;
}

/* Key row i as floats. */
static inline void attn_gather_load(const struct attn_keys *ks, int i, int dim, float *dst)
{
	if (ks->f32) {
		memcpy(dst, ks->row[i], (size_t)dim * sizeof(float));
		return;
	}
	const uint16_t *r = ks->row[i];
	for (int d = 0; d < dim; d++)
		dst[d] = attn_f16_to_f32(r[d]);
}

/* The one-row kernel over keys [i0, i1): F16 rows take an F16 query and an
 * accumulator rounded to F16 after every key (as attn_chunk_f16); F32 rows an
 * F32 query, F32 dot products and an F32 accumulator. */
ATTN_HOT static void attn_gather_chunk(const struct attn_keys *ks, int i0, int i1, int dim,
				       const float *q, float scale, float *M, float *S, float *acc)
{
	float q16[ATTN_MAX_HEAD_DIM], vrow[ATTN_MAX_HEAD_DIM];
	const int f32 = ks->f32;
	const int simd = attn_simd_ok();
	if (!f32)
		for (int d = 0; d < dim; d++)
			q16[d] = attn_f16_round(q[d]);
	memset(acc, 0, (size_t)dim * sizeof(float));
	*S = 0.0f;
	*M = -INFINITY;
	for (int i = i0; i < i1; i++) {
		const float s = (f32 ? kern_dot(KERN_F32, dim, ks->row[i], q)
				     : attn_dot_f16(q16, ks->row[i], dim, simd)) *
				scale;
		float ms = 1.0f;
		float vs = 1.0f;
		if (s > *M) {
			const float m_old = *M;
			*M = s;
			ms = expf(m_old - *M);
			if (!f32 && simd)
				attn_simd_scale_f16(acc, ms, dim);
			else
				for (int d = 0; d < dim; d++)
					acc[d] = f32 ? acc[d] * ms : attn_f16_round(acc[d] * ms);
		} else {
			vs = expf(s - *M);
		}
		if (!f32 && simd) {
			attn_simd_fma_f16(acc, ks->row[i], vs, dim);
			*S = *S * ms + vs;
			continue;
		}
		attn_gather_load(ks, i, dim, vrow);
		if (f32) {
			for (int d = 0; d < dim; d++)
				acc[d] = fmaf(vrow[d], vs, acc[d]);
		} else {
			for (int d = 0; d < dim; d++)
				acc[d] = attn_f16_round(fmaf(vrow[d], vs, acc[d]));
		}
		*S = *S * ms + vs;
	}
}

/* First key index at or after cell c (keys are in increasing cell order). */
static int attn_gather_first(const struct attn_keys *ks, int c)
{
	int lo = 0, hi = ks->n;
	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (ks->cell[mid] < c)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

ATTN_HOT static void attn_gather_split(const struct attn_keys *ks, int dim, const float *q,
				       float scale, const float *sink, float *out)
{
	const int chunk = (ks->n_cells + ATTN_SPLIT_CHUNKS - 1) / ATTN_SPLIT_CHUNKS;
	float acc[ATTN_MAX_HEAD_DIM], part[ATTN_MAX_HEAD_DIM];
	float M = -INFINITY, S = 0.0f;
	memset(acc, 0, (size_t)dim * sizeof(float));
	for (int ic = 0; ic < ks->n_cells; ic += chunk) {
		const int a = attn_gather_first(ks, ic);
		const int z = attn_gather_first(ks, ic + chunk);
		float m_c, s_c;
		attn_gather_chunk(ks, a, z, dim, q, scale, &m_c, &s_c, part);
		if (sink && ic == 0)
			attn_add_sink(*sink, &m_c, &s_c, part, dim);
		if (s_c == 0.0f)
			continue;
		const float m_new = fmaxf(M, m_c);
		const float scale_old = expf(M - m_new);
		const float scale_new = expf(m_c - m_new);
		for (int d = 0; d < dim; d++)
			acc[d] = fmaf(acc[d], scale_old, part[d] * scale_new);
		S = fmaf(S, scale_old, s_c * scale_new);
		M = m_new;
	}
	attn_normalize(S, acc, dim, out);
}

/* The tiled kernel (see attn_row_tiled) over the cells holding keys. */
ATTN_HOT static void attn_gather_tiled(const struct attn_keys *ks, int dim, const float *q,
				       float scale, const float *sink, float *out)
{
	float acc[ATTN_MAX_HEAD_DIM], vrow[ATTN_MAX_HEAD_DIM];
	float kq[ATTN_TILE_KV], sv[ATTN_TILE_KV];
	float kt[ATTN_MAX_HEAD_DIM * ATTN_TILE_KV]; /* key tile, [d][i] */
	int idx[ATTN_TILE_KV];
	const int simd = attn_simd_ok();
	float S = 0.0f, M = -INFINITY;
	memset(acc, 0, (size_t)dim * sizeof(float));

	int i = 0;
	while (i < ks->n) {
		const int ic = ks->cell[i] - ks->cell[i] % ATTN_TILE_KV;
		int nv = 0;
		while (i < ks->n && ks->cell[i] < ic + ATTN_TILE_KV)
			idx[nv++] = i++;
		for (int u = 0; u < nv; u++) {
			attn_gather_load(ks, idx[u], dim, vrow);
			for (int d = 0; d < dim; d++)
				kt[(size_t)d * ATTN_TILE_KV + (size_t)u] = vrow[d];
		}
		if (simd) {
			attn_simd_tile_scores(q, kt, dim, nv, sv);
		} else {
			for (int u = 0; u < nv; u++)
				sv[u] = 0.0f;
			for (int d = 0; d < dim; d++) {
				const float *row = kt + (size_t)d * ATTN_TILE_KV;
				for (int u = 0; u < nv; u++)
					sv[u] = fmaf(q[d], row[u], sv[u]);
			}
		}
		float tile_max = -INFINITY;
		for (int c = 0; c < ATTN_TILE_KV; c++)
			kq[c] = -INFINITY;
		for (int u = 0; u < nv; u++) {
			const int c = ks->cell[idx[u]] - ic;
			kq[c] = sv[u] * scale;
			if (kq[c] > tile_max)
				tile_max = kq[c];
		}
		if (tile_max == -INFINITY)
			continue;
		attn_tile_softmax(kq, tile_max, &M, &S, acc, dim);
		for (int u = 0; u < nv; u++) {
			const float w = kq[ks->cell[idx[u]] - ic];
			if (!ks->f32 && simd) {
				attn_simd_axpy_f16(w, ks->row[idx[u]], acc, dim);
				continue;
			}
			attn_gather_load(ks, idx[u], dim, vrow);
			for (int d = 0; d < dim; d++)
				acc[d] = fmaf(w, vrow[d], acc[d]);
		}
	}
	if (sink) {
		float m = M;
		attn_add_sink(*sink, &m, &S, acc, dim);
	}
	attn_normalize(S, acc, dim, out);
}

size_t attn_gather_scratch_floats(int n_head, int dim)
{
	/* vt [tile][dim], kt [dim][tile], acc [n_head][dim], sv and kq
	 * [n_head][tile], M and S [n_head] */
	return (size_t)2 * ATTN_TILE_KV * (size_t)dim + (size_t)n_head * (size_t)dim +
	       (size_t)n_head * (2 * ATTN_TILE_KV + 2);
}

/* The tiled kernel for nh heads over the same keys: each tile's keys are
 * converted (and transposed) once; per head the arithmetic is exactly
 * attn_gather_tiled's. */
ATTN_HOT static void attn_gather_tiled_heads(const struct attn_keys *ks, int nh, int dim,
					     const float *q, float scale, const float *sinks,
					     float *scr, float *out)
{
	enum { T = ATTN_TILE_KV };
	float *vt = scr;			  /* [T][dim] key rows as F32 */
	float *kt = vt + (size_t)T * (size_t)dim; /* [dim][T] transposed */
	float *acc = kt + (size_t)T * (size_t)dim;
	float *sv = acc + (size_t)nh * (size_t)dim; /* scores, then weights, by key */
	float *kq = sv + (size_t)nh * T;	    /* by cell of the tile */
	float *Mh = kq + (size_t)nh * T, *Sh = Mh + nh;
	int idx[ATTN_TILE_KV], live[ATTN_TILE_KV];
	const int simd = attn_simd_ok() && dim % 8 == 0;
	memset(acc, 0, (size_t)nh * (size_t)dim * sizeof(float));
	for (int h = 0; h < nh; h++) {
		Mh[h] = -INFINITY;
		Sh[h] = 0.0f;
	}

	int i = 0;
	while (i < ks->n) {
		const int ic = ks->cell[i] - ks->cell[i] % T;
		int nv = 0;
		while (i < ks->n && ks->cell[i] < ic + T)
			idx[nv++] = i++;
		const int nv8 = (nv + 7) & ~7;
		for (int u = 0; u < nv; u++) {
			float *dst = vt + (size_t)u * (size_t)dim;
			if (!ks->f32 && simd)
				attn_simd_f16_row(ks->row[idx[u]], dst, dim);
			else
				attn_gather_load(ks, idx[u], dim, dst);
		}
		if (nv8 > nv)
			memset(vt + (size_t)nv * (size_t)dim, 0,
			       (size_t)(nv8 - nv) * (size_t)dim * sizeof(float));
		/* sv[h][u] = fma chain over d of q[h][d] * k_u[d] */
		if (simd) {
			attn_simd_transpose(vt, nv8, dim, kt, T);
			attn_simd_scores(kt, T, dim, nv8, q, (size_t)dim, nh, sv, T);
		} else {
			for (int h = 0; h < nh; h++)
				for (int u = 0; u < nv; u++) {
					const float *qh = q + (size_t)h * (size_t)dim;
					const float *k = vt + (size_t)u * (size_t)dim;
					float a = 0.0f;
					for (int d = 0; d < dim; d++)
						a = fmaf(qh[d], k[d], a);
					sv[(size_t)h * T + (size_t)u] = a;
				}
		}
		int n_live = 0;
		for (int h = 0; h < nh; h++) {
			float *kh = kq + (size_t)h * T, *sh = sv + (size_t)h * T;
			float *ah = acc + (size_t)h * (size_t)dim;
			float tile_max = -INFINITY;
			for (int c = 0; c < T; c++)
				kh[c] = -INFINITY;
			for (int u = 0; u < nv; u++) {
				const int c = ks->cell[idx[u]] - ic;
				kh[c] = sh[u] * scale;
				if (kh[c] > tile_max)
					tile_max = kh[c];
			}
			if (tile_max == -INFINITY)
				continue; /* the head skips this tile */
			live[n_live++] = h;
			attn_tile_softmax(kh, tile_max, &Mh[h], &Sh[h], ah, dim);
			for (int u = 0; u < nv; u++)
				sh[u] = kh[ks->cell[idx[u]] - ic];
		}
		/* acc[h][d] = fma chain over the tile's keys of w[h][u] * v_u[d] */
		if (simd && n_live == nh) {
			attn_simd_values(vt, nv, dim, sv, T, nh, acc);
			continue;
		}
		for (int l = 0; l < n_live; l++) {
			const int h = live[l];
			float *ah = acc + (size_t)h * (size_t)dim;
			if (simd) {
				attn_simd_values(vt, nv, dim, sv + (size_t)h * T, T, 1, ah);
				continue;
			}
			for (int u = 0; u < nv; u++) {
				const float w = sv[(size_t)h * T + (size_t)u];
				const float *v = vt + (size_t)u * (size_t)dim;
				for (int d = 0; d < dim; d++)
					ah[d] = fmaf(w, v[d], ah[d]);
			}
		}
	}
	for (int h = 0; h < nh; h++) {
		float *ah = acc + (size_t)h * (size_t)dim;
		if (sinks) {
			float m = Mh[h];
			attn_add_sink(sinks[h], &m, &Sh[h], ah, dim);
		}
		attn_normalize(Sh[h], ah, dim, out + (size_t)h * (size_t)dim);
	}
}

void attn_gather_heads(const struct attn_keys *ks, int n_head, int dim, const float *q, float scale,
		       const float *sinks, float *scratch, float *out)
{
	assert(dim > 0 && dim <= ATTN_MAX_HEAD_DIM);
	pthread_once(&attn_f16_once, attn_f16_table_init);
	if (ks->kernel == ATTN_KERNEL_TILED) {
		attn_gather_tiled_heads(ks, n_head, dim, q, scale, sinks, scratch, out);
		return;
	}
	for (int h = 0; h < n_head; h++)
		attn_gather_row(ks, dim, q + (size_t)h * (size_t)dim, scale,
				sinks ? sinks + h : NULL, out + (size_t)h * (size_t)dim);
}

void attn_gather_row(const struct attn_keys *ks, int dim, const float *q, float scale,
		     const float *sink, float *out)
{
	assert(dim > 0 && dim <= ATTN_MAX_HEAD_DIM);
	pthread_once(&attn_f16_once, attn_f16_table_init);
	if (ks->kernel == ATTN_KERNEL_TILED) {
		attn_gather_tiled(ks, dim, q, scale, sink, out);
		return;
	}
	if (ks->kernel == ATTN_KERNEL_SPLIT) {
		attn_gather_split(ks, dim, q, scale, sink, out);
		return;
	}
	float acc[ATTN_MAX_HEAD_DIM];
	float M, S;
	attn_gather_chunk(ks, 0, ks->n, dim, q, scale, &M, &S, acc);
	if (sink)
		attn_add_sink(*sink, &M, &S, acc, dim);
	attn_normalize(S, acc, dim, out);
}

ATTN_HOT void attn_soft_max_row(float *x, int n)
{
	float max = -INFINITY;
	for (int i = 0; i < n; i++)
		max = fmaxf(max, x[i]);
	double sum = 0.0;
	int i = 0;
	for (; i + ATTN_GGML_LANES - 1 < n; i += ATTN_GGML_LANES) {
		for (int l = 0; l < ATTN_GGML_LANES; l++)
			x[i + l] = attn_vexpf(x[i + l] - max);
		sum += (double)attn_hsum_softmax(x + i);
	}
	for (; i < n; i++) {
		x[i] = expf(x[i] - max);
		sum += (double)x[i];
	}
	const float inv = (float)(1.0 / sum);
	for (i = 0; i < n; i++)
		x[i] *= inv;
}
