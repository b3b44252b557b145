// The host code of the CUDA pointwise/stem/elementwise-BN ops (csrc/cuda/pw.cpp itself: its checks, the
// cuBLAS GEMMs through ATen, the stem's im2col on a K padded to 16 bytes, the passes' launches) on CPU
// tensors, with the emulated kernels: what otherwise runs only on a GPU (csrc/cuda/cuda_host.h).  Bound
// into the emulator's module by emu_ops.cpp (bind_pw_host).
#include "cuda/pw.cpp"

#include <torch/extension.h>

namespace cmk_emu {

void bind_pw_host(pybind11::module_& m) {
  namespace ck = convmixer_kernels;
  m.def("host_pw_gemm_stats", &ck::pw_gemm_stats_cuda);
  m.def("host_pw_fwd", &ck::pw_fwd_cuda);
  m.def("host_pw_bwd", &ck::pw_bwd_cuda);
  m.def("host_stem_gemm_stats", &ck::stem_gemm_stats_cuda);
  m.def("host_stem_fwd", &ck::stem_fwd_cuda);
  m.def("host_stem_bwd", &ck::stem_bwd_cuda);
  m.def("host_bn_act_fwd", &ck::bn_act_fwd_cuda);
  m.def("host_bn_act_bwd", &ck::bn_act_bwd_cuda);
}

}  // namespace cmk_emu
