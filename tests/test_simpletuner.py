"""The CrepaRegularizer drop-in against a reimplementation of the reference trainer's semantics."""
import contextlib
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crepa_kernels.integrations.simpletuner import CrepaRegularizer
from crepa_kernels.schedule import parse_state

timm = pytest.importorskip("timm")


# ----------------------------------------------------------------------------------------------------------
# The reference path, as the common trainer computes it (projector -> temporal pick -> token interpolation
# to the smaller count -> F.normalize -> same/neighbour cosines -> frame and batch reduction).
# ----------------------------------------------------------------------------------------------------------
def reference_step(projector, hidden, feats, *, d=1, tau=1.0, cumulative=False, weight=0.5, by_frames=True):
    if hidden.ndim == 3:
        hidden = hidden.unsqueeze(2)
    b, t, p, dh = hidden.shape
    proj = projector(hidden.float().reshape(b * t * p, dh)).view(b, t, p, -1)
    tp, tf = proj.shape[1], feats.shape[1]
    if tf > tp:
        feats = feats.index_select(1, torch.linspace(0, tf - 1, tp).long())
    elif tp > tf:
        proj = proj.index_select(1, torch.linspace(0, tp - 1, tf).long())

    def interp(x, m):
        if x.shape[2] == m:
            return x
        bb, tt, n, dd = x.shape
        flat = x.reshape(bb * tt, n, dd).permute(0, 2, 1)
        s, q = math.isqrt(n), math.isqrt(m)
        if s * s == n and q * q == m:
            out = F.interpolate(flat.reshape(bb * tt, dd, s, s), size=(q, q), mode="bilinear", align_corners=False)
        else:
            out = F.interpolate(flat, size=m, mode="linear", align_corners=False)
        return out.reshape(bb * tt, dd, m).permute(0, 2, 1).reshape(bb, tt, m, dd)

    if proj.shape[2] != feats.shape[2]:
        m = min(proj.shape[2], feats.shape[2])
        proj, feats = interp(proj, m), interp(feats, m)
    proj, feats = F.normalize(proj, dim=-1), F.normalize(feats, dim=-1)
    self_sim = (proj * feats).sum(-1).mean(-1)
    total = self_sim.clone()
    frames = total.shape[1]
    dd = min(d, frames - 1)
    for k in (range(1, dd + 1) if cumulative else [dd]) if dd > 0 else []:
        w = math.exp(-k / tau)
        total[:, :-k] += w * (proj[:, :-k] * feats[:, k:]).sum(-1).mean(-1)
        total[:, k:] += w * (proj[:, k:] * feats[:, :-k]).sum(-1).mean(-1)
    per_video = total.sum(1) / (frames if by_frames else 1)
    loss = -per_video.mean() * weight
    return loss, {"crepa_loss": loss.item(), "crepa_alignment_score": total.mean().item(),
                  "crepa_similarity_self": self_sim.mean().item()}


def namespace(**kw):
    base = dict(crepa_enabled=True, crepa_block_index=1, crepa_lambda=0.5, crepa_adjacent_distance=1,
                crepa_adjacent_tau=1.0, crepa_encoder_image_size=56, learning_rate=1e-4, crepa_offload="offload")
    base.update(kw)
    return SimpleNamespace(**base)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, depth=2,
                              embed_dim=32, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def test_backbone_mode_matches_reference():
    torch.manual_seed(0)
    cfg = namespace(crepa_feature_source="backbone", crepa_teacher_block_index=3, crepa_adjacent_distance=2,
                    crepa_cumulative_neighbors=True)
    reg = CrepaRegularizer(cfg, SimpleNamespace(device=torch.device("cpu")), hidden_size=16)
    model = nn.Module()
    reg.attach_to_model(model)
    assert model.crepa_projector is reg.projector
    hidden = torch.randn(2, 5, 12, 16, requires_grad=True)
    teacher = torch.randn(2, 5, 9, 16)  # a deeper block's tokens, other grid: compatible resampling
    loss, logs = reg.compute_loss(hidden, None, None, frame_features=teacher)
    ref_loss, ref_logs = reference_step(reg.projector, hidden.detach(), teacher, d=2, cumulative=True)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for key, value in ref_logs.items():
        assert logs[key] == pytest.approx(value, abs=1e-5), key
    loss.backward()
    assert hidden.grad is not None and reg.projector[1].weight.grad is not None


