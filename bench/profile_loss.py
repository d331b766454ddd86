"""Where a crepa_loss step spends its time on a GPU: kernel table and host launch cost.

For each backend it runs forward + backward at a preset under torch.profiler and writes the
per-kernel CUDA-time table, plus two host figures: the wall time to *enqueue* one step (no sync;
if it is close to the synced step time, the step is bound by the host, not the GPU) and the synced
step time.

    python bench/profile_loss.py --preset wan480 --dtype fp32 --out bench/results/profile.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from crepa_kernels import benchmark as bm  # noqa: E402
from crepa_kernels.ops.utils import switches_set  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan480", choices=sorted(bm.PRESETS))
    ap.add_argument("--dtype", default="fp32", choices=sorted(bm.DTYPES))
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_loss.py needs a CUDA device", file=sys.stderr)
        return 2
    preset = bm.PRESETS[args.preset]
    p, f = bm.make_inputs(preset, bm.DTYPES[args.dtype], "cuda")
    lines = [f"crepa_loss forward+backward, preset {preset.name} {preset.shapes}, {args.dtype}, "
             f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
             f"switches {switches_set() or 'none (defaults)'}"]
    failed = False
    for backend in args.backends.split(","):
        try:
            lines += _profile(backend, preset, p, f, args.iters)
        except Exception as exc:  # recorded: the other backends' tables still count
            failed = True
            lines += ["", f"== backend {backend}: {type(exc).__name__}: {exc}"]
        if args.out:  # after each backend: a time limit keeps the tables made before it
            bm.write_atomic(args.out, "\n".join(lines) + "\n")
    bm.print_report(lines, None)
    return 1 if failed else 0


def _profile(backend, preset, p, f, iters) -> list[str]:
    run = bm.build_callable("triton" if backend == "triton" else "torch", "full", preset, p, f)
    for _ in range(10):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    enqueue_ms = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    synced_ms = (time.perf_counter() - t0) / iters * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    return ["", f"== backend {backend}: host enqueue {enqueue_ms:.3f} ms/step, synced {synced_ms:.3f} ms/step "
                f"({iters} steps)", table]



if __name__ == "__main__":
    sys.exit(main())
