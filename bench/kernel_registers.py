"""Registers and spills per thread of each Triton kernel at the launch settings the launchers pick
for a preset, compiled ahead of time for sm_90 with the bundled ptxas: no GPU needed.

A tuning aid: memory-bound gathers need many loads in flight, so a kernel at 200+ registers per
thread (two 4-warp programs per SM) is a suspect before any timing. Run with TRITON_INTERPRET unset:

    python bench/kernel_registers.py [--preset wan480]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from compile_kernels import compile_one  # noqa: E402
from crepa_kernels import benchmark as bm  # noqa: E402
from crepa_kernels.ops import resample, similarity, utils  # noqa: E402


def registers(kernel, pointers: dict, constexprs: dict, warps: int, sm: int) -> tuple[int, int]:
    out = compile_one(kernel, pointers, constexprs, GPUTarget("cuda", sm, 32), num_warps=warps)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(out.asm["ptx"])
    text = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{sm}a", fh.name, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    os.unlink(fh.name)
    regs = int(text.split("Used ")[1].split(" registers")[0])
    spill = int(text.split("bytes spill stores")[0].split(",")[-1].strip())
    return regs, spill


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan480", choices=sorted(bm.PRESETS))
    ap.add_argument("--sm", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    pr = bm.PRESETS[args.preset]
    (ph, pw), (fh, fw) = pr.projected_grid, pr.features_grid
    n = min(ph * pw, fh * fw)
    print(f"triton {triton.__version__}, sm_{args.sm}, preset {pr.name}, elements per thread "
          f"{utils.elements_per_thread()}")
    for dt in ("fp32", "bf16"):
        for name, tiles, df, fused in (("similarity fwd", 1, False, False), ("similarity bwd", 1, False, False),
                                       ("similarity bwd +df", 2, True, False),
                                       ("similarity fwd fused", 1, False, True),
                                       ("similarity bwd fused", 1, False, True)):
            bn, bd, w = similarity._launch_config(pr.batch, pr.frames, n, pr.dim, 4, torch.float32,
                                                  torch.device("cpu"), tiles, None, fused=fused)
            taps = dict(RESAMPLE_P=fused, TAPS_FP64=False)
            if name.startswith("similarity fwd"):
                kernel = similarity._neighbour_cosine_fwd_kernel
                c = dict(S_PAD=4, BLOCK_N=bn, BLOCK_D=bd, IS_FP64=False, CUMULATIVE=False, NORMALIZE=False, **taps)
            else:
                kernel = similarity._neighbour_cosine_bwd_kernel
                c = dict(S_PAD=4, BLOCK_N=bn, BLOCK_D=bd, CUMULATIVE=False, NORMALIZE=False, HAS_GT=True,
                         HAS_GS=True, COMPUTE_DP=True, COMPUTE_DF=df, **taps)
            ptrs = {"default": "fp32", "p_ptr": dt, "f_ptr": dt, "dp_ptr": dt, "df_ptr": dt}
            r, s = registers(kernel, ptrs, c, w, args.sm)
            print(f"{name:20s} {dt}: BLOCK_N={bn:3d} BLOCK_D={bd:3d} warps={w} registers={r:3d} spill={s} B")
        bd = resample._feature_block(pr.dim)
        bm_ = resample._token_block(n, bd, resample._FWD_TILE)
        w = utils.num_warps_for(2 * bm_ * bd)
        r, s = registers(resample._resample_fwd_kernel, {"default": dt}, dict(IS_FP64=False, BLOCK_M=bm_, BLOCK_D=bd),
                         w, args.sm)
        print(f"{'resample fwd':20s} {dt}: BLOCK_M={bm_:3d} BLOCK_D={bd:3d} warps={w} registers={r:3d} spill={s} B")
        bn = resample._token_block(ph * pw, bd, resample._BWD_TILE)
        w = utils.num_warps_for(2 * bn * bd)
        rh, rw = resample._contributor_bound(ph, fh), resample._contributor_bound(pw, fw)
        r, s = registers(resample._resample_bwd_kernel, {"default": dt},
                         dict(IS_FP64=False, R_H=rh, R_W=rw, BLOCK_N=bn, BLOCK_D=bd), w, args.sm)
        print(f"{'resample bwd':20s} {dt}: BLOCK_N={bn:3d} BLOCK_D={bd:3d} warps={w} registers={r:3d} spill={s} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
