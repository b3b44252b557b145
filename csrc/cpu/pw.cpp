// CPU entry points of the pointwise block (1x1 conv = a GEMM), the patch-embedding stem
// (non-overlapping p x p conv = a GEMM over re-indexed patches) and the elementwise
// BatchNorm + activation ops.  Each equals its namesake in convmixer_kernels/torch_ops.py:
//
//   pw_gemm_stats_cpu   (pre, mean, var), pre = round(conv1x1(x [+ t]) + bias), stats of u
//   pw_fwd_cpu          y = bn_act(pre)
//   pw_bwd_cpu          (ds, dweight, dbias) of pre = conv1x1(s) + bias through bn_act
//   stem_gemm_stats_cpu (pre, mean, var), pre = round(conv2d(x, weight, bias, stride=p))
//   stem_fwd_cpu        y = bn_act(pre)
//   stem_bwd_cpu        (dx | empty, dweight, dbias)
//   bn_act_fwd_cpu      y = scale*act(pre)+shift (act_first) or act(scale*pre+shift)
//   bn_act_bwd_cpu      dpre = (ca*g + cb*(u - mean) + cd) [* act'(pre) if act_first]
//
// How: the GEMM is ATen's (at::mm / at::bmm into preallocated tensors, on views of the
// activations: no layout copies), then ONE vectorized pass over the GEMM output (the
// "epilogue": bias, rounding of pre to the storage dtype, activation, and either the BN affine
// or the per-channel statistics).  Both memory formats are native:
//   channels_last: the activations are row-major (M = N*H*W, C) matrices, out = S @ W^T;
//   NCHW:          per image (C, H*W) matrices, out_n = W @ S_n (one batched GEMM).
// For fp16/bf16 the GEMM runs in fp32 on fp32 copies of its operands (made in the pass that
// builds the operand anyway, or one conversion pass), so pre = round(GEMM_fp32 + bias) exactly
// as the spec says: ATen's reduced-precision CPU GEMM would round its result before the bias.
// With t given, s = round(x + t) is built in one vectorized pass (this backend does not fuse
// the residual into the GEMM's operand load; the CUDA/Triton ones do).
//
// Statistics and dbias are deterministic: fixed-size chunks (channels_last: >= 128 rows; NCHW: one
// (image, channel) plane) each produce a partial (Welford mean and M2, or a sum) independent of
// the thread count; the partials are merged in a fixed pairwise tree (Chan's formula).
//
// Instruction set: on x86-64 the epilogue kernels are compiled for AVX2+FMA+F16C (ATen's
// Vectorized with its SLEEF/polynomial exp, erf, tanh) in one region of this file and used when
// the CPU has them and neither ATEN_CPU_CAPABILITY=default nor CONVMIXER_KERNELS_CPU_ISA=default
// asks for the baseline; otherwise the same epilogues run as a composition of ATen ops (several
// passes, same results up to rounding).  Generic ATen Vectorized (no ISA flags) turned the
// epilogue into scalar libm calls: GELU cost more than the GEMM itself.  Everything outside the
// region, including every header it depends on, is compiled for the baseline CPU.
#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER)
#define CMK_PW_X86_AVX2 1
#endif

namespace convmixer_kernels {
namespace cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Geometry of an activation-shaped tensor (N, C, H, W) as flat segments:
//   channels_last: N*H*W rows of C channels (per-channel values vary along a segment);
//   NCHW:          N*C planes of H*W pixels (one channel per segment).

struct Geo {
  bool cl;
  int64_t N, C, L;  // L = H*W
  int64_t segments() const { return cl ? N * L : N * C; }
  int64_t seg_len() const { return cl ? C : L; }
};

Geo geo_of(const Tensor& t, bool cl) { return Geo{cl, t.size(0), t.size(1), t.size(2) * t.size(3)}; }

struct BwdVecs {  // per-channel vectors of the BN backward, accumulation dtype
  const void *scale, *shift, *mean, *ca, *cb, *cd;
};

// Parallel-for grain: items per task so that a task has at least ATen's grain of elements
// (small ops stay on one thread: a parallel region costs more than they do).
int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elems_per_item, 1));
}

// out[i] = sum over b of buf[b][i], b in order (a deterministic batch reduction), acc dtype.
template <typename A>
void sum_batches(const A* buf, int64_t B, int64_t R, A* out) {
  at::parallel_for(0, R, grain_for(B), [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) out[i] = buf[i];
    for (int64_t b = 1; b < B; ++b)
      for (int64_t i = rb; i < re; ++i) out[i] += buf[b * R + i];
  });
}

}  // namespace
}  // namespace cpu
}  // namespace convmixer_kernels

// =============================================================================================
// Vectorized kernels: the only code compiled for AVX2 (x86-64); called only when the CPU has it.
#if defined(CMK_PW_X86_AVX2)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ lexes the file before it applies the pragma, so the ISA macros stay undefined; sleef.h
// declares its AVX2 functions (defined in libtorch_cpu) only under them.
#ifndef __AVX__
#define __AVX__ 1
#define CMK_PW_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define CMK_PW_UNDEF_AVX2
#endif
#include <sleef.h>
#ifdef CMK_PW_UNDEF_AVX
#undef __AVX__
#undef CMK_PW_UNDEF_AVX
#endif
#ifdef CMK_PW_UNDEF_AVX2
#undef __AVX2__
#undef CMK_PW_UNDEF_AVX2
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif  // CMK_PW_X86_AVX2
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace convmixer_kernels {
namespace cpu {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Vector blocks: kW = 2 * Vectorized<acc>::size() consecutive elements of a storage type T,
// held as two accumulation-dtype vectors (a reduced-precision Vectorized converts to two).

template <typename A>  // T == its own accumulation type (float, double)
struct BlockAcc {
  using acc_t = A;
  using V = Vectorized<A>;
  static constexpr int64_t kS = V::size();
  static constexpr int64_t kW = 2 * kS;
  static void load(const A* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + kS);
  }
  static void load(const A* p, int64_t n, V& a, V& b) {  // n < kW elements, rest zero
    if (n > kS) {
      a = V::loadu(p);
      b = V::loadu(p + kS, n - kS);
    } else {
      a = V::loadu(p, n);
      b = V(A(0));
    }
  }
  static void store(A* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + kS);
  }
  static void store(A* p, int64_t n, const V& a, const V& b) {
    if (n > kS) {
      a.store(p);
      b.store(p + kS, static_cast<int>(n - kS));
    } else {
      a.store(p, static_cast<int>(n));
    }
  }
  static void round(V&, V&) {}
};

