"""Flaky networks: the retry policy, the fault-injecting transport, exactly-once uploads."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import fedclient
from fedclient import FaultPlan, FaultyTransport, RetryPolicy
from tests.conftest import Server

pytestmark = pytest.mark.anyio


def test_backoff_is_full_jitter_bounded_and_reproducible() -> None:
    a = RetryPolicy(max_attempts=6, base_seconds=1, cap_seconds=8, max_total_seconds=100, seed=3)
    b = RetryPolicy(max_attempts=6, base_seconds=1, cap_seconds=8, max_total_seconds=100, seed=3)
    delays = [a.delay(n, 0.0) for n in range(1, 6)]
    assert delays == [b.delay(n, 0.0) for n in range(1, 6)]
    for n, d in enumerate(delays, start=1):
        assert d is not None and 0 <= d <= min(8, 2 ** (n - 1))
    assert a.delay(6, 0.0) is None  # attempts exhausted
    assert a.delay(1, 99.9, retry_after=5) is None  # total time exhausted
    assert RetryPolicy(seed=1).delay(1, 0.0, retry_after=7.0) == 7.0  # Retry-After honoured


def test_fault_plans_parse_and_refuse_nonsense() -> None:
    spread = FaultPlan.parse("drop=0.3")
    assert sum(spread.as_dict()[k] for k in FaultPlan.KINDS) == pytest.approx(0.3)
    assert FaultPlan.parse("lost=0.1,reset_every=2000000").reset_every == 2_000_000
    for bad in ("drop=2", "bogus=0.1", "drop=x", "lost=0.6,error=0.6"):
        with pytest.raises(fedclient.InvalidInput):
            FaultPlan.parse(bad)


async def test_only_retriable_failures_are_retried(server: Server, make_devices: Any) -> None:
    # 503 from a proxy on every request: retried until the policy gives up, then typed.
    always_503 = FaultyTransport(server.transport(), FaultPlan(error=1.0), seed=0)
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    (device,) = make_devices(
        1, always_503, retry=RetryPolicy(max_attempts=4, seed=0), asleep=record
    )
    with pytest.raises(fedclient.ServerError):
        await device.astep()
    assert always_503.counts.requests == 4 and len(slept) == 3 and device.stats.retries == 3
    # A 401 is not retriable: one request, raised at once.
    (device,) = make_devices(1, server.transport(), asleep=record)
    await device.astep()
    identity = device.device_state.identity(device.server)
    device.device_state.save_identity(
        device.server, fedclient._state.Identity(identity.device_id, "x" * 40)
    )
    before = device.stats.requests
    with pytest.raises(fedclient.Unauthorized):
        await device.arun_once()  # training sends nothing; the upload is refused
    assert device.stats.requests == before + 1


class AnswersFirst(httpx.AsyncBaseTransport):
    """The real server behind a proxy that answers the first request itself with
    ``status``, as a load balancer or a gateway does."""

    def __init__(self, inner: httpx.AsyncBaseTransport, status: int) -> None:
        self.inner, self.status, self.sent = inner, status, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.sent == 1:
            return httpx.Response(self.status, text="the proxy says no")
        return await self.inner.handle_async_request(request)


NOT_RETRIED = {
    500: fedclient.ServerError,
    501: fedclient.ServerError,
    400: fedclient.InvalidRequest,
    403: fedclient.Forbidden,
    404: fedclient.NotFound,
}


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504, *NOT_RETRIED])
async def test_requests_retry_on_408_429_502_503_504_and_on_nothing_else(
    server: Server, make_devices: Any, status: int
) -> None:
    # README, Reliability: "only connect errors, timeouts, resets and
    # 408/429/502/503/504"; a 500 may have done its work, a 4xx will say the same again.
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    proxy = AnswersFirst(server.transport(), status)
    (device,) = make_devices(1, proxy, retry=RetryPolicy(max_attempts=3, seed=0), asleep=record)
    if status not in NOT_RETRIED:
        assert (await device.astep()).status == "admitted"
        assert (proxy.sent, device.stats.retries, len(slept)) == (2, 1, 1)
    else:
        with pytest.raises(NOT_RETRIED[status]):
            await device.astep()
        assert (proxy.sent, device.stats.retries, slept) == (1, 0, [])


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, fedclient.ServerError),
        (502, fedclient.BadGateway),
        (503, fedclient.ServiceUnavailable),
        (504, fedclient.GatewayTimeout),
    ],
)
async def test_a_gateway_s_bare_5xx_is_typed_with_its_own_status(
    server: Server, make_devices: Any, status: int, error: type[fedclient.ServerError]
) -> None:
    """A load balancer that keeps answering 502 or 504 (no JSON body of ours): once the
    retries are spent, the app sees which it was, not a 500."""

    class Gateway(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return httpx.Response(status, text="<html>gateway</html>")

    async def no_wait(delay: float) -> None:
        pass

    (device,) = make_devices(
        1, Gateway(), retry=RetryPolicy(max_attempts=2, seed=0), asleep=no_wait
    )
    with pytest.raises(error) as raised:
        await device.astep()
    assert type(raised.value) is error and raised.value.status == status


async def test_a_thousand_uploads_through_30_percent_faults_count_exactly_once(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(
        rounds=10, devices_per_round=100, over_selection=1.0, min_devices=1, deadline_seconds=10_000
    )
    transports = [
        FaultyTransport(server.transport(), FaultPlan.parse("drop=0.3"), seed=i) for i in range(100)
    ]

    async def no_wait(delay: float) -> None:
        return None

    devices = make_devices(
        100,
        transports,
        asleep=no_wait,
        per_device={"retry": lambda i: RetryPolicy(max_attempts=5, seed=i)},
    )
    for round_number in range(1, 11):
        pending = list(devices)
        while pending:
            still = []
            for device in pending:
                try:
                    outcome = await device.arun_once()
                except (fedclient.TransportError, fedclient.ServerError):
                    still.append(device)  # retries exhausted: the device tries again later
                    continue
                assert outcome.status == "uploaded", outcome
            pending = still
        assert server.service.job_status("digits").rounds_completed == round_number

    receipts = [r for d in devices for r in d.device_state.receipts("digits")]
    assert len(receipts) == 1000
    rows = [u for round_id in range(1, 11) for u in server.store.updates(round_id)]
    assert len(rows) == 1000
    assert sorted(r.receipt_id for r in rows) == sorted(r.receipt_id for r in receipts)
    assert len({(r.round_id, r.device_id) for r in rows}) == 1000
    # Faults of every kind really happened, at the asked-for rate.
    injected = {k: sum(t.counts.injected[k] for t in transports) for k in FaultPlan.KINDS}
    total = sum(t.counts.requests for t in transports)
    assert all(n > 50 for n in injected.values()), injected
    assert 0.25 < sum(injected.values()) / total < 0.35
    # Every fault but a duplicate (which the client never sees) costs a retry.
    assert sum(d.stats.retries for d in devices) > 0.2 * total
    assert sum(d.stats.wasted_bytes for d in devices) > 0
    assert server.service.job_status("digits").model_version == 10


def test_a_sync_client_rides_out_faults_against_real_http(
    live_server: Any, make_devices: Any
) -> None:
    live = live_server(devices_per_round=3, over_selection=1.0)
    transports = [
        FaultyTransport(httpx.HTTPTransport(), FaultPlan.parse("drop=0.5"), seed=i)
        for i in range(3)
    ]
    devices = make_devices(
        3,
        transports,
        base=live.url,
        sleep=lambda _: None,
        per_device={"retry": lambda i: RetryPolicy(max_attempts=12, seed=i)},
    )
    try:
        assert [d.run_once().status for d in devices] == ["uploaded"] * 3
    finally:
        for d in devices:
            d.close()
    assert live.server.service.job_status("digits").model_version == 1
    assert sum(t.counts.requests for t in transports) > sum(d.stats.requests for d in devices) / 2


def test_a_server_that_never_answers_times_out_is_retried_and_ends_typed(
    digits: Any,
) -> None:
    # Reliability: requests retry on "connect errors, timeouts, resets". A peer that
    # accepts the connection and then says nothing (a hung proxy, a stalled server).
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def hold_connections() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])  # read nothing, answer nothing
            except TimeoutError:
                continue

    holder = threading.Thread(target=hold_connections)
    holder.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    device = fedclient.Client(
        url,
        "digits",
        (digits.x_train[:20], digits.y_train[:20]),
        timeout=0.3,
        retry=RetryPolicy(max_attempts=3, base_seconds=0.01, seed=0),
    )
    try:
        with pytest.raises(fedclient.RequestTimeout):
            device.run_once()
        assert device.stats.requests == 3 and device.stats.retries == 2
        assert len(accepted) >= 1  # it got through to the peer, which never answered
    finally:
        device.close()
        done.set()
        holder.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()
