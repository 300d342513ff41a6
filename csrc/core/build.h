/* build.h -- one instruction-set build of the hot kernels. Each build_*.c
 * file sets its compiler target and defines BN_VECTOR_BYTES (the width of
 * its vectors, vec.h), BN_ISA (its suffix: _baseline, _avx2, _avx512) and
 * BN_TABLE (the name of its bn_kernel_table), then includes this file, which
 * instantiates kernels.h for float, double, float16 and bfloat16 and lists them in
 * the table. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core.h"
#include "vec.h"

#define BN_PASTE(a, b) a##b
#define BN_SUFFIXED(a, b) BN_PASTE(a, b)

#define T float
#define P float
#define BN_HALF 0
#define NAME(fn) BN_SUFFIXED(fn##_f32, BN_ISA)
#include "kernels.h"
#include "rows.h"
#undef T
#undef P
#undef NAME

#define T double
#define P double
#define NAME(fn) BN_SUFFIXED(fn##_f64, BN_ISA)
#include "kernels.h"
#include "rows.h"
#undef T
#undef P
#undef NAME
#undef BN_HALF

/* halves: uint16_t elements of BN_HALF mantissa bits, float parameters */
#define T uint16_t
#define P float
#define BN_HALF 10
#define NAME(fn) BN_SUFFIXED(fn##_f16, BN_ISA)
#include "kernels.h"
#include "rows.h"
#undef NAME
#undef BN_HALF

#define BN_HALF 7
#define NAME(fn) BN_SUFFIXED(fn##_bf16, BN_ISA)
#include "kernels.h"
#include "rows.h"
#undef T
#undef P
#undef NAME
#undef BN_HALF

#define BN_BUILD(fn) BN_SUFFIXED(fn, BN_ISA)

#define BN_TABLE_ENTRY(name, parameters, arguments) .name = BN_BUILD(name),

const bn_kernel_table BN_TABLE = {BN_HOT_KERNELS(BN_TABLE_ENTRY, float, float, _f32)
                                  BN_HOT_KERNELS(BN_TABLE_ENTRY, double, double, _f64)
                                  BN_HOT_KERNELS(BN_TABLE_ENTRY, uint16_t, float, _f16)
                                  BN_HOT_KERNELS(BN_TABLE_ENTRY, uint16_t, float, _bf16)};
