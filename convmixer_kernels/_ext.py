"""Loading the compiled extension, and what it was built with.

Importing this module never fails: when `convmixer_kernels._C` cannot be loaded (no build, an ABI
mismatch), the pure-Python parts still work and `load_error` says why (torchao does the same)."""

from __future__ import annotations

import torch

load_error: str | None = None
try:
    from . import _C  # noqa: F401  (loading it runs TORCH_LIBRARY / TORCH_LIBRARY_IMPL)
except Exception as e:  # pragma: no cover - depends on the build
    _C = None
    load_error = f"{type(e).__name__}: {e}"


def loaded() -> bool:
    return _C is not None


def build_info() -> dict[str, str]:
    """{'torch': ..., 'cuda': '0'|'1', 'nvcc': ..., 'archs': ...} as the extension reports it."""
    if _C is None:
        return {}
    raw = torch.ops.convmixer_kernels.build_info()
    return dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)


# Read once: backend resolution runs inside torch.compile'd code, and Dynamo cannot trace an op that
# returns a string (it graph-breaks, which fullgraph=True turns into an error).
_BUILT_WITH_CUDA = build_info().get("cuda") == "1"


def built_with_cuda() -> bool:
    return _BUILT_WITH_CUDA
