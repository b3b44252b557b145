// The CPU kernels of the fused depthwise block, written once over at::vec::Vectorized and
// compiled once per instruction set: each dw_isa_<isa>.cpp defines CPU_CAPABILITY (the
// at::vec namespace) and CMK_ISA_NS / CMK_ISA_NAME, then includes this file.  All of it
// lives in an anonymous namespace except `kernels()`, so the copies never meet at link time.
//
// Semantics: convmixer_kernels/torch_ops.py.  Design:
//   * Rows stream once through a small per-thread ring of staged rows (Ring, stream_rows):
//     each input row is converted to the accumulation type A once and zero padded (p
//     zeros either side, zero rows outside the image), so the convolution has no boundary
//     tests and no conversions, and reads only L1/L2.
//       NCHW: an item is one channel; a staged row holds Wp = round_up(W, V) + k - 1
//             values and outputs are vectors along W, kMaxRows rows at a time so each
//             loaded input vector feeds several output rows (conv_block_nchw);
//       channels_last: an item is a group of CB channels (often all of C, so x is read
//             in whole pixels); a staged row is nv = CB / V planes of (W + k - 1) pixels x
//             V channels, and outputs are vectors along C, P pixels at a time, the k
//             weights of a kernel row in registers (conv_px_cl_k).
//     In NCHW a "pixel" of RowMap is a vector of V outputs of one channel, so per-channel
//     parameters are arrays of V equal values there and one epilogue serves both layouts.
//   * The epilogues work per vector on the conv output (fwd_vec, dpre_vec, ...), so an op
//     makes a single pass over its outputs.  pre = conv + bias is rounded to the storage
//     type T right away and every consumer uses the rounded value, so dw_fwd and
//     dw_conv_stats agree bitwise on it.
//   * Reductions (mean/var, BN-backward sums, dweight, dbias) run over work items
//     (channel group, batch group): the split depends on shapes only, each item is
//     computed by one thread in a fixed order, and items are merged in a fixed order, so
//     results are bitwise identical for any thread count.  Vectors accumulate in A over a
//     few rows, lanes are added in order into double, items merge in double; mean/var use
//     two-pass moments of each block of rows merged with Chan's formula (no cancellation).
//   * dw_bwd stages dpre (recomputed from dy and pre, elementwise) in a second ring next to
//     x: dx is the depthwise conv of dpre with the flipped kernel, and dweight is k*k dot
//     products of the dpre row with the staged x rows.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace convmixer_kernels {
namespace cpu {
namespace CMK_ISA_NS {
namespace {

using at::vec::Vectorized;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// 64-byte aligned scratch memory (internal linkage: no std::vector instantiation shared with
// translation units compiled for another CPU).  Zero-initialised, or (kUninit: for staging rings
// and row buffers that are written before they are read, where zeroing a few hundred KB per call
// was 3-4% of the eval forward) left as it is, or all-NaN under CONVMIXER_KERNELS_POISON_OUTPUTS=1
// so that a read before a write fails the tests.
enum class Init { kZero, kUninit };
template <typename E>
class Buf {
 public:
  explicit Buf(int64_t n, Init init = Init::kZero) {
    const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(E);
    raw_ = init == Init::kZero ? std::calloc(bytes + 128, 1) : std::malloc(bytes + 128);
    TORCH_CHECK(raw_ != nullptr, "convmixer_kernels: out of memory allocating CPU scratch");
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t(63);  // cache-line aligned
    p_ = reinterpret_cast<E*>(a);
    if (init == Init::kUninit && poison_outputs()) std::memset(p_, 0xFF, bytes);  // (common.h)  // NaN in float and double
  }
  ~Buf() { std::free(raw_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  E* get() const { return p_; }

 private:
  void* raw_;
  E* p_;
};

template <typename A>
inline void zero(A* p, int64_t n) {
  if (n > 0) std::memset(p, 0, static_cast<size_t>(n) * sizeof(A));
}

// ---------------------------------------------------------------- conversions
// Inline vector loops rather than memcpy: most copies here are one pixel (one vector) long.

// dst[0, n) = A(src[0, n))
template <typename T, typename A>
inline void to_acc(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    using Vec = Vectorized<A>;
    constexpr int64_t V = Vec::size();
    int64_t i = 0;
    for (; i + V <= n; i += V) Vec::loadu(src + i).store(dst + i);
    if (i < n) Vec::loadu(src + i, n - i).store(dst + i, n - i);
  } else {
    using VT = Vectorized<T>;
    constexpr int64_t L = VT::size();
    constexpr int64_t HL = Vectorized<float>::size();
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      auto [a, b] = at::vec::convert_to_float<T>(VT::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + HL);
    }
    if (i < n) {  // the tail with masked loads and stores (also a whole short row)
      const int64_t m = n - i;
      auto [a, b] = at::vec::convert_to_float<T>(VT::loadu(src + i, m));
      a.store(dst + i, imin(m, HL));
      if (m > HL) b.store(dst + i + HL, m - HL);
    }
  }
}

// v rounded to the storage type T and back (the rounding of pre).
template <typename T, typename A>
inline Vectorized<A> round_vec(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<T, A>) {
    return v;
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
    (void)b;
    return a;
  }
}

// V elements of T at p as A, zero past cnt (cnt may be <= 0).
template <typename T, typename A>
inline Vectorized<A> load_vec(const T* p, int64_t cnt) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  if (cnt <= 0) return Vec(A(0));
  if constexpr (std::is_same_v<T, A>) {
    return cnt >= V ? Vec::loadu(p) : Vec::loadu(p, cnt);
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, imin(cnt, V)));
    (void)b;
    return a;
  }
}

// The first cnt lanes of v to p as T (nothing if cnt <= 0).
template <typename T, typename A>
inline void store_vec(const Vectorized<A>& v, T* p, int64_t cnt) {
  constexpr int64_t V = Vectorized<A>::size();
  if (cnt <= 0) return;
  if constexpr (std::is_same_v<T, A>) {
    if (cnt >= V)
      v.store(p);
    else
      v.store(p, cnt);
  } else {
    at::vec::convert_from_float<T>(v, Vectorized<A>(A(0))).store(p, imin(cnt, V));
  }
}

// Lanes past cnt set to zero.
template <typename A>
inline Vectorized<A> mask_vec(const Vectorized<A>& v, int64_t cnt) {
  constexpr int64_t V = Vectorized<A>::size();
  return cnt >= V ? v : Vectorized<A>::set(Vectorized<A>(A(0)), v, imax(cnt, 0));
}

// Lanes of v summed in lane order (deterministic), in double.
template <typename A>
inline double hsum(const Vectorized<A>& v) {
  constexpr int64_t V = Vectorized<A>::size();
  alignas(64) A lanes[V];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += static_cast<double>(lanes[i]);
  return s;
}

