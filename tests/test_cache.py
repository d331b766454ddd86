"""Tests of FeatureCache: round trip, key sensitivity, atomic writes, concurrent writers, precompute."""
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from crepa_kernels.teacher import cache as cache_mod
from crepa_kernels.teacher.cache import FeatureCache, precompute_features, weights_fingerprint

BASE = dict(encoder_name="vit_giant_patch14_dinov2", encoder_weights="timm/vit_giant_patch14_dinov2.lvd142m@abc",
            image_size=518, num_frames=16, vae="Wan-AI/Wan2.1-T2V-1.3B/vae@def", dtype=torch.float32)


@pytest.fixture
def fc(tmp_path):
    return FeatureCache(tmp_path / "cache")


def temp_files(root):
    return [os.path.join(r, n) for r, _, files in os.walk(root) for n in files if n.endswith(".tmp")]


# -------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(fc, dtype):
    feats = torch.randn(2, 3, 37 * 37, 8).to(dtype)
    fc.put("abc", feats, grid=(37, 37))
    got = fc.get("abc")
    assert got.features.dtype == dtype and torch.equal(got.features, feats)
    assert got.grid == (37, 37)
    features, grid = got  # unpacks as (features, grid)
    assert grid == (37, 37)


def test_round_trip_without_grid_and_non_contiguous(fc):
    feats = torch.arange(24.0).reshape(4, 6).t()  # non-contiguous
    fc.put("k", feats)
    got = fc.get("k")
    assert got.grid is None and torch.equal(got.features, feats)


@pytest.mark.parametrize("device, exc", [(torch.float16, TypeError), (3.0, TypeError), (True, TypeError),
                                          ("gpu0", ValueError)])
def test_get_refuses_what_is_not_a_device(fc, device, exc):
    # Tensor.to would take a dtype (or a float, as float64) for a device and return converted features
    fc.put("k", torch.ones(1, 2, 4, 3), grid=(2, 2))
    with pytest.raises(exc, match="device"):
        fc.get("k", device)
    assert fc.get("k", "cpu").features.dtype == torch.float32
    assert fc.get("k", None).features.device == torch.device("cpu")  # None: where entries are read


def test_an_entry_under_another_keys_name_is_absent_and_computed_again(fc):
    # e.g. a file copied or renamed by hand: its header names its own key, so it serves no other
    import shutil

    fc.put("k1", torch.ones(1, 2, 4, 3), grid=(2, 2))
    os.makedirs(os.path.dirname(fc.path("k2")), exist_ok=True)
    shutil.copy(fc.path("k1"), fc.path("k2"))
    assert "k2" not in fc and "k1" in fc
    res = precompute_features(["k2"], lambda item: (torch.zeros(1, 2, 4, 3), (2, 2)), fc, lambda item: item,
                              progress=False)
    assert (res.computed, res.skipped) == (1, 0)
    assert torch.equal(fc.get("k2").features, torch.zeros(1, 2, 4, 3))


def test_absent_key_and_contains(fc):
    assert fc.get("missing") is None
    assert "missing" not in fc
    fc.put("present", torch.ones(1))
    assert "present" in fc and list(fc.keys()) == ["present"]


def test_put_overwrites(fc):
    fc.put("k", torch.zeros(3))
    fc.put("k", torch.ones(3, 2), grid=(1, 3))
    got = fc.get("k")
    assert torch.equal(got.features, torch.ones(3, 2)) and got.grid == (1, 3)


@pytest.mark.parametrize("cut", [4, 40, -8])
def test_entry_damaged_outside_our_writes_reads_as_absent(fc, cut):
    fc.put("k", torch.ones(100))
    size = os.path.getsize(fc.path("k"))
    with open(fc.path("k"), "r+b") as f:
        f.truncate(cut % size)  # inside the header length, the header, the data
    assert "k" not in fc  # `in` agrees with get: absent, so precompute computes it again
    with pytest.warns(UserWarning, match="unreadable"):
        assert fc.get("k") is None
    res = precompute_features(["x"], lambda item: torch.full((3,), 2.0), fc, lambda item: "k", progress=False)
    assert (res.computed, res.skipped) == (1, 0) and torch.equal(fc.get("k").features, torch.full((3,), 2.0))


