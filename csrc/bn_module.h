/* bn_module.h -- what the files of the CPython binding share.
 *
 * The binding converts arguments, checks them, raises errors, releases the
 * GIL and calls the kernels of core/bn.h. It holds no mathematics.
 *
 *   bn_convert.c     arguments -> C values and well-formed NumPy arrays
 *   bn_dispatch.c    one function per kernel family: pick the dtype, drop the GIL
 *   bn_layer.c       the bnpy.BatchNorm type (bn_layer.h)
 *   bn_layer_stats.c its statistics gathered elsewhere: calibrate, SyncBatchNorm hooks
 *   bn_layer_groups.c its virtual batches
 *   bn_functional.c  the stateless functional API
 *   bn_module.c      module definition and multi-phase initialization
 */
#ifndef BNPY_BN_MODULE_H
#define BNPY_BN_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL bnpy_ARRAY_API
#ifndef BNPY_MODULE_OWNS_NUMPY_API
#define NO_IMPORT_ARRAY
#endif
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>
#include <numpy/npy_2_compat.h>

#include "bn.h"

/* ---- module state -------------------------------------------------------- */

typedef struct {
    PyObject *batchnorm_type;         /* bnpy.BatchNorm, a heap type */
    PyObject *incompatible_keys_type; /* namedtuple (missing_keys, unexpected_keys) */
} bn_module_state;

/* ---- bn_convert.c -------------------------------------------------------- */

/* Where the features lie in an input: the [outer][C][inner] view. */
typedef struct {
    int axis;       /* resolved, 0 <= axis < ndim */
    bn_shape shape; /* outer, channels, inner */
} bn_layout;

/* Validators of constructor and setter arguments; each raises an error that
 * names the argument and returns -1 on failure, 0 on success. */
/* obj as a C long long if it is an integer (a Python or NumPy integer, not a
 * bool): TypeError otherwise, ValueError when it does not fit. */
int bn_parse_integer(PyObject *obj, const char *name, long long *out);
int bn_parse_num_features(PyObject *obj, npy_intp *out);
int bn_parse_eps(PyObject *obj, double *out);
int bn_parse_momentum(PyObject *obj, double *out, int *is_none); /* None allowed */
int bn_parse_bool(PyObject *obj, const char *name, int *out);
int bn_parse_axis(PyObject *obj, int *out);
int bn_parse_dtype(PyObject *obj, int *typenum); /* NPY_FLOAT or NPY_DOUBLE */

/* The type a functional call computes in: float32, float64, float16 and
 * bfloat16 inputs keep their own (halves are read and written as they are,
 * computed in double), any other real input computes in float64. -1 and
 * TypeError for complex, object, string and other non-real inputs. */
int bn_compute_typenum(PyObject *obj, const char *name);
/* Half precision: float16, and bfloat16 (ml_dtypes', a dtype registered at
 * run time, recognized by name once an array of it is seen). The kernels
 * read and write halves in their own format, with parameters and statistics
 * in float32 (bn.h). */
int bn_is_half(int typenum);
/* the dtype of gamma, beta and the statistics for data of typenum: float32
 * for halves, else typenum itself */
int bn_param_typenum(int typenum);
/* obj as a new reference to a C-contiguous, aligned, native-order array of
 * typenum (a copy only when needed): vectors and tables of statistics.
 * TypeError for non-real input. */
PyArrayObject *bn_as_array(PyObject *obj, int typenum, const char *name);

/* 1 when arr's elements fill one block of memory with positive steps, in
 * some order of its axes (C or Fortran order, a channels-last tensor seen as
 * NCHW, any transpose of those): what the kernels can run on as it is. */
int bn_is_dense(PyArrayObject *arr);

/* 1 when a and b have the same shape and the same strides on every axis
 * longer than 1 (or hold nothing): one element at one offset in both. */
int bn_same_layout(PyArrayObject *a, PyArrayObject *b);

