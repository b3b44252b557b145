"""The C++ CPU kernels of the depthwise-block ops (csrc/cpu/dw*.cpp) against torch_ops, the spec.

Every case runs all four ops (dw_conv_stats, dw_fwd, dw_bwd_reduce, dw_bwd) through
tests/dw_op_cases.check_all_ops on shapes that break the tiling (C=37, 17x23, a 5x4 image
under a 9x9 kernel, several tiles and channel groups), with outputs poisoned with NaN.
The parametrization is a representative product, not the full cross product: all
activations at one k, all k at one activation, the options (residual, bias) on their own.
Block-level gradcheck lives with the autograd registration, not here.
"""

from __future__ import annotations

import pytest
import torch

from convmixer_kernels import torch_ops

try:
    import convmixer_kernels._C  # noqa: F401  (registers the ops)
except ImportError as e:  # pragma: no cover - only without a build
    pytest.skip(f"convmixer_kernels._C is not built: {e}", allow_module_level=True)

from dw_op_cases import check_all_ops, make_inputs

ops = torch.ops.convmixer_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
LAYOUTS = [False, True]
LAYOUT_IDS = ["nchw", "cl"]
ODD = (2, 37, 17, 23)  # N, C, H, W
TINY = (1, 3, 5, 4)  # smaller than the kernel


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("CONVMIXER_KERNELS_POISON_OUTPUTS", "1")
    monkeypatch.delenv("CONVMIXER_KERNELS_CPU_ISA", raising=False)


def _run(shape, k, dtype, cl, act, act_first, residual, bias=True, seed=0):
    inp = make_inputs(*shape, k, dtype, "cpu", channels_last=cl, bias=bias, seed=seed)
    check_all_ops(ops, inp, act, act_first, residual, dtype, cl)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act_first", [True, False], ids=["act_first", "bn_first"])
@pytest.mark.parametrize("act", range(len(torch_ops.ACTIVATIONS)), ids=list(torch_ops.ACTIVATIONS))
def test_activations(act, act_first, dtype, cl):
    _run(ODD, 5, dtype, cl, act, act_first, residual=True)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [1, 3, 7, 9, 15])
def test_kernel_sizes(k, dtype, cl):
    _run(ODD, k, dtype, cl, act=2, act_first=True, residual=True)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)],
                         ids=["no_residual", "no_bias", "neither"])
@pytest.mark.parametrize("act_first", [True, False], ids=["act_first", "bn_first"])
def test_options(act_first, residual, bias, dtype, cl):
    _run(ODD, 3, dtype, cl, act=4, act_first=act_first, residual=residual, bias=bias)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [9, 15])
def test_kernel_larger_than_image(k, dtype, cl):
    _run(TINY, k, dtype, cl, act=3, act_first=True, residual=True)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize(
    "shape,k",
    [
        ((2, 70, 6, 300), 9),  # CL: wide rows, so several channel groups (32 + 32 + 6)
        ((2, 3, 300, 8), 7),  # tall: row blocks + remainder, row chunks, dweight flushes
        ((3, 21, 19, 13), 15),  # several batch groups, a kernel wider than most of the image
        ((5, 1, 9, 1), 3),  # one channel, one column
    ],
    ids=["channel_groups", "tall", "batch_groups", "thin"],
)
def test_tiling(shape, k, cl):
    _run(shape, k, torch.float32, cl, act=1, act_first=False, residual=True)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_isa_build(isa, dtype, cl, monkeypatch):
    """Each instruction-set build of the kernels (a CPU without one falls back to a lower one)."""
    monkeypatch.setenv("CONVMIXER_KERNELS_CPU_ISA", isa)
    _run(ODD, 7, dtype, cl, act=2, act_first=False, residual=True)
    _run(TINY, 9, dtype, cl, act=4, act_first=True, residual=False, bias=False)


