"""Numerical edge cases of crepa_loss on both backends: magnitude, zeros, degenerate shapes, non-finite input.

Each expectation is derived here from SPEC sections 1-5 (explicit fp64 arithmetic or a closed form),
and the torch and Triton backends are also held against each other. The Triton backend runs through
its interpreter when no GPU is present, so shapes stay tiny.
"""
import math

import pytest
import torch

from crepa_kernels import CrepaConfig, CrepaLoss, crepa_loss

# NaN / Inf inputs make the interpreter's numpy arithmetic warn; the tests assert the outcome instead.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------------------------
# Independent fp64 reading of SPEC 3-5 for inputs that need no alignment (same T and N on both sides).
# --------------------------------------------------------------------------------------------------


def _cos(a, b):
    """SPEC 3: <a / max(|a|, eps), b / max(|b|, eps)> in fp64."""
    a, b = a.double(), b.double()
    return float(a @ b) / (max(float(a.norm()), 1e-12) * max(float(b.norm()), 1e-12))


def _offsets(distance, T, cumulative):
    d = min(distance, T - 1)
    return [] if d <= 0 else (list(range(1, d + 1)) if cumulative else [d])


def _used_weight(t, T, distance, tau, cumulative):
    """Sum of the w_k SPEC 4 uses at frame t (the neighbours t +- k inside the clip)."""
    return sum(math.exp(-k / tau) * ((t - k >= 0) + (t + k < T)) for k in _offsets(distance, T, cumulative))


def explicit(P, Fe, *, distance=1, tau=1.0, cumulative=False, nns=False, nbf=True, weight=1.0):
    """(loss, total, self_sim) as fp64 tensors, by loops; P and Fe are (B, T, N, D) of equal shape."""
    B, T, N, _ = P.shape
    P, Fe = P.detach().cpu(), Fe.detach().cpu()

    def sim(b, t, u):
        return sum(_cos(P[b, t, n], Fe[b, u, n]) for n in range(N)) / N

    total = torch.zeros(B, T, dtype=torch.float64)
    selfs = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            selfs[b, t] = sim(b, t, t)
            acc = selfs[b, t].item()
            for k in _offsets(distance, T, cumulative):
                for u in (t - k, t + k):
                    if 0 <= u < T:
                        acc += math.exp(-k / tau) * sim(b, t, u)
            if nns:
                acc /= 1.0 + _used_weight(t, T, distance, tau, cumulative)
            total[b, t] = acc
    per_video = total.sum(1) / (T if nbf else 1)
    return -weight * per_video.mean(), total, selfs


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(DEV, dtype)


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------------------------------
# bf16 inputs of large magnitude
# --------------------------------------------------------------------------------------------------

_OVERFLOW = {
    "torch": "the norm's sum of squares overflows fp32 (|x| > ~1e19): F.normalize divides by inf and every "
             "cosine becomes 0, so the loss is 0 instead of the value of the same inputs in fp64",
    "triton": "the kernel's sum of squares overflows fp32 (|x| > ~1e19): cos = inf / (inf * inf) is NaN, so "
              "the loss and the gradients are NaN",
}


def _magnitude_cases():
    for backend in BACKENDS:
        for mag in (1e4, 1e15, 1e30):
            marks = [pytest.mark.xfail(strict=True, reason=_OVERFLOW[backend])] if mag > 1e19 else []
            yield pytest.param(backend, mag, id=f"{backend}-{mag:g}", marks=marks)


