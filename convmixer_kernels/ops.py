"""Op registration: fake (meta) implementations, the Triton ops, and the differentiable block op.

Low-level ops (schemas in csrc/ops.cpp, spec in torch_ops.py), one set per compiled backend:
    torch.ops.convmixer_kernels.{dw_conv_stats, dw_fwd, dw_bwd_reduce, dw_bwd}            C++ CPU / CUDA
    torch.ops.convmixer_kernels.{dw_conv_stats, ...}_triton                                Triton
The block op `torch.ops.convmixer_kernels.dw_block` composes them (forward: statistics pass +
normalising pass, or one pass in eval) and has autograd registered, so `torch.compile(fullgraph=True)`
sees one opaque node for the forward and traceable low-level ops in the backward."""

from __future__ import annotations

import functools
import os
import types
import weakref

import torch

from . import _ext, torch_ops
from .torch_ops import acc_dtype
from .utils import cast, memory_format_of, peek_functorch

LIB = "convmixer_kernels"


# ---------------------------------------------------------------------------------------------
# Fake implementations (shapes, dtypes and memory formats only).
def _like_x(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _vec_like(x: torch.Tensor, c: int | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[1] if c is None else c,), dtype=acc_dtype(x.dtype))


def _out_like(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((x.shape[0], c, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _fake_dw_conv_stats(x, weight, bias, act, act_first):
    return _like_x(x), _vec_like(x), _vec_like(x)


def _fake_dw_fwd(x, weight, bias, scale, shift, act, act_first, residual):
    return _like_x(x)


def _fake_dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act, act_first):
    return _vec_like(pre), _vec_like(pre)


def _fake_dw_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act, act_first, residual):
    return _like_x(x), weight.new_empty(weight.shape, dtype=acc_dtype(x.dtype)), _vec_like(x)


def _fake_pw_gemm_stats(x, t, weight, bias, act, act_first):
    co = weight.shape[0]
    return _out_like(x, co, x.shape[2], x.shape[3]), _vec_like(x, co), _vec_like(x, co)


def _fake_pw_fwd(x, t, weight, bias, scale, shift, act, act_first):
    return _out_like(x, weight.shape[0], x.shape[2], x.shape[3])


def _fake_pw_bwd(dy, x, t, pre, weight, scale, shift, mean, ca, cb, cd, act, act_first):
    return _like_x(x), torch.empty_like(weight), _vec_like(x, weight.shape[0])


def _fake_stem_gemm_stats(x, weight, bias, act, act_first):
    co, p = weight.shape[0], weight.shape[-1]
    return _out_like(x, co, x.shape[2] // p, x.shape[3] // p), _vec_like(x, co), _vec_like(x, co)


def _fake_stem_fwd(x, weight, bias, scale, shift, act, act_first):
    p = weight.shape[-1]
    return _out_like(x, weight.shape[0], x.shape[2] // p, x.shape[3] // p)


def _fake_stem_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act, act_first, need_dx):
    return (_like_x(x) if need_dx else x.new_empty((0,))), torch.empty_like(weight), _vec_like(x, weight.shape[0])


def _fake_bn_act_fwd(pre, scale, shift, act, act_first, residual=None):
    return _like_x(pre)


def _fake_bn_act_bwd(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first):
    return _like_x(pre)


# name -> (schema, fake, Triton module).  The schemas mirror csrc/ops.cpp exactly (tests/test_ops.py checks
# that they agree), so the Triton ops are the same ops under a `_triton` suffix.
OPS = {
    "dw_conv_stats": ("(Tensor x, Tensor weight, Tensor? bias, int act, bool act_first)"
                      " -> (Tensor pre, Tensor mean, Tensor var)", _fake_dw_conv_stats, "dw"),
    "dw_fwd": ("(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor shift, int act, bool act_first,"
               " bool residual) -> Tensor", _fake_dw_fwd, "dw"),
    "dw_bwd_reduce": ("(Tensor dy, Tensor pre, Tensor scale, Tensor shift, Tensor mean, Tensor invstd, int act,"
                      " bool act_first) -> (Tensor sum_g, Tensor sum_gxhat)", _fake_dw_bwd_reduce, "dw"),
    "dw_bwd": ("(Tensor dy, Tensor x, Tensor pre, Tensor weight, Tensor scale, Tensor shift, Tensor mean,"
               " Tensor ca, Tensor cb, Tensor cd, int act, bool act_first, bool residual)"
               " -> (Tensor dx, Tensor dweight, Tensor dbias)", _fake_dw_bwd, "dw"),
    "pw_gemm_stats": ("(Tensor x, Tensor? t, Tensor weight, Tensor? bias, int act, bool act_first)"
                      " -> (Tensor pre, Tensor mean, Tensor var)", _fake_pw_gemm_stats, "pw"),
    "pw_fwd": ("(Tensor x, Tensor? t, Tensor weight, Tensor? bias, Tensor scale, Tensor shift, int act,"
               " bool act_first) -> Tensor", _fake_pw_fwd, "pw"),
    "pw_bwd": ("(Tensor dy, Tensor x, Tensor? t, Tensor pre, Tensor weight, Tensor scale, Tensor shift,"
               " Tensor mean, Tensor ca, Tensor cb, Tensor cd, int act, bool act_first)"
               " -> (Tensor ds, Tensor dweight, Tensor dbias)", _fake_pw_bwd, "pw"),
    "stem_gemm_stats": ("(Tensor x, Tensor weight, Tensor? bias, int act, bool act_first)"
                        " -> (Tensor pre, Tensor mean, Tensor var)", _fake_stem_gemm_stats, "pw"),
    "stem_fwd": ("(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor shift, int act,"
                 " bool act_first) -> Tensor", _fake_stem_fwd, "pw"),
    "stem_bwd": ("(Tensor dy, Tensor x, Tensor pre, Tensor weight, Tensor scale, Tensor shift,"
                 " Tensor mean, Tensor ca, Tensor cb, Tensor cd, int act, bool act_first, bool need_dx)"
                 " -> (Tensor dx, Tensor dweight, Tensor dbias)", _fake_stem_bwd, "pw"),
    "bn_act_fwd": ("(Tensor pre, Tensor scale, Tensor shift, int act, bool act_first, Tensor? residual=None)"
                   " -> Tensor",
                   _fake_bn_act_fwd, "pw"),
    "bn_act_bwd": ("(Tensor dy, Tensor pre, Tensor scale, Tensor shift, Tensor mean, Tensor ca,"
                   " Tensor cb, Tensor cd, int act, bool act_first) -> Tensor", _fake_bn_act_bwd, "pw"),
}

if _ext.loaded():
    for _name, (_schema, _fake, _mod) in OPS.items():
        if hasattr(torch.ops.convmixer_kernels, _name):
            torch.library.register_fake(f"{LIB}::{_name}", _fake)


# The per-channel BatchNorm ops of the extension (csrc/ops.cpp, arithmetic in csrc/bn_math.h): the (C,)
# vectors around a block op, one kernel (or CPU loop) each where PyTorch took five to seven small ops.  A
# training step of a block made about seventeen of those (on a GPU as many launches, and their host time);
# with these, three.  No Triton variants: they serve every compiled backend.
def _fake_bn_params(mean, var, weight, bias, eps):
    return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)


def _fake_bn_bwd_coefs(sum_g, sum_gxhat, scale, invstd, count, batch_stats):
    return torch.empty_like(sum_g), torch.empty_like(sum_g)


def _fake_bn_update_running(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


BN_OPS = {"bn_params": _fake_bn_params, "bn_bwd_coefs": _fake_bn_bwd_coefs,
          "bn_update_running": _fake_bn_update_running}
_HAS_BN_OPS = _ext.loaded() and all(hasattr(torch.ops.convmixer_kernels, n) for n in BN_OPS)
if _HAS_BN_OPS:
    for _name, _fake in BN_OPS.items():
        torch.library.register_fake(f"{LIB}::{_name}", _fake)


def bn_ops_ok(backend: str, first: torch.Tensor, *vecs) -> bool:
    """Whether a block's BatchNorm bookkeeping runs as the bn_* ops: a compiled backend (the `torch`
    backend stays plain PyTorch: it is the specification), the extension built for the device, no functorch
    transform (the ops have no batching rules), and every vector (None allowed) in first's dtype and
    contiguous.  Otherwise the PyTorch ops, which also cast (a model converted to bfloat16 keeps bfloat16 BN
    parameters while the statistics are float32)."""
    if backend == "torch" or not _HAS_BN_OPS or peek_functorch() is not None:
        return False
    if os.environ.get("CONVMIXER_KERNELS_BN_OPS") == "0":  # the PyTorch ops (benchmark provider cuda_bn_torch)
        return False
    dev = first.device.type
    dt = first.dtype
    if not (dev == "cpu" or (dev == "cuda" and _ext.built_with_cuda())) or dt not in _BN_DTYPES:
        return False
    for v in (first,) + vecs:  # a plain loop: this runs three times a block step (host time)
        if v is not None and (v.dtype != dt or not v.is_contiguous()):
            return False
    return True


_BN_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Triton ops: the same schemas with a `_triton` suffix, implemented for CPU (interpreter) and CUDA
# by the launchers in convmixer_kernels/triton/ (imported lazily: the package works without triton).
# (torch.library.triton_op cannot trace under the CPU interpreter; plain definitions + fakes can.)
def _triton_impl(name: str, module: str):
    def impl(*args):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.triton.{module}"), name)(*args)

    impl.__name__ = f"{name}_triton"
    return impl


_triton_lib = torch.library.Library(LIB, "FRAGMENT")
for _name, (_schema, _fake, _mod) in OPS.items():
    _triton_lib.define(f"{_name}_triton{_schema}")
    for _key in ("CPU", "CUDA"):
        _triton_lib.impl(f"{_name}_triton", _triton_impl(_name, _mod), _key)
    torch.library.register_fake(f"{LIB}::{_name}_triton", _fake)


@functools.lru_cache(maxsize=None)  # built once: the ops are registered at import and never change
def _ops_namespace(suffix: str):
    o = torch.ops.convmixer_kernels
    return types.SimpleNamespace(**{n: getattr(o, n + suffix) for n in OPS if hasattr(o, n + suffix)})


def backend_ops(backend: str):
    """The low-level ops of a concrete backend, as a namespace (torch_ops for `torch`)."""
    if backend == "torch":
        return torch_ops
    if backend in ("cpu", "cuda"):
        return _ops_namespace("")
    if backend == "triton":
        return _ops_namespace("_triton")
    raise ValueError(f"backend: expected a concrete backend (cuda, triton, cpu, torch), got {backend!r}")


# ---------------------------------------------------------------------------------------------
# BatchNorm helpers shared by the block ops (per-channel math on (C,) vectors: negligible cost).
def _bn_affine(C, acc, device, bn_weight, bn_bias):
    gamma = torch.ones(C, dtype=acc, device=device) if bn_weight is None else cast(bn_weight, acc)
    beta = torch.zeros(C, dtype=acc, device=device) if bn_bias is None else cast(bn_bias, acc)
    return gamma, beta


def _bn_scale_shift(C, acc, device, bn_weight, bn_bias, mean, var, eps, backend="torch"):
    """(invstd, scale, shift): invstd = 1/sqrt(var + eps), scale = gamma*invstd, shift = beta - mean*scale."""
    if bn_ops_ok(backend, mean, var, bn_weight, bn_bias):
        return torch.ops.convmixer_kernels.bn_params(mean, var, bn_weight, bn_bias, eps)
    gamma, beta = _bn_affine(C, acc, device, bn_weight, bn_bias)
    invstd = torch.rsqrt(var + eps)
    scale = gamma * invstd
    return invstd, scale, beta - mean * scale


def _keep(keep, bn, w):
    """Hands the forward's (invstd, scale, shift) and kernel weight to the caller that asked for them (keep: a
    list or None)."""
    if keep is not None:
        keep.append((bn, w))


def _kept_or(ctx, compute):
    """The forward's (invstd, scale, shift) when its caller kept them on ctx (ops.block_direct: an op, or a
    kernel launch, fewer in each backward), else computed again (the custom op's autograd,
    whose context only sees the op's inputs and outputs).  The same values either way."""
    bn = getattr(ctx, "bn", None)
    return bn if bn is not None else compute()


def _kept_weight(ctx, kind, weight, x):
    """The forward's kernel weight when kept on ctx (under autocast a GEMM weight's cast copy: as eager's
    autocast casts a weight once a step, not again in the backward), else _kernel_weight's."""
    w = getattr(ctx, "w", None)
    return w if w is not None else _kernel_weight(kind, weight, x)


def _process_group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _sync_stats(mean, var, count, group: str):
    """Merge per-rank (count, mean, biased var) over the process group, in rank order (deterministic);
    every rank gets the statistics of the concatenated batch.  No host synchronisation."""
    import torch.distributed as dist

    pg = _process_group(group)
    local = torch.stack([count.expand_as(mean), mean, var])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, local, group=pg)
    n, m, v = parts[0][0], parts[0][1], parts[0][2]
    for p in parts[1:]:  # Chan et al.: pairwise merge of (count, mean, M2)
        n2, m2, v2 = p[0], p[1], p[2]
        tot = n + n2
        delta = m2 - m
        m = m + delta * (n2 / tot)
        v = (v * n + v2 * n2 + delta * delta * (n * n2 / tot)) / tot
        n = tot
    return m, v, n[0]


def _all_reduce(t, group: str):
    import torch.distributed as dist

    dist.all_reduce(t, group=_process_group(group))
    return t


def _bn_bwd_coefs(ops, dy, pre, invstd, scale, shift, mean, count, act, act_first, batch_stats, group, backend):
    """BN backward sums (local dbeta, dgamma) and the per-channel coefficients of dpre (see torch_ops.dw_bwd);
    with a sync group the sums entering the coefficients are the group's (as nn.SyncBatchNorm does)."""
    sum_g, sum_gx = ops.dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act, act_first)
    ca = scale
    n = pre.numel() // pre.shape[1]  # values per channel: count's value without reading the device tensor
    if not group and type(n) is int and bn_ops_ok(backend, sum_g, sum_gx, scale, invstd):
        cb, cd = torch.ops.convmixer_kernels.bn_bwd_coefs(sum_g, sum_gx, scale, invstd, float(n), batch_stats)
        return sum_g, sum_gx, ca, cb, cd
    if batch_stats:
        g_sum, gx_sum = sum_g, sum_gx
        if group:
            both = _all_reduce(torch.stack([sum_g, sum_gx]), group)
            g_sum, gx_sum = both[0], both[1]
        cb, cd = -ca * invstd * gx_sum / count, -ca * g_sum / count
    else:
        cb, cd = torch.zeros_like(ca), torch.zeros_like(ca)
    return sum_g, sum_gx, ca, cb, cd


