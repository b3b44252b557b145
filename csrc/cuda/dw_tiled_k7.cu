// The tiled depthwise kernels for k = 7 (one file per k: parallel build).
#define CMK_TILED_K 7
#include "dw_tiled_inst.cuh"
