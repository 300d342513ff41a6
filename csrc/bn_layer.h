/* bn_layer.h -- the BatchNorm object, shared by the files that implement it:
 *   bn_layer.c        construction, forward, backward, state, pickle, the type
 *   bn_layer_stats.c  statistics gathered elsewhere: calibrate, and the hooks
 *                     bnpy.distributed.SyncBatchNorm builds on
 *   bn_layer_groups.c virtual batches (virtual_batch_size)
 */
#ifndef BNPY_BN_LAYER_H
#define BNPY_BN_LAYER_H

#include "bn_module.h"

/* What backward needs from the last forward. */
typedef struct {
    PyArrayObject *x;       /* the input, C-contiguous in the layer's dtype; NULL before any forward */
    PyArrayObject *moments; /* (2, C) float64: the mean and invstd that forward normalized with */
    bn_shape shape;         /* x as [outer][C][inner] */
    int batch_stats;        /* 1 when the moments were batch statistics (x's own, or
                               gathered across processes with x's among them) */
    double count;           /* values per feature those statistics came from */
    npy_intp groups;        /* virtual batches: moments is then (2 * groups, C), each
                               group's mean and invstd; 1 (or 0) for the whole input */
} bn_saved;

typedef struct {
    PyObject_HEAD
    /* Serializes this layer's forward, backward and state changes: they read
     * and write its buffers while the GIL is released. Taken only after the
     * arguments are converted (which may run Python code) and everything the
     * call allocates is allocated. */
    PyThread_type_lock lock;
    /* configuration, fixed by __init__ */
    int initialized;
    npy_intp num_features;
    int affine;
    int track_running_stats;
    int axis;    /* as given: may be negative */
    int typenum; /* NPY_FLOAT or NPY_DOUBLE */
    npy_intp virtual_batch_size; /* samples per virtual batch; 0: the whole batch */
    /* settable configuration */
    double eps;
    double momentum;
    int momentum_is_none; /* cumulative average: momentum = 1 / num_batches_tracked */
    int training;
    /* state: (C,) arrays of the layer's dtype, or NULL */
    PyArrayObject *gamma, *beta;               /* NULL unless affine */
    PyArrayObject *running_mean, *running_var; /* NULL unless track_running_stats */
    long long num_batches_tracked;
    PyArrayObject *grad_gamma, *grad_beta;     /* NULL until a backward */
    bn_saved saved;
} BatchNormObject;

#define CHANNELS(self) ((size_t)(self)->num_features)

/* Take the layer's lock, letting other threads run while it waits. */
static inline void lock_layer(BatchNormObject *self)
{
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static inline void unlock_layer(BatchNormObject *self)
{
    PyThread_release_lock(self->lock);
}

static inline int check_initialized(BatchNormObject *self)
{
    if (!self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "BatchNorm.__init__ has not been called");
        return -1;
    }
    return 0;
}

/* What a forward prepares before it takes the layer's lock: every reference
 * is owned by the struct (bn_forward_call_clear releases them). */
typedef struct {
    PyArrayObject *x;       /* the input in the layer's dtype */
    PyArrayObject *y;       /* where the kernels write: out (checked), a new output,
                               or a private buffer standing in for out (below) */
    PyArrayObject *out;     /* the caller's out when y stands in for it: a training
                               forward may fail after writing y, and this out overlaps
                               memory a failed call must leave as it was; NULL otherwise */
    PyArrayObject *saved_x; /* for backward: x, a copy of it (training in place),
                               or NULL (inference in place: no backward) */
    PyArrayObject *moments; /* (2, C) float64 */
    PyArrayObject *running[2]; /* training with running statistics: (C,) arrays of the
                                  layer's dtype for the next running mean and variance */
    double *work;           /* bn_workspace_size doubles */
    bn_layout layout;
    int in_place;           /* y is x itself */
} bn_forward_call;

/* Convert x, check it and out, allocate what the call needs. -1 with an
 * error on failure (call is then cleared).
 *
 * The rule for outputs, here for every forward: y may be x itself (in place;
 * a failed training forward then puts x back). Otherwise out must not overlap
 * gamma, beta or the running statistics (ValueError before anything is
 * written); and when a training forward's out overlaps the memory x was
 * converted from or the input the last forward saved for backward, which a
 * failure must leave as they were and cannot restore, y is a private buffer
 * that bn_forward_call_result copies to out once the call has succeeded. */
int bn_layer_prepare_forward(BatchNormObject *self, PyObject *x_obj, PyObject *out_obj,
                             int training, bn_forward_call *call);
void bn_forward_call_clear(bn_forward_call *call);

/* With the lock held, after a training forward failed having written y: when
 * y is x itself, put the caller's x back from the copy saved for backward. */
void bn_forward_call_restore(bn_forward_call *call);

