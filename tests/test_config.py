"""CrepaConfig: keys, defaults, aliases, round trips and every validation error."""
import argparse
import re
import warnings

import numpy as np
import pytest

from crepa_kernels import CrepaConfig

SPEC_KEYS = [
    "crepa_enabled", "crepa_block_index", "crepa_lambda", "crepa_adjacent_distance", "crepa_adjacent_tau",
    "crepa_cumulative_neighbors", "crepa_normalize_neighbour_sum", "crepa_normalize_by_frames",
    "crepa_spatial_align", "crepa_encoder", "crepa_model", "crepa_encoder_image_size",
    "crepa_encoder_frames_batch_size", "crepa_use_backbone_features", "crepa_feature_source",
    "crepa_teacher_block_index", "crepa_drop_vae_encoder", "crepa_scheduler", "crepa_warmup_steps",
    "crepa_decay_steps", "crepa_lambda_end", "crepa_power", "crepa_cutoff_step", "crepa_similarity_threshold",
    "crepa_similarity_ema_decay", "crepa_threshold_mode",
]


def test_defaults_follow_spec():
    c = CrepaConfig()
    assert (c.lambda_, c.adjacent_distance, c.adjacent_tau) == (0.5, 1, 1.0)
    assert (c.cumulative_neighbors, c.normalize_neighbour_sum, c.normalize_by_frames, c.spatial_align) == (
        False, False, True, True)
    assert (c.encoder, c.encoder_image_size, c.feature_source) == ("dinov2_vitg14", 518, "encoder")
    assert (c.scheduler, c.warmup_steps, c.decay_steps, c.lambda_end, c.power, c.cutoff_step) == (
        "constant", 0, 0, 0.0, 1.0, 0)
    assert (c.similarity_threshold, c.similarity_ema_decay, c.threshold_mode) == (None, 0.99, "permanent")
    assert c.block_index is None and c.offload == "auto"


def test_every_spec_key_is_accepted_and_takes_effect():
    known = set(CrepaConfig.keys())
    assert [k for k in SPEC_KEYS if k not in known] == []
    # a non-default value for each key, and the field it must land in
    values = {
        "crepa_enabled": ("enabled", True), "crepa_block_index": ("block_index", 7), "crepa_lambda": ("lambda_", 0.3),
        "crepa_adjacent_distance": ("adjacent_distance", 3), "crepa_adjacent_tau": ("adjacent_tau", 2.5),
        "crepa_cumulative_neighbors": ("cumulative_neighbors", True),
        "crepa_normalize_neighbour_sum": ("normalize_neighbour_sum", True),
        "crepa_normalize_by_frames": ("normalize_by_frames", False), "crepa_spatial_align": ("spatial_align", False),
        "crepa_encoder": ("encoder", "dinov2_vitl14"), "crepa_model": ("encoder", "dinov2_vits14"),
        "crepa_encoder_image_size": ("encoder_image_size", 224),
        "crepa_encoder_frames_batch_size": ("encoder_frames_batch_size", 8),
        "crepa_use_backbone_features": ("feature_source", "backbone"),
        "crepa_feature_source": ("feature_source", "backbone"),
        "crepa_teacher_block_index": ("teacher_block_index", 9), "crepa_drop_vae_encoder": ("drop_vae_encoder", True),
        "crepa_scheduler": ("scheduler", "cosine"), "crepa_warmup_steps": ("warmup_steps", 5),
        "crepa_decay_steps": ("decay_steps", 50), "crepa_lambda_end": ("lambda_end", 0.1),
        "crepa_power": ("power", 2.0), "crepa_cutoff_step": ("cutoff_step", 100),
        "crepa_similarity_threshold": ("similarity_threshold", 0.9),
        "crepa_similarity_ema_decay": ("similarity_ema_decay", 0.5),
        "crepa_threshold_mode": ("threshold_mode", "recoverable"),
    }
    assert set(values) == set(SPEC_KEYS)
    for key, (field, value) in values.items():
        given = True if key == "crepa_use_backbone_features" else value
        extra = {"crepa_block_index": 0} if key == "crepa_enabled" else {}
        cfg = CrepaConfig.from_dict({key: given, **extra})
        assert getattr(cfg, field) == value, key
        assert getattr(CrepaConfig(), field) != value, f"{key}: pick a non-default value"


