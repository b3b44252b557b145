// Every schema of the extension, in one place.  Implementations are registered per
// device in csrc/cpu/*.cpp and csrc/cuda/*.cpp; fake (meta) implementations and autograd
// live in convmixer_kernels/ops.py; the executable specification of each op is
// convmixer_kernels/torch_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace convmixer_kernels {
#ifdef CONVMIXER_KERNELS_WITH_CUDA
std::string cuda_build_info();  // defined in a .cu file, compiled by nvcc
#endif

#define CMK_STR2(x) #x
#define CMK_STR(x) CMK_STR2(x)

// "key=value;key=value" description of how this extension was built.
std::string build_info() {
  std::string s = "torch=" CMK_STR(CONVMIXER_KERNELS_TORCH_VERSION) ";";
#ifdef CONVMIXER_KERNELS_WITH_CUDA
  s += "cuda=1;" + cuda_build_info();
#else
  s += "cuda=0;";
#endif
  return s;
}
}  // namespace convmixer_kernels

TORCH_LIBRARY(convmixer_kernels, m) {
  // Fused depthwise block (see torch_ops.py for the exact semantics of each).
  m.def("dw_conv_stats(Tensor x, Tensor weight, Tensor? bias, int act, bool act_first)"
        " -> (Tensor pre, Tensor mean, Tensor var)");
  m.def("dw_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor shift, int act,"
        " bool act_first, bool residual) -> Tensor");
  m.def("dw_bwd_reduce(Tensor dy, Tensor pre, Tensor scale, Tensor shift, Tensor mean,"
        " Tensor invstd, int act, bool act_first) -> (Tensor sum_g, Tensor sum_gxhat)");
  m.def("dw_bwd(Tensor dy, Tensor x, Tensor pre, Tensor weight, Tensor scale, Tensor shift,"
        " Tensor mean, Tensor ca, Tensor cb, Tensor cd, int act, bool act_first, bool residual)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // Pointwise block (1x1 conv GEMM, optional fused residual input t) and patch-embedding stem.
  m.def("pw_gemm_stats(Tensor x, Tensor? t, Tensor weight, Tensor? bias, int act, bool act_first)"
        " -> (Tensor pre, Tensor mean, Tensor var)");
  m.def("pw_fwd(Tensor x, Tensor? t, Tensor weight, Tensor? bias, Tensor scale, Tensor shift, int act,"
        " bool act_first) -> Tensor");
  m.def("pw_bwd(Tensor dy, Tensor x, Tensor? t, Tensor pre, Tensor weight, Tensor scale, Tensor shift,"
        " Tensor mean, Tensor ca, Tensor cb, Tensor cd, int act, bool act_first)"
        " -> (Tensor ds, Tensor dweight, Tensor dbias)");
  m.def("stem_gemm_stats(Tensor x, Tensor weight, Tensor? bias, int act, bool act_first)"
        " -> (Tensor pre, Tensor mean, Tensor var)");
  m.def("stem_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor shift, int act,"
        " bool act_first) -> Tensor");
  m.def("stem_bwd(Tensor dy, Tensor x, Tensor pre, Tensor weight, Tensor scale, Tensor shift,"
        " Tensor mean, Tensor ca, Tensor cb, Tensor cd, int act, bool act_first, bool need_dx)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // Elementwise BatchNorm + activation, forward and backward (the light passes of training).
  m.def("bn_act_fwd(Tensor pre, Tensor scale, Tensor shift, int act, bool act_first, Tensor? residual=None)"
        " -> Tensor");
  m.def("bn_act_bwd(Tensor dy, Tensor pre, Tensor scale, Tensor shift, Tensor mean, Tensor ca,"
        " Tensor cb, Tensor cd, int act, bool act_first) -> Tensor");
  // Per-channel BatchNorm bookkeeping of the block ops: (C,) vectors, one kernel each (bn_math.h).
  m.def("bn_params(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor invstd, Tensor scale, Tensor shift)");
  m.def("bn_bwd_coefs(Tensor sum_g, Tensor sum_gxhat, Tensor scale, Tensor invstd, float count, bool batch_stats)"
        " -> (Tensor cb, Tensor cd)");
  m.def("bn_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
        " Tensor mean, Tensor var, float count, float? momentum) -> ()");
  m.def("build_info() -> str", &convmixer_kernels::build_info);
}

// Importable as a Python module (convmixer_kernels._C); loading it runs the registrations.
static struct PyModuleDef convmixer_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&convmixer_kernels_module); }
