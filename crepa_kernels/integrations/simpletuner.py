"""CrepaRegularizer: a drop-in for the common trainer's CREPA object, on our loss, teacher and offload.

Swap the import and keep the calls: ``attach_to_model(model)``, ``wants_hidden_states()``,
``compute_loss(hidden_states, latents, vae)``. The logged keys and values match the trainer's
reference path to float32 rounding for the same inputs and projector weights. Deliberate
differences from that path, documented in the README: the encoder contributes DINOv2 *patch* tokens
(the paper's choice, and the newer trainer's), only the frames that temporal alignment keeps are
encoded, and a bf16 / fp16 teacher is normalised in fp32. The trainer's iREPA and self-flow teacher
are not implemented and are refused when switched on.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..config import CrepaConfig, _as_bool, config_key_name
from ..module import CrepaLoss, _world_size
from ..schedule import check_step


def _device_of(accelerator: Any, check_available: bool = True) -> torch.device:
    if accelerator is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = accelerator if isinstance(accelerator, (str, torch.device)) else getattr(accelerator, "device", None)
    if device is None:
        raise TypeError(f"accelerator must have a .device (an accelerate.Accelerator) or be a device, got {accelerator!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"accelerator must be an accelerate.Accelerator or name a device such as 'cuda', 'cuda:1' "
                         f"or 'cpu', got {accelerator!r}") from err
    # here, not as the driver's error at attach_to_model's first copy
    if check_available and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} puts CREPA on {device}, but CUDA is not available")
    return device


def _decodes_itself(model_foundation: Any) -> bool:
    """Whether ``model_foundation`` is the trainer's model object, which decodes latents itself."""
    return not isinstance(model_foundation, (str, type(None))) and callable(
        getattr(model_foundation, "decode_latents_to_pixels", None))


