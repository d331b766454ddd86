"""Launch helpers: warps follow the elements each thread holds (overridable for benchmarks), and the
choice between the direct and the custom-op front end."""
import pytest

import torch

from crepa_kernels.ops.utils import (BWD_WINDOW_ENV, ELEMS_PER_THREAD_ENV, FRONT_END_ENV, FUSED_RESAMPLE_ENV,
                                     bwd_window_bytes, cdiv, direct_launch_ok, fused_resample_enabled,
                                     num_warps_for)


@pytest.mark.parametrize("elems,want", [(1, 2), (512, 2), (1024, 2), (2048, 4), (4096, 8), (65536, 8)])
def test_default_rule_is_sixteen_elements_per_thread_within_two_to_eight_warps(monkeypatch, elems, want):
    monkeypatch.delenv(ELEMS_PER_THREAD_ENV, raising=False)
    assert num_warps_for(elems) == want


def test_override_for_benchmarks(monkeypatch):
    monkeypatch.setenv(ELEMS_PER_THREAD_ENV, "32")
    assert num_warps_for(4096) == 4 and num_warps_for(8192) == 8


@pytest.mark.parametrize("bad", ["0", "12", "many", "-4", "1_6", " 16", "+16"])
def test_bad_override_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(ELEMS_PER_THREAD_ENV, bad)
    with pytest.raises(ValueError, match=ELEMS_PER_THREAD_ENV):
        num_warps_for(4096)


# ---------------------------------------------------------------------------------------------
# Which front end an eager call takes (the direct autograd.Function or the registered custom ops)
# ---------------------------------------------------------------------------------------------
def test_plain_eager_tensors_launch_directly(monkeypatch):
    monkeypatch.delenv(FRONT_END_ENV, raising=False)
    x = torch.zeros(2)
    assert direct_launch_ok(x, torch.nn.Parameter(torch.zeros(2)))
    assert cdiv(7, 2) == 4 and cdiv(8, 2) == 4 and cdiv(0, 3) == 0


def test_subclasses_and_dispatch_modes_take_the_custom_ops(monkeypatch):
    monkeypatch.delenv(FRONT_END_ENV, raising=False)

    class Sub(torch.Tensor):
        pass

    x = torch.zeros(2)
    assert not direct_launch_ok(x, x.as_subclass(Sub))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not direct_launch_ok(x)
    assert direct_launch_ok(x)


def test_front_end_override(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv(FRONT_END_ENV, "custom_op")
    assert not direct_launch_ok(x)
    monkeypatch.setenv(FRONT_END_ENV, "auto")
    assert direct_launch_ok(x)
    monkeypatch.setenv(FRONT_END_ENV, "fast")
    with pytest.raises(ValueError, match=FRONT_END_ENV):
        direct_launch_ok(x)


def test_loss_under_a_dispatch_mode_matches_plain_eager(monkeypatch):
    # Under FlopCounterMode the call goes through the custom ops; the numbers must not change.
    from torch.utils.flop_counter import FlopCounterMode

    from crepa_kernels import crepa_loss

    monkeypatch.delenv(FRONT_END_ENV, raising=False)
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.randn(1, 3, 6, 8, generator=g).to(dev).requires_grad_(True)
    f = torch.randn(1, 3, 4, 8, generator=g).to(dev)
    runs = []
    for mode in (None, FlopCounterMode(display=False)):
        p.grad = None
        if mode is None:
            out = crepa_loss(p, f, projected_grid=(2, 3), features_grid=(2, 2), backend="triton")
            out.loss.backward()
        else:
            with mode:
                out = crepa_loss(p, f, projected_grid=(2, 3), features_grid=(2, 2), backend="triton")
                out.loss.backward()
        runs.append((out.loss.detach(), out.alignment.detach(), p.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, default", [("fused_resample", True), ("fused_half_block_n", True),
                                           ("fast_launch", True), ("merged_bwd", False), ("row_bwd", False)])
def test_on_off_switches(monkeypatch, name, default):
    from crepa_kernels.ops import launch, utils

    env, read = {"fused_resample": (FUSED_RESAMPLE_ENV, fused_resample_enabled),
                 "fused_half_block_n": (utils.FUSED_HALF_BLOCK_N_ENV, utils.fused_halves_token_block),
                 "fast_launch": (launch.FAST_LAUNCH_ENV, launch.fast_launch_enabled),
                 "merged_bwd": (utils.MERGED_BWD_ENV, utils.merged_backward_enabled),
                 "row_bwd": (utils.ROW_BWD_ENV, utils.row_backward_enabled)}[name]
    monkeypatch.delenv(env, raising=False)
    assert read() is default
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv(env, value)
        assert read() is want
    for bad in ("yes", "2", ""):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=f"{env} must be 0 or 1"):
            read()