def _statistics(stats_fn, x, c_out, running_mean, running_var, batch_stats, need_pre, count_local, group):
    """(pre or empty, mean, var, count): batch statistics (synced over `group` if given) or the running ones."""
    acc = acc_dtype(x.dtype)
    count = torch.full((), float(count_local), dtype=acc, device=x.device)
    if batch_stats or need_pre:
        pre, mean, var = stats_fn()
        if batch_stats and group:
            mean, var, count = _sync_stats(mean, var, count, group)
    else:
        pre = x.new_empty((0,))
    if not batch_stats:
        mean, var = cast(running_mean, acc).clone(), cast(running_var, acc).clone()
    return pre, mean, var, count


_BLOCK_OUT = "-> (Tensor y, Tensor pre, Tensor mean, Tensor var, Tensor count)"
_BN_ARGS = ("Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, float eps, int act, "
            "bool act_first")
_FLAGS = "bool batch_stats, bool need_pre, str sync_group, str backend"


def _kernel_weight(kind, weight, x):
    """The weight as the kernels take it, contiguous (tiny; a model moved to channels_last has channels_last
    weights): depthwise in the accumulation dtype (its FMAs run in fp32), the GEMMs' in the storage dtype
    (the tensor-core operand, as autocast feeds cuBLAS)."""
    return cast(weight, acc_dtype(x.dtype) if kind == "dw" else x.dtype).contiguous()


