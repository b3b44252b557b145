// The CUTLASS pointwise eval forward for bf16 (one file per dtype: parallel build; see pw_cutlass_gemm.cuh).
#define CMK_CUTLASS_E cutlass::bfloat16_t
#define CMK_CUTLASS_BF16 true
#include "pw_cutlass_gemm.cuh"
