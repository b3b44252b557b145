// The tiled depthwise kernels for k = 15 (one file per k: parallel build).
#define CMK_TILED_K 15
#include "dw_tiled_inst.cuh"
