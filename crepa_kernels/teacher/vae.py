"""Video-VAE adapters: training-space latents in, pixel frames `(B, T, C, H, W)` in [0, 1] out.

One adapter per model family (SPEC section 7), chosen from the VAE's class name so that `diffusers` is never
imported here (the package must import without it):

- `wan`, `sanavideo` (`AutoencoderKLWan`): `z * latents_std + latents_mean`, per channel, from `vae.config`;
- `ltxvideo` (`AutoencoderKLLTXVideo`): `z * latents_std / scaling_factor + latents_mean` from the VAE's
  buffers, plus a decode timestep when the decoder is timestep-conditioned;
- `kandinsky5_video` (`AutoencoderKLHunyuanVideo`): `z / scaling_factor`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["VaeAdapter", "adapter_for", "channels_last_3d", "drop_encoder", "SUPPORTED_VAE_CLASSES",
           "VAE_FAMILIES"]

# family -> VAE class name; several families may share a class.
VAE_FAMILIES = {
    "wan": "AutoencoderKLWan",
    "sanavideo": "AutoencoderKLWan",
    "ltxvideo": "AutoencoderKLLTXVideo",
    "kandinsky5_video": "AutoencoderKLHunyuanVideo",
}
SUPPORTED_VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLLTXVideo", "AutoencoderKLHunyuanVideo")
_DEFAULT_FAMILY = {"AutoencoderKLWan": "wan", "AutoencoderKLLTXVideo": "ltxvideo",
                   "AutoencoderKLHunyuanVideo": "kandinsky5_video"}


# Seed of the noise an LTX-Video 0.9.1-style decoder injects (decoder_inject_noise): drawn in a forked
# RNG from this seed, so that the teacher is deterministic and the training's random stream untouched.
DECODE_NOISE_SEED = 0


def autocast_off(device: torch.device):
    """A context in which an outer ``torch.autocast`` does not reach: the teacher runs in its weights'
    dtype, fixed when it was built, whatever the training step around it autocasts to."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _seeded_noise(device: torch.device):
    """A context in which the RNG of ``device`` (and the CPU's) starts from DECODE_NOISE_SEED, restored
    afterwards: for CUDA devices and the CPU (on another device the decoder's noise comes from that
    device's generator as it stands)."""
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        stack.enter_context(torch.random.fork_rng(devices=[index]))
        torch.cuda.default_generators[index].manual_seed(DECODE_NOISE_SEED)
    else:
        stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.random.default_generator.manual_seed(DECODE_NOISE_SEED)
    return stack


def _unwrap(vae: nn.Module) -> nn.Module:
    return getattr(vae, "_orig_mod", vae)  # torch.compile wrapper


def _vae_class(vae: Any) -> str | None:
    """The first supported class name in the VAE's MRO (subclasses are accepted), or None."""
    for cls in type(_unwrap(vae)).__mro__:
        if cls.__name__ in SUPPORTED_VAE_CLASSES:
            return cls.__name__
    return None


