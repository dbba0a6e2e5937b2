"""fedsim --engine ray: small federations through a local Ray instance (real actors,
real HTTP between them and the server)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedclient.sim.cli import main as fedsim
from tests.integration.test_fedserver_process import FedServerProcess

ray = pytest.importorskip(
    "ray", reason="the Ray engine needs the ray extra: pip install 'fedclient[ray]'"
)

SMALL = [
    "run",
    "--dataset",
    "digits",
    "--devices",
    "12",
    "--devices-per-round",
    "4",
    "--rounds",
    "3",
    "--epochs",
    "2",
    "--seed",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (starting one takes seconds); each run
    uses it as it is, and places its own actors."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # a test reports nothing anywhere
        # "local": a new instance, never a cluster someone else started on this machine.
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING
        )
    try:
        yield
    finally:
        ray.shutdown()


def _run(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    report = tmp_path / f"{name}.json"
    assert fedsim([*args, "--report", str(report)]) == 0
    return json.loads(report.read_text())  # type: ignore[no-any-return]


def _without_wall_time(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in report["rounds"]]


def test_a_federation_on_ray_actors_is_the_local_one(local_ray: None, tmp_path: Path) -> None:
    on_ray = _run(tmp_path, "ray", *SMALL, "--engine", "ray", "--ray-actors", "2")
    assert [r["round"] for r in on_ray["rounds"]] == [1, 2, 3]
    assert all(r["status"] == "closed" and r["updates"] == 4 for r in on_ray["rounds"])
    assert on_ray["rounds"][-1]["accuracy"] > on_ray["rounds"][0]["accuracy"]
    assert on_ray["final"]["bytes_up"] > 0 and on_ray["final"]["bytes_down"] > 0
    assert on_ray["config"]["engine"] == "ray" and on_ray["config"]["ray_actors"] == 2
    # The server runs on the simulated clock and the devices check in in waves, so the
    # same seed gives the same rounds as in one process, to the byte.
    local = _run(tmp_path, "local", *SMALL)
    assert _without_wall_time(on_ray) == _without_wall_time(local)
    assert ray.is_initialized()  # a Ray session the run did not start stays up


def test_injected_faults_reach_devices_on_ray_actors(local_ray: None, tmp_path: Path) -> None:
    faults = ["--faults", "drop=0.2", "--devices", "16", "--seed", "3"]
    on_ray = _run(tmp_path, "ray", *SMALL, *faults, "--engine", "ray")
    assert on_ray["final"]["retries"] > 0 and on_ray["final"]["wasted_bytes"] > 0
    assert on_ray["final"]["rounds_completed"] == 3
    assert _without_wall_time(on_ray) == _without_wall_time(
        _run(tmp_path, "local", *SMALL, *faults)
    )


def test_ray_actors_federate_against_a_fedserver_process(local_ray: None, tmp_path: Path) -> None:
    server = FedServerProcess(tmp_path, rounds=3, per_round=5)
    server.start()
    try:
        report = _run(
            tmp_path,
            "remote",
            *["run", "--engine", "ray", "--server", server.url, "--job", "digits"],
            *["--devices", "12", "--seed", "2", "--quiet"],
        )
        assert server.status()["status"] == "finished"
    finally:
        assert server.proc is not None
        server.proc.terminate()
        server.proc.wait(timeout=10)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["status"] == "closed" and r["updates"] == 5 for r in report["rounds"])
    assert report["final"]["accuracy"] > 0.6
