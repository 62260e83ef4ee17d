/* attn_internal: what the files of the attention module share; private to
 * coordinator/model/attn*.c (the module's contract is attn.h).
 *  - ggml's numerics as inline helpers (F16 conversion and rounding, ggml's
 *    vector expf and lane sums, its F16 dot product, a tile's softmax step,
 *    the sink and the final division): the kernels of attn.c and
 *    attn_gather.c inline them, so both round alike;
 *  - the KV cache's state and attn_forward()'s job, the tiled kernel and the
 *    sharded numerics' merge tree (attn.c), which attn_host.c runs on a KV
 *    host's pages and on the coordinator's own pages, and the remote path
 *    attn_forward() hands a layer to (attn_host.c);
 *  - the SIMD inner loops (attn_simd.c).  attn_simd_ok() says whether they may
 *    be called: 1 when built with AVX2+FMA+F16C forms and the CPU has them
 *    (and kern_force_ref(1) is off); otherwise the scalar loops run, which
 *    compute the same bits. */
#ifndef MOEFLEET_ATTN_INTERNAL_H
#define MOEFLEET_ATTN_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "attn.h"
#include "../../kernels/kern.h"
#include "../../kernels/kern_bits.h"
#include "../../kernels/kern_expf.h"

/* The row kernels are built twice and chosen at load time by CPU: with FMA,
 * fmaf() is one instruction instead of a library call (same result: an FMA
 * is exact by definition). */
/* not under TSan: it instruments the clone resolver, which runs before it is set up */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define ATTN_HOT __attribute__((target_clones("fma", "default")))
#else
#define ATTN_HOT
#endif

/* ------------------------------------------------- SIMD (attn_simd.c) */

int attn_simd_ok(void);
void attn_simd_f16_row(const uint16_t *src, float *dst, int n);
void attn_simd_axpy_f16(float w, const uint16_t *v, float *acc, int n);
void attn_simd_axpy(float q, const float *row, float *sv, int n);
void attn_simd_dot16(const float *q16, const uint16_t *k, int np, float *out);
void attn_simd_tile_scores(const float *q, const float *kt, int dk, int nv, float *sv);
void attn_simd_scale_f16(float *acc, float ms, int n);
void attn_simd_fma_f16(float *acc, const uint16_t *v, float w, int n);
void attn_simd_transpose(const float *vt, int nv8, int dim, float *kt, int ld);
void attn_simd_scores(const float *kt, int ld, int dim, int nv8, const float *q, size_t qs, int nh,
		      float *sv, int svs);
void attn_simd_values(const float *vt, int nv, int dim, const float *w, int ws, int nh, float *acc);

/* ------------------------------------------------------- ggml's numerics */

/* f16 bits -> f32 value, filled by attn_f16_init() (once per process) before
 * a kernel reads it. */
extern float attn_f16_table[65536];
void attn_f16_init(void);

static inline float attn_f16_to_f32(uint16_t h)
{
	return attn_f16_table[h];
}

/* x rounded to the nearest F16 value (ties to even), as a float: the value an
 * F16 store followed by a load gives (F16C's VCVTPS2PH with rounding mode 0). */