@pytest.mark.parametrize("projected_bf16", [True, False], ids=["both_bf16", "features_bf16"])
@pytest.mark.parametrize("backend,mag", list(_magnitude_cases()))
def test_bf16_large_magnitude(backend, mag, projected_bf16):
    # The bf16 values are exact in fp32 and fp64, so the input rounding is the same for every
    # evaluation below; what is left is fp32 arithmetic (the compute dtype for bf16).
    p = _randn(1, 3, 4, 8, seed=1, scale=mag).bfloat16()
    f = _randn(1, 3, 4, 8, seed=2, scale=mag).bfloat16()
    if not projected_bf16:
        p = p.float()
    kw = dict(adjacent_distance=1, adjacent_tau=1.0)
    p_in = p.detach().requires_grad_(True)
    out = crepa_loss(p_in, f, backend=backend, **kw)
    assert out.loss.dtype == out.alignment.dtype == torch.float32
    assert torch.isfinite(out.loss), out.loss

    truth_p = p.double().requires_grad_(True)
    truth = crepa_loss(truth_p, f.double(), backend="torch", **kw)
    want, *_ = explicit(p, f, distance=1)
    assert abs(truth.loss.item() - want.item()) <= 1e-12  # the fp64 oracle agrees with the loops
    assert abs(out.loss.item() - want.item()) <= 1e-5
    torch.testing.assert_close(out.alignment.double(), truth.alignment, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.self_similarity.double(), truth.self_similarity, atol=1e-5, rtol=0)
    # The fp32 evaluation of the same values on the same backend.
    out32 = crepa_loss(p.float(), f.float(), backend=backend, **kw)
    assert abs(out.loss.item() - out32.loss.item()) <= 1e-6

    (g,) = torch.autograd.grad(out.loss, p_in)
    (g_truth,) = torch.autograd.grad(truth.loss, truth_p)
    assert g.dtype == p.dtype and torch.isfinite(g).all()
    # bf16 gradients keep 8 significant bits: relative 2^-7 of the largest entry.
    assert _rel_err(g, g_truth) <= 2.0 ** -7


# --------------------------------------------------------------------------------------------------
# Zero vectors
# --------------------------------------------------------------------------------------------------


def _with_zeros():
    p = _randn(2, 4, 3, 5, seed=3)
    f = _randn(2, 4, 3, 5, seed=4)
    p[0, 1] = 0.0  # a whole projected frame
    p[1, 2, 0] = 0.0  # one projected token
    f[0, 3] = 0.0  # a whole teacher frame
    f[1, 0, 2] = 0.0  # one teacher token
    return p, f


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_have_cosine_zero(backend):
    p, f = _with_zeros()
    kw = dict(adjacent_distance=2, adjacent_tau=0.8, cumulative_neighbors=True)
    out = crepa_loss(p, f, backend=backend, **kw)
    want_loss, want_total, want_self = explicit(p, f, distance=2, tau=0.8, cumulative=True)
    # Frame 1 of video 0 meets only zero projected vectors: every term is exactly 0.
    assert out.alignment[0, 1].item() == 0.0 and out.self_similarity[0, 1].item() == 0.0
    assert out.self_similarity[0, 3].item() == 0.0
    torch.testing.assert_close(out.alignment.double(), want_total, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.self_similarity.double(), want_self, atol=1e-5, rtol=0)
    assert abs(out.loss.item() - want_loss.item()) <= 1e-5


