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
//   bn_act_fwd_cpu      y = scale*act(pre)+shift (act_first) or act(scale*pre+shift), [+ residual]
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
// Instruction set: the epilogue kernels (pw_impl.h) are compiled once per instruction set
// (pw_isa_avx2.cpp, pw_isa_avx512.cpp: ATen's Vectorized with its polynomial exp, erf, tanh, 8 or 16
// floats wide) and the widest that this CPU and PyTorch's own choice allow runs (cpu_isa_level(), as
// for the depthwise kernels; CONVMIXER_KERNELS_CPU_ISA=avx2|default lowers it).  With neither
// (CONVMIXER_KERNELS_CPU_ISA=default, or an x86 CPU without AVX2) the same epilogues run as a
// composition of ATen ops (several passes, same results up to rounding): generic ATen Vectorized
// turned the epilogue into scalar libm calls, GELU costing more than the GEMM.  On other
// architectures pw_isa_default.cpp builds them at the baseline ISA.
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
#include "cpu/pw_kernels.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

using at::Tensor;

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


namespace convmixer_kernels {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Which epilogues run: the vectorized kernels above, or (CPU without AVX2, or the baseline asked
// for) the same arithmetic composed of ATen ops, as in torch_ops.py.

#if !defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
bool is_default_isa(const char* s) {
  if (s == nullptr) return false;
  std::string l;
  for (const char* q = s; *q; ++q) l += static_cast<char>(std::tolower(static_cast<unsigned char>(*q)));
  return l == "default" || l == "no avx";
}
#endif

// The vectorized epilogues for this CPU (pw_isa_<isa>.cpp), or nullptr for the ATen composite.
const PwVecKernels* vec_kernels() {
#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
  static const PwVecKernels k_avx2 = pw_isa_avx2::kernels();
  static const PwVecKernels k_avx512 = pw_isa_avx512::kernels();
  const int level = cpu_isa_level();  // reads CONVMIXER_KERNELS_CPU_ISA per call: tests set it
  if (level >= 2) return &k_avx512;
  if (level == 1) return &k_avx2;
  return nullptr;
#else
  static const PwVecKernels k_default = pw_isa_default::kernels();
  static const bool aten_default = is_default_isa(at::get_cpu_capability().c_str());
  if (aten_default || is_default_isa(std::getenv("CONVMIXER_KERNELS_CPU_ISA"))) return nullptr;
  return &k_default;
#endif
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
    case kRelu6: return at::hardtanh(v, 0.0, 6.0);
    case kHardswish: return at::hardswish(v);
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
    case kRelu6: return at::logical_not(at::logical_or(v <= 0, v >= 6)).to(v.scalar_type());
    case kHardswish:
      return at::where(v <= -3, at::zeros_like(v), at::where(v < 3, v / 3 + 0.5, at::ones_like(v)));
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
  if (const PwVecKernels* k = vec_kernels())
    k->operand(x, t, s);
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

// fp32 1x1-conv GEMMs go through ATen's convolution, i.e. oneDNN where PyTorch has it, the engine
// eager PyTorch uses for the same layer: on this project's CPU (2-core AMD EPYC, N=8, C=256, 32x32,
// fp32) it ran the forward in 5.5 ms against 8.4-9.9 ms for at::mm of the same shape, and the two
// backward GEMMs in 12.2 ms against 17.1 ms (channels_last; NCHW 21 vs 34 ms).  Other dtypes (fp64,
// for gradcheck) and builds without oneDNN keep at::mm / at::bmm.  (The stem keeps its im2col GEMM:
// there oneDNN's strided conv was slower, 9 ms for the backward against about 1 ms.)
bool pw_gemm_by_conv(at::ScalarType acc) {
  return acc == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

Tensor conv1x1(const Tensor& S, const Tensor& W4d, bool cl) {
  return at::convolution(S, W4d, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1).contiguous(format_of(cl));
}

// The GEMM result of pre (acc dtype, x's format) for out: into `out` itself (or a buffer like it)
// through at::mm, or a fresh tensor through the convolution.
Tensor pw_gemm(const Tensor& x, const Tensor* t, const Tensor& weight, const Tensor& out, bool cl) {
  const auto acc = acc_type_for(x.scalar_type());
  const int64_t Co = weight.size(0), Ci = x.size(1);
  Tensor S = pw_operand(x, t, cl);
  if (pw_gemm_by_conv(acc)) return conv1x1(S, weight.to(acc), cl);
  Tensor G = gemm_buffer(out, cl);
  gemm_channels(S, weight.view({Co, Ci}).to(acc), G, cl);
  return G;
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

// The stem's GEMM result (acc dtype, x's format, (N, C_out, H/p, W/p)) for an output `out`: into `out`
// (or a buffer like it) from the im2col GEMM, or a fresh tensor from ATen's strided convolution when the
// 1x1 conv also goes there (fp32 with oneDNN).  Measured on this project's CPU (2-core AMD EPYC, fp32,
// channels_last, C_out=256, in-process A/B): see benchmarks/results/NOTES.md, 2026-11-27 (sixth session).
// The backward keeps its im2col GEMMs (oneDNN's strided-conv backward was several times slower).
Tensor stem_gemm_result(const Tensor& x, const Tensor& weight, int64_t p, bool cl, const Tensor& out) {
  const auto acc = acc_type_for(x.scalar_type());
  if (pw_gemm_by_conv(acc))
    return at::convolution(x.to(acc), weight.to(acc), std::nullopt, {p, p}, {0, 0}, {1, 1}, false, {0, 0}, 1)
        .contiguous(format_of(cl));
  Tensor G = gemm_buffer(out, cl);
  stem_gemm(im2col(x, p, cl, acc), stem_weight_matrix(weight, cl, acc), G, cl);
  return G;
}

// The output of the pass after a GEMM: the GEMM result G itself when it is a fresh tensor laid out as
// `out` (the convolution path in fp32), so that the pass runs in place, else `out`: one
// activation-sized tensor fewer at the forward's peak.  (Time: no change measurable here, 0.97-1.06x.)
Tensor in_place_or(const Tensor& G, const Tensor& out) {
  const bool same_layout = G.scalar_type() == out.scalar_type() && G.sizes() == out.sizes() &&
                           G.strides() == out.strides();
  return same_layout && !G.is_same(out) ? G : out;
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
  if (const PwVecKernels* k = vec_kernels()) {
    k->stats(geo_of(pre, cl), G, bias, pre, static_cast<int>(act), act_first, mean, var);
    return;
  }
  const Tensor v = ref::rounded(bias ? G + ref::per_channel(*bias) : G, pre.scalar_type());
  const Tensor u = act_first ? ref::act_fwd(v, act) : v;
  mean.copy_(u.mean({0, 2, 3}));
  var.copy_((u - ref::per_channel(mean)).square().mean({0, 2, 3}));
  pre.copy_(v);
}

// y = bn_act(v) [+ residual], v = round(in + bias) (in: a GEMM result in the acc dtype; may be y
// itself) or v = in (in: pre, y's dtype); residual (nullable): y's dtype and layout.
void run_fwd(const Tensor& in, const Tensor* bias, const Tensor& scale, const Tensor& shift, const Tensor& y,
             bool cl, int64_t act, bool act_first, const Tensor* residual = nullptr) {
  if (const PwVecKernels* k = vec_kernels()) {
    k->fwd(geo_of(y, cl), in, bias, scale, shift, residual, y, static_cast<int>(act), act_first);
    return;
  }
  const auto acc = acc_type_for(y.scalar_type());
  const Tensor v = ref::rounded(bias ? in.to(acc) + ref::per_channel(*bias) : in.to(acc), y.scalar_type());
  const Tensor o = ref::bn_act(v, scale, shift, act, act_first);
  y.copy_(residual ? o + residual->to(acc) : o);
}

// dpre into `out` (pre's dtype, or the acc dtype with values rounded to pre's: the GEMM
// operand); dbias (nullable) = its per-channel sum.
void run_dpre(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift, const Tensor& mean,
              const Tensor& ca, const Tensor& cb, const Tensor& cd, int64_t act, bool act_first, bool cl,
              const Tensor& out, const Tensor* dbias) {
  if (const PwVecKernels* k = vec_kernels()) {
    const BwdVecs P{scale.const_data_ptr(), shift.const_data_ptr(), mean.const_data_ptr(),
                    ca.const_data_ptr(),    cb.const_data_ptr(),    cd.const_data_ptr()};
    k->dpre(geo_of(pre, cl), dy, pre, P, static_cast<int>(act), act_first, out, dbias);
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
  const Tensor G = pw_gemm(x, opt(t), weight, pre, cl);
  pre = in_place_or(G, pre);
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
  Tensor y = new_output({x.size(0), Co, x.size(2), x.size(3)}, x.options(), format_of(cl));
  const Tensor G = pw_gemm(x, opt(t), weight, y, cl);
  y = in_place_or(G, y);
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
  if (pw_gemm_by_conv(acc)) {
    auto grads = at::convolution_backward(D, S, weight.to(acc), std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0},
                                          1, {true, true, false});
    // Results already in the output dtype are returned as they are (no copy pass).
    Tensor& gi = std::get<0>(grads);
    Tensor& gw = std::get<1>(grads);
    if (ds.scalar_type() == acc) ds = gi.contiguous(format_of(cl)); else ds.copy_(gi);
    if (dweight.scalar_type() == acc) dweight = gw.contiguous(); else dweight.copy_(gw);
    return {ds, dweight, dbias};
  }
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
  const Tensor G = stem_gemm_result(x, weight, p, cl, pre);
  pre = in_place_or(G, pre);
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
  Tensor y = new_output({x.size(0), Co, x.size(2) / p, x.size(3) / p}, x.options(), format_of(cl));
  const Tensor G = stem_gemm_result(x, weight, p, cl, y);
  y = in_place_or(G, y);
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
  const int64_t C = x.size(1);
  if (!need_dx && pw_gemm_by_conv(acc)) {
    // Weight gradient only (the stem's input is the image): oneDNN's strided-conv weight gradient, no
    // im2col copy.  In-process A/B here (fp32, C_out=256): 8.4 vs 8.9 ms (8x3x224x224, p=7), 1.3 vs 1.9 ms
    // (32x3x32x32, p=2), 0.81 vs 0.93 ms (8x3x64x64, p=7).  With dx as well, oneDNN took 4-5x as long
    // as the GEMMs below, so that case keeps them.
    Tensor gw = std::get<1>(at::convolution_backward(D, x.to(acc), weight.to(acc), std::nullopt, {p, p}, {0, 0},
                                                     {1, 1}, false, {0, 0}, 1, {false, true, false}));
    dweight.copy_(gw);
    return {x.new_empty({0}), dweight, dbias};
  }
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

Tensor bn_act_fwd_cpu(const Tensor& pre, const Tensor& scale, const Tensor& shift, int64_t act, bool act_first,
                      const std::optional<Tensor>& residual) {
  const bool cl = check_x(pre, "pre");
  check_cvec(scale, "scale", pre, pre.size(1));
  check_cvec(shift, "shift", pre, pre.size(1));
  check_act(act);
  if (residual) check_like_x(*residual, "residual", pre, cl);
  Tensor y = new_output(pre.sizes(), pre.options(), format_of(cl));
  run_fwd(pre, nullptr, scale, shift, y, cl, act, act_first, residual ? &*residual : nullptr);
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
