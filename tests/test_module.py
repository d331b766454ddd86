"""CrepaLoss: projector layout, schedule wiring, logs and errors."""
import math
import warnings

import pytest
import torch
from torch import nn

from crepa_kernels import CrepaConfig, CrepaLoss, crepa_loss


def cfg(**kw):
    kw.setdefault("enabled", True)
    kw.setdefault("block_index", 0)
    return CrepaConfig(**kw)


def test_projector_matches_the_trainer_layout():
    m = CrepaLoss(cfg(), hidden_size=12, encoder_dim=7)
    assert list(m.projector.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert isinstance(m.projector[0], nn.LayerNorm) and isinstance(m.projector[1], nn.Linear)
    assert all(p.dtype == torch.float32 for p in m.projector.parameters())
    ref = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 7))
    m.projector.load_state_dict(ref.state_dict())  # a trainer checkpoint loads unchanged


def test_forward_equals_projector_then_functional_loss():
    torch.manual_seed(0)
    m = CrepaLoss(cfg(lambda_=0.3, adjacent_distance=2, cumulative_neighbors=True), 12, 8)
    hidden = torch.randn(2, 4, 6, 12, dtype=torch.bfloat16, requires_grad=True)
    feats = torch.randn(2, 9, 9, 8)
    loss, logs = m(hidden, feats, step=3, hidden_grid=(4, 2, 3))
    projected = m.projector(hidden.detach().float())
    ref = crepa_loss(projected, feats, adjacent_distance=2, cumulative_neighbors=True, projected_grid=(2, 3),
                     weight=0.3, backend="torch")
    assert torch.allclose(loss, ref.loss, atol=1e-6)
    assert torch.allclose(logs["crepa_alignment_score"], ref.alignment.mean(), atol=1e-6)
    assert torch.allclose(logs["crepa_similarity_self"], ref.self_similarity.mean(), atol=1e-6)
    assert logs["crepa_weight"] == pytest.approx(0.3) and logs["crepa_cutoff"] is False
    loss.backward()
    assert hidden.grad is not None and m.projector[1].weight.grad is not None


def test_zero_weight_skips_the_loss_and_builds_no_graph():
    m = CrepaLoss(cfg(warmup_steps=10), 4, 4)
    hidden = torch.randn(1, 3, 2, 4, requires_grad=True)
    loss, logs = m(hidden, torch.randn(1, 3, 2, 4), step=0)
    assert loss is None and logs["crepa_cutoff"] is True and logs["crepa_weight"] == 0.0
    assert not logs["crepa_alignment_score"].requires_grad and logs["crepa_alignment_score"].grad_fn is None
    loss, logs = m(hidden, torch.randn(1, 3, 2, 4), step=5)
    assert loss is not None and logs["crepa_weight"] == pytest.approx(0.25)


def test_similarity_threshold_cuts_off_and_logs_the_ema(align_with_e0):
    m = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4, log_tensors=False)
    feats = torch.randn(1, 3, 2, 4)
    aligned = align_with_e0(m)  # projected == e0 for every token, and the teacher too
    loss, logs = m(torch.randn(1, 3, 2, 4), aligned, step=0)
    # every cosine is 1: score = 1 + 2e^-1 on average over the three frames ((1+e)+(1+2e)+(1+e))/3
    assert logs["crepa_alignment_score"] == pytest.approx(1 + 4 * math.exp(-1) / 3, abs=1e-5)
    assert loss is None and logs["crepa_cutoff"] is True
    assert logs["crepa_alignment_score_ema"] == pytest.approx(logs["crepa_alignment_score"])
    assert isinstance(logs["crepa_alignment_score"], float)
    loss, logs = m(torch.randn(1, 3, 2, 4), feats, step=1)  # permanent: stays off
    # ... and, as in the common trainer, the step's score is still computed and fed to the EMA
    # (decay 0: the EMA is the last score).
    assert loss is None and logs["crepa_cutoff"] is True and logs["crepa_weight"] == 0.0
    assert logs["crepa_alignment_score_ema"] == pytest.approx(logs["crepa_alignment_score"])
    assert logs["crepa_alignment_score"] != pytest.approx(1 + 4 * math.exp(-1) / 3, abs=1e-3)


