"""Tests for crepa_kernels.ops.resample: token-grid resampling and the temporal frame pick.

The oracle is `F.interpolate` on the `(B*T, D, h, w)` image view (the definition in SPEC section 2),
and `torch.linspace(...).long()` for the temporal indices (SPEC section 1). Tier 2 runs the Triton
kernels through the interpreter on tiny shapes; tier 3 (`gpu`) covers half precision,
`torch.compile` and the full-size shape.
"""
import pytest
import torch
import torch.nn.functional as F

from crepa_kernels.ops import resample as rs
from crepa_kernels.ops.resample import pick_frames, resample_tokens, temporal_indices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(x, in_grid, out_grid):
    B, T, _, D = x.shape
    img = x.reshape(B * T, in_grid[0], in_grid[1], D).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=tuple(out_grid), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(B, T, out_grid[0] * out_grid[1], D)


def assert_rel_close(actual, expected, rtol, name=""):
    """Max error relative to the largest reference magnitude (robust where entries are near 0)."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{name}: max err {err:.3e} vs scale {scale:.3e}"


@pytest.fixture
def nan_outputs(monkeypatch):
    """Kernel outputs start as NaN, so any element a kernel fails to write shows up."""
    real_empty = rs._empty

    def nan_empty(shape, like):
        return real_empty(shape, like).fill_(float("nan"))

    monkeypatch.setattr(rs, "_empty", nan_empty)


# (in_grid, out_grid): every axis case SPEC section 2 and the loss meet, at interpreter scale.
GRID_CASES = [
    pytest.param((6, 8), (3, 5), id="down-both"),
    pytest.param((3, 4), (7, 9), id="up-both"),
    pytest.param((6, 10), (7, 7), id="mixed-like-30x52-to-37x37"),
    pytest.param((7, 5), (4, 8), id="mixed-other-way"),
    pytest.param((4, 4), (6, 6), id="square-up"),
    pytest.param((5, 5), (3, 3), id="square-down"),
    pytest.param((5, 7), (3, 4), id="non-integer-ratio"),
    pytest.param((1, 7), (1, 3), id="1d-down"),
    pytest.param((1, 3), (1, 8), id="1d-up"),
    pytest.param((4, 5), (1, 1), id="out-1x1"),
    pytest.param((4, 5), (1, 3), id="out-h-1"),
    pytest.param((1, 1), (3, 2), id="in-1x1"),
    pytest.param((1, 4), (2, 3), id="in-h-1"),
    pytest.param((3, 2), (12, 5), id="strong-up"),
]


# ---------------------------------------------------------------------------------------------
# Tier 2: interpreter (or GPU), fp32 and fp64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_grid,out_grid", GRID_CASES)
def test_forward_and_grad_match_interpolate(in_grid, out_grid, dtype, nan_outputs):
    torch.manual_seed(0)
    x = torch.randn(2, 2, in_grid[0] * in_grid[1], 5, dtype=dtype, device=DEVICE, requires_grad=True)
    y = resample_tokens(x, in_grid, out_grid)
    ref = oracle(x, in_grid, out_grid)
    assert y.dtype == dtype and y.shape == ref.shape
    fwd_tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, ref, atol=fwd_tol, rtol=0)

    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert_rel_close(gx, gr, 1e-4 if dtype == torch.float32 else 1e-10, "grad")


# ---------------------------------------------------------------------------------------------
# The backward's per-axis contributor range, probed directly
# ---------------------------------------------------------------------------------------------
if rs.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _axis_probe_kernel(
        n_ptr, m_ptr, j_ptr, lo_ptr, count_ptr, i0_ptr, i1_ptr, l0_ptr, l1_ptr, L,
        IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One lane per (axis sizes, index): index j read as an input (its range) and as an output
        # (its taps), through the helpers the kernels use.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        n = tl.load(n_ptr + offs, mask=mask, other=1)
        m = tl.load(m_ptr + offs, mask=mask, other=1)
        j = tl.load(j_ptr + offs, mask=mask, other=0)
        scale = rs._axis_scale(n, m, IS_FP64)
        lo, count = rs._axis_contributors(j, n, m, scale)
        i0, i1, l0, l1 = rs._axis_taps(j, n, scale)
        tl.store(lo_ptr + offs, lo, mask=mask)
        tl.store(count_ptr + offs, count, mask=mask)
        tl.store(i0_ptr + offs, i0, mask=mask)
        tl.store(i1_ptr + offs, i1, mask=mask)
        tl.store(l0_ptr + offs, l0, mask=mask)
        tl.store(l1_ptr + offs, l1, mask=mask)


def probe_axes(pairs, dtype):
    """Per (n, m): the kernel's (lo, count) for each input index and its taps for each output index."""
    sizes = [max(n, m) for n, m in pairs]
    n_lane = torch.cat([torch.full((k,), n, dtype=torch.int32) for k, (n, _) in zip(sizes, pairs)])
    m_lane = torch.cat([torch.full((k,), m, dtype=torch.int32) for k, (_, m) in zip(sizes, pairs)])
    j_lane = torch.cat([torch.arange(k, dtype=torch.int32) for k in sizes])
    n_lane, m_lane, j_lane = (t.to(DEVICE) for t in (n_lane, m_lane, j_lane))
    L = j_lane.numel()
    outs = [torch.full((L,), -7, dtype=torch.int32, device=DEVICE) for _ in range(4)]
    outs += [torch.full((L,), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    block = 4096
    _axis_probe_kernel[(triton.cdiv(L, block),)](
        n_lane, m_lane, j_lane, *outs, L, IS_FP64=dtype == torch.float64, BLOCK=block
    )
    lo, count, i0, i1, l0, l1 = (t.cpu() for t in outs)
    start = 0
    for (n, m), k in zip(pairs, sizes):
        sl = slice(start, start + k)
        yield n, m, lo[sl][:n], count[sl][:n], (i0[sl][:m], i1[sl][:m], l0[sl][:m], l1[sl][:m])
        start += k


RANGE_PAIRS = [(n, m) for n in range(1, 71) for m in range(1, 71)] + [
    (1, 1000), (1000, 1), (3, 1000), (1000, 3), (999, 1000), (1000, 999), (30, 37), (52, 37), (16, 37),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_range_is_exactly_the_contributors(dtype):
    # Brute force: the 1-D weight matrix W[o, i] built from the forward's taps, checked against
    # F.interpolate; the outputs with W[o, i] != 0 must be exactly [lo, lo + count) for every input
    # i, and count must fit the loop bound, so a dropped (or extra) contributor fails here.
    if not rs.triton_supports(torch.empty(0, device=DEVICE)):
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for n, m, lo, count, (i0, i1, l0, l1) in probe_axes(RANGE_PAIRS, dtype):
        o = torch.arange(m)
        W = torch.zeros(m, n, dtype=torch.float64)
        W.index_put_((o, i0.long()), l0.double(), accumulate=True)
        W.index_put_((o, i1.long()), l1.double(), accumulate=True)
        ref = F.interpolate(torch.eye(n, dtype=dtype)[None], size=m, mode="linear", align_corners=False)
        torch.testing.assert_close(W, ref[0].T.double(), atol=tol, rtol=0, msg=f"taps {n}->{m}")
        in_range = (o[:, None] >= lo[None, :]) & (o[:, None] < (lo + count)[None, :])
        assert torch.equal(in_range, W != 0), f"range {n}->{m}"
        assert int(count.max()) <= rs._contributor_bound(n, m), f"bound {n}->{m}"


def test_band_contributor_bound():
    # The outputs touching any of `rows` consecutive inputs (the bands of the one-pass similarity
    # backward), counted from F.interpolate's own weights, never exceed _contributor_bound(n, m, rows),
    # and a one-row band is the per-input bound.
    for n in range(1, 25):
        for m in range(1, 25):
            W = F.interpolate(torch.eye(n, dtype=torch.float64)[None], size=m, mode="linear",
                              align_corners=False)[0].T  # (m, n)
            for rows in range(1, 5):
                most = max(int((W[:, r0:r0 + rows] != 0).any(dim=1).sum()) for r0 in range(n))
                assert most <= rs._contributor_bound(n, m, rows), f"{n}->{m}, {rows} rows"
            assert rs._contributor_bound(n, m, 1) == rs._contributor_bound(n, m)


@pytest.mark.parametrize("fused", [False, True])  # fp32 src as two roundings, or one (a fused multiply-add)
def test_band_contributor_bound_on_large_axes(fused):
    # Past what F.interpolate can check cheaply, and past n * m = 2^21 where the bound keeps a
    # margin: the outputs touching a band, from the fp32 coordinate src = max(scale * (o + 0.5) - 0.5, 0)
    # as the kernels compute it (scale rounded to fp32), never exceed _contributor_bound(n, m, rows).
    import numpy as np

    for n, m in ((1000, 3000), (3000, 1000), (2048, 2047), (2047, 2048), (4096, 1531), (1531, 4096),
                 (1 << 12, (1 << 12) + 1), (37, 4000), (4000, 37)):
        scale = np.float32(np.float64(n) / np.float64(m))
        o = np.arange(m, dtype=np.float64) + 0.5
        if fused:
            src = (np.float64(scale) * o - 0.5).astype(np.float32)
        else:
            src = (scale * o.astype(np.float32)).astype(np.float32) - np.float32(0.5)
        src = np.maximum(src, np.float32(0))
        i0 = np.minimum(src.astype(np.int64), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        l1 = src - i0.astype(np.float32)
        first = np.where(l1 == 1.0, i1, i0)  # the lowest and highest input each output weighs (nonzero)
        last = np.where(l1 == 0.0, i0, i1)
        assert (np.diff(first) >= 0).all() and (np.diff(last) >= 0).all()
        for rows in (1, 2, 3):
            r0 = np.arange(n)
            # outputs o touch band [r0, r0 + rows) iff first[o] < r0 + rows and last[o] >= r0 (both
            # non-decreasing in o)
            count = np.searchsorted(first, r0 + rows, side="left") - np.searchsorted(last, r0, side="left")
            assert int(count.max()) <= rs._contributor_bound(n, m, rows), f"{n}->{m}, {rows} rows, fused={fused}"


def test_contributor_bound_values():
    # The wan480 axes (30 -> 37, 52 -> 37) and 16 -> 37.
    assert [rs._contributor_bound(n, 37) for n in (30, 52, 16)] == [3, 2, 5]
    # Past n * m = 2^21 the bound keeps one output of margin for rounding.
    assert rs._contributor_bound(2048, 2048) == 4


def test_grid_side_limit():
    if not rs.triton_supports(torch.empty(0, device=DEVICE)):
        pytest.skip("the limit belongs to the Triton path")
    x = torch.zeros(1, 1, rs._MAX_SIDE + 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="in_grid"):
        resample_tokens(x, (1, rs._MAX_SIDE + 1), (1, 2))


def test_token_count_and_feature_dim_limits():
    # The kernels form h * w and step over D in int32: 2**31 tokens per frame, or D past 2**30, would
    # wrap and leave the output unwritten; they are refused. Stride-0 views hold no memory.
    if not rs.triton_supports(torch.empty(0, device=DEVICE)):
        pytest.skip("the limits belong to the Triton path")
    big = torch.zeros(1, device=DEVICE).expand(1, 1, 1 << 31, 1)
    with pytest.raises(ValueError, match="more than 2147483647 tokens per frame .*in_grid=\\(2048, 1048576\\)"):
        resample_tokens(big, (2048, 1 << 20), (1, 1))
    one = torch.zeros(1, 1, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="more than 2147483647 tokens per frame .*out_grid=\\(2048, 1048576\\)"):
        resample_tokens(one, (1, 1), (2048, 1 << 20))
    wide = torch.zeros(1, device=DEVICE).expand(1, 1, 2, (1 << 30) + 1)
    with pytest.raises(ValueError, match="x has D=1073741825 features; the Triton kernels take at most 1073741824"):
        resample_tokens(wide, (1, 2), (1, 3))


# (3, 30): input 1 has five zero-weight outputs (src clamped to 0) ahead of its real ones.
@pytest.mark.parametrize("n,m", [(7, 3), (3, 8), (5, 5 + 1), (9, 4), (2, 11), (3, 30), (1, 12), (70, 2)])
def test_row_grid_is_linear_interpolation(n, m):
    torch.manual_seed(1)
    B, T, D = 1, 2, 3
    x = torch.randn(B, T, n, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = resample_tokens(x, (1, n), (1, m))
    ref = F.interpolate(x.reshape(B * T, n, D).transpose(1, 2), size=m, mode="linear", align_corners=False)
    ref = ref.transpose(1, 2).reshape(B, T, m, D)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-12, rtol=0
    )


def test_hand_computed_values():
    # Independent of torch: 1-D, n=4 -> m=2, scale 2: src = 2*(j+0.5)-0.5 = 0.5, 2.5
    # -> 0.5*x0 + 0.5*x1 and 0.5*x2 + 0.5*x3. n=2 -> m=4, scale 0.5: src = -0.25->0, 0.25, 0.75, 1.25
    # -> x0, 0.75x0+0.25x1, 0.25x0+0.75x1, x1 (the upper tap clamps to the last index).
    x = torch.tensor([1.0, 3.0, 7.0, 15.0], dtype=torch.float64, device=DEVICE).reshape(1, 1, 4, 1)
    down = resample_tokens(x, (1, 4), (1, 2)).flatten().tolist()
    assert down == [2.0, 11.0]
    x2 = torch.tensor([4.0, 8.0], dtype=torch.float64, device=DEVICE).reshape(1, 1, 2, 1)
    up = resample_tokens(x2, (1, 2), (1, 4)).flatten().tolist()
    assert up == [4.0, 5.0, 7.0, 8.0]
    # 2-D separability: a grid x[h, w] = h * 10 + w is linear, so bilinear sampling returns the
    # (clamped) source coordinates: out[i, j] = 10 * sh(i) + sw(j).
    h, w, oh, ow = 3, 4, 5, 2
    grid = (torch.arange(h, dtype=torch.float64)[:, None] * 10 + torch.arange(w, dtype=torch.float64))
    xg = grid.reshape(1, 1, h * w, 1).to(DEVICE)
    out = resample_tokens(xg, (h, w), (oh, ow)).reshape(oh, ow).cpu()

    def src(j, n, m):
        return min(max((j + 0.5) * n / m - 0.5, 0.0), n - 1)

    expected = torch.tensor([[10 * src(i, h, oh) + src(j, w, ow) for j in range(ow)] for i in range(oh)],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_features_span_several_blocks(dtype, nan_outputs):
    # D = 130: not a power of two and larger than one feature block (128).
    torch.manual_seed(2)
    x = torch.randn(1, 2, 3 * 4, 130, dtype=dtype, device=DEVICE, requires_grad=True)
    y = resample_tokens(x, (3, 4), (2, 5))
    ref = oracle(x, (3, 4), (2, 5))
    torch.testing.assert_close(y, ref, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
    g = torch.randn_like(ref)
    assert_rel_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], 1e-4, "grad")


def test_non_contiguous_input(nan_outputs):
    torch.manual_seed(3)
    in_grid, out_grid = (4, 3), (3, 5)
    # (B, T, D, N) transposed, then every other feature: no unit stride anywhere.
    base = torch.randn(2, 3, 12, in_grid[0] * in_grid[1], dtype=torch.float64, device=DEVICE)
    x = base.transpose(2, 3)[..., ::2].detach().requires_grad_(True)
    assert not x.is_contiguous()
    y = resample_tokens(x, in_grid, out_grid)
    ref = oracle(x, in_grid, out_grid)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    # Batch and frame dims swapped: frame stride larger than batch stride.
    x2 = base.permute(1, 0, 3, 2).detach().requires_grad_(True)  # (T, B, N, D) viewed as (B, T, N, D)
    y2 = resample_tokens(x2, in_grid, out_grid)
    torch.testing.assert_close(y2, oracle(x2, in_grid, out_grid), atol=1e-12, rtol=0)
    g = torch.randn_like(y2)
    torch.testing.assert_close(
        torch.autograd.grad(y2, x2, g)[0], torch.autograd.grad(oracle(x2, in_grid, out_grid), x2, g)[0],
        atol=1e-12, rtol=0,
    )


def test_expanded_grad_output(nan_outputs):
    torch.manual_seed(4)
    in_grid, out_grid = (5, 3), (2, 4)
    x = torch.randn(2, 2, 15, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    # `.sum()` hands the backward a stride-0 gradient.
    (gx,) = torch.autograd.grad(resample_tokens(x, in_grid, out_grid).sum(), x)
    (gr,) = torch.autograd.grad(oracle(x, in_grid, out_grid).sum(), x)
    torch.testing.assert_close(gx, gr, atol=1e-12, rtol=0)
    # A gradient broadcast along tokens only (stride 0 on N, real strides elsewhere).
    g = torch.randn(2, 2, 1, 6, dtype=torch.float64, device=DEVICE).expand(2, 2, 8, 6)
    (gx,) = torch.autograd.grad(resample_tokens(x, in_grid, out_grid), x, g)
    (gr,) = torch.autograd.grad(oracle(x, in_grid, out_grid), x, g)
    torch.testing.assert_close(gx, gr, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "in_grid,out_grid", [((3, 4), (2, 5)), ((2, 2), (3, 1)), ((1, 4), (1, 7)), ((3, 1), (1, 1))]
)
def test_gradcheck_fp64(in_grid, out_grid):
    torch.manual_seed(5)
    x = torch.randn(1, 2, in_grid[0] * in_grid[1], 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    # fast_mode checks random projections of the Jacobian: a few kernel runs instead of one per element.
    assert torch.autograd.gradcheck(lambda t: resample_tokens(t, in_grid, out_grid), (x,), fast_mode=True)


def test_gradgradcheck_fp64():
    x = torch.randn(1, 1, 6, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: resample_tokens(t, (2, 3), (3, 2)), (x,), fast_mode=True)


@pytest.fixture
def custom_op_front_end(monkeypatch):
    """Route eager calls through the registered custom ops (the path torch.compile captures)."""
    monkeypatch.setattr(rs, "direct_launch_ok", lambda *tensors: False)


@pytest.mark.parametrize("in_grid,out_grid", [((6, 10), (7, 7)), ((1, 3), (1, 8))])
def test_custom_op_front_end_matches_interpolate(custom_op_front_end, in_grid, out_grid):
    x = torch.randn(1, 2, in_grid[0] * in_grid[1], 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.randn(1, 2, out_grid[0] * out_grid[1], 5, dtype=torch.float64, device=DEVICE)
    out = resample_tokens(x, in_grid, out_grid)
    ref = oracle(x, in_grid, out_grid)
    assert_rel_close(out, ref, 1e-12, "forward")
    assert_rel_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], 1e-12, "grad")


def test_custom_op_front_end_gradgradcheck(custom_op_front_end):
    x = torch.randn(1, 1, 6, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: resample_tokens(t, (2, 3), (3, 2)), (x,), fast_mode=True)


def test_front_ends_agree_bitwise(monkeypatch):
    # Eager calls launch from an autograd.Function, torch.compile through the custom ops: same kernels.
    torch.manual_seed(8)
    x = torch.randn(1, 2, 6 * 10, 7, device=DEVICE, requires_grad=True)
    g = torch.randn(1, 2, 7 * 7, 7, device=DEVICE)
    results = []
    for direct in (True, False):
        monkeypatch.setattr(rs, "direct_launch_ok", lambda *tensors, _d=direct: _d)
        out = resample_tokens(x, (6, 10), (7, 7))
        results.append((out, torch.autograd.grad(out, x, g)[0]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_backward_is_bitwise_deterministic():
    torch.manual_seed(6)
    x = torch.randn(2, 2, 6 * 10, 7, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 2, 7 * 7, 7, device=DEVICE)
    first = torch.autograd.grad(resample_tokens(x, (6, 10), (7, 7)), x, g)[0]
    second = torch.autograd.grad(resample_tokens(x, (6, 10), (7, 7)), x, g)[0]
    assert torch.equal(first, second)


def test_identity_returns_input():
    x = torch.randn(1, 2, 6, 3, device=DEVICE)
    assert resample_tokens(x, (2, 3), (2, 3)) is x


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(2, 6, 3), (2, 3), (1, 1)), ValueError, "4-D"),
        ((torch.randn(1, 1, 5, 3), (2, 3), (1, 1)), ValueError, "N=5"),
        ((torch.randn(1, 1, 6, 3), (2, 3), (0, 2)), ValueError, "out_grid"),
        ((torch.randn(1, 1, 6, 3), (2, 3, 1), (1, 2)), TypeError, "in_grid"),
        ((torch.randn(1, 1, 6, 3), (2.0, 3), (1, 2)), TypeError, "in_grid"),
        ((torch.ones(1, 1, 6, 3, dtype=torch.int32), (2, 3), (1, 2)), TypeError, "dtype"),
        (([[1.0]], (1, 1), (1, 2)), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_resample_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        resample_tokens(*args)


def test_temporal_indices_match_linspace():
    for t_long in range(1, 50):
        for t_short in range(1, t_long + 1):
            idx = temporal_indices(t_long, t_short)
            expected = torch.linspace(0, t_long - 1, t_short).long()
            assert idx.dtype == torch.int64
            assert torch.equal(idx, expected), (t_long, t_short)
            # torch's fp32 linspace can land just below an exact integer (17 -> 15 keeps frame 7,
            # not 8 = 7 * 16 / 14), so the rule is "torch's rounding", within one frame of the exact
            # floor and strictly increasing (distinct frames).
            if t_short > 1:
                exact = torch.tensor([(i * (t_long - 1)) // (t_short - 1) for i in range(t_short)])
                assert ((exact - idx) >= 0).all() and ((exact - idx) <= 1).all(), (t_long, t_short)
                assert (idx[1:] > idx[:-1]).all(), (t_long, t_short)
            assert idx[0] == 0 and idx[-1] <= t_long - 1
    for t_long, t_short in [(81, 21), (121, 31), (200, 49), (1000, 333)]:
        assert torch.equal(temporal_indices(t_long, t_short), torch.linspace(0, t_long - 1, t_short).long())


def test_temporal_indices_device_and_validation():
    assert temporal_indices(9, 3, device=DEVICE).device.type == torch.device(DEVICE).type
    with pytest.raises(ValueError, match="t_short"):
        temporal_indices(3, 5)
    with pytest.raises(ValueError, match="t_long"):
        temporal_indices(0, 0)
    with pytest.raises(TypeError, match="t_short"):
        temporal_indices(4, 2.0)


def test_pick_frames_values_and_grad():
    torch.manual_seed(7)
    x = torch.randn(2, 9, 4, 3, dtype=torch.float64, requires_grad=True)
    idx = temporal_indices(9, 4)
    y = pick_frames(x, idx)
    assert torch.equal(y, torch.stack([x[:, i] for i in idx.tolist()], dim=1))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    expected = torch.zeros_like(x)
    for k, i in enumerate(idx.tolist()):
        expected[:, i] = g[:, k]
    assert torch.equal(gx, expected)
    with pytest.raises(ValueError, match="index"):
        pick_frames(x, idx.reshape(2, 2))
    with pytest.raises(ValueError, match="frame dim"):
        pick_frames(torch.randn(3), idx)


# ---------------------------------------------------------------------------------------------
# Tier 3: GPU only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_grid,out_grid", [((30, 52), (37, 37)), ((37, 37), (16, 16)), ((16, 16), (37, 37))])
def test_gpu_half_precision_vs_fp32(in_grid, out_grid, dtype):
    _check_half_precision(in_grid, out_grid, dtype, 200)


@pytest.mark.parametrize("in_grid,out_grid", [((3, 5), (4, 4)), ((4, 4), (2, 3))])
def test_fp16_small(in_grid, out_grid):
    # fp16 on the CPU tier too (the interpreter rounds fp16 stores to nearest; its bf16 stores
    # truncate, so bf16 is held to one ulp on the GPU only)
    _check_half_precision(in_grid, out_grid, torch.float16, 24)


def _check_half_precision(in_grid, out_grid, dtype, dim):
    torch.manual_seed(8)
    x32 = torch.randn(2, 3, in_grid[0] * in_grid[1], dim, device=DEVICE)
    x = x32.to(dtype).requires_grad_(True)
    ref = oracle(x.detach().float().requires_grad_(True), in_grid, out_grid)
    y = resample_tokens(x, in_grid, out_grid)
    assert y.dtype == dtype
    # fp32 accumulation, one rounding at the store: within one ulp of the output format.
    eps = torch.finfo(dtype).eps
    assert_rel_close(y.float(), ref.detach(), 2 * eps, "fwd")
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    xr = x.detach().float().requires_grad_(True)
    (gr,) = torch.autograd.grad(oracle(xr, in_grid, out_grid), xr, g.to(dtype).float())
    assert gx.dtype == dtype
    assert_rel_close(gx.float(), gr, 2 * eps, "grad")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch.manual_seed(9)
    x = torch.randn(2, 3, 30 * 52, 64, device="cuda", requires_grad=True)
    fn = torch.compile(lambda t: resample_tokens(t, (30, 52), (37, 37)), fullgraph=True)
    y = fn(x)
    ref = oracle(x, (30, 52), (37, 37))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert_rel_close(gx, gr, 1e-4, "grad")
    # `.mean()` inside the compiled graph: the backward sees an expanded gradient.
    loss_fn = torch.compile(lambda t: resample_tokens(t, (30, 52), (37, 37)).square().mean(), fullgraph=True)
    (gx,) = torch.autograd.grad(loss_fn(x), x)
    (gr,) = torch.autograd.grad(oracle(x, (30, 52), (37, 37)).square().mean(), x)
    assert_rel_close(gx, gr, 1e-4, "grad-mean")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_wan480_size(dtype):
    torch.manual_seed(10)
    in_grid, out_grid = (30, 52), (37, 37)
    x = torch.randn(1, 21, 30 * 52, 1536, device="cuda").to(dtype).requires_grad_(True)
    y = resample_tokens(x, in_grid, out_grid)
    xr = x.detach().float().requires_grad_(True)
    ref = oracle(xr, in_grid, out_grid)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert_rel_close(y.float(), ref.detach(), tol, "fwd")
    g = torch.randn_like(ref).to(dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, xr, g.float())
    assert_rel_close(gx.float(), gr, 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps, "grad")
    (gx2,) = torch.autograd.grad(resample_tokens(x, in_grid, out_grid), x, g)
    assert torch.equal(gx, gx2)


def _check_resample_at_the_last_tokens(in_grid, out_grid, B, T, D, dtype, n_sub, rows_of, tol):
    """resample_tokens forward and backward on the last ``n_sub`` output tokens (the highest offsets)
    against their rows of F.interpolate's resampling matrix; the gradient of those tokens alone must
    match on the input tokens they read and be zero everywhere else."""
    g = torch.Generator(device=DEVICE).manual_seed(12)
    n_in, n_out = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]
    x = torch.randn(B, T, n_in, D, generator=g, device=DEVICE, dtype=dtype).requires_grad_(True)
    y = resample_tokens(x, in_grid, out_grid)
    sub = torch.arange(n_out - n_sub, n_out, device=DEVICE)
    rows = rows_of(in_grid, out_grid, sub.tolist())  # (n_sub, n_in), float64 on the CPU
    q = rows.abs().sum(0).nonzero().squeeze(1)
    a = rows[:, q].to(DEVICE, torch.float32)
    assert_rel_close(y[:, :, sub].float(), torch.einsum("sq,btqd->btsd", a, x.detach()[:, :, q.to(DEVICE)].float()),
                     tol, "fwd")
    gy = torch.randn(B, T, n_sub, D, generator=g, device=DEVICE, dtype=dtype)
    (gx,) = torch.autograd.grad(y[:, :, sub], x, gy)
    assert_rel_close(gx[:, :, q.to(DEVICE)].float(), torch.einsum("sq,btsd->btqd", a, gy.float()), tol, "grad")
    q0 = int(q.min())
    untouched = torch.ones(n_in - q0, dtype=torch.bool)
    untouched[q - q0] = False
    assert gx[:, :, :q0].count_nonzero().item() == 0
    assert gx[:, :, q0:][:, :, untouched.to(DEVICE)].count_nonzero().item() == 0


@pytest.mark.parametrize("in_grid,out_grid", [((6, 10), (7, 7)), ((7, 7), (6, 10))])
def test_resample_at_the_last_tokens(interpolation_rows, in_grid, out_grid):
    # Interpreter scale: checks the reference this test shares with the GPU case below.
    _check_resample_at_the_last_tokens(in_grid, out_grid, 1, 3, 5, torch.float32, 6, interpolation_rows, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("in_grid,out_grid", [((128, 128), (100, 100)), ((100, 100), (128, 128))])
def test_gpu_int64_offsets(interpolation_rows, in_grid, out_grid):
    # The 128x128 side: 1*8*16384*16400 = 2.15e9 > 2^31 elements (4.3 GB in bf16), as the input and
    # its gradient (downsampling) or as the output (upsampling). About 14 GB of GPU memory.
    _check_resample_at_the_last_tokens(in_grid, out_grid, 1, 8, 16400, torch.bfloat16, 24, interpolation_rows,
                                       2 * torch.finfo(torch.bfloat16).eps)


@pytest.mark.gpu
def test_gpu_temporal_indices_match_cpu():
    # The compatible indices must not depend on the device that builds them.
    for t_long in range(1, 130):
        for t_short in range(1, t_long + 1, 3):
            assert torch.equal(temporal_indices(t_long, t_short, device="cuda").cpu(),
                               torch.linspace(0, t_long - 1, t_short).long()), (t_long, t_short)


def test_backward_into_a_frame_slice():
    # The launcher can write each frame window of a larger gradient in place (frames stay dense).
    torch.manual_seed(9)
    g = torch.randn(2, 5, 7 * 7, 6, device=DEVICE)
    whole = rs._launch_bwd(g, 6, 10, 7, 7)
    into = torch.full_like(whole, float("nan"))
    rs._launch_bwd(g[:, :2], 6, 10, 7, 7, out=into[:, :2])
    rs._launch_bwd(g[:, 2:], 6, 10, 7, 7, out=into[:, 2:])
    assert torch.equal(into, whole)
    with pytest.raises(ValueError, match="dense frames"):
        rs._launch_bwd(g, 6, 10, 7, 7, out=torch.empty(2, 5, 6, 60, device=DEVICE).transpose(2, 3))


@pytest.mark.parametrize("d_blocks", [2, 3, 8])
def test_backward_with_several_feature_blocks_per_program(d_blocks, nan_outputs):
    # The d_blocks setting (launch tuning): one program computes several feature blocks in turn. Each
    # element sums the same contributions in the same order, so the bits are those of one block per
    # program, and the gradient is the oracle's. D = 40 in blocks of 16 is three blocks, the last one
    # cut: chunks of 2 (2 + 1), of 3 (all in one), and of more blocks than there are.
    torch.manual_seed(10)
    g = torch.randn(2, 3, 7 * 7, 40, device=DEVICE)
    one = rs._launch_bwd(g, 6, 10, 7, 7, tune={"block_d": 16})
    many = rs._launch_bwd(g, 6, 10, 7, 7, tune={"block_d": 16, "d_blocks": d_blocks})
    assert torch.equal(many, one)
    x = torch.zeros(2, 3, 6 * 10, 40, device=DEVICE, requires_grad=True)
    (ref,) = torch.autograd.grad(oracle(x, (6, 10), (7, 7)), x, g)
    assert_rel_close(many, ref, 1e-5, "grad")


@pytest.mark.parametrize("in_grid,out_grid", GRID_CASES)
def test_row_form_of_the_backward_matches_interpolate(in_grid, out_grid, nan_outputs):
    # The row form (launch setting row_kernel=1): heights first, then each token gathers its columns.
    # fp64 against autograd of F.interpolate, every element written, over every axis case; with tiles
    # of a whole row (up to 64 tokens) and of 2 tokens (several tiles per row, several blocks of D = 40).
    torch.manual_seed(11)
    g = torch.randn(1, 1, out_grid[0] * out_grid[1], 40, dtype=torch.float64, device=DEVICE)
    x = torch.zeros(1, 1, in_grid[0] * in_grid[1], 40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    (ref,) = torch.autograd.grad(oracle(x, in_grid, out_grid), x, g)
    for tune in ({"row_kernel": 1}, {"row_kernel": 1, "block_n": 2, "block_d": 16, "d_blocks": 2}):
        torch.testing.assert_close(rs._launch_bwd(g, *in_grid, *out_grid, tune=tune), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_grid,out_grid", [((6, 10), (7, 7)), ((7, 7), (6, 10)), ((3, 2), (12, 5))])
def test_row_form_in_fp32_strided_and_into_a_frame_slice(in_grid, out_grid):
    # fp32 within rounding of the default form (a different summation order), reading a stride-0 and a
    # transposed gradient, writing frame windows of a larger gradient; deterministic.
    torch.manual_seed(12)
    n_out = out_grid[0] * out_grid[1]
    g = torch.randn(1, 2, 24, n_out, device=DEVICE).transpose(2, 3)  # (B, T, N, D), features not unit-stride
    rows = {"row_kernel": 1}
    default = rs._launch_bwd(g, *in_grid, *out_grid)
    whole = rs._launch_bwd(g, *in_grid, *out_grid, tune=rows)
    assert_rel_close(whole, default, 1e-6, "row form")
    assert torch.equal(rs._launch_bwd(g, *in_grid, *out_grid, tune=rows), whole)
    into = torch.full_like(whole, float("nan"))
    rs._launch_bwd(g[:, :1], *in_grid, *out_grid, out=into[:, :1], tune=rows)
    rs._launch_bwd(g[:, 1:], *in_grid, *out_grid, out=into[:, 1:], tune=rows)
    assert torch.equal(into, whole)
    flat = torch.randn(1, 1, 1, 24, device=DEVICE).expand(1, 2, n_out, 24)  # one value per token: stride 0
    assert_rel_close(rs._launch_bwd(flat, *in_grid, *out_grid, tune=rows),
                     rs._launch_bwd(flat.contiguous(), *in_grid, *out_grid), 1e-6, "stride 0")


def test_row_form_settings_and_their_limits():
    # wan480's grids: whole 52-token rows as 64 lanes gathering from 37 output columns (64 lanes),
    # 32 features per block; a tile's columns follow its block_n, and are at least one per thread (a
    # narrow grid's). Refused: another row_kernel value, tiles that would gather from more than 256
    # output columns (300 -> 600 columns in 512-token tiles) and tokens touching more than 8 (20 -> 200
    # columns: up to 21).
    plan = rs.bwd_plan((30, 52), (37, 37), 1536, {"row_kernel": 1})
    assert (plan["row_kernel"], plan["block_n"], plan["v_pad"], plan["block_d"], plan["d_blocks"]) == \
        (True, 64, 64, 32, 1)
    assert rs.bwd_plan((30, 52), (37, 37), 1536, {"row_kernel": 1, "block_n": 16})["v_pad"] == 16
    default = rs.bwd_plan((30, 52), (37, 37), 1536)
    assert (default["row_kernel"], default["v_pad"], default["d_blocks"]) == (False, 0, 1)
    assert (default["block_n"], default["block_d"], default["num_warps"]) == rs.bwd_settings(30 * 52, 1536)
    with pytest.raises(ValueError, match="row_kernel"):
        rs.bwd_plan((30, 52), (37, 37), 1536, {"row_kernel": 2})
    narrow = rs.bwd_plan((4, 5), (1, 1), 40, {"row_kernel": 1})  # one output column: 1 lane would do
    assert narrow["v_pad"] * narrow["block_d"] >= 32 * narrow["num_warps"]
    with pytest.raises(ValueError, match="at most 256 output columns per tile"):
        rs.bwd_plan((1, 300), (1, 600), 64, {"row_kernel": 1, "block_n": 512})
    with pytest.raises(ValueError, match="at most 8 output columns per token"):
        rs.bwd_plan((1, 20), (1, 200), 64, {"row_kernel": 1, "block_n": 1})


def test_row_form_propagates_nan_as_the_default_form_does():
    # A NaN in one resampled-grid element reaches the input tokens whose taps touch it, and no others.
    torch.manual_seed(13)
    g = torch.randn(1, 2, 7 * 7, 6, device=DEVICE)
    g[0, 1, 10, 2] = float("nan")
    default = rs._launch_bwd(g, 6, 10, 7, 7)
    rows = rs._launch_bwd(g, 6, 10, 7, 7, tune={"row_kernel": 1, "block_n": 4})
    assert rows.isnan().any() and torch.equal(rows.isnan(), default.isnan())
    ok = ~default.isnan()
    assert_rel_close(rows[ok], default[ok], 1e-6, "finite elements")
