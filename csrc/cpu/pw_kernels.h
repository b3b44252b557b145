// Interface between the CPU entry points of the pointwise / stem / elementwise-BN ops (pw.cpp:
// checks, allocation, GEMMs, dispatch) and their vectorized epilogue kernels, compiled once per
// instruction set: pw_isa_<isa>.cpp include pw_impl.h after every header it needs and under a
// target pragma, so only the kernels (in an anonymous namespace) and ATen's vec classes (in their
// at::vec::<ISA> namespace) use the wider instructions; everything inline from the headers, Tensor's
// methods included, is compiled for the baseline CPU in every translation unit.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "cpu/dw_kernels.h"

namespace convmixer_kernels {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Geometry of an activation-shaped tensor (N, C, H, W) as flat segments:
//   channels_last: N*H*W rows of C channels (per-channel values vary along a segment);
//   NCHW:          N*C planes of H*W pixels (one channel per segment).

struct Geo {
  bool cl;
  int64_t N, C, L;  // L = H*W
  int64_t segments() const { return cl ? N * L : N * C; }
  int64_t seg_len() const { return cl ? C : L; }
};

inline Geo geo_of(const at::Tensor& t, bool cl) { return Geo{cl, t.size(0), t.size(1), t.size(2) * t.size(3)}; }

struct BwdVecs {  // per-channel vectors of the BN backward, accumulation dtype
  const void *scale, *shift, *mean, *ca, *cb, *cd;
};

// Parallel-for grain: items per task so that a task has at least ATen's grain of elements
// (small ops stay on one thread: a parallel region costs more than they do).
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elems_per_item, 1));
}

// The four epilogues (see pw_impl.h).  Each writes every element of its outputs; reductions are
// deterministic (the split depends on shapes only; partials merge in a fixed order).
struct PwVecKernels {
  // s = x [+ t] in the acc dtype.
  void (*operand)(const at::Tensor& x, const at::Tensor* t, const at::Tensor& s);
  // pre = round(G + bias) (G may be pre), per-channel mean and biased var of u.
  void (*stats)(const Geo& g, const at::Tensor& G, const at::Tensor* bias, const at::Tensor& pre, int act,
                bool act_first, const at::Tensor& mean, const at::Tensor& var);
  // y = bn_act(v) [+ residual]: v = round(in + bias) for an acc-dtype `in` (a GEMM result), v = in for
  // y's dtype; residual (nullable) has y's dtype and layout.
  void (*fwd)(const Geo& g, const at::Tensor& in, const at::Tensor* bias, const at::Tensor& scale,
              const at::Tensor& shift, const at::Tensor* residual, const at::Tensor& y, int act, bool act_first);
  // dpre into `out` (pre's dtype or the acc dtype); per-channel sum into dbias (nullable).
  void (*dpre)(const Geo& g, const at::Tensor& dy, const at::Tensor& pre, const BwdVecs& P, int act,
               bool act_first, const at::Tensor& out, const at::Tensor* dbias);
  const char* isa;
};

namespace pw_isa_default {
PwVecKernels kernels();
}
#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
namespace pw_isa_avx2 {
PwVecKernels kernels();
}
namespace pw_isa_avx512 {
PwVecKernels kernels();
}
#endif

}  // namespace cpu
}  // namespace convmixer_kernels
