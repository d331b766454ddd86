"""The `crepa-kernels` command: `demo` (the main job on built-in defaults), `bench`, `info`."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import crepa_kernels

    print(json.dumps(crepa_kernels.info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from crepa_kernels.demo import run_demo

    summary = run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    rise = summary["alignment_score_last"] - summary["alignment_score_first"]
    print(f"{summary['steps']} steps in {summary['seconds']:.1f} s on {summary['device']}: "
          f"crepa_alignment_score {summary['alignment_score_first']:.4f} -> {summary['alignment_score_last']:.4f} "
          f"({'+' if rise >= 0 else ''}{rise:.4f}), crepa_loss {summary['crepa_loss_first']:.4f} -> "
          f"{summary['crepa_loss_last']:.4f}")
    print(f"wrote {args.out}/summary.json" + (f" and {summary['plot']}" if summary.get("plot") else ""))
    return 0


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value!r}")
    return n


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n < 2**63:  # what torch.manual_seed takes
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**63), got {value!r}")
    return n


def _device(value: str) -> str:
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return value


def _out_dir(value: str) -> str:
    import os

    if os.path.exists(value) and not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value!r} exists and is not a directory")
    return value


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    import torch

    from crepa_kernels import benchmark as bm  # imports no Triton: the switch below can still take effect

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    presets = _csv(args.preset) if args.preset else (["small", "wan480"] if on_gpu else ["small"])
    providers = _csv(args.providers) if args.providers else (list(bm.PROVIDERS) if on_gpu else ["torch"])
    dtypes = _csv(args.dtypes) if args.dtypes else (["fp32", "bf16"] if on_gpu else ["fp32"])
    modes = _csv(args.modes) if args.modes else ["forward", "full"]
    for what, values, allowed in (("--preset", presets, bm.PRESETS), ("--providers", providers, bm.PROVIDERS),
                                  ("--dtypes", dtypes, bm.DTYPES), ("--modes", modes, bm.MODES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            print(f"crepa-kernels bench: {what} got {', '.join(bad)}; expected any of {', '.join(allowed)}",
                  file=sys.stderr)
            return 2
    if not on_gpu:
        # Set only for a run that goes ahead, and before the first triton import (Triton reads it when
        # the kernels are defined, so it cannot be undone afterwards).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from crepa_kernels.ops.utils import interpreter_enabled

    reps = args.reps if args.reps is not None else (5 if args.quick else 20)
    warmup, max_s = (1, 5.0) if args.quick else (3, 20.0)
    report = bm.run_suite(presets, dtypes, providers, modes, device, reps=reps, warmup=warmup, max_seconds=max_s)
    if not on_gpu and args.interpreter_check and not interpreter_enabled():
        # this process imported triton for a GPU before the bench chose the CPU: no interpreter here
        print("crepa-kernels bench: the Triton interpreter check is skipped: Triton was loaded without "
              "TRITON_INTERPRET=1 in this process", file=sys.stderr)
    elif not on_gpu and args.interpreter_check:
        # The Triton kernels through the CPU interpreter, at a tiny size: proves they run here.
        # Interpreter timings are not performance figures and are labelled so.
        extra = bm.run_suite(["tiny"], ["fp32"], ["triton"], ["full"], device, reps=2, warmup=1, max_seconds=5.0,
                             progress=False)
        for row in extra["results"]:
            row["note"] = "Triton interpreter on CPU: not a performance figure"
        report["results"].extend(extra["results"])
    name = args.name or report["environment"]["device"].replace(" ", "_").replace("/", "_") or "cpu"
    print(bm.markdown_table(report["results"]))
    for path in bm.write_outputs(report, args.out, name, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0 if all("error" not in r for r in report["results"]) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crepa-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="a short CREPA fine-tune of a tiny Wan transformer (no downloads)")
    p.add_argument("--out", default="crepa-demo", type=_out_dir, help="directory for summary.json and curves.png")
    p.add_argument("--steps", type=int, default=100)  # run_demo checks it (>= 2)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("bench", help="benchmark crepa_loss per provider, preset, dtype and mode")
    p.add_argument("--quick", action="store_true", help="few repetitions (under two minutes on two CPU cores)")
    p.add_argument("--preset", help="comma-separated: tiny, small, wan480, wan720, ltx768")
    p.add_argument("--providers", help="comma-separated: torch, torch_compile, triton")
    p.add_argument("--dtypes", help="comma-separated: fp32, bf16")
    p.add_argument("--modes", help="comma-separated: forward, backward, full")
    p.add_argument("--device", type=_device, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--reps", type=_positive_int, help="timed calls per case (default: 20, or 5 with --quick)")
    p.add_argument("--out", default="crepa-bench", type=_out_dir, help="directory for JSON, markdown and PNG results")
    p.add_argument("--name", help="results file stem (default: the device name)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-interpreter-check", dest="interpreter_check", action="store_false",
                   help="on CPU, skip the tiny Triton-interpreter run")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("info", help="versions, devices and backend choice")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:  # bad input or an unusable path: one clear line, no traceback
        print(f"crepa-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
