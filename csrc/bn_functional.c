/* bn_functional.c -- the stateless functional API: batch_norm_forward,
 * batch_norm_inference and batch_norm_backward. The caller keeps gamma, beta
 * and the statistics; these functions check, convert and call the kernels.
 *
 * dtype rule: x decides. float32 and float64 inputs compute in their own
 * dtype, any other real input in float64; the other arrays are converted to
 * that dtype (statistics go to the kernels as float64). float16 and bfloat16
 * inputs stay in their dtype, and so do y and dx; gamma, beta and what comes
 * back per feature are float32 (mixed precision, as PyTorch's).
 */
#include "bn_module.h"

/* gamma or beta: None, or a checked (C,) array of typenum */
static int optional_vector(PyObject *obj, int typenum, npy_intp channels, const char *name,
                           PyArrayObject **out)
{
    *out = NULL;
    if (obj == Py_None) {
        return 0;
    }
    *out = bn_as_vector(obj, typenum, channels, name);
    return *out == NULL ? -1 : 0;
}

/* moments[2][C] <- mean and invstd given by the caller */
static int read_moments(PyObject *mean_obj, PyObject *invstd_obj, npy_intp channels,
                        const char *mean_name, const char *invstd_name, PyArrayObject **mean,
                        PyArrayObject **invstd)
{
    *mean = bn_as_vector(mean_obj, NPY_DOUBLE, channels, mean_name);
    *invstd = *mean ? bn_as_vector(invstd_obj, NPY_DOUBLE, channels, invstd_name) : NULL;
    return *invstd == NULL ? -1 : 0;
}

static PyObject *batch_norm_forward(PyObject *Py_UNUSED(module), PyObject *args,
                                    PyObject *kwargs)
{
    static char *kwlist[] = {"x", "gamma", "beta", "eps", "axis", "out", NULL};
    PyObject *x_obj, *gamma_obj, *beta_obj, *eps_obj = NULL, *axis_obj = NULL, *out_obj = NULL;
    double eps = 1e-5;
    int axis = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOO:batch_norm_forward", kwlist,
                                     &x_obj, &gamma_obj, &beta_obj, &eps_obj, &axis_obj,
                                     &out_obj)
        || (eps_obj && bn_parse_eps(eps_obj, &eps) < 0)
        || (axis_obj && bn_parse_axis(axis_obj, &axis) < 0)) {
        return NULL;
    }
    PyArrayObject *x = NULL, *gamma = NULL, *beta = NULL, *y = NULL, *moments = NULL;
    PyArrayObject *mean = NULL, *invstd = NULL;
    bn_partial *stats = NULL;
    double *work = NULL;
    PyObject *result = NULL;
    bn_layout layout;
    x = bn_as_compute_data(x_obj, "x");
    int typenum = x == NULL ? -1 : PyArray_TYPE(x);
    if (x == NULL || bn_relayout_to_out(&x, out_obj) < 0 || bn_get_layout(x, axis, 0, &layout) < 0
        || bn_check_batch_size(x, &layout, "training") < 0) {
        goto done;
    }
    npy_intp channels = (npy_intp)layout.shape.channels;
    if (optional_vector(gamma_obj, bn_param_typenum(typenum), channels, "gamma", &gamma) < 0
        || optional_vector(beta_obj, bn_param_typenum(typenum), channels, "beta", &beta) < 0) {
        goto done;
    }
    y = bn_output_like(out_obj, x, typenum);
    if (y == NULL || bn_check_separate(y, gamma, "gamma") < 0
        || bn_check_separate(y, beta, "beta") < 0) {
        goto done;
    }
    /* each allocation only after the one before it succeeded: a MemoryError
       keeps the message of the allocation that failed */
    moments = bn_new_matrix(NPY_DOUBLE, 2, channels);
    stats = moments ? bn_new_scratch((size_t)channels, sizeof(bn_partial),
                                     "the batch statistics") : NULL;
    work = stats ? bn_new_workspace(layout.shape) : NULL;
    if (work == NULL) {
        goto done;
    }
    double *mean_d = PyArray_DATA(moments), *invstd_d = mean_d + channels;
    bn_run_forward_train(y, stats, mean_d, invstd_d, work, x, gamma, beta, eps, layout.shape);
    mean = bn_vector_from_double(bn_param_typenum(typenum), mean_d, channels);
    invstd = bn_vector_from_double(bn_param_typenum(typenum), invstd_d, channels);
    if (mean != NULL && invstd != NULL) {
        result = PyTuple_Pack(3, (PyObject *)y, (PyObject *)mean, (PyObject *)invstd);
    }