def test_dropin_validation_calls_in_eval_mode_leave_the_schedule_alone(monkeypatch):
    # The trainer's model.eval() reaches only the projector registered on the model: the drop-in has its
    # own eval()/train(). In eval a call makes no collective (one rank alone may make it) and feeds
    # nothing into the schedule.
    import crepa_kernels.module as module

    def collective(*args, **kwargs):
        raise AssertionError("a collective in a validation call")

    monkeypatch.setattr(module, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", collective)
    reg = CrepaRegularizer(namespace(crepa_feature_source="backbone", crepa_teacher_block_index=3,
                                     crepa_similarity_threshold=0.9), "cpu", hidden_size=16)
    assert reg.eval() is reg and not reg.training
    model = nn.Module()
    reg.attach_to_model(model)  # made after eval(): the loss module starts in eval mode too
    before = reg.scheduler.state_dict()
    hidden, teacher = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16)
    loss, logs = reg.compute_loss(hidden, None, frame_features=teacher, step=1)
    assert loss is not None and logs["crepa_weight"] == 0.5 and reg.scheduler.state_dict() == before
    reg.train()
    assert reg.training and reg.loss.training
    with pytest.raises(AssertionError, match="a collective"):  # a training call with a threshold is one
        reg.compute_loss(hidden, None, frame_features=teacher, step=1)
    with pytest.raises(TypeError, match="mode must be a bool"):
        reg.train("no")


@pytest.mark.parametrize("tokens", [4, 6])  # 6: no square, so the reference's 1-D resampling (no grid mode)
def test_encoder_mode_with_patch_tokens_matches_reference(tokens):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    vit = tiny_vit()
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=16, encoder=vit)
    reg.attach_to_model(nn.Module())
    latents = torch.randn(1, 4, 3, 4, 4)  # 3 latent frames -> 9 decoded frames of 32x32
    hidden = torch.randn(1, 3, tokens, 16)
    loss, logs = reg.compute_loss(hidden, latents, vae)

    # Reference: decode everything, encode every frame (patch tokens), then align.
    with torch.no_grad():
        mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
        std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
        video = vae.decode(latents * std + mean).sample.clamp(-1, 1)
        video = ((video + 1) * 0.5).permute(0, 2, 1, 3, 4)
        b, t = video.shape[:2]
        frames = F.interpolate(video.reshape(b * t, 3, 32, 32), size=(56, 56), mode="bilinear", align_corners=False)
        frames = (frames - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        tokens = vit.forward_features(frames)[:, vit.num_prefix_tokens:]
        feats = tokens.reshape(b, t, tokens.shape[1], -1)
    ref_loss, ref_logs = reference_step(reg.projector, hidden, feats)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for key, value in ref_logs.items():
        assert logs[key] == pytest.approx(value, abs=1e-5), key
    # Features passed next to the latents (e.g. a model's own block output) do not replace the
    # teacher in encoder mode: the reference decodes and encodes whatever it is given.
    with pytest.warns(UserWarning, match="latents and frame_features in encoder mode.*ignored"):
        loss2, logs2 = reg.compute_loss(hidden, latents, vae, step=1, frame_features=torch.randn(1, 3, hidden.shape[2], 32))
    assert abs(loss2.item() - ref_loss.item()) <= 1e-5 and logs2 == logs


def test_drop_vae_encoder_and_frames_batch_size_reach_the_teacher():
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    reg = CrepaRegularizer(namespace(crepa_drop_vae_encoder=True, crepa_encoder_frames_batch_size=2), "cpu",
                           hidden_size=16, encoder=tiny_vit())
    assert reg.encoder.frames_batch_size == 2  # a plain timm model is wrapped with the config's batching
    reg.attach_to_model(nn.Module())
    assert vae.encoder is not None
    loss, _ = reg.compute_loss(torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4), vae)
    assert loss is not None and vae.encoder is None  # the encoder half is freed: the teacher only decodes


@pytest.mark.parametrize("on", [False, True])
def test_vae_channels_last_reaches_the_teacher(on):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    reg = CrepaRegularizer(namespace(crepa_vae_channels_last=on), "cpu", hidden_size=16, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    loss, _ = reg.compute_loss(torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4), vae)
    assert loss is not None
    weights = [p for p in vae.parameters() if p.dim() == 5]
    channels_last = [p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights]
    assert weights and all(channels_last) == on
    assert on or all(p.is_contiguous() for p in weights)


