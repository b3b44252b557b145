// The CPU kernels of the fused depthwise block, written once over at::vec::Vectorized and
// compiled once per instruction set: each dw_isa_<isa>.cpp defines CPU_CAPABILITY (the
// at::vec namespace) and CMK_ISA_NS / CMK_ISA_NAME, then includes this file.  All of it
// lives in an anonymous namespace except `kernels()`, so the copies never meet at link time.
//
// Semantics: convmixer_kernels/torch_ops.py.  Design:
//   * Both layouts stage the input of a tile (a band of output rows plus the k-1 halo rows,
//     zero padded, converted to the accumulation type A) in a per-thread buffer, so the
//     convolution itself has no boundary tests and no dtype conversions:
//       NCHW: one channel, buffer rows of Wp = round_up(W, V) + k - 1 values; a row of
//             outputs is a set of vectors along W with the weights broadcast;
//       channels_last: a block of CB channels (a multiple of V), buffer rows of (W + k - 1)
//             pixels x CB; vectors run along C, P pixels of a row at once.
//     In NCHW a "pixel" of the row helpers below is a vector of V consecutive outputs of the
//     same channel, so the per-channel parameters are arrays of V equal values there, and
//     one set of row helpers serves both layouts.
//   * pre = conv + bias is rounded to the storage type T right after the convolution;
//     every consumer uses the rounded value, so dw_fwd and dw_conv_stats agree bitwise.
//   * Reductions (mean/var, BN-backward sums, dweight, dbias) run over work items
//     (channel group, batch group): the split depends on shapes only, each item is
//     computed by one thread in a fixed order, and items are merged in a fixed order, so
//     results are bitwise identical for any thread count.  Rows are reduced in A
//     (vectors, then lanes in order) and rows/tiles/items are merged in double; mean/var
//     use per-row two-pass moments merged with Chan's formula (no cancellation).
//   * dw_bwd recomputes dpre for a tile plus its halo (cheap, elementwise) into a padded
//     buffer, then dx = depthwise conv of dpre with the flipped kernel, and the dweight
//     partials are k*k dot products of that buffer with the staged x.
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

// Zero-initialised, 64-byte aligned scratch memory (internal linkage: no std::vector instantiation shared
// with translation units compiled for another CPU).
template <typename E>
class Buf {
 public:
  explicit Buf(int64_t n) {
    raw_ = std::calloc(static_cast<size_t>(n > 0 ? n : 1) * sizeof(E) + 128, 1);
    TORCH_CHECK(raw_ != nullptr, "convmixer_kernels: out of memory allocating CPU scratch");
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t(63);  // cache-line aligned
    p_ = reinterpret_cast<E*>(a);
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

// dst[0, n) = T(src[0, n)), round to nearest even
template <typename T, typename A>
inline void to_storage(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    to_acc(src, dst, n);
  } else {
    using VF = Vectorized<float>;
    constexpr int64_t L = Vectorized<T>::size();
    constexpr int64_t HL = VF::size();
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      at::vec::convert_from_float<T>(VF::loadu(src + i), VF::loadu(src + i + HL)).store(dst + i);
    }
    if (i < n) {
      const int64_t m = n - i;
      const VF a = VF::loadu(src + i, imin(m, HL));
      const VF b = m > HL ? VF::loadu(src + i + HL, m - HL) : VF(0.f);
      at::vec::convert_from_float<T>(a, b).store(dst + i, m);
    }
  }
}

// One vector: dst[0, V) = A(src[0, cnt)), zero past cnt (cnt may be <= 0).
template <typename T, typename A>
inline void load_px(const T* src, A* dst, int64_t cnt) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  if (cnt <= 0) {
    Vec(A(0)).store(dst);
  } else if constexpr (std::is_same_v<T, A>) {
    (cnt >= V ? Vec::loadu(src) : Vec::loadu(src, cnt)).store(dst);
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(src, imin(cnt, V)));
    (void)b;
    a.store(dst);
  }
}

// One vector: dst[0, cnt) = T(src[0, cnt)) (nothing if cnt <= 0).
template <typename T, typename A>
inline void store_px(const A* src, T* dst, int64_t cnt) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  if (cnt <= 0) return;
  if constexpr (std::is_same_v<T, A>) {
    if (cnt >= V)
      Vec::loadu(src).store(dst);
    else
      Vec::loadu(src).store(dst, cnt);
  } else {
    at::vec::convert_from_float<T>(Vec::loadu(src), Vec(A(0))).store(dst, imin(cnt, V));
  }
}

// row[0, n) = A(T(row[0, n))): the rounding of pre to the storage type.
template <typename T, typename A>
inline void round_to_storage(A* row, T* tmp, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) {
    to_storage(row, tmp, n);
    to_acc(tmp, row, n);
  }
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

