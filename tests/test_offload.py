"""Tests of OffloadManager: mode logic, exception safety, bit-exactness over cycles, memory, GPU ordering.

CPU tests run the real bookkeeping with `emulate_device=True` (packing, copies into fresh CPU
buffers, re-pointing) and a fake memory probe; GPU tests check streams, pinning and peak memory.
"""
import gc
import os
import tracemalloc
import weakref

import pytest
import torch
from torch import nn

from crepa_kernels.teacher.offload import DEFAULT_MARGIN_BYTES, OFFLOAD_MODES, OffloadManager, module_nbytes

MODES = list(OFFLOAD_MODES)


class Toy(nn.Module):
    """Mixed dtypes, a channels_last weight, tied weights, BN running stats, scalar and empty buffers."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.fc.weight  # tied: must stay one tensor
        self.low = nn.Linear(8, 4).to(torch.bfloat16)
        self.register_buffer("scale", torch.tensor(1.5))
        self.register_buffer("empty", torch.zeros(0))
        self.register_buffer("ids", torch.arange(4))
        with torch.no_grad():
            for t in list(self.parameters()) + [self.bn.running_mean, self.bn.running_var]:
                t.copy_(torch.rand(t.shape, generator=g).to(t.dtype) + 0.1)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
        self.requires_grad_(False).eval()

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        y = self.head(torch.relu(self.fc(y))) * self.scale
        z = self.low(y.to(torch.bfloat16)).float()
        return torch.cat([y, z], -1) + self.ids.float().sum() + self.empty.sum()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module, ref):
    state = module.state_dict()
    assert state.keys() == ref.keys()
    for k, v in ref.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k


def storages(module):
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


X = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ inputs
def test_bad_mode_names_argument_and_choices():
    with pytest.raises(ValueError, match=r"mode.*'fast'.*auto, resident, offload"):
        OffloadManager("fast")
    with pytest.raises(ValueError, match="mode"):
        OffloadManager(None)


@pytest.mark.parametrize("margin", [-1, 1.5, True, "1G"])
def test_bad_margin(margin):
    with pytest.raises(ValueError, match="margin_bytes"):
        OffloadManager("auto", margin_bytes=margin)


def test_bad_arguments():
    with pytest.raises(TypeError, match="memory_probe"):
        OffloadManager("auto", memory_probe=123)
    with pytest.raises(ValueError, match="device"):
        OffloadManager("auto", device="tpu")
    with pytest.raises(TypeError, match="device"):
        OffloadManager("auto", device=1.0)
    m = OffloadManager("offload", emulate_device=True)
    for call in (lambda: m.use("dino").__enter__(), lambda: m.prefetch(object()), lambda: m.release(3),
                 lambda: m.evict(None), lambda: m.is_resident([])):
        with pytest.raises(TypeError, match="module.*nn.Module"):
            call()
    with pytest.raises(TypeError, match="module.*nn.Module"):
        module_nbytes("x")
    # The emulated device takes the same checks: named errors, not torch's own.
    with pytest.raises(ValueError, match="device: got 'gpu', expected a device such as"):
        OffloadManager("auto", device="gpu", emulate_device=True)
    with pytest.raises(TypeError, match="device: got float"):
        OffloadManager("auto", device=1.5, emulate_device=True)
    with pytest.raises(ValueError, match="emulate_device=True runs on the CPU"):
        OffloadManager("auto", device="cuda:0", emulate_device=True)


def test_probe_returning_non_int_is_reported():
    m = OffloadManager("auto", memory_probe=lambda: 1.0e9, emulate_device=True)
    with pytest.raises(TypeError, match="memory_probe"):
        m.would_keep(10)


def test_trainable_module_is_refused():
    m = OffloadManager("offload", emulate_device=True)
    with pytest.raises(ValueError, match="requires grad.*requires_grad_"):
        m.prefetch(nn.Linear(2, 2))


@pytest.mark.parametrize("call", ["use", "prefetch"])
def test_a_module_made_trainable_after_packing_is_refused(call):
    # Inside an offloading use(), an optimizer step would update the device copy, which is then dropped.
    module = nn.Linear(2, 2).requires_grad_(False)
    m = OffloadManager("offload", emulate_device=True)
    with m.use(module):
        pass
    module.requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad again.*requires_grad_"):
        if call == "use":
            with m.use(module):
                pass
        else:
            m.prefetch(module)
    assert not m.is_resident(module)
    module.requires_grad_(False)
    with m.use(module):
        pass


def test_a_failing_memory_probe_does_not_hide_the_bodys_error():
    # After a CUDA error the driver query often fails too; the caller must see the first error, and the
    # device copy must go (the memory left is unknown).
    def probe():
        if failing:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return 1 << 40

    failing = False
    toy = Toy()
    ref_state = snapshot(toy)
    m = OffloadManager("auto", margin_bytes=0, memory_probe=probe, emulate_device=True)
    with pytest.raises(KeyError, match="body error"):
        with m.use(toy):
            failing = True
            raise KeyError("body error")
    assert not m.is_resident(toy) and len(storages(toy)) == 1
    assert_same_state(toy, ref_state)
    # without an error in the body, the probe's own failure is reported (and the copy still dropped)
    failing = False
    m.prefetch(toy)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        with m.use(toy):
            failing = True
    assert not m.is_resident(toy)


def test_running_statistics_in_training_mode_are_refused():
    # A batch norm in training mode writes its running statistics into the device copy, which the
    # manager drops: refused before anything moves, whether the module is new or already packed.
    m = OffloadManager("offload", emulate_device=True)
    toy = Toy().train()
    for call in (m.prefetch, lambda mod: m.use(mod).__enter__()):
        with pytest.raises(ValueError, match="BatchNorm2d is in training mode .*module.eval"):
            call(toy)
    assert m.stats.bytes_to_host == 0 and m.stats.copies == 0
    toy.eval()
    with m.use(toy):
        pass
    toy.train()
    with pytest.raises(ValueError, match="BatchNorm2d is in training mode"):
        m.prefetch(toy)
    assert not m.is_resident(toy) and m.stats.copies == 1


def test_a_module_that_tracks_running_stats_itself_is_still_collected():
    # The slot remembers which submodules track running stats; when the module is one of them it
    # must not keep itself (the manager's weak key) alive.
    m = OffloadManager("offload", emulate_device=True)
    bn = nn.BatchNorm2d(8).requires_grad_(False).eval()
    with m.use(bn):
        pass
    assert m.stats.host_bytes > 0
    ref = weakref.ref(bn)
    del bn
    gc.collect()
    assert ref() is None and m.stats.host_bytes == 0


@pytest.mark.parametrize("mode", MODES)
def test_release_and_evict_leave_a_module_the_manager_never_packed_alone(mode):
    toy = Toy()
    ref, ptrs = snapshot(toy), storages(toy)
    m = OffloadManager(mode, emulate_device=True)
    assert m.release(toy) is False and m.evict(toy) is False
    assert storages(toy) == ptrs and m.stats.bytes_to_host == 0 and m.stats.host_bytes == 0
    assert_same_state(toy, ref)


def test_overlapping_modules_are_refused():
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy):
        pass
    with pytest.raises(ValueError, match="another managed module"):
        m.prefetch(toy.fc)


@pytest.mark.parametrize("part", ["whole", "submodule"])
def test_a_module_another_manager_packed_is_refused_and_left_as_it_was(part):
    toy = Toy()
    ref_out, ref_state = toy(X), snapshot(toy)
    a = OffloadManager("resident", emulate_device=True)
    b = OffloadManager("offload", emulate_device=True)
    with a.use(toy):
        pass
    target = toy if part == "whole" else toy.fc
    ptrs = storages(toy)
    with a.use(toy):  # also from inside the owner's use
        with pytest.raises(ValueError, match="another OffloadManager manages"):
            b.prefetch(target)
    with pytest.raises(ValueError, match="another OffloadManager manages"):
        with b.use(target):
            pass
    assert storages(toy) == ptrs and b.stats.host_bytes == 0 and not b.is_resident(target)
    with a.use(toy) as used:  # the owner is unaffected
        assert torch.equal(used(X), ref_out)
    a.unregister(toy)  # after which the other manager may take it
    with b.use(target):
        pass
    assert_same_state(toy, ref_state)


def test_a_dropped_manager_held_only_by_a_cycle_does_not_keep_its_modules():
    toy = Toy()
    gc.disable()  # so that only the manager's own check collects the cycle
    try:
        a = OffloadManager("resident", emulate_device=True)
        a.cycle = a
        with a.use(toy):
            pass
        ref = weakref.ref(a)
        del a
        assert ref() is not None
        b = OffloadManager("offload", emulate_device=True)
        with b.use(toy) as used:
            assert torch.equal(used(X), Toy()(X))
        assert ref() is None
    finally:
        gc.enable()


# ----------------------------------------------------------------------------------- no-op on CPU
@pytest.mark.parametrize("mode", MODES)
def test_cpu_device_is_a_noop(mode):
    toy = Toy()
    ref_out, ref_state, ptrs = toy(X), snapshot(toy), [p.data_ptr() for p in toy.parameters()]
    m = OffloadManager(mode, device="cpu")
    assert m.prefetch(toy) is False
    for _ in range(3):
        with m.use(toy) as used:
            assert used is toy
            assert torch.equal(used(X), ref_out)
    assert m.release(toy) is False and m.evict(toy) is False
    assert [p.data_ptr() for p in toy.parameters()] == ptrs  # nothing was packed or copied
    assert_same_state(toy, ref_state)
    s = m.stats
    assert (s.copies, s.bytes_to_device, s.bytes_to_host, s.host_bytes) == (0, 0, 0, 0)


# ------------------------------------------------------------------------------------- mode logic
def test_mode_decisions_with_fake_probe():
    size = 1000
    free = {"bytes": 0}
    probe = lambda: free["bytes"]  # noqa: E731
    assert OffloadManager("resident", margin_bytes=100, memory_probe=probe).would_keep(size)
    assert not OffloadManager("offload", margin_bytes=100, memory_probe=probe).would_keep(size)
    auto = OffloadManager("auto", margin_bytes=100, memory_probe=probe)
    for free_bytes, keep in [(0, False), (1099, False), (1100, False), (1101, True), (10**12, True)]:
        free["bytes"] = free_bytes
        assert auto.would_keep(size) is keep, free_bytes
    assert DEFAULT_MARGIN_BYTES > 0


@pytest.mark.parametrize("mode,free,resident_after", [
    ("resident", 0, True),
    ("offload", 10**15, False),
    ("auto", 10**15, True),
    ("auto", 0, False),
])
def test_residency_after_use(mode, free, resident_after):
    toy = Toy()
    m = OffloadManager(mode, margin_bytes=10, memory_probe=lambda: free, emulate_device=True)
    with m.use(toy):
        assert m.is_resident(toy)
    assert m.is_resident(toy) is resident_after
    s = m.stats
    assert s.copies == 1 and s.bytes_to_device == module_nbytes(toy)
    assert s.releases == (0 if resident_after else 1)


def test_auto_threshold_uses_module_size_plus_margin():
    toy = Toy()
    size, margin = module_nbytes(toy), 64
    free = {"bytes": size + margin}
    m = OffloadManager("auto", margin_bytes=margin, memory_probe=lambda: free["bytes"], emulate_device=True)
    with m.use(toy):
        pass
    assert not m.is_resident(toy)  # exactly size + margin is not "exceeds"
    free["bytes"] = size + margin + 1
    with m.use(toy):
        pass
    assert m.is_resident(toy)


def test_auto_prefetch_skipped_when_it_would_not_fit():
    toy = Toy()
    free = {"bytes": 0}
    m = OffloadManager("auto", margin_bytes=0, memory_probe=lambda: free["bytes"], emulate_device=True)
    assert m.prefetch(toy) is False and not m.is_resident(toy)
    assert m.stats.prefetches_skipped == 1
    free["bytes"] = 10**12
    assert m.prefetch(toy) is True and m.is_resident(toy)
    assert m.prefetch(toy) is True and m.stats.copies == 1  # a second prefetch copies nothing


def test_auto_evicts_idle_module_to_make_room():
    a, b = Toy(0), Toy(1)
    ref_b = b(X)
    size = module_nbytes(a)
    capacity = {"bytes": 10**12}
    m = OffloadManager("auto", margin_bytes=0, emulate_device=True,
                       memory_probe=lambda: capacity["bytes"] - m.stats.resident_bytes)
    with m.use(a):
        pass
    assert m.is_resident(a)
    capacity["bytes"] = size + size // 2  # room for one module, not two
    with m.use(b) as used:
        assert not m.is_resident(a)  # evicted before b was brought in
        assert torch.equal(used(X), ref_b)
    assert m.stats.evictions == 1


def _shrinking():
    """An "auto" manager whose device holds what ``capacity`` says (10**12 bytes until changed)."""
    capacity = {"bytes": 10**12}
    m = OffloadManager("auto", margin_bytes=0, emulate_device=True,
                       memory_probe=lambda: capacity["bytes"] - m.stats.resident_bytes)
    return m, capacity


@pytest.mark.parametrize("steps, victim", [("use a, use b, use a", "b"), ("use a, prefetch b", "a"),
                                           ("use a, use b, prefetch a", "b")])
def test_auto_evicts_the_least_recently_used_module_and_no_more(steps, victim):
    # Two modules resident; c then needs one of them to go: the least recently used (a prefetch counts
    # as a use, whether it copies or finds the module there), and only that one.
    mods = {"a": Toy(0), "b": Toy(1), "c": Toy(2)}
    size = module_nbytes(mods["a"])
    m, capacity = _shrinking()
    for step in steps.split(", "):
        verb, name = step.split()
        if verb == "use":
            with m.use(mods[name]):
                pass
        else:
            assert m.prefetch(mods[name])
    capacity["bytes"] = 2 * size + size // 2  # two modules fit, not three
    with m.use(mods["c"]):
        assert {n for n, mod in mods.items() if m.is_resident(mod)} == {"a", "b", "c"} - {victim}
    assert m.stats.evictions == 1


def test_auto_prefetch_at_exactly_the_room_it_needs_copies():
    toy = Toy()
    m = OffloadManager("auto", margin_bytes=64, emulate_device=True,
                       memory_probe=lambda: module_nbytes(toy) + 64 if not m.is_resident(toy) else 64)
    assert m.prefetch(toy) is True and m.is_resident(toy) and m.stats.prefetches_skipped == 0
    assert m.prefetch(toy) is True  # already there: counted as a prefetch call, copies nothing
    assert m.stats.prefetches == 2 and m.stats.copies == 1


def test_evict_all_keeps_a_module_in_use():
    a, b = Toy(0), Toy(1)
    m = OffloadManager("resident", emulate_device=True)
    with m.use(b):
        pass
    with m.use(a) as used:
        m.evict_all()
        assert m.is_resident(a) and not m.is_resident(b)
        assert torch.equal(used(X), Toy(0)(X))  # still running on its device copy


@pytest.mark.parametrize("mode", ["resident", "auto"])
def test_out_of_memory_on_bring_in_evicts_only_where_the_mode_allows(mode, monkeypatch):
    # "resident" promises to keep what it holds: an allocation failure is the caller's to handle.
    # "auto" frees its idle modules and tries again.
    a, b = Toy(0), Toy(1)
    m = OffloadManager(mode, margin_bytes=0, emulate_device=True, memory_probe=lambda: 10**12)
    with m.use(a):
        pass
    real_empty, failures = torch.empty, []

    def empty_failing_once(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8 and not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("no room")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty_failing_once)
    if mode == "resident":
        with pytest.raises(torch.OutOfMemoryError):
            with m.use(b):
                pass
        assert m.is_resident(a) and not m.is_resident(b) and m.stats.evictions == 0
    else:
        with m.use(b):
            pass
        assert not m.is_resident(a) and m.is_resident(b) and m.stats.evictions == 1


@pytest.mark.parametrize("mode", MODES)
def test_release_follows_mode_and_evict_always_drops(mode):
    toy = Toy()
    free = {"bytes": 10**12}
    m = OffloadManager(mode, margin_bytes=0, memory_probe=lambda: free["bytes"], emulate_device=True)
    assert m.prefetch(toy) and m.is_resident(toy)
    free["bytes"] = 0
    assert m.release(toy) is (mode != "resident")
    assert m.is_resident(toy) is (mode == "resident")
    free["bytes"] = 10**12
    m.prefetch(toy)
    assert m.release(toy) is (mode == "offload")  # "auto" keeps it while memory is plentiful
    assert m.is_resident(toy) is (mode != "offload")
    m.prefetch(toy)
    assert m.evict(toy) is True and not m.is_resident(toy)
    assert m.evict(toy) is False


def test_release_inside_use_is_refused_and_nested_use_works():
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy):
        with pytest.raises(RuntimeError, match="inside manager.use"):
            m.release(toy)
        with m.use(toy) as inner:
            assert torch.equal(inner(X), Toy()(X))
        assert m.is_resident(toy)  # the outer use still holds it
    assert not m.is_resident(toy)


# ----------------------------------------------------------------------------- packing and values
def test_packed_into_one_host_buffer_with_layouts_kept():
    toy = Toy()
    ref = snapshot(toy)
    m = OffloadManager("offload", emulate_device=True)
    m.prefetch(toy)
    m.evict(toy)
    assert len(storages(toy)) == 1  # every parameter and buffer is a view into one buffer
    assert toy.head.weight is toy.fc.weight
    assert toy.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert toy.low.weight.dtype == torch.bfloat16 and toy.ids.dtype == torch.int64
    assert m.stats.host_bytes == module_nbytes(toy)
    assert_same_state(toy, ref)


@pytest.mark.parametrize("mode", MODES)
def test_outputs_and_weights_bit_identical_over_cycles(mode):
    toy = Toy()
    ref_out, ref_state = Toy()(X), snapshot(Toy())
    free = {"bytes": 10**12}
    m = OffloadManager(mode, margin_bytes=0, memory_probe=lambda: free["bytes"], emulate_device=True)
    for i in range(40):
        free["bytes"] = 10**12 if i % 3 else 0  # "auto" alternates between keeping and offloading
        if i % 2:
            m.prefetch(toy)
        with m.use(toy) as used:
            assert torch.equal(used(X), ref_out)
        if i % 5 == 0:
            m.release(toy)
        assert_same_state(toy, ref_state)
    assert toy.head.weight is toy.fc.weight


@pytest.mark.parametrize("mode", MODES)
def test_exception_inside_use_leaves_module_whole(mode):
    toy = Toy()
    ref_out, ref_state = toy(X), snapshot(toy)
    m = OffloadManager(mode, margin_bytes=0, memory_probe=lambda: 0, emulate_device=True)
    with pytest.raises(KeyError):
        with m.use(toy):
            raise KeyError("boom")
    # one consistent place: all tensors on the device copy or all on the host copy
    assert len(storages(toy)) == 1
    assert m.is_resident(toy) is (mode == "resident")
    assert_same_state(toy, ref_state)
    with m.use(toy) as used:
        assert torch.equal(used(X), ref_out)


def fail_allocations(monkeypatch, manager):
    """Every device allocation of ``manager`` raises out-of-memory until ``monkeypatch.undo()``."""
    def oom(slot):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(manager, "_allocate", oom)


def test_failed_bring_in_leaves_module_on_host(monkeypatch):
    toy = Toy()
    ref_out, ref_state = toy(X), snapshot(toy)
    m = OffloadManager("offload", emulate_device=True)
    m.prefetch(toy)
    m.evict(toy)
    host_ptrs = [p.data_ptr() for p in toy.parameters()]

    fail_allocations(monkeypatch, m)
    with pytest.raises(torch.OutOfMemoryError):
        with m.use(toy):
            pass
    assert not m.is_resident(toy)
    assert [p.data_ptr() for p in toy.parameters()] == host_ptrs
    monkeypatch.undo()
    with m.use(toy) as used:
        assert torch.equal(used(X), ref_out)
    assert_same_state(toy, ref_state)


def test_module_moved_behind_the_managers_back_is_detected():
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy):
        pass
    toy.to(torch.float64)
    with pytest.raises(RuntimeError, match="unregister"):
        with m.use(toy):
            pass
    m.unregister(toy)
    assert not m.is_resident(toy)
    with m.use(toy) as used:  # packed afresh, in its new dtype
        assert used.fc.weight.dtype == torch.float64 and m.is_resident(toy)
        assert torch.equal(used.fc.weight, Toy().fc.weight.double())


@pytest.mark.parametrize("change", ["cast_one_submodule", "replace_a_parameter", "add_a_buffer"])
def test_any_change_behind_the_managers_back_is_refused_not_undone(change):
    """Not only the first tensor: a submodule cast on its own, a Parameter replaced (as by
    load_state_dict(assign=True)) or a tensor added would be undone or lost by the next use."""
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with m.use(toy):
        pass
    if change == "cast_one_submodule":
        toy.low.float()  # not the module's first tensor
    elif change == "replace_a_parameter":
        toy.low.weight = nn.Parameter(torch.ones(4, 8, dtype=torch.bfloat16), requires_grad=False)
    else:
        toy.register_buffer("extra", torch.ones(2))
    with pytest.raises(RuntimeError, match="after the offload manager packed it.*unregister"):
        with m.use(toy):
            pass
    with pytest.raises(RuntimeError, match="after the offload manager packed it"):
        m.prefetch(toy)
    m.unregister(toy)  # as the message says: the change stays
    if change == "cast_one_submodule":
        assert toy.low.weight.dtype == torch.float32
    elif change == "replace_a_parameter":
        assert torch.equal(toy.low.weight, torch.ones(4, 8, dtype=torch.bfloat16))
    with m.use(toy) as used:  # packed afresh, with the change
        if change == "cast_one_submodule":  # (Toy's forward feeds that layer bf16: not run)
            assert used.low.weight.dtype == torch.float32 and m.is_resident(toy)
        else:
            assert torch.isfinite(used(X)).all()


@pytest.mark.parametrize("how", ["unregister", "evict_all", "auto_eviction"])
def test_a_module_moved_while_resident_keeps_its_move(how):
    """A resident module the user moved is not re-pointed at the manager's host copy by unregister;
    evicting it (by evict_all, or to make room) is refused instead of undoing the move."""
    toy, other = Toy(), Toy(seed=1)
    free = [10**12]
    m = OffloadManager("resident" if how != "auto_eviction" else "auto", emulate_device=True,
                       margin_bytes=0, memory_probe=lambda: free[0])
    with m.use(toy):
        pass
    assert m.is_resident(toy)
    toy.double()
    if how == "unregister":
        m.unregister(toy)
        assert toy.fc.weight.dtype == torch.float64 and toy.low.weight.dtype == torch.float64
        return
    free[0] = 0  # "auto" must now evict toy to bring in the other module
    with pytest.raises(RuntimeError, match="after the offload manager packed it"):
        if how == "evict_all":
            m.evict_all()
        else:
            with m.use(other):
                pass
    assert toy.fc.weight.dtype == torch.float64


def test_tensors_of_a_collected_module_can_join_a_new_one():
    import gc

    lin = nn.Linear(4, 4).requires_grad_(False)
    m = OffloadManager("offload", emulate_device=True)
    a = nn.Sequential(lin)
    with m.use(a):
        pass
    del a
    gc.collect()
    with m.use(nn.Sequential(lin)) as b:  # its old owner is gone: not "another managed module"
        assert b(torch.ones(1, 4)).shape == (1, 4)
    assert len(m._owned) == 2  # the collected owner's entries were pruned, not kept


def test_a_prefetch_the_device_has_no_room_for_is_skipped_not_raised(monkeypatch):
    """Prefetching the encoder inside use(vae) must not turn a fit into an out-of-memory error."""
    vae, enc = Toy(), Toy(seed=1)
    m = OffloadManager("offload", emulate_device=True)
    real_empty = torch.empty

    def capped(*args, **kwargs):  # room for one module's copy at a time
        if kwargs.get("dtype") is torch.uint8 and len(args) == 1 and len([s for s in m._slots.values()
                                                                          if s.device_buf is not None]) >= 1:
            raise torch.OutOfMemoryError("emulated: no room for a second module")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", capped)
    with m.use(vae):
        assert m.prefetch(enc) is False
    assert m.stats.prefetches_skipped == 1
    with m.use(enc) as used:  # one after the other fits
        assert torch.isfinite(used(X)).all()


# ------------------------------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_host_memory_growth_over_200_cycles():
    big = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512)).requires_grad_(False)  # ~4 MiB
    size = module_nbytes(big)
    x = torch.rand(2, 512)
    m = OffloadManager("offload", emulate_device=True)

    def cycle():
        m.prefetch(big)
        with m.use(big) as used:
            used(x)

    for _ in range(20):  # warm up allocator caches before measuring
        cycle()
    gc.collect()
    tracemalloc.start()
    rss0 = _rss_bytes()
    py0 = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        cycle()
    gc.collect()
    py_growth = tracemalloc.get_traced_memory()[0] - py0
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss0
    # A leaked copy per cycle would grow RSS by 200 x size; the allocator's caching moves it by a
    # couple of copies either way, so the bound sits far from both.
    assert rss_growth < 10 * size, (rss_growth, size)
    assert py_growth < 64 * 1024, py_growth
    s = m.stats
    assert s.copies == 220 and s.releases == 220 and s.resident_bytes == 0


def test_module_collected_frees_manager_state():
    m = OffloadManager("offload", emulate_device=True)
    toy = Toy()
    with m.use(toy):
        pass
    assert m.stats.host_bytes > 0
    del toy
    gc.collect()
    assert m.stats.host_bytes == 0


# --------------------------------------------------------------------------------------------- GPU
def _mlp(width, depth, seed):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).requires_grad_(False).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_matches_resident_module(mode):
    net = _mlp(1024, 8, 0)
    x = torch.randn(64, 1024, device="cuda")
    ref = _mlp(1024, 8, 0).cuda()(x)
    m = OffloadManager(mode)
    for _ in range(5):
        m.prefetch(net)
        with m.use(net) as used:
            assert next(used.parameters()).is_cuda
            out = used(x)
        m.release(net)
        assert torch.equal(out, ref)
    s = m.stats
    assert s.pinning == "registered"
    assert m._slots[net].host.is_pinned()
    assert s.bytes_to_device >= module_nbytes(net)


@pytest.mark.gpu
def test_gpu_peak_memory_lower_by_about_a_module():
    a, b = _mlp(2048, 16, 1), _mlp(2048, 16, 2)  # 256 MiB each in fp32
    size = module_nbytes(a)
    x = torch.randn(16, 2048, device="cuda")

    def step(m):
        m.prefetch(a)
        with m.use(a):
            y = a(x)
        m.release(a)
        with m.use(b):
            y = b(y)
        m.release(b)
        return y

    peaks, outs = {}, {}
    for mode in ("resident", "offload"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()  # no module weights on the device yet
        m = OffloadManager(mode)
        step(m)  # first step packs and warms up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        outs[mode] = step(m)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        m.evict_all()
        m.unregister(a)
        m.unregister(b)
        torch.cuda.synchronize()
    assert torch.equal(outs["resident"], outs["offload"])
    saved = peaks["resident"] - peaks["offload"]
    assert saved > 0.9 * size, (peaks, size)


@pytest.mark.gpu
def test_gpu_no_race_with_busy_compute_stream():
    # Two modules of one size: b's copy lands in the block a just freed, while the compute stream is
    # still busy with a's kernels; a missing wait would corrupt a's queued work or b's weights.
    a, b = _mlp(1024, 4, 3), _mlp(1024, 4, 4)
    x = torch.randn(256, 1024, device="cuda")
    ref_a, ref_b = _mlp(1024, 4, 3).cuda()(x), _mlp(1024, 4, 4).cuda()(x)
    busy = torch.randn(4096, 4096, device="cuda")
    m = OffloadManager("offload")
    outs = []
    for i in range(60):
        for _ in range(4):
            busy = torch.tanh(busy @ busy * 1e-3)  # keep the compute stream ahead of the copies
        m.prefetch(a)
        with m.use(a):
            ya = a(x)
        m.prefetch(b)
        with m.use(b):
            yb = b(x)
        outs.append((ya, yb))
    torch.cuda.synchronize()
    for ya, yb in outs:
        assert torch.equal(ya, ref_a) and torch.equal(yb, ref_b)
    assert m.stats.pending_copies == 0 and m.stats.copy_seconds > 0


def test_a_change_made_inside_a_failing_use_is_kept_and_still_reported():
    """The body raised, so leaving use() must not raise over it: the changed tensor keeps the user's
    data, the rest goes back to the host copy, and the next use reports the change."""
    toy = Toy()
    m = OffloadManager("offload", emulate_device=True)
    with pytest.raises(KeyError):
        with m.use(toy):
            mine = toy.low.weight.data.clone()  # same dtype, the user's own storage
            toy.low.weight.data = mine
            raise KeyError("the body's own error")
    assert toy.low.weight.data_ptr() == mine.data_ptr() and not m.is_resident(toy)
    with pytest.raises(RuntimeError, match="tensor 'low.weight' was moved or cast"):
        with m.use(toy):
            pass


def test_a_change_made_inside_a_use_is_reported_as_it_ends_and_the_device_copy_goes():
    toy = Toy()
    low_bias = toy.low.bias.detach().clone()
    m = OffloadManager("offload", emulate_device=True)
    with pytest.raises(RuntimeError, match="tensor 'low.weight' was moved or cast.*unregister"):
        with m.use(toy):
            toy.low.weight.data = toy.low.weight.data.double()
    # nothing left behind: no device copy, the user's change kept
    assert not m.is_resident(toy) and m.stats.resident_bytes == 0
    assert toy.low.weight.dtype == torch.float64 and torch.equal(toy.low.bias, low_bias)
    m.unregister(toy)
    with m.use(toy) as used:  # packed afresh, with the change
        assert used.low.weight.dtype == torch.float64 and m.is_resident(toy)


def test_a_module_whose_hooks_move_or_cast_its_weights_is_refused_untouched():
    import types

    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval().requires_grad_(False)
    vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    ptrs = [t.data_ptr() for t in vae.parameters()]
    m = OffloadManager("offload", emulate_device=True)
    with pytest.raises(ValueError, match="module AutoencoderKLWan: submodule 'encoder.conv_in' carries "
                                         "diffusers' 'layerwise_casting' hook.*cannot manage"):
        with m.use(vae):
            pass
    assert [t.data_ptr() for t in vae.parameters()] == ptrs and m.stats.host_bytes == 0

    toy = Toy()
    toy.low._diffusers_hook = types.SimpleNamespace(hooks={"fbc_block_hook": object()})  # a cache: weights kept
    with m.use(toy):
        pass
    m.unregister(toy)
    del toy.low._diffusers_hook
    toy._hf_hook = types.SimpleNamespace()  # an accelerate-style hook on the module itself
    with pytest.raises(ValueError, match="module Toy: the module carries accelerate's SimpleNamespace"):
        m.prefetch(toy)
    del toy._hf_hook
    with m.use(toy):  # packed
        pass
    toy.low._hf_hook = types.SimpleNamespace()  # added after the packing: refused at the next use
    with pytest.raises(RuntimeError, match="a hook that moves or casts weights was added .*submodule 'low'"):
        with m.use(toy):
            pass