def test_logs_as_floats():
    m = CrepaLoss(cfg(), 4, 4, log_tensors=False)
    _, logs = m(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert all(isinstance(v, (float, bool)) for v in logs.values())


@pytest.mark.parametrize("call,msg", [
    (lambda m: m(torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4)), "built for hidden_size=4"),
    (lambda m: m(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 6)), "encoder_dim=4"),
    (lambda m: m(torch.randn(2, 3, 4, 5, 4), torch.randn(1, 2, 3, 4)), "hidden_states must be (B, T, N, D)"),
    (lambda m: m(torch.randn(1, 2, 3, 4), "feats"), "frame_features must be a torch.Tensor"),
    (lambda m: m(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 4, 4), hidden_grid=(2, 2)), "describes 4 tokens"),
    # grid mode from one grid: the other side must be a square, and the error names this call's argument
    (lambda m: m(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 16, 4), feature_grid=(4, 4)),
     "hidden_grid is required: feature_grid switches to grid mode"),
    (lambda m: m(torch.randn(1, 2, 16, 4), torch.randn(1, 2, 6, 4), hidden_grid=(4, 4)),
     "feature_grid is required: hidden_grid switches to grid mode"),
    (lambda m: m(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).to(torch.float8_e4m3fn)),
     "frame_features must be fp16, bf16, fp32 or fp64, got torch.float8_e4m3fn"),
    # the meta device stands in for another GPU: named here, not by a torch error inside the projector
    (lambda m: m(torch.randn(1, 2, 3, 4, device="meta"), torch.randn(1, 2, 3, 4, device="meta")),
     "hidden_states is on meta but this CrepaLoss's projector is on cpu"),
    (lambda m: m.project(torch.randn(1, 2, 3, 4, device="meta")),
     "hidden_states is on meta but this CrepaLoss's projector is on cpu"),
])
def test_forward_errors(call, msg):
    m = CrepaLoss(cfg(), 4, 4)
    before = m.scheduler.state_dict()
    with pytest.raises((ValueError, TypeError)) as e:
        call(m)
    assert msg in str(e.value)
    assert m.scheduler.state_dict() == before


@pytest.mark.parametrize("check_finite", [False, True])
def test_hidden_states_in_any_floating_dtype_are_read_as_float32(check_finite):
    # the projector computes projector(hidden.float()): an fp8 activation is as good as its fp32 value
    m = CrepaLoss(cfg(check_finite=check_finite), 4, 4)
    h = torch.randn(1, 2, 3, 4).to(torch.float8_e4m3fn)
    f = torch.randn(1, 2, 3, 4)
    loss8, _ = m(h, f)
    loss32, _ = m(h.float(), f)
    assert torch.equal(loss8, loss32)


def test_check_finite_points_at_the_magnitude_of_finite_hidden_states():
    # finite hidden states past ~1e19 overflow the LayerNorm's float32 variance: the error must not
    # send the user to the projector's weights alone
    m = CrepaLoss(cfg(check_finite=True), 4, 4)
    h, f = torch.randn(1, 2, 3, 4) * 1e20, torch.randn(1, 2, 3, 4)
    assert torch.isfinite(h).all()
    with pytest.raises(ValueError, match="^the projector's output .*hidden states too large for its math.* "
                                         "holds NaN or Inf values"):
        m(h, f, step=3)


