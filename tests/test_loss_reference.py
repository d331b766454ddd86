"""Tier 1: the torch backend of crepa_loss against SPEC, through an independent loop implementation."""
import math
import os

import numpy as np
import pytest
import torch

from crepa_kernels import crepa_loss

# --------------------------------------------------------------------------------------------------
# An independent reading of SPEC sections 1-5: explicit loops, its own interpolation, float64.
# --------------------------------------------------------------------------------------------------


def _axis_taps(n_in, n_out):
    """SPEC 2: for each output index, (i0, i1, weight of i1) with align_corners=False."""
    taps = []
    for j in range(n_out):
        src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i0 = min(i0, n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        taps.append((i0, i1, src - i0))
    return taps


def _interp_grid(x, in_grid, out_grid):
    """x: (N, D) row-major tokens of in_grid -> (h'*w', D)."""
    h, w = in_grid
    oh, ow = out_grid
    g = x.reshape(h, w, -1)
    ty, tx = _axis_taps(h, oh), _axis_taps(w, ow)
    rows = []
    for (y0, y1, ly) in ty:
        for (x0, x1, lx) in tx:
            v = (1 - ly) * ((1 - lx) * g[y0, x0] + lx * g[y0, x1]) + ly * ((1 - lx) * g[y1, x0] + lx * g[y1, x1])
            rows.append(v)
    return torch.stack(rows)


def _is_square(n):
    s = math.isqrt(n)
    return s * s == n


def loop_crepa(P, Fe, *, d=1, tau=1.0, cumulative=False, nns=False, nbf=True, spatial_align=True,
               pgrid=None, fgrid=None, weight=1.0):
    P, Fe = P.double(), Fe.double()
    if P.ndim == 3:
        P = P.unsqueeze(2)
    if Fe.ndim == 3:
        Fe = Fe.unsqueeze(2)
    B, T, N, _ = P.shape
    Tf, Nf = Fe.shape[1], Fe.shape[2]
    # 1. temporal
    if T != Tf:
        tl, ts = max(T, Tf), min(T, Tf)
        idx = [int(math.floor(v)) for v in torch.linspace(0, tl - 1, ts).tolist()]
        if Tf > T:
            Fe = Fe[:, idx]
        else:
            P = P[:, idx]
    T = P.shape[1]

    # 2. tokens
    def per_frame(X, fn):
        return torch.stack([torch.stack([fn(X[b, t]) for t in range(X.shape[1])]) for b in range(X.shape[0])])

    grid_mode = pgrid is not None or fgrid is not None
    if grid_mode:
        gp = pgrid or (math.isqrt(N), math.isqrt(N))
        gf = fgrid or (math.isqrt(Nf), math.isqrt(Nf))
        if gp != gf:
            if not spatial_align:
                P, Fe = P.mean(2, keepdim=True), Fe.mean(2, keepdim=True)
            elif N <= Nf:
                Fe = per_frame(Fe, lambda x: _interp_grid(x, gf, gp))
            else:
                P = per_frame(P, lambda x: _interp_grid(x, gp, gf))
    elif N != Nf:
        if not spatial_align:
            P, Fe = P.mean(2, keepdim=True), Fe.mean(2, keepdim=True)
        else:
            M = min(N, Nf)

            def to_m(X):
                n = X.shape[2]
                if n == M:
                    return X
                if _is_square(n) and _is_square(M):
                    s, t = math.isqrt(n), math.isqrt(M)
                    return per_frame(X, lambda x: _interp_grid(x, (s, s), (t, t)))
                return per_frame(X, lambda x: _interp_grid(x, (1, n), (1, M)))

            P, Fe = to_m(P), to_m(Fe)

    # 3-4. cosine per token, mean over tokens, weighted neighbours
    def unit(v):
        return v / torch.linalg.vector_norm(v).clamp_min(1e-12)

    M = P.shape[2]

    def sim(b, t, u):
        return sum(torch.dot(unit(P[b, t, n]), unit(Fe[b, u, n])) for n in range(M)) / M

    dd = min(d, T - 1)
    K = [] if dd <= 0 else (list(range(1, dd + 1)) if cumulative else [dd])
    total = [[None] * T for _ in range(B)]
    selfs = [[None] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            s = sim(b, t, t)
            selfs[b][t] = s
            acc, wsum = s, 1.0
            for k in K:
                wk = math.exp(-k / tau)
                for u in (t - k, t + k):
                    if 0 <= u < T:
                        acc = acc + wk * sim(b, t, u)
                        wsum += wk
            total[b][t] = acc / wsum if nns else acc
    total = torch.stack([torch.stack(r) for r in total])
    selfs = torch.stack([torch.stack(r) for r in selfs])
    per_video = total.sum(1) / (T if nbf else 1)
    return -weight * per_video.mean(), total, selfs


# --------------------------------------------------------------------------------------------------


def test_spec_worked_example():
    p = torch.ones(1, 3, 4, 5)
    f = torch.ones(1, 3, 4, 5)
    out = crepa_loss(p, f, adjacent_distance=1, adjacent_tau=1.0, weight=0.5, backend="torch")
    e = math.exp(-1)
    assert out.loss.item() == pytest.approx(-0.5 * (3 + 4 * e) / 3, abs=1e-6)
    assert torch.allclose(out.alignment, torch.tensor([[1 + e, 1 + 2 * e, 1 + e]]), atol=1e-6)
    assert torch.allclose(out.self_similarity, torch.ones(1, 3), atol=1e-6)


CASES = [
    # (name, P shape, F shape, kwargs)
    ("same", (2, 4, 9, 6), (2, 4, 9, 6), {}),
    ("square_down_features", (1, 3, 4, 5), (1, 3, 9, 5), {}),
    ("square_down_projected", (1, 3, 16, 5), (1, 3, 9, 5), {}),
    ("nonsquare_linear", (1, 3, 6, 5), (1, 3, 9, 5), {}),
    ("nonsquare_both", (2, 2, 10, 3), (2, 2, 7, 3), {}),
    ("t_mismatch_features_longer", (1, 3, 4, 4), (1, 9, 4, 4), {}),
    ("t_mismatch_projected_longer", (1, 7, 4, 4), (1, 3, 4, 4), {}),
    ("d0", (1, 4, 4, 3), (1, 4, 4, 3), {"d": 0}),
    ("d2", (1, 5, 4, 3), (1, 5, 4, 3), {"d": 2, "tau": 0.7}),
    ("d3_clamped", (1, 3, 4, 3), (1, 3, 4, 3), {"d": 3}),
    ("cumulative", (1, 5, 4, 3), (1, 5, 4, 3), {"d": 3, "cumulative": True, "tau": 2.0}),
    ("cumulative_clamped", (1, 3, 4, 3), (1, 3, 4, 3), {"d": 3, "cumulative": True}),
    ("neighbour_sum", (2, 4, 4, 3), (2, 4, 4, 3), {"d": 2, "cumulative": True, "nns": True}),
    ("no_frame_norm", (1, 4, 4, 3), (1, 4, 4, 3), {"nbf": False}),
    ("pooling", (1, 3, 6, 4), (1, 3, 9, 4), {"spatial_align": False}),
    ("single_frame", (2, 1, 4, 3), (2, 1, 4, 3), {"d": 2}),
    ("three_dim", (2, 3, 5), (2, 3, 5), {}),
    ("grid_mode", (1, 3, 6, 4), (1, 3, 9, 4), {"pgrid": (2, 3)}),
    ("grid_mode_projected_larger", (1, 2, 12, 4), (1, 2, 9, 4), {"pgrid": (3, 4), "fgrid": (3, 3)}),
    ("grid_mode_equal_counts", (1, 2, 6, 4), (1, 2, 6, 4), {"pgrid": (2, 3), "fgrid": (3, 2)}),
    ("grid_mode_pooling", (1, 2, 6, 4), (1, 2, 9, 4), {"pgrid": (2, 3), "spatial_align": False}),
    # pooling needs no layout: the side without a grid may have any token count (SPEC 2)
    ("grid_mode_pooling_nonsquare_features", (1, 2, 6, 4), (1, 2, 12, 4), {"pgrid": (2, 3), "spatial_align": False}),
    ("grid_mode_pooling_nonsquare_projected", (1, 2, 10, 4), (1, 2, 6, 4), {"fgrid": (3, 2), "spatial_align": False}),
    # equal grids: nothing to align, so nothing is pooled either (SPEC 2: N == N_f comes first)
    ("grid_mode_equal_grids_no_pooling", (1, 2, 6, 4), (1, 2, 6, 4),
     {"pgrid": (2, 3), "fgrid": (2, 3), "spatial_align": False}),
    ("weight", (1, 3, 4, 3), (1, 3, 4, 3), {"weight": 0.25}),
]


def _kwargs(kw):
    return dict(
        adjacent_distance=kw.get("d", 1), adjacent_tau=kw.get("tau", 1.0),
        cumulative_neighbors=kw.get("cumulative", False), normalize_neighbour_sum=kw.get("nns", False),
        normalize_by_frames=kw.get("nbf", True), spatial_align=kw.get("spatial_align", True),
        projected_grid=kw.get("pgrid"), features_grid=kw.get("fgrid"), weight=kw.get("weight", 1.0),
    )


@pytest.mark.parametrize("name,ps,fs,kw", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_matches_loop_reference(name, ps, fs, kw):
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    P = torch.randn(ps, generator=g, dtype=torch.float64)
    Fe = torch.randn(fs, generator=g, dtype=torch.float64)
    P32 = P.float().requires_grad_(True)
    F32 = Fe.float().requires_grad_(True)
    out = crepa_loss(P32, F32, backend="torch", **_kwargs(kw))

    P64 = P.clone().requires_grad_(True)
    F64 = Fe.clone().requires_grad_(True)
    ref_loss, ref_total, ref_self = loop_crepa(P64, F64, **kw)

    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5
    assert torch.allclose(out.alignment.double(), ref_total, atol=1e-5, rtol=0)
    assert torch.allclose(out.self_similarity.double(), ref_self, atol=1e-5, rtol=0)

    out.loss.backward()
    ref_loss.backward()
    for got, want in ((P32.grad, P64.grad), (F32.grad, F64.grad)):
        scale = want.abs().max().clamp_min(1e-12)
        assert ((got.double() - want).abs().max() / scale) <= 1e-4


def test_features_get_no_gradient_unless_requested():
    p = torch.randn(1, 3, 4, 5, requires_grad=True)
    f = torch.randn(1, 3, 4, 5)
    crepa_loss(p, f, backend="torch").loss.backward()
    assert p.grad is not None and f.grad is None


@pytest.mark.parametrize("kw", [
    {}, {"adjacent_distance": 2, "cumulative_neighbors": True, "normalize_neighbour_sum": True},
    {"projected_grid": (2, 3)}, {"spatial_align": False},
])
def test_gradcheck_float64(kw):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(1, 3, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    f = torch.randn(1, 4, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: crepa_loss(a, b, backend="torch", **kw).loss, (p, f))


def test_zero_vectors_give_zero_cosine_not_nan():
    p = torch.zeros(1, 2, 3, 4, requires_grad=True)
    f = torch.randn(1, 2, 3, 4)
    out = crepa_loss(p, f, backend="torch")
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(p.grad).all()


def test_a_weight_past_float32_is_accepted_for_float64_inputs():
    # the loss of float64 inputs is computed in float64, where 1e300 is finite: refused only in float32
    p, f = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, 4)
    out = crepa_loss(p, f, weight=1e300, backend="torch")
    assert out.loss.dtype == torch.float64 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(-1e300 * out.alignment.mean().item(), rel=1e-12)


def test_weight_tensor_and_float_agree():
    p, f = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    a = crepa_loss(p, f, weight=0.3, backend="torch").loss
    b = crepa_loss(p, f, weight=torch.tensor(0.3), backend="torch").loss
    assert torch.allclose(a, b)


BAD = [
    ({"projected": "x"}, TypeError, "projected must be a torch.Tensor"),
    ({"projected": torch.ones(1, 2, 3, 4, dtype=torch.int64)}, TypeError, "projected must be a floating-point"),
    ({"features": torch.ones(2, 3)}, ValueError, "features must be (B, T, N, D)"),
    ({"features": torch.ones(2, 2, 3, 4)}, ValueError, "batch sizes differ"),
    ({"features": torch.ones(1, 2, 3, 5)}, ValueError, "feature dims differ"),
    ({"projected": torch.ones(1, 0, 3, 4)}, ValueError, "projected has zero frame"),
    ({"features": torch.ones(1, 2, 0, 4)}, ValueError, "features has zero token"),
    ({"projected_grid": (2, 2)}, ValueError, "projected_grid=(2, 2) describes 4 tokens"),
    ({"features_grid": (3, "a")}, ValueError, "features_grid must be a (height, width) pair"),
    ({"projected": torch.ones(1, 2, 6, 4), "features_grid": (1, 3)}, ValueError, "projected_grid is required"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"adjacent_distance": -1}, ValueError, "adjacent_distance must be a non-negative int"),
    ({"adjacent_distance": 1.5}, ValueError, "adjacent_distance must be a non-negative int"),
    ({"adjacent_tau": 0.0}, ValueError, "adjacent_tau must be a positive finite number"),
    ({"adjacent_tau": float("inf")}, ValueError, "adjacent_tau must be a positive finite number"),
    ({"weight": float("nan")}, ValueError, "weight must be a finite number"),
    ({"weight": "1"}, ValueError, "weight must be a finite number, got '1'"),
    ({"weight": 1e300}, ValueError, "weight must be finite in float32, the dtype the loss is computed in"),
    ({"weight": -4e38}, ValueError, "(|weight| <= 3.40282e+38), got -4e+38"),
    ({"weight": 10 ** 400}, ValueError, "weight must be a finite number, got 1000"),
    ({"adjacent_tau": "1.0"}, ValueError, "adjacent_tau must be a positive finite number, got '1.0'"),
    ({"adjacent_tau": np.True_}, ValueError, "adjacent_tau must be a positive finite number, got np.True_"),
    ({"adjacent_distance": np.True_}, ValueError, "adjacent_distance must be a non-negative int, got np.True_"),
    ({"adjacent_distance": np.int64(-1)}, ValueError, "adjacent_distance must be a non-negative int"),
    ({"weight": torch.ones(2)}, ValueError, "weight must be a float or a one-element"),
    ({"features": torch.ones(1, 2, 3, 4, device="meta")}, ValueError, "features is on the meta device"),
    ({"projected": torch.full((1, 2, 3, 4), float("nan")), "check_finite": True}, ValueError, "projected holds NaN"),
]


@pytest.mark.parametrize("override,exc,msg", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_errors(override, exc, msg):
    args = {"projected": torch.ones(1, 2, 3, 4), "features": torch.ones(1, 2, 3, 4)}
    args.update(override)
    p, f = args.pop("projected"), args.pop("features")
    with pytest.raises(exc) as e:
        crepa_loss(p, f, **args)
    assert msg in str(e.value)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        crepa_loss(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), backend="triton")


def test_info_and_benchmark_environment_list_the_switches_set(monkeypatch):
    import crepa_kernels
    from crepa_kernels.benchmark import environment

    for k in [k for k in os.environ if k.startswith("CREPA_KERNELS_")]:
        monkeypatch.delenv(k)
    assert crepa_kernels.info()["switches"] == {}
    monkeypatch.setenv("CREPA_KERNELS_FAST_LAUNCH", "1")
    monkeypatch.setenv("CREPA_KERNELS_BWD_WINDOW_MIB", "64")
    want = {"CREPA_KERNELS_BWD_WINDOW_MIB": "64", "CREPA_KERNELS_FAST_LAUNCH": "1"}
    assert crepa_kernels.info()["switches"] == want
    assert environment("cpu")["switches"] == want
    monkeypatch.setenv("CREPA_KERNELS_FAST_LAUNCH", "0")  # results say which launch path ran
    off = "off (CREPA_KERNELS_FAST_LAUNCH=0)"
    assert environment("cpu")["fast_launch"] == crepa_kernels.info()["fast_launch"] == off


def test_auto_picks_torch_on_cpu_and_info_says_why():
    import crepa_kernels

    crepa_loss(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    last = crepa_kernels.info()["last_call"]
    assert last["backend"] == "torch" and "cpu" in last["reason"]


def test_switches_take_numpy_and_int_bools():
    p, f = torch.randn(1, 3, 6, 4), torch.randn(1, 3, 9, 4)
    want = crepa_loss(p, f, spatial_align=False, normalize_by_frames=False, backend="torch").loss
    for off in (np.False_, 0):
        got = crepa_loss(p, f, spatial_align=off, normalize_by_frames=off, backend="torch").loss
        assert torch.equal(got, want)


def test_a_numpy_integer_distance_is_the_int():
    p, f = torch.randn(1, 5, 3, 4), torch.randn(1, 5, 3, 4)
    want = crepa_loss(p, f, adjacent_distance=2, cumulative_neighbors=True, backend="torch").loss
    got = crepa_loss(p, f, adjacent_distance=np.int64(2), cumulative_neighbors=True, backend="torch").loss
    assert torch.equal(got, want)
