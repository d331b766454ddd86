"""One table over every public entry point: bad input raises ValueError/TypeError naming the argument,
the value and what was expected, and leaves nothing half-done (config, schedule, cache directory,
module placement)."""
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from crepa_kernels import CrepaConfig, CrepaLoss, CrepaScheduler, crepa_loss
from crepa_kernels.cli import main as cli_main
from crepa_kernels.integrations import capture_hidden_states
from crepa_kernels.integrations.simpletuner import CrepaRegularizer
from crepa_kernels.teacher import DinoEncoder, adapter_for
from crepa_kernels.teacher.cache import FeatureCache
from crepa_kernels.teacher.offload import OffloadManager

timm = pytest.importorskip("timm")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, depth=1,
                            embed_dim=32, num_heads=2).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    dit = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32)
    return SimpleNamespace(vit=vit, vae=vae, dit=dit, encoder=DinoEncoder(model=vit))


def _cfg(**kw):
    return CrepaConfig(**{"enabled": True, "block_index": 0, **kw})


def _enter(cm):
    with cm:
        pass


T4 = torch.ones(1, 2, 3, 4)

# (entry point, call, exception, fragments the message must contain)
CASES = [
    ("crepa_loss", lambda m: crepa_loss(T4, torch.ones(1, 2, 3, 5)), ValueError, ["features", "D=5", "D=4"]),
    ("crepa_loss", lambda m: crepa_loss(T4, T4, adjacent_tau=-1.0), ValueError, ["adjacent_tau", "-1.0", "positive"]),
    ("crepa_loss", lambda m: crepa_loss(T4, T4, backend="xla"), ValueError, ["backend", "'xla'", "auto, torch, triton"]),
    ("crepa_loss", lambda m: crepa_loss(T4.long(), T4), TypeError, ["projected", "torch.int64", "floating-point"]),
    ("crepa_loss", lambda m: crepa_loss(T4, T4.to(torch.float8_e4m3fn), backend="triton"), TypeError,
     ["features", "float8_e4m3fn", "fp16, bf16, fp32 or fp64"]),
    ("crepa_loss", lambda m: crepa_loss(T4, T4, spatial_align="false"), TypeError,
     ["spatial_align", "'false'", "bool"]),
    ("crepa_loss", lambda m: crepa_loss(T4, T4, normalize_by_frames="0"), TypeError,
     ["normalize_by_frames", "'0'", "bool"]),
    ("crepa_loss", lambda m: crepa_loss(T4, T4, cumulative_neighbors=2), TypeError,
     ["cumulative_neighbors", "2", "bool"]),
    ("CrepaConfig", lambda m: _cfg(lambda_end=-1.0), ValueError, ["crepa_lambda_end", "-1.0", ">= 0"]),
    ("crepa_loss", lambda m: crepa_loss(T4.to_sparse(), T4), TypeError, ["projected", "dense", "torch.sparse_coo"]),
    ("CrepaLoss.forward", lambda m: CrepaLoss(_cfg(), 4, 4)(T4, T4.to_sparse()), TypeError,
     ["frame_features", "dense", "torch.sparse_coo"]),
    ("CrepaConfig.from_dict", lambda m: CrepaConfig.from_dict({"crepa_lambda": "x"}), ValueError,
     ["crepa_lambda", "'x'", "number"]),
    ("CrepaConfig.from_dict", lambda m: CrepaConfig.from_dict({"crepa_adjacent_distnce": 1}), ValueError,
     ["crepa_adjacent_distnce", "did you mean crepa_adjacent_distance"]),
    ("CrepaScheduler", lambda m: CrepaScheduler(_cfg(), max_train_steps=-5), ValueError,
     ["max_train_steps", "-5", "non-negative int"]),
    ("CrepaScheduler.get_weight", lambda m: CrepaScheduler(_cfg()).get_weight(1.5), ValueError,
     ["step", "1.5", "non-negative int"]),
    ("CrepaLoss", lambda m: CrepaLoss(_cfg(), hidden_size=-3, encoder_dim=4), ValueError,
     ["hidden_size", "-3", "positive int"]),
    ("CrepaLoss.forward", lambda m: CrepaLoss(_cfg(), 4, 4)(torch.ones(1, 2, 3, 6), T4), ValueError,
     ["hidden_states", "D=6", "hidden_size=4"]),
    ("CrepaLoss.forward", lambda m: CrepaLoss(_cfg(), 4, 4)(torch.ones(2, 2, 3, 4), T4), ValueError,
     ["hidden_states holds 2 videos", "frame_features 1"]),
    ("CrepaLoss.forward", lambda m: CrepaLoss(_cfg(), 4, 4)(torch.ones(1, 0, 3, 4), T4), ValueError,
     ["hidden_states is empty", "(1, 0, 3, 4)"]),
    ("CrepaLoss.forward", lambda m: CrepaLoss(_cfg(), 4, 4)(torch.ones(1, 2, 4, 4), T4, hidden_grid=(3, 2, 2)),
     ValueError, ["hidden_grid=(3, 2, 2)", "T=3", "2 frames"]),
    ("CrepaLoss.load_state_dict", lambda m: CrepaLoss(_cfg(), 4, 4).load_state_dict(
        {**CrepaLoss(_cfg(), 4, 4).state_dict(), "_extra_state": {"scheduler": {"cut_off": "false"}}}),
     RuntimeError, ["_extra_state", "cut_off must be a bool", "'false'"]),
    ("DinoEncoder", lambda m: DinoEncoder("dinov2_vitq14"), ValueError, ["'dinov2_vitq14'", "expected one of"]),
    ("DinoEncoder", lambda m: DinoEncoder(model=m.vit, image_size=50), ValueError, ["image_size", "50", "multiple of 14"]),
    ("DinoEncoder.encode", lambda m: m.encoder.encode(torch.rand(1, 2, 4, 56, 56)), ValueError,
     ["frames", "3 (RGB) channels", "(1, 2, 4, 56, 56)"]),
    ("adapter_for", lambda m: adapter_for(nn.Conv3d(1, 1, 1)), TypeError, ["Conv3d", "AutoencoderKLWan"]),
    ("VaeAdapter.decode", lambda m: adapter_for(m.vae).decode(torch.rand(1, 3, 2, 4, 4)), ValueError,
     ["latents", "4 channels", "(1, 3, 2, 4, 4)"]),
    ("VaeAdapter.decode", lambda m: adapter_for(m.vae).decode(torch.rand(1, 4, 0, 4, 4)), ValueError,
     ["latents is empty", "(1, 4, 0, 4, 4)"]),
    ("capture_hidden_states", lambda m: _enter(capture_hidden_states(m.dit, 7)), ValueError,
     ["block_index=7", "2 blocks"]),
    ("capture_hidden_states", lambda m: _enter(capture_hidden_states(nn.Linear(2, 2), 0)), TypeError,
     ["Linear", "WanTransformer3DModel"]),
    ("OffloadManager", lambda m: OffloadManager("sometimes"), ValueError, ["crepa_offload", "'sometimes'", "resident"]),
    ("OffloadManager.use", lambda m: _enter(OffloadManager("offload").use("dino")), TypeError,
     ["module", "str", "torch.nn.Module"]),
    ("FeatureCache", lambda m: FeatureCache(3.5), TypeError, ["directory", "float", "os.PathLike"]),
    ("CrepaRegularizer", lambda m: CrepaRegularizer(SimpleNamespace(crepa_tau=1.0), "cpu", 8), ValueError,
     ["crepa_tau"]),
    ("CrepaRegularizer", lambda m: CrepaRegularizer(SimpleNamespace(), "cpu", "wide"), ValueError,
     ["hidden_size", "'wide'", "positive int"]),
]


