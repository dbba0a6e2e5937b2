"""PostgreSQL, the database a server's workers (and hosts) share (`PostgresDatabase`).

The store's SQL is SQLite's subset (`fedclient.server.database`); here its ``?``
placeholders become psycopg's and its DDL's types PostgreSQL's. Each worker holds a
pool of one connection that comes back by itself when the database does (503s
meanwhile), takes the cluster-wide advisory lock only for the requests that need it
(`Database.exclusive`), and commits the uploads it takes within a few milliseconds of
each other together (`PostgresDatabase.group_commits`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fedclient._exceptions import ServiceUnavailable, StateError
from fedclient.server.database import Cursor, Database, redacted

__all__ = [
    "AWAY_RETRY_SECONDS",
    "CHECK_IDLE_SECONDS",
    "CONNECT_SECONDS",
    "GROUP_MOST",
    "REQUEST_LOCK",
    "PostgresDatabase",
]

#: Seconds to connect to PostgreSQL before giving up (at start: one line; later: 503).
CONNECT_SECONDS = 5
#: Seconds a request waits for the pool's connection before it is answered 503.
AWAY_WAIT_SECONDS = 1.0
#: ...and while the database is known to be away: requests run on the event loop, so
#: each second one waits is a second every other request of the worker waits too.
AWAY_PROBE_SECONDS = 0.05
#: Retry-After of a 503 while the database is away.
AWAY_RETRY_SECONDS = 5
#: Seconds the pool keeps trying to reconnect by itself (backing off) before it waits
#: for the next request to try again.
RECONNECT_SECONDS = 5.0

#: Seconds a connection may rest before it is checked (a round trip) as it is taken for a
#: request: one used since answers the request's first statement, or fails it (503,
#: and the pool connects again), at no cost to the requests of a busy worker.
CHECK_IDLE_SECONDS = 1.0

#: The advisory lock every worker holds while it serves one request.
REQUEST_LOCK = 0x66656473  # "feds"

#: Uploads one group commit takes at most (`PostgresDatabase.group_commits`): each is a
#: subtransaction, and a backend tracks 64 of a transaction's without spilling them to
#: disk, where every other backend's snapshot would look them up.
GROUP_MOST = 32


class PostgresDatabase(Database):
    """A PostgreSQL database (psycopg 3), shared by every worker of a server.

    The database may go away and come back (``pg_ctl restart``, a failover): each worker
    takes its connection from a pool of one (psycopg_pool), which checks it before a
    request when it rested `CHECK_IDLE_SECONDS` or its last request failed for want of
    the database (a connection in use a moment ago needs no extra round trip: a broken
    one fails its request's first statement, 503), and, when it is broken, connects
    again in the background. While there is none to be had, every statement raises
    `ServiceUnavailable` (503 with Retry-After: nothing was written, the same request
    later will do), at once once the worker knows the database is away (a request waits
    on the event loop), and `ready` says so. A request holds its connection for its
    whole `exclusive` block (its advisory lock is the session's), and gives it back at
    the end; a connection that broke inside a block is never swapped for another before
    the block ends, so no statement of a request runs outside its lock."""

    kind = "postgresql"
    shared = True

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise StateError(
                f"PostgreSQL needs psycopg and psycopg_pool: pip install"
                f" 'fedclient[postgresql]' ({exc})"
            ) from None
        self.url = url
        self._errors: tuple[type[Exception], ...] = (psycopg.OperationalError,)
        try:  # once directly: a server that cannot connect at all says why, in one line
            psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_SECONDS).close()
        except psycopg.OperationalError as exc:
            raise StateError(f"cannot connect to {redacted(url)}: {_first_line(exc)}") from None
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=1,
            open=False,
            # Autocommit outside `atomic` blocks, as the store's SQLite connection.
            kwargs={"autocommit": True, "connect_timeout": CONNECT_SECONDS},
            check=self._check,
            # Reconnect attempts back off (1, 2, 4 s...); past this, the pool stops and
            # the next request starts again at once, so recovery follows within seconds.
            reconnect_timeout=RECONNECT_SECONDS,
            name="fedserver",
        )
        self._checked = ConnectionPool.check_connection
        #: Seconds the connection may rest before it is checked (`CHECK_IDLE_SECONDS`).
        self.check_idle_seconds = CHECK_IDLE_SECONDS
        self._used_at = -math.inf  # time.monotonic() the connection was given back
        self.pool.open(wait=True, timeout=CONNECT_SECONDS)
        self._held: Any = None  # the connection of the current block (or statement)
        self._broken = False  # it failed inside the current block
        self._away_now = False  # the last attempt found no connection: do not wait long
        self._locked_at = 0.0
        # Group commit (see `group_commits`): a group transaction is open on `_held`; the
        # error that lost it, if one did; `atomic` blocks entered and not left.
        self._group_open = False
        self._group_lost: BaseException | None = None
        self._joined = 0  # blocks that joined the open group
        self._blocks = 0
        self._committed = False  # a transaction of this request committed by itself

    def group_commits(self) -> None:
        """Commit the uploads this worker takes within `COMMIT_WINDOW` of each other in
        one transaction (one fsync, on a thread of its own while the event loop reads
        the next bodies), as a SQLite file commits every request.

        Only the blocks that ask (``atomic(grouped=True)``: an upload's accepting
        transaction) join the group, each a savepoint of it, and only outside the
        cluster-wide lock (a locked request's writes must be committed before another
        worker takes the lock). The rows they lock (the round held open, the device's
        place) stay locked until the group commits, milliseconds later. Anything else that
        writes first commits the open group, at once: a check-in, a close, the deadline
        timer, the operator. Reads run inside it. A request is answered after `flush`,
        so nothing is acknowledged before it is committed; a group that fails to commit
        (the database went away) fails every request in it (503), and `on_rollback`
        tells the caches."""
        self._grouped = True

    @property
    def in_group(self) -> bool:
        return self._group_open and self._blocks > 0

    @property
    def conn(self) -> Any:
        """The connection statements run on now (taken from the pool if none is held)."""
        if self._broken:
            raise self._away("the connection to the database broke during this request")
        if self._held is None:
            from psycopg_pool import PoolTimeout

            wait = AWAY_PROBE_SECONDS if self._away_now else AWAY_WAIT_SECONDS
            try:
                self._held = self.pool.getconn(timeout=wait)
            except PoolTimeout:
                self._away_now = True
                raise self._away("no connection to the database") from None
            self._away_now = False
        return self._held

    def _check(self, conn: Any) -> None:
        """The pool's check of a connection it gives out (see the class)."""
        if time.monotonic() - self._used_at >= self.check_idle_seconds:
            self._checked(conn)

    def _away(self, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"{why} ({redacted(self.url)}); retry later", retry_after=AWAY_RETRY_SECONDS
        )

    def _failed(self, exc: Exception) -> ServiceUnavailable:
        """A statement failed for want of the database: give the connection back (at the
        end of the block, if one is open) and say 503. An open group is lost with it."""
        self._away_now = True
        self._used_at = -math.inf  # the next request's connection is checked
        if self._group_open:
            self._group_lost = self._group_lost or self._away("the group commit was lost")
            self._broken = True
        elif self._depth:
            self._broken = True
        else:
            self._release()
        return self._away(f"the database is unreachable: {_first_line(exc)}")

    def _release(self) -> None:
        if self._group_open or self._flight is not None:
            return  # the group's transaction keeps the connection until it ends (`_after`)
        held, self._held, self._broken = self._held, None, False
        if held is not None:
            if not self._away_now:
                self._used_at = time.monotonic()
            self.pool.putconn(held)  # a broken one is discarded, and replaced in the background

    def _ready_for(self, write: bool) -> None:
        """Before a statement or block of this worker's: wait for the group commit in flight
        (nothing else uses the connection meanwhile), and commit the open group first if
        the statement writes outside it."""
        if self._flight is not None:
            self._settle()
        if write and self._group_open and not self._blocks:
            self._commit_open()

    def _commit_open(self) -> None:
        """Commit the open group now, on the event loop, and tell its requests; a group
        that was lost raises 503 here (the caller's request needs the database too)."""
        waiters, self._commit = self._commit, None  # the timer then finds nothing to do
        self._wrote = False
        error = self._commit_transaction(True)
        self._after(error)
        self._tell(waiters, error)
        if error is not None:
            raise self._away(f"the database is unreachable: {_first_line(error)}")

    def _commit_transaction(self, wrote: bool) -> BaseException | None:
        if not self._group_open:
            return None
        if self._group_lost is not None:
            return self._group_lost
        try:
            for prepare in self.before_commit:
                prepare()
            self._held.execute("COMMIT")
        except self._errors as exc:
            return self._away(f"the database is unreachable: {_first_line(exc)}")
        return None

    def _after(self, error: BaseException | None) -> None:
        """The group ended (committed, or lost): the connection goes back to the pool."""
        if self._group_open:
            self._group_open, self._group_lost, self._joined = False, None, 0
            if error is not None:
                self._away_now = True
                self._used_at = -math.inf
                self._broken = True
            if not self._depth:
                self._release()
        super()._after(error)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._ready_for(not sql.lstrip().startswith("SELECT"))
        try:
            # Binary results: a bytea body comes as its bytes, not as hex text to decode.
            return self.conn.execute(_placeholders(sql), list(params) or None, binary=True)  # type: ignore[no-any-return]
        except self._errors as exc:
            raise self._failed(exc) from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._ready_for(True)
        try:
            with self.conn.cursor() as cursor:
                cursor.executemany(_placeholders(sql), rows)
        except self._errors as exc:
            raise self._failed(exc) from exc

    @contextmanager
    def atomic(self, *, grouped: bool = False) -> Iterator[None]:
        join = grouped and self._grouped and not self._locked and not self._blocks
        alone = not join and not self._blocks  # it commits by itself, at its end
        self._ready_for(not join)
        try:
            if join and self._group_open and self._joined >= GROUP_MOST:
                self._commit_open()  # a full group: commit it, and begin the next
            if join and not self._group_open:
                self.conn.execute("BEGIN")
                self._group_open = True
            if join:
                self._wrote = True  # `flush` commits it
            self._blocks += 1
            try:
                if join:
                    yield from self._savepoint()
                else:
                    with self.conn.transaction():  # nested: a savepoint
                        yield
                        if alone:
                            for prepare in self.before_commit:  # the spool's sync
                                prepare()
            finally:
                self._blocks -= 1
        except self._errors as exc:
            raise self._failed(exc) from exc
        if alone:
            self._committed = True
            if not self._depth:
                self._after_commits()

    def _savepoint(self) -> Iterator[None]:
        """A block in the open group: a savepoint, rolled back to if the block fails, and
        otherwise kept until the group commits (no RELEASE: one round trip fewer an
        upload; a group holds at most `GROUP_MOST`, within the subtransactions a
        PostgreSQL backend tracks without spilling to disk)."""
        self.conn.execute("SAVEPOINT grouped")
        self._joined += 1
        try:
            yield
        except BaseException:
            if not self._broken:
                with contextlib.suppress(*self._errors):  # else the group is lost anyway
                    self.conn.execute("ROLLBACK TO SAVEPOINT grouped")
            raise

    def _after_commits(self) -> None:
        """After a request whose own transactions committed (not a group's: `_after`),
        at its end: `after_commit` (the spool deletes the files of the rounds it closed),
        outside whatever it measured as held."""
        if self._committed:
            self._committed = False
            with contextlib.suppress(ServiceUnavailable):  # then they go at the next start
                for hook in self.after_commit:
                    hook()

    def ddl(self, statement: str) -> str:
        return _postgres_ddl(statement)

    def tables(self) -> list[str]:
        rows = self.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def ready(self) -> bool:
        try:
            self.execute("SELECT 1").fetchall()
        except ServiceUnavailable:
            return False
        finally:
            if not self._depth:
                self._release()
        return True

    def close(self) -> None:
        if self._flight is not None:
            self._settle()
        if self._group_open:
            with contextlib.suppress(ServiceUnavailable):
                self._commit_open()
        self._release()
        self.pool.close()
        if self._committer is not None:
            self._committer.shutdown()

    def _enter(self) -> None:
        if self._flight is not None:
            self._settle()  # a request never starts while a commit is in flight

    def _lock(self) -> None:
        self._ready_for(True)  # what this worker wrote is committed before the lock is held
        self.execute("SELECT pg_advisory_lock(?)", [REQUEST_LOCK])
        self._locked_at = time.perf_counter()

    def _leave(self, locked: bool) -> None:
        try:
            if locked and not self._broken and self._held is not None and not self._held.closed:
                self.execute("SELECT pg_advisory_unlock(?)", [REQUEST_LOCK])
        except ServiceUnavailable:
            pass  # the session is gone, and its lock with it
        finally:
            if locked:
                self.held(time.perf_counter() - self._locked_at)
            self._after_commits()
            self._release()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """SQLite's ``?`` placeholders as psycopg's ``%s`` (the store's SQL has no ``%``,
    and no ``?`` but placeholders)."""
    assert "%" not in sql, sql
    return sql.replace("?", "%s")


_TYPES = [
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
]


def _postgres_ddl(statement: str) -> str:
    for pattern, replacement in _TYPES:
        statement = pattern.sub(replacement, statement)
    return statement
