"""The on-device example store: training data that arrive over days, kept, bounded, forgettable.

An app rarely holds its training set in memory: readings, typed words and photos
arrive while it runs, and a user may ask for theirs to be forgotten. An
`ExampleStore` keeps labelled examples in SQLite (the device state's file, or
one of its own), a row each: float32 features, a label, when it was added and
an optional ``source`` tag (a conversation, a day, a user).

- **Retention** (``max_examples``, ``max_age_seconds``) is stored with the
  examples and enforced on every `add` and when the store opens, so the limits
  hold across restarts, whoever opens the file next (`set_limits` changes them).
- **Forgetting** (`forget`) deletes rows and their bytes: the store's
  connection runs with ``secure_delete`` on (freed pages are zeroed) and the
  write-ahead log is checkpointed into the file and truncated afterwards. A
  reader on another connection (another process, a backup) can hold the old
  pages in place for as long as its read lasts: `forget` waits for it a while,
  then says in its `Forgotten` answer whether the bytes are gone, and the store
  finishes the scrub at its next use (or `scrub`). Each forget moves the store's
  `generation`, so models fine-tuned on what was forgotten are dropped.
- **Snapshots**: a round trains on `arrays` read once, when training starts;
  examples added meanwhile wait for the next round.
- **Threads**: a store opened from a path may be used from any thread.

A `fedclient.Client` takes a store wherever it takes ``(x, y)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import sqlite_utils

from fedclient._exceptions import InvalidInput
from fedclient._sqlite import SharedDatabase, lock_of, opening
from fedclient._state import DeviceState

__all__ = ["ExampleStore", "Forgotten"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS examples ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, added REAL NOT NULL,"
    " source TEXT NOT NULL DEFAULT '', label INTEGER NOT NULL, features BLOB NOT NULL)"
)
_INDEX = "CREATE INDEX IF NOT EXISTS examples_by_key ON examples (key, id)"
# The retention limits that travel with the examples, and how many forgets they saw.
_SETTINGS = (
    "CREATE TABLE IF NOT EXISTS example_settings (key TEXT PRIMARY KEY, max_examples INTEGER,"
    " max_age_seconds REAL, generation INTEGER NOT NULL DEFAULT 0)"
)

#: How long `ExampleStore.forget` waits, by default, for other connections' reads to
#: end so that the forgotten bytes can leave the file.
FORGET_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class Forgotten:
    """What `ExampleStore.forget` did.

    ``count`` examples were deleted (their rows are gone for every reader at once).
    ``complete``: their bytes are gone from the database file and its write-ahead log.
    When False, another connection's read still held the old pages: the store
    finishes at its next use, or when `ExampleStore.scrub` succeeds; ``reason`` says
    what held it."""

    count: int
    complete: bool
    reason: str = ""


class ExampleStore:
    """Labelled examples a device collects, in SQLite (see the module docstring).

    ``db`` is a path, a `fedclient.DeviceState` (its file and device key), or an
    open `sqlite_utils.Database`. ``inputs`` fixes the feature count (taken from
    the first example otherwise). ``max_examples`` and ``max_age_seconds`` set the
    retention limits and store them; left None, the stored limits hold (none, for a
    new store)."""

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
            with opening(db):
                Path(db).parent.mkdir(parents=True, exist_ok=True)
                self.db, self.key = SharedDatabase(db), key or "device"
                self.db.enable_wal()
        _check_limits(max_examples, max_age_seconds)
        self._lock = lock_of(self.db)
        self.inputs = inputs
        self.clock = clock
        self._scrub_pending = threading.Event()  # set: forgotten bytes may still be in files
        # Deleted rows leave no bytes behind: freed pages are zeroed on this connection.
        self.db.execute("PRAGMA secure_delete=ON")
        with self.db.atomic():
            self.db.execute(_SCHEMA)
            self.db.execute(_INDEX)
            self.db.execute(_SETTINGS)
            self.db.execute("INSERT OR IGNORE INTO example_settings (key) VALUES (?)", [self.key])
            if max_examples is not None:
                self.db.execute(
                    "UPDATE example_settings SET max_examples=? WHERE key=?",
                    [max_examples, self.key],
                )
            if max_age_seconds is not None:
                self.db.execute(
                    "UPDATE example_settings SET max_age_seconds=? WHERE key=?",
                    [max_age_seconds, self.key],
                )
        if self.inputs is None:
            row = self.db.execute(
                "SELECT length(features) FROM examples WHERE key=? LIMIT 1", [self.key]
            ).fetchone()
            if row:
                self.inputs = int(row[0]) // 4
        # What a forget left behind when the app stopped goes now (if no one reads).
        self._scrub_pending.set()
        self.enforce_retention()

    def __len__(self) -> int:
        row = self.db.execute("SELECT count(*) FROM examples WHERE key=?", [self.key]).fetchone()
        return int(row[0])

    # -- limits ------------------------------------------------------------------
    @property
    def max_examples(self) -> int | None:
        """The most examples kept (the oldest go first), as stored; None: no limit."""
        return self._limits()[0]

    @property
    def max_age_seconds(self) -> float | None:
        """How long an example is kept, as stored; None: no limit."""
        return self._limits()[1]

    def set_limits(self, *, max_examples: int | None, max_age_seconds: float | None) -> int:
        """Store new retention limits (None lifts one) and apply them; how many went."""
        _check_limits(max_examples, max_age_seconds)
        with self._scrubbed():
            self.db.execute(
                "UPDATE example_settings SET max_examples=?, max_age_seconds=? WHERE key=?",
                [max_examples, max_age_seconds, self.key],
            )
            return self._retain(self.clock())

    def _limits(self) -> tuple[int | None, float | None]:
        row = self.db.execute(
            "SELECT max_examples, max_age_seconds FROM example_settings WHERE key=?", [self.key]
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    @property
    def generation(self) -> int:
        """How many forgets this store has seen (stored): a model trained or tuned on its
        examples at another generation may hold forgotten examples."""
        row = self.db.execute(
            "SELECT generation FROM example_settings WHERE key=?", [self.key]
        ).fetchone()
        return int(row[0]) if row else 0

    # -- examples ----------------------------------------------------------------
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
            self._scrub_pending.set()
        self._finish_scrub()
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

    def snapshot(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], int]:
        """`arrays` and the `generation` they belong to, read together."""
        with self._lock:
            x, y = self.arrays()
            return x, y, self.generation

    def label_bounds(self) -> tuple[int, int] | None:
        """The smallest and largest label held (None: no examples), without reading the
        features: what a device checks against a job's classes before it checks in."""
        row = self.db.execute(
            "SELECT min(label), max(label) FROM examples WHERE key=?", [self.key]
        ).fetchone()
        return None if row is None or row[0] is None else (int(row[0]), int(row[1]))

    def forget(
        self,
        ids: list[int] | None = None,
        *,
        source: str | None = None,
        before: float | None = None,
        wait_seconds: float = FORGET_WAIT_SECONDS,
    ) -> Forgotten:
        """Delete examples (by ``ids``, by ``source``, or added ``before`` a time; all
        given conditions must hold) and their bytes. With no condition, every example
        of this device goes.

        The rows are gone when this returns. Their bytes leave the file once no other
        connection reads the pages that held them: this waits up to ``wait_seconds``
        for that, and the answer says whether it happened (`Forgotten`)."""
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
        with self.db.atomic():
            cursor = self.db.execute(f"DELETE FROM examples WHERE {' AND '.join(where)}", args)
            count = int(cursor.rowcount)
            if count:
                self.db.execute(
                    "UPDATE example_settings SET generation = generation + 1 WHERE key=?",
                    [self.key],
                )
        self._scrub_pending.set()
        complete = self.scrub(wait_seconds)
        reason = "" if complete else "another connection is reading the database"
        return Forgotten(count, complete, reason)

    def scrub(self, wait_seconds: float = 0.0) -> bool:
        """Finish removing the bytes of what was deleted (copy the write-ahead log into
        the file, truncate it), trying for up to ``wait_seconds``; whether it is done."""
        deadline = time.monotonic() + wait_seconds
        pause = 0.005
        while not self._finish_scrub():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))  # another connection's read must end first
            pause = min(pause * 2, 0.1)
        return True

    @property
    def scrub_pending(self) -> bool:
        """Whether bytes of deleted examples may still be in the files (`scrub`)."""
        return self._scrub_pending.is_set()

    def enforce_retention(self) -> int:
        """Drop what the limits no longer allow (oldest first); how many went."""
        with self._scrubbed():
            return self._retain(self.clock())

    def _retain(self, now: float) -> int:
        max_examples, max_age_seconds = self._limits()
        dropped = 0
        if max_age_seconds is not None:
            cursor = self.db.execute(
                "DELETE FROM examples WHERE key=? AND added<?",
                [self.key, now - max_age_seconds],
            )
            dropped += cursor.rowcount
        if max_examples is not None:
            cursor = self.db.execute(
                "DELETE FROM examples WHERE key=? AND id NOT IN"
                " (SELECT id FROM examples WHERE key=? ORDER BY id DESC LIMIT ?)",
                [self.key, self.key, max_examples],
            )
            dropped += cursor.rowcount
        return dropped

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        """A transaction whose deletions leave no copy in the write-ahead log either
        (as soon as no other connection reads)."""
        with self.db.atomic():
            yield
        self._scrub_pending.set()
        self._finish_scrub()

    def _finish_scrub(self) -> bool:
        """One try at moving the log into the file and truncating it, if anything
        deleted may be left there; whether nothing is left."""
        if not self._scrub_pending.is_set():
            return True
        with self._lock:
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                # One try, not the connection's busy wait: `scrub` paces the retries.
                waits = self.db.execute("PRAGMA busy_timeout").fetchone()[0]
                self.db.execute("PRAGMA busy_timeout=0")
                try:
                    # (busy, log frames, frames copied): busy 1 if a reader held it back.
                    busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                finally:
                    self.db.execute(f"PRAGMA busy_timeout={int(waits)}")
                if busy:
                    return False
            self._scrub_pending.clear()
            return True


def _check_limits(max_examples: int | None, max_age_seconds: float | None) -> None:
    if max_examples is not None and max_examples < 1:
        raise InvalidInput("max_examples must be at least 1")
    if max_age_seconds is not None and not max_age_seconds > 0:
        raise InvalidInput("max_age_seconds must be positive")
