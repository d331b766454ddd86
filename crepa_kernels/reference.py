"""The plain PyTorch CREPA path: the oracle the fused kernels are tested against, and the benchmark baseline.

Every function here is the literal reading of SPEC sections 1-4 in eager PyTorch; it favours clarity
over memory (it materialises normalised copies, as the reference trainers do).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .alignment import Resample, TokenPlan

EPS = 1e-12


def temporal_indices(t_long: int, t_short: int, device=None) -> torch.Tensor:
    """Frames kept when `t_long` frames are subsampled to `t_short` (SPEC section 1).

    `floor(linspace(0, t_long - 1, t_short))` as int64, computed as `torch.linspace(...).long()` in
    fp32 (the compatible rounding) directly on `device`, so no host sync is needed.
    """
    for name, value in (("t_long", t_long), ("t_short", t_short)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if t_short > t_long:
        raise ValueError(f"t_short must be <= t_long, got t_short={t_short}, t_long={t_long}")
    return torch.linspace(0, t_long - 1, t_short, dtype=torch.float32, device=device).long()


def pick_frames(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[:, index]` for `x` of shape `(B, T, ...)`: keep the frames `index` along dim 1, in order.

    Differentiable through `index_select`; with distinct indices (as `temporal_indices` makes when
    `t_short <= t_long`) its backward writes each frame once, so it is deterministic.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have a frame dim (B, T, ...), got shape {tuple(x.shape)}")
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"index must be a 1-D int64/int32 tensor, got shape {tuple(index.shape)} dtype {index.dtype}"
        )
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    return x.index_select(1, index)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); everything else is computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def align_frames(projected: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 1: subsample the longer side in time to the shorter one's length."""
    tp, tf = projected.shape[1], features.shape[1]
    if tp == tf:
        return projected, features
    if tf > tp:
        return projected, pick_frames(features, temporal_indices(tf, tp, features.device))
    return pick_frames(projected, temporal_indices(tp, tf, projected.device)), features


def resample(x: torch.Tensor, plan: Optional[Resample]) -> torch.Tensor:
    """SPEC 2: resample the token grid of ``x`` (B, T, N, D) with F.interpolate (align_corners=False)."""
    if plan is None:
        return x
    b, t, n, d = x.shape
    flat = x.reshape(b * t, n, d).permute(0, 2, 1)  # (BT, D, N)
    if plan.is_linear_1d:
        out = F.interpolate(flat, size=plan.out_grid[1], mode="linear", align_corners=False)
    else:
        h, w = plan.in_grid
        out = F.interpolate(flat.reshape(b * t, d, h, w), size=plan.out_grid, mode="bilinear", align_corners=False)
    m = plan.out_grid[0] * plan.out_grid[1]
    return out.reshape(b * t, d, m).permute(0, 2, 1).reshape(b, t, m, d)


def align_tokens(projected: torch.Tensor, features: torch.Tensor, plan: TokenPlan) -> tuple[torch.Tensor, torch.Tensor]:
    if plan.pool:
        return projected.mean(dim=2, keepdim=True), features.mean(dim=2, keepdim=True)
    return resample(projected, plan.projected), resample(features, plan.features)


def neighbour_offsets(distance: int, num_frames: int, cumulative: bool) -> list[int]:
    """SPEC 4: the offsets k in K after clamping the distance to T - 1."""
    d = min(int(distance), num_frames - 1)
    if d <= 0:
        return []
    return list(range(1, d + 1)) if cumulative else [d]


def similarity(
    projected: torch.Tensor,
    features: torch.Tensor,
    *,
    distance: int,
    tau: float,
    cumulative: bool,
    normalize_neighbour_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 3-4 on aligned (B, T, N, D) tensors. Returns ``(total, self_sim)``, each (B, T)."""
    dtype = compute_dtype(projected, features)
    p = F.normalize(projected.to(dtype), dim=-1, eps=EPS)
    f = F.normalize(features.to(dtype), dim=-1, eps=EPS)
    self_sim = (p * f).sum(dim=-1).mean(dim=-1)
    total = self_sim.clone()
    num_frames = p.shape[1]
    denom = torch.ones(num_frames, dtype=dtype, device=p.device)
    for k in neighbour_offsets(distance, num_frames, cumulative):
        w = math.exp(-float(k) / tau)
        forward = (p[:, :-k] * f[:, k:]).sum(dim=-1).mean(dim=-1)  # frame t with features of t + k
        total[:, :-k] += w * forward
        backward = (p[:, k:] * f[:, :-k]).sum(dim=-1).mean(dim=-1)  # frame t with features of t - k
        total[:, k:] += w * backward
        if normalize_neighbour_sum:
            denom[:-k] += w
            denom[k:] += w
    if normalize_neighbour_sum:
        total = total / denom
    return total, self_sim
