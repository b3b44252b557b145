// Shared by the CUDA kernels of the depthwise ops: dtype conversion, activations, Welford/Chan
// merges, the tiling plan and the parameter block of the tiled kernels.  nvcc only, no ATen.
//
// Tiled kernels (k in 3..15): a block owns one channel (NCHW) or 32 channels, one per lane
// (channels_last), and walks a run of (image, spatial tile) items.  Per item it stages the tile plus
// the k-1 halo in shared memory as fp32 (zero outside the image), and each thread computes a "strip"
// of kR = 16 outputs along W from a register row of kR + k - 1 inputs (each value loaded once per
// kernel row, reused k times).  With 16-byte access the next item's tile is copied in by cp.async
// while the current one is computed (TileVecs), so global-memory latency overlaps the FMAs.
// Partial results of a block (BatchNorm statistics, weight gradients) go to a workspace and a
// small kernel reduces them in a fixed order: no atomics, bitwise reproducible.
// Other k (1, 17..31) take simple direct kernels (correct, not fast).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "chan.cuh"
#include "dw.cuh"
#include "launch.cuh"  // CMK_LAUNCH, CMK_DYNAMIC_SMEM (the emulator replaces them)

namespace convmixer_kernels {
namespace dwcuda {


constexpr int kR = 16;           // outputs per thread along W
constexpr int kCG = 32;          // channels per block in channels_last (one per lane)
constexpr int kMaxThreads = 256;
constexpr int kRegsMaxK = 7;     // largest k of the channels_last backward with register partials

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// dw_bwd_cl_regs_kernel's shared memory in floats: two dpre tiles of raw_off floats each, which the
// block sums of its (KK + 1) partials a thread reuse at the end, then the weights at this offset.
__host__ __device__ inline int regs_ws_off(int raw_off, int KK, int nwarps) {
  const int red = (KK + 1) * nwarps * kCG;
  return 2 * raw_off > red ? 2 * raw_off : red;
}
inline bool tiled_k(int k) { return k >= 3 && k <= 15 && (k % 2) == 1; }

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round to the storage dtype and back (pre is rounded before anything uses it).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f<T>(from_f<T>(v)); }

// 16-byte vectors of storage elements.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& r, float* out) {
  const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
  for (int j = 0; j < Vec<T>::N; ++j) out[j] = to_f<T>(e[j]);
}

// A 16-byte vector of global memory (read-only path) / of shared memory, as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  unpack_vec<T>(__ldg(reinterpret_cast<const uint4*>(p)), out);
}
template <typename T>
__device__ __forceinline__ void load_vec_smem(const T* p, float* out) {
  unpack_vec<T>(*reinterpret_cast<const uint4*>(p), out);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  uint4 r;
  T* e = reinterpret_cast<T*>(&r);
#pragma unroll
  for (int j = 0; j < Vec<T>::N; ++j) e[j] = from_f<T>(in[j]);
  *reinterpret_cast<uint4*>(p) = r;
}

// 16-byte asynchronous copies global -> shared (cp.async, sm_80 and newer), zero fill when !valid
// (src is then never read).  A thread's copies are complete after cp_async_wait_all(); the data
// is visible to the other threads of the block after a __syncthreads() that follows the wait.
// Older architectures copy synchronously.  The emulator (tests/cuda_emu) provides its own.
#ifdef CMK_EMULATE
using ::cmk_emu::cp_async16;
using ::cmk_emu::cp_async_commit;
using ::cmk_emu::cp_async_wait_all;
#else
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = valid ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
#endif

