"""How the device SDK opens SQLite: one connection per file, usable from any thread.

An app makes its `fedclient.Client`, `DeviceState` and `ExampleStore` on one
thread and uses them from others (``run_forever`` on a worker, ``predict`` on
the UI thread). Python's sqlite3 binds a connection to the thread that made it
unless told otherwise, and a connection shared between threads would mix their
transactions (one thread's write inside another's ``BEGIN``, undone by its
rollback). So the SDK opens each file as a `SharedDatabase`: its connection may
be used from any thread, and a reentrant lock serialises it. Each statement
runs with its rows fetched at once, and each ``atomic()`` block runs whole,
before another thread's. Nothing slow runs under the lock: training and network
calls happen between statements, so a reader waits at most for one transaction.

A plain `sqlite_utils.Database` handed to the SDK (the simulator shares one
between a thousand virtual devices on one thread) is used as it is, unlocked.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlite_utils

from fedclient._exceptions import StateError

__all__ = ["Rows", "SharedDatabase", "lock_of", "opening"]


class Rows:
    """A statement's result, read whole while the connection was held: what callers use
    of a `sqlite3.Cursor` (``fetchone``, ``fetchall``, iteration, ``rowcount``,
    ``lastrowid``, ``description``)."""

    __slots__ = ("_at", "_rows", "description", "lastrowid", "rowcount")

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.description = cursor.description
        self._rows: list[Any] = cursor.fetchall() if cursor.description is not None else []
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        self._at = 0

    def fetchone(self) -> Any:
        """The next row, or None."""
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self) -> list[Any]:
        """The rows not read yet."""
        rest, self._at = self._rows[self._at :], len(self._rows)
        return rest

    def fetchmany(self, size: int = 1) -> list[Any]:
        """Up to ``size`` of the rows not read yet."""
        some = self._rows[self._at : self._at + size]
        self._at += len(some)
        return some

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class SharedDatabase(sqlite_utils.Database):
    """A `sqlite_utils.Database` on a connection any thread may use, one at a time.

    ``path`` None: a database in memory (it lives as long as the object)."""

    def __init__(self, path: str | Path | None) -> None:
        self.lock = threading.RLock()
        target = ":memory:" if path is None else str(path)
        # The lock does what check_same_thread guards against; 5 s for another
        # connection's write (another process, or the app's own second connection).
        connection = sqlite3.connect(target, check_same_thread=False, timeout=5.0)
        # No sqlite-utils plugins: an app starts without scanning every installed
        # package's entry points for them (27 ms here, more on a phone).
        super().__init__(connection, execute_plugins=False)

    def execute(  # type: ignore[override]  # a Cursor's reading half, already read
        self, sql: str, parameters: Sequence[Any] | dict[str, Any] | None = None
    ) -> Rows:
        """Run one statement and read its rows, holding the connection throughout."""
        with self.lock:
            return Rows(super().execute(sql, parameters))

    @contextmanager
    def atomic(self) -> Iterator[SharedDatabase]:
        """One transaction (nested: a savepoint), no other thread's statement inside it."""
        with self.lock, super().atomic():
            yield self

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.conn.close()


def lock_of(db: sqlite_utils.Database) -> AbstractContextManager[Any]:
    """What serialises ``db`` between threads: a `SharedDatabase`'s lock, or nothing for
    a plain database (one thread's, by its owner's choice)."""
    lock = getattr(db, "lock", None)
    return lock if lock is not None else nullcontext()


@contextmanager
def opening(path: str | Path) -> Iterator[None]:
    """Open the SDK's file at ``path`` in the block: what goes wrong (not a database, a
    folder, no permission) is a `StateError` naming the file, as every SDK error is a
    `fedclient.FedError`."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StateError(f"{path}: cannot be used as a fedclient SQLite file: {exc}") from exc