def test_projector_state_dict_is_the_trainers():
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=8, encoder=tiny_vit())
    model = nn.Module()
    reg.attach_to_model(model)
    trainer_projector = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32))
    model.crepa_projector.load_state_dict(trainer_projector.state_dict())
    assert "crepa_projector.1.weight" in model.state_dict()


def test_disabled_is_inert():
    reg = CrepaRegularizer(namespace(crepa_enabled=False), "cpu", hidden_size=8)
    model = nn.Module()
    reg.attach_to_model(model)
    assert not hasattr(model, "crepa_projector") and not reg.wants_hidden_states()
    assert reg.compute_loss(torch.randn(1, 2, 3, 8), None, None) == (None, None)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda r: r.compute_loss(None, torch.ones(1), None), ValueError, "no intermediate hidden_states"),
    (lambda r: r.compute_loss(torch.ones(1, 2, 3, 8), None, None), ValueError, "needs latents"),
    (lambda r: r.compute_loss(torch.ones(1, 2, 3, 8), torch.ones(1, 4, 2, 2, 2), None), ValueError, "needs a VAE"),
])
def test_errors_after_attach(call, exc, msg):
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=8, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    with pytest.raises(exc, match=msg):
        call(reg)


def test_an_encoder_passed_in_meets_the_config_or_says_what_it_ignores():
    from crepa_kernels.teacher import DinoEncoder

    # a timm ViT at another size than crepa_encoder_image_size: the error names the config key
    with pytest.raises(ValueError, match="takes 56x56 images but crepa_encoder_image_size is 518: set "
                                         "crepa_encoder_image_size=56"):
        CrepaRegularizer(namespace(crepa_encoder_image_size=518), "cpu", hidden_size=8, encoder=tiny_vit())
    # a DinoEncoder keeps its own settings: keys set to something else are named, defaults are not
    built = DinoEncoder(model=tiny_vit(), dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrepaRegularizer(namespace(crepa_encoder_image_size=518), "cpu", hidden_size=8, encoder=built)
    with pytest.warns(UserWarning, match="keeps its own settings; ignored: crepa_encoder_image_size=224 \\(it runs "
                                         "with 56\\), crepa_encoder_dtype='bfloat16' \\(it runs with 'float32'\\), "
                                         "crepa_encoder_frames_batch_size=4 \\(it runs with None\\)"):
        CrepaRegularizer(namespace(crepa_encoder_image_size=224, crepa_encoder_dtype="bfloat16",
                                   crepa_encoder_frames_batch_size=4), "cpu", hidden_size=8, encoder=built)


def test_errors_before_attach_and_bad_arguments():
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=8, encoder=tiny_vit())
    with pytest.raises(RuntimeError, match="call attach_to_model"):
        reg.compute_loss(torch.ones(1, 2, 3, 8), None, None, frame_features=torch.ones(1, 2, 3, 32))
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        CrepaRegularizer(namespace(), "cpu", hidden_size=0)
    with pytest.raises(TypeError, match="accelerator must have a .device"):
        CrepaRegularizer(namespace(), object(), hidden_size=8)
    with pytest.raises(ValueError, match="accelerator must be an accelerate.Accelerator or name a device .*'gpu0'"):
        CrepaRegularizer(namespace(), "gpu0", hidden_size=8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="accelerator='cuda' puts CREPA on cuda, but CUDA is not available"):
            CrepaRegularizer(namespace(), "cuda", hidden_size=8)
        off = CrepaRegularizer(namespace(crepa_enabled=False), "cuda", hidden_size=8)  # off: nothing runs there
        assert not off.wants_hidden_states()
        with pytest.raises(ValueError, match="puts CREPA on cuda:0, but CUDA is not available"):
            CrepaRegularizer(namespace(), SimpleNamespace(device=torch.device("cuda", 0)), hidden_size=8)
    with pytest.raises(ValueError, match="did you mean crepa_lambda"):
        CrepaRegularizer(SimpleNamespace(crepa_lamda=1.0), "cpu", hidden_size=8)
    backbone = CrepaRegularizer(namespace(crepa_feature_source="backbone", crepa_teacher_block_index=4), "cpu", 8)
    backbone.attach_to_model(nn.Module())
    with pytest.raises(ValueError, match="backbone mode needs frame_features"):
        backbone.compute_loss(torch.ones(1, 2, 3, 8), torch.ones(1, 4, 2, 2, 2), None)


@pytest.mark.parametrize("setting,want", [(None, torch.float32), ("float32", torch.float32),
                                          ("bfloat16", torch.bfloat16)])
