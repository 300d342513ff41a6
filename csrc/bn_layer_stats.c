/* bn_layer_stats.c -- BatchNorm with statistics gathered beyond one input:
 * calibrate (exact population statistics over many batches), and the hooks
 * that bnpy.distributed.SyncBatchNorm combines with MPI collectives.
 *
 * Statistics travel as (C, 3) float64 arrays of partials (count, mean, m2),
 * the bn_partial of the C core, and are combined by bn_partial_merge only:
 * one way statistics are merged, whether over tiles, batches or processes.
 */
#include "bn_layer.h"

#include <math.h>

_Static_assert(sizeof(bn_partial) == 3 * sizeof(double), "bn_partial is (count, mean, m2)");

/* A new (C, 3) float64 array of zero partials. */
static PyArrayObject *new_stats(npy_intp channels)
{
    npy_intp dims[2] = {channels, 3};
    return (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_DOUBLE, 0);
}

/* obj as a checked (C, 3) float64 array of partials: counts >= 0, m2 >= 0. */
static PyArrayObject *read_stats(PyObject *obj, npy_intp channels, const char *name)
{
    PyArrayObject *arr = bn_as_array(obj, NPY_DOUBLE, name);
    if (arr == NULL) {
        return NULL;
    }
    if (PyArray_NDIM(arr) != 2 || PyArray_DIM(arr, 0) != channels || PyArray_DIM(arr, 1) != 3) {
        PyErr_Format(PyExc_ValueError,
                     "%s must have shape (%zd, 3): count, mean and m2 per feature",
                     name, (Py_ssize_t)channels);
        Py_DECREF(arr);
        return NULL;
    }
    const bn_partial *p = PyArray_DATA(arr);
    for (npy_intp c = 0; c < channels; c++) {
        if (!(p[c].count >= 0.0) || !(p[c].m2 >= 0.0 || isnan(p[c].m2))) {
            PyErr_Format(PyExc_ValueError,
                         "%s: feature %zd has a negative count or sum of squares", name,
                         (Py_ssize_t)c);
            Py_DECREF(arr);
            return NULL;
        }
    }
    return arr;
}

/* ValueError unless every feature has the same count (all see the same
 * batch), more than one value when `training`. */
static int check_counts(const bn_partial *stats, size_t channels, int training)
{
    for (size_t c = 1; c < channels; c++) {
        if (stats[c].count != stats[0].count) {
            PyErr_Format(PyExc_ValueError,
                         "the statistics count %lld values for feature 0 but %lld for "
                         "feature %zu: every feature sees the same batch",
                         (long long)stats[0].count, (long long)stats[c].count, c);
            return -1;
        }
    }
    if (training && stats[0].count <= 1.0) {
        PyObject *count = PyFloat_FromDouble(stats[0].count);
        if (count != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "Expected more than 1 value per channel when training, got %R in all",
                         count);
            Py_DECREF(count);
        }
        return -1;
    }
    return 0;
}

/* stats[c].mean += shift[c]: partials relative to a shift made absolute */
static void partials_unshift(bn_partial *stats, const double *shift, size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        stats[c].mean += shift[c];
    }
}

/* A new (C, 3) copy of checked partials made absolute: means + shift[C],
 * shift_obj None for none. */
static PyArrayObject *absolute_stats(PyObject *stats_obj, PyObject *shift_obj, npy_intp channels)
{
    PyArrayObject *given = read_stats(stats_obj, channels, "stats");
    if (given == NULL) {
        return NULL;
    }
    PyArrayObject *stats = (PyArrayObject *)PyArray_NewCopy(given, NPY_CORDER);
    Py_DECREF(given);
    if (stats == NULL || shift_obj == NULL || shift_obj == Py_None) {
        return stats;
    }
    PyArrayObject *shift = bn_as_vector(shift_obj, NPY_DOUBLE, channels, "shift");
    if (shift == NULL) {
        Py_DECREF(stats);
        return NULL;
    }
    partials_unshift(PyArray_DATA(stats), PyArray_DATA(shift), (size_t)channels);
    Py_DECREF(shift);
    return stats;
}

/* ---- calibrate ----------------------------------------------------------- */

/* The statistics of every batch, less shift[C], merged in order. With
 * auto_shift, shift[] is set from the first value of each feature in the first
 * non-empty batch: a value of the data, so the means merged stay small and
 * keep their last bits. Errors name a batch `name`. */
