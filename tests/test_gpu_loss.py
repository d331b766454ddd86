"""Tier 3 (CUDA only): the whole crepa_loss on the Triton backend at realistic sizes and dtypes,
under torch.compile(fullgraph=True), bitwise deterministic, and free of host syncs."""
import logging

import pytest
import torch

from crepa_kernels import crepa_loss


WAN480 = dict(projected_grid=(30, 52), features_grid=(37, 37))


def _inputs(dtype, frames=21, dim=1536, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.randn(1, frames, 30 * 52, dim, generator=g).to("cuda", dtype)
    f = torch.randn(1, frames, 37 * 37, dim, generator=g).to("cuda", dtype)
    return p, f


def _loss_and_grad(p, f, backend, scale=1.0, **kw):
    leaf = p.detach().requires_grad_(True)
    out = crepa_loss(leaf, f, weight=0.5, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss * scale, leaf)
    return out, grad


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [WAN480, {}, {**WAN480, "adjacent_distance": 3, "cumulative_neighbors": True,
                                              "normalize_neighbour_sum": True}])
def test_triton_matches_torch_at_wan480_fp32(kw):
    p, f = _inputs(torch.float32)
    ref, g_ref = _loss_and_grad(p.double(), f.double(), "torch", **kw)
    got, g_got = _loss_and_grad(p, f, "triton", **kw)
    # Random inputs make a small loss (1.3e-5 to 4.7e-5 here) and alignments of 6e-4 to 1.7e-3, so
    # an absolute 1e-5 would pass a wrong answer. The torch backend in fp32 on these inputs (CPU)
    # is off the fp64 loss by 4e-11 to 2.3e-9 and the alignments by up to 6.1e-8: the bounds below
    # leave 40x and 16x over that, and stay under 1% and 0.2% of the compared values.
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-7
    assert torch.allclose(got.alignment.double(), ref.alignment, atol=1e-6, rtol=0)
    rel = (g_got.double() - g_ref).abs().max() / g_ref.abs().max()
    assert rel <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)])
def test_half_precision_inputs_against_fp32_reference(dtype, tol):
    _check_half_precision(*_inputs(dtype), dtype, tol, WAN480)


def test_fp16_inputs_against_fp32_reference_small():
    # the CPU tier's fp16 case (the interpreter's bf16 stores truncate, so bf16 is checked on the GPU);
    # as at wan480 the projected side has more tokens, so it is resampled inside the kernels, in fp32
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.randn(1, 5, 4 * 4, 48, generator=g).to(dev, torch.float16)
    f = torch.randn(1, 5, 3 * 5, 48, generator=g).to(dev, torch.float16)
    _check_half_precision(p, f, torch.float16, 1e-2, dict(projected_grid=(4, 4), features_grid=(3, 5)))


def _check_half_precision(p, f, dtype, tol, grids):
    # At this size the loss's gradients are ~1e-8 (a mean over 32760 tokens of terms ~1/|p|^2), below
    # fp16's smallest subnormal: the exact fp32 gradient rounded to fp16 keeps a cosine of only ~0.4
    # with itself. fp16 training scales the loss for that reason (torch.amp.GradScaler starts at 2^16),
    # and so does this test; bf16 has fp32's exponent range and needs no scale.
    scale = 2.0**16 if dtype == torch.float16 else 1.0
    ref, g_ref = _loss_and_grad(p.float(), f.float(), "torch", scale=scale, **grids)
    got, g_got = _loss_and_grad(p, f, "triton", scale=scale, **grids)
    # The reference reads the same rounded values but resamples them in fp32; the kernels round the
    # resampled tokens to the input dtype, as a stored resampled copy would be (and the torch backend
    # on these dtypes does), and accumulate in fp32. Rounding the inputs themselves moves this loss by
    # 4e-8 at wan480 (torch backend, CPU): the bounds, relative to the loss itself (a floor would pass
    # a loss of the wrong sign at these sizes), leave 10x and 20x over that.
    assert abs(got.loss.item() - ref.loss.item()) <= tol * abs(ref.loss.item())
    assert g_got.dtype == dtype
    # Scale-aware, unlike a cosine, so a gradient off by a factor fails: each element is rounded once
    # to the input dtype (2**-9 bf16, 2**-11 fp16), on top of the resampled tokens' rounding.
    rtol = 2.0**-6 if dtype == torch.bfloat16 else 2.0**-8
    torch.testing.assert_close(g_got.float(), g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item())


