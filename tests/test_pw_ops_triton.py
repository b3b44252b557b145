"""Triton pointwise / stem / elementwise-BN ops (convmixer_kernels.triton.pw) against torch_ops.

Runs on CUDA when there is a GPU, else on CPU tensors through the Triton interpreter (slow: small
shapes, and a covering subset of the dtype x layout x act x order x residual x bias product rather
than all of it; every factor appears with several others)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (decoration time)

import pytest  # noqa: E402

pytest.importorskip("triton")

from convmixer_kernels import torch_ops  # noqa: E402
from convmixer_kernels.triton import pw  # noqa: E402
from pw_op_cases import check_act_edges, check_bn_act_ops, check_pw_ops, check_stem_ops, make_pw_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

pytestmark = pytest.mark.usefixtures("poison")


def _id(dtype):
    return str(dtype).replace("torch.", "")


# (dtype, channels_last, act, act_first, residual, bias, (N, C_in, C_out, H, W))
ODD = (2, 37, 53, 5, 7)     # M = 70 and 35 per image: no tile size divides anything
SQ = (2, 64, 64, 5, 7)
PW_CASES = [
    (F32, False, 2, True, True, True, ODD),
    (F32, True, 0, False, False, False, ODD),
    (F32, True, 3, False, True, True, SQ),
    (BF16, False, 1, False, True, True, ODD),
    (BF16, True, 3, True, False, True, ODD),
    (BF16, True, 2, True, True, False, SQ),
    (BF16, False, 0, True, False, True, (1, 37, 53, 5, 7)),
    (F16, False, 4, True, False, False, SQ),
    (F16, True, 4, False, True, True, ODD),
    (F16, True, 1, True, True, True, (1, 64, 37, 3, 3)),
]


@pytest.mark.parametrize("dtype,cl,act,act_first,residual,bias,shape", [
    pytest.param(*c, id=f"{_id(c[0])}-{'cl' if c[1] else 'nchw'}-act{c[2]}-{'af' if c[3] else 'bf'}"
                 f"-{'res' if c[4] else 'nores'}-{'bias' if c[5] else 'nobias'}-{'x'.join(map(str, c[6]))}")
    for c in PW_CASES])
def test_pw_ops(dtype, cl, act, act_first, residual, bias, shape):
    N, C_in, C_out, H, W = shape
    inp = make_pw_inputs(N, C_in, C_out, H, W, dtype, DEVICE, channels_last=cl, bias=bias, residual=residual,
                         seed=act)
    check_pw_ops(pw, inp, act, act_first, dtype, cl)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act_first", [True, False], ids=["af", "bf"])
@pytest.mark.parametrize("act", [0, 1, 2, 3, 4, 5, 6])
def test_bn_act_ops_every_activation(act, act_first, cl):
    inp = make_pw_inputs(2, 5, 37, 5, 7, F32, DEVICE, channels_last=cl, seed=act)
    check_bn_act_ops(pw, inp, act, act_first, F32, cl)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=_id)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_bn_act_ops_low_precision(dtype, cl):
    inp = make_pw_inputs(2, 5, 37, 5, 7, dtype, DEVICE, channels_last=cl)
    check_bn_act_ops(pw, inp, 3, False, dtype, cl)
    check_bn_act_ops(pw, inp, 4, True, dtype, cl)


# (dtype, channels_last, act, act_first, bias, (N, C_out, H, W, p))
STEM_CASES = [
    (F32, False, 2, True, True, (2, 53, 9, 7, 2)),
    (BF16, True, 1, False, True, (2, 53, 9, 7, 2)),
    (BF16, False, 3, True, False, (2, 37, 17, 16, 7)),
    (F16, True, 4, False, True, (2, 37, 17, 16, 7)),
    (F32, True, 0, True, True, (1, 16, 30, 29, 14)),
    (F16, False, 2, False, True, (1, 16, 30, 29, 14)),
]


@pytest.mark.parametrize("dtype,cl,act,act_first,bias,shape", [
    pytest.param(*c, id=f"{_id(c[0])}-{'cl' if c[1] else 'nchw'}-act{c[2]}-{'af' if c[3] else 'bf'}"
                 f"-{'bias' if c[4] else 'nobias'}-{'x'.join(map(str, c[5]))}")
    for c in STEM_CASES])
def test_stem_ops(dtype, cl, act, act_first, bias, shape):
    N, C_out, H, W, p = shape
    inp = make_pw_inputs(N, 3, C_out, H, W, dtype, DEVICE, channels_last=cl, bias=bias, stem_p=p, seed=p)
    check_stem_ops(pw, inp, act, act_first, dtype, cl)


def test_stem_without_dx():
    inp = make_pw_inputs(2, 3, 37, 9, 7, BF16, DEVICE, channels_last=True, stem_p=2)
    check_stem_ops(pw, inp, 2, True, BF16, True, need_dx=False)


def test_stem_any_image_channels():
    """C_img is weight.size(1): not only RGB."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 8, generator=g).to(DEVICE)
    w = (torch.randn(21, 5, 3, 3, generator=g) / 6).to(DEVICE)
    b = torch.randn(21, generator=g).to(DEVICE)
    got = pw.stem_gemm_stats(x, w, b, 2, True)
    want = torch_ops.stem_gemm_stats(x.cpu(), w.cpu(), b.cpu(), 2, True)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.cpu(), w_, rtol=2e-5, atol=2e-5)


