/* bn_family.c -- the kernels of layer, group, instance and RMS normalization
 * (bn_rows_* in bn.h) for bnpy.family, which checks the user's arguments and
 * lays the data out as rows: these private functions take C-contiguous
 * float32 or float64 arrays only, and check just enough that no call can
 * write out of bounds.
 */
#include "bn_module.h"

/* obj as a C-contiguous, aligned array of typenum with `size` values, or NULL
 * with TypeError or ValueError naming it; None gives NULL without an error
 * when none_ok. A new reference. */
static PyArrayObject *rows_array(PyObject *obj, int typenum, npy_intp size, int none_ok,
                                 int writable, const char *name)
{
    if (obj == Py_None && none_ok) {
        return NULL;
    }
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != typenum
        || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj)
        || !PyArray_ISALIGNED((PyArrayObject *)obj)
        || (writable && !PyArray_ISWRITEABLE((PyArrayObject *)obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous, aligned%s %s array", name,
                     writable ? ", writable" : "", typenum == NPY_FLOAT ? "float32" : "float64");
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

/* the rows of x: s <- {size / n, n, period, centered}; -1 with ValueError
 * unless n and period are positive and n divides x's size */
static int rows_of(PyArrayObject *x, Py_ssize_t n, Py_ssize_t period, int centered, bn_rows *s)
{
    npy_intp size = PyArray_SIZE(x);
    if (n <= 0 || period <= 0 || size % n != 0) {
        PyErr_Format(PyExc_ValueError, "rows of n=%zd values (period %zd) do not tile %zd values",
                     n, period, size);
        return -1;
    }
    *s = (bn_rows){(size_t)(size / n), (size_t)n, (size_t)period, centered};
    return 0;
}

static const void *data_or_null(PyArrayObject *a)
{
    return a ? PyArray_DATA(a) : NULL;
}

static PyObject *rows_forward(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *x_obj, *gamma_obj, *beta_obj, *out_obj;
    Py_ssize_t n, period;
    double eps;
    int centered;
    if (!PyArg_ParseTuple(args, "OOOnndpO:_rows_forward", &x_obj, &gamma_obj, &beta_obj, &n,
                          &period, &eps, &centered, &out_obj)) {
        return NULL;
    }
    int typenum = PyArray_Check(x_obj) ? PyArray_TYPE((PyArrayObject *)x_obj) : NPY_DOUBLE;
    typenum = typenum == NPY_FLOAT ? NPY_FLOAT : NPY_DOUBLE;
    PyArrayObject *x = rows_array(x_obj, typenum, -1, 0, 0, "x"), *gamma = NULL, *beta = NULL;
    PyArrayObject *y = NULL, *moments = NULL;
    PyObject *result = NULL;
    bn_rows s;
    if (x == NULL || rows_of(x, n, period, centered, &s) < 0) {
        goto done;
    }
    gamma = rows_array(gamma_obj, typenum, n * period, 1, 0, "gamma");
    beta = PyErr_Occurred() ? NULL : rows_array(beta_obj, typenum, n * period, 1, 0, "beta");
    if (PyErr_Occurred()) {
        goto done;
    }
    y = out_obj == Py_None ? (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0)
                           : rows_array(out_obj, typenum, PyArray_SIZE(x), 0, 1, "out");
    moments = y ? bn_new_matrix(NPY_DOUBLE, 2, (npy_intp)s.rows) : NULL;
    if (moments == NULL) {
        goto done;
    }
    double *mean = PyArray_DATA(moments), *invstd = mean + s.rows;
    const void *x_data = PyArray_DATA(x), *g = data_or_null(gamma), *b = data_or_null(beta);
    void *y_data = PyArray_DATA(y);
    Py_BEGIN_ALLOW_THREADS
    if (s.rows > 0 && typenum == NPY_FLOAT) {
        bn_rows_forward_f32(y_data, mean, invstd, x_data, g, b, eps, s);
    }
    else if (s.rows > 0) {
        bn_rows_forward_f64(y_data, mean, invstd, x_data, g, b, eps, s);
    }
    Py_END_ALLOW_THREADS
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
    Py_ssize_t n, period;
    int centered, param_grads;
    if (!PyArg_ParseTuple(args, "OOOOnnppO:_rows_backward", &dy_obj, &x_obj, &gamma_obj,
                          &moments_obj, &n, &period, &centered, &param_grads, &out_obj)) {
        return NULL;
    }
    int typenum = PyArray_Check(x_obj) ? PyArray_TYPE((PyArrayObject *)x_obj) : NPY_DOUBLE;
    typenum = typenum == NPY_FLOAT ? NPY_FLOAT : NPY_DOUBLE;
    PyArrayObject *x = rows_array(x_obj, typenum, -1, 0, 0, "x"), *dy = NULL, *gamma = NULL;
    PyArrayObject *moments = NULL, *dx = NULL, *grads = NULL;
    PyObject *result = NULL;
    double *work = NULL;
    bn_rows s;
    if (x == NULL || rows_of(x, n, period, centered, &s) < 0
        || (dy = rows_array(dy_obj, typenum, PyArray_SIZE(x), 0, 0, "dy")) == NULL
        || (moments = rows_array(moments_obj, NPY_DOUBLE, 2 * (npy_intp)s.rows, 0, 0,
                                 "moments")) == NULL) {
        goto done;
    }
    gamma = rows_array(gamma_obj, typenum, n * period, 1, 0, "gamma");
    if (PyErr_Occurred()) {
        goto done;
    }
    dx = out_obj == Py_None ? (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0)
                            : rows_array(out_obj, typenum, PyArray_SIZE(x), 0, 1, "out");
    grads = dx && param_grads ? bn_new_matrix(NPY_DOUBLE, 2, n * period) : NULL;
    work = grads ? bn_new_scratch(bn_rows_workspace_size(s), sizeof(double),
                                  "the parameter gradients' blocks")
                 : NULL;
    if (dx == NULL || (param_grads && work == NULL && s.rows > 0)) {
        goto done;
    }
    double *dgamma = grads ? PyArray_DATA(grads) : NULL, *dbeta = dgamma ? dgamma + n * period
                                                                        : NULL;
    const double *mean = PyArray_DATA(moments), *invstd = mean + s.rows;
    const void *dy_data = PyArray_DATA(dy), *x_data = PyArray_DATA(x), *g = data_or_null(gamma);
    void *dx_data = PyArray_DATA(dx);
    Py_BEGIN_ALLOW_THREADS
    if (dgamma != NULL && s.rows == 0) {
        memset(dgamma, 0, 2 * (size_t)(n * period) * sizeof(double));
    }
    else if (typenum == NPY_FLOAT) {
        bn_rows_backward_f32(dx_data, dgamma, dbeta, work, dy_data, x_data, mean, invstd, g, s);
    }
    else {
        bn_rows_backward_f64(dx_data, dgamma, dbeta, work, dy_data, x_data, mean, invstd, g, s);
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("OO", dx, grads ? (PyObject *)grads : Py_None);

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

/* sums[2][rows] <- sum dy * xhat and sum dy over each row (bn_grad_sums) */
static PyObject *row_grad_sums(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *dy_obj, *x_obj, *moments_obj;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOOn:_row_grad_sums", &dy_obj, &x_obj, &moments_obj, &n)) {
        return NULL;
    }
    int typenum = PyArray_Check(x_obj) ? PyArray_TYPE((PyArrayObject *)x_obj) : NPY_DOUBLE;
    typenum = typenum == NPY_FLOAT ? NPY_FLOAT : NPY_DOUBLE;
    PyArrayObject *x = rows_array(x_obj, typenum, -1, 0, 0, "x"), *dy = NULL, *moments = NULL;
    PyArrayObject *sums = NULL;
    double *work = NULL;
    bn_rows r;
    if (x == NULL || rows_of(x, n, 1, 1, &r) < 0
        || (dy = rows_array(dy_obj, typenum, PyArray_SIZE(x), 0, 0, "dy")) == NULL
        || (moments = rows_array(moments_obj, NPY_DOUBLE, 2 * (npy_intp)r.rows, 0, 0,
                                 "moments")) == NULL
        || (sums = bn_new_matrix(NPY_DOUBLE, 2, (npy_intp)r.rows)) == NULL) {
        goto done;
    }
    bn_shape s = {1, r.rows, r.n};
    work = r.rows > 0 ? bn_new_workspace(s) : NULL;
    if (r.rows > 0 && work == NULL) {
        Py_CLEAR(sums);
        goto done;
    }
    double *mean = PyArray_DATA(moments), *dgamma = PyArray_DATA(sums);
    bn_run_grad_sums(dgamma, dgamma + r.rows, work, dy, x, mean, mean + r.rows, s);

done:
    PyMem_Free(work);
    Py_XDECREF(x);
    Py_XDECREF(dy);
    Py_XDECREF(moments);
    return (PyObject *)sums;
}

PyMethodDef bn_family_methods[] = {
    {"_rows_forward", rows_forward, METH_VARARGS,
     PyDoc_STR("_rows_forward(x, gamma, beta, n, period, eps, centered, out) -> (y, moments)\n\n"
               "x seen as rows of n values, each normalized (bn_rows_forward in bn.h);\n"
               "moments[0] and [1] are the rows' means and invstds. For bnpy.family.")},
    {"_rows_backward", rows_backward, METH_VARARGS,
     PyDoc_STR("_rows_backward(dy, x, gamma, moments, n, period, centered, param_grads, out)"
               " -> (dx, grads)\n\ngrads[0] and [1]: dgamma and dbeta of (period * n) values,"
               " or None\nwithout param_grads. For bnpy.family.")},
    {"_row_grad_sums", row_grad_sums, METH_VARARGS,
     PyDoc_STR("_row_grad_sums(dy, x, moments, n) -> sums\n\nsums[0] and [1]: each row's sum "
               "of dy * xhat and of dy. For bnpy.family.")},
    {NULL, NULL, 0, NULL},
};
