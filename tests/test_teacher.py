"""Tests for the teacher: DINOv2 encoder, video-VAE adapters and the latents-to-features pipeline.

Every model is tiny and randomly initialised (no downloads); expectations are derived in the test from the
underlying timm / diffusers modules called directly.
"""
from __future__ import annotations

import math
import os

import types

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_ltx_vae

from crepa_kernels.teacher import (
    DINOV2_MODELS,
    DinoEncoder,
    VaeAdapter,
    adapter_for,
    channels_last_3d,
    drop_encoder,
    kept_frame_indices,
    latents_to_features,
    resolve_encoder_name,
)

timm = pytest.importorskip("timm")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(depth=2, embed_dim=32, num_heads=2)


@pytest.fixture(autouse=True)
def _cpu_only_machine(request, monkeypatch):
    """CPU tests see a machine without CUDA, so the encoder's default dtype (bf16 when CUDA is present) is
    float32 wherever the suite runs and the expectations computed in float32 hold."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _tiny_vit(arch="vit_small_patch14_dinov2", img_size=56, seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **{**TINY, **kw})
    # Layer scale starts at 1e-5 (blocks ~ identity); randomise everything so weight mix-ups show.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _frames(b=2, t=3, h=40, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, h, w, generator=g)


def _expected_tokens(model, frames, size, prefix):
    """Independent path: per-frame resize, ImageNet normalise, forward_features, drop `prefix` tokens."""
    b, t = frames.shape[:2]
    out = []
    for i in range(b):
        row = []
        for j in range(t):
            x = frames[i, j][None]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            with torch.no_grad():
                row.append(model.forward_features((x - MEAN) / STD)[0, prefix:])
        out.append(torch.stack(row))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------------------
# DinoEncoder
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, arch",
    [
        ("dinov2_vitg14", "vit_giant_patch14_dinov2"),
        ("dinov2_vits14", "vit_small_patch14_dinov2"),
        ("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2"),
        ("dinov2_vitl14_reg4", "vit_large_patch14_reg4_dinov2"),
        ("dinov2_g", "vit_giant_patch14_dinov2"),
        ("dino_v2_s", "vit_small_patch14_dinov2"),
        ("dinov2-vitb14", "vit_base_patch14_dinov2"),
        ("DINOv2_ViTL14", "vit_large_patch14_dinov2"),
        ("dinov2_large", "vit_large_patch14_dinov2"),
        ("facebook/dinov2-giant", "vit_giant_patch14_dinov2"),
        ("vit_base_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2"),
        ("timm/vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2"),
    ],
)
def test_alias_resolution(name, arch):
    assert resolve_encoder_name(name) == arch


def test_all_timm_names_are_registered():
    assert len(DINOV2_MODELS) == 8
    for arch in DINOV2_MODELS:
        assert arch in timm.list_models("*dinov2*")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown encoder name 'clip_vit'") as err:
        DinoEncoder("clip_vit", weights="random")
    assert "dinov2_vitg14" in str(err.value) and "vit_small_patch14_reg4_dinov2" in str(err.value)
    with pytest.raises(TypeError, match="name must be a str"):
        resolve_encoder_name(14)


def test_patch_tokens_match_forward_features():
    model = _tiny_vit()
    enc = DinoEncoder(model=model)
    assert enc.image_size == 56 and enc.grid == (4, 4) and enc.num_prefix_tokens == 1
    assert enc.embed_dim == 32 and enc.patch_size == 14
    frames = _frames()
    out = enc.encode(frames)
    assert out.shape == (2, 3, 16, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected_tokens(model, frames, 56, 1), rtol=1e-5, atol=1e-5)
    # forward is encode
    torch.testing.assert_close(enc(frames), out)


def test_frames_at_encoder_size_are_not_resampled():
    model = _tiny_vit()
    enc = DinoEncoder(model=model)
    frames = _frames(1, 2, 56, 56)
    with torch.no_grad():
        expected = model.forward_features(((frames[0] - MEAN) / STD))[:, 1:]
    torch.testing.assert_close(enc.encode(frames)[0], expected, rtol=1e-5, atol=1e-5)


def test_reg4_drops_five_prefix_tokens():
    model = _tiny_vit("vit_small_patch14_reg4_dinov2")
    enc = DinoEncoder(model=model)
    assert enc.num_prefix_tokens == 5
    frames = _frames(1, 2)
    out = enc.encode(frames)
    assert out.shape == (1, 2, 16, 32)
    torch.testing.assert_close(out, _expected_tokens(model, frames, 56, 5), rtol=1e-5, atol=1e-5)


def test_build_by_name_with_model_kwargs():
    enc = DinoEncoder("dinov2_vits14_reg4", 28, weights="random", model_kwargs=TINY)
    assert enc.name == "vit_small_patch14_reg4_dinov2"
    assert enc.grid == (2, 2) and enc.embed_dim == 32 and enc.num_prefix_tokens == 5
    assert len(enc.model.blocks) == 2
    assert enc.encode(_frames(1, 1, 20, 30)).shape == (1, 1, 4, 32)


def test_frozen_and_eval():
    enc = DinoEncoder(model=_tiny_vit())
    enc.train()
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
    frames = _frames(1, 1).requires_grad_(True)
    assert not enc.encode(frames).requires_grad


def test_frames_mini_batching_matches_one_batch():
    model = _tiny_vit()
    frames = _frames(2, 3)
    full = DinoEncoder(model=model).encode(frames)
    for fbs in (1, 2, 4, 100):
        chunked = DinoEncoder(model=model, frames_batch_size=fbs).encode(frames)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


def _weights_dtypes(enc):
    return {p.dtype for p in enc.model.parameters()}


def _tensor_identities(module):
    return [(name, id(t), t.data_ptr(), t.dtype, t.device)
            for name, t in [*module.named_parameters(), *module.named_buffers()]]


def test_explicit_dtype_casts_weights():
    enc = DinoEncoder(model=_tiny_vit(), dtype=torch.float64)
    assert _weights_dtypes(enc) == {torch.float64}
    assert enc.compute_dtype(torch.device("cuda")) == torch.float64  # an explicit dtype wins everywhere
    assert enc.compute_dtype(torch.device("cpu")) == enc.compute_dtype() == torch.float64
    assert enc.encode(_frames(1, 1)).dtype == torch.float32


def test_default_dtype_is_fixed_at_construction_by_target_device(monkeypatch):
    # CPU-only machine: float32 weights, and that is the compute dtype whatever device is asked about.
    enc = DinoEncoder(model=_tiny_vit())
    assert _weights_dtypes(enc) == {torch.float32} and enc.dtype == torch.float32
    assert enc.compute_dtype(torch.device("cuda")) == enc.compute_dtype(torch.device("cpu")) == torch.float32
    assert _weights_dtypes(DinoEncoder(model=_tiny_vit(), dtype="auto")) == {torch.float32}
    assert _weights_dtypes(DinoEncoder(model=_tiny_vit(), device="cpu")) == {torch.float32}
    # With CUDA present the encoder is expected to run there: bf16 weights at once, not at the first encode.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    enc = DinoEncoder(model=_tiny_vit())
    assert _weights_dtypes(enc) == {torch.bfloat16} and enc.compute_dtype() == torch.bfloat16
    assert enc.pixel_mean.dtype == enc.pixel_std.dtype == torch.float32
    # An explicit CPU device overrides the machine.
    assert _weights_dtypes(DinoEncoder(model=_tiny_vit(), device="cpu")) == {torch.float32}
    from crepa_kernels.teacher.encoders import _resolve_dtype

    assert _resolve_dtype(None, torch.device("cuda", 1)) == torch.bfloat16
    assert _resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16), (torch.bfloat16, torch.bfloat16),
                                         ("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_names_cast_weights_at_construction(name, dtype):
    enc = DinoEncoder(model=_tiny_vit(), dtype=name)
    assert _weights_dtypes(enc) == {dtype} and enc.compute_dtype() == dtype


def test_bf16_encoder_outputs_float32_close_to_fp32():
    frames = _frames(1, 2)
    reference = DinoEncoder(model=_tiny_vit()).encode(frames)
    enc = DinoEncoder(model=_tiny_vit(), dtype="bfloat16")
    out = enc.encode(frames)
    assert out.dtype == torch.float32 and _weights_dtypes(enc) == {torch.bfloat16}
    cos = F.cosine_similarity(out.flatten(0, 2), reference.flatten(0, 2), dim=-1)
    assert cos.min() > 0.98


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_encode_never_replaces_weights(dtype):
    enc = DinoEncoder(model=_tiny_vit(), dtype=dtype)
    before = _tensor_identities(enc)
    first = enc.encode(_frames(1, 2))
    for _ in range(3):
        torch.testing.assert_close(enc.encode(_frames(1, 2)), first, rtol=0, atol=0)
    assert _tensor_identities(enc) == before


@pytest.mark.parametrize("mode", ["auto", "resident", "offload"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_encoder_survives_offload_manager_cycles(monkeypatch, mode, dtype):
    from crepa_kernels.teacher.offload import OffloadManager

    # A CUDA run asks for bf16 compute while the default weights are float32; report that on the CPU too,
    # so `encode` is tempted the way it is on a GPU. It must run in the weights' dtype and leave them alone.
    monkeypatch.setattr(DinoEncoder, "compute_dtype", lambda self, device=None: torch.bfloat16)
    enc = DinoEncoder(model=_tiny_vit(), dtype=dtype)
    weights_dtypes = _weights_dtypes(enc)
    manager = OffloadManager(mode, emulate_device=True)
    frames = _frames(1, 2)
    outputs = []
    for _ in range(3):
        with manager.use(enc):
            during = _tensor_identities(enc)  # the manager's device copy
            outputs.append(enc.encode(frames))
            assert _tensor_identities(enc) == during
        manager.release(enc)
    assert _weights_dtypes(enc) == weights_dtypes
    assert manager.stats.copies == (3 if mode == "offload" else 1)
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)
    assert outputs[0].dtype == torch.float32


def _to_original_dinov2(state, reg_tokens=False, swiglu=False, chunks=0):
    """timm state dict -> facebookresearch DINOv2 key names and token layout (as their .pth files hold)."""
    state = {k: v.clone() for k, v in state.items()}
    out = {"mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    if reg_tokens:
        # timm folds pos_embed[:, 0] into cls_token and drops it from pos_embed; the original keeps it.
        pos0 = torch.randn(1, 1, state["cls_token"].shape[-1])
        out["register_tokens"] = state.pop("reg_token")
        out["cls_token"] = state.pop("cls_token") - pos0
        out["pos_embed"] = torch.cat([pos0, state.pop("pos_embed")], dim=1)
    for k, v in state.items():
        if swiglu:
            k = k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        if chunks and k.startswith("blocks."):
            idx = int(k.split(".")[1])
            k = f"blocks.{idx % chunks}.{k[len('blocks.'):]}"  # blocks.<chunk>.<global index>.
        out[k] = v
    return out


def test_weights_round_trip_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = _tiny_vit(seed=3)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = DinoEncoder("dinov2_vits14", 56, weights=str(path), model_kwargs=TINY)
    frames = _frames(1, 2)
    torch.testing.assert_close(loaded.encode(frames), DinoEncoder(model=source).encode(frames))


def test_a_dinov2_training_checkpoint_loads_its_backbone(tmp_path):
    # DINOv2's training checkpoints: {"teacher": {"backbone.*": ..., "dino_head.*": ..., "ibot_head.*": ...}}
    source = _tiny_vit(seed=3)
    state = {f"backbone.{k}": v for k, v in _to_original_dinov2(source.state_dict()).items()}
    state.update({"dino_head.mlp.0.weight": torch.ones(4, 32), "ibot_head.last_layer.weight": torch.ones(8, 4)})
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": state, "iteration": 5}, str(path))
    loaded = DinoEncoder("dinov2_vits14", 56, weights=str(path), model_kwargs=TINY)
    frames = _frames(1, 2)
    torch.testing.assert_close(loaded.encode(frames), DinoEncoder(model=source).encode(frames))


def test_hugging_face_transformers_weights_are_named_as_such(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 32), "embeddings.patch_embeddings.projection.weight":
               torch.zeros(32, 3, 14, 14), "encoder.layer.0.norm1.weight": torch.zeros(32)}, str(path))
    with pytest.raises(ValueError, match="holds Hugging Face transformers Dinov2Model weights.*original"):
        DinoEncoder("dinov2_vits14", 56, weights=str(path), model_kwargs=TINY)


@pytest.mark.parametrize("suffix, content", [(".safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"),
                                             (".pth", b"not a zip archive nor a pickle"), (".pt", b"")])
def test_an_unreadable_weights_file_is_named_in_the_error(tmp_path, suffix, content):
    path = tmp_path / ("dino" + suffix)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"weights file '{path}'"):
        DinoEncoder("dinov2_vits14", 56, weights=str(path), model_kwargs=TINY)


def test_a_checkpoint_pickling_other_objects_names_the_offending_global(tmp_path):
    import argparse

    path = tmp_path / "dino.pth"
    torch.save({"model": _tiny_vit(seed=3).state_dict(), "args": argparse.Namespace(lr=1.0)}, str(path))
    with pytest.raises(ValueError, match="weights file .*Unsupported global: GLOBAL argparse.Namespace") as e:
        DinoEncoder("dinov2_vits14", 56, weights=str(path), model_kwargs=TINY)
    assert "\x1b" not in str(e.value)


@pytest.mark.parametrize(
    "arch, name, reg, swiglu, chunks",
    [
        ("vit_small_patch14_dinov2", "dinov2_vits14", False, False, 0),
        ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4", True, False, 2),
        ("vit_giant_patch14_reg4_dinov2", "dinov2_vitg14_reg4", True, True, 0),
    ],
)
def test_weights_round_trip_original_pth(tmp_path, arch, name, reg, swiglu, chunks):
    source = _tiny_vit(arch, seed=4)
    path = tmp_path / "dino.pth"
    torch.save(_to_original_dinov2(source.state_dict(), reg, swiglu, chunks), str(path))
    loaded = DinoEncoder(name, 56, weights=path, model_kwargs=TINY)
    frames = _frames(1, 2)
    torch.testing.assert_close(loaded.encode(frames), DinoEncoder(model=source).encode(frames), rtol=1e-5, atol=1e-5)


def _dinov2_runtime_pos_embed(pos, grid, registers=False):
    """DINOv2's own `interpolate_pos_encoding` for a square input of `grid` x `grid` patches, as its hub
    models (the reference trainer's encoder) run it at each forward: the class entry kept, the M x M patch
    grid resized bicubically in float32. The hub builds the models without registers with
    interpolate_offset 0.1 and no antialiasing (scale factor (grid + 0.1) / M), the `_reg` ones with
    interpolate_offset 0 and antialiasing (output size grid x grid)."""
    m = math.isqrt(pos.shape[1] - 1)
    patches = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if registers:
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        scale = (grid + 0.1) / m
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert patches.shape[-2:] == (grid, grid)
    return torch.cat([pos[:, :1].float(), patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def test_weights_resampled_to_another_image_size(tmp_path):
    source = _tiny_vit(seed=5)
    path = tmp_path / "dino.pth"
    torch.save({"model": source.state_dict()}, str(path))  # wrapped the way training checkpoints are
    enc = DinoEncoder("dinov2_vits14", 28, weights=path, model_kwargs=TINY)
    assert enc.model.pos_embed.shape == (1, 1 + 4, 32)
    # The 4x4 patch grid (56 px) becomes 2x2 (28 px) as DINOv2 itself resizes it, which is what the
    # reference trainer's encoder computes at such a size (not timm's antialiased resize).
    want = _dinov2_runtime_pos_embed(source.pos_embed.detach(), 2)
    torch.testing.assert_close(enc.model.pos_embed.detach(), want)
    antialiased = F.interpolate(source.pos_embed.detach()[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2),
                                size=(2, 2), mode="bicubic", antialias=True)
    assert (antialiased.permute(0, 2, 3, 1).reshape(1, 4, 32) - want[:, 1:]).abs().max() > 1e-3  # tells them apart
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.isfinite(enc.encode(_frames(1, 1))).all()


def test_register_weights_resampled_from_the_original_layout(tmp_path):
    # The original register checkpoints keep the class entry in pos_embed (timm folds it into cls_token).
    source = _tiny_vit("vit_small_patch14_reg4_dinov2", seed=6)
    original = _to_original_dinov2(source.state_dict(), reg_tokens=True)
    path = tmp_path / "dino_reg.pth"
    torch.save(original, str(path))
    enc = DinoEncoder("dinov2_vits14_reg4", 28, weights=path, model_kwargs=TINY)
    # the register family's rule (antialiased, output size), which differs from the other family's here
    want = _dinov2_runtime_pos_embed(original["pos_embed"], 2, registers=True)
    other = _dinov2_runtime_pos_embed(original["pos_embed"], 2)
    assert (want - other).abs().max() > 1e-3
    torch.testing.assert_close(enc.model.pos_embed.detach(), want[:, 1:])
    torch.testing.assert_close(enc.model.cls_token.detach(), original["cls_token"] + want[:, :1])


@pytest.mark.parametrize("checkpoint", ["shallower", "narrower"])
def test_mismatched_weights_leave_the_wrapped_model_untouched(tmp_path, checkpoint):
    model = _tiny_vit(seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = _tiny_vit(seed=7, depth=1) if checkpoint == "shallower" else _tiny_vit(seed=7, embed_dim=16)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), str(path))
    what = "missing keys \\['blocks.1" if checkpoint == "shallower" else "shape mismatches \\['cls_token: file"
    with pytest.raises(ValueError, match=f"weights file .*other.pth' does not match the model.*{what}"):
        DinoEncoder(model=model, weights=path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was copied in


def test_a_cast_keeps_the_pixel_statistics_and_dtype_follows_the_weights():
    # A parent module's cast (e.g. .to(torch.bfloat16)) reaches the encoder: it then runs in bf16,
    # but the ImageNet statistics stay float32 (rounding them would shift every input pixel).
    model = _tiny_vit()
    enc = DinoEncoder(model=model, dtype=torch.float32)
    enc.to(torch.bfloat16)
    assert enc.dtype == enc.compute_dtype() == torch.bfloat16 and "dtype=torch.bfloat16" in repr(enc)
    assert enc.pixel_mean.dtype == enc.pixel_std.dtype == torch.float32
    torch.testing.assert_close(enc.pixel_mean, MEAN, rtol=0, atol=0)
    torch.testing.assert_close(enc.pixel_std, STD, rtol=0, atol=0)
    frames = _frames(1, 2, 56, 56)
    x = ((frames.reshape(2, 3, 56, 56) - MEAN) / STD).to(torch.bfloat16)
    with torch.no_grad():
        want = model.forward_features(x)[:, 1:].float().reshape(1, 2, 16, 32)
    torch.testing.assert_close(enc.encode(frames), want, rtol=0, atol=0)


def test_an_outer_autocast_does_not_change_the_encoder_dtype():
    """The encoder runs in its weights' dtype (fixed when built), whatever a training step autocasts to."""
    enc = DinoEncoder(model=_tiny_vit(), dtype=torch.float32)
    frames = _frames(1, 2)
    want = enc.encode(frames)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(enc.encode(frames), want)
        x = torch.randn(2, 3)
        assert (x @ x.T).dtype == torch.bfloat16  # the autocast is on around the call, and still on after it


def _empty_caches(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    hf = tmp_path / "hf"
    hub = tmp_path / "torch_hub"
    hf.mkdir()
    hub.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hf, hub


def test_missing_weights_are_reported_before_the_model_is_built(tmp_path, monkeypatch):
    # building a ViT-g takes tens of seconds and gigabytes: a missing file must not cost that first
    import timm

    _empty_caches(monkeypatch, tmp_path)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built before the weights were found"))
    with pytest.raises(FileNotFoundError, match="weights file .*missing.pth' does not exist"):
        DinoEncoder("dinov2_vitg14", 518, weights=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="no local weights for 'vit_giant_patch14_dinov2'"):
        DinoEncoder("dinov2_vitg14", 518)


def test_weights_from_hf_cache_only_if_cached(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    hf, _ = _empty_caches(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="no local weights for 'vit_small_patch14_dinov2'"):
        DinoEncoder("dinov2_vits14", 56, model_kwargs=TINY)
    # Lay the file out the way huggingface_hub caches `timm/vit_small_patch14_dinov2.lvd142m`.
    repo = hf / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    source = _tiny_vit(seed=6)
    save_file(source.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    enc = DinoEncoder("dinov2_vits14", 56, model_kwargs=TINY)
    frames = _frames(1, 1)
    torch.testing.assert_close(enc.encode(frames), DinoEncoder(model=source).encode(frames))


def test_weights_from_torch_hub_cache(tmp_path, monkeypatch):
    _, hub = _empty_caches(monkeypatch, tmp_path)
    (hub / "checkpoints").mkdir()
    source = _tiny_vit("vit_small_patch14_reg4_dinov2", seed=7)
    torch.save(_to_original_dinov2(source.state_dict(), reg_tokens=True),
               str(hub / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth"))
    enc = DinoEncoder("dinov2_vits14_reg4", 56, model_kwargs=TINY)
    frames = _frames(1, 1)
    torch.testing.assert_close(enc.encode(frames), DinoEncoder(model=source).encode(frames), rtol=1e-5, atol=1e-5)


def test_encoder_errors(tmp_path):
    model = _tiny_vit()
    for bad in (50, 0, -14):
        with pytest.raises(ValueError, match=f"image_size must be a positive multiple of 14, got {bad}"):
            DinoEncoder("dinov2_vits14", bad, weights="random", model_kwargs=TINY)
    with pytest.raises(TypeError, match="image_size must be an int"):
        DinoEncoder("dinov2_vits14", "518", weights="random")
    with pytest.raises(ValueError, match="image_size=28 does not match the wrapped model's input size"):
        DinoEncoder(model=model, image_size=28)
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer"):
        DinoEncoder(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model_kwargs only applies"):
        DinoEncoder(model=model, model_kwargs={"depth": 1})
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        DinoEncoder("dinov2_vits14", weights="random", model_kwargs=[1])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="frames_batch_size must be a positive int or None"):
            DinoEncoder(model=model, frames_batch_size=bad)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        DinoEncoder(model=model, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype or one of 'auto', 'float32', "
                                         "'bfloat16', 'float16', 'fp32', 'bf16', 'fp16', got 'fp8'"):
        DinoEncoder(model=model, dtype="fp8")
    with pytest.raises(ValueError, match="device must name a device .*got 'gpu0'"):
        DinoEncoder(model=model, device="gpu0")
    with pytest.raises(TypeError, match="device must be a str, int, torch.device or None, got float"):
        DinoEncoder(model=model, device=1.5)
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
        DinoEncoder(model=model, device="cuda")
    with pytest.raises(TypeError, match="weights must be a path, 'random' or None, got int"):
        DinoEncoder(model=model, weights=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DinoEncoder("dinov2_vits14", 56, weights=tmp_path / "missing.pth", model_kwargs=TINY)
    wrong = tmp_path / "wrong.pth"
    torch.save({"not_a_vit.weight": torch.zeros(3)}, str(wrong))
    with pytest.raises(ValueError, match="does not match the model"):
        DinoEncoder("dinov2_vits14", 56, weights=wrong, model_kwargs=TINY)
    with pytest.raises(ValueError, match="model_kwargs img_size=28 disagrees with image_size=56"):
        DinoEncoder("dinov2_vits14", 56, weights="random", model_kwargs={**TINY, "img_size": 28})
    for same in (56, (56, 56), [56, 56]):  # agreeing spellings are fine
        assert DinoEncoder("dinov2_vits14", 56, weights="random", model_kwargs={**TINY, "img_size": same}).grid == (4, 4)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], str(not_dict))
    with pytest.raises(ValueError, match="does not hold a state dict"):
        DinoEncoder("dinov2_vits14", 56, weights=not_dict, model_kwargs=TINY)

    enc = DinoEncoder(model=model)
    with pytest.raises(TypeError, match="frames must be a torch.Tensor"):
        enc.encode([1, 2])
    with pytest.raises(ValueError, match=r"frames must be \(B, T, C, H, W\), got shape \(3, 56, 56\)"):
        enc.encode(torch.rand(3, 56, 56))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        enc.encode(torch.rand(1, 2, 1, 56, 56))
    with pytest.raises(TypeError, match="frames must be floating point"):
        enc.encode(torch.zeros(1, 1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match="frames are on meta but the encoder weights are on cpu"):
        enc.encode(torch.empty(1, 1, 3, 56, 56, device="meta"))
    # empty clips and frames without pixels, as the VAE adapter refuses empty latents (F.interpolate
    # would otherwise be the first to notice, without naming frames)
    for shape in ((1, 0, 3, 56, 56), (0, 2, 3, 56, 56), (1, 2, 3, 0, 56), (1, 2, 3, 56, 0)):
        with pytest.raises(ValueError, match=r"frames is empty: shape \(" + ", ".join(map(str, shape))):
            enc.encode(torch.rand(*shape))


@pytest.mark.gpu
def test_cuda_runs_bf16_with_float32_output():
    model = _tiny_vit()
    frames = _frames(2, 3)
    reference = DinoEncoder(model=_tiny_vit(), dtype=torch.float32).encode(frames)
    enc = DinoEncoder(model=model, device="cuda")
    assert _weights_dtypes(enc) == {torch.bfloat16}  # cast at construction, before any encode
    before = _tensor_identities(enc)
    out = enc.encode(frames.cuda())
    assert _tensor_identities(enc) == before
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    # No device given on a CUDA machine: bf16 weights too, left on the CPU until moved.
    assert _weights_dtypes(DinoEncoder(model=_tiny_vit())) == {torch.bfloat16}
    cos = F.cosine_similarity(out.cpu().flatten(0, 2), reference.flatten(0, 2), dim=-1)
    assert cos.min() > 0.98


# ------------------------------------------------------------------------------------------------------------
# VAE adapters
# ------------------------------------------------------------------------------------------------------------

WAN_MEAN = [0.3, -0.5, 1.2, 0.0]
WAN_STD = [1.5, 0.5, 2.0, 0.8]


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _wan(diffusers, **kw):
    torch.manual_seed(10)
    args = dict(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True], latents_mean=WAN_MEAN, latents_std=WAN_STD)
    args.update(kw)
    return diffusers.AutoencoderKLWan(**args).eval()


def _ltx(diffusers, timestep_conditioning=False, scaling_factor=2.0, inject_noise=False):
    return tiny_ltx_vae(timestep_conditioning, scaling_factor, inject_noise)


def _hunyuan(diffusers, scaling_factor=0.476986):
    torch.manual_seed(13)
    return diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, scaling_factor=scaling_factor,
    ).eval()


def _latents(c, t=3, b=2, hw=4, seed=14):
    return torch.randn(b, c, t, hw, hw, generator=torch.Generator().manual_seed(seed))


def _to_frames(video):
    """diffusers output (B, C, T, H, W) in [-1, 1] -> (B, T, C, H, W) in [0, 1]."""
    return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


def test_family_detection(diffusers):
    assert adapter_for(_wan(diffusers)).family == "wan"
    assert adapter_for(_wan(diffusers), family="sanavideo").family == "sanavideo"
    assert adapter_for(_ltx(diffusers)).family == "ltxvideo"
    assert adapter_for(_hunyuan(diffusers)).family == "kandinsky5_video"

    class MyWan(diffusers.AutoencoderKLWan):
        pass

    assert adapter_for(MyWan(base_dim=3, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                             latents_mean=WAN_MEAN, latents_std=WAN_STD)).family == "wan"


def test_adapter_errors(diffusers):
    with pytest.raises(TypeError, match="unsupported VAE class Linear; supported classes: AutoencoderKLWan, "
                                        "AutoencoderKLLTXVideo, AutoencoderKLHunyuanVideo"):
        adapter_for(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unsupported VAE class AutoencoderKL;"):
        drop_encoder(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2))
    with pytest.raises(ValueError, match="family='ltxvideo' expects a AutoencoderKLLTXVideo, but the VAE is a "
                                         "AutoencoderKLWan"):
        adapter_for(_wan(diffusers), family="ltxvideo")
    with pytest.raises(ValueError, match="family must be one of .*got 'cogvideox'"):
        adapter_for(_wan(diffusers), family="cogvideox")
    with pytest.raises(ValueError, match="latents_mean / latents_std must each have z_dim=4 entries, got 16 and 16"):
        adapter_for(_wan(diffusers, latents_mean=[0.0] * 16, latents_std=[1.0] * 16))

    adapter = adapter_for(_wan(diffusers))
    with pytest.raises(TypeError, match="latents must be a torch.Tensor"):
        adapter.decode("z")
    with pytest.raises(ValueError, match=r"latents must be \(B, C, T, h, w\), got shape \(4, 3, 4, 4\)"):
        adapter.decode(torch.randn(4, 3, 4, 4))
    with pytest.raises(ValueError, match="latents must have 4 channels at dim 1"):
        adapter.decode(torch.randn(1, 3, 4, 4, 4))
    with pytest.raises(TypeError, match="latents must be floating point"):
        adapter.decode(torch.zeros(1, 4, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="timestep must be None, a float or a tensor, got str"):
        adapter.decode(_latents(4, t=1), timestep="0.1")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="latent_frames must be a positive int"):
            adapter.pixel_frames(bad)
    ltx = adapter_for(_ltx(diffusers, timestep_conditioning=True))
    with pytest.raises(ValueError, match=r"timestep must hold 1 or B=2 values, got shape \(3,\)"):
        ltx.decode(_latents(8), timestep=torch.zeros(3))
    with pytest.raises(ValueError, match="latents are on meta but the VAE runs on cpu"):
        adapter.decode(torch.empty(1, 4, 1, 4, 4, device="meta"))
    # LTX-Video and Kandinsky 5 latents are divided by the config's scaling factor (SPEC section 7): one
    # that is missing, 0, negative or not finite is refused, not read as 1.
    for bad in (None, 0.0, -0.5, float("inf"), float("nan")):
        for make in (_ltx, _hunyuan):
            with pytest.raises(ValueError, match=f"vae.config.scaling_factor must be a positive finite number "
                                                 f"for a {make(diffusers).__class__.__name__}.*got {bad!r}"):
                adapter_for(make(diffusers, scaling_factor=bad))
    # The adapter class itself checks what adapter_for checks.
    with pytest.raises(TypeError, match="vae: unsupported class Linear"):
        VaeAdapter(torch.nn.Linear(2, 2), "wan")
    with pytest.raises(ValueError, match="family='ltxvideo' expects a AutoencoderKLLTXVideo"):
        VaeAdapter(_wan(diffusers), "ltxvideo")
    with pytest.raises(ValueError, match="family must be one of"):
        VaeAdapter(_wan(diffusers), None)


def test_a_vae_with_layerwise_casting_decodes_in_its_compute_dtype(diffusers):
    """diffusers' layerwise casting stores the weights in float8 and computes in another dtype: the
    latents go in that compute dtype (vae.dtype, as its pipelines cast them), not the storage one."""
    plain, cast = _wan(diffusers), _wan(diffusers)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert next(cast.parameters()).dtype == torch.float8_e4m3fn
    adapter = adapter_for(cast)
    z = _latents(4, t=1)
    assert adapter.denormalize(z).dtype == torch.float32
    out = adapter.decode(z)
    # the same frames as the plain VAE's, up to the float8 storage of the weights
    assert torch.isfinite(out).all() and (out - adapter_for(plain).decode(z)).abs().max() < 0.2


def test_a_vae_offloaded_by_hooks_takes_latents_on_its_execution_device(diffusers):
    """Under diffusers' or accelerate's offloading the weights sit on the CPU (or meta) and a hook moves
    them before each forward: the latents must be on the hook's device, not the weights'."""
    vae = _wan(diffusers)
    vae.decoder._hf_hook = types.SimpleNamespace(execution_device="meta")  # an accelerate-style hook
    adapter = adapter_for(vae)
    with pytest.raises(ValueError, match="latents are on cpu but the VAE runs on meta"):
        adapter.decode(_latents(4, t=1))


def test_the_decode_timestep_is_checked_before_the_decode(diffusers):
    ltx = adapter_for(_ltx(diffusers, timestep_conditioning=True))
    z = _latents(8, t=1)
    for bad in (float("nan"), 500.0, -0.1, torch.tensor([0.5, float("nan")]), torch.tensor(2.0)):
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 1\]"):
            ltx.decode(z, timestep=bad)
    with pytest.raises(TypeError, match="timestep must be a float .* tensor, got dtype torch.bool"):
        ltx.decode(z, timestep=torch.tensor(True))
    assert ltx.decode(z, timestep=torch.tensor(1)).shape[0] == 2  # an int tensor in range is a timestep


def test_an_outer_autocast_does_not_change_the_decode(diffusers):
    adapter = adapter_for(_wan(diffusers))
    z = _latents(4, t=2)
    want = adapter.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(adapter.decode(z), want)


def test_a_noise_injecting_ltx_decoder_decodes_deterministically_and_leaves_the_rng_alone(diffusers, monkeypatch):
    """LTX-Video 0.9.1's decoder adds torch.randn noise in some blocks (diffusers passes no generator):
    the adapter draws it from a fixed seed in a forked RNG."""
    from crepa_kernels.teacher import vae as vae_module

    vae = _ltx(diffusers, timestep_conditioning=True, inject_noise=True)
    with torch.no_grad():  # trained 0.9.1 weights have non-zero noise scales; fresh ones start at zero
        for name, p in vae.named_parameters():
            if "per_channel_scale" in name:
                p.fill_(1.0)
    adapter = adapter_for(vae)
    assert adapter.injects_noise and not adapter_for(_ltx(diffusers, timestep_conditioning=True)).injects_noise
    z = _latents(8, t=1, b=1)
    state = torch.get_rng_state()
    first = adapter.decode(z, timestep=0.05)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is where it was
    torch.rand(3)  # moving the caller's stream changes nothing
    assert torch.equal(adapter.decode(z, timestep=0.05), first)
    monkeypatch.setattr(vae_module, "DECODE_NOISE_SEED", 1)
    assert (adapter.decode(z, timestep=0.05) - first).abs().max() > 1e-3  # the noise is there, and seeded


def test_wan_decode_matches_manual_denormalisation(diffusers):
    vae = _wan(diffusers)
    adapter = adapter_for(vae)
    assert adapter.temporal_compression == 4 and adapter.spatial_compression == 8
    assert [adapter.pixel_frames(t) for t in (1, 2, 3)] == [1, 5, 9]
    z = _latents(4)
    out = adapter.decode(z)
    assert out.shape == (2, adapter.pixel_frames(3), 3, 32, 32) == (2, 9, 3) + adapter.pixel_size(4, 4)
    assert out.min() >= 0 and out.max() <= 1
    mean = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = _to_frames(vae.decode(z * std + mean).sample)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # The statistics matter: decoding the raw latents gives something else.
    with torch.no_grad():
        assert (out - _to_frames(vae.decode(z).sample)).abs().max() > 1e-3



def test_wan22_style_patchified_vae(diffusers):
    # Wan 2.2: residual blocks and a 2x2 output patch, so 16x spatial compression (the architecture decides).
    vae = _wan(diffusers, base_dim=8, is_residual=True, patch_size=2, in_channels=12, out_channels=12)
    adapter = adapter_for(vae)
    assert adapter.spatial_compression == 16 and adapter.temporal_compression == 4
    z = _latents(4, t=2, b=1)
    out = adapter.decode(z)
    assert out.shape == (1, 5, 3, 64, 64)
    mean = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = _to_frames(vae.decode(z * std + mean).sample)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

def test_ltx_decode_matches_manual_denormalisation(diffusers):
    vae = _ltx(diffusers)
    adapter = adapter_for(vae)
    assert not adapter.timestep_conditioning
    z = _latents(8)
    out = adapter.decode(z)
    assert out.shape == (2, adapter.pixel_frames(3), 3, 16, 16) == (2, 9, 3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1
    manual = z * vae.latents_std.view(1, 8, 1, 1, 1) / 2.0 + vae.latents_mean.view(1, 8, 1, 1, 1)
    with torch.no_grad():
        expected = _to_frames(vae.decode(manual).sample)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # A timestep given to a decoder without timestep conditioning is ignored (as diffusers' pipelines do).
    torch.testing.assert_close(adapter.decode(z, timestep=0.5), out)


def test_ltx_timestep_conditioned_decoding(diffusers):
    vae = _ltx(diffusers, timestep_conditioning=True)
    adapter = adapter_for(vae)
    assert adapter.timestep_conditioning
    z = _latents(8)
    manual = z * vae.latents_std.view(1, 8, 1, 1, 1) / 2.0 + vae.latents_mean.view(1, 8, 1, 1, 1)
    with torch.no_grad():
        at_zero = _to_frames(vae.decode(manual, temb=torch.zeros(2)).sample)
        at_07 = _to_frames(vae.decode(manual, temb=torch.full((2,), 0.7)).sample)
        mixed = _to_frames(vae.decode(manual, temb=torch.tensor([0.0, 0.7])).sample)
    torch.testing.assert_close(adapter.decode(z), at_zero, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.decode(z, timestep=0.7), at_07, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.decode(z, timestep=torch.tensor(0.7)), at_07, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.decode(z, timestep=torch.tensor([0.0, 0.7])), mixed, rtol=1e-5, atol=1e-6)
    assert (at_zero - at_07).abs().max() > 1e-4  # the timestep reaches the decoder
    # Sliced decoding pairs each latent with its own timestep.
    vae.use_slicing = True
    torch.testing.assert_close(adapter.decode(z, timestep=torch.tensor([0.0, 0.7])), mixed, rtol=1e-5, atol=1e-5)


def test_hunyuan_decode_matches_manual_denormalisation(diffusers):
    vae = _hunyuan(diffusers, scaling_factor=0.25)
    adapter = adapter_for(vae)
    z = _latents(4) * 0.1
    out = adapter.decode(z)
    assert out.shape == (2, adapter.pixel_frames(3), 3, 32, 32) == (2, 9, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        expected = _to_frames(vae.decode(z / 0.25).sample)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", ["wan", "ltx", "hunyuan"])
def test_drop_encoder_frees_parameters_and_keeps_decoding(diffusers, make):
    vae = {"wan": _wan, "ltx": _ltx, "hunyuan": _hunyuan}[make](diffusers)
    adapter = adapter_for(vae)
    c = adapter.latent_channels
    z = _latents(c, t=2, b=1)
    before = adapter.decode(z).clone()
    encoder_params = sum(p.numel() for p in vae.encoder.parameters())
    quant = getattr(vae, "quant_conv", None)
    encoder_params += sum(p.numel() for p in quant.parameters()) if quant is not None else 0
    total = sum(p.numel() for p in vae.parameters())
    assert encoder_params > 0
    assert adapter.drop_encoder() == encoder_params
    assert vae.encoder is None
    assert sum(p.numel() for p in vae.parameters()) == total - encoder_params
    assert drop_encoder(vae) == 0  # idempotent
    torch.testing.assert_close(adapter.decode(z), before)


def test_drop_encoder_refuses_a_vae_an_offload_manager_packed(diffusers):
    from crepa_kernels.teacher.offload import OffloadManager

    vae = _wan(diffusers).requires_grad_(False)
    manager = OffloadManager("offload", emulate_device=True)
    with manager.use(vae):
        pass
    host_bytes = manager.stats.host_bytes
    with pytest.raises(RuntimeError, match="packed by an offload manager, so dropping its encoder would free"):
        drop_encoder(vae)
    assert vae.encoder is not None and manager.stats.host_bytes == host_bytes
    manager.unregister(vae)
    assert drop_encoder(vae) > 0 and vae.encoder is None
    with manager.use(vae):  # packed again, now without an encoder: nothing to drop, nothing refused
        pass
    assert drop_encoder(vae) == 0


def _conv3d_weights(vae):
    return [p for p in vae.parameters() if p.dim() == 5]


@pytest.mark.parametrize("make", ["wan", "ltx", "hunyuan"])
def test_channels_last_3d_relays_only_conv3d_weights_and_decodes_the_same(diffusers, make):
    vae = {"wan": _wan, "ltx": _ltx, "hunyuan": _hunyuan}[make](diffusers).requires_grad_(False)
    adapter = adapter_for(vae)
    z = _latents(adapter.latent_channels, t=2, b=1)
    before = adapter.decode(z).clone()
    others = {name: (p.shape, p.stride()) for name, p in vae.named_parameters() if p.dim() != 5}
    values = {name: p.detach().clone() for name, p in vae.named_parameters()}
    # (a kernel with one input channel and a 1x1x1 window is already both layouts)
    n = sum(not p.is_contiguous(memory_format=torch.channels_last_3d) for p in _conv3d_weights(vae))
    assert n > 0
    assert channels_last_3d(vae) == n
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in _conv3d_weights(vae))
    assert {name: (p.shape, p.stride()) for name, p in vae.named_parameters() if p.dim() != 5} == others
    for name, p in vae.named_parameters():
        assert torch.equal(p, values[name]), name  # the layout changes, not one value
    assert channels_last_3d(vae) == 0  # idempotent
    # On the CPU the same convolution runs in the other layout: equal up to fp32 rounding.
    torch.testing.assert_close(adapter.decode(z), before, rtol=1e-5, atol=1e-6)


def test_channels_last_3d_refuses_a_packed_vae_and_survives_offload(diffusers):
    from crepa_kernels.teacher.offload import OffloadManager

    vae = _wan(diffusers).requires_grad_(False)
    adapter = adapter_for(vae)
    z = _latents(adapter.latent_channels, t=2, b=1)
    before = adapter.decode(z).clone()
    manager = OffloadManager("offload", emulate_device=True)
    with manager.use(vae):
        pass
    with pytest.raises(RuntimeError, match="packed by an offload manager, so its weights cannot change layout"):
        channels_last_3d(vae)
    assert not all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in _conv3d_weights(vae))
    assert manager.stats.host_bytes > 0  # refused: still packed, layout unchanged
    manager.unregister(vae)
    assert channels_last_3d(vae) > 0
    # Packed again: the layout holds in host RAM, on the device while in use, and after.
    for _ in range(2):
        with manager.use(vae):
            assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in _conv3d_weights(vae))
            torch.testing.assert_close(adapter.decode(z), before, rtol=1e-5, atol=1e-6)
        assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in _conv3d_weights(vae))
    assert channels_last_3d(vae) == 0  # packed, but nothing to change: no error


def test_channels_last_3d_names_an_unsupported_module():
    with pytest.raises(TypeError, match="unsupported VAE class Conv3d"):
        channels_last_3d(torch.nn.Conv3d(2, 2, 3))


# ------------------------------------------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "total, keep, expected",
    [(9, 3, [0, 4, 8]), (9, 4, [0, 2, 5, 8]), (5, 8, [0, 1, 2, 3, 4]), (5, 5, [0, 1, 2, 3, 4]), (7, 1, [0])],
)
def test_kept_frame_indices(total, keep, expected):
    assert kept_frame_indices(total, keep) == expected
    if total > keep:
        assert expected == torch.linspace(0, total - 1, keep).long().tolist()  # SPEC section 1's definition


