"""Compare the fast launch path with Triton's own launch on a machine without a GPU.

Run as a script with TRITON_INTERPRET unset (tests/test_launch.py does): a stand-in Triton driver
reports an sm_90 target, so the kernels compile for real (ptxas bundled with triton), while
"loading" a binary and launching it only record what the launcher was handed. Each case is launched
through Triton (`CREPA_KERNELS_FAST_LAUNCH=0`) and then twice through the fast path; the script
prints JSON: per case, whether every fast launch handed the same compiled kernel's launcher the same
arguments as Triton's launch, and how many fast launches skipped Triton's binder.
`python tests/fake_driver_launch.py time` prints the host time per call of each package launch site
both ways instead.
"""
from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiled kernels this script launches")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as driver_config  # noqa: E402

CALLS: list = []
RECORD_ARGS = True  # off while timing: the launcher then records only that a launch happened
TARGET_SM = 90  # the compute capability the stand-in driver reports (H100, H200)


class SeenTensor(tuple):
    """What a launch reads of a tensor argument: (dtype, shape, strides, address mod 16). Calls are
    recorded with these, not the tensors: a recorded reference would keep, e.g., a gradient alive,
    and autograd would then copy it into .grad instead of taking it (a cost no real launch has)."""


def _seen(arg):
    if isinstance(arg, torch.Tensor):
        return SeenTensor((arg.dtype, tuple(arg.shape), arg.stride(), arg.data_ptr() % 16))
    return arg


class RecordingLauncher:
    """Stands in for the compiled kernel's launcher (one per compiled kernel): records each call."""

    def __init__(self, src, metadata):
        self.src = src

    def __call__(self, *args):
        CALLS.append((self, tuple(_seen(a) for a in args) if RECORD_ARGS else None))
        metadata, enter_hook = args[6], args[7]
        if enter_hook is not None:  # as the real launcher does before the launch
            enter_hook(metadata)


class StandInUtils:
    def load_binary(self, name, kernel, shared, device):
        return object(), f"function:{name}", 32, 0, 1024  # module, function, regs, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class StandInDriver:
    def __init__(self):
        self.utils = StandInUtils()
        self.launcher_cls = RecordingLauncher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 1234

    def get_current_target(self):
        return GPUTarget("cuda", TARGET_SM, 32)

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


driver_config.set_active(StandInDriver())

from crepa_kernels.ops import launch, resample, similarity  # noqa: E402


@triton.jit
def scale_add_kernel(x_ptr, y_ptr, out_ptr, n, scale, stride, flag, BLOCK: tl.constexpr, DOUBLE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(x_ptr + offs * stride, mask=mask) * scale + tl.load(y_ptr + offs, mask=mask)
    if flag:
        r = r + 1
    if DOUBLE:
        r = r * 2
    tl.store(out_ptr + offs, r, mask=mask)


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * SCALE, mask=mask)


def _same(a, b) -> bool:
    """Equal launch arguments: the same value and type, or tensors alike in everything the launch
    reads (outputs are allocated anew on every call, so identity cannot be asked of them)."""
    return type(a) is type(b) and a == b


def _compare(triton_calls, fast_calls, must_skip_binder: bool) -> list[str]:
    """Differences between Triton's launches and the fast path's, beyond the launch metadata and hook
    slots (Triton passes its idle hook chains; a launch that skipped its binder passes None)."""
    problems = []
    if len(triton_calls) != len(fast_calls):
        return [f"{len(triton_calls)} launches through Triton, {len(fast_calls)} through the fast path"]
    for i, ((l1, a1), (l2, a2)) in enumerate(zip(triton_calls, fast_calls)):
        if l1 is not l2:
            problems.append(f"launch {i}: a different compiled kernel")
        if not all(_same(u, v) for u, v in zip(a1[:6], a2[:6])):  # grid x3, stream, function, packed metadata
            problems.append(f"launch {i}: grid/stream/function differ: {a1[:5]} vs {a2[:5]}")
        if must_skip_binder and a2[6:9] != (None, None, None):
            problems.append(f"launch {i}: went through Triton's launch, not the fast path")
        k1, k2 = a1[9:], a2[9:]
        if len(k1) != len(k2) or not all(_same(u, v) for u, v in zip(k1, k2)):
            problems.append(f"launch {i}: kernel arguments differ")
    return problems