def test_encoder_dtype_follows_the_config_and_is_set_before_offloading(setting, want):
    extra = {} if setting is None else {"crepa_encoder_dtype": setting}
    reg = CrepaRegularizer(namespace(**extra), "cpu", hidden_size=8, encoder=tiny_vit())
    assert {p.dtype for p in reg.encoder.model.parameters()} == {want}  # auto on a CPU device: fp32


def test_schedule_state_round_trips_through_the_dropin():
    cfg = namespace(crepa_feature_source="backbone", crepa_teacher_block_index=3, crepa_similarity_threshold=-10.0)
    reg = CrepaRegularizer(cfg, "cpu", hidden_size=8)
    reg.attach_to_model(nn.Module())
    loss, logs = reg.compute_loss(torch.randn(1, 2, 3, 8), None, frame_features=torch.randn(1, 2, 3, 8))
    assert loss is None and logs["crepa_cutoff"] is True  # every score is above -10: cut off
    again = CrepaRegularizer(cfg, "cpu", hidden_size=8)
    again.attach_to_model(nn.Module())
    again.load_state_dict(reg.state_dict())
    assert again.loss.scheduler.is_cutoff()
    assert torch.equal(again.projector[1].weight, reg.projector[1].weight)


def _tiny_wan_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True],
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval().requires_grad_(False)


def _offloading_teacher():
    """(drop-in, tiny Wan VAE, its offload manager in "offload" mode on an emulated device)."""
    from crepa_kernels.teacher.offload import OffloadManager

    vae = _tiny_wan_vae()
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=16, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    manager = reg._offload = OffloadManager("offload", emulate_device=True)
    return reg, vae, manager


def test_teacher_leaves_the_device_after_each_use_in_offload_mode():
    # Leaving manager.use() applies the mode: with crepa_offload=offload neither the VAE nor the
    # encoder keeps a device copy after the teacher step (an emulated device on the CPU).
    reg, vae, manager = _offloading_teacher()
    features, _ = reg.teacher_features(torch.randn(1, 4, 3, 4, 4), vae, num_frames=3)
    assert features.shape[1] == 3
    assert not manager.is_resident(vae) and not manager.is_resident(reg.encoder)
    stats = manager.stats
    assert stats.copies == 2 and stats.releases == 2  # one trip to the device and back each


def test_a_vae_with_layerwise_casting_is_left_to_its_hooks_and_the_encoder_still_offloaded():
    # The manager cannot pack a module whose hooks recast its weights at each forward: the drop-in
    # decodes with such a VAE as the trainer set it up, and offloads the encoder alone.
    reg, vae, manager = _offloading_teacher()
    vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    features, _ = reg.teacher_features(torch.randn(1, 4, 3, 4, 4), vae, num_frames=3)
    assert features.shape[1] == 3 and torch.isfinite(features).all()
    assert vae not in manager._slots and next(vae.parameters()).dtype == torch.float8_e4m3fn
    stats = manager.stats
    assert stats.copies == stats.releases == 1 and not manager.is_resident(reg.encoder)


@pytest.mark.parametrize("failure", ["bad latents", "latents not a tensor", "bad timestep", "decode raises",
                                     "leaving the VAE's use raises", "frame pick runs out of memory",
                                     "frame pick interrupted", "encode raises"])
