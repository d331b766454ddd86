"""Contracts of the integrations (capture hooks, the CrepaRegularizer drop-in): wrapper unwrapping, the
latent grid, what a capture hands over after skipped or interrupted forwards, and the config reaching
the drop-in's encoder, schedule, VAE and loss. Expected values come from the docstrings, README and SPEC."""
from __future__ import annotations

import functools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tiny_models import tiny_ltx_vae

diffusers = pytest.importorskip("diffusers")
timm = pytest.importorskip("timm")

from crepa_kernels.integrations import capture_hidden_states, transformer_info  # noqa: E402
from crepa_kernels.integrations.simpletuner import CrepaRegularizer  # noqa: E402

B, HIDDEN = 2, 24
LATENT = (3, 4, 6)  # (F, H, W) latents; patch (1, 2, 2) -> token grid (3, 2, 3)
GRID = (3, 2, 3)


def _wan(num_layers=3):
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()


def _wan_inputs(seed=0, latent=LATENT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, *latent, generator=g), torch.tensor([10, 500]), torch.randn(B, 5, 16, generator=g)


def _ltx():
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=2, caption_channels=16,
    ).eval()


def _kandinsky(num_blocks=2):
    torch.manual_seed(0)
    return diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=num_blocks, axes_dims=(4, 6, 6),
    ).eval()


