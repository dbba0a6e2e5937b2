"""The device client: its step table, typed errors, state, and fit() in both modes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fedclient
from fedclient import Phase
from fedclient.protocol import RoundPlan
from fedclient.server.auth import hash_token
from fedclient.sim.datasets import Dataset
from tests.conftest import LiveServer, Server, make_plan

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("inline_model_max", "steps", "phases"),
    [
        # The default: the model (a few kB) comes with the admission.
        (
            1024 * 1024,
            ["admitted", "trained", "uploaded"],
            [Phase.DOWNLOADED, Phase.TRAINED, Phase.IDLE],
        ),
        # Asked not to (or too big): a separate download step.
        (
            0,
            ["admitted", "downloaded", "trained", "uploaded"],
            [Phase.ADMITTED, Phase.DOWNLOADED, Phase.TRAINED, Phase.IDLE],
        ),
    ],
)
async def test_steps_follow_the_state_table_and_are_stored(
    server: Server,
    make_devices: Any,
    inline_model_max: int,
    steps: list[str],
    phases: list[Phase],
) -> None:
    (device,) = make_devices(1, server.transport(), inline_model_max=inline_model_max)
    seen = []
    state = device.device_state
    for expected in steps:
        outcome = await device.astep()
        assert outcome.status == expected
        progress = state.progress("digits")
        seen.append(progress.phase)
        # The light reads agree with the full one.
        assert state.phase("digits") is progress.phase
        assert state.update_size("digits") == len(progress.update or b"")
    assert seen == phases
    assert Phase.TRAINED in seen and state.update_size("digits") == 0  # uploaded: dropped
    assert state.phase("another job") is Phase.IDLE and state.update_size("another job") == 0
    held = device.device_state.held_model("digits")
    served = server.store.model("digits", 0)
    assert held is not None and served is not None and held[1:] == (served[1], served[0])
    # A request a step but training (the first check-in enrolled the device).
    assert device.stats.requests == len(steps) - 1
    identity = device.device_state.identity(device.server)
    assert identity is not None
    assert server.store.device_for_token(hash_token(identity.token)) == identity.device_id
    assert len(device.device_state.receipts("digits")) == 1
    # Already contributed to the open round: told to come back later.
    waiting = await device.astep()
    assert waiting.status == "waiting" and waiting.retry_after and waiting.retry_after > 0


async def test_a_restarted_client_resumes_at_its_stored_step(
    server: Server, make_devices: Any, tmp_path: Path
) -> None:
    state = tmp_path / "device.sqlite"
    (device,) = make_devices(1, server.transport(), state=state)
    while device.device_state.progress("digits").phase is not Phase.TRAINED:
        await device.astep()
    pending = device.device_state.progress("digits")
    assert pending.phase is Phase.TRAINED and pending.update
    # A new process: same file, no memory. It uploads the stored update with the stored key.
    again = fedclient.Client(
        device.server, "digits", device.data, state=state, transport=server.transport()
    )
    outcome = await again.astep()
    assert outcome.status == "uploaded"
    (row,) = server.store.updates(1)
    assert row.idempotency_key == pending.idempotency_key and row.body == pending.update


async def test_server_errors_become_typed_exceptions(server: Server, make_devices: Any) -> None:
    (device,) = make_devices(1, server.transport())
    await device.astep()
    # Tamper with the stored token: the server must answer 401, raised as Unauthorized.
    identity = device.device_state.identity(device.server)
    device.device_state.save_identity(
        device.server, fedclient._state.Identity(identity.device_id, "forged")
    )
    with pytest.raises(fedclient.Unauthorized) as info:
        await device.arun_once()  # its next request (training sends none)
    assert info.value.status == 401 and info.value.code == "unauthorized"
    stranger = fedclient.Client(
        device.server, "no-such-job", device.data, transport=server.transport()
    )
    with pytest.raises(fedclient.NotFound):
        await stranger.astep()


async def test_unreachable_server_is_a_transport_error(digits: Dataset) -> None:
    device = fedclient.Client(
        "http://127.0.0.1:9", "digits", (digits.x_train, digits.y_train), timeout=2
    )
    with pytest.raises(fedclient.TransportError):
        await device.astep()
    assert device.device_state.progress("digits").phase is Phase.IDLE


def test_a_negative_inline_model_max_is_refused(digits: Dataset) -> None:
    with pytest.raises(fedclient.InvalidInput, match="inline_model_max"):
        fedclient.Client(
            "http://x", "digits", (digits.x_train, digits.y_train), inline_model_max=-1
        )


@pytest.mark.parametrize("inline_model_max", [1024 * 1024, 0])
async def test_a_model_that_does_not_match_the_job_is_refused(
    server: Server, digits: Dataset, inline_model_max: int
) -> None:
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train, digits.y_train),
        transport=server.transport(),
        model=fedclient.models.mlp(64, 99, 10),
        inline_model_max=inline_model_max,
    )
    if not inline_model_max:  # refused when it arrives: with the admission, or downloaded
        assert (await device.astep()).status == "admitted"
    with pytest.raises(fedclient.ModelMismatch) as refused:
        await device.astep()
    # It says which tensors differ and how: the job's 16 hidden units against the local 99.
    assert "fc1.weight: job float32[16, 64], local float32[99, 64]" in str(refused.value)
    assert device.device_state.held_model("digits") is None


def test_sync_client_over_real_http(live_server: Any, make_devices: Any) -> None:
    live: LiveServer = live_server()
    devices = make_devices(2, None, base=live.url)
    try:
        assert [d.run_once().status for d in devices] == ["uploaded", "uploaded"]
    finally:
        for d in devices:
            d.close()
    assert live.server.service.job_status("digits").model_version == 1
    # Check-in (enrolling, and the model came with the admission), upload.
    assert all(d.stats.bytes_up > 4_000 and d.stats.requests == 2 for d in devices)


def test_an_async_transport_needs_the_async_methods(server: Server, make_devices: Any) -> None:
    (device,) = make_devices(1, server.transport())
    with pytest.raises(fedclient.InvalidInput, match="astep"):
        device.step()


def test_fit_switches_between_standalone_and_federated_with_one_argument(
    live_server: Any, digits: Dataset, tmp_path: Path
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=2)
    data = (digits.x_train[:300], digits.y_train[:300])

    local = fedclient.models.mlp(64, 16, 10)
    result = fedclient.fit(local, data, epochs=3, batch_size=8, seed=0)
    assert result.mode == "standalone" and len(result.history) == 3
    assert result.history[-1]["loss"] < result.history[0]["loss"]

    federated = fedclient.models.mlp(64, 16, 10)
    result = fedclient.fit(
        federated,
        data,
        seed=0,
        federated=f"{live.url}/jobs/digits",
        state=tmp_path / "fl.sqlite",
        rounds=2,
    )
    assert result.mode == "federated" and result.model_version == 2
    found = live.server.store.model("digits", 2)
    assert found is not None
    served = fedclient.protocol.decode_tensors(found[0])[0]
    assert all(np.array_equal(federated.get_weights()[k], v) for k, v in served.items())
    assert federated.evaluate(digits.x_test, digits.y_test).accuracy > 0.5


def test_fit_returns_the_model_its_last_update_went_into(
    live_server: Any, digits: Dataset, tmp_path: Path
) -> None:
    # Two updates close a round. fit's device uploads first: it must wait for the round
    # to close and load version 1, not return at once with version 0 (issue 19). The
    # README's URL form /v1/jobs/NAME names the job too.
    import threading

    live: LiveServer = live_server(devices_per_round=2, min_devices=2, rounds=3)
    data = (digits.x_train[:200], digits.y_train[:200])
    model = fedclient.models.mlp(64, 16, 10)
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(
            fedclient.fit(model, data, seed=0, federated=f"{live.url}/v1/jobs/digits", rounds=1)
        )
    )
    worker.start()
    store = live.server.store
    other = fedclient.Client(live.url, "digits", (digits.x_train[200:400], digits.y_train[200:400]))
    while store.update_count(1) == 0:  # fit's update arrives first...
        assert worker.is_alive()
        threading.Event().wait(0.01)
    assert other.run_once().status == "uploaded"  # ...and the second closes the round
    other.close()
    worker.join(timeout=30)
    (result,) = results
    assert result.model_version == 1
    found = store.model("digits", 1)
    assert found is not None
    served = fedclient.protocol.decode_tensors(found[0])[0]
    assert all(np.array_equal(model.get_weights()[k], v) for k, v in served.items())


def test_fit_whose_round_fails_says_no_model_holds_its_update(
    live_server: Any, digits: Dataset
) -> None:
    # README: fit "ends with the model that update went into". A round that fails (one
    # update of the two min_devices asks, at the deadline) makes no such model: fit said
    # nothing and returned version 0 as if it were.
    import threading

    live: LiveServer = live_server(devices_per_round=2, min_devices=2, rounds=3)
    errors: list[BaseException] = []

    def federate() -> None:
        data = (digits.x_train[:100], digits.y_train[:100])
        try:
            fedclient.fit(
                fedclient.models.mlp(64, 16, 10), data, federated=f"{live.url}/v1/jobs/digits"
            )
        except BaseException as exc:  # checked below
            errors.append(exc)

    worker = threading.Thread(target=federate)
    worker.start()
    store = live.server.store
    while store.update_count(1) == 0:  # fit's update arrives, alone...
        assert worker.is_alive()
        threading.Event().wait(0.01)
    live.server.clock.now += 61  # ...and the deadline passes
    live.server.service.tick()
    worker.join(timeout=30)
    assert not worker.is_alive()
    (error,) = errors
    assert isinstance(error, fedclient.FedError), error
    assert "round 1" in str(error) and "fewer than min_devices=2" in str(error)
    assert "still version 0" in str(error)


class Recording(httpx.BaseTransport):
    """Real HTTP, with the path of every request kept."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("inline_model_max", [None, 0])
