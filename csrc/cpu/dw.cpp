// CPU entry points of the fused depthwise block: argument checks, output allocation and
// the choice of kernels for this CPU.  The arithmetic is in dw_impl.h, compiled once per
// instruction set (dw_isa_default.cpp, dw_isa_avx2.cpp, dw_isa_avx512.cpp).
//
//   dw_conv_stats_cpu == torch_ops.dw_conv_stats, dw_fwd_cpu == torch_ops.dw_fwd,
//   dw_bwd_reduce_cpu == torch_ops.dw_bwd_reduce, dw_bwd_cpu == torch_ops.dw_bwd
//
// Instruction set: the widest of default / avx2 / avx512 that both this CPU and PyTorch's
// own choice allow (so ATEN_CPU_CAPABILITY=avx2 or =default lowers it as for ATen's
// kernels); CONVMIXER_KERNELS_CPU_ISA=default|avx2|avx512 lowers it further (tests use it
// to cover every build of the kernels on one machine).
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "common.h"
#include "cpu/dw_kernels.h"

namespace convmixer_kernels {
namespace cpu {

static_assert(kMaxK == kMaxKernelSize, "dw_kernels.h kMaxK must match common.h");

namespace {

using at::Tensor;

// 0 default, 1 avx2, 2 avx512
int isa_level_from_name(const std::string& s, int fallback) {
  std::string l;
  for (char ch : s) l += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (l.rfind("avx512", 0) == 0) return 2;  // "avx512" (and any "avx512_..." variant)
  if (l.rfind("avx2", 0) == 0) return 1;
  if (l == "default" || l == "no avx") return 0;
  return fallback;
}

int hardware_isa_level() {
#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
  static const int level = [] {
    __builtin_cpu_init();
    int cpu = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt") &&
        __builtin_cpu_supports("abm"))  // abm: lzcnt
      cpu = 1;
    if (cpu == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      cpu = 2;
    const int torch_level = isa_level_from_name(at::get_cpu_capability(), 0);
    return cpu < torch_level ? cpu : torch_level;
  }();
  return level;
#else
  return 0;
#endif
}

}  // namespace

int cpu_isa_level() {
  int level = hardware_isa_level();
  if (const char* req = std::getenv("CONVMIXER_KERNELS_CPU_ISA")) {  // read per call: tests set it
    const int want = isa_level_from_name(req, level);
    if (want < level) level = want;
  }
  return level;
}

namespace {

const DwKernels& kernels_for_this_cpu() {
  static const DwKernels k_default = isa_default::kernels();
#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
  static const DwKernels k_avx2 = isa_avx2::kernels();
  static const DwKernels k_avx512 = isa_avx512::kernels();
#endif
  const int level = cpu_isa_level();
#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
  if (level >= 2) return k_avx512;
  if (level == 1) return k_avx2;
#endif
  return k_default;
}

StorageType storage_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return StorageType::kFloat;
    case at::kHalf: return StorageType::kHalf;
    case at::kBFloat16: return StorageType::kBFloat16;
    case at::kDouble: return StorageType::kDouble;
    default: TORCH_CHECK(false, "unreachable: storage dtype ", t.scalar_type());
  }
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

// x (or the tensor that plays its part): 4-D, CPU, storage dtype; returns channels_last.
bool check_x(const Tensor& x, const char* name) {
  check_cpu(x, name);
  check_storage_dtype(x, name, /*allow_double=*/true);
  return is_channels_last(x, name);  // checks 4-D and the memory format
}

void check_bias(const std::optional<Tensor>& bias, const Tensor& x) {
  if (bias.has_value() && bias->defined()) check_vec(*bias, "bias", x);
}

void set_sizes(DwParams& P, const Tensor& x, bool cl) {
  P.dtype = storage_type(x);
  P.channels_last = cl;
  P.N = x.size(0);
  P.C = x.size(1);
  P.H = x.size(2);
  P.W = x.size(3);
}

at::TensorOptions acc_options(const Tensor& x) { return x.options().dtype(acc_type_for(x.scalar_type())); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> dw_conv_stats_cpu(const Tensor& x, const Tensor& weight,
                                                     const std::optional<Tensor>& bias, int64_t act,
                                                     bool act_first) {
  const bool cl = check_x(x, "x");
  const int64_t k = check_dw_weight(weight, x);
  check_bias(bias, x);
  check_act(act);
  Tensor pre = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor mean = new_output({x.size(1)}, acc_options(x));
  Tensor var = new_output({x.size(1)}, acc_options(x));
  DwParams P;
  set_sizes(P, x, cl);
  P.k = k;
  P.act = static_cast<int>(act);
  P.act_first = act_first;
  P.x = x.const_data_ptr();
  P.weight = weight.const_data_ptr();
  P.bias = (bias.has_value() && bias->defined()) ? bias->const_data_ptr() : nullptr;
  P.pre_out = pre.data_ptr();
  P.out_mean = mean.data_ptr();
  P.out_var = var.data_ptr();
  kernels_for_this_cpu().conv_stats(P);
  return {pre, mean, var};
}

Tensor dw_fwd_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& scale,
                  const Tensor& shift, int64_t act, bool act_first, bool residual) {
  const bool cl = check_x(x, "x");
  const int64_t k = check_dw_weight(weight, x);
  check_bias(bias, x);
  check_vec(scale, "scale", x);
  check_vec(shift, "shift", x);
  check_act(act);
  Tensor y = new_output(x.sizes(), x.options(), format_of(cl));
  DwParams P;
  set_sizes(P, x, cl);
  P.k = k;
  P.act = static_cast<int>(act);
  P.act_first = act_first;
  P.residual = residual;
  P.x = x.const_data_ptr();
  P.weight = weight.const_data_ptr();
  P.bias = (bias.has_value() && bias->defined()) ? bias->const_data_ptr() : nullptr;
  P.scale = scale.const_data_ptr();
  P.shift = shift.const_data_ptr();
  P.y = y.data_ptr();
  kernels_for_this_cpu().fwd(P);
  return y;
}

std::tuple<Tensor, Tensor> dw_bwd_reduce_cpu(const Tensor& dy, const Tensor& pre, const Tensor& scale,
                                             const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                             int64_t act, bool act_first) {
  const bool cl = check_x(pre, "pre");
  check_like_x(dy, "dy", pre, cl);
  check_vec(scale, "scale", pre);
  check_vec(shift, "shift", pre);
  check_vec(mean, "mean", pre);
  check_vec(invstd, "invstd", pre);
  check_act(act);
  Tensor sum_g = new_output({pre.size(1)}, acc_options(pre));
  Tensor sum_gxhat = new_output({pre.size(1)}, acc_options(pre));
  DwParams P;
  set_sizes(P, pre, cl);
  P.act = static_cast<int>(act);
  P.act_first = act_first;
  P.dy = dy.const_data_ptr();
  P.pre = pre.const_data_ptr();
  P.scale = scale.const_data_ptr();
  P.shift = shift.const_data_ptr();
  P.mean = mean.const_data_ptr();
  P.invstd = invstd.const_data_ptr();
  P.sum_g = sum_g.data_ptr();
  P.sum_gxhat = sum_gxhat.data_ptr();
  kernels_for_this_cpu().bwd_reduce(P);
  return {sum_g, sum_gxhat};
}

std::tuple<Tensor, Tensor, Tensor> dw_bwd_cpu(const Tensor& dy, const Tensor& x, const Tensor& pre,
                                              const Tensor& weight, const Tensor& scale, const Tensor& shift,
                                              const Tensor& mean, const Tensor& ca, const Tensor& cb,
                                              const Tensor& cd, int64_t act, bool act_first, bool residual) {
  const bool cl = check_x(x, "x");
  check_like_x(dy, "dy", x, cl);
  check_like_x(pre, "pre", x, cl);
  const int64_t k = check_dw_weight(weight, x);
  check_vec(scale, "scale", x);
  check_vec(shift, "shift", x);
  check_vec(mean, "mean", x);
  check_vec(ca, "ca", x);
  check_vec(cb, "cb", x);
  check_vec(cd, "cd", x);
  check_act(act);
  Tensor dx = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor dweight = new_output(weight.sizes(), acc_options(x));
  Tensor dbias = new_output({x.size(1)}, acc_options(x));
  DwParams P;
  set_sizes(P, x, cl);
  P.k = k;
  P.act = static_cast<int>(act);
  P.act_first = act_first;
  P.residual = residual;
  P.dy = dy.const_data_ptr();
  P.x = x.const_data_ptr();
  P.pre = pre.const_data_ptr();
  P.weight = weight.const_data_ptr();
  P.scale = scale.const_data_ptr();
  P.shift = shift.const_data_ptr();
  P.mean = mean.const_data_ptr();
  P.ca = ca.const_data_ptr();
  P.cb = cb.const_data_ptr();
  P.cd = cd.const_data_ptr();
  P.dx = dx.data_ptr();
  P.dweight = dweight.data_ptr();
  P.dbias = dbias.data_ptr();
  kernels_for_this_cpu().bwd(P);
  return {dx, dweight, dbias};
}

}  // namespace cpu
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("dw_conv_stats", &convmixer_kernels::cpu::dw_conv_stats_cpu);
  m.impl("dw_fwd", &convmixer_kernels::cpu::dw_fwd_cpu);
  m.impl("dw_bwd_reduce", &convmixer_kernels::cpu::dw_bwd_reduce_cpu);
  m.impl("dw_bwd", &convmixer_kernels::cpu::dw_bwd_cpu);
}
