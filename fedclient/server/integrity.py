"""What a server checks before it serves a database: that ``fedserver init`` made it, that
it is undamaged, and that it is whole. `open_served` runs every check and returns the
store; each problem is a `fedclient.StateError` of one line that names the database
and what is wrong, and nothing is written before the checks pass:

    file       it exists, is not empty, has SQLite's header and passes ``PRAGMA quick_check``
               (pages, b-trees) -- a SQLite file
    schema     the server's tables, and a schema version no newer than this server's
    served     no other ``fedserver`` serves the file (`fedclient.server.database`)
    rows       every row the server reads to resume decodes as what it stands for: the
               jobs (and their plans), the rounds, the open rounds' admissions, updates,
               counts and running sums, each job's strategy memory
    models     the model each job and each open round serves matches its stored digest
               (its ETag), decodes, and is finite: a damaged model would be served to
               every device, which would discard it, and the job would stall in silence
    bodies     every update body of an open round is there and whole: a SQLite file's
               folder (``<db>.bodies``) holds each spooled body at the offset its row
               names (a copy of the file without its folder is refused: restore both,
               as ``fedserver backup`` copies them), and a round's running sum holds as
               many updates as have no body left
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fedclient._exceptions import StateError
from fedclient.protocol import JobPlan, decode_tensors
from fedclient.server.database import is_postgres, redacted
from fedclient.server.engines import connect
from fedclient.server.rounds import model_etag
from fedclient.server.schema import SCHEMA_VERSION
from fedclient.server.spool import spool_directory, spool_file
from fedclient.server.store import ServerStore

__all__ = ["Execute", "check_contents", "open_served"]

#: The tables every fedserver database has had since its first schema.
_TABLES = {"meta", "jobs", "rounds", "devices"}

_JOB_STATUSES = {"running", "paused", "finished", "stopped"}
_ROUND_STATUSES = {"open", "closed", "failed"}


def open_served(url: str | Path, *, bodies: str | Path | None = None) -> ServerStore:
    """The store of the database at ``url``, checked (see the module docstring) and, for
    a SQLite file, locked against a second server. ``bodies``: the folder a PostgreSQL
    database's workers keep update bodies in (`fedserver --bodies`). `fedclient.
    StateError` otherwise; a database refused was only read, never written."""
    if is_postgres(url):
        where = redacted(str(url)).split("@")[-1]
        db = connect(str(url))
        try:
            _check_version(_schema_version(db.tables(), db.execute), where)
            folder = Path(bodies) if bodies is not None else None
            check_contents(db.execute, set(db.tables()), where, bodies=folder)
        finally:
            db.close()
        return ServerStore(str(url))
    path = Path(str(url).removeprefix("sqlite:///"))
    _check_file(path)
    return ServerStore(path, lock_file=True)


def _check_file(where: Path) -> None:
    """Everything about a SQLite file, read through a read-only connection."""
    make = f"create one with: fedserver init --plan PLAN --db {where}"
    if not where.exists():
        raise StateError(f"{where}: no such database ({make})")
    if where.stat().st_size == 0:
        raise StateError(f"{where}: the file is empty (0 bytes), not a database ({make})")
    with where.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise StateError(f"{where}: not an SQLite database (its header is damaged)")
    try:
        conn = sqlite3.connect(f"{where.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"{where}: cannot open the database ({_first_line(exc)})") from None
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            damage = " ".join(problems[0].split())  # SQLite's report spans lines
            raise StateError(f"{where}: the database is damaged: {damage}")
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
        _check_version(_schema_version(tables, conn.execute), where)
        check_contents(conn.execute, tables, where, bodies=spool_directory(where))
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{where}: the database is damaged ({_first_line(exc)})") from None
    finally:
        conn.close()


#: Runs one statement with ``?`` placeholders; its cursor (``description``, ``fetchall``).
Execute = Callable[[str, Sequence[Any]], Any]


def _schema_version(tables: Iterable[str], execute: Execute) -> int | None:
    if not set(tables) >= _TABLES:
        return None
    row = execute("SELECT value FROM meta WHERE name='schema_version'", ()).fetchone()
    return int(row[0]) if row and str(row[0]).isdigit() else None


def _check_version(version: int | None, where: object) -> None:
    if version is None:
        raise StateError(
            f"{where}: not a fedserver database (create one with: fedserver init --plan PLAN"
            " --db ...)"
        )
    if version > SCHEMA_VERSION:
        raise StateError(
            f"{where}: schema {version} is newer than this fedserver's ({SCHEMA_VERSION})"
        )


def check_contents(
    execute: Execute, tables: set[str], where: object, *, bodies: Path | None
) -> None:
    """Every row a server reads to resume, its models, and its open rounds' update bodies
    (``bodies``: the folder a SQLite file spools them to); see the module docstring.
    `fedclient.StateError` naming ``where`` at the first problem."""
    rows = _Rows(execute, tables, where)
    versions: dict[str, set[int]] = {}
    for job in rows.read("jobs", _JOB_COLUMNS):
        name = job["name"]
        try:
            msgspec.json.decode(job["plan"], type=JobPlan)
        except (msgspec.DecodeError, ValueError) as exc:
            raise StateError(f"{where}: job {name!r}'s plan is damaged ({exc})") from None
        if job["status"] not in _JOB_STATUSES:
            raise StateError(f"{where}: job {name!r}'s status is damaged")
        versions[name] = {job["model_version"]}
    open_rounds = []
    for round_ in rows.read("rounds", _ROUND_COLUMNS):
        if round_["job"] not in versions or round_["status"] not in _ROUND_STATUSES:
            raise StateError(f"{where}: round {round_['round_id']}'s row is damaged")
        if round_["status"] == "open":
            open_rounds.append(round_["round_id"])
            versions[round_["job"]].add(round_["model_version"])
    for job_name, wanted in sorted(versions.items()):
        for version in sorted(wanted):
            _check_model(rows, job_name, version)
    for state in rows.read("strategy_state", {"job": str, "body": bytes}):
        rows.tensors(state["body"], f"job {state['job']!r}'s strategy state")
    for round_id in open_rounds:
        _check_open_round(rows, round_id, bodies)


_JOB_COLUMNS = {
    "name": str,
    "plan": str,
    "status": str,
    "model_version": int,
    "rounds_completed": int,
    "rounds_failed": int,
}
_ROUND_COLUMNS = {
    "round_id": int,
    "job": str,
    "number": int,
    "status": str,
    "model_version": int,
    "opened_at": float,
    "deadline": float,
    "closed_at": (float, None),
    "reason": str,
    "train_loss": (float, None),
}
_UPDATE_COLUMNS = {
    "seq": int,
    "device_id": str,
    "idempotency_key": str,
    "receipt_id": str,
    "num_examples": int,
    "train_loss": (float, None),
    "body": (bytes, None),
    "received_at": float,
    "staleness": int,
    "spool_offset": (int, None),
    "spool_length": (int, None),
    "worker": (str, None),
}


def _check_model(rows: _Rows, job: str, version: int) -> None:
    where, what = rows.where, f"job {job!r}'s model version {version}"
    found = rows.read("models", {"body": bytes, "etag": str}, "job=? AND version=?", [job, version])
    if not found:
        raise StateError(f"{where}: {what} is missing")
    body = found[0]["body"]
    if model_etag(body) != found[0]["etag"]:
        raise StateError(f"{where}: {what} is damaged (its body does not match its digest)")
    weights = rows.tensors(body, what)
    if not all(np.all(np.isfinite(w)) for w in weights.values()):
        raise StateError(f"{where}: {what} is damaged (values that are not finite)")


def _check_open_round(rows: _Rows, round_id: int, bodies: Path | None) -> None:
    where, this = rows.where, "round_id=?"
    rows.read("admissions", {"device_id": str, "admitted_at": float}, this, [round_id])
    rows.read("round_counts", {"admitted": int, "updates": int}, this, [round_id])
    updates = rows.read("updates", _UPDATE_COLUMNS, this, [round_id])
    parts = rows.read(
        "round_parts",
        {"worker": str, "updates": int, "body": (bytes, None), "weight": float, "folded": int},
        this,
        [round_id],
    )
    for part in parts:
        if part["body"] is not None:
            rows.tensors(part["body"], f"round {round_id}'s partial sum {part['worker']!r}")
    folded = sum(1 for u in updates if u["body"] is None and u.get("spool_offset") is None)
    held = sum(part["folded"] for part in parts)
    if folded != held:
        raise StateError(
            f"{where}: round {round_id} has {folded} updates without a body but its running"
            f" sum holds {held}"
        )
    # By the file that holds them: a SQLite file's own (worker ""), or each PostgreSQL
    # worker's in the folder they share.
    spooled: dict[str, list[tuple[int, int]]] = {}
    for u in updates:
        if u.get("spool_offset") is not None and u.get("spool_length") is not None:
            extent = (u["spool_offset"], u["spool_length"])
            spooled.setdefault(u.get("worker") or "", []).append(extent)
    if spooled:
        if bodies is None:
            raise StateError(
                f"{where}: round {round_id}'s rows name update bodies in files (served"
                " with fedserver --bodies DIR: serve it with the same folder)"
            )
        for worker, extents in sorted(spooled.items()):
            restore = (
                "serve it with the --bodies folder its workers used (fedserver backup"
                " --bodies copies it with the database)"
                if worker
                else "restore the database with its .bodies folder (fedserver backup copies both)"
            )
            _check_spooled(where, spool_file(bodies, round_id, worker), extents, restore)


def _check_spooled(where: object, path: Path, extents: list[tuple[int, int]], restore: str) -> None:
    """The spool file ``path`` holds a whole update body at each of ``extents``;
    ``restore`` says what to do if not."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise StateError(
            f"{where}: an open round's update bodies are missing ({path}): {restore}"
        ) from None
    try:
        size = os.fstat(fd).st_size
        for offset, length in extents:
            if offset + length > size:
                raise StateError(
                    f"{where}: {path} is shorter ({size} bytes) than its rows say"
                    f" ({offset + length}): {restore}"
                )
            if not _whole_body(os.pread(fd, min(length, 1 << 20), offset), length):
                raise StateError(
                    f"{where}: {path} holds no update body at offset {offset}: {restore}"
                )
    finally:
        os.close(fd)


def _whole_body(start: bytes, length: int) -> bool:
    """Whether ``start`` (the first bytes of a ``length``-byte body) begins a safetensors
    body of exactly ``length`` bytes: its header's offsets end where the body ends."""
    if len(start) < 8:
        return False
    size = int.from_bytes(start[:8], "little")
    if size > len(start) - 8:
        return False
    try:
        header = json.loads(start[8 : 8 + size])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    return 8 + size + max(ends, default=0) == length


class _Rows:
    """Reads rows of one database, refusing in one line any that do not decode."""

    def __init__(self, execute: Execute, tables: set[str], where: object) -> None:
        self.execute = execute
        self.tables = tables
        self.where = where

    def read(
        self, table: str, kinds: dict[str, Any], condition: str = "", params: Sequence[Any] = ()
    ) -> list[dict[str, Any]]:
        """The rows of ``table`` (those of ``condition``), as dicts of the columns in
        ``kinds`` that the table has (an older schema has fewer), each checked to be one
        of its kinds (a type, or a tuple of them with None for NULL)."""
        if table not in self.tables:
            return []
        sql = f"SELECT * FROM {table}" + (f" WHERE {condition}" if condition else "")
        try:
            cursor = self.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            found = cursor.fetchall()
        except (sqlite3.Error, UnicodeDecodeError, ValueError) as exc:
            damage = _first_line(exc)
            raise StateError(f"{self.where}: table {table} is damaged ({damage})") from None
        rows = []
        for values in found:
            row = {n: _plain(v) for n, v in zip(names, values, strict=True) if n in kinds}
            for name, value in row.items():
                if not _is(value, kinds[name]):
                    raise StateError(
                        f"{self.where}: table {table} is damaged (a {type(value).__name__}"
                        f" in column {name}, where a {_name(kinds[name])} belongs)"
                    )
            rows.append(row)
        return rows

    def tensors(self, body: bytes, what: str) -> dict[str, Any]:
        """``body`` decoded as tensors, or `fedclient.StateError` saying ``what`` it is."""
        try:
            return decode_tensors(body)[0]
        except Exception as exc:  # any decoding failure: the body is not what it stands for
            raise StateError(f"{self.where}: {what} is damaged ({_first_line(exc)})") from None


def _plain(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value


def _is(value: object, kind: Any) -> bool:
    for k in kind if isinstance(kind, tuple) else (kind,):
        if k is None and value is None:
            return True
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return bool(math.isfinite(value) or value == math.inf)
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k in (str, bytes) and isinstance(value, k):
            return True
    return False


def _name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("NULL" if k is None else k.__name__ for k in kinds)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