def test_fit_takes_what_client_takes(
    live_server: Any, digits: Dataset, inline_model_max: int | None
) -> None:
    # README: "fit takes what Client takes"; the same paragraph's inline_model_max
    # among them (0: the model of the round comes by its own download, not inline).
    live: LiveServer = live_server(devices_per_round=1, rounds=1)
    data = (digits.x_train[:100], digits.y_train[:100])
    wire = Recording()
    options = {} if inline_model_max is None else {"inline_model_max": inline_model_max}
    result = fedclient.fit(
        fedclient.models.mlp(64, 16, 10),
        data,
        federated=f"{live.url}/v1/jobs/digits",
        transport=wire,
        **options,
    )
    assert (result.mode, result.reason, result.model_version) == ("federated", "rounds", 1)
    downloads = wire.paths.count("/v1/models/digits/0")
    assert downloads == (0 if inline_model_max is None else 1), wire.paths
    with pytest.raises(TypeError, match="'inline_model_mx'"):
        fedclient.fit(fedclient.models.mlp(64, 16, 10), data, inline_model_mx=0)


@pytest.mark.parametrize(
    "url", ["digits", "ftp://host/jobs/x", "http://host/x", "http://host/jobs/"]
)
def test_fit_rejects_a_malformed_job_url(url: str, digits: Dataset) -> None:
    with pytest.raises(fedclient.InvalidInput, match="jobs/NAME"):
        fedclient.fit(
            fedclient.models.mlp(64, 8, 10), (digits.x_train, digits.y_train), federated=url
        )


