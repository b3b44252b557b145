// Stand-ins for the c10/cuda pieces the CUDA ops' host code uses (csrc/cuda/cuda_host.h), when the CPU
// emulator compiles csrc/cuda/{pw,dw,bn}.cpp (tests/cuda_emu/emu_host_*.cpp) for CPU tensors: the device
// guard does nothing, the current stream is the null stream (the emulated launches ignore it),
// C10_CUDA_CHECK is emu.h's.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