template <typename R>  // BFloat16, Half: accumulate in float
struct BlockReduced {
  using acc_t = float;
  using V = Vectorized<float>;
  using RV = Vectorized<R>;
  static constexpr int64_t kW = RV::size();
  static_assert(RV::size() == 2 * V::size(), "a reduced vector must convert to two float vectors");
  static void load(const R* p, V& a, V& b) { std::tie(a, b) = at::vec::convert_to_float<R>(RV::loadu(p)); }
  static void load(const R* p, int64_t n, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<R>(RV::loadu(p, n));
  }
  static void store(R* p, const V& a, const V& b) { at::vec::convert_from_float<R>(a, b).store(p); }
  static void store(R* p, int64_t n, const V& a, const V& b) {
    at::vec::convert_from_float<R>(a, b).store(p, static_cast<int>(n));
  }
  // Round to R (nearest even) and back: the value the storage dtype would hold.
  static void round(V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<R>(at::vec::convert_from_float<R>(a, b));
  }
};

template <typename T>
struct Block;
template <>
struct Block<float> : BlockAcc<float> {};
template <>
struct Block<double> : BlockAcc<double> {};
template <>
struct Block<at::BFloat16> : BlockReduced<at::BFloat16> {};
template <>
struct Block<at::Half> : BlockReduced<at::Half> {};

// ---------------------------------------------------------------------------------------------
// Activations (codes as in common.h), forward and derivative, in the accumulation dtype.

template <typename V>
inline V act_fwd(const V& v, int act) {
  using A = typename V::value_type;
  switch (act) {
    case kRelu:
      return at::vec::maximum(v, V(A(0)));
    case kGelu:
      return V(A(0.5)) * v * (V(A(1)) + (v * V(A(M_SQRT1_2))).erf());
    case kGeluTanh: {
      const V inner = V(A(M_2_SQRTPI * M_SQRT1_2)) * (v + V(A(0.044715)) * v * v * v);
      return V(A(0.5)) * v * (V(A(1)) + inner.tanh());
    }
    case kSilu:
      return v / (V(A(1)) + v.neg().exp());
    default:
      return v;
  }
}

template <typename V>
inline V act_grad(const V& v, int act) {  // d act(v) / dv, relu'(0) = 0
  using A = typename V::value_type;
  const V one(A(1));
  switch (act) {
    case kRelu:
      return v.gt(V(A(0)));
    case kGelu: {
      const V cdf = V(A(0.5)) * (one + (v * V(A(M_SQRT1_2))).erf());
      const V pdf = (V(A(-0.5)) * v * v).exp() * V(A(M_2_SQRTPI * M_SQRT1_2 * 0.5));
      return cdf + v * pdf;
    }
    case kGeluTanh: {
      const A k0 = A(M_2_SQRTPI * M_SQRT1_2), k1 = A(0.044715);
      const V t = (V(k0) * (v + V(k1) * v * v * v)).tanh();
      return V(A(0.5)) * (one + t) + V(A(0.5)) * v * (one - t * t) * V(k0) * (one + V(A(3) * k1) * v * v);
    }
    case kSilu: {
      const V s = one / (one + v.neg().exp());
      return s * (one + v * (one - s));
    }
    default:
      return one;
  }
}

template <typename V>
inline V bn_act(const V& pre, const V& scale, const V& shift, int act, bool act_first) {
  return act_first ? scale * act_fwd(pre, act) + shift : act_fwd(scale * pre + shift, act);
}

// Per-channel vector: loaded lane by lane (channels_last) or broadcast (NCHW plane of channel c).
template <typename A, bool kCL>
struct ChanVec {
  using B = Block<A>;
  using V = Vectorized<A>;
  const A* p;
  V bcast;
  ChanVec(const A* ptr, int64_t c) : p(ptr), bcast(ptr != nullptr && !kCL ? ptr[c] : A(0)) {}
  void get(int64_t i, int64_t n, V& a, V& b) const {
    if constexpr (kCL) {
      if (n == B::kW)
        B::load(p + i, a, b);
      else
        B::load(p + i, n, a, b);
    } else {
      a = bcast;
      b = bcast;
    }
  }
};

// Runs f(kCL tag, first segment, end segment) over the segments in parallel.
template <typename F>
void for_segments(const Geo& g, const F& f) {
  at::parallel_for(0, g.segments(), grain_for(g.seg_len()), [&](int64_t b, int64_t e) {
    if (g.cl)
      f(std::true_type{}, b, e);
    else
      f(std::false_type{}, b, e);
  });
}

// ---------------------------------------------------------------------------------------------
// Deterministic per-channel reductions: P partials of C channels ([P][C] arrays, partial k
// covering count[k] elements), merged pairwise in a fixed tree.

template <typename A>
void merge_welford(int64_t P, int64_t C, std::vector<A>& mean, std::vector<A>& m2, std::vector<int64_t>& count,
                   A* out_mean, A* out_var) {
  for (int64_t step = 1; step < P; step *= 2) {
    for (int64_t i = 0; i + step < P; i += 2 * step) {
      const int64_t j = i + step;
      const int64_t na = count[i], nb = count[j], n = na + nb;
      count[i] = n;
      if (nb == 0) continue;
      const A fb = A(nb) / A(n), fab = A(na) * A(nb) / A(n);
      A* ma = mean.data() + i * C;
      A* qa = m2.data() + i * C;
      const A* mb = mean.data() + j * C;
      const A* qb = m2.data() + j * C;
      for (int64_t c = 0; c < C; ++c) {
        const A delta = mb[c] - ma[c];
        ma[c] = ma[c] + delta * fb;
        qa[c] = qa[c] + qb[c] + delta * delta * fab;
      }
    }
  }
  const int64_t n = P > 0 ? count[0] : 0;
  for (int64_t c = 0; c < C; ++c) {
    if (n == 0) {
      out_mean[c] = out_var[c] = std::numeric_limits<A>::quiet_NaN();  // as torch's mean of nothing
    } else {
      out_mean[c] = mean[c];
      out_var[c] = m2[c] / A(n);
    }
  }
}

template <typename A>
void merge_sum(int64_t P, int64_t C, std::vector<A>& sum, A* out) {
  for (int64_t step = 1; step < P; step *= 2)
    for (int64_t i = 0; i + step < P; i += 2 * step)
      for (int64_t c = 0; c < C; ++c) sum[i * C + c] += sum[(i + step) * C + c];
  for (int64_t c = 0; c < C; ++c) out[c] = P > 0 ? sum[c] : A(0);
}

// Rows of a channels_last statistics chunk: a function of the shape only (determinism), at least
// 128, and at most 256 chunks (bounds the [P][C] partials).
int64_t rows_per_chunk(int64_t rows) { return std::max<int64_t>(128, (rows + 255) / 256); }

// Welford state of one vector of lanes.
template <typename V>
inline void welford_step(const V& u, const V& inv_n, V& mean, V& m2) {
  const V d = u - mean;
  mean = at::vec::fmadd(d, inv_n, mean);
  m2 = at::vec::fmadd(d, u - mean, m2);
}

