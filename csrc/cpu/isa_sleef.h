// sleef.h for a per-ISA region (isa_<isa>_begin.h).  g++ lexes a C++ file before it parses the
// target pragma, so the ISA macros stay undefined; sleef.h declares its vector functions only under
// them (declarations, no code).  The AVX2 macros are set here around it; an AVX-512 region sets
// __AVX512F__ around this include.
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
