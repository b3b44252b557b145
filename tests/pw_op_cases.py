"""Shared cases for the low-level pointwise / stem / elementwise BN ops: every backend is compared op by
op with convmixer_kernels.torch_ops (the executable spec).  Block-level fp64-oracle tests live in
test_pw_block.py."""

from __future__ import annotations

import torch

from convmixer_kernels import torch_ops
from dw_op_cases import OP_TOL, assert_close_op  # noqa: F401  (same tolerances as the dw ops)

# GEMM outputs in low precision: the reduction over C_in rounds differently per order of summation.


def make_pw_inputs(N, C_in, C_out, H, W, dtype, device, channels_last=False, bias=True, residual=False,
                   stem_p=None, seed=0):
    """Inputs for pw ops (stem_p None) or stem ops (x has 3 channels, weight (C_out, 3, p, p))."""
    g = torch.Generator().manual_seed(seed)
    acc = torch_ops.acc_dtype(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if stem_p is None:
        x = torch.randn(N, C_in, H, W, generator=g)
        weight = torch.randn(C_out, C_in, 1, 1, generator=g) / C_in ** 0.5
        Ho, Wo = H, W
    else:
        x = torch.randn(N, 3, H, W, generator=g)
        weight = torch.randn(C_out, 3, stem_p, stem_p, generator=g) / (3 * stem_p * stem_p) ** 0.5
        Ho, Wo = H // stem_p, W // stem_p
    d = dict(x=x.to(dtype), t=torch.randn(x.shape, generator=g).to(dtype) if residual else None,
             weight=weight.to(dtype), bias=(torch.randn(C_out, generator=g) * 0.1).to(acc) if bias else None,
             dy=torch.randn(N, C_out, Ho, Wo, generator=g).to(dtype))
    vec = lambda lo, hi: (torch.rand(C_out, generator=g) * (hi - lo) + lo).to(acc)  # noqa: E731
    d.update(scale=vec(0.5, 1.5), shift=vec(-0.5, 0.5), mean=vec(-0.2, 0.2), invstd=vec(0.5, 2.0),
             ca=vec(0.5, 1.5), cb=vec(-0.5, 0.5), cd=vec(-0.1, 0.1))
    out = {}
    for k, v in d.items():
        if v is None:
            out[k] = None
            continue
        v = v.to(device)
        out[k] = v.contiguous(memory_format=fmt) if k in ("x", "t", "dy") else v
    if stem_p is None:
        out["pre"] = torch_ops.pw_gemm_stats(out["x"], out["t"], out["weight"], out["bias"], 2, True)[0]
    else:
        out["pre"] = torch_ops.stem_gemm_stats(out["x"], out["weight"], out["bias"], 2, True)[0]
    out["pre"] = out["pre"].contiguous(memory_format=fmt)
    return out


def _cmp(name, got, want, dtype, cl):
    for i, (g_, w_) in enumerate(zip(got if isinstance(got, tuple) else (got,),
                                     want if isinstance(want, tuple) else (want,))):
        if w_.numel() == 0:
            assert g_.numel() == 0, f"{name}[{i}]: expected an empty tensor"
            continue
        assert_close_op(f"{name}[{i}]", g_, w_, dtype, cl if w_.dim() == 4 and i == 0 else None)


def check_pw_ops(ops, inp, act, act_first, dtype, channels_last):
    """pw_gemm_stats, pw_fwd, pw_bwd, bn_act_fwd, bn_act_bwd of `ops` against torch_ops."""
    c = {k: (None if v is None else v.cpu()) for k, v in inp.items()}
    A = lambda d, names: [d[n] for n in names]  # noqa: E731
    n1 = ("x", "t", "weight", "bias")
    _cmp("pw_gemm_stats", ops.pw_gemm_stats(*A(inp, n1), act, act_first),
         torch_ops.pw_gemm_stats(*A(c, n1), act, act_first), dtype, channels_last)
    n2 = n1 + ("scale", "shift")
    _cmp("pw_fwd", ops.pw_fwd(*A(inp, n2), act, act_first), torch_ops.pw_fwd(*A(c, n2), act, act_first), dtype,
         channels_last)
    n3 = ("dy", "x", "t", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    _cmp("pw_bwd", ops.pw_bwd(*A(inp, n3), act, act_first), torch_ops.pw_bwd(*A(c, n3), act, act_first), dtype,
         channels_last)
    check_bn_act_ops(ops, inp, act, act_first, dtype, channels_last)


def check_stem_ops(ops, inp, act, act_first, dtype, channels_last, need_dx=True):
    c = {k: (None if v is None else v.cpu()) for k, v in inp.items()}
    A = lambda d, names: [d[n] for n in names]  # noqa: E731
    n1 = ("x", "weight", "bias")
    _cmp("stem_gemm_stats", ops.stem_gemm_stats(*A(inp, n1), act, act_first),
         torch_ops.stem_gemm_stats(*A(c, n1), act, act_first), dtype, channels_last)
    n2 = n1 + ("scale", "shift")
    _cmp("stem_fwd", ops.stem_fwd(*A(inp, n2), act, act_first), torch_ops.stem_fwd(*A(c, n2), act, act_first),
         dtype, channels_last)
    n3 = ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    _cmp("stem_bwd", ops.stem_bwd(*A(inp, n3), act, act_first, need_dx),
         torch_ops.stem_bwd(*A(c, n3), act, act_first, need_dx), dtype, channels_last)


def check_bn_act_ops(ops, inp, act, act_first, dtype, channels_last):
    c = {k: (None if v is None else v.cpu()) for k, v in inp.items()}
    A = lambda d, names: [d[n] for n in names]  # noqa: E731
    n1 = ("pre", "scale", "shift")
    _cmp("bn_act_fwd", ops.bn_act_fwd(*A(inp, n1), act, act_first),
         torch_ops.bn_act_fwd(*A(c, n1), act, act_first), dtype, channels_last)
    # with a residual (the depthwise block's training forward): dy stands in, it has pre's shape and layout
    _cmp("bn_act_fwd+residual", ops.bn_act_fwd(*A(inp, n1), act, act_first, inp["dy"]),
         torch_ops.bn_act_fwd(*A(c, n1), act, act_first, c["dy"]), dtype, channels_last)
    n2 = ("dy", "pre", "scale", "shift", "mean", "ca", "cb", "cd")
    _cmp("bn_act_bwd", ops.bn_act_bwd(*A(inp, n2), act, act_first),
         torch_ops.bn_act_bwd(*A(c, n2), act, act_first), dtype, channels_last)


# The piecewise activations at their kinks and ends, where a backend's comparisons (< or <=) decide: PyTorch's
# own forward and autograd there (the same in every dtype: these values are exact in fp16 and bf16).
EDGE_ACTS = {"identity": (0, None), "relu": (1, torch.relu), "relu6": (5, torch.nn.functional.relu6),
             "hardswish": (6, torch.nn.functional.hardswish)}
EDGES = [-float("inf"), -6.0, -3.5, -3.0, -1.0, -0.0, 0.0, 0.5, 3.0, 5.5, 6.0, 7.0, float("inf")]


def check_act_edges(bn_act_fwd, bn_act_bwd, device, dtype):
    """bn_act_fwd(pre, scale=1, shift=0) = act(pre) and bn_act_bwd with ca=1, cb=cd=0 = dy * act'(pre), both
    act_first, on EDGES: equal to PyTorch's forward and autograd (fp64, the same conventions in every dtype)
    up to the dtype's rounding of the middle of hardswish's ramp.  (The gradient leaves out +-inf: there the
    BatchNorm's term cb * (u - mean) is 0 * inf, NaN, in PyTorch's BatchNorm backward too.)"""
    acc = torch_ops.acc_dtype(dtype)
    one, zero = (torch.ones(1, device=device, dtype=acc), torch.zeros(1, device=device, dtype=acc))
    pre = torch.tensor(EDGES, dtype=dtype, device=device).view(1, 1, 1, -1)
    dy = torch.ones_like(pre)
    for name, (act, fn) in EDGE_ACTS.items():
        p64 = pre.double().cpu().requires_grad_()
        y64 = fn(p64) if fn is not None else p64 * 1.0
        g64, = torch.autograd.grad(y64.sum(), p64)
        y = bn_act_fwd(pre, one, zero, act, True)
        g = bn_act_bwd(dy, pre, one, zero, zero, one, zero, zero, act, True)
        tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=0.0, equal_nan=True)  # hardswish(-inf): -inf * 0
        torch.testing.assert_close(y.double().cpu(), y64.detach(), **tol, msg=lambda m: f"{name} forward: {m}")
        fin = torch.isfinite(pre.double().cpu())
        torch.testing.assert_close(g.double().cpu()[fin], g64[fin], **tol, msg=lambda m: f"{name} gradient: {m}")
