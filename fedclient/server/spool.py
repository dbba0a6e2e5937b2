"""Update bodies of a served SQLite file, in one append-only file per round beside it.

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
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from fedclient._exceptions import StateError

__all__ = ["BodySpool", "spool_directory", "spool_file"]

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def spool_directory(database: str | os.PathLike[str]) -> Path:
    """Where the bodies of the SQLite file ``database`` are kept."""
    path = Path(database)
    return path.with_name(path.name + ".bodies")


def spool_file(directory: str | os.PathLike[str], round_id: int) -> Path:
    """The file that holds the bodies of round ``round_id`` under ``directory``."""
    return Path(directory) / f"round-{round_id}.bin"


def _full(exc: OSError) -> Exception:
    if exc.errno in _FULL:
        return sqlite3.OperationalError(f"database or disk is full (update bodies: {exc})")
    return exc


class BodySpool:
    """One append-only file per round under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._new_files = False
        self._doomed: set[int] = set()

    def _path(self, round_id: int) -> Path:
        return spool_file(self.directory, round_id)

    def _fd(self, round_id: int, *, create: bool) -> int:
        """The round's file, open; made only by an append (``create``): a body a row names
        is never looked for in a file made empty for the purpose."""
        fd = self._fds.get(round_id)
        if fd is None:
            path = self._path(round_id)
            flags = os.O_RDWR | os.O_APPEND
            if create:
                self._new_files |= not path.exists()
                flags |= os.O_CREAT
            fd = os.open(path, flags, 0o600)
            self._fds[round_id] = fd
        return fd

    def append(self, round_id: int, body: bytes) -> int:
        """Write ``body`` at the end of the round's file; its offset there."""
        try:
            fd = self._fd(round_id, create=True)
        except OSError as exc:
            raise _full(exc) from exc
        offset = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(body)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise _full(exc) from exc
        self._dirty.add(round_id)
        return offset

    def read(self, round_id: int, offset: int, length: int) -> bytes:
        """The body stored at ``offset`` in the round's file."""
        try:
            data = os.pread(self._fd(round_id, create=False), length, offset)
        except OSError as exc:
            raise StateError(f"cannot read update bodies of round {round_id}: {exc}") from exc
        if len(data) != length:
            raise StateError(
                f"{self._path(round_id)} is shorter than its rows say: an update body is lost"
            )
        return data

    def sync(self) -> None:
        """Make every body appended since the last sync durable (before a COMMIT)."""
        try:
            for round_id in sorted(self._dirty):
                os.fdatasync(self._fds[round_id])
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
        """Delete the files of ``rounds`` (closed and committed)."""
        for round_id in sorted(rounds):
            self._remove(round_id)

    def keep_only(self, open_rounds: set[int]) -> None:
        """Delete the files of every round not in ``open_rounds`` (at start)."""
        for path in self.directory.glob("round-*.bin"):
            number = path.stem.removeprefix("round-")
            if number.isdigit() and int(number) not in open_rounds:
                self._remove(int(number))

    def _remove(self, round_id: int) -> None:
        fd = self._fds.pop(round_id, None)
        if fd is not None:
            os.close(fd)
        self._dirty.discard(round_id)
        self._path(round_id).unlink(missing_ok=True)

    def close(self) -> None:
        """Close every file (their bodies stay)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
