"""Op registration: fake (meta) implementations, the Triton ops, and the differentiable block op.

Low-level ops (schemas in csrc/ops.cpp, spec in torch_ops.py), one set per compiled backend:
    torch.ops.convmixer_kernels.{dw_conv_stats, dw_fwd, dw_bwd_reduce, dw_bwd}            C++ CPU / CUDA
    torch.ops.convmixer_kernels.{dw_conv_stats, ...}_triton                                Triton
The block op `torch.ops.convmixer_kernels.dw_block` composes them (forward: statistics pass +
normalising pass, or one pass in eval) and has autograd registered, so `torch.compile(fullgraph=True)`
sees one opaque node for the forward and traceable low-level ops in the backward."""

from __future__ import annotations

import types

import torch

from . import _ext, torch_ops
from .torch_ops import acc_dtype
from .utils import memory_format_of

LIB = "convmixer_kernels"


# ---------------------------------------------------------------------------------------------
# Fake implementations (shapes, dtypes and memory formats only).
def _like_x(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _vec_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


def _fake_dw_conv_stats(x, weight, bias, act, act_first):
    return _like_x(x), _vec_like(x), _vec_like(x)


def _fake_dw_fwd(x, weight, bias, scale, shift, act, act_first, residual):
    return _like_x(x)


def _fake_dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act, act_first):
    return _vec_like(pre), _vec_like(pre)


def _fake_dw_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act, act_first, residual):
    return _like_x(x), weight.new_empty(weight.shape, dtype=acc_dtype(x.dtype)), _vec_like(x)


_FAKES = {
    "dw_conv_stats": _fake_dw_conv_stats,
    "dw_fwd": _fake_dw_fwd,
    "dw_bwd_reduce": _fake_dw_bwd_reduce,
    "dw_bwd": _fake_dw_bwd,
}

if _ext.loaded():
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"{LIB}::{_name}", _fake)


# ---------------------------------------------------------------------------------------------
# Triton ops: custom_op + register_fake (triton_op cannot trace under the CPU interpreter).
def _triton_dw():
    from .triton import dw  # imported lazily: the package works without triton

    return dw


@torch.library.custom_op(f"{LIB}::dw_conv_stats_triton", mutates_args=())
def _dw_conv_stats_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: int,
                          act_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_dw().dw_conv_stats(x, weight, bias, act, act_first)


@torch.library.custom_op(f"{LIB}::dw_fwd_triton", mutates_args=())
def _dw_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                   shift: torch.Tensor, act: int, act_first: bool, residual: bool) -> torch.Tensor:
    return _triton_dw().dw_fwd(x, weight, bias, scale, shift, act, act_first, residual)


@torch.library.custom_op(f"{LIB}::dw_bwd_reduce_triton", mutates_args=())
def _dw_bwd_reduce_triton(dy: torch.Tensor, pre: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          mean: torch.Tensor, invstd: torch.Tensor, act: int,
                          act_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_dw().dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act, act_first)


@torch.library.custom_op(f"{LIB}::dw_bwd_triton", mutates_args=())
def _dw_bwd_triton(dy: torch.Tensor, x: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, ca: torch.Tensor,
                   cb: torch.Tensor, cd: torch.Tensor, act: int, act_first: bool,
                   residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_dw().dw_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act, act_first, residual)


for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"{LIB}::{_name}_triton", _fake)


def dw_ops(backend: str):
    """The four low-level depthwise ops of a concrete backend, as a namespace."""
    if backend == "torch":
        return torch_ops
    if backend in ("cpu", "cuda"):
        o = torch.ops.convmixer_kernels
        return types.SimpleNamespace(dw_conv_stats=o.dw_conv_stats, dw_fwd=o.dw_fwd,
                                     dw_bwd_reduce=o.dw_bwd_reduce, dw_bwd=o.dw_bwd)
    if backend == "triton":
        o = torch.ops.convmixer_kernels
        return types.SimpleNamespace(dw_conv_stats=o.dw_conv_stats_triton, dw_fwd=o.dw_fwd_triton,
                                     dw_bwd_reduce=o.dw_bwd_reduce_triton, dw_bwd=o.dw_bwd_triton)
    raise ValueError(f"backend: expected a concrete backend (cuda, triton, cpu, torch), got {backend!r}")


