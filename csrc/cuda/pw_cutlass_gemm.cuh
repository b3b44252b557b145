// The Kernel<E, PP> template of the CUTLASS pointwise eval forward (see pw_cutlass.cu), and the definitions
// of the entry points of pw_cutlass.cuh for one dtype and schedule: each pw_cutlass_<dtype>[_pp].cu defines
// CMK_CUTLASS_E (the CUTLASS element type), CMK_CUTLASS_BF16 and CMK_CUTLASS_PINGPONG and includes this, so
// the four instantiations (about 50 s each on this project's 2-core CPU) compile in parallel.
#pragma once

#if !defined(CMK_CUTLASS_E) || !defined(CMK_CUTLASS_BF16) || !defined(CMK_CUTLASS_PINGPONG)
#error "define CMK_CUTLASS_E, CMK_CUTLASS_BF16 and CMK_CUTLASS_PINGPONG before including pw_cutlass_gemm.cuh"
#endif

#include "pw_cutlass.cuh"

#if defined(CONVMIXER_KERNELS_WITH_CUTLASS)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <type_traits>

#include "dw_common.cuh"  // act_fwd_t, with_act, affine: the same math as the other CUDA kernels

namespace convmixer_kernels {
namespace pwcutlass {
namespace detail {
using namespace cute;
namespace fu = cutlass::epilogue::fusion;

// acc + bias (the node's output type rounds it to the storage dtype: pre).
template <class T>
struct AddBias {
  CUTLASS_HOST_DEVICE T operator()(T const& a, T const& b) const { return a + b; }
};
template <int N>
struct AddBias<cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                          cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = __fadd_rn(a[i], b[i]);
    return r;
  }
};

// bn_act with the activation and order as run-time arguments.
struct BnActArgs {
  int act = 0;
  int act_first = 1;
};
template <class T>
struct BnAct {
  using Arguments = BnActArgs;
};
template <int N>
struct BnAct<cutlass::Array<float, N>> {
  using Arguments = BnActArgs;
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& v, cutlass::Array<float, N> const& s,
                                                     cutlass::Array<float, N> const& b, Arguments const& a) const {
    cutlass::Array<float, N> r;
    dwcuda::with_act(a.act, [&](auto A) {
      constexpr int AC = decltype(A)::value;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < N; ++i) r[i] = dwcuda::bn_act_t<AC>(v[i], s[i], b[i], a.act_first != 0);
    });
    return r;
  }
};

constexpr auto kRN = cutlass::FloatRoundStyle::round_to_nearest;

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
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using RowVec = fu::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using Pre = fu::Sm90EVT<fu::Sm90Compute<AddBias, E, float, kRN>, fu::Sm90AccFetch, RowVec>;
  using Out = fu::Sm90EVT<fu::Sm90Compute<BnAct, E, float, kRN>, Pre, RowVec, RowVec>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8, E,
      cutlass::layout::RowMajor, 8, EpiSchedule, Out>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, 8, E,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static typename Gemm::Arguments arguments(const void* x, const void* w, void* y, const float* bias,
                                            const float* scale, const float* shift, int act, bool act_first, int M,
                                            int N, int K) {
    using GK = typename Gemm::GemmKernel;
    const auto sA = cutlass::make_cute_packed_stride(typename GK::StrideA{}, make_shape(M, K, 1));
    const auto sB = cutlass::make_cute_packed_stride(typename GK::StrideB{}, make_shape(N, K, 1));
    const auto sD = cutlass::make_cute_packed_stride(typename GK::StrideD{}, make_shape(M, N, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {static_cast<const E*>(x), sA, static_cast<const E*>(w), sB},
                                  {{}, nullptr, sD, static_cast<E*>(y), sD}};
    // Tree arguments, children first: Out = {Pre = {acc, bias, AddBias}, scale, shift, BnAct}.
    args.epilogue.thread = {{{}, {bias, 0.f}, {}}, {scale, 0.f}, {shift, 0.f}, {act, act_first ? 1 : 0}};
    return args;
  }

  static size_t workspace(int M, int N, int K) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, true, M, N, K));
  }

  static cudaError_t run(const void* x, const void* w, void* y, const float* bias, const float* scale,
                         const float* shift, int act, bool act_first, int M, int N, int K, void* ws,
                         cudaStream_t stream) {
    auto args = arguments(x, w, y, bias, scale, shift, act, act_first, M, N, K);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
    return cudaGetLastError();
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
