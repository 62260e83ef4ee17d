/* attn: causal multi-head attention over a per-sequence KV cache.
 *
 * The cache keeps, for every layer, sequence slot and position, one key vector
 * of k_width values and one value vector of v_width values, stored as F16 (as
 * llama.cpp's default KV cache; values are rounded when stored).  One cache
 * serves GQA (qwen3moe, gpt-oss: k_width = n_head_kv * head_dim) and MLA in the
 * absorbed form (deepseek2: one shared KV head, key = [c, k_pe], value = c).
 *
 * attn_forward() reproduces llama.cpp's CPU flash attention (ggml-cpu/ops.cpp,
 * ggml_compute_forward_flash_attn_ext_f16) bit for bit where it can: an online
 * softmax over the visible keys in position order, optional per-head sink
 * logits that join the denominator only, the same roundings (F16 query and
 * accumulator on the one-row path) and the same order of additions as ggml's
 * AVX-512 build (the reference machine; -DATTN_GGML_LANES=8 for its AVX2 build,
 * which this file was checked against: identical outputs on every path).
 * Token t of the batch (sequence s, position p) sees the entries j <= p of s,
 * and only j > p - window when window > 0.  Entries for the batch's own tokens
 * must be stored (attn_cache_store) before attn_forward() is called.
 *
 * A layer holds every position of the context (n_ctx per sequence), or, with
 * a sliding window, a ring of cap positions: position j lives in slot
 * j % cap, so storing j replaces j - cap.  The caller promises that within
 * one attn_forward() each sequence's batch tokens span at most
 * cap - window + 1 consecutive positions; then the ring still holds every key
 * a query of the batch sees (checked by an assert). */
#ifndef MOEFLEET_ATTN_H
#define MOEFLEET_ATTN_H

#include <stddef.h>
#include <stdint.h>

#include "../../common/pool.h"
#include "model.h"

typedef struct attn_cache attn_cache;

/* Largest head size (key or value) attn_forward supports; its per-thread
 * buffers live on the stack. */
#define ATTN_MAX_HEAD_DIM 1024

int attn_cache_new(int n_layer, int n_seq, int n_ctx, int k_width, int v_width, attn_cache **out);
/* attn_cache_new with rings: ring[n_layer] gives each layer's slots per
 * sequence (0, or n_ctx and more: the whole context); NULL: no ring.  A ring
 * layer needs a sliding window of at most its size (attn_check_layer). */
int attn_cache_new_ring(int n_layer, int n_seq, int n_ctx, int k_width, int v_width,
			const int *ring, attn_cache **out);
/* A cache whose values are the first v_width (<= k_width) values of each key
 * (deepseek2's MLA: key [c | k_pe], value c), stored once: the keys' bytes
 * only, and the same results as attn_cache_new with the values stored apart.
 * One KV head (attn_check_params refuses others); attn_cache_store ignores
 * its v. */
int attn_cache_new_shared(int n_layer, int n_seq, int n_ctx, int k_width, int v_width,
			  attn_cache **out);
void attn_cache_destroy(attn_cache **c);

/* Sharded numerics (--kv-shards V --kv-page P): from now on attn_forward()
 * computes every row with ggml's tiled kernel (F32 query and accumulator,
 * tiles of ATTN_TILE_KV positions), and, on layers without a sliding window,
 * splits a row's keys by page: the complete pages before the row's own page
 * (P positions each) go to V chains, page i to chain i mod V, each chain the
 * tiled kernel over its pages in order; the chains are merged in a fixed
 * balanced binary tree over the chain index, then the row's own page, then
 * the sink (the merge is attn_row_split's formula).  The result of a row
 * depends on its query, its keys, V and P only: not on the batch, its
 * sequence's other rows nor how a prompt is cut into steps; and the chains
 * can be computed anywhere (a KV host) as long as they are merged in that
 * tree.  It is within float tolerance of the default (llama.cpp's) numerics,
 * not equal to them.  n_shard: 0 (off, the default) or a power of two up to
 * 64; page: a positive multiple of ATTN_TILE_KV.  ERR_CONFIG otherwise. */
int attn_cache_set_shards(attn_cache *c, int n_shard, int page);
/* Also forgets which of the slot's pages went to KV hosts; when some did,
 * the hosts drop them all (attn_remote_ops' free_seq). */
void attn_cache_reset_seq(attn_cache *c, int seq);
/* Benchmark only: sequence seq holds n_pos positions of deterministic
 * pseudo-random keys and values (F16 of magnitude in [2^-7, 2), from seed) on
 * every layer, as if a prompt of n_pos tokens had been run (the slot is reset
 * first), and with KV hosts the complete pages of the layers without a
 * sliding window have been shipped to their hosts and released here, as that
 * prompt's steps would.  Attention costs the same whatever the values; the
 * results mean nothing.  ERR_RANGE (logged) for a bad seq or n_pos; a
 * ship() error as is. */
