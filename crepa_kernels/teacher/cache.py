"""A disk cache of teacher features, so the encoder and the VAE can be skipped when features are fixed.

Entries are safetensors files named by a key that hashes the sample id and everything that changes
the features (`FeatureCache.make_key`). Writes are atomic: the bytes go to a uniquely named temp
file in the entry's own directory, are flushed and fsynced, then `os.replace`d onto the entry name.
A process that dies mid-write leaves at most a temp file, which `get` never reads (entries and temp
files cannot share a name) and `cleanup_temp` removes. Several processes (one per GPU) may fill the
same cache: concurrent writers of one key each publish a complete file and the last one wins.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch

__all__ = ["CachedFeatures", "FeatureCache", "PrecomputeResult", "precompute_features", "weights_fingerprint"]

FORMAT = "crepa_kernels.feature_cache/1"  # part of every key: a format change invalidates old entries
_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"
_KEY_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")  # no leading dot: temp files start with one
_TENSOR_NAME = "features"
_WRITE_ATTEMPTS = 3  # a temp file removed mid-write by another process's cleanup_temp is written again

PathLike = Union[str, "os.PathLike[str]"]


class CachedFeatures(NamedTuple):
    features: torch.Tensor
    grid: Optional[tuple[int, int]]


class PrecomputeResult(NamedTuple):
    computed: int
    skipped: int


_FINGERPRINTS: dict[tuple, str] = {}
# A file modified this recently may change again within the same timestamp tick, unseen by its stat:
# its fingerprint is not memoised (hashed again on each call) until it is older.
_RACY_NS = 2_000_000_000


def weights_fingerprint(path: PathLike) -> str:
    """SHA-256 of a weights file's content, memoised within the process per (path, inode, size, mtime,
    ctime) for files last modified more than two seconds ago (a newer file is hashed on every call:
    a rewrite within its timestamp's tick would leave the stat unchanged)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: got {type(path).__name__}, expected a str or os.PathLike")
    real = os.path.realpath(os.fspath(path))
    if not os.path.isfile(real):
        raise ValueError(f"path: {os.fspath(path)!r} is not a file")
    looked = time.time_ns()  # before the stat: any later rewrite gets a later mtime
    st = os.stat(real)
    memo = (real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    found = _FINGERPRINTS.get(memo)
    if found is not None:
        return found
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    if looked - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _FINGERPRINTS[memo] = digest
    return digest


def _check_device(device: Any) -> torch.device:
    """A torch.device from ``device`` (Tensor.to would also take a dtype, or a float, silently); None is
    the CPU, where entries are read."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)) and not (isinstance(device, int) and not isinstance(device, bool)):
        raise TypeError(f"device: got {device!r}, expected a torch.device, a device string such as 'cuda:0', "
                        "or a CUDA device index")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device: got {device!r}, which is not a device ({e})") from None


def _check_grid(grid: Any, name: str = "grid") -> Optional[tuple[int, int]]:
    if grid is None:
        return None
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"{name}: got {grid!r}, expected None or a pair of positive ints (h, w)")
    return int(grid[0]), int(grid[1])


_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def _canonical_dtype(dtype: Any) -> Optional[torch.dtype]:
    """The features' dtype as a torch.dtype, so that ``"bfloat16"`` and ``torch.bfloat16`` give one key.
    ``"auto"`` is refused: it resolves differently per device, and the key must name the real dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
        raise ValueError(f"dtype: got {dtype!r}, expected a torch.dtype or one of {sorted(_DTYPES)} (the dtype the "
                         "features were computed in; resolve 'auto' first)")
    raise TypeError(f"dtype: got {type(dtype).__name__}, expected a torch.dtype, str or None")


def _canonical_encoder_name(name: str) -> str:
    """A DINOv2 name in timm's spelling (``dinov2_vitg14`` and ``vit_giant_patch14_dinov2`` give one key);
    other encoders' names as given."""
    from .encoders import resolve_encoder_name

    try:
        return resolve_encoder_name(name)
    except ValueError:
        return name


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _json_value(name: str, value: Any) -> Any:
    """Canonical JSON-able form of a key component; refuses what would not hash stably."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        # repr round-trips exactly; tagged, so that 1.0 and the string "1.0" key apart (as 1 and "1" do).
        # No earlier key held a mapping, so none can match a tagged one.
        return {"float": repr(value)}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json_value(name, v) for v in value]
    raise TypeError(f"{name}: got {type(value).__name__}, expected str, int, float, bool, None, torch.dtype or a tuple of them")


class FeatureCache:
    """Teacher features on disk, one safetensors file per key.

    Args:
        directory: where entries live (created if missing). Entries are spread over 256
            sub-directories named by the first two hex digits of a hash of the key.
    """

    def __init__(self, directory: PathLike) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory: got {type(directory).__name__}, expected a str or os.PathLike")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"directory: {self.directory!r} exists and is not a directory")
        os.makedirs(self.directory, exist_ok=True)

    # ------------------------------------------------------------------------------------------ keys
    @staticmethod
    def make_key(
        sample_id: Union[str, int],
        *,
        encoder_name: str,
        encoder_weights: PathLike,
        image_size: Union[int, Sequence[int]],
        frame_index: Union[int, Sequence[int], None] = None,
        num_frames: Optional[int] = None,
        vae: Optional[str] = None,
        dtype: Union[torch.dtype, str, None] = None,
        extra: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """A hex key hashing the sample id and every setting that changes its features.

        One spelling per setting: DINOv2 aliases key as their timm name, dtype names as the
        torch.dtype, a ``"sha256:..."`` string as the file it fingerprints. (Earlier versions keyed
        those spellings apart, so their entries made with an alias, a dtype name or a fingerprint
        string are not found under these keys and are computed again; so are entries whose ``extra``
        held a float, which earlier versions keyed as its string.)

        Args:
            sample_id: the sample (a dataset path or id), str or int.
            encoder_name: e.g. ``"vit_giant_patch14_dinov2"`` (DINOv2 aliases such as
                ``"dinov2_vitg14"`` give the same key).
            encoder_weights: a weights file (hashed by content, see `weights_fingerprint`),
                `weights_fingerprint`'s ``"sha256:..."`` string (the same key as the file), or another
                fingerprint string (hub id with revision; a warning when it ends like a weights file
                but names no local file).
            image_size: the encoder resolution, an int or (h, w).
            frame_index: the frame (or frames, in order) encoded, for per-frame entries.
            num_frames: the clip length, for per-video entries. At least one of the two is needed.
            vae: identity of the VAE that decoded the latents (name and revision or fingerprint),
                None when features come from pixel frames.
            dtype: the dtype the features were computed in, a torch.dtype or its name
                (``"bfloat16"``, ``"bf16"``, ...: each gives the torch.dtype's key).
            extra: any other setting that changes the features (resize mode, token layout, ...),
                a mapping from str to plain values.
        """
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
            raise TypeError(f"sample_id: got {type(sample_id).__name__}, expected a str or int")
        if not isinstance(encoder_name, str) or not encoder_name:
            raise TypeError(f"encoder_name: got {encoder_name!r}, expected a non-empty str")
        if isinstance(encoder_weights, os.PathLike) or (isinstance(encoder_weights, str) and os.path.isfile(encoder_weights)):
            weights = weights_fingerprint(encoder_weights)
        elif isinstance(encoder_weights, str) and _SHA256_RE.fullmatch(encoder_weights):
            weights = encoder_weights  # weights_fingerprint's own form: the same key as the file's
        elif isinstance(encoder_weights, str) and encoder_weights:
            if encoder_weights.lower().endswith(_WEIGHTS_SUFFIXES):  # a mistyped path would key wrongly
                warnings.warn(f"encoder_weights: {encoder_weights!r} is not a local file; it is keyed as an id "
                              "string, not by the file's content", stacklevel=2)
            weights = "id:" + encoder_weights
        else:
            raise TypeError(f"encoder_weights: got {encoder_weights!r}, expected a weights file path or a fingerprint str")
        encoder_name = _canonical_encoder_name(encoder_name)
        if _is_int(image_size) and image_size > 0:
            size = [image_size, image_size]
        elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
              and all(_is_int(s) and s > 0 for s in image_size)):
            size = [int(s) for s in image_size]
        else:
            raise ValueError(f"image_size: got {image_size!r}, expected a positive int or a pair (h, w)")
        if frame_index is None and num_frames is None:
            raise ValueError("frame_index / num_frames: both are None, expected at least one")
        if frame_index is not None:
            frames = [frame_index] if _is_int(frame_index) else frame_index
            if not isinstance(frames, (list, tuple)) or not frames or not all(_is_int(f) and f >= 0 for f in frames):
                raise ValueError(f"frame_index: got {frame_index!r}, expected a non-negative int or a non-empty sequence of them")
            frame_index = [int(f) for f in frames] if not _is_int(frame_index) else int(frame_index)
        if num_frames is not None and not (_is_int(num_frames) and num_frames > 0):
            raise ValueError(f"num_frames: got {num_frames!r}, expected a positive int")
        if vae is not None and (not isinstance(vae, str) or not vae):
            raise TypeError(f"vae: got {vae!r}, expected None or a non-empty str naming the VAE")
        dtype = _canonical_dtype(dtype)
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"extra: got {type(extra).__name__}, expected a mapping")
        extras = {}
        for k, v in (extra or {}).items():
            if not isinstance(k, str):
                raise TypeError(f"extra: key {k!r} is {type(k).__name__}, expected str")
            extras[k] = _json_value(f"extra[{k!r}]", v)
        payload = {
            "format": FORMAT,
            "sample_id": sample_id,
            "encoder_name": encoder_name,
            "encoder_weights": weights,
            "image_size": size,
            "frame_index": frame_index,
            "num_frames": num_frames,
            "vae": vae,
            "dtype": None if dtype is None else str(dtype),
            "extra": extras,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    # ----------------------------------------------------------------------------------------- paths
    @staticmethod
    def _check_key(key: Any) -> str:
        if not isinstance(key, str):
            raise TypeError(f"key: got {type(key).__name__}, expected a str (see FeatureCache.make_key)")
        if not _KEY_RE.fullmatch(key) or key.endswith(_TMP_SUFFIX):
            raise ValueError(
                f"key: got {key!r}, expected 1-200 characters of letters, digits, '_', '-', '.', "
                f"not starting with '.' nor ending with {_TMP_SUFFIX!r}"
            )
        return key

    def _shard(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(key.encode()).hexdigest()[:2])

    def path(self, key: str) -> str:
        """The file an entry lives in."""
        key = self._check_key(key)
        return os.path.join(self._shard(key), key + _SUFFIX)

    # ------------------------------------------------------------------------------------ read/write
    def __contains__(self, key: str) -> bool:
        """Whether a readable entry holds ``key``: the file exists and its header names the key and
        holds the features (the data itself is not read). A damaged entry, which `get` treats as
        absent, is absent here too, so `precompute_features` computes it again."""
        path = self.path(key)
        if not os.path.isfile(path):
            return False
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                return (fh.metadata() or {}).get("key") == key and _TENSOR_NAME in fh.keys()
        except Exception:  # removed since, or damaged outside our writes
            return False

    def put(self, key: str, features: torch.Tensor, grid: Optional[Sequence[int]] = None) -> str:
        """Store `features` (copied to the CPU, contiguous) and their token `grid`; returns the path.

        A `grid` (h, w) describes the token axis, the second-to-last: `(..., h * w, D)`. Features
        holding NaN or Inf are refused (nothing is written)."""
        key = self._check_key(key)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features: got {type(features).__name__}, expected a torch.Tensor")
        if features.layout != torch.strided:
            raise ValueError(f"features: got a {features.layout} tensor, expected a dense one")
        grid = _check_grid(grid)
        if grid is not None and (features.ndim < 2 or features.shape[-2] != grid[0] * grid[1]):
            # read back, the entry would fail in the loss at every step, and be skipped by every refill
            raise ValueError(f"grid: {grid} describes {grid[0] * grid[1]} tokens, but features of shape "
                             f"{tuple(features.shape)} hold "
                             + (f"{features.shape[-2]} (the second-to-last axis: (..., N, D))" if features.ndim >= 2
                                else "no token axis (expected (..., N, D))"))
        from safetensors.torch import save

        meta = {"format": FORMAT, "key": key}
        if grid is not None:
            meta["grid"] = f"{grid[0]},{grid[1]}"
        cpu = features.detach().to("cpu").contiguous()
        if cpu.is_floating_point() and not bool(torch.isfinite(cpu).all()):
            # stored, they would make the loss NaN at every later read of this entry
            raise ValueError(f"features for key {key!r} hold NaN or Inf values; not cached")
        data = save({_TENSOR_NAME: cpu}, metadata=meta)
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        _write_atomic(final, data)
        return final

    def get(self, key: str, device: Union[str, torch.device, None] = "cpu") -> Optional[CachedFeatures]:
        """The entry as (features, grid), or None when absent (or unreadable, with a warning)."""
        device = _check_device(device)
        path = self.path(key)
        try:
            read = _read_entry(path)
        except FileNotFoundError:
            return None
        except _ReplacedDuringReads as e:
            last = "" if e.last_error is None else f" (the last read failed: {e.last_error})"
            warnings.warn(f"feature cache: entry {path} was replaced during each of {_READ_ATTEMPTS} reads{last}; "
                          "treating it as absent", stacklevel=2)
            return None
        except Exception as e:  # a file damaged outside our writes (disk fault, foreign tool)
            warnings.warn(f"feature cache: unreadable entry {path} ({e}); treating it as absent", stacklevel=2)
            return None
        meta, tensor = read
        if meta.get("key") != key or tensor is None:
            warnings.warn(f"feature cache: entry {path} does not hold key {key!r}; treating it as absent", stacklevel=2)
            return None
        grid = tuple(int(g) for g in meta["grid"].split(",")) if meta.get("grid") else None
        return CachedFeatures(tensor.to(device), grid)

    def keys(self) -> Iterator[str]:
        """Keys of the entries present (temp files excluded)."""
        for shard in sorted(os.listdir(self.directory)):
            sdir = os.path.join(self.directory, shard)
            if not os.path.isdir(sdir):
                continue
            for name in sorted(os.listdir(sdir)):
                if name.endswith(_SUFFIX) and not name.startswith("."):
                    yield name[: -len(_SUFFIX)]

    def cleanup_temp(self, max_age_s: float = 3600.0) -> int:
        """Remove temp files older than `max_age_s` (left by writers that died); returns how many. A live
        writer whose temp file goes (a `max_age_s` shorter than a write) writes it again."""
        if not isinstance(max_age_s, (int, float)) or isinstance(max_age_s, bool) or max_age_s < 0:
            raise ValueError(f"max_age_s: got {max_age_s!r}, expected a non-negative number of seconds")
        removed = 0
        now = time.time()
        for root, _dirs, files in os.walk(self.directory):
            for name in files:
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    p = os.path.join(root, name)
                    try:
                        if now - os.stat(p).st_mtime >= max_age_s:
                            os.unlink(p)
                            removed += 1
                    except FileNotFoundError:  # another process got there first
                        pass
        return removed

    def __repr__(self) -> str:
        return f"FeatureCache({self.directory!r})"


_READ_ATTEMPTS = 8


def _read_entry(path: str):
    """(metadata, features tensor or None) of one version of the entry; `_ReplacedDuringReads` when
    another process replaced it during every attempt.

    safe_open may open the file more than once by name (the header, then the tensor storage), so a
    writer renaming a new version into place between those opens could pair one version's grid with
    another's features. The file we hold open pins the inode the name pointed to; if the name still
    points to it after the read, no rename happened during the read (a new version is always a new
    inode, and the held one cannot be reused), so every open saw that one version. Such a pairing
    can also make safe_open raise (one version's header sizes against another's file): an error
    while the name moved is a rename, read again; an error on a file that stayed is damage, raised."""
    from safetensors import safe_open

    for _ in range(_READ_ATTEMPTS):
        with open(path, "rb") as pin:
            pinned = os.fstat(pin.fileno())
            error = None
            try:
                with safe_open(path, framework="pt") as fh:
                    meta = fh.metadata() or {}
                    tensor = fh.get_tensor(_TENSOR_NAME) if _TENSOR_NAME in fh.keys() else None
            except Exception as e:  # noqa: BLE001 - judged below by whether the name moved
                error = e
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue
            if (now.st_dev, now.st_ino) == (pinned.st_dev, pinned.st_ino):
                if error is not None:
                    raise error
                return meta, tensor
    raise _ReplacedDuringReads(error)


class _ReplacedDuringReads(Exception):
    """Every read attempt of an entry overlapped a rename of it; holds the last attempt's error, if any
    (also where a file system reports unstable inode numbers, the error is kept)."""

    def __init__(self, last_error: "Exception | None"):
        super().__init__(last_error)
        self.last_error = last_error


def _write_atomic(final: str, data: bytes) -> None:
    """Publish `data` at `final` all at once: temp file in the same directory, fsync, rename."""
    directory = os.path.dirname(final)
    for attempt in range(_WRITE_ATTEMPTS):
        # pid + random suffix: unique across processes and across threads of one process; not the key,
        # which (up to 200 characters) would take the name past the file system's 255-byte limit
        tmp = os.path.join(directory, f".{os.getpid()}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            break
        except FileNotFoundError:
            # another process's cleanup_temp (with a small max_age_s) removed the temp file mid-write:
            # write it again
            if attempt + 1 == _WRITE_ATTEMPTS:
                raise
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    try:  # make the rename itself durable; some file systems refuse to open directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def precompute_features(
    items: Iterable[Any],
    compute_fn: Callable[[Any], Any],
    cache: FeatureCache,
    key_fn: Callable[[Any], str],
    progress: bool = True,
) -> PrecomputeResult:
    """Fill `cache` once: for each item whose key is absent, store ``compute_fn(item)``.

    `compute_fn` returns the features tensor, or ``(features, grid)``. Entries already present
    (from an earlier run or another process) are skipped, so an interrupted run resumes; a damaged
    entry (see `FeatureCache.__contains__`) is computed again.
    """
    if not isinstance(cache, FeatureCache):
        raise TypeError(f"cache: got {type(cache).__name__}, expected a FeatureCache")
    if not callable(compute_fn):
        raise TypeError(f"compute_fn: got {type(compute_fn).__name__}, expected a callable")
    if not callable(key_fn):
        raise TypeError(f"key_fn: got {type(key_fn).__name__}, expected a callable")
    total = len(items) if hasattr(items, "__len__") else None
    it: Iterable[Any] = items
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            it = bar = tqdm(items, total=total, desc="teacher features", unit="item")
        except ImportError:  # progress display is optional
            pass
    computed = skipped = 0
    try:
        for item in it:
            key = key_fn(item)
            if key in cache:
                skipped += 1
                continue
            out = compute_fn(item)
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
                cache.put(key, out[0], out[1])
            else:
                cache.put(key, out)
            computed += 1
    finally:
        if bar is not None:
            bar.close()
    return PrecomputeResult(computed, skipped)