static inline float attn_f16_round(float x)
{
	uint32_t u = kern_f32_bits(x);
	uint32_t a = u & 0x7fffffffu;
	if (a >= 0x38800000u && a < 0x477ff000u) {
		/* normal half: drop 13 mantissa bits, ties to even */
		a += 0x0fffu + ((a >> 13) & 1u);
		a &= ~0x1fffu;
		return kern_bits_f32((u & 0x80000000u) | a);
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
static inline __attribute__((always_inline)) float attn_vexpf(float x)
{
	return kern_expf_avx512_lane(x);
}

/* _mm512_reduce_add_ps as GCC implements it: what both ggml_vec_soft_max_f32
 * and GGML_F32Cx16_REDUCE end with. */
static inline float attn_hsum_softmax(const float *a)
{
	float t[8], u[4];
	for (int i = 0; i < 8; i++)
		t[i] = a[i + 8] + a[i];
	for (int i = 0; i < 4; i++)
		u[i] = t[i + 4] + t[i];
	return (u[0] + u[2]) + (u[1] + u[3]);
}

static inline float attn_hsum_dot(const float *a)
{
	return attn_hsum_softmax(a);
}
#else
static inline __attribute__((always_inline)) float attn_vexpf(float x)
{
	return kern_expf_avx2_lane(x);
}

/* ggml_vec_soft_max_f32's AVX2 sum of 8 lanes (halves, movehl, movehdup). */
static inline float attn_hsum_softmax(const float *a)
{
	float p[4];
	for (int i = 0; i < 4; i++)
		p[i] = a[i + 4] + a[i];
	return (p[0] + p[2]) + (p[1] + p[3]);
}

/* The horizontal part of GGML_F32x8_REDUCE (halves, then two hadds). */
static inline float attn_hsum_dot(const float *a)
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
static inline float attn_dot_f16(const float *q16, const uint16_t *k, int n, int simd)
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

/* Adds a sink logit t to the softmax state (M, S, acc), as ggml's kernels do
 * after the keys: the one-row kernel also moves M to t when t is larger. */
static inline void attn_add_sink(float t, float *M, float *S, float *acc, int dv)
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

/* Folds a chunk's softmax state (m_c, s_c, part[dv]) into (M, S, acc[dv]),
 * as ggml's split-KV reduction does; a chunk that saw no key (s_c 0) leaves
 * them as they are. */
static inline void attn_fold_chunk(float m_c, float s_c, const float *part, float *M, float *S,
				   float *acc, int dv)
{
	if (s_c == 0.0f)
		return;
	const float m_new = fmaxf(*M, m_c);
	const float scale_old = expf(*M - m_new);
	const float scale_new = expf(m_c - m_new);
	for (int d = 0; d < dv; d++)
		acc[d] = fmaf(acc[d], scale_old, part[d] * scale_new);
	*S = fmaf(*S, scale_old, s_c * scale_new);
	*M = m_new;
}

/* out = acc * (1 / S) (zero when no key was visible). */
static inline void attn_normalize(float S, const float *acc, int dv, float *out)
{
	const float s_inv = S == 0.0f ? 0.0f : 1.0f / S;
	for (int d = 0; d < dv; d++)
		out[d] = acc[d] * s_inv;
}

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

/* ------------------------------------------------------------- the cache */

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

/* The entry of (layer, seq) holding position pos (slot pos % cap). */
static inline size_t attn_entry(const attn_cache *c, int layer, int seq, int pos)
{
	const int cap = c->cap[layer];
	return c->off[layer] + (size_t)seq * (size_t)cap + (size_t)(pos % cap);
}

/* ------------------------------------------------ attn_forward's kernels */

/* One attn_forward() call, as its pool threads read it. */
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

/* Where the tiled kernel reads one KV head: position j's key at
 * k + (j % cap) * ks and its value at v + (j % cap) * vs (F16 bit patterns),
 * dk and dv values. */
struct attn_src {
	const uint16_t *k, *v;
	size_t ks, vs;
	int dk, dv;
	int cap;
};

/* Heads of one token computed together by the tiled kernel (at most). */
#define ATTN_GROUP 4

/* The running softmax state of up to ATTN_GROUP heads in the tiled kernel:
 * maximum, sum and F32 accumulator [ng][dv]. */
struct attn_run {
	float M[ATTN_GROUP], S[ATTN_GROUP];
	float acc[ATTN_GROUP * ATTN_MAX_HEAD_DIM];
};

/* The merge tree of the sharded numerics, built by a binary counter as its
 * leaves come in chain order: a leaf (or an aligned subtree) of level l is
 * pushed, and while the two top entries have the same level they merge, the
 * lower chains on the left.  With V a power of two it ends as one root. */
struct attn_tree {
	struct attn_run st[ATTN_SHARD_LEVELS + 1];
	int level[ATTN_SHARD_LEVELS + 1];
	int n;
};

/* attn.c */
struct attn_kvf *attn_kvf_get(const attn_cache *c, int ith);
float *attn_kvf_tile(struct attn_kvf *f, int dk, int dv);
void attn_tiles(const struct attn_src *src, const struct attn_kvf *kvf, float *tile, int a0, int z1,
		const float *q, int ng, float scale, struct attn_run *r);
const float *attn_rows_src(const struct attn_job *jb, int t, int h0, struct attn_src *src);
float *attn_rows_out(const struct attn_job *jb, int t, int h0);
void attn_run_init(struct attn_run *r, int ng, int dv);
void attn_run_merge(struct attn_run *a, const struct attn_run *b, int ng, int dv);
void attn_run_finish(struct attn_run *r, int ng, int dv, const float *sinks, float *out);
struct attn_run *attn_tree_next(struct attn_tree *tr, int ng, int dv);
void attn_tree_push(struct attn_tree *tr, int level, int ng, int dv);
void attn_chains(const struct attn_src *src, const struct attn_page *pages, size_t koff,
		 size_t voff, const struct attn_kvf *kvf, struct attn_kvf *pkv, float *tile, int P,
		 int V, int v0, int v1, int n_page, const float *q, int ng, float scale,
		 struct attn_tree *tr);
int64_t attn_units(const struct attn_params *ap, int n_rows);
void attn_unit(const struct attn_params *ap, int n_rows, int64_t u, int *t, int *h0, int *ng);

/* attn_host.c */
/* attn_forward() with the chains on KV hosts (c->remote, a layer without a
 * window). */
int attn_forward_remote(pool *p, const struct attn_job *jb);

#endif
