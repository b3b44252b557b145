"""The fused depthwise block against the float64 oracle (reference eager modules), every backend.

Outputs, every gradient (x, conv weight and bias, BN weight and bias), running_mean, running_var and
num_batches_tracked, in training and eval, both orders, every activation, with and without residual,
bias, affine and running stats, both memory formats and a non-contiguous input."""

from __future__ import annotations

import copy

import pytest
import torch

import convmixer_kernels as ck
from conftest import HAS_CUDA, backend_params
import block_harness as harness
from block_harness import randomize_bn, run

ACTS = ["gelu", "gelu_tanh", "relu", "silu", "identity", "relu6", "hardswish"]


def make_block(C, k, activation, order, residual, bias, affine, track, momentum, seed):
    torch.manual_seed(seed)
    blk = ck.FusedDepthwiseBlock(C, k, activation=activation, order=order, residual=residual, bias=bias,
                                 affine=affine, track_running_stats=track, momentum=momentum)
    return randomize_bn(blk, seed)


def compare(backend, device, dtype, shape, k, activation="gelu", order="act_norm", residual=True, bias=True,
            affine=True, track=True, momentum=0.1, training=True, layout="nchw", steps=1, seed=0):
    blk = make_block(shape[1], k, activation, order, residual, bias, affine, track, momentum, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    harness.compare(blk, [x], backend, device, dtype, training=training, layout=layout, steps=steps, seed=seed)


BACKENDS = backend_params()



@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtypes_layouts(backend, device, dtype, layout, training, poison, triton_cpu):
    compare(backend, device, dtype, (2, 37, 17, 23), 7, layout=layout, training=training)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("order", ["act_norm", "norm_act"])
def test_activations_orders(backend, device, activation, order, poison, triton_cpu):
    compare(backend, device, torch.float32, (2, 16, 9, 11), 5, activation=activation, order=order)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 5, 9, 15])
def test_kernel_sizes(backend, device, k, poison, triton_cpu):
    compare(backend, device, torch.float32, (2, 16, 13, 10), k, layout="channels_last" if k % 4 == 1 else "nchw")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opts", [
    dict(residual=False), dict(bias=False), dict(affine=False), dict(track=False),
    dict(track=False, training=False), dict(momentum=None, steps=2), dict(layout="noncontig"),
    dict(residual=False, bias=False, affine=False, order="norm_act", activation="relu", training=False),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_options(backend, device, opts, poison, triton_cpu):
    compare(backend, device, torch.float32, (2, 16, 8, 9), 3, **opts)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 8,
                    reason="the tensor-core forward needs a CUDA device of compute capability 8.0 or newer")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k,activation", [(7, "gelu"), (9, "relu"), (3, "silu")])
def test_tensor_core_forward(monkeypatch, dtype, training, layout, k, activation, poison):
    """The opt-in mma.sync kernels against the fp64 oracle: the eval forward, the training forward's pre
    and statistics, and the backward, under every gradient (=require: every op runs on tensor cores or
    fails)."""
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "require")
    compare("cuda", "cuda", dtype, (2, 37, 17, 23), k, activation=activation, training=training, layout=layout)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batch1_eval_image_smaller_than_kernel(backend, device, poison, triton_cpu):
    compare(backend, device, torch.float32, (1, 3, 5, 4), 9, training=False)
    compare(backend, device, torch.bfloat16, (1, 3, 5, 4), 9, training=False, layout="channels_last")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device, triton_cpu):
    blk = make_block(16, 7, "gelu", "act_norm", True, True, True, True, 0.1, 0).to(device)
    x = torch.randn(2, 16, 19, 21, device=device)
    outs = []
    for _ in range(2):
        b = copy.deepcopy(blk)
        with ck.backend(backend):
            outs.append(run(b, [x], torch.ones_like(x), True))
    for n in outs[0]:
        assert torch.equal(outs[0][n], outs[1][n]), f"{n} differs between two identical runs"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "relu6", "hardswish"])
