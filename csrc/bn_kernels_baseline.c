/* bn_kernels_baseline.c -- the kernels for any CPU the compiler targets by
 * default (SSE2 on x86-64). */
#define BN_ISA _baseline
#define BN_TABLE bn_kernels_baseline
#include "bn_kernels_isa.h"
