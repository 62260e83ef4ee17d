/* attn_gather: attention over keys gathered by the caller (DeepSeek-V4, one
 * vector as key and value; see attn.h), and ggml's softmax of one row.  The
 * three kernels of attn_forward() (attn.c) on a list of keys placed by their
 * cell in llama.cpp's KV view instead of a cache: the one-row kernel (F16
 * query and accumulator, or F32 rows with an F32 query and accumulator), the
 * split decode over two halves of the cells, and the tiled kernel with tiles
 * at multiples of ATTN_TILE_KV cells, alone or for several heads at once.
 * The roundings are attn.c's: the same inline helpers (attn_internal.h). */
#include "attn.h"
#include "attn_internal.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include "../../kernels/kern.h"

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
		attn_fold_chunk(m_c, s_c, part, &M, &S, acc, dim);
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
	attn_f16_init();
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
	attn_f16_init();
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
