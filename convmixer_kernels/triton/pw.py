"""Triton kernels and host launchers for the pointwise block, the patch-embedding stem and the
elementwise BatchNorm + activation ops.

The eight launchers (``pw_gemm_stats``, ``pw_fwd``, ``pw_bwd``, ``stem_gemm_stats``, ``stem_fwd``,
``stem_bwd``, ``bn_act_fwd``, ``bn_act_bwd``) have exactly the signatures and semantics of
:mod:`convmixer_kernels.torch_ops` (the executable spec; read it for what each op computes).  They
run compiled on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this
module was imported (Triton decides at decoration time whether ``@triton.jit`` compiles or
interprets).

One GEMM kernel, ``_gemm_kernel``, computes ``out[b, i, j] = sum_k A[b, i, k] * B[k, j]`` where
the rows i are output pixels and B is the weight.  It serves four ops:

* pw forward: A = x [+ t] (the residual is added in the operand load, rounded to the storage
  dtype, so it never costs a pass of its own), B = weight^T;
* stem forward: A = the im2col matrix of x, never materialized: a pixel row i and a patch column k
  are decomposed into (image, oh, ow) and (c, kh, kw) and the address is computed in the kernel;
* pw backward ds = dpre @ W and stem backward dx = dpre @ W scattered back to patch positions.

Layouts.  channels_last activations are one row-major (N*H*W, C) matrix (one "batch").  NCHW ones
are a batch of N (C, H*W) matrices: grid axis 1 is the image, and a tile's pixel rows are
contiguous in memory.  All addressing goes through strides, so neither layout is ever copied.

Epilogue (constexpr EPI): 0 stores round(acc [+ bias]); 1 (eval) stores y = BN-affine + act of
pre = round(acc + bias); 2 (stats) stores pre and, per (M-tile, channel), the tile's mean and M2 of
u = act(pre) or pre (exact two-pass over the tile in registers) to a workspace, merged per channel
in a fixed order by ``_stats_reduce_kernel`` (mean = sum(n_t mean_t) / n, M2 = sum(M2_t +
n_t (mean_t - mean)^2): no cancellation, no atomics, deterministic).

Backward.  ``_bn_act_bwd_kernel`` writes dpre (storage dtype, the GEMM operand) and per-tile
partial sums of it (dbias); ds is one GEMM; dweight = dpre^T @ S is ``_wgrad_kernel``: split-K
over pixels into fp32 partials, summed in a fixed order by ``_sum_reduce_kernel`` and rounded to
the weight's dtype.  S = x [+ t] (or the stem's patches) is recomputed in the operand load.

Precision.  fp32 accumulation and statistics everywhere; fp32 GEMMs use ``input_precision="ieee"``
(no TF32), so fp32 results match PyTorch's fp32 reference to fp32 rounding noise, and sum the K
blocks' dots with TwoSum (their rounding errors kept) rather than chaining each dot into the
accumulator (a product then sees about BK roundings, not K; see _gemm_kernel for why a plain add is
not enough on a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import _act_fwd, _act_grad  # noqa: F401  (device helpers used by the kernels)

from convmixer_kernels.utils import memory_format_of, new_output

__all__ = ["pw_gemm_stats", "pw_fwd", "pw_bwd", "stem_gemm_stats", "stem_fwd", "stem_bwd",
           "bn_act_fwd", "bn_act_bwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_GRID_AXIS_MAX = 65535

# ----------------------------------------------------------------------------------------------
# Tile configurations.  Under the interpreter autotuning would only cost time: one small config.
# ----------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group}, num_warps=warps,
                         num_stages=stages)


if _INTERPRET:
    _GEMM_CONFIGS = [_cfg(32, 32, 32, 4, 1)]
    _WGRAD_CONFIGS = [_cfg(32, 32, 16, 4, 1)]
    _WGRAD_GRANULE = 16          # pixels per split are a multiple of this
    _WGRAD_TARGET_PROGRAMS = 8   # small, but > 1 split on test shapes: exercises the reduction
else:
    _GEMM_CONFIGS = [
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 128, 32, 8, 3),   # fits fp32 operands
        _cfg(64, 64, 32, 4, 3),     # small problems, fp32
    ]
    _WGRAD_CONFIGS = [
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 32, 8, 3),
        _cfg(64, 64, 32, 4, 3),
    ]
    _WGRAD_GRANULE = 256
    _WGRAD_TARGET_PROGRAMS = None  # 2 x number of SMs, read from the device

_SMALL_GEMM = 1 << 24  # M*N*K below this: no autotuning, the last (smallest) config


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot help: fp32 operands need BK <= 32 tiles (shared memory); small
    problems take the smallest config without benchmarking."""
    if len(configs) <= 1:
        return configs
    M, N, K = named_args["M"], named_args["N"], named_args["K"]
    if M * N * K < _SMALL_GEMM:
        return [configs[-1]]
    a = named_args.get("a_ptr")
    if a is not None and getattr(a, "dtype", None) == torch.float32:
        fp32 = [c for c in configs if c.kwargs["BK"] <= 32]
        return fp32 or configs[-1:]
    return configs


_MIN_BM = min(c.kwargs["BM"] for c in _GEMM_CONFIGS)

# ----------------------------------------------------------------------------------------------
# Device helpers (inlined)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bn_act(pre, scale, shift, act, act_first):
    """y = scale*act(pre)+shift (act_first) or act(scale*pre+shift)."""
    if act_first:
        y = scale * _act_fwd(pre, act) + shift
    else:
        y = _act_fwd(scale * pre + shift, act)
    return y


@triton.jit
def _dpre(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first):
    """The gradient at pre (see torch_ops.bn_act_bwd), float32."""
    if act_first:
        d = ca * dy + cb * (_act_fwd(pre, act) - mean) + cd
        d = d * _act_grad(pre, act)
    else:
        g = dy * _act_grad(scale * pre + shift, act)
        d = ca * g + cb * (pre - mean) + cd
    return d


