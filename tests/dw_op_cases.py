"""Shared cases for the low-level depthwise ops: every backend is compared op by op with
convmixer_kernels.torch_ops (the executable spec).  Block-level fp64-oracle tests live in
test_dw_block.py."""

from __future__ import annotations

import torch

from convmixer_kernels import torch_ops

# Relative max-error bound per storage dtype for an op against torch_ops on the same inputs:
# a couple of ulps of the storage dtype (outputs are rounded once) plus summation-order noise.
OP_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(N, C, H, W, k, dtype, device, channels_last=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch_ops.acc_dtype(dtype)
    x = torch.randn(N, C, H, W, generator=g).to(dtype)
    dy = torch.randn(N, C, H, W, generator=g).to(dtype)
    weight = (torch.randn(C, 1, k, k, generator=g) / k).to(acc)
    b = (torch.randn(C, generator=g) * 0.1).to(acc) if bias else None
    vec = lambda lo, hi: (torch.rand(C, generator=g) * (hi - lo) + lo).to(acc)  # noqa: E731
    d = dict(x=x, dy=dy, weight=weight, bias=b, scale=vec(0.5, 1.5), shift=vec(-0.5, 0.5),
             mean=vec(-0.2, 0.2), invstd=vec(0.5, 2.0), ca=vec(0.5, 1.5), cb=vec(-0.5, 0.5),
             cd=vec(-0.1, 0.1))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {}
    for name, t in d.items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device)
        out[name] = t.contiguous(memory_format=fmt) if t.dim() == 4 and t.shape[0] == N else t
    pre, _, _ = torch_ops.dw_conv_stats(out["x"], out["weight"], out["bias"], 2, True)
    out["pre"] = pre
    return out


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """max |a - b| / max(max |b|, 1), and the flat index of the worst element (NaN counts as inf)."""
    a = a.detach().double().cpu().flatten()
    b = b.detach().double().cpu().flatten()
    diff = (a - b).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    idx = int(diff.argmax())
    return float(diff[idx]) / max(float(b.abs().max()), 1.0), idx


def assert_close_op(name, got, want, dtype, channels_last=None):
    tol = OP_TOL[dtype]
    if channels_last is not None and got.dim() == 4:
        fmt_ok = got.is_contiguous(memory_format=torch.channels_last) if channels_last else got.is_contiguous()
        assert fmt_ok, f"{name}: output memory format differs from x's"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, idx = max_rel_err(got, want)
    assert err <= tol, f"{name}: rel err {err:.3g} > {tol:.3g} at flat index {idx}"


# dw_bwd's tensor arguments, in order
BWD_ARGS = ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")


def check_all_ops(ops, inp, act, act_first, residual, dtype, channels_last):
    """Run the four ops from `ops` (an object with dw_conv_stats, dw_fwd, dw_bwd_reduce, dw_bwd)
    on `inp` and compare each output with torch_ops on CPU copies of the same inputs."""
    cpu = {k: (None if v is None else v.cpu()) for k, v in inp.items()}
    # dw_conv_stats
    got = ops.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], act, act_first)
    want = torch_ops.dw_conv_stats(cpu["x"], cpu["weight"], cpu["bias"], act, act_first)
    for n, g_, w_ in zip(("pre", "mean", "var"), got, want):
        assert_close_op(f"dw_conv_stats.{n}", g_, w_, dtype, channels_last)
    # dw_fwd
    args = ("x", "weight", "bias", "scale", "shift")
    got = ops.dw_fwd(*[inp[a] for a in args], act, act_first, residual)
    want = torch_ops.dw_fwd(*[cpu[a] for a in args], act, act_first, residual)
    assert_close_op("dw_fwd.y", got, want, dtype, channels_last)
    # dw_bwd_reduce
    args = ("dy", "pre", "scale", "shift", "mean", "invstd")
    got = ops.dw_bwd_reduce(*[inp[a] for a in args], act, act_first)
    want = torch_ops.dw_bwd_reduce(*[cpu[a] for a in args], act, act_first)
    for n, g_, w_ in zip(("sum_g", "sum_gxhat"), got, want):
        assert_close_op(f"dw_bwd_reduce.{n}", g_, w_, dtype)
    # dw_bwd
    got = ops.dw_bwd(*[inp[a] for a in BWD_ARGS], act, act_first, residual)
    want = torch_ops.dw_bwd(*[cpu[a] for a in BWD_ARGS], act, act_first, residual)
    for n, g_, w_ in zip(("dx", "dweight", "dbias"), got, want):
        assert_close_op(f"dw_bwd.{n}", g_, w_, dtype, channels_last if n == "dx" else None)
