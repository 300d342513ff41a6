/* build_baseline.c -- the kernels for any CPU the compiler targets by default
 * (SSE2 on x86-64, NEON on aarch64; plain C when built portable). */
#define BN_VECTOR_BYTES 16
#define BN_ISA _baseline
#define BN_TABLE bn_kernels_baseline
#include "build.h"
