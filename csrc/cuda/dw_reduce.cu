// Per-channel reductions of the depthwise ops: the dw_bwd_reduce sums (all k), the BatchNorm
// statistics of the generic-k path, and the fixed-order finalisation of per-block partials.
#include "dw_common.cuh"

namespace convmixer_kernels {
namespace dwcuda {
namespace {

constexpr int kRedThreads = 256;
constexpr int kRedWarps = kRedThreads / 32;

// What a loop reduces, at compile time (a loop body is compiled per (mode, activation, order), as
// in the pointwise passes): mode 0 the Welford (n, mean, M2) of u = act(pre) | pre; mode 1 the sums
// (sum g, sum g * (u - mean)).  With the mode, the order and the activation chosen per element at
// run time the bf16 channels_last loop was 50-180 SASS instructions an element (sm_90a) and the
// kernel was bound by instruction issue (160 us for a 100 MB read on an H200, 2026-11-27).
template <int MODE, int A, bool FIRST>
struct RedVariant {
  static constexpr int kMode = MODE, kAct = A;
  static constexpr bool kFirst = FIRST;
};

// Calls f(RedVariant<MODE, act, act_first>{}) for the launch; mode 0 without act_first reduces pre
// itself (no activation).
template <int MODE, typename F>
__device__ __forceinline__ void with_red_variant(const ReduceArgs& a, F&& f) {
  if (a.act_first) {
    with_act(a.act, [&](auto A) { f(RedVariant<MODE, decltype(A)::value, true>{}); });
  } else if constexpr (MODE == 0) {
    f(RedVariant<0, 0, false>{});
  } else {
    with_act(a.act, [&](auto A) { f(RedVariant<MODE, decltype(A)::value, false>{}); });
  }
}

// Units (rows, or vectors) a thread loads per step: loaded before any is used, used in order.
template <int MODE>
constexpr int red_unroll() {
  return MODE == 1 ? 4 : 2;
}

// V elements of pre (and of dy when IN2) at off, as floats (a 16-byte vector when V > 1).
template <typename T, int V, bool IN2>
__device__ __forceinline__ void load_units(const T* pre, const T* dy, int64_t off, float* pv, float* gv) {
  if constexpr (V > 1) {
    load_vec<T>(pre + off, pv);
    if constexpr (IN2) load_vec<T>(dy + off, gv);
  } else {
    pv[0] = to_f<T>(pre[off]);
    if constexpr (IN2) gv[0] = to_f<T>(dy[off]);
  }
}

struct Acc3 {
  float a = 0.f, b = 0.f, c = 0.f;
};

// The per-channel constants of mode 1 (scale and shift only without act_first).
struct RedConsts {
  float scale = 1.f, shift = 0.f, mean = 0.f;
};
template <typename RV>
__device__ __forceinline__ RedConsts red_consts(const ReduceArgs& a, int64_t c) {
  RedConsts q;
  if constexpr (RV::kMode == 1) {
    q.mean = a.mean[c];
    if constexpr (!RV::kFirst) {
      q.scale = a.scale[c];
      q.shift = a.shift[c];
    }
  }
  return q;
}

// One element.  Mode 0: Welford of u into (n, mean, M2) (the generic-k statistics only).  Mode 1:
// g = dy (act_first) | dy * act'(scale*pre + shift);  u = act(pre) (act_first) | pre;
// (s0, s1) += (g, g * (u - mean)).
template <typename RV>
__device__ __forceinline__ void acc_elem(Acc3& s, float dyv, float prev, const RedConsts& q) {
  constexpr int A = RV::kAct;
  if constexpr (RV::kMode == 0) {
    const float u = RV::kFirst ? act_fwd_t<A>(prev) : prev;
    s.a += 1.f;
    const float d = u - s.b;
    s.b += d / s.a;
    s.c = fmaf(d, u - s.b, s.c);
  } else {
    float g, u;
    if constexpr (RV::kFirst) {
      g = dyv;
      u = act_fwd_t<A>(prev);
    } else {
      g = __fmul_rn(dyv, act_grad_t<A>(affine(prev, q.scale, q.shift)));
      u = prev;
    }
    s.a += g;
    s.b = fmaf(g, u - q.mean, s.b);
  }
}

template <int MODE>
__device__ __forceinline__ void acc_merge(Acc3& s, const Acc3& o) {
  if constexpr (MODE == 0) {
    chan_merge(s.a, s.b, s.c, o.a, o.b, o.c);
  } else {
    s.a += o.a;
    s.b += o.b;
  }
}

// A block's result for channel c of split `split` -> part[(split * C + c) * M], M = 3 (mode 0) | 2.
template <int MODE>
__device__ __forceinline__ void store_part(const ReduceArgs& a, int64_t split, int64_t c, const Acc3& t) {
  constexpr int M = MODE == 0 ? 3 : 2;
  float* pp = a.part + (split * a.C + c) * M;
  pp[0] = t.a;
  pp[1] = t.b;
  if constexpr (MODE == 0) pp[2] = t.c;
}

// NCHW: block = (split, channel); the channel's elements are N planes of HW, walked in units of
// V elements (16-byte vectors when V > 1).  Block result -> part[(split * C + c) * M].
template <typename T, int V, typename RV>
__device__ __forceinline__ void nchw_red_loop(const ReduceArgs& a, int64_t c, int64_t u0, int64_t u1, Acc3& s) {
  constexpr int U = red_unroll<RV::kMode>();
  constexpr bool IN2 = RV::kMode == 1;
  const int tid = threadIdx.x;
  const T* dy = static_cast<const T*>(a.dy);
  const T* pre = static_cast<const T*>(a.pre);
  const RedConsts q = red_consts<RV>(a, c);
  const int64_t upp = a.HW / V;
  for (int64_t u = u0 + tid; u < u1; u += U * kRedThreads) {
    float pv[U][V], gv[U][V];
#pragma unroll
    for (int r = 0; r < U; ++r) {
      const int64_t ur = u + r * kRedThreads;
      if (ur < u1) {
        const int64_t n = ur / upp;
        const int64_t off = (n * a.C + c) * a.HW + (ur - n * upp) * V;
        load_units<T, V, IN2>(pre, dy, off, pv[r], gv[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < U; ++r) {
      if (u + r * kRedThreads < u1) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc_elem<RV>(s, IN2 ? gv[r][j] : 0.f, pv[r][j], q);
      }
    }
  }
}

template <typename T, int V, int MODE>
__global__ void __launch_bounds__(kRedThreads, 2) channel_reduce_nchw_kernel(const ReduceArgs a, int64_t nsplit) {
  __shared__ Acc3 red[kRedWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t split = blockIdx.x % nsplit;
  const int64_t c = blockIdx.x / nsplit;
  const int64_t units = a.N * (a.HW / V);
  const int64_t per = ceil_div(units, nsplit);
  const int64_t u0 = split * per;
  const int64_t u1 = u0 + per < units ? u0 + per : units;
  Acc3 s;
  with_red_variant<MODE>(a, [&](auto RV) { nchw_red_loop<T, V, decltype(RV)>(a, c, u0, u1, s); });
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Acc3 o;
    o.a = __shfl_down_sync(0xffffffffu, s.a, off);
    o.b = __shfl_down_sync(0xffffffffu, s.b, off);
    o.c = __shfl_down_sync(0xffffffffu, s.c, off);
    acc_merge<MODE>(s, o);
  }
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (tid == 0) {
    Acc3 t = red[0];
    for (int w = 1; w < kRedWarps; ++w) acc_merge<MODE>(t, red[w]);
    store_part<MODE>(a, split, c, t);
  }
}

// channels_last: the tensor is a row-major [N*HW][C] matrix.  Block = (split, chunk of 32*V
// channels); lane l owns channels chunk*32V + l*V .. + V-1, warps stride over the split's rows.
template <typename T, int V, typename RV>
__device__ __forceinline__ void nhwc_red_loop(const ReduceArgs& a, int64_t c0, int64_t m0, int64_t m1, Acc3 (&s)[V]) {
  constexpr int U = red_unroll<RV::kMode>();
  constexpr bool IN2 = RV::kMode == 1;
  const int warp = threadIdx.x >> 5;
  const T* dy = static_cast<const T*>(a.dy);
  const T* pre = static_cast<const T*>(a.pre);
  RedConsts q[V];
#pragma unroll
  for (int j = 0; j < V; ++j) q[j] = red_consts<RV>(a, c0 + j);
  for (int64_t m = m0 + warp; m < m1; m += U * kRedWarps) {
    float pv[U][V], gv[U][V];
#pragma unroll
    for (int r = 0; r < U; ++r)
      if (m + r * kRedWarps < m1) load_units<T, V, IN2>(pre, dy, (m + r * kRedWarps) * a.C + c0, pv[r], gv[r]);
#pragma unroll
    for (int r = 0; r < U; ++r) {
      if (m + r * kRedWarps < m1) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc_elem<RV>(s[j], IN2 ? gv[r][j] : 0.f, pv[r][j], q[j]);
      }
    }
  }
}

template <typename T, int V, int MODE>
__global__ void __launch_bounds__(kRedThreads, 2) channel_reduce_nhwc_kernel(const ReduceArgs a, int64_t nsplit) {
  __shared__ Acc3 red[kRedWarps][32 * V];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t split = blockIdx.x % nsplit;
  const int64_t chunk = blockIdx.x / nsplit;
  const int64_t c0 = chunk * 32 * V + lane * V;
  const bool ok = c0 < a.C;  // V > 1 implies C % V == 0: all V channels valid
  const int64_t rows = a.N * a.HW;
  const int64_t per = ceil_div(rows, nsplit);
  const int64_t m0 = split * per;
  const int64_t m1 = m0 + per < rows ? m0 + per : rows;
  Acc3 s[V];
  if (ok) with_red_variant<MODE>(a, [&](auto RV) { nhwc_red_loop<T, V, decltype(RV)>(a, c0, m0, m1, s); });
#pragma unroll
  for (int j = 0; j < V; ++j) red[warp][lane * V + j] = s[j];
  __syncthreads();
  if (warp == 0 && ok) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      Acc3 t = red[0][lane * V + j];
      for (int w = 1; w < kRedWarps; ++w) acc_merge<MODE>(t, red[w][lane * V + j]);
      store_part<MODE>(a, split, c0 + j, t);
    }
  }
}

// One warp per channel: lanes merge strided partials in double, then a fixed shuffle tree.
__global__ void stats_finalize_kernel(const float* __restrict__ part, int64_t P, int64_t C,
                                      float* __restrict__ mean, float* __restrict__ var) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warps only
  double n = 0.0, m = 0.0, M2 = 0.0;
  for (int64_t j = lane; j < P; j += 32) {
    const float* q = part + (j * C + c) * 3;
    chan_merge<double>(n, m, M2, q[0], q[1], q[2]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double nb = __shfl_down_sync(0xffffffffu, n, off);
    const double mb = __shfl_down_sync(0xffffffffu, m, off);
    const double Mb = __shfl_down_sync(0xffffffffu, M2, off);
    chan_merge<double>(n, m, M2, nb, mb, Mb);
  }
  if (lane == 0) {
    mean[c] = static_cast<float>(m);
    var[c] = n > 0.0 ? static_cast<float>(M2 / n) : __int_as_float(0x7fc00000);
  }
}

// Fixed-order sums of the P partials of each of the C*M columns (part is [P][C][M]): a block owns 32
// consecutive columns, one a lane, so a warp's loads of one partial row are one coalesced segment; warp w
// sums rows w, w + kFinWarps, ... in order (double), then warp 0 adds the warp sums in order.  (It was
// one thread a column walking all P rows: for the pointwise backward's 2 x 768 columns that was six
// blocks of 352-long chains of dependent loads, 41 us on an H200, 2026-11-27.)
constexpr int kFinWarps = 8;
__global__ void __launch_bounds__(32 * kFinWarps) sum_finalize_kernel(const float* __restrict__ part, int64_t P,
                                                                      int64_t C, int M, float* __restrict__ out_a,
                                                                      int Ma, float* __restrict__ out_b,
                                                                      const float* __restrict__ b_scale) {
  __shared__ double red[kFinWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t cols = C * M;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool ok = idx < cols;
  double s = 0.0;
  if (ok) {
    for (int64_t j = warp; j < P; j += kFinWarps) s += static_cast<double>(part[j * cols + idx]);
  }
  red[warp][lane] = s;
  __syncthreads();
  if (warp != 0 || !ok) return;
  for (int w = 1; w < kFinWarps; ++w) s += red[w][lane];
  const int64_t c = idx / M;
  const int m = static_cast<int>(idx - c * M);
  if (m < Ma) {
    out_a[c * Ma + m] = static_cast<float>(s);
  } else {
    out_b[c] = b_scale != nullptr ? static_cast<float>(s) * b_scale[c] : static_cast<float>(s);
  }
}

template <typename T, int MODE>
cudaError_t launch_reduce_t(const ReduceArgs& a, bool cl, int64_t nsplit, bool vec, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  if (!cl) {
    const unsigned blocks = static_cast<unsigned>(nsplit * a.C);
    auto kern = vec ? channel_reduce_nchw_kernel<T, V, MODE> : channel_reduce_nchw_kernel<T, 1, MODE>;
    CMK_LAUNCH(kern, blocks, kRedThreads, 0, stream)(a, nsplit);
  } else {
    const int cpb = 32 * (vec ? V : 1);
    const unsigned blocks = static_cast<unsigned>(nsplit * ceil_div(a.C, cpb));
    auto kern = vec ? channel_reduce_nhwc_kernel<T, V, MODE> : channel_reduce_nhwc_kernel<T, 1, MODE>;
    CMK_LAUNCH(kern, blocks, kRedThreads, 0, stream)(a, nsplit);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_reduce_t(const ReduceArgs& a, bool cl, int64_t nsplit, bool vec, cudaStream_t stream) {
  return a.mode == 0 ? launch_reduce_t<T, 0>(a, cl, nsplit, vec, stream)
                     : launch_reduce_t<T, 1>(a, cl, nsplit, vec, stream);
}

}  // namespace

int64_t reduce_splits(const DwGeom& g, const DevInfo& dev) {
  const int64_t target = int64_t(dev.sms) * 8;
  const int64_t M = g.N * g.H * g.W;  // elements per channel
  int64_t nsplit;
  if (!g.cl) {
    nsplit = ceil_div(target, g.C);
    const int64_t cap = M / 4096 > 1 ? M / 4096 : 1;
    nsplit = nsplit < cap ? nsplit : cap;
  } else {
    nsplit = ceil_div(target, ceil_div(g.C, 256));
    const int64_t cap = M / 64 > 1 ? M / 64 : 1;
    nsplit = nsplit < cap ? nsplit : cap;
  }
  return nsplit < 1 ? 1 : nsplit;
}

cudaError_t launch_channel_reduce(const ReduceArgs& a, const DwGeom& g, int64_t nsplit, bool vec,
                                  cudaStream_t stream) {
  // NCHW vectors run along HW within a plane: they need HW % V == 0 (checked here).
  const int V = g.dtype == kF32 ? 4 : 8;
  if (!g.cl) vec = vec && (a.HW % V == 0);
  switch (g.dtype) {
    case kF32:
      return launch_reduce_t<float>(a, g.cl, nsplit, vec, stream);
    case kF16:
      return launch_reduce_t<__half>(a, g.cl, nsplit, vec, stream);
    case kBF16:
      return launch_reduce_t<__nv_bfloat16>(a, g.cl, nsplit, vec, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_stats_finalize(const float* part, int64_t P, int64_t C, float* mean, float* var,
                                  cudaStream_t stream) {
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>(ceil_div(C, threads / 32));
  CMK_LAUNCH(stats_finalize_kernel, blocks, threads, 0, stream)(part, P, C, mean, var);
  return cudaGetLastError();
}

cudaError_t launch_sum_finalize(const float* part, int64_t P, int64_t C, int M, float* out_a, int Ma,
                                float* out_b, const float* b_scale, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(C * M, 32));
  CMK_LAUNCH(sum_finalize_kernel, blocks, 32 * kFinWarps, 0, stream)(part, P, C, M, out_a, Ma, out_b, b_scale);
  return cudaGetLastError();
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
