"""The CUDA kernels of the four low-level depthwise ops against torch_ops (the spec), on CUDA tensors.

Every test here needs a CUDA device and an extension built with nvcc; without them the module is
skipped.  Outputs start as NaN (CONVMIXER_KERNELS_POISON_OUTPUTS=1) so an element a kernel forgets
to write fails.  Cases are chosen to break the tiling: C not a multiple of 32 (the channels_last
channel groups), H, W not multiples of the tile, images smaller than the kernel, k without a
tiled instantiation (1, 17: the generic path), misaligned pointers (no 16-byte accesses)."""

from __future__ import annotations

import itertools

import pytest
import torch

from convmixer_kernels import torch_ops
from dw_op_cases import BWD_ARGS, check_all_ops, make_inputs


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import convmixer_kernels._C  # noqa: F401  (registers torch.ops.convmixer_kernels)
    except Exception as e:  # noqa: BLE001
        return f"extension not loadable: {type(e).__name__}: {e}"
    if "cuda=1" not in torch.ops.convmixer_kernels.build_info():
        return "extension built without CUDA"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KS = [1, 3, 5, 7, 9, 11, 15, 17]


@pytest.fixture
def ops(monkeypatch):
    monkeypatch.setenv("CONVMIXER_KERNELS_POISON_OUTPUTS", "1")
    return torch.ops.convmixer_kernels


# dtype x layout x k on the odd shape; the activation, order, residual and bias rotate with the
# case index so that every value of each meets every dtype and layout.
_GRID = list(itertools.product(DTYPES, [False, True], KS))


@pytest.mark.parametrize("i", range(len(_GRID)),
                         ids=[f"{DT_IDS[d]}-{'cl' if c else 'nchw'}-k{k}" for d, c, k in _GRID])
