// The pointwise/stem epilogue kernels at the baseline ISA, for CPUs other than x86-64 (ATen's
// Vectorized for that architecture).  On x86-64 this file is empty: there generic Vectorized
// turned the epilogues into scalar libm calls (GELU cost more than the GEMM), so without AVX2 pw.cpp
// runs the ATen-composite epilogues instead.
#include "cpu/pw_kernels.h"

#if !defined(CONVMIXER_KERNELS_CPU_X86_ISAS)
#include "cpu/pw_isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CMK_PW_ISA_NS pw_isa_default
#define CMK_PW_ISA_NAME "default"
#include "cpu/pw_impl.h"
#endif