// ---------------------------------------------------------------- activations
#include "cpu/act_vec.h"  // vexp, verf, vtanh, act_fwd<ACT>, act_grad<ACT>, with_act (shared with pw_impl.h)

// ---------------------------------------------------------------- geometry

// Vector registers of the target: AVX-512 has 32, AVX2 (and what DEFAULT compiles to) 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif
// NCHW output rows computed together: each loaded input vector serves this many rows.
constexpr int64_t kMaxRows = kVecRegs >= 32 ? 8 : 4;

#if defined(__GNUC__)
#define CMK_NOINLINE __attribute__((noinline))
#else
#define CMK_NOINLINE
#endif

template <typename A>
struct Geom {
  static constexpr int64_t V = Vectorized<A>::size();
  int64_t N, C, H, W, k, p;
  bool cl;
  int64_t CB;      // channels per item: CL a multiple of V; NCHW 1
  int64_t nv;      // vectors of channels per item (CL planes): CB / V; NCHW 1
  int64_t ncg;     // channel groups (items along C): CL ceil(C / CB); NCHW C
  int64_t Cpad;    // ncg * CB
  int64_t Wr;      // NCHW: outputs per row rounded up to V; CL: W
  int64_t Wp;      // staged row length: NCHW Wr + k - 1 values; CL W + k - 1 pixels
  int64_t lane;    // staged elements per pixel: CL V, NCHW 1
  int64_t row_el;  // staged elements per row of one plane: Wp * lane
  int64_t S;       // rows of the staging ring
  int64_t out_el;  // elements per output row buffer (NCHW Wr, CL W * CB)
  int64_t npix;    // "pixels" per output row for the row helpers (NCHW Wr / V, CL W)
  int64_t plen;    // lanes of such a pixel (NCHW V, CL CB)
  int64_t Gn;      // batch groups of the reduction items
  int64_t RC;      // row chunks of the reduction items
  int64_t G;       // Gn * RC: the (batch group, row chunk) part of a reduction item

  // rings: staging rings an item keeps (dw_bwd: x and dpre).
  explicit Geom(const DwParams& P, int rings = 1)
      : N(P.N), C(P.C), H(P.H), W(P.W), k(P.k), p(P.k / 2), cl(P.channels_last) {
    if (cl) {
      // An item owns CB channels (a multiple of V): as many as keep its staging ring(s)
      // within about 384 KB (L2), split evenly; often all of C, so x is read in whole
      // pixels, sequentially (runs of a few hundred bytes C apart defeat the prefetchers).
      // Staged rows keep each vector of channels in its own plane (pixels x V lanes), so
      // the k rows a conv row reads are contiguous: one cache line per pixel at most
      // (wide interleaved pixels would map the rows onto a fraction of L1's sets).
      const int64_t ring_bytes_per_channel = k * (W + k - 1) * int64_t(sizeof(A));
      const int64_t cap = imax(V, (int64_t(384 << 10) / rings / imax(1, ring_bytes_per_channel)) / V * V);
      const int64_t groups = div_up(imax(C, 1), cap);
      CB = round_up(div_up(imax(C, 1), groups), V);
      nv = CB / V;
      ncg = div_up(C, CB);
      Cpad = ncg * CB;
      Wr = W;
      Wp = W + k - 1;
      lane = V;
      out_el = W * CB;
      npix = W;
      plen = CB;
      S = k;
    } else {
      CB = 1;
      nv = 1;
      ncg = C;
      Cpad = C;
      Wr = round_up(W, V);
      Wp = Wr + k - 1;
      lane = 1;
      out_el = Wr;
      npix = Wr / V;
      plen = V;
      S = k + kMaxRows - 1;
    }
    row_el = Wp * lane;
    // Reduction items: enough to keep the threads busy, few enough that partial results
    // stay small and halo rows (staged twice) rare.  Shapes only, never the thread count.
    // Reduction items are (channel group, batch group, row chunk); dw_fwd's are (image,
    // channel group, row chunk), see fwd_row_chunks.
    Gn = imax(1, imin(N, div_up(64, ncg)));
    RC = imax(1, imin(div_up(16, ncg * Gn), H / min_rows()));
    G = Gn * RC;
  }
  int64_t min_rows() const { return imax(k, 4); }
  int64_t ring_el() const { return nv * S * row_el; }
  // Images and rows of the reduction part gb (< G).
  int64_t n_begin(int64_t gb) const { return (gb / RC) * N / Gn; }
  int64_t n_end(int64_t gb) const { return (gb / RC + 1) * N / Gn; }
  int64_t h_begin(int64_t gb) const { return (gb % RC) * H / RC; }
  int64_t h_end(int64_t gb) const { return (gb % RC + 1) * H / RC; }
  // Rows computed together: NCHW up to kMaxRows, CL one.
  int64_t step_rows(int64_t left) const {
    if (cl) return 1;
    for (int64_t r = kMaxRows; r > 1; r /= 2)
      if (left >= r) return r;
    return 1;
  }
};

// Offset of (n, c0, h, 0) in an activation tensor.
template <typename A>
inline int64_t act_offset(const Geom<A>& g, int64_t n, int64_t c0, int64_t h) {
  return g.cl ? ((n * g.H + h) * g.W) * g.C + c0 : ((n * g.C + c0) * g.H + h) * g.W;
}

// Asks for the cache lines of n elements at p (a hint; no-op where unsupported).
template <typename T>
inline void prefetch_run(const T* p, int64_t n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, 3);
#else
  (void)p;
  (void)n;
#endif
}

// ---------------------------------------------------------------- staging ring
// Image rows pass through a ring of S staged rows, each converted to A once and zero padded
// (p zeros left, zeros right, zero rows above and below the image): the convolution then
// needs no boundary tests or conversions.  Image row y lives in slot (y - origin) mod S;
// CL rows are planes of V channels: plane vb of a slot is at vb * S * row_el.

template <typename A>
struct Ring {
  A* base;
  int64_t S, row_el, origin;
  // stream_rows keeps every row it asks for within 2S rows of origin (it advances origin by S as the
  // window moves): one compare instead of an integer division per row (idiv was 3% of the NCHW eval
  // forward's samples, 16 of them per 8 output rows).
  A* slot(int64_t y) const {
    int64_t d = y - origin;
    if (d >= 2 * S)
      d %= S;
    else if (d >= S)
      d -= S;
    return base + d * row_el;
  }
};