def _all_outputs(inp, act=2, act_first=True, residual=True):
    a = (inp["x"], inp["weight"], inp["bias"])
    out = list(ops.dw_conv_stats(*a, act, act_first))
    out.append(ops.dw_fwd(*a, inp["scale"], inp["shift"], act, act_first, residual))
    out += list(ops.dw_bwd_reduce(inp["dy"], inp["pre"], inp["scale"], inp["shift"], inp["mean"],
                                  inp["invstd"], act, act_first))
    out += list(ops.dw_bwd(inp["dy"], inp["x"], inp["pre"], inp["weight"], inp["scale"], inp["shift"],
                           inp["mean"], inp["ca"], inp["cb"], inp["cd"], act, act_first, residual))
    return out


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(dtype, cl):
    """Bitwise equal outputs run after run, and for any number of threads."""
    inp = make_inputs(3, 70, 30, 21, 7, dtype, "cpu", channels_last=cl)
    first = _all_outputs(inp)
    again = _all_outputs(inp)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _all_outputs(inp)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b, c) in enumerate(zip(first, again, single)):
        assert torch.equal(a, b), f"output {i} differs between two runs"
        assert torch.equal(a, c), f"output {i} differs between {threads} threads and 1"


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
def test_stats_no_cancellation(cl):
    """A large common offset must not wreck the variance (no E[u^2] - E[u]^2)."""
    inp = make_inputs(4, 19, 16, 16, 3, torch.float32, "cpu", channels_last=cl)
    x = inp["x"] + 1000.0
    _, mean, var = ops.dw_conv_stats(x, inp["weight"], inp["bias"], 0, True)
    pre = torch_ops.dw_conv_stats(x.double(), inp["weight"].double(), inp["bias"].double(), 0, True)[0]
    pre = pre.float().double()  # the kernel's pre is rounded to fp32
    want_var = pre.var(dim=(0, 2, 3), unbiased=False)
    want_mean = pre.mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("cl", LAYOUTS, ids=LAYOUT_IDS)
def test_empty_batch(cl):
    inp = make_inputs(1, 5, 6, 7, 3, torch.float32, "cpu", channels_last=cl)
    for name in ("x", "dy", "pre"):
        inp[name] = inp[name][:0]
    pre, mean, var = ops.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 2, True)
    assert pre.shape == (0, 5, 6, 7) and mean.isnan().all() and var.isnan().all()
    y = ops.dw_fwd(inp["x"], inp["weight"], inp["bias"], inp["scale"], inp["shift"], 2, True, True)
    assert y.shape == (0, 5, 6, 7)
    sg, sgx = ops.dw_bwd_reduce(inp["dy"], inp["pre"], inp["scale"], inp["shift"], inp["mean"],
                                inp["invstd"], 2, True)
    assert (sg == 0).all() and (sgx == 0).all()
    dx, dw, db = ops.dw_bwd(inp["dy"], inp["x"], inp["pre"], inp["weight"], inp["scale"], inp["shift"],
                            inp["mean"], inp["ca"], inp["cb"], inp["cd"], 2, True, True)
    assert dx.shape == (0, 5, 6, 7) and (dw == 0).all() and (db == 0).all()


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def inp():
    return make_inputs(2, 4, 6, 5, 3, torch.float32, "cpu")


def _fwd(i, **over):
    a = {**i, **over}
    return ops.dw_fwd(a["x"], a["weight"], a["bias"], a["scale"], a["shift"], 2, True, True)


def _bwd(i, **over):
    a = {**i, **over}
    return ops.dw_bwd(a["dy"], a["x"], a["pre"], a["weight"], a["scale"], a["shift"], a["mean"], a["ca"],
                      a["cb"], a["cd"], 2, True, True)


def _reduce(i, **over):
    a = {**i, **over}
    return ops.dw_bwd_reduce(a["dy"], a["pre"], a["scale"], a["shift"], a["mean"], a["invstd"], 2, True)


