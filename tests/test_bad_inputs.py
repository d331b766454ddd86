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
    ("DinoEncoder", lambda m: DinoEncoder("dinov2_vitq14"), ValueError, ["'dinov2_vitq14'", "expected one of"]),
    ("DinoEncoder", lambda m: DinoEncoder(model=m.vit, image_size=50), ValueError, ["image_size", "50", "multiple of 14"]),
    ("DinoEncoder.encode", lambda m: m.encoder.encode(torch.rand(1, 2, 4, 56, 56)), ValueError,
     ["frames", "3 (RGB) channels", "(1, 2, 4, 56, 56)"]),
    ("adapter_for", lambda m: adapter_for(nn.Conv3d(1, 1, 1)), TypeError, ["Conv3d", "AutoencoderKLWan"]),
    ("VaeAdapter.decode", lambda m: adapter_for(m.vae).decode(torch.rand(1, 3, 2, 4, 4)), ValueError,
     ["latents", "4 channels", "(1, 3, 2, 4, 4)"]),
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


def test_failed_forward_leaves_schedule_and_weights_unchanged():
    loss = CrepaLoss(_cfg(similarity_threshold=0.9), 4, 4)
    loss(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), step=0)
    state = loss.scheduler.state_dict()
    weights = {k: v.clone() for k, v in loss.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError):
        loss(torch.randn(1, 3, 6, 4), torch.randn(1, 3, 4, 4), step=1, hidden_grid=(2, 2))
    # An input that passes the module's own checks and fails inside the loss, after the projector
    # ran: the schedule must not have been fed anything either.
    with pytest.raises(ValueError, match="batch sizes differ"):
        loss(torch.randn(2, 3, 2, 4), torch.randn(1, 3, 2, 4), step=1)
    assert loss.scheduler.state_dict() == state
    assert all(torch.equal(weights[k], v) for k, v in loss.state_dict().items() if torch.is_tensor(v))


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
