/* kern_avx2: AVX2/FMA/F16C kernels (temporary: forwards to the scalar twins). */
#include "kernels/kern.h"
#include "kernels/kern_impl.h"

void kern_dequant_row_avx2(uint32_t type, const void *src, float *dst, int64_t n)
{
	kern_dequant_row_ref(type, src, dst, n);
}

void kern_convert_row_avx2(enum kern_type act_type, const float *x, void *dst, int64_t n)
{
	kern_convert_row_ref(act_type, x, dst, n);
}

float kern_dot_avx2(uint32_t weight_type, int64_t n, const void *w, const void *x)
{
	return kern_dot_ref(weight_type, n, w, x);
}

void kern_matmul_avx2(uint32_t weight_type, const void *w, int64_t n_in, int64_t o0, int64_t o1,
		      const void *x, size_t x_stride, int64_t n_rows, float *y, int64_t y_stride)
{
	size_t w_row = kern_row_bytes(weight_type, n_in);
	const uint8_t *wb = w;
	const uint8_t *xb = x;
	for (int64_t o = o0; o < o1; o++)
		for (int64_t r = 0; r < n_rows; r++)
			y[r * y_stride + o] = kern_dot_avx2(weight_type, n_in, wb + (size_t)o * w_row,
							    xb + (size_t)r * x_stride);
}