def _fwd_kernel(kind, ops, x, t, w, b, scale, shift, act, act_first, residual):
    """y of a block ("dw", "pw", "stem") from its eval forward kernel (w from _kernel_weight)."""
    if kind == "dw":
        return ops.dw_fwd(x, w, b, scale, shift, act, act_first, residual)
    if kind == "pw":
        return ops.pw_fwd(x, t, w, b, scale, shift, act, act_first)
    return ops.stem_fwd(x, w, b, scale, shift, act, act_first)


# ---------------------------------------------------------------------------------------------
# The differentiable block ops.  They return (y, pre, mean, var, count): pre = the conv/GEMM output
# before the norm (saved for backward; empty unless batch_stats or need_pre), mean/var = the statistics
# BN normalised with (batch, biased, synced over sync_group if not ""; or the running ones), count = the
# number of values per channel behind them.  Argument checking and BN bookkeeping: functional.py.
@torch.library.custom_op(f"{LIB}::dw_block", mutates_args=(),
                         schema=f"(Tensor x, Tensor weight, Tensor? bias, {_BN_ARGS}, bool residual, {_FLAGS}) "
                                f"{_BLOCK_OUT}")
def dw_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, residual,
             batch_stats, need_pre, sync_group, backend):
    """y = [x +] BN(act(DWConv(x) + bias)) (act_first) or [x +] act(BN(DWConv(x) + bias))."""
    return _dw_block_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first,
                             residual, batch_stats, need_pre, sync_group, backend)


