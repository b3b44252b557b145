// The CUTLASS pointwise training forward (statistics in the epilogue) for fp16: one file per dtype, built in
// parallel (see pw_cutlass_stats.cuh).
#define CMK_CUTLASS_E cutlass::half_t
#define CMK_CUTLASS_BF16 false
#include "pw_cutlass_stats.cuh"