// The 16-byte vectors (V elements) of one item's tile + halo, for the cp.async staging of the tiled
// kernels.  NCHW: staged row r holds SW elements (the first at image column gw0), vector q of it sits
// at r * SW + q * V in a storage-dtype copy and r * RS + q * V in the fp32 tile (RS odd).
// channels_last: pixel (r, col) holds the block's kCG channels; vector e sits at e * V in both.  A
// vector lies wholly inside or wholly outside the image and C (the host checks W % V == 0 and
// gw0 % 8 == 0, or C % V == 0), so it is either copied whole or zero filled.
template <typename T, bool CL>
struct TileVecs {
  static constexpr int V = Vec<T>::N;
  int SR, SW, RS, H, W, gh0, gw0;
  int64_t C, c0, base;  // channels, first channel of the block, offset of the item's (n, c0 | 0, 0, 0)
  __device__ __forceinline__ int count() const { return CL ? SR * SW * (kCG / V) : SR * (SW / V); }
  // Vector e: its offsets in the storage copy (raw) and the fp32 tile (f32); returns its global
  // offset, or -1 when it is outside the image (or past C).
  __device__ __forceinline__ int64_t at(int e, int& raw, int& f32) const {
    if constexpr (!CL) {
      const int cpr = SW / V;
      const int r = e / cpr, q = e - r * cpr;
      const int gh = gh0 + r, gw = gw0 + q * V;
      raw = r * SW + q * V;
      f32 = r * RS + q * V;
      return (gh >= 0 && gh < H && gw >= 0 && gw < W) ? base + static_cast<int64_t>(gh) * W + gw : -1;
    } else {
      constexpr int CPP = kCG / V;
      const int pix = e / CPP, q = e - pix * CPP;
      const int r = pix / SW, col = pix - r * SW;
      const int gh = gh0 + r, gw = gw0 + col;
      const int64_t ch = c0 + q * V;
      raw = f32 = e * V;
      return (gh >= 0 && gh < H && gw >= 0 && gw < W && ch < C)
                 ? base + (static_cast<int64_t>(gh) * W + gw) * C + ch
                 : -1;
    }
  }
  // Issue the cp.async copy of vector e of `src` into `dst` (zero fill outside).
  __device__ __forceinline__ void copy(int e, const T* src, T* dst) const {
    int raw, f32;
    const int64_t g = at(e, raw, f32);
    cp_async16(dst + raw, g >= 0 ? src + g : src, g >= 0);
  }
  // Store V floats at f32 in the fp32 tile.
  __device__ __forceinline__ void store(float* tile, int f32, const float* v) const {
    if constexpr (CL) {
      float4* d = reinterpret_cast<float4*>(tile + f32);
#pragma unroll
      for (int j = 0; j < V / 4; ++j) d[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) tile[f32 + j] = v[j];  // RS is odd: scalar stores
    }
  }
};

// Activations (codes as in torch_ops.ACTIVATIONS); accurate libdevice erff/tanhf/expf.
// Compile-time versions for hot loops (dispatch once with with_act), run-time ones elsewhere.
template <int A>
__device__ __forceinline__ float act_fwd_t(float v) {
  if constexpr (A == 1) {
    return v < 0.f ? 0.f : v;  // NaN stays NaN, as in PyTorch
  } else if constexpr (A == 2) {
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  } else if constexpr (A == 3) {
    const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.f + tanhf(inner));
  } else if constexpr (A == 4) {
    return v / (1.f + expf(-v));
  } else if constexpr (A == 5) {
    return v <= 0.f ? 0.f : (v >= 6.f ? 6.f : v);  // PyTorch's hardtanh: NaN stays NaN
  } else if constexpr (A == 6) {
    float t = __fadd_rn(v, 3.f);  // x * min(max(x + 3, 0), 6) / 6 as PyTorch's CPU kernel (its CUDA one
    // multiplies by 1/6 instead: 1 ulp apart at most); no fmaxf, so NaN stays NaN
    t = t < 0.f ? 0.f : t;
    t = 6.f < t ? 6.f : t;
    return __fdiv_rn(__fmul_rn(v, t), 6.f);
  } else {
    return v;
  }
}

