"""Group commit behind the app (a SQLite file: every request's writes; PostgreSQL: the
uploads'): many requests' writes share one COMMIT, none is answered before its writes
are committed, and a group lost at its COMMIT is lost whole."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

import fedclient
from tests.conftest import Server, step_until

pytestmark = pytest.mark.anyio


async def test_an_upload_is_answered_only_once_its_group_commit_is_on_disk(
    engine: str, make_server: Any, make_devices: Any, tmp_path: Path
) -> None:
    if engine != "sqlite":
        pytest.skip("a SQLite file's (PostgreSQL's: below)")
    path = tmp_path / "grouped.sqlite"
    server: Server = make_server(db=str(path), devices_per_round=3, min_devices=3)
    commits: list[str] = []
    server.store.db.conn.set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: commits.append(sql) if sql == "COMMIT" else None
    )
    devices = await _trained(make_devices, server)
    commits.clear()
    outcomes = await asyncio.gather(*(device.astep() for device in devices[:2]))
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]
    # Another connection (a process after a crash) sees both acknowledged updates.
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("SELECT count(*) FROM updates").fetchone()[0] == 2
    assert 1 <= len(commits) <= 2  # one when both wrote within the commit window


async def _trained(make_devices: Any, server: Server) -> list[fedclient.Client]:
    """Three devices of ``server``, each admitted with its update trained, not sent."""
    devices: list[fedclient.Client] = make_devices(3, server.transport())
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    return devices


def _postgres_only(engine: str) -> None:
    if engine != "postgresql":
        pytest.skip("PostgreSQL's group commit (uploads only); SQLite's is tested above")


def _committed_updates(url: str) -> int:
    """Updates another connection sees: what a worker that starts now would find."""
    import psycopg

    with psycopg.connect(url) as other:
        return int(other.execute("SELECT count(*) FROM updates").fetchone()[0])  # type: ignore[index]


async def test_postgresql_uploads_share_a_commit_and_are_answered_once_committed(
    engine: str, make_server: Any, make_devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _postgres_only(engine)
    server: Server = make_server(devices_per_round=3, min_devices=3)
    db = server.store.db
    groups: list[int] = []
    commit = type(db)._commit_transaction

    def counted(self: Any, wrote: bool) -> Any:
        groups.append(_committed_updates(db.url))  # type: ignore[attr-defined]
        return commit(self, wrote)

    devices = await _trained(make_devices, server)
    monkeypatch.setattr(type(db), "_commit_transaction", counted)
    outcomes = await asyncio.gather(*(device.astep() for device in devices[:2]))
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]
    assert _committed_updates(db.url) == 2  # type: ignore[attr-defined]
    # Each was answered after a COMMIT that began with it not yet visible: one group
    # when both were taken within the window, two at most.
    assert 1 <= len(groups) <= 2 and groups[0] == 0


async def test_a_postgresql_group_lost_at_its_commit_fails_its_uploads_and_keeps_none(
    engine: str, make_server: Any, make_devices: Any
) -> None:
    """The worker's connection is killed (pg_terminate_backend) as its group commits:
    the group's uploads are answered 503 and kept nowhere (the caches are told), the
    devices send them again (the client retries a 503 by itself), and each is counted
    once."""
    _postgres_only(engine)
    import psycopg

    server: Server = make_server(devices_per_round=3, min_devices=3)
    db = server.store.db
    url = db.url  # type: ignore[attr-defined]
    devices = await _trained(make_devices, server)
    killed: list[int] = []
    seen_at_kill: list[int] = []
    lost: list[int] = []

    def kill_the_worker_connection() -> None:
        # At a group's COMMIT (on the committer's thread), not a transaction's of its own.
        if not killed and threading.current_thread().name.startswith("postgresql-commit"):
            with psycopg.connect(url, autocommit=True) as killer:
                killed.extend(
                    r[0]
                    for r in killer.execute(
                        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    ).fetchall()
                )
            seen_at_kill.append(_committed_updates(url))

    db.before_commit.append(kill_the_worker_connection)
    db.on_rollback.append(lambda: lost.append(_committed_updates(url)))
    outcomes = await asyncio.gather(*(device.astep() for device in devices[:2]))
    assert killed == [True]  # the worker's one connection, as its group was committing
    assert seen_at_kill == [0] and lost == [0]  # the group was lost whole: nothing of it kept
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]  # sent again, taken
    with psycopg.connect(url) as other:
        counted = other.execute(
            "SELECT device_id, count(*) FROM updates GROUP BY device_id"
        ).fetchall()
    assert sorted(n for _, n in counted) == [1, 1]


async def test_two_postgresql_workers_whose_last_uploads_commit_in_groups_close_the_round(
    engine: str, make_server: Any, make_devices: Any, db_url: Any
) -> None:
    """The round's two last updates reach two workers, each taken into its worker's
    group while the other's is not committed: neither sees the quota met as it takes
    its own. Counted again once committed, the round closes on its quota (not at its
    deadline, taking more updates meanwhile)."""
    _postgres_only(engine)
    url = db_url("shared")
    workers = [make_server(db=url, devices_per_round=2, min_devices=2) for _ in range(2)]
    first, second = workers
    devices = make_devices(2, [w.transport() for w in workers])
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    # The first worker's group commits only after the second's did.
    second_committed = threading.Event()
    second.store.db.after_commit.append(second_committed.set)
    first.store.db.before_commit.append(lambda: second_committed.wait(timeout=30))
    outcomes = await asyncio.gather(*(device.astep() for device in devices))
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]
    assert second_committed.is_set()
    import psycopg

    with psycopg.connect(url) as other:
        status = other.execute("SELECT status, reason FROM rounds WHERE number = 1").fetchone()
    assert status == ("closed", "quota: 2 updates")


async def test_a_full_postgresql_group_commits_before_the_next_upload_joins(
    engine: str, make_server: Any, make_devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group holds at most `GROUP_MOST` uploads (each a subtransaction): the next one
    commits it and begins another. With room for one, two uploads taken together make
    two groups, both committed, both answered."""
    _postgres_only(engine)
    import fedclient.server.postgres as postgres

    monkeypatch.setattr(postgres, "GROUP_MOST", 1)
    server: Server = make_server(devices_per_round=3, min_devices=3)
    db = server.store.db
    commits: list[int] = []
    db.after_commit.append(lambda: commits.append(_committed_updates(db.url)))  # type: ignore[attr-defined]
    devices = await _trained(make_devices, server)
    commits.clear()
    outcomes = await asyncio.gather(*(device.astep() for device in devices[:2]))
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]
    assert commits[:2] == [1, 2]  # the first group alone, then the second