// Stages image row y (any y; rows outside the image are zero) of the image at `img`
// (NCHW: the plane of channel c0; CL: (n, 0, 0, c0), cb_len channels) into slot `dst`.
template <typename T, typename A>
void stage_row(A* dst, const T* img, int64_t y, int64_t cb_len, const Geom<A>& g) {
  constexpr int64_t V = Geom<A>::V;
  if (!g.cl) {
    if (y < 0 || y >= g.H) {
      zero(dst, g.Wp);
      return;
    }
    zero(dst, g.p);
    to_acc(img + y * g.W, dst + g.p, g.W);
    zero(dst + g.p + g.W, g.Wp - g.p - g.W);
    return;
  }
  const int64_t ps = g.S * g.row_el;  // plane stride
  if (y < 0 || y >= g.H) {
    for (int64_t vb = 0; vb < g.nv; ++vb) zero(dst + vb * ps, g.row_el);
    return;
  }
  for (int64_t vb = 0; vb < g.nv; ++vb) {
    zero(dst + vb * ps, g.p * V);
    zero(dst + vb * ps + (g.p + g.W) * V, (g.Wp - g.p - g.W) * V);
  }
  const T* src = img + y * g.W * g.C;
  A* d = dst + g.p * V;
  // The next row's runs of this channel group when it is not all of C: runs C apart are
  // too few per page for the hardware prefetchers.
  const bool ahead = y + 1 < g.H && g.CB < g.C;
  for (int64_t w = 0; w < g.W; ++w) {
    if (ahead) prefetch_run(src + (g.W + w) * g.C, cb_len);
    for (int64_t vb = 0; vb < g.nv; ++vb)
      load_vec<T, A>(src + w * g.C + vb * V, cb_len - vb * V).store(d + vb * ps + w * V);
  }
}

// ---------------------------------------------------------------- convolution

// NCHW: R output rows x B vectors at column w.  Input row ii (rows[ii], ii < R + k - 1)
// feeds output row rr through weight row ii - rr, so each loaded vector serves up to R
// rows (fewer loads per FMA; the loads are unaligned and often split cache lines).  K > 0
// makes k a template constant: the ii loop unrolls and the tests on ii - rr disappear.
template <int R, int B, int K, typename A>
inline void conv_block_nchw(const A* const* rows, int64_t w, const A* wt, int64_t k_rt, A* out, int64_t ldo) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const int64_t k = K > 0 ? K : k_rt;
  Vec acc[R][B];
  for (int rr = 0; rr < R; ++rr)
    for (int b = 0; b < B; ++b) acc[rr][b] = Vec(A(0));
  if constexpr (K > 0) {
#pragma GCC unroll 64
    for (int ii = 0; ii < R + K - 1; ++ii) {
      const A* row = rows[ii] + w;
      for (int64_t j = 0; j < K; ++j) {
        Vec xv[B];
        for (int b = 0; b < B; ++b) xv[b] = Vec::loadu(row + j + b * V);
#pragma GCC unroll 16
        for (int rr = 0; rr < R; ++rr) {
          if (ii - rr < 0 || ii - rr >= K) continue;  // resolved at compile time
          const Vec wv(wt[(ii - rr) * K + j]);
          for (int b = 0; b < B; ++b) acc[rr][b] = at::vec::fmadd(wv, xv[b], acc[rr][b]);
        }
      }
    }
  } else {
    for (int64_t ii = 0; ii < R + k - 1; ++ii) {
      const A* row = rows[ii] + w;
      if (ii >= R - 1 && ii <= k - 1) {  // every output row takes this input row
        for (int64_t j = 0; j < k; ++j) {
          Vec xv[B];
          for (int b = 0; b < B; ++b) xv[b] = Vec::loadu(row + j + b * V);
          for (int rr = 0; rr < R; ++rr) {
            const Vec wv(wt[(ii - rr) * k + j]);
            for (int b = 0; b < B; ++b) acc[rr][b] = at::vec::fmadd(wv, xv[b], acc[rr][b]);
          }
        }
      } else {  // the first and last R - 1 input rows feed only some output rows
        for (int64_t j = 0; j < k; ++j) {
          Vec xv[B];
          for (int b = 0; b < B; ++b) xv[b] = Vec::loadu(row + j + b * V);
          for (int rr = 0; rr < R; ++rr) {
            if (ii - rr < 0 || ii - rr >= k) continue;
            const Vec wv(wt[(ii - rr) * k + j]);
            for (int b = 0; b < B; ++b) acc[rr][b] = at::vec::fmadd(wv, xv[b], acc[rr][b]);
          }
        }
      }
    }
  }
  for (int rr = 0; rr < R; ++rr)
    for (int b = 0; b < B; ++b) acc[rr][b].store(out + rr * ldo + b * V);
}

// NCHW: R output rows of n (a multiple of V) values each.
template <int R, int K, typename A>
inline void conv_rows_nchw(const A* const* rows, const A* wt, int64_t k, int64_t n, A* out, int64_t ldo) {
  constexpr int64_t V = Vectorized<A>::size();
  constexpr int BM = R <= 2 ? 4 : 2;  // R * BM accumulators (<= 16)
  int64_t w = 0;
  for (; w + BM * V <= n; w += BM * V) conv_block_nchw<R, BM, K>(rows, w, wt, k, out + w, ldo);
  if (BM > 2 && w + 2 * V <= n) {
    conv_block_nchw<R, 2, 0>(rows, w, wt, k, out + w, ldo);
    w += 2 * V;
  }
  if (w < n) conv_block_nchw<R, 1, 0>(rows, w, wt, k, out + w, ldo);
}

// Channels_last: P output pixels of one plane.  rows[i] + off: input row i at the first
// pixel (pixel stride V); wt: transposed weights at (tap 0, first channel), tap stride Cpad;
// out: pixel stride ops.
template <int P, typename A>
inline void conv_px_cl(const A* const* rows, int64_t off, const A* wt, int64_t Cpad, int64_t k, A* out,
                       int64_t ops) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec acc[P];
  for (int q = 0; q < P; ++q) acc[q] = Vec(A(0));
  for (int64_t i = 0; i < k; ++i) {
    const A* row = rows[i] + off;
    const A* wr = wt + i * k * Cpad;
    for (int64_t j = 0; j < k; ++j) {
      const Vec wv = Vec::loadu(wr + j * Cpad);
      const A* xj = row + j * V;
      for (int q = 0; q < P; ++q) acc[q] = at::vec::fmadd(wv, Vec::loadu(xj + q * V), acc[q]);
    }
  }
  for (int q = 0; q < P; ++q) acc[q].store(out + q * ops);
}

// Channels_last, k a template constant: the k weight vectors of a row stay in registers and
// each input pixel is loaded once for the P outputs it feeds ("input stationary"): about
// (P + 2k - 1) loads per P*k FMAs instead of (P + 1) per P.
template <int K, int P, typename A>
inline void conv_px_cl_k(const A* const* rows, int64_t off, const A* wt, int64_t Cpad, A* out, int64_t ops) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec acc[P];
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) acc[q] = Vec(A(0));
  for (int i = 0; i < K; ++i) {
    const A* row = rows[i] + off;
    Vec w[K];
#pragma GCC unroll 16
    for (int j = 0; j < K; ++j) w[j] = Vec::loadu(wt + (i * K + j) * Cpad);
#pragma GCC unroll 32
    for (int m = 0; m < P + K - 1; ++m) {
      const Vec xv = Vec::loadu(row + m * V);
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q)
        if (m - q >= 0 && m - q < K) acc[q] = at::vec::fmadd(w[m - q], xv, acc[q]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) acc[q].store(out + q * ops);
}

