// The four depthwise ops and the per-channel passes of the pointwise/stem ops on CPU tensors through the
// emulated CUDA kernels: the same launchers (csrc/cuda/dw_launch.cu, csrc/cuda/pw_kernels.cu) and kernels
// as the extension, with entry code that mirrors csrc/cuda/dw.cpp and csrc/cuda/pw.cpp and places every
// tensor at a chosen offset (misaligned starts).  The host code of csrc/cuda/{pw,dw,bn}.cpp itself is
// bound too (emu_host_*.cpp: bind_*_host), which is all the BatchNorm ops need.  Every tensor the mirrored
// entry points hand the kernels lives inside a larger NaN-filled buffer, so out-of-bounds reads poison
// results and out-of-bounds writes are caught by check_guards().
#include "emu.h"

#include <torch/extension.h>

#include <limits>
#include <vector>

#include "common.h"
#include "cuda/dw.cuh"
#include "cuda/dw_common.cuh"
#include "cuda/pw.cuh"

namespace cmk_emu {
extern int g_sms;
extern int g_smem_optin;
// emu_host_{pw,dw,bn}.cpp: the host code of csrc/cuda/{pw,dw,bn}.cpp itself
void bind_pw_host(pybind11::module_& m);
void bind_dw_host(pybind11::module_& m);
void bind_bn_host(pybind11::module_& m);
}  // namespace cmk_emu

namespace {

using at::Tensor;
namespace dw = convmixer_kernels::dwcuda;

constexpr int64_t kGuard = 4096;  // elements on each side

struct Guarded {
  Tensor buf;
  int64_t off, numel;
};
std::vector<Guarded> g_guarded;

std::vector<int64_t> strides_for(at::IntArrayRef sizes, bool cl) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> st(n, 1);
  if (cl && n == 4) {
    const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
    st = {H * W * C, 1, W * C, C};
  } else {
    for (int64_t i = n - 2; i >= 0; --i) st[i] = st[i + 1] * std::max<int64_t>(sizes[i + 1], 1);
  }
  return st;
}

// A NaN-filled view of the given shape inside a larger NaN-filled buffer; offset shifts the start
// by that many elements (offset 1 makes it misaligned for 16-byte accesses).
Tensor guarded_empty(at::IntArrayRef sizes, at::ScalarType dt, bool cl, int64_t offset) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  Tensor buf = at::full({numel + 2 * kGuard + offset}, std::numeric_limits<double>::quiet_NaN(),
                        at::TensorOptions().dtype(dt));
  Tensor t = buf.as_strided(sizes, strides_for(sizes, cl), kGuard + offset);
  g_guarded.push_back({buf, kGuard + offset, numel});
  return t;
}

Tensor guarded_clone(const Tensor& src, int64_t offset) {
  const bool cl = src.dim() == 4 && !src.is_contiguous() && src.is_contiguous(at::MemoryFormat::ChannelsLast);
  Tensor t = guarded_empty(src.sizes(), src.scalar_type(), cl, offset);
  t.copy_(src);
  return t;
}

void check_guards() {
  for (const auto& g : g_guarded) {
    const Tensor lo = g.buf.narrow(0, 0, g.off);
    const Tensor hi = g.buf.narrow(0, g.off + g.numel, g.buf.numel() - g.off - g.numel);
    TORCH_CHECK(lo.isnan().all().item<bool>() && hi.isnan().all().item<bool>(),
                "cuda_emu: a kernel wrote outside a tensor (buffer of ", g.numel, " elements)");
  }
  g_guarded.clear();
}

void set_device(int sms, int smem_optin) {
  cmk_emu::g_sms = sms;
  cmk_emu::g_smem_optin = smem_optin;
}

bool geom(const Tensor& x, const char* name, dw::DwGeom& g) {
  convmixer_kernels::check_storage_dtype(x, name, false);
  const bool cl = convmixer_kernels::is_channels_last(x, name);
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.cl = cl;
  g.dtype = x.scalar_type() == at::kFloat ? dw::kF32 : x.scalar_type() == at::kHalf ? dw::kF16 : dw::kBF16;
  return cl;
}

void ok(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "cuda_emu: launch failed with error ", static_cast<int>(e)); }

Tensor ws(int64_t n) { return guarded_empty({n}, at::kFloat, false, 0); }
Tensor vecout(int64_t C) { return guarded_empty({C}, at::kFloat, false, 0); }
const float* fp(const Tensor& t) { return t.data_ptr<float>(); }