def _fresh_compiles():
    """Compiles that trace again: the environment switches are read while tracing and are not part
    of torch.compile's guards, so a graph (or a cached backward) traced under one setting would be
    reused under another."""
    import contextlib

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    stack = contextlib.ExitStack()
    for config, name in ((functorch_config, "enable_autograd_cache"), (inductor_config, "fx_graph_cache")):
        if hasattr(config, name):
            stack.enter_context(config.patch(name, False))
    return stack


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["two_pass", "merged", "rows"])
def test_torch_compile_fullgraph_matches_eager(monkeypatch, mode):
    # merged / rows: a one-pass fused-resample backward (banded, row form), launched through wrap_triton
    # in the graph.
    monkeypatch.setenv("CREPA_KERNELS_MERGED_BWD", "1" if mode == "merged" else "0")
    monkeypatch.setenv("CREPA_KERNELS_ROW_BWD", "1" if mode == "rows" else "0")
    p, f = _inputs(torch.float32, frames=5, dim=256)

    def step(a, b):
        return crepa_loss(a, b, weight=0.5, backend="triton", **WAN480).loss

    a1 = p.detach().requires_grad_(True)
    a2 = p.detach().requires_grad_(True)
    l1 = step(a1, f)
    l1.backward()
    # torch.compile builds each kernel's TTIR (scalars as constants on torch <= 2.11) to find the
    # tensors it writes; a kernel that does not build there is taken to write all its inputs, with a
    # warning ("Encountered an exception in identify_mutated_tensors" / "identify_accessed_tensors",
    # "assuming every input is mutated") on the logger that module writes to, torch._dynamo's.
    records = _Records()
    wrap_log = logging.getLogger("torch._dynamo")
    wrap_log.addHandler(records)
    try:
        with _fresh_compiles():
            compiled = torch.compile(step, fullgraph=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                l2 = compiled(a2, f)
                l2.backward()
                torch.cuda.synchronize()
    finally:
        wrap_log.removeHandler(records)
    assert not [m for m in records.messages if "assuming every input is mutated" in m], records.messages[:1]
    assert torch.allclose(l1, l2, atol=1e-6)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-6, rtol=1e-5)
    # The compiled backward is the one the switch asks for.
    kernels = {e.key for e in prof.key_averages()}
    banded = any("neighbour_cosine_resample_bwd" in k for k in kernels)
    rows = any("neighbour_cosine_rows_bwd" in k for k in kernels)
    two_pass = any("_resample_bwd_kernel" in k and "neighbour_cosine" not in k for k in kernels)
    assert (two_pass, banded, rows) == tuple(mode == m for m in ("two_pass", "merged", "rows")), sorted(kernels)


@pytest.mark.gpu
def test_bitwise_deterministic():
    p, f = _inputs(torch.bfloat16)
    a, ga = _loss_and_grad(p, f, "triton", **WAN480)
    b, gb = _loss_and_grad(p, f, "triton", **WAN480)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)


