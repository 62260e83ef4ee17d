/* kern: type table, scalar conversions, run-time dispatch between the scalar
 * (kern_ref.c), AVX2 (kern_avx2.c) and AVX-512 (kern_avx512.c)
 * implementations, and the per-thread scratch buffer of the SIMD matmuls. */
#include <pthread.h>
#include <stdatomic.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"
#include "kernels/kern_bits.h"
#include "kernels/kern_impl.h"

/* ---------------------------------------------------------------- types */

struct kern_type_info {
	const char *name;
	uint16_t block; /* values per block; 0: GGML's id, not read here */
	uint16_t bytes; /* bytes per block */
	uint8_t act;	/* activation type of a weight of this type */
	uint8_t family; /* enum kern_family */
	uint8_t weight; /* 1 if it can be a matmul weight */
};

#define W(n, b, by, a, f)                                                                          \
	{                                                                                          \
		n, b, by, a, f, 1                                                                  \
	}
static const struct kern_type_info kern_types[] = {
    [KERN_F32] = W("F32", 1, 4, KERN_F32, KERN_FAM_BASE),
    [KERN_F16] = W("F16", 1, 2, KERN_F16, KERN_FAM_BASE),
    [KERN_Q4_0] = W("Q4_0", 32, 18, KERN_Q8_0, KERN_FAM_BASE),
    [KERN_Q4_1] = W("Q4_1", 32, 20, KERN_Q8_1, KERN_FAM_LEGACY),
    [4] = {"Q4_2", 0, 0, 0, 0, 0},
    [5] = {"Q4_3", 0, 0, 0, 0, 0},
    [KERN_Q5_0] = W("Q5_0", 32, 22, KERN_Q8_0, KERN_FAM_LEGACY),
    [KERN_Q5_1] = W("Q5_1", 32, 24, KERN_Q8_1, KERN_FAM_LEGACY),
    [KERN_Q8_0] = W("Q8_0", 32, 34, KERN_Q8_0, KERN_FAM_BASE),
    [KERN_Q8_1] = {"Q8_1", 32, 36, KERN_Q8_1, KERN_FAM_LEGACY, 0},
    [KERN_Q2_K] = W("Q2_K", 256, 84, KERN_Q8_K, KERN_FAM_KQ),
    [KERN_Q3_K] = W("Q3_K", 256, 110, KERN_Q8_K, KERN_FAM_KQ),
    [KERN_Q4_K] = W("Q4_K", 256, 144, KERN_Q8_K, KERN_FAM_KQ),
    [KERN_Q5_K] = W("Q5_K", 256, 176, KERN_Q8_K, KERN_FAM_KQ),
    [KERN_Q6_K] = W("Q6_K", 256, 210, KERN_Q8_K, KERN_FAM_KQ),
    [KERN_Q8_K] = {"Q8_K", 256, 292, KERN_Q8_K, KERN_FAM_KQ, 0},
    [KERN_IQ2_XXS] = W("IQ2_XXS", 256, 66, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_IQ2_XS] = W("IQ2_XS", 256, 74, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_IQ3_XXS] = W("IQ3_XXS", 256, 98, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_IQ1_S] = W("IQ1_S", 256, 50, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_IQ4_NL] = W("IQ4_NL", 32, 18, KERN_Q8_0, KERN_FAM_LEGACY),
    [KERN_IQ3_S] = W("IQ3_S", 256, 110, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_IQ2_S] = W("IQ2_S", 256, 82, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_IQ4_XS] = W("IQ4_XS", 256, 136, KERN_Q8_K, KERN_FAM_KQ),
    [24] = {"I8", 0, 0, 0, 0, 0},
    [25] = {"I16", 0, 0, 0, 0, 0},
    [KERN_I32] = {"I32", 1, 4, KERN_F32, KERN_FAM_BASE, 0},
    [27] = {"I64", 0, 0, 0, 0, 0},
    [28] = {"F64", 0, 0, 0, 0, 0},
    [KERN_IQ1_M] = W("IQ1_M", 256, 56, KERN_Q8_K, KERN_FAM_IQ),
    [KERN_BF16] = W("BF16", 1, 2, KERN_BF16, KERN_FAM_BASE),
    [31] = {"Q4_0_4_4", 0, 0, 0, 0, 0},
    [32] = {"Q4_0_4_8", 0, 0, 0, 0, 0},
    [33] = {"Q4_0_8_8", 0, 0, 0, 0, 0},
    [34] = {"TQ1_0", 0, 0, 0, 0, 0},
    [35] = {"TQ2_0", 0, 0, 0, 0, 0},
    [36] = {"IQ4_NL_4_4", 0, 0, 0, 0, 0},
    [37] = {"IQ4_NL_4_8", 0, 0, 0, 0, 0},
    [38] = {"IQ4_NL_8_8", 0, 0, 0, 0, 0},
    [KERN_MXFP4] = W("MXFP4", 32, 17, KERN_Q8_0, KERN_FAM_BASE),
    [40] = {"NVFP4", 0, 0, 0, 0, 0},
    [41] = {"Q1_0", 0, 0, 0, 0, 0},
    [42] = {"Q2_0", 0, 0, 0, 0, 0},
};
#undef W