// Pixels per block of conv_px_cl_k: as many accumulators as the registers allow.
template <int K>
constexpr int cl_block() {
  return kVecRegs - K - 2 >= 8 ? 8 : kVecRegs - K - 2;
}

// Returns the pixels done (a multiple of the block) with the k-specialised kernel.
template <int K, typename A>
inline int64_t conv_row_cl_k(const A* const* rows, int64_t off, const A* wv, int64_t Cpad, int64_t W, A* o,
                             int64_t CB) {
  constexpr int64_t V = Vectorized<A>::size();
  constexpr int P = cl_block<K>();
  int64_t w = 0;
  for (; w + P <= W; w += P) conv_px_cl_k<K, P>(rows, off + w * V, wv, Cpad, o + w * CB, CB);
  return w;
}

// Channels_last: one output row, W pixels x CB lanes, into out (pixel stride CB).
template <typename A>
inline void conv_row_cl(const A* const* rows, const A* wt, const Geom<A>& g, A* out) {
  constexpr int64_t V = Geom<A>::V;
  const int64_t W = g.W, CB = g.CB, ps = g.S * g.row_el;
  for (int64_t vb = 0; vb < g.nv; ++vb) {
    const A* wv = wt + vb * V;
    A* o = out + vb * V;
    const int64_t off = vb * ps;
    int64_t w = 0;
    switch (g.k) {
      case 3: w = conv_row_cl_k<3>(rows, off, wv, g.Cpad, W, o, CB); break;
      case 5: w = conv_row_cl_k<5>(rows, off, wv, g.Cpad, W, o, CB); break;
      case 7: w = conv_row_cl_k<7>(rows, off, wv, g.Cpad, W, o, CB); break;
      case 9: w = conv_row_cl_k<9>(rows, off, wv, g.Cpad, W, o, CB); break;
      default: break;
    }
    for (; w + 8 <= W; w += 8) conv_px_cl<8>(rows, off + w * V, wv, g.Cpad, g.k, o + w * CB, CB);
    if (W - w >= 4) {
      conv_px_cl<4>(rows, off + w * V, wv, g.Cpad, g.k, o + w * CB, CB);
      w += 4;
    }
    if (W - w >= 2) {
      conv_px_cl<2>(rows, off + w * V, wv, g.Cpad, g.k, o + w * CB, CB);
      w += 2;
    }
    if (W - w >= 1) conv_px_cl<1>(rows, off + w * V, wv, g.Cpad, g.k, o + w * CB, CB);
  }
}

// nr output rows (g.step_rows) whose k + nr - 1 input rows are rows[0 ..], into out (row
// stride out_el).
template <typename A>
CMK_NOINLINE void conv_rows(const A* const* rows, int64_t nr, const A* wt, const Geom<A>& g, A* out) {
  if (g.cl)
    conv_row_cl(rows, wt, g, out);
  else if (nr == kMaxRows) {  // the bulk: k specialised for the common sizes
    constexpr int R = int(kMaxRows);
    switch (g.k) {
      case 3: conv_rows_nchw<R, 3>(rows, wt, g.k, g.Wr, out, g.out_el); break;
      case 5: conv_rows_nchw<R, 5>(rows, wt, g.k, g.Wr, out, g.out_el); break;
      case 7: conv_rows_nchw<R, 7>(rows, wt, g.k, g.Wr, out, g.out_el); break;
      case 9: conv_rows_nchw<R, 9>(rows, wt, g.k, g.Wr, out, g.out_el); break;
      default: conv_rows_nchw<R, 0>(rows, wt, g.k, g.Wr, out, g.out_el); break;
    }
  } else if (nr >= 4)
    conv_rows_nchw<4, 0>(rows, wt, g.k, g.Wr, out, g.out_el);
  else if (nr >= 2)
    conv_rows_nchw<2, 0>(rows, wt, g.k, g.Wr, out, g.out_el);
  else
    conv_rows_nchw<1, 0>(rows, wt, g.k, g.Wr, out, g.out_el);
}

// Walks output rows [h0, h1) of one image in steps of g.step_rows, keeping the ring(s)
// staged: before body(r, nr, rows) every input row r - p .. r + nr - 1 + p is in the ring;
// rows[ii] is image row r - p + ii.  stage(y) stages row y (into every ring the caller has).
template <typename A, typename Stage, typename Body>
inline void stream_rows(const Geom<A>& g, Ring<A>& ring, int64_t h0, int64_t h1, Stage&& stage, Body&& body) {
  const A* rows[kMaxK + kMaxRows];
  ring.origin = h0 - g.p;
  int64_t next = h0 - g.p;
  for (int64_t r = h0; r < h1;) {
    const int64_t nr = g.step_rows(h1 - r);
    if (r - g.p - ring.origin >= g.S) ring.origin += g.S;  // same slots, smaller offsets (see Ring::slot)
    for (; next <= r + nr - 1 + g.p; ++next) stage(next);
    for (int64_t ii = 0; ii < nr + g.k - 1; ++ii) rows[ii] = ring.slot(r - g.p + ii);
    body(r, nr, static_cast<const A* const*>(rows));
    r += nr;
  }
}

// ---------------------------------------------------------------- row addressing
// A row of one item is nq x nv vectors: NCHW nq = Wr / V vectors along W (nv = 1); CL
// nq = W pixels x nv vectors of channels.  For vector (q, vb):

template <typename A>
struct RowMap {
  static constexpr int64_t V = Geom<A>::V;
  const Geom<A>& g;
  int64_t cb_len;
  int64_t nq() const { return g.cl ? g.W : g.Wr / V; }
  // offset in an activation tensor row (from act_offset(n, c0, h)) and lanes that exist
  int64_t t_off(int64_t q, int64_t vb) const { return g.cl ? q * g.C + vb * V : q * V; }
  int64_t cnt(int64_t q, int64_t vb) const { return g.cl ? cb_len - vb * V : g.W - q * V; }
  // offset in an output row buffer (pixel-major, plen lanes a pixel)
  int64_t b_off(int64_t q, int64_t vb) const { return q * g.plen + vb * V; }
  // offset of the output position in a staged ring row (past the left padding)
  int64_t r_off(int64_t q, int64_t vb) const {
    return g.cl ? vb * g.S * g.row_el + (g.p + q) * V : g.p + q * V;
  }
};

// ---------------------------------------------------------------- per-vector epilogues

// y (before the residual) = sc * act(pre) + sh  if act_first  else  act(sc * pre + sh)
template <int ACT, typename A>
inline Vectorized<A> fwd_vec(const Vectorized<A>& pre, const Vectorized<A>& s, const Vectorized<A>& b,
                             bool act_first) {
  return act_first ? at::vec::fmadd(s, act_fwd<ACT>(pre), b) : act_fwd<ACT>(at::vec::fmadd(s, pre, b));
}

