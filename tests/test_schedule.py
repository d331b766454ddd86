"""CrepaScheduler against SPEC section 6, step by step, with closed forms written here."""
import math
import warnings

import numpy as np
import pytest
import torch

from crepa_kernels import CrepaConfig, CrepaScheduler


def expected(step, sched, lam=0.5, end=0.0, warm=0, decay=100, power=1.0):
    if step < warm:
        return lam * step / warm
    if sched == "constant":
        return lam
    pr = min((step - warm) / max(decay - warm, 1), 1.0)
    if sched == "linear":
        return lam + (end - lam) * pr
    if sched == "cosine":
        return end + (lam - end) * (1 + math.cos(math.pi * pr)) / 2
    return (lam - end) * (1 - pr) ** power + end


@pytest.mark.parametrize("sched", ["constant", "linear", "cosine", "polynomial"])
@pytest.mark.parametrize("warm", [0, 10])
def test_schedulers_with_warmup_and_decay(sched, warm):
    s = CrepaScheduler(CrepaConfig(scheduler=sched, lambda_=0.8, lambda_end=0.1, warmup_steps=warm,
                                   decay_steps=60, power=2.0), max_train_steps=1000)
    for step in range(0, 80):
        want = expected(step, sched, lam=0.8, end=0.1, warm=warm, decay=60, power=2.0)
        assert s.get_weight(step) == pytest.approx(want, abs=1e-12), step
    assert not s.is_cutoff()


def test_decay_steps_zero_means_max_train_steps():
    s = CrepaScheduler(CrepaConfig(scheduler="linear", lambda_=1.0, lambda_end=0.0), max_train_steps=50)
    assert s.get_weight(25) == pytest.approx(0.5)
    assert s.get_weight(50) == pytest.approx(0.0)
    assert s.get_weight(70) == pytest.approx(0.0)  # progress clamps at 1


@pytest.mark.parametrize("decay,warmup,max_steps", [(0, 0, 0), (5, 10, 0), (0, 10, 10)])
def test_a_decay_without_a_horizon_warns(decay, warmup, max_steps):
    # SPEC 6.5 gives lambda_end from the step after the warmup when the horizon is not past it: a
    # schedule that collapses at once, usually from a max_train_steps left at its default 0.
    c = CrepaConfig(enabled=True, block_index=0, scheduler="cosine", lambda_=0.5, decay_steps=decay,
                    warmup_steps=warmup)
    with pytest.warns(UserWarning, match="horizon .* crepa_decay_steps or pass max_train_steps"):
        s = CrepaScheduler(c, max_train_steps=max_steps)
    assert s.get_weight(warmup + 1) == 0.0  # still SPEC's value: the warning changes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrepaScheduler(c.replace(decay_steps=warmup + 1))
        CrepaScheduler(c.replace(decay_steps=0), max_train_steps=warmup + 1)
        CrepaScheduler(c.replace(scheduler="constant"))


def test_a_horizon_lost_by_a_field_set_later_warns_at_the_next_weight():
    # the config is read live: scheduler or decay_steps set after construction must meet the same check,
    # once per setting, not on every step
    c = CrepaConfig(enabled=True, block_index=0, lambda_=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = CrepaScheduler(c)  # constant: no horizon needed
        s.get_weight(1)
    c.scheduler = "cosine"
    with pytest.warns(UserWarning, match="crepa_scheduler='cosine' .* horizon \\(0\\)"):
        s.get_weight(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.get_weight(3)  # the same setting: said once
        c.decay_steps = 100
        s.get_weight(4)  # a horizon again: nothing to say


def test_warmup_applies_to_every_scheduler_including_constant():
    s = CrepaScheduler(CrepaConfig(lambda_=0.5, warmup_steps=4), max_train_steps=10)
    assert [s.get_weight(i) for i in range(6)] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5])


def test_step_cutoff():
    s = CrepaScheduler(CrepaConfig(cutoff_step=5), max_train_steps=10)
    ws = [s.get_weight(i) for i in range(8)]
    assert ws == [0.5] * 5 + [0.0] * 3
    assert s.is_cutoff()


def test_ema_cutoff_permanent_latches():
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.5, similarity_ema_decay=0.5), max_train_steps=10)
    sims = [0.2, 0.8, 0.9, 0.0, 0.0, 0.0]
    ema, weights = None, []
    for step, x in enumerate(sims):
        ema = x if ema is None else 0.5 * ema + 0.5 * x
        weights.append(s.get_weight(step, similarity=x))
        assert s.similarity_ema == pytest.approx(ema)
    # ema: 0.2, 0.5 (>= 0.5: cut), then latched although the ema falls again
    assert weights == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert s.is_cutoff()


