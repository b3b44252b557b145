"""Diagnostic of the one accuracy test that fails on the GPU (H200, 2026-11-26 and 2026-11-27, the same
number both times): tests/test_pw_block.py::test_stem[channels_last-torch.float32-14-hw2-triton], the BN
weight gradient of the Triton stem in fp32, 6.78e-6 against a bound of 6.4e-6 (PyTorch's own error
1.79e-6).  Prints, for that case, where the error comes from: the stem's pre (the GEMM) of the Triton and
CUDA backends and of PyTorch's convolution against the fp64 oracle, the batch statistics, and the BN
weight gradient recomputed in fp64 from each side's own pre (so a gap between that and the op's gradient
is the backward's).  Run on a GPU: python -m benchmarks.diag_stem_fp32
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import convmixer_kernels as ck  # noqa: E402
from block_harness import _layout, run  # noqa: E402
from convmixer_kernels.functional import act_code  # noqa: E402
from convmixer_kernels.ops import backend_ops  # noqa: E402
from test_pw_block import _x, stem  # noqa: E402


def _err(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: a smoke test of this script)
    print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32,
          "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    blk = stem(24, 14)
    x = _x(2, 3, 30, 29)
    with torch.no_grad():
        y0 = copy.deepcopy(blk).reference().eval()(x)
    dy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(7))
    want = run(copy.deepcopy(blk).double().reference(), [x.double()], dy.double(), True)
    ref64 = copy.deepcopy(blk).double().reference()
    conv64 = ref64[0]
    pre64 = conv64(x.double())
    u64 = ref64[1](pre64)
    mean64, var64 = u64.mean((0, 2, 3)), u64.var((0, 2, 3), unbiased=False)
    print(f"u: per-channel std min {float(var64.sqrt().min()):.3g}, |u| max {float(u64.abs().max()):.3g}")

    def dgamma_from(pre):  # the BN weight gradient in fp64 from a given pre (fp64 math after it)
        u = ref64[1](pre.double().cpu())
        m, v = u.mean((0, 2, 3)), u.var((0, 2, 3), unbiased=False)
        xhat = (u - m[None, :, None, None]) / (v[None, :, None, None] + 1e-5).sqrt()
        return (dy.double() * xhat).sum((0, 2, 3))

    rows = []
    for fmt in ("nchw", "channels_last"):
        ref = copy.deepcopy(blk).to(device=dev).reference()
        xd = _layout(x, fmt, dev, torch.float32)
        with torch.no_grad():
            pre = ref[0](xd)
        out = run(ref, [xd], _layout(dy, fmt, dev, torch.float32), True)
        rows.append((f"torch {fmt}", pre, out))
    for be in (("triton", "cuda") if dev == "cuda" else ("cpu",)):
        for fmt in ("nchw", "channels_last"):
            fused = copy.deepcopy(blk).to(device=dev)
            xd = _layout(x, fmt, dev, torch.float32)
            with torch.no_grad():
                pre = backend_ops(be).stem_gemm_stats(xd, fused.conv.weight, fused.conv.bias,
                                                      act_code(fused.activation), fused.order == "act_norm")[0]
            with ck.backend(be):
                out = run(fused, [xd], _layout(dy, fmt, dev, torch.float32), True)
            rows.append((f"{be} {fmt}", pre, out))
    keys = [k for k in want if k.startswith("d:")] + ["y"]
    for name, pre, out in rows:
        line = f"{name:22s}"
        if pre is not None:
            rel = float(((pre.double().cpu() - pre64).abs() / pre64.abs().clamp_min(1e-3)).max())
            line += f" pre err {_err(pre, pre64):.3g} (rel {rel:.3g})"
            line += f"  dgamma(own pre, fp64 after) err {_err(dgamma_from(pre), want['d:2.weight']):.3g}"
        line += "  " + "  ".join(f"{k} {_err(out[k], want[k]):.3g}" for k in keys if out.get(k) is not None)
        print(line, flush=True)


if __name__ == "__main__":
    main()
