"""The frozen teacher: video-VAE adapters (latents to frames) and the DINOv2 encoder (frames to features)."""
from .encoders import DINOV2_MODELS, DinoEncoder, load_dinov2_state_dict, resolve_encoder_name
from .pipeline import kept_frame_indices, latents_to_features
from .vae import SUPPORTED_VAE_CLASSES, VAE_FAMILIES, VaeAdapter, adapter_for, channels_last_3d, drop_encoder

__all__ = [
    "DINOV2_MODELS",
    "DinoEncoder",
    "load_dinov2_state_dict",
    "resolve_encoder_name",
    "kept_frame_indices",
    "latents_to_features",
    "SUPPORTED_VAE_CLASSES",
    "VAE_FAMILIES",
    "VaeAdapter",
    "adapter_for",
    "channels_last_3d",
    "drop_encoder",
]
