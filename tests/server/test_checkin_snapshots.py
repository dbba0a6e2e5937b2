"""Check-ins answered "not now" from a worker's recent view of the job (issue 27): they
write nothing and take no lock; admissions stay exact; another worker's pause is seen
within `SNAPSHOT_SECONDS`, this worker's own at once."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from fedclient._exceptions import Unauthorized
from fedclient.protocol import Admitted, CheckinRequest, EnrolRequest, JobFinished, RetryLater
from fedclient.server import FederationService, ServerStore
from fedclient.server.job_snapshots import ROUND_FULL, SNAPSHOT_SECONDS
from fedclient.server.postgres import REQUEST_LOCK
from tests.conftest import ManualClock, Server, make_plan


class Monotonic:
    """The snapshots' clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tokens(service: FederationService, count: int) -> list[str]:
    return [service.enrol(EnrolRequest()).token for _ in range(count)]


def test_a_full_round_answers_check_ins_without_writing_or_locking(
    engine: str, make_server: Callable[..., Server], postgres: Any
) -> None:
    server = make_server(devices_per_round=2, over_selection=1.0, deadline_seconds=600.0)
    service = server.service
    tokens = _tokens(service, 12)
    first = [service.checkin(t, "digits", CheckinRequest()) for t in tokens[:2]]
    assert all(isinstance(a, Admitted) for a in first)
    before = service.store.fingerprint()

    def turned_away() -> list[Any]:
        return [service.checkin(t, "digits", CheckinRequest()) for t in tokens[2:]]

    if engine == "postgresql":
        # Another session holds the lock the exact path takes: the answers come anyway.
        with psycopg.connect(service.store.url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", [REQUEST_LOCK])
            with ThreadPoolExecutor(1) as pool:
                answers = pool.submit(turned_away).result(timeout=60)
    else:
        answers = turned_away()
    assert service.store.fingerprint() == before  # nothing written
    assert all(isinstance(a, RetryLater) and a.reason == ROUND_FULL for a in answers)
    waits = [a.retry_after for a in answers]
    assert all(300.0 <= w <= 600.0 for w in waits)  # spread over the wait to the deadline...
    assert len(set(waits)) == len(waits)  # ...each device its own share of it
    # A device already admitted is answered on the exact path: its plan again.
    again = service.checkin(tokens[0], "digits", CheckinRequest())
    assert isinstance(again, Admitted) and again.plan.round_id == first[0].plan.round_id  # type: ignore[union-attr]
    assert service.job_status("digits").current_round.admitted == 2  # type: ignore[union-attr]


def test_a_place_given_back_is_taken_at_once_and_exactly(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(devices_per_round=2, over_selection=1.0)
    service = server.service
    tokens = _tokens(service, 4)
    admitted = [service.checkin(t, "digits", CheckinRequest()) for t in tokens[:2]]
    assert isinstance(service.checkin(tokens[2], "digits", CheckinRequest()), RetryLater)
    assert service.leave(tokens[0], admitted[0].plan.round_id)  # type: ignore[union-attr]
    # This worker wrote: its view of the round is read again, and the place is free.
    assert isinstance(service.checkin(tokens[2], "digits", CheckinRequest()), Admitted)
    assert isinstance(service.checkin(tokens[3], "digits", CheckinRequest()), RetryLater)


def test_a_pause_on_another_worker_is_seen_within_the_snapshot_age(
    engine: str, db_url: Callable[..., str]
) -> None:
    if engine != "postgresql":
        pytest.skip("two workers share a PostgreSQL database only")
    clock, url = ManualClock(), db_url("shared")
    workers = [FederationService(ServerStore(url), clock=clock) for _ in range(2)]
    monotonic = Monotonic()
    for worker in workers:
        worker.snapshots.monotonic = monotonic
        worker.add_job(make_plan(devices_per_round=1, over_selection=1.0))
    tokens = _tokens(workers[0], 3)
    assert isinstance(workers[0].checkin(tokens[0], "digits", CheckinRequest()), Admitted)
    full = workers[1].checkin(tokens[1], "digits", CheckinRequest())
    assert isinstance(full, RetryLater) and full.reason == ROUND_FULL

    workers[0].operator.set_job_status("digits", "pause")
    paused = workers[0].checkin(tokens[2], "digits", CheckinRequest())  # its own write
    assert isinstance(paused, RetryLater) and paused.reason == "the job is paused"
    monotonic.now = SNAPSHOT_SECONDS / 2
    stale = workers[1].checkin(tokens[1], "digits", CheckinRequest())
    assert isinstance(stale, RetryLater) and stale.reason == ROUND_FULL
    monotonic.now = SNAPSHOT_SECONDS
    seen = workers[1].checkin(tokens[1], "digits", CheckinRequest())
    assert isinstance(seen, RetryLater) and seen.reason == "the job is paused"
    assert 150.0 <= seen.retry_after <= 300.0

    workers[0].operator.set_job_status("digits", "stop")
    monotonic.now = 2 * SNAPSHOT_SECONDS
    assert isinstance(workers[1].checkin(tokens[1], "digits", CheckinRequest()), JobFinished)
    for worker in workers:
        worker.store.close()


def test_a_stranger_is_turned_away_while_the_round_is_full_and_refused_when_there_is_room(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(devices_per_round=1, over_selection=1.0)
    service = server.service
    tokens = _tokens(service, 2)
    admitted = service.checkin(tokens[0], "digits", CheckinRequest())
    assert isinstance(admitted, Admitted)
    # A "not now" reads no device row: a token nobody holds is told "not now" too...
    full = service.checkin("no-such-token", "digits", CheckinRequest())
    assert isinstance(full, RetryLater) and full.reason == ROUND_FULL
    service.leave(tokens[0], admitted.plan.round_id)
    with pytest.raises(Unauthorized):  # ...and refused once it could be admitted
        service.checkin("no-such-token", "digits", CheckinRequest())


def test_where_job_status_is_private_a_stranger_is_refused_even_while_the_round_is_full(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(
        devices_per_round=1, over_selection=1.0, service_options={"public_status": False}
    )
    service = server.service
    token = _tokens(service, 1)[0]
    assert isinstance(service.checkin(token, "digits", CheckinRequest()), Admitted)
    with pytest.raises(Unauthorized):
        service.checkin("no-such-token", "digits", CheckinRequest())
