"""Triton kernels and host launchers for the fused depthwise block.

The four launchers ``dw_conv_stats``, ``dw_fwd``, ``dw_bwd_reduce`` and ``dw_bwd`` have exactly
the signatures and semantics of :mod:`convmixer_kernels.torch_ops` (the executable spec); read
that module for what each op computes.  They run compiled on CUDA tensors, and on CPU tensors
when ``TRITON_INTERPRET=1`` was set before this module was imported (Triton decides at
decoration time whether ``@triton.jit`` compiles or interprets).

Tiling.  Every kernel works on 2-D tiles ``[BA, BB]`` of one image-sized tensor:

* NCHW: one channel per program; axis 0 is a run of BA rows of the flattened (n, h) index,
  axis 1 is BB consecutive columns w (the contiguous dimension).
* channels_last: axis 0 is a run of BA pixels of the flattened (n, h, w) index, axis 1 is a
  block of BB channels (the contiguous dimension, so loads of a tap are vectorized along C).

A k x k depthwise tap loop loads one shifted, masked input tile per tap (zero padding comes
from the masks); the k*k re-reads of each input element hit L1/L2.  All arithmetic is float32,
the taps are accumulated with explicit fma in a fixed order, so dw_conv_stats and dw_fwd compute
the same pre bit for bit.  channels_last kernels read a tap-major (k*k, C) copy of the weight so
the weights of one tap are one vector load.  Offsets into activations are int64; pixel indices
(N*H*W) are int32, checked on the host.

Compile-time constants are k, the layout, the tile sizes and the dtypes; the activation, the
order, residual and bias are run-time arguments (uniform branches outside the tap loop), so a
GPU run compiles one kernel per (op, k, layout, dtype) instead of one per flag combination.

Reductions (BatchNorm statistics, the backward sums, dweight, dbias) are deterministic: a
program owns a fixed range of tiles of a channel block and reduces them in a fixed order into
one partial per (program, channel); a second small kernel reduces the partials of each channel
in a fixed order.  No atomics, so two runs give bitwise equal results.

Backward.  ``dw_bwd`` first materializes dpre (the gradient at the conv output) in a float32
workspace with x's shape and memory format, then one kernel computes dx = conv_transpose(dpre)
and the dweight / dbias partials from the same shifted dpre tiles.  Recomputing dpre at every
shifted position instead would evaluate the activation derivative (erf, exp) k*k times per
element; the workspace costs one float32 activation of memory and 8 bytes/element of traffic.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .common import _act_fwd, _act_grad  # noqa: F401  (device helpers used by the kernels)

from convmixer_kernels.utils import memory_format_of, new_output

__all__ = ["dw_conv_stats", "dw_fwd", "dw_bwd_reduce", "dw_bwd"]

MAX_KERNEL_SIZE = 31
_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_GRID_AXIS1_MAX = 65535

# Tile sizes (elements per [BA, BB] tile) and the channel-block cap of channels_last tiles.
# Chosen from sm_90 AOT compiles (registers, vector widths), not yet from GPU timings: tune here.
_CONV_TILE = 2048          # conv tiles (dw_fwd, dw_conv_stats) and elementwise tiles
_BWD_CONV_TILE = 4096      # dx + dweight tiles of dw_bwd
_CL_MAX_BB = 64            # channels per channels_last tile (64 bf16 = 128 bytes per pixel)
_NCHW_MAX_BB = 128         # columns per NCHW tile
_BWD_ACC_MAX = 8192        # floats in the [next_pow2(k*k), BB] dweight accumulator of dw_bwd
_PROGRAMS_PER_SM = 4       # reduction kernels: tile groups so that about this many programs run

# Test hook: when a dict, overrides the tile sizes ("BA", "BB") and tiles per program ("TPP")
# of every launch, so small inputs still exercise multi-tile programs and multi-program
# reductions.  None in normal use.
_TILE_OVERRIDE: dict | None = None


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chan_coords(cb, C, CL: tl.constexpr, BB: tl.constexpr):
    """Channel index of this program: a [BB] block (channels_last) or one scalar (NCHW)."""
    if CL:
        c1 = cb * BB + tl.arange(0, BB)
    else:
        c1 = cb
    return c1, c1 < C


@triton.jit
def _chan_bcast(v, CL: tl.constexpr):
    """A per-channel value ([BB] or scalar) shaped to broadcast against a [BA, BB] tile."""
    if CL:
        r = v[None, :]
    else:
        r = v
    return r


@triton.jit
def _chan_sum(v, CL: tl.constexpr):
    """Sum of a [BA, BB] tile per channel: [BB] (channels_last) or a scalar (NCHW).

    channels_last sums along the tile's first axis in two levels (16 rows, then the row groups):
    a sum along a non-minor axis may be a sequential chain (numpy's, under the interpreter), whose
    rounding error grows with the chain, so the chain is kept short explicitly."""
    if CL:
        BA: tl.constexpr = v.shape[0]
        BB: tl.constexpr = v.shape[1]
        if BA >= 64:
            r = tl.sum(tl.sum(tl.reshape(v, [BA // 16, 16, BB]), axis=1), axis=0)
        else:
            r = tl.sum(v, axis=0)
    else:
        r = tl.sum(v)
    return r


@triton.jit
def _tile_coords(tile, c1, cm1, N, C, H, W, sN, sC, sH, sW,
                 CL: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr):
    """Coordinates of tile number `tile` (see the module docstring).

    Returns base (int64 element offsets of the tile's outputs, [BA, BB]), h and w (int32,
    broadcastable), va (row / pixel in range, [BA, 1]), cm (channel in range, broadcastable)
    and valid (output element in range, [BA, BB])."""
    if CL:
        q = tile * BA + tl.arange(0, BA)
        hw = H * W
        va = q < N * hw
        n = q // hw
        rem = q - n * hw
        h = rem // W
        w = rem - h * W
        n = n[:, None]
        h = h[:, None]
        w = w[:, None]
        va = va[:, None]
    else:
        n_wt = tl.cdiv(W, BB)
        rt = tile // n_wt
        wt = tile - rt * n_wt
        r = rt * BA + tl.arange(0, BA)
        va = r < N * H
        n = r // H
        h = r - n * H
        w = wt * BB + tl.arange(0, BB)
        n = n[:, None]
        h = h[:, None]
        va = va[:, None]
        w = w[None, :]
    c = _chan_bcast(c1, CL)
    cm = _chan_bcast(cm1, CL)
    base = (n.to(tl.int64) * sN + c.to(tl.int64) * sC + h.to(tl.int64) * sH
            + w.to(tl.int64) * sW)
    valid = va & (w < W) & cm
    return base, h, w, va, cm, valid


@triton.jit
def _pre_tile(x_ptr, w_ptr, b_ptr, base, h, w, va, cm, c1, cm1, H, W, sH, sW, w_sc, w_st,
              K: tl.constexpr, has_bias, CL: tl.constexpr,
              BA: tl.constexpr, BB: tl.constexpr):
    """pre = DWConv_k(x) + bias of one tile, rounded to x's dtype, returned in float32.

    The single definition of the conv: dw_conv_stats and dw_fwd both inline it, so they
    compute pre with the same instructions in the same order (bitwise equal)."""
    acc = tl.zeros([BA, BB], dtype=tl.float32)
    valid = va & (w < W) & cm
    for i in range(K):
        di = i - K // 2
        hh = h + di
        mi = valid & (hh >= 0) & (hh < H)
        x_row = x_ptr + (base + di * sH)
        w_row = w_ptr + c1 * w_sc + (i * K) * w_st
        for j in tl.static_range(K):
            # (no jit-function calls in the tap loop: each one costs ~1 ms under the interpreter)
            # valid outputs have 0 <= w < W, so a shift needs a check on one side only
            if j < K // 2:
                m = mi & (w + (j - K // 2) >= 0)
            elif j > K // 2:
                m = mi & (w + (j - K // 2) < W)
            else:
                m = mi
            xv = tl.load(x_row + (j - K // 2) * sW, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_row + j * w_st, mask=cm1, other=0.0)
            if CL:
                wv = wv[None, :]
            acc = tl.fma(xv, tl.broadcast_to(wv, [BA, BB]), acc)
    if has_bias:
        acc = acc + _chan_bcast(tl.load(b_ptr + c1, mask=cm1, other=0.0), CL)
    return acc.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _g_u(dy, pre, scale, shift, act, act_first):
    """(g, u): the gradient at the BN output and the BN input (see torch_ops._g_u)."""
    if act_first:
        g = dy
        u = _act_fwd(pre, act)
    else:
        g = dy * _act_grad(scale * pre + shift, act)
        u = pre
    return g, u


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "H", "act", "act_first", "residual", "has_bias"])
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr,
                   N, C, H, W, sN, sC, sH, sW, w_sc, w_st,
                   K: tl.constexpr, act, act_first,
                   residual, has_bias, CL: tl.constexpr,
                   BA: tl.constexpr, BB: tl.constexpr):
    # grid: (tiles, channel blocks); one tile per program
    tile = tl.program_id(0)
    c1, cm1 = _chan_coords(tl.program_id(1), C, CL, BB)
    base, h, w, va, cm, valid = _tile_coords(tile, c1, cm1, N, C, H, W, sN, sC, sH, sW, CL, BA, BB)
    pre = _pre_tile(x_ptr, w_ptr, b_ptr, base, h, w, va, cm, c1, cm1, H, W, sH, sW, w_sc, w_st,
                    K, has_bias, CL, BA, BB)
    scale = _chan_bcast(tl.load(scale_ptr + c1, mask=cm1, other=0.0), CL)
    shift = _chan_bcast(tl.load(shift_ptr + c1, mask=cm1, other=0.0), CL)
    if act_first:
        out = scale * _act_fwd(pre, act) + shift
    else:
        out = _act_fwd(scale * pre + shift, act)
    if residual:
        out = out + tl.load(x_ptr + base, mask=valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + base, out.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["N", "H", "T", "TPP", "G", "act", "act_first", "has_bias"])
def _dw_conv_stats_kernel(x_ptr, w_ptr, b_ptr, pre_ptr, part_ptr,
                          N, C, H, W, sN, sC, sH, sW, w_sc, w_st, T, TPP, G,
                          K: tl.constexpr, act, act_first,
                          has_bias, CL: tl.constexpr,
                          BA: tl.constexpr, BB: tl.constexpr):
    # grid: (G tile groups, channel blocks).  Writes pre and, per (group, channel), the
    # (count, mean, M2) of u over the group's tiles, merged tile by tile (Chan et al.).
    g = tl.program_id(0)
    c1, cm1 = _chan_coords(tl.program_id(1), C, CL, BB)
    zero = _chan_sum(tl.zeros([BA, BB], dtype=tl.float32), CL)
    n_a = zero
    mean_a = zero
    m2_a = zero
    t_begin = g * TPP
    t_end = tl.minimum(t_begin + TPP, T)
    for tile in range(t_begin, t_end):
        base, h, w, va, cm, valid = _tile_coords(tile, c1, cm1, N, C, H, W, sN, sC, sH, sW,
                                                 CL, BA, BB)
        pre = _pre_tile(x_ptr, w_ptr, b_ptr, base, h, w, va, cm, c1, cm1, H, W, sH, sW,
                        w_sc, w_st, K, has_bias, CL, BA, BB)
        tl.store(pre_ptr + base, pre.to(pre_ptr.dtype.element_ty), mask=valid)
        if act_first:
            u = _act_fwd(pre, act)
        else:
            u = pre
        cnt = _chan_sum(tl.where(valid, 1.0, 0.0), CL)
        mean_t = _chan_sum(tl.where(valid, u, 0.0), CL) / tl.maximum(cnt, 1.0)
        dev = tl.where(valid, u - _chan_bcast(mean_t, CL), 0.0)
        m2_t = _chan_sum(dev * dev, CL)
        tot = n_a + cnt
        frac = cnt / tl.maximum(tot, 1.0)
        delta = mean_t - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_t + delta * delta * n_a * frac
        n_a = tot
    stride = G * C
    off = g * C + c1
    tl.store(part_ptr + off, n_a, mask=cm1)
    tl.store(part_ptr + stride + off, mean_a, mask=cm1)
    tl.store(part_ptr + 2 * stride + off, m2_a, mask=cm1)


@triton.jit(do_not_specialize=["G"])
def _stats_finalize_kernel(part_ptr, mean_ptr, var_ptr, G, C, BG: tl.constexpr, BM: tl.constexpr):
    # Merge the G (count, mean, M2) partials of each channel in a fixed order:
    # mean = sum(n_g mean_g) / n, M2 = sum(M2_g + n_g (mean_g - mean)^2), var = M2 / n.
    cols = tl.program_id(0) * BM + tl.arange(0, BM)
    cmask = cols < C
    rows = tl.arange(0, BG)
    stride = G * C
    acc_n = tl.zeros([BG, BM], dtype=tl.float32)
    acc_s = tl.zeros([BG, BM], dtype=tl.float32)
    for g0 in range(0, G, BG):
        r = g0 + rows
        m = (r < G)[:, None] & cmask[None, :]
        off = r[:, None] * C + cols[None, :]
        cnt = tl.load(part_ptr + off, mask=m, other=0.0)
        mu = tl.load(part_ptr + stride + off, mask=m, other=0.0)
        acc_n += cnt
        acc_s += cnt * mu
    n = tl.maximum(tl.sum(acc_n, axis=0), 1.0)  # >= 1 for real channels (empty x never launches)
    mean = tl.sum(acc_s, axis=0) / n
    acc_m2 = tl.zeros([BG, BM], dtype=tl.float32)
    for g0 in range(0, G, BG):
        r = g0 + rows
        m = (r < G)[:, None] & cmask[None, :]
        off = r[:, None] * C + cols[None, :]
        cnt = tl.load(part_ptr + off, mask=m, other=0.0)
        mu = tl.load(part_ptr + stride + off, mask=m, other=0.0)
        m2 = tl.load(part_ptr + 2 * stride + off, mask=m, other=0.0)
        d = mu - mean[None, :]
        acc_m2 += m2 + cnt * d * d
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, tl.sum(acc_m2, axis=0) / n, mask=cmask)


@triton.jit(do_not_specialize=["G"])
def _sum_partials_kernel(part_ptr, out_ptr, scale_ptr, G, M, C,
                         HAS_SCALE: tl.constexpr, BG: tl.constexpr, BM: tl.constexpr):
    # out[m] = sum_g part[g, m] (fixed order) [* scale[m % C]]
    cols = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cmask = cols < M
    rows = tl.arange(0, BG)
    acc = tl.zeros([BG, BM], dtype=tl.float32)
    for g0 in range(0, G, BG):
        r = g0 + rows
        m = (r < G)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + (r.to(tl.int64)[:, None] * M + cols[None, :]), mask=m, other=0.0)
    s = tl.sum(acc, axis=0)
    if HAS_SCALE:
        s = s * tl.load(scale_ptr + cols % C, mask=cmask, other=0.0)
    tl.store(out_ptr + cols, s, mask=cmask)


@triton.jit(do_not_specialize=["N", "H", "T", "TPP", "G", "act", "act_first"])
def _dw_bwd_reduce_kernel(dy_ptr, pre_ptr, scale_ptr, shift_ptr, mean_ptr, part_ptr,
                          N, C, H, W, sN, sC, sH, sW, T, TPP, G,
                          act, act_first, CL: tl.constexpr,
                          BA: tl.constexpr, BB: tl.constexpr):
    # grid: (G tile groups, channel blocks); partial sums of g and g * (u - mean)
    g_id = tl.program_id(0)
    c1, cm1 = _chan_coords(tl.program_id(1), C, CL, BB)
    scale = _chan_bcast(tl.load(scale_ptr + c1, mask=cm1, other=0.0), CL)
    shift = _chan_bcast(tl.load(shift_ptr + c1, mask=cm1, other=0.0), CL)
    mean = _chan_bcast(tl.load(mean_ptr + c1, mask=cm1, other=0.0), CL)
    zero = _chan_sum(tl.zeros([BA, BB], dtype=tl.float32), CL)
    s_g = zero
    s_gx = zero
    t_begin = g_id * TPP
    t_end = tl.minimum(t_begin + TPP, T)
    for tile in range(t_begin, t_end):
        base, h, w, va, cm, valid = _tile_coords(tile, c1, cm1, N, C, H, W, sN, sC, sH, sW,
                                                 CL, BA, BB)
        dy = tl.load(dy_ptr + base, mask=valid, other=0.0).to(tl.float32)
        pre = tl.load(pre_ptr + base, mask=valid, other=0.0).to(tl.float32)
        g, u = _g_u(dy, pre, scale, shift, act, act_first)
        g = tl.where(valid, g, 0.0)
        s_g += _chan_sum(g, CL)
        s_gx += _chan_sum(g * (u - mean), CL)
    off = g_id * C + c1
    tl.store(part_ptr + off, s_g, mask=cm1)
    tl.store(part_ptr + G * C + off, s_gx, mask=cm1)


@triton.jit(do_not_specialize=["N", "H", "act", "act_first"])
def _dw_bwd_dpre_kernel(dy_ptr, pre_ptr, scale_ptr, shift_ptr, mean_ptr, ca_ptr, cb_ptr, cd_ptr,
                        d_ptr, N, C, H, W, sN, sC, sH, sW,
                        act, act_first, CL: tl.constexpr,
                        BA: tl.constexpr, BB: tl.constexpr):
    # grid: (tiles, channel blocks); dpre = [ca g + cb (u - mean) + cd] [* act'(pre)] in float32
    c1, cm1 = _chan_coords(tl.program_id(1), C, CL, BB)
    base, h, w, va, cm, valid = _tile_coords(tl.program_id(0), c1, cm1, N, C, H, W,
                                             sN, sC, sH, sW, CL, BA, BB)
    scale = _chan_bcast(tl.load(scale_ptr + c1, mask=cm1, other=0.0), CL)
    shift = _chan_bcast(tl.load(shift_ptr + c1, mask=cm1, other=0.0), CL)
    mean = _chan_bcast(tl.load(mean_ptr + c1, mask=cm1, other=0.0), CL)
    ca = _chan_bcast(tl.load(ca_ptr + c1, mask=cm1, other=0.0), CL)
    cb = _chan_bcast(tl.load(cb_ptr + c1, mask=cm1, other=0.0), CL)
    cd = _chan_bcast(tl.load(cd_ptr + c1, mask=cm1, other=0.0), CL)
    dy = tl.load(dy_ptr + base, mask=valid, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + base, mask=valid, other=0.0).to(tl.float32)
    g, u = _g_u(dy, pre, scale, shift, act, act_first)
    d = ca * g + cb * (u - mean) + cd
    if act_first:
        d = d * _act_grad(pre, act)
    tl.store(d_ptr + base, d, mask=valid)


@triton.jit(do_not_specialize=["N", "H", "T", "TPP", "G", "residual"])
def _dw_bwd_conv_kernel(dy_ptr, x_ptr, d_ptr, w_ptr, dx_ptr, pdw_ptr, pdb_ptr,
                        N, C, H, W, sN, sC, sH, sW, w_sc, w_st, T, TPP, G,
                        K: tl.constexpr, residual, CL: tl.constexpr,
                        BA: tl.constexpr, BB: tl.constexpr, KKP: tl.constexpr):
    # grid: (G tile groups, channel blocks).  For each tile: dx = sum over taps (i, j) of
    # w[i, j] * dpre shifted by (r - i, r - j) [+ dy]; the same shifted tile times x gives
    # the tile's share of dweight[i, j].  dweight partials are accumulated per tap in a
    # [KKP(, BB)] register array over the group's tiles, then written once per program.
    g_id = tl.program_id(0)
    c1, cm1 = _chan_coords(tl.program_id(1), C, CL, BB)
    kk = tl.arange(0, KKP)
    if CL:
        dw_acc = tl.zeros([KKP, BB], dtype=tl.float32)
    else:
        dw_acc = tl.zeros([KKP], dtype=tl.float32)
    db_acc = _chan_sum(tl.zeros([BA, BB], dtype=tl.float32), CL)
    t_begin = g_id * TPP
    t_end = tl.minimum(t_begin + TPP, T)
    for tile in range(t_begin, t_end):
        base, h, w, va, cm, valid = _tile_coords(tile, c1, cm1, N, C, H, W, sN, sC, sH, sW,
                                                 CL, BA, BB)
        xc = tl.load(x_ptr + base, mask=valid, other=0.0).to(tl.float32)
        db_acc += _chan_sum(tl.load(d_ptr + base, mask=valid, other=0.0), CL)
        dx = tl.zeros([BA, BB], dtype=tl.float32)
        for i in range(K):
            di = K // 2 - i
            hh = h + di
            mi = valid & (hh >= 0) & (hh < H)
            d_row = d_ptr + (base + di * sH)
            w_row = w_ptr + c1 * w_sc + (i * K) * w_st
            for j in tl.static_range(K):
                # (no jit-function calls in the tap loop, see _pre_tile)
                if j > K // 2:
                    m = mi & (w + (K // 2 - j) >= 0)
                elif j < K // 2:
                    m = mi & (w + (K // 2 - j) < W)
                else:
                    m = mi
                ds = tl.load(d_row + (K // 2 - j) * sW, mask=m, other=0.0)
                wv = tl.load(w_row + j * w_st, mask=cm1, other=0.0)
                prod = xc * ds
                if CL:
                    dx = tl.fma(ds, tl.broadcast_to(wv[None, :], [BA, BB]), dx)
                    dw_acc += tl.where(kk[:, None] == i * K + j, tl.sum(prod, axis=0)[None, :], 0.0)
                else:
                    dx = tl.fma(ds, tl.broadcast_to(wv, [BA, BB]), dx)
                    dw_acc += tl.where(kk == i * K + j, tl.sum(prod), 0.0)
        if residual:
            dx = dx + tl.load(dy_ptr + base, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    # partial layouts: pdw [G, C, K*K] (so the final reduction writes dweight directly),
    # pdb [G, C]
    tl.store(pdb_ptr + g_id * C + c1, db_acc, mask=cm1)
    pdw = pdw_ptr + g_id.to(tl.int64) * C * (K * K)
    if CL:
        tl.store(pdw + c1[None, :] * (K * K) + kk[:, None], dw_acc,
                 mask=(kk < K * K)[:, None] & cm1[None, :])
    else:
        tl.store(pdw + c1 * (K * K) + kk, dw_acc, mask=(kk < K * K) & cm1)


# ----------------------------------------------------------------------------------------------
# Host side: checks, tiling, launches
# ----------------------------------------------------------------------------------------------


def _is_interpreted() -> bool:
    """True when this module's kernels were decorated under TRITON_INTERPRET=1."""
    return not isinstance(_dw_fwd_kernel, triton.runtime.JITFunction)


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _check_x(x, name: str = "x") -> bool:
    """Validates an activation tensor; returns True for channels_last."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D")
    if x.dtype == torch.float64:
        raise ValueError(f"{name}: float64 is not supported by the Triton backend (use the CPU "
                         "backend or the torch backend for float64)")
    if x.dtype not in _STORAGE_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not _is_interpreted():
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on {x.device} (CPU tensors "
                         "run only when TRITON_INTERPRET=1 is set before convmixer_kernels.triton "
                         "is imported)")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name}: expected an NCHW-contiguous or channels_last-contiguous tensor, "
                         f"got strides {tuple(x.stride())}")
    N, C, H, W = x.shape
    if N * H * W > _INT32_MAX:
        raise ValueError(f"{name}: N*H*W = {N * H * W} pixels is more than the Triton backend "
                         f"supports ({_INT32_MAX})")
    # Element offsets are int64 (_tile_coords); a tap's row shift (at most 15 rows of up to C*W elements)
    # is an int32 product, hence the bound on one row.  An image of more than 2^31 elements is fine.
    if MAX_KERNEL_SIZE * C * W > _INT32_MAX:
        raise ValueError(f"{name}: one image row of {C} x {W} elements is too large for the Triton "
                         "backend (31*C*W must be below 2^31)")
    return memory_format_of(x) == torch.channels_last


def _check_tensor_on(t, name: str, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), "
                         f"got {t.device}")


def _check_like_x(t, name: str, x: torch.Tensor, x_cl: bool) -> None:
    _check_tensor_on(t, name, x)
    if t.dtype != x.dtype:
        raise ValueError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (the shape of x), got "
                         f"{tuple(t.shape)}")
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name}: expected an NCHW-contiguous or channels_last-contiguous tensor, "
                         f"got strides {tuple(t.stride())}")
    if (memory_format_of(t) == torch.channels_last) != x_cl:
        raise ValueError(f"{name}: expected the memory format of x "
                         f"({'channels_last' if x_cl else 'NCHW-contiguous'})")


def _check_vec(t, name: str, x: torch.Tensor) -> None:
    _check_tensor_on(t, name, x)
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{name}: expected shape ({x.shape[1]},) (one value per channel of x), "
                         f"got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")


def _check_weight(weight, x: torch.Tensor) -> int:
    _check_tensor_on(weight, "weight", x)
    if weight.dtype != torch.float32:
        raise ValueError(f"weight: expected dtype torch.float32, got {weight.dtype}")
    C = x.shape[1]
    if (weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1
            or weight.shape[2] != weight.shape[3]):
        raise ValueError(f"weight: expected shape (C, 1, k, k) with C = {C} (channels of x), got "
                         f"{tuple(weight.shape)}")
    k = int(weight.shape[2])
    if k % 2 != 1 or not 1 <= k <= MAX_KERNEL_SIZE:
        raise ValueError(f"weight: expected an odd kernel size k in 1..{MAX_KERNEL_SIZE}, "
                         f"got k = {k}")
    if not weight.is_contiguous():
        raise ValueError("weight: expected a contiguous tensor")
    # The kernels offset into the weight with int32 products (channel times k*k, tap row times C)
    if C * (k * k + 1) > _INT32_MAX:
        raise ValueError(f"weight: C*(k*k + 1) = {C * (k * k + 1)} is more than the Triton backend supports "
                         f"({_INT32_MAX}): at most {_INT32_MAX // (k * k + 1)} channels at k = {k}")
    return k


def _check_flags(act, **flags) -> tuple:
    if isinstance(act, bool) or not isinstance(act, int) or not 0 <= act <= 6:
        raise ValueError("act: expected an activation code in 0..6 (identity, relu, gelu, "
                         f"gelu_tanh, silu, relu6, hardswish), got {act!r}")
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected a bool, got {v!r}")
    return (int(act),) + tuple(flags.values())


def _strides(x: torch.Tensor, cl: bool) -> tuple:
    """Element strides (sN, sC, sH, sW) of the canonical layout of x's shape and format.

    Every activation argument is checked to be contiguous in the same format and shape, so
    these strides are valid for all of them (dimensions of size 1 may carry other strides,
    but their index is always 0)."""
    _, C, H, W = x.shape
    if cl:
        return H * W * C, 1, W * C, C
    return C * H * W, H * W, W, 1


class _Plan:
    """Tiling of one launch: tile sizes, tile count T, channel blocks CB, groups G of TPP tiles."""

    def __init__(self, x: torch.Tensor, cl: bool, target: int, grouped: bool,
                 max_bb: int = _CL_MAX_BB):
        N, C, H, W = x.shape
        interp = _is_interpreted()
        if interp:
            target = max(target, 4096)  # fewer, larger programs: the interpreter pays per op
        if cl:
            bb = min(_np2(C), max_bb)
            ba = min(max(target // bb, 1), _np2(N * H * W))
        else:
            bb = min(_np2(W), _NCHW_MAX_BB)
            ba = min(max(target // bb, 1), _np2(N * H))
        tpp = None
        if _TILE_OVERRIDE:
            ba = _TILE_OVERRIDE.get("BA", ba)
            bb = _TILE_OVERRIDE.get("BB", bb)
            tpp = _TILE_OVERRIDE.get("TPP")
        self.BA, self.BB = ba, bb
        if cl:
            self.T = triton.cdiv(N * H * W, ba)
            self.CB = triton.cdiv(C, bb)
        else:
            self.T = triton.cdiv(N * H, ba) * triton.cdiv(W, bb)
            self.CB = C
        if self.CB > _GRID_AXIS1_MAX:
            raise ValueError(f"x: {C} channels is more than the Triton backend supports in this "
                             "layout")
        if grouped:
            if tpp is None:
                # enough programs to fill the GPU a few times over; fewer under the interpreter
                progs = _PROGRAMS_PER_SM * _sm_count(x.device) if not interp else 2
                tpp = triton.cdiv(self.T, max(1, triton.cdiv(progs, self.CB)))
            self.TPP = max(1, min(tpp, self.T))
            self.G = triton.cdiv(self.T, self.TPP)
        else:
            if self.T > _INT32_MAX:
                raise ValueError("x: too many tiles for the Triton backend")
            self.TPP, self.G = 1, self.T
        self.num_warps = 4 if ba * bb <= 2048 else 8


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_cached(index)


def _device_guard(device: torch.device):
    """Launches go to x's device (and its current stream, which Triton uses)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _reduce_partials(part: torch.Tensor, G: int, M: int, C: int, out: torch.Tensor,
                     scale: torch.Tensor | None = None) -> None:
    """out[m] = sum_g part[g, m] (fixed order) [* scale[m % C]]."""
    BG, BM = min(_np2(G), 32), 128 if not _is_interpreted() else min(_np2(M), 4096)
    _sum_partials_kernel[(triton.cdiv(M, BM),)](
        part, out, scale if scale is not None else part, G, M, C,
        HAS_SCALE=scale is not None, BG=BG, BM=BM, num_warps=4)