# -------------------------------------------------------------------------------------------- keys
def test_key_is_deterministic_hex_and_stable_across_processes():
    k = FeatureCache.make_key("clip_0001.mp4", **BASE)
    assert k == FeatureCache.make_key("clip_0001.mp4", **dict(reversed(list(BASE.items()))))
    assert len(k) == 64 and int(k, 16) >= 0
    code = ("import torch; from crepa_kernels.teacher.cache import FeatureCache as F; "
            f"print(F.make_key('clip_0001.mp4', encoder_name={BASE['encoder_name']!r}, "
            f"encoder_weights={BASE['encoder_weights']!r}, image_size=518, num_frames=16, "
            f"vae={BASE['vae']!r}, dtype=torch.float32))")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == k


@pytest.mark.parametrize("change", [
    dict(sample_id="clip_0002.mp4"),
    dict(sample_id=1),
    dict(encoder_name="vit_large_patch14_dinov2"),
    dict(encoder_weights="timm/vit_giant_patch14_dinov2.lvd142m@abd"),
    dict(image_size=224),
    dict(image_size=(518, 520)),
    dict(num_frames=17),
    dict(frame_index=3),
    dict(vae=None),
    dict(vae="Wan-AI/Wan2.2-TI2V-5B/vae@def"),
    dict(dtype=torch.bfloat16),
    dict(dtype=None),
    dict(extra={"resize": "bicubic"}),
])
def test_key_changes_with_every_setting(change):
    kwargs = dict(BASE)
    sample = change.pop("sample_id", "clip_0001.mp4")
    kwargs.update(change)
    assert FeatureCache.make_key(sample, **kwargs) != FeatureCache.make_key("clip_0001.mp4", **BASE)


def test_key_distinguishes_frame_lists_and_types():
    keys = {
        FeatureCache.make_key("s", **{**BASE, "frame_index": 1}),
        FeatureCache.make_key("s", **{**BASE, "frame_index": [1]}),
        FeatureCache.make_key("s", **{**BASE, "frame_index": [1, 2]}),
        FeatureCache.make_key("s", **{**BASE, "frame_index": [2, 1]}),
        FeatureCache.make_key("1", **BASE),
        FeatureCache.make_key(1, **BASE),
        FeatureCache.make_key("s", **{**BASE, "extra": {"a": 1}}),
        FeatureCache.make_key("s", **{**BASE, "extra": {"a": "1"}}),
        FeatureCache.make_key("s", **{**BASE, "extra": {"a": 1.0}}),
        FeatureCache.make_key("s", **{**BASE, "extra": {"a": "1.0"}}),
        FeatureCache.make_key("s", **{**BASE, "extra": {"a": [1.0]}}),
        FeatureCache.make_key("s", **{**BASE, "extra": {"a": ["1.0"]}}),
    }
    assert len(keys) == 12