@pytest.mark.gpu
def test_no_host_sync_in_forward_and_backward():
    p, f = _inputs(torch.float32, frames=5, dim=256)
    _loss_and_grad(p, f, "triton", **WAN480)  # compile and cache the kernels first
    torch.cuda.synchronize()
    leaf = p.detach().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = crepa_loss(leaf, f, weight=0.5, backend="triton", **WAN480)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert leaf.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_launch_gives_the_same_bits(monkeypatch, dtype):
    """The fast launch (the default; CREPA_KERNELS_FAST_LAUNCH=0 turns it off) launches the compiled
    kernels past Triton's binder: the results
    must be those of Triton's own launch, bit for bit, with the fast path taken. 16 MiB windows split
    the backward into several frame windows (3 in fp32, 2 in bf16)."""
    from crepa_kernels.ops import launch

    p, f = _inputs(dtype, frames=9, dim=1000)
    monkeypatch.setenv("CREPA_KERNELS_BWD_WINDOW_MIB", "16")
    results = []
    hits = lambda: sum(entry[1].hits for entry in launch._LAUNCHERS.values())  # noqa: E731
    before = hits()
    for fast in ("0", "1", "1"):  # the second fast call runs from the fast path's cache
        monkeypatch.setenv(launch.FAST_LAUNCH_ENV, fast)
        out, grad = _loss_and_grad(p, f, "triton", **WAN480)
        results.append((out.loss, out.alignment, out.self_similarity, grad))
    assert hits() > before
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("switch", ["CREPA_KERNELS_MERGED_BWD", "CREPA_KERNELS_ROW_BWD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_backward_gives_the_same_numbers_at_wan480(monkeypatch, dtype, switch):
    """CREPA_KERNELS_MERGED_BWD=1 (the fused-resample backward as one banded gather kernel) and
    CREPA_KERNELS_ROW_BWD=1 (its row form) must give the default's loss and the default's gradient at
    the flagship shape, up to summation order (fp32) or one bf16 rounding step (the default rounds the
    resampled-grid gradient to bf16 between its two kernels; the one-pass kernels do not)."""
    from crepa_kernels.ops import similarity

    launched = []
    name = "_launch_merged_backward" if switch.endswith("MERGED_BWD") else "_launch_row_backward"
    real = getattr(similarity, name)
    monkeypatch.setattr(similarity, name, lambda *a, **k: launched.append(real(*a, **k)) or launched[-1])
    p, f = _inputs(dtype)
    results = []
    for merged in ("0", "1"):
        monkeypatch.setenv(switch, merged)
        out, grad = _loss_and_grad(p, f, "triton", **WAN480)
        results.append((out.loss.float(), grad.float()))
    assert launched == [True]  # the one-pass kernel ran (not the default's windows again) in the second call
    (loss_d, grad_d), (loss_m, grad_m) = results
    assert torch.equal(loss_m, loss_d)  # the same forward kernel
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-6
    torch.testing.assert_close(grad_m, grad_d, rtol=rtol, atol=rtol * float(grad_d.abs().max()))
    ref = _loss_and_grad(p.double(), f.double(), "torch", **WAN480)[1]
    cos = torch.nn.functional.cosine_similarity(grad_m.double().flatten(), ref.flatten(), dim=0)
    assert cos > (1 - 1e-6 if dtype == torch.float32 else 0.999)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fused_token_block_gives_the_same_numbers_at_wan480(monkeypatch, dtype):
    """CREPA_KERNELS_FUSED_HALF_BLOCK_N=0 (the fused kernels keep the unfused token block) must give
    the default's loss and gradients at the flagship shape: the same sums over D, only another tile
    layout, so any difference is the order of a block's lanes (a few fp32 roundings)."""
    from crepa_kernels.ops.utils import FUSED_HALF_BLOCK_N_ENV

    p, f = _inputs(dtype)
    results = []
    for half in ("1", "0"):
        monkeypatch.setenv(FUSED_HALF_BLOCK_N_ENV, half)
        out, grad = _loss_and_grad(p, f, "triton", **WAN480)
        results.append((out.loss.float(), out.alignment.float(), grad.float()))
    (loss_h, align_h, grad_h), (loss_f, align_f, grad_f) = results
    torch.testing.assert_close(loss_f, loss_h, rtol=1e-5, atol=1e-7)  # fp32 outputs in both dtypes
    torch.testing.assert_close(align_f, align_h, rtol=1e-5, atol=1e-6)
    # the gradient is stored in the input dtype: a bf16 value may land one rounding step away
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(grad_f, grad_h, rtol=rtol, atol=rtol * float(grad_h.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    # Triton launches on the current device: the launch sites switch to the tensors' device.
    torch.cuda.set_device(0)
    p, f = (t.to("cuda:1") for t in _inputs(torch.float32, frames=5, dim=256))
    ref, g_ref = _loss_and_grad(p.double(), f.double(), "torch", **WAN480)
    got, g_got = _loss_and_grad(p, f, "triton", **WAN480)
    assert torch.cuda.current_device() == 0 and g_got.device == p.device
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-3 * abs(ref.loss.item())  # the loss is ~1e-6 here
    assert (g_got.double() - g_ref).abs().max() / g_ref.abs().max() <= 1e-4