@triton.jit
def _patch_row(i, HWo, Wo, sN, sH, sW, P: tl.constexpr):
    """int64 offset of the top-left pixel of patch row i = (image, oh, ow) of a stride-P conv."""
    img = i // HWo
    r = i - img * HWo
    oh = r // Wo
    ow = r - oh * Wo
    return img.to(tl.int64) * sN + (oh * P).to(tl.int64) * sH + (ow * P).to(tl.int64) * sW


@triton.jit
def _patch_col(k, Cimg, sC, sH, sW, P: tl.constexpr, C_FAST: tl.constexpr):
    """Offset of patch column k inside a patch: k = (kh*P + kw)*Cimg + c when C_FAST (channels_last
    x: c is contiguous), else k = (c*P + kh)*P + kw (NCHW x: kw is contiguous)."""
    if C_FAST:
        q = k // Cimg
        c = k - q * Cimg
    else:
        c = k // (P * P)
        q = k - c * (P * P)
    kh = q // P
    kw = q - kh * P
    return c.to(tl.int64) * sC + kh.to(tl.int64) * sH + kw.to(tl.int64) * sW


@triton.jit
def _two_sum_into(acc, comp, part):
    """(s, comp + e) with s = fl(acc + part) and e its exact rounding error (Knuth's TwoSum: no assumption
    on which of acc and part is larger)."""
    s = acc + part
    bb = s - acc
    e = (acc - (s - bb)) + (part - bb)
    return s, comp + e


@triton.jit
def _with_comp(acc, comp):
    """acc + comp where acc is finite; a non-finite acc as it is (an Inf stays Inf: its TwoSum error terms
    are Inf - Inf = NaN, and a sum that once was Inf or NaN never comes back finite)."""
    return tl.where(tl.abs(acc) < float("inf"), acc + comp, acc)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile (m, n) of program pid, GROUP_M row-tiles at a time (L2 reuse of the B operand)."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# GEMM with fused prologue / epilogue (pw and stem forward, ds, stem dx)
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_GEMM_CONFIGS,
                 key=["M", "N", "K", "EPI", "HAS_T", "A_PATCH", "B_KPATCH", "B_JPATCH", "O_PATCH", "P"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["act", "act_first"])