done:
    PyMem_Free(stats);
    PyMem_Free(work);
    Py_XDECREF(x);
    Py_XDECREF(gamma);
    Py_XDECREF(beta);
    Py_XDECREF(y);
    Py_XDECREF(moments);
    Py_XDECREF(mean);
    Py_XDECREF(invstd);
    return result;
}

static PyObject *batch_norm_inference(PyObject *Py_UNUSED(module), PyObject *args,
                                      PyObject *kwargs)
{
    static char *kwlist[] = {"x", "gamma", "beta", "mean", "var", "eps", "axis", "out", NULL};
    PyObject *x_obj, *gamma_obj, *beta_obj, *mean_obj, *var_obj;
    PyObject *eps_obj = NULL, *axis_obj = NULL, *out_obj = NULL;
    double eps = 1e-5;
    int axis = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$OOO:batch_norm_inference", kwlist,
                                     &x_obj, &gamma_obj, &beta_obj, &mean_obj, &var_obj,
                                     &eps_obj, &axis_obj, &out_obj)
        || (eps_obj && bn_parse_eps(eps_obj, &eps) < 0)
        || (axis_obj && bn_parse_axis(axis_obj, &axis) < 0)) {
        return NULL;
    }
    PyArrayObject *x = NULL, *gamma = NULL, *beta = NULL, *y = NULL, *moments = NULL;
    PyArrayObject *mean = NULL, *var = NULL;
    double *work = NULL;
    PyObject *result = NULL;
    bn_layout layout;
    x = bn_as_compute_data(x_obj, "x");
    int typenum = x == NULL ? -1 : PyArray_TYPE(x);
    if (x == NULL || bn_relayout_to_out(&x, out_obj) < 0
        || bn_get_layout(x, axis, 0, &layout) < 0) {
        goto done;
    }
    npy_intp channels = (npy_intp)layout.shape.channels;
    if (optional_vector(gamma_obj, bn_param_typenum(typenum), channels, "gamma", &gamma) < 0
        || optional_vector(beta_obj, bn_param_typenum(typenum), channels, "beta", &beta) < 0
        || read_moments(mean_obj, var_obj, channels, "mean", "var", &mean, &var) < 0) {
        goto done;
    }
    y = bn_output_like(out_obj, x, typenum);
    if (y == NULL || bn_check_separate(y, gamma, "gamma") < 0
        || bn_check_separate(y, beta, "beta") < 0 || bn_check_separate(y, mean, "mean") < 0
        || bn_check_separate(y, var, "var") < 0) {
        goto done;
    }
    moments = bn_new_matrix(NPY_DOUBLE, 2, channels);
    work = moments ? bn_new_workspace(layout.shape) : NULL;
    if (work == NULL) {
        goto done;
    }
    double *mean_d = PyArray_DATA(moments), *invstd_d = mean_d + channels;
    bn_run_running_moments(mean_d, invstd_d, mean, var, eps);
    bn_run_forward(y, work, x, mean_d, invstd_d, gamma, beta, layout.shape);
    result = Py_NewRef(y);

done:
    PyMem_Free(work);
    Py_XDECREF(x);
    Py_XDECREF(gamma);
    Py_XDECREF(beta);
    Py_XDECREF(y);
    Py_XDECREF(moments);
    Py_XDECREF(mean);
    Py_XDECREF(var);
    return result;
}

