"""Tests of the fused neighbour-cosine op (crepa_kernels/ops/similarity.py) against a plain torch oracle.

Tier 2 runs the Triton kernels through the interpreter on tiny shapes; tier 3 (`gpu`) covers low
precision, torch.compile, determinism at size and a case whose offsets need 64 bits.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from crepa_kernels.ops.similarity import _launch_backward, _launch_forward, neighbour_cosine, num_slots
from crepa_kernels.ops import utils

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# The fused-resample backward paths: the two-pass default, the banded one-pass kernel
# (CREPA_KERNELS_MERGED_BWD=1) and its row form (CREPA_KERNELS_ROW_BWD=1).
BACKWARDS = ["two_pass", "merged", "rows"]


def _select_backward(monkeypatch, mode):
    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1" if mode == "merged" else "0")
    monkeypatch.setenv("CREPA_KERNELS_ROW_BWD", "1" if mode == "rows" else "0")


# ----------------------------------------------------------------------------------------------------
# Oracle: F.normalize, then one shifted dot product per offset and direction (SPEC sections 3-4).
# ----------------------------------------------------------------------------------------------------


def oracle(p, f, *, distance, tau, cumulative, normalize_neighbour_sum, block_d=None):
    T = p.shape[1]
    ph, fh = F.normalize(p, dim=-1), F.normalize(f, dim=-1)
    self_tok = (ph * fh).sum(-1)
    d = min(distance, T - 1)
    ks = [] if d <= 0 else (list(range(1, d + 1)) if cumulative else [d])
    total = self_tok
    den = [1.0] * T
    for k in ks:
        w = math.exp(-k / tau)
        ahead = (ph[:, : T - k] * fh[:, k:]).sum(-1)  # frame t with t + k
        behind = (ph[:, k:] * fh[:, : T - k]).sum(-1)  # frame t with t - k
        total = total + w * (F.pad(ahead, (0, 0, 0, k)) + F.pad(behind, (0, 0, k, 0)))
        for t in range(T):
            den[t] += w * ((t + k < T) + (t - k >= 0))
    if normalize_neighbour_sum:
        total = total / torch.tensor(den, dtype=total.dtype, device=total.device)[None, :, None]
    return total, self_tok


def _inputs(shape, dtype, *, seed=0, grad_f=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64).to(DEV, dtype).requires_grad_(True)
    f = torch.randn(shape, generator=g, dtype=torch.float64).to(DEV, dtype).requires_grad_(grad_f)
    return p, f


def _tols(dtype):
    # (forward atol, gradient rtol)
    return (1e-5, 1e-4) if dtype == torch.float32 else (1e-11, 1e-9)


def _assert_grad_close(actual, expected, rtol):
    # Relative to the largest gradient, with a floor: with D = 1 the true gradient is 0 and both sides
    # hold only rounding noise.
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-2))


def _check(p, f, *, leaves=None, dtype=torch.float32, seed=1, **kw):
    """Forward and gradients (random upstream gradients for both outputs) against the oracle."""
    leaves = leaves if leaves is not None else [x for x in (p, f) if x.requires_grad]
    atol, rtol = _tols(dtype)
    total, self_tok = neighbour_cosine(p, f, **kw)
    ref_total, ref_self = oracle(p, f, **kw)
    assert total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert total.shape == self_tok.shape == p.shape[:3]
    torch.testing.assert_close(total, ref_total, rtol=0, atol=atol)
    torch.testing.assert_close(self_tok, ref_self, rtol=0, atol=atol)
    g = torch.Generator().manual_seed(seed)
    g_total = torch.randn(total.shape, generator=g, dtype=torch.float64).to(DEV, total.dtype)
    g_self = torch.randn(total.shape, generator=g, dtype=torch.float64).to(DEV, total.dtype)
    got = torch.autograd.grad((total * g_total).sum() + (self_tok * g_self).sum(), leaves)
    want = torch.autograd.grad((ref_total * g_total).sum() + (ref_self * g_self).sum(), leaves)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        _assert_grad_close(a, b, rtol)


# ----------------------------------------------------------------------------------------------------
# Tier 2: interpreter (or GPU when present), tiny shapes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_oracle(dtype, cumulative, normalize):
    p, f = _inputs((2, 5, 3, 20), dtype)
    _check(p, f, dtype=dtype, distance=2, tau=0.7, cumulative=cumulative, normalize_neighbour_sum=normalize)


@pytest.mark.parametrize(
    "shape, distance, cumulative, block_d, dtype",
    [
        ((2, 1, 3, 8), 1, False, None, torch.float32),  # T = 1: only the self slot
        ((1, 4, 1, 8), 1, True, None, torch.float32),  # N = 1
        # D = 1: the true gradient is 0 (x^ = sign(x)); fp64 keeps the rounding noise of
        # (g - x^ <x^, g>) / |x| far below the tolerance even for small |x|.
        ((2, 4, 3, 1), 2, True, None, torch.float64),
        ((1, 3, 2, 300), 1, False, 128, torch.float32),  # D not a power of two, three feature blocks
        ((1, 3, 2, 300), 1, True, None, torch.float64),  # default launch settings
        ((1, 3, 2, 6), 7, False, None, torch.float32),  # distance clamped to T - 1 (adjacent: offset 2)
        ((1, 3, 2, 6), 7, True, None, torch.float32),  # distance clamped (cumulative: offsets 1, 2)
        ((2, 4, 3, 6), 0, True, None, torch.float32),  # distance 0: per-frame alignment
    ],
)
def test_awkward_shapes(shape, distance, cumulative, block_d, dtype):
    for normalize in (False, True):
        p, f = _inputs(shape, dtype)
        _check(p, f, dtype=dtype, distance=distance, tau=1.3, cumulative=cumulative,
               normalize_neighbour_sum=normalize, block_d=block_d)


def test_clamped_distance_is_adjacent_offset():
    # T=3, distance 7 adjacent -> d = 2: frame 0 pairs only with frame 2, frame 1 only with itself.
    p = torch.zeros(1, 3, 1, 2, device=DEV)
    f = torch.zeros(1, 3, 1, 2, device=DEV)
    p[0, :, 0, 0] = 1.0
    f[0, 0, 0, 0], f[0, 1, 0, 1], f[0, 2, 0, 0] = 1.0, 1.0, -1.0
    total, self_tok = neighbour_cosine(p, f, distance=7, tau=2.0, cumulative=False, normalize_neighbour_sum=False)
    w = math.exp(-2 / 2.0)
    torch.testing.assert_close(self_tok[0, :, 0].cpu(), torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(total[0, :, 0].cpu(), torch.tensor([1.0 - w, 0.0, -1.0 + w]))


def test_worked_example_from_spec():
    # All-ones inputs: every cosine is 1, total = 1 + (number of neighbours) * e^-1.
    ones = torch.ones(1, 3, 4, 5, device=DEV)
    total, self_tok = neighbour_cosine(ones, ones, distance=1, tau=1.0, cumulative=False,
                                       normalize_neighbour_sum=False)
    e = math.exp(-1)
    torch.testing.assert_close(total.cpu(), torch.tensor([1 + e, 1 + 2 * e, 1 + e])[None, :, None].expand(1, 3, 4))
    torch.testing.assert_close(self_tok.cpu(), torch.ones(1, 3, 4))
    total_n, _ = neighbour_cosine(ones, ones, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True)
    torch.testing.assert_close(total_n.cpu(), torch.ones(1, 3, 4))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    # Transposed views (tokens and frames swapped in memory) and a strided slice of the feature dim.
    p_base = torch.randn(2, 3, 4, 14, generator=g).to(DEV).requires_grad_(True)
    f_base = torch.randn(2, 3, 4, 14, generator=g).to(DEV).requires_grad_(True)
    p = p_base.transpose(1, 2)[..., ::2]
    f = f_base.transpose(1, 2)[..., 1::2]
    assert not p.is_contiguous() and not f.is_contiguous()
    _check(p, f, leaves=[p_base, f_base], distance=1, tau=1.0, cumulative=True, normalize_neighbour_sum=True,
           block_d=4)


def test_expanded_stride0_inputs():
    g = torch.Generator().manual_seed(4)
    p0 = torch.randn(1, 4, 3, 9, generator=g).to(DEV).requires_grad_(True)
    f0 = torch.randn(2, 1, 3, 9, generator=g).to(DEV).requires_grad_(True)
    p = p0.expand(2, 4, 3, 9)  # stride 0 over the batch
    f = f0.expand(2, 4, 3, 9)  # stride 0 over frames: every frame sees the same teacher features
    _check(p, f, leaves=[p0, f0], distance=2, tau=0.5, cumulative=False, normalize_neighbour_sum=False)


def test_loss_style_mean_gradients():
    # The loss reduces with .mean(-1): upstream gradients arrive expanded (stride 0).
    p, f = _inputs((2, 4, 5, 12), torch.float32)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True)
    total, self_tok = neighbour_cosine(p, f, **kw)
    ref_total, ref_self = oracle(p, f, **kw)
    got = torch.autograd.grad(-total.mean(-1).sum() + 0.3 * self_tok.mean(-1).sum(), (p, f))
    want = torch.autograd.grad(-ref_total.mean(-1).sum() + 0.3 * ref_self.mean(-1).sum(), (p, f))
    for a, b in zip(got, want):
        _assert_grad_close(a, b, 1e-4)


@pytest.mark.parametrize("used", ["total", "self"])
def test_one_output_used(used):
    p, f = _inputs((1, 4, 3, 10), torch.float32)
    kw = dict(distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=False)
    out = neighbour_cosine(p, f, **kw)[0 if used == "total" else 1]
    ref = oracle(p, f, **kw)[0 if used == "total" else 1]
    got = torch.autograd.grad(out.sum(), (p, f))
    want = torch.autograd.grad(ref.sum(), (p, f))
    for a, b in zip(got, want):
        _assert_grad_close(a, b, 1e-4)


def test_features_without_grad():
    p, f = _inputs((1, 4, 3, 10), torch.float32, grad_f=False)
    total, self_tok = neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    (total.sum() + self_tok.sum()).backward()
    assert f.grad is None and p.grad is not None
    _check(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)


def test_only_features_require_grad():
    p, f = _inputs((1, 4, 3, 10), torch.float32)
    p = p.detach()
    _check(p, f, leaves=[f], distance=1, tau=1.0, cumulative=True, normalize_neighbour_sum=True)


@pytest.mark.parametrize("front_end", ["direct", "custom_op"])
@pytest.mark.parametrize("grids", [None, ((3, 4), (2, 3))], ids=["same_tokens", "fused_resample"])
def test_features_made_under_inference_mode(monkeypatch, front_end, grids):
    # A frozen teacher is often run under torch.inference_mode(). Autograd refuses to save its output
    # (an inference tensor) for backward, and the op's node holds the features it was given; the torch
    # backend's graph holds normalised copies, so there the same step works. Both must train alike.
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import similarity

    monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: front_end == "direct")
    n_p, n_f = (12, 6) if grids else (6, 6)
    g = torch.Generator().manual_seed(5)
    p = torch.randn(2, 4, n_p, 10, generator=g, dtype=torch.float64).to(DEV, torch.float32)
    f_plain = torch.randn(2, 4, n_f, 10, generator=g, dtype=torch.float64).to(DEV, torch.float32)
    with torch.inference_mode():
        f_inference = f_plain * 1.0
    assert f_inference.is_inference() and not f_plain.is_inference()
    kw = dict(adjacent_distance=1, adjacent_tau=1.0)
    if grids:
        kw.update(projected_grid=grids[0], features_grid=grids[1])
    results = []
    for backend, f in (("torch", f_plain), ("triton", f_inference)):
        leaf = p.clone().requires_grad_(True)
        out = crepa_loss(leaf, f, backend=backend, **kw)
        (out.loss + out.self_similarity.square().sum()).backward()
        results.append((out.loss.detach(), leaf.grad))
    (want_loss, want_grad), (got_loss, got_grad) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
    _assert_grad_close(got_grad, want_grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_and_tiny_vectors(dtype):
    p, f = _inputs((1, 3, 4, 6), dtype)
    with torch.no_grad():
        p[0, 1, 0].zero_()  # zero projected token
        f[0, 2, 1].zero_()  # zero feature token, a neighbour of frame 1
        p[0, 0, 2].mul_(1e-14)  # below eps: F.normalize is x / eps there (linear)
        f[0, 1, 3].mul_(1e-14)
        # Norm exactly eps (sqrt(x * x) == x): clamp_min passes no gradient at equality, so
        # F.normalize is still linear there and the projection term must be left out.
        p[0, 2, 1].zero_()
        p[0, 2, 1, 0] = 1e-12
        f[0, 0, 2].zero_()
        f[0, 0, 2, 3] = 1e-12
    eps = float(torch.tensor(1e-12, dtype=dtype))
    assert float(p.detach()[0, 2, 1].norm()) == float(f.detach()[0, 0, 2].norm()) == eps
    _check(p, f, dtype=dtype, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True)


def test_launchers_write_every_element():
    # NaN-filled buffers: any element the kernels skip stays NaN and fails the comparison.
    p, f = _inputs((2, 3, 5, 37), torch.float32)
    kw = dict(distance=1, tau=0.9, cumulative=True, normalize_neighbour_sum=True)
    B, T, N, D = p.shape
    S = num_slots(1, T, True)
    bufs = [torch.full((B, T, N), float("nan"), device=DEV) for _ in range(4)]
    cos = torch.full((B, T, S, N), float("nan"), device=DEV)
    ref_total, ref_self = oracle(p, f, **kw)
    with torch.no_grad():
        _launch_forward(p, f, *bufs, cos, block_d=16, **kw)
        total, self_tok, pnorm, fnorm = bufs
        torch.testing.assert_close(total, ref_total, rtol=0, atol=1e-5)
        torch.testing.assert_close(self_tok, ref_self, rtol=0, atol=1e-5)
        torch.testing.assert_close(pnorm, p.norm(dim=-1), rtol=1e-6, atol=0)
        torch.testing.assert_close(fnorm, f.norm(dim=-1), rtol=1e-6, atol=0)
        # Slot layout: 0 self, 1 = frame t-1, 2 = frame t+1; invalid edge slots hold 0.
        ph, fh = F.normalize(p, dim=-1), F.normalize(f, dim=-1)
        torch.testing.assert_close(cos[:, :, 0], ref_self, rtol=0, atol=1e-5)
        torch.testing.assert_close(cos[:, 1:, 1], (ph[:, 1:] * fh[:, :-1]).sum(-1), rtol=0, atol=1e-5)
        torch.testing.assert_close(cos[:, :-1, 2], (ph[:, :-1] * fh[:, 1:]).sum(-1), rtol=0, atol=1e-5)
        assert (cos[:, 0, 1] == 0).all() and (cos[:, -1, 2] == 0).all()

    g_total = torch.randn(B, T, N, device=DEV)
    dp = torch.full_like(p, float("nan"))
    df = torch.full_like(f, float("nan"))
    _launch_backward(p.detach(), f.detach(), pnorm, fnorm, cos, g_total, None, dp, df, block_d=16, **kw)
    want = torch.autograd.grad((ref_total * g_total).sum(), (p, f))
    _assert_grad_close(dp, want[0], 1e-4)
    _assert_grad_close(df, want[1], 1e-4)


def test_gradients_not_written_into_inputs():
    p, f = _inputs((1, 3, 2, 8), torch.float32)
    p0, f0 = p.detach().clone(), f.detach().clone()
    total, self_tok = neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    (total.sum() + self_tok.sum()).backward()
    assert torch.equal(p.detach(), p0) and torch.equal(f.detach(), f0)


@pytest.mark.parametrize("cumulative, normalize", [(False, True), (True, False)])
def test_gradcheck_fp64(cumulative, normalize):
    p, f = _inputs((1, 3, 2, 3), torch.float64, seed=7)

    def fn(p, f):
        return neighbour_cosine(p, f, distance=2, tau=0.8, cumulative=cumulative,
                                normalize_neighbour_sum=normalize)

    assert torch.autograd.gradcheck(fn, (p, f), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bitwise_deterministic():
    p, f = _inputs((1, 4, 6, 20), torch.float32)
    kw = dict(distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=True, block_d=8)
    runs = []
    for _ in range(2):
        total, self_tok = neighbour_cosine(p, f, **kw)
        grads = torch.autograd.grad(total.sum() + 0.5 * self_tok.sum(), (p, f))
        runs.append((total, self_tok, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.fixture
def custom_op_front_end(monkeypatch):
    """Route eager calls through the registered custom ops (the path torch.compile captures)."""
    from crepa_kernels.ops import similarity

    monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: False)


@pytest.mark.parametrize("cumulative, normalize", [(False, False), (True, True)])
def test_custom_op_front_end_matches_oracle(custom_op_front_end, cumulative, normalize):
    p, f = _inputs((2, 4, 3, 20), torch.float32)
    _check(p, f, distance=2, tau=0.7, cumulative=cumulative, normalize_neighbour_sum=normalize, block_d=8)


@pytest.mark.parametrize("grad_f", [False, True])
def test_front_ends_agree_bitwise(monkeypatch, grad_f):
    """Eager calls launch the kernels from an autograd.Function; torch.compile goes through the custom
    ops. Same kernels, same launch settings: the two must agree to the bit, gradients included, also
    when only one output is used."""
    from crepa_kernels.ops import similarity

    kw = dict(distance=2, tau=0.9, cumulative=True, normalize_neighbour_sum=False, block_d=8)
    results = []
    for direct in (True, False):
        monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors, _d=direct: _d)
        p, f = _inputs((1, 5, 3, 20), torch.float32, grad_f=grad_f)
        leaves = (p, f) if grad_f else (p,)
        total, self_tok = neighbour_cosine(p, f, **kw)
        both = torch.autograd.grad(total.square().sum() + self_tok.sum(), leaves)
        total_only = torch.autograd.grad(neighbour_cosine(p, f, **kw)[0].sum(), leaves)
        mean_total, mean_self = neighbour_cosine(p, f, token_mean=True, **kw)
        means = torch.autograd.grad((mean_total * torch.arange(5.0)).sum() + mean_self.sum(), leaves)
        results.append((total, self_tok, *both, *total_only, mean_total, mean_self, *means))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_f", [False, True])
def test_token_mean_is_the_mean_of_the_tokens(grad_f):
    # token_mean=True folds the mean over tokens into the op: values and gradients of .mean(-1).
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True, block_d=8)
    p, f = _inputs((2, 3, 5, 12), torch.float32, grad_f=grad_f)
    leaves = (p, f) if grad_f else (p,)
    g = torch.randn(2, 3)
    total, self_tok = neighbour_cosine(p, f, **kw)
    mean_total, mean_self = neighbour_cosine(p, f, token_mean=True, **kw)
    assert mean_total.shape == mean_self.shape == (2, 3)
    assert torch.equal(mean_total, total.mean(-1)) and torch.equal(mean_self, self_tok.mean(-1))
    want = torch.autograd.grad((total.mean(-1) * g).sum() + self_tok.mean(-1).sum(), leaves)
    got = torch.autograd.grad((mean_total * g).sum() + mean_self.sum(), leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the same g / N per token reaches the same kernel


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("normalize_by_frames", [True, False])
def test_crepa_loss_reduction_in_the_kernels_node(monkeypatch, direct, normalize_by_frames):
    """With a float weight the eager Triton path computes -weight * mean(total) (times T without
    normalize_by_frames) inside the kernels' autograd node. Value and gradients must be those of the
    plain torch reduction of the returned alignment, alone and mixed with the alignment and
    self-similarity outputs; the custom-op front end (torch.compile's) reduces in torch."""
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import similarity

    monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: direct)
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 4, 6, 12, generator=g).to(DEV).requires_grad_(True)
    f = torch.randn(2, 4, 9, 12, generator=g).to(DEV)
    kw = dict(projected_grid=(2, 3), features_grid=(3, 3), weight=0.7, adjacent_distance=2,
              normalize_by_frames=normalize_by_frames, backend="triton")
    out = crepa_loss(p, f, **kw)
    fused = out.loss.grad_fn is not None and "NeighbourCosine" in out.loss.grad_fn.name()
    assert fused == direct
    per_video = out.alignment.sum(1) / (4 if normalize_by_frames else 1)
    want = -0.7 * per_video.mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    mix = torch.arange(8.0, device=DEV).reshape(2, 4)
    for objective in (lambda loss: loss,
                      lambda loss: loss + (out.alignment * mix).sum() - 0.3 * out.self_similarity.sum()):
        got = torch.autograd.grad(objective(out.loss), p, retain_graph=True)[0]
        expected = torch.autograd.grad(objective(want), p, retain_graph=True)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # A tensor weight (which may require grad) keeps the torch reduction outside the node.
    w = torch.tensor(0.7, device=DEV, requires_grad=True)
    out_w = crepa_loss(p, f, **dict(kw, weight=w))
    assert out_w.loss.grad_fn.name().startswith("Mul")
    torch.testing.assert_close(out_w.loss, out.loss, rtol=1e-6, atol=0)
    grad_p, grad_w = torch.autograd.grad(out_w.loss, (p, w))
    torch.testing.assert_close(grad_p, torch.autograd.grad(out.loss, p)[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_w, out_w.loss.detach() / 0.7, rtol=1e-6, atol=0)


def test_eager_calls_take_the_direct_front_end(monkeypatch):
    # The custom op is not dispatched for plain eager tensors (that is the point of the direct path).
    from crepa_kernels.ops import similarity

    called = []
    real = torch.ops.crepa_kernels.neighbour_cosine_fwd

    class Spy:
        def __call__(self, *args):
            called.append(True)
            return real(*args)

    monkeypatch.setattr(torch.ops.crepa_kernels, "neighbour_cosine_fwd", Spy())
    p, f = _inputs((1, 3, 2, 8), torch.float32)
    neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    assert not called
    monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: False)
    neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    assert called


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(p=torch.zeros(2, 3, 4)), ValueError, "projected must be 4-D"),
        (dict(f=torch.zeros(1, 2, 3, 5)), ValueError, "same shape"),
        (dict(p=torch.zeros(1, 2, 3, 4, dtype=torch.int32)), TypeError, "projected must be float16"),
        (dict(f=[1.0]), TypeError, "features must be a torch.Tensor"),
        (dict(distance=-1), ValueError, "distance must be a non-negative int"),
        (dict(distance=1.5), ValueError, "distance must be a non-negative int"),
        (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
        (dict(tau=float("inf")), ValueError, "tau must be a finite number > 0"),
        (dict(cumulative=1), TypeError, "cumulative must be a bool"),
        (dict(block_d=24), ValueError, "block_d must be a power-of-two"),
        (dict(block_d=512), ValueError, "block_d must be a power-of-two int from 1 to 256, or None; got 512"),
        (dict(token_mean=1), TypeError, "token_mean must be a bool"),
    ],
)
def test_validation(kwargs, exc, match):
    args = dict(p=torch.zeros(1, 2, 3, 4), f=torch.zeros(1, 2, 3, 4), distance=1, tau=1.0, cumulative=False,
                normalize_neighbour_sum=False, block_d=None)
    args.update(kwargs)
    p, f = args.pop("p"), args.pop("f")
    p = p.to(DEV) if isinstance(p, torch.Tensor) else p
    f = f.to(DEV) if isinstance(f, torch.Tensor) else f
    with pytest.raises(exc, match=match):
        neighbour_cosine(p, f, **args)


