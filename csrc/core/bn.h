/* bn.h -- the numerical core of bnpy: batch normalization in pure C11.
 *
 * No Python, no NumPy. Callers own every buffer; nothing here allocates.
 *
 * Every array x is viewed as a C-contiguous block x[outer][C][inner]:
 * feature c owns the values x[o][c][i] for all o < outer, i < inner, so each
 * feature has n = outer * inner values. (N, C) is outer=N, inner=1;
 * (N, C, H, W) with the feature axis 1 is outer=N, inner=H*W; channels-last
 * (N, H, W, C) is outer=N*H*W, inner=1.
 *
 * Per-feature statistics (mean, invstd, partial sums) are double whatever the
 * element type: every reduction accumulates in double. Argument order follows
 * "outputs, then inputs, then sizes".
 */
#ifndef BNPY_BN_H
#define BNPY_BN_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t outer;    /* product of the dimensions before the feature axis */
    size_t channels; /* C, the length of the feature axis */
    size_t inner;    /* product of the dimensions after the feature axis */
} bn_shape;

/* Number of values each feature sees: outer * inner. */
size_t bn_count(bn_shape s);

/* Partial statistics of one block of data, per feature: what two blocks need
 * to be merged exactly (Chan, Golub and LeVeque's parallel formula). */
typedef struct {
    double count; /* number of values */
    double mean;  /* their mean */
    double m2;    /* sum of squared deviations from that mean */
} bn_partial;

/* Rows for layer, group, instance and RMS normalization: x[rows][n], each
 * row normalized over its own n values. A row is runs of `spread` values
 * (spread divides n), each a channel with its own gamma and beta: row r's
 * run j is channel (r % period) * (n / spread) + j. Layer norm: spread 1 and
 * period 1 (a channel per value of the last axes); group norm with G groups
 * of channels-first data: spread the positions of a channel, period G;
 * instance norm: a group per channel. centered 0: RMS norm, which divides by
 * the root mean square and subtracts no mean. */
typedef struct {
    size_t rows, n, spread, period;
    int centered;
} bn_rows;

/* --- threads ------------------------------------------------------------ */

/* Threads the kernels may use: OpenMP's default (OMP_NUM_THREADS, or the
 * number of cores) until set; always 1 when built without OpenMP. Results do
 * not depend on it: every sum has an order fixed by the shape alone. */
void bn_set_num_threads(int n);
int bn_get_num_threads(void);
int bn_has_openmp(void);

/* --- instruction sets ------------------------------------------------- */

/* The builds of the hot kernels (statistics, forward, backward), each
 * vectorized for its instruction set; results are bitwise the same in all.
 * The kernels run the best one the CPU supports unless told otherwise. */
typedef enum {
    BN_ISA_DEFAULT = 0, /* any CPU the compiler targets; "portable" when built
                           without vector extensions (BN_PORTABLE) */
    BN_ISA_AVX2 = 1,    /* AVX2 and F16C */
    BN_ISA_AVX512 = 2,  /* AVX-512F and F16C */
} bn_isa;

/* 1 when this build has code for isa and the CPU runs it, else 0 */
int bn_isa_supported(bn_isa isa);
/* Run the kernels with isa from now on: 0, or -1 (and nothing changes) when
 * bn_isa_supported(isa) is 0. */
int bn_set_isa(bn_isa isa);
bn_isa bn_get_isa(void);
/* "default" (or "portable"), "avx2" or "avx512"; NULL for a value that is
 * no bn_isa */
const char *bn_isa_name(bn_isa isa);

/* Doubles of workspace the forward and backward kernels need: the caller
 * passes `work` with at least this many. */
size_t bn_workspace_size(bn_shape s);
size_t bn_rows_workspace_size(bn_rows s);
/* the channels of bn_rows s, period * n / spread: of gamma, beta and their
 * gradients */
size_t bn_rows_channels(bn_rows s);

/* --- per-feature helpers --------------------------------------------- */

/* a <- the statistics of the union of the data behind a and b. */
void bn_partial_merge(bn_partial *a, const bn_partial *b);

/* mean[C], invstd[C] <- batch statistics from stats[C]: the biased variance
 * m2 / count normalizes, invstd = 1 / sqrt(var + eps). */
