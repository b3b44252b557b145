// The depthwise convolution on tensor cores (mma.sync, sm_80 and newer): dw_fwd, dw_conv_stats and
// dw_bwd for fp16/bf16 activations (NCHW and channels_last) and k in {3, 5, 7, 9}.  By default it runs
// the ops where a GPU run measured it faster (mma_default); CONVMIXER_KERNELS_DW_MMA=1 uses it
// wherever it applies, =require makes the op fail where it does not (tests), =0 never; otherwise the FMA
// kernels of dw_fwd_tiled.cuh / dw_bwd_tiled.cuh run.
//
// Why.  The FMA kernels do k*k fp32 FMAs an output: for k = 7 that is 49, and the FMA rate bounds
// them (0.075 ms for N=64, C=768, 32x32 on an H100/H200 at full rate; they reached 18% of it).  A
// row of a depthwise convolution is a product with a banded (Toeplitz) matrix, which tensor cores
// run at about 15x the FMA rate:
//   out[h][w0 + n] = sum_r sum_kk X[h + r - P][w0 - 4 + kk] * T_r[kk][n],  n < 8, kk < 16,
//   T_r[kk][n] = w[r][kk - n + P - 4] where 0 <= kk - n + P - 4 < k, else 0.
// So a 16 x 8 tile of outputs is k m16n8k16 MMAs (one per kernel row r), A = 16 staged input rows
// r.. x 16 columns from w0 - 4 (every column an output of the tile needs when P <= 4), B = T_r.
// 2.3x the multiply-adds of the direct form at k = 7, at ~15x the rate.
//
// Precision.  x is exact in the MMA's input type; the fp32 weight is split into hi = T(w) and
// lo = T(w - hi) and both are multiplied (two MMAs per row, separate fp32 accumulators), so the
// weight keeps ~16 significant bits (fp16: 22) instead of the storage type's 8 (11), products are
// exact in fp32 and sums are fp32: the result differs from the FMA kernels by fp32 rounding, far
// below the rounding of pre to the storage type.
//
// Work (NCHW; channels_last: see dw_mma_cl_kernel).  A block (4 warps) owns one channel (so B is built
// once, in registers) and walks a run of
// (image, row tile) items; an item is TH = 16 * m rows (the whole plane when it fits) staged in
// shared memory in the storage type: row stride SWs, image column x at column 8 + x, zero columns
// either side, zero rows outside the image.  Items flow through a ring of kStages buffers filled by
// cp.async (16-byte path: W % 8 == 0, aligned) kStages - 1 items ahead; other shapes stage with
// plain loads.  A warp computes units of 16 x 8 outputs, two at a time (four independent MMA
// chains); the epilogue (bias, rounding of pre, BN affine, activation, residual from the staged x)
// runs on the accumulator fragments and stores pairs of outputs.  Statistics (dw_conv_stats): pre
// is stored, and each thread's (count, mean, M2) of u is merged over the block in a fixed order
// into part[group][c] (the tiled kernels' format), so launch_stats_finalize finishes them.
#include "dw_common.cuh"

#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace convmixer_kernels {
namespace dwcuda {

namespace {

constexpr int kMmaThreads = 128;
constexpr int kStages = 6;
constexpr int kPadL = 8;  // staged columns left of image column 0 (16 bytes: cp.async alignment)

// Two storage values as one 32-bit MMA operand register (the lower index in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t a, b;
  std::memcpy(&a, &lo, 2);
  std::memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// d += A (16x16, row) * B (16x8, col), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
#ifdef CMK_EMULATE
  ::cmk_emu::mma_16816<T>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)d;
  (void)a;
  (void)b;
#endif
}

// Waits until all but the newest N committed cp.async groups of this thread have landed.
template <int N>
__device__ __forceinline__ void cp_async_wait_newest() {
#ifdef CMK_EMULATE
  ::cmk_emu::cp_async_wait_group(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The part of the kernels' parameters that the plan fixes.
struct MmaGeom {
  int64_t N, C, H, W;
  int TH, tiles_h, SWs, SR;  // rows per item, row tiles per plane, staged row stride, staged rows
  int64_t items, ipb, groups;
  bool vec;  // the 16-byte (cp.async) staging path
};

// The forward's: x, w, bias, scale, shift -> out (y, or pre when stats); stats: part [groups][C][3].
struct MmaArgs : MmaGeom, DwOperands {};

// The zero columns of nrows staged rows (stride SWs): [0, kPadL) and [from, SWs).  Nothing writes them
// afterwards, so once per block is enough.
template <typename T>
__device__ __forceinline__ void zero_pad_columns(T* rows, int nrows, int SWs, int from, int tid, int nthreads) {
  for (int e = tid; e < nrows; e += nthreads) {
    T* row = rows + static_cast<size_t>(e) * SWs;
    for (int q = 0; q < kPadL; ++q) row[q] = from_f<T>(0.f);
    for (int q = from; q < SWs; ++q) row[q] = from_f<T>(0.f);
  }
}

// Item it (image n, row tile) -> its first image row h0 and the offset of element (n, c, 0, 0): NCHW,
// the plane of the block's channel c; channels_last (c = 0), the image.
__device__ __forceinline__ void mma_item(const MmaGeom& a, int64_t it, int64_t c, int64_t& base, int& h0) {
  const int64_t n = it / a.tiles_h;
  h0 = static_cast<int>(it - n * a.tiles_h) * a.TH;
  base = (n * a.C + c) * a.H * a.W;
}

// B fragments of T_r for the channel whose k*k fp32 weights are at wc (nullptr: zeros), hi and lo
// parts: bfr[r][part][reg], reg 0: kk = 2*t4 + {0, 1}, reg 1: kk + 8; column n = g.
template <typename T, int K, bool FLIP = false>
__device__ __forceinline__ void b_frags(uint32_t (&bfr)[K][2][2], const float* wc, int g, int t4) {
  constexpr int P = K / 2;
#pragma unroll
  for (int r = 0; r < K; ++r) {
#pragma unroll
    for (int reg = 0; reg < 2; ++reg) {
      T hi[2], lo[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 2 * t4 + e + 8 * reg - g + P - 4;
        // FLIP: the kernel rotated by 180 degrees (dx is the convolution of dpre with it)
        const int tap = FLIP ? (K - 1 - r) * K + (K - 1 - j) : r * K + j;
        const float v = (wc != nullptr && j >= 0 && j < K) ? __ldg(wc + tap) : 0.f;
        hi[e] = from_f<T>(v);
        lo[e] = from_f<T>(v - to_f<T>(hi[e]));
      }
      bfr[r][0][reg] = pack2<T>(hi[0], hi[1]);
      bfr[r][1][reg] = pack2<T>(lo[0], lo[1]);
    }
  }
}

// The convolution of one staged plane (rows of SWs elements, image column x at kPadL + x, staged row
// lr + r for output row lr and kernel row r): the warp computes units u0, u0 + step, ... of 16 rows x
// 8 columns (units_w across), two at a time, and hands each fragment pair to
// sink(lr, ow, sum at (lr, ow), sum at (lr, ow + 1)) (lr: row in the item, ow even).  LO: the plane is
// an fp32 value split in two (buf + buf_lo, same layout): the products hi*hi, hi*lo and lo*hi are
// summed (lo*lo is below fp32 rounding).
template <typename T, int K, bool LO = false, typename Sink>
__device__ __forceinline__ void plane_units(const T* buf, int SWs, int nunits, int units_w, int u0, int step,
                                            const uint32_t (&bfr)[K][2][2], int g, int t4, Sink&& sink,
                                            const T* buf_lo = nullptr) {
  for (int u = u0; u < nunits; u += 2 * step) {
    float acc[2][2][4];
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int hl = 0; hl < 2; ++hl)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[q][hl][e] = 0.f;
    int uh[2], uw[2];
    bool has[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int uq = u + q * step;
      has[q] = uq < nunits;  // uniform across the warp
      const int uu = has[q] ? uq : u;
      uh[q] = uu / units_w;
      uw[q] = uu - uh[q] * units_w;
    }
#pragma unroll
    for (int r = 0; r < K; ++r) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        // A: staged rows 16*uh + r + {g, g + 8}, columns 8*uw + 4 + 2*t4 + {0, 1, 8, 9}.
        const T* p0 = buf + (16 * uh[q] + r + g) * SWs + 8 * uw[q] + 4 + 2 * t4;
        const T* p1 = p0 + 8 * SWs;
        uint32_t af[4];
        af[0] = *reinterpret_cast<const uint32_t*>(p0);
        af[1] = *reinterpret_cast<const uint32_t*>(p1);
        af[2] = *reinterpret_cast<const uint32_t*>(p0 + 8);
        af[3] = *reinterpret_cast<const uint32_t*>(p1 + 8);
        if (has[q]) {
          mma16816<T>(acc[q][0], af, bfr[r][0]);
          mma16816<T>(acc[q][1], af, bfr[r][1]);
          if constexpr (LO) {
            const ptrdiff_t d = buf_lo - buf;
            uint32_t al[4];
            al[0] = *reinterpret_cast<const uint32_t*>(p0 + d);
            al[1] = *reinterpret_cast<const uint32_t*>(p1 + d);
            al[2] = *reinterpret_cast<const uint32_t*>(p0 + d + 8);
            al[3] = *reinterpret_cast<const uint32_t*>(p1 + d + 8);
            mma16816<T>(acc[q][1], al, bfr[r][0]);
          }
        }
      }
    }
    // Fragment element e: row 16*uh + g + 8*(e/2), column 8*uw + 2*t4 + e%2.
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (!has[q]) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half)
        sink(16 * uh[q] + g + 8 * half, 8 * uw[q] + 2 * t4, acc[q][0][2 * half] + acc[q][1][2 * half],
             acc[q][0][2 * half + 1] + acc[q][1][2 * half + 1]);
    }
  }
}

