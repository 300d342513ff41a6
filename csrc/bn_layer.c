/* bn_layer.c -- bnpy.BatchNorm: the layer that owns gamma, beta and the
 * running statistics, and remembers what backward needs from the last forward.
 *
 * Ownership: every PyArrayObject* member is a strong reference or NULL. The
 * parameter and running-statistic arrays are made once in __init__ and never
 * replaced: setters copy values into them, so a view handed to the user stays
 * the layer's memory. Every call checks everything before it changes anything.
 */
#include "bn_module.h"

#include <limits.h>
#include <math.h>

#include "bn_layer.h"

/* ---- construction and the GC protocol ------------------------------------ */

/* a (C,) array of the layer's dtype filled with `value` */
static PyArrayObject *filled_vector(BatchNormObject *self, double value)
{
    PyArrayObject *arr = bn_new_vector(self->typenum, self->num_features);
    if (arr != NULL) {
        PyObject *fill = PyFloat_FromDouble(value);
        if (fill == NULL || PyArray_FillWithScalar(arr, fill) < 0) {
            Py_CLEAR(arr);
        }
        Py_XDECREF(fill);
    }
    return arr;
}

/* None (0: the whole batch) or an integer >= 1 */
static int parse_virtual_batch_size(PyObject *obj, npy_intp *out)
{
    long long size = 0;
    if (obj == Py_None) {
        *out = 0;
        return 0;
    }
    if (bn_parse_integer(obj, "virtual_batch_size", &size) < 0) {
        return -1;
    }
    if (size < 1 || size > NPY_MAX_INTP) {
        PyErr_Format(PyExc_ValueError,
                     "virtual_batch_size must be None or an integer >= 1, got %lld", size);
        return -1;
    }
    *out = (npy_intp)size;
    return 0;
}

static int BatchNorm_init(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"num_features", "eps", "momentum", "affine",
                             "track_running_stats", "axis", "dtype", "training",
                             "virtual_batch_size", NULL};
    PyObject *features_obj, *eps_obj = NULL, *momentum_obj = NULL, *affine_obj = Py_True;
    PyObject *track_obj = Py_True, *axis_obj = NULL, *dtype_obj = NULL, *training_obj = Py_True;
    PyObject *virtual_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|OOOOOO$OO:BatchNorm", kwlist,
                                     &features_obj, &eps_obj, &momentum_obj, &affine_obj,
                                     &track_obj, &axis_obj, &dtype_obj, &training_obj,
                                     &virtual_obj)) {
        return -1;
    }
    if (self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "BatchNorm.__init__ was already called");
        return -1;
    }
    BatchNormObject cfg = {0}; /* validated values, copied into self at the end */
    cfg.eps = 1e-5;
    cfg.momentum = 0.1;
    cfg.typenum = NPY_FLOAT;
    cfg.axis = 1;
    if (bn_parse_num_features(features_obj, &cfg.num_features) < 0
        || (eps_obj && bn_parse_eps(eps_obj, &cfg.eps) < 0)
        || (momentum_obj && bn_parse_momentum(momentum_obj, &cfg.momentum,
                                              &cfg.momentum_is_none) < 0)
        || bn_parse_bool(affine_obj, "affine", &cfg.affine) < 0
        || bn_parse_bool(track_obj, "track_running_stats", &cfg.track_running_stats) < 0
        || (axis_obj && bn_parse_axis(axis_obj, &cfg.axis) < 0)
        || (dtype_obj && bn_parse_dtype(dtype_obj, &cfg.typenum) < 0)
        || bn_parse_bool(training_obj, "training", &cfg.training) < 0
        || parse_virtual_batch_size(virtual_obj, &cfg.virtual_batch_size) < 0) {
        return -1;
    }
    if (cfg.affine) {
        cfg.gamma = filled_vector(&cfg, 1.0);
        cfg.beta = filled_vector(&cfg, 0.0);
    }
    if (cfg.track_running_stats) {
        cfg.running_mean = filled_vector(&cfg, 0.0);
        cfg.running_var = filled_vector(&cfg, 1.0);
    }
    if ((cfg.affine && (cfg.gamma == NULL || cfg.beta == NULL))
        || (cfg.track_running_stats && (cfg.running_mean == NULL || cfg.running_var == NULL))) {
        Py_XDECREF(cfg.gamma);
        Py_XDECREF(cfg.beta);
        Py_XDECREF(cfg.running_mean);
        Py_XDECREF(cfg.running_var);
        return -1;
    }
    /* self is still all zeros and NULLs (tp_alloc): take the validated values */
    self->num_features = cfg.num_features;
    self->affine = cfg.affine;
    self->track_running_stats = cfg.track_running_stats;
    self->axis = cfg.axis;
    self->typenum = cfg.typenum;
    self->virtual_batch_size = cfg.virtual_batch_size;
    self->eps = cfg.eps;
    self->momentum = cfg.momentum;
    self->momentum_is_none = cfg.momentum_is_none;
    self->training = cfg.training;
    self->gamma = cfg.gamma;
    self->beta = cfg.beta;
    self->running_mean = cfg.running_mean;
    self->running_var = cfg.running_var;
    self->initialized = 1;
    return 0;
}