static PyArrayObject *stats_of(BatchNormObject *self, PyObject *batches, double *shift,
                               int auto_shift, const char *name)
{
    PyObject *iterator = PyObject_GetIter(batches);
    if (iterator == NULL) {
        PyErr_Format(PyExc_TypeError, "batches must be an iterable of arrays, got %.100s",
                     Py_TYPE(batches)->tp_name);
        return NULL;
    }
    size_t channels = (size_t)self->num_features;
    PyArrayObject *total = new_stats(self->num_features);
    bn_partial *batch = total ? bn_new_scratch(channels, sizeof(bn_partial),
                                               "a batch's statistics") : NULL;
    PyObject *item = NULL;
    if (batch == NULL) {
        goto fail;
    }
    bn_partial *merged = PyArray_DATA(total);
    while ((item = PyIter_Next(iterator)) != NULL) {
        bn_layout layout;
        PyArrayObject *x = bn_as_data(item, self->typenum, name, NULL);
        Py_CLEAR(item);
        if (x == NULL || bn_get_layout(x, self->axis, self->num_features, &layout) < 0) {
            Py_XDECREF(x);
            goto fail;
        }
        double *work = bn_new_workspace(layout.shape);
        if (work == NULL) {
            Py_DECREF(x);
            goto fail;
        }
        if (auto_shift && bn_count(layout.shape) > 0) {
            for (size_t c = 0; c < channels; c++) { /* x[0][c][0] */
                shift[c] = PyArray_TYPE(x) == NPY_FLOAT
                               ? ((float *)PyArray_DATA(x))[c * layout.shape.inner]
                               : ((double *)PyArray_DATA(x))[c * layout.shape.inner];
            }
            auto_shift = 0;
        }
        bn_run_stats(batch, work, x, shift, layout.shape);
        for (size_t c = 0; c < channels; c++) {
            bn_partial_merge(&merged[c], &batch[c]);
        }
        PyMem_Free(work);
        Py_DECREF(x);
    }
    if (PyErr_Occurred()) {
        goto fail;
    }
    PyMem_Free(batch);
    Py_DECREF(iterator);
    return total;

fail:
    PyMem_Free(batch);
    Py_XDECREF(total);
    Py_DECREF(iterator);
    return NULL;
}

PyObject *BatchNorm_stats_of(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"batches", "shift", "name", NULL};
    PyObject *batches, *shift_obj = Py_None;
    const char *name = "batch";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$Os:_stats_of", kwlist, &batches,
                                     &shift_obj, &name)
        || check_initialized(self) < 0) {
        return NULL;
    }
    PyArrayObject *shift = shift_obj == Py_None
        ? bn_new_vector(NPY_DOUBLE, self->num_features)
        : bn_as_vector(shift_obj, NPY_DOUBLE, self->num_features, "shift");
    if (shift == NULL) {
        return NULL;
    }
    if (shift_obj == Py_None) {
        memset(PyArray_DATA(shift), 0, (size_t)PyArray_NBYTES(shift));
    }
    PyArrayObject *stats = stats_of(self, batches, PyArray_DATA(shift), 0, name);
    Py_DECREF(shift);
    return (PyObject *)stats;
}

/* running statistics <- stats (checked, absolute) */
static PyObject *set_running(BatchNormObject *self, PyArrayObject *stats)
{
    if (!self->track_running_stats) {
        PyErr_SetString(PyExc_ValueError,
                        "calibrate sets the running statistics, and this layer has none "
                        "(track_running_stats=False)");
        return NULL;
    }
    const bn_partial *p = PyArray_DATA(stats);
    size_t channels = (size_t)self->num_features;
    if (check_counts(p, channels, 0) < 0 || bn_layer_check_finite_stats(p, channels) < 0) {
        return NULL;
    }
    if (p[0].count <= 1.0) {
        PyObject *count = PyFloat_FromDouble(p[0].count);
        if (count != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "an unbiased variance needs more than 1 value per feature, got %R",
                         count);
            Py_DECREF(count);
        }
        return NULL;
    }
    PyArrayObject *next[2];
    if (bn_layer_new_running(self, next) < 0) {
        return NULL;
    }
    lock_layer(self);
    bn_run_set_running(next[0], next[1], p);
    int status = bn_layer_commit_running(self, next);
    unlock_layer(self);
    Py_DECREF(next[0]);
    Py_DECREF(next[1]);
    if (status < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *BatchNorm_set_running_from_stats(BatchNormObject *self, PyObject *args,
                                           PyObject *kwargs)
{
    static char *kwlist[] = {"stats", "shift", NULL};
    PyObject *stats_obj, *shift_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$O:_set_running_from_stats", kwlist,
                                     &stats_obj, &shift_obj)
        || check_initialized(self) < 0) {
        return NULL;
    }
    PyArrayObject *stats = absolute_stats(stats_obj, shift_obj, self->num_features);
    if (stats == NULL) {
        return NULL;
    }
    PyObject *done = set_running(self, stats);
    Py_DECREF(stats);
    return done;
}

