"""Integrations with video-diffusion stacks: block hidden-state capture from diffusers transformers."""
from . import capture as _capture
from .capture import (  # noqa: F401  (the public names, listed once in capture.__all__)
    CapturedStates,
    HiddenStateCapture,
    TransformerInfo,
    capture_hidden_states,
    supported_transformers,
    transformer_info,
)

__all__ = list(_capture.__all__)