@pytest.mark.parametrize("where", ["hidden_states", "frame_features", "projector"])
def test_check_finite_names_the_input_that_holds_nan(where):
    m = CrepaLoss(cfg(check_finite=True), 4, 4)
    h, f = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    if where == "hidden_states":
        h[0, 1, 2, 3] = float("nan")
        f[0, 0, 0, 0] = float("inf")  # the first input in call order is named
    elif where == "frame_features":
        f[0, 0, 0, 0] = float("inf")
    else:
        with torch.no_grad():
            next(l for l in m.projector if isinstance(l, nn.Linear)).weight[0, 0] = float("nan")
        where = "the projector's output"
    before = m.scheduler.state_dict()
    with pytest.raises(ValueError, match=f"^{where}.* holds NaN or Inf values \\(crepa_check_finite=True\\)"):
        m(h, f, step=3)
    assert m.scheduler.state_dict() == before
    m2 = CrepaLoss(cfg(), 4, 4)  # off by default: NaN propagates, as in the reference
    m2.load_state_dict(m.state_dict())
    loss, _ = m2(h, f, step=3)
    assert torch.isnan(loss)


def test_constructor_errors():
    with pytest.raises(TypeError, match="config must be a CrepaConfig"):
        CrepaLoss({"crepa_lambda": 1}, 4, 4)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        CrepaLoss(cfg(), 0, 4)


def test_projector_stays_float32_when_cast_with_its_parent():
    m = CrepaLoss(cfg(), 4, 4)
    before = [p.detach().clone() for p in m.projector.parameters()]
    parent = nn.Module()
    parent.crepa_projector = m.projector
    parent.to(torch.bfloat16)
    m.bfloat16()
    assert all(p.dtype == torch.float32 for p in m.projector.parameters())
    # the values too: not rounded through bf16 on the way
    assert all(torch.equal(p, q) for p, q in zip(m.projector.parameters(), before))
    loss, _ = m(torch.randn(1, 2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 2, 3, 4))
    assert loss.dtype == torch.float32


def test_schedule_state_survives_a_checkpoint_round_trip(align_with_e0):
    m = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4)
    aligned = align_with_e0(m)  # projected == e0 for every token, and the teacher too
    loss, _ = m(torch.randn(1, 3, 2, 4), aligned, step=0)
    assert loss is None and m.scheduler.is_cutoff()
    resumed = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4)
    resumed.load_state_dict(m.state_dict())
    assert resumed.scheduler.is_cutoff()
    assert resumed.scheduler.similarity_ema == pytest.approx(m.scheduler.similarity_ema)
    loss, logs = resumed(torch.randn(1, 3, 2, 4), aligned, step=1)
    assert loss is None and logs["crepa_cutoff"] is True


def test_alignment_ema_is_kept_without_threshold_and_stays_on_the_device():
    m = CrepaLoss(cfg(similarity_ema_decay=0.5), 4, 4)
    feats = torch.randn(1, 3, 2, 4)
    scores = []
    for step in range(3):
        _, logs = m(torch.randn(1, 3, 2, 4), feats, step=step)
        scores.append(float(logs["crepa_alignment_score"]))
        assert torch.is_tensor(logs["crepa_alignment_score_ema"])  # no host read was needed
    ema = scores[0]
    for s in scores[1:]:
        ema = 0.5 * ema + 0.5 * s
    assert float(logs["crepa_alignment_score_ema"]) == pytest.approx(ema, abs=1e-6)


