"""Host cost of a crepa_loss forward + backward, this checkout against another revision, interleaved.

The package of ``--base`` (a git revision) is exported into a temporary directory under another
name (``crepa_kernels_base``, its custom ops in their own namespace), so both versions load into one
process. The Triton kernels of both are stubbed out, as in ``test_bench_host.py``, and rounds of
``--calls`` calls alternate between them: a drift of the machine's speed (on small VMs, up to 2x
between runs) falls on both alike. Reported: each version's median over the rounds of its per-round
median call time, and the median, minimum and maximum over the rounds of new / base.

    python bench/host_ab.py --base HEAD~1 [--preset wan480_grids] [--rounds 15] [--calls 300]

Where the checkout has no git history (a GPU machine's copy), make the base's archive beforehand with
``git archive --format=tar REV crepa_kernels > base.tar`` and pass ``--base REV --base-archive base.tar``;
``--device cuda`` puts the tensors on the GPU (the kernels stay stubbed; torch's own small ops and
allocations then run there, as in a real call).

Set ``CREPA_KERNELS_BWD_WINDOW_MIB=1`` to split wan480_grids' backward into two frame windows.
These are host times of this machine's CPU (kernels stubbed), not GPU times.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors reach the (stubbed) Triton path

BASE_NAME = "crepa_kernels_base"
KERNELS = {"similarity": ("_neighbour_cosine_fwd_kernel", "_neighbour_cosine_bwd_kernel",
                          "_neighbour_cosine_resample_bwd_kernel"),
           "resample": ("_resample_fwd_kernel", "_resample_bwd_kernel")}


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def export_base(rev: str, into: str, archive_path: str | None = None) -> str:
    """``rev``'s crepa_kernels/ (from git, or the tar at ``archive_path``) as package BASE_NAME under
    ``into`` (every mention renamed, the torch.library namespace included); returns ``into``."""
    if archive_path is not None:
        with open(archive_path, "rb") as fh:
            archive = fh.read()
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, "crepa_kernels"],
                                 capture_output=True, check=True).stdout
    tar_path = os.path.join(into, "base.tar")
    with open(tar_path, "wb") as fh:
        fh.write(archive)
    with tarfile.open(tar_path) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python before 3.10.12 has no extraction filters (a git archive of our own tree)
            tar.extractall(into)
    if not os.path.isdir(os.path.join(into, "crepa_kernels")):
        raise SystemExit(f"the archive of {rev} holds no crepa_kernels/ package")
    os.rename(os.path.join(into, "crepa_kernels"), os.path.join(into, BASE_NAME))
    for folder, _, files in os.walk(os.path.join(into, BASE_NAME)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as fh:
                    text = fh.read()
                with open(path, "w") as fh:
                    fh.write(text.replace("crepa_kernels", BASE_NAME))
    return into


def presets(bm) -> dict:
    """A benchmark module's presets, plus wan480_grids: wan480's grids at T 4 and D 64 (the host work
    does not depend on the sizes, and CPU allocations would at full size)."""
    return dict(bm.PRESETS, wan480_grids=bm.Preset("wan480_grids", 1, 4, (30, 52), (37, 37), 64))


def stubbed_step(package: str, preset: str, device: str = "cpu"):
    """One forward + backward of ``package``'s crepa_loss at ``preset`` on ``device``, its kernels stubbed."""
    pkg = importlib.import_module(package)
    for module, names in KERNELS.items():
        mod = importlib.import_module(f"{package}.ops.{module}")
        for name in names:
            if not hasattr(mod, name):  # a revision with other kernels would run them unstubbed
                raise SystemExit(f"{package}.ops.{module} has no kernel {name}: this script cannot stub that revision")
            setattr(mod, name, _NoLaunch())
    pr = presets(importlib.import_module(f"{package}.benchmark"))[preset]
    p = torch.zeros(pr.shapes["projected"], device=device, requires_grad=True)
    f = torch.zeros(pr.shapes["features"], device=device)

    def step():
        p.grad = None
        pkg.crepa_loss(p, f, projected_grid=pr.projected_grid, features_grid=pr.features_grid, weight=0.5,
                       backend="triton").loss.backward()
    return step


def interleave(steps: dict, rounds: int, calls: int, warmup: int = 100) -> dict:
    for step in steps.values():
        for _ in range(warmup):
            step()
    per = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            per[name].append(statistics.median(times) * 1e6)
    return per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. HEAD~1, main)")
    ap.add_argument("--preset", default="wan480_grids", help="wan480_grids (wan480's grids, T 4, D 64) or a "
                    "benchmark preset (CPU allocations then weigh in)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--base-archive", default=None,
                    help="tar of the base's crepa_kernels/ (git archive REV crepa_kernels), for a checkout without git")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    if args.base_archive is not None and not os.path.isfile(args.base_archive):
        ap.error(f"--base-archive {args.base_archive}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, export_base(args.base, tmp, args.base_archive))
        steps = {"base": stubbed_step(BASE_NAME, args.preset, args.device),
                 "new": stubbed_step("crepa_kernels", args.preset, args.device)}
        per = interleave(steps, args.rounds, args.calls)
    ratios = [n / b for n, b in zip(per["new"], per["base"])]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"base": args.base, "preset": args.preset, "device": device, "torch": torch.__version__,
              "rounds": args.rounds, "calls": args.calls,
              "switches": {k: v for k, v in os.environ.items() if k.startswith("CREPA_KERNELS_")},
              "median_us": {k: statistics.median(v) for k, v in per.items()}, "rounds_us": per,
              "new_over_base": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
              "note": f"host time with the Triton kernels stubbed out, tensors on {args.device}; not a GPU time"}
    print(f"base {report['median_us']['base']:.1f} us, new {report['median_us']['new']:.1f} us; new/base median "
          f"{report['new_over_base']['median']:.3f} [{min(ratios):.3f}, {max(ratios):.3f}] over {args.rounds} rounds")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
