"""`run_forever` as a long-lived app runs it: it waits out what can pass (5xx, 429, a
refused connection, a round it lost), stops with a typed reason on what cannot
(revoked, a privacy refusal, an unknown job, data that do not fit), and tells the
app about every round through ``on_round`` (issue 25)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fedclient
from fedclient.protocol import ADMIN_REVOKE
from fedclient.server.auth import EnrolmentPolicy
from tests.conftest import LiveServer

ADMIN = "admin-" + "a" * 40
SECRET = "enrolment-" + "s" * 40
QUICK = fedclient.Backoff(base_seconds=0.01, cap_seconds=0.05, seed=0)
ONE_TRY = fedclient.RetryPolicy(max_attempts=1)  # failures reach run_forever at once


class Scripted(httpx.BaseTransport):
    """The real server behind a proxy that answers the first requests itself, as
    ``script`` says: a status (with Retry-After), or "refused" (no connection)."""

    def __init__(self, script: list[tuple[int | str, str]]) -> None:
        self.inner = httpx.HTTPTransport()
        self.script = list(script)
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.script:
            fault, retry_after = self.script.pop(0)
            if fault == "refused":
                raise httpx.ConnectError("connection refused", request=request)
            headers = {"Retry-After": retry_after} if retry_after else {}
            return httpx.Response(int(fault), headers=headers, text="proxy says no")
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _device(live: LiveServer, digits: Any, part: int = 0, **options: Any) -> fedclient.Client:
    rows = slice(100 * part, 100 * part + 100)
    return fedclient.Client(
        live.url, "digits", (digits.x_train[rows], digits.y_train[rows]), seed=part, **options
    )


def test_it_waits_out_5xx_429_and_a_refused_connection_then_finishes(
    live_server: Any, digits: Any
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=2)
    proxy = Scripted([(503, ""), ("refused", ""), (429, "1"), (502, "")])
    device = _device(live, digits, transport=proxy, retry=ONE_TRY)
    events: list[fedclient.RoundEvent] = []
    result = device.run_forever(on_round=events.append, backoff=QUICK)

    assert (result.reason, result.rounds, result.model_version) == ("finished", 2, 2)
    failed = [e for e in events if e.status == "failed"]
    assert [type(e.error) for e in failed] == [
        fedclient.ServiceUnavailable,
        fedclient.TransportError,
        fedclient.TooManyRequests,
        fedclient.BadGateway,
    ]
    assert all(e.wait_seconds is not None and e.wait_seconds > 0 for e in failed)
    assert failed[2].wait_seconds is not None and failed[2].wait_seconds >= 1.0  # Retry-After
    uploaded = [e for e in events if e.status == "uploaded"]
    assert [e.round_id for e in uploaded] == [1, 2]
    for event in uploaded:  # what an app shows of a round
        assert event.examples == 100 and event.train_loss is not None and event.train_loss > 0
        assert event.bytes_up > 4 * 1_210 and event.bytes_down > 0  # the update: 1,210 floats
    assert events[-1].status == "finished" and events[-1].model_version == 2
    device.close()


def test_a_revoked_device_stops_with_a_typed_reason(live_server: Any, digits: Any) -> None:
    live: LiveServer = live_server(
        devices_per_round=1, rounds=5, service_options={"admin_token": ADMIN}
    )
    device = _device(live, digits)

    def revoke_after_the_first_round(event: fedclient.RoundEvent) -> None:
        if event.status == "uploaded":  # the operator revokes it between rounds
            identity = device.device_state.identity(live.url)
            assert identity is not None
            answer = httpx.post(
                live.url + ADMIN_REVOKE.url(device=identity.device_id),
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert answer.status_code == 200, answer.text

    result = device.run_forever(on_round=revoke_after_the_first_round, backoff=QUICK)
    assert (result.reason, result.rounds) == ("revoked", 1)
    assert isinstance(result.error, fedclient.Unauthorized)
    device.close()


def test_a_privacy_policy_refusal_stops_and_gives_the_place_back(
    live_server: Any, digits: Any
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=2)
    device = _device(live, digits, policy=fedclient.PrivacyPolicy(require_dp=True))
    events: list[fedclient.RoundEvent] = []
    result = device.run_forever(on_round=events.append, backoff=QUICK)
    assert result.reason == "privacy" and result.rounds == 0
    assert isinstance(result.error, fedclient.PrivacyPolicyViolation)
    assert events[-1].status == "stopped" and "privacy" in events[-1].reason
    assert live.server.store.admitted_count(1) == 0
    device.close()


def test_an_unknown_job_stops_and_says_so(live_server: Any, digits: Any) -> None:
    live: LiveServer = live_server()
    device = fedclient.Client(live.url, "no-such-job", (digits.x_train[:50], digits.y_train[:50]))
    result = device.run_forever(backoff=QUICK)
    assert result.reason == "job_not_found" and "no-such-job" in str(result.error)
    device.close()


@pytest.mark.parametrize("credential", [None, "not-the-secret"])
def test_a_refused_enrolment_stops_at_once_and_the_right_secret_then_takes_part(
    live_server: Any, digits: Any, tmp_path: Path, credential: str | None
) -> None:
    # The app shipped no secret or a wrong one: waiting cannot fix that, so the loop
    # ends with "enrolment_refused" (not "revoked": the device never had a token) and
    # the server keeps no trace of it. The next release, with the secret, on the same
    # state file, takes part.
    live: LiveServer = live_server(
        devices_per_round=1, rounds=1, service_options={"enrolment": EnrolmentPolicy.secret(SECRET)}
    )
    before = live.server.store.fingerprint()
    counted = Scripted([])
    state = tmp_path / "fl.sqlite"
    device = _device(live, digits, transport=counted, enrolment_credential=credential, state=state)
    stop = threading.Event()
    failures: list[fedclient.RoundEvent] = []

    def give_up_after_three_waits(event: fedclient.RoundEvent) -> None:
        if event.status == "failed":
            failures.append(event)
            if len(failures) == 3:
                stop.set()  # it waited out the refusal: the test fails below

    result = device.run_forever(stop=stop, on_round=give_up_after_three_waits, backoff=QUICK)
    device.close()
    assert failures == [] and (result.reason, result.rounds) == ("enrolment_refused", 0)
    assert isinstance(result.error, fedclient.Forbidden) and counted.sent == 1
    assert device.device_state.identity(live.url) is None
    assert live.server.store.fingerprint() == before

    shipped = _device(live, digits, enrolment_credential=SECRET, state=state)
    assert shipped.run_forever(backoff=QUICK).reason == "finished"
    shipped.close()


def test_arrays_that_do_not_fit_stop_but_a_store_waits_to_be_fixed(
    live_server: Any, digits: Any, tmp_path: Path
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=1)
    labels = digits.y_train[:60].copy()
    labels[0] = 11
    arrays = fedclient.Client(live.url, "digits", (digits.x_train[:60], labels))
    result = arrays.run_forever(backoff=QUICK)
    assert result.reason == "invalid_input" and "labels" in str(result.error)
    arrays.close()

    store = fedclient.ExampleStore(tmp_path / "examples.sqlite")
    store.add(digits.x_train[:60], labels, source="import")
    device = fedclient.Client(live.url, "digits", store)

    def the_app_fixes_its_data(event: fedclient.RoundEvent) -> None:
        if event.status == "failed":
            assert isinstance(event.error, fedclient.InvalidInput)
            store.forget(source="import")
            store.add(digits.x_train[:60], digits.y_train[:60], source="fixed")

    result = device.run_forever(on_round=the_app_fixes_its_data, backoff=QUICK)
    assert (result.reason, result.rounds) == ("finished", 1)
    device.close()


def test_a_round_that_closed_without_it_is_dropped_and_the_next_one_taken(
    live_server: Any, digits: Any
) -> None:
    live: LiveServer = live_server(devices_per_round=1, over_selection=2.0, rounds=2)
    late, quick = _device(live, digits, 0), _device(live, digits, 1)
    while late.step().status != "trained":
        pass  # admitted to round 1 and trained, not uploaded yet
    assert quick.run_once().status == "uploaded"  # round 1 closes without it
    events: list[fedclient.RoundEvent] = []
    result = late.run_forever(rounds=1, on_round=events.append, backoff=QUICK)
    assert [e.status for e in events] == ["discarded", "uploaded", "stopped"]
    assert events[0].round_id == 1 and events[1].round_id == 2
    assert (result.reason, result.rounds) == ("rounds", 1)
    for device in (late, quick):
        device.close()


@pytest.mark.anyio
async def test_arun_forever_makes_the_same_decisions(make_server: Any, digits: Any) -> None:
    server = make_server(devices_per_round=1)
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:80], digits.y_train[:80]),
        transport=server.transport(),
    )
    result = await device.arun_forever(rounds=2, backoff=QUICK)
    assert (result.reason, result.rounds, result.model_version) == ("rounds", 2, 1)


def test_stop_ends_a_wait_at_once(live_server: Any, digits: Any) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=3)
    never: Callable[[], bool] = lambda: False  # noqa: E731
    device = _device(live, digits, conditions=fedclient.Conditions(never))
    stop = threading.Event()
    results: list[fedclient.RunResult] = []
    waiting = threading.Event()
    worker = threading.Thread(
        target=lambda: results.append(
            device.run_forever(stop=stop, on_round=lambda e: waiting.set())
        )
    )
    worker.start()
    assert waiting.wait(timeout=30)  # told to wait a minute for its conditions...
    stop.set()
    worker.join(timeout=5)  # ...and back at once when the app stops it
    assert not worker.is_alive() and results[0].reason == "stopped"
    device.close()


@pytest.mark.parametrize("leave_on_stop", [False, True])
def test_stop_mid_round_ends_after_the_round_unless_a_condition_watches_it(
    live_server: Any, digits: Any, leave_on_stop: bool
) -> None:
    # README: stop ends a wait at once; a round in progress runs to its end (its update
    # is sent) first, unless the app makes "not stopped" one of its Conditions: then the
    # device leaves the round at the next minibatch and gives its place back.
    from tests.client.test_threads import GatedModel

    live: LiveServer = live_server(devices_per_round=1, rounds=3)
    stop = threading.Event()
    gate = GatedModel(fedclient.models.mlp(64, 16, 10))
    options: dict[str, Any] = {"model": gate}
    if leave_on_stop:
        options["conditions"] = fedclient.Conditions(lambda: not stop.is_set(), check_every=0)
    device = _device(live, digits, **options)
    events: list[fedclient.RoundEvent] = []
    results: list[fedclient.RunResult] = []
    worker = threading.Thread(
        target=lambda: results.append(device.run_forever(stop=stop, on_round=events.append))
    )
    worker.start()
    assert gate.training.wait(timeout=30)  # mid-training in round 1
    stop.set()
    gate.release.set()
    worker.join(timeout=30)
    assert not worker.is_alive() and results[0].reason == "stopped"
    store = live.server.store
    if leave_on_stop:
        assert [e.status for e in events] == ["discarded", "stopped"], events
        assert store.update_count(1) == 0 and store.admitted_count(1) == 0  # place given back
    else:
        assert [e.status for e in events] == ["uploaded", "stopped"], events
        assert store.update_count(1) == 1 and results[0].rounds == 1
    device.close()


class Gate(httpx.BaseTransport):
    """The real server behind a transport that holds the ``hold``-th request until
    ``release`` is set, saying (``held``) that it holds it."""

    def __init__(self, hold: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.hold, self.sent = hold, 0
        self.held, self.release = threading.Event(), threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.sent == self.hold:
            self.held.set()
            assert self.release.wait(timeout=30)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("when", ["waiting", "mid-request"])
def test_close_from_another_thread_ends_the_loop(live_server: Any, digits: Any, when: str) -> None:
    # The app shuts down: the UI thread closes the client while run_forever runs on a
    # worker, waiting (its own stop event, not the app's) or inside a request.
    live: LiveServer = live_server(devices_per_round=1, rounds=3)
    never: Callable[[], bool] = lambda: False  # noqa: E731
    gate = Gate(hold=1 if when == "mid-request" else 0)
    options: dict[str, Any] = {"transport": gate, "retry": ONE_TRY}
    if when == "waiting":
        options["conditions"] = fedclient.Conditions(never)  # told to wait a minute
    device = _device(live, digits, **options)
    results: list[fedclient.RunResult] = []
    errors: list[BaseException] = []
    told = threading.Event()

    def work() -> None:
        try:
            results.append(device.run_forever(on_round=lambda e: told.set(), backoff=QUICK))
        except BaseException as exc:  # the test fails on it below
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    assert (told if when == "waiting" else gate.held).wait(timeout=30)
    device.close()
    gate.release.set()  # the request in flight meets the closed connections
    worker.join(timeout=10)
    assert not worker.is_alive() and errors == []
    assert results[0].reason == "stopped" and device.closed


def test_backoff_is_seeded_bounded_and_honours_retry_after() -> None:
    delays = [fedclient.Backoff(seed=7).delay(n) for n in range(1, 12)]
    assert delays == [fedclient.Backoff(seed=7).delay(n) for n in range(1, 12)]
    assert delays != [fedclient.Backoff(seed=8).delay(n) for n in range(1, 12)]
    for n, wait in enumerate(delays, start=1):
        ceiling = min(300.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= wait <= ceiling
    assert fedclient.Backoff(seed=1).delay(1, retry_after=42.0) == 42.0
    with pytest.raises(fedclient.InvalidInput):
        fedclient.Backoff(base_seconds=0)
    assert np.isfinite(fedclient.Backoff(seed=0).delay(10_000))


@pytest.mark.anyio
async def test_an_epsilon_8_plan_spends_a_default_policys_budget_in_one_round(digits: Any) -> None:
    # What the README's fedsim --dp figure does not show: its simulated devices accept
    # the plan's budget, but a device on the default PrivacyPolicy (a job budget of 10)
    # has spent 8 after one release and stops, saying why.
    from fedclient.server import FederationService, ServerStore, create_app, plan_from_dict
    from tests.conftest import ManualClock

    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 40, "devices_per_round": 1, "seed": 1},
            "model": {"kind": "mlp", "inputs": 64, "hidden": [16], "classes": 10},
            "privacy": {"dp_epsilon": 8.0, "dp_delta": 1e-5, "clip": 1.0},
        }
    )
    service = FederationService(ServerStore(":memory:"), clock=ManualClock())
    service.add_job(plan)
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:80], digits.y_train[:80]),
        transport=httpx.ASGITransport(app=create_app(service)),
    )
    result = await device.arun_forever(backoff=QUICK)
    assert (result.reason, result.rounds) == ("privacy", 1)
    assert isinstance(result.error, fedclient.PrivacyBudgetExceeded)
    assert result.error.budget == pytest.approx(10.0)
