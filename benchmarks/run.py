"""Benchmarks: every provider in the same run, random data, medians with p20/p80, roofline ceilings
measured in the same run.  Writes <out>/bench_<device>.json and .md (device, versions, commit, date).

    python benchmarks/run.py --out benchmarks/results            # GPU suite if CUDA, else the CPU suite
    python benchmarks/run.py --quick                             # fewer shapes and providers (gpu-check)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import convmixer_kernels as ck  # noqa: E402


# ----------------------------------------------------------------------------------------- timing
def bench_gpu(fn, rotate: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(i) through triton.testing.do_bench (L2 flushed)."""
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        fn(state["i"] % rotate)
        state["i"] += 1

    q = do_bench(call, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(v) for v in q)


def _quantiles(times):
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


class CaseTimer:
    """Times the providers of one case.  GPU: each in turn through bench_gpu, as it is added.  CPU: all of
    them together in rounds (one call of each per round, about 1 s per provider in all), because this
    project's CPU is a VM whose speed drifts by 10-50% over seconds: timed one after another, the ratios
    between providers moved with the drift; timed in rounds, every provider sees the same machine.
    add(fn, rotate, prov, done, fail): fn(i) runs as provider `prov` (_PROVIDERS: its backend and
    environment); done((median, p20, p80)) gets the times in ms, fail(exception) a failure."""

    def __init__(self, device):
        self.device = device
        self.jobs = []

    def add(self, fn, rotate, prov, done, fail):
        if self.device == "cuda":
            try:
                with _as_provider(prov):
                    t = bench_gpu(fn, rotate)
            except Exception as e:  # a provider that fails is reported, not hidden
                fail(e)
                return
            done(t)
        else:
            def under(i, fn=fn):
                with _as_provider(prov):
                    fn(i)

            self.jobs.append((under, rotate, done, fail))

    def run(self):
        pending, self.jobs = self.jobs, []
        jobs = []
        for fn, rotate, done, fail in pending:
            try:
                for i in range(3):  # warm-up
                    fn(i % rotate)
            except Exception as e:
                fail(e)
                continue
            jobs.append((fn, rotate, done, []))
        t_end = time.perf_counter() + 1.0 * len(jobs)
        rounds = 0
        while jobs and (time.perf_counter() < t_end or rounds < 5):
            for fn, rotate, _, times in jobs:
                t0 = time.perf_counter()
                fn(rounds % rotate)
                times.append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        for _, _, done, times in jobs:
            done(_quantiles(times))


# ----------------------------------------------------------------------------------------- ceilings
def measure_bandwidth_gpu() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_gpu(lambda i: b.copy_(a))[0]
    return 2 * n / (ms * 1e-3)


