"""The C++ CPU kernels of the pointwise / stem / elementwise-BN ops (csrc/cpu/pw.cpp), op by op
against convmixer_kernels.torch_ops (the executable spec), on shapes that break every tile: C_in=37,
C_out=53, M = 2*5*7 rows; stems whose input is not a multiple of the patch size.  Every output starts
as NaN (poison); both memory formats; fp32, fp16, bf16, fp64.  The vectorized epilogues and their
ATen-composite fallback (CONVMIXER_KERNELS_CPU_ISA=avx2 / default) are all covered."""

from __future__ import annotations

import pytest
import torch

from convmixer_kernels import _ext, torch_ops
from pw_op_cases import check_act_edges, check_bn_act_ops, check_pw_ops, check_stem_ops, make_pw_inputs

pytestmark = [pytest.mark.skipif(not _ext.loaded(), reason=f"extension not built: {_ext.load_error}"),
              pytest.mark.usefixtures("poison")]

DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16,
                                                            torch.float64)]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="cl")]
ACTS = [pytest.param(a, id=n) for n, a in torch_ops.ACTIVATIONS.items()]
ORDERS = [pytest.param(True, id="act_first"), pytest.param(False, id="bn_first")]


def ops():
    return torch.ops.convmixer_kernels


@pytest.fixture(params=[pytest.param("native", id="vec"), pytest.param("avx2", id="avx2"),
                        pytest.param("default", id="composite")])
