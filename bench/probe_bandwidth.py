"""Where the similarity kernels' time goes at one preset: each timed alone, next to what the device
reaches reading the same tensors.

- ``read``: torch's sum over ``projected`` and over ``features``, each read once: the bandwidth this
  device reaches on these tensors, a measured ceiling to set beside the vendor figure.
- ``sim_fwd`` (the similarity forward, the projected side resampled as it is loaded) at neighbour
  distance 0 (1 frame slot per program), 1 and 2 (3 slots: the frame and its two neighbours at that
  distance, crepa_loss's adjacent mode) and cumulative 2 (5 slots). Each reads the same bytes once;
  if the time grows with the slots, re-reading the neighbour frames bounds the kernel, and one that
  streams each frame through once would pay; if it does not, the bound is elsewhere (the resample
  taps, latency). Distance 2 against 1 (same slots, neighbours farther apart in the launch order)
  shows how much of the re-reading L2 absorbs.
- ``sim_fwd_unfused``: the same forward at distance 1 on a projected side already on the features'
  grid (no taps): the fused resample's own cost.
- ``sim_bwd`` (one frame window of the backward, as crepa_loss launches it) at distance 0 and 1.

Each row names its ``distance`` and ``slots``.

``gbps`` counts each input read once and each output written once, as the kernel suite does. On a
GPU each timing is ``triton.testing.do_bench`` (L2 flushed before every run; median, p20 and p80);
without one it runs on Triton's interpreter as a smoke test (``TRITON_INTERPRET=1``, ``--preset
tiny_fused``): perf_counter timings, not a performance figure. The JSON is written after every row;
a row whose setup or kernel fails records the error and the probe goes on (exit status 1).

    python bench/probe_bandwidth.py --preset wan480 --dtypes fp32 --out probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from crepa_kernels import benchmark as bm  # noqa: E402
from crepa_kernels.ops import similarity  # noqa: E402
from crepa_kernels.ops.utils import accumulation_dtype  # noqa: E402

from tune_kernels import CUMULATIVE, NORMALIZE, PRESETS, TAU, Case, _timer  # noqa: E402

# (distance, cumulative) of the forward rows; the backward takes the first two
NEIGHBOURS = ((0, False), (1, False), (2, False), (2, True))


def _row(what: str, dtype_name: str, neighbours, timed, make, bandwidth, frames: int = 0) -> dict:
    """One timed row; ``make()`` builds its inputs and returns (launch, bytes counted)."""
    distance, cumulative = neighbours if neighbours else (None, False)
    row = {"what": what, "dtype": dtype_name, "distance": distance, "cumulative": cumulative,
           "slots": similarity.num_slots(distance, frames, cumulative) if neighbours else None}
    try:
        fn, nbytes = make()  # builds the inputs (a Case launches its kernels once to set them up)
        fn()  # compiles outside the timing
        ms, p20, p80 = timed(fn)
    except Exception as e:  # a kernel the device refuses, or memory: the row says so, the probe goes on
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return row
    row.update(ms=ms, p20_ms=p20, p80_ms=p80, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9)
    if bandwidth:
        row["roofline_fraction"] = nbytes / (ms * 1e-3) / bandwidth
    return row


def _unfused_forward(preset: bm.Preset, dtype: torch.dtype, device):
    """(launch, bytes) of the forward at distance 1 on inputs already on one grid (no taps)."""
    _, f = bm.make_inputs(preset, dtype, device)
    p = torch.randn(f.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    B, T, N, _ = f.shape
    acc = accumulation_dtype(dtype)
    S = similarity.num_slots(1, T, CUMULATIVE)
    outs = [torch.empty((B, T, N), dtype=acc, device=device) for _ in range(4)]
    cos = torch.empty((B, T, S, N), dtype=acc, device=device)

    def launch():
        similarity._launch_forward(p, f, *outs, cos, distance=1, tau=TAU, cumulative=CUMULATIVE,
                                   normalize_neighbour_sum=NORMALIZE)
    written = sum(t.numel() * t.element_size() for t in (*outs, cos))
    return launch, (p.numel() + f.numel()) * p.element_size() + written


def probe(preset: bm.Preset, dtype_name: str, device, timed, bandwidth, emit) -> None:
    dtype = bm.DTYPES[dtype_name]
    p, f = bm.make_inputs(preset, dtype, device)
    T = f.shape[1]
    for name, t in (("projected", p), ("features", f)):
        emit(_row(f"read {name}", dtype_name, None, timed,
                  lambda t=t: (lambda: t.sum(), t.numel() * t.element_size()), bandwidth))
    del p, f

    def case(kernel, neighbours):
        def make():
            c = Case(kernel, preset, dtype, device, distance=neighbours[0], cumulative=neighbours[1])
            return (lambda: c.run(None)), c.bytes
        return make

    for kernel, neighbours in [("sim_fwd", n) for n in NEIGHBOURS] + [("sim_bwd", n) for n in NEIGHBOURS[:2]]:
        if kernel == "sim_bwd" and neighbours == NEIGHBOURS[0]:
            emit(_row("sim_fwd_unfused", dtype_name, (1, False), timed,
                      lambda: _unfused_forward(preset, dtype, device), bandwidth, T))
        emit(_row(kernel, dtype_name, neighbours, timed, case(kernel, neighbours), bandwidth, T))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan480", choices=sorted(PRESETS))
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--rep-ms", type=int, default=40, help="do_bench's timed span per row (GPU)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in bm.DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r}, expected some of {', '.join(bm.DTYPES)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = bm.environment(device)
    bandwidth = env.get("bandwidth_bytes_per_s")
    report = {"environment": env, "preset": bm.as_dict(PRESETS[args.preset]),
              "timer": "triton.testing.do_bench, L2 flushed, median" if cuda
              else "interpreter smoke test: perf_counter, not a performance figure",
              "results": []}

    def emit(row: dict) -> None:
        report["results"].append(row)
        where = row["what"] + ("" if row["distance"] is None else
                               f" d={row['distance']}{' cumulative' if row['cumulative'] else ''}")
        if "error" in row:
            print(f"{where:22s} {row['dtype']}: failed: {row['error']}")
        else:
            print(f"{where:22s} {row['dtype']}: {row['ms']:.4f} ms ({row['p20_ms']:.4f}-{row['p80_ms']:.4f}), "
                  f"{row['gbps']:.0f} GB/s" + (f", {row['roofline_fraction']:.0%} of the vendor figure"
                                                if "roofline_fraction" in row else ""))
        if args.out:
            bm.write_atomic(args.out, json.dumps(report, indent=1, default=str))

    start = time.monotonic()
    for dtype_name in dtypes:
        probe(PRESETS[args.preset], dtype_name, device, _timer(cuda, args.rep_ms), bandwidth, emit)
    print(f"probe: {len(report['results'])} rows in {time.monotonic() - start:.1f} s")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
