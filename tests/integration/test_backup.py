"""``fedserver backup`` while a ``fedserver`` process serves a round, then a restore from
the copy, as an operator does it: the job completes, no request got a 5xx, no update is
counted twice (SQLite: the file and its bodies; PostgreSQL: pg_dump, then pg_restore)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

import fedclient
from fedclient.server.integrity import open_served
from tests.integration.test_fedserver_process import (
    ADMIN_TOKEN,
    FedServerProcess,
    fedserver,  # noqa: F401  (the fixture)
)
from tests.postgres import PostgresCluster

PER_ROUND = 6


def _fedserver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedclient.server.cli", *args], capture_output=True, text=True
    )


def _server_errors(server: FedServerProcess) -> list[str]:
    """The request counters of 5xx answers the server's metrics show."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    text = httpx.get(server.url + "/metrics", headers=auth, timeout=5).text
    return [line for line in text.splitlines() if 'status="5' in line and "_total" in line]


def _upload(device: fedclient.Client) -> fedclient.StepOutcome:
    """Step a device until its update for the round it is admitted to is acknowledged (or
    it is told to wait or that the job finished)."""
    for _ in range(12):
        try:
            outcome = device.run_once()
        except fedclient.TransportError:  # the server is being restarted: try again
            continue
        if outcome.status in ("uploaded", "waiting", "finished"):
            return outcome
    raise AssertionError("the device never got an answer it could act on")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "postgresql+bodies"])
def test_a_backup_taken_mid_round_restores_and_the_job_completes(
    engine: str,
    fedserver: Any,  # noqa: F811
    postgres: PostgresCluster | None,
    digits: Any,
    tmp_path: Path,
) -> None:
    """``postgresql+bodies``: the workers keep update bodies in a folder (``--bodies``),
    which the backup copies beside the dump."""
    if engine.startswith("postgresql") and postgres is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    db = postgres.database() if engine.startswith("postgresql") and postgres else None
    folder = tmp_path / "bodies"
    bodies = ("--bodies", str(folder)) if engine == "postgresql+bodies" else ()
    server: FedServerProcess = fedserver(rounds=3, per_round=PER_ROUND, db=db, options=bodies)

    def device(i: int) -> fedclient.Client:
        """Device ``i``, as its app makes it: its state in a file it resumes from."""
        part = slice(i * 60, (i + 1) * 60)
        return fedclient.Client(
            server.url,
            "digits",
            (digits.x_train[part], digits.y_train[part]),
            seed=i,
            state=str(tmp_path / f"device-{i}.sqlite"),
        )

    def upload(i: int) -> str:
        with device(i) as app:
            return _upload(app).status

    assert [upload(i) for i in range(PER_ROUND)] == ["uploaded"] * PER_ROUND  # round 1
    assert [upload(i) for i in range(PER_ROUND, PER_ROUND + 2)] == ["uploaded"] * 2  # round 2

    # The copy, while three more devices upload into round 2 beside it.
    copy = tmp_path / "backup" / "server.sqlite"
    outcomes: list[Any] = []
    uploading = [
        threading.Thread(target=lambda i=i: outcomes.append(upload(i)))
        for i in range(PER_ROUND + 2, PER_ROUND + 5)
    ]
    for thread in uploading:
        thread.start()
    made = _fedserver("backup", "--db", server.db, *bodies, str(copy))
    for thread in uploading:
        thread.join()
    assert made.returncode == 0, made.stderr
    assert outcomes == ["uploaded"] * 3
    assert server.round(2)["updates"] == 5 and server.round(2)["status"] == "open"
    assert _server_errors(server) == []
    server.kill()  # the machine is lost: everything since the copy goes with it

    restored_db, restored_bodies = str(copy), ()
    if engine.startswith("postgresql"):
        assert postgres is not None
        restored_db = postgres.database()
        done = subprocess.run(
            ["pg_restore", "--no-owner", f"--dbname={restored_db}", str(copy)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        if bodies:
            assert list(folder.glob("round-*.bin"))  # round 2's bodies were in files
            restored_bodies = ("--bodies", f"{copy}.bodies")
    if engine != "postgresql":
        assert Path(f"{copy}.bodies").is_dir()  # round 2's bodies came with the copy
    restored = FedServerProcess(tmp_path, 3, PER_ROUND, restored_db, options=restored_bodies)
    restored.made = True  # served as it is: never initialised again
    restored.port, restored.url = server.port, server.url  # the devices' server, back
    restored.start()
    try:
        taken = restored.round(2)["updates"]
        assert 2 <= taken <= 5  # the copy's moment: between the two uploads and the five
        for _ in range(6):  # the devices go on until the job is done
            for i in range(2 * PER_ROUND):
                upload(i)
            if restored.status()["status"] == "finished":
                break
        final = restored.status()
        assert final["status"] == "finished" and final["model_version"] == 3
        assert _server_errors(restored) == []
        for number in (1, 2, 3):
            summary = restored.round(number)
            assert summary["status"] == "closed" and summary["updates"] == PER_ROUND

        # The next step: a backup of the restored server, which serves again as it is.
        again = tmp_path / "again" / "server.sqlite"
        if engine == "sqlite":
            second = _fedserver("backup", "--db", restored_db, str(again))
            assert second.returncode == 0, second.stderr
            open_served(again).close()  # whole: every check passes
    finally:
        restored.proc.terminate()  # type: ignore[union-attr]
        restored.proc.wait(timeout=10)  # type: ignore[union-attr]
    _no_update_twice(engine, restored_db)


def _no_update_twice(engine: str, url: str) -> None:
    """Every round holds at most one update per device, each key at most once."""
    query = (
        "SELECT round_id, device_id, count(*) FROM updates GROUP BY round_id, device_id"
        " HAVING count(*) > 1"
    )
    if engine.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url) as conn:
            assert conn.execute(query).fetchall() == []
    else:
        import sqlite3

        conn = sqlite3.connect(url)
        assert conn.execute(query).fetchall() == []
        conn.close()