static const struct kern_type_info *type_info(uint32_t type)
{
	if (type >= sizeof(kern_types) / sizeof(kern_types[0]) || !kern_types[type].block)
		return NULL;
	return &kern_types[type];
}

int kern_type_known(uint32_t type)
{
	return type_info(type) != NULL;
}

int kern_type_dot(uint32_t type)
{
	const struct kern_type_info *t = type_info(type);
	return t && t->weight;
}

int kern_type_family(uint32_t type)
{
	const struct kern_type_info *t = type_info(type);
	return t ? t->family : -1;
}

const char *kern_type_name(uint32_t type)
{
	if (type >= sizeof(kern_types) / sizeof(kern_types[0]) || !kern_types[type].name)
		return "?";
	return kern_types[type].name;
}

int kern_type_block(uint32_t type)
{
	const struct kern_type_info *t = type_info(type);
	return t ? t->block : 0;
}

size_t kern_type_block_bytes(uint32_t type)
{
	const struct kern_type_info *t = type_info(type);
	return t ? t->bytes : 0;
}

size_t kern_row_bytes(uint32_t type, int64_t n)
{
	int blk = kern_type_block(type);
	if (n < 0 || blk == 0)
		return 0;
	return (size_t)(n / blk) * kern_type_block_bytes(type);
}

enum kern_type kern_act_type(uint32_t weight_type)
{
	const struct kern_type_info *t = type_info(weight_type);
	return t ? (enum kern_type)t->act : KERN_F32;
}

/* ---------------------------------------------------------- conversions */

/* Matches F16C's VCVTPH2PS: subnormals exact, NaNs quieted, payload kept. */
float kern_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t mant = h & 0x3ff;

	if (exp == 0x1f)
		return kern_bits_f32(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0));
	if (exp != 0)
		return kern_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
	if (mant == 0)
		return kern_bits_f32(sign);
	/* subnormal: mant * 2^-24, exact in f32 */
	int e = 113;
	while (!(mant & 0x400)) {
		mant <<= 1;
		e--;
	}
	return kern_bits_f32(sign | ((uint32_t)e << 23) | ((mant & 0x3ff) << 13));
}

/* Matches F16C's VCVTPS2PH with round-to-nearest-even. */
uint16_t kern_f32_to_f16(float f)
{
	uint32_t u = kern_f32_bits(f);
	uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
	uint32_t a = u & 0x7fffffffu;

	if (a > 0x7f800000u) /* NaN: quiet, top payload bits kept */
		return (uint16_t)(sign | 0x7e00 | ((a >> 13) & 0x3ff));
	if (a >= 0x477ff000u) /* rounds to (or is) infinity */
		return (uint16_t)(sign | 0x7c00);
	if (a >= 0x38800000u) { /* normal half */
		uint32_t r = a + 0x0fffu + ((a >> 13) & 1);
		return (uint16_t)(sign | ((r >> 13) - (112u << 10)));
	}
	if (a <= 0x33000000u) /* at most half the smallest subnormal */
		return sign;
	/* subnormal half: value in units of 2^-24 is mant * 2^(exp - 126) */
	uint32_t exp = a >> 23;
	uint32_t mant = (a & 0x7fffffu) | 0x800000u;
	uint32_t shift = 126 - exp; /* 14..24 */
	uint32_t h = mant >> shift;
	uint32_t rem = mant & ((1u << shift) - 1);
	uint32_t half = 1u << (shift - 1);
	if (rem > half || (rem == half && (h & 1)))
		h++;
	return (uint16_t)(sign | h);
}

