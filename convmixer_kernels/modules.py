"""Drop-in fused modules.  Modules own parameters and buffers; functional.py does the rest.

Each fused module keeps the children of the eager modules it replaces, under the same names, so
state dicts load both ways unchanged and parameters keep their identity:

    FusedDepthwiseBlock(residual=True)   <->  Residual(fn=Sequential(Conv2d(groups=C), act, BN))   keys fn.0.*, fn.2.*
    FusedDepthwiseBlock(residual=False)  <->  Sequential(Conv2d(groups=C), act, BN)  (or conv, BN, act)  keys 0.*, 2.*
    FusedPointwiseBlock                  <->  Sequential(Conv2d 1x1, act, BN)
    FusedPatchEmbed                      <->  Sequential(Conv2d(k=p, stride=p), act, BN)
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F_

ACTIVATION_NAMES = ("identity", "relu", "gelu", "gelu_tanh", "silu", "relu6", "hardswish")


def make_activation(name: str) -> nn.Module:
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    mods = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "relu6": nn.ReLU6,
            "hardswish": nn.Hardswish}
    if name not in mods:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATION_NAMES)}, got {name!r}")
    return mods[name]()


def activation_name(m: nn.Module) -> str | None:
    """The fused-kernel name of an activation module, or None if it is not one we fuse."""
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity", nn.ReLU6: "relu6",
            nn.Hardswish: "hardswish"}.get(type(m))


def _bn_args(bn: nn.BatchNorm2d):
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)


class _FusedConvActBN(nn.Module):
    """Common part: children conv, act, norm in the order of the eager modules (act_norm: conv, act, norm;
    norm_act: conv, norm, act), registered as '0', '1', '2' (or inside `fn` for a residual block)."""

    def _init_children(self, conv: nn.Conv2d, act: nn.Module, norm: nn.BatchNorm2d, order: str, residual: bool):
        if order not in F_.ORDERS:
            raise ValueError(f"order: expected one of {', '.join(F_.ORDERS)}, got {order!r}")
        name = activation_name(act)
        if name is None:
            raise ValueError("activation: expected one of nn.GELU (none/tanh), nn.ReLU, nn.SiLU, nn.ReLU6, "
                             f"nn.Hardswish, nn.Identity, got {act}")
        self.activation, self.order, self.residual = name, order, residual
        self.sync_bn, self.process_group = isinstance(norm, nn.SyncBatchNorm), getattr(norm, "process_group", None)
        seq = [conv, act, norm] if order == "act_norm" else [conv, norm, act]
        if residual:
            self.fn = nn.Sequential(*seq)
        else:
            for i, m in enumerate(seq):
                self.add_module(str(i), m)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, act: nn.Module, norm: nn.BatchNorm2d, order: str = "act_norm",
                     residual: bool = False):
        """Wrap existing modules (the same objects: parameters and buffers keep their identity)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_children(conv, act, norm, order, residual)
        self.training = norm.training  # keep the mode of the modules it wraps
        if residual:
            self.fn.training = norm.training
        return self

    def _body(self):
        return self.fn if self.residual else self

    @property
    def conv(self) -> nn.Conv2d:
        return self._body()._modules["0"]

    @property
    def norm(self) -> nn.BatchNorm2d:
        return self._body()._modules["2" if self.order == "act_norm" else "1"]

    @property
    def act(self) -> nn.Module:
        return self._body()._modules["1" if self.order == "act_norm" else "2"]

    def _common_kwargs(self):
        bn = self.norm  # its own training flag, as in eager (a frozen BatchNorm in a model in training mode)
        return dict(training=bn.training, momentum=bn.momentum, eps=bn.eps, activation=self.activation,
                    order=self.order, sync=self.sync_bn, process_group=self.process_group)

    def reference(self) -> nn.Module:
        """The equivalent eager modules (sharing this module's parameters and buffers)."""
        from .reference import Residual

        seq = nn.Sequential(self.conv, self.act, self.norm) if self.order == "act_norm" else \
            nn.Sequential(self.conv, self.norm, self.act)
        return Residual(seq) if self.residual else seq


class FusedDepthwiseBlock(_FusedConvActBN):
    """`x + BN(act(DWConv_k(x)))` (order="act_norm", residual=True) as one fused op."""

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu", order: str = "act_norm",
                 residual: bool = True, bias: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= 31:
            raise ValueError(f"kernel_size: expected an odd size in 1..31, got {kernel_size}")
        conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim, bias=bias, device=device, dtype=dtype)
        norm = nn.BatchNorm2d(dim, eps=eps, momentum=momentum, affine=affine,
                              track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._init_children(conv, make_activation(activation), norm, order, residual)

    @classmethod
    def from_modules(cls, conv, act, norm, order="act_norm", residual=True):
        return super().from_modules(conv, act, norm, order, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F_.dw_block(x, c.weight, c.bias, *_bn_args(self.norm), residual=self.residual,
                           **self._common_kwargs())

    def extra_repr(self) -> str:
        c = self.conv
        return (f"dim={c.in_channels}, kernel_size={c.kernel_size[0]}, activation={self.activation}, "
                f"order={self.order}, residual={self.residual}")


class FusedPointwiseBlock(_FusedConvActBN):
    """`BN(act(Conv1x1(x)))` (order="act_norm") as one GEMM with a fused epilogue; forward(x, residual=t)
    computes the block on x + t with the sum fused into the GEMM's operand load."""

    def __init__(self, in_channels: int, out_channels: int | None = None, activation: str = "gelu",
                 order: str = "act_norm", bias: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
        norm = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                              track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._init_children(conv, make_activation(activation), norm, order, False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        return F_.pw_block(x, c.weight, c.bias, *_bn_args(self.norm), residual=residual, **self._common_kwargs())

    def extra_repr(self) -> str:
        c = self.conv
        return f"{c.in_channels} -> {c.out_channels}, activation={self.activation}, order={self.order}"


class FusedPatchEmbed(_FusedConvActBN):
    """`BN(act(Conv_p,stride p(x)))` (the ConvMixer stem) as one GEMM over non-overlapping patches."""

    def __init__(self, dim: int, patch_size: int = 7, in_channels: int = 3, activation: str = "gelu",
                 order: str = "act_norm", bias: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        conv = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=bias, device=device, dtype=dtype)
        norm = nn.BatchNorm2d(dim, eps=eps, momentum=momentum, affine=affine,
                              track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._init_children(conv, make_activation(activation), norm, order, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F_.patch_embed(x, c.weight, c.bias, *_bn_args(self.norm), **self._common_kwargs())

    def extra_repr(self) -> str:
        c = self.conv
        return (f"{c.in_channels} -> {c.out_channels}, patch_size={c.kernel_size[0]}, activation={self.activation}, "
                f"order={self.order}")
