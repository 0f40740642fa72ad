// Python module entry point of slvit_fast._C_cpu. Importing it registers the slvit_fast::cpu_* ops
// (TORCH_LIBRARY in slvit_cpu.cpp); the module itself has no Python functions.
#include <Python.h>

static struct PyModuleDef slvit_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu", "slvit_fast fused CPU kernels",
                                              -1, nullptr};

PyMODINIT_FUNC PyInit__C_cpu(void) { return PyModule_Create(&slvit_cpu_module); }