def test_one_key_for_the_same_settings_spelled_differently(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights" * 100)
    base = {**BASE, "encoder_weights": str(w), "dtype": torch.bfloat16}
    key = FeatureCache.make_key("s", **base)
    for change in (dict(dtype="bfloat16"), dict(dtype="bf16"), dict(dtype="torch.bfloat16"),
                   dict(encoder_name="dinov2_vitg14"), dict(encoder_name="dinov2-vitg14"),
                   dict(encoder_weights=weights_fingerprint(w)), dict(encoder_weights=w)):
        assert FeatureCache.make_key("s", **{**base, **change}) == key, change
    assert FeatureCache.make_key("s", **{**base, "image_size": (518, 518)}) == key  # a square spelled out
    # ... and still another key for another dtype, model or fingerprint
    assert FeatureCache.make_key("s", **{**base, "dtype": "float32"}) != key
    assert FeatureCache.make_key("s", **{**base, "encoder_name": "dinov2_vitl14"}) != key
    assert FeatureCache.make_key("s", **{**base, "encoder_weights": "sha256:" + "0" * 64}) != key


def test_a_weights_like_string_that_is_no_file_is_keyed_as_an_id_with_a_warning():
    with pytest.warns(UserWarning, match="'/no/such/dinov2.pth' is not a local file"):
        key = FeatureCache.make_key("s", **{**BASE, "encoder_weights": "/no/such/dinov2.pth"})
    with pytest.warns(UserWarning):
        assert key == FeatureCache.make_key("s", **{**BASE, "encoder_weights": "/no/such/dinov2.pth"})
    assert key != FeatureCache.make_key("s", **BASE)


def test_key_follows_weights_file_content_not_path(tmp_path):
    w1, w2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w1.write_bytes(b"weights-v1" * 1000)
    w2.write_bytes(b"weights-v1" * 1000)
    k1 = FeatureCache.make_key("s", **{**BASE, "encoder_weights": str(w1)})
    assert k1 == FeatureCache.make_key("s", **{**BASE, "encoder_weights": w2})  # same bytes, other path
    w1.write_bytes(b"weights-v2" * 1000)  # new content (and mtime) under the same path
    assert FeatureCache.make_key("s", **{**BASE, "encoder_weights": str(w1)}) != k1
    assert weights_fingerprint(w1).startswith("sha256:")


def test_fingerprint_sees_a_rewrite_that_leaves_the_stat_unchanged(tmp_path, monkeypatch):
    # A rewrite within one timestamp tick keeps size and mtime: forced here with utime. A just
    # modified file is not memoised, so the new content is seen; once older it is memoised.
    import hashlib

    def sha(data):
        return "sha256:" + hashlib.sha256(data).hexdigest()

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"a" * 4096)
    before = os.stat(w)
    memoised = len(cache_mod._FINGERPRINTS)
    assert weights_fingerprint(w) == sha(b"a" * 4096)
    w.write_bytes(b"b" * 4096)
    os.utime(w, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights_fingerprint(w) == sha(b"b" * 4096)
    assert len(cache_mod._FINGERPRINTS) == memoised

    now = time.time_ns()
    monkeypatch.setattr(cache_mod.time, "time_ns", lambda: now + 10 ** 10)  # ten seconds on
    assert weights_fingerprint(w) == sha(b"b" * 4096)
    assert len(cache_mod._FINGERPRINTS) == memoised + 1
    expected = sha(b"b" * 4096)
    monkeypatch.setattr(cache_mod.hashlib, "sha256", None)  # a memoised fingerprint hashes nothing
    assert weights_fingerprint(w) == expected


@pytest.mark.parametrize("bad,exc,match", [
    (dict(sample_id=1.5), TypeError, "sample_id"),
    (dict(sample_id=True), TypeError, "sample_id"),
    (dict(encoder_name=""), TypeError, "encoder_name"),
    (dict(encoder_weights=None), TypeError, "encoder_weights"),
    (dict(image_size=0), ValueError, "image_size"),
    (dict(image_size=(518,)), ValueError, "image_size"),
    (dict(num_frames=None, frame_index=None), ValueError, "frame_index / num_frames"),
    (dict(num_frames=0), ValueError, "num_frames"),
    (dict(frame_index=-1), ValueError, "frame_index"),
    (dict(vae=3), TypeError, "vae"),
    (dict(dtype="auto"), ValueError, "dtype: got 'auto'.*resolve 'auto' first"),
    (dict(dtype="float33"), ValueError, "dtype: got 'float33'"),
    (dict(dtype=3), TypeError, "dtype"),
    (dict(extra=[("a", 1)]), TypeError, "extra"),
    (dict(extra={"a": object()}), TypeError, "extra"),
])
def test_make_key_rejects_bad_inputs(bad, exc, match):
    kwargs = dict(BASE)
    sample = bad.pop("sample_id", "s")
    kwargs.update(bad)
    with pytest.raises(exc, match=match):
        FeatureCache.make_key(sample, **kwargs)


@pytest.mark.parametrize("key,exc", [(12, TypeError), (b"ab", TypeError), ("", ValueError), ("a/b", ValueError),
                                     ("../x", ValueError), (".hidden", ValueError), ("x.tmp", ValueError),
                                     ("x" * 201, ValueError)])
def test_bad_keys(fc, key, exc):
    with pytest.raises(exc, match="key"):
        fc.put(key, torch.ones(1))
    with pytest.raises(exc, match="key"):
        fc.get(key)


def test_bad_put_arguments(fc, tmp_path):
    with pytest.raises(TypeError, match="features.*torch.Tensor"):
        fc.put("k", [1.0, 2.0])
    with pytest.raises(ValueError, match="features"):
        fc.put("k", torch.ones(2, 2).to_sparse())
    for grid in [(0, 3), (3,), "37x37", (1.5, 2)]:
        with pytest.raises(ValueError, match="grid"):
            fc.put("k", torch.ones(1), grid=grid)
    # a grid that does not describe the token axis: read back, it would fail in every loss call
    with pytest.raises(ValueError, match=r"grid: \(3, 3\) describes 9 tokens.*\(2, 16, 8\) hold 16"):
        fc.put("k", torch.ones(2, 16, 8), grid=(3, 3))
    with pytest.raises(ValueError, match="no token axis"):
        fc.put("k", torch.ones(9), grid=(3, 3))
    with pytest.raises(TypeError, match="directory"):
        FeatureCache(42)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="directory"):
        FeatureCache(f)
    assert fc.get("k") is None  # nothing was written by the failed puts


