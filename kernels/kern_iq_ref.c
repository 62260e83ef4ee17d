/* kern_iq_ref: scalar reference of the grid types IQ1_S, IQ1_M, IQ2_XXS,
 * IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S (Q8_K activations, kern_kq_ref.c). */
#include "kernels/kern.h"
#include "kernels/kern_impl.h"

void kern_iq_dequant_ref(uint32_t type, const void *src, float *dst, int64_t n)
{
	(void)type, (void)src, (void)dst, (void)n; /* TODO(iq) */
}

float kern_iq_dot_ref(uint32_t type, int64_t n, const void *w, const void *x)
{
	(void)type, (void)n, (void)w, (void)x; /* TODO(iq) */
	return 0.0f;
}