static PyObject *batch_norm_backward(PyObject *Py_UNUSED(module), PyObject *args,
                                     PyObject *kwargs)
{
    static char *kwlist[] = {"dy", "x", "gamma", "mean", "invstd", "axis", "training",
                             "out", NULL};
    PyObject *dy_obj, *x_obj, *gamma_obj, *mean_obj, *invstd_obj;
    PyObject *axis_obj = NULL, *training_obj = Py_True, *out_obj = NULL;
    int axis = 1, training;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$OOO:batch_norm_backward", kwlist,
                                     &dy_obj, &x_obj, &gamma_obj, &mean_obj, &invstd_obj,
                                     &axis_obj, &training_obj, &out_obj)
        || (axis_obj && bn_parse_axis(axis_obj, &axis) < 0)
        || bn_parse_bool(training_obj, "training", &training) < 0) {
        return NULL;
    }
    PyArrayObject *dy = NULL, *x = NULL, *gamma = NULL, *mean = NULL, *invstd = NULL;
    PyArrayObject *dx = NULL, *dgamma = NULL, *dbeta = NULL, *sums = NULL;
    double *work = NULL;
    PyObject *result = NULL;
    bn_layout layout;
    x = bn_as_compute_data(x_obj, "x");
    int typenum = x == NULL ? -1 : PyArray_TYPE(x);
    dy = x ? bn_as_data(dy_obj, typenum, "dy", NULL) : NULL;
    if (dy == NULL || bn_relayout_to_out(&x, out_obj) < 0
        || bn_get_layout(x, axis, 0, &layout) < 0) {
        goto done;
    }
    if (!bn_same_shape(dy, x)) {
        PyObject *want = PyObject_GetAttrString((PyObject *)x, "shape");
        PyObject *got = PyObject_GetAttrString((PyObject *)dy, "shape");
        if (want != NULL && got != NULL) {
            PyErr_Format(PyExc_ValueError, "dy must have the shape of x %R, got shape %R",
                         want, got);
        }
        Py_XDECREF(want);
        Py_XDECREF(got);
        goto done;
    }
    if (bn_relayout(&dy, x) < 0) {
        goto done;
    }
    npy_intp channels = (npy_intp)layout.shape.channels;
    if (optional_vector(gamma_obj, bn_param_typenum(typenum), channels, "gamma", &gamma) < 0
        || read_moments(mean_obj, invstd_obj, channels, "mean", "invstd", &mean, &invstd) < 0) {
        goto done;
    }
    dx = bn_output_like(out_obj, dy, typenum);
    if (dx == NULL) {
        goto done;
    }
    /* dx may be x itself (each value is read before it is overwritten), not a part of it */
    if (bn_arrays_overlap(dx, x) && PyArray_BYTES(dx) != PyArray_BYTES(x)) {
        PyErr_SetString(PyExc_ValueError, "out partly overlaps x; it may be x itself or "
                                          "separate memory");
        goto done;
    }
    if (bn_check_separate(dx, gamma, "gamma") < 0 || bn_check_separate(dx, mean, "mean") < 0
        || bn_check_separate(dx, invstd, "invstd") < 0) {
        goto done;
    }
    sums = bn_new_matrix(NPY_DOUBLE, 2, channels);
    work = sums ? bn_new_workspace(layout.shape) : NULL;
    if (work == NULL) {
        goto done;
    }
    double *dgamma_d = PyArray_DATA(sums), *dbeta_d = dgamma_d + channels;
    bn_run_backward(dx, dgamma_d, dbeta_d, work, dy, x, PyArray_DATA(mean),
                    PyArray_DATA(invstd), gamma, layout.shape, training);
    if (gamma == NULL) {
        result = PyTuple_Pack(3, (PyObject *)dx, Py_None, Py_None);
        goto done;
    }
    dgamma = bn_vector_from_double(bn_param_typenum(typenum), dgamma_d, channels);
    dbeta = bn_vector_from_double(bn_param_typenum(typenum), dbeta_d, channels);
    if (dgamma != NULL && dbeta != NULL) {
        result = PyTuple_Pack(3, (PyObject *)dx, (PyObject *)dgamma, (PyObject *)dbeta);
    }

done:
    PyMem_Free(work);
    Py_XDECREF(dy);
    Py_XDECREF(x);
    Py_XDECREF(gamma);
    Py_XDECREF(mean);
    Py_XDECREF(invstd);
    Py_XDECREF(dx);
    Py_XDECREF(dgamma);
    Py_XDECREF(dbeta);
    Py_XDECREF(sums);
    return result;
}

PyMethodDef bn_functional_methods[] = {
    {"batch_norm_forward", (PyCFunction)(void (*)(void))batch_norm_forward,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("batch_norm_forward($module, x, gamma, beta, *, eps=1e-05, axis=1, "
               "out=None)\n--\n\n"
               "Returns (y, mean, invstd).\n\n"
               "Training-mode batch normalization with x's own statistics. gamma and beta\n"
               "may be None. mean and invstd = 1/sqrt(var + eps), shape (C,), are what\n"
               "batch_norm_backward needs.")},
    {"batch_norm_inference", (PyCFunction)(void (*)(void))batch_norm_inference,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("batch_norm_inference($module, x, gamma, beta, mean, var, *, eps=1e-05, "
               "axis=1, out=None)\n--\n\n"
               "Returns y.\n\n"
               "Normalize x with given statistics (e.g. running mean and variance).")},
    {"batch_norm_backward", (PyCFunction)(void (*)(void))batch_norm_backward,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("batch_norm_backward($module, dy, x, gamma, mean, invstd, *, axis=1, "
               "training=True, out=None)\n--\n\n"
               "Returns (dx, dgamma, dbeta).\n\n"
               "Gradients for upstream gradient dy. training=True: mean and invstd are x's\n"
               "batch statistics (from batch_norm_forward) and depend on x; training=False:\n"
               "they are constants. dgamma and dbeta are None when gamma is None.")},
    {NULL, NULL, 0, NULL},
};
