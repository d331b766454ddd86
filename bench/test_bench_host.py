"""Host-side cost of one crepa_loss forward + backward on the Triton backend, kernels stubbed out.

The four Triton kernels are replaced by launchers that do nothing, so what is timed is everything
else a call costs on the host: validation, alignment planning, the autograd front end, output
allocation, launch-setting lookup and the small torch ops of the reduction. At small shapes this,
not the kernels, bounds the step on a GPU. Two front ends are compared: ``direct`` (the
autograd.Function eager calls use) and ``custom_op`` (the registered torch.library ops that
torch.compile captures, forced here for eager calls).

Run with timings: ``pytest bench/test_bench_host.py --benchmark-enable``. The figures are host
times of this machine's CPU, not GPU times; the stubs mean no kernel runs, on a GPU or in the
interpreter.
"""
import pytest
import torch

from crepa_kernels import benchmark as bm
from crepa_kernels import crepa_loss
from crepa_kernels.alignment import plan_tokens
from crepa_kernels.ops import resample, similarity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = {similarity: ("_neighbour_cosine_fwd_kernel", "_neighbour_cosine_bwd_kernel",
                        "_neighbour_cosine_resample_bwd_kernel"),
           resample: ("_resample_fwd_kernel", "_resample_bwd_kernel")}


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    calls = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.calls += 1
        return launch


@pytest.fixture
def stubbed_kernels(monkeypatch):
    stub = _NoLaunch()
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, stub)
    # The custom ops launch through wrap_triton, which passes the (stubbed) kernel object through.
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    _NoLaunch.calls = 0
    return _NoLaunch


# wan480's grids (the projected side resampled, fused into the similarity kernels) at a small T and D:
# the host work does not depend on the tensor sizes, and CPU allocations would at full size.
PRESETS = dict(bm.PRESETS, wan480_grids=bm.Preset("wan480_grids", 1, 4, (30, 52), (37, 37), 64))


@pytest.mark.parametrize("preset, merged", [("tiny", False), ("small", False), ("wan480_grids", False),
                                            ("wan480_grids", True)])
@pytest.mark.parametrize("front_end", ["direct", "custom_op"])
def test_host_cost(benchmark, stubbed_kernels, monkeypatch, preset, merged, front_end):
    """merged: the one-pass fused-resample backward (CREPA_KERNELS_MERGED_BWD=1)."""
    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1" if merged else "0")
    if front_end == "custom_op":
        for module in KERNELS:
            monkeypatch.setattr(module, "direct_launch_ok", lambda *tensors: False)
    pr = PRESETS[preset]
    shapes = pr.shapes
    p = torch.zeros(shapes["projected"], device=DEVICE, requires_grad=True)
    f = torch.zeros(shapes["features"], device=DEVICE)

    def step():
        p.grad = None
        crepa_loss(p, f, projected_grid=pr.projected_grid, features_grid=pr.features_grid, weight=0.5,
                   backend="triton").loss.backward()

    step()
    plan = plan_tokens(shapes["projected"][2], shapes["features"][2], projected_grid=pr.projected_grid,
                       features_grid=pr.features_grid)
    # similarity fwd + bwd; a resample fwd for the features side; the projected side's resample is
    # fused into the similarity kernels, leaving its backward (inside the one-pass backward if merged)
    per_step = 2 + (plan.projected is not None and not merged) + (plan.features is not None)
    assert stubbed_kernels.calls == per_step  # every kernel launch went to the stub
    benchmark.extra_info.update(preset=preset, merged_backward=merged, front_end=front_end, device=DEVICE,
                                note="host time with the Triton kernels stubbed out; not a GPU time")
    benchmark.pedantic(step, rounds=200, warmup_rounds=20)
