"""crepa_loss: validation, temporal and token alignment, similarity and reduction, on a chosen backend."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import reference
from .alignment import TokenPlan, check_grid, plan_tokens
from .config import BACKENDS, as_index, is_bool
from .ops.utils import FLOAT_DTYPES, fused_resample_enabled, interpreter_enabled, triton_available




class CrepaOutput(NamedTuple):
    loss: torch.Tensor  # scalar: -weight * mean_b(per_video)
    alignment: torch.Tensor  # (B, T): total[b, t] (SPEC 4), after alignment
    self_similarity: torch.Tensor  # (B, T): self_sim[b, t]


# What the last call picked and why; crepa_kernels.info() reports it.
_last_choice: dict = {"backend": None, "reason": "crepa_loss has not been called yet"}


def resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """Map ``backend`` to 'torch' or 'triton' for tensors on ``device``; returns (backend, reason)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return "torch", "requested"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but the triton package does not import")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA (or ROCm) tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported for CPU tensors; got tensors on {device}"
            )
        return "triton", "requested"
    if device.type == "cuda":
        if triton_available():
            return "triton", f"auto: tensors on {device} and triton is available"
        return "torch", f"auto: tensors on {device} but triton does not import"
    return "torch", f"auto: tensors on {device}; the fused kernels are for GPUs"


def crepa_loss(
    projected: torch.Tensor,
    features: torch.Tensor,
    *,
    adjacent_distance: int = 1,
    adjacent_tau: float = 1.0,
    cumulative_neighbors: bool = False,
    normalize_neighbour_sum: bool = False,
    normalize_by_frames: bool = True,
    spatial_align: bool = True,
    projected_grid: Optional[Sequence[int]] = None,
    features_grid: Optional[Sequence[int]] = None,
    weight: Union[float, torch.Tensor] = 1.0,
    backend: str = "auto",
    check_finite: bool = False,
) -> CrepaOutput:
    """The CREPA loss (SPEC sections 1-5) of projected hidden states against teacher features.

    projected: (B, T, N, D) or (B, T, D) (one token per frame); features: (B, T_f, N_f, D) or (B, T_f, D).
    ``projected_grid`` / ``features_grid`` = (h, w) switch token alignment to grid mode. Gradients flow
    to ``projected``, and to ``features`` when it requires grad. ``check_finite`` (a host sync) raises
    when an input holds NaN or Inf instead of letting it propagate.
    """
    projected = _check_tensor("projected", projected)
    features = _check_tensor("features", features)
    if projected.device != features.device:
        raise ValueError(f"projected is on {projected.device} but features is on {features.device}; move them together")
    if projected.shape[0] != features.shape[0]:
        raise ValueError(f"batch sizes differ: projected has {projected.shape[0]}, features has {features.shape[0]}")
    if projected.shape[-1] != features.shape[-1]:
        raise ValueError(
            f"feature dims differ: projected has D={projected.shape[-1]}, features has D={features.shape[-1]}; "
            "the projector's output size must equal the encoder's embedding size"
        )
    distance = _check_int("adjacent_distance", adjacent_distance)
    tau = _check_positive_float("adjacent_tau", adjacent_tau)
    cumulative_neighbors = _check_bool("cumulative_neighbors", cumulative_neighbors)
    normalize_neighbour_sum = _check_bool("normalize_neighbour_sum", normalize_neighbour_sum)
    normalize_by_frames = _check_bool("normalize_by_frames", normalize_by_frames)
    spatial_align = _check_bool("spatial_align", spatial_align)
    check_finite = _check_bool("check_finite", check_finite)
    weight = _check_weight(weight, reference.compute_dtype(projected, features))
    pgrid = check_grid("projected_grid", projected_grid, projected.shape[2])
    fgrid = check_grid("features_grid", features_grid, features.shape[2])
    chosen, reason = resolve_backend(backend, projected.device)
    if check_finite:
        tensors = [("projected", projected), ("features", features)]
        if torch.is_tensor(weight):
            tensors.append(("weight", weight))
        raise_if_not_finite(tensors, projected.device, "check_finite")

    plan = plan_tokens(
        projected.shape[2], features.shape[2], spatial_align=spatial_align,
        projected_grid=pgrid, features_grid=fgrid,
    )
    projected, features = reference.align_frames(projected, features)
    loss = None
    if chosen == "triton":
        # -weight * mean_b(sum_t total / T) is -weight * mean_{b,t}(total) (times T without the division):
        # with a float weight the kernels' autograd node computes it (fewer small ops and nodes per step).
        scale = None if torch.is_tensor(weight) else -weight * (1 if normalize_by_frames else projected.shape[1])
        total, self_sim, loss = _similarity_triton(projected, features, plan, distance, tau,
                                                   cumulative_neighbors, normalize_neighbour_sum, scale)
    else:
        projected, features = reference.align_tokens(projected, features, plan)
        total, self_sim = reference.similarity(
            projected, features, distance=distance, tau=tau,
            cumulative=cumulative_neighbors, normalize_neighbour_sum=normalize_neighbour_sum,
        )
    if loss is None:
        per_video = total.sum(dim=1)
        if normalize_by_frames:
            per_video = per_video / total.shape[1]
        loss = -weight * per_video.mean()
    if not torch.compiler.is_compiling():  # bookkeeping for info() (calls that succeeded); not for graphs
        _last_choice.update(backend=chosen, reason=reason, device=projected.device)  # a str when read
    return CrepaOutput(loss, total, self_sim)


