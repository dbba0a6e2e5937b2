"""Which engine a database URL names, and a connection to it (`connect`)."""

from __future__ import annotations

from pathlib import Path

from fedclient.server.database import Database, SqliteDatabase, is_postgres
from fedclient.server.postgres import PostgresDatabase

__all__ = ["connect"]


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