// act(v) and act'(v) for the run-time code `act` made a template constant (see torch_ops).
template <int ACT, typename A>
inline Vectorized<A> act_fwd(const Vectorized<A>& v) {
  using Vec = Vectorized<A>;
  if constexpr (ACT == 0) {
    return v;
  } else if constexpr (ACT == 1) {
    return at::vec::clamp_min(v, Vec(A(0)));
  } else if constexpr (ACT == 2) {
    return v * Vec(A(0.5)) * (Vec(A(1)) + (v * Vec(A(M_SQRT1_2))).erf());
  } else if constexpr (ACT == 3) {
    const Vec inner = Vec(A(0.7978845608028654)) * (v + Vec(A(0.044715)) * v * v * v);
    return Vec(A(0.5)) * v * (Vec(A(1)) + inner.tanh());
  } else {
    return v / (Vec(A(1)) + v.neg().exp());
  }
}

template <int ACT, typename A>
inline Vectorized<A> act_grad(const Vectorized<A>& v) {
  using Vec = Vectorized<A>;
  const Vec one(A(1));
  if constexpr (ACT == 0) {
    return one;
  } else if constexpr (ACT == 1) {
    return v.gt(Vec(A(0)));  // 1 where v > 0, else 0 (relu'(0) = 0)
  } else if constexpr (ACT == 2) {
    const Vec cdf = Vec(A(0.5)) * (one + (v * Vec(A(M_SQRT1_2))).erf());
    const Vec pdf = (Vec(A(-0.5)) * v * v).exp() * Vec(A(0.3989422804014327));
    return cdf + v * pdf;
  } else if constexpr (ACT == 3) {
    const A k0 = A(0.7978845608028654), k1 = A(0.044715);
    const Vec t = (Vec(k0) * (v + Vec(k1) * v * v * v)).tanh();
    return Vec(A(0.5)) * (one + t) +
           Vec(A(0.5)) * v * (one - t * t) * Vec(k0) * (one + Vec(A(3) * k1) * v * v);
  } else {
    const Vec s = one / (one + v.neg().exp());
    return s * (one + v * (one - s));
  }
}

// Runs body.template operator()<ACT>() for the run-time activation code.
template <typename F>
inline void with_act(int act, F&& body) {
  switch (act) {
    case 0: body(std::integral_constant<int, 0>{}); break;
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    default: body(std::integral_constant<int, 4>{}); break;
  }
}

// ---------------------------------------------------------------- geometry

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
  int64_t Wp;      // buffer row length: NCHW Wr + k - 1 values; CL W + k - 1 pixels
  int64_t lane;    // buffer elements per pixel: CL V, NCHW 1
  int64_t row_el;  // buffer elements per row (of one plane): Wp * lane
  int64_t out_el;  // elements per output row buffer (NCHW Wr, CL W * CB)
  int64_t npix;    // "pixels" per output row for the row helpers (NCHW Wr / V, CL W)
  int64_t plen;    // lanes of such a pixel (NCHW V, CL CB)
  int64_t TH;      // output rows per tile
  int64_t ntiles;  // tiles per image
  int64_t G;       // batch groups of the reduction items

  explicit Geom(const DwParams& P)
      : N(P.N), C(P.C), H(P.H), W(P.W), k(P.k), p(P.k / 2), cl(P.channels_last) {
    if (cl) {
      // An item owns CB = 256 bytes of channels (one vector at least).  The staging buffer
      // keeps each vector of channels in its own plane (rows x pixels x V lanes), so the k
      // rows a conv row reads are contiguous: one cache line per pixel at most.  (Pixels of
      // 256 B interleaved map every row onto a quarter of L1's sets and thrash it.)
      CB = imin(round_up(C, V), imax(V, int64_t(256 / sizeof(A))));
      nv = CB / V;
      ncg = div_up(C, CB);
      Cpad = ncg * CB;
      Wr = W;
      Wp = W + k - 1;
      lane = V;
      out_el = W * CB;
      npix = W;
      plen = CB;
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
    }
    row_el = Wp * lane;
    // A tile's staged input (TH + k - 1 rows of every plane) stays within 256 KB (L2); at
    // most 256 rows keep the per-lane float sums of a tile short.
    const int64_t budget = (int64_t(1) << 18) / int64_t(sizeof(A));
    TH = imax(1, imin(imin(H, 256), budget / (nv * row_el) - (k - 1)));
    ntiles = div_up(H, TH);
    // Reduction items: enough to keep the threads busy, few enough that their partial
    // results stay small.  Depends on shapes only.
    G = imax(1, imin(N, div_up(64, ncg)));
  }
  int64_t rows() const { return TH + k - 1; }
  int64_t plane_el() const { return rows() * row_el; }
  int64_t buf_el() const { return nv * plane_el(); }
  int64_t n_begin(int64_t g) const { return g * N / G; }
};

// ---------------------------------------------------------------- staging

// NCHW: buffer rows r in [0, nrows) <- image rows h_start + r of one plane (H x W), zero
// outside the image: p zeros, W values, zeros to Wp.
template <typename T, typename A>
void fill_nchw(A* buf, const T* plane, int64_t h_start, int64_t nrows, const Geom<A>& g) {
  for (int64_t r = 0; r < nrows; ++r) {
    A* row = buf + r * g.Wp;
    const int64_t hi = h_start + r;
    if (hi < 0 || hi >= g.H) {
      zero(row, g.Wp);
      continue;
    }
    zero(row, g.p);
    to_acc(plane + hi * g.W, row + g.p, g.W);
    zero(row + g.p + g.W, g.Wp - g.p - g.W);
  }
}

