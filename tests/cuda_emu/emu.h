// CPU emulation of the small CUDA subset the depthwise kernels use, so the exact kernel sources
// (csrc/cuda/*.cu, *.cuh) can be compiled by the host compiler and run on machines without a GPU.
// Force-included (-include emu.h) before everything else.  A block's threads run as cooperative
// fibers (ucontext) on one OS thread; __syncthreads and the warp shuffles are barriers, and the
// threads between two barriers run in a random order, so a missing barrier shows up as wrong
// results.  Dynamic shared memory starts as NaN and is followed by a guard region that is checked
// after every block: reads of unwritten shared memory poison the results, writes past the end
// raise.  Development tool only; the extension itself never includes this file.
#pragma once

#define CMK_EMULATE 1
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace cmk_emu {

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
const ThreadState& cur();
float4* dynamic_smem();
void syncthreads();
// Exchange one 64-bit value across the calling warp: returns the value lane src_lane published.
uint64_t warp_exchange(uint64_t mine, int src_lane);

using KernelBody = std::function<void()>;
void run_grid(const KernelBody& body, dim3 grid, dim3 block, size_t smem_bytes);

template <typename Kern>
struct Launcher {
  Kern kern;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    Kern k = kern;
    run_grid([=]() { k(args...); }, grid, block, smem);
  }
};
template <typename Kern>
Launcher<Kern> launch(Kern kern, dim3 grid, dim3 block, size_t smem) {
  return Launcher<Kern>{kern, grid, block, smem};
}

cudaError_t get_last_error();
cudaError_t get_device(int* d);
cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int dev);
cudaError_t func_set_max_dynamic_smem(int bytes);
template <typename F>
cudaError_t func_set_attribute(F, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) return func_set_max_dynamic_smem(value);
  return cudaSuccess;
}

int linear_tid();  // the calling thread's index in its block, x fastest (as CUDA forms warps)

// mode 0: __shfl_down_sync (src = lane + off, own value past the warp); 1: __shfl_xor_sync.
template <typename T>
T shfl(T v, int off, int mode) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const int lane = linear_tid() % 32;
  const int src = mode == 1 ? (lane ^ off) & 31 : (lane + off < 32 ? lane + off : lane);
  const uint64_t got = warp_exchange(bits, src);
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
template <typename T>
T shfl_down(T v, int off) { return shfl(v, off, 0); }

void launch_check();  // C10_CUDA_KERNEL_LAUNCH_CHECK: throws on a failed launch

// cp.async of 16 bytes global -> shared (zero fill when !valid).  The destination reads as NaN
// until the issuing thread waits (cp_async_wait_all); the copy lands then.  So a read before
// the wait, or a new copy over data other threads still read, poisons the results; a copy still
// pending when its thread exits raises.
void cp_async16(void* smem_dst, const void* src, bool valid);
void cp_async_wait_all();
// Commit groups: cp_async_wait_group(n) lands every committed group but the newest n (copies not
// yet committed stay in flight), as cp.async.wait_group does.
void cp_async_commit();
void cp_async_wait_group(int n);

// Every lane of the calling warp publishes `bytes` (<= 64) bytes; all receives the 32 lanes' in
// lane order (a warp barrier, like the shuffles).
void warp_allgather(const void* mine, int bytes, void* all);

// mma.sync.aligned.m16n8k16.row.col.f32.E.E.f32 with D = C = d: the fragment layouts of the PTX ISA
// (groupID = lane / 4, t = lane % 4; A: a0 (g, 2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..), a3 (g+8,
// 2t+8..); B: b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..); D: d[e] at (g + 8*(e/2), 2t + e%2)).
// Products and sums in double, rounded once to float (the hardware sums in fp32).
template <typename E>
inline float mma_elem(uint32_t bits16) {
  const uint16_t b = static_cast<uint16_t>(bits16 & 0xffffu);
  E v;
  std::memcpy(&v, &b, 2);
  return static_cast<float>(v);
}
template <typename E>
void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  Frag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  Frag all[32];
  warp_allgather(&mine, sizeof(Frag), all);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const Frag& f = all[l];
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = mma_elem<E>(f.a[0] >> (16 * h));
      A[g + 8][2 * t + h] = mma_elem<E>(f.a[1] >> (16 * h));
      A[g][2 * t + 8 + h] = mma_elem<E>(f.a[2] >> (16 * h));
      A[g + 8][2 * t + 8 + h] = mma_elem<E>(f.a[3] >> (16 * h));
      B[2 * t + h][g] = mma_elem<E>(f.b[0] >> (16 * h));
      B[2 * t + 8 + h][g] = mma_elem<E>(f.b[1] >> (16 * h));
    }
  }
  const int lane = linear_tid() % 32, g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    double s = d[e];
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
    d[e] = static_cast<float>(s);
  }
}

}  // namespace cmk_emu

#define threadIdx (::cmk_emu::cur().thread_idx)
#define blockIdx (::cmk_emu::cur().block_idx)
#define blockDim (::cmk_emu::cur().block_dim)
#define gridDim (::cmk_emu::cur().grid_dim)
#define __syncthreads() ::cmk_emu::syncthreads()
#define __shfl_down_sync(mask, v, off) ::cmk_emu::shfl_down((v), (off))
#define __shfl_xor_sync(mask, v, off) ::cmk_emu::shfl((v), (off), 1)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cmk_emu::launch_check()
#define C10_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                    \
    if ((expr) != cudaSuccess) throw std::runtime_error("cuda_emu: C10_CUDA_CHECK(" #expr ") failed");  \
  } while (0)
#define CMK_LAUNCH(kern, grid, block, smem, stream) ::cmk_emu::launch((kern), (grid), (block), (smem))
#define CMK_DYNAMIC_SMEM(name) float4* name = ::cmk_emu::dynamic_smem()
#define cudaGetLastError() ::cmk_emu::get_last_error()
#define cudaGetDevice(d) ::cmk_emu::get_device(d)
#define cudaDeviceGetAttribute(v, a, d) ::cmk_emu::device_get_attribute((v), (a), (d))
#define cudaFuncSetAttribute(f, a, v) ::cmk_emu::func_set_attribute((f), (a), (v))

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