def _tap_major_weight(weight: torch.Tensor, cl: bool):
    """The weight as the kernels read it, and its (channel, tap) element strides.

    channels_last kernels load the weights of one tap for a block of consecutive channels, so
    they get a tap-major (k*k, C) copy: one coalesced, vectorized load per tap instead of a
    strided gather (the copy is C*k*k floats, negligible next to the activations).  NCHW
    kernels load one scalar per tap and read the (C, 1, k, k) weight in place."""
    C, kk = weight.shape[0], weight.shape[2] * weight.shape[3]
    if cl:
        return weight.reshape(C, kk).t().contiguous(), (1, C)
    return weight, (kk, 1)


def _bias_arg(bias, x):
    if bias is None:
        return None
    _check_vec(bias, "bias", x)
    return bias


# ----------------------------------------------------------------------------------------------
# The four ops (signatures and semantics of convmixer_kernels.torch_ops)
# ----------------------------------------------------------------------------------------------


def dw_conv_stats(x, weight, bias, act: int, act_first: bool):
    """-> (pre [x's dtype and format], mean [C], var [C] biased) of the BN input u."""
    cl = _check_x(x)
    k = _check_weight(weight, x)
    bias = _bias_arg(bias, x)
    act, act_first = _check_flags(act, act_first=act_first)
    N, C, H, W = x.shape
    fmt = torch.channels_last if cl else torch.contiguous_format
    pre = new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    mean = new_output((C,), dtype=torch.float32, device=x.device)
    var = new_output((C,), dtype=torch.float32, device=x.device)
    if C == 0:
        return pre, mean, var
    if x.numel() == 0:
        mean.fill_(float("nan"))
        var.fill_(float("nan"))
        return pre, mean, var
    p = _Plan(x, cl, _CONV_TILE, grouped=True)
    part = torch.empty((3, p.G, C), dtype=torch.float32, device=x.device)
    w_t, w_strides = _tap_major_weight(weight, cl)
    with _device_guard(x.device):
        _dw_conv_stats_kernel[(p.G, p.CB)](
            x, w_t, bias if bias is not None else weight, pre, part,
            N, C, H, W, *_strides(x, cl), *w_strides, p.T, p.TPP, p.G,
            K=k, act=act, act_first=act_first, has_bias=bias is not None, CL=cl,
            BA=p.BA, BB=p.BB, num_warps=p.num_warps)
        BG = min(_np2(p.G), 32)
        BM = 128 if not _is_interpreted() else min(_np2(C), 4096)
        _stats_finalize_kernel[(triton.cdiv(C, BM),)](part, mean, var, p.G, C, BG=BG, BM=BM,
                                                      num_warps=4)
    return pre, mean, var