/* With the lock held, once nothing can fail: the output to return (a new
 * reference), copied to the caller's out first when y stood in for it. */
PyArrayObject *bn_forward_call_result(bn_forward_call *call);

/* Keep the new saved values; the old ones go to *old (decref them after
 * unlocking: freeing an array may run arbitrary code). */
void bn_layer_replace_saved(BatchNormObject *self, PyArrayObject *x, PyArrayObject *moments,
                            bn_shape shape, int batch_stats, double count, bn_saved *old);

/* With the lock held, before a training forward that counts its batch writes
 * anything: OverflowError when num_batches_tracked cannot count one more. */
int bn_layer_check_count(BatchNormObject *self);

/* With the lock held: running <- (1 - momentum) * running + momentum * batch,
 * counting the batch. The new values are computed in next[2] (see
 * bn_layer_commit_running) and the layer changes only when they are good. */
int bn_layer_update_running(BatchNormObject *self, const bn_partial *stats,
                            PyArrayObject **next);

/* With the lock held: next[0], next[1] (C,) arrays of the layer's dtype become
 * the running mean and variance, or FloatingPointError naming the features
 * whose values are not finite there (a variance too large for float32, say)
 * and nothing changes: the layer only holds state it can save and reload. */
int bn_layer_commit_running(BatchNormObject *self, PyArrayObject **next);

/* two new (C,) arrays of the layer's dtype in next[2]; -1 with an error */
int bn_layer_new_running(BatchNormObject *self, PyArrayObject **next);

/* 0 when the last forward saved its input for backward; RuntimeError saying
 * why not otherwise (no forward yet, or inference in place). */
int bn_layer_check_saved(BatchNormObject *self);

/* With the lock held, when affine: grad_gamma, grad_beta <- new arrays holding
 * dgamma, dbeta rounded to the layer's dtype; old[2] <- the arrays they
 * replace (NULL when not affine), to decref after unlocking. */
void bn_layer_swap_grads(BatchNormObject *self, PyArrayObject *grad_gamma,
                         PyArrayObject *grad_beta, const double *dgamma, const double *dbeta,
                         PyArrayObject **old);

/* FloatingPointError naming the features whose statistics are not finite */
int bn_layer_check_finite_stats(const bn_partial *stats, size_t channels);

/* ---- bn_layer_groups.c: virtual batches ---------------------------------- */

/* An input's virtual batches: each group's block of up to 3 arrays as views. */
typedef struct {
    npy_intp count;            /* number of groups */
    bn_shape shape;            /* one group's [outer][C][inner] */
    PyArrayObject **views[3];  /* views[a][g]: group g of arrays[a]; NULL when unused */
    double *sums;              /* 3 * C doubles: one group's statistics or gradient sums */
    double *work;              /* the kernels' workspace for one group */
} bn_groups;

/* How many virtual batches x (batch statistics) splits into: 1 without
 * virtual_batch_size; -1 with ValueError when it does not split, when axis 0
 * holds the features or is not outermost in memory, or when a group would
 * hold one value per feature. */
npy_intp bn_groups_of(BatchNormObject *self, PyArrayObject *x, const bn_layout *layout);

/* Views of `count` groups of each of arrays[narrays] (of shape whole) and
 * the scratch the kernels need; -1 with an error (groups then cleared). */
int bn_groups_prepare(bn_groups *groups, npy_intp count, bn_shape whole, PyArrayObject **arrays,
                      int narrays);
void bn_groups_clear(bn_groups *groups);

/* views {y, x}: each group normalized with its own statistics; moments
 * (2G, C) <- each group's mean and invstd; stats <- partials whose mean is the
 * mean of the groups' means and whose m2 / (count - 1) is the mean of their
 * unbiased variances: what the running statistics take. */
void bn_groups_forward(bn_groups *groups, bn_partial *stats, double *moments,
                       PyArrayObject *gamma, PyArrayObject *beta, double eps);

/* views {dx, dy, x}: each group's training backward; dgamma, dbeta summed. */
void bn_groups_backward(bn_groups *groups, double *dgamma, double *dbeta, const double *moments,
                        PyArrayObject *gamma);

/* the methods of bn_layer_stats.c */
PyObject *BatchNorm_calibrate(BatchNormObject *self, PyObject *batches);
PyObject *BatchNorm_stats_of(BatchNormObject *self, PyObject *args, PyObject *kwargs);
PyObject *BatchNorm_set_running_from_stats(BatchNormObject *self, PyObject *args,
                                           PyObject *kwargs);
PyObject *BatchNorm_forward_from_stats(BatchNormObject *self, PyObject *args, PyObject *kwargs);
PyObject *BatchNorm_grad_sums(BatchNormObject *self, PyObject *dy);
PyObject *BatchNorm_backward_from_sums(BatchNormObject *self, PyObject *args, PyObject *kwargs);

#endif /* BNPY_BN_LAYER_H */
