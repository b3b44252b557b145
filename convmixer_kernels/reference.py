"""The paper's ConvMixer ("Patches Are All You Need?", Trockman & Kolter), in plain PyTorch.

This is the oracle of every test (run in float64 on the CPU).  Structure, exactly as the paper:

    stem:   Conv2d(3, dim, p, stride=p) -> act -> BatchNorm2d
    blocks: Residual(Sequential(Conv2d(dim, dim, k, groups=dim, padding="same"), act, BatchNorm2d)),
            Conv2d(dim, dim, 1), act, BatchNorm2d
    head:   AdaptiveAvgPool2d(1) -> Flatten -> Linear(dim, n_classes)

The norm comes after the activation.  (The "ConvMixerLayer" of some tutorials, a 1x1 expansion
followed by a depthwise conv with no activation, norm or residual, is a different network.)"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class Residual(nn.Module):
    """fn(x) + x, the paper's residual wrapper (state-dict keys `fn.*`, as in the paper and timm)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def depthwise_block(dim: int, kernel_size: int, activation=nn.GELU) -> Residual:
    return Residual(nn.Sequential(
        nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
        activation(),
        nn.BatchNorm2d(dim),
    ))


class ConvMixer(nn.Sequential):
    """ConvMixer-dim/depth.  An nn.Sequential, so its state-dict keys are the paper's."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, n_classes: int = 1000,
                 activation=nn.GELU):
        if dim < 1 or depth < 0:
            raise ValueError(f"dim, depth: expected dim >= 1 and depth >= 0, got dim={dim}, depth={depth}")
        if kernel_size < 1 or patch_size < 1:
            raise ValueError(f"kernel_size, patch_size: expected positive sizes, got {kernel_size}, {patch_size}")
        super().__init__(
            nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
            activation(),
            nn.BatchNorm2d(dim),
            *[nn.Sequential(
                depthwise_block(dim, kernel_size, activation),
                nn.Conv2d(dim, dim, kernel_size=1),
                activation(),
                nn.BatchNorm2d(dim),
            ) for _ in range(depth)],
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(dim, n_classes),
        )
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size

    def __getitem__(self, idx):
        """As nn.Sequential, but a slice is a plain nn.Sequential (the paper's model is one)."""
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


def dw_block_ref(x, weight, bias, bn: nn.BatchNorm2d, activation: nn.Module, order="act_norm", residual=True):
    """The depthwise block as eager PyTorch modules compute it (the oracle of functional.dw_block)."""
    k = weight.shape[-1]
    t = torch.nn.functional.conv2d(x, weight, bias, padding=k // 2, groups=x.shape[1])
    t = bn(activation(t)) if order == "act_norm" else activation(bn(t))
    return x + t if residual else t