template <int A>
__device__ __forceinline__ float act_grad_t(float v) {
  if constexpr (A == 1) {
    return v > 0.f ? 1.f : 0.f;
  } else if constexpr (A == 2) {
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
    return cdf + v * pdf;
  } else if constexpr (A == 3) {
    const float k0 = 0.79788456080286536f, k1 = 0.044715f;
    const float t = tanhf(k0 * (v + k1 * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * k0 * (1.f + 3.f * k1 * v * v);
  } else if constexpr (A == 4) {
    const float s = 1.f / (1.f + expf(-v));
    return s * (1.f + v * (1.f - s));
  } else if constexpr (A == 5) {
    return (v <= 0.f || v >= 6.f) ? 0.f : 1.f;  // as hardtanh's backward (NaN: 1)
  } else if constexpr (A == 6) {
    return v <= -3.f ? 0.f : (v < 3.f ? __fadd_rn(__fdiv_rn(v, 3.f), 0.5f) : 1.f);  // as hardswish's backward
  } else {
    return 1.f;
  }
}

// act(v) and act'(v) together, the transcendental computed once (erff, tanhf or expf): the same
// expressions as act_fwd_t and act_grad_t, so the same values.  (As two calls the compiler kept both
// evaluations: the bf16 GELU dpre pass had 2.75 MUFU.EX2 an element on sm_90a.)
template <int A>
__device__ __forceinline__ void act_fwd_grad_t(float v, float& y, float& g) {
  if constexpr (A == 2) {
    const float e = erff(v * 0.70710678118654752f);
    y = 0.5f * v * (1.f + e);
    const float cdf = 0.5f * (1.f + e);
    const float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
    g = cdf + v * pdf;
  } else if constexpr (A == 3) {
    const float k0 = 0.79788456080286536f, k1 = 0.044715f;
    const float t = tanhf(k0 * (v + k1 * v * v * v));
    y = 0.5f * v * (1.f + t);
    g = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * k0 * (1.f + 3.f * k1 * v * v);
  } else if constexpr (A == 4) {
    const float ex = expf(-v);
    y = v / (1.f + ex);
    const float s = 1.f / (1.f + ex);
    g = s * (1.f + v * (1.f - s));
  } else {
    y = act_fwd_t<A>(v);
    g = act_grad_t<A>(v);
  }
}

template <int A> struct ActTag { static constexpr int value = A; };

// Calls f(ActTag<act>{}) so that f's body sees the activation as a compile-time constant.
template <typename F>
__device__ __forceinline__ void with_act(int act, F&& f) {
  switch (act) {
    case 1: f(ActTag<1>{}); break;
    case 2: f(ActTag<2>{}); break;
    case 3: f(ActTag<3>{}); break;
    case 4: f(ActTag<4>{}); break;
    case 5: f(ActTag<5>{}); break;
    case 6: f(ActTag<6>{}); break;
    default: f(ActTag<0>{}); break;
  }
}

__device__ __forceinline__ float act_fwd(float v, int act) {
  float r = v;
  with_act(act, [&](auto A) { r = act_fwd_t<decltype(A)::value>(v); });
  return r;
}

__device__ __forceinline__ float act_grad(float v, int act) {
  float r = 1.f;
  with_act(act, [&](auto A) { r = act_grad_t<decltype(A)::value>(v); });
  return r;
}

// scale * v + shift rounded like PyTorch's separate multiply and add (no fma contraction), so
// the argument of act / act' is bitwise the reference's and relu's kink never flips.
__device__ __forceinline__ float affine(float v, float scale, float shift) {
  return __fadd_rn(__fmul_rn(scale, v), shift);
}

// The block's output from its pre-norm value v: scale * act(v) + shift (act_first) or
// act(scale * v + shift), each product and sum rounded like PyTorch's separate ops (no contraction).
template <int A>
__device__ __forceinline__ float bn_act_t(float v, float scale, float shift, bool act_first) {
  return act_first ? __fadd_rn(__fmul_rn(scale, act_fwd_t<A>(v)), shift) : act_fwd_t<A>(affine(v, scale, shift));
}

// The gradient at the conv output from dy and pre (dw_bwd of torch_ops):
//   g = dy (act_first) | dy * act'(scale*pre + shift);  u = act(pre) (act_first) | pre
//   d = ca*g + cb*(u - mean) + cd;  d *= act'(pre) when act_first.
struct ChanCoef {
  float scale, shift, mean, ca, cb, cd;
};

template <int A>
__device__ __forceinline__ float dpre_t(float dy, float pre, const ChanCoef& q, bool act_first) {
  float g, u, ag = 1.f;
  if (act_first) {
    g = dy;
    act_fwd_grad_t<A>(pre, u, ag);
  } else {
    g = __fmul_rn(dy, act_grad_t<A>(affine(pre, q.scale, q.shift)));
    u = pre;
  }
  float d = __fadd_rn(__fadd_rn(__fmul_rn(q.ca, g), __fmul_rn(q.cb, __fsub_rn(u, q.mean))), q.cd);
  if (act_first) d = __fmul_rn(d, ag);
  return d;
}

__device__ __forceinline__ float dpre_of(float dy, float pre, const ChanCoef& q, int act, bool act_first) {
  float r = 0.f;
  with_act(act, [&](auto A) { r = dpre_t<decltype(A)::value>(dy, pre, q, act_first); });
  return r;
}

// Chan et al. merge of (count, mean, M2) summaries; counts may be zero.
template <typename F>
__device__ __forceinline__ void chan_merge(F& n, F& m, F& M2, F nb, F mb, F M2b) {
  if (nb == F(0)) return;
  if (n == F(0)) {
    n = nb;
    m = mb;
    M2 = M2b;
    return;
  }
  const F nn = n + nb;
  const F d = mb - m;
  const F f = nb / nn;
  m = m + d * f;
  M2 = M2 + M2b + d * d * n * f;
  n = nn;
}

// Every thread's (count, mean, M2) merged over the block in a fixed order (shuffles within each warp,
// then the warps in order through red[3 * warps]); thread 0 writes the total to out[0..2].  Every
// thread of the block calls it (it has a barrier).
// The warp's (count, mean, M2) summaries merged in a fixed order; lane 0 holds the total.
__device__ __forceinline__ void warp_chan_reduce(float& n, float& m, float& M2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float nb = __shfl_down_sync(0xffffffffu, n, off);
    const float mb = __shfl_down_sync(0xffffffffu, m, off);
    const float Mb = __shfl_down_sync(0xffffffffu, M2, off);
    chan_merge(n, m, M2, nb, mb, Mb);
  }
}

__device__ __forceinline__ void block_chan_store(float n, float m, float M2, float* red, float* out) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  warp_chan_reduce(n, m, M2);
  if (lane == 0) {
    red[warp * 3 + 0] = n;
    red[warp * 3 + 1] = m;
    red[warp * 3 + 2] = M2;
  }
  __syncthreads();
  if (tid == 0) {
    float tn = red[0], tm = red[1], tM = red[2];
    for (int w = 1; w < nwarps; ++w) chan_merge(tn, tm, tM, red[w * 3], red[w * 3 + 1], red[w * 3 + 2]);
    out[0] = tn;
    out[1] = tm;
    out[2] = tM;
  }
}

