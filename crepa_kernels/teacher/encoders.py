"""The frozen DINOv2 image encoder: decoded video frames in, per-frame patch tokens out.

DINOv2 comes from `timm` (`vit_{small,base,large,giant}_patch14[_reg4]_dinov2`). Weights load from a
local file (timm `.safetensors` or the original `.pth`) or from a local cache; nothing is downloaded.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .vae import autocast_off

__all__ = ["DinoEncoder", "resolve_encoder_name", "DINOV2_MODELS", "load_dinov2_state_dict"]

PATCH_SIZE = 14
DEFAULT_IMAGE_SIZE = 518
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The timm architectures we serve, keyed by (size letter, with registers).
_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
DINOV2_MODELS = tuple(
    f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2" for reg in (False, True) for size in _SIZES.values()
)
_ALIASES = {
    f"dinov2_vit{letter}14{suffix}": f"vit_{size}_patch14{'_reg4' if suffix else ''}_dinov2"
    for letter, size in _SIZES.items()
    for suffix in ("", "_reg", "_reg4")
}
# Loose spellings users already write: dinov2_g, dino_v2_s, dinov2-vitb14, dinov2_giant, facebook/dinov2-large ...
_LOOSE = re.compile(
    r"^dino_?v2_?(?:vit_?)?(s|b|l|g|small|base|large|giant|giant2|g2)(?:_?14)?(?:_?(reg4?|with_registers))?$"
)
_SIZE_WORDS = {"s": "s", "small": "s", "b": "b", "base": "b", "l": "l", "large": "l", "g": "g", "giant": "g",
               "giant2": "g", "g2": "g"}


def resolve_encoder_name(name: str) -> str:
    """Map a user-facing DINOv2 name (timm name, `dinov2_vitg14`, loose forms) to the timm architecture."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str naming a DINOv2 model, got {type(name).__name__} ({name!r})")
    key = name.strip().lower().replace("-", "_")
    for prefix in ("timm/", "facebook/", "hf_hub:timm/", "hf_hub:facebook/"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = key.split(".")[0]  # drop a timm pretrained tag such as ".lvd142m"
    if key in DINOV2_MODELS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    match = _LOOSE.match(key)
    if match:
        size = _SIZES[_SIZE_WORDS[match.group(1)]]
        return f"vit_{size}_patch14{'_reg4' if match.group(2) else ''}_dinov2"
    valid = ", ".join(list(DINOV2_MODELS) + sorted(k for k in _ALIASES if not k.endswith("_reg")))
    raise ValueError(f"unknown encoder name {name!r}; expected one of: {valid} (or the `_reg` alias forms)")


def _dynamic_img_size(model: Any) -> bool:
    """Whether a timm ViT takes other image sizes (built with ``dynamic_img_size=True``): timm keeps the
    flag on the model (older versions on its patch embedding)."""
    return bool(getattr(model, "dynamic_img_size", False)
                or getattr(getattr(model, "patch_embed", None), "dynamic_img_size", False))


# `crepa_encoder_dtype` spellings, with the short forms the config key also takes; "auto" is the device
# rule in `_resolve_dtype`.
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_CHOICES = ", ".join(repr(n) for n in ("auto", *_DTYPE_NAMES))


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a str, int, torch.device or None, got {type(device).__name__} ({device!r})")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must name a device such as 'cuda', 'cuda:1' or 'cpu', got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available")
    return resolved


def _resolve_dtype(dtype: Any, device: torch.device | None) -> torch.dtype:
    """The fixed compute dtype: `dtype` if given, else bfloat16 when the encoder will run on CUDA, else float32."""
    if isinstance(dtype, str):
        if dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype]
        if dtype != "auto":
            raise ValueError(f"dtype must be a floating torch.dtype or one of {_DTYPE_CHOICES}, got {dtype!r}")
        dtype = None
    if dtype is None:
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, None or one of {_DTYPE_CHOICES}, got {dtype!r}")
    return dtype


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__} ({image_size!r})")
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    return image_size


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------