def measure_fp32_rate_gpu() -> float:
    """fp32 FLOP/s on CUDA cores (non-tensor FMA), from a Triton kernel of dependent FMA chains."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fma_kernel(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        a = offs.to(tl.float32) * 1e-9
        b = a + 1.0
        c = a + 2.0
        d = a + 3.0
        for _ in range(ITERS):
            a = a * 0.999 + 0.001
            b = b * 0.999 + 0.001
            c = c * 0.999 + 0.001
            d = d * 0.999 + 0.001
        tl.store(out_ptr + offs, a + b + c + d)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block, iters = 1024, 4096
    grid = sms * 16
    out = torch.empty(grid * block, device="cuda")
    ms = bench_gpu(lambda i: _fma_kernel[(grid,)](out, ITERS=iters, BLOCK=block, num_warps=8))[0]
    return grid * block * iters * 4 * 2 / (ms * 1e-3)


# ----------------------------------------------------------------------------------------- dw block
def _dw_modules(C, k, act, dtype, device):
    torch.manual_seed(0)
    blk = ck.FusedDepthwiseBlock(C, k, activation=act).to(device=device, dtype=dtype)
    with torch.no_grad():
        blk.norm.weight.uniform_(0.5, 1.5)
        blk.norm.bias.uniform_(-0.5, 0.5)
        blk.norm.running_var.uniform_(0.5, 1.5)
    ref = copy.deepcopy(blk).reference()
    return blk, ref


def _run_step(m, x, dy, training):
    if training:
        for p in m.parameters():
            p.grad = None
        y = m(x)
        y.backward(dy)
    else:
        with torch.no_grad():
            m(x)


# Providers: name -> (backend of the fused modules, environment variable and value to run under).
# eager / compile run the unfused reference modules.  cuda_ipb1: the CUDA kernels with one item per
# forward depthwise block (no next tile to copy in while computing), so the same run shows what the
# cp.async pipeline gains.  cuda_cutlass: the pointwise eval forward as one CUTLASS GEMM with the
# epilogue fused (opt-in while unmeasured; =require raises where it does not apply).
_PROVIDERS = {
    "eager": ("auto", None), "compile": ("auto", None), "cpu": ("cpu", None), "torch": ("torch", None),
    "cuda": ("cuda", None), "triton": ("triton", None),
    "cuda_ipb1": ("cuda", ("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "1")),
    "cuda_cutlass": ("cuda", ("CONVMIXER_KERNELS_PW_CUTLASS", "require")),
}


@contextlib.contextmanager
def _as_provider(prov):
    """Run as provider `prov`: its backend, and its environment variable set inside the block."""
    backend, env = _PROVIDERS[prov]
    old = None if env is None else os.environ.get(env[0])
    if env is not None:
        os.environ[env[0]] = env[1]
    try:
        with ck.backend(backend):
            yield
    finally:
        if env is not None:
            if old is None:
                os.environ.pop(env[0], None)
            else:
                os.environ[env[0]] = old


def _module_of(prov, blk, ref):
    """The module provider `prov` times: the reference (eager), the compiled reference, or the fused one."""
    return ref if prov == "eager" else torch.compile(ref) if prov == "compile" else blk


def _recorder(res, label, row):
    """CaseTimer callbacks (done, fail) appending `row` with the times, or with the error, to res."""

    def done(t):
        res.append(dict(row, ms=t[0], p20=t[1], p80=t[2]))
        print(f"  {label} {t[0]:8.3f} ms", flush=True)

    def fail(e):  # a provider that fails is reported, not hidden
        res.append({k: row[k] for k in ("op", "C", "k", "layout", "mode", "provider")} |
                   {"error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"  {label}: FAILED {e}", flush=True)

    return done, fail


def _step_fn(m, inputs, dys, training):
    """fn(i): one step of m on inputs[i] (forward, plus backward of dys[i] when training)."""
    return lambda i: _run_step(m, inputs[i], dys[i], training)


def dw_suite(device, quick, res):
    if device == "cuda":
        dtype, N, H = torch.bfloat16, 64, 32
        shapes = [(768, 7), (768, 9), (1536, 7), (1536, 9)] if not quick else [(768, 7), (768, 9), (1536, 9)]
        providers = ["eager", "compile", "cuda", "cuda_ipb1", "triton"]
    else:
        dtype, N, H = torch.float32, 8, 32
        shapes = [(256, 5), (256, 9)]
        providers = ["eager", "cpu", "torch"]
    for C, k in shapes:
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            rotate = 2
            xs = [torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=fmt)
                  for _ in range(rotate)]
            dys = [torch.randn_like(x) for x in xs]
            xg = [x.clone().requires_grad_(True) for x in xs]
            for mode in ("eval", "train"):
                training = mode == "train"
                timer = CaseTimer(device)
                for prov in providers:
                    if prov == "compile" and (device != "cuda" or (quick and ((C, k) != (768, 9) or layout != "nchw"))):
                        continue
                    if prov == "triton" and quick:  # measured in full runs; always slower than cuda so far
                        continue
                    blk, ref = _dw_modules(C, k, "gelu", dtype, device)
                    if device != "cpu" and ck.backends.why_unavailable(_PROVIDERS[prov][0], torch.device(device)) \
                            and prov not in ("eager", "compile"):
                        continue
                    m = _module_of(prov, blk, ref)
                    m.train(training)
                    elems = N * C * H * H
                    row = dict(op="dw_block", N=N, C=C, H=H, W=H, k=k, dtype=str(dtype), layout=layout, mode=mode,
                               provider=prov, bytes=elems * xs[0].element_size() * (2 if mode == "eval" else 7),
                               flops=2 * k * k * elems * (1 if mode == "eval" else 4))
                    timer.add(_step_fn(m, xg if training else xs, dys, training), rotate, prov,
                              *_recorder(res, f"dw C={C} k={k} {layout:13s} {mode:5s} {prov:8s}", row))
                timer.run()


def _gemm_modules(kind, C, dtype, device):
    torch.manual_seed(0)
    if kind == "pw":
        blk = ck.FusedPointwiseBlock(C, C, activation="gelu").to(device=device, dtype=dtype)
    else:
        blk = ck.FusedPatchEmbed(C, 7, activation="gelu").to(device=device, dtype=dtype)
    return blk, copy.deepcopy(blk).reference()


def gemm_suite(device, quick, res):
    """Pointwise block (1x1 conv GEMM) and stem, against eager, compile and the bare GEMMs."""
    if device == "cuda":
        dtype, providers = torch.bfloat16, ["eager", "compile", "cuda", "cuda_cutlass", "triton"]
        cases = [("pw", 64, 768, 32), ("pw", 64, 1536, 32), ("stem", 64, 768, 224)]
        if quick:
            cases = [("pw", 64, 768, 32), ("stem", 64, 768, 224)]
    else:
        dtype, providers = torch.float32, ["eager", "cpu", "torch"]
        cases = [("pw", 8, 256, 32), ("stem", 8, 256, 64)]
    for kind, N, C, H in cases:
        fmt = torch.channels_last
        cin = C if kind == "pw" else 3
        xs = [torch.randn(N, cin, H, H, device=device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]
        ho = H if kind == "pw" else H // 7
        dys = [torch.randn(N, C, ho, ho, device=device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]
        xg = [x.clone().requires_grad_(kind == "pw") for x in xs]
        # the bare GEMMs of the same shape: forward, and the two of the backward
        M, K = N * ho * ho, cin * (1 if kind == "pw" else 49)
        a = torch.randn(M, K, device=device, dtype=dtype)
        b = torch.randn(K, C, device=device, dtype=dtype)
        g = torch.randn(M, C, device=device, dtype=dtype)
        kk = 1 if kind == "pw" else 7
        for mode in ("eval", "train"):
            training = mode == "train"
            timer = CaseTimer(device)
            gemm_row = dict(op=kind, C=C, k=kk, layout="channels_last", mode=mode, provider="bare_gemm")
            bare = (lambda i: (torch.mm(a, b), torch.mm(g, b.t()), torch.mm(a.t(), g))) if training else \
                (lambda i: torch.mm(a, b))
            timer.add(bare, 1, "eager", *_recorder(res, f"{kind} C={C} {mode:5s} bare GEMM", gemm_row))
            for prov in providers:
                if (prov == "compile" and quick and kind != "pw") or (prov == "triton" and quick):
                    continue
                if prov == "cuda_cutlass" and (kind != "pw" or training):  # it serves pw_fwd (eval) only
                    continue
                blk, ref = _gemm_modules(kind, C, dtype, device)
                m = _module_of(prov, blk.to(memory_format=fmt), ref.to(memory_format=fmt))
                m.train(training)
                row = dict(op=kind, N=N, C=C, H=H, W=H, k=kk, dtype=str(dtype), layout="channels_last", mode=mode,
                           provider=prov, bytes=0, flops=2 * M * K * C * (1 if mode == "eval" else 3))
                timer.add(_step_fn(m, xg if training else xs, dys, training), 2, prov,
                          *_recorder(res, f"{kind} C={C} {mode:5s} {prov:8s}", row))
            timer.run()


class _ResidualPair(torch.nn.Module):
    """A fused depthwise block then a fused pointwise block, with ConvMixer's residual fused into the
    depthwise epilogue (in_pw False) or into the pointwise GEMM's operand load (in_pw True)."""

    def __init__(self, C, k, in_pw):
        super().__init__()
        self.dw = ck.FusedDepthwiseBlock(C, k, residual=not in_pw)
        self.pw = ck.FusedPointwiseBlock(C, C)
        self.in_pw = in_pw

    def forward(self, x):
        return self.pw(x, residual=self.dw(x)) if self.in_pw else self.pw(self.dw(x))