def test_a_failed_teacher_step_leaves_nothing_on_the_device(failure, monkeypatch):
    # Bad input is refused before either module is copied in; a step that fails anywhere after the
    # copies started (the decode, leaving the VAE's use, the frame pick between the decode and the
    # encode, the encode) hands back the encoder prefetched during the decode.
    from crepa_kernels.teacher import pipeline
    from crepa_kernels.teacher.encoders import DinoEncoder
    from crepa_kernels.teacher.vae import VaeAdapter

    reg, vae, manager = _offloading_teacher()
    latents, timestep = torch.randn(1, 4, 3, 4, 4), None

    def raiser(exc):
        def fail(*args, **kwargs):
            raise exc
        return fail

    if failure == "bad latents":
        latents = torch.randn(1, 16, 3, 4, 4)  # 16 channels for a z_dim=4 VAE
        expected = pytest.raises(ValueError, match="latents must have 4 channels")
    elif failure == "latents not a tensor":
        latents = latents.numpy()
        expected = pytest.raises(TypeError, match="latents must be a torch.Tensor, got ndarray")
    elif failure == "bad timestep":
        timestep = 2.0
        expected = pytest.raises(ValueError, match=r"timestep must be in \[0, 1\]")
    elif failure == "decode raises":
        monkeypatch.setattr(VaeAdapter, "decode", raiser(torch.OutOfMemoryError("no room for the decode")))
        expected = pytest.raises(torch.OutOfMemoryError)
    elif failure == "leaving the VAE's use raises":
        real = VaeAdapter.decode

        def decode_and_cast(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            self.vae.post_quant_conv.double()  # a change the manager reports as the use ends
            return out

        monkeypatch.setattr(VaeAdapter, "decode", decode_and_cast)
        expected = pytest.raises(RuntimeError, match="moved or cast")
    elif failure == "frame pick runs out of memory":
        monkeypatch.setattr(pipeline, "_select_frames", raiser(torch.OutOfMemoryError("no room for the frames")))
        expected = pytest.raises(torch.OutOfMemoryError)
    elif failure == "frame pick interrupted":
        monkeypatch.setattr(pipeline, "_select_frames", raiser(KeyboardInterrupt()))
        expected = pytest.raises(KeyboardInterrupt)
    else:
        monkeypatch.setattr(DinoEncoder, "encode", raiser(RuntimeError("the encode failed")))
        expected = pytest.raises(RuntimeError, match="the encode failed")
    with expected:
        reg.teacher_features(latents, vae, num_frames=3, timestep=timestep)
    assert not manager.is_resident(vae) and not manager.is_resident(reg.encoder)
    stats = manager.stats
    assert stats.copies == stats.releases == (0 if failure in ("bad latents", "latents not a tensor", "bad timestep")
                                              else 2)


def test_a_failed_call_leaves_the_vae_as_it_was():
    # crepa_drop_vae_encoder and crepa_vae_channels_last change the VAE once, at its first good call:
    # a call whose latents are refused changes nothing.
    vae = _tiny_wan_vae()
    reg = CrepaRegularizer(namespace(crepa_drop_vae_encoder=True), "cpu", hidden_size=16, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    for bad, exc in ((torch.randn(1, 4, 3, 4, 4).numpy(), TypeError), ([0.0], TypeError),
                     (torch.randn(1, 16, 3, 4, 4), ValueError)):
        with pytest.raises(exc, match="latents must"):
            reg.compute_loss(torch.randn(1, 3, 4, 16), bad, vae)
        assert vae.encoder is not None
    loss, _ = reg.compute_loss(torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4), vae)
    assert loss is not None and vae.encoder is None


@pytest.mark.parametrize("call,exc,match", [
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 16), z, vae), ValueError, "hidden_states must be"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 4, 5), z, vae), ValueError, "hidden_states has D=5"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 0, 4, 16), z, vae), ValueError, "hidden_states is empty"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 4, 16), z, vae, step=1.5), ValueError, "step must be"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(2, 3, 4, 16), z, vae), ValueError,
     "latents holds 1 videos but hidden_states 2"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 4, 16), z, vae, hidden_grid=(3, 3)), ValueError,
     "hidden_grid"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 6, 16), z, vae, feature_grid=(4, 4)), ValueError,
     "hidden_grid is required: feature_grid switches to grid mode"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 4, 16, device="meta"), z, vae), ValueError,
     "hidden_states is on meta but this CrepaLoss's projector is on cpu"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 4, 16), z, vae, timestep="0.5"), TypeError,
     "timestep must be None, a float or a tensor"),
    (lambda reg, z, vae: reg.compute_loss(torch.randn(1, 3, 4, 16), z, vae, timestep=torch.zeros(3)), ValueError,
     "timestep must hold 1 or B=1 values"),
])
def test_a_bad_student_input_fails_before_the_teacher_decodes(call, exc, match, monkeypatch):
    # The decode and encode cost seconds and gigabytes of copies at real sizes: a call that can only fail
    # must fail first.
    from crepa_kernels.teacher.vae import VaeAdapter

    reg, vae, manager = _offloading_teacher()
    decodes = []
    real = VaeAdapter.decode
    monkeypatch.setattr(VaeAdapter, "decode", lambda self, *a, **k: decodes.append(1) or real(self, *a, **k))
    with pytest.raises(exc, match=match):
        call(reg, torch.randn(1, 4, 3, 4, 4), vae)
    assert decodes == [] and manager.stats.copies == 0


