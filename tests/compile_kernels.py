"""Compile every Triton kernel of the package for a GPU target without a GPU (ahead of time).

Run as a script with TRITON_INTERPRET unset: `python tests/compile_kernels.py [sm]` (default sm 90,
the H100/H200). Each kernel is compiled for the pointer dtypes and compile-time switches the
launchers use, down to a cubin through the ptxas bundled with triton, so code that only the GPU
compiler rejects (types, layouts, unsupported ops) fails here, on any machine.
"""
from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from crepa_kernels.ops import resample, similarity  # noqa: E402

FLOAT_SCALARS = {"inv_tau_hi", "inv_tau_lo", "eps_hi", "eps_lo"}


def compile_one(kernel, pointers: dict, constexprs: dict, target, int_type="i32", num_warps=None):
    """pointers: name -> element type ("fp32", "bf16", ...); every other non-constexpr arg is an int
    (`int_type`, as Triton specialises large values to i64) or one of FLOAT_SCALARS."""
    signature = {}
    for p in kernel.params:
        name = p.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, pointers.get("default", "fp32"))
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = int_type
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs))
    options = {} if num_warps is None else {"num_warps": num_warps}
    return triton.compile(src, target=target, options=options)


def cases():
    fwd, bwd = similarity._neighbour_cosine_fwd_kernel, similarity._neighbour_cosine_bwd_kernel
    base = dict(CUMULATIVE=False, NORMALIZE=False)
    plain = dict(RESAMPLE_P=False, TAPS_FP64=False)
    yield ("similarity fwd fp32", fwd, {"default": "fp32"},
           dict(S_PAD=4, BLOCK_N=16, BLOCK_D=64, IS_FP64=False, **base, **plain))
    yield ("similarity fwd bf16 cumulative", fwd, {"default": "fp32", "p_ptr": "bf16", "f_ptr": "bf16"},
           dict(S_PAD=8, BLOCK_N=8, BLOCK_D=64, IS_FP64=False, CUMULATIVE=True, NORMALIZE=True, **plain))
    yield ("similarity fwd fp64", fwd, {"default": "fp64"},
           dict(S_PAD=4, BLOCK_N=8, BLOCK_D=32, IS_FP64=True, **base, **plain))
    for dt, fp64 in (("fp32", False), ("bf16", False), ("fp64", True)):
        ptrs = {"default": "fp64" if fp64 else "fp32", "p_ptr": dt, "f_ptr": dt}
        yield (f"similarity fwd {dt} fused resample", fwd, ptrs,
               dict(S_PAD=4, BLOCK_N=16, BLOCK_D=64, IS_FP64=fp64, RESAMPLE_P=True, TAPS_FP64=fp64, **base))
        yield (f"similarity bwd {dt} fused resample", bwd, dict(ptrs, dp_ptr=dt, df_ptr=dt),
               dict(S_PAD=4, BLOCK_N=16, BLOCK_D=64, CUMULATIVE=False, NORMALIZE=False, HAS_GT=True, HAS_GS=True,
                    COMPUTE_DP=True, COMPUTE_DF=False, RESAMPLE_P=True, TAPS_FP64=fp64))
    flags = dict(HAS_GT=True, HAS_GS=True, COMPUTE_DP=True, COMPUTE_DF=True)
    yield ("similarity bwd fp32 both grads", bwd, {"default": "fp32"},
           dict(S_PAD=4, BLOCK_N=16, BLOCK_D=32, CUMULATIVE=False, NORMALIZE=True, **flags, **plain))
    yield ("similarity bwd bf16 projected only", bwd,
           {"default": "fp32", "p_ptr": "bf16", "f_ptr": "bf16", "dp_ptr": "bf16", "df_ptr": "bf16"},
           dict(S_PAD=4, BLOCK_N=16, BLOCK_D=64, CUMULATIVE=True, NORMALIZE=False, HAS_GT=True, HAS_GS=False,
                COMPUTE_DP=True, COMPUTE_DF=False, **plain))
    yield ("similarity bwd fp64", bwd, {"default": "fp64"},
           dict(S_PAD=4, BLOCK_N=8, BLOCK_D=32, CUMULATIVE=False, NORMALIZE=False, **flags, **plain))
    merged = similarity._neighbour_cosine_resample_bwd_kernel
    # The one-pass fused-resample backward at its launch tile (16 x 64, 4 warps), a wider one, and the
    # small token blocks of small grids (a 1-D/2-D layout mix there once broke a Triton 3.6 layout pass).
    for dt, fp64, block_p, block_d, warps in (("fp32", False, 16, 64, 4), ("bf16", False, 16, 64, 4),
                                              ("fp64", True, 16, 64, 4), ("fp32", False, 8, 128, 4),
                                              ("bf16", False, 2, 16, 2)):
        ptrs = {"default": "fp64" if fp64 else "fp32", "p_ptr": dt, "f_ptr": dt, "dp_ptr": dt}
        yield (f"similarity+resample bwd {dt} BLOCK_P={block_p}", merged, ptrs,
               dict(S_PAD=4, BLOCK_P=block_p, BLOCK_D=block_d, CUMULATIVE=block_p == 8, NORMALIZE=block_p == 8,
                    HAS_GT=True, HAS_GS=block_p != 2, R_H=3, R_W=2, TAPS_FP64=fp64), warps)
    rf, rb = resample._resample_fwd_kernel, resample._resample_bwd_kernel
    for dt, fp64 in (("fp32", False), ("bf16", False), ("fp64", True)):
        yield f"resample fwd {dt}", rf, {"default": dt}, dict(IS_FP64=fp64, BLOCK_M=16, BLOCK_D=128)
        yield f"resample bwd {dt}", rb, {"default": dt}, dict(IS_FP64=fp64, R_H=3, R_W=2, BLOCK_N=16, BLOCK_D=128)


def main(argv) -> int:
    sm = int(argv[1]) if len(argv) > 1 else 90
    target = GPUTarget("cuda", sm, 32)
    failed = 0
    for name, kernel, pointers, constexprs, *warps in cases():
        for int_type in ("i32", "i64") if name == "similarity fwd fp32" else ("i32",):
            t0 = time.perf_counter()
            try:
                out = compile_one(kernel, pointers, constexprs, target, int_type, *warps)
                size = len(out.asm["cubin"])
                print(f"ok   {name} ({int_type}) sm_{sm}: cubin {size} bytes, {time.perf_counter() - t0:.1f} s")
            except Exception as exc:  # report every kernel, then fail
                failed += 1
                print(f"FAIL {name} ({int_type}) sm_{sm}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"triton {triton.__version__}: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
