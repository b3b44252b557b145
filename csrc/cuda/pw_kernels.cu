// Per-channel passes of the pointwise / stem / elementwise-BN ops (see pw.cuh, pw.cpp).
// One traversal for every pass: each block owns a set of channels and a chunk of the N*H*W
// positions, so a pass can keep per-channel sums in registers, reduce them inside the block in a
// fixed order and write one partial per (chunk, channel); a finalize kernel then reduces the
// partials of each channel in a fixed order.  No atomics: bitwise deterministic.
// 16-byte vector loads/stores where shapes and pointers allow it (VEC elements), scalar otherwise.
// All arithmetic in float; values are rounded to the storage dtype T exactly where the spec
// (convmixer_kernels/torch_ops.py) rounds.
#ifndef CMK_EMULATE  // the CPU emulator (tests/cuda_emu) defines the launch check itself
#include <c10/cuda/CUDAException.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "dw_common.cuh"  // conversions, activations, chan_merge, launch_stats_finalize (shared)
#include "launch.cuh"
#include "pw.cuh"

namespace convmixer_kernels {
namespace pw {
namespace {

constexpr int kThreads = 256;
constexpr int kTX = 32;             // channels_last: channel vectors per block (one warp wide)
constexpr int kTY = kThreads / kTX;  // channels_last: rows per block iteration

// Storage <-> float and the activations (codes as in torch_ops.ACTIVATIONS): the depthwise kernels'
// (dw_common.cuh), so both paths compute the same values.  The activation and the order are
// compile-time constants of each kernel's loop (with_act_order, below): one straight path per launch,
// where a run-time switch per element made every loop body hold all five activations and both orders.
using dwcuda::act_fwd_t;
using dwcuda::from_f;
using dwcuda::to_f;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ----------------------------------------------------------------------------------------------
// The per-element work of each mode.  Per-channel constants are loaded once per thread.
struct ChanConsts {
  float bias;
  dwcuda::ChanCoef k;  // scale, shift, mean, ca, cb, cd
};

__device__ __forceinline__ ChanConsts load_consts(const ChannelParams& p, int64_t c) {
  ChanConsts q;
  q.bias = p.bias ? p.bias[c] : 0.f;
  q.k.scale = p.scale ? p.scale[c] : 1.f;
  q.k.shift = p.shift ? p.shift[c] : 0.f;
  q.k.mean = p.mean ? p.mean[c] : 0.f;
  q.k.ca = p.ca ? p.ca[c] : 0.f;
  q.k.cb = p.cb ? p.cb[c] : 0.f;
  q.k.cd = p.cd ? p.cd[c] : 0.f;
  return q;
}

// Calls f(ActTag<act>, bool_constant<act_first>) for the launch's activation and order.  kStats
// without act_first reduces pre itself: no activation, one instantiation.
template <Mode MODE, typename F>
__device__ __forceinline__ void with_act_order(const ChannelParams& p, F&& f) {
  if (p.act_first) {
    dwcuda::with_act(p.act, [&](auto A) { f(A, std::true_type{}); });
  } else if constexpr (MODE == Mode::kStats) {
    f(dwcuda::ActTag<0>{}, std::false_type{});
  } else {
    dwcuda::with_act(p.act, [&](auto A) { f(A, std::false_type{}); });
  }
}

// pre = in, or round(in + bias) when the bias was not fused into the GEMM.
template <typename T>
__device__ __forceinline__ T pre_of(const ChannelParams& p, const ChanConsts& q, T in) {
  return p.bias ? from_f<T>(to_f<T>(in) + q.bias) : in;
}

// out = the mode's output element; s = what the mode reduces: u (kStats), the rounded dpre (kDpre).
// A: the activation, FIRST: act_first (compile-time, from with_act_order).
template <typename T, Mode MODE, int A, bool FIRST>
__device__ __forceinline__ void apply(const ChannelParams& p, const ChanConsts& q, T in, T in2, T& out, float& s) {
  if constexpr (MODE == Mode::kBnAct) {  // in2: the residual when p.in2 is set
    const float y = dwcuda::bn_act_t<A>(to_f<T>(pre_of<T>(p, q, in)), q.k.scale, q.k.shift, FIRST);
    out = from_f<T>(p.in2 ? y + to_f<T>(in2) : y);
  } else if constexpr (MODE == Mode::kStats) {
    const T pre = pre_of<T>(p, q, in);
    out = pre;
    const float v = to_f<T>(pre);
    s = FIRST ? act_fwd_t<A>(v) : v;
  } else {  // kDpre: the gradient at pre (in2: dy), as torch_ops.bn_act_bwd and the depthwise backward
    out = from_f<T>(dwcuda::dpre_t<A>(to_f<T>(in2), to_f<T>(in), q.k, FIRST));
    s = to_f<T>(out);  // dbias sums the rounded dpre, the GEMM operand
  }
}

// Which tensors a mode reads and writes.
template <Mode MODE>
__device__ __forceinline__ bool writes_out(const ChannelParams& p) {
  return MODE != Mode::kStats || p.bias != nullptr;
}
// Rows (vectors) a thread loads together: more loads in flight per thread, within the registers.
template <Mode MODE>
constexpr int unroll() {
  return MODE == Mode::kBnAct ? 4 : 2;
}
// Values a thread keeps per channel: kStats the (count, mean, M2) of u, kDpre the sum of dpre.
template <Mode MODE>
constexpr int num_sums() {
  return MODE == Mode::kStats ? 3 : MODE == Mode::kDpre ? 1 : 0;
}

// Per-channel accumulation of one thread.  kStats: each step's values (up to unroll() rows, or
// vectors, already in registers) are summarised by two passes (mean, then squared deviations) and
// Chan-merged into (n, m, M2): one pass over pre and no cancellation, whatever the mean.  kDpre:
// plain sum in order.
struct Acc {
  float n, m, M2;  // plain (no initialisers): it also lives in __shared__ arrays
};
constexpr Acc kAcc0{0.f, 0.f, 0.f};
template <Mode MODE, int CNT>
__device__ __forceinline__ void accumulate(Acc& a, const float (&v)[CNT], const bool (&ok)[CNT]) {
  if constexpr (MODE == Mode::kDpre) {
#pragma unroll
    for (int i = 0; i < CNT; ++i)
      if (ok[i]) a.n += v[i];
  } else if constexpr (MODE == Mode::kStats) {
    float cnt = 0.f, sum = 0.f;
#pragma unroll
    for (int i = 0; i < CNT; ++i)
      if (ok[i]) {
        cnt += 1.f;
        sum += v[i];
      }
    if (cnt == 0.f) return;
    const float ml = sum / cnt;
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < CNT; ++i)
      if (ok[i]) m2 = fmaf(v[i] - ml, v[i] - ml, m2);
    dwcuda::chan_merge(a.n, a.m, a.M2, cnt, ml, m2);
  }
}

// b into a (kStats: Chan merge; kDpre: sum).
template <Mode MODE>
__device__ __forceinline__ void merge(Acc& a, const Acc& b) {
  if constexpr (MODE == Mode::kStats) {
    dwcuda::chan_merge(a.n, a.m, a.M2, b.n, b.m, b.M2);
  } else {
    a.n += b.n;
  }
}

// The block's result for channel c: kStats (n, mean, M2) at partial[(chunk * C + c) * 3] (the layout
// of dwcuda::launch_stats_finalize); kDpre the sum at partial[chunk * C + c].
template <Mode MODE>
__device__ __forceinline__ void store_partial(const ChannelParams& p, int64_t chunk, int64_t c, const Acc& a) {
  if constexpr (MODE == Mode::kStats) {
    float* q = p.partial + (chunk * p.C + c) * 3;
    q[0] = a.n;
    q[1] = a.m;
    q[2] = a.M2;
  } else {
    p.partial[chunk * p.C + c] = a.n;
  }
}

// ----------------------------------------------------------------------------------------------
// channels_last: the (M, C) row-major matrix, M = N*H*W.  Block (kTX, kTY): lane tx owns the VEC
// channels [c0, c0 + VEC), c0 = (blockIdx.x*kTX + tx)*VEC, row ty walks rows m = m_begin + ty,
// + kTY, ... of the chunk blockIdx.y.  VEC > 1 only when C % VEC == 0.
template <typename T, int VEC, Mode MODE>
__global__ void __launch_bounds__(kThreads, 2) channel_cl_kernel(const ChannelParams p) {
  constexpr int NS = num_sums<MODE>();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t C = p.C;
  const int64_t M = p.N * p.HW;
  const int64_t c0 = (int64_t(blockIdx.x) * kTX + tx) * VEC;
  const bool active = c0 < C;
  const int64_t m_begin = int64_t(blockIdx.y) * p.chunk;
  const int64_t m_end = m_begin + p.chunk < M ? m_begin + p.chunk : M;

  ChanConsts q[VEC];
  Acc acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    acc[v] = kAcc0;
    if (active) q[v] = load_consts(p, c0 + v);
  }
  const T* in = static_cast<const T*>(p.in);
  const T* in2p = static_cast<const T*>(p.in2);
  T* outp = static_cast<T*>(p.out);
  const bool wr = writes_out<MODE>(p);

