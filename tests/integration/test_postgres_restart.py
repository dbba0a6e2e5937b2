"""PostgreSQL stopped and restarted under two ``fedserver`` workers mid-job, as an operator
meets it: meanwhile every request is a 503 with Retry-After (readiness too), the workers
come back by themselves within 15 s of the database, and the job completes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import fedclient
from tests.integration.test_fedserver_process import ADMIN_TOKEN, FedServerProcess
from tests.postgres import PostgresCluster, find_binaries

PER_ROUND, ROUNDS, DEVICES = 4, 4, 8
#: The Done-when bound: workers serve again this soon after the database is back.
RECOVERY_SECONDS = 15.0


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of this test's own: it is stopped and restarted under load."""
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    cluster = PostgresCluster(bin_dir)
    yield cluster
    cluster.stop()


def _answers(url: str, path: str) -> tuple[int, str | None]:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        response = httpx.get(url + path, headers=auth, timeout=5)
    except httpx.TransportError:
        return 0, None
    return response.status_code, response.headers.get("retry-after")


def _poll(until: Any, seconds: float) -> float:
    """Poll ``until()`` every 50 ms for at most ``seconds``; the seconds it took."""
    started = time.monotonic()
    while not until():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _serving(url: str) -> bool:
    """Every one of 10 requests in a row (spread over both workers) is served."""
    return all(_answers(url, p)[0] == 200 for _ in range(5) for p in ("/readyz", "/v1/jobs/digits"))


def test_postgresql_restarted_mid_job_the_workers_answer_503_and_recover(
    cluster: PostgresCluster, tmp_path: Path, digits: Any
) -> None:
    server = FedServerProcess(tmp_path, ROUNDS, PER_ROUND, cluster.database(), workers=2)
    server.start()
    problems: list[str] = []
    finished = threading.Event()

    def device(i: int) -> None:
        part = slice(i * 80, (i + 1) * 80)
        client = fedclient.Client(
            server.url, "digits", (digits.x_train[part], digits.y_train[part]), seed=i
        )
        deadline = time.monotonic() + 240
        try:
            while not finished.is_set() and time.monotonic() < deadline:
                try:
                    outcome = client.run_once()
                    if outcome.status == "finished":
                        return
                    # As an app waits between rounds (within the 30 a minute a device may ask).
                    time.sleep(min(outcome.retry_after or 0.0, 2.5))
                except (fedclient.TransportError, fedclient.ServiceUnavailable):
                    time.sleep(0.2)  # the database is away: an app tries again later
                except fedclient.FedError as exc:  # a 500, or any other refusal: a bug
                    problems.append(f"device {i}: {exc!r}")
                    return
            problems.append(f"device {i} never saw the job finish")
        finally:
            client.close()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(DEVICES)]
    try:
        for thread in threads:
            thread.start()
        _poll(lambda: server.status()["rounds_completed"] >= 1, 120)

        # 1. Down for a while: 503 with Retry-After, readiness too; no worker dies.
        cluster.pg_ctl("stop", "-m", "fast")
        _poll(lambda: _answers(server.url, "/v1/jobs/digits")[0] == 503, 10)
        for path in ("/readyz", "/v1/jobs/digits", "/v1/jobs/digits/rounds/1"):
            status, retry_after = _answers(server.url, path)
            assert status == 503 and retry_after is not None and int(retry_after) > 0, path
        assert _answers(server.url, "/healthz")[0] == 200  # alive: a restart helps nothing
        cluster.pg_ctl("start")
        back = _poll(lambda: _serving(server.url), RECOVERY_SECONDS)

        # 2. The next step: `pg_ctl restart` twice more, back within a second each time.
        for _ in range(2):
            cluster.pg_ctl("restart", "-m", "fast")
            back = max(back, _poll(lambda: _serving(server.url), RECOVERY_SECONDS))

        for thread in threads:
            thread.join(timeout=240)
        assert problems == []
        final = server.status()
        assert final["status"] == "finished" and final["model_version"] == ROUNDS
        assert server.proc is not None and server.proc.poll() is None
        assert len(server.worker_pids()) == 2  # the same workers: none was restarted
    finally:
        finished.set()
        for thread in threads:
            thread.join(timeout=30)
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(timeout=10)
    output = server.output()
    assert "Traceback" not in output, output[-3000:]
    print(f"workers serving again {back:.1f} s after PostgreSQL came back (bound 15 s)")
