import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Without a GPU, Triton kernels can only run on CPU tensors through its interpreter.  Triton fixes
    # interpreted-or-compiled when a kernel is defined and reads the setting when it is first used, so
    # it is set here, before anything imports triton; it changes nothing else (no other test uses
    # Triton without a GPU: torch.compile's CPU backend emits C++).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; `make gpu-check` runs them)")
    config.addinivalue_line("markers", "slow: long-running test")


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write fails."""
    monkeypatch.setenv("CONVMIXER_KERNELS_POISON_OUTPUTS", "1")


@pytest.fixture
def triton_cpu(monkeypatch):
    """Triton kernels on CPU tensors run through the interpreter (set above, without a GPU)."""
    if not HAS_CUDA:
        pytest.importorskip("triton")


def backend_params(include_triton=True):
    """(backend, device) pairs to test on this machine: every backend on every device it runs on."""
    from convmixer_kernels import _ext

    out = [pytest.param("torch", "cpu", id="torch-cpu")]
    out.append(pytest.param("cpu", "cpu", id="cpu-cpu",
                            marks=pytest.mark.skipif(not _ext.loaded(), reason="extension not built")))
    if include_triton:
        out.append(pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"))
    out.append(pytest.param("cuda", "cuda", id="cuda-cuda",
                            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]))
    return out




def pytest_runtest_logreport(report):
    """With CONVMIXER_KERNELS_FAIL_LOG set, each failure is appended to that file as it happens (once, by
    the controlling process under pytest-xdist), so a run stopped by a time limit still names them; each
    test that passed gets a one-line `passed <nodeid>` there too, so such a run also says which tests did
    run and pass (gpu-check: the new kernels' tests count only if they are listed)."""
    path = os.environ.get("CONVMIXER_KERNELS_FAIL_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")
    elif report.when == "call" and report.passed:
        with open(path, "a") as f:
            f.write(f"passed {report.nodeid}\n")
