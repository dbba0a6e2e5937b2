"""Damaged or missing databases are refused in one line; a new one is made only on purpose."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedclient import StateError
from fedclient.server.cli import main as fedserver
from fedclient.server.integrity import open_served
from fedclient.server.store import SCHEMA_VERSION

PLAN = """
[job]
name = "digits"
rounds = 3
devices_per_round = 2
min_devices = 2
[model]
kind = "softmax"
inputs = 64
classes = 10
"""


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path]:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    db = tmp_path / "ok.sqlite"
    assert fedserver(["init", "--plan", str(plan), "--db", str(db)]) == 0
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return plan, db


def _damage(db: Path, kind: str) -> Path:
    bad = db.with_name(f"{kind}.sqlite")
    if kind == "foreign":  # a valid SQLite file that some other program made
        conn = sqlite3.connect(bad)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        return bad
    shutil.copy(db, bad)
    if kind == "newer":  # made by a later fedserver: its rows may mean something else
        conn = sqlite3.connect(bad)
        newer = str(SCHEMA_VERSION + 1)
        conn.execute("UPDATE meta SET value=? WHERE name='schema_version'", [newer])
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        return bad
    size = bad.stat().st_size
    with bad.open("r+b") as f:
        if kind == "half":
            f.truncate(size // 2)
        elif kind == "zero":
            f.truncate(0)
        elif kind == "header":
            f.write(b"X" * 100)
        elif kind == "pages":  # random bytes over the second page's b-tree header
            page_size = int.from_bytes(f.read(18)[16:18], "big")
            f.seek(65536 if page_size == 1 else page_size)  # 1 stands for 64 KiB
            f.write(os.urandom(64))
    return bad


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("half", "damaged"),
        ("zero", "empty"),
        ("header", "header is damaged"),
        ("pages", "damaged"),
        ("missing", "no such database"),
        ("foreign", "not a fedserver database"),
        ("newer", "newer"),
    ],
)
def test_a_damaged_missing_foreign_or_newer_database_is_refused_in_one_line(
    good: tuple[Path, Path], kind: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plan, db = good
    bad = db.with_name("nowhere.sqlite") if kind == "missing" else _damage(db, kind)
    before = bad.read_bytes() if bad.exists() else None
    code = fedserver(["--plan", str(plan), "--db", str(bad), "--port", "1"])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and says in lines[0], err
    assert "Traceback" not in err
    # Nothing was written: not a byte changed, no database appeared where none was.
    assert (bad.read_bytes() if bad.exists() else None) == before


def test_init_makes_the_database_once_and_the_server_resumes_it(
    good: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    plan, db = good
    store = open_served(db)
    job = store.job("digits")
    assert job is not None and job.model_version == 0
    store.close()
    assert fedserver(["init", "--plan", str(plan), "--db", str(db)]) != 0
    assert "already there" in capsys.readouterr().err
    with pytest.raises(StateError, match="not a fedserver database"):
        other = db.with_name("other.sqlite")
        conn = sqlite3.connect(other)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        open_served(other)


def test_a_database_at_schema_10_gains_the_admissions_index(good: tuple[Path, Path]) -> None:
    # Schema 10 (round_parts) came before 11 (the index that finds a round's next
    # admission seq): a database a fedserver of schema 10 made is brought to 11.
    from fedclient.server.store import ServerStore

    _, db = good
    conn = sqlite3.connect(db)
    conn.execute("DROP INDEX admissions_in_order")
    conn.execute("UPDATE meta SET value='10' WHERE name='schema_version'")
    conn.commit()
    conn.close()
    ServerStore(db).db.close()
    conn = sqlite3.connect(db)
    index = "SELECT name FROM sqlite_master WHERE type='index' AND name='admissions_in_order'"
    assert conn.execute(index).fetchall() == [("admissions_in_order",)]
    version = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    assert SCHEMA_VERSION >= 11 and version == (str(SCHEMA_VERSION),)
    conn.close()