def _dw_block_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, residual,
                      batch_stats, need_pre, sync_group, backend, *, keep=None):
    ops = backend_ops(backend)
    acc = acc_dtype(x.dtype)
    w = _kernel_weight("dw", weight, x)
    b = None if bias is None else cast(bias, acc)
    pre, mean, var, count = _statistics(lambda: ops.dw_conv_stats(x, w, b, act, act_first), x, x.shape[1],
                                        running_mean, running_var, batch_stats, need_pre,
                                        x.shape[0] * x.shape[2] * x.shape[3], sync_group)
    bn = _bn_scale_shift(x.shape[1], acc, x.device, bn_weight, bn_bias, mean, var, eps, backend)
    _keep(keep, bn, w)
    _i, scale, shift = bn
    if batch_stats or need_pre:
        # pre is at hand (training): y from it in one elementwise pass (read pre and x, write y) instead
        # of computing the convolution again; the same values (pre is the rounded conv output both use).
        y = ops.bn_act_fwd(pre, scale, shift, act, act_first, x if residual else None)
    else:
        y = _fwd_kernel("dw", ops, x, None, w, b, scale, shift, act, act_first, residual)
    return y, pre, mean, var, count


def block_eval(kind, x, t, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first,
               residual, backend):
    """y of a block op ("dw", "pw", "stem") in eval with running statistics (batch_stats = need_pre =
    False), computed as the op computes it (same kernels, same scale and shift) but without the custom-op
    dispatch: functional.py calls it when autograd will not record the op and nothing is tracing.  That
    dispatch (autograd key, redispatch, the Python op wrapper) and the op's extra outputs cost about a
    third of a block's host time, which is what inference at a small batch on a GPU waits for."""
    w, b, scale, shift = _eval_operands(kind, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                        backend)
    return _fwd_kernel(kind, backend_ops(backend), x, t, w, b, scale, shift, act, act_first, residual)


