/* bn_family.c -- the kernels of layer, group, instance and RMS normalization
 * (bn_rows_* in bn.h) for bnpy.family, which checks the user's arguments and
 * lays the data out as rows: these private functions take C-contiguous
 * arrays of float32, float64 or a half (float16, bfloat16; its gamma and
 * beta float32) only, and check just enough that no call can write out of
 * bounds.
 */
#include "bn_module.h"

/* obj as a C-contiguous, aligned array of typenum with `size` values (any
 * when negative), or NULL with TypeError or ValueError naming it. A new
 * reference. */
static PyArrayObject *rows_array(PyObject *obj, int typenum, npy_intp size, int writable,
                                 const char *name)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != typenum
        || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj)
        || !PyArray_ISALIGNED((PyArrayObject *)obj)
        || (writable && !PyArray_ISWRITEABLE((PyArrayObject *)obj))) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous, aligned%s array of %R", name,
                     writable ? ", writable" : "", (PyObject *)want);
        Py_XDECREF(want);
        return NULL;
    }
    if (size >= 0 && PyArray_SIZE((PyArrayObject *)obj) != size) {
        PyErr_Format(PyExc_ValueError, "%s must have %zd values, got %zd", name, size,
                     PyArray_SIZE((PyArrayObject *)obj));
        return NULL;
    }
    Py_INCREF(obj);
    return (PyArrayObject *)obj;
}

/* the rows of x: s <- {size / n, n, spread, period, centered}; -1 with
 * ValueError unless n, spread and period are positive, n divides x's size
 * and spread divides n */
static int rows_of(PyArrayObject *x, Py_ssize_t n, Py_ssize_t spread, Py_ssize_t period,
                   int centered, bn_rows *s)
{
    npy_intp size = PyArray_SIZE(x);
    if (n <= 0 || spread <= 0 || period <= 0 || size % n != 0 || n % spread != 0) {
        PyErr_Format(PyExc_ValueError,
                     "rows of n=%zd values in runs of %zd (period %zd) do not tile %zd values", n,
                     spread, period, size);
        return -1;
    }
    *s = (bn_rows){(size_t)(size / n), (size_t)n, (size_t)spread, (size_t)period, centered};
    return 0;
}

static PyObject *rows_forward(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *x_obj, *gamma_obj, *beta_obj, *out_obj;
    Py_ssize_t n, spread, period;
    double eps;
    int centered;
    if (!PyArg_ParseTuple(args, "OOOnnndpO:_rows_forward", &x_obj, &gamma_obj, &beta_obj, &n,
                          &spread, &period, &eps, &centered, &out_obj)) {
        return NULL;
    }
    int typenum = bn_compute_typenum(x_obj, "x"), params = bn_param_typenum(typenum);
    if (typenum < 0) {
        return NULL;
    }
    PyArrayObject *x = rows_array(x_obj, typenum, -1, 0, "x"), *gamma = NULL, *beta = NULL;
    PyArrayObject *y = NULL, *moments = NULL;
    PyObject *result = NULL;
    bn_rows s;
    if (x == NULL || rows_of(x, n, spread, period, centered, &s) < 0) {
        goto done;
    }
    npy_intp channels = (npy_intp)bn_rows_channels(s);
    gamma = rows_array(gamma_obj, params, channels, 0, "gamma");
    beta = gamma ? rows_array(beta_obj, params, channels, 0, "beta") : NULL;
    if (beta == NULL) {
        goto done;
    }
    y = out_obj == Py_None ? (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0)
                           : rows_array(out_obj, typenum, PyArray_SIZE(x), 1, "out");
    moments = y ? bn_new_matrix(NPY_DOUBLE, 3, (npy_intp)s.rows) : NULL;
    if (moments == NULL) {
        goto done;
    }
    double *mean = PyArray_DATA(moments), *invstd = mean + s.rows, *var = invstd + s.rows;
    const void *x_data = PyArray_DATA(x), *g = PyArray_DATA(gamma), *b = PyArray_DATA(beta);
    void *y_data = PyArray_DATA(y);
    if (s.rows > 0) {
        BN_CALL_TYPED(x, bn_rows_forward, y_data, mean, invstd, var, x_data, g, b, eps,
                      s);
    }
    result = Py_BuildValue("OO", y, moments);

done:
    Py_XDECREF(x);
    Py_XDECREF(gamma);
    Py_XDECREF(beta);
    Py_XDECREF(y);
    Py_XDECREF(moments);
    return result;
}

