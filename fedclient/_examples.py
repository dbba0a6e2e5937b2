"""The on-device example store: training data that arrive over days, kept, bounded, forgettable.

An app rarely holds its training set in memory: readings, typed words and photos
arrive while it runs, and a user may ask for theirs to be forgotten. An
`ExampleStore` keeps labelled examples in SQLite (the device state's file, or
one of its own), a row each: float32 features, a label, when it was added and
an optional ``source`` tag (a conversation, a day, a user).

- **Retention** (``max_examples``, ``max_age_seconds``) is enforced on every
  `add` and when the store opens, so limits hold across restarts.
- **Forgetting** (`forget`) deletes rows and their bytes: the store's
  connection runs with ``secure_delete`` on (freed pages are zeroed) and the
  write-ahead log is checkpointed and truncated afterwards, so the features are
  no longer anywhere in the files.
- **Snapshots**: a round trains on `arrays` read once, when training starts;
  examples added meanwhile wait for the next round.

A `fedclient.Client` takes a store wherever it takes ``(x, y)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import sqlite_utils

from fedclient._exceptions import InvalidInput
from fedclient._state import DeviceState

__all__ = ["ExampleStore"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS examples ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, added REAL NOT NULL,"
    " source TEXT NOT NULL DEFAULT '', label INTEGER NOT NULL, features BLOB NOT NULL)"
)
_INDEX = "CREATE INDEX IF NOT EXISTS examples_by_key ON examples (key, id)"


class ExampleStore:
    """Labelled examples a device collects, in SQLite (see the module docstring).

    ``db`` is a path, a `fedclient.DeviceState` (its file and device key), or an
    open `sqlite_utils.Database`. ``inputs`` fixes the feature count (taken from
    the first example otherwise)."""

    def __init__(
        self,
        db: str | Path | DeviceState | sqlite_utils.Database,
        *,
        key: str | None = None,
        inputs: int | None = None,
        max_examples: int | None = None,
        max_age_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(db, DeviceState):
            self.db, self.key = db.db, key or db.key
        elif isinstance(db, sqlite_utils.Database):
            self.db, self.key = db, key or "device"
        else:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self.db, self.key = sqlite_utils.Database(db, execute_plugins=False), key or "device"
            self.db.enable_wal()
        if max_examples is not None and max_examples < 1:
            raise InvalidInput("max_examples must be at least 1")
        if max_age_seconds is not None and not max_age_seconds > 0:
            raise InvalidInput("max_age_seconds must be positive")
        self.inputs = inputs
        self.max_examples = max_examples
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        # Deleted rows leave no bytes behind: freed pages are zeroed on this connection.
        self.db.execute("PRAGMA secure_delete=ON")
        with self.db.atomic():
            self.db.execute(_SCHEMA)
            self.db.execute(_INDEX)
        if self.inputs is None:
            row = self.db.execute(
                "SELECT length(features) FROM examples WHERE key=? LIMIT 1", [self.key]
            ).fetchone()
            if row:
                self.inputs = int(row[0]) // 4
        self.enforce_retention()

    def __len__(self) -> int:
        row = self.db.execute("SELECT count(*) FROM examples WHERE key=?", [self.key]).fetchone()
        return int(row[0])

    def add(self, x: npt.ArrayLike, y: npt.ArrayLike, *, source: str = "") -> list[int]:
        """Keep examples (``x``: one row of features each; ``y``: their labels); their ids.

        Finite features and non-negative integer labels only; the retention limits
        apply at once."""
        xs = np.asarray(x, dtype=np.float32)
        ys = np.asarray(y)
        if xs.ndim == 1:
            xs, ys = xs[None, :], ys.reshape(1)
        if xs.ndim != 2 or ys.shape != (xs.shape[0],):
            raise InvalidInput("add wants x of shape (n, features) and y of shape (n,)")
        if self.inputs is not None and xs.shape[1] != self.inputs:
            raise InvalidInput(f"examples have {self.inputs} features, got {xs.shape[1]}")
        if not np.all(np.isfinite(xs)):
            raise InvalidInput("features must be finite")
        if ys.size and (not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0):
            raise InvalidInput("labels must be non-negative integers")
        now = self.clock()
        ids = []
        with self.db.atomic():
            for row, label in zip(xs, ys, strict=True):
                cursor = self.db.execute(
                    "INSERT INTO examples (key, added, source, label, features)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [self.key, now, source, int(label), row.tobytes()],
                )
                ids.append(int(cursor.lastrowid or 0))
            self.inputs = xs.shape[1]
            dropped = self._retain(now)
        if dropped:  # what retention dropped leaves no copy in the log either
            self._checkpoint()
        return ids

    def arrays(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Every example now, as ``(x, y)`` (a snapshot: later adds do not change it)."""
        rows = self.db.execute(
            "SELECT features, label FROM examples WHERE key=? ORDER BY id", [self.key]
        ).fetchall()
        if not rows:
            return np.zeros((0, self.inputs or 0), np.float32), np.zeros(0, np.int64)
        x = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32)
        return x.reshape(len(rows), -1).copy(), np.array([r[1] for r in rows], np.int64)

    def forget(
        self,
        ids: list[int] | None = None,
        *,
        source: str | None = None,
        before: float | None = None,
    ) -> int:
        """Delete examples (by ``ids``, by ``source``, or added ``before`` a time; all
        given conditions must hold) and their bytes; how many went. With no condition,
        every example of this device goes."""
        where: list[str] = ["key=?"]
        args: list[object] = [self.key]
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args += [int(i) for i in ids]
        if source is not None:
            where.append("source=?")
            args.append(source)
        if before is not None:
            where.append("added<?")
            args.append(float(before))
        with self._scrubbed():
            cursor = self.db.execute(f"DELETE FROM examples WHERE {' AND '.join(where)}", args)
        return int(cursor.rowcount)

    def enforce_retention(self) -> int:
        """Drop what the limits no longer allow (oldest first); how many went."""
        with self._scrubbed():
            return self._retain(self.clock())

    def _retain(self, now: float) -> int:
        dropped = 0
        if self.max_age_seconds is not None:
            cursor = self.db.execute(
                "DELETE FROM examples WHERE key=? AND added<?",
                [self.key, now - self.max_age_seconds],
            )
            dropped += cursor.rowcount
        if self.max_examples is not None:
            cursor = self.db.execute(
                "DELETE FROM examples WHERE key=? AND id NOT IN"
                " (SELECT id FROM examples WHERE key=? ORDER BY id DESC LIMIT ?)",
                [self.key, self.key, self.max_examples],
            )
            dropped += cursor.rowcount
        return dropped

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        """A transaction whose deletions leave no copy in the write-ahead log either."""
        with self.db.atomic():
            yield
        self._checkpoint()

    def _checkpoint(self) -> None:
        if self.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
