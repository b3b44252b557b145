"""64-bit indexing: activations of more than 2^31 elements (issue 3: "64-bit index arithmetic wherever a
tensor can exceed 2^31 elements").  One bf16 image of 3 x 27000 x 27000 (2.19e9 elements, 4.4 GB) through
the depthwise block's eval forward and through the elementwise BN pass (bn_act_fwd with a residual, the
pass of the pointwise eval forward and of every training forward), in both layouts, every output
starting as NaN.  Random rows at the top and at the bottom of the image (past element 2^31 in both
layouts; in NCHW the last channel's) are checked against the fp64 oracle with the usual 2x rule; the rest
of the image is a constant, checked against the block of a constant image.  A 32-bit offset anywhere
writes or reads the wrong place and these checks fail.  Needs about 10 GB of free memory (CPU) or GPU
memory, else it skips; on a GPU it runs in `make gpu-check` (cuda and triton backends).  The training ops
(statistics forward, the backward's sums, the backward) on the same image, and the pointwise block's on a
1 x 768 x 1700 x 1700 activation: GPU only, about 40-45 GB."""

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
                import sys

                # a failed test's traceback (kept by pytest in sys.last_*) holds its frame and tensors
                for name in ("last_type", "last_value", "last_traceback", "last_exc"):
                    if hasattr(sys, name):
                        setattr(sys, name, None)

                gc.collect()
                torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)


# pytest-timeout (make gpu-check: --timeout 150) counts the wait for the lock above: the large tests, one at
# a time, take longer than that together
pytestmark = [pytest.mark.usefixtures("poison"), pytest.mark.timeout(290)]

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
    y = _op(backend, "bn_act_fwd")(pre, scale, shift, 2, True, pre)
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


def _op(backend, name):
    return getattr(torch.ops.convmixer_kernels, name + ("_triton" if backend == "triton" else ""))


def _check_uniform(label, t, rows, cols, ref):
    """t[:, :, rows, cols] within one bf16 step of ref (one value a channel, shape (1, C, 1, 1)), in chunks
    of rows (no full-size float copy)."""
    step = ref.abs() * 2.0 ** -7  # one bf16 step (8 significant bits) at the value
    for r0 in range(rows.start, rows.stop, 400):
        chunk = t[:, :, r0:min(r0 + 400, rows.stop), cols].float()
        assert ((chunk - ref).abs() <= step).all(), f"{label}: rows {r0}+ differ from the value away from the bands"


def _check_whole_stats(label, pre, mean, var, act, rows):
    """mean and biased var of u = act(pre) over the whole tensor against fp64 sums of this pre (chunks of
    `rows` rows): within 1e-4 (|mean| + std) and 1e-3 var.  In these tests the variance comes from the bands
    alone (the rest is one value a channel): dropping or misreading the bottom band moves var by 43-50%
    (a full-size fp64 model of both tests' data).  The mean bound leaves room for the Triton pointwise
    statistics' sequential fp32 sum of its tiles (up to 0.94 of a 2e-5 bound modelled at BM = 64)."""
    from convmixer_kernels import torch_ops as T

    s1 = torch.zeros(pre.shape[1], dtype=torch.float64, device=pre.device)
    s2 = torch.zeros_like(s1)
    for r0 in range(0, pre.shape[2], rows):
        u = T.act_fwd(pre[:, :, r0:r0 + rows].double(), act)
        s1 += u.sum(dim=(0, 2, 3))
        s2 += (u * u).sum(dim=(0, 2, 3))
        del u
    n = pre.shape[0] * pre.shape[2] * pre.shape[3]
    m64 = s1 / n
    v64 = s2 / n - m64 * m64
    dm = (mean.double() - m64).abs()
    assert (dm <= 1e-4 * (m64.abs() + v64.sqrt())).all(), f"{label}: mean {mean} vs {m64}"
    assert ((var.double() - v64).abs() <= 1e-3 * v64).all(), f"{label}: var {var} vs {v64}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", [p for p in _params() if p.values[0] != "cpu"])
