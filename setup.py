"""Build convmixer_kernels._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is found.

    pip install -e . --no-build-isolation

Environment switches:
    CONVMIXER_KERNELS_SKIP_CUDA_BUILD=1   build the C++/CPU part only
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"    target architectures (default: 8.0 and 9.0, PTX of 9.0)
    MAX_JOBS=N                            parallel compile jobs (ninja)
    NVCC_THREADS=N                        nvcc --threads per job (default 2)
    CUDA_HOME=/path                       the CUDA toolkit (else /usr/local/cuda, else nvcc's own)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(path: str | None) -> bool:
    """A real CUDA toolkit: nvcc, the runtime headers and libcudart (not a folder holding a wrapper)."""
    if not path:
        return False
    has_lib = any(glob.glob(os.path.join(path, d, "libcudart.so*")) for d in ("lib64", "lib", "targets/*/lib"))
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and has_lib)


def find_cuda_home(env=os.environ, prefix: str = "/usr/local/cuda", which=shutil.which) -> str | None:
    """The real CUDA toolkit: CUDA_HOME/CUDA_PATH if set, else the standard prefix, else nvcc's.

    torch guesses the folder above the `nvcc` on PATH, which is wrong when that nvcc is a
    wrapper script (as on our machines): linking then fails with `cannot find -lcudart`.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(env.get(var)):
            return env[var]
    if _is_toolkit(prefix):
        return prefix
    nvcc = which("nvcc")
    if nvcc is None:
        return None
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(real):
        return real
    try:  # a wrapper script: ask nvcc where its toolkit is (its dry run prints TOP=...)
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                top = os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
                if _is_toolkit(top):
                    return top
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def nvidia_wheel_includes() -> list[str]:
    """Include folders of torch's `nvidia` wheels (cuBLAS/cuSPARSE headers that ATen's CUDA headers need)."""
    try:
        import nvidia  # namespace package installed with torch's CUDA build
    except ImportError:
        return []
    found = []
    for root in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include")) + glob.glob(os.path.join(root, "include"))):
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def cutlass_includes() -> list[str]:
    """CUTLASS's header folders: CONVMIXER_KERNELS_CUTLASS_INCLUDE (a folder holding cutlass/ and cute/), or the
    `nvidia-cutlass` package from PyPI (its cutlass_library/source/include and tools/util/include)."""
    inc = os.environ.get("CONVMIXER_KERNELS_CUTLASS_INCLUDE")
    if not inc:
        try:
            import cutlass_library
        except ImportError:
            return []
        inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    util = os.path.join(os.path.dirname(inc), "tools", "util", "include")
    if not os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")):
        return []
    return [inc] + ([util] if os.path.isdir(util) else [])


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    skip_cuda = os.environ.get("CONVMIXER_KERNELS_SKIP_CUDA_BUILD", "0") == "1"
    cuda_home = None if skip_cuda else find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if cuda_home is not None and not with_cuda:
        print("convmixer_kernels: torch is a CPU build, building the C++/CPU part only", file=sys.stderr)
    torch_version = torch.__version__.split("+")[0]
    cxx_flags = ["-O3", f"-DCONVMIXER_KERNELS_TORCH_VERSION={torch_version}"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not with_cuda:
        ext = CppExtension(name="convmixer_kernels._C", sources=srcs, include_dirs=[os.path.join(HERE, "csrc")],
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        return ext, BuildExtension
    srcs += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        "-DCONVMIXER_KERNELS_WITH_CUDA",
        # Device asserts off (as in the host flags): CUTLASS's asserts left __assertfail calls in the GEMM
        # kernel, and ptxas serializes wgmma across a call ("wgmma pipeline crossing function boundary",
        # the CUTLASS GEMM ran 2.4x slower than cuBLAS's on an H200, 2026-11-27).
        "-DNDEBUG",
    ]
    wheel_inc = nvidia_wheel_includes()
    # The CUTLASS pointwise kernels (csrc/cuda/pw_cutlass.cu) need its headers and an sm_90a target
    # (TORCH_CUDA_ARCH_LIST with 9.0a, as gpu-check builds); otherwise that file builds stubs.
    cutlass_inc = cutlass_includes()
    if cutlass_inc and "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";"):
        nvcc_flags += ["-DCONVMIXER_KERNELS_WITH_CUTLASS"] + [f"-isystem={d}" for d in cutlass_inc]
    ext = CUDAExtension(
        name="convmixer_kernels._C",
        sources=srcs,
        include_dirs=[os.path.join(HERE, "csrc")],
        # After the toolkit's own headers, so they only fill in what the toolkit lacks.
        extra_compile_args={
            "cxx": cxx_flags + ["-DCONVMIXER_KERNELS_WITH_CUDA"] + [f"-idirafter{d}" for d in wheel_inc],
            "nvcc": nvcc_flags + [f"-isystem={d}" for d in wheel_inc],
        },
        extra_link_args=link_flags,
    )
    return ext, BuildExtension


def main():
    ext, build_ext = extension()
    setup(
        name="convmixer-kernels",
        version="0.1.0",
        description="Fused CUDA, Triton and C++ kernels for ConvMixer and depthwise-convolution networks",
        packages=find_packages(include=["convmixer_kernels", "convmixer_kernels.*"]),
        python_requires=">=3.10",
        # torch.library.custom_op / register_fake / register_autograd / opcheck arrived in 2.4.
        install_requires=["torch>=2.4", "numpy"],
        extras_require={"triton": ["triton>=3.0"], "dev": ["pytest", "ninja", "timm", "scikit-learn", "tqdm"]},
        ext_modules=[ext],
        cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
        entry_points={"console_scripts": ["convmixer-kernels=convmixer_kernels.__main__:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":  # pip and `python setup.py` run this file as __main__; tests import its helpers
    main()
