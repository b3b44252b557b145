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

#include "launch.cuh"
#include "pw.cuh"

namespace convmixer_kernels {
namespace pw {
namespace {

constexpr int kThreads = 256;
constexpr int kTX = 32;             // channels_last: channel vectors per block (one warp wide)
constexpr int kTY = kThreads / kTX;  // channels_last: rows per block iteration

// ----------------------------------------------------------------------------------------------
// Storage <-> float
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ----------------------------------------------------------------------------------------------
// Activations (codes as in torch_ops.ACTIVATIONS) and their derivatives, in float, the formulas
// of torch_ops.act_fwd / act_grad.  relu'(0) = 0.
__device__ __forceinline__ float act_fwd(float v, int act) {
  switch (act) {
    case 1:
      return v < 0.f ? 0.f : v;  // NaN stays NaN, as in PyTorch
    case 2:
      return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    case 3: {
      const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(inner));
    }
    case 4:
      return v / (1.f + expf(-v));
    default:
      return v;
  }
}

__device__ __forceinline__ float act_grad(float v, int act) {
  switch (act) {
    case 1:
      return v > 0.f ? 1.f : 0.f;
    case 2: {
      const float cdf = 0.5f * (1.f + erff(v * 0.7071067811865476f));
      const float pdf = expf(-0.5f * v * v) * 0.3989422804014327f;
      return cdf + v * pdf;
    }
    case 3: {
      constexpr float k0 = 0.7978845608028654f, k1 = 0.044715f;
      const float t = tanhf(k0 * (v + k1 * v * v * v));
      return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * k0 * (1.f + 3.f * k1 * v * v);
    }
    case 4: {
      const float s = 1.f / (1.f + expf(-v));
      return s * (1.f + v * (1.f - s));
    }
    default:
      return 1.f;
  }
}

// ----------------------------------------------------------------------------------------------
// The per-element work of each mode.  Per-channel constants are loaded once per thread.
struct ChanConsts {
  float bias, scale, shift, mean, ca, cb, cd, k;
};

__device__ __forceinline__ ChanConsts load_consts(const ChannelParams& p, int64_t c) {
  ChanConsts q;
  q.bias = p.bias ? p.bias[c] : 0.f;
  q.scale = p.scale ? p.scale[c] : 1.f;
  q.shift = p.shift ? p.shift[c] : 0.f;
  q.mean = p.mean ? p.mean[c] : 0.f;
  q.ca = p.ca ? p.ca[c] : 0.f;
  q.cb = p.cb ? p.cb[c] : 0.f;
  q.cd = p.cd ? p.cd[c] : 0.f;
  q.k = p.shift_k ? p.shift_k[c] : 0.f;
  return q;
}

// pre = in, or round(in + bias) when the bias was not fused into the GEMM.
template <typename T>
__device__ __forceinline__ T pre_of(const ChannelParams& p, const ChanConsts& q, T in) {
  return p.bias ? from_f<T>(to_f<T>(in) + q.bias) : in;
}

template <typename T, Mode MODE>
__device__ __forceinline__ void apply(const ChannelParams& p, const ChanConsts& q, T in, T dy, T& out,
                                      float& a1, float& a2) {
  if constexpr (MODE == Mode::kBnAct) {
    const float v = to_f<T>(pre_of<T>(p, q, in));
    const float y = p.act_first ? q.scale * act_fwd(v, p.act) + q.shift : act_fwd(q.scale * v + q.shift, p.act);
    out = from_f<T>(y);
  } else if constexpr (MODE == Mode::kStats) {
    const T pre = pre_of<T>(p, q, in);
    out = pre;
    const float v = to_f<T>(pre);
    const float d = (p.act_first ? act_fwd(v, p.act) : v) - q.k;
    a1 += d;
    a2 += d * d;
  } else {  // kDpre: the gradient at pre, as torch_ops.bn_act_bwd
    const float v = to_f<T>(in);
    float g = to_f<T>(dy);
    float u;
    if (p.act_first) {
      u = act_fwd(v, p.act);
    } else {
      g *= act_grad(q.scale * v + q.shift, p.act);
      u = v;
    }
    float d = q.ca * g + q.cb * (u - q.mean) + q.cd;
    if (p.act_first) d *= act_grad(v, p.act);
    out = from_f<T>(d);
    a1 += to_f<T>(out);  // dbias sums the rounded dpre, the GEMM operand
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
  return MODE == Mode::kDpre ? 2 : 4;
}
template <Mode MODE>
constexpr int num_sums() {
  return MODE == Mode::kStats ? 2 : MODE == Mode::kDpre ? 1 : 0;
}

// ----------------------------------------------------------------------------------------------
// channels_last: the (M, C) row-major matrix, M = N*H*W.  Block (kTX, kTY): lane tx owns the VEC
// channels [c0, c0 + VEC), c0 = (blockIdx.x*kTX + tx)*VEC, row ty walks rows m = m_begin + ty,
// + kTY, ... of the chunk blockIdx.y.  VEC > 1 only when C % VEC == 0.
template <typename T, int VEC, Mode MODE>
__global__ void __launch_bounds__(kThreads) channel_cl_kernel(const ChannelParams p) {
  constexpr int NS = num_sums<MODE>();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t C = p.C;
  const int64_t M = p.N * p.HW;
  const int64_t c0 = (int64_t(blockIdx.x) * kTX + tx) * VEC;
  const bool active = c0 < C;
  const int64_t m_begin = int64_t(blockIdx.y) * p.chunk;
  const int64_t m_end = m_begin + p.chunk < M ? m_begin + p.chunk : M;

  ChanConsts q[VEC];
  float a1[VEC], a2[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    a1[v] = 0.f;
    a2[v] = 0.f;
    if (active) q[v] = load_consts(p, c0 + v);
  }
  const T* in = static_cast<const T*>(p.in);
  const T* dyp = static_cast<const T*>(p.dy);
  T* outp = static_cast<T*>(p.out);
  const bool wr = writes_out<MODE>(p);

  if (active) {
    // U rows per step, their loads issued together (several 16-byte loads in flight per thread: the
    // pass is bound by memory latency otherwise); the rows are applied in order, so sums are too.
    constexpr int U = unroll<MODE>();
    int64_t m = m_begin + ty;
    for (; m < m_end; m += U * kTY) {
      Pack<T, VEC> xi[U], gi[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (m + u * kTY < m_end) {
          const int64_t off = (m + u * kTY) * C + c0;
          xi[u] = *reinterpret_cast<const Pack<T, VEC>*>(in + off);
          if constexpr (MODE == Mode::kDpre) gi[u] = *reinterpret_cast<const Pack<T, VEC>*>(dyp + off);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (m + u * kTY < m_end) {
          Pack<T, VEC> yo;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            apply<T, MODE>(p, q[v], xi[u].v[v], MODE == Mode::kDpre ? gi[u].v[v] : xi[u].v[v], yo.v[v], a1[v],
                           a2[v]);
          }
          if (wr) *reinterpret_cast<Pack<T, VEC>*>(outp + (m + u * kTY) * C + c0) = yo;
        }
      }
    }
  }

  if constexpr (NS > 0) {
    if (p.partial == nullptr) return;  // uniform over the block
    __shared__ float red[NS][kTY][kTX * VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      red[0][ty][tx * VEC + v] = a1[v];
      if constexpr (NS == 2) red[1][ty][tx * VEC + v] = a2[v];
    }
    __syncthreads();
    if (ty == 0 && active) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          float acc = 0.f;
          for (int y = 0; y < kTY; ++y) acc += red[s][y][tx * VEC + v];
          p.partial[(int64_t(blockIdx.y) * NS + s) * C + c0 + v] = acc;
        }
      }
    }
  }
}

