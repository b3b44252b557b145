"""Shared harness of the block-level oracle tests: a fused module against the float64 oracle (its
eager reference modules in float64 on the CPU) and PyTorch's own dtype-D computation, with the 2x rule
(tests/oracle.py) on the output, every gradient and every buffer."""

from __future__ import annotations

import copy

import torch

import convmixer_kernels as ck
from oracle import check_2x


def randomize_bn(blk, seed):
    torch.manual_seed(seed)
    bn = blk.norm
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(3)
    return blk


def run(module, inputs, dy, training, steps=1, call=None):
    """Forward (steps times) and backward of the last step: y, input grads, param grads, buffers."""
    module.train(training)
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    for p in module.parameters():
        p.grad = None
    for _ in range(steps):
        y = call(module, *inputs) if call else module(*inputs)
    y.backward(dy)
    out = {"y": y.detach()}
    for i, t in enumerate(inputs):
        out[f"d_in{i}"] = t.grad
    for n, p in module.named_parameters():
        out["d:" + n] = p.grad
    for n, b in module.named_buffers():
        out["b:" + n] = b.detach().clone()
    return out


def _layout(t, layout, device, dtype):
    t = t.to(device, dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=device, dtype=dtype)
        wide[..., ::2] = t
        assert not wide[..., ::2].is_contiguous()
        return wide[..., ::2]
    return t


def compare(blk, inputs, backend, device, dtype, training=True, layout="nchw", steps=1, seed=0,
            fused_call=None, ref_call=None):
    """blk: a fused module on the CPU in fp32 with .reference(); inputs: fp32 CPU tensors."""
    with torch.no_grad():
        y0 = (ref_call or (lambda m, *a: m(*a)))(copy.deepcopy(blk).reference().eval(), *inputs)
    dy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(seed + 7))

    want = run(copy.deepcopy(blk).double().reference(), [t.double() for t in inputs], dy.double(), training,
               steps, ref_call)
    theirs = []  # PyTorch's own dtype-D computation, in both memory formats (see oracle.check_2x)
    for fmt in ("nchw", "channels_last"):
        ref_d = copy.deepcopy(blk).to(device=device, dtype=dtype).reference()
        theirs.append(run(ref_d, [_layout(t, fmt, device, dtype) for t in inputs], _layout(dy, fmt, device, dtype),
                          training, steps, ref_call))
    fused = copy.deepcopy(blk).to(device=device, dtype=dtype)
    with ck.backend(backend):
        ours = run(fused, [_layout(t, layout, device, dtype) for t in inputs], _layout(dy, layout, device, dtype),
                   training, steps, fused_call)

    if layout == "channels_last":
        for n in ["y"] + [f"d_in{i}" for i in range(len(inputs))]:
            assert ours[n].is_contiguous(memory_format=torch.channels_last), f"{n} lost channels_last"
    keys_ours = [n for n in ours if n.startswith(("d:", "b:"))]
    keys_ref = [n for n in want if n.startswith(("d:", "b:"))]
    assert [k.split(".")[-1] for k in keys_ours] == [k.split(".")[-1] for k in keys_ref]
    for a, b in zip(["y"] + [f"d_in{i}" for i in range(len(inputs))] + keys_ours,
                    ["y"] + [f"d_in{i}" for i in range(len(inputs))] + keys_ref):
        if b.endswith("num_batches_tracked"):
            assert torch.equal(ours[a].cpu(), want[b]), f"{a}: {ours[a]} != {want[b]}"
            continue
        assert ours[a] is not None, f"{a}: missing gradient"
        assert ours[a].dtype == theirs[0][b].dtype, f"{a}: dtype {ours[a].dtype} != {theirs[0][b].dtype}"
        check_2x(a, ours[a], [t[b] for t in theirs], want[b], dtype)