// Per-channel epilogue of one output: pre = round(sum + bias); stats: returns pre and folds u into the
// thread's (count, mean, M2) when ok; else y = BN/act of pre [+ the staged x at that position].
struct MmaEpi {
  float bias, scale, shift;
  bool act_first, residual, stats;
  float n = 0.f, m = 0.f, M2 = 0.f;
  template <int AC, typename T>
  __device__ __forceinline__ float operator()(float sum, bool ok, const T* xres) {
    const float pre = round_to<T>(sum + bias);
    if (stats) {
      const float u = act_first ? act_fwd_t<AC>(pre) : pre;
      if (ok) chan_merge(n, m, M2, 1.f, u, 0.f);
      return pre;
    }
    float y = bn_act_t<AC>(pre, scale, shift, act_first);
    if (residual) y = y + to_f<T>(*xres);
    return y;
  }
};

// NCHW: one block (4 warps) per channel and run of items.
template <typename T, int K>
__global__ void __launch_bounds__(kMmaThreads) dw_mma_kernel(const MmaArgs a) {
  constexpr int P = K / 2;
  CMK_DYNAMIC_SMEM(smem_f4);
  T* const stage0 = reinterpret_cast<T*>(smem_f4);
  const int SWs = a.SWs, SR = a.SR;
  const int stage_el = SR * SWs;  // a multiple of 8 (SWs is)
  float* const red = reinterpret_cast<float*>(stage0 + static_cast<size_t>(kStages) * stage_el);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t grp = blockIdx.x % a.groups;
  const int64_t c = blockIdx.x / a.groups;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int Wr = (W + 7) & ~7;
  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  const int nit = static_cast<int>(it1 - it0);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ out = static_cast<T*>(a.out);

  zero_pad_columns(stage0, kStages * SR, SWs, kPadL + Wr, tid, kMmaThreads);  // (staging fills [8, 8 + Wr))
  auto item_of = [&](int64_t it, int64_t& base, int& h0) { mma_item(a, it, c, base, h0); };
  // Stage item it into buffer s: image rows h0 - P .. h0 + TH + P - 1, columns [0, Wr).
  auto issue = [&](int64_t it, int s) {
    int64_t base;
    int h0;
    item_of(it, base, h0);
    T* buf = stage0 + static_cast<size_t>(s) * stage_el;
    if (a.vec) {
      const int vpr = Wr / 8;
      for (int e = tid; e < SR * vpr; e += kMmaThreads) {
        const int r = e / vpr, q = e - r * vpr;
        const int gh = h0 - P + r;
        const bool ok = gh >= 0 && gh < H;
        const T* src = ok ? x + base + static_cast<int64_t>(gh) * W + q * 8 : x;
        cp_async16(buf + r * SWs + kPadL + q * 8, src, ok);
      }
    } else {
      for (int e = tid; e < SR * Wr; e += kMmaThreads) {
        const int r = e / Wr, q = e - r * Wr;
        const int gh = h0 - P + r;
        buf[r * SWs + kPadL + q] =
            (gh >= 0 && gh < H && q < W) ? x[base + static_cast<int64_t>(gh) * W + q] : from_f<T>(0.f);
      }
    }
    cp_async_commit();
  };

  uint32_t bfr[K][2][2];
  b_frags<T, K>(bfr, a.w + c * (K * K), g, t4);
  MmaEpi epi{a.bias != nullptr ? a.bias[c] : 0.f, a.stats ? 0.f : a.scale[c], a.stats ? 0.f : a.shift[c],
             a.act_first, a.residual, a.stats};

  for (int j = 0; j < kStages - 1; ++j) {
    if (j < nit) issue(it0 + j, j); else cp_async_commit();  // one group per slot: uniform counting
  }

  const int units_w = Wr / 8;
  const int nunits = (a.TH / 16) * units_w;

  for (int ji = 0; ji < nit; ++ji) {
    cp_async_wait_newest<kStages - 2>();  // this thread's copies of item ji have landed
    __syncthreads();         // everyone's have; and buffer (ji - 1) % kStages is free
    if (ji + kStages - 1 < nit) issue(it0 + ji + kStages - 1, (ji + kStages - 1) % kStages);
    else cp_async_commit();
    int64_t base;
    int h0;
    item_of(it0 + ji, base, h0);
    const T* buf = stage0 + static_cast<size_t>(ji % kStages) * stage_el;
    with_act(a.act, [&](auto A) {
      constexpr int AC = decltype(A)::value;
      plane_units<T, K>(buf, SWs, nunits, units_w, warp, kMmaThreads / 32, bfr, g, t4,
                        [&](int lr, int ow, float s0, float s1) {
        const int oh = h0 + lr;
        const T* xr = buf + (lr + P) * SWs + kPadL + ow;  // x(oh, ow), staged exactly
        const bool ok0 = oh < H && ow < W, ok1 = oh < H && ow + 1 < W;
        const float o0 = epi.template operator()<AC>(s0, ok0, xr);
        const float o1 = epi.template operator()<AC>(s1, ok1, xr + 1);
        T* op = out + base + static_cast<int64_t>(oh) * W + ow;
        if (ok0 && ok1 && (W % 2) == 0) {
          *reinterpret_cast<uint32_t*>(op) = pack2<T>(from_f<T>(o0), from_f<T>(o1));
        } else {
          if (ok0) op[0] = from_f<T>(o0);
          if (ok1) op[1] = from_f<T>(o1);
        }
      });
    });
  }
  cp_async_wait_all();  // the empty groups of the last iterations

  if (a.stats) block_chan_store(epi.n, epi.m, epi.M2, red, a.part + (grp * a.C + c) * 3);  // fixed order
}

