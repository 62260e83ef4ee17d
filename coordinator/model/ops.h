/* ops: the numeric building blocks of the forward passes, written to match
 * llama.cpp's CPU results (ggml's order of operations and precisions).
 *
 * ops_matmul is threaded over the process pool; the elementwise ops run on the
 * calling thread (their callers parallelise over rows or heads when it pays).
 * Buffers are the caller's: nothing here allocates. */
#ifndef MOEFLEET_OPS_H
#define MOEFLEET_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "../../common/gguf.h"
#include "../../common/pool.h"

/* Bytes of scratch ops_matmul needs for n_rows rows of n_in values (any type). */
size_t ops_matmul_scratch(int64_t n_in, int64_t n_rows);

/* y[r][o] = sum_i W[o][i] * x[r][i] for a 2-D weight W (ne0 = n_in,
 * ne1 = n_out), with the activations first converted to the weight's
 * activation type (kern_act_type) into scratch.  x rows are x_stride floats
 * apart, y rows y_stride floats apart. */
void ops_matmul(pool *p, const gguf_tensor *w, const float *x, int64_t x_stride, int64_t n_rows,
		float *y, int64_t y_stride, void *scratch);
/* Several 2-D weights that take the same input (an FFN's gate and up): the
 * activations are converted once and all the products share one pool pass.
 * y[i] receives w[i]'s outputs (rows y_stride[i] floats apart); results are
 * those of one ops_matmul per weight.  Weights of different types or input
 * sizes fall back to one ops_matmul each.  n_w <= OPS_MULTI_MAX. */
#define OPS_MULTI_MAX 4
void ops_matmul_multi(pool *p, int n_w, const gguf_tensor *const *w, const float *x,
		      int64_t x_stride, int64_t n_rows, float *const *y, const int64_t *y_stride,
		      void *scratch);
/* The sequences of the batch rows the next products take (model.c sets it
 * around each forward; NULL clears it and frees its table): llama.cpp computes some weight types
 * differently for a sequence of several rows than for one row (F32, F16,
 * Q2_K, Q4_K, IQ4_XS: kern_matmul_form), and each row gets the form its sequence
 * would get alone, so a sequence's results do not depend on the others in the
 * batch.  A product of any other number of rows takes them as one sequence.
 * Per calling thread. */
void ops_batch_rows(const int32_t *seq, int n_rows);
/* The same for the rows t of a batch of n_batch with keep[t] != 0 (keep NULL:
 * all), in batch order: what the products take after a forward pass keeps only
 * the rows whose logits are wanted (llama.cpp multiplies those rows alone). */
void ops_batch_rows_keep(const int32_t *seq, const uint8_t *keep, int n_batch);
/* How many rows row r's sequence has in the batch (n_rows when the product's
 * rows are not the batch's); on the thread that set the batch. */
int64_t ops_seq_rows(int64_t r, int64_t n_rows);
/* The same for a raw weight matrix (e.g. one slice of a 3-D tensor). */
void ops_matmul_raw(pool *p, uint32_t type, const void *w, int64_t n_in, int64_t n_out,
		    const float *x, int64_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		    void *scratch);

/* Bytes of weights one decoded token reads, by part: every tensor once,
 * except the routed experts' (names with "_exps."), of which n_used of
 * ne[2] experts are read, and token_embd, of which one row is read (all of it
 * when there is no output.weight, i.e. tied embeddings). */
struct ops_decode_bytes {
	uint64_t dense;	 /* attention, norms, routers, dense FFNs */
	uint64_t shared; /* shared experts ("shexp") */
	uint64_t routed; /* n_used routed experts per MoE layer */
	uint64_t head;	 /* output projection (and the embedding row) */
	uint64_t total;
};
void ops_decode_bytes(const gguf *g, int n_used, struct ops_decode_bytes *out);
/* Measured read bandwidth (bytes/s) of the pool's threads together over a
 * buffer of `bytes` (much larger than the caches); 0 if it cannot allocate. */
double ops_read_bandwidth(pool *p, size_t bytes);

/* y = x / sqrt(mean(x^2) + eps) (* w if w != NULL); sum in double as ggml. y may be x. */
void ops_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps);
/* In-place softmax over n values (max-subtracted, sum in double). */
void ops_softmax(float *x, int64_t n);
static inline float ops_silu(float x);
void ops_add(float *y, const float *a, const float *b, int64_t n); /* y = a + b */

/* RoPE with YaRN, as ggml_rope_ext on llama.cpp's x86 CPU backend, where GCC
 * fuses multiply-adds: theta = fma(theta_interp, 1 - ramp, theta_extrap *
 * ramp), the magnitude factor fma(0.1, ln(1 / freq_scale), 1), and the
 * rotation x0' = fma(x0, cos, -(x1 sin)), x1' = fma(x0, sin, x1 cos). */
struct ops_rope {
	int n_dims; /* rotated dimensions (pairs: n_dims / 2) */
	int neox;   /* 0: pairs (2i, 2i+1); 1: pairs (i, i + n_dims/2) */
	float freq_base;
	float freq_scale; /* 1 / scaling factor (1 without YaRN) */
	float ext_factor; /* YaRN extrapolation mix; 0 = off */
	float attn_factor;
	float beta_fast;
	float beta_slow;
	int n_ctx_orig;
};
/* Rotates the first n_dims values of x in place for position pos. */
void ops_rope_apply(const struct ops_rope *r, float *x, int64_t pos);

/* Round-trips a value through f16 (as storing to an F16 KV cache does). */
float ops_f16_round(float x);

#include <math.h>
static inline float ops_silu(float x)
{
	return x / (1.0f + expf(-x));
}

#endif