// Channels_last: `img` points at (n, 0, 0, c0), cb_len <= CB channels are real (the other
// lanes are zero).  Plane vb, row r, pixel q holds channels c0 + vb*V .. + V of image row
// h_start + r, column q - p.
template <typename T, typename A>
void fill_cl(A* buf, const T* img, int64_t h_start, int64_t nrows, int64_t cb_len, const Geom<A>& g) {
  constexpr int64_t V = Geom<A>::V;
  const int64_t pe = g.plane_el();
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t hi = h_start + r;
    if (hi < 0 || hi >= g.H) {
      for (int64_t vb = 0; vb < g.nv; ++vb) zero(buf + vb * pe + r * g.row_el, g.row_el);
      continue;
    }
    for (int64_t vb = 0; vb < g.nv; ++vb) {
      A* row = buf + vb * pe + r * g.row_el;
      zero(row, g.p * V);
      zero(row + (g.p + g.W) * V, (g.Wp - g.p - g.W) * V);
    }
    const T* src = img + hi * g.W * g.C;
    A* dst = buf + r * g.row_el + g.p * V;
    for (int64_t w = 0; w < g.W; ++w)
      for (int64_t vb = 0; vb < g.nv; ++vb) load_px(src + w * g.C + vb * V, dst + vb * pe + w * V, cb_len - vb * V);
  }
}

template <typename T, typename A>
inline void fill(A* buf, const T* img, int64_t h_start, int64_t nrows, int64_t cb_len, const Geom<A>& g) {
  if (g.cl)
    fill_cl(buf, img, h_start, nrows, cb_len, g);
  else
    fill_nchw(buf, img, h_start, nrows, g);
}

// ---------------------------------------------------------------- convolution

// NCHW: R output rows x B vectors.  Input rows in[0 .. R + k - 1) (stride ld): input row ii
// feeds output row rr through weight row ii - rr, so each loaded vector serves up to R
// rows (fewer loads per FMA than one row at a time; unaligned loads split cache lines).
template <int R, int B, typename A>
inline void conv_block_nchw(const A* in, int64_t ld, const A* wt, int64_t k, A* out, int64_t ldo) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec acc[R][B];
  for (int rr = 0; rr < R; ++rr)
    for (int b = 0; b < B; ++b) acc[rr][b] = Vec(A(0));
  for (int64_t ii = 0; ii < R + k - 1; ++ii) {
    const A* row = in + ii * ld;
    if (ii >= R - 1 && ii <= k - 1) {  // every output row takes this input row
      for (int64_t j = 0; j < k; ++j) {
        Vec xv[B];
        for (int b = 0; b < B; ++b) xv[b] = Vec::loadu(row + j + b * V);
        for (int rr = 0; rr < R; ++rr) {
          const Vec w(wt[(ii - rr) * k + j]);
          for (int b = 0; b < B; ++b) acc[rr][b] = at::vec::fmadd(w, xv[b], acc[rr][b]);
        }
      }
    } else {  // the first and last R - 1 input rows feed only some output rows
      for (int64_t j = 0; j < k; ++j) {
        Vec xv[B];
        for (int b = 0; b < B; ++b) xv[b] = Vec::loadu(row + j + b * V);
        for (int rr = 0; rr < R; ++rr) {
          if (ii - rr < 0 || ii - rr >= k) continue;
          const Vec w(wt[(ii - rr) * k + j]);
          for (int b = 0; b < B; ++b) acc[rr][b] = at::vec::fmadd(w, xv[b], acc[rr][b]);
        }
      }
    }
  }
  for (int rr = 0; rr < R; ++rr)
    for (int b = 0; b < B; ++b) acc[rr][b].store(out + rr * ldo + b * V);
}

// NCHW: R output rows of n (a multiple of V) values each.
template <int R, typename A>
inline void conv_rows_nchw(const A* in, int64_t ld, const A* wt, int64_t k, int64_t n, A* out, int64_t ldo) {
  constexpr int64_t V = Vectorized<A>::size();
  constexpr int BM = R <= 2 ? 4 : 2;  // R * BM accumulators
  int64_t w = 0;
  for (; w + BM * V <= n; w += BM * V) conv_block_nchw<R, BM>(in + w, ld, wt, k, out + w, ldo);
  if (BM > 2 && w + 2 * V <= n) {
    conv_block_nchw<R, 2>(in + w, ld, wt, k, out + w, ldo);
    w += 2 * V;
  }
  if (w < n) conv_block_nchw<R, 1>(in + w, ld, wt, k, out + w, ldo);
}

