/* running.h -- the per-feature functions of bn.h for one element type (O(C)
 * work each), on its parameters' type P: included by core.c with P and NAME,
 * as kernels.h. */

void NAME(bn_running_moments)(double *mean, double *invstd, const P *running_mean,
                              const P *running_var, size_t channels, double eps)
{
    for (size_t c = 0; c < channels; c++) {
        mean[c] = (double)running_mean[c];
        invstd[c] = 1.0 / sqrt((double)running_var[c] + eps);
    }
}

void NAME(bn_update_running)(P *running_mean, P *running_var, const bn_partial *stats,
                             size_t channels, double momentum)
{
    for (size_t c = 0; c < channels; c++) {
        double unbiased_var = stats[c].m2 / (stats[c].count - 1.0);
        running_mean[c] = (P)((1.0 - momentum) * (double)running_mean[c]
                              + momentum * stats[c].mean);
        running_var[c] = (P)((1.0 - momentum) * (double)running_var[c]
                             + momentum * unbiased_var);
    }
}

void NAME(bn_set_running)(P *running_mean, P *running_var, const bn_partial *stats,
                          size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        running_mean[c] = (P)stats[c].mean;
        running_var[c] = (P)(stats[c].m2 / (stats[c].count - 1.0));
    }
}
