// Tiled forward kernel of the depthwise block: dw_fwd (y) and dw_conv_stats (pre + statistics).
// Included by the per-k instantiation files (dw_tiled_k*.cu).
#pragma once

#include "dw_common.cuh"

namespace convmixer_kernels {
namespace dwcuda {

// One block = one channel (NCHW) or 32-channel group (channels_last, one channel per lane) and a
// run of a.ipb (n, tile) items.  Per item: stage x over the tile + halo in shared memory (fp32, zero
// padded), then each thread computes strips of kR outputs along W.  stats = false: y =
// epilogue(pre).  stats = true: write pre, and the block's (count, mean, M2) of u per channel over
// all its items to part[grp * C + c].
// Staging (16-byte path): the block copies an item's tile + halo into a storage-dtype buffer with
// cp.async (zero fill outside the image) while it computes the previous item, then converts that
// buffer to the fp32 tile: the global-memory latency hides behind the previous item's FMAs instead
// of stalling every block once per item.  Other shapes load the fp32 tile directly.
template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 2) dw_fwd_tiled_kernel(const TileArgs a) {
  constexpr int P = K / 2;
  constexpr int KK = K * K;
  // Weights in registers up to 9x9 when a block is one channel (uniform across the block: the
  // compiler keeps them in uniform registers); per-lane weights (channels_last) up to 7x7 so that
  // two 256-thread blocks fit an SM without spills; else read from shared memory.
  constexpr bool kWReg = CL ? K <= 7 : K <= 9;
  constexpr int CS = CL ? kCG : 1;       // floats between neighbouring staged columns
  constexpr int NV = kR + K - 1;         // inputs per strip row
  constexpr int V = Vec<T>::N;           // storage elements per 16-byte vector
  CMK_DYNAMIC_SMEM(smem_f4);
  float* smem = reinterpret_cast<float*>(smem_f4);

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;

  const int64_t grp = blockIdx.x % a.groups;
  const int64_t cg = blockIdx.x / a.groups;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int SR = a.tile_h + K - 1;
  const int SW = a.smem_w;
  const int RS = CL ? SW * kCG : a.rs;
  float* xs = smem;
  float* ws = xs + static_cast<size_t>(SR) * RS;
  float* red = ws + (kWReg ? 0 : (CL ? KK * kCG : KK));
  T* raw = reinterpret_cast<T*>(smem + a.raw_off);  // 16-byte aligned: raw_off is a multiple of 4

  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ out = static_cast<T*>(a.out);

  const int64_t c = CL ? cg * kCG + lane : cg;
  const bool c_ok = c < a.C;
  const int64_t c0 = CL ? cg * kCG : cg;  // first channel of the block
  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  const bool async = a.vec && a.copies;

  // Issue the cp.async copies of item m's tile + halo into raw.
  auto issue = [&](const TileItem& m) {
    const auto tv = tile_vecs<T, K, CL>(a, m, RS, c0);
    for (int e = tid; e < tv.count(); e += nthreads) tv.copy(e, x, raw);
    cp_async_commit();
  };
  // raw (complete: each thread converts the vectors it copied itself) -> the fp32 tile xs.
  auto convert = [&](const TileItem& m) {
    const auto tv = tile_vecs<T, K, CL>(a, m, RS, c0);
    for (int e = tid; e < tv.count(); e += nthreads) {
      int ro, fo;
      tv.at(e, ro, fo);
      float v[V];
      load_vec_smem<T>(raw + ro, v);
      tv.store(xs, fo, v);
    }
  };
  // Scalar path: load item m's tile + halo straight into xs.
  auto stage_direct = [&](const TileItem& m) {
    const int gh0 = m.th0 - P;
    const int gw0 = m.tw0 - a.pl;
    if constexpr (!CL) {
      for (int e = tid; e < SR * SW; e += nthreads) {
        const int r = e / SW, q = e - r * SW;
        const int gh = gh0 + r, gw = gw0 + q;
        xs[r * RS + q] = (gh >= 0 && gh < H && gw >= 0 && gw < W)
                             ? to_f<T>(x[m.base + static_cast<int64_t>(gh) * W + gw])
                             : 0.f;
      }
    } else {
      for (int e = tid; e < SR * SW * kCG; e += nthreads) {
        const int pix = e >> 5, chl = e & 31;
        const int r = pix / SW, col = pix - r * SW;
        const int gh = gh0 + r, gw = gw0 + col;
        const int64_t ch = c0 + chl;
        xs[e] = (gh >= 0 && gh < H && gw >= 0 && gw < W && ch < a.C)
                    ? to_f<T>(x[m.base + (static_cast<int64_t>(gh) * W + gw) * a.C + ch])
                    : 0.f;
      }
    }
  };

  if (async && it0 < it1) issue(tile_item<CL>(a, it0, cg));

  // ---- weights and per-channel values ----
  float wreg[kWReg ? KK : 1];
  if constexpr (kWReg) {
    const float* wc = a.w + (c_ok ? c : 0) * KK;
#pragma unroll
    for (int t = 0; t < KK; ++t) wreg[t] = c_ok ? __ldg(wc + t) : 0.f;
  } else {
    if constexpr (CL) {
      for (int e = tid; e < kCG * KK; e += nthreads) {
        const int chl = e / KK, t = e - chl * KK;
        ws[t * kCG + chl] = (c0 + chl < a.C) ? a.w[(c0 + chl) * KK + t] : 0.f;
      }
    } else {
      for (int t = tid; t < KK; t += nthreads) ws[t] = a.w[cg * KK + t];
    }
  }
  const float bias = (a.bias != nullptr && c_ok) ? a.bias[c] : 0.f;
  const float scale = (!a.stats && c_ok) ? a.scale[c] : 0.f;
  const float shift = (!a.stats && c_ok) ? a.shift[c] : 0.f;
  const int act = a.act;
  const bool act_first = a.act_first, residual = a.residual;

  float st_n = 0.f, st_m = 0.f, st_M2 = 0.f;
  const int s_begin = CL ? warp : tid;
  const int s_step = CL ? nwarps : nthreads;
  const int nit = static_cast<int>(it1 - it0);  // <= ipb <= 32
  for (int ji = 0; ji < nit; ++ji) {
    const int64_t it = it0 + ji;
    const TileItem item = tile_item<CL>(a, it, cg);
    const int th0 = item.th0, tw0 = item.tw0;
    const int64_t base = item.base;
    // ---- stage x over the tile + halo ----
    if (async) {
      cp_async_wait_all();
      __syncthreads();  // the previous item's strips are done with xs
      convert(item);
      __syncthreads();  // xs ready (and the weights, first time); raw free for the next item
      if (ji + 1 < nit) issue(tile_item<CL>(a, it + 1, cg));
    } else {
      __syncthreads();  // the previous item's strips are done with xs
      stage_direct(item);
      __syncthreads();
    }

    // ---- strips ----
    for (int s = s_begin; s < a.nstrips; s += s_step) {
      const int ty = s / a.sw;
      const int tx = (s - ty * a.sw) * kR;
      const int oh = th0 + ty, ow0 = tw0 + tx;
      const float* sbase = CL ? xs + static_cast<size_t>(ty * SW + tx) * kCG + lane : xs + ty * RS + tx + (a.pl - P);
      float acc[kR];
#pragma unroll
      for (int i = 0; i < kR; ++i) acc[i] = 0.f;
      if constexpr (kWReg) {
#pragma unroll
        for (int r = 0; r < K; ++r) {
          const float* row = sbase + r * RS;
          float v[NV];
#pragma unroll
          for (int j = 0; j < NV; ++j) v[j] = row[j * CS];
#pragma unroll
          for (int q = 0; q < K; ++q) {
            const float wv = wreg[r * K + q];
#pragma unroll
            for (int i = 0; i < kR; ++i) acc[i] = fmaf(v[i + q], wv, acc[i]);
          }
        }
      } else {
#pragma unroll 1
        for (int r = 0; r < K; ++r) {
          const float* row = sbase + r * RS;
          const float* wrow = CL ? ws + r * K * kCG + lane : ws + r * K;
          float v[NV];
#pragma unroll
          for (int j = 0; j < NV; ++j) v[j] = row[j * CS];
#pragma unroll
          for (int q = 0; q < K; ++q) {
            const float wv = wrow[q * CS];
#pragma unroll
            for (int i = 0; i < kR; ++i) acc[i] = fmaf(v[i + q], wv, acc[i]);
          }
        }
      }

      // ---- epilogue ----
      int nvalid = 0;
      if (oh < H && c_ok) nvalid = W - ow0 < kR ? (W - ow0 > 0 ? W - ow0 : 0) : kR;
      float o[kR];
#pragma unroll
      for (int i = 0; i < kR; ++i) o[i] = round_to<T>(acc[i] + bias);  // pre
      with_act(act, [&](auto A) {
        constexpr int AC = decltype(A)::value;
        if (!a.stats) {
#pragma unroll
          for (int i = 0; i < kR; ++i) {
            float y = bn_act_t<AC>(o[i], scale, shift, act_first);
            if (residual) y = y + sbase[P * RS + (i + P) * CS];  // x(oh, ow0 + i), staged exactly
            o[i] = y;
          }
        } else {
#pragma unroll
          for (int i = 0; i < kR; ++i) acc[i] = act_first ? act_fwd_t<AC>(o[i]) : o[i];  // u
        }
      });
      float sum = 0.f;
      if (a.stats) {
#pragma unroll
        for (int i = 0; i < kR; ++i)
          if (i < nvalid) sum += acc[i];
      }
      if (nvalid > 0) {
        if constexpr (!CL) {
          T* op = out + base + static_cast<int64_t>(oh) * W + ow0;
          if (a.vec && nvalid == kR) {
#pragma unroll
            for (int j = 0; j < kR; j += Vec<T>::N) store_vec<T>(op + j, o + j);
          } else {
#pragma unroll
            for (int i = 0; i < kR; ++i)
              if (i < nvalid) op[i] = from_f<T>(o[i]);
          }
        } else {
          T* op = out + base + (static_cast<int64_t>(oh) * W + ow0) * a.C + c;
#pragma unroll
          for (int i = 0; i < kR; ++i)
            if (i < nvalid) op[static_cast<int64_t>(i) * a.C] = from_f<T>(o[i]);
        }
        if (a.stats) {
          // Two-pass summary of the strip from registers, then a Chan merge into the thread's.
          const float cnt = static_cast<float>(nvalid);
          const float ml = sum / cnt;
          float m2 = 0.f;
#pragma unroll
          for (int i = 0; i < kR; ++i) {
            const float d = acc[i] - ml;
            if (i < nvalid) m2 = fmaf(d, d, m2);
          }
          chan_merge(st_n, st_m, st_M2, cnt, ml, m2);
        }
      }
    }

  }  // items

  // ---- block statistics (fixed merge order) ----
  if (a.stats) {
    const int64_t pidx = grp;
    if constexpr (!CL) {
      block_chan_store(st_n, st_m, st_M2, red, a.part + (pidx * a.C + c) * 3);
    } else {
      float* r = red + (warp * kCG + lane) * 3;
      r[0] = st_n;
      r[1] = st_m;
      r[2] = st_M2;
      __syncthreads();
      if (warp == 0 && c_ok) {
        float tn = red[lane * 3], tm = red[lane * 3 + 1], tM = red[lane * 3 + 2];
        for (int w = 1; w < nwarps; ++w) {
          const float* q = red + (w * kCG + lane) * 3;
          chan_merge(tn, tm, tM, q[0], q[1], q[2]);
        }
        float* pp = a.part + (pidx * a.C + c) * 3;
        pp[0] = tn;
        pp[1] = tm;
        pp[2] = tM;
      }
    }
  }
}

template <typename T, int K, bool CL>
cudaError_t launch_fwd_tiled(const TileArgs& a, const TilePlan& p, cudaStream_t stream) {
  static SmemOptIn opted;
  return launch_planned(dw_fwd_tiled_kernel<T, K, CL>, opted, a, p, stream);
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