// Chan merge of (nb, mb, qb) into (na, ma, qa), scalars.
template <typename A>
inline void chan_merge(int64_t& na, A& ma, A& qa, int64_t nb, A mb, A qb) {
  if (nb == 0) return;
  const int64_t n = na + nb;
  const A delta = mb - ma;
  ma += delta * (A(nb) / A(n));
  qa += qb + delta * delta * (A(na) * A(nb) / A(n));
  na = n;
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// out[i] = round_T(x[i] + t[i]) (or x[i] when t is null), stored as Out (T or its acc type):
// the GEMM operand s, flat over tensors of one memory format.
template <typename T, typename Out>
void operand_kernel(const T* x, const T* t, Out* out, int64_t numel) {
  using B = Block<T>;
  using V = typename B::V;
  constexpr int64_t kW = B::kW;
  at::parallel_for(0, (numel + kW - 1) / kW, grain_for(kW), [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t i = blk * kW, n = std::min(kW, numel - i);
      V a, b, ta, tb;
      if (n == kW) {
        B::load(x + i, a, b);
        if (t) B::load(t + i, ta, tb);
      } else {
        B::load(x + i, n, a, b);
        if (t) B::load(t + i, n, ta, tb);
      }
      if (t) {
        a = a + ta;
        b = b + tb;
        B::round(a, b);
      }
      if (n == kW)
        Block<Out>::store(out + i, a, b);
      else
        Block<Out>::store(out + i, n, a, b);
    }
  });
}

// y = bn_act(v), v = in + bias rounded to T (In = acc: a GEMM result) or v = in (In = T: pre).
// y may alias in (same element read before written).
template <typename T, typename In>
void fwd_kernel(const Geo& g, const In* in, const at::opmath_type<T>* bias, const at::opmath_type<T>* scale,
                const at::opmath_type<T>* shift, int act, bool act_first, T* y) {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  constexpr int64_t kW = Block<T>::kW;
  constexpr bool kRound = !std::is_same_v<In, T>;
  static_assert(Block<In>::kW == kW, "block widths must agree");
  const int64_t len = g.seg_len();
  for_segments(g, [&](auto cl_tag, int64_t sb, int64_t se) {
    constexpr bool kCL = decltype(cl_tag)::value;
    for (int64_t s = sb; s < se; ++s) {
      const int64_t c = kCL ? 0 : s % g.C;
      const ChanVec<A, kCL> vb(bias, c), vs(scale, c), vh(shift, c);
      const int64_t off = s * len;
      for (int64_t i = 0; i < len; i += kW) {
        const int64_t n = std::min(kW, len - i);
        V a, b, sa, sb2, ha, hb;
        if (n == kW)
          Block<In>::load(in + off + i, a, b);
        else
          Block<In>::load(in + off + i, n, a, b);
        if (bias) {
          V ba, bb;
          vb.get(i, n, ba, bb);
          a = a + ba;
          b = b + bb;
        }
        if constexpr (kRound) Block<T>::round(a, b);
        vs.get(i, n, sa, sb2);
        vh.get(i, n, ha, hb);
        a = bn_act(a, sa, ha, act, act_first);
        b = bn_act(b, sb2, hb, act, act_first);
        if (n == kW)
          Block<T>::store(y + off + i, a, b);
        else
          Block<T>::store(y + off + i, n, a, b);
      }
    }
  });
}

// pre = round_T(G + bias); mean/var (biased) over (N, H, W) of u = act(pre) if act_first else pre.
// pre may alias G.
template <typename T>
void stats_kernel(const Geo& g, const at::opmath_type<T>* G, const at::opmath_type<T>* bias, int act,
                  bool act_first, T* pre, at::opmath_type<T>* out_mean, at::opmath_type<T>* out_var) {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  using BA = Block<A>;
  constexpr int64_t kW = Block<T>::kW;
  const int64_t C = g.C;
  // v (rounded pre) and u of the block at flat offset `off` (n valid elements).
  auto block = [&]<bool kCL>(const ChanVec<A, kCL>& vb, int64_t off, int64_t i, int64_t n, V& ua, V& ub) {
    V a, b;
    if (n == kW)
      BA::load(G + off + i, a, b);
    else
      BA::load(G + off + i, n, a, b);
    if (bias) {
      V ba, bb;
      vb.get(i, n, ba, bb);
      a = a + ba;
      b = b + bb;
    }
    Block<T>::round(a, b);
    if (n == kW)
      Block<T>::store(pre + off + i, a, b);
    else
      Block<T>::store(pre + off + i, n, a, b);
    ua = act_first ? act_fwd(a, act) : a;
    ub = act_first ? act_fwd(b, act) : b;
  };
  if (g.cl) {
    const int64_t rows = g.N * g.L;
    const int64_t R = rows_per_chunk(rows), P = (rows + R - 1) / R;
    std::vector<A> pm(P * C), pq(P * C);
    std::vector<int64_t> cnt(P);
    at::parallel_for(0, P, grain_for(R * C), [&](int64_t kb, int64_t ke) {
      std::vector<A> m(C + kW), q(C + kW);  // padded: full-block loads/stores stay in bounds
      const ChanVec<A, true> vb(bias, 0);
      for (int64_t k = kb; k < ke; ++k) {
        std::fill(m.begin(), m.end(), A(0));
        std::fill(q.begin(), q.end(), A(0));
        const int64_t r0 = k * R, r1 = std::min(rows, r0 + R);
        for (int64_t r = r0; r < r1; ++r) {
          const V inv(A(1) / A(r - r0 + 1));
          for (int64_t i = 0; i < C; i += kW) {
            const int64_t n = std::min(kW, C - i);
            V ua, ub, ma, mb, qa, qb;
            block(vb, r * C, i, n, ua, ub);
            BA::load(m.data() + i, ma, mb);
            BA::load(q.data() + i, qa, qb);
            welford_step(ua, inv, ma, qa);
            welford_step(ub, inv, mb, qb);
            BA::store(m.data() + i, ma, mb);
            BA::store(q.data() + i, qa, qb);
          }
        }
        std::copy(m.begin(), m.begin() + C, pm.begin() + k * C);
        std::copy(q.begin(), q.begin() + C, pq.begin() + k * C);
        cnt[k] = r1 - r0;
      }
    });
    merge_welford<A>(P, C, pm, pq, cnt, out_mean, out_var);
  } else {
    const int64_t L = g.L, P = g.N;
    std::vector<A> pm(P * C), pq(P * C);
    std::vector<int64_t> cnt(P, L);
    at::parallel_for(0, g.N * C, grain_for(L), [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const ChanVec<A, false> vb(bias, s % C);
        const int64_t off = s * L, full = L / kW;
        V ma(A(0)), mb(A(0)), qa(A(0)), qb(A(0));
        for (int64_t k = 0; k < full; ++k) {
          V ua, ub;
          block(vb, off, k * kW, kW, ua, ub);
          const V inv(A(1) / A(k + 1));
          welford_step(ua, inv, ma, qa);
          welford_step(ub, inv, mb, qb);
        }
        // Lanes (each `full` elements), then the tail element by element, in a fixed order.
        A lm[kW], lq[kW];
        BA::store(lm, ma, mb);
        BA::store(lq, qa, qb);
        int64_t n_acc = full;
        A m_acc = lm[0], q_acc = lq[0];
        for (int64_t l = 1; l < kW; ++l) chan_merge(n_acc, m_acc, q_acc, full, lm[l], lq[l]);
        if (full == 0) n_acc = 0, m_acc = A(0), q_acc = A(0);
        const int64_t tail = L - full * kW;
        if (tail > 0) {
          V ua, ub;
          block(vb, off, full * kW, tail, ua, ub);
          A tu[kW];
          BA::store(tu, ua, ub);
          for (int64_t l = 0; l < tail; ++l) chan_merge(n_acc, m_acc, q_acc, int64_t(1), tu[l], A(0));
        }
        pm[s] = m_acc;  // partial n = s / C, channel s % C
        pq[s] = q_acc;
      }
    });
    merge_welford<A>(P, C, pm, pq, cnt, out_mean, out_var);
  }
}