class _PassThrough(nn.Module):
    """Stands in for a block that something skipped (a block cache): returns its video tokens."""

    def forward(self, *args, **kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _block_output(block):
    """An independent hook recording ``block``'s raw output: (store, handle)."""
    store = {}

    def hook(module, args, output):
        store["out"] = output

    return store, block.register_forward_hook(hook)


# --------------------------------------------------------------------------------------- capture: wrappers
class DistributedDataParallel(nn.Module):
    """Stands in for torch's DDP wrapper (matched by class name, as the capture matches it): holds ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_a_ddp_wrapped_transformer_is_captured_through_its_module():
    # README: "with capture_hidden_states(model, ...) as cap: # hooks go on model.module's blocks"
    model = _wan()
    ddp = DistributedDataParallel(model)
    assert transformer_info(ddp) == (3, HIDDEN, (1, 2, 2))
    store, handle = _block_output(model.blocks[1])
    try:
        with torch.no_grad(), capture_hidden_states(ddp, 1) as cap:
            ddp(*_wan_inputs(0))
    finally:
        handle.remove()
    assert cap.grid == GRID
    torch.testing.assert_close(cap.hidden, store["out"].reshape(B, 3, 6, HIDDEN), rtol=0, atol=0)


# --------------------------------------------------------------------------------- capture: per-forward state
def test_a_block_skipped_in_a_later_forward_is_reported_not_served_from_the_earlier_one():
    # Docstring: the block's hook not firing during a forward that ran through the capture raises ("a block
    # cache"); the previous forward's tensors must never be read as this one's.
    model = _wan()
    cap = capture_hidden_states(model, 1, teacher_block_index=2).attach()
    try:
        with torch.no_grad():
            model(*_wan_inputs(0))
            assert cap.hidden.shape == (B, 3, 6, HIDDEN) and cap.teacher.shape == (B, 3, 6, HIDDEN)
            student = model.blocks[1]
            model.blocks[1] = _PassThrough()  # the hooked module no longer runs
            model(*_wan_inputs(1))
            assert cap.num_forwards == 2 and cap.grid == GRID
            with pytest.raises(RuntimeError, match="block 1's hook did not fire"):
                cap.hidden
            model.blocks[1], model.blocks[2] = student, _PassThrough()
            model(*_wan_inputs(2))
            cap.hidden  # the student ran
            with pytest.raises(RuntimeError, match="block 2's hook did not fire"):
                cap.teacher
    finally:
        cap.detach()


def test_an_interrupted_forward_after_good_ones_leaves_nothing_readable():
    # KeyboardInterrupt skips the always_call end hook: the start of the interrupted forward must already
    # have dropped the previous forward's grid and tensors, and say that the last forward raised.
    model = _wan()

    def interrupt(module, args):
        raise KeyboardInterrupt

    cap = capture_hidden_states(model, 0).attach()
    try:
        with torch.no_grad():
            model(*_wan_inputs(0))
            cap.take()  # a forward handed over ...
            model(*_wan_inputs(1))  # ... and one not taken
            bad = model.blocks[1].register_forward_pre_hook(interrupt)
            try:
                with pytest.raises(KeyboardInterrupt):
                    model(*_wan_inputs(2))
            finally:
                bad.remove()
        for read in (lambda: cap.hidden, lambda: cap.grid, cap.take):
            with pytest.raises(RuntimeError, match="the last WanTransformer3DModel forward raised before it finished"):
                read()
    finally:
        cap.detach()


def test_a_lost_gradient_is_reported_for_its_own_forward_only():
    # A reentrant-checkpointed forward loses the block's gradient (hidden raises); the next forward,
    # run without it, must be readable again through the same capture.
    model = _wan().train()
    cap = capture_hidden_states(model, 1).attach()
    try:
        model.gradient_checkpointing = True
        model._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
        model(*_wan_inputs(0))
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            cap.hidden
        model.gradient_checkpointing = False
        model(*_wan_inputs(0))
        assert cap.hidden.requires_grad and cap.hidden.shape == (B, 3, 6, HIDDEN)
    finally:
        cap.detach()


def test_a_direct_call_of_the_teacher_block_outside_a_forward_is_ignored():
    # Docstring: block calls outside a transformer forward are ignored (the teacher's as the student's).
    model = _wan()
    with torch.no_grad(), capture_hidden_states(model, 0, teacher_block_index=1) as cap:
        args = _wan_inputs(0)
        model(*args)
        kept = cap.teacher
        # the block called by hand on 5 tokens, not the 18 of the forward's grid
        store, handle = _block_output(model.blocks[1])
        rope = model.rope(torch.randn(1, 4, 1, 2, 10))  # token grid (1, 1, 5)
        tokens = torch.randn(1, 5, HIDDEN)
        temb = torch.randn(1, 6, HIDDEN)
        model.blocks[1](tokens, torch.randn(1, 5, HIDDEN), temb, rope)
        handle.remove()
        assert store["out"].shape == (1, 5, HIDDEN)  # the block did run
    assert cap.teacher is kept


def test_a_block_returning_hidden_and_encoder_states_is_read_from_the_video_tokens():
    # _block_tensor's contract: a block returning (hidden, encoder_hidden) gives its first entry. Block 1 is
    # made to return such a tuple for the hooks between two of ours (the model itself still gets a tensor).
    model = _wan()
    block = model.blocks[1]
    store, handle = _block_output(block)
    to_tuple = block.register_forward_hook(lambda m, a, out: (out, torch.randn(B, 5, HIDDEN)))
    cap = capture_hidden_states(model, 1).attach()
    to_tensor = block.register_forward_hook(lambda m, a, out: out[0])
    try:
        with torch.no_grad():
            model(*_wan_inputs(0))
    finally:
        for h in (handle, to_tuple, to_tensor):
            h.remove()
        cap.detach()
    torch.testing.assert_close(cap.hidden, store["out"].reshape(B, 3, 6, HIDDEN), rtol=0, atol=0)


def test_attach_is_idempotent():
    # "Register the hooks (idempotent)": a second attach adds nothing, so one forward counts once.
    model = _wan()
    counts = lambda: [len(model._forward_hooks), len(model._forward_pre_hooks), len(model.blocks[1]._forward_hooks)]
    before = counts()
    cap = capture_hidden_states(model, 1).attach()
    once = counts()
    assert cap.attach() is cap and counts() == once
    with torch.no_grad():
        model(*_wan_inputs(0))
    assert cap.num_forwards == 1
    cap.detach()
    assert counts() == before


def _pack(latents):
    b, c = latents.shape[:2]
    return latents.permute(0, 2, 3, 4, 1).reshape(b, -1, c)


def test_set_grid_none_goes_back_to_the_grid_of_the_inputs():
    # "None derives it from the inputs again": after an override, LTX's num_frames/height/width count.
    model = _ltx()
    cap = capture_hidden_states(model, 0, grid=(2, 2, 3)).attach()
    try:
        cap.set_grid(None)
        latents = torch.randn(B, 4, 2, 3, 2)  # grid (2, 3, 2): the same token count as the override
        with torch.no_grad():
            model(_pack(latents), torch.randn(B, 5, 16), torch.tensor([10, 500]), torch.ones(B, 5),
                  num_frames=2, height=3, width=2)
        assert cap.grid == (2, 3, 2) and cap.hidden.shape == (B, 2, 6, HIDDEN)
    finally:
        cap.detach()


def _kandinsky_identity_call(model, x, f, h, w, **capture_kw):
    rope_pos = [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)]
    with torch.no_grad(), capture_hidden_states(model, 1, **capture_kw) as cap:
        model(x, torch.randn(B, 5, 16), torch.tensor([10.0, 500.0]), torch.randn(B, 8), visual_rope_pos=rope_pos,
              text_rope_pos=torch.arange(5), sparse_params={"to_fractal": True})
    return cap


def test_fractal_order_is_restored_with_a_grid_override_too():
    # The grid override replaces the derived grid; the token order of nabla attention is still tiled.
    model = _kandinsky()
    for i in range(2):
        model.visual_transformer_blocks[i] = _PassThrough()
    f, h, w = 2, 16, 32  # token grid (2, 8, 16): two 8x8 tiles across
    x = torch.randn(B, f, h, w, 4)
    cap = _kandinsky_identity_call(model, x, f, h, w, grid=(2, 8, 16))
    with torch.no_grad():
        expected = model.visual_embeddings(x)  # (B, F, H/2, W/2, D) in raster order
    assert cap.grid == (2, 8, 16)
    torch.testing.assert_close(cap.hidden, expected.reshape(B, 2, 8 * 16, -1), rtol=0, atol=0)


def test_a_fractal_grid_not_made_of_whole_tiles_is_a_value_error():
    model = _kandinsky()
    for i in range(2):
        model.visual_transformer_blocks[i] = _PassThrough()
    f, h, w = 2, 16, 32  # 256 tokens; the override (4, 4, 16) has as many, but rows of 4 are no 8x8 tiles
    with pytest.raises(ValueError, match="divisible by 8"):
        _kandinsky_identity_call(model, torch.randn(B, f, h, w, 4), f, h, w, grid=(4, 4, 16))


def test_a_latent_size_not_a_multiple_of_the_patch_gives_the_floor_grid():
    # Module docstring: grid (F // p_t, H // p_h, W // p_w), as the strided Conv3d patchifies (it drops the rest).
    model = _wan()
    store, handle = _block_output(model.blocks[0])
    try:
        with torch.no_grad(), capture_hidden_states(model, 0) as cap:
            model(*_wan_inputs(0, latent=(3, 5, 7)))  # 5 // 2 = 2 rows, 7 // 2 = 3 columns
    finally:
        handle.remove()
    assert cap.grid == (3, 2, 3)
    torch.testing.assert_close(cap.hidden, store["out"].reshape(B, 3, 6, HIDDEN), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ the drop-in
def _ns(**kw):
    base = dict(crepa_enabled=True, crepa_block_index=1, crepa_lambda=0.5, crepa_adjacent_distance=1,
                crepa_adjacent_tau=1.0, crepa_encoder_image_size=56, crepa_offload="offload")
    base.update(kw)
    return SimpleNamespace(**base)


def _backbone(**kw):
    return _ns(crepa_feature_source="backbone", crepa_teacher_block_index=3, **kw)


def _tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, depth=2,
                              embed_dim=32, num_heads=2, **kw)
    return model.eval()


def _score(projected, feats, d=1, tau=1.0):
    """SPEC sections 3-5 for equal T and N: (alignment score, self similarity, per-video mean)."""
    p, f = F.normalize(projected, dim=-1), F.normalize(feats, dim=-1)
    sim = torch.einsum("btnd,bund->btu", p, f) / p.shape[2]  # sim(b, t, u)
    t = sim.shape[1]
    total = torch.diagonal(sim, dim1=1, dim2=2).clone()
    self_sim = total.clone()
    k = min(d, t - 1)
    if k > 0:
        w = math.exp(-k / tau)
        for i in range(t):
            for j in (i - k, i + k):
                if 0 <= j < t:
                    total[:, i] += w * sim[:, i, j]
    return total.mean().item(), self_sim.mean().item(), total.mean(1).mean().item()


def test_the_driver_sets_the_projector_once_and_on_the_accelerator_device():
    # attach_to_model: "Create the projector (once)"; the accelerator's .device is where it computes.
    reg = CrepaRegularizer(_backbone(), SimpleNamespace(device=torch.device("meta")), hidden_size=8)
    first, second = nn.Module(), nn.Module()
    reg.attach_to_model(first)
    assert all(p.device.type == "meta" for p in first.crepa_projector.parameters())
    projector = reg.projector
    reg.attach_to_model(second)  # e.g. the unwrapped model again after a checkpoint load
    assert reg.projector is projector and second.crepa_projector is projector is first.crepa_projector


def test_the_accelerator_may_be_a_torch_device_and_the_block_index_is_exposed():
    reg = CrepaRegularizer(_backbone(crepa_block_index=2), torch.device("cpu"), hidden_size=8)
    assert reg.device == torch.device("cpu")
    assert reg.block_index == 2 and reg.teacher_block_index == 3  # trainers read these to pick hidden states


def test_load_state_dict_before_attach_says_what_to_do():
    reg = CrepaRegularizer(_backbone(), "cpu", hidden_size=8)
    with pytest.raises(RuntimeError, match="call attach_to_model"):
        reg.load_state_dict({})


def test_backbone_features_are_the_teacher_even_when_the_trainer_passes_latents_and_a_vae():
    # Backbone mode: "no VAE and no encoder" (SPEC 7); the trainer's call passes latents and its VAE anyway.
    torch.manual_seed(0)
    reg = CrepaRegularizer(_backbone(), "cpu", hidden_size=8)
    reg.attach_to_model(nn.Module())
    hidden, teacher = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)
    with torch.no_grad():
        projected = reg.projector(hidden)
    score, self_sim, per_video = _score(projected, teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, logs = reg.compute_loss(hidden, torch.randn(1, 4, 3, 4, 4), object(), frame_features=teacher)
    assert loss.item() == pytest.approx(-0.5 * per_video, abs=1e-5)
    assert logs["crepa_alignment_score"] == pytest.approx(score, abs=1e-5)
    assert logs["crepa_similarity_self"] == pytest.approx(self_sim, abs=1e-5)


def test_max_train_steps_is_the_decay_horizon_of_the_schedule():
    # SPEC 6: decay_steps 0 means max_train_steps; linear at step 5 of 10: 0.5 + (0 - 0.5) * 5 / 10.
    reg = CrepaRegularizer(_backbone(crepa_scheduler="linear"), "cpu", hidden_size=8, max_train_steps=10)
    reg.attach_to_model(nn.Module())
    _, logs = reg.compute_loss(torch.randn(1, 3, 4, 8), None, frame_features=torch.randn(1, 3, 4, 8), step=5)
    assert logs["crepa_weight"] == pytest.approx(0.25)


def test_the_config_reaches_the_encoder_the_drop_in_loads(monkeypatch):
    # crepa_encoder, crepa_encoder_image_size, crepa_encoder_weights, crepa_encoder_frames_batch_size and
    # crepa_encoder_dtype configure the teacher the drop-in builds (README, configuration table).
    import crepa_kernels.teacher as teacher

    calls = []

    class FakeEncoder(nn.Module):
        embed_dim = 32

        def __init__(self, *args, **kwargs):
            super().__init__()
            calls.append((args, kwargs))

    monkeypatch.setattr(teacher, "DinoEncoder", FakeEncoder)
    cfg = _ns(crepa_encoder="dinov2_vits14", crepa_encoder_weights="/weights/dinov2_vits14.safetensors",
              crepa_encoder_frames_batch_size=2, crepa_encoder_dtype="bfloat16", crepa_encoder_image_size=224)
    reg = CrepaRegularizer(cfg, "cpu", hidden_size=8)
    reg.attach_to_model(nn.Module())
    assert len(calls) == 1
    args, kwargs = calls[0]
    bound = dict(zip(("name", "image_size"), args), **kwargs)
    assert bound["name"] in ("dinov2_vits14", "vit_small_patch14_dinov2")
    assert bound["image_size"] == 224 and bound["frames_batch_size"] == 2
    assert str(bound["weights"]) == "/weights/dinov2_vits14.safetensors"
    assert bound["dtype"] in (torch.bfloat16, "bfloat16")


def test_a_timm_encoder_with_dynamic_image_size_takes_the_configured_size():
    # README / the error text: build the model with img_size=crepa_encoder_image_size "(or dynamic_img_size=True)".
    reg = CrepaRegularizer(_ns(crepa_encoder_image_size=28), "cpu", hidden_size=8,
                           encoder=_tiny_vit(dynamic_img_size=True))
    assert reg.encoder.image_size == 28 and reg.encoder.grid == (2, 2)


def test_model_foundation_checks_the_vae_family():
    # "model_foundation: the model family name ..., used only to check the VAE family".
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    reg = CrepaRegularizer(_ns(), "cpu", hidden_size=16, encoder=_tiny_vit(), model_foundation="ltxvideo")
    reg.attach_to_model(nn.Module())
    with pytest.raises(ValueError, match="expects a AutoencoderKLLTXVideo, but the VAE is a AutoencoderKLWan"):
        reg.compute_loss(torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4), vae)


def test_an_eval_call_at_lambda_zero_returns_no_term_under_torch_distributed(monkeypatch):
    # README, validation calls: "At weight 0 its term is None on every process count".
    import crepa_kernels.integrations.simpletuner as simpletuner
    import crepa_kernels.module as module

    monkeypatch.setattr(module, "_world_size", lambda: 2)
    monkeypatch.setattr(simpletuner, "_world_size", lambda: 2)
    reg = CrepaRegularizer(_backbone(crepa_lambda=0.0), "cpu", hidden_size=8).eval()
    reg.attach_to_model(nn.Module())
    term, logs = reg.compute_loss(torch.randn(1, 3, 4, 8), None, frame_features=torch.randn(1, 3, 4, 8))
    assert term is None and logs is None


def test_the_decode_timestep_reaches_a_timestep_conditioned_ltx_decoder():
    # SPEC 7: LTX-Video latents are z * latents_std / scaling_factor + latents_mean, decoded with the timestep
    # argument when the VAE is timestep-conditioned; frames clamp to [-1, 1] -> [0, 1], resize, ImageNet
    # normalisation, DINOv2 patch tokens; temporal alignment keeps frames floor(linspace(0, T_f - 1, T)).
    vae, vit = tiny_ltx_vae(timestep_conditioning=True), _tiny_vit()
    reg = CrepaRegularizer(_ns(crepa_encoder_dtype="float32"), "cpu", hidden_size=16, encoder=vit)
    reg.attach_to_model(nn.Module())
    torch.manual_seed(2)
    latents, hidden = torch.randn(1, 8, 2, 4, 4), torch.randn(1, 3, 4, 16)
    loss, logs = reg.compute_loss(hidden, latents, vae, timestep=0.7)
    with torch.no_grad():
        z = latents * vae.latents_std.view(1, 8, 1, 1, 1) / 2.0 + vae.latents_mean.view(1, 8, 1, 1, 1)
        video = vae.decode(z, temb=torch.tensor([0.7])).sample.clamp(-1, 1)  # (1, 3, 5, 16, 16)
        video = ((video + 1) * 0.5).permute(0, 2, 1, 3, 4)[0]  # (5, 3, 16, 16)
        keep = torch.linspace(0, video.shape[0] - 1, 3).long()
        x = F.interpolate(video[keep], size=(56, 56), mode="bilinear", align_corners=False)
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1)
        feats = vit.forward_features(x)[:, vit.num_prefix_tokens:].unsqueeze(0)  # (1, 3, 16, 32)
        projected = reg.projector(hidden)
        # 4 hidden tokens against 16 patch tokens: both square, the features resampled 4x4 -> 2x2 (SPEC 2)
        f = feats.reshape(3, 4, 4, 32).permute(0, 3, 1, 2)
        f = F.interpolate(f, size=(2, 2), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 3, 4, 32)
    score, _, per_video = _score(projected, f)
    assert loss.item() == pytest.approx(-0.5 * per_video, abs=1e-5)
    assert logs["crepa_alignment_score"] == pytest.approx(score, abs=1e-5)


def test_after_an_interrupted_forward_a_reattached_capture_ignores_block_calls_outside_a_forward():
    # KeyboardInterrupt skips the end hook; detach() must disarm the capture so that, attached again, a block
    # called by hand (outside any transformer forward) is ignored as the docstring says.
    model = _wan()

    def interrupt(module, args):
        raise KeyboardInterrupt

    cap = capture_hidden_states(model, 0)
    bad = model.blocks[1].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad(), cap:
            model(*_wan_inputs(0))
    finally:
        bad.remove()
    with torch.no_grad(), cap:
        rope = model.rope(torch.randn(1, 4, 1, 2, 10))  # token grid (1, 1, 5)
        model.blocks[0](torch.randn(1, 5, HIDDEN), torch.randn(1, 5, HIDDEN), torch.randn(1, 6, HIDDEN), rope)
        model(*_wan_inputs(1))
    assert cap.grid == GRID and cap.hidden.shape == (B, 3, 6, HIDDEN)


def test_grids_given_to_the_drop_in_select_grid_mode():
    # SPEC 2, grid mode: grids differ (2x3 student, 3x2 teacher, 6 tokens each); on a tie the projected side
    # keeps its grid and the teacher is resampled bilinearly (align_corners=False) onto it. hidden_grid may be
    # the capture's (T, H, W). Without grids the equal token counts would be compared as they are.
    torch.manual_seed(4)
    reg = CrepaRegularizer(_backbone(), "cpu", hidden_size=8)
    reg.attach_to_model(nn.Module())
    hidden, teacher = torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8)
    loss, logs = reg.compute_loss(hidden, None, frame_features=teacher, hidden_grid=(3, 2, 3), feature_grid=(3, 2))
    with torch.no_grad():
        projected = reg.projector(hidden)
        t = teacher[0].reshape(3, 3, 2, 8).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(2, 3), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 3, 6, 8)
    score, self_sim, per_video = _score(projected, t)
    assert loss.item() == pytest.approx(-0.5 * per_video, abs=1e-5)
    assert logs["crepa_alignment_score"] == pytest.approx(score, abs=1e-5)
    assert logs["crepa_similarity_self"] == pytest.approx(self_sim, abs=1e-5)
    assert abs(score - _score(projected, teacher)[0]) > 1e-3  # the grids do change the numbers


def test_the_drop_in_logs_plain_numbers_as_the_trainer_does():
    # CrepaLoss docstring: log_tensors=False gives floats, "as the common trainer does"; the drop-in's logs are
    # the trainer's (README: same keys, same values), so they are Python numbers, not tensors.
    reg = CrepaRegularizer(_backbone(), "cpu", hidden_size=8)
    reg.attach_to_model(nn.Module())
    _, logs = reg.compute_loss(torch.randn(1, 3, 4, 8), None, frame_features=torch.randn(1, 3, 4, 8))
    for key in ("crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_weight",
                "crepa_alignment_score_ema"):
        assert type(logs[key]) is float, key
    assert logs["crepa_cutoff"] is False


def _wan_vae(seed):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                      latents_std=[1.0] * 4).eval()


def test_a_vae_adapter_cached_for_another_vae_object_is_not_reused():
    # The teacher's adapter is cached by id(vae); after the trainer frees one VAE, another may get its id. What
    # such reuse would leave behind is set up directly: the new VAE must get its own adapter (and setup).
    from crepa_kernels.teacher import adapter_for

    old, new = _wan_vae(1), _wan_vae(2)
    reg = CrepaRegularizer(_ns(crepa_drop_vae_encoder=True), "cpu", hidden_size=16, encoder=_tiny_vit())
    reg.attach_to_model(nn.Module())
    reg._adapters = {id(new): adapter_for(old)}
    hidden, latents = torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4)
    loss, _ = reg.compute_loss(hidden, latents, new)
    assert new.encoder is None  # crepa_drop_vae_encoder applied to the VAE in use
    fresh = CrepaRegularizer(_ns(crepa_drop_vae_encoder=True), "cpu", hidden_size=16, encoder=_tiny_vit())
    fresh.attach_to_model(nn.Module())
    fresh.load_state_dict(reg.state_dict(), strict=False)
    want, _ = fresh.compute_loss(hidden, latents, new)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
