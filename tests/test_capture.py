"""Tests for block hidden-state capture from tiny, randomly initialised diffusers video transformers."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

diffusers = pytest.importorskip("diffusers")

from crepa_kernels.integrations import (  # noqa: E402
    capture_hidden_states,
    supported_transformers,
    transformer_info,
)

NUM_BLOCKS = 3
HIDDEN = 24  # 2 heads x 12
B = 2


@dataclass
class Case:
    """A tiny model plus how to call it on latents of (frames, height, width) and its patch size."""

    name: str
    build: Callable[[], nn.Module]
    run: Callable[..., object]  # run(model, frames, height, width) -> model output
    blocks_attr: str
    patch: tuple[int, int, int]
    hidden: int


def _build_wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=NUM_BLOCKS, rope_max_seq_len=32,
    )


def _run_wan(model, f, h, w):
    x = torch.randn(B, 4, f, h, w)
    return model(x, torch.tensor([10, 500]), torch.randn(B, 5, 16))


def _build_ltx():
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=NUM_BLOCKS, caption_channels=16,
    )


def _pack(latents):
    # (B, C, F, H, W) -> (B, F*H*W, C), frame-major then rows then columns (patch size 1).
    b, c = latents.shape[:2]
    return latents.permute(0, 2, 3, 4, 1).reshape(b, -1, c)


def _run_ltx(model, f, h, w, **kwargs):
    tokens = _pack(torch.randn(B, 4, f, h, w))
    grid_kwargs = {"num_frames": f, "height": h, "width": w}
    grid_kwargs.update(kwargs)
    return model(tokens, torch.randn(B, 5, 16), torch.tensor([10, 500]), torch.ones(B, 5), **grid_kwargs)


def _build_sana():
    return diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=NUM_BLOCKS,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        sample_size=8,
    )


def _run_sana(model, f, h, w):
    return model(torch.randn(B, 4, f, h, w), torch.randn(B, 5, 16), torch.tensor([10, 500]))


def _build_kandinsky():
    return diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=NUM_BLOCKS, axes_dims=(4, 6, 6),
    )


def _run_kandinsky(model, f, h, w, sparse_params=None):
    x = torch.randn(B, f, h, w, 4)  # channels-last latents
    rope_pos = [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)]
    return model(
        x, torch.randn(B, 5, 16), torch.tensor([10.0, 500.0]), torch.randn(B, 8),
        visual_rope_pos=rope_pos, text_rope_pos=torch.arange(5), sparse_params=sparse_params,
    )


CASES = [
    Case("wan", _build_wan, _run_wan, "blocks", (1, 2, 2), HIDDEN),
    Case("ltx", _build_ltx, _run_ltx, "transformer_blocks", (1, 1, 1), HIDDEN),
    Case("sana", _build_sana, _run_sana, "transformer_blocks", (1, 2, 2), HIDDEN),
    Case("kandinsky5", _build_kandinsky, _run_kandinsky, "visual_transformer_blocks", (1, 2, 2), 32),
]
IDS = [c.name for c in CASES]

# Latent sizes per case chosen so the token grid is (3, 2, 3): non-square, T != H.
LATENT = {"wan": (3, 4, 6), "ltx": (3, 2, 3), "sana": (3, 4, 6), "kandinsky5": (3, 4, 6)}
GRID = (3, 2, 3)


def _model(case):
    torch.manual_seed(0)
    return case.build().eval()


def _hook_counts(model, blocks):
    mods = [model, *blocks]
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods]


def _reference_output(block):
    """Register an independent hook on ``block`` that records its raw output."""
    store = {}

    def hook(module, args, output):
        store["out"] = output

    return store, block.register_forward_hook(hook)


class _Identity(nn.Module):
    """Stands in for a transformer block: returns the video tokens it receives, unchanged."""

    def forward(self, *args, **kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_grid_and_equals_block_output(case):
    model = _model(case)
    blocks = getattr(model, case.blocks_attr)
    store, handle = _reference_output(blocks[1])
    try:
        with capture_hidden_states(model, 1) as cap:
            case.run(model, *LATENT[case.name])
    finally:
        handle.remove()
    t, h, w = GRID
    assert cap.grid == GRID
    assert cap.hidden.shape == (B, t, h * w, case.hidden)
    assert cap.teacher is None
    assert cap.num_forwards == 1
    ref = store["out"]
    assert ref.shape == (B, t * h * w, case.hidden)
    torch.testing.assert_close(cap.hidden, ref.reshape(B, t, h * w, case.hidden), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_token_layout_is_frame_row_column(case):
    """With block 0 replaced by an identity, the capture must equal the patch embedding laid out
    as (B, T, H, W, D) by hand, so frame t / row y / column x land where they belong."""
    model = _model(case)
    getattr(model, case.blocks_attr)[0] = _Identity()
    f, h, w = LATENT[case.name]
    torch.manual_seed(1)
    latents = torch.randn(B, 4, f, h, w)  # (B, C, F, H, W)
    with torch.no_grad(), capture_hidden_states(model, 0) as cap:
        if case.name in ("wan", "sana"):
            model_in = latents
            expected = model.patch_embedding(latents).permute(0, 2, 3, 4, 1)
        elif case.name == "ltx":
            model_in = _pack(latents)
            expected = model.proj_in(latents.permute(0, 2, 3, 4, 1))
        else:
            model_in = latents.permute(0, 2, 3, 4, 1)
            expected = model.visual_embeddings(model_in)
        # Re-run through the family's call convention with the fixed latents.
        _call_with(case, model, model_in, f, h, w)
    t, gh, gw = GRID
    assert expected.shape[1:4] == (t, gh, gw)
    torch.testing.assert_close(cap.hidden, expected.reshape(B, t, gh * gw, -1))


def _call_with(case, model, model_in, f, h, w, **kwargs):
    if case.name == "wan":
        return model(model_in, torch.tensor([10, 500]), torch.randn(B, 5, 16))
    if case.name == "sana":
        return model(model_in, torch.randn(B, 5, 16), torch.tensor([10, 500]))
    if case.name == "ltx":
        return model(model_in, torch.randn(B, 5, 16), torch.tensor([10, 500]), torch.ones(B, 5),
                     num_frames=f, height=h, width=w)
    rope_pos = [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)]
    return model(model_in, torch.randn(B, 5, 16), torch.tensor([10.0, 500.0]), torch.randn(B, 8),
                 visual_rope_pos=rope_pos, text_rope_pos=torch.arange(5), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_reach_block_and_not_later_blocks(case):
    model = _model(case)
    blocks = getattr(model, case.blocks_attr)
    with capture_hidden_states(model, 1) as cap:
        case.run(model, *LATENT[case.name])
    assert cap.hidden.requires_grad
    cap.hidden.float().square().mean().backward()

    def grad_mass(block):
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        return len(grads), sum(float(g.abs().sum()) for g in grads)

    n1, mass1 = grad_mass(blocks[1])
    assert n1 > 0 and mass1 > 0
    n0, mass0 = grad_mass(blocks[0])
    assert n0 > 0 and mass0 > 0  # the capture is not detached from earlier blocks either
    assert all(p.grad is None for p in blocks[2].parameters())


def test_the_student_block_can_be_its_own_teacher():
    # The common trainer's fallback when no teacher block is set: the same block's output, detached.
    case = CASES[0]
    model = _model(case)
    with capture_hidden_states(model, 1, teacher_block_index=1) as cap:
        case.run(model, *LATENT[case.name])
    assert cap.hidden.requires_grad and not cap.teacher.requires_grad
    torch.testing.assert_close(cap.teacher, cap.hidden.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_teacher_block_is_detached_and_matches(case):
    model = _model(case)
    blocks = getattr(model, case.blocks_attr)
    store, handle = _reference_output(blocks[2])
    try:
        with capture_hidden_states(model, 0, teacher_block_index=2) as cap:
            case.run(model, *LATENT[case.name])
    finally:
        handle.remove()
    t, h, w = GRID
    assert cap.teacher.shape == cap.hidden.shape == (B, t, h * w, case.hidden)
    assert not cap.teacher.requires_grad and cap.teacher.grad_fn is None
    assert cap.hidden.requires_grad
    torch.testing.assert_close(cap.teacher, store["out"].detach().reshape(B, t, h * w, -1), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_transformer_info(case):
    model = _model(case)
    info = transformer_info(model)
    assert info == (NUM_BLOCKS, case.hidden, case.patch)
    assert (info.num_blocks, info.hidden_size, info.patch_size) == (NUM_BLOCKS, case.hidden, case.patch)


def test_transformer_info_unwraps_compiled_module():
    model = _model(CASES[0])
    assert transformer_info(torch.compile(model)) == (NUM_BLOCKS, HIDDEN, (1, 2, 2))


class PeftModel(nn.Module):
    """Stands in for peft's wrapper (get_peft_model(transformer, config)), matched by name."""

    def __init__(self, model):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model

    def get_base_model(self):
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)


