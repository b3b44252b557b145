// CPU entry points of the per-channel BatchNorm ops bn_params, bn_bwd_coefs and bn_update_running (schemas
// in csrc/ops.cpp; semantics: the PyTorch expressions they replace, convmixer_kernels/ops.py _bn_scale_shift
// and _bn_bwd_coefs, functional.py update_running_stats).  (C,) vectors: a plain loop each, one call in
// place of five to seven small PyTorch ops (host time of a training step).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bn.h"
#include "bn_math.h"
#include "common.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> bn_params_cpu(const Tensor& mean, const Tensor& var,
                                                 const std::optional<Tensor>& weight,
                                                 const std::optional<Tensor>& bias, double eps) {
  bn::check_params_args(mean, var, weight, bias, eps);
  TORCH_CHECK(mean.is_cpu(), "mean: expected a CPU tensor, got a tensor on ", mean.device());
  const int64_t C = mean.size(0);
  Tensor invstd = new_output({C}, mean.options()), scale = new_output({C}, mean.options()),
         shift = new_output({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_params", [&] {
    const scalar_t *m = mean.const_data_ptr<scalar_t>(), *v = var.const_data_ptr<scalar_t>();
    const scalar_t *g = bn::opt_ptr<scalar_t>(weight), *b = bn::opt_ptr<scalar_t>(bias);
    scalar_t *is = invstd.data_ptr<scalar_t>(), *sc = scale.data_ptr<scalar_t>(), *sh = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      bn::params<scalar_t>(m[c], v[c], g ? g[c] : scalar_t(1), b ? b[c] : scalar_t(0), static_cast<scalar_t>(eps),
                           is[c], sc[c], sh[c]);
  });
  return {invstd, scale, shift};
}

std::tuple<Tensor, Tensor> bn_bwd_coefs_cpu(const Tensor& sum_g, const Tensor& sum_gxhat, const Tensor& scale,
                                            const Tensor& invstd, double count, bool batch_stats) {
  bn::check_coefs_args(sum_g, sum_gxhat, scale, invstd, count);
  TORCH_CHECK(sum_g.is_cpu(), "sum_g: expected a CPU tensor, got a tensor on ", sum_g.device());
  const int64_t C = sum_g.size(0);
  Tensor cb = new_output({C}, sum_g.options()), cd = new_output({C}, sum_g.options());
  AT_DISPATCH_FLOATING_TYPES(sum_g.scalar_type(), "bn_bwd_coefs", [&] {
    const scalar_t *g = sum_g.const_data_ptr<scalar_t>(), *gx = sum_gxhat.const_data_ptr<scalar_t>();
    const scalar_t *s = scale.const_data_ptr<scalar_t>(), *is = invstd.const_data_ptr<scalar_t>();
    scalar_t *b = cb.data_ptr<scalar_t>(), *d = cd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      if (batch_stats) {
        bn::bwd_coefs<scalar_t>(s[c], is[c], g[c], gx[c], static_cast<scalar_t>(count), b[c], d[c]);
      } else {
        b[c] = d[c] = scalar_t(0);
      }
    }
  });
  return {cb, cd};
}

void bn_update_running_cpu(const Tensor& running_mean, const Tensor& running_var,
                           const std::optional<Tensor>& num_batches_tracked, const Tensor& mean, const Tensor& var,
                           double count, std::optional<double> momentum) {
  const bn::RunningConsts k =
      bn::check_running_args(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  TORCH_CHECK(running_mean.is_cpu(), "running_mean: expected a CPU tensor, got a tensor on ", running_mean.device());
  int64_t nbt = 0;
  if (num_batches_tracked) {
    int64_t* n = num_batches_tracked->data_ptr<int64_t>();
    nbt = ++*n;
  }
  const int64_t C = running_mean.size(0);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bn_update_running", [&] {
    using T = scalar_t;
    T *rm = running_mean.data_ptr<T>(), *rv = running_var.data_ptr<T>();
    const T *m = mean.const_data_ptr<T>(), *v = var.const_data_ptr<T>();
    const T factor = k.cumulative ? static_cast<T>(1.0 / static_cast<double>(nbt)) : T(0);
    const T unbias = static_cast<T>(k.unbias), keep = static_cast<T>(k.keep), mom = static_cast<T>(k.momentum);
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = bn::running<T>(rm[c], m[c], keep, mom, k.cumulative, factor);
      rv[c] = bn::running<T>(rv[c], bn::mul(v[c], unbias), keep, mom, k.cumulative, factor);
    }
  });
  bn::bump_versions(running_mean, running_var, num_batches_tracked);
}

}  // namespace
}  // namespace cpu
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("bn_params", &convmixer_kernels::cpu::bn_params_cpu);
  m.impl("bn_bwd_coefs", &convmixer_kernels::cpu::bn_bwd_coefs_cpu);
  m.impl("bn_update_running", &convmixer_kernels::cpu::bn_update_running_cpu);
}
