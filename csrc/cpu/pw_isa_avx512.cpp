// The pointwise/stem epilogue kernels for AVX-512 (F, BW, VL, DQ), chosen at run time (pw.cpp).  Only the code after
// isa_avx512_begin.h (ATen's vec classes in at::vec::AVX512 and pw_impl.h's anonymous namespace) is
// compiled for it; every other header comes in before it (pw_isa_prelude.h).
#include "cpu/pw_kernels.h"

#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
#include "cpu/pw_isa_prelude.h"

#include "cpu/isa_avx512_begin.h"
#define CMK_PW_ISA_NS pw_isa_avx512
#define CMK_PW_ISA_NAME "avx512"
#include "cpu/pw_impl.h"
#include "cpu/isa_end.h"
#endif