# Every crepa_* option the common trainer registers, at the trainer's defaults: a trainer's namespace
# carries all of them, so the drop-in must accept each one.
TRAINER_DEFAULTS = dict(
    crepa_enabled=False, crepa_block_index=8, crepa_lambda=0.5, crepa_adjacent_distance=1, crepa_adjacent_tau=1.0,
    crepa_encoder="dinov2_vitg14", crepa_encoder_frames_batch_size=-1, crepa_use_backbone_features=False,
    crepa_teacher_block_index=None, crepa_encoder_image_size=518, crepa_drop_vae_encoder=False,
    crepa_normalize_by_frames=True, crepa_normalize_neighbour_sum=False, crepa_spatial_align=True,
    crepa_use_tae=False, crepa_scheduler="constant", crepa_warmup_steps=0, crepa_decay_steps=0,
    crepa_lambda_end=0.0, crepa_power=1.0, crepa_cutoff_step=0, crepa_similarity_threshold=None,
    crepa_similarity_ema_decay=0.99, crepa_threshold_mode="permanent", crepa_cumulative_neighbors=False,
    crepa_model=None, crepa_feature_source=None, crepa_self_flow=False, crepa_self_flow_mask_ratio=0.1,
)


def test_a_trainer_namespace_with_every_option_at_its_default_is_accepted():
    reg = CrepaRegularizer(SimpleNamespace(**TRAINER_DEFAULTS), "cpu", hidden_size=16)
    assert not reg.enabled and reg.config.encoder_frames_batch_size is None and reg.config.use_tae is False


def test_use_tae_falls_back_to_the_vae_with_a_warning():
    args = SimpleNamespace(**{**TRAINER_DEFAULTS, "crepa_enabled": True, "crepa_use_tae": True,
                              "crepa_encoder_image_size": 56})
    with pytest.warns(UserWarning, match="crepa_use_tae=true: .*decodes with the full VAE"):
        reg = CrepaRegularizer(args, "cpu", hidden_size=16, encoder=tiny_vit())
    assert reg.config.use_tae is True and reg.use_tae is False  # the reference's attribute after its fall back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # backbone mode decodes nothing: nothing to warn about
        CrepaRegularizer(SimpleNamespace(**{**args.__dict__, "crepa_use_backbone_features": True,
                                            "crepa_teacher_block_index": 9}), "cpu", hidden_size=16)


def test_a_zero_weight_computes_logs_and_tracks_nothing():
    # The trainer returns (None, None) before any work when crepa_lambda is 0 (or None): no logs, no EMA.
    for lam in (0.0, None):
        cfg = namespace(crepa_feature_source="backbone", crepa_teacher_block_index=3, crepa_lambda=lam,
                        crepa_similarity_threshold=0.9)
        with pytest.warns(UserWarning, match="crepa_lambda=None") if lam is None else contextlib.nullcontext():
            reg = CrepaRegularizer(cfg, "cpu", hidden_size=8)
        reg.attach_to_model(nn.Module())
        assert reg.compute_loss(torch.randn(1, 3, 4, 8), None, None, frame_features=torch.randn(1, 3, 4, 8)) == (None, None)
        assert parse_state(reg.state_dict()["_extra_state"]) == (None, False)
        with pytest.raises(ValueError, match="backbone mode needs frame_features"):  # the checks still run first
            reg.compute_loss(torch.randn(1, 3, 4, 8), None, None)


def test_cached_features_next_to_latents_without_a_decoder_are_the_teacher():
    # With no VAE and no model object to decode, latents cannot be decoded: the given features are
    # the teacher, without a warning; with a zero weight nothing is decoded, so nothing is said either.
    torch.manual_seed(3)
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=16, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    hidden, feats = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = reg.compute_loss(hidden, torch.randn(1, 4, 3, 4, 4), None, frame_features=feats)
        want, _ = reg.compute_loss(hidden, None, None, frame_features=feats)
        assert torch.equal(loss, want)
        off = CrepaRegularizer(namespace(crepa_lambda=0.0), "cpu", hidden_size=16, encoder=tiny_vit())
        off.attach_to_model(nn.Module())
        assert off.compute_loss(hidden, torch.randn(1, 4, 3, 4, 4), object(), frame_features=feats) == (None, None)


def test_a_vae_of_another_kind_is_named_as_unsupported():
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=16, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    with pytest.raises(TypeError, match="unsupported VAE class object; supported classes"):
        reg.compute_loss(torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4), object())