def _bitwise_equal(a, b):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_deterministic(cl):
    inp = make_pw_inputs(2, 37, 53, 5, 7, BF16, DEVICE, channels_last=cl, residual=True, seed=3)
    names = ("dy", "x", "t", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    for run in (lambda: pw.pw_gemm_stats(inp["x"], inp["t"], inp["weight"], inp["bias"], 2, True),
                lambda: pw.pw_bwd(*[inp[n] for n in names], 2, True)):
        assert _bitwise_equal(run(), run())
    st = make_pw_inputs(2, 3, 37, 17, 16, BF16, DEVICE, channels_last=cl, stem_p=7)
    names = ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    for run in (lambda: pw.stem_gemm_stats(st["x"], st["weight"], st["bias"], 4, False),
                lambda: pw.stem_bwd(*[st[n] for n in names], 4, False, True)):
        assert _bitwise_equal(run(), run())


# ---------------------------------------------------------------------------------------------
# Bad inputs: a ValueError that names the argument.


def _pw_args(**over):
    inp = make_pw_inputs(1, 8, 16, 2, 3, F32, DEVICE, residual=True)
    inp.update(over)
    return inp


def _bad(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_inputs_pw():
    i = _pw_args()
    _bad(lambda: pw.pw_fwd(i["x"].double(), None, i["weight"], None, i["scale"], i["shift"], 0, True), "^x:")
    _bad(lambda: pw.pw_fwd(i["x"], None, i["weight"].half(), None, i["scale"], i["shift"], 0, True), "^weight:")
    _bad(lambda: pw.pw_fwd(i["x"], None, i["weight"][:, :4], None, i["scale"], i["shift"], 0, True), "^weight:")
    _bad(lambda: pw.pw_fwd(i["x"], i["t"][:, :, :1], i["weight"], None, i["scale"], i["shift"], 0, True), "^t:")
    _bad(lambda: pw.pw_fwd(i["x"], i["t"].half(), i["weight"], None, i["scale"], i["shift"], 0, True), "^t:")
    _bad(lambda: pw.pw_fwd(i["x"], None, i["weight"], i["bias"][:3], i["scale"], i["shift"], 0, True), "^bias:")
    _bad(lambda: pw.pw_fwd(i["x"], None, i["weight"], None, i["scale"].half(), i["shift"], 0, True), "^scale:")
    _bad(lambda: pw.pw_fwd(i["x"], None, i["weight"], None, i["scale"], i["shift"], 7, True), "^act:")
    _bad(lambda: pw.pw_gemm_stats(i["x"].transpose(2, 3), None, i["weight"], None, 0, True), "^x:")
    _bad(lambda: pw.pw_gemm_stats(i["x"][0], None, i["weight"], None, 0, True), "^x:")
    names = ("dy", "x", "t", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    args = [i[n] for n in names]
    for k, n in enumerate(names):
        if n in ("dy", "pre", "t"):
            bad = list(args)
            bad[k] = args[k].contiguous(memory_format=torch.channels_last)
            _bad(lambda: pw.pw_bwd(*bad, 0, True), f"^{n}:")
        if n in ("mean", "ca", "cb", "cd"):
            bad = list(args)
            bad[k] = args[k][:-1]
            _bad(lambda: pw.pw_bwd(*bad, 0, True), f"^{n}:")


def test_bad_inputs_stem_and_bn_act():
    st = make_pw_inputs(1, 3, 8, 9, 7, F32, DEVICE, stem_p=2)
    _bad(lambda: pw.stem_fwd(st["x"], st["weight"][:, :, :1], None, st["scale"], st["shift"], 0, True), "^weight:")
    _bad(lambda: pw.stem_fwd(st["x"][:, :2], st["weight"], None, st["scale"], st["shift"], 0, True), "^weight:")
    _bad(lambda: pw.stem_gemm_stats(st["x"].double(), st["weight"].double(), None, 0, True), "^x:")
    names = ("dy", "x", "pre", "weight", "scale", "shift", "mean", "ca", "cb", "cd")
    bad = [st[n] for n in names]
    bad[0] = bad[0][:, :, :1]
    _bad(lambda: pw.stem_bwd(*bad, 0, True, True), "^dy:")
    _bad(lambda: pw.bn_act_fwd(st["pre"].double(), st["scale"], st["shift"], 0, True), "^pre:")
    _bad(lambda: pw.bn_act_fwd(st["pre"], st["scale"][:2], st["shift"], 0, True), "^scale:")
    _bad(lambda: pw.bn_act_fwd(st["pre"], st["scale"], st["shift"], 0, True, st["dy"][:, :, :1]), "^residual:")
    _bad(lambda: pw.bn_act_bwd(st["dy"].half(), st["pre"], st["scale"], st["shift"], st["mean"], st["ca"],
                               st["cb"], st["cd"], 0, True), "^dy:")
    _bad(lambda: pw.bn_act_bwd(st["dy"], st["pre"], st["scale"], st["shift"], st["mean"], st["ca"],
                               st["cb"], st["cd"], -1, True), "^act:")


# ---------------------------------------------------------------------------------------------
# GPU only: shapes large enough that the autotuner tries every tile config (the CPU interpreter
# uses one small config).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=_id)
@pytest.mark.parametrize("block", ["pw", "stem"])
def test_gpu_autotuned_shapes(block, dtype, cl):
    # (pointwise and stem apart: each autotunes its own GEMMs, and together they were the GPU test stage's
    # longest test, 108 s on an H200 on 2026-11-27, with parallel workers idle)
    if block == "pw":
        inp = make_pw_inputs(4, 256, 192, 32, 32, dtype, "cuda", channels_last=cl, residual=True)
        check_pw_ops(pw, inp, 2, True, dtype, cl)
    else:
        st = make_pw_inputs(8, 3, 256, 112, 112, dtype, "cuda", channels_last=cl, stem_p=7)
        check_stem_ops(pw, st, 1, False, dtype, cl)


_IR_CHECK = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from convmixer_kernels.triton import pw

def ttgir(kernel, values):
    fn = kernel.fn if hasattr(kernel, "fn") else kernel  # under the autotuner
    names = [q.name for q in fn.params]
    cexpr = {q.name for q in fn.params if q.is_constexpr}
    sig = {n: ("constexpr" if n in cexpr else "*fp32" if n.endswith("_ptr") else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={n: values[n] for n in cexpr})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttgir"]

common = dict(IEEE=True, BM=32, BN=32, BK=16, GROUP_M=8, HAS_T=False, P=1)
irs = {
    "gemm": ttgir(pw._gemm_kernel, dict(common, EPI=2, HAS_BIAS=True, A_PATCH=True, B_KPATCH=True, B_JPATCH=False,
                                        O_PATCH=False, C_FAST=True)),
    "wgrad": ttgir(pw._wgrad_kernel, dict(common, B_PATCH=True)),
}
for name, ir in irs.items():
    dots = [ln.strip() for ln in ir.splitlines() if "tt.dot " in ln]
    assert dots, name + ": no tt.dot in the IR"
    for d in dots:
        acc = d.split("tt.dot", 1)[1].split(":")[0].split(",")[2].strip()
        assert acc.startswith("%cst"), name + ": a K block's dot accumulates into " + acc + " (chained): " + d
print("ok", {k: len(v) for k, v in irs.items()})
"""


def test_fp32_gemm_blocks_not_chained_when_compiled():
    """The fp32 (IEEE) GEMMs sum their K blocks' dots with TwoSum.  A plain `acc += dot(a, b)` compiles, on a
    GPU, to the chained dot (Triton's combine pass folds the add into the dot's accumulator): the form that
    left the Triton stem's fp32 BN weight gradient 1.06x over its bound on an H200, before and after the
    plain add.  Compiles both kernels for sm_90 (no GPU needed; not under the interpreter, so in a
    subprocess) and checks that every dot in them starts from a zero constant."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _IR_CHECK], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and "GPUTarget" in r.stderr and "ImportError" in r.stderr:
        pytest.skip("this Triton cannot compile for a CUDA target here")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: 0 * inf
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_activation_edges_match_pytorch(dtype):
    """relu, relu6, hardswish at their kinks and ends: forward and gradient as PyTorch's."""
    check_act_edges(pw.bn_act_fwd, pw.bn_act_bwd, DEVICE, dtype)