@pytest.mark.parametrize("order", ["flag_first", "source_first"])
def test_backbone_flag_is_not_lost_to_an_unset_feature_source(order):
    items = [("crepa_use_backbone_features", True), ("crepa_feature_source", None)]
    if order == "source_first":
        items.reverse()
    d = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_teacher_block_index": 3, **dict(items)}
    assert CrepaConfig.from_dict(d).feature_source == "backbone"
    assert CrepaConfig.from_namespace(argparse.Namespace(**d)).feature_source == "backbone"


@pytest.mark.parametrize("d,want", [
    ({"crepa_model": "dinov2_vits14", "crepa_encoder": None}, "dinov2_vits14"),
    ({"crepa_encoder": None, "crepa_model": "dinov2_vits14"}, "dinov2_vits14"),
    ({"crepa_model": None, "crepa_encoder": "dinov2_vitb14"}, "dinov2_vitb14"),
    ({"crepa_model": "dinov2_vits14", "crepa_encoder": "vit_small_patch14_dinov2"}, "dinov2_vits14"),
    # the common trainer's rule: crepa_model wins (its UI always fills crepa_encoder with the default)
    ({"crepa_model": "dinov2_vits14", "crepa_encoder": "dinov2_vitg14"}, "dinov2_vits14"),
    ({"crepa_encoder": "dinov2_vitg14", "crepa_model": ""}, "dinov2_vitg14"),
])
def test_encoder_alias_with_unset_or_equivalent_values(d, want):
    assert CrepaConfig.from_dict(d).encoder == want


def test_from_dict_and_round_trip():
    d = {"crepa_enabled": True, "crepa_block_index": 8, "crepa_lambda": 0.3, "crepa_model": "dinov2_vits14",
         "crepa_encoder_image_size": 224, "crepa_scheduler": "cosine", "crepa_similarity_threshold": 0.9}
    c = CrepaConfig.from_dict(d)
    assert c.encoder == "dinov2_vits14" and c.lambda_ == 0.3 and c.block_index == 8
    again = CrepaConfig.from_dict(c.to_dict())
    assert again == c
    assert c.to_dict()["crepa_lambda"] == 0.3


def test_from_namespace_reads_crepa_attributes_and_ignores_others():
    ns = argparse.Namespace(crepa_enabled=True, crepa_block_index=4, crepa_scheduler=None, learning_rate=1e-4)
    c = CrepaConfig.from_namespace(ns)
    assert c.enabled and c.block_index == 4 and c.scheduler == "constant"  # None keeps the default


def test_a_none_weight_means_zero_as_in_the_common_trainer():
    # The trainer reads crepa_lambda as `value or 0.0`: a None weight adds nothing (said when enabled).
    assert CrepaConfig.from_namespace(argparse.Namespace(crepa_lambda=None)).lambda_ == 0.0
    with pytest.warns(UserWarning, match="crepa_lambda=None is read as 0"):
        c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 1, "crepa_lambda": None})
    assert c.lambda_ == 0.0
    assert CrepaConfig.from_dict({}).lambda_ == 0.5  # unset: the default


def test_the_common_trainers_newer_keys_and_feature_source_names():
    # A namespace of a trainer version with the self-flow teacher carries its keys, off by default.
    ns = argparse.Namespace(crepa_enabled=True, crepa_block_index=2, crepa_self_flow=False,
                            crepa_self_flow_mask_ratio=0.1, crepa_feature_source=None)
    assert CrepaConfig.from_namespace(ns).feature_source == "encoder"
    assert {"crepa_self_flow", "crepa_self_flow_mask_ratio"} <= set(CrepaConfig.keys())
    with pytest.raises(ValueError, match="crepa_self_flow=true: the self-flow teacher is not supported"):
        CrepaConfig.from_dict({"crepa_self_flow": True})
    for name in ("self_flow", "SelfFlow"):
        with pytest.raises(ValueError, match="self-flow teacher is not supported"):
            CrepaConfig.from_dict({"crepa_feature_source": name})
    # the trainer's other names for the two sources
    assert CrepaConfig.from_dict({"crepa_feature_source": " External "}).feature_source == "encoder"
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2, "crepa_teacher_block_index": 5,
                               "crepa_feature_source": "internal", "crepa_use_backbone_features": True})
    assert c.feature_source == "backbone"
    # either key asks for the backbone: the other one's default cannot overrule it
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2, "crepa_teacher_block_index": 5,
                               "crepa_feature_source": "external", "crepa_use_backbone_features": True})
    assert c.feature_source == "backbone"
    # any case and spacing, with or without the boolean form
    assert CrepaConfig.from_dict({"crepa_feature_source": "Encoder",
                                  "crepa_use_backbone_features": False}).feature_source == "encoder"
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 1, "crepa_teacher_block_index": 2,
                               "crepa_feature_source": " Backbone ", "crepa_use_backbone_features": True})
    assert c.feature_source == "backbone"


