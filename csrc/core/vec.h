/* vec.h -- the vector of doubles of one build of the kernels, and halves to
 * and from it; included by build.h after the build file set BN_VECTOR_BYTES
 * (16, 32 or 64) and its compiler target. With GCC and Clang a vector is a
 * vector extension of BN_W doubles; the portable build (BN_PORTABLE, or a compiler without the
 * extensions) uses a plain double, BN_W = 1: the same code as plain C loops.
 * Sums along a row keep BN_LANES = 16 accumulators as BN_K vectors: lane j
 * is element j % BN_W of vector j / BN_W in every build, so the sums, and the
 * results, are bitwise the same whichever build runs. */
#ifndef BNPY_VEC_H
#define BNPY_VEC_H

#include "core.h"

#include <stdint.h>
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

/* ---- halves: float16 and bfloat16, kept as uint16_t ----------------------------------------
 * Every conversion is exact, or rounds once to nearest even, and gives the same bits in
 * every build: in 64-bit integer lanes (bn_bits: a half, or a double's bits, per lane; masks,
 * no branch per lane) and in the float conversions of the vector types, the same code for
 * every BN_W; on x86, F16C's float16 conversions where they give the same bits. NaNs come
 * out quiet (as from every IEEE conversion), keeping the top of their payload. */
#if BN_W == 1
typedef uint64_t bn_bits;
typedef int64_t bn_signed;
typedef float bn_floats;
typedef uint32_t bn_words;
typedef uint16_t bn_halves;
#define BN_MASK(type, c) (-(type)(c)) /* all ones where c holds, else 0 */
#define BN_CONVERT(v, type) ((type)(v))
#else
typedef uint64_t bn_bits __attribute__((vector_size(BN_VECTOR_BYTES)));
typedef int64_t bn_signed __attribute__((vector_size(BN_VECTOR_BYTES)));
typedef float bn_floats __attribute__((vector_size(BN_VECTOR_BYTES / 2)));
typedef uint32_t bn_words __attribute__((vector_size(BN_VECTOR_BYTES / 2)));
typedef uint16_t bn_halves __attribute__((vector_size(BN_VECTOR_BYTES / 4)));
#define BN_MASK(type, c) ((type)(c))
#define BN_CONVERT(v, type) __builtin_convertvector(v, type)
#endif
/* a where mask, else b; a > b for a vector a and a constant b, both below 2^63 */
#define BN_CHOOSE(mask, a, b) (((a) & (mask)) | ((b) & ~(mask)))
#define BN_ABOVE(a, b) BN_MASK(bn_bits, (bn_signed)(a) > (int64_t)(b))

/* the doubles of bits x, and the bits of doubles x */
typedef union {
    bn_vec doubles;
    bn_bits bits;
} bn_both;
#define BN_AS_DOUBLES(x) (((bn_both){.bits = (x)}).doubles)
#define BN_AS_BITS(x) (((bn_both){.doubles = (x)}).bits)

/* v rounded to odd above the bits of the mask `low`: those cleared, and the lowest kept
 * bit set when any of them was. Rounded to nearest even at least two bits higher then, v
 * is rounded as if straight from itself. */
BN_INLINE bn_vec bn_round_odd(bn_vec v, uint64_t low)
{
    bn_bits u = BN_AS_BITS(v);
    return BN_AS_DOUBLES((u | ((u & low) + low)) & ~low);
}

/* float16 (a sign, 5 exponent bits biased by 15, 10 mantissa bits) as doubles, exactly:
 * exponent and mantissa moved to a double's places and rebiased by 1023 - 15; the largest
 * exponent (inf, NaN) to 0x7ff; zeros and subnormals as 2^-14 * 1.mantissa - 2^-14, a
 * difference of normal doubles */
BN_INLINE bn_vec bn_from_f16(bn_bits h)
{
    bn_bits em = h & 0x7fff, normal = (em << 42) + (1008ull << 52);
    normal += BN_ABOVE(em, 0x7bff) & 1008ull << 52;
    normal |= BN_ABOVE(em, 0x7c00) & 1ull << 51; /* NaN: quiet */
    bn_vec tiny = BN_AS_DOUBLES((h & 0x3ff) << 42 | 1009ull << 52) - 0x1p-14;
    normal = BN_CHOOSE(BN_ABOVE(em, 0x3ff), normal, BN_AS_BITS(tiny));
    return BN_AS_DOUBLES((h & 0x8000) << 48 | normal);
}

/* The float16 nearest to v, ties to even. From 2^-14, the least normal, up: the double's
 * bits rebiased and their last 42 rounded off as an integer (a carry moves to the next
 * exponent, or to inf: overflow gives inf); below it, |v| + 2^28, whose last bit is 2^-24,
 * the least subnormal, rounded by the FPU (to nearest even, its default) */
