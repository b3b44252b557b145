// The pointwise block's eval forward, y = bn_act(round(x @ w^T + bias)), as one CUTLASS 3 GEMM for
// Hopper (TMA loads, WGMMA, warp-specialized cooperative schedule) whose epilogue visitor tree (EVT)
// does the rest on the accumulator tile before the single store of y:
//
//   pre = round_T(acc + bias)                      Sm90Compute<AddBias>: AccFetch, RowBroadcast(bias)
//   y   = round_T(bn_act(pre; scale, shift))       Sm90Compute<BnAct>:   pre, RowBroadcast(scale, shift)
//
// so the GEMM output never goes through memory (cuBLAS + a bn_act pass wrote and re-read it).  The
// activation and order are run-time arguments of the BnAct node (one kernel per dtype), computed with
// the depthwise kernels' formulas (dw_common.cuh), rounding like the spec (torch_ops.py).
// Build cost, measured on this project's 2-core CPU: about 50 s for one instantiation (sm_90a).
// Compiled only when setup.py found CUTLASS's headers and sm_90a is a build target
// (CONVMIXER_KERNELS_WITH_CUTLASS); otherwise the entry points below are stubs and pw.cpp keeps cuBLAS
// plus the bn_act pass.
#include "pw_cutlass.cuh"

#if defined(CONVMIXER_KERNELS_WITH_CUTLASS)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "dw_common.cuh"  // act_fwd_t, with_act, affine: the same math as the other CUDA kernels
#endif

namespace convmixer_kernels {
namespace pwcutlass {

#if defined(CONVMIXER_KERNELS_WITH_CUTLASS)
namespace {
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
      for (int i = 0; i < N; ++i)
        r[i] = a.act_first ? __fadd_rn(__fmul_rn(s[i], dwcuda::act_fwd_t<AC>(v[i])), b[i])
                           : dwcuda::act_fwd_t<AC>(dwcuda::affine(v[i], s[i], b[i]));
    });
    return r;
  }
};

constexpr auto kRN = cutlass::FloatRoundStyle::round_to_nearest;

template <typename E>
struct Kernel {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using RowVec = fu::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using Pre = fu::Sm90EVT<fu::Sm90Compute<AddBias, E, float, kRN>, fu::Sm90AccFetch, RowVec>;
  using Out = fu::Sm90EVT<fu::Sm90Compute<BnAct, E, float, kRN>, Pre, RowVec, RowVec>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8, E,
      cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative, Out>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, 8, E,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
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

// CUTLASS's problem shape is int; its strides are 64-bit.
bool fits_int(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMax = 0x7fffffff;
  return M <= kMax && N <= kMax && K <= kMax;
}
}  // namespace

bool built() { return true; }

size_t workspace_bytes(bool is_bf16, int64_t M, int64_t N, int64_t K) {
  if (!fits_int(M, N, K)) return 0;
  return is_bf16 ? Kernel<cutlass::bfloat16_t>::workspace(int(M), int(N), int(K))
                 : Kernel<cutlass::half_t>::workspace(int(M), int(N), int(K));
}

cudaError_t bn_act_gemm(bool is_bf16, const void* x, const void* w, void* y, const float* bias, const float* scale,
                        const float* shift, int act, bool act_first, int64_t M, int64_t N, int64_t K, void* workspace,
                        cudaStream_t stream) {
  if (!fits_int(M, N, K) || K % 8 != 0 || N % 8 != 0) return cudaErrorNotSupported;
  return is_bf16 ? Kernel<cutlass::bfloat16_t>::run(x, w, y, bias, scale, shift, act, act_first, int(M), int(N),
                                                    int(K), workspace, stream)
                 : Kernel<cutlass::half_t>::run(x, w, y, bias, scale, shift, act, act_first, int(M), int(N), int(K),
                                                workspace, stream);
}

#else  // no CUTLASS, or no sm_90a target: the caller keeps cuBLAS + the bn_act pass

bool built() { return false; }
size_t workspace_bytes(bool, int64_t, int64_t, int64_t) { return 0; }
cudaError_t bn_act_gemm(bool, const void*, const void*, void*, const float*, const float*, const float*, int, bool,
                        int64_t, int64_t, int64_t, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif

}  // namespace pwcutlass
}  // namespace convmixer_kernels
