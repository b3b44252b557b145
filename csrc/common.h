// Shared argument checks and small helpers for every C++ entry point (CPU and CUDA).
// Kernels own arithmetic only; these checks make a wrong tensor impossible to pass:
// each failure names the argument and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <string>

#include <ATen/ops/empty.h>

namespace convmixer_kernels {

// Activation codes (must match convmixer_kernels/torch_ops.py::ACTIVATIONS).
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kRelu6 = 5, kHardswish = 6 };

constexpr int64_t kMaxKernelSize = 31;

inline void check_act(int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 6,
              "act: expected an activation code in 0..6 (identity, relu, gelu, gelu_tanh, silu, relu6, hardswish), "
              "got ", act);
}

// Memory format of a 4-D activation tensor: NCHW-contiguous or channels_last-contiguous.
// Anything else is rejected (the Python layer makes the one documented copy before calling).
inline bool is_channels_last(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D (N, C, H, W) tensor, got ", t.dim(), "-D");
  if (t.is_contiguous()) return false;
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              ": expected an NCHW-contiguous or channels_last-contiguous tensor, got strides ",
              t.strides());
  return true;
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, name, ": expected a tensor on ", dev, " (the device of x), got ",
              t.device());
}

// Storage dtypes accepted for activations on a backend.
inline void check_storage_dtype(const at::Tensor& t, const char* name, bool allow_double) {
  auto d = t.scalar_type();
  bool ok = d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || (allow_double && d == at::kDouble);
  TORCH_CHECK(ok, name, ": expected dtype float32, float16 or bfloat16",
              allow_double ? " (or float64 on CPU)" : "", ", got ", d);
}

// Accumulation dtype for a storage dtype: float64 for float64, else float32.
inline at::ScalarType acc_type_for(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// An activation-shaped tensor of the given sizes with x's device, dtype and memory format (dy, pre of
// the pointwise/stem ops, whose C_out or spatial size differs from x's).
inline void check_act_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef sizes,
                             bool cl) {
  check_device(t, name, x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, ": expected shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(format_of(cl)), name, ": expected the memory format of x (",
              cl ? "channels_last" : "NCHW-contiguous", "), got strides ", t.strides());
}

// An activation-shaped tensor that must match x exactly (dtype, shape, device, memory format).
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, bool x_cl) {
  check_device(t, name, x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), " (the shape of x), got ",
              t.sizes());
  TORCH_CHECK(is_channels_last(t, name) == x_cl, name, ": expected the memory format of x (",
              x_cl ? "channels_last" : "NCHW-contiguous", ")");
}

// A per-channel vector: shape (C,), accumulation dtype, contiguous, on x's device.
inline void check_vec(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_device(t, name, x.device());
  auto acc = acc_type_for(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, ": expected shape (", x.size(1),
              ",) (one value per channel of x), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// Depthwise weight (C, 1, k, k) in the accumulation dtype; returns k.
inline int64_t check_dw_weight(const at::Tensor& w, const at::Tensor& x) {
  check_device(w, "weight", x.device());
  auto acc = acc_type_for(x.scalar_type());
  TORCH_CHECK(w.scalar_type() == acc, "weight: expected dtype ", acc, ", got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3),
              "weight: expected shape (C, 1, k, k) with C = ", x.size(1), " (channels of x), got ",
              w.sizes());
  const int64_t k = w.size(2);
  TORCH_CHECK(k % 2 == 1 && k >= 1 && k <= kMaxKernelSize,
              "weight: expected an odd kernel size k in 1..", kMaxKernelSize, ", got k = ", k);
  TORCH_CHECK(w.is_contiguous(), "weight: expected a contiguous tensor");
  return k;
}

}  // namespace convmixer_kernels

namespace convmixer_kernels {
// Output allocation.  With CONVMIXER_KERNELS_POISON_OUTPUTS=1 in the environment every output
// starts as NaN (tests set it), so an element a kernel forgets to write fails the comparison.
inline bool poison_outputs() {
  const char* v = std::getenv("CONVMIXER_KERNELS_POISON_OUTPUTS");
  return v != nullptr && v[0] == '1';
}
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                             at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  at::Tensor t = at::empty(sizes, opts.memory_format(fmt));
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}
}  // namespace convmixer_kernels
