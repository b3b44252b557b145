// Kernel launch and dynamic shared memory, as macros so that the CPU emulator of the kernels
// (tests/cuda_emu/emu.h, force-included before everything) can replace them.
#pragma once

#ifndef CMK_LAUNCH
#define CMK_LAUNCH(kern, grid, block, smem, stream) kern<<<(grid), (block), (smem), (stream)>>>
#endif
#ifndef CMK_DYNAMIC_SMEM
#define CMK_DYNAMIC_SMEM(name) extern __shared__ float4 name[]
#endif
