"""The fused pointwise block (1x1 conv + act + BN, with the ConvMixer residual sum fused into the GEMM
input) and the patch-embedding stem against the float64 oracle, every backend."""

from __future__ import annotations

import copy

import pytest
import torch

import block_harness as harness
import convmixer_kernels as ck
from block_harness import randomize_bn, run
from conftest import backend_params
from convmixer_kernels.modules import FusedPatchEmbed, FusedPointwiseBlock

BACKENDS = backend_params()
ACTS = ["gelu", "gelu_tanh", "relu", "silu", "identity", "relu6", "hardswish"]


def pw(c_in, c_out, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(FusedPointwiseBlock(c_in, c_out, **kw), seed)


def stem(dim, p, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(FusedPatchEmbed(dim, p, **kw), seed)


def _x(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _with_residual(m, x, t):
    return m(x, residual=t)


def _ref_with_residual(m, x, t):
    return m(x + t)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pw_dtypes_layouts(backend, device, dtype, layout, training, poison, triton_cpu):
    harness.compare(pw(37, 53), [_x(2, 37, 5, 7)], backend, device, dtype, training=training, layout=layout)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pw_fused_residual_input(backend, device, dtype, training, poison, triton_cpu):
    harness.compare(pw(24, 24), [_x(2, 24, 6, 5), _x(2, 24, 6, 5, seed=2)], backend, device, dtype,
                    training=training, layout="channels_last", fused_call=_with_residual, ref_call=_ref_with_residual)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("order", ["act_norm", "norm_act"])
def test_pw_activations_orders(backend, device, activation, order, poison, triton_cpu):
    harness.compare(pw(16, 16, activation=activation, order=order), [_x(2, 16, 4, 5)], backend, device,
                    torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opts", [dict(bias=False), dict(affine=False), dict(track_running_stats=False),
                                  dict(momentum=None)], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_pw_options(backend, device, opts, poison, triton_cpu):
    steps = 2 if "momentum" in opts else 1
    harness.compare(pw(16, 20, **opts), [_x(2, 16, 5, 3)], backend, device, torch.float32, steps=steps)
    harness.compare(pw(16, 20, **opts), [_x(2, 16, 5, 3)], backend, device, torch.float32, training=False,
                    layout="noncontig")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("p,hw", [(2, (9, 7)), (7, (17, 16)), (14, (30, 29))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stem(backend, device, p, hw, dtype, layout, poison, triton_cpu):
    for training in (True, False):
        harness.compare(stem(24, p), [_x(2, 3, *hw)], backend, device, dtype, training=training, layout=layout)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stem_relu_norm_act(backend, device, poison, triton_cpu):
    harness.compare(stem(16, 4, activation="relu", order="norm_act"), [_x(3, 3, 9, 10)], backend, device,
                    torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device, triton_cpu):
    for blk, x in ((pw(32, 48), _x(2, 32, 7, 9)), (stem(32, 7), _x(2, 3, 30, 29))):
        blk, x = blk.to(device), x.to(device)
        with torch.no_grad(), ck.backend(backend):
            dy = torch.ones(copy.deepcopy(blk).eval()(x).shape, device=device)
        outs = []
        for _ in range(2):
            with ck.backend(backend):
                outs.append(run(copy.deepcopy(blk), [x], dy, True))
        for n in outs[0]:
            assert torch.equal(outs[0][n], outs[1][n]), f"{n} differs between two identical runs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the CUTLASS pointwise GEMMs run on compute capability 9.0 only")
@pytest.mark.parametrize("order", ["act_norm", "norm_act"])
def test_pw_cutlass_block(monkeypatch, order, poison):
    """A pointwise block through the CUTLASS GEMMs (the training forward's statistics in its epilogue, the
    eval forward fused whole), bf16 channels_last, against the fp64 oracle with the 2x rule: outputs, every
    gradient and the running statistics over two training steps, then eval."""
    from convmixer_kernels import _ext

    if _ext.build_info().get("cutlass") != "1":
        pytest.skip("this build has no CUTLASS pointwise GEMMs")
    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "require")
    blk = pw(64, 72, activation="gelu", order=order)
    harness.compare(blk, [_x(3, 64, 17, 23)], "cuda", "cuda", torch.bfloat16, layout="channels_last", steps=2)
    harness.compare(blk, [_x(3, 64, 17, 23)], "cuda", "cuda", torch.bfloat16, layout="channels_last",
                    training=False)


def test_gradcheck_cpu_float64():
    from convmixer_kernels import _ext

    torch.manual_seed(0)
    for backend in ["torch"] + (["cpu"] if _ext.loaded() else []):
        for training in (True, False):
            x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
            t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
            w = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
            ws = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
            b = torch.randn(4, dtype=torch.float64, requires_grad=True)
            gw = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()
            gb = torch.randn(4, dtype=torch.float64, requires_grad=True)
            stats = lambda: (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))  # noqa: E731

            def f_pw(x, t, w, b, gw, gb):
                return ck.functional.pw_block(x, w, b, gw, gb, *stats(), residual=t, training=training,
                                              activation="gelu", backend=backend)

            def f_stem(x, w, b, gw, gb):
                return ck.functional.patch_embed(x, w, b, gw, gb, *stats(), training=training, activation="silu",
                                                 order="norm_act", backend=backend)

            assert torch.autograd.gradcheck(f_pw, (x, t, w, b, gw, gb)), (backend, training)
            assert torch.autograd.gradcheck(f_stem, (x, ws, b, gw, gb)), (backend, training)


@pytest.mark.parametrize("fn,bad,match", [
    ("pw", dict(weight=torch.randn(5, 3, 1, 1)), r"weight: expected shape \(C_out, 4, 1, 1\)"),
    ("pw", dict(weight=torch.randn(5, 4, 3, 3)), r"weight: expected shape \(C_out, 4, 1, 1\)"),
    ("pw", dict(bn_weight=torch.ones(4)), r"bn_weight: expected shape \(5,\)"),
    ("pw", dict(residual=torch.randn(1, 4, 5, 6)), "residual: expected a tensor like x"),
    ("stem", dict(x=torch.randn(1, 3, 2, 9)), "x: expected an image of at least 3x3"),
    ("stem", dict(weight=torch.randn(5, 3, 3, 2)), r"weight: expected shape \(C_out, 3, p, p\)"),
])
def test_bad_input(fn, bad, match):
    if fn == "pw":
        args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(5, 4, 1, 1))
        f = ck.functional.pw_block
    else:
        args = dict(x=torch.randn(1, 3, 9, 9), weight=torch.randn(5, 3, 3, 3))
        f = ck.functional.patch_embed
    args.update(bias=torch.randn(5), bn_weight=torch.ones(5), bn_bias=torch.zeros(5), running_mean=torch.zeros(5),
                running_var=torch.ones(5))
    kw = {"residual": bad.pop("residual")} if "residual" in bad else {}
    args.update(bad)
    with pytest.raises((ValueError, RuntimeError), match=match):
        f(**args, **kw)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device, triton_cpu):
    d = dict(device=device)
    vec = lambda c: [torch.randn(c, **d), torch.rand(c, **d) + 0.5, torch.randn(c, **d), torch.zeros(c, **d),  # noqa
                     torch.ones(c, **d)]
    x = torch.randn(2, 6, 5, 4, **d)
    pw_args = [x, torch.randn_like(x), torch.randn(5, 6, 1, 1, **d)] + vec(5) + [1e-5, 2, True, True, True, "",
                                                                               backend]
    img = torch.randn(2, 3, 9, 8, **d)
    stem_args = [img, torch.randn(5, 3, 4, 4, **d)] + vec(5) + [1e-5, 3, False, True, True, "", backend]
    for op, args, diff in ((torch.ops.convmixer_kernels.pw_block.default, pw_args, 6),
                           (torch.ops.convmixer_kernels.stem_block.default, stem_args, 5)):
        torch.library.opcheck(op, args)
        for a in args[:diff]:
            a.requires_grad_(True)
        torch.library.opcheck(op, args)
