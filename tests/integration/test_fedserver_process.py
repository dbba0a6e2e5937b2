"""`fedserver` as a real process under uvicorn: fedsim against it, and SIGKILL + restart."""

from __future__ import annotations

import json
import os
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

import fedclient
from fedclient.sim.cli import main as fedsim

PLAN = """
[job]
name = "digits"
rounds = {rounds}
devices_per_round = {per_round}
min_devices = 1
over_selection = 1.0
deadline_seconds = 600
seed = 3
[model]
kind = "mlp"
inputs = 64
hidden = [32]
classes = 10
[train]
epochs = 2
batch_size = 8
learning_rate = 0.1
"""


ADMIN_TOKEN = "admin-" + "x" * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FedServerProcess:
    """Start, kill and restart ``fedserver`` on one port and one database."""

    def __init__(
        self,
        tmp: Path,
        rounds: int,
        per_round: int,
        db: str | None = None,
        workers: int = 1,
        *,
        plan: str | None = None,
        options: tuple[str, ...] = (),
        descriptors: int | None = None,
    ) -> None:
        """``plan``: the whole TOML plan (default: PLAN with ``rounds`` and ``per_round``);
        ``options``: more fedserver options (an enrolment secret, ...); ``descriptors``: its
        open-file limit (soft and hard, as a constrained host sets it)."""
        self.options = options
        self.descriptors = descriptors
        self.plan = tmp / "plan.toml"
        self.plan.write_text(plan or PLAN.format(rounds=rounds, per_round=per_round))
        self.db = db or str(tmp / "server.sqlite")
        self.workers = workers
        self.made = False
        self.admin_token = tmp / "admin.token"
        self.admin_token.write_text(ADMIN_TOKEN)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        #: Everything the server prints (a file: a pipe nobody reads would stall it).
        self.log = tmp / f"fedserver-{self.port}.log"

    def start(self) -> None:
        if not self.made:  # a database is made explicitly, once
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fedclient.server.cli",
                    "init",
                    "--plan",
                    str(self.plan),
                    "--db",
                    str(self.db),
                ],
                check=True,
                capture_output=True,
            )
            self.made = True
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedclient.server.cli",
                    "--plan",
                    str(self.plan),
                    "--db",
                    str(self.db),
                    "--port",
                    str(self.port),
                    "--tick-seconds",
                    "0.2",
                    "--workers",
                    str(self.workers),
                    # Status needs a token: fedsim reads it as a device (it enrols an observer),
                    # the test as the admin.
                    "--admin-token-file",
                    str(self.admin_token),
                    *self.options,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limit if self.descriptors else None,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # readiness probe, bounded
            if self.proc.poll() is not None:
                raise RuntimeError(self.output())
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("fedserver did not become healthy in 30 s")

    def output(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")

    def _limit(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.descriptors, self.descriptors))

    def worker_pids(self) -> list[int]:
        """The worker processes of ``--workers N`` (children of the server process)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [
            int(pid)
            for pid in children.split()
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not the tracker
        ]

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def stop(self) -> None:
        """Stop the process as an operator does (SIGTERM), and wait until it is gone."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def status(self) -> dict[str, Any]:
        return self._get("/v1/jobs/digits")

    def round(self, number: int) -> dict[str, Any]:
        return self._get(f"/v1/jobs/digits/rounds/{number}")

    def _get(self, path: str) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.get(self.url + path, headers=auth, timeout=5).json()  # type: ignore[no-any-return]


