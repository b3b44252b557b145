// CUDA entry points of the depthwise ops (schemas in csrc/ops.cpp, semantics in
// convmixer_kernels/torch_ops.py): argument checks, output and workspace allocation, device
// guard, the caller's current stream, and the launch.  All ATen usage stays in this file; the
// kernels (dw_*.cu) see raw pointers and sizes only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <optional>
#include <tuple>

#include "common.h"
#include "cuda/cuda_host.h"
#include "cuda/dw.cuh"

namespace convmixer_kernels {
namespace {

using at::Tensor;

// A launcher's status: cudaErrorNotSupported comes only from CONVMIXER_KERNELS_DW_MMA=require on a
// call the tensor-core kernels do not serve (dw_mma.cu), or from CONVMIXER_KERNELS_DW_BWD_REGS=require
// on a backward the register-partials kernel does not serve (dw_launch.cu); say so, instead of CUDA's
// bare message.
void check_launch(cudaError_t e) {
  if (e == cudaErrorNotSupported) {
    auto required = [](const char* name) {
      const char* v = std::getenv(name);
      return v != nullptr && std::string(v) == "require";
    };
    std::string msg;
    if (required("CONVMIXER_KERNELS_DW_MMA"))
      msg += "CONVMIXER_KERNELS_DW_MMA=require: the tensor-core depthwise kernels do not serve this call (they need "
             "float16 or bfloat16 activations, k in {3, 5, 7, 9}, a GPU of compute capability 8.0 or newer, and the "
             "image and channels within the shared-memory plan)";
    if (required("CONVMIXER_KERNELS_DW_BWD_REGS"))
      msg += std::string(msg.empty() ? "" : "; or ") +
             "CONVMIXER_KERNELS_DW_BWD_REGS=require: the register-partials depthwise backward does not serve this "
             "call (it needs channels_last, k in {3, 5, 7}, a channel count divisible by 4, "
             "CONVMIXER_KERNELS_DW_BWD_DPRE and CONVMIXER_KERNELS_DW_BWD_COPIES not 0, and 47-85 KB of shared "
             "memory a block; under it the tensor-core backward does not run)";
    if (!msg.empty()) {
      (void)cudaGetLastError();
      TORCH_CHECK(false, msg, "; set it to 1 to fall back to the other kernels");
    }
  }
  C10_CUDA_CHECK(e);
}

// x: a CUDA tensor of a CUDA storage dtype in one of the two layouts.  Returns whether it is
// channels_last and fills the geometry (k is set by the caller: check_k_fits).
bool check_x(const Tensor& x, const char* name, dwcuda::DwGeom& g) {
  check_on_device(x, name);
  check_storage_dtype(x, name, /*allow_double=*/false);
  const bool cl = is_channels_last(x, name);
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  // Spatial sizes are int inside the kernels (offsets are int64).
  TORCH_CHECK(g.H < (int64_t(1) << 30) && g.W < (int64_t(1) << 30), name,
              ": spatial sizes must be below 2^30, got ", x.sizes());
  g.cl = cl;
  switch (x.scalar_type()) {
    case at::kFloat:
      g.dtype = dwcuda::kF32;
      break;
    case at::kHalf:
      g.dtype = dwcuda::kF16;
      break;
    default:
      g.dtype = dwcuda::kBF16;
      break;
  }
  return cl;
}

// The kernels' grids count blocks per (channel, tap) (the direct weight gradient: C * (k*k + 1) blocks at
// least) in 32 bits; far beyond any real layer, refused with a clear error.
int check_k_fits(const dwcuda::DwGeom& g, int64_t k) {
  TORCH_CHECK(g.C * (k * k + 1) <= INT32_MAX, "weight: C*(k*k + 1) = ", g.C * (k * k + 1),
              " is more than the CUDA depthwise kernels support (", INT32_MAX, "): at most ", INT32_MAX / (k * k + 1),
              " channels at k = ", k);
  return static_cast<int>(k);
}

const float* fptr(const Tensor& t) { return t.data_ptr<float>(); }

Tensor workspace(int64_t floats, const Tensor& x) {
  return at::empty({floats}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
}

std::tuple<Tensor, Tensor, Tensor> dw_conv_stats_cuda(const Tensor& x, const Tensor& weight,
                                                       const std::optional<Tensor>& bias, int64_t act,
                                                       bool act_first) {
  dwcuda::DwGeom g{};
  const bool cl = check_x(x, "x", g);
  g.k = check_k_fits(g, check_dw_weight(weight, x));
  if (bias.has_value()) check_vec(*bias, "bias", x);
  check_act(act);
  c10::cuda::CUDAGuard guard(x.device());
  const auto facc = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  Tensor pre = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor mean = new_output({g.C}, facc);
  Tensor var = new_output({g.C}, facc);
  if (g.C == 0) return {pre, mean, var};
  if (x.numel() == 0) {  // mean of nothing, as torch: NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {pre, mean, var};
  }
  const Tensor part = workspace(dwcuda::dw_conv_stats_workspace(g).part, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dwcuda::dw_conv_stats_launch(
      g, x.data_ptr(), fptr(weight), bias.has_value() ? fptr(*bias) : nullptr, static_cast<int>(act),
      act_first, pre.data_ptr(), mean.data_ptr<float>(), var.data_ptr<float>(), part.data_ptr<float>(), stream));
  return {pre, mean, var};
}

Tensor dw_fwd_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                   const Tensor& scale, const Tensor& shift, int64_t act, bool act_first, bool residual) {
  dwcuda::DwGeom g{};
  const bool cl = check_x(x, "x", g);
  g.k = check_k_fits(g, check_dw_weight(weight, x));
  if (bias.has_value()) check_vec(*bias, "bias", x);
  check_vec(scale, "scale", x);
  check_vec(shift, "shift", x);
  check_act(act);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = new_output(x.sizes(), x.options(), format_of(cl));
  if (x.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dwcuda::dw_fwd_launch(g, x.data_ptr(), fptr(weight), bias.has_value() ? fptr(*bias) : nullptr,
                                       fptr(scale), fptr(shift), static_cast<int>(act), act_first, residual,
                                       y.data_ptr(), stream));
  return y;
}

std::tuple<Tensor, Tensor> dw_bwd_reduce_cuda(const Tensor& dy, const Tensor& pre, const Tensor& scale,
                                               const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                               int64_t act, bool act_first) {
  // pre plays the role of x: dy must match it exactly.
  dwcuda::DwGeom g{};
  const bool cl = check_x(pre, "pre", g);
  g.k = 1;
  check_like_x(dy, "dy", pre, cl);
  check_vec(scale, "scale", pre);
  check_vec(shift, "shift", pre);
  check_vec(mean, "mean", pre);
  check_vec(invstd, "invstd", pre);
  check_act(act);
  c10::cuda::CUDAGuard guard(pre.device());
  const auto facc = pre.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  Tensor sum_g = new_output({g.C}, facc);
  Tensor sum_gx = new_output({g.C}, facc);
  if (g.C == 0) return {sum_g, sum_gx};
  if (pre.numel() == 0) {
    sum_g.zero_();
    sum_gx.zero_();
    return {sum_g, sum_gx};
  }
  const Tensor part = workspace(dwcuda::dw_bwd_reduce_workspace(g).part, pre);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(dwcuda::dw_bwd_reduce_launch(g, dy.data_ptr(), pre.data_ptr(), fptr(scale), fptr(shift),
                                              fptr(mean), fptr(invstd), static_cast<int>(act), act_first,
                                              sum_g.data_ptr<float>(), sum_gx.data_ptr<float>(),
                                              part.data_ptr<float>(), stream));
  return {sum_g, sum_gx};
}

std::tuple<Tensor, Tensor, Tensor> dw_bwd_cuda(const Tensor& dy, const Tensor& x, const Tensor& pre,
                                               const Tensor& weight, const Tensor& scale, const Tensor& shift,
                                               const Tensor& mean, const Tensor& ca, const Tensor& cb,
                                               const Tensor& cd, int64_t act, bool act_first, bool residual) {
  dwcuda::DwGeom g{};
  const bool cl = check_x(x, "x", g);
  check_like_x(dy, "dy", x, cl);
  check_like_x(pre, "pre", x, cl);
  g.k = check_k_fits(g, check_dw_weight(weight, x));
  check_vec(scale, "scale", x);
  check_vec(shift, "shift", x);
  check_vec(mean, "mean", x);
  check_vec(ca, "ca", x);
  check_vec(cb, "cb", x);
  check_vec(cd, "cd", x);
  check_act(act);
  c10::cuda::CUDAGuard guard(x.device());
  const auto facc = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  Tensor dx = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor dweight = new_output(weight.sizes(), facc);
  Tensor dbias = new_output({g.C}, facc);
  if (g.C == 0) return {dx, dweight, dbias};
  if (x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const dwcuda::DwWorkspace wsz = dwcuda::dw_bwd_workspace(g);
  const Tensor part = workspace(wsz.part, x);
  const Tensor dpre = workspace(wsz.dpre, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dwcuda::dw_bwd_launch(g, dy.data_ptr(), x.data_ptr(), pre.data_ptr(), fptr(weight), fptr(scale),
                                       fptr(shift), fptr(mean), fptr(ca), fptr(cb), fptr(cd),
                                       static_cast<int>(act), act_first, residual, dx.data_ptr(),
                                       dweight.data_ptr<float>(), dbias.data_ptr<float>(), part.data_ptr<float>(),
                                       dpre.data_ptr<float>(), stream));
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace convmixer_kernels

#ifndef CMK_EMULATE  // (cuda_host.h)
TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("dw_conv_stats", &convmixer_kernels::dw_conv_stats_cuda);
  m.impl("dw_fwd", &convmixer_kernels::dw_fwd_cuda);
  m.impl("dw_bwd_reduce", &convmixer_kernels::dw_bwd_reduce_cuda);
  m.impl("dw_bwd", &convmixer_kernels::dw_bwd_cuda);
}
#endif
