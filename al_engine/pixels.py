"""Model-size pixels of a folder of image files, decoded once into a disk cache and memory-mapped.

A file is opened with Pillow, turned upright by its EXIF orientation, converted to RGB, its
shorter side resized to N and the centre N x N cropped (torchvision.transforms.v2): aspect is
kept, never squashed. Centre-crop rather than letterbox because the networks here are trained,
and pretrained, on crops that fill the frame: letterbox bars are pixels no training image has,
and on a 4:1 panorama they would fill three quarters of a small input. What a crop loses is the
ends of very elongated pictures; the annotator shows the whole original, so a person still
sees everything.

Files that cannot be decoded (empty, truncated, not an image, over Pillow's decompression-bomb
limit: its warning counts as an error) are skipped and reported, never a failed start.

The cache is one store per (resolved folder, N) under the cache folder: a raw uint8 file of
rows (3, N, N) in the caller's order, and `index.json` naming that file and, per row, the
file's resolved path, byte size and modification time (ns) with its pixel sums (for the
normalisation statistics). A later load reuses every row whose file is unchanged and decodes
only new or changed files. Rules that keep it crash-safe:
- data files are immutable once named by the index, except that rows may be appended at the
  end (the index is replaced after the appended bytes are on disk; bytes past the index's
  count are the trace of an interrupted append and are cut off);
- every other write goes to a `.tmp` file, is fsynced, then `os.replace`d into a new,
  uniquely named data file; the index (itself written to a temp file and replaced) is the
  commit point, and the old data file is deleted after it;
- an index whose data file is missing or shorter than its rows is not trusted (rebuilt);
- one process updates a store at a time (an flock on the store's `lock` file).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import stat
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import ConfigError

CACHE_FORMAT = 1  # bump when the layout or the decoding changes: old stores are then rebuilt
DECODE_BATCH = 32  # files per DataLoader batch
COPY_ROWS = 256  # rows per chunk when copying cache rows between files
AUTO_WORKERS_MIN_FILES = 256  # below this many files to decode, decoding stays in this process
PROGRESS_MIN_FILES = 100  # fewer files to decode (or features to compute) than this: no progress bar


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/al-annotator`, else `~/.cache/al-annotator`."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "al-annotator"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache folder to use (created); an unusable one is a ConfigError naming it."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the cache folder {str(folder)!r} ({error.strerror}); "
                          "choose another with --cache-dir") from None
    return folder


# --------------------------------------------------------------------------------------------
# Decoding one file


class UnreadableImage(Exception):
    """A file Pillow cannot turn into pixels; `reason` is one line for the skip report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@lru_cache(maxsize=8)
def _resize_and_crop(size: int):
    from torchvision.transforms import InterpolationMode, v2

    # An int size makes v2.Resize match the SHORTER side, keeping the aspect ratio.
    return v2.Compose([v2.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                       v2.CenterCrop(size), v2.PILToTensor()])


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """(3, size, size) uint8 RGB: EXIF-upright, shorter side resized to `size`, centre-cropped.

    Raises UnreadableImage for any file that cannot be decoded (its reason in one line).
    """
    from PIL import Image, ImageOps

    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # JPEG only: decode at the smallest 1/2^k scale whose sides both stay >= size (a
                # 640x480 photo for 224 px is decoded at 320x240, ~2x faster); others ignore it.
                image.draft("RGB", (size, size))
                upright = ImageOps.exif_transpose(image)  # a loaded copy; truncation raises here
                rgb = upright.convert("RGB")
        pixels = _resize_and_crop(size)(rgb)  # (3, size, size) uint8
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage("too large to decode safely (over Pillow's decompression-bomb limit)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can read") from None
    except OSError as error:
        if "truncated" in str(error).lower():
            raise UnreadableImage(f"truncated ({_one_line(error)})") from None
        raise UnreadableImage(f"cannot be decoded ({_one_line(error)})") from None
    except Exception as error:  # a damaged file can fail in many ways; each is a skip, not a crash
        raise UnreadableImage(f"cannot be decoded ({_one_line(error)})") from None
    return np.ascontiguousarray(pixels.numpy())