void bn_batch_moments(double *mean, double *invstd, const bn_partial *stats,
                      size_t channels, double eps);

/* --- the kernels, for each element type T ------------------------------
 * BN_KERNELS_API(T, P, S) declares them for elements T (x, y, dy, dx) and
 * parameters P (gamma, beta) with names ending in S:
 *   _f32   T = P = float                 (bn_stats_f32, ...)
 *   _f64   T = P = double
 *   _f16   T = uint16_t, the bits of IEEE binary16 (float16); P = float
 *   _bf16  T = uint16_t, the bits of bfloat16 (a float32's top 16); P = float
 * Halves have their parameters and running statistics in float32, as in
 * PyTorch's mixed precision (so bn_update_running_f16 is bn_update_running_f32).
 * Every value is read exactly into double and computed as for float and double
 * (the same formulas, the same order of summation), and each result is
 * rounded once to T, to nearest with ties to even (for halves as if straight
 * from double: never twice), in the default floating-point environment:
 * past the largest finite half it is inf, below the least normal a subnormal
 * or a signed zero; inf stays inf, and NaN stays NaN, quiet, with the top bits
 * of its payload (as IEEE's conversions do). The results are bitwise the same
 * in every build, as for float and double.
 *
 * bn_stats: stats[C] <- count, mean and m2 of each feature of x. Every value
 *   is taken less a shift, so that the means merged block by block stay
 *   small and keep their last bits: shift[C] when given, and then the means
 *   come out relative to it (for statistics merged further, e.g. across
 *   batches or processes); with shift NULL, each feature's first value, and
 *   the means come out absolute. The values are summed in blocks (tiles of a
 *   feature's rows, or blocks of rows down each lane of a wide row: see
 *   core.h), each about a center near its mean: the block's own rough mean
 *   for the first, the mean so far for the others. Each block's sums are
 *   corrected as in Chan, Golub and LeVeque's two-pass algorithm and merged
 *   with their pairwise formula, so a large common offset does not cancel
 *   the variance, and a constant feature gets exactly its value as mean and
 *   m2 = 0. work: bn_workspace_size(s) doubles (every kernel's `work`).
 * bn_running_moments: mean[C], invstd[C] <- the running statistics, as the
 *   eval-mode moments.
 * bn_update_running: running_mean[C], running_var[C] <- (1 - momentum) *
 *   running + momentum * batch, with the unbiased batch variance
 *   m2 / (count - 1). count must be > 1.
 * bn_set_running: running_mean[C], running_var[C] <- the mean and the
 *   unbiased variance m2 / (count - 1) of stats (calibration: exact
 *   population statistics).
 * bn_forward_train: training mode: stats[C], mean[C], invstd[C] <- x's batch
 *   statistics (as bn_stats with no shift gives them), and
 *   y <- gamma * (x - mean) * invstd + beta. Each feature is normalized while
 *   its data is still in cache when the plan takes features one by one.
 *   gamma and beta may be NULL (gamma = 1, beta = 0). y may be x itself.
 * bn_forward: y <- gamma * (x - mean) * invstd + beta with given moments
 *   (inference with the running statistics). gamma and beta may be NULL. y
 *   may be x itself.
 * bn_backward: dbeta[C] <- sum dy, dgamma[C] <- sum dy * xhat with
 *   xhat = (x - mean) * invstd, and dx <-
 *     training: gamma * invstd / n * (n * dy - dbeta - xhat * dgamma)
 *               (mean and invstd are x's batch statistics and depend on x);
 *     otherwise: dy * gamma * invstd (they are constants).
 *   gamma may be NULL (1). dx may be dy or x itself (every value is read
 *   before it is overwritten), but not a part of either.
 * bn_grad_sums and bn_backward_dx: the two halves of bn_backward, for
 *   statistics gathered elsewhere (across processes): bn_grad_sums gives this
 *   block's dbeta[C] = sum dy and dgamma[C] = sum dy * xhat; bn_backward_dx
 *   gives dx from sums over `count` values in all (training: mean and invstd
 *   are the statistics of all those values; otherwise constants, and the
 *   sums are not used).
 * bn_rows_forward: mean[rows], invstd[rows] <- each row's moments (mean 0
 *   and invstd = 1 / sqrt(mean square + eps) when not centered), var[rows]
 *   <- each row's biased variance (for running statistics), summed in
 *   tiles about a center as a planar feature's, and y <- (x - mean) *
 *   (invstd * gamma) + beta, gamma and beta of bn_rows_channels(s) values
 *   each. y may be x itself.
 * bn_rows_backward: dx <- invstd * ((gamma * dy - a) - xhat * b), with a and
 *   b the means over the row of gamma * dy (a = 0 when not centered) and of
 *   gamma * dy * xhat; dgamma[channels] <- sum dy * xhat and dbeta <- sum dy
 *   over each channel's values in all rows (channels: period * n / spread),
 *   summed in blocks of rows in bn_rows_workspace_size(s) doubles of work.
 *   dx may be dy or x itself. */