int attn_cache_fill_random(attn_cache *c, int seq, int n_pos, uint64_t seed);
/* k: k_width floats, v: v_width floats (rounded to F16). */
void attn_cache_store(attn_cache *c, int layer, int seq, int pos, const float *k, const float *v);

struct attn_params {
	int n_head;
	int n_head_kv;	/* query head h uses KV head h / (n_head / n_head_kv) */
	int head_dim_k; /* per head; k_width = n_head_kv * head_dim_k */
	int head_dim_v;
	float scale;
	int window;	    /* 0: none */
	const float *sinks; /* [n_head] or NULL */
};

/* Checks attention parameters against a cache once, at load time: head sizes
 * in [1, ATTN_MAX_HEAD_DIM], n_head a multiple of n_head_kv, the per-head
 * sizes times n_head_kv equal to the cache's widths, window >= 0, a finite
 * scale.  Logs "WHAT: problem" (what: e.g. the model file) and returns
 * ERR_FORMAT on failure.  attn_forward() assumes parameters that passed. */
int attn_check_params(const attn_cache *c, const struct attn_params *ap, const char *what);
/* attn_check_params for the parameters of one layer, and, when the layer is a
 * ring, that ap has a sliding window no larger than the ring. */
int attn_check_layer(const attn_cache *c, int layer, const struct attn_params *ap,
		     const char *what);

/* q: [n_tokens][n_head][head_dim_k]; out: [n_tokens][n_head][head_dim_v].
 * Threaded over (token, head) with the pool.  Not to be called concurrently on
 * one cache (it keeps a little scratch there).  The result does not depend on
 * the thread count, nor on the other sequences sharing the batch; like
 * llama.cpp's, it does depend on how many tokens of the token's own sequence
 * the batch holds, which picks ggml's kernel (as llama.cpp would pick it for
 * that sequence alone):
 *  - fewer than ATTN_TILE_Q tokens (decode steps, short prefills): the one-row
 *    kernel (..._f16_one_chunk): per key, score = F16(q) . k, online softmax
 *    with the value accumulator rounded to F16 after every key;
 *  - one token whose llama.cpp cache view has >= 512 cells (position >= 256)
 *    and no window: the same kernel on two halves of the cells, merged in F32
 *    (ggml's split-KV decode with llama.cpp's 2 threads);
 *  - ATTN_TILE_Q tokens or more (head_dim_v a multiple of the SIMD width):
 *    the tiled kernel: F32 query, keys in tiles of ATTN_TILE_KV positions,
 *    one max/sum update per tile with ggml's vector expf, F32 accumulator.
 * All then add the sink, if any, and multiply by 1/sum. */
#define ATTN_TILE_Q  64
#define ATTN_TILE_KV 64
int attn_forward(pool *p, const attn_cache *c, int layer, const struct attn_params *ap,
		 const model_batch *b, const float *q, float *out);

/* ------------------------------------------- sharded attention on KV hosts
 *
 * With sharded numerics (attn_cache_set_shards) the chains of complete pages
 * can be computed on other machines: R KV hosts (R a power of two dividing
 * V), host h computing chains [h V/R, (h+1) V/R) -- an aligned subtree of the
 * merge tree -- over the pages it was sent, and answering one partial per
 * (row, head): its subtree's running max M, sum S and accumulator, laid out as
 * ATTN_PART_FLOATS(dv) floats [M, S, acc[dv]] (an empty subtree has S = 0).
 * The coordinator keeps each row's own page, merges the hosts' partials in
 * host order (the same tree), then the own page, then the sink: the same bits
 * as attn_forward() without hosts.  Sliding-window layers stay local. */
#define ATTN_PART_FLOATS(dv) (2 + (size_t)(dv))
#define ATTN_MAX_HOSTS	     64 /* = the most chains */

/* One complete page on a KV host: the keys of its P positions, k_width apart,
 * and their values, v_stride apart (the keys' address again when the values
 * are the keys' first values, as deepseek2's). */
struct attn_page {
	const uint16_t *k, *v;
};

/* attn_host_forward()'s scratch kept from one call to the next: per pool
 * thread a tile buffer and F32 copies of the pages of a prompt batch (one KV
 * head's keys and values per page), grown on demand and held until
 * attn_host_scratch_destroy(). */
typedef struct attn_host_scratch attn_host_scratch;
void attn_host_scratch_destroy(attn_host_scratch **s);

