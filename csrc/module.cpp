// mrprune._C: an empty Python module whose import loads the kernels; they register themselves with the torch
// dispatcher (STABLE_TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda). No pybind11: nothing is bound to Python
// directly, which keeps the module on the limited API (one abi3 wheel for every Python >= 3.10).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