// ---------------------------------------------------------------------------------------------
// Tiling plan (host)
// ---------------------------------------------------------------------------------------------
struct DevInfo {
  int sms;
  int smem_optin;   // max dynamic shared memory per block (bytes)
  int smem_per_sm;  // shared memory per multiprocessor (bytes)
  int cc_major;     // compute capability (8 and up: mma.sync for the tensor-core kernels)
};
DevInfo dev_info();  // of the current device (dw_launch.cu)

struct TilePlan {
  bool tiled = false;   // false: the generic direct kernels
  int tile_h = 0, tile_w = 0, tiles_h = 0, tiles_w = 0;
  int sw = 0;           // strips across a tile (a strip: 1 row x kR columns)
  int nstrips = 0;      // strips per tile
  int threads = 0;
  int64_t cgroups = 0;  // blocks along channels: C (NCHW) or ceil(C / 32) (channels_last)
  int smem_rows = 0;    // tile_h + k - 1
  int smem_w = 0;       // staged columns: NCHW pl + tile_w + pl, channels_last tile_w + k - 1
  int rs = 0;           // NCHW: row stride in floats (odd: conflict-free strip reads)
  int raw_off = 0;      // floats before the storage-dtype copies of the tile (cp.async targets)
  bool copies = true;   // shared memory holds those copies (else the tile is staged by direct loads)
  bool regs = false;    // channels_last backward: dw_bwd_cl_regs_kernel (dw_bwd_cl_regs.cuh)
  int pl = 0;           // staged columns left of the tile (NCHW: pad rounded up to 8 for 16B loads)
  size_t smem_bytes = 0;
  int64_t items = 0;    // (n, tile) pairs per channel (group)
  int64_t ipb = 1;      // items per block
  int64_t groups = 0;   // blocks per channel (group) = partial results per channel
  int64_t blocks() const { return groups * cgroups; }
};

bool dpre_pass_allowed();  // dw_launch.cu
// Whether the tiled backward's fp32 dpre pass fits this shape: 16-byte fp32 vectors along the tile rows
// (channels_last: 4 | C; NCHW: 4 | W), and the pass not turned off (a plan also needs room for the copies:
// bwd_dpre_pass in dw_launch.cu).
inline bool dpre_pass_fits(const DwGeom& g) { return (g.cl ? g.C % 4 == 0 : g.W % 4 == 0) && dpre_pass_allowed(); }
// CONVMIXER_KERNELS_DW_BWD_REGS: "1" the channels_last backward keeps its weight-gradient partials in
// registers where it can (plan_tiles; returns 1), "require" and the op fails where it cannot (tests;
// returns 2), else 0: opt-in until a GPU has timed it against the default.
inline int bwd_regs_mode() {
  const char* env = std::getenv("CONVMIXER_KERNELS_DW_BWD_REGS");
  if (env == nullptr) return 0;
  const std::string v(env);
  return v == "1" ? 1 : (v == "require" ? 2 : 0);
}

