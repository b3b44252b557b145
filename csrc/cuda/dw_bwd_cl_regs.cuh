// channels_last backward of the depthwise block with the weight-gradient partials in registers (plan
// p.regs, k <= 7, dpre from the fp32 pass).  Included by the per-k instantiation files.
//
// Why: dw_bwd_tiled_kernel's channels_last plan holds a (k*k + 1)-float column of partials a thread in
// shared memory (25.6 KB at k=7 with 4 warps) beside two fp32 dpre tiles (78.8 KB): 111 KB a block, two
// blocks, 8 warps an SM, and a shared-memory read-modify-write per tap and strip row.  Its training step
// at k=7, N=64, C=768 took 2.39 ms against 1.44 ms NCHW (H200, 2026-11-27), with about the same
// instructions an output: latency, not issue.  Here a thread keeps its k*k + 1 partials in registers
// (the kernel rows and taps fully unrolled), one warp an (8 x 16 pixel x 32 channel) tile row: 85 KB and
// 256 threads a block, two blocks (16 warps) an SM by registers (at most 128 a thread) and by shared
// memory.  Each partial adds the same values in the same order as dw_bwd_tiled_kernel's column does
// (a strip row's kR products chained, then added to the partial), so for the same plan the results
// would be bitwise equal; the plans differ (8 warps, not 4), so the final sums' grouping does too.
#pragma once

#include "dw_common.cuh"

namespace convmixer_kernels {
namespace dwcuda {

template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreads, 2) dw_bwd_cl_regs_kernel(const TileArgs a) {
  static_assert(K <= kRegsMaxK, "the register partials are planned for k <= kRegsMaxK");
  constexpr int P = K / 2;
  constexpr int KK = K * K;
  constexpr int NV = kR + K - 1;
  CMK_DYNAMIC_SMEM(smem_f4);
  float* smem = reinterpret_cast<float*>(smem_f4);

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int64_t grp = blockIdx.x % a.groups;
  const int64_t cg = blockIdx.x / a.groups;
  const int64_t c0 = cg * kCG, c = c0 + lane;
  const bool c_ok = c < a.C;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int RS = a.smem_w * kCG;
  float* const buf0 = smem;               // the dpre tile of even items
  float* const buf1 = smem + a.raw_off;   // of odd items
  float* const ws = smem + regs_ws_off(a.raw_off, KK, nwarps);

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* __restrict__ dx = static_cast<T*>(a.out);

  for (int e = tid; e < kCG * KK; e += nthreads) {
    const int chl = e / KK, t = e - chl * KK;
    ws[t * kCG + chl] = (c0 + chl < a.C) ? a.w[(c0 + chl) * KK + t] : 0.f;
  }
  float dw[KK + 1];  // tap t's partial, then the bias's
#pragma unroll
  for (int t = 0; t <= KK; ++t) dw[t] = 0.f;

  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  auto issue = [&](int64_t it, float* dst) {
    const auto tv = tile_vecs<float, K, true>(a, tile_item<true>(a, it, cg), RS, c0);
    for (int e = tid; e < tv.count(); e += nthreads) tv.copy(e, a.dpre_in, dst);
    cp_async_commit();
  };
  if (it0 < it1) issue(it0, buf0);

  const int nit = static_cast<int>(it1 - it0);  // <= ipb <= 32
  for (int ji = 0; ji < nit; ++ji) {
    const int64_t it = it0 + ji;
    const TileItem item = tile_item<true>(a, it, cg);
    cp_async_wait_all();
    __syncthreads();  // item ji's tile is in; item ji - 1's strips are done with the other buffer
    const float* dcur = (ji & 1) ? buf1 : buf0;
    if (ji + 1 < nit) issue(it + 1, (ji & 1) ? buf0 : buf1);

    for (int s = warp; s < a.nstrips; s += nwarps) {  // strip row s: pixels tw0 .. tw0 + kR - 1
      const int oh = item.th0 + s, ow0 = item.tw0;
      int nvalid = 0;
      if (oh < H && c_ok) nvalid = W - ow0 < kR ? (W - ow0 > 0 ? W - ow0 : 0) : kR;
      const int64_t obase = item.base + (static_cast<int64_t>(oh) * W + ow0) * a.C + c;

      float xr[kR];  // x at this strip's pixels, 0 outside the image
#pragma unroll
      for (int i = 0; i < kR; ++i) xr[i] = i < nvalid ? to_f<T>(x[obase + i * a.C]) : 0.f;

      const float* sbase = dcur + static_cast<size_t>(s) * RS + lane;
      float dxa[kR];
#pragma unroll
      for (int i = 0; i < kR; ++i) dxa[i] = 0.f;
#pragma unroll
      for (int r = 0; r < K; ++r) {
        float v[NV];
#pragma unroll
        for (int j = 0; j < NV; ++j) v[j] = sbase[r * RS + j * kCG];
#pragma unroll
        for (int q = 0; q < K; ++q) {
          const int t = (K - 1 - r) * K + (K - 1 - q);  // tap (K-1-r, K-1-q): the flipped kernel
          const float wv = ws[t * kCG + lane];
          float dwq = 0.f;
#pragma unroll
          for (int i = 0; i < kR; ++i) {
            dxa[i] = fmaf(v[i + q], wv, dxa[i]);
            dwq = fmaf(v[i + q], xr[i], dwq);
          }
          dw[t] += dwq;
        }
        if (r == P) {  // the strip's own dpre: the bias gradient
          float db = 0.f;
#pragma unroll
          for (int i = 0; i < kR; ++i) db += v[i + P];
          dw[KK] += db;
        }
      }

      if (a.residual) {
#pragma unroll
        for (int i = 0; i < kR; ++i)
          if (i < nvalid) dxa[i] = dxa[i] + to_f<T>(dy[obase + i * a.C]);
      }
#pragma unroll
      for (int i = 0; i < kR; ++i)
        if (i < nvalid) dx[obase + i * a.C] = from_f<T>(dxa[i]);
    }
  }

  // ---- block sums of the partials over the warps, fixed order (scratch over the tiles) ----
  __syncthreads();  // every strip is done with the tiles (and no copy is in flight)
  float* red = smem;
#pragma unroll
  for (int t = 0; t <= KK; ++t) red[(t * nwarps + warp) * kCG + lane] = dw[t];
  __syncthreads();
  for (int t = warp; t <= KK; t += nwarps) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += red[(t * nwarps + w) * kCG + lane];
    if (c_ok) a.part[(grp * a.C + c) * (KK + 1) + t] = s;
  }
}

template <typename T, int K>
cudaError_t launch_bwd_cl_regs(const TileArgs& a, const TilePlan& p, cudaStream_t stream) {
  static SmemOptIn opted;
  return launch_planned(dw_bwd_cl_regs_kernel<T, K>, opted, a, p, stream);
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