// channels_last: one block (8 warps) per group of kClCh = 8 channels (one 16-byte vector a pixel) and
// run of items; warp w computes channel c0 + w.  An item's pixels come in by cp.async into a ring of
// kClStages raw buffers (pixel-major, 8 channels a pixel) kClStages - 1 items ahead, are transposed
// into 8 staged planes (the NCHW kernel's layout) when the item is computed, and the outputs go back
// through the raw buffer just transposed (pixel-major again) so that y leaves in 16-byte stores.
// Without the 16-byte path (C % 8 != 0, misaligned) the planes are filled by plain loads.
constexpr int kClCh = 8;
constexpr int kClThreads = 32 * kClCh;
constexpr int kClStages = 3;

// channels_last: an item's outputs, pixel-major in shared memory (buf: pixel (lr, q) of the item at
// (lr * Wr + q) * 8, channels c0 .. c0 + 7), to out (16 bytes a pixel on the 16-byte path).
template <typename T>
__device__ __forceinline__ void store_pixels(const T* buf, T* out, const MmaGeom& a, int64_t base, int h0, int64_t c0,
                                             int tid) {
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int Wr = (W + 7) & ~7;
  const int rows = H - h0 < a.TH ? H - h0 : a.TH;
  for (int e = tid; e < rows * W; e += kClThreads) {
    const int lr = e / W, q = e - lr * W;
    const T* src = buf + (lr * Wr + q) * kClCh;
    T* dst = out + base + (static_cast<int64_t>(h0 + lr) * W + q) * a.C + c0;
    if (a.vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int ch = 0; ch < kClCh; ++ch)
        if (c0 + ch < a.C) dst[ch] = src[ch];
    }
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kClThreads) dw_mma_cl_kernel(const MmaArgs a) {
  constexpr int P = K / 2;
  CMK_DYNAMIC_SMEM(smem_f4);
  const int SWs = a.SWs, SR = a.SR;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int Wr = (W + 7) & ~7;
  const int raw_el = SR * Wr * kClCh;  // a multiple of 64
  const int plane_el = SR * SWs;       // a multiple of 8
  T* const raw0 = reinterpret_cast<T*>(smem_f4);
  T* const planes = raw0 + static_cast<size_t>(kClStages) * raw_el;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t grp = blockIdx.x % a.groups;
  const int64_t c0 = (blockIdx.x / a.groups) * kClCh;
  const int64_t c = c0 + warp;
  const bool c_ok = c < a.C;
  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  const int nit = static_cast<int>(it1 - it0);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ out = static_cast<T*>(a.out);

  // (the 16-byte path fills the planes' columns [8, 8 + W))
  zero_pad_columns(planes, kClCh * SR, SWs, kPadL + W, tid, kClThreads);
  auto item_of = [&](int64_t it, int64_t& base, int& h0) { mma_item(a, it, 0, base, h0); };
  auto issue = [&](int64_t it, int s) {  // 16-byte path: pixels (r, x) of the item into raw buffer s
    if (a.vec) {
      int64_t base;
      int h0;
      item_of(it, base, h0);
      T* buf = raw0 + static_cast<size_t>(s) * raw_el;
      for (int e = tid; e < SR * W; e += kClThreads) {
        const int r = e / W, q = e - r * W;
        const int gh = h0 - P + r;
        const bool ok = gh >= 0 && gh < H;
        const T* src = ok ? x + base + (static_cast<int64_t>(gh) * W + q) * a.C + c0 : x;
        cp_async16(buf + (r * Wr + q) * kClCh, src, ok);
      }
    }
    cp_async_commit();
  };

  uint32_t bfr[K][2][2];
  b_frags<T, K>(bfr, c_ok ? a.w + c * (K * K) : nullptr, g, t4);
  MmaEpi epi{(a.bias != nullptr && c_ok) ? a.bias[c] : 0.f, (a.stats || !c_ok) ? 0.f : a.scale[c],
             (a.stats || !c_ok) ? 0.f : a.shift[c], a.act_first, a.residual, a.stats};

  for (int j = 0; j < kClStages - 1; ++j) {
    if (j < nit) issue(it0 + j, j); else cp_async_commit();
  }

  const int units_w = Wr / 8;
  const int nunits = (a.TH / 16) * units_w;
  const T* plane = planes + static_cast<size_t>(warp) * plane_el;

  for (int ji = 0; ji < nit; ++ji) {
    cp_async_wait_newest<kClStages - 2>();
    __syncthreads();  // item ji landed; the previous item's outputs left raw buffer (ji - 1) % S
    if (ji + kClStages - 1 < nit) issue(it0 + ji + kClStages - 1, (ji + kClStages - 1) % kClStages);
    else cp_async_commit();
    int64_t base;
    int h0;
    item_of(it0 + ji, base, h0);
    T* raw = raw0 + static_cast<size_t>(ji % kClStages) * raw_el;
    // ---- the item as 8 planes ----
    if (a.vec) {
      for (int e = tid; e < SR * W; e += kClThreads) {
        const int r = e / W, q = e - r * W;
        const uint4 v = *reinterpret_cast<const uint4*>(raw + (r * Wr + q) * kClCh);
        const T* ve = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int ch = 0; ch < kClCh; ++ch) planes[ch * plane_el + r * SWs + kPadL + q] = ve[ch];
      }
    } else {
      for (int e = tid; e < SR * Wr * kClCh; e += kClThreads) {
        const int ch = e % kClCh, pix = e / kClCh;
        const int r = pix / Wr, q = pix - r * Wr;
        const int gh = h0 - P + r;
        planes[ch * plane_el + r * SWs + kPadL + q] =
            (gh >= 0 && gh < H && q < W && c0 + ch < a.C)
                ? x[base + (static_cast<int64_t>(gh) * W + q) * a.C + c0 + ch]
                : from_f<T>(0.f);
      }
    }
    __syncthreads();  // planes ready; raw is free for the outputs
    // ---- convolution of channel c0 + warp; outputs pixel-major into raw ----
    with_act(a.act, [&](auto A) {
      constexpr int AC = decltype(A)::value;
      plane_units<T, K>(plane, SWs, nunits, units_w, 0, 1, bfr, g, t4, [&](int lr, int ow, float s0, float s1) {
        const int oh = h0 + lr;
        const T* xr = plane + (lr + P) * SWs + kPadL + ow;
        const bool ok0 = c_ok && oh < H && ow < W, ok1 = c_ok && oh < H && ow + 1 < W;
        const float o0 = epi.template operator()<AC>(s0, ok0, xr);
        const float o1 = epi.template operator()<AC>(s1, ok1, xr + 1);
        raw[(lr * Wr + ow) * kClCh + warp] = from_f<T>(o0);
        raw[(lr * Wr + ow + 1) * kClCh + warp] = from_f<T>(o1);
      });
    });
    __syncthreads();  // the item's outputs are in raw
    // ---- store: pixel (lr, q), channels c0 .. c0 + 7 ----
    store_pixels(raw, out, a, base, h0, c0, tid);
  }
  cp_async_wait_all();

  if (a.stats) {  // per channel: the warp's threads merged in a fixed order
    float n = epi.n, m = epi.m, M2 = epi.M2;
    warp_chan_reduce(n, m, M2);
    if (lane == 0 && c_ok) {
      float* pp = a.part + (grp * a.C + c) * 3;
      pp[0] = n;
      pp[1] = m;
      pp[2] = M2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (NCHW): dx = conv(dpre, flipped w) [+ dy] and per-block partials of dweight and dbias.
//
// Per item (TH rows of one plane, staged with the k-1 halo): x, dy and pre come in by cp.async into a
// ring of kBwdStages stages; dpre (fp32, from dy and pre, zero outside the image) is split into hi and
// lo planes of the storage type.  dx: plane_units over the dpre planes with the flipped kernel (three
// products a fragment: hi*hi, hi*lo, lo*hi).  dweight[r][j] = sum over own rows h of dpre[h] . x[h + r -
// P] shifted by j - P: for each staged x row xs and 16-column window w0, one m16n8k16 product with
//   A[r][kk] = dpre[xs - r + P][w0 + kk]   (r < k, own rows only: each dpre row counted by one item)
//   B[kk][j] = x[xs][w0 + kk + j - P]      (j < 8; k = 9 takes a second product for j = 8)
// for the hi and lo parts of dpre, accumulated in fp32 fragments over the block's items and summed
// over its warps in a fixed order into part[(group * C + c) * (k*k + 1) + tap] (tap k*k: dbias), the
// tiled kernels' layout.
constexpr int kBwdStages = 3;

// The backward's: dy, x, pre, w, scale, shift, mean, ca, cb, cd -> out (dx); part as above.
struct MmaBwdArgs : MmaGeom, DwOperands {};

template <typename T>
__device__ __forceinline__ uint32_t lds32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <int K>
using DwAcc = float[K > 8 ? 2 : 1][4];  // weight-gradient fragments: n-tiles j < 8 (and j >= 8 at k = 9)

// One weight-gradient product (see above): staged x row xs, 16-column window w0.  A: the item's own dpre
// rows xs - r + P (hi and lo planes phi, plo; rows outside [P, P + TH) and r >= K are zero); B[kk][j] =
// x_at(w0 + kk + j - P), the x row's value at that image column (zero outside the image).
template <typename T, int K, typename XAt>
__device__ __forceinline__ void dweight_product(DwAcc<K>& acc, const T* phi, const T* plo, int SWs, int TH, int xs,
                                                int w0, int g, int t4, XAt&& x_at) {
  constexpr int P = K / 2;
  uint32_t ah[4], al[4];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = g + 8 * hr;
    const int ds = xs - r + P;  // staged dpre row
    const bool ok = r < K && ds >= P && ds < P + TH;
    const int so = (ok ? ds : 0) * SWs + kPadL + w0 + 2 * t4;
    ah[hr] = ok ? lds32(phi + so) : 0u;
    ah[hr + 2] = ok ? lds32(phi + so + 8) : 0u;
    al[hr] = ok ? lds32(plo + so) : 0u;
    al[hr + 2] = ok ? lds32(plo + so + 8) : 0u;
  }
#pragma unroll
  for (int nt = 0; nt < (K > 8 ? 2 : 1); ++nt) {
    const int col = w0 - P + g + 8 * nt + 2 * t4;  // B: kk = 2*t4 + {0, 1} and + 8, j = g + 8*nt
    const uint32_t bb[2] = {pack2<T>(x_at(col), x_at(col + 1)), pack2<T>(x_at(col + 8), x_at(col + 9))};
    mma16816<T>(acc[nt], ah, bb);
    mma16816<T>(acc[nt], al, bb);
  }
}

// f(tap, value) for the taps r * K + j (r, j < K) that this lane's fragments hold.
template <int K, typename F>
__device__ __forceinline__ void for_each_tap(const DwAcc<K>& acc, int g, int t4, F&& f) {
#pragma unroll
  for (int nt = 0; nt < (K > 8 ? 2 : 1); ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e / 2), j = 2 * t4 + (e % 2) + 8 * nt;
      if (r < K && j < K) f(r * K + j, acc[nt][e]);
    }
}