def dw_fwd(x, weight, bias, scale, shift, act: int, act_first: bool, residual: bool):
    """y = [x +] (scale*act(pre)+shift  if act_first else  act(scale*pre+shift))."""
    cl = _check_x(x)
    k = _check_weight(weight, x)
    bias = _bias_arg(bias, x)
    _check_vec(scale, "scale", x)
    _check_vec(shift, "shift", x)
    act, act_first, residual = _check_flags(act, act_first=act_first, residual=residual)
    N, C, H, W = x.shape
    fmt = torch.channels_last if cl else torch.contiguous_format
    y = new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if x.numel() == 0:
        return y
    p = _Plan(x, cl, _CONV_TILE, grouped=False)
    w_t, w_strides = _tap_major_weight(weight, cl)
    with _device_guard(x.device):
        _dw_fwd_kernel[(p.T, p.CB)](
            x, w_t, bias if bias is not None else weight, scale, shift, y,
            N, C, H, W, *_strides(x, cl), *w_strides,
            K=k, act=act, act_first=act_first, residual=residual, has_bias=bias is not None,
            CL=cl, BA=p.BA, BB=p.BB, num_warps=p.num_warps)
    return y


def dw_bwd_reduce(dy, pre, scale, shift, mean, invstd, act: int, act_first: bool):
    """-> (sum_g [C], sum_gxhat [C]): the BatchNorm backward sums (dbeta, dgamma)."""
    cl = _check_x(dy, "dy")
    _check_like_x(pre, "pre", dy, cl)
    for name, v in (("scale", scale), ("shift", shift), ("mean", mean), ("invstd", invstd)):
        _check_vec(v, name, dy)
    act, act_first = _check_flags(act, act_first=act_first)
    N, C, H, W = dy.shape
    sum_g = new_output((C,), dtype=torch.float32, device=dy.device)
    sum_gx = new_output((C,), dtype=torch.float32, device=dy.device)
    if C == 0:
        return sum_g, sum_gx
    if dy.numel() == 0:
        sum_g.zero_()
        sum_gx.zero_()
        return sum_g, sum_gx
    p = _Plan(dy, cl, _CONV_TILE, grouped=True)
    part = torch.empty((2, p.G, C), dtype=torch.float32, device=dy.device)
    with _device_guard(dy.device):
        _dw_bwd_reduce_kernel[(p.G, p.CB)](
            dy, pre, scale, shift, mean, part,
            N, C, H, W, *_strides(dy, cl), p.T, p.TPP, p.G,
            act=act, act_first=act_first, CL=cl, BA=p.BA, BB=p.BB, num_warps=p.num_warps)
        _reduce_partials(part[0], p.G, C, C, sum_g)
        _reduce_partials(part[1], p.G, C, C, sum_gx, scale=invstd)
    return sum_g, sum_gx


