// The CPU kernels for any CPU: ATen's generic Vectorized (plain arrays the compiler
// vectorizes at the baseline ISA).  See dw_impl.h.
#include "cpu/dw_isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CMK_ISA_NS isa_default
#define CMK_ISA_NAME "default"
#include "cpu/dw_impl.h"