template <typename T, int K>
__global__ void __launch_bounds__(kMmaThreads) dw_mma_bwd_kernel(const MmaBwdArgs a) {
  constexpr int P = K / 2, KK = K * K;
  constexpr int NW = kMmaThreads / 32;
  CMK_DYNAMIC_SMEM(smem_f4);
  const int SWs = a.SWs, SR = a.SR;
  const int pl = SR * SWs;  // elements of a plane (a multiple of 8)
  T* const ring = reinterpret_cast<T*>(smem_f4);  // stage s: x, dy, pre planes
  T* const dhi = ring + static_cast<size_t>(kBwdStages) * 3 * pl;
  T* const dlo = dhi + pl;
  float* const red = reinterpret_cast<float*>(dlo + pl);  // [warps][k*k + 1]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t grp = blockIdx.x % a.groups;
  const int64_t c = blockIdx.x / a.groups;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int Wr = (W + 7) & ~7;
  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  const int nit = static_cast<int>(it1 - it0);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ pre = static_cast<const T*>(a.pre);
  T* __restrict__ dx = static_cast<T*>(a.out);

  zero_pad_columns(ring, (kBwdStages * 3 + 2) * SR, SWs, kPadL + W, tid, kMmaThreads);  // (fills [8, 8 + W))
  auto item_of = [&](int64_t it, int64_t& base, int& h0) { mma_item(a, it, c, base, h0); };
  // Stage x, dy and pre of item it (image rows h0 - P .. h0 + TH + P - 1, zero outside) into stage s.
  auto issue = [&](int64_t it, int s) {
    int64_t base;
    int h0;
    item_of(it, base, h0);
    T* px = ring + static_cast<size_t>(s) * 3 * pl;
    if (a.vec) {
      const int vpr = W / 8;
      for (int e = tid; e < SR * vpr; e += kMmaThreads) {
        const int r = e / vpr, q = e - r * vpr;
        const int gh = h0 - P + r;
        const bool ok = gh >= 0 && gh < H;
        const int64_t off = ok ? base + static_cast<int64_t>(gh) * W + q * 8 : 0;
        const int so = r * SWs + kPadL + q * 8;
        cp_async16(px + so, x + off, ok);
        cp_async16(px + pl + so, dy + off, ok);
        cp_async16(px + 2 * pl + so, pre + off, ok);
      }
    } else {
      for (int e = tid; e < SR * W; e += kMmaThreads) {
        const int r = e / W, q = e - r * W;
        const int gh = h0 - P + r;
        const bool ok = gh >= 0 && gh < H;
        const int64_t off = base + static_cast<int64_t>(gh) * W + q;
        const int so = r * SWs + kPadL + q;
        px[so] = ok ? x[off] : from_f<T>(0.f);
        px[pl + so] = ok ? dy[off] : from_f<T>(0.f);
        px[2 * pl + so] = ok ? pre[off] : from_f<T>(0.f);
      }
    }
    cp_async_commit();
  };

  uint32_t bfr[K][2][2];
  b_frags<T, K, true>(bfr, a.w + c * KK, g, t4);
  const ChanCoef qc{a.scale[c], a.shift[c], a.mean[c], a.ca[c], a.cb[c], a.cd[c]};
  const bool act_first = a.act_first, residual = a.residual;
  DwAcc<K> dwacc = {};
  float db = 0.f;

  for (int j = 0; j < kBwdStages - 1; ++j) {
    if (j < nit) issue(it0 + j, j); else cp_async_commit();
  }
  const int units_w = Wr / 8;
  const int nunits = (a.TH / 16) * units_w;
  const int nwin = (W + 15) / 16;

  for (int ji = 0; ji < nit; ++ji) {
    cp_async_wait_newest<kBwdStages - 2>();
    __syncthreads();  // item ji landed; the previous item is done with dhi/dlo and its stage
    if (ji + kBwdStages - 1 < nit) issue(it0 + ji + kBwdStages - 1, (ji + kBwdStages - 1) % kBwdStages);
    else cp_async_commit();
    int64_t base;
    int h0;
    item_of(it0 + ji, base, h0);
    const T* px = ring + static_cast<size_t>(ji % kBwdStages) * 3 * pl;
    const T* pdy = px + pl;
    const T* ppre = px + 2 * pl;
    // ---- dpre over the staged rows, zero outside the image; dbias over the item's own rows ----
    with_act(a.act, [&](auto A) {
      constexpr int AC = decltype(A)::value;
      for (int e = tid; e < SR * W; e += kMmaThreads) {
        const int r = e / W, q = e - r * W;
        const int gh = h0 - P + r;
        const int so = r * SWs + kPadL + q;
        float d = 0.f;
        if (gh >= 0 && gh < H) d = dpre_t<AC>(to_f<T>(pdy[so]), to_f<T>(ppre[so]), qc, act_first);
        if (r >= P && r < P + a.TH) db += d;
        const T hi = from_f<T>(d);
        dhi[so] = hi;
        dlo[so] = from_f<T>(d - to_f<T>(hi));
      }
    });
    __syncthreads();
    // ---- dx ----
    plane_units<T, K, true>(dhi, SWs, nunits, units_w, warp, NW, bfr, g, t4,
                            [&](int lr, int ow, float s0, float s1) {
      const int oh = h0 + lr;
      const bool ok0 = oh < H && ow < W, ok1 = oh < H && ow + 1 < W;
      const T* g0 = pdy + (lr + P) * SWs + kPadL + ow;  // dy(oh, ow), staged
      const float o0 = residual ? s0 + to_f<T>(g0[0]) : s0;
      const float o1 = residual ? s1 + to_f<T>(g0[1]) : s1;
      T* op = dx + base + static_cast<int64_t>(oh) * W + ow;
      if (ok0 && ok1 && (W % 2) == 0) {
        *reinterpret_cast<uint32_t*>(op) = pack2<T>(from_f<T>(o0), from_f<T>(o1));
      } else {
        if (ok0) op[0] = from_f<T>(o0);
        if (ok1) op[1] = from_f<T>(o1);
      }
    }, dlo);
    // ---- dweight: (x row, 16-column window) products ----
    for (int task = warp; task < SR * nwin; task += NW) {
      const int xs = task / nwin, w0 = (task - xs * nwin) * 16;
      const T* xrow = px + xs * SWs + kPadL;  // padded: zero columns either side
      dweight_product<T, K>(dwacc, dhi, dlo, SWs, a.TH, xs, w0, g, t4, [&](int col) { return xrow[col]; });
    }
  }
  cp_async_wait_all();

  // ---- block sums, fixed order: each warp's taps (one lane holds each), then the warps in order ----
  for_each_tap<K>(dwacc, g, t4, [&](int tap, float v) { red[warp * (KK + 1) + tap] = v; });
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) db += __shfl_down_sync(0xffffffffu, db, off);
  if (lane == 0) red[warp * (KK + 1) + KK] = db;
  __syncthreads();
  for (int t = tid; t <= KK; t += kMmaThreads) {
    float sum = 0.f;
    for (int w = 0; w < NW; ++w) sum += red[w * (KK + 1) + t];
    a.part[(grp * a.C + c) * (KK + 1) + t] = sum;
  }
}

