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
// compile-time constants of each kernel's loop (with_variant, below): one straight path per launch,
// where a run-time switch per element made every loop body hold all five activations and both orders.
using dwcuda::act_fwd_t;
using dwcuda::from_f;
using dwcuda::to_f;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ----------------------------------------------------------------------------------------------
// The per-element work of each mode.  Every loop is compiled for one Variant: the mode, the
// activation, the order, and whether the launch has a bias to add (kBnAct/kStats) and a second
// input (kBnAct: the residual; kDpre: dy, always).  Run-time flags tested per element had made the
// loops carry both paths (select, predicated adds) and every per-channel constant of every mode in
// registers: the bf16 channels_last passes ran 19-65 SASS instructions an element (sm_90a), so they
// were bound by instruction issue, not by memory (an H200 profile had them at 15-40% of bandwidth).
template <Mode M, int A, bool FIRST, bool BIAS, bool IN2, bool OUTF = false>
struct Variant {
  static constexpr Mode kMode = M;
  static constexpr int kAct = A;
  static constexpr bool kFirst = FIRST, kBias = BIAS, kIn2 = IN2;
  static constexpr bool kOutF = OUTF;  // kDpre: float output (ChannelParams::out_f32)
};

// Calls f(Variant<...>{}) for the launch's variant.  kStats without act_first reduces pre itself: no
// activation.  kBnAct takes a bias or a residual, not both (the host checks: pw.cpp run_bn_act).
// OUTF: the kernel has a float-output variant (kDpre, 16-bit storage).
template <Mode MODE, bool OUTF, typename F>
__device__ __forceinline__ void with_variant(const ChannelParams& p, F&& f) {
  const auto by_inputs = [&](auto A, auto FI) {
    constexpr int AC = decltype(A)::value;
    constexpr bool FC = decltype(FI)::value;
    if constexpr (MODE == Mode::kDpre) {
      if constexpr (OUTF) {
        if (p.out_f32) {
          f(Variant<MODE, AC, FC, false, true, true>{});
          return;
        }
      }
      f(Variant<MODE, AC, FC, false, true>{});
    } else if constexpr (MODE == Mode::kStats) {
      if (p.bias) f(Variant<MODE, AC, FC, true, false>{});
      else f(Variant<MODE, AC, FC, false, false>{});
    } else {
      if (p.bias) f(Variant<MODE, AC, FC, true, false>{});
      else if (p.in2) f(Variant<MODE, AC, FC, false, true>{});
      else f(Variant<MODE, AC, FC, false, false>{});
    }
  };
  if (p.act_first) {
    dwcuda::with_act(p.act, [&](auto A) { by_inputs(A, std::true_type{}); });
  } else if constexpr (MODE == Mode::kStats) {
    by_inputs(dwcuda::ActTag<0>{}, std::false_type{});
  } else {
    dwcuda::with_act(p.act, [&](auto A) { by_inputs(A, std::false_type{}); });
  }
}

// The per-channel constants a variant uses, loaded once per thread; the others are compile-time
// constants, so they take no registers.
struct ChanConsts {
  float bias;
  dwcuda::ChanCoef k;  // scale, shift, mean, ca, cb, cd
};

template <typename V>
__device__ __forceinline__ ChanConsts load_consts(const ChannelParams& p, int64_t c) {
  ChanConsts q{0.f, {1.f, 0.f, 0.f, 0.f, 0.f, 0.f}};
  if constexpr (V::kBias) q.bias = p.bias[c];
  if constexpr (V::kMode == Mode::kBnAct || (V::kMode == Mode::kDpre && !V::kFirst)) {
    q.k.scale = p.scale[c];
    q.k.shift = p.shift[c];
  }
  if constexpr (V::kMode == Mode::kDpre) {
    q.k.mean = p.mean[c];
    q.k.ca = p.ca[c];
    q.k.cb = p.cb[c];
    q.k.cd = p.cd[c];
  }
  return q;
}

// out = the mode's output element; s = what the mode reduces: u (kStats), the rounded dpre (kDpre).
// pre = in, or round(in + bias) when the bias was not fused into the GEMM.
template <typename T, typename V>
__device__ __forceinline__ void apply(const ChanConsts& q, T in, T in2, T& out, float& s) {
  constexpr int A = V::kAct;
  T pre = in;
  if constexpr (V::kBias) pre = from_f<T>(to_f<T>(in) + q.bias);
  if constexpr (V::kMode == Mode::kBnAct) {  // in2: the residual
    const float y = dwcuda::bn_act_t<A>(to_f<T>(pre), q.k.scale, q.k.shift, V::kFirst);
    out = from_f<T>(V::kIn2 ? y + to_f<T>(in2) : y);
  } else if constexpr (V::kMode == Mode::kStats) {
    out = pre;
    const float v = to_f<T>(pre);
    s = V::kFirst ? act_fwd_t<A>(v) : v;
  } else {  // kDpre: the gradient at pre (in2: dy), as torch_ops.bn_act_bwd and the depthwise backward
    out = from_f<T>(dwcuda::dpre_t<A>(to_f<T>(in2), to_f<T>(pre), q.k, V::kFirst));
    s = to_f<T>(out);  // dbias sums the rounded dpre, the GEMM operand
  }
}