// g (the gradient at the BN output) and u (the BN input).
template <int ACT, typename A>
inline void g_u_vec(const Vectorized<A>& dy, const Vectorized<A>& pre, const Vectorized<A>& s,
                    const Vectorized<A>& b, bool act_first, Vectorized<A>& g, Vectorized<A>& u) {
  if (act_first) {
    g = dy;
    u = act_fwd<ACT>(pre);
  } else {
    g = ACT == 0 ? dy : dy * act_grad<ACT>(at::vec::fmadd(s, pre, b));
    u = pre;
  }
}

// dpre = ca*g + cb*(u - mean) + cd, times act'(pre) if act_first.
template <int ACT, typename A>
inline Vectorized<A> dpre_vec(const Vectorized<A>& dy, const Vectorized<A>& pre, const Vectorized<A>& s,
                              const Vectorized<A>& b, const Vectorized<A>& m, const Vectorized<A>& a1,
                              const Vectorized<A>& b1, const Vectorized<A>& c1, bool act_first) {
  Vectorized<A> g, u;
  g_u_vec<ACT>(dy, pre, s, b, act_first, g, u);
  Vectorized<A> d = at::vec::fmadd(a1, g, at::vec::fmadd(b1, u - m, c1));
  if constexpr (ACT != 0)
    if (act_first) d = d * act_grad<ACT>(pre);
  return d;
}

// Merge (nb, mb, m2b) into (na, ma, m2a): Chan et al.'s parallel-variance update.
inline void chan_merge(double& na, double& ma, double& m2a, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double n = na + nb;
  const double delta = mb - ma;
  ma += delta * (nb / n);
  m2a += m2b + delta * delta * (na * nb / n);
  na = n;
}

// ---------------------------------------------------------------- parameters, rows

// Per-channel parameter arrays of Cpad values (zero for padding channels).
template <typename A>
struct ChanParams {
  const Geom<A>& g;
  Buf<A> store;
  int n;
  ChanParams(const Geom<A>& g_, std::initializer_list<const void*> src)
      : g(g_), store(int64_t(src.size()) * g_.Cpad), n(int(src.size())) {
    int i = 0;
    for (const void* s : src) {
      A* dst = store.get() + i * g.Cpad;
      if (s != nullptr) std::memcpy(dst, s, static_cast<size_t>(g.C) * sizeof(A));
      ++i;
    }
  }
  const A* at(int i) const { return store.get() + i * g.Cpad; }
};

// The parameters of one item as arrays of plen lanes: CL points into the padded arrays at
// c0; NCHW repeats channel c0's value V times.
template <typename A>
struct LaneParams {
  static constexpr int64_t V = Vectorized<A>::size();
  alignas(64) A bc[8][V];
  const A* ptr[8];
  void set(const ChanParams<A>& cp, int64_t c0) {
    for (int i = 0; i < cp.n; ++i) {
      if (cp.g.cl) {
        ptr[i] = cp.at(i) + c0;
      } else {
        for (int64_t v = 0; v < V; ++v) bc[i][v] = cp.at(i)[c0];
        ptr[i] = bc[i];
      }
    }
  }
  const A* operator[](int i) const { return ptr[i]; }
};

// Weights laid out for the kernels: CL (k*k, Cpad) transposed, NCHW (C, k*k) as given;
// `flip` reverses the taps (the kernel of dx = conv_transpose(dpre, weight)).
template <typename A>
struct Weights {
  const Geom<A>& g;
  Buf<A> store;
  Weights(const Geom<A>& g_, const A* w, bool flip) : g(g_), store(g_.k * g_.k * g_.Cpad) {
    const int64_t kk = g.k * g.k;
    A* dst = store.get();
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t t = 0; t < kk; ++t) {
        const A val = w[c * kk + (flip ? kk - 1 - t : t)];
        if (g.cl)
          dst[t * g.Cpad + c] = val;
        else
          dst[c * kk + t] = val;
      }
  }
  // Weights of channel group cg (CL: the c0 column of the transposed array).
  const A* group(int64_t cg) const { return g.cl ? store.get() + cg * g.CB : store.get() + cg * g.k * g.k; }
};

// ---------------------------------------------------------------- dw_fwd

// Row chunks per image of the dw_fwd items: the fewest (each chunk stages k - 1 halo rows again)
// that give every thread the same number of items, or at least 4 each.  dw_fwd has no reduction,
// so unlike the reductions' split this one may depend on the thread count.
template <typename A>
int64_t fwd_row_chunks(const Geom<A>& g) {
  const int64_t threads = imax(1, at::get_num_threads()), per = imax(1, g.N * g.ncg);
  int64_t nch = 1;
  while (nch < g.H / g.min_rows() && (per * nch) % threads != 0 && per * nch < 4 * threads) ++nch;
  return nch;
}

template <typename T>
void fwd_t(const DwParams& P) {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Geom<A> g(P);
  if (g.N * g.C * g.H * g.W == 0) return;
  const T* x = static_cast<const T*>(P.x);
  T* y = static_cast<T*>(P.y);
  const Weights<A> wts(g, static_cast<const A*>(P.weight), false);
  const ChanParams<A> cp(g, {P.bias, P.scale, P.shift});
  // Item (n, cg, ch): image n, channel group cg, row chunk ch.
  const int64_t nch = fwd_row_chunks(g);
  const int64_t nitems = g.N * g.ncg * nch;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> ring_buf(g.ring_el(), Init::kUninit), crow(kMaxRows * g.out_el, Init::kUninit);
    Ring<A> ring{ring_buf.get(), g.S, g.row_el, 0};
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t ch = it % nch;
      const int64_t cg = (it / nch) % g.ncg;
      const int64_t n = it / (nch * g.ncg);
      const int64_t c0 = cg * g.CB;
      const RowMap<A> rm{g, imin(g.CB, g.C - c0)};
      lp.set(cp, c0);
      const T* img = x + act_offset(g, n, c0, 0);
      const A* wt = wts.group(cg);
      with_act(P.act, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        stream_rows(
            g, ring, ch * g.H / nch, (ch + 1) * g.H / nch,
            [&](int64_t yy) { stage_row(ring.slot(yy), img, yy, rm.cb_len, g); },
            [&](int64_t r, int64_t nr, const A* const* rows) {
              conv_rows(rows, nr, wt, g, crow.get());
              for (int64_t rr = 0; rr < nr; ++rr) {
                const A* cr = crow.get() + rr * g.out_el;
                const A* xr = rows[rr + g.p];  // staged image row r + rr
                T* yr = y + act_offset(g, n, c0, r + rr);
                // pixel by pixel (CL: its nv vectors of channels), so y is written in address order
                const bool act_first = P.act_first, residual = P.residual;
                for (int64_t q = 0; q < rm.nq(); ++q) {
                  for (int64_t vb = 0; vb < g.nv; ++vb) {
                    const Vec pre = round_vec<T>(Vec::loadu(cr + rm.b_off(q, vb)) + Vec::loadu(lp[0] + vb * V));
                    Vec o = fwd_vec<ACT>(pre, Vec::loadu(lp[1] + vb * V), Vec::loadu(lp[2] + vb * V), act_first);
                    if (residual) o = o + Vec::loadu(xr + rm.r_off(q, vb));
                    store_vec(o, yr + rm.t_off(q, vb), rm.cnt(q, vb));
                  }
                }
              }
            });
      });
    }
  });
}

