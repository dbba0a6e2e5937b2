"""``fedserver backup --db SRC DEST``: a consistent copy of everything a server needs,
taken while it serves.

A served SQLite file keeps its open rounds' update bodies in a folder beside it
(`fedclient.server.spool`); a copy of the file alone names bodies it does not have. So
the copy is one moment of both:

    moment     one read transaction on the database (SQLite's online backup copies its
               pages inside it), which the server's writes never block
    bodies     for each open round of that moment, its file up to the end of the last
               body a row of that moment names: bodies are appended, never rewritten, and
               a file is deleted only after the close of its round is committed, so the
               files are opened before the moment begins and read through those
               descriptors whatever happens to the names since
    in place   the copy is written under temporary names and renamed, the folder first:
               a DEST that exists is a whole copy

To restore, stop the server and start it on the copy (``--db DEST``): it checks the
copy as it checks any database (`fedclient.server.integrity`). The job resumes at the
moment of the copy: updates acknowledged since are not in it (their devices go on with
the next rounds; an update is never counted twice, as idempotency keys are in the
copy). Never copy a backup over a served file's path while a ``-wal`` file is beside it.

A PostgreSQL database keeps its bodies in its rows, and ``pg_dump`` (one snapshot) is
a whole copy: ``fedserver backup`` runs it (``--format=custom``, for ``pg_restore``).
Its workers may keep them in a folder they share instead (``fedserver --bodies DIR``):
then ``fedserver backup --bodies DIR`` holds the folder's files open, exports a snapshot
(``pg_export_snapshot``), reads in it how far each open round's files are named, runs
pg_dump on that snapshot, and copies the files that far to ``<dest>.bodies``. Restore
with ``pg_restore`` into an empty database and serve it with ``--bodies <dest>.bodies``
(or that folder moved where the workers share it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedclient._exceptions import StateError
from fedclient.server.database import is_postgres, redacted
from fedclient.server.spool import spool_directory, spool_file

__all__ = ["Backup", "backup"]

#: Times a copy is tried again when a round's file went between the listing of the
#: folder and the moment (it closed in between): each try is one read transaction.
ATTEMPTS = 5


@dataclass(frozen=True)
class Backup:
    """What a backup copied."""

    dest: Path
    database_bytes: int
    rounds: int  # open rounds whose update bodies were copied
    body_bytes: int


def backup(source: str | Path, dest: str | Path, *, bodies: str | Path | None = None) -> Backup:
    """Copy the server database ``source`` (a SQLite file or a PostgreSQL URL) to the new
    file ``dest`` (and the open rounds' bodies to ``<dest>.bodies``: a SQLite file's, or
    those PostgreSQL's workers keep in ``bodies``, `fedserver --bodies`); see the module
    docstring. `fedclient.StateError` if ``dest`` exists or the copy fails."""
    dest = Path(dest)
    if dest.exists() or spool_directory(dest).exists():
        raise StateError(f"{dest}: already exists; a backup is never written over anything")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_postgres(source):
        return _pg_dump(str(source), dest, Path(bodies) if bodies is not None else None)
    if bodies is not None:
        raise StateError("--bodies is for PostgreSQL: a SQLite file's bodies are beside it")
    path = Path(str(source).removeprefix("sqlite:///"))
    if not path.is_file():
        raise StateError(f"{path}: no such database")
    return _in_place(dest, path, lambda partial: _copy_moment(path, partial))


def _in_place(
    dest: Path, source: object, moment: Callable[[Path], tuple[int, int] | None]
) -> Backup:
    """Take a copy of one moment (``moment``, into a partial name; None: try again) and
    rename it, with its bodies folder, to ``dest``: a ``dest`` that exists is whole."""
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        for _ in range(ATTEMPTS):
            copied = moment(partial)
            if copied is not None:
                break
        else:
            raise StateError(f"{source}: its rounds kept closing under the copy; try again")
        if spool_directory(partial).exists():
            spool_directory(partial).rename(spool_directory(dest))
        partial.rename(dest)
        _sync_folder(dest.parent)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(spool_directory(partial), ignore_errors=True)
    return Backup(dest, dest.stat().st_size, *copied)


def _copy_moment(path: Path, partial: Path) -> tuple[int, int] | None:
    """Copy the database and its open rounds' bodies, as of one moment, to ``partial``;
    (rounds, body bytes), or None if a round's file could not be held (try again)."""
    partial.unlink(missing_ok=True)
    shutil.rmtree(spool_directory(partial), ignore_errors=True)
    folder = spool_directory(path)
    held: dict[int, int] = {}  # round -> an open descriptor of its file
    try:
        for file in sorted(folder.glob("round-*.bin")) if folder.is_dir() else []:
            number = file.stem.removeprefix("round-")
            if number.isdigit():
                with contextlib.suppress(FileNotFoundError):
                    held[int(number)] = os.open(file, os.O_RDONLY)
        extents = _copy_database(path, partial, held)
        if extents is None:
            return None
        body_bytes = _copy_bodies(held, extents, spool_directory(partial))
    finally:
        for fd in held.values():
            os.close(fd)
    _sync(partial)
    return len(extents), body_bytes


def _copy_database(path: Path, partial: Path, held: dict[int, int]) -> list[tuple[int, int]] | None:
    """Copy the database to ``partial`` in one read transaction (the moment); the open
    rounds' (round, end of their last body) as of it, each round's file added to
    ``held``; None if one of them is gone already."""
    try:
        source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"{path}: cannot read the database ({exc})") from None
    try:
        source.isolation_level = None
        source.execute("BEGIN")  # the moment: every read below sees the same database
        extents = [
            (int(r[0]), int(r[1]))
            for r in source.execute(
                "SELECT round_id, max(spool_offset + spool_length) FROM updates"
                " WHERE spool_offset IS NOT NULL GROUP BY round_id"
            ).fetchall()
        ]
        for round_id, _ in extents:
            if round_id not in held:  # made since the listing: it is open, so it is there
                try:
                    held[round_id] = os.open(
                        spool_file(spool_directory(path), round_id), os.O_RDONLY
                    )
                except FileNotFoundError:
                    return None
        target = sqlite3.connect(partial)
        try:
            source.backup(target)  # inside the moment's read transaction
        finally:
            target.close()
        source.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StateError(f"{path}: cannot copy the database ({exc})") from None
    finally:
        source.close()
    return extents