/* A data input (x, dy, a batch) as a new reference to an aligned,
 * native-order, dense array of typenum: obj's own memory when it is one,
 * whatever its axis order (the kernels run on it as it lies), or a
 * C-contiguous copy.
 * Unless source is NULL, *source <- a new reference to obj as an array before
 * any conversion (obj itself when it is an ndarray): the caller's memory,
 * which the result may be a copy of. NULL and TypeError for non-real input. */
PyArrayObject *bn_as_data(PyObject *obj, int typenum, const char *name, PyArrayObject **source);

/* bn_as_data in the dtype a stateless function computes x in (that of
 * bn_compute_typenum), obj converted to an array once */
PyArrayObject *bn_as_compute_data(PyObject *obj, const char *name);

/* bn_as_data for a layer of layer_typenum: a float32 layer keeps float16 and
 * bfloat16 input as it is, and takes anything else as float32; a float64
 * layer takes float64. obj is converted to an array once. */
PyArrayObject *bn_as_layer_data(PyObject *obj, int layer_typenum, const char *name,
                                PyArrayObject **source);

/* *arr <- a copy in like's layout when it has like's shape and another
 * layout (the kernels read arrays of one layout together). -1 on error. */
int bn_relayout(PyArrayObject **arr, PyArrayObject *like);

/* bn_relayout(x, out) when out is a dense ndarray: y is written in out's
 * layout, so x is read in it. */
int bn_relayout_to_out(PyArrayObject **x, PyObject *out);

/* obj as a new (C,) array of typenum; ValueError naming `name` on another shape. */
PyArrayObject *bn_as_vector(PyObject *obj, int typenum, npy_intp channels, const char *name);

/* ValueError unless out shares no memory with arr (an input the kernel reads
 * while it writes out); names the input. */
int bn_check_separate(PyArrayObject *out, PyArrayObject *arr, const char *name);

/* Resolve `axis` for x (ndim >= 2) and fill the layout. When channels > 0 the
 * feature axis must have that length. ValueError with the shape otherwise. */
int bn_get_layout(PyArrayObject *x, int axis, npy_intp channels, bn_layout *layout);

/* Training needs more than one value per feature: ValueError otherwise. */
int bn_check_batch_size(PyArrayObject *x, const bn_layout *layout, const char *when);

/* The output array for an input shaped like `like` (dense): `out` itself (a
 * new reference) after checking it is a writable, aligned, native-order
 * ndarray of like's shape, layout (bn_same_layout) and typenum that does not
 * partly overlap `like`; or a new array in like's layout when out is NULL or
 * None. */
PyArrayObject *bn_output_like(PyObject *out, PyArrayObject *like, int typenum);

/* 1 when the data of a and b overlap in memory, 0 otherwise. */
int bn_arrays_overlap(PyArrayObject *a, PyArrayObject *b);

/* 1 when the bytes spanned by a and by b (any strides) overlap: they may
 * share memory. 0 when they certainly do not. */
int bn_may_share_memory(PyArrayObject *a, PyArrayObject *b);

/* 1 when a and b have the same shape. */
int bn_same_shape(PyArrayObject *a, PyArrayObject *b);

/* A new empty array of shape (n,) or (rows, n) of typenum. */
PyArrayObject *bn_new_vector(int typenum, npy_intp n);
PyArrayObject *bn_new_matrix(int typenum, npy_intp rows, npy_intp n);

/* n * size bytes of scratch for `what` (PyMem_Free it); NULL with a
 * MemoryError that says how much was asked for and for what. */
void *bn_new_scratch(size_t n, size_t size, const char *what);

/* 1 when an input of shape s holds no values: no kernel needs to run. */
static inline int bn_shape_is_empty(bn_shape s)
{
    return s.outer == 0 || s.channels == 0 || s.inner == 0;
}

/* ---- bn_dispatch.c ------------------------------------------------------- */
/* Each function picks the kernel for x's dtype (float32, float64, float16
 * or bfloat16: BN_CALL_TYPED) and runs it without the GIL. Arrays are well
 * formed (bn_as_array, bn_output_like); gamma and beta may be NULL. double
 * buffers have length C. */

