"""Drop-in fused modules.  Modules own parameters and buffers; functional.py does the rest."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F_

_ACT_MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name not in _ACT_MODULES:
        raise ValueError(f"activation: expected one of identity, relu, gelu, gelu_tanh, silu, got {name!r}")
    return _ACT_MODULES[name]()


class FusedDepthwiseBlock(nn.Module):
    """`x + BN(act(DWConv_k(x)))` (order="act_norm", residual=True) as one fused op.

    Parameters and buffers live in `conv` (nn.Conv2d, groups=dim) and `norm` (nn.BatchNorm2d),
    so their initialisation and checkpoint format are PyTorch's own."""

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu", order: str = "act_norm",
                 residual: bool = True, bias: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= 31:
            raise ValueError(f"kernel_size: expected an odd size in 1..31, got {kernel_size}")
        if order not in F_.ORDERS:
            raise ValueError(f"order: expected one of {', '.join(F_.ORDERS)}, got {order!r}")
        F_.act_code(activation)
        self.activation, self.order, self.residual = activation, order, residual
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias,
                              device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(dim, eps=eps, momentum=momentum, affine=affine,
                                   track_running_stats=track_running_stats, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.norm
        return F_.dw_block(
            x, self.conv.weight, self.conv.bias, bn.weight, bn.bias,
            bn.running_mean, bn.running_var, bn.num_batches_tracked,  # None unless track_running_stats
            training=self.training, momentum=bn.momentum, eps=bn.eps, activation=self.activation,
            order=self.order, residual=self.residual)

    def extra_repr(self) -> str:
        return (f"dim={self.conv.in_channels}, kernel_size={self.conv.kernel_size[0]}, activation={self.activation}, "
                f"order={self.order}, residual={self.residual}")

    def reference(self) -> nn.Module:
        """The equivalent eager modules (sharing this module's parameters and buffers)."""
        from .reference import Residual

        act = make_activation(self.activation)
        body = nn.Sequential(self.conv, act, self.norm) if self.order == "act_norm" else \
            nn.Sequential(self.conv, self.norm, act)
        return Residual(body) if self.residual else body