// Backward, channels_last: a block (8 warps) per 8 channels, warp w computes channel c0 + w.  x, dy and
// pre come in pixel-major (8 channels a pixel: one 16-byte vector) by cp.async, double buffered; dpre is
// computed per (pixel, channel) into hi/lo planes per channel; dx goes out through the pre buffer just
// consumed (pixel-major, 16-byte stores); the weight-gradient products read x straight from the
// pixel-major buffer (zero outside [0, W)).  With a.dpre_in (the fp32 dpre pass, dw_launch.cu) the third
// buffer of a stage holds that dpre (fp32, twice the size: two 16-byte copies a pixel) instead of pre,
// and the planes are split from it: computing dpre here was about 150 SASS instructions per staged
// element, most of the kernel's (sm_90a, bf16, k=9).  Each warp's dweight fragments are its channel's whole block
// sum; dbias: each thread sums one channel (tid % 8), the 32 threads of a channel are added in order.
// Without the 16-byte path the buffers are filled by plain loads when the item is computed.
constexpr int kClBwdStages = 2;

template <typename T, int K>
__global__ void __launch_bounds__(kClThreads) dw_mma_bwd_cl_kernel(const MmaBwdArgs a) {
  constexpr int P = K / 2, KK = K * K;
  CMK_DYNAMIC_SMEM(smem_f4);
  const int SWs = a.SWs, SR = a.SR;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W);
  const int Wr = (W + 7) & ~7;
  const int raw_el = SR * Wr * kClCh;  // one tensor's pixels of an item (a multiple of 64)
  const int pl = SR * SWs;
  const float* __restrict__ dpre_in = a.dpre_in;
  const int slots = dpre_in != nullptr ? 4 : 3;  // x, dy, then pre, or fp32 dpre in two slots
  T* const raw0 = reinterpret_cast<T*>(smem_f4);  // stage s: x, dy, pre | dpre (pixel-major)
  T* const dhi = raw0 + static_cast<size_t>(kClBwdStages) * slots * raw_el;  // [channel][plane]
  T* const dlo = dhi + static_cast<size_t>(kClCh) * pl;
  float* const red = reinterpret_cast<float*>(dlo + static_cast<size_t>(kClCh) * pl);  // [threads]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t grp = blockIdx.x % a.groups;
  const int64_t c0 = (blockIdx.x / a.groups) * kClCh;
  const int64_t c = c0 + warp;
  const bool c_ok = c < a.C;
  const int my_ch = tid % kClCh;  // the channel of this thread's dpre elements (the stride is a multiple of 8)
  const int64_t it0 = grp * a.ipb;
  const int64_t it1 = it0 + a.ipb < a.items ? it0 + a.ipb : a.items;
  const int nit = static_cast<int>(it1 - it0);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ pre = static_cast<const T*>(a.pre);
  T* __restrict__ dx = static_cast<T*>(a.out);

  zero_pad_columns(dhi, 2 * kClCh * SR, SWs, kPadL + W, tid, kClThreads);  // (dpre fills [8, 8 + W))
  auto item_of = [&](int64_t it, int64_t& base, int& h0) { mma_item(a, it, 0, base, h0); };
  auto issue = [&](int64_t it, int s) {
    if (a.vec) {
      int64_t base;
      int h0;
      item_of(it, base, h0);
      T* buf = raw0 + static_cast<size_t>(s) * slots * raw_el;
      float* dbuf = reinterpret_cast<float*>(buf + 2 * raw_el);
      for (int e = tid; e < SR * W; e += kClThreads) {
        const int r = e / W, q = e - r * W;
        const int gh = h0 - P + r;
        const bool ok = gh >= 0 && gh < H;
        const int64_t off = ok ? base + (static_cast<int64_t>(gh) * W + q) * a.C + c0 : 0;
        const int so = (r * Wr + q) * kClCh;
        cp_async16(buf + so, x + off, ok);
        cp_async16(buf + raw_el + so, dy + off, ok);
        if (dpre_in != nullptr) {
          cp_async16(dbuf + so, dpre_in + off, ok);
          cp_async16(dbuf + so + 4, dpre_in + off + 4, ok);
        } else {
          cp_async16(buf + 2 * raw_el + so, pre + off, ok);
        }
      }
    }
    cp_async_commit();
  };

  uint32_t bfr[K][2][2];
  b_frags<T, K, true>(bfr, c_ok ? a.w + c * KK : nullptr, g, t4);
  const int64_t cm = c0 + my_ch;
  const bool cm_ok = cm < a.C;
  const ChanCoef qc = cm_ok ? ChanCoef{a.scale[cm], a.shift[cm], a.mean[cm], a.ca[cm], a.cb[cm], a.cd[cm]}
                            : ChanCoef{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const bool act_first = a.act_first, residual = a.residual;
  DwAcc<K> dwacc = {};
  float db = 0.f;

  for (int j = 0; j < kClBwdStages - 1; ++j) {
    if (j < nit) issue(it0 + j, j); else cp_async_commit();
  }
  const int units_w = Wr / 8;
  const int nunits = (a.TH / 16) * units_w;
  const int nwin = (W + 15) / 16;
  const T* phi = dhi + static_cast<size_t>(warp) * pl;
  const T* plo = dlo + static_cast<size_t>(warp) * pl;

  for (int ji = 0; ji < nit; ++ji) {
    cp_async_wait_newest<kClBwdStages - 2>();
    __syncthreads();  // item ji landed; the previous item's dx left its buffer; the dpre planes are free
    if (ji + kClBwdStages - 1 < nit) issue(it0 + ji + kClBwdStages - 1, (ji + kClBwdStages - 1) % kClBwdStages);
    else cp_async_commit();
    int64_t base;
    int h0;
    item_of(it0 + ji, base, h0);
    T* rx = raw0 + static_cast<size_t>(ji % kClBwdStages) * slots * raw_el;
    T* rdy = rx + raw_el;
    T* rpre = rx + 2 * raw_el;  // pre, or dpre (fp32); then the dx outputs
    float* rdp = reinterpret_cast<float*>(rpre);
    if (!a.vec) {  // plain loads of the item's x, dy and pre | dpre (zero outside the image and past C)
      for (int e = tid; e < SR * W * kClCh; e += kClThreads) {
        const int ch = e % kClCh, pix = e / kClCh;
        const int r = pix / W, q = pix - r * W;
        const int gh = h0 - P + r;
        const bool ok = gh >= 0 && gh < H && c0 + ch < a.C;
        const int64_t off = base + (static_cast<int64_t>(gh) * W + q) * a.C + c0 + ch;
        const int so = (r * Wr + q) * kClCh + ch;
        rx[so] = ok ? x[off] : from_f<T>(0.f);
        rdy[so] = ok ? dy[off] : from_f<T>(0.f);
        if (dpre_in != nullptr) rdp[so] = ok ? dpre_in[off] : 0.f;
        else rpre[so] = ok ? pre[off] : from_f<T>(0.f);
      }
      __syncthreads();
    }
    // ---- dpre planes (zero outside the image and past C); dbias over the item's own rows ----
    // (the dpre value, then its hi/lo split and dbias: the same values either way)
    auto put = [&](int r, int q, float d) {
      if (r >= P && r < P + a.TH) db += d;
      const T hi = from_f<T>(d);
      const int po = my_ch * pl + r * SWs + kPadL + q;
      dhi[po] = hi;
      dlo[po] = from_f<T>(d - to_f<T>(hi));
    };
    if (dpre_in != nullptr) {
      for (int e = tid; e < SR * W * kClCh; e += kClThreads) {
        const int pix = e / kClCh;  // channel: my_ch
        const int r = pix / W, q = pix - r * W;
        const int gh = h0 - P + r;
        put(r, q, gh >= 0 && gh < H && cm_ok ? rdp[(r * Wr + q) * kClCh + my_ch] : 0.f);
      }
    } else {
      with_act(a.act, [&](auto A) {
        constexpr int AC = decltype(A)::value;
        for (int e = tid; e < SR * W * kClCh; e += kClThreads) {
          const int pix = e / kClCh;  // channel: my_ch
          const int r = pix / W, q = pix - r * W;
          const int gh = h0 - P + r;
          const int so = (r * Wr + q) * kClCh + my_ch;
          float d = 0.f;
          if (gh >= 0 && gh < H && cm_ok) d = dpre_t<AC>(to_f<T>(rdy[so]), to_f<T>(rpre[so]), qc, act_first);
          put(r, q, d);
        }
      });
    }
    __syncthreads();  // dpre ready; rpre is free for the outputs
    // ---- dx of channel c0 + warp, pixel-major into rpre ----
    plane_units<T, K, true>(phi, SWs, nunits, units_w, 0, 1, bfr, g, t4, [&](int lr, int ow, float s0, float s1) {
      const int so = ((lr + P) * Wr + ow) * kClCh + warp;  // dy(h0 + lr, ow) in the staged rows
      const float o0 = residual ? s0 + to_f<T>(rdy[so]) : s0;
      const float o1 = residual ? s1 + to_f<T>(rdy[so + kClCh]) : s1;  // (ow + 1 < Wr; past W unused)
      rpre[(lr * Wr + ow) * kClCh + warp] = from_f<T>(o0);
      rpre[(lr * Wr + ow + 1) * kClCh + warp] = from_f<T>(o1);
    }, plo);
    // ---- dweight of channel c0 + warp: (x row, 16-column window) products ----
    for (int task = 0; task < SR * nwin; ++task) {
      const int xs = task / nwin, w0 = (task - xs * nwin) * 16;
      const T* xrow = rx + xs * Wr * kClCh + warp;  // pixel-major, no padding
      dweight_product<T, K>(dwacc, phi, plo, SWs, a.TH, xs, w0, g, t4, [&](int col) {
        return (col >= 0 && col < W) ? xrow[col * kClCh] : from_f<T>(0.f);
      });
    }
    __syncthreads();  // dx of all 8 channels is in rpre
    // ---- store dx: pixel (lr, q), channels c0 .. c0 + 7 ----
    store_pixels(rpre, dx, a, base, h0, c0, tid);
  }
  cp_async_wait_all();

  // ---- partials: a warp's fragments are its channel's block sum; dbias per channel in thread order ----
  if (c_ok) for_each_tap<K>(dwacc, g, t4, [&](int tap, float v) { a.part[(grp * a.C + c) * (KK + 1) + tap] = v; });
  red[tid] = db;
  __syncthreads();
  if (tid < kClCh && c0 + tid < a.C) {
    float sum = 0.f;
    for (int i = tid; i < kClThreads; i += kClCh) sum += red[i];
    a.part[(grp * a.C + c0 + tid) * (KK + 1) + KK] = sum;
  }
}