# ---------------------------------------------------------------------------------- atomic writes
def test_torn_write_leaves_no_readable_entry(fc, monkeypatch):
    fc.put("k", torch.zeros(1000))  # an older complete version
    real_fsync = os.fsync

    def die_mid_write(fd):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)  # half the bytes reached the disk
        raise OSError("simulated crash")

    monkeypatch.setattr(cache_mod.os, "fsync", die_mid_write)
    monkeypatch.setattr(cache_mod.os, "unlink", lambda p: None)  # a dead process cleans nothing up
    with pytest.raises(OSError, match="simulated"):
        fc.put("k", torch.ones(1000))
    with pytest.raises(OSError, match="simulated"):
        fc.put("new", torch.ones(1000))
    monkeypatch.setattr(cache_mod.os, "fsync", real_fsync)
    monkeypatch.undo()
    leftovers = temp_files(fc.directory)
    assert len(leftovers) == 2 and all(os.path.getsize(p) > 0 for p in leftovers)
    assert torch.equal(fc.get("k").features, torch.zeros(1000))  # old version intact
    assert fc.get("new") is None and "new" not in fc
    assert sorted(fc.keys()) == ["k"]
    assert fc.cleanup_temp(max_age_s=3600) == 0  # young temp files may belong to live writers
    assert fc.cleanup_temp(max_age_s=0) == 2 and temp_files(fc.directory) == []
    fc.put("new", torch.ones(1000))
    assert torch.equal(fc.get("new").features, torch.ones(1000))


class _ReopeningReader:
    """Stands in for safetensors.safe_open, reading the tensor through a second open by name (as the
    library may); ``between`` runs once between the header and the tensor reads, like a writer
    whose rename lands there."""

    def __init__(self, real, between):
        self.real, self.between, self.reads = real, between, 0

    def __call__(self, path, framework):
        outer = self

        class Handle:
            def __enter__(self):
                self.h = outer.real(path, framework=framework).__enter__()
                return self

            def __exit__(self, *exc):
                return self.h.__exit__(*exc)

            def metadata(self):
                return self.h.metadata()

            def keys(self):
                return self.h.keys()

            def get_tensor(self, name):
                outer.reads += 1
                if outer.reads == 1:
                    outer.between()
                with outer.real(path, framework=framework) as again:
                    return again.get_tensor(name)

        return Handle()


def _reader(monkeypatch, between, every_attempt=False):
    """Install a _ReopeningReader as safe_open; ``every_attempt``: ``between`` runs in each read
    attempt, not only the first."""
    import safetensors

    reader = _ReopeningReader(safetensors.safe_open, between)

    def each_attempt(path, framework):
        reader.reads = 0
        return reader(path, framework)

    monkeypatch.setattr(safetensors, "safe_open", each_attempt if every_attempt else reader)
    return reader