// Channels_last: P output pixels of one plane (pixel stride V in, ops out).  in: plane at
// (row r, pixel w); wt: transposed weights at (tap 0, channel c0 + vb*V), tap stride Cpad.
template <int P, typename A>
inline void conv_px_cl(const A* in, int64_t ld, const A* wt, int64_t Cpad, int64_t k, A* out, int64_t ops) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec acc[P];
  for (int q = 0; q < P; ++q) acc[q] = Vec(A(0));
  for (int64_t i = 0; i < k; ++i) {
    const A* row = in + i * ld;
    const A* wr = wt + i * k * Cpad;
    for (int64_t j = 0; j < k; ++j) {
      const Vec w = Vec::loadu(wr + j * Cpad);
      const A* xj = row + j * V;
      for (int q = 0; q < P; ++q) acc[q] = at::vec::fmadd(w, Vec::loadu(xj + q * V), acc[q]);
    }
  }
  for (int q = 0; q < P; ++q) acc[q].store(out + q * ops);
}

// Channels_last: output row r of the tile, W pixels x CB lanes, into out (pixel stride CB).
template <typename A>
inline void conv_row_cl(const A* buf, int64_t r, const A* wt, const Geom<A>& g, A* out) {
  constexpr int64_t V = Geom<A>::V;
  const int64_t W = g.W, CB = g.CB;
  for (int64_t vb = 0; vb < g.nv; ++vb) {
    const A* in = buf + vb * g.plane_el() + r * g.row_el;
    const A* wv = wt + vb * V;
    A* o = out + vb * V;
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) conv_px_cl<8>(in + w * V, g.row_el, wv, g.Cpad, g.k, o + w * CB, CB);
    if (W - w >= 4) {
      conv_px_cl<4>(in + w * V, g.row_el, wv, g.Cpad, g.k, o + w * CB, CB);
      w += 4;
    }
    if (W - w >= 2) {
      conv_px_cl<2>(in + w * V, g.row_el, wv, g.Cpad, g.k, o + w * CB, CB);
      w += 2;
    }
    if (W - w >= 1) conv_px_cl<1>(in + w * V, g.row_el, wv, g.Cpad, g.k, o + w * CB, CB);
  }
}

constexpr int64_t kMaxRows = 4;  // output rows per conv_rows call

// Output rows r, r + 1, ... (at most kMaxRows, at most `left`) of the tile staged in buf,
// into out (row stride out_el).  Returns the number of rows computed.
template <typename A>
inline int64_t conv_rows(const A* buf, int64_t r, int64_t left, const A* wt, const Geom<A>& g, A* out) {
  if (g.cl) {
    conv_row_cl(buf, r, wt, g, out);
    return 1;
  }
  const A* in = buf + r * g.row_el;
  if (left >= 4) {
    conv_rows_nchw<4>(in, g.Wp, wt, g.k, g.Wr, out, g.out_el);
    return 4;
  }
  if (left >= 2) {
    conv_rows_nchw<2>(in, g.Wp, wt, g.k, g.Wr, out, g.out_el);
    return 2;
  }
  conv_rows_nchw<1>(in, g.Wp, wt, g.k, g.Wr, out, g.out_el);
  return 1;
}

// ---------------------------------------------------------------- row epilogues
// A row is npix "pixels" of plen lanes (plen a multiple of V); per-channel parameters are
// arrays of plen values (NCHW: the channel's value repeated).

template <typename A>
inline void add_bias_row(A* row, const A* bias, int64_t npix, int64_t plen) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t v = 0; v < plen; v += V) {
    const Vec b = Vec::loadu(bias + v);
    for (int64_t q = 0; q < npix; ++q) {
      A* e = row + q * plen + v;
      (Vec::loadu(e) + b).store(e);
    }
  }
}

template <int ACT, typename A>
inline void act_row(A* row, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  if constexpr (ACT != 0)
    for (int64_t e = 0; e < n; e += V) act_fwd<ACT>(Vec::loadu(row + e)).store(row + e);
}

// y = [x +] (sc * act(pre) + sh  if act_first  else  act(sc * pre + sh))
template <int ACT, typename A>
inline void fwd_row(const A* pre, const A* xres, const A* sc, const A* sh, bool act_first, A* out,
                    int64_t npix, int64_t plen) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t v = 0; v < plen; v += V) {
    const Vec s = Vec::loadu(sc + v), b = Vec::loadu(sh + v);
    for (int64_t q = 0; q < npix; ++q) {
      const int64_t e = q * plen + v;
      const Vec x = Vec::loadu(pre + e);
      Vec o = act_first ? at::vec::fmadd(s, act_fwd<ACT>(x), b) : act_fwd<ACT>(at::vec::fmadd(s, x, b));
      if (xres != nullptr) o = o + Vec::loadu(xres + e);
      o.store(out + e);
    }
  }
}

