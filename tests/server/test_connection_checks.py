"""PostgreSQL: a worker's connection is checked (a round trip) only after it rested or
failed, not before every request (issue 27); a broken one is replaced either way."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from fedclient._exceptions import ServiceUnavailable
from fedclient.server.postgres import PostgresDatabase


def _backend(db: PostgresDatabase) -> int:
    """The server process of the connection a request of ``db`` holds."""
    with db.exclusive(lock=False):
        return int(db.execute("SELECT pg_backend_pid()").fetchone()[0])


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])  # until it exits


def _until_ready(db: PostgresDatabase) -> None:
    deadline = time.monotonic() + 30
    while not db.ready():  # the pool connects again in the background
        assert time.monotonic() < deadline, "the pool did not connect again"


def test_a_connection_in_use_is_not_checked_and_one_that_rested_is(postgres: Any) -> None:
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    url = postgres.database()
    db = PostgresDatabase(url)
    try:
        db.check_idle_seconds = 3600.0  # every request follows one a moment ago
        first = _backend(db)
        assert _backend(db) == first  # the same connection, taken without a check
        _terminate(url, first)
        # Not checked: its request's first statement finds it broken (503, nothing done).
        with pytest.raises(ServiceUnavailable), db.exclusive(lock=False):
            db.execute("SELECT 1").fetchall()
        _until_ready(db)
        second = _backend(db)
        assert second != first
        db.check_idle_seconds = 0.0  # every request follows a rest
        _terminate(url, second)
        # Checked: the pool finds it broken and gives the request a new one.
        third = _backend(db)
        assert third not in (first, second)
    finally:
        db.close()