class CrepaRegularizer:
    """Drop-in CREPA regulariser for trainers written against the reference ``CrepaRegularizer``.

    Args:
        config: any object with ``crepa_*`` attributes (the trainer's argparse namespace / config).
        accelerator: an ``accelerate.Accelerator`` (its ``.device`` is used) or a device.
        hidden_size: the DiT's hidden size at ``crepa_block_index``.
        model_foundation: the model family name (``wan``, ``ltxvideo``, ``sanavideo``, ``kandinsky5_video``),
            used only to check the VAE family; None accepts any supported VAE. The trainer's own model
            object is accepted too: when ``compute_loss`` gets no VAE, or ``crepa_use_tae`` is set and the
            model has a Tiny AutoEncoder, its ``decode_latents_to_pixels`` decodes (as the trainer does), and
            the kept frames are encoded here. Image models (its
            ``crepa_mode`` IMAGE) are refused: the loss reads 3-D hidden states as frames.
        max_train_steps: for schedules whose ``crepa_decay_steps`` is 0 (None reads as 0, as in the reference).
        encoder: a ``DinoEncoder`` or a timm DINOv2 ViT to use instead of loading ``crepa_encoder``.
    """

    def __init__(self, config: Any, accelerator: Any, hidden_size: int, *, model_foundation: Any = None,
                 max_train_steps: Optional[int] = 0, encoder: Optional[nn.Module] = None):
        self.config = config if isinstance(config, CrepaConfig) else CrepaConfig.from_namespace(config)
        if isinstance(config, Mapping):
            irepa = next((v for k, v in config.items() if isinstance(k, str) and config_key_name(k) == "irepa_enabled"),
                         False)
        else:
            irepa = getattr(config, "irepa_enabled", False)
        if self.config.enabled and _as_bool("irepa_enabled", irepa or False):
            raise ValueError("irepa_enabled=true: iREPA (a convolutional projector, spatially normalised teacher "
                             "features) is not supported by crepa_kernels; turn it off to use this regularizer")
        if self.config.enabled and model_foundation is not None and not isinstance(model_foundation, str):
            mode = getattr(model_foundation, "crepa_mode", None)
            if str(getattr(mode, "name", mode)).upper() == "IMAGE":
                raise ValueError("model_foundation is an image model (crepa_mode IMAGE): crepa_kernels aligns "
                                 "video frames; 3-D hidden states are read as (B, T, D)")
        # crepa_use_tae decodes through the trainer's model object, which holds the Tiny AutoEncoder; like
        # the trainer, fall back to the full VAE (with a warning) where there is none.
        self._use_tae = self.config.enabled and self.config.use_tae and not self.config.use_backbone_features
        if self._use_tae and not _decodes_itself(model_foundation):
            warnings.warn("crepa_use_tae=true: decoding with a Tiny AutoEncoder needs the trainer's model object as "
                          "model_foundation; the teacher decodes with the full VAE passed to compute_loss", stacklevel=2)
            self._use_tae = False
        elif self._use_tae:
            supports = getattr(model_foundation, "supports_validation_preview", None)
            if callable(supports) and not supports():
                warnings.warn("crepa_use_tae=true but the model has no Tiny AutoEncoder: falling back to full VAE "
                              "decoding", stacklevel=2)
                self._use_tae = False
        self.device = _device_of(accelerator, check_available=self.config.enabled)  # off: nothing runs there
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.model_foundation = model_foundation
        # The reference accepts None (its schedules read the horizon only when decaying without
        # crepa_decay_steps, which warns): read as 0, and anything else checked now, not at attach time.
        if max_train_steps is None:
            max_train_steps = 0
        if isinstance(max_train_steps, bool) or not isinstance(max_train_steps, int) or max_train_steps < 0:
            raise ValueError(f"max_train_steps must be a non-negative int or None, got {max_train_steps!r}")
        self.max_train_steps = max_train_steps
        self.enabled = self.config.enabled
        self.block_index = self.config.block_index
        # With CREPA off nothing encodes: the encoder is kept as given, unchecked against the config.
        self.encoder = self._wrap_encoder(encoder) if encoder is not None and self.enabled else encoder
        self.loss: Optional[CrepaLoss] = None
        self._offload = None
        self._adapters: dict[int, Any] = {}
        self._training = True

    # ------------------------------------------------------------------ trainer API
    @property
    def projector(self) -> Optional[nn.Module]:
        return None if self.loss is None else self.loss.projector

    # Attributes the reference sets and trainers' model code reads (e.g. getattr(regularizer,
    # "use_backbone_features", False) to decide which hidden states to return).
    @property
    def use_backbone_features(self) -> bool:
        return self.config.use_backbone_features

    @property
    def teacher_block_index(self) -> Optional[int]:
        return self.config.teacher_block_index

    @property
    def use_tae(self) -> bool:
        """crepa_use_tae, or False after the fall back to the full VAE (as the reference sets it)."""
        if self.config.enabled and not self.config.use_backbone_features:
            return self._use_tae
        return self.config.use_tae

    @property
    def scheduler(self):
        """The coefficient schedule (None until attach_to_model creates the loss module)."""
        return None if self.loss is None else self.loss.scheduler

    @property
    def encoder_dim(self) -> Optional[int]:
        if self.config.use_backbone_features:
            return self.hidden_size
        return None if self.encoder is None else self.encoder.embed_dim

    def state_dict(self) -> dict:
        """The projector's weights and the schedule's state (EMA, cutoff latch), for checkpoints."""
        return {} if self.loss is None else self.loss.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """As ``CrepaLoss.load_state_dict``: all or nothing; ``strict=False`` loads a checkpoint of the
        projector's weights alone and keeps the schedule as it is."""
        if self.loss is None:
            raise RuntimeError("call attach_to_model(model) before load_state_dict: the projector does not exist yet")
        self.loss.load_state_dict(state, strict=strict)

    def wants_hidden_states(self) -> bool:
        return self.enabled

    @property
    def training(self) -> bool:
        return self._training

    def train(self, mode: bool = True) -> "CrepaRegularizer":
        """Training mode (the default), as ``nn.Module.train``: each call feeds the schedule, and under
        torch.distributed with a similarity threshold (or crepa_check_finite) it is a collective."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        self._training = mode
        if self.loss is not None:
            self.loss.train(mode)
        return self

    def eval(self) -> "CrepaRegularizer":
        """For validation calls: ``compute_loss`` then changes nothing (no EMA update, no cutoff latched,
        no collective), so one rank alone may call it. The trainer's ``model.eval()`` does not reach
        this object (only the projector is registered on the model): call ``train()`` after."""
        return self.train(False)

    def attach_to_model(self, model: nn.Module) -> None:
        """Create the projector (once) and register it on ``model`` as ``crepa_projector``."""
        if not self.enabled:
            return
        if self.config.block_index is None:
            raise ValueError("crepa_block_index must be set when CREPA is enabled")
        if not self.config.use_backbone_features and self.encoder is None:
            self.encoder = self._load_encoder()
        if self.loss is None:
            self.loss = CrepaLoss(self.config, self.hidden_size, self.encoder_dim, self.max_train_steps,
                                  log_tensors=False).train(self._training)
        self.loss.to(self.device)
        setattr(model, "crepa_projector", self.loss.projector)

    def compute_loss(self, hidden_states: Optional[torch.Tensor], latents: Optional[torch.Tensor],
                     vae: Optional[nn.Module] = None, *, frame_features: Optional[torch.Tensor] = None,
                     step: int = 0, hidden_grid: Optional[Sequence[int]] = None,
                     feature_grid: Optional[Sequence[int]] = None, timestep: Any = None):
        """``(loss or None, logs)`` for one step.

        Encoder mode: decodes ``latents`` with ``vae`` and encodes the kept frames; with ``latents``
        None, ``frame_features`` (e.g. from a FeatureCache) are the teacher instead. Given both, the
        latents are decoded and ``frame_features`` ignored (with a warning), as the reference does in
        encoder mode. Backbone mode: ``frame_features``
        are the detached hidden states of ``crepa_teacher_block_index``. Without ``hidden_grid`` the
        token alignment is the reference's (compatible mode); with it, grid mode.
        """
        if not self.enabled:
            return None, None
        if hidden_states is None:
            raise ValueError("CREPA is enabled but no intermediate hidden_states were provided")
        if self.loss is None:
            raise RuntimeError("call attach_to_model(model) before compute_loss: the projector does not exist yet")
        # Given latents that can be decoded, encoder mode decodes them, as the reference does, whatever
        # frame_features holds (said below, once the call is known to compute something).
        ignored_features = (frame_features is not None and latents is not None
                            and not self.config.use_backbone_features
                            and (vae is not None or _decodes_itself(self.model_foundation)))
        if ignored_features:
            frame_features = None
        if frame_features is None:
            if self.config.use_backbone_features:
                raise ValueError("backbone mode needs frame_features: the detached hidden states of "
                                 f"block {self.config.teacher_block} (crepa_teacher_block_index)")
            if latents is None:
                raise ValueError("CREPA needs latents to decode (or frame_features) in encoder mode")
            if vae is None and not _decodes_itself(self.model_foundation):
                raise ValueError("CREPA needs a VAE to decode latents to pixels (or frame_features)")
        if self.config.lambda_ == 0:
            # As the trainer: a zero weight computes, logs and tracks nothing. Under torch.distributed the
            # projector registered on the wrapped model still needs its (zero) gradient on every rank.
            # (In eval mode None, as for any zero weight: nothing will back-propagate it.)
            return (self.loss._zero_loss() if self.training and _world_size() > 1 else None), None
        step = check_step(step)  # once: a step given as a GPU tensor costs its one read here
        if ignored_features:
            warnings.warn("compute_loss got latents and frame_features in encoder mode: the latents are decoded "
                          "and encoded, as the reference does, and frame_features is ignored; pass latents=None "
                          "to use precomputed features", UserWarning, stacklevel=2)
        if frame_features is None:
            # the decode and encode are costly: a call the loss would refuse fails before them (with given
            # features, the loss's own checks come first anyway)
            self.loss.check_hidden(hidden_states, step=step, hidden_grid=hidden_grid,
                                   grid_mode=feature_grid is not None)
            if torch.is_tensor(latents) and latents.ndim >= 1 and latents.shape[0] != hidden_states.shape[0]:
                raise ValueError(f"latents holds {latents.shape[0]} videos but hidden_states {hidden_states.shape[0]}: "
                                 "they must be the same batch")
            # Without a VAE, or for its Tiny AutoEncoder, the trainer's model object decodes.
            frame_features, grid = self.teacher_features(latents, None if self._use_tae else vae,
                                                         num_frames=hidden_states.shape[1], timestep=timestep)
            if hidden_grid is not None and feature_grid is None:
                feature_grid = grid
        elif self.config.use_backbone_features and torch.is_tensor(frame_features) and frame_features.ndim == 3:
            frame_features = frame_features.unsqueeze(1)  # the trainer's reading: a (B, N, D) block output is one frame
        return self.loss(hidden_states, frame_features, step=step, hidden_grid=hidden_grid,
                         feature_grid=feature_grid)

    # ------------------------------------------------------------------ teacher
    def teacher_features(self, latents: torch.Tensor, vae: Optional[nn.Module], *, num_frames: int,
                         timestep: Any = None):
        """Decode, keep the aligned frames, encode; the VAE and encoder visit the device only while used.
        ``vae`` None: the trainer's model object (``model_foundation``) decodes."""
        from ..teacher import adapter_for, channels_last_3d, latents_to_features
        from ..teacher.pipeline import _decode_and_encode

        from ..teacher.offload import _weight_hook

        manager = self.offload
        encoder = self.encoder
        # A VAE whose own hooks place or cast its weights (the trainer's offloading or layerwise casting)
        # is left to them: the manager cannot pack such a module.
        managed_vae = vae if isinstance(vae, nn.Module) and _weight_hook(vae) is None else None

        # Leaving manager.use() applies the offload mode, so the VAE's device copy is gone (unless the
        # mode keeps it) before the encoder runs, and the encoder's after it.
        @contextlib.contextmanager
        def vae_context():
            if managed_vae is not None:
                manager.prefetch(managed_vae)
            with manager.use(managed_vae) if managed_vae is not None else contextlib.nullcontext():
                manager.prefetch(encoder)  # the encoder's copy overlaps the decode
                yield

        def encoder_context():
            return manager.use(encoder)

        adapter = None
        if vae is None:
            if not torch.is_tensor(latents):
                raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        else:
            adapter = self._adapters.get(id(vae))
            known = adapter is not None and adapter.vae is vae
            if not known:
                adapter = adapter_for(vae, family=self._family())
            # Checked before the one-time changes to the VAE below and before anything moves to the device.
            adapter._check_latents(latents)
            timestep = adapter._check_timestep(timestep, latents.shape[0])  # a tensor's one host read
            if not known:
                if self.config.drop_vae_encoder:
                    adapter.drop_encoder()
                if self.config.vae_channels_last:
                    channels_last_3d(vae)
                self._adapters = {id(vae): adapter}
            latents = latents.to(self.device)
        try:
            if adapter is None:
                return _decode_and_encode(lambda: self._foundation_decode(latents), encoder, num_frames=num_frames,
                                          vae_context=vae_context, encoder_context=encoder_context)
            return latents_to_features(latents, adapter, encoder, num_frames=num_frames, timestep=timestep,
                                       vae_context=vae_context, encoder_context=encoder_context)
        except BaseException:
            # Whatever failed (the decode, leaving the VAE's use, the frame pick, the encode), the encoder's
            # prefetched copy goes back per the mode: a failed step leaves nothing extra on the device.
            with contextlib.suppress(Exception):
                manager.release(encoder)
            raise

    def _foundation_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, C, H, W) in [0, 1] from the trainer's model object (``decode_latents_to_pixels``)."""
        frames = self.model_foundation.decode_latents_to_pixels(latents, use_tae=self._use_tae)
        if not torch.is_tensor(frames) or frames.ndim != 5:
            raise ValueError("model_foundation.decode_latents_to_pixels must return frames (B, T, C, H, W); got "
                             f"{tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__}")
        return frames.to(self.device)

    @property
    def offload(self):
        if self._offload is None:
            from ..teacher.offload import OffloadManager

            self._offload = OffloadManager(mode=self.config.offload, device=self.device)
        return self._offload

    def _family(self) -> Optional[str]:
        return self.model_foundation if isinstance(self.model_foundation, str) else None

    def _encoder_dtype(self) -> torch.dtype:
        """crepa_encoder_dtype, with 'auto' meaning bf16 on a CUDA device and fp32 elsewhere."""
        from ..teacher.encoders import _resolve_dtype

        return _resolve_dtype(self.config.encoder_dtype, self.device)

    def _wrap_encoder(self, encoder: nn.Module):
        from ..teacher import DinoEncoder
        from ..teacher.encoders import _dynamic_img_size

        c, default = self.config, CrepaConfig()
        if isinstance(encoder, DinoEncoder):
            # Built by the caller, its settings included: a config key set to something else is ignored,
            # and says so (a key left at its default is not worth a word).
            ignored = [f"crepa_{key}={mine!r} (it runs with {theirs!r})" for key, mine, default_value, theirs in (
                ("encoder_image_size", c.encoder_image_size, default.encoder_image_size, encoder.image_size),
                ("encoder_dtype", c.encoder_dtype, default.encoder_dtype, str(encoder.dtype).removeprefix("torch.")),
                ("encoder_frames_batch_size", c.encoder_frames_batch_size, default.encoder_frames_batch_size,
                 encoder.frames_batch_size)) if mine != default_value and mine != theirs]
            if ignored:
                warnings.warn("the DinoEncoder passed as encoder= keeps its own settings; ignored: "
                              + ", ".join(ignored), UserWarning, stacklevel=3)
            return encoder
        native = tuple(getattr(getattr(encoder, "patch_embed", None), "img_size", ()) or ())
        if (len(native) == 2 and native != (c.encoder_image_size,) * 2
                and not _dynamic_img_size(encoder)):
            raise ValueError(f"the encoder passed takes {native[0]}x{native[1]} images but crepa_encoder_image_size is "
                             f"{c.encoder_image_size}: set crepa_encoder_image_size={native[0]}, or build the model "
                             f"with img_size={c.encoder_image_size} (or dynamic_img_size=True)")
        # The weights get their compute dtype here, once, before the offload manager packs them.
        return DinoEncoder(model=encoder, image_size=c.encoder_image_size, dtype=self._encoder_dtype(),
                           frames_batch_size=c.encoder_frames_batch_size)

    def _load_encoder(self):
        from ..teacher import DinoEncoder

        return DinoEncoder(self.config.encoder, self.config.encoder_image_size, weights=self.config.encoder_weights,
                           dtype=self._encoder_dtype(), frames_batch_size=self.config.encoder_frames_batch_size)
