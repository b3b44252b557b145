"""CUDA kernels of the pointwise / stem / elementwise-BN ops, op by op against torch_ops (the spec).

Shapes break every tiling: C_in=37 -> C_out=53 with H*W = 35 (the scalar paths), 64 -> 64 with
H*W = 64 (the 16-byte vector paths of both layouts), and a larger case that splits each channel
over several blocks.  Outputs start as NaN (poison), so an element a kernel forgets fails."""

from __future__ import annotations

import pytest
import torch

from convmixer_kernels import _ext, torch_ops
from pw_op_cases import (assert_close_op, check_act_edges, check_bn_act_ops, check_pw_ops, check_stem_ops,
                         make_pw_inputs)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _ext.built_with_cuda(), reason="extension built without CUDA kernels"),
]

OPS = torch.ops.convmixer_kernels
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="cl")]
ACTS = [pytest.param(a, id=n) for n, a in torch_ops.ACTIVATIONS.items()]
ORDERS = [pytest.param(True, id="act_first"), pytest.param(False, id="bn_first")]
# (N, C_in, C_out, H, W)
PW_SHAPES = [pytest.param((2, 37, 53, 5, 7), id="odd"), pytest.param((2, 64, 64, 8, 8), id="vec")]


@pytest.fixture(autouse=True)
def _fp32_gemm_without_tf32():
    assert not torch.backends.cuda.matmul.allow_tf32, "the fp32 tolerances assume IEEE fp32 GEMMs"


