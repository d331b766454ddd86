"""Launching compiled kernels with less host work per call (on by default; ``CREPA_KERNELS_FAST_LAUNCH=0``
takes Triton's own launch).

Every ``kernel[grid](*args, **meta)`` call through Triton binds the arguments to the signature,
specialises each one, formats a cache key and looks the compiled kernel up, then builds launch
metadata for the launch hooks. At our launch sites (about 30 arguments) that costs tens of
microseconds of host time per launch, several times per step, while the step is host-bound.

``launcher(kernel)[grid](*args, **meta)`` does the same launch with a cheaper lookup:

- the first call of each key goes through Triton (which compiles or finds the kernel and launches it)
  and the compiled kernel it returns is kept under that key;
- the key is at least as fine as Triton's specialisation on CUDA: the device, each tensor's dtype
  and whether its address is 16-byte aligned, every other positional value itself with its type
  (ints exactly, so Triton's int classes - equal to 1, divisible by 16, 32 or 64 bits - follow from
  it), the keyword values with their types, and Triton's debug and instrumentation settings;
- later calls with the key hand the compiled kernel's launcher the arguments Triton would pass it
  (every signature value in order, constexprs included), with no launch metadata.

Calls fall back to Triton's own launch while a launch hook or pre-run hook is installed (profilers
use them), for kernels that are not compiled ``JITFunction``s (the interpreter, test stubs), for
arguments of other kinds, on ROCm (where Triton also specialises on a tensor's storage size) and for
Triton versions this was not checked against. On an H100 (triton 3.6) it gave the same bits as
Triton's launch and made the wan480 call 8-25% faster with calls queued (README, "Measured results").
"""
from __future__ import annotations

import functools

import torch

from .utils import env_flag, triton_available

FAST_LAUNCH_ENV = "CREPA_KERNELS_FAST_LAUNCH"
# Versions whose JITFunction.run / CompiledKernel.run call convention this reproduces.
CHECKED_TRITON = ("3.6.", "3.8.")
MAX_ENTRIES = 256  # keys kept per kernel; beyond that calls take Triton's launch
_SCALARS = frozenset((int, bool, float, str, type(None)))


def fast_launch_enabled() -> bool:
    """Whether fast launches are on: unset or ``CREPA_KERNELS_FAST_LAUNCH=1`` (``0``: Triton's own launch)."""
    return env_flag(FAST_LAUNCH_ENV, True)


@functools.lru_cache(maxsize=None)
def _supported() -> bool:
    """Triton imports, is a checked version, and targets CUDA: on ROCm Triton also specialises a
    tensor on its storage size (32-bit buffer offsets), which the key here does not hold."""
    if not triton_available() or torch.version.hip is not None:
        return False
    import triton

    return triton.__version__.startswith(CHECKED_TRITON)


def fast_launch_status() -> str:
    """Whether compiled kernels launch through the fast path here, and if not, why (for ``info()``)."""
    try:
        enabled = fast_launch_enabled()
    except ValueError as e:
        return f"error: {e}"
    if not enabled:
        return f"off ({FAST_LAUNCH_ENV}=0)"
    if not triton_available():
        return "off (no triton)"
    if torch.version.hip is not None:
        return "off (ROCm: Triton's own launch)"
    import triton

    if not _supported():
        return f"off (triton {triton.__version__} is not one of the checked {', '.join(CHECKED_TRITON)}x)"
    return "on (the interpreter and profilers take Triton's own launch)"


def _idle(hook) -> bool:
    """True for an unset launch hook: None, or an empty hook chain (Triton 3.6+)."""
    return hook is None or getattr(hook, "calls", None) == []


class FastLauncher:
    """``FastLauncher(kernel)[grid](*args, **meta)`` launches like ``kernel[grid](*args, **meta)``."""

    def __init__(self, kernel):
        from triton import knobs
        from triton.runtime.driver import driver

        self.kernel = kernel
        # positions of the constexpr parameters: Triton specialises on a float only there
        self._constexpr_at = frozenset(i for i, p in enumerate(kernel.params) if p.is_constexpr)
        self._knobs = knobs
        self._driver = driver
        self._cache: dict = {}
        self.hits = 0  # launches that skipped Triton's binder (for tests)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def _key(self, device, args, meta):
        """The cache key of a call, or None when an argument is of a kind we do not key on (the call
        then takes Triton's launch)."""
        values = tuple(meta.values())
        kinds = tuple(map(type, values))
        if not _SCALARS.issuperset(kinds):
            return None
        # constexprs and options by name, value and type (True == 1 == 1.0 are told apart)
        parts = [device, self._knobs.runtime.debug, self._knobs.compilation.instrumentation_mode,
                 tuple(meta), values, kinds]
        append = parts.append
        for i, a in enumerate(args):
            kind = type(a)
            if kind is int:
                append(a)
            elif isinstance(a, torch.Tensor):
                append(a.dtype)
                append(a.data_ptr() & 15 == 0)
            elif kind in _SCALARS:
                # typed apart from equal ints (True == 1 == 1.0); by value only where a constexpr is
                # specialised on it (a runtime float, such as a gradient scale that follows the
                # loss weight, compiles to one fp32 argument whatever its value)
                append((kind, a) if i in self._constexpr_at else kind)
            else:
                return None
        return tuple(parts)

    def launch(self, grid, args: tuple, meta: dict):
        runtime = self._knobs.runtime
        if callable(grid) or not (_idle(runtime.launch_enter_hook) and _idle(runtime.launch_exit_hook)
                and getattr(runtime, "add_stages_inspection_hook", None) is None and not self.kernel.pre_run_hooks):
            # a grid of the launch's metadata (Triton resolves it), or a profiler listening (Triton's
            # launch feeds it)
            return self.kernel[grid](*args, **meta)
        active = self._driver.active
        device = active.get_current_device()
        key = self._key(device, args, meta)
        hit = None if key is None else self._cache.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **meta)
            if hasattr(compiled, "result"):  # an asynchronous compile's future
                compiled = compiled.result()
            if key is not None and compiled is not None and len(self._cache) < MAX_ENTRIES:
                tail = self._tail(len(args), meta)
                if tail is not None:
                    self._cache[key] = (compiled, tail)
            return compiled
        compiled, tail = hit
        grid_size = len(grid)
        # What JITFunction.run passes, without the launch metadata its (idle) hooks would receive.
        compiled.run(grid[0], grid[1] if grid_size > 1 else 1, grid[2] if grid_size > 2 else 1,
                     active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)
        self.hits += 1
        return compiled

    def _tail(self, n_positional: int, meta: dict):
        """Values of the signature parameters after the positional ones, as Triton binds them (passed,
        else the default); None when one is neither (Triton would have refused the call). The key
        holds ``meta``, so they are the same for every call with that key."""
        import inspect

        tail = []
        for name, param in list(self.kernel.signature.parameters.items())[n_positional:]:
            if name in meta:
                tail.append(meta[name])
            elif param.default is not inspect.Parameter.empty:
                tail.append(param.default)
            else:
                return None
        return tuple(tail)


_LAUNCHERS: dict = {}


def launcher(kernel):
    """``kernel`` itself, or its FastLauncher when fast launches are on and apply to it."""
    if not fast_launch_enabled() or not _supported():
        return kernel
    entry = _LAUNCHERS.get(id(kernel))
    if entry is not None and entry[0] is kernel:
        return entry[1]
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):  # interpreted kernels, stand-ins in tests
        return kernel
    fast = FastLauncher(kernel)
    _LAUNCHERS[id(kernel)] = (kernel, fast)
    return fast