class FullyShardedDataParallel(nn.Module):
    """Stands in for torch's FSDP1 wrapper, which holds the model as ``.module``."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", [nn.DataParallel, PeftModel, FullyShardedDataParallel,
                                  lambda m: torch.compile(PeftModel(nn.DataParallel(m)))])
def test_wrappers_are_unwrapped(wrap):
    model = _model(CASES[0])
    wrapped = wrap(model)
    assert transformer_info(wrapped) == (NUM_BLOCKS, HIDDEN, (1, 2, 2))
    if isinstance(wrapped, (PeftModel, FullyShardedDataParallel, nn.DataParallel)):  # eager: run it
        with capture_hidden_states(wrapped, 1) as cap:
            wrapped(*_wan_inputs(1))
        with capture_hidden_states(model, 1) as ref:
            model(*_wan_inputs(1))
        assert cap.grid == GRID and torch.equal(cap.hidden, ref.hidden)


def _wan_with_patch(patch):
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()


def test_wan_temporal_patch_grid():
    model = _wan_with_patch((2, 2, 2))
    with torch.no_grad(), capture_hidden_states(model, 1) as cap:
        _run_wan(model, 4, 6, 4)  # F=4, H=6, W=4 -> (2, 3, 2)
    assert cap.grid == (2, 3, 2)
    assert cap.hidden.shape == (B, 2, 6, HIDDEN)


def test_a_patch_whose_height_and_width_differ_gives_the_grid_in_row_column_order():
    model = _wan_with_patch((1, 2, 1))
    with torch.no_grad(), capture_hidden_states(model, 1) as cap:
        _run_wan(model, 3, 4, 6)  # H=4 over 2, W=6 over 1
    assert cap.grid == (3, 2, 6)
    assert cap.hidden.shape == (B, 3, 12, HIDDEN)


def test_ltx_info_reports_its_temporal_patch_apart_from_the_spatial_one():
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=NUM_BLOCKS, caption_channels=16, patch_size=2, patch_size_t=1,
    )
    assert transformer_info(model).patch_size == (1, 2, 2)


# ---------------------------------------------------------------------------------------------
def test_hooks_removed_on_exit_and_on_exception():
    case = CASES[0]
    model = _model(case)
    blocks = list(getattr(model, case.blocks_attr))
    before = _hook_counts(model, blocks)
    with capture_hidden_states(model, 0, teacher_block_index=1) as cap:
        assert cap.attached
        assert _hook_counts(model, blocks) != before
    assert _hook_counts(model, blocks) == before
    assert not cap.attached

    with pytest.raises(KeyError, match="boom"):
        with capture_hidden_states(model, 1, teacher_block_index=2):
            raise KeyError("boom")
    assert _hook_counts(model, blocks) == before

    # A forward that fails inside a block must also leave no hooks and an unarmed capture.
    def fail(module, args):
        raise RuntimeError("block failure")

    bad = blocks[2].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="block failure"):
            with capture_hidden_states(model, 1) as cap:
                with torch.no_grad():
                    case.run(model, *LATENT[case.name])
    finally:
        bad.remove()
    assert _hook_counts(model, blocks) == before
    assert cap.num_forwards == 0
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        cap.hidden


def test_results_persist_after_exit_and_last_forward_wins():
    case = CASES[2]  # sana
    model = _model(case)
    with torch.no_grad(), capture_hidden_states(model, 0) as cap:
        case.run(model, 3, 4, 6)
        first = cap.hidden
        case.run(model, 2, 6, 8)
    assert cap.num_forwards == 2
    assert cap.grid == (2, 3, 4)
    assert cap.hidden.shape == (B, 2, 12, HIDDEN)
    assert first.shape == (B, 3, 6, HIDDEN)
    cap.clear()
    with pytest.raises(RuntimeError):
        cap.hidden


def test_take_hands_a_forward_over_once():
    # A capture kept attached across steps: a step in which this model did not run (another expert
    # ran, or model.forward(...) skipped the hooks) must not hand back the previous step's tensors.
    case = CASES[0]
    model, other = _model(case), _model(case)
    cap = capture_hidden_states(model, 1, teacher_block_index=2).attach()
    try:
        model(*_wan_inputs(0))
        first = cap.take()
        assert first.grid == GRID and first.hidden.shape == (B, 3, 6, HIDDEN) and first.hidden.requires_grad
        assert first.teacher.shape == first.hidden.shape and not first.teacher.requires_grad
        with capture_hidden_states(model, 1) as ref:
            model(*_wan_inputs(0))
        assert torch.equal(first.hidden, ref.hidden)
        cap.take()  # the reference forward ran through this capture as well
        for step in (lambda: case.run(other, *LATENT["wan"]),  # the other expert ran
                     lambda: model.forward(*_wan_inputs(1))):  # no hooks run
            step()
            for read in (cap.take, lambda: cap.hidden, lambda: cap.grid):
                with pytest.raises(RuntimeError, match="no WanTransformer3DModel forward ran through the capture "
                                                       r"since the last take\(\)"):
                    read()
        model(*_wan_inputs(2))
        assert cap.take().grid == GRID
    finally:
        cap.detach()


def test_dataparallel_over_several_devices_is_refused():
    # Its replicas would run the capture's hooks on slices of the batch in parallel threads. (Without
    # CUDA, DataParallel keeps no device ids: set them as a two-GPU machine would.)
    import copy

    model = _model(CASES[0])
    wrapped = nn.DataParallel(model)
    wrapped.device_ids = [0, 1]
    with pytest.raises(ValueError, match="DataParallel over 2 devices.*DistributedDataParallel"):
        capture_hidden_states(torch.compile(wrapped), 1)
    assert transformer_info(wrapped) == (NUM_BLOCKS, HIDDEN, (1, 2, 2))  # adds no hooks: nothing to refuse
    # A capture made on the wrapped model itself: a replica (a shallow copy sharing its hook dicts, as
    # DataParallel's replicate makes them) is refused when it runs.
    with capture_hidden_states(wrapped.module, 1) as cap:
        replica = copy.copy(model)
        with pytest.raises(RuntimeError, match="a copy of the captured WanTransformer3DModel ran with its hooks"):
            replica(*_wan_inputs(1))
        model(*_wan_inputs(1))
    assert cap.grid == GRID
    wrapped.device_ids = [0]
    assert capture_hidden_states(wrapped, 1).attach().attached


@pytest.mark.parametrize("captures", [1, 2])
def test_a_forward_that_fails_after_a_good_one_leaves_nothing_of_the_good_one(captures):
    # The grid and hidden states of an earlier forward must not be read as those of a later one
    # that raised (here in a capture's own argument check, before any block ran). With two captures
    # the first one's start hook refuses the forward before the second one's runs: the second must
    # not report the earlier forward either.
    case = CASES[0]
    model = _model(case)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        caps = [stack.enter_context(capture_hidden_states(model, i)) for i in range(captures)]
        case.run(model, *LATENT[case.name])
        assert all(cap.num_forwards == 1 and cap.grid is not None for cap in caps)
        with pytest.raises(ValueError, match="hidden_states must be a 5-D tensor"):
            model(torch.randn(B, 4, 4, 4), timestep=torch.tensor([1, 2]),
                  encoder_hidden_states=torch.randn(B, 3, 16))
    for cap in caps:
        for read in ("grid", "hidden"):
            with pytest.raises(RuntimeError, match="the last WanTransformer3DModel forward raised"):
                getattr(cap, read)


def test_an_attached_capture_is_not_entered_again():
    # Its exit would remove hooks its owner relies on: later forwards would leave stale tensors.
    case = CASES[0]
    model = _model(case)
    cap = capture_hidden_states(model, 0).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        with cap:
            pass
    assert cap.attached
    with torch.no_grad():
        case.run(model, *LATENT[case.name])
    assert cap.num_forwards == 1
    cap.detach()
    with cap:  # entered once, it works as before
        assert cap.attached
    assert not cap.attached


@pytest.mark.parametrize("grid", [(2.7, 2, 2), "222", (2, 2, None), (2, 2), (True, 2, 2)])
def test_bad_grid_override_is_refused(grid):
    with pytest.raises(ValueError, match="grid must be an int or 3 ints"):
        capture_hidden_states(_model(CASES[0]), 0, grid=grid)


def test_grid_override_takes_any_integer_type():
    import numpy as np

    model = _model(CASES[0])
    for grid in ((np.int64(3), 2, 3), (torch.tensor(3), 2, 3), [3, 2, 3]):
        with torch.no_grad(), capture_hidden_states(model, 0, grid=grid) as cap:
            CASES[0].run(model, *LATENT[CASES[0].name])
        assert cap.grid == (3, 2, 3) and all(type(v) is int for v in cap.grid)


def test_no_forward_yet_raises():
    model = _model(CASES[0])
    with capture_hidden_states(model, 0) as cap:
        pass
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        cap.hidden
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        cap.grid


def test_block_called_outside_transformer_forward_is_ignored():
    case = CASES[1]  # ltx
    model = _model(case)
    with torch.no_grad(), capture_hidden_states(model, 0) as cap:
        case.run(model, *LATENT[case.name])
        kept = cap.hidden
        # A direct block call (not through the transformer) must not overwrite the capture.
        blk = model.transformer_blocks[0]
        tokens = torch.randn(B, 5, HIDDEN)
        temb = torch.randn(B, 1, 6 * HIDDEN)
        rope = model.rope(tokens, 1, 1, 5)
        blk(tokens, torch.randn(B, 5, HIDDEN), temb, rope)
    assert cap.hidden is kept


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["wan", "kandinsky5"])
def test_gradient_checkpointing(case):
    f, h, w = LATENT[case.name]
    model = _model(case)
    model.train()
    torch.manual_seed(5)
    with capture_hidden_states(model, 1) as cap:
        case.run(model, f, h, w)
    plain = cap.hidden.detach().clone()

    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    torch.manual_seed(5)
    with capture_hidden_states(model, 1) as cap:
        case.run(model, f, h, w)
        captured = cap.hidden
        # Backward inside the context: the recompute re-runs block 1, which must not replace the capture.
        captured.float().square().mean().backward()
    assert cap.num_forwards == 1
    assert cap.hidden is captured
    torch.testing.assert_close(captured.detach(), plain)
    blocks = getattr(model, case.blocks_attr)
    assert sum(float(p.grad.abs().sum()) for p in blocks[1].parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in blocks[2].parameters())


def test_reentrant_checkpointing_is_reported():
    case = CASES[0]
    model = _model(case).train()
    model.gradient_checkpointing = True
    model._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    with capture_hidden_states(model, 1) as cap:
        case.run(model, *LATENT[case.name])
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        cap.hidden


def test_no_grad_forward_captures_without_graph():
    case = CASES[0]
    model = _model(case)
    with torch.no_grad(), capture_hidden_states(model, 2) as cap:
        case.run(model, *LATENT[case.name])
    assert not cap.hidden.requires_grad
    assert cap.hidden.shape == (B, 3, 6, HIDDEN)


# ---------------------------------------------------------------------------------------------
def test_ltx_needs_grid_without_sizes_and_accepts_override():
    case = CASES[1]
    model = _model(case)
    f, h, w = 2, 2, 3
    tokens = _pack(torch.randn(B, 4, f, h, w))
    # video_coords in the model's pixel-ish units: one (frame, y, x) triple per token.
    gf, gy, gx = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([gf, gy, gx]).flatten(1).float().unsqueeze(0).expand(B, -1, -1)
    args = (tokens, torch.randn(B, 5, 16), torch.tensor([10, 500]), torch.ones(B, 5))
    with torch.no_grad():
        with pytest.raises(ValueError, match="grid="):
            with capture_hidden_states(model, 0):
                model(*args, video_coords=coords)
        with capture_hidden_states(model, 0, grid=(f, h, w)) as cap:
            model(*args, video_coords=coords)
    assert cap.grid == (2, 2, 3)
    assert cap.hidden.shape == (B, 2, 6, HIDDEN)


def test_set_grid_follows_each_call_of_an_attached_capture():
    # LTX-Video called with video_coords on two aspect ratios of the same token count: the grid the
    # capture reshapes by is the one set before each call.
    case = CASES[1]
    model = _model(case)
    args = (torch.randn(B, 5, 16), torch.tensor([10, 500]), torch.ones(B, 5))
    cap = capture_hidden_states(model, 0, grid=(2, 2, 3)).attach()
    try:
        with torch.no_grad():
            for grid in ((2, 2, 3), (2, 3, 2)):
                cap.set_grid(grid)
                latents = torch.randn(B, 4, *grid)
                model(_pack(latents), *args, num_frames=grid[0], height=grid[1], width=grid[2])
                want = cap.take()
                cap.set_grid(None)  # derived from num_frames/height/width: the reference
                model(_pack(latents), *args, num_frames=grid[0], height=grid[1], width=grid[2])
                ref = cap.take()
                assert want.grid == ref.grid == grid and torch.equal(want.hidden, ref.hidden)
        for bad in ((2, 2), (0, 2, 3), "abc"):
            with pytest.raises(ValueError, match="grid"):
                cap.set_grid(bad)
    finally:
        cap.detach()


def test_grid_mismatch_is_reported():
    case = CASES[0]
    model = _model(case)
    with torch.no_grad(), pytest.raises(ValueError, match="does not match the latent patch grid"):
        with capture_hidden_states(model, 0, grid=(2, 2, 2)):
            case.run(model, *LATENT[case.name])


def test_kandinsky_fractal_order_restored_to_raster():
    """Kandinsky 5's nabla attention tiles tokens 8x8; the capture must return raster order.
    The visual blocks are replaced by identities (nabla attention needs flex attention), so the
    capture of block 1 must equal the visual embedding laid out by hand."""
    case = CASES[3]
    model = _model(case)
    for i in range(NUM_BLOCKS):
        model.visual_transformer_blocks[i] = _Identity()
    f, h, w = 2, 16, 32  # token grid (2, 8, 16): two tiles across
    torch.manual_seed(2)
    x = torch.randn(B, f, h, w, 4)
    with torch.no_grad(), capture_hidden_states(model, 1) as cap:
        _call_with(case, model, x, f, h, w, sparse_params={"to_fractal": True})
        expected = model.visual_embeddings(x)
    assert cap.grid == (2, 8, 16)
    torch.testing.assert_close(cap.hidden, expected.reshape(B, 2, 8 * 16, -1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
def test_block_index_out_of_range_mentions_block_count():
    model = _model(CASES[0])
    with pytest.raises(ValueError, match=r"has 3 blocks"):
        capture_hidden_states(model, 3)
    with pytest.raises(ValueError, match=r"has 3 blocks"):
        capture_hidden_states(model, -1)
    with pytest.raises(ValueError, match=r"teacher_block_index=7 .*has 3 blocks"):
        capture_hidden_states(model, 0, teacher_block_index=7)


def test_bad_index_types_and_order():
    model = _model(CASES[0])
    with pytest.raises(TypeError, match="block_index"):
        capture_hidden_states(model, 1.0)
    with pytest.raises(TypeError, match="block_index"):
        capture_hidden_states(model, True)
    with pytest.raises(ValueError, match="must not be shallower"):
        capture_hidden_states(model, 2, teacher_block_index=1)
    with pytest.raises(ValueError, match="grid"):
        capture_hidden_states(model, 0, grid=(2, 2))


def test_unsupported_model_lists_supported_classes():
    names = supported_transformers()
    assert set(names) == {
        "WanTransformer3DModel", "LTXVideoTransformer3DModel",
        "SanaVideoTransformer3DModel", "Kandinsky5Transformer3DModel",
    }
    for bad in (nn.Linear(2, 2), "not a model"):
        with pytest.raises(TypeError) as err:
            capture_hidden_states(bad, 0)
        for name in names:
            assert name in str(err.value)
        with pytest.raises(TypeError):
            transformer_info(bad)


def test_subclass_is_supported():
    class MyWan(diffusers.WanTransformer3DModel):
        pass

    torch.manual_seed(0)
    model = MyWan(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()
    with torch.no_grad(), capture_hidden_states(model, 1) as cap:
        _run_wan(model, 3, 4, 6)
    assert cap.grid == (3, 2, 3)


# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per code object, across model instances: start and end with none."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _wan_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    f, h, w = LATENT["wan"]
    return torch.randn(B, 4, f, h, w, generator=g), torch.tensor([10, 500]), torch.randn(B, 5, 16, generator=g)


def test_compiled_model_with_capture_attached_before_first_call(fresh_dynamo):
    case = CASES[0]
    eager_model = _model(case)
    with capture_hidden_states(eager_model, 1) as cap:
        eager_model(*_wan_inputs(1))
    eager_hidden = cap.hidden
    eager_hidden.float().square().mean().backward()
    eager_grads = [p.grad.clone() for p in eager_model.blocks[1].parameters()]

    model = _model(case)
    cap = capture_hidden_states(model, 1).attach()  # one capture for every forward, before the first compiled call
    compiled = torch.compile(model, backend="aot_eager")
    try:
        for seed in (2, 1):  # the last forward wins
            compiled(*_wan_inputs(seed))
            assert cap.grid == GRID
        assert cap.num_forwards == 2
        torch.testing.assert_close(cap.hidden, eager_hidden)
        assert cap.hidden.requires_grad
        cap.hidden.float().square().mean().backward()
    finally:
        cap.detach()
    grads = [p.grad for p in model.blocks[1].parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_compiled_model_with_capture_registered_late_says_so(fresh_dynamo):
    model = _model(CASES[0])
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        compiled(*_wan_inputs(1))  # traced without the block hooks
        with capture_hidden_states(compiled, 1, teacher_block_index=2) as cap:
            compiled(*_wan_inputs(1))
    assert cap.num_forwards == 1 and cap.grid == GRID  # the transformer's own hooks still run
    for read in (lambda: cap.hidden, lambda: cap.teacher):
        with pytest.raises(RuntimeError, match=r"appears to be compiled \(torch.compile\) without the capture "
                                               r"hooks.*\.attach\(\)"):
            read()


def test_code_compiled_for_another_instance_misses_the_hooks_until_reset(fresh_dynamo):
    # An EMA or validation copy of the same class, compiled and run first: torch reuses its code for
    # the second instance, which has no block hooks although the capture was attached first.
    other = torch.compile(_model(CASES[0]), backend="aot_eager")
    other(*_wan_inputs(1))
    model = _model(CASES[0])
    cap = capture_hidden_states(model, 1).attach()
    compiled = torch.compile(model, backend="aot_eager")
    try:
        compiled(*_wan_inputs(1))
        with pytest.raises(RuntimeError, match=r"reuses code torch compiled for another instance of "
                                               r"WanTransformer3DModel.*torch\.compiler\.reset\(\)"):
            cap.hidden
        torch.compiler.reset()  # the documented remedy
        compiled(*_wan_inputs(1))
        with capture_hidden_states(model, 1) as eager_cap:
            model(*_wan_inputs(1))
        torch.testing.assert_close(cap.hidden, eager_cap.hidden)
    finally:
        cap.detach()


def test_another_compiled_instance_running_between_steps_keeps_its_own_code_with_hook_guards(fresh_dynamo):
    # Two experts of one class, both compiled, the capture on one (attached first, as documented):
    # with torch's default guards the second shares the first's code and then the first reuses the
    # second's hook-less code; with skip_nnmodule_hook_guards off each keeps code for its own hooks.
    case = CASES[0]
    model, other = _model(case), _model(case)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    eager = {}
    for seed in (0, 2):
        with capture_hidden_states(model, 1) as ref:
            model(*_wan_inputs(seed))
        eager[seed] = ref.hidden
    cap = capture_hidden_states(model, 1).attach()
    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            run, run_other = torch.compile(model, backend="aot_eager"), torch.compile(other, backend="aot_eager")
            run(*_wan_inputs(0))
            torch.testing.assert_close(cap.take().hidden, eager[0])
            run_other(*_wan_inputs(1))
            with pytest.raises(RuntimeError, match="since the last take"):
                cap.take()
            run(*_wan_inputs(2))
            torch.testing.assert_close(cap.take().hidden, eager[2])
    finally:
        cap.detach()


def test_regionally_compiled_blocks_pick_up_a_capture_attached_late(fresh_dynamo):
    # compile_repeated_blocks compiles each block's forward, and torch recompiles a block whose hooks
    # changed: a capture attached after compiled calls (and another instance run in between) works.
    case = CASES[0]
    model, other = _model(case), _model(case)
    with capture_hidden_states(model, 1) as ref:
        model(*_wan_inputs(2))
    for m in (model, other):
        m.compile_repeated_blocks(backend="aot_eager")
    model(*_wan_inputs(0))
    cap = capture_hidden_states(model, 1).attach()
    try:
        other(*_wan_inputs(1))
        model(*_wan_inputs(2))
        torch.testing.assert_close(cap.take().hidden, ref.hidden)
    finally:
        cap.detach()


def test_an_interrupted_forward_frees_its_tensors_when_the_capture_ends():
    # KeyboardInterrupt skips torch's always_call hooks: the capture saw the block's output (holding
    # the partial forward's graph) but never the forward's end. Nothing of it is readable, and leaving
    # the capture must let it go.
    case = CASES[0]
    model = _model(case)
    blocks = getattr(model, case.blocks_attr)

    def interrupt(module, args):
        raise KeyboardInterrupt

    bad = blocks[1].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with capture_hidden_states(model, 0) as cap:
                case.run(model, *LATENT[case.name])
    finally:
        bad.remove()
    assert cap._hidden is None and not cap.attached
    with pytest.raises(RuntimeError, match="forward raised before it finished"):
        cap.hidden
