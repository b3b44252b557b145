// Argument checks and host-side constants of the per-channel BatchNorm ops (bn_params, bn_bwd_coefs,
// bn_update_running; schemas in csrc/ops.cpp), shared by their CPU (csrc/cpu/bn.cpp) and CUDA
// (csrc/cuda/bn.cpp) entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

namespace convmixer_kernels {
namespace bn {

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

// A (C,) vector like `ref` (the op's first statistic): same device and dtype (float32 or float64), contiguous.
inline void check_stat(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ", ref_name,
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (the dtype of ",
              ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), name, ": expected shape (", ref.size(0), ",) (the shape of ",
              ref_name, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_first(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D (C,) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected dtype float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_params_args(const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  check_first(mean, "mean");
  check_stat(var, "var", mean, "mean");
  if (weight) check_stat(*weight, "weight", mean, "mean");
  if (bias) check_stat(*bias, "bias", mean, "mean");
  TORCH_CHECK(eps >= 0.0, "eps: expected a non-negative number, got ", eps);
}

inline void check_coefs_args(const at::Tensor& sum_g, const at::Tensor& sum_gxhat, const at::Tensor& scale,
                             const at::Tensor& invstd, double count) {
  check_first(sum_g, "sum_g");
  check_stat(sum_gxhat, "sum_gxhat", sum_g, "sum_g");
  check_stat(scale, "scale", sum_g, "sum_g");
  check_stat(invstd, "invstd", sum_g, "sum_g");
  TORCH_CHECK(count > 0.0, "count: expected the number of values per channel (> 0), got ", count);
}

// Host constants of the running update: momentum None is the cumulative average (needs num_batches_tracked).
struct RunningConsts {
  double unbias;    // count / max(count - 1, 1): biased -> unbiased variance
  double keep;      // 1 - momentum
  double momentum;  // 0 when cumulative
  bool cumulative;
};

inline RunningConsts check_running_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                        const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                                        const at::Tensor& var, double count, std::optional<double> momentum) {
  check_first(running_mean, "running_mean");
  check_stat(running_var, "running_var", running_mean, "running_mean");
  check_stat(mean, "mean", running_mean, "running_mean");
  check_stat(var, "var", running_mean, "running_mean");
  TORCH_CHECK(count > 0.0, "count: expected the number of values per channel (> 0), got ", count);
  if (num_batches_tracked) {
    const at::Tensor& n = *num_batches_tracked;
    TORCH_CHECK(n.device() == running_mean.device(), "num_batches_tracked: expected a tensor on ",
                running_mean.device(), " (the device of running_mean), got ", n.device());
    TORCH_CHECK(n.scalar_type() == at::kLong && n.numel() == 1, "num_batches_tracked: expected one int64 value, got ",
                n.scalar_type(), " of shape ", n.sizes());
  }
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value(),
              "num_batches_tracked: expected a tensor when momentum is None (the cumulative average divides by it)");
  const double m = momentum.value_or(0.0);
  return RunningConsts{count / std::max(count - 1.0, 1.0), 1.0 - m, m, !momentum.has_value()};
}

// What PyTorch's in-place ops do to the tensors they write, which a kernel writing through data pointers does
// not: bump their version counters (autograd's saved-tensor checks and ops.py's eval cache read them).
inline void bump_versions(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked) {
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
  if (num_batches_tracked) num_batches_tracked->unsafeGetTensorImpl()->bump_version();
}

}  // namespace bn
}  // namespace convmixer_kernels