# ----------------------------------------------------------------------------------------------------
# Tier 3: GPU only
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(dtype):
    _check_low_precision((2, 6, 100, 200), dtype)


def test_fp16_small():
    # fp16 on the CPU tier too (the interpreter rounds fp16 stores to nearest; its bf16 stores
    # truncate, so bf16 is held to these bounds on the GPU only)
    _check_low_precision((2, 4, 10, 40), torch.float16)


def _check_low_precision(shape, dtype):
    p, f = _inputs(shape, dtype)
    kw = dict(distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=False)
    total, self_tok = neighbour_cosine(p, f, **kw)
    assert total.dtype == torch.float32
    # The kernel reads the same low-precision values and computes in fp32: the forward matches an
    # fp32 oracle on the upcast inputs to fp32 rounding; gradients are rounded once to the input dtype.
    p32 = p.detach().float().requires_grad_(True)
    f32 = f.detach().float().requires_grad_(True)
    ref_total, ref_self = oracle(p32, f32, **kw)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=1e-5)
    torch.testing.assert_close(self_tok, ref_self, rtol=0, atol=1e-5)
    g = torch.randn_like(total)
    got = torch.autograd.grad((total * g).sum() + self_tok.sum(), (p, f))
    want = torch.autograd.grad((ref_total * g).sum() + ref_self.sum(), (p32, f32))
    rtol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_resample_matches_separate_at_wan480(dtype):
    # The wan480 shape (30x52 -> 37x37, D 1536). On the GPU the compiler may contract the blend into
    # FMAs differently in the two kernels, so equality is to rounding, not to the bit.
    from crepa_kernels.ops.resample import resample_tokens

    g = torch.Generator().manual_seed(9)
    p = torch.randn(1, 21, 30 * 52, 1536, generator=g).to(DEV, dtype).requires_grad_(True)
    f = torch.randn(1, 21, 37 * 37, 1536, generator=g).to(DEV, dtype)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False, token_mean=True)
    fused_total, fused_self = neighbour_cosine(p, f, projected_resample=((30, 52), (37, 37)), **kw)
    sep_total, sep_self = neighbour_cosine(resample_tokens(p, (30, 52), (37, 37)), f, **kw)
    # the frame means are ~4e-4 (up to 1e-3): fp32 rounding differences stay far under 1e-6; in bf16 an
    # FMA may flip the rounding of a resampled token, which the mean over 1369 tokens shrinks
    atol = 1e-6 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(fused_total, sep_total, rtol=0, atol=atol)
    torch.testing.assert_close(fused_self, sep_self, rtol=0, atol=atol)
    up = torch.randn(1, 21, device=DEV)
    got = torch.autograd.grad((fused_total * up).sum(), p)[0].float()
    want = torch.autograd.grad((sep_total * up).sum(), p)[0].float()
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.gpu
def test_gpu_fp64_and_fp32():
    for dtype in (torch.float32, torch.float64):
        p, f = _inputs((2, 7, 33, 70), dtype)
        _check(p, f, dtype=dtype, distance=3, tau=0.6, cumulative=True, normalize_neighbour_sum=True)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True)

    def loss_fn(p, f):
        total, self_tok = neighbour_cosine(p, f, **kw)
        return -total.mean(-1).sum() + 0.0 * self_tok.mean(-1).sum(), self_tok.mean(-1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    p, f = _inputs((2, 5, 64, 96), torch.float32)
    loss_c, self_c = compiled(p, f)
    gp_c, gf_c = torch.autograd.grad(loss_c, (p, f))
    loss_e, self_e = loss_fn(p, f)
    gp_e, gf_e = torch.autograd.grad(loss_e, (p, f))
    ref_total, _ = oracle(p, f, **kw)
    torch.testing.assert_close(loss_c, -ref_total.mean(-1).sum(), rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(self_c, self_e)
    torch.testing.assert_close(gp_c, gp_e)
    torch.testing.assert_close(gf_c, gf_e)


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    p, f = _inputs((1, 21, 1369, 256), torch.bfloat16)
    kw = dict(distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=True)
    runs = []
    for _ in range(2):
        total, self_tok = neighbour_cosine(p, f, **kw)
        grads = torch.autograd.grad(total.mean(-1).sum() + self_tok.mean(-1).sum(), (p, f))
        runs.append((total, self_tok, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # Each input has 1*8*16384*16400 = 2.15e9 > 2^31 elements (4.3 GB in bf16; 17 GB with gradients).
    B, T, N, D = 1, 8, 16384, 16400
    torch.manual_seed(0)
    p = torch.randn(B, T, N, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    f = torch.randn(B, T, N, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    kw = dict(distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=True)
    total, self_tok = neighbour_cosine(p, f, **kw)
    gp, gf = torch.autograd.grad(total.mean(-1).sum(), (p, f))
    # Tokens are independent, so the oracle on a token subset (the highest offsets) is exact there.
    sub = torch.arange(N - 24, N, device="cuda")
    p32 = p.detach()[:, :, sub].float().requires_grad_(True)
    f32 = f.detach()[:, :, sub].float().requires_grad_(True)
    ref_total, ref_self = oracle(p32, f32, **kw)
    torch.testing.assert_close(total[:, :, sub], ref_total, rtol=0, atol=1e-5)
    torch.testing.assert_close(self_tok[:, :, sub], ref_self, rtol=0, atol=1e-5)
    want_p, want_f = torch.autograd.grad(ref_total.sum() / N, (p32, f32))
    for got, want in ((gp[:, :, sub], want_p), (gf[:, :, sub], want_f)):
        torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1.6e-2 * want.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# The projected side resampled inside the kernels (projected_resample)
# ----------------------------------------------------------------------------------------------------
FUSED_CASES = [  # (in grid, out grid, dtype, front end)
    pytest.param((3, 5), (2, 2), torch.float32, "direct", id="down-both"),
    pytest.param((2, 3), (3, 4), torch.float64, "direct", id="up-both-fp64"),
    pytest.param((3, 5), (4, 4), torch.float32, "direct", id="mixed-like-30x52-to-37x37"),
    pytest.param((3, 5), (4, 4), torch.float64, "custom_op", id="mixed-fp64-custom-op"),
    pytest.param((1, 7), (1, 3), torch.float32, "custom_op", id="1d-down-custom-op"),
    pytest.param((1, 1), (2, 3), torch.float32, "direct", id="in-1x1"),
    # each resampled token rounded to fp16, as the stored copy of the separate path is (the interpreter
    # rounds fp16 exactly)
    pytest.param((4, 4), (3, 5), torch.float16, "direct", id="mixed-fp16"),
]


def _assert_same(a, b):
    # Bit-equal through the interpreter; a GPU compiler may contract the blend into FMAs differently
    # in the two kernels, so there the check is to fp32 rounding (fp16: a resampled token may then
    # round to the neighbouring fp16 value).
    if a.is_cuda:
        tol = 2e-3 if a.dtype == torch.float16 else 1e-6
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-6))
    else:
        assert torch.equal(a, b)


def _separate(p, f, in_grid, out_grid, **kw):
    from crepa_kernels.ops.resample import resample_tokens

    return neighbour_cosine(resample_tokens(p, in_grid, out_grid), f, **kw)


@pytest.mark.parametrize("in_grid, out_grid, dtype, front_end", FUSED_CASES)
def test_fused_resample_equals_resample_then_similarity(monkeypatch, in_grid, out_grid, dtype, front_end):
    """Reading the resampled tokens through their taps gives the bits of resampling first: the same
    taps, weights, order and rounding, then the same similarity; the gradient goes through the same
    resample backward."""
    from crepa_kernels.ops import similarity

    if front_end == "custom_op":
        monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: False)
    g = torch.Generator().manual_seed(3)
    T, D = 4, 20
    p = torch.randn(2, T, in_grid[0] * in_grid[1], D, generator=g, dtype=torch.float64).to(DEV, dtype)
    p.requires_grad_(True)
    f = torch.randn(2, T, out_grid[0] * out_grid[1], D, generator=g, dtype=torch.float64).to(DEV, dtype)
    kw = dict(distance=2, tau=0.8, cumulative=True, normalize_neighbour_sum=True, block_d=8)
    up = torch.randn(2, T, generator=g, dtype=torch.float64).to(DEV, dtype)
    results = []
    for fused in (True, False):
        if fused:
            total, self_tok = neighbour_cosine(p, f, projected_resample=(in_grid, out_grid), token_mean=True, **kw)
        else:
            total, self_tok = _separate(p, f, in_grid, out_grid, token_mean=True, **kw)
        grad = torch.autograd.grad((total * up).sum() + self_tok.sum(), p)[0]
        results.append((total, self_tok, grad))
    for a, b in zip(*results):
        _assert_same(a, b)
    assert results[0][2].shape == p.shape


@pytest.mark.parametrize("dim", [160, 40])
def test_fused_resample_keeps_the_default_summation_order(dim):
    """With default launch settings the fused forward must sum over D in the same blocks as the
    separate path (D = 160: one 256-wide block each; a smaller block for the fused kernel would
    change the rounding)."""
    g = torch.Generator().manual_seed(10)
    p = torch.randn(1, 3, 15, dim, generator=g).to(DEV).requires_grad_(True)
    f = torch.randn(1, 3, 4, dim, generator=g).to(DEV)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    fused = neighbour_cosine(p, f, projected_resample=((3, 5), (2, 2)), **kw)
    separate = _separate(p, f, (3, 5), (2, 2), **kw)
    for a, b in zip(fused, separate):
        _assert_same(a, b)
    grads = [torch.autograd.grad(out[0].sum() + out[1].sum(), p)[0] for out in (fused, separate)]
    _assert_same(*grads)


def test_double_backward_through_the_kernels_raises():
    # The backward kernels have no derivative: a second-order gradient must fail loudly, not drop terms.
    p, f = _inputs((1, 3, 2, 8), torch.float32, grad_f=False)
    total, _ = neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    (g,) = torch.autograd.grad(total.sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad((g * g).sum() + (p * p).sum(), p)


def test_fused_resample_against_the_oracle():
    # Independent of the resample kernel: F.interpolate, then the plain torch oracle.
    g = torch.Generator().manual_seed(4)
    p = torch.randn(1, 3, 15, 12, generator=g, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 16, 12, generator=g, dtype=torch.float64, device=DEV)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    total, self_tok = neighbour_cosine(p, f, projected_resample=((3, 5), (4, 4)), **kw)
    img = p.reshape(3, 3, 5, 12).permute(0, 3, 1, 2)
    p_res = F.interpolate(img, size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    ref_total, ref_self = oracle(p_res.reshape(1, 3, 16, 12), f, **kw)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=1e-12)
    torch.testing.assert_close(self_tok, ref_self, rtol=0, atol=1e-12)
    got = torch.autograd.grad((total * torch.arange(16.0, dtype=torch.float64)).sum(), p)[0]
    want = torch.autograd.grad((ref_total * torch.arange(16.0, dtype=torch.float64)).sum(), p)[0]
    _assert_grad_close(got, want, 1e-9)


def _check_fused_resample_at_the_last_tokens(in_grid, out_grid, B, T, D, dtype, n_sub, rows_of, fwd_atol, grad_rtol):
    """The fused-resample forward and backward against an independent reference on the last ``n_sub``
    output tokens (the highest offsets): their rows of F.interpolate's resampling matrix applied to the
    input tokens they touch, rounded to the input dtype, then the oracle. The objective reads only those tokens, so the input
    gradient must match on the touched tokens and be zero everywhere else."""
    device = DEV
    g = torch.Generator(device=device).manual_seed(11)
    n_in, n_out = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]
    p = torch.randn(B, T, n_in, D, generator=g, device=device, dtype=dtype).requires_grad_(True)
    f = torch.randn(B, T, n_out, D, generator=g, device=device, dtype=dtype)
    kw = dict(distance=2, tau=0.8, cumulative=True, normalize_neighbour_sum=True)
    total, self_tok = neighbour_cosine(p, f, projected_resample=(in_grid, out_grid), **kw)
    sub = torch.arange(n_out - n_sub, n_out, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    up = torch.randn(B, T, n_sub, generator=g, device=device, dtype=acc)
    (gp,) = torch.autograd.grad((total[:, :, sub] * up).sum() + self_tok[:, :, sub].sum(), p)

    rows = rows_of(in_grid, out_grid, sub.tolist())  # (n_sub, n_in), float64 on the CPU
    q = rows.abs().sum(0).nonzero().squeeze(1)  # the input tokens those outputs read
    p_q = p.detach()[:, :, q.to(device)].to(acc).requires_grad_(True)
    # rounded to the input dtype, as resample_tokens' output is (the fused kernels keep those bits)
    resampled = torch.einsum("sq,btqd->btsd", rows[:, q].to(device, acc), p_q).to(dtype).to(acc)
    ref_total, ref_self = oracle(resampled, f[:, :, sub].to(acc), **kw)
    torch.testing.assert_close(total[:, :, sub], ref_total, rtol=0, atol=fwd_atol)
    torch.testing.assert_close(self_tok[:, :, sub], ref_self, rtol=0, atol=fwd_atol)
    (want,) = torch.autograd.grad((ref_total * up).sum() + ref_self.sum(), p_q)
    _assert_grad_close(gp[:, :, q.to(device)].to(acc), want, grad_rtol)
    q0 = int(q.min())
    untouched = torch.ones(n_in - q0, dtype=torch.bool)
    untouched[q - q0] = False
    assert gp[:, :, :q0].count_nonzero().item() == 0
    assert gp[:, :, q0:][:, :, untouched.to(device)].count_nonzero().item() == 0


@pytest.mark.parametrize("mode", BACKWARDS)
def test_fused_resample_at_the_last_tokens(monkeypatch, interpolation_rows, mode):
    # Interpreter scale: checks the reference this test shares with the GPU case below. In fp32: the
    # interpreter truncates fp32 to bf16 where torch and compiled kernels round to nearest, so the
    # reference's rounding of the resampled tokens holds for bf16 on a GPU only.
    _select_backward(monkeypatch, mode)
    _check_fused_resample_at_the_last_tokens((3, 5), (4, 4), 1, 3, 40, torch.float32, 5, interpolation_rows,
                                             fwd_atol=1e-5, grad_rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", BACKWARDS)
def test_gpu_fused_resample_int64_offsets(monkeypatch, interpolation_rows, mode):
    # projected: 1*8*(128*128)*16400 = 2.15e9 > 2^31 elements (4.3 GB in bf16), resampled to 100x100
    # inside the kernels, whose tap reads (forward, both backwards) and the one-pass backward's writes
    # reach past 2^31 elements; the two-pass backward runs in one-frame windows (the resample backward
    # past 2^31 elements is test_ops_resample.py's). About 12 GB of GPU memory.
    _select_backward(monkeypatch, mode)
    _check_fused_resample_at_the_last_tokens((128, 128), (100, 100), 1, 8, 16400, torch.bfloat16, 24,
                                             interpolation_rows, fwd_atol=2e-5, grad_rtol=1.6e-2)


@pytest.mark.parametrize("mode", BACKWARDS)
def test_fused_resample_gradcheck_fp64(monkeypatch, mode):
    _select_backward(monkeypatch, mode)
    g = torch.Generator().manual_seed(5)
    p = torch.randn(1, 3, 6, 5, generator=g, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64, device=DEV)

    def fn(p):
        return neighbour_cosine(p, f, distance=1, tau=0.9, cumulative=True, normalize_neighbour_sum=True,
                                projected_resample=((2, 3), (2, 2)))

    # fast_mode checks random projections of the Jacobian: a few kernel runs instead of one per element.
    assert torch.autograd.gradcheck(fn, (p,), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_fused_resample_with_features_requiring_grad_resamples_first():
    # The fused kernels compute d projected only; a teacher that requires grad gets both gradients.
    g = torch.Generator().manual_seed(6)
    p = torch.randn(1, 3, 6, 8, generator=g, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 4, 8, generator=g, device=DEV, requires_grad=True)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    total, _ = neighbour_cosine(p, f, projected_resample=((2, 3), (2, 2)), **kw)
    ref, _ = _separate(p, f, (2, 3), (2, 2), **kw)
    _assert_same(total, ref)
    got = torch.autograd.grad(total.sum(), (p, f))
    want = torch.autograd.grad(ref.sum(), (p, f))
    for a, b in zip(got, want):
        _assert_same(a, b)


def test_fused_resample_keeps_no_resampled_copy_for_backward():
    """What the loss holds between forward and backward (it lives through the rest of the step's
    backward): the inputs, per-token norms and cosines, not a resampled (B, T, N, D) copy."""
    g = torch.Generator().manual_seed(7)
    p = torch.randn(1, 4, 15, 64, generator=g, device=DEV, requires_grad=True)
    f = torch.randn(1, 4, 16, 64, generator=g, device=DEV)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False, token_mean=True)

    def saved_bytes(fn):
        held = {}

        def pack(t):
            if t.data_ptr() not in (p.data_ptr(), f.data_ptr()):
                held[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sum(held.values()), out

    fused, _ = saved_bytes(lambda: neighbour_cosine(p, f, projected_resample=((3, 5), (4, 4)), **kw))
    separate, _ = saved_bytes(lambda: _separate(p, f, (3, 5), (4, 4), **kw))
    copy = 4 * 16 * 64 * 4  # the resampled projected, fp32
    assert separate >= copy > fused
    assert fused <= 4 * 4 * 16 * 4 * 3  # norms and cosines: a few (B, T, N) fp32 buffers


@pytest.mark.parametrize(
    "grids, match",
    [
        (((3, 5), (4, 4), (1, 1)), "projected_resample must be"),
        (((3, 5), (4, 0)), "projected_resample must be"),
        (((3, 5), (4, True)), "projected_resample must be"),
        (((3, 4), (4, 4)), "projected must be"),  # the in grid does not hold projected's 15 tokens
        (((3, 5), (3, 5)), "projected must be"),  # the out grid does not hold features' 16 tokens
    ],
)
def test_fused_resample_validation(grids, match):
    p = torch.zeros(1, 2, 15, 4, device=DEV)
    f = torch.zeros(1, 2, 16, 4, device=DEV)
    with pytest.raises(ValueError, match=match):
        neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False,
                         projected_resample=grids)


@pytest.mark.parametrize("batch, T, per_window, windows", [
    (1, 5, 2, [(0, 2), (2, 2), (4, 1)]),
    (2, 5, 2, [(0, 2), (2, 2), (4, 1)]),
    (1, 7, 3, [(0, 3), (3, 2), (5, 2)]),  # balanced: 3 windows of 3 + 2 + 2 frames, not 3 + 3 + 1
])
def test_fused_resample_backward_in_frame_windows(monkeypatch, batch, T, per_window, windows):
    """The fused backward works through frame windows (to bound its resampled-grid buffer); with B = 2
    each window's input-grid slice is strided. The windows give the bits of one window and of
    resampling first."""
    from crepa_kernels.ops import similarity

    g = torch.Generator().manual_seed(11)
    D = 12
    p = torch.randn(batch, T, 15, D, generator=g).to(DEV).requires_grad_(True)
    f = torch.randn(batch, T, 16, D, generator=g).to(DEV)
    up = torch.randn(batch, T, generator=g).to(DEV)
    kw = dict(distance=2, tau=0.7, cumulative=True, normalize_neighbour_sum=True, token_mean=True, block_d=8)

    def grad_of(fn):
        total, self_tok = fn()
        return torch.autograd.grad((total * up).sum() + self_tok.sum(), p)[0]

    fused = lambda: neighbour_cosine(p, f, projected_resample=((3, 5), (4, 4)), **kw)  # noqa: E731
    whole = grad_of(fused)
    frame_bytes = batch * 16 * D * 4  # one frame of resampled-grid gradient
    window_bytes = per_window * frame_bytes + frame_bytes // 2
    sizes, launched = [], []
    real_empty, real_launch = torch.empty, similarity._launch_backward

    def spy_empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        sizes.append(out.numel() * out.element_size())
        return out

    def spy_launch(*args, **kwargs):
        launched.append(kwargs.get("frames"))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(similarity, "bwd_window_bytes", lambda: window_bytes)
    monkeypatch.setattr(similarity, "_launch_backward", spy_launch)
    total, self_tok = fused()
    monkeypatch.setattr(torch, "empty", spy_empty)
    windowed = torch.autograd.grad((total * up).sum() + self_tok.sum(), p)[0]
    monkeypatch.setattr(torch, "empty", real_empty)
    assert launched == windows
    separate = grad_of(lambda: _separate(p, f, (3, 5), (4, 4), **kw))
    _assert_same(windowed, whole)
    _assert_same(windowed, separate)
    # Besides the input-grid gradient itself (allocated once), no buffer larger than the largest window.
    grad_bytes = p.numel() * 4
    assert sizes.count(grad_bytes) == 1
    assert max(n for n in sizes if n != grad_bytes) == max(tc for _, tc in windows) * frame_bytes


def test_fused_resample_backward_windows_a_parameter_too(monkeypatch):
    # A Parameter is a real tensor: its backward keeps the memory cap (only traced tensors take one window).
    from crepa_kernels.ops import similarity

    p = torch.nn.Parameter(torch.randn(1, 4, 15, 8, device=DEV))
    f = torch.randn(1, 4, 16, 8, device=DEV)
    launched, real_launch = [], similarity._launch_backward

    def spy_launch(*args, **kwargs):
        launched.append(kwargs.get("frames"))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(similarity, "bwd_window_bytes", lambda: 2 * 16 * 8 * 4)  # two frames
    monkeypatch.setattr(similarity, "_launch_backward", spy_launch)
    total, _ = neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False,
                                projected_resample=((3, 5), (4, 4)), token_mean=True)
    total.sum().backward()
    assert launched == [(0, 2), (2, 2)]


@pytest.mark.parametrize("mode", BACKWARDS)
@pytest.mark.parametrize("T, D", [(0, 4), (3, 0)])  # no frames; no features
def test_fused_resample_backward_of_an_empty_clip(monkeypatch, mode, T, D):
    _select_backward(monkeypatch, mode)
    p = torch.zeros(1, T, 15, D, device=DEV, requires_grad=True)
    f = torch.zeros(1, T, 16, D, device=DEV)
    total, self_tok = neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False,
                                       projected_resample=((3, 5), (4, 4)), token_mean=True)
    (grad,) = torch.autograd.grad(total.sum() + self_tok.sum(), p)
    assert grad.shape == p.shape


# ----------------------------------------------------------------------------------------------------
# The one-pass fused-resample backward (CREPA_KERNELS_MERGED_BWD=1)
# ----------------------------------------------------------------------------------------------------
def _interpolated_oracle(p, f, in_grid, out_grid, **kw):
    # Independent of both resample kernels: F.interpolate of the (B*T, D, h, w) image view, then the oracle.
    B, T, _, D = p.shape
    img = p.reshape(B * T, *in_grid, D).permute(0, 3, 1, 2)
    res = F.interpolate(img, size=out_grid, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return oracle(res.reshape(B, T, out_grid[0] * out_grid[1], D), f, **kw)


MERGED_CASES = [  # (in grid, out grid, dtype, (distance, tau, cumulative, normalize_neighbour_sum), front end)
    pytest.param((3, 5), (4, 4), torch.float64, (2, 0.8, True, True), "direct", id="mixed-like-30x52-to-37x37-fp64"),
    pytest.param((3, 5), (2, 2), torch.float32, (1, 1.0, False, False), "direct", id="down-both-fp32"),
    pytest.param((2, 3), (3, 4), torch.float64, (4, 1.3, False, True), "custom_op", id="up-both-adjacent-custom-op"),
    pytest.param((1, 7), (1, 3), torch.float64, (0, 1.0, False, False), "direct", id="1d-down-self-only"),
    pytest.param((1, 1), (2, 2), torch.float64, (1, 0.5, True, False), "direct", id="in-1x1"),
    pytest.param((2, 2), (4, 1), torch.float64, (1, 0.7, False, False), "direct", id="up-2x-one-axis-down-other"),
]


@pytest.mark.parametrize("mode", ["merged", "rows"])
@pytest.mark.parametrize("in_grid, out_grid, dtype, nkw, front_end", MERGED_CASES)
def test_one_pass_backward_against_the_oracle(monkeypatch, in_grid, out_grid, dtype, nkw, front_end, mode):
    """Each one-pass backward (banded, row form) gives the gradient of F.interpolate followed by the
    torch oracle, for per-token upstream gradients of both outputs (several D blocks, D not a multiple
    of the block), through either front end; the row form allocates nothing but the input-grid
    gradient (no resampled-grid buffer, no staging)."""
    from crepa_kernels.ops import similarity

    nkw = dict(zip(("distance", "tau", "cumulative", "normalize_neighbour_sum"), nkw))
    _select_backward(monkeypatch, mode)
    if front_end == "custom_op":
        monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: False)
    name = "_launch_merged_backward" if mode == "merged" else "_launch_row_backward"
    launched, real = [], getattr(similarity, name)
    monkeypatch.setattr(similarity, name, lambda *a, **k: launched.append(real(*a, **k)) or launched[-1])
    g = torch.Generator().manual_seed(21)
    B, T, D = 1, 3, 12
    p = torch.randn(B, T, in_grid[0] * in_grid[1], D, generator=g, dtype=torch.float64).to(DEV, dtype)
    p.requires_grad_(True)
    f = torch.randn(B, T, out_grid[0] * out_grid[1], D, generator=g, dtype=torch.float64).to(DEV, dtype)
    up_total, up_self = (torch.randn(B, T, f.shape[2], generator=g, dtype=torch.float64).to(DEV, dtype)
                         for _ in range(2))
    total, self_tok = neighbour_cosine(p, f, projected_resample=(in_grid, out_grid), block_d=8, **nkw)  # 8 + 4
    sizes, real_empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: sizes.append(real_empty(*a, **k)) or sizes[-1])
    got = torch.autograd.grad((total * up_total).sum() + (self_tok * up_self).sum(), p)[0]
    monkeypatch.setattr(torch, "empty", real_empty)
    assert launched == [True]
    if mode == "rows":
        assert [tuple(t.shape) for t in sizes if t.numel() > 1] == [tuple(p.shape)]
    p64 = p.detach().double().requires_grad_(True)
    ref_total, ref_self = _interpolated_oracle(p64, f.double(), in_grid, out_grid, **nkw)
    want = torch.autograd.grad((ref_total * up_total.double()).sum() + (ref_self * up_self.double()).sum(), p64)[0]
    _assert_grad_close(got.double(), want, 1e-9 if dtype == torch.float64 else 1e-5)


# (cumulative, normalize_neighbour_sum, upstream gradients, dtype) of the banded cases below
BAND_FLAGS = {"both": (True, True, "total+self", torch.float64),
              "plain-total": (False, False, "total", torch.float32),
              "self-only": (True, False, "self", torch.float64)}


def _one_pass_case(in_grid, out_grid, flags, D, seed):
    """Inputs, forward side buffers and strided upstream gradients (of the outputs `flags` uses) of a
    direct one-pass backward launch, B = 1, T = 3: (args of the launcher, its keywords, dtype)."""
    from crepa_kernels.ops import similarity

    cumulative, normalize, used, dtype = BAND_FLAGS[flags]
    g = torch.Generator().manual_seed(seed)
    B, T = 1, 3
    kw = dict(distance=1, tau=0.9, cumulative=cumulative, normalize_neighbour_sum=normalize)
    n_in, n_out = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]
    p = torch.randn(B, T, n_in, D, generator=g, dtype=torch.float64).to(DEV, dtype)
    f = torch.randn(B, T, n_out, D, generator=g, dtype=torch.float64).to(DEV, dtype)
    grids = (*in_grid, *out_grid)
    _, _, pnorm, fnorm, cos = similarity._forward_impl(p, f, 1, 0.9, cumulative, normalize, 0, grids,
                                                       traceable=False)
    acc = pnorm.dtype
    g_total = torch.randn(B, n_out, T, generator=g, dtype=torch.float64).to(DEV, acc).transpose(1, 2)
    g_self = torch.randn(B, T, n_out, generator=g, dtype=torch.float64).to(DEV, acc)
    g_total, g_self = (x if name in used else None for x, name in ((g_total, "total"), (g_self, "self")))
    return (p, f, pnorm, fnorm, cos, g_total, g_self), dict(kw, resample_p=grids), dtype


def _assert_one_pass_matches_the_oracle(dp, args, kw, dtype):
    """dp against the gradient of F.interpolate followed by the oracle, for the case's upstream gradients."""
    p, f, _, _, _, g_total, g_self = args
    kw = dict(kw)
    in_h, in_w, out_h, out_w = kw.pop("resample_p")
    pl = p.detach().double().requires_grad_(True)
    ref_total, ref_self = _interpolated_oracle(pl, f.double(), (in_h, in_w), (out_h, out_w), **kw)
    objective = sum((ref * up.double()).sum() for ref, up in ((ref_total, g_total), (ref_self, g_self))
                    if up is not None)
    want = torch.autograd.grad(objective, pl)[0]
    _assert_grad_close(dp.double(), want, 1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("in_grid, out_grid, rows, flags", [
    ((5, 7), (3, 4), 2, "both"),  # down both; bands of 2, 2 and 1 rows
    ((3, 4), (7, 5), 1, "both"),  # up both
    ((3, 4), (7, 5), 2, "plain-total"),
    ((2, 9), (6, 3), 1, "both"),  # up one axis, down the other
    ((9, 2), (2, 6), 4, "self-only"),  # bands of 4, 4 and 1 rows
    ((4, 3), (11, 2), 3, "both"),  # many output rows per band
    ((5, 7), (3, 4), 1, "plain-total"),
])
def test_merged_backward_bands_and_d_chunks(in_grid, out_grid, rows, flags):
    """Forced band heights, several bands (the last one short), two D chunks of several blocks each
    (the last block cut by D): every element written (the gradient starts as NaN) and equal to the
    gradient of F.interpolate followed by the oracle, with strided upstream gradients of one or both
    outputs, for each window setting."""
    from crepa_kernels.ops import similarity

    D = 34  # 9 blocks of 4 columns: two chunks
    args, kw, dtype = _one_pass_case(in_grid, out_grid, flags, D, 27)
    config = similarity._band_launch_config(1, 3, *kw["resample_p"], D, dtype == torch.float64, 132, 4,
                                            utils.elements_per_thread(), rows)
    assert config[0] == rows and config[4] // 4 < 9  # the forced bands, and more than one D chunk
    dp = torch.full_like(args[0], float("nan"))
    assert similarity._launch_merged_backward(*args, dp, tune={"rows": rows, "block_d": 4}, **kw)
    _assert_one_pass_matches_the_oracle(dp, args, kw, dtype)


def test_merged_backward_runs_a_large_batch_in_several_launches(monkeypatch):
    # Past _BAND_PROGRAMS_PER_SM programs per SM a launch takes a share of the work items and the
    # next one the rest, reusing the same staging slices: every element written, the oracle's values.
    from crepa_kernels.ops import similarity

    monkeypatch.setattr(similarity, "_device_sms", lambda device: 1)  # 16 programs per launch
    launches, real_kernel = [], similarity._kernel

    def counting_kernel(kernel, traceable):
        launcher = real_kernel(kernel, traceable)

        class Counted:
            def __getitem__(self, grid):
                launches.append(grid)
                return launcher[grid]
        return Counted()
    monkeypatch.setattr(similarity, "_kernel", counting_kernel)
    sizes, real_empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: sizes.append(real_empty(*a, **k)) or sizes[-1])
    g = torch.Generator().manual_seed(31)
    B, T, D, grids = 2, 3, 8, (5, 4, 3, 3)
    p = torch.randn(B, T, 20, D, generator=g, dtype=torch.float64).to(DEV)
    f = torch.randn(B, T, 9, D, generator=g, dtype=torch.float64).to(DEV)
    kw = dict(distance=1, tau=0.9, cumulative=False, normalize_neighbour_sum=True)
    _, _, pnorm, fnorm, cos = similarity._forward_impl(p, f, 1, 0.9, False, True, 0, grids, traceable=False)
    g_total = torch.randn(B, T, 9, generator=g, dtype=torch.float64).to(DEV)
    dp = torch.full_like(p, float("nan"))
    launches.clear()
    sizes.clear()
    assert similarity._launch_merged_backward(p, f, pnorm, fnorm, cos, g_total, None, dp, resample_p=grids,
                                              tune={"rows": 1, "block_d": 8}, **kw)
    assert launches == [(16,), (14,)]  # B * T * 5 bands = 30 items
    assert [s.numel() for s in sizes] == [16 * 8 * 8]  # 16 slices of F_PAD 8 (2 rows of 3) x 8 columns
    pl = p.clone().requires_grad_(True)
    ref_total, _ = _interpolated_oracle(pl, f, (5, 4), (3, 3), **kw)
    want = torch.autograd.grad((ref_total * g_total).sum(), pl)[0]
    _assert_grad_close(dp, want, 1e-9)


@pytest.mark.parametrize("mode", ["merged", "rows"])
def test_one_pass_backwards_propagate_nan_as_the_two_pass_backward_does(monkeypatch, mode):
    # A NaN in one projected element and one teacher element reaches the same gradient elements
    # through both backward paths (bands of one row, or tiles of 2 tokens of a row, so the poisoned
    # rows sit in several), and every finite element agrees.
    from crepa_kernels.ops import similarity

    _select_backward(monkeypatch, "two_pass")  # the reference below reads the switches
    g = torch.Generator().manual_seed(30)
    B, T, D, grids = 1, 3, 12, (4, 5, 3, 3)
    p = torch.randn(B, T, 20, D, generator=g, dtype=torch.float64).to(DEV)
    f = torch.randn(B, T, 9, D, generator=g, dtype=torch.float64).to(DEV)
    p[0, 1, 7, 3] = float("nan")
    f[0, 2, 4, 5] = float("nan")
    kw = dict(distance=1, tau=0.9, cumulative=True, normalize_neighbour_sum=True)
    _, _, pnorm, fnorm, cos = similarity._forward_impl(p, f, 1, 0.9, True, True, 0, grids, traceable=False)
    g_total = torch.randn(B, T, 9, generator=g, dtype=torch.float64).to(DEV)
    one_pass = torch.full_like(p, 0.5)
    launch, tune = ((similarity._launch_merged_backward, {"rows": 1}) if mode == "merged"
                    else (similarity._launch_row_backward, {"block_n": 2}))
    assert launch(p, f, pnorm, fnorm, cos, g_total, None, one_pass, resample_p=grids, tune=tune, **kw)
    two_pass, _ = similarity._backward_launches(p, f, pnorm, fnorm, cos, g_total, None, 1, 0.9, True, True, True,
                                                False, 0, grids, False)
    assert one_pass.isnan().any() and not one_pass.isnan().all()
    assert torch.equal(one_pass.isnan(), two_pass.isnan())
    ok = ~two_pass.isnan()
    _assert_grad_close(one_pass[ok], two_pass[ok], 1e-12)


def test_merged_backward_keeps_its_tile_budget_under_a_callers_block_d():
    # crepa_loss's block_d (a similarity-kernel setting, up to 256) only caps the band's block.
    from crepa_kernels.ops import similarity

    args = (1, 21, 30, 52, 37, 37, 1536, False, 132, None, utils.elements_per_thread(), None, None)
    default = similarity._band_launch_config(*args)
    assert default[3] * max(default[1], default[2]) <= similarity._BAND_TILE
    assert similarity._band_launch_config(*args, 256) == default  # the last argument: the caller's cap
    assert similarity._band_launch_config(*args, 4)[3] == 4


@pytest.mark.parametrize("mode", ["merged", "rows"])
def test_one_pass_backwards_take_launch_overrides(monkeypatch, mode):
    # utils.launch_overrides reaches each one-pass launch (bench/ab_settings.py --tuned times them so).
    from crepa_kernels.ops import similarity

    _select_backward(monkeypatch, mode)
    config = "_band_launch_config" if mode == "merged" else "_row_launch_config"
    seen, real = [], getattr(similarity, config)
    monkeypatch.setattr(similarity, config, lambda *a: seen.append(a) or real(*a))
    g = torch.Generator().manual_seed(29)
    p = torch.randn(1, 3, 15, 8, generator=g, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 16, 8, generator=g, dtype=torch.float64, device=DEV)
    kw = dict(distance=1, tau=0.9, cumulative=False, normalize_neighbour_sum=False, projected_resample=((3, 5), (4, 4)))
    overrides = ({"merged_bwd": {"rows": 2, "block_d": 4, "num_warps": 2}} if mode == "merged"
                 else {"row_bwd": {"block_n": 2, "block_d": 4, "num_warps": 2, "d_blocks": 1}})
    with utils.launch_overrides(overrides):
        got = torch.autograd.grad(sum(o.sum() for o in neighbour_cosine(p, f, **kw)), p)[0]
    # the overrides, and no cap from the caller: block_d, elements per thread, rows, warps (banded);
    # tile, block, warps, feature blocks per program (row form)
    want = (4, utils.elements_per_thread(), 2, 2, None) if mode == "merged" else (2, 4, 2, 1, None)
    assert [a[-5:] for a in seen] == [want]
    ref = _interpolated_oracle(p, f, (3, 5), (4, 4), **{k: v for k, v in kw.items() if k != "projected_resample"})
    _assert_grad_close(got, torch.autograd.grad(ref[0].sum() + ref[1].sum(), p)[0], 1e-9)



def test_merged_backward_declines_on_rocm(monkeypatch):
    # Its staging relies on PTX's barrier semantics: a ROCm build takes the two-pass backward.
    from crepa_kernels.ops import similarity

    monkeypatch.setattr(torch.version, "hip", "6.2")
    g = torch.Generator().manual_seed(32)
    p = torch.randn(1, 3, 15, 6, generator=g, dtype=torch.float64, device=DEV)
    f = torch.randn(1, 3, 16, 6, generator=g, dtype=torch.float64, device=DEV)
    _, _, pnorm, fnorm, cos = similarity._forward_impl(p, f, 1, 0.9, False, False, 0, (3, 5, 4, 4), traceable=False)
    dp = torch.full_like(p, float("nan"))
    kw = dict(distance=1, tau=0.9, cumulative=False, normalize_neighbour_sum=False)
    assert not similarity._launch_merged_backward(p, f, pnorm, fnorm, cos, None, None, dp, resample_p=(3, 5, 4, 4),
                                                  **kw)
    assert dp.isnan().all()  # nothing written


def test_merged_backward_falls_back_where_bands_do_not_fit(monkeypatch):
    # A one-row band of a strong vertical upsampling touches 12 output rows of 12 tokens: past the
    # lane limit (128 in fp64), so the one-pass launcher declines and the two-pass backward gives
    # the gradient. In fp32 (256 lanes) a 4 x 4 -> 37 x 37 grid declines too.
    from crepa_kernels.ops import similarity

    ept = utils.elements_per_thread()
    assert similarity._band_launch_config(1, 3, 2, 3, 12, 12, 6, True, 132, None, ept) is None
    assert similarity._band_launch_config(1, 21, 4, 4, 37, 37, 1536, False, 132, None, ept) is None
    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1")
    calls, real = [], similarity._launch_merged_backward
    monkeypatch.setattr(similarity, "_launch_merged_backward", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    g = torch.Generator().manual_seed(28)
    p = torch.randn(1, 3, 2 * 3, 6, generator=g, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 12 * 12, 6, generator=g, dtype=torch.float64, device=DEV)
    kw = dict(distance=1, tau=0.9, cumulative=False, normalize_neighbour_sum=False)
    total, self_tok = neighbour_cosine(p, f, projected_resample=((2, 3), (12, 12)), **kw)
    got = torch.autograd.grad(total.sum() + self_tok.sum(), p)[0]
    assert calls == [False]
    ref_total, ref_self = _interpolated_oracle(p, f, (2, 3), (12, 12), **kw)
    _assert_grad_close(got, torch.autograd.grad(ref_total.sum() + ref_self.sum(), p)[0], 1e-9)


@pytest.mark.parametrize("use", ["total", "self"])
def test_merged_backward_with_one_output_used(monkeypatch, use):
    # Only one of the two upstream gradients exists (the other output is not in the graph).
    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1")
    g = torch.Generator().manual_seed(22)
    p = torch.randn(1, 3, 15, 12, generator=g, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 16, 12, generator=g, dtype=torch.float64, device=DEV)
    kw = dict(distance=1, tau=0.9, cumulative=True, normalize_neighbour_sum=True)
    weights = torch.arange(16.0, dtype=torch.float64, device=DEV)
    out = neighbour_cosine(p, f, projected_resample=((3, 5), (4, 4)), **kw)
    got = torch.autograd.grad((out[0 if use == "total" else 1] * weights).sum(), p)[0]
    ref = _interpolated_oracle(p, f, (3, 5), (4, 4), **kw)
    want = torch.autograd.grad((ref[0 if use == "total" else 1] * weights).sum(), p)[0]
    _assert_grad_close(got, want, 1e-9)


def test_merged_backward_agrees_with_the_two_pass_backward(monkeypatch):
    """Both backward paths, fp32, strided inputs and a stride-0 (token mean) upstream gradient: the
    same gradient up to fp32 summation order."""
    g = torch.Generator().manual_seed(23)
    B, T, D = 2, 3, 24
    p_big = torch.randn(B, T, D, 15, generator=g).to(DEV)
    p = p_big.transpose(2, 3).requires_grad_(True)  # (B, T, 15, D), D not the fastest dimension
    f = torch.randn(B, T, 16, 2 * D, generator=g).to(DEV)[..., ::2]  # every other feature
    kw = dict(distance=2, tau=0.7, cumulative=True, normalize_neighbour_sum=True, token_mean=True)
    from crepa_kernels.ops import similarity

    launched, real = [], similarity._launch_merged_backward
    monkeypatch.setattr(similarity, "_launch_merged_backward", lambda *a, **k: launched.append(1) or real(*a, **k))
    grads = []
    for merged in ("1", "0"):
        monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", merged)
        total, self_tok = neighbour_cosine(p, f, projected_resample=((3, 5), (4, 4)), **kw)
        grads.append(torch.autograd.grad(total.sum() + 0.5 * self_tok.sum(), p)[0])
    assert launched == [1]
    _assert_grad_close(grads[0], grads[1], 1e-5)


@pytest.mark.parametrize("mode", ["merged", "rows"])
@pytest.mark.parametrize("in_grid, out_grid", [((2, 3), (2, 2)), ((1, 2), (1, 4))])
def test_merged_backward_zero_vectors(monkeypatch, in_grid, out_grid, mode):
    # A frame whose projected tokens are all zero (resampled norm 0: no projection term), zero
    # teacher tokens, and (1x2 -> 1x4: output token 0 reads input token 0 alone) a resampled token
    # with a norm between 0 and eps, where F.normalize is linear: finite, and the oracle's gradient.
    # Both one-pass backwards.
    _select_backward(monkeypatch, mode)
    g = torch.Generator().manual_seed(24)
    n_in, n_out = in_grid[0] * in_grid[1], out_grid[0] * out_grid[1]
    p = torch.randn(1, 3, n_in, 5, generator=g, dtype=torch.float64, device=DEV)
    f = torch.randn(1, 3, n_out, 5, generator=g, dtype=torch.float64, device=DEV)
    p[0, 1] = 0.0
    p[0, 2, 0] *= 1e-14
    f[0, 0, 1] = 0.0
    if in_grid == (1, 2):  # resampled token 0 of frame 0 has a norm of exactly eps: no projection term
        p[0, 0, 0] = 0.0
        p[0, 0, 0, 2] = 1e-12
    p.requires_grad_(True)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True)
    total, self_tok = neighbour_cosine(p, f, projected_resample=(in_grid, out_grid), **kw)
    got = torch.autograd.grad(total.sum() + self_tok.sum(), p)[0]
    ref_total, ref_self = _interpolated_oracle(p, f, in_grid, out_grid, **kw)
    want = torch.autograd.grad(ref_total.sum() + ref_self.sum(), p)[0]
    assert torch.isfinite(got).all()
    _assert_grad_close(got, want, 1e-9)
    if in_grid == (1, 2):  # resampled token 0 is input token 0 (weight 1): its norm is in (0, eps)
        assert 0 < float(p.detach()[0, 2, 0].norm()) < 1e-12


def test_merged_backward_launch_writes_every_element_and_holds_no_resampled_buffer(monkeypatch):
    """Called directly with a NaN-filled gradient it leaves no element unwritten; through autograd it
    launches once and allocates nothing but the input-grid gradient and its programs' staging slices
    (no resampled-grid buffer)."""
    from crepa_kernels.ops import similarity

    g = torch.Generator().manual_seed(25)
    B, T, D = 1, 3, 20
    p = torch.randn(B, T, 15, D, generator=g).to(DEV)
    f = torch.randn(B, T, 16, D, generator=g).to(DEV)
    kw = dict(distance=1, tau=0.9, cumulative=True, normalize_neighbour_sum=True)
    total, self_tok, pnorm, fnorm, cos = similarity._forward_impl(p, f, 1, 0.9, True, True, 0, (3, 5, 4, 4),
                                                                  traceable=False)
    g_total = torch.randn(B, T, 16, generator=g).to(DEV)
    dp = torch.full_like(p, float("nan"))
    similarity._launch_merged_backward(p, f, pnorm, fnorm, cos, g_total, None, dp, resample_p=(3, 5, 4, 4),
                                       block_d=16, **kw)
    pl = p.clone().requires_grad_(True)
    ref_total, _ = _interpolated_oracle(pl, f, (3, 5), (4, 4), **kw)
    want = torch.autograd.grad((ref_total * g_total).sum(), pl)[0]
    _assert_grad_close(dp, want, 1e-5)

    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1")
    calls = []
    for name in ("_launch_backward", "_launch_resample_bwd", "_launch_merged_backward"):
        real = getattr(similarity, name)
        monkeypatch.setattr(similarity, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    pg = p.clone().requires_grad_(True)
    total, self_tok = neighbour_cosine(pg, f, projected_resample=((3, 5), (4, 4)), token_mean=True, **kw)
    sizes, real_empty = [], torch.empty

    def spy_empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "empty", spy_empty)
    (grad,) = torch.autograd.grad(total.sum() + self_tok.sum(), pg)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert calls == ["_launch_merged_backward"]
    rows, _, f_pad, block_d, d_chunk, _, items, programs = similarity._band_launch_config(
        B, T, 3, 5, 4, 4, D, False, similarity._device_sms(pg.device), None, utils.elements_per_thread())
    assert programs == items == B * T * -(-3 // rows) * -(-D // d_chunk)  # few items: one program each
    assert sorted(sizes) == sorted([pg.numel() * 4, programs * f_pad * block_d * 4])
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", ["merged", "rows"])
def test_one_pass_backwards_are_bitwise_repeatable(monkeypatch, mode):
    _select_backward(monkeypatch, mode)
    g = torch.Generator().manual_seed(26)
    p = torch.randn(1, 3, 6, 5, generator=g, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 4, 5, generator=g, device=DEV)
    kw = dict(distance=1, tau=0.9, cumulative=True, normalize_neighbour_sum=True, projected_resample=((2, 3), (2, 2)))
    runs = [torch.autograd.grad(sum(o.sum() for o in neighbour_cosine(p, f, **kw)), p)[0] for _ in range(2)]
    assert torch.equal(*runs)


# ----------------------------------------------------------------------------------------------------
# The row-form one-pass fused-resample backward (CREPA_KERNELS_ROW_BWD=1)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_grid, out_grid, flags", [
    ((5, 7), (3, 4), "both"),  # down both: tiles of 2 tokens, 4 per row, the last one short
    ((3, 4), (7, 5), "plain-total"),  # up both
    ((9, 2), (2, 6), "self-only"),  # down one axis, up the other
    ((4, 3), (11, 2), "both"),  # many resampled rows per input row
])
def test_row_backward_tiles_and_d_chunks(in_grid, out_grid, flags):
    """Forced tiles of 2 tokens of a row, blocks of 4 features in chunks of 2 (D = 10: 3 blocks, the
    last one cut, 2 chunks): every element written (the gradient starts as NaN) and equal to the
    gradient of F.interpolate followed by the oracle, with a strided upstream gradient of one or both
    outputs (the default tiles: test_row_backward_against_the_oracle)."""
    from crepa_kernels.ops import similarity

    D = 10
    args, kw, dtype = _one_pass_case(in_grid, out_grid, flags, D, 42)
    tune = {"block_n": 2, "block_d": 4, "d_blocks": 2}
    config, _ = similarity.row_settings(1, 3, kw["resample_p"], D, 1, kw["cumulative"], dtype == torch.float64,
                                        args[0].device, tune)
    assert config[0] == 2 and config[2] == 4 and config[4] == 2 and config[6] == 2  # tile, block, chunks
    dp = torch.full_like(args[0], float("nan"))
    assert similarity._launch_row_backward(*args, dp, tune=tune, **kw)
    _assert_one_pass_matches_the_oracle(dp, args, kw, dtype)


