// The CPU kernels of the depthwise block for AVX-512 (F, BW, VL, DQ), chosen at run time (dw.cpp).  Only the code after
// isa_avx512_begin.h (ATen's vec classes in at::vec::AVX512 and dw_impl.h's anonymous namespace) is
// compiled for it; every other header comes in before it (dw_isa_prelude.h).
#include "cpu/dw_kernels.h"

#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
#include "cpu/dw_isa_prelude.h"

#include "cpu/isa_avx512_begin.h"
#define CMK_ISA_NS isa_avx512
#define CMK_ISA_NAME "avx512"
#include "cpu/dw_impl.h"
#include "cpu/isa_end.h"
#endif