@pytest.fixture
def fedserver(tmp_path: Path) -> Iterator[Any]:
    servers: list[FedServerProcess] = []

    def start(
        rounds: int = 3,
        per_round: int = 2,
        db: str | None = None,
        workers: int = 1,
        options: tuple[str, ...] = (),
    ) -> FedServerProcess:
        server = FedServerProcess(tmp_path, rounds, per_round, db, workers, options=options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(timeout=10)


def test_fedsim_runs_against_a_fedserver_process(fedserver: Any, tmp_path: Path) -> None:
    server = fedserver(rounds=3, per_round=5)
    report = tmp_path / "remote.json"
    code = fedsim(
        [
            "run",
            "--server",
            server.url,
            "--job",
            "digits",
            "--devices",
            "12",
            "--partition",
            "iid",
            "--seed",
            "2",
            "--report",
            str(report),
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads(report.read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    assert all(r["status"] == "closed" and r["updates"] == 5 for r in data["rounds"])
    assert data["final"]["accuracy"] > 0.6
    assert data["final"]["bytes_up"] > 0 and data["final"]["bytes_down"] > 0
    assert server.status()["status"] == "finished"
    assert report.with_suffix(".png").stat().st_size > 10_000


def test_fedsim_plays_availability_against_a_fedserver_process(
    fedserver: Any, tmp_path: Path
) -> None:
    """A remote server keeps real time; the devices' sessions follow the simulated time
    of the rounds (before, every device looked gone by the server's epoch seconds and
    every round failed)."""
    server = fedserver(rounds=3, per_round=3)
    trace = tmp_path / "online.csv"
    # Trace device 0 is online all day; trace device 1 for its first second only.
    trace.write_text("device,start,end\n0,0,86400\n1,0,1\n")
    report = tmp_path / "remote.json"
    code = fedsim(["run", "--server", server.url, "--job", "digits", "--devices", "12",
                   "--seed", "2", "--availability", f"trace:{trace}", "--report", str(report),
                   "--quiet", "--no-plot"])  # fmt: skip
    assert code == 0
    rounds = json.loads(report.read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["closed"] * 3
    for record in rounds:  # the odd half's session ends before any upload
        assert record["participants"] and all(i % 2 == 0 for i in record["participants"])
    assert rounds[-1]["participation"]["available"] == 6
    assert rounds[0]["simulated_seconds"] < rounds[-1]["simulated_seconds"]


def test_a_killed_server_restarts_on_its_database_and_the_federation_continues(
    fedserver: Any, digits: Any
) -> None:
    server = fedserver(rounds=4, per_round=2)
    halves = [slice(0, 700), slice(700, 1400)]
    devices = [
        fedclient.Client(server.url, "digits", (digits.x_train[h], digits.y_train[h]), seed=i)
        for i, h in enumerate(halves)
    ]
    for device in devices:
        assert device.run_once().status == "uploaded"
    before = server.status()
    assert before["model_version"] == 1 and before["current_round"]["number"] == 2

    server.kill()
    with pytest.raises(fedclient.TransportError):
        devices[0].run_once()
    server.start()

    after = server.status()
    assert after["model_version"] == 1
    assert after["current_round"]["round_id"] == before["current_round"]["round_id"]
    for _ in range(3):  # rounds 2, 3 and 4, same devices, same identities
        for device in devices:
            assert device.run_once().status == "uploaded"
    final = server.status()
    assert final["status"] == "finished" and final["model_version"] == 4
    for device in devices:
        assert [r.round_id for r in device.device_state.receipts("digits")] == [1, 2, 3, 4]
        device.close()


def _fedsim_process(server: FedServerProcess, tmp_path: Path, *extra: str) -> Any:
    """The installed ``fedsim`` against ``server``, its output in files."""
    command = [str(Path(sys.executable).with_name("fedsim")), "run", "--server", server.url]
    common = ["--job", "digits", "--devices", "10", "--seed", "2", "--quiet", "--no-plot"]
    report = ["--report", str(tmp_path / "remote.json")]
    with (tmp_path / "fedsim.out").open("wb") as out, (tmp_path / "fedsim.err").open("wb") as err:
        return subprocess.Popen([*command, *common, *report, *extra], stdout=out, stderr=err)


def _wait_for(condition: Any, what: str, seconds: float = 120) -> None:
    """Poll ``condition`` until it holds (a bounded wait on a state, not a guess)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_fedsim_rides_out_a_server_restart_and_says_so(tmp_path: Path) -> None:
    """fedsim against a remote server that is SIGKILLed mid-job: it says each time it asks
    again, goes on once the server is back on its database, and the job finishes with the
    report holding every round and the final model."""
    plan = PLAN.format(rounds=4, per_round=3).replace("= 600", "= 15")
    server = FedServerProcess(tmp_path, 4, 3, plan=plan)
    server.start()
    sim = _fedsim_process(server, tmp_path)
    err = tmp_path / "fedsim.err"
    try:
        _wait_for(lambda: server.status()["rounds_completed"] >= 1, "a first round")
        server.kill()
        _wait_for(lambda: "asking again in" in err.read_text(), "fedsim to notice")
        assert sim.poll() is None  # still running, waiting for the server
        server.start()
        assert sim.wait(timeout=300) == 0, err.read_text()
        final = server.status()
    finally:
        if sim.poll() is None:
            sim.kill()
        server.stop()
    assert final["status"] == "finished"
    report = json.loads((tmp_path / "remote.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["final"]["model_version"] == final["model_version"] >= 2
    assert "Traceback" not in err.read_text()


def test_fedsim_ends_in_one_line_when_the_server_does_not_come_back(tmp_path: Path) -> None:
    plan = PLAN.format(rounds=50, per_round=3).replace(
        "deadline_seconds = 600", "deadline_seconds = 6"
    )
    server = FedServerProcess(tmp_path, 50, 3, plan=plan)
    server.start()
    sim = _fedsim_process(server, tmp_path, "--server-patience", "2")
    try:
        _wait_for(lambda: server.status()["rounds_completed"] >= 1, "a first round")
        server.kill()
        code = sim.wait(timeout=120)
    finally:
        if sim.poll() is None:
            sim.kill()
    err = (tmp_path / "fedsim.err").read_text()
    assert code == fedclient.TransportError.exit_code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fedsim: the server at {server.url} did not answer GET"), last


def test_server_patience_needs_a_server() -> None:
    assert fedsim(["run", "--server-patience", "5", "--rounds", "1", "--quiet"]) == 2


@pytest.mark.parametrize("path", ["same", "symlink"])
def test_a_second_fedserver_process_on_a_served_file_is_refused_in_one_line(
    fedserver: Any, tmp_path: Path, path: str
) -> None:
    # The README: one fedserver process serves a SQLite file; a second is refused in one
    # line. Played as an operator meets it: a second process, started beside the first,
    # on the file's own name or on a symlink to it (a deployment's "current" link).
    server = fedserver(rounds=3, per_round=2)
    assert server.proc is not None
    db = Path(server.db)
    if path == "symlink":
        (tmp_path / "current.sqlite").symlink_to(db)
        db = tmp_path / "current.sqlite"
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedclient.server.cli",
            "--plan",
            str(server.plan),
            "--db",
            str(db),
            "--port",
            str(_free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"another fedserver (pid {server.proc.pid})" in lines[0], lines
    assert server.proc.poll() is None and server.status()["status"] == "running"


def test_device_tokens_are_stored_hashed_and_still_admit_after_a_restart(
    fedserver: Any, tmp_path: Path
) -> None:
    # README's routes: POST /v1/devices gives "a bearer token (stored hashed)"; a check-in
    # with enrol_label does the same for its own token. Whoever reads the database files
    # (a backup, a stolen disk) or its log finds neither token; restarted, it admits both.
    server = fedserver(rounds=3, per_round=2)
    given = httpx.post(server.url + "/v1/devices", json={"label": "phone"}, timeout=5)
    assert given.status_code == 200
    issued = given.json()["token"]
    proposed = "p" * 43
    first = httpx.post(
        server.url + "/v1/jobs/digits/checkin",
        headers={"Authorization": f"Bearer {proposed}"},
        json={"enrol_label": "gateway"},
        timeout=5,
    )
    assert first.status_code == 200 and first.headers["Device-Id"]
    server.stop()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # its database, spool, log
    assert Path(server.db) in files and server.log in files
    for token in (issued, proposed):
        assert all(token.encode() not in p.read_bytes() for p in files), token
    server.start()
    for token in (issued, proposed):
        again = httpx.post(
            server.url + "/v1/jobs/digits/checkin",
            headers={"Authorization": f"Bearer {token}"},
            json={},
            timeout=5,
        )
        assert again.status_code == 200 and again.json()["status"] == "admitted", again.text


def test_a_device_of_a_server_whose_database_was_made_again_stops_as_revoked(
    fedserver: Any, tmp_path: Path, digits: Any
) -> None:
    # README, run_forever's "revoked": the server no longer knows the device's token.
    # A developer meets it first by making the server's database again (fedserver init
    # on a fresh file): the device stops at once, and a new state file enrols again.
    server = fedserver(rounds=3, per_round=1)
    data = (digits.x_train[:100], digits.y_train[:100])
    state = tmp_path / "fl.sqlite"
    with fedclient.Client(server.url, "digits", data, state=state) as device:
        assert device.run_once().status == "uploaded"
    server.stop()
    server.db = str(tmp_path / "again.sqlite")  # a new database, on the same port
    server.made = False
    server.start()
    with fedclient.Client(server.url, "digits", data, state=state) as device:
        result = device.run_forever()
    assert result.reason == "revoked" and isinstance(result.error, fedclient.Unauthorized)
    with fedclient.Client(server.url, "digits", data, state=tmp_path / "new.sqlite") as device:
        assert device.run_once().status == "uploaded"
