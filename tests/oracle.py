"""The project's accuracy rule: a result in dtype D passes when its max error against the float64 CPU
oracle is at most 2x the error of PyTorch's own dtype-D computation of the same thing, plus a small floor."""

from __future__ import annotations

import torch

# floor = FLOOR_ULPS * eps(D) * max(1, max|oracle|): covers results that PyTorch computes exactly by luck.
FLOOR_ULPS = 4.0


def _err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    d = (got.detach().double().cpu() - ref.detach().double().cpu()).abs().flatten()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    i = int(d.argmax())
    return float(d[i]), i


def check_2x(name: str, ours: torch.Tensor, theirs, oracle: torch.Tensor, dtype: torch.dtype):
    """Assert err(ours) <= 2 * err(theirs) + floor, with the worst index in the message.

    `theirs` may be a list of PyTorch's own dtype-D results computed different valid ways (NCHW and
    channels_last sum in different orders): PyTorch's error is the largest of theirs.  One sample of
    a rounding error is noisy for short reductions (a bias gradient summed over a few hundred terms)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    e_ours, i = _err(ours, oracle)
    theirs = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    e_theirs = max(_err(t, oracle)[0] for t in theirs)
    scale = max(1.0, float(oracle.detach().abs().max()))
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * scale
    bound = 2.0 * e_theirs + floor
    assert e_ours <= bound, (
        f"{name}: max error {e_ours:.3g} at flat index {i} (ours {ours.flatten()[i].item():.6g}, oracle "
        f"{oracle.flatten()[i].item():.6g}) > bound {bound:.3g} (PyTorch {dtype} error {e_theirs:.3g}, floor {floor:.3g})")
