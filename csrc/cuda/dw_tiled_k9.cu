// The tiled depthwise kernels for k = 9 (one file per k: parallel build).
#define CMK_TILED_K 9
#include "dw_tiled_inst.cuh"