struct MmaPlan {
  bool ok = false;
  int TH = 0, tiles_h = 0, SWs = 0, SR = 0;
  int64_t items = 0, ipb = 1, groups = 0, blocks = 0;
  size_t smem_bytes = 0;
  bool dpre_pass = false;  // backward, channels_last: stages the fp32 dpre pass's values
};

// Mode from CONVMIXER_KERNELS_DW_MMA: 0 off ("0"), 1 wherever it applies ("1"), 2 required ("require"),
// 3 (unset, or any other value) the default: where it applies and was measured faster (mma_default).
int mma_mode() {
  const char* env = std::getenv("CONVMIXER_KERNELS_DW_MMA");
  if (env == nullptr) return 3;
  if (std::strcmp(env, "0") == 0) return 0;
  if (std::strcmp(env, "1") == 0) return 1;
  if (std::strcmp(env, "require") == 0) return 2;
  return 3;
}

// The default: the eval forward (dw_fwd) at k=9 in both layouts and at k=7 in channels_last, and the
// training ops (statistics forward, backward) at k=9 in channels_last: where the tensor-core kernels
// beat the FMA ones (H200, bf16, N=64 C=768 32x32, 2026-11-27; benchmarks/results/NOTES.md): eval k=9
// 0.379 vs 0.470 ms NCHW, 0.379 vs 0.544 ms channels_last, k=7 channels_last 0.358 vs 0.411 ms (k=7
// NCHW 0.364 vs 0.355, so not there); a training step k=9 channels_last 3.05 vs 4.36 ms (the FMA kernels
// were the faster in the other three training cases: 1.45 vs 1.88, 1.85 vs 2.06, 2.49 vs 2.68 ms).
bool mma_default(const DwGeom& g, bool eval_fwd) {
  return g.k == 9 ? (eval_fwd || g.cl) : (eval_fwd && g.k == 7 && g.cl);
}

