"""CrepaLoss: the projector head, the schedule and the logs around crepa_loss, as one nn.Module."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
from torch import nn

from ._callsite import outside_stacklevel
from .config import CrepaConfig
from .alignment import check_grid, implied_square
from .functional import crepa_loss, raise_if_not_finite
from .ops.utils import FLOAT_DTYPES
from .schedule import CrepaScheduler, check_step, parse_state, state_to_tensor


class Float32Sequential(nn.Sequential):
    """An nn.Sequential whose floating-point parameters and buffers stay float32 through ``.to()``,
    ``.half()`` or ``.bfloat16()`` (device moves still apply), as SPEC requires of the projector even
    when a parent model holding it as ``crepa_projector`` is cast to bf16."""

    def _apply(self, fn, recurse=True):
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype != torch.float32:
                # A cast away from float32: convert the original (converting the cast copy back would
                # round the values through bf16/fp16) and apply only the device move, if any.
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse)

    def __init__(self, *modules):
        super().__init__(*modules)
        self.register_load_state_dict_post_hook(_back_to_float32)


def _back_to_float32(module, incompatible_keys) -> None:
    # load_state_dict(..., assign=True) installs the checkpoint's tensors as they are, past _apply.
    if any(t.is_floating_point() and t.dtype != torch.float32
           for t in (*module.parameters(), *module.buffers())):
        module.float()


def make_projector(hidden_size: int, encoder_dim: int) -> nn.Sequential:
    """LayerNorm + Linear in float32; the state-dict keys (0.weight, 1.weight, ...) match the common
    trainer's ``crepa_projector`` so its checkpoints load unchanged."""
    for name, v in (("hidden_size", hidden_size), ("encoder_dim", encoder_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return Float32Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, encoder_dim)).float()