// Which tensors a variant reads and writes.
template <typename V>
constexpr bool reads_in2() {
  return V::kIn2;
}
template <typename V>
constexpr bool writes_out() {
  return V::kMode != Mode::kStats || V::kBias;
}
// Rows (vectors) a thread loads together: more loads in flight per thread, within the registers
// (only the constants a variant uses are held).
template <Mode MODE>
constexpr int unroll() {
  return MODE == Mode::kDpre ? 2 : 4;
}
// Blocks an SM must hold (__launch_bounds__), so 128 registers a thread: with 3 (80 registers) the
// 16-bit kernels spilled 0.5-3 KB (ptxas, sm_90a, 2026-11-27).
constexpr int kMinBlocks = 2;
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

// Accumulates one step of NV channels (or one channel's NV vectors, NCHW) that share the valid
// entries ok[0..CNT): every channel has the same count, so the count's reciprocal and the merge
// weight cnt / (n + cnt) are computed once per step, not per channel (each was an fp32 division).
// Same arithmetic per channel as dwcuda::chan_merge, with f computed once.
template <Mode MODE, int NV, int CNT>
__device__ __forceinline__ void accumulate(Acc (&a)[NV], const float (&v)[NV][CNT], const bool (&ok)[CNT]) {
  if constexpr (MODE == Mode::kDpre) {
#pragma unroll
    for (int c = 0; c < NV; ++c)
#pragma unroll
      for (int i = 0; i < CNT; ++i)
        if (ok[i]) a[c].n += v[c][i];
  } else if constexpr (MODE == Mode::kStats) {
    float cnt = 0.f;
#pragma unroll
    for (int i = 0; i < CNT; ++i) cnt += ok[i] ? 1.f : 0.f;
    if (cnt == 0.f) return;
    const float inv = cnt == float(CNT) ? 1.f / float(CNT) : 1.f / cnt;  // exact for CNT a power of two
    const float n = a[0].n, nn = n + cnt, f = cnt / nn;  // a[c].n is the same for every c
#pragma unroll
    for (int c = 0; c < NV; ++c) {
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < CNT; ++i)
        if (ok[i]) sum += v[c][i];
      const float ml = sum * inv;
      float m2 = 0.f;
#pragma unroll
      for (int i = 0; i < CNT; ++i)
        if (ok[i]) m2 = fmaf(v[c][i] - ml, v[c][i] - ml, m2);
      const float d = ml - a[c].m;
      a[c].m = a[c].m + d * f;
      a[c].M2 = a[c].M2 + m2 + (d * (n * f)) * d;  // 0 when n == 0, even for |d| past 1e19
      a[c].n = nn;
    }
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

// VEC storage elements as one load / store (16 bytes when VEC is the full vector).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* src) {
  return *reinterpret_cast<const Pack<T, VEC>*>(src);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, VEC>& v) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&v);  // one 16-byte store
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(dst) = v;
  }
}

// kDpre with a float output (ChannelParams::out_f32): VEC unrounded dpre values from pre and dy at
// dst, 16-byte stores when VEC is a multiple of 4 (dst is then 16-byte aligned: VEC-element offsets
// into the pass's own buffer).  q[v * qstride]: element v's channel constants.
template <typename T, int VEC, typename V>
__device__ __forceinline__ void store_dpre_f32(float* dst, const ChanConsts* q, int qstride, const Pack<T, VEC>& pre,
                                               const Pack<T, VEC>& dy) {
  float yo[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v)
    yo[v] = dwcuda::dpre_t<V::kAct>(to_f<T>(dy.v[v]), to_f<T>(pre.v[v]), q[v * qstride].k, V::kFirst);
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int v = 0; v < VEC; v += 4)
      *reinterpret_cast<float4*>(dst + v) = make_float4(yo[v], yo[v + 1], yo[v + 2], yo[v + 3]);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) dst[v] = yo[v];
  }
}

