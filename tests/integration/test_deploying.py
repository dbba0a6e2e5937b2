"""The README's Deploying section, run step by step as written: the secrets, the database,
the server over TLS with an enrolment secret, the probes and the admin CLI through a
private CA, a simulated fleet through the front door for a whole job, a backup while it
serves, and a restore; then the PostgreSQL block on a throwaway server.

Only what cannot be on a test machine is replaced, each the same way every time:

    .venv/bin/                     the bin folder of the Python running the tests
    /var/lib/fl, /var/backups/fl   folders under the test's temporary one
    --host 0.0.0.0 --port 443      127.0.0.1 and a free port (added where none is given)
    https://fl.example.com         https://127.0.0.1:PORT (the test's certificate names it)
    fullchain.pem, privkey.pem     a certificate the test makes, signed by ca.pem
    plan.toml                      the README's plan, with rounds = 3 instead of 40
    sudo -u postgres               the throwaway server's superuser (PGHOST, PGUSER)
    postgresql://...@localhost/DB  the throwaway server's socket

A line that serves (``fedserver --plan ...``) runs in the background until the next one
that serves replaces it ("stop the server, then serve the copy"); the others must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedclient.transport import ssl_context
from tests.integration.test_tls import _self_signed
from tests.postgres import PostgresCluster, find_binaries

README = Path(__file__).parents[2] / "README.md"
BIN = Path(sys.executable).parent


def _block(after: str) -> list[str]:
    """The commands of the first ```bash block after the heading ``after`` (continuation
    lines joined, comments and blank lines dropped)."""
    text = README.read_text()
    start = text.index("```bash\n", text.index(after)) + len("```bash\n")
    body = text[start : text.index("```", start)].replace("\\\n", " ")
    return [
        " ".join(line.split())
        for line in body.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _plan() -> str:
    text = README.read_text()
    start = text.index("```toml\n# plan.toml\n") + len("```toml\n")
    plan = text[start : text.index("```", start)]
    assert "rounds = 40" in plan
    return plan.replace("rounds = 40", "rounds = 3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """Runs README lines in one folder, as a person at a shell would."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.env = {**os.environ, **(env or {})}
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.outputs: list[str] = []
        self.log = folder / "fedserver.log"

    def substitute(self, line: str, extra: list[tuple[str, str]]) -> str:
        line = line.replace(".venv/bin/", f"{BIN}/")
        for path in ("/var/lib/fl", "/var/backups/fl"):
            line = line.replace(path, f"{self.folder}{path}")
        for old, new in extra:
            line = re.sub(old, new, line)
        return line

    def run(self, line: str) -> str:
        if re.match(rf"{re.escape(str(BIN))}/fedserver --plan", line):
            self.serve(line)
            return ""
        done = subprocess.run(
            line,
            shell=True,
            executable="/bin/bash",
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        self.outputs.append(done.stdout)
        return done.stdout

    def serve(self, line: str) -> None:
        self.stop()
        self.port = int(re.search(r"--port (\d+)", line).group(1))  # type: ignore[union-attr]
        with self.log.open("ab") as out:
            self.server = subprocess.Popen(
                shlex.split(line), cwd=self.folder, env=self.env, stdout=out, stderr=out
            )

    def ready(self, url: str, verify: Any = True) -> None:
        """Poll ``url/readyz`` until it answers 200 (60 s at most)."""
        deadline = time.monotonic() + 60
        while True:
            assert self.server is not None and self.server.poll() is None, self.log.read_text()
            try:
                if httpx.get(url + "/readyz", verify=verify, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(timeout=30)
        self.server = None


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Operator]:
    person = Operator(tmp_path)
    yield person
    person.stop()


def test_the_deploying_section_runs_as_written(operator: Operator) -> None:
    folder = operator.folder
    (folder / "plan.toml").write_text(_plan())
    cert, key = _self_signed(folder)  # a certificate for 127.0.0.1, its own CA
    cert.rename(folder / "fullchain.pem")
    key.rename(folder / "privkey.pem")
    (folder / "ca.pem").write_bytes((folder / "fullchain.pem").read_bytes())
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    extra = [
        (r"--host 0\.0\.0\.0 --port 443", f"--host 127.0.0.1 --port {port}"),
        (r"https://fl\.example\.com", url),
    ]
    lines = [operator.substitute(line, extra) for line in _block("### Deploying")]
    assert len(lines) >= 10
    served = 0
    for line in lines:
        operator.run(line)
        if operator.server is not None and served == 0:  # step 2: the server is up
            served = 1
            operator.ready(url, verify=ssl_context(folder / "ca.pem"))
    assert served and operator.server is not None
    operator.ready(url, verify=ssl_context(folder / "ca.pem"))  # step 6: the copy serves

    # What the steps made: the secrets (private), the whole job through TLS with the
    # enrolment secret, the admin's view of it, the copy with its bodies folder.
    for secret in ("admin.token", "enrolment.secret"):
        assert (folder / secret).stat().st_mode & 0o777 == 0o600
    import json

    report = json.loads((folder / "load.json").read_text())
    assert [r["status"] for r in report["rounds"]] == ["closed"] * 3
    assert report["final"]["model_version"] == 3
    status = json.loads(next(out for out in operator.outputs if '"plan"' in out))
    assert status["job"] == "digits" and status["plan"]["job"]["rounds"] == 3
    assert (folder / "var/backups/fl/server.sqlite").is_file()
    restored = operator.run(
        f"{BIN}/fedserver admin --url {url} --ca-bundle ca.pem --token-file admin.token"
        " status digits"
    )
    assert json.loads(restored)["status"] == "finished"
    # The next step: a second server on the file now served is refused, in one line.
    second = subprocess.run(
        [
            f"{BIN}/fedserver",
            "--plan",
            "plan.toml",
            "--db",
            "var/backups/fl/server.sqlite",
            "--port",
            str(_free_port()),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0 and "another fedserver" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    # Without the CA bundle, the server's certificate does not verify: nothing is sent.
    refused = subprocess.run(
        ["curl", "--fail", "-s", f"{url}/readyz"], capture_output=True, text=True
    )
    assert refused.returncode != 0


def test_the_postgresql_block_runs_as_written(operator: Operator) -> None:
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    cluster = PostgresCluster(bin_dir)
    try:
        folder = operator.folder
        (folder / "plan.toml").write_text(_plan())
        operator.env.update({"PGHOST": str(cluster.socket), "PGUSER": cluster.user})
        port = _free_port()
        extra = [
            (r"^sudo -u postgres ", ""),
            (
                r"postgresql://fl:secret@localhost/(\w+)",
                rf"postgresql://fl:secret@/\1?host={cluster.socket}",
            ),
            (r"--workers 4$", f"--workers 4 --host 127.0.0.1 --port {port}"),
        ]
        lines = [
            operator.substitute(line, extra)
            for line in _block("#### Several workers on PostgreSQL")
        ]
        served = []
        for line in lines:
            operator.run(line)
            if operator.server is not None and operator.server not in served:
                served.append(operator.server)
                operator.ready(f"http://127.0.0.1:{port}")
        assert len(served) == 2  # the database, then its restored copy
        job = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/digits", timeout=5)
        assert job.status_code in (200, 401)  # served (status needs a token by default)
        operator.stop()
    finally:
        cluster.stop()