/* A host's share of one layer's rows. */
struct attn_host_job {
	const struct attn_params *ap; /* heads, sizes, scale (window and sinks unused) */
	int k_width, v_stride;	      /* of the pages, in F16 values */
	int page, n_shard;	      /* P and V */
	int v0, v1;		      /* the chains to compute: an aligned subtree */
	int n_rows;
	const int32_t *pos;		      /* [n_rows] */
	const struct attn_page *const *pages; /* [n_rows]: the row's sequence's pages by number */
	const int32_t *n_pages;		      /* [n_rows]: entries of pages[r] */
	const float *q;			      /* [n_rows][n_head][head_dim_k] */
	float *part;			      /* [n_rows][n_head][ATTN_PART_FLOATS(dv)] */
	attn_host_scratch **scratch;	      /* created (*scratch NULL) or grown, and kept; NULL:
						 a scratch for this call only */
};

/* Computes job->part.  A row at position p uses the pages i < p / P whose chain
 * i mod V lies in [v0, v1); ERR_RANGE (logged) when one of them is missing
 * (index past n_pages or a NULL k), or the chains are not an aligned subtree. */
int attn_host_forward(pool *p, const struct attn_host_job *job);

/* Where the coordinator's chains go: the seam to the KV hosts (see
 * coordinator/cluster/kvhost.c).  Within one attn_forward(): ship() for every
 * page completed since the last call (before the rows that use it), then
 * submit() to each host whose chains hold a page some row sees, then
 * collect(), which waits for those hosts' partials.  Each returns 0 or a
 * negative error code, which attn_forward() returns. */
struct attn_remote_ops {
	int (*ship)(void *self, int host, int layer, int seq, int page, int n_pos, int k_width,
		    int v_width, const uint16_t *k, const uint16_t *v);
	int (*submit)(void *self, int host, int layer, const struct attn_params *ap, int page,
		      int n_shard, int v0, int v1, const model_batch *b, const float *q);
	/* parts[h], h < n_hosts: [n_tokens][n_head][ATTN_PART_FLOATS(dv)] of each
	 * submitted host, NULL for the others */
	int (*collect)(void *self, int layer, const float **parts);
	/* bytes host h offers for pages (its page table included) */
	uint64_t (*budget)(void *self, int host);
	/* DeepSeek-V4's lightning indexer (indexer.h), the same way: idx_ship()
	 * a complete page of n_ent indexer keys of dim F16 values; idx_submit()
	 * a CSA layer's indexer queries q [n_tokens][n_head][dim] and head
	 * weights w [n_tokens][n_head] to a host of chains [v0, v1) of pages of
	 * `page` entries; then collect() gives each submitted host's scores, laid
	 * out as indexer_host_score() computes them. */
	int (*idx_ship)(void *self, int host, int layer, int seq, int page, int n_ent, int dim,
			const uint16_t *k);
	int (*idx_submit)(void *self, int host, int layer, int n_head, int dim, int page,
			  int n_shard, int v0, int v1, const model_batch *b, const float *q,
			  const float *w);
	/* optional (NULL: none), for statistics: after a collect() that waited
	 * for some host, what the coordinator itself spent on the layer's n_rows
	 * rows: seconds on their own pages (while the hosts computed) and on
	 * merging */
	void (*account)(void *self, int layer, int n_rows, double own_s, double merge_s);
	/* optional (NULL: pages are kept): every host drops all pages of seq
	 * (every layer, attention and indexer keys), as the sequence restarts;
	 * pages shipped afterwards reach the hosts after it */
	int (*free_seq)(void *self, int seq);
};

/* shipped [2][n_layer][n_seq] (NULL: none): pages of each (layer, sequence)
 * shipped, then released locally.  Zeroes seq's counts; when a page of seq
 * was shipped, every host of ops (NULL: none) drops the sequence's pages
 * (free_seq).  A failed send is a lost host's, which the next step reports. */
void attn_remote_forget(int32_t *shipped, int n_layer, int n_seq, int seq,
			const struct attn_remote_ops *ops, void *self);

/* The host of page i: its chain i mod n_shard belongs to host chain / (n_shard
 * / n_hosts). */
static inline int attn_page_host(int page, int n_shard, int n_hosts)
{
	return page % n_shard / (n_shard / n_hosts);
}