std::vector<Tensor> conv_stats(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, int64_t act,
                               bool act_first, int64_t out_offset) {
  dw::DwGeom g{};
  const bool cl = geom(x, "x", g);
  g.k = static_cast<int>(convmixer_kernels::check_dw_weight(w, x));
  Tensor pre = guarded_empty(x.sizes(), x.scalar_type(), cl, out_offset);
  Tensor mean = vecout(g.C), var = vecout(g.C);
  Tensor part = ws(dw::dw_conv_stats_workspace(g).part);
  ok(dw::dw_conv_stats_launch(g, x.data_ptr(), fp(w), b ? fp(*b) : nullptr, static_cast<int>(act), act_first,
                              pre.data_ptr(), mean.data_ptr<float>(), var.data_ptr<float>(), part.data_ptr<float>(),
                              nullptr));
  return {pre, mean, var};
}

Tensor fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, const Tensor& scale,
           const Tensor& shift, int64_t act, bool act_first, bool residual, int64_t out_offset) {
  dw::DwGeom g{};
  const bool cl = geom(x, "x", g);
  g.k = static_cast<int>(convmixer_kernels::check_dw_weight(w, x));
  Tensor y = guarded_empty(x.sizes(), x.scalar_type(), cl, out_offset);
  ok(dw::dw_fwd_launch(g, x.data_ptr(), fp(w), b ? fp(*b) : nullptr, fp(scale), fp(shift), static_cast<int>(act),
                       act_first, residual, y.data_ptr(), nullptr));
  return y;
}

std::vector<Tensor> bwd_reduce(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift,
                               const Tensor& mean, const Tensor& invstd, int64_t act, bool act_first) {
  dw::DwGeom g{};
  geom(pre, "pre", g);
  g.k = 1;
  Tensor sg = vecout(g.C), sgx = vecout(g.C);
  Tensor part = ws(dw::dw_bwd_reduce_workspace(g).part);
  ok(dw::dw_bwd_reduce_launch(g, dy.data_ptr(), pre.data_ptr(), fp(scale), fp(shift), fp(mean), fp(invstd),
                              static_cast<int>(act), act_first, sg.data_ptr<float>(), sgx.data_ptr<float>(),
                              part.data_ptr<float>(), nullptr));
  return {sg, sgx};
}

std::vector<Tensor> bwd(const Tensor& dy, const Tensor& x, const Tensor& pre, const Tensor& w, const Tensor& scale,
                        const Tensor& shift, const Tensor& mean, const Tensor& ca, const Tensor& cb,
                        const Tensor& cd, int64_t act, bool act_first, bool residual, int64_t out_offset) {
  dw::DwGeom g{};
  const bool cl = geom(x, "x", g);
  g.k = static_cast<int>(convmixer_kernels::check_dw_weight(w, x));
  Tensor dx = guarded_empty(x.sizes(), x.scalar_type(), cl, out_offset);
  Tensor dweight = guarded_empty(w.sizes(), at::kFloat, false, 0);
  Tensor dbias = vecout(g.C);
  const dw::DwWorkspace wsz = dw::dw_bwd_workspace(g);
  Tensor part = ws(wsz.part), dpre = ws(wsz.dpre);
  ok(dw::dw_bwd_launch(g, dy.data_ptr(), x.data_ptr(), pre.data_ptr(), fp(w), fp(scale), fp(shift), fp(mean),
                       fp(ca), fp(cb), fp(cd), static_cast<int>(act), act_first, residual, dx.data_ptr(),
                       dweight.data_ptr<float>(), dbias.data_ptr<float>(), part.data_ptr<float>(),
                       dpre.data_ptr<float>(), nullptr));
  return {dx, dweight, dbias};
}

// The plan the launchers would use, for the tests to check coverage of both paths.
std::vector<int64_t> plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t k, bool cl, int64_t dtype, bool backward) {
  dw::DwGeom g{N, C, H, W, static_cast<int>(k), cl, static_cast<dw::DType>(dtype)};
  const dw::DevInfo dev{cmk_emu::g_sms, cmk_emu::g_smem_optin, cmk_emu::g_smem_optin + 1024};
  const dw::TilePlan p = dw::plan_tiles(g, backward, dev);
  return {p.tiled, p.tile_h, p.tile_w, p.threads, static_cast<int64_t>(p.smem_bytes), p.ipb, p.groups, p.regs};
}

// ---- the pointwise/stem per-channel passes (pw.cpp's run_stats / run_bn_act / run_dpre) ----
namespace pwk = convmixer_kernels::pw;

pwk::ChannelParams pw_params(const Tensor& like, int64_t act, bool act_first) {
  convmixer_kernels::check_storage_dtype(like, "pre", false);
  return pwk::channel_params(like.size(0), like.size(1), like.size(2) * like.size(3),
                             convmixer_kernels::is_channels_last(like, "pre"), static_cast<int>(act), act_first);
}

