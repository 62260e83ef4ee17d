/* kern: tensor element types and the dot-product kernels behind every matmul.
 *
 * Types use GGML's ids and block layouts so weights are used straight from the
 * mmapped GGUF (little-endian):
 *   F32   (0)  4 bytes per value
 *   F16   (1)  2 bytes per value, IEEE half
 *   Q4_0  (2)  18 bytes per 32: f16 d, 16 bytes; byte j = value j (low nibble),
 *              value j+16 (high nibble); x = (nibble - 8) * d
 *   Q8_0  (8)  34 bytes per 32: f16 d, 32 x int8; x = q * d
 *   BF16  (30) 2 bytes per value, upper half of an f32
 *   I32   (26) 4 bytes per value, little-endian int32: integer tables only
 *              (deepseek4's ffn_gate_tid2eid); never a matmul weight
 *   MXFP4 (39) 17 bytes per 32: u8 E8M0 exponent e, 16 bytes in Q4_0's nibble
 *              order; a nibble is an E2M1 code (bit 3 sign, bits 0-2 index into
 *              {0, .5, 1, 1.5, 2, 3, 4, 6}); x = E2M1 * 2^(e-127)  (OCP MX v1.0)
 * and the further block types of GGML with its ids and byte layouts, grouped
 * by family (each family's file documents its layouts):
 *   32-value blocks (kern_legacy_*.c): Q4_1 (3), Q5_0 (6), Q5_1 (7),
 *              IQ4_NL (20); activation-only Q8_1 (9)
 *   256-value K-quants (kern_kq_*.c): Q2_K (10), Q3_K (11), Q4_K (12),
 *              Q5_K (13), Q6_K (14), IQ4_XS (23); activation-only Q8_K (15)
 *   256-value grid types (kern_iq_*.c): IQ2_XXS (16), IQ2_XS (17),
 *              IQ3_XXS (18), IQ1_S (19), IQ3_S (21), IQ2_S (22), IQ1_M (29)
 *
 * Matching llama.cpp's CPU numerics: a weight type multiplies activations
 * converted to its "activation type" (kern_act_type): quantised weights
 * (Q4_0, Q8_0, MXFP4, Q5_0, IQ4_NL) take activations quantised to Q8_0 blocks
 * of 32 (d = amax / 127 rounded to f16, q = round-to-nearest(x / d)); Q4_1 and
 * Q5_1 take Q8_1 (Q8_0 plus s = f16(d * sum q)); K-quants, IQ4_XS and the grid
 * types take Q8_K (blocks of 256, f32 d = max / -127 of the signed value of
 * largest magnitude, q = round-half-even(x * -127 / max), 16 sums of 16 q); F16 weights take
 * F16 activations, BF16 weights BF16 activations, F32 weights F32.  Integer
 * block dot products are summed in int32 per block and scaled in float, as
 * ggml does.
 *
 * Every SIMD function has a scalar twin named *_ref with the same signature;
 * tests/test_kern.c checks one against the other.  kern_init() picks the best
 * implementation for this CPU once (AVX-512 F/BW/VL/DQ/VNNI with the OS saving
 * ZMM state, else AVX2+FMA+F16C, else scalar; a kernel without an AVX-512 form
 * takes its AVX2 one); the dispatched entry points below may be called from
 * any thread afterwards.  Every level computes the same bits. */
#ifndef MOEFLEET_KERN_H
#define MOEFLEET_KERN_H

#include <stddef.h>
#include <stdint.h>

