"""Token resampling for CREPA alignment: bilinear / linear grid resampling and the temporal frame pick.

`resample_tokens` resamples token grids `(B, T, h*w, D)` to `(B, T, oh*ow, D)` with the exact
`F.interpolate(mode="bilinear", align_corners=False)` sampling rule (SPEC section 2), directly on the
token-major layout: no permute copies. Forward: each output token reads its <= 4 taps. Backward:
the gather formulation, each input token sums the output tokens whose taps touch it, with the same
weights the forward used, so it is deterministic and needs no atomics. Its row form (a launch
setting, `bwd_plan`) sums the touching output rows once per input row, then gathers by column.

`temporal_indices` / `pick_frames` (the temporal subsampling of SPEC section 1, plain torch) live in
`crepa_kernels.reference` and are re-exported here.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..reference import pick_frames, temporal_indices  # noqa: F401 (re-exported)
from .launch import launcher
from .utils import (FLOAT_DTYPES, LAUNCH_OVERRIDES, RESAMPLE_BWD_TUNE_KEYS, apply_tune, cdiv, check_feature_dim,
                    device_guard, direct_launch_ok, elements_per_thread, next_power_of_2, num_warps_for,
                    triton_available, triton_supports)

__all__ = ["resample_tokens", "temporal_indices", "pick_frames"]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _axis_scale(in_size, out_size, IS_FP64: tl.constexpr):
        # torch computes the scale as (acc_t)in / out. Dividing in fp64 and rounding to fp32 gives the
        # correctly rounded fp32 quotient (double rounding is harmless for division), whereas
        # Triton's fp32 `/` is approximate on NVIDIA GPUs.
        # tl.cast, not .to: torch.compile's write analysis passes the sizes as Python ints
        scale = tl.cast(in_size, tl.float64) / tl.cast(out_size, tl.float64)
        if not IS_FP64:
            scale = scale.to(tl.float32)
        return scale

    @triton.jit
    def _axis_taps(o, in_size, scale):
        # The align_corners=False rule, written in the same order as torch's kernels so the taps
        # agree: src = max(scale * (o + 0.5) - 0.5, 0), taps floor(src) and min(floor + 1, n - 1).
        src = scale * (o.to(scale.dtype) + 0.5) - 0.5
        src = tl.maximum(src, 0.0)
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # truncation is floor here: src >= 0
        i1 = tl.minimum(i0 + 1, in_size - 1)
        l1 = src - i0.to(scale.dtype)
        l0 = 1.0 - l1
        return i0, i1, l0, l1

    @triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
    def _resample_fwd_kernel(
        x_ptr,
        out_ptr,
        T,
        D,
        in_h,
        in_w,
        out_h,
        out_w,
        x_stride_b,
        x_stride_t,
        x_stride_n,
        x_stride_d,
        n_tok_blocks,
        IS_FP64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # axis 0 folds (frame, output-token block) so B*T is not bound by the 65535 limit of axes 1-2.
        pid0 = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        bt = pid0 // n_tok_blocks
        tok_block = pid0 % n_tok_blocks
        b = bt // T
        t = bt % T
        m_out = out_h * out_w

        offs_m = tok_block * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 output token ids
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_m = offs_m < m_out
        mask_d = offs_d < D
        mask = mask_m[:, None] & mask_d[None, :]

        oh = (offs_m // out_w).to(tl.int32)
        ow = (offs_m % out_w).to(tl.int32)
        h0, h1, lh0, lh1 = _axis_taps(oh, in_h, _axis_scale(in_h, out_h, IS_FP64))
        w0, w1, lw0, lw1 = _axis_taps(ow, in_w, _axis_scale(in_w, out_w, IS_FP64))

        base = x_ptr + b * x_stride_b + t * x_stride_t
        d_off = (offs_d * x_stride_d)[None, :]
        row0 = h0.to(tl.int64) * in_w
        row1 = h1.to(tl.int64) * in_w
        p00 = base + ((row0 + w0) * x_stride_n)[:, None] + d_off
        p01 = base + ((row0 + w1) * x_stride_n)[:, None] + d_off
        p10 = base + ((row1 + w0) * x_stride_n)[:, None] + d_off
        p11 = base + ((row1 + w1) * x_stride_n)[:, None] + d_off
        acc_t = lh0.dtype
        v00 = tl.load(p00, mask=mask, other=0.0).to(acc_t)
        v01 = tl.load(p01, mask=mask, other=0.0).to(acc_t)
        v10 = tl.load(p10, mask=mask, other=0.0).to(acc_t)
        v11 = tl.load(p11, mask=mask, other=0.0).to(acc_t)
        # Width first, then height: the order torch's bilinear kernel uses.
        top = lw0[:, None] * v00 + lw1[:, None] * v01
        bottom = lw0[:, None] * v10 + lw1[:, None] * v11
        res = lh0[:, None] * top + lh1[:, None] * bottom

        out_offs = (bt * m_out + offs_m)[:, None] * D + offs_d[None, :]
        tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tap_weight(i, i0, i1, l0, l1):
        # Weight of input index `i` in an output with taps (i0, i1), weights (l0, l1), along one axis;
        # both taps may be the same index at the border, then their weights add, as in autograd.
        return tl.where(i0 == i, l0, 0.0) + tl.where(i1 == i, l1, 0.0)

    @triton.jit
    def _axis_weight(o, i, in_size, out_size, scale):
        # Weight of input index `i` in output `o` along one axis (0 when o does not touch i).
        i0, i1, l0, l1 = _axis_taps(o, in_size, scale)
        valid = (o >= 0) & (o < out_size)
        return tl.where(valid, _tap_weight(i, i0, i1, l0, l1), 0.0)

    @triton.jit
    def _axis_first_past(k, in_size, scale, inv_scale, STRICT: tl.constexpr):
        # Smallest output o with src(o) > k (STRICT; 0 <= k <= n - 2) or src(o) >= k (1 <= k <= n - 1),
        # src being the clamped coordinate of `_axis_taps`. For such k the taps decide it exactly:
        # src >= k <=> i0 >= k; src > k <=> i0 > k or (i0 == k and l1 != 0). src is non-decreasing in
        # o (every step of `_axis_taps` is monotone, rounding included; o < 0 gives src = 0, o >= m
        # gives i0 = n - 1), so the answer is the window's start plus the count of window outputs
        # still short of k, provided the answer lies in the window.
        # Window: let E bound the rounding error of src and of the guess y, in output units. The
        # answer is in [x - E, x + E + 1] for the exact threshold x = (k + 0.5) * m / n - 0.5, and
        # c = floor(y) in (x - E - 1, x + E], so answer - c is in (-2E, 2E + 2): in [0, 2] once
        # E < 1/2. src takes three fp32 roundings (scale, product, difference; fp64 taps take
        # smaller ones) of values below n + 2s near x, y three of values below m: each is off by
        # < 2^-22 * (m + 2) outputs. Sides are at most 2^20 (checked at the public boundary), so
        # E < 0.26; the four outputs c - 1 .. c + 2 cover answers in [c - 1, c + 3], which would
        # hold up to E < 1.
        y = (k.to(tl.float32) + 0.5) * inv_scale - 0.5
        start = tl.floor(y).to(tl.int32) - 1
        first = start
        for j in tl.static_range(4):
            i0, _i1, _l0, l1 = _axis_taps(start + j, in_size, scale)
            short = i0 < k
            if STRICT:
                short = short | ((i0 == k) & (l1 == 0.0))
            first += short.to(tl.int32)
        return first

    @triton.jit
    def _axis_contributors(i, in_size, out_size, scale):
        # Outputs with a nonzero weight on input i along one axis: the interval [lo, lo + count).
        # As i1 = min(i0 + 1, n - 1), output o touches i iff i0(o) is i - 1 or i (at i = n - 1 the
        # clamp also sends i1 there when i0 = n - 1: the same set), and as i0 is non-decreasing in o
        # that set is an interval. Its head may weigh l1 = 0 on i (src == i - 1 exactly): for i = 1
        # every output whose src was clamped up to 0, which can outnumber the loop bound when
        # upsampling (3 -> 30: five of them). So the interval is src in (i - 1, i + 1), where every
        # weight is nonzero: lo = first o with src > i - 1 (0 for i = 0), hi = first o with
        # src >= i + 1, i.e. i0 >= i + 1 (m when i + 1 >= n).
        inv_scale = _axis_scale(out_size, in_size, False)
        lo = _axis_first_past(i - 1, in_size, scale, inv_scale, True)
        hi = _axis_first_past(i + 1, in_size, scale, inv_scale, False)
        lo = tl.where(i <= 0, 0, tl.minimum(tl.maximum(lo, 0), out_size))
        hi = tl.where(i + 1 >= in_size, out_size, tl.minimum(tl.maximum(hi, 0), out_size))
        return lo, tl.maximum(hi - lo, 0)

    @triton.jit
    def _input_token_contributors(offs, in_h, in_w, out_h, out_w, IS_FP64: tl.constexpr):
        # For input tokens ``offs`` (row-major on the in grid): their (row, column), the axis scales,
        # and per axis the outputs with a nonzero weight on them, [lo, lo + count).
        ih = (offs // in_w).to(tl.int32)
        iw = (offs % in_w).to(tl.int32)
        scale_h = _axis_scale(in_h, out_h, IS_FP64)
        scale_w = _axis_scale(in_w, out_w, IS_FP64)
        oh_lo, oh_count = _axis_contributors(ih, in_h, out_h, scale_h)
        ow_lo, ow_count = _axis_contributors(iw, in_w, out_w, scale_w)
        return ih, iw, scale_h, scale_w, oh_lo, oh_count, ow_lo, ow_count

    @triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
    def _resample_bwd_kernel(
        grad_out_ptr,
        grad_in_ptr,
        T,
        D,
        in_h,
        in_w,
        out_h,
        out_w,
        g_stride_b,
        g_stride_t,
        g_stride_n,
        g_stride_d,
        o_stride_b,
        o_stride_t,
        n_tok_blocks,
        D_BLOCKS,
        IS_FP64: tl.constexpr,
        R_H: tl.constexpr,
        R_W: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Program (token block, D chunk): the chunk is D_BLOCKS feature blocks of BLOCK_D, one after
        # the other, so the token block's contributor search runs once for all of them.
        pid0 = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        bt = pid0 // n_tok_blocks
        tok_block = pid0 % n_tok_blocks
        b = bt // T
        t = bt % T
        n_in = in_h * in_w

        offs_n = tok_block * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 input token ids
        mask_n = offs_n < n_in

        ih, iw, scale_h, scale_w, oh_lo, oh_count, ow_lo, ow_count = _input_token_contributors(
            offs_n, in_h, in_w, out_h, out_w, IS_FP64)

        base = grad_out_ptr + b * g_stride_b + t * g_stride_t
        out_base = grad_in_ptr + b * o_stride_b + t * o_stride_t + offs_n[:, None] * D
        blk_lo = pid_d * D_BLOCKS
        blk_hi = tl.minimum(blk_lo + D_BLOCKS, tl.cdiv(D, BLOCK_D))
        for blk in range(blk_lo, blk_hi):
            offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            d_off = (offs_d * g_stride_d)[None, :]
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=scale_h.dtype)
            # Fixed order (rows, then columns, ascending) makes the sum deterministic; R_H / R_W bound
            # every token's contributor count, the masks trim each token to its own.
            for kh in range(R_H):
                oh = oh_lo + kh
                wh = _axis_weight(oh, ih, in_h, out_h, scale_h)
                row_ok = mask_n & (kh < oh_count)
                for kw in range(R_W):
                    ow = ow_lo + kw
                    ww = _axis_weight(ow, iw, in_w, out_w, scale_w)
                    touch = row_ok & (kw < ow_count)
                    tok = oh.to(tl.int64) * out_w + ow
                    g = tl.load(
                        base + (tok * g_stride_n)[:, None] + d_off,
                        mask=touch[:, None] & mask_d[None, :],
                        other=0.0,
                    ).to(acc.dtype)
                    acc += (wh * ww)[:, None] * g

            # grad_in: tokens and features dense within a frame; frames at (o_stride_b, o_stride_t).
            tl.store(
                out_base + offs_d[None, :],
                acc.to(grad_in_ptr.dtype.element_ty),
                mask=mask_n[:, None] & mask_d[None, :],
            )

    @triton.jit
    def _row_tile(ih, w_tile, in_h, in_w, out_h, out_w, BLOCK_W: tl.constexpr, V_PAD: tl.constexpr,
                  IS_FP64: tl.constexpr):
        # The row form's program geometry: for input row ih, the output rows touching it ([oh_lo,
        # oh_lo + oh_count), scalars), and for the tile of BLOCK_W tokens of that row from w_tile *
        # BLOCK_W: its tokens iw (w_mask: inside the row), their touching output columns ([ow_lo,
        # ow_lo + ow_count)), and the run of V_PAD output columns v_cols from the tile's first
        # contributor ow_first (v_mask: inside the row), which holds every column touching the tile
        # (`_contributor_bound` over BLOCK_W consecutive inputs, which V_PAD covers).
        scale_h = _axis_scale(in_h, out_h, IS_FP64)
        scale_w = _axis_scale(in_w, out_w, IS_FP64)
        oh_lo, oh_count = _axis_contributors(ih, in_h, out_h, scale_h)
        w0 = (w_tile * BLOCK_W).to(tl.int32)
        iw = w0 + tl.arange(0, BLOCK_W)
        ow_lo, ow_count = _axis_contributors(iw, in_w, out_w, scale_w)
        ow_first, _count = _axis_contributors(w0, in_w, out_w, scale_w)
        v_cols = ow_first + tl.arange(0, V_PAD)
        return scale_h, scale_w, oh_lo, oh_count, iw, iw < in_w, ow_lo, ow_count, ow_first, v_cols, v_cols < out_w

    @triton.jit
    def _gather_columns(v, iw, w_mask, ow_lo, ow_count, ow_first, in_w, out_w, scale_w,
                        R_W: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
        # The row form's width step: each token iw sums its touching columns of v (V_PAD output columns
        # from ow_first, by BLOCK_D features) with their width weights, ascending, gathered in registers.
        acc = tl.zeros([BLOCK_W, BLOCK_D], dtype=v.dtype)
        for kw in tl.static_range(R_W):
            ow = ow_lo + kw
            touch = w_mask & (kw < ow_count)
            ww = tl.where(touch, _axis_weight(ow, iw, in_w, out_w, scale_w), 0.0).to(v.dtype)
            lane = tl.where(touch, ow - ow_first, 0)  # in [0, V_PAD) where touching
            gv = tl.gather(v, tl.broadcast_to(lane[:, None], (BLOCK_W, BLOCK_D)), 0)
            acc += ww[:, None] * tl.where(touch[:, None], gv, 0.0)  # untouched columns add nothing, NaN too
        return acc

    @triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
    def _resample_bwd_rows_kernel(
        grad_out_ptr,
        grad_in_ptr,
        T,
        D,
        in_h,
        in_w,
        out_h,
        out_w,
        g_stride_b,
        g_stride_t,
        g_stride_n,
        g_stride_d,
        o_stride_b,
        o_stride_t,
        n_w_tiles,
        D_BLOCKS,
        IS_FP64: tl.constexpr,
        R_W: tl.constexpr,
        BLOCK_W: tl.constexpr,
        V_PAD: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # The row form of the same backward (separable: heights, then widths). Program (w tile, input
        # row ih, frame, D chunk) owns BLOCK_W consecutive tokens of row ih. The output rows touching
        # ih are the same for all of them (scalars), and the output columns touching the tile are one
        # run of at most V_PAD from the tile's first contributor (`_contributor_bound` over BLOCK_W
        # inputs). Per feature block: v[ow] = sum over the rows oh of W_h[oh, ih] g[oh, ow], each
        # output row read once, unmasked by token; then each token gathers its <= R_W columns of v,
        # d in[ih, iw] = sum over ow of W_w[ow, iw] v[ow]. Deterministic, no atomics; the sums run in
        # another order than `_resample_bwd_kernel`'s (rounding apart, the same result).
        pid0 = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        w_tile = pid0 % n_w_tiles  # tiles of a row fastest, then rows: programs running together
        rest = pid0 // n_w_tiles  # share their output rows (L2 reuse)
        ih = (rest % in_h).to(tl.int32)
        bt = rest // in_h
        b = bt // T
        t = bt % T

        scale_h, scale_w, oh_lo, oh_count, iw, w_mask, ow_lo, ow_count, ow_first, v_cols, v_mask = _row_tile(
            ih, w_tile, in_h, in_w, out_h, out_w, BLOCK_W, V_PAD, IS_FP64)

        base = grad_out_ptr + b * g_stride_b + t * g_stride_t
        v_rows = v_cols.to(tl.int64) * g_stride_n
        out_base = (grad_in_ptr + b * o_stride_b + t * o_stride_t
                    + (ih.to(tl.int64) * in_w + iw.to(tl.int64))[:, None] * D)
        blk_lo = pid_d * D_BLOCKS
        blk_hi = tl.minimum(blk_lo + D_BLOCKS, tl.cdiv(D, BLOCK_D))
        for blk in range(blk_lo, blk_hi):
            offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            d_off = (offs_d * g_stride_d)[None, :]
            v = tl.zeros([V_PAD, BLOCK_D], dtype=scale_h.dtype)
            for kh in range(0, oh_count):  # the rows touching ih, ascending
                oh = oh_lo + kh
                wh = _axis_weight(oh, ih, in_h, out_h, scale_h)
                g = tl.load(base + oh.to(tl.int64) * out_w * g_stride_n + v_rows[:, None] + d_off,
                            mask=v_mask[:, None] & mask_d[None, :], other=0.0).to(v.dtype)
                v += wh * g
            acc = _gather_columns(v, iw, w_mask, ow_lo, ow_count, ow_first, in_w, out_w, scale_w, R_W, BLOCK_W,
                                  BLOCK_D)
            tl.store(out_base + offs_d[None, :], acc.to(grad_in_ptr.dtype.element_ty),
                     mask=w_mask[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------------------------------
# Launch settings (a function of the shape; no autotuning, so behaviour is reproducible)
# --------------------------------------------------------------------------------------------------
def _feature_block(d: int) -> int:
    return min(next_power_of_2(d), 128)


# Tile elements per program. Each forward element gathers 4 taps and each backward element up to
# R_H * R_W contributions, so their tiles are smaller than a plain copy's would be: at these sizes
# ptxas (sm_90) keeps both kernels near or below 120 registers per thread with no spills, where
# twice the tile took 200-255 registers (and spilled in the backward with triton 3.8).
_FWD_TILE = 2048
_BWD_TILE = 1024


def _token_block(n_tokens: int, block_d: int, budget: int) -> int:
    return max(1, min(next_power_of_2(n_tokens), budget // block_d))


# Largest grid side the Triton path takes: keeps the backward's fp32 range guess within its proof.
_MAX_SIDE = 1 << 20
_MAX_TOKENS = (1 << 31) - 1


def check_grid_sides(in_grid: tuple[int, int], out_grid: tuple[int, int]) -> None:
    """The Triton resample (separate or fused) handles grid sides up to _MAX_SIDE: the backward's
    exact-contributor proof stops there."""
    if max(*in_grid, *out_grid) > _MAX_SIDE:
        raise ValueError(f"grid sides above {_MAX_SIDE} are not supported by the Triton kernels, "
                         f"got in_grid={tuple(in_grid)}, out_grid={tuple(out_grid)}")
    # the kernels form a grid's token count h * w in int32
    if max(in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]) > _MAX_TOKENS:
        raise ValueError(f"grids of more than {_MAX_TOKENS} tokens per frame are not supported by the Triton "
                         f"kernels, got in_grid={tuple(in_grid)}, out_grid={tuple(out_grid)}")


def _contributor_bound(n_in: int, n_out: int, rows: int = 1) -> int:
    # Most outputs with a nonzero weight on one input along an axis (the backward's loop length), or
    # on any of ``rows`` consecutive inputs (the bands of the one-pass similarity backward).
    # They have src in (i - 1, i + rows) (see `_axis_contributors`: (i - 1, i + 1) per input); their
    # exact coordinates S(o) = (n * (2o + 1) - m) / (2m) are n/m apart. The fp32 src is off from S by
    # < 3 * 2^-24 * n (fp64 by far less), so while n * m <= 2^21 the integer 2m * S stays in the
    # closed [2m(i - 1), 2m(i + rows)]: at most floor((rows + 1) m / n) + 1 outputs (the borders
    # i = 0 and i + rows = n span less). Larger axes keep one output of margin: there rounding widens
    # the span by < 1 output.
    return ((rows + 1) * n_out) // n_in + (1 if n_in * n_out <= 1 << 21 else 2)


# --------------------------------------------------------------------------------------------------
# Launchers as torch custom ops (torch.compile(fullgraph=True) traces through them)
# --------------------------------------------------------------------------------------------------
def _empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    # Every kernel output comes from here, so tests can pre-fill it with NaN.
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _kernel(kernel, traceable: bool):
    # Inside the custom ops the launch goes through wrap_triton, so torch.compile can capture it.
    return torch.library.wrap_triton(kernel) if traceable else launcher(kernel)


def _launch_fwd(x: torch.Tensor, in_h: int, in_w: int, out_h: int, out_w: int,
                traceable: bool = False) -> torch.Tensor:
    B, T, _, D = x.shape
    m_out = out_h * out_w
    out = _empty((B, T, m_out, D), x)
    if out.numel() == 0:
        return out
    block_d = _feature_block(D)
    block_m = _token_block(m_out, block_d, _FWD_TILE)
    n_tok_blocks = cdiv(m_out, block_m)
    grid = (n_tok_blocks * B * T, cdiv(D, block_d))
    with device_guard(x):
        _kernel(_resample_fwd_kernel, traceable)[grid](
            x, out, T, D, in_h, in_w, out_h, out_w,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            n_tok_blocks,
            IS_FP64=x.dtype == torch.float64,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            num_warps=num_warps_for(2 * block_m * block_d),  # 4 taps per element: half the usual share
        )
    return out


def bwd_settings(n_in: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) of the backward writing ``n_in`` input tokens of ``D`` features."""
    return _bwd_settings(n_in, D, elements_per_thread())