def test_kept_frame_indices_round_in_float32_whatever_the_default_dtype():
    # Truncating linspace(0, 16, 15) keeps other frames in float64 than in float32 (a position that
    # is a whole number in exact arithmetic lands just below it in one of them). The loss's alignment
    # (SPEC section 1) uses float32, so the teacher must too.
    from crepa_kernels.reference import temporal_indices

    want = torch.linspace(0, 16, 15, dtype=torch.float32).long().tolist()
    assert want != torch.linspace(0, 16, 15, dtype=torch.float64).long().tolist()  # the case matters
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert kept_frame_indices(17, 15) == want == temporal_indices(17, 15).tolist()
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("num_frames", [3, 4, 9, 20])
def test_latents_to_features_pruned_equals_encode_all_then_subsample(diffusers, num_frames):
    adapter = adapter_for(_wan(diffusers))
    encoder = DinoEncoder(model=_tiny_vit(img_size=28))
    z = _latents(4, t=3)
    features, grid = latents_to_features(z, adapter, encoder, num_frames=num_frames)
    everything = encoder.encode(adapter.decode(z))
    assert everything.shape == (2, 9, 4, 32)
    t_pix = everything.shape[1]
    if t_pix > num_frames:
        expected = everything[:, torch.linspace(0, t_pix - 1, num_frames).long()]
    else:
        expected = everything
    assert grid == (2, 2)
    assert features.shape == expected.shape == (2, min(num_frames, 9), 4, 32)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_latents_to_features_ltx_timestep_and_contexts(diffusers):
    adapter = adapter_for(_ltx(diffusers, timestep_conditioning=True))
    encoder = DinoEncoder(model=_tiny_vit(img_size=28))
    z = _latents(8, t=2)
    events = []

    class Marker:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    features, grid = latents_to_features(z, adapter, encoder, num_frames=2, timestep=0.3,
                                         vae_context=lambda: Marker("vae"), encoder_context=lambda: Marker("enc"))
    assert events == ["enter vae", "exit vae", "enter enc", "exit enc"]
    expected = encoder.encode(adapter.decode(z, timestep=0.3))[:, [0, 4]]
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_latents_to_features_errors(diffusers):
    adapter = adapter_for(_wan(diffusers))
    encoder = DinoEncoder(model=_tiny_vit(img_size=28))
    z = _latents(4, t=1, b=1)
    with pytest.raises(TypeError, match="vae_adapter must be a VaeAdapter"):
        latents_to_features(z, _wan(diffusers), encoder, num_frames=1)
    with pytest.raises(TypeError, match="encoder must be a DinoEncoder"):
        latents_to_features(z, adapter, encoder.model, num_frames=1)
    for bad in (0, -3, 2.0, None):
        with pytest.raises(ValueError, match="num_frames must be a positive int"):
            latents_to_features(z, adapter, encoder, num_frames=bad)
    with pytest.raises(TypeError, match="encoder_context must be a callable"):
        latents_to_features(z, adapter, encoder, num_frames=1, encoder_context=object())
    entered = []  # bad latents are refused before a context could move a module to the device
    with pytest.raises(ValueError, match="latents must have 4 channels"):
        latents_to_features(torch.randn(1, 16, 1, 4, 4), adapter, encoder, num_frames=1,
                            vae_context=lambda: entered.append("vae"))
    # so is a bad timestep, even for a VAE that ignores it
    for bad, exc, match in ((2.0, ValueError, r"timestep must be in \[0, 1\]"),
                            ("0.5", TypeError, "timestep must be None, a float or a tensor"),
                            (torch.tensor([0.1, 0.2, 0.3]), ValueError, "timestep must hold 1 or B=1 values")):
        with pytest.raises(exc, match=match):
            latents_to_features(z, adapter, encoder, num_frames=1, timestep=bad,
                                vae_context=lambda: entered.append("vae"))
    assert entered == []
    # a factory that returns something else than a context manager is named, before its module's work
    decodes = []
    real_decode = adapter.decode
    adapter.decode = lambda *a, **k: decodes.append(1) or real_decode(*a, **k)
    with pytest.raises(TypeError, match="vae_context must return a context manager .*got AutoencoderKLWan"):
        latents_to_features(z, adapter, encoder, num_frames=1, vae_context=lambda: adapter.vae)
    assert decodes == []
    with pytest.raises(TypeError, match="encoder_context must return a context manager .*got DinoEncoder"):
        latents_to_features(z, adapter, encoder, num_frames=1, encoder_context=lambda: encoder)
    assert isinstance(adapter, VaeAdapter)


