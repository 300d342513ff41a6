/* bn_kernels_avx2.c -- the kernels for CPUs with AVX2, chosen at run time
 * (bn_kernels.c); empty where GCC cannot target them. */
#include "bn_kernels_internal.h"

#ifdef BN_HAVE_X86_BUILDS
#pragma GCC target("avx2")
#define BN_ISA _avx2
#define BN_TABLE bn_kernels_avx2
#include "bn_kernels_isa.h"
#else
typedef int bn_kernels_avx2_unused; /* ISO C: a file must declare something */
#endif
