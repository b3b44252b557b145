"""The ``torch`` backend: every low-level op written in plain PyTorch.

These functions are the executable specification of the low-level ops that the
C++ CPU, CUDA and Triton backends implement (``csrc/ops.cpp`` holds the
schemas).  They compute in the accumulation dtype (float32, or float64 for
float64 inputs) and round to the storage dtype at the same points as the
kernels, so a backend that disagrees with them by more than rounding is wrong.

Conventions shared by every backend
-----------------------------------
* ``x``: (N, C, H, W) activations in the storage dtype (fp32, fp16, bf16; fp64
  on CPU), NCHW-contiguous or channels_last.  Outputs have x's memory format.
* ``weight``: (C, 1, k, k) depthwise filter and ``bias``: (C,) or None, in the
  accumulation dtype ("acc": float32, float64 when x is float64).
* Per-channel vectors (scale, shift, mean, ca, cb, cd): (C,) in acc dtype.
* ``act``: an int code, see ``ACTIVATIONS``.  ``act_first``: True for the
  ConvMixer order (conv -> act -> BN), False for conv -> BN -> act.
* ``pre`` = DWConv_k(x) + bias, zero padding "same", stride 1, rounded to the
  storage dtype.  Every consumer (statistics, activation, normalisation, the
  backward) uses the rounded value, so forward and backward agree bitwise on it.
* The BatchNorm input is ``u = act(pre)`` when act_first else ``u = pre``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Run-time activation codes, shared with C++ (csrc/common.h) and Triton.
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "relu6": 5, "hardswish": 6}
ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / parameter dtype for a storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def act_fwd(v: torch.Tensor, act: int) -> torch.Tensor:
    if act == 0:
        return v
    if act == 1:
        return torch.relu(v)
    if act == 2:
        return F.gelu(v)
    if act == 3:
        return F.gelu(v, approximate="tanh")
    if act == 4:
        return F.silu(v)
    if act == 5:
        return F.relu6(v)
    if act == 6:
        return F.hardswish(v)
    raise ValueError(f"act: expected an activation code in {sorted(ACT_NAMES)}, got {act}")


def act_grad(v: torch.Tensor, act: int) -> torch.Tensor:
    """d act(v) / dv, elementwise, as PyTorch's backward formulas take it: relu'(0) = 0; relu6' is 1 on the
    open interval (0, 6), else 0; hardswish' is 0 up to -3, v / 3 + 1/2 on (-3, 3), 1 from 3 on (torch
    2.14's CPU and CUDA kernels: 0 at -3, 1 at 3).  At NaN both give 1 (the gradient passes), as
    PyTorch's CUDA kernels and its scalar CPU loop; its vectorized CPU loop gives 0 (relu6) and NaN
    (hardswish) there: PyTorch itself is not consistent."""
    if act == 0:
        return torch.ones_like(v)
    if act == 1:
        return (v > 0).to(v.dtype)
    if act == 2:
        cdf = 0.5 * (1.0 + torch.erf(v * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * v * v) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + v * pdf
    if act == 3:
        k0, k1 = math.sqrt(2.0 / math.pi), 0.044715
        inner = k0 * (v + k1 * v * v * v)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * v * v)
    if act == 4:
        s = torch.sigmoid(v)
        return s * (1.0 + v * (1.0 - s))
    if act == 5:
        return (~((v <= 0) | (v >= 6))).to(v.dtype)
    if act == 6:
        one = torch.ones_like(v)
        return torch.where(v <= -3, torch.zeros_like(v), torch.where(v < 3, v / 3 + 0.5, one))
    raise ValueError(f"act: expected an activation code in {sorted(ACT_NAMES)}, got {act}")


def _fmt(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _vec(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _pre(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    acc = acc_dtype(x.dtype)
    k = weight.shape[-1]
    c = F.conv2d(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc),
                 padding=k // 2, groups=x.shape[1])
    return c.to(x.dtype).to(acc)  # rounded to storage, used in acc


def dw_conv_stats(x, weight, bias, act: int, act_first: bool):
    """-> (pre [storage dtype, x's format], mean [C], var [C] biased) of the BN input u."""
    pre = _pre(x, weight, bias)
    u = act_fwd(pre, act) if act_first else pre
    mean = u.mean(dim=(0, 2, 3))
    var = (u - _vec(mean)).square().mean(dim=(0, 2, 3))
    return pre.to(x.dtype).contiguous(memory_format=_fmt(x)), mean, var


def dw_fwd(x, weight, bias, scale, shift, act: int, act_first: bool, residual: bool):
    """y = [x +] (scale*act(pre)+shift  if act_first else  act(scale*pre+shift))."""
    pre = _pre(x, weight, bias)
    if act_first:
        out = _vec(scale) * act_fwd(pre, act) + _vec(shift)
    else:
        out = act_fwd(_vec(scale) * pre + _vec(shift), act)
    if residual:
        out = out + x.to(out.dtype)
    return out.to(x.dtype).contiguous(memory_format=_fmt(x))


def _g_u(dy, pre, scale, shift, act, act_first):
    acc = pre.dtype
    dy = dy.to(acc)
    if act_first:
        return dy, act_fwd(pre, act)
    return dy * act_grad(_vec(scale) * pre + _vec(shift), act), pre


def dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act: int, act_first: bool):
    """-> (sum_g [C], sum_gxhat [C]): the BN backward sums.

    g = dy if act_first else dy * act'(scale*pre + shift) (the gradient at the BN
    output), xhat = (u - mean) * invstd.  These are dbeta and dgamma."""
    pre = pre.to(acc_dtype(pre.dtype))
    g, u = _g_u(dy, pre, scale, shift, act, act_first)
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gx = (g * (u - _vec(mean))).sum(dim=(0, 2, 3)) * invstd
    return sum_g, sum_gx


def dw_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act: int, act_first: bool,
           residual: bool):
    """-> (dx [storage, x's format], dweight [C,1,k,k] acc, dbias [C] acc).

    dpre_in = ca*g + cb*(u - mean) + cd  (the gradient at the BN input, with g, u
    as in dw_bwd_reduce), dpre = dpre_in * act'(pre) if act_first else dpre_in;
    dx = conv_transpose(dpre, weight) [+ dy], dweight = corr(x, dpre), dbias = sum dpre."""
    acc = acc_dtype(x.dtype)
    pre = pre.to(acc)
    g, u = _g_u(dy, pre, scale, shift, act, act_first)
    d = _vec(ca) * g + _vec(cb) * (u - _vec(mean)) + _vec(cd)
    if act_first:
        d = d * act_grad(pre, act)
    k = weight.shape[-1]
    C = x.shape[1]
    xa = x.to(acc)
    dx = torch.nn.grad.conv2d_input(xa.shape, weight.to(acc), d, padding=k // 2, groups=C)
    dweight = torch.nn.grad.conv2d_weight(xa, weight.shape, d, padding=k // 2, groups=C)
    if residual:
        dx = dx + dy.to(acc)
    return dx.to(x.dtype).contiguous(memory_format=_fmt(x)), dweight, d.sum(dim=(0, 2, 3))


# ---------------------------------------------------------------------------------------------------
# Pointwise block (1x1 conv = GEMM) and patch-embedding stem (non-overlapping p x p conv = GEMM).
#
# * ``weight`` of a GEMM op is in the STORAGE dtype (the tensor-core operand: what autocast would
#   feed cuBLAS), shape (C_out, C_in, 1, 1) for pw, (C_out, C_img, p, p) for the stem; ``bias`` (C_out,)
#   and per-channel vectors in acc dtype.  Accumulation in acc dtype (fp32).
# * pw: the GEMM input is s = x, or s = x + t rounded to the storage dtype when ``t`` is given (the
#   ConvMixer residual sum, fused into the operand load instead of a pass of its own).
# * pre = GEMM + bias, rounded to storage dtype; BN input u = act(pre) if act_first else pre (as in dw).
# * The BN backward reuses dw_bwd_reduce (it is generic over (N, C, H, W)) and bn_act_bwd below.


def _pw_input(x, t):
    return x if t is None else (x.to(acc_dtype(x.dtype)) + t.to(acc_dtype(x.dtype))).to(x.dtype)


def _pw_pre(x, t, weight, bias):
    acc = acc_dtype(x.dtype)
    s = _pw_input(x, t).to(acc)
    c = F.conv2d(s, weight.to(acc), None if bias is None else bias.to(acc))
    return c.to(x.dtype).to(acc)


def _stem_pre(x, weight, bias):
    acc = acc_dtype(x.dtype)
    p = weight.shape[-1]
    c = F.conv2d(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc), stride=p)
    return c.to(x.dtype).to(acc)


def _stats(pre, act, act_first):
    u = act_fwd(pre, act) if act_first else pre
    mean = u.mean(dim=(0, 2, 3))
    return mean, (u - _vec(mean)).square().mean(dim=(0, 2, 3))


def _bn_act(pre, scale, shift, act, act_first):
    if act_first:
        return _vec(scale) * act_fwd(pre, act) + _vec(shift)
    return act_fwd(_vec(scale) * pre + _vec(shift), act)


def pw_gemm_stats(x, t, weight, bias, act: int, act_first: bool):
    """-> (pre [storage, x's format], mean [C_out], var [C_out] biased) for pre = conv1x1(x [+ t]) + bias."""
    pre = _pw_pre(x, t, weight, bias)
    mean, var = _stats(pre, act, act_first)
    return pre.to(x.dtype).contiguous(memory_format=_fmt(x)), mean, var


def pw_fwd(x, t, weight, bias, scale, shift, act: int, act_first: bool):
    """y = scale*act(pre)+shift (act_first) or act(scale*pre+shift), pre = conv1x1(x [+ t]) + bias."""
    pre = _pw_pre(x, t, weight, bias)
    return _bn_act(pre, scale, shift, act, act_first).to(x.dtype).contiguous(memory_format=_fmt(x))


def stem_gemm_stats(x, weight, bias, act: int, act_first: bool):
    """-> (pre, mean, var) for pre = conv2d(x, weight, bias, stride=p), p = kernel size (remainder dropped)."""
    pre = _stem_pre(x, weight, bias)
    mean, var = _stats(pre, act, act_first)
    return pre.to(x.dtype).contiguous(memory_format=_fmt(x)), mean, var


def stem_fwd(x, weight, bias, scale, shift, act: int, act_first: bool):
    pre = _stem_pre(x, weight, bias)
    return _bn_act(pre, scale, shift, act, act_first).to(x.dtype).contiguous(memory_format=_fmt(x))


def bn_act_fwd(pre, scale, shift, act: int, act_first: bool, residual=None):
    """Elementwise: y = scale*act(pre)+shift (act_first) or act(scale*pre+shift), plus the residual (pre's
    dtype, shape and format; the depthwise block's training forward) if given, rounded once to pre's dtype,
    in pre's format."""
    acc = acc_dtype(pre.dtype)
    y = _bn_act(pre.to(acc), scale, shift, act, act_first)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(pre.dtype).contiguous(memory_format=_fmt(pre))


def bn_act_bwd(dy, pre, scale, shift, mean, ca, cb, cd, act: int, act_first: bool):
    """Elementwise: dpre (storage dtype, pre's format), the gradient at pre, as in dw_bwd:
    dpre_in = ca*g + cb*(u - mean) + cd, dpre = dpre_in * act'(pre) if act_first else dpre_in."""
    acc = acc_dtype(pre.dtype)
    p = pre.to(acc)
    g, u = _g_u(dy, p, scale, shift, act, act_first)
    d = _vec(ca) * g + _vec(cb) * (u - _vec(mean)) + _vec(cd)
    if act_first:
        d = d * act_grad(p, act)
    return d.to(pre.dtype).contiguous(memory_format=_fmt(pre))


def pw_bwd(dy, x, t, pre, weight, scale, shift, mean, ca, cb, cd, act: int, act_first: bool):
    """-> (ds [storage, x's format], dweight [storage dtype, weight's shape], dbias [C_out] acc).

    dpre as in bn_act_bwd (rounded to storage: the GEMM operand), ds = conv1x1 backward of dpre (the
    gradient of both x and t when t is given), dweight = dpre^T @ s with s = x [+ t] recomputed,
    dbias = sum of dpre (acc)."""
    acc = acc_dtype(x.dtype)
    dpre = bn_act_bwd(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first).to(acc)
    s = _pw_input(x, t).to(acc)
    w = weight.to(acc)
    ds = torch.nn.grad.conv2d_input(s.shape, w, dpre)
    dw = torch.nn.grad.conv2d_weight(s, w.shape, dpre)
    return ds.to(x.dtype).contiguous(memory_format=_fmt(x)), dw.to(weight.dtype), dpre.sum(dim=(0, 2, 3))


def stem_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act: int, act_first: bool, need_dx: bool):
    """-> (dx [storage, x's format; empty (0,) unless need_dx], dweight [storage], dbias [acc]).
    Pixels of x beyond the last full patch get zero gradient (the conv dropped them)."""
    acc = acc_dtype(x.dtype)
    p = weight.shape[-1]
    dpre = bn_act_bwd(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first).to(acc)
    w = weight.to(acc)
    dw = torch.nn.grad.conv2d_weight(x.to(acc), w.shape, dpre, stride=p)
    if need_dx:
        dx = torch.nn.grad.conv2d_input(x.shape, w, dpre, stride=p).to(x.dtype).contiguous(memory_format=_fmt(x))
    else:
        dx = x.new_empty((0,))
    return dx, dw.to(weight.dtype), dpre.sum(dim=(0, 2, 3))
