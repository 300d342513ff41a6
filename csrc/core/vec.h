/* vec.h -- the vector of doubles of one build of the kernels, included by
 * build.h after the build file set BN_VECTOR_BYTES (16, 32 or 64) and its
 * compiler target. With GCC and Clang a vector is a vector extension of BN_W
 * doubles; the portable build (BN_PORTABLE, or a compiler without the
 * extensions) uses a plain double, BN_W = 1: the same code as plain C loops.
 * Sums along a row keep BN_LANES = 16 accumulators as BN_K vectors: lane j
 * is element j % BN_W of vector j / BN_W in every build, so the sums, and the
 * results, are bitwise the same whichever build runs. */
#ifndef BNPY_VEC_H
#define BNPY_VEC_H

#include "core.h"

#include <string.h>

#if defined(__GNUC__) && !defined(BN_PORTABLE)
#define BN_W (BN_VECTOR_BYTES / 8)
/* the vector helpers are always inlined: the ABI notes on passing vectors
   between functions do not apply */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef double bn_vec __attribute__((vector_size(BN_VECTOR_BYTES)));
#else
#define BN_W 1
typedef double bn_vec;
#endif
#define BN_K (BN_LANES / BN_W) /* vectors of a row sum's accumulators */

/* Non-temporal stores of BN_LANES values (BN_K vectors) rounded to float
 * or double, past the caches, for outputs too large to stay in them
 * (bn_plan.stream): whole cache lines at once, p on a line. bn_stream_fence
 * orders them before what follows. */
#if BN_X86_BUILDS && BN_W >= 4
#define BN_CAN_STREAM 1
BN_INLINE void bn_stream_f32(float *p, const bn_vec v[BN_K])
{
#if BN_W == 4
    for (int k = 0; k < BN_K; k += 2) {
        __m128 lo = _mm256_cvtpd_ps((__m256d)v[k]), hi = _mm256_cvtpd_ps((__m256d)v[k + 1]);
        _mm256_stream_ps(p + 4 * k, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
    }
#else
    __m256 lo = _mm512_cvtpd_ps((__m512d)v[0]), hi = _mm512_cvtpd_ps((__m512d)v[1]);
    __m512d both = _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                                      _mm256_castps_pd(hi), 1);
    _mm512_stream_ps(p, _mm512_castpd_ps(both));
#endif
}

BN_INLINE void bn_stream_f64(double *p, const bn_vec v[BN_K])
{
    for (int k = 0; k < BN_K; k++) {
#if BN_W == 4
        _mm256_stream_pd(p + 4 * k, (__m256d)v[k]);
#else
        _mm512_stream_pd(p + 8 * k, (__m512d)v[k]);
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

BN_INLINE bn_vec bn_splat(double a)
{
#if BN_W == 1
    return a;
#else
    bn_vec v = {0};
    for (int j = 0; j < BN_W; j++) {
        v[j] = a;
    }
    return v;
#endif
}

/* p[0 .. BN_W) of doubles, at any alignment */
BN_INLINE bn_vec bn_load_wide(const double *p)
{
    bn_vec v = {0};
    memcpy(&v, p, sizeof v);
    return v;
}

BN_INLINE void bn_store_wide(double *p, bn_vec v)
{
    memcpy(p, &v, sizeof v);
}

/* The total of BN_LANES accumulators in a fixed order: lane j with lane
 * j + 8, then those eight pairwise */
BN_INLINE double bn_total(const bn_vec acc[BN_K])
{
    double lane[BN_LANES], v[8];
    memcpy(lane, acc, sizeof lane);
    for (int j = 0; j < 8; j++) {
        v[j] = lane[j] + lane[j + 8];
    }
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* One vector's coefficients of an elementwise pass (bn_op) */
typedef struct {
    bn_vec mean, scale, shift, dev;
} bn_vcoef;

/* op on one vector: in is x (normalize) or dy; x is used by BN_DX_TRAIN */
BN_INLINE bn_vec bn_apply(bn_op op, bn_vec in, bn_vec x, const bn_vcoef *k)
{
    if (op == BN_DX_TRAIN) {
        return k->scale * ((in - k->shift) - (x - k->mean) * k->dev);
    }
    if (op == BN_NORMALIZE) {
        return (in - k->mean) * k->scale + k->shift;
    }
    return in * k->scale;
}

/* the coefficients of feature c from the four arrays of a bn_work, alike in
 * every lane (planar rows), or of lanes l .. l + BN_W (spread over a wide row) */
BN_INLINE bn_vcoef bn_feature_coef(const bn_work *w, size_t c)
{
    return (bn_vcoef){bn_splat(w->mean[c]), bn_splat(w->scale[c]), bn_splat(w->shift[c]),
                      bn_splat(w->dev[c])};
}

BN_INLINE bn_vcoef bn_lane_coef(const bn_work *w, size_t l)
{
    return (bn_vcoef){bn_load_wide(w->mean + l), bn_load_wide(w->scale + l),
                      bn_load_wide(w->shift + l), bn_load_wide(w->dev + l)};
}

#endif /* BNPY_VEC_H */