// ---------------------------------------------------------------- dw_conv_stats

template <typename T>
void conv_stats_t(const DwParams& P) {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Geom<A> g(P);
  A* out_mean = static_cast<A*>(P.out_mean);
  A* out_var = static_cast<A*>(P.out_var);
  if (g.C == 0) return;
  if (g.N * g.H * g.W == 0) {  // the mean of nothing, as torch computes it
    for (int64_t c = 0; c < g.C; ++c) out_mean[c] = out_var[c] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const T* x = static_cast<const T*>(P.x);
  T* pre = static_cast<T*>(P.pre_out);
  const Weights<A> wts(g, static_cast<const A*>(P.weight), false);
  const ChanParams<A> cp(g, {P.bias});
  // Item (cg, gb): channel group cg over images [n_begin(gb), n_end(gb)), rows [h_begin(gb), h_end(gb)).
  Buf<double> part_mean(g.G * g.Cpad), part_m2(g.G * g.Cpad);
  const int64_t nitems = g.ncg * g.G;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> ring_buf(g.ring_el(), Init::kUninit), crow(kMaxRows * g.out_el, Init::kUninit);
    Buf<double> mean(g.CB), m2(g.CB);
    Ring<A> ring{ring_buf.get(), g.S, g.row_el, 0};
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cg = it / g.G, gb = it % g.G;
      const int64_t c0 = cg * g.CB;
      const RowMap<A> rm{g, imin(g.CB, g.C - c0)};
      lp.set(cp, c0);
      const A* wt = wts.group(cg);
      double n_acc = 0;  // elements merged so far, per channel
      zero(mean.get(), g.CB);
      zero(m2.get(), g.CB);
      with_act(P.act, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        for (int64_t n = g.n_begin(gb); n < g.n_end(gb); ++n) {
          const T* img = x + act_offset(g, n, c0, 0);
          stream_rows(
              g, ring, g.h_begin(gb), g.h_end(gb),
              [&](int64_t yy) { stage_row(ring.slot(yy), img, yy, rm.cb_len, g); },
              [&](int64_t r, int64_t nr, const A* const* rows) {
                conv_rows(rows, nr, wt, g, crow.get());
                // Moments of the nr rows just computed (two passes), merged into the item's.
                for (int64_t vb = 0; vb < g.nv; ++vb) {
                  // pass 1: pre (stored), u = act(pre) or pre (kept in crow), sums
                  const Vec bias = Vec::loadu(lp[0] + vb * V);
                  Vec s(A(0));
                  for (int64_t rr = 0; rr < nr; ++rr) {
                    A* cr = crow.get() + rr * g.out_el;
                    T* pr = pre + act_offset(g, n, c0, r + rr);
                    for (int64_t q = 0; q < rm.nq(); ++q) {
                      const int64_t cnt = rm.cnt(q, vb);
                      const Vec pv = round_vec<T>(Vec::loadu(cr + rm.b_off(q, vb)) + bias);
                      store_vec(pv, pr + rm.t_off(q, vb), cnt);
                      const Vec u = mask_vec(P.act_first ? act_fwd<ACT>(pv) : pv, cnt);
                      u.store(cr + rm.b_off(q, vb));
                      s = s + u;
                    }
                  }
                  // pass 2: squared deviations from the mean of these rows
                  const A cnt_rows = A(nr * g.W);
                  const Vec mr = g.cl ? s / Vec(cnt_rows) : Vec(A(hsum(s)) / cnt_rows);
                  Vec s2(A(0));
                  for (int64_t rr = 0; rr < nr; ++rr) {
                    const A* cr = crow.get() + rr * g.out_el;
                    for (int64_t q = 0; q < rm.nq(); ++q) {
                      const Vec dlt = mask_vec(Vec::loadu(cr + rm.b_off(q, vb)) - mr, rm.cnt(q, vb));
                      s2 = at::vec::fmadd(dlt, dlt, s2);
                    }
                  }
                  alignas(64) A lm[V], l2[V];
                  mr.store(lm);
                  s2.store(l2);
                  if (g.cl) {
                    for (int64_t l = 0; l < imin(V, rm.cb_len - vb * V); ++l) {
                      double na = n_acc;
                      chan_merge(na, mean.get()[vb * V + l], m2.get()[vb * V + l], double(cnt_rows), lm[l],
                                 l2[l]);
                    }
                  } else {
                    double na = n_acc;
                    chan_merge(na, mean.get()[0], m2.get()[0], double(cnt_rows), double(lm[0]), hsum(s2));
                  }
                }
                n_acc += double(nr * g.W);
              });
        }
      });
      for (int64_t l = 0; l < rm.cb_len; ++l) {
        part_mean.get()[gb * g.Cpad + c0 + l] = mean.get()[l];
        part_m2.get()[gb * g.Cpad + c0 + l] = m2.get()[l];
      }
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    double na = 0, ma = 0, m2a = 0;
    for (int64_t gb = 0; gb < g.G; ++gb) {
      const double nb = double(g.n_end(gb) - g.n_begin(gb)) * double(g.h_end(gb) - g.h_begin(gb)) * double(g.W);
      chan_merge(na, ma, m2a, nb, part_mean.get()[gb * g.Cpad + c], part_m2.get()[gb * g.Cpad + c]);
    }
    out_mean[c] = A(ma);
    out_var[c] = A(m2a / na);
  }
}

// ---------------------------------------------------------------- dw_bwd_reduce

