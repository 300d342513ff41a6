/* build_avx2.c -- the kernels for x86-64 CPUs with AVX2, chosen at run time
 * (core.c); empty where the compiler cannot target them. */
#include <stddef.h>
#include <string.h>

#include "core.h"

#if BN_X86_BUILDS
#include <immintrin.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC target("avx2")
#endif
#define BN_VECTOR_BYTES 32
#define BN_ISA _avx2
#define BN_TABLE bn_kernels_avx2
#include "build.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
typedef int bn_build_avx2_unused; /* ISO C: a file must declare something */
#endif
