/* bn_kernels.h -- the numerical core of bnpy: batch normalization in pure C11.
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
#ifndef BNPY_BN_KERNELS_H
#define BNPY_BN_KERNELS_H

#include <stddef.h>

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

/* --- statistics -------------------------------------------------------- */

/* stats[C] <- count, mean and m2 of each feature of x, by the corrected
 * two-pass algorithm: a large common offset does not cancel the variance,
 * and a constant feature gets exactly its value as mean and m2 = 0.
 * sum[C] is scratch. */
void bn_stats_f32(bn_partial *stats, double *scratch, const float *x, bn_shape s);
void bn_stats_f64(bn_partial *stats, double *scratch, const double *x, bn_shape s);

/* a <- the statistics of the union of the data behind a and b. */
void bn_partial_merge(bn_partial *a, const bn_partial *b);

/* mean[C], invstd[C] <- batch statistics from stats[C]: the biased variance
 * m2 / count normalizes, invstd = 1 / sqrt(var + eps). */
void bn_batch_moments(double *mean, double *invstd, const bn_partial *stats,
                      size_t channels, double eps);

/* mean[C], invstd[C] <- the running statistics, as the eval-mode moments. */
void bn_running_moments_f32(double *mean, double *invstd, const float *running_mean,
                            const float *running_var, size_t channels, double eps);
void bn_running_moments_f64(double *mean, double *invstd, const double *running_mean,
                            const double *running_var, size_t channels, double eps);

/* running_mean[C], running_var[C] <- (1 - momentum) * running + momentum * batch,
 * with the unbiased batch variance m2 / (count - 1). count must be > 1. */
void bn_update_running_f32(float *running_mean, float *running_var,
                           const bn_partial *stats, size_t channels, double momentum);
void bn_update_running_f64(double *running_mean, double *running_var,
                           const bn_partial *stats, size_t channels, double momentum);

/* --- forward ----------------------------------------------------------- */

/* y <- gamma * (x - mean) * invstd + beta, per feature. gamma and beta may be
 * NULL (no affine transform: gamma = 1, beta = 0). Serves training mode (batch
 * moments) and inference (running moments) alike. y may be x itself. */
void bn_forward_f32(float *y, const float *x, const double *mean, const double *invstd,
                    const float *gamma, const float *beta, bn_shape s);
void bn_forward_f64(double *y, const double *x, const double *mean, const double *invstd,
                    const double *gamma, const double *beta, bn_shape s);

/* --- backward ---------------------------------------------------------- */

/* dbeta[C] <- sum dy, dgamma[C] <- sum dy * xhat with xhat = (x - mean) * invstd. */
void bn_backward_reduce_f32(double *dgamma, double *dbeta, const float *dy, const float *x,
                            const double *mean, const double *invstd, bn_shape s);
void bn_backward_reduce_f64(double *dgamma, double *dbeta, const double *dy, const double *x,
                            const double *mean, const double *invstd, bn_shape s);

/* dx <- gamma * invstd / n * (n * dy - dbeta - xhat * dgamma): the gradient
 * when mean and invstd are the batch statistics of x. gamma may be NULL (1).
 * dgamma and dbeta are the sums of bn_backward_reduce. dx may be dy itself. */
void bn_backward_dx_train_f32(float *dx, const float *dy, const float *x, const double *mean,
                              const double *invstd, const float *gamma, const double *dgamma,
                              const double *dbeta, bn_shape s);
void bn_backward_dx_train_f64(double *dx, const double *dy, const double *x, const double *mean,
                              const double *invstd, const double *gamma, const double *dgamma,
                              const double *dbeta, bn_shape s);

/* dx <- dy * gamma * invstd: the gradient when mean and invstd are constants
 * (eval mode with running statistics). gamma may be NULL. dx may be dy. */
void bn_backward_dx_eval_f32(float *dx, const float *dy, const double *invstd,
                             const float *gamma, bn_shape s);
void bn_backward_dx_eval_f64(double *dx, const double *dy, const double *invstd,
                             const double *gamma, bn_shape s);

/* out[n] <- in[n] rounded to the element type. */
void bn_from_double_f32(float *out, const double *in, size_t n);
void bn_from_double_f64(double *out, const double *in, size_t n);

#endif /* BNPY_BN_KERNELS_H */
