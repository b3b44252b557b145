"""64-bit indexing: activations of more than 2^31 elements (issue 3: "64-bit index arithmetic wherever a
tensor can exceed 2^31 elements").  One bf16 image of 3 x 27000 x 27000 (2.19e9 elements, 4.4 GB) through
the depthwise block's eval forward and through the elementwise BN pass (bn_act_fwd with a residual, the
pass of the pointwise eval forward and of every training forward), in both layouts, every output
starting as NaN.  Random rows at the top and at the bottom of the image (past element 2^31 in both
layouts; in NCHW the last channel's) are checked against the fp64 oracle with the usual 2x rule; the rest
of the image is a constant, checked against the block of a constant image.  A 32-bit offset anywhere
writes or reads the wrong place and these checks fail.  Needs about 10 GB of free memory (CPU) or GPU
memory, else it skips; on a GPU it runs in `make gpu-check` (cuda and triton backends)."""

from __future__ import annotations

import copy

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels.utils import memory_format_of
from conftest import HAS_CUDA
from oracle import check_2x

@pytest.fixture(autouse=True)
def _one_at_a_time():
    """One of these tests at a time across pytest-xdist workers (make gpu-check runs 14): each holds
    about 9 GB, which several at once would not find on one GPU."""
    import fcntl
    import tempfile

    with open(f"{tempfile.gettempdir()}/convmixer_kernels_large_index.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if HAS_CUDA:  # hand the cached blocks back for the next worker's test
                import gc

                gc.collect()
                torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)


pytestmark = pytest.mark.usefixtures("poison")

N, C, H, W = 1, 3, 27000, 27000  # 2,187,000,000 elements > 2^31 = 2,147,483,648
assert N * C * H * W > 2**31 + 32 * 10**6
ROWS = 6  # rows checked at the top and at the bottom
FILL = 0.25


def _free_gb(device) -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**30
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


def _params():
    from convmixer_kernels import _ext

    out = [pytest.param("cpu", "cpu", id="cpu-cpu",
                        marks=pytest.mark.skipif(not _ext.loaded(), reason="extension not built"))]
    for be in ("cuda", "triton"):
        out.append(pytest.param(be, "cuda", id=f"{be}-cuda",
                                marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]))
    return out


def _image(device, layout):
    """(x, top, bottom): x is FILL everywhere except its first and last ROWS + 1 rows, which are the
    random bands `top` and `bottom` (bf16, on the CPU)."""
    if _free_gb(device) < 10:
        pytest.skip(f"needs about 10 GB free on {device}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(N, C, H, W, dtype=torch.bfloat16, device=device, memory_format=fmt).fill_(FILL)
    g = torch.Generator().manual_seed(0)
    top, bottom = (torch.randn(N, C, ROWS + 1, W, generator=g).to(torch.bfloat16) for _ in range(2))
    x[:, :, :ROWS + 1] = top.to(device)
    x[:, :, H - ROWS - 1:] = bottom.to(device)
    return x, top, bottom


LAYOUTS = ["nchw", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", _params())
def test_dw_block_eval_past_2_31_elements(backend, device, layout):
    torch.manual_seed(0)
    blk = ck.FusedDepthwiseBlock(C, 3, activation="gelu").eval()
    with torch.no_grad():
        blk.norm.running_mean.uniform_(-0.5, 0.5)
        blk.norm.running_var.uniform_(0.5, 1.5)
    m64, m16 = (copy.deepcopy(blk.reference()).to(dt) for dt in (torch.float64, torch.bfloat16))
    x, top, bottom = _image(device, layout)
    fused = blk.to(device=device, dtype=torch.bfloat16)
    with torch.no_grad(), ck.backend(backend):
        y = fused(x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=memory_format_of(x))
    del x
    with torch.no_grad():
        # top rows 0..ROWS-1: the band's zero padding above is the image's; its row ROWS is their halo
        check_2x(f"{backend} {layout}: top rows", y[:, :, :ROWS].cpu(), m16(top)[:, :, :ROWS],
                 m64(top.double())[:, :, :ROWS], torch.bfloat16)
        # the last ROWS rows (past 2^31): band row 0 is their halo, the zero padding below is the image's
        check_2x(f"{backend} {layout}: last rows", y[:, :, H - ROWS:].cpu(), m16(bottom)[:, :, 1:],
                 m64(bottom.double())[:, :, 1:], torch.bfloat16)
        # the middle: the block of a constant image
        v = m64(torch.full((N, C, 5, 5), FILL, dtype=torch.float64))[:, :, 2, 2]
        mid = y[:, :, H // 2, W // 2 - 2:W // 2 + 2].cpu().double()
        assert torch.allclose(mid, v[:, :, None].expand_as(mid), rtol=1e-2, atol=1e-2), (mid, v)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", _params())
def test_bn_act_pass_past_2_31_elements(backend, device, layout):
    """y = scale * gelu(pre) + shift + residual over the whole image (residual = pre: two images of memory)."""
    pre, top, bottom = _image(device, layout)
    torch.manual_seed(0)
    scale = (torch.rand(C) + 0.5).to(device)
    shift = torch.randn(C).to(device)
    op = getattr(torch.ops.convmixer_kernels, "bn_act_fwd" + ("_triton" if backend == "triton" else ""))
    y = op(pre, scale, shift, 2, True, pre)
    assert y.shape == pre.shape and y.is_contiguous(memory_format=memory_format_of(pre))
    del pre
    s, t = scale.cpu().view(1, C, 1, 1), shift.cpu().view(1, C, 1, 1)

    def spec(p):
        return s.to(p.dtype) * torch.nn.functional.gelu(p) + t.to(p.dtype) + p

    for name, rows, band in (("top rows", slice(0, ROWS + 1), top), ("last rows", slice(H - ROWS - 1, H), bottom)):
        check_2x(f"{backend} {layout}: {name}", y[:, :, rows].cpu(), spec(band), spec(band.double()), torch.bfloat16)
    mid = y[:, :, H // 2, W // 2 - 2:W // 2 + 2].cpu().double()
    want = spec(torch.full((N, C, 1, 1), FILL, dtype=torch.float64)).view(N, C, 1)
    assert torch.allclose(mid, want.expand_as(mid), rtol=1e-2, atol=1e-2), (mid, want)