class CrepaLoss(nn.Module):
    """Drop-in CREPA for a training loop.

    ``forward(hidden_states, frame_features, step=...)`` projects the DiT block's hidden states
    (B, T, N, D_h) (or (B, T, D_h)), aligns them with the teacher's features (B, T_f, N_f, D_e) and
    returns ``(loss or None, logs)``. ``loss`` is None when the scheduled weight is 0 (no graph is
    built, except with a similarity threshold before a permanent cutoff, where the weight depends on
    the step's own score; the step's scores are still computed, logged, and fed to the EMA, as the
    common trainer does). Logs are detached 0-dim tensors unless ``log_tensors=False`` (then floats,
    one host sync); with a similarity threshold the EMA is a float (its decision reads it on the
    host). The teacher features get no gradient unless ``detach_teacher=False``.

    Host syncs: none per step unless ``crepa_similarity_threshold`` is set, in which case the step's
    alignment score is read once for the EMA.

    With ``crepa_enabled`` false CREPA is off: a call checks its arguments, then computes nothing and
    returns no term (a zero term in a distributed training step, see below) and empty logs.

    In eval mode (``.eval()``, a validation pass) a call leaves the schedule alone: the weight is the
    one the schedule gives now, the EMA is not fed, no cutoff latches, and no collective runs.

    Under ``torch.distributed`` (world size > 1) two things change so that every rank takes the same
    decisions and DDP's gradient reduction stays in step: the score fed to the similarity EMA is the
    global batch's (one all-reduce of two scalars, only when a threshold is set), and a training step whose
    weight is 0 returns a zero loss attached to the projector instead of None, so its parameters
    still receive a (zero) gradient on every rank.
    """

    def __init__(self, config: CrepaConfig, hidden_size: int, encoder_dim: int, max_train_steps: int = 0,
                 *, log_tensors: bool = True, detach_teacher: bool = True):
        super().__init__()
        if not isinstance(config, CrepaConfig):
            raise TypeError(f"config must be a CrepaConfig (see CrepaConfig.from_dict), got {type(config).__name__}")
        if not config.enabled:
            warnings.warn("crepa_enabled is false: this CrepaLoss computes nothing, and every call returns no "
                          "term and empty logs; set crepa_enabled=true to train with CREPA (while it is false, "
                          "skip the teacher's work too)", UserWarning, stacklevel=2)
        self.config = config
        self.projector = make_projector(hidden_size, encoder_dim)
        self.scheduler = CrepaScheduler(config, max_train_steps)
        self.hidden_size = hidden_size
        self.encoder_dim = encoder_dim
        self.log_tensors = log_tensors
        self.detach_teacher = detach_teacher

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = _check_input("hidden_states", hidden_states, "hidden_size", self.hidden_size)
        self._check_device(hidden_states)
        return self.projector(hidden_states.float())

    def _check_device(self, hidden_states: torch.Tensor) -> None:
        param = next(self.projector.parameters(), None)
        if param is None or hidden_states.device == param.device or param.device.type == "meta":
            return
        # a pre-forward hook may place the weights itself (accelerate's CPU offload of the model that
        # holds the projector): the device they have now is not the one they will compute on
        if not any(m._forward_pre_hooks for m in self.projector.modules()):
            raise ValueError(f"hidden_states is on {hidden_states.device} but this CrepaLoss's projector is on "
                             f"{param.device}; move the module there with .to(device), or the hidden states")

    def check_hidden(self, hidden_states: torch.Tensor, *, step: int = 0,
                     hidden_grid: Optional[Sequence[int]] = None, grid_mode: bool = False) -> None:
        """The checks ``forward`` applies to the student's side of a call, for a caller with costly work
        to do before it (a teacher decode): a call that cannot succeed fails before that work.
        ``grid_mode``: the call will pass a ``feature_grid``, so without ``hidden_grid`` the hidden
        tokens must form a square (with ``crepa_spatial_align`` on; off, that depends on the features'
        token count, and the call itself checks it)."""
        hidden_states, hidden_grid, _ = self._checked_hidden(hidden_states, step, hidden_grid)
        self._check_layouts(hidden_states.shape[2], hidden_grid, None, grid_mode)

    def _checked_hidden(self, hidden_states, step, hidden_grid):
        """(hidden_states as (B, T, N, D), its (h, w) grid or None, step as an int), after the student
        side's checks."""
        hidden_states = _check_input("hidden_states", hidden_states, "hidden_size", self.hidden_size)
        self._check_device(hidden_states)
        hidden_grid = _spatial_grid("hidden_grid", hidden_grid, hidden_states)
        return hidden_states, hidden_grid, check_step(step)

    def _check_layouts(self, n_hidden, hidden_grid, n_features, feature_grid_given) -> None:
        """Grid mode (a grid on either side) needs both token layouts: a side given no grid must be a
        square. Not where spatial_align is off and the token counts differ: that pools, which needs no
        layout (``n_features`` None: not known yet, so left to the call that knows it)."""
        if not self.config.spatial_align and (n_features is None or n_features != n_hidden):
            return
        if feature_grid_given and hidden_grid is None:
            implied_square("hidden_grid", n_hidden, given="feature_grid")
        if hidden_grid is not None and not feature_grid_given and n_features is not None:
            implied_square("feature_grid", n_features, given="hidden_grid")

    def forward(
        self,
        hidden_states: torch.Tensor,
        frame_features: torch.Tensor,
        *,
        step: int = 0,
        hidden_grid: Optional[Sequence[int]] = None,
        feature_grid: Optional[Sequence[int]] = None,
    ):
        # Every argument is checked before the schedule is consulted: a bad call fails on every step,
        # not only on the weighted ones, and changes no schedule state.
        flat = torch.is_tensor(hidden_states) and hidden_states.dim() == 3
        hidden_states, hidden_grid, step = self._checked_hidden(hidden_states, step, hidden_grid)
        frame_features = _check_input("frame_features", frame_features, "encoder_dim", self.encoder_dim,
                                      FLOAT_DTYPES)
        t_h, t_f = hidden_states.shape[1], frame_features.shape[1]
        if flat and frame_features.shape[2] > 1 and t_h >= 4 * t_f and t_h % t_f == 0:
            # (B, T, D) is one token per frame (SPEC), as the reference reads it too; a whole multiple
            # (4 or more) of the teacher's frames is what a block's raw (B, T*H*W, D) output looks like
            warnings.warn(f"hidden_states {tuple(hidden_states.shape[:2]) + tuple(hidden_states.shape[3:])} reads "
                          f"as {t_h} frames of one token each, against {t_f} teacher frames of "
                          f"{frame_features.shape[2]} tokens; if it is a DiT block's raw output (B, T*H*W, D), "
                          f"reshape it to (B, T, H*W, D) first (capture_hidden_states does this)", UserWarning,
                          stacklevel=outside_stacklevel())
        feature_grid = _spatial_grid("feature_grid", feature_grid, frame_features)
        self._check_layouts(hidden_states.shape[2], hidden_grid, frame_features.shape[2], feature_grid is not None)
        if hidden_states.shape[0] != frame_features.shape[0]:
            raise ValueError(f"hidden_states holds {hidden_states.shape[0]} videos but frame_features "
                             f"{frame_features.shape[0]}: they must be the same batch")
        if hidden_states.device != frame_features.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but frame_features is on "
                             f"{frame_features.device}; move the features to the hidden states' device")
        snapshot = self.scheduler._snapshot()
        try:
            return self._forward(hidden_states, frame_features, step, hidden_grid, feature_grid)
        except BaseException:
            self.scheduler._restore(snapshot)  # a call that raised changes no schedule state
            raise

    def _forward(self, hidden_states, frame_features, step, hidden_grid, feature_grid):
        c = self.config
        if not c.enabled:
            # crepa_enabled false switches CREPA off, as it does the common trainer's regularizer: no
            # work, no term (in a distributed training step a zero attached to the projector, as for a
            # weight of 0, so DDP's reduction stays in step), no logs, no schedule state.
            return (self._zero_loss() if self.training and _world_size() > 1 else None), {}
        if not self.training:
            return self._evaluate(hidden_states, frame_features, step, hidden_grid, feature_grid)
        thresholded = c.similarity_threshold is not None
        world = _world_size()
        weight = None
        if not thresholded or (c.threshold_mode == "permanent" and self.scheduler.is_cutoff()):
            weight = self.scheduler.get_weight(step)  # decided by the step alone
        # A step whose weight is already known to be 0 builds no graph, but its scores are computed
        # (without autograd) as the common trainer computes them on every step: they are logged,
        # and they feed the similarity EMA, so the logged EMA matches the trainer's.
        with torch.no_grad() if weight == 0.0 else contextlib.nullcontext():
            out = self._unweighted(hidden_states, frame_features, hidden_grid, feature_grid)
        score = out.alignment.detach().mean()
        self_sim = out.self_similarity.detach().mean()
        if not thresholded:
            self.scheduler.update_ema(score)  # stays a device tensor: logged, never read here
        else:
            shared = score
            if world > 1:
                # Every rank must feed the EMA the same number, or their weights diverge: the score of
                # the global batch, each rank's weighted by its (video, frame) count (shards may differ).
                count = float(out.alignment.numel())
                shared = torch.stack((score.float() * count, score.new_full((), count, dtype=torch.float32)))
                torch.distributed.all_reduce(shared)
                shared = shared[0] / shared[1]
            weight = self.scheduler.get_weight(step, similarity=shared)  # the one host sync
        if weight == 0.0:
            # Attached to the projector only: no backward through the loss's graph (whose loss may
            # even be NaN, and NaN * 0 would reach every rank's gradients).
            zero = self._zero_loss() if world > 1 else None
            return zero, self._logs(zero, score, self_sim, weight, True)
        loss = out.loss * weight
        return loss, self._logs(loss, score, self_sim, weight, False)

    def _unweighted(self, hidden_states, frame_features, hidden_grid, feature_grid):
        """crepa_loss of the projected hidden states against the features, at weight 1."""
        c = self.config
        projected = self.projector(hidden_states.float())  # checked above: no second pass through project()
        if c.check_finite:  # here, so that the error names this call's arguments
            # in training under torch.distributed every rank raises (a rank alone would leave the others
            # waiting in the next collective); an eval-mode call stays local
            raise_if_not_finite((("hidden_states", hidden_states), ("frame_features", frame_features),
                                 ("the projector's output (from finite hidden states: its weights, an outer "
                                  "autocast, or hidden states too large for its math)", projected)),
                                projected.device, "crepa_check_finite", _world_size() if self.training else 1)
        return crepa_loss(
            projected,
            frame_features.detach() if self.detach_teacher else frame_features,
            adjacent_distance=c.adjacent_distance, adjacent_tau=c.adjacent_tau,
            cumulative_neighbors=c.cumulative_neighbors, normalize_neighbour_sum=c.normalize_neighbour_sum,
            normalize_by_frames=c.normalize_by_frames, spatial_align=c.spatial_align,
            projected_grid=hidden_grid, features_grid=feature_grid, weight=1.0, backend=c.backend,
        )

    def _evaluate(self, hidden_states, frame_features, step, hidden_grid, feature_grid):
        """A call in eval mode (a validation pass): the loss at the weight the schedule gives now, and
        its scores, without feeding the EMA or latching a cutoff, and without a collective, so one
        rank alone may make it."""
        weight = self.scheduler.peek_weight(step)
        with torch.no_grad() if weight == 0.0 else contextlib.nullcontext():  # no term: no graph
            out = self._unweighted(hidden_states, frame_features, hidden_grid, feature_grid)
        score = out.alignment.detach().mean()
        self_sim = out.self_similarity.detach().mean()
        if weight == 0.0:
            return None, self._logs(None, score, self_sim, weight, True)
        loss = out.loss * weight
        return loss, self._logs(loss, score, self_sim, weight, False)

    # The schedule's state (EMA, cutoff latch) travels in CrepaLoss.state_dict(), so a resumed run
    # does not switch CREPA back on after a permanent cutoff. It is a small int64 tensor
    # (`schedule.state_to_tensor`), so that a state dict holds tensors only and saves as safetensors;
    # the {"scheduler": dict} form of earlier checkpoints still loads.
    def get_extra_state(self) -> torch.Tensor:
        return state_to_tensor(self.scheduler.state_dict())

    def set_extra_state(self, state) -> None:
        if state is _KEEP_SCHEDULE:
            return
        self.scheduler.load_state_dict(state.get("scheduler", {}) if isinstance(state, dict) else state)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but all or nothing: a state dict that would fail (a missing
        or unexpected key under ``strict``, a shape that differs, a bad schedule entry) raises before
        any weight or the schedule changes (torch alone would copy the entries that fit, then raise)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict).__name__}")
        problems = self._state_dict_problems(state_dict, "", strict)
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__} (nothing was loaded):\n\t"
                               + "\n\t".join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        # Torch passes strict=True here whatever the caller asked (it checks keys at the end), so only
        # what fails either way is checked: shapes, non-tensors, the schedule's entry.
        problems = self._state_dict_problems(state_dict, prefix, strict=False)
        if problems:
            # The weights will not load: the schedule must not change either. Torch reports shape and
            # type problems itself; a bad schedule entry only this module sees.
            error_msgs.extend(p for p in problems if p.startswith(key))
            state_dict[key] = _KEEP_SCHEDULE
        # A state dict without the schedule's entry (a projector-only checkpoint) follows torch's rules
        # for a missing key: refused under strict (a fresh schedule would switch CREPA back on after a
        # permanent cutoff), and without strict the schedule stays as it is.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _state_dict_problems(self, state_dict, prefix: str, strict: bool) -> list[str]:
        """Why loading ``state_dict`` (this module's entries under ``prefix``) would fail; empty if it loads.
        Missing and unexpected keys count only when ``strict``."""
        problems = []
        key = prefix + "_extra_state"
        # what state_dict() holds (persistent buffers only), less the schedule's entry, checked below
        own = {k: v for k, v in self.state_dict(prefix=prefix, keep_vars=True).items() if k != key}
        for name, tensor in own.items():
            if name not in state_dict:
                if strict:
                    problems.append(f'Missing key "{name}"')
                continue
            value = state_dict[name]
            if not torch.is_tensor(value):
                problems.append(f'"{name}" must be a tensor, got {type(value).__name__}')
            elif value.shape != tensor.shape:
                problems.append(f"size mismatch for {name}: copying a param with shape {tuple(value.shape)} from "
                                f"checkpoint, the shape in current model is {tuple(tensor.shape)}")
        if strict:
            unexpected = [k for k in state_dict if k.startswith(prefix) and k not in own and k != key]
            problems += [f'Unexpected key "{k}"' for k in unexpected]
            if key not in state_dict:
                problems.append(f'Missing key "{key}" (the schedule\'s state: similarity EMA and cutoff latch); '
                                f'load with strict=False to keep this module\'s schedule as it is')
        extra = state_dict.get(key, {})
        if extra is not _KEEP_SCHEDULE:
            try:
                if isinstance(extra, dict) and set(extra) - {"scheduler"}:
                    # e.g. the schedule's own state one level too high: it would load as a fresh schedule
                    raise ValueError(f"expected a dict with the one key 'scheduler' (the schedule's state), got "
                                     f"keys {sorted(extra)}")
                parse_state(extra.get("scheduler", {}) if isinstance(extra, dict) else extra)
            except (TypeError, ValueError) as e:
                problems.append(f"{key}: {e}")
        return problems

    def _zero_loss(self) -> torch.Tensor:
        return sum(p.sum() for p in self.projector.parameters()) * 0.0

    def _logs(self, loss, score, self_sim, weight, cutoff) -> dict:
        logs = {
            "crepa_loss": loss.detach() if loss is not None else 0.0,
            "crepa_alignment_score": score,
            "crepa_similarity_self": self_sim,
            "crepa_weight": weight,
            "crepa_cutoff": cutoff,
            "crepa_alignment_score_ema": self.scheduler.similarity_ema,
        }
        logs = {k: v for k, v in logs.items() if v is not None}
        if not self.log_tensors:
            return logs_to_floats(logs)
        # The loss and the EMA are logged as copies: an in-place op on a logged tensor (an all_reduce
        # for logging) must change neither the returned loss nor the schedule's EMA, which the next
        # step and state_dict() read. (The scores are this call's own tensors.)
        for key in ("crepa_loss", "crepa_alignment_score_ema"):
            if torch.is_tensor(logs.get(key)):
                logs[key] = logs[key].clone()
        return logs