def run_case(fn) -> dict:
    os.environ[launch.FAST_LAUNCH_ENV] = "0"
    CALLS.clear()
    fn()
    reference = list(CALLS)
    os.environ[launch.FAST_LAUNCH_ENV] = "1"
    hits_before = sum(entry[1].hits for entry in launch._LAUNCHERS.values())
    problems = []
    for round_ in range(2):  # the first may fill the cache (through Triton), the second must hit it
        CALLS.clear()
        fn()
        problems += _compare(reference, list(CALLS), must_skip_binder=round_ == 1)
    hits = sum(entry[1].hits for entry in launch._LAUNCHERS.values()) - hits_before
    os.environ[launch.FAST_LAUNCH_ENV] = "0"
    return {"launches": len(reference), "fast_hits": hits, "problems": problems,
            "compiled_kernels": sorted({id(l) for l, _ in reference})}


def tiny_cases():
    x = torch.arange(64, dtype=torch.float32)
    y = torch.ones(64)
    out = torch.empty(64)
    kern = scale_add_kernel

    def call(xs, n, stride, flag=False, block=16, double=False, dtype=None, warps=2):
        xs = xs if dtype is None else xs.to(dtype)
        ys = y if dtype is None else y.to(dtype)
        os_ = out if dtype is None else out.to(dtype)
        return lambda: launch.launcher(kern)[(4,)](xs, ys, os_, n, 0.5, stride, flag, BLOCK=block, DOUBLE=double,
                                                   num_warps=warps)

    yield "aligned", call(x, 60, 1)
    yield "unaligned pointer", call(x[1:], 60, 1)  # 4-byte offset: no 16-byte alignment
    yield "int equal to 1 vs 2", call(x, 30, 2)
    yield "int divisible by 16", call(x, 48, 1)
    yield "int wider than 32 bits", call(x, 2 ** 33, 1)
    yield "bool argument", call(x, 60, 1, flag=True)
    yield "other constexpr", call(x, 60, 1, double=True)
    yield "other num_warps", call(x, 60, 1, warps=4)
    yield "fp64 pointers", call(x, 60, 1, dtype=torch.float64)
    # A float constexpr passed positionally is specialised on its value: 2.0 must not reuse 0.5's kernel.
    for value in (0.5, 2.0):
        yield f"positional constexpr {value}", (
            lambda v=value: launch.launcher(scale_kernel)[(4,)](x, out, 60, v, 16, num_warps=2))


