"""Launch settings, interpreter detection and dtype helpers shared by the Triton ops."""
from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch._subclasses.fake_tensor import is_fake

_TRITON_IMPORTS: "bool | None" = None


def triton_available() -> bool:
    """True when `triton` imports (it is absent on some platforms, e.g. macOS).

    Cached in a module global rather than functools.lru_cache, which torch.compile warns about when
    it traces a caller."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:  # pragma: no cover - depends on the platform
            _TRITON_IMPORTS = False
        else:
            _TRITON_IMPORTS = True
    return _TRITON_IMPORTS


_TRITON_TRUE = ("1", "true", "yes", "on")  # Triton's reading of a boolean variable (any case)

# os.environ.get encodes the name and, for an unset one, raises and catches a KeyError (about 0.4
# and 1 us on a 2.1 GHz Xeon), and one crepa_loss call reads about a dozen variables. On POSIX
# os.environ keeps its contents in a dict keyed by the encoded names, which it reads and writes
# itself: a lookup there gives the same answer for a fraction of the cost. Anything else (another
# platform, os.environ replaced) takes os.environ.get.
_ENVIRON = os.environ
_ENV_DATA = getattr(_ENVIRON, "_data", None) if os.name == "posix" else None
_ENV_KEYS: dict = {}


def getenv(name: str) -> "str | None":
    """``os.environ.get(name)``, faster on the launch path."""
    data = _ENV_DATA
    if type(data) is not dict or os.environ is not _ENVIRON:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = data.get(key)
    return None if value is None else os.fsdecode(value)


def interpreter_enabled() -> bool:
    """True when Triton runs our kernels through its CPU interpreter: TRITON_INTERPRET is on as
    Triton reads it (1, true, yes or on, in any case), and, once the kernels exist, they were
    defined as interpreted functions (Triton decides that when a kernel is defined, so a variable
    set after ``crepa_kernels.ops`` was imported changes nothing)."""
    if (getenv("TRITON_INTERPRET") or "").lower() not in _TRITON_TRUE:
        return False
    resample = sys.modules.get("crepa_kernels.ops.resample")
    kernel = getattr(resample, "_resample_fwd_kernel", None)
    return type(kernel).__name__ != "JITFunction"  # a compiled kernel (not the interpreter's)


def triton_supports(t: torch.Tensor) -> bool:
    """Whether a tensor on this device can be handled by our Triton kernels right now."""
    if not triton_available():
        return False
    if t.device.type == "cuda":  # CUDA and ROCm both report "cuda"
        return True
    return t.device.type == "cpu" and interpreter_enabled()


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the ops accept
# The kernels step over D in int32 blocks: D + a block must stay below 2**31.
MAX_FEATURE_DIM = 1 << 30


def check_feature_dim(name: str, dim: int) -> None:
    if dim > MAX_FEATURE_DIM:
        raise ValueError(f"{name} has D={dim} features; the Triton kernels take at most {MAX_FEATURE_DIM}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs keep fp64 (gradcheck); every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints (plain Python: cheaper on the launch path than triton.cdiv)."""
    return -(-int(a) // int(b))


FRONT_END_ENV = "CREPA_KERNELS_FRONT_END"
FRONT_ENDS = ("auto", "custom_op")


def direct_launch_ok(*tensors: torch.Tensor) -> bool:
    """Whether an eager call may launch the kernels directly through an autograd.Function.

    True for plain tensors outside torch.compile / torch.export tracing and with no
    TorchDispatchMode active. Anything else (fake or functional tensors while tracing, tensor
    subclasses, dispatch modes such as FlopCounterMode) goes through the registered custom ops,
    which those tools understand; the kernels and launch settings are the same either way.
    ``CREPA_KERNELS_FRONT_END=custom_op`` sends every call through the custom ops (for comparison)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    front_end = getenv(FRONT_END_ENV)
    if front_end is not None and front_end != "auto":
        if front_end not in FRONT_ENDS:
            raise ValueError(f"{FRONT_END_ENV} must be one of {', '.join(FRONT_ENDS)}, got {front_end!r}")
        return False
    return all(is_plain_tensor(t) for t in tensors)


def is_plain_tensor(t) -> bool:
    """A real tensor (or Parameter), not a subclass such as the fake tensors of graph tracing."""
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def device_guard(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device the current one for the launches inside it.

    Triton launches a kernel on the current device whatever device its tensors live on, so tensors on
    cuda:1 while cuda:0 is current would be read from the wrong GPU. A no-op when that device is
    already current, off CUDA, and while a graph is traced (a fake tensor, or torch.compile running):
    the compiled graph guards its own device. Eager tensor subclasses are guarded like plain tensors."""
    device = t.device
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    # The common case first: the fake-tensor check costs more than the current device's lookup.
    if device.index == torch.cuda.current_device() or (isinstance(t, torch.Tensor) and is_fake(t)):
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


FUSED_RESAMPLE_ENV = "CREPA_KERNELS_FUSED_RESAMPLE"


def fused_resample_enabled() -> bool:
    """Whether crepa_loss resamples the projected side inside the similarity kernels (default) rather
    than through a separate resample pass; ``CREPA_KERNELS_FUSED_RESAMPLE=0`` turns it off (for
    comparison; both give the same numbers)."""
    return env_flag(FUSED_RESAMPLE_ENV, True)


FUSED_HALF_BLOCK_N_ENV = "CREPA_KERNELS_FUSED_HALF_BLOCK_N"


def fused_halves_token_block() -> bool:
    """Whether the similarity kernels with a fused resample use half the token block of the unfused
    ones (default), to make room for the resample's tap tiles; ``CREPA_KERNELS_FUSED_HALF_BLOCK_N=0``
    keeps the full block (for comparison; the same numbers either way)."""
    return env_flag(FUSED_HALF_BLOCK_N_ENV, True)


MERGED_BWD_ENV = "CREPA_KERNELS_MERGED_BWD"


def merged_backward_enabled() -> bool:
    """Whether the backward of a fused-resample similarity runs as one kernel that writes the
    input-grid gradient directly (``CREPA_KERNELS_MERGED_BWD=1``), instead of the similarity backward
    into a resampled-grid buffer followed by the resample backward, in frame windows (the default).
    Programs own bands of input rows and stage each block of their resampled-grid gradient in a
    small L2-resident slice: one launch (several for large batches), no resampled-grid buffer, and
    579 instead of 932 MB of unique bytes at wan480 fp32, for resampled-grid rows computed once per
    band they touch. The same numbers up to
    fp32 summation order (fp16 / bf16 inputs also skip the rounding of the resampled-grid gradient
    to the input dtype). Grids whose one-row bands would need too large tiles (wide, or upsampled
    strongly in height) take the default, as does ROCm. Off until a GPU A/B times it."""
    return env_flag(MERGED_BWD_ENV, False)


ROW_BWD_ENV = "CREPA_KERNELS_ROW_BWD"


def row_backward_enabled() -> bool:
    """Whether the backward of a fused-resample similarity runs as the row-form one-pass kernel
    (``CREPA_KERNELS_ROW_BWD=1``): a program owns a tile of one input row, forms the resampled-grid
    gradient of the resampled rows touching it (about two per row at wan480) and combines them in
    registers into d projected, the heights' weights as it sums, the widths' through tl.gather. One
    launch, no resampled-grid buffer and no staging, so the backward's only large allocation is the
    gradient itself. The same numbers up to fp32 summation order (fp16 / bf16 inputs also skip the
    rounding of the resampled-grid gradient to the input dtype). Grids whose tiles would gather
    from more than 256 resampled columns, whose tokens touch more than 8, or whose teacher tiles
    leave no room for 8 feature columns take the default, as does ROCm. Off until a GPU A/B times
    it; not together with ``CREPA_KERNELS_MERGED_BWD=1``."""
    return env_flag(ROW_BWD_ENV, False)


SWITCH_PREFIX = "CREPA_KERNELS_"


def switches_set() -> dict:
    """The backend's environment switches (``CREPA_KERNELS_*``) set in this process, as name -> value:
    results and reports record them, since each changes how the kernels run."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(SWITCH_PREFIX)}


def env_flag(name: str, default: bool) -> bool:
    """A 0/1 switch read from the environment at call time; unset gives ``default``."""
    value = getenv(name)
    if value is None:
        return default
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


def env_positive_int(name: str, default: int, expected: str, power_of_two: bool = False) -> int:
    """A positive int (a power of two if asked) read from the environment at call time; unset gives
    ``default``; anything else is an error naming the variable and ``expected``."""
    value = getenv(name)
    if value is None:
        return default
    n = int(value) if value.isascii() and value.isdigit() else 0  # plain digits only ("1_6", " 16" refused)
    if n < 1 or (power_of_two and n & (n - 1)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return n


BWD_WINDOW_ENV = "CREPA_KERNELS_BWD_WINDOW_MIB"
DEFAULT_BWD_WINDOW_MIB = 128


def bwd_window_bytes() -> int:
    """Most bytes of resampled-grid gradient a fused-resample backward holds at once (it runs in frame
    windows of at most this size). Smaller windows lower the backward's memory peak; each window costs
    two kernel launches and a tail of idle SMs. 128 MiB: one window at wan480 bf16, two at fp32 (an
    interleaved H100 A/B timed 64 MiB windows 20-30% slower, 32 MiB slower still).
    ``CREPA_KERNELS_BWD_WINDOW_MIB`` overrides it for benchmarking."""
    return env_positive_int(BWD_WINDOW_ENV, DEFAULT_BWD_WINDOW_MIB, "a positive int (MiB)") << 20


def next_power_of_2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


ELEMS_PER_THREAD_ENV = "CREPA_KERNELS_ELEMS_PER_THREAD"
DEFAULT_ELEMS_PER_THREAD = 16


def elements_per_thread() -> int:
    """Tile elements each thread holds; the warps per program follow from it.

    16 was chosen when an unspecialised compile (every int argument a plain i32) put the hot kernels
    near 100 registers per thread on sm_90 at 16 and 200-250 at 32. Compiled as crepa_loss really
    launches them at wan480 (bench/kernel_registers.py: strides of 1 and divisibility by 16
    specialised; all seven kernel variants, fp32 and bf16, no spills), the similarity kernels take
    40-80 registers at 16 and 48-127 at 32 on triton 3.6 (40-61 and 48-95 on 3.8), the resample
    kernels 42-62 and 56-133 on either. An interleaved H100 A/B did not clearly separate 16 and 32.
    ``CREPA_KERNELS_ELEMS_PER_THREAD`` overrides it for benchmarking (32 reproduces the similarity
    kernels' and the resample forward's earlier settings)."""
    return env_positive_int(ELEMS_PER_THREAD_ENV, DEFAULT_ELEMS_PER_THREAD, "a positive power-of-two int",
                            power_of_two=True)


def num_warps_for(block_elems: int, ept: "int | None" = None) -> int:
    """Warps for a program holding ``block_elems`` tile elements: 2 to 8, about ``ept`` (default
    ``elements_per_thread()``) each (a function of the shape only, so launches are reproducible)."""
    ept = elements_per_thread() if ept is None else ept
    warps = next_power_of_2(max(1, int(block_elems) // (32 * ept)))
    return max(2, min(8, warps))


TUNE_KEYS = ("block_n", "block_d", "num_warps", "num_stages")
# The one-pass backward's settings: ``rows`` (input rows per band, any positive int) instead of a
# token block.
BAND_TUNE_KEYS = ("rows", "block_d", "num_warps", "num_stages")
# The resample backward's: also ``d_blocks`` (any positive int), the feature blocks one program
# computes in turn (1 by default; more run the token block's contributor search once for several),
# and ``row_kernel`` (1: its row form, `resample._resample_bwd_rows_kernel`, whose ``block_n`` is the
# tile of a row).
RESAMPLE_BWD_TUNE_KEYS = TUNE_KEYS + ("d_blocks", "row_kernel")
# The row-form one-pass backward's: ``block_n`` is its tile of a row, ``d_blocks`` as the resample
# backward's (by default it chooses its own).
ROW_TUNE_KEYS = TUNE_KEYS + ("d_blocks",)
# The kernels whose launch settings can be overridden, by the names bench/tune_kernels.py uses: the
# similarity forward and backward (every launch of each), the resample backward, and the one-pass
# fused-resample backwards (``CREPA_KERNELS_MERGED_BWD=1``, ``CREPA_KERNELS_ROW_BWD=1``).
TUNABLE_KERNELS = ("sim_fwd", "sim_bwd", "resample_bwd", "merged_bwd", "row_bwd")


def tune_keys(kernel: str) -> tuple:
    """The settings ``kernel`` (one of ``TUNABLE_KERNELS``) takes overrides for."""
    return {"merged_bwd": BAND_TUNE_KEYS, "resample_bwd": RESAMPLE_BWD_TUNE_KEYS,
            "row_bwd": ROW_TUNE_KEYS}.get(kernel, TUNE_KEYS)


# kernel name -> overrides, consulted by launches not given their own: empty unless a benchmark fills it
# through `launch_overrides` (bench/ab_settings.py --tuned times tuned settings through whole calls).
LAUNCH_OVERRIDES: dict = {}


@contextlib.contextmanager
def launch_overrides(overrides: "dict | None"):
    """Within the block, launches of the named kernels (``TUNABLE_KERNELS``) take these settings
    (kernel name -> overrides as `apply_tune` takes them), for benchmarking eager calls; the previous
    ones come back afterwards, also after an error. Checked before anything changes.

    One limit: a graph torch.compile traces inside the block keeps the settings it saw (and one
    traced outside ignores them). The one-pass backward (``CREPA_KERNELS_MERGED_BWD=1``) takes
    ``merged_bwd`` settings (exactly: no tile limit applies to them), ``sim_bwd`` / ``resample_bwd``
    ones where it declines a grid and the two-pass backward runs."""
    overrides = dict(overrides or {})
    for kernel, tune in overrides.items():
        if kernel not in TUNABLE_KERNELS:
            raise ValueError(f"launch_overrides: unknown kernel {kernel!r}; expected some of {list(TUNABLE_KERNELS)}")
        if not isinstance(tune, dict):
            raise ValueError(f"launch_overrides[{kernel!r}] must be a dict of settings, got {tune!r}")
        apply_tune(1, 1, 1, tune, tune_keys(kernel))
    saved = dict(LAUNCH_OVERRIDES)
    LAUNCH_OVERRIDES.clear()
    LAUNCH_OVERRIDES.update(overrides)
    try:
        yield
    finally:
        LAUNCH_OVERRIDES.clear()
        LAUNCH_OVERRIDES.update(saved)


def apply_tune(block_n: int, block_d: int, num_warps: int, tune: "dict | None",
               keys: tuple = TUNE_KEYS) -> tuple[int, int, int, dict]:
    """(BLOCK_N, BLOCK_D, num_warps, extra launch options) with a tuning sweep's overrides applied.

    ``tune`` maps some of ``keys`` (``TUNE_KEYS``, ``BAND_TUNE_KEYS`` where the first setting is
    ``rows``, not ``block_n``, or ``RESAMPLE_BWD_TUNE_KEYS``, whose ``d_blocks`` and ``row_kernel``
    `resample.bwd_plan` reads itself) to ints and replaces the shape-derived settings it names
    (``bench/tune_kernels.py`` times the hot kernels this way); ``num_stages`` is passed to Triton only
    when given, so a default launch keeps Triton's own pipelining depth. None or {}: the defaults."""
    if not tune:
        return block_n, block_d, num_warps, {}
    unknown = sorted(set(tune) - set(keys))
    if unknown:
        raise ValueError(f"tune: unknown setting(s) {unknown}; expected some of {list(keys)}")
    for key, value in tune.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tune[{key!r}] must be a positive int, got {value!r}")
        if key not in ("num_stages", "rows", "d_blocks") and value & (value - 1):
            raise ValueError(f"tune[{key!r}] must be a power of two, got {value}")
    extra = {"num_stages": tune["num_stages"]} if "num_stages" in tune else {}
    first = keys[0]
    return (tune.get(first, block_n), tune.get("block_d", block_d), tune.get("num_warps", num_warps), extra)
