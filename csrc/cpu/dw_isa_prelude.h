// Everything dw_impl.h and ATen's vec headers include apart from the vec headers
// themselves.  Each dw_isa_<isa>.cpp includes this BEFORE its `#pragma GCC target`, so
// inline functions and templates of these headers are compiled for the baseline CPU; only
// the code after the pragma (and sleef.h, which declares its vector functions only when the
// target has the instructions: declarations only) (ATen's vec classes in their at::vec::<ISA> namespace and
// our kernels in an anonymous namespace) uses the wider instruction set.  Without this, a
// shared inline function (say a c10::Half conversion) could be emitted with AVX-512
// instructions in one object file and picked by the linker for every caller.
#pragma once

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <x86intrin.h>
#endif

#include "common.h"  // poison_outputs
#include "cpu/dw_kernels.h"
