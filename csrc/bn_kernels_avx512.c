/* bn_kernels_avx512.c -- the kernels for CPUs with AVX-512F, chosen at run time
 * (bn_kernels.c); empty where GCC cannot target them. */
#include "bn_kernels_internal.h"

#ifdef BN_HAVE_X86_BUILDS
#pragma GCC target("avx512f")
#define BN_ISA _avx512
#define BN_TABLE bn_kernels_avx512
#include "bn_kernels_isa.h"
#else
typedef int bn_kernels_avx512_unused; /* ISO C: a file must declare something */
#endif
