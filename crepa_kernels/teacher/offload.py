"""Keep frozen teacher modules (DINOv2, the video VAE) in CPU RAM between uses, on the GPU while used.

`OffloadManager` moves whole frozen modules between one persistent pinned host copy and the compute
device. The three modes:

- ``"resident"``: a module stays on the device after its first use (the manager only packs it once).
- ``"offload"``: a module goes back to RAM as soon as its last ``use`` ends.
- ``"auto"``: a module stays while the free device memory (the driver's free memory plus what
  PyTorch's caching allocator holds unused) exceeds the module's size plus ``margin_bytes``, and goes
  back otherwise. Bringing a module in first evicts idle resident ones when memory is short, and
  a prefetch that would not fit is skipped (the copy then happens at ``use``).

How it works, and why:

- Host copy: on first contact every parameter and buffer of the module is packed into one flat
  page-locked byte buffer (tensors are views into it, 256-byte aligned, dense layouts kept; tied
  weights stay one tensor). The buffer is an anonymous mapping registered with the driver at its
  page-rounded size, avoiding the power-of-two rounding PyTorch's pinned allocator applies (up to
  2x for a 4.5 GB DINOv2-g). Releasing a module re-points its tensors at these views: nothing is
  ever copied back, because the modules are frozen (trainable parameters are refused).
- Device copy: one flat device buffer per module, filled by a single host-to-device copy on a
  side stream. The buffer is allocated on the stream that is current at the prefetch (the compute
  stream); the side stream first waits for that stream (the block may be memory the compute stream
  has just freed), and every stream that uses the module waits for the copy's event. On release the
  allocating stream waits for the copy and for an event recorded on each stream that used the
  module, then the buffer is dropped. The caching allocator only reuses a block for work that is
  queued after that point on the allocating stream, so the storage outlives its last use without
  ``record_stream`` and without the host ever waiting; and freed weights are at once reusable by
  the compute stream (activations, the next module), which a side-stream pool would not allow.
- On a machine without CUDA (or ``device="cpu"``) every mode is a no-op: ``use`` yields the module
  untouched. ``emulate_device=True`` runs the real bookkeeping (packing, copies into fresh CPU
  buffers, re-pointing) on the CPU so it can be tested without a GPU.

Intended order in a CREPA teacher step (``m`` a manager, ``vae`` and ``dino`` frozen modules)::

    m.prefetch(vae)                  # early, e.g. before the DiT forward: the copy overlaps it
    try:
        with m.use(vae):
            m.prefetch(dino)         # before launching the decode, so the copy overlaps it
            frames = decode(vae, latents)  # leaving use() releases the VAE (per the mode) before DINOv2 runs
        with m.use(dino):
            features = encode(dino, frames)
    except BaseException:
        m.release(dino)              # a failed step (anywhere) hands the prefetched copy back per the mode
        raise

``release`` follows the mode (a no-op in ``"resident"``); ``evict`` always drops the device copy.
Both leave a module the manager has not packed untouched.

The modules must stay frozen while managed: anything written into their tensors while the device
copy is in use (an in-place weight load, running statistics) is lost when the copy is dropped.
Load weights before the manager first sees a module, or ``unregister`` it first; a module with
running statistics (batch norm) is refused while in training mode. A module changed behind the
manager's back (any tensor moved or cast, e.g. by ``.to()`` or ``.float()`` on a submodule, or
replaced, added or removed, e.g. by ``load_state_dict(assign=True)``) is refused at its next use,
prefetch, release or eviction, since the manager would undo or lose the change (a change made
inside ``use`` is reported as the use ends where the mode drops the device copy then, which goes
all the same; where the mode keeps it, at the next use); ``unregister``
keeps the change, and the next use packs the module afresh. For the same reason a module carrying
a hook that moves or casts its weights at each forward (diffusers' layerwise casting or group
offloading, accelerate's CPU offload) is refused.
The ``"auto"`` rule counts the module's own bytes as used, so a module stays only when a second
copy of it (the next module, activations) would still fit with the margin to spare.
Prefetching DINOv2 while the VAE decodes keeps both weight sets on the device during the decode;
when memory is that tight, skip that prefetch (``"auto"`` does so by itself, and a prefetch the
device has no memory for is skipped in every mode) and the peak is the larger of the two steps, not
their sum. The manager is not thread-safe: use one per process. A module (or any part of it) belongs
to one manager at a time: another live manager refuses it until the first unregisters it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import mmap
import sys
import weakref
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..config import OFFLOAD_MODES  # one list of modes for the config key and the manager

__all__ = ["OFFLOAD_MODES", "DEFAULT_MARGIN_BYTES", "OffloadStats", "OffloadManager", "module_nbytes",
           "is_managed"]

DEFAULT_MARGIN_BYTES = 2 * 1024**3  # room left for activations when "auto" decides to keep a module
_ALIGN = 256  # byte alignment of each tensor inside the packed buffers (vectorised loads, cuBLAS)
_PAGE = mmap.PAGESIZE

DeviceLike = Union[str, int, torch.device, None]
_MANAGERS: "weakref.WeakSet[OffloadManager]" = weakref.WeakSet()  # every live manager


def is_managed(module: nn.Module) -> bool:
    """Whether a live OffloadManager has packed ``module`` (its tensors are views of the manager's
    buffers: replacing or freeing them behind its back would not free or change anything)."""
    return any(module in m._slots for m in list(_MANAGERS))


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _dense_layout(t: torch.Tensor) -> bool:
    """Dense layouts we can recreate with `as_strided` over exactly numel elements."""
    if t.is_contiguous():
        return True
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _module_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Unique parameters then buffers (tied weights appear once)."""
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []
    named = itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def _weight_hook(module: nn.Module) -> Optional[str]:
    """A hook that moves or casts ``module``'s weights at each forward, described, or None: diffusers'
    hooks (layerwise casting, group offloading) and accelerate's (model CPU offload). Each rewrites
    the tensors the manager packs, so the two cannot manage one module."""
    for name, m in module.named_modules():
        found = _hook_on(m)
        if found is not None:
            return f"{f'submodule {name!r}' if name else 'the module'} carries {found}"
    return None