def _cause_line(e: Exception) -> str:
    """The line of an exception's message that names the cause (torch's weights_only error opens with
    advice and names the offending global further down), without terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    named = [line for line in lines if "error:" in line.lower() or "unsupported" in line.lower()]
    return (named or lines or [""])[0]


def _require_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    return path


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = _require_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as e:  # safetensors' own error names neither the file nor the cause's place
            raise ValueError(f"weights file {path!r} is not a readable safetensors file: {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"weights file {path!r} could not be read as a PyTorch checkpoint of tensors (weights_only=True): "
                f"it is damaged, or it pickles other objects too; save the state dict alone, or as .safetensors "
                f"({type(e).__name__}: {_cause_line(e)})") from e
    # Unwrap the usual checkpoint containers and training-time prefixes.
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path!r} does not hold a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        # DINOv2's training checkpoints hold the backbone next to the heads (dino_head., ibot_head.)
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if any(k.startswith(("embeddings.patch_embeddings.", "encoder.layer.")) for k in state):
        raise ValueError(
            f"weights file {path!r} holds Hugging Face transformers Dinov2Model weights (keys "
            "'embeddings.*', 'encoder.layer.*'), a layout this loader does not read; use the original "
            "DINOv2 checkpoint (dinov2_vit*14*_pretrain.pth) or timm's model.safetensors")
    # Original checkpoints saved with block chunking name blocks `blocks.<chunk>.<index>.`; the index is global.
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def _resize_pos_embed_as_dinov2(state: dict, model: nn.Module) -> None:
    """Resize a checkpoint's position embedding to the model's patch grid the way DINOv2 itself does
    (its `interpolate_pos_encoding`, which the reference trainer's hub models run at every forward):
    bicubic in float32 from the checkpoint's M x M grid to the model's g x g, with the settings DINOv2's
    hub gives each family: without registers, no antialiasing and scale factor (g + 0.1) / M; with
    registers (`dinov2_*_reg`), antialiasing and output size g x g (interpolate_offset 0). The class
    token's entry, where the checkpoint has one, is kept as it is. A grid that is not square, or already
    the model's, is left alone."""
    pos = state.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not torch.is_tensor(pos) or pos.ndim != 3 or grid is None or grid[0] != grid[1]:
        return
    n, dim = pos.shape[1], pos.shape[2]
    for prefix in (0, 1):  # timm's register models drop the class entry; the others keep it
        m = math.isqrt(n - prefix)
        if m * m == n - prefix:
            break
    else:
        return
    g = int(grid[0])
    if m == g:
        return
    patches = pos[:, prefix:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if getattr(model, "num_reg_tokens", 0):
        patches = F.interpolate(patches, size=(g, g), mode="bicubic", antialias=True)
    else:
        patches = F.interpolate(patches, scale_factor=((g + 0.1) / m, (g + 0.1) / m), mode="bicubic",
                                antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, g * g, dim)
    state["pos_embed"] = torch.cat([pos[:, :prefix].float(), patches], dim=1).to(pos.dtype)


def load_dinov2_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Load DINOv2 weights (timm or original facebookresearch key names) from a local file into a timm ViT.

    timm's own ViT checkpoint filter converts the original names (`mask_token`, `register_tokens`, `w12`/`w3`).
    When the image size differs from the checkpoint's, the position embedding is first resized as DINOv2
    itself resizes it (see `_resize_pos_embed_as_dinov2`), not by timm's resize.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state_dict(path)
    _resize_pos_embed_as_dinov2(state, model)
    state = checkpoint_filter_fn(state, model)
    # Checked in full before anything is copied: a mismatch leaves the model as it was.
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"weights file {os.fspath(path)!r} does not match the model (a {type(model).__name__}; another size "
            f"or depth?): missing keys {missing[:8]}, unexpected keys {unexpected[:8]}, shape mismatches "
            f"{wrong_shape[:4]}"
        )
    model.load_state_dict(state, strict=True)


def _cached_weights(arch: str) -> str | None:
    """A local copy of the pretrained weights if one is already cached (HF hub or torch hub), else None."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.lvd142m")
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str):
                    return found
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            pass
    if cfg.url:  # the original release, as torch.hub caches it
        found = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.isfile(found):
            return found
    return None


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------

class DinoEncoder(nn.Module):
    """Frozen DINOv2 patch-token encoder for video frames.

    Args:
        name: a DINOv2 name (`dinov2_vitg14`, `vit_large_patch14_reg4_dinov2`, `dinov2-vitb14`, ...).
        image_size: square input resolution, a positive multiple of 14. None: 518 for a named model, the
            wrapped model's own size when `model` is given.
        weights: path to a `.safetensors` / `.pth` file; None: the local HF-hub or torch-hub cache (an error if
            absent, never a download); "random": keep random initialisation (tests, benchmarks).
        model: an already-built timm DINOv2 ViT to wrap instead of building one from `name`.
        dtype: compute dtype, a floating torch.dtype or "float32" / "bfloat16" / "float16" (the
            `crepa_encoder_dtype` values; "fp32" / "bf16" / "fp16" as well). None or "auto": bfloat16
            when the encoder will run on CUDA (`device` is CUDA, or `device` is None and CUDA is
            available), float32 otherwise.
        device: the device the encoder will run on; the weights are moved there. None: they stay where they
            are (on the CPU for a named model), e.g. for an offload manager to move at each use.
        frames_batch_size: frames per forward pass; None: all frames at once.
        model_kwargs: extra `timm.create_model` arguments (depth, embed_dim, ...).
    """

    def __init__(
        self,
        name: str = "dinov2_vitg14",
        image_size: int | None = None,
        *,
        weights: str | os.PathLike | None = None,
        model: nn.Module | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | int | torch.device | None = None,
        frames_batch_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device)
        if frames_batch_size is not None and (
            isinstance(frames_batch_size, bool) or not isinstance(frames_batch_size, int) or frames_batch_size <= 0
        ):
            raise ValueError(f"frames_batch_size must be a positive int or None, got {frames_batch_size!r}")
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights must be a path, 'random' or None, got {type(weights).__name__} ({weights!r})")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")

        built_from_name = model is None
        random_init = isinstance(weights, str) and weights == "random"
        if weights is not None and not random_init:
            # before the model is built: a missing file must not cost a ViT-g's build (tens of seconds,
            # gigabytes) first
            _require_file(weights)
        if built_from_name:
            self.name = resolve_encoder_name(name)
            cached = None
            if weights is None:  # found (or not) before the model is built, as above
                cached = _cached_weights(self.name)
                if cached is None:
                    raise FileNotFoundError(
                        f"no local weights for {self.name!r}: pass weights=<path to .safetensors/.pth>, place the "
                        f"checkpoint in the Hugging Face or torch hub cache, or weights='random' for an untrained "
                        f"model"
                    )
            image_size = _check_image_size(DEFAULT_IMAGE_SIZE if image_size is None else image_size)
            import timm

            given = (model_kwargs or {}).get("img_size", image_size)
            if (tuple(given) if isinstance(given, (tuple, list)) else (given, given)) != (image_size, image_size):
                raise ValueError(
                    f"model_kwargs img_size={model_kwargs['img_size']!r} disagrees with image_size={image_size}; "
                    "pass the input size as image_size only"
                )
            kwargs = {"img_size": image_size, "num_classes": 0}
            kwargs.update(model_kwargs or {})
            model = timm.create_model(self.name, pretrained=False, **kwargs)
        else:
            for attr in ("forward_features", "patch_embed", "num_prefix_tokens"):
                if not hasattr(model, attr):
                    raise TypeError(
                        f"model must be a timm VisionTransformer (missing `{attr}`), got {type(model).__name__}"
                    )
            if model_kwargs:
                raise ValueError("model_kwargs only applies when the encoder is built from `name`, not with `model`")
            self.name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
            native = tuple(model.patch_embed.img_size)
            if image_size is None:
                if native[0] != native[1]:
                    raise ValueError(f"the wrapped model's image size {native} is not square; pass image_size")
                image_size = native[0]
            image_size = _check_image_size(image_size)
            if native != (image_size, image_size) and not _dynamic_img_size(model):
                raise ValueError(
                    f"image_size={image_size} does not match the wrapped model's input size {native}; build the "
                    f"model with img_size={image_size} (or dynamic_img_size=True)"
                )
        patch = tuple(model.patch_embed.patch_size)
        if patch != (PATCH_SIZE, PATCH_SIZE):
            raise ValueError(f"model patch size must be {PATCH_SIZE}x{PATCH_SIZE} (DINOv2), got {patch}")

        self.model = model
        self.image_size = image_size
        self.frames_batch_size = frames_batch_size
        self._dtype = dtype
        # Non-persistent so they follow `.to(device)` without entering the state dict.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        if random_init:
            pass
        elif weights is not None:
            load_dinov2_state_dict(self.model, weights)
        elif built_from_name:
            load_dinov2_state_dict(self.model, cached)

        # timm uses F.scaled_dot_product_attention when `fused_attn` is set; make sure it is.
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
        self.model.requires_grad_(False)
        self.model.eval()
        # The weights take their compute dtype here, once, and `encode` never touches the module: an offload
        # manager packs the module's tensors when it first sees it, and a later cast would replace them.
        self.model.to(dtype)
        if device is not None:
            self.to(device)  # the pixel statistics too; they stay float32

    @property
    def dtype(self) -> torch.dtype:
        """The dtype `encode` runs in: the weights' (set at construction; a later cast of the module,
        e.g. of a parent, changes it, and this follows)."""
        first = next(self.model.parameters(), None)
        return self._dtype if first is None else first.dtype

    def _apply(self, fn, *args, **kwargs):
        # A cast of the module (.to(dtype), .half(), a parent's .bfloat16()) must not round the pixel
        # statistics: they stay float32 on whatever device they move to.
        out = super()._apply(fn, *args, **kwargs)
        for name in ("pixel_mean", "pixel_std"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, torch.tensor(IMAGENET_MEAN if name == "pixel_mean" else IMAGENET_STD,
                                                 device=buf.device).view(1, 3, 1, 1))
        return out

    # The teacher never trains: a parent's .train() must not switch it out of eval.
    def train(self, mode: bool = True) -> "DinoEncoder":
        super().train(mode)
        self.model.eval()
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return PATCH_SIZE

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch-token grid for the configured image size."""
        side = self.image_size // PATCH_SIZE
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    def compute_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """The dtype `encode` runs in (`dtype`: the weights'), the same on every device.

        The weights already hold it, so `encoder.model.to(encoder.compute_dtype(device))` is a no-op; `device`
        is accepted so such callers keep working.
        """
        return self.dtype

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames `(B, T, C, H, W)` in [0, 1] -> patch tokens `(B, T, N, D)` float32 (N = grid h * w).

        Runs in the weights' dtype (`dtype`); an outer ``torch.autocast`` is switched off for the call."""
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
        if frames.dim() != 5:
            raise ValueError(f"frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
        if frames.shape[2] != 3:
            raise ValueError(f"frames must have 3 (RGB) channels at dim 2, got shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise TypeError(f"frames must be floating point in [0, 1], got dtype {frames.dtype}")
        if frames.numel() == 0:  # as latents_to_features refuses empty latents
            raise ValueError(f"frames is empty: shape {tuple(frames.shape)} (B, T, H and W must be positive)")
        b, t, c, h, w = frames.shape
        n = b * t
        first = next(self.model.parameters(), None)
        if first is not None and first.device != frames.device:
            raise ValueError(
                f"frames are on {frames.device} but the encoder weights are on {first.device}; move one of them"
            )
        # Run in the weights' dtype; casting them here would replace tensors an offload manager has packed.
        compute_dtype = self._dtype if first is None else first.dtype  # what `dtype` reports
        flat = frames.reshape(n, c, h, w)
        out = torch.empty(n, self.num_patches, self.embed_dim, device=frames.device, dtype=torch.float32)
        step = n if self.frames_batch_size is None else self.frames_batch_size
        prefix = self.num_prefix_tokens
        mean = self.pixel_mean.to(frames.device)
        std = self.pixel_std.to(frames.device)
        with autocast_off(frames.device):  # the weights' dtype, whatever an outer autocast asks for
            for start in range(0, n, max(step, 1)):
                x = flat[start:start + step].float()
                if (h, w) != (self.image_size, self.image_size):
                    x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                      align_corners=False)
                x = ((x - mean) / std).to(compute_dtype)
                tokens = self.model.forward_features(x)
                out[start:start + step] = tokens[:, prefix:]
        return out.view(b, t, self.num_patches, self.embed_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encode(frames)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, image_size={self.image_size}, grid={self.grid}, "
                f"frames_batch_size={self.frames_batch_size}, dtype={self.dtype}")
