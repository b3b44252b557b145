// The per-channel BatchNorm bookkeeping around a block op, one formula for the CPU loops (csrc/cpu/bn.cpp)
// and the CUDA kernels (csrc/cuda/bn_kernels.cu).  Each product and sum is rounded on its own, in the order
// of the PyTorch expressions these ops replace (convmixer_kernels/ops.py, functional.py), so nvcc cannot
// contract them into FMAs and the CPU and GPU give the same values.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CMK_BN_HD __host__ __device__
#else
#define CMK_BN_HD
#endif

namespace convmixer_kernels {
namespace bn {

#if defined(__CUDA_ARCH__)
CMK_BN_HD inline float mul(float a, float b) { return __fmul_rn(a, b); }
CMK_BN_HD inline double mul(double a, double b) { return __dmul_rn(a, b); }
CMK_BN_HD inline float add(float a, float b) { return __fadd_rn(a, b); }
CMK_BN_HD inline double add(double a, double b) { return __dadd_rn(a, b); }
CMK_BN_HD inline float sub(float a, float b) { return __fsub_rn(a, b); }
CMK_BN_HD inline double sub(double a, double b) { return __dsub_rn(a, b); }
#else
template <typename T>
inline T mul(T a, T b) { return a * b; }
template <typename T>
inline T add(T a, T b) { return a + b; }
template <typename T>
inline T sub(T a, T b) { return a - b; }
#endif

// invstd = 1 / sqrt(var + eps), scale = gamma * invstd, shift = beta - mean * scale (gamma 1, beta 0 when
// the norm has no affine parameters).  Correctly rounded sqrt and division (torch.rsqrt on a GPU is not).
template <typename T>
CMK_BN_HD inline void params(T mean, T var, T gamma, T beta, T eps, T& invstd, T& scale, T& shift) {
  invstd = T(1) / std::sqrt(add(var, eps));
  scale = mul(gamma, invstd);
  shift = sub(beta, mul(mean, scale));
}

// The coefficients of dpre_in = ca*g + cb*(u - mean) + cd with ca = scale (torch_ops.dw_bwd), in training
// (batch statistics): cb = -scale * invstd * sum(g xhat) / count, cd = -scale * sum(g) / count.
template <typename T>
CMK_BN_HD inline void bwd_coefs(T scale, T invstd, T sum_g, T sum_gxhat, T count, T& cb, T& cd) {
  cb = mul(mul(-scale, invstd), sum_gxhat) / count;
  cd = mul(-scale, sum_g) / count;
}

// nn.BatchNorm2d's running update of one statistic r with the batch value b: r * (1 - momentum) + momentum * b,
// or, momentum None (cumulative average), r + (b - r) * factor with factor = 1 / num_batches_tracked.
template <typename T>
CMK_BN_HD inline T running(T r, T b, T keep, T momentum, bool cumulative, T factor) {
  return cumulative ? add(r, mul(sub(b, r), factor)) : add(mul(r, keep), mul(momentum, b));
}

}  // namespace bn
}  // namespace convmixer_kernels
