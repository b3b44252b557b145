// CUDA entry points of the per-channel BatchNorm ops (schemas in csrc/ops.cpp; the CPU ones are
// csrc/cpu/bn.cpp): checks, outputs, device guard, the caller's stream, one launch (bn_kernels.cu).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bn.h"
#include "common.h"
#include "cuda/bn.cuh"
#include "cuda/cuda_host.h"

namespace convmixer_kernels {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> bn_params_cuda(const Tensor& mean, const Tensor& var,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps) {
  bn::check_params_args(mean, var, weight, bias, eps);
  check_on_device(mean, "mean");
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = mean.size(0);
  Tensor invstd = new_output({C}, mean.options()), scale = new_output({C}, mean.options()),
         shift = new_output({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_params", [&] {
    C10_CUDA_CHECK(bncuda::launch_params<scalar_t>(
        mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), bn::opt_ptr<scalar_t>(weight),
        bn::opt_ptr<scalar_t>(bias), static_cast<scalar_t>(eps), C, invstd.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  });
  return {invstd, scale, shift};
}

std::tuple<Tensor, Tensor> bn_bwd_coefs_cuda(const Tensor& sum_g, const Tensor& sum_gxhat, const Tensor& scale,
                                             const Tensor& invstd, double count, bool batch_stats) {
  bn::check_coefs_args(sum_g, sum_gxhat, scale, invstd, count);
  check_on_device(sum_g, "sum_g");
  const c10::cuda::CUDAGuard guard(sum_g.device());
  const int64_t C = sum_g.size(0);
  Tensor cb = new_output({C}, sum_g.options()), cd = new_output({C}, sum_g.options());
  AT_DISPATCH_FLOATING_TYPES(sum_g.scalar_type(), "bn_bwd_coefs", [&] {
    C10_CUDA_CHECK(bncuda::launch_bwd_coefs<scalar_t>(
        sum_g.const_data_ptr<scalar_t>(), sum_gxhat.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        invstd.const_data_ptr<scalar_t>(), static_cast<scalar_t>(count), batch_stats, C, cb.data_ptr<scalar_t>(),
        cd.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  });
  return {cb, cd};
}

void bn_update_running_cuda(const Tensor& running_mean, const Tensor& running_var,
                            const std::optional<Tensor>& num_batches_tracked, const Tensor& mean, const Tensor& var,
                            double count, std::optional<double> momentum) {
  const bn::RunningConsts k =
      bn::check_running_args(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  check_on_device(running_mean, "running_mean");
  const c10::cuda::CUDAGuard guard(running_mean.device());
  int64_t* nbt = num_batches_tracked ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bn_update_running", [&] {
    using T = scalar_t;
    C10_CUDA_CHECK(bncuda::launch_update_running<T>(
        running_mean.data_ptr<T>(), running_var.data_ptr<T>(), nbt, mean.const_data_ptr<T>(), var.const_data_ptr<T>(),
        static_cast<T>(k.unbias), static_cast<T>(k.keep), static_cast<T>(k.momentum), k.cumulative,
        running_mean.size(0), c10::cuda::getCurrentCUDAStream().stream()));
  });
  bn::bump_versions(running_mean, running_var, num_batches_tracked);
}

}  // namespace
}  // namespace convmixer_kernels

#ifndef CMK_EMULATE  // (cuda_host.h)
TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("bn_params", &convmixer_kernels::bn_params_cuda);
  m.impl("bn_bwd_coefs", &convmixer_kernels::bn_bwd_coefs_cuda);
  m.impl("bn_update_running", &convmixer_kernels::bn_update_running_cuda);
}
#endif
