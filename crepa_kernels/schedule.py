"""CrepaScheduler: the CREPA coefficient schedule with step and similarity cutoffs (SPEC section 6)."""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Optional, Union

import torch

from ._callsite import outside_stacklevel
from .config import CrepaConfig, as_index, is_bool

Number = Union[float, int]


class CrepaScheduler:
    """Gives the loss weight for a step, given the step's alignment score.

    ``get_weight(step, similarity)`` must be called once per step, in step order: it updates the
    similarity EMA first (SPEC 6.1), then applies the cutoffs and the schedule. ``similarity`` may be a
    Python number or a one-element tensor. With a similarity threshold a tensor is read once (a single
    host sync), because the cutoff decision needs its value; without one the EMA of a tensor stays a
    0-dim tensor on its device (no sync) and is only there to be logged. A non-finite similarity
    leaves the EMA unchanged, so one NaN step cannot poison the rest of the run. (One difference,
    because the tensor path never reads the value: while every score so far was non-finite, that
    EMA is a NaN tensor, where the number path leaves it unset; the first finite score replaces it.)
    """

    def __init__(self, config: CrepaConfig, max_train_steps: int = 0):
        if not isinstance(config, CrepaConfig):
            raise TypeError(f"config must be a CrepaConfig, got {type(config).__name__}")
        if isinstance(max_train_steps, bool) or not isinstance(max_train_steps, int) or max_train_steps < 0:
            raise ValueError(f"max_train_steps must be a non-negative int, got {max_train_steps!r}")
        self.config = config
        self.max_train_steps = max_train_steps
        self.similarity_ema: Optional[float] = None
        self._cut_off = False
        self._horizon_checked = None
        self._check_horizon()

    def _check_horizon(self) -> None:
        """Warn (once per setting) when a decaying schedule's horizon ends before its warmup does; run at
        construction and again when a field it reads was set later."""
        c = self.config
        setting = (c.enabled, c.scheduler, c.decay_steps, c.warmup_steps, self.max_train_steps)
        if setting == getattr(self, "_horizon_checked", None):  # (absent in a scheduler pickled before it)
            return
        self._horizon_checked = setting
        if c.enabled and c.scheduler != "constant" and self.decay_steps <= c.warmup_steps:
            # SPEC 6.5 then gives lambda_end from the first step after the warmup: almost surely a
            # missing horizon (max_train_steps defaults to 0), not a wish.
            warnings.warn(
                f"crepa_scheduler={c.scheduler!r} decays over crepa_decay_steps, or max_train_steps when that "
                f"is 0, but the horizon ({self.decay_steps}) does not reach past crepa_warmup_steps "
                f"({c.warmup_steps}): the weight is crepa_lambda_end ({c.lambda_end}) from step "
                f"{c.warmup_steps + 1} on; set crepa_decay_steps or pass max_train_steps",
                UserWarning, stacklevel=outside_stacklevel())

    # ----------------------------------------------------------------- state
    def is_cutoff(self) -> bool:
        """True once a cutoff has latched in permanent mode, as the common trainer's scheduler reports it.
        A recoverable cutoff does not latch, so this stays False in that mode: there the weight of 0
        (and the ``crepa_cutoff`` log entry) tells a step that is cut off."""
        return self._cut_off

    def get_similarity_ema(self) -> Optional[Union[float, torch.Tensor]]:
        """The similarity EMA (None before the first finite similarity): the common trainer's name."""
        return self.similarity_ema

    def state_dict(self) -> dict:
        ema = self.similarity_ema
        if torch.is_tensor(ema):
            ema = float(ema)  # checkpoints are rare: one read here is fine
        return {"similarity_ema": ema, "cut_off": self._cut_off}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (or its `state_to_tensor` form); a bad entry raises before
        anything changes."""
        self.similarity_ema, self._cut_off = parse_state(state)

    def _snapshot(self) -> tuple:
        # update_ema replaces the EMA object rather than changing it in place, so a reference is a copy
        return self.similarity_ema, self._cut_off

    def _restore(self, snapshot: tuple) -> None:
        self.similarity_ema, self._cut_off = snapshot

    # -------------------------------------------------------------- schedule
    @property
    def decay_steps(self) -> int:
        return self.config.decay_steps or self.max_train_steps

    def base_weight(self, step: int) -> float:
        """The scheduled coefficient at ``step`` ignoring cutoffs (SPEC 6.5)."""
        c = self.config
        lam = c.lambda_
        if c.warmup_steps > 0 and step < c.warmup_steps:
            return lam * step / c.warmup_steps
        if c.scheduler == "constant":
            return lam
        progress = (step - c.warmup_steps) / max(self.decay_steps - c.warmup_steps, 1)
        progress = min(max(progress, 0.0), 1.0)
        if c.scheduler == "linear":
            return lam + (c.lambda_end - lam) * progress
        if c.scheduler == "cosine":
            return c.lambda_end + (lam - c.lambda_end) * (1.0 + math.cos(math.pi * progress)) / 2.0
        # polynomial
        return (lam - c.lambda_end) * (1.0 - progress) ** c.power + c.lambda_end

    def update_ema(self, similarity: Optional[Union[Number, torch.Tensor]]) -> None:
        similarity = _check_similarity(similarity)
        if similarity is None:
            return
        d = self.config.similarity_ema_decay
        if torch.is_tensor(similarity) and self.config.similarity_threshold is None:
            x = similarity.detach().float().reshape(())
            ema = self.similarity_ema
            if ema is None:
                self.similarity_ema = x.clone()
                return
            ema = torch.as_tensor(ema, dtype=torch.float32, device=x.device)
            blended = torch.where(torch.isfinite(ema), d * ema + (1.0 - d) * x, x)  # first finite value as is
            self.similarity_ema = torch.where(torch.isfinite(x), blended, ema)
            return
        value = float(similarity.detach().float().reshape(())) if torch.is_tensor(similarity) else float(similarity)
        if not math.isfinite(value):
            return
        ema = self.similarity_ema
        if torch.is_tensor(ema):
            ema = float(ema)
        if ema is None or not math.isfinite(ema):
            self.similarity_ema = value
        else:
            self.similarity_ema = d * ema + (1.0 - d) * value

    def peek_weight(self, step: int) -> float:
        """The weight ``get_weight(step)`` would give with no new similarity, leaving the state as it is
        (no EMA update, no latch set or cleared)."""
        snapshot = self._snapshot()
        try:
            return self.get_weight(step)
        finally:
            self._restore(snapshot)

    def get_weight(self, step: int, similarity: Optional[Union[Number, torch.Tensor]] = None) -> float:
        step = check_step(step)
        c = self.config
        self._check_horizon()  # a schedule field set after construction
        self.update_ema(similarity)
        if c.threshold_mode == "permanent" and self._cut_off:
            return 0.0
        hit = c.cutoff_step > 0 and step >= c.cutoff_step
        if c.similarity_threshold is not None and self.similarity_ema is not None:
            hit = hit or self.similarity_ema >= c.similarity_threshold
        if hit:
            self._cut_off = c.threshold_mode == "permanent"  # only permanent mode latches
            return 0.0
        self._cut_off = False
        return self.base_weight(step)


# The schedule's state as a tensor, for checkpoint formats that hold tensors only (safetensors):
# int64 [format, has EMA, the EMA's float64 bits, cutoff latch]. int64, so that a cast of a state
# dict's floating-point tensors (to bf16 for saving) leaves it alone.
STATE_TENSOR_FORMAT = 1


def state_to_tensor(state) -> torch.Tensor:
    """``CrepaScheduler.state_dict()``'s content as the 4-element int64 CPU tensor `parse_state` reads."""
    ema, cut_off = parse_state(state)
    bits = torch.tensor([0.0 if ema is None else ema], dtype=torch.float64).view(torch.int64)
    head = torch.tensor([STATE_TENSOR_FORMAT, ema is not None], dtype=torch.int64)
    return torch.cat([head, bits, torch.tensor([int(cut_off)], dtype=torch.int64)])


