"""The GPU benchmark pass of bench/gpu_check.sh: kernel suite + offload figures into one results JSON.

Usage: python3 bench/gpu_check.py --out DIR [--budget-s 300]
Writes DIR/<gpu-name>.json (and .md, .png). Cases are ordered by importance and the run stops
starting new ones when the time budget is spent, so a slow compile cannot cost the whole file; a
SIGTERM (an outer time limit) ends the case in flight; the JSON, rewritten after every case, keeps
the rows measured before it, as it does when a case raises past the suite (a sticky CUDA error).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from crepa_kernels import benchmark as bm  # noqa: E402

# (presets, dtypes, providers, modes, environment): most important first. The ELEMS_PER_THREAD=32 row
# is an A/B of the warps-per-program rule (32 = fewer warps, the rule the first H200 figures used);
# FUSED_RESAMPLE=0 resamples the projected side in its own pass instead of inside the similarity
# kernels; the FRONT_END=custom_op rows time eager calls through the custom ops instead of the direct
# autograd.Function (the host cost the direct front end removes); BWD_WINDOW_MIB sets the frame
# windows of the fused resample's backward (default 128 MiB: 2 windows at wan480 fp32, 1 in bf16;
# 64: 3 and 2; 1024: one); FAST_LAUNCH=0 launches through Triton's binder instead of past it
# (crepa_kernels/ops/launch.py; the fast launch is the default since these rows and the A/B said it pays);
# FUSED_HALF_BLOCK_N=0 gives the fused-resample kernels the unfused token block (16-byte tap loads);
# MERGED_BWD=1 runs the fused-resample backward as one kernel over bands of input rows (no
# resampled-grid buffer, no frame windows; off by default until these rows and the A/B say it pays);
# ROW_BWD=1 as one kernel over tiles of input rows (the same, with no staging; untimed so far, so
# right after the defaults).
PLAN = [
    (["wan480"], ["fp32", "bf16"], ["torch", "triton"], ["full", "forward", "backward"], {}),
    (["wan480"], ["fp32", "bf16"], ["torch_compile"], ["full"], {}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full", "backward"], {"CREPA_KERNELS_ROW_BWD": "1"}),
    (["wan480", "small"], ["fp32", "bf16"], ["triton"], ["full"], {"CREPA_KERNELS_FAST_LAUNCH": "0"}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full", "backward"], {"CREPA_KERNELS_MERGED_BWD": "1"}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full", "forward"], {"CREPA_KERNELS_FUSED_HALF_BLOCK_N": "0"}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full"], {"CREPA_KERNELS_BWD_WINDOW_MIB": "64"}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full"], {"CREPA_KERNELS_BWD_WINDOW_MIB": "1024"}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full", "forward"], {"CREPA_KERNELS_FUSED_RESAMPLE": "0"}),
    (["wan480"], ["fp32", "bf16"], ["triton"], ["full"], {"CREPA_KERNELS_ELEMS_PER_THREAD": "32"}),
    (["wan480", "small"], ["fp32"], ["triton"], ["full"], {"CREPA_KERNELS_FRONT_END": "custom_op"}),
    (["small", "ltx768", "wan720"], ["fp32", "bf16"], ["torch", "triton"], ["full"], {}),
    (["wan720"], ["bf16"], ["torch_compile"], ["full"], {}),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300.0)

    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device", file=sys.stderr)
        return 2
    t_end = time.time() + args.budget_s
    rows, skipped = [], []
    interrupted = None
    # A time limit's SIGTERM would end Python without running `finally`: turn it into an exception.
    # The JSON is rewritten after every case, so whatever ends the run keeps the rows measured.
    signal.signal(signal.SIGTERM, _terminate)
    report = name = None
    try:
        env = bm.environment("cuda")
        name = env["device"].replace(" ", "_").replace("/", "_")
        report = {"environment": env, "presets": {n: bm.as_dict(p) for n, p in bm.PRESETS.items()},
                  "results": rows, "skipped_for_time": skipped}
        smi = _nvidia_smi()
        if smi:
            report["nvidia_smi"] = smi
        for presets, dtypes, providers, modes, overrides in PLAN:
            for preset in presets:
                for dtype in dtypes:
                    for mode in modes:
                        for provider in providers:
                            if time.time() > t_end:
                                skipped.append(f"{preset}/{dtype}/{mode}/{_labelled(provider, overrides)}")
                                continue
                            try:
                                rows.append(_run_case(preset, dtype, mode, provider, overrides))
                            except Exception as exc:  # e.g. a sticky CUDA error raised past the suite
                                rows.append({"preset": preset, "dtype": dtype, "mode": mode,
                                             "provider": _labelled(provider, overrides),
                                             "error": f"{type(exc).__name__}: {_first_line(exc)}"})
                                print(f"{preset}/{dtype}/{mode}/{provider}: {rows[-1]['error']}", flush=True)
                            _save_json(report, args.out, name, env)
    except _Terminated:
        interrupted = "SIGTERM (a time limit) during the case after the last row"
    # The rest takes a second or two; a late SIGTERM no longer interrupts it (the caller's kill ends a
    # hang, and the JSON of every measured row is on disk already).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if report is None:
        print("gpu_check.py: ended before the first case", file=sys.stderr)
        return 1
    if interrupted:
        report["interrupted"] = interrupted
    bm.add_speedups(rows, report["environment"].get("bandwidth_bytes_per_s"))
    for path in bm.write_outputs(report, args.out, name):
        print(f"wrote {path}")
    print(bm.markdown_table(rows))
    for line in ab_summary(rows):
        print(line)
    return 1 if interrupted else 0


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _nvidia_smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def _save_json(report: dict, out_dir: str, name: str, env: dict) -> None:
    """The report so far, as DIR/<name>.json, replaced atomically (a kill mid-write keeps the last one)."""
    bm.add_speedups(report["results"], env.get("bandwidth_bytes_per_s"))
    bm.write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=2))


class _Terminated(BaseException):
    """Not an Exception: the suite records a failing case's Exception as a row and goes on."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Terminated()


