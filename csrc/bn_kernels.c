/* bn_kernels.c -- the mathematics of batch normalization (DESIGN.md section 1).
 *
 * The hot kernels live in bn_kernels_impl.h, built once per instruction set
 * (bn_kernels_baseline.c, bn_kernels_avx2.c, bn_kernels_avx512.c: portable
 * code that each build vectorizes for its own registers); the public entry
 * points below call the best build the CPU runs, chosen on first use. Here
 * too: the thread count, the merging of partial statistics and the O(C)
 * per-feature functions (bn_running_impl.h).
 */
#include "bn_kernels_internal.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

static int bn_num_threads = 0; /* 0 until set: OpenMP's default */

void bn_set_num_threads(int n)
{
    bn_num_threads = n > 0 ? n : 1;
}

int bn_get_num_threads(void)
{
#ifdef _OPENMP
    return bn_num_threads > 0 ? bn_num_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int bn_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

size_t bn_count(bn_shape s)
{
    return s.outer * s.inner;
}

size_t bn_workspace_size(bn_shape s)
{
    /* bn_work_parts: up to 7 doubles to reach a cache line (work, a
     * double *, is 8-byte aligned), then four wide vectors, the row groups'
     * partials or sums, and interleaved lanes */
    size_t stride = bn_work_stride(s);
    return 7 + 4 * stride + bn_whole_lines(3 * s.channels * bn_reduction_groups(s))
           + bn_row_groups(s) * BN_LANE_VECTORS * stride;
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

void bn_partial_unshift(bn_partial *stats, const double *shift, size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        stats[c].mean += shift[c];
    }
}

/* stats[C] <- the partials[groups][C] of row groups merged in order, then
 * made absolute by adding unshift[C] to the means (when not NULL) */
void bn_merge_groups(bn_partial *stats, const bn_partial *partials, size_t groups, size_t C,
                     const double *unshift)
{
    for (size_t c = 0; c < C; c++) {
        /* the first group as merging it into no values gives it */
        int first = groups > 0 && partials[c].count != 0.0;
        stats[c] = first ? partials[c] : (bn_partial){0.0, 0.0, 0.0};
        for (size_t g = 1; g < groups; g++) {
            bn_partial_merge(&stats[c], &partials[g * C + c]);
        }
    }
    if (unshift) {
        bn_partial_unshift(stats, unshift, C);
    }
}

/* The lanes of feature c in a wide row of interleaved (or spread) shape s,
 * in order of the wide row's repeats, then of the feature's places in its
 * row: l = repeat * width + c * inner + i */
#define FOR_FEATURE_LANE(s, c, l)                                                     \
    for (size_t width_ = bn_wide_width(s), r_ = 0, end_ = bn_wide_len(s); r_ < end_;   \
         r_ += width_)                                                                \
        for (size_t l = r_ + (c) * (s).inner; l < r_ + ((c) + 1) * (s).inner; l++)

void bn_lane_partials(bn_partial *partial, bn_lane_stats v, bn_shape s, size_t o0, size_t o1)
{
    bn_wide_rows w = bn_wide_rows_of(bn_wide_shape(s), o0, o1);
    /* inner == 1 and C >= 32: a lane a feature, and a wide row a row, so
       that there is no partial wide row (w.rest == 0) */
    if (bn_wide_len(s) == s.channels) {
        for (size_t c = 0; c < s.channels; c++) {
            partial[c] = (bn_partial){(double)w.whole, v.mean[c], v.m2[c]};
        }
        return;
    }
    for (size_t c = 0; c < s.channels; c++) {
        partial[c] = (bn_partial){0.0, 0.0, 0.0};
        FOR_FEATURE_LANE(s, c, l) {
            bn_partial lane = {(double)(w.whole + (l < w.rest)), v.mean[l], v.m2[l]};
            bn_partial_merge(&partial[c], &lane);
        }
    }
}

void bn_lane_grads(double *sums, const double *lanes, size_t stride, bn_shape s)
{
    size_t C = s.channels;
    const double *sum_dy = lanes, *sum_dy_dev = lanes + stride;
    for (size_t c = 0; c < C; c++) {
        sums[c] = sums[C + c] = 0.0;
        FOR_FEATURE_LANE(s, c, l) {
            sums[c] += sum_dy[l];
            sums[C + c] += sum_dy_dev[l];
        }
    }
}

void bn_add_group_grads(double *dgamma, double *dbeta, const double *sums, size_t groups,
                        size_t C, const double *invstd)
{
    for (size_t c = 0; c < C; c++) {
        dbeta[c] = dgamma[c] = 0.0;
        for (size_t g = 0; g < groups; g++) {
            dbeta[c] += sums[2 * g * C + c];
            dgamma[c] += sums[2 * g * C + C + c];
        }
        dgamma[c] *= invstd[c];
    }
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

/* ---- instruction sets ----------------------------------------------------- */

/* the builds, indexed by bn_isa */
static const bn_kernel_table *bn_build(bn_isa isa)
{
#ifdef BN_HAVE_X86_BUILDS
    if (isa == BN_ISA_AVX512) {
        return &bn_kernels_avx512;
    }
    if (isa == BN_ISA_AVX2) {
        return &bn_kernels_avx2;
    }
#endif
    return isa == BN_ISA_DEFAULT ? &bn_kernels_baseline : NULL;
}

int bn_isa_supported(bn_isa isa)
{
    if (bn_build(isa) == NULL) {
        return 0;
    }
#ifdef BN_HAVE_X86_BUILDS
    if (isa == BN_ISA_AVX512) {
        return __builtin_cpu_supports("avx512f");
    }
    if (isa == BN_ISA_AVX2) {
        return __builtin_cpu_supports("avx2");
    }
#endif
    return 1;
}

const char *bn_isa_name(bn_isa isa)
{
    switch (isa) {
    case BN_ISA_DEFAULT:
        return "default";
    case BN_ISA_AVX2:
        return "avx2";
    case BN_ISA_AVX512:
        return "avx512";
    }
    return NULL;
}

int bn_cpu_is_amd(void)
{
#ifdef BN_HAVE_X86_BUILDS
    return __builtin_cpu_is("amd") != 0;
#else
    return 0;
#endif
}

/* the bn_isa in use; -1 until the first call chooses */
static atomic_int bn_chosen_isa = -1;

int bn_set_isa(bn_isa isa)
{
    if (!bn_isa_supported(isa)) {
        return -1;
    }
    atomic_store(&bn_chosen_isa, (int)isa);
    return 0;
}

/* the best build this CPU runs */
static bn_isa bn_best_isa(void)
{
    bn_isa best = BN_ISA_DEFAULT;
    for (int isa = BN_ISA_DEFAULT; isa <= BN_ISA_AVX512; isa++) {
        if (bn_isa_supported((bn_isa)isa)) {
            best = (bn_isa)isa;
        }
    }
    return best;
}

bn_isa bn_get_isa(void)
{
    int isa = atomic_load(&bn_chosen_isa);
    if (isa < 0) {
        int unset = -1;
        /* unless another thread chose first (then isa <- its choice) */
        isa = (int)bn_best_isa();
        if (!atomic_compare_exchange_strong(&bn_chosen_isa, &unset, isa)) {
            isa = unset;
        }
    }
    return (bn_isa)isa;
}

/* the build the kernels run: the best one unless bn_set_isa chose another */
static const bn_kernel_table *bn_kernels(void)
{
    return bn_build(bn_get_isa());
}

void bn_stats_f32(bn_partial *stats, double *work, const float *x, const double *shift,
                  bn_shape s)
{
    bn_kernels()->stats_f32(stats, work, x, shift, s);
}

void bn_stats_f64(bn_partial *stats, double *work, const double *x, const double *shift,
                  bn_shape s)
{
    bn_kernels()->stats_f64(stats, work, x, shift, s);
}

void bn_forward_train_f32(float *y, bn_partial *stats, double *mean, double *invstd,
                          double *work, const float *x, const float *gamma, const float *beta,
                          double eps, bn_shape s)
{
    bn_kernels()->forward_train_f32(y, stats, mean, invstd, work, x, gamma, beta, eps, s);
}

void bn_forward_train_f64(double *y, bn_partial *stats, double *mean, double *invstd,
                          double *work, const double *x, const double *gamma,
                          const double *beta, double eps, bn_shape s)
{
    bn_kernels()->forward_train_f64(y, stats, mean, invstd, work, x, gamma, beta, eps, s);
}

void bn_forward_f32(float *y, double *work, const float *x, const double *mean,
                    const double *invstd, const float *gamma, const float *beta, bn_shape s)
{
    bn_kernels()->forward_f32(y, work, x, mean, invstd, gamma, beta, s);
}

void bn_forward_f64(double *y, double *work, const double *x, const double *mean,
                    const double *invstd, const double *gamma, const double *beta, bn_shape s)
{
    bn_kernels()->forward_f64(y, work, x, mean, invstd, gamma, beta, s);
}

void bn_backward_f32(float *dx, double *dgamma, double *dbeta, double *work, const float *dy,
                     const float *x, const double *mean, const double *invstd,
                     const float *gamma, bn_shape s, int training)
{
    bn_kernels()->backward_f32(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s,
                               training);
}

void bn_backward_f64(double *dx, double *dgamma, double *dbeta, double *work,
                     const double *dy, const double *x, const double *mean,
                     const double *invstd, const double *gamma, bn_shape s, int training)
{
    bn_kernels()->backward_f64(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s,
                               training);
}

void bn_grad_sums_f32(double *dgamma, double *dbeta, double *work, const float *dy,
                      const float *x, const double *mean, const double *invstd, bn_shape s)
{
    bn_kernels()->grad_sums_f32(dgamma, dbeta, work, dy, x, mean, invstd, s);
}

void bn_grad_sums_f64(double *dgamma, double *dbeta, double *work, const double *dy,
                      const double *x, const double *mean, const double *invstd, bn_shape s)
{
    bn_kernels()->grad_sums_f64(dgamma, dbeta, work, dy, x, mean, invstd, s);
}

void bn_backward_dx_f32(float *dx, double *work, const float *dy, const float *x,
                        const double *mean, const double *invstd, const float *gamma,
                        const double *dgamma, const double *dbeta, double count, bn_shape s,
                        int training)
{
    bn_kernels()->backward_dx_f32(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta, count,
                                  s, training);
}

void bn_backward_dx_f64(double *dx, double *work, const double *dy, const double *x,
                        const double *mean, const double *invstd, const double *gamma,
                        const double *dgamma, const double *dbeta, double count, bn_shape s,
                        int training)
{
    bn_kernels()->backward_dx_f64(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta, count,
                                  s, training);
}

/* ---- per-feature functions, per element type ------------------------------ */

#define T float
#define NAME(fn) fn##_f32
#include "bn_running_impl.h"
#undef T
#undef NAME

#define T double
#define NAME(fn) fn##_f64
#include "bn_running_impl.h"
#undef T
#undef NAME
