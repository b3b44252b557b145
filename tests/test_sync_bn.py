"""fuse(model, sync_bn=True): batch statistics over the ranks of a process group, forward and backward.
Two gloo processes on the CPU against single-process BatchNorm on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixer

WORLD = 2


def _model():
    torch.manual_seed(0)
    m = ConvMixer(16, 2, kernel_size=3, patch_size=2, n_classes=5)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 10, 10, generator=g), torch.randn(6, 5, generator=g)


def _step(model, x, w):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * w).sum().backward()
    return y.detach(), x.grad


def _worker(rank, port, out_dir, backend, as_syncbn):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        m = _model()
        if as_syncbn:  # fused modules converted from nn.SyncBatchNorm
            fused = ck.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(m))
        else:
            fused = ck.fuse(m, sync_bn=True)
        x, w = _data()
        sl = slice(rank * 3, rank * 3 + 3)
        with ck.backend(backend):
            y, dx = _step(fused.train(), x[sl], w[sl])
        grads = {n: p.grad.clone() for n, p in fused.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)  # what DDP does (sum; DDP then divides by the world size)
        torch.save(dict(y=y, dx=dx, grads=grads, buffers=dict(fused.named_buffers())),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("as_syncbn", [False, True], ids=["sync_bn=True", "from-SyncBatchNorm"])
def test_sync_bn_two_gloo_ranks_match_concatenated_batch(tmp_path, backend, as_syncbn):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), backend, as_syncbn), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = _model().train()
    x, w = _data()
    y, dx = _step(ref, x, w)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), dx, **tol)
    for n, p in ref.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][n], p.grad, **tol, msg=n)
    for n, b in ref.named_buffers():
        for r in ranks:
            torch.testing.assert_close(r["buffers"][n], b, **tol, msg=n)


def test_sync_bn_without_process_group_is_plain_bn():
    m = _model()
    a, b = ck.fuse(m, sync_bn=True), ck.fuse(m)
    x, w = _data()
    with ck.backend("torch"):
        torch.testing.assert_close(_step(a.train(), x, w), _step(b.train(), x, w), rtol=0, atol=0)
