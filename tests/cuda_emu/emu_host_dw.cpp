// The host code of the CUDA depthwise ops (csrc/cuda/dw.cpp itself: checks, outputs, workspace, the
// launchers' calls) on CPU tensors, with the emulated kernels (csrc/cuda/cuda_host.h).  Bound into the
// emulator's module by emu_ops.cpp (bind_dw_host).
#include "cuda/dw.cpp"

#include <torch/extension.h>

namespace cmk_emu {

void bind_dw_host(pybind11::module_& m) {
  namespace ck = convmixer_kernels;
  m.def("host_dw_conv_stats", &ck::dw_conv_stats_cuda);
  m.def("host_dw_fwd", &ck::dw_fwd_cuda);
  m.def("host_dw_bwd_reduce", &ck::dw_bwd_reduce_cuda);
  m.def("host_dw_bwd", &ck::dw_bwd_cuda);
}

}  // namespace cmk_emu