def isa(request, monkeypatch):
    """The vectorized epilogues of the widest instruction set here (AVX-512 where the CPU has it), of
    AVX2, and the ATen-composite path used without AVX2 (a CPU without an ISA falls back lower)."""
    if request.param == "native":
        monkeypatch.delenv("CONVMIXER_KERNELS_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("CONVMIXER_KERNELS_CPU_ISA", request.param)
    return request.param


COMBOS = [(False, True), (True, True), (True, False), (False, False)]  # (residual t, bias)


@pytest.mark.parametrize("act_first", ORDERS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pw_ops(dtype, channels_last, act, act_first):
    """Every activation and order; the (t, bias) combination rotates so each dtype and layout sees all four."""
    residual, bias = COMBOS[(act + 2 * act_first) % 4]
    inp = make_pw_inputs(2, 37, 53, 5, 7, dtype, "cpu", channels_last=channels_last, bias=bias,
                         residual=residual, seed=act)
    check_pw_ops(ops(), inp, act, act_first, dtype, channels_last)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual,bias", COMBOS, ids=["bias", "t+bias", "t", "plain"])
def test_pw_ops_residual_and_bias(dtype, channels_last, residual, bias):
    inp = make_pw_inputs(2, 37, 53, 5, 7, dtype, "cpu", channels_last=channels_last, bias=bias, residual=residual,
                         seed=7)
    for act, act_first in ((2, True), (4, False)):
        check_pw_ops(ops(), inp, act, act_first, dtype, channels_last)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pw_ops_square_and_composite(dtype, channels_last, isa):
    """C_in = C_out = 64; M = 2*12*12 = 288 rows (three channels_last statistics chunks)."""
    for act, act_first, residual in ((2, True, True), (4, False, False), (3, True, False)):
        inp = make_pw_inputs(2, 64, 64, 12, 12, dtype, "cpu", channels_last=channels_last, residual=residual)
        check_pw_ops(ops(), inp, act, act_first, dtype, channels_last)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,H,W", [(2, 9, 7), (7, 17, 16), (14, 30, 29), (4, 8, 8)])
def test_stem_ops(dtype, channels_last, p, H, W, isa):
    for act, act_first, bias, need_dx in ((2, True, True, True), (1, False, False, False), (4, True, True, False)):
        inp = make_pw_inputs(2, 3, 24, H, W, dtype, "cpu", channels_last=channels_last, bias=bias, stem_p=p)
        check_stem_ops(ops(), inp, act, act_first, dtype, channels_last, need_dx=need_dx)


def test_stem_dx_zero_beyond_last_patch_and_empty_without_need_dx():
    inp = make_pw_inputs(1, 3, 8, 17, 16, torch.float32, "cpu", stem_p=7)
    args = [inp[k] for k in ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")]
    dx, dw, db = ops().stem_bwd(*args, 2, True, True)
    assert dx[:, :, 14:, :].abs().max() == 0 and dx[:, :, :, 14:].abs().max() == 0
    assert dx[:, :, :14, :14].abs().max() > 0
    dx2, dw2, db2 = ops().stem_bwd(*args, 2, True, False)
    assert dx2.shape == (0,) and torch.equal(dw, dw2) and torch.equal(db, db2)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_ops_odd_shape(dtype, channels_last, isa):
    """N=3, C=19, 7x9: partial vectors along channels (channels_last) and along pixels (NCHW)."""
    for act in range(len(torch_ops.ACTIVATIONS)):
        inp = make_pw_inputs(3, 5, 19, 7, 9, dtype, "cpu", channels_last=channels_last, seed=act)
        check_bn_act_ops(ops(), inp, act, act % 2 == 0, dtype, channels_last)


@pytest.mark.parametrize("act", ACTS)
def test_activations_on_a_dense_grid(act, isa):
    """Each activation's vectorized float code (csrc/cpu/act_vec.h: erf from Abramowitz & Stegun 7.1.26 on
    ATen's polynomial exp, tanh from exp) on 400k points of [-12, 12] and on the tails: its largest error
    against the fp64 result, relative where |value| > 1 and absolute below (the oracle rule's scale, per
    element), is at most 2x that of PyTorch's own float32 activation plus a 2-ulp floor.  A NaN stays NaN.
    (Measured: gelu 2.6e-7 against PyTorch's 1.1e-6; a rational erf without exp, tried for speed, gave
    7.8e-7 here and a 10x larger relative error on the negative tail, so erf keeps its exp.)"""
    fns = {0: lambda t: t, 1: torch.relu, 2: torch.nn.functional.gelu,
           3: lambda t: torch.nn.functional.gelu(t, approximate="tanh"), 4: torch.nn.functional.silu,
           5: torch.nn.functional.relu6, 6: torch.nn.functional.hardswish}
    fn = fns[act]
    x = torch.cat([torch.linspace(-12, 12, 400_001), torch.linspace(-30, 30, 1001), torch.tensor([0.0, 1e-30, -1e-30])])
    nan = torch.tensor([float("nan")])
    one, zero = torch.ones(1), torch.zeros(1)
    got = ops().bn_act_fwd(torch.cat([x, nan]).view(1, 1, 1, -1), one, zero, act, True).view(-1)
    assert torch.isnan(got[-1])
    got = got[:-1].double()
    want = fn(x.double())
    theirs = fn(x).double()
    scale = want.abs().clamp_min(1.0)
    ours_err = ((got - want).abs() / scale).max().item()
    torch_err = ((theirs - want).abs() / scale).max().item()
    bound = 2 * torch_err + 2 * torch.finfo(torch.float32).eps
    assert ours_err <= bound, (ours_err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_activation_edges_match_pytorch(dtype):
    """relu, relu6, hardswish at their kinks and ends (0, 6, -3, 3, +-inf): forward and gradient as PyTorch's,
    in the CPU kernels and in the spec."""
    check_act_edges(ops().bn_act_fwd, ops().bn_act_bwd, "cpu", dtype)
    check_act_edges(torch_ops.bn_act_fwd, torch_ops.bn_act_bwd, "cpu", dtype)


def test_stats_with_large_mean_are_accurate():
    """pre ~ 1000 + N(0, 1): a naive sum of squares in fp32 would lose var entirely."""
    for cl in (False, True):
        inp = make_pw_inputs(4, 16, 8, 20, 20, torch.float32, "cpu", channels_last=cl, bias=True)
        bias = torch.full((8,), 1000.0)
        pre, mean, var = ops().pw_gemm_stats(inp["x"], None, inp["weight"], bias, 0, True)
        p64 = pre.double()
        want_var = p64.var(dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(mean.double(), p64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
        assert torch.allclose(var.double(), want_var, rtol=2e-3, atol=0), (var, want_var)


@pytest.fixture
def threads():
    """At least two intra-op threads (the kernels split shapes this large into several tasks)."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_parallel_shapes_and_determinism(channels_last, threads):
    """A shape that several tasks share (9 channels_last statistics chunks, 144 planes): correct, bitwise the
    same run after run (fixed-order reductions, no atomics), and the GEMM-free reductions (dbias, the
    elementwise ops) bitwise the same on one thread."""
    o = ops()
    inp = make_pw_inputs(2, 48, 72, 24, 24, torch.bfloat16, "cpu", channels_last=channels_last, residual=True)
    check_pw_ops(o, inp, 2, True, torch.bfloat16, channels_last)
    stem = make_pw_inputs(2, 3, 40, 58, 60, torch.float32, "cpu", channels_last=channels_last, stem_p=4)
    check_stem_ops(o, stem, 4, False, torch.float32, channels_last)
    i, s = inp, stem

    def run():
        return [*o.pw_gemm_stats(i["x"], i["t"], i["weight"], i["bias"], 2, True),
                o.pw_fwd(i["x"], i["t"], i["weight"], i["bias"], i["scale"], i["shift"], 4, False),
                *o.pw_bwd(i["dy"], i["x"], i["t"], i["pre"], i["weight"], i["scale"], i["shift"], i["mean"],
                          i["ca"], i["cb"], i["cd"], 2, True),
                *o.stem_gemm_stats(s["x"], s["weight"], s["bias"], 2, False),
                *o.stem_bwd(s["dy"], s["x"], s["pre"], s["weight"], s["scale"], s["shift"], s["mean"], s["ca"],
                            s["cb"], s["cd"], 2, True, True),
                o.bn_act_fwd(i["pre"], i["scale"], i["shift"], 3, True),
                o.bn_act_bwd(i["dy"], i["pre"], i["scale"], i["shift"], i["mean"], i["ca"], i["cb"], i["cd"], 4,
                             False)]

    first = run()
    for a, b in zip(first, run()):
        assert torch.equal(a, b)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run()
    finally:
        torch.set_num_threads(n)
    for k in (6, 12, 13, 14):  # pw_bwd dbias, stem_bwd dbias, bn_act_fwd, bn_act_bwd
        assert torch.equal(first[k], one[k]), k


# ----------------------------------------------------------------------------------------------
# Bad inputs: a RuntimeError that names the argument.

def _pw_args(**over):
    i = make_pw_inputs(2, 6, 5, 3, 4, torch.float32, "cpu", residual=True)
    i.update(over)
    return i


def _expect(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_bad_inputs_pw():
    o = ops()
    i = _pw_args()
    fwd = lambda **k: o.pw_fwd(*[k.get(n, i[n]) for n in ("x", "t", "weight", "bias", "scale", "shift")],  # noqa: E731
                               k.get("act", 2), True)
    _expect("weight: expected dtype", lambda: fwd(weight=i["weight"].double()))
    _expect("weight: expected shape", lambda: fwd(weight=torch.randn(5, 7, 1, 1)))
    _expect("weight: expected shape", lambda: fwd(weight=torch.randn(5, 6, 3, 3)))
    _expect("weight: expected a contiguous", lambda: fwd(weight=torch.randn(6, 5, 1, 1).transpose(0, 1)))
    _expect("bias: expected dtype", lambda: fwd(bias=i["bias"].half()))
    _expect(r"bias: expected shape \(5,\)", lambda: fwd(bias=torch.randn(6)))
    _expect(r"scale: expected shape \(5,\)", lambda: fwd(scale=torch.randn(4)))
    _expect("shift: expected a contiguous", lambda: fwd(shift=torch.randn(10)[::2]))
    _expect("t: expected shape", lambda: fwd(t=i["t"][:, :, :2]))
    _expect("t: expected dtype", lambda: fwd(t=i["t"].half()))
    _expect("t: expected the memory format", lambda: fwd(t=i["t"].contiguous(memory_format=torch.channels_last)))
    _expect("x: expected dtype", lambda: fwd(x=i["x"].int()))
    _expect("x: expected a 4-D", lambda: fwd(x=i["x"][0]))
    _expect("x: expected an NCHW-contiguous or channels_last", lambda: fwd(x=i["x"].transpose(2, 3)))
    _expect("act: expected an activation code", lambda: fwd(act=7))
    st = lambda **k: o.pw_gemm_stats(*[k.get(n, i[n]) for n in ("x", "t", "weight", "bias")], 0, True)  # noqa: E731
    _expect("weight: expected dtype", lambda: st(weight=i["weight"].half()))
    names = ("dy", "x", "t", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    bwd = lambda **k: o.pw_bwd(*[k.get(n, i[n]) for n in names], 2, True)  # noqa: E731
    _expect("dy: expected shape", lambda: bwd(dy=i["x"]))
    _expect("dy: expected the memory format", lambda: bwd(dy=i["dy"].contiguous(memory_format=torch.channels_last)))
    _expect("pre: expected dtype", lambda: bwd(pre=i["pre"].double()))
    _expect(r"cd: expected shape \(5,\)", lambda: bwd(cd=torch.zeros(6)))
    _expect("mean: expected dtype", lambda: bwd(mean=i["mean"].double()))


def test_bad_inputs_stem_and_bn_act():
    o = ops()
    s = make_pw_inputs(1, 3, 4, 9, 9, torch.float32, "cpu", stem_p=3)
    _expect("weight: expected shape", lambda: o.stem_fwd(s["x"], torch.randn(4, 3, 3, 2), s["bias"], s["scale"],
                                                         s["shift"], 2, True))
    _expect("weight: expected shape", lambda: o.stem_gemm_stats(s["x"][:, :2], s["weight"], None, 2, True))
    _expect("x: expected H and W >= p", lambda: o.stem_gemm_stats(s["x"][:, :, :2].contiguous(), s["weight"], None,
                                                                  2, True))
    names = ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    _expect("pre: expected shape", lambda: o.stem_bwd(*[s[n] if n != "pre" else s["x"] for n in names], 2, True,
                                                      True))
    i = _pw_args()
    _expect("pre: expected dtype", lambda: o.bn_act_fwd(i["pre"].int(), i["scale"], i["shift"], 2, True))
    _expect(r"scale: expected shape \(5,\)", lambda: o.bn_act_fwd(i["pre"], i["scale"][:3], i["shift"], 2, True))
    _expect("residual: expected the memory format",
            lambda: o.bn_act_fwd(i["pre"], i["scale"], i["shift"], 2, True,
                                 i["dy"].contiguous(memory_format=torch.channels_last)))
    _expect("residual: expected dtype", lambda: o.bn_act_fwd(i["pre"], i["scale"], i["shift"], 2, True, i["dy"].double()))
    _expect("dy: expected the memory format",
            lambda: o.bn_act_bwd(i["dy"].contiguous(memory_format=torch.channels_last), i["pre"], i["scale"],
                                 i["shift"], i["mean"], i["ca"], i["cb"], i["cd"], 2, True))
    _expect("act: expected an activation code",
            lambda: o.bn_act_bwd(i["dy"], i["pre"], i["scale"], i["shift"], i["mean"], i["ca"], i["cb"], i["cd"],
                                 -1, True))
