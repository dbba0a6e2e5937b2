"""Crash safety with real processes: a device SIGKILLed across a round, a server SIGKILLed
while uploads are in flight."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient import Phase
from tests.integration.test_apps import served_model
from tests.integration.test_fedserver_process import FedServerProcess

CHILD = Path(__file__).with_name("crash_child.py")


def _plan(server: FedServerProcess, *, rounds: int, per_round: int, hidden: int) -> None:
    text = server.plan.read_text()
    text = text.replace("hidden = [32]", f"hidden = [{hidden}]")
    server.plan.write_text(text.replace("rounds = 3", f"rounds = {rounds}"))


@pytest.mark.parametrize(
    ("inline_model_max", "phases_hit"),
    [
        (1024 * 1024, {"idle", "downloaded", "trained"}),  # the model comes with the admission
        (0, {"idle", "admitted", "downloaded", "trained"}),  # a download step of its own
    ],
)
def test_a_device_killed_at_every_point_of_a_round_uploads_exactly_once(
    tmp_path: Path, inline_model_max: int, phases_hit: set[str]
) -> None:
    server = FedServerProcess(tmp_path, rounds=2, per_round=1)
    server.plan.write_text(server.plan.read_text().replace("hidden = [32]", "hidden = [16]"))
    server.start()
    state = tmp_path / "device.sqlite"
    log = tmp_path / "train.log"
    kills: list[tuple[int, str]] = []
    trains_when_stored: int | None = None
    # Kill at the 1st, 2nd, 3rd... watched operation of a run; start again at 1 each time
    # the stored phase moved on, so every stretch of the round is hit at every point.
    kill_at, last_phase = 0, Phase.IDLE
    try:
        for _ in range(400):
            kill_at += 1
            child = subprocess.run(
                [
                    sys.executable,
                    str(CHILD),
                    server.url,
                    str(state),
                    str(log),
                    str(kill_at),
                    str(inline_model_max),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if child.returncode == 0:
                assert child.stdout.strip() == "uploaded", child.stdout
                break
            assert child.returncode == -9, child.stderr  # SIGKILL, nothing else
            phase = (
                fedclient.DeviceState(state).progress("digits").phase
                if state.exists()
                else Phase.IDLE
            )
            kills.append((kill_at, phase.value))
            if phase is not last_phase:
                kill_at, last_phase = 0, phase
            trains = log.read_text().count("train") if log.exists() else 0
            if phase is Phase.TRAINED and trains_when_stored is None:
                trains_when_stored = trains  # the update is stored from here on
        else:
            pytest.fail("the device never finished its round")
        status = server.status()
        round_id = 1
        summary = server.round(1)
        assert summary["status"] == "closed" and summary["updates"] == 1
        assert status["model_version"] == 1 and status["current_round"]["number"] == 2
        # The device holds exactly one receipt, for that round, and trained no more after
        # its update was stored.
        receipts = fedclient.DeviceState(state).receipts("digits")
        assert [r.round_id for r in receipts] == [round_id]
        assert trains_when_stored is not None
        assert log.read_text().count("train") == trains_when_stored
        where = {
            line.split()[1] for line in (tmp_path / "train.log.where").read_text().splitlines()
        }
        phases = {phase for _, phase in kills}
        assert len(set(kills)) >= 20, kills
        assert phases == phases_hit, kills
        assert {"Connection.execute", "socket.send", "socket.recv"} <= where, where
        print(f"{len(kills)} kills across phases {sorted(phases)} at {sorted(where)}")
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


def test_a_server_killed_with_uploads_in_flight_loses_no_acknowledged_update(
    tmp_path: Path, digits: Any
) -> None:
    server = FedServerProcess(tmp_path, rounds=1, per_round=6)
    _plan(server, rounds=1, per_round=6, hidden=400)
    server.start()
    parts = np.array_split(np.arange(600), 6)
    first_receipt = threading.Event()
    receipts: list[fedclient.protocol.UploadReceipt] = []
    retries: list[int] = []
    errors: list[BaseException] = []

    def device(i: int) -> None:
        # Device 0 sends its update in one request; the others in 2 KiB chunks (60 each),
        # so they are mid-upload when device 0's receipt arrives and the server dies.
        client = fedclient.Client(
            server.url,
            "digits",
            (digits.x_train[parts[i]], digits.y_train[parts[i]]),
            state=tmp_path / f"d{i}.sqlite",
            seed=i,
            chunk_threshold=10**9 if i == 0 else 2048,
            chunk_bytes=2048,
            retry=fedclient.RetryPolicy(
                max_attempts=200, base_seconds=0.02, cap_seconds=0.2, max_total_seconds=60, seed=i
            ),
        )
        try:
            while client.device_state.progress("digits").phase is not Phase.TRAINED:
                client.step()  # check in, download (unless it came along), train
            outcome = client.step()
            while outcome.status != "uploaded":
                outcome = client.step()
            assert outcome.receipt is not None
            receipts.append(outcome.receipt)
            first_receipt.set()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
            first_receipt.set()
        finally:
            retries.append(client.stats.retries)
            client.close()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert first_receipt.wait(timeout=60)
    server.kill()  # the others are mid-upload: 40+ chunks each
    acknowledged_before_kill = len(receipts)
    server.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert acknowledged_before_kill >= 1
    assert sum(retries) >= 1  # uploads really were cut off by the kill, then retried
    summary = server.round(1)
    assert summary["status"] == "closed" and summary["updates"] == 6
    assert server.status()["model_version"] == 1
    # Every receipt a device holds names an update the server counted.
    with sqlite3.connect(server.db) as db:
        stored = {r[0] for r in db.execute("SELECT receipt_id FROM updates WHERE round_id=1")}
    assert {r.receipt_id for r in receipts} == stored and len(stored) == 6
    server.kill()


FIT_KILLED_AT_UPLOAD = """
import os, signal, sys
import httpx, numpy as np
import fedclient