// Items and blocks of a plan whose TH, SWs, SR and smem_bytes are set: several items a block, while
// about four waves of resident blocks remain (residency: shared memory, and by_regs blocks an SM).
MmaPlan finish_plan(MmaPlan p, const DwGeom& g, int64_t cgroups, int64_t by_regs, const DevInfo& dev) {
  p.tiles_h = static_cast<int>((g.H + p.TH - 1) / p.TH);
  p.items = g.N * p.tiles_h;
  int64_t per_sm = dev.smem_per_sm / static_cast<int64_t>(p.smem_bytes + 1024);
  per_sm = per_sm < 1 ? 1 : (per_sm > by_regs ? by_regs : per_sm);
  const int64_t target = int64_t(dev.sms > 0 ? dev.sms : 1) * per_sm * 4;
  const int64_t ipb = (p.items * cgroups) / target;
  p.ipb = ipb < 1 ? 1 : (ipb > 64 ? 64 : ipb);
  // The tiled kernels' measurement knob (benchmarks, the emulator's pipeline cases).
  if (const char* env = std::getenv("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 1 && v <= 64) p.ipb = v;
  }
  p.groups = (p.items + p.ipb - 1) / p.ipb;
  p.blocks = p.groups * cgroups;
  if (p.blocks > 0x7fffffffLL) return MmaPlan{};
  p.ok = true;
  return p;
}

// Whether the tensor-core kernels serve a call at all: fp16/bf16, k in {3, 5, 7, 9}, a non-empty image
// of moderate width, a GPU with mma.sync.
bool mma_serves(const DwGeom& g, const DevInfo& dev) {
  return dev.cc_major >= 8 && g.dtype != kF32 && (g.k == 3 || g.k == 5 || g.k == 7 || g.k == 9) && g.N * g.C > 0 &&
         g.H > 0 && g.W > 0 && g.W <= 4096;
}

// Rows per item: the whole image (rounded up to 16) while bytes(TH) fits the budget, else fewer
// (multiples of 16); fills TH, SWs, SR and smem_bytes.  False when even 16 rows exceed the device.
template <typename Bytes>
bool plan_rows(MmaPlan& p, const DwGeom& g, int64_t SWs, int64_t budget, Bytes&& bytes, const DevInfo& dev) {
  int64_t TH = (g.H + 15) / 16 * 16;
  while (TH > 16 && bytes(TH) > budget) TH -= 16;
  p.TH = static_cast<int>(TH);
  p.SWs = static_cast<int>(SWs);
  p.SR = static_cast<int>(TH + g.k - 1);
  p.smem_bytes = static_cast<size_t>(bytes(TH));
  return p.smem_bytes <= static_cast<size_t>(dev.smem_optin);
}

MmaPlan plan_mma(const DwGeom& g, const DevInfo& dev) {
  MmaPlan p;
  if (!mma_serves(g, dev)) return p;
  const int64_t Wr = (g.W + 7) / 8 * 8;
  // Plane row stride: 8 + Wr + 8 columns rounded up to 8 mod 16, so that the 8 rows a fragment load
  // touches start 4 banks apart (conflict-free) and rows stay 16-byte aligned.
  int64_t SWs = kPadL + Wr + 8;
  SWs = (SWs + 15) / 16 * 16 + 8;
  // Shared memory of an item of TH rows: NCHW kStages planes; channels_last kClStages raw buffers
  // (pixel-major, 8 channels) and 8 planes.  Rows per item: the whole plane when that fits the budget,
  // else fewer (multiples of 16).
  auto bytes = [&](int64_t TH) {
    const int64_t SR = TH + g.k - 1;
    return g.cl ? static_cast<int64_t>(kClStages) * SR * Wr * kClCh * 2 + kClCh * SR * SWs * 2
                : static_cast<int64_t>(kStages) * SR * SWs * 2 + 3 * 4 * (kMmaThreads / 32);
  };
  if (!plan_rows(p, g, SWs, g.cl ? 100 * 1024 : 48 * 1024, bytes, dev)) return MmaPlan{};
  // Registers (ptxas, sm_90a: 90-124 a thread) allow about four 128-thread NCHW blocks or two
  // 256-thread channels_last blocks an SM.
  return finish_plan(p, g, g.cl ? (g.C + kClCh - 1) / kClCh : g.C, g.cl ? 2 : 4, dev);
}

// The 16-byte staging path: NCHW rows, or channels_last pixels, a whole number of 16-byte vectors, and
// every tensor operand aligned (absent ones, nullptr, count as aligned).
bool mma_vec(const DwGeom& g, const DwOperands& o) {
  return (g.cl ? g.C % 8 == 0 && aligned16(o.out) : g.W % 8 == 0) && aligned16(o.x) && aligned16(o.dy) &&
         aligned16(o.pre);
}

void set_geom(MmaGeom& a, const DwGeom& g, const MmaPlan& p) {
  a.N = g.N;
  a.C = g.C;
  a.H = g.H;
  a.W = g.W;
  a.TH = p.TH;
  a.tiles_h = p.tiles_h;
  a.SWs = p.SWs;
  a.SR = p.SR;
  a.items = p.items;
  a.ipb = p.ipb;
  a.groups = p.groups;
}

template <int K> struct KTag { static constexpr int value = K; };

// f(T{}, KTag<k>{}) for the call's storage type T (__half or __nv_bfloat16) and k in {3, 5, 7, 9}.
template <typename F>
cudaError_t with_type_k(const DwGeom& g, F&& f) {
  auto by_k = [&](auto t) -> cudaError_t {
    switch (g.k) {
      case 3: return f(t, KTag<3>{});
      case 5: return f(t, KTag<5>{});
      case 7: return f(t, KTag<7>{});
      case 9: return f(t, KTag<9>{});
    }
    return cudaErrorInvalidValue;
  };
  return g.dtype == kBF16 ? by_k(__nv_bfloat16{}) : by_k(__half{});
}

// Launches kern (its shared memory opted in once per device through opted) with the plan's blocks.
template <typename Args>
cudaError_t launch_planned(void (*kern)(Args), SmemOptIn& opted, int threads, const Args& a, const MmaPlan& p,
                           cudaStream_t stream) {
  const cudaError_t e = opt_in_smem(opted, kern, p.smem_bytes);
  if (e != cudaSuccess) return e;
  CMK_LAUNCH(kern, static_cast<unsigned>(p.blocks), threads, p.smem_bytes, stream)(a);
  return cudaGetLastError();
}

// Backward plan: rows per item so that the buffers fit ~64 KB (NCHW: about three blocks an SM) or
// ~200 KB (channels_last: one 8-warp block an SM, a whole 32x32 item of 8 channels in flight).
MmaPlan plan_mma_bwd(const DwGeom& g, const DevInfo& dev) {
  MmaPlan p;
  if (!mma_serves(g, dev)) return p;
  const int64_t W16 = (g.W + 15) / 16 * 16;
  // The weight-gradient products read x up to column w0 + 30 - P of a 16-column window.
  int64_t SWs = kPadL + W16 + 16;
  SWs = (SWs + 15) / 16 * 16 + 8;
  const int64_t KK = int64_t(g.k) * g.k;
  const int64_t Wr = (g.W + 7) / 8 * 8;
  // channels_last with the dpre pass: a fourth buffer slot a stage (fp32 dpre in place of pre); where
  // even 16 rows of that do not fit, the kernel computes dpre itself (three slots).
  p.dpre_pass = g.cl && dpre_pass_allowed();
  auto bytes = [&](int64_t TH) {
    const int64_t SR = TH + g.k - 1;
    return g.cl ? static_cast<int64_t>(kClBwdStages) * (p.dpre_pass ? 4 : 3) * SR * Wr * kClCh * 2 +
                      2 * kClCh * SR * SWs * 2 + kClThreads * 4
                : (static_cast<int64_t>(kBwdStages) * 3 + 2) * SR * SWs * 2 + (kMmaThreads / 32) * (KK + 1) * 4;
  };
  if (!plan_rows(p, g, SWs, g.cl ? 200 * 1024 : 64 * 1024, bytes, dev)) {
    if (!p.dpre_pass) return MmaPlan{};
    p.dpre_pass = false;
    if (!plan_rows(p, g, SWs, 200 * 1024, bytes, dev)) return MmaPlan{};
  }
  // registers: 96-162 a thread (NCHW, 128 threads)
  return finish_plan(p, g, g.cl ? (g.C + kClCh - 1) / kClCh : g.C, g.cl ? 1 : 4, dev);
}

// The plan of a call when the tensor-core kernels run it (mma_mode, and by default mma_default; eval_fwd:
// the call is dw_fwd) and serve it; otherwise *status is what the launcher returns
// (cudaErrorNotSupported under =require).
template <typename PlanFn>
bool mma_plan(const DwGeom& g, PlanFn plan, bool eval_fwd, MmaPlan& p, cudaError_t& status) {
  status = cudaSuccess;
  const int mode = mma_mode();
  if (mode == 0 || (mode == 3 && !mma_default(g, eval_fwd))) return false;
  p = plan(g, dev_info());
  if (!p.ok && mode == 2) status = cudaErrorNotSupported;
  return p.ok;
}

}  // namespace