def test_without_spatial_align_token_counts_that_differ_pool_whatever_grid_is_given():
    # SPEC 2: pooling comes before grid mode and needs no layout, so a side without a grid may have a
    # token count that is no square; with equal counts the layouts decide, and then a grid is needed.
    torch.manual_seed(0)
    m = CrepaLoss(cfg(spatial_align=False), 4, 4)
    h, f = torch.randn(1, 3, 6, 4), torch.randn(1, 3, 12, 4)
    m.check_hidden(torch.randn(1, 3, 10, 4), grid_mode=True)  # the features' count is not known yet
    loss, _ = m(h, f, step=0, hidden_grid=(2, 3))
    want, _ = m(h, f, step=0)  # no grids: pooled as well
    assert torch.equal(loss, want)
    assert torch.equal(m(f, h, step=0, feature_grid=(2, 3))[0], m(f, h, step=0)[0])
    with pytest.raises(ValueError, match="feature_grid is required: hidden_grid switches to grid mode"):
        m(torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4), hidden_grid=(2, 3))
    on = CrepaLoss(cfg(), 4, 4)
    with pytest.raises(ValueError, match="hidden_grid is required: feature_grid switches to grid mode"):
        on.check_hidden(torch.randn(1, 3, 10, 4), grid_mode=True)


def test_a_projector_placed_by_its_own_hooks_is_not_refused_for_its_current_device():
    # accelerate-style offload moves the weights in a pre-forward hook: where they are before the call
    # says nothing (the meta device stands in for the compute device here)
    m = CrepaLoss(cfg(), 4, 4)
    m.projector.register_forward_pre_hook(lambda module, args: module.to("meta") and None)
    out = m.project(torch.randn(1, 2, 3, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 2, 3, 4)


def test_logged_tensors_are_copies_an_in_place_op_on_them_changes_no_state():
    # e.g. a dist.all_reduce over every logged tensor: neither the schedule's EMA (read by the next step
    # and state_dict()) nor the returned loss may change with it.
    m = CrepaLoss(cfg(similarity_ema_decay=0.5), 4, 4)
    fresh = CrepaLoss(cfg(similarity_ema_decay=0.5), 4, 4)
    fresh.load_state_dict(m.state_dict())
    h, f = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    loss, logs = m(h, f, step=0)
    fresh_loss, _ = fresh(h, f, step=0)
    value = loss.item()
    for v in logs.values():
        if torch.is_tensor(v):
            v.mul_(100.0)
    assert loss.item() == value
    assert m.scheduler.state_dict() == fresh.scheduler.state_dict()
    _, logs = m(h, f, step=1)
    _, fresh_logs = fresh(h, f, step=1)
    assert logs["crepa_alignment_score_ema"].item() == fresh_logs["crepa_alignment_score_ema"].item()


def test_a_flat_block_output_read_as_one_token_frames_warns():
    # (B, T*H*W, D) passes as T*H*W one-token frames (SPEC's (B, T, D) form, read as the reference
    # reads it), which is never meant against a multi-token teacher with fewer frames
    m = CrepaLoss(cfg(), 8, 6)
    with pytest.warns(UserWarning, match=r"hidden_states \(1, 12, 8\) reads as 12 frames of one token each, "
                                         r"against 3 teacher frames of 4 tokens") as seen:
        m(torch.randn(1, 3 * 4, 8), torch.randn(1, 3, 4, 6))
    assert seen[0].filename == __file__  # points at the call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(1, 3, 8), torch.randn(1, 3, 4, 6))  # one token per frame, frame for frame
        m(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 6))
        m(torch.randn(1, 6, 8), torch.randn(1, 3, 6))  # both sides one token per frame
        m(torch.randn(1, 6, 8), torch.randn(1, 3, 4, 6))  # per-frame states, more frames (SPEC subsamples)


