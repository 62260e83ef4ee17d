/* kern_iq_avx2: AVX2 kernels of the iq family (see kern_impl.h). */
#include <immintrin.h>

#include "kernels/kern.h"
#include "kernels/kern_impl.h"

void kern_iq_dequant_avx2(uint32_t type, const void *src, float *dst, int64_t n)
{
	kern_iq_dequant_ref(type, src, dst, n); /* TODO(iq) */
}

float kern_iq_dot_avx2(uint32_t type, int64_t n, const void *w, const void *x)
{
	return kern_iq_dot_ref(type, n, w, x); /* TODO(iq) */
}

void kern_iq_matmul_avx2(uint32_t type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
			 const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	size_t w_row = kern_row_bytes(type, n_in); /* TODO(iq) */
	const uint8_t *wb = w, *xb = x;
	for (int64_t o = o0; o < o1; o++)
		for (int64_t r = 0; r < n_rows; r++)
			y[r * y_stride + o] = kern_iq_dot_avx2(type, n_in, wb + (size_t)o * w_row,
							       xb + (size_t)r * x_stride);
}