// dpre = ca*g + cb*(u - mean) + cd [* act'(pre) if act_first], rounded to T, stored as Out (T or
// its acc type: the GEMM operand); dbias (nullable) = per-channel sum of the rounded dpre.
template <typename T, typename Out>
void dpre_kernel(const Geo& g, const T* dy, const T* pre, const BwdVecs& P, int act, bool act_first, Out* out,
                 at::opmath_type<T>* dbias) {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  using BA = Block<A>;
  constexpr int64_t kW = Block<T>::kW;
  const A* scale = static_cast<const A*>(P.scale);
  const A* shift = static_cast<const A*>(P.shift);
  const A* mean = static_cast<const A*>(P.mean);
  const A* ca = static_cast<const A*>(P.ca);
  const A* cb = static_cast<const A*>(P.cb);
  const A* cd = static_cast<const A*>(P.cd);
  const int64_t C = g.C, len = g.seg_len();
  auto one = [&](const V& dyv, const V& p, const V& s, const V& h, const V& m, const V& a_, const V& b_,
                 const V& d_) -> V {
    if (act_first) return (a_ * dyv + b_ * (act_fwd(p, act) - m) + d_) * act_grad(p, act);
    return a_ * (dyv * act_grad(s * p + h, act)) + b_ * (p - m) + d_;
  };
  // Segment s: computes, stores, and (if sums) adds the rounded dpre to sums[0..kW) (NCHW: lanes)
  // or sums[i..] (channels_last: per channel).
  auto segment = [&](auto cl_tag, int64_t s, A* sums) {
    constexpr bool kCL = decltype(cl_tag)::value;
    const int64_t c = kCL ? 0 : s % C;
    const ChanVec<A, kCL> vs(scale, c), vh(shift, c), vm(mean, c), va(ca, c), vb(cb, c), vd(cd, c);
    const int64_t off = s * len;
    for (int64_t i = 0; i < len; i += kW) {
      const int64_t n = std::min(kW, len - i);
      V ya, yb, pa, pb, sa, sb, ha, hb, ma, mb, aa, ab, ba, bb, da, db;
      if (n == kW) {
        Block<T>::load(dy + off + i, ya, yb);
        Block<T>::load(pre + off + i, pa, pb);
      } else {
        Block<T>::load(dy + off + i, n, ya, yb);
        Block<T>::load(pre + off + i, n, pa, pb);
      }
      vs.get(i, n, sa, sb);
      vh.get(i, n, ha, hb);
      vm.get(i, n, ma, mb);
      va.get(i, n, aa, ab);
      vb.get(i, n, ba, bb);
      vd.get(i, n, da, db);
      V ra = one(ya, pa, sa, ha, ma, aa, ba, da);
      V rb = one(yb, pb, sb, hb, mb, ab, bb, db);
      Block<T>::round(ra, rb);
      if (n == kW)
        Block<Out>::store(out + off + i, ra, rb);
      else
        Block<Out>::store(out + off + i, n, ra, rb);
      if (sums) {
        // partial loads zero the lanes past n, so the padded lanes add nothing
        if (n < kW) {
          A tmp[kW];
          BA::store(tmp, ra, rb);
          std::fill(tmp + n, tmp + kW, A(0));
          BA::load(tmp, ra, rb);
        }
        A* acc = kCL ? sums + i : sums;
        V qa, qb;
        BA::load(acc, qa, qb);
        BA::store(acc, qa + ra, qb + rb);
      }
    }
  };
  if (dbias == nullptr) {
    for_segments(g, [&](auto cl_tag, int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) segment(cl_tag, s, nullptr);
    });
    return;
  }
  if (g.cl) {
    const int64_t rows = g.N * g.L;
    const int64_t R = rows_per_chunk(rows), Pn = (rows + R - 1) / R;
    std::vector<A> part(Pn * C);
    at::parallel_for(0, Pn, grain_for(R * C), [&](int64_t kb, int64_t ke) {
      std::vector<A> acc(C + kW);
      for (int64_t k = kb; k < ke; ++k) {
        std::fill(acc.begin(), acc.end(), A(0));
        const int64_t r1 = std::min(rows, (k + 1) * R);
        for (int64_t r = k * R; r < r1; ++r) segment(std::true_type{}, r, acc.data());
        std::copy(acc.begin(), acc.begin() + C, part.begin() + k * C);
      }
    });
    merge_sum<A>(Pn, C, part, dbias);
  } else {
    std::vector<A> part(g.N * C);
    at::parallel_for(0, g.N * C, grain_for(g.L), [&](int64_t sb, int64_t se) {
      A lanes[kW];
      for (int64_t s = sb; s < se; ++s) {
        std::fill(lanes, lanes + kW, A(0));
        segment(std::false_type{}, s, lanes);
        A t = A(0);
        for (int64_t l = 0; l < kW; ++l) t += lanes[l];
        part[s] = t;
      }
    });
    merge_sum<A>(g.N, C, part, dbias);
  }
}

// Non-template entry points of the region (the templates above are instantiated here, in it).

void operand_vec(const Tensor& x, const Tensor* t, const Tensor& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pw_operand", [&] {
    operand_kernel<scalar_t, at::opmath_type<scalar_t>>(x.const_data_ptr<scalar_t>(),
                                                        t ? t->const_data_ptr<scalar_t>() : nullptr,
                                                        s.data_ptr<at::opmath_type<scalar_t>>(), x.numel());
  });
}