def test_ema_cutoff_recoverable_recovers():
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.5, similarity_ema_decay=0.5,
                                   threshold_mode="recoverable"), max_train_steps=10)
    sims = [0.2, 0.8, 0.9, 0.0, 0.0, 0.0]
    weights, ema = [], None
    for step, x in enumerate(sims):
        ema = x if ema is None else 0.5 * ema + 0.5 * x
        weights.append(s.get_weight(step, similarity=x))
        assert not s.is_cutoff()  # as the common trainer's scheduler: only permanent mode latches
        assert s.get_similarity_ema() == pytest.approx(ema)
    # ema: 0.2, 0.5, 0.7, 0.35, 0.175, 0.0875
    assert weights == [0.5, 0.0, 0.0, 0.5, 0.5, 0.5]


def test_similarity_tensor_is_accepted():
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.9), max_train_steps=10)
    assert s.get_weight(0, similarity=torch.tensor(0.95)) == 0.0
    assert s.similarity_ema == pytest.approx(0.95)


def test_nan_similarity_does_not_poison_the_ema():
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.9), max_train_steps=10)
    s.get_weight(0, similarity=0.3)
    s.get_weight(1, similarity=float("nan"))
    assert s.similarity_ema == pytest.approx(0.3)


def test_state_dict_round_trip():
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.5), max_train_steps=10)
    s.get_weight(0, similarity=0.7)
    t = CrepaScheduler(CrepaConfig(similarity_threshold=0.5), max_train_steps=10)
    t.load_state_dict(s.state_dict())
    assert t.is_cutoff() and t.similarity_ema == s.similarity_ema


@pytest.mark.parametrize("args,msg", [
    ((object(), 10), "config must be a CrepaConfig"),
    ((CrepaConfig(), -1), "max_train_steps must be a non-negative int"),
])
def test_constructor_errors(args, msg):
    with pytest.raises((TypeError, ValueError), match=msg):
        CrepaScheduler(*args)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", torch.tensor(2.0), torch.tensor([1, 2]), torch.tensor(-1),
                                 torch.tensor(True), torch.tensor(3, device="meta"), np.True_])
def test_bad_step(bad):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        CrepaScheduler(CrepaConfig(), 10).get_weight(bad)


def test_a_trainers_integer_step_of_another_type_is_read_as_an_int():
    # a global step kept as a numpy integer or a one-element integer tensor (the common trainer takes them)
    s = CrepaScheduler(CrepaConfig(lambda_=0.5, warmup_steps=4), 10)
    for step in (np.int64(2), torch.tensor(2), torch.tensor([2], dtype=torch.int32)):
        weight = s.get_weight(step)
        assert type(weight) is float and weight == 0.25


def test_tensor_ema_without_threshold_skips_non_finite_steps_on_the_device():
    s = CrepaScheduler(CrepaConfig(similarity_ema_decay=0.5), max_train_steps=10)
    for step, x in enumerate([float("nan"), 0.4, float("inf"), 0.8]):
        s.get_weight(step, similarity=torch.tensor(x))
        assert torch.is_tensor(s.similarity_ema)
    assert float(s.similarity_ema) == pytest.approx(0.5 * 0.4 + 0.5 * 0.8)
    assert s.state_dict()["similarity_ema"] == pytest.approx(0.6)


@pytest.mark.parametrize("bad", ["0.5", torch.ones(2), [0.5], True, np.bool_(True), 0.5j])
def test_bad_similarity_names_the_argument(bad):
    s = CrepaScheduler(CrepaConfig(), max_train_steps=10)
    with pytest.raises(ValueError, match="similarity must be a number or a one-element tensor"):
        s.get_weight(0, similarity=bad)
    assert s.similarity_ema is None


@pytest.mark.parametrize("score", [np.float32(0.75), np.float64(0.75), np.int64(1), 0.75, 1])
def test_numpy_scores_feed_the_ema_as_numbers(score):
    # a score read with .numpy() or np.mean is a numpy scalar: it is a number like any other, and the
    # threshold compares it as such (0.75 and 1 against 0.7: cut off at the first step, SPEC 6.3)
    s = CrepaScheduler(CrepaConfig(similarity_threshold=0.7), max_train_steps=10)
    assert s.get_weight(0, similarity=score) == 0.0 and s.is_cutoff()
    assert type(s.similarity_ema) is float and s.similarity_ema == float(score)