def _gemm_kernel(a_ptr, t_ptr, b_ptr, o_ptr, bias_ptr, scale_ptr, shift_ptr, wsm_ptr, wsv_ptr,
                 M, N, K, HWo, Wo, Cimg,
                 a_sb, a_sm, a_sk, a_sn, a_sc, a_sh, a_sw,
                 b_sk, b_sj, b_sc, b_sh, b_sw,
                 o_sb, o_sm, o_sj, o_sn, o_sc, o_sh, o_sw,
                 act, act_first,
                 EPI: tl.constexpr, HAS_T: tl.constexpr, HAS_BIAS: tl.constexpr,
                 A_PATCH: tl.constexpr, B_KPATCH: tl.constexpr, B_JPATCH: tl.constexpr,
                 O_PATCH: tl.constexpr, P: tl.constexpr, C_FAST: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[b, i, j] = sum_k A[b, i, k] * B[k, j], i < M pixel rows of batch b, j < N, k < K.

    A: plain (a_sb*b + a_sm*i + a_sk*k) or, A_PATCH, the stem's patches of x (a_sn.. strides).
    B: plain (b_sk*k + b_sj*j), B_KPATCH: k is a patch column of the weight (stem forward),
    B_JPATCH: j is (stem dx).  Output: plain (o_sb, o_sm, o_sj) or O_PATCH (scatter to patches)."""
    pid = tl.program_id(0)
    bidx = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N

    # Row part of the A addresses and column part of the B addresses: fixed over the K loop.
    if A_PATCH:
        a_row = bidx * a_sb + _patch_row(rm, HWo, Wo, a_sn, a_sh, a_sw, P)
    else:
        a_row = bidx * a_sb + rm.to(tl.int64) * a_sm
    if B_JPATCH:
        b_col = _patch_col(rn, Cimg, b_sc, b_sh, b_sw, P, C_FAST)
    else:
        b_col = rn.to(tl.int64) * b_sj

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    comp = tl.zeros((BM, BN), dtype=tl.float32)  # fp32 (IEEE): the rounding errors of the block sums
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        if A_PATCH:
            a_col = _patch_col(kk, Cimg, a_sc, a_sh, a_sw, P, C_FAST)
        else:
            a_col = kk.to(tl.int64) * a_sk
        a_off = a_row[:, None] + a_col[None, :]
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        if HAS_T:
            t = tl.load(t_ptr + a_off, mask=a_mask, other=0.0)
            a = (a.to(tl.float32) + t.to(tl.float32)).to(a_ptr.dtype.element_ty)
        if B_KPATCH:
            b_row = _patch_col(kk, Cimg, b_sc, b_sh, b_sw, P, C_FAST)
        else:
            b_row = kk.to(tl.int64) * b_sk
        b = tl.load(b_ptr + b_row[:, None] + b_col[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            # fp32: each K block's dot starts from zero and is added with its rounding error kept
            # (TwoSum into comp), so a product sees about BK roundings, not K (588 for the p=14 stem,
            # N*H*W for the weight gradient): PyTorch's own fp32 GEMMs and convolutions are that close.
            # A plain `acc += dot(a, b)` is not enough on a GPU: Triton's combine pass folds an add of a
            # dot from zero back into the dot's accumulator (the chained form) when the dot has one use;
            # here it has two.  (2026-11-26/27 on the H200 the stem's BN weight gradient was 6.78e-6 off
            # both before and after that plain add; a CPU model of the chained sums gives 6.4e-6, of these
            # 0.5-0.7e-6; the bound is 6.4e-6.)
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            acc, comp = _two_sum_into(acc, comp, part)
        else:
            acc = tl.dot(a, b, acc)
    if IEEE:
        acc = _with_comp(acc, comp)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    v = acc.to(o_ptr.dtype.element_ty)

    if O_PATCH:
        o_off = (bidx * o_sb + _patch_row(rm, HWo, Wo, o_sn, o_sh, o_sw, P))[:, None] \
            + _patch_col(rn, Cimg, o_sc, o_sh, o_sw, P, C_FAST)[None, :]
    else:
        o_off = (bidx * o_sb + rm.to(tl.int64) * o_sm)[:, None] + (rn.to(tl.int64) * o_sj)[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]

    if EPI == 1:
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=1.0)[None, :]
        shift = tl.load(shift_ptr + rn, mask=n_ok, other=0.0)[None, :]
        y = _bn_act(v.to(tl.float32), scale, shift, act, act_first)
        tl.store(o_ptr + o_off, y.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptr + o_off, v, mask=o_mask)
    if EPI == 2:
        u = v.to(tl.float32)
        if act_first:
            u = _act_fwd(u, act)
        cnt = tl.minimum(M - pid_m * BM, BM).to(tl.float32)
        mean_t = tl.sum(tl.where(m_ok[:, None], u, 0.0), axis=0) / cnt
        d = tl.where(m_ok[:, None], u - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        part = tl.program_id(1) * num_m + pid_m
        tl.store(wsm_ptr + part * N + rn, mean_t, mask=n_ok)
        tl.store(wsv_ptr + part * N + rn, m2_t, mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Weight gradient: split-K over pixels, fp32 partials
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_WGRAD_CONFIGS, key=["M", "N", "K", "HAS_T", "B_PATCH", "P"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _wgrad_kernel(a_ptr, x_ptr, t_ptr, ws_ptr,
                  M, N, K, n_batch, imgs_per_split, pix_per_split, n_pix_splits, HWo, Wo, Cimg,
                  a_sb, a_sm, a_sk,
                  x_sb, x_sk, x_sj, x_sn, x_sc, x_sh, x_sw,
                  HAS_T: tl.constexpr, B_PATCH: tl.constexpr, P: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """ws[s, i, j] = sum over the pixels p of split s of dpre[p, i] * S[p, j].

    i < M output channels, j < N input columns (C_in, or a stem patch column (c, kh, kw)), K pixels
    per batch; split s = (batch range, pixel range).  S = x [+ t] (plain) or x's patches (B_PATCH)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N

    sb = s // n_pix_splits
    sp = s - sb * n_pix_splits
    b_lo = sb * imgs_per_split
    b_hi = tl.minimum(b_lo + imgs_per_split, n_batch)
    # int64: with close to 2^31 pixels a batch (_check_grid allows up to 2^31 - 1) p_lo + pix_per_split,
    # and the loop's last k0 + BK, would wrap in int32
    p_lo = sp.to(tl.int64) * pix_per_split
    p_hi = tl.minimum(p_lo + pix_per_split, K)

    a_row = rm.to(tl.int64) * a_sm
    if B_PATCH:
        x_col = _patch_col(rn, Cimg, x_sc, x_sh, x_sw, P, False)
    else:
        x_col = rn.to(tl.int64) * x_sj

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    comp = tl.zeros((BM, BN), dtype=tl.float32)
    a_base = b_lo.to(tl.int64) * a_sb
    x_base = b_lo.to(tl.int64) * x_sb
    for bb in range(b_lo, b_hi):
        for k0 in range(p_lo, p_hi, BK):
            kk = k0 + rk
            k_ok = kk < p_hi
            a = tl.load(a_ptr + (a_base + a_row[:, None] + (kk.to(tl.int64) * a_sk)[None, :]),
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if B_PATCH:
                x_row = _patch_row(kk, HWo, Wo, x_sn, x_sh, x_sw, P)
            else:
                x_row = kk.to(tl.int64) * x_sk
            x_off = x_base + x_row[:, None] + x_col[None, :]
            x_mask = k_ok[:, None] & n_ok[None, :]
            b = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
            if HAS_T:
                t = tl.load(t_ptr + x_off, mask=x_mask, other=0.0)
                b = (b.to(tl.float32) + t.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if IEEE:  # per-block dots summed with TwoSum, as in _gemm_kernel
                part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
                acc, comp = _two_sum_into(acc, comp, part)
            else:
                acc = tl.dot(a, b, acc)
        a_base += a_sb
        x_base += x_sb
    if IEEE:
        acc = _with_comp(acc, comp)

    ws_off = s.to(tl.int64) * M * N + (rm * N)[:, None] + rn[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Fixed-order reductions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sum_reduce_kernel(ws_ptr, out_ptr, R, L, BR: tl.constexpr, BL: tl.constexpr):
    """out[l] = sum_r ws[r, l] (fp32, fixed order), stored in out's dtype."""
    rl = tl.program_id(0) * BL + tl.arange(0, BL)
    l_ok = rl < L
    acc = tl.zeros((BR, BL), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        acc += tl.load(ws_ptr + (rr.to(tl.int64) * L)[:, None] + rl[None, :],
                       mask=(rr < R)[:, None] & l_ok[None, :], other=0.0)
    tl.store(out_ptr + rl, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=l_ok)


@triton.jit
def _stats_reduce_kernel(wsm_ptr, wsv_ptr, mean_ptr, var_ptr, R, C, n_mt, Mb, BMU, total,
                         BR: tl.constexpr, BC: tl.constexpr):
    """Merge per-tile (mean_t, M2_t) of R = n_batch * n_mt tiles (tile r has n_t rows) per channel:
    mean = sum(n_t mean_t) / n, var = sum(M2_t + n_t (mean_t - mean)^2) / n."""
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = rc < C
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        r_ok = rr < R
        mt = rr % n_mt
        cnt = tl.minimum(Mb - mt * BMU, BMU).to(tl.float32)
        mask = r_ok[:, None] & c_ok[None, :]
        m = tl.load(wsm_ptr + (rr * C)[:, None] + rc[None, :], mask=mask, other=0.0)
        acc += tl.where(mask, cnt[:, None] * m, 0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        r_ok = rr < R
        mt = rr % n_mt
        cnt = tl.minimum(Mb - mt * BMU, BMU).to(tl.float32)
        mask = r_ok[:, None] & c_ok[None, :]
        off = (rr * C)[:, None] + rc[None, :]
        m = tl.load(wsm_ptr + off, mask=mask, other=0.0)
        m2 = tl.load(wsv_ptr + off, mask=mask, other=0.0)
        dm = m - mean[None, :]
        acc += tl.where(mask, m2 + cnt[:, None] * dm * dm, 0.0)
    tl.store(mean_ptr + rc, mean, mask=c_ok)
    tl.store(var_ptr + rc, tl.sum(acc, axis=0) / total, mask=c_ok)


# ----------------------------------------------------------------------------------------------
# Elementwise BN + activation (both layouts: a batch of (L, C) tiles with strides)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["act", "act_first"])
def _bn_act_fwd_kernel(pre_ptr, res_ptr, y_ptr, scale_ptr, shift_ptr, C, L, s_b, s_l, s_c, act, act_first,
                       HAS_RES: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    rl = tl.program_id(0) * BL + tl.arange(0, BL)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = rc < C
    mask = (rl < L)[:, None] & c_ok[None, :]
    off = tl.program_id(2).to(tl.int64) * s_b + (rl.to(tl.int64) * s_l)[:, None] \
        + (rc.to(tl.int64) * s_c)[None, :]
    pre = tl.load(pre_ptr + off, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rc, mask=c_ok, other=1.0)[None, :]
    shift = tl.load(shift_ptr + rc, mask=c_ok, other=0.0)[None, :]
    y = _bn_act(pre, scale, shift, act, act_first)
    if HAS_RES:  # the residual (the depthwise block's training forward), before the one rounding
        y += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["act", "act_first"])
def _bn_act_bwd_kernel(dy_ptr, pre_ptr, dpre_ptr, ws_ptr, scale_ptr, shift_ptr, mean_ptr, ca_ptr, cb_ptr,
                       cd_ptr, C, L, s_b, s_l, s_c, act, act_first,
                       WRITE_SUM: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """dpre (storage dtype); WRITE_SUM: also ws[b * n_lb + l-block, c] = sum of the rounded dpre."""
    pid_l = tl.program_id(0)
    rl = pid_l * BL + tl.arange(0, BL)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = rc < C
    mask = (rl < L)[:, None] & c_ok[None, :]
    off = tl.program_id(2).to(tl.int64) * s_b + (rl.to(tl.int64) * s_l)[:, None] \
        + (rc.to(tl.int64) * s_c)[None, :]
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + off, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rc, mask=c_ok, other=1.0)[None, :]
    shift = tl.load(shift_ptr + rc, mask=c_ok, other=0.0)[None, :]
    mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0)[None, :]
    ca = tl.load(ca_ptr + rc, mask=c_ok, other=0.0)[None, :]
    cb = tl.load(cb_ptr + rc, mask=c_ok, other=0.0)[None, :]
    cd = tl.load(cd_ptr + rc, mask=c_ok, other=0.0)[None, :]
    d = _dpre(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first).to(dpre_ptr.dtype.element_ty)
    tl.store(dpre_ptr + off, d, mask=mask)
    if WRITE_SUM:
        part = tl.program_id(2) * tl.num_programs(0) + pid_l
        psum = tl.sum(tl.where(mask, d.to(tl.float32), 0.0), axis=0)
        tl.store(ws_ptr + part.to(tl.int64) * C + rc, psum, mask=c_ok)


# ----------------------------------------------------------------------------------------------
# Host side: argument checks and layout descriptions
# ----------------------------------------------------------------------------------------------


def _fail(msg: str):
    raise ValueError(msg)


def _check_act(act, act_first):
    if not isinstance(act, int) or isinstance(act, bool) or not 0 <= act <= 6:
        _fail(f"act: expected an activation code in 0..6, got {act!r}")
    if not isinstance(act_first, (bool, int)):
        _fail(f"act_first: expected a bool, got {act_first!r}")


def _check_x(x, name="x"):
    """x: a 4-D tensor in a storage dtype, on a device this backend runs on, NCHW-contiguous or
    channels_last.  Returns its memory format."""
    if not isinstance(x, torch.Tensor):
        _fail(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        _fail(f"{name}: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _STORAGE_DTYPES:
        _fail(f"{name}: the Triton backend supports float32, float16 and bfloat16 storage, got {x.dtype}"
              + (" (use the cpu or torch backend for float64)" if x.dtype == torch.float64 else ""))
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _INTERPRET):
        _fail(f"{name}: the Triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
              f"got a tensor on {x.device}")
    fmt = memory_format_of(x)
    if not x.is_contiguous(memory_format=fmt):
        _fail(f"{name}: expected an NCHW-contiguous or channels_last-contiguous tensor, got strides "
              f"{tuple(x.stride())}")
    if x.numel() > _INT32_MAX * 8:
        _fail(f"{name}: tensor too large ({x.numel()} elements)")
    return fmt


def _check_like(t, name, x, shape, fmt):
    """t: same device, dtype and memory format as x, shape `shape`."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device != x.device:
        _fail(f"{name}: expected a tensor on {x.device} (x's device), got {t.device}")
    if t.dtype != x.dtype:
        _fail(f"{name}: expected dtype {x.dtype} (x's dtype), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous(memory_format=fmt):
        want = "channels_last" if fmt == torch.channels_last else "NCHW-contiguous"
        _fail(f"{name}: expected a {want} tensor (x's memory format), got strides {tuple(t.stride())}")


def _check_vec(v, name, C, x, optional=False):
    if v is None:
        if optional:
            return None
        _fail(f"{name}: expected a tensor, got None")
    if not isinstance(v, torch.Tensor):
        _fail(f"{name}: expected a tensor, got {type(v).__name__}")
    if v.device != x.device:
        _fail(f"{name}: expected a tensor on {x.device} (x's device), got {v.device}")
    if v.dtype != torch.float32:
        _fail(f"{name}: expected dtype torch.float32 (the accumulation dtype), got {v.dtype}")
    if v.dim() != 1 or v.shape[0] != C:
        _fail(f"{name}: expected shape ({C},), got {tuple(v.shape)}")
    return v.contiguous()  # a no-op for a dense vector


def _check_weight(w, x, shape_tail, what):
    if not isinstance(w, torch.Tensor):
        _fail(f"weight: expected a tensor, got {type(w).__name__}")
    if w.device != x.device:
        _fail(f"weight: expected a tensor on {x.device} (x's device), got {w.device}")
    if w.dtype != x.dtype:
        _fail(f"weight: expected dtype {x.dtype} (x's storage dtype), got {w.dtype}")
    if w.dim() != 4 or tuple(w.shape[1:]) != tuple(shape_tail) or w.shape[0] < 1:
        _fail(f"weight: expected shape (C_out, {', '.join(map(str, shape_tail))}) for {what}, "
              f"got {tuple(w.shape)}")


class _Layout:
    """Dense strides (elements) of an (N, C, H, W) tensor in memory format `fmt`, and its view as
    a batch of pixel-row matrices: channels_last = one (N*H*W, C) matrix, NCHW = N (H*W, C)
    matrices with unit row stride."""

    def __init__(self, N, C, H, W, fmt):
        self.cl = fmt == torch.channels_last
        if self.cl:
            self.sN, self.sC, self.sH, self.sW = H * W * C, 1, W * C, C
            self.n_batch, self.rows, self.s_batch, self.s_row, self.s_col = 1, N * H * W, 0, C, 1
        else:
            self.sN, self.sC, self.sH, self.sW = C * H * W, H * W, W, 1
            self.n_batch, self.rows, self.s_batch, self.s_row, self.s_col = N, H * W, C * H * W, 1, H * W


def _launch_gemm(*, a, t, b, out, bias, scale, shift, wsm, wsv, M, N, K, n_batch, a_lay, b_strides,
                 o_lay, epi, act, act_first, patch=None, a_patch=False, b_kpatch=False, b_jpatch=False,
                 o_patch=False):
    """Launch _gemm_kernel; returns the BM it ran with (the stats workspace layout depends on it).

    a_lay / o_lay: (sb, sm, sk, sN, sC, sH, sW); b_strides: (sk, sj, sC, sH, sW); patch: (HWo, Wo,
    Cimg, P, C_FAST) for the stem, None for pw."""
    used = {}

    def grid(meta):
        used["BM"] = meta["BM"]
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), n_batch)

    HWo, Wo, Cimg, P, c_fast = patch if patch is not None else (1, 1, 1, 1, False)
    dummy = out
    _gemm_kernel[grid](
        a, t if t is not None else a, b, out,
        bias if bias is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, wsm if wsm is not None else dummy,
        wsv if wsv is not None else dummy,
        M, N, K, HWo, Wo, Cimg, *a_lay, *b_strides, *o_lay, int(act), int(bool(act_first)),
        EPI=epi, HAS_T=t is not None, HAS_BIAS=bias is not None, A_PATCH=a_patch, B_KPATCH=b_kpatch,
        B_JPATCH=b_jpatch, O_PATCH=o_patch, P=P, C_FAST=c_fast, IEEE=_f32_dot(a.dtype))
    return used["BM"]


def _f32_dot(dtype):
    """GEMMs on fp32 operands use IEEE fp32 products (no TF32).  The interpreter (triton 3.8)
    computes tl.dot on bfloat16 operands wrongly (bit patterns taken as integers), so there bf16
    operands are widened to fp32 first: exact, and the same fp32 accumulation."""
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _plain(lay):
    """(sb, sm, sk, sN, sC, sH, sW) of a pixel-row operand in layout `lay`."""
    return (lay.s_batch, lay.s_row, lay.s_col, lay.sN, lay.sC, lay.sH, lay.sW)


def _target_programs(device):
    if _WGRAD_TARGET_PROGRAMS is not None:
        return _WGRAD_TARGET_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _wgrad_splits(n_batch, pix, tiles, device):
    """(imgs_per_split, n_batch_splits, pix_per_split, n_pix_splits) for the split-K weight
    gradient: enough programs to fill the device, a deterministic function of the shapes."""
    want = max(1, triton.cdiv(_target_programs(device), max(tiles, 1)))
    n_bs = min(n_batch, want)
    ips = triton.cdiv(n_batch, n_bs)
    n_bs = triton.cdiv(n_batch, ips)
    n_ps = max(1, min(triton.cdiv(pix, _WGRAD_GRANULE), triton.cdiv(want, n_bs)))
    pps = triton.cdiv(triton.cdiv(pix, n_ps), _WGRAD_GRANULE) * _WGRAD_GRANULE
    n_ps = triton.cdiv(pix, pps)
    return ips, n_bs, pps, n_ps


def _launch_wgrad(*, dpre, x, t, dweight, M, N, pix, n_batch, a_strides, x_strides, patch=None):
    """dweight (flat (M, N) view, any dtype) = sum over all pixels of dpre^T @ S."""
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    ips, n_bs, pps, n_ps = _wgrad_splits(n_batch, pix, tiles, x.device)
    S = n_bs * n_ps
    ws = torch.empty((S, M, N), dtype=torch.float32, device=x.device)
    HWo, Wo, Cimg, P = patch if patch is not None else (1, 1, 1, 1)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), S)

    _wgrad_kernel[grid](dpre, x, t if t is not None else x, ws,
                        M, N, pix, n_batch, ips, pps, n_ps, HWo, Wo, Cimg,
                        *a_strides, *x_strides,
                        HAS_T=t is not None, B_PATCH=patch is not None, P=P, IEEE=_f32_dot(x.dtype))
    _sum_reduce(ws.view(S, M * N), dweight.view(M * N))


def _sum_reduce(ws, out):
    R, L = ws.shape
    BR, BL = (16, 1024) if _INTERPRET else (32, 256)
    _sum_reduce_kernel[(triton.cdiv(L, BL),)](ws, out, R, L, BR=BR, BL=BL, num_warps=4)


def _stats_reduce(wsm, wsv, mean, var, n_batch, rows, bm, C):
    n_mt = triton.cdiv(rows, bm)
    R = n_batch * n_mt
    BR, BC = (16, 32) if _INTERPRET else (32, 64)
    _stats_reduce_kernel[(triton.cdiv(C, BC),)](wsm, wsv, mean, var, R, C, n_mt, rows, bm,
                                                float(n_batch * rows), BR=BR, BC=BC, num_warps=4)


def _elementwise_grid(lay, C):
    """Tile sizes and grid of the elementwise kernels: tiles are (BL pixels, BC channels)."""
    if _INTERPRET:
        BL, BC = 32, 32
    elif lay.cl:
        BL, BC = 32, 128
    else:
        BL, BC = 256, 16
    return BL, BC, (triton.cdiv(lay.rows, BL), triton.cdiv(C, BC), lay.n_batch)


def _dpre_and_dbias(dy, pre, scale, shift, mean, ca, cb, cd, act, act_first, lay, C):
    """-> dpre (storage dtype, pre's format; a workspace) and dbias (fp32)."""
    dpre = torch.empty_like(pre)
    dbias = new_output((C,), dtype=torch.float32, device=pre.device)
    BL, BC, grid = _elementwise_grid(lay, C)
    ws = torch.empty((grid[0] * grid[2], C), dtype=torch.float32, device=pre.device)
    _bn_act_bwd_kernel[grid](dy, pre, dpre, ws, scale, shift, mean, ca, cb, cd, C, lay.rows,
                             lay.s_batch, lay.s_row, lay.s_col, int(act), int(bool(act_first)),
                             WRITE_SUM=True, BL=BL, BC=BC, num_warps=4)
    _sum_reduce(ws, dbias)
    return dpre, dbias


def _check_grid(lay):
    if lay.rows > _INT32_MAX or lay.n_batch > _GRID_AXIS_MAX:
        _fail(f"x: too many pixels for this backend (rows {lay.rows}, images {lay.n_batch})")


def _nan_vec(C, device):
    return torch.full((C,), float("nan"), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# Pointwise block
# ----------------------------------------------------------------------------------------------


def _pw_common(x, t, weight, bias):
    fmt = _check_x(x)
    N, C_in, H, W = x.shape
    if t is not None:
        _check_like(t, "t", x, x.shape, fmt)
    _check_weight(weight, x, (C_in, 1, 1), "a 1x1 conv over x's channels")
    C_out = weight.shape[0]
    bias = _check_vec(bias, "bias", C_out, x, optional=True)
    lay_x = _Layout(N, C_in, H, W, fmt)
    lay_o = _Layout(N, C_out, H, W, fmt)
    _check_grid(lay_x)
    return fmt, N, C_in, C_out, H, W, bias, lay_x, lay_o


def _pw_gemm(x, t, weight, bias, out, scale, shift, wsm, wsv, epi, act, act_first, lay_x, lay_o, C_in, C_out):
    return _launch_gemm(a=x, t=t, b=weight, out=out, bias=bias, scale=scale, shift=shift, wsm=wsm, wsv=wsv,
                        M=lay_x.rows, N=C_out, K=C_in, n_batch=lay_x.n_batch, a_lay=_plain(lay_x),
                        b_strides=(weight.stride(1), weight.stride(0), 0, 0, 0), o_lay=_plain(lay_o),
                        epi=epi, act=act, act_first=act_first)


def pw_gemm_stats(x, t, weight, bias, act: int, act_first: bool):
    """-> (pre, mean, var): pre = round(conv1x1(x [+ t]) + bias), BN statistics of act(pre) / pre."""
    _check_act(act, act_first)
    fmt, N, C_in, C_out, H, W, bias, lay_x, lay_o = _pw_common(x, t, weight, bias)
    pre = new_output((N, C_out, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    mean = new_output((C_out,), dtype=torch.float32, device=x.device)
    var = new_output((C_out,), dtype=torch.float32, device=x.device)
    if pre.numel() == 0:
        return pre, _nan_vec(C_out, x.device), _nan_vec(C_out, x.device)
    n_parts = lay_x.n_batch * triton.cdiv(lay_x.rows, _MIN_BM)
    wsm = torch.empty((n_parts, C_out), dtype=torch.float32, device=x.device)
    wsv = torch.empty_like(wsm)
    if C_in == 0:
        _fail("x: expected at least one channel")
    bm = _pw_gemm(x, t, weight, bias, pre, None, None, wsm, wsv, 2, act, act_first, lay_x, lay_o, C_in, C_out)
    _stats_reduce(wsm, wsv, mean, var, lay_x.n_batch, lay_x.rows, bm, C_out)
    return pre, mean, var


def pw_fwd(x, t, weight, bias, scale, shift, act: int, act_first: bool):
    """y = BN-affine + act of pre = round(conv1x1(x [+ t]) + bias), in x's dtype and format."""
    _check_act(act, act_first)
    fmt, N, C_in, C_out, H, W, bias, lay_x, lay_o = _pw_common(x, t, weight, bias)
    scale = _check_vec(scale, "scale", C_out, x)
    shift = _check_vec(shift, "shift", C_out, x)
    y = new_output((N, C_out, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    if C_in == 0:
        _fail("x: expected at least one channel")
    _pw_gemm(x, t, weight, bias, y, scale, shift, None, None, 1, act, act_first, lay_x, lay_o, C_in, C_out)
    return y


def pw_bwd(dy, x, t, pre, weight, scale, shift, mean, ca, cb, cd, act: int, act_first: bool):
    """-> (ds, dweight, dbias); see torch_ops.pw_bwd."""
    _check_act(act, act_first)
    fmt, N, C_in, C_out, H, W, _, lay_x, lay_o = _pw_common(x, t, weight, None)
    _check_like(dy, "dy", x, (N, C_out, H, W), fmt)
    _check_like(pre, "pre", x, (N, C_out, H, W), fmt)
    vecs = [_check_vec(v, n, C_out, x) for v, n in
            ((scale, "scale"), (shift, "shift"), (mean, "mean"), (ca, "ca"), (cb, "cb"), (cd, "cd"))]
    ds = new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    dweight = new_output(weight.shape, dtype=weight.dtype, device=x.device)
    if x.numel() == 0 or pre.numel() == 0:
        dbias = torch.zeros((C_out,), dtype=torch.float32, device=x.device)
        return ds.zero_(), dweight.zero_(), dbias
    dpre, dbias = _dpre_and_dbias(dy, pre, *vecs, act, act_first, lay_o, C_out)
    # ds[i, ci] = sum_co dpre[i, co] * W[co, ci]
    _launch_gemm(a=dpre, t=None, b=weight, out=ds, bias=None, scale=None, shift=None, wsm=None, wsv=None,
                 M=lay_o.rows, N=C_in, K=C_out, n_batch=lay_o.n_batch, a_lay=_plain(lay_o),
                 b_strides=(weight.stride(0), weight.stride(1), 0, 0, 0), o_lay=_plain(lay_x),
                 epi=0, act=0, act_first=False)
    # dweight[co, ci] = sum_i dpre[i, co] * s[i, ci]
    _launch_wgrad(dpre=dpre, x=x, t=t, dweight=dweight, M=C_out, N=C_in, pix=lay_x.rows,
                  n_batch=lay_x.n_batch, a_strides=(lay_o.s_batch, lay_o.s_col, lay_o.s_row),
                  x_strides=(lay_x.s_batch, lay_x.s_row, lay_x.s_col, 0, 0, 0, 0))
    return ds, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Patch-embedding stem (non-overlapping p x p patches, stride p)
# ----------------------------------------------------------------------------------------------


def _stem_common(x, weight, bias):
    fmt = _check_x(x)
    N, C_img, H, W = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] \
            or weight.shape[-1] < 1:
        _fail(f"weight: expected shape (C_out, {C_img}, p, p), got "
              f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    p = weight.shape[-1]
    _check_weight(weight, x, (C_img, p, p), "the patch embedding")
    C_out = weight.shape[0]
    bias = _check_vec(bias, "bias", C_out, x, optional=True)
    Ho, Wo = H // p, W // p
    lay_x = _Layout(N, C_img, H, W, fmt)
    lay_o = _Layout(N, C_out, Ho, Wo, fmt)
    _check_grid(lay_o)
    return fmt, N, C_img, C_out, H, W, Ho, Wo, p, bias, lay_x, lay_o


def _stem_gemm(x, weight, bias, out, scale, shift, wsm, wsv, epi, act, act_first, lay_x, lay_o,
               C_img, C_out, Ho, Wo, p):
    # A[i, k] = x at patch row i (image, oh, ow) and patch column k; in the NCHW batched view the
    # image is the batch index and i < Ho*Wo, so _patch_row's image term is 0.
    a_lay = (lay_x.sN if not lay_x.cl else 0, 0, 0, lay_x.sN, lay_x.sC, lay_x.sH, lay_x.sW)
    b_strides = (0, weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3))
    return _launch_gemm(a=x, t=None, b=weight, out=out, bias=bias, scale=scale, shift=shift, wsm=wsm, wsv=wsv,
                        M=lay_o.rows, N=C_out, K=C_img * p * p, n_batch=lay_o.n_batch, a_lay=a_lay,
                        b_strides=b_strides, o_lay=_plain(lay_o), epi=epi, act=act, act_first=act_first,
                        patch=(Ho * Wo, Wo, C_img, p, lay_x.cl), a_patch=True, b_kpatch=True)


def stem_gemm_stats(x, weight, bias, act: int, act_first: bool):
    """-> (pre, mean, var) for pre = round(conv2d(x, weight, bias, stride=p)); remainder dropped."""
    _check_act(act, act_first)
    fmt, N, C_img, C_out, H, W, Ho, Wo, p, bias, lay_x, lay_o = _stem_common(x, weight, bias)
    pre = new_output((N, C_out, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    mean = new_output((C_out,), dtype=torch.float32, device=x.device)
    var = new_output((C_out,), dtype=torch.float32, device=x.device)
    if pre.numel() == 0:
        return pre, _nan_vec(C_out, x.device), _nan_vec(C_out, x.device)
    n_parts = lay_o.n_batch * triton.cdiv(lay_o.rows, _MIN_BM)
    wsm = torch.empty((n_parts, C_out), dtype=torch.float32, device=x.device)
    wsv = torch.empty_like(wsm)
    bm = _stem_gemm(x, weight, bias, pre, None, None, wsm, wsv, 2, act, act_first, lay_x, lay_o,
                    C_img, C_out, Ho, Wo, p)
    _stats_reduce(wsm, wsv, mean, var, lay_o.n_batch, lay_o.rows, bm, C_out)
    return pre, mean, var


def stem_fwd(x, weight, bias, scale, shift, act: int, act_first: bool):
    """y = BN-affine + act of the stem's pre, in x's dtype and format."""
    _check_act(act, act_first)
    fmt, N, C_img, C_out, H, W, Ho, Wo, p, bias, lay_x, lay_o = _stem_common(x, weight, bias)
    scale = _check_vec(scale, "scale", C_out, x)
    shift = _check_vec(shift, "shift", C_out, x)
    y = new_output((N, C_out, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    _stem_gemm(x, weight, bias, y, scale, shift, None, None, 1, act, act_first, lay_x, lay_o,
               C_img, C_out, Ho, Wo, p)
    return y


def stem_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act: int, act_first: bool, need_dx: bool):
    """-> (dx [empty (0,) unless need_dx], dweight, dbias); see torch_ops.stem_bwd."""
    _check_act(act, act_first)
    fmt, N, C_img, C_out, H, W, Ho, Wo, p, _, lay_x, lay_o = _stem_common(x, weight, None)
    _check_like(dy, "dy", x, (N, C_out, Ho, Wo), fmt)
    _check_like(pre, "pre", x, (N, C_out, Ho, Wo), fmt)
    vecs = [_check_vec(v, n, C_out, x) for v, n in
            ((scale, "scale"), (shift, "shift"), (mean, "mean"), (ca, "ca"), (cb, "cb"), (cd, "cd"))]
    K = C_img * p * p
    dweight = new_output((C_out, C_img, p, p), dtype=weight.dtype, device=x.device)
    dx = new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_dx \
        else x.new_empty((0,))
    if pre.numel() == 0:
        if need_dx:
            dx.zero_()
        return dx, dweight.zero_(), torch.zeros((C_out,), dtype=torch.float32, device=x.device)
    dpre, dbias = _dpre_and_dbias(dy, pre, *vecs, act, act_first, lay_o, C_out)
    patch = (Ho * Wo, Wo, C_img, p)
    # dweight[co, (c, kh, kw)] = sum_i dpre[i, co] * patches[i, (c, kh, kw)]
    _launch_wgrad(dpre=dpre, x=x, t=None, dweight=dweight, M=C_out, N=K, pix=lay_o.rows,
                  n_batch=lay_o.n_batch, a_strides=(lay_o.s_batch, lay_o.s_col, lay_o.s_row),
                  x_strides=(lay_x.sN if not lay_x.cl else 0, 0, 0, lay_x.sN, lay_x.sC, lay_x.sH, lay_x.sW),
                  patch=patch)
    if need_dx:
        # dx at patch (i, k) = sum_co dpre[i, co] * W[co, k]: non-overlapping patches, no conflicts.
        o_lay = (lay_x.sN if not lay_x.cl else 0, 0, 0, lay_x.sN, lay_x.sC, lay_x.sH, lay_x.sW)
        _launch_gemm(a=dpre, t=None, b=weight, out=dx, bias=None, scale=None, shift=None, wsm=None, wsv=None,
                     M=lay_o.rows, N=K, K=C_out, n_batch=lay_o.n_batch, a_lay=_plain(lay_o),
                     b_strides=(weight.stride(0), 0, weight.stride(1), weight.stride(2), weight.stride(3)),
                     o_lay=o_lay, epi=0, act=0, act_first=False, patch=(Ho * Wo, Wo, C_img, p, lay_x.cl),
                     b_jpatch=True, o_patch=True)
        # Pixels beyond the last full patch were dropped by the conv: zero gradient.
        if H > Ho * p:
            dx[:, :, Ho * p:, :].zero_()
        if W > Wo * p:
            dx[:, :, :Ho * p, Wo * p:].zero_()
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Elementwise BN + activation
# ----------------------------------------------------------------------------------------------


def bn_act_fwd(pre, scale, shift, act: int, act_first: bool, residual=None):
    """y = scale*act(pre)+shift (act_first) or act(scale*pre+shift) [+ residual], elementwise; pre's
    dtype/format (the residual in both too)."""
    _check_act(act, act_first)
    fmt = _check_x(pre, "pre")
    N, C, H, W = pre.shape
    scale = _check_vec(scale, "scale", C, pre)
    shift = _check_vec(shift, "shift", C, pre)
    if residual is not None:
        _check_like(residual, "residual", pre, pre.shape, fmt)
    y = new_output(pre.shape, dtype=pre.dtype, device=pre.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    lay = _Layout(N, C, H, W, fmt)
    _check_grid(lay)
    BL, BC, grid = _elementwise_grid(lay, C)
    _bn_act_fwd_kernel[grid](pre, pre if residual is None else residual, y, scale, shift, C, lay.rows, lay.s_batch,
                             lay.s_row, lay.s_col, int(act), int(bool(act_first)), HAS_RES=residual is not None,
                             BL=BL, BC=BC, num_warps=4)
    return y


def bn_act_bwd(dy, pre, scale, shift, mean, ca, cb, cd, act: int, act_first: bool):
    """dpre, the gradient at pre (storage dtype, pre's format); see torch_ops.bn_act_bwd."""
    _check_act(act, act_first)
    fmt = _check_x(pre, "pre")
    N, C, H, W = pre.shape
    _check_like(dy, "dy", pre, pre.shape, fmt)
    vecs = [_check_vec(v, n, C, pre) for v, n in
            ((scale, "scale"), (shift, "shift"), (mean, "mean"), (ca, "ca"), (cb, "cb"), (cd, "cd"))]
    dpre = new_output(pre.shape, dtype=pre.dtype, device=pre.device, memory_format=fmt)
    if dpre.numel() == 0:
        return dpre
    lay = _Layout(N, C, H, W, fmt)
    _check_grid(lay)
    BL, BC, grid = _elementwise_grid(lay, C)
    _bn_act_bwd_kernel[grid](dy, pre, dpre, dpre, *vecs, C, lay.rows, lay.s_batch, lay.s_row, lay.s_col,
                             int(act), int(bool(act_first)), WRITE_SUM=False, BL=BL, BC=BC, num_warps=4)
    return dpre
