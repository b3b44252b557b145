// What the CUTLASS pointwise GEMMs share (pw_cutlass_gemm.cuh: the eval forward; pw_cutlass_stats.cuh: the
// training forward with the batch statistics in its epilogue): CUTLASS's headers and the epilogue nodes'
// functors.  Included only by their translation units (pw_cutlass_*.cu), in builds with CUTLASS.
#pragma once

#include "pw_cutlass.cuh"

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

// r[i] = f(A, i) for i < N, A the activation as a compile-time constant (dispatched once for the fragment).
template <int N, class F>
CUTLASS_DEVICE cutlass::Array<float, N> per_act(int act, F&& f) {
  cutlass::Array<float, N> r;
  dwcuda::with_act(act, [&](auto A) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = f(A, i);
  });
  return r;
}

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
    return per_act<N>(a.act, [&](auto A, int i) {
      return dwcuda::bn_act_t<decltype(A)::value>(v[i], s[i], b[i], a.act_first != 0);
    });
  }
};

constexpr auto kRN = cutlass::FloatRoundStyle::round_to_nearest;

// u = act(pre) (act_norm) or pre (norm_act) in fp32, unrounded: what the BatchNorm normalizes, so what its
// batch statistics are of (the same values as pw_kernels.cu's statistics pass).
template <class T>
struct StatIn {
  using Arguments = BnActArgs;
};
template <int N>
struct StatIn<cutlass::Array<float, N>> {
  using Arguments = BnActArgs;
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& v, Arguments const& a) const {
    if (a.act_first == 0) return v;
    return per_act<N>(a.act, [&](auto A, int i) { return dwcuda::act_fwd_t<decltype(A)::value>(v[i]); });
  }
};

// u * u, rounded to nearest (no contraction into a later add).
template <class T>
struct Square {};
template <int N>
struct Square<cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& v) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = __fmul_rn(v[i], v[i]);
    return r;
  }
};

// Its first input unchanged (the output node of a graph whose other nodes only reduce).
template <class T>
struct First {};
template <int N>
struct First<cutlass::Array<float, N>> {
  template <class... Rest>
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& v, Rest const&...) const {
    return v;
  }
};

// The CTA tile of both GEMMs, and a Hopper GEMM: D (M, N) row-major in E = x (M, K) row-major @ w (N, K)^T
// with fp32 accumulation, TMA loads, WGMMA, 128x128x64 tiles, the given schedules and epilogue fusion (an EVT
// or a topological visitor).
using Tile = Shape<_128, _128, _64>;
using RowVec = fu::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, _0>>;  // a per-column float vector
template <typename E, class EpiSchedule, class MainSchedule, class Fusion>
struct GemmOf {
  using TileShape = Tile;
  using ClusterShape = Shape<_1, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8, E,
      cutlass::layout::RowMajor, 8, EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, 8, E,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  // The GEMM's arguments with default (empty) fusion arguments: the caller sets args.epilogue.thread.
  static typename Gemm::Arguments arguments(const void* x, const void* w, void* y, int M, int N, int K) {
    using GK = typename Gemm::GemmKernel;
    const auto sA = cutlass::make_cute_packed_stride(typename GK::StrideA{}, make_shape(M, K, 1));
    const auto sB = cutlass::make_cute_packed_stride(typename GK::StrideB{}, make_shape(N, K, 1));
    const auto sD = cutlass::make_cute_packed_stride(typename GK::StrideD{}, make_shape(M, N, 1));
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            {M, N, K, 1},
            {static_cast<const E*>(x), sA, static_cast<const E*>(w), sB},
            {{}, nullptr, sD, static_cast<E*>(y), sD}};
  }

  static cudaError_t run(typename Gemm::Arguments const& args, void* ws, cudaStream_t stream) {
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
    return cudaGetLastError();
  }
};

}  // namespace detail
}  // namespace pwcutlass
}  // namespace convmixer_kernels
