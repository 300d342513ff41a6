/* bn_dispatch.c -- pick the kernel for an array's dtype and run it without
 * the GIL. Arrays reaching here are aligned, native-order float32, float64,
 * float16 or bfloat16 data in a dense layout (bn_as_data, bn_output_like),
 * their parameters float32 or float64, and the caller holds a
 * reference to each, so none can go away while the GIL is released. */
#include "bn_module.h"

#include <string.h>

#define IS_F32(arr) (PyArray_TYPE(arr) == NPY_FLOAT)

/* the data of an optional array, or NULL */
#define DATA_OR_NULL(arr) ((arr) != NULL ? PyArray_DATA(arr) : NULL)

/* An input with no values (bn_shape_is_empty) runs no kernel: a kernel may
 * walk every empty row of a huge leading dimension. Its statistics are those
 * of nothing, count 0 (bn_batch_moments gives mean 0 and 1/sqrt(eps) for them),
 * and its sums are 0. */
static void zero_partials(bn_partial *stats, size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        stats[c] = (bn_partial){0.0, 0.0, 0.0};
    }
}

static void zero_sums(double *dgamma, double *dbeta, size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        dgamma[c] = 0.0;
        dbeta[c] = 0.0;
    }
}

void bn_run_stats(bn_partial *stats, double *work, PyArrayObject *x, const double *shift,
                  bn_shape s)
{
    if (bn_shape_is_empty(s)) {
        zero_partials(stats, s.channels);
        return;
    }
    const void *x_data = PyArray_DATA(x);
    BN_CALL_TYPED(x, bn_stats, stats, work, x_data, shift, s);
}

void bn_run_running_moments(double *mean, double *invstd, PyArrayObject *running_mean,
                            PyArrayObject *running_var, double eps)
{
    /* O(C): not worth dropping the GIL */
    size_t channels = (size_t)PyArray_DIM(running_mean, 0);
    if (IS_F32(running_mean)) {
        bn_running_moments_f32(mean, invstd, PyArray_DATA(running_mean),
                               PyArray_DATA(running_var), channels, eps);
    }
    else {
        bn_running_moments_f64(mean, invstd, PyArray_DATA(running_mean),
                               PyArray_DATA(running_var), channels, eps);
    }
}

void bn_run_update_running(PyArrayObject *running_mean, PyArrayObject *running_var,
                           const bn_partial *stats, double momentum)
{
    size_t channels = (size_t)PyArray_DIM(running_mean, 0);
    if (IS_F32(running_mean)) {
        bn_update_running_f32(PyArray_DATA(running_mean), PyArray_DATA(running_var),
                              stats, channels, momentum);
    }
    else {
        bn_update_running_f64(PyArray_DATA(running_mean), PyArray_DATA(running_var),
                              stats, channels, momentum);
    }
}

void bn_run_forward_train(PyArrayObject *y, bn_partial *stats, double *mean, double *invstd,
                          double *work, PyArrayObject *x, PyArrayObject *gamma,
                          PyArrayObject *beta, double eps, bn_shape s)
{
    if (bn_shape_is_empty(s)) {
        zero_partials(stats, s.channels);
        bn_batch_moments(mean, invstd, stats, s.channels, eps);
        return;
    }
    void *y_data = PyArray_DATA(y);
    const void *x_data = PyArray_DATA(x);
    const void *gamma_data = DATA_OR_NULL(gamma), *beta_data = DATA_OR_NULL(beta);
    BN_CALL_TYPED(x, bn_forward_train, y_data, stats, mean, invstd, work, x_data, gamma_data,
               beta_data, eps, s);
}

void bn_run_forward(PyArrayObject *y, double *work, PyArrayObject *x, const double *mean,
                    const double *invstd, PyArrayObject *gamma, PyArrayObject *beta,
                    bn_shape s)
{
    if (bn_shape_is_empty(s)) {
        return;
    }
    void *y_data = PyArray_DATA(y);
    const void *x_data = PyArray_DATA(x);
    const void *gamma_data = DATA_OR_NULL(gamma), *beta_data = DATA_OR_NULL(beta);
    BN_CALL_TYPED(x, bn_forward, y_data, work, x_data, mean, invstd, gamma_data, beta_data,
               s);
}

