// The Python module cpvt_kernels._C. Importing it loads this library, whose static initializers
// register the cpvt:: ops with the dispatcher (see peg.cpp). Its one function, peg_forward,
// calls cpvt::peg_forward through the dispatcher (every dispatch key, autograd included, runs as
// for torch.ops.cpvt.peg_forward) without the generic binding of torch.ops: that binding matches
// the arguments against the schema through a boxed stack and a Python wrapper frame, 1-2 us with
// warm caches and 4-6 us after a kernel has evicted them, on a 2-core Xeon (B=32, C=192, 14x14
// bfloat16: a 0.12 ms op). It skips __torch_function__ handling: fused_peg calls it only where
// there is none to do (plain tensors, no torch function mode) and not under torch.compile.
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "forward_op.h"

namespace {

// peg_forward(x, weight, bias, H, W, num_prefix_tokens): tensors (bias a tensor or None) and
// ints; the op checks their values.
PyObject* peg_forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError,
                 "peg_forward(x, weight, bias, H, W, num_prefix_tokens) takes 6 arguments, "
                 "got %zd",
                 nargs);
    return nullptr;
  }
  if (!THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      !(args[2] == Py_None || THPVariable_Check(args[2]))) {
    PyErr_SetString(PyExc_TypeError,
                    "peg_forward: x and weight must be tensors, bias a tensor or None");
    return nullptr;
  }
  int64_t ints[3];
  for (int i = 0; i < 3; ++i) {
    PyObject* v = args[3 + i];
    if (!PyLong_Check(v)) {
      PyErr_Format(PyExc_TypeError, "peg_forward: H, W and num_prefix_tokens must be ints, got %s",
                   Py_TYPE(v)->tp_name);
      return nullptr;
    }
    ints[i] = PyLong_AsLongLong(v);
    if (ints[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  std::optional<at::Tensor> bias;
  if (args[2] != Py_None) bias = THPVariable_Unpack(args[2]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does around an op
    out = cpvt::forward_op().call(x, weight, bias, c10::SymInt(ints[0]), c10::SymInt(ints[1]), ints[2]);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"peg_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&peg_forward)),
     METH_FASTCALL,
     "peg_forward(x, weight, bias, H, W, num_prefix_tokens): torch.ops.cpvt.peg_forward "
     "without __torch_function__ handling"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Fused PEG kernels (ops live in torch.ops.cpvt)", -1, methods};
  return PyModule_Create(&module_def);
}
