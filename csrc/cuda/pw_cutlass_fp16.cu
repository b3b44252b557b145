// The CUTLASS pointwise eval forward for fp16 (one file per dtype: parallel build; see pw_cutlass_gemm.cuh).
#define CMK_CUTLASS_E cutlass::half_t
#define CMK_CUTLASS_BF16 false
#include "pw_cutlass_gemm.cuh"
