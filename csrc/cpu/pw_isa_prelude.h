// Every header pw_impl.h and ATen's vec headers need, apart from the vec headers themselves.
// Each pw_isa_<isa>.cpp includes this BEFORE its `#pragma GCC target`, so the inline functions and
// templates of these headers (Tensor's methods among them) are compiled for the baseline CPU; only
// the code after the pragma uses the wider instruction set (see dw_isa_prelude.h for why).
#pragma once

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
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

#include "cpu/dw_isa_prelude.h"
#include "cpu/pw_kernels.h"
#include "common.h"