class _DecodeJobs(torch.utils.data.Dataset):
    """Files to decode, for a DataLoader: item i -> (i, pixels or None, per-channel sums, reason)."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            # Looked up on the module at call time, so tests can count decodes by patching it.
            pixels = globals()["decode_image"](self.paths[position], self.size)
        except UnreadableImage as error:
            return position, None, None, error.reason
        flat = pixels.reshape(3, -1).astype(np.int64)
        sums = np.concatenate([flat.sum(1), (flat * flat).sum(1)])  # (6,) sum and sum of squares per channel
        return position, pixels, sums, None


def _collate(items):
    """A batch: (positions decoded, (B, 3, N, N) uint8, (B, 6) sums, [(position, reason)] failures)."""
    good = [item for item in items if item[1] is not None]
    positions = [item[0] for item in good]
    pixels = np.stack([item[1] for item in good]) if good else None
    sums = np.stack([item[2] for item in good]) if good else np.zeros((0, 6), dtype=np.int64)
    failures = [(item[0], item[3]) for item in items if item[1] is None]
    return positions, pixels, sums, failures


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one decoding process per core; no thread pools on top


def auto_workers(count: int) -> int:
    """Decoding processes for `count` files: min(4, CPUs), none for small jobs (start-up costs more)."""
    if count < AUTO_WORKERS_MIN_FILES:
        return 0
    return max(0, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# Crash-safe file discipline shared by the pixel and feature caches


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value) -> None:
    """Write JSON to a temp file, fsync it, then os.replace it over `path`."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or damaged (then the cache is rebuilt)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def new_data_name(prefix: str, suffix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}{suffix}"


