/* bn_simd.h -- the vectors of one instruction-set build of the kernels.
 *
 * Included by bn_kernels_isa.h after the build's `#pragma GCC target`, which
 * sets the macros below: a vector is as wide as the build's registers (8
 * doubles for AVX-512, 4 for AVX and AVX2, 2 otherwise). A wider vector
 * type than the registers has no machine mode, and GCC keeps such variables
 * in memory: an AVX2 build of 8-double accumulators ran 5-10x slower.
 *
 * BN_LANES = 16 accumulators are always 16, as BN_K vectors of BN_W: lane j
 * takes the values at j, j + 16, j + 32, ... of a row in every build, so the
 * sums (and results) are bitwise the same whichever build runs.
 */
#ifndef BNPY_BN_SIMD_H
#define BNPY_BN_SIMD_H

#include "bn_kernels_internal.h"

#include <string.h>

#if defined(__AVX512F__)
#define BN_W 8
#elif defined(__AVX__)
#define BN_W 4
#else
#define BN_W 2
#endif
#define BN_K (BN_LANES / BN_W)             /* vectors of doubles in a bn_lanes */
#define BN_W_F32 (2 * BN_W)                /* floats in a register */
#define BN_K_F32 (BN_LANES / BN_W_F32)     /* vectors of floats in a bn_lanes_f32 */

/* The vector helpers are always inlined: the ABI notes GCC gives for passing
 * vectors between functions do not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef double bn_vec __attribute__((vector_size(BN_W * sizeof(double))));
typedef float bn_vec_f32 __attribute__((vector_size(BN_W_F32 * sizeof(float))));

/* BN_LANES doubles (or floats): lane j is element j % W of vector j / W */
typedef struct {
    bn_vec v[BN_K];
} bn_lanes;

typedef struct {
    bn_vec_f32 v[BN_K_F32];
} bn_lanes_f32;

/* the sum of the lanes, in bn_lanes_sum's fixed order */
BN_INLINE double bn_lanes_total(const bn_lanes *a)
{
    double lanes[BN_LANES];
    memcpy(lanes, a, sizeof lanes);
    return bn_lanes_sum(lanes);
}

BN_INLINE double bn_lanes_f32_total(const bn_lanes_f32 *a)
{
    float narrow[BN_LANES];
    double lanes[BN_LANES];
    memcpy(narrow, a, sizeof narrow);
    for (int j = 0; j < BN_LANES; j++) {
        lanes[j] = (double)narrow[j];
    }
    return bn_lanes_sum(lanes);
}

/* Non-temporal stores: p[0 .. 16) <- v (rounded to float), past the caches,
 * for outputs too large to stay in them; p on a cache line. bn_stream_fence
 * orders them before what the thread does next. */
#if defined(__SSE2__)
#include <immintrin.h>
#define BN_CAN_STREAM 1

BN_INLINE void bn_stream16_f32(float *p, const bn_lanes *v)
{
#if BN_W == 8
    __m256 lo = _mm512_cvtpd_ps((__m512d)v->v[0]), hi = _mm512_cvtpd_ps((__m512d)v->v[1]);
    __m512d both = _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                                      _mm256_castps_pd(hi), 1);
    _mm512_stream_ps(p, _mm512_castpd_ps(both));
#elif BN_W == 4
    for (int k = 0; k < BN_K; k += 2) {
        __m128 lo = _mm256_cvtpd_ps((__m256d)v->v[k]), hi = _mm256_cvtpd_ps((__m256d)v->v[k + 1]);
        _mm256_stream_ps(p + 4 * k, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
    }
#else
    for (int k = 0; k < BN_K; k += 2) {
        __m128 lo = _mm_cvtpd_ps((__m128d)v->v[k]), hi = _mm_cvtpd_ps((__m128d)v->v[k + 1]);
        _mm_stream_ps(p + 2 * k, _mm_movelh_ps(lo, hi));
    }
#endif
}

BN_INLINE void bn_stream16_f64(double *p, const bn_lanes *v)
{
    for (int k = 0; k < BN_K; k++) {
#if BN_W == 8
        _mm512_stream_pd(p + 8 * k, (__m512d)v->v[k]);
#elif BN_W == 4
        _mm256_stream_pd(p + 4 * k, (__m256d)v->v[k]);
#else
        _mm_stream_pd(p + 2 * k, (__m128d)v->v[k]);
#endif
    }
}

BN_INLINE void bn_stream_fence(void)
{
    _mm_sfence();
}
#else
#define BN_CAN_STREAM 0

BN_INLINE void bn_stream_fence(void)
{
}
#endif

#endif /* BNPY_BN_SIMD_H */
