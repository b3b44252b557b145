// The host code of the CUDA BatchNorm ops (csrc/cuda/bn.cpp itself: checks, outputs, the version bumps
// of the running statistics, the launches) on CPU tensors, with the emulated kernels
// (csrc/cuda/cuda_host.h).  Bound into the emulator's module by emu_ops.cpp (bind_bn_host).
#include "cuda/bn.cpp"

#include <torch/extension.h>

namespace cmk_emu {

void bind_bn_host(pybind11::module_& m) {
  namespace ck = convmixer_kernels;
  m.def("host_bn_params", &ck::bn_params_cuda);
  m.def("host_bn_bwd_coefs", &ck::bn_bwd_coefs_cuda);
  m.def("host_bn_update_running", &ck::bn_update_running_cuda);
}

}  // namespace cmk_emu