static PyObject *BatchNorm_new(PyTypeObject *type, PyObject *Py_UNUSED(args),
                               PyObject *Py_UNUSED(kwargs))
{
    BatchNormObject *self = (BatchNormObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static int BatchNorm_traverse(BatchNormObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->gamma);
    Py_VISIT(self->beta);
    Py_VISIT(self->running_mean);
    Py_VISIT(self->running_var);
    Py_VISIT(self->grad_gamma);
    Py_VISIT(self->grad_beta);
    Py_VISIT(self->saved.x);
    Py_VISIT(self->saved.moments);
    return 0;
}

static int BatchNorm_clear(BatchNormObject *self)
{
    Py_CLEAR(self->gamma);
    Py_CLEAR(self->beta);
    Py_CLEAR(self->running_mean);
    Py_CLEAR(self->running_var);
    Py_CLEAR(self->grad_gamma);
    Py_CLEAR(self->grad_beta);
    Py_CLEAR(self->saved.x);
    Py_CLEAR(self->saved.moments);
    self->initialized = 0;
    return 0;
}

static void BatchNorm_dealloc(BatchNormObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    BatchNorm_clear(self);
    if (self->lock != NULL) {
        PyThread_free_lock(self->lock);
    }
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* ---- the values the layer's state may hold ---------------------------------- */
/* One rule for the setters, load_state_dict, unpickling and the running
 * statistics a forward or calibrate computes: every value finite, and a
 * variance non-negative. A layer holds only state it can save and reload. */

static double value_at(PyArrayObject *arr, npy_intp i)
{
    return PyArray_TYPE(arr) == NPY_FLOAT ? ((float *)PyArray_DATA(arr))[i]
                                          : ((double *)PyArray_DATA(arr))[i];
}

static int is_good_value(double v, int is_variance)
{
    return isfinite(v) && !(is_variance && v < 0.0);
}

/* copy the values of src into dst, two (C,) arrays of one dtype */
static void copy_values(PyArrayObject *dst, PyArrayObject *src)
{
    memcpy(PyArray_DATA(dst), PyArray_DATA(src), (size_t)PyArray_NBYTES(dst));
}

/* ValueError unless every value of arr, named `name`, follows the rule;
 * `prefix` starts the message ("state dict value " or ""). */
static int check_values(PyArrayObject *arr, const char *name, const char *prefix)
{
    int is_variance = strcmp(name, "running_var") == 0;
    npy_intp n = PyArray_SIZE(arr);
    for (npy_intp i = 0; i < n; i++) {
        double v = value_at(arr, i);
        if (is_good_value(v, is_variance)) {
            continue;
        }
        PyObject *bad = PyFloat_FromDouble(v);
        if (bad != NULL) {
            PyErr_Format(PyExc_ValueError, "%s%s must be %s, got %R at index %zd", prefix,
                         name, is_variance ? "finite and non-negative" : "finite", bad,
                         (Py_ssize_t)i);
            Py_DECREF(bad);
        }
        return -1;
    }
    return 0;
}

/* *slot <- a private copy of value as a checked (C,) vector. Private: value
 * may be a view of the layer's own buffers (what the properties return), and
 * a copy cannot change between the check and its use. */
static int read_vector(BatchNormObject *self, PyObject *value, const char *name,
                       const char *prefix, PyArrayObject **slot)
{
    PyArrayObject *given = bn_as_vector(value, self->typenum, self->num_features, name);
    if (given == NULL) {
        return -1;
    }
    *slot = (PyArrayObject *)PyArray_NewCopy(given, NPY_CORDER);
    Py_DECREF(given);
    if (*slot == NULL) {
        return -1;
    }
    if (check_values(*slot, name, prefix) < 0) {
        Py_CLEAR(*slot);
        return -1;
    }
    return 0;
}

int bn_layer_new_running(BatchNormObject *self, PyArrayObject **next)
{
    next[0] = bn_new_vector(self->typenum, self->num_features);
    next[1] = next[0] ? bn_new_vector(self->typenum, self->num_features) : NULL;
    if (next[1] == NULL) {
        Py_CLEAR(next[0]);
        return -1;
    }
    return 0;
}

/* Appends feature index c to *bad, a list made on first use; -1 with an
 * exception set (and *bad released) when that fails */
static int append_feature(PyObject **bad, Py_ssize_t c)
{
    PyObject *index = PyLong_FromSsize_t(c);
    if (index != NULL && *bad == NULL) {
        *bad = PyList_New(0);
    }
    if (index == NULL || *bad == NULL || PyList_Append(*bad, index) < 0) {
        Py_XDECREF(index);
        Py_CLEAR(*bad);
        return -1;
    }
    Py_DECREF(index);
    return 0;
}

int bn_layer_commit_running(BatchNormObject *self, PyArrayObject **next)
{
    PyObject *bad = NULL;
    for (npy_intp c = 0; c < self->num_features; c++) {
        if (is_good_value(value_at(next[0], c), 0) && is_good_value(value_at(next[1], c), 1)) {
            continue;
        }
        if (append_feature(&bad, (Py_ssize_t)c) < 0) {
            return -1;
        }
    }
    if (bad != NULL) {
        PyErr_Format(PyExc_FloatingPointError,
                     "the running statistics of feature(s) %R would not be finite in %s (a "
                     "variance too large for the layer's dtype); the layer is unchanged",
                     bad, self->typenum == NPY_FLOAT ? "float32" : "float64");
        Py_DECREF(bad);
        return -1;
    }
    copy_values(self->running_mean, next[0]);
    copy_values(self->running_var, next[1]);
    return 0;
}

/* ---- forward and backward ------------------------------------------------- */

void bn_layer_replace_saved(BatchNormObject *self, PyArrayObject *x, PyArrayObject *moments,
                            bn_shape shape, int batch_stats, double count, bn_saved *old)
{
    *old = self->saved;
    self->saved = (bn_saved){x, moments, shape, batch_stats, count, 1};
}

int bn_layer_check_saved(BatchNormObject *self)
{
    if (self->saved.x != NULL) {
        return 0;
    }
    PyErr_SetString(PyExc_RuntimeError,
                    self->saved.moments == NULL
                        ? "backward called before any forward: there is nothing to differentiate"
                        : "the last forward wrote its output over its input (out=x in eval "
                          "mode), so backward has no input to differentiate at: use another "
                          "out when you need backward");
    return -1;
}

void bn_layer_swap_grads(BatchNormObject *self, PyArrayObject *grad_gamma,
                         PyArrayObject *grad_beta, const double *dgamma, const double *dbeta,
                         PyArrayObject **old)
{
    old[0] = old[1] = NULL;
    if (!self->affine) {
        return;
    }
    bn_run_from_double(grad_gamma, dgamma);
    bn_run_from_double(grad_beta, dbeta);
    old[0] = self->grad_gamma;
    old[1] = self->grad_beta;
    self->grad_gamma = grad_gamma;
    self->grad_beta = grad_beta;
}

int bn_layer_check_finite_stats(const bn_partial *stats, size_t channels)
{
    PyObject *bad = NULL;
    for (size_t c = 0; c < channels; c++) {
        if (isfinite(stats[c].mean) && isfinite(stats[c].m2)) {
            continue;
        }
        if (append_feature(&bad, (Py_ssize_t)c) < 0) {
            return -1;
        }
    }
    if (bad == NULL) {
        return 0;
    }
    PyErr_Format(PyExc_FloatingPointError,
                 "the batch statistics of feature(s) %R are not finite (NaN or infinity in "
                 "the input, or values too large to square); the layer is unchanged", bad);
    Py_DECREF(bad);
    return -1;
}

int bn_layer_check_count(BatchNormObject *self)
{
    if (self->num_batches_tracked < LLONG_MAX) {
        return 0;
    }
    PyErr_Format(PyExc_OverflowError,
                 "num_batches_tracked is %lld, the largest count it holds: a training forward "
                 "cannot count another batch (load a smaller num_batches_tracked); the layer "
                 "is unchanged", self->num_batches_tracked);
    return -1;
}

int bn_layer_update_running(BatchNormObject *self, const bn_partial *stats,
                            PyArrayObject **next)
{
    long long count = self->num_batches_tracked + 1; /* bn_layer_check_count passed */
    double momentum = self->momentum_is_none ? 1.0 / (double)count : self->momentum;
    copy_values(next[0], self->running_mean);
    copy_values(next[1], self->running_var);
    bn_run_update_running(next[0], next[1], stats, momentum);
    if (bn_layer_commit_running(self, next) < 0) {
        return -1;
    }
    self->num_batches_tracked = count;
    return 0;
}

/* 1 when y overlaps memory that a training forward failing after it wrote y
 * must leave as it was and cannot put back: the memory x was converted from
 * (the in-place restore covers only y == x) or the input the last forward
 * saved for backward. */
static int overlaps_kept_memory(BatchNormObject *self, PyArrayObject *y, PyArrayObject *source)
{
    return bn_may_share_memory(y, source)
           || (self->saved.x != NULL && bn_arrays_overlap(y, self->saved.x));
}

int bn_layer_prepare_forward(BatchNormObject *self, PyObject *x_obj, PyObject *out_obj,
                             int training, bn_forward_call *call)
{
    *call = (bn_forward_call){0};
    PyArrayObject *source = NULL; /* the caller's x before any conversion */
    call->x = bn_as_layer_data(x_obj, self->typenum, "x", &source);
    int data_type = call->x == NULL ? -1 : PyArray_TYPE(call->x);
    if (call->x == NULL || bn_relayout_to_out(&call->x, out_obj) < 0
        || bn_get_layout(call->x, self->axis, self->num_features, &call->layout) < 0) {
        goto fail;
    }
    call->y = bn_output_like(out_obj, call->x, data_type);
    if (call->y == NULL || bn_check_separate(call->y, self->gamma, "gamma") < 0
        || bn_check_separate(call->y, self->beta, "beta") < 0
        || bn_check_separate(call->y, self->running_mean, "running_mean") < 0
        || bn_check_separate(call->y, self->running_var, "running_var") < 0) {
        goto fail;
    }
    /* backward needs x as it is now. When y is about to overwrite it, training
       keeps a copy; inference in place (out=x) does not: it gives up backward
       rather than copy every input */
    call->in_place = bn_arrays_overlap(call->y, call->x);
    if (training && !call->in_place && overlaps_kept_memory(self, call->y, source)) {
        call->out = call->y;
        call->y = bn_output_like(NULL, call->x, data_type);
        if (call->y == NULL) {
            goto fail;
        }
    }
    call->saved_x = !call->in_place ? (PyArrayObject *)Py_NewRef(call->x)
                    : training ? (PyArrayObject *)PyArray_NewCopy(call->x, NPY_KEEPORDER)
                               : NULL;
    if (call->saved_x == NULL && (training || !call->in_place)) {
        goto fail;
    }
    call->moments = bn_new_matrix(NPY_DOUBLE, 2, self->num_features);
    if (call->moments == NULL
        || (training && self->track_running_stats
            && bn_layer_new_running(self, call->running) < 0)) {
        goto fail;
    }
    call->work = bn_new_workspace(call->layout.shape);
    if (call->work == NULL) {
        goto fail;
    }
    Py_DECREF(source);
    return 0;

fail:
    Py_XDECREF(source);
    bn_forward_call_clear(call);
    return -1;
}

void bn_forward_call_clear(bn_forward_call *call)
{
    Py_CLEAR(call->x);
    Py_CLEAR(call->y);
    Py_CLEAR(call->out);
    Py_CLEAR(call->saved_x);
    Py_CLEAR(call->moments);
    Py_CLEAR(call->running[0]);
    Py_CLEAR(call->running[1]);
    PyMem_Free(call->work);
    call->work = NULL;
}

void bn_forward_call_restore(bn_forward_call *call)
{
    if (call->in_place) {
        memcpy(PyArray_DATA(call->y), PyArray_DATA(call->saved_x),
               (size_t)PyArray_NBYTES(call->y));
    }
}

PyArrayObject *bn_forward_call_result(bn_forward_call *call)
{
    PyArrayObject *result = call->y;
    if (call->out != NULL) {
        memcpy(PyArray_DATA(call->out), PyArray_DATA(call->y), (size_t)PyArray_NBYTES(call->y));
        result = call->out;
        call->out = NULL;
        Py_DECREF(call->y);
    }
    call->y = NULL;
    return result;
}

/* A forward's virtual batches: views of y and x, and (2G, C) moments. */
static int prepare_groups(bn_groups *groups, npy_intp count, bn_forward_call *call)
{
    PyArrayObject *arrays[2] = {call->y, call->x};
    Py_SETREF(call->moments, bn_new_matrix(NPY_DOUBLE, 2 * count, (npy_intp)call->layout.shape.channels));
    if (call->moments == NULL) {
        return -1;
    }
    return bn_groups_prepare(groups, count, call->layout.shape, arrays, 2);
}

static PyObject *BatchNorm_forward(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "out", NULL};
    PyObject *x_obj, *out_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$O:forward", kwlist, &x_obj, &out_obj)
        || check_initialized(self) < 0) {
        return NULL;
    }
    bn_forward_call call;
    bn_saved old = {0};
    size_t channels = CHANNELS(self);
    /* the mode of this call, whatever another thread sets meanwhile */
    int training = self->training;
    if (bn_layer_prepare_forward(self, x_obj, out_obj, training, &call) < 0) {
        return NULL;
    }
    PyArrayObject *x = call.x, *y = call.y;
    bn_shape shape = call.layout.shape;
    double *work = call.work;
    bn_groups groups = {0};
    int batch_stats = training || !self->track_running_stats;
    npy_intp group_count = batch_stats ? bn_groups_of(self, x, &call.layout) : 1;
    bn_partial *stats = group_count < 1 ? NULL : bn_new_scratch(channels, sizeof(bn_partial),
                                                                "the batch statistics");
    if (stats == NULL || (group_count > 1 && prepare_groups(&groups, group_count, &call) < 0)) {
        goto fail;
    }

    lock_layer(self);
    int counts_batch = training && self->track_running_stats && bn_count(shape) > 0;
    double *mean = PyArray_DATA(call.moments), *invstd = mean + channels;
    if ((batch_stats && bn_check_batch_size(x, &call.layout, training
                                            ? "training" : "using batch statistics") < 0)
        || (counts_batch && bn_layer_check_count(self) < 0)) {
        goto fail_locked;
    }
    if (group_count > 1) {
        bn_groups_forward(&groups, stats, mean, self->gamma, self->beta, self->eps);
    }
    else if (batch_stats) {
        bn_run_forward_train(y, stats, mean, invstd, work, x, self->gamma, self->beta,
                             self->eps, shape);
    }
    else {
        bn_run_running_moments(mean, invstd, self->running_mean, self->running_var, self->eps);
        bn_run_forward(y, work, x, mean, invstd, self->gamma, self->beta, shape);
    }
    /* a training forward checks what it computed; the running statistics
       change only when their new values are good, and last */
    if (training && (bn_layer_check_finite_stats(stats, channels) < 0
                     || (counts_batch && bn_layer_update_running(self, stats, call.running) < 0))) {
        bn_forward_call_restore(&call); /* a failed call changes nothing */
        goto fail_locked;
    }
    /* nothing fails from here on: commit (the saved values move to the layer) */
    PyArrayObject *result = bn_forward_call_result(&call);
    bn_layer_replace_saved(self, call.saved_x, call.moments, shape, batch_stats,
                           (double)bn_count(shape), &old);
    self->saved.groups = group_count;
    call.saved_x = call.moments = NULL;
    unlock_layer(self);

    Py_XDECREF(old.x);
    Py_XDECREF(old.moments);
    PyMem_Free(stats);
    bn_groups_clear(&groups);
    bn_forward_call_clear(&call);
    return (PyObject *)result;

fail_locked:
    unlock_layer(self);
fail:
    PyMem_Free(stats);
    bn_groups_clear(&groups);
    bn_forward_call_clear(&call);
    return NULL;
}

