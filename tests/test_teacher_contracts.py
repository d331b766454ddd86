"""Contracts of the teacher (SPEC section 7, the module docstrings) that the other teacher tests leave open.

Each test pins a documented behaviour of crepa_kernels/teacher/. Expectations come from SPEC / README / the
docstrings, computed here independently (never read back from the code under test).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from crepa_kernels.teacher import DinoEncoder, adapter_for, resolve_encoder_name
from crepa_kernels.teacher import cache as cache_mod
from crepa_kernels.teacher.cache import FeatureCache
from crepa_kernels.teacher.offload import OffloadManager, module_nbytes

from test_offload import X, Toy, fail_allocations, storages  # the offload tests' toy module (mixed dtypes, tied weights, ...)

BASE = dict(encoder_name="vit_giant_patch14_dinov2", encoder_weights="timm/vit_giant_patch14_dinov2.lvd142m@abc",
            image_size=518, num_frames=16, vae="Wan-AI/Wan2.1-T2V-1.3B/vae@def", dtype=torch.float32)


# ================================================================================================ offload
def test_a_failed_bring_in_leaves_the_module_idle_and_manageable(monkeypatch):
    # "Everything that can fail happens before any state changes": after use() fails to bring a module
    # in, the module is not "in use" (it can be evicted and unregistered), and the next use in "offload"
    # mode drops its device copy as it ends.
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy):
        pass

    fail_allocations(monkeypatch, m)
    with pytest.raises(torch.OutOfMemoryError):
        with m.use(toy):
            pass
    monkeypatch.undo()
    with m.use(toy) as used:
        assert torch.equal(used(X), Toy()(X))
    assert not m.is_resident(toy) and m.stats.resident_bytes == 0
    m.prefetch(toy)
    assert m.evict(toy) is True  # not refused as "inside manager.use()"
    m.unregister(toy)


def test_a_prefetch_skips_only_for_lack_of_memory(monkeypatch):
    # "a prefetch the device has no memory for is skipped": any other failure of the copy (a CUDA error,
    # say) is raised, not counted as a skipped prefetch.
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)

    def broken(slot):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(m, "_allocate", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        m.prefetch(toy)
    assert m.stats.prefetches_skipped == 0 and not m.is_resident(toy)


def test_resident_mode_never_evicts_a_module_to_make_room():
    # "resident": a module stays on the device after its first use. Only "auto" frees idle modules
    # when memory runs short; a resident manager keeps both, whatever the memory probe says.
    a, b = Toy(0), Toy(1)
    m = OffloadManager("resident", margin_bytes=0, memory_probe=lambda: 0, emulate_device=True)
    with m.use(a):
        pass
    with m.use(b) as used:
        assert torch.equal(used(X), Toy(1)(X))
    assert m.is_resident(a) and m.is_resident(b)
    assert m.stats.evictions == 0 and m.stats.releases == 0


def test_auto_does_not_evict_when_exactly_the_room_needed_is_free():
    # "auto" evicts idle modules only "when memory is short": free < size + margin. With exactly
    # size + margin free the module is brought in without dropping anything (the same boundary as a
    # prefetch, which copies at exactly the room it needs).
    a, b = Toy(0), Toy(1)
    size, margin = module_nbytes(b), 64
    free = {"bytes": 10**12}
    m = OffloadManager("auto", margin_bytes=margin, memory_probe=lambda: free["bytes"], emulate_device=True)
    with m.use(a):
        pass
    assert m.is_resident(a)
    free["bytes"] = size + margin
    with m.use(b):
        assert m.is_resident(a) and m.is_resident(b)
    assert m.stats.evictions == 0


def test_auto_out_of_memory_frees_every_idle_module_before_it_retries(monkeypatch):
    # "auto" frees its idle modules and tries again when an allocation fails (the memory probe said it
    # would fit): where the device holds one module's copy at a time, two idle ones must both go.
    a, b, c = Toy(0), Toy(1), Toy(2)
    m = OffloadManager("auto", margin_bytes=0, memory_probe=lambda: 10**12, emulate_device=True)
    for mod in (a, b):
        with m.use(mod):
            pass
    assert m.is_resident(a) and m.is_resident(b)
    real_empty = torch.empty

    def capped(*args, **kwargs):  # room for one module's device copy
        if kwargs.get("dtype") is torch.uint8 and len(args) == 1 and m.stats.resident_modules >= 1:
            raise torch.OutOfMemoryError("emulated: the device is full")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", capped)
    with m.use(c) as used:
        assert torch.equal(used(X), Toy(2)(X))
    assert not m.is_resident(a) and not m.is_resident(b) and m.is_resident(c)
    assert m.stats.evictions == 2


@pytest.mark.parametrize("mode", ["offload", "auto"])
def test_a_released_module_points_at_its_one_persistent_host_copy(mode):
    # "Releasing a module re-points its tensors at these views" (the pinned host copy made at first
    # contact): after each release the module's tensors live in that same single host buffer, not in
    # the dropped device copy (which would then stay allocated through the module).
    toy = Toy()
    m = OffloadManager(mode, margin_bytes=0, memory_probe=lambda: 0, emulate_device=True)
    seen_host, seen_device = [], []
    for _ in range(3):
        with m.use(toy) as used:
            seen_device.append(storages(used))
        assert not m.is_resident(toy)
        seen_host.append(storages(toy))
    assert all(len(s) == 1 for s in seen_host + seen_device)
    assert seen_host[0] == seen_host[1] == seen_host[2]  # one host buffer, kept across cycles
    assert all(d != seen_host[0] for d in seen_device)  # and it is not a device copy
    assert m.evict(toy) is False  # nothing left on the device


def test_host_copy_bytes_are_counted_once_per_packing():
    # bytes_to_host: "bytes read into the host copies when modules were first packed"
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    for _ in range(3):
        with m.use(toy):
            pass
    assert m.stats.bytes_to_host == module_nbytes(toy) == m.stats.host_bytes
    m.unregister(toy)
    with m.use(toy):  # packed afresh
        pass
    assert m.stats.bytes_to_host == 2 * module_nbytes(toy)


def test_a_module_under_diffusers_group_offloading_is_refused():
    # The module doc: a module carrying a hook that moves its weights at each forward (diffusers'
    # layerwise casting *or group offloading*, accelerate's CPU offload) is refused.
    hooks = pytest.importorskip("diffusers.hooks")
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).requires_grad_(False).eval()
    hooks.apply_group_offloading(net, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                 offload_type="leaf_level")
    m = OffloadManager("offload", emulate_device=True)
    with pytest.raises(ValueError, match="group_offloading.*cannot manage"):
        with m.use(net):
            pass
    assert m.stats.host_bytes == 0


def test_a_trainable_module_is_refused_before_it_is_packed():
    # A trainable module is refused (offloading assumes frozen weights), and refused untouched: its
    # parameters keep their own storage and the manager holds no copy of it.
    from crepa_kernels.teacher.offload import is_managed

    lin = nn.Linear(4, 4)
    ptrs = [p.data_ptr() for p in lin.parameters()]
    m = OffloadManager("offload", emulate_device=True)
    with pytest.raises(ValueError, match="parameter 'weight' requires grad;"):
        m.prefetch(lin)
    assert [p.data_ptr() for p in lin.parameters()] == ptrs
    assert m.stats.bytes_to_host == 0 and m.stats.host_bytes == 0 and not is_managed(lin)


def test_a_tensor_reinterpreted_as_another_dtype_is_refused():
    # "A module changed behind the manager's back (any tensor moved or cast ...) is refused at its next
    # use": a dtype change that keeps the storage (a same-size reinterpretation) is one too.
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy):
        pass
    toy.low.weight.data = toy.low.weight.data.view(torch.float16)  # bf16 -> fp16, same bytes
    with pytest.raises(RuntimeError, match="tensor 'low.weight' was moved or cast"):
        with m.use(toy):
            pass
    assert toy.low.weight.dtype == torch.float16  # not undone


def test_unregister_inside_use_is_refused_and_the_use_goes_on():
    # Like release and evict, unregister is refused inside use(): the body still runs on the device copy.
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy) as used:
        device_storages = storages(used)
        with pytest.raises(RuntimeError, match="cannot unregister it inside manager.use"):
            m.unregister(toy)
        assert m.is_resident(toy) and storages(used) == device_storages
        assert torch.equal(used(X), Toy()(X))
    assert not m.is_resident(toy)


# ================================================================================================= cache
@pytest.fixture
def fc(tmp_path):
    return FeatureCache(tmp_path / "cache")


def test_key_does_not_depend_on_the_order_of_extra_settings():
    # The key hashes *the settings*; a mapping is unordered: {"a": 1, "b": 2} and {"b": 2, "a": 1} are
    # the same settings (e.g. rebuilt from a config in another order), so one key, one entry.
    one = FeatureCache.make_key("s", **BASE, extra={"resize": "bilinear", "tokens": "patch", "crop": 0.5})
    two = FeatureCache.make_key("s", **BASE, extra={"crop": 0.5, "tokens": "patch", "resize": "bilinear"})
    assert one == two


def test_get_refuses_an_entry_whose_header_names_another_key(fc):
    # get: "None when absent (or unreadable, with a warning)"; an entry's header names its key, so a file
    # copied under another key's name serves no other key (as `in` already says).
    import shutil

    fc.put("k1", torch.ones(1, 2, 4, 3), grid=(2, 2))
    os.makedirs(os.path.dirname(fc.path("k2")), exist_ok=True)
    shutil.copy(fc.path("k1"), fc.path("k2"))
    with pytest.warns(UserWarning, match="does not hold key 'k2'"):
        assert fc.get("k2") is None
    assert torch.equal(fc.get("k1").features, torch.ones(1, 2, 4, 3))


def test_an_entry_without_the_features_tensor_is_absent(fc):
    # `in`: "the file exists and its header names the key and holds the features"
    from safetensors.torch import save_file

    path = fc.path("k")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"something_else": torch.ones(3)}, path, metadata={"format": cache_mod.FORMAT, "key": "k"})
    assert "k" not in fc
    with pytest.warns(UserWarning):
        assert fc.get("k") is None


def test_get_returns_the_features_on_the_requested_device(fc):
    # the meta device stands in for a GPU: get(key, device) must hand the tensor over there
    fc.put("k", torch.ones(1, 2, 4, 3), grid=(2, 2))
    got = fc.get("k", device="meta")
    assert got.features.device.type == "meta" and got.features.shape == (1, 2, 4, 3) and got.grid == (2, 2)


def test_a_write_fsyncs_the_file_before_the_rename_and_the_directory_after(fc, monkeypatch):
    # Module doc: the bytes are "flushed and fsynced, then os.replace'd"; the rename itself is made
    # durable by fsyncing the entry's directory.
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "fsync", fsync)
    monkeypatch.setattr(cache_mod.os, "replace", replace)
    fc.put("k", torch.ones(4))
    assert events == ["fsync file", "replace", "fsync dir"]


def test_a_memoised_fingerprint_is_not_served_for_a_rewritten_file(tmp_path, monkeypatch):
    # weights_fingerprint memoises per (path, inode, size, mtime, ctime): new weights written under the
    # same path get their own fingerprint, so cache keys follow the new content (stale features would
    # otherwise be served for the new weights).
    import hashlib

    w = tmp_path / "dino.safetensors"
    w.write_bytes(b"v1" * 2048)
    now = time.time_ns()
    monkeypatch.setattr(cache_mod.time, "time_ns", lambda: now + 10 ** 10)  # the file is old enough to memoise
    first = cache_mod.weights_fingerprint(w)
    assert first == "sha256:" + hashlib.sha256(b"v1" * 2048).hexdigest()
    w.write_bytes(b"v2" * 4096)  # new weights, same path
    assert cache_mod.weights_fingerprint(w) == "sha256:" + hashlib.sha256(b"v2" * 4096).hexdigest()
    assert FeatureCache.make_key("s", **{**BASE, "encoder_weights": w}) != \
        FeatureCache.make_key("s", **{**BASE, "encoder_weights": first})


# ============================================================================================== pipeline
def test_decode_and_encode_run_without_autograd():
    # _decode_and_encode (also the path of a trainer's own decode): "all without autograd", so a decode
    # that is not itself under no_grad keeps no graph (and no activations) alive.
    import test_teacher as tt
    from crepa_kernels.teacher.pipeline import _decode_and_encode

    enc = DinoEncoder(model=tt._tiny_vit(img_size=28), dtype=torch.float32)
    leaf = torch.rand(1, 5, 3, 28, 28, requires_grad=True)
    seen = []

    def decode():
        seen.append(torch.is_grad_enabled())
        return leaf * 1.0

    features, grid = _decode_and_encode(decode, enc, num_frames=3)
    assert seen == [False] and not features.requires_grad and features.grad_fn is None
    assert features.shape == (1, 3, 4, 32) and grid == (2, 2)


def test_only_the_kept_frames_stay_alive_while_the_encoder_runs():
    # The decoder's full clip is dropped once the aligned frames are picked: during the encode only those
    # are held (81 decoded 480 x 832 frames are ~390 MB in float32 next to the encoder's activations).
    import weakref

    import test_teacher as tt
    from crepa_kernels.teacher.pipeline import _decode_and_encode

    enc = DinoEncoder(model=tt._tiny_vit(img_size=28), dtype=torch.float32)
    refs, alive = [], []

    def decode():
        frames = torch.rand(1, 9, 3, 28, 28)
        refs.append(weakref.ref(frames))
        return frames

    class Probe:
        def __enter__(self):
            alive.append(refs[0]() is not None)

        def __exit__(self, *exc):
            return False

    features, _ = _decode_and_encode(decode, enc, num_frames=3, encoder_context=Probe)
    assert alive == [False] and features.shape == (1, 3, 4, 32)


# =================================================================================================== VAE
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def test_a_float_timestep_of_zero_is_the_default_decode_timestep(diffusers):
    # VaeAdapter.decode: `timestep` in [0, 1], default 0.0. A float 0.0 is in range and equals the default.
    import test_teacher as tt  # the teacher tests' tiny VAEs and latents

    adapter = adapter_for(tt._ltx(diffusers, timestep_conditioning=True))
    z = tt._latents(8, t=1)
    torch.testing.assert_close(adapter.decode(z, timestep=0.0), adapter.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(adapter.decode(z, timestep=0), adapter.decode(z), rtol=0, atol=0)


def test_denormalize_returns_the_vae_dtype(diffusers):
    # "Undo the family's training-space normalisation (in float32); returns the VAE's dtype": a bf16 VAE
    # gets bf16 latents (diffusers' pipelines cast to vae.dtype), and decodes them.
    import test_teacher as tt  # the teacher tests' tiny VAEs and latents

    vae = tt._wan(diffusers).to(torch.bfloat16)
    adapter = adapter_for(vae)
    z = tt._latents(4, t=1, b=1)
    mean = torch.tensor(tt.WAN_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(tt.WAN_STD).view(1, 4, 1, 1, 1)
    out = adapter.denormalize(z)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (z * std + mean).to(torch.bfloat16))
    frames = adapter.decode(z)
    assert frames.dtype == torch.bfloat16 and frames.shape == (1, 1, 3, 32, 32) and torch.isfinite(frames.float()).all()


def test_denormalize_computes_in_float32_for_half_precision_latents(diffusers):
    # Kandinsky 5: z / scaling_factor, computed in float32 (denormalize's docstring) even when the training
    # latents arrive in bf16: the same numbers as for the latents upcast first.
    import test_teacher as tt  # the teacher tests' tiny VAEs and latents

    adapter = adapter_for(tt._hunyuan(diffusers, scaling_factor=0.476986))
    z = tt._latents(4, t=1, b=1).to(torch.bfloat16)
    want = z.float() / 0.476986
    assert torch.equal(adapter.denormalize(z), want)
    assert torch.equal(adapter.denormalize(z), adapter.denormalize(z.float()))


def test_wan_statistics_follow_the_latents_device(diffusers):
    # Wan's per-channel statistics are cached per device: latents on a second device (meta stands in for
    # another GPU) get statistics there, not the first device's copy.
    import test_teacher as tt  # the teacher tests' tiny VAEs and latents

    adapter = adapter_for(tt._wan(diffusers))
    z = tt._latents(4, t=1, b=1)
    adapter.denormalize(z)  # CPU statistics built first
    out = adapter.denormalize(z.to("meta"))
    assert out.device.type == "meta" and out.shape == z.shape


# ============================================================================================== encoders
def test_encoding_depends_on_pixel_values_not_on_the_frames_dtype():
    # A bf16 VAE decodes bf16 frames: the encoder resizes and ImageNet-normalises them as float32 values
    # (its weights' dtype only starts at the model), so bf16 frames encode exactly like the same values
    # given in float32.
    import test_teacher as tt

    enc = DinoEncoder(model=tt._tiny_vit(), dtype=torch.float32)
    frames = tt._frames(1, 2).to(torch.bfloat16)  # 40 x 48: resized to 56 x 56
    torch.testing.assert_close(enc.encode(frames), enc.encode(frames.float()), rtol=0, atol=0)


def test_frames_larger_than_the_encoder_are_downsampled_bilinearly_without_antialiasing():
    # SPEC section 7: resize (bilinear, align_corners=False), as F.interpolate does by default, also when
    # the decoded frames are larger than the encoder's input (the usual case: 480 x 832 frames, 518 px);
    # the other teacher tests only upsample, where antialiasing changes nothing.
    import test_teacher as tt

    model = tt._tiny_vit()
    enc = DinoEncoder(model=model, dtype=torch.float32)
    frames = tt._frames(1, 2, 90, 130)  # both sides larger than 56
    want = tt._expected_tokens(model, frames, 56, 1)
    torch.testing.assert_close(enc.encode(frames), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, arch", [
    ("dinov2_vitl14_with_registers", "vit_large_patch14_reg4_dinov2"),
    ("dinov2_large_reg", "vit_large_patch14_reg4_dinov2"),
    ("dinov2-giant-reg4", "vit_giant_patch14_reg4_dinov2"),
    ("dinov2_s_reg", "vit_small_patch14_reg4_dinov2"),
])
def test_loose_register_names_resolve_to_the_register_models(name, arch):
    # resolve_encoder_name maps the loose spellings; with registers is another model (5 prefix tokens,
    # other weights), never silently the model without them.
    assert resolve_encoder_name(name) == arch


def test_default_image_size_is_518():
    # SPEC section 8: encoder image size default 518 (37 x 37 patches of 14 px)
    enc = DinoEncoder("dinov2_vits14", weights="random", dtype=torch.float32,
                      model_kwargs=dict(depth=1, embed_dim=8, num_heads=1))
    assert enc.image_size == 518 and enc.grid == (37, 37) and enc.num_patches == 37 * 37


def test_auto_dtype_is_bfloat16_where_cuda_runs_the_encoder(monkeypatch):
    # README, crepa_encoder_dtype: "auto" (bf16 on CUDA, fp32 elsewhere), the same as None.
    import test_teacher as tt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    enc = DinoEncoder(model=tt._tiny_vit(), dtype="auto")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert DinoEncoder(model=tt._tiny_vit(), dtype="auto", device="cpu").dtype == torch.float32


def test_the_encoder_state_dict_holds_only_the_vit_weights():
    # The ImageNet statistics are non-persistent buffers: they follow .to() but stay out of the state dict
    # (a trainer checkpointing a module that holds the encoder gets exactly the ViT's keys).
    import test_teacher as tt

    model = tt._tiny_vit()
    enc = DinoEncoder(model=model, dtype=torch.float32)
    assert set(enc.state_dict()) == {f"model.{k}" for k in model.state_dict()}


@pytest.mark.parametrize("wrap", ["state_dict", "module_prefix", "both"])
def test_checkpoint_containers_and_ddp_prefixes_load(tmp_path, wrap):
    # load_dinov2_state_dict unwraps the usual checkpoint containers ("model", "state_dict", "teacher")
    # and the training-time "module." prefix of a DDP-wrapped model.
    import test_teacher as tt

    source = tt._tiny_vit(seed=8)
    state = source.state_dict()
    if wrap in ("module_prefix", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap in ("state_dict", "both"):
        state = {"state_dict": state, "epoch": 3}
    path = tmp_path / "dino.pth"
    torch.save(state, str(path))
    loaded = DinoEncoder("dinov2_vits14", 56, weights=path, dtype=torch.float32, model_kwargs=tt.TINY)
    frames = tt._frames(1, 1)
    want = DinoEncoder(model=source, dtype=torch.float32).encode(frames)
    torch.testing.assert_close(loaded.encode(frames), want, rtol=0, atol=0)


def test_weights_from_a_hf_cache_holding_only_pytorch_model_bin(tmp_path, monkeypatch):
    # weights=None: the local Hugging Face cache is used, whether it holds model.safetensors or the
    # older pytorch_model.bin
    import test_teacher as tt

    hf, _ = tt._empty_caches(monkeypatch, tmp_path)
    repo = hf / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    source = tt._tiny_vit(seed=9)
    torch.save(source.state_dict(), str(repo / "snapshots" / "abc123" / "pytorch_model.bin"))
    enc = DinoEncoder("dinov2_vits14", 56, dtype=torch.float32, model_kwargs=tt.TINY)
    frames = tt._frames(1, 1)
    torch.testing.assert_close(enc.encode(frames), DinoEncoder(model=source, dtype=torch.float32).encode(frames),
                               rtol=0, atol=0)