def test_ops_match_reference(ops, i):
    dtype, cl, k = _GRID[i]
    act, act_first, residual, bias = i % 7, bool((i // 7) % 2), bool(i % 2), (i // 3) % 3 != 0
    inp = make_inputs(2, 37, 17, 23, k, dtype, "cuda", channels_last=cl, bias=bias, seed=i)
    check_all_ops(ops, inp, act, act_first, residual, dtype, cl)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act_first", [False, True], ids=["bn_act", "act_bn"])
@pytest.mark.parametrize("act", range(len(torch_ops.ACTIVATIONS)), ids=list(torch_ops.ACTIVATIONS))
def test_activations_and_orders(ops, act, act_first, cl):
    dtype = torch.bfloat16
    inp = make_inputs(2, 37, 17, 23, 7, dtype, "cuda", channels_last=cl, bias=True, seed=act)
    check_all_ops(ops, inp, act, act_first, residual=act % 2 == 0, dtype=dtype, channels_last=cl)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_image_smaller_than_kernel(ops, dtype, cl):
    inp = make_inputs(1, 3, 5, 4, 9, dtype, "cuda", channels_last=cl, bias=True, seed=3)
    check_all_ops(ops, inp, 2, True, True, dtype, cl)


@pytest.mark.parametrize("shape,k,dtype,cl,act,act_first", [
    ((4, 64, 32, 32), 7, torch.bfloat16, False, 2, True),
    ((4, 64, 32, 32), 9, torch.bfloat16, True, 2, True),
    ((4, 64, 32, 32), 9, torch.float32, False, 4, False),
    ((4, 64, 32, 32), 7, torch.float16, True, 1, False),
    ((2, 40, 56, 56), 7, torch.bfloat16, True, 3, True),
    ((2, 40, 56, 56), 3, torch.float32, False, 1, True),
    ((2, 40, 56, 56), 13, torch.bfloat16, False, 2, False),
    ((2, 40, 56, 56), 15, torch.float16, True, 0, True),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_larger_shapes(ops, shape, k, dtype, cl, act, act_first):
    inp = make_inputs(*shape, k, dtype, "cuda", channels_last=cl, bias=True, seed=k)
    check_all_ops(ops, inp, act, act_first, True, dtype, cl)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values one element past a 16-byte boundary (the kernels must not use 16-byte accesses)."""
    cl = t.dim() == 4 and not t.is_contiguous()
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    if cl:
        N, C, H, W = t.shape
        out = base[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    else:
        out = base[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_misaligned_inputs(ops, dtype, cl):
    inp = make_inputs(2, 32, 16, 32, 7, dtype, "cuda", channels_last=cl, bias=True, seed=5)
    for name in ("x", "dy", "pre"):
        inp[name] = _misaligned(inp[name])
    check_all_ops(ops, inp, 2, True, True, dtype, cl)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("k", [7, 17])
def test_deterministic(ops, k, cl):
    a = make_inputs(4, 64, 32, 32, k, torch.bfloat16, "cuda", channels_last=cl, bias=True, seed=11)

    def run():
        s = ops.dw_conv_stats(a["x"], a["weight"], a["bias"], 2, True)
        y = ops.dw_fwd(a["x"], a["weight"], a["bias"], a["scale"], a["shift"], 2, True, True)
        r = ops.dw_bwd_reduce(a["dy"], a["pre"], a["scale"], a["shift"], a["mean"], a["invstd"], 2, False)
        b = ops.dw_bwd(a["dy"], a["x"], a["pre"], a["weight"], a["scale"], a["shift"], a["mean"], a["ca"],
                       a["cb"], a["cd"], 2, True, True)
        return [*s, y, *r, *b]

    first, second = run(), run()
    for u, v in zip(first, second):
        assert torch.equal(u, v)


def test_side_stream_and_cuda_graph(ops):
    """Launches go to the current stream (a side stream, a graph capture) with no host sync."""
    dtype = torch.bfloat16
    inp = make_inputs(2, 64, 16, 16, 7, dtype, "cuda", channels_last=True, bias=True, seed=2)
    args_f = (inp["x"], inp["weight"], inp["bias"], inp["scale"], inp["shift"], 2, True, True)
    args_b = (inp["dy"], inp["x"], inp["pre"], inp["weight"], inp["scale"], inp["shift"], inp["mean"],
              inp["ca"], inp["cb"], inp["cd"], 2, True, True)
    want_y = ops.dw_fwd(*args_f)
    want_b = ops.dw_bwd(*args_b)
    want_s = ops.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 2, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up on the capturing stream
            ops.dw_fwd(*args_f)
            ops.dw_bwd(*args_b)
            ops.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 2, True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            y = ops.dw_fwd(*args_f)
            b = ops.dw_bwd(*args_b)
            s = ops.dw_conv_stats(inp["x"], inp["weight"], inp["bias"], 2, True)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want_y)
    for u, v in zip(b, want_b):
        assert torch.equal(u, v)
    for u, v in zip(s, want_s):
        assert torch.equal(u, v)


def test_empty_batch(ops):
    inp = make_inputs(1, 8, 6, 6, 3, torch.float32, "cuda", bias=True)
    x = inp["x"][:0]
    y = ops.dw_fwd(x, inp["weight"], inp["bias"], inp["scale"], inp["shift"], 1, True, False)
    assert y.shape == x.shape
    dx, dw, db = ops.dw_bwd(x, x, x, inp["weight"], inp["scale"], inp["shift"], inp["mean"], inp["ca"],
                            inp["cb"], inp["cd"], 1, True, False)
    assert dx.shape == x.shape and not dw.any() and not db.any()


# ---- bad inputs: a clear error that names the argument ----

def _base():
    return make_inputs(2, 8, 6, 6, 3, torch.float32, "cuda", bias=True)


def test_weight_on_cpu_is_rejected(ops):
    a = _base()
    with pytest.raises(RuntimeError, match="weight"):
        ops.dw_fwd(a["x"], a["weight"].cpu(), a["bias"], a["scale"], a["shift"], 0, True, False)
    with pytest.raises(RuntimeError, match="weight"):
        ops.dw_conv_stats(a["x"], a["weight"].cpu(), a["bias"], 0, True)


def test_cpu_vector_is_rejected(ops):
    a = _base()
    with pytest.raises(RuntimeError, match="shift"):
        ops.dw_fwd(a["x"], a["weight"], a["bias"], a["scale"], a["shift"].cpu(), 0, True, False)
    with pytest.raises(RuntimeError, match="cd"):
        ops.dw_bwd(a["dy"], a["x"], a["pre"], a["weight"], a["scale"], a["shift"], a["mean"], a["ca"], a["cb"],
                   a["cd"].cpu(), 0, True, False)


def test_float64_is_rejected_on_cuda(ops):
    a = _base()
    with pytest.raises(RuntimeError, match="x: expected dtype float32, float16 or bfloat16"):
        ops.dw_conv_stats(a["x"].double(), a["weight"].double(), None, 0, True)
    with pytest.raises(RuntimeError, match="pre"):
        ops.dw_bwd_reduce(a["dy"].double(), a["pre"].double(), a["scale"], a["shift"], a["mean"], a["invstd"],
                          0, True)


def test_wrong_dtype_shape_layout_act(ops):
    a = _base()
    with pytest.raises(RuntimeError, match="weight"):  # weights are float32 for every storage dtype
        ops.dw_fwd(a["x"].half(), a["weight"].half(), None, a["scale"], a["shift"], 0, True, False)
    with pytest.raises(RuntimeError, match="weight"):  # even k
        ops.dw_fwd(a["x"], torch.zeros(8, 1, 4, 4, device="cuda"), None, a["scale"], a["shift"], 0, True, False)
    with pytest.raises(RuntimeError, match="bias"):
        ops.dw_fwd(a["x"], a["weight"], a["bias"][:4], a["scale"], a["shift"], 0, True, False)
    with pytest.raises(RuntimeError, match="act"):
        ops.dw_fwd(a["x"], a["weight"], a["bias"], a["scale"], a["shift"], 7, True, False)
    with pytest.raises(RuntimeError, match="x: expected an NCHW-contiguous"):  # neither layout
        ops.dw_fwd(a["x"].transpose(2, 3), a["weight"], a["bias"], a["scale"], a["shift"], 0, True, False)
    with pytest.raises(RuntimeError, match="dy"):  # dy in another memory format than x
        ops.dw_bwd(a["dy"].contiguous(memory_format=torch.channels_last), a["x"], a["pre"], a["weight"],
                   a["scale"], a["shift"], a["mean"], a["ca"], a["cb"], a["cd"], 0, True, False)
    with pytest.raises(RuntimeError, match="pre"):
        ops.dw_bwd(a["dy"], a["x"], a["pre"].half(), a["weight"], a["scale"], a["shift"], a["mean"], a["ca"],
                   a["cb"], a["cd"], 0, True, False)


def test_x_on_cpu_with_cuda_weight_is_rejected(ops):
    a = _base()
    with pytest.raises(RuntimeError, match="x: expected a CUDA tensor"):
        ops.dw_fwd(a["x"].cpu(), a["weight"], a["bias"], a["scale"], a["shift"], 0, True, False)


# ---------------------------------------------------------------------------------------------
# The tensor-core forward (csrc/cuda/dw_mma.cu), opt-in: CONVMIXER_KERNELS_DW_MMA=require makes
# dw_fwd and dw_conv_stats run it or fail, so a pass here is the MMA kernel's.  The same cases run
# on the CPU in the emulator (tests/cuda_emu).

def _mma_runs_here():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


_MMA_CASES = [  # (shape, k, dtype, act, act_first, residual, bias, items per block or None, misaligned, cl)
    ((2, 37, 17, 23), 7, torch.bfloat16, 2, True, True, True, None, False),
    ((2, 5, 17, 23), 9, torch.float16, 1, False, True, False, None, False),
    ((2, 16, 12, 16), 3, torch.float16, 4, True, False, True, None, False),
    ((2, 16, 12, 16), 5, torch.bfloat16, 3, False, True, True, None, True),
    ((4, 64, 32, 32), 7, torch.bfloat16, 2, True, True, True, None, False),
    ((1, 2, 300, 16), 5, torch.float16, 0, True, True, True, None, False),
    ((13, 3, 8, 8), 9, torch.bfloat16, 2, False, True, True, 9, False),
    ((13, 3, 9, 10), 3, torch.float16, 1, True, False, True, 9, False),
]
_MMA_CASES = [c + (False,) for c in _MMA_CASES] + [
    ((2, 16, 12, 16), 7, torch.bfloat16, 2, True, True, True, None, False, True),
    ((2, 37, 17, 23), 5, torch.float16, 3, False, True, False, None, False, True),
    ((2, 16, 9, 11), 9, torch.bfloat16, 4, True, False, True, None, True, True),
    ((1, 8, 150, 20), 3, torch.bfloat16, 1, False, True, True, None, False, True),
    ((7, 8, 8, 8), 7, torch.float16, 2, True, True, True, 9, False, True),
    ((4, 768, 32, 32), 9, torch.bfloat16, 2, True, True, True, None, False, True),
    ((1, 3, 5, 4), 9, torch.bfloat16, 2, True, True, True, None, False, False),  # image smaller than k
    ((1, 3, 5, 4), 9, torch.float16, 0, False, True, True, None, False, True),
]


@pytest.mark.skipif(not _mma_runs_here(), reason="mma.sync needs compute capability 8.0 or newer")
@pytest.mark.parametrize("case", _MMA_CASES,
                         ids=lambda c: f"{c[0]}-k{c[1]}-{DT_IDS[c[2]]}-act{c[3]}-{'cl' if c[9] else 'nchw'}")
def test_mma_forward(ops, monkeypatch, case):
    shape, k, dtype, act, act_first, residual, bias, ipb, misaligned, cl = case
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "require")
    if ipb is not None:
        monkeypatch.setenv("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", str(ipb))
    inp = make_inputs(*shape, k, dtype, "cuda", channels_last=cl, bias=bias, seed=sum(shape) + k)
    if misaligned:
        for name in ("x", "dy", "pre"):
            inp[name] = _misaligned(inp[name])
    check_all_ops(ops, inp, act, act_first, residual, dtype, cl)


@pytest.mark.skipif(not _mma_runs_here(), reason="mma.sync needs compute capability 8.0 or newer")
def test_mma_refuses_what_it_does_not_serve(ops, monkeypatch):
    """=require: fp32 and k outside {3, 5, 7, 9} fail (the FMA kernels serve them), the backward too."""
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "require")
    for cl, dtype, k in [(True, torch.float32, 7), (False, torch.float32, 7), (False, torch.bfloat16, 11),
                         (True, torch.float16, 1)]:
        a = make_inputs(2, 8, 16, 16, k, dtype, "cuda", channels_last=cl, seed=1)
        with pytest.raises(RuntimeError, match="CONVMIXER_KERNELS_DW_MMA=require"):
            ops.dw_fwd(a["x"], a["weight"], a["bias"], a["scale"], a["shift"], 2, True, True)
    a = make_inputs(2, 8, 16, 16, 7, torch.float32, "cuda", channels_last=True, seed=1)
    with pytest.raises(RuntimeError, match="CONVMIXER_KERNELS_DW_MMA=require"):
        ops.dw_bwd(a["dy"], a["x"], a["pre"], a["weight"], a["scale"], a["shift"], a["mean"], a["ca"], a["cb"],
                   a["cd"], 2, True, True)


@pytest.mark.skipif(not _mma_runs_here(), reason="mma.sync needs compute capability 8.0 or newer")
def test_mma_deterministic_and_close_to_fma(ops, monkeypatch):
    """Bitwise the same run after run; pre within one storage ulp of the FMA kernels' (the two sum the
    products in different fp32 orders, so the rounding to bf16 may flip) plus what the tensor-core
    weights' hi + lo split allows (2^-17 relative a weight: 2^-15 of the sum of |w*x| covers it with
    room; near zero a relative bound alone fails for no fault: a CPU model of the two roundings gave
    43 such elements of 262144), the statistics close.  The same bound fails 30000 elements with the
    lo parts dropped."""
    a = make_inputs(4, 64, 32, 32, 7, torch.bfloat16, "cuda", bias=True, seed=11)
    args = (a["x"], a["weight"], a["bias"], a["scale"], a["shift"], 2, True, True)
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "0")
    pre_fma, mean_fma, var_fma = ops.dw_conv_stats(a["x"], a["weight"], a["bias"], 2, True)
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "require")
    bargs = (a["dy"], a["x"], a["pre"], a["weight"], a["scale"], a["shift"], a["mean"], a["ca"], a["cb"], a["cd"],
             2, True, True)
    first = [ops.dw_fwd(*args), *ops.dw_conv_stats(a["x"], a["weight"], a["bias"], 2, True), *ops.dw_bwd(*bargs)]
    second = [ops.dw_fwd(*args), *ops.dw_conv_stats(a["x"], a["weight"], a["bias"], 2, True), *ops.dw_bwd(*bargs)]
    for u, v in zip(first, second):
        assert torch.equal(u, v)
    pre, mean, var = first[1:4]
    diff = (pre.float() - pre_fma.float()).abs()
    k = a["weight"].shape[-1]
    abs_sum = torch.nn.functional.conv2d(a["x"].float().abs(), a["weight"].float().abs(), padding=k // 2,
                                         groups=a["x"].shape[1])
    bound = 2.0 ** -7 * torch.maximum(pre.float().abs(), pre_fma.float().abs()) + 2.0 ** -15 * abs_sum
    assert bool((diff <= bound).all()), float((diff / bound).max())
    assert torch.allclose(mean, mean_fma, rtol=1e-3, atol=1e-4)
    assert torch.allclose(var, var_fma, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not _mma_runs_here(), reason="mma.sync needs compute capability 8.0 or newer")
def test_mma_default_cases(ops, monkeypatch):
    """With CONVMIXER_KERNELS_DW_MMA unset the tensor-core kernels run the eval forward (dw_fwd) at k=9 and
    at k=7 in channels_last, and the training ops at k=9 in channels_last (where they were measured
    faster), and nothing else: the default result is bitwise the =require one there and the =0 (FMA) one
    elsewhere, and the two kernels' results differ in those cases (so the comparison can tell them apart)."""
    for k, cl, dtype, mma in [(9, False, torch.bfloat16, True), (9, True, torch.float16, True),
                              (7, True, torch.bfloat16, True), (7, False, torch.bfloat16, False),
                              (5, True, torch.bfloat16, False), (9, False, torch.float32, False)]:
        a = make_inputs(2, 40, 24, 24, k, dtype, "cuda", channels_last=cl, bias=True, seed=k)
        args = (a["x"], a["weight"], a["bias"], a["scale"], a["shift"], 2, True, True)
        out = {}
        for mode in (None, "0", "require"):
            if mode is None:
                monkeypatch.delenv("CONVMIXER_KERNELS_DW_MMA", raising=False)
            else:
                monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", mode)
            if mode == "require" and not mma:
                continue
            out[mode] = (ops.dw_fwd(*args), ops.dw_conv_stats(a["x"], a["weight"], a["bias"], 2, True)[0])
        case = f"k={k} {'cl' if cl else 'nchw'} {dtype}"
        if mma and k == 9 and cl:
            assert torch.equal(out[None][1], out["require"][1]), f"{case}: statistics forward not on tensor cores"
        else:
            assert torch.equal(out[None][1], out["0"][1]), f"{case}: the statistics forward left the FMA kernels"
        if mma:
            assert torch.equal(out[None][0], out["require"][0]), f"{case}: the eval forward is not the tensor-core one"
            assert not torch.equal(out["0"][0], out["require"][0]), f"{case}: FMA and tensor-core results equal"
        else:
            assert torch.equal(out[None][0], out["0"][0]), f"{case}: the eval forward left the FMA kernels"


@pytest.mark.skipif(not _mma_runs_here(), reason="the default uses the tensor-core kernels only on sm_80+")
@pytest.mark.parametrize("k,cl,dtype,copies", [(9, False, torch.bfloat16, None), (9, True, torch.float16, None),
                                               (7, True, torch.bfloat16, None), (9, True, torch.bfloat16, "1"),
                                               (7, True, torch.float16, "0")],
                         ids=["k9-nchw-bf16", "k9-cl-fp16", "k7-cl-bf16", "k9-cl-bf16-copies", "k7-cl-fp16-nocopies"])
def test_fma_kernels_where_tensor_cores_are_default(ops, monkeypatch, k, cl, dtype, copies):
    """CONVMIXER_KERNELS_DW_MMA=0 keeps the FMA kernels selectable where the tensor-core ones are the default
    (these cases ran on them before): every op against the spec, and both plans of the channels_last FMA
    backward (CONVMIXER_KERNELS_DW_BWD_COPIES)."""
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "0")
    if copies is not None:
        monkeypatch.setenv("CONVMIXER_KERNELS_DW_BWD_COPIES", copies)
    inp = make_inputs(2, 40, 17, 24, k, dtype, "cuda", channels_last=cl, bias=True, seed=k + 3)  # 16-byte paths
    check_all_ops(ops, inp, 2, True, True, dtype, cl)


def _kernels_run(fn) -> list[str]:
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("k,dtype,C,W,cl,act,act_first,mma",
                         [(7, torch.bfloat16, 40, 24, True, 2, True, False),
                          (5, torch.float32, 36, 24, True, 4, False, False),
                          (9, torch.float16, 64, 24, True, 3, True, False),
                          (7, torch.bfloat16, 37, 24, True, 1, True, False),
                          (5, torch.bfloat16, 44, 24, True, 2, False, False),
                          (7, torch.bfloat16, 37, 24, False, 2, True, False),
                          (9, torch.float32, 8, 20, False, 1, False, False),
                          (7, torch.float16, 8, 22, False, 4, True, False),
                          (9, torch.bfloat16, 64, 24, True, 2, True, True),
                          (5, torch.float16, 37, 23, True, 3, False, True),
                          (7, torch.bfloat16, 16, 24, False, 2, True, True)],
                         ids=["cl-k7-bf16", "cl-k5-fp32", "cl-k9-fp16", "cl-k7-bf16-C37", "cl-k5-bf16-C44",
                              "nchw-k7-bf16", "nchw-k9-fp32", "nchw-k7-fp16-W22", "mma-cl-k9-bf16",
                              "mma-cl-k5-fp16-C37", "mma-nchw-k7-bf16"])
def test_backward_dpre_pass(ops, monkeypatch, k, dtype, C, W, cl, act, act_first, mma):
    """The depthwise backward takes dpre from the fp32 pass (dw_launch.cu launch_dpre_pass): the FMA kernels
    where 16-byte fp32 vectors fit their tile rows (channels_last: 4 | C; NCHW: 4 | W), the tensor-core ones
    in channels_last (mma; CONVMIXER_KERNELS_DW_MMA=require).  With CONVMIXER_KERNELS_DW_BWD_DPRE=0, or
    elsewhere, they compute it while staging.  The pass's kernel runs exactly then, both paths match the
    spec, and since the pass evaluates the same dpre_t the gradients are bitwise those of the staging path.
    (The FMA channels_last plan with the cp.async copies is forced: the pass needs them.)"""
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "require" if mma else "0")
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_BWD_COPIES", "1")
    inp = make_inputs(2, C, 17, W, k, dtype, "cuda", channels_last=cl, bias=True, seed=k + C)
    args = [inp[a] for a in BWD_ARGS]
    fits = cl if mma else (C % 4 == 0 if cl else W % 4 == 0)
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("CONVMIXER_KERNELS_DW_BWD_DPRE", mode)
        check_all_ops(ops, inp, act, act_first, True, dtype, cl)
        names = _kernels_run(lambda: out.__setitem__(mode, ops.dw_bwd(*args, act, act_first, True)))
        ran = any("channel_cl_kernel" in n or "channel_nchw_kernel" in n for n in names)
        assert ran == (mode == "1" and fits), f"DW_BWD_DPRE={mode} C={C} W={W}: dpre pass ran={ran} ({names})"
    for name, a, b in zip(("dx", "dweight", "dbias"), out["1"], out["0"]):
        assert torch.equal(a, b), f"{name}: the pass's dpre differs from the staged one"


