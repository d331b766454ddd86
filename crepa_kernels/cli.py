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
    import torch

    from crepa_kernels import crepa_loss

    g = torch.Generator().manual_seed(0)
    projected = torch.randn(1, 5, 6 * 10, 64, generator=g)
    features = torch.randn(1, 17, 7 * 7, 64, generator=g)
    out = crepa_loss(projected, features, projected_grid=(6, 10), features_grid=(7, 7), weight=0.5)
    print(f"crepa_loss={out.loss.item():.6f} crepa_alignment_score={out.alignment.mean().item():.6f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crepa-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compute CREPA on built-in defaults")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("info", help="versions, devices and backend choice")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