def test_row_backward_declines_on_rocm_and_where_tiles_do_not_fit(monkeypatch):
    # ROCm (unchecked there) and grids whose tokens touch more than 8 resampled columns (1 x 2 -> 1 x 20,
    # up to 21) or whose tiles would gather from more than 256 take the two-pass backward; the
    # declining launcher writes nothing. wan480's grids are taken, in whole-row tiles.
    from crepa_kernels.ops import similarity

    ept = utils.elements_per_thread()
    assert similarity._row_launch_config(1, 3, 1, 2, 1, 20, 6, 4, True, 132, ept) is None
    # a 600-token row down to 300: tiles of 64 tokens touch up to 33 columns (64 lanes), of 512 up to 257
    assert similarity._row_launch_config(1, 3, 1, 600, 1, 300, 6, 4, False, 132, ept)[:2] == (64, 64)
    assert similarity._row_launch_config(1, 3, 1, 600, 1, 300, 6, 4, False, 132, ept, 512) is None
    assert similarity._row_launch_config(1, 21, 30, 52, 37, 37, 1536, 4, False, 132, ept)[:2] == (64, 64)
    g = torch.Generator().manual_seed(44)
    p = torch.randn(1, 3, 2, 6, generator=g, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 20, 6, generator=g, dtype=torch.float64, device=DEV)
    kw = dict(distance=1, tau=0.9, cumulative=False, normalize_neighbour_sum=False)
    _, _, pnorm, fnorm, cos = similarity._forward_impl(p.detach(), f, 1, 0.9, False, False, 0, (1, 2, 1, 20),
                                                       traceable=False)
    dp = torch.full_like(p, float("nan"))
    assert not similarity._launch_row_backward(p.detach(), f, pnorm, fnorm, cos, None, None, dp,
                                               resample_p=(1, 2, 1, 20), **kw)
    assert dp.isnan().all()
    _select_backward(monkeypatch, "rows")
    total, self_tok = neighbour_cosine(p, f, projected_resample=((1, 2), (1, 20)), **kw)
    got = torch.autograd.grad(total.sum() + self_tok.sum(), p)[0]
    ref_total, ref_self = _interpolated_oracle(p, f, (1, 2), (1, 20), **kw)
    _assert_grad_close(got, torch.autograd.grad(ref_total.sum() + ref_self.sum(), p)[0], 1e-9)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    _, _, pnorm, fnorm, cos = similarity._forward_impl(p.detach(), f[:, :, :4], 1, 0.9, False, False, 0,
                                                       (1, 2, 2, 2), traceable=False)
    assert not similarity._launch_row_backward(p.detach(), f[:, :, :4], pnorm, fnorm, cos, None, None, dp,
                                               resample_p=(1, 2, 2, 2), **kw)
    assert dp.isnan().all()