// BN-backward sums: sg += sum_q g, sgx += sum_q g * (u - mean), per lane; `valid` elements
// of the flattened row count (NCHW tail lanes beyond W are masked out).
template <int ACT, typename A>
inline void bwd_reduce_row(const A* dy, const A* pre, const A* sc, const A* sh, const A* mean,
                           bool act_first, int64_t npix, int64_t plen, int64_t valid, A* sg, A* sgx) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec zero_v(A(0));
  for (int64_t v = 0; v < plen; v += V) {
    const Vec s = Vec::loadu(sc + v), b = Vec::loadu(sh + v), m = Vec::loadu(mean + v);
    Vec ag = zero_v, agx = zero_v;
    for (int64_t q = 0; q < npix; ++q) {
      const int64_t e = q * plen + v;
      const Vec x = Vec::loadu(pre + e);
      Vec gv = Vec::loadu(dy + e), u = x;
      if (act_first)
        u = act_fwd<ACT>(x);
      else if constexpr (ACT != 0)
        gv = gv * act_grad<ACT>(at::vec::fmadd(s, x, b));
      Vec gx = gv * (u - m);
      if (valid - e < V) {
        gv = Vec::set(zero_v, gv, imax(valid - e, 0));
        gx = Vec::set(zero_v, gx, imax(valid - e, 0));
      }
      ag = ag + gv;
      agx = agx + gx;
    }
    (Vec::loadu(sg + v) + ag).store(sg + v);
    (Vec::loadu(sgx + v) + agx).store(sgx + v);
  }
}

// dpre = ca*g + cb*(u - mean) + cd, times act'(pre) if act_first.
template <int ACT, typename A>
inline void dpre_row(const A* dy, const A* pre, const A* sc, const A* sh, const A* mean, const A* ca,
                     const A* cb, const A* cd, bool act_first, A* d, int64_t npix, int64_t plen) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t v = 0; v < plen; v += V) {
    const Vec s = Vec::loadu(sc + v), b = Vec::loadu(sh + v), m = Vec::loadu(mean + v);
    const Vec a1 = Vec::loadu(ca + v), b1 = Vec::loadu(cb + v), c1 = Vec::loadu(cd + v);
    for (int64_t q = 0; q < npix; ++q) {
      const int64_t e = q * plen + v;
      const Vec x = Vec::loadu(pre + e);
      const Vec gy = Vec::loadu(dy + e);
      Vec r;
      if (act_first) {
        r = at::vec::fmadd(a1, gy, at::vec::fmadd(b1, act_fwd<ACT>(x) - m, c1));
        if constexpr (ACT != 0) r = r * act_grad<ACT>(x);
      } else {
        Vec gv = gy;
        if constexpr (ACT != 0) gv = gv * act_grad<ACT>(at::vec::fmadd(s, x, b));
        r = at::vec::fmadd(a1, gv, at::vec::fmadd(b1, x - m, c1));
      }
      r.store(d + e);
    }
  }
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

// Writes one output row buffer (out_el values; CL pixel-major, CB lanes a pixel) to the
// tensor row `dst`: NCHW W values; CL W pixels of cb_len channels at stride C.
template <typename T, typename A>
inline void store_row(const A* row, T* dst, int64_t cb_len, const Geom<A>& g) {
  constexpr int64_t V = Geom<A>::V;
  if (g.cl) {
    for (int64_t w = 0; w < g.W; ++w)
      for (int64_t vb = 0; vb < g.nv; ++vb)
        store_px(row + w * g.CB + vb * V, dst + w * g.C + vb * V, cb_len - vb * V);
  } else {
    to_storage(row, dst, g.W);
  }
}

// Reads one tensor row into a row buffer (the inverse of store_row).  CL padding lanes are
// zero; NCHW lanes past W are left as they were.
template <typename T, typename A>
inline void load_row(const T* src, A* row, int64_t cb_len, const Geom<A>& g) {
  constexpr int64_t V = Geom<A>::V;
  if (g.cl) {
    for (int64_t w = 0; w < g.W; ++w)
      for (int64_t vb = 0; vb < g.nv; ++vb)
        load_px(src + w * g.C + vb * V, row + w * g.CB + vb * V, cb_len - vb * V);
  } else {
    to_acc(src, row, g.W);
  }
}

// Offset of (n, c0, h, 0) in an activation tensor.
template <typename A>
inline int64_t act_offset(const Geom<A>& g, int64_t n, int64_t c0, int64_t h) {
  return g.cl ? ((n * g.H + h) * g.W) * g.C + c0 : ((n * g.C + c0) * g.H + h) * g.W;
}

// ---------------------------------------------------------------- dw_fwd

