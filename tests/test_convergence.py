"""Real images: a small ConvMixer trained on scikit-learn's bundled handwritten digits (no download),
fused and reference side by side from the same seed, fp32 on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixer


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16.0).unsqueeze(1).repeat(1, 3, 1, 1)
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def _train(model, xtr, ytr, epochs, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 50):
            idx = perm[i:i + 50]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_digits_fused_tracks_reference(backend):
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    ref = ConvMixer(32, 3, kernel_size=3, patch_size=2, n_classes=10)
    fused = ck.fuse(copy.deepcopy(ref))
    with ck.backend(backend):
        l_fused = _train(fused, xtr, ytr, epochs=4, seed=1)
        acc_fused = _accuracy(fused, xte, yte)
    l_ref = _train(ref, xtr, ytr, epochs=4, seed=1)
    acc_ref = _accuracy(ref, xte, yte)
    assert len(l_fused) == len(l_ref) == 120
    # Step by step: the same trajectory up to fp32 rounding (which training amplifies slowly).
    diffs = [abs(a - b) for a, b in zip(l_fused, l_ref)]
    assert max(diffs) <= 2e-3, (max(diffs), diffs.index(max(diffs)))
    assert acc_ref > 0.95 and acc_fused > 0.95, (acc_ref, acc_fused)
    assert abs(acc_fused - acc_ref) <= 1.0 / len(yte) * 3, (acc_fused, acc_ref)
