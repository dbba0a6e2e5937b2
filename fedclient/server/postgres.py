"""PostgreSQL, the database a server's workers (and hosts) share (`PostgresDatabase`).

The store's SQL is SQLite's subset (`fedclient.server.database`); here its ``?``
placeholders become psycopg's and its DDL's types PostgreSQL's. Each worker holds a
pool of one connection that comes back by itself when the database does (503s
meanwhile), and takes the cluster-wide advisory lock only for the requests that need
it (`Database.exclusive`).
"""

from __future__ import annotations

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
        end of the block, if one is open) and say 503."""
        self._away_now = True
        self._used_at = -math.inf  # the next request's connection is checked
        if self._depth:
            self._broken = True
        else:
            self._release()
        return self._away(f"the database is unreachable: {_first_line(exc)}")

    def _release(self) -> None:
        held, self._held, self._broken = self._held, None, False
        if held is not None:
            if not self._away_now:
                self._used_at = time.monotonic()
            self.pool.putconn(held)  # a broken one is discarded, and replaced in the background

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            # Binary results: a bytea body comes as its bytes, not as hex text to decode.
            return self.conn.execute(_placeholders(sql), list(params) or None, binary=True)  # type: ignore[no-any-return]
        except self._errors as exc:
            raise self._failed(exc) from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            with self.conn.cursor() as cursor:
                cursor.executemany(_placeholders(sql), rows)
        except self._errors as exc:
            raise self._failed(exc) from exc

    @contextmanager
    def atomic(self) -> Iterator[None]:
        try:
            with self.conn.transaction():
                yield
        except self._errors as exc:
            raise self._failed(exc) from exc

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
        self._release()
        self.pool.close()

    def _lock(self) -> None:
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