void stats_vec(const Geo& g, const Tensor& G, const Tensor* bias, const Tensor& pre, int act, bool act_first,
               const Tensor& mean, const Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gemm_stats_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t>(g, G.const_data_ptr<A>(), bias ? bias->const_data_ptr<A>() : nullptr, act, act_first,
                           pre.data_ptr<scalar_t>(), mean.data_ptr<A>(), var.data_ptr<A>());
  });
}

// y = bn_act(v): v = round(in + bias) when `in` is in the acc dtype (a GEMM result), v = in when
// `in` has y's dtype (pre: bn_act_fwd).
void fwd_vec(const Geo& g, const Tensor& in, const Tensor* bias, const Tensor& scale, const Tensor& shift,
             const Tensor& y, int act, bool act_first) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* b = bias ? bias->const_data_ptr<A>() : nullptr;
    if (in.scalar_type() == y.scalar_type())
      fwd_kernel<scalar_t, scalar_t>(g, in.const_data_ptr<scalar_t>(), b, scale.const_data_ptr<A>(),
                                     shift.const_data_ptr<A>(), act, act_first, y.data_ptr<scalar_t>());
    else
      fwd_kernel<scalar_t, A>(g, in.const_data_ptr<A>(), b, scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
                              act, act_first, y.data_ptr<scalar_t>());
  });
}

