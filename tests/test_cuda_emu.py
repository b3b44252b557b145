"""The CUDA kernels themselves, on the CPU: tests/cuda_emu compiles csrc/cuda's depthwise kernels, the
pointwise/stem per-channel passes and the BatchNorm kernels with the host compiler against a small CUDA
emulator (threads as fibers in a random order between barriers, shared memory that starts as NaN, cp.async
copies that land only at the wait) and checks every op against convmixer_kernels.torch_ops with the
fp64-oracle rule; and the pointwise/stem ops' CUDA host code (csrc/cuda/pw.cpp itself: checks, GEMMs,
the stem's im2col on a padded K) around the emulated kernels, as the GPU tests run them.  CI has no
GPU, so this is the only CI check of the CUDA sources' logic; `make gpu-check` runs them for real.

The quick case list, on an emulated device of 3 SMs, so that blocks walk several items (the cp.async
pipeline of the tiled kernels) as they do on a full GPU with large batches."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_headers() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.isfile(os.path.join(home, "include", "cuda_bf16.h"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the test suite runs the real kernels")
@pytest.mark.skipif(not _cuda_headers(), reason="the CUDA toolkit headers are needed to compile the kernels")
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no host C++ compiler")
def test_cuda_kernels_in_emulator(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, CMK_EMU_BUILD=str(tmp_path / "build"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cuda_emu", "run_emu.py"), "--quick",
                           "--sms", "3", "--jobs", str(min(2, os.cpu_count() or 1))],
                          capture_output=True, text=True, env=env, timeout=1500, check=False)
    out = proc.stdout + proc.stderr
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "emulated CUDA kernels failed:\n" + "\n".join(failed or [out[-4000:]])
    last = proc.stdout.strip().splitlines()[-1]  # "<n>/<n> passed"
    done, total = last.split()[0].split("/")
    assert done == total and int(total) > 0, out[-2000:]
