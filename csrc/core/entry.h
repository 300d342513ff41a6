/* entry.h -- the hot entry points of bn.h for one element type: each calls
 * the build core.c chose. Included by core.c with T, P and NAME (as kernels.h). */

/* void NAME(bn_fn)(params) calling the chosen build's fn with args */
#define BN_ENTRY(fn, params, args)                                                          \
    void NAME(bn_##fn) params                                                                \
    {                                                                                       \
        bn_kernels()->NAME(fn) args;                                                        \
    }

BN_ENTRY(stats, (bn_partial *stats, double *work, const T *x, const double *shift, bn_shape s),
         (stats, work, x, shift, s))
BN_ENTRY(forward_train,
         (T *y, bn_partial *stats, double *mean, double *invstd, double *work, const T *x,
          const P *gamma, const P *beta, double eps, bn_shape s),
         (y, stats, mean, invstd, work, x, gamma, beta, eps, s))
BN_ENTRY(forward,
         (T *y, double *work, const T *x, const double *mean, const double *invstd,
          const P *gamma, const P *beta, bn_shape s),
         (y, work, x, mean, invstd, gamma, beta, s))
BN_ENTRY(backward,
         (T *dx, double *dgamma, double *dbeta, double *work, const T *dy, const T *x,
          const double *mean, const double *invstd, const P *gamma, bn_shape s, int training),
         (dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s, training))
BN_ENTRY(grad_sums,
         (double *dgamma, double *dbeta, double *work, const T *dy, const T *x,
          const double *mean, const double *invstd, bn_shape s),
         (dgamma, dbeta, work, dy, x, mean, invstd, s))
BN_ENTRY(backward_dx,
         (T *dx, double *work, const T *dy, const T *x, const double *mean,
          const double *invstd, const P *gamma, const double *dgamma, const double *dbeta,
          double count, bn_shape s, int training),
         (dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta, count, s, training))

BN_ENTRY(rows_forward,
         (T *y, double *mean, double *invstd, double *var, const T *x, const P *gamma,
          const P *beta, double eps, bn_rows s),
         (y, mean, invstd, var, x, gamma, beta, eps, s))
BN_ENTRY(rows_backward,
         (T *dx, double *dgamma, double *dbeta, double *work, const T *dy, const T *x,
          const double *mean, const double *invstd, const P *gamma, bn_rows s),
         (dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s))

#undef BN_ENTRY
