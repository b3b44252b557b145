// The CUTLASS pointwise training forward (statistics in the epilogue) for bf16: one file per dtype, built in
// parallel (see pw_cutlass_stats.cuh).
#define CMK_CUTLASS_E cutlass::bfloat16_t
#define CMK_CUTLASS_BF16 true
#include "pw_cutlass_stats.cuh"