def test_backbone_switch_aliases():
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2, "crepa_use_backbone_features": True,
                               "crepa_teacher_block_index": 6})
    assert c.feature_source == "backbone" and c.use_backbone_features


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match="did you mean crepa_lambda"):
        CrepaConfig.from_dict({"crepa_lamda": 0.5})


@pytest.mark.parametrize("d,msg", [
    ({"crepa_scheduler": "exp"}, "crepa_scheduler must be one of constant, linear, cosine, polynomial; got 'exp'"),
    ({"crepa_threshold_mode": "sticky"}, "crepa_threshold_mode must be one of permanent, recoverable"),
    ({"crepa_similarity_ema_decay": 1.5}, "crepa_similarity_ema_decay must satisfy 0 <= decay <= 1, got 1.5"),
    ({"crepa_similarity_ema_decay": -0.1}, "crepa_similarity_ema_decay must satisfy"),
    ({"crepa_adjacent_distance": -1}, "crepa_adjacent_distance must be >= 0, got -1"),
    ({"crepa_adjacent_distance": 1.5}, "crepa_adjacent_distance must be an int, got 1.5"),
    ({"crepa_adjacent_tau": 0}, "crepa_adjacent_tau must be > 0 and finite, got 0.0"),
    ({"crepa_adjacent_tau": float("inf")}, "crepa_adjacent_tau must be finite"),
    ({"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 500},
     "crepa_encoder_image_size must be a positive multiple of the encoder patch size 14, got 500"),
    ({"crepa_encoder_image_size": 0}, "crepa_encoder_image_size must be >= 1"),
    ({"crepa_enabled": True}, "crepa_block_index must be set"),
    ({"crepa_block_index": -2}, "crepa_block_index must be >= 0, got -2"),
    ({"crepa_block_index": "eight"}, "crepa_block_index must be an int, got 'eight'"),
    ({"crepa_enabled": "maybe"}, "crepa_enabled must be a boolean, got 'maybe'"),
    ({"crepa_lambda": "big"}, "crepa_lambda must be a number, got 'big'"),
    ({"crepa_lambda": -1}, "crepa_lambda must be >= 0"),
    ({"crepa_power": 0}, "crepa_power must be > 0"),
    ({"crepa_offload": "gpu"}, "crepa_offload must be one of auto, resident, offload"),
    ({"crepa_vae_channels_last": "sometimes"}, "crepa_vae_channels_last must be a boolean, got 'sometimes'"),
    ({"crepa_encoder_dtype": "fp8"}, "crepa_encoder_dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"),
    ({"crepa_feature_source": "vae"}, "crepa_feature_source must be one of encoder, backbone"),
    ({"crepa_enabled": True, "crepa_block_index": 3, "crepa_feature_source": "backbone",
      "crepa_teacher_block_index": 2}, "must not be shallower than crepa_block_index"),
    ({"learning_rate": 1.0}, "every key starts with 'crepa_'"),
])
def test_config_errors(d, msg):
    with pytest.raises(ValueError) as e:
        CrepaConfig.from_dict(d)
    assert msg in str(e.value)


def test_what_the_common_trainer_accepts_is_accepted():
    # an empty encoder name is the default; an EMA decay of 1 keeps the first score; with CREPA off
    # the encoder's image size is not checked (no encoder is built)
    c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder": "",
                               "crepa_similarity_ema_decay": 1.0})
    assert c.encoder == "dinov2_vitg14" and c.similarity_ema_decay == 1.0
    assert CrepaConfig.from_dict({"crepa_model": "dinov2_vitl14", "crepa_encoder": ""}).encoder == "dinov2_vitl14"
    assert CrepaConfig.from_dict({"crepa_enabled": False, "crepa_encoder_image_size": 512}).encoder_image_size == 512