  if (active) with_act_order<MODE>(p, [&](auto A, auto F) {
    constexpr int AC = decltype(A)::value;
    constexpr bool FIRST = decltype(F)::value;
    // U rows per step, their loads issued together (several 16-byte loads in flight per thread: the
    // pass is bound by memory latency otherwise), then applied and accumulated in order.
    constexpr int U = unroll<MODE>();
    for (int64_t m = m_begin + ty; m < m_end; m += U * kTY) {
      Pack<T, VEC> xi[U], gi[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (m + u * kTY < m_end) {
          const int64_t off = (m + u * kTY) * C + c0;
          xi[u] = *reinterpret_cast<const Pack<T, VEC>*>(in + off);
          if (MODE != Mode::kStats && in2p) gi[u] = *reinterpret_cast<const Pack<T, VEC>*>(in2p + off);
        }
      }
      float sv[VEC][U];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        ok[u] = m + u * kTY < m_end;
#pragma unroll
        for (int v = 0; v < VEC; ++v) sv[v][u] = 0.f;
        if (ok[u]) {
          Pack<T, VEC> yo;
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            apply<T, MODE, AC, FIRST>(p, q[v], xi[u].v[v], in2p ? gi[u].v[v] : xi[u].v[v], yo.v[v], sv[v][u]);
          if (wr) *reinterpret_cast<Pack<T, VEC>*>(outp + (m + u * kTY) * C + c0) = yo;
        }
      }
      if constexpr (NS > 0) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) accumulate<MODE>(acc[v], sv[v], ok);
      }
    }
  });

  if constexpr (NS > 0) {
    if (p.partial == nullptr) return;  // uniform over the block
    __shared__ Acc red[kTY][kTX * VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[ty][tx * VEC + v] = acc[v];
    __syncthreads();
    if (ty == 0 && active) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        Acc t = red[0][tx * VEC + v];
        for (int y = 1; y < kTY; ++y) merge<MODE>(t, red[y][tx * VEC + v]);
        store_partial<MODE>(p, blockIdx.y, c0 + v, t);
      }
    }
  }
}

