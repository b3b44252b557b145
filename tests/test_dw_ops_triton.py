"""The Triton depthwise ops (convmixer_kernels/triton/dw.py) against the torch_ops spec.

On a machine without CUDA the kernels run on CPU tensors under the Triton interpreter:
TRITON_INTERPRET=1 must be set before the kernels are decorated, i.e. before
convmixer_kernels.triton.dw (or triton) is first imported, so it is set here at import time.
It only affects Triton, which only this test module uses.  The interpreter is slow (each
kernel op costs ~0.1 ms), so shapes are small and the parameters are a representative product,
not the full cross product; the odd shapes break every tile boundary.  Under the interpreter
fp32 -> bf16 casts truncate (the GPU rounds to nearest), so bf16 results can be one ulp off;
the OP_TOL bound of dw_op_cases covers that unchanged.

On a GPU every (op, k, layout, dtype, shape-specialization) compiles once: the whole file is
about 150 compiles.  For a short device check select e.g. -k "odd_shapes or bitwise or determ".
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from convmixer_kernels import torch_ops  # noqa: E402
from convmixer_kernels.triton import dw  # noqa: E402
from dw_op_cases import check_all_ops, make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not dw._is_interpreted():
    raise ImportError("convmixer_kernels.triton.dw was imported before TRITON_INTERPRET=1 was set, "
                      "so its kernels cannot run on CPU; set the variable in conftest.py or before "
                      "the first import of the Triton backend")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = [False, True]
LAYOUT_IDS = ["nchw", "cl"]
BWD_ARGS = ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
REDUCE_ARGS = ("dy", "pre", "scale", "shift", "mean", "invstd")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("CONVMIXER_KERNELS_POISON_OUTPUTS", "1")


def _run(shape, k, dtype, cl, act, act_first, residual, bias=True, seed=0):
    N, C, H, W = shape
    inp = make_inputs(N, C, H, W, k, dtype, DEVICE, channels_last=cl, bias=bias, seed=seed)
    check_all_ops(dw, inp, act, act_first, residual, dtype, cl)


# Every activation in both orders for every dtype and layout, k = 3.
@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("act", [0, 1, 2, 3, 4, 5, 6])
def test_ops_activations(act, dtype, cl):
    seed = act + 5 * DTYPES.index(dtype)
    _run((2, 5, 7, 9), 3, dtype, cl, act, act_first=True, residual=act % 2 == 0, seed=seed)
    _run((2, 5, 7, 9), 3, dtype, cl, act, act_first=False, residual=act % 2 == 1,
         bias=act != 2, seed=seed + 100)


# Kernel sizes, with and without bias; k = 31 (the largest) on an image smaller than the kernel.
@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("k,shape,dtype,act,act_first,residual,bias", [
    (1, (2, 6, 5, 7), torch.float32, 4, True, True, True),
    (1, (1, 6, 5, 7), torch.bfloat16, 1, False, False, False),
    (7, (2, 4, 9, 10), torch.float16, 2, True, True, False),
    (9, (1, 4, 10, 11), torch.bfloat16, 3, False, True, True),
    (9, (2, 3, 6, 7), torch.float32, 2, False, False, True),
    (31, (1, 2, 6, 5), torch.float32, 2, True, True, True),
], ids=["k1-fp32", "k1-bf16", "k7-fp16", "k9-bf16", "k9-fp32-small", "k31-fp32"])
def test_ops_kernel_sizes(k, shape, dtype, act, act_first, residual, bias, cl):
    _run(shape, k, dtype, cl, act, act_first, residual, bias=bias, seed=k)


# Shapes that break every tile boundary: C = 37 is not a multiple of any channel block, 17 x 23
# not of any spatial tile; a 5 x 4 image under a 9 x 9 kernel.
@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape,k,dtype", [
    ((2, 37, 17, 23), 7, torch.bfloat16),
    ((1, 3, 5, 4), 9, torch.float32),
    ((1, 3, 5, 4), 9, torch.float16),
], ids=["2x37x17x23-k7-bf16", "1x3x5x4-k9-fp32", "1x3x5x4-k9-fp16"])
def test_ops_odd_shapes(shape, k, dtype, cl):
    _run(shape, k, dtype, cl, act=2, act_first=True, residual=True)


# Tiny tiles and several tiles per program: exercises the per-program merge of tile statistics,
# the fixed-order reduction of many partials, and tiles that straddle images.
@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("act_first", [True, False], ids=["act_first", "bn_first"])
def test_ops_small_tiles(monkeypatch, act_first, cl):
    monkeypatch.setattr(dw, "_TILE_OVERRIDE", {"BA": 4, "BB": 4, "TPP": 3})
    _run((2, 5, 5, 6), 5, torch.float32, cl, act=4 if act_first else 3, act_first=act_first,
         residual=True, seed=7)


def test_ops_mixed_scale_statistics():
    # A large common offset: the statistics must not cancel catastrophically (Welford/Chan).
    inp = make_inputs(2, 4, 8, 8, 3, torch.float32, DEVICE, seed=3)
    inp["bias"] = inp["bias"] + 1000.0
    _, mean, var = dw.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 0, True)
    cpu = {k: v.cpu() for k, v in inp.items() if v is not None}
    _, want_mean, want_var = torch_ops.dw_conv_stats(cpu["x"].double(), cpu["weight"].double(),
                                                     cpu["bias"].double(), 0, True)
    torch.testing.assert_close(mean.cpu().double(), want_mean, rtol=1e-6, atol=0)
    # pre is rounded to fp32 near 1000 (ulp 6e-5), so var is only that accurate
    torch.testing.assert_close(var.cpu().double(), want_var, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
def test_fwd_recomputes_pre_bitwise(cl):
    # dw_fwd with the identity affine and activation is pre itself: it must equal
    # dw_conv_stats' pre bit for bit (the backward relies on it).
    inp = make_inputs(2, 5, 7, 9, 5, torch.bfloat16, DEVICE, channels_last=cl, seed=11)
    pre, _, _ = dw.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 2, True)
    one = torch.ones_like(inp["scale"])
    y = dw.dw_fwd(inp["x"], inp["weight"], inp["bias"], one, torch.zeros_like(one), 0, False, False)
    assert torch.equal(y, pre)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
def test_deterministic(monkeypatch, cl):
    monkeypatch.setattr(dw, "_TILE_OVERRIDE", {"BA": 8, "BB": 4, "TPP": 2})
    inp = make_inputs(2, 5, 5, 6, 3, torch.float16, DEVICE, channels_last=cl, seed=5)
    a = [inp[n] for n in BWD_ARGS]

    def run_all():
        return (*dw.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 2, True),
                dw.dw_fwd(inp["x"], inp["weight"], inp["bias"], inp["scale"], inp["shift"], 2,
                          True, True),
                *dw.dw_bwd_reduce(inp["dy"], inp["pre"], inp["scale"], inp["shift"], inp["mean"],
                                  inp["invstd"], 2, True),
                *dw.dw_bwd(*a, 2, True, True))

    first, second = run_all(), run_all()
    for i, (p, q) in enumerate(zip(first, second)):
        assert torch.equal(p, q), f"output {i} differs between two runs"


def test_empty_batch():
    inp = make_inputs(0, 3, 4, 5, 3, torch.float32, DEVICE, seed=1)
    pre, mean, var = dw.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 1, True)
    assert pre.shape == (0, 3, 4, 5) and mean.isnan().all() and var.isnan().all()
    dx, dweight, dbias = dw.dw_bwd(*[inp[n] for n in BWD_ARGS], 1, True, True)
    assert dx.shape == (0, 3, 4, 5)
    for t in (dweight, dbias, *dw.dw_bwd_reduce(*[inp[n] for n in REDUCE_ARGS], 1, True)):
        assert torch.equal(t, torch.zeros_like(t))


# ---------------------------------------------------------------------------------------------
# Bad inputs: each error names the argument.
# ---------------------------------------------------------------------------------------------


def _base():
    return make_inputs(1, 3, 4, 5, 3, torch.float32, DEVICE, seed=2)


def _fwd(d, **over):
    d = {**d, **over}
    return dw.dw_fwd(d["x"], d["weight"], d["bias"], d["scale"], d["shift"], d.get("act", 2),
                     d.get("act_first", True), d.get("residual", True))


def _bwd(d, **over):
    d = {**d, **over}
    return dw.dw_bwd(d["dy"], d["x"], d["pre"], d["weight"], d["scale"], d["shift"], d["mean"],
                     d["ca"], d["cb"], d["cd"], 2, True, True)


def _reduce(d, **over):
    d = {**d, **over}
    return dw.dw_bwd_reduce(d["dy"], d["pre"], d["scale"], d["shift"], d["mean"], d["invstd"], 2,
                            d.get("act_first", True))


BAD = [
    ("x-fp64", lambda d: _fwd(d, x=d["x"].double()), "x: float64"),
    ("x-int", lambda d: _fwd(d, x=d["x"].to(torch.int32)), "x: expected dtype"),
    ("x-3d", lambda d: _fwd(d, x=d["x"][0]), "x: expected a 4-D"),
    ("x-strided", lambda d: _fwd(d, x=d["x"].transpose(2, 3)), "x: expected an NCHW-contiguous"),
    ("weight-dtype", lambda d: _fwd(d, weight=d["weight"].half()), "weight: expected dtype"),
    ("weight-shape", lambda d: _fwd(d, weight=d["weight"][:2]), "weight: expected shape"),
    ("weight-even-k", lambda d: _fwd(d, weight=torch.zeros(3, 1, 4, 4, device=DEVICE)),
     "weight: expected an odd kernel size"),
    ("weight-k33", lambda d: _fwd(d, weight=torch.zeros(3, 1, 33, 33, device=DEVICE)),
     "weight: expected an odd kernel size"),
    ("weight-noncontig", lambda d: _fwd(d, weight=d["weight"].transpose(2, 3)),
     "weight: expected a contiguous"),
    ("bias-shape", lambda d: _fwd(d, bias=d["bias"][:2]), "bias: expected shape"),
    ("scale-dtype", lambda d: _fwd(d, scale=d["scale"].double()), "scale: expected dtype"),
    ("shift-noncontig", lambda d: _fwd(d, shift=torch.zeros(6, device=DEVICE)[::2]),
     "shift: expected a contiguous"),
    ("act-range", lambda d: _fwd(d, act=7), "act: expected an activation code"),
    ("residual-type", lambda d: _fwd(d, residual=1), "residual: expected a bool"),
    ("dy-dtype", lambda d: _bwd(d, dy=d["dy"].half()), "dy: expected dtype"),
    ("dy-shape", lambda d: _bwd(d, dy=d["dy"][:, :, :3]), "dy: expected shape"),
    ("pre-format", lambda d: _bwd(d, pre=d["pre"].contiguous(memory_format=torch.channels_last)),
     "pre: expected the memory format of x"),
    ("cd-shape", lambda d: _bwd(d, cd=d["cd"][:1]), "cd: expected shape"),
    ("reduce-dy-fp64", lambda d: _reduce(d, dy=d["dy"].double()), "dy: float64"),
    ("reduce-pre-dtype", lambda d: _reduce(d, pre=d["pre"].half()), "pre: expected dtype"),
    ("reduce-invstd-shape", lambda d: _reduce(d, invstd=d["invstd"][:2]), "invstd: expected shape"),
    ("reduce-act_first-type", lambda d: _reduce(d, act_first=None), "act_first: expected a bool"),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(_base())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_device():
    d = make_inputs(1, 3, 4, 5, 3, torch.float32, "cuda", seed=2)
    with pytest.raises(ValueError, match="scale: expected a tensor on cuda"):
        _fwd(d, scale=d["scale"].cpu())
    if not dw._is_interpreted():
        with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
            _fwd({k: (v.cpu() if v is not None else None) for k, v in d.items()})


def test_size_limits():
    """Offsets are int64: an image of more than 2^31 elements passes the checks (tests/test_large_index.py
    runs one through the kernels on a GPU); what stays int32 (pixel indices, a tap's shift by rows of C*W
    elements) is checked with an error that names x and the limit.  The tensors are never written, so
    their pages are never touched."""
    big = torch.empty(1, 3, 27000, 27000, dtype=torch.bfloat16, device=DEVICE)  # 2.19e9 elements
    assert dw._check_x(big) is False
    big_cl = torch.empty(1, 3, 27000, 27000, dtype=torch.bfloat16, device=DEVICE, memory_format=torch.channels_last)
    assert dw._check_x(big_cl) is True
    del big, big_cl
    with pytest.raises(ValueError, match=r"x: one image row of 70000 x 1000 elements .*31\*C\*W"):
        dw._check_x(torch.empty(1, 70000, 1, 1000, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match=r"x: N\*H\*W = 2147483648 pixels"):
        dw._check_x(torch.empty(2, 1, 32768, 32768, dtype=torch.bfloat16, device=DEVICE))
    # the weight's int32 offsets (channel times k*k, tap row times C): C*(k*k + 1) <= 2^31 - 1 (meta tensors:
    # a weight that size would take 8.6 GB)
    C = 2147483647 // 962 + 1
    x_m = torch.empty(1, C, 1, 1, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"weight: C\*\(k\*k \+ 1\) = .* at most 2232311 channels at k = 31"):
        dw._check_weight(torch.empty(C, 1, 31, 31, device="meta"), x_m)
    assert dw._check_weight(torch.empty(C - 1, 1, 31, 31, device="meta"), x_m[:, :C - 1]) == 31