#define BN_KERNELS_API(T, P, S)                                                              \
    BN_HOT_KERNELS(BN_DECLARE, T, P, S)                                                     \
    void bn_running_moments##S(double *mean, double *invstd, const P *running_mean,         \
                               const P *running_var, size_t channels, double eps);          \
    void bn_update_running##S(P *running_mean, P *running_var, const bn_partial *stats,     \
                              size_t channels, double momentum);                            \
    void bn_set_running##S(P *running_mean, P *running_var, const bn_partial *stats,        \
                           size_t channels);

/* The kernels that each instruction-set build provides (core.c calls the
 * chosen build's): X(name, parameters, arguments) for each */
#define BN_HOT_KERNELS(X, T, P, S)                                                           \
    X(bn_stats##S, (bn_partial *stats, double *work, const T *x, const double *shift,      \
                    bn_shape s),                                                            \
      (stats, work, x, shift, s))                                                           \
    X(bn_forward_train##S,                                                                  \
      (T *y, bn_partial *stats, double *mean, double *invstd, double *work, const T *x,     \
       const P *gamma, const P *beta, double eps, bn_shape s),                              \
      (y, stats, mean, invstd, work, x, gamma, beta, eps, s))                               \
    X(bn_forward##S,                                                                        \
      (T *y, double *work, const T *x, const double *mean, const double *invstd,           \
       const P *gamma, const P *beta, bn_shape s),                                          \
      (y, work, x, mean, invstd, gamma, beta, s))                                           \
    X(bn_backward##S,                                                                       \
      (T *dx, double *dgamma, double *dbeta, double *work, const T *dy, const T *x,         \
       const double *mean, const double *invstd, const P *gamma, bn_shape s, int training), \
      (dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s, training))                   \
    X(bn_grad_sums##S,                                                                      \
      (double *dgamma, double *dbeta, double *work, const T *dy, const T *x,               \
       const double *mean, const double *invstd, bn_shape s),                               \
      (dgamma, dbeta, work, dy, x, mean, invstd, s))                                        \
    X(bn_backward_dx##S,                                                                    \
      (T *dx, double *work, const T *dy, const T *x, const double *mean,                    \
       const double *invstd, const P *gamma, const double *dgamma, const double *dbeta,    \
       double count, bn_shape s, int training),                                             \
      (dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta, count, s, training))            \
    X(bn_rows_forward##S,                                                                   \
      (T *y, double *mean, double *invstd, double *var, const T *x, const P *gamma,         \
       const P *beta, double eps, bn_rows s),                                               \
      (y, mean, invstd, var, x, gamma, beta, eps, s))                                       \
    X(bn_rows_backward##S,                                                                  \
      (T *dx, double *dgamma, double *dbeta, double *work, const T *dy, const T *x,         \
       const double *mean, const double *invstd, const P *gamma, bn_rows s),                \
      (dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s))
#define BN_DECLARE(name, parameters, arguments) void name parameters;

BN_KERNELS_API(float, float, _f32)
BN_KERNELS_API(double, double, _f64)
BN_KERNELS_API(uint16_t, float, _f16)
BN_KERNELS_API(uint16_t, float, _bf16)

#endif /* BNPY_BN_H */
