// The Kernel<E, PP> template of the CUTLASS pointwise eval forward (see pw_cutlass.cu), and the definitions
// of the entry points of pw_cutlass.cuh for one dtype and schedule: each pw_cutlass_<dtype>[_pp].cu defines
// CMK_CUTLASS_E (the CUTLASS element type), CMK_CUTLASS_BF16 and CMK_CUTLASS_PINGPONG and includes this, so
// the four instantiations (about 50 s each on this project's 2-core CPU) compile in parallel.
#pragma once

#if !defined(CMK_CUTLASS_E) || !defined(CMK_CUTLASS_BF16) || !defined(CMK_CUTLASS_PINGPONG)
#error "define CMK_CUTLASS_E, CMK_CUTLASS_BF16 and CMK_CUTLASS_PINGPONG before including pw_cutlass_gemm.cuh"
#endif

#if defined(CONVMIXER_KERNELS_WITH_CUTLASS)
#include "pw_cutlass_common.cuh"

namespace convmixer_kernels {
namespace pwcutlass {
namespace detail {  // (cute's names and fu = cutlass::epilogue::fusion: pw_cutlass_common.cuh)

// PP false: the cooperative schedule (both consumer warpgroups share a 128x128 tile, then run its epilogue
// together while the producer warp prefetches the next tile's operands); true: ping-pong (each consumer
// warpgroup owns a whole tile, and one's epilogue overlaps the other's mainloop).  With K = 768 a tile's
// mainloop is 12 k-blocks, and bn_act (erff for GELU) over 128x128 values is a large part of it, which the
// cooperative schedule does not hide.
template <typename E, bool PP>
struct Kernel {
  using EpiSchedule =
      std::conditional_t<PP, cutlass::epilogue::TmaWarpSpecialized, cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using MainSchedule = std::conditional_t<PP, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                          cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using Pre = fu::Sm90EVT<fu::Sm90Compute<AddBias, E, float, kRN>, fu::Sm90AccFetch, RowVec>;
  using Out = fu::Sm90EVT<fu::Sm90Compute<BnAct, E, float, kRN>, Pre, RowVec, RowVec>;
  using G = GemmOf<E, EpiSchedule, MainSchedule, Out>;

  static typename G::Gemm::Arguments arguments(const void* x, const void* w, void* y, const float* bias,
                                               const float* scale, const float* shift, int act, bool act_first, int M,
                                               int N, int K) {
    auto args = G::arguments(x, w, y, M, N, K);
    // Tree arguments, children first: Out = {Pre = {acc, bias, AddBias}, scale, shift, BnAct}.
    args.epilogue.thread = {{{}, {bias, 0.f}, {}}, {scale, 0.f}, {shift, 0.f}, {act, act_first ? 1 : 0}};
    return args;
  }

  static size_t workspace(int M, int N, int K) {
    return G::Gemm::get_workspace_size(
        arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, true, M, N, K));
  }

  static cudaError_t run(const void* x, const void* w, void* y, const float* bias, const float* scale,
                         const float* shift, int act, bool act_first, int M, int N, int K, void* ws,
                         cudaStream_t stream) {
    return G::run(arguments(x, w, y, bias, scale, shift, act, act_first, M, N, K), ws, stream);
  }
};

}  // namespace detail

template <>
size_t workspace_of<CMK_CUTLASS_BF16, CMK_CUTLASS_PINGPONG>(int M, int N, int K) {
  return detail::Kernel<CMK_CUTLASS_E, CMK_CUTLASS_PINGPONG>::workspace(M, N, K);
}
template <>
cudaError_t run_gemm<CMK_CUTLASS_BF16, CMK_CUTLASS_PINGPONG>(const void* x, const void* w, void* y, const float* bias,
                                                             const float* scale, const float* shift, int act,
                                                             bool act_first, int M, int N, int K, void* ws,
                                                             cudaStream_t stream) {
  using K_ = detail::Kernel<CMK_CUTLASS_E, CMK_CUTLASS_PINGPONG>;
  return K_::run(x, w, y, bias, scale, shift, act, act_first, M, N, K, ws, stream);
}

}  // namespace pwcutlass
}  // namespace convmixer_kernels
#endif  // CONVMIXER_KERNELS_WITH_CUTLASS