/* From now on the chains of complete pages on layers without a window are
 * computed by n_hosts hosts (a power of two dividing the cache's V; 0: none,
 * back to local).  No page counts as shipped any more, and the new hosts drop
 * the pages of every sequence that had some shipped (free_seq): after a change
 * of hosts every sequence is reset and computed again (the local copies of
 * shipped pages are gone).  Pages shipped to the hosts are released locally (their
 * memory goes back to the system); the cache keeps every sequence's page in
 * progress.  ERR_CONFIG without sharded numerics, with a bad n_hosts, or when
 * a host would not have room for the pages of one sequence of the whole
 * context (logged with the numbers).  How many sequences run at once is the
 * caller's admission (attn_cache_kv_room): the server admits a request when
 * its pages fit beside those the hosts already hold. */
int attn_cache_set_remote(attn_cache *c, const struct attn_remote_ops *ops, void *self,
			  int n_hosts);

/* What admission needs to know of the KV hosts.  A host holds, per (full
 * layer, slot), the pages of its chains it was sent (a page of page_bytes,
 * page i being chain i mod n_shard, host h's chains [h V/R, (h+1) V/R)), a
 * table entry of entry_bytes per page number up to the last one, and
 * seq_bytes; it offers budget[h]. */
struct attn_kv_room {
	int n_hosts; /* 0: the chains are computed here */
	int n_shard, page, n_layer;
	uint64_t page_bytes, entry_bytes, seq_bytes;
	uint64_t budget[ATTN_MAX_HOSTS];
	uint64_t local_bytes; /* the keys and values of those layers for every slot:
				 what the chains need here without hosts */
};
void attn_cache_kv_room(const attn_cache *c, struct attn_kv_room *r);

/* ------------------------------------------------ attention over gathered keys
 *
 * DeepSeek-V4 attends, per query token, to a list of keys gathered from
 * several caches (its sliding window and the compressed entries), with one
 * vector serving as key and value (K = V).  The caller owns the caches and
 * passes, per token, the keys in llama.cpp's order together with each key's
 * index ("cell") in the KV view llama.cpp would build (window cells first,
 * then compressed cells); the cells decide tile and split boundaries, so the
 * same three kernels as attn_forward() give llama.cpp's roundings.  Rows are
 * F16 (values as stored) or F32 (--kv-type f32: F32 dot products and an F32
 * accumulator on every path, as ggml does for F32 K/V). */
enum attn_kernel {
	ATTN_KERNEL_ONE_ROW = 0, /* ggml's one-row kernel over all keys */
	ATTN_KERNEL_SPLIT = 1,	 /* the same on two halves of the cells, merged */
	ATTN_KERNEL_TILED = 2,	 /* the tiled kernel (tiles of ATTN_TILE_KV cells) */
};

struct attn_keys {
	int n;			/* keys */
	const int32_t *cell;	/* [n] strictly increasing view index of each key */
	const void *const *row; /* [n] key (= value) rows of dim values */
	int f32;		/* rows are F32 (else F16 bit patterns) */
	int n_cells;		/* size of the view (ATTN_KERNEL_SPLIT halves it) */
	enum attn_kernel kernel;
};

/* The kernel llama.cpp picks for a token whose sequence has n_seq_tokens
 * query rows in the micro-batch and a key view of n_cells cells (ggml:
 * tiled from ATTN_TILE_Q rows when dim is a multiple of the SIMD width; a
 * single row over >= 512 cells splits; else one-row). */
enum attn_kernel attn_pick_kernel(int n_seq_tokens, int n_cells, int dim);

/* One (token, head): out[dim] = sum_u e^{s_u} k_u / (sum_u e^{s_u} [+ e^{sink}])
 * with s_u = scale * q . k_u.  q: dim floats (F32).  sink: NULL or one logit.
 * dim <= ATTN_MAX_HEAD_DIM.  No keys: out = 0.  Thread-safe (stack scratch). */
void attn_gather_row(const struct attn_keys *ks, int dim, const float *q, float scale,
		     const float *sink, float *out);

/* attn_gather_row() for n_head query heads over the same keys: q and out
 * [n_head][dim], sinks NULL or [n_head]; every head's result is exactly
 * attn_gather_row()'s.  The tiled kernel converts and transposes each tile of
 * keys once for all heads.  scratch: attn_gather_scratch_floats(n_head, dim)
 * floats of the calling thread's own. */
size_t attn_gather_scratch_floats(int n_head, int dim);
void attn_gather_heads(const struct attn_keys *ks, int n_head, int dim, const float *q, float scale,
		       const float *sinks, float *scratch, float *out);

/* In place: x[n] = softmax(x) as ggml_soft_max computes one row on the CPU
 * (vector expf in groups of the SIMD width, the rest scalar, sum in double,
 * multiplied by the F32 inverse).  -INFINITY entries give 0; at least one
 * entry must be finite.  Used by DeepSeek-V4's compressors. */
void attn_soft_max_row(float *x, int n);

#endif
