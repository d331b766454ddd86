"""pytest-benchmark suite for crepa_loss: providers x presets x dtypes x modes.

Run with timings: ``pytest bench --benchmark-enable`` (the default configuration disables timing so the
plain ``pytest`` run only checks that every case still executes). On a GPU every preset runs; on the
CPU only ``small`` with the torch provider, plus the Triton kernels at the ``tiny`` size through the
interpreter, which proves they run and is not a performance figure. ``crepa-kernels bench`` and
bench/gpu_check.sh report the same cases with CUDA-event timings, peak memory and bandwidth.
"""
import pytest
import torch

from crepa_kernels import benchmark as bm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if CUDA:
    CASES = [(pr, dt, pv, md) for pr in ("small", "wan480", "wan720", "ltx768") for dt in ("fp32", "bf16")
             for pv in bm.PROVIDERS for md in bm.MODES]
else:
    CASES = [("small", "fp32", "torch", md) for md in bm.MODES] + [("tiny", "fp32", "triton", "full")]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("preset,dtype,provider,mode", CASES, ids=["-".join(c) for c in CASES])
def test_crepa_loss(benchmark, preset, dtype, provider, mode):
    if provider == "torch_compile":
        torch._dynamo.reset()  # a fresh compile per case: past its recompile limit dynamo would run eager
    p, f = bm.make_inputs(bm.PRESETS[preset], bm.DTYPES[dtype], DEVICE)
    run = bm.build_callable(provider, mode, bm.PRESETS[preset], p, f)
    run()  # compile / warm up outside the timed rounds
    _sync()

    def timed():
        run()
        _sync()

    benchmark.extra_info.update(preset=preset, dtype=dtype, provider=provider, mode=mode,
                                io_bytes=bm.io_bytes(mode, p, f),
                                interpreter=not CUDA and provider == "triton")
    benchmark.pedantic(timed, rounds=10 if CUDA else 2, warmup_rounds=1 if CUDA else 0)
