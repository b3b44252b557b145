"""The fused ConvMixer: same constructor and state-dict keys as convmixer_kernels.reference.ConvMixer."""

from __future__ import annotations

from torch import nn

from . import reference
from .fuse import fuse


class ConvMixer(reference.ConvMixer):
    """ConvMixer-dim/depth with fused kernels.  Loads a reference ConvMixer checkpoint and vice versa."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, n_classes: int = 1000,
                 activation=nn.GELU):
        super().__init__(dim, depth, kernel_size, patch_size, n_classes, activation)
        report = fuse(self, inplace=True, return_report=True)[1]
        if report.skipped:
            raise ValueError(f"activation: {activation} cannot be fused: {report.skipped[0][1]}")
