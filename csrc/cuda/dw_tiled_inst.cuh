// Explicit instantiations of the tiled depthwise kernels for one kernel size, CMK_TILED_K, in every
// storage dtype and both layouts.  Each dw_tiled_k<K>.cu defines CMK_TILED_K and includes this: one
// translation unit per k, so the heavy instantiations compile in parallel.
#include "dw_bwd_cl_regs.cuh"
#include "dw_bwd_tiled.cuh"
#include "dw_fwd_tiled.cuh"

#ifndef CMK_TILED_K
#error "define CMK_TILED_K before including dw_tiled_inst.cuh"
#endif

namespace convmixer_kernels {
namespace dwcuda {
#define CMK_INSTANTIATE(T, CL)                                                                                 \
  template cudaError_t launch_fwd_tiled<T, CMK_TILED_K, CL>(const TileArgs&, const TilePlan&, cudaStream_t); \
  template cudaError_t launch_bwd_tiled<T, CMK_TILED_K, CL>(const TileArgs&, const TilePlan&, cudaStream_t);
CMK_INSTANTIATE(float, false)
CMK_INSTANTIATE(float, true)
CMK_INSTANTIATE(__half, false)
CMK_INSTANTIATE(__half, true)
CMK_INSTANTIATE(__nv_bfloat16, false)
CMK_INSTANTIATE(__nv_bfloat16, true)
#undef CMK_INSTANTIATE
#if CMK_TILED_K <= 7
template cudaError_t launch_bwd_cl_regs<float, CMK_TILED_K>(const TileArgs&, const TilePlan&, cudaStream_t);
template cudaError_t launch_bwd_cl_regs<__half, CMK_TILED_K>(const TileArgs&, const TilePlan&, cudaStream_t);
template cudaError_t launch_bwd_cl_regs<__nv_bfloat16, CMK_TILED_K>(const TileArgs&, const TilePlan&, cudaStream_t);
#endif
}  // namespace dwcuda
}  // namespace convmixer_kernels
