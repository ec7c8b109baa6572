// The tldr_fast operator library: a Python module stub, so that the shared library imports as
// `tldr_fast._C`, and the build facts. The ops' schemas are declared once, in Python
// (tldr_fast/ops/<op>.py), and defined by tldr_fast.extension before it loads this library; the kernels
// register against them per device in cpu/<op>.cpp and cuda/<op>.cu (a C++ signature that disagrees with its
// declaration fails at load time), their autograd in autograd.cpp.
//
// Each loss op returns (loss, terms, grad_<input>...): the fp32 (fp64 for fp64 inputs) weighted loss, the
// unweighted terms, and the gradient of `loss` w.r.t. each differentiable input, already multiplied by the
// weights and in that input's dtype. The backward only scales those by the upstream gradient.
#include <Python.h>

// Build facts for tldr_fast.extension.info(): whether the CUDA kernels were compiled in, and for which
// architectures (passed by the build as a token such as 8.0_9.0, stringised here).
#ifndef TLDR_FAST_WITH_CUDA
#define TLDR_FAST_WITH_CUDA 0
#endif
#ifndef TLDR_FAST_CUDA_ARCHS
#define TLDR_FAST_CUDA_ARCHS
#endif
#define TLDR_FAST_STR2(x) #x
#define TLDR_FAST_STR(x) TLDR_FAST_STR2(x)
#define TLDR_FAST_CAT2(a, b) a##b
#define TLDR_FAST_CAT(a, b) TLDR_FAST_CAT2(a, b)

extern "C" PyMODINIT_FUNC TLDR_FAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, TLDR_FAST_STR(TORCH_EXTENSION_NAME),
                                   "tldr_fast operator library (ops under torch.ops.tldr_fast)", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "with_cuda", TLDR_FAST_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(mod, "cuda_archs", TLDR_FAST_STR(TLDR_FAST_CUDA_ARCHS)) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
