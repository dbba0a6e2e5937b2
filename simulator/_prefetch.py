"""Decompress a data set's files on threads while ``fedsim`` imports its modules.

A run starts with ~0.5 s of imports (numpy, httpx, starlette, sqlite-utils, the
SDK) and, for MNIST, ~0.25 s of gunzipping. zlib releases the GIL while it
inflates, so ``fedsim run`` starts the decompression first (this module needs
only the standard library) and the loader in `simulator.datasets` takes the
bytes when it gets there, or reads the file itself when nothing was started.
"""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

__all__ = ["GZIP_FILES", "folder", "prefetch", "read_gzip"]

#: The gzip'd files of the data sets that have them (in ``--data-dir/<data set>/``).
GZIP_FILES: dict[str, tuple[str, ...]] = {
    "mnist": (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ),
}


class _Read(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name=f"prefetch {path.name}", daemon=True)
        self.path = path
        self.data: bytes | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.data = gzip.decompress(self.path.read_bytes())
        except Exception as exc:  # handed to whoever takes the file
            self.error = exc


_started: dict[Path, _Read] = {}


def folder(data_dir: Path, dataset: str) -> Path:
    """Where ``dataset``'s files are: ``data_dir/<dataset>/`` if it exists, else ``data_dir``."""
    sub = data_dir / dataset
    return sub if sub.is_dir() else data_dir


def prefetch(dataset: str, data_dir: str | Path | None) -> None:
    """Start decompressing ``dataset``'s files, if it has any and they are there."""
    if dataset not in GZIP_FILES or data_dir is None:
        return
    where = folder(Path(data_dir), dataset)
    for name in GZIP_FILES[dataset]:
        path = (where / name).resolve()
        if path.is_file() and path not in _started:
            _started[path] = _Read(path)
            _started[path].start()


def read_gzip(path: Path) -> bytes:
    """The decompressed bytes of ``path``: prefetched, or read now."""
    started = _started.pop(path.resolve(), None)
    if started is None:
        return gzip.decompress(path.read_bytes())
    started.join()
    if started.error is not None:
        raise started.error
    assert started.data is not None
    return started.data