template <typename T>
void bwd_reduce_t(const DwParams& P) {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Geom<A> g(P);
  A* sum_g = static_cast<A*>(P.sum_g);
  A* sum_gx = static_cast<A*>(P.sum_gxhat);
  const A* invstd = static_cast<const A*>(P.invstd);
  if (g.C == 0) return;
  const T* dy = static_cast<const T*>(P.dy);
  const T* pre = static_cast<const T*>(P.pre);
  const ChanParams<A> cp(g, {P.scale, P.shift, P.mean});
  // Same items as conv_stats; row sums in A, merged in double.
  Buf<double> part_g(g.G * g.Cpad), part_gx(g.G * g.Cpad);
  const int64_t nitems = g.ncg * g.G;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<double> acc_g(g.CB), acc_gx(g.CB);
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cg = it / g.G, gb = it % g.G;
      const int64_t c0 = cg * g.CB;
      const RowMap<A> rm{g, imin(g.CB, g.C - c0)};
      lp.set(cp, c0);
      zero(acc_g.get(), g.CB);
      zero(acc_gx.get(), g.CB);
      with_act(P.act, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        for (int64_t n = g.n_begin(gb); n < g.n_end(gb); ++n)
          for (int64_t h = g.h_begin(gb); h < g.h_end(gb); ++h) {
            const int64_t off = act_offset(g, n, c0, h);
            for (int64_t vb = 0; vb < g.nv; ++vb) {
              const Vec s = Vec::loadu(lp[0] + vb * V), b = Vec::loadu(lp[1] + vb * V),
                        m = Vec::loadu(lp[2] + vb * V);
              Vec ag(A(0)), agx(A(0));
              for (int64_t q = 0; q < rm.nq(); ++q) {
                const int64_t to = off + rm.t_off(q, vb), cnt = rm.cnt(q, vb);
                Vec gv, u;
                g_u_vec<ACT>(load_vec<T, A>(dy + to, cnt), load_vec<T, A>(pre + to, cnt), s, b, P.act_first, gv,
                             u);
                ag = ag + mask_vec(gv, cnt);
                agx = agx + mask_vec(gv * (u - m), cnt);
              }
              if (g.cl) {
                alignas(64) A l1[V], l2[V];
                ag.store(l1);
                agx.store(l2);
                for (int64_t l = 0; l < imin(V, rm.cb_len - vb * V); ++l) {
                  acc_g.get()[vb * V + l] += double(l1[l]);
                  acc_gx.get()[vb * V + l] += double(l2[l]);
                }
              } else {
                acc_g.get()[0] += hsum(ag);
                acc_gx.get()[0] += hsum(agx);
              }
            }
          }
      });
      for (int64_t l = 0; l < rm.cb_len; ++l) {
        part_g.get()[gb * g.Cpad + c0 + l] = acc_g.get()[l];
        part_gx.get()[gb * g.Cpad + c0 + l] = acc_gx.get()[l];
      }
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    double a = 0, b = 0;
    for (int64_t gb = 0; gb < g.G; ++gb) {
      a += part_g.get()[gb * g.Cpad + c];
      b += part_gx.get()[gb * g.Cpad + c];
    }
    sum_g[c] = A(a);
    sum_gx[c] = A(A(b) * invstd[c]);
  }
}

// ---------------------------------------------------------------- dw_bwd

// acc[q * V ..] += sum over one output row of d * x at J consecutive taps.  d: dpre row at
// its first output; x: input row at tap (i, j); ps: pixel stride (NCHW 1, vectors along W;
// CL V); n: vectors in the row.
template <int J, typename A>
inline void dweight_taps(const A* d, const A* x, int64_t ps, int64_t n, A* acc) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const int64_t step = ps == 1 ? V : ps;
  Vec a[J];
  for (int q = 0; q < J; ++q) a[q] = Vec::loadu(acc + q * V);
  for (int64_t e = 0; e < n * step; e += step) {
    const Vec dv = Vec::loadu(d + e);
    for (int q = 0; q < J; ++q) a[q] = at::vec::fmadd(dv, Vec::loadu(x + e + q * ps), a[q]);
  }
  for (int q = 0; q < J; ++q) a[q].store(acc + q * V);
}

// All k*k taps of one output row (one plane): acc[t * V ..] for tap t; xrows[i] + off is
// input row i of the window at column (pixel) 0.
template <typename A>
CMK_NOINLINE void dweight_row(const A* d, const A* const* xrows, int64_t off, int64_t ps, int64_t n, int64_t k,
                        A* acc) {
  constexpr int64_t V = Vectorized<A>::size();
  for (int64_t i = 0; i < k; ++i) {
    const A* xi = xrows[i] + off;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) dweight_taps<4>(d, xi + j * ps, ps, n, acc + (i * k + j) * V);
    for (; j < k; ++j) dweight_taps<1>(d, xi + j * ps, ps, n, acc + (i * k + j) * V);
  }
}