def test_bad_ndim(inp):
    with pytest.raises(RuntimeError, match=r"x: expected a 4-D"):
        _fwd(inp, x=inp["x"][0])
    with pytest.raises(RuntimeError, match=r"x: expected a 4-D"):
        ops.dw_conv_stats(inp["x"][0], inp["weight"], inp["bias"], 0, True)


def test_even_kernel(inp):
    w = torch.randn(4, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"weight: expected an odd kernel size"):
        _fwd(inp, weight=w)
    with pytest.raises(RuntimeError, match=r"weight: expected an odd kernel size"):
        _bwd(inp, weight=w)


def test_channel_mismatch(inp):
    with pytest.raises(RuntimeError, match=r"weight: expected shape \(C, 1, k, k\)"):
        _fwd(inp, weight=torch.randn(5, 1, 3, 3))
    with pytest.raises(RuntimeError, match=r"scale: expected shape"):
        _fwd(inp, scale=torch.rand(5))
    with pytest.raises(RuntimeError, match=r"bias: expected shape"):
        ops.dw_conv_stats(inp["x"], inp["weight"], torch.zeros(3), 0, True)
    with pytest.raises(RuntimeError, match=r"cd: expected shape"):
        _bwd(inp, cd=torch.rand(2))
    with pytest.raises(RuntimeError, match=r"invstd: expected shape"):
        _reduce(inp, invstd=torch.rand(8))


def test_wrong_dtypes(inp):
    with pytest.raises(RuntimeError, match=r"weight: expected dtype Float"):
        _fwd(inp, weight=inp["weight"].half())
    with pytest.raises(RuntimeError, match=r"bias: expected dtype Float"):
        _fwd(inp, bias=inp["bias"].double())
    with pytest.raises(RuntimeError, match=r"shift: expected dtype Float"):
        _fwd(inp, x=inp["x"].bfloat16(), shift=inp["shift"].bfloat16())
    with pytest.raises(RuntimeError, match=r"x: expected dtype float32"):
        _fwd(inp, x=inp["x"].to(torch.int32))
    with pytest.raises(RuntimeError, match=r"pre: expected dtype Float"):
        _bwd(inp, pre=inp["pre"].half())
    with pytest.raises(RuntimeError, match=r"dy: expected dtype Half"):
        _reduce(inp, pre=inp["pre"].half(), scale=inp["scale"], dy=inp["dy"])


def test_odd_strides(inp):
    x = torch.randn(2, 4, 6, 10)[..., ::2]  # neither NCHW- nor channels_last-contiguous
    with pytest.raises(RuntimeError, match=r"x: expected an NCHW-contiguous or channels_last"):
        _fwd(inp, x=x)
    with pytest.raises(RuntimeError, match=r"dy: expected an NCHW-contiguous or channels_last"):
        _bwd(inp, dy=torch.randn(2, 4, 6, 10)[..., ::2])
    with pytest.raises(RuntimeError, match=r"scale: expected a contiguous tensor"):
        _fwd(inp, scale=torch.rand(8)[::2])


def test_mismatched_layout(inp):
    cl = torch.channels_last
    with pytest.raises(RuntimeError, match=r"dy: expected the memory format of x"):
        _bwd(inp, dy=inp["dy"].contiguous(memory_format=cl))
    with pytest.raises(RuntimeError, match=r"pre: expected the memory format of x"):
        _bwd(inp, pre=inp["pre"].contiguous(memory_format=cl))
    with pytest.raises(RuntimeError, match=r"dy: expected the memory format"):
        _reduce(inp, pre=inp["pre"].contiguous(memory_format=cl))
    with pytest.raises(RuntimeError, match=r"dy: expected shape"):
        _bwd(inp, dy=inp["dy"][:1])


def test_bad_activation(inp):
    with pytest.raises(RuntimeError, match=r"act: expected an activation code"):
        ops.dw_fwd(inp["x"], inp["weight"], inp["bias"], inp["scale"], inp["shift"], 7, True, True)