def test_fused_token_block_changes_the_launch_not_the_bits(monkeypatch):
    """CREPA_KERNELS_FUSED_HALF_BLOCK_N=0 gives the fused kernels the unfused token block: another
    launch shape, the same numbers (bits under the interpreter, where the block over tokens enters no
    sum's order)."""
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import similarity
    from crepa_kernels.ops.utils import FUSED_HALF_BLOCK_N_ENV

    g = torch.Generator().manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.randn(1, 3, 12, 40, generator=g).to(dev).requires_grad_(True)
    f = torch.randn(1, 3, 9, 40, generator=g).to(dev)
    seen, runs = [], []
    real = similarity._launch_config_for
    monkeypatch.setattr(similarity, "_launch_config_for", lambda *a: seen.append(real(*a)) or seen[-1])
    for half in ("1", "0"):
        monkeypatch.setenv(FUSED_HALF_BLOCK_N_ENV, half)
        seen.clear()
        p.grad = None
        out = crepa_loss(p, f, projected_grid=(3, 4), features_grid=(3, 3), backend="triton")
        out.loss.backward()
        runs.append(((out.loss.detach(), out.alignment.detach(), p.grad.clone()), list(seen)))
    (bits_half, blocks_half), (bits_full, blocks_full) = runs
    assert [b[0] for b in blocks_full] == [2 * b[0] for b in blocks_half]  # BLOCK_N doubled, fwd and bwd
    assert [b[1] for b in blocks_full] == [b[1] for b in blocks_half]  # BLOCK_D, the summation order, kept
    for a, b in zip(bits_half, bits_full):
        if a.is_cuda:  # another tile layout may sum a block's lanes in another tree order on a GPU
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("switch", ["CREPA_KERNELS_MERGED_BWD", "CREPA_KERNELS_ROW_BWD"])
def test_loss_with_the_merged_backward(monkeypatch, switch):
    """crepa_loss with CREPA_KERNELS_MERGED_BWD=1 or CREPA_KERNELS_ROW_BWD=1 (the banded and the row-form
    one-pass backward): the same forward (the same kernel: equal loss and scores) and the gradient of
    the default two-pass backward up to fp32 summation order, in grid mode with the projected side
    resampled."""
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import similarity

    g = torch.Generator().manual_seed(4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.randn(2, 3, 12, 20, generator=g).to(dev).requires_grad_(True)
    f = torch.randn(2, 3, 9, 20, generator=g).to(dev)
    name = "_launch_merged_backward" if switch.endswith("MERGED_BWD") else "_launch_row_backward"
    merged_calls, real = [], getattr(similarity, name)
    monkeypatch.setattr(similarity, name, lambda *a, **k: merged_calls.append(1) or real(*a, **k))
    runs = []
    for merged in ("1", "0"):
        monkeypatch.setenv(switch, merged)
        p.grad = None
        out = crepa_loss(p, f, projected_grid=(3, 4), features_grid=(3, 3), adjacent_distance=2,
                         cumulative_neighbors=True, backend="triton")
        out.loss.backward()
        runs.append((out.loss.detach(), out.alignment.detach(), p.grad.clone()))
    assert merged_calls == [1]
    (loss_m, align_m, grad_m), (loss_d, align_d, grad_d) = runs
    assert torch.equal(loss_m, loss_d) and torch.equal(align_m, align_d)
    torch.testing.assert_close(grad_m, grad_d, rtol=1e-5, atol=1e-5 * float(grad_d.abs().max()))
    assert not torch.equal(grad_m, torch.zeros_like(grad_m))


@pytest.mark.parametrize("grids", [((2, 3), (2, 2)), ((3, 3), (2, 2))])  # projected side resampled
def test_loss_is_the_same_with_the_resample_fused_or_separate(monkeypatch, grids):
    from crepa_kernels import crepa_loss

    g = torch.Generator().manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    (ph, pw), (fh, fw) = grids
    p = torch.randn(2, 4, ph * pw, 8, generator=g).to(dev).requires_grad_(True)
    f = torch.randn(2, 4, fh * fw, 8, generator=g).to(dev)
    from crepa_kernels.ops import resample

    resample_passes = []
    real_launch = resample._launch_fwd
    monkeypatch.setattr(resample, "_launch_fwd", lambda *a, **k: resample_passes.append(1) or real_launch(*a, **k))
    runs = []
    for fused in ("1", "0"):
        monkeypatch.setenv(FUSED_RESAMPLE_ENV, fused)
        resample_passes.clear()
        p.grad = None
        out = crepa_loss(p, f, projected_grid=grids[0], features_grid=grids[1], adjacent_distance=2,
                         cumulative_neighbors=True, backend="triton")
        out.loss.backward()
        assert len(resample_passes) == (0 if fused == "1" else 1)  # the switch really changes the path
        runs.append((out.loss.detach(), out.alignment.detach(), out.self_similarity.detach(), p.grad.clone()))
    for a, b in zip(*runs):
        if a.is_cuda:  # the GPU compiler may contract the blend into FMAs differently in two kernels
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)