// NCHW: block (kThreads) owns channel c = blockIdx.x and positions j = n*HW + hw in the chunk
// blockIdx.y; thread t takes the VEC-vectors q = j/VEC = q_begin + t, + kThreads, ...
// VEC > 1 only when HW % VEC == 0 (a vector never straddles two images).
template <typename T, int VEC, Mode MODE>
__global__ void __launch_bounds__(kThreads) channel_nchw_kernel(const ChannelParams p) {
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
  float a1 = 0.f, a2 = 0.f;
  const T* in = static_cast<const T*>(p.in);
  const T* dyp = static_cast<const T*>(p.dy);
  T* outp = static_cast<T*>(p.out);
  const bool wr = writes_out<MODE>(p);

  // U vectors per step, loads first (as in the channels_last kernel), applied in order.
  constexpr int U = unroll<MODE>();
  for (; qv < qv_end; qv += U * kThreads) {
    int64_t off[U];
    Pack<T, VEC> xi[U], gi[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      off[u] = (n * p.C + c) * HW + hv * VEC;
      if (qv + u * kThreads < qv_end) {
        xi[u] = *reinterpret_cast<const Pack<T, VEC>*>(in + off[u]);
        if constexpr (MODE == Mode::kDpre) gi[u] = *reinterpret_cast<const Pack<T, VEC>*>(dyp + off[u]);
      }
      hv += dh;
      n += dn;
      if (hv >= HWv) {
        hv -= HWv;
        ++n;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (qv + u * kThreads < qv_end) {
        Pack<T, VEC> yo;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          apply<T, MODE>(p, q, xi[u].v[v], MODE == Mode::kDpre ? gi[u].v[v] : xi[u].v[v], yo.v[v], a1, a2);
        }
        const int64_t out_off = p.out_channel_major ? c * L + (qv + u * kThreads) * VEC : off[u];
        if (wr) *reinterpret_cast<Pack<T, VEC>*>(outp + out_off) = yo;
      }
    }
  }

  if constexpr (NS > 0) {
    if (p.partial == nullptr) return;  // uniform over the block
    __shared__ float red[NS][kThreads / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a1 += __shfl_down_sync(0xffffffffu, a1, o);
      if constexpr (NS == 2) a2 += __shfl_down_sync(0xffffffffu, a2, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
      red[0][warp] = a1;
      if constexpr (NS == 2) red[1][warp] = a2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        float acc = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) acc += red[s][w];
        p.partial[(int64_t(blockIdx.y) * NS + s) * p.C + c] = acc;
      }
    }
  }
}

