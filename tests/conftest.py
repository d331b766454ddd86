"""Test setup: without CUDA, Triton runs through its interpreter, which must be chosen before import."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _interpolation_rows(in_grid, out_grid, out_tokens):
    """Rows ``out_tokens`` of the bilinear resampling matrix (``align_corners=False``) from ``in_grid``
    to ``out_grid``, as float64 (len(out_tokens), in_h * in_w) on the CPU: derived from F.interpolate's
    own backward (one channel per row, each reading one output token), not from our kernels' taps."""
    import torch.nn.functional as F

    n = len(out_tokens)
    x = torch.zeros(1, n, *in_grid, dtype=torch.float64, requires_grad=True)
    y = F.interpolate(x, size=tuple(out_grid), mode="bilinear", align_corners=False).flatten(2)
    (g,) = torch.autograd.grad(y[0, torch.arange(n), torch.as_tensor(out_tokens)].sum(), x)
    return g[0].flatten(1)


@pytest.fixture
def interpolation_rows():
    return _interpolation_rows


def _align_with_e0(loss):
    """Point a (4 -> 4) CrepaLoss projector at e0 for every input (weight 0, bias e0) and return a teacher
    (1, 3, 2, 4) along e0 too: every cosine is 1, the alignment score 1 + 4e^-1 / 3 at distance 1."""
    with torch.no_grad():
        loss.projector[1].weight.zero_()
        loss.projector[1].bias.copy_(torch.tensor([1.0, 0, 0, 0]))
    aligned = torch.zeros(1, 3, 2, 4)
    aligned[..., 0] = 1.0
    return aligned


@pytest.fixture
def align_with_e0():
    return _align_with_e0