def test_nan_inf_propagate(backend, device, activation, triton_cpu):
    """NaN and Inf propagate: non-finite exactly where the reference is.  With relu, relu6 (inf -> 6) and
    hardswish (-inf -> NaN) the NaN/Inf masks must match exactly; GELU(+inf) is inf mathematically and on
    PyTorch's CUDA kernel but NaN on its vectorized CPU kernel, so for gelu a non-finite value only has to
    stay non-finite."""
    blk = make_block(4, 3, activation, "act_norm", True, True, True, True, 0.1, 0).to(device).eval()
    x = torch.randn(1, 4, 6, 6, device=device)
    x[0, 0, 2, 2] = float("nan")
    x[0, 1, 3, 3] = float("inf")
    with torch.no_grad():
        want = blk.reference()(x)
        with ck.backend(backend):
            got = blk(x)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    if activation != "gelu":
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_inf_propagate_every_block(kind, training, backend, device, triton_cpu):
    """Every block, eval and training (ReLU): NaN and Inf exactly where the unfused modules put them in the
    output; in training the running statistics non-finite exactly where theirs are.  (Which of Inf and NaN a
    batch mean holding an Inf takes is not fixed even in PyTorch: its CPU BatchNorm sums (Inf), its CUDA one
    merges Welford moments (Inf - Inf: NaN), as the fused kernels' Chan merges do.)"""
    torch.manual_seed(0)
    blk = {"dw": lambda: ck.FusedDepthwiseBlock(8, 3, activation="relu"),
           "pw": lambda: ck.FusedPointwiseBlock(8, 6, activation="relu"),
           "stem": lambda: ck.FusedPatchEmbed(6, 2, activation="relu")}[kind]()
    blk = randomize_bn(blk, 1).to(device).train(training)
    x = torch.randn(2, 3 if kind == "stem" else 8, 6, 6, device=device)
    x[0, 0, 2, 2] = float("nan")
    x[1, 1, 3, 4] = float("inf")
    x[1, 2, 0, 5] = -float("inf")
    ref = copy.deepcopy(blk).reference()
    with torch.no_grad():
        want = ref(x)
        with ck.backend(backend):
            got = blk(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    bn, bn_ref = blk.norm, next(m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if training:
        for name in ("running_mean", "running_var"):
            a, b = getattr(bn, name), getattr(bn_ref, name)
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
            assert not torch.isfinite(a).all(), f"{name}: the non-finite batch left it finite"
        assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked)


def _block_and_input(kind, device):
    blk = {"dw": lambda: ck.FusedDepthwiseBlock(8, 3), "pw": lambda: ck.FusedPointwiseBlock(8, 6),
           "stem": lambda: ck.FusedPatchEmbed(6, 2)}[kind]()
    return randomize_bn(blk, 1).to(device), torch.randn(2, 3 if kind == "stem" else 8, 6, 6, device=device)


@pytest.mark.parametrize("backend,device", backend_params(include_triton=False))
@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
def test_double_backward_raises_instead_of_silently_wrong(kind, backend, device):
    """create_graph=True gives the same first-order gradients; differentiating them again raises a clear
    error.  (Without the guard PyTorch only warned and returned zero second derivatives.)"""
    torch.manual_seed(0)
    blk, x = _block_and_input(kind, device)
    x.requires_grad_(True)
    with ck.backend(backend):
        want = torch.autograd.grad(blk(x).sum(), (x, blk.conv.weight))
        got = torch.autograd.grad(blk(x).sum(), (x, blk.conv.weight), create_graph=True)
        for g, w in zip(got, want):
            assert torch.equal(g.detach(), w)
        with pytest.raises(RuntimeError, match="differentiable once"):
            (got[0].pow(2).sum() + got[1].pow(2).sum()).backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
def test_eval_skips_the_custom_op_with_the_same_result(kind, backend, device, monkeypatch, triton_cpu):
    """Eval with running statistics and no autograd record goes straight to the kernels (ops.block_eval,
    less host time) and gives bitwise what the custom op gives (training: the next test)."""
    from convmixer_kernels import functional as F_

    torch.manual_seed(0)
    blk, x = _block_and_input(kind, device)
    blk.eval()
    with torch.no_grad(), ck.backend(backend):
        with monkeypatch.context() as mp:
            mp.setattr(F_, "_eval_fast", lambda flags: False)
            want = blk(x)
        with monkeypatch.context() as mp:
            for op in ("_dw_block_op", "_pw_block_op", "_stem_block_op"):
                mp.setattr(F_, op, lambda *a, **k: pytest.fail("the eval forward went through the custom op"))
            got = blk(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_skips_the_custom_op_with_the_same_result(kind, backend, device, momentum, monkeypatch, triton_cpu):
    """In plain eager code a training step runs the block's forward and backward without the custom-op
    dispatch (ops.block_direct: an autograd.Function), bitwise as through the op: output, every gradient,
    the running statistics and num_batches_tracked, over two steps."""
    from convmixer_kernels import functional as F_

    torch.manual_seed(0)
    blk, x = _block_and_input(kind, device)
    blk.norm.momentum = momentum
    blk.train()
    results = []
    for direct in (False, True):
        m = copy.deepcopy(blk)
        with monkeypatch.context() as mp, ck.backend(backend):
            if direct:
                for op in ("_dw_block_op", "_pw_block_op", "_stem_block_op"):
                    mp.setattr(F_, op, lambda *a, **k: pytest.fail("the eager training step went through the op"))
            else:
                mp.setattr(F_, "_traced", lambda: True)
            xs = x.clone().requires_grad_(kind != "stem")
            for _ in range(2):
                y = m(xs)
                y.square().sum().backward()
        grads = [xs.grad] + [p.grad for p in m.parameters()]
        results.append([y.detach()] + [g for g in grads if g is not None] + list(m.buffers()))
    assert len(results[0]) == len(results[1])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
def test_activation_checkpointing(kind):
    """torch.utils.checkpoint (non-reentrant) over a fused block gives the gradients it gives over the
    eager modules.  The running statistics are updated once per step, as without checkpointing: the
    recomputation stops (PyTorch's early stop) once the op has recomputed what backward saved, before the
    block's update.  Eager nn.BatchNorm2d updates them a second time in the recomputation."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    fused, x = _block_and_input(kind, "cpu")
    fused, x = fused.double(), x.double()  # float64: fused and eager agree to rounding, so a tight tolerance
    eager = ck.unfuse(copy.deepcopy(fused))
    outs = []
    for m, ckpt in ((eager, True), (fused, True), (copy.deepcopy(fused), False)):
        m.train()
        xs = x.clone().requires_grad_(True)
        y = checkpoint(m, xs, use_reentrant=False) if ckpt else m(xs)
        y.square().sum().backward()
        outs.append(([y.detach(), xs.grad] + [p.grad for p in m.parameters()], dict(m.named_buffers())))
    (eager_out, eager_buf), (ckpt_out, ckpt_buf), (plain_out, plain_buf) = outs
    for got, want in zip(ckpt_out, eager_out):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(ckpt_out, plain_out):
        assert torch.equal(got, want)
    for name, b in ckpt_buf.items():
        assert torch.equal(b, plain_buf[name]), name
    nbt = next(n for n in ckpt_buf if n.endswith("num_batches_tracked"))
    assert (int(eager_buf[nbt]), int(ckpt_buf[nbt])) == (3 + 2, 3 + 1)


@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
def test_vmap_training_as_eager(kind):
    """Under torch.func.vmap a training block with running statistics raises nn.BatchNorm2d's error (the
    per-sample statistics cannot update one buffer); after torch.func.replace_all_batch_norm_modules_ it
    computes what the patched eager modules compute; eval works as is."""
    torch.manual_seed(0)
    fused, x = _block_and_input(kind, "cpu")
    xs = torch.stack([x, x.flip(0) * 0.5])
    eager = ck.unfuse(copy.deepcopy(fused))
    with pytest.raises(RuntimeError, match="batched tensor as input while the running_mean"):
        torch.func.vmap(fused.train())(xs)
    fused.eval()
    eager.eval()
    torch.testing.assert_close(torch.func.vmap(fused)(xs), torch.func.vmap(eager)(xs), rtol=1e-5, atol=1e-5)
    for m in (fused, eager):
        torch.func.replace_all_batch_norm_modules_(m.train())
    torch.testing.assert_close(torch.func.vmap(fused)(xs), torch.func.vmap(eager)(xs), rtol=1e-5, atol=1e-5)


def test_gradcheck_cpu_float64():
    from convmixer_kernels import _ext

    backends = ["torch"] + (["cpu"] if _ext.loaded() else [])
    torch.manual_seed(0)
    for backend in backends:
        for order, act in (("act_norm", "gelu"), ("norm_act", "silu")):
            for training in (True, False):
                x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
                w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
                b = torch.randn(3, dtype=torch.float64, requires_grad=True)
                gw = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
                gb = torch.randn(3, dtype=torch.float64, requires_grad=True)
                rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

                def f(x, w, b, gw, gb):
                    return ck.functional.dw_block(x, w, b, gw, gb, rm.clone(), rv.clone(), None, training=training,
                                                  activation=act, order=order, backend=backend)

                assert torch.autograd.gradcheck(f, (x, w, b, gw, gb)), (backend, order, training)


def test_one_value_per_channel_error():
    blk = ck.FusedDepthwiseBlock(3, 3).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        blk(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(3, 4, 4)), "x: expected a 4-D"),
    (dict(weight=torch.randn(4, 1, 4, 4)), "weight: expected an odd kernel size"),
    (dict(weight=torch.randn(5, 1, 3, 3)), r"weight: expected shape \(4, 1, k, k\)"),
    (dict(weight=torch.randn(4, 1, 33, 33)), "weight: expected an odd kernel size"),
    (dict(x=torch.randn(1, 4, 5, 5).int()), "x: expected dtype"),
    (dict(bias=torch.randn(3)), r"bias: expected shape \(4,\)"),
    (dict(bn_weight=torch.randn(4, dtype=torch.float16)), "bn_weight: expected dtype"),
    (dict(running_var=None), "running_mean, running_var"),
    (dict(activation="tanh"), "activation: expected one of"),
    (dict(order="act_act"), "order: expected one of"),
    (dict(backend="cuda_graphs"), "backend: expected one of"),
])
def test_bad_input(bad, match):
    args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(4, 1, 3, 3), bias=torch.randn(4),
                bn_weight=torch.ones(4), bn_bias=torch.zeros(4), running_mean=torch.zeros(4),
                running_var=torch.ones(4))
    kw = {k: bad.pop(k) for k in ("activation", "order", "backend") if k in bad}
    args.update(bad)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        ck.functional.dw_block(**args, **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.gpu
def test_device_mismatch_names_argument():
    with pytest.raises(ValueError, match="weight: expected a tensor on cuda"):
        ck.functional.dw_block(torch.randn(1, 4, 5, 5, device="cuda"), torch.randn(4, 1, 3, 3))


def test_unavailable_backend_says_why():
    from convmixer_kernels import _ext

    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            ck.functional.dw_block(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), backend="cuda")
    if _ext.loaded() and HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available.*CPU tensors only"):
            ck.functional.dw_block(torch.randn(1, 4, 5, 5, device="cuda"), torch.randn(4, 1, 3, 3, device="cuda"),
                                   backend="cpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device, triton_cpu):
    x = torch.randn(2, 4, 6, 7, device=device)
    args = (x, torch.randn(4, 1, 3, 3, device=device), torch.randn(4, device=device),
            torch.rand(4, device=device) + 0.5, torch.randn(4, device=device), torch.zeros(4, device=device),
            torch.ones(4, device=device), 1e-5, 2, True, True, True, True, "", backend)
    torch.library.opcheck(torch.ops.convmixer_kernels.dw_block.default, args)
    for a in args[:5]:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.convmixer_kernels.dw_block.default, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(backend, device, training, triton_cpu):
    blk = make_block(8, 5, "gelu", "act_norm", True, True, True, True, 0.1, 0).to(device).train(training)
    ref = copy.deepcopy(blk)
    x = torch.randn(2, 8, 9, 9, device=device)
    with ck.backend(backend):
        compiled = torch.compile(blk, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        y = compiled(x)
        y.square().mean().backward()
        y_eager = ref(x)
        y_eager.square().mean().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(blk.conv.weight.grad, ref.conv.weight.grad)
    torch.testing.assert_close(blk.norm.weight.grad, ref.norm.weight.grad)
    torch.testing.assert_close(blk.norm.running_var, ref.norm.running_var)
    torch.testing.assert_close(blk.norm.num_batches_tracked, ref.norm.num_batches_tracked)