def _copy_bodies(held: dict[int, int], extents: list[tuple[int, int]], folder: Path) -> int:
    """Each round's file up to ``end`` (its last named body's), into ``folder``; bytes."""
    return _copy_files(
        {spool_file(".", r).name: fd for r, fd in held.items()},
        [(spool_file(".", r).name, end) for r, end in extents],
        folder,
    )


def _copy_files(held: dict[str, int], extents: list[tuple[str, int]], folder: Path) -> int:
    """Each file (by name) up to ``end`` (its last named body's), into ``folder``; bytes."""
    if not extents:
        return 0
    folder.mkdir()
    total = 0
    for name, end in extents:
        with (folder / name).open("wb") as out:
            at = 0
            while at < end:
                chunk = os.pread(held[name], min(1 << 20, end - at), at)
                if not chunk:
                    raise StateError(f"{name}: its update bodies end before its rows say")
                out.write(chunk)
                at += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        total += end
    _sync_folder(folder)
    return total


def _pg_dump(url: str, dest: Path, bodies: Path | None) -> Backup:
    """pg_dump of one snapshot; with ``bodies`` (`fedserver --bodies`), the open rounds'
    files up to the last body a row of that snapshot names, held open from before it
    (as `_copy_moment` holds a SQLite file's)."""
    return _in_place(dest, redacted(url), lambda partial: _pg_moment(url, partial, bodies))


def _pg_moment(url: str, partial: Path, bodies: Path | None) -> tuple[int, int] | None:
    """One snapshot of the database (exported to pg_dump) and the bodies it names;
    (rounds, body bytes), or None if a file could not be held (try again)."""
    import psycopg

    partial.unlink(missing_ok=True)
    shutil.rmtree(spool_directory(partial), ignore_errors=True)
    held: dict[str, int] = {}  # file name -> an open descriptor of it
    try:
        for file in sorted(bodies.glob("round-*.bin")) if bodies and bodies.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                held[file.name] = os.open(file, os.O_RDONLY)
        try:
            conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise StateError(f"cannot connect to {redacted(url)}: {exc}") from None
        with conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = str(conn.execute("SELECT pg_export_snapshot()").fetchone()[0])  # type: ignore[index]
            extents = [
                (str(spool_file(".", int(r[0]), str(r[1] or "")).name), int(r[2]))
                for r in conn.execute(
                    "SELECT round_id, worker, max(spool_offset + spool_length) FROM updates"
                    " WHERE spool_offset IS NOT NULL GROUP BY round_id, worker"
                ).fetchall()
            ]
            if extents and bodies is None:
                raise StateError(
                    f"{redacted(url)} keeps update bodies in files (fedserver --bodies):"
                    " fedserver backup --bodies DIR copies them with it"
                )
            for name, _ in extents:
                if name not in held:  # made since the listing: its round is open
                    try:
                        held[name] = os.open(bodies / name, os.O_RDONLY)  # type: ignore[operator]
                    except FileNotFoundError:
                        return None
            _run_pg_dump(url, partial, snapshot)  # while the snapshot's transaction is open
        _sync(partial)
        body_bytes = _copy_files(held, extents, spool_directory(partial))
    finally:
        for fd in held.values():
            os.close(fd)
    return len({name.split(".")[0] for name, _ in extents}), body_bytes


def _run_pg_dump(url: str, partial: Path, snapshot: str) -> None:
    try:
        done = subprocess.run(
            [
                "pg_dump",
                "--format=custom",
                f"--snapshot={snapshot}",
                f"--file={partial}",
                f"--dbname={url}",
            ],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise StateError("pg_dump is not installed (PostgreSQL's client programs)") from None
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = (done.stderr.strip() or f"exit {done.returncode}").splitlines()
        raise StateError(f"pg_dump of {redacted(url)} failed: {lines[0]}")


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    _sync(folder)