/* bn(x) is bn.forward(x), looked up so that subclasses can override forward */
static PyObject *BatchNorm_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *forward = PyObject_GetAttrString(self, "forward");
    if (forward == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Call(forward, args, kwargs);
    Py_DECREF(forward);
    return result;
}

/* ValueError: dy's shape is not the shape of the saved input */
static void raise_dy_shape(PyArrayObject *dy, PyArrayObject *x)
{
    PyObject *want = PyObject_GetAttrString((PyObject *)x, "shape");
    PyObject *got = PyObject_GetAttrString((PyObject *)dy, "shape");
    if (want != NULL && got != NULL) {
        PyErr_Format(PyExc_ValueError,
                     "dy must have the shape of the last forward's input %R, got shape %R",
                     want, got);
    }
    Py_XDECREF(want);
    Py_XDECREF(got);
}

static PyObject *BatchNorm_backward(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dy", "out", NULL};
    PyObject *dy_obj, *out_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$O:backward", kwlist, &dy_obj, &out_obj)
        || check_initialized(self) < 0) {
        return NULL;
    }
    if (bn_layer_check_saved(self) < 0) {
        return NULL;
    }
    if (self->saved.count != (double)bn_count(self->saved.shape)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the last forward normalized with statistics gathered beyond its "
                        "input (across processes): backward needs the gradient sums of all "
                        "of them, see bnpy.distributed.SyncBatchNorm");
        return NULL;
    }
    /* our own references to what the last forward saved, in case a forward
       in another thread replaces it while the kernels run */
    PyArrayObject *x = (PyArrayObject *)Py_NewRef(self->saved.x);
    PyArrayObject *moments = (PyArrayObject *)Py_NewRef(self->saved.moments);
    bn_shape shape = self->saved.shape;
    int batch_stats = self->saved.batch_stats;
    npy_intp group_count = self->saved.groups;
    bn_groups groups = {0};
    PyArrayObject *dy = NULL, *dx = NULL, *grad_gamma = NULL, *grad_beta = NULL;
    size_t channels = CHANNELS(self);
    double *sums = NULL, *work = NULL;

    dy = bn_as_data(dy_obj, PyArray_TYPE(x), "dy", NULL); /* x's dtype: a half's too */
    if (dy == NULL) {
        goto fail;
    }
    if (!bn_same_shape(dy, x)) {
        raise_dy_shape(dy, x);
        goto fail;
    }
    if (bn_relayout(&dy, x) < 0) {
        goto fail;
    }
    dx = bn_output_like(out_obj, dy, PyArray_TYPE(x));
    if (dx == NULL) {
        goto fail;
    }
    if (bn_arrays_overlap(dx, x)) {
        PyErr_SetString(PyExc_ValueError,
                        "out must not overlap the input of the last forward, "
                        "which backward still needs");
        goto fail;
    }
    if (bn_check_separate(dx, self->gamma, "gamma") < 0) {
        goto fail;
    }
    sums = bn_new_scratch(2 * channels, sizeof(double), "the gradient sums");
    work = sums ? bn_new_workspace(shape) : NULL;
    if (work == NULL) {
        goto fail;
    }
    if (self->affine) {
        grad_gamma = bn_new_vector(self->typenum, self->num_features);
        grad_beta = bn_new_vector(self->typenum, self->num_features);
        if (grad_gamma == NULL || grad_beta == NULL) {
            goto fail;
        }
    }
    PyArrayObject *arrays[3] = {dx, dy, x};
    if (group_count > 1 && bn_groups_prepare(&groups, group_count, shape, arrays, 3) < 0) {
        goto fail;
    }
    double *dgamma = sums, *dbeta = sums + channels;
    const double *mean = PyArray_DATA(moments), *invstd = mean + channels;
    lock_layer(self);
    if (group_count > 1) {
        bn_groups_backward(&groups, dgamma, dbeta, mean, self->gamma);
    }
    else {
        bn_run_backward(dx, dgamma, dbeta, work, dy, x, mean, invstd, self->gamma, shape,
                        batch_stats);
    }
    PyArrayObject *old_grads[2];
    bn_layer_swap_grads(self, grad_gamma, grad_beta, dgamma, dbeta, old_grads);
    unlock_layer(self);
    Py_XDECREF(old_grads[0]);
    Py_XDECREF(old_grads[1]);
    bn_groups_clear(&groups);
    PyMem_Free(sums);
    PyMem_Free(work);
    Py_DECREF(dy);
    Py_DECREF(x);
    Py_DECREF(moments);
    return (PyObject *)dx;

