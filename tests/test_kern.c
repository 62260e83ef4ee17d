/* test_kern: placeholder (being written). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kernels/kern.h"

static void test_types(void **state)
{
	(void)state;
	kern_init();
	assert_int_equal(kern_act_type(KERN_MXFP4), KERN_Q8_0);
	assert_int_equal(kern_row_bytes(KERN_Q4_0, 64), 36);
}

int main(void)
{
	const struct CMUnitTest tests[] = {cmocka_unit_test(test_types)};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
