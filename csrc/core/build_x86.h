/* build_x86.h -- an x86-64 build of the hot kernels, for the target
 * BN_TARGET (a string) set by build_avx2.c or build_avx512.c, through GCC's or
 * Clang's target pragma; no build where the compiler cannot target x86-64. */
#include <stddef.h>
#include <string.h>

#include "core.h"

#if BN_X86_BUILDS
#include <immintrin.h>
#define BN_PRAGMA_TEXT(x) _Pragma(#x)
#define BN_PRAGMA(x) BN_PRAGMA_TEXT(x)
#if defined(__clang__)
BN_PRAGMA(clang attribute push(__attribute__((target(BN_TARGET))), apply_to = function))
#include "build.h"
BN_PRAGMA(clang attribute pop)
#else
BN_PRAGMA(GCC target(BN_TARGET))
#include "build.h"
#endif
#endif
