"""The server's two SQL engines: SQLite (embedded, the default) and PostgreSQL (workers).

`ServerStore` writes its SQL once, in the subset both engines run alike: ``?``
placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``, row values, and SQLite's
type names in its DDL, which `PostgresDatabase` maps to PostgreSQL's (``BLOB`` to
``BYTEA``, ``REAL`` to ``DOUBLE PRECISION``, ``INTEGER`` to ``BIGINT``, an
``AUTOINCREMENT`` key to an identity column). Tests run the server suite on both.

Who else writes. An SQLite file has one server process (its caches hold between
requests). A PostgreSQL database may have many workers, and a worker's caches live for
one request only (`Database.shared`). The requests of the hot path (check-ins and
uploads of sync jobs) take no lock shared by the workers: each touches only the rows
it needs, with atomic conditional updates and row locks (`fedclient.server.store`).
The rest (secure aggregation's stages, async buffers, selections, the operator's
levers, the deadline timer) run inside `Database.exclusive`, a session advisory lock,
serialised across workers as inside one event loop; `Database.held_seconds` counts
how long a worker held it (and the rows of the rounds it closed). A killed worker's
connection closes, and PostgreSQL rolls back its open transaction and frees its locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol

import sqlite_utils

from fedclient._exceptions import ServiceUnavailable, StateError

__all__ = [
    "Cursor",
    "Database",
    "PostgresDatabase",
    "ServeLock",
    "SqliteDatabase",
    "connect",
    "is_postgres",
    "redacted",
]

#: Seconds a group commit waits for more requests to join it (PostgreSQL's commit_delay,
#: in spirit): bodies that arrive meanwhile share its fsync. 3 ms took uploads of 100,000
#: floats from 375/s (a commit as soon as asked) to 460-560/s (bench/ingest.py).
COMMIT_WINDOW = 0.003

#: Bytes of write-ahead log past which a served SQLite file is checkpointed and its WAL
#: emptied (`_Checkpointer`).
WAL_LIMIT = 8 * 1024 * 1024

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


class Cursor(Protocol):
    """What `Database.execute` returns: DB-API's cursor, as far as the store uses it."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def is_postgres(url: str | Path) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://...``)."""
    return str(url).startswith(("postgresql://", "postgres://"))


def connect(url: str | Path, *, lock_file: bool = False) -> Database:
    """The database at ``url``: ``postgresql://...``, ``sqlite:///path``, a path, or
    ``":memory:"``. ``lock_file``: a SQLite file is this process's alone while it is
    open (`ServeLock`); PostgreSQL is shared by design and takes no such lock."""
    if is_postgres(url):
        return PostgresDatabase(str(url))
    text = str(url)
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")
    return SqliteDatabase(text, lock_file=lock_file)


