"""Run the CUDA kernels of the depthwise ops, the per-channel passes of the pointwise/stem ops and the
BatchNorm kernels on the CPU through tests/cuda_emu/emu.h, and the pointwise/stem ops' own CUDA host code
(csrc/cuda/pw.cpp: GEMMs through ATen, the stem's padded im2col) around them, and compare them with
convmixer_kernels.torch_ops (tests/dw_op_cases.check_all_ops; pw_cases, bn_cases, host_cases below), on
machines without a GPU.

    PYTHONPATH=. python tests/cuda_emu/run_emu.py [--quick]

It builds a separate CPU module (a minute or more with g++), never the extension.  CI runs the quick
list on 3 emulated SMs through tests/test_cuda_emu.py; the full list is a development check.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys
import time

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchmarks.harness import env_set  # noqa: E402
from dw_op_cases import BWD_ARGS, check_all_ops, make_inputs  # noqa: E402
from oracle import check_2x  # noqa: E402


def build(jobs: int = 2):
    bdir = os.environ.get("CMK_EMU_BUILD", "/tmp/cmk_emu_build")
    os.makedirs(bdir, exist_ok=True)
    wrappers = []
    cus = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "dw_*.cu"))) + [
        os.path.join(ROOT, "csrc", "cuda", f) for f in ("pw_kernels.cu", "bn_kernels.cu", "pw_cutlass.cu")]
    for cu in cus:
        w = os.path.join(bdir, os.path.basename(cu)[:-3] + "_emu.cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(w) or open(w).read() != text:
            with open(w, "w") as f:
                f.write(text)
        wrappers.append(w)
    os.environ.setdefault("MAX_JOBS", str(jobs))
    return cpp_extension.load(
        name="cmk_cuda_emu",
        sources=[os.path.join(HERE, f) for f in ("emu_runtime.cpp", "emu_ops.cpp", "emu_host_pw.cpp", "emu_host_dw.cpp",
                                                 "emu_host_bn.cpp")] + wrappers,
        extra_cflags=["-O1", "-ffp-contract=off", "-include", os.path.join(HERE, "emu.h"), "-w"],
        extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda"), HERE,
                             os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")],
        build_directory=bdir,
        with_cuda=False,
        verbose=False,
    )


class EmuOps:
    """ops object for check_all_ops: guarded copies of every input, guard checks after each op."""

    def __init__(self, mod, offset=0):
        self.m = mod
        self.off = offset

    def _g(self, t):
        return None if t is None else self.m.guarded_clone(t, self.off if t.dim() == 4 else 0)

    def _run(self, fn, *args):
        out = fn(*args)
        self.m.check_guards()
        return out

    def dw_conv_stats(self, x, w, b, act, act_first):
        return tuple(self._run(self.m.dw_conv_stats, self._g(x), self._g(w), self._g(b), act, act_first, self.off))

    def dw_fwd(self, x, w, b, scale, shift, act, act_first, residual):
        return self._run(self.m.dw_fwd, self._g(x), self._g(w), self._g(b), self._g(scale), self._g(shift), act,
                         act_first, residual, self.off)

    def dw_bwd_reduce(self, dy, pre, scale, shift, mean, invstd, act, act_first):
        return tuple(self._run(self.m.dw_bwd_reduce, *[self._g(t) for t in (dy, pre, scale, shift, mean, invstd)],
                               act, act_first))

    def dw_bwd(self, dy, x, pre, w, scale, shift, mean, ca, cb, cd, act, act_first, residual):
        ts = [self._g(t) for t in (dy, x, pre, w, scale, shift, mean, ca, cb, cd)]
        return tuple(self._run(self.m.dw_bwd, *ts, act, act_first, residual, self.off))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cases(quick: bool):
    # (shape, k, dtype, channels_last, act, act_first, residual, bias, offset)
    out = []
    shapes = [(2, 37, 17, 23), (1, 3, 5, 4), (2, 40, 9, 33)]
    ks = [1, 3, 5, 7, 9, 11, 13, 15, 17]
    for i, (shape, k, dt, cl) in enumerate(itertools.product(shapes, ks, DTYPES, [False, True])):
        act = i % 7
        out.append((shape, k, dt, cl, act, bool(i % 2), bool((i // 2) % 2), bool((i // 3) % 2 == 0), 0))
    if quick:
        out = out[::5]
    # every activation/order for one shape, both layouts, vector and misaligned paths
    for act, af, cl, off in itertools.product(range(7), [False, True], [False, True], [0, 1]):
        out.append(((2, 16, 12, 16), 7, torch.bfloat16, cl, act, af, True, True, off))
    # larger tiles: several W tiles, several strips per thread, multi-item backward blocks
    out.append(((1, 2, 20, 70), 9, torch.float32, False, 2, True, True, True, 0))
    out.append(((1, 2, 300, 16), 5, torch.float16, False, 1, False, False, True, 0))
    out.append(((3, 70, 10, 10), 15, torch.float32, True, 4, False, True, True, 0))
    out.append(((2, 64, 32, 32), 7, torch.bfloat16, False, 2, True, True, True, 0))
    out.append(((2, 64, 32, 32), 9, torch.bfloat16, True, 2, True, True, True, 0))
    out = [c + ((),) for c in out]
    # The FMA kernels where the tensor-core ones are the default (eval k=9, k=7 channels_last; training
    # k=9 channels_last), and both plans of the channels_last FMA backward (with and without room for the
    # cp.async copies of its tile).
    fma = (("CONVMIXER_KERNELS_DW_MMA", "0"),)
    out.append(((2, 64, 32, 32), 9, torch.bfloat16, True, 2, True, True, True, 0, fma))
    out.append(((2, 37, 17, 23), 9, torch.float16, False, 1, False, True, True, 0, fma))
    out.append(((2, 16, 12, 16), 7, torch.bfloat16, True, 3, True, True, False, 1, fma))
    out.append(((2, 40, 16, 16), 9, torch.bfloat16, True, 2, False, True, True, 0,
                fma + (("CONVMIXER_KERNELS_DW_BWD_COPIES", "1"),)))
    out.append(((2, 40, 16, 16), 7, torch.float16, True, 4, True, False, True, 0,
                (("CONVMIXER_KERNELS_DW_BWD_COPIES", "0"),)))
    # The channels_last backward with dpre computed while staging (CONVMIXER_KERNELS_DW_BWD_DPRE=0; the
    # default takes it from the fp32 dpre pass where the plan has the copies and 4 | C, NCHW: 4 | W), and the pass
    # with fp32 storage (whose plan is forced to the copies) and several items per block (its tiles
    # alternate between two buffers).
    out.append(((2, 16, 12, 16), 7, torch.bfloat16, True, 3, False, True, True, 0,
                (("CONVMIXER_KERNELS_DW_BWD_DPRE", "0"),)))
    out.append(((3, 36, 10, 10), 5, torch.float32, True, 2, True, True, True, 0,
                (("CONVMIXER_KERNELS_DW_BWD_COPIES", "1"), ("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "3"))))
    out.append(((4, 40, 9, 7), 3, torch.float16, True, 4, False, False, False, 0, ()))
    out.append(((2, 36, 9, 11), 5, torch.bfloat16, True, 2, True, True, True, 0,  # 4 | C, 8 does not: scalar pass
                (("CONVMIXER_KERNELS_DW_BWD_COPIES", "1"),)))
    # NCHW (the pass where 4 | W): the staging path kept, several items per block through the copy space
    out.append(((2, 16, 12, 16), 7, torch.float16, False, 2, True, True, True, 0,
                (("CONVMIXER_KERNELS_DW_BWD_DPRE", "0"),)))
    out.append(((3, 8, 20, 12), 5, torch.float32, False, 4, False, True, True, 0,
                (("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "3"),)))
    # The tensor-core forward (dw_mma.cu, CONVMIXER_KERNELS_DW_MMA=require: it runs or the op fails):
    # odd sizes (scalar staging), the 16-byte path, misaligned starts, several row tiles per plane,
    # several items per block (the cp.async ring wraps), every k it serves, both dtypes.
    mma = (("CONVMIXER_KERNELS_DW_MMA", "require"),)
    ring = mma + (("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "9"),)
    out.append(((2, 37, 17, 23), 7, torch.bfloat16, False, 2, True, True, True, 0, mma))
    out.append(((2, 5, 17, 23), 9, torch.float16, False, 1, False, True, False, 0, mma))
    out.append(((2, 16, 12, 16), 3, torch.float16, False, 4, True, False, True, 0, mma))
    out.append(((2, 16, 12, 16), 5, torch.bfloat16, False, 3, False, True, True, 1, mma))
    out.append(((2, 8, 32, 32), 7, torch.bfloat16, False, 2, True, True, True, 0, mma))
    out.append(((1, 2, 300, 16), 5, torch.float16, False, 0, True, True, True, 0, mma))
    out.append(((13, 3, 8, 8), 9, torch.bfloat16, False, 2, False, True, True, 0, ring))
    out.append(((13, 3, 9, 10), 3, torch.float16, False, 1, True, False, True, 0, ring))
    out.append(((1, 3, 5, 4), 9, torch.bfloat16, False, 2, True, True, True, 0, mma))  # image < kernel
    # channels_last: C a multiple of 8 (16-byte pixels) or not (plain loads), misaligned, several groups
    # of 8 channels, several row tiles, the raw ring wrapping
    cl1, cl_ring = mma, ring
    out.append(((2, 16, 12, 16), 7, torch.bfloat16, True, 2, True, True, True, 0, cl1))
    out.append(((2, 37, 17, 23), 5, torch.float16, True, 3, False, True, False, 0, cl1))
    out.append(((2, 16, 9, 11), 9, torch.bfloat16, True, 4, True, False, True, 1, cl1))
    out.append(((1, 8, 150, 20), 3, torch.bfloat16, True, 1, False, True, True, 0, cl1))
    out.append(((7, 8, 8, 8), 7, torch.float16, True, 2, True, True, True, 0, cl_ring))
    out.append(((1, 3, 5, 4), 9, torch.float16, True, 0, False, True, True, 0, cl1))
    # its backward computing dpre while staging (by default it takes the fp32 dpre pass's), both paths
    staged = (("CONVMIXER_KERNELS_DW_BWD_DPRE", "0"),)
    out.append(((2, 16, 12, 16), 9, torch.bfloat16, True, 2, True, True, True, 0, cl1 + staged))
    out.append(((2, 37, 17, 23), 5, torch.float16, True, 3, False, True, False, 0, cl1 + staged))
    # W = 64 at k=9: the pass's fourth buffer slot does not fit, the plan falls back to the staging
    out.append(((1, 8, 16, 64), 9, torch.bfloat16, True, 2, True, True, True, 0, cl1))
    # The channels_last backward with its weight-gradient partials in registers (dw_bwd_cl_regs.cuh;
    # =require: it runs or the op fails): every k it serves, every dtype, a partial row tile (12 rows in 8-row
    # tiles), a partial column tile (W = 33), a partial channel group (C = 40), fewer rows than a tile (H = 5:
    # 5 warps), several items per block (its two dpre tiles alternate), a misaligned start, the 32x32 images of
    # the benchmarks; then =1 where it does not apply (k = 9; 4 does not divide C): the other kernels.
    regs = (("CONVMIXER_KERNELS_DW_BWD_REGS", "require"),)
    out.append(((2, 16, 12, 16), 7, torch.bfloat16, True, 2, True, True, True, 0, regs))
    out.append(((2, 40, 9, 33), 5, torch.float16, True, 3, False, True, False, 0, regs))
    out.append(((3, 36, 5, 10), 3, torch.float32, True, 4, True, False, True, 0,
                regs + (("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "3"),)))
    out.append(((3, 40, 12, 20), 7, torch.bfloat16, True, 2, True, True, True, 1,  # 12 items: a partial last run
                regs + (("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", "5"),)))
    out.append(((2, 16, 12, 16), 7, torch.float16, True, 6, False, True, True, 1, regs))
    out.append(((2, 64, 32, 32), 7, torch.bfloat16, True, 1, True, True, True, 0, regs))
    regs1 = (("CONVMIXER_KERNELS_DW_BWD_REGS", "1"),)
    out.append(((2, 16, 12, 16), 9, torch.bfloat16, True, 2, True, True, True, 0, regs1))
    out.append(((2, 37, 9, 11), 7, torch.bfloat16, True, 5, False, True, True, 0, regs1))
    return out


def pw_cases(quick: bool):
    # (N, C, H, W, dtype, channels_last, act, act_first, bias, offset): odd C and HW (scalar paths),
    # multiples of 8 (16-byte vectors), misaligned starts, several chunks per channel (R > 1).
    out = []
    shapes = [(2, 37, 5, 7), (2, 64, 8, 8), (3, 40, 33, 64), (1, 3, 1, 1)]
    for i, (shape, dt, cl) in enumerate(itertools.product(shapes, DTYPES, [False, True])):
        out.append((*shape, dt, cl, i % 7, bool(i % 2), bool((i // 2) % 2 == 0), i % 3 == 2))
    return out[::3] if quick else out


def check_pw(mod, case, seed):
    """Stats (pre, mean, var), bn_act and dpre (+ its sums) of the emulated CUDA passes against the spec."""
    from convmixer_kernels import torch_ops as T

    N, C, H, W, dt, cl, act, af, has_bias, off = case
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if cl else torch.contiguous_format
    # a channel mean far from its first value, the case a single shifted pass got wrong
    raw = (torch.randn(N, C, H, W, generator=g) * 0.5 + torch.linspace(-3, 3, C).view(1, C, 1, 1))
    raw[0, :, 0, 0] += 4.0
    gemm = raw.to(dt).contiguous(memory_format=fmt)
    bias = torch.randn(C, generator=g) if has_bias else None
    pre, mean, var = mod.pw_stats(mod.guarded_clone(gemm, off), bias, act, af, off)
    mod.check_guards()
    want_pre = (gemm.float() + bias.view(1, C, 1, 1) if has_bias else gemm.float()).to(dt)
    assert torch.equal(pre, want_pre), "pre differs from round(gemm + bias)"
    u = T.act_fwd(want_pre.double(), act) if af else want_pre.double()
    m64, v64 = u.mean(dim=(0, 2, 3)), u.var(dim=(0, 2, 3), correction=0)
    scale_v = max(1.0, float(u.abs().max()))
    assert (mean.double() - m64).abs().max() <= 8e-7 * scale_v, f"mean off by {(mean.double() - m64).abs().max():.3g}"
    rel = ((var.double() - v64).abs() / v64.clamp_min(1e-30)).max()
    assert rel <= 2e-6, f"var off by {rel:.3g} (relative)"
    scale = torch.rand(C, generator=g) + 0.5
    shift = torch.randn(C, generator=g)
    res = torch.randn(N, C, H, W, generator=g).to(dt).contiguous(memory_format=fmt)
    for r in (None, res):  # without and with the residual (the depthwise block's training forward)
        y = mod.pw_bn_act(mod.guarded_clone(pre, off), None, scale, shift, act, af, off,
                          None if r is None else mod.guarded_clone(r, off))
        mod.check_guards()
        # the 2x rule (tests/oracle.py): the spec in dtype D (ATen's own kernels) against the spec in fp64
        check_2x(f"bn_act (residual={r is not None})", y, T.bn_act_fwd(pre, scale, shift, act, af, r),
                 T.bn_act_fwd(pre.double(), scale.double(), shift.double(), act, af,
                              None if r is None else r.double()), dt)
    dy = torch.randn(N, C, H, W, generator=g).to(dt).contiguous(memory_format=fmt)
    ca, cb, cd = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1, torch.randn(C, generator=g) * 0.1
    want = T.bn_act_bwd(dy, pre, scale, shift, mean, ca, cb, cd, act, af)
    want64 = T.bn_act_bwd(dy.double(), pre.double(), *(v.double() for v in (scale, shift, mean, ca, cb, cd)), act, af)
    for cm in ([False, True] if not cl else [False]):
        d, dsum = mod.pw_dpre(mod.guarded_clone(dy, off), mod.guarded_clone(pre, off), scale, shift, mean, ca, cb, cd,
                              act, af, cm, off)
        mod.check_guards()
        cmaj = (lambda t: t.permute(1, 0, 2, 3).reshape(C, N * H * W)) if cm else (lambda t: t)
        check_2x(f"dpre (channel_major={cm})", d, cmaj(want), cmaj(want64), dt)
        s_ref = d.double().sum(dim=1) if cm else d.double().sum(dim=(0, 2, 3))
        assert ((dsum.double() - s_ref).abs() <= 1e-5 * (1 + s_ref.abs())).all(), "dpre channel sums differ"


class HostOps:
    """ops object for pw_op_cases and dw_op_cases: the host functions of csrc/cuda/{pw,dw}.cpp themselves
    (emu_host_*.cpp) on CPU tensors."""

    def __init__(self, mod):
        self.m = mod

    def __getattr__(self, name):
        return getattr(self.m, "host_" + name)

    def bn_act_fwd(self, pre, scale, shift, act, act_first, residual=None):
        return self.m.host_bn_act_fwd(pre, scale, shift, act, act_first, residual)


def host_cases(quick: bool):
    # ("pw", (N, C_in, C_out, H, W), dtype, channels_last, act, act_first, residual, bias) and
    # ("stem", p, (H, W), dtype, channels_last, act, act_first): the GPU tests' shapes; the stem's K = 3*p*p
    # is 12, 147, 588, 48: padded to 16 bytes (16, 152, 592, 48 in 16-bit types; 12, 148, 588, 48 in fp32).
    out = []
    pw_shapes = [(2, 37, 53, 5, 7), (2, 64, 64, 8, 8)]
    for i, (shape, dt, cl) in enumerate(itertools.product(pw_shapes, DTYPES, [False, True])):
        out.append(("pw", shape, dt, cl, i % 7, bool(i % 2), bool((i // 2) % 2), bool((i // 3) % 2 == 0)))
    stems = [(2, (9, 7)), (7, (17, 16)), (14, (30, 29)), (4, (32, 32))]
    for i, ((p, hw), dt, cl) in enumerate(itertools.product(stems, DTYPES, [False, True])):
        out.append(("stem", p, hw, dt, cl, (2, 4, 0)[i % 3], i % 3 != 1))
    # ("dw", shape, k, dtype, channels_last, act, act_first, residual, bias)
    for i, (k, dt, cl) in enumerate(itertools.product([3, 7, 9], DTYPES, [False, True])):
        out.append(("dw", (2, 37, 17, 23), k, dt, cl, i % 7, bool(i % 2), bool((i // 2) % 2), i % 3 != 2))
    out = out[::3] if quick else out
    return out + [("cutlass_env",), ("act_edges",), ("regs_env",), ("size_limits",)]


_POISONED = [("CONVMIXER_KERNELS_POISON_OUTPUTS", "1")]  # every output of the C++ ops starts as NaN


def check_host(mod, case, seed):
    """The ops of csrc/cuda/pw.cpp (checks, GEMMs, im2col, passes) and dw.cpp (checks, workspace, launches)
    against the spec, as the GPU tests run them, with every output starting as NaN."""
    from pw_op_cases import check_pw_ops, check_stem_ops, make_pw_inputs

    with env_set(_POISONED):
        if case[0] == "pw":
            _, shape, dt, cl, act, af, residual, bias = case
            inp = make_pw_inputs(*shape, dt, "cpu", channels_last=cl, residual=residual, bias=bias, seed=seed)
            check_pw_ops(HostOps(mod), inp, act, af, dt, cl)
        elif case[0] == "dw":
            _, shape, k, dt, cl, act, af, residual, bias = case
            inp = make_inputs(*shape, k, dt, "cpu", channels_last=cl, bias=bias, seed=seed)
            check_all_ops(HostOps(mod), inp, act, af, residual, dt, cl)
        elif case[0] == "cutlass_env":
            _check_cutlass_env(mod)
        elif case[0] == "regs_env":
            _check_regs_env(mod)
        elif case[0] == "size_limits":
            # dw.cpp: the grids count C * (k*k + 1) blocks in 32 bits; one channel more than that allows at k = 31
            # raises naming the weight (the weight's 8.6 GB are never touched: only its shape is read)
            C = 2147483647 // 962 + 1
            x = torch.empty(1, C, 1, 1, dtype=torch.bfloat16)
            try:
                mod.host_dw_conv_stats(x, torch.empty(C, 1, 31, 31), None, 2, True)
            except RuntimeError as e:
                assert "weight: C*(k*k + 1) = " in str(e) and "at most 2232311 channels at k = 31" in str(e), str(e)
            else:
                raise AssertionError("a weight past the grids' 32-bit block counts was accepted")
        elif case[0] == "act_edges":
            from pw_op_cases import check_act_edges

            for dt in DTYPES:
                check_act_edges(HostOps(mod).bn_act_fwd, mod.host_bn_act_bwd, "cpu", dt)
        else:
            _, p, (h, w), dt, cl, act, af = case
            inp = make_pw_inputs(2, 3, 53 if p == 7 else 24, h, w, dt, "cpu", channels_last=cl, stem_p=p, seed=seed)
            check_stem_ops(HostOps(mod), inp, act, af, dt, cl)


def _check_regs_env(mod):
    """dw.cpp and dw_launch.cu's gate of the channels_last backward with register partials
    (CONVMIXER_KERNELS_DW_BWD_REGS): where it does not apply (k = 9; 4 does not divide C; NCHW; the dpre pass
    turned off) =1 gives the other kernels' bits and =require raises naming the variable; where it applies,
    =1 and =require give the same bits, which differ from the default kernel's (a different plan, so a
    different grouping of the weight-gradient sums): so =1 did switch kernels."""
    ops = HostOps(mod)

    def bwd(inp):
        return ops.dw_bwd(*[inp[a] for a in BWD_ARGS], 2, True, True)

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b))

    def planned(shape, k, cl):  # the plan's regs flag (last entry of the emulator's plan())
        return bool(mod.plan(*shape, k, cl, 2, True)[-1])

    fits = make_inputs(2, 16, 12, 16, 7, torch.bfloat16, "cpu", channels_last=True, bias=True, seed=5)
    base = bwd(fits)
    assert not planned((2, 16, 12, 16), 7, True), "the register partials planned without being asked for"
    with env_set([("CONVMIXER_KERNELS_DW_BWD_REGS", "1")]):
        on = bwd(fits)
        assert planned((2, 16, 12, 16), 7, True), "=1: the register partials not planned where they apply"
    with env_set([("CONVMIXER_KERNELS_DW_BWD_REGS", "require")]):
        req = bwd(fits)
    assert same(on, req), "=1 and =require ran different kernels where the register partials apply"
    assert not same(on, base), "=1 gave the default kernel's bits: the register partials did not run"
    for what, shape, k, cl, env in (("k = 9", (2, 16, 12, 16), 9, True, []),
                                    ("C = 37", (2, 37, 9, 11), 7, True, []),
                                    ("NCHW", (2, 16, 12, 16), 7, False, []),
                                    ("no dpre pass", (2, 16, 12, 16), 7, True,
                                     [("CONVMIXER_KERNELS_DW_BWD_DPRE", "0")])):
        inp = make_inputs(*shape, k, torch.bfloat16, "cpu", channels_last=cl, bias=True, seed=6)
        with env_set(env):
            want = bwd(inp)
        with env_set(env + [("CONVMIXER_KERNELS_DW_BWD_REGS", "1")]):
            assert same(bwd(inp), want), f"{what}: =1 changed the results where the register partials do not apply"
            assert not planned(shape, k, cl), f"{what}: the register partials planned"
        with env_set(env + [("CONVMIXER_KERNELS_DW_BWD_REGS", "require")]):
            try:
                bwd(inp)
            except RuntimeError as e:
                assert "CONVMIXER_KERNELS_DW_BWD_REGS=require" in str(e), f"{what}: {e}"
            else:
                raise AssertionError(f"{what}: =require ran")


def _check_cutlass_env(mod):
    """pw.cpp's gate of the CUTLASS GEMMs of the pointwise and stem ops (cutlass_mode, cutlass_unfit) in a
    build without them, as on the CPU and on GPUs other than compute capability 9.0: =1 takes the usual path
    (the same bits as unset), =require raises naming the variable and why, a bad schedule name raises naming
    its variable."""
    from pw_op_cases import make_pw_inputs

    pw = make_pw_inputs(2, 64, 72, 5, 7, torch.bfloat16, "cpu", channels_last=True, seed=3)
    st = make_pw_inputs(2, 3, 72, 30, 29, torch.bfloat16, "cpu", channels_last=True, stem_p=7, seed=4)
    ops = [lambda: mod.host_pw_gemm_stats(pw["x"], None, pw["weight"], pw["bias"], 2, True),
           lambda: mod.host_pw_fwd(pw["x"], None, pw["weight"], pw["bias"], pw["scale"], pw["shift"], 2, True),
           lambda: mod.host_stem_gemm_stats(st["x"], st["weight"], st["bias"], 2, True),
           lambda: mod.host_stem_fwd(st["x"], st["weight"], st["bias"], st["scale"], st["shift"], 2, True)]
    flat = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    for i, op in enumerate(ops):
        want = flat(op())
        with env_set([("CONVMIXER_KERNELS_PW_CUTLASS", "1")]):
            got = flat(op())
        assert all(torch.equal(a, b) for a, b in zip(want, got)), \
            f"op {i}: CONVMIXER_KERNELS_PW_CUTLASS=1 without CUTLASS changed the results"
        for pairs, expect in (([("CONVMIXER_KERNELS_PW_CUTLASS", "require")], "=require: the CUTLASS pointwise GEMM"
                               " does not apply: not in this build"),
                              ([("CONVMIXER_KERNELS_PW_CUTLASS", "1"), ("CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE",
                                                                        "pinpong")],
                               "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE must be unset")):
            with env_set(pairs):
                try:
                    op()
                except RuntimeError as e:
                    assert expect in str(e), f"op {i}: {e}"
                else:
                    raise AssertionError(f"op {i} ran under {pairs}")


def bn_cases():
    # (C, gamma/beta given, momentum): fewer channels than a block's threads, several blocks (params,
    # coefs) and several trips of the one-block running update; momentum None is the cumulative average.
    return [(37, True, 0.1), (600, False, None), (1, True, None), (257, True, 1.0)]


def check_bn(mod, case, seed):
    """The BatchNorm ops (csrc/cuda/bn.cpp and its kernels, outputs starting as NaN) against the formulas in
    float64 (the 2x rule against PyTorch's float32 ops of convmixer_kernels.ops/functional), bitwise against
    the extension's CPU ops when it is built (one formula, csrc/bn_math.h), num_batches_tracked incremented
    exactly once and the running statistics' version counters bumped."""
    with env_set(_POISONED):
        _check_bn(mod, case, seed)


def _check_bn(mod, case, seed):
    from convmixer_kernels import functional, ops

    C, affine, momentum = case
    g = torch.Generator().manual_seed(seed)
    mean, var = torch.randn(C, generator=g) * 3, torch.rand(C, generator=g) * 4 + 1e-3
    gamma, beta = (torch.randn(C, generator=g), torch.randn(C, generator=g)) if affine else (None, None)
    eps = 1e-5
    got = mod.host_bn_params(mean, var, gamma, beta, eps)
    theirs = ops._bn_scale_shift(C, torch.float32, "cpu", gamma, beta, mean, var, eps, "torch")
    oracle = ops._bn_scale_shift(C, torch.float64, "cpu", None if gamma is None else gamma.double(),
                                 None if beta is None else beta.double(), mean.double(), var.double(), eps, "torch")
    for name, a, b, o in zip(("invstd", "scale", "shift"), got, theirs, oracle):
        check_2x(f"bn_params {name}", a, b, o, torch.float32)
    invstd, scale = got[0], got[1]
    sum_g, sum_gx = torch.randn(C, generator=g) * 50, torch.randn(C, generator=g) * 50
    n = 4 * 17 * 23
    cb, cd = mod.host_bn_bwd_coefs(sum_g, sum_gx, scale, invstd, float(n), True)
    want = (-scale * invstd * sum_gx / n, -scale * sum_g / n)
    want64 = (-scale.double() * invstd.double() * sum_gx.double() / n, -scale.double() * sum_g.double() / n)
    for name, a, b, o in zip(("cb", "cd"), (cb, cd), want, want64):
        check_2x(f"bn_bwd_coefs {name}", a, b, o, torch.float32)
    z = mod.host_bn_bwd_coefs(sum_g, sum_gx, scale, invstd, float(n), False)
    assert all(torch.equal(t, torch.zeros(C)) for t in z), "bn_bwd_coefs without batch statistics: not zeros"
    rm0, rv0 = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    nbt0 = torch.tensor(4, dtype=torch.int64)
    rm, rv, nbt = rm0.clone(), rv0.clone(), nbt0.clone()
    v0 = rm._version
    mod.host_bn_update_running(rm, rv, nbt, mean, var, float(n), momentum)
    assert int(nbt) == 5, f"num_batches_tracked {int(nbt)}, expected 5"
    assert rm._version > v0, "bn_update_running: running_mean's version counter not bumped"
    t_rm, t_rv, t_n = rm0.clone(), rv0.clone(), nbt0.clone()
    functional.update_running_stats(t_rm, t_rv, t_n, mean, var, n, momentum, "torch")
    o_rm, o_rv, o_n = rm0.double(), rv0.double(), nbt0.clone()
    functional.update_running_stats(o_rm, o_rv, o_n, mean.double(), var.double(), n, momentum, "torch")
    check_2x("running_mean", rm, t_rm, o_rm, torch.float32)
    check_2x("running_var", rv, t_rv, o_rv, torch.float32)
    if ops._HAS_BN_OPS:  # the extension's CPU loops: the same formula, so the same bits
        cpu = torch.ops.convmixer_kernels
        assert all(torch.equal(a, b) for a, b in zip(got, cpu.bn_params(mean, var, gamma, beta, eps))), "bn_params"
        assert all(torch.equal(a, b) for a, b in zip((cb, cd), cpu.bn_bwd_coefs(sum_g, sum_gx, scale, invstd,
                                                                                 float(n), True))), "bn_bwd_coefs"
        c_rm, c_rv, c_n = rm0.clone(), rv0.clone(), nbt0.clone()
        cpu.bn_update_running(c_rm, c_rv, c_n, mean, var, float(n), momentum)
        assert torch.equal(c_rm, rm) and torch.equal(c_rv, rv) and int(c_n) == 5, "bn_update_running"


def tile_stats_cases():
    # (M, C, ld, offset): a partial last tile, tiles fewer than and not a multiple of the finalize's 8 warps,
    # C not a multiple of 32 (a partial block) below ld (the GEMM's padded row), one row, misaligned buffers.
    return [(1173, 72, 128, 0), (300, 37, 128, 1), (1, 8, 128, 0), (128 * 20 + 5, 200, 256, 1),
            (128 * 160 + 3, 40, 128, 0)]


def check_tile_stats(mod, case, seed):
    """The finalize of the CUTLASS statistics GEMM (csrc/cuda/pw_cutlass_stats.cuh, which itself runs only on
    a GPU) against the float64 mean and biased variance of u, given per-128-row-tile sums of u and u*u as
    the GEMM's epilogue writes them (fp32; here the exact tile sums rounded once, so what is checked is the
    finalize, which must lose nothing more): fp32 u that is not representable in 16 bits (GELU's output),
    channel means up to 10 over spreads down to 0.3, a partial last tile, tiles fewer than and not a multiple
    of the finalize's warps, C not a multiple of 32 below the padded row length, misaligned buffers; NaN in
    a channel stays NaN.  Bound per channel: what the fp32 rounding of the two partials (2^-25 each,
    relative) allows, 1.5 * 2^-24 * (var + mean^2), and a little room: 2 * 2^-24 * (var + mean^2)."""
    M, C, ld, off = case
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.3
    u = (torch.randn(M, C, generator=g, dtype=torch.float64) * spread + torch.linspace(-10, 10, C, dtype=torch.float64))
    u = u.float()
    if C > 3:
        u[M // 2, 3] = float("nan")
    T = (M + 127) // 128
    tiles = torch.cat([u.double(), torch.zeros(T * 128 - M, C, dtype=torch.float64)]).view(T, 128, C)
    partial = torch.full((2, T, ld), float("nan"))  # the padded columns stay NaN: never read
    partial[0, :, :C] = tiles.sum(dim=1).float()
    partial[1, :, :C] = (tiles * tiles).sum(dim=1).float()
    mean, var = mod.tile_stats_finalize(partial, C, M, off)
    mod.check_guards()
    u64 = u.double()
    m64, v64 = u64.mean(dim=0), u64.var(dim=0, correction=0)
    ok = ~torch.isnan(m64)
    assert torch.equal(torch.isnan(mean), ~ok) and torch.equal(torch.isnan(var), ~ok), "NaN where not expected"
    eps = 2.0 ** -24
    dm = (mean.double() - m64)[ok].abs()
    assert (dm <= 4 * eps * (m64[ok].abs() + v64[ok].sqrt())).all(), f"mean off by {float(dm.max()):.3g}"
    err = (var.double() - v64)[ok].abs()
    bound = 2 * eps * (v64[ok] + m64[ok] ** 2)  # (no division: one row a channel has var 0)
    assert (err <= bound).all(), f"var off by {float((err / bound).max()):.3g} times the bound"


def describe(c):
    shape, k, dt, cl, act, af, res, bias, off, env = c
    extra = "".join(f" {k}={v}" for k, v in env)
    return f"{shape} k={k} {dt} cl={cl} act={act} act_first={af} residual={res} bias={bias} offset={off}{extra}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--smem", type=int, default=232448)
    ap.add_argument("--only", type=str, default="", help="run the cases whose description contains this")
    ap.add_argument("--max", type=int, default=0, help="stop after this many cases")
    args = ap.parse_args()
    t0 = time.time()
    mod = build(args.jobs)
    print(f"built in {time.time() - t0:.0f}s", flush=True)
    mod.set_device(args.sms, args.smem)
    fails = 0
    cs = cases(args.quick)
    if args.only:
        cs = [c for c in cs if args.only in describe(c)]
    if args.max:
        cs = cs[: args.max]
    for n, c in enumerate(cs):
        shape, k, dt, cl, act, af, res, bias, off, env = c
        inp = make_inputs(*shape, k, dt, "cpu", channels_last=cl, bias=bias, seed=n)
        tag = describe(c)
        t1 = time.time()
        try:
            with env_set(env):
                check_all_ops(EmuOps(mod, off), inp, act, af, res, dt, cl)
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"FAIL {tag}: {e}", flush=True)
            continue
        print(f"ok   {tag} ({time.time() - t1:.1f}s)", flush=True)
    total = len(cs)
    for label, more, check in (("pw", pw_cases(args.quick), check_pw), ("bn", bn_cases(), check_bn),
                               ("tile_stats", tile_stats_cases(), check_tile_stats),
                               ("host", host_cases(args.quick), check_host)):
        more = [c for c in more if args.only in f"{label} {c}"] if args.only else more
        total += len(more)
        for n, c in enumerate(more):
            try:
                check(mod, c, n)
            except Exception as e:  # noqa: BLE001
                fails += 1
                print(f"FAIL {label} {c}: {e}", flush=True)
                continue
            print(f"ok   {label} {c}", flush=True)
    print(f"{total - fails}/{total} passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