@pytest.mark.parametrize("entry,call,exc,fragments", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_clear_error(models, entry, call, exc, fragments):
    with pytest.raises(exc) as info:
        call(models)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{entry}: {fragment!r} not in {message!r}"


@pytest.mark.parametrize("argv,fragment", [
    (["bench", "--modes", "sideways"], "--modes got sideways"),
    (["demo", "--steps", "0", "--no-progress"], "steps must be an int >= 2, got 0"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(argv, fragment, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


# ------------------------------------------------------------------------------- nothing half-done
def test_reading_a_config_never_changes_the_callers_object():
    ns = SimpleNamespace(crepa_enabled="true", crepa_block_index="3", crepa_scheduler="Cosine",
                         crepa_warmup_steps=None, crepa_threshold_mode="sticky")
    before = dict(vars(ns))
    with pytest.raises(ValueError, match="crepa_threshold_mode"):
        CrepaRegularizer(ns, "cpu", 8)
    assert vars(ns) == before
    ns.crepa_threshold_mode = "recoverable"
    before = dict(vars(ns))
    cfg = CrepaConfig.from_namespace(ns)
    assert cfg.scheduler == "cosine" and cfg.block_index == 3 and cfg.warmup_steps == 0 and vars(ns) == before


@pytest.mark.parametrize("settings", [dict(similarity_threshold=0.9), dict(cutoff_step=5),
                                      dict(cutoff_step=5, threshold_mode="recoverable")])
def test_failed_forward_leaves_schedule_and_weights_unchanged(settings, monkeypatch):
    # cutoff_step: the weight is decided (and the permanent latch set) before the loss runs; a call
    # that then fails must not have switched CREPA off for the rest of the run.
    loss = CrepaLoss(_cfg(check_finite=True, **settings), 4, 4)
    loss(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=0)
    state = loss.scheduler.state_dict()
    weights = {k: v.clone() for k, v in loss.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError):
        loss(torch.randn(1, 3, 6, 4), torch.randn(1, 3, 4, 4), step=9, hidden_grid=(2, 2))
    # 6 tokens make no square grid, and grid mode (the features' grid is given) needs one
    with pytest.raises(ValueError, match="hidden_grid is required"):
        loss(torch.randn(1, 3, 6, 4), torch.randn(1, 3, 4, 4), step=9, feature_grid=(2, 2))
    # an input that passes the argument checks and fails once the schedule was asked
    with pytest.raises(ValueError, match="frame_features holds NaN"):
        loss(torch.randn(1, 3, 2, 4), torch.full((1, 3, 2, 4), float("nan")), step=9)

    def failing_loss(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the loss")

    monkeypatch.setattr("crepa_kernels.module.crepa_loss", failing_loss)
    with pytest.raises(torch.OutOfMemoryError):
        loss(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=9)
    assert loss.scheduler.state_dict() == state and not loss.scheduler.is_cutoff()
    assert all(torch.equal(weights[k], v) for k, v in loss.state_dict().items() if torch.is_tensor(v))
    monkeypatch.undo()
    _, logs = loss(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=1)
    assert logs["crepa_cutoff"] is False and float(logs["crepa_weight"]) == 0.5


def _cut_off_schedule(loss, align_with_e0):
    loss(torch.randn(1, 3, 2, 4), align_with_e0(loss), step=0)  # score 1 + 4e^-1/3 > the threshold
    assert loss.scheduler.is_cutoff()
    return loss


@pytest.mark.parametrize("break_it", ["shape", "missing", "unexpected", "schedule", "not a tensor"])
def test_a_rejected_checkpoint_changes_nothing(break_it, align_with_e0):
    # torch alone copies the entries that fit, applies the schedule's entry, then raises: the module
    # would be half-loaded and CREPA switched off by a checkpoint that was refused.
    saved = _cut_off_schedule(CrepaLoss(_cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4), align_with_e0)
    state = dict(saved.state_dict())
    if break_it == "shape":
        state["projector.1.weight"] = torch.zeros(5, 4)
    elif break_it == "missing":
        del state["projector.1.bias"]
    elif break_it == "unexpected":
        state["projector.2.weight"] = torch.zeros(4)
    elif break_it == "schedule":
        state["_extra_state"] = {"scheduler": {"similarity_ema": "abc", "cut_off": True}}
    else:
        state["projector.1.bias"] = [0.0] * 4
    target = CrepaLoss(_cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4)
    before = {k: v.clone() for k, v in target.projector.state_dict().items()}
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        target.load_state_dict(state)
    assert target.scheduler.state_dict() == {"similarity_ema": None, "cut_off": False}
    assert all(torch.equal(v, before[k]) for k, v in target.projector.state_dict().items())
    # Inside a parent model torch raises (a bad schedule entry is reported too); when this module's
    # weights cannot load, its schedule is left alone. (Missing and unexpected keys follow torch's rules
    # there: it loads what fits, then raises.)
    parent, source = nn.Module(), nn.Module()
    parent.crepa = target
    with pytest.raises(RuntimeError, match="_extra_state" if break_it == "schedule" else None):
        parent.load_state_dict({"crepa." + k: v for k, v in state.items()})
    if break_it not in ("missing", "unexpected"):
        assert target.scheduler.state_dict() == {"similarity_ema": None, "cut_off": False}
    source.crepa = saved
    parent.load_state_dict(source.state_dict())  # and a good one loads, schedule included
    assert target.scheduler.is_cutoff()


@pytest.mark.parametrize("through_parent", [False, True])
@pytest.mark.parametrize("change", ["extra key", "missing key"])
def test_a_non_strict_load_brings_the_schedule_with_the_weights(change, through_parent, align_with_e0):
    # strict=False tolerates the keys; what loads includes the cutoff latch, or a resumed run would
    # switch CREPA back on after a permanent cutoff. (Torch passes strict=True to each module's own
    # loader whatever the caller asked: the module must not read that as a failure.)
    saved = _cut_off_schedule(CrepaLoss(_cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4), align_with_e0)
    state = dict(saved.state_dict())
    if change == "extra key":
        state["projector.2.weight"] = torch.zeros(4)
    else:
        del state["projector.0.weight"]
    target = CrepaLoss(_cfg(similarity_threshold=0.5, similarity_ema_decay=0.0), 4, 4)
    if through_parent:
        parent = nn.Module()
        parent.crepa = target
        parent.load_state_dict({"crepa." + k: v for k, v in state.items()}, strict=False)
    else:
        target.load_state_dict(state, strict=False)
    assert target.scheduler.is_cutoff()
    assert torch.equal(target.projector[1].weight, saved.projector[1].weight)


def test_a_state_dict_that_is_not_a_dict_is_a_type_error():
    with pytest.raises(TypeError, match="dict-like.*list"):
        CrepaLoss(_cfg(), 4, 4).load_state_dict([("projector.0.weight", torch.ones(4))])


def test_loading_with_assign_keeps_the_projector_float32():
    loss = CrepaLoss(_cfg(), 4, 4)
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in CrepaLoss(_cfg(), 4, 4).state_dict().items()}
    loss.load_state_dict(state, assign=True)
    assert all(p.dtype == torch.float32 for p in loss.projector.parameters())
    assert torch.equal(loss.projector[1].weight, state["projector.1.weight"].float())
    out, _ = loss(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4))
    assert out.dtype == torch.float32


def test_failed_cache_put_leaves_no_file(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError):
        cache.put("abc", torch.zeros(1, 2, 4, 3), grid=(3, 0))
    with pytest.raises(TypeError):
        cache.put("abc", [1, 2, 3])
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert leftovers == [] and cache.get("abc") is None


def test_exception_inside_offload_use_leaves_the_module_whole():
    module = nn.Linear(8, 8).requires_grad_(False)
    before = {k: (v.clone(), v.device) for k, v in module.state_dict().items()}
    manager = OffloadManager("offload", emulate_device=True)
    with pytest.raises(RuntimeError, match="boom"):
        with manager.use(module):
            raise RuntimeError("boom")
    for k, v in module.state_dict().items():
        assert v.device == before[k][1] and torch.equal(v, before[k][0])
    assert torch.equal(module(torch.ones(1, 8)), nn.functional.linear(torch.ones(1, 8), before["weight"][0],
                                                                       before["bias"][0]))
