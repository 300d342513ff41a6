/* bn_layer_groups.c -- virtual ("ghost") batches of BatchNorm: axis 0 split
 * into consecutive groups of virtual_batch_size samples, each normalized with
 * its own statistics. No new kernel: the kernels run on each group's block.
 *
 * With the batch axis outermost in memory (C order, channels-last seen as
 * NCHW), group g is one contiguous block, x[g*k:(g+1)*k], of the same
 * [outer/G][C][inner] layout as the whole input; each block is passed to the
 * kernels as a 1-D view of the input's memory.
 */
#include "bn_layer.h"

/* 1 when axis 0 has the largest step of every axis longer than 1 */
static int batch_axis_outermost(PyArrayObject *x)
{
    for (int d = 1; d < PyArray_NDIM(x); d++) {
        if (PyArray_DIM(x, d) > 1 && PyArray_STRIDE(x, d) > PyArray_STRIDE(x, 0)) {
            return 0;
        }
    }
    return 1;
}

/* ValueError: message followed by x's shape */
static void raise_for(PyArrayObject *x, const char *message)
{
    PyObject *shape = PyObject_GetAttrString((PyObject *)x, "shape");
    if (shape != NULL) {
        PyErr_Format(PyExc_ValueError, "%s, got input of shape %R", message, shape);
        Py_DECREF(shape);
    }
}

npy_intp bn_groups_of(BatchNormObject *self, PyArrayObject *x, const bn_layout *layout)
{
    npy_intp size = self->virtual_batch_size;
    char message[200];
    if (size == 0 || bn_count(layout->shape) == 0) {
        return 1;
    }
    if (layout->axis == 0) {
        raise_for(x, "virtual batches split axis 0, the batch axis, but the features lie "
                     "on axis 0 of this input");
        return -1;
    }
    npy_intp samples = PyArray_DIM(x, 0), groups = samples / size;
    if (samples % size != 0) {
        PyOS_snprintf(message, sizeof message,
                      "virtual_batch_size=%zd: a batch of %zd samples on axis 0 does not "
                      "split into virtual batches of %zd",
                      (Py_ssize_t)size, (Py_ssize_t)samples, (Py_ssize_t)size);
        raise_for(x, message);
        return -1;
    }
    if (bn_count(layout->shape) / (size_t)groups == 1) {
        PyOS_snprintf(message, sizeof message,
                      "Expected more than 1 value per channel in each virtual batch when "
                      "using batch statistics (virtual_batch_size=%zd)", (Py_ssize_t)size);
        raise_for(x, message);
        return -1;
    }
    if (groups > 1 && !batch_axis_outermost(x)) {
        raise_for(x, "virtual batches need the batch axis (axis 0) outermost in memory, as "
                     "in C order or channels-last: pass np.ascontiguousarray(x) (and an out "
                     "in C order)");
        return -1;
    }
    return groups;
}

/* A new 1-D view of `size` elements of arr's memory from element `offset` on. */
static PyArrayObject *block_view(PyArrayObject *arr, npy_intp offset, npy_intp size)
{
    PyArray_Descr *descr = PyArray_DESCR(arr);
    Py_INCREF(descr); /* PyArray_NewFromDescr steals it */
    PyArrayObject *view = (PyArrayObject *)PyArray_NewFromDescr(
        &PyArray_Type, descr, 1, &size, NULL, PyArray_BYTES(arr) + offset * PyArray_ITEMSIZE(arr),
        PyArray_FLAGS(arr) & NPY_ARRAY_WRITEABLE, NULL);
    if (view != NULL && PyArray_SetBaseObject(view, Py_NewRef(arr)) < 0) {
        Py_CLEAR(view);
    }
    return view;
}

