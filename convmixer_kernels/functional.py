"""Tensors in, tensors out.  Argument checking and BatchNorm bookkeeping happen here, once."""

from __future__ import annotations

import torch

from . import backends
from .ops import dw_block as _dw_block_op
from .torch_ops import ACTIVATIONS

ORDERS = ("act_norm", "norm_act")
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _check_tensor(t, name, x, shape, allow_none=True):
    if t is None:
        if not allow_none:
            raise ValueError(f"{name}: expected a tensor, got None")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _layout_ok(x: torch.Tensor) -> torch.Tensor:
    """x itself when NCHW- or channels_last-contiguous; otherwise the one documented copy (to the
    layout its strides suggest), because the kernels take those two layouts only."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    cl = x.dim() == 4 and x.stride(1) < x.stride(3)
    return x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """nn.BatchNorm2d's update, exactly once per forward, with no host synchronisation."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average
            factor = 1.0 / num_batches_tracked.to(torch.float64)
        else:
            factor = momentum
        unbiased = var * (count / max(count - 1, 1))
        if isinstance(factor, torch.Tensor):
            running_mean.copy_(running_mean + (mean.to(running_mean.dtype) - running_mean) * factor.to(running_mean.dtype))
            running_var.copy_(running_var + (unbiased.to(running_var.dtype) - running_var) * factor.to(running_var.dtype))
        else:
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def dw_block(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str = "gelu",
    order: str = "act_norm",
    residual: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """The fused depthwise block, equivalent to

        t = conv2d(x, weight, bias, padding=k // 2, groups=C)
        t = batch_norm(act(t), ...) if order == "act_norm" else act(batch_norm(t, ...))
        return x + t if residual else t

    with batch_norm exactly nn.BatchNorm2d's (`training`, running stats updated in place once,
    momentum None = cumulative average; running_mean/var None = track_running_stats=False)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"x: expected dtype float32, float16, bfloat16 or float64, got {x.dtype}")
    N, C, H, W = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight: expected a (C, 1, k, k) tensor, got {getattr(weight, 'shape', weight)}")
    k = weight.shape[-1]
    if weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] != k:
        raise ValueError(f"weight: expected shape ({C}, 1, k, k) for x with C = {C} channels, got {tuple(weight.shape)}")
    if k % 2 == 0 or not 1 <= k <= 31:
        raise ValueError(f"weight: expected an odd kernel size k in 1..31, got k = {k}")
    _check_tensor(weight, "weight", x, weight.shape)
    _check_tensor(bias, "bias", x, (C,))
    _check_tensor(bn_weight, "bn_weight", x, (C,))
    _check_tensor(bn_bias, "bn_bias", x, (C,))
    _check_tensor(running_mean, "running_mean", x, (C,))
    _check_tensor(running_var, "running_var", x, (C,))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both tensors or both None")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")
    act = act_code(activation)
    for pname, p in (("weight", weight), ("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{pname}: expected dtype {x.dtype} (the dtype of x) or float32, got {p.dtype}")

    batch_stats = training or running_mean is None
    count = N * H * W
    if batch_stats and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    name = backends.resolve("dw_block", x.device, backend)
    x = _layout_ok(x)
    params = (weight, bias, bn_weight, bn_bias)
    need_pre = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    y, _pre, mean, var = _dw_block_op(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps),
                                      act, order == "act_norm", bool(residual), bool(batch_stats), bool(need_pre),
                                      name)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count,
                             momentum)
    return y
