// Host launchers of the four depthwise ops (declared in dw.cuh): plan, pick the tiled kernel for
// (dtype, k, layout) or the generic path, launch on the caller's stream, finalise partials.
#include "dw_common.cuh"
#include "pw.cuh"  // the per-channel dpre pass of the channels_last backward

namespace convmixer_kernels {
namespace dwcuda {

// Queried once per device (so a CUDA-graph capture after a warm-up makes no attribute queries).
DevInfo dev_info() {
  constexpr int kMaxDev = 64;
  static std::atomic<bool> known[kMaxDev];
  static DevInfo cache[kMaxDev];
  DevInfo d{132, 48 * 1024, 100 * 1024, 0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return d;
  const bool cacheable = dev >= 0 && dev < kMaxDev;
  if (cacheable && known[dev].load(std::memory_order_acquire)) return cache[dev];
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0) d.sms = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess && v > 0)
    d.smem_optin = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) == cudaSuccess && v > 0)
    d.smem_per_sm = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess) d.cc_major = v;
  if (cacheable) {  // every thread computes the same values: a racing second write is harmless
    cache[dev] = d;
    known[dev].store(true, std::memory_order_release);
  }
  return d;
}

namespace {

#define CMK_K_CASES(FN, T, CL)       \
  case 3:                            \
    return FN<T, 3, CL>(a, p, s);    \
  case 5:                            \
    return FN<T, 5, CL>(a, p, s);    \
  case 7:                            \
    return FN<T, 7, CL>(a, p, s);    \
  case 9:                            \
    return FN<T, 9, CL>(a, p, s);    \
  case 11:                           \
    return FN<T, 11, CL>(a, p, s);   \
  case 13:                           \
    return FN<T, 13, CL>(a, p, s);   \
  case 15:                           \
    return FN<T, 15, CL>(a, p, s);

template <typename T, bool CL>
cudaError_t fwd_tiled_k(int k, const TileArgs& a, const TilePlan& p, cudaStream_t s) {
  switch (k) { CMK_K_CASES(launch_fwd_tiled, T, CL) }
  return cudaErrorInvalidValue;
}

template <typename T, bool CL>
cudaError_t bwd_tiled_k(int k, const TileArgs& a, const TilePlan& p, cudaStream_t s) {
  if constexpr (CL) {
    if (p.regs) {  // planned for k <= kRegsMaxK and the dpre pass only
      if (a.dpre_in == nullptr) return cudaErrorInvalidValue;
      switch (k) {
        case 3:
          return launch_bwd_cl_regs<T, 3>(a, p, s);
        case 5:
          return launch_bwd_cl_regs<T, 5>(a, p, s);
        case 7:
          return launch_bwd_cl_regs<T, 7>(a, p, s);
      }
      return cudaErrorInvalidValue;
    }
  }
  switch (k) { CMK_K_CASES(launch_bwd_tiled, T, CL) }
  return cudaErrorInvalidValue;
}
#undef CMK_K_CASES

template <bool CL>
cudaError_t tiled_dt(bool bwd, const DwGeom& g, const TileArgs& a, const TilePlan& p, cudaStream_t s) {
  switch (g.dtype) {
    case kF32:
      return bwd ? bwd_tiled_k<float, CL>(g.k, a, p, s) : fwd_tiled_k<float, CL>(g.k, a, p, s);
    case kF16:
      return bwd ? bwd_tiled_k<__half, CL>(g.k, a, p, s) : fwd_tiled_k<__half, CL>(g.k, a, p, s);
    case kBF16:
      return bwd ? bwd_tiled_k<__nv_bfloat16, CL>(g.k, a, p, s)
                 : fwd_tiled_k<__nv_bfloat16, CL>(g.k, a, p, s);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_tiled(bool bwd, const DwGeom& g, const TileArgs& a, const TilePlan& p, cudaStream_t s) {
  return g.cl ? tiled_dt<true>(bwd, g, a, p, s) : tiled_dt<false>(bwd, g, a, p, s);
}

DirectArgs make_direct_args(const DwGeom& g, const DwOperands& o) {
  DirectArgs d{};
  static_cast<DwOperands&>(d) = o;
  d.N = g.N;
  d.C = g.C;
  d.H = g.H;
  d.W = g.W;
  d.k = g.k;
  d.cl = g.cl;
  d.nsplit = 1;
  return d;
}

// The tiled backward takes dpre from a pass of its own (fp32, into the workspace), copied into its
// tiles by cp.async (dw_bwd_tiled.cuh), where the plan has room for the copies and 16-byte fp32
// vectors fit the tile rows (channels_last: 4 | C; NCHW: 4 | W).  Shape only, so the workspace and
// the launch agree.  CONVMIXER_KERNELS_DW_BWD_DPRE=0 (measurement knob): dpre computed while staging.
bool bwd_dpre_pass(const DwGeom& g, const TilePlan& p) { return p.tiled && p.copies && dpre_pass_fits(g); }

// Every op's common operands: the conv input x, the weight w (+ bias), the output (y, pre or dx),
// activation and order.
DwOperands conv_operands(const void* x, const float* w, const float* bias, void* out, int act, bool act_first) {
  DwOperands o;
  o.x = x;
  o.w = w;
  o.bias = bias;
  o.out = out;
  o.act = act;
  o.act_first = act_first;
  return o;
}

// A per-channel reduction over pre (mode 0: statistics; mode 1: the backward's sums, which also
// take dy, scale, shift, mean) into part.
ReduceArgs reduce_args(const DwGeom& g, const void* pre, float* part, int act, bool act_first, int mode) {
  ReduceArgs r{};
  r.N = g.N;
  r.C = g.C;
  r.HW = g.H * g.W;
  r.pre = pre;
  r.part = part;
  r.act = act;
  r.act_first = act_first;
  r.mode = mode;
  return r;
}

#define CMK_RETURN_IF_ERROR(expr)            \
  do {                                       \
    const cudaError_t err_ = (expr);         \
    if (err_ != cudaSuccess) return err_;    \
  } while (0)

}  // namespace

bool dpre_pass_allowed() {
  const char* env = std::getenv("CONVMIXER_KERNELS_DW_BWD_DPRE");
  return !(env != nullptr && env[0] == '0');
}

// dpre = the gradient at the conv output (dpre_t, unrounded) of every element, fp32 in x's layout.
void launch_dpre_pass(const DwGeom& g, const DwOperands& o, float* dpre, cudaStream_t stream) {
  pw::ChannelParams q = pw::channel_params(g.N, g.C, g.H * g.W, g.cl, o.act, o.act_first);
  q.in = o.pre;
  q.in2 = o.dy;
  q.out = dpre;
  q.out_f32 = true;
  static_cast<ChanPtrs&>(q) = o;  // scale, shift, mean, ca, cb, cd (the backward has no bias)
  const pw::DType dt = g.dtype == kF32 ? pw::DType::kFloat : g.dtype == kF16 ? pw::DType::kHalf : pw::DType::kBFloat16;
  pw::launch_dpre(q, dt, nullptr, stream);
}

DwWorkspace dw_conv_stats_workspace(const DwGeom& g) {
  const DevInfo dev = dev_info();
  const TilePlan p = plan_tiles(g, false, dev);
  DwWorkspace w;
  w.part = (p.tiled ? p.groups : reduce_splits(g, dev)) * g.C * 3;
  const int64_t mma = dw_mma_partials(g) * g.C * 3;
  if (mma > w.part) w.part = mma;
  if (w.part < 1) w.part = 1;
  return w;
}

DwWorkspace dw_bwd_reduce_workspace(const DwGeom& g) {
  DwWorkspace w;
  w.part = reduce_splits(g, dev_info()) * g.C * 2;
  if (w.part < 1) w.part = 1;
  return w;
}

DwWorkspace dw_bwd_workspace(const DwGeom& g) {
  const DevInfo dev = dev_info();
  const TilePlan p = plan_tiles(g, true, dev);
  const int64_t m = int64_t(g.k) * g.k + 1;
  DwWorkspace w;
  const int64_t mma = dw_mma_bwd_partials(g) * g.C * m;
  if (dw_mma_bwd_dpre_pass(g)) w.dpre = g.N * g.C * g.H * g.W;
  if (p.tiled) {
    w.part = p.groups * g.C * m;
    if (mma > w.part) w.part = mma;
    if (bwd_dpre_pass(g, p)) w.dpre = g.N * g.C * g.H * g.W;
  } else {
    w.part = direct_dweight_splits(g, dev) * g.C * m;
    w.dpre = g.N * g.C * g.H * g.W;
  }
  if (w.part < 1) w.part = 1;
  if (w.dpre < 1) w.dpre = 1;
  return w;
}

cudaError_t dw_conv_stats_launch(const DwGeom& g, const void* x, const float* weight, const float* bias,
                                 int act, bool act_first, void* pre, float* mean, float* var,
                                 float* part, cudaStream_t stream) {
  DwOperands o = conv_operands(x, weight, bias, pre, act, act_first);
  o.part = part;
  o.stats = true;
  bool ran = false;
  CMK_RETURN_IF_ERROR(dw_mma_launch(g, o, mean, var, stream, &ran));
  if (ran) return cudaSuccess;
  const DevInfo dev = dev_info();
  const TilePlan p = plan_tiles(g, false, dev);
  if (p.tiled) {
    TileArgs a = make_tile_args(g, p, o);
    a.vec = vec_ok(g, {x, pre});
    CMK_RETURN_IF_ERROR(launch_tiled(false, g, a, p, stream));
    return launch_stats_finalize(part, p.groups, g.C, mean, var, stream);
  }
  o.part = nullptr;  // the direct kernel writes pre; the statistics come from the reduction below
  CMK_RETURN_IF_ERROR(launch_fwd_direct(make_direct_args(g, o), g.dtype, dev, stream));
  const ReduceArgs r = reduce_args(g, pre, part, act, act_first, 0);
  const int64_t nsplit = reduce_splits(g, dev);
  CMK_RETURN_IF_ERROR(launch_channel_reduce(r, g, nsplit, vec_ok(g, {pre}), stream));
  return launch_stats_finalize(part, nsplit, g.C, mean, var, stream);
}

cudaError_t dw_fwd_launch(const DwGeom& g, const void* x, const float* weight, const float* bias,
                          const float* scale, const float* shift, int act, bool act_first,
                          bool residual, void* y, cudaStream_t stream) {
  DwOperands o = conv_operands(x, weight, bias, y, act, act_first);
  o.scale = scale;
  o.shift = shift;
  o.residual = residual;
  bool ran = false;
  CMK_RETURN_IF_ERROR(dw_mma_launch(g, o, nullptr, nullptr, stream, &ran));
  if (ran) return cudaSuccess;
  const DevInfo dev = dev_info();
  const TilePlan p = plan_tiles(g, false, dev);
  if (p.tiled) {
    TileArgs a = make_tile_args(g, p, o);
    a.vec = vec_ok(g, {x, y});
    return launch_tiled(false, g, a, p, stream);
  }
  return launch_fwd_direct(make_direct_args(g, o), g.dtype, dev, stream);
}

cudaError_t dw_bwd_reduce_launch(const DwGeom& g, const void* dy, const void* pre, const float* scale,
                                 const float* shift, const float* mean, const float* invstd, int act,
                                 bool act_first, float* sum_g, float* sum_gxhat, float* part,
                                 cudaStream_t stream) {
  const DevInfo dev = dev_info();
  ReduceArgs r = reduce_args(g, pre, part, act, act_first, 1);
  r.dy = dy;
  r.scale = scale;
  r.shift = shift;
  r.mean = mean;
  const int64_t nsplit = reduce_splits(g, dev);
  CMK_RETURN_IF_ERROR(launch_channel_reduce(r, g, nsplit, vec_ok(g, {dy, pre}), stream));
  return launch_sum_finalize(part, nsplit, g.C, 2, sum_g, 1, sum_gxhat, invstd, stream);
}

cudaError_t dw_bwd_launch(const DwGeom& g, const void* dy, const void* x, const void* pre,
                          const float* weight, const float* scale, const float* shift,
                          const float* mean, const float* ca, const float* cb, const float* cd,
                          int act, bool act_first, bool residual, void* dx, float* dweight,
                          float* dbias, float* part, float* dpre, cudaStream_t stream) {
  DwOperands o = conv_operands(x, weight, nullptr, dx, act, act_first);
  o.dy = dy;
  o.pre = pre;
  o.scale = scale;
  o.shift = shift;
  o.mean = mean;
  o.ca = ca;
  o.cb = cb;
  o.cd = cd;
  o.part = part;
  o.residual = residual;
  // CONVMIXER_KERNELS_DW_BWD_REGS=require: the register-partials kernel runs this call or nothing does
  const bool need_regs = bwd_regs_mode() == 2;
  bool ran = false;
  if (!need_regs) CMK_RETURN_IF_ERROR(dw_mma_bwd_launch(g, o, dweight, dbias, dpre, stream, &ran));
  if (ran) return cudaSuccess;
  const DevInfo dev = dev_info();
  const TilePlan p = plan_tiles(g, true, dev);
  if (need_regs && !p.regs) return cudaErrorNotSupported;  // (p.regs: tiled, with the dpre pass)
  const int KK = g.k * g.k;
  if (p.tiled) {
    TileArgs a = make_tile_args(g, p, o);
    a.vec = vec_ok(g, {dy, x, pre, dx});
    if (bwd_dpre_pass(g, p)) {  // the kernel copies the pass's fp32 tiles whatever dy, pre, x's alignment
      launch_dpre_pass(g, o, dpre, stream);
      a.dpre_in = dpre;
    }
    CMK_RETURN_IF_ERROR(launch_tiled(true, g, a, p, stream));
    return launch_sum_finalize(part, p.groups, g.C, KK + 1, dweight, KK, dbias, nullptr, stream);
  }
  DirectArgs d = make_direct_args(g, o);
  d.dpre = dpre;
  d.nsplit = direct_dweight_splits(g, dev);
  CMK_RETURN_IF_ERROR(launch_bwd_direct(d, g.dtype, dev, stream));
  return launch_sum_finalize(part, d.nsplit, g.C, KK + 1, dweight, KK, dbias, nullptr, stream);
}

}  // namespace dwcuda
}  // namespace convmixer_kernels
