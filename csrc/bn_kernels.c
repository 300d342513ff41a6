/* bn_kernels.c -- the mathematics of batch normalization (DESIGN.md section 1).
 *
 * The per-type kernels live in bn_kernels_impl.h, instantiated here for float
 * and double; the type-free helpers are below.
 */
#include "bn_kernels.h"

#include <math.h>

size_t bn_count(bn_shape s)
{
    return s.outer * s.inner;
}

void bn_partial_merge(bn_partial *a, const bn_partial *b)
{
    if (b->count == 0.0) {
        return;
    }
    if (a->count == 0.0) {
        *a = *b;
        return;
    }
    double count = a->count + b->count;
    double delta = b->mean - a->mean;
    a->mean += delta * (b->count / count);
    a->m2 += b->m2 + delta * delta * (a->count * b->count / count);
    a->count = count;
}

void bn_batch_moments(double *mean, double *invstd, const bn_partial *stats,
                      size_t channels, double eps)
{
    for (size_t c = 0; c < channels; c++) {
        double var = stats[c].count > 0.0 ? stats[c].m2 / stats[c].count : 0.0;
        mean[c] = stats[c].mean;
        invstd[c] = 1.0 / sqrt(var + eps);
    }
}

#define T float
#define NAME(fn) fn##_f32
#include "bn_kernels_impl.h"
#undef T
#undef NAME

#define T double
#define NAME(fn) fn##_f64
#include "bn_kernels_impl.h"
#undef T
#undef NAME
