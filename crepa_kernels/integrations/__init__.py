"""Integrations with video-diffusion stacks: block hidden-state capture from diffusers transformers."""
from .capture import (
    HiddenStateCapture,
    TransformerInfo,
    capture_hidden_states,
    supported_transformers,
    transformer_info,
)

__all__ = [
    "HiddenStateCapture",
    "TransformerInfo",
    "capture_hidden_states",
    "supported_transformers",
    "transformer_info",
]
