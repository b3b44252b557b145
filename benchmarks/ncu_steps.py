"""Nsight Compute over one step of each fused block: every kernel the step launches, with what bounds it.

    python -m benchmarks.ncu_steps --out DIR [--cases dw7_cl_eval,pw_cl_train] [--timeout 60] [--budget 200]
    python -m benchmarks.ncu_steps --summarize DIR/ncu/*.csv      # the table again, from saved CSVs

For each case a child process (`--child CASE`) builds the benchmark suites' module (N=64, C=768, 32x32,
bf16, GELU, the `cuda` backend), runs three warm-up steps, then one step between cudaProfilerStart and
cudaProfilerStop; ncu (`--profile-from-start off`) profiles exactly that step's kernels.  Its CSV goes to
DIR/ncu/<case>.csv, and one line a kernel to DIR/ncu/summary.md: time, SM and memory throughput (% of
peak), DRAM throughput, achieved / theoretical occupancy, registers, waves, cycles between a warp's
issued instructions, the share of cycles a scheduler had no eligible warp, and the three largest stall
reasons.  Those say which of
issue, bandwidth, latency or occupancy bounds a kernel: what the step's timings alone could not tell
(benchmarks/results/NOTES.md, plan item 3).  Needs ncu and access to the GPU's performance counters;
where either is missing the summary says so.  Informational: it exits 0 unless its arguments are wrong.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# case -> (block, kernel size, layout, mode, environment for the child); in the order they run, the
# largest misses of issues 3 and 4 first (a budget that runs out drops the last ones).
CASES = {
    "pw_cl_train": ("pw", 1, "channels_last", "train", {}),
    "pw_cl_train_cutlass": ("pw", 1, "channels_last", "train", {"CONVMIXER_KERNELS_PW_CUTLASS": "require"}),
    "dw7_cl_train": ("dw", 7, "channels_last", "train", {}),
    "dw7_cl_train_regs": ("dw", 7, "channels_last", "train", {"CONVMIXER_KERNELS_DW_BWD_REGS": "require"}),
    "dw7_cl_eval": ("dw", 7, "channels_last", "eval", {}),
    "pw_cl_eval_cutlass_pp": ("pw", 1, "channels_last", "eval", {"CONVMIXER_KERNELS_PW_CUTLASS": "require",
                                                                 "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE": "pingpong"}),
    "pw_cl_eval": ("pw", 1, "channels_last", "eval", {}),
    "dw7_nchw_train": ("dw", 7, "nchw", "train", {}),
    "dw7_nchw_eval": ("dw", 7, "nchw", "eval", {}),
    "pw_cl_eval_cutlass": ("pw", 1, "channels_last", "eval", {"CONVMIXER_KERNELS_PW_CUTLASS": "require",
                                                              "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE": "cooperative"}),
}
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats")
# Where a warp's cycles between two issued instructions go, by stall reason (WarpStateStats' chart, which
# the details page leaves out): the three largest per kernel go into the table.  A case whose ncu rejects
# them runs again without.
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
STALL_METRICS = "regex:^" + STALL_PREFIX + ".*" + STALL_SUFFIX.replace(".", "\\.") + "$"

# (column, metric name in ncu's details page)
COLUMNS = [
    ("SM %", "Compute (SM) Throughput"), ("mem %", "Memory Throughput"), ("DRAM %", "DRAM Throughput"),
    ("occ %", "Achieved Occupancy"), ("theo %", "Theoretical Occupancy"), ("regs", "Registers Per Thread"),
    ("waves", "Waves Per SM"), ("cyc/issue", "Warp Cycles Per Issued Instruction"),
    ("no elig %", "No Eligible"),
]
_TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def child(case: str, device: str = "cuda", size: tuple[int, int, int] = (64, 768, 32)) -> None:
    """One profiled step of `case` (run under ncu by the parent; on the CPU, with small sizes, by the tests)."""
    import torch

    import convmixer_kernels as ck
    from benchmarks.suites import _fmt, dw_modules, gemm_modules, run_step

    kind, k, layout, mode, _ = CASES[case]
    (N, C, H), cuda = size, device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    blk = (dw_modules(C, k, dtype, device)[0].to(memory_format=_fmt(layout)) if kind == "dw"
           else gemm_modules(kind, C, 1, dtype, device, layout)[0])
    blk.train(mode != "eval")
    x = torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=_fmt(layout))
    x.requires_grad_(mode != "eval")
    with ck.backend(device):
        dy = torch.randn_like(blk(x.detach()))
        for _ in range(3):
            run_step(blk, x, dy, mode)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        run_step(blk, x, dy, mode)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


def find_ncu() -> str | None:
    if "NCU" in os.environ:  # as given: a path that is not there means no ncu
        return os.environ["NCU"] if os.access(os.environ["NCU"], os.X_OK) else None
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/usr/local/cuda*/nsight-compute*/ncu",
                    "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def rows_of(text: str) -> list[dict]:
    """The details-page rows of ncu's --csv output (lines before its header are the program's and ncu's
    own messages)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    return [r for r in rows if (r.get("ID") or "").isdigit()]  # (not ncu's messages after the table)


