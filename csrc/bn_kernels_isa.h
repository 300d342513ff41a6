/* bn_kernels_isa.h -- one instruction-set build of the hot kernels.
 *
 * Each of bn_kernels_baseline.c, bn_kernels_avx2.c and bn_kernels_avx512.c
 * sets its target (`#pragma GCC target`), defines
 *   BN_ISA        the build's suffix (_avx512, _avx2, _baseline)
 *   BN_TABLE      the name of its bn_kernel_table
 * and includes this file, which instantiates bn_kernels_impl.h for float and
 * double and lists the kernels in the table.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "bn_kernels_internal.h"
#include "bn_simd.h"

#define BN_PASTE(a, b) a##b
#define BN_SUFFIXED(a, b) BN_PASTE(a, b)

#define T float
#define BN_ELEMENT_IS_FLOAT 1
#define NAME(fn) BN_SUFFIXED(fn##_f32, BN_ISA)
#include "bn_kernels_impl.h"
#undef T
#undef BN_ELEMENT_IS_FLOAT
#undef NAME

#define T double
#define BN_ELEMENT_IS_FLOAT 0
#define NAME(fn) BN_SUFFIXED(fn##_f64, BN_ISA)
#include "bn_kernels_impl.h"
#undef T
#undef BN_ELEMENT_IS_FLOAT
#undef NAME

#define BN_BUILD(fn) BN_SUFFIXED(fn, BN_ISA)

const bn_kernel_table BN_TABLE = {
    .stats_f32 = BN_BUILD(bn_stats_f32),
    .stats_f64 = BN_BUILD(bn_stats_f64),
    .forward_train_f32 = BN_BUILD(bn_forward_train_f32),
    .forward_train_f64 = BN_BUILD(bn_forward_train_f64),
    .forward_f32 = BN_BUILD(bn_forward_f32),
    .forward_f64 = BN_BUILD(bn_forward_f64),
    .backward_f32 = BN_BUILD(bn_backward_f32),
    .backward_f64 = BN_BUILD(bn_backward_f64),
    .grad_sums_f32 = BN_BUILD(bn_grad_sums_f32),
    .grad_sums_f64 = BN_BUILD(bn_grad_sums_f64),
    .backward_dx_f32 = BN_BUILD(bn_backward_dx_f32),
    .backward_dx_f64 = BN_BUILD(bn_backward_dx_f64),
};
