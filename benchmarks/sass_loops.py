"""Instructions per loop of the CUDA kernels, read from their SASS: a static check that needs no GPU.

    python -m benchmarks.sass_loops csrc/cuda/pw_kernels.cu [--arch sm_90a] [--kernel channel_cl_kernel]

Compiles one translation unit with the extension's nvcc flags (setup.py) into a cubin for one target,
disassembles it with cuobjdump and prints, per kernel, ptxas's registers and spills and every loop (a
backward branch) with its instruction count and the instruction classes that decide a pass's speed:
global/shared/local memory, MUFU (transcendentals), FP32 arithmetic, conversions, integer address math,
branches and calls.  Divide a loop's count by the elements one trip handles for instructions per element:
on 2026-11-27 this showed the per-channel passes bound by instruction issue, not memory
(benchmarks/results/NOTES.md).  cuobjdump is not in this machine's toolkit: `pip download --no-deps
nvidia-cuda-cuobjdump`, unzip the wheel, and set CUOBJDUMP to its bin/cuobjdump (or put it on PATH).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "MUFU", "FFMA", "FMUL", "FADD", "F2F", "F2FP", "PRMT",
           "IMAD", "IADD3", "ISETP", "FSETP", "BRA", "CALL")


def nvcc_command(src: str, out: str, arch: str) -> list[str]:
    import torch.utils.cpp_extension as ce  # the include paths of the torch the extension builds against

    sys.path.insert(0, ROOT)
    import setup  # noqa: PLC0415  (the wheels' CUDA headers and CUTLASS's, as the build finds them)

    incs = [os.path.join(ROOT, "csrc")] + ce.include_paths(device_type="cuda")
    flags = ["-O3", "--expt-relaxed-constexpr", "-DCONVMIXER_KERNELS_WITH_CUDA", "-DNDEBUG", "-std=c++17",
             "-Xptxas", "-v", "-cubin", f"-gencode=arch={arch.replace('sm_', 'compute_')},code={arch}"]
    for m in ("HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS", "HALF2_OPERATORS",
              "BFLOAT162_OPERATORS"):
        flags.append(f"-U__CUDA_NO_{m}__")
    cutlass = setup.cutlass_includes()
    if cutlass and arch == "sm_90a":
        flags += ["-DCONVMIXER_KERNELS_WITH_CUTLASS"] + [f"-isystem={d}" for d in cutlass]
    flags += [f"-isystem={d}" for d in setup.nvidia_wheel_includes()]
    nvcc = os.path.join(setup.find_cuda_home() or "/usr/local/cuda", "bin", "nvcc")
    return [nvcc] + flags + [f"-I{d}" for d in incs] + [src, "-o", out]


def ptxas_info(log: str) -> dict[str, str]:
    """kernel (mangled) -> 'R regs, S/L bytes spilled (stores/loads)'."""
    info, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            info[cur] = f"spills {m.group(1)}/{m.group(2)} B"
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            info[cur] = f"{m.group(1)} regs, " + info.get(cur, "")
    return info


def loops(sass: str, pattern: str):
    """(kernel, [(instructions, Counter of classes)]) for each kernel whose name contains pattern."""
    for f in re.split(r"\n\s*Function : ", sass)[1:]:
        name = f.split("\n", 1)[0].strip()
        if pattern not in name:
            continue
        ins = [(int(m.group(1), 16), m.group(2).strip())
               for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", f)]
        at = {a: i for i, (a, _) in enumerate(ins)}
        found = []
        for i, (a, s) in enumerate(ins):
            m = re.search(r"BRA .*?(0x[0-9a-f]+)", s)
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
                body = [x for _, x in ins[at[int(m.group(1), 16)]:i + 1]]
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
                found.append((len(body), ops))
        yield name, len(ins), found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a .cu file of csrc/cuda")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    ap.add_argument("--min", type=int, default=40, help="hide loops shorter than this")
    args = ap.parse_args(argv)
    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not cuobjdump:
        print("cuobjdump not found: set CUOBJDUMP (see this module's docstring)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        r = subprocess.run(nvcc_command(args.source, cubin, args.arch), capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        info = ptxas_info(r.stderr)
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    for name, total, found in loops(sass, args.kernel):
        print(f"{name}\n  {total} instructions, {info.get(name, '?')}")
        for n, ops in found:
            if n >= args.min:
                print(f"  loop {n:5d}: " + " ".join(f"{k}={ops[k]}" for k in CLASSES if ops[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
