/* bn_module.c -- the bnpy._core extension module: multi-phase initialization
 * (PEP 489) with per-module state holding the BatchNorm heap type. */
#define BNPY_MODULE_OWNS_NUMPY_API
#include "bn_module.h"

static PyObject *set_num_threads(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long long n;
    if (bn_parse_integer(arg, "the number of threads", &n) < 0) {
        return NULL;
    }
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "the number of threads must be in [1, 4096], got %R",
                     arg);
        return NULL;
    }
    if (n > 1 && !bn_has_openmp()
        && PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                            "bnpy was built without OpenMP: set_num_threads(%lld) has no "
                            "effect, the kernels run on one thread", n) < 0) {
        return NULL;
    }
    bn_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *has_openmp(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(bn_has_openmp());
}

static PyObject *get_num_threads(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(bn_get_num_threads());
}

/* the bn_isa called name, or -1 */
static int isa_named(const char *name)
{
    for (int isa = BN_ISA_DEFAULT; isa <= BN_ISA_AVX512; isa++) {
        if (strcmp(name, bn_isa_name((bn_isa)isa)) == 0) {
            return isa;
        }
    }
    return -1;
}

/* ('default', 'avx2', ...): the builds this CPU runs, best last */
static PyObject *cpu_capabilities(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    PyObject *names = PyList_New(0);
    if (names == NULL) {
        return NULL;
    }
    for (int isa = BN_ISA_DEFAULT; isa <= BN_ISA_AVX512; isa++) {
        if (!bn_isa_supported((bn_isa)isa)) {
            continue;
        }
        PyObject *name = PyUnicode_FromString(bn_isa_name((bn_isa)isa));
        if (name == NULL || PyList_Append(names, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(name);
    }
    PyObject *result = PyList_AsTuple(names);
    Py_DECREF(names);
    return result;
}

static PyObject *set_cpu_capability(PyObject *module, PyObject *arg)
{
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError, "the CPU capability must be a str, got %.100s",
                         Py_TYPE(arg)->tp_name);
        }
        return NULL;
    }
    int isa = isa_named(name);
    if (isa < 0) {
        PyErr_Format(PyExc_ValueError, "expected a CPU capability '%s', 'avx2' or 'avx512', got %R",
                     bn_isa_name(BN_ISA_DEFAULT), arg);
        return NULL;
    }
    if (bn_set_isa((bn_isa)isa) < 0) {
        PyObject *runs = cpu_capabilities(module, NULL);
        if (runs != NULL) {
            PyErr_Format(PyExc_ValueError, "this CPU (or this build) cannot run %R; it runs %R",
                         arg, runs);
            Py_DECREF(runs);
        }
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *get_cpu_capability(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(bn_isa_name(bn_get_isa()));
}

static PyMethodDef runtime_methods[] = {
    {"set_num_threads", set_num_threads, METH_O,
     PyDoc_STR("set_num_threads($module, n, /)\n--\n\n"
               "Use n threads in the kernels (when bnpy was built with OpenMP).\n"
               "Results do not depend on n.")},
    {"get_num_threads", get_num_threads, METH_NOARGS,
     PyDoc_STR("get_num_threads($module, /)\n--\n\n"
               "The number of threads the kernels use (1 without OpenMP).")},
    {"has_openmp", (PyCFunction)(void (*)(void))has_openmp, METH_NOARGS,
     PyDoc_STR("has_openmp($module, /)\n--\n\nWhether bnpy was built with OpenMP.")},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     PyDoc_STR("set_cpu_capability($module, name, /)\n--\n\n"
               "Run the kernels built for name ('default', 'avx2' or 'avx512') from now\n"
               "on: for testing and benchmarking. Results are bitwise the same in all;\n"
               "ValueError when this CPU cannot run name.")},
    {"get_cpu_capability", get_cpu_capability, METH_NOARGS,
     PyDoc_STR("get_cpu_capability($module, /)\n--\n\n"
               "The instruction set the kernels run: 'default', 'avx2' or 'avx512'\n"
               "(the best this CPU supports unless set_cpu_capability chose another).")},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS,
     PyDoc_STR("cpu_capabilities($module, /)\n--\n\n"
               "The instruction sets this CPU runs bnpy's kernels with, best last.")},
    {NULL, NULL, 0, NULL},
};

/* What load_state_dict returns, as PyTorch's: a namedtuple
 * IncompatibleKeys(missing_keys, unexpected_keys). */
static PyObject *new_incompatible_keys_type(void)
{
    PyObject *collections = PyImport_ImportModule("collections");
    PyObject *namedtuple = collections ? PyObject_GetAttrString(collections, "namedtuple")
                                       : NULL;
    PyObject *args = Py_BuildValue("(ss)", "IncompatibleKeys", "missing_keys unexpected_keys");
    PyObject *kwargs = Py_BuildValue("{ss}", "module", "bnpy");
    PyObject *type = NULL;
    if (namedtuple != NULL && args != NULL && kwargs != NULL) {
        type = PyObject_Call(namedtuple, args, kwargs);
    }
    Py_XDECREF(collections);
    Py_XDECREF(namedtuple);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    return type;
}

static int bn_exec(PyObject *module)
{
    if (PyModule_AddFunctions(module, runtime_methods) < 0
        || PyModule_AddFunctions(module, bn_stats_methods) < 0
        || PyModule_AddFunctions(module, bn_family_methods) < 0) {
        return -1;
    }
    if (PyArray_ImportNumPyAPI() < 0) {
        return -1;
    }
    bn_module_state *state = PyModule_GetState(module);
    state->batchnorm_type = PyType_FromModuleAndSpec(module, &bn_batchnorm_spec, NULL);
    if (state->batchnorm_type == NULL) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "BatchNorm", state->batchnorm_type) < 0) {
        return -1;
    }
    state->incompatible_keys_type = new_incompatible_keys_type();
    if (state->incompatible_keys_type == NULL
        || PyModule_AddObjectRef(module, "IncompatibleKeys",
                                 state->incompatible_keys_type) < 0) {
        return -1;
    }
    return 0;
}

static int bn_traverse(PyObject *module, visitproc visit, void *arg)
{
    bn_module_state *state = PyModule_GetState(module);
    Py_VISIT(state->batchnorm_type);
    Py_VISIT(state->incompatible_keys_type);
    return 0;
}

static int bn_clear(PyObject *module)
{
    bn_module_state *state = PyModule_GetState(module);
    Py_CLEAR(state->batchnorm_type);
    Py_CLEAR(state->incompatible_keys_type);
    return 0;
}

static void bn_free(void *module)
{
    bn_clear((PyObject *)module);
}

static PyModuleDef_Slot bn_slots[] = {
    {Py_mod_exec, bn_exec},
    {0, NULL},
};

static struct PyModuleDef bn_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bnpy._core",
    .m_doc = "The C core of bnpy: the BatchNorm type and the functional API.",
    .m_size = sizeof(bn_module_state),
    .m_methods = bn_functional_methods,
    .m_slots = bn_slots,
    .m_traverse = bn_traverse,
    .m_clear = bn_clear,
    .m_free = bn_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&bn_module);
}
