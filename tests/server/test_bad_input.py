"""Every class of bad input gets a clear 4xx JSON error and changes no stored byte."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from fedclient.protocol import TENSOR_MEDIA_TYPE, decode_tensors, encode_tensors
from tests.conftest import Server, enrol

pytestmark = pytest.mark.anyio


async def _admit(http: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    answer = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()
    assert answer["status"] == "admitted"
    return answer["plan"]  # type: ignore[no-any-return]


def _update(server: Server, **change: Any) -> dict[str, np.ndarray]:
    body, _ = server.store.model("digits", 0) or (b"", "")
    weights, _ = decode_tensors(body)
    delta = {k: np.zeros_like(v) for k, v in weights.items()}
    delta.update(change)
    return delta


async def _post_update(
    http: httpx.AsyncClient, auth: dict[str, str], round_id: int, body: bytes, key: str = "k1"
) -> Any:
    return await http.post(
        f"/v1/rounds/{round_id}/updates",
        content=body,
        headers={**auth, "Idempotency-Key": key, "Content-Type": TENSOR_MEDIA_TYPE},
    )


def _expect(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


META = {"num_examples": "10", "model_version": "0"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
    ],
)
async def test_missing_or_wrong_token_is_401_and_changes_nothing(
    server: Server, headers: dict[str, str]
) -> None:
    async with server.http() as http:
        before = server.store.fingerprint()
        _expect(
            await http.post("/v1/jobs/digits/checkin", json={}, headers=headers),
            401,
            "unauthorized",
        )
        _expect(await http.get("/v1/models/digits/0", headers=headers), 401, "unauthorized")
        _expect(
            await http.post(
                "/v1/rounds/1/updates", content=b"x", headers={**headers, "Idempotency-Key": "k"}
            ),
            401,
            "unauthorized",
        )
        assert server.store.fingerprint() == before


async def test_unknown_job_round_and_version_are_404(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    http, auth = enrolled
    before = server.store.fingerprint()
    _expect(await http.post("/v1/jobs/nope/checkin", json={}, headers=auth), 404, "not_found")
    _expect(await http.get("/v1/jobs/nope"), 404, "not_found")
    _expect(await http.get("/v1/models/digits/99", headers=auth), 404, "not_found")
    _expect(await http.get("/v1/models/nope/0", headers=auth), 404, "not_found")
    _expect(await http.get("/v1/models/digits/abc", headers=auth), 404, "not_found")
    _expect(
        await _post_update(http, auth, 999, encode_tensors(_update(server), META)), 404, "not_found"
    )
    _expect(await http.get("/v1/no/such/route"), 404, "not_found")
    assert server.store.fingerprint() == before


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "extra",
        "shape",
        "dtype",
        "nan",
        "inf",
        "garbage",
        "truncated",
        "no_examples",
        "bad_examples",
        "too_many_examples",
        "huge_finite",
        "wrong_version",
    ],
)
async def test_invalid_update_is_400_and_changes_nothing(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]], case: str
) -> None:
    http, auth = enrolled
    plan = await _admit(http, auth)
    delta = _update(server)
    meta = dict(META)
    name = "fc1.weight"
    if case == "missing":
        del delta[name]
    elif case == "extra":
        delta["fc9.weight"] = np.zeros(3, np.float32)
    elif case == "shape":
        delta[name] = np.zeros((2, 2), np.float32)
    elif case == "dtype":
        delta[name] = delta[name].astype(np.float64)
    elif case == "nan":
        delta[name][0, 0] = np.nan
    elif case == "inf":
        delta[name][1, 1] = np.inf
    elif case == "no_examples":
        del meta["num_examples"]
    elif case == "bad_examples":
        meta["num_examples"] = "-3"
    elif case == "too_many_examples":  # a FedAvg weight of 1e9 drowns everyone else
        meta["num_examples"] = str(10**9)
    elif case == "huge_finite":  # finite 3e38s: their weighted mean overflows to inf
        delta[name][:] = 3e38
    elif case == "wrong_version":
        meta["model_version"] = "5"
    body = encode_tensors(delta, meta)
    if case == "garbage":
        body = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    elif case == "truncated":
        body = body[: len(body) // 2]
    before = server.store.fingerprint()
    _expect(await _post_update(http, auth, plan["round_id"], body), 400, "invalid_request")
    assert server.store.fingerprint() == before


async def test_malformed_json_and_missing_idempotency_key_are_400(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    http, auth = enrolled
    plan = await _admit(http, auth)
    before = server.store.fingerprint()
    _expect(
        await http.post("/v1/jobs/digits/checkin", content=b"{nope", headers=auth),
        400,
        "invalid_request",
    )
    _expect(
        await http.post("/v1/jobs/digits/checkin", json={"runtime": 5}, headers=auth),
        400,
        "invalid_request",
    )
    _expect(await http.post("/v1/devices", json={"unknown": 1}), 400, "invalid_request")
    _expect(
        await http.post(
            f"/v1/rounds/{plan['round_id']}/updates",
            content=encode_tensors(_update(server), META),
            headers=auth,
        ),
        400,
        "invalid_request",
    )
    assert server.store.fingerprint() == before


async def test_body_over_the_limit_is_413(make_server: Any) -> None:
    server = make_server(max_upload_bytes=1000)
    async with server.http() as http:
        auth = await enrol(http)
        plan = await _admit(http, auth)
        before = server.store.fingerprint()
        _expect(
            await _post_update(http, auth, plan["round_id"], encode_tensors(_update(server), META)),
            413,
            "payload_too_large",
        )

        async def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            yield b"\x00" * 800
            yield b"\x00" * 800

        _expect(
            await http.post(
                f"/v1/rounds/{plan['round_id']}/updates",
                content=chunks(),
                headers={**auth, "Idempotency-Key": "k"},
            ),
            413,
            "payload_too_large",
        )
        assert server.store.fingerprint() == before


async def test_not_admitted_is_403(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    http, auth = enrolled
    before = server.store.fingerprint()
    _expect(
        await _post_update(http, auth, 1, encode_tensors(_update(server), META)), 403, "forbidden"
    )
    assert server.store.fingerprint() == before


async def test_upload_after_close_is_409_and_after_deadline_410(server: Server) -> None:
    async with server.http() as http:
        auths = [await enrol(http) for _ in range(3)]
        plans = [await _admit(http, a) for a in auths]  # 3 admitted (2 x 1.5)
        body = encode_tensors(_update(server), META)
        for i in range(2):
            assert (
                await _post_update(http, auths[i], plans[i]["round_id"], body)
            ).status_code == 200
        before = server.store.fingerprint()
        _expect(await _post_update(http, auths[2], plans[2]["round_id"], body), 409, "round_closed")
        assert server.store.fingerprint() == before
        # Round 2: one device admitted, then the deadline passes (min_devices=1: aggregated).
        plan = await _admit(http, auths[0])
        server.clock.now = plan["deadline"] + 1
        server.service.tick()
        before = server.store.fingerprint()
        _expect(
            await _post_update(http, auths[0], plan["round_id"], body, key="late"),
            410,
            "deadline_passed",
        )
        assert server.store.fingerprint() == before


async def test_duplicate_upload_returns_the_original_receipt_and_counts_once(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    http, auth = enrolled
    plan = await _admit(http, auth)
    body = encode_tensors(_update(server), META)
    first = await _post_update(http, auth, plan["round_id"], body, key="same")
    assert first.status_code == 200
    before = server.store.fingerprint()
    for _ in range(3):
        again = await _post_update(http, auth, plan["round_id"], body, key="same")
        assert again.status_code == 200
        assert again.json() == first.json()
    assert server.store.fingerprint() == before
    assert server.store.update_count(plan["round_id"]) == 1
    # A second, different update from the same device for the same round is a conflict.
    _expect(await _post_update(http, auth, plan["round_id"], body, key="other"), 409, "conflict")
    assert server.store.update_count(plan["round_id"]) == 1


async def test_a_wrong_token_stays_401_after_the_right_one_was_seen(
    server: Server, enrolled: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    # The server remembers the devices it authenticated; that must not let a near miss in.
    http, auth = enrolled
    assert (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).status_code == 200
    near = {"Authorization": auth["Authorization"][:-1] + "!"}
    before = server.store.fingerprint()
    _expect(await http.post("/v1/jobs/digits/checkin", json={}, headers=near), 401, "unauthorized")
    assert server.store.fingerprint() == before


async def test_a_revoked_devices_upload_is_401_before_its_body_and_changes_nothing(
    server: Server,
) -> None:
    """Admitted, then revoked (by the operator, or another worker): its upload is
    refused from the same read that finds the round's state (a shared database), its
    body never taken."""
    async with server.http() as http:
        auth = await enrol(http)
        plan = await _admit(http, auth)
        device_id = server.service.authenticate(auth["Authorization"].split()[1])
        server.service.operator.revoke(device_id)
        before = server.store.fingerprint()
        body = encode_tensors(_update(server), {"num_examples": "10", "model_version": "0"})
        answer = await _post_update(http, auth, plan["round_id"], body)
        _expect(answer, 401, "unauthorized")
        assert server.store.fingerprint() == before
        assert server.store.update_count(plan["round_id"]) == 0
