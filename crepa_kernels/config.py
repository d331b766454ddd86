"""CrepaConfig: every ``crepa_*`` key users already write, with defaults and validation."""
from __future__ import annotations

import decimal
import difflib
import math
import operator
import threading
import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")
FEATURE_SOURCES = ("encoder", "backbone")
OFFLOAD_MODES = ("auto", "resident", "offload")
ENCODER_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BACKENDS = ("auto", "torch", "triton")
ENCODER_PATCH_SIZE = 14


@dataclass
class CrepaConfig:
    """CREPA settings. Field names are the config keys without their ``crepa_`` prefix.

    ``from_dict`` / ``from_namespace`` read the prefixed names (``crepa_lambda`` ...), ``to_dict``
    writes them back, so a user's JSON or CLI namespace round-trips unchanged.
    """

    enabled: bool = False
    block_index: Optional[int] = None
    lambda_: float = 0.5
    adjacent_distance: int = 1
    adjacent_tau: float = 1.0
    cumulative_neighbors: bool = False
    normalize_neighbour_sum: bool = False
    normalize_by_frames: bool = True
    spatial_align: bool = True
    encoder: str = "dinov2_vitg14"
    encoder_image_size: int = 518
    encoder_frames_batch_size: Optional[int] = None
    feature_source: str = "encoder"
    teacher_block_index: Optional[int] = None
    drop_vae_encoder: bool = False
    vae_channels_last: bool = False
    use_tae: bool = False  # the trainer's Tiny AutoEncoder switch: honoured through the trainer's model object
    scheduler: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    lambda_end: float = 0.0
    power: float = 1.0
    cutoff_step: int = 0
    similarity_threshold: Optional[float] = None
    similarity_ema_decay: float = 0.99
    threshold_mode: str = "permanent"
    # Our additions (same prefix).
    offload: str = "auto"
    backend: str = "auto"
    check_finite: bool = False
    encoder_weights: Optional[str] = None
    encoder_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        # After construction (a field already set) an assignment is checked and normalised as the
        # constructor checks that field, so a NaN lambda or an unknown scheduler set later is refused
        # here instead of reaching the loss. The rules between fields (crepa_enabled needs
        # crepa_block_index, ...) are left to construction and validate(), so that fields can be set
        # in any order. A subclass's own rules apply at its construction and validate() too.
        if name in _FIELD_NAMES and name in self.__dict__ and id(self) not in _validating():
            value = _checked_field(self, name, value)
        elif (not name.startswith("_") and name not in self.__dict__ and not hasattr(type(self), name)
              and _FIELD_NAMES <= self.__dict__.keys()
              and (type(self) is CrepaConfig or name.startswith("crepa_"))):
            # A misspelt field set after construction (config.lamda = 0.1) would be a new attribute that
            # nothing reads. A subclass may keep attributes of its own: there only a config key's name
            # (config.crepa_lambda = 0.3) is refused.
            raise AttributeError(_unknown_attribute(type(self), name))
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _key_of(field_name: str) -> str:
        return "crepa_" + field_name.rstrip("_")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every config key this class accepts (prefixed names), aliases included."""
        return (tuple(cls._key_of(f.name) for f in fields(cls)) + tuple(_ALIASES) + tuple(_DERIVED)
                + tuple(_TRAINER_ONLY))

    @classmethod
    def _field_for_key(cls, key: str) -> str:
        key = _ALIASES.get(key, key)
        by_key = {cls._key_of(f.name): f.name for f in fields(cls)}
        if key in by_key:
            return by_key[key]
        suggestion = difflib.get_close_matches(key, list(by_key) + list(_ALIASES), n=1, cutoff=0.6)
        hint = f"; did you mean {suggestion[0]}?" if suggestion else ""
        raise ValueError(f"unknown CREPA config key {key!r}{hint}")

    # ------------------------------------------------------------ builders
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CrepaConfig":
        """Build from ``crepa_*`` keys (JSON / CLI names). Unknown ``crepa_*`` keys are errors."""
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping of crepa_* keys, got {type(d).__name__}")
        norm: dict[str, Any] = {}
        given: dict[str, str] = {}  # normalised name -> the key as written
        for key, value in d.items():
            if not isinstance(key, str):
                raise TypeError(f"config keys must be strings, got {key!r}")
            name = config_key_name(key)
            if not name.startswith("crepa_"):
                raise ValueError(f"unknown CREPA config key {key!r}: every key starts with 'crepa_'")
            if name not in _NO_FIELD:
                cls._field_for_key(name)  # unknown keys fail here, with a suggestion
            if name in given:
                raise ValueError(f"config keys {given[name]!r} and {key!r} both set {name}; give it once")
            given[name] = key
            # a command line's or YAML file's spelling of none, where None means something: an optional
            # key, crepa_lambda (0, as the trainer reads it) and crepa_model (not given)
            if name in _NONE_MEANS and _is_none(value):
                value = None
            norm[name] = value

        kwargs: dict[str, Any] = {}
        for name, value in norm.items():
            if name not in _NO_FIELD and name not in _ALIASES:
                kwargs[cls._field_for_key(name)] = value

        # crepa_model is an alias of crepa_encoder; as in the common trainer, crepa_model wins when both
        # are given (its UI always fills crepa_encoder), and a None (or empty) value means "not given".
        model = norm.get("crepa_model")
        if model:
            kwargs["encoder"] = model
        elif isinstance(kwargs.get("encoder"), str) and not kwargs["encoder"].strip():
            del kwargs["encoder"]  # an empty name means the default, as the common trainer reads it

        # The trainer's self-flow teacher is not implemented here: its keys are accepted while it is off.
        if _as_bool("crepa_self_flow", norm.get("crepa_self_flow") or False):
            raise ValueError("crepa_self_flow=true: the self-flow teacher is not supported by crepa_kernels; "
                             "use crepa_feature_source='encoder' or 'backbone'")

        # crepa_use_backbone_features is the boolean form of crepa_feature_source. A trainer's namespace
        # carries both, each at its default (False, 'encoder') unless set, so the backbone is chosen when
        # either asks for it; neither default can overrule the other key.
        use_backbone, raw_source = norm.get("crepa_use_backbone_features"), norm.get("crepa_feature_source")
        source = None if raw_source is None else _feature_source(raw_source)
        if source is not None:
            kwargs["feature_source"] = source
        if use_backbone is not None and _as_bool("crepa_use_backbone_features", use_backbone):
            kwargs["feature_source"] = "backbone"
        elif use_backbone is not None and source is None:
            kwargs["feature_source"] = "encoder"
        # None means "use the default" for keys users leave unset on a CLI namespace, except
        # crepa_lambda: the trainer reads a None weight as 0 (CREPA adds nothing).
        if "crepa_lambda" in norm and norm["crepa_lambda"] is None:
            if _as_bool("crepa_enabled", norm.get("crepa_enabled") or False):
                warnings.warn("crepa_lambda=None is read as 0, as in the common trainer: no CREPA loss is added",
                              UserWarning, stacklevel=3)
            kwargs["lambda_"] = 0.0
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in _NULLABLE}
        return cls(**kwargs)

    @classmethod
    def from_namespace(cls, obj: Any) -> "CrepaConfig":
        """Build from any object with ``crepa_*`` attributes (argparse namespace, trainer config)."""
        if isinstance(obj, Mapping):
            # config files may write keys as on the command line (--crepa_lambda, --crepa-lambda)
            items = {k: v for k, v in obj.items() if isinstance(k, str) and config_key_name(k).startswith("crepa_")}
        else:
            names = [n for n in dir(obj) if n.startswith("crepa_")]
            items = {n: getattr(obj, n) for n in names if not callable(getattr(obj, n))}
        return cls.from_dict(items)

    def to_dict(self) -> dict[str, Any]:
        return {self._key_of(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "CrepaConfig":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return type(self)(**d)

    @property
    def use_backbone_features(self) -> bool:
        return self.feature_source == "backbone"

    @property
    def teacher_block(self) -> Optional[int]:
        """The backbone teacher's block: ``teacher_block_index``, or ``block_index`` when it is unset."""
        return self.block_index if self.teacher_block_index is None else self.teacher_block_index

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field and the rules between them; normalises values (``"true"`` -> True, a
        non-positive frames batch size -> None)."""
        busy = _validating()
        busy.add(id(self))  # the checks below assign fields directly
        try:
            self._validate()
        finally:
            busy.discard(id(self))

    def _validate(self) -> None:
        self.enabled = _as_bool("crepa_enabled", self.enabled)
        for name in ("cumulative_neighbors", "normalize_neighbour_sum", "normalize_by_frames",
                     "spatial_align", "drop_vae_encoder", "vae_channels_last", "use_tae", "check_finite"):
            setattr(self, name, _as_bool(self._key_of(name), getattr(self, name)))

        self.block_index = _opt_int("crepa_block_index", self.block_index, minimum=0)
        if self.enabled and self.block_index is None:
            raise ValueError("crepa_block_index must be set (a non-negative int) when crepa_enabled is true")
        self.teacher_block_index = _opt_int("crepa_teacher_block_index", self.teacher_block_index, minimum=0)

        self.lambda_ = _finite_float("crepa_lambda", self.lambda_)
        if self.lambda_ < 0:
            raise ValueError(f"crepa_lambda must be >= 0, got {self.lambda_}")
        self.lambda_end = _finite_float("crepa_lambda_end", self.lambda_end)
        if self.lambda_end < 0:  # a negative weight would push the student away from the teacher
            raise ValueError(f"crepa_lambda_end must be >= 0, got {self.lambda_end}")
        self.power = _finite_float("crepa_power", self.power)
        if self.power <= 0:
            raise ValueError(f"crepa_power must be > 0, got {self.power}")

        self.adjacent_distance = _int("crepa_adjacent_distance", self.adjacent_distance, minimum=0)
        self.adjacent_tau = _finite_float("crepa_adjacent_tau", self.adjacent_tau)
        if not self.adjacent_tau > 0:
            raise ValueError(f"crepa_adjacent_tau must be > 0 and finite, got {self.adjacent_tau}")

        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise ValueError(f"crepa_encoder must be a non-empty model name, got {self.encoder!r}")
        self.encoder_image_size = _int("crepa_encoder_image_size", self.encoder_image_size, minimum=1)
        # checked where an encoder will be built: a trainer with CREPA off may carry any size
        if self.enabled and self.encoder_image_size % ENCODER_PATCH_SIZE:
            raise ValueError(
                f"crepa_encoder_image_size must be a positive multiple of the encoder patch size "
                f"{ENCODER_PATCH_SIZE}, got {self.encoder_image_size}"
            )
        # 0 or a negative value means "all frames at once", as users already write it (-1).
        frames = self.encoder_frames_batch_size
        frames = None if isinstance(frames, str) and frames.strip().lower() == "all" else frames
        self.encoder_frames_batch_size = _opt_int("crepa_encoder_frames_batch_size", frames)
        if self.encoder_frames_batch_size is not None and self.encoder_frames_batch_size <= 0:
            self.encoder_frames_batch_size = None

        self.feature_source = _choice("crepa_feature_source", self.feature_source, FEATURE_SOURCES)
        if self.enabled and self.feature_source == "backbone":
            if self.teacher_block_index is None:
                # The common trainer's documented fallback: the student block itself, detached (the field
                # stays unset; `teacher_block` resolves it).
                warnings.warn(f"crepa_teacher_block_index is unset: the teacher is block {self.block_index} itself "
                              "(crepa_block_index, detached), as in the common trainer; a deeper block gives the "
                              "usual teacher", UserWarning, stacklevel=3)
            elif self.teacher_block_index < self.block_index:
                raise ValueError(
                    f"crepa_teacher_block_index ({self.teacher_block_index}) must not be shallower than "
                    f"crepa_block_index ({self.block_index})"
                )

        self.scheduler = _choice("crepa_scheduler", self.scheduler, SCHEDULERS)
        self.threshold_mode = _choice("crepa_threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        self.warmup_steps = _int("crepa_warmup_steps", self.warmup_steps, minimum=0)
        self.decay_steps = _int("crepa_decay_steps", self.decay_steps, minimum=0)
        self.cutoff_step = _int("crepa_cutoff_step", self.cutoff_step, minimum=0)
        self.similarity_threshold = (None if _is_none(self.similarity_threshold)
                                     else _finite_float("crepa_similarity_threshold", self.similarity_threshold))
        self.similarity_ema_decay = _finite_float("crepa_similarity_ema_decay", self.similarity_ema_decay)
        if not 0.0 <= self.similarity_ema_decay <= 1.0:  # 1: the first score, kept (the trainer allows it)
            raise ValueError(
                f"crepa_similarity_ema_decay must satisfy 0 <= decay <= 1, got {self.similarity_ema_decay}"
            )

        self.offload = _choice("crepa_offload", self.offload, OFFLOAD_MODES)
        self.backend = _choice("crepa_backend", self.backend, BACKENDS)
        if _is_none(self.encoder_weights):
            self.encoder_weights = None
        elif not isinstance(self.encoder_weights, str):
            self.encoder_weights = str(self.encoder_weights)  # a pathlib.Path is fine
        dtype = self.encoder_dtype
        dtype = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype) if isinstance(dtype, str) else dtype
        self.encoder_dtype = _choice("crepa_encoder_dtype", dtype, ENCODER_DTYPES)


def config_key_name(key: str) -> str:
    """A config key as written in a JSON file or on a command line (``--crepa-lambda``), as its name
    (``crepa_lambda``)."""
    return (key[2:] if key.startswith("--") else key).replace("-", "_")


_FIELD_NAMES = frozenset(f.name for f in fields(CrepaConfig))


def _unknown_attribute(cls: type, name: str) -> str:
    if name == "crepa_use_backbone_features":
        return (f"{cls.__name__} has no field {name!r}: that config key sets the field 'feature_source' "
                f"('backbone' when true, 'encoder' when false)")
    try:  # a config key (crepa_lambda) names its field
        return f"{cls.__name__} has no field {name!r}: config key {name!r} is the field {cls._field_for_key(name)!r}"
    except ValueError:
        close = difflib.get_close_matches(name, sorted(f.name for f in fields(cls)), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"{cls.__name__} has no field {name!r}{hint} (fields are the config keys without their crepa_ "
            f"prefix: lambda_ for crepa_lambda)")


_THREAD = threading.local()


def _validating() -> set:
    """Ids of the configs whose validate() runs on this thread (their assignments are its own)."""
    busy = getattr(_THREAD, "busy", None)
    if busy is None:
        busy = _THREAD.busy = set()
    return busy


def _checked_field(config: CrepaConfig, name: str, value: Any) -> Any:
    """``value`` for field ``name`` of ``config`` as the constructor would check and normalise it: the
    base class's checks on a bare copy (no subclass __init__ runs), with ``enabled`` off, which gates
    every rule between fields."""
    if name == "enabled":
        return _as_bool("crepa_enabled", value)
    trial = object.__new__(CrepaConfig)
    trial.__dict__.update({f: config.__dict__[f] for f in _FIELD_NAMES}, enabled=False)
    trial.__dict__[name] = value
    CrepaConfig.validate(trial)
    return trial.__dict__[name]
_ALIASES = {"crepa_model": "crepa_encoder"}
_DERIVED = {"crepa_use_backbone_features"}  # keys that set another field; handled in from_dict
# The common trainer's keys for a feature not implemented here: accepted while it is off.
_TRAINER_ONLY = {"crepa_self_flow", "crepa_self_flow_mask_ratio"}
_NO_FIELD = _DERIVED | _TRAINER_ONLY  # accepted keys that fill no field of their own
# The trainer's other names for the feature sources.
_FEATURE_SOURCE_ALIASES = {"internal": "backbone", "external": "encoder"}


def _feature_source(value: Any) -> Any:
    """crepa_feature_source with the trainer's aliases resolved; its self-flow source is refused here,
    anything else is left for validate() to judge."""
    if not isinstance(value, str):
        return value
    name = value.strip().lower()
    if name in ("self_flow", "selfflow"):
        raise ValueError(f"crepa_feature_source={value!r}: the self-flow teacher is not supported by crepa_kernels; "
                         "use 'encoder' or 'backbone'")
    return _FEATURE_SOURCE_ALIASES.get(name, name)


_NULLABLE = {"block_index", "teacher_block_index", "similarity_threshold", "encoder_frames_batch_size",
             "encoder_weights"}
# The keys whose None has a meaning, so that a string spelling of none reads as None in from_dict.
_NONE_MEANS = {"crepa_" + f.rstrip("_") for f in _NULLABLE} | {"crepa_lambda", "crepa_model"}


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def is_bool(value: Any) -> bool:
    """A Python or numpy bool (numpy's converts to float, so it must be told from a number by type)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def as_index(value: Any) -> Optional[int]:
    """An integer of any kind (a numpy integer too, never a bool) as a Python int; None for anything else."""
    if is_bool(value) or isinstance(value, (str, float)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _as_bool(key: str, value: Any) -> bool:
    if is_bool(value):
        return bool(value)
    if as_index(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{key} must be a boolean, got {value!r}")


# How a CLI or YAML value spells "none" for an optional key (a YAML null is None already).
_NONE = {"none", "null", ""}


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE)


def _int(key: str, value: Any, *, minimum: Optional[int] = None) -> int:
    if is_bool(value):
        raise ValueError(f"{key} must be an int, got {value!r}")
    index = as_index(value)
    if index is not None:
        value = index
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:  # "500.0" or "1e3", as the float 500.0 is accepted (read exactly, not through a float)
                exact = decimal.Decimal(text)
            except decimal.InvalidOperation:
                raise ValueError(f"{key} must be an int, got {value!r}") from None
            if not exact.is_finite() or exact != exact.to_integral_value():
                raise ValueError(f"{key} must be an int, got {value!r}")
            value = int(exact)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{key} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def _opt_int(key: str, value: Any, *, minimum: Optional[int] = None) -> Optional[int]:
    return None if _is_none(value) else _int(key, value, minimum=minimum)


def _finite_float(key: str, value: Any) -> float:
    if is_bool(value):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return out


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in allowed:
        return value.strip().lower()
    raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
