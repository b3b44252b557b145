// The pointwise/stem epilogue kernels for AVX2 + FMA + F16C, chosen at run time (pw.cpp).  Only the code after
// isa_avx2_begin.h (ATen's vec classes in at::vec::AVX2 and pw_impl.h's anonymous namespace) is
// compiled for it; every other header comes in before it (pw_isa_prelude.h).
#include "cpu/pw_kernels.h"

#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
#include "cpu/pw_isa_prelude.h"

#include "cpu/isa_avx2_begin.h"
#define CMK_PW_ISA_NS pw_isa_avx2
#define CMK_PW_ISA_NAME "avx2"
#include "cpu/pw_impl.h"
#include "cpu/isa_end.h"
#endif
