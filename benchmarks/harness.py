"""Timing, providers and the machine's ceilings, shared by every suite (benchmarks/suites.py).

GPU: CUDA-event timing through triton.testing.do_bench (median with p20/p80, L2 flushed between calls),
inputs rotated over several buffers.  CPU: every provider of a case timed together in rounds (CaseTimer).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch

import convmixer_kernels as ck


# ----------------------------------------------------------------------------------------- timing
def bench_gpu(fn, rotate: int = 1, min_samples: int = 8) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(i) through triton.testing.do_bench (L2 flushed), over about
    300 ms of calls but at least `min_samples` of them (a 160 ms model training step got one sample
    from a fixed 300 ms, so its median and quantiles were that one call)."""
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        fn(state["i"] % rotate)
        state["i"] += 1

    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3
    q = do_bench(call, warmup=50, rep=max(300.0, 1.25 * min_samples * est_ms), quantiles=[0.5, 0.2, 0.8])
    return tuple(float(v) for v in q)


def quantiles(times):
    """(median, p20, p80) of a list of times."""
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def rotation(device, bytes_per_set: int) -> int:
    """How many input sets to rotate through so that together they are at least twice the L2 cache
    (do_bench also flushes L2 before every call; rotating keeps small shapes honest without it)."""
    if device != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(16, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def peak_memory_mb(device, fn) -> float | None:
    """Peak bytes allocated on the GPU during one call of fn, in MB (weights and inputs included).
    None on the CPU: PyTorch keeps no peak statistics for CPU tensors."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


class CaseTimer:
    """Times the providers of one case.  GPU: each in turn through bench_gpu, as it is added.  CPU: all of
    them together in rounds (one call of each per round, about `seconds` per provider in all), because this
    project's CPU is a VM whose speed drifts by 10-50% over seconds: timed one after another, the ratios
    between providers moved with the drift; timed in rounds, every provider sees the same machine.
    add(fn, rotate, prov, done, fail): fn(i) runs as provider `prov` (PROVIDERS: its backend and
    environment); done((median, p20, p80), peak_mb) gets the times in ms, fail(exception) a failure."""

    def __init__(self, device, seconds=1.0, min_rounds=5):
        self.device, self.seconds, self.min_rounds = device, seconds, min_rounds
        self.jobs = []

    def add(self, fn, rotate, prov, done, fail):
        if self.device == "cuda":
            try:
                with as_provider(prov):
                    t = bench_gpu(fn, rotate)
                    peak = peak_memory_mb(self.device, lambda: fn(0))
            except Exception as e:  # a provider that fails is reported, not hidden
                fail(e)
                return
            done(t, peak)
        else:
            def under(i, fn=fn):
                with as_provider(prov):
                    return fn(i)

            self.jobs.append((under, rotate, done, fail))

    def run(self):
        pending, self.jobs = self.jobs, []
        jobs = []
        for fn, rotate, done, fail in pending:
            try:
                for i in range(2):  # warm-up (and compilation, for the compile providers)
                    fn(i % rotate)
            except Exception as e:
                fail(e)
                continue
            jobs.append((fn, rotate, done, []))
        t_end = time.perf_counter() + self.seconds * len(jobs)
        rounds = 0
        while jobs and (time.perf_counter() < t_end or rounds < self.min_rounds):
            for fn, rotate, _, times in jobs:
                t0 = time.perf_counter()
                fn(rounds % rotate)
                times.append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        for _, _, done, times in jobs:
            done(quantiles(times), None)


# ----------------------------------------------------------------------------------------- providers
# name -> (backend of the fused modules, environment variables and values to run under).  The eager and
# compile providers run the unfused reference modules (their backend does not matter); *_graph run
# the step captured in one CUDA graph.  cuda_ipb1: the CUDA kernels with one item per forward depthwise
# block (no next tile to copy in while computing), so the same run shows what the cp.async pipeline
# gains.  cuda_cutlass / cuda_cutlass_pp: the CUTLASS pointwise GEMMs (csrc/cuda/pw.cpp cutlass_mode), fp16/bf16:
# the eval forward as one GEMM with the epilogue fused, in its cooperative / ping-pong schedule
# (CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE), and the training forward's GEMM with the statistics in its epilogue;
# cuda_mma: the depthwise block on tensor cores (fp16/bf16, k <= 9, both layouts, forward and backward;
# =require raises where they do not apply); auto_mma: a whole fused model with them wherever they apply
# (=1); cuda_fma: the FMA depthwise kernels only (=0; by default the tensor-core ones run the cases where
# they were measured faster, see mma_default in csrc/cuda/dw_mma.cu).  cuda_bwd_copy / cuda_bwd_nocopy: the
# channels_last FMA backward planned with / without room for the cp.async copies of its tile
# (CONVMIXER_KERNELS_DW_BWD_COPIES, csrc/cuda/dw_common.cuh plan_tiles), to measure that choice.
# cuda_bwd_staged: the depthwise backward (FMA, both layouts; tensor cores, channels_last) computing dpre
# while staging its tiles, as before the fp32 dpre pass (CONVMIXER_KERNELS_DW_BWD_DPRE=0, dw_launch.cu).
# cuda_bwd_regs: the channels_last depthwise backward with its weight-gradient partials in registers where it
# applies (k <= 7, 4 | C; CONVMIXER_KERNELS_DW_BWD_REGS=1, csrc/cuda/dw_bwd_cl_regs.cuh), opt-in until timed.
# cuda_bn_torch: a training step's BatchNorm bookkeeping as PyTorch ops, not the bn_* ops (one launch each;
# CONVMIXER_KERNELS_BN_OPS=0, ops.bn_ops_ok), to measure what the fewer launches save.
PROVIDERS = {
    "eager": ("auto", None), "compile": ("auto", None), "compile_max": ("auto", None),
    "eager_graph": ("auto", None),
    "auto": ("auto", None), "cpu": ("cpu", None), "torch": ("torch", None), "cuda": ("cuda", None), "triton": ("triton", None),
    "cuda_graph": ("cuda", None),
    "cuda_ipb1": ("cuda", ("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "1")),
    "cuda_cutlass": ("cuda", ("CONVMIXER_KERNELS_PW_CUTLASS", "require",
                              "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE", "cooperative")),
    "cuda_cutlass_pp": ("cuda", ("CONVMIXER_KERNELS_PW_CUTLASS", "require",
                                 "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE", "pingpong")),
    "cuda_mma": ("cuda", ("CONVMIXER_KERNELS_DW_MMA", "require")),
    "cuda_fma": ("cuda", ("CONVMIXER_KERNELS_DW_MMA", "0")),
    "cuda_bwd_copy": ("cuda", ("CONVMIXER_KERNELS_DW_BWD_COPIES", "1")),
    "cuda_bwd_nocopy": ("cuda", ("CONVMIXER_KERNELS_DW_BWD_COPIES", "0")),
    "cuda_bwd_staged": ("cuda", ("CONVMIXER_KERNELS_DW_BWD_DPRE", "0")),
    "cuda_bwd_regs": ("cuda", ("CONVMIXER_KERNELS_DW_BWD_REGS", "1")),
    "cuda_bn_torch": ("cuda", ("CONVMIXER_KERNELS_BN_OPS", "0")),
    "auto_mma": ("auto", ("CONVMIXER_KERNELS_DW_MMA", "1")),
}
# The providers that run the original (unfused) modules: the baselines every target is measured against.
BASELINES = ("eager", "compile", "compile_max", "eager_graph")


@contextlib.contextmanager
def env_set(pairs):
    """The environment variables (name, value) set inside the block; each restored after it (or removed
    when it was not set)."""
    old = {name: os.environ.get(name) for name, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def as_provider(prov):
    """Run as provider `prov`: its backend, and its environment variables set inside the block."""
    backend, env = PROVIDERS[prov]
    assert env is None or len(env) % 2 == 0, f"{prov}: environment as (name, value, name, value, ...)"
    with env_set([] if env is None else list(zip(env[0::2], env[1::2]))), ck.backend(backend):
        yield


def unavailable(prov, device) -> str | None:
    """Why provider `prov` cannot run on `device` in this process (None when it can)."""
    if prov.endswith("_graph") and device != "cuda":
        return "CUDA graphs need a GPU"
    if prov in ("compile", "compile_max", "eager", "eager_graph", "auto"):
        return None
    why = ck.backends.why_unavailable(PROVIDERS[prov][0], torch.device(device))
    if why is None and prov.startswith("cuda_cutlass"):  # (its =require would fail every row otherwise)
        from convmixer_kernels import _ext

        if _ext.build_info().get("cutlass") != "1":
            return "this build has no CUTLASS GEMMs (TORCH_CUDA_ARCH_LIST with 9.0a and CUTLASS's headers)"
        if torch.cuda.get_device_capability(torch.device(device)) != (9, 0):
            return "the CUTLASS GEMMs run on compute capability 9.0 only"
    return why


def module_of(prov, fused, ref):
    """The module provider `prov` times: the reference (eager), the compiled reference, or the fused one."""
    if prov in ("eager", "eager_graph"):
        return ref
    if prov in ("compile", "compile_max"):
        # Every case compiles the same code objects (Residual.forward, Sequential.forward): without a reset
        # Dynamo's cache for them filled up (recompile_limit, 8) and later cases silently ran eager.
        torch._dynamo.reset()
        return torch.compile(ref, dynamic=False, **({"mode": "max-autotune"} if prov == "compile_max" else {}))
    return fused


def graphed(step, example):
    """fn(i) replaying `step(example)` captured in one CUDA graph (after warm-up on a side stream, as
    torch.cuda.graphs documents), so the step costs no host time: the small-shape variant."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(example)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(example)
    return lambda i: g.replay()


# ----------------------------------------------------------------------------------------- ceilings
def measure_bandwidth(device) -> float:
    """Bytes/s of a large copy on `device`, counting bytes read plus bytes written."""
    n = (1 << 30) if device == "cuda" else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    if device == "cuda":
        ms = bench_gpu(lambda i: b.copy_(a))[0]
    else:
        b.copy_(a)
        ms = min(_cpu_ms(lambda: b.copy_(a)) for _ in range(5))
    return 2 * n / (ms * 1e-3)


def _cpu_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_fp32_fma_rate(device) -> float:
    """fp32 FLOP/s without tensor cores.  GPU: a Triton kernel of independent FMA chains on the CUDA cores.
    CPU: a large fp32 matrix product (oneDNN/MKL run it at the FMA units' peak, so it stands for it)."""
    if device != "cuda":
        return measure_mm_rate(device, torch.float32)
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


def measure_mm_rate(device, dtype) -> float:
    """FLOP/s of a large square matrix product in `dtype` (tensor cores on the GPU for bf16/fp16; fp32
    follows PyTorch's default, which does not allow TF32 for matmul)."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cuda":
        ms = bench_gpu(lambda i: torch.mm(a, b))[0]
    else:
        torch.mm(a, b)
        ms = min(_cpu_ms(lambda: torch.mm(a, b)) for _ in range(3))
    return 2 * n**3 / (ms * 1e-3)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names runs use


def mm_ceiling(dtype_name: str) -> str:
    """The Ceilings name of the matrix-product rate in a dtype ("bf16" -> "mm_bfloat16")."""
    return "mm_" + str(DTYPES[dtype_name]).replace("torch.", "")


class Ceilings:
    """The machine's ceilings, measured in this run when first asked for (and kept)."""

    def __init__(self, device):
        self.device, self.values = device, {}

    def get(self, name):
        if name not in self.values:
            if name == "bandwidth":
                v = measure_bandwidth(self.device)
            elif name == "fp32_fma":
                v = measure_fp32_fma_rate(self.device)
            elif name.startswith("mm_"):
                v = measure_mm_rate(self.device, getattr(torch, name[3:]))
            else:
                raise KeyError(name)
            self.values[name] = v
        return self.values[name]
