"""A secure round as an operator deploys it: `fedserver` as a process with an identity
authority, devices with the default privacy policy pinning it, over real HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import fedclient
from fedclient.sim.datasets import Dataset

#: 15 devices: the default policy assumes 3 colluders (20%) and wants 10 beyond them.
PLAN = """
[job]
name = "digits"
rounds = 1
devices_per_round = 15
min_devices = {min_devices}
over_selection = 1.0
deadline_seconds = 600
seed = 3
[model]
kind = "mlp"
inputs = 64
hidden = [16]
classes = 10
[train]
epochs = 1
batch_size = 8
learning_rate = 0.1
[privacy]
secagg = "secagg"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def authority() -> fedclient.IdentityAuthority:
    return fedclient.IdentityAuthority()


def _serve(tmp: Path, authority: bytes, min_devices: int) -> Iterator[str]:
    plan, db, port = tmp / "plan.toml", tmp / "server.sqlite", _free_port()
    plan.write_text(PLAN.format(min_devices=min_devices))
    cli = [sys.executable, "-m", "fedclient.server.cli"]
    files = ["--plan", str(plan), "--db", str(db)]
    subprocess.run([*cli, "init", *files], check=True)
    options = ["--identity-authority", authority.hex(), "--public-status", "--tick-seconds", "0.2"]
    proc = subprocess.Popen(
        [*cli, *files, "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # readiness probe, bounded
            assert proc.poll() is None, "fedserver exited"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _devices(
    url: str, digits: Dataset, authority: fedclient.IdentityAuthority
) -> list[fedclient.Client]:
    policy = fedclient.PrivacyPolicy(trusted_authorities=(authority.public,))
    parts = np.array_split(np.arange(len(digits.y_train)), 15)
    devices = []
    for i, part in enumerate(parts):
        client = fedclient.Client(
            url, "digits", (digits.x_train[part], digits.y_train[part]), policy=policy, seed=i
        )
        # The app proved itself to the operator's backend, which certified its key.
        client.device_state.set_identity_certificate(authority.certify(client.identity_key))
        devices.append(client)
    return devices


def _walk(devices: list[fedclient.Client], passes: int = 40) -> dict[int, fedclient.StepOutcome]:
    """Step every device in turn until none is mid-round: each one's last outcome."""
    last: dict[int, fedclient.StepOutcome] = {}
    pending = list(range(len(devices)))
    for _ in range(passes):
        for i in list(pending):
            last[i] = devices[i].step()
            if last[i].status in ("uploaded", "discarded", "finished"):
                pending.remove(i)
        if not pending:
            break
    return last


def test_a_secure_round_through_fedserver_with_an_authority(
    tmp_path: Path, digits: Dataset, authority: fedclient.IdentityAuthority
) -> None:
    for url in _serve(tmp_path, authority.public, min_devices=13):
        devices = _devices(url, digits, authority)
        try:
            last = _walk(devices)
            assert {o.status for o in last.values()} == {"uploaded"}, last
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the server closes the round on its tick
                status = httpx.get(url + "/v1/jobs/digits", timeout=5).json()
                if status["model_version"] == 1:
                    break
                time.sleep(0.1)
            assert status["model_version"] == 1 and status["rounds_failed"] == 0
        finally:
            for device in devices:
                device.close()


def test_a_floor_under_the_devices_policy_is_refused_by_every_device(
    tmp_path: Path, digits: Dataset, authority: fedclient.IdentityAuthority
) -> None:
    # The operator set min_devices = 12: one short of 10 beyond the 3 colluders each
    # device assumes. Every device leaves before sending a key, saying what it needs.
    for url in _serve(tmp_path, authority.public, min_devices=12):
        devices = _devices(url, digits, authority)
        try:
            last = _walk(devices)
            assert {o.status for o in last.values()} == {"discarded"}
            assert all("floor of at least 13" in o.reason for o in last.values())
            status = httpx.get(url + "/v1/jobs/digits", timeout=5).json()
            assert status["model_version"] == 0
        finally:
            for device in devices:
                device.close()