def residual_suite(device, quick, res):
    """Where the ConvMixer residual `x + t` feeding the 1x1 conv is fused (issue 4): in the depthwise
    kernel's epilogue (dw_block(x) = x + t, then pw_block(y): what the fused ConvMixer does), or in the
    pointwise GEMM's operand load (dw_block without the residual gives t, then pw_block(x, residual=t)).
    One depthwise + pointwise pair, channels_last, with the fused backend of the device."""
    if device == "cuda":
        dtype, N, C, H, k, be = torch.bfloat16, 64, 768, 32, 9, "cuda"
    else:
        dtype, N, C, H, k, be = torch.float32, 8, 256, 32, 9, "cpu"
    fmt = torch.channels_last
    torch.manual_seed(0)
    xs = [torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]
    dys = [torch.randn_like(x) for x in xs]
    xg = [x.clone().requires_grad_(True) for x in xs]
    for mode in ("eval", "train"):
        training = mode == "train"
        timer = CaseTimer(device)
        for where in ("dw_epilogue", "pw_operand"):
            m = _ResidualPair(C, k, where == "pw_operand").to(device=device, dtype=dtype, memory_format=fmt)
            m.train(training)
            row = dict(op="residual", N=N, C=C, H=H, W=H, k=k, dtype=str(dtype), layout="channels_last", mode=mode,
                       provider=where)
            timer.add(_step_fn(m, xg if training else xs, dys, training), 2, be,
                      *_recorder(res, f"residual C={C} k={k} {mode:5s} {where:12s}", row))
        timer.run()


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
    backends = ["cuda"] if device == "cuda" else ["cpu"]
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for kind, fmt in cases:
        for be in backends:
            if kind == "dw":
                blk = ck.FusedDepthwiseBlock(C, 7, activation="gelu")
            elif kind == "pw":
                blk = ck.FusedPointwiseBlock(C, C, activation="gelu")
            else:
                blk = ck.FusedPatchEmbed(C, 7, activation="gelu")
            blk = blk.to(device=device, dtype=dtype, memory_format=fmt).train()
            H = 224 if kind == "stem" else 32
            x = torch.randn(N, 3 if kind == "stem" else C, H, H, device=device, dtype=dtype)
            x = x.contiguous(memory_format=fmt).requires_grad_(kind != "stem")
            with ck.backend(be):
                dy = torch.randn_like(blk(x))
                for _ in range(3):
                    _run_step(blk, x, dy, True)
                if device == "cuda":
                    torch.cuda.synchronize()
                with profile(activities=acts) as prof:
                    for _ in range(3 if quick else 10):
                        _run_step(blk, x, dy, True)
                    if device == "cuda":
                        torch.cuda.synchronize()
            layout = "channels_last" if fmt == torch.channels_last else "nchw"
            print(f"\n== profile: {kind} C={C} {layout} training step, backend {be}, {dtype}", flush=True)
            print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60), flush=True)