float kern_bf16_to_f32(uint16_t h)
{
	return kern_bits_f32((uint32_t)h << 16);
}

/* ggml's rounding: nearest even, NaN forced quiet. */
uint16_t kern_f32_to_bf16(float f)
{
	uint32_t u = kern_f32_bits(f);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 64);
	return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

int8_t kern_q8_round(float v)
{
	/* _mm256_cvtps_epi32 gives INT32_MIN for NaN and out-of-range inputs;
	 * the int32 -> int8 packs then saturate. */
	if (!(v > -2147483648.0f && v < 2147483648.0f))
		return -128;
	if (v >= 127.0f)
		return 127;
	if (v <= -128.0f)
		return -128;
	/* |v| < 128: adding 2^23 rounds to an integer, ties to even */
	float r = v >= 0 ? (v + 8388608.0f) - 8388608.0f : (v - 8388608.0f) + 8388608.0f;
	return (int8_t)(int)r;
}

/* ------------------------------------------------------------- dispatch */

static atomic_int kern_isa_found = -1; /* -1: kern_init() not yet run */
static atomic_int kern_isa_cap = KERN_ISA_AVX512;
static atomic_int kern_ref_forced;

int kern_cpu_avx2(void)
{
#if defined(__x86_64__) || defined(__i386__)
	/* F16C through cpuid: clang's __builtin_cpu_supports does not know it */
	unsigned int eax, ebx, ecx, edx;
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
	       __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
#else
	return 0;
#endif
}

/* AVX-512 F, BW, VL, DQ and VNNI from cpuid leaf 7, and the OS saving the
 * opmask and ZMM registers (XCR0 bits 1, 2, 5, 6, 7: XGETBV needs OSXSAVE). */
static int cpu_avx512(void)
{
#if defined(__x86_64__) || defined(__i386__)
	unsigned int eax, ebx, ecx, edx, xlo, xhi;
	if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE))
		return 0;
	__asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
	(void)xhi;
	if ((xlo & 0xe6) != 0xe6)
		return 0;
	if (__get_cpuid_max(0, NULL) < 7)
		return 0;
	__cpuid_count(7, 0, eax, ebx, ecx, edx);
	const unsigned int need_b = bit_AVX512F | bit_AVX512DQ | bit_AVX512BW | bit_AVX512VL;
	return (ebx & need_b) == need_b && (ecx & bit_AVX512VNNI);
#else
	return 0;
#endif
}

enum kern_isa kern_cpu_isa(void)
{
	if (!kern_cpu_avx2())
		return KERN_ISA_SCALAR;
	return cpu_avx512() ? KERN_ISA_AVX512 : KERN_ISA_AVX2;
}

void kern_limit_isa(enum kern_isa max)
{
	atomic_store(&kern_isa_cap, (int)max);
}

void kern_init(void)
{
	if (atomic_load(&kern_isa_found) >= 0)
		return;
	static const char *const names[] = {"scalar", "avx2", "avx512"};
	const char *env = getenv("MOEFLEET_ISA");
	for (int i = 0; env && i < 3; i++)
		if (strcmp(env, names[i]) == 0)
			kern_limit_isa((enum kern_isa)i);
	atomic_store(&kern_isa_found, (int)kern_cpu_isa());
}

void kern_force_ref(int on)
{
	atomic_store(&kern_ref_forced, on ? 1 : 0);
}

static inline int isa_now(void)
{
	if (atomic_load_explicit(&kern_ref_forced, memory_order_relaxed))
		return KERN_ISA_SCALAR;
	const int f = atomic_load_explicit(&kern_isa_found, memory_order_relaxed);
	const int c = atomic_load_explicit(&kern_isa_cap, memory_order_relaxed);
	return f < c ? (f < 0 ? KERN_ISA_SCALAR : f) : c;
}

static inline int use_avx2(void)
{
	return isa_now() >= KERN_ISA_AVX2;
}

static inline int use_avx512(void)
{
	return isa_now() == KERN_ISA_AVX512;
}

int kern_use_avx2(void)
{
	kern_init();
	return use_avx2();
}

enum kern_isa kern_isa_now(void)
{
	return (enum kern_isa)isa_now();
}

