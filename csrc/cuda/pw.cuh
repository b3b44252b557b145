// Launchers of the per-channel kernels behind the pointwise / stem / elementwise-BN ops.
// Host-only declarations: raw pointers and a params struct, no ATen, so that pw_kernels.cu
// compiles without the ATen headers (build time) and pw.cpp does the tensor work.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "chan.cuh"

namespace convmixer_kernels {
namespace pw {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// What one pass over an activation-shaped tensor (N, C, H, W) does per element.
enum class Mode : int {
  // out = bn_act(in [+ bias, rounded]) [+ residual]: scale*act(v)+shift (act_first) or
  // act(scale*v+shift), plus `dy` (the residual, nullable) before the one rounding.
  kBnAct = 0,
  // v = in [+ bias, rounded and written back to out]; u = act(v) if act_first else v;
  // per-block (count, mean, M2) of u, merged per channel -> mean, biased var (one pass).
  kStats = 1,
  // out = dpre (bn_act_bwd formula, rounded to storage) from dy and pre; optional per-channel sum.
  kDpre = 2,
};

// Element (n, c, h, w) lives at ((n*H + h)*W + w)*C + c for channels_last (`cl`), else at
// (n*C + c)*HW + hw.  Every pointer is in the storage dtype unless it says float.  Per-channel
// vectors (ChanPtrs): bias (added to `in` and rounded to storage), scale, shift (kBnAct, kDpre),
// mean, ca, cb, cd (kDpre).
struct ChannelParams : ChanPtrs {
  int64_t N = 0, C = 0, HW = 0;
  bool cl = false;
  int act = 0;
  bool act_first = true;
  const void* in = nullptr;  // kBnAct/kStats: GEMM output or pre; kDpre: pre
  const void* in2 = nullptr;  // the second input, same layout as `in`: kDpre dy; kBnAct the
                             // residual (nullable)
  void* out = nullptr;       // kBnAct: y (may be `in`); kStats: pre (written only with bias,
                             // may be `in`); kDpre: dpre
  // kDpre with NCHW input only: write dpre channel-major, (C, N*HW) row-major, the layout the
  // weight-gradient GEMM wants.
  bool out_channel_major = false;
  // kDpre only: out is float, dpre unrounded, in pre's layout (the depthwise backward's staged
  // operand, dw_launch.cu); not with out_channel_major, no sum.
  bool out_f32 = false;
  // Workspace (an ATen tensor allocated by the caller, size from plan_channels):
  float* partial = nullptr;  // kStats: (R, C, 3); kDpre with a sum: (R, C); else nullptr
  int64_t chunk = 0;         // from plan_channels
  int64_t R = 0;             // from plan_channels
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the N*H*W positions of each channel are split over blocks; depends on shapes only (not
// on the device), so results are bitwise reproducible on any GPU.  channels_last: chunks of
// `chunk` rows m of the (M, C) matrix (blockIdx.y), 32 channel vectors per block (blockIdx.x).
// NCHW: chunks of `chunk` positions j = n*HW + hw (a multiple of 8 so 16-byte vectors never
// straddle chunks) of one channel (blockIdx.x = channel, blockIdx.y = chunk).
struct ChannelPlan {
  int64_t chunk, R;
};
inline ChannelPlan plan_channels(int64_t N, int64_t C, int64_t HW, bool cl) {
  constexpr int64_t kTargetBlocks = 1024;
  const int64_t L = N * HW;  // positions per channel (>= 1 here)
  int64_t R;
  int64_t chunk;
  if (cl) {
    R = std::clamp<int64_t>(kTargetBlocks / ceil_div(C, 256), 1, std::max<int64_t>(1, ceil_div(L, 64)));
    chunk = ceil_div(L, R);
  } else {
    R = std::clamp<int64_t>(kTargetBlocks / C, 1, std::max<int64_t>(1, ceil_div(L, 2048)));
    chunk = ceil_div(ceil_div(L, R), 8) * 8;
  }
  return {chunk, ceil_div(L, chunk)};
}

// A pass's parameters for an (N, C, H*W) tensor in layout cl, with its plan (inputs, outputs and
// per-channel vectors still to set).
inline ChannelParams channel_params(int64_t N, int64_t C, int64_t HW, bool cl, int act, bool act_first) {
  ChannelParams p;
  p.N = N;
  p.C = C;
  p.HW = HW;
  p.cl = cl;
  p.act = act;
  p.act_first = act_first;
  const ChannelPlan plan = plan_channels(N, C, HW, cl);
  p.chunk = plan.chunk;
  p.R = plan.R;
  return p;
}

// Each launcher checks its launches (C10_CUDA_KERNEL_LAUNCH_CHECK) and runs on `stream`.
// kBnAct and kDpre (with or without `dsum`, the per-channel sum of dpre in float) and kStats
// (mean, var in float; needs p.partial).
void launch_bn_act(const ChannelParams& p, DType dt, cudaStream_t stream);
void launch_stats(const ChannelParams& p, DType dt, float* mean, float* var, cudaStream_t stream);
void launch_dpre(const ChannelParams& p, DType dt, float* dsum, cudaStream_t stream);
// mean, var (biased) of C channels over M rows from per-tile fp32 column sums of u and u * u, [T][ld]
// each (the CUTLASS statistics GEMM's partials, pw_cutlass.cuh), added in a fixed order in double.
void launch_tile_stats_finalize(const float* sums, const float* sqs, int64_t T, int64_t ld, int64_t C, int64_t M,
                                float* mean, float* var, cudaStream_t stream);

}  // namespace pw
}  // namespace convmixer_kernels
