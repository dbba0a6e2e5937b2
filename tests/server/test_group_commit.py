"""Group commit (a SQLite file behind the app): many requests' writes share one COMMIT,
and none is answered before its writes are on disk."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
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
        pytest.skip("group commit is SQLite's (a file)")
    path = tmp_path / "grouped.sqlite"
    server: Server = make_server(db=str(path), devices_per_round=3, min_devices=3)
    commits: list[str] = []
    server.store.db.conn.set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: commits.append(sql) if sql == "COMMIT" else None
    )
    devices = make_devices(3, server.transport())
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    commits.clear()
    outcomes = await asyncio.gather(*(device.astep() for device in devices[:2]))
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]
    # Another connection (a process after a crash) sees both acknowledged updates.
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("SELECT count(*) FROM updates").fetchone()[0] == 2
    assert 1 <= len(commits) <= 2  # one when both wrote within the commit window
