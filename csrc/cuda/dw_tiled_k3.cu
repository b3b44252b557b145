// Explicit instantiations of the tiled depthwise kernels for k = 3 (one file per k: parallel build).
#include "dw_bwd_tiled.cuh"
#include "dw_fwd_tiled.cuh"

namespace convmixer_kernels {
namespace dwcuda {
#define CMK_INSTANTIATE(T, CL)                                                                          \
  template cudaError_t launch_fwd_tiled<T, 3, CL>(const TileArgs&, const TilePlan&, cudaStream_t); \
  template cudaError_t launch_bwd_tiled<T, 3, CL>(const TileArgs&, const TilePlan&, cudaStream_t);
CMK_INSTANTIATE(float, false)
CMK_INSTANTIATE(float, true)
CMK_INSTANTIATE(__half, false)
CMK_INSTANTIATE(__half, true)
CMK_INSTANTIATE(__nv_bfloat16, false)
CMK_INSTANTIATE(__nv_bfloat16, true)
#undef CMK_INSTANTIATE
}  // namespace dwcuda
}  // namespace convmixer_kernels