fail:
    bn_groups_clear(&groups);
    PyMem_Free(sums);
    PyMem_Free(work);
    Py_XDECREF(dy);
    Py_XDECREF(dx);
    Py_XDECREF(grad_gamma);
    Py_XDECREF(grad_beta);
    Py_DECREF(x);
    Py_DECREF(moments);
    return NULL;
}

static PyObject *BatchNorm_train(BatchNormObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"mode", NULL};
    PyObject *mode_obj = Py_True;
    int mode;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:train", kwlist, &mode_obj)
        || bn_parse_bool(mode_obj, "mode", &mode) < 0) {
        return NULL;
    }
    self->training = mode;
    return Py_NewRef(self);
}

static PyObject *BatchNorm_eval(BatchNormObject *self, PyObject *Py_UNUSED(ignored))
{
    self->training = 0;
    return Py_NewRef(self);
}

/* ---- state_dict, load_state_dict ------------------------------------------ */

/* d[key] = a copy of arr, unless arr is NULL */
static int put_copy(PyObject *d, const char *key, PyArrayObject *arr)
{
    if (arr == NULL) {
        return 0;
    }
    PyObject *copy = PyArray_NewCopy(arr, NPY_CORDER);
    if (copy == NULL) {
        return -1;
    }
    int status = PyDict_SetItemString(d, key, copy);
    Py_DECREF(copy);
    return status;
}

static PyObject *BatchNorm_state_dict(BatchNormObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_initialized(self) < 0) {
        return NULL;
    }
    PyObject *d = PyDict_New();
    if (d == NULL) {
        return NULL;
    }
    if (put_copy(d, "gamma", self->gamma) < 0 || put_copy(d, "beta", self->beta) < 0
        || put_copy(d, "running_mean", self->running_mean) < 0
        || put_copy(d, "running_var", self->running_var) < 0) {
        goto fail;
    }
    if (self->track_running_stats) {
        PyObject *count = PyLong_FromLongLong(self->num_batches_tracked);
        if (count == NULL || PyDict_SetItemString(d, "num_batches_tracked", count) < 0) {
            Py_XDECREF(count);
            goto fail;
        }
        Py_DECREF(count);
    }
    return d;

fail:
    Py_DECREF(d);
    return NULL;
}

/* The values a state dict holds for this layer, checked, not yet applied;
 * a vector a non-strict load did not find is NULL. */
typedef struct {
    PyArrayObject *gamma, *beta, *running_mean, *running_var;
    long long num_batches_tracked;
} bn_loaded;

/* The keys a non-strict load left out, as PyTorch reports them: two lists of
 * str. A strict load has no report (NULL): a key missing or unknown raises. */
typedef struct {
    PyObject *missing_keys, *unexpected_keys;
} bn_key_report;

static void loaded_clear(bn_loaded *v)
{
    Py_CLEAR(v->gamma);
    Py_CLEAR(v->beta);
    Py_CLEAR(v->running_mean);
    Py_CLEAR(v->running_var);
}

