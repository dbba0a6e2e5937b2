"""The server's store: devices, jobs, model versions, rounds, admissions, updates.

One schema, in SQLite (a file: the embedded default) or PostgreSQL (shared by several
workers); `fedclient.server.database` says how the two are spoken to alike. Every
mutation a handler makes runs inside one `ServerStore.atomic` block, so a crash or a
rejected request leaves no half-written round. Update bodies are kept until they are
folded into their round's sum or their round closes; receipts (and idempotency keys)
are kept for good.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import msgspec

from fedclient._exceptions import StateError
from fedclient.protocol import JobPlan
from fedclient.server.database import Database, is_postgres
from fedclient.server.device_rows import DeviceRows
from fedclient.server.engines import connect
from fedclient.server.exchange_rows import ExchangeRows
from fedclient.server.model_rows import ModelRows
from fedclient.server.round_parts import RoundParts
from fedclient.server.schema import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    JobRow,
    RoundRow,
    SessionRow,
    UpdateRow,
)
from fedclient.server.spool import BodySpool
from fedclient.server.spooled_bodies import SpooledBodies
from fedclient.server.update_rows import UpdateRows

__all__ = [
    "SCHEMA_VERSION",
    "JobRow",
    "RoundRow",
    "ServerStore",
    "SessionRow",
    "UpdateRow",
    "serialised",
]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

#: Rounds whose admitted devices, contributors and update count the store keeps in
#: memory (the open ones, and the closed ones an async upload still asks about).
KEPT_ROUNDS = 64


class ServerStore(SpooledBodies, DeviceRows, ExchangeRows, ModelRows, RoundParts, UpdateRows):
    """All server state in one database: a SQLite file (or ``":memory:"``), or a
    PostgreSQL database (``postgresql://...``) that several workers share. Devices and
    enrolment codes (`DeviceRows`), secure-aggregation logs and chunked uploads
    (`ExchangeRows`), model versions and what else a job learns (`ModelRows`), and
    each worker's count and partial sum of a round (`RoundParts`) are kept in rows of
    their own, by the same database."""

    def __init__(self, url: str | Path = ":memory:", *, lock_file: bool = False) -> None:
        """``lock_file``: a SQLite file is served by this store's process alone; another
        process that asks the same is refused (`fedclient.server.engines.connect`)."""
        self.db: Database = connect(url, lock_file=lock_file)
        #: Where the database is (a path, ``":memory:"`` or a URL).
        self.url = str(url)
        self._plans: dict[str, JobPlan] = {}  # stored plan text -> its decoded plan
        # What every request reads, kept in memory: jobs, rounds, and each round's
        # admitted devices, contributors and update count (for the last `KEPT_ROUNDS`
        # rounds asked about). Between two `exclusive` blocks nobody else writes a SQLite
        # file (one server process); a shared database drops all of it when a block
        # begins. Inside one, this store is the only writer, so each write below updates
        # or drops what it changes, and a transaction that rolls back drops all of it.
        self._jobs: dict[str, JobRow] = {}
        self._rounds: dict[int, RoundRow] = {}
        self._open: list[RoundRow] | None = None
        self._newest: dict[str, RoundRow] = {}
        self._update_counts: dict[int, int] = {}
        self._updated: dict[int, set[str]] = {}  # round -> the devices with an update in it
        self._admitted: dict[int, set[str]] = {}  # round -> its admitted devices
        #: Moves whenever this store writes a job's status or a round's, or loses writes
        #: (a rollback): a view of a job read earlier holds while it has not moved
        #: (`fedclient.server.job_snapshots`).
        self.changes = 0
        #: This worker's name among those that share the database: the updates it takes
        #: and the partial sum it folds them into are its own (`fold_mine`). One process
        #: serves a SQLite file: its name is empty.
        self.worker = uuid.uuid4().hex[:12] if self.db.shared else ""
        self._waiting = None
        self._taken = None
        #: Where update bodies are appended (`spool_bodies`), or None: in the database.
        self._spool: BodySpool | None = None
        self._reader: BodySpool | None = None  # reads bodies an earlier server spooled
        self.db.on_rollback.append(self._rolled_back)  # a group commit failed
        with self.exclusive(), self.atomic():  # workers starting together migrate once
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(self.db.ddl(statement))
            version = self._schema_version()
            self._migrate(1 if version is None else version)

    @property
    def shared(self) -> bool:
        """Whether other workers write the same database (PostgreSQL)."""
        return self.db.shared

    def _schema_version(self) -> int | None:
        row = self.db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        return int(row[0]) if row and str(row[0]).isdigit() else None

    def _migrate(self, version: int) -> None:
        """Bring the schema from ``version`` to `SCHEMA_VERSION` (in the caller's
        transaction) and record it."""
        if version > SCHEMA_VERSION:
            raise StateError(
                f"database schema {version} is newer than this fedserver ({SCHEMA_VERSION});"
                " upgrade fedclient"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                text = statement if isinstance(statement, str) else statement.get(self.db.kind)
                if text:
                    self.db.execute(self.db.ddl(text))
        self.db.execute(
            "INSERT INTO meta VALUES ('schema_version', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [str(SCHEMA_VERSION)],
        )

    @classmethod
    def create(cls, url: str | Path) -> ServerStore:
        """A new, empty database at ``url``; `fedclient.StateError` if a file (or, in
        PostgreSQL, a fedserver schema) is there."""
        if is_postgres(url):
            db = connect(url)
            try:
                taken = "meta" in db.tables()
            finally:
                db.close()
            if taken:
                raise StateError(
                    f"{str(url).split('@')[-1]}: already holds a fedserver database;"
                    " not overwriting it"
                )
            return cls(url)
        where = Path(str(url).removeprefix("sqlite:///"))
        if where.exists() and where.stat().st_size > 0:
            raise StateError(f"{where}: a file is already there; not overwriting it")
        return cls(where)

    @contextmanager
    def atomic(self, *, grouped: bool = False) -> Iterator[None]:
        """One transaction (nested blocks become savepoints). When it rolls back, what
        the store kept in memory of it goes too: the next reads come from the database.
        ``grouped``: it may be committed with other requests' (`Database.atomic`)."""
        try:
            with self.db.atomic(grouped=grouped):
                yield
        except BaseException:
            self._rolled_back()
            raise

    @contextmanager
    def exclusive(self, *, lock: bool = True) -> Iterator[None]:
        """Serve one request (re-entrant; every handler runs inside one). With ``lock``,
        alone: no other worker of a shared database serves a locked block until it ends.
        Without, beside the others: what it writes must hold whatever they do meanwhile
        (conditional updates, row locks: `admit_within`, `hold_for_upload`, `claim_close`)."""
        with self.db.exclusive(lock=lock) as fresh:
            if fresh and self.db.shared:
                self._forget()  # another worker may have written since
            yield

    def _rolled_back(self) -> None:
        self._forget()
        self.changes += 1

    def _forget(self) -> None:
        """Drop every row kept in memory; the next reads come from the database."""
        self._waiting = self._taken = None
        self._jobs.clear()
        self._forget_rounds()
        self._update_counts.clear()
        self._updated.clear()
        self._admitted.clear()

    def _forget_rounds(self) -> None:
        self._rounds.clear()
        self._open = None
        self._newest.clear()

    def close(self) -> None:
        """Close the database."""
        self.db.close()
        if self._reader is not None:  # the spool too, when it spools (the same object)
            self._reader.close()

    def __enter__(self) -> ServerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs and models -------------------------------------------------------
    def add_job(self, plan: JobPlan) -> None:
        """Register a job at model version 0 (its model is added separately)."""
        self.db.execute(
            "INSERT INTO jobs VALUES (?, ?, 'running', 0, 0, 0)",
            [plan.job.name, msgspec.json.encode(plan).decode()],
        )
        self._forget_job(plan.job.name)

    def job(self, name: str) -> JobRow | None:
        """A job by name."""
        job = self._jobs.get(name)
        if job is not None:
            return job
        row = self.db.execute("SELECT * FROM jobs WHERE name=?", [name]).fetchone()
        if row is None:
            return None
        job = self._jobs[name] = self._job_row(row)
        return job

    def _job_row(self, row: Sequence[Any]) -> JobRow:
        plan = self._plans.get(row[1])
        if plan is None:  # plans are frozen: decode each stored text once, not per request
            plan = self._plans[row[1]] = msgspec.json.decode(row[1], type=JobPlan)
        return JobRow(row[0], plan, *row[2:])

    def job_state(self, name: str) -> tuple[JobRow, RoundRow | None, int] | None:
        """The job, its newest round and the places taken in it, read from the database
        now (not from what this store keeps), in two indexed reads that write nothing."""
        row = self.db.execute("SELECT * FROM jobs WHERE name=?", [name]).fetchone()
        if row is None:
            return None
        newest = self.db.execute(
            "SELECT r.*, coalesce(c.admitted, 0) FROM rounds r"
            " LEFT JOIN round_counts c ON c.round_id = r.round_id"
            " WHERE r.job=? ORDER BY r.number DESC LIMIT 1",
            [name],
        ).fetchone()
        if newest is None:
            return self._job_row(row), None, 0
        return self._job_row(row), RoundRow(*newest[:-1]), int(newest[-1])

    def reread_job(self, name: str) -> JobRow:
        """The job as stored now (not as kept)."""
        self._jobs.pop(name, None)
        job = self.job(name)
        assert job is not None
        return job

    def _forget_job(self, name: str) -> None:
        self._jobs.pop(name, None)
        self.changes += 1

    def jobs(self) -> list[JobRow]:
        """Every job."""
        names = [r[0] for r in self.db.execute("SELECT name FROM jobs ORDER BY name").fetchall()]
        return [job for job in map(self.job, names) if job is not None]

    def set_job_status(self, name: str, status: str) -> None:
        """Pause, resume or stop a job (its progress stays)."""
        self.db.execute("UPDATE jobs SET status=? WHERE name=?", [status, name])
        self._forget_job(name)

    def update_job(
        self,
        name: str,
        *,
        status: str,
        model_version: int,
        rounds_completed: int,
        rounds_failed: int,
    ) -> None:
        """Record a job's progress."""
        self.db.execute(
            "UPDATE jobs SET status=?, model_version=?, rounds_completed=?, rounds_failed=?"
            " WHERE name=?",
            [status, model_version, rounds_completed, rounds_failed, name],
        )
        self._forget_job(name)

    # -- rounds ----------------------------------------------------------------
    def open_round(
        self, job: str, number: int, model_version: int, now: float, deadline: float
    ) -> int:
        """Open a round; returns its id."""
        row = self.db.execute(
            "INSERT INTO rounds (job, number, status, model_version, opened_at, deadline)"
            " VALUES (?, ?, 'open', ?, ?, ?) RETURNING round_id",
            [job, number, model_version, now, deadline],
        ).fetchall()[0]  # all: a RETURNING statement stays active until read to its end
        # Its counters, so that admissions are one conditional update (`admit_within`).
        self.db.execute("INSERT INTO round_counts (round_id) VALUES (?)", [row[0]])
        self._forget_rounds()
        self.changes += 1
        return int(row[0])

    def claim_close(self, round_id: int) -> bool:
        """Whether this transaction closes the round: the first to ask while it is open
        (a conditional update; a second asker waits for the first to end, then finds it
        closed). Uploads in flight hold it open until they end (`hold_for_upload`)."""
        rows = self.db.execute(
            "UPDATE rounds SET status='closing' WHERE round_id=? AND status='open'"
            " RETURNING round_id",
            [round_id],
        ).fetchall()
        self._forget_rounds()
        return bool(rows)

    def round(self, round_id: int) -> RoundRow | None:
        """A round by id."""
        round_ = self._rounds.get(round_id)
        if round_ is None:
            row = self.db.execute("SELECT * FROM rounds WHERE round_id=?", [round_id]).fetchone()
            if row is None:
                return None
            round_ = self._rounds[round_id] = RoundRow(*row)
        return round_

    def round_by_number(self, job: str, number: int) -> RoundRow | None:
        """A job's round by its number."""
        row = self.db.execute(
            "SELECT * FROM rounds WHERE job=? AND number=?", [job, number]
        ).fetchone()
        return RoundRow(*row) if row else None

    def latest_rounds(self, job: str, count: int) -> list[RoundRow]:
        """The job's newest ``count`` rounds, newest first."""
        if count == 1 and job in self._newest:
            return [self._newest[job]]
        rows = self.db.execute(
            "SELECT * FROM rounds WHERE job=? ORDER BY number DESC LIMIT ?", [job, count]
        ).fetchall()
        if rows:
            self._newest[job] = RoundRow(*rows[0])
        return [RoundRow(*row) for row in rows]

    def open_rounds(self) -> list[RoundRow]:
        """Every round still open."""
        if self._open is None:
            rows = self.db.execute("SELECT * FROM rounds WHERE status='open'").fetchall()
            self._open = [RoundRow(*row) for row in rows]
        return list(self._open)

    def close_round(
        self, round_id: int, status: str, now: float, reason: str, train_loss: float | None
    ) -> None:
        """Mark a round closed or failed; drop its update bodies (receipts stay)."""
        self.db.execute(
            "UPDATE rounds SET status=?, closed_at=?, reason=?, train_loss=? WHERE round_id=?",
            [status, now, reason, train_loss, round_id],
        )
        self.db.execute(
            "UPDATE updates SET body=NULL, spool_offset=NULL, spool_length=NULL WHERE round_id=?",
            [round_id],
        )
        if self._spool is not None:
            self._spool.discard(round_id)
        self.db.execute("UPDATE round_parts SET body=NULL WHERE round_id=?", [round_id])
        self.db.execute("DELETE FROM secure_events WHERE round_id=?", [round_id])
        self.db.execute(
            "DELETE FROM upload_parts WHERE (device_id, upload_id) IN"
            " (SELECT device_id, upload_id FROM upload_sessions WHERE round_id=?)",
            [round_id],
        )
        self.db.execute("DELETE FROM upload_sessions WHERE round_id=?", [round_id])
        self._forget_rounds()
        self.changes += 1
        self._updated.pop(round_id, None)  # rarely asked of a closed round: read if it is
        self._admitted.pop(round_id, None)

    # -- admissions and updates ------------------------------------------------
    def admit(self, round_id: int, device_id: str, now: float) -> None:
        """Admit a device to a round."""
        self.db.execute(
            "INSERT INTO admissions (round_id, device_id, admitted_at, seq) VALUES (?, ?, ?,"
            " (SELECT coalesce(max(seq), 0) + 1 FROM admissions WHERE round_id = ?))",
            [round_id, device_id, now, round_id],
        )
        self._count(round_id, "admitted", 1)
        if round_id in self._admitted:
            self._admitted[round_id].add(device_id)

    def admit_within(self, round_id: int, device_id: str, now: float, places: int) -> bool:
        """Admit a device if the round has fewer than ``places`` admitted: one conditional
        update of its count decides, whichever worker asks (its row is locked until the
        transaction ends). False when it is full; a device admitted meanwhile by another
        request of its own keeps its one place."""
        with self.atomic():
            taken = self.db.execute(
                "UPDATE round_counts SET admitted = admitted + 1"
                " WHERE round_id=? AND admitted < ? RETURNING admitted",
                [round_id, places],
            ).fetchall()
            if not taken:
                return False
            added = self.db.execute(
                "INSERT INTO admissions (round_id, device_id, admitted_at, seq) VALUES (?, ?, ?,"
                " (SELECT coalesce(max(seq), 0) + 1 FROM admissions WHERE round_id = ?))"
                " ON CONFLICT DO NOTHING RETURNING seq",
                [round_id, device_id, now, round_id],
            ).fetchall()
            if not added:  # admitted already: give the place back
                self._count(round_id, "admitted", -1)
        if round_id in self._admitted:
            self._admitted[round_id].add(device_id)
        return True

    def withdraw(self, round_id: int, device_id: str) -> None:
        """Free a device's place in a round."""
        cursor = self.db.execute(
            "DELETE FROM admissions WHERE round_id=? AND device_id=?", [round_id, device_id]
        )
        if cursor.rowcount:
            self._count(round_id, "admitted", -1)
            self.changes += 1  # a full round has a place again
        if round_id in self._admitted:
            self._admitted[round_id].discard(device_id)

    def _count(self, round_id: int, what: str, change: int) -> None:
        """Move one of the round's counters (``admitted``, ``updates``)."""
        self.db.execute(
            f"INSERT INTO round_counts (round_id, {what}) VALUES (?, ?) ON CONFLICT (round_id)"
            f" DO UPDATE SET {what} = round_counts.{what} + excluded.{what}",
            [round_id, change],
        )

    def _counted(self, round_id: int, what: str) -> int:
        row = self.db.execute(
            f"SELECT {what} FROM round_counts WHERE round_id=?", [round_id]
        ).fetchone()
        return int(row[0]) if row else 0

    def _has_row(self, table: str, round_id: int, device_id: str) -> bool:
        """One indexed lookup, for a shared database (no round's devices kept)."""
        row = self.db.execute(
            f"SELECT 1 FROM {table} WHERE round_id=? AND device_id=? LIMIT 1",
            [round_id, device_id],
        ).fetchone()
        return row is not None

    def is_admitted(self, round_id: int, device_id: str) -> bool:
        """Whether the device holds a place in the round."""
        if self.db.shared:
            return self._has_row("admissions", round_id, device_id)
        return device_id in self._devices_in(self._admitted, "admissions", round_id)

    def _devices_in(self, kept: dict[int, set[str]], table: str, round_id: int) -> set[str]:
        """The devices with a row in ``table`` for the round (read once, then ``kept``)."""
        devices = kept.get(round_id)
        if devices is None:
            rows = self.db.execute(
                f"SELECT device_id FROM {table} WHERE round_id=?", [round_id]
            ).fetchall()
            devices = _keep(kept, round_id, {str(r[0]) for r in rows})
        return devices

    def in_flight(self, job: str, since_version: int, since: float) -> int:
        """Devices admitted at or after ``since`` to rounds on a version >= ``since_version``
        whose update is not in (async: an upload consumes its admission)."""
        return int(
            self.db.execute(
                "SELECT count(*) FROM admissions a JOIN rounds r ON r.round_id = a.round_id"
                " WHERE r.job=? AND r.model_version >= ? AND a.admitted_at >= ?",
                [job, since_version, since],
            ).fetchone()[0]
        )

    def admission_of(
        self, job: str, device_id: str, since_version: int, since: float | None = None
    ) -> RoundRow | None:
        """The round a device holds an unused admission to (async), made at or after
        ``since`` (None: at any time), if any."""
        row = self.db.execute(
            "SELECT r.* FROM admissions a JOIN rounds r ON r.round_id = a.round_id"
            " WHERE r.job=? AND a.device_id=? AND r.model_version >= ?"
            + ("" if since is None else " AND a.admitted_at >= ?")
            + " ORDER BY r.number DESC LIMIT 1",
            [job, device_id, since_version] + ([] if since is None else [since]),
        ).fetchone()
        return RoundRow(*row) if row else None

    def admitted_devices(self, round_id: int) -> list[str]:
        """The round's admitted devices, in the order they were admitted."""
        rows = self.db.execute(
            "SELECT device_id FROM admissions WHERE round_id=? ORDER BY seq", [round_id]
        ).fetchall()
        return [str(r[0]) for r in rows]

    def admitted_token_hashes(self, round_id: int) -> list[str]:
        """The token hashes of the round's admitted devices."""
        rows = self.db.execute(
            "SELECT d.token_hash FROM admissions a JOIN devices d ON d.device_id = a.device_id"
            " WHERE a.round_id=?",
            [round_id],
        ).fetchall()
        return [str(r[0]) for r in rows]

    def admitted_count(self, round_id: int) -> int:
        """Places taken in the round."""
        if self.db.shared:
            return self._counted(round_id, "admitted")
        return len(self._devices_in(self._admitted, "admissions", round_id))

    def has_update(self, round_id: int, device_id: str) -> bool:
        """Whether the device already contributed to the round."""
        if self.db.shared:
            return self._has_row("updates", round_id, device_id)
        return device_id in self._devices_in(self._updated, "updates", round_id)

    def update_count(self, round_id: int) -> int:
        """Updates accepted in the round."""
        if self.db.shared:
            return self.taken(round_id)
        count = self._update_counts.get(round_id)
        if count is None:
            row = self.db.execute(
                "SELECT count(*) FROM updates WHERE round_id=?", [round_id]
            ).fetchone()
            count = _keep(self._update_counts, round_id, int(row[0]))
        return count

    def fingerprint(self) -> str:
        """A digest of every stored row, to show that a request changed nothing."""
        digest = hashlib.sha256()
        for table in self.db.tables():
            rows = self.db.execute(f"SELECT * FROM {table}").fetchall()
            digest.update(f"{table}:{len(rows)}\n".encode())
            for line in sorted(repr(tuple(_plain(v) for v in row)) for row in rows):
                digest.update(line.encode())
        return digest.hexdigest()


def serialised(method: Callable[P, R]) -> Callable[P, R]:
    """A handler (a method of an object with a ``store``) that runs alone among every
    worker of the server's database (`ServerStore.exclusive`): what it reads stays true
    until it has written."""

    @functools.wraps(method)
    def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        store = getattr(args[0], "store", None)
        assert isinstance(store, ServerStore)
        with store.exclusive():
            return method(*args, **kwargs)

    return handler


def _plain(value: object) -> object:
    """A column value as bytes where an engine returns a buffer (memoryview)."""
    return bytes(value) if isinstance(value, memoryview) else value


def _keep(kept: dict[int, T], round_id: int, value: T) -> T:
    """Keep ``value`` for ``round_id``, forgetting the others past `KEPT_ROUNDS`: an
    async job asks about many closed rounds over its life."""
    if len(kept) >= KEPT_ROUNDS:
        kept.clear()
    kept[round_id] = value
    return value
