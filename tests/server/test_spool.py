"""Update bodies of a served SQLite file live in a file per round beside it, written once
(`fedclient.server.spool`): durable with the group commit, read back by a restarted
server, deleted only once their round's close is committed. PostgreSQL's workers keep
theirs in a folder they share (``fedserver --bodies``), or in the database's rows."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fedclient._exceptions import StateError
from fedclient.protocol import decode_tensors
from fedclient.server.integrity import open_served
from fedclient.server.spool import spool_directory
from fedclient.server.store import ServerStore
from tests.conftest import Server

pytestmark = pytest.mark.anyio


@pytest.fixture
def sqlite_only(engine: str) -> None:
    if engine != "sqlite":
        pytest.skip("the spool is a served SQLite file's (PostgreSQL keeps bodies in rows)")


async def _upload(devices: list[Any]) -> None:
    for device in devices:
        while (await device.astep()).status != "uploaded":
            pass


async def test_bodies_are_kept_once_beside_the_file_and_go_with_their_round(
    sqlite_only: None, make_server: Any, make_devices: Any, tmp_path: Path
) -> None:
    path = tmp_path / "served.sqlite"
    server: Server = make_server(db=str(path), devices_per_round=4, min_devices=4)
    devices = make_devices(4, server.transport())
    await _upload(devices[:3])
    spooled = spool_directory(path) / "round-1.bin"
    with contextlib.closing(sqlite3.connect(path)) as other:
        rows = other.execute(
            "SELECT body, spool_offset, spool_length FROM updates ORDER BY seq"
        ).fetchall()
    assert [r[0] for r in rows] == [None] * 3  # not in the database
    assert [r[1] for r in rows] == [0, rows[0][2], rows[0][2] + rows[1][2]]
    assert spooled.stat().st_size == sum(r[2] for r in rows)
    # Another store on the file (a restarted server) reads each body back whole.
    with ServerStore(path) as reader:
        bodies = [u.body for u in reader.updates(1)]
    assert all(b is not None and decode_tensors(b)[0] for b in bodies)
    await _upload(devices[3:])  # the fourth fills the round: it closes
    assert server.store.round(1).status == "closed"  # type: ignore[union-attr]
    assert not spooled.exists()
    assert server.store.updates(1, bodies=False, unfolded=True) == []


async def test_a_close_undone_with_its_request_keeps_the_rounds_bodies(
    sqlite_only: None, make_server: Any, make_devices: Any, tmp_path: Path
) -> None:
    path = tmp_path / "served.sqlite"
    server: Server = make_server(db=str(path), devices_per_round=4, min_devices=4)
    await _upload(make_devices(4, server.transport())[:2])
    store = server.store
    with pytest.raises(RuntimeError), store.atomic():
        store.close_round(1, "closed", 0.0, "quota", None)
        raise RuntimeError("the request failed after closing the round")
    store.db.commit()  # the group commits what else it holds; the close is not in it
    assert store.round(1).status == "open"  # type: ignore[union-attr]
    assert (spool_directory(path) / "round-1.bin").exists()
    assert len([u for u in store.updates(1) if u.body]) == 2


async def test_a_starting_server_deletes_the_files_of_rounds_no_longer_open(
    sqlite_only: None, make_server: Any, make_devices: Any, tmp_path: Path
) -> None:
    path = tmp_path / "served.sqlite"
    first: Server = make_server(db=str(path), devices_per_round=4, min_devices=4)
    await _upload(make_devices(4, first.transport())[:1])
    first.store.close()
    orphan = spool_directory(path) / "round-7.bin"  # a round closed before a crash
    orphan.write_bytes(b"\0" * 64)
    second: Server = make_server(db=str(path), devices_per_round=4, min_devices=4)
    second.transport()  # the served app turns the spool on
    assert not orphan.exists()
    assert (spool_directory(path) / "round-1.bin").exists()  # round 1 is still open
    assert [u.body is not None for u in second.store.updates(1)] == [True]


async def test_postgresql_workers_keep_bodies_in_a_folder_they_share(
    engine: str, make_server: Any, make_devices: Any, tmp_path: Path
) -> None:
    """``fedserver --bodies DIR``: each worker appends to files of its own, any worker
    reads any of them (a close reads those a killed worker left), a worker that would
    not find them is refused at start, and a round's files go with its close."""
    if engine != "postgresql":
        pytest.skip("--bodies is for PostgreSQL's workers (a SQLite file spools beside it)")
    folder = tmp_path / "bodies"
    server: Server = make_server(devices_per_round=4, min_devices=4)
    server.store.spool_bodies(folder)
    devices = make_devices(4, server.transport())
    await _upload(devices[:3])
    url = server.store.db.url  # type: ignore[attr-defined]
    with ServerStore(url) as other:  # another worker of the same database
        rows = other.db.execute(
            "SELECT body, spool_offset, spool_length, worker FROM updates ORDER BY seq"
        ).fetchall()
        assert [r[0] for r in rows] == [None] * 3  # not in the database
        assert {r[3] for r in rows} == {server.store.worker}
        spooled = folder / f"round-1.{server.store.worker}.bin"
        assert spooled.stat().st_size == sum(r[2] for r in rows)
        other.spool_bodies(folder)
        bodies = [u.body for u in other.updates(1)]
        assert all(b is not None and decode_tensors(b)[0] for b in bodies)
    with ServerStore(url) as elsewhere, pytest.raises(StateError, match="same --bodies"):
        elsewhere.spool_bodies()  # bodies in rows: it could not read these
    with ServerStore(url) as elsewhere, pytest.raises(StateError, match="are not here"):
        elsewhere.spool_bodies(tmp_path / "another-folder")
    # `fedserver` checks it at start (`open_served`), in one line each.
    with pytest.raises(StateError, match="serve it with the same folder"):
        open_served(url)
    with pytest.raises(StateError, match="--bodies folder its workers used"):
        open_served(url, bodies=tmp_path / "another-folder")
    open_served(url, bodies=folder).close()  # whole: every check passes
    await _upload(devices[3:])  # the fourth fills the round: it closes
    assert server.store.round(1).status == "closed"  # type: ignore[union-attr]
    assert not list(folder.glob("round-1.*"))
    assert server.store.updates(1, bodies=False, unfolded=True) == []