def dw_bwd(dy, x, pre, weight, scale, shift, mean, ca, cb, cd, act: int, act_first: bool,
           residual: bool):
    """-> (dx [x's dtype and format], dweight [C,1,k,k] float32, dbias [C] float32)."""
    cl = _check_x(x)
    _check_like_x(dy, "dy", x, cl)
    _check_like_x(pre, "pre", x, cl)
    k = _check_weight(weight, x)
    for name, v in (("scale", scale), ("shift", shift), ("mean", mean), ("ca", ca), ("cb", cb),
                    ("cd", cd)):
        _check_vec(v, name, x)
    act, act_first, residual = _check_flags(act, act_first=act_first, residual=residual)
    N, C, H, W = x.shape
    fmt = torch.channels_last if cl else torch.contiguous_format
    dx = new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    dweight = new_output(weight.shape, dtype=torch.float32, device=x.device)
    dbias = new_output((C,), dtype=torch.float32, device=x.device)
    if C == 0:
        return dx, dweight, dbias
    if x.numel() == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias
    strides = _strides(x, cl)
    # dpre in float32, x's shape and format (every element is written by the dpre kernel)
    dpre = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    kkp = _np2(k * k)
    pe = _Plan(x, cl, _CONV_TILE, grouped=False)
    # keep the [KKP, BB] dweight accumulator of the channels_last kernel within 8K floats
    pc = _Plan(x, cl, _BWD_CONV_TILE, grouped=True, max_bb=max(1, min(32, _BWD_ACC_MAX // kkp)))
    pdw = torch.empty((pc.G, C * k * k), dtype=torch.float32, device=x.device)
    pdb = torch.empty((pc.G, C), dtype=torch.float32, device=x.device)
    w_t, w_strides = _tap_major_weight(weight, cl)
    with _device_guard(x.device):
        _dw_bwd_dpre_kernel[(pe.T, pe.CB)](
            dy, pre, scale, shift, mean, ca, cb, cd, dpre, N, C, H, W, *strides,
            act=act, act_first=act_first, CL=cl, BA=pe.BA, BB=pe.BB, num_warps=pe.num_warps)
        _dw_bwd_conv_kernel[(pc.G, pc.CB)](
            dy, x, dpre, w_t, dx, pdw, pdb, N, C, H, W, *strides, *w_strides, pc.T, pc.TPP,
            pc.G,
            K=k, residual=residual, CL=cl, BA=pc.BA, BB=pc.BB, KKP=kkp, num_warps=pc.num_warps)
        _reduce_partials(pdw, pc.G, C * k * k, C, dweight.view(-1))
        _reduce_partials(pdb, pc.G, C, C, dbias)
    return dx, dweight, dbias