def _parse_state_tensor(t: torch.Tensor) -> tuple[Optional[float], bool]:
    if t.dtype != torch.int64 or t.shape != (4,):
        raise ValueError(f"the schedule's state tensor must be the 4-element int64 tensor CrepaLoss.state_dict() "
                         f"holds, got shape {tuple(t.shape)} {t.dtype} (a cast of the checkpoint's tensors must "
                         f"leave non-floating-point ones alone)")
    fmt, has_ema, _, cut_off = t.tolist()
    if fmt != STATE_TENSOR_FORMAT or has_ema not in (0, 1) or cut_off not in (0, 1):
        raise ValueError(f"the schedule's state tensor holds {t.tolist()}: expected format {STATE_TENSOR_FORMAT} "
                         f"and 0/1 flags")
    ema = float(t[2:3].cpu().view(torch.float64)) if has_ema else None
    return ema, bool(cut_off)


def parse_state(state) -> tuple[Optional[float], bool]:
    """(similarity_ema, cut_off) from a ``CrepaScheduler.state_dict()`` (or its `state_to_tensor`
    form), checked."""
    if torch.is_tensor(state):
        return _parse_state_tensor(state)
    if not isinstance(state, Mapping):
        raise TypeError(f"the schedule's state must be a dict (CrepaScheduler.state_dict()), got {type(state).__name__}")
    unknown = sorted(set(state) - {"similarity_ema", "cut_off"})
    if unknown:
        raise ValueError(f"the schedule's state has unknown entries {unknown}; expected similarity_ema and cut_off")
    ema = state.get("similarity_ema")
    if torch.is_tensor(ema) and ema.numel() == 1 and ema.is_floating_point():
        ema = float(ema)
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float))):
        raise ValueError(f"the schedule's similarity_ema must be a number or None, got {ema!r}")
    cut_off = state.get("cut_off", False)
    if not isinstance(cut_off, bool):
        raise ValueError(f"the schedule's cut_off must be a bool, got {cut_off!r}")
    return (None if ema is None else float(ema)), cut_off


def check_step(step) -> int:
    """``step`` as a Python int: an int, a numpy integer or a one-element integer tensor (what a
    trainer's global step may be), non-negative; anything else is refused, a bool or a float too."""
    if torch.is_tensor(step):
        if step.numel() != 1 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool \
                or step.device.type == "meta":
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = step.reshape(())  # (a one-element tensor on a GPU: one host read, as int() would be)
    value = as_index(step)
    if value is not None and value >= 0:
        return value
    raise ValueError(f"step must be a non-negative int, got {step!r}")


def _check_similarity(similarity):
    if similarity is None:
        return None
    if torch.is_tensor(similarity):
        if similarity.numel() != 1 or similarity.is_complex():
            raise ValueError(f"similarity must be a number or a one-element tensor, got shape {tuple(similarity.shape)}")
        return similarity
    if is_bool(similarity) or not isinstance(similarity, numbers.Real):  # a numpy float32 score is a Real
        raise ValueError(f"similarity must be a number or a one-element tensor, got {similarity!r}")
    return float(similarity)