pwk::DType pw_dtype(const Tensor& t) {
  return t.scalar_type() == at::kFloat ? pwk::DType::kFloat
         : t.scalar_type() == at::kHalf ? pwk::DType::kHalf : pwk::DType::kBFloat16;
}

// (pre [+ bias, rounded, written in place], mean, var) of a GEMM output `g` (copied first).
std::vector<Tensor> pw_stats(const Tensor& g, const std::optional<Tensor>& bias, int64_t act, bool act_first,
                             int64_t offset) {
  auto p = pw_params(g, act, act_first);
  Tensor pre = guarded_clone(g, offset);
  Tensor mean = vecout(p.C), var = vecout(p.C);
  Tensor partial = ws(p.R * 3 * p.C);
  p.in = pre.data_ptr();
  p.out = bias ? pre.data_ptr() : nullptr;
  p.bias = bias ? fp(*bias) : nullptr;
  p.partial = partial.data_ptr<float>();
  pwk::launch_stats(p, pw_dtype(pre), mean.data_ptr<float>(), var.data_ptr<float>(), nullptr);
  return {pre, mean, var};
}

Tensor pw_bn_act(const Tensor& in, const std::optional<Tensor>& bias, const Tensor& scale, const Tensor& shift,
                 int64_t act, bool act_first, int64_t offset, const std::optional<Tensor>& residual) {
  auto p = pw_params(in, act, act_first);
  Tensor y = guarded_empty(in.sizes(), in.scalar_type(), p.cl, offset);
  p.in = in.data_ptr();
  p.in2 = residual ? residual->data_ptr() : nullptr;
  p.out = y.data_ptr();
  p.bias = bias ? fp(*bias) : nullptr;
  p.scale = fp(scale);
  p.shift = fp(shift);
  pwk::launch_bn_act(p, pw_dtype(in), nullptr);
  return y;
}

// (dpre in pre's layout, or channel-major (C, N*HW) for NCHW with channel_major; its channel sums).
std::vector<Tensor> pw_dpre(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift,
                            const Tensor& mean, const Tensor& ca, const Tensor& cb, const Tensor& cd, int64_t act,
                            bool act_first, bool channel_major, int64_t offset) {
  auto p = pw_params(pre, act, act_first);
  Tensor out = channel_major ? guarded_empty({p.C, p.N * p.HW}, pre.scalar_type(), false, offset)
                             : guarded_empty(pre.sizes(), pre.scalar_type(), p.cl, offset);
  Tensor dsum = vecout(p.C), partial = ws(p.R * p.C);
  p.in = pre.data_ptr();
  p.in2 = dy.data_ptr();
  p.out = out.data_ptr();
  p.out_channel_major = channel_major;
  p.scale = fp(scale);
  p.shift = fp(shift);
  p.mean = fp(mean);
  p.ca = fp(ca);
  p.cb = fp(cb);
  p.cd = fp(cd);
  p.partial = partial.data_ptr<float>();
  pwk::launch_dpre(p, pw_dtype(pre), dsum.data_ptr<float>(), nullptr);
  return {out, dsum};
}

// The CUTLASS statistics GEMM's finalize (pw::launch_tile_stats_finalize) on given partials: partial is
// (2, T, ld) float (sums, then sums of squares), outputs NaN-filled and guarded.
std::tuple<Tensor, Tensor> tile_stats_finalize(const Tensor& partial, int64_t C, int64_t M, int64_t offset) {
  TORCH_CHECK(partial.dim() == 3 && partial.size(0) == 2 && partial.scalar_type() == at::kFloat);
  const int64_t T = partial.size(1), ld = partial.size(2);
  Tensor part = guarded_clone(partial.contiguous(), offset);
  Tensor mean = guarded_empty({C}, at::kFloat, false, offset), var = guarded_empty({C}, at::kFloat, false, offset);
  const float* sums = part.data_ptr<float>();
  pwk::launch_tile_stats_finalize(sums, sums + T * ld, T, ld, C, M, mean.data_ptr<float>(), var.data_ptr<float>(),
                                  nullptr);
  return {mean, var};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  cmk_emu::bind_pw_host(m);
  cmk_emu::bind_dw_host(m);
  cmk_emu::bind_bn_host(m);
  m.def("pw_stats", &pw_stats);
  m.def("pw_bn_act", &pw_bn_act);
  m.def("pw_dpre", &pw_dpre);
  m.def("tile_stats_finalize", &tile_stats_finalize);
  m.def("dw_conv_stats", &conv_stats);
  m.def("dw_fwd", &fwd);
  m.def("dw_bwd_reduce", &bwd_reduce);
  m.def("dw_bwd", &bwd);
  m.def("guarded_clone", &guarded_clone);
  m.def("check_guards", &check_guards);
  m.def("set_device", &set_device);
  m.def("plan", &plan);
}
