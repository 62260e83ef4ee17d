/* attn_internal: the SIMD inner loops of attention (attn_simd.c), private to
 * attn.c.  attn_simd_ok() says whether they may be called: 1 when built with
 * AVX2+FMA+F16C forms and the CPU has them (and kern_force_ref(1) is off);
 * otherwise attn.c runs its scalar loops, which compute the same bits. */
#ifndef MOEFLEET_ATTN_INTERNAL_H
#define MOEFLEET_ATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

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

#endif