@pytest.mark.parametrize("k,dtype,shape,act,act_first,residual,ipb",
                         [(7, torch.bfloat16, (2, 40, 17, 24), 2, True, True, None),
                          (5, torch.float16, (2, 36, 9, 33), 3, False, True, None),
                          (3, torch.float32, (3, 64, 5, 10), 4, True, False, "3"),
                          (7, torch.float16, (2, 64, 32, 32), 1, True, True, None),
                          (7, torch.bfloat16, (2, 64, 32, 32), 2, True, True, "3"),
                          (7, torch.bfloat16, (1, 8, 150, 20), 6, False, True, "32")],
                         ids=["k7-bf16", "k5-fp16-W33", "k3-fp32-H5-ipb3", "k7-fp16-32x32", "k7-bf16-32x32-ipb3",
                              "k7-bf16-H150-ipb32"])
def test_backward_cl_regs(ops, monkeypatch, k, dtype, shape, act, act_first, residual, ipb):
    """The channels_last backward with its weight-gradient partials in registers (dw_bwd_cl_regs.cuh;
    CONVMIXER_KERNELS_DW_BWD_REGS=require: it runs or the op fails): every op against the spec, its kernel
    (and the dpre pass) launched, bitwise the same on a second run, and =1 runs the same kernel.  Small
    shapes give one item a block on a full GPU; ipb forces several (the two dpre tiles alternate while the
    next one is copied in, as at the benchmarks' N=64: about 11 a block), with a partial last run."""
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_MMA", "0")
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_BWD_REGS", "require")
    if ipb is not None:
        monkeypatch.setenv("CONVMIXER_KERNELS_DW_ITEMS_PER_BLOCK", ipb)
    inp = make_inputs(*shape, k, dtype, "cuda", channels_last=True, bias=True, seed=k + shape[1])
    check_all_ops(ops, inp, act, act_first, residual, dtype, True)
    args = [inp[a] for a in BWD_ARGS]
    out = {}
    names = _kernels_run(lambda: out.__setitem__("a", ops.dw_bwd(*args, act, act_first, residual)))
    assert any("dw_bwd_cl_regs_kernel" in n for n in names), names
    assert any("channel_cl_kernel" in n for n in names), f"no dpre pass: {names}"
    out["b"] = ops.dw_bwd(*args, act, act_first, residual)
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_BWD_REGS", "1")
    out["c"] = ops.dw_bwd(*args, act, act_first, residual)
    for name, a, b, c in zip(("dx", "dweight", "dbias"), out["a"], out["b"], out["c"]):
        assert torch.equal(a, b), f"{name}: two runs differ"
        assert torch.equal(a, c), f"{name}: =1 and =require differ"


def test_backward_cl_regs_require_refuses(ops, monkeypatch):
    """=require where the register partials do not apply (k = 9) raises naming the variable."""
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_BWD_REGS", "require")
    inp = make_inputs(2, 16, 12, 16, 9, torch.bfloat16, "cuda", channels_last=True, bias=True, seed=1)
    args = [inp[a] for a in BWD_ARGS]
    with pytest.raises(RuntimeError, match="CONVMIXER_KERNELS_DW_BWD_REGS=require"):
        ops.dw_bwd(*args, 2, True, True)