def short_name(name: str) -> str:
    """A kernel's function name without its arguments and, when long, without template arguments."""
    name = name[5:] if name.startswith("void ") else name
    if name.endswith(")"):  # cut at the "(" that opens the argument list (template arguments may hold parens)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    while len(name) > 70 and "<" in name:
        new = re.sub(r"<[^<>]*>", "", name)
        if new == name:
            break
        name = new
    return name[:90]


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def kernels_of(rows: list[dict]) -> list[dict]:
    """One dict a profiled kernel launch, in launch order: name, grid, block, us, and the COLUMNS metrics."""
    out: dict[str, dict] = {}
    for r in rows:
        kid = r.get("ID", "")
        k = out.setdefault(kid, {"name": short_name(r.get("Kernel Name", "?")), "grid": r.get("Grid Size", ""),
                                 "block": r.get("Block Size", "")})
        metric, unit, value = r.get("Metric Name", ""), r.get("Metric Unit", ""), r.get("Metric Value", "")
        if metric == "Duration" and _number(value) is not None:
            k["us"] = _number(value) * _TIME_UNITS.get(unit, 1.0)
        for col, want in COLUMNS:
            if metric == want and col not in k:
                k[col] = _number(value)
        if metric.startswith(STALL_PREFIX) and metric.endswith(STALL_SUFFIX) and _number(value) is not None:
            k.setdefault("stalls", {})[metric[len(STALL_PREFIX):-len(STALL_SUFFIX)]] = _number(value)
    return [out[i] for i in sorted(out, key=int)]


def top_stalls(k: dict, n: int = 3) -> str:
    """The n largest stall reasons of a kernel (cycles per issued instruction), 'selected' (issuing) left out."""
    st = sorted(((v, r) for r, v in k.get("stalls", {}).items() if r not in ("selected", "not_selected")),
                reverse=True)
    return ", ".join(f"{r} {v:.2g}" for v, r in st[:n]) or "-"


def table(case: str, kernels: list[dict]) -> str:
    head = "| kernel | grid | block | us | " + " | ".join(c for c, _ in COLUMNS) + " | top stalls |"
    lines = [f"### {case}: {len(kernels)} kernels, {sum(k.get('us', 0.0) for k in kernels):.1f} us in all", "",
             head, "|" + "---|" * (5 + len(COLUMNS))]
    for k in kernels:
        vals = [f"{k[c]:.4g}" if k.get(c) is not None else "-" for c, _ in COLUMNS]
        us = f"{k['us']:.1f}" if "us" in k else "-"
        lines.append(f"| {k['name']} | {k['grid']} | {k['block']} | {us} | " + " | ".join(vals)
                     + f" | {top_stalls(k)} |")
    return "\n".join(lines) + "\n"


def summarize(paths: list[str]) -> str:
    parts = []
    for p in paths:
        text = open(p, errors="replace").read()
        kernels = kernels_of(rows_of(text))
        case = os.path.splitext(os.path.basename(p))[0]
        if kernels:
            parts.append(table(case, kernels))
        else:  # no rows: show why (ncu's own error lines)
            why = [line for line in text.splitlines() if "==ERROR==" in line or "ERR_" in line][:3]
            parts.append(f"### {case}: no kernels profiled\n\n" + ("\n".join(why) or "(no ncu output)") + "\n")
    return "\n".join(parts)


def run_ncu(ncu: str, case: str, timeout: int, stalls: bool) -> str:
    """ncu's output (CSV, with the program's and ncu's own lines) for one case."""
    cmd = [ncu, "--profile-from-start", "off", "--target-processes", "all", "--csv", "--page", "details"]
    for s in SECTIONS:
        cmd += ["--section", s]
    if stalls:
        cmd += ["--metrics", STALL_METRICS]
    cmd += [sys.executable, "-m", "benchmarks.ncu_steps", "--child", case]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **CASES[case][4])
    try:  # its own process group: a timeout stops ncu and the profiled program with it
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                             start_new_session=True)
    except OSError as e:
        return f"==ERROR== could not run ncu: {e}\n"
    try:
        out, err = p.communicate(timeout=timeout)
        return out + ("\n" + err if err else "")
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return out + (err or "") + f"\n==ERROR== stopped after {timeout} s\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "out"))
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per case at most")
    ap.add_argument("--budget", type=int, default=0, help="seconds for all cases (0: no limit); a case that "
                    "would start with less than 15 s left is skipped")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--summarize", nargs="+", metavar="CSV", help="print the table of saved CSVs")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; expected a comma list of {','.join(CASES)}")
    out = os.path.join(args.out, "ncu")
    os.makedirs(out, exist_ok=True)
    ncu = find_ncu()
    if ncu is None:
        msg = "no ncu on this machine (set NCU to its path)"
        open(os.path.join(out, "summary.md"), "w").write(msg + "\n")
        print(msg)
        return 0
    paths = []
    t_end = time.monotonic() + args.budget if args.budget > 0 else None
    for case in cases:
        timeout = args.timeout
        if t_end is not None:
            timeout = min(timeout, int(t_end - time.monotonic()))
            if timeout < 15:
                print(f"{case}: skipped, {max(timeout, 0)} s of the budget left", flush=True)
                continue
        path = os.path.join(out, f"{case}.csv")
        t0 = time.monotonic()
        text = run_ncu(ncu, case, timeout, stalls=True)
        if not rows_of(text) and "metric" in text.lower() and timeout - (time.monotonic() - t0) >= 15:
            text += "\n(again without the stall metrics)\n" + run_ncu(ncu, case, int(timeout - (time.monotonic() - t0)),
                                                                   stalls=False)
        open(path, "w").write(text)
        paths.append(path)
        print(summarize([path]), flush=True)
        # after every case, so that a stage stopped from outside keeps what was profiled
        open(os.path.join(out, "summary.md"), "w").write(
            f"# ncu, one step per case ({ncu}; clocks locked to base by ncu: compare kernels, not with the "
            f"benchmarks' times)\n\n" + summarize(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