def test_with_crepa_off_a_given_encoder_is_not_checked_against_the_config():
    reg = CrepaRegularizer(namespace(crepa_enabled=False, crepa_encoder_image_size=500), "cpu", hidden_size=16,
                           encoder=tiny_vit())
    assert not reg.enabled and reg.compute_loss(torch.randn(1, 3, 4, 16), None, None) == (None, None)


def test_irepa_is_refused_when_on_and_ignored_when_off():
    with pytest.raises(ValueError, match="irepa_enabled=true: iREPA .* is not supported"):
        CrepaRegularizer(namespace(irepa_enabled=True), "cpu", hidden_size=8)
    with pytest.raises(ValueError, match="irepa_enabled=true"):  # a mapping config too
        CrepaRegularizer({**vars(namespace()), "irepa_enabled": True}, "cpu", hidden_size=8)
    with pytest.raises(ValueError, match="irepa_enabled=true"):  # written as on the command line
        CrepaRegularizer({f"--{k}": v for k, v in vars(namespace()).items()} | {"--irepa-enabled": True}, "cpu",
                         hidden_size=8)
    CrepaRegularizer(namespace(irepa_enabled=False, irepa_spatial_norm_alpha=0.6), "cpu", hidden_size=8)
    CrepaRegularizer(namespace(crepa_enabled=False, irepa_enabled=True), "cpu", hidden_size=8)  # CREPA off


def test_3d_cached_features_in_encoder_mode_keep_the_library_reading():
    # Outside backbone mode (e.g. features from a FeatureCache) a 3-D tensor is (B, T, D), as crepa_loss reads it.
    torch.manual_seed(5)
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=8, encoder=tiny_vit())
    reg.attach_to_model(nn.Module())
    hidden, feats = torch.randn(1, 3, 8), torch.randn(1, 3, 32)
    loss, _ = reg.compute_loss(hidden, None, None, frame_features=feats)
    ref_loss, _ = reference_step(reg.projector, hidden, feats.unsqueeze(2))  # (B, T, 1, D)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6


def test_a_3d_teacher_is_one_frame_of_tokens_as_the_trainer_reads_it():
    torch.manual_seed(3)
    reg = CrepaRegularizer(namespace(crepa_feature_source="backbone", crepa_teacher_block_index=3), "cpu", 8)
    reg.attach_to_model(nn.Module())
    hidden, teacher = torch.randn(2, 3, 4, 8), torch.randn(2, 4, 8)
    loss3, logs3 = reg.compute_loss(hidden, None, None, frame_features=teacher)
    ref_loss, ref_logs = reference_step(reg.projector, hidden, teacher.unsqueeze(1))  # (B, 1, N, D)
    assert abs(loss3.item() - ref_loss.item()) <= 1e-6
    for key, value in ref_logs.items():
        assert logs3[key] == pytest.approx(value, abs=1e-6), key


class _Mode:
    def __init__(self, name):
        self.name = name


class _Foundation:
    """Stands in for the trainer's model object: it decodes latents to (B, T, C, H, W) frames in [0, 1]."""

    def __init__(self, frames, mode="VIDEO"):
        self.frames, self.crepa_mode, self.calls = frames, _Mode(mode), []

    def decode_latents_to_pixels(self, latents, *, use_tae=False):
        self.calls.append((tuple(latents.shape), use_tae))
        return self.frames


def test_the_trainers_model_object_decodes_when_no_vae_is_given():
    torch.manual_seed(4)
    frames = torch.rand(1, 9, 3, 32, 32)
    foundation = _Foundation(frames)
    vit = tiny_vit()
    reg = CrepaRegularizer(namespace(), "cpu", hidden_size=16, encoder=vit, model_foundation=foundation)
    reg.attach_to_model(nn.Module())
    hidden = torch.randn(1, 3, 4, 16)
    loss, logs = reg.compute_loss(hidden, torch.randn(1, 4, 3, 4, 4), None)
    assert foundation.calls == [((1, 4, 3, 4, 4), False)]
    # Reference: every frame encoded (patch tokens), then aligned.
    with torch.no_grad():
        x = F.interpolate(frames.reshape(9, 3, 32, 32), size=(56, 56), mode="bilinear", align_corners=False)
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1)
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    ref_loss, ref_logs = reference_step(reg.projector, hidden, tokens.reshape(1, 9, tokens.shape[1], -1))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for key, value in ref_logs.items():
        assert logs[key] == pytest.approx(value, abs=1e-5), key

    # With crepa_use_tae the model object decodes even when a VAE is passed (it holds the Tiny AutoEncoder).
    tae = CrepaRegularizer(namespace(crepa_use_tae=True), "cpu", hidden_size=16, encoder=vit,
                           model_foundation=foundation)
    tae.attach_to_model(nn.Module())
    tae.compute_loss(hidden, torch.randn(1, 4, 3, 4, 4), object())
    assert foundation.calls[-1] == ((1, 4, 3, 4, 4), True) and tae.use_tae is True

    with pytest.raises(ValueError, match="must return frames"):
        foundation.frames = torch.rand(9, 3, 32, 32)
        reg.compute_loss(hidden, torch.randn(1, 4, 3, 4, 4), None)