PyObject *BatchNorm_calibrate(BatchNormObject *self, PyObject *batches)
{
    if (check_initialized(self) < 0) {
        return NULL;
    }
    double *shift = bn_new_scratch(CHANNELS(self), sizeof(double), "the calibration's shift");
    if (shift == NULL) {
        return NULL;
    }
    memset(shift, 0, CHANNELS(self) * sizeof(double));
    PyArrayObject *stats = stats_of(self, batches, shift, 1, "batch");
    if (stats != NULL) {
        partials_unshift(PyArray_DATA(stats), shift, CHANNELS(self));
    }
    PyMem_Free(shift);
    if (stats == NULL) {
        return NULL;
    }
    PyObject *done = set_running(self, stats);
    Py_DECREF(stats);
    if (done == NULL) {
        return NULL;
    }
    Py_DECREF(done);
    return Py_NewRef(self);
}

/* ---- forward and backward with statistics gathered elsewhere ------------- */

/* obj as a new (2, C) float64 array: the mean and invstd to normalize with.
 * Their values are the caller's to keep finite (a private hook). */
static PyArrayObject *read_moments(PyObject *obj, npy_intp channels)
{
    PyArrayObject *arr = bn_as_array(obj, NPY_DOUBLE, "moments");
    if (arr != NULL
        && (PyArray_NDIM(arr) != 2 || PyArray_DIM(arr, 0) != 2
            || PyArray_DIM(arr, 1) != channels)) {
        PyErr_Format(PyExc_ValueError, "moments must have shape (2, %zd): mean and invstd",
                     (Py_ssize_t)channels);
        Py_CLEAR(arr);
    }
    return arr;
}

/* moments: the (2, C) mean and invstd of y = gamma * (x - mean) * invstd + beta,
 * from the statistics or, when given (not NULL), the caller's: BatchRenorm
 * normalizes with corrected moments while its running statistics follow the
 * batch's. */
static void forward_moments(double *moments, const bn_partial *stats, PyArrayObject *given,
                           size_t channels, double eps)
{
    if (given == NULL) {
        bn_batch_moments(moments, moments + channels, stats, channels, eps);
    }
    else {
        memcpy(moments, PyArray_DATA(given), 2 * channels * sizeof(double));
    }
}