def test_row_backward_keeps_its_tile_budget_under_a_callers_block_d():
    # crepa_loss's block_d (a similarity-kernel setting, up to 256) only caps the row form's block.
    from crepa_kernels.ops import similarity

    args = (1, 21, 30, 52, 37, 37, 1536, 4, False, 132, utils.elements_per_thread())
    default = similarity._row_launch_config(*args)
    assert default[2] * 4 * max(default[0], default[1]) <= similarity._ROW_TILE
    assert similarity._row_launch_config(*args, max_block_d=256) == default
    assert similarity._row_launch_config(*args, max_block_d=8)[2] == 8


def test_one_pass_backwards_are_one_or_the_other(monkeypatch):
    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1")
    monkeypatch.setenv("CREPA_KERNELS_ROW_BWD", "1")
    p = torch.randn(1, 3, 15, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    f = torch.randn(1, 3, 16, 4, dtype=torch.float64, device=DEV)
    total, _ = neighbour_cosine(p, f, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False,
                                projected_resample=((3, 5), (4, 4)))
    with pytest.raises(ValueError, match="CREPA_KERNELS_ROW_BWD=1 and CREPA_KERNELS_MERGED_BWD=1"):
        total.sum().backward()
    assert p.grad is None


@pytest.mark.parametrize("frames, frame_bytes, limit, want", [
    (21, 1369 * 1536 * 4, 128 << 20, [(0, 11), (11, 10)]),  # wan480 fp32: 15 frames fit; 2 windows
    (21, 1369 * 1536 * 2, 128 << 20, [(0, 21)]),  # wan480 bf16: one window
    (21, 1369 * 1536 * 4, 64 << 20, [(0, 7), (7, 7), (14, 7)]),
    (3, 100, 10, [(0, 1), (1, 1), (2, 1)]),  # a frame above the limit still makes a window
    (1, 100, 1000, [(0, 1)]),
    (0, 100, 1000, [(0, 0)]),  # an empty clip: one empty window, as the unwindowed path has
])
def test_frame_windows(frames, frame_bytes, limit, want):
    from crepa_kernels.ops.similarity import frame_windows

    assert frame_windows(frames, frame_bytes, limit) == want


def test_frame_windows_cover_the_clip_with_the_fewest_balanced_windows():
    from crepa_kernels.ops.similarity import frame_windows

    for frames in range(1, 40):
        for per in range(1, 12):
            got = frame_windows(frames, 10, per * 10 + 5)
            sizes = [tc for _, tc in got]
            assert [t0 for t0, _ in got] == [sum(sizes[:i]) for i in range(len(sizes))]
            assert sum(sizes) == frames and max(sizes) <= per and max(sizes) - min(sizes) <= 1
            assert len(got) == -(-frames // per)


def test_fused_backward_refuses_features_gradients():
    # The fused kernels compute d projected only; asked for d features they say so (public calls
    # resample first instead, see above).
    from crepa_kernels.ops import similarity

    p = torch.randn(1, 3, 15, 4, device=DEV)
    f = torch.randn(1, 3, 16, 4, device=DEV)
    small = torch.zeros(1, 3, 16, device=DEV)
    cos = torch.zeros(1, 3, 3, 16, device=DEV)
    for need_p in (False, True):
        with pytest.raises(ValueError, match="d projected only"):
            similarity._backward_impl(p, f, small, small, cos, small, None, 1, 1.0, False, False, need_p, True, 0,
                                      (3, 5, 4, 4), False)


def test_fused_resample_grid_side_limit():
    # The resample backward's exact-contributor proof covers sides up to 2**20; the fused path says so.
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops.resample import _MAX_SIDE

    n = _MAX_SIDE + 1
    p = torch.zeros(1, 1, n, 1, device=DEV)
    f = torch.zeros(1, 1, 2, 1, device=DEV)
    with pytest.raises(ValueError, match="grid sides above"):
        crepa_loss(p, f, projected_grid=(1, n), features_grid=(1, 2), backend="triton")


def test_feature_dim_limit():
    # D past 2**30 would wrap the kernels' int32 loop over feature blocks; stride-0 views hold no memory
    from crepa_kernels import crepa_loss

    wide = torch.zeros(1, device=DEV).expand(1, 2, 3, (1 << 30) + 1)
    with pytest.raises(ValueError, match="features has D=1073741825 features; the Triton kernels take at most"):
        crepa_loss(wide, wide, backend="triton")


def _same_up_to_layout(a, b):
    """Bitwise on the interpreter. On a GPU other warps or token blocks may lay a reduction out
    differently (the sum over the neighbour slots, say), so there the two agree to fp32 rounding."""
    if a.is_cuda:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    else:
        assert torch.equal(a, b)


def _record_launches(monkeypatch) -> list:
    """Every kernel launch of the similarity and resample ops from now on, as (kernel, grid, meta),
    launched as before."""
    from crepa_kernels.ops import resample, similarity

    launches = []

    def recording(real):
        def pick(kernel, traceable):
            launcher = real(kernel, traceable)

            class Record:
                def __getitem__(self, grid):
                    def launch(*args, **meta):
                        launches.append((kernel, grid, meta))
                        return launcher[grid](*args, **meta)
                    return launch
            return Record()
        return pick

    monkeypatch.setattr(similarity, "_kernel", recording(similarity._kernel))
    monkeypatch.setattr(resample, "_kernel", recording(resample._kernel))
    return launches


def test_launch_overrides_reach_each_hot_kernel_and_keep_its_results(monkeypatch):
    """The settings bench/tune_kernels.py reports as each kernel's default are the ones a plain launch
    uses, and its overrides reach the launch (blocks, grid, warps, stages) without changing the
    results beyond rounding: token block, warps and stages do not touch the summation order over D."""
    from crepa_kernels.ops import resample, similarity

    launches = _record_launches(monkeypatch)
    g = torch.Generator().manual_seed(5)
    B, T, D, grids = 1, 3, 40, (3, 5, 2, 3)  # projected on 3x5, resampled to features' 2x3
    p = torch.randn(B, T, 15, D, generator=g).to(DEV)
    f = torch.randn(B, T, 6, D, generator=g).to(DEV)
    N, acc = f.shape[2], torch.float32
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False, resample_p=grids)

    def forward(tune):
        outs = [torch.full((B, T, N), float("nan"), device=DEV) for _ in range(4)]
        outs.append(torch.full((B, T, num_slots(1, T, False), N), float("nan"), device=DEV))
        _launch_forward(p, f, *outs, **kw, tune=tune)
        return outs

    side = forward(None)
    g_total = torch.full((), 0.5, device=DEV).expand(B, T, N)

    def backward(tune):
        dp = torch.full((B, 2, N, D), float("nan"), device=DEV)
        _launch_backward(p, f, side[2], side[3], side[4], g_total, None, dp, None, frames=(1, 2), **kw, tune=tune)
        return [dp]

    def resample_backward(tune):
        return [resample._launch_bwd(backward(None)[0], *grids, tune=tune)]

    cases = [(forward, similarity._neighbour_cosine_fwd_kernel,
              similarity.launch_settings(f.shape, 1, False, acc, p.device, fused=True)),
             (backward, similarity._neighbour_cosine_bwd_kernel,
              similarity.launch_settings(f.shape, 1, False, acc, p.device, fused=True, backward=True,
                                         input_dtype=p.dtype)),
             (resample_backward, resample._resample_bwd_kernel, resample.bwd_settings(15, D))]
    for run, kernel, (block_n, block_d, warps) in cases:
        launches.clear()
        ref = run(None)
        (_, grid, meta), = [x for x in launches if x[0] is kernel]
        assert (meta["BLOCK_N"], meta["BLOCK_D"], meta["num_warps"]) == (block_n, block_d, warps)
        assert "num_stages" not in meta  # a default launch keeps Triton's own depth
        other_n = block_n // 2 if block_n >= 4 else block_n * 2
        tune = {"block_n": other_n, "num_warps": 8 if warps != 8 else 4, "num_stages": 1}
        launches.clear()
        out = run(tune)
        (_, grid2, meta), = [x for x in launches if x[0] is kernel]
        assert (meta["BLOCK_N"], meta["BLOCK_D"], meta["num_warps"], meta["num_stages"]) == \
            (other_n, block_d, tune["num_warps"], 1)
        assert grid2[0] != grid[0]  # the grid follows the token block
        for a, b in zip(out, ref):
            assert not a.isnan().any()
            _same_up_to_layout(a, b)


def test_launch_overrides_reach_a_whole_crepa_loss_call(monkeypatch):
    """What bench/ab_settings.py --tuned relies on: inside `launch_overrides`, the three hot kernels of
    a crepa_loss call launch with the given settings (the same results), and outside with their own."""
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops.utils import launch_overrides

    launches = _record_launches(monkeypatch)
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(1, 3, 15, 40, generator=g).to(DEV)
    f = torch.randn(1, 3, 6, 40, generator=g).to(DEV)

    def run():
        launches.clear()
        p = p0.clone().requires_grad_(True)
        out = crepa_loss(p, f, projected_grid=(3, 5), features_grid=(2, 3), weight=0.5, backend="triton")
        out.loss.backward()
        return out.loss.detach(), p.grad, {kernel.fn.__name__: meta for kernel, _, meta in launches}

    loss, grad, default = run()
    tuned = {"sim_fwd": {"block_n": 4}, "sim_bwd": {"num_warps": 8, "num_stages": 1}, "resample_bwd": {"block_n": 4}}
    with launch_overrides(tuned):
        loss_t, grad_t, metas = run()
    assert set(default) == set(metas) == {"_neighbour_cosine_fwd_kernel", "_neighbour_cosine_bwd_kernel",
                                          "_resample_bwd_kernel"}
    assert metas["_neighbour_cosine_fwd_kernel"]["BLOCK_N"] == 4 != default["_neighbour_cosine_fwd_kernel"]["BLOCK_N"]
    assert metas["_neighbour_cosine_bwd_kernel"]["num_warps"] == 8 != default["_neighbour_cosine_bwd_kernel"]["num_warps"]
    assert metas["_neighbour_cosine_bwd_kernel"]["num_stages"] == 1
    assert metas["_resample_bwd_kernel"]["BLOCK_N"] == 4 != default["_resample_bwd_kernel"]["BLOCK_N"]
    _same_up_to_layout(loss_t, loss)
    _same_up_to_layout(grad_t, grad)
    assert run()[2] == default  # outside the block: the shape's own settings again
    # the resample backward's row form: another kernel, the same gradient up to summation order
    with launch_overrides({"resample_bwd": {"row_kernel": 1, "d_blocks": 2}}):
        loss_r, grad_r, metas = run()
    assert set(metas) == {"_neighbour_cosine_fwd_kernel", "_neighbour_cosine_bwd_kernel", "_resample_bwd_rows_kernel"}
    assert torch.equal(loss_r, loss)
    torch.testing.assert_close(grad_r, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_only_backward_scales_in_the_kernel(monkeypatch, mode, dtype):
    """A backward from the loss alone (a training step's) hands the kernels the 0-dim fp32 loss
    gradient and the factor loss_scale / (B T N) instead of a scaled, expanded tensor: the bits of the
    general path (taken when the per-frame output's gradient, zero here, is present too), which
    scales in torch. fp64 takes the general path (the launch would pass the factor's tail as fp32).
    The custom ops reduce the loss in torch's own order (-w, then / B, / T, / N): equal to rounding."""
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import similarity

    _select_backward(monkeypatch, mode)
    g = torch.Generator().manual_seed(11)
    p = torch.randn(2, 3, 12, 24, generator=g, dtype=torch.float64).to(DEV, dtype).requires_grad_(True)
    f = torch.randn(2, 3, 9, 24, generator=g, dtype=torch.float64).to(DEV, dtype)
    kw = dict(projected_grid=(3, 4), features_grid=(3, 3), adjacent_distance=2, cumulative_neighbors=True,
              adjacent_tau=0.7, weight=0.3, backend="triton")
    seen = []
    name = {"two_pass": "_launch_backward", "merged": "_launch_merged_backward", "rows": "_launch_row_backward"}[mode]
    real = getattr(similarity, name)

    def spy(*a, **k):
        seen.append((a[5].dim(), k["g_total_scale"]))
        return real(*a, **k)

    monkeypatch.setattr(similarity, name, spy)

    def grad(extra=False):
        p.grad = None
        out = crepa_loss(p, f, **kw)
        (out.loss * 2.5 + (0 * out.alignment.sum() if extra else 0)).backward()
        return p.grad.clone()

    fast = grad()
    if dtype == torch.float32:  # the 0-dim g_loss, scaled in the kernel
        assert seen and all(s == (0, -0.3 / (2 * 3 * 9)) for s in seen)
    else:
        assert seen and all(s == (3, 1.0) for s in seen)
    seen.clear()
    general = grad(extra=True)
    assert seen and all(dim == 3 and scale == 1.0 for dim, scale in seen)
    assert torch.equal(fast, general)
    monkeypatch.setattr(similarity, "direct_launch_ok", lambda *tensors: False)
    through_ops = grad()
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(fast, through_ops, rtol=tol, atol=tol * through_ops.abs().max().item())


@pytest.mark.parametrize("weight", [1e-39, 0.0])
def test_loss_only_backward_leaves_factors_outside_fp32_normal_range_to_torch(monkeypatch, weight):
    """A factor loss_scale / (B T N) that the kernels' fp32 head and tail cannot carry as torch's fp32
    scalar (past fp32's largest value, in its subnormal range, or 0) is applied by torch, as before.
    (crepa_loss refuses a weight past fp32's largest value, so that side is checked on the helper.)"""
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import similarity

    g32 = torch.ones((), dtype=torch.float32)
    assert not similarity._fp32_kernel_factor(1e39, g32) and not similarity._fp32_kernel_factor(-1e39, g32)
    assert similarity._fp32_kernel_factor(3e38, g32) and not similarity._fp32_kernel_factor(3e38, g32.double())

    seen = []
    real = similarity._launch_backward
    monkeypatch.setattr(similarity, "_launch_backward",
                        lambda *a, **k: seen.append((a[5].dim(), k["g_total_scale"])) or real(*a, **k))
    g = torch.Generator().manual_seed(4)
    p = torch.randn(1, 2, 6, 8, generator=g).to(DEV).requires_grad_(True)
    f = torch.randn(1, 2, 6, 8, generator=g).to(DEV)
    crepa_loss(p, f, weight=weight, backend="triton").loss.backward()
    assert seen and all(s == (3, 1.0) for s in seen)
    p.grad = None
    seen.clear()
    crepa_loss(p, f, weight=0.5, backend="triton").loss.backward()
    assert seen and all(dim == 0 for dim, _ in seen)


@pytest.mark.parametrize("p_dtype,f_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                             (torch.float16, torch.float64)])
def test_a_float64_side_makes_the_kernels_compute_in_float64(p_dtype, f_dtype):
    # the torch backend computes in float64 when either input is: the kernels must too (their
    # accumulation dtype comes from both inputs, not from one)
    from crepa_kernels import crepa_loss

    g = torch.Generator().manual_seed(8)
    p = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64).to(DEV, p_dtype).requires_grad_(True)
    f = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64).to(DEV, f_dtype)
    out = {}
    for backend in ("torch", "triton"):
        res = crepa_loss(p, f, backend=backend, projected_grid=(2, 2), features_grid=(2, 2))
        out[backend] = (res.alignment, torch.autograd.grad(res.loss, p)[0])
    (a_t, g_t), (a_k, g_k) = out["torch"], out["triton"]
    assert a_k.dtype == a_t.dtype == torch.float64 and g_k.dtype == g_t.dtype == p_dtype
    torch.testing.assert_close(a_k, a_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_k, g_t, rtol=1e-3 if p_dtype == torch.float16 else 1e-10, atol=1e-12)
