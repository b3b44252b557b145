// Interface between the CPU entry points (dw.cpp: checks, allocation, dispatch) and the
// kernels, which are compiled once per instruction set (dw_isa_<isa>.cpp include
// dw_impl.h under a target pragma).  Plain data only: no ATen types cross this boundary,
// so nothing inline is shared between translation units built for different CPUs.
#pragma once

#include <cstdint>

namespace convmixer_kernels {
namespace cpu {

enum class StorageType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

// Largest kernel size the kernels accept (dw.cpp checks it equals common.h's kMaxKernelSize).
constexpr int64_t kMaxK = 31;

// Sizes in elements.  Activation-shaped tensors (x, dy, pre, y, dx) are (N, C, H, W) in
// the storage dtype, NCHW-contiguous or channels_last-contiguous (`channels_last`); every
// other pointer is a contiguous array of the accumulation dtype (float, double for double).
// Pointers an op does not use are null.
struct DwParams {
  StorageType dtype = StorageType::kFloat;
  bool channels_last = false;
  int64_t N = 0, C = 0, H = 0, W = 0, k = 1;
  int act = 0;
  bool act_first = true;
  bool residual = false;
  // storage dtype
  const void* x = nullptr;
  const void* dy = nullptr;
  const void* pre = nullptr;  // input of dw_bwd_reduce / dw_bwd
  void* pre_out = nullptr;    // output of dw_conv_stats
  void* y = nullptr;
  void* dx = nullptr;
  // accumulation dtype, inputs
  const void* weight = nullptr;  // (C, 1, k, k)
  const void* bias = nullptr;    // (C,) or null
  const void* scale = nullptr;
  const void* shift = nullptr;
  const void* mean = nullptr;
  const void* invstd = nullptr;
  const void* ca = nullptr;
  const void* cb = nullptr;
  const void* cd = nullptr;
  // accumulation dtype, outputs
  void* out_mean = nullptr;
  void* out_var = nullptr;
  void* sum_g = nullptr;
  void* sum_gxhat = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
};

using DwKernelFn = void (*)(const DwParams&);

// The four ops for one instruction set.  Each writes every element of its outputs, works
// on pre-allocated outputs, and is deterministic: the split of work depends on the
// shapes only (not on the number of threads) and partial results are reduced in a fixed order.
struct DwKernels {
  DwKernelFn conv_stats;
  DwKernelFn fwd;
  DwKernelFn bwd_reduce;
  DwKernelFn bwd;
  const char* isa;
};

// The instruction set the CPU kernels use here: 0 default, 1 avx2 (+ FMA, F16C, BMI, BMI2, LZCNT,
// POPCNT), 2 avx512 (F, BW, VL, DQ): the widest that this CPU and PyTorch's own choice
// (ATEN_CPU_CAPABILITY) allow, lowered by CONVMIXER_KERNELS_CPU_ISA=default|avx2|avx512 (dw.cpp).
int cpu_isa_level();

// One per instruction set; the x86 ones exist only in GCC builds for x86-64.
namespace isa_default {
DwKernels kernels();
}
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVMIXER_KERNELS_CPU_X86_ISAS 1
namespace isa_avx2 {
DwKernels kernels();
}
namespace isa_avx512 {
DwKernels kernels();
}
#endif

}  // namespace cpu
}  // namespace convmixer_kernels
