// Host-side interface between the CUDA entry points (dw.cpp, compiled by the host compiler with
// ATen) and the kernels (dw_*.cu, compiled by nvcc without ATen).  Only plain types cross it: raw
// pointers, sizes in elements, a dtype code, and the stream.  Every launcher returns the
// cudaError_t of its launches (cudaGetLastError after each one); dw.cpp turns it into an error.
//
// The ops (exact semantics: convmixer_kernels/torch_ops.py):
//   dw_conv_stats: pre = round_T(dwconv_k(x) + b); mean, var (biased) of u = act(pre) or pre
//   dw_fwd:        y = [x +] (scale * act(pre) + shift  |  act(scale * pre + shift))
//   dw_bwd_reduce: sum_g = sum g, sum_gxhat = sum g * (u - mean) * invstd   (per channel)
//   dw_bwd:        dx = conv_transpose(dpre, w) [+ dy], dweight = corr(x, dpre), dbias = sum dpre
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace convmixer_kernels {
namespace dwcuda {

// Storage dtype of x, dy, pre, y, dx.  Parameters, vectors and partial sums are always float.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Geometry of one call: x is (N, C, H, W), NCHW-contiguous (cl = false) or channels_last (cl = true).
struct DwGeom {
  int64_t N, C, H, W;
  int k;      // odd kernel size, 1..31
  bool cl;    // channels_last
  DType dtype;
};

// Float workspaces the entry point allocates (as ATen tensors, so no cudaMalloc happens inside a
// launch and CUDA graphs can capture the ops).  part: per-block partial results; dpre: the
// gradient at the conv output, materialised by the generic (runtime-k) backward path and by the
// channels_last tiled backward's dpre pass.
struct DwWorkspace {
  int64_t part = 1;  // floats (at least 1 so the tensor is never empty)
  int64_t dpre = 1;  // floats
};

DwWorkspace dw_conv_stats_workspace(const DwGeom& g);
DwWorkspace dw_bwd_reduce_workspace(const DwGeom& g);
DwWorkspace dw_bwd_workspace(const DwGeom& g);

// Launchers.  bias may be nullptr.  Activation-shaped pointers point at storage dtype elements.
cudaError_t dw_conv_stats_launch(const DwGeom& g, const void* x, const float* weight, const float* bias,
                                 int act, bool act_first, void* pre, float* mean, float* var,
                                 float* part, cudaStream_t stream);

cudaError_t dw_fwd_launch(const DwGeom& g, const void* x, const float* weight, const float* bias,
                          const float* scale, const float* shift, int act, bool act_first,
                          bool residual, void* y, cudaStream_t stream);

cudaError_t dw_bwd_reduce_launch(const DwGeom& g, const void* dy, const void* pre, const float* scale,
                                 const float* shift, const float* mean, const float* invstd, int act,
                                 bool act_first, float* sum_g, float* sum_gxhat, float* part,
                                 cudaStream_t stream);

cudaError_t dw_bwd_launch(const DwGeom& g, const void* dy, const void* x, const void* pre,
                          const float* weight, const float* scale, const float* shift,
                          const float* mean, const float* ca, const float* cb, const float* cd,
                          int act, bool act_first, bool residual, void* dx, float* dweight,
                          float* dbias, float* part, float* dpre, cudaStream_t stream);

}  // namespace dwcuda
}  // namespace convmixer_kernels
