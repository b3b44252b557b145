// The activations of the CPU kernels, vectorized: exp, erf, tanh, act(v) and act'(v) for the
// activation codes of convmixer_kernels/torch_ops.py (0 identity, 1 relu, 2 gelu, 3 gelu_tanh,
// 4 silu, 5 relu6, 6 hardswish).  Included by dw_impl.h and pw_impl.h INSIDE their per-ISA anonymous namespaces (after
// `using at::vec::Vectorized;`), so each instruction set gets its own copy.  One implementation
// for both: the pointwise block's backward takes its BatchNorm sums (dw_bwd_reduce) from the
// depthwise kernels and its dpre from pw_impl.h, and the conv-bias gradient is their difference,
// about zero; two erf/tanh implementations that differ in the last bits made it noise-dominated
// (0.97 of the fp64-oracle bound for gelu_tanh, norm_act, where the same code gives about 0.5).
// No include guard on purpose: each ISA translation unit includes it once, in its own namespace.

// exp, erf and tanh for the activations.  float: exp is ATen's inline polynomial exp_u20
// (about 1e-6 relative, no call into Sleef), erf is Abramowitz & Stegun 7.1.26 (absolute
// error 1.5e-7, the formula ATen's own float erf uses) on top of it, tanh = 1 - 2 / (e^2z + 1).
// double: the accurate Sleef versions (the fp64 tolerance is 1e-10).
template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>)
    return v.exp_u20();
  else
    return v.exp();
}

// 1 / v.  float with AVX-512 or AVX2: the hardware estimate (2^-14, 1.5 * 2^-12 relative) refined
// by Newton steps r' = r (2 - v r) (one, two) to within about an ulp, instead of a division (the
// divider's throughput is low).  v must be finite and nonzero (an inf gives NaN).
template <typename A>
inline Vectorized<A> vrecip(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512 x = v;
    const __m512 r = _mm512_rcp14_ps(x);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256 x = v, two = _mm256_set1_ps(2.f);
    __m256 r = _mm256_rcp_ps(x);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, two));
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, two));
  }
#endif
  return Vectorized<A>(A(1)) / v;
}

template <typename A>
inline Vectorized<A> verf(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    using Vec = Vectorized<float>;
    const Vec one(1.f);
    // |v| capped at 6 (erf is 1.0f from 3.92 on) so vrecip never sees inf; a NaN stays NaN
    const Vec ax = at::vec::minimum(v.abs(), Vec(6.f));
    const Vec t = vrecip<float>(at::vec::fmadd(Vec(0.3275911f), ax, one));  // in (0, 1]
    Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
    r = at::vec::fmadd(r, t, Vec(1.421413741f));
    r = at::vec::fmadd(r, t, Vec(-0.284496736f));
    r = at::vec::fmadd(r, t, Vec(0.254829592f));
    const Vec e = one - r * t * vexp<float>((ax * ax).neg());  // erf(|v|) >= 0
    return e | (v & Vec(-0.f));  // with v's sign (a bit operation; a compare and blend cost more)
  } else {
    return v.erf();
  }
}

template <typename A>
inline Vectorized<A> vtanh(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    using Vec = Vectorized<float>;
    const Vec one(1.f);
    return one - Vec(2.f) / (vexp<float>(v + v) + one);
  } else {
    return v.tanh();
  }
}

// act(v) and act'(v) for the run-time code `act` made a template constant (see torch_ops).
template <int ACT, typename A>
inline Vectorized<A> act_fwd(const Vectorized<A>& v) {
  using Vec = Vectorized<A>;
  if constexpr (ACT == 0) {
    return v;
  } else if constexpr (ACT == 1) {
    return at::vec::clamp_min(v, Vec(A(0)));
  } else if constexpr (ACT == 2) {
    return v * Vec(A(0.5)) * (Vec(A(1)) + verf<A>(v * Vec(A(0.7071067811865476))));
  } else if constexpr (ACT == 3) {
    const Vec inner = Vec(A(0.7978845608028654)) * (v + Vec(A(0.044715)) * v * v * v);
    return Vec(A(0.5)) * v * (Vec(A(1)) + vtanh<A>(inner));
  } else if constexpr (ACT == 4) {
    return v / (Vec(A(1)) + vexp<A>(v.neg()));
  } else if constexpr (ACT == 5) {
    return at::vec::clamp(v, Vec(A(0)), Vec(A(6)));  // NaN stays NaN
  } else {
    // x * min(max(x + 3, 0), 6) / 6, PyTorch's own order
    return v * at::vec::minimum(at::vec::maximum(v + Vec(A(3)), Vec(A(0))), Vec(A(6))) / Vec(A(6));
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
    const Vec cdf = Vec(A(0.5)) * (one + verf<A>(v * Vec(A(0.7071067811865476))));
    const Vec pdf = vexp<A>(Vec(A(-0.5)) * v * v) * Vec(A(0.3989422804014327));
    return cdf + v * pdf;
  } else if constexpr (ACT == 3) {
    const A k0 = A(0.7978845608028654), k1 = A(0.044715);
    const Vec t = vtanh<A>(Vec(k0) * (v + Vec(k1) * v * v * v));
    return Vec(A(0.5)) * (one + t) +
           Vec(A(0.5)) * v * (one - t * t) * Vec(k0) * (one + Vec(A(3) * k1) * v * v);
  } else if constexpr (ACT == 4) {
    const Vec s = one / (one + vexp<A>(v.neg()));
    return s * (one + v * (one - s));
  } else if constexpr (ACT == 5) {
    // 0 where v <= 0 or v >= 6, else 1 (NaN: 1), as hardtanh's backward.  (The operators give all-ones
    // masks for blendv; v.le() and friends give 1.0 / 0.0.)
    return Vec::blendv(one, Vec(A(0)), (v <= Vec(A(0))) | (v >= Vec(A(6))));
  } else {
    // 0 up to -3, v / 3 + 1/2 on (-3, 3), 1 from 3 on (NaN: 1), as hardswish's backward (torch_ops.act_grad)
    const Vec mid = v / Vec(A(3)) + Vec(A(0.5));
    return Vec::blendv(Vec::blendv(one, mid, v < Vec(A(3))), Vec(A(0)), v <= Vec(A(-3)));
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
    case 5: body(std::integral_constant<int, 5>{}); break;
    case 6: body(std::integral_constant<int, 6>{}); break;
    default: body(std::integral_constant<int, 4>{}); break;
  }
}

