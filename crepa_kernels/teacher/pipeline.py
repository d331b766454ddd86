"""Latents to teacher features: decode every latent frame, encode only the frames the loss will keep.

Causal video VAEs need all latent frames to decode any of them, so decoding is not pruned; the encoder is.
Selecting the frames SPEC section 1 keeps before encoding gives exactly what encoding all of them and
subsampling afterwards would, at a fraction of the cost.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from ..reference import temporal_indices
from .encoders import DinoEncoder
from .vae import VaeAdapter

__all__ = ["latents_to_features", "kept_frame_indices"]

ContextFactory = Callable[[], ContextManager]


def kept_frame_indices(total: int, keep: int, device: torch.device | str | None = None) -> list[int]:
    """Frames temporal alignment keeps when `total` frames meet `keep` (SPEC section 1), as host ints,
    computed as the loss computes them on `device` (default the CPU; a GPU's float32 linspace may
    round a position differently from the CPU's)."""
    if total <= keep:
        return list(range(total))
    return temporal_indices(total, keep, device=device).tolist()


def _select_frames(frames: torch.Tensor, keep: int) -> torch.Tensor:
    """The frames temporal alignment keeps, picked on the frames' device with the loss's own indices
    (no host sync), so the encoder sees exactly the frames the loss would have kept."""
    total = frames.shape[1]
    if total <= keep:
        return frames
    return frames.index_select(1, temporal_indices(total, keep, device=frames.device))


def latents_to_features(
    latents: torch.Tensor,
    vae_adapter: VaeAdapter,
    encoder: DinoEncoder,
    *,
    num_frames: int,
    timestep: float | torch.Tensor | None = None,
    vae_context: ContextFactory | None = None,
    encoder_context: ContextFactory | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Training-space latents `(B, C, T_lat, h, w)` -> (features `(B, K, N, D)` float32, grid `(h, w)`).

    Args:
        num_frames: frame count of the student side (the DiT hidden states); K = min(num_frames, decoded
            frames), the decoded frames subsampled with `floor(linspace(0, T_pix - 1, num_frames))`.
        timestep: decode timestep for timestep-conditioned VAEs (LTX); see `VaeAdapter.decode`.
        vae_context / encoder_context: optional factories of context managers entered around the decode and
            the encode (e.g. an offload manager placing the module on the GPU for the duration).
    """
    if not isinstance(vae_adapter, VaeAdapter):
        raise TypeError(f"vae_adapter must be a VaeAdapter (see adapter_for), got {type(vae_adapter).__name__}")
    if not isinstance(encoder, DinoEncoder):
        raise TypeError(f"encoder must be a DinoEncoder, got {type(encoder).__name__}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    for arg, value in (("vae_context", vae_context), ("encoder_context", encoder_context)):
        if value is not None and not callable(value):
            raise TypeError(f"{arg} must be a callable returning a context manager, or None; got {value!r}")
    # before any context moves a module to the device (a timestep tensor is read to the host here, once)
    vae_adapter._check_latents(latents)
    timestep = vae_adapter._check_timestep(timestep, latents.shape[0])
    return _decode_and_encode(lambda: vae_adapter.decode(latents, timestep=timestep), encoder,
                              num_frames=num_frames, vae_context=vae_context, encoder_context=encoder_context)


def _decode_and_encode(decode: Callable[[], torch.Tensor], encoder: DinoEncoder, *, num_frames: int,
                       vae_context: ContextFactory | None = None,
                       encoder_context: ContextFactory | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``decode()`` (frames `(B, T, C, H, W)` in [0, 1]) inside `vae_context`, then the frames temporal
    alignment keeps encoded inside `encoder_context`, all without autograd: (features, grid)."""
    with torch.no_grad():
        with _context(vae_context, "vae_context"):
            frames = decode()
        kept = _select_frames(frames, num_frames).contiguous()
        del frames  # only the kept frames stay alive while the encoder runs
        with _context(encoder_context, "encoder_context"):
            features = encoder.encode(kept)
    return features, encoder.grid


def _context(factory: ContextFactory | None, name: str) -> ContextManager:
    """What ``factory`` returns, checked to be a context manager (Python's own error names neither
    argument), or a null context."""
    if factory is None:
        return contextlib.nullcontext()
    ctx = factory()
    if not (hasattr(type(ctx), "__enter__") and hasattr(type(ctx), "__exit__")):
        raise TypeError(f"{name} must return a context manager (e.g. lambda: manager.use(module)), "
                        f"got {type(ctx).__name__}")
    return ctx
