"""Interleaved A/B of the Triton backend's environment switches at one preset, in one process.

Each round runs every variant once, in turn, so a drift of the machine (clocks, a busy host) falls
on all variants alike; a variant's figure is its median over the rounds. Per variant and round:
``queued_ms`` (calls queued back to back, one sync at the end: the GPU's cost of a call when the
host keeps ahead, as in a training step) and ``synced_ms`` (the median of single synced calls: adds
the host's latency before the first kernel), both for forward + backward of the whole crepa_loss,
plus the allocator's peak above the inputs. The switches are read at call time, so one process
serves every variant. ``--tuned TUNE_JSON`` adds a variant ``tuned`` that runs the default switches
with each kernel's best launch settings from a ``bench/tune_kernels.py`` report (per dtype), so a
sweep's per-kernel gains can be checked on whole calls; where the report swept the one-pass backward
(``merged_bwd``), a variant ``tuned_merged`` runs it (``CREPA_KERNELS_MERGED_BWD=1``) with the same
settings, and where it swept the row-form one (``row_bwd``), a variant ``tuned_row``
(``CREPA_KERNELS_ROW_BWD=1``).

    python bench/ab_settings.py --preset wan480 --dtypes fp32,bf16 --rounds 5 \\
        --variant default= --variant win128=CREPA_KERNELS_BWD_WINDOW_MIB=128 --out ab.json

On a CPU (Triton's interpreter, use the ``tiny`` preset) it runs as a smoke test: perf_counter
timings, no memory figure, not a performance figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from crepa_kernels import benchmark as bm  # noqa: E402
from crepa_kernels.ops.utils import launch_overrides  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``name=KEY=VALUE[,KEY=VALUE...]`` or ``name=`` (the default settings)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant: got {spec!r}, expected NAME= or NAME=KEY=VALUE[,KEY=VALUE]")
    env = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("CREPA_KERNELS_"):
            raise ValueError(f"--variant {name}: got {item!r}, expected CREPA_KERNELS_<NAME>=VALUE")
        env[key] = value
    return name, env


def _one_round(run, device, synced: int, queued: int) -> dict:
    r = bm.measure(run, device, warmup=0, reps=synced, max_seconds=float("inf"), queued=queued)
    return {"synced_ms": r["median_ms"], "queued_ms": r["queued_ms"], "peak_extra_bytes": r.get("peak_extra_bytes")}


def tuned_overrides(path: str, preset: str) -> dict[str, dict]:
    """dtype -> kernel -> the best settings of a bench/tune_kernels.py report measured at ``preset``
    (kernels whose default was best are left out); a report of another preset is refused, since the
    settings are per shape. The kernel names the report swept are under the key ``"swept"``."""
    with open(path) as fh:
        report = json.load(fh)
    measured = (report.get("preset") or {}).get("name")
    if measured != preset:
        raise ValueError(f"the report was measured at preset {measured!r}, not {preset!r}")
    out: dict[str, dict] = {"swept": sorted({r["kernel"] for r in report.get("results", [])})}
    for r in report.get("results", []):
        best = r.get("best")
        if best and best.get("valid") and best.get("tune"):
            out.setdefault(r["dtype"], {})[r["kernel"]] = dict(best["tune"])
    return out


@contextlib.contextmanager
def _variant(env: dict, launch: "dict | None"):
    with bm.environment_override(env), launch_overrides(launch):
        yield


def run_ab(preset: str, dtypes: list[str], variants: list[tuple[str, dict]], *, rounds: int, warmup: int,
           synced: int, queued: int, device, launch: "dict | None" = None) -> list[dict]:
    """``launch``: variant name -> dtype -> launch-setting overrides (`launch_overrides`) it runs with."""
    launch = launch or {}
    pr = bm.PRESETS[preset]
    rows = []
    for dtype in dtypes:
        p, f = bm.make_inputs(pr, bm.DTYPES[dtype], device)
        run = bm.build_callable("triton", "full", pr, p, f)
        per = {name: [] for name, _ in variants}
        failed = {}  # a variant that raises is dropped with its error: the others still compare
        for name, env in variants:  # warm-up: compiles each variant's kernels outside the timed rounds
            try:
                with _variant(env, launch.get(name, {}).get(dtype)):
                    for _ in range(warmup):
                        run()
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
        for _ in range(rounds):
            for name, env in variants:
                if name in failed:
                    continue
                try:
                    with _variant(env, launch.get(name, {}).get(dtype)):
                        per[name].append(_one_round(run, device, synced, queued))
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"
        for name, env in variants:
            if name in failed:
                rows.append({"preset": preset, "dtype": dtype, "variant": name, "environment_override": env,
                             "error": failed[name]})
                continue
            r = per[name]
            q = [x["queued_ms"] for x in r]
            peaks = [x["peak_extra_bytes"] for x in r if x["peak_extra_bytes"] is not None]
            rows.append({"preset": preset, "dtype": dtype, "variant": name, "environment_override": env,
                         "launch_overrides": launch.get(name, {}).get(dtype) or {},
                         "queued_ms": statistics.median(q), "queued_min_ms": min(q), "queued_max_ms": max(q),
                         "synced_ms": statistics.median(x["synced_ms"] for x in r),
                         "peak_extra_bytes": max(peaks) if peaks else None, "rounds": r})
        del run, p, f
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, each variant against the first variant of its dtype that ran."""
    lines = ["| preset | dtype | variant | queued ms (min-max) | vs first | synced ms | vs first | peak extra MiB |",
             "|" + "---|" * 8]
    first = {}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['dtype']} | {r['variant']} | failed: {r['error'][:80]} |  |  |  |  |")
            continue
        ref = first.setdefault(r["dtype"], r)
        mem = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['preset']} | {r['dtype']} | {r['variant']} | {r['queued_ms']:.3f} "
                     f"({r['queued_min_ms']:.3f}-{r['queued_max_ms']:.3f}) | {r['queued_ms'] / ref['queued_ms']:.2f} | "
                     f"{r['synced_ms']:.3f} | {r['synced_ms'] / ref['synced_ms']:.2f} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan480", choices=sorted(bm.PRESETS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--variant", action="append", default=[], help="NAME= or NAME=KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--tuned", metavar="TUNE_JSON", help="add a variant 'tuned': the default switches with each "
                    "kernel's best launch settings from a bench/tune_kernels.py report, per dtype (and "
                    "'tuned_merged', the same with CREPA_KERNELS_MERGED_BWD=1, where the report swept merged_bwd, "
                    "and 'tuned_row', with CREPA_KERNELS_ROW_BWD=1, where it swept row_bwd)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--synced", type=int, default=10, help="single synced calls per round")
    ap.add_argument("--queued", type=int, default=30, help="calls queued back to back per round")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in (args.variant or ["default="])]
        launch = {}
        if args.tuned:
            try:
                launch["tuned"] = tuned_overrides(args.tuned, args.preset)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
                raise ValueError(f"--tuned: cannot read tuned settings from {args.tuned!r}: {e}") from None
            swept = launch["tuned"].pop("swept")
            for dtype, per_dtype in launch["tuned"].items():
                try:
                    with launch_overrides(per_dtype):  # checks them before anything runs
                        pass
                except ValueError as e:
                    raise ValueError(f"--tuned: {args.tuned!r}, {dtype}: {e}") from None
            variants.append(("tuned", {}))
            if "merged_bwd" in swept:
                launch["tuned_merged"] = launch["tuned"]
                variants.append(("tuned_merged", {"CREPA_KERNELS_MERGED_BWD": "1"}))
            if "row_bwd" in swept:
                launch["tuned_row"] = launch["tuned"]
                variants.append(("tuned_row", {"CREPA_KERNELS_ROW_BWD": "1"}))
        names = [name for name, _ in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"--variant: names must differ, got {', '.join(names)}")
        dtypes = [d for d in args.dtypes.split(",") if d]
        bad = [d for d in dtypes if d not in bm.DTYPES]
        if bad or not dtypes:
            raise ValueError(f"--dtypes: got {args.dtypes!r}, expected a comma list of {', '.join(bm.DTYPES)}")
        for name, value in (("--rounds", args.rounds), ("--synced", args.synced), ("--queued", args.queued)):
            if value < 1:
                raise ValueError(f"{name}: got {value}, expected a positive int")
    except ValueError as e:
        ap.error(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"benchmark": "interleaved A/B of environment switches, crepa_loss forward + backward",
              "environment": bm.environment(device), "rounds": args.rounds, "synced_calls": args.synced,
              "queued_calls": args.queued, "results": []}
    for dtype in dtypes:  # the file is rewritten after each dtype: a time limit keeps what finished
        report["results"] += run_ab(args.preset, [dtype], variants, rounds=args.rounds, warmup=args.warmup,
                                    synced=args.synced, queued=args.queued, device=device, launch=launch)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=2)
    print(table(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
