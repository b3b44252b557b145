// The tiled depthwise kernels for k = 5 (one file per k: parallel build).
#define CMK_TILED_K 5
#include "dw_tiled_inst.cuh"
