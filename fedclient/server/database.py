"""The server's SQL engines: what both speak (`Database`), and SQLite (embedded, the
default); PostgreSQL (workers) is `fedclient.server.postgres`, and
`fedclient.server.engines.connect` opens either from a URL.

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
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol

import sqlite_utils

from fedclient._exceptions import StateError

__all__ = [
    "Cursor",
    "Database",
    "ServeLock",
    "SqliteDatabase",
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


class Cursor(Protocol):
    """What `Database.execute` returns: DB-API's cursor, as far as the store uses it."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def is_postgres(url: str | Path) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://...``)."""
    return str(url).startswith(("postgresql://", "postgres://"))


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
        #: Called before a group's COMMIT (what must be durable before the rows that name
        #: it: `fedclient.server.spool`), and after it succeeded.
        self.before_commit: list[Callable[[], None]] = []
        self.after_commit: list[Callable[[], None]] = []
        # Group commit (`group_commits`): whether it is on, whether statements ran in the
        # open group transaction, and the requests that wait for its COMMIT.
        self._grouped = False
        self._wrote = False
        self._commit: asyncio.Future[None] | None = None
        # The group commit in flight on `_committer`, and the requests that wait for it.
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._flight: concurrent.futures.Future[BaseException | None] | None = None
        self._flight_waiters: asyncio.Future[None] | None = None

    def group_commits(self) -> None:
        """Commit many requests' writes at once, after `COMMIT_WINDOW` (the served app
        turns it on): a request's writes join one open transaction, and the app answers
        it only after `flush`. Each engine says which writes join (`SqliteDatabase`,
        `fedclient.server.postgres.PostgresDatabase`)."""
        self._grouped = True

    @property
    def grouping(self) -> bool:
        """Whether `group_commits` is on: a write is committed only by `flush`."""
        return self._grouped

    @property
    def in_group(self) -> bool:
        """Whether the statements run now are in a block that joined an open group
        (`atomic(grouped=True)` on an engine that groups such blocks)."""
        return False

    async def flush(self) -> None:
        """Return once every write made so far is committed: at once where each block
        commits by itself; with `group_commits`, once the group that holds them did."""
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
        """Return once the database may be used without waiting (no group commit in
        flight); at once elsewhere."""
        flight = self._flight
        if flight is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(flight)
            self._settle()

    def _commit_group(self) -> None:
        """Start committing the open transaction, on the committer thread, for every
        request that wrote in it; `_settle` ends it."""
        waiters, self._commit = self._commit, None
        if waiters is None:
            return  # committed meanwhile, and its waiters told (`_tell`)
        if self._flight is not None:
            self._settle()
        wrote, self._wrote = self._wrote, False
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"{self.kind}-commit"
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
        self._tell(waiters, error)

    @staticmethod
    def _tell(waiters: asyncio.Future[None] | None, error: BaseException | None) -> None:
        """Tell the requests that wait for a group commit how it ended."""
        if waiters is not None and not waiters.done():
            if error is None:
                waiters.set_result(None)
            else:
                waiters.set_exception(error)
                waiters.exception()  # retrieved: a batch nobody waits for any more is no error

    def _commit_transaction(self, wrote: bool) -> BaseException | None:
        """COMMIT the group transaction (after `before_commit`), or roll it back when that
        fails; the error, if any. Runs on the committer thread and touches the
        connection only: the caches are told by `_after`, on the loop."""
        raise NotImplementedError

    def _after(self, error: BaseException | None) -> None:
        for hook in self.on_rollback if error is not None else self.after_commit:
            hook()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement (``?`` placeholders)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""
        raise NotImplementedError

    def atomic(self, *, grouped: bool = False) -> AbstractContextManager[None]:
        """One transaction; nested blocks become savepoints. ``grouped``: with
        `group_commits`, the block may join the open group transaction (a savepoint in
        it), committed with the others' by `flush`; an engine says which blocks may."""
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
        """Commit many requests' writes at once (a file only; see the class): every
        write joins the group."""
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

    def atomic(self, *, grouped: bool = False) -> AbstractContextManager[None]:
        self._begin()  # grouped: every block is a savepoint of the open transaction
        return self.db.atomic()  # type: ignore[return-value]

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


def redacted(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