@contextmanager
def store_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a store while it is read and updated (blocks other processes)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a single process per store is then the user's job
        yield
        return
    with open(folder / "lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete temp files and data files that the index no longer names (left by a crash or a rewrite)."""
    for path in folder.iterdir():
        if path.name in keep or path.name in ("lock", "index.json"):
            continue
        if path.suffix == ".tmp" or path.name.startswith(("pixels-", "features-", "staging-")):
            try:
                path.unlink()
            except OSError:
                pass


def open_rows(path: Path | None, dtype, row_shape: tuple[int, ...], rows: int) -> np.ndarray:
    """(rows, *row_shape) copy-on-write memory map of a data file (writable in memory, never written back)."""
    if rows == 0 or path is None:
        return np.empty((0, *row_shape), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=(rows, *row_shape))


def copy_rows(out, sources: list[np.ndarray], plan: list[tuple[int, int]]) -> None:
    """Write rows to the open file `out`: plan[i] = (source number, row), grouped into contiguous runs."""
    start = 0
    while start < len(plan):
        source, first = plan[start]
        end = start + 1
        while (end < len(plan) and end - start < COPY_ROWS and plan[end][0] == source
               and plan[end][1] == first + (end - start)):
            end += 1
        out.write(np.ascontiguousarray(sources[source][first:first + end - start]).tobytes())
        start = end


# --------------------------------------------------------------------------------------------
# The pixel store


def file_key(path: str) -> str:
    """What identifies one file's content to the caches: bytes, mtime (ns) and resolved path.

    One lstat for an ordinary file (its path is resolved already when the folder is: callers pass
    paths under a resolved root); a symbolic link is followed to the file it names.
    """
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        path = os.path.realpath(path)
        info = os.stat(path)
    return f"{info.st_size}:{info.st_mtime_ns}:{path}"


@dataclass
class CachedPixels:
    """One folder's decoded pixels, memory-mapped from the cache, and what the load did."""

    images: torch.Tensor  # (R, 3, N, N) uint8 view of `mapped` (torch.from_numpy: no copy)
    mapped: np.ndarray  # (R, 3, N, N) uint8 copy-on-write memory map of the cache file (writes stay in memory)
    kept: np.ndarray  # (R,) int64 position, in the list of files given, of each row's file
    skipped: list[tuple[int, str]]  # (position in the list of files given, reason) of each unreadable file
    row_keys: list[str]  # (R,) each row's file key (bytes, mtime ns, resolved path): what builds on the rows
    store_id: str  # names the store: hash of the resolved folder and N
    mean: tuple[float, float, float]  # per-channel pixel mean over the rows, on the [0, 1] scale
    std: tuple[float, float, float]  # per-channel pixel standard deviation over the rows, [0, 1] scale
    decoded: int = 0  # files decoded by this load (0 when every file was cached)
    reused: int = 0  # rows taken from the cache as they were
    dropped: int = 0  # cached rows no longer wanted: their files vanished or changed
    seconds: float = 0.0  # wall time of the load
    notes: list[str] = field(default_factory=list)  # why a cache was not trusted, or was repaired


@dataclass(frozen=True)
class PixelSource:
    """Where a split's rows came from, for caches built on top of the pixels (backbone features)."""

    store_id: str  # the pixel store: hash of the resolved folder and N
    image_size: int  # N, pixels per side
    row_keys: tuple[str, ...]  # (R,) per row: the file's bytes, mtime (ns) and resolved path

    @classmethod
    def of(cls, cached: CachedPixels) -> "PixelSource":
        return cls(cached.store_id, int(cached.images.shape[-1]), tuple(cached.row_keys))

    def subset(self, rows: Sequence[int]) -> "PixelSource":
        """The same source restricted to `rows` (after `take_subset`)."""
        return PixelSource(self.store_id, self.image_size, tuple(self.row_keys[i] for i in rows))


def store_id(root: Path, size: int) -> str:
    return hashlib.sha256(f"{root}\n{size}".encode()).hexdigest()[:24]


def _trusted_index(folder: Path, size: int, row_bytes: int, notes: list[str]) -> dict | None:
    """The store's index if its data file backs every row it names; cuts off an interrupted append."""
    index = read_json(folder / "index.json")
    if index is None:
        return None
    if index.get("format") != CACHE_FORMAT or index.get("image_size") != size:
        notes.append("the cache was written by another version; rebuilding it")
        return None
    try:
        rows = len(index["keys"])
        if _decode_sums(index["sums"]).shape != (rows, 6):
            raise ValueError("sums do not match the keys")
    except (KeyError, TypeError, ValueError):
        notes.append("the cache's index is damaged; rebuilding it")
        return None
    if rows == 0:
        return index
    data = folder / str(index.get("data_file"))
    try:
        actual = data.stat().st_size
    except OSError:
        notes.append("the cache's data file is missing; rebuilding it")
        return None
    expected = rows * row_bytes
    if actual < expected:
        notes.append("the cache's data file is shorter than its index (a half-written cache); rebuilding it")
        return None
    if actual > expected:  # an append that crashed before its index was committed: drop its rows
        os.truncate(data, expected)
        notes.append(f"cut {actual - expected} bytes of an interrupted append off the cache")
    return index


def _encode_sums(sums: np.ndarray) -> str:
    """(R, 6) int64 per-row sums as base64 text: 100,000 rows parse in milliseconds, not as JSON numbers."""
    return base64.b64encode(np.ascontiguousarray(sums, dtype="<i8").tobytes()).decode("ascii")


def _decode_sums(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i8").reshape(-1, 6).astype(np.int64)


def _pixel_stats(sums: np.ndarray, rows: int, size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale from (R, 6) per-row sums and sums of squares."""
    if rows == 0:
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    count = float(rows) * size * size
    total = sums.sum(0).astype(np.float64)  # (6,)
    mean = total[:3] / count / 255.0
    var = np.maximum(total[3:] / count / 255.0 ** 2 - mean ** 2, 0.0)
    return tuple(float(m) for m in mean), tuple(max(float(math.sqrt(v)), 1e-3) for v in var)


def load_pixels(root: str | Path, files: Sequence[str | Path], size: int, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> CachedPixels:
    """Pixels of `files` (all under `root`), decoding only what the cache lacks, rows in the given order.

    `workers`: decoding processes (None = `auto_workers`; 0 = decode in this process).
    Unreadable files are left out of the rows and listed in `skipped` (their failures are cached
    too, so a second load decodes nothing).
    """
    start = time.perf_counter()
    root = Path(root).resolve()
    paths = [str(root / f) if not os.path.isabs(f) else os.fspath(f) for f in files]
    if size < 1:
        raise ConfigError(f"--image-size must be at least 1, got {size}")
    identity = store_id(root, size)
    folder = resolve_cache_dir(cache_dir) / "pixels" / f"{size}px-{identity}"
    row_shape = (3, size, size)
    row_bytes = 3 * size * size
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with store_lock(folder):
            result = _update_store(folder, root, paths, size, row_shape, row_bytes, workers, progress)
    except OSError as error:
        raise ConfigError(f"the pixel cache in {str(folder.parent.parent)!r} cannot be written "
                          f"({_one_line(error)}); free some space or choose another --cache-dir") from None
    result.store_id = identity
    result.seconds = time.perf_counter() - start
    return result


def _update_store(folder: Path, root: Path, files: list[str], size: int, row_shape, row_bytes: int,
                  workers: int | None, progress: bool) -> CachedPixels:
    notes: list[str] = []
    index = _trusted_index(folder, size, row_bytes, notes)
    old_keys: list[str] = index["keys"] if index else []
    old_sums = _decode_sums(index["sums"]) if index else np.zeros((0, 6), dtype=np.int64)  # (R_old, 6)
    old_data = folder / index["data_file"] if index and old_keys else None
    old_rows = {key: row for row, key in enumerate(old_keys)}  # file key -> row
    old_unreadable = {key: reason for key, reason in (index.get("unreadable", []) if index else [])}

    # Plan every file: reuse a cached row, repeat a cached failure, or decode.
    keys: list[str | None] = []
    plan: list[tuple[str, int]] = []  # per file: ("old", row) | ("new", job) | ("skip", 0)
    reasons: dict[int, str] = {}
    to_decode: list[str] = []
    for position, path in enumerate(files):
        try:
            key = file_key(path)
        except OSError as error:
            keys.append(None)
            plan.append(("skip", 0))
            reasons[position] = f"cannot be opened ({error.strerror or error})"
            continue
        keys.append(key)
        if key in old_rows:
            plan.append(("old", old_rows[key]))
        elif key in old_unreadable:
            plan.append(("skip", 0))
            reasons[position] = old_unreadable[key]
        else:
            plan.append(("new", len(to_decode)))
            to_decode.append(path)

    staging = folder / f"{new_data_name('staging', '.u8')}.tmp"
    staged_rows, staged_sums, failed = _decode_to_file(to_decode, size, staging, workers, progress)
    for position, (kind, job) in enumerate(plan):
        if kind == "new" and job not in staged_rows:
            plan[position] = ("skip", 0)
            reasons[position] = failed[job]

    # The rows of the new store, in the given order, and where each comes from.
    kept = [position for position, (kind, _) in enumerate(plan) if kind != "skip"]
    sources = [(0, plan[p][1]) if plan[p][0] == "old" else (1, staged_rows[plan[p][1]]) for p in kept]
    kinds = np.asarray([source for source, _ in sources], dtype=np.int64)
    rows = np.asarray([row for _, row in sources], dtype=np.int64)
    sums = np.zeros((len(sources), 6), dtype=np.int64)  # (R, 6) per-row pixel sums and sums of squares
    sums[kinds == 0] = old_sums[rows[kinds == 0]]
    sums[kinds == 1] = staged_sums[rows[kinds == 1]]
    new_keys = [keys[p] for p in kept]
    unreadable = sorted([keys[p], reasons[p]] for p in reasons if keys[p] is not None)

    reused = sum(1 for source, _ in sources if source == 0)
    dropped = len(old_keys) - reused
    old_prefix = [(0, row) for row in range(len(old_keys))]
    staged_count = len(staged_rows)
    data_name = index["data_file"] if index and old_keys else None
    if not sources:
        data_name = None
    elif sources == old_prefix + [(1, row) for row in range(staged_count)]:
        if data_name is None:  # a fresh store: the staging file, in order, is the data file
            data_name = new_data_name("pixels", ".u8")
            os.replace(staging, folder / data_name)
            fsync_dir(folder)
        elif staged_count:  # only new files, all after the cached ones: append their rows
            with open(folder / data_name, "ab") as out, open(staging, "rb") as source:
                while chunk := source.read(COPY_ROWS * row_bytes):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    else:  # files vanished, changed or were inserted: write the rows anew in order
        data_name = new_data_name("pixels", ".u8")
        tmp = folder / f"{data_name}.tmp"
        old_view = open_rows(old_data, np.uint8, row_shape, len(old_keys))
        staged_view = open_rows(staging if staged_count else None, np.uint8, row_shape, staged_count)
        with open(tmp, "wb") as out:
            copy_rows(out, [old_view, staged_view], sources)
            out.flush()
            os.fsync(out.fileno())
        del old_view, staged_view
        os.replace(tmp, folder / data_name)
        fsync_dir(folder)

    changed = (index is None or new_keys != old_keys or not np.array_equal(sums, old_sums)
               or unreadable != sorted(index.get("unreadable", []))
               or data_name != index.get("data_file"))
    if changed:
        write_json_atomic(folder / "index.json", {
            "format": CACHE_FORMAT, "image_size": size, "root": str(root), "data_file": data_name,
            "keys": new_keys, "sums": _encode_sums(sums), "unreadable": unreadable})
    remove_stale(folder, {data_name} if data_name else set())

    images = open_rows(folder / data_name if data_name else None, np.uint8, row_shape, len(sources))
    mean, std = _pixel_stats(sums, len(sources), size)
    return CachedPixels(
        images=torch.from_numpy(images), mapped=images, kept=np.asarray(kept, dtype=np.int64),
        skipped=sorted(reasons.items()), row_keys=new_keys, store_id="",
        mean=mean, std=std, decoded=len(to_decode), reused=reused, dropped=dropped, notes=notes)


def _decode_to_file(paths: list[str], size: int, staging: Path, workers: int | None, progress: bool):
    """Decode `paths` into `staging` (rows in order, failures left out), with a DataLoader and tqdm.

    Returns (job -> staged row, (S, 6) per-row sums, job -> reason of each failure).
    """
    staged: dict[int, int] = {}
    failed: dict[int, str] = {}
    sums: list[np.ndarray] = []
    if not paths:
        return staged, np.zeros((0, 6), dtype=np.int64), failed
    from tqdm import tqdm

    workers = auto_workers(len(paths)) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _DecodeJobs(paths, size), batch_size=DECODE_BATCH, shuffle=False, num_workers=workers,
        collate_fn=_collate, worker_init_fn=_worker_init if workers else None)
    with open(staging, "wb") as out, tqdm(total=len(paths), desc=f"decoding images to {size}px", unit="img",
                                          disable=not progress or len(paths) < PROGRESS_MIN_FILES) as bar:
        for positions, pixels, batch_sums, failures in loader:
            if positions:
                out.write(pixels.tobytes())
                for position in positions:
                    staged[position] = len(staged)
                sums.append(batch_sums)
            for position, reason in failures:
                failed[position] = reason
            bar.update(len(positions) + len(failures))
        out.flush()
        os.fsync(out.fileno())
    return staged, (np.concatenate(sums) if sums else np.zeros((0, 6), dtype=np.int64)), failed
