// The CPU kernels for AVX2 + FMA, chosen at run time (dw.cpp).  Only the code after the
// pragma (ATen's vec classes in at::vec::AVX2 and dw_impl.h's anonymous namespace) is
// compiled for AVX2; every other header comes in before it (dw_isa_prelude.h).
#include "cpu/dw_kernels.h"

#if defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
#include "cpu/dw_isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// g++ lexes a C++ file before it parses the pragma, so the ISA macros stay undefined;
// sleef.h declares its vector functions only under them (declarations, no code).
#ifndef __AVX__
#define __AVX__ 1
#define CMK_UNDEF__AVX__
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define CMK_UNDEF__AVX2__
#endif
#include <sleef.h>
#ifdef CMK_UNDEF__AVX__
#undef __AVX__
#undef CMK_UNDEF__AVX__
#endif
#ifdef CMK_UNDEF__AVX2__
#undef __AVX2__
#undef CMK_UNDEF__AVX2__
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CMK_ISA_NS isa_avx2
#define CMK_ISA_NAME "avx2"
#include "cpu/dw_impl.h"
#pragma GCC pop_options
#endif