def test_from_dict_requires_mapping():
    with pytest.raises(TypeError, match="from_dict expects a mapping"):
        CrepaConfig.from_dict([("crepa_lambda", 1)])


def test_string_values_from_cli_are_parsed():
    c = CrepaConfig.from_dict({"crepa_enabled": "true", "crepa_block_index": "8", "crepa_spatial_align": "false"})
    assert c.enabled is True and c.block_index == 8 and c.spatial_align is False


@pytest.mark.parametrize("text, want", [("1", True), ("true", True), ("Yes", True), (" on ", True), (1, True),
                                        ("0", False), ("FALSE", False), ("no", False), ("off", False), (0, False)])
def test_every_boolean_spelling(text, want):
    assert CrepaConfig.from_dict({"crepa_spatial_align": text}).spatial_align is want


@pytest.mark.parametrize("text, want", [(np.True_, True), (np.False_, False), (np.int64(1), True),
                                        (np.uint8(0), False)])
def test_numpy_booleans_and_zero_or_one_are_booleans(text, want):
    # values from a numpy-based sweep table
    assert CrepaConfig.from_dict({"crepa_spatial_align": text}).spatial_align is want


def test_numpy_numbers_are_read_as_python_numbers():
    c = CrepaConfig.from_dict({"crepa_enabled": np.True_, "crepa_block_index": np.int64(8),
                               "crepa_adjacent_distance": np.int32(2), "crepa_lambda": np.float32(0.25),
                               "crepa_warmup_steps": np.float64(100.0)})
    assert (c.enabled, c.block_index, c.adjacent_distance, c.lambda_, c.warmup_steps) == (True, 8, 2, 0.25, 100)
    assert type(c.block_index) is int and type(c.adjacent_distance) is int and type(c.lambda_) is float
    # a numpy bool is no number
    for key in ("crepa_block_index", "crepa_lambda"):
        with pytest.raises(ValueError, match=f"{key} must be (an int|a number), got np.True_"):
            CrepaConfig.from_dict({key: np.True_})


@pytest.mark.parametrize("bad", [2, -1, "enabled", 0.5, np.int64(2), np.float64(1.0)])
def test_what_is_no_boolean_is_refused(bad):
    with pytest.raises(ValueError, match=re.escape(f"crepa_spatial_align must be a boolean, got {bad!r}")):
        CrepaConfig.from_dict({"crepa_spatial_align": bad})


def test_dashed_cli_spellings_of_the_keys_are_read():
    c = CrepaConfig.from_dict({"--crepa-lambda": 0.3, "crepa-block-index": 3})
    assert c.lambda_ == 0.3 and c.block_index == 3
    # a trainer's config.json may keep the command line's spelling: from_namespace reads it too
    c = CrepaConfig.from_namespace({"--crepa_enabled": True, "--crepa-block-index": 8, "--crepa_lambda": 0.3,
                                    "--learning_rate": 1e-4})
    assert c.enabled and c.block_index == 8 and c.lambda_ == 0.3
    with pytest.raises(ValueError, match="config keys 'crepa_lambda' and '--crepa-lambda' both set crepa_lambda"):
        CrepaConfig.from_dict({"crepa_lambda": 0.3, "--crepa-lambda": 0.4})


@pytest.mark.parametrize("all_frames", [0, -1, None])
def test_encoder_frames_batch_size_zero_or_negative_means_all_frames(all_frames):
    assert CrepaConfig.from_dict({"crepa_encoder_frames_batch_size": all_frames}).encoder_frames_batch_size is None
    assert CrepaConfig.from_dict({"crepa_encoder_frames_batch_size": 4}).encoder_frames_batch_size == 4


