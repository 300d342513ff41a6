/* build_avx512.c -- the kernels for x86-64 CPUs with AVX-512, chosen at run time
 * (core.c); empty where the compiler cannot target them. */
#include <stddef.h>
#include <string.h>

#include "core.h"

#if BN_X86_BUILDS
#include <immintrin.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC target("avx512f")
#endif
#define BN_VECTOR_BYTES 64
#define BN_ISA _avx512
#define BN_TABLE bn_kernels_avx512
#include "build.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
typedef int bn_build_avx512_unused; /* ISO C: a file must declare something */
#endif