@functools.lru_cache(maxsize=256)  # on every backward window's path
def _bwd_settings(n_in: int, D: int, ept: int) -> tuple[int, int, int]:
    block_d = _feature_block(D)
    block_n = _token_block(n_in, block_d, _BWD_TILE)
    return block_n, block_d, num_warps_for(2 * block_n * block_d, ept)  # several contributions per element


# Tile elements of the row form's larger tile (its v, gathered, and result tiles are all that size),
# the most output columns a tile may gather from, and the most a token may touch (its gathers are
# unrolled): a strong horizontal upsampling needs more, and `bwd_plan` refuses the row form there.
_ROWS_TILE = 2048
_ROWS_MAX_V_PAD = 256
_ROWS_MAX_R_W = 8


def _rows_v_pad(in_w: int, out_w: int, block_w: int) -> int:
    # Output columns touching block_w consecutive input columns: one run of at most this many.
    return next_power_of_2(max(1, min(_contributor_bound(in_w, out_w, block_w), out_w)))


def _gather_v_pad(v_pad: int, block_d: int, num_warps: int) -> int:
    """V_PAD raised until the gathered (V_PAD, BLOCK_D) tile has an element for each thread: Triton
    (3.8, sm_90) lowers tl.gather only where each warp holds whole rows of the gather axis, which a
    smaller tile cannot give (its compile aborts). The added lanes are masked past the row's end or
    hold columns no token gathers."""
    return max(v_pad, next_power_of_2(cdiv(32 * num_warps, max(1, block_d))))