PyObject *BatchNorm_forward_from_stats(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "stats", "shift", "moments", "out", NULL};
    PyObject *x_obj, *stats_obj, *shift_obj = Py_None, *moments_obj = Py_None, *out_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$OOO:_forward_from_stats", kwlist,
                                     &x_obj, &stats_obj, &shift_obj, &moments_obj, &out_obj)
        || check_initialized(self) < 0) {
        return NULL;
    }
    bn_forward_call call;
    bn_saved old = {0};
    size_t channels = CHANNELS(self);
    int training = self->training; /* this call's mode */
    PyArrayObject *given = NULL;
    if (bn_layer_prepare_forward(self, x_obj, out_obj, training, &call) < 0) {
        return NULL;
    }
    PyArrayObject *stats = absolute_stats(stats_obj, shift_obj, self->num_features);
    if (stats == NULL
        || (moments_obj != Py_None
            && (given = read_moments(moments_obj, self->num_features)) == NULL)) {
        goto fail;
    }
    const bn_partial *p = PyArray_DATA(stats);
    double *mean = PyArray_DATA(call.moments), *invstd = mean + channels;

    lock_layer(self);
    if (self->virtual_batch_size > 0) {
        PyErr_SetString(PyExc_ValueError,
                        "_forward_from_stats normalizes with statistics gathered elsewhere, "
                        "which have no virtual batches: use a layer without virtual_batch_size");
        goto fail_locked;
    }
    if (!training && self->track_running_stats) {
        PyErr_SetString(PyExc_ValueError,
                        "_forward_from_stats normalizes with batch statistics; in eval mode "
                        "this layer uses its running statistics");
        goto fail_locked;
    }
    int counts_batch = training && self->track_running_stats;
    if (check_counts(p, channels, training) < 0
        || (training && bn_layer_check_finite_stats(p, channels) < 0)
        || (counts_batch && bn_layer_check_count(self) < 0)) {
        goto fail_locked;
    }
    forward_moments(mean, p, given, channels, self->eps);
    bn_run_forward(call.y, call.work, call.x, mean, invstd, self->gamma, self->beta,
                   call.layout.shape);
    if (counts_batch && bn_layer_update_running(self, p, call.running) < 0) {
        bn_forward_call_restore(&call); /* a failed call changes nothing */
        goto fail_locked;
    }
    /* nothing fails from here on */
    PyArrayObject *y = bn_forward_call_result(&call);
    bn_layer_replace_saved(self, call.saved_x, call.moments, call.layout.shape, 1, p[0].count,
                           &old);
    call.saved_x = call.moments = NULL; /* now the layer's */
    unlock_layer(self);

    Py_XDECREF(old.x);
    Py_XDECREF(old.moments);
    Py_DECREF(stats);
    Py_XDECREF(given);
    bn_forward_call_clear(&call);
    return (PyObject *)y;

fail_locked:
    unlock_layer(self);
fail:
    Py_XDECREF(stats);
    Py_XDECREF(given);
    bn_forward_call_clear(&call);
    return NULL;
}

/* New references to what the last forward saved; RuntimeError before any. */
static int take_saved(BatchNormObject *self, bn_saved *saved)
{
    if (bn_layer_check_saved(self) < 0) {
        return -1;
    }
    if (self->saved.groups > 1) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the last forward normalized virtual batches: its gradient sums are "
                        "per group, use backward");
        return -1;
    }
    *saved = self->saved;
    Py_INCREF(saved->x);
    Py_INCREF(saved->moments);
    return 0;
}

/* dy as an array of the saved input's dtype and shape */
static PyArrayObject *read_dy(PyObject *dy_obj, PyArrayObject *x)
{
    PyArrayObject *dy = bn_as_data(dy_obj, PyArray_TYPE(x), "dy", NULL);
    if (dy != NULL && !bn_same_shape(dy, x)) {
        PyErr_SetString(PyExc_ValueError,
                        "dy must have the shape of the last forward's input");
        Py_CLEAR(dy);
    }
    if (dy != NULL && bn_relayout(&dy, x) < 0) {
        Py_CLEAR(dy);
    }
    return dy;
}

PyObject *BatchNorm_grad_sums(BatchNormObject *self, PyObject *dy_obj)
{
    bn_saved saved;
    if (check_initialized(self) < 0 || take_saved(self, &saved) < 0) {
        return NULL;
    }
    PyArrayObject *dy = read_dy(dy_obj, saved.x);
    PyArrayObject *sums = dy ? bn_new_matrix(NPY_DOUBLE, 2, self->num_features) : NULL;
    double *work = sums ? bn_new_workspace(saved.shape) : NULL;
    if (work != NULL) {
        double *dgamma = PyArray_DATA(sums), *dbeta = dgamma + CHANNELS(self);
        const double *mean = PyArray_DATA(saved.moments), *invstd = mean + CHANNELS(self);
        bn_run_grad_sums(dgamma, dbeta, work, dy, saved.x, mean, invstd, saved.shape);
    }
    else {
        Py_CLEAR(sums);
    }
    PyMem_Free(work);
    Py_XDECREF(dy);
    Py_DECREF(saved.x);
    Py_DECREF(saved.moments);
    return (PyObject *)sums;
}