const char *kern_isa_name(void)
{
	switch (isa_now()) {
	case KERN_ISA_AVX512: return "avx512";
	case KERN_ISA_AVX2: return "avx2";
	default: return "scalar";
	}
}

void kern_dequant_row(uint32_t type, const void *src, float *dst, int64_t n)
{
	if (!use_avx2())
		kern_dequant_row_ref(type, src, dst, n);
	else if (kern_type_family(type) == KERN_FAM_LEGACY)
		kern_legacy_dequant_avx2(type, src, dst, n);
	else if (kern_type_family(type) == KERN_FAM_KQ)
		kern_kq_dequant_avx2(type, src, dst, n);
	else if (kern_type_family(type) == KERN_FAM_IQ)
		kern_iq_dequant_avx2(type, src, dst, n);
	else
		kern_dequant_row_avx2(type, src, dst, n);
}

void kern_convert_row(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	if (!use_avx2())
		kern_convert_row_ref(act_type, x, dst, n);
	else if (act_type == KERN_Q8_1)
		kern_legacy_convert_avx2(act_type, x, dst, n);
	else if (act_type == KERN_Q8_K)
		kern_kq_convert_avx2(act_type, x, dst, n);
	else
		kern_convert_row_avx2(act_type, x, dst, n);
}

float kern_dot(uint32_t weight_type, int64_t n, const void *w, const void *x)
{
	if (!use_avx2())
		return kern_dot_ref(weight_type, n, w, x);
	if (weight_type == KERN_F32)
		return kern_f32_dot_vec_avx2(n, w, x);
	if (weight_type == KERN_F16)
		return kern_f16_dot_vec_avx2(n, w, x);
	switch (kern_type_family(weight_type)) {
	case KERN_FAM_LEGACY: return kern_legacy_dot_avx2(weight_type, n, w, x);
	case KERN_FAM_KQ: return kern_kq_dot_avx2(weight_type, n, w, x);
	case KERN_FAM_IQ: return kern_iq_dot_avx2(weight_type, n, w, x);
	default: return kern_dot_avx2(weight_type, n, w, x);
	}
}

static void matmul_rows(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
			int64_t gemm_rows)
{
	if (weight_type == KERN_F32 || weight_type == KERN_F16) {
		/* per output, as ggml's two paths (vec_dot, llamafile's GEMM) */
		const int simd = use_avx2(), f16 = weight_type == KERN_F16;
		float (*const vec)(int64_t, const void *, const void *) =
		    f16 ? (simd ? kern_f16_dot_vec_avx2 : kern_f16_dot_vec_ref)
			: (simd ? kern_f32_dot_vec_avx2 : kern_f32_dot_vec_ref);
		float (*const gemm)(int64_t, const void *, const void *) =
		    f16 ? (simd ? kern_f16_dot_gemm_avx2 : kern_f16_dot_gemm_ref)
			: (simd ? kern_f32_dot_gemm_avx2 : kern_f32_dot_gemm_ref);
		const size_t w_row = kern_row_bytes(weight_type, n_in);
		const uint8_t *wb = w, *xb = x;
		for (int64_t o = o0; o < o1; o++)
			for (int64_t r = 0; r < n_rows; r++)
				y[r * y_stride + o] = (r < gemm_rows ? gemm : vec)(
				    n_in, wb + (size_t)o * w_row, xb + (size_t)r * x_stride);
		return;
	}
	if (use_avx2()) {
		switch (kern_type_family(weight_type)) {
		case KERN_FAM_LEGACY:
			kern_legacy_matmul_avx2(weight_type, w, n_in, o0, o1, x, x_stride, n_rows,
						y, y_stride);
			return;
		case KERN_FAM_KQ:
			(use_avx512() ? kern_kq_matmul_avx512 : kern_kq_matmul_avx2)(
			    weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride,
			    gemm_rows);
			return;
		case KERN_FAM_IQ:
			kern_iq_matmul_avx2(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y,
					    y_stride);
			return;
		default:
			(use_avx512() ? kern_matmul_avx512 : kern_matmul_avx2)(
			    weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride);
			return;
		}
	}
	size_t w_row = kern_row_bytes(weight_type, n_in);
	const uint8_t *wb = w;
	const uint8_t *xb = x;
	for (int64_t o = o0; o < o1; o++)
		for (int64_t r = 0; r < n_rows; r++)
			y[r * y_stride + o] = (r < gemm_rows ? kern_kq_dot_gemm_ref : kern_dot_ref)(
			    weight_type, n_in, wb + (size_t)o * w_row, xb + (size_t)r * x_stride);
}

