"""The benchmark suites: depthwise block, pointwise block, stem, residual placement, whole models.

Each suite times every provider of a case in the same run (harness.CaseTimer) and appends one row per
measurement to `bench.rows`: what was run (suite, op, provider, mode, dtype, layout, shape), the times
in ms (median, p20, p80), the bytes and FLOPs counted from the shape (each input read once, each output
written once), and the peak GPU memory.  Modes: `eval` (inference forward, no autograd), `train_fwd`
(training-mode forward that records the autograd graph), `train` (training forward + backward).
"""

from __future__ import annotations

import copy

import torch

import convmixer_kernels as ck

from .harness import BASELINES, DTYPES, CaseTimer, as_provider, graphed, module_of, rotation, unavailable

MODES = ("eval", "train_fwd", "train")


class Bench:
    """One run: the device, the dtypes, quick or full, an optional provider filter, and the rows."""

    def __init__(self, device, dtypes, quick=False, providers=None):
        self.device, self.dtypes, self.quick, self.only = device, dtypes, quick, providers
        self.references = True  # time the reference lines (the bare GEMMs) too
        self.ks = None  # the depthwise suite's kernel sizes to keep (None: all)
        self.rows = []
        cpu_quick = device == "cpu" and quick  # the CI smoke test: tiny shapes, a few rounds each
        self.seconds, self.min_rounds = (0.02, 2) if cpu_quick else (1.0, 5)

    def timer(self):
        return CaseTimer(self.device, self.seconds, self.min_rounds)

    def wants(self, prov) -> bool:
        return (self.only is None or prov in self.only) and unavailable(prov, self.device) is None

    def modes(self):
        return ("eval", "train") if self.quick and self.device == "cuda" else MODES

    def recorder(self, row):
        """CaseTimer callbacks (done, fail) appending `row` with the times, or with the error."""
        label = " ".join(str(row[k]) for k in ("suite", "shape", "layout", "dtype", "mode", "provider"))

        def done(t, peak):
            extra = {}
            if row.get("images"):
                extra["images_per_s"] = row["images"] / (t[0] * 1e-3)
            self.rows.append(dict(row, ms=t[0], p20=t[1], p80=t[2], peak_mb=peak, **extra))
            print(f"  {label}: {t[0]:9.3f} ms", flush=True)

        def fail(e):  # a provider that fails is reported, not hidden
            self.rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)

        return done, fail


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def run_step(m, x, dy, mode):
    """One step of module m: eval forward, training forward, or training forward + backward of dy."""
    if mode == "eval":
        with torch.no_grad():
            return m(x)
    if mode == "train_fwd":
        return m(x)
    for p in m.parameters():
        p.grad = None
    x.grad = None  # (accumulating into it would add a pass over x to every step)
    m(x).backward(dy)


def _block_case(bench, timer, prov, fused, ref, xs, dys, mode, row):
    """Add provider `prov` of one block case (xs/dys: the rotated inputs and output gradients)."""
    m = module_of(prov, fused, ref)
    m.train(mode != "eval")
    inputs = xs[mode != "eval"]
    if prov.endswith("_graph"):
        try:
            with as_provider(prov):
                fn = graphed(lambda x: run_step(m, x, dys[0], mode), inputs[0])
        except Exception as e:
            bench.recorder(row)[1](e)
            return
        timer.add(fn, 1, prov, *bench.recorder(row))
    else:
        timer.add(lambda i: run_step(m, inputs[i], dys[i], mode), len(dys), prov, *bench.recorder(row))


