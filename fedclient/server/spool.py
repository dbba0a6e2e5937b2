"""Update bodies in append-only files: a served SQLite file's, one per round beside it;
PostgreSQL's workers', one per round and worker in a folder they share (`fedserver
--bodies DIR`).

SQLite writes a BLOB twice (into the WAL, then back into the database file) and
frees it again when its round's running sum takes it in (`fedclient.server.rounds`):
for 100,000-parameter updates that was a third of an upload's time in
``bench/ingest.py``. A served SQLite file (`fedserver --db file`, group commit on)
keeps each body once instead, appended to ``<db>.bodies/round-<id>.bin``; the
``updates`` row holds its offset and length. Durability is the database's:

    append     the body is written (not yet synced) while its request runs
    sync       before the group's COMMIT, every file appended to is fdatasync'd (and the
               folder, when a file is new), so a committed row never points at bytes
               that a crash could lose
    discard    a closed round's file is deleted after the COMMIT that closed it, never
               before, and only if the committed round is closed (a close rolled back,
               with its transaction or only its request's savepoint, keeps it)

Bytes appended by a request whose transaction rolled back stay in the file unused
(no row names them) until the round's file goes. At start, files of rounds that are
no longer open are deleted. A file is made only by the first append of its round,
never to read a body a row names: a database whose open rounds' files are missing or
short (a copy made without its folder) is refused at start
(`fedclient.server.integrity`), never served with new bodies at the old offsets.

A full disk raises ``sqlite3.OperationalError`` as SQLite does, so the request is
answered 503 and nothing of it is kept.

PostgreSQL's workers (``--bodies DIR``) keep the same rules in a folder they share:
each appends only to files of its own (``round-<id>.<worker>.bin``, the ``updates``
row naming the worker), syncs them before each COMMIT (its group's, or a
transaction's of its own), and reads anyone's; the worker that closes a round
deletes every worker's files of it after that close committed. PostgreSQL held each
0.4 MB body in its WAL and TOAST (200 chunks, written again when dropped after the
fold): 3.0 ms of its CPU an upload on the 2-core bench machine, against 0.6 ms with
the bodies here (``bench/ingest.py``). Across hosts the folder is a shared mount; a
worker started without it, or with one lacking an open round's files, is refused
(`fedclient.server.integrity`).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import uuid
from pathlib import Path

from fedclient._exceptions import StateError

__all__ = ["BodySpool", "spool_directory", "spool_file"]

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def spool_directory(database: str | os.PathLike[str]) -> Path:
    """Where the bodies of the SQLite file ``database`` are kept."""
    path = Path(database)
    return path.with_name(path.name + ".bodies")


def spool_file(directory: str | os.PathLike[str], round_id: int, worker: str = "") -> Path:
    """The file that holds the bodies of round ``round_id`` under ``directory`` (that
    ``worker`` took, where several share the folder: `BodySpool`)."""
    name = f"round-{round_id}.{worker}.bin" if worker else f"round-{round_id}.bin"
    return Path(directory) / name


def _round_of(path: Path) -> int | None:
    """The round whose bodies ``path`` holds (``round-<id>[.<worker>].bin``), or None."""
    number = path.name.removeprefix("round-").split(".")[0]
    return int(number) if path.name.startswith("round-") and number.isdigit() else None


def _full(exc: OSError) -> Exception:
    if exc.errno in _FULL:
        return sqlite3.OperationalError(f"database or disk is full (update bodies: {exc})")
    return exc


def _unlink_later(path: Path) -> None:
    """Delete ``path`` on a thread of its own (what is left when the process ends first is
    deleted at the next start: `BodySpool.keep_only`)."""
    threading.Thread(target=path.unlink, kwargs={"missing_ok": True}, daemon=True).start()


class BodySpool:
    """One append-only file per round under ``directory`` (see the module docstring).

    ``worker``: where the workers of a PostgreSQL database share the folder (`fedserver
    --bodies DIR`), each appends to files of its own (``round-<id>.<worker>.bin``), and a
    row names the worker whose file holds its body; any worker reads any file."""

    #: Files kept open at most: past it, those with nothing to sync are closed (rounds
    #: another worker closed leave their files open here otherwise).
    OPEN_FILES = 64

    def __init__(self, directory: str | os.PathLike[str], worker: str = "") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.worker = worker
        self._fds: dict[tuple[int, str], int] = {}
        self._dirty: set[tuple[int, str]] = set()
        self._new_files = False
        self._doomed: set[int] = set()

    def _path(self, round_id: int, worker: str) -> Path:
        return spool_file(self.directory, round_id, worker)

    def _fd(self, round_id: int, worker: str, *, create: bool) -> int:
        """The round's file, open; made only by an append (``create``): a body a row names
        is never looked for in a file made empty for the purpose."""
        fd = self._fds.get((round_id, worker))
        if fd is None:
            if len(self._fds) >= self.OPEN_FILES:
                for key in [k for k in self._fds if k not in self._dirty]:
                    os.close(self._fds.pop(key))
            path = self._path(round_id, worker)
            flags = os.O_RDWR | os.O_APPEND
            if create:
                self._new_files |= not path.exists()
                flags |= os.O_CREAT
            fd = os.open(path, flags, 0o600)
            self._fds[(round_id, worker)] = fd
        return fd

    def append(self, round_id: int, body: bytes) -> int:
        """Write ``body`` at the end of the round's file (this worker's); its offset there."""
        try:
            fd = self._fd(round_id, self.worker, create=True)
        except OSError as exc:
            raise _full(exc) from exc
        offset = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(body)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise _full(exc) from exc
        self._dirty.add((round_id, self.worker))
        return offset

    def read(self, round_id: int, offset: int, length: int, worker: str = "") -> bytes:
        """The body stored at ``offset`` in the round's file (``worker``'s)."""
        try:
            data = os.pread(self._fd(round_id, worker, create=False), length, offset)
        except OSError as exc:
            raise StateError(f"cannot read update bodies of round {round_id}: {exc}") from exc
        if len(data) != length:
            raise StateError(
                f"{self._path(round_id, worker)} is shorter than its rows say: an update body"
                " is lost"
            )
        return data

    def sync(self) -> None:
        """Make every body appended since the last sync durable (before a COMMIT)."""
        try:
            for key in sorted(self._dirty):
                os.fdatasync(self._fds[key])
            if self._new_files:
                folder = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
        except OSError as exc:
            raise _full(exc) from exc
        self._dirty.clear()
        self._new_files = False

    def discard(self, round_id: int) -> None:
        """The round is closing: its file may go once that is committed (`doomed`)."""
        self._doomed.add(round_id)

    def doomed(self) -> set[int]:
        """The rounds `discard` named since the last call. After a COMMIT, the caller
        `remove`s those the database now has closed: a close undone with its request's
        savepoint left its round open, and its file must stay."""
        doomed, self._doomed = self._doomed, set()
        return doomed

    def rolled_back(self) -> None:
        """After a rollback: the rounds it would have closed keep their files."""
        self._doomed.clear()

    def remove(self, rounds: set[int]) -> None:
        """Delete the files of ``rounds`` (closed and committed), every worker's."""
        for path in sorted(self.directory.glob("round-*.bin")):
            if _round_of(path) in rounds:
                self._remove(path)
        for key in [k for k in self._fds if k[0] in rounds]:
            os.close(self._fds.pop(key))
            self._dirty.discard(key)

    def keep_only(self, open_rounds: set[int]) -> None:
        """Delete the files of every round not in ``open_rounds`` (at start), and what an
        earlier process left to delete."""
        self.remove(
            {r for r in map(_round_of, self.directory.glob("round-*.bin")) if r is not None}
            - open_rounds
        )
        for left in self.directory.glob(".gone-*"):
            _unlink_later(left)

    def files(self, round_id: int) -> set[str]:
        """The workers with a file of the round here (``""``: a SQLite file's own)."""
        found = set()
        for path in self.directory.glob(f"round-{round_id}.*bin"):
            if _round_of(path) == round_id:
                parts = path.name.split(".")
                found.add(parts[1] if len(parts) == 3 else "")
        return found

    @staticmethod
    def _remove(path: Path) -> None:
        """Delete a round's file: renamed at once (it is gone by its name), its blocks
        freed on a thread of its own (a round of 3,000 bodies of 400 kB is a 1.2 GB file,
        which took 350 ms to unlink here: not on the event loop)."""
        gone = path.with_name(f".gone-{uuid.uuid4().hex[:8]}-{path.name}")
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            return
        _unlink_later(gone)

    def close(self) -> None:
        """Close every file (their bodies stay)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