def test_backward_window_defaults_to_128_mib_and_takes_an_override(monkeypatch):
    monkeypatch.delenv(BWD_WINDOW_ENV, raising=False)
    assert bwd_window_bytes() == 128 * 2**20
    monkeypatch.setenv(BWD_WINDOW_ENV, "1024")
    assert bwd_window_bytes() == 2**30


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "big", ""])
def test_bad_backward_window_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(BWD_WINDOW_ENV, bad)
    with pytest.raises(ValueError, match=BWD_WINDOW_ENV):
        bwd_window_bytes()


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("On", True), ("TRUE", True),
                                       ("0", False), ("off", False), ("no", False), ("FALSE", False),
                                       ("2", False), (" 1", False), ("", False)])
def test_interpreter_switch_is_read_as_triton_reads_it(monkeypatch, value, on):
    # The kernels of this process are interpreted (TRITON_INTERPRET=1 before the first import);
    # the variable's value decides as Triton's boolean reading does.
    import crepa_kernels
    from crepa_kernels.ops.utils import interpreter_enabled, triton_supports

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_enabled() is on and crepa_kernels.info()["triton_interpreter"] is on
    assert triton_supports(torch.zeros(1)) is on


def test_compiled_kernels_are_not_the_interpreter_whatever_the_variable_says(monkeypatch):
    # Triton decides at definition: kernels defined without the interpreter stay compiled kernels
    # even if TRITON_INTERPRET=1 is set afterwards, so CPU tensors must not be sent to them.
    from crepa_kernels.ops import resample
    from crepa_kernels.ops.utils import interpreter_enabled, triton_supports

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled = type("JITFunction", (), {})()  # stands in for a kernel Triton compiled (its class name)
    monkeypatch.setattr(resample, "_resample_fwd_kernel", compiled)
    assert not interpreter_enabled() and not triton_supports(torch.zeros(1))
    x = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(resample.resample_tokens(x, (2, 2), (3, 3)),
                               resample._resample_tokens_torch(x, (2, 2), (3, 3)))  # the torch path


def test_a_failed_call_does_not_change_the_reported_backend():
    import crepa_kernels
    from crepa_kernels import crepa_loss

    p = torch.randn(1, 2, 3, 4)
    crepa_loss(p, p, backend="torch")
    before = crepa_kernels.info()["last_call"]
    with pytest.raises(ValueError, match="projected holds NaN"):
        crepa_loss(torch.full((1, 2, 3, 4), float("nan")), p, backend="triton", check_finite=True)
    assert crepa_kernels.info()["last_call"] == before == {**before, "backend": "torch"}