def test_use_tae_on_a_model_without_a_tiny_autoencoder_falls_back_with_a_warning():
    foundation = _Foundation(torch.rand(1, 9, 3, 32, 32))
    foundation.supports_validation_preview = lambda: False
    with pytest.warns(UserWarning, match="no Tiny AutoEncoder: falling back to full VAE"):
        reg = CrepaRegularizer(namespace(crepa_use_tae=True), "cpu", hidden_size=16, encoder=tiny_vit(),
                               model_foundation=foundation)
    reg.attach_to_model(nn.Module())
    reg.compute_loss(torch.randn(1, 3, 4, 16), torch.randn(1, 4, 3, 4, 4), None)
    assert foundation.calls == [((1, 4, 3, 4, 4), False)]


def test_an_image_model_object_is_refused():
    with pytest.raises(ValueError, match="image model"):
        CrepaRegularizer(namespace(), "cpu", hidden_size=8, model_foundation=_Foundation(None, mode="IMAGE"))


@pytest.mark.parametrize("keys", [dict(crepa_use_backbone_features=True),
                                  dict(crepa_feature_source="backbone"),
                                  dict(crepa_use_backbone_features=True, crepa_feature_source="encoder")])
def test_a_trainer_namespace_reaches_backbone_mode_through_either_key(keys):
    """Trainers' model code reads regularizer.use_backbone_features / teacher_block_index to decide
    which hidden states to return; both keys sit in the namespace, one at its default."""
    args = SimpleNamespace(**{**TRAINER_DEFAULTS, "crepa_enabled": True, "crepa_teacher_block_index": 12, **keys})
    reg = CrepaRegularizer(args, "cpu", hidden_size=16)
    assert reg.use_backbone_features is True and reg.teacher_block_index == 12 and reg.use_tae is False
    assert reg.scheduler is None  # until attach_to_model
    reg.attach_to_model(nn.Module())
    assert reg.scheduler is reg.loss.scheduler and reg.scheduler.get_weight(0) == 0.5
    plain = CrepaRegularizer(SimpleNamespace(**{**TRAINER_DEFAULTS, "crepa_enabled": True,
                                                "crepa_encoder_image_size": 56}), "cpu", hidden_size=16,
                             encoder=tiny_vit())
    assert plain.use_backbone_features is False and plain.teacher_block_index is None


def test_max_train_steps_none_reads_as_zero_and_bad_values_fail_early():
    args = SimpleNamespace(**{**TRAINER_DEFAULTS, "crepa_enabled": True, "crepa_use_backbone_features": True,
                              "crepa_teacher_block_index": 9})
    reg = CrepaRegularizer(args, "cpu", hidden_size=16, max_train_steps=None)
    reg.attach_to_model(nn.Module())  # the reference accepts None; so does attach here
    assert reg.max_train_steps == 0
    for bad in (-1, 2.5, True, "100"):
        with pytest.raises(ValueError, match="max_train_steps must be a non-negative int or None"):
            CrepaRegularizer(args, "cpu", hidden_size=16, max_train_steps=bad)


def test_the_drop_in_loads_a_projector_only_checkpoint_without_strict():
    reg = CrepaRegularizer(namespace(crepa_feature_source="backbone", crepa_teacher_block_index=3,
                                     crepa_cutoff_step=1), "cpu", hidden_size=8)
    reg.attach_to_model(nn.Module())
    reg.compute_loss(torch.randn(1, 3, 4, 8), None, None, frame_features=torch.randn(1, 3, 4, 8), step=1)
    assert reg.loss.scheduler.is_cutoff()
    projector_only = {k: v for k, v in reg.state_dict().items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match='Missing key "_extra_state"'):
        reg.load_state_dict(projector_only)
    reg.load_state_dict(projector_only, strict=False)
    assert reg.loss.scheduler.is_cutoff()  # kept
