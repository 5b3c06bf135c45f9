// The Python module cpvt_kernels._C is empty: importing it loads this library, whose
// static initializers register the cpvt:: ops with the dispatcher (see peg.cpp).
#include <Python.h>


PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Fused PEG kernels (ops live in torch.ops.cpvt)", -1, nullptr};
  return PyModule_Create(&module_def);


}
