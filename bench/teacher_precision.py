"""How far a bf16 / fp16 backbone teacher moves the loss when it is normalised in its own dtype.

The common trainer normalises a low-precision teacher with ``F.normalize`` in the teacher's dtype (the
normalised tokens are rounded to it) and multiplies them with the fp32 projection; crepa_loss
normalises every input in fp32 (SPEC section 3). Per shape and dtype this prints the largest
difference over a few seeds in the alignment score, the loss, and the gradient with respect to the
projection (max |difference| / max |gradient|). The teacher is half the student plus noise, so
scores sit near what a partly trained projector gives. CPU figures; the rounding is the same on a GPU.

    python bench/teacher_precision.py [--quick] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from crepa_kernels import benchmark as bm  # noqa: E402
from crepa_kernels import crepa_loss  # noqa: E402

SHAPES = [(4, 16, 64), (4, 64, 256), (4, 256, 1024), (3, 1560, 1536), (3, 1560, 5120)]
QUICK_SHAPES = [(3, 4, 8), (2, 6, 16)]


def trainer_path(projected, teacher, distance=1, tau=1.0, weight=0.5):
    """The trainer's order of work for adjacent mode: each side normalised in its own dtype."""
    p = F.normalize(projected, dim=-1)
    f = F.normalize(teacher, dim=-1)
    self_sim = (p * f).sum(-1).mean(-1)
    total = self_sim.clone()
    w = math.exp(-distance / tau)
    total[:, :-distance] += w * (p[:, :-distance] * f[:, distance:]).sum(-1).mean(-1)
    total[:, distance:] += w * (p[:, distance:] * f[:, :-distance]).sum(-1).mean(-1)
    return -weight * (total.sum(1) / total.shape[1]).mean(), total


def measure(dtype, shape, seeds=3) -> dict:
    T, N, D = shape
    worst = {"score": 0.0, "loss": 0.0, "grad_rel": 0.0}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        p = torch.randn(1, T, N, D, generator=g)
        teacher = (0.5 * p + torch.randn(1, T, N, D, generator=g)).to(dtype)
        p_ref, p_ours = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss_ref, total_ref = trainer_path(p_ref, teacher)
        ours = crepa_loss(p_ours, teacher, weight=0.5, backend="torch")
        loss_ref.backward()
        ours.loss.backward()
        worst["score"] = max(worst["score"], (total_ref.mean() - ours.alignment.mean()).abs().item())
        worst["loss"] = max(worst["loss"], (loss_ref - ours.loss).abs().item())
        worst["grad_rel"] = max(worst["grad_rel"],
                                ((p_ref.grad - p_ours.grad).abs().max() / p_ours.grad.abs().max()).item())
    return {"dtype": str(dtype).replace("torch.", ""), "T": T, "N": N, "D": D, "seeds": seeds,
            **{f"max_{k}_diff": v for k, v in worst.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = [measure(dtype, shape) for dtype in (torch.bfloat16, torch.float16)
            for shape in (QUICK_SHAPES if args.quick else SHAPES)]
    for r in rows:
        print(f"{r['dtype']:9s} T={r['T']} N={r['N']:5d} D={r['D']:5d}: score {r['max_score_diff']:.1e}  "
              f"loss {r['max_loss_diff']:.1e}  gradient {r['max_grad_rel_diff']:.1e} of its largest entry")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"benchmark": __doc__.split("\n")[0], "environment": bm.environment("cpu"), "results": rows},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
