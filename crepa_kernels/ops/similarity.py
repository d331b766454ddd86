"""Fused L2-normalise + distance-decayed multi-offset cosine similarity (SPEC sections 3-4).

One op, forward and backward, in Triton: for every token of every frame it returns the cosine of the
projected vector with the teacher vector of the same frame (`self_tok`) and the weighted sum over the
neighbour frames (`total_tok`). Normalised copies of the (B, T, N, D) inputs are never written: the
forward keeps per-token norms and per-slot cosines (small side buffers) and the backward recomputes
from the raw inputs, gathering every gradient contribution into its owner (deterministic, no atomics).

Slots: slot 0 is the frame itself; then, for each offset k of the window in increasing order, the
slots (-k, +k). With K = {1..d} (cumulative) or {d} (adjacent), S = 1 + 2|K|; a slot whose frame falls
outside [0, T) is "invalid" and contributes nothing (its saved cosine is 0).
"""
from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import register_autograd, triton_op

from .resample import (_axis_contributors, _axis_scale, _axis_taps, _axis_weight, _contributor_bound,
                       _gather_columns, _gather_v_pad, _input_token_contributors, _row_tile, _rows_v_pad,
                       check_grid_sides, resample_tokens)
from .resample import _kernel, _launch_bwd as _launch_resample_bwd
from ..reference import EPS  # F.normalize's default, as the oracle uses
from .utils import (BAND_TUNE_KEYS, DEFAULT_ELEMS_PER_THREAD, FLOAT_DTYPES, LAUNCH_OVERRIDES, ROW_TUNE_KEYS,
                    accumulation_dtype, apply_tune, bwd_window_bytes, cdiv, check_feature_dim, device_guard,
                    direct_launch_ok, elements_per_thread, fused_halves_token_block, is_plain_tensor,
                    merged_backward_enabled, next_power_of_2, num_warps_for, row_backward_enabled, triton_supports)

__all__ = ["neighbour_cosine", "num_slots"]



# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _slot_geometry(d, S, S_PAD: tl.constexpr, CUMULATIVE: tl.constexpr):
    """Slot index j, its frame distance k and signed frame offset (slot 0 = self, then -k, +k)."""
    j = tl.arange(0, S_PAD)
    jm = tl.maximum(j - 1, 0)
    if CUMULATIVE:
        k = jm // 2 + 1
    else:
        k = jm * 0 + d
    offset = tl.where(j == 0, 0, tl.where(jm % 2 == 0, -k, k))
    in_window = j < S
    return j, k, offset, in_window


@triton.jit
def _split_scalar(hi, lo, ACC: tl.constexpr):
    # hi + lo restores a double-precision value for fp64 math (see `_split`). Triton's launch passes
    # Python floats as fp32, a torch.compile graph as fp64, torch's write analysis and the
    # interpreter as Python floats: each half becomes an ACC value first (tl.full casts a tensor and
    # makes a constant exactly), so fp32 kernels do fp32 math and read the same fp32 value (hi is an
    # fp32 value; lo rounds to fp32 as Triton's launch rounds it) on every route.
    return tl.full([], hi, ACC) + tl.full([], lo, ACC)


