"""The decompressed bytes of a data set's gzip'd files: from fedsim's cache, or
decompressed on threads while ``fedsim`` imports its modules.

A run starts with ~0.4 s of imports (numpy, httpx, starlette, sqlite-utils, the
SDK) and, for MNIST, ~0.25 s of gunzipping. The first run keeps each file's
decompressed bytes in a cache folder, as torchvision keeps its processed MNIST
and Flower Datasets its Arrow files; later runs map those bytes instead of
inflating them again. Without a cached copy, ``fedsim run`` starts the
decompression first (zlib releases the GIL while it inflates, and this module
needs only the standard library) and the loader in `fedclient.sim.datasets` takes the
bytes when it gets there, or reads the file itself when nothing was started.

The cache folder is ``$FEDSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedsim``, else
``~/.cache/fedsim``; ``FEDSIM_CACHE_DIR=off`` turns the cache off. An entry is named
by the source file's path, size and modification time, so an edited or replaced
file is decompressed again; an entry whose length is not the one the gzip trailer
records is ignored. A cache that cannot be written is skipped, never an error.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import mmap
import os
import threading
from pathlib import Path

__all__ = ["GZIP_FILES", "cache_dir", "cached_copy", "folder", "prefetch", "read_gzip"]

#: The gzip'd files of the data sets that have them (in ``--data-dir/<data set>/``).
GZIP_FILES: dict[str, tuple[str, ...]] = {
    "mnist": (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ),
    "shakespeare": ("shakespeare_speeches.jsonl.gz",),
}


def cache_dir() -> Path | None:
    """Where decompressed data files are kept (None: the cache is off)."""
    chosen = os.environ.get("FEDSIM_CACHE_DIR", "")
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        return (Path(xdg) if xdg else Path.home() / ".cache") / "fedsim"
    except RuntimeError:  # no home directory to put it in
        return None


def _trailer(path: Path) -> bytes:
    """The gzip trailer of ``path``: the CRC-32 and size (mod 2**32) of what it holds."""
    with path.open("rb") as handle:
        handle.seek(-8, os.SEEK_END)
        return handle.read(8)


def cached_copy(path: Path, trailer: bytes | None = None) -> Path | None:
    """Where ``path``'s decompressed bytes are (or would be) cached; None if uncached.

    Named by the file's path, size, modification time and trailer (``trailer``, when
    the caller read it already): a file rewritten in place, even within one tick of
    the file system's clock, gets a new name."""
    where = cache_dir()
    if where is None:
        return None
    stat = path.stat()
    trailer = _trailer(path) if trailer is None else trailer
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{trailer.hex()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return where / f"{digest}-{path.name.removesuffix('.gz')}"


def _whole_copy(path: Path) -> Path | None:
    """The cached copy of ``path``'s decompressed bytes, if one is there and whole."""
    try:
        trailer = _trailer(path)
        copy = cached_copy(path, trailer)
        if copy is None:
            return None
        size = int.from_bytes(trailer[4:], "little")
        if copy.stat().st_size % 2**32 != size:
            return None  # none, or not the whole file: decompress again
        return copy
    except OSError:
        return None


def _from_cache(path: Path) -> bytes | mmap.mmap | None:
    """The cached decompressed bytes of ``path`` (mapped, not read), if cached whole."""
    copy = _whole_copy(path)
    if copy is None:
        return None
    try:
        with copy.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return b""
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def _keep(path: Path, data: bytes) -> None:
    """Cache ``path``'s decompressed bytes (written aside, then renamed into place)."""
    with contextlib.suppress(OSError):
        copy = cached_copy(path)
        if copy is None:
            return
        copy.parent.mkdir(parents=True, exist_ok=True)
        aside = copy.with_name(f"{copy.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            aside.write_bytes(data)
            os.replace(aside, copy)
        finally:
            aside.unlink(missing_ok=True)


def _decompress(path: Path) -> bytes:
    data = gzip.decompress(path.read_bytes())
    _keep(path, data)
    return data


class _Read(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name=f"prefetch {path.name}", daemon=True)
        self.path = path
        self.data: bytes | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.data = _decompress(self.path)
        except Exception as exc:  # handed to whoever takes the file
            self.error = exc


_started: dict[Path, _Read] = {}


def folder(data_dir: Path, dataset: str) -> Path:
    """Where ``dataset``'s files are: ``data_dir/<dataset>/`` if it exists, else ``data_dir``."""
    sub = data_dir / dataset
    return sub if sub.is_dir() else data_dir


def prefetch(dataset: str, data_dir: str | Path | None) -> None:
    """Start decompressing ``dataset``'s files, if it has any, they are there and no
    decompressed copy of them is cached."""
    if dataset not in GZIP_FILES or data_dir is None:
        return
    where = folder(Path(data_dir), dataset)
    for name in GZIP_FILES[dataset]:
        path = (where / name).resolve()
        if path.is_file() and path not in _started and _whole_copy(path) is None:
            _started[path] = _Read(path)
            _started[path].start()


def read_gzip(path: Path) -> bytes | mmap.mmap:
    """The decompressed bytes of ``path``: prefetched, cached, or decompressed now."""
    started = _started.pop(path.resolve(), None)
    if started is None:
        cached = _from_cache(path)
        return cached if cached is not None else _decompress(path)
    started.join()
    if started.error is not None:
        raise started.error
    assert started.data is not None
    return started.data