def test_a_disabled_config_switches_crepa_off(monkeypatch):
    # crepa_enabled false (the default) turns CREPA off, as in the common trainer: no term, empty logs,
    # no work (the loss is never computed), no schedule state; building such a module warns.
    import crepa_kernels.module as module

    with pytest.warns(UserWarning, match="crepa_enabled is false: this CrepaLoss computes nothing"):
        m = CrepaLoss(CrepaConfig(similarity_threshold=0.5), 4, 4)
    monkeypatch.setattr(module, "crepa_loss", lambda *a, **k: pytest.fail("computed while disabled"))
    h, f = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for training in (True, False):
        m.train(training)
        assert m(h, f, step=3) == (None, {})
    assert m.scheduler.state_dict() == {"similarity_ema": None, "cut_off": False}
    with pytest.raises(ValueError, match="hidden_size"):  # its arguments are still checked
        m(torch.randn(1, 2, 3, 5), f)
    monkeypatch.setattr(module, "_world_size", lambda: 2)  # DDP needs a (zero) term on the projector
    m.train()
    loss, logs = m(h, f, step=3)
    assert logs == {} and loss.item() == 0.0
    loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.projector.parameters())
    monkeypatch.undo()
    m.config.enabled = True  # switched on later: it computes
    loss, logs = m(h, f, step=3)
    assert loss is not None and "crepa_alignment_score" in logs


def test_distributed_cutoff_step_returns_a_finite_zero_attached_to_the_projector(monkeypatch, align_with_e0):
    # Under torch.distributed a thresholded step that cuts off returns a zero term so DDP sees every
    # projector parameter; it must not backpropagate through the loss's graph, where a NaN loss
    # would turn into NaN gradients (NaN * 0) on every rank.
    import crepa_kernels.module as module

    monkeypatch.setattr(module, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.mul_(2))  # 2 equal ranks
    m = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.0, threshold_mode="recoverable"), 4, 4)
    aligned = align_with_e0(m)  # projected == e0 for every token, and the teacher too
    m(torch.randn(1, 3, 2, 4), aligned, step=0)  # score 1 > 0.5: the EMA cuts CREPA off
    hidden = torch.randn(1, 3, 2, 4, requires_grad=True)
    loss, logs = m(hidden, torch.full((1, 3, 2, 4), float("nan")), step=1)  # a NaN loss on this step
    assert logs["crepa_cutoff"] is True and loss is not None and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is None  # nothing flowed back through the CREPA graph
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in m.projector.parameters())


