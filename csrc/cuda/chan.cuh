// The per-channel float vectors (C floats each, nullable) the CUDA kernels take.  A base of the
// depthwise ops' operands (dwcuda::DwOperands) and of the per-channel passes' parameters
// (pw::ChannelParams), so the depthwise backward hands its own to the dpre pass in one assignment.
// Which ones an op reads: the comment of the struct that derives from it.
#pragma once

namespace convmixer_kernels {

struct ChanPtrs {
  const float* bias = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* mean = nullptr;
  const float* ca = nullptr;
  const float* cb = nullptr;
  const float* cd = nullptr;
};

}  // namespace convmixer_kernels