@functools.lru_cache(maxsize=256)
def _bwd_rows_settings(in_w: int, out_w: int, D: int, ept: int, block_w: "int | None" = None,
                       block_d: "int | None" = None) -> tuple[int, int, int, int]:
    """(BLOCK_W, V_PAD, BLOCK_D, num_warps) of the row form: tiles of up to 64 tokens of a row."""
    block_w = block_w or min(next_power_of_2(in_w), 64)
    v_pad = _rows_v_pad(in_w, out_w, block_w)
    wide = max(block_w, v_pad)
    block_d = block_d or max(16, min(_feature_block(D), _ROWS_TILE // wide))
    return block_w, v_pad, block_d, num_warps_for(2 * wide * block_d, ept)


def bwd_plan(in_grid: tuple[int, int], out_grid: tuple[int, int], D: int, tune: "dict | None" = None) -> dict:
    """How the resample backward launches for ``D`` features from ``out_grid`` back to ``in_grid``, with
    ``tune`` (checked ``utils.RESAMPLE_BWD_TUNE_KEYS`` overrides) applied: ``row_kernel`` (the row
    form, ``_resample_bwd_rows_kernel``, taken with ``row_kernel=1``; the token-block form by default),
    ``block_n`` (its token block; the row form's tile of a row), ``block_d``, ``num_warps``,
    ``d_blocks`` (feature blocks per program, 1 by default), ``v_pad`` (the row form's output columns
    per tile, else 0) and ``extra`` (further launch options)."""
    (in_h, in_w), (_, out_w) = in_grid, out_grid
    tune = tune or {}
    block_n, block_d, num_warps, extra = apply_tune(*bwd_settings(in_h * in_w, D), tune, RESAMPLE_BWD_TUNE_KEYS)
    rows = tune.get("row_kernel", 0)
    if rows not in (0, 1):
        raise ValueError(f"tune['row_kernel'] must be 1 (the row form) or left out, got {rows!r}")
    v_pad = 0
    if rows:
        block_n, v_pad, block_d, num_warps = _bwd_rows_settings(in_w, out_w, D, elements_per_thread(),
                                                                tune.get("block_n"), tune.get("block_d"))
        num_warps = tune.get("num_warps", num_warps)
        if v_pad > _ROWS_MAX_V_PAD:
            raise ValueError(f"tune['row_kernel']: the row form holds at most {_ROWS_MAX_V_PAD} output columns per "
                             f"tile; {block_n} tokens of a {in_w}-wide row touch up to {v_pad} of {out_w} "
                             f"(a smaller block_n, or the default form)")
        if _contributor_bound(in_w, out_w) > _ROWS_MAX_R_W:
            raise ValueError(f"tune['row_kernel']: the row form takes at most {_ROWS_MAX_R_W} output columns per "
                             f"token; a {in_w}-wide row resampled to {out_w} columns has up to "
                             f"{_contributor_bound(in_w, out_w)} (the default form)")
        v_pad = _gather_v_pad(v_pad, block_d, num_warps)
    return {"row_kernel": bool(rows), "block_n": block_n, "block_d": block_d, "num_warps": num_warps,
            "d_blocks": tune.get("d_blocks", 1), "v_pad": v_pad, "extra": extra}


def _launch_bwd(grad_out: torch.Tensor, in_h: int, in_w: int, out_h: int, out_w: int,
                traceable: bool = False, out: "torch.Tensor | None" = None,
                tune: "dict | None" = None) -> torch.Tensor:
    # grad_out is read through its strides, so an expanded (stride-0) gradient, e.g. from `.sum()`,
    # is consumed in place without materialising it. `out`: a (B, T, n_in, D) destination whose
    # frames are dense (e.g. a frame slice of a larger gradient); by default a new tensor. `tune`:
    # launch-setting overrides (`utils.apply_tune`, `bwd_plan`), for tuning sweeps; without it, those
    # `utils.launch_overrides` set, if any.
    B, T, _, D = grad_out.shape
    n_in = in_h * in_w
    if out is None:
        grad_in = _empty((B, T, n_in, D), grad_out)
    else:
        grad_in = out
        if (tuple(out.shape) != (B, T, n_in, D) or out.dtype != grad_out.dtype
                or (n_in * D and (out.stride(3) != 1 or out.stride(2) != D))):
            raise ValueError(f"out must be a {(B, T, n_in, D)} {grad_out.dtype} tensor with dense frames, got "
                             f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if grad_in.numel() == 0:
        return grad_in
    tune = LAUNCH_OVERRIDES.get("resample_bwd") if tune is None else tune
    if not tune:
        block_n, block_d, num_warps = bwd_settings(n_in, D)
        rows, d_blocks, extra = False, 1, {}
    else:
        plan = bwd_plan((in_h, in_w), (out_h, out_w), D, tune)
        rows, block_n, block_d, num_warps = plan["row_kernel"], plan["block_n"], plan["block_d"], plan["num_warps"]
        d_blocks, extra = plan["d_blocks"], plan["extra"]
    # Feature blocks per program: one unless a sweep says otherwise (the same bits either way: every
    # element sums its contributions in the same order; the row form sums them in another).
    d_chunks = cdiv(cdiv(D, block_d), d_blocks)
    strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
               grad_in.stride(0), grad_in.stride(1))
    with device_guard(grad_out):
        if rows:
            n_w_tiles = cdiv(in_w, block_n)
            _kernel(_resample_bwd_rows_kernel, traceable)[(n_w_tiles * in_h * B * T, d_chunks)](
                grad_out, grad_in, T, D, in_h, in_w, out_h, out_w, *strides, n_w_tiles, d_blocks,
                IS_FP64=grad_out.dtype == torch.float64, R_W=_contributor_bound(in_w, out_w),
                BLOCK_W=block_n, V_PAD=plan["v_pad"], BLOCK_D=block_d, num_warps=num_warps, **extra)
            return grad_in
        n_tok_blocks = cdiv(n_in, block_n)
        _kernel(_resample_bwd_kernel, traceable)[(n_tok_blocks * B * T, d_chunks)](
            grad_out, grad_in, T, D, in_h, in_w, out_h, out_w, *strides, n_tok_blocks, d_blocks,
            IS_FP64=grad_out.dtype == torch.float64,
            R_H=_contributor_bound(in_h, out_h),
            R_W=_contributor_bound(in_w, out_w),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=num_warps,
            **extra,
        )
    return grad_in


if triton_available():

    @torch.library.triton_op("crepa_kernels::resample_tokens_fwd", mutates_args=())
    def _resample_fwd_op(x: torch.Tensor, in_h: int, in_w: int, out_h: int, out_w: int) -> torch.Tensor:
        return _launch_fwd(x, in_h, in_w, out_h, out_w, traceable=True)

    @torch.library.triton_op("crepa_kernels::resample_tokens_bwd", mutates_args=())
    def _resample_bwd_op(
        grad_out: torch.Tensor, in_h: int, in_w: int, out_h: int, out_w: int
    ) -> torch.Tensor:
        return _launch_bwd(grad_out, in_h, in_w, out_h, out_w, traceable=True)

    def _setup_context(ctx, inputs, output):  # both ops: (tokens, in_h, in_w, out_h, out_w)
        _, in_h, in_w, out_h, out_w = inputs
        ctx.grids = (in_h, in_w, out_h, out_w)

    def _backward(ctx, grad_out):
        # Routed through the op, so double backward is again the (linear) forward op's job.
        return _resample_bwd_op(grad_out, *ctx.grids), None, None, None, None

    def _bwd_backward(ctx, grad_grad_in):
        # The backward is linear in grad_out with the forward's transpose, so its gradient is the forward.
        return _resample_fwd_op(grad_grad_in, *ctx.grids), None, None, None, None

    torch.library.register_autograd(
        "crepa_kernels::resample_tokens_fwd", _backward, setup_context=_setup_context
    )
    torch.library.register_autograd(
        "crepa_kernels::resample_tokens_bwd", _bwd_backward, setup_context=_setup_context
    )

    class _Resample(torch.autograd.Function):
        """The eager front end: the same kernels as the custom ops, launched directly (the custom-op
        dispatch costs more host time than the kernels take at small shapes)."""

        @staticmethod
        def forward(ctx, x, in_h, in_w, out_h, out_w):
            ctx.grids = (in_h, in_w, out_h, out_w)
            return _launch_fwd(x, in_h, in_w, out_h, out_w)

        @staticmethod
        def backward(ctx, grad_out):
            return _ResampleTranspose.apply(grad_out, *ctx.grids), None, None, None, None

    class _ResampleTranspose(torch.autograd.Function):
        # The backward as a function of grad_out; linear, with the forward as its own gradient.
        @staticmethod
        def forward(ctx, grad_out, in_h, in_w, out_h, out_w):
            ctx.grids = (in_h, in_w, out_h, out_w)
            return _launch_bwd(grad_out, in_h, in_w, out_h, out_w)

        @staticmethod
        def backward(ctx, grad_grad_in):
            return _Resample.apply(grad_grad_in, *ctx.grids), None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _check_grid(name: str, grid) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"{name} must be a pair of ints (h, w), got {grid!r}")
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"{name} must have positive sizes, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _resample_tokens_torch(x: torch.Tensor, in_grid, out_grid) -> torch.Tensor:
    """Plain PyTorch path for tensors the Triton kernels cannot take (CPU without the interpreter)."""
    B, T, _, D = x.shape
    (h, w), (oh, ow) = in_grid, out_grid
    if x.numel() == 0:  # F.interpolate refuses empty images; the result is empty too (and differentiable)
        return x.new_zeros((B, T, oh * ow, D)) + x.sum() * 0
    img = x.reshape(B * T, h, w, D).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=(oh, ow), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(B, T, oh * ow, D)


def resample_tokens(
    x: torch.Tensor, in_grid: tuple[int, int], out_grid: tuple[int, int]
) -> torch.Tensor:
    """Bilinearly resample token grids, `align_corners=False` (SPEC section 2).

    x: `(B, T, N, D)` with `N == in_grid[0] * in_grid[1]`, tokens in row-major `(h, w)` order;
    fp16 / bf16 / fp32 / fp64, any strides. Returns `(B, T, out_h * out_w, D)` in `x.dtype`, equal to
    `F.interpolate(mode="bilinear", align_corners=False)` of the `(B*T, D, h, w)` image view, computed
    on the token-major layout. Grids `(1, n) -> (1, m)` are exactly 1-D linear interpolation of the
    token sequence. Taps are computed in fp32 (fp64 for fp64 inputs) as torch does; sums are
    accumulated in fp32 (fp64) and cast once. Differentiable w.r.t. `x`; the backward is deterministic.

    When `in_grid == out_grid` the input is returned unchanged (the same tensor object), since
    bilinear resampling onto the same grid is the identity. Tensors the Triton kernels cannot take
    (CPU without `TRITON_INTERPRET=1`) go through `F.interpolate` with the same result; the Triton
    kernels take grid sides up to 2**20, grids of fewer than 2**31 tokens and D up to 2**30.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    in_h, in_w = _check_grid("in_grid", in_grid)
    out_h, out_w = _check_grid("out_grid", out_grid)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, T, N, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be fp16, bf16, fp32 or fp64, got dtype {x.dtype}")
    if x.shape[2] != in_h * in_w:
        raise ValueError(
            f"x has N={x.shape[2]} tokens but in_grid={in_grid} holds {in_h * in_w}"
        )
    if (in_h, in_w) == (out_h, out_w):
        return x
    if not triton_supports(x):
        return _resample_tokens_torch(x, (in_h, in_w), (out_h, out_w))
    check_grid_sides((in_h, in_w), (out_h, out_w))
    check_feature_dim("x", x.shape[3])
    if direct_launch_ok(x):
        return _Resample.apply(x, in_h, in_w, out_h, out_w)
    return _resample_fwd_op(x, in_h, in_w, out_h, out_w)
