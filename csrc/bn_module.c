/* bn_module.c -- the bnpy._core extension module: multi-phase initialization
 * (PEP 489) with per-module state holding the BatchNorm heap type. */
#define BNPY_MODULE_OWNS_NUMPY_API
#include "bn_module.h"

static int bn_exec(PyObject *module)
{
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
    return 0;
}

static int bn_traverse(PyObject *module, visitproc visit, void *arg)
{
    bn_module_state *state = PyModule_GetState(module);
    Py_VISIT(state->batchnorm_type);
    return 0;
}

static int bn_clear(PyObject *module)
{
    bn_module_state *state = PyModule_GetState(module);
    Py_CLEAR(state->batchnorm_type);
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