// dpre into `out` (pre's dtype, or the acc dtype: the GEMM operand); dbias (nullable).
void dpre_vec(const Geo& g, const Tensor& dy, const Tensor& pre, const BwdVecs& P, int act, bool act_first,
              const Tensor& out, const Tensor* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "bn_act_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    A* db = dbias ? dbias->data_ptr<A>() : nullptr;
    if (out.scalar_type() == pre.scalar_type())
      dpre_kernel<scalar_t, scalar_t>(g, dy.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(), P, act,
                                      act_first, out.data_ptr<scalar_t>(), db);
    else
      dpre_kernel<scalar_t, A>(g, dy.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(), P, act, act_first,
                               out.data_ptr<A>(), db);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace convmixer_kernels

#if defined(CMK_PW_X86_AVX2)
#pragma GCC pop_options
#endif
// =============================================================================================

namespace convmixer_kernels {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Which epilogues run: the vectorized kernels above, or (CPU without AVX2, or the baseline asked
// for) the same arithmetic composed of ATen ops, as in torch_ops.py.

bool cpu_has_avx2() {
#if defined(CMK_PW_X86_AVX2)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  }();
  return ok;
#else
  return true;  // the vec headers were compiled for the baseline of this architecture
#endif
}

bool is_default_isa(const char* s) {
  if (s == nullptr) return false;
  std::string l;
  for (const char* q = s; *q; ++q) l += static_cast<char>(std::tolower(static_cast<unsigned char>(*q)));
  return l == "default" || l == "no avx";
}

bool use_vec_kernels() {
  if (!cpu_has_avx2()) return false;
  if (is_default_isa(std::getenv("CONVMIXER_KERNELS_CPU_ISA"))) return false;  // read per call: tests set it
  static const bool aten_default = is_default_isa(at::get_cpu_capability().c_str());
  return !aten_default;
}

namespace ref {  // the composite path; every tensor in the acc dtype unless said otherwise

Tensor per_channel(const Tensor& v) { return v.view({1, -1, 1, 1}); }

Tensor rounded(const Tensor& v, at::ScalarType storage) {
  return storage == v.scalar_type() ? v : v.to(storage).to(v.scalar_type());
}

Tensor act_fwd(const Tensor& v, int64_t act) {
  switch (act) {
    case kRelu: return at::relu(v);
    case kGelu: return at::gelu(v);
    case kGeluTanh: return at::gelu(v, "tanh");
    case kSilu: return at::silu(v);
    default: return v;
  }
}

Tensor act_grad(const Tensor& v, int64_t act) {
  switch (act) {
    case kRelu: return (v > 0).to(v.scalar_type());
    case kGelu:
      return 0.5 * (1.0 + at::erf(v * M_SQRT1_2)) + v * at::exp(-0.5 * v * v) * (M_2_SQRTPI * M_SQRT1_2 * 0.5);
    case kGeluTanh: {
      const double k0 = M_2_SQRTPI * M_SQRT1_2, k1 = 0.044715;
      const Tensor t = at::tanh(k0 * (v + k1 * v * v * v));
      return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * v * v);
    }
    case kSilu: {
      const Tensor s = at::sigmoid(v);
      return s * (1.0 + v * (1.0 - s));
    }
    default: return at::ones_like(v);
  }
}

Tensor bn_act(const Tensor& v, const Tensor& scale, const Tensor& shift, int64_t act, bool act_first) {
  return act_first ? per_channel(scale) * act_fwd(v, act) + per_channel(shift)
                   : act_fwd(per_channel(scale) * v + per_channel(shift), act);
}

}  // namespace ref

// ---------------------------------------------------------------------------------------------
// Argument checks (generic ones from common.h; these add the GEMM-specific shapes).

bool check_x(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got one on ", x.device());
  check_storage_dtype(x, name, /*allow_double=*/true);
  return is_channels_last(x, name);  // 4-D and NCHW- or channels_last-contiguous
}

at::MemoryFormat format_of(bool cl) { return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }

// An activation tensor of x's dtype, device and memory format with the given sizes (dy, pre).
void check_act_tensor(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef sizes, bool cl) {
  check_device(t, name, x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, ": expected shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(format_of(cl)), name, ": expected the memory format of x (",
              cl ? "channels_last" : "NCHW-contiguous", "), got strides ", t.strides());
}

// The GEMM weight (C_out, C_in, k, k) in x's storage dtype, contiguous; k = 1 for pw, any k >= 1
// (the patch size) for the stem (pass k = 0).  Returns C_out.
int64_t check_gemm_weight(const Tensor& w, const Tensor& x, int64_t k) {
  check_device(w, "weight", x.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
              " (the storage dtype of x), got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == w.size(3) && (k == 0 || w.size(2) == k) &&
                  w.size(2) >= 1 && w.size(0) >= 1,
              "weight: expected shape (C_out, ", x.size(1), ", ", k == 0 ? "p, p" : "1, 1", ") with ",
              x.size(1), " = the channels of x, got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "weight: expected a contiguous tensor");
  return w.size(0);
}

// A per-output-channel vector (C_out,), acc dtype, contiguous.
void check_cvec(const Tensor& v, const char* name, const Tensor& x, int64_t C) {
  check_device(v, name, x.device());
  const auto acc = acc_type_for(x.scalar_type());
  TORCH_CHECK(v.scalar_type() == acc, name, ": expected dtype ", acc, ", got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, name, ": expected shape (", C, ",) (one value per output channel), got ",
              v.sizes());
  TORCH_CHECK(v.is_contiguous(), name, ": expected a contiguous tensor");
}

// Stem weight and x's size; returns C_out and sets the patch size p.
int64_t check_stem(const Tensor& x, const Tensor& weight, int64_t& p) {
  const int64_t Co = check_gemm_weight(weight, x, 0);
  p = weight.size(2);
  TORCH_CHECK(x.size(2) >= p && x.size(3) >= p, "x: expected H and W >= p = ", p,
              " (the patch size of weight), got H = ", x.size(2), ", W = ", x.size(3));
  return Co;
}

void check_bwd_vecs(const Tensor& x, int64_t C, const Tensor& scale, const Tensor& shift, const Tensor& mean,
                    const Tensor& ca, const Tensor& cb, const Tensor& cd) {
  check_cvec(scale, "scale", x, C);
  check_cvec(shift, "shift", x, C);
  check_cvec(mean, "mean", x, C);
  check_cvec(ca, "ca", x, C);
  check_cvec(cb, "cb", x, C);
  check_cvec(cd, "cd", x, C);
}

const Tensor* opt(const std::optional<Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// ---------------------------------------------------------------------------------------------
// GEMM helpers (ATen).  Views: channels_last (N, C, H, W) -> (N*H*W, C); NCHW -> (N, C, H*W).

Tensor rows(const Tensor& t) { return t.permute({0, 2, 3, 1}).view({t.size(0) * t.size(2) * t.size(3), t.size(1)}); }
Tensor planes(const Tensor& t) { return t.view({t.size(0), t.size(1), t.size(2) * t.size(3)}); }

// G = W2d applied over the channels of S (both in the same format; W2d (C_out, C_in)).
void gemm_channels(const Tensor& S, const Tensor& W2d, Tensor& G, bool cl) {
  if (cl) {
    Tensor g = rows(G);
    at::mm_out(g, rows(S), W2d.t());
  } else {
    Tensor g = planes(G);
    at::bmm_out(g, W2d.expand({S.size(0), W2d.size(0), W2d.size(1)}), planes(S));
  }
}

// The GEMM operand s = x [+ t] in the compute dtype (acc): x itself when no copy is needed.
Tensor pw_operand(const Tensor& x, const Tensor* t, bool cl) {
  const auto acc = acc_type_for(x.scalar_type());
  if (t == nullptr && x.scalar_type() == acc) return x;
  Tensor s = at::empty(x.sizes(), x.options().dtype(acc).memory_format(format_of(cl)));
  if (use_vec_kernels())
    operand_vec(x, t, s);
  else
    s.copy_(t ? (x.to(acc) + t->to(acc)).to(x.scalar_type()) : x);
  return s;
}

// The GEMM output buffer for a result `out` of storage dtype: `out` itself when the storage
// dtype is the compute dtype, else an acc-dtype tensor of the same shape and format.
Tensor gemm_buffer(const Tensor& out, bool cl) {
  const auto acc = acc_type_for(out.scalar_type());
  if (out.scalar_type() == acc) return out;
  return at::empty(out.sizes(), out.options().dtype(acc).memory_format(format_of(cl)));
}

// Stem: x's full p x p patches as rows of an (N*Ho*Wo, K) matrix in dtype dt (the one copy of the
// stem: re-indexing plus conversion).  K order (c, i, j) for NCHW x (the weight's own order),
// (i, j, c) for channels_last x (runs of p*C contiguous elements; the weight is permuted to match).
Tensor patch_view(const Tensor& x, int64_t p, bool cl) {  // the permuted 6-D view of the patches
  const int64_t N = x.size(0), C = x.size(1), Ho = x.size(2) / p, Wo = x.size(3) / p;
  Tensor v = x.narrow(2, 0, Ho * p).narrow(3, 0, Wo * p).view({N, C, Ho, p, Wo, p});
  return cl ? v.permute({0, 2, 4, 3, 5, 1}) : v.permute({0, 2, 4, 1, 3, 5});
}

Tensor im2col(const Tensor& x, int64_t p, bool cl, at::ScalarType dt) {
  Tensor src = patch_view(x, p, cl);
  Tensor a = at::empty(src.sizes(), x.options().dtype(dt));
  a.copy_(src);
  return a.view({x.size(0) * (x.size(2) / p) * (x.size(3) / p), x.size(1) * p * p});
}

Tensor stem_weight_matrix(const Tensor& w, bool cl, at::ScalarType dt) {  // (C_out, K) in im2col's K order
  const int64_t K = w.size(1) * w.size(2) * w.size(3);
  return (cl ? w.permute({0, 2, 3, 1}).reshape({w.size(0), K}) : w.view({w.size(0), K})).to(dt);
}

// G (N, C_out, Ho, Wo) in x's format = patches @ Wk^T.
void stem_gemm(const Tensor& A2d, const Tensor& Wk, Tensor& G, bool cl) {
  if (cl) {
    Tensor g = rows(G);
    at::mm_out(g, A2d, Wk.t());
  } else {
    const int64_t N = G.size(0), L = G.size(2) * G.size(3);
    Tensor g = planes(G);
    at::bmm_out(g, Wk.expand({N, Wk.size(0), Wk.size(1)}), A2d.view({N, L, A2d.size(1)}).transpose(1, 2));
  }
}

// ---------------------------------------------------------------------------------------------
// Shared tails of the entry points: the vectorized kernels, or their ATen composition.

// Writes a compute-dtype result into an output of the storage dtype (no-op when it is the output).
void finish(const Tensor& out, const Tensor& buf) {
  if (!buf.is_same(out)) out.copy_(buf);
}

// pre = round(G + bias), stats; G may be pre itself.
void run_stats(const Tensor& G, const Tensor* bias, const Tensor& pre, bool cl, int64_t act, bool act_first,
               const Tensor& mean, const Tensor& var) {
  if (use_vec_kernels()) {
    stats_vec(geo_of(pre, cl), G, bias, pre, static_cast<int>(act), act_first, mean, var);
    return;
  }
  const Tensor v = ref::rounded(bias ? G + ref::per_channel(*bias) : G, pre.scalar_type());
  const Tensor u = act_first ? ref::act_fwd(v, act) : v;
  mean.copy_(u.mean({0, 2, 3}));
  var.copy_((u - ref::per_channel(mean)).square().mean({0, 2, 3}));
  pre.copy_(v);
}

// y = bn_act(v), v = round(in + bias) (in: a GEMM result in the acc dtype; may be y itself) or
// v = in (in: pre, y's dtype).
void run_fwd(const Tensor& in, const Tensor* bias, const Tensor& scale, const Tensor& shift, const Tensor& y,
             bool cl, int64_t act, bool act_first) {
  if (use_vec_kernels()) {
    fwd_vec(geo_of(y, cl), in, bias, scale, shift, y, static_cast<int>(act), act_first);
    return;
  }
  const auto acc = acc_type_for(y.scalar_type());
  const Tensor v = ref::rounded(bias ? in.to(acc) + ref::per_channel(*bias) : in.to(acc), y.scalar_type());
  y.copy_(ref::bn_act(v, scale, shift, act, act_first));
}

// dpre into `out` (pre's dtype, or the acc dtype with values rounded to pre's: the GEMM
// operand); dbias (nullable) = its per-channel sum.
void run_dpre(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift, const Tensor& mean,
              const Tensor& ca, const Tensor& cb, const Tensor& cd, int64_t act, bool act_first, bool cl,
              const Tensor& out, const Tensor* dbias) {
  if (use_vec_kernels()) {
    const BwdVecs P{scale.const_data_ptr(), shift.const_data_ptr(), mean.const_data_ptr(),
                    ca.const_data_ptr(),    cb.const_data_ptr(),    cd.const_data_ptr()};
    dpre_vec(geo_of(pre, cl), dy, pre, P, static_cast<int>(act), act_first, out, dbias);
    return;
  }
  const auto acc = acc_type_for(pre.scalar_type());
  const Tensor p = pre.to(acc), g0 = dy.to(acc);
  Tensor d;
  if (act_first) {
    d = (ref::per_channel(ca) * g0 + ref::per_channel(cb) * (ref::act_fwd(p, act) - ref::per_channel(mean)) +
         ref::per_channel(cd)) *
        ref::act_grad(p, act);
  } else {
    const Tensor g = g0 * ref::act_grad(ref::per_channel(scale) * p + ref::per_channel(shift), act);
    d = ref::per_channel(ca) * g + ref::per_channel(cb) * (p - ref::per_channel(mean)) + ref::per_channel(cd);
  }
  d = ref::rounded(d, pre.scalar_type());
  out.copy_(d);
  if (dbias) dbias->copy_(d.sum({0, 2, 3}));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

std::tuple<Tensor, Tensor, Tensor> pw_gemm_stats_cpu(const Tensor& x, const std::optional<Tensor>& t,
                                                     const Tensor& weight, const std::optional<Tensor>& bias,
                                                     int64_t act, bool act_first) {
  const bool cl = check_x(x, "x");
  if (opt(t)) check_like_x(*t, "t", x, cl);
  const int64_t Co = check_gemm_weight(weight, x, 1);
  if (opt(bias)) check_cvec(*bias, "bias", x, Co);
  check_act(act);
  const auto acc = acc_type_for(x.scalar_type());
  Tensor pre = new_output({x.size(0), Co, x.size(2), x.size(3)}, x.options(), format_of(cl));
  Tensor mean = new_output({Co}, x.options().dtype(acc));
  Tensor var = new_output({Co}, x.options().dtype(acc));
  Tensor G = gemm_buffer(pre, cl);
  gemm_channels(pw_operand(x, opt(t), cl), weight.view({Co, x.size(1)}).to(acc), G, cl);
  run_stats(G, opt(bias), pre, cl, act, act_first, mean, var);
  return {pre, mean, var};
}

Tensor pw_fwd_cpu(const Tensor& x, const std::optional<Tensor>& t, const Tensor& weight,
                  const std::optional<Tensor>& bias, const Tensor& scale, const Tensor& shift, int64_t act,
                  bool act_first) {
  const bool cl = check_x(x, "x");
  if (opt(t)) check_like_x(*t, "t", x, cl);
  const int64_t Co = check_gemm_weight(weight, x, 1);
  if (opt(bias)) check_cvec(*bias, "bias", x, Co);
  check_cvec(scale, "scale", x, Co);
  check_cvec(shift, "shift", x, Co);
  check_act(act);
  const auto acc = acc_type_for(x.scalar_type());
  Tensor y = new_output({x.size(0), Co, x.size(2), x.size(3)}, x.options(), format_of(cl));
  Tensor G = gemm_buffer(y, cl);
  gemm_channels(pw_operand(x, opt(t), cl), weight.view({Co, x.size(1)}).to(acc), G, cl);
  run_fwd(G, opt(bias), scale, shift, y, cl, act, act_first);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> pw_bwd_cpu(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& t,
                                              const Tensor& pre, const Tensor& weight, const Tensor& scale,
                                              const Tensor& shift, const Tensor& mean, const Tensor& ca,
                                              const Tensor& cb, const Tensor& cd, int64_t act, bool act_first) {
  const bool cl = check_x(x, "x");
  if (opt(t)) check_like_x(*t, "t", x, cl);
  const int64_t Co = check_gemm_weight(weight, x, 1);
  const int64_t N = x.size(0), Ci = x.size(1);
  const std::vector<int64_t> out_sizes{N, Co, x.size(2), x.size(3)};
  check_act_tensor(dy, "dy", x, out_sizes, cl);
  check_act_tensor(pre, "pre", x, out_sizes, cl);
  check_bwd_vecs(x, Co, scale, shift, mean, ca, cb, cd);
  check_act(act);
  const auto acc = acc_type_for(x.scalar_type());
  Tensor ds = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor dweight = new_output(weight.sizes(), weight.options());
  Tensor dbias = new_output({Co}, x.options().dtype(acc));
  Tensor D = at::empty(pre.sizes(), pre.options().dtype(acc).memory_format(format_of(cl)));
  run_dpre(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first, cl, D, &dbias);
  Tensor S = pw_operand(x, opt(t), cl);
  Tensor W2d = weight.view({Co, Ci}).to(acc);
  // ds = conv1x1 backward of dpre: channels_last ds = D @ W; NCHW ds_n = W^T @ D_n.
  Tensor dsG = gemm_buffer(ds, cl);
  if (cl) {
    Tensor g = rows(dsG);
    at::mm_out(g, rows(D), W2d);
  } else {
    Tensor g = planes(dsG);
    at::bmm_out(g, W2d.t().expand({N, Ci, Co}), planes(D));
  }
  finish(ds, dsG);
  // dweight = D^T @ S (channels_last: one GEMM over M rows; NCHW: per image, summed in order).
  Tensor dW2d = dweight.view({Co, Ci});
  Tensor dWacc = dweight.scalar_type() == acc ? dW2d : at::empty({Co, Ci}, x.options().dtype(acc));
  if (cl) {
    at::mm_out(dWacc, rows(D).t(), rows(S));
  } else {
    Tensor per = at::bmm(planes(D), planes(S).transpose(1, 2));  // (N, Co, Ci)
    AT_DISPATCH_FLOATING_TYPES(acc, "pw_bwd_dweight", [&] {
      sum_batches<scalar_t>(per.const_data_ptr<scalar_t>(), N, Co * Ci, dWacc.data_ptr<scalar_t>());
    });
  }
  finish(dW2d, dWacc);
  return {ds, dweight, dbias};
}

std::tuple<Tensor, Tensor, Tensor> stem_gemm_stats_cpu(const Tensor& x, const Tensor& weight,
                                                       const std::optional<Tensor>& bias, int64_t act,
                                                       bool act_first) {
  const bool cl = check_x(x, "x");
  int64_t p = 0;
  const int64_t Co = check_stem(x, weight, p);
  if (opt(bias)) check_cvec(*bias, "bias", x, Co);
  check_act(act);
  const auto acc = acc_type_for(x.scalar_type());
  Tensor pre = new_output({x.size(0), Co, x.size(2) / p, x.size(3) / p}, x.options(), format_of(cl));
  Tensor mean = new_output({Co}, x.options().dtype(acc));
  Tensor var = new_output({Co}, x.options().dtype(acc));
  Tensor G = gemm_buffer(pre, cl);
  stem_gemm(im2col(x, p, cl, acc), stem_weight_matrix(weight, cl, acc), G, cl);
  run_stats(G, opt(bias), pre, cl, act, act_first, mean, var);
  return {pre, mean, var};
}

Tensor stem_fwd_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& scale,
                    const Tensor& shift, int64_t act, bool act_first) {
  const bool cl = check_x(x, "x");
  int64_t p = 0;
  const int64_t Co = check_stem(x, weight, p);
  if (opt(bias)) check_cvec(*bias, "bias", x, Co);
  check_cvec(scale, "scale", x, Co);
  check_cvec(shift, "shift", x, Co);
  check_act(act);
  const auto acc = acc_type_for(x.scalar_type());
  Tensor y = new_output({x.size(0), Co, x.size(2) / p, x.size(3) / p}, x.options(), format_of(cl));
  Tensor G = gemm_buffer(y, cl);
  stem_gemm(im2col(x, p, cl, acc), stem_weight_matrix(weight, cl, acc), G, cl);
  run_fwd(G, opt(bias), scale, shift, y, cl, act, act_first);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> stem_bwd_cpu(const Tensor& dy, const Tensor& x, const Tensor& pre,
                                                const Tensor& weight, const Tensor& scale, const Tensor& shift,
                                                const Tensor& mean, const Tensor& ca, const Tensor& cb,
                                                const Tensor& cd, int64_t act, bool act_first, bool need_dx) {
  const bool cl = check_x(x, "x");
  int64_t p = 0;
  const int64_t Co = check_stem(x, weight, p);
  const int64_t N = x.size(0), Ho = x.size(2) / p, Wo = x.size(3) / p, L = Ho * Wo;
  const std::vector<int64_t> out_sizes{N, Co, Ho, Wo};
  check_act_tensor(dy, "dy", x, out_sizes, cl);
  check_act_tensor(pre, "pre", x, out_sizes, cl);
  check_bwd_vecs(x, Co, scale, shift, mean, ca, cb, cd);
  check_act(act);
  const auto acc = acc_type_for(x.scalar_type());
  Tensor dweight = new_output(weight.sizes(), weight.options());
  Tensor dbias = new_output({Co}, x.options().dtype(acc));
  Tensor D = at::empty(pre.sizes(), pre.options().dtype(acc).memory_format(format_of(cl)));
  run_dpre(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first, cl, D, &dbias);
  Tensor A2d = im2col(x, p, cl, acc);
  const int64_t K = A2d.size(1);
  // dweight (C_out, K) = D^T @ patches, then back to (C_out, C, p, p).
  Tensor dWk;
  if (cl) {
    dWk = at::mm(rows(D).t(), A2d);
  } else {
    Tensor per = at::bmm(planes(D), A2d.view({N, L, K}));  // (N, Co, K)
    dWk = at::empty({Co, K}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "stem_bwd_dweight", [&] {
      sum_batches<scalar_t>(per.const_data_ptr<scalar_t>(), N, Co * K, dWk.data_ptr<scalar_t>());
    });
  }
  const int64_t C = x.size(1);
  dweight.copy_(cl ? dWk.view({Co, p, p, C}).permute({0, 3, 1, 2}) : dWk.view({Co, C, p, p}));
  if (!need_dx) return {x.new_empty({0}), dweight, dbias};
  // dx: patches gradient D @ Wk scattered back to the patch positions, zero beyond the last full patch.
  Tensor Wk = stem_weight_matrix(weight, cl, acc);
  Tensor dA = cl ? at::mm(rows(D), Wk) : at::bmm(planes(D).transpose(1, 2), Wk.expand({N, Co, K}));
  Tensor dx = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor dst = patch_view(dx, p, cl);
  dst.copy_(dA.view(dst.sizes()));
  if (x.size(2) > Ho * p) dx.narrow(2, Ho * p, x.size(2) - Ho * p).zero_();
  if (x.size(3) > Wo * p) dx.narrow(2, 0, Ho * p).narrow(3, Wo * p, x.size(3) - Wo * p).zero_();
  return {dx, dweight, dbias};
}

Tensor bn_act_fwd_cpu(const Tensor& pre, const Tensor& scale, const Tensor& shift, int64_t act, bool act_first) {
  const bool cl = check_x(pre, "pre");
  check_cvec(scale, "scale", pre, pre.size(1));
  check_cvec(shift, "shift", pre, pre.size(1));
  check_act(act);
  Tensor y = new_output(pre.sizes(), pre.options(), format_of(cl));
  run_fwd(pre, nullptr, scale, shift, y, cl, act, act_first);
  return y;
}

Tensor bn_act_bwd_cpu(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift,
                      const Tensor& mean, const Tensor& ca, const Tensor& cb, const Tensor& cd, int64_t act,
                      bool act_first) {
  const bool cl = check_x(pre, "pre");
  check_like_x(dy, "dy", pre, cl);
  check_bwd_vecs(pre, pre.size(1), scale, shift, mean, ca, cb, cd);
  check_act(act);
  Tensor dpre = new_output(pre.sizes(), pre.options(), format_of(cl));
  run_dpre(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first, cl, dpre, nullptr);
  return dpre;
}

}  // namespace cpu
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  using namespace convmixer_kernels::cpu;
  m.impl("pw_gemm_stats", &pw_gemm_stats_cpu);
  m.impl("pw_fwd", &pw_fwd_cpu);
  m.impl("pw_bwd", &pw_bwd_cpu);
  m.impl("stem_gemm_stats", &stem_gemm_stats_cpu);
  m.impl("stem_fwd", &stem_fwd_cpu);
  m.impl("stem_bwd", &stem_bwd_cpu);
  m.impl("bn_act_fwd", &bn_act_fwd_cpu);
  m.impl("bn_act_bwd", &bn_act_bwd_cpu);
}
