"""Damage inside a valid database file is found at start and refused in one line
(`fedclient.server.integrity`), as is a second server on the same file: the server never
serves a job from rows, models or update bodies it cannot trust."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fedclient
from fedclient.server import FederationService, ServerStore, create_app, load_plan
from fedclient.server.cli import main as fedserver
from fedclient.server.integrity import open_served
from fedclient.server.spool import spool_directory

PLAN = """
[job]
name = "digits"
rounds = 3
devices_per_round = 4
min_devices = 4
deadline_seconds = 600
seed = 1
[model]
kind = "softmax"
inputs = 64
classes = 10
[train]
epochs = 1
batch_size = 8
learning_rate = 0.1
"""


@pytest.fixture
def served(tmp_path: Path, digits: Any) -> tuple[Path, Path]:
    """A plan and the database ``fedserver init`` made of it, served until round 1 holds
    three spooled updates (of four), then closed (as a stopped server leaves it)."""
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    db = tmp_path / "server.sqlite"
    assert fedserver(["init", "--plan", str(plan), "--db", str(db)]) == 0

    async def upload() -> None:
        service = FederationService(ServerStore(db))
        service.add_job(load_plan(plan))
        transport = httpx.ASGITransport(app=create_app(service, metrics=False))
        for i in range(3):
            part = slice(i * 100, (i + 1) * 100)
            device = fedclient.Client(
                "http://fedserver.local",
                "digits",
                (digits.x_train[part], digits.y_train[part]),
                transport=transport,
                seed=i,
            )
            for _ in range(8):
                if (await device.astep()).status == "uploaded":
                    break
            device.close()
        service.store.close()

    import asyncio

    asyncio.run(upload())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("SELECT count(*) FROM updates WHERE spool_offset >= 0").fetchone() == (
            3,
        )
    return plan, db


def _sql(statement: str, *params: Any) -> Callable[[Path], None]:
    def damage(db: Path) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(statement, params)
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    return damage


def _overwrite(find: Callable[[sqlite3.Connection], bytes], skip: int, garbage: bytes) -> Any:
    """Overwrite, in the file's bytes, ``garbage`` at ``skip`` bytes into the stored value
    ``find`` reads: damage under SQLite, where ``PRAGMA quick_check`` does not look."""

    def damage(db: Path) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            value = find(conn)
        data = bytearray(db.read_bytes())
        at = data.find(value)
        assert at >= 0 and data.find(value, at + 1) < 0  # one copy in the file
        data[at + skip : at + skip + len(garbage)] = garbage
        db.write_bytes(bytes(data))

    return damage


def _model_body(conn: sqlite3.Connection) -> bytes:
    return bytes(conn.execute("SELECT body FROM models WHERE version=0").fetchone()[0])


def _plan_text(conn: sqlite3.Connection) -> bytes:
    return str(conn.execute("SELECT plan FROM jobs").fetchone()[0]).encode()


def _rounds_page(db: Path) -> None:
    """Seeded random bytes over the cells of the rounds table's (only) page."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='rounds'").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    end = root[0] * page_size  # cells fill a page from its end
    with db.open("r+b") as f:
        f.seek(end - 40)
        f.write(np.random.default_rng(3).bytes(40))


def _bodies(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(db: Path) -> None:
        change(spool_directory(db) / "round-1.bin")

    return damage


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _zeros(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "plan bytes": (_overwrite(_plan_text, 10, b"\xff\xfe\xff\xfe"), "table jobs is damaged"),
    "plan text": (_sql("UPDATE jobs SET plan = ?", '{"job": 3}'), "plan is damaged"),
    "rounds page": (_rounds_page, "damaged"),
    "round types": (_sql("UPDATE rounds SET deadline = 'soon'"), "table rounds is damaged"),
    "model bytes": (_overwrite(_model_body, 200, b"\xff" * 8), "does not match its digest"),
    "model gone": (_sql("DELETE FROM models"), "model version 0 is missing"),
    "strategy state": (
        _sql("INSERT INTO strategy_state VALUES ('digits', x'00ff')"),
        "strategy state is damaged",
    ),
    "bodies gone": (lambda db: shutil.rmtree(spool_directory(db)), "bodies are missing"),
    "bodies short": (_bodies(_truncate), "shorter"),
    "bodies zeroed": (_bodies(_zeros), "holds no update body"),
    "body lost": (
        _sql("UPDATE updates SET spool_offset = NULL, spool_length = NULL WHERE seq = 2"),
        "running sum holds 0",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_refused_in_one_line(
    served: tuple[Path, Path], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plan, db = served
    damage, says = DAMAGE[kind]
    damage(db)
    before = db.read_bytes()
    code = fedserver(["--plan", str(plan), "--db", str(db), "--port", "1"])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(db) in lines[0] and says in lines[0], err
    assert "Traceback" not in err
    assert db.read_bytes() == before  # only read: nothing was written
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


def test_the_undamaged_database_is_served(served: tuple[Path, Path]) -> None:
    # The fixture itself passes every check: the open round's three bodies are whole.
    _, db = served
    store = open_served(db)
    assert [u.body is not None for u in store.updates(1)] == [True] * 3
    store.close()


def test_a_second_server_on_the_same_file_is_refused(
    served: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    plan, db = served
    first = open_served(db)  # a serving process holds the file
    code = fedserver(["--plan", str(plan), "--db", str(db), "--port", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"another fedserver (pid {os.getpid()})" in lines[0], err
    first.close()
    open_served(db).close()  # once the first is gone, the file may be served again


def test_a_damaged_model_in_postgresql_is_refused_in_one_line(
    postgres: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    import psycopg

    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    url = postgres.database()
    assert fedserver(["init", "--plan", str(plan), "--db", url]) == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE models SET body = overlay(body placing '\\xffffffff' from 200)")
    code = fedserver(["--plan", str(plan), "--db", url, "--port", "1"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "does not match its digest" in lines[0], err
    assert "Traceback" not in err
    postgres.drop([url.rsplit("/", 1)[1].split("?")[0]])


@pytest.mark.anyio
async def test_a_model_damaged_while_serving_is_never_served(make_server: Any) -> None:
    # Damaged after the start-up checks (a disk going bad): the digest, checked as a
    # version is first read, refuses it; every request for it is a 503, none a 200.
    from tests.conftest import enrol

    server = make_server()
    body, _ = server.store.model("digits", 0)
    damaged = body[:-8] + b"\xff" * 8
    with server.store.atomic():
        server.store.db.execute("UPDATE models SET body = ? WHERE version = 0", [damaged])
    async with server.http() as http:
        device = await enrol(http)
        answer = await http.get("/v1/models/digits/0", headers=device)
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
        assert "damaged" in answer.json()["error"]["message"]
        inline = await http.post(
            "/v1/jobs/digits/checkin",
            json={"inline_model_max": 1 << 20},
            headers={**device, "Accept": "application/msgpack"},
        )
        assert inline.status_code == 503
