// Runtime of the CPU emulation declared in emu.h: fibers, barriers, shuffles, shared memory.
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <random>
#include <vector>

namespace cmk_emu {
namespace {

enum State { kRunnable, kAtBarrier, kAtWarp, kDone };

constexpr size_t kStack = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

struct Fiber {
  ucontext_t ctx;
  State state = kDone;
};

std::vector<Fiber> g_fibers;
std::vector<std::vector<char>> g_stacks;
std::vector<ThreadState> g_states;
ucontext_t g_sched;
int g_current = -1;
const KernelBody* g_body = nullptr;
std::vector<float4> g_smem;  // dynamic shared memory + guard
size_t g_smem_bytes = 0;
std::vector<uint64_t> g_slots;  // warp exchange slots [tid]
std::mt19937 g_rng(12345);
cudaError_t g_last_error = cudaSuccess;
int g_max_dyn_smem = 48 * 1024;  // last value set with cudaFuncSetAttribute (any kernel)

struct PendingCopy {
  void* dst;
  unsigned char data[16];
  int group;  // commit group (== the thread's committed count while uncommitted)
};
std::vector<std::vector<PendingCopy>> g_pending;  // cp.async copies issued and not yet waited for [tid]
std::vector<int> g_committed;                      // commit groups closed so far [tid]
std::vector<std::array<unsigned char, 64>> g_wbuf;  // warp_allgather slots [tid]

void fiber_main() {
  (*g_body)();
  g_fibers[g_current].state = kDone;
  swapcontext(&g_fibers[g_current].ctx, &g_sched);
}

void yield_with(State s) {
  Fiber& f = g_fibers[g_current];
  f.state = s;
  swapcontext(&f.ctx, &g_sched);
}

constexpr uint32_t kNaNBits = 0x7fc00123u;  // a recognisable quiet NaN

void fail(const std::string& msg) { throw std::runtime_error("cuda_emu: " + msg); }

}  // namespace

// Emulated device (an H100 by default; tests may change it).
int g_sms = 132;
int g_smem_optin = 232448;

const ThreadState& cur() { return g_states[g_current]; }
int linear_tid() { return g_current; }
void launch_check() {
  const cudaError_t e = get_last_error();
  if (e != cudaSuccess) fail("kernel launch failed: error " + std::to_string(static_cast<int>(e)));
}
float4* dynamic_smem() { return g_smem.data(); }
void syncthreads() { yield_with(kAtBarrier); }

void cp_async16(void* smem_dst, const void* src, bool valid) {
  const char* lo = reinterpret_cast<const char*>(g_smem.data());
  const char* d = reinterpret_cast<const char*>(smem_dst);
  if (d < lo || d + 16 > lo + g_smem_bytes) fail("cp.async destination outside the dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    fail("cp.async of 16 bytes with a misaligned address");
  PendingCopy c;
  c.dst = smem_dst;
  c.group = g_committed[g_current];
  if (valid) std::memcpy(c.data, src, 16); else std::memset(c.data, 0, 16);
  uint32_t nan[4] = {kNaNBits, kNaNBits, kNaNBits, kNaNBits};
  std::memcpy(smem_dst, nan, 16);  // in flight
  g_pending[g_current].push_back(c);
}

void cp_async_wait_all() {
  for (const PendingCopy& c : g_pending[g_current]) std::memcpy(c.dst, c.data, 16);
  g_pending[g_current].clear();
}

void cp_async_commit() { ++g_committed[g_current]; }

void cp_async_wait_group(int n) {
  const int last = g_committed[g_current] - n;  // groups < last must have landed
  std::vector<PendingCopy>& pend = g_pending[g_current];
  std::vector<PendingCopy> keep;
  for (const PendingCopy& c : pend) {
    if (c.group < last) std::memcpy(c.dst, c.data, 16);
    else keep.push_back(c);
  }
  pend.swap(keep);
}

void warp_allgather(const void* mine, int bytes, void* all) {
  if (bytes > 64) fail("warp_allgather of more than 64 bytes");
  const int tid = g_current;
  const int w0 = tid - tid % 32;
  std::memcpy(g_wbuf[tid].data(), mine, bytes);
  yield_with(kAtWarp);
  for (int l = 0; l < 32; ++l) std::memcpy(static_cast<unsigned char*>(all) + l * bytes, g_wbuf[w0 + l].data(), bytes);
  yield_with(kAtWarp);  // every lane has read before the slots are reused
}

uint64_t warp_exchange(uint64_t mine, int src_lane) {
  const int tid = g_current;
  const int w0 = tid - tid % 32;
  g_slots[tid] = mine;
  yield_with(kAtWarp);
  const uint64_t r = g_slots[w0 + src_lane];
  yield_with(kAtWarp);  // every lane has read before the slots are reused
  return r;
}

cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *v = g_sms;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = g_smem_optin;
  else if (attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor) *v = g_smem_optin + 1024;
  else if (attr == cudaDevAttrComputeCapabilityMajor) *v = 9;
  else *v = 0;
  return cudaSuccess;
}
cudaError_t func_set_max_dynamic_smem(int bytes) {
  if (bytes > g_smem_optin) return cudaErrorInvalidValue;
  g_max_dyn_smem = std::max(g_max_dyn_smem, bytes);
  return cudaSuccess;
}

void run_grid(const KernelBody& body, dim3 grid, dim3 block, size_t smem_bytes) {
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned nblocks = grid.x * grid.y * grid.z;
  if (nblocks == 0 || nthreads == 0 || nthreads > 1024 || grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (nthreads % 32 != 0) fail("block size " + std::to_string(nthreads) + " is not a multiple of 32");
  if (smem_bytes > 48 * 1024 && static_cast<int>(smem_bytes) > g_max_dyn_smem) {
    g_last_error = cudaErrorInvalidValue;  // what a real launch reports without the attribute
    return;
  }
  if (static_cast<int>(smem_bytes) > g_smem_optin) {
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  const int nt = static_cast<int>(nthreads);
  if (static_cast<int>(g_stacks.size()) < nt) {
    g_stacks.resize(nt);
    for (auto& s : g_stacks)
      if (s.empty()) s.resize(kStack);
  }
  g_fibers.assign(nt, Fiber{});
  g_states.assign(nt, ThreadState{});
  g_slots.assign(nt, 0);
  g_pending.assign(nt, {});
  g_committed.assign(nt, 0);
  g_wbuf.assign(nt, {});
  g_body = &body;
  const size_t total = smem_bytes + kGuardBytes;
  g_smem.assign((total + 15) / 16, float4{});
  g_smem_bytes = smem_bytes;
  std::vector<int> order(nt);
  for (unsigned b = 0; b < nblocks; ++b) {
    {  // NaN-fill shared memory and guard
      uint32_t* words = reinterpret_cast<uint32_t*>(g_smem.data());
      std::fill(words, words + g_smem.size() * 4, kNaNBits);
    }
    for (int t = 0; t < nt; ++t) {
      ThreadState& s = g_states[t];
      s.thread_idx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      s.block_idx = make_uint3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
      s.block_dim = block;
      s.grid_dim = grid;
      Fiber& f = g_fibers[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = g_stacks[t].data();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
      f.state = kRunnable;
    }
    for (;;) {
      // Run every runnable thread (in a random order) until it blocks or finishes.
      int n = 0;
      for (int t = 0; t < nt; ++t)
        if (g_fibers[t].state == kRunnable) order[n++] = t;
      if (n > 0) {
        std::shuffle(order.begin(), order.begin() + n, g_rng);
        for (int i = 0; i < n; ++i) {
          g_current = order[i];
          swapcontext(&g_sched, &g_fibers[g_current].ctx);
        }
        g_current = -1;
        continue;
      }
      int done = 0, at_bar = 0, at_warp = 0;
      for (int t = 0; t < nt; ++t) {
        done += g_fibers[t].state == kDone;
        at_bar += g_fibers[t].state == kAtBarrier;
        at_warp += g_fibers[t].state == kAtWarp;
      }
      if (done == nt) {
        for (int t = 0; t < nt; ++t)
          if (!g_pending[t].empty()) fail("a thread exited with cp.async copies it never waited for");
        break;
      }
      bool released = false;
      for (int w = 0; w < nt / 32; ++w) {
        int cnt = 0, alive = 0;
        for (int l = 0; l < 32; ++l) {
          const State s = g_fibers[w * 32 + l].state;
          cnt += s == kAtWarp;
          alive += s != kDone;
        }
        if (cnt == 0) continue;
        if (cnt == 32) {
          for (int l = 0; l < 32; ++l) g_fibers[w * 32 + l].state = kRunnable;
          released = true;
        } else if (alive < 32) {
          fail("warp shuffle with exited lanes (block " + std::to_string(b) + ")");
        }
      }
      if (released) continue;
      if (at_bar == nt) {
        for (int t = 0; t < nt; ++t) g_fibers[t].state = kRunnable;
        continue;
      }
      fail("deadlock or divergent barrier in block " + std::to_string(b) + ": " + std::to_string(done) +
           " exited, " + std::to_string(at_bar) + " at __syncthreads, " + std::to_string(at_warp) +
           " in a shuffle");
    }
    {  // guard after the requested dynamic shared memory must be untouched
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(g_smem.data());
      for (size_t i = smem_bytes; i + 4 <= smem_bytes + kGuardBytes; i += 4) {
        uint32_t w;
        std::memcpy(&w, bytes + i, 4);
        if (w != kNaNBits) fail("write past the end of dynamic shared memory (" + std::to_string(smem_bytes) + " bytes)");
      }
    }
  }
  g_body = nullptr;
}

}  // namespace cmk_emu