static PyObject *rows_backward(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *dy_obj, *x_obj, *gamma_obj, *moments_obj, *out_obj;
    Py_ssize_t n, spread, period;
    int centered;
    if (!PyArg_ParseTuple(args, "OOOOnnnpO:_rows_backward", &dy_obj, &x_obj, &gamma_obj,
                          &moments_obj, &n, &spread, &period, &centered, &out_obj)) {
        return NULL;
    }
    int typenum = bn_compute_typenum(x_obj, "x"), params = bn_param_typenum(typenum);
    if (typenum < 0) {
        return NULL;
    }
    PyArrayObject *x = rows_array(x_obj, typenum, -1, 0, "x"), *dy = NULL, *gamma = NULL;
    PyArrayObject *moments = NULL, *dx = NULL, *grads = NULL;
    PyObject *result = NULL;
    double *work = NULL;
    bn_rows s;
    if (x == NULL || rows_of(x, n, spread, period, centered, &s) < 0
        || (dy = rows_array(dy_obj, typenum, PyArray_SIZE(x), 0, "dy")) == NULL
        || (moments = rows_array(moments_obj, NPY_DOUBLE, 2 * (npy_intp)s.rows, 0,
                                 "moments")) == NULL) {
        goto done;
    }
    npy_intp channels = (npy_intp)bn_rows_channels(s);
    gamma = rows_array(gamma_obj, params, channels, 0, "gamma");
    if (gamma == NULL) {
        goto done;
    }
    dx = out_obj == Py_None ? (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0)
                            : rows_array(out_obj, typenum, PyArray_SIZE(x), 1, "out");
    grads = dx ? bn_new_matrix(NPY_DOUBLE, 2, channels) : NULL;
    work = grads ? bn_new_scratch(bn_rows_workspace_size(s) + 1, sizeof(double),
                                  "the parameter gradients' blocks")
                 : NULL;
    if (work == NULL) {
        goto done;
    }
    double *dgamma = PyArray_DATA(grads), *dbeta = dgamma + channels;
    const double *mean = PyArray_DATA(moments), *invstd = mean + s.rows;
    const void *dy_data = PyArray_DATA(dy), *x_data = PyArray_DATA(x), *g = PyArray_DATA(gamma);
    void *dx_data = PyArray_DATA(dx);
    if (s.rows == 0) {
        memset(dgamma, 0, 2 * (size_t)channels * sizeof(double));
    }
    else {
        BN_CALL_TYPED(x, bn_rows_backward, dx_data, dgamma, dbeta, work, dy_data, x_data, mean,
                      invstd, g, s);
    }
    result = Py_BuildValue("OO", dx, grads);

done:
    PyMem_Free(work);
    Py_XDECREF(x);
    Py_XDECREF(dy);
    Py_XDECREF(gamma);
    Py_XDECREF(moments);
    Py_XDECREF(dx);
    Py_XDECREF(grads);
    return result;
}

PyMethodDef bn_family_methods[] = {
    {"_rows_forward", rows_forward, METH_VARARGS,
     PyDoc_STR("_rows_forward(x, gamma, beta, n, spread, period, eps, centered, out)"
               " -> (y, moments)\n\n"
               "x seen as rows of n values, each normalized (bn_rows_forward in bn.h);\n"
               "moments[0], [1] and [2] are the rows' means, invstds and biased\n"
               "variances. For bnpy.family.")},
    {"_rows_backward", rows_backward, METH_VARARGS,
     PyDoc_STR("_rows_backward(dy, x, gamma, moments, n, spread, period, centered, out)"
               " -> (dx, grads)\n\ngrads[0] and [1]: the channels' dgamma and dbeta"
               " (bn_rows_backward). For bnpy.family.")},
    {NULL, NULL, 0, NULL},
};