template <typename T>
void fwd_t(const DwParams& P) {
  using A = typename AccOf<T>::type;
  const Geom<A> g(P);
  if (g.N * g.C * g.H * g.W == 0) return;
  const T* x = static_cast<const T*>(P.x);
  T* y = static_cast<T*>(P.y);
  const Weights<A> wts(g, static_cast<const A*>(P.weight), false);
  const ChanParams<A> cp(g, {P.bias, P.scale, P.shift});
  const int64_t nitems = g.N * g.ncg * g.ntiles;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> xbuf(g.buf_el()), crow(kMaxRows * g.out_el), orow(g.out_el), xrow(g.out_el);
    Buf<T> tmp(kMaxRows * g.out_el);
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t = it % g.ntiles;
      const int64_t cg = (it / g.ntiles) % g.ncg;
      const int64_t n = it / (g.ntiles * g.ncg);
      const int64_t c0 = cg * g.CB;
      const int64_t cb_len = imin(g.CB, g.C - c0);
      const int64_t h0 = t * g.TH, th = imin(g.TH, g.H - h0);
      lp.set(cp, c0);
      fill(xbuf.get(), x + act_offset(g, n, c0, 0), h0 - g.p, th + g.k - 1, cb_len, g);
      const A* wt = wts.group(cg);
      for (int64_t r = 0; r < th;) {
        const int64_t nr = conv_rows(xbuf.get(), r, th - r, wt, g, crow.get());
        add_bias_row(crow.get(), lp[0], nr * g.npix, g.plen);
        round_to_storage(crow.get(), tmp.get(), nr * g.out_el);
        for (int64_t rr = 0; rr < nr; ++rr, ++r) {
          const int64_t off = act_offset(g, n, c0, h0 + r);
          const A* xres = nullptr;
          if (P.residual) {
            if (g.cl) {
              load_row(x + off, xrow.get(), cb_len, g);
              xres = xrow.get();
            } else {
              xres = xbuf.get() + (r + g.p) * g.row_el + g.p;
            }
          }
          with_act(P.act, [&](auto a) {
            fwd_row<decltype(a)::value>(crow.get() + rr * g.out_el, xres, lp[1], lp[2], P.act_first, orow.get(),
                                        g.npix, g.plen);
          });
          store_row(orow.get(), y + off, cb_len, g);
        }
      }
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
  // Item (cg, gb): channel group cg over images [n_begin(gb), n_begin(gb + 1)).
  Buf<double> part_mean(g.G * g.Cpad), part_m2(g.G * g.Cpad);
  const int64_t nitems = g.ncg * g.G;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> xbuf(g.buf_el()), crow(kMaxRows * g.out_el), lane_a(g.CB), lane_b(g.CB);
    Buf<T> tmp(kMaxRows * g.out_el);
    Buf<double> mean(g.CB), m2(g.CB);
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cg = it / g.G, gb = it % g.G;
      const int64_t c0 = cg * g.CB;
      const int64_t cb_len = imin(g.CB, g.C - c0);
      lp.set(cp, c0);
      const A* wt = wts.group(cg);
      double n_acc = 0;
      zero(mean.get(), g.CB);
      zero(m2.get(), g.CB);
      for (int64_t n = g.n_begin(gb); n < g.n_begin(gb + 1); ++n) {
        for (int64_t t = 0; t < g.ntiles; ++t) {
          const int64_t h0 = t * g.TH, th = imin(g.TH, g.H - h0);
          fill(xbuf.get(), x + act_offset(g, n, c0, 0), h0 - g.p, th + g.k - 1, cb_len, g);
          for (int64_t r = 0; r < th;) {
            const int64_t nr = conv_rows(xbuf.get(), r, th - r, wt, g, crow.get());
            add_bias_row(crow.get(), lp[0], nr * g.npix, g.plen);
            round_to_storage(crow.get(), tmp.get(), nr * g.out_el);
            for (int64_t rr = 0; rr < nr; ++rr)
              store_row(crow.get() + rr * g.out_el, pre + act_offset(g, n, c0, h0 + r + rr), cb_len, g);
            if (P.act_first)
              with_act(P.act, [&](auto a) { act_row<decltype(a)::value>(crow.get(), nr * g.out_el); });
            for (int64_t rr = 0; rr < nr; ++rr, ++r) {
              const A* row = crow.get() + rr * g.out_el;  // u = act(pre) or pre
              // Row moments (two passes over the row), merged into the item's.
              if (g.cl) {
                const Vec inv_w(A(1) / A(g.W));
                for (int64_t v = 0; v < g.CB; v += V) {
                  Vec s(A(0));
                  for (int64_t q = 0; q < g.W; ++q) s = s + Vec::loadu(row + q * g.CB + v);
                  const Vec mr = s * inv_w;
                  Vec s2(A(0));
                  for (int64_t q = 0; q < g.W; ++q) {
                    const Vec dlt = Vec::loadu(row + q * g.CB + v) - mr;
                    s2 = at::vec::fmadd(dlt, dlt, s2);
                  }
                  mr.store(lane_a.get() + v);
                  s2.store(lane_b.get() + v);
                }
                for (int64_t l = 0; l < cb_len; ++l) {
                  double na = n_acc;
                  chan_merge(na, mean.get()[l], m2.get()[l], double(g.W), lane_a.get()[l], lane_b.get()[l]);
                }
              } else {
                const Vec zero_v(A(0));
                Vec s = zero_v;
                for (int64_t e = 0; e < g.Wr; e += V) s = s + Vec::set(zero_v, Vec::loadu(row + e), imin(V, g.W - e));
                const A mr = A(hsum(s)) / A(g.W);
                Vec s2 = zero_v;
                for (int64_t e = 0; e < g.Wr; e += V) {
                  const Vec dlt = Vec::set(zero_v, Vec::loadu(row + e) - Vec(mr), imin(V, g.W - e));
                  s2 = at::vec::fmadd(dlt, dlt, s2);
                }
                double na = n_acc;
                chan_merge(na, mean.get()[0], m2.get()[0], double(g.W), double(mr), hsum(s2));
              }
              n_acc += double(g.W);
            }
          }
        }
      }
      for (int64_t l = 0; l < cb_len; ++l) {
        part_mean.get()[gb * g.Cpad + c0 + l] = mean.get()[l];
        part_m2.get()[gb * g.Cpad + c0 + l] = m2.get()[l];
      }
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    double na = 0, ma = 0, m2a = 0;
    for (int64_t gb = 0; gb < g.G; ++gb) {
      const double nb = double(g.n_begin(gb + 1) - g.n_begin(gb)) * double(g.H) * double(g.W);
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
  const Geom<A> g(P);
  A* sum_g = static_cast<A*>(P.sum_g);
  A* sum_gx = static_cast<A*>(P.sum_gxhat);
  const A* invstd = static_cast<const A*>(P.invstd);
  if (g.C == 0) return;
  const T* dy = static_cast<const T*>(P.dy);
  const T* pre = static_cast<const T*>(P.pre);
  const ChanParams<A> cp(g, {P.scale, P.shift, P.mean});
  // Same items as conv_stats; the rows of an image in order, no halo.
  Buf<double> part_g(g.G * g.Cpad), part_gx(g.G * g.Cpad);
  const int64_t nitems = g.ncg * g.G;
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> dyrow(g.out_el), prow(g.out_el), sg(g.plen), sgx(g.plen);
    Buf<double> acc_g(g.CB), acc_gx(g.CB);
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cg = it / g.G, gb = it % g.G;
      const int64_t c0 = cg * g.CB;
      const int64_t cb_len = imin(g.CB, g.C - c0);
      lp.set(cp, c0);
      zero(acc_g.get(), g.CB);
      zero(acc_gx.get(), g.CB);
      for (int64_t n = g.n_begin(gb); n < g.n_begin(gb + 1); ++n) {
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t off = act_offset(g, n, c0, h);
          load_row(dy + off, dyrow.get(), cb_len, g);
          load_row(pre + off, prow.get(), cb_len, g);
          zero(sg.get(), g.plen);
          zero(sgx.get(), g.plen);
          const int64_t valid = g.cl ? g.out_el : g.W;
          with_act(P.act, [&](auto a) {
            bwd_reduce_row<decltype(a)::value>(dyrow.get(), prow.get(), lp[0], lp[1], lp[2], P.act_first,
                                               g.npix, g.plen, valid, sg.get(), sgx.get());
          });
          if (g.cl) {
            for (int64_t l = 0; l < cb_len; ++l) {
              acc_g.get()[l] += double(sg.get()[l]);
              acc_gx.get()[l] += double(sgx.get()[l]);
            }
          } else {
            acc_g.get()[0] += hsum(Vectorized<A>::loadu(sg.get()));
            acc_gx.get()[0] += hsum(Vectorized<A>::loadu(sgx.get()));
          }
        }
      }
      for (int64_t l = 0; l < cb_len; ++l) {
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

// dweight partials of a tile, J taps at once: acc[q] += sum over the tile's outputs of
// d * x at tap offset q.  d0: dpre buffer at (row p, col p); x0: x buffer at (row i, col j);
// `ps` is the pixel stride (NCHW 1 with vectors along W, CL V), n the vectors per row.
template <int J, typename A>
inline void dweight_taps(const A* d0, const A* x0, int64_t ld, int64_t ps, int64_t th, int64_t n,
                         Vectorized<A>* acc) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const int64_t step = ps == 1 ? V : ps;  // NCHW: V values per vector; CL: one pixel
  for (int64_t r = 0; r < th; ++r) {
    const A* dr = d0 + r * ld;
    const A* xr = x0 + r * ld;
    for (int64_t e = 0; e < n * step; e += step) {
      const Vec dv = Vec::loadu(dr + e);
      for (int q = 0; q < J; ++q) acc[q] = at::vec::fmadd(dv, Vec::loadu(xr + e + q * ps), acc[q]);
    }
  }
}

// All k*k taps of one plane of a tile; out[t * ostride + lane] += lanes (CL) or
// out[t * ostride] += sum of lanes (NCHW).  Lanes past `lanes` are dropped.
template <typename A>
inline void dweight_tile(const A* d0, const A* x0, int64_t ld, int64_t ps, int64_t th, int64_t n, int64_t k,
                         bool sum_lanes, int64_t lanes, double* out, int64_t ostride) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  alignas(64) A tmp[V];
  auto flush = [&](const Vec& a, int64_t t) {
    if (sum_lanes) {
      out[t * ostride] += hsum(a);
    } else {
      a.store(tmp);
      for (int64_t l = 0; l < lanes && l < V; ++l) out[t * ostride + l] += double(tmp[l]);
    }
  };
  for (int64_t i = 0; i < k; ++i) {
    const A* xi = x0 + i * ld;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
      Vec acc[4] = {Vec(A(0)), Vec(A(0)), Vec(A(0)), Vec(A(0))};
      dweight_taps<4>(d0, xi + j * ps, ld, ps, th, n, acc);
      for (int q = 0; q < 4; ++q) flush(acc[q], i * k + j + q);
    }
    for (; j < k; ++j) {
      Vec acc[1] = {Vec(A(0))};
      dweight_taps<1>(d0, xi + j * ps, ld, ps, th, n, acc);
      flush(acc[0], i * k + j);
    }
  }
}