void kern_matmul(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		 const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	matmul_rows(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, 0);
}

int kern_batch_form_type(uint32_t weight_type)
{
	return weight_type == KERN_F32 || weight_type == KERN_F16 || weight_type == KERN_Q2_K ||
	       weight_type == KERN_Q4_K || weight_type == KERN_IQ4_XS;
}

void kern_matmul_form(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride,
		      int batch_form)
{
	int64_t gemm_rows = batch_form && kern_batch_form_type(weight_type) ? n_rows : 0;
	if ((weight_type == KERN_F32 || weight_type == KERN_F16) && n_in % 16 != 0)
		gemm_rows = 0;
	matmul_rows(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, gemm_rows);
}

void kern_matmul_dense(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		       const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	int64_t gemm_rows = 0;
	if (weight_type == KERN_Q2_K || weight_type == KERN_Q4_K)
		gemm_rows = n_rows - n_rows % 4;
	else if (weight_type == KERN_IQ4_XS && n_rows >= 8)
		gemm_rows = n_rows;
	else if ((weight_type == KERN_F32 || weight_type == KERN_F16) && n_rows >= 2 &&
		 n_in % 16 == 0)
		gemm_rows = n_rows;
	matmul_rows(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, gemm_rows);
}

void kern_matmul_unpacked(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			  const void *x, size_t x_stride, int64_t n_rows, float *y,
			  int64_t y_stride, const uint8_t *batched)
{
	if (weight_type == KERN_F16 || weight_type == KERN_F32) { /* llamafile takes these too */
		const uint8_t *xb = x;
		for (int64_t r = 0; r < n_rows; r++)
			kern_matmul_form(weight_type, w, n_in, o0, o1, xb + (size_t)r * x_stride,
					 x_stride, 1, y + r * y_stride, y_stride,
					 batched ? batched[r] : n_rows >= 2);
		return;
	}
	if (weight_type != KERN_IQ4_NL) {
		kern_matmul(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride);
		return;
	}
	const size_t w_row = kern_row_bytes(weight_type, n_in);
	const uint8_t *wb = w, *xb = x;
	for (int64_t o = o0; o < o1; o++)
		for (int64_t r = 0; r < n_rows; r++)
			y[r * y_stride + o] = kern_legacy_dot_unpacked_ref(
			    weight_type, n_in, wb + (size_t)o * w_row, xb + (size_t)r * x_stride,
			    batched ? batched[r] : n_rows >= 2);
}

void kern_swiglu(float *g, const float *u, int64_t j0, int64_t j1, int64_t n)
{
	if (use_avx2())
		kern_swiglu_avx2(g, u, j0, j1, n);
	else
		kern_swiglu_ref(g, u, j0, j1, n);
}

void kern_matmul_expert(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	const int64_t panel = weight_type == KERN_IQ4_XS ? n_rows : 0;
	matmul_rows(weight_type, w, n_in, o0, o1, x, x_stride, n_rows, y, y_stride, panel);
}

/* ------------------------------------------------------------- scratch */

/* One buffer per thread, grown on demand and kept, so a steady stream of
 * matmuls allocates nothing; freed when its thread exits. */
struct scratch_buf {
	void *p;
	size_t cap;
};
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_free(void *v)
{
	struct scratch_buf *b = v;
	free(b->p);
	free(b);
}

static void scratch_key_init(void)
{
	scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

void *kern_scratch(size_t bytes)
{
	pthread_once(&scratch_once, scratch_key_init);
	if (!scratch_key_ok)
		return NULL;
	struct scratch_buf *b = pthread_getspecific(scratch_key);
	if (!b) {
		b = calloc(1, sizeof(*b));
		if (!b || pthread_setspecific(scratch_key, b) != 0) {
			free(b);
			return NULL;
		}
	}
	if (bytes > b->cap) {
		void *p = realloc(b->p, bytes);
		if (!p)
			return NULL;
		b->p = p;
		b->cap = bytes;
	}
	return b->p;
}
