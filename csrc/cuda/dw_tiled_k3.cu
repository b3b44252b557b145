// The tiled depthwise kernels for k = 3 (one file per k: parallel build).
#define CMK_TILED_K 3
#include "dw_tiled_inst.cuh"