template <typename T>
void bwd_t(const DwParams& P) {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Geom<A> g(P);
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
  const int64_t pe = g.plane_el();
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Buf<A> xbuf(g.buf_el()), dbuf(g.buf_el()), dyrow(g.out_el), prow(g.out_el), drow(g.out_el),
        crow(kMaxRows * g.out_el);
    Buf<double> acc_w(kk * g.CB), acc_b(g.CB);
    LaneParams<A> lp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cg = it / g.G, gb = it % g.G;
      const int64_t c0 = cg * g.CB;
      const int64_t cb_len = imin(g.CB, g.C - c0);
      lp.set(cp, c0);
      const A* wt = wflip.group(cg);
      zero(acc_w.get(), kk * g.CB);
      zero(acc_b.get(), g.CB);
      for (int64_t n = g.n_begin(gb); n < g.n_begin(gb + 1); ++n) {
        for (int64_t t = 0; t < g.ntiles; ++t) {
          const int64_t h0 = t * g.TH, th = imin(g.TH, g.H - h0);
          const int64_t nrows = th + k - 1;
          fill(xbuf.get(), x + act_offset(g, n, c0, 0), h0 - g.p, nrows, cb_len, g);
          // dpre of the tile and its halo rows, zero padded like x (recomputed, elementwise).
          for (int64_t r = 0; r < nrows; ++r) {
            const int64_t hi = h0 - g.p + r;
            if (hi < 0 || hi >= g.H) {
              for (int64_t vb = 0; vb < g.nv; ++vb) zero(dbuf.get() + vb * pe + r * g.row_el, g.row_el);
              continue;
            }
            const int64_t off = act_offset(g, n, c0, hi);
            load_row(dy + off, dyrow.get(), cb_len, g);
            load_row(pre + off, prow.get(), cb_len, g);
            A* dst = g.cl ? drow.get() : dbuf.get() + r * g.row_el + g.p;
            with_act(P.act, [&](auto a) {
              dpre_row<decltype(a)::value>(dyrow.get(), prow.get(), lp[0], lp[1], lp[2], lp[3], lp[4], lp[5],
                                           P.act_first, dst, g.npix, g.plen);
            });
            if (g.cl) {  // into the planes; padding channels are lane-local, never mixed in
              for (int64_t vb = 0; vb < g.nv; ++vb) {
                A* prow_d = dbuf.get() + vb * pe + r * g.row_el;
                zero(prow_d, g.p * V);
                for (int64_t w = 0; w < g.W; ++w) Vec::loadu(drow.get() + w * g.CB + vb * V).store(prow_d + (g.p + w) * V);
                zero(prow_d + (g.p + g.W) * V, (g.Wp - g.p - g.W) * V);
              }
            } else {  // lanes past W must not feed dx or dweight
              A* row = dbuf.get() + r * g.row_el;
              zero(row, g.p);
              zero(row + g.p + g.W, g.Wp - g.p - g.W);
            }
          }
          // dx = conv(dpre, flipped weight) [+ dy] for the tile's rows.
          for (int64_t r = 0; r < th;) {
            const int64_t nr = conv_rows(dbuf.get(), r, th - r, wt, g, crow.get());
            for (int64_t rr = 0; rr < nr; ++rr, ++r) {
              A* row = crow.get() + rr * g.out_el;
              const int64_t off = act_offset(g, n, c0, h0 + r);
              if (P.residual) {
                load_row(dy + off, dyrow.get(), cb_len, g);
                for (int64_t e = 0; e < g.out_el; e += V) (Vec::loadu(row + e) + Vec::loadu(dyrow.get() + e)).store(row + e);
              }
              store_row(row, dx + off, cb_len, g);
            }
          }
          // dweight and dbias partials of the tile.
          for (int64_t vb = 0; vb < g.nv; ++vb) {
            const A* d0 = dbuf.get() + vb * pe + g.p * g.row_el + g.p * g.lane;
            const A* x0 = xbuf.get() + vb * pe;
            const int64_t lanes = imin(V, cb_len - vb * V);
            if (g.cl) {
              dweight_tile(d0, x0, g.row_el, V, th, g.W, k, false, lanes, acc_w.get() + vb * V, g.CB);
            } else {
              dweight_tile(d0, x0, g.row_el, int64_t(1), th, g.Wr / V, k, true, lanes, acc_w.get(), 1);
            }
            Vec s(A(0));
            const int64_t n_el = g.cl ? g.W * V : g.Wr;
            for (int64_t r = 0; r < th; ++r)
              for (int64_t e = 0; e < n_el; e += V) s = s + Vec::loadu(d0 + r * g.row_el + e);
            if (g.cl) {
              alignas(64) A tmp[V];
              s.store(tmp);
              for (int64_t l = 0; l < lanes; ++l) acc_b.get()[vb * V + l] += double(tmp[l]);
            } else {
              acc_b.get()[0] += hsum(s);
            }
          }
        }
      }
      for (int64_t l = 0; l < cb_len; ++l) {
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