void bn_run_backward(PyArrayObject *dx, double *dgamma, double *dbeta, double *work,
                     PyArrayObject *dy, PyArrayObject *x, const double *mean,
                     const double *invstd, PyArrayObject *gamma, bn_shape s, int training)
{
    if (bn_shape_is_empty(s)) {
        zero_sums(dgamma, dbeta, s.channels);
        return;
    }
    void *dx_data = PyArray_DATA(dx);
    const void *dy_data = PyArray_DATA(dy), *x_data = PyArray_DATA(x);
    const void *gamma_data = DATA_OR_NULL(gamma);
    BN_CALL_TYPED(x, bn_backward, dx_data, dgamma, dbeta, work, dy_data, x_data, mean, invstd,
               gamma_data, s, training);
}

void bn_run_set_running(PyArrayObject *running_mean, PyArrayObject *running_var,
                        const bn_partial *stats)
{
    size_t channels = (size_t)PyArray_DIM(running_mean, 0);
    if (IS_F32(running_mean)) {
        bn_set_running_f32(PyArray_DATA(running_mean), PyArray_DATA(running_var), stats,
                           channels);
    }
    else {
        bn_set_running_f64(PyArray_DATA(running_mean), PyArray_DATA(running_var), stats,
                           channels);
    }
}

void bn_run_grad_sums(double *dgamma, double *dbeta, double *work, PyArrayObject *dy,
                      PyArrayObject *x, const double *mean, const double *invstd, bn_shape s)
{
    if (bn_shape_is_empty(s)) {
        zero_sums(dgamma, dbeta, s.channels);
        return;
    }
    const void *dy_data = PyArray_DATA(dy), *x_data = PyArray_DATA(x);
    BN_CALL_TYPED(x, bn_grad_sums, dgamma, dbeta, work, dy_data, x_data, mean, invstd, s);
}

void bn_run_backward_dx(PyArrayObject *dx, double *work, PyArrayObject *dy, PyArrayObject *x,
                        const double *mean, const double *invstd, PyArrayObject *gamma,
                        const double *dgamma, const double *dbeta, double count, bn_shape s,
                        int training)
{
    if (bn_shape_is_empty(s)) {
        return;
    }
    void *dx_data = PyArray_DATA(dx);
    const void *dy_data = PyArray_DATA(dy), *x_data = PyArray_DATA(x);
    const void *gamma_data = DATA_OR_NULL(gamma);
    BN_CALL_TYPED(x, bn_backward_dx, dx_data, work, dy_data, x_data, mean, invstd, gamma_data,
               dgamma, dbeta, count, s, training);
}

void bn_run_from_double(PyArrayObject *out, const double *values)
{
    /* out[n] <- values[n] rounded to out's dtype */
    size_t n = (size_t)PyArray_SIZE(out);
    if (IS_F32(out)) {
        float *rounded = PyArray_DATA(out);
        for (size_t i = 0; i < n; i++) {
            rounded[i] = (float)values[i];
        }
    }
    else {
        memcpy(PyArray_DATA(out), values, n * sizeof *values);
    }
}

PyArrayObject *bn_vector_from_double(int typenum, const double *values, npy_intp n)
{
    PyArrayObject *arr = bn_new_vector(typenum, n);
    if (arr != NULL) {
        bn_run_from_double(arr, values);
    }
    return arr;
}

double *bn_new_workspace(bn_shape s)
{
    /* an empty input runs no kernel: it needs none (one double, not NULL) */
    size_t doubles = bn_shape_is_empty(s) ? 1 : bn_workspace_size(s) + 1;
    return bn_new_scratch(doubles, sizeof(double), "the kernels' workspace");
}