def test_backbone_teacher_falls_back_to_the_student_block_with_a_warning():
    # The common trainer's documented default: an unset teacher block is the student block (detached).
    with pytest.warns(UserWarning, match="crepa_teacher_block_index is unset: the teacher is block 3 itself"):
        c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 3, "crepa_feature_source": "backbone"})
    assert c.teacher_block_index is None and c.teacher_block == 3  # resolved, not stored
    with pytest.warns(UserWarning):
        assert c.replace(block_index=5).teacher_block == 5  # follows the student block
        assert CrepaConfig.from_dict(c.to_dict()) == c
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # set: no warning
        c = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 3, "crepa_feature_source": "backbone",
                                   "crepa_teacher_block_index": 3})
    assert c.teacher_block == 3


@pytest.mark.parametrize("flag, source", [(True, "encoder"), (False, "backbone"), ("true", None), (True, None)])
def test_a_trainer_namespace_selects_the_backbone_through_either_key(flag, source):
    """A trainer's namespace holds both keys, one of them at its default (False / 'encoder')."""
    ns = argparse.Namespace(crepa_enabled=True, crepa_block_index=2, crepa_teacher_block_index=6,
                            crepa_use_backbone_features=flag, crepa_feature_source=source)
    c = CrepaConfig.from_namespace(ns)
    assert c.feature_source == "backbone" and c.use_backbone_features and c.teacher_block == 6


def test_both_feature_source_keys_at_their_defaults_mean_the_encoder():
    ns = argparse.Namespace(crepa_enabled=True, crepa_block_index=2, crepa_use_backbone_features=False,
                            crepa_feature_source="encoder")
    assert CrepaConfig.from_namespace(ns).feature_source == "encoder"
    assert CrepaConfig.from_dict({"crepa_use_backbone_features": "false"}).feature_source == "encoder"


@pytest.mark.parametrize("field,value,msg", [
    ("lambda_", float("nan"), "crepa_lambda must be finite"),
    ("similarity_ema_decay", 5.0, "crepa_similarity_ema_decay must satisfy"),
    ("scheduler", "bogus", "crepa_scheduler must be one of"),
    ("adjacent_tau", -1.0, "crepa_adjacent_tau must be > 0"),
    ("adjacent_distance", 1.5, "crepa_adjacent_distance"),
    ("enabled", "maybe", "crepa_enabled"),
])
def test_a_field_set_after_construction_is_checked_and_a_refused_value_changes_nothing(field, value, msg):
    # CrepaLoss and the schedule read the config they were given at every step: a value set later
    # must pass the constructor's checks, or a NaN weight would reach the loss unchecked.
    config = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2})
    before = config.to_dict()
    with pytest.raises(ValueError, match=msg):
        setattr(config, field, value)
    assert config.to_dict() == before


def test_fields_set_after_construction_are_normalised_and_may_come_in_any_order():
    config = CrepaConfig()
    config.enabled = "true"  # crepa_enabled needs crepa_block_index, set next: checked by validate()
    config.block_index = "3"
    config.encoder_frames_batch_size = -1
    config.lambda_ = "0.25"
    assert (config.enabled, config.block_index, config.encoder_frames_batch_size, config.lambda_) == (True, 3, None,
                                                                                                    0.25)
    config.validate()
    config.block_index = None
    with pytest.raises(ValueError, match="crepa_block_index must be set"):
        config.validate()


def test_assignment_checks_on_a_subclass_run_the_base_checks_only():
    # A subclass may add fields without defaults and rules of its own, and set base fields in its
    # __post_init__: an assignment checks the base field alone, without building the subclass again.
    import dataclasses

    @dataclasses.dataclass
    class RunConfig(CrepaConfig):
        run_name: str = dataclasses.field(default=None, kw_only=True)
        max_lambda: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            if self.run_name is None:
                raise ValueError("run_name is required")
            self.lambda_ = min(self.lambda_, self.max_lambda)  # a base field, set after the base checks

    config = RunConfig(run_name="a", max_lambda=5.0, lambda_=3.0)
    assert config.lambda_ == 3.0
    config.lambda_ = 4.0
    config.run_name = "b"
    assert (config.lambda_, config.run_name) == (4.0, "b")
    with pytest.raises(ValueError, match="crepa_lambda must be finite"):
        config.lambda_ = float("inf")
    assert config.lambda_ == 4.0
    assert set(vars(config)) == {f.name for f in dataclasses.fields(config)}  # no bookkeeping in the instance
    assert CrepaConfig(**{k: v for k, v in vars(CrepaConfig()).items()}) == CrepaConfig()