inline TilePlan plan_tiles(const DwGeom& g, bool bwd, const DevInfo& dev) {
  TilePlan p;
  if (!tiled_k(g.k)) return p;
  const int K = g.k, P = K / 2, KK = K * K;
  const int64_t H = g.H, W = g.W;
  const size_t soft = 120 * 1024;
  const size_t hard = static_cast<size_t>(dev.smem_optin);
  // Shared memory: `floats` of fp32 tile and workspace, then (16-byte aligned) the storage-dtype
  // copies of the tile that cp.async fills: x (forward) or dy and pre (backward).
  const size_t esize = g.dtype == kF32 ? 4 : 2;
  const size_t ncopies = bwd ? 2 : 1;
  auto smem_for = [&](size_t floats, size_t tile_elems, int& raw_off) {
    raw_off = static_cast<int>(ceil_div(static_cast<int64_t>(floats), 4) * 4);
    return sizeof(float) * static_cast<size_t>(raw_off) + ncopies * tile_elems * esize;
  };
  if (!g.cl) {
    const int64_t swt = ceil_div(W, kR);
    const int64_t ntw = ceil_div(swt, 4);
    p.sw = static_cast<int>(ceil_div(ceil_div(W, ntw), kR));
    p.tile_w = p.sw * kR;
    const int64_t max_sh = kMaxThreads / p.sw;
    const int64_t nth = ceil_div(H, max_sh);
    p.tile_h = static_cast<int>(ceil_div(H, nth));
    p.nstrips = p.sw * p.tile_h;
    p.pl = ((P + 7) / 8) * 8;
    p.smem_rows = p.tile_h + K - 1;
    p.smem_w = p.pl + p.tile_w + p.pl;
    p.rs = p.smem_w + 1;
    p.cgroups = g.C;
    const int want = static_cast<int>(ceil_div(p.nstrips, 32) * 32);
    if (!bwd) {
      p.threads = want;
      p.smem_bytes = smem_for(size_t(p.smem_rows) * p.rs + (K > 9 ? KK : 0) + 3 * 8,
                              size_t(p.smem_rows) * p.smem_w, p.raw_off);
      if (p.smem_bytes > hard) return TilePlan{};
    } else {
      int cap = static_cast<int>(((16384 / (KK + 1)) - 1) / 32 * 32);
      cap = cap < 32 ? 32 : (cap > kMaxThreads ? kMaxThreads : cap);
      for (int t = want < cap ? want : cap; t >= 32; t -= 32) {
        p.threads = t;
        p.smem_bytes = smem_for(size_t(p.smem_rows) * p.rs + KK + size_t(KK + 1) * (t + 1),
                                size_t(p.smem_rows) * p.smem_w, p.raw_off);
        if (p.smem_bytes <= hard) break;
        p.threads = 0;
      }
      if (p.threads == 0) return TilePlan{};
    }
  } else {
    p.sw = 1;
    p.tile_w = kR;
    p.pl = P;
    p.smem_w = p.tile_w + K - 1;
    p.cgroups = ceil_div(g.C, kCG);
    if (!bwd) {
      // forward: one warp per strip row, the first (largest) row count that fits the soft budget, else
      // the device's
      bool found = false;
      for (int pass = 0; pass < 2 && !found; ++pass) {
        const size_t budget = pass == 0 ? (soft < hard ? soft : hard) : hard;
        for (int th : {8, 4, 2, 1}) {
          const int TH = static_cast<int>(th < H ? th : H);
          const size_t tile = size_t(TH + K - 1) * p.smem_w * kCG;
          const size_t floats = tile + (K > 7 ? size_t(KK) * kCG : 0) + 3 * size_t(kCG) * TH;
          int raw_off = 0;
          const size_t bytes = smem_for(floats, tile, raw_off);
          if (bytes <= budget) {
            p.tile_h = TH;
            p.threads = TH * 32;
            p.raw_off = raw_off;
            p.smem_bytes = bytes;
            found = true;
            break;
          }
        }
      }
      if (!found) return TilePlan{};
    } else {
      // backward: one warp per strip row of a (tile_h x 16 pixel x 32 channel) tile, each thread with its
      // own (k*k + 1)-float column of weight-gradient partials in shared memory, so shared memory (tile,
      // cp.async copies, partial columns) sets how many warps an SM holds.  At k=9 the first plan that
      // fitted (8-row tile with copies, one warp) left one warp per SM: 12.5 ms for a training step that
      // took 3.5 ms without the copies (H200, 2026-11-27 vs 2026-11-26).  So every (rows, warps, copies)
      // is scored by the warps an SM holds (shared memory, threads, and the kernel's 80-register cap),
      // copies counted 1.5x (they hide the staging loads; at k=7 the plan with them, 8 warps, scores as
      // the one without, 12 warps, and is kept: it measured 2.49 ms a step against 2.85 ms); ties: more
      // rows.  CONVMIXER_KERNELS_DW_BWD_COPIES=0/1 (measurement knob) allows only plans without/with them.
      const char* env = std::getenv("CONVMIXER_KERNELS_DW_BWD_COPIES");
      const int force = (env != nullptr && (env[0] == '0' || env[0] == '1')) ? env[0] - '0' : -1;
      double best = -1.0;
      // The register partials (dw_bwd_cl_regs.cuh), where asked for and where they apply: k <= 7, dpre
      // from the fp32 pass (4 | C), the copies allowed.  One warp a tile row, 8 rows (fewer if H is
      // smaller), two fp32 dpre tiles and the weights in shared memory.
      if (bwd_regs_mode() != 0 && K <= kRegsMaxK && force != 0 && dpre_pass_fits(g)) {
        const int TH = static_cast<int>(H < 8 ? H : 8);
        const int64_t tile = int64_t(TH + K - 1) * p.smem_w * kCG;
        const int raw_off = static_cast<int>(ceil_div(tile, 4) * 4);
        const size_t bytes = sizeof(float) * (size_t(regs_ws_off(raw_off, KK, TH)) + size_t(KK) * kCG);
        if (bytes <= hard) {
          p.regs = true;
          p.tile_h = TH;
          p.threads = TH * 32;
          p.raw_off = raw_off;
          p.smem_bytes = bytes;
          p.copies = true;
          best = 1.0;
        }
      }
      for (int copies = 1; copies >= 0 && !p.regs; --copies) {
        if (force >= 0 && copies != force) continue;
        for (int th : {8, 4, 2, 1}) {
          const int TH = static_cast<int>(th < H ? th : H);
          const size_t tile = size_t(TH + K - 1) * p.smem_w * kCG;
          for (int nw : {4, 2, 1}) {
            const int nwarps = nw < TH ? nw : TH;
            const size_t floats = tile + size_t(KK) * kCG + 6 * kCG + size_t(KK + 1) * kCG * nwarps;
            int raw_off = 0;
            const size_t bytes = smem_for(floats, copies ? tile : 0, raw_off);
            if (bytes > hard) continue;
            const int threads = nwarps * 32;
            int64_t blocks = dev.smem_per_sm / static_cast<int64_t>(bytes + 1024);
            const int64_t by_threads = 2048 / threads, by_regs = 65536 / (80 * threads);
            blocks = blocks < by_threads ? blocks : by_threads;
            blocks = blocks < by_regs ? blocks : by_regs;
            const double score = double(blocks * nwarps) * (copies ? 1.5 : 1.0) + 1e-3 * TH;
            if (score > best) {
              best = score;
              p.tile_h = TH;
              p.threads = threads;
              p.raw_off = raw_off;
              p.smem_bytes = bytes;
              p.copies = copies != 0;
            }
          }
        }
      }
      if (best < 0) return TilePlan{};
    }
    p.nstrips = p.tile_h;
    p.smem_rows = p.tile_h + K - 1;
  }
  if (ceil_div(W, p.tile_w) * ceil_div(H, p.tile_h) > 0x7fffffffLL) return TilePlan{};
  p.tiles_w = static_cast<int>(ceil_div(W, p.tile_w));
  p.tiles_h = static_cast<int>(ceil_div(H, p.tile_h));
  p.items = g.N * p.tiles_h * p.tiles_w;
  {
    // Several (n, tile) items per block, while about four waves of resident blocks remain to
    // balance the machine.  Backward: keeps the weight-gradient partials small.  Forward: the
    // block copies the next item's tile in (cp.async) while it computes the current one, and sets
    // up (weights, per-channel values) once.  Residency: shared memory, threads, and for the
    // forward kernel its registers (at most 128 a thread: __launch_bounds__(256, 2)).
    int64_t per_sm = dev.smem_per_sm / static_cast<int64_t>(p.smem_bytes + 1024);
    int64_t by_threads = 2048 / p.threads;
    if ((!bwd || p.regs) && 65536 / (128 * p.threads) < by_threads) by_threads = 65536 / (128 * p.threads);
    per_sm = per_sm < by_threads ? per_sm : by_threads;
    per_sm = per_sm < 1 ? 1 : (per_sm > 32 ? 32 : per_sm);
    const int64_t target = int64_t(dev.sms > 0 ? dev.sms : 1) * per_sm * 4;
    int64_t ipb = (p.items * p.cgroups) / target;
    ipb = ipb < 1 ? 1 : (ipb > 32 ? 32 : ipb);
    // Measurement and test knob: CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK=n makes every block walk n items
    // (=1: no next tile to copy in while computing, the forward kernel as it was before the cp.async
    // pipeline; n > 1 on small test shapes: the backward's alternating dpre tiles, tests/cuda_emu).
    const char* env = std::getenv("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK");
    if (env != nullptr) {
      const long v = std::strtol(env, nullptr, 10);
      if (v >= 1 && v <= 32) ipb = v;
    }
    p.ipb = ipb;
  }
  p.groups = ceil_div(p.items, p.ipb);
  if (p.blocks() > 0x7fffffffLL) return TilePlan{};
  p.tiled = true;
  return p;
}