def summarize(res, ceilings):
    """Speedups vs eager (best layout) and compile, and % of roofline for the fused providers."""
    rows = []
    keyf = lambda r: (r["op"], r["C"], r["k"], r["mode"])  # noqa: E731
    groups = {}
    for r in res:
        if "ms" in r:
            groups.setdefault(keyf(r), []).append(r)
    for key, rs in groups.items():
        eager = min((r["ms"] for r in rs if r["provider"] == "eager"), default=None)
        comp = min((r["ms"] for r in rs if r["provider"] == "compile"), default=None)
        gemm = min((r["ms"] for r in rs if r["provider"] == "bare_gemm"), default=None)
        for r in rs:
            if r["provider"] in ("eager", "compile", "bare_gemm"):
                continue
            row = dict(r)
            row["speedup_vs_eager_best"] = eager / r["ms"] if eager else None
            row["speedup_vs_compile_best"] = comp / r["ms"] if comp else None
            row["x_bare_gemm"] = r["ms"] / gemm if gemm else None
            if ceilings.get("bandwidth") and r["mode"] == "eval" and r["op"] == "dw_block":
                floor = max(r["bytes"] / ceilings["bandwidth"], r["flops"] / ceilings["fp32_flops"]) * 1e3
                row["roofline_floor_ms"] = floor
                row["pct_of_roofline"] = 100 * floor / r["ms"]
            rows.append(row)
    return rows


