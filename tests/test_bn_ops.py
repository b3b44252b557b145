"""The per-channel BatchNorm ops (bn_params, bn_bwd_coefs, bn_update_running; csrc/bn_math.h): the fp64-oracle
rule against PyTorch's own float32 ops they replace (ops._bn_scale_shift, _bn_bwd_coefs and
functional.update_running_stats with the `torch` backend), nn.BatchNorm2d's running update, poisoned outputs,
bad inputs, opcheck, and that a training step of a fused block takes them (one op each) and never the
PyTorch ops, on the CPU and, with a GPU, CUDA.  tests/cuda_emu runs the CUDA kernels on the CPU."""

import pytest
import torch
from oracle import check_2x

import convmixer_kernels as ck
from convmixer_kernels import _ext, functional, ops

pytestmark = pytest.mark.skipif(not ops._HAS_BN_OPS, reason="extension not built")
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not (HAS_CUDA and _ext.built_with_cuda()), reason="no CUDA device or a CPU-only build")])]
CK = torch.ops.convmixer_kernels
BN_OP_NAMES = tuple(f"convmixer_kernels::{n}" for n in ops.BN_OPS)


def _vecs(C, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(C, generator=g, dtype=torch.float64) * 3
    var = torch.rand(C, generator=g, dtype=torch.float64) * 4 + 1e-3
    var[0] = 0.0  # a constant channel: invstd = 1/sqrt(eps)
    gamma, beta = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (mean, var, gamma, beta)]


def _o(t):
    return None if t is None else t.double().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 37, 600])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_params(device, dtype, C, affine, poison):
    mean, var, gamma, beta = _vecs(C, device, dtype, C)
    if not affine:
        gamma = beta = None
    eps = 1e-5
    got = CK.bn_params(mean, var, gamma, beta, eps)
    theirs = ops._bn_scale_shift(C, dtype, device, gamma, beta, mean, var, eps, "torch")
    oracle = ops._bn_scale_shift(C, torch.float64, "cpu", _o(gamma), _o(beta), _o(mean), _o(var), eps, "torch")
    for name, a, b, o in zip(("invstd", "scale", "shift"), got, theirs, oracle):
        assert a.device.type == device and a.dtype == dtype and a.shape == (C,), name
        check_2x(name, a, b, o, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_bwd_coefs(device, dtype, batch_stats, poison):
    C, n = 37, 2 * 17 * 23
    mean, var, gamma, beta = _vecs(C, device, dtype, 1)
    invstd, scale, _shift = CK.bn_params(mean, var, gamma, beta, 1e-5)
    g = torch.Generator().manual_seed(2)
    sum_g, sum_gx = (torch.randn(C, generator=g, dtype=torch.float64).to(device, dtype) * 50 for _ in range(2))
    cb, cd = CK.bn_bwd_coefs(sum_g, sum_gx, scale, invstd, float(n), batch_stats)
    if not batch_stats:
        assert torch.equal(cb, torch.zeros_like(cb)) and torch.equal(cd, torch.zeros_like(cd))
        return
    count = torch.full((), float(n), dtype=dtype, device=device)
    theirs = (-scale * invstd * sum_gx / count, -scale * sum_g / count)
    s64, i64 = _o(scale), _o(invstd)
    oracle = (-s64 * i64 * _o(sum_gx) / n, -s64 * _o(sum_g) / n)
    for name, a, b, o in zip(("cb", "cd"), (cb, cd), theirs, oracle):
        check_2x(name, a, b, o, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None, 1.0, 0.0])
@pytest.mark.parametrize("with_nbt", [True, False])
def test_bn_update_running_as_batchnorm(device, momentum, with_nbt):
    """The running statistics and num_batches_tracked after one update, as nn.BatchNorm2d's own after one
    training forward over a batch with those statistics (momentum None: the cumulative average, which
    needs num_batches_tracked)."""
    if momentum is None and not with_nbt:
        pytest.skip("the cumulative average needs num_batches_tracked (test_bad_inputs)")
    C = 37
    x = torch.randn(2, C, 17, 23, dtype=torch.float64) * 2 + 1
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.num_batches_tracked.fill_(3)
    rm, rv, nbt = (bn.running_mean.float().to(device), bn.running_var.float().to(device),
                   bn.num_batches_tracked.clone().to(device))
    bn.train()(x)  # the oracle: fp64 BatchNorm's own update
    mean = x.mean(dim=(0, 2, 3)).float().to(device)
    var = x.var(dim=(0, 2, 3), correction=0).float().to(device)
    n = 2 * 17 * 23
    t_rm, t_rv, t_n = rm.clone(), rv.clone(), nbt.clone()
    functional.update_running_stats(t_rm, t_rv, t_n, mean, var, n, momentum, "torch")
    versions = rm._version, rv._version, nbt._version
    CK.bn_update_running(rm, rv, nbt if with_nbt else None, mean, var, float(n), momentum)
    # written in place as PyTorch's in-place ops write: version counters bumped (the eval cache reads them)
    assert rm._version > versions[0] and rv._version > versions[1] and (nbt._version > versions[2]) == with_nbt
    check_2x("running_mean", rm, t_rm, bn.running_mean, torch.float32)
    check_2x("running_var", rv, t_rv, bn.running_var, torch.float32)
    assert int(nbt) == (4 if with_nbt else 3)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_ops_are_deterministic(device):
    mean, var, gamma, beta = _vecs(600, device, torch.float32, 5)
    a = CK.bn_params(mean, var, gamma, beta, 1e-3)
    b = CK.bn_params(mean, var, gamma, beta, 1e-3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    r1, r2 = [gamma.clone(), var.clone()], [gamma.clone(), var.clone()]
    for r in (r1, r2):
        CK.bn_update_running(r[0], r[1], None, mean, var, 10.0, 0.1)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])


