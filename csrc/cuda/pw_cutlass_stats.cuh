// The StatsKernel<E> template of the CUTLASS pointwise training forward (see pw_cutlass.cu) and the
// definitions of its entry points in pw_cutlass.cuh for one dtype: pw_cutlass_stats_{bf16,fp16}.cu define
// CMK_CUTLASS_E and CMK_CUTLASS_BF16 and include this.
//
// One GEMM writes pre = round_T(x @ w^T + bias) and, from the same accumulator tile, the BatchNorm's batch
// statistics as per-tile partial sums, so the statistics pass over pre (a read of the whole output, 167 us of
// the pointwise training step at N=64 C=768 32x32 on an H200, 2026-11-27) goes away.  Its epilogue is a graph
// (Sm90TopologicalVisitor), not a tree, because pre feeds both the store and the statistics:
//
//   0 acc                      AccFetch
//   1 bias                     RowBroadcast (nullptr: 0)
//   2 pre  = round_T(0 + 1)    Compute<AddBias>
//   3 u    = act(2) or 2       Compute<StatIn>  (fp32, unrounded, as the statistics pass)
//   4 sum of u                 RowReduction     (per 128-row tile and column, into `sums`)
//   5 u * u                    Compute<Square>
//   6 sum of u * u             RowReduction     (into `sqs`)
//   7 D  = 2                   Compute<First>   (stored, rounded to T: exact)
//
// The reductions run without CUTLASS's final reduction (FinalReduction = false): each CTA tile writes its
// column sums (a fixed shuffle and shared-memory tree: no atomics) to row m_tile of an (M tiles, N rounded
// up to 128) fp32 array, and pw_kernels.cu's finalize adds the rows in order in double.  So the result is
// bitwise reproducible.  Sums of u and u * u cancel where a channel's mean m is large against its spread s
// (var = E[u^2] - E[u]^2): fp32 sums over a 128-row tile lose up to about 128 * 2^-24 * (m / s)^2 of var
// (worst case; a random walk loses much less).  The output's error from that, half of it times |xhat|,
// stays below the error PyTorch's own fp16/bf16 output carries from rounding u to the storage dtype
// ((m / s) * 2^-11 or 2^-8) up to m / s of about 50 (fp16, worst case) or 400 (bf16); these are the only
// dtypes this kernel takes.  The statistics pass (Chan merges: no cancellation) stays the path for fp32
// and everything this kernel does not take.
#pragma once

#if !defined(CMK_CUTLASS_E) || !defined(CMK_CUTLASS_BF16)
#error "define CMK_CUTLASS_E and CMK_CUTLASS_BF16 before including pw_cutlass_stats.cuh"
#endif

#if defined(CONVMIXER_KERNELS_WITH_CUTLASS)
#include "pw_cutlass_common.cuh"

namespace convmixer_kernels {
namespace pwcutlass {
namespace detail {  // (cute's names and fu = cutlass::epilogue::fusion: pw_cutlass_common.cuh)

template <typename E>
struct StatsKernel {
  // The column sums of one CTA tile: plus in registers, across lanes and across warps; no atomics and no
  // final reduction (the partials stay per tile); out-of-bounds rows are skipped.
  using ColSums = fu::Sm90RowReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, Tile, float, float, kRN,
                                       Stride<_0, _1, _0>, 4, /*EnableNullptr=*/false, /*FinalReduction=*/false,
                                       /*VisitCheckOOB=*/true>;
  using Graph = fu::Sm90TopologicalVisitor<
      float,
      cute::tuple<cute::seq<>, cute::seq<>, cute::seq<0, 1>, cute::seq<2>, cute::seq<3>, cute::seq<3>, cute::seq<5>,
                  cute::seq<2, 4, 6>>,
      fu::Sm90AccFetch, RowVec, fu::Sm90Compute<AddBias, E, float, kRN>, fu::Sm90Compute<StatIn, float, float, kRN>,
      ColSums, fu::Sm90Compute<Square, float, float, kRN>, ColSums, fu::Sm90Compute<First, E, float, kRN>>;
  using G = GemmOf<E, cutlass::epilogue::TmaWarpSpecializedCooperative,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperative, Graph>;

  static typename G::Gemm::Arguments arguments(const void* x, const void* w, void* pre, const float* bias, int act,
                                               bool act_first, int M, int N, int K, float* sums, float* sqs) {
    auto args = G::arguments(x, w, pre, M, N, K);
    // The graph's arguments in its node order (see the table above).
    args.epilogue.thread = {{}, {bias, 0.f}, {}, {act, act_first ? 1 : 0}, {sums, 0.f}, {}, {sqs, 0.f}, {}};
    return args;
  }

  static size_t workspace(int M, int N, int K) {
    return G::Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, 0, true, M, N, K, nullptr,
                                                 nullptr));
  }

  static cudaError_t run(const void* x, const void* w, void* pre, const float* bias, int act, bool act_first, int M,
                         int N, int K, float* sums, float* sqs, void* ws, cudaStream_t stream) {
    return G::run(arguments(x, w, pre, bias, act, act_first, M, N, K, sums, sqs), ws, stream);
  }
};

}  // namespace detail

template <>
size_t stats_workspace_of<CMK_CUTLASS_BF16>(int M, int N, int K) {
  return detail::StatsKernel<CMK_CUTLASS_E>::workspace(M, N, K);
}
template <>
cudaError_t run_stats_gemm<CMK_CUTLASS_BF16>(const void* x, const void* w, void* pre, const float* bias, int act,
                                             bool act_first, int M, int N, int K, float* sums, float* sqs, void* ws,
                                             cudaStream_t stream) {
  return detail::StatsKernel<CMK_CUTLASS_E>::run(x, w, pre, bias, act, act_first, M, N, K, sums, sqs, ws, stream);
}

}  // namespace pwcutlass
}  // namespace convmixer_kernels
#endif  // CONVMIXER_KERNELS_WITH_CUTLASS