def _inputs(bench, shape, out_shape, dtype, layout, cin_grad=True):
    """Rotated inputs (no grad, and requiring grad) and output gradients of one case."""
    fmt = _fmt(layout)
    per_set = 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    n = rotation(bench.device, per_set)
    xs = [torch.randn(shape, device=bench.device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(n)]
    xg = [x.clone().requires_grad_(cin_grad) for x in xs]
    dys = [torch.randn(out_shape, device=bench.device, dtype=dtype).contiguous(memory_format=fmt)
           for _ in range(n)]
    return (xs, xg), dys


# ----------------------------------------------------------------------------------------- depthwise
def dw_modules(C, k, dtype, device):
    torch.manual_seed(0)
    blk = ck.FusedDepthwiseBlock(C, k, activation="gelu").to(device=device, dtype=dtype)
    with torch.no_grad():
        blk.norm.weight.uniform_(0.5, 1.5)
        blk.norm.bias.uniform_(-0.5, 0.5)
        blk.norm.running_var.uniform_(0.5, 1.5)
    return blk, copy.deepcopy(blk).reference()


def dw_cases(bench):
    """(N, C, H, k, layouts, providers, graph) per case: issue 6's shapes on the GPU (B=64, C in {768,
    1536}, 32x32, k in {3, 5, 7, 9}) plus a small batch with the CUDA-graph variants; on the CPU the
    2-core sizes; tiny ones for the smoke test."""
    both = ("nchw", "channels_last")
    if bench.device == "cuda":
        if bench.quick:
            # compile, the plan knobs: full runs; cuda_bwd_staged: the dpre pass's first measurement;
            # cuda_bwd_regs: k <= 7 only (elsewhere it is `cuda`)
            fused = ("eager", "cuda", "cuda_fma", "cuda_mma", "cuda_bwd_staged")
            return [(64, 768, 32, 7, both, fused + ("cuda_bwd_regs",), False),
                    (64, 768, 32, 9, both, fused, False),
                    (64, 1536, 32, 9, both, ("eager", "cuda"), False),
                    (8, 768, 32, 9, ("channels_last",), ("eager", "eager_graph", "cuda", "cuda_graph"), True)]
        full = ("eager", "compile", "cuda", "cuda_fma", "cuda_ipb1", "cuda_mma", "cuda_bwd_copy", "cuda_bwd_nocopy",
                "cuda_bwd_staged", "triton")
        cases = [(64, C, 32, k, both, full + (("compile_max",) if (C, k) == (768, 9) else ())
                  + (("cuda_bwd_regs",) if k <= 7 else ()), False)
                 for C in (768, 1536) for k in (3, 5, 7, 9)]
        return cases + [(8, 768, 32, k, both, ("eager", "eager_graph", "cuda", "cuda_graph"), True) for k in (7, 9)]
    if bench.quick:
        return [(2, 16, 12, 3, both, ("eager", "compile", "cpu", "torch"), False),
                (2, 16, 12, 9, both, ("eager", "cpu"), False)]
    return [(8, 256, 32, k, both, ("eager", "cpu", "torch") + (("compile",) if k == 9 else ()), False)
            for k in (3, 5, 7, 9)]


def dw_suite(bench):
    for dtype in bench.dtypes:
        for N, C, H, k, layouts, providers, _ in dw_cases(bench):
            if bench.ks is not None and k not in bench.ks:
                continue
            for layout in layouts:
                shape = (N, C, H, H)
                xsets, dys = _inputs(bench, shape, shape, dtype, layout)
                elems, esize = N * C * H * H, dys[0].element_size()
                for mode in bench.modes():
                    timer = bench.timer()
                    for prov in providers:
                        if not bench.wants(prov) or (bench.quick and prov.startswith("compile") and mode == "train_fwd"):
                            continue
                        if prov == "cuda_mma" and (dtype == torch.float32 or k > 9):
                            continue  # the tensor-core forward serves fp16/bf16, k <= 9
                        if prov.startswith("cuda_bwd_") and mode != "train":
                            continue  # a backward choice
                        if prov in ("cuda_bwd_copy", "cuda_bwd_nocopy", "cuda_bwd_regs") and layout != "channels_last":
                            continue  # a channels_last backward plan choice
                        fused, ref = dw_modules(C, k, dtype, bench.device)
                        # bytes: eval x -> y; train_fwd x -> y, pre (saved); train adds dy, x, pre -> dx
                        nb = {"eval": 2, "train_fwd": 3, "train": 7}[mode]
                        nf = {"eval": 1, "train_fwd": 1, "train": 3}[mode]
                        row = dict(suite="dw", op="dw_block", provider=prov, mode=mode, dtype=_dtype_name(dtype),
                                   layout=layout, N=N, C=C, H=H, W=H, k=k, shape=f"N={N} C={C} {H}x{H} k={k}",
                                   bytes=nb * elems * esize, flops=2 * k * k * elems * nf)
                        _block_case(bench, timer, prov, fused, ref, xsets, dys, mode, row)
                    timer.run()


# ----------------------------------------------------------------------------------------- GEMMs
def gemm_modules(kind, C, p, dtype, device, layout):
    torch.manual_seed(0)
    if kind == "pw":
        blk = ck.FusedPointwiseBlock(C, C, activation="gelu")
    else:
        blk = ck.FusedPatchEmbed(C, p, activation="gelu")
    blk = blk.to(device=device, dtype=dtype, memory_format=_fmt(layout))
    return blk, copy.deepcopy(blk).reference()


def gemm_cases(bench, kind):
    """(N, C, H, p, layouts, providers, graph): the pointwise block (p=1) or the stem (patch p)."""
    cl, both = ("channels_last",), ("nchw", "channels_last")
    if bench.device == "cuda":
        if kind == "pw":
            if bench.quick:
                # cuda_graph: the step without host time; 2026-11-27 timed 1.59 ms a step where its profile's
                # kernels summed to 1.05 ms, so the step may wait for the host
                return [(64, 768, 32, 1, cl, ("eager", "compile", "cuda", "cuda_cutlass", "cuda_cutlass_pp",
                                              "cuda_graph"), True)]
            full = ("eager", "compile", "cuda", "cuda_cutlass", "cuda_cutlass_pp", "triton")
            return [(64, 768, 32, 1, both, full + ("compile_max",), False), (64, 1536, 32, 1, both, full, False),
                    (8, 768, 32, 1, cl, ("eager", "eager_graph", "cuda", "cuda_graph"), True)]
        if bench.quick:
            return [(64, 768, 224, 7, cl, ("eager", "cuda", "cuda_cutlass"), False)]
        full = ("eager", "compile", "cuda", "cuda_cutlass", "triton")
        return [(64, 768, 224, 7, cl, full, False), (64, 1536, 224, 7, cl, full, False),
                (64, 1024, 224, 14, cl, full, False)]
    if bench.quick:
        return [(2, 16, 8, 1, cl, ("eager", "cpu"), False)] if kind == "pw" else \
            [(2, 16, 30, 7, cl, ("eager", "cpu"), False)]
    if kind == "pw":
        return [(8, 256, 32, 1, both, ("eager", "compile", "cpu", "torch"), False)]
    # the small case is mostly host time; the ImageNet-sized (224x224, p=7) and CIFAR-sized (32x32, p=2,
    # the CPU demo's ConvMixer-256/8) stems are where the GEMM and the passes count
    return [(8, 256, 64, 7, cl, ("eager", "compile", "cpu", "torch"), False),
            (8, 256, 224, 7, cl, ("eager", "cpu"), False), (32, 256, 32, 2, cl, ("eager", "cpu"), False)]


def gemm_suite(bench, kind):
    """Pointwise block (kind "pw") or stem ("stem") against eager, compile and the bare GEMMs of the
    same shape (torch.mm: the forward one in eval, the three of forward + backward in training)."""
    for dtype in bench.dtypes:
        for N, C, H, p, layouts, providers, _ in gemm_cases(bench, kind):
            cin, ho = (C, H) if kind == "pw" else (3, H // p)
            M, K = N * ho * ho, cin * p * p
            esize = torch.empty((), dtype=dtype).element_size()
            a = torch.randn(M, K, device=bench.device, dtype=dtype)
            b = torch.randn(K, C, device=bench.device, dtype=dtype)
            g = torch.randn(M, C, device=bench.device, dtype=dtype)
            for layout in layouts:
                xsets, dys = _inputs(bench, (N, cin, H, H), (N, C, ho, ho), dtype, layout, cin_grad=kind == "pw")
                for mode in bench.modes():
                    gemms = 3 if mode == "train" else 1
                    base = dict(suite=kind, op="pw_block" if kind == "pw" else "stem", mode=mode,
                                dtype=_dtype_name(dtype), layout=layout, N=N, C=C, H=H, W=H, k=p,
                                shape=f"N={N} C={C} {H}x{H}" + (f" p={p}" if kind == "stem" else ""),
                                flops=2 * M * K * C * gemms)
                    # bytes: x, w -> y (+ pre saved in training); backward reads dy, pre, x, w, writes dx, dw
                    fwd = M * K + K * C + M * C * (1 if mode == "eval" else 2)
                    base["bytes"] = esize * (fwd + (3 * M * C + 2 * M * K + 2 * K * C if mode == "train" else 0))
                    timer = bench.timer()
                    if layout == layouts[-1] and bench.references:  # the bare GEMMs, once per mode
                        bare = (lambda i: (torch.mm(a, b), torch.mm(g, b.t()), torch.mm(a.t(), g))) \
                            if mode == "train" else (lambda i: torch.mm(a, b))
                        timer.add(bare, 1, "eager", *bench.recorder(dict(base, provider="bare_gemm",
                                                                          layout="-")))
                    for prov in providers:
                        if not bench.wants(prov) or (prov == "cuda_cutlass_pp" and mode != "eval"):
                            continue  # the schedule changes the eval GEMM only (training: the statistics GEMM)
                        if prov.startswith("cuda_cutlass") and dtype == torch.float32:
                            continue  # fp16/bf16 GEMMs
                        if bench.quick and prov.startswith("compile") and mode == "train_fwd":
                            continue
                        fused, ref = gemm_modules(kind, C, p, dtype, bench.device, layout)
                        _block_case(bench, timer, prov, fused, ref, xsets, dys, mode, dict(base, provider=prov))
                    timer.run()


# ----------------------------------------------------------------------------------------- residual
class ResidualPair(torch.nn.Module):
    """A fused depthwise block then a fused pointwise block, with ConvMixer's residual fused into the
    depthwise epilogue (in_pw False) or into the pointwise GEMM's operand load (in_pw True)."""

    def __init__(self, C, k, in_pw):
        super().__init__()
        self.dw = ck.FusedDepthwiseBlock(C, k, residual=not in_pw)
        self.pw = ck.FusedPointwiseBlock(C, C)
        self.in_pw = in_pw

    def forward(self, x):
        return self.pw(x, residual=self.dw(x)) if self.in_pw else self.pw(self.dw(x))


def residual_suite(bench):
    """Where the ConvMixer residual `x + t` feeding the 1x1 conv is fused (issue 4): in the depthwise
    kernel's epilogue (dw_block(x) = x + t, then pw_block(y): what the fused ConvMixer does), or in the
    pointwise GEMM's operand load (dw_block without the residual gives t, then pw_block(x, residual=t)).
    One depthwise + pointwise pair, channels_last, with the fused backend of the device."""
    if bench.device == "cuda":
        N, C, H, k, prov = 64, 768, 32, 9, "cuda"
    else:
        N, C, H, k, prov = (2, 16, 8, 9, "cpu") if bench.quick else (8, 256, 32, 9, "cpu")
    if not bench.wants(prov):
        return
    for dtype in bench.dtypes:
        xsets, dys = _inputs(bench, (N, C, H, H), (N, C, H, H), dtype, "channels_last")
        for mode in ("eval", "train"):
            timer = bench.timer()
            for where in ("dw_epilogue", "pw_operand"):
                torch.manual_seed(0)
                m = ResidualPair(C, k, where == "pw_operand").to(device=bench.device, dtype=dtype,
                                                                  memory_format=torch.channels_last)
                m.train(mode != "eval")
                row = dict(suite="residual", op=f"residual_{where}", provider=prov, mode=mode,
                           dtype=_dtype_name(dtype), layout="channels_last", N=N, C=C, H=H, W=H, k=k,
                           shape=f"{where}: N={N} C={C} {H}x{H} k={k}")
                inputs = xsets[mode != "eval"]
                timer.add(lambda i, m=m, inputs=inputs, mode=mode: run_step(m, inputs[i], dys[i], mode),
                          len(dys), prov, *bench.recorder(row))
            timer.run()


# ----------------------------------------------------------------------------------------- models
def model_cases(bench):
    """(name, batch, resolution, providers): timm's ConvMixers, two ViTs of similar size, EfficientNet-B0 and
    MobileNetV2 (norm_act depthwise nets: SiLU; ReLU6 and linear bottlenecks) on the GPU (224x224); on the CPU,
    ConvMixer-768/32, DeiT-S and EfficientNet-B0 at a small batch and the CIFAR-sized reference ConvMixer-256/8; a tiny reference ConvMixer for the smoke
    test.  `auto`: the fused model as a user
    runs it (fuse(model), default backend choice per op); `cuda`/`triton`: every fused op on that backend."""
    if bench.device == "cuda":
        cm = ("eager", "compile", "auto", "cuda", "auto_mma")
        if bench.quick:
            return [("timm:convmixer_768_32", 32, 224, ("eager", "auto", "cuda", "cuda_bn_torch", "cuda_cutlass",
                                                         "cuda_bwd_regs")),
                    ("timm:vit_small_patch16_224", 32, 224, ("eager",))]
        return [("timm:convmixer_1536_20", 64, 224, cm + ("triton",)),
                ("timm:convmixer_768_32", 64, 224, cm + ("cuda_cutlass",)),
                ("timm:convmixer_1024_20_ks9_p14", 64, 224, cm),
                ("timm:deit_small_patch16_224", 64, 224, ("eager", "compile")),
                ("timm:vit_small_patch16_224", 64, 224, ("eager", "compile")),
                ("timm:efficientnet_b0", 64, 224, ("eager", "compile", "auto")),
                ("timm:mobilenetv2_100", 64, 224, ("eager", "compile", "auto"))]
    if bench.quick:
        return [("convmixer-32/2-k5-p4", 2, 32, ("eager", "auto"))]
    return [("convmixer-256/8-k5-p2", 32, 32, ("eager", "auto")), ("timm:convmixer_768_32", 2, 224, ("eager", "auto")),
            ("timm:deit_small_patch16_224", 2, 224, ("eager",)), ("timm:efficientnet_b0", 8, 224, ("eager", "auto"))]


def _make_model(name):
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    from convmixer_kernels.reference import ConvMixer

    dim, depth, k, p = (int(v) for v in name.replace("convmixer-", "").replace("/", "-").replace("k", "")
                        .replace("p", "").split("-"))
    return ConvMixer(dim, depth, kernel_size=k, patch_size=p, n_classes=10)


def _model_step(m, opt, x, target, mode, amp_dtype):
    """Inference forward, or a full training step: forward, loss, backward, optimizer step.  Training in
    bf16/fp16 runs under autocast with fp32 weights (mixed precision, as users train)."""
    if mode == "eval":
        with torch.no_grad():
            return m(x)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = torch.nn.functional.cross_entropy(m(x).float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# The fused providers also timed on NCHW models: the depthwise CUDA kernels train faster on NCHW than on
# channels_last at k=7 (H200, 2026-11-27, N=64 C=768: 1.44 against 2.39 ms a step; eager 8.29 and 2.41 ms),
# so a fused ConvMixer may train faster NCHW even though eager's best layout is channels_last.
NCHW_FUSED = ("cuda",)


def model_suite(bench):
    """Whole models: images/s and peak memory of inference (weights in the dtype) and of a training step
    (SGD with momentum; autocast for bf16/fp16), every provider in both layouts where layout matters."""
    for dtype in bench.dtypes:
        for name, B, res, providers in model_cases(bench):
            if not any(bench.wants(p) and not (p.startswith("cuda_cutlass") and dtype == torch.float32)
                       for p in providers):
                continue  # (a late pass for one provider builds only the models it times)
            # fused providers for the models fuse() finds blocks in (the ConvMixers; EfficientNet's conv ->
            # BatchNormAct pairs), run in both layouts; the others (ViTs) are eager-only reference lines
            try:
                base = _make_model(name)
                fused_base, fuse_report = ck.fuse(base, return_report=True)  # (a copy: base stays as it is)
                if "convmixer" in name and not fuse_report.fused:
                    raise RuntimeError(f"fuse() found no blocks in {name}: {fuse_report}")
            except Exception as e:  # e.g. timm missing: reported, the other models still run
                bench.recorder(dict(suite="model", op=name, provider="eager", mode="eval", dtype=_dtype_name(dtype),
                                    layout="-", shape=f"{name} B={B} {res}x{res}"))[1](e)
                continue
            fusable = bool(fuse_report.fused)
            n_classes = getattr(base, "num_classes", None) or 10  # timm models say; the reference has 10
            for layout in (("nchw", "channels_last") if fusable else ("nchw",)):
                fmt = _fmt(layout)
                x = torch.randn(B, 3, res, res, device=bench.device).contiguous(memory_format=fmt)
                for mode in ("eval", "train"):
                    amp = None if dtype == torch.float32 or mode == "eval" else dtype
                    x_m = x.to(dtype) if mode == "eval" else x
                    timer = bench.timer()
                    for prov in providers:
                        if not bench.wants(prov) or (prov not in BASELINES + NCHW_FUSED and layout != "channels_last"):
                            continue  # the fused models run channels_last, `cuda` NCHW too (see NCHW_FUSED)
                        if prov.startswith("compile") and layout != "channels_last" and fusable:
                            continue
                        if prov == "cuda_bn_torch" and mode != "train":
                            continue  # the bn ops run in training only
                        if prov.startswith("cuda_cutlass") and dtype == torch.float32:
                            continue  # fp16/bf16 GEMMs
                        src = base if prov in BASELINES else fused_base
                        m = copy.deepcopy(src).to(device=bench.device, memory_format=fmt)
                        if mode == "eval":
                            m = m.to(dtype)
                        m = module_of(prov, m, m)
                        m.train(mode == "train")
                        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) if mode == "train" else None
                        target = torch.randint(0, n_classes, (B,), device=bench.device)
                        row = dict(suite="model", op=name, provider=prov, mode=mode, dtype=_dtype_name(dtype),
                                   layout=layout, N=B, H=res, W=res, shape=f"{name} B={B} {res}x{res}", images=B)
                        timer.add(lambda i, m=m, opt=opt, target=target, mode=mode, x_m=x_m, amp=amp:
                                  _model_step(m, opt, x_m, target, mode, amp), 1, prov, *bench.recorder(row))
                    timer.run()


# In the order a run goes through them (a run stopped by its time limit keeps what came first).
SUITES = {"dw": dw_suite, "pw": lambda b: gemm_suite(b, "pw"), "stem": lambda b: gemm_suite(b, "stem"),
          "model": model_suite, "residual": residual_suite}
