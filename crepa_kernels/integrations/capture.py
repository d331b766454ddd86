"""Capture one block's hidden states from a diffusers video transformer, as ``(B, T, H*W, D)``.

``capture_hidden_states`` hooks a supported transformer (no edits to the model) and, for each
forward pass run inside it, keeps the output of block ``block_index`` reshaped to
``(B, T, H*W, D)`` with its latent patch grid ``(T, H, W)``, and optionally the detached output of
a ``teacher_block_index`` block, usually deeper (SPEC section 7, backbone mode).

Supported families and how each lays out its tokens (diffusers 0.42):

- ``WanTransformer3DModel`` (``blocks``) and ``SanaVideoTransformer3DModel``
  (``transformer_blocks``): input latents ``(B, C, F, H, W)``; a Conv3d with stride
  ``patch_size = (p_t, p_h, p_w)`` patchifies them, tokens are ordered frame-major, then rows,
  then columns; grid ``(F // p_t, H // p_h, W // p_w)``.
- ``LTXVideoTransformer3DModel`` (``transformer_blocks``): input is already packed,
  ``(B, S, C)``, ordered the same way; the grid is the ``num_frames, height, width`` arguments.
  They are the token grid, not pre-patch sizes: the model's rotary embedding builds one position
  per token from them. Callers that pass ``video_coords`` instead must give ``grid=`` (or, for a
  capture kept attached over calls of several grids, ``set_grid`` before each call).
- ``Kandinsky5Transformer3DModel`` (``visual_transformer_blocks``; the text blocks are not
  counted): input latents are channels-last ``(B, F, H, W, C)``, grid
  ``(F // p_t, H // p_h, W // p_w)``. With ``sparse_params["to_fractal"]`` (nabla attention)
  the blocks see tokens in 8x8 spatial tiles; they are put back in raster order here.

Subclasses of these classes are accepted; ``torch.compile``, DDP, single-device DataParallel, FSDP
and peft's ``PeftModel`` wrappers are unwrapped. DataParallel over several GPUs is refused: it runs
the hooks in one thread per replica, each on a slice of the batch.

``torch.compile`` of the whole model: compiled code contains the block hooks that existed when it
was traced, and torch does not recompile when hooks are added later (regional compilation,
``compile_repeated_blocks``, recompiles a block whose hooks changed and needs none of what follows). So the capture must be attached before the
first compiled call and stay attached for every forward (a forward run without it, such as a
validation pass, is compiled without the hooks and later captures miss the block)::

    cap = capture_hidden_states(transformer, 8).attach()   # once, before the first compiled call
    compiled = torch.compile(transformer)
    for step, batch in enumerate(loader):
        compiled(...)
        states = cap.take()                                 # this forward's block, handed over once
        loss, logs = crepa(states.hidden, features, step=step, hidden_grid=states.grid)
    cap.detach()

``take()`` clears what it hands over, so a step in which the model did not run (the other expert of
a two-expert model ran instead, or ``model.forward(...)`` was called directly, which skips the
hooks) raises instead of handing back the previous forward's tensors, as reading ``hidden`` would.

A capture registered after the model was already compiled and run sees the transformer's forward
but not the block's; reading ``hidden`` then raises an error saying so. Torch shares compiled code
between instances of one class (its guards skip the module hooks), so the same happens when another
instance (an EMA or validation copy, the other expert) is compiled and runs without the capture:
set ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` before the first compiled call (torch
then compiles each instance for its own hooks), or attach a capture to every instance;
``torch.compiler.reset()`` after attaching helps only while the other instance does not run again.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "CapturedStates",
    "HiddenStateCapture",
    "TransformerInfo",
    "capture_hidden_states",
    "supported_transformers",
    "transformer_info",
]

# Kandinsky 5's fractal (nabla-attention) token order groups pixels into square tiles of this side.
_FRACTAL_TILE = 8


@dataclass(frozen=True)
class _Family:
    """How to find the blocks and the latent grid of one transformer family."""

    class_name: str
    blocks_attr: str
    # "conv5d": (B, C, F, H, W); "channels_last": (B, F, H, W, C); "packed": (B, S, C) + kwargs.
    input_layout: str


_FAMILIES = (
    _Family("WanTransformer3DModel", "blocks", "conv5d"),
    _Family("LTXVideoTransformer3DModel", "transformer_blocks", "packed"),
    _Family("SanaVideoTransformer3DModel", "transformer_blocks", "conv5d"),
    _Family("Kandinsky5Transformer3DModel", "visual_transformer_blocks", "channels_last"),
)


def supported_transformers() -> tuple[str, ...]:
    """Class names of the diffusers transformers that capture supports."""
    return tuple(f.class_name for f in _FAMILIES)


class CapturedStates(NamedTuple):
    """One forward's results, as :meth:`HiddenStateCapture.take` hands them over."""

    hidden: torch.Tensor
    grid: tuple[int, int, int]
    teacher: Optional[torch.Tensor]


