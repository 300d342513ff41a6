/* bn_convert.c -- from Python arguments to checked C values and arrays. */
#include "bn_module.h"

#include <string.h>

#include <math.h>

/* ---- scalar arguments ---------------------------------------------------- */

static int is_bool(PyObject *obj)
{
    return PyBool_Check(obj) || PyArray_IsScalar(obj, Bool);
}

int bn_parse_integer(PyObject *obj, const char *name, long long *out)
{
    if (is_bool(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        return -1;
    }
    int overflow = 0;
    *out = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (*out == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s is out of range, got %R", name, obj);
        return -1;
    }
    return 0;
}

/* obj as a double if it is a real number (not a bool, not a string). */
static int parse_real(PyObject *obj, const char *name, double *out)
{
    if (is_bool(obj) || PyUnicode_Check(obj) || PyBytes_Check(obj)
        || PyComplex_Check(obj) || PyArray_IsScalar(obj, ComplexFloating)) {
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = value;
    return 0;
}

int bn_parse_num_features(PyObject *obj, npy_intp *out)
{
    long long value;
    if (bn_parse_integer(obj, "num_features", &value) < 0) {
        return -1;
    }
    if (value < 1 || value > NPY_MAX_INTP / 16) {
        PyErr_Format(PyExc_ValueError,
                     "num_features must be a positive integer, got %R", obj);
        return -1;
    }
    *out = (npy_intp)value;
    return 0;
}

int bn_parse_eps(PyObject *obj, double *out)
{
    double value;
    if (parse_real(obj, "eps", &value) < 0) {
        return -1;
    }
    if (!(value > 0.0) || !isfinite(value)) {
        PyErr_Format(PyExc_ValueError, "eps must be a positive finite number, got %R", obj);
        return -1;
    }
    *out = value;
    return 0;
}

int bn_parse_momentum(PyObject *obj, double *out, int *is_none)
{
    if (obj == Py_None) {
        *is_none = 1;
        *out = 0.0;
        return 0;
    }
    double value;
    if (parse_real(obj, "momentum", &value) < 0) {
        return -1;
    }
    if (!(value >= 0.0 && value <= 1.0)) {
        PyErr_Format(PyExc_ValueError,
                     "momentum must be a number in [0, 1] or None, got %R", obj);
        return -1;
    }
    *is_none = 0;
    *out = value;
    return 0;
}

int bn_parse_bool(PyObject *obj, const char *name, int *out)
{
    if (!is_bool(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be True or False, got %R", name, obj);
        return -1;
    }
    *out = PyObject_IsTrue(obj);
    return *out < 0 ? -1 : 0;
}

int bn_parse_axis(PyObject *obj, int *out)
{
    long long value;
    if (bn_parse_integer(obj, "axis", &value) < 0) {
        return -1;
    }
    if (value < -NPY_MAXDIMS || value >= NPY_MAXDIMS) {
        PyErr_Format(PyExc_ValueError, "axis must be in [-%d, %d), got %R",
                     NPY_MAXDIMS, NPY_MAXDIMS, obj);
        return -1;
    }
    *out = (int)value;
    return 0;
}

int bn_parse_dtype(PyObject *obj, int *typenum)
{
    PyArray_Descr *descr = NULL;
    int is_name_or_type = PyUnicode_Check(obj) || PyType_Check(obj)
                          || PyArray_DescrCheck(obj);
    if (obj == Py_None || !is_name_or_type) {
        PyErr_Format(PyExc_TypeError,
                     "dtype must be np.float32 or np.float64 (or their names), got %R", obj);
        return -1;
    }
    if (!PyArray_DescrConverter(obj, &descr)) {
        PyErr_Clear();
        descr = NULL;
    }
    int ok = descr != NULL && PyArray_ISNBO(descr->byteorder)
             && (descr->type_num == NPY_FLOAT || descr->type_num == NPY_DOUBLE);
    if (ok) {
        *typenum = descr->type_num;
    }
    Py_XDECREF(descr);
    if (!ok) {
        PyErr_Format(PyExc_ValueError,
                     "dtype must be float32 or float64, got %R", obj);
        return -1;
    }
    return 0;
}

/* ---- arrays -------------------------------------------------------------- */

/* bfloat16's type number, once an array of it has been seen (ml_dtypes
 * registers it at run time); -1 before */
static int bfloat16_typenum = -1;

/* 1 for ml_dtypes' bfloat16: two bytes, of the scalar type named bfloat16 */
static int is_bfloat16(PyArray_Descr *descr)
{
    if (descr->type_num == bfloat16_typenum) {
        return 1;
    }
    const char *name = descr->typeobj != NULL ? descr->typeobj->tp_name : "";
    const char *dot = strrchr(name, '.');
    if (descr->type_num < NPY_USERDEF || PyDataType_ELSIZE(descr) != 2
        || strcmp(dot != NULL ? dot + 1 : name, "bfloat16") != 0) {
        return 0;
    }
    bfloat16_typenum = descr->type_num;
    return 1;
}

int bn_is_half(int typenum)
{
    return typenum == NPY_HALF || (typenum == bfloat16_typenum && typenum >= 0);
}

int bn_param_typenum(int typenum)
{
    return bn_is_half(typenum) ? NPY_FLOAT : typenum;
}

/* 1 for booleans, integers and floats (bfloat16 too): the kinds batch norm
 * accepts. */
static int is_real_kind(PyArray_Descr *descr)
{
    return PyDataType_ISBOOL(descr) || PyDataType_ISINTEGER(descr)
           || PyDataType_ISFLOAT(descr) || is_bfloat16(descr);
}

/* TypeError when obj is a numpy.ma.MaskedArray: the kernels would take the
 * masked-out values into the statistics. 0 otherwise. */
static int reject_masked(PyObject *obj, const char *name)
{
    if (!PyArray_Check(obj) || PyArray_CheckExact(obj)) {
        return 0; /* not an ndarray subclass: the fast path */
    }
    PyObject *ma = PyImport_ImportModule("numpy.ma");
    PyObject *masked_type = ma ? PyObject_GetAttrString(ma, "MaskedArray") : NULL;
    int is_masked = masked_type ? PyObject_IsInstance(obj, masked_type) : -1;
    Py_XDECREF(ma);
    Py_XDECREF(masked_type);
    if (is_masked == 1) {
        PyErr_Format(PyExc_TypeError,
                     "%s is a numpy.ma.MaskedArray: bnpy has no notion of missing values and "
                     "would count the masked-out ones in the statistics; drop them (select "
                     "the rows you mean) or pass np.ma.getdata(%s) to use every value, "
                     "mask ignored", name, name);
    }
    return is_masked == 0 ? 0 : -1;
}

/* A DLPack device as (type, id); kDLCPU is type 1. */
enum { DLPACK_CPU = 1 };

/* TypeError unless obj, which has __dlpack__, can be read on the CPU without a
 * copy: on another device, or a tensor that records gradients (its DLPack
 * export would fail with an obscure message, and bnpy records none). */
static int check_dlpack_source(PyObject *obj, const char *name)
{
    PyObject *requires_grad = PyObject_GetAttrString(obj, "requires_grad");
    int needs_grad = requires_grad ? PyObject_IsTrue(requires_grad) : 0;
    Py_XDECREF(requires_grad);
    PyErr_Clear(); /* no such attribute: not a tensor with autograd */
    if (needs_grad == 1) {
        PyErr_Format(PyExc_TypeError,
                     "%s is a tensor that requires grad: pass %s.detach() (bnpy records no "
                     "autograd history), or use the modules of bnpy.torch, which do",
                     name, name);
        return -1;
    }
    PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (device == NULL) {
        return -1;
    }
    long type = -1, id = -1;
    int parsed = PyTuple_Check(device) && PyArg_ParseTuple(device, "ll", &type, &id);
    PyErr_Clear();
    if (!parsed || type != DLPACK_CPU) {
        PyErr_Format(PyExc_TypeError,
                     "%s lives on DLPack device %R, not the CPU (device type 1): bnpy "
                     "computes on the CPU; copy it there first (for example %s.cpu() for a "
                     "torch tensor, jax.device_get(%s) for a JAX array)",
                     name, device, name, name);
        Py_DECREF(device);
        return -1;
    }
    Py_DECREF(device);
    return 0;
}

/* After np.from_dlpack(obj) failed, with its exception set: obj's __array__
 * when that works (NumPy takes no bfloat16 through DLPack, and JAX's
 * __array__ gives ml_dtypes' bfloat16), else TypeError naming the first
 * failure (with the way around it for bfloat16). */
static PyObject *array_after_dlpack_failed(PyObject *obj, const char *name)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *arr = PyObject_HasAttrString(obj, "__array__")
                        ? PyArray_FromAny(obj, NULL, 0, 0, 0, NULL)
                        : NULL;
    PyErr_Clear();
    if (arr == NULL) {
        PyObject *dtype = PyObject_GetAttrString(obj, "dtype");
        PyObject *text = dtype ? PyObject_Str(dtype) : NULL;
        const char *dtype_name = text ? PyUnicode_AsUTF8(text) : NULL;
        PyErr_Clear();
        int bfloat16 = dtype_name != NULL && strstr(dtype_name, "bfloat16") != NULL;
        PyErr_Format(PyExc_TypeError,
                     "%s cannot be read as a NumPy array: np.from_dlpack(%s) raised %R%s", name,
                     name, value,
                     bfloat16 ? ". NumPy takes no bfloat16 through DLPack: pass an ndarray of "
                                "ml_dtypes.bfloat16 (for a torch tensor t: t.view(torch.int16)"
                                ".numpy().view(ml_dtypes.bfloat16)), or use bnpy.torch's modules"
                              : "");
        Py_XDECREF(text);
        Py_XDECREF(dtype);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return arr;
}

/* obj as an array of its own: np.from_dlpack(obj) (zero-copy) for an object
 * that speaks DLPack and is no ndarray (its __array__ if that fails),
 * PyArray_FromAny otherwise (buffer protocol, __array_interface__,
 * __array__, sequences). */
static PyArrayObject *any_to_array(PyObject *obj, const char *name)
{
    if (PyArray_Check(obj) || !PyObject_HasAttrString(obj, "__dlpack__")) {
        if (reject_masked(obj, name) < 0) {
            return NULL;
        }
        return (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    }
    if (check_dlpack_source(obj, name) < 0) {
        return NULL;
    }
    PyObject *numpy = PyImport_ImportModule("numpy");
    PyObject *arr = numpy ? PyObject_CallMethod(numpy, "from_dlpack", "O", obj) : NULL;
    Py_XDECREF(numpy);
    if (arr == NULL) {
        arr = array_after_dlpack_failed(obj, name);
    }
    if (arr != NULL && !PyArray_Check(arr)) {
        PyErr_Format(PyExc_TypeError, "np.from_dlpack(%s) did not give an ndarray", name);
        Py_CLEAR(arr);
    }
    return (PyArrayObject *)arr;
}

/* Any array-like as an array of its own dtype, checked to be real. */
static PyArrayObject *as_real_array(PyObject *obj, const char *name)
{
    PyArrayObject *arr = any_to_array(obj, name);
    if (arr == NULL) {
        return NULL;
    }
    if (!is_real_kind(PyArray_DESCR(arr))) {
        PyErr_Format(PyExc_TypeError, "%s must hold real numbers, got an array of dtype %R",
                     name, (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* the dtype the kernels compute data of dtype `type` in: its own when they
 * have kernels for it, else float64 */
static int compute_type(int type)
{
    return (type == NPY_FLOAT || type == NPY_DOUBLE || bn_is_half(type)) ? type : NPY_DOUBLE;
}

int bn_compute_typenum(PyObject *obj, const char *name)
{
    PyArrayObject *arr = as_real_array(obj, name);
    if (arr == NULL) {
        return -1;
    }
    int type = PyArray_TYPE(arr);
    Py_DECREF(arr);
    return compute_type(type);
}

int bn_is_dense(PyArrayObject *arr)
{
    /* walk the axes from the smallest stride up: each must step over exactly
       the block the smaller ones fill */
    int ndim = PyArray_NDIM(arr);
    npy_intp block = PyArray_ITEMSIZE(arr);
    int used[NPY_MAXDIMS] = {0};
    if (PyArray_SIZE(arr) == 0) {
        return 1;
    }
    for (int step = 0; step < ndim; step++) {
        int next = -1;
        for (int d = 0; d < ndim; d++) {
            if (!used[d] && PyArray_DIM(arr, d) > 1
                && (next < 0 || PyArray_STRIDE(arr, d) < PyArray_STRIDE(arr, next))) {
                next = d;
            }
        }
        if (next < 0) {
            break; /* only axes of length 1 are left: any stride */
        }
        if (PyArray_STRIDE(arr, next) != block) {
            return 0;
        }
        used[next] = 1;
        block *= PyArray_DIM(arr, next);
    }
    return 1;
}

int bn_same_layout(PyArrayObject *a, PyArrayObject *b)
{
    if (!bn_same_shape(a, b)) {
        return 0;
    }
    for (int d = 0; d < PyArray_NDIM(a); d++) {
        if (PyArray_DIM(a, d) > 1 && PyArray_STRIDE(a, d) != PyArray_STRIDE(b, d)) {
            return PyArray_SIZE(a) == 0;
        }
    }
    return 1;
}

/* A new array of typenum in like's memory order (NumPy's order='K'): dense
 * with like's strides when like is dense. */
static PyArrayObject *new_like(PyArrayObject *like, int typenum)
{
    return (PyArrayObject *)PyArray_NewLikeArray(like, NPY_KEEPORDER,
                                                 PyArray_DescrFromType(typenum), 0);
}

/* A copy of arr as typenum in `like`'s memory order. */
static PyArrayObject *copy_like(PyArrayObject *arr, PyArrayObject *like, int typenum)
{
    PyArrayObject *copy = new_like(like, typenum);
    if (copy != NULL && PyArray_CopyInto(copy, arr) < 0) {
        Py_CLEAR(copy);
    }
    return copy;
}

/* bn_as_data of src, an array of obj's (a reference it takes over) */
static PyArrayObject *data_of(PyArrayObject *src, int typenum, PyArrayObject **source)
{
    /* a copy is C-contiguous: a strided or broadcast input gives the bits
       its C-contiguous copy gives */
    int usable = PyArray_TYPE(src) == typenum && PyArray_ISNOTSWAPPED(src)
                 && PyArray_ISALIGNED(src) && bn_is_dense(src);
    PyArrayObject *result = usable ? (PyArrayObject *)Py_NewRef(src)
                                   : (PyArrayObject *)PyArray_FromArray(
                                         src, PyArray_DescrFromType(typenum),
                                         NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    if (result != NULL && source != NULL) {
        *source = src;
    }
    else {
        Py_DECREF(src);
    }
    return result;
}

PyArrayObject *bn_as_data(PyObject *obj, int typenum, const char *name, PyArrayObject **source)
{
    PyArrayObject *src = as_real_array(obj, name);
    return src == NULL ? NULL : data_of(src, typenum, source);
}

PyArrayObject *bn_as_compute_data(PyObject *obj, const char *name)
{
    PyArrayObject *src = as_real_array(obj, name);
    if (src == NULL) {
        return NULL;
    }
    return data_of(src, compute_type(PyArray_TYPE(src)), NULL);
}

PyArrayObject *bn_as_layer_data(PyObject *obj, int layer_typenum, const char *name,
                                PyArrayObject **source)
{
    PyArrayObject *src = as_real_array(obj, name);
    if (src == NULL) {
        return NULL;
    }
    int keep_half = layer_typenum == NPY_FLOAT && bn_is_half(PyArray_TYPE(src));
    return data_of(src, keep_half ? PyArray_TYPE(src) : layer_typenum, source);
}

int bn_relayout(PyArrayObject **arr, PyArrayObject *like)
{
    if (!bn_same_shape(*arr, like) || bn_same_layout(*arr, like)) {
        return 0;
    }
    PyArrayObject *copy = copy_like(*arr, like, PyArray_TYPE(*arr));
    if (copy == NULL) {
        return -1;
    }
    Py_SETREF(*arr, copy);
    return 0;
}

int bn_relayout_to_out(PyArrayObject **x, PyObject *out)
{
    if (out == NULL || !PyArray_Check(out) || !bn_is_dense((PyArrayObject *)out)) {
        return 0; /* bn_output_like says what is wrong with it */
    }
    return bn_relayout(x, (PyArrayObject *)out);
}

PyArrayObject *bn_as_array(PyObject *obj, int typenum, const char *name)
{
    PyArrayObject *source = as_real_array(obj, name);
    if (source == NULL) {
        return NULL;
    }
    /* a well-formed view of the source, or a converted copy; steals the descr */
    PyObject *result = PyArray_FromArray(source, PyArray_DescrFromType(typenum),
                                         NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    Py_DECREF(source);
    return (PyArrayObject *)result;
}

/* the shape of arr as a tuple, for error messages */
static PyObject *shape_tuple(PyArrayObject *arr)
{
    int ndim = PyArray_NDIM(arr);
    PyObject *tuple = PyTuple_New(ndim);
    if (tuple == NULL) {
        return NULL;
    }
    for (int d = 0; d < ndim; d++) {
        PyObject *dim = PyLong_FromSsize_t(PyArray_DIM(arr, d));
        if (dim == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, d, dim);
    }
    return tuple;
}

/* raise `exc` with a message that ends in arr's shape: "... (8, 32)" */
static void raise_with_shape(PyObject *exc, PyArrayObject *arr, const char *message)
{
    PyObject *shape = shape_tuple(arr);
    if (shape != NULL) {
        PyErr_Format(exc, "%s%R", message, shape);
        Py_DECREF(shape);
    }
}

PyArrayObject *bn_as_vector(PyObject *obj, int typenum, npy_intp channels, const char *name)
{
    PyArrayObject *arr = bn_as_array(obj, typenum, name);
    if (arr == NULL) {
        return NULL;
    }
    if (PyArray_NDIM(arr) != 1 || PyArray_DIM(arr, 0) != channels) {
        PyObject *shape = shape_tuple(arr);
        if (shape != NULL) {
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zd,), got shape %R",
                         name, (Py_ssize_t)channels, shape);
            Py_DECREF(shape);
        }
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

int bn_get_layout(PyArrayObject *x, int axis, npy_intp channels, bn_layout *layout)
{
    int ndim = PyArray_NDIM(x);
    if (ndim < 2) {
        raise_with_shape(PyExc_ValueError, x,
                         "expected an input with at least 2 dimensions, got input of shape ");
        return -1;
    }
    int resolved = axis < 0 ? axis + ndim : axis;
    if (resolved < 0 || resolved >= ndim) {
        char message[96];
        PyOS_snprintf(message, sizeof message,
                      "axis %d is out of bounds for input of shape ", axis);
        raise_with_shape(PyExc_ValueError, x, message);
        return -1;
    }
    npy_intp features = PyArray_DIM(x, resolved);
    if (channels > 0 && features != channels) {
        char message[128];
        PyOS_snprintf(message, sizeof message,
                      "expected %zd features on axis %d, got input of shape ",
                      (Py_ssize_t)channels, axis);
        raise_with_shape(PyExc_ValueError, x, message);
        return -1;
    }
    layout->axis = resolved;
    layout->shape.outer = 1;
    layout->shape.channels = (size_t)features;
    layout->shape.inner = 1;
    /* x is dense: the axes whose steps are smaller than the feature axis's
       make the inner block, the others the outer one, in memory order. With
       one feature every axis counts as outer. */
    npy_intp feature_stride = PyArray_STRIDE(x, resolved);
    for (int d = 0; d < ndim; d++) {
        size_t dim = (size_t)PyArray_DIM(x, d);
        if (d == resolved || dim == 1) {
            continue;
        }
        if (features > 1 && PyArray_STRIDE(x, d) < feature_stride) {
            layout->shape.inner *= dim;
        }
        else {
            layout->shape.outer *= dim;
        }
    }
    return 0;
}

int bn_check_batch_size(PyArrayObject *x, const bn_layout *layout, const char *when)
{
    if (bn_count(layout->shape) != 1) {
        return 0;
    }
    char message[128];
    PyOS_snprintf(message, sizeof message,
                  "Expected more than 1 value per channel when %s, got input of shape ", when);
    raise_with_shape(PyExc_ValueError, x, message);
    return -1;
}

int bn_arrays_overlap(PyArrayObject *a, PyArrayObject *b)
{
    /* both are dense here, so their bytes are one interval each */
    const char *a_start = PyArray_BYTES(a), *b_start = PyArray_BYTES(b);
    const char *a_end = a_start + PyArray_NBYTES(a), *b_end = b_start + PyArray_NBYTES(b);
    return PyArray_NBYTES(a) > 0 && PyArray_NBYTES(b) > 0
           && a_start < b_end && b_start < a_end;
}

/* [*lo, *hi): the bytes arr's elements lie in, whatever its strides */
static void byte_bounds(PyArrayObject *arr, const char **lo, const char **hi)
{
    *lo = *hi = PyArray_BYTES(arr);
    if (PyArray_SIZE(arr) == 0) {
        return;
    }
    for (int d = 0; d < PyArray_NDIM(arr); d++) {
        npy_intp reach = (PyArray_DIM(arr, d) - 1) * PyArray_STRIDE(arr, d);
        if (reach < 0) {
            *lo += reach;
        }
        else {
            *hi += reach;
        }
    }
    *hi += PyArray_ITEMSIZE(arr);
}

int bn_may_share_memory(PyArrayObject *a, PyArrayObject *b)
{
    const char *a_lo, *a_hi, *b_lo, *b_hi;
    byte_bounds(a, &a_lo, &a_hi);
    byte_bounds(b, &b_lo, &b_hi);
    return a_lo < a_hi && b_lo < b_hi && a_lo < b_hi && b_lo < a_hi;
}

int bn_same_shape(PyArrayObject *a, PyArrayObject *b)
{
    return PyArray_NDIM(a) == PyArray_NDIM(b)
           && PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(b), PyArray_NDIM(a));
}

PyArrayObject *bn_output_like(PyObject *out, PyArrayObject *like, int typenum)
{
    if (out == NULL || out == Py_None) {
        return new_like(like, typenum);
    }
    if (!PyArray_Check(out)) {
        PyErr_Format(PyExc_TypeError, "out must be a numpy.ndarray, got %.100s",
                     Py_TYPE(out)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)out;
    if (!bn_same_shape(arr, like)) {
        PyObject *want = shape_tuple(like), *got = shape_tuple(arr);
        if (want != NULL && got != NULL) {
            PyErr_Format(PyExc_ValueError, "out must have shape %R, got shape %R", want, got);
        }
        Py_XDECREF(want);
        Py_XDECREF(got);
        return NULL;
    }
    if (PyArray_TYPE(arr) != typenum || !PyArray_ISNOTSWAPPED(arr)) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_ValueError, "out must have dtype %R, got dtype %R",
                     (PyObject *)want, (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(want);
        return NULL;
    }
    if (!bn_same_layout(arr, like) || !PyArray_ISALIGNED(arr)) {
        PyErr_SetString(PyExc_ValueError,
                        bn_is_dense(arr) ? "out must have the memory layout of the input "
                                           "(its strides), and be aligned"
                                         : "out must be aligned and contiguous in some axis "
                                           "order (C-contiguous, or the input's strides)");
        return NULL;
    }
    if (!PyArray_ISWRITEABLE(arr)) {
        PyErr_SetString(PyExc_ValueError, "out must be writeable, got a read-only array");
        return NULL;
    }
    if (bn_arrays_overlap(arr, like) && PyArray_BYTES(arr) != PyArray_BYTES(like)) {
        PyErr_SetString(PyExc_ValueError,
                        "out partly overlaps the input; it may be the input itself or "
                        "separate memory");
        return NULL;
    }
    Py_INCREF(arr);
    return arr;
}

int bn_check_separate(PyArrayObject *out, PyArrayObject *arr, const char *name)
{
    if (arr == NULL || !bn_arrays_overlap(out, arr)) {
        return 0;
    }
    PyErr_Format(PyExc_ValueError,
                 "out must not share memory with %s, which is read while out is written",
                 name);
    return -1;
}

PyArrayObject *bn_new_vector(int typenum, npy_intp n)
{
    return (PyArrayObject *)PyArray_SimpleNew(1, &n, typenum);
}

PyArrayObject *bn_new_matrix(int typenum, npy_intp rows, npy_intp n)
{
    npy_intp dims[2] = {rows, n};
    return (PyArrayObject *)PyArray_SimpleNew(2, dims, typenum);
}

/* "24.0 TiB": bytes in the largest binary unit that keeps the number >= 1 */
static void format_bytes(char *text, size_t size, double bytes)
{
    static const char *units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    int unit = 0;
    while (bytes >= 1024.0 && unit < 6) {
        bytes /= 1024.0;
        unit++;
    }
    PyOS_snprintf(text, size, unit == 0 ? "%.0f %s" : "%.1f %s", bytes, units[unit]);
}

void *bn_new_scratch(size_t n, size_t size, const char *what)
{
    void *scratch = NULL;
    if (size == 0 || n <= (size_t)PY_SSIZE_T_MAX / size) {
        /* at least one byte, so that an empty request is not NULL */
        scratch = PyMem_Malloc(n * size > 0 ? n * size : 1);
    }
    if (scratch == NULL) {
        char amount[32];
        format_bytes(amount, sizeof amount, (double)n * (double)size);
        PyErr_Format(PyExc_MemoryError, "Unable to allocate %s for %s (%zu x %zu bytes)",
                     amount, what, n, size);
    }
    return scratch;
}