// NCHW: block (kThreads) owns channel c = blockIdx.x and positions j = n*HW + hw in the chunk
// blockIdx.y; thread t takes the VEC-vectors q = j/VEC = q_begin + t, + kThreads, ...
// VEC > 1 only when HW % VEC == 0 (a vector never straddles two images).
template <typename T, int VEC, Mode MODE>
__global__ void __launch_bounds__(kThreads, 2) channel_nchw_kernel(const ChannelParams p) {
  constexpr int NS = num_sums<MODE>();
  const int64_t c = blockIdx.x;
  const int64_t HW = p.HW;
  const int64_t L = p.N * HW;
  const int64_t j_begin = int64_t(blockIdx.y) * p.chunk;  // a multiple of 8, so of VEC
  const int64_t j_end = j_begin + p.chunk < L ? j_begin + p.chunk : L;
  const int64_t HWv = HW / VEC;
  const int64_t qv_end = j_end / VEC;  // exact: L and the chunk are multiples of VEC
  int64_t qv = j_begin / VEC + threadIdx.x;
  int64_t n = qv / HWv;
  int64_t hv = qv - n * HWv;
  const int64_t dn = kThreads / HWv, dh = kThreads % HWv;

  const ChanConsts q = load_consts(p, c);
  Acc acc = kAcc0;
  const T* in = static_cast<const T*>(p.in);
  const T* in2p = static_cast<const T*>(p.in2);
  T* outp = static_cast<T*>(p.out);
  const bool wr = writes_out<MODE>(p);

  // U vectors per step, loads first (as in the channels_last kernel), then applied and accumulated in order.
  with_act_order<MODE>(p, [&](auto A, auto F) {
  constexpr int AC = decltype(A)::value;
  constexpr bool FIRST = decltype(F)::value;
  constexpr int U = unroll<MODE>();
  for (; qv < qv_end; qv += U * kThreads) {
    int64_t off[U];
    Pack<T, VEC> xi[U], gi[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      off[u] = (n * p.C + c) * HW + hv * VEC;
      if (qv + u * kThreads < qv_end) {
        xi[u] = *reinterpret_cast<const Pack<T, VEC>*>(in + off[u]);
        if (MODE != Mode::kStats && in2p) gi[u] = *reinterpret_cast<const Pack<T, VEC>*>(in2p + off[u]);
      }
      hv += dh;
      n += dn;
      if (hv >= HWv) {
        hv -= HWv;
        ++n;
      }
    }
    float sv[U * VEC];
    bool ok[U * VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool here = qv + u * kThreads < qv_end;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        ok[u * VEC + v] = here;
        sv[u * VEC + v] = 0.f;
      }
      if (here) {
        Pack<T, VEC> yo;
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          apply<T, MODE, AC, FIRST>(p, q, xi[u].v[v], in2p ? gi[u].v[v] : xi[u].v[v], yo.v[v], sv[u * VEC + v]);
        const int64_t out_off = p.out_channel_major ? c * L + (qv + u * kThreads) * VEC : off[u];
        if (wr) *reinterpret_cast<Pack<T, VEC>*>(outp + out_off) = yo;
      }
    }
    if constexpr (NS > 0) accumulate<MODE>(acc, sv, ok);
  }
  });

  if constexpr (NS > 0) {
    if (p.partial == nullptr) return;  // uniform over the block
    __shared__ Acc red[kThreads / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Acc b{__shfl_down_sync(0xffffffffu, acc.n, o), __shfl_down_sync(0xffffffffu, acc.m, o),
                  __shfl_down_sync(0xffffffffu, acc.M2, o)};
      merge<MODE>(acc, b);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc t = red[0];
      for (int w = 1; w < kThreads / 32; ++w) merge<MODE>(t, red[w]);
      store_partial<MODE>(p, blockIdx.y, c, t);
    }
  }
}