class KilledAtUpload(httpx.HTTPTransport):
    def handle_request(self, request):
        if request.url.path.endswith("/updates"):  # trained, stored, not yet sent
            os.kill(os.getpid(), signal.SIGKILL)
        return super().handle_request(request)

url, state, features, labels = sys.argv[1:]
model = fedclient.models.mlp(64, 32, 10)
fedclient.fit(
    model, (np.load(features), np.load(labels)), federated=url, state=state,
    transport=KilledAtUpload(), seed=0,
)
"""


def test_fit_killed_before_its_upload_resumes_from_its_state_and_trains_no_more(
    tmp_path: Path, digits: Any
) -> None:
    # README, Embed the SDK: fit's progress "lives in the SQLite file state, so a killed
    # app resumes where it stopped". The app is killed as its update leaves; the app,
    # started again with the same call, sends the stored update and ends holding the
    # model it went into, without training again.
    server = FedServerProcess(tmp_path, rounds=2, per_round=1)
    server.start()
    state, url = tmp_path / "fl.sqlite", f"{server.url}/v1/jobs/digits"
    features, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(features, digits.x_train[:200])
    np.save(labels, digits.y_train[:200])
    try:
        killed = subprocess.run(
            [sys.executable, "-c", FIT_KILLED_AT_UPLOAD, url, *map(str, (state, features, labels))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert killed.returncode == -9, killed.stderr
        assert fedclient.DeviceState(state).progress("digits").phase is Phase.TRAINED
        assert server.round(1)["updates"] == 0

        trained: list[int] = []

        class Counted(fedclient.runtime.NumpyModel):
            def train(self, *args: Any, **kwargs: Any) -> Any:
                trained.append(1)
                return super().train(*args, **kwargs)

        model = Counted(fedclient.protocol.ModelSpec("mlp", 64, [32], 10))
        data = (digits.x_train[:200], digits.y_train[:200])
        result = fedclient.fit(model, data, federated=url, state=state, seed=0)
        assert trained == [] and (result.reason, result.model_version) == ("rounds", 1)
        assert [h["round_id"] for h in result.history] == [1]
        assert server.round(1)["status"] == "closed" and server.round(1)["updates"] == 1
        identity = fedclient.DeviceState(state).identity(server.url)
        assert identity is not None
        final = served_model(server, identity.token, 1)
        for name, value in model.get_weights().items():
            np.testing.assert_array_equal(value, final[name])
    finally:
        server.stop()


CHUNKED_APP = """
import json, os, signal, sys
import httpx, numpy as np
import fedclient

url, state, features, labels, kill_at = sys.argv[1:]
sent, size = [], []

class Watched(httpx.HTTPTransport):
    def handle_request(self, request):
        if request.url.path.endswith("/uploads"):  # the session: the update's size
            size.append(json.loads(request.content)["size"])
        if request.method == "PATCH":  # one chunk of the update
            if len(sent) + 1 == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            sent.append(len(request.content))
        return super().handle_request(request)

client = fedclient.Client(
    url, "digits", (np.load(features), np.load(labels)), state=state, seed=0,
    transport=Watched(), chunk_threshold=1000, chunk_bytes=1000,
)
outcome = client.run_once()
print(json.dumps({"status": outcome.status, "chunks": sent, "size": size[-1],
                  "resumed": client.stats.resumed_transfers}))
"""


def test_an_app_killed_mid_chunked_upload_resumes_from_the_servers_offset(
    tmp_path: Path, digits: Any
) -> None:
    # README, Reliability: "updates over 1 MiB go in chunks that resume from the server's
    # offset" (here over 1000 bytes). The app dies after three chunks; started again, it
    # sends the rest only, and the server counts the update once.
    server = FedServerProcess(tmp_path, rounds=2, per_round=1)
    server.start()
    state = tmp_path / "fl.sqlite"
    arrays = [tmp_path / "x.npy", tmp_path / "y.npy"]
    np.save(arrays[0], digits.x_train[:100])
    np.save(arrays[1], digits.y_train[:100])

    def app(kill_at: int) -> subprocess.CompletedProcess[str]:
        args = [server.url, *map(str, (state, *arrays)), str(kill_at)]
        return subprocess.run(
            [sys.executable, "-c", CHUNKED_APP, *args], capture_output=True, text=True, timeout=60
        )

    try:
        killed = app(kill_at=4)
        assert killed.returncode == -9, killed.stderr
        assert server.round(1)["updates"] == 0
        done = app(kill_at=0)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["status"] == "uploaded" and report["resumed"] == 1
        # The first three chunks (3,000 bytes) stayed on the server: only the rest came.
        assert report["size"] > 5000 and sum(report["chunks"]) == report["size"] - 3000, report
        assert len(fedclient.DeviceState(state).receipts("digits")) == 1
        assert server.round(1)["updates"] == 1 and server.round(1)["status"] == "closed"
    finally:
        server.stop()
