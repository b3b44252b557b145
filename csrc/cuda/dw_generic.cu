// Direct (untiled) kernels for kernel sizes without a tiled instantiation (k = 1, 17..31): one
// thread per output, reading its inputs through the cache.  Simple and correct; not tuned.
#include "dw_common.cuh"

namespace convmixer_kernels {
namespace dwcuda {
namespace {

constexpr int kThreads = 256;

struct Pos {
  int64_t n, c;
  int h, w;
};

__device__ __forceinline__ Pos decode(int64_t e, const DirectArgs& a) {
  Pos p;
  if (!a.cl) {
    p.w = static_cast<int>(e % a.W);
    int64_t t = e / a.W;
    p.h = static_cast<int>(t % a.H);
    t /= a.H;
    p.c = t % a.C;
    p.n = t / a.C;
  } else {
    p.c = e % a.C;
    int64_t t = e / a.C;
    p.w = static_cast<int>(t % a.W);
    t /= a.W;
    p.h = static_cast<int>(t % a.H);
    p.n = t / a.H;
  }
  return p;
}

__device__ __forceinline__ int64_t index_of(const DirectArgs& a, int64_t n, int64_t c, int h, int w) {
  return a.cl ? ((n * a.H + h) * a.W + w) * a.C + c : ((n * a.C + c) * a.H + h) * a.W + w;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dw_fwd_direct_kernel(const DirectArgs a) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int K = a.k, P = K / 2;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int64_t total = a.N * a.C * a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Pos p = decode(e, a);
    const float* wc = a.w + p.c * K * K;
    float acc = 0.f;
    for (int r = 0; r < K; ++r) {
      const int hh = p.h + r - P;
      if (hh < 0 || hh >= H) continue;
      for (int q = 0; q < K; ++q) {
        const int ww = p.w + q - P;
        if (ww < 0 || ww >= W) continue;
        acc = fmaf(to_f<T>(x[index_of(a, p.n, p.c, hh, ww)]), wc[r * K + q], acc);
      }
    }
    const float pre = round_to<T>(acc + (a.bias != nullptr ? a.bias[p.c] : 0.f));
    if (a.stats) {
      out[e] = from_f<T>(pre);
      continue;
    }
    const float scale = a.scale[p.c], shift = a.shift[p.c];
    float y = a.act_first ? __fadd_rn(__fmul_rn(scale, act_fwd(pre, a.act)), shift)
                          : act_fwd(affine(pre, scale, shift), a.act);
    if (a.residual) y = y + to_f<T>(x[e]);
    out[e] = from_f<T>(y);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dw_dpre_kernel(const DirectArgs a) {
  const T* dy = static_cast<const T*>(a.dy);
  const T* pre = static_cast<const T*>(a.pre);
  const int64_t total = a.N * a.C * a.H * a.W;
  const int64_t HW = a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = a.cl ? e % a.C : (e / HW) % a.C;
    const ChanCoef q{a.scale[c], a.shift[c], a.mean[c], a.ca[c], a.cb[c], a.cd[c]};
    a.dpre[e] = dpre_of(to_f<T>(dy[e]), to_f<T>(pre[e]), q, a.act, a.act_first);
  }
}

// dx(h, w) = sum_{r,q} dpre(h - r + P, w - q + P) * w[r][q]  [+ dy]
template <typename T>
__global__ void __launch_bounds__(kThreads) dw_dx_direct_kernel(const DirectArgs a) {
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.out);
  const int K = a.k, P = K / 2;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int64_t total = a.N * a.C * a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Pos p = decode(e, a);
    const float* wc = a.w + p.c * K * K;
    float acc = 0.f;
    for (int r = 0; r < K; ++r) {
      const int hh = p.h - r + P;
      if (hh < 0 || hh >= H) continue;
      for (int q = 0; q < K; ++q) {
        const int ww = p.w - q + P;
        if (ww < 0 || ww >= W) continue;
        acc = fmaf(a.dpre[index_of(a, p.n, p.c, hh, ww)], wc[r * K + q], acc);
      }
    }
    if (a.residual) acc = acc + to_f<T>(dy[e]);
    dx[e] = from_f<T>(acc);
  }
}

// Block = (split, channel, tap): sum over the split's (n, h, w) of x(h + r - P, w + q - P) * dpre(h, w)
// (tap = r * K + q), or of dpre (tap = K*K: the bias gradient).  -> part[(split * C + c) * (KK + 1) + tap]
template <typename T>
__global__ void __launch_bounds__(kThreads) dw_dweight_direct_kernel(const DirectArgs a) {
  __shared__ float red[kThreads / 32];
  const T* x = static_cast<const T*>(a.x);
  const int K = a.k, P = K / 2, KK = K * K;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int64_t split = blockIdx.x % a.nsplit;
  const int64_t ct = blockIdx.x / a.nsplit;
  const int64_t c = ct / (KK + 1);
  const int t = static_cast<int>(ct - c * (KK + 1));
  const int dr = t < KK ? t / K - P : 0, dq = t < KK ? t % K - P : 0;
  const int64_t HW = a.H * a.W;
  const int64_t M = a.N * HW;
  const int64_t per = ceil_div(M, a.nsplit);
  const int64_t m0 = split * per;
  const int64_t m1 = m0 + per < M ? m0 + per : M;
  float s = 0.f;
  for (int64_t m = m0 + threadIdx.x; m < m1; m += kThreads) {
    const int64_t n = m / HW;
    const int64_t hw = m - n * HW;
    const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
    const float d = a.dpre[index_of(a, n, c, h, w)];
    if (t == KK) {
      s += d;
    } else {
      const int hh = h + dr, ww = w + dq;
      if (hh >= 0 && hh < H && ww >= 0 && ww < W) s = fmaf(to_f<T>(x[index_of(a, n, c, hh, ww)]), d, s);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = red[0];
    for (int w = 1; w < kThreads / 32; ++w) tot += red[w];
    a.part[(split * a.C + c) * (KK + 1) + t] = tot;
  }
}

unsigned grid_for(int64_t total, const DevInfo& dev) {
  int64_t b = ceil_div(total, kThreads);
  const int64_t cap = int64_t(dev.sms) * 32;
  b = b < cap ? b : cap;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

template <typename T>
cudaError_t fwd_direct_t(const DirectArgs& a, const DevInfo& dev, cudaStream_t stream) {
  auto kern = dw_fwd_direct_kernel<T>;
  CMK_LAUNCH(kern, grid_for(a.N * a.C * a.H * a.W, dev), kThreads, 0, stream)(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_direct_t(const DirectArgs& a, const DevInfo& dev, cudaStream_t stream) {
  const int64_t total = a.N * a.C * a.H * a.W;
  auto k_dpre = dw_dpre_kernel<T>;
  CMK_LAUNCH(k_dpre, grid_for(total, dev), kThreads, 0, stream)(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  auto k_dx = dw_dx_direct_kernel<T>;
  CMK_LAUNCH(k_dx, grid_for(total, dev), kThreads, 0, stream)(a);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t KK1 = int64_t(a.k) * a.k + 1;
  auto k_dw = dw_dweight_direct_kernel<T>;
  CMK_LAUNCH(k_dw, static_cast<unsigned>(a.nsplit * a.C * KK1), kThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace

int64_t direct_dweight_splits(const DwGeom& g, const DevInfo& dev) {
  const int64_t blocks = g.C * (int64_t(g.k) * g.k + 1);
  int64_t nsplit = ceil_div(int64_t(dev.sms) * 8, blocks);
  const int64_t M = g.N * g.H * g.W;
  const int64_t cap = ceil_div(M, 1024);
  nsplit = nsplit < cap ? nsplit : cap;
  return nsplit < 1 ? 1 : nsplit;
}

cudaError_t launch_fwd_direct(const DirectArgs& a, DType dt, const DevInfo& dev, cudaStream_t stream) {
  switch (dt) {
    case kF32:
      return fwd_direct_t<float>(a, dev, stream);
    case kF16:
      return fwd_direct_t<__half>(a, dev, stream);
    case kBF16:
      return fwd_direct_t<__nv_bfloat16>(a, dev, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_bwd_direct(const DirectArgs& a, DType dt, const DevInfo& dev, cudaStream_t stream) {
  switch (dt) {
    case kF32:
      return bwd_direct_t<float>(a, dev, stream);
    case kF16:
      return bwd_direct_t<__half>(a, dev, stream);
    case kBF16:
      return bwd_direct_t<__nv_bfloat16>(a, dev, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
