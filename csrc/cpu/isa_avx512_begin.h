// Opens the avx512 region of a per-ISA kernel file (dw_isa_avx512.cpp, pw_isa_avx512.cpp).
// Include it after every other header (the file's prelude), then the kernels, then isa_end.h.
// Code after it is compiled for AVX-512 (F, BW, VL, DQ, + the AVX2 set)
// and sees ATen's vec classes as at::vec::AVX512 (CPU_CAPABILITY); the CPU must have these
// instructions (cpu_isa_level() in dw.cpp checks them) before any of it runs.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX512F__
#define __AVX512F__ 1
#define CMK_UNDEF__AVX512F__
#endif
#include "cpu/isa_sleef.h"
#ifdef CMK_UNDEF__AVX512F__
#undef __AVX512F__
#undef CMK_UNDEF__AVX512F__
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