@triton.jit
def _clamp_eps(norm, eps):
    """max(norm, eps) that keeps a NaN norm, as torch's clamp_min (F.normalize) does: tl.maximum
    alone returns eps for a NaN, which turns a token holding a NaN into finite gradients of ~1/eps
    beside the NaN element."""
    return tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _resampled_rows(offs_n, in_h, in_w, out_h, out_w, stride_n, TAPS_FP64: tl.constexpr):
    """For tokens ``offs_n`` of the resampled (out) grid: the offsets (token index * stride_n) of their
    four source tokens on the in grid and the bilinear weights, exactly as the resample kernel
    computes them (align_corners=False; fp64 taps for fp64 inputs, fp32 otherwise)."""
    oh = (offs_n // out_w).to(tl.int32)
    ow = (offs_n % out_w).to(tl.int32)
    h0, h1, lh0, lh1 = _axis_taps(oh, in_h, _axis_scale(in_h, out_h, TAPS_FP64))
    w0, w1, lw0, lw1 = _axis_taps(ow, in_w, _axis_scale(in_w, out_w, TAPS_FP64))
    row0 = h0.to(tl.int64) * in_w
    row1 = h1.to(tl.int64) * in_w
    return ((row0 + w0) * stride_n, (row0 + w1) * stride_n, (row1 + w0) * stride_n, (row1 + w1) * stride_n,
            lh0, lh1, lw0, lw1)


@triton.jit
def _load_resampled(frame_ptr, o00, o01, o10, o11, col_off, mask, lh0, lh1, lw0, lw1,
                    OUT: tl.constexpr, ACC: tl.constexpr):
    """One (BLOCK_N, BLOCK_D) tile of resampled tokens from their four taps (token offsets o**,
    column offsets col_off). In the taps' precision, width first, then height (the resample kernel's
    order), rounded to the input dtype as the resampled copy would be stored, then widened."""
    tap = lh0.dtype
    v00 = tl.load(frame_ptr + o00[:, None] + col_off[None, :], mask=mask, other=0.0).to(tap)
    v01 = tl.load(frame_ptr + o01[:, None] + col_off[None, :], mask=mask, other=0.0).to(tap)
    v10 = tl.load(frame_ptr + o10[:, None] + col_off[None, :], mask=mask, other=0.0).to(tap)
    v11 = tl.load(frame_ptr + o11[:, None] + col_off[None, :], mask=mask, other=0.0).to(tap)
    top = lw0[:, None] * v00 + lw1[:, None] * v01
    bottom = lw0[:, None] * v10 + lw1[:, None] * v11
    return (lh0[:, None] * top + lh1[:, None] * bottom).to(OUT).to(ACC)


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
def _neighbour_cosine_fwd_kernel(
    p_ptr, f_ptr, total_ptr, self_ptr, pnorm_ptr, fnorm_ptr, cos_ptr,
    T, N, D, d, S, NUM_N_BLOCKS,
    inv_tau_hi, inv_tau_lo, eps_hi, eps_lo,
    sp_b, sp_t, sp_n, sp_d,
    sf_b, sf_t, sf_n, sf_d,
    in_h, in_w, out_h, out_w,
    S_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CUMULATIVE: tl.constexpr, NORMALIZE: tl.constexpr, IS_FP64: tl.constexpr,
    RESAMPLE_P: tl.constexpr, TAPS_FP64: tl.constexpr,
):
    """RESAMPLE_P: ``p`` is on the (in_h, in_w) token grid and is resampled bilinearly to the
    (out_h, out_w) grid of ``f`` (N = out_h * out_w tokens) as it is loaded; no resampled copy."""
    ACC = total_ptr.dtype.element_ty
    # Frames vary fastest so the programs sharing neighbour frames run together (L2 reuse).
    pid = tl.program_id(0).to(tl.int64)
    t = pid % T
    rest = pid // T
    n_block = rest % NUM_N_BLOCKS
    b = rest // NUM_N_BLOCKS

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    j, k, offset, in_window = _slot_geometry(d, S, S_PAD, CUMULATIVE)
    u = t + offset.to(tl.int64)
    valid = in_window & (u >= 0) & (u < T)
    u = tl.where(valid, u, t)  # keep addresses in range even where masked

    inv_tau = _split_scalar(inv_tau_hi, inv_tau_lo, ACC)
    eps = _split_scalar(eps_hi, eps_lo, ACC)
    w = tl.where(j == 0, 1.0, tl.exp(-k.to(ACC) * inv_tau)).to(ACC)
    w = tl.where(valid, w, 0.0)

    # Pointer tiles are built once and advanced by BLOCK_D columns per step (cheap int64 adds).
    cols = tl.arange(0, BLOCK_D)
    step_p = tl.full([], BLOCK_D, tl.int64) * sp_d  # int64: BLOCK_D * stride can pass 2^31
    step_f = tl.full([], BLOCK_D, tl.int64) * sf_d
    if RESAMPLE_P:
        o00, o01, o10, o11, lh0, lh1, lw0, lw1 = _resampled_rows(offs_n, in_h, in_w, out_h, out_w, sp_n,
                                                                 TAPS_FP64)
        p_frame = p_ptr + b * sp_b + t * sp_t
        p_col = cols.to(tl.int64) * sp_d
    else:
        p_ptrs = p_ptr + b * sp_b + t * sp_t + offs_n[:, None] * sp_n + cols[None, :].to(tl.int64) * sp_d
    f_ptrs = (f_ptr + b * sf_b + u[:, None, None] * sf_t + offs_n[None, :, None] * sf_n
              + cols[None, None, :].to(tl.int64) * sf_d)
    acc_pp = tl.zeros([BLOCK_N], dtype=ACC)
    acc_pf = tl.zeros([S_PAD, BLOCK_N], dtype=ACC)
    acc_ff = tl.zeros([S_PAD, BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        pd_mask = n_mask[:, None] & ((d0 + cols) < D)[None, :]
        if RESAMPLE_P:
            p = _load_resampled(p_frame, o00, o01, o10, o11, p_col, pd_mask, lh0, lh1, lw0, lw1,
                                p_ptr.dtype.element_ty, ACC)
            p_col += step_p
        else:
            p = tl.load(p_ptrs, mask=pd_mask, other=0.0).to(ACC)
            p_ptrs += step_p
        f = tl.load(f_ptrs, mask=valid[:, None, None] & pd_mask[None, :, :], other=0.0).to(ACC)
        acc_pp += tl.sum(p * p, axis=1)
        acc_pf += tl.sum(p[None, :, :] * f, axis=2)
        acc_ff += tl.sum(f * f, axis=2)
        f_ptrs += step_f

    if IS_FP64:
        pn = tl.sqrt(acc_pp)
        fn = tl.sqrt(acc_ff)
    else:
        pn = tl.sqrt_rn(acc_pp)
        fn = tl.sqrt_rn(acc_ff)
    cos = acc_pf / (_clamp_eps(pn, eps)[None, :] * _clamp_eps(fn, eps))
    cos = tl.where(valid[:, None], cos, 0.0)
    is_self = (j == 0)[:, None]
    self_cos = tl.sum(tl.where(is_self, cos, 0.0), axis=0)
    fn_self = tl.sum(tl.where(is_self, fn, 0.0), axis=0)
    total = tl.sum(w[:, None] * cos, axis=0)
    if NORMALIZE:
        total = total / tl.sum(w, axis=0)

    row = (b * T + t) * N + offs_n
    tl.store(total_ptr + row, total.to(total_ptr.dtype.element_ty), mask=n_mask)
    tl.store(self_ptr + row, self_cos.to(self_ptr.dtype.element_ty), mask=n_mask)
    tl.store(pnorm_ptr + row, pn.to(pnorm_ptr.dtype.element_ty), mask=n_mask)
    tl.store(fnorm_ptr + row, fn_self.to(fnorm_ptr.dtype.element_ty), mask=n_mask)
    cos_offs = ((b * T + t) * S + j.to(tl.int64))[:, None] * N + offs_n[None, :]
    tl.store(cos_ptr + cos_offs, cos.to(cos_ptr.dtype.element_ty),
             mask=in_window[:, None] & n_mask[None, :])


@triton.jit
def _slot_weights(frames, w_base, offset, in_window, T, NORMALIZE: tl.constexpr):
    """w_j / den[frame_j] for each slot j, where frame_j is the centre frame the slot belongs to."""
    if NORMALIZE:
        # den[t] = 1 + sum of the w_k whose frame t + o_i is inside the clip (an S_PAD x S_PAD table).
        nb = frames[:, None] + offset[None, :].to(tl.int64)
        used = in_window[None, :] & (nb >= 0) & (nb < T)
        den = tl.sum(tl.where(used, w_base[None, :], 0.0), axis=1)
        return w_base / den
    else:
        return w_base


@triton.jit
def _slot_grad(gt_ptr, gs_ptr, b, frames, offs_n, mask, j, scale, gt_mul,
               sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n,
               ACC: tl.constexpr, HAS_GT: tl.constexpr, HAS_GS: tl.constexpr):
    """g_cos[frame_j, j, n] = (g_total * gt_mul) * w_j / den + [j == 0] * g_self, zero where the slot is
    invalid (``gt_mul`` is 1 unless the launcher folds a constant factor of g_total into it)."""
    g = tl.zeros(mask.shape, dtype=ACC)
    if HAS_GT:
        gt = tl.load(gt_ptr + b * sgt_b + frames[:, None] * sgt_t + offs_n[None, :] * sgt_n,
                     mask=mask, other=0.0).to(ACC) * gt_mul
        g += gt * scale[:, None]
    if HAS_GS:
        gs = tl.load(gs_ptr + b * sgs_b + frames[:, None] * sgs_t + offs_n[None, :] * sgs_n,
                     mask=mask & (j == 0)[:, None], other=0.0).to(ACC)
        g += gs
    return g


@triton.jit
def _centre_slots(gt_ptr, gs_ptr, cos_ptr, pnorm_ptr, b, t, T, N, S, toks, tok_mask, j, offset, in_window,
                  w_base, eps, gt_mul, sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n,
                  ACC: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GT: tl.constexpr, HAS_GS: tl.constexpr):
    """The slots of centre frame t for its tokens ``toks``: the partner frames u_j = t + o_j (t where
    the slot is invalid), the (slot, token) mask, g_cos (`_slot_grad`), |p| and beta, the projection
    of d p onto p^ divided by |p| (zero at or below eps, where F.normalize is linear)."""
    u = t + offset.to(tl.int64)
    valid = in_window & (u >= 0) & (u < T)
    u = tl.where(valid, u, t)
    m = valid[:, None] & tok_mask[None, :]
    t_frames = u * 0 + t
    scale = _slot_weights(t_frames, w_base, offset, in_window, T, NORMALIZE)
    g = _slot_grad(gt_ptr, gs_ptr, b, t_frames, toks, m, j, scale, gt_mul,
                   sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n, ACC, HAS_GT, HAS_GS)
    cos = tl.load(cos_ptr + ((b * T + t) * S + j.to(tl.int64))[:, None] * N + toks[None, :],
                  mask=m, other=0.0).to(ACC)
    np_t = tl.load(pnorm_ptr + (b * T + t) * N + toks, mask=tok_mask, other=1.0).to(ACC)
    proj = tl.sum(g * cos, axis=0)
    above = np_t > eps  # clamp_min passes no gradient at equality
    beta = tl.where(above, proj / tl.where(above, np_t * np_t, 1.0), 0.0)
    return u, valid, m, g, np_t, beta


@triton.jit(do_not_specialize=["T0", "TC", "in_h", "in_w", "out_h", "out_w"])
def _neighbour_cosine_bwd_kernel(
    p_ptr, f_ptr, pnorm_ptr, fnorm_ptr, cos_ptr, gt_ptr, gs_ptr, dp_ptr, df_ptr,
    T, N, D, d, S, NUM_N_BLOCKS, T0, TC,
    inv_tau_hi, inv_tau_lo, eps_hi, eps_lo, gt_mul_hi, gt_mul_lo,
    sp_b, sp_t, sp_n, sp_d,
    sf_b, sf_t, sf_n, sf_d,
    sgt_b, sgt_t, sgt_n,
    sgs_b, sgs_t, sgs_n,
    in_h, in_w, out_h, out_w,
    S_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CUMULATIVE: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_GT: tl.constexpr, HAS_GS: tl.constexpr,
    COMPUTE_DP: tl.constexpr, COMPUTE_DF: tl.constexpr,
    RESAMPLE_P: tl.constexpr, TAPS_FP64: tl.constexpr,
):
    """Gather form: program (t, n-block, b) owns d projected[t] and d features[t] for its tokens,
    for the frames t of the window T0 .. T0 + TC - 1 (the gradient buffers hold only that window).

    d p[t]  = sum_j alpha_j f[t + o_j] - beta p[t]   (alpha_j = g_cos[t, j] / (|p_t| |f_{t+o_j}|))
    d f[u]  = sum_j gamma_j p[u - o_j] - delta f[u]  (the (t, j) pairs with t + o_j == u)
    with the norms clamped at eps, and beta / delta (the projections onto p^ / f^) zero below eps,
    where F.normalize is linear.
    RESAMPLE_P (as in the forward; d features not supported with it): p[t] is read through its
    bilinear taps and d p is written on the resampled grid, for the resample backward to scatter."""
    tl.static_assert(not (RESAMPLE_P and COMPUTE_DF), "RESAMPLE_P computes d projected only")
    ACC = pnorm_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    t_local = pid % TC  # the programs cover frames T0 .. T0 + TC - 1 (all of them unless chunked)
    t = T0 + t_local
    rest = pid // TC
    n_block = rest % NUM_N_BLOCKS
    b = rest // NUM_N_BLOCKS

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    j, k, offset, in_window = _slot_geometry(d, S, S_PAD, CUMULATIVE)
    offset64 = offset.to(tl.int64)
    inv_tau = _split_scalar(inv_tau_hi, inv_tau_lo, ACC)
    eps = _split_scalar(eps_hi, eps_lo, ACC)
    gt_mul = _split_scalar(gt_mul_hi, gt_mul_lo, ACC)
    w_base = tl.where(j == 0, 1.0, tl.exp(-k.to(ACC) * inv_tau)).to(ACC)
    w_base = tl.where(in_window, w_base, 0.0)
    row_t = (b * T + t) * N + offs_n

    if COMPUTE_DP:
        # Slots of centre frame t: partner frames u_j = t + o_j.
        u, valid_p, m_p, g_p, np_t, beta = _centre_slots(
            gt_ptr, gs_ptr, cos_ptr, pnorm_ptr, b, t, T, N, S, offs_n, n_mask, j, offset, in_window, w_base, eps,
            gt_mul, sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n, ACC, NORMALIZE, HAS_GT, HAS_GS)
        nf_u = tl.load(fnorm_ptr + (b * T + u)[:, None] * N + offs_n[None, :], mask=m_p, other=1.0).to(ACC)
        alpha = g_p / (_clamp_eps(np_t, eps)[None, :] * _clamp_eps(nf_u, eps))

    if COMPUTE_DF:
        # Pairs (t', j) whose partner frame is t: t' = t - o_j.
        src = t - offset64
        valid_f = in_window & (src >= 0) & (src < T)
        src = tl.where(valid_f, src, t)
        m_f = valid_f[:, None] & n_mask[None, :]
        scale_f = _slot_weights(src, w_base, offset, in_window, T, NORMALIZE)
        g_f = _slot_grad(gt_ptr, gs_ptr, b, src, offs_n, m_f, j, scale_f, gt_mul,
                         sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n, ACC, HAS_GT, HAS_GS)
        cos_f = tl.load(cos_ptr + ((b * T + src) * S + j.to(tl.int64))[:, None] * N + offs_n[None, :],
                        mask=m_f, other=0.0).to(ACC)
        np_src = tl.load(pnorm_ptr + (b * T + src)[:, None] * N + offs_n[None, :], mask=m_f, other=1.0).to(ACC)
        nf_t = tl.load(fnorm_ptr + row_t, mask=n_mask, other=1.0).to(ACC)
        gamma = g_f / (_clamp_eps(np_src, eps) * _clamp_eps(nf_t, eps)[None, :])
        proj_f = tl.sum(g_f * cos_f, axis=0)
        above_f = nf_t > eps
        delta = tl.where(above_f, proj_f / tl.where(above_f, nf_t * nf_t, 1.0), 0.0)

    cols = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)
    step_p = tl.full([], BLOCK_D, tl.int64) * sp_d  # int64: BLOCK_D * stride can pass 2^31
    step_f = tl.full([], BLOCK_D, tl.int64) * sf_d
    # offsets into the contiguous (B, TC, N, D) gradients of the frame window
    out_ptrs = ((b * TC + t_local) * N + offs_n)[:, None] * D + cols64[None, :]
    if COMPUTE_DP:
        if RESAMPLE_P:
            o00, o01, o10, o11, lh0, lh1, lw0, lw1 = _resampled_rows(offs_n, in_h, in_w, out_h, out_w, sp_n,
                                                                     TAPS_FP64)
            p_frame = p_ptr + b * sp_b + t * sp_t
            p_col = cols64 * sp_d
        else:
            p_t_ptrs = p_ptr + b * sp_b + t * sp_t + offs_n[:, None] * sp_n + cols64[None, :] * sp_d
        f_u_ptrs = (f_ptr + b * sf_b + u[:, None, None] * sf_t + offs_n[None, :, None] * sf_n
                    + cols64[None, None, :] * sf_d)
    if COMPUTE_DF:
        f_t_ptrs = f_ptr + b * sf_b + t * sf_t + offs_n[:, None] * sf_n + cols64[None, :] * sf_d
        p_s_ptrs = (p_ptr + b * sp_b + src[:, None, None] * sp_t + offs_n[None, :, None] * sp_n
                    + cols64[None, None, :] * sp_d)
    for d0 in range(0, D, BLOCK_D):
        nd_mask = n_mask[:, None] & ((d0 + cols) < D)[None, :]
        if COMPUTE_DP:
            if RESAMPLE_P:
                p_t = _load_resampled(p_frame, o00, o01, o10, o11, p_col, nd_mask, lh0, lh1, lw0, lw1,
                                      p_ptr.dtype.element_ty, ACC)
                p_col += step_p
            else:
                p_t = tl.load(p_t_ptrs, mask=nd_mask, other=0.0).to(ACC)
                p_t_ptrs += step_p
            f_u = tl.load(f_u_ptrs, mask=valid_p[:, None, None] & nd_mask[None, :, :], other=0.0).to(ACC)
            dp = tl.sum(alpha[:, :, None] * f_u, axis=0) - beta[:, None] * p_t
            tl.store(dp_ptr + out_ptrs, dp.to(dp_ptr.dtype.element_ty), mask=nd_mask)
            f_u_ptrs += step_f
        if COMPUTE_DF:
            f_t = tl.load(f_t_ptrs, mask=nd_mask, other=0.0).to(ACC)
            p_s = tl.load(p_s_ptrs, mask=valid_f[:, None, None] & nd_mask[None, :, :], other=0.0).to(ACC)
            df = tl.sum(gamma[:, :, None] * p_s, axis=0) - delta[:, None] * f_t
            tl.store(df_ptr + out_ptrs, df.to(df_ptr.dtype.element_ty), mask=nd_mask)
            f_t_ptrs += step_f
            p_s_ptrs += step_p
        out_ptrs += BLOCK_D


@triton.jit
def _pick(vec, idx, lanes):
    """vec[idx] of a small vector, as a scalar (a masked sum: Triton has no dynamic indexing)."""
    return tl.sum(tl.where(lanes == idx, vec, 0), axis=0)


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w", "ROWS", "CHUNK_BLOCKS", "ITEM0"])
def _neighbour_cosine_resample_bwd_kernel(
    p_ptr, f_ptr, pnorm_ptr, fnorm_ptr, cos_ptr, gt_ptr, gs_ptr, dp_ptr, stage_ptr,
    T, N, D, d, S, NUM_BANDS, ROWS, CHUNK_BLOCKS, ITEM0,
    inv_tau_hi, inv_tau_lo, eps_hi, eps_lo, gt_mul_hi, gt_mul_lo,
    sp_b, sp_t, sp_n, sp_d,
    sf_b, sf_t, sf_n, sf_d,
    sgt_b, sgt_t, sgt_n,
    sgs_b, sgs_t, sgs_n,
    in_h, in_w, out_h, out_w,
    S_PAD: tl.constexpr, Q_PAD: tl.constexpr, F_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    CUMULATIVE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GT: tl.constexpr, HAS_GS: tl.constexpr,
    R_H: tl.constexpr, R_W: tl.constexpr, TAPS_FP64: tl.constexpr,
):
    """The fused-resample backward in one pass: d projected on the input grid, with no resampled-grid
    gradient in memory.

    Work item ITEM0 + program id, (t, band, D chunk, b), is a band of ROWS whole rows of frame t's
    input grid (Q, at most Q_PAD tokens) and the columns of a D chunk (a launch runs at most
    `_band_launch_config`'s programs; larger batches take several launches). The resampled tokens
    whose taps touch the band are whole output rows (F, at most F_PAD tokens, one contiguous range).
    Per block of BLOCK_D columns it forms their resampled-grid gradient, as the two-pass similarity
    backward does, g[f] = sum_j alpha_j[f] F[t + o_j, f] - beta[f] p_res[f] (alpha, beta from the
    saved side buffers, p_res through the taps), stages it in the program's own slice of
    ``stage_ptr`` (a few KiB, rewritten every block, so it stays in L2), and gathers it back into
    the band:
    d P[q] = sum over q's contributors f of W[f, q] g[f], in the resample backward's fixed order
    (rows, then columns). Deterministic, no atomics, accumulated in fp32 (fp64) with no rounding
    between the two halves. F holds every contributor of the band by `_contributor_bound`'s proof;
    the launcher sizes the pads (`_band_launch_config`)."""
    ACC = pnorm_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    item = ITEM0 + pid
    t = item % T  # frames fastest: items sharing teacher frames run together (L2 reuse) ...
    rest = item // T
    band = rest % NUM_BANDS  # ... then the neighbouring bands, which share their edge rows
    rest = rest // NUM_BANDS
    num_chunks = tl.cdiv(tl.cdiv(D, BLOCK_D), CHUNK_BLOCKS)
    chunk = rest % num_chunks
    b = rest // num_chunks
    n_in = in_h * in_w
    scale_h = _axis_scale(in_h, out_h, TAPS_FP64)
    scale_w = _axis_scale(in_w, out_w, TAPS_FP64)

    # The band's first and last input rows and the output rows oh_a .. oh_b - 1 touching them.
    r0 = band * ROWS
    r1 = tl.minimum(r0 + ROWS, in_h) - 1
    two = tl.arange(0, 2)
    ends = tl.where(two == 0, r0, r1).to(tl.int32)
    lo, count = _axis_contributors(ends, in_h, out_h, scale_h)
    oh_a = _pick(lo, 0, two).to(tl.int64)
    oh_b = _pick(lo + count, 1, two).to(tl.int64)

    # F lanes: the resampled tokens, their taps, and alpha / beta as `_neighbour_cosine_bwd_kernel`.
    f_tok = oh_a * out_w + tl.arange(0, F_PAD).to(tl.int64)
    f_mask = f_tok < oh_b * out_w
    o00, o01, o10, o11, lh0, lh1, lw0, lw1 = _resampled_rows(f_tok, in_h, in_w, out_h, out_w, sp_n, TAPS_FP64)
    j, k, offset, in_window = _slot_geometry(d, S, S_PAD, CUMULATIVE)
    inv_tau = _split_scalar(inv_tau_hi, inv_tau_lo, ACC)
    eps = _split_scalar(eps_hi, eps_lo, ACC)
    gt_mul = _split_scalar(gt_mul_hi, gt_mul_lo, ACC)
    w_base = tl.where(j == 0, 1.0, tl.exp(-k.to(ACC) * inv_tau)).to(ACC)
    w_base = tl.where(in_window, w_base, 0.0)
    _u, valid, _m, _g, np_t, beta = _centre_slots(
        gt_ptr, gs_ptr, cos_ptr, pnorm_ptr, b, t, T, N, S, f_tok, f_mask, j, offset, in_window, w_base, eps,
        gt_mul, sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n, ACC, NORMALIZE, HAS_GT, HAS_GS)
    # Per slot, inside the loop over D, alpha_j is rebuilt from these rows and the slot's scalars (its
    # frame, weight, teacher norms): no cross-lane reduction there.
    np_c = _clamp_eps(np_t, eps)
    g_t = tl.zeros([F_PAD], dtype=ACC)
    g_s = tl.zeros([F_PAD], dtype=ACC)
    if HAS_GT:
        g_t = tl.load(gt_ptr + b * sgt_b + t * sgt_t + f_tok * sgt_n, mask=f_mask, other=0.0).to(ACC) * gt_mul
    if HAS_GS:
        g_s = tl.load(gs_ptr + b * sgs_b + t * sgs_t + f_tok * sgs_n, mask=f_mask, other=0.0).to(ACC)
    den = tl.sum(tl.where(valid, w_base, 0.0), axis=0)  # 1 + the neighbour weights used at frame t

    # Q lanes: the band's input tokens and their contributors on the output grid.
    q_tok = r0 * in_w + tl.arange(0, Q_PAD).to(tl.int64)
    q_mask = q_tok < (r1 + 1) * in_w
    ih, iw, _sh, _sw, q_oh_lo, q_oh_count, q_ow_lo, q_ow_count = _input_token_contributors(
        q_tok, in_h, in_w, out_h, out_w, TAPS_FP64)

    cols0 = tl.arange(0, BLOCK_D).to(tl.int64)
    p_frame = p_ptr + b * sp_b + t * sp_t
    f_rows = f_tok[:, None] * sf_n
    stage = stage_ptr + pid * (F_PAD * BLOCK_D)  # this program's slice, (F_PAD, BLOCK_D) row-major
    cols32 = tl.arange(0, BLOCK_D)
    stage_f = tl.arange(0, F_PAD)[:, None] * BLOCK_D + cols32[None, :]  # int32: F_PAD * BLOCK_D < 2^31
    out_rows = ((b * T + t) * n_in + q_tok)[:, None] * D
    blk_lo = chunk * CHUNK_BLOCKS
    blk_hi = tl.minimum(blk_lo + CHUNK_BLOCKS, tl.cdiv(D, BLOCK_D))
    for blk in range(blk_lo, blk_hi):
        # Blocks start at multiples of BLOCK_D and only D cuts one: aligned, and masks constant over
        # aligned groups of columns (vector loads where D is a multiple of 16).
        cols = blk * BLOCK_D + cols0
        d_mask = (cols < D)[None, :]
        fd_mask = f_mask[:, None] & d_mask
        p_res = _load_resampled(p_frame, o00, o01, o10, o11, cols * sp_d, fd_mask, lh0, lh1, lw0, lw1,
                                p_ptr.dtype.element_ty, ACC)
        s = tl.zeros([F_PAD, BLOCK_D], dtype=ACC)
        for jj in range(S):  # the slots of the window only (a loop: one teacher tile live at a time)
            # Slot jj as `_slot_geometry` numbers it: frame distance k_j, partner frame u_j, weight.
            jm = tl.maximum(jj - 1, 0)
            if CUMULATIVE:
                k_j = jm // 2 + 1
            else:
                k_j = jm * 0 + d
            u_j = t + tl.where(jj == 0, 0, tl.where(jm % 2 == 0, -k_j, k_j)).to(tl.int64)
            ok_j = (u_j >= 0) & (u_j < T)
            u_j = tl.where(ok_j, u_j, t)
            scale_j = tl.where(jj == 0, 1.0, tl.exp(-k_j.to(ACC) * inv_tau)).to(ACC)
            if NORMALIZE:
                scale_j = scale_j / den
            # alpha_j = g_cos / (|p| |f_u|), g_cos as `_slot_grad` forms it
            g_j = tl.zeros([F_PAD], dtype=ACC)
            if HAS_GT:
                g_j += g_t * scale_j
            if HAS_GS:
                g_j += tl.where(jj == 0, g_s, 0.0)
            nf_j = tl.load(fnorm_ptr + (b * T + u_j) * N + f_tok, mask=f_mask & ok_j, other=1.0).to(ACC)
            a_j = tl.where(ok_j, g_j / (np_c * _clamp_eps(nf_j, eps)), 0.0)
            fj = tl.load(f_ptr + b * sf_b + u_j * sf_t + f_rows + cols[None, :] * sf_d, mask=fd_mask & ok_j,
                         other=0.0).to(ACC)
            s += a_j[:, None] * fj
        g = s - beta[:, None] * p_res
        tl.debug_barrier()  # every thread is done reading the previous block's g
        tl.store(stage + stage_f, g)
        tl.debug_barrier()  # ... and every thread's g is written
        # d P[q] = sum of W[f, q] g[f] over q's contributors, rows then columns.
        acc = tl.zeros([Q_PAD, BLOCK_D], dtype=ACC)
        for r in range(R_H * R_W):
            c_oh = q_oh_lo + r // R_W
            c_ow = q_ow_lo + r % R_W
            touch = q_mask & (r // R_W < q_oh_count) & (r % R_W < q_ow_count)
            wgt = (_axis_weight(c_oh, ih, in_h, out_h, scale_h)
                   * _axis_weight(c_ow, iw, in_w, out_w, scale_w)).to(ACC)
            local = tl.where(touch, (c_oh - oh_a.to(tl.int32)) * out_w + c_ow, 0)  # < F_PAD where touching
            gq = tl.load(stage + local[:, None] * BLOCK_D + cols32[None, :], mask=touch[:, None], other=0.0,
                         cache_modifier=".cg")
            acc += wgt[:, None] * gq
        tl.store(dp_ptr + out_rows + cols[None, :], acc.to(dp_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask)


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
def _neighbour_cosine_rows_bwd_kernel(
    p_ptr, f_ptr, pnorm_ptr, fnorm_ptr, cos_ptr, gt_ptr, gs_ptr, dp_ptr,
    T, N, D, d, S, n_w_tiles, D_BLOCKS,
    inv_tau_hi, inv_tau_lo, eps_hi, eps_lo, gt_mul_hi, gt_mul_lo,
    sp_b, sp_t, sp_n, sp_d,
    sf_b, sf_t, sf_n, sf_d,
    sgt_b, sgt_t, sgt_n,
    sgs_b, sgs_t, sgs_n,
    in_h, in_w, out_h, out_w,
    S_PAD: tl.constexpr, R_W: tl.constexpr, BLOCK_W: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, CUMULATIVE: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_GT: tl.constexpr, HAS_GS: tl.constexpr, TAPS_FP64: tl.constexpr,
):
    """The fused-resample backward in one pass, row form: d projected on the input grid with no
    resampled-grid gradient in memory and no staging.

    Program (w tile, input row ih, frame t, b; D chunk) owns BLOCK_W consecutive tokens of row ih of
    frame t. The resampled rows oh touching ih are scalars (`_axis_contributors`), and the resampled
    columns touching the tile one run of at most V_PAD from the tile's first contributor (as in
    `resample._resample_bwd_rows_kernel`). Per block of BLOCK_D columns, for each such row it forms
    the resampled-grid gradient of the run's tokens as `_neighbour_cosine_bwd_kernel` does,
    g[f] = sum_j alpha_j[f] F[t + o_j, f] - beta[f] p_res[f], and sums v = sum over oh of W_h[oh, ih] g;
    then each token gathers its columns of v in registers (tl.gather):
    d P[ih, iw] = sum over ow of W_w[ow, iw] v[ow]. A resampled row's g is formed once per input row it
    touches (about twice at wan480). Deterministic, no atomics, accumulated in fp32 (fp64), with no
    rounding between the two halves."""
    ACC = pnorm_ptr.dtype.element_ty
    pid0 = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    w_tile = pid0 % n_w_tiles  # the tiles of a row, then the rows of a frame, then frames, then b
    rest = pid0 // n_w_tiles
    ih = (rest % in_h).to(tl.int32)
    rest = rest // in_h
    t = rest % T
    b = rest // T
    n_in = in_h * in_w

    scale_h, scale_w, oh_lo, oh_count, iw, w_mask, ow_lo, ow_count, ow_first, v_cols, v_mask = _row_tile(
        ih, w_tile, in_h, in_w, out_h, out_w, BLOCK_W, V_PAD, TAPS_FP64)

    j, k, offset, in_window = _slot_geometry(d, S, S_PAD, CUMULATIVE)
    inv_tau = _split_scalar(inv_tau_hi, inv_tau_lo, ACC)
    eps = _split_scalar(eps_hi, eps_lo, ACC)
    gt_mul = _split_scalar(gt_mul_hi, gt_mul_lo, ACC)
    w_base = tl.where(j == 0, 1.0, tl.exp(-k.to(ACC) * inv_tau)).to(ACC)
    w_base = tl.where(in_window, w_base, 0.0)

    p_frame = p_ptr + b * sp_b + t * sp_t
    out_base = dp_ptr + ((b * T + t) * n_in + ih.to(tl.int64) * in_w + iw.to(tl.int64))[:, None] * D
    blk_lo = pid_d * D_BLOCKS
    blk_hi = tl.minimum(blk_lo + D_BLOCKS, tl.cdiv(D, BLOCK_D))
    for blk in range(blk_lo, blk_hi):
        cols = blk * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = cols < D
        fd_mask = v_mask[:, None] & d_mask[None, :]
        v = tl.zeros([V_PAD, BLOCK_D], dtype=ACC)
        for kh in range(0, oh_count):  # the resampled rows touching ih, ascending
            oh = oh_lo + kh
            wh = _axis_weight(oh, ih, in_h, out_h, scale_h).to(ACC)
            f_tok = oh.to(tl.int64) * out_w + v_cols
            # alpha_j, beta of these tokens from the side buffers, as the two-pass backward forms them
            u, valid, m, g_p, np_t, beta = _centre_slots(
                gt_ptr, gs_ptr, cos_ptr, pnorm_ptr, b, t, T, N, S, f_tok, v_mask, j, offset, in_window, w_base,
                eps, gt_mul, sgt_b, sgt_t, sgt_n, sgs_b, sgs_t, sgs_n, ACC, NORMALIZE, HAS_GT, HAS_GS)
            nf_u = tl.load(fnorm_ptr + (b * T + u)[:, None] * N + f_tok[None, :], mask=m, other=1.0).to(ACC)
            alpha = g_p / (_clamp_eps(np_t, eps)[None, :] * _clamp_eps(nf_u, eps))
            o00, o01, o10, o11, lh0, lh1, lw0, lw1 = _resampled_rows(f_tok, in_h, in_w, out_h, out_w, sp_n,
                                                                     TAPS_FP64)
            p_res = _load_resampled(p_frame, o00, o01, o10, o11, cols * sp_d, fd_mask, lh0, lh1, lw0, lw1,
                                    p_ptr.dtype.element_ty, ACC)
            f_u = tl.load(f_ptr + b * sf_b + u[:, None, None] * sf_t + (f_tok * sf_n)[None, :, None]
                          + (cols * sf_d)[None, None, :], mask=valid[:, None, None] & fd_mask[None, :, :],
                          other=0.0).to(ACC)
            g = tl.sum(alpha[:, :, None] * f_u, axis=0) - beta[:, None] * p_res
            v += wh * g
        acc = _gather_columns(v, iw, w_mask, ow_lo, ow_count, ow_first, in_w, out_w, scale_w, R_W, BLOCK_W, BLOCK_D)
        tl.store(out_base + cols[None, :], acc.to(dp_ptr.dtype.element_ty), mask=w_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch settings and launchers
# ----------------------------------------------------------------------------------------------------


MAX_BLOCK_D = 256  # the largest feature block the launch settings choose; larger tiles only spill


def num_slots(distance: int, T: int, cumulative: bool) -> int:
    """S = 1 + 2|K| for the clamped window d = min(distance, T - 1)."""
    d = min(int(distance), int(T) - 1)
    if d <= 0:
        return 1
    return 1 + 2 * (d if cumulative else 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    """The SMs of a CUDA device; an H100's 132 elsewhere (the interpreter), so launch settings match."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split(x: float) -> tuple[float, float]:
    """x as an fp32 head plus the rest. Triton's launch passes Python floats as fp32, so fp64
    kernels see x to about 48 bits there; a torch.compile graph passes fp64 and the interpreter a
    Python float, where hi + rest is x itself."""
    hi = struct.unpack("f", struct.pack("f", x))[0]  # plain Python: this also runs while tracing
    return hi, float(x - hi)


_UNIT = _split(1.0)


def _grad_strides(g) -> tuple[int, int, int]:
    """The (B, T, N) strides a kernel reads a gradient with: (0, 0, 0) for none or a 0-dim one (one
    value for every token)."""
    return (0, 0, 0) if g is None or g.dim() == 0 else g.stride()


@functools.lru_cache(maxsize=256)  # a pure function of its arguments, on every launch's path
def _window_args(distance: int, T: int, cumulative: bool, tau: float):
    """(d, S, S_PAD, (inv_tau_hi, inv_tau_lo, eps_hi, eps_lo)): the clamped neighbour distance, the
    slot count and its power-of-two padding, and the float scalars every similarity kernel takes."""
    S = num_slots(distance, T, cumulative)
    # 1 / tau held below the float32 range (where its split would be inf - inf): past 1e30 every
    # neighbour weight exp(-k / tau) is 0 in float32 and float64 alike
    inv_tau = min(1.0 / float(tau), 1e30)
    return max(0, min(int(distance), T - 1)), S, next_power_of_2(S), (*_split(inv_tau), *_split(EPS))


def _launch_config(B: int, T: int, N: int, D: int, s_pad: int, acc_dtype: torch.dtype,
                   device: torch.device, tiles: int, block_d: int | None, fused: bool = False,
                   backward: bool = False, input_bytes: int = 4):
    sms = _device_sms(device)
    return _launch_config_for(B, T, N, D, s_pad, acc_dtype == torch.float64, sms, tiles, block_d,
                              elements_per_thread(), fused, fused_halves_token_block() if fused else True,
                              backward, input_bytes)


@functools.lru_cache(maxsize=1024)
def _launch_config_for(B: int, T: int, N: int, D: int, s_pad: int, fp64: bool, sms: int, tiles: int,
                       block_d: int | None, ept: int, fused: bool, halve_fused: bool = True,
                       backward: bool = False, input_bytes: int = 4):
    """(BLOCK_N, BLOCK_D, num_warps) from the shape; no autotuning, so launches are reproducible.

    `tiles` is how many (S_PAD, BLOCK_N, BLOCK_D) neighbour tiles a program holds per step of its
    loop over D (forward 1; backward 1, or 2 when it also computes d features); `fused` adds the
    taps of a fused resample. Their total is
    kept near 4096 fp32 elements, spread over warps by `num_warps_for`: on an H200 at B=1, T=21,
    N=1369, D=1536, S=3, larger tiles (BLOCK_D=128, 4 warps) made the backward 2-3x slower and did
    not help the forward, consistent with the register counts ptxas reports for them. Token blocks
    stay small so that enough programs run to fill the GPU (T=21, N=1369 gives ~1800 at BLOCK_N=16).

    The fused-resample kernels crepa_loss launches (`fused`, not fp64, the default elements per
    thread, windows of up to 4 slots: distance 1, or cumulative up to 1) then take the settings a
    sweep of them measured fastest (bench/tune_kernels.py on an
    H200 at wan480, `bench/results/NVIDIA_H200-tune_wan480*.json`): the forward with half the warps
    for 4-byte inputs (0.168 vs 0.196 ms) and a quarter for 2-byte ones (0.119 vs 0.164 ms); the
    backward (``backward``) with 128-byte rows of ``input_bytes``-sized elements (BLOCK_D 32 in
    fp32) and a quarter of the warps: 0.116 vs 0.210 ms per 11-frame window in fp32, 0.171 vs
    0.211 ms for the 21 frames in bf16. A ``block_d`` given is kept (the warps still follow the rule).
    Wider windows keep the heuristic: fewer warps on their larger tiles would crowd each thread's
    registers (255 per thread at 2 warps for 256 slots, sm_90), and no sweep has measured them."""
    budget = (2048 if fp64 else 4096) // tiles
    block_n = max(2, min(16, next_power_of_2(N)))
    while block_n > 4 and B * T * cdiv(N, block_n) < 4 * sms:
        block_n //= 2
    while block_n > 2 and s_pad * block_n * 16 > budget:  # wide windows (cumulative, large d)
        block_n //= 2
    chosen_d = block_d
    if block_d is None:
        block_d = budget // (s_pad * block_n)
        block_d = max(16, min(block_d, 256, next_power_of_2(D)))
        block_d = 1 << (block_d.bit_length() - 1)  # power of two
    if fused:
        # The four tap tiles of a fused resample weigh about one more neighbour tile. Compiled with
        # every int argument unspecialised, ptxas (sm_90) gave the fused forward 213 registers per
        # thread at the unfused tile size, so the token block is halved (not BLOCK_D, which sets the
        # forward's summation order over D, as in the separate path).
        # As crepa_loss really launches it at wan480 (strides of 1 and divisibility by 16
        # specialised; bench/kernel_registers.py) the fused kernels take 57-64 registers either way,
        # and the full block gives each thread 16-byte instead of 8-byte tap loads in fp32. Whether
        # that is faster is for a GPU A/B: CREPA_KERNELS_FUSED_HALF_BLOCK_N=0 keeps the full block.
        if halve_fused:
            block_n = max(2, block_n // 2)
        tiles += 1
    elems = s_pad * block_n * block_d * tiles
    num_warps = num_warps_for(elems, ept)
    if fused and not fp64 and ept == DEFAULT_ELEMS_PER_THREAD and s_pad <= 4:
        narrow = input_bytes <= 2
        if backward:
            if chosen_d is None:
                # the forward's summation order over D is BLOCK_D's; the backward sums over slots only
                block_d = max(16, min(block_d, 128 // max(1, input_bytes)))
            num_warps = max(2, num_warps // 4)
        else:
            num_warps = max(2, num_warps // (4 if narrow else 2))
    return block_n, block_d, num_warps


def _launch_forward(projected, features, total, self_tok, pnorm, fnorm, cos, *, distance: int,
                    tau: float, cumulative: bool, normalize_neighbour_sum: bool,
                    block_d: int | None = None, traceable: bool = False,
                    resample_p: tuple[int, int, int, int] | None = None, tune: dict | None = None) -> None:
    """Writes every element of total/self_tok/pnorm/fnorm (B, T, N) and cos (B, T, S, N), all
    contiguous in the accumulation dtype. Inputs may have any strides. ``traceable`` launches through
    ``wrap_triton`` (inside the custom ops, so torch.compile can capture the kernel).
    ``resample_p = (in_h, in_w, out_h, out_w)``: projected is (B, T, in_h * in_w, D) and is resampled
    to features' N = out_h * out_w tokens as it is read. ``tune``: launch-setting overrides
    (`utils.apply_tune`), for tuning sweeps; without it, those `utils.launch_overrides` set, if any."""
    B, T, N, D = features.shape
    d, S, s_pad, scalars = _window_args(distance, T, cumulative, tau)
    block_n, bd, num_warps = _launch_config(B, T, N, D, s_pad, total.dtype, projected.device, 1, block_d,
                                            fused=resample_p is not None,
                                            input_bytes=projected.element_size())  # as launch_settings gives them
    block_n, bd, num_warps, extra = apply_tune(block_n, bd, num_warps,
                                               LAUNCH_OVERRIDES.get("sim_fwd") if tune is None else tune)
    n_blocks = cdiv(N, block_n)
    grid = (B * T * n_blocks,)
    if B * T * N == 0:
        return
    kernel = _kernel(_neighbour_cosine_fwd_kernel, traceable)
    kernel[grid](
        projected, features, total, self_tok, pnorm, fnorm, cos,
        T, N, D, d, S, n_blocks,
        *scalars,
        *projected.stride(), *features.stride(),
        *(resample_p or (1, 1, 1, 1)),
        S_PAD=s_pad, BLOCK_N=block_n, BLOCK_D=bd,
        CUMULATIVE=bool(cumulative), NORMALIZE=bool(normalize_neighbour_sum),
        IS_FP64=total.dtype == torch.float64, RESAMPLE_P=resample_p is not None,
        TAPS_FP64=projected.dtype == torch.float64, num_warps=num_warps, **extra,
    )


def launch_settings(shape, distance: int, cumulative: bool, acc: torch.dtype, device: torch.device,
                    tiles: int = 1, block_d: int | None = None, fused: bool = False, backward: bool = False,
                    input_dtype: torch.dtype | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) the similarity kernels launch with for features of ``shape``
    (B, T, N, D; the whole clip's, also for a backward frame window). ``tiles``: 1 for the forward and
    for a backward computing one gradient, 2 for both; ``fused``: the projected side's resample fused in;
    ``backward``: the backward kernel's settings; ``input_dtype``: projected's dtype (default ``acc``)."""
    B, T, N, D = shape
    s_pad = next_power_of_2(num_slots(distance, T, cumulative))
    item = (input_dtype if input_dtype is not None else acc).itemsize
    return _launch_config(B, T, N, D, s_pad, acc, device, max(tiles, 1), block_d, fused=fused, backward=backward,
                          input_bytes=item)


def _launch_backward(projected, features, pnorm, fnorm, cos, g_total, g_self, d_projected, d_features,
                     *, distance: int, tau: float, cumulative: bool, normalize_neighbour_sum: bool,
                     block_d: int | None = None, traceable: bool = False,
                     resample_p: tuple[int, int, int, int] | None = None,
                     frames: tuple[int, int] | None = None, tune: dict | None = None,
                     g_total_scale: float = 1.0) -> None:
    """Writes every element of d_projected and/or d_features (contiguous (B, T, N, D); pass None to
    skip one). g_total / g_self are (B, T, N) with any strides (stride 0 included) or None; g_total
    may also be 0-dim (the same value for every token), and the kernel reads it times
    ``g_total_scale``, which it gets as an fp32 head plus an fp32 tail (`_split`): in fp32 math, for a
    factor in fp32's normal range, the fp32 factor a tensor times a Python float would use.
    With ``resample_p`` (as in the forward; d_features must be None) d_projected is the gradient of
    the resampled projected, on features' N tokens. ``frames = (t0, tc)`` computes only frames
    t0 .. t0 + tc - 1: the gradient buffers are then (B, tc, N, D). ``tune`` as in `_launch_forward`."""
    B, T, N, D = features.shape
    t0, tc = frames if frames is not None else (0, T)
    if resample_p is not None and d_features is not None:
        raise ValueError("the fused resample computes d projected only; resample first when features need grad")
    d, S, s_pad, scalars = _window_args(distance, T, cumulative, tau)
    tiles = (d_projected is not None) + (d_features is not None)
    # Launch settings from the whole clip, so every window runs the same compiled kernel (as
    # launch_settings gives them).
    block_n, bd, num_warps = _launch_config(B, T, N, D, s_pad, pnorm.dtype, projected.device, max(tiles, 1),
                                            block_d, fused=resample_p is not None, backward=True,
                                            input_bytes=projected.element_size())
    block_n, bd, num_warps, extra = apply_tune(block_n, bd, num_warps,
                                               LAUNCH_OVERRIDES.get("sim_bwd") if tune is None else tune)
    n_blocks = cdiv(N, block_n)
    grid = (B * tc * n_blocks,)
    if B * tc * N == 0 or (d_projected is None and d_features is None):
        return
    # Absent pieces get a harmless stand-in pointer; the constexpr switches keep it unread/unwritten.
    gt = g_total if g_total is not None else pnorm
    gs = g_self if g_self is not None else pnorm
    dp = d_projected if d_projected is not None else pnorm
    df = d_features if d_features is not None else pnorm
    kernel = _kernel(_neighbour_cosine_bwd_kernel, traceable)
    kernel[grid](
        projected, features, pnorm, fnorm, cos, gt, gs, dp, df,
        T, N, D, d, S, n_blocks, t0, tc,
        *scalars, *(_UNIT if g_total_scale == 1.0 else _split(g_total_scale)),
        *projected.stride(), *features.stride(),
        *_grad_strides(g_total), *_grad_strides(g_self),
        *(resample_p or (1, 1, 1, 1)),
        S_PAD=s_pad, BLOCK_N=block_n, BLOCK_D=bd,
        CUMULATIVE=bool(cumulative), NORMALIZE=bool(normalize_neighbour_sum),
        HAS_GT=g_total is not None, HAS_GS=g_self is not None,
        COMPUTE_DP=d_projected is not None, COMPUTE_DF=d_features is not None,
        RESAMPLE_P=resample_p is not None, TAPS_FP64=projected.dtype == torch.float64,
        num_warps=num_warps, **extra,
    )


# Elements of the one-pass backward's larger (F or Q) tile, and the fewest columns a block keeps, so
# tiles have at most _BAND_TILE / _BAND_MIN_COLS lanes (half in fp64): a grid whose one-row band
# needs more (a wide grid, or one upsampled so much vertically that a band touches many output rows)
# takes the two-pass backward. Compiled as crepa_loss launches it at wan480 (sm_90, fp32, 8 warps,
# bench/kernel_registers.py): F tiles of 128 x 16 (the default) take 128 registers per thread on
# triton 3.8 and 3.6 (bf16: 118-120), 256 x 8 125, 256 x 16 226 and 128 x 32 234, none spilling.
_BAND_TILE = 2048
_BAND_MIN_COLS = 8
# Bands grow only while a block keeps at least this many columns (64-byte rows in fp32).
_BAND_MIN_BLOCK_D = 16
# Programs per SM in one launch at most: more work items take more launches, so the staging buffer
# (one slice per program) holds at most 16 * SMs * _BAND_TILE values whatever the batch.
_BAND_PROGRAMS_PER_SM = 16


def _band_pads(in_h: int, in_w: int, out_h: int, out_w: int, rows: int) -> tuple[int, int]:
    """(Q_PAD, F_PAD) of bands of ``rows`` input rows (see `_band_launch_config`)."""
    rows = min(rows, in_h)
    return (next_power_of_2(rows * in_w),
            next_power_of_2(min(_contributor_bound(in_h, out_h, rows), out_h) * out_w))


@functools.lru_cache(maxsize=1024)
def _band_launch_config(B: int, T: int, in_h: int, in_w: int, out_h: int, out_w: int, D: int, fp64: bool,
                        sms: int, block_d: int | None, ept: int, rows: int | None = None,
                        num_warps: int | None = None, max_block_d: int | None = None):
    """(ROWS, Q_PAD, F_PAD, BLOCK_D, D_CHUNK, num_warps, items, programs) of the one-pass
    fused-resample backward, or None where a one-row band's tiles would pass
    _BAND_TILE / _BAND_MIN_COLS lanes (the two-pass backward runs then).

    A band of ROWS input rows holds Q = ROWS * in_w tokens; the output rows touching it are at most
    `_contributor_bound(in_h, out_h, ROWS)`, F of them. Both are padded to powers of two. ROWS
    minimises the lanes all bands process per column, bands * (4 F + Q) (F carries the teacher
    tiles, the taps and g), the smaller tiles winning a tie, among the bands whose blocks keep
    _BAND_MIN_BLOCK_D columns (one row always qualifies); BLOCK_D keeps the larger tile at most
    _BAND_TILE elements (8 to 64 columns, at most ``max_block_d``); the D axis is cut into chunks
    until there are about 8 work items (frame, band, chunk) per SM, each chunk at least 4 blocks; a
    launch runs at most _BAND_PROGRAMS_PER_SM programs per SM, one item each (more items take more
    launches).
    ``rows``, ``block_d``, ``num_warps``: exact overrides (tuning)."""
    budget = _BAND_TILE // (2 if fp64 else 1)
    limit = budget // _BAND_MIN_COLS
    if rows is None:
        best = None
        for r in range(1, in_h + 1):
            q, f = _band_pads(in_h, in_w, out_h, out_w, r)
            if max(q, f) > limit or (r > 1 and max(q, f) * _BAND_MIN_BLOCK_D > budget):
                break  # both pads grow with the rows
            key = (cdiv(in_h, r) * (4 * f + q), f + q)
            if best is None or key < best[0]:
                best = (key, r)
        if best is None:
            return None
        rows = best[1]
    rows = min(rows, in_h)
    q, f = _band_pads(in_h, in_w, out_h, out_w, rows)
    if block_d is None:
        fit = 1 << max(0, (budget // max(q, f)).bit_length() - 1)  # the largest power of two within budget
        block_d = max(_BAND_MIN_COLS, min(64, next_power_of_2(D), fit))
        block_d = min(block_d, max_block_d or block_d)
    n_blocks = cdiv(D, block_d)
    bands = max(1, B * T * cdiv(in_h, rows))
    chunks = max(1, min(cdiv(8 * sms, bands), n_blocks // 4))
    d_chunk = max(1, cdiv(n_blocks, chunks)) * block_d  # one block at least (D = 0 too)
    items = B * T * cdiv(in_h, rows) * cdiv(D, d_chunk)
    programs = max(1, min(items, _BAND_PROGRAMS_PER_SM * sms))
    return rows, q, f, block_d, d_chunk, num_warps or num_warps_for((q + f) * block_d, ept), items, programs


def band_settings(B: int, T: int, grids: tuple[int, int, int, int], D: int, fp64: bool, device: torch.device,
                  tune: dict | None = None, block_d: int | None = None):
    """`_band_launch_config` as the one-pass backward launches it for features (B, T, out_h * out_w, D)
    and ``grids = (in_h, in_w, out_h, out_w)``: ``tune`` (checked ``utils.BAND_TUNE_KEYS`` overrides)
    and a caller's ``block_d`` cap applied. Returns (config, extra launch options); config is None
    where the kernel declines the grids."""
    rows, bd, num_warps, extra = apply_tune(None, None, None, tune, BAND_TUNE_KEYS)
    config = _band_launch_config(B, T, *grids, D, fp64, _device_sms(device), bd, elements_per_thread(),
                                 rows, num_warps, block_d)
    return config, extra


def _launch_merged_backward(projected, features, pnorm, fnorm, cos, g_total, g_self, d_projected, *,
                            distance: int, tau: float, cumulative: bool, normalize_neighbour_sum: bool,
                            resample_p: tuple[int, int, int, int], block_d: int | None = None,
                            traceable: bool = False, tune: dict | None = None,
                            g_total_scale: float = 1.0) -> bool:
    """Writes every element of d_projected (contiguous, projected's (B, T, in_h * in_w, D)) with one
    kernel (one launch, or several for batches past `_band_launch_config`'s programs): the similarity
    backward and the resample backward of a fused-resample forward together. False (nothing written)
    where even one-row bands would need too large tiles (a wide grid, or a strong vertical
    upsampling; `_band_launch_config`), and on ROCm, where its staging is unchecked.
    ``tune``: exact overrides of ``utils.BAND_TUNE_KEYS`` (tuning: no tile limit applies); without it,
    those `utils.launch_overrides` set."""
    if torch.version.hip is not None:
        return False  # the staging relies on PTX's bar.sync ordering a block's global writes and reads
    B, T, N, D = features.shape
    if B * T * N * D == 0:  # nothing to write (d_projected is empty too)
        return True
    in_h, in_w, out_h, out_w = resample_p
    d, S, s_pad, scalars = _window_args(distance, T, cumulative, tau)
    # A caller's block_d (crepa_loss's, for the similarity kernels) only caps the block: the band's
    # tiles keep their budget.
    config, extra = band_settings(B, T, resample_p, D, pnorm.dtype == torch.float64, projected.device,
                                  LAUNCH_OVERRIDES.get("merged_bwd") if tune is None else tune, block_d)
    if config is None:
        return False
    rows, q_pad, f_pad, bd, d_chunk, num_warps, items, grid = config
    bands = cdiv(in_h, rows)
    chunk_blocks = d_chunk // bd
    r_h, r_w = _contributor_bound(in_h, out_h), _contributor_bound(in_w, out_w)
    # Each program's (F_PAD, BLOCK_D) staging slice for its resampled-grid gradient.
    stage = torch.empty((grid * f_pad * bd,), dtype=pnorm.dtype, device=projected.device)
    gt = g_total if g_total is not None else pnorm
    gs = g_self if g_self is not None else pnorm
    kernel = _kernel(_neighbour_cosine_resample_bwd_kernel, traceable)
    # At most `grid` programs per launch (the staging buffer's slices): a larger batch takes several
    # launches, in item order, on the same stream (each reuses the slices after the previous one).
    for item0 in range(0, items, grid):
        kernel[(min(grid, items - item0),)](
            projected, features, pnorm, fnorm, cos, gt, gs, d_projected, stage,
            T, N, D, d, S, bands, rows, chunk_blocks, item0,
            *scalars, *(_UNIT if g_total_scale == 1.0 else _split(g_total_scale)),
            *projected.stride(), *features.stride(),
            *_grad_strides(g_total), *_grad_strides(g_self),
            in_h, in_w, out_h, out_w,
            S_PAD=s_pad, Q_PAD=q_pad, F_PAD=f_pad, BLOCK_D=bd,
            CUMULATIVE=bool(cumulative), NORMALIZE=bool(normalize_neighbour_sum),
            HAS_GT=g_total is not None, HAS_GS=g_self is not None,
            R_H=r_h, R_W=r_w, TAPS_FP64=projected.dtype == torch.float64, num_warps=num_warps, **extra,
        )
    return True


# The row-form one-pass backward: the most resampled columns a tile may gather from, the most a token
# may touch along a row (its gathers are unrolled), and its tile budget (elements of the teacher tile,
# S_PAD x V_PAD x BLOCK_D; half in fp64), whose blocks keep at least _ROW_MIN_COLS columns.
_ROW_MAX_V_PAD = 256
_ROW_MAX_R_W = 8
_ROW_TILE = 4096
_ROW_MIN_COLS = 8


@functools.lru_cache(maxsize=1024)
def _row_launch_config(B: int, T: int, in_h: int, in_w: int, out_h: int, out_w: int, D: int, s_pad: int,
                       fp64: bool, sms: int, ept: int, block_w: int | None = None, block_d: int | None = None,
                       num_warps: int | None = None, d_blocks: int | None = None, max_block_d: int | None = None):
    """(BLOCK_W, V_PAD, BLOCK_D, num_warps, D_BLOCKS, w tiles, D chunks) of the row-form one-pass
    backward, or None where it declines the grids (a tile touching more than _ROW_MAX_V_PAD
    resampled columns, a token more than _ROW_MAX_R_W, or a teacher tile without room for
    _ROW_MIN_COLS columns): the two-pass backward runs then. V_PAD is at least the run of columns
    a tile touches, and large enough for tl.gather to compile (`resample._gather_v_pad`).

    Tiles of up to 64 tokens of a row; BLOCK_D keeps the teacher tile within _ROW_TILE elements (8 to
    64 columns, at most ``max_block_d``); the D axis is cut into chunks until there are at least 8
    programs per SM, each program computing its chunk's blocks in turn. ``block_w``, ``block_d``,
    ``num_warps``, ``d_blocks``: exact overrides (tuning)."""
    budget = _ROW_TILE // (2 if fp64 else 1)
    block_w = block_w or min(next_power_of_2(in_w), 64)
    v_pad = _rows_v_pad(in_w, out_w, block_w)
    wide = max(v_pad, block_w)
    if v_pad > _ROW_MAX_V_PAD or _contributor_bound(in_w, out_w) > _ROW_MAX_R_W:
        return None
    if block_d is None:
        fit = budget // (s_pad * wide)
        if fit < _ROW_MIN_COLS:
            return None
        block_d = max(_ROW_MIN_COLS, min(64, next_power_of_2(D), 1 << (fit.bit_length() - 1)))
        block_d = min(block_d, max_block_d or block_d)
    n_blocks = cdiv(D, block_d)
    w_tiles = cdiv(in_w, block_w)
    rows = max(1, B * T * in_h * w_tiles)
    if d_blocks is None:
        chunks = max(1, min(n_blocks, cdiv(8 * sms, rows)))
        d_blocks = max(1, cdiv(n_blocks, chunks))
    warps = num_warps or num_warps_for((s_pad + 4) * wide * block_d, ept)
    v_pad = _gather_v_pad(v_pad, block_d, warps)  # a thread for each gathered element (narrow grids)
    return block_w, v_pad, block_d, warps, d_blocks, w_tiles, max(1, cdiv(n_blocks, d_blocks))


def row_settings(B: int, T: int, grids: tuple[int, int, int, int], D: int, distance: int, cumulative: bool,
                 fp64: bool, device: torch.device, tune: dict | None = None, block_d: int | None = None):
    """`_row_launch_config` as the row-form one-pass backward launches it for features
    (B, T, out_h * out_w, D) and ``grids = (in_h, in_w, out_h, out_w)``, with ``tune`` (checked
    ``utils.ROW_TUNE_KEYS`` overrides; ``block_n`` is the tile of a row) and a caller's ``block_d``
    cap applied. Returns (config, extra launch options); config is None where the kernel declines
    the grids."""
    tune = tune or {}
    block_w, bd, num_warps, extra = apply_tune(None, None, None, tune, ROW_TUNE_KEYS)
    s_pad = next_power_of_2(num_slots(distance, T, cumulative))
    config = _row_launch_config(B, T, *grids, D, s_pad, fp64, _device_sms(device), elements_per_thread(),
                                block_w, bd, num_warps, tune.get("d_blocks"), block_d)
    return config, extra


def _launch_row_backward(projected, features, pnorm, fnorm, cos, g_total, g_self, d_projected, *,
                         distance: int, tau: float, cumulative: bool, normalize_neighbour_sum: bool,
                         resample_p: tuple[int, int, int, int], block_d: int | None = None,
                         traceable: bool = False, tune: dict | None = None, g_total_scale: float = 1.0) -> bool:
    """Writes every element of d_projected (contiguous, projected's (B, T, in_h * in_w, D)) with one
    launch of the row-form one-pass backward (`_neighbour_cosine_rows_bwd_kernel`): the similarity
    backward and the resample backward of a fused-resample forward together, with no buffer. False
    (nothing written) where `_row_launch_config` declines the grids, and on ROCm, where it is
    unchecked. ``block_d``: a caller's (crepa_loss's, for the similarity kernels) caps the block.
    ``tune``: exact overrides of ``utils.ROW_TUNE_KEYS``; without it, those `utils.launch_overrides`
    set."""
    if torch.version.hip is not None:
        return False
    B, T, N, D = features.shape
    if B * T * N * D == 0:  # nothing to write (d_projected is empty too)
        return True
    in_h, in_w, out_h, out_w = resample_p
    d, S, s_pad, scalars = _window_args(distance, T, cumulative, tau)
    tune = LAUNCH_OVERRIDES.get("row_bwd") if tune is None else tune
    config, extra = row_settings(B, T, resample_p, D, distance, cumulative, pnorm.dtype == torch.float64,
                                 projected.device, tune, block_d)
    if config is None:
        return False
    block_w, v_pad, bd, num_warps, d_blocks, w_tiles, chunks = config
    gt = g_total if g_total is not None else pnorm
    gs = g_self if g_self is not None else pnorm
    _kernel(_neighbour_cosine_rows_bwd_kernel, traceable)[(w_tiles * in_h * B * T, chunks)](
        projected, features, pnorm, fnorm, cos, gt, gs, d_projected,
        T, N, D, d, S, w_tiles, d_blocks,
        *scalars, *(_UNIT if g_total_scale == 1.0 else _split(g_total_scale)),
        *projected.stride(), *features.stride(),
        *_grad_strides(g_total), *_grad_strides(g_self),
        in_h, in_w, out_h, out_w,
        S_PAD=s_pad, R_W=_contributor_bound(in_w, out_w), BLOCK_W=block_w, V_PAD=v_pad, BLOCK_D=bd,
        CUMULATIVE=bool(cumulative), NORMALIZE=bool(normalize_neighbour_sum),
        HAS_GT=g_total is not None, HAS_GS=g_self is not None,
        TAPS_FP64=projected.dtype == torch.float64, num_warps=num_warps, **extra,
    )
    return True


# ----------------------------------------------------------------------------------------------------
# Two front ends over the same launchers: custom ops that torch.compile can capture, and an
# autograd.Function that eager calls use (it skips the custom-op dispatch, whose host cost is larger
# than the kernels' at small shapes). Both run the same kernels with the same launch settings.
# ----------------------------------------------------------------------------------------------------


_NO_RESAMPLE = (0, 0, 0, 0)


def _resample_arg(grids):
    # (in_h, in_w, out_h, out_w) with zeros for "no resample" (custom-op schemas take plain ints).
    return None if grids[0] == 0 else tuple(grids)


def _forward_impl(projected, features, distance, tau, cumulative, normalize_neighbour_sum, block_d, grids,
                  traceable):
    B, T, N, _ = features.shape
    acc = accumulation_dtype(torch.promote_types(projected.dtype, features.dtype))
    S = num_slots(distance, T, cumulative)
    kw = dict(dtype=acc, device=projected.device)
    total = torch.empty((B, T, N), **kw)
    self_tok = torch.empty((B, T, N), **kw)
    pnorm = torch.empty((B, T, N), **kw)
    fnorm = torch.empty((B, T, N), **kw)
    cos = torch.empty((B, T, S, N), **kw)
    with device_guard(projected):
        _launch_forward(projected, features, total, self_tok, pnorm, fnorm, cos, distance=distance, tau=tau,
                        cumulative=cumulative, normalize_neighbour_sum=normalize_neighbour_sum,
                        block_d=block_d or None, traceable=traceable, resample_p=_resample_arg(grids))
    return total, self_tok, pnorm, fnorm, cos


def frame_windows(frames: int, frame_bytes: int, limit_bytes: int) -> list[tuple[int, int]]:
    """(first frame, frame count) of the fewest windows of at most ``limit_bytes`` (at least one frame
    each) covering ``frames``, their sizes differing by at most one: the buffer a window needs is as
    small as that number of windows allows (wan480 fp32, 21 frames of ~8.02 MiB under 128 MiB:
    11 + 10, not 15 + 6). No frames: one empty window."""
    return list(_frame_windows(frames, frame_bytes, limit_bytes))


@functools.lru_cache(maxsize=256)  # on every backward's path
def _frame_windows(frames: int, frame_bytes: int, limit_bytes: int) -> tuple[tuple[int, int], ...]:
    per = max(1, limit_bytes // max(1, frame_bytes))
    count = max(1, cdiv(frames, per))
    size, extra = divmod(frames, count)
    out, t0 = [], 0
    for i in range(count):
        tc = size + (i < extra)
        out.append((t0, tc))
        t0 += tc
    return tuple(out)


def _backward_impl(projected, features, pnorm, fnorm, cos, g_total, g_self, distance, tau, cumulative,
                   normalize_neighbour_sum, need_projected, need_features, block_d, grids, traceable,
                   g_total_scale=1.0):
    """(d projected, d features). With a fused resample (``grids``) d projected comes back on the
    input grid: each frame window's resampled-grid gradient goes through the resample backward, or
    with ``CREPA_KERNELS_MERGED_BWD=1`` (banded) or ``CREPA_KERNELS_ROW_BWD=1`` (row form) one kernel
    computes it there directly (where that kernel declines a grid, the windows run as without the
    switch). An unneeded gradient
    comes back as an empty tensor (custom ops cannot return None); an unneeded d features comes back
    as None on the eager path (``traceable`` False). The kernels read g_total (which may be 0-dim) times
    ``g_total_scale``."""
    with device_guard(projected):
        return _backward_launches(projected, features, pnorm, fnorm, cos, g_total, g_self, distance, tau,
                                  cumulative, normalize_neighbour_sum, need_projected, need_features, block_d,
                                  grids, traceable, g_total_scale)


def _backward_launches(projected, features, pnorm, fnorm, cos, g_total, g_self, distance, tau, cumulative,
                       normalize_neighbour_sum, need_projected, need_features, block_d, grids, traceable,
                       g_total_scale=1.0):
    kw = dict(distance=distance, tau=tau, cumulative=cumulative, normalize_neighbour_sum=normalize_neighbour_sum,
              block_d=block_d or None, traceable=traceable, g_total_scale=g_total_scale)
    resample_p = _resample_arg(grids)
    if resample_p is not None and need_features:
        raise ValueError("the fused resample computes d projected only; resample first when features need grad")
    # An unneeded gradient is an empty tensor (a custom op cannot return None), or None on the eager path.
    df = (torch.empty(features.shape if need_features else (0,), dtype=features.dtype, device=features.device)
          if need_features or traceable else None)
    if resample_p is None or not need_projected:
        dp = torch.empty(projected.shape if need_projected else (0,), dtype=projected.dtype,
                         device=projected.device)
        _launch_backward(projected, features, pnorm, fnorm, cos, g_total, g_self,
                         dp if need_projected else None, df if need_features else None, **kw)
        return dp, df
    rows, merged = row_backward_enabled(), merged_backward_enabled()
    if rows and merged:
        raise ValueError("CREPA_KERNELS_ROW_BWD=1 and CREPA_KERNELS_MERGED_BWD=1 each select a one-pass backward; "
                         "set at most one of them")
    if rows or merged:
        dp = torch.empty(projected.shape, dtype=projected.dtype, device=projected.device)
        if (_launch_row_backward if rows else _launch_merged_backward)(
                projected, features, pnorm, fnorm, cos, g_total, g_self, dp, resample_p=resample_p, **kw):
            return dp, df
        del dp
    # The resampled-grid gradient is produced and scattered to the input grid in frame windows of at
    # most bwd_window_bytes() (128 MiB): at wan480 fp32 the whole of it would be 168 MiB, alive next to
    # the 192 MiB input-grid gradient at the backward's memory peak.
    B, T, N, D = features.shape
    if torch.compiler.is_compiling() or not (is_plain_tensor(projected) and is_plain_tensor(pnorm)):
        windows = [(0, T)]  # traced into a graph (fake tensors): one window, the compiler plans the memory
    else:
        windows = _frame_windows(T, B * N * D * projected.element_size(), bwd_window_bytes())
    if len(windows) == 1:
        dp_res = torch.empty((B, T, N, D), dtype=projected.dtype, device=projected.device)
        _launch_backward(projected, features, pnorm, fnorm, cos, g_total, g_self, dp_res, None,
                         resample_p=resample_p, **kw)
        return _launch_resample_bwd(dp_res, *resample_p, traceable=traceable), df
    dp = torch.empty(projected.shape, dtype=projected.dtype, device=projected.device)
    for t0, tc in windows:
        dp_res = torch.empty((B, tc, N, D), dtype=projected.dtype, device=projected.device)
        _launch_backward(projected, features, pnorm, fnorm, cos, g_total, g_self, dp_res, None,
                         resample_p=resample_p, frames=(t0, tc), **kw)
        _launch_resample_bwd(dp_res, *resample_p, out=dp[:, t0:t0 + tc], traceable=traceable)
        del dp_res  # the next window reuses its memory
    return dp, df


@triton_op("crepa_kernels::neighbour_cosine_fwd", mutates_args=())
def _neighbour_cosine_fwd_op(
    projected: torch.Tensor, features: torch.Tensor, distance: int, tau: float, cumulative: bool,
    normalize_neighbour_sum: bool, block_d: int, in_h: int, in_w: int, out_h: int, out_w: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(projected, features, distance, tau, cumulative, normalize_neighbour_sum, block_d,
                         (in_h, in_w, out_h, out_w), traceable=True)


@triton_op("crepa_kernels::neighbour_cosine_bwd", mutates_args=())
def _neighbour_cosine_bwd_op(
    projected: torch.Tensor, features: torch.Tensor, pnorm: torch.Tensor, fnorm: torch.Tensor,
    cos: torch.Tensor, g_total: torch.Tensor | None, g_self: torch.Tensor | None, distance: int,
    tau: float, cumulative: bool, normalize_neighbour_sum: bool, need_projected: bool,
    need_features: bool, block_d: int, in_h: int, in_w: int, out_h: int, out_w: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(projected, features, pnorm, fnorm, cos, g_total, g_self, distance, tau, cumulative,
                          normalize_neighbour_sum, need_projected, need_features, block_d,
                          (in_h, in_w, out_h, out_w), traceable=True)


_N_ARGS = 11  # inputs of the forward op


def _save(ctx, projected, features, pnorm, fnorm, cos) -> None:
    """save_for_backward, except for inputs that are inference tensors (a teacher run under
    torch.inference_mode), which autograd refuses to save: those are kept on ``ctx`` as they are, so
    that the step runs as it does on the torch backend (whose graph holds normalised copies of them).
    Inference tensors have no version counter: an in-place change to one (possible only inside
    inference mode) between this forward and its backward goes undetected. `_saved` reads both back."""
    inputs = (projected, features)
    ctx.inference_inputs = tuple(t if t.is_inference() else None for t in inputs)
    ctx.save_for_backward(*(None if t.is_inference() else t for t in inputs), pnorm, fnorm, cos)


def _saved(ctx) -> tuple:
    """(projected, features, pnorm, fnorm, cos) as `_save` kept them."""
    saved = ctx.saved_tensors
    return (*(kept if kept is not None else t for kept, t in zip(ctx.inference_inputs, saved[:2])), *saved[2:])


def _setup_context(ctx, inputs, output):
    projected, features = inputs[:2]
    _, _, pnorm, fnorm, cos = output
    ctx.mark_non_differentiable(pnorm, fnorm, cos)
    _save(ctx, projected, features, pnorm, fnorm, cos)
    ctx.args = tuple(inputs[2:7])
    ctx.grids = tuple(inputs[7:])


def _input_grads(ctx, g_total, g_self, need_p, need_f, through_op, g_total_scale=1.0):
    """(d projected, d features) from the saved tensors, None where not needed; shared by both front
    ends. ``through_op`` runs the backward custom op (autograd can see it) instead of the launchers,
    which alone take a ``g_total_scale`` (the kernels read g_total times it)."""
    distance, tau, cumulative, normalize, block_d = ctx.args
    args = (*_saved(ctx), g_total, g_self, distance, tau, cumulative, normalize, need_p, need_f, block_d)
    if through_op:
        assert g_total_scale == 1.0, "the backward custom op takes no g_total_scale"
        dp, df = torch.ops.crepa_kernels.neighbour_cosine_bwd(*args, *ctx.grids)
    else:
        dp, df = _backward_impl(*args, ctx.grids, traceable=False, g_total_scale=g_total_scale)
    return dp if need_p else None, df if need_f else None


def _backward(ctx, g_total, g_self, _g_pnorm, _g_fnorm, _g_cos):
    need_p, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_p or need_f):
        return (None,) * _N_ARGS
    return _input_grads(ctx, g_total, g_self, need_p, need_f, through_op=True) + (None,) * (_N_ARGS - 2)


register_autograd("crepa_kernels::neighbour_cosine_fwd", _backward, setup_context=_setup_context)


_FP32 = torch.finfo(torch.float32)


def _fp32_kernel_factor(factor, g_loss) -> bool:
    """Whether the kernels can apply ``factor`` to an fp32 ``g_loss`` themselves with torch's rounding:
    the launch passes it as an fp32 head and tail, which is torch's fp32 scalar for a factor in fp32's
    normal range. fp64 (an fp32 tail would cut the factor to about 48 bits) and factors outside that
    range (a tail of inf - inf, or a subnormal head) take torch's multiply."""
    return (factor is not None and g_loss is not None and g_loss.dtype == torch.float32
            and _FP32.tiny <= abs(factor) <= _FP32.max)


class _NeighbourCosine(torch.autograd.Function):
    """The eager front end: the same kernels as the custom ops, launched directly.

    With ``token_mean`` the outputs are the (B, T) means over tokens; with ``loss_scale`` as well, a
    third output is ``loss_scale * mean(total)`` over (B, T), so that crepa_loss's reduction is one
    autograd node whose backward hands the kernel a stride-0 gradient (fewer small ops per step)."""

    @staticmethod
    def forward(ctx, projected, features, distance, tau, cumulative, normalize, block_d, grids, token_mean,
                loss_scale=None):
        total, self_tok, pnorm, fnorm, cos = _forward_impl(projected, features, distance, tau, cumulative,
                                                           normalize, block_d, grids, traceable=False)
        _save(ctx, projected, features, pnorm, fnorm, cos)
        ctx.args = (distance, tau, cumulative, normalize, block_d)
        ctx.grids = grids
        ctx.token_mean = token_mean
        ctx.token_shape = total.shape  # (B, T, N)
        ctx.loss_scale = loss_scale
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to read
        if not token_mean:
            return total, self_tok, None
        total, self_tok = total.mean(dim=-1), self_tok.mean(dim=-1)
        loss = None if loss_scale is None else total.mean() * loss_scale
        return total, self_tok, loss

    @staticmethod
    def backward(ctx, g_total, g_self, g_loss):
        need_p, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_p or need_f) or (g_total is None and g_self is None and g_loss is None):
            return (None,) * 10
        # create_graph=True (grad mode on): through the custom op, so that differentiating this gradient
        # again fails with autograd's error (the backward kernel has no derivative) instead of silently
        # dropping the second-order term.
        through_op = torch.is_grad_enabled()
        B, T, N = ctx.token_shape
        factor = None if ctx.loss_scale is None else ctx.loss_scale / (B * T * N)
        if g_total is None and g_self is None and not through_op and _fp32_kernel_factor(factor, g_loss):
            # Only the loss's gradient (a training step's case): the kernels read the 0-dim g_loss for
            # every token and scale it themselves, rounding as g_loss * factor does in torch.
            return _input_grads(ctx, g_loss, None, need_p, need_f, False, g_total_scale=factor) + (None,) * 8
        if ctx.token_mean:
            # The means' gradients, g / N for every token (and g_loss * scale / (B T N) for the loss),
            # as stride-0 views the kernel reads in place: the values autograd's mean and mul backward
            # would materialise.
            g_total, g_self = (None if g is None else g / N for g in (g_total, g_self))
            if g_loss is not None:
                g_loss = g_loss * factor  # 0-dim: the same for every token
                g_total = g_loss if g_total is None else g_total + g_loss
            g_total, g_self = (None if g is None else g.unsqueeze(-1).expand(B, T, N) for g in (g_total, g_self))
        return _input_grads(ctx, g_total, g_self, need_p, need_f, through_op) + (None,) * 8


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def _validate(projected, features, distance, tau, cumulative, normalize_neighbour_sum, block_d,
              token_mean=False, projected_resample=None) -> None:
    for name, x in (("projected", projected), ("features", features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, T, N, D), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if projected_resample is None:
        if projected.shape != features.shape:
            raise ValueError(f"projected and features must have the same shape, got {tuple(projected.shape)} "
                             f"and {tuple(features.shape)}")
    else:
        grids_ok = (isinstance(projected_resample, (tuple, list)) and len(projected_resample) == 2
                    and all(isinstance(g, (tuple, list)) and len(g) == 2 for g in projected_resample)
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                            for g in projected_resample for v in g))
        if not grids_ok:
            raise ValueError(f"projected_resample must be ((in_h, in_w), (out_h, out_w)) with positive ints, "
                             f"got {projected_resample!r}")
        (ih, iw), (oh, ow) = projected_resample
        want_p = (*features.shape[:2], ih * iw, features.shape[3])
        if tuple(projected.shape) != want_p or features.shape[2] != oh * ow:
            raise ValueError(f"with projected_resample={projected_resample!r} projected must be {want_p} and "
                             f"features (B, T, {oh * ow}, D); got {tuple(projected.shape)} and "
                             f"{tuple(features.shape)}")

    if projected.device != features.device:
        raise ValueError(f"projected and features must be on the same device, got {projected.device} "
                         f"and {features.device}")
    # Not traced by torch.compile (environment lookups); a compiled call on a bad device fails at launch.
    if not torch.compiler.is_compiling() and not triton_supports(projected):
        raise ValueError(f"projected is on {projected.device}, which the Triton kernels cannot run on "
                         "(expected a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1)")
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
        raise ValueError(f"distance must be a non-negative int, got {distance!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    for name, flag in (("cumulative", cumulative), ("normalize_neighbour_sum", normalize_neighbour_sum)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not isinstance(token_mean, bool):
        raise TypeError(f"token_mean must be a bool, got {token_mean!r}")
    if block_d is not None and (isinstance(block_d, bool) or not isinstance(block_d, int) or block_d < 1
                                or block_d & (block_d - 1) or block_d > MAX_BLOCK_D):
        raise ValueError(f"block_d must be a power-of-two int from 1 to {MAX_BLOCK_D}, or None; got {block_d!r}")


def neighbour_cosine(projected: torch.Tensor, features: torch.Tensor, *, distance: int, tau: float,
                     cumulative: bool, normalize_neighbour_sum: bool, block_d: int | None = None,
                     token_mean: bool = False, projected_resample=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token distance-decayed neighbour cosine and self cosine of L2-normalised inputs.

    projected, features: (B, T, N, D), raw, same shape and device; fp16/bf16/fp32/fp64; any strides.
    Returns (total_tok, self_tok), each (B, T, N), fp32 (fp64 for fp64 inputs):
      x^ = x / max(||x||, 1e-12); self_tok = <p^[t], f^[t]>;
      d = min(distance, T - 1), K = {1..d} if cumulative else {d} (empty when d == 0);
      total_tok[t] = (self_tok[t] + sum_{k in K, u = t +- k in [0, T)} e^(-k/tau) <p^[t], f^[u]>) / den[t],
      den[t] = 1 + the weights used at frame t when normalize_neighbour_sum, else 1.
    Differentiable w.r.t. projected, and w.r.t. features when it requires grad.
    `block_d` overrides the feature-dim block (a power of two up to 256; tests use it to force several
    blocks).
    `token_mean=True` returns the means over tokens instead, each (B, T): the values and gradients of
    ``total_tok.mean(-1)``, ``self_tok.mean(-1)``, with fewer autograd nodes on the eager path.
    `projected_resample=((in_h, in_w), (out_h, out_w))`: projected is (B, T, in_h * in_w, D) on that
    grid and is first resampled bilinearly to features' (out_h, out_w) grid: the result and gradients
    of ``resample_tokens(projected, in_grid, out_grid)`` passed in, but the kernels read the resampled
    tokens through their taps, so the resampled copy is never stored (less memory held between
    forward and backward, one pass over it fewer). When features require grad the resampled copy is
    made as before (the fused kernels compute d projected only).
    """
    _validate(projected, features, distance, tau, cumulative, normalize_neighbour_sum, block_d, token_mean,
              projected_resample)
    return _neighbour_cosine(projected, features, int(distance), float(tau), cumulative, normalize_neighbour_sum,
                             block_d, token_mean, projected_resample)


def _neighbour_cosine(projected, features, distance, tau, cumulative, normalize_neighbour_sum, block_d,
                      token_mean, projected_resample, loss_scale=None):
    """`neighbour_cosine` without the argument checks, for callers that validated them already.

    With ``token_mean`` and a float ``loss_scale`` it returns (total, self, loss), ``loss`` =
    ``loss_scale * total.mean()`` (None when the custom ops run: the caller reduces)."""
    grids = _NO_RESAMPLE
    check_feature_dim("features", features.shape[3])
    if projected_resample is not None:
        (ih, iw), (oh, ow) = projected_resample
        if (ih, iw) == (oh, ow):
            pass  # nothing to resample
        elif features.requires_grad and torch.is_grad_enabled():
            projected = resample_tokens(projected, (ih, iw), (oh, ow))  # checks the sides itself
        else:
            check_grid_sides((ih, iw), (oh, ow))
            grids = (ih, iw, oh, ow)
    args = (projected, features, distance, tau, cumulative, normalize_neighbour_sum, block_d or 0)
    with_loss = token_mean and loss_scale is not None
    if direct_launch_ok(projected, features):
        out = _NeighbourCosine.apply(*args, grids, token_mean, loss_scale if with_loss else None)
        return out if with_loss else out[:2]
    total, self_tok, _, _, _ = torch.ops.crepa_kernels.neighbour_cosine_fwd(*args, *grids)
    if token_mean:
        total, self_tok = total.mean(dim=-1), self_tok.mean(dim=-1)
    return (total, self_tok, None) if with_loss else (total, self_tok)