def _similarity_triton(projected, features, plan: TokenPlan, distance, tau, cumulative, normalize_neighbour_sum,
                       loss_scale=None):
    """(total, self_sim, loss): loss = loss_scale * mean(total) when computed with them, else None."""
    resample_tokens, _neighbour_cosine = _triton_ops()

    projected_resample = None
    if plan.pool:
        projected, features = projected.mean(dim=2, keepdim=True), features.mean(dim=2, keepdim=True)
    else:
        if plan.features is not None:
            features = resample_tokens(features, plan.features.in_grid, plan.features.out_grid)
        if plan.projected is not None:
            # The similarity kernels read the resampled tokens through their taps (the switch is an
            # environment lookup, kept out of torch.compile's graph tracing).
            if torch.compiler.is_compiling() or fused_resample_enabled():
                projected_resample = (plan.projected.in_grid, plan.projected.out_grid)
            else:
                projected = resample_tokens(projected, plan.projected.in_grid, plan.projected.out_grid)
    # crepa_loss validated the arguments and plan_tokens the grids: the op's own checks are skipped.
    out = _neighbour_cosine(projected, features, distance, tau, cumulative, normalize_neighbour_sum, None,
                            True, projected_resample, loss_scale)
    return out if loss_scale is not None else (*out, None)


_TRITON_OPS: tuple = ()


def _triton_ops():
    """(resample_tokens, _neighbour_cosine), imported on first use: the torch backend never needs triton.
    A graph being traced imports them and never touches the cache: a guard on it would make the
    graph recompile once an eager call fills it."""
    global _TRITON_OPS
    if torch.compiler.is_compiling() or not _TRITON_OPS:
        from .ops.resample import resample_tokens
        from .ops.similarity import _neighbour_cosine

        if torch.compiler.is_compiling():
            return resample_tokens, _neighbour_cosine
        _TRITON_OPS = (resample_tokens, _neighbour_cosine)
    return _TRITON_OPS


def last_backend_choice() -> dict:
    out = dict(_last_choice)
    if "device" in out:
        out["device"] = str(out["device"])
    return out


# ------------------------------------------------------------------ validation
def raise_if_not_finite(named, device, switch: str, world: int = 1) -> None:
    """Raise naming the first of ``named`` ((name, tensor) pairs) that holds NaN or Inf: one host sync
    when all are finite. Tensors of other floating dtypes (fp8: isfinite has no kernel) are read as fp32.
    ``world`` > 1: the flags are summed over the default process group first (a collective every rank
    must make), so that every rank raises, not only the one whose inputs hold the NaN."""
    bad = torch.stack([(~torch.isfinite(t if t.dtype in FLOAT_DTYPES else t.float()).all()).to(device)
                       for _, t in named]).float()
    if world > 1:
        torch.distributed.all_reduce(bad)
    counts = bad.tolist()
    if any(counts):
        name, count = next((name, n) for (name, _), n in zip(named, counts) if n)
        where = f" on {int(count)} of {world} ranks" if world > 1 else ""
        raise ValueError(f"{name} holds NaN or Inf values{where} ({switch}=True)")


def _check_tensor(name: str, t) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no data; materialise it first")
    if t.ndim == 3:
        t = t.unsqueeze(2)  # (B, T, D): one token per frame
    elif t.ndim != 4:
        raise ValueError(f"{name} must be (B, T, N, D) or (B, T, D), got shape {tuple(t.shape)}")
    b, frames, tokens, dim = t.shape
    for what, v in (("batch", b), ("frame", frames), ("token", tokens), ("feature", dim)):
        if v == 0:
            raise ValueError(f"{name} has zero {what} entries: shape {tuple(t.shape)}")
    return t


def _check_int(name: str, v) -> int:
    value = as_index(v)  # a numpy integer too, never a bool
    if value is None or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return value


def _check_bool(name: str, v) -> bool:
    """A switch: True / False (a numpy bool, 1 or 0 too). A string is refused: bool("false") is True."""
    if is_bool(v):
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {v!r}")


def _check_positive_float(name: str, v) -> float:
    try:
        f = float(v) if not isinstance(v, (str, bytes)) else None  # float("1.0") would take a string
    except (TypeError, ValueError):
        f = None
    if f is None or is_bool(v) or not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return f


def _check_weight(w, loss_dtype: torch.dtype):
    """The weight as a float or a 0-dim tensor. A float must be finite in ``loss_dtype`` too (float32
    unless an input is float64): a larger one would turn every loss and gradient into inf / NaN."""
    if torch.is_tensor(w):
        if w.numel() != 1 or not w.is_floating_point():
            raise ValueError(f"weight must be a float or a one-element float tensor, got shape {tuple(w.shape)} {w.dtype}")
        return w.reshape(())
    if isinstance(w, (bool, str, bytes)):
        raise ValueError(f"weight must be a finite number, got {w!r}")
    try:
        f = float(w)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past any float
        raise ValueError(f"weight must be a finite number, got {w!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"weight must be a finite number, got {w!r}")
    top = torch.finfo(loss_dtype).max
    if abs(f) > top:
        raise ValueError(f"weight must be finite in {str(loss_dtype).removeprefix('torch.')}, the dtype the loss is "
                         f"computed in for these inputs (|weight| <= {top:.6g}), got {w!r}")
    return f
