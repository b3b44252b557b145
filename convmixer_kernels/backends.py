"""Backend selection: `cuda` (compiled kernels), `triton`, `cpu` (compiled C++ CPU kernels), `torch`
(pure PyTorch composite, the reference), and `auto`.

    convmixer_kernels.set_backend("triton")
    with convmixer_kernels.backend("torch"): ...
    CONVMIXER_KERNELS_BACKEND=cpu python train.py

`auto` (the default) picks, per op and device, the fastest backend verified for it (AUTO_ORDER).
Asking for a backend that cannot run raises a RuntimeError that says why."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

from . import _ext

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Per op and device type: the backends `auto` may pick, fastest first; AUTO_ORDER_GRAD overrides it
# when autograd will run the op's backward.  A backend is listed only once its block-level tests
# (forward and backward) passed on that device, and placed by measurement (benchmarks/results/).
# CUDA, from `make gpu-check` on an H200 (bf16): the depthwise CUDA kernels beat eager in eval (1.3-6.4x,
# 2026-11-26) and in training.  The pointwise and stem CUDA paths beat eager forward-only; per training
# step they lose to eager (0.71x pointwise, 2026-11-27) but win against the torch composite, which
# `auto` used to pick for them with autograd: timm's convmixer_768_32 (batch 32, 224x224, channels_last,
# autocast) took 139.9 ms a training step that way and 66.8 ms with the CUDA kernels (eager: 62.4 ms;
# benchmarks/results/nvidia-h200-2026-11-27-followup.md).  So no override on CUDA any more.  The Triton
# kernels were slower than the CUDA ones everywhere measured.  The C++ CPU kernels are verified by the
# CI tests.
AUTO_ORDER = {
    ("dw_block", "cuda"): ("cuda", "torch"),
    ("dw_block", "cpu"): ("cpu", "torch"),
    ("pw_block", "cuda"): ("cuda", "torch"),
    ("pw_block", "cpu"): ("cpu", "torch"),
    ("stem_block", "cuda"): ("cuda", "torch"),
    ("stem_block", "cpu"): ("cpu", "torch"),
}
AUTO_ORDER_GRAD: dict = {}

_state = threading.local()
_default = [os.environ.get("CONVMIXER_KERNELS_BACKEND", "auto")]


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op, process-wide (a `backend(...)` context overrides it)."""
    _default[0] = _validate_name(name)


def get_backend() -> str:
    """The backend name in force in this thread: a `backend(...)` context, else set_backend/env."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _validate_name(_default[0])


@contextlib.contextmanager
def backend(name: str):
    """Context manager: use backend `name` inside the block (thread-local, nests)."""
    _validate_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


# Read once, at import: backend resolution runs inside torch.compile'd code, where Dynamo refuses to
# trace importlib (a graph break, an error under fullgraph=True).  Triton itself fixes interpreted-or-
# compiled when a kernel is defined, so reading TRITON_INTERPRET at import agrees with it.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return _HAS_TRITON


def triton_interpreting() -> bool:
    return _TRITON_INTERPRET


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run ops on tensors on `device`, else the reason it cannot."""
    dev = device.type
    if name == "torch":
        return None
    if name == "cuda":
        if not _ext.loaded():
            return f"the compiled extension convmixer_kernels._C did not load ({_ext.load_error})"
        if not _ext.built_with_cuda():
            return "this build of convmixer_kernels has no CUDA kernels (built without a CUDA toolkit " \
                   "or with CONVMIXER_KERNELS_SKIP_CUDA_BUILD=1)"
        if dev != "cuda":
            return f"it runs on CUDA tensors only, got tensors on {device}"
        return None
    if name == "cpu":
        if not _ext.loaded():
            return f"the compiled extension convmixer_kernels._C did not load ({_ext.load_error})"
        if dev != "cpu":
            return f"it runs on CPU tensors only, got tensors on {device}"
        return None
    if name == "triton":
        if not triton_available():
            return "the triton package is not installed"
        if dev == "cuda":
            return None
        if dev == "cpu" and triton_interpreting():
            return None
        return f"it runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"
    return f"unknown backend {name!r}"


def resolve(op: str, device: torch.device, name: str | None = None, grad: bool = False) -> str:
    """The concrete backend to run `op` on `device` with: `name` (default: get_backend()).  `grad`:
    autograd will run the op's backward (`auto` may pick differently then)."""
    name = _validate_name(get_backend() if name is None else name)
    if name == "auto":
        key = (op, device.type)
        order = (AUTO_ORDER_GRAD.get(key) if grad else None) or AUTO_ORDER.get(key, ("torch",))
        for cand in order:
            if why_unavailable(cand, device) is None:
                return cand
        return "torch"
    reason = why_unavailable(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available for {op}: {reason}")
    return name


def available(device: torch.device | str) -> list[str]:
    """Backends that can run on `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if why_unavailable(b, device) is None]