class TransformerInfo(NamedTuple):
    """Block count, hidden size and ``(p_t, p_h, p_w)`` patch size of a supported transformer."""

    num_blocks: int
    hidden_size: int
    patch_size: tuple[int, int, int]


_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


_REPLICAS = ("DataParallel replicas run the capture's hooks on slices of the batch in parallel threads (the "
             "capture would keep whichever slice finished last); use DistributedDataParallel (one process per "
             "GPU) or a single device")


def _unwrap(transformer: Any, for_hooks: bool = False) -> Any:
    # torch.compile, data-parallel and peft wrappers hold the model; its hooks must go on the original
    # (matched by name, so that neither peft nor the distributed package need be imported here).
    # ``for_hooks``: a DataParallel over several devices on the way is refused (see _REPLICAS).
    while isinstance(transformer, nn.Module):
        names = {cls.__name__ for cls in type(transformer).__mro__}
        devices = getattr(transformer, "device_ids", None) or []
        if for_hooks and "DataParallel" in names and len(devices) > 1:
            raise ValueError(f"transformer is wrapped in DataParallel over {len(devices)} devices: {_REPLICAS}")
        if hasattr(transformer, "_orig_mod"):
            transformer = transformer._orig_mod
        elif names.intersection(_MODULE_WRAPPERS) and isinstance(getattr(transformer, "module", None), nn.Module):
            transformer = transformer.module
        elif "PeftModel" in names and callable(getattr(transformer, "get_base_model", None)):
            transformer = transformer.get_base_model()  # get_peft_model(transformer, config)'s wrapper
        else:
            break
    return transformer


def _family_of(transformer: Any) -> _Family:
    if not isinstance(transformer, nn.Module):
        raise TypeError(
            f"transformer must be a torch.nn.Module (one of {', '.join(supported_transformers())}), "
            f"got {type(transformer).__name__}"
        )
    # Match by class name along the MRO so diffusers need not be imported here.
    for cls in type(transformer).__mro__:
        for family in _FAMILIES:
            if cls.__name__ == family.class_name:
                return family
    raise TypeError(
        f"transformer of type {type(transformer).__name__} is not supported; "
        f"supported: {', '.join(supported_transformers())}"
    )


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    """An integer, or three integers (t, h, w) (Python, numpy or 0-dim tensor ints); anything else
    (floats, strings, bools, None entries) is an error naming ``name`` rather than a silent truncation."""
    def as_int(v: Any) -> Optional[int]:
        if isinstance(v, bool):
            return None
        try:
            return operator.index(v)
        except TypeError:
            return None

    if as_int(value) is not None:
        return (as_int(value),) * 3  # type: ignore[return-value]
    ints = [as_int(v) for v in value] if isinstance(value, (tuple, list)) else []
    if len(ints) != 3 or any(v is None for v in ints):
        raise ValueError(f"{name} must be an int or 3 ints (t, h, w), got {value!r}")
    return tuple(ints)  # type: ignore[return-value]