template <typename T>
void bwd_t(const DwParams& P) {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Geom<A> g(P, /*rings=*/2);
  const int64_t k = g.k, kk = k * k;
  A* dweight = static_cast<A*>(P.dweight);
  A* dbias = static_cast<A*>(P.dbias);
  if (g.C == 0) return;
  if (g.N * g.H * g.W == 0) {
    zero(dweight, g.C * kk);
    zero(dbias, g.C);
    return;
  }
  const T* x = static_cast<const T*>(P.x);
  const T* dy = static_cast<const T*>(P.dy);
  const T* pre = static_cast<const T*>(P.pre);
  T* dx = static_cast<T*>(P.dx);
  const Weights<A> wflip(g, static_cast<const A*>(P.weight), true);
  const ChanParams<A> cp(g, {P.scale, P.shift, P.mean, P.ca, P.cb, P.cd});
  Buf<double> part_w(g.G * g.Cpad * kk), part_b(g.G * g.Cpad);
  const int64_t nitems = g.ncg * g.G;
  const int64_t ps = g.S * g.row_el;  // CL plane stride in a ring
  // Vector partial sums of dweight/dbias are flushed into double every this many rows.
  constexpr int64_t kFlushRows = 64;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> xring_buf(g.ring_el()), dring_buf(g.ring_el()), crow(kMaxRows * g.out_el), wacc(g.nv * kk * V),
        bacc(g.nv * V);
    Buf<double> acc_w(kk * g.CB), acc_b(g.CB);
    Ring<A> xr{xring_buf.get(), g.S, g.row_el, 0};
    // dpre's ring mirrors x's: the same slot of its own buffer for every row.
    auto dslot = [&](int64_t y) { return dring_buf.get() + (xr.slot(y) - xr.base); };
    LaneParams<A> lp;
    int64_t pending = 0;  // rows in wacc/bacc
    auto flush = [&](int64_t cb_len) {
      alignas(64) A lanes[V];
      for (int64_t vb = 0; vb < g.nv; ++vb) {
        const int64_t nl = imin(V, cb_len - vb * V);
        for (int64_t t = 0; t <= kk; ++t) {  // t == kk: dbias
          A* a = t < kk ? wacc.get() + (vb * kk + t) * V : bacc.get() + vb * V;
          double* out = t < kk ? acc_w.get() + t * g.CB : acc_b.get();
          if (g.cl) {
            Vec::loadu(a).store(lanes);
            for (int64_t l = 0; l < nl; ++l) out[vb * V + l] += double(lanes[l]);
          } else {
            out[0] += hsum(Vec::loadu(a));
          }
          Vec(A(0)).store(a);
        }
      }
      pending = 0;
    };
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cg = it / g.G, gb = it % g.G;
      const int64_t c0 = cg * g.CB;
      const RowMap<A> rm{g, imin(g.CB, g.C - c0)};
      lp.set(cp, c0);
      const A* wt = wflip.group(cg);
      zero(acc_w.get(), kk * g.CB);
      zero(acc_b.get(), g.CB);
      zero(wacc.get(), g.nv * kk * V);
      zero(bacc.get(), g.nv * V);
      pending = 0;
      with_act(P.act, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        // dpre of image row yy of image n, zero padded like x, into a slot of the d ring.
        auto stage_d = [&](A* dst, int64_t n, int64_t yy) {
          if (yy < 0 || yy >= g.H) {
            for (int64_t vb = 0; vb < g.nv; ++vb) zero(dst + vb * ps, g.row_el);
            return;
          }
          const int64_t off = act_offset(g, n, c0, yy);
          for (int64_t vb = 0; vb < g.nv; ++vb) {
            if (g.cl) {
              zero(dst + vb * ps, g.p * V);
              zero(dst + vb * ps + (g.p + g.W) * V, (g.Wp - g.p - g.W) * V);
            } else {
              zero(dst, g.p);
              zero(dst + g.p + g.Wr, g.Wp - g.p - g.Wr);
            }
            const Vec s = Vec::loadu(lp[0] + vb * V), b = Vec::loadu(lp[1] + vb * V),
                      m = Vec::loadu(lp[2] + vb * V),
                      a1 = Vec::loadu(lp[3] + vb * V), b1 = Vec::loadu(lp[4] + vb * V),
                      c1 = Vec::loadu(lp[5] + vb * V);
            for (int64_t q = 0; q < rm.nq(); ++q) {
              const int64_t to = off + rm.t_off(q, vb), cnt = rm.cnt(q, vb);
              const Vec d = dpre_vec<ACT>(load_vec<T, A>(dy + to, cnt), load_vec<T, A>(pre + to, cnt), s, b, m, a1,
                                          b1, c1, P.act_first);
              mask_vec(d, cnt).store(dst + rm.r_off(q, vb));  // NCHW: lanes past W must be zero
            }
          }
        };
        for (int64_t n = g.n_begin(gb); n < g.n_end(gb); ++n) {
          const T* img = x + act_offset(g, n, c0, 0);
          stream_rows(
              g, xr, g.h_begin(gb), g.h_end(gb),
              [&](int64_t yy) {
                stage_row(xr.slot(yy), img, yy, rm.cb_len, g);
                stage_d(dslot(yy), n, yy);
              },
              [&](int64_t r, int64_t nr, const A* const* xrows) {
                const A* drows[kMaxK + kMaxRows];
                for (int64_t ii = 0; ii < nr + k - 1; ++ii) drows[ii] = dslot(r - g.p + ii);
                // dx = conv(dpre, flipped weight) [+ dy]
                conv_rows(static_cast<const A* const*>(drows), nr, wt, g, crow.get());
                for (int64_t rr = 0; rr < nr; ++rr) {
                  const A* cr = crow.get() + rr * g.out_el;
                  const int64_t off = act_offset(g, n, c0, r + rr);
                  for (int64_t vb = 0; vb < g.nv; ++vb)
                    for (int64_t q = 0; q < rm.nq(); ++q) {
                      const int64_t to = off + rm.t_off(q, vb), cnt = rm.cnt(q, vb);
                      Vec v = Vec::loadu(cr + rm.b_off(q, vb));
                      if (P.residual) v = v + load_vec<T, A>(dy + to, cnt);
                      store_vec(v, dx + to, cnt);
                    }
                }
                // dweight and dbias: output row r + rr has dpre drows[rr + p], input rows xrows[rr ..].
                for (int64_t rr = 0; rr < nr; ++rr) {
                  for (int64_t vb = 0; vb < g.nv; ++vb) {
                    const A* d = drows[rr + g.p] + vb * ps + g.p * g.lane;
                    const int64_t nvec = g.cl ? g.W : g.Wr / V;
                    dweight_row(d, xrows + rr, vb * ps, g.cl ? V : int64_t(1), nvec, k,
                                wacc.get() + vb * kk * V);
                    Vec sb = Vec::loadu(bacc.get() + vb * V);
                    for (int64_t e = 0; e < nvec * V; e += V) sb = sb + Vec::loadu(d + e);
                    sb.store(bacc.get() + vb * V);
                  }
                  if (++pending == kFlushRows) flush(rm.cb_len);
                }
              });
          flush(rm.cb_len);  // per image
        }
      });
      for (int64_t l = 0; l < rm.cb_len; ++l) {
        const int64_t c = c0 + l;
        for (int64_t t = 0; t < kk; ++t)
          part_w.get()[(gb * g.Cpad + c) * kk + t] = acc_w.get()[g.cl ? t * g.CB + l : t];
        part_b.get()[gb * g.Cpad + c] = acc_b.get()[l];
      }
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t t = 0; t < kk; ++t) {
      double s = 0;
      for (int64_t gb = 0; gb < g.G; ++gb) s += part_w.get()[(gb * g.Cpad + c) * kk + t];
      dweight[c * kk + t] = A(s);
    }
    double s = 0;
    for (int64_t gb = 0; gb < g.G; ++gb) s += part_b.get()[gb * g.Cpad + c];
    dbias[c] = A(s);
  }
}

// ---------------------------------------------------------------- dtype dispatch


template <template <typename> class Op>
void by_dtype(const DwParams& P) {
  switch (P.dtype) {
    case StorageType::kFloat: Op<float>::run(P); break;
    case StorageType::kHalf: Op<c10::Half>::run(P); break;
    case StorageType::kBFloat16: Op<c10::BFloat16>::run(P); break;
    case StorageType::kDouble: Op<double>::run(P); break;
  }
}
template <typename T>
struct ConvStatsOp {
  static void run(const DwParams& P) { conv_stats_t<T>(P); }
};
template <typename T>
struct FwdOp {
  static void run(const DwParams& P) { fwd_t<T>(P); }
};
template <typename T>
struct BwdReduceOp {
  static void run(const DwParams& P) { bwd_reduce_t<T>(P); }
};
template <typename T>
struct BwdOp {
  static void run(const DwParams& P) { bwd_t<T>(P); }
};

void conv_stats(const DwParams& P) { by_dtype<ConvStatsOp>(P); }
void fwd(const DwParams& P) { by_dtype<FwdOp>(P); }
void bwd_reduce(const DwParams& P) { by_dtype<BwdReduceOp>(P); }
void bwd(const DwParams& P) { by_dtype<BwdOp>(P); }

}  // namespace

DwKernels kernels() { return DwKernels{conv_stats, fwd, bwd_reduce, bwd, CMK_ISA_NAME}; }

}  // namespace CMK_ISA_NS
}  // namespace cpu
}  // namespace convmixer_kernels
