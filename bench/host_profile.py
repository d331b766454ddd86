"""Where the host time of a crepa_loss forward + backward goes, kernels stubbed out.

``bench/test_bench_host.py`` times the whole call; this script breaks it down, on the device the
machine has (CUDA if present, else CPU tensors through the stubbed Triton path):

- ``profile``: cProfile of ``--steps`` calls, the functions with the most own time (per call, in
  microseconds; cProfile's own overhead inflates every entry, so read them as shares);
- ``primitives``: the host cost of the small torch operations a call makes (an allocation, a token
  mean, a ``ones_like``, an empty autograd node's forward + backward, a device query), each timed
  alone: what the call's count of each costs at least.

    python bench/host_profile.py [--preset wan480_grids] [--steps 2000] [--out host_profile.txt]

Host times of this machine's CPU, not GPU times: nothing runs on the device but the torch
primitives themselves (queued, never synchronised inside a timing).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import host_ab  # noqa: E402  (imports torch; without CUDA it turns Triton's interpreter on first)
import torch  # noqa: E402

from crepa_kernels import benchmark as bm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def per_call_us(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of the mean host time of ``calls`` calls (µs); a device sync between rounds
    keeps the queue from filling."""
    out = []
    for _ in range(rounds):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(out)


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def primitives() -> dict:
    x = torch.zeros(1, 4, 1369, device=DEVICE)
    leaf = torch.zeros(8, device=DEVICE, requires_grad=True)

    def autograd_node():
        leaf.grad = None
        _Empty.apply(leaf).sum().backward()

    def sum_backward():
        leaf.grad = None
        leaf.sum().backward()

    cases = {
        "torch.empty (B, T, N) fp32": lambda: torch.empty((1, 4, 1369), device=DEVICE),
        "token mean x.mean(-1)": lambda: x.mean(dim=-1),
        "torch.ones_like (scalar)": lambda: torch.ones_like(x[0, 0, 0]),
        "leaf.sum().backward()": sum_backward,
        "autograd.Function (view) + sum, forward + backward": autograd_node,
        "torch.cuda.current_device()" if DEVICE == "cuda" else "torch.get_num_threads()":
            (torch.cuda.current_device if DEVICE == "cuda" else torch.get_num_threads),
    }
    for fn in cases.values():  # warm up
        for _ in range(200):
            fn()
    return {name: round(per_call_us(fn, 1000), 2) for name, fn in cases.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan480_grids", choices=sorted(host_ab.presets(bm)))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None, help="text file for the report (also printed)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        ap.error("--steps and --top must be positive")
    step = host_ab.stubbed_step("crepa_kernels", args.preset, DEVICE)
    for _ in range(200):
        step()
    step_us = per_call_us(step, max(1, args.steps // 5))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime")
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append((tottime, cumtime, ncalls, f"{os.path.relpath(path, ROOT) if path.startswith(ROOT) else path}"
                     f":{line}({name})"))
    rows.sort(reverse=True)
    dev = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    lines = [f"host time of crepa_loss forward + backward, kernels stubbed, preset {args.preset}, device {dev}, "
             f"torch {torch.__version__}",
             f"step: {step_us:.1f} us per call without the profiler",
             "", f"cProfile, {args.steps} calls, top {args.top} by own time (us per call; inflated by cProfile)",
             f"{'own us':>9} {'cum us':>9} {'calls/step':>10}  function"]
    for tottime, cumtime, ncalls, where in rows[:args.top]:
        lines.append(f"{tottime / args.steps * 1e6:9.2f} {cumtime / args.steps * 1e6:9.2f} "
                     f"{ncalls / args.steps:10.2f}  {where}")
    lines += ["", "primitives, host us per call (each alone)"]
    lines += [f"{us:9.2f}  {name}" for name, us in primitives().items()]
    bm.print_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