def test_check_finite_under_torch_distributed_raises_for_another_ranks_nan(monkeypatch):
    # The flags are summed over the ranks: this rank's inputs are finite, another rank's frame features
    # are not, and this rank raises too (naming the input and how many ranks saw it).
    import crepa_kernels.module as module

    monkeypatch.setattr(module, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(torch.tensor([0.0, 1.0, 1.0])))
    m = CrepaLoss(cfg(check_finite=True), 4, 4)
    before = m.scheduler.state_dict()
    with pytest.raises(ValueError, match=r"frame_features holds NaN or Inf values on 1 of 2 ranks "
                                         r"\(crepa_check_finite=True\)"):
        m(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=1)
    assert m.scheduler.state_dict() == before


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_eval_mode_calls_leave_the_schedule_alone_and_make_no_collective(monkeypatch, threshold):
    # A validation pass (crepa.eval()), perhaps on one rank only: the loss and scores at the weight the
    # schedule gives now, no EMA update, no latch, and no all_reduce, which would wait for the other
    # ranks forever.
    import crepa_kernels.module as module

    def collective(*args, **kwargs):
        raise AssertionError("a collective in an eval-mode call")

    monkeypatch.setattr(module, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", collective)
    torch.manual_seed(0)
    m = CrepaLoss(cfg(similarity_threshold=threshold, similarity_ema_decay=0.5, warmup_steps=4), 4, 4)
    m.scheduler.load_state_dict({"similarity_ema": 0.25, "cut_off": False})
    h, f = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    before = m.scheduler.state_dict()
    m.eval()
    loss, logs = m(h, f, step=2)
    assert m.scheduler.state_dict() == before
    assert logs["crepa_weight"] == 0.25 and logs["crepa_cutoff"] is False  # warmup: 0.5 * 2 / 4
    want = crepa_loss(m.projector(h), f, weight=0.25).loss
    torch.testing.assert_close(loss, want)
    assert float(logs["crepa_alignment_score_ema"]) == 0.25  # the EMA as it was
    loss, logs = m(h, f, step=0)  # weight 0: no term, the scores still logged
    assert loss is None and logs["crepa_cutoff"] is True and m.scheduler.state_dict() == before
    m.train()
    if threshold is not None:  # a training call with a threshold is a collective
        with pytest.raises(AssertionError, match="a collective"):
            m(h, f, step=2)
    else:
        m(h, f, step=2)
        assert m.scheduler.state_dict() != before
    assert m.scheduler.state_dict() == before or threshold is None


def test_state_dict_without_the_schedule_entry_follows_torchs_missing_key_rules():
    # A projector-only checkpoint is refused under strict (a fresh schedule would switch CREPA back on
    # after a permanent cutoff); without strict the weights load and the schedule stays as it is.
    m = CrepaLoss(cfg(cutoff_step=1), 4, 4)
    m(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), step=1)
    assert m.scheduler.is_cutoff()
    state = {k: v for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
    fresh = CrepaLoss(cfg(cutoff_step=1), 4, 4)
    before = [p.detach().clone() for p in fresh.projector.parameters()]
    with pytest.raises(RuntimeError, match='(?s)nothing was loaded.*Missing key "_extra_state" .*strict=False'):
        fresh.load_state_dict(state)  # strict by default
    assert all(torch.equal(a, b) for a, b in zip(fresh.projector.parameters(), before))
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == ["_extra_state"]
    assert all(torch.equal(a, b) for a, b in zip(fresh.projector.parameters(), m.projector.parameters()))
    assert not fresh.scheduler.is_cutoff()
    parent = nn.Module()
    parent.crepa = CrepaLoss(cfg(), 4, 4)
    with pytest.raises(RuntimeError, match="crepa._extra_state"):  # nested under a prefix: torch's own report
        parent.load_state_dict({"crepa." + k: v for k, v in state.items()})
    assert parent.load_state_dict({"crepa." + k: v for k, v in state.items()}, strict=False).missing_keys == [
        "crepa._extra_state"]


def test_state_dict_saves_as_safetensors_with_the_schedule(tmp_path):
    # Trainers save with safetensors (accelerate's default), which holds tensors only: the schedule's
    # state must be one, and a resumed run must keep a permanent cutoff.
    from safetensors.torch import load_file, save_file

    m = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.25), 4, 4)
    m.scheduler.load_state_dict({"similarity_ema": 0.7123456789012345, "cut_off": True})
    state = m.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    save_file(state, str(tmp_path / "crepa.safetensors"))
    fresh = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.25), 4, 4)
    fresh.load_state_dict(load_file(str(tmp_path / "crepa.safetensors")))
    assert fresh.scheduler.state_dict() == {"similarity_ema": 0.7123456789012345, "cut_off": True}
    assert all(torch.equal(a, b) for a, b in zip(fresh.projector.parameters(), m.projector.parameters()))
    # a cast of the floating-point tensors (saving in bf16) leaves the schedule exact
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
    fresh.scheduler.load_state_dict({"similarity_ema": None, "cut_off": False})
    fresh.load_state_dict(half)
    assert fresh.scheduler.state_dict() == {"similarity_ema": 0.7123456789012345, "cut_off": True}
    # a cast of every tensor would garble it: refused, naming the entry, and nothing changes
    fresh.scheduler.load_state_dict({"similarity_ema": None, "cut_off": False})
    with pytest.raises(RuntimeError, match="_extra_state: the schedule's state tensor must be the 4-element int64"):
        fresh.load_state_dict({k: v.bfloat16() for k, v in state.items()})
    assert fresh.scheduler.state_dict() == {"similarity_ema": None, "cut_off": False}


def test_a_checkpoint_with_the_earlier_dict_form_of_the_schedule_loads():
    m = CrepaLoss(cfg(), 4, 4)
    state = {**m.state_dict(), "_extra_state": {"scheduler": {"similarity_ema": 0.25, "cut_off": True}}}
    m.load_state_dict(state)
    assert m.scheduler.state_dict() == {"similarity_ema": 0.25, "cut_off": True}


