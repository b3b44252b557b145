// The CUTLASS pointwise eval forward for fp16, cooperative schedule (one file per dtype and schedule: parallel
// build; see pw_cutlass_gemm.cuh).
#define CMK_CUTLASS_E cutlass::half_t
#define CMK_CUTLASS_BF16 false
#define CMK_CUTLASS_PINGPONG false
#include "pw_cutlass_gemm.cuh"
