"""Benchmarks: every provider side by side in the same run, random data, medians with p20/p80, the
machine's ceilings measured in the same run.  Writes <out>/<device-slug>-<yyyy-mm-dd>.csv (one row per
measurement) and .md (tables, and issue targets with their measured values); benchmarks/plot.py draws
the charts from the CSV.

    python -m benchmarks.run                                   # every suite on the GPU if there is one, else CPU
    python -m benchmarks.run --suite dw,pw --device cpu        # some suites, on the CPU
    python -m benchmarks.run --dtype bf16,fp16,fp32            # several dtypes (default: bf16 GPU, fp32 CPU)
    python -m benchmarks.run --quick                           # GPU: the compact gpu-check set; CPU: tiny shapes
                                                               #   (CI's smoke test of the harness)
Providers: eager, compile, compile_max (torch.compile mode="max-autotune"), eager_graph / cuda_graph (the
step captured in a CUDA graph; small shapes), cuda, triton, cpu, torch (the fused modules on that
backend), cuda_ipb1, cuda_cutlass and cuda_cutlass_pp (see benchmarks/harness.py); --providers keeps some of them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import convmixer_kernels as ck  # noqa: E402
from benchmarks.harness import DTYPES, PROVIDERS, Ceilings, mm_ceiling  # noqa: E402
from benchmarks.report import derive, slug, write_csv, write_markdown  # noqa: E402
from benchmarks.suites import SUITES, Bench, dw_modules, gemm_modules, run_step  # noqa: E402


def profile_steps(device, quick):
    """Where a fused training step spends its time: torch.profiler over a few steps of each fused block
    (dw k=7 both layouts, pw, stem) with the fused backend of the device (cuda, or cpu), printed as a
    table of ops/kernels by device (or CPU) time.  Goes to stdout (bench.log), not to a result file."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    N, C = (64, 768) if device == "cuda" else (8, 256)
    cases = [("dw", torch.contiguous_format), ("dw", torch.channels_last), ("pw", torch.channels_last),
             ("stem", torch.channels_last)]
    be = "cuda" if device == "cuda" else "cpu"
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for kind, fmt in cases:
        layout = "channels_last" if fmt == torch.channels_last else "nchw"
        blk = (dw_modules(C, 7, dtype, device)[0].to(memory_format=fmt) if kind == "dw" else
               gemm_modules(kind, C, 7, dtype, device, layout)[0]).train()  # the suites' modules
        H = 224 if kind == "stem" else 32
        x = torch.randn(N, 3 if kind == "stem" else C, H, H, device=device, dtype=dtype)
        x = x.contiguous(memory_format=fmt).requires_grad_(kind != "stem")
        with ck.backend(be):
            dy = torch.randn_like(blk(x))
            for _ in range(3):
                run_step(blk, x, dy, "train")
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                for _ in range(3 if quick else 10):
                    run_step(blk, x, dy, "train")
                if device == "cuda":
                    torch.cuda.synchronize()
        print(f"\n== profile: {kind} C={C} {layout} training step, backend {be}, {dtype}", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60), flush=True)
    profile_model(device, quick, acts, sort)


