"""A throwaway PostgreSQL server for tests and benchmarks: Debian's ``postgresql``
package (``.ci/run`` installs it), a fresh cluster in a temporary folder, a Unix socket
only, stopped at the end.

PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres``
user the Debian package makes, and its programs run through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

__all__ = ["PostgresCluster", "find_binaries"]


def find_binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (Debian keeps them per version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    """One PostgreSQL server on a Unix socket; `database` makes empty databases on it."""

    def __init__(self, bin_dir: Path, *, max_connections: int = 100, fsync: bool = False) -> None:
        """``fsync``: durable commits, as a deployment has (tests go without)."""
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="fedserver-pg-"))
        self.data = self.root / "data"
        self.socket = self.root
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.user = "postgres" if self._as else os.environ.get("USER", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "--no-sync")
        self._options = (
            f"-k {self.socket} -c listen_addresses='' -c fsync={'on' if fsync else 'off'}"
            f" -c max_connections={max_connections}"
        )
        self.pg_ctl("start")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bin_dir / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this server."""
        return f"postgresql://{self.user}@/{database}?host={self.socket}"

    def database(self, name: str | None = None) -> str:
        """A new, empty database (a fresh name unless ``name``); its URL."""
        import psycopg

        name = name or "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, names: list[str]) -> None:
        """Drop databases (closing whatever connections they still have)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pg_ctl(self, action: str, *options: str) -> None:
        """``pg_ctl ACTION`` on the server (``stop -m fast``, ``start``, ``restart``), waiting
        for it to finish: what an operator does to the database under a live fedserver."""
        args = ["-D", str(self.data), "-l", str(self.root / "log"), "-w", *options, action]
        if action in ("start", "restart"):
            args[-1:-1] = ["-o", self._options]
        self._run("pg_ctl", *args)

    def stop(self) -> None:
        """Stop the server (if a test left it running) and delete its files."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