/* *slot <- a private, checked copy of the (C,) vector d[key], or d[alias]
 * (PyTorch's name): apply_state copies one vector after another, and a value
 * that shared memory with the layer would see an earlier one's copy. When
 * neither is there, a strict load (report NULL) raises; a non-strict one
 * leaves *slot NULL and reports key missing. */
static int load_vector(BatchNormObject *self, PyObject *d, const char *key, const char *alias,
                       bn_key_report *report, PyArrayObject **slot)
{
    PyObject *value = PyDict_GetItemString(d, key); /* borrowed */
    PyObject *aliased = alias ? PyDict_GetItemString(d, alias) : NULL;
    if (value != NULL && aliased != NULL) {
        PyErr_Format(PyExc_ValueError,
                     "state dict has both %s and %s, which name the same parameter", key, alias);
        return -1;
    }
    const char *name = value != NULL ? key : alias;
    value = value != NULL ? value : aliased;
    if (value == NULL && report != NULL) {
        PyObject *name_obj = PyUnicode_FromString(key);
        int status = name_obj ? PyList_Append(report->missing_keys, name_obj) : -1;
        Py_XDECREF(name_obj);
        return status;
    }
    if (value == NULL) {
        PyErr_Format(PyExc_ValueError, "state dict is missing key '%s' (strict=False loads "
                     "the keys there are)", key);
        return -1;
    }
    return read_vector(self, value, name, "state dict value ", slot);
}

/* *count <- d["num_batches_tracked"], or 0 when d has none: a checkpoint
 * from before PyTorch counted batches. */
static int load_count(PyObject *d, long long *count)
{
    PyObject *value = PyDict_GetItemString(d, "num_batches_tracked"); /* borrowed */
    if (value == NULL) {
        *count = 0;
        return 0;
    }
    if (PyBool_Check(value) || PyArray_IsScalar(value, Bool)) {
        PyErr_Format(PyExc_ValueError,
                     "state dict value num_batches_tracked must be an integer, got %R", value);
        return -1;
    }
    /* an int, a NumPy integer, or a one-element integer array or tensor */
    PyObject *index = PyNumber_Index(value);
    if (index == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "state dict value num_batches_tracked must be an integer, got %R", value);
        return -1;
    }
    *count = PyLong_AsLongLong(index);
    Py_DECREF(index);
    if ((*count == -1 && PyErr_Occurred()) || *count < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "state dict value num_batches_tracked must be a non-negative integer, "
                     "got %R", value);
        return -1;
    }
    return 0;
}

/* ValueError for a key this layer does not have; reported instead when the
 * load is not strict (report not NULL). */
static int check_keys(BatchNormObject *self, PyObject *d, bn_key_report *report)
{
    PyObject *key;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &key, NULL)) {
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        if (k == NULL) {
            PyErr_Clear();
        }
        int known = k != NULL
            && ((self->affine && (!strcmp(k, "gamma") || !strcmp(k, "beta")
                                  || !strcmp(k, "weight") || !strcmp(k, "bias")))
                || (self->track_running_stats
                    && (!strcmp(k, "running_mean") || !strcmp(k, "running_var")
                        || !strcmp(k, "num_batches_tracked"))));
        if (!known && report != NULL) {
            if (PyList_Append(report->unexpected_keys, key) < 0) {
                return -1;
            }
            continue;
        }
        if (!known) {
            PyErr_Format(PyExc_ValueError, "unexpected key %R in state dict for %s", key,
                         self->affine && self->track_running_stats
                             ? "a layer with parameters and running statistics"
                             : self->affine ? "a layer without running statistics"
                             : self->track_running_stats ? "a layer without gamma and beta"
                             : "a layer with no state");
            return -1;
        }
    }
    return 0;
}

/* Check every value of d; on success v holds them all (strict: report
 * NULL), or those d has, the others reported missing. */
static int read_state(BatchNormObject *self, PyObject *d, bn_key_report *report, bn_loaded *v)
{
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "state dict must be a dict, got %.100s",
                     Py_TYPE(d)->tp_name);
        return -1;
    }
    if (check_keys(self, d, report) < 0) {
        return -1;
    }
    if (self->affine && (load_vector(self, d, "gamma", "weight", report, &v->gamma) < 0
                         || load_vector(self, d, "beta", "bias", report, &v->beta) < 0)) {
        return -1;
    }
    if (self->track_running_stats
        && (load_vector(self, d, "running_mean", NULL, report, &v->running_mean) < 0
            || load_vector(self, d, "running_var", NULL, report, &v->running_var) < 0
            || load_count(d, &v->num_batches_tracked) < 0)) {
        return -1;
    }
    return 0;
}

/* dst <- src's values, when a load found src */
static void copy_loaded(PyArrayObject *dst, PyArrayObject *src)
{
    if (src != NULL) {
        copy_values(dst, src);
    }
}

static void apply_state(BatchNormObject *self, const bn_loaded *v)
{
    copy_loaded(self->gamma, v->gamma);
    copy_loaded(self->beta, v->beta);
    copy_loaded(self->running_mean, v->running_mean);
    copy_loaded(self->running_var, v->running_var);
    if (self->track_running_stats) {
        self->num_batches_tracked = v->num_batches_tracked;
    }
}

/* (state, strict=True), load_state_dict's arguments, from a vectorcall's */
static int parse_load_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                           PyObject **d, int *strict)
{
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *strict_obj = nargs == 2 ? args[1] : Py_True;
    int strict_given = nargs == 2;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (strict_given || PyUnicode_CompareWithASCIIString(name, "strict") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "load_state_dict() got an unexpected keyword argument %R", name);
            return -1;
        }
        strict_obj = args[nargs + i];
        strict_given = 1;
    }
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "load_state_dict() takes a state dict and strict=True, "
                     "got %zd positional arguments", nargs);
        return -1;
    }
    *d = args[0];
    return bn_parse_bool(strict_obj, "strict", strict);
}

/* IncompatibleKeys(missing_keys, unexpected_keys), the module's namedtuple */
static PyObject *new_key_report(PyTypeObject *defining_class, bn_key_report *report)
{
    bn_module_state *state = PyType_GetModuleState(defining_class);
    if (state == NULL) {
        return NULL;
    }
    return PyObject_CallFunctionObjArgs(state->incompatible_keys_type, report->missing_keys,
                                        report->unexpected_keys, NULL);
}

static PyObject *BatchNorm_load_state_dict(BatchNormObject *self, PyTypeObject *defining_class,
                                           PyObject *const *args, Py_ssize_t nargs,
                                           PyObject *kwnames)
{
    PyObject *d, *result = NULL;
    int strict;
    if (parse_load_args(args, nargs, kwnames, &d, &strict) < 0
        || check_initialized(self) < 0) {
        return NULL;
    }
    bn_loaded v = {0};
    bn_key_report report = {PyList_New(0), PyList_New(0)};
    if (report.missing_keys == NULL || report.unexpected_keys == NULL
        || read_state(self, d, strict ? NULL : &report, &v) < 0) {
        goto done;
    }
    result = new_key_report(defining_class, &report);
    if (result == NULL) {
        goto done;
    }
    lock_layer(self);
    apply_state(self, &v);
    unlock_layer(self);

done:
    loaded_clear(&v);
    Py_XDECREF(report.missing_keys);
    Py_XDECREF(report.unexpected_keys);
    return result;
}