def test_bad_inputs():
    mean, var, gamma, beta = _vecs(8, "cpu", torch.float32, 0)
    with pytest.raises(RuntimeError, match="var: expected shape"):
        CK.bn_params(mean, var[:7], gamma, beta, 1e-5)
    with pytest.raises(RuntimeError, match="weight: expected dtype"):
        CK.bn_params(mean, var, gamma.double(), beta, 1e-5)
    with pytest.raises(RuntimeError, match="mean: expected dtype float32 or float64"):
        CK.bn_params(mean.half(), var.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="bias: expected a contiguous"):
        CK.bn_params(mean, var, None, torch.randn(16)[::2], 1e-5)
    with pytest.raises(RuntimeError, match="eps: expected a non-negative"):
        CK.bn_params(mean, var, None, None, -1.0)
    with pytest.raises(RuntimeError, match="count: expected the number of values"):
        CK.bn_bwd_coefs(mean, var, gamma, beta, 0.0, True)
    with pytest.raises(RuntimeError, match="scale: expected shape"):
        CK.bn_bwd_coefs(mean, var, gamma[:3], beta, 5.0, True)
    rm, rv = mean.clone(), var.clone()
    with pytest.raises(RuntimeError, match="num_batches_tracked: expected a tensor when momentum is None"):
        CK.bn_update_running(rm, rv, None, mean, var, 5.0, None)
    with pytest.raises(RuntimeError, match="num_batches_tracked: expected one int64 value"):
        CK.bn_update_running(rm, rv, torch.zeros(2, dtype=torch.int64), mean, var, 5.0, 0.1)
    with pytest.raises(RuntimeError, match="mean: expected dtype"):
        CK.bn_update_running(rm, rv, None, mean.double(), var, 5.0, 0.1)
    assert torch.equal(rm, mean) and torch.equal(rv, var), "a refused update changed the running statistics"


def test_opcheck():
    mean, var, gamma, beta = _vecs(37, "cpu", torch.float32, 0)
    torch.library.opcheck(CK.bn_params.default, (mean, var, gamma, beta, 1e-5))
    torch.library.opcheck(CK.bn_params.default, (mean, var, None, None, 1e-5))
    torch.library.opcheck(CK.bn_bwd_coefs.default, (mean, var, gamma, beta.abs() + 0.1, 12.0, True))
    nbt = torch.tensor(2, dtype=torch.int64)
    torch.library.opcheck(CK.bn_update_running.default, (gamma.clone(), var.clone(), nbt, mean, var, 12.0, None))
    torch.library.opcheck(CK.bn_update_running.default, (gamma.clone(), var.clone(), None, mean, var, 12.0, 0.1))


def _ops_in_step(block, x, backend):
    with ck.backend(backend), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(x).sum().backward()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
def test_training_step_takes_the_bn_ops(kind, device):
    """A training step of a fused block with a compiled backend runs each BN op once, and none of the PyTorch
    ops they replace; the `torch` backend (the specification) keeps the PyTorch ops."""
    torch.manual_seed(0)
    if kind == "dw":
        block, x = ck.FusedDepthwiseBlock(8, kernel_size=3), torch.randn(2, 8, 5, 6)
    elif kind == "pw":
        block, x = ck.FusedPointwiseBlock(8, 12), torch.randn(2, 8, 5, 6)
    else:
        block, x = ck.FusedPatchEmbed(12, patch_size=2), torch.randn(2, 3, 6, 8)
    block, x = block.to(device).train(), x.to(device).requires_grad_()
    names = _ops_in_step(block, x, device)
    for op in BN_OP_NAMES:
        assert names.count(op) == 1, (op, names)
    replaced = ("aten::rsqrt", "aten::_foreach_mul_", "aten::_foreach_add_", "aten::neg")
    assert not [n for n in names if n in replaced], names
    names = _ops_in_step(block, x, "torch")
    assert "aten::rsqrt" in names and not [n for n in names if n in BN_OP_NAMES]


def test_knob_turns_the_bn_ops_off(monkeypatch):
    """CONVMIXER_KERNELS_BN_OPS=0 (the benchmark provider cuda_bn_torch): the PyTorch ops, read per call."""
    block, x = ck.FusedDepthwiseBlock(8, kernel_size=3).train(), torch.randn(2, 8, 5, 6, requires_grad=True)
    monkeypatch.setenv("CONVMIXER_KERNELS_BN_OPS", "0")
    names = _ops_in_step(block, x, "cpu")
    assert "aten::rsqrt" in names and not [n for n in names if n in BN_OP_NAMES]
    monkeypatch.setenv("CONVMIXER_KERNELS_BN_OPS", "1")
    assert "convmixer_kernels::bn_params" in _ops_in_step(block, x, "cpu")
