// The tiled depthwise kernels for k = 13 (one file per k: parallel build).
#define CMK_TILED_K 13
#include "dw_tiled_inst.cuh"