/* ---- reset_running_stats, reset_parameters -------------------------------- */

/* fill one of the layer's (C,) arrays, when it has it, with value */
static int fill_state(PyArrayObject *arr, double value)
{
    if (arr == NULL) {
        return 0;
    }
    PyObject *fill = PyFloat_FromDouble(value);
    int status = fill != NULL ? PyArray_FillWithScalar(arr, fill) : -1;
    Py_XDECREF(fill);
    return status;
}

/* running_mean 0, running_var 1, num_batches_tracked 0; and with parameters
 * gamma 1, beta 0 (PyTorch's two reset methods) */
static PyObject *reset_state(BatchNormObject *self, int parameters)
{
    if (check_initialized(self) < 0) {
        return NULL;
    }
    lock_layer(self);
    int status = fill_state(self->running_mean, 0.0) < 0 || fill_state(self->running_var, 1.0) < 0
                 || (parameters && (fill_state(self->gamma, 1.0) < 0
                                    || fill_state(self->beta, 0.0) < 0)) ? -1 : 0;
    self->num_batches_tracked = 0;
    unlock_layer(self);
    if (status < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *BatchNorm_reset_running_stats(BatchNormObject *self,
                                               PyObject *Py_UNUSED(ignored))
{
    return reset_state(self, 0);
}

static PyObject *BatchNorm_reset_parameters(BatchNormObject *self, PyObject *Py_UNUSED(ignored))
{
    return reset_state(self, 1);
}

/* ---- attributes ---------------------------------------------------------- */

/* A view of one of the layer's arrays, sharing its memory, or None. The view
 * is a new object each time, so reshaping it cannot touch the layer. */
static PyObject *view_or_none(PyArrayObject *arr)
{
    if (arr == NULL) {
        Py_RETURN_NONE;
    }
    return PyArray_View(arr, NULL, NULL);
}

/* Copy `value` into the layer's (C,) array *slot after checking it by the
 * rule load_state_dict applies (the layer must be able to save it). */
static int set_vector(BatchNormObject *self, PyArrayObject *slot, PyObject *value,
                      const char *name, const char *missing_because)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", name);
        return -1;
    }
    if (check_initialized(self) < 0) {
        return -1;
    }
    if (slot == NULL) {
        PyErr_Format(PyExc_ValueError, "cannot set %s: the layer has none because %s",
                     name, missing_because);
        return -1;
    }
    PyArrayObject *arr;
    if (read_vector(self, value, name, "", &arr) < 0) {
        return -1;
    }
    lock_layer(self);
    copy_values(slot, arr);
    unlock_layer(self);
    Py_DECREF(arr);
    return 0;
}

#define VECTOR_ATTRIBUTE(member, why_none)                                            \
    static PyObject *get_##member(BatchNormObject *self, void *Py_UNUSED(closure))    \
    {                                                                                 \
        return view_or_none(self->member);                                            \
    }                                                                                 \
    static int set_##member(BatchNormObject *self, PyObject *value,                   \
                            void *Py_UNUSED(closure))                                 \
    {                                                                                 \
        return set_vector(self, self->member, value, #member, why_none);              \
    }

VECTOR_ATTRIBUTE(gamma, "affine=False")
VECTOR_ATTRIBUTE(beta, "affine=False")
VECTOR_ATTRIBUTE(running_mean, "track_running_stats=False")
VECTOR_ATTRIBUTE(running_var, "track_running_stats=False")

/* PyTorch's names of gamma and beta: the same memory, errors in their names */
static int set_weight(BatchNormObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    return set_vector(self, self->gamma, value, "weight", "affine=False");
}

static int set_bias(BatchNormObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    return set_vector(self, self->beta, value, "bias", "affine=False");
}

static PyObject *get_grad_gamma(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return view_or_none(self->grad_gamma);
}

static PyObject *get_grad_beta(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return view_or_none(self->grad_beta);
}

static PyObject *get_num_batches_tracked(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->num_batches_tracked);
}

static PyObject *get_num_features(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->num_features);
}

static PyObject *get_affine(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->affine);
}

static PyObject *get_track_running_stats(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->track_running_stats);
}

static PyObject *get_axis(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->axis);
}

static PyObject *get_dtype(BatchNormObject *self, void *Py_UNUSED(closure))
{
    if (check_initialized(self) < 0) {
        return NULL;
    }
    return (PyObject *)PyArray_DescrFromType(self->typenum);
}

static PyObject *get_virtual_batch_size(BatchNormObject *self, void *Py_UNUSED(closure))
{
    if (self->virtual_batch_size == 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(self->virtual_batch_size);
}

static PyObject *get_eps(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(self->eps);
}

static int set_eps(BatchNormObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete eps");
        return -1;
    }
    return bn_parse_eps(value, &self->eps);
}

static PyObject *get_momentum(BatchNormObject *self, void *Py_UNUSED(closure))
{
    if (self->momentum_is_none) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(self->momentum);
}

static int set_momentum(BatchNormObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    double momentum;
    int is_none;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete momentum");
        return -1;
    }
    if (bn_parse_momentum(value, &momentum, &is_none) < 0) {
        return -1;
    }
    self->momentum = momentum;
    self->momentum_is_none = is_none;
    return 0;
}

static PyObject *get_training(BatchNormObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->training);
}

static int set_training(BatchNormObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete training");
        return -1;
    }
    return bn_parse_bool(value, "training", &self->training);
}

#define GETTER(name, doc) {#name, (getter)get_##name, NULL, PyDoc_STR(doc), NULL}
#define GETSETTER(name, doc) {#name, (getter)get_##name, (setter)set_##name, PyDoc_STR(doc), NULL}

static PyGetSetDef BatchNorm_getset[] = {
    GETSETTER(gamma, "Scale, shape (C,), sharing the layer's memory; None when affine=False."),
    GETSETTER(beta, "Shift, shape (C,), sharing the layer's memory; None when affine=False."),
    {"weight", (getter)get_gamma, (setter)set_weight,
     PyDoc_STR("gamma under PyTorch's name: the same memory."), NULL},
    {"bias", (getter)get_beta, (setter)set_bias,
     PyDoc_STR("beta under PyTorch's name: the same memory."), NULL},
    GETSETTER(running_mean, "Running mean, shape (C,); None when track_running_stats=False."),
    GETSETTER(running_var,
              "Running unbiased variance, shape (C,); None when track_running_stats=False."),
    GETTER(grad_gamma, "dL/dgamma of the last backward, shape (C,); None before one."),
    GETTER(grad_beta, "dL/dbeta of the last backward, shape (C,); None before one."),
    GETTER(num_batches_tracked, "Number of training batches the running statistics saw."),
    GETTER(num_features, "C, the number of features."),
    GETTER(affine, "Whether the layer has gamma and beta."),
    GETTER(track_running_stats, "Whether the layer keeps running statistics."),
    GETTER(axis, "The feature axis of the input (negative counts from the end)."),
    GETTER(dtype, "The dtype of the parameters and of the outputs."),
    GETTER(virtual_batch_size, "Samples per virtual batch (consecutive along axis 0, each "
                               "normalized with its own statistics), or None."),
    GETSETTER(eps, "The constant added to the variance, > 0."),
    GETSETTER(momentum, "Weight of the new batch in the running statistics, in [0, 1], "
                        "or None for a cumulative average."),
    GETSETTER(training, "True in training mode, False in eval mode."),
    {NULL, NULL, NULL, NULL, NULL},
};