// The operands of a depthwise op as every kernel family takes them (tiled, tensor-core, direct: each
// parameter block derives from this; dw_launch.cu fills it once per op).  Forward: x, w, bias, scale,
// shift -> out (y; with stats, pre); backward: dy, x, pre, w, scale, shift, mean, ca, cb, cd -> out
// (dx).  part: the per-block partial results.
struct DwOperands : ChanPtrs {
  const void* x = nullptr;
  const void* dy = nullptr;
  const void* pre = nullptr;
  const float* w = nullptr;
  void* out = nullptr;
  float* part = nullptr;
  int act = 0;
  bool act_first = true, residual = false;
  bool stats = false;  // forward: write pre for the batch statistics (instead of y)
  // Backward: dpre precomputed in fp32, in x's layout (launch_dpre_pass), which the kernel stages
  // instead of computing it from dy and pre; null: computed while staging.
  const float* dpre_in = nullptr;
};

// Parameter block of the tiled kernels (passed by value).
struct TileArgs : DwOperands {
  int64_t N, C, H, W;
  int tile_h, tile_w, tiles_w, ntiles, sw, nstrips;
  int smem_w, rs, pl;
  int raw_off;  // see TilePlan
  int64_t cgroups, items, ipb, groups;
  bool vec;  // 16-byte global loads/stores are valid (alignment and divisibility checked on host)
  bool copies;  // the plan left room for the cp.async copies of the tile (TilePlan::copies)
  // (part, from DwOperands: partial results [groups][C][m])
};