def _config_get(vae: nn.Module, key: str, default: Any = None) -> Any:
    config = getattr(vae, "config", None)
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device a VAE's inputs must be on: its weights' device, or, under diffusers' offloading
    (enable_model_cpu_offload, group offloading, sequential offload) the device its hooks move the
    weights to before each forward. None for a module without tensors."""
    device = None
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:  # older diffusers: the weights' device
        get_module_execution_device = None
    if get_module_execution_device is not None:
        try:
            device = get_module_execution_device(module)
        except (StopIteration, ValueError, AttributeError, RuntimeError):
            device = None
    if device is None:
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        device = None if first is None else first.device
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tensors always carry an index
    return device


class VaeAdapter:
    """Decode one family's training-space latents `(B, C, T, h, w)` to frames `(B, T, 3, H, W)` in [0, 1]."""

    def __init__(self, vae: nn.Module, family: str) -> None:
        class_name = _vae_class(vae)
        if class_name is None:
            raise TypeError(
                f"vae: unsupported class {type(vae).__name__}; supported classes: {', '.join(SUPPORTED_VAE_CLASSES)}"
            )
        if not isinstance(family, str) or family not in VAE_FAMILIES:
            raise ValueError(f"family must be one of {sorted(VAE_FAMILIES)}, got {family!r}")
        if VAE_FAMILIES[family] != class_name:
            raise ValueError(f"family={family!r} expects a {VAE_FAMILIES[family]}, but the VAE is a {class_name}")
        self.vae = vae
        self.family = family
        self.class_name = class_name
        inner = _unwrap(vae)
        if self.class_name == "AutoencoderKLWan":
            # The architecture decides the ratios (the config's scale_factor_* are only pipeline hints).
            self.temporal_compression = 2 ** sum(bool(x) for x in inner.temperal_downsample)
            patch = _config_get(inner, "patch_size") or 1
            self.spatial_compression = 2 ** (len(_config_get(inner, "dim_mult")) - 1) * patch
            self.latent_channels = int(_config_get(inner, "z_dim"))
            mean, std = _config_get(inner, "latents_mean"), _config_get(inner, "latents_std")
            if mean is None or std is None or len(mean) != self.latent_channels or len(std) != self.latent_channels:
                raise ValueError(
                    f"vae.config.latents_mean / latents_std must each have z_dim={self.latent_channels} entries, "
                    f"got {None if mean is None else len(mean)} and {None if std is None else len(std)}"
                )
            self._mean_values = [float(v) for v in mean]
            self._std_values = [float(v) for v in std]
        elif self.class_name == "AutoencoderKLLTXVideo":
            self.temporal_compression = int(inner.temporal_compression_ratio)
            self.spatial_compression = int(inner.spatial_compression_ratio)
            self.latent_channels = int(_config_get(inner, "latent_channels"))
        else:
            self.temporal_compression = int(inner.temporal_compression_ratio)
            self.spatial_compression = int(inner.spatial_compression_ratio)
            self.latent_channels = int(_config_get(inner, "latent_channels"))
        self.scaling_factor = 1.0  # Wan / SanaVideo latents do not use it
        if self.class_name != "AutoencoderKLWan":  # LTX-Video and Kandinsky 5 latents are divided by it
            factor = _config_get(inner, "scaling_factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor < math.inf:
                raise ValueError(f"vae.config.scaling_factor must be a positive finite number for a {class_name} "
                                 f"(its latents are divided by it), got {factor!r}")
            self.scaling_factor = float(factor)
        self.timestep_conditioning = bool(_config_get(inner, "timestep_conditioning", False))
        # LTX-Video 0.9.1's decoder adds torch.randn noise in some blocks (diffusers passes them no generator).
        self.injects_noise = any(getattr(m, name, None) is not None for m in inner.modules()
                                 for name in ("per_channel_scale1", "per_channel_scale2"))
        # Per-(device, dtype) copies of the Wan statistics: built once, so decode does no host-to-device copy.
        self._stats_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"VaeAdapter(family={self.family!r}, vae={self.class_name}, temporal_compression="
                f"{self.temporal_compression}, spatial_compression={self.spatial_compression})")

    # ------------------------------------------------------------------------------------------------------------
    def pixel_frames(self, latent_frames: int) -> int:
        """Frames the decoder produces for `latent_frames` latent frames: (T - 1) * temporal_compression + 1."""
        if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames <= 0:
            raise ValueError(f"latent_frames must be a positive int, got {latent_frames!r}")
        return (latent_frames - 1) * self.temporal_compression + 1

    def pixel_size(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """Decoded (H, W) for a latent (h, w)."""
        return latent_height * self.spatial_compression, latent_width * self.spatial_compression

    def _vae_dtype(self) -> torch.dtype:
        """The dtype the VAE computes in, as diffusers' pipelines cast latents to (``vae.dtype``): with
        layerwise casting the weights are stored in another (e.g. float8) and cast per layer."""
        inner = _unwrap(self.vae)
        dtype = getattr(inner, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
        first = next((p for p in inner.parameters() if p.is_floating_point()), None)
        return torch.float32 if first is None else first.dtype

    def _wan_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, torch.float32)
        stats = self._stats_cache.get(key)
        if stats is None:
            mean = torch.tensor(self._mean_values, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
            std = torch.tensor(self._std_values, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
            stats = self._stats_cache[key] = (mean, std)
        return stats

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the family's training-space normalisation (in float32); returns the VAE's dtype."""
        self._check_latents(latents)
        z = latents.float()
        if self.class_name == "AutoencoderKLWan":
            mean, std = self._wan_stats(latents.device)
            z = z * std + mean
        elif self.class_name == "AutoencoderKLLTXVideo":
            inner = _unwrap(self.vae)
            # Registered buffers live on the VAE's device: a same-device cast, no host transfer.
            mean = inner.latents_mean.to(device=z.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
            std = inner.latents_std.to(device=z.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
            z = z * std / self.scaling_factor + mean
        else:
            z = z / self.scaling_factor
        return z.to(self._vae_dtype())

    def _check_latents(self, latents: Any) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.dim() != 5:
            raise ValueError(f"latents must be (B, C, T, h, w), got shape {tuple(latents.shape)}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must have {self.latent_channels} channels at dim 1 for this {self.class_name} "
                f"(layout (B, C, T, h, w)), got shape {tuple(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise TypeError(f"latents must be floating point, got dtype {latents.dtype}")
        if latents.numel() == 0:
            raise ValueError(f"latents is empty: shape {tuple(latents.shape)} (B, T, h and w must be positive)")

    def _check_timestep(self, timestep: Any, batch: int) -> float | torch.Tensor | None:
        """``timestep`` checked as ``decode`` takes it (None, a number in [0, 1], or a tensor of 1 or
        ``batch`` such values), before any work. A tensor comes back as its values on the host (float64,
        exact for every float dtype): the one device read, so that checking it again costs none."""
        if timestep is None:
            return None
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() not in (1, batch):
                raise ValueError(
                    f"timestep must hold 1 or B={batch} values, got shape {tuple(timestep.shape)}"
                )
            if timestep.dtype == torch.bool or timestep.is_complex():
                raise TypeError(f"timestep must be a float (or int) tensor, got dtype {timestep.dtype}")
            values = timestep.detach().to(device="cpu", dtype=torch.float64)
            if not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails this too
                raise ValueError(f"timestep must be in [0, 1] (the decoder scales it by 1000), got {timestep!r}")
            return values
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            if not 0.0 <= float(timestep) <= 1.0:  # NaN fails this too
                raise ValueError(f"timestep must be in [0, 1] (the decoder scales it by 1000), got {timestep!r}")
            return float(timestep)
        raise TypeError(f"timestep must be None, a float or a tensor, got {type(timestep).__name__} ({timestep!r})")

    def _timestep_tensor(self, timestep: Any, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The decoder's ``temb`` from a timestep ``_check_timestep`` returned."""
        if timestep is None:
            timestep = 0.0  # the LTX pipelines' default decode timestep
        if isinstance(timestep, torch.Tensor):
            # the checked values are on the host: an asynchronous copy (a blocking one would wait for the
            # stream; from pageable memory the call returns once the values are staged)
            values = timestep.to(dtype=dtype).reshape(-1).expand(batch).contiguous()
            return values.to(device=device, non_blocking=True)
        return torch.full((batch,), timestep, device=device, dtype=dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Latents `(B, C, T, h, w)` -> frames `(B, pixel_frames(T), 3, H, W)` in [0, 1] (a permuted view).

        `timestep` is the decode timestep of a timestep-conditioned LTX decoder (default 0.0), in [0, 1];
        VAEs without timestep conditioning ignore it, as diffusers' pipelines do. No decode noise is mixed
        into the latents (diffusers' LTX pipelines with ``decode_noise_scale=0``), and the noise an LTX
        decoder with ``decoder_inject_noise`` adds inside its blocks is drawn from a fixed seed
        (``DECODE_NOISE_SEED``) in a forked RNG: the teacher stays deterministic, and the caller's random
        stream is left as it was. An outer ``torch.autocast`` is switched off: the decode runs in the
        VAE's dtype. The latents must be on the device the VAE runs on (under diffusers' offloading
        hooks, where they move its weights).
        """
        self._check_latents(latents)
        timestep = self._check_timestep(timestep, latents.shape[0])
        device = _execution_device(_unwrap(self.vae))
        if device is not None and device != latents.device:
            raise ValueError(f"latents are on {latents.device} but the VAE runs on {device}; move one of them")
        with autocast_off(latents.device), (_seeded_noise(latents.device) if self.injects_noise
                                            else contextlib.nullcontext()):
            return self._decode(latents, timestep)

    def _decode(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        z = self.denormalize(latents)
        if self.timestep_conditioning:
            temb = self._timestep_tensor(timestep, z.shape[0], z.device, z.dtype)
            if getattr(self.vae, "use_slicing", False) and z.shape[0] > 1:
                # Slice here: diffusers 0.42's sliced LTX decode mis-pairs latents and timesteps.
                video = torch.cat([self.vae.decode(zs, temb=ts).sample for zs, ts in zip(z.split(1), temb.split(1))])
            else:
                video = self.vae.decode(z, temb=temb).sample
        else:  # the timestep (checked in decode) is ignored, as diffusers' pipelines do
            video = self.vae.decode(z).sample
        video = (video.clamp(-1.0, 1.0) + 1.0) * 0.5
        return video.permute(0, 2, 1, 3, 4)

    def drop_encoder(self) -> int:
        return drop_encoder(self.vae)


def adapter_for(vae: nn.Module, family: str | None = None) -> VaeAdapter:
    """The adapter for `vae`; `family` (optional) must agree with its class (`sanavideo` picks the Wan class)."""
    class_name = _vae_class(vae)
    if class_name is None:
        raise TypeError(
            f"unsupported VAE class {type(vae).__name__}; supported classes: {', '.join(SUPPORTED_VAE_CLASSES)}"
        )
    if family is None:
        family = _DEFAULT_FAMILY[class_name]
    elif not isinstance(family, str) or family not in VAE_FAMILIES:
        raise ValueError(f"family must be one of {sorted(VAE_FAMILIES)} or None, got {family!r}")
    return VaeAdapter(vae, family)  # checks that the family agrees with the class


def drop_encoder(vae: nn.Module) -> int:
    """Free the encoder half of a video VAE (config key `crepa_drop_vae_encoder`); returns parameters freed.

    Decoding keeps working; `vae.encode` no longer does. Call it before an offload manager first
    sees the VAE: a packed VAE's tensors are views of the manager's buffer, which dropping them would
    not shrink (refused; ``manager.unregister(vae)`` first).
    """
    from .offload import is_managed

    inner = _unwrap(vae)
    if _vae_class(inner) is None:
        raise TypeError(
            f"unsupported VAE class {type(vae).__name__}; supported classes: {', '.join(SUPPORTED_VAE_CLASSES)}"
        )
    if all(getattr(inner, attr, None) is None for attr in ("encoder", "quant_conv")):
        return 0  # dropped already (or never had one): nothing to free, packed or not
    if is_managed(vae) or is_managed(inner):
        raise RuntimeError(
            f"vae: this {type(inner).__name__} is packed by an offload manager, so dropping its encoder would free "
            "nothing; call drop_encoder before its first use, or manager.unregister(vae) first"
        )
    freed = 0
    for attr in ("encoder", "quant_conv"):  # quant_conv only follows the encoder
        module = getattr(inner, attr, None)
        if isinstance(module, nn.Module):
            freed += sum(p.numel() for p in module.parameters())
            setattr(inner, attr, None)
    return freed


def channels_last_3d(vae: nn.Module) -> int:
    """Lay out every 5-D floating-point tensor of a video VAE (its Conv3d kernels) as channels-last,
    in place (config key `crepa_vae_channels_last`); returns how many tensors changed layout.

    cuDNN runs half-precision 3-D convolutions in this layout natively, so the decode skips the
    transposes around each convolution (bench/bench_step.py times it; its frames differ from the
    default layout's by the VAE dtype's rounding, as any other convolution algorithm's would). The 2-D
    kernels keep their layout. Idempotent. Like `drop_encoder`, call it before an offload manager
    first sees the VAE: a packed VAE's tensors are views of the manager's buffer (refused;
    ``manager.unregister(vae)`` first). The manager keeps the layout in host RAM and on the device.
    """
    from .offload import is_managed

    inner = _unwrap(vae)
    if _vae_class(inner) is None:
        raise TypeError(
            f"unsupported VAE class {type(vae).__name__}; supported classes: {', '.join(SUPPORTED_VAE_CLASSES)}"
        )
    fmt = torch.channels_last_3d
    todo = [t for t in itertools.chain(inner.parameters(), inner.buffers())
            if t.dim() == 5 and t.is_floating_point() and not t.is_contiguous(memory_format=fmt)]
    if todo and (is_managed(vae) or is_managed(inner)):
        raise RuntimeError(
            f"vae: this {type(inner).__name__} is packed by an offload manager, so its weights cannot change "
            "layout in place; call channels_last_3d before its first use, or manager.unregister(vae) first"
        )
    for t in todo:
        t.data = t.data.contiguous(memory_format=fmt)
    return len(todo)