void bn_groups_clear(bn_groups *groups)
{
    for (int a = 0; a < 3; a++) {
        for (npy_intp g = 0; groups->views[a] != NULL && g < groups->count; g++) {
            Py_XDECREF(groups->views[a][g]);
        }
        PyMem_Free(groups->views[a]);
        groups->views[a] = NULL;
    }
    PyMem_Free(groups->work);
    PyMem_Free(groups->sums);
    groups->work = groups->sums = NULL;
}

int bn_groups_prepare(bn_groups *groups, npy_intp count, bn_shape whole, PyArrayObject **arrays,
                      int narrays)
{
    *groups = (bn_groups){0};
    groups->count = count;
    groups->shape = (bn_shape){whole.outer / (size_t)count, whole.channels, whole.inner};
    npy_intp size = (npy_intp)bn_count(groups->shape) * (npy_intp)whole.channels;
    for (int a = 0; a < narrays; a++) {
        groups->views[a] = bn_new_scratch((size_t)count, sizeof(PyArrayObject *),
                                          "the virtual batches' views");
        if (groups->views[a] == NULL) {
            goto fail;
        }
        memset(groups->views[a], 0, (size_t)count * sizeof(PyArrayObject *));
        for (npy_intp g = 0; g < count; g++) {
            groups->views[a][g] = block_view(arrays[a], g * size, size);
            if (groups->views[a][g] == NULL) {
                goto fail;
            }
        }
    }
    /* a group's statistics (3 doubles) or gradient sums (2) per feature */
    groups->sums = bn_new_scratch(3 * whole.channels, sizeof(double), "a virtual batch's sums");
    groups->work = groups->sums ? bn_new_workspace(groups->shape) : NULL;
    if (groups->work == NULL) {
        goto fail;
    }
    return 0;

fail:
    bn_groups_clear(groups);
    return -1;
}

void bn_groups_forward(bn_groups *groups, bn_partial *stats, double *moments,
                       PyArrayObject *gamma, PyArrayObject *beta, double eps)
{
    /* views: [0] y, [1] x; moments (2G, C): each group's mean, then its invstd */
    size_t channels = groups->shape.channels;
    bn_partial *part = (bn_partial *)groups->sums;
    for (size_t c = 0; c < channels; c++) {
        stats[c] = (bn_partial){(double)bn_count(groups->shape), 0.0, 0.0};
    }
    for (npy_intp g = 0; g < groups->count; g++) {
        double *mean = moments + 2 * (size_t)g * channels;
        bn_run_forward_train(groups->views[0][g], part, mean, mean + channels, groups->work,
                             groups->views[1][g], gamma, beta, eps, groups->shape);
        for (size_t c = 0; c < channels; c++) {
            stats[c].mean += part[c].mean;
            stats[c].m2 += part[c].m2;
        }
    }
    /* the mean over groups of their means, and of their m2: with every group's
       count the same, m2 / (count - 1) is the mean of their unbiased variances */
    for (size_t c = 0; c < channels; c++) {
        stats[c].mean /= (double)groups->count;
        stats[c].m2 /= (double)groups->count;
    }
}

void bn_groups_backward(bn_groups *groups, double *dgamma, double *dbeta, const double *moments,
                        PyArrayObject *gamma)
{
    /* views: [0] dx, [1] dy, [2] x */
    size_t channels = groups->shape.channels;
    double *group_dgamma = groups->sums, *group_dbeta = group_dgamma + channels;
    for (size_t c = 0; c < channels; c++) {
        dgamma[c] = dbeta[c] = 0.0;
    }
    for (npy_intp g = 0; g < groups->count; g++) {
        const double *mean = moments + 2 * (size_t)g * channels;
        bn_run_backward(groups->views[0][g], group_dgamma, group_dbeta, groups->work,
                        groups->views[1][g], groups->views[2][g], mean, mean + channels, gamma,
                        groups->shape, 1);
        for (size_t c = 0; c < channels; c++) {
            dgamma[c] += group_dgamma[c];
            dbeta[c] += group_dbeta[c];
        }
    }
}