@pytest.mark.parametrize("name,msg", [
    ("lamda", "CrepaConfig has no field 'lamda'; did you mean 'lambda_'?"),
    ("warmup", "did you mean 'warmup_steps'?"),
    ("crepa_lambda", "config key 'crepa_lambda' is the field 'lambda_'"),
    ("crepa_model", "config key 'crepa_model' is the field 'encoder'"),
    ("learning_rate", "CrepaConfig has no field 'learning_rate' \\(fields are the config keys"),
])
def test_a_misspelt_field_set_after_construction_is_refused(name, msg):
    # from_dict refuses an unknown key; an assignment must not make a new attribute that nothing reads
    config = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2})
    before = config.to_dict()
    with pytest.raises(AttributeError, match=msg):
        setattr(config, name, 0.1)
    assert config.to_dict() == before and name not in vars(config)


def test_a_subclass_keeps_attributes_of_its_own_but_not_a_config_keys_name():
    # trainers subclass the config and keep derived attributes on it (set in __post_init__, in their
    # own __init__, or later); only a crepa_* key's name is refused there, as it is never meant
    import dataclasses

    @dataclasses.dataclass
    class RunConfig(CrepaConfig):
        run_name: str = "a"

        def __post_init__(self):
            super().__post_init__()
            self.output_dir = f"runs/{self.run_name}"

    class TrainerConfig(CrepaConfig):
        def __init__(self, lr, **kw):
            super().__init__(**kw)
            self.lr = lr

    config = RunConfig()
    config.run_name, config.note = "b", "c"
    assert (config.output_dir, config.run_name, config.note) == ("runs/a", "b", "c")
    assert TrainerConfig(3e-4, lambda_=0.25).lr == 3e-4
    with pytest.raises(AttributeError, match="RunConfig has no field 'crepa_lambda': config key 'crepa_lambda' is "
                                             "the field 'lambda_'"):
        config.crepa_lambda = 0.3
    assert config.lambda_ == 0.5


def test_the_derived_key_names_the_field_it_sets():
    with pytest.raises(AttributeError, match="'crepa_use_backbone_features': that config key sets the field "
                                             "'feature_source'"):
        CrepaConfig().crepa_use_backbone_features = True


@pytest.mark.parametrize("key,value,want", [
    ("crepa_similarity_threshold", "None", None),
    ("crepa_similarity_threshold", "null", None),
    ("crepa_similarity_threshold", " ", None),
    ("crepa_teacher_block_index", "none", None),
    ("crepa_encoder_weights", "", None),
    ("crepa_decay_steps", "500.0", 500),
    ("crepa_warmup_steps", "1e3", 1000),
    ("crepa_encoder_frames_batch_size", "all", None),
    ("crepa_encoder_frames_batch_size", "4.0", 4),
    ("crepa_encoder_dtype", "bf16", "bfloat16"),
    ("crepa_encoder_dtype", "FP16", "float16"),
    ("crepa_encoder_dtype", "fp32", "float32"),
    ("crepa_decay_steps", "9007199254740993.0", 2 ** 53 + 1),  # read exactly, not through a float
    ("crepa_lambda", "none", 0.0),  # as a None weight: 0 (with the trainer's warning when enabled)
    ("crepa_model", "null", "dinov2_vitg14"),  # as a None model: not given
])
def test_cli_and_yaml_spellings_of_a_value(key, value, want):
    # what a command line or a YAML file passes as a string: "none" for an optional key, an integral
    # float for an int (the float 500.0 itself is accepted), the table's "all", the usual dtype names
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "crepa_lambda=None is read as 0")
        config = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2, key: value})
    assert getattr(config, CrepaConfig._field_for_key(key)) == want


@pytest.mark.parametrize("key,value", [("crepa_decay_steps", "500.5"), ("crepa_decay_steps", "inf"),
                                       ("crepa_offload", "none"),  # a mode, not an absence: never the default
                                       ("crepa_block_index", "nan"), ("crepa_encoder_dtype", "bf32"),
                                       ("crepa_encoder_frames_batch_size", "most")])
def test_strings_that_are_not_a_value_of_the_key_are_refused(key, value):
    with pytest.raises(ValueError, match=f"{key} must"):
        CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 2, key: value})