@pytest.mark.parametrize("shape", PW_SHAPES)
@pytest.mark.parametrize("act_first", ORDERS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("cl", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pw_ops(poison, dtype, cl, act, act_first, shape):
    inp = make_pw_inputs(*shape, dtype, "cuda", channels_last=cl, residual=True, seed=act)
    check_pw_ops(OPS, inp, act, act_first, dtype, cl)


@pytest.mark.parametrize("residual,bias", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("shape", PW_SHAPES + [pytest.param((3, 24, 40, 17, 23), id="multi_block"),
                                               pytest.param((4, 32, 48, 32, 32), id="multi_chunk")])
@pytest.mark.parametrize("cl", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pw_ops_options(poison, dtype, cl, shape, residual, bias):
    inp = make_pw_inputs(*shape, dtype, "cuda", channels_last=cl, residual=residual, bias=bias, seed=1)
    check_pw_ops(OPS, inp, 2, True, dtype, cl)
    check_pw_ops(OPS, inp, 1, False, dtype, cl)


@pytest.mark.parametrize("p,hw", [(2, (9, 7)), (7, (17, 16)), (14, (30, 29)), (4, (32, 32))])
@pytest.mark.parametrize("act,act_first", [(2, True), (4, False), (0, True)])
@pytest.mark.parametrize("cl", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stem_ops(poison, dtype, cl, act, act_first, p, hw):
    c_out = 53 if p == 7 else 64
    inp = make_pw_inputs(2, 3, c_out, *hw, dtype, "cuda", channels_last=cl, stem_p=p, seed=p)
    check_stem_ops(OPS, inp, act, act_first, dtype, cl, need_dx=True)


@pytest.mark.parametrize("cl", LAYOUTS)
def test_stem_without_dx_and_without_bias(poison, cl):
    inp = make_pw_inputs(2, 3, 48, 17, 16, torch.bfloat16, "cuda", channels_last=cl, bias=False, stem_p=7)
    check_stem_ops(OPS, inp, 3, False, torch.bfloat16, cl, need_dx=False)
    dx = OPS.stem_bwd(*[inp[k] for k in ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")],
                      3, False, False)[0]
    assert dx.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_unaligned_storage(poison, dtype):
    """pre/dy starting one element into their storage: the launchers must fall back to scalar access."""
    inp = make_pw_inputs(2, 64, 64, 8, 8, dtype, "cuda")
    for k in ("pre", "dy"):
        buf = torch.empty(inp[k].numel() + 1, dtype=dtype, device="cuda")
        view = buf[1:].view(inp[k].shape)
        view.copy_(inp[k])
        assert view.data_ptr() % 16 != 0
        inp[k] = view
    for act in range(len(torch_ops.ACTIVATIONS)):
        check_bn_act_ops(OPS, inp, act, act % 2 == 0, dtype, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_edges_match_pytorch(dtype):
    """relu, relu6, hardswish at their kinks and ends: forward and gradient as PyTorch's."""
    check_act_edges(OPS.bn_act_fwd, OPS.bn_act_bwd, "cuda", dtype)


@pytest.mark.parametrize("cl", LAYOUTS)
def test_deterministic(cl):
    inp = make_pw_inputs(4, 96, 128, 24, 20, torch.bfloat16, "cuda", channels_last=cl, residual=True, seed=3)
    n_stats = ("x", "t", "weight", "bias")
    n_bwd = ("dy", "x", "t", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    runs = []
    for _ in range(2):
        out = OPS.pw_gemm_stats(*[inp[k] for k in n_stats], 2, True)
        out += OPS.pw_bwd(*[inp[k] for k in n_bwd], 2, True)
        runs.append(out)
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"output {i} differs between two runs"


def _pw_args(cl=False, **over):
    inp = make_pw_inputs(2, 8, 6, 5, 5, torch.float32, "cuda", channels_last=cl, residual=True)
    inp.update(over)
    return inp


def test_bad_inputs():
    inp = _pw_args()
    stats = lambda d, act=2: OPS.pw_gemm_stats(d["x"], d["t"], d["weight"], d["bias"], act, True)  # noqa: E731
    with pytest.raises(RuntimeError, match="weight: expected a tensor on cuda"):
        stats({**inp, "weight": inp["weight"].cpu()})
    with pytest.raises(RuntimeError, match="bias: expected a tensor on cuda"):
        stats({**inp, "bias": inp["bias"].cpu()})
    with pytest.raises(RuntimeError, match="x: expected a CUDA tensor"):
        stats({**inp, "x": inp["x"].cpu()})
    with pytest.raises(RuntimeError, match="x: expected dtype float32, float16 or bfloat16"):
        stats({**inp, "x": inp["x"].double(), "t": None, "weight": inp["weight"].double()})
    with pytest.raises(RuntimeError, match="weight: expected dtype"):
        stats({**inp, "weight": inp["weight"].half()})
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        stats({**inp, "weight": inp["weight"][:, :4]})
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        stats({**inp, "bias": inp["bias"][:5]})
    with pytest.raises(RuntimeError, match="bias: expected dtype float32"):
        stats({**inp, "bias": inp["bias"].half()})
    with pytest.raises(RuntimeError, match="t: expected shape"):
        stats({**inp, "t": inp["t"][:1]})
    with pytest.raises(RuntimeError, match="t: expected the memory format of x"):
        stats({**inp, "t": inp["t"].contiguous(memory_format=torch.channels_last)})
    with pytest.raises(RuntimeError, match="x: expected an NCHW-contiguous or channels_last-contiguous"):
        stats({**inp, "x": inp["x"].transpose(2, 3), "t": None})
    with pytest.raises(RuntimeError, match="act: expected an activation code"):
        stats(inp, act=7)
    with pytest.raises(RuntimeError, match="scale: expected shape"):
        OPS.pw_fwd(inp["x"], None, inp["weight"], None, inp["scale"][:3], inp["shift"], 1, True)
    bwd = ("dy", "x", "t", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    args = [inp[k] for k in bwd]
    args[0] = inp["dy"].contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="dy: expected the memory format of x"):
        OPS.pw_bwd(*args, 1, True)
    with pytest.raises(RuntimeError, match="pre: expected shape"):
        OPS.pw_bwd(*[inp[k] if k != "pre" else inp["x"] for k in bwd], 1, True)
    with pytest.raises(RuntimeError, match="cd: expected a tensor on cuda"):
        OPS.pw_bwd(*[inp[k] if k != "cd" else inp["cd"].cpu() for k in bwd], 1, True)
    with pytest.raises(RuntimeError, match="dy: expected dtype"):
        OPS.bn_act_bwd(inp["dy"].half(), inp["pre"], *[inp[k] for k in ("scale", "shift", "mean", "ca", "cb", "cd")],
                       1, True)
    with pytest.raises(RuntimeError, match="pre: expected a CUDA tensor"):
        OPS.bn_act_fwd(inp["pre"].cpu(), inp["scale"], inp["shift"], 1, True)
    with pytest.raises(RuntimeError, match="residual: expected shape"):
        OPS.bn_act_fwd(inp["pre"], inp["scale"], inp["shift"], 1, True, inp["dy"][:, :, :1])
    sx = make_pw_inputs(1, 3, 4, 14, 14, torch.float32, "cuda", stem_p=7)
    with pytest.raises(RuntimeError, match="weight: expected shape \\(C_out, C_img, p, p\\)"):
        OPS.stem_fwd(sx["x"], sx["weight"][:, :, :, :3], None, sx["scale"], sx["shift"], 1, True)
    with pytest.raises(RuntimeError, match="weight: expected shape \\(C_out, C_img, p, p\\)"):
        OPS.stem_gemm_stats(sx["x"][:, :2], sx["weight"], None, 1, True)


def _cutlass_runs_here():
    return _ext.build_info().get("cutlass") == "1" and torch.cuda.get_device_capability() == (9, 0)


_NEEDS_CUTLASS = pytest.mark.skipif(
    not torch.cuda.is_available() or not _ext.built_with_cuda() or not _cutlass_runs_here(),
    reason="the CUTLASS pointwise GEMMs need a build with them (9.0a) and a compute capability 9.0 GPU")


@_NEEDS_CUTLASS
@pytest.mark.parametrize("shape,bias,residual", [(pytest.param((3, 64, 72, 17, 23), True, False, id="odd_M")),
                                                 (pytest.param((2, 256, 128, 32, 32), False, False, id="no_bias")),
                                                 (pytest.param((2, 40, 264, 9, 7), True, True, id="t_N264"))])
@pytest.mark.parametrize("act_first", ORDERS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("schedule", ["cooperative", "pingpong"])
def test_pw_cutlass(poison, monkeypatch, schedule, dtype, act, act_first, shape, bias, residual):
    """pw_fwd as one CUTLASS GEMM with the epilogue fused, in both of its schedules, and pw_gemm_stats as one
    with the batch statistics in its epilogue (=require: they run, or the op raises).  C_out 264: a partial
    128-column tile of the statistics' partials."""
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "require")
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE", schedule)
    inp = make_pw_inputs(*shape, dtype, "cuda", channels_last=True, residual=residual, bias=bias, seed=act)
    check_pw_ops(OPS, inp, act, act_first, dtype, True)


@_NEEDS_CUTLASS
@pytest.mark.parametrize("p,hw", [(2, (9, 7)), (7, (30, 29)), (4, (32, 32)), (4, (64, 61))])
@pytest.mark.parametrize("act_first", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_stem_cutlass(poison, monkeypatch, dtype, act_first, p, hw):
    """The stem's GEMMs through CUTLASS (=require): the patch matrix's K = 3*p*p (12, 147, 48) padded to 16
    bytes, rows of the remainder dropped, M from 24 to 480 (several 128-row tiles, a partial last one), both
    forwards; the backward is unchanged (cuBLAS)."""
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "require")
    inp = make_pw_inputs(2, 3, 72, *hw, dtype, "cuda", channels_last=True, stem_p=p, seed=p)
    for act in (1, 2):
        check_stem_ops(OPS, inp, act, act_first, dtype, True)


@_NEEDS_CUTLASS
@pytest.mark.parametrize("act", [2, 4], ids=["gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("act_first", ORDERS)
def test_pw_cutlass_stats_far_mean(monkeypatch, dtype, act_first, act):
    """The statistics GEMM sums u and u*u per tile in fp32, which cancels where a channel's mean is far from
    its spread (for GELU/SiLU u is unrounded fp32, so u*u is not exact): channel means of 20-60 over a spread
    near 1 (a large bias), M = 1173 (a partial last tile, whose rows past M must not count), against the
    float64 statistics of the same pre.  Bound: 2 * 2^-24 * (mean^2 / var + 1) per fp32 add of a 128-long
    chain, relative to var, i.e. what fp32 sums of u and u*u can lose, far below what rounding u to the
    storage dtype costs PyTorch's own statistics (2^-9 or 2^-12 of the mean, squared, over var)."""
    from convmixer_kernels import torch_ops as T

    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "require")
    inp = make_pw_inputs(3, 64, 96, 17, 23, dtype, "cuda", channels_last=True, seed=11)
    inp["bias"] = torch.linspace(20.0, 60.0, 96, device="cuda")
    pre, mean, var = OPS.pw_gemm_stats(inp["x"], None, inp["weight"], inp["bias"], act, act_first)
    want_pre = torch_ops.pw_gemm_stats(inp["x"].cpu(), None, inp["weight"].cpu(), inp["bias"].cpu(), act,
                                       act_first)[0]
    assert_close_op("pw_gemm_stats pre", pre, want_pre.cuda(), dtype, True)
    u = pre.double().cpu()
    u = T.act_fwd(u, act) if act_first else u
    m64, v64 = u.mean(dim=(0, 2, 3)), u.var(dim=(0, 2, 3), correction=0)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    bound = 2 * 128 * 2.0 ** -24 * (m64 * m64 / v64 + 1)
    rel_v = (var.double().cpu() - v64).abs() / v64
    assert (rel_v <= bound).all(), f"var off by {float(rel_v.max()):.3g} relative (bound {float(bound.min()):.3g}+)"
    rel_m = (mean.double().cpu() - m64).abs() / m64.abs()
    assert (rel_m <= 4 * 2.0 ** -24 * 128).all(), f"mean off by {float(rel_m.max()):.3g} relative"


@_NEEDS_CUTLASS
@pytest.mark.parametrize("order", ["act_norm", "norm_act"])
def test_pw_cutlass_block_far_mean(monkeypatch, order, poison):
    """A whole pointwise block through the CUTLASS GEMMs with conv biases of 20-60 (channel means far from
    their spread), GELU, fp16 (the dtype whose own rounding is smallest against the sums' cancellation),
    against the fp64 oracle with the 2x rule: output, every gradient, running statistics."""
    import block_harness as harness
    from test_pw_block import _x, pw

    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "require")
    blk = pw(64, 72, activation="gelu", order=order)
    with torch.no_grad():
        blk.conv.bias.copy_(torch.linspace(20.0, 60.0, 72))
    harness.compare(blk, [_x(3, 64, 17, 23)], "cuda", "cuda", torch.float16, layout="channels_last")


@_NEEDS_CUTLASS
def test_pw_cutlass_stats_deterministic(monkeypatch):
    """The statistics GEMM's per-tile partials and their fixed-order finalize: the same bits run after run."""
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "require")
    inp = make_pw_inputs(8, 128, 192, 24, 20, torch.bfloat16, "cuda", channels_last=True, seed=5)
    runs = [OPS.pw_gemm_stats(inp["x"], None, inp["weight"], inp["bias"], 1, True) for _ in range(3)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r)), "pw_gemm_stats differs between runs"


def test_pw_cutlass_schedule_names_bad_value(monkeypatch):
    """A schedule the build does not have is an error naming the variable, not a silent default."""
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "1")
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE", "pinpong")
    inp = make_pw_inputs(2, 64, 64, 8, 8, torch.bfloat16, "cuda", channels_last=True)
    with pytest.raises(RuntimeError, match="CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE"):
        OPS.pw_fwd(inp["x"], None, inp["weight"], inp["bias"], inp["scale"], inp["shift"], 2, True)