def _rename_then_fail(fc, features, grid, message):
    """A writer's rename landing mid-read, after which safetensors raises ``message``; ``features``:
    a tensor, or a callable giving each write's tensor."""
    def between():
        fc.put("k", features() if callable(features) else features, grid=grid)
        raise RuntimeError(message)
    return between


def test_a_rename_during_a_read_does_not_mix_two_versions(fc, monkeypatch):
    fc.put("k", torch.zeros(1, 64), grid=(1, 1))
    reader = _reader(monkeypatch, lambda: fc.put("k", torch.ones(4, 16), grid=(2, 2)))
    got = fc.get("k")
    # the first read paired the old grid (1, 1) with the new features; that was seen and read again
    assert reader.reads == 2
    assert got.grid == (2, 2) and torch.equal(got.features, torch.ones(4, 16))


def test_a_read_that_fails_because_of_a_rename_is_read_again(fc, monkeypatch):
    # safetensors checks the header's sizes against the file it maps: paired with a version of
    # another size, it raises. The rename explains the error: no warning, the new version is read.
    fc.put("k", torch.zeros(1, 64), grid=(1, 1))
    reader = _reader(monkeypatch, _rename_then_fail(fc, torch.ones(8, 64), (2, 4),
                                                    "file size is smaller than the required mapping size"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fc.get("k")
    assert reader.reads == 2
    assert got.grid == (2, 4) and torch.equal(got.features, torch.ones(8, 64))


def test_a_read_error_without_a_rename_is_damage(fc, monkeypatch):
    fc.put("k", torch.zeros(1, 64), grid=(1, 1))

    def fail():
        raise RuntimeError("bad storage")

    reader = _reader(monkeypatch, fail)
    with pytest.warns(UserWarning, match=r"unreadable entry .*\(bad storage\); treating it as absent"):
        assert fc.get("k") is None
    assert reader.reads == 1  # not read again: the file did not move


def test_an_entry_replaced_and_failing_during_every_read_names_the_last_error(fc, monkeypatch):
    fc.put("k", torch.zeros(1, 64), grid=(1, 1))
    versions = iter(range(1, 10**6))
    _reader(monkeypatch, _rename_then_fail(fc, lambda: torch.full((1, 64), float(next(versions))), (1, 1),
                                           "mapping size mismatch"), every_attempt=True)
    with pytest.warns(UserWarning, match=r"replaced during each of 8 reads \(the last read failed: mapping size "
                                         r"mismatch\); treating it as absent"):
        assert fc.get("k") is None


def test_an_entry_replaced_during_every_read_reads_as_absent(fc, monkeypatch):
    fc.put("k", torch.zeros(1, 64), grid=(1, 1))
    versions = iter(range(1, 10**6))
    # a writer lands between the header and the tensor reads of every attempt
    _reader(monkeypatch, lambda: fc.put("k", torch.full((1, 64), float(next(versions))), grid=(1, 1)),
            every_attempt=True)
    with pytest.warns(UserWarning, match="replaced during each of 8 reads; treating it as absent"):
        assert fc.get("k") is None
    monkeypatch.undo()
    assert fc.get("k").features[0, 0].item() == 8.0  # the entry itself is whole: the last version written


def test_failed_write_cleans_its_temp_file(fc, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fc.put("k", torch.ones(10))
    monkeypatch.undo()
    assert temp_files(fc.directory) == [] and fc.get("k") is None


def test_a_temp_file_removed_mid_write_by_another_cleanup_is_written_again(fc, monkeypatch):
    # Another process's cleanup_temp(max_age_s=0) removes this writer's temp file between its write and
    # its rename: the entry is written again, whole, and no temp file stays.
    real, removed = cache_mod.os.replace, []

    def replace(src, dst):
        if not removed:
            assert fc.cleanup_temp(max_age_s=0) == 1
            removed.append(src)
        return real(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", replace)
    fc.put("k", torch.arange(12.0).reshape(3, 4), grid=(1, 3))
    monkeypatch.undo()
    got = fc.get("k")
    assert removed and torch.equal(got.features, torch.arange(12.0).reshape(3, 4)) and got.grid == (1, 3)
    assert temp_files(fc.directory) == []


_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from crepa_kernels.teacher.cache import FeatureCache
    directory, fill, sync = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    cache = FeatureCache(directory)
    open(os.path.join(sync, f"ready_{fill}"), "w").close()
    while not os.path.exists(os.path.join(sync, "go")):  # start together, after the imports
        time.sleep(0.001)
    for i in range(40):
        cache.put("shared", torch.full((256, 1024), fill + i), grid=(16, 16))
""")


def test_concurrent_put_of_one_key_from_two_processes(fc, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, fc.directory, str(fill), str(sync)])
             for fill in (1000.0, 2000.0)]
    deadline = time.time() + 120
    while len(list(sync.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()
    seen = 0
    while any(p.poll() is None for p in procs):
        got = fc.get("shared")
        if got is not None:  # every read is one whole write: a single value, the right shape and grid
            vals = got.features.unique()
            assert got.features.shape == (256, 1024) and got.grid == (16, 16) and vals.numel() == 1
            assert 1000 <= vals.item() < 1040 or 2000 <= vals.item() < 2040
            seen += 1
    assert [p.returncode for p in procs] == [0, 0]
    assert seen > 0  # the reader really raced the writers
    final = fc.get("shared").features.unique()
    assert final.numel() == 1 and final.item() in (1039.0, 2039.0)
    assert temp_files(fc.directory) == []


# ---------------------------------------------------------------------------------------- precompute
@pytest.mark.parametrize("progress", [False, True])
def test_precompute_fills_once_and_skips_present(fc, progress):
    items = [f"clip_{i}" for i in range(5)]
    calls = []

    def compute(item):
        calls.append(item)
        i = int(item.split("_")[1])
        return (torch.full((4, 2), float(i)), (1, 4)) if i % 2 else torch.full((4, 2), float(i))

    def key(item):
        return FeatureCache.make_key(item, **BASE)

    fc.put(key("clip_3"), torch.full((4, 2), 3.0))  # already there, e.g. from another process
    res = precompute_features(items, compute, fc, key, progress=progress)
    assert (res.computed, res.skipped) == (4, 1) and "clip_3" not in calls
    for i, item in enumerate(items):
        got = fc.get(key(item))
        assert torch.equal(got.features, torch.full((4, 2), float(i)))
        assert got.grid == ((1, 4) if i % 2 and i != 3 else None)
    calls.clear()
    res = precompute_features(iter(items), compute, fc, key, progress=progress)  # no len(): still fine
    assert (res.computed, res.skipped) == (0, 5) and calls == []


def test_precompute_rejects_bad_arguments(fc):
    with pytest.raises(TypeError, match="cache"):
        precompute_features([], lambda x: x, "dir", lambda x: x)
    with pytest.raises(TypeError, match="compute_fn"):
        precompute_features([], None, fc, lambda x: x)
    with pytest.raises(TypeError, match="key_fn"):
        precompute_features([], lambda x: x, fc, "k")
    with pytest.raises(TypeError, match="features"):
        precompute_features(["a"], lambda x: "not a tensor", fc, lambda x: "k_" + x, progress=False)


def test_the_longest_key_can_be_stored(tmp_path):
    """Keys run to 200 characters; the temp file a write goes through must fit a 255-byte name too."""
    cache = FeatureCache(str(tmp_path))
    key = "k" * 200
    cache.put(key, torch.ones(2, 4, 8))
    assert torch.equal(cache.get(key).features, torch.ones(2, 4, 8))
    assert temp_files(str(tmp_path)) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_refused_and_nothing_is_written(tmp_path, bad):
    cache = FeatureCache(str(tmp_path))
    x = torch.ones(2, 4, 8)
    x[1, 2, 3] = bad
    with pytest.raises(ValueError, match="key 'clip0' hold NaN or Inf values; not cached"):
        cache.put("clip0", x)
    assert "clip0" not in cache and list(cache.keys()) == [] and temp_files(str(tmp_path)) == []
