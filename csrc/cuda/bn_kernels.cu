// The per-channel BatchNorm kernels behind bn_params, bn_bwd_coefs and bn_update_running (bn.cuh).  A
// (C,) vector is a few KB: these are launch-bound, so each op is one launch (its PyTorch composite was
// five to seven kernels and their host time).  The arithmetic is bn_math.h's, shared with the CPU.
#include "bn_math.h"
#include "cuda/bn.cuh"
#include "cuda/launch.cuh"

namespace convmixer_kernels {
namespace bncuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t C) {
  const int64_t b = (C + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b > 0 ? b : 1);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) params_kernel(const T* __restrict__ mean, const T* __restrict__ var,
                                                          const T* __restrict__ gamma, const T* __restrict__ beta,
                                                          T eps, int64_t C, T* __restrict__ invstd,
                                                          T* __restrict__ scale, T* __restrict__ shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  bn::params<T>(mean[c], var[c], gamma != nullptr ? gamma[c] : T(1), beta != nullptr ? beta[c] : T(0), eps, invstd[c],
                scale[c], shift[c]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_coefs_kernel(const T* __restrict__ sum_g,
                                                             const T* __restrict__ sum_gxhat,
                                                             const T* __restrict__ scale,
                                                             const T* __restrict__ invstd, T count, bool batch_stats,
                                                             int64_t C, T* __restrict__ cb, T* __restrict__ cd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  if (batch_stats) {
    bn::bwd_coefs<T>(scale[c], invstd[c], sum_g[c], sum_gxhat[c], count, cb[c], cd[c]);
  } else {
    cb[c] = T(0);
    cd[c] = T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) update_running_kernel(T* __restrict__ rm, T* __restrict__ rv,
                                                                  int64_t* __restrict__ nbt,
                                                                  const T* __restrict__ mean,
                                                                  const T* __restrict__ var, T unbias, T keep,
                                                                  T momentum, bool cumulative, int64_t C) {
  const int64_t n = nbt != nullptr ? *nbt + 1 : 0;  // the count after this batch
  const T factor = cumulative ? static_cast<T>(1.0 / static_cast<double>(n)) : T(0);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    rm[c] = bn::running<T>(rm[c], mean[c], keep, momentum, cumulative, factor);
    rv[c] = bn::running<T>(rv[c], bn::mul(var[c], unbias), keep, momentum, cumulative, factor);
  }
  __syncthreads();  // every thread has read nbt
  if (threadIdx.x == 0 && nbt != nullptr) *nbt = n;
}

}  // namespace

template <typename T>
cudaError_t launch_params(const T* mean, const T* var, const T* gamma, const T* beta, T eps, int64_t C, T* invstd,
                          T* scale, T* shift, cudaStream_t stream) {
  CMK_LAUNCH(params_kernel<T>, blocks_for(C), kThreads, 0, stream)(mean, var, gamma, beta, eps, C, invstd, scale,
                                                                    shift);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_coefs(const T* sum_g, const T* sum_gxhat, const T* scale, const T* invstd, T count,
                             bool batch_stats, int64_t C, T* cb, T* cd, cudaStream_t stream) {
  CMK_LAUNCH(bwd_coefs_kernel<T>, blocks_for(C), kThreads, 0, stream)(sum_g, sum_gxhat, scale, invstd, count,
                                                                       batch_stats, C, cb, cd);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_update_running(T* running_mean, T* running_var, int64_t* nbt, const T* mean, const T* var,
                                  T unbias, T keep, T momentum, bool cumulative, int64_t C, cudaStream_t stream) {
  CMK_LAUNCH(update_running_kernel<T>, 1, kThreads, 0, stream)(running_mean, running_var, nbt, mean, var, unbias,
                                                                keep, momentum, cumulative, C);
  return cudaGetLastError();
}

#define CMK_BN_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_params<T>(const T*, const T*, const T*, const T*, T, int64_t, T*, T*, T*,         \
                                        cudaStream_t);                                                          \
  template cudaError_t launch_bwd_coefs<T>(const T*, const T*, const T*, const T*, T, bool, int64_t, T*, T*,    \
                                           cudaStream_t);                                                       \
  template cudaError_t launch_update_running<T>(T*, T*, int64_t*, const T*, const T*, T, T, T, bool, int64_t, \
                                                cudaStream_t);
CMK_BN_INSTANTIATE(float)
CMK_BN_INSTANTIATE(double)
#undef CMK_BN_INSTANTIATE

}  // namespace bncuda
}  // namespace convmixer_kernels