# diffusers hooks that rewrite a module's weights at each forward (its caching hooks and others leave
# them alone): layerwise casting, group offloading and its lazy prefetch
_DIFFUSERS_WEIGHT_HOOKS = ("layerwise_casting", "group_offloading")


def _hook_on(m: nn.Module) -> Optional[str]:
    # plain attributes, looked up in the instance dict (nn.Module's __getattr__ is slow on a miss)
    registry = m.__dict__.get("_diffusers_hook")
    for name in getattr(registry, "hooks", None) or ():
        if isinstance(name, str) and any(kind in name for kind in _DIFFUSERS_WEIGHT_HOOKS):
            return f"diffusers' {name!r} hook"
    hook = m.__dict__.get("_hf_hook")
    return None if hook is None else f"accelerate's {type(hook).__name__}"


def module_nbytes(module: nn.Module) -> int:
    """Bytes the packed copy of `module` takes (its unique parameters and buffers, aligned)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    total = 0
    for _, t in _module_tensors(module):
        total = _round_up(total + t.numel() * t.element_size(), _ALIGN)
    return total


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """A snapshot of what the manager moved. Copy time counts completed copies only."""

    bytes_to_device: int  # host-to-device bytes enqueued
    copies: int  # host-to-device copies enqueued (one per module bring-in)
    copy_seconds: float  # summed duration of the completed copies (CUDA events on the copy stream)
    pending_copies: int  # copies whose time is not known yet (still in flight)
    bytes_to_host: int  # bytes read into the host copies when modules were first packed
    prefetches: int
    prefetches_skipped: int  # prefetches skipped for lack of memory ("auto"'s margin, or out of memory)
    releases: int  # device copies dropped (by policy, release or evict)
    evictions: int  # of those, dropped to make room for another module
    resident_modules: int  # managed modules whose device copy exists now
    resident_bytes: int
    host_bytes: int  # packed host copies held
    pinning: str  # how host copies are page-locked: "registered", "torch", "none" or "n/a"


@dataclasses.dataclass(eq=False)
class _Entry:
    name: str
    tensor: torch.Tensor  # the module's own Parameter / buffer object, re-pointed in place
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: Optional[tuple[int, ...]]  # None: packed contiguous
    offset: int  # byte offset in the packed buffer
    nbytes: int


@dataclasses.dataclass(eq=False)
class _Slot:
    """Per-module state: the packed host copy and, while resident, its device copy."""

    name: str
    entries: list[_Entry]
    nbytes: int
    host: torch.Tensor  # flat uint8, page-locked when a GPU is present
    host_views: list[torch.Tensor]
    device_buf: Optional[torch.Tensor] = None
    ready: Optional[object] = None  # CUDA event recorded after the copy
    alloc_stream: Optional[object] = None
    use_streams: list = dataclasses.field(default_factory=list)
    in_use: int = 0
    last_used: int = 0
    # data_ptr of every entry as the manager last pointed it, to notice tensors moved or cast behind its back
    expected_ptrs: list = dataclasses.field(default_factory=list)
    module: Optional[weakref.ref] = None  # to notice tensors replaced (e.g. load_state_dict(assign=True))
    ids: frozenset = frozenset()  # id() of every packed tensor object
    # weak references to the submodules that track running stats (the module itself may be one, and
    # the slot must not keep its own key alive)
    stat_modules: list = dataclasses.field(default_factory=list)
    finalizer: Optional[weakref.finalize] = None


def _release_slot(ptr: Optional[int], copy_stream=None) -> None:
    """Run as a slot goes (collected with its module, or unregistered), before its buffers are freed:
    a copy still in flight (a prefetch never used) ends first, since it reads the host pages and writes
    the device block; then the host pages are unregistered (``ptr``: registered pinning)."""
    try:  # at interpreter exit the driver may already be gone; nothing useful to report then
        if copy_stream is not None:
            copy_stream.synchronize()
        if ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:
        pass


def _alloc_host(nbytes: int, pin: bool) -> tuple[torch.Tensor, Optional[int], str]:
    """A flat uint8 host buffer of exactly `nbytes`; page-locked when `pin`.

    Returns (buffer, registered pointer or None, pinning kind).
    """
    # Anonymous mmap: page-aligned, rounded to a page (not to a power of two), and its own pages,
    # so a registration never overlaps another. The tensor's storage starts at the mapping, which
    # is what `Tensor.is_pinned()` and the copy engine look at.
    size = _round_up(max(nbytes, 1), _PAGE)
    if hasattr(mmap, "MAP_PRIVATE"):  # private anonymous memory (Python's default is shared)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:  # pragma: no cover - Windows
        mapping = mmap.mmap(-1, size)
    host = torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive
    if not pin:
        return host[:nbytes], None, "none"
    try:
        cudart = torch.cuda.cudart()
        err = int(cudart.cudaHostRegister(host.data_ptr(), size, 0))
        if err == 0:
            return host[:nbytes], host.data_ptr(), "registered"
        getattr(cudart, "cudaGetLastError", lambda: None)()  # do not leave the error for torch to find
    except Exception:
        pass
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None, "torch"
    except Exception:
        return host[:nbytes], None, "none"


class OffloadManager:
    """Moves frozen modules between a pinned host copy and the compute device (see the module doc).

    Args:
        mode: ``"resident"``, ``"offload"`` or ``"auto"`` (the ``crepa_offload`` config key).
        device: the compute device; default the current CUDA device, else the CPU (no-op).
        margin_bytes: memory ``"auto"`` keeps free beyond a module's size.
        memory_probe: zero-argument callable returning the free device bytes; default the driver's
            free memory plus the caching allocator's reserved-but-unallocated bytes.
        emulate_device: run the offload bookkeeping with CPU buffers (testing without a GPU).
    """

    def __init__(
        self,
        mode: str = "auto",
        device: DeviceLike = None,
        margin_bytes: int = DEFAULT_MARGIN_BYTES,
        *,
        memory_probe: Optional[Callable[[], int]] = None,
        emulate_device: bool = False,
    ) -> None:
        if not isinstance(mode, str) or mode not in OFFLOAD_MODES:
            raise ValueError(f"mode (crepa_offload): got {mode!r}, expected one of {', '.join(OFFLOAD_MODES)}")
        if isinstance(margin_bytes, bool) or not isinstance(margin_bytes, int) or margin_bytes < 0:
            raise ValueError(f"margin_bytes: got {margin_bytes!r}, expected a non-negative int")
        if memory_probe is not None and not callable(memory_probe):
            raise TypeError(f"memory_probe: got {type(memory_probe).__name__}, expected a callable returning free bytes")
        if not isinstance(emulate_device, bool):
            raise TypeError(f"emulate_device: got {emulate_device!r}, expected a bool")
        self.mode = mode
        self.margin_bytes = margin_bytes
        self.device = self._resolve_device(device, emulate_device)
        self._cuda = self.device.type == "cuda"
        self._emulate = emulate_device
        self._active = self._cuda or emulate_device  # False: every call is a no-op
        self._probe = memory_probe if memory_probe is not None else self._default_probe
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._slots: "weakref.WeakKeyDictionary[nn.Module, _Slot]" = weakref.WeakKeyDictionary()
        _MANAGERS.add(self)
        # id(tensor) -> (tensor, its slot), both weak: refuses overlapping modules while the owner lives
        self._owned: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        self._clock = itertools.count(1)
        self._timings: list[tuple[object, object]] = []  # (start, end) events of copies not yet timed
        self._pinning = "registered" if self._cuda else ("none" if emulate_device else "n/a")
        self._n = dict(bytes_to_device=0, copies=0, bytes_to_host=0, prefetches=0, prefetches_skipped=0,
                       releases=0, evictions=0)
        self._copy_seconds = 0.0

    # ----------------------------------------------------------------------------------------- setup
    @staticmethod
    def _resolve_device(device: DeviceLike, emulate: bool) -> torch.device:
        if device is None:
            if torch.cuda.is_available() and not emulate:
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
            raise TypeError(f"device: got {type(device).__name__}, expected a str, int or torch.device")
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: got {device!r}, expected a device such as 'cuda:0' or 'cpu'") from e
        if emulate:
            if dev.type != "cpu":
                raise ValueError(f"device: got {device!r}, but emulate_device=True runs on the CPU")
            return dev
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device: got {device!r}, but CUDA is not available")
            return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        if dev.type != "cpu":
            raise ValueError(f"device: got {device!r}, expected a CUDA device or 'cpu'")
        return dev

    def _default_probe(self) -> int:
        if not self._cuda:
            return sys.maxsize  # no device memory to run out of
        free, _total = torch.cuda.mem_get_info(self.device)  # driver query, no device sync
        unused_cache = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free) + int(unused_cache)

    def free_bytes(self) -> int:
        """Free device memory as the mode logic sees it (the probe's answer)."""
        free = self._probe()
        if isinstance(free, bool) or not isinstance(free, int):
            raise TypeError(f"memory_probe: returned {free!r}, expected an int number of bytes")
        return free

    def _slot_for(self, module: nn.Module) -> Optional[_Slot]:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not self._active:
            return None
        slot = self._slots.get(module)
        if slot is None:
            slot = self._register(module)
            self._slots[module] = slot
        else:
            self._check_unchanged(slot)
        return slot

    @staticmethod
    def _change(slot: _Slot, deep: bool = True) -> Optional[str]:
        """What was changed in a packed module behind the manager's back, or None: a tensor moved or
        cast (its data is no longer the manager's) or, with ``deep``, replaced, added or removed (a
        walk over the module's tensors, about 1 ms for DINOv2-g's 566 on a CPU core)."""
        for e, ptr in zip(slot.entries, slot.expected_ptrs):
            t = e.tensor
            if t.data_ptr() != ptr or t.dtype != e.dtype:
                return f"tensor {e.name!r} was moved or cast"
        module = slot.module() if (deep and slot.module is not None) else None
        if module is not None:
            current = set()
            for m in module.modules():
                current.update(id(t) for t in m._parameters.values() if t is not None)
                current.update(id(t) for t in m._buffers.values() if t is not None)
                if (m.__dict__.get("_diffusers_hook") is not None or m.__dict__.get("_hf_hook") is not None) \
                        and _hook_on(m) is not None:
                    return f"a hook that moves or casts weights was added ({_weight_hook(module)})"
            if current != slot.ids:
                for cname, t in _module_tensors(module):
                    if id(t) not in slot.ids:
                        return f"tensor {cname!r} was replaced or added"
                return "tensors were removed"
        return None

    def _check_unchanged(self, slot: _Slot, deep: bool = True) -> None:
        change = self._change(slot, deep)
        if change is not None:
            raise RuntimeError(
                f"module {slot.name}: {change} after the offload manager packed it (e.g. by .to(), .float() "
                "or load_state_dict(assign=True)); the manager would undo or lose that change. Call "
                "manager.unregister(module) first (it keeps the change), then use the module again"
            )

    def _register(self, module: nn.Module) -> _Slot:
        # tensors of modules collected since (their slots are gone) may join a new module
        for key in [k for k, (t, owner) in self._owned.items() if t() is None or owner() is None]:
            del self._owned[key]
        name = type(module).__name__
        hook = _weight_hook(module)
        if hook is not None:
            raise ValueError(
                f"module {name}: {hook}, which moves or casts its weights at each forward; the offload "
                "manager cannot manage such a module (remove the hook, e.g. skip enable_layerwise_casting "
                "or enable_model_cpu_offload, or leave the module out of the manager)"
            )
        stat_modules = [weakref.ref(m) for m in module.modules() if getattr(m, "track_running_stats", False)]
        self._check_frozen(name, stat_modules)
        tensors = _module_tensors(module)
        for tname, t in tensors:
            if isinstance(t, nn.Parameter) and t.requires_grad:
                raise ValueError(
                    f"module {name}: parameter {tname!r} requires grad; offloading assumes frozen weights "
                    "(call module.requires_grad_(False))"
                )
            if t.layout != torch.strided or t.device.type not in ("cpu", self.device.type):
                raise ValueError(
                    f"module {name}: tensor {tname!r} is {t.layout} on {t.device}; expected dense tensors "
                    f"on the CPU or {self.device}"
                )
            owned = self._owned.get(id(t))
            if owned is not None and owned[0]() is t and owned[1]() is not None:
                raise ValueError(f"module {name}: tensor {tname!r} already belongs to another managed module")
        # nor another live manager's: two managers pointing one tensor at two host copies would each
        # undo the other's moves. A dropped manager that only a reference cycle keeps does not count.
        clash = self._claimed_elsewhere(tensors)
        if clash is not None:
            gc.collect()
            clash = self._claimed_elsewhere(tensors)
        if clash is not None:
            raise ValueError(
                f"module {name}: tensor {clash!r} belongs to a module another OffloadManager manages; one "
                "manager per module (call unregister(module) on the other manager first)"
            )
        entries: list[_Entry] = []
        offset = 0
        for tname, t in tensors:
            nb = t.numel() * t.element_size()
            stride = tuple(t.stride()) if _dense_layout(t) else None
            entries.append(_Entry(tname, t, t.dtype, tuple(t.shape), stride, offset, nb))
            offset = _round_up(offset + nb, _ALIGN)
        nbytes = offset
        host, reg_ptr, pinning = _alloc_host(nbytes, pin=self._cuda)
        if self._cuda and pinning != "registered" and self._pinning != "none":
            self._pinning = pinning  # report the weakest pinning in use
        views = self._views(entries, host)
        with torch.no_grad():
            for e, v in zip(entries, views):
                v.copy_(e.tensor.detach())
        slot = _Slot(name=name, entries=entries, nbytes=nbytes, host=host, host_views=views,
                     stat_modules=stat_modules, module=weakref.ref(module),
                     ids=frozenset(id(e.tensor) for e in entries))
        if self._cuda:
            slot.finalizer = weakref.finalize(slot, _release_slot, reg_ptr, self._copy_stream)
        self._point(slot, views)  # the module's original storage is released here
        owner = weakref.ref(slot)
        for e in entries:
            self._owned[id(e.tensor)] = (weakref.ref(e.tensor), owner)
        self._n["bytes_to_host"] += nbytes
        return slot

    def _claimed_elsewhere(self, tensors: list) -> Optional[str]:
        """The name of the first of `tensors` that another live manager has packed, else None."""
        for mgr in list(_MANAGERS):
            if mgr is self:
                continue
            for tname, t in tensors:
                owned = mgr._owned.get(id(t))
                if owned is not None and owned[0]() is t and owned[1]() is not None:
                    return tname
        return None

    @staticmethod
    def _check_frozen(name: str, stat_modules: list, entries: Optional[list] = None) -> None:
        # entries: a packed module's tensors, checked at every use, since requires_grad_(True) after the
        # packing would have an optimizer update the device copy that is then thrown away
        for e in entries or ():
            if isinstance(e.tensor, nn.Parameter) and e.tensor.requires_grad:
                raise ValueError(
                    f"module {name}: a parameter requires grad again since the offload manager packed it; "
                    "its updates would be lost with the device copy (call module.requires_grad_(False))"
                )
        for ref in stat_modules:
            m = ref()
            if m is not None and m.training:
                raise ValueError(
                    f"module {name}: submodule {type(m).__name__} is in training mode and updates its running "
                    "statistics, which the offload manager would discard with the device copy; call "
                    "module.eval() (managed modules are frozen)"
                )

    # ------------------------------------------------------------------------------------- plumbing
    @staticmethod
    def _views(entries: list[_Entry], flat: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for e in entries:
            typed = flat[e.offset:e.offset + e.nbytes].view(e.dtype)
            views.append(typed.view(e.shape) if e.stride is None else typed.as_strided(e.shape, e.stride))
        return views

    @staticmethod
    def _point(slot: _Slot, views: list[torch.Tensor], only_ours: bool = False) -> None:
        """Point the module's tensors at ``views``; with ``only_ours``, only those whose data is still
        what the manager last gave them (a tensor the user moved or cast keeps the user's data, and the
        change is still reported at the module's next use)."""
        ptrs = []
        for i, (e, v) in enumerate(zip(slot.entries, views)):
            if only_ours and i < len(slot.expected_ptrs) and (
                    e.tensor.data_ptr() != slot.expected_ptrs[i] or e.tensor.dtype != e.dtype):
                ptrs.append(slot.expected_ptrs[i])
                continue
            e.tensor.data = v
            ptrs.append(v.data_ptr())
        slot.expected_ptrs = ptrs

    def _reap_timings(self) -> None:
        # event.query() never blocks; copies still in flight are timed at a later call
        while self._timings and self._timings[0][1].query():
            start, end = self._timings.pop(0)
            self._copy_seconds += start.elapsed_time(end) / 1e3

    def _idle_resident(self, exclude: _Slot) -> list[_Slot]:
        slots = [s for s in self._slots.values() if s is not exclude and s.device_buf is not None and s.in_use == 0]
        return sorted(slots, key=lambda s: s.last_used)  # least recently used first

    def _make_room(self, slot: _Slot) -> None:
        need = slot.nbytes + self.margin_bytes
        if self.free_bytes() >= need:
            return
        for other in self._idle_resident(slot):
            self._drop(other)
            self._n["evictions"] += 1
            if self.free_bytes() >= need:
                return

    def _allocate(self, slot: _Slot) -> torch.Tensor:
        try:
            return torch.empty(slot.nbytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            idle = self._idle_resident(slot)
            if self.mode == "resident" or not idle:
                raise
            for other in idle:
                self._drop(other)
                self._n["evictions"] += 1
            return torch.empty(slot.nbytes, dtype=torch.uint8, device=self.device)

    def _bring_in(self, slot: _Slot) -> None:
        """Start the copy of `slot` to the device (no-op if it is there or on its way)."""
        if slot.device_buf is not None:
            return
        if self.mode == "auto":
            self._make_room(slot)
        # Everything that can fail happens before any state changes: an error leaves the module on the host.
        buf = self._allocate(slot)
        if self._cuda:
            self._reap_timings()
            alloc_stream = torch.cuda.current_stream(self.device)
            side = self._copy_stream
            side.wait_stream(alloc_stream)  # the new block may be memory that queued compute work still reads
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(side):
                start.record(side)
                buf.copy_(slot.host, non_blocking=True)
                end.record(side)
            self._timings.append((start, end))
            slot.ready, slot.alloc_stream = end, alloc_stream
        else:
            buf.copy_(slot.host)
        slot.device_buf = buf
        slot.use_streams = []
        self._point(slot, self._views(slot.entries, buf))
        self._n["bytes_to_device"] += slot.nbytes
        self._n["copies"] += 1

    def _drop(self, slot: _Slot, force: bool = False, keep_changes: bool = False) -> None:
        """Point the module back at its host copy and let the device copy go (no host wait). ``force``:
        also when ordering the release after the streams fails (a failed device runs nothing more).
        A module changed behind the manager's back is refused (its change would be undone), unless
        ``keep_changes`` (or ``force``): then the changed tensors keep the user's data."""
        if slot.device_buf is None:
            return
        if not (force or keep_changes):
            change = self._change(slot, deep=False)  # use() checked the rest when it began
            if change is not None:
                # the device copy goes all the same (the changed tensors keep the user's data), and the
                # change is reported
                self._drop(slot, keep_changes=True)
                self._check_unchanged(slot, deep=False)
        if self._cuda:
            try:
                alloc = slot.alloc_stream
                alloc.wait_event(slot.ready)  # a prefetched, never used copy may still be writing the block
                for s in slot.use_streams:
                    if s != alloc:
                        ev = torch.cuda.Event()
                        ev.record(s)
                        alloc.wait_event(ev)
            except Exception:
                if not force:
                    raise
        self._point(slot, slot.host_views, only_ours=force or keep_changes)
        slot.device_buf = None
        slot.ready = slot.alloc_stream = None
        slot.use_streams = []
        self._n["releases"] += 1

    def _keeps(self, slot: _Slot) -> bool:
        if self.mode == "resident":
            return True
        if self.mode == "offload":
            return False
        return self.free_bytes() > slot.nbytes + self.margin_bytes

    # ------------------------------------------------------------------------------------ public API
    @contextlib.contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        """Yield `module` with its weights on the compute device; afterwards apply the mode."""
        slot = self._slot_for(module)
        if slot is None:
            yield module
            return
        self._check_frozen(slot.name, slot.stat_modules, slot.entries)
        self._bring_in(slot)
        if self._cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(slot.ready)  # the compute stream waits on the copy, the host does not
            if cur not in slot.use_streams:
                slot.use_streams.append(cur)
        slot.in_use += 1
        slot.last_used = next(self._clock)
        body_raised = False
        try:
            yield module
        except BaseException:
            body_raised = True
            raise
        finally:
            slot.in_use -= 1
            if slot.in_use == 0:
                # After a failure in the body (a CUDA error, often sticky: the memory probe and stream calls
                # fail too) the body's exception is the one reported; a failed probe means the copy goes.
                try:
                    keep = self._keeps(slot)
                except Exception:
                    if not body_raised:
                        self._drop(slot, force=True)
                        raise
                    keep = False
                if not keep:
                    self._drop(slot, force=body_raised)

    def prefetch(self, module: nn.Module) -> bool:
        """Start copying `module` to the device now; True if its device copy exists or is on its way.

        In ``"auto"`` mode a prefetch that would leave less than ``margin_bytes`` free is skipped, and in
        every mode one the device has no memory for (counted in ``prefetches_skipped``). A prefetch
        counts as a use for eviction order (least recently used first).
        """
        slot = self._slot_for(module)
        if slot is None:
            return False
        self._check_frozen(slot.name, slot.stat_modules, slot.entries)
        self._n["prefetches"] += 1
        if slot.device_buf is not None:
            slot.last_used = next(self._clock)  # about to be used: the last module to evict
            return True
        if self.mode == "auto" and self.free_bytes() < slot.nbytes + self.margin_bytes:
            self._n["prefetches_skipped"] += 1
            return False
        try:
            self._bring_in(slot)
        except torch.OutOfMemoryError:
            # a prefetch is a hint: where the module fits only after the one in use is dropped, its
            # use() brings it in then (and that is where running out of memory is an error)
            self._n["prefetches_skipped"] += 1
            return False
        slot.last_used = next(self._clock)
        return True

    def _resident_slot(self, module: nn.Module, verb: str) -> Optional["_Slot"]:
        """The slot of a module that has a device copy (None if it has none, or if the manager has not
        packed it: that module is left as it is); refused inside use()."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if module not in self._slots:
            return None
        slot = self._slot_for(module)
        if slot is None or slot.device_buf is None:
            return None
        if slot.in_use:
            raise RuntimeError(f"module {slot.name}: cannot {verb} it inside manager.use()")
        return slot

    def release(self, module: nn.Module) -> bool:
        """Hand `module` back: drop its device copy unless the mode keeps it. True if it was dropped."""
        slot = self._resident_slot(module, "release")
        if slot is None or self._keeps(slot):
            return False
        self._drop(slot)
        return True

    def evict(self, module: nn.Module) -> bool:
        """Drop the device copy of `module` whatever the mode. True if there was one."""
        slot = self._resident_slot(module, "evict")
        if slot is None:
            return False
        self._drop(slot)
        return True

    def evict_all(self) -> None:
        """Drop every idle device copy (modules inside ``use`` stay)."""
        for slot in list(self._slots.values()):
            if slot.in_use == 0:
                self._drop(slot)

    def unregister(self, module: nn.Module) -> None:
        """Forget `module`: it ends on its host copy (plain CPU tensors) and may be moved freely. Tensors
        moved, cast or replaced behind the manager's back keep what the user gave them."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        slot = self._slots.get(module)
        if slot is None:
            return
        if slot.in_use:
            raise RuntimeError(f"module {slot.name}: cannot unregister it inside manager.use()")
        self._drop(slot, keep_changes=True)
        if slot.finalizer is not None:
            slot.finalizer()  # unpinned, the memory stays valid: the module keeps viewing it
        for e in slot.entries:
            owned = self._owned.get(id(e.tensor))
            if owned is not None and owned[1]() is slot:
                del self._owned[id(e.tensor)]
        del self._slots[module]

    def is_resident(self, module: nn.Module) -> bool:
        """True when the device copy of `module` exists (possibly still being copied)."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        slot = self._slots.get(module)
        return slot is not None and slot.device_buf is not None

    def would_keep(self, module_or_nbytes: Union[nn.Module, int]) -> bool:
        """Whether the mode would keep a module of this size on the device after use (probes memory now)."""
        if isinstance(module_or_nbytes, nn.Module):
            nbytes = module_nbytes(module_or_nbytes)
        elif isinstance(module_or_nbytes, int) and not isinstance(module_or_nbytes, bool) and module_or_nbytes >= 0:
            nbytes = module_or_nbytes
        else:
            raise TypeError(f"module_or_nbytes: got {module_or_nbytes!r}, expected an nn.Module or a byte count")
        if self.mode == "resident":
            return True
        if self.mode == "offload":
            return False
        return self.free_bytes() > nbytes + self.margin_bytes

    def synchronize(self) -> None:
        """Wait for copies in flight (for benchmarks and stats; never needed for correctness)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        if self._cuda:
            self._reap_timings()

    @property
    def stats(self) -> OffloadStats:
        if self._cuda:
            self._reap_timings()
        resident = [s for s in self._slots.values() if s.device_buf is not None]
        return OffloadStats(
            bytes_to_device=self._n["bytes_to_device"],
            copies=self._n["copies"],
            copy_seconds=self._copy_seconds,
            pending_copies=len(self._timings),
            bytes_to_host=self._n["bytes_to_host"],
            prefetches=self._n["prefetches"],
            prefetches_skipped=self._n["prefetches_skipped"],
            releases=self._n["releases"],
            evictions=self._n["evictions"],
            resident_modules=len(resident),
            resident_bytes=sum(s.nbytes for s in resident),
            host_bytes=sum(s.host.numel() for s in self._slots.values()),
            pinning=self._pinning,
        )

    def __repr__(self) -> str:
        return (f"OffloadManager(mode={self.mode!r}, device={str(self.device)!r}, margin_bytes={self.margin_bytes}"
                f", modules={len(self._slots)})")