def test_state_from_a_newer_fedclient_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    state = fedclient.DeviceState(path)
    state.db.execute("UPDATE meta SET value='999' WHERE name='schema_version'")
    state.db.conn.commit()
    with pytest.raises(fedclient.StateError, match="newer"):
        fedclient.DeviceState(path)


def _damaged(path: Path, kind: str) -> None:
    if kind == "folder":  # state="app_data", the app's folder, not a file in it
        path.mkdir()
    elif kind == "not a database":
        path.write_bytes(b"the app's own settings, not SQLite\n" * 200)
    else:  # a state file cut short (a copy that stopped, a full disk)
        state = fedclient.DeviceState(path)
        state.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        state.db.close()
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("kind", ["folder", "not a database", "cut short"])
@pytest.mark.parametrize("opener", ["Client", "ExampleStore"])
def test_a_file_that_cannot_hold_the_state_is_a_state_error_naming_it(
    tmp_path: Path, digits: Dataset, kind: str, opener: str
) -> None:
    # README: "Every error is a fedclient.FedError"; a file that is no SQLite database
    # was a bare sqlite3.DatabaseError.
    path = tmp_path / "fl.sqlite"
    _damaged(path, kind)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(fedclient.StateError, match=re.escape(str(path))):
        if opener == "Client":
            fedclient.Client("http://x", "digits", (digits.x_train, digits.y_train), state=path)
        else:
            fedclient.ExampleStore(path)
    assert (path.read_bytes() if path.is_file() else None) == before  # nothing written


def test_a_state_opened_again_on_a_checked_connection_reads_nothing(tmp_path: Path) -> None:
    first = fedclient.DeviceState(tmp_path / "s.sqlite", key="a")
    statements: list[str] = []
    first.db.conn.set_trace_callback(statements.append)
    fedclient.DeviceState(first.db, key="b")  # a simulator waking another device
    assert statements == []  # (a new connection asks: the test above)


def test_device_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    fedclient.DeviceState(path, key="a").save_identity(
        "http://x", fedclient._state.Identity("d", "t")
    )
    again = fedclient.DeviceState(path, key="a")
    assert again.identity("http://x") == fedclient._state.Identity("d", "t")
    assert fedclient.DeviceState(path, key="b").identity("http://x") is None
    assert httpx  # the client's transport library is importable alongside