def _labelled(provider: str, env: dict) -> str:
    """A provider's name with the environment overrides of its rows, e.g. triton[CREPA_KERNELS_X=1]."""
    return f"{provider}[{','.join(f'{k}={v}' for k, v in env.items())}]" if env else provider


def _run_case(preset: str, dtype: str, mode: str, provider: str, env: dict) -> dict:
    with bm.environment_override(env):
        part = bm.run_suite([preset], [dtype], [provider], [mode], "cuda", progress=False)
    row = part["results"][0]
    if env:
        row["environment_override"] = dict(env)
        row["provider"] = _labelled(provider, env)
    brief = row.get("error") or (f"{row['median_ms']:.3f} ms (queued {row['queued_ms']:.3f}), "
                                 f"{row['achieved_gbps']:.0f} GB/s")
    print(f"{preset}/{dtype}/{mode}/{provider}: {brief}", flush=True)
    return row


def ab_summary(rows: list[dict]) -> list[str]:
    """One line per environment-override row: its time against the default settings' row for the same
    preset, dtype and mode (a ratio above 1 means the default is faster)."""
    base = {(r["preset"], r["dtype"], r["mode"]): r for r in rows
            if r["provider"] == "triton" and "median_ms" in r}
    out = []
    for r in rows:
        key = (r["preset"], r["dtype"], r["mode"])
        if r.get("environment_override") and "median_ms" in r and key in base:
            b = base[key]
            line = (f"A/B {'/'.join(key)} {r['provider']}: {r['median_ms']:.3f} ms vs default "
                    f"{b['median_ms']:.3f} ms (override / default = {r['median_ms'] / b['median_ms']:.2f})")
            if r.get("peak_extra_bytes") is not None and b.get("peak_extra_bytes") is not None:
                line += f"; peak extra {r['peak_extra_bytes'] / 2**20:.1f} vs {b['peak_extra_bytes'] / 2**20:.1f} MiB"
            out.append(line)
    return out


if __name__ == "__main__":
    sys.exit(main())