/* ---- pickle, copy, repr -------------------------------------------------- */

static PyObject *momentum_object(BatchNormObject *self)
{
    return get_momentum(self, NULL);
}

static PyObject *BatchNorm_reduce(BatchNormObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_initialized(self) < 0) {
        return NULL;
    }
    PyObject *momentum = NULL, *args = NULL, *state_dict = NULL, *state = NULL;
    PyObject *dict = NULL, *result = NULL;
    PyObject *dtype_name = PyUnicode_FromString(self->typenum == NPY_FLOAT ? "float32"
                                                                          : "float64");
    momentum = momentum_object(self);
    if (dtype_name == NULL || momentum == NULL) {
        goto done;
    }
    args = Py_BuildValue("(ndOOOiO)", (Py_ssize_t)self->num_features, self->eps, momentum,
                         self->affine ? Py_True : Py_False,
                         self->track_running_stats ? Py_True : Py_False, self->axis,
                         dtype_name);
    state_dict = BatchNorm_state_dict(self, NULL);
    if (args == NULL || state_dict == NULL) {
        goto done;
    }
    state = Py_BuildValue("{sOsOsOsO}", "training", self->training ? Py_True : Py_False,
                          "state_dict", state_dict,
                          "grad_gamma", self->grad_gamma ? (PyObject *)self->grad_gamma : Py_None,
                          "grad_beta", self->grad_beta ? (PyObject *)self->grad_beta : Py_None);
    if (state == NULL) {
        goto done;
    }
    if (self->virtual_batch_size > 0) {
        PyObject *size = PyLong_FromSsize_t(self->virtual_batch_size);
        int status = size == NULL ? -1 : PyDict_SetItemString(state, "virtual_batch_size", size);
        Py_XDECREF(size);
        if (status < 0) {
            goto done;
        }
    }
    /* the instance dict of a Python subclass travels too */
    dict = PyObject_GenericGetDict((PyObject *)self, NULL);
    if (dict == NULL) {
        PyErr_Clear();
    }
    else if (PyDict_SetItemString(state, "__dict__", dict) < 0) {
        goto done;
    }
    result = PyTuple_Pack(3, (PyObject *)Py_TYPE(self), args, state);

done:
    Py_XDECREF(dtype_name);
    Py_XDECREF(momentum);
    Py_XDECREF(args);
    Py_XDECREF(state_dict);
    Py_XDECREF(state);
    Py_XDECREF(dict);
    return result;
}

/* *slot <- a checked (C,) copy of value, or NULL for None */
static int read_gradient(BatchNormObject *self, PyObject *value, const char *name,
                         PyArrayObject **slot)
{
    if (value == NULL || value == Py_None) {
        *slot = NULL;
        return 0;
    }
    PyArrayObject *arr = bn_as_vector(value, self->typenum, self->num_features, name);
    if (arr == NULL) {
        return -1;
    }
    if (!self->affine) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be None for a layer without gamma and beta (affine=False)", name);
        Py_DECREF(arr);
        return -1;
    }
    *slot = (PyArrayObject *)PyArray_NewCopy(arr, NPY_CORDER);
    Py_DECREF(arr);
    return *slot == NULL ? -1 : 0;
}

static PyObject *BatchNorm_setstate(BatchNormObject *self, PyObject *state)
{
    if (check_initialized(self) < 0) {
        return NULL;
    }
    if (!PyDict_Check(state)) {
        PyErr_SetString(PyExc_TypeError, "BatchNorm.__setstate__ expects a dict");
        return NULL;
    }
    bn_loaded v = {0};
    PyArrayObject *grad_gamma = NULL, *grad_beta = NULL;
    PyObject *training = PyDict_GetItemString(state, "training");     /* borrowed */
    PyObject *state_dict = PyDict_GetItemString(state, "state_dict"); /* borrowed */
    PyObject *dict = PyDict_GetItemString(state, "__dict__");         /* borrowed */
    PyObject *virtual_obj = PyDict_GetItemString(state, "virtual_batch_size"); /* borrowed */
    npy_intp virtual_batch_size = 0;
    int mode;
    if (training == NULL || state_dict == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "BatchNorm.__setstate__: state lacks 'training' or 'state_dict'");
        goto fail;
    }
    if (bn_parse_bool(training, "training", &mode) < 0
        || parse_virtual_batch_size(virtual_obj ? virtual_obj : Py_None, &virtual_batch_size) < 0
        || read_state(self, state_dict, NULL, &v) < 0
        || read_gradient(self, PyDict_GetItemString(state, "grad_gamma"), "grad_gamma",
                         &grad_gamma) < 0
        || read_gradient(self, PyDict_GetItemString(state, "grad_beta"), "grad_beta",
                         &grad_beta) < 0) {
        goto fail;
    }
    if (dict != NULL) {
        PyObject *own = PyObject_GenericGetDict((PyObject *)self, NULL);
        if (own == NULL || PyDict_Update(own, dict) < 0) {
            Py_XDECREF(own);
            goto fail;
        }
        Py_DECREF(own);
    }
    lock_layer(self);
    apply_state(self, &v);
    self->training = mode;
    self->virtual_batch_size = virtual_batch_size;
    PyArrayObject *old_grad_gamma = self->grad_gamma, *old_grad_beta = self->grad_beta;
    self->grad_gamma = grad_gamma;
    self->grad_beta = grad_beta;
    unlock_layer(self);
    loaded_clear(&v);
    Py_XDECREF(old_grad_gamma);
    Py_XDECREF(old_grad_beta);
    Py_RETURN_NONE;

fail:
    loaded_clear(&v);
    Py_XDECREF(grad_gamma);
    Py_XDECREF(grad_beta);
    return NULL;
}

static PyObject *BatchNorm_repr(BatchNormObject *self)
{
    PyObject *name = PyObject_GetAttrString((PyObject *)Py_TYPE(self), "__name__");
    if (name == NULL) {
        return NULL;
    }
    if (!self->initialized) {
        PyObject *r = PyUnicode_FromFormat("<uninitialized %U>", name);
        Py_DECREF(name);
        return r;
    }
    PyObject *eps = PyFloat_FromDouble(self->eps), *momentum = momentum_object(self);
    PyObject *result = NULL;
    PyObject *groups = self->virtual_batch_size == 0
        ? PyUnicode_FromString("")
        : PyUnicode_FromFormat(", virtual_batch_size=%zd", (Py_ssize_t)self->virtual_batch_size);
    if (eps != NULL && momentum != NULL && groups != NULL) {
        result = PyUnicode_FromFormat(
            "%U(%zd, eps=%R, momentum=%R, affine=%s, track_running_stats=%s, axis=%d, "
            "dtype='%s', training=%s%U)",
            name, (Py_ssize_t)self->num_features, eps, momentum,
            self->affine ? "True" : "False", self->track_running_stats ? "True" : "False",
            self->axis, self->typenum == NPY_FLOAT ? "float32" : "float64",
            self->training ? "True" : "False", groups);
    }
    Py_DECREF(name);
    Py_XDECREF(eps);
    Py_XDECREF(momentum);
    Py_XDECREF(groups);
    return result;
}