@pytest.mark.parametrize("grids", [((2, 3), (3, 3)), ((1, 4), (1, 7))])
def test_resample_of_an_empty_feature_dim_on_the_torch_path(monkeypatch, grids):
    from crepa_kernels.ops import resample

    monkeypatch.setattr(resample, "triton_supports", lambda t: False)  # CPU without the interpreter
    x = torch.randn(2, 2, grids[0][0] * grids[0][1], 0, requires_grad=True)
    out = resample.resample_tokens(x, *grids)
    assert out.shape == (2, 2, grids[1][0] * grids[1][1], 0)
    out.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Device guard: Triton launches on the current CUDA device, whatever device the tensors live on.


class _Placed:
    """Stands in for a tensor on a device this machine may not have (only ``.device`` is read)."""

    def __init__(self, device):
        self.device = torch.device(device)


@pytest.fixture
def cuda_calls(monkeypatch):
    calls = []

    class _Device:
        def __init__(self, index):
            calls.append(index)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", _Device)
    return calls


def test_device_guard_switches_only_to_another_cuda_device(cuda_calls, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from crepa_kernels.ops.utils import device_guard

    with device_guard(_Placed("cuda:1")):
        pass
    assert cuda_calls == [1]
    for device in ("cuda:0", "cpu", "cuda"):  # current already, no CUDA, no index: nothing to switch
        with device_guard(_Placed(device)):
            pass
    assert cuda_calls == [1]
    # While a graph is traced (a fake tensor, or torch.compile running) the graph guards the device.
    with FakeTensorMode():
        fake = torch.empty(2, device="cuda:1")
    with device_guard(fake):
        pass
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with device_guard(_Placed("cuda:1")):
        pass
    assert cuda_calls == [1]


def test_device_guard_guards_an_eager_tensor_subclass(cuda_calls):
    # A subclass takes the custom-op front end in eager mode; it still launches on its own device.
    from crepa_kernels.ops.utils import device_guard

    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(2).as_subclass(Sub)
    type(sub).device = property(lambda self: torch.device("cuda:1"))  # where this machine has no GPU
    try:
        with device_guard(sub):
            pass
    finally:
        del type(sub).device
    assert cuda_calls == [1]


def test_every_launch_site_is_guarded_by_its_tensors_device(monkeypatch):
    # Record the guards the launch sites open, on the interpreter's CPU tensors: the forward, the
    # backward (which wraps its resample backward's own guard), and the separate resample's two.
    from crepa_kernels import crepa_loss
    from crepa_kernels.ops import resample, similarity

    seen = []

    def record(t):
        import contextlib

        seen.append((t.shape, type(t)))
        return contextlib.nullcontext()

    monkeypatch.setattr(similarity, "device_guard", record)
    monkeypatch.setattr(resample, "device_guard", record)
    p = torch.randn(1, 3, 6, 8, requires_grad=True)
    f = torch.randn(1, 3, 4, 8)
    for fused in ("1", "0"):
        monkeypatch.setenv(FUSED_RESAMPLE_ENV, fused)
        seen.clear()
        crepa_loss(p, f, projected_grid=(2, 3), features_grid=(2, 2), backend="triton").loss.backward()
        shapes = [shape for shape, _ in seen]
        if fused == "1":  # forward on p; backward on p, then its resample backward on the (1, 3, 4, 8) gradient
            assert shapes == [p.shape, p.shape, torch.Size([1, 3, 4, 8])], shapes
        else:  # resample p, similarity forward, similarity backward, resample backward
            assert shapes == [p.shape, torch.Size([1, 3, 4, 8]), torch.Size([1, 3, 4, 8]),
                              torch.Size([1, 3, 4, 8])], shapes
        assert all(kind is torch.Tensor for _, kind in seen)


def test_launch_overrides_replace_only_what_they_name():
    from crepa_kernels.ops.utils import apply_tune

    assert apply_tune(8, 64, 4, None) == (8, 64, 4, {}) == apply_tune(8, 64, 4, {})
    assert apply_tune(8, 64, 4, {"block_n": 2, "num_warps": 8}) == (2, 64, 8, {})
    # Triton's own pipelining depth stays unless one is given (any positive int, not only powers of two)
    assert apply_tune(8, 64, 4, {"num_stages": 3, "block_d": 128}) == (8, 128, 4, {"num_stages": 3})


def test_the_one_pass_backward_takes_band_rows_and_nothing_else():
    # merged_bwd's first setting is the band height (any positive int); other kernels do not take it.
    from crepa_kernels.ops.utils import BAND_TUNE_KEYS, LAUNCH_OVERRIDES, apply_tune, launch_overrides

    assert apply_tune(None, 16, None, {"rows": 3, "num_warps": 4}, BAND_TUNE_KEYS) == (3, 16, 4, {})
    with pytest.raises(ValueError, match="unknown setting"):
        apply_tune(None, 16, None, {"block_n": 4}, BAND_TUNE_KEYS)
    for bad in ({"merged_bwd": {"block_n": 4}}, {"sim_bwd": {"rows": 2}}, {"merged_bwd": {"rows": 0}}):
        with pytest.raises(ValueError):
            with launch_overrides(bad):
                pass
    with launch_overrides({"merged_bwd": {"rows": 3, "block_d": 8}}):
        assert LAUNCH_OVERRIDES == {"merged_bwd": {"rows": 3, "block_d": 8}}
    assert LAUNCH_OVERRIDES == {}


@pytest.mark.parametrize("tune, match", [({"block_m": 4}, "unknown setting"), ({"block_n": 3}, "power of two"),
                                         ({"num_warps": 0}, "positive int"), ({"num_stages": True}, "positive int"),
                                         ({"block_d": 64.0}, "positive int")])
def test_bad_launch_overrides_name_the_setting(tune, match):
    from crepa_kernels.ops.utils import apply_tune

    with pytest.raises(ValueError, match=match):
        apply_tune(8, 64, 4, tune)


def test_launch_overrides_are_checked_first_and_restored_after_an_error():
    from crepa_kernels.ops.utils import LAUNCH_OVERRIDES, launch_overrides

    with launch_overrides({"sim_bwd": {"num_warps": 4}}):
        with pytest.raises(ValueError, match="unknown kernel 'sim_bwdd'"):
            with launch_overrides({"sim_bwdd": {"num_warps": 4}}):
                pass
        with pytest.raises(ValueError, match="power of two"):
            with launch_overrides({"sim_fwd": {"block_n": 6}}):
                pass
        assert LAUNCH_OVERRIDES == {"sim_bwd": {"num_warps": 4}}  # a refused one changed nothing
        with pytest.raises(RuntimeError):
            with launch_overrides({"resample_bwd": {"block_n": 4}}):
                assert LAUNCH_OVERRIDES == {"resample_bwd": {"block_n": 4}}
                raise RuntimeError
        assert LAUNCH_OVERRIDES == {"sim_bwd": {"num_warps": 4}}
    assert LAUNCH_OVERRIDES == {}


def test_an_eager_call_does_not_make_a_compiled_graph_recompile(monkeypatch):
    """A graph compiled before the first eager call must not be guarded on what that call caches (a
    compiled training step followed by eager validation would recompile, and fail under the
    fail_on_recompile stance). Kernels stubbed: the trace runs on fake CPU tensors."""
    import torch._dynamo

    from crepa_kernels import crepa_loss, functional
    from crepa_kernels.ops import resample, similarity

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module, names in ((similarity, ("_neighbour_cosine_fwd_kernel", "_neighbour_cosine_bwd_kernel")),
                          (resample, ("_resample_bwd_kernel",))):
        for name in names:
            monkeypatch.setattr(module, name, NoLaunch())
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    monkeypatch.setattr(functional, "_TRITON_OPS", ())  # as in a process that has not called it yet
    p, f = torch.zeros(1, 3, 15, 8), torch.zeros(1, 3, 6, 8)

    def loss(p, f):
        return crepa_loss(p, f, projected_grid=(3, 5), features_grid=(2, 3), weight=0.5, backend="triton").loss

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    try:
        compiled(p, f)
        loss(p, f)  # eager: fills the cache
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(p, f)
    finally:
        torch._dynamo.reset()


def test_getenv_answers_as_os_environ_does(monkeypatch):
    # The launch path's environment reads see every change made through os.environ, and fall back to
    # os.environ.get where os.environ is not the object they know.
    import os

    from crepa_kernels.ops.utils import getenv

    name = "CREPA_KERNELS_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) is None
    for value in ("1", "", "x y", "caf\u00e9", "\udcff"):  # the last: a byte that is not UTF-8
        monkeypatch.setenv(name, value)
        assert getenv(name) == os.environ.get(name) == value
    monkeypatch.delenv(name)
    assert getenv(name) is None
    if os.name == "posix":  # the fast path is the one taken: it reads os.environ's dict, not its get
        monkeypatch.setenv(name, "set")
        monkeypatch.setattr(os.environ, "get", lambda *args: "through get", raising=False)
        assert getenv(name) == "set"
        monkeypatch.undo()
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "environ", {name: "replaced"})
    assert getenv(name) == "replaced"


