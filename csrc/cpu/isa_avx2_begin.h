// Opens the avx2 region of a per-ISA kernel file (dw_isa_avx2.cpp, pw_isa_avx2.cpp).
// Include it after every other header (the file's prelude), then the kernels, then isa_end.h.
// Code after it is compiled for AVX2 (+ FMA, F16C, BMI, BMI2, LZCNT, POPCNT)
// and sees ATen's vec classes as at::vec::AVX2 (CPU_CAPABILITY); the CPU must have these
// instructions (cpu_isa_level() in dw.cpp checks them) before any of it runs.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu/isa_sleef.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
