// The tiled depthwise kernels for k = 11 (one file per k: parallel build).
#define CMK_TILED_K 11
#include "dw_tiled_inst.cuh"
