/* build_avx2.c -- the kernels for x86-64 CPUs with AVX2, chosen at run time
 * (core.c) */
#define BN_TARGET "avx2,f16c"
#define BN_VECTOR_BYTES 32
#define BN_ISA _avx2
#define BN_TABLE bn_kernels_avx2
#include "build_x86.h"
