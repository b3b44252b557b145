// Launchers of the per-channel BatchNorm kernels (bn_kernels.cu): the (C,) vectors around a block op, one
// launch each where PyTorch ops took five to seven.  Raw pointers only (no ATen), as pw.cuh; T is float or
// double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace convmixer_kernels {
namespace bncuda {

// invstd, scale, shift from mean, var (bn_math.h params); gamma, beta nullable (1, 0).
template <typename T>
cudaError_t launch_params(const T* mean, const T* var, const T* gamma, const T* beta, T eps, int64_t C, T* invstd,
                          T* scale, T* shift, cudaStream_t stream);

// cb, cd of the backward (bn_math.h bwd_coefs), or zeros without batch statistics.
template <typename T>
cudaError_t launch_bwd_coefs(const T* sum_g, const T* sum_gxhat, const T* scale, const T* invstd, T count,
                             bool batch_stats, int64_t C, T* cb, T* cd, cudaStream_t stream);

// The running update in place; nbt (nullable) is incremented once, and with `cumulative` the factor is
// 1 / (its value after the increment).  One block: every thread reads nbt before thread 0 writes it.
template <typename T>
cudaError_t launch_update_running(T* running_mean, T* running_var, int64_t* nbt, const T* mean, const T* var,
                                  T unbias, T keep, T momentum, bool cumulative, int64_t C, cudaStream_t stream);

}  // namespace bncuda
}  // namespace convmixer_kernels