def _config(transformer: nn.Module) -> Any:
    config = getattr(transformer, "config", None)
    if config is None:
        raise ValueError(f"transformer {type(transformer).__name__} has no diffusers config")
    return config


def _patch_size(transformer: nn.Module, family: _Family) -> tuple[int, int, int]:
    config = _config(transformer)
    if family.input_layout == "packed":
        return (int(config.patch_size_t), int(config.patch_size), int(config.patch_size))
    return _triple(config.patch_size, "config.patch_size")


def _hidden_size(transformer: nn.Module, family: _Family) -> int:
    config = _config(transformer)
    if family.class_name == "Kandinsky5Transformer3DModel":
        return int(config.model_dim)
    return int(config.num_attention_heads) * int(config.attention_head_dim)


def transformer_info(transformer: nn.Module) -> TransformerInfo:
    """Return ``(num_blocks, hidden_size, patch_size)`` of a supported diffusers video transformer.

    ``num_blocks`` counts the blocks ``block_index`` addresses (the visual blocks for Kandinsky 5).
    """
    transformer = _unwrap(transformer)
    family = _family_of(transformer)
    blocks = getattr(transformer, family.blocks_attr)
    return TransformerInfo(len(blocks), _hidden_size(transformer, family), _patch_size(transformer, family))


