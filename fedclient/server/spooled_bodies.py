"""Where a store keeps update bodies until they are folded (`SpooledBodies`, a part of
`fedclient.server.store.ServerStore`): in append-only files (`fedclient.server.spool`)
beside a served SQLite file or, for PostgreSQL's workers, in the folder they share
(`fedserver --bodies`); else in the ``updates`` rows."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from fedclient._exceptions import StateError
from fedclient.server.database import Database, SqliteDatabase
from fedclient.server.schema import RoundRow
from fedclient.server.spool import BodySpool, spool_directory

__all__ = ["SpooledBodies"]


class SpooledBodies:
    """The store's spool of update bodies (see the module docstring)."""

    db: Database
    #: This worker's name (`fedclient.server.store.ServerStore.worker`): its files' too.
    worker: str
    #: Where update bodies are appended, or None: in the database.
    _spool: BodySpool | None
    #: Where bodies are read from (the spool itself, when it spools).
    _reader: BodySpool | None

    def exclusive(self, *, lock: bool = True) -> AbstractContextManager[None]:
        raise NotImplementedError

    def open_rounds(self) -> list[RoundRow]:
        raise NotImplementedError

    def spool_bodies(self, directory: str | Path | None = None) -> None:
        """Keep update bodies in files, written once and synced before the COMMIT of the
        rows that name them (`fedclient.server.spool`): a served SQLite file's in a
        folder beside it; a PostgreSQL database's in ``directory`` (`fedserver
        --bodies`), which every worker that serves it shares, each appending to files of
        its own. Without ``directory`` a PostgreSQL database keeps them in its rows, and
        is refused if its open rounds name bodies in files (`spooled_rounds`)."""
        db = self.db
        if self._spool is not None or (isinstance(db, SqliteDatabase) and db.path == ":memory:"):
            return
        if isinstance(db, SqliteDatabase):
            spool = BodySpool(spool_directory(db.path))
        else:
            with self.exclusive(lock=False):
                in_files = self.spooled_rounds()
            if directory is None:
                if in_files:
                    raise StateError(
                        f"open rounds {sorted(in_files)} keep update bodies in files:"
                        " start every worker with the same --bodies DIR"
                    )
                return
            spool = BodySpool(directory, worker=self.worker)
            for round_id, workers in sorted(in_files.items()):
                missing = workers - spool.files(round_id)
                if missing:
                    raise StateError(
                        f"{directory}: the update bodies of round {round_id} that workers"
                        f" {sorted(missing)} took are not here (every worker shares one"
                        " --bodies folder)"
                    )
        with self.exclusive():
            spool.keep_only({r.round_id for r in self.open_rounds()})
        db.before_commit.append(spool.sync)
        db.after_commit.append(self._remove_closed_spools)
        db.on_rollback.append(spool.rolled_back)
        self._spool = self._reader = spool

    def spooled_rounds(self) -> dict[int, set[str]]:
        """The open rounds whose updates name bodies in spool files, and the workers
        whose files hold them."""
        rows = self.db.execute(
            "SELECT DISTINCT u.round_id, u.worker FROM updates u"
            " JOIN rounds r ON r.round_id = u.round_id"
            " WHERE r.status = 'open' AND u.spool_offset IS NOT NULL"
        ).fetchall()
        found: dict[int, set[str]] = {}
        for round_id, worker in rows:
            found.setdefault(int(round_id), set()).add(str(worker or ""))
        return found

    def _remove_closed_spools(self) -> None:
        """After a COMMIT: delete the spool files of the rounds it closed."""
        assert self._spool is not None
        doomed = sorted(self._spool.doomed())
        if doomed:
            marks = ", ".join("?" * len(doomed))
            query = f"SELECT round_id FROM rounds WHERE status != 'open' AND round_id IN ({marks})"
            if isinstance(self.db, SqliteDatabase):
                # On the bare connection: outside any transaction, it reads what is committed.
                rows = self.db.conn.execute(query, doomed).fetchall()
            else:
                rows = self.db.execute(query, doomed).fetchall()
            self._spool.remove({int(r[0]) for r in rows})

    def _spooled(self) -> BodySpool:
        """The spool to read bodies from (rows that a serving process wrote)."""
        if self._reader is None:
            assert isinstance(self.db, SqliteDatabase)
            self._reader = BodySpool(spool_directory(self.db.path))
        return self._reader