def profile_model(device, quick, acts, sort):
    """A whole fused model's training step as the model suite runs it (channels_last, fp32 weights,
    autocast bf16 on the GPU): wall time per step against the device time the profiler saw (a wall time
    well above it means the host is the bound), and the ops/kernels by device time."""
    import time

    from torch.profiler import profile

    from benchmarks.suites import _make_model, _model_step

    name, B, res = ("timm:convmixer_768_32", 32, 224) if device == "cuda" else ("convmixer-256/8-k5-p2", 8, 32)
    try:
        m = ck.fuse(_make_model(name)).to(device=device, memory_format=torch.channels_last).train()
    except Exception as e:  # e.g. timm missing
        print(f"model profile skipped: {type(e).__name__}: {e}", flush=True)
        return
    amp = torch.bfloat16 if device == "cuda" else None
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(B, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, getattr(m, "num_classes", None) or 10, (B,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        _model_step(m, opt, x, target, "train", amp)
    sync()
    steps = 2 if quick else 5
    t0 = time.perf_counter()
    for _ in range(steps):
        _model_step(m, opt, x, target, "train", amp)
    sync()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=acts) as prof:
        for _ in range(steps):
            _model_step(m, opt, x, target, "train", amp)
        sync()
    ev = prof.key_averages()
    attr = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
    dev_ms = sum(getattr(e, attr, 0) for e in ev) / 1e3 / steps if device == "cuda" else float("nan")
    print(f"\n== profile: {name} B={B} {res}x{res} fused training step (channels_last, autocast {amp}), "
          f"wall {wall:.2f} ms/step, device time {dev_ms:.2f} ms/step", flush=True)
    print(ev.table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)


def machine(device):
    """(device name, file-name slug, metadata) of this run."""
    threads = torch.get_num_threads()
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        tag = slug(name)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        name = f"CPU {name} ({threads} threads)"
        tag = f"cpu-{slug(platform.machine())}-{threads}t"
    commit = os.environ.get("BENCH_COMMIT", "")  # the device machine's copy of the tree may have no (or a stale) .git
    if not commit:
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=here).stdout.strip() or "unknown"
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=here).stdout.strip()
            commit += "+changes" if dirty else ""
        except OSError:
            commit = "unknown"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    meta = dict(device=name, device_kind=device, torch=torch.__version__, triton=tv, cuda=torch.version.cuda,
                commit=commit, threads=threads, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                build=ck._ext.build_info())
    return name, tag, meta


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="all", help="comma list of " + ",".join(SUITES) + " (default all)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="comma list of bf16,fp16,fp32 (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--providers", default=None, help="comma list: keep only these providers")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", default=None, help="comma list: the depthwise suite's kernel sizes to keep")
    ap.add_argument("--profile", action="store_true", help="then print a profile of each fused training step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here")
    suites = list(SUITES) if args.suite == "all" else args.suite.split(",")
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"--suite: unknown {bad}; expected a comma list of {','.join(SUITES)} or all")
    names = (args.dtype or ("bf16" if args.device == "cuda" else "fp32")).split(",")
    if any(n not in DTYPES for n in names):
        ap.error(f"--dtype: expected a comma list of {','.join(DTYPES)}, got {args.dtype!r}")
    dtypes = [DTYPES[n] for n in names]
    only = args.providers.split(",") if args.providers else None
    if only and any(p not in PROVIDERS for p in only):
        ap.error(f"--providers: unknown {[p for p in only if p not in PROVIDERS]}; expected a comma list of "
                 f"{','.join(PROVIDERS)}")
    device = args.device
    # A run stopped by a time limit (SIGTERM from `timeout`) still writes what it measured: the handler
    # goes in before anything slow, and the CSV/MD are rewritten after every suite.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit("stopped by SIGTERM: partial results written"))
    name, tag, meta = machine(device)
    print(f"{name}: torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}", flush=True)
    ceil = Ceilings(device)
    bench = Bench(device, dtypes, args.quick, only)
    if args.k:
        try:
            bench.ks = {int(v) for v in args.k.split(",")}
        except ValueError:
            ap.error(f"--k: expected a comma list of kernel sizes, got {args.k!r}")
    stem = os.path.join(args.out, f"{tag}-{meta['date'][:10]}" + ("-quick" if args.quick else ""))

    def save():
        meta["ceilings"] = dict(ceil.values)
        rows = derive(bench.rows, ceil.values)
        os.makedirs(args.out, exist_ok=True)
        write_csv(stem + ".csv", meta, rows)
        write_markdown(stem + ".md", meta, rows)

    # The opt-in CUTLASS pointwise GEMM is timed after everything else: a fault in it would be sticky on the
    # device and fail every row after it.  (The tensor-core depthwise kernels were timed here too until
    # their first GPU run, 2026-11-27, passed and made them the default where they were faster.)
    # cuda_cutlass runs the stem and the whole model too (the same GEMMs: the statistics one in training,
    # the fused eval one); the ping-pong schedule changes the eval GEMM only.
    late_suite = {"cuda_cutlass": ("pw", "stem", "model"), "cuda_cutlass_pp": ("pw",)}
    late = [p for p, ss in late_suite.items() if device == "cuda" and set(ss) & set(suites) and bench.wants(p)]
    if late:
        bench.only = [p for p in (only or PROVIDERS) if p not in late]
    try:
        # The ceilings first, only those the suites use; one that fails is reported, not fatal.
        wanted = []
        if any(s in ("dw", "pw", "stem") for s in suites):
            wanted.append("bandwidth")
            if "dw" in suites:
                wanted.append("fp32_fma")
            if "pw" in suites or "stem" in suites:
                wanted += [mm_ceiling(n) for n in names]
        for c in wanted:
            try:
                ceil.get(c)
            except Exception as e:  # noqa: BLE001
                print(f"ceiling {c} failed: {type(e).__name__}: {e}", flush=True)
        print("ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in ceil.values.items()), flush=True)
        for s in suites:
            print(f"== suite {s}", flush=True)
            SUITES[s](bench)
            save()
        for prov in late:
            for s in (s for s in late_suite[prov] if s in suites):
                print(f"== suite {s} ({prov}, last)", flush=True)
                bench.only, bench.references = [prov], False  # (the bare GEMMs were timed in the first pass)
                SUITES[s](bench)
                save()
    finally:
        save()
        print(open(stem + ".md").read())
        print(f"wrote {stem}.csv and .md", flush=True)
    # The profile last: the results are on disk by now, and the profiler's CUPTI hooks, left attached
    # by some torch versions, would slow every timing after it.
    if args.profile:
        try:
            profile_steps(device, args.quick)
        except Exception as e:  # a failing profile must not cost the benchmarks
            print(f"profile failed: {type(e).__name__}: {e}", flush=True)

if __name__ == "__main__":
    main()