def _check_index(value: Any, name: str, num_blocks: int, class_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if not 0 <= value < num_blocks:
        raise ValueError(
            f"{name}={value} is out of range: {class_name} has {num_blocks} blocks "
            f"(valid indices 0..{num_blocks - 1})"
        )
    return value


def _block_tensor(output: Any, where: str) -> torch.Tensor:
    # Some diffusers blocks return (hidden, encoder_hidden); the video tokens come first.
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{where} returned {type(output).__name__}, expected a tensor or a tuple starting with one")
    return output


def _check_override(grid: Optional[Sequence[int]]) -> Optional[tuple[int, int, int]]:
    if grid is None:
        return None
    grid = _triple(grid, "grid")
    if min(grid) < 1:
        raise ValueError(f"grid must be positive (T, H, W), got {grid}")
    return grid


def _fractal_to_raster(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Undo Kandinsky 5's tiled token order: ``(B, T*H*W, D)`` tiled -> ``(B, T, H*W, D)`` raster."""
    t, h, w = grid
    b, _, d = tokens.shape
    g = _FRACTAL_TILE
    # Tiled order is (t, tile row, tile col, row in tile, col in tile).
    tiled = tokens.reshape(b, t, h // g, w // g, g, g, d)
    return tiled.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h * w, d)


class HiddenStateCapture:
    """Hooks that keep one block's output (and optionally a teacher block's, detached) per forward.

    Use through :func:`capture_hidden_states`. After a forward pass inside the context:

    - ``hidden``: ``(B, T, H*W, D)``, the student block's real output (a reshape of it), so a
      loss on it back-propagates into that block and everything before it.
    - ``teacher``: same layout, detached; ``None`` when no ``teacher_block_index`` was given.
    - ``grid``: ``(T, H, W)``, the latent patch grid of that forward.
    - ``num_forwards``: forwards completed while attached.

    Repeated forwards inside one context keep the last one only (earlier tensors, and the graph
    they hold, are released). Block calls outside a transformer forward, such as the recompute
    of gradient checkpointing during backward, are ignored. The results stay readable after the
    context exits; ``clear()`` drops them.

    Instead of a ``with`` block per forward, a capture can stay attached across many forwards:
    ``cap = capture_hidden_states(model, i).attach()`` once, ``states = cap.take()`` after each
    forward, ``cap.detach()`` at the end. ``take()`` hands a forward's results over once, so a step
    in which the model did not run raises instead of reusing the previous step's tensors. That is
    the way to use it with ``torch.compile``: attach before compiling or before the first compiled
    call, so the compiled code includes the hooks (see the module docstring).
    """

    def __init__(
        self,
        transformer: nn.Module,
        block_index: int,
        teacher_block_index: Optional[int] = None,
        grid: Optional[Sequence[int]] = None,
    ) -> None:
        transformer = _unwrap(transformer, for_hooks=True)
        self._family = _family_of(transformer)
        self._transformer = transformer
        blocks = getattr(transformer, self._family.blocks_attr)
        name = type(transformer).__name__
        self.block_index = _check_index(block_index, "block_index", len(blocks), name)
        if teacher_block_index is not None:
            teacher_block_index = _check_index(teacher_block_index, "teacher_block_index", len(blocks), name)
            if teacher_block_index < block_index:
                raise ValueError(
                    f"teacher_block_index={teacher_block_index} must not be shallower than block_index={block_index}"
                )
        self.teacher_block_index = teacher_block_index
        self._grid_override = _check_override(grid)
        self._patch = _patch_size(transformer, self._family)
        # Resolved once so each forward only binds arguments (no host work beyond shape reads).
        self._signature = inspect.signature(transformer.forward)
        self._handles: list[Any] = []
        self._active = False
        self._grad_at_entry = False
        self._pending_grid: Optional[tuple[int, int, int]] = None
        self._fractal = False
        self._hidden: Optional[torch.Tensor] = None
        self._teacher: Optional[torch.Tensor] = None
        self._grid: Optional[tuple[int, int, int]] = None
        self._grad_lost = False
        self._last_failed = False
        self._taken = False
        self.num_forwards = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self) -> "HiddenStateCapture":
        """Register the hooks (idempotent). ``__enter__`` calls this."""
        if self._handles:
            return self
        blocks = getattr(self._transformer, self._family.blocks_attr)
        try:
            self._handles.append(
                self._transformer.register_forward_pre_hook(self._on_transformer_start, with_kwargs=True)
            )
            # always_call: a forward that raises must not leave the capture armed.
            self._handles.append(
                self._transformer.register_forward_hook(self._on_transformer_end, always_call=True)
            )
            self._handles.append(blocks[self.block_index].register_forward_hook(self._on_student_block))
            if self.teacher_block_index is not None:
                self._handles.append(blocks[self.teacher_block_index].register_forward_hook(self._on_teacher_block))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook; captured tensors stay readable."""
        while self._handles:
            self._handles.pop().remove()
        self._active = False
        if self._grid is None:
            # No forward finished (e.g. a KeyboardInterrupt, which skips torch's always_call hooks):
            # nothing is readable, so free the partial forward's tensors and the graph they hold.
            self._hidden = self._teacher = None

    def set_grid(self, grid: Optional[Sequence[int]]) -> None:
        """The latent patch grid ``(T, H, W)`` of the forwards that follow (as ``grid=`` at creation; None
        derives it from the inputs again). For a capture kept attached over calls whose grid changes
        while the model cannot tell it, e.g. LTX-Video called with ``video_coords`` on batches of
        several aspect ratios: two grids with the same token count would otherwise be taken for
        each other without an error."""
        self._grid_override = _check_override(grid)

    def clear(self) -> None:
        """Drop the captured tensors (and the autograd graph they keep alive)."""
        self._hidden = self._teacher = None
        self._grid = None
        self._grad_lost = False
        self._last_failed = False
        self._taken = False

    def take(self) -> CapturedStates:
        """The last forward's ``(hidden, grid, teacher)``, handed over once: they are cleared, so that
        a second ``take()`` (or a read of ``hidden``) with no forward of the model in between raises
        instead of returning the same tensors again, e.g. in a step where another model ran (the
        other expert of a two-expert model) or where ``model.forward(...)`` was called directly,
        which runs no hooks. The way to read a capture that stays attached across steps. A forward
        not taken (a validation pass) is the one the next ``take()`` hands over."""
        states = CapturedStates(self.hidden, self.grid, self.teacher)
        self.clear()
        self._taken = True
        return states

    def __enter__(self) -> "HiddenStateCapture":
        if self._handles:
            # its exit would remove hooks the outer owner still relies on, and later forwards would
            # silently leave the previous one's tensors in place
            raise RuntimeError("this capture is already attached (by attach() or an enclosing `with`); "
                               "use it as it is, or enter it once")
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- results -----------------------------------------------------------------------------
    def _require_forward(self) -> None:
        if self._grid is None:
            name = type(self._transformer).__name__
            if self._taken:
                raise RuntimeError(f"no {name} forward ran through the capture since the last take() (did another "
                                   "model run this step, or was model.forward(...) called directly? It skips the "
                                   "hooks: call the model itself)")
            if self._last_failed:
                raise RuntimeError(f"no hidden states captured: the last {name} forward raised before it finished")
            raise RuntimeError(f"no hidden states captured: run {name} forward inside the capture first")

    @property
    def hidden(self) -> torch.Tensor:
        """Block ``block_index`` output of the last forward, ``(B, T, H*W, D)``, gradients intact."""
        self._require_forward()
        if self._grad_lost:
            raise RuntimeError(
                f"block {self.block_index} ran with autograd disabled inside a grad-enabled forward "
                "(reentrant gradient checkpointing?); its output carries no gradient. Use "
                "torch.utils.checkpoint with use_reentrant=False (diffusers' default)."
            )
        if self._hidden is None:
            raise self._block_missed(self.block_index)
        return self._hidden

    @property
    def teacher(self) -> Optional[torch.Tensor]:
        """Detached block ``teacher_block_index`` output of the last forward, or ``None`` if not requested."""
        if self.teacher_block_index is None:
            return None
        self._require_forward()
        if self._teacher is None:
            raise self._block_missed(self.teacher_block_index)
        return self._teacher

    def _block_missed(self, index: Optional[int]) -> RuntimeError:
        # The transformer's hooks fired and the block's did not: typically compiled code traced before the
        # block hook existed (torch does not recompile for hooks added later), rarely a block skipped by a cache.
        name = type(self._transformer).__name__
        teacher = "" if self.teacher_block_index is None else f", teacher_block_index={self.teacher_block_index}"
        return RuntimeError(
            f"block {index}'s hook did not fire during the last {name} forward, although the forward ran through "
            "the capture: the model appears to be compiled (torch.compile) without the capture hooks, i.e. it was "
            "traced before they were attached, or it reuses code torch compiled for another instance of "
            f"{name} (an EMA or validation copy) compiled earlier. Create the capture once and attach it before "
            f"the first compiled call: cap = capture_hidden_states(model, {self.block_index}{teacher}).attach(), "
            "keep it attached and call cap.take() after each forward. Where another instance of the class runs "
            "compiled without a capture, set torch._dynamo.config.skip_nnmodule_hook_guards = False before the "
            "first compiled call (torch then compiles each instance for its own hooks) or attach a capture to "
            "every instance; torch.compiler.reset() after attaching helps only while the other instance does "
            "not run again. If the model is not compiled, something skipped the block (a block cache?)."
        )

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent patch grid ``(T, H, W)`` of the last forward."""
        self._require_forward()
        return self._grid  # type: ignore[return-value]

    # -- hooks -------------------------------------------------------------------------------
    def _on_transformer_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not self._transformer:
            # a copy sharing the model's hooks dicts: a DataParallel replica, however the capture was made
            raise RuntimeError(f"a copy of the captured {type(module).__name__} ran with its hooks: {_REPLICAS}")
        # The previous forward's results go first: if resolving this one's grid raises, nothing of
        # the previous forward may be read as this one's.
        self._hidden = self._teacher = None
        self._grid = None
        self._taken = False
        self._last_failed = True  # until the forward finishes
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        self._pending_grid, self._fractal = self._resolve_grid(bound)
        self._grad_lost = False
        self._grad_at_entry = torch.is_grad_enabled()
        self._active = True

    def _on_transformer_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        was_active, self._active = self._active, False
        # torch passes output=None when the forward raised (always_call): nothing to publish then.
        if was_active and output is not None:
            self._grid = self._pending_grid
            self._last_failed = False
            self.num_forwards += 1
        elif output is None:
            # the forward raised, possibly before this capture's start hook ran (in another hook):
            # nothing of an earlier forward may be read as this one's
            self._hidden = self._teacher = None
            self._grid = None
            self._last_failed = True

    def _on_student_block(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active:
            return
        if self._grad_at_entry and not torch.is_grad_enabled():
            self._grad_lost = True
        self._hidden = self._to_frames(_block_tensor(output, f"block {self.block_index}"))

    def _on_teacher_block(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active:
            return
        self._teacher = self._to_frames(_block_tensor(output, f"block {self.teacher_block_index}").detach())

    # -- layout --------------------------------------------------------------------------------
    def _resolve_grid(self, bound: dict) -> tuple[tuple[int, int, int], bool]:
        family = self._family
        name = family.class_name
        fractal = False
        if family.class_name == "Kandinsky5Transformer3DModel":
            sparse = bound.get("sparse_params")
            fractal = bool(sparse.get("to_fractal", False)) if isinstance(sparse, dict) else False
        if self._grid_override is not None:
            return self._grid_override, fractal
        latents = bound.get("hidden_states")
        if family.input_layout == "packed":
            dims = tuple(bound.get(k) for k in ("num_frames", "height", "width"))
            if any(d is None for d in dims):
                raise ValueError(
                    f"{name} was called without num_frames/height/width (e.g. with video_coords); "
                    "pass grid=(T, H, W) to capture_hidden_states"
                )
            return tuple(int(d) for d in dims), fractal  # type: ignore[return-value]
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            expected = "(B, C, F, H, W)" if family.input_layout == "conv5d" else "(B, F, H, W, C)"
            raise ValueError(f"{name} hidden_states must be a 5-D tensor {expected}, got {shape}")
        if family.input_layout == "conv5d":
            f, h, w = latents.shape[2:5]
        else:
            f, h, w = latents.shape[1:4]
        p_t, p_h, p_w = self._patch
        return (f // p_t, h // p_h, w // p_w), fractal

    def _to_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = self._pending_grid
        assert grid is not None  # set by the transformer pre-hook, which always runs first
        t, h, w = grid
        if tokens.ndim != 3 or tokens.shape[1] != t * h * w:
            raise ValueError(
                f"block output of shape {tuple(tokens.shape)} does not match the latent patch grid "
                f"(T, H, W)={grid}: expected (B, {t * h * w}, D)"
            )
        if self._fractal:
            if h % _FRACTAL_TILE or w % _FRACTAL_TILE:
                raise ValueError(f"fractal token order needs H and W divisible by {_FRACTAL_TILE}, got grid {grid}")
            return _fractal_to_raster(tokens, grid)
        return tokens.reshape(tokens.shape[0], t, h * w, tokens.shape[2])


def capture_hidden_states(
    transformer: nn.Module,
    block_index: int,
    teacher_block_index: Optional[int] = None,
    *,
    grid: Optional[Sequence[int]] = None,
) -> HiddenStateCapture:
    """Context manager that captures block hidden states of a diffusers video transformer.

    ``with capture_hidden_states(transformer, 8) as cap: transformer(...)``, then ``cap.hidden``
    ``(B, T, H*W, D)``, ``cap.grid`` ``(T, H, W)`` and ``cap.teacher`` (detached, or ``None``).
    Forward hooks only: the model is not modified and the hooks are removed on exit, also when
    the body raises. ``grid`` overrides the latent patch grid derived from the inputs (needed for
    LTX-Video called with ``video_coords`` only). Indices count from 0 and must be below the
    model's block count; ``teacher_block_index`` must not be shallower than ``block_index`` (the
    same block gives its own output, detached).

    To keep the capture across forwards (the way to use it with ``torch.compile``), skip the
    ``with``: ``cap = capture_hidden_states(transformer, 8).attach()`` before the first (compiled)
    forward, then ``states = cap.take()`` after each one (``states.hidden``, ``states.grid``,
    ``states.teacher``) and ``cap.detach()`` at the end.
    """
    return HiddenStateCapture(transformer, block_index, teacher_block_index, grid=grid)
