"""What each Triton kernel looks like as crepa_loss really launches it at a preset, without a GPU.

crepa_loss runs forward + backward on CPU tensors of the preset's shapes under the stand-in driver
of tests/fake_driver_launch.py: Triton binds and specialises the real arguments (dtypes, 16-byte
alignment, strides equal to 1, divisibility by 16) and compiles each kernel for sm_90 with the
bundled ptxas, while nothing is launched. Per compiled kernel it prints warps, shared memory,
registers and spills per thread (ptxas -v), and the global loads and stores of its PTX by width
(v4.b32 = 16 bytes per thread and instruction; b32 = 4). A tuning aid: memory-bound gathers need
many bytes in flight, so a kernel at 200+ registers (two 4-warp programs per SM) or moving its large
tensors in 4-byte pieces is a suspect before any timing. Run with TRITON_INTERPRET unset:

    python bench/kernel_registers.py [--preset wan480] [--dtypes fp32,bf16] [--configs default,features_grad]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET first: the interpreter replaces the compiled kernels")

import torch  # noqa: E402
import triton  # noqa: E402

import fake_driver_launch as stand_in  # noqa: E402  (installs the stand-in driver)
from crepa_kernels import benchmark as bm  # noqa: E402
from crepa_kernels import crepa_loss, functional  # noqa: E402
from crepa_kernels.ops import resample, similarity, utils  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ptxas_report(ptx: str, sm: int) -> tuple[int, int]:
    """(registers, spill-store bytes) per thread that ptxas reports for the PTX."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"  # Triton targets the arch-specific sm_90a
        text = subprocess.run([exe, "-v", f"--gpu-name={arch}", fh.name, "-o", os.devnull],
                              capture_output=True, text=True).stderr
    finally:
        os.unlink(fh.name)
    if "Used " not in text or "bytes spill stores" not in text:
        raise RuntimeError(f"ptxas -v for sm_{sm} gave no register report:\n{text}")
    regs = int(text.split("Used ")[1].split(" registers")[0])
    spill = int(text.split("bytes spill stores")[0].split(",")[-1].strip())
    return regs, spill


def memory_ops(ptx: str) -> tuple[dict, dict]:
    """Global loads and stores of the PTX, counted by their width suffix (e.g. v4.b32, b16)."""
    def count(op):
        found = re.findall(rf"{op}\.global(?:\.[a-z]+)*?\.((?:v[248]\.)?[bfsu]\d+)", ptx)
        return dict(sorted(collections.Counter(found).items()))
    return count("ld"), count("st")


# How crepa_loss runs, for the kernel variants each way launches: name -> (features require grad,
# environment). Features that require grad take the resample-first path with d features kernels.
CONFIGS = {
    "default": (False, {}),
    "features_grad": (True, {}),
    "separate_resample": (False, {"CREPA_KERNELS_FUSED_RESAMPLE": "0"}),
    "merged_backward": (False, {"CREPA_KERNELS_MERGED_BWD": "1"}),
    "row_backward": (False, {"CREPA_KERNELS_ROW_BWD": "1"}),
}


def compiled_kernels(preset: bm.Preset, dtype: torch.dtype, features_grad: bool = False, env=None) -> list:
    """The compiled kernels one crepa_loss forward + backward at the preset launches, in launch order."""
    # The Triton paths take the CPU tensors (the stand-in driver compiles; nothing runs).
    functional.interpreter_enabled = lambda: True
    resample.triton_supports = similarity.triton_supports = lambda t: True
    shapes = preset.shapes
    p = torch.zeros(shapes["projected"], dtype=dtype, requires_grad=True)
    f = torch.zeros(shapes["features"], dtype=dtype, requires_grad=features_grad)
    stand_in.CALLS.clear()
    with bm.environment_override(env or {}):
        crepa_loss(p, f, projected_grid=preset.projected_grid, features_grid=preset.features_grid,
                   backend="triton").loss.backward()
    launchers = []
    for launcher, _ in stand_in.CALLS:
        if all(launcher is not seen for seen in launchers):
            launchers.append(launcher)
    stand_in.CALLS.clear()
    by_launcher = {}
    for obj in _compiled_kernel_objects():
        run = getattr(obj, "_run", None)
        if run is not None:
            by_launcher[id(run)] = obj
    return [by_launcher[id(launcher)] for launcher in launchers]


def _compiled_kernel_objects():
    import gc
    import warnings

    from triton.compiler.compiler import CompiledKernel

    with warnings.catch_warnings():  # isinstance() on every live object touches deprecated aliases
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, CompiledKernel)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan480", choices=sorted(bm.PRESETS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--sm", type=int, default=90)
    args = ap.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {', '.join(unknown)} (expected a subset of {', '.join(CONFIGS)})")
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {', '.join(bad)} (expected a subset of {', '.join(DTYPES)})")
    stand_in.TARGET_SM = args.sm  # the kernels compile for the target the stand-in driver reports
    pr = bm.PRESETS[args.preset]
    print(f"triton {triton.__version__}, sm_{args.sm}, preset {pr.name}, elements per thread "
          f"{utils.elements_per_thread()}, backward window {utils.bwd_window_bytes() >> 20} MiB")
    for name in args.dtypes.split(","):
        shown = []  # each compiled kernel once, under the first configuration that launches it
        for config in args.configs.split(","):
            features_grad, env = CONFIGS[config]
            for kernel in compiled_kernels(pr, DTYPES[name], features_grad, env):
                if any(kernel is k for k, _ in shown):
                    continue
                shown.append((kernel, config))
        for kernel, config in shown:
            regs, spill = ptxas_report(kernel.asm["ptx"], args.sm)
            loads, stores = memory_ops(kernel.asm["ptx"])
            names = kernel.src.fn.arg_names
            blocks = {names[k[0]]: v for k, v in getattr(kernel.src, "constants", {}).items()
                      if isinstance(k, tuple) and names[k[0]].startswith("BLOCK")}
            print(f"{name} {config:17s} {kernel.name:30s} warps={kernel.metadata.num_warps} "
                  f"shared={kernel.metadata.shared:5d} "
                  f"registers={regs:3d} spill={spill} {blocks} loads={loads} stores={stores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
