/* build_avx512.c -- the kernels for x86-64 CPUs with AVX-512F, chosen at run
 * time (core.c) */
#define BN_TARGET "avx512f,f16c"
#define BN_VECTOR_BYTES 64
#define BN_ISA _avx512
#define BN_TABLE bn_kernels_avx512
#include "build_x86.h"