def test_dw_training_ops_past_2_31_elements(backend, device, layout):
    """The training ops of the depthwise block (dw_conv_stats, dw_bwd_reduce, dw_bwd) on the image above
    (x: FILL except its random top and bottom bands; the bottom one lies past element 2^31 in both layouts).
    The gradient dy is zero except on the bands' outer ROWS rows, and cb = cd = 0, so dpre is exactly zero
    away from them: every sum (sum_g, sum_gxhat, dweight, dbias) is the bands' alone, checked with the 2x
    rule against the spec on the bands (PyTorch's bf16 ops and fp64), as are pre and dx on the bands; the
    rest of dx must be exactly 0 and the rest of pre one value (within a bf16 step) in every interior pixel
    and in each edge column, every output having started as NaN.  The batch statistics include the whole image: checked
    against fp64 sums of the op's own pre (_check_whole_stats).  Needs about 40 GB
    of GPU memory, else it skips."""
    from convmixer_kernels import torch_ops as T

    if _free_gb(device) < 40:
        pytest.skip(f"needs about 40 GB free on {device}")
    act, bf = 2, torch.bfloat16
    g = torch.Generator().manual_seed(1)
    w = torch.randn(C, 1, 3, 3, generator=g) * 0.3
    b = torch.randn(C, generator=g) * 0.1
    x, top, bottom = _image(device, layout)
    fmt = memory_format_of(x)
    pre, mean, var = _op(backend, "dw_conv_stats")(x, w.to(device), b.to(device), act, True)
    assert not torch.isnan(pre).any(), "pre: elements left unwritten"
    # pre on the bands (rows whose 3x3 neighbourhood lies in the band or the image's padding)
    for name, band, rows, brows in (("top", top, slice(0, ROWS), slice(0, ROWS)),
                                    ("bottom", bottom, slice(H - ROWS, H), slice(1, ROWS + 1))):
        want = T.dw_conv_stats(band, w, b, act, True)[0][:, :, brows]
        want64 = T.dw_conv_stats(band.double(), w.double(), b.double(), act, True)[0][:, :, brows]
        check_2x(f"{backend} {layout}: pre, {name} rows", pre[:, :, rows].cpu(), want, want64, bf)
    mid = slice(ROWS + 2, H - ROWS - 2)
    for cols in (slice(1, W - 1), slice(0, 1), slice(W - 1, W)):  # interior, left and right edge columns
        _check_uniform(f"pre, columns {cols}", pre, mid, cols, pre[:, :, H // 2, cols.start].float().view(1, C, 1, 1))
    cst = T.dw_conv_stats(torch.full((1, C, 5, 5), FILL, dtype=bf), w, b, act, True)[0][:, :, 2, 2]
    cst64 = T.dw_conv_stats(torch.full((1, C, 5, 5), FILL, dtype=torch.float64), w.double(), b.double(), act,
                            True)[0][:, :, 2, 2]
    check_2x(f"{backend} {layout}: pre, interior", pre[:, :, H // 2, W // 2].cpu(), cst, cst64, bf)
    # batch statistics of u = gelu(pre) over the whole image, against fp64 sums of this pre
    _check_whole_stats(f"{backend} {layout}", pre, mean, var, act, 3000)

    # the backward, with the bands' dy
    dy = torch.empty(N, C, H, W, dtype=bf, device=device, memory_format=fmt).zero_()
    dy_top, dy_bottom = (torch.randn(N, C, ROWS + 1, W, generator=g).to(bf) for _ in range(2))
    dy_top[:, :, ROWS] = 0  # the bands' inner rows: dpre zero there too
    dy_bottom[:, :, 0] = 0
    dy[:, :, :ROWS + 1] = dy_top.to(device)
    dy[:, :, H - ROWS - 1:] = dy_bottom.to(device)
    scale, shift = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
    mean_p, invstd = torch.randn(C, generator=g) * 0.1, torch.rand(C, generator=g) + 0.5
    ca, zero = torch.rand(C, generator=g) + 0.5, torch.zeros(C)
    vecs = [v.to(device) for v in (scale, shift, mean_p)]
    bands = (("top", dy_top, top, pre[:, :, :ROWS + 1].cpu()),
             ("bottom", dy_bottom, bottom, pre[:, :, H - ROWS - 1:].cpu()))

    def spec(fn, *per_band):  # fn over both bands, summed (reductions), in bf16 (PyTorch's) and fp64
        outs = []
        for dt in (bf, torch.float64):
            parts = [fn(*[t.to(dt) if t.dtype == bf else (t.double() if dt == torch.float64 else t) for t in args])
                     for args in per_band]
            outs.append([sum(p[i] for p in parts) for i in range(len(parts[0]))])
        return outs

    sums = _op(backend, "dw_bwd_reduce")(dy, pre, *vecs, invstd.to(device), act, True)
    want, want64 = spec(lambda d, p, s, t, m, i: T.dw_bwd_reduce(d, p, s, t, m, i, act, True),
                        *[(d, p, scale, shift, mean_p, invstd) for _, d, _, p in bands])
    for name, got_, w_, o_ in zip(("sum_g", "sum_gxhat"), sums, want, want64):
        check_2x(f"{backend} {layout}: {name}", got_.cpu(), w_, o_, bf)

    dx, dweight, dbias = _op(backend, "dw_bwd")(dy, x, pre, w.to(device), *vecs, ca.to(device), zero.to(device),
                                                zero.to(device), act, True, True)
    assert not torch.isnan(dx).any(), "dx: elements left unwritten"
    assert torch.count_nonzero(dx[:, :, ROWS + 1:H - ROWS - 1]) == 0, "dx: not zero away from the bands"

    def bwd(d, xb, p, w_, s, t, m, a_, z):
        r = T.dw_bwd(d, xb, p, w_, s, t, m, a_, z, z, act, True, True)
        return r[1], r[2]

    want, want64 = spec(bwd, *[(d, xb, p, w, scale, shift, mean_p, ca, zero) for _, d, xb, p in bands])
    check_2x(f"{backend} {layout}: dweight", dweight.cpu(), want[0], want64[0], bf)
    check_2x(f"{backend} {layout}: dbias", dbias.cpu(), want[1], want64[1], bf)
    for (name, d, xb, p), rows in zip(bands, (slice(0, ROWS + 1), slice(H - ROWS - 1, H))):
        dxb = T.dw_bwd(d, xb, p, w, scale, shift, mean_p, ca, zero, zero, act, True, True)[0]
        dxb64 = T.dw_bwd(d.double(), xb.double(), p.double(), w.double(), scale.double(), shift.double(),
                         mean_p.double(), ca.double(), zero.double(), zero.double(), act, True, True)[0]
        check_2x(f"{backend} {layout}: dx, {name} rows", dx[:, :, rows].cpu(), dxb, dxb64, bf)


PW_C, PW_HW, PW_ROWS = 768, 1700, 2  # 1 x 768 x 1700 x 1700: 2.22e9 elements; bands of PW_ROWS rows
assert PW_C * PW_HW * PW_HW > 2**31 + 32 * 10**6


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", [p for p in _params() if p.values[0] != "cpu"])
def test_pw_training_ops_past_2_31_elements(backend, device, layout, monkeypatch):
    """The pointwise block's training ops (pw_gemm_stats with the residual t fused into the operand load,
    dw_bwd_reduce, pw_bwd) on 1 x 768 x 1700 x 1700 bf16 activations (2.22e9 elements; the bottom band lies
    past element 2^31 in both layouts: NCHW's last channels, channels_last's last pixels).  x and t are
    constants except on PW_ROWS rows at the top and at the bottom, dy is zero there too, and cb = cd = 0, so
    dpre is zero away from the bands: a 1x1 conv couples no pixels, so every gradient sum is that of the two
    bands side by side (one small image), checked with the 2x rule against the spec on it, as are pre and ds
    on the bands; ds must be exactly zero elsewhere, pre within a bf16 step of one value a channel (each pixel
    the same GEMM row), every output having started as NaN; the statistics against fp64 sums of the op's pre
    (as the depthwise test).  Needs about 45 GB of GPU memory, else it skips."""
    from convmixer_kernels import torch_ops as T

    if _free_gb(device) < 45:
        pytest.skip(f"needs about 45 GB free on {device}")
    if backend == "triton":  # one tile config, no autotuning (17 compiles a layout: the indexing is the point)
        from convmixer_kernels.triton import pw as tpw

        monkeypatch.setattr(tpw, "_SMALL_GEMM", 1 << 62)
    act, bf, R, Hp = 2, torch.bfloat16, PW_ROWS, PW_HW
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(PW_C, PW_C, 1, 1, generator=g) / PW_C ** 0.5).to(bf)
    b = torch.randn(PW_C, generator=g) * 0.1

    def banded(fill, zero_edges=False):  # (full tensor on device, the two bands side by side on the CPU)
        full = torch.empty(1, PW_C, Hp, Hp, dtype=bf, device=device, memory_format=fmt).fill_(fill)
        bands = torch.randn(1, PW_C, 2 * R, Hp, generator=g).to(bf)
        full[:, :, :R] = bands[:, :, :R].to(device)
        full[:, :, Hp - R:] = bands[:, :, R:].to(device)
        return full, bands

    x, xb = banded(FILL)
    t, tb = banded(-0.5)
    top, bot = slice(0, R), slice(Hp - R, Hp)

    def at_bands(v):  # the two bands of a full tensor, side by side, on the CPU
        return torch.cat([v[:, :, top].cpu(), v[:, :, bot].cpu()], dim=2)

    pre, mean, var = _op(backend, "pw_gemm_stats")(x, t, w.to(device), b.to(device), act, True)
    assert not torch.isnan(pre).any(), "pre: elements left unwritten"
    check_2x(f"{backend} {layout}: pre, bands", at_bands(pre), T.pw_gemm_stats(xb, tb, w, b, act, True)[0],
             T.pw_gemm_stats(xb.double(), tb.double(), w.double(), b.double(), act, True)[0], bf)
    _check_uniform("pre", pre, slice(R, Hp - R), slice(None), pre[:, :, Hp // 2, Hp // 2].float().view(1, PW_C, 1, 1))
    _check_whole_stats(f"{backend} {layout}", pre, mean, var, act, 200)

    dy = torch.empty(1, PW_C, Hp, Hp, dtype=bf, device=device, memory_format=fmt).zero_()
    dyb = torch.randn(1, PW_C, 2 * R, Hp, generator=g).to(bf)
    dy[:, :, top] = dyb[:, :, :R].to(device)
    dy[:, :, bot] = dyb[:, :, R:].to(device)
    vec = lambda lo, hi: torch.rand(PW_C, generator=g) * (hi - lo) + lo  # noqa: E731
    scale, shift, mean_p, invstd, ca = vec(0.5, 1.5), vec(-0.5, 0.5), vec(-0.2, 0.2), vec(0.5, 2.0), vec(0.5, 1.5)
    zero = torch.zeros(PW_C)
    pb = at_bands(pre)
    dev = lambda *vs: [v.to(device) for v in vs]  # noqa: E731

    sums = _op(backend, "dw_bwd_reduce")(dy, pre, *dev(scale, shift, mean_p, invstd), act, True)
    want = T.dw_bwd_reduce(dyb, pb, scale, shift, mean_p, invstd, act, True)
    want64 = T.dw_bwd_reduce(dyb.double(), pb.double(), *[v.double() for v in (scale, shift, mean_p, invstd)],
                             act, True)
    for name, got_, w_, o_ in zip(("sum_g", "sum_gxhat"), sums, want, want64):
        check_2x(f"{backend} {layout}: {name}", got_.cpu(), w_, o_, bf)

    ds, dweight, dbias = _op(backend, "pw_bwd")(dy, x, t, pre, w.to(device), *dev(scale, shift, mean_p, ca, zero, zero),
                                                act, True)
    assert not torch.isnan(ds).any(), "ds: elements left unwritten"
    assert torch.count_nonzero(ds[:, :, R:Hp - R]) == 0, "ds: not zero away from the bands"
    want = T.pw_bwd(dyb, xb, tb, pb, w, scale, shift, mean_p, ca, zero, zero, act, True)
    want64 = T.pw_bwd(dyb.double(), xb.double(), tb.double(), pb.double(), w.double(),
                      *[v.double() for v in (scale, shift, mean_p, ca, zero, zero)], act, True)
    check_2x(f"{backend} {layout}: ds, bands", at_bands(ds), want[0], want64[0], bf)
    check_2x(f"{backend} {layout}: dweight", dweight.cpu(), want[1], want64[1], bf)
    check_2x(f"{backend} {layout}: dbias", dbias.cpu(), want[2], want64[2], bf)
