// CUDA entry points of the pointwise block (1x1 conv = GEMM), the patch-embedding stem
// (non-overlapping p x p conv = GEMM) and the elementwise BatchNorm + activation ops.
// Semantics: convmixer_kernels/torch_ops.py (the executable spec); schemas: csrc/ops.cpp.
//
// Design
// ------
// * The GEMM goes through ATen (cuBLAS / cuBLASLt) on views, into preallocated outputs:
//     channels_last: s viewed as the row-major (M, C_in) matrix, M = N*H*W, pre (M, C_out) =
//       s @ W^T + bias with at::addmm (bias broadcast over rows: cuBLASLt's bias epilogue);
//     NCHW: per image pre_n (C_out x HW) = W (C_out x C_in) @ s_n (C_in x HW), one at::bmm on the
//       (N, C_in, HW) view with W expanded over the batch (stride 0, no copy).
//   cuBLASLt's GELU epilogue is the tanh approximation and it has no BatchNorm epilogue, so one light
//   per-channel pass follows the GEMM and reads its output once (opt-in, CUTLASS GEMMs instead, see
//   cutlass_mode: the eval forward with the whole epilogue fused, the training forward with the batch
//   statistics in its epilogue):
//     pw_fwd/stem_fwd: y = bn_act(pre) in place over the GEMM output;
//     *_gemm_stats: per-block (count, mean, M2) of u (Chan merges: no cancellation), merged per
//       channel in a fixed order.
// * Rounding.  The GEMM computes in the storage dtype with fp32 accumulation and rounds its output
//   once to storage.  channels_last: the bias rides in the GEMM epilogue, pre = round(acc + bias),
//   with the bias itself rounded to storage first (at::addmm wants one dtype; exact in fp32).
//   NCHW: cuBLASLt has no per-row bias for that orientation (and baddbmm would first copy the
//   broadcast bias through memory), so pre = round(round(acc) + bias) in the pass after the GEMM.
//   Both are within one storage ulp of the spec's round(acc + bias); everything downstream
//   (stats, act, backward) uses that pre exactly as stored.  An fp32 GEMM output (mm with
//   out_dtype) would match the spec bit for bit but doubles the traffic of the pass after it.
// * pw with t: s = round(x + t) is materialized by one elementwise ATen add (the fused depthwise
//   kernel's residual epilogue is the place to avoid that pass in ConvMixer); pw_bwd recomputes it.
// * Backward: dpre (the bn_act_bwd formula, rounded to storage: the GEMM operand) and the
//   per-channel dbias partials come from one pass; ds = dpre @ W and dW = dpre^T @ s are ATen GEMMs.
//   NCHW: dpre is written channel-major (C_out, N*HW) and s is copied once into (C_in, N*HW), so
//   dW is a single GEMM over K = N*H*W (a per-image sum would need fp32 partials of size N*C_out*C_in).
// * Stem: im2col of the non-overlapping patches is a strided ATen copy into (M, Kp) (a pure
//   permutation, remainder rows/cols dropped); stem_bwd's dx is the inverse copy of dpre @ W plus
//   zeros beyond the last full patch.  K = C_img*p*p is padded with zero columns (and the weight with
//   zeros) to Kp, a multiple of 16 bytes: cuBLAS takes its sm90 kernels only for 16-byte-aligned
//   leading dimensions, and with K = 3*7*7 = 147 the 2026-11-27 H200 profile showed SM 7.5 CUTLASS
//   kernels (cutlass_75_tensorop_bf16_s1688gemm) taking 200 us for the stem's forward GEMM at N=64,
//   224x224, and 160 us for a backward one.  The padded products add exact zeros: the same sums.
// * Every launch on the current stream (ATen's ops too), no host sync, no cudaMalloc (workspaces
//   are ATen tensors), no float atomics (bitwise deterministic on a given GPU; the partition of
//   the reductions depends on shapes only), 64-bit indexing in the kernels.
// * cuBLAS fp32 GEMMs use TF32 only if torch.backends.cuda.matmul.allow_tf32 is set (off by
//   default); fp16/bf16 GEMMs follow torch's reduced-precision-reduction settings.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "cuda_host.h"
#include "pw.cuh"
#include "pw_cutlass.cuh"

namespace convmixer_kernels {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

// ------------------------------------------------------------------------------------------------
// Checks.

pw::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return pw::DType::kFloat;
    case at::kHalf:
      return pw::DType::kHalf;
    case at::kBFloat16:
      return pw::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "convmixer_kernels CUDA: unsupported dtype ", t.scalar_type());
  }
  return pw::DType::kFloat;  // unreachable
}

