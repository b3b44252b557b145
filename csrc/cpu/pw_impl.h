// The vectorized epilogues of the pointwise / stem / elementwise-BN CPU ops (interface:
// pw_kernels.h).  Included once per instruction set by pw_isa_<isa>.cpp, after every other header and
// under that file's target pragma with CPU_CAPABILITY set: ATen's vec headers, included here, then
// give Vectorized<float> the ISA's width (8 floats for AVX2, 16 for AVX-512); the kernels live in an
// anonymous namespace, so each translation unit has its own.  CMK_PW_ISA_NS / CMK_PW_ISA_NAME name
// the build.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace convmixer_kernels {
namespace cpu {
namespace {

using at::Tensor;
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
// Activations (codes as in common.h), forward and derivative, in the accumulation dtype: the
// depthwise kernels' (act_vec.h; see there why both must use the same).
#include "cpu/act_vec.h"

// The kernels take the activation code as `Act act` (a std::integral_constant<int, code>) and the order
// as `First act_first` (a std::bool_constant), from with_act_c: the per-vector choices are made at
// compile time.
template <typename V, int K>
inline V act_fwd(const V& v, std::integral_constant<int, K>) {
  return act_fwd<K, typename V::value_type>(v);
}

template <typename V, int K>
inline V act_grad(const V& v, std::integral_constant<int, K>) {  // d act(v) / dv, relu'(0) = 0
  return act_grad<K, typename V::value_type>(v);
}

template <typename V, typename Act, typename First>
inline V bn_act(const V& pre, const V& scale, const V& shift, Act act, First act_first) {
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
template <typename T, typename In, typename Act, typename First>
void fwd_kernel(const Geo& g, const In* in, const at::opmath_type<T>* bias, const at::opmath_type<T>* scale,
                const at::opmath_type<T>* shift, const T* res, Act act, First act_first, T* y) {
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
        if (res) {  // the block's residual, added before the one rounding to T
          V ra, rb;
          if (n == kW)
            Block<T>::load(res + off + i, ra, rb);
          else
            Block<T>::load(res + off + i, n, ra, rb);
          a = a + ra;
          b = b + rb;
        }
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
template <typename T, typename Act, typename First>
void stats_kernel(const Geo& g, const at::opmath_type<T>* G, const at::opmath_type<T>* bias, Act act,
                  First act_first, T* pre, at::opmath_type<T>* out_mean, at::opmath_type<T>* out_var) {
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
template <typename T, typename Out, typename Act, typename First>
void dpre_kernel(const Geo& g, const T* dy, const T* pre, const BwdVecs& P, Act act, First act_first, Out* out,
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

// Non-template entry points (the templates above are instantiated here, for this ISA).

// body(activation code, act_first), both as compile-time constants.  With the int and the bool passed
// through, the per-vector switch kept the activations out of line: in-process A/B on this project's CPU
// (fp32, 8x256x32x32) the dpre pass took 2.5-5x as long for relu and silu and 1.2x for gelu, the
// forward pass 1.3-1.8x (benchmarks/results/NOTES.md, sixth session).
template <typename F>
void with_act_c(int act, bool act_first, F&& body) {
  with_act(act, [&](auto a) {
    if (act_first)
      body(a, std::true_type{});
    else
      body(a, std::false_type{});
  });
}

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
    with_act_c(act, act_first, [&](auto a, auto f) {
      stats_kernel<scalar_t>(g, G.const_data_ptr<A>(), bias ? bias->const_data_ptr<A>() : nullptr, a, f,
                             pre.data_ptr<scalar_t>(), mean.data_ptr<A>(), var.data_ptr<A>());
    });
  });
}

// y = bn_act(v) [+ residual]: v = round(in + bias) when `in` is in the acc dtype (a GEMM result),
// v = in when `in` has y's dtype (pre: bn_act_fwd).
void fwd_vec(const Geo& g, const Tensor& in, const Tensor* bias, const Tensor& scale, const Tensor& shift,
             const Tensor* residual, const Tensor& y, int act, bool act_first) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* b = bias ? bias->const_data_ptr<A>() : nullptr;
    const scalar_t* r = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    with_act_c(act, act_first, [&](auto a, auto f) {
      if (in.scalar_type() == y.scalar_type())
        fwd_kernel<scalar_t, scalar_t>(g, in.const_data_ptr<scalar_t>(), b, scale.const_data_ptr<A>(),
                                       shift.const_data_ptr<A>(), r, a, f, y.data_ptr<scalar_t>());
      else
        fwd_kernel<scalar_t, A>(g, in.const_data_ptr<A>(), b, scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
                                r, a, f, y.data_ptr<scalar_t>());
    });
  });
}

// dpre into `out` (pre's dtype, or the acc dtype: the GEMM operand); dbias (nullable).
void dpre_vec(const Geo& g, const Tensor& dy, const Tensor& pre, const BwdVecs& P, int act, bool act_first,
              const Tensor& out, const Tensor* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "bn_act_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    A* db = dbias ? dbias->data_ptr<A>() : nullptr;
    with_act_c(act, act_first, [&](auto a, auto f) {
      if (out.scalar_type() == pre.scalar_type())
        dpre_kernel<scalar_t, scalar_t>(g, dy.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(), P, a,
                                        f, out.data_ptr<scalar_t>(), db);
      else
        dpre_kernel<scalar_t, A>(g, dy.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(), P, a, f,
                                 out.data_ptr<A>(), db);
    });
  });
}

}  // namespace

namespace CMK_PW_ISA_NS {
PwVecKernels kernels() { return {&operand_vec, &stats_vec, &fwd_vec, &dpre_vec, CMK_PW_ISA_NAME}; }
}  // namespace CMK_PW_ISA_NS

}  // namespace cpu
}  // namespace convmixer_kernels