def package_cases():
    """The package's launch sites: fused-resample forward, windowed backward, resample kernels."""
    g = torch.Generator().manual_seed(0)
    # D = 14999: a frame of the backward's window buffer exceeds half of the smallest window (1 MiB),
    # so each frame is a window, and frame slices of the gradient start at addresses that are only
    # 8-byte aligned for odd frames (what Triton specialises on). Nothing runs: sizes cost nothing.
    B, T, D = 1, 5, 14999
    p = torch.randn(B, T, 6, D, generator=g)
    f = torch.randn(B, T, 9, D, generator=g)
    kw = dict(distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    acc = dict(dtype=torch.float32)
    outs = [torch.empty(B, T, 9, **acc) for _ in range(4)]
    cos = torch.empty(B, T, 3, 9, **acc)
    grids = ((2, 3), (3, 3))

    def forward():
        similarity._launch_forward(p, f, *outs, cos, resample_p=(2, 3, 3, 3), **kw)

    def backward_with(switch):
        def backward():
            g_total = torch.ones(B, T, 1).expand(B, T, 9)
            os.environ[switch] = "1"
            try:
                similarity._backward_impl(p, f, outs[2], outs[3], cos, g_total, None, 1, 1.0, False, False, True,
                                          False, 0, (2, 3, 3, 3), False)
            finally:
                del os.environ[switch]
        return backward

    backward = backward_with("CREPA_KERNELS_BWD_WINDOW_MIB")  # 1 MiB windows: one per frame
    merged_backward = backward_with("CREPA_KERNELS_MERGED_BWD")

    def resample_fwd():
        resample._launch_fwd(p, *grids[0], *grids[1])

    yield "similarity forward (fused resample)", forward
    yield "similarity + resample backward", backward
    yield "one-pass similarity + resample backward", merged_backward
    yield "resample forward", resample_fwd


def with_launch_hook() -> dict:
    """A launch hook installed (as profilers do): every launch must go through Triton, which calls it."""
    from triton import knobs

    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    name, fn = next(tiny_cases())
    os.environ[launch.FAST_LAUNCH_ENV] = "1"
    fn()  # fills the fast path's cache
    hits_before = sum(entry[1].hits for entry in launch._LAUNCHERS.values())
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        CALLS.clear()
        fn()
        fn()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
        os.environ[launch.FAST_LAUNCH_ENV] = "0"
    hits = sum(entry[1].hits for entry in launch._LAUNCHERS.values()) - hits_before
    return {"launches": len(CALLS), "hook_calls": len(seen), "fast_hits": hits}


def _interleaved(fn, rounds: int, calls: int) -> dict:
    """Host µs per call of ``fn`` through Triton's launch and the fast path: rounds alternate the
    two, each timing ``calls`` calls; the fastest and the median round of each are kept."""
    import time

    global RECORD_ARGS
    per = {"triton": [], "fast": []}
    RECORD_ARGS = False
    try:
        for _ in range(rounds):
            for value, name in (("0", "triton"), ("1", "fast")):
                os.environ[launch.FAST_LAUNCH_ENV] = value
                fn()
                start = time.perf_counter()
                for _ in range(calls):
                    CALLS.clear()
                    fn()
                per[name].append((time.perf_counter() - start) / calls * 1e6)
    finally:
        RECORD_ARGS = True
    os.environ[launch.FAST_LAUNCH_ENV] = "0"
    out = {}
    for name, times in per.items():
        times.sort()
        out[f"{name}_min"] = round(times[0], 1)
        out[f"{name}_median"] = round(times[len(times) // 2], 1)
    return out


def host_time_us(rounds: int = 15, calls: int = 1000) -> dict:
    """Each package launch site (the stand-in launcher records instead of launching: a CPU figure of
    the host work around a launch)."""
    return {name: _interleaved(fn, rounds, calls) for name, fn in package_cases()}


def step_host_time_us(rounds: int = 11, calls: int = 300, merged: bool = False) -> dict:
    """One crepa_loss forward + backward on the Triton backend at wan480's grids (30x52 onto 37x37;
    T = 4, D = 80 with 1 MiB windows: two backward windows, the five launches of wan480 fp32; with
    ``merged`` the one-pass backward: two launches), everything real but the launch itself."""
    from crepa_kernels import crepa_loss, functional

    real_interpreter_enabled = functional.interpreter_enabled
    functional.interpreter_enabled = lambda: True  # let the Triton backend take CPU tensors
    os.environ["CREPA_KERNELS_BWD_WINDOW_MIB"] = "1"
    os.environ["CREPA_KERNELS_MERGED_BWD"] = "1" if merged else "0"
    p = torch.randn(1, 4, 30 * 52, 80, requires_grad=True)
    f = torch.randn(1, 4, 37 * 37, 80)

    def step():
        p.grad = None
        crepa_loss(p, f, projected_grid=(30, 52), features_grid=(37, 37), weight=0.5,
                   backend="triton").loss.backward()

    try:
        CALLS.clear()
        step()
        launches = len(CALLS)
        out = _interleaved(step, rounds, calls)
    finally:
        del os.environ["CREPA_KERNELS_BWD_WINDOW_MIB"]
        del os.environ["CREPA_KERNELS_MERGED_BWD"]
        functional.interpreter_enabled = real_interpreter_enabled
    out["launches_per_step"] = launches
    return out


def keyword_tensor() -> dict:
    """A tensor passed by keyword is not keyed on: such calls take Triton's launch, and nothing is kept."""
    x = torch.arange(64, dtype=torch.float32)
    out = torch.empty(64)
    os.environ[launch.FAST_LAUNCH_ENV] = "1"
    entries = lambda: sum(len(fast._cache) for _, fast in launch._LAUNCHERS.values())  # noqa: E731
    before, hits_before = entries(), sum(entry[1].hits for entry in launch._LAUNCHERS.values())
    CALLS.clear()
    for _ in range(2):
        launch.launcher(scale_kernel)[(4,)](x, out_ptr=out, n=60, SCALE=1.5, BLOCK=16, num_warps=2)
    os.environ[launch.FAST_LAUNCH_ENV] = "0"
    hits = sum(entry[1].hits for entry in launch._LAUNCHERS.values()) - hits_before
    return {"launches": len(CALLS), "fast_hits": hits, "new_cache_entries": entries() - before}


def runtime_float_values() -> dict:
    """A float passed to a runtime (not constexpr) parameter compiles to one fp32 argument whatever its
    value: one cache entry serves every value (a loss weight that changes each step stays on the fast
    path), and each launch hands the launcher its own value."""
    x, y, out = torch.arange(64, dtype=torch.float32), torch.ones(64), torch.empty(64)
    values = [0.5, 0.25, 3.0, -1e-3]
    os.environ[launch.FAST_LAUNCH_ENV] = "1"
    entries = lambda: sum(len(fast._cache) for _, fast in launch._LAUNCHERS.values())  # noqa: E731
    before, hits_before = entries(), sum(entry[1].hits for entry in launch._LAUNCHERS.values())
    CALLS.clear()
    for v in values:  # n = 61: a key no other case has made
        launch.launcher(scale_add_kernel)[(4,)](x, y, out, 61, v, 1, False, BLOCK=16, DOUBLE=False, num_warps=2)
    os.environ[launch.FAST_LAUNCH_ENV] = "0"
    hits = sum(entry[1].hits for entry in launch._LAUNCHERS.values()) - hits_before
    return {"launches": len(CALLS), "fast_hits": hits, "new_cache_entries": entries() - before,
            "scales_passed": [args[9 + 4] for _, args in CALLS], "scales_given": values,
            "compiled_kernels": len({id(l) for l, _ in CALLS})}


def callable_grid() -> dict:
    """A grid given as a function of the launch's metadata, as Triton takes it: resolved by Triton on
    every call (the second call with the same key used to fail on the function's len())."""
    x, y, out = torch.arange(64, dtype=torch.float32), torch.ones(64), torch.empty(64)
    os.environ[launch.FAST_LAUNCH_ENV] = "1"
    CALLS.clear()
    for _ in range(3):
        launch.launcher(scale_add_kernel)[lambda meta: (triton.cdiv(60, meta["BLOCK"]),)](
            x, y, out, 60, 0.5, 1, False, BLOCK=16, DOUBLE=False, num_warps=2)
    os.environ[launch.FAST_LAUNCH_ENV] = "0"
    return {"launches": len(CALLS), "grids": [args[:3] for _, args in CALLS]}


def _holds_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, tuple) and any(_holds_tensor(x) for x in obj)


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which == "time":
        print(json.dumps({"per_launch_site": host_time_us(), "crepa_loss_step": step_host_time_us(),
                          "crepa_loss_step_merged_backward": step_host_time_us(merged=True)}))
        return 0
    results = {"triton": triton.__version__, "cases": {}}
    if which in ("all", "tiny"):
        results["cases"].update({name: run_case(fn) for name, fn in tiny_cases()})
        results["launch hook"] = with_launch_hook()
        results["keyword tensor"] = keyword_tensor()
        results["runtime float values"] = runtime_float_values()
        results["callable grid"] = callable_grid()
    if which in ("all", "package"):
        results["cases"].update({name: run_case(fn) for name, fn in package_cases()})
    results["cache_keys_hold_tensors"] = any(
        _holds_tensor(key) for _, fast in launch._LAUNCHERS.values() for key in fast._cache)
    results["cache_entries"] = sum(len(fast._cache) for _, fast in launch._LAUNCHERS.values())
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
