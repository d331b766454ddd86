"""Compile every Triton kernel of the package for a GPU target without a GPU (ahead of time).

Run as a script with TRITON_INTERPRET unset: `python tests/compile_kernels.py [sm]` (default sm 90,
the H100/H200). Each kernel is compiled for the pointer dtypes and compile-time switches the
launchers use, down to a cubin through the ptxas bundled with triton, so code that only the GPU
compiler rejects (types, layouts, unsupported ops) fails here, on any machine.
"""
from __future__ import annotations

import os
import re
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from crepa_kernels.ops import resample, similarity  # noqa: E402

FLOAT_SCALARS = {"inv_tau_hi", "inv_tau_lo", "eps_hi", "eps_lo", "gt_mul_hi", "gt_mul_lo"}
# How a launcher's scalar arguments reach the compiler:
#   "jit"       Triton's own launch: Python ints are i32 (or i64), Python floats fp32;
#   "inductor"  a torch.compile graph (wrap_triton): Python floats are fp64;
#   "constants" the TTIR torch.compile builds (torch <= 2.11) to find which tensors a kernel writes:
#               every scalar argument is a compile-time constant, a Python int or float.
SCALAR_MODES = ("jit", "inductor", "constants")


def f64_math(ttir: str) -> int:
    """fp64 arithmetic ops in a kernel's TTIR, less the narrowing of its fp64 float arguments: a
    torch.compile launch must not move an fp32 kernel's math to fp64."""
    args = "|".join(sorted(FLOAT_SCALARS))
    return sum(1 for line in ttir.splitlines()
               if "f64" in line and "arith." in line and not re.search(rf"arith\.truncf %({args}) ", line))


def _constant_value(name: str):
    if name in FLOAT_SCALARS:
        return 0.25
    return 3 if name in ("T", "S", "d", "in_h", "in_w", "out_h", "out_w") else 37


def compile_one(kernel, pointers: dict, constexprs: dict, target, int_type="i32", num_warps=None,
                scalars="jit"):
    """pointers: name -> element type ("fp32", "bf16", ...); every other non-constexpr arg is an int
    (`int_type`, as Triton specialises large values to i64) or one of FLOAT_SCALARS, typed as
    `scalars` (one of SCALAR_MODES) says."""
    signature, constants = {}, dict(constexprs)
    for p in kernel.params:
        name = p.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, pointers.get("default", "fp32"))
        elif scalars == "constants":
            signature[name] = "constexpr"
            constants[name] = _constant_value(name)
        elif name in FLOAT_SCALARS:
            signature[name] = "fp64" if scalars == "inductor" else "fp32"
        else:
            signature[name] = int_type
    src = ASTSource(fn=kernel, signature=signature, constexprs=constants)
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
    # The one-pass fused-resample backward at its wan480 tiles (F 128 x Q 64 lanes, 16 columns, 8 warps),
    # larger bands, and the tiny tiles of small grids.
    for dt, fp64, q_pad, f_pad, block_d, warps in (("fp32", False, 64, 128, 16, 8), ("bf16", False, 64, 128, 16, 8),
                                                   ("fp64", True, 64, 128, 8, 4), ("fp32", False, 256, 256, 8, 8),
                                                   ("bf16", False, 16, 16, 64, 2)):
        ptrs = {"default": "fp64" if fp64 else "fp32", "p_ptr": dt, "f_ptr": dt, "dp_ptr": dt}
        yield (f"similarity+resample bwd {dt} Q_PAD={q_pad}", merged, ptrs,
               dict(S_PAD=4, Q_PAD=q_pad, F_PAD=f_pad, BLOCK_D=block_d, CUMULATIVE=q_pad == 256,
                    NORMALIZE=q_pad == 256, HAS_GT=True, HAS_GS=q_pad != 16, R_H=3, R_W=2, TAPS_FP64=fp64), warps)
    rows = similarity._neighbour_cosine_rows_bwd_kernel
    # The row-form one-pass backward at its wan480 tiles (64 tokens of a row, 64 resampled columns, 16
    # features, 8 warps), a cumulative window with both gradients, and fp64.
    for dt, fp64, s_pad, block_d, cumulative in (("fp32", False, 4, 16, False), ("bf16", False, 4, 16, False),
                                                 ("fp32", False, 8, 8, True), ("fp64", True, 4, 8, False)):
        ptrs = {"default": "fp64" if fp64 else "fp32", "p_ptr": dt, "f_ptr": dt, "dp_ptr": dt}
        yield (f"similarity+resample rows bwd {dt} S_PAD={s_pad}", rows, ptrs,
               dict(S_PAD=s_pad, R_W=2, BLOCK_W=64, V_PAD=64, BLOCK_D=block_d, CUMULATIVE=cumulative,
                    NORMALIZE=cumulative, HAS_GT=True, HAS_GS=cumulative, TAPS_FP64=fp64), 8)
    # Narrow grids (6 x 10 -> 3 x 1): tiles gathering from one resampled column, with the warps and the
    # V_PAD the launch settings give them (tl.gather compiles only with a thread per gathered element).
    block_w, v_pad, block_d, warps, *_ = similarity._row_launch_config(1, 3, 6, 10, 3, 1, 1536, 4, False, 132, 16)
    yield ("similarity+resample rows bwd fp32 narrow grid", rows, {"default": "fp32"},
           dict(S_PAD=4, R_W=1, BLOCK_W=block_w, V_PAD=v_pad, BLOCK_D=block_d, CUMULATIVE=False, NORMALIZE=False,
                HAS_GT=True, HAS_GS=False, TAPS_FP64=False), warps)
    plan = resample.bwd_plan((4, 5), (1, 1), 40, {"row_kernel": 1})
    yield ("resample bwd rows fp32 narrow grid", resample._resample_bwd_rows_kernel, {"default": "fp32"},
           dict(IS_FP64=False, R_W=1, BLOCK_W=plan["block_n"], V_PAD=plan["v_pad"], BLOCK_D=plan["block_d"]),
           plan["num_warps"])
    rf, rb = resample._resample_fwd_kernel, resample._resample_bwd_kernel
    for dt, fp64 in (("fp32", False), ("bf16", False), ("fp64", True)):
        yield f"resample fwd {dt}", rf, {"default": dt}, dict(IS_FP64=fp64, BLOCK_M=16, BLOCK_D=128)
        yield f"resample bwd {dt}", rb, {"default": dt}, dict(IS_FP64=fp64, R_H=3, R_W=2, BLOCK_N=16, BLOCK_D=128)
        # the row form at wan480's tiles (a 52-token row, 37 output columns) and a strong upsampling's
        yield (f"resample bwd rows {dt}", resample._resample_bwd_rows_kernel, {"default": dt},
               dict(IS_FP64=fp64, R_W=2, BLOCK_W=64, V_PAD=64, BLOCK_D=32))
        yield (f"resample bwd rows {dt} R_W=24", resample._resample_bwd_rows_kernel, {"default": dt},
               dict(IS_FP64=fp64, R_W=24, BLOCK_W=4, V_PAD=128, BLOCK_D=16))


