// The pointwise block's eval forward, y = bn_act(round(x @ w^T + bias)), as one CUTLASS 3 GEMM for
// Hopper (TMA loads, WGMMA, warp-specialized cooperative or ping-pong schedule) whose epilogue visitor
// tree (EVT) does the rest on the accumulator tile before the single store of y:
//
//   pre = round_T(acc + bias)                      Sm90Compute<AddBias>: AccFetch, RowBroadcast(bias)
//   y   = round_T(bn_act(pre; scale, shift))       Sm90Compute<BnAct>:   pre, RowBroadcast(scale, shift)
//
// so the GEMM output never goes through memory (cuBLAS + a bn_act pass wrote and re-read it).  The
// activation and order are run-time arguments of the BnAct node (one kernel per dtype), computed with
// the depthwise kernels' formulas (dw_common.cuh), rounding like the spec (torch_ops.py).
// Build cost, measured on this project's 2-core CPU: about 50 s for one instantiation (sm_90a): one
// translation unit per dtype and schedule (pw_cutlass_{bf16,fp16}[_pp].cu; the template in
// pw_cutlass_gemm.cuh), this file only dispatches.
// The training forward's GEMM (pw_cutlass_stats.cuh, pw_cutlass_stats_{bf16,fp16}.cu) writes pre and the
// batch statistics' per-tile column sums from its epilogue instead: cuBLAS + a statistics pass wrote pre
// and read it back.
// Compiled only when setup.py found CUTLASS's headers and sm_90a is a build target
// (CONVMIXER_KERNELS_WITH_CUTLASS); otherwise the entry points below are stubs and pw.cpp keeps cuBLAS
// plus the bn_act pass.
#include "pw_cutlass.cuh"

namespace convmixer_kernels {
namespace pwcutlass {

#if defined(CONVMIXER_KERNELS_WITH_CUTLASS)
namespace {
// CUTLASS's problem shape is int; its strides are 64-bit.
bool fits_int(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMax = 0x7fffffff;
  return M <= kMax && N <= kMax && K <= kMax;
}
}  // namespace

bool built() { return true; }

size_t workspace_bytes(bool is_bf16, bool pingpong, int64_t M, int64_t N, int64_t K) {
  if (!fits_int(M, N, K)) return 0;
  const auto of = is_bf16 ? (pingpong ? workspace_of<true, true> : workspace_of<true, false>)
                          : (pingpong ? workspace_of<false, true> : workspace_of<false, false>);
  return of(int(M), int(N), int(K));
}

cudaError_t bn_act_gemm(bool is_bf16, bool pingpong, const void* x, const void* w, void* y, const float* bias,
                        const float* scale, const float* shift, int act, bool act_first, int64_t M, int64_t N,
                        int64_t K, void* workspace, cudaStream_t stream) {
  if (!fits_int(M, N, K) || K % 8 != 0 || N % 8 != 0) return cudaErrorNotSupported;
  const auto run = is_bf16 ? (pingpong ? run_gemm<true, true> : run_gemm<true, false>)
                           : (pingpong ? run_gemm<false, true> : run_gemm<false, false>);
  return run(x, w, y, bias, scale, shift, act, act_first, int(M), int(N), int(K), workspace, stream);
}

size_t stats_workspace_bytes(bool is_bf16, int64_t M, int64_t N, int64_t K) {
  if (!fits_int(M, N, K)) return 0;
  return (is_bf16 ? stats_workspace_of<true> : stats_workspace_of<false>)(int(M), int(N), int(K));
}

cudaError_t stats_gemm(bool is_bf16, const void* x, const void* w, void* pre, const float* bias, int act,
                       bool act_first, int64_t M, int64_t N, int64_t K, float* sums, float* sqs, void* workspace,
                       cudaStream_t stream) {
  if (!fits_int(M, N, K) || K % 8 != 0 || N % 8 != 0) return cudaErrorNotSupported;
  return (is_bf16 ? run_stats_gemm<true> : run_stats_gemm<false>)(x, w, pre, bias, act, act_first, int(M), int(N),
                                                                   int(K), sums, sqs, workspace, stream);
}

#else  // no CUTLASS, or no sm_90a target: the caller keeps cuBLAS + the bn_act pass

bool built() { return false; }
size_t workspace_bytes(bool, bool, int64_t, int64_t, int64_t) { return 0; }
cudaError_t bn_act_gemm(bool, bool, const void*, const void*, void*, const float*, const float*, const float*, int,
                        bool, int64_t, int64_t, int64_t, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}
size_t stats_workspace_bytes(bool, int64_t, int64_t, int64_t) { return 0; }
cudaError_t stats_gemm(bool, const void*, const void*, void*, const float*, int, bool, int64_t, int64_t, int64_t,
                       float*, float*, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif

// The 128-row tiles of the statistics GEMM (pw_cutlass_common.cuh: Tile) and its partials' row length.
int64_t stats_tiles(int64_t M) { return (M + 127) / 128; }
int64_t stats_ld(int64_t N) { return (N + 127) / 128 * 128; }

}  // namespace pwcutlass
}  // namespace convmixer_kernels
