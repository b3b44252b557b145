"""Small helpers shared by the Python backends."""

from __future__ import annotations

import os

import torch

POISON_ENV = "CONVMIXER_KERNELS_POISON_OUTPUTS"


def poison_outputs() -> bool:
    """True when outputs must start as NaN (tests set CONVMIXER_KERNELS_POISON_OUTPUTS=1)."""
    return os.environ.get(POISON_ENV, "0") == "1"


def new_output(shape, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when poisoning is on, so unwritten elements show."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_outputs():
        t.fill_(float("nan"))
    return t


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last-contiguous 4-D tensor that is not also NCHW-contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), without the call when t already has it: a no-op Tensor.to still costs about 3 us of
    argument parsing on this project's CPU, and a training step of a fused block made about ten."""
    return t if t.dtype == dtype else t.to(dtype)


# A functorch transform is active (vmap, torch.func.grad, ...); without that private hook (not expected on
# the supported torch versions) every call is taken to be under one, so the blocks keep their custom ops.
peek_functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: True)