# One fp32 case of each kernel is also compiled with the scalar types a torch.compile graph gives it.
TORCH_COMPILE_CASES = ("similarity fwd fp32 fused resample", "similarity bwd fp32 fused resample",
                       "similarity bwd fp32 both grads", "similarity+resample bwd fp32 Q_PAD=64",
                       "similarity+resample rows bwd fp32 S_PAD=4",
                       "resample fwd fp32", "resample bwd fp32", "resample bwd rows fp32")


def main(argv) -> int:
    sm = int(argv[1]) if len(argv) > 1 else 90
    target = GPUTarget("cuda", sm, 32)
    failed = 0
    for name, kernel, pointers, constexprs, *warps in cases():
        variants = [("i32", "jit")]
        if name == "similarity fwd fp32":
            variants.append(("i64", "jit"))
        if name in TORCH_COMPILE_CASES:
            variants += [("i32", "inductor"), ("i32", "constants")]
        for int_type, scalars in variants:
            if scalars == "inductor" and not any(p.name in FLOAT_SCALARS for p in kernel.params):
                continue  # no float arguments: the same compile as "jit"
            label = f"{name} ({int_type}{'' if scalars == 'jit' else ', ' + scalars + ' scalars'}) sm_{sm}"
            t0 = time.perf_counter()
            try:
                out = compile_one(kernel, pointers, constexprs, target, int_type, *warps, scalars=scalars)
                size = len(out.asm["cubin"])
                if scalars == "jit" and int_type == "i32":
                    jit_f64 = f64_math(out.asm["ttir"])
                elif scalars == "inductor" and f64_math(out.asm["ttir"]) != jit_f64:
                    raise AssertionError(f"fp64 ops: {f64_math(out.asm['ttir'])} with fp64 float arguments, "
                                         f"{jit_f64} with Triton's launch")
                print(f"ok   {label}: cubin {size} bytes, {time.perf_counter() - t0:.1f} s")
            except Exception as exc:  # report every kernel, then fail
                failed += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"triton {triton.__version__}: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
