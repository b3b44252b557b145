// The CPU kernels of the depthwise block for AVX2 + FMA + F16C, chosen at run time (dw.cpp).  Only the code after
// isa_avx2_begin.h (ATen's vec classes in at::vec::AVX2 and dw_impl.h's anonymous namespace) is
// compiled for it; every other header comes in before it (dw_isa_prelude.h).
#include "cpu/dw_kernels.h"

#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
#include "cpu/dw_isa_prelude.h"

#include "cpu/isa_avx2_begin.h"
#define CMK_ISA_NS isa_avx2
#define CMK_ISA_NAME "avx2"
#include "cpu/dw_impl.h"
#include "cpu/isa_end.h"
#endif