# ---------------------------------------------------------------------------------------------
# The differentiable block op.
def _bn_affine(C, acc, device, bn_weight, bn_bias):
    gamma = torch.ones(C, dtype=acc, device=device) if bn_weight is None else bn_weight.to(acc)
    beta = torch.zeros(C, dtype=acc, device=device) if bn_bias is None else bn_bias.to(acc)
    return gamma, beta


@torch.library.custom_op(f"{LIB}::dw_block", mutates_args=())
def dw_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bn_weight: torch.Tensor | None,
             bn_bias: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
             eps: float, act: int, act_first: bool, residual: bool, batch_stats: bool, need_pre: bool,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = [x +] BN(act(DWConv(x) + bias)) (act_first) or [x +] act(BN(DWConv(x) + bias)).

    Returns (y, pre, mean, var): pre = DWConv(x) + bias in x's dtype (empty unless batch_stats or
    need_pre), mean/var = the statistics BN normalised with (batch, biased; or the running ones).
    Argument checking and BN bookkeeping are functional.dw_block's job."""
    ops = dw_ops(backend)
    acc = acc_dtype(x.dtype)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if batch_stats:
        pre, mean, var = ops.dw_conv_stats(x, w, b, act, act_first)
    else:
        mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
        pre = ops.dw_conv_stats(x, w, b, act, act_first)[0] if need_pre else x.new_empty((0,))
    gamma, beta = _bn_affine(x.shape[1], acc, x.device, bn_weight, bn_bias)
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    y = ops.dw_fwd(x, w, b, scale, shift, act, act_first, residual)
    return y, pre, mean, var


@dw_block.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, residual,
      batch_stats, need_pre, backend):
    pre = _like_x(x) if (batch_stats or need_pre) else x.new_empty((0,))
    return _like_x(x), pre, _vec_like(x), _vec_like(x)


def _dw_block_setup(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, _rm, _rv, eps, act, act_first, residual, batch_stats, _np, backend = inputs
    _y, pre, mean, var = output
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, pre, mean, var)
    ctx.cfg = (eps, act, act_first, residual, batch_stats, backend)


def _dw_block_backward(ctx, dy, _dpre, _dmean, _dvar):
    x, weight, bias, bn_weight, bn_bias, pre, mean, var = ctx.saved_tensors
    eps, act, act_first, residual, batch_stats, backend = ctx.cfg
    if pre.numel() == 0:
        raise RuntimeError("dw_block: backward needs pre; call the op with need_pre=True when gradients are needed")
    ops = dw_ops(backend)
    acc = acc_dtype(x.dtype)
    dy = dy.contiguous(memory_format=memory_format_of(x))  # no-op unless autograd handed another layout
    gamma, beta = _bn_affine(x.shape[1], acc, x.device, bn_weight, bn_bias)
    invstd = torch.rsqrt(var + eps)
    scale = gamma * invstd
    shift = beta - mean * scale
    sum_g, sum_gx = ops.dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act, act_first)
    ca = scale
    if batch_stats:
        m = x.shape[0] * x.shape[2] * x.shape[3]
        cb = -ca * invstd * sum_gx / m
        cd = -ca * sum_g / m
    else:
        cb = torch.zeros_like(ca)
        cd = torch.zeros_like(ca)
    dx, dweight, dbias = ops.dw_bwd(dy, x, pre, weight.to(acc), scale, shift, mean, ca, cb, cd, act, act_first,
                                    residual)
    return (dx, dweight.to(weight.dtype), None if bias is None else dbias.to(bias.dtype),
            None if bn_weight is None else sum_gx.to(bn_weight.dtype),
            None if bn_bias is None else sum_g.to(bn_bias.dtype),
            None, None, None, None, None, None, None, None, None)


dw_block.register_autograd(_dw_block_backward, setup_context=_dw_block_setup)