async def test_a_device_that_cannot_finish_in_time_leaves_and_frees_its_place(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(devices_per_round=1, over_selection=1.0)
    slow, fast = make_devices(
        2,
        server.transport(),
        clock=server.clock,
        per_device={
            "estimate_seconds": lambda i: (lambda work: 1e6) if i == 0 else (lambda work: 1.0)
        },
    )
    assert (await slow.astep()).status == "admitted"
    assert (await fast.astep()).status == "waiting"  # the round is full
    outcome = await slow.astep()  # it holds the model: training is next
    assert outcome.status == "discarded" and "cannot finish" in outcome.reason
    assert server.store.admitted_count(1) == 0  # the place was given back
    assert (await fast.arun_once()).status == "uploaded"


async def test_a_device_learns_its_speed_from_training(server: Server, make_devices: Any) -> None:
    (device,) = make_devices(1, server.transport())
    assert device.device_state.speed() is None
    await device.arun_once()
    speed = device.device_state.speed()
    assert speed is not None and speed > 0


def test_speed_is_an_exponentially_weighted_average_of_the_measurements(tmp_path: Path) -> None:
    state = fedclient.DeviceState(tmp_path / "s.sqlite")
    other = fedclient.DeviceState(state.db, key="other")
    state.record_speed(10.0)
    assert state.speed() == 10.0 and other.speed() is None
    state.record_speed(20.0)
    state.record_speed(40.0)
    expected = pytest.approx(0.7 * (0.7 * 10.0 + 0.3 * 20.0) + 0.3 * 40.0)
    # Committed: another connection (a restarted app) reads the same average.
    assert fedclient.DeviceState(tmp_path / "s.sqlite").speed() == expected == state.speed()


def test_an_app_opens_its_state_without_scanning_the_installed_packages(tmp_path: Path) -> None:
    # No sqlite-utils plugins: importlib.metadata never walks every installed package.
    code = (
        "import sys, fedclient;"
        f"fedclient.DeviceState({str(tmp_path / 's.sqlite')!r}); fedclient.DeviceState.in_memory();"
        "print('importlib.metadata' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_progress_a_state_keeps_in_memory_follows_its_writes_and_drops_a_rollback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite"
    job = make_plan()
    plans = [
        RoundPlan("digits", r, r, r - 1, 60.0, 0.0, job.model, job.train, "", job.privacy, 3)
        for r in (1, 2)
    ]
    state = fedclient.DeviceState(path, key="a")

    def view(s: fedclient.DeviceState) -> tuple[object, ...]:
        return (
            s.progress("digits"),
            s.phase("digits"),
            s.update_size("digits"),
            s.held_version("digits"),
        )

    assert view(state)[1:] == (Phase.IDLE, 0, None)  # read once, then kept
    state.record_admission("digits", plans[0], ("e1", b"model-1"))
    state.record_update("digits", plans[0], b"update", "key-1")
    assert view(state) == view(fedclient.DeviceState(path, key="a"))
    assert view(state)[1:] == (Phase.TRAINED, 6, (0, "e1"))
    with pytest.raises(RuntimeError), state.atomic():
        state.discard_round("digits")
        state.record_download("digits", plans[1], "e2", b"model-2")
        assert view(state)[1:] == (Phase.DOWNLOADED, 0, (1, "e2"))
        raise RuntimeError("the app was killed mid-step")
    assert view(state) == view(fedclient.DeviceState(path, key="a"))
    assert view(state)[1:] == (Phase.TRAINED, 6, (0, "e1"))
    assert view(fedclient.DeviceState(state.db, key="b"))[1:] == (Phase.IDLE, 0, None)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda x, y: x.__setitem__((0, 0), np.nan), "NaN"),
        (lambda x, y: y.__setitem__(0, 10), "labels must lie"),
    ],
)
async def test_bad_training_data_are_refused_at_admission_and_change_nothing(
    server: Server, digits: Dataset, corrupt: Any, message: str
) -> None:
    x, y = digits.x_train[:40].copy(), digits.y_train[:40].copy()
    corrupt(x, y)
    device = fedclient.Client(
        "http://fedserver.local", "digits", (x, y), transport=server.transport(), seed=0
    )
    with pytest.raises(fedclient.InvalidInput, match=message):
        await device.astep()  # enrols and is admitted, then sees its data do not fit
    assert device.device_state.phase("digits") is Phase.IDLE
    again = fedclient.DeviceState(device.device_state.db)  # what the file holds
    assert again.progress("digits").plan is None and again.held_version("digits") is None
    assert server.store.admitted_count(1) == 0  # the place went back (tests/client/test_leaving.py)
    assert server.store.update_count(1) == 0


async def test_a_client_closes_its_connections_when_its_block_ends(
    live_server: Any, digits: Any, tmp_path: Path
) -> None:
    live: LiveServer = live_server()
    data = (digits.x_train[:200], digits.y_train[:200])
    async with fedclient.Client(live.url, "digits", data, state=tmp_path / "a.sqlite") as device:
        assert (await device.arun_once()).status == "uploaded"
    assert isinstance(device._async, httpx.AsyncClient) and device._async.is_closed
    with fedclient.Client(live.url, "digits", data, state=tmp_path / "b.sqlite") as other:
        assert other.run_once().status == "uploaded"
    assert isinstance(other._sync, httpx.Client) and other._sync.is_closed