enum kern_type {
	KERN_F32 = 0,
	KERN_F16 = 1,
	KERN_Q4_0 = 2,
	KERN_Q4_1 = 3,
	KERN_Q5_0 = 6,
	KERN_Q5_1 = 7,
	KERN_Q8_0 = 8,
	KERN_Q8_1 = 9, /* activations only */
	KERN_Q2_K = 10,
	KERN_Q3_K = 11,
	KERN_Q4_K = 12,
	KERN_Q5_K = 13,
	KERN_Q6_K = 14,
	KERN_Q8_K = 15, /* activations only */
	KERN_IQ2_XXS = 16,
	KERN_IQ2_XS = 17,
	KERN_IQ3_XXS = 18,
	KERN_IQ1_S = 19,
	KERN_IQ4_NL = 20,
	KERN_IQ3_S = 21,
	KERN_IQ2_S = 22,
	KERN_IQ4_XS = 23,
	KERN_I32 = 26, /* storage only: no dot product, no conversion */
	KERN_IQ1_M = 29,
	KERN_BF16 = 30,
	KERN_MXFP4 = 39,
};

#define KERN_QK	  32  /* values per block of the 32-value block types */
#define KERN_QK_K 256 /* values per block of the K-quants and grid types */

/* Type table. */
int kern_type_known(uint32_t type); /* 1 for the types above */
/* 1 if it can be a matrix for kern_dot/kern_matmul (not I32, Q8_1, Q8_K) */
int kern_type_dot(uint32_t type);
/* "Q4_0", ...; GGML's name for ids GGML has but moefleet does not read
 * ("TQ1_0"), "?" otherwise. */
const char *kern_type_name(uint32_t type);
int kern_type_block(uint32_t type); /* values per block: 1, 32 or 256 (0 if unknown) */
size_t kern_type_block_bytes(uint32_t type);
/* Bytes of a row of n values (n a multiple of the block). */
size_t kern_row_bytes(uint32_t type, int64_t n);
enum kern_type kern_act_type(uint32_t weight_type);

/* Scalar conversions (exact, round-to-nearest-even like ggml). */
float kern_f16_to_f32(uint16_t h);
uint16_t kern_f32_to_f16(float f);
float kern_bf16_to_f32(uint16_t h);
uint16_t kern_f32_to_bf16(float f);

/* Instruction set levels, each including the one below. */
enum kern_isa { KERN_ISA_SCALAR = 0, KERN_ISA_AVX2 = 1, KERN_ISA_AVX512 = 2 };

/* Detects CPU features and selects implementations.  Idempotent.  The
 * environment variable MOEFLEET_ISA=scalar|avx2|avx512 caps the level used
 * (read once, by the first call; other values are ignored).
 * kern_force_ref(1) makes every dispatched call use the scalar twin;
 * kern_limit_isa(level) caps the level from now on (tests compare the levels;
 * KERN_ISA_AVX512 lifts the cap). */
void kern_init(void);
void kern_force_ref(int on);
void kern_limit_isa(enum kern_isa max);
/* The level this CPU (and OS) runs, whatever the caps say. */
enum kern_isa kern_cpu_isa(void);
/* The level in use now (after kern_init(), caps and kern_force_ref). */
enum kern_isa kern_isa_now(void);
const char *kern_isa_name(void); /* "avx512", "avx2" or "scalar" */
/* 1 if this CPU runs AVX2+FMA+F16C code (whatever kern_force_ref says). */
int kern_cpu_avx2(void);
/* 1 if SIMD code outside this module (attention) may take its AVX2 form now:
 * the CPU runs it and kern_force_ref(1) is not in effect.  Needs no
 * kern_init(); cheap enough to ask per call. */
int kern_use_avx2(void);

/* Row conversions. */
void kern_dequant_row(uint32_t type, const void *src, float *dst, int64_t n);
void kern_dequant_row_ref(uint32_t type, const void *src, float *dst, int64_t n);
/* Converts n floats into the activation type (F32 copies). */
void kern_convert_row(enum kern_type act_type, const float *x, void *dst, int64_t n);
void kern_convert_row_ref(enum kern_type act_type, const float *x, void *dst, int64_t n);

/* One dot product: weight row (weight_type) x activation row
 * (kern_act_type(weight_type)), n values. */