# The eval kernels' operands (kernel weight, bias, BN scale and shift) as of the last eval call, per
# running_var (weakly: an entry goes with its module's buffer).  Folding BN into (scale, shift) is five
# small ops, on a GPU five kernel launches next to the block's one or two: for inference at a small
# batch the launches are the time.  (A large weight's cast copy, a GEMM weight under autocast, is cast
# again on each call instead of kept: keeping it would hold a second copy of the weights.)  An entry is
# used only while every source tensor is the same object (weak references), at the same version (any
# in-place change: optimizer steps, load_state_dict, copy_) and the same storage (`.data =`, `.to()`),
# with the same eps, kind, input dtype and device; so its values are what computing them again gives,
# bit for bit.  Not used while a CUDA graph is captured (the graph must read the parameters on each
# replay, or a later load_state_dict would not reach it), while torch.jit traces (a trace would keep
# them as constants) or under a functorch transform.
_EVAL_OPERANDS = torch.utils.weak.WeakIdKeyDictionary()
_KEEP_WEIGHT_COPY_MAX = 1 << 16  # elements: a depthwise weight cast to fp32 (C*k*k) is kept, a GEMM's is not
_SOURCE = object()  # an operand that is its source tensor itself


def _eval_operands(kind, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, backend):
    acc = acc_dtype(x.dtype)

    def compute():
        b = None if bias is None else cast(bias, acc)
        _i, scale, shift = _bn_scale_shift(weight.shape[0], acc, x.device, bn_weight, bn_bias,
                                           cast(running_mean, acc), cast(running_var, acc), eps, backend)
        return _kernel_weight(kind, weight, x), b, scale, shift

    if (peek_functorch() is not None or torch.jit.is_tracing()
            or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
        return compute()
    sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
    try:
        stamp = tuple(None if s is None else (s._version, s.data_ptr()) for s in sources)
    except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version counter
        return compute()
    stamp += (kind, eps, x.dtype, x.device, backend)
    entry = _EVAL_OPERANDS.get(running_var)
    if entry is not None and entry[1] == stamp and all(
            (r is None) if s is None else (r is not None and r() is s) for r, s in zip(entry[0], sources)):
        w, b, scale, shift = entry[2]
        w = weight if w is _SOURCE else (_kernel_weight(kind, weight, x) if w is None else w)
        return w, (bias if b is _SOURCE else b), scale, shift
    value = compute()
    w, b = value[0], value[1]
    # Operands that are the source tensors themselves are kept as a mark, not a reference (an entry must
    # not keep a replaced parameter alive); a copy of a large weight (a GEMM weight cast to the autocast
    # dtype) is not kept at all: that would hold a second copy of the model's weights.
    kept_w = _SOURCE if w is weight else (w if w.numel() <= _KEEP_WEIGHT_COPY_MAX else None)
    kept_b = _SOURCE if (b is not None and b is bias) else b
    _EVAL_OPERANDS[running_var] = (tuple(None if s is None else weakref.ref(s) for s in sources), stamp,
                                   (kept_w, kept_b) + tuple(value[2:]))
    return value


def _block_fake(x, c_out, h, w, batch_stats, need_pre):
    pre = _out_like(x, c_out, h, w) if (batch_stats or need_pre) else x.new_empty((0,))
    return _out_like(x, c_out, h, w), pre, _vec_like(x, c_out), _vec_like(x, c_out), \
        x.new_empty((), dtype=acc_dtype(x.dtype))


@dw_block.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, residual,
      batch_stats, need_pre, sync_group, backend):
    return _block_fake(x, x.shape[1], x.shape[2], x.shape[3], batch_stats, need_pre)


