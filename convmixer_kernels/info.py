"""`convmixer_kernels.info()`: versions, what was built, which backends can run here, the GPU."""

from __future__ import annotations

import platform
import sys

import torch

from . import _ext, backends


def info_dict() -> dict:
    from . import __version__

    d = {
        "convmixer_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _ext.loaded(),
        "extension_error": _ext.load_error,
        "build": _ext.build_info(),
        "triton": None,
        "triton_interpret": backends.triton_interpreting(),
        "gpu": None,
        "backends": {
            "cpu": backends.available("cpu"),
        },
        "backend_selected": backends.get_backend(),
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
        d["backends"]["cuda"] = backends.available("cuda")
    else:
        d["backends"]["cuda"] = []
    return d


def info(file=None) -> dict:
    """Print a report of the installation and return it as a dict."""
    d = info_dict()
    out = file or sys.stdout
    b = d["build"]
    lines = [
        f"convmixer_kernels {d['convmixer_kernels']}  (python {d['python']}, torch {d['torch']}, "
        f"torch CUDA {d['torch_cuda'] or 'none'}, triton {d['triton'] or 'not installed'})",
        "extension: " + ("loaded" if d["extension_loaded"] else f"NOT loaded: {d['extension_error']}"),
    ]
    if b:
        cuda = (f"yes (nvcc {b.get('nvcc')}, archs {b.get('archs', '?')}, CUTLASS pointwise GEMM "
                f"{'built' if b.get('cutlass') == '1' else 'not built'})" if b.get("cuda") == "1" else "no")
        lines.append(f"  built against torch {b.get('torch')}; CUDA kernels compiled: {cuda}")
    lines.append(f"gpu: {d['gpu'] or 'none'}")
    lines.append(f"backends usable on cpu tensors:  {', '.join(d['backends']['cpu'])}")
    lines.append(f"backends usable on cuda tensors: {', '.join(d['backends']['cuda']) or '(no GPU)'}")
    lines.append(f"selected backend: {d['backend_selected']}")
    print("\n".join(lines), file=out)
    return d
