/* bn_kernels_impl.h -- the kernels of bn_kernels.h for one element type.
 *
 * Included by bn_kernels.c once per type, with
 *   T      the element type (float or double)
 *   NAME   a macro that appends the type's suffix: NAME(bn_forward) is
 *          bn_forward_f32 or bn_forward_f64.
 *
 * Every kernel walks memory in order, x[o][c][i], with one accumulator per
 * feature, so the same loop serves inner = 1 and inner = H*W, and the order of
 * every sum is fixed by the shape alone.
 */

/* the row x[o][c][:] */
#define ROW(ptr, o, c, s) ((ptr) + ((o) * (s).channels + (c)) * (s).inner)

void NAME(bn_stats)(bn_partial *stats, double *sum_dev, const T *x, bn_shape s)
{
    /* stats[C], sum_dev[C] scratch; x[outer][C][inner] */
    size_t n = bn_count(s);
    for (size_t c = 0; c < s.channels; c++) {
        stats[c].count = (double)n;
        stats[c].mean = 0.0;
        stats[c].m2 = 0.0;
        sum_dev[c] = 0.0;
    }
    if (n == 0) {
        return;
    }
    /* pass 1: the mean */
    for (size_t o = 0; o < s.outer; o++) {
        for (size_t c = 0; c < s.channels; c++) {
            const T *row = ROW(x, o, c, s);
            double sum = 0.0;
            for (size_t i = 0; i < s.inner; i++) {
                sum += (double)row[i];
            }
            stats[c].mean += sum;
        }
    }
    for (size_t c = 0; c < s.channels; c++) {
        stats[c].mean /= (double)n;
    }
    /* pass 2: deviations from that mean, their sum and their squares */
    for (size_t o = 0; o < s.outer; o++) {
        for (size_t c = 0; c < s.channels; c++) {
            const T *row = ROW(x, o, c, s);
            double mean = stats[c].mean;
            double sum_d = 0.0, sum_d2 = 0.0;
            for (size_t i = 0; i < s.inner; i++) {
                double d = (double)row[i] - mean;
                sum_d += d;
                sum_d2 += d * d;
            }
            sum_dev[c] += sum_d;
            stats[c].m2 += sum_d2;
        }
    }
    /* the correction: sum_dev is n times the rounding error of the mean */
    for (size_t c = 0; c < s.channels; c++) {
        double correction = sum_dev[c] / (double)n;
        double m2 = stats[c].m2 - sum_dev[c] * correction;
        stats[c].mean += correction;
        stats[c].m2 = m2 > 0.0 ? m2 : 0.0;
    }
}

void NAME(bn_running_moments)(double *mean, double *invstd, const T *running_mean,
                              const T *running_var, size_t channels, double eps)
{
    for (size_t c = 0; c < channels; c++) {
        mean[c] = (double)running_mean[c];
        invstd[c] = 1.0 / sqrt((double)running_var[c] + eps);
    }
}

void NAME(bn_update_running)(T *running_mean, T *running_var, const bn_partial *stats,
                             size_t channels, double momentum)
{
    for (size_t c = 0; c < channels; c++) {
        double unbiased_var = stats[c].m2 / (stats[c].count - 1.0);
        running_mean[c] = (T)((1.0 - momentum) * (double)running_mean[c]
                              + momentum * stats[c].mean);
        running_var[c] = (T)((1.0 - momentum) * (double)running_var[c]
                             + momentum * unbiased_var);
    }
}

void NAME(bn_forward)(T *y, const T *x, const double *mean, const double *invstd,
                      const T *gamma, const T *beta, bn_shape s)
{
    /* y, x [outer][C][inner]; mean, invstd, gamma, beta [C] */
    for (size_t o = 0; o < s.outer; o++) {
        for (size_t c = 0; c < s.channels; c++) {
            const T *x_row = ROW(x, o, c, s);
            T *y_row = ROW(y, o, c, s);
            double m = mean[c];
            double scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
            double shift = beta ? (double)beta[c] : 0.0;
            for (size_t i = 0; i < s.inner; i++) {
                y_row[i] = (T)(((double)x_row[i] - m) * scale + shift);
            }
        }
    }
}

void NAME(bn_backward_reduce)(double *dgamma, double *dbeta, const T *dy, const T *x,
                              const double *mean, const double *invstd, bn_shape s)
{
    /* dgamma, dbeta [C]; dy, x [outer][C][inner] */
    for (size_t c = 0; c < s.channels; c++) {
        dgamma[c] = 0.0;
        dbeta[c] = 0.0;
    }
    for (size_t o = 0; o < s.outer; o++) {
        for (size_t c = 0; c < s.channels; c++) {
            const T *dy_row = ROW(dy, o, c, s);
            const T *x_row = ROW(x, o, c, s);
            double m = mean[c];
            double sum_dy = 0.0, sum_dy_dev = 0.0;
            for (size_t i = 0; i < s.inner; i++) {
                double g = (double)dy_row[i];
                sum_dy += g;
                sum_dy_dev += g * ((double)x_row[i] - m);
            }
            dbeta[c] += sum_dy;
            dgamma[c] += sum_dy_dev;
        }
    }
    for (size_t c = 0; c < s.channels; c++) {
        dgamma[c] *= invstd[c];
    }
}

void NAME(bn_backward_dx_train)(T *dx, const T *dy, const T *x, const double *mean,
                                const double *invstd, const T *gamma, const double *dgamma,
                                const double *dbeta, bn_shape s)
{
    /* dx, dy, x [outer][C][inner]; the rest [C] */
    double n = (double)bn_count(s);
    for (size_t o = 0; o < s.outer; o++) {
        for (size_t c = 0; c < s.channels; c++) {
            const T *dy_row = ROW(dy, o, c, s);
            const T *x_row = ROW(x, o, c, s);
            T *dx_row = ROW(dx, o, c, s);
            double m = mean[c];
            double scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
            double mean_dy = dbeta[c] / n;
            /* xhat * dgamma / n, written as (x - m) times this: */
            double dev_coef = dgamma[c] * invstd[c] / n;
            for (size_t i = 0; i < s.inner; i++) {
                double dev = (double)x_row[i] - m;
                dx_row[i] = (T)(scale * ((double)dy_row[i] - mean_dy - dev * dev_coef));
            }
        }
    }
}

void NAME(bn_backward_dx_eval)(T *dx, const T *dy, const double *invstd, const T *gamma,
                               bn_shape s)
{
    /* dx, dy [outer][C][inner]; invstd, gamma [C] */
    for (size_t o = 0; o < s.outer; o++) {
        for (size_t c = 0; c < s.channels; c++) {
            const T *dy_row = ROW(dy, o, c, s);
            T *dx_row = ROW(dx, o, c, s);
            double scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
            for (size_t i = 0; i < s.inner; i++) {
                dx_row[i] = (T)((double)dy_row[i] * scale);
            }
        }
    }
}

void NAME(bn_from_double)(T *out, const double *in, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        out[i] = (T)in[i];
    }
}

#undef ROW