def _dw_block_setup(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, _rm, _rv, eps, act, act_first, residual, batch_stats, _np, group,
     backend) = inputs
    _y, pre, mean, var, count = output
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, pre, mean, var, count)
    ctx.cfg = (eps, act, act_first, residual, batch_stats, group, backend)


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Passes gradients through unchanged; differentiating them again raises.  The block ops' backward
    kernels have no derivatives of their own, so a second derivative through them (create_graph=True,
    then backward again: gradient penalties, MAML) would be silently wrong -- PyTorch only warns and
    treats those kernels as constants."""

    @staticmethod
    def forward(anchor, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "convmixer_kernels: the fused blocks are differentiable once; a second derivative through them "
            "(torch.autograd.grad(..., create_graph=True) and then backward again) is not supported.  Use "
            "ck.unfuse(model), or the eager modules, for double backward.")


def _first_order_only(backward):
    """Wraps a registered backward: it runs without recording, and when autograd records it
    (create_graph=True) the gradients it returns raise if they are differentiated again."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out
        idx = [i for i, g in enumerate(out) if isinstance(g, torch.Tensor)]
        if not idx:
            return out
        # a leaf that requires grad makes the outputs require it, so that differentiating them reaches backward
        anchor = torch.zeros((), device=out[idx[0]].device, requires_grad=True)
        guarded = _NotTwiceDifferentiable.apply(anchor, *(out[i] for i in idx))
        out = list(out)
        for i, g in zip(idx, guarded):
            out[i] = g
        return tuple(out)

    return wrapper


def _param_grads(weight, bias, bn_weight, bn_bias, dweight, dbias, sum_gx, sum_g):
    return (cast(dweight, weight.dtype), None if bias is None else cast(dbias, bias.dtype),
            None if bn_weight is None else cast(sum_gx, bn_weight.dtype),
            None if bn_bias is None else cast(sum_g, bn_bias.dtype))


def _dw_block_backward(ctx, dy, _dpre, _dmean, _dvar, _dcount):
    x, weight, bias, bn_weight, bn_bias, pre, mean, var, count = ctx.saved_tensors
    eps, act, act_first, residual, batch_stats, group, backend = ctx.cfg
    if pre.numel() == 0:
        raise RuntimeError("dw_block: backward needs pre; call the op with need_pre=True when gradients are needed")
    ops = backend_ops(backend)
    acc = acc_dtype(x.dtype)
    dy = dy.contiguous(memory_format=memory_format_of(x))  # no-op unless autograd handed another layout
    invstd, scale, shift = _kept_or(ctx, lambda: _bn_scale_shift(x.shape[1], acc, x.device, bn_weight, bn_bias, mean,
                                                                 var, eps, backend))
    sum_g, sum_gx, ca, cb, cd = _bn_bwd_coefs(ops, dy, pre, invstd, scale, shift, mean, count, act, act_first,
                                              batch_stats, group, backend)
    dx, dweight, dbias = ops.dw_bwd(dy, x, pre, _kept_weight(ctx, "dw", weight, x), scale, shift, mean, ca, cb, cd, act,
                                    act_first, residual)
    return (dx,) + _param_grads(weight, bias, bn_weight, bn_bias, dweight, dbias, sum_gx, sum_g) + (None,) * 10


