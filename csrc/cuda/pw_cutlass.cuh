// The pointwise block's eval forward as one CUTLASS GEMM with the whole epilogue in its epilogue
// visitor tree, and its training forward's GEMM with the batch statistics in its epilogue (pw_cutlass.cu).
// Host-only declarations, no CUTLASS or ATen, for pw.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace convmixer_kernels {
namespace pwcutlass {

// Whether this build holds the kernels: CUTLASS headers were found and sm_90a was a target
// (TORCH_CUDA_ARCH_LIST with 9.0a).  They run on compute capability 9.0 only.
bool built();

// y (M, N) row-major = bn_act(round(x @ w^T + bias)) in the storage dtype T (half: is_bf16 false,
// bfloat16: true): x (M, K) row-major, w (N, K) row-major, bias/scale/shift float (N,) (bias may be
// nullptr), act/act_first as in pw.cuh.  K and N multiples of 8, every pointer 16-byte aligned.
// workspace: workspace_bytes(...) bytes (may be 0).  pingpong picks the kernel's schedule (ping-pong or
// cooperative, pw_cutlass_gemm.cuh).  Returns cudaErrorNotSupported when the problem cannot run here (the
// caller falls back).
size_t workspace_bytes(bool is_bf16, bool pingpong, int64_t M, int64_t N, int64_t K);
cudaError_t bn_act_gemm(bool is_bf16, bool pingpong, const void* x, const void* w, void* y, const float* bias,
                        const float* scale, const float* shift, int act, bool act_first, int64_t M, int64_t N,
                        int64_t K, void* workspace, cudaStream_t stream);

// The training forward's GEMM with the batch statistics in its epilogue (pw_cutlass_stats.cuh): pre (M, N)
// row-major = round_T(x @ w^T + bias), and for each 128-row tile t of pre and column n < N the fp32 sums of
// u and u * u over the tile's rows (u = act(pre) if act_first else pre, unrounded) at sums[t * ld + n] and
// sqs[t * ld + n], t < stats_tiles(M), ld = stats_ld(N).  Same conditions and return as bn_act_gemm; the
// schedule is cooperative.
int64_t stats_tiles(int64_t M);
int64_t stats_ld(int64_t N);
size_t stats_workspace_bytes(bool is_bf16, int64_t M, int64_t N, int64_t K);
cudaError_t stats_gemm(bool is_bf16, const void* x, const void* w, void* pre, const float* bias, int act,
                       bool act_first, int64_t M, int64_t N, int64_t K, float* sums, float* sqs, void* workspace,
                       cudaStream_t stream);

// The kernels behind them per dtype (bf16: true, fp16: false) and schedule (ping-pong: true), one
// translation unit each (pw_cutlass_{bf16,fp16}[_pp].cu, pw_cutlass_stats_{bf16,fp16}.cu); defined only in
// builds with CUTLASS.
template <bool BF16, bool PP>
size_t workspace_of(int M, int N, int K);
template <bool BF16, bool PP>
cudaError_t run_gemm(const void* x, const void* w, void* y, const float* bias, const float* scale, const float* shift,
                     int act, bool act_first, int M, int N, int K, void* workspace, cudaStream_t stream);
template <bool BF16>
size_t stats_workspace_of(int M, int N, int K);
template <bool BF16>
cudaError_t run_stats_gemm(const void* x, const void* w, void* pre, const float* bias, int act, bool act_first, int M,
                           int N, int K, float* sums, float* sqs, void* workspace, cudaStream_t stream);

}  // namespace pwcutlass
}  // namespace convmixer_kernels