// One warp per channel: fixed-order sum of the R partial sums of dpre (strided by lane, then a
// butterfly).
__global__ void __launch_bounds__(kThreads) sum_finalize_kernel(const float* partial, int64_t R, int64_t C,
                                                                float* out) {
  const int64_t c = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (c >= C) return;  // the whole warp leaves together
  float s = 0.f;
  for (int64_t r = lane; r < R; r += 32) s += partial[r * C + c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) out[c] = s;
}

// ----------------------------------------------------------------------------------------------
// Launch helpers.
template <typename T>
constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

using dwcuda::aligned16;  // nullptr counts as aligned

template <typename T, int VEC, Mode MODE>
void launch_channel_vec(const ChannelParams& p, cudaStream_t stream) {
  if (p.cl) {
    const int64_t groups = ceil_div(p.C, VEC);
    const dim3 grid(static_cast<unsigned>(ceil_div(groups, kTX)), static_cast<unsigned>(p.R));
    auto kern = channel_cl_kernel<T, VEC, MODE>;
    CMK_LAUNCH(kern, grid, dim3(kTX, kTY), 0, stream)(p);
  } else {
    const dim3 grid(static_cast<unsigned>(p.C), static_cast<unsigned>(p.R));
    auto kern = channel_nchw_kernel<T, VEC, MODE>;
    CMK_LAUNCH(kern, grid, kThreads, 0, stream)(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Mode MODE>
void launch_channel(const ChannelParams& p, cudaStream_t stream) {
  constexpr int V = max_vec<T>();
  const bool vec_ok = (p.cl ? p.C % V == 0 : p.HW % V == 0) && aligned16(p.in) && aligned16(p.in2) &&
                      aligned16(MODE == Mode::kStats && p.bias == nullptr ? nullptr : p.out);
  if (vec_ok) {
    launch_channel_vec<T, V, MODE>(p, stream);
  } else {
    launch_channel_vec<T, 1, MODE>(p, stream);
  }
}

// One pass over pre: per-block (n, mean, M2) of u (written back to pre with the bias when it was not
// fused into the GEMM), merged per channel in a fixed order in double by the depthwise statistics'
// finalize.  (The first version summed u - k with k the channel's first value: that cancelled when
// the first value sat far from the mean, and every gradient of the block inherited invstd's error;
// the fp32 weight/bias gradients of the pointwise and stem blocks failed the 2x rule on an H200.)
template <typename T>
void stats_impl(const ChannelParams& p, float* mean, float* var, cudaStream_t stream) {
  launch_channel<T, Mode::kStats>(p, stream);
  C10_CUDA_CHECK(dwcuda::launch_stats_finalize(p.partial, p.R, p.C, mean, var, stream));
}

template <typename T>
void dpre_impl(const ChannelParams& p, float* dsum, cudaStream_t stream) {
  launch_channel<T, Mode::kDpre>(p, stream);
  if (dsum != nullptr) {
    CMK_LAUNCH(sum_finalize_kernel, static_cast<unsigned>(ceil_div(p.C, kThreads / 32)), kThreads, 0, stream)(
        p.partial, p.R, p.C, dsum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define CMK_PW_DISPATCH(dt, ...)                     \
  switch (dt) {                                      \
    case DType::kFloat: {                            \
      using T = float;                               \
      __VA_ARGS__;                                   \
      break;                                         \
    }                                                \
    case DType::kHalf: {                             \
      using T = __half;                              \
      __VA_ARGS__;                                   \
      break;                                         \
    }                                                \
    case DType::kBFloat16: {                         \
      using T = __nv_bfloat16;                       \
      __VA_ARGS__;                                   \
      break;                                         \
    }                                                \
  }

}  // namespace

void launch_bn_act(const ChannelParams& p, DType dt, cudaStream_t stream) {
  CMK_PW_DISPATCH(dt, launch_channel<T, Mode::kBnAct>(p, stream));
}

void launch_stats(const ChannelParams& p, DType dt, float* mean, float* var, cudaStream_t stream) {
  CMK_PW_DISPATCH(dt, stats_impl<T>(p, mean, var, stream));
}

void launch_dpre(const ChannelParams& p, DType dt, float* dsum, cudaStream_t stream) {
  ChannelParams q = p;
  if (dsum == nullptr) q.partial = nullptr;
  CMK_PW_DISPATCH(dt, dpre_impl<T>(q, dsum, stream));
}

}  // namespace pw
}  // namespace convmixer_kernels
