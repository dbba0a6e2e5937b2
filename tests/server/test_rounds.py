"""Sync rounds: quota, deadlines, min_devices, exact FedAvg, and resuming after a restart."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

import fedclient
from fedclient.protocol import CheckinResponse, decode_tensors
from fedclient.server import ClientUpdate, FedAvg, FederationService, ServerStore, rounds
from fedclient.server import store as store_module
from fedclient.server.auth import hash_token
from tests.conftest import ManualClock, Server, make_plan

pytestmark = pytest.mark.anyio


def _weights(server: Server, version: int) -> dict[str, np.ndarray]:
    found = server.store.model("digits", version)
    assert found is not None
    return decode_tensors(found[0])[0]


def test_fedavg_is_the_example_weighted_mean_of_the_updates() -> None:
    base = {"w": np.array([1.0, 2.0], np.float32)}
    updates = [
        ClientUpdate("a", 1, {"w": np.array([3.0, 0.0], np.float32)}),
        ClientUpdate("b", 3, {"w": np.array([-1.0, 4.0], np.float32)}),
    ]
    new, state = FedAvg().aggregate(base, updates, {})
    np.testing.assert_allclose(new["w"], [1.0 + (3 - 3) / 4, 2.0 + 12 / 4])
    assert new["w"].dtype == np.float32 and state == {}
    with pytest.raises(ValueError):
        FedAvg().aggregate(base, [], {})


async def test_round_closes_at_quota_and_aggregates_exactly(
    server: Server, make_devices: Any
) -> None:
    devices = make_devices(3, server.transport())
    outcomes = [await d.arun_once() for d in devices]
    # Quota is 2: the first two uploads close round 1; the third device then joins round 2.
    assert [o.status for o in outcomes] == ["uploaded", "uploaded", "uploaded"]
    assert [o.round_id for o in outcomes] == [1, 1, 2]
    status = server.service.job_status("digits")
    assert status.model_version == 1 and status.current_round is not None
    assert status.current_round.number == 2 and status.current_round.updates == 1
    rows = server.store.updates(1)
    assert [r.device_id for r in rows] == [o.receipt.device_id for o in outcomes[:2]]  # type: ignore[union-attr]


async def test_updates_held_decoded_aggregate_as_their_stored_bodies(
    make_server: Any, make_devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close aggregates the tensors checked at upload, or decodes the stored bodies
    # (over the memory bound, or after a restart): the same model either way.
    models = []
    for bound in (rounds.DECODED_MAX_BYTES, 0):
        monkeypatch.setattr(rounds, "DECODED_MAX_BYTES", bound)
        server = make_server()
        for d in make_devices(2, server.transport()):
            assert (await d.arun_once()).status == "uploaded"
        models.append(_weights(server, 1))
        for row in server.store.updates(1):  # the close let go of everything it held
            assert server.service.rounds.drop_decoded(row.receipt_id) is None
    assert models[0].keys() == models[1].keys()
    assert all(np.array_equal(models[0][k], models[1][k]) for k in models[0])


async def test_deadline_with_too_few_updates_fails_and_keeps_the_model(
    make_server: Any, make_devices: Any
) -> None:
    server = make_server(min_devices=2)
    (device,) = make_devices(1, server.transport(), clock=server.clock)
    assert (await device.arun_once()).status == "uploaded"
    server.clock.now += 61
    server.service.tick()
    status = server.service.job_status("digits")
    assert status.previous_round is not None and status.previous_round.status == "failed"
    assert "fewer than min_devices" in status.previous_round.reason
    assert status.model_version == 0 and status.rounds_failed == 1
    assert status.current_round is not None and status.current_round.model_version == 0
    # The device holds version 0 already: its next download is a 304, not a second copy.
    down = device.stats.bytes_down
    assert (await device.astep()).status == "admitted"
    assert (await device.astep()).status == "downloaded"
    assert device.stats.bytes_down - down < 2000


async def test_deadline_with_enough_updates_aggregates(make_server: Any, make_devices: Any) -> None:
    server = make_server(devices_per_round=3, min_devices=1)
    (device,) = make_devices(1, server.transport(), clock=server.clock)
    await device.arun_once()
    server.clock.now += 61
    server.service.tick()
    status = server.service.job_status("digits")
    assert status.previous_round is not None and status.previous_round.status == "closed"
    assert status.model_version == 1
    assert not np.array_equal(_weights(server, 0)["fc1.weight"], _weights(server, 1)["fc1.weight"])


async def test_a_device_that_trained_past_the_deadline_discards_its_work(
    server: Server, make_devices: Any
) -> None:
    (device,) = make_devices(1, server.transport(), clock=server.clock)
    assert (await device.astep()).status == "admitted"
    assert device.device_state.progress("digits").phase is fedclient.Phase.DOWNLOADED
    server.clock.now += 61
    outcome = await device.astep()
    assert outcome.status == "discarded" and "deadline" in outcome.reason
    assert device.device_state.progress("digits").phase is fedclient.Phase.IDLE


async def test_the_job_finishes_after_its_rounds(server: Server, make_devices: Any) -> None:
    devices = make_devices(2, server.transport())
    for _ in range(3):
        for d in devices:
            assert (await d.arun_once()).status == "uploaded"
    assert [(await d.arun_once()).status for d in devices] == ["finished", "finished"]
    assert server.service.job_status("digits").status == "finished"


async def test_a_restarted_server_resumes_at_the_stored_round_and_version(
    db_url: Any, make_devices: Any
) -> None:
    db = db_url("server")
    clock = ManualClock()
    first = FederationService(ServerStore(db), clock=clock)
    first.add_job(make_plan())
    server = Server(first, clock)
    devices = make_devices(2, server.transport())
    for d in devices:
        await d.arun_once()
    weights = _weights(server, 1)
    first.store.close()

    again = FederationService(ServerStore(db), clock=clock)
    again.add_job(make_plan())  # same plan: resume, do not reset
    status = again.job_status("digits")
    assert status.model_version == 1 and status.current_round is not None
    assert status.current_round.number == 2
    resumed = Server(again, clock)
    assert all(np.array_equal(weights[k], v) for k, v in _weights(resumed, 1).items())
    for d in devices:  # the same devices (same SQLite state) against the new server
        again_device = fedclient.Client(
            d.server,
            d.job,
            d.data,
            state=d.device_state,
            transport=resumed.transport(),
            seed=d.seed,
        )
        assert (await again_device.arun_once()).round_id == 2
    assert again.job_status("digits").model_version == 2
    with pytest.raises(fedclient.InvalidInput, match="different plan"):
        again.add_job(make_plan(rounds=9))


async def test_an_admission_carries_the_model_only_when_asked_and_it_fits(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    http, auth = enrolled
    url = "/v1/jobs/digits/checkin"
    packed = {**auth, "Accept": "application/msgpack"}
    body, etag = _model(server, 0)

    async def checkin(headers: dict[str, str], **request: Any) -> Any:
        answer = await http.post(url, headers=headers, json=request)
        assert answer.status_code == 200
        if answer.headers["content-type"] == "application/msgpack":
            return msgspec.msgpack.decode(answer.content, type=CheckinResponse)
        return msgspec.json.decode(answer.content, type=CheckinResponse)

    # JSON answers never carry bytes; a device that does not ask gets none either.
    assert (await checkin(auth, inline_model_max=1 << 20)).model is None
    assert (await checkin(packed)).model is None
    # Asked, and it fits: the model route's body and ETag, in the (same) admission.
    admitted = await checkin(packed, inline_model_max=len(body))
    assert admitted.plan.round_id == 1 and (admitted.model, admitted.model_etag) == (body, etag)
    # Too big for the device, or the version it already holds: none.
    assert (await checkin(packed, inline_model_max=len(body) - 1)).model is None
    assert (await checkin(packed, inline_model_max=len(body), model_version=0)).model is None
    assert server.store.admitted_count(1) == 1  # asking again admitted nobody twice


async def test_a_model_is_served_with_its_etag_and_not_again_to_whoever_holds_it(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    # README's routes: GET /v1/models/{job}/{version}, "ETag / If-None-Match". A cache
    # in between (or curl) asks as RFC 9110 lets it: a list, weak tags, "*".
    http, auth = enrolled
    body, etag = _model(server, 0)
    whole = await http.get("/v1/models/digits/0", headers=auth)
    assert (whole.status_code, whole.content, whole.headers["etag"]) == (200, body, etag)
    assert "immutable" in whole.headers["cache-control"]
    for held in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await http.get("/v1/models/digits/0", headers={**auth, "If-None-Match": held})
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag), held
    for other in ('"other"', etag.strip('"'), f'"{etag}"'):
        again = await http.get("/v1/models/digits/0", headers={**auth, "If-None-Match": other})
        assert (again.status_code, again.content) == (200, body), other


def _model(server: Server, version: int) -> tuple[bytes, str]:
    found = server.store.model("digits", version)
    assert found is not None
    return found


def test_a_rounds_updates_are_read_in_arrival_order_without_a_sort() -> None:
    store = ServerStore()
    for seq, device in enumerate(["c", "a", "b"]):
        store.add_update(1, device, f"k{seq}", f"r{seq}", 1, None, b"x" * 100, float(seq))
    assert [r.device_id for r in store.updates(1)] == ["c", "a", "b"]
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM updates WHERE round_id=? ORDER BY seq", [1]
    ).fetchall()
    assert not any("TEMP B-TREE" in step[-1] for step in plan), plan  # no copy of the bodies


async def test_a_first_check_in_enrols_the_proposed_token_once(server: Server) -> None:
    token = "t" * 43
    auth = {"Authorization": f"Bearer {token}"}
    url = "/v1/jobs/digits/checkin"
    async with server.http() as http:
        stranger = await http.post(url, headers=auth, json={})
        assert stranger.status_code == 401  # unknown, and it did not ask to enrol
        first = await http.post(url, headers=auth, json={"enrol_label": "phone"})
        again = await http.post(url, headers=auth, json={"enrol_label": "phone"})
        known = await http.post(url, headers=auth, json={})
    assert first.status_code == again.status_code == known.status_code == 200
    device_id = first.headers["Device-Id"]
    assert device_id and again.headers["Device-Id"] == device_id  # a retry: the same device
    assert "Device-Id" not in known.headers
    assert server.store.device_for_token(hash_token(token)) == device_id
    assert server.store.admitted_count(1) == 1


def test_the_rows_kept_in_memory_follow_each_write_and_drop_a_rolled_back_one(
    db_url: Any,
) -> None:
    store = ServerStore(db_url("server"))
    rounds.SyncRounds(store).create_job(make_plan(), now=0.0)
    (first,) = store.open_rounds()
    rid = first.round_id

    def view(s: ServerStore) -> tuple[object, ...]:
        return (
            s.job("digits"),
            s.round(rid),
            s.open_rounds(),
            s.latest_rounds("digits", 1),
            s.update_count(rid),
            s.admitted_count(rid),
            s.is_admitted(rid, "a"),
            s.has_update(rid, "a"),
        )

    def reopened() -> tuple[object, ...]:
        with ServerStore(db_url("server")) as again:
            return view(again)

    view(store)  # every read now comes from memory
    store.admit(rid, "a", 1.0)
    store.add_update(rid, "a", "k", "r", 5, 0.5, b"x", 1.0)
    store.admit(rid, "c", 1.0)
    store.withdraw(rid, "c")  # an async upload uses up its admission
    assert not store.is_admitted(rid, "c")
    with store.atomic():
        store.update_job(
            "digits", status="running", model_version=1, rounds_completed=1, rounds_failed=0
        )
        store.close_round(rid, "closed", 2.0, "quota", 0.5)
        store.open_round("digits", 2, 1, 2.0, 62.0)
    assert view(store) == reopened()
    assert store.update_count(rid) == store.admitted_count(rid) == 1
    assert store.job("digits").model_version == 1 and len(store.latest_rounds("digits", 2)) == 2

    (second,) = store.open_rounds()
    before = view(store)
    with pytest.raises(RuntimeError), store.atomic():
        store.admit(second.round_id, "b", 3.0)
        store.add_update(second.round_id, "b", "k2", "r2", 5, 0.5, b"x", 3.0)
        store.update_job(
            "digits", status="finished", model_version=2, rounds_completed=2, rounds_failed=0
        )
        store.close_round(second.round_id, "closed", 3.0, "quota", 0.5)
        # Read back inside the transaction: memory holds what is about to roll back.
        assert store.job("digits").status == "finished" and not store.open_rounds()
        assert store.update_count(second.round_id) == store.admitted_count(second.round_id) == 1
        assert store.is_admitted(second.round_id, "b") and store.has_update(second.round_id, "b")
        raise RuntimeError("the aggregation failed")
    assert view(store) == before == reopened()
    assert store.open_rounds() == [second] and store.update_count(second.round_id) == 0
    assert not store.is_admitted(second.round_id, "b")
    assert not store.has_update(second.round_id, "b")


def test_the_store_keeps_a_bounded_number_of_rounds_devices_in_memory() -> None:
    store = ServerStore()
    many = store_module.KEPT_ROUNDS * 2 + 1
    for round_id in range(1, many + 1):
        store.admit(round_id, f"d{round_id}", 0.0)
        assert store.is_admitted(round_id, f"d{round_id}")
        assert not store.is_admitted(round_id, "someone else")
        assert store.update_count(round_id) == 0
        assert len(store._admitted) <= store_module.KEPT_ROUNDS
        assert len(store._update_counts) <= store_module.KEPT_ROUNDS
    # Forgotten rounds are read again, right.
    assert store.is_admitted(1, "d1") and store.admitted_count(1) == 1
