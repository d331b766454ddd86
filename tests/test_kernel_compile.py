"""Every Triton kernel compiles for a Hopper GPU (sm_90) ahead of time, without a GPU.

The interpreter tier proves the kernels compute the right thing; this proves the GPU compiler
accepts them (types, layouts, ops the interpreter tolerates but ptxas may not), with the ptxas
bundled in the triton wheel. It runs tests/compile_kernels.py in a fresh process because the
kernels must be real JIT functions, not the interpreter's stand-ins this test session uses.
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def _ptxas_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="this triton build ships no ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "crepa-kernels-compile-check")
    # this tree's package, whichever one the environment has installed
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_kernels.py"), "90"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ok_lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    # 12 similarity variants (6 of them with the fused resample; one also with 64-bit ints), 5 of the
    # banded one-pass fused-resample backward, 5 of its row form, 13 resample (7 of the backward's row
    # form; the two row forms each once at a narrow grid's settings); then one fp32 case of each of the
    # 8 kernels with torch.compile's scalar types: fp64 floats (the 5 with float arguments) and
    # scalars as constants
    assert len(ok_lines) == 36 + 5 + 8 and "0 failed" in proc.stdout
    assert sum("inductor scalars" in line for line in ok_lines) == 5
    assert sum("constants scalars" in line for line in ok_lines) == 8