/* bn_<fn>_<suffix>(...) without the GIL, for the element type of the array
 * `data`: float32, float64, float16 or else bfloat16 (whose parameters are
 * float32: bn_param_typenum) */
#define BN_CALL_TYPED(data, fn, ...)                                                           \
    do {                                                                                    \
        int type_ = PyArray_TYPE(data);                                                     \
        Py_BEGIN_ALLOW_THREADS                                                              \
        if (type_ == NPY_FLOAT) {                                                           \
            fn##_f32(__VA_ARGS__);                                                          \
        }                                                                                   \
        else if (type_ == NPY_DOUBLE) {                                                     \
            fn##_f64(__VA_ARGS__);                                                          \
        }                                                                                   \
        else if (type_ == NPY_HALF) {                                                       \
            fn##_f16(__VA_ARGS__);                                                          \
        }                                                                                   \
        else {                                                                              \
            fn##_bf16(__VA_ARGS__);                                                         \
        }                                                                                   \
        Py_END_ALLOW_THREADS                                                                \
    } while (0)

/* statistics of x less shift[C] (or NULL) */
void bn_run_stats(bn_partial *stats, double *work, PyArrayObject *x, const double *shift,
                  bn_shape s);
void bn_run_running_moments(double *mean, double *invstd, PyArrayObject *running_mean,
                            PyArrayObject *running_var, double eps);
void bn_run_update_running(PyArrayObject *running_mean, PyArrayObject *running_var,
                           const bn_partial *stats, double momentum);
/* training mode: batch statistics (stats, mean, invstd) and y together */
void bn_run_forward_train(PyArrayObject *y, bn_partial *stats, double *mean, double *invstd,
                          double *work, PyArrayObject *x, PyArrayObject *gamma,
                          PyArrayObject *beta, double eps, bn_shape s);
void bn_run_forward(PyArrayObject *y, double *work, PyArrayObject *x, const double *mean,
                    const double *invstd, PyArrayObject *gamma, PyArrayObject *beta,
                    bn_shape s);
/* dx, and dgamma/dbeta as double sums; training picks the gradient formula. */
void bn_run_backward(PyArrayObject *dx, double *dgamma, double *dbeta, double *work,
                     PyArrayObject *dy, PyArrayObject *x, const double *mean,
                     const double *invstd, PyArrayObject *gamma, bn_shape s, int training);
/* Workspace for the kernels on shape s (PyMem_Free it); NULL with MemoryError. */
double *bn_new_workspace(bn_shape s);
void bn_run_set_running(PyArrayObject *running_mean, PyArrayObject *running_var,
                        const bn_partial *stats);
/* the two halves of bn_run_backward, for sums gathered elsewhere */
void bn_run_grad_sums(double *dgamma, double *dbeta, double *work, PyArrayObject *dy,
                      PyArrayObject *x, const double *mean, const double *invstd, bn_shape s);
void bn_run_backward_dx(PyArrayObject *dx, double *work, PyArrayObject *dy, PyArrayObject *x,
                        const double *mean, const double *invstd, PyArrayObject *gamma,
                        const double *dgamma, const double *dbeta, double count, bn_shape s,
                        int training);
/* out (a float32 or float64 array) <- values rounded to its dtype */
void bn_run_from_double(PyArrayObject *out, const double *values);
/* A new (C,) array of typenum holding values rounded from double. */
PyArrayObject *bn_vector_from_double(int typenum, const double *values, npy_intp n);

/* ---- bn_layer.c, bn_functional.c ------------------------------------------ */

extern PyType_Spec bn_batchnorm_spec;
extern PyMethodDef bn_functional_methods[];
extern PyMethodDef bn_family_methods[]; /* private kernels of bnpy.family (bn_family.c) */
extern PyMethodDef bn_stats_methods[]; /* module functions of bn_layer_stats.c */

#endif /* BNPY_BN_MODULE_H */