BN_INLINE bn_bits bn_to_f16(bn_vec v)
{
    bn_bits u = BN_AS_BITS(v), a = u & ~(1ull << 63), r = a - (1008ull << 52);
    bn_bits normal = (r + 0x1ffffffffff + (r >> 42 & 1)) >> 42;
    bn_bits tiny = BN_AS_BITS(BN_AS_DOUBLES(a) + 0x1p28) - (1051ull << 52);
    normal = BN_CHOOSE(BN_ABOVE(normal, 0x7c00), 0x7c00, normal);
    normal = BN_CHOOSE(BN_ABOVE(a, 0x7ff0000000000000), 0x7e00 | (a >> 42 & 0x3ff), normal);
    return (u >> 48 & 0x8000) | BN_CHOOSE(BN_ABOVE(a, (1009ull << 52) - 1), normal, tiny);
}

/* float16 p[0 .. BN_W) as doubles; on x86 F16C's, to float and then to double */
BN_INLINE bn_vec bn_load_f16(const uint16_t *p)
{
#if BN_X86_BUILDS && BN_W == 4
    return (bn_vec)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
#elif BN_X86_BUILDS && BN_W == 8
    return (bn_vec)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
#else
    bn_halves h;
    memcpy(&h, p, sizeof h);
    return bn_from_f16(BN_CONVERT(h, bn_bits));
#endif
}

/* p[0 .. BN_W) <- v rounded to float16. On x86, F16C's: v rounded to odd at a float's last
 * bit, so that the float conversion is exact from 2^-126 up (below, any float gives a
 * zero), then rounded to nearest even by F16C */
BN_INLINE void bn_store_f16(uint16_t *p, bn_vec v)
{
#if BN_X86_BUILDS && BN_W >= 4
    v = bn_round_odd(v, 0x1fffffff);
#endif
#if BN_X86_BUILDS && BN_W == 4
    _mm_storel_epi64((__m128i *)p, _mm_cvtps_ph(_mm256_cvtpd_ps((__m256d)v), 0));
#elif BN_X86_BUILDS && BN_W == 8
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(_mm512_cvtpd_ps((__m512d)v), 0));
#else
    bn_halves h = BN_CONVERT(bn_to_f16(v), bn_halves);
    memcpy(p, &h, sizeof h);
#endif
}

/* bfloat16, the top half of a float: p[0 .. BN_W) as doubles through floats, exactly */
BN_INLINE bn_vec bn_load_bf16(const uint16_t *p)
{
    uint32_t top[BN_W];
    float f[BN_W];
    double d[BN_W];
    for (int j = 0; j < BN_W; j++) {
        top[j] = (uint32_t)p[j] << 16;
    }
    memcpy(f, top, sizeof f);
    for (int j = 0; j < BN_W; j++) {
        d[j] = f[j];
    }
    return bn_load_wide(d);
}

/* p[0 .. BN_W) <- v rounded to bfloat16, ties to even: v rounded to odd two bits below a
 * bfloat16's last, whose float is then exact down to 2^-140 (below, any float gives a
 * zero), then the float's top 16 bits rounded to nearest even; a NaN's only cut (a carry
 * could reach its sign) */
BN_INLINE void bn_store_bf16(uint16_t *p, bn_vec v)
{
    bn_floats f = BN_CONVERT(bn_round_odd(v, 0x7ffffffffff), bn_floats);
    bn_words w;
    memcpy(&w, &f, sizeof w);
    w += ((w >> 16 & 1) + 0x7fff) & BN_MASK(bn_words, f == f);
    bn_halves h = BN_CONVERT(w >> 16, bn_halves);
    memcpy(p, &h, sizeof h);
}

/* One vector's coefficients of an elementwise pass (bn_op) */
typedef struct {
    bn_vec mean, scale, shift, dev;
} bn_vcoef;

/* op (bn_op) on doubles or on vectors: in is x (normalize) or dy; x is used by
 * BN_DX_TRAIN */
#define BN_APPLY(op, in, x, mean, scale, shift, dev)                                       \
    ((op) == BN_DX_TRAIN    ? (scale) * (((in) - (shift)) - ((x) - (mean)) * (dev))         \
     : (op) == BN_NORMALIZE ? ((in) - (mean)) * (scale) + (shift)                          \
                            : (in) * (scale))

BN_INLINE bn_vec bn_apply(bn_op op, bn_vec in, bn_vec x, const bn_vcoef *k)
{
    return BN_APPLY(op, in, x, k->mean, k->scale, k->shift, k->dev);
}

/* lane 0 of v */
BN_INLINE double bn_first(bn_vec v)
{
#if BN_W == 1
    return v;
#else
    return v[0];
#endif
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