// Item `it` of a tiled kernel's block (channel group cg): the tile origin (th0, tw0) and the offset
// of element (n, cg | 0, 0, 0) of its image n (NCHW: the channel's plane; channels_last: the image).
struct TileItem {
  int64_t base;
  int th0, tw0;
};
template <bool CL>
__device__ __forceinline__ TileItem tile_item(const TileArgs& a, int64_t it, int64_t cg) {
  const int64_t n = it / a.ntiles;
  const int tile = static_cast<int>(it - n * a.ntiles);
  TileItem m;
  m.th0 = (tile / a.tiles_w) * a.tile_h;
  m.tw0 = (tile % a.tiles_w) * a.tile_w;
  m.base = CL ? n * a.H * a.W * a.C : (n * a.C + cg) * a.H * a.W;
  return m;
}

// Item m's tile + halo as 16-byte vectors (TileVecs); RS: row stride of the fp32 tile (NCHW), c0:
// the block's first channel.
template <typename T, int K, bool CL>
__device__ __forceinline__ TileVecs<T, CL> tile_vecs(const TileArgs& a, const TileItem& m, int RS, int64_t c0) {
  return TileVecs<T, CL>{a.tile_h + K - 1, a.smem_w, RS, static_cast<int>(a.H), static_cast<int>(a.W),
                         m.th0 - K / 2, m.tw0 - a.pl, a.C, c0, m.base};
}

inline TileArgs make_tile_args(const DwGeom& g, const TilePlan& p, const DwOperands& o) {
  TileArgs a{};
  static_cast<DwOperands&>(a) = o;
  a.N = g.N;
  a.C = g.C;
  a.H = g.H;
  a.W = g.W;
  a.tile_h = p.tile_h;
  a.tile_w = p.tile_w;
  a.tiles_w = p.tiles_w;
  a.ntiles = p.tiles_h * p.tiles_w;
  a.sw = p.sw;
  a.nstrips = p.nstrips;
  a.smem_w = p.smem_w;
  a.rs = p.rs;
  a.pl = p.pl;
  a.raw_off = p.raw_off;
  a.copies = p.copies;
  a.cgroups = p.cgroups;
  a.items = p.items;
  a.ipb = p.ipb;
  a.groups = p.groups;
  return a;
}

inline bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

// 16-byte accesses are valid when every pointer is aligned and rows (NCHW: along W) or pixels
// (channels_last: along C) are a whole number of 16-byte vectors.
inline bool vec_ok(const DwGeom& g, std::initializer_list<const void*> ptrs) {
  const int V = g.dtype == kF32 ? 4 : 8;
  if ((g.cl ? g.C : g.W) % V != 0) return false;
  for (const void* q : ptrs)
    if (!aligned16(q)) return false;
  return true;
}

// Opt a kernel into more than 48 KB of dynamic shared memory, once per device (not again during
// a CUDA-graph capture that follows a warm-up).  One SmemOptIn per kernel instantiation.
struct SmemOptIn {
  std::atomic<int> bytes[64];
};
template <typename Kern>
cudaError_t opt_in_smem(SmemOptIn& s, Kern kern, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  const cudaError_t e0 = cudaGetDevice(&dev);
  if (e0 != cudaSuccess) return e0;
  const bool cached = dev >= 0 && dev < 64;
  if (cached && s.bytes[dev].load() >= static_cast<int>(bytes)) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess && cached) {
    int cur = s.bytes[dev].load();
    while (cur < static_cast<int>(bytes) && !s.bytes[dev].compare_exchange_weak(cur, static_cast<int>(bytes))) {
    }
  }
  return e;
}

