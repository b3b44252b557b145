// What the CUDA ops' host code (pw.cpp, dw.cpp, bn.cpp) takes from c10/cuda (device guard, current stream,
// C10_CUDA_CHECK), and check_on_device: a tensor must be on the device the ops run on.  Compiled by the
// CPU emulator of the CUDA kernels (tests/cuda_emu, CMK_EMULATE), the same host code runs on CPU tensors
// with the emulator's stand-ins (tests/cuda_emu/emu_host.h) and registers nothing (the TORCH_LIBRARY_IMPL
// blocks are left out there; the emulator binds the functions itself).
#pragma once

#include <ATen/core/Tensor.h>

#ifndef CMK_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#else
#include "emu_host.h"
#endif

namespace convmixer_kernels {

inline void check_on_device(const at::Tensor& t, const char* name) {
#ifndef CMK_EMULATE
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got a tensor on ", t.device());
#else
  (void)t;
  (void)name;
#endif
}

}  // namespace convmixer_kernels