dw_block.register_autograd(_first_order_only(_dw_block_backward), setup_context=_dw_block_setup)


# ---------------------------------------------------------------------------------------------
# The pointwise-block and stem ops: GEMM (+ stats) then the light BN pass in training (the GEMM is not
# recomputed), one GEMM with the whole epilogue in eval.
def _gemm_block_forward(kind, backend, x, t, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act,
                        act_first, batch_stats, need_pre, group, keep=None):
    ops = backend_ops(backend)
    acc = acc_dtype(x.dtype)
    w = _kernel_weight(kind, weight, x)
    b = None if bias is None else cast(bias, acc)
    C = weight.shape[0]
    p = 1 if kind == "pw" else weight.shape[-1]
    stats = (lambda: ops.pw_gemm_stats(x, t, w, b, act, act_first)) if kind == "pw" else \
        (lambda: ops.stem_gemm_stats(x, w, b, act, act_first))
    pre, mean, var, count = _statistics(stats, x, C, running_mean, running_var, batch_stats, need_pre,
                                        x.shape[0] * (x.shape[2] // p) * (x.shape[3] // p), group)
    bn = _bn_scale_shift(C, acc, x.device, bn_weight, bn_bias, mean, var, eps, backend)
    _keep(keep, bn, w)
    _i, scale, shift = bn
    if pre.numel() > 0:
        y = ops.bn_act_fwd(pre, scale, shift, act, act_first)
    else:
        y = _fwd_kernel(kind, ops, x, t, w, b, scale, shift, act, act_first, False)
    return y, pre, mean, var, count


@torch.library.custom_op(f"{LIB}::pw_block", mutates_args=(),
                         schema=f"(Tensor x, Tensor? t, Tensor weight, Tensor? bias, {_BN_ARGS}, {_FLAGS}) "
                                f"{_BLOCK_OUT}")
def pw_block(x, t, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, batch_stats,
             need_pre, sync_group, backend):
    """y = BN(act(Conv1x1(x [+ t]) + bias)) (act_first) or act(BN(...))."""
    return _pw_block_forward(x, t, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first,
                             batch_stats, need_pre, sync_group, backend)


def _pw_block_forward(x, t, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first,
                      batch_stats, need_pre, sync_group, backend, *, keep=None):
    return _gemm_block_forward("pw", backend, x, t, weight, bias, bn_weight, bn_bias, running_mean,
                               running_var, eps, act, act_first, batch_stats, need_pre, sync_group, keep)


@torch.library.custom_op(f"{LIB}::stem_block", mutates_args=(),
                         schema=f"(Tensor x, Tensor weight, Tensor? bias, {_BN_ARGS}, {_FLAGS}) {_BLOCK_OUT}")
def stem_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, batch_stats,
               need_pre, sync_group, backend):
    """y = BN(act(Conv_p,stride p(x) + bias)) (act_first) or act(BN(...))."""
    return _stem_block_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first,
                               batch_stats, need_pre, sync_group, backend)


def _stem_block_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first,
                        batch_stats, need_pre, sync_group, backend, *, keep=None):
    return _gemm_block_forward("stem", backend, x, None, weight, bias, bn_weight, bn_bias, running_mean,
                               running_var, eps, act, act_first, batch_stats, need_pre, sync_group, keep)


@pw_block.register_fake
def _(x, t, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, batch_stats, need_pre,
      sync_group, backend):
    return _block_fake(x, weight.shape[0], x.shape[2], x.shape[3], batch_stats, need_pre)