@pytest.mark.parametrize("zero_steps", ["warmup", "cutoff_step"])
def test_zero_weight_steps_feed_the_logged_ema_as_the_trainer_does(zero_steps):
    # The common trainer computes the score on every step and feeds it to the EMA, whatever the
    # weight. Ours skips the loss's graph on a zero-weight step but logs the same numbers: the
    # score of that step, and an EMA over every step, equal to a hand-computed one and to the EMA
    # a threshold that never triggers produces (that path always computes the score first).
    torch.manual_seed(3)
    settings = dict(warmup_steps=2) if zero_steps == "warmup" else dict(cutoff_step=2)
    steps = [(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)) for _ in range(4)]
    runs = {}
    for name, extra in (("plain", {}), ("threshold", dict(similarity_threshold=100.0))):
        m = CrepaLoss(cfg(similarity_ema_decay=0.5, **settings, **extra), 4, 4, log_tensors=False)
        if runs:
            m.projector.load_state_dict(runs["plain"][0].projector.state_dict())
        runs[name] = (m, [m(h, f, step=i)[1] for i, (h, f) in enumerate(steps)])
    m, logs = runs["plain"]
    with torch.no_grad():
        scores = [float(crepa_loss(m.projector(h), f, backend="torch").alignment.mean()) for h, f in steps]
    ema = scores[0]
    for i, log in enumerate(logs):
        if i:
            ema = 0.5 * ema + 0.5 * scores[i]
        assert log["crepa_alignment_score"] == pytest.approx(scores[i], abs=1e-6)
        assert log["crepa_alignment_score_ema"] == pytest.approx(ema, abs=1e-6)
        assert log["crepa_cutoff"] is (i == 0 if zero_steps == "warmup" else i >= 2)
    for plain, thresholded in zip(logs, runs["threshold"][1]):
        assert thresholded["crepa_alignment_score_ema"] == pytest.approx(plain["crepa_alignment_score_ema"], abs=1e-6)