int64_t dw_mma_partials(const DwGeom& g) {
  MmaPlan p;
  cudaError_t status;
  return mma_plan(g, plan_mma, false, p, status) ? p.groups : 0;
}

bool dw_mma_bwd_dpre_pass(const DwGeom& g) {
  MmaPlan p;
  cudaError_t status;
  return mma_plan(g, plan_mma_bwd, false, p, status) && p.dpre_pass;
}

int64_t dw_mma_bwd_partials(const DwGeom& g) {
  MmaPlan p;
  cudaError_t status;
  return mma_plan(g, plan_mma_bwd, false, p, status) ? p.groups : 0;
}

cudaError_t dw_mma_launch(const DwGeom& g, const DwOperands& o, float* mean, float* var, cudaStream_t stream,
                          bool* ran) {
  *ran = false;
  MmaPlan p;
  cudaError_t status;
  if (!mma_plan(g, plan_mma, !o.stats, p, status)) return status;
  MmaArgs a{};
  set_geom(a, g, p);
  static_cast<DwOperands&>(a) = o;
  a.vec = mma_vec(g, o);
  const cudaError_t e = with_type_k(g, [&](auto t, auto kt) {
    using T = decltype(t);
    constexpr int K = decltype(kt)::value;
    static SmemOptIn opted[2];
    return g.cl ? launch_planned(dw_mma_cl_kernel<T, K>, opted[1], kClThreads, a, p, stream)
                : launch_planned(dw_mma_kernel<T, K>, opted[0], kMmaThreads, a, p, stream);
  });
  if (e != cudaSuccess) return e;
  *ran = true;
  return o.stats ? launch_stats_finalize(o.part, p.groups, g.C, mean, var, stream) : cudaSuccess;
}

cudaError_t dw_mma_bwd_launch(const DwGeom& g, const DwOperands& o, float* dweight, float* dbias, float* dpre,
                              cudaStream_t stream, bool* ran) {
  *ran = false;
  MmaPlan p;
  cudaError_t status;
  if (!mma_plan(g, plan_mma_bwd, false, p, status)) return status;
  MmaBwdArgs a{};
  set_geom(a, g, p);
  static_cast<DwOperands&>(a) = o;
  a.vec = mma_vec(g, o);
  if (p.dpre_pass) {  // (the pass's buffer is 16-byte aligned: a.vec's copies of it are too)
    launch_dpre_pass(g, o, dpre, stream);
    a.dpre_in = dpre;
  }
  const cudaError_t e = with_type_k(g, [&](auto t, auto kt) {
    using T = decltype(t);
    constexpr int K = decltype(kt)::value;
    static SmemOptIn opted[2];
    return g.cl ? launch_planned(dw_mma_bwd_cl_kernel<T, K>, opted[1], kClThreads, a, p, stream)
                : launch_planned(dw_mma_bwd_kernel<T, K>, opted[0], kMmaThreads, a, p, stream);
  });
  if (e != cudaSuccess) return e;
  *ran = true;
  const int KK = g.k * g.k;
  return launch_sum_finalize(o.part, p.groups, g.C, KK + 1, dweight, KK, dbias, nullptr, stream);
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