// ----------------------------------------------------------------------------------------------
// channels_last: the (M, C) row-major matrix, M = N*H*W.  Block (kTX, kTY): lane tx owns the VEC
// channels [c0, c0 + VEC), c0 = (blockIdx.x*kTX + tx)*VEC, row ty walks rows m = m_begin + ty,
// + kTY, ... of the chunk blockIdx.y.  VEC > 1 only when C % VEC == 0.
template <typename T, int VEC, typename V>
__device__ __forceinline__ void cl_loop(const ChannelParams& p, int64_t c0, int64_t m_begin, int64_t m_end,
                                        Acc (&acc)[VEC]) {
  constexpr Mode MODE = V::kMode;
  constexpr int U = unroll<MODE>();
  const int64_t C = p.C;
  ChanConsts q[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) q[v] = load_consts<V>(p, c0 + v);
  // U rows per step, kTY apart: their loads issued together (several 16-byte loads in flight per
  // thread), then applied, stored and accumulated in order.  Pointers advance by a step's rows.
  const int64_t row = int64_t(kTY) * C;
  const int64_t m0 = m_begin + threadIdx.y;
  const T* in = static_cast<const T*>(p.in) + m0 * C + c0;
  const T* in2 = static_cast<const T*>(p.in2) + (reads_in2<V>() ? m0 * C + c0 : 0);
  T* out = static_cast<T*>(p.out) + (writes_out<V>() && !V::kOutF ? m0 * C + c0 : 0);
  float* outf = static_cast<float*>(p.out) + (V::kOutF ? m0 * C + c0 : 0);
  for (int64_t m = m0; m < m_end; m += U * kTY, in += U * row) {
    Pack<T, VEC> xi[U], gi[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = m + u * kTY < m_end;
      if (ok[u]) {
        xi[u] = load_pack<T, VEC>(in + u * row);
        if constexpr (reads_in2<V>()) gi[u] = load_pack<T, VEC>(in2 + u * row);
      }
    }
    float sv[VEC][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) sv[v][u] = 0.f;
      if (ok[u]) {
        if constexpr (V::kOutF) {
          store_dpre_f32<T, VEC, V>(outf + u * row, q, 1, xi[u], gi[u]);
        } else {
          Pack<T, VEC> yo;
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            apply<T, V>(q[v], xi[u].v[v], reads_in2<V>() ? gi[u].v[v] : xi[u].v[v], yo.v[v], sv[v][u]);
          if constexpr (writes_out<V>()) store_pack<T, VEC>(out + u * row, yo);
        }
      }
    }
    if constexpr (num_sums<MODE>() > 0 && !V::kOutF) accumulate<MODE, VEC, U>(acc, sv, ok);
    if constexpr (reads_in2<V>()) in2 += U * row;
    if constexpr (writes_out<V>()) {
      if constexpr (V::kOutF) outf += U * row;
      else out += U * row;
    }
  }
}

template <typename T, int VEC, Mode MODE>
__global__ void __launch_bounds__(kThreads, kMinBlocks) channel_cl_kernel(const ChannelParams p) {
  constexpr int NS = num_sums<MODE>();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t C = p.C;
  const int64_t M = p.N * p.HW;
  const int64_t c0 = (int64_t(blockIdx.x) * kTX + tx) * VEC;
  const bool active = c0 < C;
  const int64_t m_begin = int64_t(blockIdx.y) * p.chunk;
  const int64_t m_end = m_begin + p.chunk < M ? m_begin + p.chunk : M;

  Acc acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = kAcc0;
  constexpr bool OUTF = MODE == Mode::kDpre && !std::is_same<T, float>::value;  // float T: out is float already
  if (active) with_variant<MODE, OUTF>(p, [&](auto V) { cl_loop<T, VEC, decltype(V)>(p, c0, m_begin, m_end, acc); });

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
template <typename T, int VEC, typename V>
__device__ __forceinline__ void nchw_loop(const ChannelParams& p, int64_t c, Acc (&acc)[1]) {
  constexpr Mode MODE = V::kMode;
  constexpr int U = unroll<MODE>();
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
  const ChanConsts q = load_consts<V>(p, c);
  const T* in = static_cast<const T*>(p.in);
  const T* in2 = static_cast<const T*>(p.in2);
  T* out = static_cast<T*>(p.out);
  // U vectors per step, loads first (as in the channels_last kernel), then applied and accumulated in order.
  for (; qv < qv_end; qv += U * kThreads) {
    int64_t off[U];
    Pack<T, VEC> xi[U], gi[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      off[u] = (n * p.C + c) * HW + hv * VEC;
      ok[u] = qv + u * kThreads < qv_end;
      if (ok[u]) {
        xi[u] = load_pack<T, VEC>(in + off[u]);
        if constexpr (reads_in2<V>()) gi[u] = load_pack<T, VEC>(in2 + off[u]);
      }
      hv += dh;
      n += dn;
      if (hv >= HWv) {
        hv -= HWv;
        ++n;
      }
    }
    float sv[1][U * VEC];
    bool okv[U * VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        okv[u * VEC + v] = ok[u];
        sv[0][u * VEC + v] = 0.f;
      }
      if (ok[u]) {
        if constexpr (V::kOutF) {  // (never channel-major: the depthwise backward's operand)
          store_dpre_f32<T, VEC, V>(static_cast<float*>(p.out) + off[u], &q, 0, xi[u], gi[u]);
          continue;
        }
        Pack<T, VEC> yo;
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          apply<T, V>(q, xi[u].v[v], reads_in2<V>() ? gi[u].v[v] : xi[u].v[v], yo.v[v], sv[0][u * VEC + v]);
        if constexpr (writes_out<V>()) {
          const int64_t out_off = p.out_channel_major ? c * L + (qv + u * kThreads) * VEC : off[u];
          store_pack<T, VEC>(out + out_off, yo);
        }
      }
    }
    if constexpr (num_sums<MODE>() > 0 && !V::kOutF) accumulate<MODE, 1, U * VEC>(acc, sv, okv);
  }
}

