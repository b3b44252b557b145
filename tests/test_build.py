"""The package builds, imports and reports itself; backend selection behaves; setup.py finds the toolkit."""

from __future__ import annotations

import os
import runpy
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import _ext, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_helpers")


def test_extension_loaded():
    assert _ext.loaded(), _ext.load_error
    info = _ext.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]


@pytest.mark.skipif(os.environ.get("CONVMIXER_KERNELS_SKIP_CUDA_BUILD") == "1" or torch.version.cuda is None
                    or SETUP["find_cuda_home"]() is None, reason="no CUDA toolkit, or CUDA build skipped")
def test_cuda_sources_were_compiled_by_nvcc():
    info = _ext.build_info()
    assert info["cuda"] == "1", info
    assert info["nvcc"].split(".")[0].isdigit(), info  # set by a .cu file, from nvcc's own macros
    assert "900" in info.get("archs", ""), info


def test_cuda_kernels_have_no_device_asserts():
    """nvcc runs with -DNDEBUG: a device assert (CUTLASS has many) is a call to __assertfail, and ptxas
    serializes a Hopper GEMM's wgmma instructions across any call; the CUTLASS pointwise GEMM built without
    it ran 2.4x slower than cuBLAS's on an H200.  The kernels' symbol tables sit uncompressed in the
    extension's fatbin, so a reference to __assertfail shows in its bytes."""
    info = _ext.build_info()
    if info.get("cuda") != "1":
        pytest.skip("CUDA kernels not built")
    import convmixer_kernels._C as c_mod

    path = c_mod.__file__
    with open(path, "rb") as f:
        data = f.read()
    assert b"__assertfail" not in data, f"{path}: a CUDA kernel calls __assertfail (built without -DNDEBUG?)"


def test_find_cuda_home_through_a_wrapper_script(tmp_path):
    real = shutil.which("nvcc")
    if real is None:
        pytest.skip("no nvcc on PATH")
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{os.path.realpath(real)}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    find = SETUP["find_cuda_home"]
    home = find(env={}, prefix=str(tmp_path / "none"), which=lambda _: str(wrapper))
    assert home is not None and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")), home
    assert find(env={"CUDA_HOME": home}, prefix="/nonexistent", which=lambda _: None) == home
    assert find(env={"CUDA_HOME": str(tmp_path)}, prefix="/nonexistent", which=lambda _: None) is None


def test_info_reports(capsys):
    d = ck.info()
    out = capsys.readouterr().out
    assert "convmixer_kernels" in out and "backends usable" in out
    assert d["torch"] == torch.__version__
    assert "torch" in d["backends"]["cpu"] and "cpu" in d["backends"]["cpu"]


def test_cli_info():
    r = subprocess.run([sys.executable, "-m", "convmixer_kernels", "info"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CUDA kernels compiled" in r.stdout


def test_backend_selection():
    assert ck.get_backend() == "auto"
    with ck.backend("torch"):
        assert ck.get_backend() == "torch"
        with ck.backend("cpu"):
            assert ck.get_backend() == "cpu"
        assert ck.get_backend() == "torch"
    assert ck.get_backend() == "auto"
    ck.set_backend("torch")
    try:
        assert ck.get_backend() == "torch"
    finally:
        ck.set_backend("auto")
    assert backends.resolve("dw_block", torch.device("cpu")) == "cpu"


def test_backend_env_variable():
    code = "import convmixer_kernels as ck; print(ck.get_backend())"
    env = dict(os.environ, CONVMIXER_KERNELS_BACKEND="torch")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.stdout.strip() == "torch", r.stderr


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend: expected one of"):
        ck.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend: expected one of"):
        with ck.backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_unavailable_backend_raises_with_reason():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for dw_block: .*CUDA tensors only"):
        backends.resolve("dw_block", torch.device("cpu"), "cuda")
    if not backends.triton_interpreting():
        with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
            backends.resolve("dw_block", torch.device("cpu"), "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.gpu
def test_cpu_tensor_to_cuda_kernel_is_an_error():
    x = torch.randn(1, 4, 5, 5, device="cuda")
    w = torch.randn(4, 1, 3, 3)  # on the CPU
    v = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="weight: expected a tensor on cuda"):
        torch.ops.convmixer_kernels.dw_fwd(x, w, None, v, v, 2, True, True)


def test_cuda_tensor_check_in_cpu_kernel():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="scale: expected"):
        torch.ops.convmixer_kernels.dw_fwd(x, torch.randn(4, 1, 3, 3), None, torch.ones(5), torch.ones(4), 2,
                                           True, True)


def test_backend_resolution_traces_under_compile():
    """Backend resolution runs inside compiled models: Dynamo must trace it without a graph break (on
    an H200, reading the build info through its string-returning op and importlib broke fullgraph)."""
    def f(x):
        n = 0
        for name in ("cuda", "triton", "cpu", "torch"):
            n += backends.why_unavailable(name, x.device) is None
        return x + n

    x = torch.zeros(3)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_auto_order_can_depend_on_the_backward(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setitem(backends.AUTO_ORDER, ("pw_block", "cpu"), ("cpu", "torch"))
    monkeypatch.setitem(backends.AUTO_ORDER_GRAD, ("pw_block", "cpu"), ("torch",))
    assert backends.resolve("pw_block", dev) == ("cpu" if _ext.loaded() else "torch")
    assert backends.resolve("pw_block", dev, grad=True) == "torch"
    if _ext.loaded():  # an explicit backend is never overridden
        assert backends.resolve("pw_block", dev, "cpu", grad=True) == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available() or not _ext.built_with_cuda(), reason="needs CUDA kernels and a GPU")
@pytest.mark.gpu
def test_auto_order_on_cuda():
    """What gpu-check measured (benchmarks/results/NOTES.md): the CUDA kernels for every block, with and
    without autograd (until 2026-11-27 the pointwise/stem blocks took the torch composite under autograd; a
    whole model's training step was 2.1x slower that way)."""
    dev = torch.device("cuda")
    for op in ("dw_block", "pw_block", "stem_block"):
        assert backends.resolve(op, dev) == "cuda"
        assert backends.resolve(op, dev, grad=True) == "cuda"
