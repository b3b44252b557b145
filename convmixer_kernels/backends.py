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

# Per op and device type: the backends `auto` may pick, fastest first.  A backend is listed only once
# its block-level tests (forward and backward) passed on that device; CUDA ones need a GPU run
# (`make gpu-check`).  Status, 2026-11-26: on an H200 the pointwise/stem *op* tests of the cuda and
# triton backends passed (benchmarks/results/NOTES.md), but their backward uses the BN reduction of the
# depthwise ops, which has not run on a GPU yet; so no CUDA kernel is verified end to end, and `auto`
# runs the `torch` composite on CUDA tensors until gpu-check passes (select "cuda"/"triton" explicitly
# to use them).  The C++ CPU kernels are verified by the CI tests.
AUTO_ORDER = {
    ("dw_block", "cuda"): ("torch",),
    ("dw_block", "cpu"): ("cpu", "torch"),
    ("pw_block", "cuda"): ("torch",),
    ("pw_block", "cpu"): ("cpu", "torch"),
    ("stem_block", "cuda"): ("torch",),
    ("stem_block", "cpu"): ("cpu", "torch"),
}
# Once verified on a GPU, the measured order (H200, bf16) is: pw/stem ("triton", "cuda", "torch").

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


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def resolve(op: str, device: torch.device, name: str | None = None) -> str:
    """The concrete backend to run `op` on `device` with: `name` (default: get_backend())."""
    name = _validate_name(get_backend() if name is None else name)
    if name == "auto":
        order = AUTO_ORDER.get((op, device.type), ("torch",))
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