/* ---- the type ------------------------------------------------------------ */

static PyMethodDef BatchNorm_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))BatchNorm_forward, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("forward($self, x, *, out=None)\n--\n\n"
               "Normalize x per feature along the layer's axis. In training mode with the\n"
               "batch statistics (updating the running statistics when tracked); in eval\n"
               "mode with the running statistics (or the batch statistics when they are\n"
               "not tracked). Keeps what backward needs. y has x's shape and the layer's\n"
               "dtype and, when x is dense in any axis order, x's strides; out, when given,\n"
               "is a writable array to write y to (x is read in out's layout).")},
    {"backward", (PyCFunction)(void (*)(void))BatchNorm_backward, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("backward($self, dy, *, out=None)\n--\n\n"
               "Gradient of the last forward for upstream gradient dy (its input's shape).\n"
               "Sets grad_gamma and grad_beta (overwritten, not accumulated).")},
    {"train", (PyCFunction)(void (*)(void))BatchNorm_train, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("train($self, mode=True)\n--\n\n"
               "Set training mode (mode=False: eval mode); returns the layer.")},
    {"eval", (PyCFunction)BatchNorm_eval, METH_NOARGS,
     PyDoc_STR("eval($self)\n--\n\n"
               "Set eval mode (normalize with the running statistics); returns the layer.")},
    {"state_dict", (PyCFunction)BatchNorm_state_dict, METH_NOARGS,
     PyDoc_STR("state_dict($self)\n--\n\nCopies of gamma, beta (when affine), running_mean,\n"
               "running_var and num_batches_tracked (when tracked).")},
    {"load_state_dict", (PyCFunction)(void (*)(void))BatchNorm_load_state_dict,
     METH_METHOD | METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("load_state_dict($self, state, /, strict=True)\n--\n\n"
               "Copy in a state dict (PyTorch's 'weight' and 'bias' are accepted for gamma\n"
               "and beta) after checking keys, shapes and finiteness; on any error the layer\n"
               "is left unchanged. strict=True: a missing or unknown key is an error;\n"
               "strict=False loads the keys it knows and reports the others. Without\n"
               "num_batches_tracked (an old checkpoint) the counter loads as 0. Returns\n"
               "IncompatibleKeys(missing_keys, unexpected_keys), as PyTorch does.")},
    {"reset_running_stats", (PyCFunction)BatchNorm_reset_running_stats, METH_NOARGS,
     PyDoc_STR("reset_running_stats($self)\n--\n\n"
               "running_mean <- 0, running_var <- 1, num_batches_tracked <- 0.")},
    {"reset_parameters", (PyCFunction)BatchNorm_reset_parameters, METH_NOARGS,
     PyDoc_STR("reset_parameters($self)\n--\n\n"
               "reset_running_stats(), and gamma <- 1, beta <- 0.")},
    {"calibrate", (PyCFunction)BatchNorm_calibrate, METH_O,
     PyDoc_STR("calibrate($self, batches, /)\n--\n\n"
               "Set running_mean and running_var to the exact mean and unbiased variance\n"
               "of all the values each feature sees in `batches` (an iterable of inputs),\n"
               "merged batch by batch. Leaves gamma, beta, the mode and\n"
               "num_batches_tracked alone; on any rejected batch the layer is unchanged.\n"
               "Returns the layer.")},
    {"_stats_of", (PyCFunction)(void (*)(void))BatchNorm_stats_of, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("_stats_of($self, batches, *, shift=None, name='batch')\n--\n\n"
               "(C, 3) float64 partial statistics (count, mean, m2) of the batches less\n"
               "shift (C,), merged in order: the means are relative to the shift.\n"
               "Errors name a batch `name`. Changes nothing.")},
    {"_set_running_from_stats", (PyCFunction)(void (*)(void))BatchNorm_set_running_from_stats,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("_set_running_from_stats($self, stats, *, shift=None)\n--\n\n"
               "Running statistics <- mean (+ shift) and unbiased variance of (C, 3)\n"
               "partials.")},
    {"_forward_from_stats", (PyCFunction)(void (*)(void))BatchNorm_forward_from_stats,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("_forward_from_stats($self, x, stats, *, shift=None, moments=None, out=None)\n"
               "--\n\n"
               "A batch-statistics forward that normalizes with (C, 3) partials gathered\n"
               "elsewhere (x's among them; means relative to shift), updating the\n"
               "running statistics with them in training mode. moments, a (2, C) mean\n"
               "and invstd, replaces what y is normalized with (BatchRenorm's).")},
    {"_grad_sums", (PyCFunction)BatchNorm_grad_sums, METH_O,
     PyDoc_STR("_grad_sums($self, dy, /)\n--\n\n"
               "(2, C) float64: this input's sum of dy * xhat and of dy, for the last\n"
               "forward. Changes nothing.")},
    {"_backward_from_sums", (PyCFunction)(void (*)(void))BatchNorm_backward_from_sums,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("_backward_from_sums($self, dy, sums, local_sums, *, out=None)\n--\n\n"
               "dx for the last _forward_from_stats from (2, C) sums over all its values;\n"
               "grad_gamma and grad_beta <- local_sums, this input's share.")},
    {"__reduce__", (PyCFunction)BatchNorm_reduce, METH_NOARGS, NULL},
    {"__setstate__", (PyCFunction)BatchNorm_setstate, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(BatchNorm_doc,
"BatchNorm(num_features, eps=1e-05, momentum=0.1, affine=True,\n"
"          track_running_stats=True, axis=1, dtype='float32', *, training=True,\n"
"          virtual_batch_size=None)\n"
"--\n"
"\n"
"Batch normalization over every axis but the feature axis `axis`:\n"
"y = gamma * (x - mean) / sqrt(var + eps) + beta, per feature.\n"
"\n"
"momentum follows PyTorch: running = (1 - momentum) * running + momentum * batch;\n"
"momentum=None keeps a cumulative average. running_var holds the unbiased\n"
"variance; the biased one normalizes.\n"
"\n"
"virtual_batch_size=k splits axis 0 into consecutive groups of k samples, each\n"
"normalized with its own statistics whenever batch statistics are used; the\n"
"running statistics take the mean over the groups of their means and unbiased\n"
"variances, once per call.");

static PyType_Slot BatchNorm_slots[] = {
    {Py_tp_doc, (void *)BatchNorm_doc},
    {Py_tp_new, BatchNorm_new},
    {Py_tp_init, BatchNorm_init},
    {Py_tp_dealloc, BatchNorm_dealloc},
    {Py_tp_traverse, BatchNorm_traverse},
    {Py_tp_clear, BatchNorm_clear},
    {Py_tp_call, BatchNorm_call},
    {Py_tp_repr, BatchNorm_repr},
    {Py_tp_methods, BatchNorm_methods},
    {Py_tp_getset, BatchNorm_getset},
    {0, NULL},
};

PyType_Spec bn_batchnorm_spec = {
    .name = "bnpy.BatchNorm",
    .basicsize = sizeof(BatchNormObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = BatchNorm_slots,
};
