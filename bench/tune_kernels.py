"""Launch-setting sweep of the hot Triton kernels at one preset, each kernel timed on its own.

crepa_loss's launch settings are a function of the shape (no autotuning, so behaviour is
reproducible); this measures how good that function's choices are. For each kernel of the default
wan480 call - the similarity forward with the projected side's resample fused in (``sim_fwd``), the
similarity backward of one frame window (``sim_bwd``) and the resample backward of that window
(``resample_bwd``) - it times the default settings and variations of them: the token block, the
warps and the feature block (and, for the resample backward, its row form and the feature blocks one
program computes), one at a time, then the best of each combined. The opt-in one-pass
backwards (the whole clip in one launch, in place of both backward kernels in every window) are
swept the same way: the row form (``row_bwd``) over its tile of a row, feature blocks per program,
warps and feature block, and, when named in ``--kernels`` (two H200 sweeps timed it at 1.6-1.8x the
two-pass backward's kernels), the banded one (``merged_bwd``) over its band height (``rows``), warps
and feature block. Inputs and launch
arguments are the ones crepa_loss passes (a stride-0 loss gradient, the first backward window, the
window's slice of the input-grid gradient as destination). ``--try KERNEL:KEY=VALUE,...`` times
chosen overrides first. Triton's pipelining depth is not swept (no load in these kernels feeds a
tl.dot, and triton 3.8 emits the same PTX for 1 to 4 stages); ``--try`` takes ``num_stages`` too.

Every variant's outputs are compared with the default's: ``bits_equal`` (the same bits) and
``max_rel_diff`` (the largest difference over the largest magnitude). A variant differing by more
than the tolerance of its output dtype is marked invalid and never reported as best: settings that
change results beyond rounding are a defect, not a speed-up. Outputs are filled with NaN before
each variant's checked run, so an element it leaves unwritten fails. The feature block sets the
summation order over D; the token block and the warps usually leave the bits alone, though on a GPU
the layout of a reduction over D can follow them.

On a GPU each timing is ``triton.testing.do_bench`` (L2 flushed before every run; median and p20 /
p80 over about ``--rep-ms`` of runs). Without one it runs on Triton's interpreter as a smoke test
(``TRITON_INTERPRET=1``, ``--preset tiny_fused``): perf_counter timings, not a performance figure.

    python bench/tune_kernels.py --preset wan480 --dtypes fp32,bf16 --budget-s 150 --out tune.json

The JSON is written after every kernel and dtype, so a run cut short keeps what it measured.
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
from crepa_kernels.alignment import plan_tokens  # noqa: E402
from crepa_kernels.ops import resample, similarity  # noqa: E402
from crepa_kernels.ops.utils import (BAND_TUNE_KEYS, TUNE_KEYS, accumulation_dtype, apply_tune,  # noqa: E402
                                     bwd_window_bytes, next_power_of_2, tune_keys)

# By their share of the wan480 call's GPU time; then the opt-in one-pass backwards, which replace the
# two backward kernels in every window. The banded one is swept only when asked for.
KERNELS = ("sim_bwd", "resample_bwd", "sim_fwd", "row_bwd", "merged_bwd")
DEFAULT_KERNELS = ("sim_bwd", "resample_bwd", "sim_fwd", "row_bwd")
# The benchmark presets whose projected grid is the larger (resampled inside the similarity kernels),
# and an interpreter-sized one that takes that path too (its D spans several feature blocks).
PRESETS = {**{k: v for k, v in bm.PRESETS.items() if v.projected_grid[0] * v.projected_grid[1]
              > v.features_grid[0] * v.features_grid[1]},
           "tiny_fused": bm.Preset("tiny_fused", 1, 3, (3, 5), (2, 3), 40)}
# crepa_loss's defaults (SPEC section 3): the adjacent neighbour at distance 1, tau 1.
DISTANCE, TAU, CUMULATIVE, NORMALIZE = 1, 1.0, False, False
# A variant is invalid when it differs from the default by more than this share of the largest
# magnitude: several roundings of the output dtype (a changed summation order moves fp32 results
# by a few ulps, bf16 outputs by one of theirs).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


class Case:
    """One kernel at one dtype: ``run(tune)`` launches it with those overrides and returns its outputs
    (the same tensors every call); ``default`` is the shape-derived (BLOCK_N, BLOCK_D, num_warps)."""

    def __init__(self, kernel: str, preset: bm.Preset, dtype: torch.dtype, device, distance: int = DISTANCE,
                 cumulative: bool = CUMULATIVE):
        self.kernel = kernel
        self.distance, self.cumulative = distance, cumulative
        self.keys = tune_keys(kernel)
        self.dim = preset.dim
        p, f = bm.make_inputs(preset, dtype, device)
        B, T, _, D = f.shape
        plan = plan_tokens(p.shape[2], f.shape[2], projected_grid=preset.projected_grid,
                           features_grid=preset.features_grid)
        if plan.pool or plan.features is not None or plan.projected is None:
            raise ValueError(f"preset {preset.name}: the sweep covers the fused-resample path (the projected "
                             f"grid resampled to the features grid), which this preset does not take")
        self.resample_p = (*plan.projected.in_grid, *plan.projected.out_grid)
        N, n_in = f.shape[2], p.shape[2]
        acc = accumulation_dtype(dtype)
        kw = dict(distance=distance, tau=TAU, cumulative=cumulative, normalize_neighbour_sum=NORMALIZE,
                  resample_p=self.resample_p)
        S = similarity.num_slots(distance, T, cumulative)
        side = [torch.empty((B, T, N), dtype=acc, device=device) for _ in range(4)]
        cos = torch.empty((B, T, S, N), dtype=acc, device=device)
        similarity._launch_forward(p, f, *side, cos, **kw)
        total, self_tok, pnorm, fnorm = side
        # The first frame window of crepa_loss's backward, and the loss gradient: one value for every
        # token, read through stride 0 (crepa_loss's loss-only backward hands over the 0-dim gradient
        # and its factor apart, for the kernel to multiply: the same reads).
        t0, tc = similarity.frame_windows(T, B * N * D * p.element_size(), bwd_window_bytes())[0]
        g_total = torch.full((), 0.25 / (B * T * N), dtype=acc, device=device).expand(B, T, N)
        self.window = (t0, tc)
        el = p.element_size()
        if kernel == "sim_fwd":
            self.default = similarity.launch_settings(f.shape, distance, cumulative, acc, p.device, fused=True,
                                                      input_dtype=dtype)
            outs = [torch.empty_like(t) for t in side] + [torch.empty_like(cos)]

            def run(tune):
                similarity._launch_forward(p, f, *outs, **kw, tune=tune)
                return outs
            self.outputs = outs
            # inputs read once, the side buffers written once
            self.bytes = (p.numel() + f.numel()) * el + sum(t.numel() * t.element_size() for t in outs)
        elif kernel == "sim_bwd":
            self.default = similarity.launch_settings(f.shape, distance, cumulative, acc, p.device, fused=True,
                                                      backward=True, input_dtype=dtype)
            dp_res = torch.empty((B, tc, N, D), dtype=dtype, device=device)

            def run(tune):
                similarity._launch_backward(p, f, pnorm, fnorm, cos, g_total, None, dp_res, None, frames=(t0, tc),
                                            **kw, tune=tune)
                return [dp_res]
            self.outputs = [dp_res]
            d = min(distance, T - 1)
            f_frames = min(T, t0 + tc + d) - max(0, t0 - d)  # the window's frames and its neighbours
            side_bytes = (pnorm.numel() + fnorm.numel() + cos.numel()) * pnorm.element_size() * tc // T
            self.bytes = (B * tc * n_in * D + B * f_frames * N * D + dp_res.numel()) * el + side_bytes
        elif kernel == "resample_bwd":
            self.default = resample.bwd_settings(n_in, D)
            g = torch.Generator(device="cpu").manual_seed(1)
            dp_res = torch.randn((B, tc, N, D), generator=g).to(device=device, dtype=dtype)
            dp = torch.empty(p.shape, dtype=dtype, device=device)
            dst = dp[:, t0:t0 + tc]

            def run(tune):
                resample._launch_bwd(dp_res, *self.resample_p, out=dst, tune=tune)
                return [dst]
            self.outputs = [dst]
            self.bytes = (dp_res.numel() + dst.numel()) * el
        elif kernel in ("merged_bwd", "row_bwd"):
            # A band height (or a row tile) sets its own block and warps unless given: report what runs.
            if kernel == "merged_bwd":
                def launched(tune):  # rows, BLOCK_D, num_warps
                    c, _ = similarity.band_settings(B, T, self.resample_p, D, acc == torch.float64, p.device, tune)
                    return None if c is None else (c[0], c[3], c[5])
                launch = similarity._launch_merged_backward
                declined = "one-row bands of its grids pass the one-pass backward's tile limit"
            else:
                def launched(tune):  # BLOCK_W, BLOCK_D, num_warps, D_BLOCKS
                    c, _ = similarity.row_settings(B, T, self.resample_p, D, distance, cumulative,
                                                   acc == torch.float64, p.device, tune)
                    return None if c is None else (c[0], c[2], c[3], c[4])
                launch = similarity._launch_row_backward
                declined = "the row-form one-pass backward declines its grids"
            if launched({}) is None:
                raise ValueError(f"preset {preset.name}: {declined} (crepa_loss takes the two-pass backward there)")
            self.launched = launched
            self.default = launched({})[:3]
            self.window = (0, T)  # the whole clip in one launch
            dp = torch.empty(p.shape, dtype=dtype, device=device)

            def run(tune):
                assert launch(p, f, pnorm, fnorm, cos, g_total, None, dp, **kw, tune=tune)
                return [dp]
            self.outputs = [dp]
            side_bytes = (pnorm.numel() + fnorm.numel() + cos.numel()) * pnorm.element_size()
            self.bytes = (p.numel() + f.numel() + dp.numel()) * el + side_bytes
        else:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.run = run
        self.tolerance = TOLERANCE[dtype]

    def reset(self) -> None:
        """NaN in every output, so that an element a variant leaves unwritten fails the comparison."""
        for t in self.outputs:
            t.fill_(float("nan"))


def candidates(default: tuple[int, int, int], dim: int, kernel: str = "sim_fwd") -> list[dict]:
    """Overrides to try around the default (BLOCK_N, BLOCK_D, num_warps), one setting at a time, in
    the order they are timed (the ones judged likelier to matter first); feature blocks stay within
    the next power of two of ``dim``. The banded one-pass backward's first setting is its band
    height: 1 to 4 rows, then its warps and a feature block from 8 to 64; the row-form one's its
    tile of a row (half and a quarter), then its feature blocks per program, warps and feature block.
    The resample backward's sweep starts with its row form and the feature blocks one program
    computes (``d_blocks``, 1 by default)."""
    block_n, block_d, warps = default
    if kernel == "row_bwd":  # its tile of a row, feature blocks per program, warps, feature block
        out = [{"block_n": n} for n in (block_n // 2, block_n // 4) if n >= 8]
        out += [{"d_blocks": n} for n in (1, 4, 16)]
        out += [{"num_warps": w} for w in (4, 2) if w != warps]
        out += [{"block_d": b} for b in (block_d // 2, block_d * 2) if 8 <= b <= min(64, next_power_of_2(dim))]
        return out
    if kernel == "merged_bwd":
        out = [{"rows": r} for r in (1, 2, 3, 4) if r != block_n]
        out += [{"num_warps": w} for w in (4, 8) if w != warps]
        out += [{"block_d": b} for b in (block_d // 2, block_d * 2) if 8 <= b <= min(64, next_power_of_2(dim))]
        return out
    # No num_stages: these kernels feed no tl.dot, and triton 3.8 emits the same PTX for 1 to 4 stages.
    out = []
    if kernel == "resample_bwd":
        # The row form first (its own tiles; with 4 feature blocks per program; with half-row tiles),
        # then feature blocks per program of the default form (the same bits, the contributor search
        # run once for several blocks): 4, all of them, 2.
        out += [{"row_kernel": 1}, {"row_kernel": 1, "d_blocks": 4}, {"row_kernel": 1, "block_n": 32}]
        blocks = -(-dim // block_d)
        out += [{"d_blocks": n} for n in dict.fromkeys((4, blocks, 2)) if 1 < n <= blocks]
    out += [{"block_n": n} for n in (block_n // 2, block_n * 2, block_n * 4) if 2 <= n <= 64]
    out += [{"num_warps": w} for w in (2, 4, 8) if w != warps]
    out += [{"block_d": b} for b in (block_d // 2, block_d * 2) if 16 <= b <= min(256, next_power_of_2(dim))]
    return out


def combined(rows: list[dict]) -> "dict | None":
    """The per-setting winners of the single-setting variants merged into one override, when at least
    two settings each beat the default (else None: nothing new to try)."""
    base = next(r for r in rows if r["tune"] == {})
    best = {}
    for r in rows:
        if not r.get("valid") or len(r["tune"]) != 1 or r["ms"] >= base["ms"]:
            continue
        (key, value), = r["tune"].items()
        if key not in best or r["ms"] < best[key][1]:
            best[key] = (value, r["ms"])
    return {k: v for k, (v, _) in best.items()} if len(best) >= 2 else None


def parse_tries(specs: list[str]) -> dict[str, list[dict]]:
    """``--try`` values as kernel -> overrides, checked as the launchers check them."""
    out: dict[str, list[dict]] = {}
    for spec in specs:
        kernel, sep, rest = spec.partition(":")
        if not sep or kernel not in KERNELS:
            raise ValueError(f"--try {spec!r}: expected KERNEL:KEY=VALUE[,KEY=VALUE] with KERNEL one of "
                             f"{', '.join(KERNELS)}")
        tune = {}
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not value.isdigit():
                raise ValueError(f"--try {spec!r}: {item!r} is not KEY=INT")
            tune[key] = int(value)
        try:
            apply_tune(1, 1, 1, tune, tune_keys(kernel))  # names an unknown key or a bad value
        except ValueError as e:
            raise ValueError(f"--try {spec!r}: {e}") from None
        out.setdefault(kernel, []).append(tune)
    return out


def _timer(cuda: bool, rep_ms: int):
    if cuda:
        import triton.testing

        def timed(fn):
            p20, p50, p80 = triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                                    quantiles=[0.2, 0.5, 0.8])
            return p50, p20, p80
        return timed

    def timed(fn):  # the interpreter: a smoke test, not a performance figure
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        return times[1], times[0], times[2]
    return timed


def _compare(out: list, ref: list) -> tuple[bool, float]:
    """(bits equal, largest |difference| over the largest |reference|) across the outputs; a NaN
    difference counts as infinite."""
    bits, worst = True, 0.0
    for a, b in zip(out, ref):
        bits = bits and torch.equal(a, b)
        scale = b.abs().max().item() if b.numel() else 0.0
        diff = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        if diff != diff:
            diff = float("inf")
        worst = max(worst, diff / scale if scale else diff)
    return bits, worst


def measure_variant(case: Case, tune: dict, ref: "list | None", timed, bandwidth) -> dict:
    row = {"tune": dict(tune)}
    try:
        row["settings"] = _settings(case, tune)
        case.reset()
        outs = case.run(tune or None)  # compiles this variant outside the timing
        if ref is not None:
            row["bits_equal"], row["max_rel_diff"] = _compare(outs, ref)
            row["valid"] = row["max_rel_diff"] <= case.tolerance
        elif any(bool(t.isnan().any()) for t in outs):
            raise RuntimeError("the default settings left NaN in the outputs (unwritten elements?)")
        else:
            row["bits_equal"], row["max_rel_diff"], row["valid"] = True, 0.0, True
        ms, p20, p80 = timed(lambda: case.run(tune or None))
    except Exception as e:  # a setting the compiler or the device refuses (e.g. out of resources)
        row.update(valid=False, error=f"{type(e).__name__}: {e}"[:300])
        return row
    row.update(ms=ms, p20_ms=p20, p80_ms=p80, gbps=case.bytes / (ms * 1e-3) / 1e9)
    if bandwidth:
        row["roofline_fraction"] = case.bytes / (ms * 1e-3) / bandwidth
    return row


def _settings(case, tune) -> dict:
    """The settings a variant launches with: its overrides, the rest from the default (the one-pass
    backwards derive theirs from the band height or the row tile instead, and the row form's feature
    blocks per program from its grid)."""
    launched = getattr(case, "launched", None)
    if launched is not None:
        settings = launched(tune)
        if settings is None:
            raise ValueError(f"{case.kernel} declines the grids with {tune} (the two-pass backward would run)")
        first, (block_n, block_d, warps, *more) = case.keys[0], settings
        out = {first: block_n, "block_d": block_d, "num_warps": warps,
               "num_stages": tune.get("num_stages", "triton default")}
        if more:
            out["d_blocks"] = more[0]
        return out
    if getattr(case, "kernel", None) == "resample_bwd":  # the row form has tiles of its own
        plan = resample.bwd_plan(case.resample_p[:2], case.resample_p[2:], case.dim, tune)
        return {"block_n": plan["block_n"], "block_d": plan["block_d"], "num_warps": plan["num_warps"],
                "num_stages": tune.get("num_stages", "triton default"), "d_blocks": plan["d_blocks"],
                "row_kernel": int(plan["row_kernel"])}
    block_n, block_d, warps = case.default
    first = case.keys[0]
    return {first: tune.get(first, block_n), "block_d": tune.get("block_d", block_d),
            "num_warps": tune.get("num_warps", warps), "num_stages": tune.get("num_stages", "triton default")}


def sweep(kernel: str, preset: bm.Preset, dtype_name: str, device, timed, bandwidth, deadline: float,
          max_variants: "int | None" = None, extra: "list[dict] | None" = None) -> dict:
    """The default and its variants for one kernel and dtype (``extra`` overrides first, then
    `candidates`), until ``deadline`` (time.monotonic) or ``max_variants`` variants besides the
    default."""
    try:
        # ValueError: a preset this kernel does not cover; anything else (out of memory, a compile or
        # launch error) is this kernel's alone, and the sweep goes on to the next
        case = Case(kernel, preset, bm.DTYPES[dtype_name], device)
    except Exception as e:
        return {"kernel": kernel, "dtype": dtype_name, "error": f"{type(e).__name__}: {e}", "rows": []}
    base = measure_variant(case, {}, None, timed, bandwidth)
    if "error" in base:
        return {"kernel": kernel, "dtype": dtype_name, "error": base["error"], "rows": [base]}
    try:
        case.reset()
        ref = [t.clone() for t in case.run(None)]
    except Exception as e:
        return {"kernel": kernel, "dtype": dtype_name, "error": f"{type(e).__name__}: {e}", "rows": [base]}
    rows, cut = [base], False
    limit = float("inf") if max_variants is None else max_variants
    for phase in (list(extra or []) + candidates(case.default, case.dim, kernel), None):  # then the winners together
        if phase is None:
            mix = combined(rows)
            phase = [mix] if mix is not None and not cut and all(r["tune"] != mix for r in rows) else []
        for tune in phase:
            if time.monotonic() > deadline or len(rows) > limit:
                cut = True
                break
            rows.append(measure_variant(case, tune, ref, timed, bandwidth))
    for r in rows:
        if r.get("valid") and "ms" in r:
            r["speedup_vs_default"] = base["ms"] / r["ms"]
    valid = [r for r in rows if r.get("valid") and "ms" in r]
    best = min(valid, key=lambda r: r["ms"])
    return {"kernel": kernel, "dtype": dtype_name, "default_settings": _settings(case, {}),
            "window": case.window if kernel != "sim_fwd" else None, "io_bytes": case.bytes,
            "default_ms": base["ms"], "best": best, "cut_short": cut, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan480", choices=sorted(PRESETS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--kernels", default=",".join(DEFAULT_KERNELS), help=f"a subset of {', '.join(KERNELS)}")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop starting variants after this many seconds (each kernel and dtype still runs its default)")
    ap.add_argument("--max-variants", type=int, default=None,
                    help="at most this many variants per kernel and dtype besides the default (smoke tests)")
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="KERNEL:KEY=VALUE[,KEY=VALUE]",
                    help="an override to time first for one kernel, e.g. sim_bwd:block_n=16,num_warps=4 "
                         f"(keys: {', '.join(TUNE_KEYS)}; resample_bwd also d_blocks, row_kernel; row_bwd also d_blocks; "
                         "for merged_bwd "
                         f"{', '.join(BAND_TUNE_KEYS)}); "
                         "repeatable")
    ap.add_argument("--rep-ms", type=int, default=40, help="do_bench's timed span per variant (GPU)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    kernels = [k for k in args.kernels.split(",") if k]
    for d in dtypes:
        if d not in bm.DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r}, expected some of {', '.join(bm.DTYPES)}")
    for k in kernels:
        if k not in KERNELS:
            ap.error(f"--kernels: unknown kernel {k!r}, expected some of {', '.join(KERNELS)}")
    try:
        extra = parse_tries(args.tries)
    except ValueError as e:
        ap.error(str(e))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = bm.environment(device)
    bandwidth = env.get("bandwidth_bytes_per_s")
    timed = _timer(cuda, args.rep_ms)
    end = time.monotonic() + args.budget_s
    cases = [(k, d) for k in kernels for d in dtypes]
    report = {"environment": env, "preset": bm.as_dict(PRESETS[args.preset]),
              "timer": "triton.testing.do_bench, L2 flushed, median" if cuda
              else "interpreter smoke test: perf_counter, not a performance figure",
              "results": []}
    for i, (kernel, dtype_name) in enumerate(cases):
        # an equal share of what is left, so a slow compile early does not starve the later kernels
        deadline = time.monotonic() + max(0.0, end - time.monotonic()) / (len(cases) - i)
        res = sweep(kernel, PRESETS[args.preset], dtype_name, device, timed, bandwidth, deadline,
                    args.max_variants, extra.get(kernel))
        report["results"].append(res)
        if "error" in res:
            print(f"{kernel:13s} {dtype_name}: default failed: {res['error']}")
        else:
            b = res["best"]
            print(f"{kernel:13s} {dtype_name}: default {res['default_ms']:.4f} ms {res['default_settings']}; "
                  f"best {b['ms']:.4f} ms {b['settings']} ({b['speedup_vs_default']:.2f}x, "
                  f"bits_equal={b['bits_equal']}); {len(res['rows'])} variants"
                  + (" (cut short)" if res["cut_short"] else ""))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
