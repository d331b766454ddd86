"""Latents to teacher features: decode every latent frame, encode only the frames the loss will keep.

Causal video VAEs need all latent frames to decode any of them, so decoding is not pruned; the encoder is.
Selecting the frames SPEC section 1 keeps before encoding gives exactly what encoding all of them and
subsampling afterwards would, at a fraction of the cost.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from .encoders import DinoEncoder
from .vae import VaeAdapter

__all__ = ["latents_to_features", "kept_frame_indices"]

ContextFactory = Callable[[], ContextManager]


def kept_frame_indices(total: int, keep: int) -> list[int]:
    """Frames temporal alignment keeps when `total` frames meet `keep` (SPEC section 1), as host ints."""
    if total <= keep:
        return list(range(total))
    # Same float32 linspace + truncation as the loss's alignment, evaluated on the host (no device sync).
    return torch.linspace(0, total - 1, keep, dtype=torch.float32).long().tolist()


def _select_frames(frames: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """frames[:, idx] as a compact tensor; an arithmetic progression is a strided view (no index copy)."""
    total = frames.shape[1]
    if idx == list(range(total)):
        return frames
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if step > 0 and idx == list(range(idx[0], idx[-1] + 1, step)):
        return frames[:, idx[0]:idx[-1] + 1:step]
    index = torch.tensor(idx, dtype=torch.long).to(frames.device, non_blocking=True)
    return frames.index_select(1, index)


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
    vae_adapter._check_latents(latents)  # before any context moves a module to the device
    return _decode_and_encode(lambda: vae_adapter.decode(latents, timestep=timestep), encoder,
                              num_frames=num_frames, vae_context=vae_context, encoder_context=encoder_context)


def _decode_and_encode(decode: Callable[[], torch.Tensor], encoder: DinoEncoder, *, num_frames: int,
                       vae_context: ContextFactory | None = None,
                       encoder_context: ContextFactory | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``decode()`` (frames `(B, T, C, H, W)` in [0, 1]) inside `vae_context`, then the frames temporal
    alignment keeps encoded inside `encoder_context`, all without autograd: (features, grid)."""
    with torch.no_grad():
        with (vae_context or contextlib.nullcontext)():
            frames = decode()
        kept = _select_frames(frames, kept_frame_indices(frames.shape[1], num_frames)).contiguous()
        del frames  # only the kept frames stay alive while the encoder runs
        with (encoder_context or contextlib.nullcontext)():
            features = encoder.encode(kept)
    return features, encoder.grid