def test_bad_inputs_fail_on_zero_weight_steps_too_and_leave_the_schedule_alone():
    m = CrepaLoss(cfg(warmup_steps=10), 4, 4)
    good = torch.randn(1, 3, 2, 4)
    cases = [
        (("not a tensor", good), TypeError, "hidden_states must be a torch.Tensor"),
        ((torch.randn(1, 3, 2, 5), good), ValueError, "hidden_states has D=5 .*hidden_size=4"),
        ((torch.ones(1, 3, 2, 4, dtype=torch.int64), good), TypeError, "hidden_states must be a floating-point"),
        ((torch.randn(1, 3, 2, 2, 4), good), ValueError, r"hidden_states must be \(B, T, N, D\)"),
        ((good, torch.tensor(1.0)), ValueError, r"frame_features must be \(B, T, N, D\)"),
        ((good, torch.randn(1, 3, 2, 3)), ValueError, "frame_features has D=3 .*encoder_dim=4"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            m(*args, step=0)  # weight 0 at step 0 of the warmup: still checked
    assert m.scheduler.similarity_ema is None and not m.scheduler.is_cutoff()


@pytest.mark.parametrize("detach_teacher", [True, False])
def test_the_teacher_gets_gradient_only_when_asked(detach_teacher):
    m = CrepaLoss(cfg(), 4, 4, detach_teacher=detach_teacher)
    hidden = torch.randn(1, 3, 2, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 4, requires_grad=True)  # e.g. a deeper block's output, not detached
    loss, _ = m(hidden, teacher, step=0)
    loss.backward()
    assert hidden.grad is not None
    assert (teacher.grad is None) is detach_teacher


def test_a_zero_weight_step_records_nothing_for_backward():
    # No graph on a skipped step: not one tensor is saved for a backward that will not run.
    m = CrepaLoss(cfg(warmup_steps=10), 4, 4)
    hidden = torch.randn(1, 3, 2, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, logs = m(hidden, torch.randn(1, 3, 2, 4), step=0)
    assert loss is None and logs["crepa_cutoff"] is True and saved == []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _ = m(hidden, torch.randn(1, 3, 2, 4), step=5)  # a weighted step does record its graph
    assert loss.requires_grad and saved


def test_recoverable_threshold_builds_the_graph_on_the_step_it_recovers(align_with_e0):
    # Recoverable mode decides from this step's score: a step that recovers must carry a gradient,
    # although the EMA said "cut off" when the step began.
    m = CrepaLoss(cfg(similarity_threshold=0.5, similarity_ema_decay=0.0, threshold_mode="recoverable"), 4, 4)
    aligned = align_with_e0(m)  # projected == e0 for every token, and the teacher too
    loss, logs = m(torch.randn(1, 3, 2, 4), aligned, step=0)
    assert loss is None and logs["crepa_cutoff"] is True and not m.scheduler.is_cutoff()  # no latch
    away = -aligned
    away[..., 1] = 0.5  # cosine -0.89 < 0.5: on again (not exactly opposite, where the gradient is 0)
    loss, logs = m(torch.randn(1, 3, 2, 4), away, step=1)
    assert logs["crepa_cutoff"] is False and float(logs["crepa_weight"]) == 0.5
    assert loss.requires_grad
    loss.backward()
    assert m.projector[1].bias.grad is not None and m.projector[1].bias.grad.abs().sum() > 0


def test_a_schedule_entry_in_the_wrong_shape_is_refused_not_reset():
    """The schedule's own state one level too high (or a misspelt wrapper) would load as a fresh
    schedule, switching CREPA back on after a permanent cutoff: it is refused, and nothing changes."""
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 0, "crepa_cutoff_step": 2})
    m = CrepaLoss(c, 8, 6)
    state = m.state_dict()
    for bad in ({"similarity_ema": 0.95, "cut_off": True}, {"schedulr": {"similarity_ema": None, "cut_off": True}}):
        with pytest.raises(RuntimeError, match="expected a dict with the one key 'scheduler'"):
            m.load_state_dict({**state, "_extra_state": bad})


def test_a_non_strict_load_without_the_schedule_keeps_the_schedule():
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 0, "crepa_similarity_threshold": 0.5,
                               "crepa_threshold_mode": "permanent"})
    m = CrepaLoss(c, 8, 6)
    m.scheduler.load_state_dict({"similarity_ema": 0.9, "cut_off": True})  # latched
    projector_only = {k: v for k, v in m.state_dict().items() if k != "_extra_state"}
    m.load_state_dict(projector_only, strict=False)
    assert m.scheduler.state_dict() == {"similarity_ema": 0.9, "cut_off": True}
    with pytest.raises(RuntimeError, match='Missing key "_extra_state"'):  # strict: refused, nothing changes
        m.load_state_dict(projector_only)
    assert m.scheduler.state_dict() == {"similarity_ema": 0.9, "cut_off": True}


def test_a_horizon_warning_at_a_step_names_the_callers_line():
    # raised inside the schedule, called by the loss, called through nn.Module: it must point here
    m = CrepaLoss(cfg(), 4, 4)
    m.config.scheduler = "linear"
    with pytest.warns(UserWarning, match="horizon") as seen:
        m(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), step=1)
    assert seen[0].filename == __file__


def test_a_scheduler_pickled_before_the_horizon_recheck_still_steps():
    import pickle

    m = CrepaLoss(cfg(), 4, 4)
    del m.scheduler.__dict__["_horizon_checked"]  # what an older version pickled
    restored = pickle.loads(pickle.dumps(m))
    loss, _ = restored(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), step=1)
    assert loss is not None