// Shift of the stats sums: u at the first position (n = 0, h = 0, w = 0) of each channel, the
// same value for every block, close enough to the mean that the sums do not cancel.
template <typename T>
__global__ void __launch_bounds__(kThreads) shift_kernel(const ChannelParams p) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.C) return;
  const T* in = static_cast<const T*>(p.in);
  const ChanConsts q = load_consts(p, c);
  const float v = to_f<T>(pre_of<T>(p, q, in[p.cl ? c : c * p.HW]));
  p.shift_k[c] = p.act_first ? act_fwd(v, p.act) : v;
}

// One warp per channel: fixed-order sum of the R partials (strided by lane, then a butterfly),
// then mean/var (NS == 2: mean = k + S1/count, var = S2/count - (S1/count)^2) or the sum (NS == 1).
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const float* partial, int64_t R, int NS, int64_t C, int64_t count, const float* shift_k,
                    float* out0, float* out1) {
  const int64_t c = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (c >= C) return;  // the whole warp leaves together
  float s1 = 0.f, s2 = 0.f;
  for (int64_t r = lane; r < R; r += 32) {
    s1 += partial[(r * NS) * C + c];
    if (NS == 2) s2 += partial[(r * NS + 1) * C + c];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    s2 += __shfl_xor_sync(0xffffffffu, s2, o);
  }
  if (lane != 0) return;
  if (NS == 1) {
    out0[c] = s1;
  } else {
    const float inv = 1.f / static_cast<float>(count);
    const float md = s1 * inv;
    out0[c] = shift_k[c] + md;
    out1[c] = fmaxf(s2 * inv - md * md, 0.f);
  }
}

// ----------------------------------------------------------------------------------------------
// Launch helpers.
template <typename T>
constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

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
  const bool vec_ok = (p.cl ? p.C % V == 0 : p.HW % V == 0) && aligned16(p.in) && aligned16(p.dy) &&
                      aligned16(MODE == Mode::kStats && p.bias == nullptr ? nullptr : p.out);
  if (vec_ok) {
    launch_channel_vec<T, V, MODE>(p, stream);
  } else {
    launch_channel_vec<T, 1, MODE>(p, stream);
  }
}

// Two passes over u.  The first, shifted by u at the channel's first position, writes pre (with
// the bias) and gives the mean; the second is shifted by that mean, so var = S2/n - (S1/n)^2 no
// longer cancels.  A single shifted pass lost several bits of var when the first value sat a few
// standard deviations from the mean, and every gradient of the block inherits invstd's error
// coherently (the fp32 weight/bias gradients of the pointwise and stem blocks failed the 2x rule on
// an H200 in gpu-check, 2026-11-26).  The second pass reads pre once more and writes nothing.
template <typename T>
void stats_impl(const ChannelParams& p, float* mean, float* var, cudaStream_t stream) {
  const unsigned fin_blocks = static_cast<unsigned>(ceil_div(p.C, kThreads / 32));
  auto shift = shift_kernel<T>;
  CMK_LAUNCH(shift, static_cast<unsigned>(ceil_div(p.C, kThreads)), kThreads, 0, stream)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_channel<T, Mode::kStats>(p, stream);
  CMK_LAUNCH(finalize_kernel, fin_blocks, kThreads, 0, stream)(p.partial, p.R, 2, p.C, p.N * p.HW, p.shift_k, mean,
                                                             var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ChannelParams q = p;
  q.bias = nullptr;  // pre already holds the bias (written back by the first pass)
  q.out = nullptr;   // kStats without a bias writes nothing
  q.shift_k = mean;  // finalize reads shift_k[c] before it writes mean[c], in the same thread
  launch_channel<T, Mode::kStats>(q, stream);
  CMK_LAUNCH(finalize_kernel, fin_blocks, kThreads, 0, stream)(q.partial, q.R, 2, q.C, q.N * q.HW, q.shift_k, mean,
                                                             var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dpre_impl(const ChannelParams& p, float* dsum, cudaStream_t stream) {
  launch_channel<T, Mode::kDpre>(p, stream);
  if (dsum != nullptr) {
    CMK_LAUNCH(finalize_kernel, static_cast<unsigned>(ceil_div(p.C, kThreads / 32)), kThreads, 0, stream)(
        p.partial, p.R, 1, p.C, p.N * p.HW, nullptr, dsum, nullptr);
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