/* g[j] = silu(g[j]) * u[j] for j in [j0, j1) of a row of n values, as
 * llama.cpp's ggml_vec_swiglu_f32 on its AVX-512 x86 build (the reference
 * machine's): values below n - n % 16 take ggml_v_silu, x / (1 + v_expf(0 - x))
 * with ggml's vector exp (AVX-512 form), the last n % 16 x / (1 + expf(-x)). */
void kern_swiglu(float *g, const float *u, int64_t j0, int64_t j1, int64_t n);
void kern_swiglu_ref(float *g, const float *u, int64_t j0, int64_t j1, int64_t n);
float kern_dot(uint32_t weight_type, int64_t n, const void *w, const void *x);
float kern_dot_ref(uint32_t weight_type, int64_t n, const void *w, const void *x);

/* Matrix product over a range of output rows:
 *   y[r * y_stride + o] = dot(W row o, x row r)   for o in [o0, o1), r in [0, n_rows)
 * W is n_out rows of n_in values of weight_type, rows packed, and w points at
 * its row 0: a tile may read rows below o0 (never at or above o1); x holds n_rows
 * rows already converted to the activation type, x_stride bytes apart.  Computes
 * several rows per weight pass where it pays; results equal kern_dot's. */
void kern_matmul(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		 const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride);
/* kern_matmul for a 2-D weight multiplied as one llama.cpp MUL_MAT of n_rows
 * rows (not an expert's share of a MUL_MAT_ID), whose n_out is a multiple of 8.
 * F32 and F16 weights with n_rows >= 2 (n_in a multiple of 16) take
 * llamafile's GEMM form (16 FMA lanes, kern_ref.c) instead of
 * ggml_vec_dot_f32's / _f16's (kern_dot's):
 * llama.cpp repacks Q2_K and Q4_K weights of such products and runs its GEMM
 * on the rows below n_rows - n_rows % 4, which rounds per 64 (Q4_K) or 128
 * (Q2_K) values rather than per block, and runs IQ4_XS products of at least 8
 * rows through its IQ panel GEMM (one accumulator per output, kern_kq_ref.c);
 * those rows get that arithmetic, every other row and type kern_matmul's. */
void kern_matmul_dense(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		       const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride);
/* The per-row choice behind kern_matmul_dense, made by the caller: with
 * batch_form, every row takes the arithmetic llama.cpp's batched dense product
 * gives the rows of a sequence that has them (F32, F16: llamafile's GEMM when
 * n_in % 16 == 0; Q2_K/Q4_K: the repacked GEMM; IQ4_XS: the IQ panel),
 * without it kern_matmul's.  kern_batch_form_type: whether weight_type has
 * such a second form. */
int kern_batch_form_type(uint32_t weight_type);
void kern_matmul_form(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		      int batch_form);
/* kern_matmul for one expert's rows of a llama.cpp MUL_MAT_ID: IQ4_XS experts
 * go through llama.cpp's IQ panel GEMM, which llama.cpp takes for 8 rows or
 * more, whatever the row count (an expert's rows come from every sequence of
 * the batch, so the form may not depend on how many there are); every other
 * type as kern_matmul (Q2_K / Q4_K experts use the repacked GEMV). */
void kern_matmul_expert(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride);
/* kern_matmul for a weight llama.cpp does not repack (a slice of a 3-D weight
 * in a MUL_MAT, e.g. deepseek2's per-head attn_k_b / attn_v_b): IQ4_NL rows as
 * llamafile's GEMM (batched[r] != 0: r's sequence has several rows) or
 * ggml_vec_dot_iq4_nl_q8_0 (one row), scalar only (kern_legacy_ref.c), and
 * F32 / F16 rows as kern_matmul_form with batched[r]; batched NULL: all rows
 * one sequence.  Every other type as kern_matmul. */
void kern_matmul_unpacked(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			  const void *x, size_t x_stride, int64_t n_rows, float *y,
			  int64_t y_stride, const uint8_t *batched);

#endif