def test_a_timestep_tensor_is_read_once_and_decodes_as_given(diffusers):
    # latents_to_features checks the timestep before any context is entered; the decode gets its values
    # from that one read, and decodes exactly as with the tensor itself.
    adapter = adapter_for(_ltx(diffusers, timestep_conditioning=True))
    encoder = DinoEncoder(model=_tiny_vit(img_size=28))
    z = _latents(8, t=2)
    t = torch.tensor([0.25, 0.7], dtype=torch.bfloat16)
    features, _ = latents_to_features(z, adapter, encoder, num_frames=2, timestep=t)
    expected = encoder.encode(adapter.decode(z, timestep=t))[:, [0, 4]]
    assert torch.equal(features, expected)
    checked = adapter._check_timestep(t, 2)
    assert checked.device.type == "cpu" and checked.dtype == torch.float64 and checked.tolist() == [0.25, 0.69921875]


def test_package_imports_without_diffusers():
    # The teacher modules must not import diffusers at import time (the GPU image lacks it).
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'diffusers' or name.startswith('diffusers.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import crepa_kernels.teacher\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_wrapped_vit_with_dynamic_image_size_runs_at_another_size():
    # the size-mismatch error's own advice: a model built with dynamic_img_size=True takes image_size
    model = _tiny_vit(img_size=56, dynamic_img_size=True)
    enc = DinoEncoder(model=model, image_size=28)
    frames = _frames(b=1, t=2, h=28, w=28)
    with torch.no_grad():
        want = model.forward_features((frames.flatten(0, 1) - MEAN) / STD)[:, 1:]
    assert enc.grid == (2, 2)
    torch.testing.assert_close(enc.encode(frames), want.reshape(1, 2, 4, -1))
