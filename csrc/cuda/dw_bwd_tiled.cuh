// Tiled backward kernel of the depthwise block: dx, and per-block partial weight/bias gradients.
// Included by the per-k instantiation files (dw_tiled_k*.cu).
#pragma once

#include "dw_common.cuh"

namespace convmixer_kernels {
namespace dwcuda {

// One block = one channel (NCHW) or 32-channel group (channels_last) and a run of a.ipb (n, tile)
// items.  Per item: stage dpre (the gradient at the conv output, recomputed from dy and pre) over
// the tile + halo in shared memory, zero outside the image.  Each thread then walks its strips:
// for staged row r it loads kR + k - 1 values v once and uses them for both
//   dx(q)            += v * w[k-1-r][k-1-j]          (full correlation with the flipped kernel)
//   dweight[k-1-r][.] += v * x(q)                   (x at the thread's own outputs, in registers)
// Weight-gradient partials go to a per-thread column of shared memory (own column only: no races),
// are summed over the block's threads in a fixed order at the end and written to
// part[(group * C + c) * (k*k + 1) + tap] (tap k*k is the bias gradient).
// Staging (16-byte path): dy and pre of the next item are copied in with cp.async while the block
// computes the current one, as in the forward kernel.  With a.dpre_in (dw_launch.cu) dpre was
// computed by a pass of its own (fp32, unrounded: the same values): channels_last copies its tiles
// by cp.async straight into two alternating fp32 tiles; NCHW copies them into the copies' space and
// moves them into the odd-stride tile (no arithmetic).  Computed here, dpre was evaluated for every
// staged element, halo included (2.4x the outputs at k=7 channels_last, 1.8x NCHW at 32x32), about
// 100 SASS instructions per staged element at bf16 (sm_90a).
template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 3) dw_bwd_tiled_kernel(const TileArgs a) {
  constexpr int P = K / 2;
  constexpr int KK = K * K;
  constexpr int CS = CL ? kCG : 1;
  constexpr int NV = kR + K - 1;
  CMK_DYNAMIC_SMEM(smem_f4);
  float* smem = reinterpret_cast<float*>(smem_f4);

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;

  const int64_t grp = blockIdx.x % a.groups;
  const int64_t cg = blockIdx.x / a.groups;
  const int64_t c = CL ? cg * kCG + lane : cg;
  const int64_t c0 = CL ? cg * kCG : cg;  // first channel of the block
  const bool c_ok = c < a.C;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int SR = a.tile_h + K - 1;
  const int SW = a.smem_w;
  const int RS = CL ? SW * kCG : a.rs;
  const int DWS = CL ? nthreads : nthreads + 1;  // NCHW: odd stride, conflict-free final sums
  float* ds = smem;
  float* ws = ds + static_cast<size_t>(SR) * RS;
  float* coef = ws + (CL ? KK * kCG : KK);
  float* dws = coef + (CL ? 6 * kCG : 0);

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ pre = static_cast<const T*>(a.pre);
  T* __restrict__ dx = static_cast<T*>(a.out);
  const int act = a.act;
  const bool act_first = a.act_first, residual = a.residual;

  // ---- prologue: own partial column, weights, channel coefficients ----
  for (int t = 0; t <= KK; ++t) dws[t * DWS + tid] = 0.f;
  ChanCoef qc{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if constexpr (CL) {
    for (int e = tid; e < kCG * KK; e += nthreads) {
      const int chl = e / KK, t = e - chl * KK;
      ws[t * kCG + chl] = (c0 + chl < a.C) ? a.w[(c0 + chl) * KK + t] : 0.f;
    }
    for (int e = tid; e < 6 * kCG; e += nthreads) {
      const int j = e / kCG, chl = e - j * kCG;
      const int64_t ch = c0 + chl;
      const float* src = j == 0 ? a.scale : j == 1 ? a.shift : j == 2 ? a.mean : j == 3 ? a.ca : j == 4 ? a.cb : a.cd;
      coef[e] = ch < a.C ? src[ch] : 0.f;
    }
  } else {
    for (int t = tid; t < KK; t += nthreads) ws[t] = a.w[cg * KK + t];
    qc = ChanCoef{a.scale[cg], a.shift[cg], a.mean[cg], a.ca[cg], a.cb[cg], a.cd[cg]};
  }

  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  // 16-byte path: dy and pre of the next item come in by cp.async (storage-dtype copies) while the
  // block computes the current one; dpre is then computed from the copies.  Else direct loads.
  const bool async = a.vec && a.copies;
  constexpr int V = Vec<T>::N;
  T* rawg = reinterpret_cast<T*>(smem + a.raw_off);  // dy over the tile + halo (16-byte aligned)
  T* rawp = rawg + static_cast<size_t>(SR) * SW * (CL ? kCG : 1);  // pre (a multiple of 16 bytes on)
  auto issue = [&](const TileItem& m) {
    const auto tv = tile_vecs<T, K, CL>(a, m, RS, c0);
    for (int e = tid; e < tv.count(); e += nthreads) {
      tv.copy(e, dy, rawg);
      tv.copy(e, pre, rawp);
    }
    cp_async_commit();
  };
  // Per-channel coefficients of dpre: the block's channel (NCHW), or lane chl's (channels_last).
  auto coef_of = [&](int chl) {
    if constexpr (CL) {
      return ChanCoef{coef[chl], coef[kCG + chl], coef[2 * kCG + chl], coef[3 * kCG + chl], coef[4 * kCG + chl],
                      coef[5 * kCG + chl]};
    } else {
      return qc;
    }
  };
  // Precomputed dpre (any alignment of dy, pre, x: the tiles come from the pass's own buffer).
  // channels_last: tile buffers ds and the copies' space, alternating; NCHW: the copies' space holds
  // the next item's fp32 tile while the block computes the current one from ds.
  const bool pre_dpre = a.copies && a.dpre_in != nullptr;
  float* const alt = smem + a.raw_off;
  auto issue_dpre = [&](const TileItem& m, float* dst) {
    const auto tv = tile_vecs<float, K, CL>(a, m, RS, c0);
    for (int e = tid; e < tv.count(); e += nthreads) tv.copy(e, a.dpre_in, dst);
    cp_async_commit();
  };
  if (pre_dpre) {
    if (it0 < it1) issue_dpre(tile_item<CL>(a, it0, cg), CL ? ds : alt);
  } else if (async && it0 < it1) {
    issue(tile_item<CL>(a, it0, cg));
  }

  const int nit = static_cast<int>(it1 - it0);  // <= ipb <= 32
  for (int ji = 0; ji < nit; ++ji) {
    const int64_t it = it0 + ji;
    const TileItem item = tile_item<CL>(a, it, cg);
    const int th0 = item.th0, tw0 = item.tw0;
    const int64_t base = item.base;

    if (async || pre_dpre) cp_async_wait_all();
    __syncthreads();  // the previous item's strips are done with ds; prologue writes visible

    const float* dcur = ds;
    if (pre_dpre && CL) {
      // this item's tile arrived in buffer ji & 1 (ds, then the copies' space); the other buffer's
      // strips (item ji - 1) are done
      dcur = (ji & 1) ? alt : ds;
      if (ji + 1 < nit) issue_dpre(tile_item<CL>(a, it + 1, cg), (ji & 1) ? ds : alt);
    } else if (pre_dpre) {
      // NCHW: the item's fp32 copy (zero outside the image) into the odd-stride tile
      const auto tv = tile_vecs<float, K, CL>(a, item, RS, c0);
      for (int e = tid; e < tv.count(); e += nthreads) {
        int ro, fo;
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        if (tv.at(e, ro, fo) >= 0) load_vec_smem<float>(alt + ro, v);
        tv.store(ds, fo, v);
      }
      __syncthreads();
      if (ji + 1 < nit) issue_dpre(tile_item<CL>(a, it + 1, cg), alt);
    } else {
      // ---- stage dpre over the tile + halo (zero outside the image) ----
      with_act(act, [&](auto A) {
        constexpr int AC = decltype(A)::value;
        if (async) {
          // each thread converts the vectors it copied itself
          const auto tv = tile_vecs<T, K, CL>(a, item, RS, c0);
          for (int e = tid; e < tv.count(); e += nthreads) {
            int ro, fo;
            float v[V];
            if (tv.at(e, ro, fo) >= 0) {
              float gv[V], pv[V];
              load_vec_smem<T>(rawg + ro, gv);
              load_vec_smem<T>(rawp + ro, pv);
  #pragma unroll
              for (int j = 0; j < V; ++j) v[j] = dpre_t<AC>(gv[j], pv[j], coef_of(fo % kCG + j), act_first);
            } else {
  #pragma unroll
              for (int j = 0; j < V; ++j) v[j] = 0.f;
            }
            tv.store(ds, fo, v);
          }
        } else if constexpr (!CL) {
          const int gh0 = th0 - P, gw0 = tw0 - a.pl;
          for (int e = tid; e < SR * SW; e += nthreads) {
            const int r = e / SW, q = e - r * SW;
            const int gh = gh0 + r, gw = gw0 + q;
            float v = 0.f;
            if (gh >= 0 && gh < H && gw >= 0 && gw < W) {
              const int64_t off = base + static_cast<int64_t>(gh) * W + gw;
              v = dpre_t<AC>(to_f<T>(dy[off]), to_f<T>(pre[off]), qc, act_first);
            }
            ds[r * RS + q] = v;
          }
        } else {
          const int gh0 = th0 - P, gw0 = tw0 - a.pl;
          for (int e = tid; e < SR * SW * kCG; e += nthreads) {
            const int pix = e >> 5, chl = e & 31;
            const int r = pix / SW, col = pix - r * SW;
            const int gh = gh0 + r, gw = gw0 + col;
            float v = 0.f;
            if (gh >= 0 && gh < H && gw >= 0 && gw < W && c0 + chl < a.C) {
              const int64_t off = base + (static_cast<int64_t>(gh) * W + gw) * a.C + c0 + chl;
              v = dpre_t<AC>(to_f<T>(dy[off]), to_f<T>(pre[off]), coef_of(chl), act_first);
            }
            ds[e] = v;
          }
        }
      });
      __syncthreads();
      if (async && ji + 1 < nit) issue(tile_item<CL>(a, it + 1, cg));
    }

    // ---- strips ----
    const int s_begin = CL ? warp : tid;
    const int s_step = CL ? nwarps : nthreads;
    for (int s = s_begin; s < a.nstrips; s += s_step) {
      const int ty = s / a.sw;
      const int tx = (s - ty * a.sw) * kR;
      const int oh = th0 + ty, ow0 = tw0 + tx;
      int nvalid = 0;
      if (oh < H && c_ok) nvalid = W - ow0 < kR ? (W - ow0 > 0 ? W - ow0 : 0) : kR;
      const int64_t obase = CL ? base + (static_cast<int64_t>(oh) * W + ow0) * a.C + c
                               : base + static_cast<int64_t>(oh) * W + ow0;
      const int64_t ostride = CL ? a.C : 1;

      float xr[kR];  // x at this strip's positions, 0 outside the image
      if (!CL && a.vec && nvalid == kR) {
#pragma unroll
        for (int j = 0; j < kR; j += Vec<T>::N) load_vec<T>(x + obase + j, xr + j);
      } else {
#pragma unroll
        for (int i = 0; i < kR; ++i) xr[i] = i < nvalid ? to_f<T>(x[obase + i * ostride]) : 0.f;
      }

      const float* sbase =
          CL ? dcur + static_cast<size_t>(ty * SW + tx) * kCG + lane : dcur + ty * RS + tx + (a.pl - P);
      float dxa[kR];
#pragma unroll
      for (int i = 0; i < kR; ++i) dxa[i] = 0.f;
      float db = 0.f;
#pragma unroll 1
      for (int r = 0; r < K; ++r) {
        const float* row = sbase + r * RS;
        float v[NV];
#pragma unroll
        for (int j = 0; j < NV; ++j) v[j] = row[j * CS];
        // tap (K-1-r, K-1-q) for q = 0..K-1
        const int trow = (K - 1 - r) * K + (K - 1);
        const float* wrow = CL ? ws + trow * kCG + lane : ws + trow;
        float* dwp = dws + trow * DWS + tid;
#pragma unroll
        for (int q = 0; q < K; ++q) {
          const float wv = wrow[-q * CS];
          float dwq = 0.f;
#pragma unroll
          for (int i = 0; i < kR; ++i) {
            dxa[i] = fmaf(v[i + q], wv, dxa[i]);
            dwq = fmaf(v[i + q], xr[i], dwq);
          }
          dwp[-q * DWS] += dwq;
        }
      }
      // The bias gradient: the strip's own dpre (centre row, read again).  Taken from v at r == P inside
      // the loop, the compiler predicated the adds into every row (kR FADDs a row, K - 1 rows for nothing).
      const float* crow = sbase + P * RS;
#pragma unroll
      for (int i = 0; i < kR; ++i) db += crow[(i + P) * CS];
      dws[KK * DWS + tid] += db;

      if (nvalid > 0) {
        if (residual) {
          if (!CL && a.vec && nvalid == kR) {
            float gv[kR];
#pragma unroll
            for (int j = 0; j < kR; j += Vec<T>::N) load_vec<T>(dy + obase + j, gv + j);
#pragma unroll
            for (int i = 0; i < kR; ++i) dxa[i] = dxa[i] + gv[i];
          } else {
#pragma unroll
            for (int i = 0; i < kR; ++i)
              if (i < nvalid) dxa[i] = dxa[i] + to_f<T>(dy[obase + i * ostride]);
          }
        }
        if (!CL && a.vec && nvalid == kR) {
#pragma unroll
          for (int j = 0; j < kR; j += Vec<T>::N) store_vec<T>(dx + obase + j, dxa + j);
        } else {
#pragma unroll
          for (int i = 0; i < kR; ++i)
            if (i < nvalid) dx[obase + i * ostride] = from_f<T>(dxa[i]);
        }
      }
    }
  }

  // ---- block sums of the weight/bias-gradient partials, fixed order ----
  __syncthreads();
  if constexpr (!CL) {
    for (int t = tid; t <= KK; t += nthreads) {
      const float* src = dws + t * DWS;
      float s = 0.f;
      for (int j = 0; j < nthreads; ++j) s += src[j];
      a.part[(grp * a.C + c) * (KK + 1) + t] = s;
    }
  } else {
    for (int t = warp; t <= KK; t += nwarps) {
      float s = 0.f;
      for (int w = 0; w < nwarps; ++w) s += dws[t * DWS + w * kCG + lane];
      if (c_ok) a.part[(grp * a.C + c) * (KK + 1) + t] = s;
    }
  }
}

template <typename T, int K, bool CL>
cudaError_t launch_bwd_tiled(const TileArgs& a, const TilePlan& p, cudaStream_t stream) {
  static SmemOptIn opted;
  return launch_planned(dw_bwd_tiled_kernel<T, K, CL>, opted, a, p, stream);
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