def write_markdown(path, meta, rows):
    with open(path, "w") as f:
        f.write(f"# Benchmarks on {meta['device']}\n\n")
        f.write(f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}\n\n")
        if meta["ceilings"]:
            c = meta["ceilings"]
            f.write(f"Measured ceilings: copy bandwidth {c['bandwidth'] / 1e12:.2f} TB/s, "
                    f"fp32 FMA rate {c['fp32_flops'] / 1e12:.1f} TFLOP/s\n\n")
        f.write("| op | C | k | layout | mode | provider | ms (p20-p80) | vs eager best | vs compile best | "
                "x bare GEMM(s) | % roofline |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            fmt = lambda v, s="{:.2f}x": s.format(v) if v is not None else "-"  # noqa: E731
            f.write(f"| {r['op']} | {r['C']} | {r['k']} | {r['layout']} | {r['mode']} | {r['provider']} | "
                    f"{r['ms']:.3f} ({r['p20']:.3f}-{r['p80']:.3f}) | {fmt(r['speedup_vs_eager_best'])} | "
                    f"{fmt(r['speedup_vs_compile_best'])} | {fmt(r.get('x_bare_gemm'))} | "
                    f"{fmt(r.get('pct_of_roofline'), '{:.0f}%')} |\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="first print a profile of each fused training step")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        dev_name = torch.cuda.get_device_name(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    ceilings = {}
    if device == "cuda":
        ceilings = {"bandwidth": measure_bandwidth_gpu(), "fp32_flops": measure_fp32_rate_gpu()}
        print(f"ceilings: {ceilings['bandwidth'] / 1e12:.2f} TB/s, {ceilings['fp32_flops'] / 1e12:.1f} TFLOP/s fp32")
    # A run stopped by a time limit (SIGTERM from `timeout`) still writes what it measured.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit("stopped by SIGTERM: partial results written"))
    if args.profile:
        try:
            profile_steps(device, args.quick)
        except Exception as e:  # a failing profile must not cost the benchmarks
            print(f"profile failed: {type(e).__name__}: {e}", flush=True)
    res = []
    try:
        dw_suite(device, args.quick, res)
        gemm_suite(device, args.quick, res)
        residual_suite(device, args.quick, res)
    finally:
        rows = summarize(res, ceilings)
        meta = dict(device=dev_name, commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    torch=torch.__version__, triton=tv, python=platform.python_version(), ceilings=ceilings,
                    build=ck._ext.build_info())
        os.makedirs(args.out, exist_ok=True)
        tag = "gpu" if device == "cuda" else "cpu"
        with open(os.path.join(args.out, f"bench_{tag}.json"), "w") as f:
            json.dump(dict(meta=meta, results=res, summary=rows), f, indent=1)
        write_markdown(os.path.join(args.out, f"bench_{tag}.md"), meta, rows)
        print(open(os.path.join(args.out, f"bench_{tag}.md")).read())

if __name__ == "__main__":
    main()
