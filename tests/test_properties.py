"""Property tests: the Triton backend of crepa_loss equals the torch backend over random small cases.

Hypothesis draws the shapes (frame and token mismatches both ways, square and non-square token
counts, optional (h, w) grids), the options of SPEC sections 2-5, the dtype and the memory layout;
the torch backend (held against an independent loop implementation in test_loss_reference.py) is the
oracle for the loss, the two logged (B, T) tensors and the gradients. A second property holds
`resample_tokens` against `F.interpolate` on random grids.

Runs are derandomised (the same examples every time) and small: the Triton interpreter executes one
program at a time in Python.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crepa_kernels import crepa_loss
from crepa_kernels.ops.resample import resample_tokens

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# (forward abs tolerance, gradient tolerance relative to the largest reference entry)
TOLS = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-8)}
SQUARES = [1, 4, 9]
NON_SQUARES = [2, 3, 5, 6, 8]


def _factorizations(n):
    return [(h, n // h) for h in range(1, n + 1) if n % h == 0]


BOOL = st.sampled_from([False, True])  # uniform (st.booleans() leans to False when derandomised)


@st.composite
def _tokens_and_grids(draw):
    """(N, N_f, projected_grid, features_grid) that crepa_loss accepts.

    Grid mode needs a layout for each side: a side without a grid must then be a perfect square."""
    n = draw(st.sampled_from(NON_SQUARES + SQUARES))
    n_f = draw(st.sampled_from(SQUARES + NON_SQUARES + [n]))
    if draw(st.sampled_from(["compatible mode", "grid mode"])) == "compatible mode":
        return n, n_f, None, None
    grids = []
    for count in (n, n_f):
        required = math.isqrt(count) ** 2 != count
        give = required or draw(BOOL)
        grids.append(draw(st.sampled_from(_factorizations(count))) if give else None)
    if grids == [None, None]:  # both squares and neither drawn: give the projected side one
        grids[0] = draw(st.sampled_from(_factorizations(n)))
    return n, n_f, grids[0], grids[1]


@st.composite
def crepa_cases(draw):
    n, n_f, pgrid, fgrid = draw(_tokens_and_grids())
    # Lists lead with the interesting values: derandomised generation favours a list's first entry.
    relation = draw(st.sampled_from(["features longer", "projected longer", "equal"]))
    if relation == "equal":
        t = t_f = draw(st.sampled_from([4, 2, 5, 3, 1]))
    else:
        short = draw(st.sampled_from([3, 2, 4, 1]))
        long = draw(st.sampled_from(range(short + 1, 6)))
        t, t_f = (short, long) if relation == "features longer" else (long, short)
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        B=draw(st.sampled_from([1, 2])),
        T=t,
        T_f=t_f,
        N=n,
        N_f=n_f,
        D=draw(st.sampled_from([7, 40, 1, 2, 3, 13, 24, 32, 33])),
        kwargs=dict(
            projected_grid=pgrid,
            features_grid=fgrid,
            spatial_align=draw(BOOL),
            adjacent_distance=draw(st.sampled_from([1, 2, 4, 3, 0])),
            adjacent_tau=draw(st.floats(0.2, 3.0, allow_nan=False, allow_infinity=False)),
            cumulative_neighbors=draw(BOOL),
            normalize_neighbour_sum=draw(BOOL),
            normalize_by_frames=draw(BOOL),
            weight=draw(st.sampled_from([1.0, 0.5, 2.0])),
        ),
        features_grad=draw(BOOL),
        transposed=draw(BOOL),  # (B, T, D, N) storage viewed as (B, T, N, D)
        objective=draw(st.sampled_from(["loss", "mixed"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _wide_window_case(dtype, objective):
    # Cumulative d = 4 on 5 frames gives 9 neighbour slots; with D = 40 the feature block (sized from
    # slots x tokens) is smaller than D in the backward (fp32 and fp64) and the forward (fp64), so
    # their loops over D take several steps.
    return dict(
        dtype=dtype, B=2, T=5, T_f=5, N=4, N_f=4, D=40,
        kwargs=dict(projected_grid=None, features_grid=None, spatial_align=True, adjacent_distance=4,
                    adjacent_tau=1.5, cumulative_neighbors=True, normalize_neighbour_sum=True,
                    normalize_by_frames=True, weight=1.0),
        features_grad=True, transposed=False, objective=objective, seed=7,
    )


def _make(shape, dtype, gen, transposed):
    """Random raw vectors whose entries keep |x| >= 0.25 (gradients scale as 1/|x|; zero vectors are
    covered in test_numerics.py). With D = 1 the sign is one per tensor, so that resampling and
    pooling cannot average a token down to (almost) zero."""
    b, t, n, d = shape
    mag = 0.25 + 1.25 * torch.rand(shape, generator=gen, dtype=torch.float64)
    if d == 1:
        sign = 1.0 if torch.rand((), generator=gen).item() < 0.5 else -1.0
    else:
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).to(DEV, dtype)
    if transposed:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        assert d == 1 or n == 1 or not x.is_contiguous()
    return x


def _assert_grad_close(got, want, rtol, name, floor=1e-30):
    assert got is not None and want is not None, name
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), floor)
    assert err <= rtol * scale, f"{name}: max err {err:.3e}, scale {scale:.3e}"


@settings(max_examples=45, **SETTINGS)
@given(case=crepa_cases())
@example(case=_wide_window_case(torch.float32, "mixed"))
@example(case=_wide_window_case(torch.float64, "loss"))
def test_triton_backend_matches_torch_backend(case):
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    p_shape = (case["B"], case["T"], case["N"], case["D"])
    f_shape = (case["B"], case["T_f"], case["N_f"], case["D"])
    p0 = _make(p_shape, dtype, gen, case["transposed"])
    f0 = _make(f_shape, dtype, gen, case["transposed"])
    kwargs = case["kwargs"]

    results = {}
    for backend in ("torch", "triton"):
        p = p0.detach().requires_grad_(True)
        f = f0.detach().requires_grad_(case["features_grad"])
        out = crepa_loss(p, f, backend=backend, **kwargs)
        results[backend] = (out, p, f)

    ref, tri = results["torch"][0], results["triton"][0]
    atol, rtol = TOLS[dtype]
    t_aligned = min(case["T"], case["T_f"])
    for name in ("alignment", "self_similarity"):
        a, b = getattr(tri, name), getattr(ref, name)
        assert a.shape == b.shape == (case["B"], t_aligned), name
        assert a.dtype == b.dtype == dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
    assert tri.loss.shape == ref.loss.shape == ()
    assert abs(tri.loss.item() - ref.loss.item()) <= atol

    # Backward: the scalar loss (its gradient reaches the kernels expanded, stride 0), or the loss
    # plus random weightings of both logged tensors (dense gradients into both outputs).
    r = torch.Generator().manual_seed(case["seed"] + 1)
    g_total = torch.randn(ref.alignment.shape, generator=r, dtype=torch.float64).to(DEV, dtype)
    g_self = torch.randn(ref.alignment.shape, generator=r, dtype=torch.float64).to(DEV, dtype)
    grads = {}
    for backend, (out, p, f) in results.items():
        objective = out.loss
        if case["objective"] == "mixed":
            objective = objective + (out.alignment * g_total).sum() + (out.self_similarity * g_self).sum()
        inputs = (p, f) if case["features_grad"] else (p,)
        grads[backend] = torch.autograd.grad(objective, inputs)
    # With D = 1 every cosine is +-1 and every true gradient 0: both sides hold rounding noise only,
    # so the error is measured against a floor of the order of the un-projected gradient instead.
    floor = 1e-1 if case["D"] == 1 else 1e-30
    for i, name in enumerate(["projected", "features"][: len(grads["torch"])]):
        _assert_grad_close(grads["triton"][i], grads["torch"][i], rtol, f"grad {name}", floor)


# --------------------------------------------------------------------------------------------------
# resample_tokens against F.interpolate on random grids
# --------------------------------------------------------------------------------------------------


def _interpolate(x, in_grid, out_grid):
    b, t, _, d = x.shape
    img = x.reshape(b * t, in_grid[0], in_grid[1], d).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=tuple(out_grid), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, t, out_grid[0] * out_grid[1], d)


grid_side = st.sampled_from(range(1, 6))


@settings(max_examples=20, **SETTINGS)
@given(
    in_grid=st.tuples(grid_side, grid_side),
    out_grid=st.tuples(grid_side, grid_side),
    B=st.sampled_from([1, 2]),
    T=st.sampled_from([1, 2]),
    D=st.sampled_from([1, 2, 3, 5, 17, 40]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    transposed=BOOL,
    seed=st.integers(0, 2**16),
)
def test_resample_tokens_matches_interpolate(in_grid, out_grid, B, T, D, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    n = in_grid[0] * in_grid[1]
    x = torch.randn(B, T, n, D, generator=gen, dtype=torch.float64).to(DEV, dtype)
    if transposed:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    x.requires_grad_(True)
    y = resample_tokens(x, in_grid, out_grid)
    ref = _interpolate(x, in_grid, out_grid)
    assert y.shape == ref.shape == (B, T, out_grid[0] * out_grid[1], D)
    assert y.dtype == dtype
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=0)

    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEV, dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    _assert_grad_close(gx, gr, rtol, "grad x")
    # Linear in x: the adjoint identity <R x, g> = <x, R^T g> holds for the pair the kernels compute.
    lhs = (y.double() * g.double()).sum().item()
    rhs = (x.detach().double() * gx.double()).sum().item()
    assert lhs == pytest.approx(rhs, rel=1e-4 if dtype == torch.float32 else 1e-10, abs=1e-4)