def test_zero_vector_gradients_are_finite_and_agree():
    p0, f0 = _with_zeros()
    grads = {}
    for backend in BACKENDS:
        p = p0.detach().requires_grad_(True)
        f = f0.detach().requires_grad_(True)
        out = crepa_loss(p, f, backend=backend, adjacent_distance=1)
        grads[backend] = torch.autograd.grad(out.loss, (p, f))
    p64, f64 = p0.double().requires_grad_(True), f0.double().requires_grad_(True)
    truth = torch.autograd.grad(crepa_loss(p64, f64, backend="torch", adjacent_distance=1).loss, (p64, f64))
    for i, x0 in enumerate((p0, f0)):
        zero = (x0 == 0).all(dim=-1, keepdim=True).expand_as(x0)
        for backend in BACKENDS:
            g = grads[backend][i]
            assert torch.isfinite(g).all()
            # Below eps F.normalize is x / eps: the gradient at a zero vector is (dL/dx^) / eps, huge
            # but finite; it and the ordinary gradients are compared on their own scales.
            for part in (zero, ~zero):
                assert _rel_err(g[part], truth[i][part]) <= 1e-4, (backend, i)
        for part in (zero, ~zero):
            assert _rel_err(grads["triton"][i][part], grads["torch"][i][part]) <= 1e-4, i
    # The zero-vector gradient is exactly the fp64 derivation: dL/dp[t, n] = sum of the slot weights
    # times f^[u, n] / eps / (B T N), with L = -mean_b sum_t total / T.
    b, t, n = 1, 2, 0
    B, T, N, _ = p0.shape
    fu = lambda u: f0[b, u, n].double() / f0[b, u, n].double().norm().clamp_min(1e-12)  # noqa: E731
    direction = fu(t) + math.exp(-1) * (fu(t - 1) + fu(t + 1))
    want = -direction / 1e-12 / (B * T * N)
    assert _rel_err(grads["triton"][0][b, t, n], want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_averages_tokens_near_eps(backend):
    # spatial_align off pools differing token counts by their mean; cosine ignores scale, except
    # where F.normalize is linear (norm below eps = 1e-12), where a sum instead of a mean would show.
    # Frame 0's tokens are all 3e-13 (mean norm 5.2e-13 < eps, the sum's 2.1e-12 is not); frame 1's
    # first token is -3e-13 (mean 1.5e-13 per element). The teacher is all ones, so f^ = 1/sqrt(3)
    # per element, and p^ = mean / eps: cos(p_t, f_u) = sum(mean_t) / (eps sqrt(3)) for every u.
    # With d = 1, tau = 1 and two frames each frame has one neighbour: total_t = cos_t (1 + e^-1).
    p = torch.full((1, 2, 4, 3), 3e-13, device=DEV)
    p[0, 1, 0] = -3e-13
    f = torch.ones(1, 2, 3, 3, device=DEV)  # 3 tokens against 4: pooled
    got = crepa_loss(p, f, backend=backend, spatial_align=False).alignment
    cos = torch.tensor([9e-13, 4.5e-13], dtype=torch.float64) / (1e-12 * math.sqrt(3))
    torch.testing.assert_close(got.double().cpu(), (cos * (1 + math.exp(-1))).unsqueeze(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_projected_gives_zero_loss(backend):
    p = torch.zeros(1, 3, 4, 6, device=DEV, requires_grad=True)
    f = _randn(1, 3, 4, 6, seed=5)
    out = crepa_loss(p, f, backend=backend, adjacent_distance=2, cumulative_neighbors=True)
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(out.alignment) == 0 and torch.count_nonzero(out.self_similarity) == 0
    (g,) = torch.autograd.grad(out.loss, p)
    assert torch.isfinite(g).all() and g.abs().max() > 0


# --------------------------------------------------------------------------------------------------
# Degenerate shapes: one frame, one token
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance,cumulative,nns", [(0, False, False), (1, False, True), (3, True, False)])
def test_single_frame(backend, distance, cumulative, nns):
    p, f = _randn(2, 1, 3, 7, seed=6), _randn(2, 1, 3, 7, seed=7)
    out = crepa_loss(p, f, backend=backend, adjacent_distance=distance, cumulative_neighbors=cumulative,
                     normalize_neighbour_sum=nns, weight=0.5)
    # No neighbour exists: total = self = mean_n cos(p[n], f[n]), loss = -0.5 * mean_b self.
    want_self = torch.tensor([[sum(_cos(p[b, 0, n], f[b, 0, n]) for n in range(3)) / 3] for b in range(2)],
                             dtype=torch.float64)
    torch.testing.assert_close(out.self_similarity.double(), want_self, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.alignment, out.self_similarity, atol=0, rtol=0)
    assert abs(out.loss.item() + 0.5 * want_self.mean().item()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_projected_frame_against_many_teacher_frames(backend):
    # SPEC 1: floor(linspace(0, 4, 1)) = [0]: only the first teacher frame is used.
    p, f = _randn(1, 1, 4, 5, seed=8), _randn(1, 5, 4, 5, seed=9)
    out = crepa_loss(p, f, backend=backend)
    _, _, want_self = explicit(p, f[:, :1])
    torch.testing.assert_close(out.self_similarity.double(), want_self, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.alignment, out.self_similarity, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_three_dim_form(backend):
    p3, f3 = _randn(2, 4, 6, seed=10), _randn(2, 4, 6, seed=11)
    out3 = crepa_loss(p3, f3, backend=backend, adjacent_distance=1, adjacent_tau=0.5)
    out4 = crepa_loss(p3.unsqueeze(2), f3.unsqueeze(2), backend=backend, adjacent_distance=1, adjacent_tau=0.5)
    want_loss, want_total, want_self = explicit(p3.unsqueeze(2), f3.unsqueeze(2), distance=1, tau=0.5)
    for out in (out3, out4):
        assert out.alignment.shape == (2, 4)
        torch.testing.assert_close(out.alignment.double(), want_total, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.self_similarity.double(), want_self, atol=1e-6, rtol=0)
        assert abs(out.loss.item() - want_loss.item()) <= 1e-6
    p = p3.detach().requires_grad_(True)
    (g3,) = torch.autograd.grad(crepa_loss(p, f3, backend=backend).loss, p)
    assert g3.shape == p3.shape and torch.isfinite(g3).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_f,spatial_align", [(4, True), (3, True), (3, False), (1, True)])
def test_single_projected_token(backend, n_f, spatial_align):
    p, f = _randn(1, 3, 1, 4, seed=12), _randn(1, 3, n_f, 4, seed=13)
    # What the one projected token meets (SPEC 2, derived by hand):
    # 4 = 2x2 -> 1x1 bilinear: source (0.5, 0.5), the average of the 4 tokens;
    # 3 -> 1 linear: source (0 + 0.5) * 3 - 0.5 = 1.0, exactly token 1;
    # no spatial alignment: the mean over tokens (the single projected token is its own mean).
    if n_f == 1:
        teacher = f
    elif n_f == 3 and spatial_align:
        teacher = f[:, :, 1:2]
    else:
        teacher = f.mean(dim=2, keepdim=True)
    out = crepa_loss(p, f, backend=backend, spatial_align=spatial_align)
    want_loss, want_total, want_self = explicit(p, teacher)
    torch.testing.assert_close(out.alignment.double(), want_total, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.self_similarity.double(), want_self, atol=1e-6, rtol=0)
    assert abs(out.loss.item() - want_loss.item()) <= 1e-6


# --------------------------------------------------------------------------------------------------
# Teacher features identical across frames
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance,cumulative,nns,tau", [
    (1, False, False, 1.0), (2, False, False, 0.7), (3, True, False, 2.0), (2, True, True, 1.3), (9, True, False, 0.4),
    # 1 / tau past the float32 range: every neighbour weight is 0
    (2, True, False, 1e-300), (1, False, True, 1e-40),
])
def test_identical_teacher_frames(backend, distance, cumulative, nns, tau):
    B, T = 2, 5
    p = _randn(B, T, 3, 6, seed=14)
    f = _randn(B, 1, 3, 6, seed=15).expand(B, T, 3, 6)  # also a stride-0 frame dim
    out = crepa_loss(p, f, backend=backend, adjacent_distance=distance, adjacent_tau=tau,
                     cumulative_neighbors=cumulative, normalize_neighbour_sum=nns)
    # sim(t, u) = sim(t, t) for every u, so total[t] = self[t] * (1 + W_t), W_t the weights used at t;
    # with the neighbour-sum normalisation the factor cancels and total = self.
    factor = torch.tensor([1.0 + _used_weight(t, T, distance, tau, cumulative) for t in range(T)],
                          dtype=torch.float64)
    want_self = torch.tensor([[sum(_cos(p[b, t, n], f[b, 0, n]) for n in range(3)) / 3 for t in range(T)]
                              for b in range(B)], dtype=torch.float64)
    want_total = want_self if nns else want_self * factor
    torch.testing.assert_close(out.self_similarity.double(), want_self, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.alignment.double(), want_total, atol=1e-5, rtol=0)
    assert abs(out.loss.item() + want_total.sum(1).div(T).mean().item()) <= 1e-5


# --------------------------------------------------------------------------------------------------
# NaN / Inf: propagate identically, or raise with check_finite
# --------------------------------------------------------------------------------------------------

BAD_VALUES = [float("nan"), float("inf"), float("-inf")]
BAD_IDS = ["nan", "inf", "-inf"]


def _poisoned(where, value):
    p, f = _randn(2, 5, 3, 4, seed=16), _randn(2, 5, 3, 4, seed=17)
    (p if where == "projected" else f)[1, 2, 1, 3] = value
    return p, f


@pytest.mark.parametrize("value", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("where", ["projected", "features"])
def test_non_finite_input_propagates_the_same_way(where, value):
    p, f = _poisoned(where, value)
    # Adjacent mode with d = 2: frame t meets teacher frames t and t +- 2.
    outs = {b: crepa_loss(p, f, backend=b, adjacent_distance=2) for b in BACKENDS}
    want_total = torch.zeros(2, 5, dtype=torch.bool)
    want_self = torch.zeros(2, 5, dtype=torch.bool)
    want_self[1, 2] = True
    if where == "projected":  # one token of p[1, 2] is NaN after normalising: every term of frame 2
        want_total[1, 2] = True
    else:  # f[1, 2] reaches frames 2 (self) and 0, 4 (offset 2)
        want_total[1, [0, 2, 4]] = True
    for backend, out in outs.items():
        assert torch.isnan(out.loss), backend
        assert torch.equal(torch.isnan(out.alignment).cpu(), want_total), backend
        assert torch.equal(torch.isnan(out.self_similarity).cpu(), want_self), backend
        finite = ~want_total
        torch.testing.assert_close(out.alignment[finite], outs["torch"].alignment[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("grids", [None, ((3, 1), (2, 2))], ids=["same_grid", "fused_resample"])
@pytest.mark.parametrize("features_grad", [False, True], ids=["p_grad", "p_and_f_grad"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("where", ["projected", "features"])
def test_non_finite_input_reaches_the_same_gradients(where, value, features_grad, grids):
    # F.normalize's clamp_min keeps a NaN norm, so every gradient element of a token that meets a
    # non-finite element is NaN on the torch backend; the kernels' eps clamps must keep it too (a
    # clamp that drops the NaN divides by eps instead and gives finite ~1e10 values beside one NaN).
    p, f = _poisoned(where, value)
    if grids is not None:  # p's 3 tokens on a 3 x 1 grid, resampled in the kernels to the teacher's 2 x 2
        f = torch.cat([f, f[:, :, :1]], dim=2)
    kw = dict(adjacent_distance=2, **({} if grids is None else dict(projected_grid=grids[0], features_grid=grids[1])))
    grads = {}
    for backend in BACKENDS:
        pl = p.clone().requires_grad_(True)
        fl = f.clone().requires_grad_(features_grad)
        crepa_loss(pl, fl, backend=backend, **kw).loss.backward()
        grads[backend] = [pl.grad] + ([fl.grad] if features_grad else [])
    for i, (got, want) in enumerate(zip(grads["triton"], grads["torch"])):
        assert want.isnan().any(), i  # the case poisons this gradient
        assert got.isnan().nonzero().tolist() == want.isnan().nonzero().tolist(), i
        ok = ~want.isnan()
        torch.testing.assert_close(got[ok], want[ok], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("where", ["projected", "features"])
def test_check_finite_names_the_bad_input(backend, where, value):
    p, f = _poisoned(where, value)
    other = "features" if where == "projected" else "projected"
    with pytest.raises(ValueError) as e:
        crepa_loss(p, f, backend=backend, check_finite=True)
    assert where in str(e.value) and other not in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", BAD_VALUES, ids=BAD_IDS)
def test_check_finite_covers_a_tensor_weight(backend, value):
    p, f = _randn(1, 3, 4, 5, seed=18), _randn(1, 3, 4, 5, seed=19)
    with pytest.raises(ValueError, match="weight holds NaN or Inf values"):
        crepa_loss(p, f, backend=backend, weight=torch.tensor(value), check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_passes_finite_input_unchanged(backend):
    p, f = _randn(1, 3, 4, 5, seed=18), _randn(1, 3, 4, 5, seed=19)
    a = crepa_loss(p, f, backend=backend, check_finite=True)
    b = crepa_loss(p, f, backend=backend)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.alignment, b.alignment)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden_states", "frame_features"])
def test_module_check_finite(backend, where):
    torch.manual_seed(0)
    hidden = _randn(1, 3, 4, 6, seed=20)
    feats = _randn(1, 3, 4, 5, seed=21)
    if where == "hidden_states":
        hidden[0, 1, 2, 0] = float("nan")  # LayerNorm would spread it over the projected token
    else:
        feats[0, 2, 3, 4] = float("inf")
    checked = CrepaLoss(CrepaConfig(enabled=True, block_index=0, check_finite=True, backend=backend),
                        hidden_size=6, encoder_dim=5).to(DEV)
    with pytest.raises(ValueError) as e:
        checked(hidden, feats, step=0)
    assert str(e.value).startswith(f"{where} holds NaN or Inf")  # the module's argument names
    # Without the check the same input yields a NaN loss instead of an error.
    unchecked = CrepaLoss(CrepaConfig(enabled=True, block_index=0, backend=backend), hidden_size=6, encoder_dim=5)
    unchecked.load_state_dict(checked.state_dict())
    loss, _ = unchecked.to(DEV)(hidden, feats, step=0)
    assert torch.isnan(loss)
