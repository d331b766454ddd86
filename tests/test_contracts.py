"""Contracts of the logic around the kernels that a user's numbers depend on: config keys reaching the
loss, the schedule's EMA, latch and state (SPEC 6), token and frame alignment edge cases (SPEC 1-2),
backend dispatch, and when CrepaLoss records a graph or makes a collective.

Each expected value is derived here from SPEC (sections 1, 2, 5, 6) or from a documented contract.
"""
import math
import warnings

import pytest
import torch

from crepa_kernels import CrepaConfig, CrepaLoss, CrepaScheduler, crepa_loss
from crepa_kernels import functional
from crepa_kernels.functional import last_backend_choice, resolve_backend
from crepa_kernels.ops.utils import triton_available
from crepa_kernels.reference import temporal_indices
from crepa_kernels.schedule import parse_state

BACKENDS = ["torch", "triton"]


def cfg(**kw):
    kw.setdefault("enabled", True)
    kw.setdefault("block_index", 0)
    return CrepaConfig(**kw)


def _count_saved(fn):
    """(fn's result, number of tensors saved for backward while it ran)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, len(saved)


# ------------------------------------------------------------------------------------ schedule (SPEC 6)


def test_tensor_ema_weights_the_history_by_the_decay():
    # SPEC 6.1: ema = decay * ema + (1 - decay) * similarity. The device-tensor path (no threshold: what
    # CrepaLoss logs as crepa_alignment_score_ema on every step) must follow it with an asymmetric decay.
    s = CrepaScheduler(CrepaConfig(similarity_ema_decay=0.9), max_train_steps=10)
    want = None
    for step, x in enumerate([0.2, 0.6, 1.0, -0.4]):
        want = x if want is None else 0.9 * want + 0.1 * x
        s.get_weight(step, similarity=torch.tensor(x))
        assert torch.is_tensor(s.similarity_ema)
        assert float(s.similarity_ema) == pytest.approx(want, abs=1e-6), step
    assert want == pytest.approx(0.2444)  # hand check of the recurrence: 0.2 -> 0.24 -> 0.316 -> 0.2444


def test_a_nan_ema_from_the_tensor_path_is_replaced_by_the_first_finite_score_after_resume():
    # The class docstring: while every score was non-finite the tensor path's EMA is NaN, and "the first
    # finite score replaces it". That must hold after a resume into a thresholded schedule (float path).
    first = CrepaScheduler(CrepaConfig(similarity_ema_decay=0.9), max_train_steps=10)
    first.get_weight(0, similarity=torch.tensor(float("nan")))
    state = first.state_dict()
    assert math.isnan(state["similarity_ema"])
    resumed = CrepaScheduler(CrepaConfig(similarity_threshold=0.5, similarity_ema_decay=0.9), max_train_steps=10)
    resumed.load_state_dict(state)
    assert resumed.get_weight(1, similarity=0.3) == 0.5  # SPEC 6.1: taken as is; 0.3 < 0.5: not cut off
    assert resumed.similarity_ema == pytest.approx(0.3)
    assert resumed.get_weight(2, similarity=1.0) == 0.5  # 0.9 * 0.3 + 0.1 * 1.0 = 0.37 < 0.5
    assert resumed.similarity_ema == pytest.approx(0.37)


def test_with_a_threshold_the_ema_of_a_tensor_score_is_a_float():
    # Documented: with a threshold a tensor score is read once and the EMA is a float (its decision reads
    # it on the host); CrepaLoss's docstring says the logged EMA is a float then.
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.9), max_train_steps=10)
    s.get_weight(0, similarity=torch.tensor(0.3))
    assert type(s.similarity_ema) is float and s.similarity_ema == pytest.approx(0.3)
    m = CrepaLoss(cfg(similarity_threshold=0.9), 4, 4)  # log_tensors=True
    _, logs = m(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=0)
    assert type(logs["crepa_alignment_score_ema"]) is float


def test_recoverable_mode_clears_a_latch_it_was_resumed_with():
    # SPEC 6.2/6.4: only a *permanent* cutoff returns 0 from the latch; recoverable mode clears its latch
    # when the condition no longer holds (e.g. a run cut off in permanent mode, resumed as recoverable).
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.5, threshold_mode="recoverable"), max_train_steps=10)
    s.load_state_dict({"similarity_ema": 0.2, "cut_off": True})
    assert s.get_weight(3, similarity=0.2) == 0.5  # EMA 0.2 < 0.5 and no cutoff step: lambda
    assert not s.is_cutoff() and s.state_dict()["cut_off"] is False
    # permanent mode, same state: stays off (SPEC 6.2)
    p = CrepaScheduler(CrepaConfig(similarity_threshold=0.5), max_train_steps=10)
    p.load_state_dict({"similarity_ema": 0.2, "cut_off": True})
    assert p.get_weight(3, similarity=0.2) == 0.0 and p.is_cutoff()


def test_peek_weight_sets_no_latch():
    # peek_weight's contract: "leaving the state as it is (no EMA update, no latch set or cleared)".
    s = CrepaScheduler(CrepaConfig(cutoff_step=5), max_train_steps=10)
    assert s.peek_weight(7) == 0.0  # past the cutoff step
    assert not s.is_cutoff() and s.state_dict() == {"similarity_ema": None, "cut_off": False}
    assert s.get_weight(2) == 0.5  # training before the cutoff step is still weighted


def test_an_eval_call_past_the_cutoff_step_does_not_latch_the_training_schedule():
    # A validation pass called with a step past crepa_cutoff_step must not switch CREPA off for training.
    torch.manual_seed(0)
    m = CrepaLoss(cfg(cutoff_step=5), 4, 4)
    h, f = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    before = m.scheduler.state_dict()
    m.eval()
    loss, logs = m(h, f, step=7)
    assert loss is None and logs["crepa_cutoff"] is True and logs["crepa_weight"] == 0.0
    assert m.scheduler.state_dict() == before
    m.train()
    loss, logs = m(h, f, step=2)
    assert loss is not None and logs["crepa_weight"] == 0.5 and logs["crepa_cutoff"] is False


def test_a_disabled_config_gets_no_horizon_warning():
    # The horizon warning is for a schedule that will run: a trainer with CREPA off may carry any schedule.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrepaScheduler(CrepaConfig(scheduler="cosine"))  # enabled=False, no horizon
    with pytest.warns(UserWarning, match="horizon"):
        CrepaScheduler(cfg(scheduler="cosine"))


@pytest.mark.parametrize("bad", [[2, 0, 0, 0], [1, 2, 0, 0], [1, 0, 0, 3], [1, 1, 0, -1]])
def test_a_state_tensor_with_an_unknown_format_or_flag_is_refused(bad):
    # the checkpoint's int64 form: [format 1, has EMA 0/1, EMA bits, cutoff latch 0/1]
    with pytest.raises(ValueError, match="expected format 1 and 0/1 flags"):
        parse_state(torch.tensor(bad, dtype=torch.int64))
    m = CrepaLoss(cfg(), 4, 4)
    before = m.scheduler.state_dict()
    with pytest.raises(RuntimeError, match="_extra_state"):
        m.load_state_dict({**m.state_dict(), "_extra_state": torch.tensor(bad, dtype=torch.int64)})
    assert m.scheduler.state_dict() == before


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("spelling", ["none", " None ", "null", ""])
def test_a_string_none_threshold_means_off_in_the_constructor_and_on_assignment(spelling):
    # as every other optional key (block_index, teacher_block_index ...): a CLI/YAML spelling of none
    assert CrepaConfig(similarity_threshold=spelling).similarity_threshold is None
    c = CrepaConfig(similarity_threshold=0.5)
    c.similarity_threshold = spelling
    assert c.similarity_threshold is None


# ------------------------------------------------------------------ token / temporal alignment (SPEC 1-2)


def _swapped_pairs(frames):
    """projected tokens (e0, e1), teacher tokens (e1, e0) in every frame: each token's cosine is 0, but the
    token means are equal (cosine 1), so pooling and not pooling give different numbers."""
    p = torch.zeros(1, frames, 2, 4)
    p[:, :, 0, 0] = 1.0
    p[:, :, 1, 1] = 1.0
    f = p.flip(2).clone()
    return p, f


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_token_counts_are_not_pooled_without_spatial_align(backend):
    # SPEC 2: "If N == N_f (and no explicit grids say the layouts differ): nothing" comes before the
    # spatial_align rule: per-token cosines are 0 here, so every sim is 0 (pooled would give 1).
    p, f = _swapped_pairs(frames=3)
    out = crepa_loss(p, f, spatial_align=False, backend=backend)
    torch.testing.assert_close(out.self_similarity, torch.zeros(1, 3))
    torch.testing.assert_close(out.alignment, torch.zeros(1, 3))
    assert float(out.loss) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_counts_with_different_grids_pool_without_spatial_align(backend):
    # SPEC 2: grids that say the layouts differ ((1, 4) vs (2, 2)) and spatial_align off: both sides are
    # mean-pooled to one token. Projected (e0, e1, e0, e1), teacher (e1, e0, e1, e0): the means are equal.
    p = torch.zeros(1, 2, 4, 4)
    p[:, :, 0::2, 0] = 1.0
    p[:, :, 1::2, 1] = 1.0
    f = torch.zeros(1, 2, 4, 4)
    f[:, :, 0::2, 1] = 1.0
    f[:, :, 1::2, 0] = 1.0
    out = crepa_loss(p, f, spatial_align=False, projected_grid=(1, 4), features_grid=(2, 2), backend=backend)
    e = math.exp(-1)
    torch.testing.assert_close(out.self_similarity, torch.ones(1, 2))
    torch.testing.assert_close(out.alignment, torch.full((1, 2), 1 + e))  # T=2, d=1: one neighbour each
    assert float(out.loss) == pytest.approx(-(1 + e), abs=1e-6)


@pytest.mark.parametrize("grid,msg", [((-2, -2), "must have positive sides"), ((True, 4), "pair of ints"),
                                      ((4, False), "pair of ints")])
def test_a_grid_with_non_positive_or_boolean_sides_is_refused(grid, msg):
    # (-2, -2) and (True, 4) both "describe" 4 tokens by h * w: they must still be refused by name
    p, f = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=msg):
        crepa_loss(p, f, projected_grid=grid, backend="torch")
    with pytest.raises(ValueError, match=msg):
        crepa_loss(p, f, features_grid=grid, backend="torch")


def test_temporal_indices_floor_the_linspace():
    # SPEC 1: idx = floor(linspace(0, T_long - 1, T_short)); linspace(0, 3, 3) = (0, 1.5, 3) -> (0, 1, 3)
    assert temporal_indices(4, 3).tolist() == [0, 1, 3]
    assert temporal_indices(6, 4).tolist() == [0, 1, 3, 5]  # (0, 5/3, 10/3, 5)
    assert temporal_indices(5, 2).tolist() == [0, 4]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("longer", ["features", "projected"])
def test_temporal_alignment_keeps_the_floored_frames(backend, longer):
    # 4 frames against 3: frames (0, 1, 3) of the longer side are kept. Frame u of the longer side is e_u,
    # the shorter side's frame t is e_(0, 1, 3)[t]: with d=0 every self cosine is 1 only for that choice
    # (rounding would keep frame 2, cosine 0 there).
    eye = torch.eye(4)
    long_side = eye.reshape(1, 4, 1, 4).expand(1, 4, 2, 4).clone()
    short_side = eye[[0, 1, 3]].reshape(1, 3, 1, 4).expand(1, 3, 2, 4).clone()
    p, f = (short_side, long_side) if longer == "features" else (long_side, short_side)
    out = crepa_loss(p, f, adjacent_distance=0, backend=backend)
    torch.testing.assert_close(out.self_similarity, torch.ones(1, 3))
    assert float(out.loss) == pytest.approx(-1.0, abs=1e-6)


# -------------------------------------------------------------------------------- dispatch / validation


def test_auto_picks_triton_for_gpu_tensors_and_torch_elsewhere():
    # DESIGN: "auto" picks Triton for GPU tensors and torch elsewhere (only the device's type is read).
    if not triton_available():
        pytest.skip("triton does not import")
    backend, reason = resolve_backend("auto", torch.device("cuda"))
    assert backend == "triton" and "auto" in reason
    assert resolve_backend("auto", torch.device("cpu"))[0] == "torch"


def test_inputs_on_different_devices_are_named(monkeypatch):
    # With one device, a meta teacher stands in for a second one: let it past the meta check only,
    # so the device check is what must name the problem.
    real = functional._check_tensor

    def lenient(name, t):
        return t if t.device.type == "meta" else real(name, t)

    monkeypatch.setattr(functional, "_check_tensor", lenient)
    with pytest.raises(ValueError, match="projected is on cpu but features is on meta"):
        crepa_loss(torch.randn(1, 2, 3, 4), torch.empty(1, 2, 3, 4, device="meta"), backend="torch")


# ----------------------------------------------------------------------------- CrepaLoss config plumbing


def _e0_module(align_with_e0, **kw):
    m = CrepaLoss(cfg(**kw), 4, 4)
    return m, align_with_e0(m)  # every cosine is 1, T = 3


def test_crepa_normalize_by_frames_false_reaches_the_loss(align_with_e0):
    # SPEC 5 without the division by T: per_video = sum_t total = 3 + 4e^-1, loss = -0.5 * (3 + 4e^-1)
    m, aligned = _e0_module(align_with_e0, normalize_by_frames=False)
    loss, _ = m(torch.randn(1, 3, 2, 4), aligned, step=0)
    assert float(loss.detach()) == pytest.approx(-0.5 * (3 + 4 * math.exp(-1)), abs=1e-5)


def test_crepa_normalize_neighbour_sum_reaches_the_loss(align_with_e0):
    # SPEC 4: total[t] / (1 + sum of the weights used) with every cosine 1 is exactly 1 for every frame
    m, aligned = _e0_module(align_with_e0, normalize_neighbour_sum=True)
    loss, logs = m(torch.randn(1, 3, 2, 4), aligned, step=0)
    assert float(logs["crepa_alignment_score"]) == pytest.approx(1.0, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-0.5, abs=1e-5)


def test_crepa_adjacent_tau_reaches_the_loss(align_with_e0):
    # SPEC 4 with tau = 2: w_1 = e^-1/2, total = (1 + w, 1 + 2w, 1 + w), score = 1 + 4w/3
    m, aligned = _e0_module(align_with_e0, adjacent_tau=2.0)
    loss, logs = m(torch.randn(1, 3, 2, 4), aligned, step=0)
    w = math.exp(-0.5)
    assert float(logs["crepa_alignment_score"]) == pytest.approx(1 + 4 * w / 3, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-0.5 * (1 + 4 * w / 3), abs=1e-5)


def test_crepa_backend_reaches_the_loss():
    # crepa_backend='triton' (the interpreter on a CPU) must be the backend the module's call used
    m = CrepaLoss(cfg(backend="triton"), 4, 4)
    m(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), step=0)
    assert last_backend_choice()["backend"] == "triton"
    m = CrepaLoss(cfg(backend="torch"), 4, 4)
    m(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), step=0)
    assert last_backend_choice()["backend"] == "torch"


# ------------------------------------------------------------------------------- CrepaLoss graphs, eval


def test_a_permanently_cut_off_thresholded_step_records_nothing_for_backward():
    # Docstring: no graph when the weight is 0, "except with a similarity threshold *before* a permanent
    # cutoff". After it the weight is known to be 0 from the latch: nothing is saved for backward.
    m = CrepaLoss(cfg(similarity_threshold=0.5), 4, 4)
    m.scheduler.load_state_dict({"similarity_ema": 0.9, "cut_off": True})
    hidden = torch.randn(1, 3, 2, 4, requires_grad=True)
    (loss, logs), saved = _count_saved(lambda: m(hidden, torch.randn(1, 3, 2, 4), step=3))
    assert loss is None and logs["crepa_cutoff"] is True and saved == 0
    # the step's score still reaches the EMA (SPEC 6.1 happens before the cutoff)
    assert m.scheduler.similarity_ema == pytest.approx(0.99 * 0.9 + 0.01 * logs["crepa_alignment_score"])


def test_an_eval_call_with_weight_zero_records_nothing_for_backward():
    m = CrepaLoss(cfg(warmup_steps=10), 4, 4).eval()
    hidden = torch.randn(1, 3, 2, 4, requires_grad=True)
    (loss, logs), saved = _count_saved(lambda: m(hidden, torch.randn(1, 3, 2, 4), step=0))
    assert loss is None and logs["crepa_cutoff"] is True and saved == 0
    (loss, _), saved = _count_saved(lambda: m(hidden, torch.randn(1, 3, 2, 4), step=5))
    assert loss.requires_grad and saved > 0


def test_an_eval_call_with_check_finite_makes_no_collective(monkeypatch):
    # Docstring: in eval mode "no collective runs", so one rank alone may validate; check_finite included.
    import crepa_kernels.module as module

    def collective(*args, **kwargs):
        raise AssertionError("a collective in an eval-mode call")

    monkeypatch.setattr(module, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", collective)
    m = CrepaLoss(cfg(check_finite=True), 4, 4).eval()
    loss, _ = m(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=1)
    assert loss is not None
    bad = torch.randn(1, 3, 2, 4)
    bad[0, 1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="^frame_features holds NaN or Inf values \\(crepa_check_finite=True\\)"):
        m(torch.randn(1, 3, 2, 4), bad, step=1)