template <typename T, int VEC, Mode MODE>
__global__ void __launch_bounds__(kThreads, kMinBlocks) channel_nchw_kernel(const ChannelParams p) {
  constexpr int NS = num_sums<MODE>();
  const int64_t c = blockIdx.x;
  Acc acc[1] = {kAcc0};
  constexpr bool OUTF = MODE == Mode::kDpre && !std::is_same<T, float>::value;  // float T: out is float already
  with_variant<MODE, OUTF>(p, [&](auto V) { nchw_loop<T, VEC, decltype(V)>(p, c, acc); });

  if constexpr (NS > 0) {
    if (p.partial == nullptr) return;  // uniform over the block
    __shared__ Acc red[kThreads / 32];
    Acc a = acc[0];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Acc b{__shfl_down_sync(0xffffffffu, a.n, o), __shfl_down_sync(0xffffffffu, a.m, o),
                  __shfl_down_sync(0xffffffffu, a.M2, o)};
      merge<MODE>(a, b);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc t = red[0];
      for (int w = 1; w < kThreads / 32; ++w) merge<MODE>(t, red[w]);
      store_partial<MODE>(p, blockIdx.y, c, t);
    }
  }
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
  if (dsum != nullptr) {  // the depthwise ops' coalesced fixed-order finalize, one column per channel
    C10_CUDA_CHECK(dwcuda::launch_sum_finalize(p.partial, p.R, p.C, 1, dsum, 1, nullptr, nullptr, stream));
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

// The CUTLASS statistics GEMM's finalize (pw_cutlass_stats.cuh): sums and sqs are [T][ld] per-tile fp32
// column sums of u and u * u over the M rows; mean = S / M and the biased var = Q / M - mean^2, with S and Q
// added in double in tile order (warp w takes tiles w, w + kTileFinWarps, ... in order, then warp 0 adds the
// warps' sums in order), so bitwise reproducible.  A block owns 32 consecutive channels, one a lane: one
// coalesced segment a tile (as dwcuda's sum_finalize_kernel).
constexpr int kTileFinWarps = 8;
__global__ void __launch_bounds__(32 * kTileFinWarps)
    tile_stats_finalize_kernel(const float* __restrict__ sums, const float* __restrict__ sqs, int64_t T, int64_t ld,
                               int64_t C, int64_t M, float* __restrict__ mean, float* __restrict__ var) {
  __shared__ double red[2][kTileFinWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool ok = c < C;
  double s = 0.0, q = 0.0;
  if (ok) {
    for (int64_t t = warp; t < T; t += kTileFinWarps) {
      s += static_cast<double>(sums[t * ld + c]);
      q += static_cast<double>(sqs[t * ld + c]);
    }
  }
  red[0][warp][lane] = s;
  red[1][warp][lane] = q;
  __syncthreads();
  if (warp != 0 || !ok) return;
  for (int w = 1; w < kTileFinWarps; ++w) {
    s += red[0][w][lane];
    q += red[1][w][lane];
  }
  const double m = s / static_cast<double>(M);
  const double v = q / static_cast<double>(M) - m * m;
  mean[c] = static_cast<float>(m);
  var[c] = static_cast<float>(v > 0.0 ? v : (v == v ? 0.0 : v));  // rounding may leave a tiny negative; NaN stays
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

void launch_tile_stats_finalize(const float* sums, const float* sqs, int64_t T, int64_t ld, int64_t C, int64_t M,
                                float* mean, float* var, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(C, 32));
  CMK_LAUNCH(tile_stats_finalize_kernel, blocks, 32 * kTileFinWarps, 0, stream)(sums, sqs, T, ld, C, M, mean, var);
  C10_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pw
}  // namespace convmixer_kernels