def test_fused_launch_settings_follow_the_h200_sweep():
    """At wan480 (B 1, T 21, N 37x37, D 1536, S 3 padded to 4) on 132 SMs, the fused-resample kernels
    launch with the settings bench/tune_kernels.py measured fastest on an H200
    (bench/results/NVIDIA_H200-tune_wan480*.json): forward fp32 (8, 64, 4 warps), bf16 (8, 64, 2);
    backward fp32 (8, 32, 2), bf16 (8, 64, 2). The first sweep's defaults were (8, 64, 8) for both
    kernels and dtypes, which the unfused kernels keep; fp64, an elements-per-thread override and
    windows of more than 4 slots keep the heuristic's choices, a caller's BLOCK_D its own block."""
    from crepa_kernels.ops import similarity
    from crepa_kernels.ops.utils import DEFAULT_ELEMS_PER_THREAD as ept

    def cfg(fused=True, backward=False, input_bytes=4, fp64=False, block_d=None, e=ept):
        return similarity._launch_config_for(1, 21, 1369, 1536, 4, fp64, 132, 1, block_d, e, fused, True,
                                             backward, input_bytes)

    assert cfg() == (8, 64, 4)
    assert cfg(input_bytes=2) == (8, 64, 2)
    assert cfg(backward=True) == (8, 32, 2)
    assert cfg(backward=True, input_bytes=2) == (8, 64, 2)
    for backward in (False, True):
        assert cfg(fused=False, backward=backward) == (16, 64, 8)  # the unfused token block is not halved
        # an elements-per-thread override: the heuristic alone (at half the default: the sweep's defaults)
        assert cfg(backward=backward, e=ept // 2) == (8, 64, 8)
    assert cfg(backward=True, block_d=64) == (8, 64, 2)  # a caller's BLOCK_D is kept
    assert cfg(fp64=True, backward=True) == cfg(fp64=True)
    # 8 slots (distance 3 cumulative): the heuristic's 16 tokens halved for the fused taps, a budget of
    # 4096 elements over 8 x 16 for 32 columns, 8 x 8 x 32 x 2 tiles = 4096 elements over 8 warps
    for backward in (False, True):
        for item in (2, 4):
            assert similarity._launch_config_for(1, 21, 1369, 1536, 8, False, 132, 1, None, ept, True, True,
                                                 backward, item) == (8, 32, 8)


def test_feature_blocks_per_program_are_the_resample_and_row_form_backwards_settings():
    # d_blocks: any positive int, for resample_bwd and row_bwd only (their launchers read it; apply_tune
    # passes it by); row_kernel for resample_bwd only.
    from crepa_kernels.ops.utils import (LAUNCH_OVERRIDES, RESAMPLE_BWD_TUNE_KEYS, ROW_TUNE_KEYS, apply_tune,
                                         launch_overrides)

    assert apply_tune(8, 128, 4, {"d_blocks": 3, "num_warps": 2}, RESAMPLE_BWD_TUNE_KEYS) == (8, 128, 2, {})
    assert apply_tune(64, 16, 8, {"d_blocks": 5}, ROW_TUNE_KEYS) == (64, 16, 8, {})
    with pytest.raises(ValueError, match="unknown setting"):
        apply_tune(64, 16, 8, {"row_kernel": 1}, ROW_TUNE_KEYS)
    for bad, match in (({"sim_bwd": {"d_blocks": 2}}, "unknown setting"),
                       ({"merged_bwd": {"d_blocks": 2}}, "unknown setting"),
                       ({"resample_bwd": {"d_blocks": 0}}, "positive int")):
        with pytest.raises(ValueError, match=match):
            with launch_overrides(bad):
                pass
    with launch_overrides({"resample_bwd": {"d_blocks": 12}}):
        assert LAUNCH_OVERRIDES == {"resample_bwd": {"d_blocks": 12}}
    assert LAUNCH_OVERRIDES == {}