PyObject *BatchNorm_backward_from_sums(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dy", "sums", "local_sums", "out", NULL};
    PyObject *dy_obj, *sums_obj, *local_obj, *out_obj = NULL;
    bn_saved saved;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$O:_backward_from_sums", kwlist,
                                     &dy_obj, &sums_obj, &local_obj, &out_obj)
        || check_initialized(self) < 0 || take_saved(self, &saved) < 0) {
        return NULL;
    }
    PyArrayObject *dy = NULL, *dx = NULL, *sums = NULL, *local = NULL;
    PyArrayObject *grad_gamma = NULL, *grad_beta = NULL;
    double *work = NULL;
    size_t channels = CHANNELS(self);

    dy = read_dy(dy_obj, saved.x);
    sums = dy ? bn_as_vector(sums_obj, NPY_DOUBLE, 2 * self->num_features, "sums") : NULL;
    local = sums ? bn_as_vector(local_obj, NPY_DOUBLE, 2 * self->num_features, "local_sums")
                 : NULL;
    dx = local ? bn_output_like(out_obj, dy, PyArray_TYPE(saved.x)) : NULL;
    if (dx == NULL) {
        goto fail;
    }
    if (bn_arrays_overlap(dx, saved.x)) {
        PyErr_SetString(PyExc_ValueError,
                        "out must not overlap the input of the last forward, "
                        "which backward still needs");
        goto fail;
    }
    work = bn_new_workspace(saved.shape);
    if (work != NULL && self->affine) {
        grad_gamma = bn_new_vector(self->typenum, self->num_features);
        grad_beta = bn_new_vector(self->typenum, self->num_features);
    }
    if (work == NULL || (self->affine && (grad_gamma == NULL || grad_beta == NULL))) {
        goto fail;
    }
    const double *mean = PyArray_DATA(saved.moments), *invstd = mean + channels;
    const double *dgamma = PyArray_DATA(sums), *dbeta = dgamma + channels;
    const double *local_dgamma = PyArray_DATA(local), *local_dbeta = local_dgamma + channels;

    lock_layer(self);
    bn_run_backward_dx(dx, work, dy, saved.x, mean, invstd, self->gamma, dgamma, dbeta,
                       saved.count, saved.shape, saved.batch_stats);
    PyArrayObject *old_grads[2];
    bn_layer_swap_grads(self, grad_gamma, grad_beta, local_dgamma, local_dbeta, old_grads);
    unlock_layer(self);
    Py_XDECREF(old_grads[0]);
    Py_XDECREF(old_grads[1]);
    PyMem_Free(work);
    Py_DECREF(dy);
    Py_DECREF(sums);
    Py_DECREF(local);
    Py_DECREF(saved.x);
    Py_DECREF(saved.moments);
    return (PyObject *)dx;

fail:
    PyMem_Free(work);
    Py_XDECREF(dy);
    Py_XDECREF(dx);
    Py_XDECREF(sums);
    Py_XDECREF(local);
    Py_XDECREF(grad_gamma);
    Py_XDECREF(grad_beta);
    Py_DECREF(saved.x);
    Py_DECREF(saved.moments);
    return NULL;
}

/* ---- merging partials ----------------------------------------------------- */

static PyObject *merge_partials(PyObject *Py_UNUSED(module), PyObject *parts_obj)
{
    PyArrayObject *parts = bn_as_array(parts_obj, NPY_DOUBLE, "parts");
    if (parts == NULL) {
        return NULL;
    }
    if (PyArray_NDIM(parts) != 3 || PyArray_DIM(parts, 2) != 3) {
        PyErr_SetString(PyExc_ValueError,
                        "parts must have shape (P, C, 3): P blocks of (count, mean, m2) "
                        "per feature");
        Py_DECREF(parts);
        return NULL;
    }
    npy_intp blocks = PyArray_DIM(parts, 0), channels = PyArray_DIM(parts, 1);
    PyArrayObject *total = new_stats(channels);
    if (total != NULL) {
        const bn_partial *p = PyArray_DATA(parts);
        bn_partial *merged = PyArray_DATA(total);
        for (npy_intp b = 0; b < blocks; b++) {
            for (npy_intp c = 0; c < channels; c++) {
                bn_partial_merge(&merged[c], &p[b * channels + c]);
            }
        }
    }
    Py_DECREF(parts);
    return (PyObject *)total;
}

PyMethodDef bn_stats_methods[] = {
    {"_merge_partials", merge_partials, METH_O,
     PyDoc_STR("_merge_partials($module, parts, /)\n--\n\n"
               "(C, 3) partials (count, mean, m2) of the union of P blocks given as\n"
               "(P, C, 3), merged in block order by Chan et al.'s formula.")},
    {NULL, NULL, 0, NULL},
};