class ServeLock:
    """An exclusive lock on ``<db>.lock`` beside a SQLite file, held while one process
    serves it: a second ``fedserver`` on the same file (by its name or a symlink to it) is
    refused in one line instead of serving beside the first (each would keep rows in
    memory that the other changes).

    The lock is the kernel's (``flock``): it goes with the process, however that ends,
    so a killed server leaves nothing to clean up. The file holds the owner's pid, for
    the message; it is never deleted (deleting it would let two processes lock two
    different files of one name)."""

    def __init__(self, database: str) -> None:
        import fcntl

        # Beside the file itself, not a link to it: two names of one file, one lock.
        served = Path(database).resolve()
        path = served.with_name(served.name + ".lock")
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise StateError(
                f"{database}: another fedserver (pid {owner}) serves this file; one process"
                " serves a SQLite file (several workers share a PostgreSQL database)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Let another process serve the file."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1


class Database:
    """One connection to the server's database."""

    #: ``"sqlite"`` or ``"postgresql"``.
    kind: ClassVar[str]
    #: Whether other processes may write between this one's requests: then what a
    #: store keeps in memory holds only inside `exclusive`.
    shared: bool = False

    def __init__(self) -> None:
        self._depth = 0  # `exclusive` blocks entered and not left
        self._locked = False  # the outermost block holds the lock
        #: Seconds this process held something every worker waits for (the lock of
        #: `exclusive`, a round's row while it closes: `held`), and how many times.
        self.held_seconds = 0.0
        self.holds = 0
        #: Called when writes that were not yet committed are lost (a failed group
        #: commit): whoever keeps in memory what they wrote drops it.
        self.on_rollback: list[Callable[[], None]] = []

    async def flush(self) -> None:
        """Return once every write made so far is committed (see `SqliteDatabase.
        group_commits`); at once where each block commits by itself."""

    async def settled(self) -> None:
        """Return once the database may be used without waiting (no commit of
        `SqliteDatabase.group_commits` in flight); at once elsewhere."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement (``?`` placeholders)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""
        raise NotImplementedError

    def atomic(self) -> AbstractContextManager[None]:
        """One transaction; nested blocks become savepoints."""
        raise NotImplementedError

    def ddl(self, statement: str) -> str:
        """A schema statement (written with SQLite's types) in this engine's dialect."""
        return statement

    def tables(self) -> list[str]:
        """The names of the tables in the database, sorted."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the database answers now (a server's readiness)."""
        return True

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    @contextmanager
    def exclusive(self, *, lock: bool = True) -> Iterator[bool]:
        """Serve one request; with ``lock``, alone: no other worker serves a locked one
        until the block ends. Re-entrant: a nested block that locks takes the lock then,
        and holds it until the outermost block ends. Yields whether the block starts
        from the database afresh (it is the outermost, or it took the lock), where a
        store drops what it keeps in memory, if the database is `shared`."""
        outermost = self._depth == 0
        if outermost:
            self._enter()
        take = lock and not self._locked
        if take:
            self._lock()
            self._locked = True
        self._depth += 1
        try:
            yield outermost or take
        finally:
            self._depth -= 1
            if self._depth == 0:
                locked, self._locked = self._locked, False
                self._leave(locked)

    def held(self, seconds: float) -> None:
        """Count ``seconds`` spent holding something every worker waits for."""
        self.held_seconds += seconds
        self.holds += 1

    def _enter(self) -> None:
        pass

    def _lock(self) -> None:
        pass

    def _leave(self, locked: bool) -> None:
        pass


class SqliteDatabase(Database):
    """A SQLite file (or ``":memory:"``), written by one server process.

    Group commit (`group_commits`, which the served app turns on for a file): a commit
    waits for the disk (fsync: 1.4 ms here), and one per request was half of an
    upload's time. Instead, writes go into one open transaction (each `atomic` block a
    savepoint inside it, so a failed request still undoes only its own), and the app
    answers a request only after `flush`: the first request to ask schedules a COMMIT
    `COMMIT_WINDOW` later on the event loop, and every request that wrote before it
    runs shares it. Nothing
    is acknowledged before it is on disk; a commit that fails (full disk) fails every
    request in it (503), and `on_rollback` tells the caches.

    The COMMIT (its fsync, and the spool's: `before_commit`) runs on a thread of its
    own, so the event loop goes on reading and parsing other requests meanwhile; nothing
    uses the connection until it is done: `settled` waits for it, and every statement
    (`_begin`) and request (`exclusive`) that comes first waits for it in place."""

    kind = "sqlite"

    def __init__(self, path: str, *, lock_file: bool = False) -> None:
        super().__init__()
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock_held = ServeLock(path) if lock_file and path != ":memory:" else None
        # The app calls the store from its event loop only, so requests never overlap;
        # that loop may run in another thread than the one that opened the store.
        # Autocommit outside `atomic` blocks (which BEGIN and COMMIT), as in PostgreSQL.
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # Our own schema and SQL: no sqlite-utils plugins, so no scan of every installed
        # package's entry points for them (27 ms on the first open).
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        # Deleted rows are zeroed where that costs no extra writes: a body folded into
        # its round's sum stays in a free page until the next one overwrites it, rather
        # than being zeroed at once (Debian's SQLite zeroes every freed page: 2.5 ms an
        # upload of 100,000 floats).
        self.db.execute("PRAGMA secure_delete = FAST")
        # Sorts and statement journals in memory: no temporary file to open (descriptors
        # belong to connections; `fedclient.server.connections`).
        self.db.execute("PRAGMA temp_store = MEMORY")
        self._checkpoints: _Checkpointer | None = None
        self._grouped = False
        self._wrote = False  # statements ran in the open group transaction
        self._commit: asyncio.Future[None] | None = None
        #: Called before a group's COMMIT (what must be durable before the rows that name
        #: it: `fedclient.server.spool`), and after it succeeded.
        self.before_commit: list[Callable[[], None]] = []
        self.after_commit: list[Callable[[], None]] = []
        # The group commit in flight on `_committer`, and the requests that wait for it.
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._flight: concurrent.futures.Future[BaseException | None] | None = None
        self._flight_waiters: asyncio.Future[None] | None = None
        if path != ":memory:":
            # 64 KiB pages: an update body (400 kB for 100,000 parameters) spans 7 pages,
            # not 100, and an upload costs a third less (bench/ingest.py). Takes effect
            # only in a new file; an older one keeps its pages.
            self.db.execute("PRAGMA page_size = 65536")
            self.db.enable_wal()
            # After a checkpoint that copied everything, the next commit cuts the WAL file
            # back to this size rather than leaving it at its largest.
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
            self._checkpoints = _Checkpointer(path)
            # The writer never copies the WAL back inside a request (a stall of up to
            # 64 MB inside some upload): a thread of its own does, beside it, and the
            # committer's thread bounds it (`_bound_wal`).
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
        self._wal = Path(f"{path}-wal")

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def group_commits(self) -> None:
        """Commit many requests' writes at once (a file only; see the class)."""
        self._grouped = self.path != ":memory:"

    def _begin(self) -> None:
        if self._flight is not None:
            self._settle()  # a statement before the commit in flight ended: wait for it
        if self._grouped:
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN")
            self._wrote = True

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._begin()
        return self.db.execute(sql, list(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._begin()
        self.db.conn.executemany(sql, rows)

    def atomic(self) -> AbstractContextManager[None]:
        self._begin()  # grouped: the block is a savepoint of the open transaction
        return self.db.atomic()  # type: ignore[return-value]

    async def flush(self) -> None:
        if not self._wrote:
            if self._flight_waiters is not None:
                # It may have written into the group now in flight (before an await).
                await asyncio.shield(self._flight_waiters)
            return
        if self._commit is None:
            self._commit = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(COMMIT_WINDOW, self._commit_group)
        await asyncio.shield(self._commit)

    async def settled(self) -> None:
        flight = self._flight
        if flight is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(flight)
            self._settle()

    def _commit_group(self) -> None:
        """Start committing the open transaction, on the committer thread, for every
        request that wrote in it; `_settle` ends it."""
        waiters, self._commit = self._commit, None
        assert waiters is not None
        if self._flight is not None:
            self._settle()
        wrote, self._wrote = self._wrote, False
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="sqlite-commit"
            )
        self._flight_waiters = waiters
        self._flight = self._committer.submit(self._commit_transaction, wrote)
        loop, flight = asyncio.get_running_loop(), self._flight
        flight.add_done_callback(lambda _: loop.call_soon_threadsafe(self._settle, flight))

    def _settle(self, only: concurrent.futures.Future[BaseException | None] | None = None) -> None:
        """End the commit in flight (waiting for its thread if need be): tell the caches
        and the requests that wait for it. Runs on the event loop; once per commit
        (``only``: if that commit is still the one in flight)."""
        flight, waiters = self._flight, self._flight_waiters
        if flight is None or (only is not None and flight is not only):
            return
        self._flight = self._flight_waiters = None
        error = flight.result()
        self._after(error)
        if waiters is not None and not waiters.done():
            if error is None:
                waiters.set_result(None)
            else:
                waiters.set_exception(error)
                waiters.exception()  # retrieved: a batch nobody waits for any more is no error

    def _commit_transaction(self, wrote: bool) -> BaseException | None:
        """COMMIT (after `before_commit`), or ROLLBACK when that fails; the error, if any.
        Touches the connection only: the caches are told by `_after`, on the loop."""
        try:
            if self.conn.in_transaction:
                for prepare in self.before_commit:
                    prepare()
                self.conn.execute("COMMIT")
                self._bound_wal()
            elif wrote and self._grouped:
                # SQLite rolls a transaction back by itself on some errors (a full disk).
                raise sqlite3.OperationalError("database or disk is full: writes rolled back")
        except Exception as exc:  # sqlite3.Error, or the spool's OSError: nothing is kept
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            return exc
        return None

    def _bound_wal(self) -> None:
        """Once the WAL passed `WAL_LIMIT`, copy the rest of it back and empty it, here on
        the committer's thread, before the next group begins.

        The checkpointer's passive passes alone do not bound it: SQLite writes the WAL
        from its start again only once a checkpoint copied every frame in it, and under
        steady uploads the writer has committed more by the time a pass ends, so the file
        grew for good (18 MB beside a 2.5 MB database; 35 MB in two seconds of 64 KiB
        pages). The passes have copied most frames by then, so this one copies what came
        since and truncates: the WAL stays under `WAL_LIMIT` plus one group's writes."""
        try:
            if self._wal.stat().st_size > WAL_LIMIT:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (OSError, sqlite3.Error):  # busy (a passive pass), or full: the next commit tries
            pass

    def _after(self, error: BaseException | None) -> None:
        for hook in self.on_rollback if error is not None else self.after_commit:
            hook()

    def commit(self) -> None:
        """Commit the open group transaction now (`sqlite3.Error` if it is lost)."""
        self._settle()
        wrote, self._wrote = self._wrote, False
        error = self._commit_transaction(wrote)
        self._after(error)
        if error is not None:
            raise error

    def _enter(self) -> None:
        self._settle()  # a request never starts while a commit is in flight

    def tables(self) -> list[str]:
        return sorted(self.db.table_names())

    def close(self) -> None:
        self._settle()
        if self._wrote:
            self.commit()
        if self._committer is not None:
            self._committer.shutdown()
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self.db.close()
        if self._lock_held is not None:
            self._lock_held.release()


class _Checkpointer:
    """Copies a WAL file's committed pages back into its database every `EVERY` seconds,
    on a connection and thread of its own (``PRAGMA wal_checkpoint(PASSIVE)``: it never
    waits for the writer, and the writer never waits for it). SQLite leaves the GIL
    while it copies."""

    EVERY = 0.25

    def __init__(self, path: str) -> None:
        self._stopped = threading.Event()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.EVERY):
            with contextlib.suppress(sqlite3.Error):  # busy or full: the next one tries
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._conn.close()

    def stop(self) -> None:
        """End the thread (after a last pass it may be in)."""
        self._stopped.set()
        self._thread.join()


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


def redacted(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
