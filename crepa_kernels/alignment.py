"""Alignment planning (SPEC sections 1-2): which frames to keep and how each side's tokens are resampled.

Pure Python on shapes, shared by every backend, so the torch and Triton paths cannot disagree about
*what* to compute, only about how.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

Grid = Tuple[int, int]


@dataclass(frozen=True)
class Resample:
    """Resample a token grid ``in_grid -> out_grid`` (bilinear, align_corners=False).

    A ``(1, n) -> (1, m)`` resample is 1-D linear interpolation of the flattened token sequence.
    """

    in_grid: Grid
    out_grid: Grid

    @property
    def is_linear_1d(self) -> bool:
        return self.in_grid[0] == 1 and self.out_grid[0] == 1


@dataclass(frozen=True)
class TokenPlan:
    """What token alignment does to each side. ``pool`` wins over the per-side resamples."""

    projected: Optional[Resample]
    features: Optional[Resample]
    pool: bool
    tokens: int  # token count of both sides after alignment


def _square_side(n: int) -> Optional[int]:
    s = math.isqrt(n)
    return s if s * s == n else None


def check_grid(name: str, grid: Optional[Sequence[int]], tokens: int) -> Optional[Grid]:
    """Validate a user-given ``(h, w)`` grid against the token count it describes."""
    if grid is None:
        return None
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)
    ):
        raise ValueError(f"{name} must be a (height, width) pair of ints, got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must have positive sides, got {grid!r}")
    if h * w != tokens:
        raise ValueError(f"{name}={grid!r} describes {h * w} tokens but the tensor has {tokens} tokens per frame")
    return (h, w)


def plan_tokens(
    n_projected: int,
    n_features: int,
    *,
    spatial_align: bool = True,
    projected_grid: Optional[Grid] = None,
    features_grid: Optional[Grid] = None,
) -> TokenPlan:
    """SPEC section 2. Grids must already be validated with :func:`check_grid`."""
    grid_mode = projected_grid is not None or features_grid is not None
    if not grid_mode:
        if n_projected == n_features:
            return TokenPlan(None, None, False, n_projected)
        if not spatial_align:
            return TokenPlan(None, None, True, 1)
        m = min(n_projected, n_features)
        return TokenPlan(_compat_resample(n_projected, m), _compat_resample(n_features, m), False, m)

    if not spatial_align and n_projected != n_features:
        return TokenPlan(None, None, True, 1)  # pooling needs no layout
    gp = projected_grid or implied_square("projected_grid", n_projected, given="features_grid")
    gf = features_grid or implied_square("features_grid", n_features, given="projected_grid")
    if gp == gf:
        return TokenPlan(None, None, False, n_projected)
    if not spatial_align:
        return TokenPlan(None, None, True, 1)
    if n_projected <= n_features:  # the smaller side keeps its grid; a tie keeps the projected grid
        return TokenPlan(None, Resample(gf, gp), False, n_projected)
    return TokenPlan(Resample(gp, gf), None, False, n_features)


def implied_square(name: str, n: int, given: str) -> Grid:
    """The square grid of `n` tokens, which grid mode (switched on by the `given` grid) assumes for the
    side whose grid `name` was left out; a clear error when `n` is not a perfect square."""
    s = _square_side(n)
    if s is None:
        raise ValueError(
            f"{name} is required: {given} switches to grid mode, which needs both token layouts, and "
            f"{n} tokens per frame is not a perfect square, so the layout cannot be inferred"
        )
    return (s, s)


def _compat_resample(n: int, m: int) -> Optional[Resample]:
    """Parity mode: square grids resample bilinearly, anything else 1-D linearly; n == m is a no-op."""
    if n == m:
        return None
    s, t = _square_side(n), _square_side(m)
    if s is not None and t is not None:
        return Resample((s, s), (t, t))
    return Resample((1, n), (1, m))