@stem_block.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, act, act_first, batch_stats, need_pre,
      sync_group, backend):
    p = weight.shape[-1]
    return _block_fake(x, weight.shape[0], x.shape[2] // p, x.shape[3] // p, batch_stats, need_pre)


def _gemm_block_setup(ctx, inputs, output):
    if len(inputs) == 15:  # pw_block
        (x, t, weight, bias, bn_weight, bn_bias, _rm, _rv, eps, act, act_first, batch_stats, _np, group,
         backend) = inputs
        ctx.kind = "pw"
    else:
        x, weight, bias, bn_weight, bn_bias, _rm, _rv, eps, act, act_first, batch_stats, _np, group, backend = inputs
        t, ctx.kind = None, "stem"
    _y, pre, mean, var, count = output
    ctx.has_t = t is not None
    ctx.save_for_backward(x, t, weight, bias, bn_weight, bn_bias, pre, mean, var, count)
    ctx.cfg = (eps, act, act_first, batch_stats, group, backend)


def _gemm_block_backward(ctx, dy, _dpre, _dmean, _dvar, _dcount):
    x, t, weight, bias, bn_weight, bn_bias, pre, mean, var, count = ctx.saved_tensors
    eps, act, act_first, batch_stats, group, backend = ctx.cfg
    if pre.numel() == 0:
        raise RuntimeError(f"{ctx.kind}_block: backward needs pre; call the op with need_pre=True for gradients")
    ops = backend_ops(backend)
    acc = acc_dtype(x.dtype)
    dy = dy.contiguous(memory_format=memory_format_of(pre))
    invstd, scale, shift = _kept_or(ctx, lambda: _bn_scale_shift(weight.shape[0], acc, x.device, bn_weight, bn_bias,
                                                                 mean, var, eps, backend))
    sum_g, sum_gx, ca, cb, cd = _bn_bwd_coefs(ops, dy, pre, invstd, scale, shift, mean, count, act, act_first,
                                              batch_stats, group, backend)
    w = _kept_weight(ctx, ctx.kind, weight, x)
    if ctx.kind == "pw":
        ds, dweight, dbias = ops.pw_bwd(dy, x, t, pre, w, scale, shift, mean, ca, cb, cd, act, act_first)
        inputs = (ds, ds if ctx.has_t else None)
    else:
        need_dx = ctx.needs_input_grad[0]
        dx, dweight, dbias = ops.stem_bwd(dy, x, pre, w, scale, shift, mean, ca, cb, cd, act, act_first, need_dx)
        inputs = (dx if need_dx else None,)
    return inputs + _param_grads(weight, bias, bn_weight, bn_bias, dweight, dbias, sum_gx, sum_g) + (None,) * 9


pw_block.register_autograd(_first_order_only(_gemm_block_backward), setup_context=_gemm_block_setup)
stem_block.register_autograd(_first_order_only(_gemm_block_backward), setup_context=_gemm_block_setup)


# ---------------------------------------------------------------------------------------------
# The same block ops without the custom-op dispatch, for eager PyTorch.  Through torch.library every
# training forward pays for the op's Python autograd wrapper (its fill_defaults re-reads the schema per
# argument), the autograd/backend redispatch and the output alias checks: about as much host time as the
# whole eager conv + act + BN it replaces (measured in benchmarks/results/NOTES.md).  functional.py calls
# these when nothing traces the op (torch.compile and export need the custom op: one opaque node with
# fakes) and no functorch transform is active (vmap and torch.func keep the op's behaviour); they run the
# same forward, save the same tensors and run the same backward, so the results are bitwise the op's.
def _direct_function(name, forward, setup, backward):
    # forward(ctx, ...) rather than a setup_context staticmethod: with one, Function.apply binds the
    # arguments to forward's signature through inspect on every call (about 40 us a block on this CPU)
    def forward_ctx(ctx, *inputs):
        kept = []
        output = forward(*inputs, keep=kept)
        setup(ctx, inputs, output)
        ctx.bn, ctx.w = kept[0]  # (invstd, scale, shift), kernel weight: backward would compute them again
        ctx.mark_non_differentiable(*output[1:])  # pre, mean, var, count: gradients flow through y only
        ctx.set_materialize_grads(False)  # no zero-filled pre-sized gradients for them
        return output

    def backward_y(ctx, dy, *_unused):
        if dy is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, dy, None, None, None, None)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Eager autograd of the {name} op, without its custom-op dispatch.",
        "forward": staticmethod(forward_ctx),
        "backward": staticmethod(_first_order_only(backward_y)),
    })


_DIRECT = {
    "dw": (_dw_block_forward, _direct_function("dw_block", _dw_block_forward, _dw_block_setup, _dw_block_backward)),
    "pw": (_pw_block_forward,
           _direct_function("pw_block", _pw_block_forward, _gemm_block_setup, _gemm_block_backward)),
    "stem": (_stem_block_forward,
             _direct_function("stem_block", _stem_block_forward, _gemm_block_setup, _gemm_block_backward)),
}


def block_direct(kind, grad, *inputs):
    """A block op ("dw", "pw", "stem") called with the op's arguments, eagerly, without its custom-op
    dispatch: through an autograd.Function when autograd records it (grad), else the forward itself."""
    forward, function = _DIRECT[kind]
    return function.apply(*inputs) if grad else forward(*inputs)
