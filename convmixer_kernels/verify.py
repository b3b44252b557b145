"""Verify a fused model against its unfused original: eval outputs and one training step (loss, every
gradient, running statistics), with the project's rule: the fused model's max error against the float64
oracle is at most 2x the original's own error in the same dtype, plus a floor of 4 ulps."""

from __future__ import annotations

import copy
import importlib
import time

import torch
from torch import nn

from .fuse import fuse


def load_model(spec: str, **kw) -> nn.Module:
    """`timm:<name>` (timm.create_model, no pretrained weights) or `package.module:factory`."""
    if spec.startswith("timm:"):
        import timm

        return timm.create_model(spec[5:], pretrained=False, **kw)
    if ":" not in spec:
        raise ValueError(f"model: expected 'timm:<name>' or 'module:factory', got {spec!r}")
    mod, fn = spec.split(":", 1)
    return getattr(importlib.import_module(mod), fn)(**kw)


def _err(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def stochastic_modules(model: nn.Module) -> list[str]:
    """Names of the modules that draw random numbers in training: dropout of every kind, RReLU, timm's
    DropPath, torchvision's StochasticDepth (fuse() never touches them)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU))
            or any(s in type(m).__name__ for s in ("DropPath", "StochasticDepth", "DropBlock"))]


def _rng_states():
    return [torch.random.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])


def _run(model, x, target, training):
    model.train(training)
    if training:  # every run must see the same network: its random layers run as in eval (see verify_model),
        for name in stochastic_modules(model):  # each module alone (a DropPath holding a block keeps it training)
            model.get_submodule(name).training = False
    model.zero_grad(set_to_none=True)
    before = _rng_states()
    out = model(x)
    random_draws = any(not torch.equal(a, b) for a, b in zip(before, _rng_states()))
    loss = nn.functional.cross_entropy(out.float(), target) if out.dim() == 2 else out.float().square().mean()
    res = {"output": out.detach(), "loss": loss.detach(), "_random": random_draws}
    if training:
        loss.backward()
        res.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        res.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()
                    if b.dtype.is_floating_point})
    return res


def verify_model(model: nn.Module, input_shape=(2, 3, 64, 64), device="cpu", dtype=torch.float32, seed=0,
                 progress=None) -> dict:
    """Returns {'ok': bool, 'checks': [(name, err_fused, err_original, bound, ok)], 'report': FuseReport,
    'fused': the fused model, 'deterministic': names of the random layers (dropout, drop path, stochastic
    depth) that ran as in eval in the training checks}.  Those layers draw different random numbers in each
    run (the fp64 oracle, the original in two layouts, the fused model), which no fusion can match, and
    fuse() leaves them as they are; everything else runs in training mode.  'random_forward': a forward
    still drew random numbers (functional dropout, say): its checks compared different draws."""
    model = model.to(device=device, dtype=dtype)
    fused, report = fuse(model, return_report=True)
    oracle = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g)
    checks = []
    random_forward = False
    eps = torch.finfo(dtype).eps
    for training in (False, True):
        with torch.no_grad():
            probe = oracle.eval()(x.double())
        target = torch.randint(0, probe.shape[1], (x.shape[0],), generator=g) if probe.dim() == 2 else None
        want = _run(copy.deepcopy(oracle), x.double(), target, training)
        tgt = None if target is None else target.to(device)
        xd = x.to(device, dtype)
        # The original's own error: the worse of its NCHW and channels_last runs (two equally valid
        # summation orders; one sample of a rounding error is a noisy yardstick in a deep network).
        theirs = [_run(copy.deepcopy(model).to(memory_format=fmt), xd.contiguous(memory_format=fmt), tgt, training)
                  for fmt in (torch.contiguous_format, torch.channels_last)]
        ours = _run(copy.deepcopy(fused), xd, tgt, training)
        drew = [r.pop("_random") for r in [want, ours] + theirs]  # (popped from every run: not a check)
        random_forward = random_forward or any(drew)
        for k in want:
            if progress is not None:
                progress.update(1)
            e_ours, e_theirs = _err(ours[k], want[k]), max(_err(t[k], want[k]) for t in theirs)
            bound = 2 * e_theirs + 4 * eps * max(1.0, want[k].abs().max().item())
            checks.append((f"{'train' if training else 'eval'} {k}", e_ours, e_theirs, bound, e_ours <= bound))
    return {"ok": all(c[-1] for c in checks), "checks": checks, "report": report, "fused": fused,
            "deterministic": stochastic_modules(model), "random_forward": random_forward}


def time_model(model, x, training, iters=5):
    """Milliseconds per forward (eval) or forward+backward (train) step."""
    cuda = x.is_cuda

    def step():
        if training:
            model.zero_grad(set_to_none=True)
            model(x).float().mean().backward()
        else:
            with torch.no_grad():
                model(x)

    model.train(training)
    step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3