# Stands in for the schedule's entry while loading weights that will fail: set_extra_state keeps the
# schedule as it is.
_KEEP_SCHEDULE = object()


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def logs_to_floats(logs: dict) -> dict:
    """Convert tensor entries to Python floats with a single device-to-host copy."""
    keys = [k for k, v in logs.items() if torch.is_tensor(v)]
    if not keys:
        return dict(logs)
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()
    out = dict(logs)
    out.update(zip(keys, values))
    return out


def _check_input(name: str, t, dim_name: str, dim: int, dtypes=None) -> torch.Tensor:
    """A floating (B, T, N, D) view of ``t`` ((B, T, D) gains N = 1), D equal to ``dim``; ``dtypes``:
    the ones allowed (the hidden states take any floating dtype: the projector reads them as fp32)."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if t.ndim == 3:
        t = t.unsqueeze(2)
    if t.ndim != 4:
        raise ValueError(f"{name} must be (B, T, N, D) or (B, T, D), got shape {tuple(t.shape)}")
    if t.shape[-1] != dim:
        raise ValueError(f"{name} has D={t.shape[-1]} but this CrepaLoss was built for {dim_name}={dim}")
    if 0 in t.shape:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)} (B, T, N, D must all be positive)")
    return t


def _spatial_grid(name, grid, tensor):
    """Accept (h, w), or the capture helper's (T, H, W) latent grid, whose last two entries are spatial;
    checked here so an error names this method's argument."""
    if grid is None:
        return None
    if isinstance(grid, (tuple, list)) and len(grid) == 3:
        frames = tensor.shape[1]
        if isinstance(grid[0], bool) or not isinstance(grid[0], int) or grid[0] != frames:
            raise ValueError(f"{name}={tuple(grid)} is a (T, H, W) grid with T={grid[0]!r}, but the tensor has "
                             f"{frames} frames; pass (H, W), or the grid of these frames")
        grid = tuple(grid[1:])
    tokens = tensor.shape[2] if torch.is_tensor(tensor) and tensor.ndim == 4 else 1
    return check_grid(name, grid, tokens)
