"""A disk cache of preprocessed slices, memory-mapped on read.

Decoding 16-bit PNGs (or NIfTI volumes) and RLE masks is done once per (index, preprocessing)
pair. The key is a hash of the index contents (ids, image paths and axial positions, image file
sizes and modification times, the RLE of every mask, the classes) and of the preprocessing fields
that change the arrays. :func:`advseg.data.load_data` indexes the data under its resolved path, so
the image paths are absolute: however the data path was spelt, one data set has one key. The
cache directory is outside the data directory (:func:`advseg.data.location.cache_root`), so a
read-only data set works. A cache entry is a directory::

    <cache_dir>/<key>/images.npy   (N, S, S) float32 in [0, 1]
                      masks.npy    (N, K, S, S) uint8 in {0, 1}
                      kept.npy     (N,) positions of the index rows the arrays hold
                      meta.json    key, classes, preprocessing, skipped slices

It is written under a temporary name and renamed into place, so an interrupted build leaves no
entry behind, and it is read with ``np.load(mmap_mode="r")``: a second run decodes nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from advseg.atomic import fault_point, remove_debris, write_error
from advseg.data.content import STORE, keep_digests
from advseg.data.index import index_classes
from advseg.data.location import CACHE_ENV
from advseg.data.nifti import read_volume
from advseg.data.preprocess import PreprocessConfig, preprocess_slice
from advseg.data.rle import rle_decode
from advseg.data.uwmgi import read_png
from advseg.errors import AdvsegWarning, UserError

#: Bump when the cached arrays' meaning changes, so that old entries are not reused.
#: 2: masks resized on the images' pixel-centre convention (version 1 sat up to 0.5 px off).
CACHE_VERSION = 2


@dataclass
class CachedArrays:
    """Preprocessed arrays of an index, as memory maps.

    Attributes:
        images: ``(N, S, S)`` float32 in [0, 1].
        masks: ``(N, K, S, S)`` uint8 in {0, 1}.
        kept: ``(N,)`` positions in the index of the rows the arrays hold (all rows unless some
            were skipped as unreadable).
        skipped: slice id -> reason, for unreadable slices skipped with ``skip_unreadable``.
        decoded: slices decoded by this call (0 when the cache already held the entry).
        path: the cache entry directory.
    """

    images: np.ndarray
    masks: np.ndarray
    kept: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)
    decoded: int = 0
    path: Path = Path()


def cache_key(
    index: pd.DataFrame,
    config: PreprocessConfig,
    cache_dir: str | Path | None = None,
    content: bool = True,
) -> str:
    """A hex digest of the index contents, the image files' contents and ``config``.

    Args:
        cache_dir: the cache folder whose entries keep the files' digests by stat key
            (:mod:`advseg.data.content`); None reads every file.
        content: False gives the key as it was before content digests (the files' sizes and
            mtimes), which a run begun then saved (:func:`advseg.data.record.same_data`).
    """
    return key_and_digests(index, config, cache_dir, content)[0]


def key_and_digests(
    index: pd.DataFrame,
    config: PreprocessConfig,
    cache_dir: str | Path | None,
    content: bool = True,
) -> tuple[str, dict[str, list[str]]]:
    """:func:`cache_key` and the image files' digest records (``path -> [stat key, digest]``)
    that the entry built from them keeps (the volume cache keys on it too)."""
    from advseg.data.content import file_digests, known_digests

    classes = index_classes(index)
    content_columns = index[["id", "image_path", "image_z", "width", "height", *classes]]
    paths = list(index["image_path"].unique())
    records: dict[str, list[str]] = {}
    if content:
        stats, records = file_digests(paths, known_digests(cache_dir))
    else:
        stats = {p: _stat(p) for p in paths}
    files = index["image_path"].map(stats)
    row_hashes = pd.util.hash_pandas_object(content_columns, index=False).to_numpy()
    file_hashes = pd.util.hash_pandas_object(files, index=False).to_numpy()
    digest = hashlib.sha256()
    digest.update(row_hashes.tobytes())
    digest.update(file_hashes.tobytes())
    preprocess = config.array_key()
    if (index["width"] == index["height"]).all():  # square slices: pad and stretch agree
        preprocess.pop("resize", None)
    meta = {"version": CACHE_VERSION, "classes": classes, "preprocess": preprocess}
    if (index["image_z"] >= 0).any():  # NIfTI volumes are read in canonical orientation
        meta["orientation"] = "canonical"
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:24], records


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def cached_arrays(
    index: pd.DataFrame,
    config: PreprocessConfig,
    cache_dir: str | Path,
    skip_unreadable: bool = False,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> CachedArrays:
    """The preprocessed arrays of ``index``, from the cache or decoded once and cached.

    Args:
        index: a SliceIndex.
        config: preprocessing.
        cache_dir: where cache entries live.
        skip_unreadable: skip (and report) slices whose image or mask cannot be read, instead of
            stopping at the first one.
        workers: decoding threads (OpenCV and numpy release the GIL while decoding).
        progress: called with the number of slices decoded so far, now and then.

    Raises:
        UserError: the first unreadable slice (unless ``skip_unreadable``), or no readable slice.
    """
    key, digests = key_and_digests(index, config, cache_dir, True)
    entry = Path(cache_dir) / key
    if entry.exists():
        try:
            arrays = _open(entry, decoded=0, expected=(len(index), len(index_classes(index))))
        except _Damaged as err:
            warnings.warn(
                f"{entry}: damaged cache entry ({err}); rebuilding it", AdvsegWarning, stacklevel=2
            )
            _remove_entry(entry)
        else:
            if arrays.skipped and not skip_unreadable:  # cached with skipping; now asked to stop
                raise UserError(next(iter(arrays.skipped.values())))
            keep_digests(entry, digests)  # the files' stat keys now (a copy, a touch)
            return arrays
    remove_debris(entry.parent, recursive=False)  # builds of killed processes
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}.{os.getpid()}.", suffix=".tmp")
        )
    except OSError as err:
        raise UserError(
            f"{entry.parent}: cannot write the cache ({err.strerror or err}); pass --cache-dir "
            f"DIR or set ${CACHE_ENV} (data.cache_dir)"
        ) from None
    try:
        try:
            decoded = _build(tmp, index, config, skip_unreadable, workers, progress)
            meta = json.loads((tmp / "meta.json").read_text())
            meta["key"] = key
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            (tmp / STORE).write_text(json.dumps(digests))
        except OSError as err:  # a full disk at any of the entry's files: one line, no entry
            raise (write_error(entry, err, "cannot write the cache") or err) from None
        fault_point("rename", entry.name)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # pragma: no cover - not a concurrent build
                raise
        return _open(entry, decoded=decoded)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class _Damaged(Exception):
    """A cache entry that cannot be what its key promises (truncated, garbled, incomplete)."""


def _open(entry: Path, decoded: int, expected: tuple[int, int] | None = None) -> CachedArrays:
    """Open an entry's arrays as memory maps, checking what can be checked without reading them.

    Args:
        expected: ``(index rows, classes)``; the arrays' shapes and types must agree with them.

    Raises:
        _Damaged: a file is missing, truncated, garbled or of the wrong shape or type.
    """
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
        masks = np.load(entry / "masks.npy", mmap_mode="r")
        kept = np.load(entry / "kept.npy")
        skipped = meta["skipped"]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise _Damaged(f"{type(err).__name__}: {reason}") from None
    n = len(kept)
    if images.dtype != np.float32 or images.ndim != 3 or images.shape[0] != n:
        raise _Damaged(f"images.npy is {images.dtype} {images.shape}, expected ({n}, S, S) float32")
    if masks.dtype != np.uint8 or masks.ndim != 4 or masks.shape[0] != n:
        raise _Damaged(f"masks.npy is {masks.dtype} {masks.shape}, expected ({n}, K, S, S) uint8")
    if masks.shape[2:] != images.shape[1:] or not isinstance(skipped, dict):
        raise _Damaged("images.npy, masks.npy and meta.json disagree")
    if expected is not None:
        rows, classes = expected
        if masks.shape[1] != classes or n + len(skipped) != rows or (n and kept.max() >= rows):
            raise _Damaged(f"{n} slices of {masks.shape[1]} classes, expected {rows} of {classes}")
    return CachedArrays(
        images=images,
        masks=masks,
        kept=kept,
        skipped=skipped,
        decoded=decoded,
        path=entry,
    )


def _remove_entry(entry: Path) -> None:
    """Move a damaged entry aside (an atomic rename) and delete it."""
    aside = entry.with_name(f".{entry.name}.{os.getpid()}.damaged.tmp")
    os.replace(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _build(
    out: Path,
    index: pd.DataFrame,
    config: PreprocessConfig,
    skip_unreadable: bool,
    workers: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Decode and preprocess every row into ``out``; returns the number of slices decoded."""
    classes = index_classes(index)
    n, k, s = len(index), len(classes), config.size
    fmt = np.lib.format
    images = fmt.open_memmap(out / "images.npy", mode="w+", dtype=np.float32, shape=(n, s, s))
    masks = fmt.open_memmap(out / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, k, s, s))
    for name in ("images.npy", "masks.npy"):  # a full disk fails here, not as SIGBUS later
        _reserve(out / name)
    ok = np.zeros(n, bool)
    skipped: dict[str, str] = {}
    done = 0
    units = _units(index)
    decode = _Decoder(index, classes, config)
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for results in pool.map(decode, units):
            for pos, result in results:
                if isinstance(result, UserError):
                    if not skip_unreadable:
                        raise result
                    skipped[index["id"].iat[pos]] = str(result)
                    continue
                images[pos], masks[pos] = result
                ok[pos] = True
            done += len(results)
            if progress is not None:
                progress(done)
    finally:  # on the first error, do not wait for the rest of the data set to decode
        pool.shutdown(wait=True, cancel_futures=True)
    kept = np.flatnonzero(ok)
    if kept.size == 0:
        raise UserError(f"no readable slice among {n} (first: {next(iter(skipped.values()))})")
    images.flush()
    masks.flush()
    if kept.size < n:  # compact: keep only the readable rows
        del images, masks
        for name in ("images.npy", "masks.npy"):
            full = np.load(out / name, mmap_mode="r")
            np.save(out / f"kept-{name}", full[kept])
            del full
            os.replace(out / f"kept-{name}", out / name)
    np.save(out / "kept.npy", kept)
    meta = {"n": int(kept.size), "classes": classes, "preprocess": config.array_key()}
    (out / "meta.json").write_text(json.dumps({**meta, "skipped": skipped}))
    return n


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now (it is sparse until written).

    Writing through a memory map into a sparse file on a full disk kills the process with SIGBUS
    and no message; reserved blocks turn that into an OSError (ENOSPC) before any work.
    """
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
            raise
    finally:
        os.close(fd)


def _units(index: pd.DataFrame) -> list[list[int]]:
    """Row positions grouped so that one NIfTI volume is read once; one PNG row per unit."""
    z = index["image_z"].to_numpy()
    paths = index["image_path"].to_numpy()
    units: list[list[int]] = []
    for pos in range(len(index)):
        if z[pos] >= 0 and units and z[units[-1][0]] >= 0 and paths[units[-1][0]] == paths[pos]:
            units[-1].append(pos)
        else:
            units.append([pos])
    return units


class _Decoder:
    """Decodes one unit of rows into (position, (image, masks) or the UserError)."""

    def __init__(self, index: pd.DataFrame, classes: list[str], config: PreprocessConfig) -> None:
        self.ids = index["id"].to_numpy()
        self.paths = index["image_path"].to_numpy()
        self.z = index["image_z"].to_numpy()
        self.width = index["width"].to_numpy()
        self.height = index["height"].to_numpy()
        self.rles = index[classes].to_numpy()
        self.classes = classes
        self.config = config
        self.label_source = index.attrs.get("label_source", "labels")

    def __call__(self, unit: list[int]) -> list[tuple[int, object]]:
        try:
            raw = list(self._raw_images(unit))
        except UserError as err:
            return [(pos, err) for pos in unit]
        out: list[tuple[int, object]] = []
        for pos, image in zip(unit, raw, strict=True):
            try:
                h, w = int(self.height[pos]), int(self.width[pos])
                masks = (
                    np.stack(
                        [
                            rle_decode(
                                rle, h, w, where=f"{self.label_source}: {self.ids[pos]}, {c}"
                            )
                            for rle, c in zip(self.rles[pos], self.classes, strict=True)
                        ]
                    )
                    if self.classes
                    else np.zeros((0, h, w), np.uint8)
                )
                out.append((pos, preprocess_slice(image, masks, self.config)))
            except UserError as err:
                out.append((pos, err))
        return out

    def _raw_images(self, unit: list[int]) -> Iterator[np.ndarray]:
        first = unit[0]
        if self.z[first] < 0:
            yield read_png(self.paths[first], int(self.width[first]), int(self.height[first]))
            return
        volume = read_volume(self.paths[first])  # (H, W, Z) after the reader's transpose
        for pos in unit:
            yield volume[:, :, self.z[pos]]
