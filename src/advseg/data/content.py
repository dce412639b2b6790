"""Content digests of the image files, so that the data fingerprint notices changed pixels.

The fingerprint (:func:`advseg.data.cache.cache_key`) once hashed each image file's size and
modification time: a PNG rewritten with other pixels, its size and mtime kept (``touch -r``), went
unnoticed and a run resumed on it without a word (issue 25). It now hashes each file's content
(BLAKE2b, 128 bits). Reading every file at every start would cost as much as decoding them,
so each cache entry keeps the digests of its files in ``<entry>/digests.json``, each beside the
file's stat key ``inode:size:mtime_ns:ctime_ns``: a file whose key is unchanged is not read
again. The change time (ctime) is set by the kernel on every write and cannot be set back by
``touch``, so a rewrite always gives another key and the file is read again; a copy of the data
elsewhere is read once and gives the same digests. ``benchmarks/bench_fingerprint.py`` measures
the cost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from advseg.atomic import write_text_atomic
from advseg.errors import UserError

STORE = "digests.json"
"""The file, in each cache entry, that keeps the digests of the image files it was built from."""

_CHUNK = 1 << 20

Known = dict[str, list[str]]
"""``path -> [stat key, digest]``."""


def stat_key(path: str) -> str | None:
    """``inode:size:mtime_ns:ctime_ns`` of ``path``, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def file_digest(path: str) -> str:
    """BLAKE2b-128 of the file's bytes (``missing`` when it cannot be read)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def known_digests(cache_dir: str | Path | None) -> Known:
    """The digests kept by the entries of ``cache_dir`` (each entry's :data:`STORE`), merged;
    a damaged store is ignored (its files are read again)."""
    known: Known = {}
    if cache_dir is None or not Path(cache_dir).is_dir():
        return known
    for store in sorted(Path(cache_dir).glob(f"*/{STORE}")):
        try:
            loaded = json.loads(store.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(loaded, dict):
            known.update(loaded)
    return known


def file_digests(paths: list[str], known: Known, workers: int = 4) -> tuple[dict[str, str], Known]:
    """The content digest of each of ``paths``, read only where ``known`` has none for the file's
    stat key now.

    Returns:
        ``(path -> digest, path -> [stat key, digest])``: ``missing`` for a file that cannot be
        read (and no record of it); the records are what an entry built from these files keeps.
    """
    keys = {path: stat_key(path) for path in paths}
    digests: dict[str, str] = {}
    records: Known = {}
    todo = []
    for path, key in keys.items():
        entry = known.get(path)
        if key is None:
            digests[path] = "missing"
        elif isinstance(entry, list) and len(entry) == 2 and entry[0] == key:
            digests[path] = str(entry[1])
            records[path] = [key, str(entry[1])]
        else:
            todo.append(path)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for path, digest in zip(todo, pool.map(file_digest, todo), strict=True):
            digests[path] = digest
            if digest != "missing":
                records[path] = [keys[path], digest]  # type: ignore[list-item]
    return digests, records


def keep_digests(entry: Path, records: Known) -> None:
    """Write ``records`` as ``entry``'s :data:`STORE` (atomically) when they differ from what it
    holds; a folder that cannot be written keeps none (the files are then read again)."""
    store = entry / STORE
    try:
        if store.is_file() and json.loads(store.read_text()) == records:
            return
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, UserError):  # not writable: the files are read again
        write_text_atomic(store, json.dumps(records))
