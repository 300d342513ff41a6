/* entry.h -- the hot entry points of bn.h for one element type: each calls
 * the build core.c chose. Included by core.c with T and NAME (as kernels.h). */

void NAME(bn_stats)(bn_partial *stats, double *work, const T *x, const double *shift,
                    bn_shape s)
{
    bn_kernels()->NAME(stats)(stats, work, x, shift, s);
}

void NAME(bn_forward_train)(T *y, bn_partial *stats, double *mean, double *invstd,
                            double *work, const T *x, const T *gamma, const T *beta,
                            double eps, bn_shape s)
{
    bn_kernels()->NAME(forward_train)(y, stats, mean, invstd, work, x, gamma, beta, eps, s);
}

void NAME(bn_forward)(T *y, double *work, const T *x, const double *mean,
                      const double *invstd, const T *gamma, const T *beta, bn_shape s)
{
    bn_kernels()->NAME(forward)(y, work, x, mean, invstd, gamma, beta, s);
}

void NAME(bn_backward)(T *dx, double *dgamma, double *dbeta, double *work, const T *dy,
                       const T *x, const double *mean, const double *invstd, const T *gamma,
                       bn_shape s, int training)
{
    bn_kernels()->NAME(backward)(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s,
                                 training);
}

void NAME(bn_grad_sums)(double *dgamma, double *dbeta, double *work, const T *dy,
                        const T *x, const double *mean, const double *invstd, bn_shape s)
{
    bn_kernels()->NAME(grad_sums)(dgamma, dbeta, work, dy, x, mean, invstd, s);
}

void NAME(bn_backward_dx)(T *dx, double *work, const T *dy, const T *x, const double *mean,
                          const double *invstd, const T *gamma, const double *dgamma,
                          const double *dbeta, double count, bn_shape s, int training)
{
    bn_kernels()->NAME(backward_dx)(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta,
                                    count, s, training);
}