// The tensor that fixes device, dtype and memory format of an op (x, or pre for the elementwise
// ops): 4-D, on CUDA, fp32/fp16/bf16 (no fp64 on CUDA), NCHW- or channels_last-contiguous.
bool check_anchor(const Tensor& t, const char* name) {
  check_on_device(t, name);
  check_storage_dtype(t, name, /*allow_double=*/false);
  return is_channels_last(t, name);
}

// A per-channel vector of C float32 values on the anchor's device.
void check_cvec(const Tensor& t, const char* name, const Tensor& anchor, int64_t C) {
  check_device(t, name, anchor.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, name, ": expected shape (", C, ",) (one value per output channel), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_opt_cvec(const OptTensor& t, const char* name, const Tensor& anchor, int64_t C) {
  if (t.has_value()) check_cvec(*t, name, anchor, C);
}

// GEMM weight in the storage dtype of x: (C_out, C_in, 1, 1) for pw (p == 1), (C_out, C_img, p, p)
// for the stem (p == 0: any square p).  Any strides (it is small; reshaped to (C_out, K) below).
void check_gemm_weight(const Tensor& w, const Tensor& x, bool stem) {
  check_device(w, "weight", x.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", w.scalar_type());
  if (stem) {
    TORCH_CHECK(w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == w.size(3) && w.size(2) >= 1,
                "weight: expected shape (C_out, C_img, p, p) with C_img = ", x.size(1),
                " (channels of x), got ", w.sizes());
  } else {
    TORCH_CHECK(w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == 1 && w.size(3) == 1,
                "weight: expected shape (C_out, C_in, 1, 1) with C_in = ", x.size(1), " (channels of x), got ",
                w.sizes());
  }
}

// ------------------------------------------------------------------------------------------------
// Passes.

pw::ChannelParams channel_params(const Tensor& like, bool cl, int64_t act, bool act_first) {
  return pw::channel_params(like.size(0), like.size(1), like.size(2) * like.size(3), cl, static_cast<int>(act),
                            act_first);
}

const float* fptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// out = bn_act(in [+ bias]) (out may be in).
void run_bn_act(const Tensor& in, Tensor& out, const OptTensor& bias, const Tensor& scale, const Tensor& shift,
                int64_t act, bool act_first, bool cl, const OptTensor& residual = OptTensor()) {
  if (in.numel() == 0) return;
  // the kernels take a bias (not fused into an NCHW GEMM) or a residual (bn_act_fwd), not both
  TORCH_INTERNAL_ASSERT(!(bias.has_value() && residual.has_value()), "run_bn_act: bias and residual together");
  auto p = channel_params(in, cl, act, act_first);
  p.in = in.data_ptr();
  p.in2 = residual.has_value() ? residual->data_ptr() : nullptr;  // kBnAct's residual
  p.out = out.data_ptr();
  p.bias = fptr(bias);
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  pw::launch_bn_act(p, dtype_of(in), c10::cuda::getCurrentCUDAStream().stream());
}

// mean/var of u over (N, H, W); pre = pre [+ bias, rounded] in place.
void run_stats(Tensor& pre, const OptTensor& bias, int64_t act, bool act_first, bool cl, Tensor& mean, Tensor& var) {
  if (pre.size(1) == 0) return;
  if (pre.numel() == 0) {  // no positions: the mean of nothing, as torch
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  auto p = channel_params(pre, cl, act, act_first);
  const auto fopts = pre.options().dtype(at::kFloat);
  Tensor partial = at::empty({p.R * 3 * p.C}, fopts);
  p.in = pre.data_ptr();
  p.out = bias.has_value() ? pre.data_ptr() : nullptr;
  p.bias = fptr(bias);
  p.partial = partial.data_ptr<float>();
  pw::launch_stats(p, dtype_of(pre), mean.data_ptr<float>(), var.data_ptr<float>(),
                   c10::cuda::getCurrentCUDAStream().stream());
}

// out = dpre (pre's layout, or channel-major (C, N*HW) when channel_major); dsum = sum of dpre.
void run_dpre(const Tensor& dy, const Tensor& pre, Tensor& out, bool channel_major, const Tensor& scale,
              const Tensor& shift, const Tensor& mean, const Tensor& ca, const Tensor& cb, const Tensor& cd,
              int64_t act, bool act_first, bool cl, Tensor* dsum) {
  if (pre.numel() == 0) {
    if (dsum != nullptr) dsum->zero_();
    return;
  }
  auto p = channel_params(pre, cl, act, act_first);
  Tensor partial;
  if (dsum != nullptr) partial = at::empty({p.R * p.C}, pre.options().dtype(at::kFloat));
  p.in = pre.data_ptr();
  p.in2 = dy.data_ptr();
  p.out = out.data_ptr();
  p.out_channel_major = channel_major;
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  p.mean = mean.data_ptr<float>();
  p.ca = ca.data_ptr<float>();
  p.cb = cb.data_ptr<float>();
  p.cd = cd.data_ptr<float>();
  p.partial = dsum != nullptr ? partial.data_ptr<float>() : nullptr;
  pw::launch_dpre(p, dtype_of(pre), dsum != nullptr ? dsum->data_ptr<float>() : nullptr,
                  c10::cuda::getCurrentCUDAStream().stream());
}

// ------------------------------------------------------------------------------------------------
// GEMMs.

// (N, C, h, w) in layout cl as the row-major (N*h*w, C) matrix (channels_last only).
Tensor rows_view(const Tensor& t) {
  return t.permute({0, 2, 3, 1}).view({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// out (N, C_out, h, w) = conv of the GEMM operand with w2d (C_out, K) [+ bias].  The operand is
// a_rows (M, K), M = N*h*w, for channels_last, and a_batched (N, K, h*w) for NCHW.
// Returns whether the bias is still to be added (NCHW).
bool gemm_fwd(Tensor& out, const Tensor& a_rows, const Tensor& a_batched, const Tensor& w2d, const OptTensor& bias,
              bool cl) {
  if (cl) {
    Tensor o2d = rows_view(out);
    if (bias.has_value()) {
      at::addmm_out(o2d, bias->to(out.scalar_type()), a_rows, w2d.t());
    } else {
      at::mm_out(o2d, a_rows, w2d.t());
    }
    return false;
  }
  const int64_t N = out.size(0), C_out = out.size(1);
  Tensor o3 = out.view({N, C_out, out.size(2) * out.size(3)});
  at::bmm_out(o3, w2d.expand({N, C_out, w2d.size(1)}), a_batched);
  return bias.has_value();
}

// s = x, or round(x + t) in x's layout.
Tensor pw_input(const Tensor& x, const OptTensor& t, bool cl) {
  if (!t.has_value()) return x;
  Tensor s = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  at::add_out(s, x, *t);
  return s;
}

// dpre of an output (N, C_out, h, w) for the weight GEMM: returns (dpre_rows (M, C_out) view or
// undefined, dpre_cm (C_out, M) or undefined): channels_last keeps dy's layout, NCHW goes
// channel-major.  dbias gets the per-channel sum.
std::pair<Tensor, Tensor> dpre_for_gemm(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift,
                                        const Tensor& mean, const Tensor& ca, const Tensor& cb, const Tensor& cd,
                                        int64_t act, bool act_first, bool cl, Tensor& dbias) {
  if (cl) {
    Tensor dpre = at::empty(pre.sizes(), pre.options().memory_format(at::MemoryFormat::ChannelsLast));
    run_dpre(dy, pre, dpre, false, scale, shift, mean, ca, cb, cd, act, act_first, cl, &dbias);
    return {rows_view(dpre), Tensor()};
  }
  const int64_t M = pre.size(0) * pre.size(2) * pre.size(3);
  Tensor dpre_cm = at::empty({pre.size(1), M}, pre.options());
  run_dpre(dy, pre, dpre_cm, true, scale, shift, mean, ca, cb, cd, act, act_first, cl, &dbias);
  return {Tensor(), dpre_cm};
}

// ------------------------------------------------------------------------------------------------
// Ops.

// The CUTLASS GEMMs (pw_cutlass.cu) of the pointwise block and the stem: the eval forward as one GEMM whose
// epilogue does bias, rounding, activation and the BN affine, and the training forward's GEMM with the batch
// statistics in its epilogue, instead of cuBLAS and a pass over its output.  Opt-in until a GPU run has
// measured and tested them: CONVMIXER_KERNELS_PW_CUTLASS=1 uses them where they apply (a build with them,
// compute capability 9.0, channels_last fp16/bf16, K and C_out multiples of 8, 16-byte aligned operands),
// =require raises where they do not (tests).  CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE picks the eval kernel's
// schedule: cooperative (unset) or pingpong (pw_cutlass_gemm.cuh), until a GPU run has measured which is
// faster; the statistics GEMM is cooperative.
struct CutlassMode {
  bool require, pingpong;
};

// nullopt when the variable is off.
std::optional<CutlassMode> cutlass_mode() {
  const char* env = std::getenv("CONVMIXER_KERNELS_PW_CUTLASS");
  const std::string mode = env == nullptr ? "" : env;
  if (mode != "1" && mode != "require") return std::nullopt;
  const char* sched_env = std::getenv("CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE");
  const std::string sched = sched_env == nullptr ? "" : sched_env;
  TORCH_CHECK(sched.empty() || sched == "cooperative" || sched == "pingpong",
              "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE must be unset, 'cooperative' or 'pingpong', got '", sched, "'");
  return CutlassMode{mode == "require", sched == "pingpong"};
}

// The caller takes the usual path (false), or raises under =require.
bool cutlass_skip(const CutlassMode& m, const char* why) {
  TORCH_CHECK(!m.require, "CONVMIXER_KERNELS_PW_CUTLASS=require: the CUTLASS pointwise GEMM does not apply: ", why);
  return false;
}

// Why the GEMM of a (M, K) row-major by w (N, K) row-major into ptrs' tensors cannot run here, or nullptr.
const char* cutlass_unfit(const Tensor& a, const Tensor& w, std::initializer_list<const void*> ptrs) {
  if (!pwcutlass::built()) return "not in this build (needs CUTLASS headers and TORCH_CUDA_ARCH_LIST with 9.0a)";
  const auto dt = a.scalar_type();
  if (dt != at::kHalf && dt != at::kBFloat16) return "dtype is not float16 or bfloat16";
  int dev = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) return "the GPU is not compute capability 9.0";
  if (a.size(0) == 0) return "no rows (an empty batch or image)";
  if (a.size(1) % 8 != 0 || w.size(0) % 8 != 0) return "C_in and C_out must be multiples of 8";
  // (the per-channel vectors too: the epilogue reads them 4 floats at a time)
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return "an operand is not 16-byte aligned";
  return nullptr;
}

// CUTLASS reported that it cannot implement the problem: the caller takes the usual path, or raises (=require).
bool cutlass_declined(const CutlassMode& m, cudaError_t e) {
  if (e != cudaErrorNotSupported) {
    C10_CUDA_CHECK(e);
    return false;
  }
  (void)cudaGetLastError();
  return !cutlass_skip(m, "CUTLASS cannot implement this problem");
}

Tensor cutlass_workspace(const Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// The eval forward y (rows: M x N) = bn_act(round(a @ w2d^T + bias)) as one CUTLASS GEMM, a the (M, K)
// row-major operand (undefined unless cl); false when it did not run.
bool gemm_fwd_cutlass(const Tensor& a, const Tensor& w2d, Tensor& y, const OptTensor& bias, const Tensor& scale,
                      const Tensor& shift, int64_t act, bool act_first, bool cl) {
  const auto mode = cutlass_mode();
  if (!mode.has_value()) return false;
  if (!cl) return cutlass_skip(*mode, "x is not channels_last");
  const Tensor w = w2d.contiguous();
  const char* why = cutlass_unfit(
      a, w, {a.data_ptr(), w.data_ptr(), y.data_ptr(), fptr(bias), scale.data_ptr(), shift.data_ptr()});
  if (why != nullptr) return cutlass_skip(*mode, why);
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  Tensor ws = cutlass_workspace(a, pwcutlass::workspace_bytes(bf16, mode->pingpong, M, N, K));
  return !cutlass_declined(*mode, pwcutlass::bn_act_gemm(bf16, mode->pingpong, a.data_ptr(), w.data_ptr(),
                                                         y.data_ptr(), fptr(bias), scale.data_ptr<float>(),
                                                         shift.data_ptr<float>(), static_cast<int>(act), act_first,
                                                         M, N, K, ws.data_ptr(),
                                                         c10::cuda::getCurrentCUDAStream().stream()));
}

// The training forward's GEMM, pre (rows) = round(a @ w2d^T + bias), with the batch statistics of u in its
// epilogue (per-tile column sums, pw_cutlass_stats.cuh) and a fixed-order finalize into mean and var; false
// when it did not run.
bool gemm_stats_cutlass(const Tensor& a, const Tensor& w2d, Tensor& pre, const OptTensor& bias, int64_t act,
                        bool act_first, bool cl, Tensor& mean, Tensor& var) {
  const auto mode = cutlass_mode();
  if (!mode.has_value()) return false;
  if (!cl) return cutlass_skip(*mode, "x is not channels_last");
  const Tensor w = w2d.contiguous();
  const char* why = cutlass_unfit(a, w, {a.data_ptr(), w.data_ptr(), pre.data_ptr(), fptr(bias)});
  if (why != nullptr) return cutlass_skip(*mode, why);
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  const int64_t T = pwcutlass::stats_tiles(M), ld = pwcutlass::stats_ld(N);
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  Tensor partial = at::empty({2, T, ld}, a.options().dtype(at::kFloat));
  float* sums = partial.data_ptr<float>();
  float* sqs = sums + T * ld;
  Tensor ws = cutlass_workspace(a, pwcutlass::stats_workspace_bytes(bf16, M, N, K));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  if (cutlass_declined(*mode, pwcutlass::stats_gemm(bf16, a.data_ptr(), w.data_ptr(), pre.data_ptr(), fptr(bias),
                                                    static_cast<int>(act), act_first, M, N, K, sums, sqs,
                                                    ws.data_ptr(), stream)))
    return false;
  pw::launch_tile_stats_finalize(sums, sqs, T, ld, N, M, mean.data_ptr<float>(), var.data_ptr<float>(), stream);
  return true;
}

Tensor3 pw_gemm_stats_cuda(const Tensor& x, const OptTensor& t, const Tensor& weight, const OptTensor& bias,
                           int64_t act, bool act_first) {
  const bool cl = check_anchor(x, "x");
  if (t.has_value()) check_act_tensor(*t, "t", x, x.sizes(), cl);
  check_gemm_weight(weight, x, false);
  const int64_t C_out = weight.size(0);
  check_opt_cvec(bias, "bias", x, C_out);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor pre = new_output({N, C_out, H, W}, x.options(), format_of(cl));
  Tensor mean = new_output({C_out}, fopts), var = new_output({C_out}, fopts);
  const Tensor s = pw_input(x, t, cl);
  const Tensor w2d = weight.reshape({C_out, C_in});
  if (pre.numel() > 0 &&
      gemm_stats_cutlass(cl ? rows_view(s) : Tensor(), w2d, pre, bias, act, act_first, cl, mean, var))
    return {pre, mean, var};
  const bool bias_left = gemm_fwd(pre, cl ? rows_view(s) : Tensor(), cl ? Tensor() : s.view({N, C_in, H * W}), w2d,
                                  bias, cl);
  run_stats(pre, bias_left ? bias : OptTensor(), act, act_first, cl, mean, var);
  return {pre, mean, var};
}

Tensor pw_fwd_cuda(const Tensor& x, const OptTensor& t, const Tensor& weight, const OptTensor& bias,
                   const Tensor& scale, const Tensor& shift, int64_t act, bool act_first) {
  const bool cl = check_anchor(x, "x");
  if (t.has_value()) check_act_tensor(*t, "t", x, x.sizes(), cl);
  check_gemm_weight(weight, x, false);
  const int64_t C_out = weight.size(0);
  check_opt_cvec(bias, "bias", x, C_out);
  check_cvec(scale, "scale", x, C_out);
  check_cvec(shift, "shift", x, C_out);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  Tensor y = new_output({N, C_out, H, W}, x.options(), format_of(cl));
  const Tensor s = pw_input(x, t, cl);
  const Tensor w2d = weight.reshape({C_out, C_in});
  if (y.numel() > 0 && gemm_fwd_cutlass(cl ? rows_view(s) : Tensor(), w2d, y, bias, scale, shift, act, act_first, cl))
    return y;
  const bool bias_left = gemm_fwd(y, cl ? rows_view(s) : Tensor(), cl ? Tensor() : s.view({N, C_in, H * W}), w2d,
                                  bias, cl);
  run_bn_act(y, y, bias_left ? bias : OptTensor(), scale, shift, act, act_first, cl);
  return y;
}

Tensor3 pw_bwd_cuda(const Tensor& dy, const Tensor& x, const OptTensor& t, const Tensor& pre, const Tensor& weight,
                    const Tensor& scale, const Tensor& shift, const Tensor& mean, const Tensor& ca, const Tensor& cb,
                    const Tensor& cd, int64_t act, bool act_first) {
  const bool cl = check_anchor(x, "x");
  if (t.has_value()) check_act_tensor(*t, "t", x, x.sizes(), cl);
  check_gemm_weight(weight, x, false);
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3), C_out = weight.size(0);
  const std::vector<int64_t> out_sizes{N, C_out, H, W};
  check_act_tensor(dy, "dy", x, out_sizes, cl);
  check_act_tensor(pre, "pre", x, out_sizes, cl);
  check_cvec(scale, "scale", x, C_out);
  check_cvec(shift, "shift", x, C_out);
  check_cvec(mean, "mean", x, C_out);
  check_cvec(ca, "ca", x, C_out);
  check_cvec(cb, "cb", x, C_out);
  check_cvec(cd, "cd", x, C_out);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t HW = H * W, M = N * HW;
  Tensor ds = new_output(x.sizes(), x.options(), format_of(cl));
  Tensor dweight = new_output(weight.sizes(), x.options());
  Tensor dbias = new_output({C_out}, x.options().dtype(at::kFloat));
  const Tensor w2d = weight.reshape({C_out, C_in});
  Tensor dw2d = dweight.view({C_out, C_in});
  auto [dpre_rows, dpre_cm] = dpre_for_gemm(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first, cl, dbias);
  if (cl) {
    Tensor ds2d = rows_view(ds);
    at::mm_out(ds2d, dpre_rows, w2d);
    const Tensor s = pw_input(x, t, cl);
    at::mm_out(dw2d, dpre_rows.t(), rows_view(s));
  } else {
    // ds_n = W^T (C_in x C_out) @ dpre_n (C_out x HW); dpre_n is a strided slice of the
    // channel-major dpre: (N, C_out, HW) with strides (HW, M, 1).
    Tensor ds3 = ds.view({N, C_in, HW});
    at::bmm_out(ds3, w2d.t().expand({N, C_in, C_out}), dpre_cm.view({C_out, N, HW}).permute({1, 0, 2}));
    // s channel-major (C_in, M): dW = dpre_cm (C_out x M) @ s_cm^T (M x C_in), one GEMM over M.
    Tensor s_cm = at::empty({C_in, N, HW}, x.options());
    Tensor s_view = s_cm.permute({1, 0, 2});
    if (t.has_value()) {
      at::add_out(s_view, x.view({N, C_in, HW}), t->view({N, C_in, HW}));
    } else {
      s_view.copy_(x.view({N, C_in, HW}));
    }
    at::mm_out(dw2d, dpre_cm, s_cm.view({C_in, M}).t());
  }
  return {ds, dweight, dbias};
}

struct StemGeo {
  int64_t N, C_img, H, W, C_out, p, Ho, Wo, M, K;
  int64_t Kp;  // K rounded up to 16 bytes of the storage dtype (the GEMMs' leading dimension)
};

// The first K columns of a row-major (M, Kp) patch matrix as (N, Ho, Wo, C_img, p, p), columns in the
// order of weight.view(C_out, C_img*p*p): (c, ky, kx).
Tensor patches_of(const Tensor& P, const StemGeo& g) {
  return P.as_strided({g.N, g.Ho, g.Wo, g.C_img, g.p, g.p}, {g.Ho * g.Wo * g.Kp, g.Wo * g.Kp, g.Kp, g.p * g.p, g.p, 1},
                      P.storage_offset());
}

// The (N, Ho, Wo, C_img, p, p) view of the pixels of x (or dx) under the patches.
Tensor patch_pixels(const Tensor& x, const StemGeo& g) {
  const auto s = x.strides();
  return x.as_strided({g.N, g.Ho, g.Wo, g.C_img, g.p, g.p}, {s[0], s[2] * g.p, s[3] * g.p, s[1], s[2], s[3]},
                      x.storage_offset());
}

// Non-overlapping p x p patches of x as the row-major (M, Kp) matrix, zero in columns K..Kp-1.
Tensor im2col(const Tensor& x, const StemGeo& g) {
  Tensor P = at::empty({g.M, g.Kp}, x.options());
  patches_of(P, g).copy_(patch_pixels(x, g));
  if (g.Kp > g.K) P.narrow(1, g.K, g.Kp - g.K).zero_();
  return P;
}

// The weight as the (C_out, Kp) matrix, zero in columns K..Kp-1 (a copy only when padded).
Tensor stem_w2d(const Tensor& weight, const StemGeo& g) {
  const Tensor w = weight.reshape({g.C_out, g.K});
  return g.Kp == g.K ? w : at::constant_pad_nd(w, {0, g.Kp - g.K});
}

StemGeo stem_geo(const Tensor& x, const Tensor& weight) {
  StemGeo g;
  g.N = x.size(0);
  g.C_img = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.C_out = weight.size(0);
  g.p = weight.size(2);
  g.Ho = g.H / g.p;
  g.Wo = g.W / g.p;
  g.M = g.N * g.Ho * g.Wo;
  g.K = g.C_img * g.p * g.p;
  const int64_t a = 16 / static_cast<int64_t>(x.element_size());
  g.Kp = (g.K + a - 1) / a * a;
  return g;
}

// pre-shaped stem GEMM of the patch matrix P into out (N, C_out, Ho, Wo); returns whether the bias is still
// to be added.
bool stem_gemm(Tensor& out, const Tensor& P, const Tensor& w2d, const OptTensor& bias, const StemGeo& g, bool cl) {
  return gemm_fwd(out, P, cl ? Tensor() : P.view({g.N, g.Ho * g.Wo, g.Kp}).transpose(1, 2), w2d, bias, cl);
}

Tensor3 stem_gemm_stats_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t act,
                             bool act_first) {
  const bool cl = check_anchor(x, "x");
  check_gemm_weight(weight, x, true);
  const StemGeo g = stem_geo(x, weight);
  check_opt_cvec(bias, "bias", x, g.C_out);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor pre = new_output({g.N, g.C_out, g.Ho, g.Wo}, x.options(), format_of(cl));
  Tensor mean = new_output({g.C_out}, fopts), var = new_output({g.C_out}, fopts);
  if (g.M == 0 || g.C_out == 0) {
    run_stats(pre, OptTensor(), act, act_first, cl, mean, var);  // the mean of nothing, as torch
    return {pre, mean, var};
  }
  const Tensor P = im2col(x, g), w2d = stem_w2d(weight, g);
  if (gemm_stats_cutlass(P, w2d, pre, bias, act, act_first, cl, mean, var)) return {pre, mean, var};
  const bool bias_left = stem_gemm(pre, P, w2d, bias, g, cl);
  run_stats(pre, bias_left ? bias : OptTensor(), act, act_first, cl, mean, var);
  return {pre, mean, var};
}

Tensor stem_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& scale,
                     const Tensor& shift, int64_t act, bool act_first) {
  const bool cl = check_anchor(x, "x");
  check_gemm_weight(weight, x, true);
  const StemGeo g = stem_geo(x, weight);
  check_opt_cvec(bias, "bias", x, g.C_out);
  check_cvec(scale, "scale", x, g.C_out);
  check_cvec(shift, "shift", x, g.C_out);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = new_output({g.N, g.C_out, g.Ho, g.Wo}, x.options(), format_of(cl));
  if (y.numel() == 0) return y;
  const Tensor P = im2col(x, g), w2d = stem_w2d(weight, g);
  if (gemm_fwd_cutlass(P, w2d, y, bias, scale, shift, act, act_first, cl)) return y;
  const bool bias_left = stem_gemm(y, P, w2d, bias, g, cl);
  run_bn_act(y, y, bias_left ? bias : OptTensor(), scale, shift, act, act_first, cl);
  return y;
}

Tensor3 stem_bwd_cuda(const Tensor& dy, const Tensor& x, const Tensor& pre, const Tensor& weight, const Tensor& scale,
                      const Tensor& shift, const Tensor& mean, const Tensor& ca, const Tensor& cb, const Tensor& cd,
                      int64_t act, bool act_first, bool need_dx) {
  const bool cl = check_anchor(x, "x");
  check_gemm_weight(weight, x, true);
  const StemGeo g = stem_geo(x, weight);
  const std::vector<int64_t> out_sizes{g.N, g.C_out, g.Ho, g.Wo};
  check_act_tensor(dy, "dy", x, out_sizes, cl);
  check_act_tensor(pre, "pre", x, out_sizes, cl);
  check_cvec(scale, "scale", x, g.C_out);
  check_cvec(shift, "shift", x, g.C_out);
  check_cvec(mean, "mean", x, g.C_out);
  check_cvec(ca, "ca", x, g.C_out);
  check_cvec(cb, "cb", x, g.C_out);
  check_cvec(cd, "cd", x, g.C_out);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dweight = new_output(weight.sizes(), x.options());
  Tensor dbias = new_output({g.C_out}, x.options().dtype(at::kFloat));
  Tensor dx = need_dx ? new_output(x.sizes(), x.options(), format_of(cl)) : new_output({0}, x.options());
  if (g.M == 0) {
    dweight.zero_();
    dbias.zero_();
    if (need_dx) dx.zero_();
    return {dx, dweight, dbias};
  }
  auto [dpre_rows, dpre_cm] = dpre_for_gemm(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first, cl, dbias);
  // dpre as the (M, C_out) matrix and its transpose, whichever layout it was written in.
  const Tensor dpre_m = cl ? dpre_rows : dpre_cm.t();
  const Tensor dpre_t = cl ? dpre_rows.t() : dpre_cm;
  const Tensor P = im2col(x, g);
  Tensor dw2d = dweight.view({g.C_out, g.K});
  if (g.Kp == g.K) {
    at::mm_out(dw2d, dpre_t, P);
  } else {  // into an aligned (C_out, Kp) matrix, then its first K columns
    Tensor dwp = at::empty({g.C_out, g.Kp}, x.options());
    at::mm_out(dwp, dpre_t, P);
    dw2d.copy_(dwp.narrow(1, 0, g.K));
  }
  if (need_dx) {
    Tensor dP = at::empty({g.M, g.Kp}, x.options());
    at::mm_out(dP, dpre_m, stem_w2d(weight, g));
    patch_pixels(dx, g).copy_(patches_of(dP, g));
    // The conv never saw the pixels beyond the last full patch: zero gradient.
    if (g.H > g.Ho * g.p) dx.narrow(2, g.Ho * g.p, g.H - g.Ho * g.p).zero_();
    if (g.W > g.Wo * g.p) dx.narrow(2, 0, g.Ho * g.p).narrow(3, g.Wo * g.p, g.W - g.Wo * g.p).zero_();
  }
  return {dx, dweight, dbias};
}

Tensor bn_act_fwd_cuda(const Tensor& pre, const Tensor& scale, const Tensor& shift, int64_t act, bool act_first,
                       const OptTensor& residual) {
  const bool cl = check_anchor(pre, "pre");
  const int64_t C = pre.size(1);
  check_cvec(scale, "scale", pre, C);
  check_cvec(shift, "shift", pre, C);
  check_act(act);
  if (residual.has_value()) check_act_tensor(*residual, "residual", pre, pre.sizes(), cl);
  const c10::cuda::CUDAGuard guard(pre.device());
  Tensor y = new_output(pre.sizes(), pre.options(), format_of(cl));
  run_bn_act(pre, y, OptTensor(), scale, shift, act, act_first, cl, residual);
  return y;
}

Tensor bn_act_bwd_cuda(const Tensor& dy, const Tensor& pre, const Tensor& scale, const Tensor& shift,
                       const Tensor& mean, const Tensor& ca, const Tensor& cb, const Tensor& cd, int64_t act,
                       bool act_first) {
  const bool cl = check_anchor(pre, "pre");
  check_act_tensor(dy, "dy", pre, pre.sizes(), cl);
  const int64_t C = pre.size(1);
  check_cvec(scale, "scale", pre, C);
  check_cvec(shift, "shift", pre, C);
  check_cvec(mean, "mean", pre, C);
  check_cvec(ca, "ca", pre, C);
  check_cvec(cb, "cb", pre, C);
  check_cvec(cd, "cd", pre, C);
  check_act(act);
  const c10::cuda::CUDAGuard guard(pre.device());
  Tensor dpre = new_output(pre.sizes(), pre.options(), format_of(cl));
  run_dpre(dy, pre, dpre, false, scale, shift, mean, ca, cb, cd, act, act_first, cl, nullptr);
  return dpre;
}

}  // namespace
}  // namespace convmixer_kernels

#ifndef CMK_EMULATE  // (cuda_host.h)
TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  using namespace convmixer_kernels;
  m.impl("pw_gemm_stats", &pw_gemm_stats_cuda);
  m.impl("pw_fwd", &pw_fwd_cuda);
  m.impl("pw_bwd", &pw_bwd_cuda);
  m.impl("stem_gemm_stats", &stem_gemm_stats_cuda);
  m.impl("stem_fwd", &stem_fwd_cuda);
  m.impl("stem_bwd", &stem_bwd_cuda);
  m.impl("bn_act_fwd", &bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &bn_act_bwd_cuda);
}
#endif