// Launch a tiled kernel on its plan's grid (blocks x threads, smem_bytes of dynamic shared memory, opted in
// once per device through the caller's static `opted`, one per kernel instantiation).
template <typename Kern>
cudaError_t launch_planned(Kern kern, SmemOptIn& opted, const TileArgs& a, const TilePlan& p, cudaStream_t stream) {
  const cudaError_t e = opt_in_smem(opted, kern, p.smem_bytes);
  if (e != cudaSuccess) return e;
  CMK_LAUNCH(kern, static_cast<unsigned>(p.blocks()), p.threads, p.smem_bytes, stream)(a);
  return cudaGetLastError();
}

// Launch helpers, one explicit instantiation per (dtype, k, layout) in dw_tiled_k*.cu.
template <typename T, int K, bool CL>
cudaError_t launch_fwd_tiled(const TileArgs& a, const TilePlan& p, cudaStream_t stream);
template <typename T, int K, bool CL>
cudaError_t launch_bwd_tiled(const TileArgs& a, const TilePlan& p, cudaStream_t stream);
template <typename T, int K>
cudaError_t launch_bwd_cl_regs(const TileArgs& a, const TilePlan& p, cudaStream_t stream);

// The tensor-core forward (dw_mma.cu; when it runs: mma_mode, mma_default there).  dw_mma_launch runs
// dw_fwd (stats = false) or dw_conv_stats (stats = true: part, mean and var as the tiled path) and sets
// *ran, or leaves the op to the other kernels (*ran = false; cudaErrorNotSupported when the variable
// says require).  dw_mma_partials: the partial results per channel it would write (0: it would not run).
cudaError_t dw_mma_launch(const DwGeom& g, const DwOperands& o, float* mean, float* var, cudaStream_t stream,
                          bool* ran);
int64_t dw_mma_partials(const DwGeom& g);
// The backward (dw_bwd: dx, dweight, dbias) on tensor cores: the same contract.
cudaError_t dw_mma_bwd_launch(const DwGeom& g, const DwOperands& o, float* dweight, float* dbias, float* dpre,
                              cudaStream_t stream, bool* ran);
int64_t dw_mma_bwd_partials(const DwGeom& g);
// Whether the tensor-core backward would run and take dpre from the fp32 pass (channels_last, where
// its plan fits; shape only, so the workspace and the launch agree), and the pass itself (dw_launch.cu): dpre of every element,
// fp32 in x's layout, from o's dy, pre and per-channel coefficients.
bool dw_mma_bwd_dpre_pass(const DwGeom& g);
void launch_dpre_pass(const DwGeom& g, const DwOperands& o, float* dpre, cudaStream_t stream);
// CONVMIXER_KERNELS_DW_BWD_DPRE=0 (measurement knob): no dpre pass, the backward kernels compute
// dpre while staging.
bool dpre_pass_allowed();

// Generic kernels (dw_generic.cu) and the reductions (dw_reduce.cu).
struct DirectArgs : DwOperands {
  int64_t N, C, H, W;
  int k;
  bool cl;
  float* dpre;
  int64_t nsplit;
};
cudaError_t launch_fwd_direct(const DirectArgs& a, DType dt, const DevInfo& dev, cudaStream_t stream);
cudaError_t launch_bwd_direct(const DirectArgs& a, DType dt, const DevInfo& dev, cudaStream_t stream);
int64_t direct_dweight_splits(const DwGeom& g, const DevInfo& dev);

// Per-channel reductions over an activation-shaped tensor (mode 0: Welford statistics of
// u(pre) into [P][C][3]; mode 1: the dw_bwd_reduce sums into [P][C][2]).
struct ReduceArgs {
  int64_t N, C, HW;
  const void* dy;
  const void* pre;
  const float* scale;
  const float* shift;
  const float* mean;
  float* part;
  int act;
  bool act_first;
  int mode;
};
int64_t reduce_splits(const DwGeom& g, const DevInfo& dev);
cudaError_t launch_channel_reduce(const ReduceArgs& a, const DwGeom& g, int64_t nsplit, bool vec,
                                  cudaStream_t stream);
// [P][C][3] Welford partials -> mean, var (biased).
cudaError_t launch_stats_finalize(const float* part, int64_t P, int64_t C, float* mean, float* var,
                                  cudaStream_t stream);
// [P][C][M] sums -> out_a[c*Ma + m] for m < Ma, out_b[c] (times b_scale[c] if given) for m = Ma.
cudaError_t launch_sum_finalize(const float* part, int64_t P, int64_t C, int M, float* out_a, int Ma,
                                float* out_b, const float* b_scale, cudaStream_t stream);

}  // namespace dwcuda
}  // namespace convmixer_kernels
